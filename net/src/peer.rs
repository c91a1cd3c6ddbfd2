//! Replica-to-replica traffic: Raft messages over the API's own port.
//!
//! A replica sends another a batch of messages as `POST /v1/raft` with an
//! rmp-serde [`PeerBatch`] body, on a keep-alive connection of its own per
//! peer ([`PeerTransport`]). The receiver checks the batch (protocol
//! version, cluster id, sender and addressee) before anything reaches its
//! driver, answers `204` at once, and sends its answers (vote and append
//! responses) back the same way as batches of its own: a request carries
//! messages one way only, so a slow peer never holds a driver.
//!
//! Raft tolerates lost messages, so the transport drops rather than
//! blocks: a full queue, a peer that cannot be reached or a batch it
//! refuses loses those messages, and Raft sends again at its next
//! heartbeat. Garbage, another protocol version or another cluster's
//! replica gets a clear 4xx and changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustci_core::event::ReplicaId;
use rustci_core::raft::{Body, Payload as _};
use rustci_core::replica::PeerMessage;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// The path peers post to.
pub const PEER_PATH: &str = "/v1/raft";
/// The version of [`PeerBatch`]; a replica refuses batches of another.
pub const PEER_PROTOCOL_VERSION: u32 = 1;
/// Content type of a batch.
pub const PEER_CONTENT_TYPE: &str = "application/vnd.rustci.raft+msgpack";
/// Largest batch body a replica accepts.
pub const PEER_BODY_BYTES_MAX: usize = 64 << 20;
/// Encoded bytes a sender puts in one batch, about (Raft's own appends are
/// at most 1 MiB each).
pub const PEER_BATCH_BYTES_TARGET: u64 = 8 << 20;
/// Messages waiting for one peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 16384;
/// How long connecting to a peer may take: an unreachable one costs only
/// this, then its messages are dropped until the next try.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a peer may take to answer a batch before the connection is
/// given up (a partition can leave it hanging).
pub const PEER_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Waits between tries to reach a peer that cannot be reached.
const PEER_BACKOFF_MIN: Duration = Duration::from_millis(20);
const PEER_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// The header a replica adds to a request it forwards to its leader; the
/// leader never forwards such a request again.
pub const FORWARDED_HEADER: &str = "x-rustci-forwarded-by";

/// One request's worth of messages from one replica to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerBatch {
    pub protocol: u32,
    pub cluster_id: String,
    pub from: ReplicaId,
    pub to: ReplicaId,
    pub messages: Vec<PeerMessage>,
}

/// What the receiving side checks a batch against.
#[derive(Clone, Debug)]
pub struct PeerContext {
    pub cluster_id: String,
    pub id: ReplicaId,
    /// The other replicas' API addresses, by id.
    pub peers: BTreeMap<ReplicaId, String>,
    /// Sent as `Authorization: Bearer` to peers (they share the API token).
    pub api_token: Option<String>,
}

/// Why a batch was refused: each is a 4xx, and nothing reached the driver.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("not a RustCI peer batch: {0}")]
    Garbage(String),
    #[error(
        "peer protocol version {0} is not supported (this replica speaks {PEER_PROTOCOL_VERSION})"
    )]
    Version(u32),
    #[error("the batch is for cluster {theirs}, but this replica belongs to cluster {ours}")]
    WrongCluster { ours: String, theirs: String },
    #[error("the batch is for replica {to}, but this is replica {ours}")]
    WrongReplica { ours: ReplicaId, to: ReplicaId },
    #[error("replica {0} is not a member of this cluster")]
    UnknownSender(ReplicaId),
    #[error("a message in the batch claims to be from {from} to {to}, not from {batch_from} to {batch_to}")]
    Mismatch {
        from: ReplicaId,
        to: ReplicaId,
        batch_from: ReplicaId,
        batch_to: ReplicaId,
    },
}

