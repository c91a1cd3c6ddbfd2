//! The production driver of the replica: tokio + hyper + redb + real processes.
//!
//! Threads and tasks, and what each owns:
//! - the **driver task** owns the [`Replica`]. It takes [`Input`]s from one
//!   bounded channel (API commands and reads, runner reports, "persisted"
//!   notices, ticks), drains as many as are ready, then carries out the
//!   replica's outputs in order;
//! - the **log writer thread** owns appends to the redb log: it drains every
//!   batch waiting for it into one write transaction and one fsync (group
//!   commit), then tells the driver how far the log is durable;
//! - the **HTTP server** (net) and the **native runner** talk to the driver
//!   only through the channel.
//!
//! Nothing here decides anything about jobs: the replica does.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustci_core::agent::{Agent, AgentConfig, AgentOutput};
use rustci_core::event::{Entry, LogIndex, ReplicaId};
use rustci_core::model::{AttemptNumber, JobId, JobSpec, Labels, Resources};
use rustci_core::protocol::LeaseConfig;
use rustci_core::raft::HardState;
use rustci_core::replica::{
    CommandError, Config, Output, PersistUnit, Recovery, Replica, Reply, Snapshot, TICK_MS,
};
use rustci_core::state::State;
use rustci_net::agent_link::{AgentLinks, LinkContext};
use rustci_net::control::{
    output_path, BackupDone, BackupError, ControlPlane, Input, LeaderView, LogReader, LogStats,
    ReadFn, RunObservation, ServerInfo,
};
use rustci_net::peer::{PeerContext, PeerTransport};
use rustci_net::server::{serve, ServerConfig};
use rustci_storage::{LogReadHandle, LogStore};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;

use crate::runner::{self, NativeRunner, RunEvent, RunSpec, RunnerConfig};

/// Inputs waiting for the driver before API callers feel back-pressure.
pub const INPUTS_QUEUE_MAX: usize = 1 << 16;
/// Inputs handled per driver step before outputs are carried out: bounds the
/// latency one step adds to the requests already waiting.
pub const INPUTS_PER_STEP_MAX: usize = 4096;

#[derive(Clone, Debug)]
pub struct DevConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub api_token: Option<String>,
    /// Token agents must present to join; `None`: any agent may.
    pub join_token: Option<String>,
    /// Run the built-in runner (`rustci dev`); `rustci server` does not.
    pub local_runner: bool,
    /// Name of the built-in runner's node.
    pub node_name: String,
    /// Capacity the built-in runner advertises; default: the machine's.
    pub capacity: Option<Resources>,
    pub labels: Labels,
    /// How long an idempotency key names its job.
    pub idempotency_window: Duration,
    /// Free space kept for the log: job output stops below it.
    pub disk_reserve_bytes: u64,
    /// Total job output kept; the oldest is evicted past it.
    pub output_quota_bytes: u64,
    /// How long a failed attempt's work dir is kept.
    pub keep_failed_workspaces: Duration,
    /// HTTP connections held at once (`--connections-max`).
    pub connections_max: usize,
    /// Silence after which the leader declares a node down
    /// (`--node-down-after-ms`).
    pub node_down_after_ms: u64,
    /// Entries applied between two snapshots (0: never compact).
    pub snapshot_entries: u64,
    /// This replica's id (`rustci server --id`; 1 for `rustci dev`).
    pub id: ReplicaId,
    /// The other replicas' API addresses (`--peer ID=ADDR`); empty for a
    /// single replica.
    pub peers: BTreeMap<ReplicaId, String>,
    /// The address other replicas and agents reach this one at; default:
    /// the listen address.
    pub advertise: Option<String>,
    /// Shared by every replica of a cluster; part of the cluster id, so
    /// that replicas of two clusters never take each other's messages.
    pub cluster_token: String,
    /// Raft's base election timeout (each wait is drawn from `[t, 2t)`).
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
}

impl DevConfig {
    /// A `rustci server` (no built-in runner) on `data_dir` and `listen`,
    /// every other setting at its default.
    pub fn server(data_dir: PathBuf, listen: SocketAddr) -> DevConfig {
        DevConfig {
            data_dir,
            listen,
            api_token: None,
            join_token: None,
            local_runner: false,
            node_name: String::new(),
            capacity: None,
            labels: Labels::new(),
            idempotency_window: Duration::from_millis(
                rustci_core::replica::IDEMPOTENCY_WINDOW_MS_DEFAULT,
            ),
            disk_reserve_bytes: rustci_net::disk::DISK_RESERVE_BYTES_DEFAULT,
            output_quota_bytes: rustci_net::disk::OUTPUT_QUOTA_BYTES_DEFAULT,
            keep_failed_workspaces: runner::KEEP_FAILED_WORKSPACES_DEFAULT,
            connections_max: rustci_net::server::CONNECTIONS_MAX,
            node_down_after_ms: rustci_core::protocol::DOWN_AFTER_MS,
            snapshot_entries: rustci_core::replica::SNAPSHOT_ENTRIES_DEFAULT,
            id: 1,
            peers: BTreeMap::new(),
            advertise: None,
            cluster_token: CLUSTER_TOKEN_DEFAULT.to_string(),
            election_timeout_ms: rustci_core::raft::ELECTION_TIMEOUT_MS_DEFAULT,
            heartbeat_interval_ms: rustci_core::raft::HEARTBEAT_INTERVAL_MS_DEFAULT,
        }
    }

    /// The cluster id every replica of a cluster derives alike: a digest
    /// of the cluster token. Not of the replica ids: a replica added by a
    /// membership change, and one restarted with the `--peer`s of the
    /// replicas now in effect, derive the same. `None` for a single
    /// replica, whose data dir gets a random one.
    pub fn cluster_id(&self) -> Option<String> {
        if self.peers.is_empty() {
            return None;
        }
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"rustci cluster\0");
        h.update(self.cluster_token.as_bytes());
        let digest = h.finalize();
        Some(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Default of `--cluster-token`.
pub const CLUSTER_TOKEN_DEFAULT: &str = "rustci";

/// Milliseconds since the Unix epoch on this machine's clock: the `now` this
/// driver feeds the replica.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs `f`, which reads the log at `data_dir`, turning a panic inside redb
/// into an error that names the file. redb documents that a file altered
/// from outside may panic when read; a corrupt file must still get a clear
/// one-line error, not a backtrace. Only for start-up and offline reads:
/// the panic hook is swapped while `f` runs.
pub fn guard_corruption<T>(
    data_dir: &Path,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        Err(anyhow::anyhow!(rustci_storage::corrupt_file_message(
            &data_dir.join(rustci_storage::LOG_FILE_NAME),
            &panic_message(&*panic)
        )))
    })
}

/// Entries handed from the log reader to the reducer at a time during replay.
const REPLAY_BATCH_ENTRIES: usize = 4096;
/// Full batches queued between the reader and the reducer.
const REPLAY_BATCHES_IN_FLIGHT: usize = 8;

/// Reads the whole log and folds it into a state (`rustci replay`,
/// backups, benchmarks).
pub fn replay_store(store: &LogStore) -> anyhow::Result<State> {
    replay_store_until(store, LogIndex::MAX, |_| {}, |_| {}).map(|(state, _)| state)
}

/// What start-up reads from the log: the state up to the stored commit
/// index (from the stored snapshot, if any, plus the entries after it), and
/// the entries after the commit index for Raft to commit again.
///
/// A snapshot is committed state, so the commit index recovered is at
/// least the snapshot's (it may be stored before the hard state that
/// commits it).
pub fn recover_store(store: &LogStore) -> anyhow::Result<Recovery> {
    let stored = store.hard_state();
    let stored = HardState {
        term: stored.term,
        vote: stored.voted_for,
        commit: stored.commit,
    };
    let last = (store.last_index() > 0).then(|| (store.last_index(), store.last_term()));
    let base = store.snapshot_meta().unwrap_or_default();
    let mut hard_state = Recovery::legacy(stored, last);
    hard_state.commit = hard_state.commit.max(base.index);
    let mut terms = Vec::new();
    // Raft's configuration history: the snapshot's replicas, then every
    // committed change after it.
    let mut base_members = None;
    let mut members = Vec::new();
    let commit = hard_state.commit;
    let (state, tail) = replay_store_until(
        store,
        commit,
        |base| {
            if !base.members.is_empty() {
                base_members = Some((base.applied_index, base.members.clone()));
            }
        },
        |e| {
            terms.push((e.index, e.term));
            if let rustci_core::event::Event::MembersChanged { members: m } = &e.event {
                if e.index <= commit && rustci_core::event::members_valid(m) {
                    members.push((e.index, m.clone()));
                }
            }
        },
    )?;
    // Only the first index of each term is kept: a handful per restart.
    let (runs, last_index) = rustci_core::raft::term_runs(base, terms);
    Ok(Recovery {
        state,
        hard_state,
        snapshot: base,
        runs,
        last_index,
        tail,
        members: base_members.into_iter().chain(members).collect(),
    })
}

