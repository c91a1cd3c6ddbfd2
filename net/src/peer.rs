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
use rustci_core::raft::{Body, Payload as _, SnapshotMeta};
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
/// A batch that carries a snapshot says how many bytes it holds in this
/// header: the receiver then takes a body that much larger than
/// [`PEER_BODY_BYTES_MAX`], for that much longer. A snapshot is the whole
/// state, so it may be far larger than any batch of entries.
pub const PEER_SNAPSHOT_BYTES_HEADER: &str = "x-rustci-snapshot-bytes";
/// Largest snapshot a batch may carry (as storage's own bound).
pub const PEER_SNAPSHOT_BYTES_MAX: u64 = 4 << 30;
/// Slowest link a snapshot must cross in time: both ends give a snapshot's
/// batch [`PEER_REQUEST_TIMEOUT`] (the receiver, its usual body time) plus
/// its size at this rate.
pub const PEER_SNAPSHOT_BYTES_PER_SEC_MIN: u64 = 4 << 20;

/// The time a batch with a snapshot of `bytes` bytes gets beyond a plain
/// batch's.
pub fn snapshot_transfer_time(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / PEER_SNAPSHOT_BYTES_PER_SEC_MIN as f64)
}
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
    /// The stored snapshot an InstallSnapshot message of this batch
    /// offers (then the batch's only message), as storage holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PeerSnapshot>,
}

