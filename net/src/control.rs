//! The handle through which the API talks to the replica's driver loop.
//!
//! The replica is owned by one task (the driver in `bin`); everything else
//! sends it [`Input`]s over a bounded channel. Reads are closures run on the
//! driver's task against the live replica, so they see a consistent state
//! without locks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustci_core::event::{Entry, LogIndex, ReplicaId};
use rustci_core::model::{AttemptNumber, JobId, Outcome, Usage};
use rustci_core::protocol::AgentMsg;
use rustci_core::replica::{Command, CommandError, PeerMessage, Replica, Reply};
use tokio::sync::{mpsc, oneshot, watch};

/// A linearizable read's work, run by the driver (see [`Input::Read`]).
pub type ReadFn = Box<dyn FnOnce(Result<&Replica, CommandError>) + Send>;

/// Inputs of the driver loop. Only the driver interprets them.
pub enum Input {
    Command {
        command: Command,
        reply: oneshot::Sender<Result<Reply, CommandError>>,
    },
    Query(Box<dyn FnOnce(&Replica) + Send>),
    /// A linearizable read: run once the replica has confirmed that it
    /// leads and has applied every write committed before it was asked
    /// (`Replica::read`), or with the reason it cannot.
    Read(ReadFn),
    /// A message from a node's agent.
    Agent(AgentMsg),
    /// What the runner built into this process observed (`rustci dev`).
    Run {
        job: JobId,
        attempt: AttemptNumber,
        observed: RunObservation,
    },
    /// The log writer made every persist unit up to this id durable.
    Persisted(u64),
    PersistFailed(String),
    /// The log's disk is full (`true`): the writer holds its batches until
    /// there is room again (`false`).
    StorageFull(bool),
    Tick,
    /// Messages from another replica (see `crate::peer`), with the
    /// snapshot an InstallSnapshot among them offers, still encoded.
    Peer {
        messages: Vec<PeerMessage>,
        snapshot: Option<crate::peer::PeerSnapshot>,
    },
    /// An InstallSnapshot message with its snapshot, decoded off the
    /// driver task.
    PeerSnapshot {
        msg: PeerMessage,
        snapshot: rustci_core::replica::Snapshot,
    },
    /// The stored snapshot read for an InstallSnapshot message to `msg.to`
    /// (`None`: storage holds another one by now; the message is dropped).
    SnapshotRead {
        msg: PeerMessage,
        bytes: Option<Vec<u8>>,
    },
    /// The log writer stored a snapshot and compacted the log behind it
    /// (`Ok`), or could not (`Err`, with the reason).
    Compacted {
        meta: rustci_core::raft::SnapshotMeta,
        result: Result<(), String>,
    },
    /// Entries read from storage for a lagging replica, answering the
    /// replica's `Output::LoadEntries`.
    EntriesLoaded {
        peer: ReplicaId,
        entries: Vec<Entry>,
    },
}

/// Who leads, as this replica sees it: published by the driver after each
/// step, read by the API (to forward requests) and the agent endpoint (to
/// refuse agents while not leading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// This replica leads and has applied its own `LeaderElected` entry.
    pub leading: bool,
    /// The leader this replica knows of, itself included.
    pub leader: Option<ReplicaId>,
}

/// What a local runner saw of an attempt's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunObservation {
    Started,
    Ended {
        outcome: Outcome,
        exit_code: Option<i32>,
        usage: Option<Usage>,
    },
    /// The runner could not start it for lack of the node's own resources.
    NotStarted,
}

/// Reads committed entries for the event stream, from wherever the driver
/// keeps them.
pub trait LogReader: Send + Sync + 'static {
    /// Up to `max` committed entries with index > `after`, in order.
    fn read_after(&self, after: LogIndex, max: usize) -> Result<Vec<Entry>, String>;

    /// Writes a consistent copy of the data dir into `to` (a new directory
    /// on this machine), as of one read transaction of the log, while the
    /// daemon keeps writing (`POST /v1/backup`, used by `rustci backup`).
    /// `cluster_id` must be the data dir's own, so a backup never copies
    /// another daemon's data by mistake. `output`: job output too (a copy
    /// taken only to be replayed needs the log alone). Blocking: call it
    /// off the runtime.
    fn backup(
        &self,
        to: &std::path::Path,
        cluster_id: &str,
        output: bool,
    ) -> Result<BackupDone, BackupError> {
        let _ = (to, cluster_id, output);
        Err(BackupError::Failed("this server takes no backups".into()))
    }
}

/// What a backup copied.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackupDone {
    pub entries: u64,
    pub last_index: LogIndex,
    pub frame_bytes: u64,
    pub output_files: u64,
}

/// Why a backup was not taken.
#[derive(Clone, Debug)]
pub enum BackupError {
    /// Bad request (`to` exists and is not empty, is not absolute...): 400.
    Invalid(String),
    /// The data dir belongs to another cluster than the caller named: 409.
    WrongCluster(String),
    /// The copy failed (disk, corruption): 503, nothing left at `to`.
    Failed(String),
}