/// Folds the log up to `until` into a state and returns the entries after
/// it; `seen` sees every entry's index and term, in order. The fold starts
/// from the stored snapshot, if any, and reads only the entries after it.
///
/// A pipeline of two threads: one scans and decodes the log (checksums,
/// MessagePack), the other applies entries in order. The reducer stays
/// single-threaded and sees the entries in log order, so the result is the
/// same as a plain fold; it only overlaps decoding with applying.
fn replay_store_until(
    store: &LogStore,
    until: LogIndex,
    base_seen: impl FnOnce(&State),
    mut seen: impl FnMut(&Entry),
) -> anyhow::Result<(State, Vec<Entry>)> {
    let base = replay_base(store)?;
    base_seen(&base);
    let mut state = base;
    let mut tail = Vec::new();
    let ((), scanned) = scan_pipelined(
        |f| store.scan(store.first_index(), f),
        |_| false,
        |entries| {
            for entry in entries {
                seen(&entry);
                if entry.index <= until {
                    state.apply_owned(entry);
                } else {
                    tail.push(entry);
                }
            }
        },
    );
    scanned.map_err(|e| anyhow::anyhow!("{e}"))?;
    state.rebuild_indexes();
    Ok((state, tail))
}

/// A pipeline of two threads over a scan of the log: `scan` runs on a
/// thread of its own (checksums, MessagePack), handing the entries over in
/// batches, while `consume` takes them here, in order. The scan stops
/// after the entry `last` says is the last. Returns what `consume` gave and
/// how the scan ended.
fn scan_pipelined<R>(
    scan: impl FnOnce(&mut dyn FnMut(Entry) -> ControlFlow<()>) -> Result<(), rustci_storage::ReadError>
        + Send,
    last: impl Fn(&Entry) -> bool + Send,
    consume: impl FnOnce(&mut dyn Iterator<Item = Entry>) -> R,
) -> (R, Result<(), rustci_storage::ReadError>) {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<Entry>>(REPLAY_BATCHES_IN_FLIGHT);
    // Drained batches go back to the scan: reusing their buffers avoids an
    // mmap, page faults and a munmap per batch.
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<Entry>>();
    std::thread::scope(|scope| {
        let scanning = scope.spawn(move || {
            let fresh = || Vec::with_capacity(REPLAY_BATCH_ENTRIES);
            let mut batch = fresh();
            let result = scan(&mut |entry| {
                let stop = last(&entry);
                batch.push(entry);
                if stop || batch.len() == REPLAY_BATCH_ENTRIES {
                    let next = empty_rx.try_recv().unwrap_or_else(|_| fresh());
                    if full_tx.send(std::mem::replace(&mut batch, next)).is_err() || stop {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            });
            if !batch.is_empty() {
                let _ = full_tx.send(batch);
            }
            result
        });
        let mut entries = Batches {
            full: full_rx,
            empty: empty_tx,
            current: Vec::new(),
        };
        let out = consume(&mut entries);
        // Whatever `consume` left unread must not hold the scan up.
        drop(entries);
        match scanning.join() {
            Ok(scanned) => (out, scanned),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The entries of [`scan_pipelined`]'s batches, in order; each batch goes
/// back empty once read.
struct Batches {
    full: std::sync::mpsc::Receiver<Vec<Entry>>,
    empty: std::sync::mpsc::Sender<Vec<Entry>>,
    /// The batch being read, reversed (read by `pop`).
    current: Vec<Entry>,
}

impl Iterator for Batches {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        loop {
            if let Some(entry) = self.current.pop() {
                return Some(entry);
            }
            let mut next = self.full.recv().ok()?;
            next.reverse();
            let _ = self.empty.send(std::mem::replace(&mut self.current, next));
        }
    }
}

/// The state a replay of `store` starts from: its snapshot, decoded and
/// checked against the entry it claims to cover, or an empty state.
fn replay_base(store: &LogStore) -> anyhow::Result<State> {
    let Some((meta, bytes)) = store.snapshot()? else {
        return Ok(State::for_replay());
    };
    let state = decode_stored_snapshot(meta, &bytes, store.path())?;
    tracing::info!(
        index = meta.index,
        term = meta.term,
        bytes = bytes.len(),
        jobs = state.jobs.len(),
        "replay starts from the stored snapshot"
    );
    Ok(state)
}

/// Decodes the snapshot stored in the log at `path`, checked against the
/// entry it claims to cover.
fn decode_stored_snapshot(
    meta: rustci_core::raft::SnapshotMeta,
    bytes: &[u8],
    path: &Path,
) -> anyhow::Result<State> {
    let what = || format!("the snapshot at index {} in {}", meta.index, path.display());
    let state = rustci_storage::decode_snapshot(bytes).with_context(what)?;
    if (state.applied_index, state.applied_term) != (meta.index, meta.term) {
        bail!(
            "{}: it holds the state at index {} (term {}), not at index {} (term {})",
            what(),
            state.applied_index,
            state.applied_term,
            meta.index,
            meta.term
        );
    }
    Ok(state)
}

/// The API's view of the log: redb read transactions on their own handle,
/// sharing no lock with the log writer (a writer that panics cannot poison it).
struct SharedLog {
    reader: LogReadHandle,
    data_dir: PathBuf,
}

impl LogReader for SharedLog {
    fn read_after(&self, after: LogIndex, max: usize) -> Result<Vec<Entry>, String> {
        self.reader
            .read_range(after + 1, max)
            .map_err(|e| e.to_string())
    }

    fn backup(&self, to: &Path, cluster_id: &str, output: bool) -> Result<BackupDone, BackupError> {
        let ours = rustci_storage::Identity::read(&self.data_dir)
            .ok()
            .flatten()
            .map(|i| i.cluster_id);
        if ours.as_deref() != Some(cluster_id) {
            return Err(BackupError::WrongCluster(format!(
                "this daemon serves data dir {} of cluster {}, not cluster {cluster_id}",
                self.data_dir.display(),
                ours.as_deref().unwrap_or("unknown")
            )));
        }
        crate::backup::make_copy(&self.data_dir, to, output, |staging| {
            self.reader.backup_to(staging)
        })
    }
}

/// A running dev daemon: its address, and a way to stop it and wait.
pub struct DevHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl DevHandle {
    /// Graceful stop: in-flight requests finish, jobs are killed, the log is
    /// flushed and the data dir lock is released before this returns.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.await.context("daemon task panicked")?
    }

    /// Waits until the daemon stops by itself (a fatal error) or `signal`.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => {
                tracing::info!("shutting down");
                self.stop().await
            }
            r = &mut self.done => r.context("daemon task panicked")?,
        }
    }
}

/// Opens the data dir, replays the log, and starts the replica, the API and
/// the built-in runner. Returns once the API is listening.
///
/// Everything the daemon logs is inside a `replica` span with its id and
/// term (see `crate::logging`).
pub async fn start_dev(config: DevConfig) -> anyhow::Result<DevHandle> {
    let span = tracing::info_span!("replica", id = config.id, term = tracing::field::Empty);
    start_replica(config).instrument(span).await
}

async fn start_replica(config: DevConfig) -> anyhow::Result<DevHandle> {
    if config.api_token.is_none() && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to serve {} without --api-token: without a token the API serves loopback only",
            config.listen
        );
    }
    if config.join_token.is_none() && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to take agents on {} without --join-token: anyone who can reach it could join and receive jobs",
            config.listen
        );
    }
    let started = Instant::now();
    crate::memory::tune_allocator();
    tokio::spawn(crate::memory::trim_after_bursts().in_current_span());
    let cluster_id = config.cluster_id();
    let (store, recovery) = guard_corruption(&config.data_dir, || {
        let store = match &cluster_id {
            None => LogStore::open(&config.data_dir),
            Some(cluster_id) => LogStore::open_with(&config.data_dir, || {
                let mut identity = rustci_storage::Identity::generate(config.id)?;
                identity.cluster_id = cluster_id.clone();
                Ok(identity)
            }),
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(cluster_id) = &cluster_id {
            check_identity(&config, cluster_id)?;
        }
        let recovery = recover_store(&store)?;
        Ok((store, recovery))
    })?;
    let last_index = store.last_index();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        entries = last_index,
        committed = recovery.hard_state.commit,
        jobs = recovery.state.jobs.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replayed the log"
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Where `rustci backup --data-dir` finds this daemon.
    let address_file = config.data_dir.join(crate::backup::API_ADDRESS_FILE_NAME);
    if let Err(e) =
        rustci_storage::datadir::write_atomically(&address_file, format!("{addr}\n").as_bytes())
    {
        tracing::warn!(error = %e, path = %address_file.display(), "cannot record the API address: `rustci backup` will need --server");
    }

    let pid_dir = config.data_dir.join("runner");
    let reaped = NativeRunner::reap_leftovers(&pid_dir);
    if reaped > 0 {
        tracing::warn!(reaped, "killed job processes left by a previous run");
    }
    let reader = store.reader();
    let (inputs_tx, inputs_rx) = mpsc::channel(INPUTS_QUEUE_MAX);
    let (applied_tx, applied_rx) = watch::channel(recovery.state.applied_index);
    let log_stats = Arc::new(LogStats::default());
    let writer = spawn_log_writer(store, inputs_tx.clone(), log_stats.clone());
    let (run_tx, run_rx) = mpsc::unbounded_channel();
    let mut runner_config = RunnerConfig::new(pid_dir);
    // Every attempt runs under `rustci __shim`, which dies with this process
    // and takes the job's whole process group with it. /proc/self/exe keeps
    // pointing at this process's image even if the binary is replaced.
    runner_config.shim = Some(PathBuf::from("/proc/self/exe"));
    if config.local_runner {
        runner_config.cgroups = runner::detect_cgroups();
    }
    let reserve = rustci_net::disk::effective_reserve(&config.data_dir, config.disk_reserve_bytes);
    runner_config.disk_reserve_bytes = reserve;
    runner_config.keep_failed_workspaces = config.keep_failed_workspaces;
    let runner = NativeRunner::new(runner_config, run_tx);
    if config.local_runner {
        tokio::spawn(
            runner
                .workspace_sweeper()
                .run(config.data_dir.join("work"))
                .in_current_span(),
        );
    }
    tokio::spawn(
        rustci_net::disk::run_output_janitor(
            config.data_dir.join("output"),
            config.output_quota_bytes,
        )
        .in_current_span(),
    );
    tokio::spawn(forward_run_events(run_rx, inputs_tx.clone()).in_current_span());

    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let mut replica_addrs = config.peers.clone();
    replica_addrs.insert(config.id, advertise.clone());
    let address_book = rustci_net::control::AddressBook::new(replica_addrs.clone());
    let info = ServerInfo {
        id: config.id,
        advertise_addr: advertise.clone(),
        data_dir: config.data_dir.clone(),
        peers: address_book.clone(),
    };
    let (leader_tx, leader_rx) = watch::channel(LeaderView::default());
    let links = AgentLinks::new();
    let agents = Arc::new(LinkContext {
        links: links.clone(),
        join_token: config.join_token.clone(),
        server_id: config.id,
        data_dir: config.data_dir.clone(),
        reserved_node: config.local_runner.then(|| config.node_name.clone()),
        to_driver: inputs_tx.clone(),
        disk_reserve_bytes: reserve,
        leader: leader_rx.clone(),
        replica_addrs: address_book.clone(),
    });
    let peer_context = cluster_id.as_ref().map(|cluster_id| {
        Arc::new(PeerContext::new(
            cluster_id.clone(),
            config.id,
            config.peers.clone(),
            config.api_token.clone(),
        ))
    });
    let transport = peer_context.as_deref().map(PeerTransport::start);
    let shared_log = Arc::new(SharedLog {
        reader,
        data_dir: config.data_dir.clone(),
    });
    let cp = ControlPlane::new(
        inputs_tx.clone(),
        applied_rx,
        shared_log.clone(),
        info,
        started,
        log_stats,
        leader_rx,
    );
    let measured = crate::driver_metrics::DriverMetrics::new(cp.metrics.clone());
    let mut replica_config = Config::new(config.id);
    replica_config.voters.extend(config.peers.keys().copied());
    replica_config.addrs = replica_addrs;
    replica_config.election_timeout_ms = config.election_timeout_ms;
    replica_config.heartbeat_interval_ms = config.heartbeat_interval_ms;
    // Production draws election timeouts from the OS; the simulator seeds.
    replica_config.seed = random_seed();
    replica_config.idempotency_window_ms =
        u64::try_from(config.idempotency_window.as_millis()).unwrap_or(u64::MAX);
    replica_config.lease.down_after_ms = config.node_down_after_ms;
    replica_config.snapshot_entries = config.snapshot_entries;
    let mono_origin = Instant::now();
    let replica = Replica::recover(replica_config, recovery, 0);
    let mut driver = Driver {
        replica,
        writer,
        runner,
        agent: config.local_runner.then(|| local_agent(&config)),
        links: links.clone(),
        mono_origin,
        term_logged: None,
        pending: HashMap::new(),
        next_request: 1,
        applied: applied_tx,
        data_dir: config.data_dir.clone(),
        measured,
        fatal: None,
        transport,
        addresses: address_book,
        shared_log: Some(shared_log),
        inputs: inputs_tx.clone(),
        leader_view: leader_tx,
        tick_ms: if config.peers.is_empty() {
            TICK_MS
        } else {
            TICK_MS.min((config.heartbeat_interval_ms / 2).max(5))
        },
        transfer_timeout: Duration::from_millis(3 * config.election_timeout_ms),
        lifecycle_logged: None,
        reads: HashMap::new(),
    };
    driver.replica.start(wall_clock_ms());
    driver.carry_out();
    // A single replica leads once its `LeaderElected` entry is durable:
    // wait for that before the API and the agents are served, so the first
    // heartbeat and the first request find a leader.
    let mut inputs_rx = inputs_rx;
    while driver.replica.voters().len() == 1 && !driver.replica.is_leading() {
        if let Some(fatal) = &driver.fatal {
            bail!("{fatal}");
        }
        let Some(input) = inputs_rx.recv().await else {
            bail!("the log writer stopped during start-up");
        };
        driver.handle(input);
        driver.carry_out();
    }
    driver.tick();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            listener,
            cp,
            ServerConfig {
                api_token: config.api_token.clone(),
                agents: Some(agents),
                connections_max: config.connections_max,
                peers: peer_context,
            },
            async {
                let _ = server_stop_rx.await;
            },
        )
        .in_current_span(),
    );
    if config.local_runner {
        tracing::info!(%addr, node = %config.node_name, "rustci dev is serving");
    } else {
        tracing::info!(%addr, peers = config.peers.len(), "rustci server is serving");
    }
    let done = tokio::spawn(
        async move {
            let result = driver.run(inputs_rx, stop_rx, server, server_stop_tx).await;
            drop(inputs_tx);
            result
        }
        .in_current_span(),
    );
    Ok(DevHandle {
        addr,
        stop: Some(stop_tx),
        done,
    })
}

