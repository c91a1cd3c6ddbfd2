//! `rustci agent`: a worker node, the production driver of core's sans-IO
//! [`Agent`].
//!
//! One task owns the agent state machine. It feeds it ticks, the control
//! plane's messages and the native runner's process events, and carries out
//! what it asks: frames to the control plane, spawns and kills. Around that
//! it only moves bytes: it connects (and reconnects with backoff) to a
//! control-plane replica that accepts it, dialling all listed servers at
//! once in a task of its own so that a silent server never holds up ticks,
//! signals or the runner's events, and ships each attempt's
//! output in chunks while it runs, so the output stays readable on the
//! control plane after this node is gone.
//!
//! Nothing here decides anything about jobs: the agent and the control
//! plane do.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustci_core::agent::{Agent, AgentConfig, AgentOutput, AGENT_TICK_MS};
use rustci_core::model::{AttemptNumber, JobId, JobSpec, Labels, Outcome, Resources, Usage};
use rustci_core::protocol::{LeaseConfig, PROTOCOL_VERSION};
use rustci_net::agent_link::{
    read_frame, write_frame, Down, Hello, HelloReply, Up, AGENT_PATH, AGENT_UPGRADE,
    OUTPUT_CHUNK_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::runner::{self, NativeRunner, RunEvent, RunSpec, RunnerConfig};

/// Longest wait between two connection attempts.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First wait after a failed connection attempt.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest HTTP response head read while switching protocols.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
/// How long a finished attempt's output is kept for resending after a
/// reconnect.
const SHIPPED_KEEP: Duration = Duration::from_secs(60);
/// Frames waiting for the connection before new ones are dropped.
const UP_QUEUE_MAX: usize = 4096;
/// Longest a connection may take to be set up (TCP, protocol switch, hello).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence on a link after which the agent drops it and dials every
/// replica again ([`rustci_core::protocol::SERVER_SILENT_MS`]: the control
/// plane answers every heartbeat, sent every second). A paused leader keeps
/// the link open: only this finds the new leader before the lease lapses.
const LINK_SILENCE_MAX: Duration = Duration::from_millis(rustci_core::protocol::SERVER_SILENT_MS);

#[derive(Clone, Debug)]
pub struct AgentProcessConfig {
    /// Control-plane replicas to try, in order.
    pub servers: Vec<String>,
    pub join_token: Option<String>,
    pub name: String,
    pub capacity: Resources,
    pub labels: Labels,
    pub work_dir: PathBuf,
    /// After a stop signal, how long running jobs may take to finish
    /// before they are killed (and run elsewhere).
    pub drain_timeout: Duration,
    /// Free space kept on the work dir's file system: output stops below.
    pub disk_reserve_bytes: u64,
    /// How long a failed attempt's work dir is kept.
    pub keep_failed_workspaces: Duration,
    /// How often it heartbeats; see `cli::HEARTBEAT_INTERVAL_MS_MAX` for
    /// why it stays below half the lease.
    pub heartbeat_interval_ms: u64,
}

/// An attempt whose output is being shipped.
struct Shipping {
    path: PathBuf,
    /// Bytes of the file already sent on the current connection.
    offset: u64,
    /// When the process ended (the rest was sent then).
    ended: Option<Instant>,
}

/// A live connection to a control-plane replica.
struct Link {
    up: mpsc::Sender<Up>,
    down: mpsc::Receiver<Down>,
}

/// Runs the agent until it has left. Every message on `stop` is a stop
/// signal: the first drains (no new work; running jobs may finish within
/// `drain_timeout`), the second kills the jobs (they run elsewhere) and
/// leaves at once. Returns an error at once for a refusal that retrying
/// cannot fix (a wrong join token, another protocol version).
///
/// Everything it logs is inside a `node` span with the node's name (see
/// `crate::logging`).
pub async fn run(
    config: AgentProcessConfig,
    stop: mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("node", node = %config.name);
    run_node(config, stop).instrument(span).await
}

async fn run_node(
    mut config: AgentProcessConfig,
    mut stop: mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    // Absolute: the jobs' shims read the lease file from inside the job's
    // workspace, where a relative path (the default `./rustci-agent`)
    // names nothing, and a lease that cannot be read counts as lapsed.
    config.work_dir = std::path::absolute(&config.work_dir)
        .with_context(|| format!("the work dir {}", config.work_dir.display()))?;
    rustci_core::validate::validate_node_name(&config.name)
        .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    rustci_core::validate::validate_resources(&config.capacity)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rustci_core::validate::validate_labels(&config.labels, "labels")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if config.servers.is_empty() {
        bail!("--server: give at least one control-plane address");
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create the work dir {}", config.work_dir.display()))?;
    let pid_dir = config.work_dir.join("runner");
    let reaped = NativeRunner::reap_leftovers(&pid_dir);
    if reaped > 0 {
        tracing::warn!(reaped, "killed job processes left by a previous agent");
    }
    let (run_tx, mut run_rx) = mpsc::unbounded_channel();
    let mut runner_config = RunnerConfig::new(pid_dir);
    runner_config.shim = Some(PathBuf::from("/proc/self/exe"));
    // Until the first lease, the shims hold no work past now.
    std::fs::create_dir_all(config.work_dir.join("leases"))
        .with_context(|| format!("cannot create {}", config.work_dir.join("leases").display()))?;
    runner_config.cgroups = runner::detect_cgroups();
    runner_config.disk_reserve_bytes =
        rustci_net::disk::effective_reserve(&config.work_dir, config.disk_reserve_bytes);
    runner_config.keep_failed_workspaces = config.keep_failed_workspaces;
    let runner = NativeRunner::new(runner_config, run_tx);
    tokio::spawn(
        runner
            .workspace_sweeper()
            .run(config.work_dir.join("work"))
            .in_current_span(),
    );
    let (incarnation, predecessor) = next_incarnation(&config.work_dir.join("incarnation"));
    let agent = Agent::new(
        AgentConfig {
            name: config.name.clone(),
            capacity: config.capacity,
            labels: config.labels.clone(),
            lease: LeaseConfig {
                heartbeat_interval_ms: config.heartbeat_interval_ms,
                ..LeaseConfig::default()
            },
        },
        incarnation,
        predecessor,
    );
    let mut driver = Driver {
        config,
        agent,
        runner,
        origin_boot_ms: runner::boot_clock_ms(),
        lease_incarnation: incarnation,
        last_heard: Instant::now(),
        link: None,
        shipping: BTreeMap::new(),
    };
    let mut stops = 0u32;
    let mut drain_until: Option<Instant> = None;
    let mut gone_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(AGENT_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut next_connect = Instant::now();
    let mut connecting: Option<tokio::task::JoinHandle<Result<(Link, String), Refused>>> = None;
    loop {
        if driver.link.is_some() && driver.last_heard.elapsed() > LINK_SILENCE_MAX {
            tracing::warn!("the control plane went silent; reconnecting");
            driver.link = None;
            next_connect = Instant::now();
        }
        if driver.link.is_none() && connecting.is_none() && Instant::now() >= next_connect {
            connecting = Some(tokio::spawn(connect_any(driver.dial()).in_current_span()));
        }
        if let Some(at) = gone_at {
            // Left: give the last frames a moment to go out, then stop.
            if at.elapsed() >= Duration::from_millis(500) {
                break;
            }
        } else if driver.agent.is_gone() {
            gone_at = Some(Instant::now());
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            drain_until = None;
            let now = driver.now();
            tracing::warn!("the drain time ran out: killing the remaining jobs");
            driver.agent.leave(now, LEAVE_REASON, false);
            // Whatever happens to the acknowledgements, stop soon after.
            gone_at.get_or_insert(Instant::now() + Duration::from_secs(10));
        }
        let until_reconnect = tokio::time::sleep_until(next_connect.into());
        tokio::select! {
            biased;
            dialled = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match dialled.unwrap_or_else(|e| Err(Refused::Retry(e.to_string()))) {
                    Ok((link, server)) => {
                        tracing::info!(%server, "connected to the control plane");
                        driver.connected(link);
                        backoff = RECONNECT_BACKOFF_MIN;
                    }
                    Err(Refused::Fatal(reason)) => {
                        driver.runner.shutdown().await;
                        bail!("the control plane refused this agent: {reason}");
                    }
                    Err(Refused::Retry(reason)) => {
                        tracing::warn!(%reason, retry_in_ms = backoff.as_millis() as u64, "cannot reach the control plane");
                        next_connect = Instant::now() + backoff;
                        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    }
                }
            }
            signal = stop.recv(), if stops < 2 => {
                stops += 1;
                let now = driver.now();
                if signal.is_none() || stops > 1 {
                    tracing::info!("stopping now: killing the running jobs (they run elsewhere)");
                    driver.agent.leave(now, LEAVE_REASON, false);
                    gone_at.get_or_insert(Instant::now() + Duration::from_secs(5));
                } else {
                    tracing::info!(
                        drain_timeout_secs = driver.config.drain_timeout.as_secs(),
                        "stopping: no new jobs; running ones may finish (signal again to stop at once)"
                    );
                    driver.agent.leave(now, LEAVE_REASON, true);
                    drain_until = Some(Instant::now() + driver.config.drain_timeout);
                }
            }
            down = recv_down(&mut driver.link) => match down {
                Some(down) => {
                    driver.last_heard = Instant::now();
                    if down.incarnation == driver.agent.incarnation() {
                        let now = driver.now();
                        driver.agent.handle_message(now, down.msg);
                    }
                }
                None => {
                    tracing::warn!("lost the connection to the control plane");
                    driver.link = None;
                    next_connect = Instant::now() + backoff;
                }
            },
            ev = run_rx.recv() => {
                if let Some(ev) = ev {
                    driver.run_event(ev);
                }
            }
            _ = tick.tick() => {
                let now = driver.now();
                driver.agent.handle_tick(now);
                driver.ship_output();
            }
            _ = until_reconnect, if driver.link.is_none() && connecting.is_none() => {}
        }
        driver.carry_out();
    }
    driver.runner.shutdown().await;
    tracing::info!("agent left");
    Ok(())
}

/// A new incarnation for this node's agent, above the one recorded in
/// `file` (and above the wall clock's nanoseconds, so a lost file still
/// moves forward), and the recorded one as its predecessor: the caller has
/// reaped whatever the previous process left, so its work is dead. Records
/// the new one.
pub fn next_incarnation(file: &Path) -> (u64, Option<u64>) {
    let previous: Option<u64> = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let next = clock.max(previous.map_or(1, |p| p + 1));
    let tmp = file.with_extension("tmp");
    let written = std::fs::write(&tmp, next.to_string()).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        tracing::warn!(file = %file.display(), error = %e, "cannot record the agent's incarnation");
    }
    (next, previous)
}

/// Tells `agent` how an attempt's process ended, as the native runner saw
/// it. Both drivers of the agent (`rustci agent` and `rustci dev`) use it.
pub fn process_ended(
    agent: &mut Agent,
    now: u64,
    job: JobId,
    attempt: AttemptNumber,
    outcome: Outcome,
    exit_code: Option<i32>,
    usage: Option<Usage>,
) {
    match outcome {
        Outcome::StartFailed => agent.handle_spawned(
            now,
            job,
            attempt,
            Err("the command could not be started".into()),
        ),
        // The agent knows why it killed (cancel, time-out, lapse).
        Outcome::Cancelled | Outcome::TimedOut => agent.handle_exit(now, job, attempt, None, usage),
        Outcome::Exited => agent.handle_exit(now, job, attempt, exit_code, usage),
        Outcome::Oom => agent.handle_out_of_memory(now, job, attempt, usage),
    }
}

/// Logs an attempt the agent refused: the control plane placed it on
/// another node or incarnation (a bug there; the attempt is not started).
pub fn log_refused(job: JobId, attempt: AttemptNumber, node: &str, incarnation: u64) {
    tracing::error!(
        job = job.0,
        attempt,
        node,
        incarnation,
        "the control plane handed this agent an attempt placed elsewhere; not started"
    );
}

/// The reason a stopped agent gives for leaving.
const LEAVE_REASON: &str = "the agent was stopped (SIGTERM or Ctrl-C)";

enum Refused {
    /// Retrying cannot help (wrong token, another protocol version).
    Fatal(String),
    Retry(String),
}

/// What a connection attempt needs.
struct Dial {
    servers: Vec<String>,
    hello: Hello,
}

/// Dials every listed server at once; the first that accepts this agent
/// wins (a replica that is not the leader refuses it, so with several
/// replicas this finds the leader). A permanent refusal (wrong token,
/// another protocol) from any ends it; otherwise the reasons of all are
/// reported.
async fn connect_any(dial: Dial) -> Result<(Link, String), Refused> {
    let mut attempts = tokio::task::JoinSet::new();
    for server in dial.servers {
        let hello = dial.hello.clone();
        attempts.spawn(async move {
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect_to(&server, &hello)).await;
            let attempt = attempt.unwrap_or_else(|_| Err(Refused::Retry("timed out".into())));
            (server, attempt)
        });
    }
    let mut reasons = Vec::new();
    while let Some(done) = attempts.join_next().await {
        let Ok((server, attempt)) = done else {
            continue;
        };
        match attempt {
            Ok(link) => return Ok((link, server)),
            Err(Refused::Fatal(reason)) => return Err(Refused::Fatal(reason)),
            Err(Refused::Retry(reason)) => reasons.push(format!("{server}: {reason}")),
        }
    }
    Err(Refused::Retry(reasons.join("; ")))
}