/// A snapshot on the wire: its metadata and its bytes, as the sender's
/// storage holds them (checksummed; the receiver decodes and checks them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerSnapshot {
    pub meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
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
    /// One snapshot is received at a time (a replica has one leader): the
    /// larger body a snapshot may have is not open to many at once.
    pub snapshot_gate: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PeerContext {
    pub fn new(
        cluster_id: String,
        id: ReplicaId,
        peers: BTreeMap<ReplicaId, String>,
        api_token: Option<String>,
    ) -> PeerContext {
        PeerContext {
            cluster_id,
            id,
            peers,
            api_token,
            snapshot_gate: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
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
    // Any replica id of this cluster (checked above): a replica added by a
    // membership change is not among the peers this one started with.
    if batch.from == ctx.id || !rustci_core::raft::Voters::valid_id(batch.from) {
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
    if let Some(snapshot) = &batch.snapshot {
        let offered = matches!(
            batch.messages.as_slice(),
            [m] if matches!(m.body, Body::InstallSnapshot { meta, .. } if meta == snapshot.meta)
        );
        if !offered {
            return Err(PeerRefusal::Garbage(
                "a snapshot comes alone with the InstallSnapshot message that offers it".into(),
            ));
        }
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

/// A message for a peer's queue, with the snapshot bytes an
/// InstallSnapshot message carries.
struct Outgoing {
    msg: PeerMessage,
    snapshot: Option<PeerSnapshot>,
}

/// The sending side: one queue and one task per peer.
pub struct PeerTransport {
    ctx: PeerContext,
    queues: BTreeMap<ReplicaId, (String, mpsc::Sender<Outgoing>)>,
}

impl PeerTransport {
    /// Starts a sender task per peer of `ctx` on the current runtime.
    pub fn start(ctx: &PeerContext) -> PeerTransport {
        let mut transport = PeerTransport {
            ctx: ctx.clone(),
            queues: BTreeMap::new(),
        };
        for (&peer, addr) in &ctx.peers {
            transport.connect(peer, addr.clone());
        }
        transport
    }

    /// Sends to `peer` at `addr` from now on (a new replica, or one that
    /// moved), in place of any sender it had.
    pub fn connect(&mut self, peer: ReplicaId, addr: String) {
        if peer == self.ctx.id || self.queues.get(&peer).is_some_and(|(a, _)| *a == addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let sender = PeerSender {
            from: self.ctx.id,
            to: peer,
            addr: addr.clone(),
            cluster_id: self.ctx.cluster_id.clone(),
            api_token: self.ctx.api_token.clone(),
            conn: None,
            reachable: true,
        };
        let span = tracing::info_span!("peer", peer, addr = %addr);
        tokio::spawn(sender.run(rx).instrument(span));
        // The old sender's task ends with its queue.
        self.queues.insert(peer, (addr, tx));
    }

    /// Stops sending to every peer but `keep` (a replica removed from the
    /// control plane).
    pub fn retain(&mut self, keep: impl Fn(ReplicaId) -> bool) {
        self.queues.retain(|&peer, _| keep(peer));
    }

    /// Queues `msg` for its addressee; `false` if dropped (unknown peer,
    /// or its queue is full).
    pub fn send(&self, msg: PeerMessage) -> bool {
        self.enqueue(Outgoing {
            msg,
            snapshot: None,
        })
    }

    /// Queues an InstallSnapshot message with the stored snapshot it
    /// offers; it travels in a batch of its own.
    pub fn send_snapshot(&self, msg: PeerMessage, bytes: Vec<u8>) -> bool {
        let Body::InstallSnapshot { meta, .. } = msg.body else {
            return false;
        };
        self.enqueue(Outgoing {
            msg,
            snapshot: Some(PeerSnapshot { meta, bytes }),
        })
    }

    fn enqueue(&self, out: Outgoing) -> bool {
        match self.queues.get(&out.msg.to) {
            Some((_, q)) => q.try_send(out).is_ok(),
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
    async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut backoff = PEER_BACKOFF_MIN;
        let mut held: Option<Outgoing> = None;
        loop {
            let first = match held.take() {
                Some(out) => out,
                None => match rx.recv().await {
                    Some(out) => out,
                    None => break,
                },
            };
            let snapshot = first.snapshot;
            let mut bytes = message_bytes(&first.msg);
            let mut messages = vec![first.msg];
            while snapshot.is_none() && bytes < PEER_BATCH_BYTES_TARGET {
                match rx.try_recv() {
                    // A snapshot goes in a batch of its own.
                    Ok(out) if out.snapshot.is_some() => {
                        held = Some(out);
                        break;
                    }
                    Ok(out) => {
                        bytes += message_bytes(&out.msg);
                        messages.push(out.msg);
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
                snapshot,
            };
            let snapshot_bytes = batch.snapshot.as_ref().map(|s| s.bytes.len() as u64);
            match self.post(encode_batch(&batch), snapshot_bytes).await {
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
                    held = None;
                    while rx.try_recv().is_ok() {}
                }
            }
        }
    }

    async fn post(&mut self, body: Vec<u8>, snapshot_bytes: Option<u64>) -> Result<(), String> {
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
        if let Some(n) = snapshot_bytes {
            req = req.header(PEER_SNAPSHOT_BYTES_HEADER, n);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let timeout =
            PEER_REQUEST_TIMEOUT + snapshot_bytes.map_or(Duration::ZERO, snapshot_transfer_time);
        let sent = tokio::time::timeout(timeout, async {
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
                return Err(format!("no answer within {timeout:?}"));
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
        PeerContext::new(
            "c1".into(),
            1,
            [(2, "x:1".to_string()), (3, "x:2".to_string())].into(),
            None,
        )
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
            snapshot: None,
        }
    }

    #[test]
    fn a_good_batch_round_trips() {
        let b = batch(2, 1);
        assert_eq!(check_batch(&ctx(), &encode_batch(&b)), Ok(b));
    }

    #[test]
    fn a_snapshot_travels_only_with_the_message_that_offers_it() {
        let meta = SnapshotMeta { index: 40, term: 3 };
        let mut b = batch(2, 1);
        b.messages[0].body = Body::InstallSnapshot {
            meta,
            voters: rustci_core::raft::Voters::from_iter([1, 2, 3]),
        };
        b.snapshot = Some(PeerSnapshot {
            meta,
            bytes: vec![0, 1, 2, 255, 254],
        });
        let encoded = encode_batch(&b);
        assert_eq!(check_batch(&ctx(), &encoded), Ok(b.clone()));
        // Bytes, not an array of integers: about one byte on the wire each.
        let big = PeerSnapshot {
            meta,
            bytes: vec![200; 10_000],
        };
        let mut with_big = b.clone();
        with_big.snapshot = Some(big);
        assert!(encode_batch(&with_big).len() < 10_200);
        // With other metadata, another message or more messages: refused.
        let mut other = b.clone();
        other.snapshot.as_mut().unwrap().meta.index = 41;
        assert!(matches!(
            check_batch(&ctx(), &encode_batch(&other)),
            Err(PeerRefusal::Garbage(_))
        ));
        let mut heartbeat = batch(2, 1);
        heartbeat.snapshot = b.snapshot.clone();
        assert!(matches!(
            check_batch(&ctx(), &encode_batch(&heartbeat)),
            Err(PeerRefusal::Garbage(_))
        ));
        let mut two = b.clone();
        two.messages.push(batch(2, 1).messages[0].clone());
        assert!(matches!(
            check_batch(&ctx(), &encode_batch(&two)),
            Err(PeerRefusal::Garbage(_))
        ));
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
        // A replica added later is not among the peers this one started
        // with, yet it is one of the cluster's; ids Raft cannot count and
        // this replica's own are refused.
        assert!(check_batch(&c, &encode_batch(&batch(4, 1))).is_ok());
        assert_eq!(
            check_batch(&c, &encode_batch(&batch(64, 1))),
            Err(PeerRefusal::UnknownSender(64))
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