/// A replica of a cluster refuses a data dir of another cluster or of
/// another replica: its log would mix with theirs.
fn check_identity(config: &DevConfig, cluster_id: &str) -> anyhow::Result<()> {
    let identity = rustci_storage::Identity::read(&config.data_dir)
        .map_err(|(path, reason)| anyhow::anyhow!("{}: {reason}", path.display()))?
        .ok_or_else(|| anyhow::anyhow!("data dir {} has no identity", config.data_dir.display()))?;
    if identity.cluster_id != cluster_id {
        bail!(
            "data dir {} belongs to cluster {}, but this --cluster-token makes cluster {cluster_id}: refusing to start (use the data dir made for this cluster, or a new one)",
            config.data_dir.display(),
            identity.cluster_id,
        );
    }
    if identity.replica_id != config.id {
        bail!(
            "data dir {} is replica {}'s, not replica {}'s: refusing to start (each replica keeps its own data dir)",
            config.data_dir.display(),
            identity.replica_id,
            config.id
        );
    }
    Ok(())
}

/// A seed for Raft's election timeouts from the OS.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
    {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => wall_clock_ms() ^ u64::from(std::process::id()),
    }
}

/// The log writer: one redb transaction and one fsync per batch of batches.
///
/// It owns the store. The first failure, an error or a panic inside redb
/// (a damaged file can make redb panic), is reported to the driver as
/// [`Input::PersistFailed`] at once, and the writer stops: nothing after it
/// can be acknowledged. The thread hands the store back only when every
/// append succeeded, so only then is the log closed as clean.
fn spawn_log_writer(
    mut store: LogStore,
    inputs: mpsc::Sender<Input>,
    stats: Arc<LogStats>,
) -> LogWriter {
    let (tx, rx) = std::sync::mpsc::channel::<WriterJob>();
    let stopping = Arc::new(AtomicBool::new(false));
    let stopping_flag = stopping.clone();
    let span = tracing::Span::current();
    // The snapshot builder hands its result back through the writer's own
    // queue, so the writer ends only once the builder did.
    let builder_jobs = tx.clone();
    let reader = store.reader();
    let thread = std::thread::Builder::new()
        .name("rustci-log-writer".into())
        .spawn(move || {
            let _span = span.entered();
            let mut builder = spawn_snapshot_builder(reader, builder_jobs, stopping_flag.clone());
            let good = write_log(
                &mut store,
                &rx,
                &inputs,
                &stats,
                &stopping_flag,
                &mut builder,
            );
            // The builder reads the log: it is gone before the store is
            // handed back (and closed cleanly), whatever ended the loop.
            if let Some(builder) = builder {
                builder.finish();
            }
            good.then_some(store)
        })
        .expect("spawning the log writer thread");
    LogWriter {
        tx: Some(tx),
        thread: Some(thread),
        stopping,
    }
}

