//! The agent endpoint: the wire format of the agent protocol and the
//! server's side of an agent's connection.
//!
//! An agent connects to the API's port and asks to switch protocols
//! (`GET /v1/agent` with `Upgrade: rustci-agent`). Then both sides exchange
//! length-prefixed frames (a 4-byte big-endian length, then rmp-serde):
//!
//! 1. the agent sends a [`Hello`] (protocol version, join token, node name);
//! 2. the server answers [`HelloReply::Welcome`], or
//!    [`HelloReply::Rejected`] with a reason and closes: a wrong version, a
//!    wrong token or garbage is refused, logged once, and changes nothing;
//! 3. the agent sends [`Up`] frames (protocol messages and output chunks),
//!    the server [`Down`] frames (protocol messages for one incarnation).
//!
//! What the messages mean is `rustci_core::protocol`'s business; this module
//! only moves them, and writes shipped output where `GET .../logs` reads it.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustci_core::model::{AttemptNumber, JobId};
use rustci_core::protocol::{AgentMsg, ServerMsg, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The protocol name in the `Upgrade` header.
pub const AGENT_UPGRADE: &str = "rustci-agent";
/// The path agents connect to.
pub const AGENT_PATH: &str = "/v1/agent";
/// Largest frame either side accepts.
pub const FRAME_BYTES_MAX: usize = 4 << 20;
/// Bytes of output per [`Up::Output`] chunk.
pub const OUTPUT_CHUNK_BYTES: usize = 64 * 1024;
/// How long a new connection may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting to be written to one agent before new ones are dropped
/// (the protocol repeats what matters).
pub const DOWN_QUEUE_MAX: usize = 4096;
/// Silence after which the server closes an agent's connection.
pub const LINK_SILENCE_MAX: Duration = Duration::from_secs(10);
/// Bytes of one attempt's shipped output the server keeps (the agent's
/// runner caps output at 8 MiB plus its truncation marker).
pub const OUTPUT_BYTES_MAX: u64 = 8 * 1024 * 1024 + 4096;

const _: () = assert!(OUTPUT_CHUNK_BYTES * 2 < FRAME_BYTES_MAX);

/// The first frame of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub join_token: Option<String>,
    pub node: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome {
        server: u64,
    },
    /// Refused. `permanent`: retrying cannot help (a wrong token, another
    /// version, a bad name); otherwise it may (the name is held by a
    /// connection that is not closed yet).
    Rejected {
        reason: String,
        permanent: bool,
    },
}

/// Agent to server, after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Up {
    Msg(AgentMsg),
    /// Output of an attempt, at a byte offset (resending is harmless).
    Output {
        job: JobId,
        attempt: AttemptNumber,
        offset: u64,
        bytes: Vec<u8>,
    },
}

/// Server to agent: a protocol message for one incarnation of the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Down {
    pub incarnation: u64,
    pub msg: ServerMsg,
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> io::Result<()> {
    let bytes =
        rmp_serde::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    w.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is larger than {FRAME_BYTES_MAX}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    rmp_serde::from_slice(&buf).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undecodable frame: {e}"),
        )
    })
}

/// The connected agents, by node name: where the driver sends what the
/// replica has for them. A newer connection for a name replaces the older.
#[derive(Default)]
pub struct AgentLinks {
    links: Mutex<BTreeMap<String, (u64, mpsc::Sender<Down>)>>,
    next_id: Mutex<u64>,
}

impl AgentLinks {
    pub fn new() -> Arc<AgentLinks> {
        Arc::new(AgentLinks::default())
    }

    /// Registers the connection of `node`'s agent; `None` while another
    /// live connection holds that name (two processes claiming one node
    /// would each be told the other's work).
    fn register(&self, node: &str, tx: mpsc::Sender<Down>) -> Option<u64> {
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(node).is_some_and(|(_, old)| !old.is_closed()) {
            return None;
        }
        *next += 1;
        let id = *next;
        links.insert(node.to_string(), (id, tx));
        Some(id)
    }

    fn unregister(&self, node: &str, id: u64) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(node).is_some_and(|(i, _)| *i == id) {
            links.remove(node);
        }
    }

    /// Queues `msg` for the agent of `node`; dropped if it is not connected
    /// or its queue is full (the protocol tolerates lost messages).
    pub fn send(&self, node: &str, incarnation: u64, msg: ServerMsg) -> bool {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        match links.get(node) {
            Some((_, tx)) => tx.try_send(Down { incarnation, msg }).is_ok(),
            None => false,
        }
    }

    /// Names of the nodes with a live connection.
    pub fn connected(&self) -> Vec<String> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// What the server side of a connection needs.