impl PeerRefusal {
    /// The `code` of the API error.
    pub fn code(&self) -> &'static str {
        match self {
            PeerRefusal::Garbage(_) => "bad_peer_message",
            PeerRefusal::Version(_) => "unsupported_peer_protocol",
            PeerRefusal::WrongCluster { .. } => "wrong_cluster",
            PeerRefusal::WrongReplica { .. } | PeerRefusal::UnknownSender(_) => "wrong_replica",
            PeerRefusal::Mismatch { .. } => "bad_peer_message",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            PeerRefusal::WrongCluster { .. }
            | PeerRefusal::WrongReplica { .. }
            | PeerRefusal::UnknownSender(_) => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Decodes and checks a batch body.
pub fn check_batch(ctx: &PeerContext, body: &[u8]) -> Result<PeerBatch, PeerRefusal> {
    // The version and cluster first, so a batch of another version is
    // refused for what it is even when its messages do not decode.
    #[derive(Deserialize)]
    struct Head {
        protocol: u32,
        cluster_id: String,
    }
    let head: Head =
        rmp_serde::from_slice(body).map_err(|e| PeerRefusal::Garbage(e.to_string()))?;
    if head.protocol != PEER_PROTOCOL_VERSION {
        return Err(PeerRefusal::Version(head.protocol));
    }
    if head.cluster_id != ctx.cluster_id {
        return Err(PeerRefusal::WrongCluster {
            ours: ctx.cluster_id.clone(),
            theirs: head.cluster_id,
        });
    }
    let batch: PeerBatch =
        rmp_serde::from_slice(body).map_err(|e| PeerRefusal::Garbage(e.to_string()))?;
    if batch.to != ctx.id {
        return Err(PeerRefusal::WrongReplica {
            ours: ctx.id,
            to: batch.to,
        });
    }
    if !ctx.peers.contains_key(&batch.from) {
        return Err(PeerRefusal::UnknownSender(batch.from));
    }
    if let Some(m) = batch
        .messages
        .iter()
        .find(|m| m.from != batch.from || m.to != batch.to)
    {
        return Err(PeerRefusal::Mismatch {
            from: m.from,
            to: m.to,
            batch_from: batch.from,
            batch_to: batch.to,
        });
    }
    Ok(batch)
}

/// Encodes a batch (for the sender, and for tests that play a peer).
pub fn encode_batch(batch: &PeerBatch) -> Vec<u8> {
    // Named fields: `check_batch` reads the head of any version by name.
    rmp_serde::to_vec_named(batch).expect("a peer batch always encodes")
}

/// Approximate encoded size of a message, for batching.
fn message_bytes(m: &PeerMessage) -> u64 {
    match &m.body {
        Body::Append { entries, .. } => {
            64 + entries
                .iter()
                .map(|e| 24 + e.data.size_bytes())
                .sum::<u64>()
        }
        _ => 64,
    }
}

/// The sending side: one queue and one task per peer.
pub struct PeerTransport {
    queues: BTreeMap<ReplicaId, mpsc::Sender<PeerMessage>>,
}

impl PeerTransport {
    /// Starts a sender task per peer of `ctx` on the current runtime.
    pub fn start(ctx: &PeerContext) -> PeerTransport {
        let mut queues = BTreeMap::new();
        for (&peer, addr) in &ctx.peers {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            let sender = PeerSender {
                from: ctx.id,
                to: peer,
                addr: addr.clone(),
                cluster_id: ctx.cluster_id.clone(),
                api_token: ctx.api_token.clone(),
                conn: None,
                reachable: true,
            };
            let span = tracing::info_span!("peer", peer, addr = %addr);
            tokio::spawn(sender.run(rx).instrument(span));
            queues.insert(peer, tx);
        }
        PeerTransport { queues }
    }

    /// Queues `msg` for its addressee; `false` if dropped (unknown peer,
    /// or its queue is full).
    pub fn send(&self, msg: PeerMessage) -> bool {
        match self.queues.get(&msg.to) {
            Some(q) => q.try_send(msg).is_ok(),
            None => false,
        }
    }
}

struct PeerSender {
    from: ReplicaId,
    to: ReplicaId,
    addr: String,
    cluster_id: String,
    api_token: Option<String>,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// Whether the last try reached the peer (to log changes only).
    reachable: bool,
}

impl PeerSender {
    async fn run(mut self, mut rx: mpsc::Receiver<PeerMessage>) {
        let mut backoff = PEER_BACKOFF_MIN;
        while let Some(first) = rx.recv().await {
            let mut bytes = message_bytes(&first);
            let mut messages = vec![first];
            while bytes < PEER_BATCH_BYTES_TARGET {
                match rx.try_recv() {
                    Ok(m) => {
                        bytes += message_bytes(&m);
                        messages.push(m);
                    }
                    Err(_) => break,
                }
            }
            let batch = PeerBatch {
                protocol: PEER_PROTOCOL_VERSION,
                cluster_id: self.cluster_id.clone(),
                from: self.from,
                to: self.to,
                messages,
            };
            match self.post(encode_batch(&batch)).await {
                Ok(()) => {
                    backoff = PEER_BACKOFF_MIN;
                    if !self.reachable {
                        tracing::info!("peer reachable again");
                        self.reachable = true;
                    }
                }
                Err(reason) => {
                    if self.reachable {
                        tracing::warn!(%reason, "cannot reach peer; its messages are dropped until it answers");
                        self.reachable = false;
                    } else {
                        tracing::debug!(%reason, "peer still unreachable");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(PEER_BACKOFF_MAX);
                    // What queued meanwhile is stale: Raft sends afresh.
                    while rx.try_recv().is_ok() {}
                }
            }
        }
    }

    async fn post(&mut self, body: Vec<u8>) -> Result<(), String> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(PEER_PATH)
            .header(HOST, &self.addr)
            .header(CONTENT_TYPE, PEER_CONTENT_TYPE);
        if let Some(t) = &self.api_token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let sent = tokio::time::timeout(PEER_REQUEST_TIMEOUT, async {
            conn.ready().await?;
            let resp = conn.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        let (status, body) = match sent {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(e.to_string());
            }
            Err(_) => {
                self.conn = None;
                return Err(format!("no answer within {PEER_REQUEST_TIMEOUT:?}"));
            }
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            ))
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::time::timeout(PEER_CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| format!("connect timed out after {PEER_CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustci_core::raft::Message;

    fn ctx() -> PeerContext {
        PeerContext {
            cluster_id: "c1".into(),
            id: 1,
            peers: [(2, "x:1".to_string()), (3, "x:2".to_string())].into(),
            api_token: None,
        }
    }

    fn batch(from: u64, to: u64) -> PeerBatch {
        PeerBatch {
            protocol: PEER_PROTOCOL_VERSION,
            cluster_id: "c1".into(),
            from,
            to,
            messages: vec![Message {
                from,
                to,
                term: 3,
                body: Body::Heartbeat {
                    commit: 7,
                    round: 3,
                },
            }],
        }
    }

    #[test]
    fn a_good_batch_round_trips() {
        let b = batch(2, 1);
        assert_eq!(check_batch(&ctx(), &encode_batch(&b)), Ok(b));
    }

    #[test]
    fn garbage_other_versions_clusters_and_strangers_are_refused() {
        let c = ctx();
        assert!(matches!(
            check_batch(&c, b"\x00garbage"),
            Err(PeerRefusal::Garbage(_))
        ));
        assert!(matches!(check_batch(&c, b""), Err(PeerRefusal::Garbage(_))));
        let mut b = batch(2, 1);
        b.protocol = 9;
        assert_eq!(
            check_batch(&c, &encode_batch(&b)),
            Err(PeerRefusal::Version(9))
        );
        let mut b = batch(2, 1);
        b.cluster_id = "other".into();
        assert!(matches!(
            check_batch(&c, &encode_batch(&b)),
            Err(PeerRefusal::WrongCluster { .. })
        ));
        assert!(matches!(
            check_batch(&c, &encode_batch(&batch(2, 3))),
            Err(PeerRefusal::WrongReplica { .. })
        ));
        assert_eq!(
            check_batch(&c, &encode_batch(&batch(4, 1))),
            Err(PeerRefusal::UnknownSender(4))
        );
        let mut b = batch(2, 1);
        b.messages[0].from = 3;
        assert!(matches!(
            check_batch(&c, &encode_batch(&b)),
            Err(PeerRefusal::Mismatch { .. })
        ));
        // A truncated good batch is garbage, not a panic.
        let good = encode_batch(&batch(2, 1));
        for cut in 0..good.len() {
            assert!(check_batch(&c, &good[..cut]).is_err(), "cut at {cut}");
        }
    }
}