/// The log writer's loop, until its queue ends or a write fails; returns
/// whether every append succeeded (only then is the store closed cleanly).
fn write_log(
    store: &mut LogStore,
    rx: &std::sync::mpsc::Receiver<WriterJob>,
    inputs: &mpsc::Sender<Input>,
    stats: &LogStats,
    stopping_flag: &AtomicBool,
    builder: &mut Option<SnapshotBuilder>,
) -> bool {
    let mut next: Option<WriterJob> = None;
    while let Some(job) = next.take().or_else(|| rx.recv().ok()) {
        let mut batch = match job {
            WriterJob::Unit(unit) => unit,
            WriterJob::Snapshot(meta) => {
                // Every entry up to `meta` is stored by now.
                let asked = builder.as_ref().is_some_and(|b| b.ask(meta));
                if !asked {
                    let result = Err("the snapshot builder is gone".to_string());
                    if inputs
                        .blocking_send(Input::Compacted { meta, result })
                        .is_err()
                    {
                        return true;
                    }
                }
                continue;
            }
            WriterJob::Built { meta, result } => {
                if stopping_flag.load(Ordering::Relaxed) {
                    // Compacting now would only delay the stop.
                    continue;
                }
                let covered = store.snapshot_meta().is_some_and(|s| s.index >= meta.index);
                let result = match result {
                    // A newer snapshot came from the leader meanwhile.
                    Ok(_) if covered => Ok(()),
                    Ok(Some(bytes))
                        if !has_room(log_dir(store), snapshot_room_needed(bytes.len())) =>
                    {
                        Err(format!(
                        "no room on the disk for the snapshot ({} bytes, with the log's {} MiB spare): writes go on, and the compaction is tried again later",
                        bytes.len(),
                        LOG_FREE_MIN_BYTES >> 20
                    ))
                    }
                    Ok(Some(bytes)) => compact(store, meta, &bytes),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                if inputs
                    .blocking_send(Input::Compacted { meta, result })
                    .is_err()
                {
                    return true;
                }
                continue;
            }
            WriterJob::Closing => {
                // The driver is gone: only the builder still holds a
                // sender, and it ends once it is let go.
                if let Some(b) = builder.as_mut() {
                    b.let_go();
                }
                continue;
            }
        };
        // Group commit: later units ride in the same transaction unless one
        // truncates or installs a snapshot (it must follow what came
        // before), or is a compaction.
        while batch.entries.len() < WRITER_BATCH_ENTRIES_MAX {
            match rx.try_recv() {
                Ok(WriterJob::Unit(more))
                    if more.truncate_from.is_none() && more.snapshot.is_none() =>
                {
                    batch.id = more.id;
                    batch.entries.extend(more.entries);
                    batch.hard_state = more.hard_state.or(batch.hard_state);
                }
                Ok(more) => {
                    next = Some(more);
                    break;
                }
                Err(_) => break,
            }
        }
        // A leader's snapshot to install is encoded first: its size counts
        // for the room, as a compaction's does.
        let install = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batch
                .snapshot
                .as_ref()
                .map(|s| (s.meta, rustci_storage::encode_snapshot(&s.state)))
        }));
        let install = match install {
            Ok(install) => install,
            Err(panic) => {
                let failure = format!(
                    "encoding the leader's snapshot panicked: {}",
                    panic_message(&*panic)
                );
                let _ = inputs.blocking_send(Input::PersistFailed(failure));
                return false;
            }
        };
        // No append starts without room for it: redb fails for good on a
        // write error (until reopened), so the disk filling up must be met
        // before redb meets it. Meanwhile new commands get 507 and the batch
        // waits; nothing is lost. An install needs twice its snapshot on
        // top (as `snapshot_room_needed`, whose spare the entries' room
        // already counts).
        let install_room = install.as_ref().map_or(0, |(_, b)| 2 * b.len() as u64);
        if !wait_for_log_room(store, &batch.entries, install_room, stopping_flag, inputs) {
            // Stopping while the disk is full: these entries were never
            // acknowledged.
            return true;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            persist_unit(store, &batch, install.as_ref())
        }));
        let failure = match result {
            Ok(Ok(())) => {
                stats.appends.fetch_add(1, Ordering::Relaxed);
                stats
                    .entries
                    .fetch_add(batch.entries.len() as u64, Ordering::Relaxed);
                if inputs.blocking_send(Input::Persisted(batch.id)).is_err() {
                    return true;
                }
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!(
                "the log writer panicked inside the log file {}: {}",
                store.path().display(),
                panic_message(&*panic)
            ),
        };
        let _ = inputs.blocking_send(Input::PersistFailed(failure));
        return false;
    }
    true
}

/// Writes one (merged) unit; one bigger than a transaction may hold goes in
/// parts: the truncation with the first, the hard state with the last.
fn persist_unit(
    store: &mut LogStore,
    unit: &PersistUnit,
    encoded: Option<&(rustci_core::raft::SnapshotMeta, Vec<u8>)>,
) -> Result<(), rustci_storage::PersistError> {
    let hard_state = unit.hard_state.map(|h| rustci_storage::HardState {
        term: h.term,
        voted_for: h.vote,
        commit: h.commit,
    });
    let max = rustci_storage::APPEND_BATCH_ENTRIES_MAX;
    let install =
        encoded.map(|(meta, bytes)| rustci_storage::SnapshotInstall { meta: *meta, bytes });
    if let Some((meta, bytes)) = encoded {
        tracing::info!(
            index = meta.index,
            term = meta.term,
            bytes = bytes.len(),
            "installing the leader's snapshot: this replica was too far behind for entries"
        );
    }
    if unit.entries.len() <= max {
        return store.persist_with_snapshot(
            install,
            unit.truncate_from,
            &unit.entries,
            hard_state.as_ref(),
        );
    }
    if let Some(install) = install {
        store.persist_with_snapshot(Some(install), None, &[], None)?;
    }
    let parts: Vec<&[Entry]> = unit.entries.chunks(max).collect();
    for (i, part) in parts.iter().enumerate() {
        let truncate = if i == 0 { unit.truncate_from } else { None };
        let hard = if i + 1 == parts.len() {
            hard_state.as_ref()
        } else {
            None
        };
        store.persist(truncate, part, hard)?;
    }
    Ok(())
}