pub struct LinkContext {
    pub links: Arc<AgentLinks>,
    pub join_token: Option<String>,
    pub server_id: u64,
    pub data_dir: std::path::PathBuf,
    /// A node name no remote agent may use (`rustci dev`'s built-in node).
    pub reserved_node: Option<String>,
    /// Where protocol messages from agents go (the driver).
    pub to_driver: mpsc::Sender<crate::control::Input>,
    /// Free space kept for the log: shipped output stops below it.
    pub disk_reserve_bytes: u64,
    /// Who leads: only the leader takes agents, and its connections close
    /// when it stops leading, so that agents go and find the new one.
    pub leader: tokio::sync::watch::Receiver<crate::control::LeaderView>,
    /// Every replica's API address by id, for telling agents where the
    /// leader is.
    pub replica_addrs: crate::control::AddressBook,
}

impl LinkContext {
    /// Why this replica takes no agents now, if it does not lead.
    fn not_leading(&self) -> Option<String> {
        let view = *self.leader.borrow();
        if view.leading {
            return None;
        }
        Some(match view.leader.filter(|&l| l != self.server_id) {
            Some(l) => format!(
                "replica {} is not the leader: replica {l} is, at {}",
                self.server_id,
                self.replica_addrs
                    .get(l)
                    .unwrap_or_else(|| "an unknown address".to_string())
            ),
            None => format!(
                "replica {} is not the leader, and no leader is known yet",
                self.server_id
            ),
        })
    }
}

/// Serves one agent connection (after the protocol switch) until it ends.
pub async fn serve_agent<S>(stream: S, ctx: Arc<LinkContext>, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<_, Hello>(&mut rd)).await {
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "agent connection refused: not a RustCI agent hello");
            let reason = format!("expected a hello frame: {e}");
            let reply = HelloReply::Rejected {
                reason,
                permanent: true,
            };
            let _ = write_frame(&mut wr, &reply).await;
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "agent connection refused: no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    };
    let mut refused = refusal(&hello, ctx.join_token.as_deref());
    if refused.is_none() && ctx.reserved_node.as_deref() == Some(hello.node.as_str()) {
        refused = Some(format!(
            "node name {} is this server's own runner",
            hello.node
        ));
    }
    let mut leader = ctx.leader.clone();
    let (tx, mut rx) = mpsc::channel::<Down>(DOWN_QUEUE_MAX);
    let id = match (refused, ctx.not_leading()) {
        (Some(reason), _) => Err((reason, true)),
        (None, Some(reason)) => Err((reason, false)),
        (None, None) => ctx.links.register(&hello.node, tx).ok_or_else(|| {
            let reason = format!("an agent named {} is connected already", hello.node);
            (reason, false)
        }),
    };
    let id = match id {
        Ok(id) => id,
        Err((reason, permanent)) => {
            tracing::warn!(%peer, node = %hello.node, %reason, "agent refused");
            let reply = HelloReply::Rejected { reason, permanent };
            let _ = write_frame(&mut wr, &reply).await;
            return;
        }
    };
    let welcome = HelloReply::Welcome {
        server: ctx.server_id,
    };
    if write_frame(&mut wr, &welcome).await.is_err() {
        ctx.links.unregister(&hello.node, id);
        return;
    }
    tracing::info!(%peer, node = %hello.node, "agent connected");
    let writer = tokio::spawn(async move {
        while let Some(down) = rx.recv().await {
            if write_frame(&mut wr, &down).await.is_err() {
                return;
            }
        }
    });
    // Attempts whose output stopped being stored on this connection.
    let mut cut: std::collections::BTreeSet<(JobId, AttemptNumber)> = Default::default();
    loop {
        // An agent heartbeats every second: a connection silent for much
        // longer is dead (a half-open one would otherwise hold its name).
        let read = tokio::time::timeout(LINK_SILENCE_MAX, read_frame::<_, Up>(&mut rd));
        let frame = tokio::select! {
            frame = read => match frame {
                Ok(frame) => frame,
                Err(_) => {
                    tracing::warn!(%peer, node = %hello.node, "agent connection silent; closing it");
                    break;
                }
            },
            _ = leader.wait_for(|v| !v.leading) => {
                tracing::info!(%peer, node = %hello.node, "no longer the leader: closing the agent's connection so that it finds the new one");
                break;
            }
        };
        match frame {
            Ok(Some(Up::Msg(msg))) => {
                if agent_msg_node(&msg) != hello.node {
                    tracing::warn!(%peer, node = %hello.node, "agent spoke for another node; closing");
                    break;
                }
                if ctx
                    .to_driver
                    .send(crate::control::Input::Agent(msg))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(Some(Up::Output { offset, bytes, .. }))
                if offset.saturating_add(bytes.len() as u64) > OUTPUT_BYTES_MAX =>
            {
                tracing::warn!(%peer, node = %hello.node, offset, "shipped output past the cap; dropped");
            }
            Ok(Some(Up::Output {
                job,
                attempt,
                offset,
                bytes,
            })) => {
                if cut.contains(&(job, attempt)) {
                    continue;
                }
                let path = crate::control::output_path(&ctx.data_dir, job, attempt);
                let room = crate::disk::room_for_output(&ctx.data_dir, ctx.disk_reserve_bytes);
                let written = if room {
                    write_output(&path, offset, &bytes).await
                } else {
                    Err(io::Error::other("the disk is nearly full"))
                };
                if let Err(e) = written {
                    // The rest of this attempt's output is not kept, and
                    // the output says so where it stops.
                    tracing::warn!(job = job.0, attempt, error = %e, "cannot store shipped output; the rest of it is dropped");
                    let marker = crate::disk::OUTPUT_INCOMPLETE_MARKER.as_bytes();
                    if write_output(&path, offset, marker).await.is_err() {
                        let _ = std::fs::File::create(crate::disk::incomplete_path(&path));
                    }
                    cut.insert((job, attempt));
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%peer, node = %hello.node, error = %e, "agent connection closed: bad frame");
                break;
            }
        }
    }
    ctx.links.unregister(&hello.node, id);
    writer.abort();
    tracing::info!(%peer, node = %hello.node, "agent disconnected");
}