/// The API addresses of the replicas, by id: those given at start, then
/// what membership changes say. Shared by the driver (which updates it),
/// the API and the agent endpoint (which name the leader's address).
#[derive(Clone, Debug, Default)]
pub struct AddressBook(
    std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<ReplicaId, String>>>,
);

impl AddressBook {
    pub fn new(addrs: std::collections::BTreeMap<ReplicaId, String>) -> AddressBook {
        AddressBook(std::sync::Arc::new(std::sync::RwLock::new(addrs)))
    }

    pub fn get(&self, id: ReplicaId) -> Option<String> {
        self.read().get(&id).cloned()
    }

    pub fn set(&self, id: ReplicaId, addr: String) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, addr);
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<ReplicaId, String>> {
        // Plain data: a writer that panicked left a whole map behind.
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Driver-side facts the API shows but the replica does not know.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub id: ReplicaId,
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    /// The replicas' API addresses, by id (empty for one replica).
    pub peers: AddressBook,
}

impl ServerInfo {
    /// The API address of replica `id`, this one included.
    pub fn addr_of(&self, id: ReplicaId) -> Option<String> {
        if id == self.id {
            Some(self.advertise_addr.clone())
        } else {
            self.peers.get(id)
        }
    }
}

/// Counters of the log writer, shown by `/metrics`.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Write transactions committed, each with one fsync.
    pub appends: std::sync::atomic::AtomicU64,
    /// Entries made durable.
    pub entries: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct ControlPlane {
    inputs: mpsc::Sender<Input>,
    /// The replica's applied index, published by the driver after each step.
    pub applied: watch::Receiver<LogIndex>,
    pub log: Arc<dyn LogReader>,
    pub info: Arc<ServerInfo>,
    pub started: Instant,
    pub log_stats: Arc<LogStats>,
    /// Latencies and the driver's counters; the driver records into the
    /// same `Arc` (see `crate::metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Who leads, published by the driver.
    pub leader: watch::Receiver<LeaderView>,
}

/// The driver is gone (shut down or crashed).
#[derive(Debug, thiserror::Error)]
#[error("the control plane is not running")]
pub struct Unavailable;

impl ControlPlane {
    pub fn new(
        inputs: mpsc::Sender<Input>,
        applied: watch::Receiver<LogIndex>,
        log: Arc<dyn LogReader>,
        info: ServerInfo,
        started: Instant,
        log_stats: Arc<LogStats>,
        leader: watch::Receiver<LeaderView>,
    ) -> ControlPlane {
        ControlPlane {
            inputs,
            applied,
            log,
            info: Arc::new(info),
            started,
            log_stats,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            leader,
        }
    }

    /// A linearizable read of the replica (see [`Input::Read`]): `f` sees
    /// every write acknowledged before this call. `Err` when this replica
    /// cannot serve it (it does not lead, or stopped leading meanwhile).
    pub async fn read<R, F>(&self, f: F) -> Result<Result<R, CommandError>, Unavailable>
    where
        R: Send + 'static,
        F: FnOnce(&Replica) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = move |r: Result<&Replica, CommandError>| {
            let _ = tx.send(r.map(f));
        };
        self.inputs
            .send(Input::Read(Box::new(run)))
            .await
            .map_err(|_| Unavailable)?;
        rx.await.map_err(|_| Unavailable)
    }

    /// Hands messages from another replica to the driver.
    pub async fn peer(
        &self,
        messages: Vec<PeerMessage>,
        snapshot: Option<crate::peer::PeerSnapshot>,
    ) -> Result<(), Unavailable> {
        self.inputs
            .send(Input::Peer { messages, snapshot })
            .await
            .map_err(|_| Unavailable)
    }

    pub async fn command(
        &self,
        command: Command,
    ) -> Result<Result<Reply, CommandError>, Unavailable> {
        let (reply, rx) = oneshot::channel();
        self.inputs
            .send(Input::Command { command, reply })
            .await
            .map_err(|_| Unavailable)?;
        rx.await.map_err(|_| Unavailable)
    }

    pub async fn query<R, F>(&self, f: F) -> Result<R, Unavailable>
    where
        R: Send + 'static,
        F: FnOnce(&Replica) -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = move |r: &Replica| {
            let _ = tx.send(f(r));
        };
        self.inputs
            .send(Input::Query(Box::new(run)))
            .await
            .map_err(|_| Unavailable)?;
        rx.await.map_err(|_| Unavailable)
    }

    pub fn output_path(&self, job: JobId, attempt: AttemptNumber) -> PathBuf {
        output_path(&self.info.data_dir, job, attempt)
    }
}

/// Where an attempt's output lives: beside the log, one file per attempt.
pub fn output_path(data_dir: &Path, job: JobId, attempt: AttemptNumber) -> PathBuf {
    data_dir
        .join("output")
        .join(job.0.to_string())
        .join(format!("{attempt}.log"))
}