/// Stores the replica's own snapshot and drops the log behind it.
fn compact(
    store: &mut LogStore,
    meta: rustci_core::raft::SnapshotMeta,
    bytes: &[u8],
) -> Result<(), String> {
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.compact_to(meta.index, meta.term, bytes)
    }));
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "compaction panicked inside the log file {}: {}",
            store.path().display(),
            panic_message(&*panic)
        )),
    }
}

/// The snapshot builder: a thread that keeps its own copy of the state
/// (the "shadow", without the scheduler's indexes), folding the stored log
/// into it up to each index the writer asks for ([`Snapshot::fold`]), then
/// encoding it; the bytes go back to the writer as [`WriterJob::Built`].
/// Neither the replica nor the writer waits for it, and the replica's live
/// state is never copied: a compaction costs the entries since the last
/// one plus one encoding, at the price of a second copy of the state in
/// memory.
struct SnapshotBuilder {
    /// Dropped to let the builder go: it ends after the build in hand.
    requests: Option<std::sync::mpsc::Sender<rustci_core::raft::SnapshotMeta>>,
    thread: std::thread::JoinHandle<()>,
}

impl SnapshotBuilder {
    fn ask(&self, meta: rustci_core::raft::SnapshotMeta) -> bool {
        self.requests.as_ref().is_some_and(|r| r.send(meta).is_ok())
    }

    fn let_go(&mut self) {
        self.requests = None;
    }

    /// Lets the builder go and waits for it (it holds a log reader).
    fn finish(mut self) {
        self.let_go();
        if self.thread.join().is_err() {
            tracing::error!("the snapshot builder panicked");
        }
    }
}

fn spawn_snapshot_builder(
    reader: LogReadHandle,
    jobs: std::sync::mpsc::Sender<WriterJob>,
    stopping: Arc<AtomicBool>,
) -> Option<SnapshotBuilder> {
    let (tx, rx) = std::sync::mpsc::channel::<rustci_core::raft::SnapshotMeta>();
    let span = tracing::Span::current();
    let spawned = std::thread::Builder::new()
        .name("rustci-snapshot".into())
        .spawn(move || {
            let _span = span.entered();
            lower_thread_priority();
            let mut shadow: Option<State> = None;
            for meta in rx {
                let started = Instant::now();
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    build_snapshot(&reader, &mut shadow, meta, &stopping)
                }))
                .unwrap_or_else(|panic| {
                    shadow = None;
                    Err(format!(
                        "building the snapshot panicked: {}",
                        panic_message(&*panic)
                    ))
                });
                if let Ok(Some(bytes)) = &result {
                    tracing::debug!(
                        index = meta.index,
                        bytes = bytes.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "snapshot built from the log"
                    );
                }
                if jobs.send(WriterJob::Built { meta, result }).is_err() {
                    break;
                }
            }
            drop(reader);
            drop(jobs);
        });
    match spawned {
        Ok(thread) => Some(SnapshotBuilder {
            requests: Some(tx),
            thread,
        }),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the snapshot builder: the log is never compacted");
            None
        }
    }
}

/// Makes the calling thread yield the CPU to the daemon's other threads
/// (nice 10): a snapshot is due within seconds, a reply within
/// milliseconds. Linux applies `setpriority` to one thread given its id.
fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread; failure changes nothing.
    let done = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, SNAPSHOT_BUILDER_NICE)
    };
    if done != 0 {
        tracing::debug!("the snapshot builder runs at normal priority");
    }
}

/// The snapshot builder's nice value.
const SNAPSHOT_BUILDER_NICE: libc::c_int = 10;

