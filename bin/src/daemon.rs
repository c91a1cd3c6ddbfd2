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
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustci_core::agent::{Agent, AgentConfig, AgentOutput};
use rustci_core::event::{Entry, LogIndex};
use rustci_core::model::{AttemptNumber, JobId, JobSpec, Labels, Resources};
use rustci_core::protocol::LeaseConfig;
use rustci_core::replica::{CommandError, Config, Output, Replica, Reply, TICK_MS};
use rustci_core::state::State;
use rustci_net::agent_link::{AgentLinks, LinkContext};
use rustci_net::control::{
    output_path, ControlPlane, Input, LogReader, LogStats, RunObservation, ServerInfo,
};
use rustci_net::server::{serve, ServerConfig};
use rustci_storage::LogStore;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

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
}

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
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".to_string());
        Err(anyhow::anyhow!(
            "cannot read the event log {}: the file is corrupt ({why})",
            data_dir.join(rustci_storage::LOG_FILE_NAME).display()
        ))
    })
}

/// Entries handed from the log reader to the reducer at a time during replay.
const REPLAY_BATCH_ENTRIES: usize = 4096;
/// Full batches queued between the reader and the reducer.
const REPLAY_BATCHES_IN_FLIGHT: usize = 8;

/// Reads the whole log and folds it into a state, as start-up does.
///
/// A pipeline of two threads: one scans and decodes the log (checksums,
/// MessagePack), the other applies entries in order. The reducer stays
/// single-threaded and sees the entries in log order, so the result is the
/// same as a plain fold; it only overlaps decoding with applying.
pub fn replay_store(store: &LogStore) -> anyhow::Result<State> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<Entry>>(REPLAY_BATCHES_IN_FLIGHT);
    // Drained batches go back to the reader: reusing their buffers avoids an
    // mmap, page faults and a munmap per batch.
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<Entry>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let fresh = || Vec::with_capacity(REPLAY_BATCH_ENTRIES);
            let mut batch = fresh();
            let result = store.scan(store.first_index(), |entry| {
                batch.push(entry);
                if batch.len() == REPLAY_BATCH_ENTRIES {
                    let next = empty_rx.try_recv().unwrap_or_else(|_| fresh());
                    if full_tx.send(std::mem::replace(&mut batch, next)).is_err() {
                        return std::ops::ControlFlow::Break(());
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            if !batch.is_empty() {
                let _ = full_tx.send(batch);
            }
            result
        });
        let mut state = State::for_replay();
        for mut batch in full_rx {
            for entry in batch.drain(..) {
                state.apply_owned(entry);
            }
            let _ = empty_tx.send(batch);
        }
        match reader.join() {
            Ok(Ok(())) => {
                state.rebuild_indexes();
                Ok(state)
            }
            Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

struct SharedLog(Arc<Mutex<LogStore>>);

impl LogReader for SharedLog {
    fn read_after(&self, after: LogIndex, max: usize) -> Result<Vec<Entry>, String> {
        let store = self
            .0
            .lock()
            .map_err(|_| "log store poisoned".to_string())?;
        store.read_range(after + 1, max).map_err(|e| e.to_string())
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
pub async fn start_dev(config: DevConfig) -> anyhow::Result<DevHandle> {
    if config.api_token.is_none() && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to serve {} without --api-token: `rustci dev` without a token serves loopback only",
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
    let (store, state) = guard_corruption(&config.data_dir, || {
        let store = LogStore::open(&config.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        let state = replay_store(&store)?;
        Ok((store, state))
    })?;
    let (last_index, last_term) = (store.last_index(), store.last_term());
    tracing::info!(
        data_dir = %config.data_dir.display(),
        entries = last_index,
        jobs = state.jobs.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replayed the log"
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;

    let pid_dir = config.data_dir.join("runner");
    let reaped = NativeRunner::reap_leftovers(&pid_dir);
    if reaped > 0 {
        tracing::warn!(reaped, "killed job processes left by a previous run");
    }
    let store = Arc::new(Mutex::new(store));
    let (inputs_tx, inputs_rx) = mpsc::channel(INPUTS_QUEUE_MAX);
    let (applied_tx, applied_rx) = watch::channel(last_index);
    let log_stats = Arc::new(LogStats::default());
    let writer = spawn_log_writer(store.clone(), inputs_tx.clone(), log_stats.clone());
    let (run_tx, run_rx) = mpsc::unbounded_channel();
    let mut runner_config = RunnerConfig::new(pid_dir);
    // Every attempt runs under `rustci __shim`, which dies with this process
    // and takes the job's whole process group with it. /proc/self/exe keeps
    // pointing at this process's image even if the binary is replaced.
    runner_config.shim = Some(PathBuf::from("/proc/self/exe"));
    if config.local_runner {
        runner_config.cgroups = runner::detect_cgroups();
    }
    let runner = NativeRunner::new(runner_config, run_tx);
    tokio::spawn(forward_run_events(run_rx, inputs_tx.clone()));

    let info = ServerInfo {
        id: 1,
        advertise_addr: addr.to_string(),
        data_dir: config.data_dir.clone(),
    };
    let links = AgentLinks::new();
    let agents = Arc::new(LinkContext {
        links: links.clone(),
        join_token: config.join_token.clone(),
        server_id: 1,
        data_dir: config.data_dir.clone(),
        reserved_node: config.local_runner.then(|| config.node_name.clone()),
        to_driver: inputs_tx.clone(),
    });
    let cp = ControlPlane::new(
        inputs_tx.clone(),
        applied_rx,
        Arc::new(SharedLog(store.clone())),
        info,
        started,
        log_stats,
    );
    let mut replica_config = Config::new(1);
    replica_config.idempotency_window_ms =
        u64::try_from(config.idempotency_window.as_millis()).unwrap_or(u64::MAX);
    let replica = Replica::recover(replica_config, state, last_index, last_term);
    let mut driver = Driver {
        replica,
        writer,
        runner,
        agent: config.local_runner.then(|| local_agent(&config)),
        links: links.clone(),
        mono_origin: Instant::now(),
        pending: HashMap::new(),
        next_request: 1,
        applied: applied_tx,
        data_dir: config.data_dir.clone(),
        fatal: None,
    };
    driver.replica.start(wall_clock_ms());
    driver.tick();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        cp,
        ServerConfig {
            api_token: config.api_token.clone(),
            agents: Some(agents),
        },
        async {
            let _ = server_stop_rx.await;
        },
    ));
    tracing::info!(%addr, node = %config.node_name, "rustci dev is serving");
    let done = tokio::spawn(async move {
        let result = driver.run(inputs_rx, stop_rx, server, server_stop_tx).await;
        drop(inputs_tx);
        result
    });
    Ok(DevHandle {
        addr,
        stop: Some(stop_tx),
        done,
    })
}

/// The log writer: one redb transaction and one fsync per batch of batches.
fn spawn_log_writer(
    store: Arc<Mutex<LogStore>>,
    inputs: mpsc::Sender<Input>,
    stats: Arc<LogStats>,
) -> LogWriter {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Entry>>();
    let thread = std::thread::Builder::new()
        .name("rustci-log-writer".into())
        .spawn(move || {
            while let Ok(mut batch) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                let last = batch.last().map(|e| e.index).unwrap_or(0);
                let result = store
                    .lock()
                    .map_err(|_| "log store poisoned".to_string())
                    .and_then(|mut s| s.append(&batch).map_err(|e| e.to_string()));
                let input = match result {
                    Ok(()) => {
                        stats.appends.fetch_add(1, Ordering::Relaxed);
                        stats
                            .entries
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        Input::Persisted(last)
                    }
                    Err(e) => Input::PersistFailed(e),
                };
                if inputs.blocking_send(input).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the log writer thread");
    LogWriter {
        tx: Some(tx),
        thread: Some(thread),
    }
}

struct LogWriter {
    tx: Option<std::sync::mpsc::Sender<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    fn send(&self, entries: Vec<Entry>) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(entries).is_ok())
    }

    /// Lets the writer finish what it has and waits for it.
    fn close(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    data_dir: PathBuf,
    /// Set when the log cannot be written: the daemon must stop, since
    /// nothing more can be acknowledged safely.
    fatal: Option<String>,
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
        self.replica.handle_tick(wall_clock_ms(), mono);
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
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut server_stop = Some(server_stop);
        let mut stopping = false;
        self.carry_out();
        loop {
            tokio::select! {
                biased;
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    if let Some(s) = server_stop.take() { let _ = s.send(()); }
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
            if let Some(e) = &self.fatal {
                let e = e.clone();
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

    async fn shutdown(&mut self) {
        self.replica.stop();
        self.runner.shutdown().await;
        self.carry_out();
        self.writer.close();
        for (_, waiter) in self.pending.drain() {
            if let Some(w) = waiter {
                let _ = w.send(Err(CommandError::Stopping));
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now = wall_clock_ms();
        match input {
            Input::Command { command, reply } => {
                let request = self.next_request;
                self.next_request += 1;
                self.pending.insert(request, Some(reply));
                self.replica.propose(now, request, command);
            }
            Input::Query(f) => f(&self.replica),
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
            Input::Persisted(index) => self.replica.handle_persisted(now, index),
            Input::PersistFailed(e) => {
                tracing::error!(error = %e, "appending to the event log failed");
                self.replica.fail();
                self.fatal = Some(e);
            }
            Input::Tick => self.tick(),
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
            } => self
                .runner
                .start(run_spec(&self.data_dir, job, attempt, spec)),
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
                Output::Persist(entries) => {
                    if !self.writer.send(entries) && self.fatal.is_none() {
                        self.fatal = Some("the log writer has stopped".into());
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