/// The node an agent message speaks for.
fn agent_msg_node(msg: &AgentMsg) -> &str {
    match msg {
        AgentMsg::Heartbeat { node, .. } => &node.name,
        AgentMsg::Report(r) => &r.node,
        AgentMsg::Leaving { node, .. } => node,
    }
}

/// Why a hello is refused, if it is.
pub fn refusal(hello: &Hello, join_token: Option<&str>) -> Option<String> {
    if hello.protocol != PROTOCOL_VERSION {
        return Some(format!(
            "agent protocol version {} is not supported (this server speaks {PROTOCOL_VERSION})",
            hello.protocol
        ));
    }
    if let Some(want) = join_token {
        let given = hello.join_token.as_deref().unwrap_or_default();
        if !crate::server::constant_time_eq(given.as_bytes(), want.as_bytes()) {
            return Some("wrong or missing join token".into());
        }
    }
    if let Err(e) = rustci_core::validate::validate_node_name(&hello.node) {
        return Some(format!("bad node name: {e}"));
    }
    None
}

async fn write_output(path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncSeekExt;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .await?;
    f.seek(io::SeekFrom::Start(offset)).await?;
    f.write_all(bytes).await?;
    f.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            join_token: Some("t".into()),
            node: "n1".into(),
        };
        write_frame(&mut a, &hello).await.unwrap();
        let got: Hello = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(got, hello);
        a.write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await.unwrap();
        assert!(read_frame::<_, Hello>(&mut b).await.is_err());
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(read_frame::<_, Hello>(&mut b).await.is_err());
        drop(a);
        assert!(read_frame::<_, Hello>(&mut b).await.unwrap().is_none());
    }

    #[test]
    fn hello_with_another_version_or_token_is_refused() {
        let ok = Hello {
            protocol: PROTOCOL_VERSION,
            join_token: Some("secret".into()),
            node: "n1".into(),
        };
        assert_eq!(refusal(&ok, Some("secret")), None);
        assert_eq!(refusal(&ok, None), None);
        let wrong = Hello {
            join_token: Some("guess".into()),
            ..ok.clone()
        };
        assert!(refusal(&wrong, Some("secret"))
            .unwrap()
            .contains("join token"));
        let old = Hello {
            protocol: PROTOCOL_VERSION + 1,
            ..ok.clone()
        };
        assert!(refusal(&old, Some("secret")).unwrap().contains("version"));
        let bad = Hello {
            node: "bad name!".into(),
            ..ok
        };
        assert!(refusal(&bad, Some("secret")).unwrap().contains("node name"));
    }
}