/// The encoded state at `meta`: `shadow` folded forward to it. `None` if a
/// snapshot installed from the leader replaced the log beyond `meta`.
/// `shadow` starts (again) from the stored snapshot when it is missing or
/// behind it, and is dropped whenever a fold fails.
fn build_snapshot(
    reader: &LogReadHandle,
    shadow: &mut Option<State>,
    meta: rustci_core::raft::SnapshotMeta,
    stopping: &AtomicBool,
) -> Result<Option<Vec<u8>>, String> {
    if stopping.load(Ordering::Relaxed) {
        return Err("the replica is stopping".into());
    }
    let stored = reader.snapshot_meta().map_err(|e| e.to_string())?;
    let stored_index = stored.map_or(0, |s| s.index);
    if stored_index >= meta.index {
        return Ok(None);
    }
    let base = match shadow.take() {
        Some(state) if state.applied_index >= stored_index && state.applied_index <= meta.index => {
            state
        }
        _ => match reader.snapshot().map_err(|e| e.to_string())? {
            Some((at, bytes)) => {
                decode_stored_snapshot(at, &bytes, reader.path()).map_err(|e| format!("{e:#}"))?
            }
            None => State::for_replay(),
        },
    };
    let from = base.applied_index + 1;
    let (folded, scanned) = scan_pipelined(
        |f| reader.scan(from, f),
        |entry| entry.index >= meta.index || stopping.load(Ordering::Relaxed),
        |entries| Snapshot::fold(meta, base, entries),
    );
    match scanned {
        Ok(()) => {}
        // The leader's snapshot replaced the log since it was read.
        Err(rustci_storage::ReadError::Compacted { .. }) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    if stopping.load(Ordering::Relaxed) {
        return Err("the replica is stopping".into());
    }
    let snapshot = folded.ok_or_else(|| {
        format!(
            "the stored log does not reach index {} (term {}) from index {from}",
            meta.index, meta.term
        )
    })?;
    let state =
        std::sync::Arc::try_unwrap(snapshot.state).unwrap_or_else(|shared| State::clone(&shared));
    let bytes = rustci_storage::encode_snapshot(&state);
    *shadow = Some(state);
    Ok(Some(bytes))
}

/// What the log writer is handed, in order.
enum WriterJob {
    Unit(PersistUnit),
    /// Build the snapshot at this index off the writer's thread (the units
    /// before it are stored by then): see [`spawn_snapshot_builder`].
    Snapshot(rustci_core::raft::SnapshotMeta),
    /// A built snapshot to store, compacting the log behind it.
    Built {
        meta: rustci_core::raft::SnapshotMeta,
        result: Result<Option<Vec<u8>>, String>,
    },
    /// The driver stops: the writer lets the builder go, so its queue
    /// ends once the builder is done.
    Closing,
}

/// Entries one append takes at most (the rest waits for the next).
const WRITER_BATCH_ENTRIES_MAX: usize = rustci_storage::APPEND_BATCH_ENTRIES_MAX / 2;
/// Free space the log keeps for itself before an append, beyond what the
/// batch needs (redb grows its file by regions, not by entries).
const LOG_FREE_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// How often a writer waiting for disk space looks again.
const LOG_ROOM_POLL: Duration = Duration::from_millis(200);

/// Free space an append of `entries` entries wants: the minimum plus four
/// times a generous estimate of their frames.
fn log_room_needed(entries: usize) -> u64 {
    LOG_FREE_MIN_BYTES + 4 * entries as u64 * 4096
}

/// Free space a snapshot of `bytes` bytes wants: redb keeps the old
/// snapshot until the new one commits, and a write that fails inside redb
/// would stop the log for good, so a compaction or an install waits for it
/// rather than try.
fn snapshot_room_needed(bytes: usize) -> u64 {
    LOG_FREE_MIN_BYTES + 2 * bytes as u64
}

/// Whether the file system of `dir` has `needed` bytes free (yes when it
/// cannot be told).
fn has_room(dir: &Path, needed: u64) -> bool {
    rustci_net::disk::free_bytes(dir).is_none_or(|free| free >= needed)
}

/// The directory of the store's log file.
fn log_dir(store: &LogStore) -> &Path {
    store.path().parent().unwrap_or(Path::new("."))
}

/// Whether the log in `data_dir` has room to append `entries` entries.
fn log_has_room(data_dir: &Path, entries: usize) -> bool {
    has_room(data_dir, log_room_needed(entries))
}

/// Waits until the log's file system has room for `batch` (and `extra_bytes`
/// more), telling the driver when it starts and stops waiting. Returns
/// false if the daemon stops meanwhile.
fn wait_for_log_room(
    store: &LogStore,
    batch: &[Entry],
    extra_bytes: u64,
    stopping: &AtomicBool,
    inputs: &mpsc::Sender<Input>,
) -> bool {
    let dir = log_dir(store);
    let needed = log_room_needed(batch.len()) + extra_bytes;
    let has_room = || has_room(dir, needed);
    if has_room() {
        return true;
    }
    let needed_mib = needed >> 20;
    if extra_bytes > 0 {
        tracing::error!(
            dir = %dir.display(),
            needed_mib,
            "the event log's disk is full for the leader's snapshot this replica must install: writes are refused (507) until space is freed"
        );
    } else {
        tracing::error!(
            dir = %dir.display(),
            needed_mib,
            "the event log's disk is full: writes are refused (507) until space is freed"
        );
    }
    let _ = inputs.blocking_send(Input::StorageFull(true));
    loop {
        // Batches that arrive meanwhile stay queued in order behind this one.
        std::thread::sleep(LOG_ROOM_POLL);
        if has_room() {
            tracing::info!("the event log's disk has room again: writes resume");
            let _ = inputs.blocking_send(Input::StorageFull(false));
            return true;
        }
        if inputs.is_closed() || stopping.load(Ordering::Relaxed) {
            return false;
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown failure".to_string())
}

struct LogWriter {
    tx: Option<std::sync::mpsc::Sender<WriterJob>>,
    thread: Option<std::thread::JoinHandle<Option<LogStore>>>,
    /// Set when the daemon stops: a writer waiting for disk space gives up.
    stopping: Arc<AtomicBool>,
}

impl Drop for LogWriter {
    /// A driver that ends without [`LogWriter::close`] (a panic) still lets
    /// the writer end, and with it the store and its lock.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.stopping.store(true, Ordering::Relaxed);
            let _ = tx.send(WriterJob::Closing);
        }
    }
}

impl LogWriter {
    fn send(&self, job: WriterJob) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Lets the writer finish what it has and waits for it; the store comes
    /// back when every append succeeded.
    fn close(&mut self) -> Option<LogStore> {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(WriterJob::Closing);
        }
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

async fn forward_run_events(
    mut rx: mpsc::UnboundedReceiver<RunEvent>,
    inputs: mpsc::Sender<Input>,
) {
    while let Some(ev) = rx.recv().await {
        let input = match ev {
            RunEvent::Started { job, attempt } => Input::Run {
                job: JobId(job),
                attempt,
                observed: RunObservation::Started,
            },
            RunEvent::Finished {
                job,
                attempt,
                outcome,
                exit_code,
                usage,
            } => Input::Run {
                job: JobId(job),
                attempt,
                observed: RunObservation::Ended {
                    outcome,
                    exit_code,
                    usage,
                },
            },
            RunEvent::NotStarted { job, attempt } => Input::Run {
                job: JobId(job),
                attempt,
                observed: RunObservation::NotStarted,
            },
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

type ReplySender = oneshot::Sender<Result<Reply, CommandError>>;

struct Driver {
    replica: Replica,
    writer: LogWriter,
    runner: NativeRunner,
    /// API callers waiting for the replica's answer, by request id.
    pending: HashMap<u64, Option<ReplySender>>,
    next_request: u64,
    applied: watch::Sender<LogIndex>,
    /// The built-in runner's agent (`rustci dev`): the same state machine
    /// `rustci agent` runs, talking to the replica in-process. Its
    /// incarnation is new at every process start, so whatever an earlier
    /// process ran is lost and runs again.
    agent: Option<Agent>,
    /// Connections of remote agents.
    links: Arc<AgentLinks>,
    /// Origin of the monotonic clock fed to the replica and the agent.
    mono_origin: Instant,
    /// The term last recorded on the `replica` span (recorded again only
    /// when it changes: a span's fields are not for every step).
    term_logged: Option<u64>,
    data_dir: PathBuf,
    /// Commit, scheduling and queue-wait latencies for `/metrics`.
    measured: crate::driver_metrics::DriverMetrics,
    /// Set when the log cannot be written: the daemon must stop, since
    /// nothing more can be acknowledged safely.
    fatal: Option<String>,
    /// Sends to the other replicas; `None` for a single replica.
    transport: Option<PeerTransport>,
    /// The replicas' addresses, as the API and agent endpoint show them.
    addresses: rustci_net::control::AddressBook,
    /// Where entries for a lagging follower are read from (let go at
    /// shutdown, so the log closes with no reader open).
    shared_log: Option<Arc<SharedLog>>,
    /// The driver's own input channel (storage reads answer through it).
    inputs: mpsc::Sender<Input>,
    /// Who leads, for the API and the agent endpoint.
    leader_view: watch::Sender<LeaderView>,
    /// How often the replica ticks: Raft's heartbeats ride on ticks.
    tick_ms: u64,
    /// How long a stopping leader waits for a successor to take over.
    transfer_timeout: Duration,
    /// The lifecycle state last logged.
    lifecycle_logged: Option<rustci_core::replica::Lifecycle>,
    /// Linearizable reads waiting for the replica, by request id.
    reads: HashMap<u64, ReadFn>,
}

/// The agent of the runner built into `rustci dev`.
fn local_agent(config: &DevConfig) -> Agent {
    let capacity = config.capacity.unwrap_or_else(|| {
        let (cpu_millis, memory_mb) = runner::machine_capacity();
        Resources::new(cpu_millis, memory_mb)
    });
    let mut labels = default_labels();
    labels.extend(config.labels.clone());
    // A new incarnation per process start, larger than any before it:
    // whatever the previous process ran died with it (reaped at start), so
    // the new one vouches for it and the reducer marks those attempts lost.
    let runner_dir = config.data_dir.join("runner");
    let _ = std::fs::create_dir_all(&runner_dir);
    let (incarnation, predecessor) =
        crate::agent::next_incarnation(&runner_dir.join("incarnation"));
    let config = AgentConfig {
        name: config.node_name.clone(),
        capacity,
        labels,
        lease: LeaseConfig::default(),
    };
    Agent::new(config, incarnation, predecessor)
}

impl Driver {
    fn mono_ms(&self) -> u64 {
        self.mono_origin.elapsed().as_millis() as u64
    }

    /// Periodic work of the replica and of the local agent.
    fn tick(&mut self) {
        let mono = self.mono_ms();
        // The disk has room again and no batch is waiting for it (a
        // waiting writer says so itself when it resumes).
        if self.replica.storage_full() && log_has_room(&self.data_dir, 1) {
            self.replica.handle_storage_full(false);
        }
        self.measured
            .step(&mut self.replica, |r| r.handle_tick(wall_clock_ms(), mono));
        if let Some(agent) = self.agent.as_mut() {
            agent.handle_tick(mono);
        }
    }

    async fn run(
        &mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut stop: oneshot::Receiver<()>,
        mut server: tokio::task::JoinHandle<()>,
        server_stop: oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(self.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut server_stop = Some(server_stop);
        let mut stopping = false;
        // A stopping leader of a cluster first hands over (the API and the
        // peer endpoint keep serving meanwhile), until this deadline.
        let mut handing_over: Option<Instant> = None;
        self.carry_out();
        self.record_term();
        loop {
            if let Some(deadline) = handing_over {
                if !self.replica.is_leading() || Instant::now() >= deadline {
                    handing_over = None;
                    if self.replica.is_leading() {
                        tracing::warn!("no replica took over in time: stopping as the leader");
                    } else {
                        tracing::info!(leader = ?self.replica.leader(), "handed leadership over");
                    }
                    if let Some(s) = server_stop.take() {
                        let _ = s.send(());
                    }
                }
            }
            tokio::select! {
                biased;
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    match self.hand_over() {
                        Some(to) => {
                            tracing::info!(to, "stopping: handing leadership over first");
                            handing_over = Some(Instant::now() + self.transfer_timeout);
                        }
                        None => {
                            if let Some(s) = server_stop.take() { let _ = s.send(()); }
                        }
                    }
                }
                _ = &mut server, if stopping => break,
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    for _ in 1..INPUTS_PER_STEP_MAX {
                        match inputs.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => self.tick(),
            }
            self.carry_out();
            self.record_term();
            if let Some(e) = &self.fatal {
                let e = e.clone();
                // Whoever waits for an entry that will never be durable
                // hears so now (503), before the slow parts of the stop.
                self.fail_pending();
                if let Some(s) = server_stop.take() {
                    let _ = s.send(());
                }
                self.shutdown().await;
                bail!("stopping: the event log cannot be written: {e}");
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// A leader of a cluster starts handing leadership to its most
    /// up-to-date peer; returns that peer.
    fn hand_over(&mut self) -> Option<ReplicaId> {
        if self.replica.voters().len() < 2 || !self.replica.is_leading() {
            return None;
        }
        let to = self.replica.best_transferee()?;
        self.replica
            .transfer_leadership(wall_clock_ms(), to)
            .then_some(to)
    }

    /// Reads entries `from..=to` for `peer` off the driver's task and hands
    /// them back as an input.
    fn load_entries(&self, peer: ReplicaId, from: LogIndex, to: LogIndex) {
        let Some(log) = self.shared_log.clone() else {
            return;
        };
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            let want = usize::try_from(to + 1 - from).unwrap_or(usize::MAX);
            let mut entries: Vec<Entry> = Vec::with_capacity(want.min(4096));
            while entries.len() < want {
                let next = from + entries.len() as u64;
                match log.reader.read_range(next, want - entries.len()) {
                    Ok(more) if !more.is_empty() => entries.extend(more),
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(peer, from, to, error = %e, "cannot read entries for a lagging replica");
                        break;
                    }
                }
            }
            if entries.len() != want {
                entries.clear();
            }
            let _ = inputs.blocking_send(Input::EntriesLoaded { peer, entries });
        });
    }

    /// The replicas in effect changed: Raft messages go to exactly these
    /// from now on, and the API names their addresses.
    fn follow_members(&mut self, members: BTreeMap<ReplicaId, Option<String>>) {
        let me = self.replica.id();
        tracing::info!(
            replicas = ?members.keys().collect::<Vec<_>>(),
            "the control plane's replicas in effect"
        );
        for (&id, addr) in &members {
            let Some(addr) = addr else {
                if id != me {
                    tracing::warn!(
                        replica = id,
                        "no address known for a replica: start this one with --peer {id}=ADDR"
                    );
                }
                continue;
            };
            self.addresses.set(id, addr.clone());
            if let Some(t) = self.transport.as_mut() {
                if id != me {
                    t.connect(id, addr.clone());
                }
            }
        }
        if let Some(t) = self.transport.as_mut() {
            t.retain(|id| members.contains_key(&id));
        }
    }

    /// Reads the stored snapshot an InstallSnapshot message offers, off the
    /// driver task; [`Input::SnapshotRead`] brings it back.
    fn read_snapshot_for(&self, msg: rustci_core::replica::PeerMessage) {
        let Some(log) = self.shared_log.clone() else {
            return;
        };
        let rustci_core::raft::Body::InstallSnapshot { meta, .. } = msg.body else {
            return;
        };
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = match log.reader.snapshot() {
                Ok(Some((stored, bytes))) if stored == meta => Some(bytes),
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the stored snapshot for a lagging replica");
                    None
                }
            };
            let _ = inputs.blocking_send(Input::SnapshotRead { msg, bytes });
        });
    }

    /// Decodes a snapshot a leader sent, off the driver task;
    /// [`Input::PeerSnapshot`] brings it back. A snapshot that does not
    /// decode is logged and dropped: the leader sends it again.
    fn decode_peer_snapshot(
        &self,
        msg: rustci_core::replica::PeerMessage,
        snapshot: rustci_net::peer::PeerSnapshot,
    ) {
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            match rustci_storage::decode_snapshot(&snapshot.bytes) {
                Ok(state) => {
                    let snapshot = Snapshot {
                        meta: snapshot.meta,
                        state: Arc::new(state),
                    };
                    let _ = inputs.blocking_send(Input::PeerSnapshot { msg, snapshot });
                }
                Err(e) => tracing::warn!(
                    from = msg.from,
                    index = snapshot.meta.index,
                    error = %e,
                    "a snapshot from the leader does not decode: dropped"
                ),
            }
        });
    }

    /// Publishes who leads, for the API and the agent endpoint, and logs
    /// every change of the lifecycle state.
    fn publish_leader(&mut self) {
        let state = self.replica.lifecycle();
        if self.lifecycle_logged != Some(state) {
            tracing::info!(
                from = self.lifecycle_logged.map_or("none", |s| s.as_str()),
                to = state.as_str(),
                term = self.replica.term(),
                leader = ?self.replica.leader(),
                "lifecycle state changed"
            );
            self.lifecycle_logged = Some(state);
        }
        let view = LeaderView {
            leading: self.replica.is_leading(),
            leader: self.replica.leader(),
        };
        self.leader_view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// Puts the replica's term on the span every log line of it carries.
    fn record_term(&mut self) {
        let term = self.replica.term();
        if self.term_logged != Some(term) {
            tracing::Span::current().record("term", term);
            self.term_logged = Some(term);
        }
    }

    fn fail_pending(&mut self) {
        for (_, read) in std::mem::take(&mut self.reads) {
            read(Err(CommandError::Stopping));
        }
        for (_, waiter) in self.pending.drain() {
            if let Some(w) = waiter {
                let _ = w.send(Err(CommandError::Stopping));
            }
        }
    }

    async fn shutdown(&mut self) {
        self.shared_log = None;
        self.replica.stop();
        self.runner.shutdown().await;
        self.carry_out();
        let store = self.writer.close();
        self.fail_pending();
        if let (Some(store), None) = (store, &self.fatal) {
            store.close_clean();
        }
    }

    fn handle(&mut self, input: Input) {
        let now = wall_clock_ms();
        match input {
            Input::Command { command, reply } => {
                // Seen before the entry is made: a command that finds the
                // disk full is answered 507 at once instead of waiting for
                // the space it needs.
                if !self.replica.storage_full() && !log_has_room(&self.data_dir, 1) {
                    tracing::error!("the event log's disk is full: writes are refused (507) until space is freed");
                    self.replica.handle_storage_full(true);
                }
                let request = self.next_request;
                self.next_request += 1;
                self.pending.insert(request, Some(reply));
                self.replica.propose(now, request, command);
            }
            Input::Query(f) => f(&self.replica),
            Input::Read(f) => {
                let request = self.next_request;
                self.next_request += 1;
                self.reads.insert(request, f);
                self.replica.read(now, request);
            }
            Input::Agent(msg) => {
                let mono = self.mono_ms();
                self.replica.handle_agent(now, mono, msg);
            }
            Input::Run {
                job,
                attempt,
                observed,
            } => {
                let mono = self.mono_ms();
                let Some(agent) = self.agent.as_mut() else {
                    return;
                };
                match observed {
                    RunObservation::Started => agent.handle_spawned(mono, job, attempt, Ok(())),
                    RunObservation::Ended {
                        outcome,
                        exit_code,
                        usage,
                    } => crate::agent::process_ended(
                        agent, mono, job, attempt, outcome, exit_code, usage,
                    ),
                    RunObservation::NotStarted => agent.handle_not_started(mono, job, attempt),
                }
            }
            Input::Persisted(unit) => {
                self.measured
                    .step(&mut self.replica, |r| r.handle_persisted(now, unit));
                self.measured.committed(self.replica.commit_index());
            }
            Input::StorageFull(full) => self.replica.handle_storage_full(full),
            Input::PersistFailed(e) => {
                tracing::error!(error = %e, "appending to the event log failed");
                self.replica.fail();
                self.fatal = Some(e);
            }
            Input::Tick => self.tick(),
            Input::Peer {
                messages,
                snapshot: Some(snapshot),
            } => {
                // The batch's only message offers it (checked on receipt).
                if let Some(msg) = messages.into_iter().next() {
                    self.decode_peer_snapshot(msg, snapshot);
                }
            }
            Input::PeerSnapshot { msg, snapshot } => {
                let mono = self.mono_ms();
                let before = self.replica.snapshots_installed();
                self.replica
                    .handle_peer_snapshot(now, mono, msg, snapshot.clone());
                if self.replica.snapshots_installed() != before {
                    tracing::info!(
                        index = snapshot.meta.index,
                        term = snapshot.meta.term,
                        "restored the state from the leader's snapshot"
                    );
                }
            }
            Input::SnapshotRead { msg, bytes } => match (bytes, &self.transport) {
                (Some(bytes), Some(t)) => {
                    tracing::info!(
                        to = msg.to,
                        bytes = bytes.len(),
                        "sending a snapshot to a replica too far behind for entries"
                    );
                    if !t.send_snapshot(msg, bytes) {
                        tracing::debug!("a peer's queue is full: snapshot dropped");
                    }
                }
                _ => tracing::debug!(to = msg.to, "the snapshot offered is no longer stored"),
            },
            Input::Compacted { meta, result } => match result {
                Ok(()) => self.replica.handle_compacted(now, meta),
                Err(e) => {
                    tracing::error!(index = meta.index, error = %e, "compacting the event log failed; it grows until the next try");
                    self.replica.handle_compact_failed(meta);
                }
            },
            Input::Peer {
                messages,
                snapshot: None,
            } => {
                let mono = self.mono_ms();
                for msg in messages {
                    self.measured
                        .step(&mut self.replica, |r| r.handle_peer(now, mono, msg));
                }
                self.measured.committed(self.replica.commit_index());
            }
            Input::EntriesLoaded { peer, entries } => {
                self.replica.handle_entries_loaded(now, peer, entries);
            }
        }
    }

    /// Carries out the replica's outputs in order (see the driver contract in
    /// `rustci_core::replica`).
    fn carry_out(&mut self) {
        loop {
            let mut idle = true;
            while let Some(output) = self.replica.poll_output() {
                idle = false;
                self.carry_out_replica(output);
            }
            while let Some(output) = self.agent.as_mut().and_then(Agent::poll_output) {
                idle = false;
                self.carry_out_agent(output);
            }
            if idle {
                break;
            }
        }
        self.applied.send_if_modified(|i| {
            let now = self.replica.applied_index();
            let changed = *i != now;
            *i = now;
            changed
        });
        self.publish_leader();
    }

    /// Carries out what the local agent asks for (see the driver contract in
    /// `rustci_core::agent`).
    fn carry_out_agent(&mut self, output: AgentOutput) {
        match output {
            AgentOutput::Send(msg) => {
                let mono = self.mono_ms();
                self.replica.handle_agent(wall_clock_ms(), mono, msg);
            }
            AgentOutput::Spawn {
                job, attempt, spec, ..
            } => {
                // The attempt's own span (job, attempt) opens inside this one.
                let node = self.agent.as_ref().map_or("", |a| a.name());
                let span = tracing::info_span!("node", node = %node);
                span.in_scope(|| {
                    self.runner
                        .start(run_spec(&self.data_dir, job, attempt, spec))
                })
            }
            AgentOutput::Kill { job, attempt } => self.runner.kill(job.0, attempt),
            // The attempts' supervisors die with this process already: the
            // agent and its jobs cannot outlive each other here.
            AgentOutput::LeaseUntil { .. } => {}
            AgentOutput::Refused {
                job,
                attempt,
                node,
                incarnation,
            } => crate::agent::log_refused(job, attempt, &node, incarnation),
        }
    }

    fn carry_out_replica(&mut self, output: Output) {
        {
            match output {
                Output::Persist(unit) => {
                    self.measured.proposed(self.replica.state(), &unit.entries);
                    if self.replica.is_leading() {
                        log_failures(self.replica.state(), &unit.entries);
                    }
                    if !self.writer.send(WriterJob::Unit(unit)) && self.fatal.is_none() {
                        self.fatal = Some("the log writer has stopped".into());
                    }
                }
                Output::Members(members) => self.follow_members(members),
                Output::Compact(meta) => {
                    if !self.writer.send(WriterJob::Snapshot(meta)) && self.fatal.is_none() {
                        self.fatal = Some("the log writer has stopped".into());
                    }
                }
                Output::Send(msg)
                    if matches!(msg.body, rustci_core::raft::Body::InstallSnapshot { .. }) =>
                {
                    self.read_snapshot_for(msg);
                }
                Output::Send(msg) => match &self.transport {
                    Some(t) => {
                        if !t.send(msg) {
                            tracing::debug!("a peer's queue is full: message dropped");
                        }
                    }
                    None => {
                        tracing::error!(to = msg.to, kind = msg.body.kind(), "no peer to send to")
                    }
                },
                Output::LoadEntries(need) => self.load_entries(need.peer, need.from, need.to),
                Output::ReadReady { request, result } => {
                    if let Some(f) = self.reads.remove(&request) {
                        f(result.map(|()| &self.replica));
                    }
                }
                Output::Reply { request, result } => {
                    if let Some(Some(waiter)) = self.pending.remove(&request) {
                        let _ = waiter.send(result);
                    } else if let Err(e) = result {
                        tracing::warn!(error = %e, "internal command refused");
                    }
                }
                Output::ToAgent {
                    node,
                    incarnation,
                    msg,
                } => {
                    let mono = self.mono_ms();
                    match self.agent.as_mut() {
                        Some(agent) if node == agent.name() => {
                            if incarnation == agent.incarnation() {
                                agent.handle_message(mono, msg);
                            }
                        }
                        _ => {
                            if !self.links.send(&node, incarnation, msg) {
                                tracing::debug!(
                                    node,
                                    incarnation,
                                    "no connection to this node's agent"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The leader's own decisions about failures, as it logs them: the event
/// log has them too, but an operator reading the daemon's log should not
/// have to look there to learn that a node went down.
fn log_failures(state: &State, entries: &[Entry]) {
    use rustci_core::event::Event;
    for e in entries {
        match &e.event {
            Event::NodeDown { name, incarnation } => tracing::warn!(
                node = %name,
                incarnation,
                index = e.index,
                "node down: no heartbeat within the failure-detection time; its attempts are lost once its lease has lapsed"
            ),
            Event::AttemptLost { job, attempt } => {
                let node = state
                    .job(*job)
                    .and_then(|j| j.attempts.iter().find(|a| a.number == *attempt))
                    .map_or("?", |a| a.node.as_str());
                tracing::warn!(
                    job = job.0,
                    attempt,
                    node,
                    index = e.index,
                    "attempt lost with its node; the job runs again elsewhere"
                )
            }
            Event::NodeRemoved { name, reason } => tracing::info!(
                node = %name,
                reason = %reason,
                index = e.index,
                "node removed"
            ),
            _ => {}
        }
    }
}

fn run_spec(data_dir: &Path, job: JobId, attempt: AttemptNumber, spec: JobSpec) -> RunSpec {
    let work = data_dir.join("work").join(format!("{}-{attempt}", job.0));
    RunSpec::for_attempt(
        job,
        attempt,
        spec,
        work,
        output_path(data_dir, job, attempt),
    )
}

/// Labels every node gets: `os`, `arch` and `hostname`.
pub fn default_labels() -> Labels {
    let mut labels = BTreeMap::new();
    labels.insert("os".to_string(), std::env::consts::OS.to_string());
    labels.insert("arch".to_string(), std::env::consts::ARCH.to_string());
    labels.insert("hostname".to_string(), hostname());
    labels
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && rustci_core::validate::validate_node_name(s).is_ok())
        .unwrap_or_else(|| "local".to_string())
}