async fn connect_to(server: &str, hello: &Hello) -> Result<Link, Refused> {
    let addr = crate::cli::server_addr(server);
    let retry = |e: std::io::Error| Refused::Retry(e.to_string());
    let mut stream = TcpStream::connect(&addr).await.map_err(retry)?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {AGENT_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {AGENT_UPGRADE}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(retry)?;
    let head = read_response_head(&mut stream).await.map_err(retry)?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "101" {
        return Err(Refused::Fatal(format!(
            "{addr} is not a RustCI control plane taking agents (answered {:?})",
            head.lines().next().unwrap_or("")
        )));
    }
    write_frame(&mut stream, hello).await.map_err(retry)?;
    match read_frame::<_, HelloReply>(&mut stream).await {
        Ok(Some(HelloReply::Welcome { .. })) => {}
        Ok(Some(HelloReply::Rejected {
            reason,
            permanent: true,
        })) => return Err(Refused::Fatal(reason)),
        Ok(Some(HelloReply::Rejected { reason, .. })) => return Err(Refused::Retry(reason)),
        Ok(None) => return Err(Refused::Retry("closed during the hello".into())),
        Err(e) => return Err(Refused::Retry(e.to_string())),
    }
    let (mut rd, mut wr) = stream.into_split();
    let (up_tx, mut up_rx) = mpsc::channel::<Up>(UP_QUEUE_MAX);
    let (down_tx, down_rx) = mpsc::channel::<Down>(UP_QUEUE_MAX);
    tokio::spawn(async move {
        while let Some(up) = up_rx.recv().await {
            if write_frame(&mut wr, &up).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(
        async move {
            loop {
                match read_frame::<_, Down>(&mut rd).await {
                    Ok(Some(down)) => {
                        if down_tx.send(down).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad frame from the control plane");
                        return;
                    }
                }
            }
        }
        .in_current_span(),
    );
    Ok(Link {
        up: up_tx,
        down: down_rx,
    })
}

async fn recv_down(link: &mut Option<Link>) -> Option<Down> {
    match link {
        Some(l) => l.down.recv().await,
        None => std::future::pending().await,
    }
}

struct Driver {
    config: AgentProcessConfig,
    agent: Agent,
    runner: NativeRunner,
    /// `CLOCK_BOOTTIME` when the agent started: the origin of its clock,
    /// which converts its deadlines for the shims.
    origin_boot_ms: u64,
    /// When the control plane last said anything on the current link: it
    /// answers every heartbeat, so a long silence means a dead connection.
    last_heard: Instant,
    /// The incarnation whose lease file the agent keeps: when it changes,
    /// the old file goes, and the old incarnation's shims kill what is left.
    lease_incarnation: u64,
    link: Option<Link>,
    shipping: BTreeMap<(JobId, AttemptNumber), Shipping>,
}

impl Driver {
    /// The monotonic clock the agent runs on.
    /// The agent's clock: `CLOCK_BOOTTIME` since start (it counts through
    /// a suspend, as the control plane's does).
    fn now(&self) -> u64 {
        runner::boot_clock_ms().saturating_sub(self.origin_boot_ms)
    }

    /// What dialling needs, for a task of its own.
    fn dial(&self) -> Dial {
        Dial {
            servers: self.config.servers.clone(),
            hello: Hello {
                protocol: PROTOCOL_VERSION,
                join_token: self.config.join_token.clone(),
                node: self.config.name.clone(),
            },
        }
    }

    /// A new link is up.
    fn connected(&mut self, link: Link) {
        self.link = Some(link);
        self.last_heard = Instant::now();
        // The server may have missed output sent before: send everything
        // still kept again.
        for s in self.shipping.values_mut() {
            s.offset = 0;
        }
        let now = self.now();
        self.agent.handle_connected(now);
    }

    fn send(&mut self, up: Up) {
        if let Some(link) = &self.link {
            if link.up.try_send(up).is_err() && link.up.is_closed() {
                self.link = None;
            }
        }
    }

    /// Carries out what the agent asks for (see the driver contract in
    /// `rustci_core::agent`).
    fn carry_out(&mut self) {
        self.retire_old_lease();
        while let Some(out) = self.agent.poll_output() {
            match out {
                AgentOutput::Send(msg) => self.send(Up::Msg(msg)),
                AgentOutput::Spawn {
                    job,
                    attempt,
                    incarnation,
                    spec,
                } => {
                    let mut run = run_spec(&self.config.work_dir, job, attempt, spec);
                    run.lease_file = Some(lease_path(&self.config.work_dir, incarnation));
                    self.shipping.insert(
                        (job, attempt),
                        Shipping {
                            path: run.log_path.clone(),
                            offset: 0,
                            ended: None,
                        },
                    );
                    self.runner.start(run);
                }
                AgentOutput::Kill { job, attempt } => self.runner.kill(job.0, attempt),
                // Every attempt's shim kills its job at this deadline unless
                // it is renewed: a paused agent cannot kill, its shims can.
                AgentOutput::LeaseUntil {
                    until_ms,
                    incarnation,
                } => {
                    if incarnation != self.agent.incarnation() {
                        continue; // a grant for an incarnation already gone
                    }
                    let deadline = self.origin_boot_ms + until_ms;
                    let file = lease_path(&self.config.work_dir, incarnation);
                    if let Err(e) = runner::write_lease(&file, deadline) {
                        tracing::error!(error = %e, "cannot record the lease for the jobs' shims");
                    }
                }
                AgentOutput::Refused {
                    job,
                    attempt,
                    node,
                    incarnation,
                } => log_refused(job, attempt, &node, incarnation),
            }
        }
    }

    fn run_event(&mut self, ev: RunEvent) {
        let now = self.now();
        match ev {
            RunEvent::Started { job, attempt } => {
                self.agent.handle_spawned(now, JobId(job), attempt, Ok(()))
            }
            RunEvent::Finished {
                job,
                attempt,
                outcome,
                exit_code,
                usage,
            } => {
                let key = (JobId(job), attempt);
                // All of the output goes out before the report that ends
                // the attempt (one ordered connection).
                self.ship(key, true);
                if let Some(s) = self.shipping.get_mut(&key) {
                    s.ended = Some(Instant::now());
                }
                process_ended(
                    &mut self.agent,
                    now,
                    key.0,
                    attempt,
                    outcome,
                    exit_code,
                    usage,
                );
            }
            RunEvent::NotStarted { job, attempt } => {
                self.shipping.remove(&(JobId(job), attempt));
                self.agent.handle_not_started(now, JobId(job), attempt);
            }
        }
    }

    /// Sends what each running attempt wrote since the last time.
    fn ship_output(&mut self) {
        let keys: Vec<(JobId, AttemptNumber)> = self.shipping.keys().copied().collect();
        for key in keys {
            self.ship(key, false);
        }
        // Output shipped a while ago is the control plane's to keep: the
        // local copy goes.
        let done: Vec<(JobId, AttemptNumber)> = self
            .shipping
            .iter()
            .filter(|(_, s)| s.ended.is_some_and(|t| t.elapsed() >= SHIPPED_KEEP))
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            if let Some(s) = self.shipping.remove(&key) {
                if let Err(e) = std::fs::remove_file(&s.path) {
                    tracing::debug!(path = %s.path.display(), error = %e, "cannot remove shipped output");
                }
            }
        }
    }

    fn ship(&mut self, key: (JobId, AttemptNumber), to_the_end: bool) {
        if self.link.is_none() {
            return;
        }
        loop {
            let Some(s) = self.shipping.get_mut(&key) else {
                return;
            };
            if s.ended.is_some() && !to_the_end {
                // Sent in full when it ended; only a reconnect resends it.
                if s.offset > 0 {
                    return;
                }
            }
            let chunk = match read_chunk(&s.path, s.offset) {
                Ok(chunk) if chunk.is_empty() => return,
                Ok(chunk) => chunk,
                Err(_) => return,
            };
            let offset = s.offset;
            s.offset += chunk.len() as u64;
            self.send(Up::Output {
                job: key.0,
                attempt: key.1,
                offset,
                bytes: chunk,
            });
        }
    }
}

/// The lease file of one agent incarnation.
fn lease_path(work_dir: &Path, incarnation: u64) -> PathBuf {
    work_dir.join("leases").join(incarnation.to_string())
}

impl Driver {
    /// When the agent moved to a new incarnation, the old one's lease file
    /// goes: its shims (fail closed) kill whatever it left at once.
    fn retire_old_lease(&mut self) {
        let now = self.agent.incarnation();
        if now != self.lease_incarnation {
            let _ = std::fs::remove_file(lease_path(&self.config.work_dir, self.lease_incarnation));
            self.lease_incarnation = now;
        }
    }
}

/// Up to one chunk of `path` from `offset`.
fn read_chunk(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; OUTPUT_CHUNK_BYTES];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

async fn read_response_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= RESPONSE_HEAD_BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before answering",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn run_spec(work_dir: &Path, job: JobId, attempt: AttemptNumber, spec: JobSpec) -> RunSpec {
    let work = work_dir.join("work").join(format!("{}-{attempt}", job.0));
    let log = work_dir
        .join("output")
        .join(job.0.to_string())
        .join(format!("{attempt}.log"));
    RunSpec::for_attempt(job, attempt, spec, work, log)
}
