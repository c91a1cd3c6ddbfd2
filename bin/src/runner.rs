//! The native runner: executes attempts of jobs as local processes.
//!
//! # Process model
//!
//! - Every attempt is one process started from `command[0]` with `command[1..]`
//!   as arguments (no shell unless the user wrote one), in **its own process
//!   group** (`pgid == pid` of the child). Every kill the runner does is a
//!   `SIGKILL` to the whole group, so grandchildren die with the job.
//! - The child gets a clean environment: `PATH`, `HOME` and `LANG` as the
//!   daemon has them ([`INHERITED_ENV`]), then the job's `env`, then
//!   `RUSTCI_JOB_ID` and `RUSTCI_ATTEMPT`; nothing else of the daemon's own
//!   (tokens above all). stdin is `/dev/null`; its working directory is
//!   `work_dir`, created per attempt.
//! - **No orphans.** Before `exec` the child sets `PR_SET_PDEATHSIG = SIGKILL`,
//!   so it dies when the runner dies. The kernel ties that signal to the
//!   *thread* that forked, so every fork happens on one process-wide spawner
//!   thread that never exits. `PDEATHSIG` is not inherited by grandchildren,
//!   so each running attempt's pgid is also recorded as a file in
//!   [`RunnerConfig::pid_dir`]; after a crash (`kill -9` of the daemon) the
//!   next daemon calls [`NativeRunner::reap_leftovers`] before starting work.
//! - When the job's main process exits on its own, whatever it left running in
//!   its group is killed too: an attempt owns nothing once it has finished.
//!
//! # The shim (`RunnerConfig::shim`)
//!
//! `PDEATHSIG` reaches only the direct child, so without a shim a `kill -9` of
//! the daemon kills `sh` but not the `sleep` it forked; those wait for
//! [`NativeRunner::reap_leftovers`] at the next start. With
//! `shim: Some(exe)` the runner instead starts `exe __shim -- CMD ARGS...`
//! (`exe` is the `rustci` binary itself; `main` dispatches to [`shim_main`])
//! as the group leader, with `PDEATHSIG = SIGTERM`. The shim catches
//! SIGTERM/SIGINT/SIGHUP and answers with `kill(0, SIGKILL)`: its whole
//! group, itself included, so the job's grandchildren die with the daemon.
//! It starts the command as its own child in the same group (stdio
//! inherited: the log pipe and `/dev/null`), waits for it and exits with
//! its status, re-raising the signal if the command was killed by one, so
//! the runner sees the same `exit_code` as without a shim. Background
//! leftovers are killed by the runner's usual group kill after the leader
//! (now the shim) exits; timeout and cancel SIGKILL the group as before.
//!
//! With [`RunnerConfig::lease_file`] (a `rustci agent`), the shim also holds
//! the agent's lease: it polls the file's deadline (`CLOCK_MONOTONIC` ms,
//! written by [`write_lease`]) every 50 ms while it waits for the job, and
//! kills its whole group once the deadline has passed, even if the agent is
//! paused and cannot. The control plane runs the job elsewhere only after
//! that deadline (see `rustci_core::protocol`).
//!
//! Start failures with a shim: the runner first resolves `command[0]` as
//! `execvp` would (`PATH` of the job, `work_dir` for relative paths) and
//! reports `StartFailed` without spawning anything when it is missing or not
//! executable: same events and log line as without a shim. Anything the
//! check cannot foresee (a bad ELF or `#!` interpreter, a file removed in
//! between) fails in the shim after `Started` was sent: the shim writes
//! `rustci: cannot start "CMD": ERROR` to the log, tells the runner on a
//! private status pipe (its fd named in `RUSTCI_SHIM_STATUS_FD`), and exits with
//! [`SHIM_START_FAILED_EXIT`]; the runner reports `StartFailed` from the pipe,
//! never from the exit code, so a job exiting with that code is not confused
//! with a start failure.
//!
//! # Output
//!
//! stdout and stderr share ONE pipe, so the log shows them interleaved in the
//! order they were written. The pipe is appended to `log_path` as it arrives,
//! so a reader can follow the file live. Past [`RunnerConfig::log_cap_bytes`]
//! the runner writes one line `\n[rustci: output truncated at N bytes]\n` and
//! discards the rest, while still draining the pipe so the job never blocks.
//!
//! # What a driver must do with [`RunEvent`]s
//!
//! For every [`NativeRunner::start`] the driver receives at most one
//! `Started` (only if the process spawned) and then EXACTLY one `Finished`,
//! in that order. `Finished` is sent only after the process has exited and
//! all of its output is in the log, so a reader that has seen `Finished`
//! sees the whole log. The driver MUST keep receiving from the channel (it is
//! unbounded) and report `Finished` to the control plane; that is the only
//! point at which the attempt's resources may be released.
//!
//! Exit codes: `exit_code` is the process's exit status; a process killed by
//! a signal (ours or anyone's) reports `exit_code: None`. A signal we did not
//! send gives `Outcome::Exited` with `None`; our own kills give `TimedOut` or
//! `Cancelled`. [`NativeRunner::shutdown`] reports `Cancelled`.
//!
//! # Known limits
//!
//! - A process that leaves the job's group (`setsid`, `setpgid`) escapes every
//!   group kill; if it keeps the output pipe open, the runner stops reading
//!   [`DRAIN_AFTER_EXIT_MS`] after the group died and drops its later output.
//! - On a normal exit the leader is reaped before its group is killed, so in
//!   theory the pgid could be reused in between; the window is microseconds
//!   and needs a full wrap of the pid space.
//! - [`NativeRunner::reap_leftovers`] sends `SIGKILL` and returns; it does not
//!   wait for the processes to disappear.
//! - With a shim, a late start failure (see above) reports `Started` before
//!   `Finished { StartFailed }`. A job killed by a signal that dumps core makes
//!   the shim re-raise it with `RLIMIT_CORE = 0`: same `exit_code` (`None`),
//!   but the wait status's core-dump bit is lost. The shim can die of
//!   `SIGKILL` from outside (OOM killer) without killing the group; its child
//!   then gets `PDEATHSIG = SIGKILL` and the runner kills the rest of the
//!   group when it sees the shim exit, but a dead daemon AND a dead shim
//!   leave the grandchildren to `reap_leftovers`.
//!
//! Linux only.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use rustci_core::model::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};

/// Default cap on one attempt's log: bytes past it are discarded.
pub const LOG_CAP_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;
/// Bytes read from a job's output pipe per read call.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;
/// After the job's process group is gone, how long to wait for the pipe to
/// reach end-of-file. Only a process that escaped the group (`setsid`) can
/// keep it open that long; its further output is dropped.
pub const DRAIN_AFTER_EXIT_MS: u64 = 2_000;
/// Timeouts longer than this are clamped to it (a week).
pub const TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// File extension of the pgid records in [`RunnerConfig::pid_dir`].
pub const PGID_RECORD_EXTENSION: &str = "pgid";
/// First argument that makes the `rustci` binary run [`shim_main`]:
/// `rustci __shim -- CMD ARGS...`.
pub const SHIM_ARG: &str = "__shim";
/// Exit code of the shim when it cannot start the command. The runner does
/// not rely on it (it reads the status pipe), it is for humans: 127 is what a
/// shell reports for a command it cannot find.
pub const SHIM_START_FAILED_EXIT: i32 = 127;
/// Exit code of the shim when it cannot even set itself up (signal handlers,
/// process group) or cannot wait for its child.
pub const SHIM_INTERNAL_ERROR_EXIT: i32 = 126;
/// What the shim writes on its status pipe when it cannot start the command.
const SHIM_START_FAILED_BYTE: u8 = b'F';
/// Environment variable naming the fd (the write end of a pipe whose read
/// end the runner keeps) on which the shim reports a start failure, as one
/// byte. Removed from the job's environment.
const SHIM_STATUS_FD_ENV: &str = "RUSTCI_SHIM_STATUS_FD";
/// Environment variable with the pid of the runner that started the shim, so
/// the shim can tell whether it was orphaned before it could catch SIGTERM.
/// Removed from the job's environment.
const SHIM_PARENT_ENV: &str = "RUSTCI_SHIM_PARENT";
/// Environment variable with the path of the agent's lease file, for the
/// shim. Removed from the job's environment.
const SHIM_LEASE_ENV: &str = "RUSTCI_SHIM_LEASE";
/// How often a shim with a lease checks it (and its job).
const SHIM_LEASE_POLL: Duration = Duration::from_millis(50);

const _: () = assert!(READ_BUFFER_BYTES as u64 <= LOG_CAP_BYTES_DEFAULT);
const _: () = assert!(READ_BUFFER_BYTES > 0);

/// One attempt of one job, as the runner executes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    pub job: u64,
    pub attempt: u32,
    /// `command[0]` is the executable (looked up in `PATH`), the rest its arguments.
    pub command: Vec<String>,
    /// Added to (and overriding) the daemon's environment.
    pub env: BTreeMap<String, String>,
    /// Measured from the moment the process spawned.
    pub timeout: Duration,
    /// Created if missing; the process's current directory.
    pub work_dir: PathBuf,
    /// Output is appended here; parent directories are created.
    pub log_path: PathBuf,
}

/// What the runner reports about an attempt; see the module doc for the order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEvent {
    Started {
        job: u64,
        attempt: u32,
    },
    Finished {
        job: u64,
        attempt: u32,
        outcome: Outcome,
        exit_code: Option<i32>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Bytes of output kept per attempt; see the module doc.
    pub log_cap_bytes: u64,
    /// Where each running attempt's pgid is recorded, so a daemon restarted
    /// after a crash can kill what the previous one left behind.
    pub pid_dir: PathBuf,
    /// The `rustci` binary to run each attempt under as a supervisor
    /// (`exe __shim -- CMD...`), so the job's whole group dies with the
    /// runner; see the module doc. `None`: the command is the group leader.
    pub shim: Option<PathBuf>,
    /// The agent's lease file (see [`write_lease`]): each attempt's shim
    /// kills the job's group once the deadline in it has passed, even if
    /// the agent that should renew it is paused. `None`: no lease.
    pub lease_file: Option<PathBuf>,
}

impl RunnerConfig {
    pub fn new(pid_dir: impl Into<PathBuf>) -> Self {
        Self {
            log_cap_bytes: LOG_CAP_BYTES_DEFAULT,
            pid_dir: pid_dir.into(),
            shim: None,
            lease_file: None,
        }
    }
}

type AttemptKey = (u64, u32);

/// State shared between the runner handle and its attempt tasks.
struct Shared {
    /// One entry per attempt from `start` until its `Finished` has been sent.
    /// The sender is taken by the first `kill`/`shutdown`, so a second kill
    /// is a no-op.
    attempts: Mutex<BTreeMap<AttemptKey, Option<oneshot::Sender<()>>>>,
    /// Mirrors `attempts.len()`; `shutdown` waits for it to reach zero.
    running: watch::Sender<usize>,
}

/// Runs attempts as local processes. Cheap to share behind an `Arc`.
pub struct NativeRunner {
    config: Arc<RunnerConfig>,
    events: mpsc::UnboundedSender<RunEvent>,
    shared: Arc<Shared>,
}

impl NativeRunner {
    pub fn new(config: RunnerConfig, events: mpsc::UnboundedSender<RunEvent>) -> Self {
        assert!(config.log_cap_bytes > 0, "log_cap_bytes must be positive");
        Self {
            config: Arc::new(config),
            events,
            shared: Arc::new(Shared {
                attempts: Mutex::new(BTreeMap::new()),
                running: watch::Sender::new(0),
            }),
        }
    }

    /// Starts an attempt and returns at once. MUST be called inside a tokio
    /// runtime. Starting an attempt that is already running is ignored.
    pub fn start(&self, spec: RunSpec) {
        let key = (spec.job, spec.attempt);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        {
            let mut attempts = self.shared.attempts.lock().expect("runner lock");
            if attempts.contains_key(&key) {
                warn!(
                    job = spec.job,
                    attempt = spec.attempt,
                    "attempt already running"
                );
                return;
            }
            attempts.insert(key, Some(cancel_tx));
            self.shared.running.send_replace(attempts.len());
        }
        let attempt = AttemptTask {
            config: Arc::clone(&self.config),
            events: self.events.clone(),
            guard: SlotGuard {
                shared: Arc::clone(&self.shared),
                key,
            },
            spec,
        };
        let span = tracing::info_span!("attempt", job = key.0, attempt = key.1);
        tokio::spawn(attempt.run(cancel_rx).instrument(span));
    }

    /// Cancels a running attempt: kills its process group, then it reports
    /// `Finished { outcome: Cancelled }`. Unknown or finished attempts: no-op.
    pub fn kill(&self, job: u64, attempt: u32) {
        let sender = {
            let mut attempts = self.shared.attempts.lock().expect("runner lock");
            attempts.get_mut(&(job, attempt)).and_then(Option::take)
        };
        if let Some(sender) = sender {
            let _ = sender.send(());
        }
    }

    /// Attempts started and not yet `Finished`.
    pub fn running(&self) -> usize {
        self.shared.attempts.lock().expect("runner lock").len()
    }

    /// Kills every running attempt and returns once all of them have been
    /// reaped and their `Finished { outcome: Cancelled }` events sent.
    pub async fn shutdown(&self) {
        let senders: Vec<_> = {
            let mut attempts = self.shared.attempts.lock().expect("runner lock");
            attempts.values_mut().filter_map(Option::take).collect()
        };
        info!(attempts = senders.len(), "runner shutting down");
        for sender in senders {
            let _ = sender.send(());
        }
        let mut running = self.shared.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
    }

    /// At start-up, before any `start`: kills the process groups recorded in
    /// `pid_dir` by a previous runner that died without cleaning up, and
    /// removes every record. A group is only killed if one of its live
    /// members still carries the recorded `RUSTCI_JOB_ID`/`RUSTCI_ATTEMPT`
    /// (a pgid reused by an unrelated process is left alone). Returns how many
    /// groups were killed.
    pub fn reap_leftovers(pid_dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(pid_dir) else {
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(PGID_RECORD_EXTENSION) {
                continue;
            }
            if reap_record(&path) {
                killed += 1;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "cannot remove pgid record");
            }
        }
        killed
    }
}

/// Where the pgid of a running attempt is recorded: `<pid_dir>/<job>-<attempt>.pgid`,
/// holding the pgid in decimal.
pub fn pgid_record_path(pid_dir: &Path, job: u64, attempt: u32) -> PathBuf {
    pid_dir.join(format!("{job}-{attempt}.{PGID_RECORD_EXTENSION}"))
}

/// This machine's real capacity: `(cpu_millis, memory_mb)` from the number of
/// CPUs available to this process and `MemTotal` in `/proc/meminfo`.
pub fn machine_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total_kb(&text))
        .unwrap_or(0);
    (cpus * 1000, memory_kb / 1024)
}

fn parse_mem_total_kb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Removes an attempt from the runner's table when its task ends, however it
/// ends (normally after `Finished` is sent, or by panic or runtime shutdown),
/// so `running()` and `shutdown()` never wait for a task that is gone.
struct SlotGuard {
    shared: Arc<Shared>,
    key: AttemptKey,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut attempts = self
            .shared
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        attempts.remove(&self.key);
        self.shared.running.send_replace(attempts.len());
    }
}

/// Everything one attempt's task owns.
struct AttemptTask {
    config: Arc<RunnerConfig>,
    events: mpsc::UnboundedSender<RunEvent>,
    guard: SlotGuard,
    spec: RunSpec,
}

/// A spawned job: its main process, the read end of its output pipe and its pgid.
struct Spawned {
    child: tokio::process::Child,
    output: pipe::Receiver,
    pgid: i32,
    /// With a shim: the read end of its status pipe (non-blocking).
    shim_status: Option<io::PipeReader>,
}

impl AttemptTask {
    async fn run(self, cancel: oneshot::Receiver<()>) {
        let (outcome, exit_code) = self.execute(cancel).await;
        info!(?outcome, ?exit_code, "attempt finished");
        self.send(RunEvent::Finished {
            job: self.spec.job,
            attempt: self.spec.attempt,
            outcome,
            exit_code,
        });
        drop(self.guard);
    }

    fn send(&self, event: RunEvent) {
        if self.events.send(event).is_err() {
            debug!("run event receiver dropped");
        }
    }

    async fn execute(&self, cancel: oneshot::Receiver<()>) -> (Outcome, Option<i32>) {
        let mut log = match open_log(&self.spec.log_path).await {
            Ok(log) => log,
            Err(e) => {
                warn!(path = %self.spec.log_path.display(), error = %e, "cannot open log");
                return (Outcome::StartFailed, None);
            }
        };
        let shim = self.config.shim.as_deref();
        let lease = self.config.lease_file.as_deref();
        let spawned = match spawn_attempt(&self.spec, shim, lease).await {
            Ok(spawned) => spawned,
            Err(e) => {
                let program = self.spec.command.first().map_or("", String::as_str);
                let line = format!("rustci: cannot start {program:?}: {e}\n");
                warn!(error = %e, "cannot start");
                if let Err(e) = write_and_flush(&mut log, line.as_bytes()).await {
                    warn!(error = %e, "cannot write log");
                }
                return (Outcome::StartFailed, None);
            }
        };
        let record = self.record_pgid(spawned.pgid);
        info!(pgid = spawned.pgid, "attempt started");
        self.send(RunEvent::Started {
            job: self.spec.job,
            attempt: self.spec.attempt,
        });
        let result = self.supervise(spawned, log, cancel).await;
        if let Some(record) = record {
            if let Err(e) = std::fs::remove_file(&record) {
                warn!(path = %record.display(), error = %e, "cannot remove pgid record");
            }
        }
        result
    }

    /// Waits for exit, deadline or cancellation; kills the group; drains the output.
    async fn supervise(
        &self,
        spawned: Spawned,
        log: tokio::fs::File,
        cancel: oneshot::Receiver<()>,
    ) -> (Outcome, Option<i32>) {
        let Spawned {
            mut child,
            output,
            pgid,
            shim_status,
        } = spawned;
        let (stop_tx, stop_rx) = oneshot::channel();
        let pump = tokio::spawn(
            pump_output(output, log, self.config.log_cap_bytes, stop_rx).in_current_span(),
        );
        let deadline = tokio::time::sleep(self.spec.timeout.min(TIMEOUT_MAX));
        let outcome = tokio::select! {
            biased;
            _ = child.wait() => Outcome::Exited,
            _ = cancel => Outcome::Cancelled,
            _ = deadline => Outcome::TimedOut,
        };
        // Also on a normal exit: whatever the job left in its group dies now.
        // (Then the leader is already reaped; see "Known limits" on pgid reuse.)
        kill_group(pgid);
        let exit_code = match child.wait().await {
            Ok(status) => status.code(),
            Err(e) => {
                warn!(error = %e, "cannot wait for the job process");
                None
            }
        };
        finish_output(pump, stop_tx).await;
        if outcome == Outcome::Exited && shim_status.is_some_and(shim_reported_start_failure) {
            warn!("the shim could not start the command");
            return (Outcome::StartFailed, None);
        }
        (outcome, exit_code)
    }

    /// Writes the pgid record; a failure is logged, not fatal (pdeathsig
    /// still covers the main process).
    fn record_pgid(&self, pgid: i32) -> Option<PathBuf> {
        let dir = &self.config.pid_dir;
        let path = pgid_record_path(dir, self.spec.job, self.spec.attempt);
        let written =
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, format!("{pgid}\n")));
        match written {
            Ok(()) => Some(path),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot record pgid");
                None
            }
        }
    }
}

async fn open_log(path: &Path) -> io::Result<tokio::fs::File> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

async fn write_and_flush(log: &mut tokio::fs::File, bytes: &[u8]) -> io::Result<()> {
    log.write_all(bytes).await?;
    log.flush().await
}

/// Waits for the pump to see end-of-file; if a process that escaped the
/// group keeps the pipe open past [`DRAIN_AFTER_EXIT_MS`], stops it.
async fn finish_output(mut pump: tokio::task::JoinHandle<()>, stop: oneshot::Sender<()>) {
    let drain = Duration::from_millis(DRAIN_AFTER_EXIT_MS);
    if tokio::time::timeout(drain, &mut pump).await.is_ok() {
        return;
    }
    warn!("output pipe still open after the job's group died; dropping the rest");
    let _ = stop.send(());
    if let Err(e) = pump.await {
        warn!(error = %e, "output pump failed");
    }
}

/// Copies the job's output into its log until end-of-file (or `stop`),
/// honouring the cap, and flushes before returning.
async fn pump_output(
    mut output: pipe::Receiver,
    mut log: tokio::fs::File,
    log_cap_bytes: u64,
    mut stop: oneshot::Receiver<()>,
) {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let mut cap = LogCap::new(log_cap_bytes);
    let mut log_ok = true;
    loop {
        let read = tokio::select! {
            biased;
            _ = &mut stop => break,
            read = output.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot read job output");
                break;
            }
        };
        if log_ok {
            if let Err(e) = write_capped(&mut log, &mut cap, &buffer[..n]).await {
                warn!(error = %e, "cannot write log; discarding further output");
                log_ok = false;
            }
        }
    }
    if let Err(e) = log.flush().await {
        warn!(error = %e, "cannot flush log");
    }
}

async fn write_capped(log: &mut tokio::fs::File, cap: &mut LogCap, chunk: &[u8]) -> io::Result<()> {
    let admitted = cap.admit(chunk.len());
    log.write_all(&chunk[..admitted.keep]).await?;
    if admitted.truncated_now {
        let marker = truncation_marker(cap.cap_bytes);
        log.write_all(marker.as_bytes()).await?;
    }
    Ok(())
}

/// The line written once when an attempt's output reaches the cap.
pub fn truncation_marker(cap_bytes: u64) -> String {
    format!("\n[rustci: output truncated at {cap_bytes} bytes]\n")
}

/// Counts an attempt's output against its cap. Pure, so it is unit tested.
#[derive(Debug)]
struct LogCap {
    cap_bytes: u64,
    written_bytes: u64,
    truncated: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Admitted {
    /// Leading bytes of the chunk to write.
    keep: usize,
    /// True exactly once: when this chunk crossed the cap.
    truncated_now: bool,
}

impl LogCap {
    fn new(cap_bytes: u64) -> Self {
        Self {
            cap_bytes,
            written_bytes: 0,
            truncated: false,
        }
    }

    fn admit(&mut self, chunk_bytes: usize) -> Admitted {
        assert!(self.written_bytes <= self.cap_bytes);
        if self.truncated {
            return Admitted {
                keep: 0,
                truncated_now: false,
            };
        }
        let room = self.cap_bytes - self.written_bytes;
        let keep = (chunk_bytes as u64).min(room);
        self.written_bytes += keep;
        self.truncated = keep < chunk_bytes as u64;
        assert!(self.written_bytes <= self.cap_bytes);
        Admitted {
            keep: keep as usize,
            truncated_now: self.truncated,
        }
    }
}

/// SIGKILLs a job's whole process group. ESRCH (already gone) is fine.
fn kill_group(pgid: i32) {
    // kill(-1) would signal every process we may signal; kill(0) our own group.
    assert!(pgid > 1, "refusing to kill process group {pgid}");
    assert_ne!(
        pgid,
        unsafe { libc::getpgrp() },
        "refusing to kill our own group"
    );
    // SAFETY: plain syscall, no memory involved.
    let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, error = %e, "cannot kill process group");
        }
    }
}

/// Creates the work dir, builds the command and forks on the spawner thread.
async fn spawn_attempt(
    spec: &RunSpec,
    shim: Option<&Path>,
    lease: Option<&Path>,
) -> io::Result<Spawned> {
    if spec.command.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    }
    tokio::fs::create_dir_all(&spec.work_dir).await?;
    let (reader, writer) = io::pipe()?;
    let (command, shim_status) = match shim {
        None => (build_command(spec, writer)?, None),
        Some(exe) => {
            let path_var = spec
                .env
                .get("PATH")
                .map(OsString::from)
                .or_else(|| std::env::var_os("PATH"));
            check_executable(&spec.command[0], path_var.as_deref(), &spec.work_dir)?;
            let (status_reader, status_writer) = io::pipe()?;
            set_nonblocking(status_reader.as_raw_fd())?;
            let mut command = build_shim_command(spec, exe, writer, status_writer)?;
            if let Some(lease) = lease {
                command.env(SHIM_LEASE_ENV, lease);
            }
            (command, Some(status_reader))
        }
    };
    // `command` (holding the pipe's write end) is dropped on the spawner
    // thread right after the fork, so end-of-file arrives when the job's
    // group closes its copies.
    let child = spawn_on_spawner_thread(command).await?;
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| io::Error::other("spawned child has no pid"))?;
    let output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    Ok(Spawned {
        child,
        output,
        pgid,
        shim_status,
    })
}

fn build_command(spec: &RunSpec, output: io::PipeWriter) -> io::Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new(&spec.command[0]);
    command.args(&spec.command[1..]);
    configure_leader(&mut command, spec, output, libc::SIGKILL)?;
    Ok(command)
}

/// `exe __shim -- CMD ARGS...`, with the status pipe's write end inherited
/// by the shim under its own number, named in `RUSTCI_SHIM_STATUS_FD` (only
/// the shim: it marks it close-on-exec again before starting the command).
/// No `dup2` to a fixed number, which could clobber a descriptor std's spawn
/// itself uses in the child.
fn build_shim_command(
    spec: &RunSpec,
    exe: &Path,
    output: io::PipeWriter,
    status: io::PipeWriter,
) -> io::Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new(exe);
    command.arg(SHIM_ARG).arg("--").args(&spec.command);
    configure_leader(&mut command, spec, output, libc::SIGTERM)?;
    // SAFETY: getpid before the fork; fcntl is async-signal-safe and only
    // touches the child's copy of the descriptor. `status` is moved into the
    // closure, so the fd stays open until the command (and the closure) is
    // dropped right after the fork.
    let parent = unsafe { libc::getpid() };
    command.env(SHIM_PARENT_ENV, parent.to_string());
    command.env(SHIM_STATUS_FD_ENV, status.as_raw_fd().to_string());
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(status.as_raw_fd(), libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// The only variables a job inherits, with the value used when this process
/// has none.
pub const INHERITED_ENV: [(&str, &str); 3] = [
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/"),
    ("LANG", "C.UTF-8"),
];

/// What every group leader gets: cwd, environment, stdio, its own process
/// group, and `deathsig` when the runner dies.
fn configure_leader(
    command: &mut tokio::process::Command,
    spec: &RunSpec,
    output: io::PipeWriter,
    deathsig: libc::c_int,
) -> io::Result<()> {
    // A clean environment: nothing of the daemon's or agent's own (tokens
    // above all) reaches a job, only PATH, HOME and LANG as this process has
    // them, then the job's own `env`, then its identity.
    command.env_clear();
    for (name, fallback) in INHERITED_ENV {
        match std::env::var_os(name) {
            Some(value) => command.env(name, value),
            None => command.env(name, fallback),
        };
    }
    command
        .current_dir(&spec.work_dir)
        .envs(&spec.env)
        .env("RUSTCI_JOB_ID", spec.job.to_string())
        .env("RUSTCI_ATTEMPT", spec.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: getpid is called before the fork; the closure only makes
    // async-signal-safe syscalls (prctl, getppid).
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || die_with_parent(parent, deathsig));
    }
    Ok(())
}

/// Runs in the child between fork and exec.
fn die_with_parent(parent: libc::pid_t, deathsig: libc::c_int) -> io::Result<()> {
    // SAFETY: async-signal-safe syscalls only.
    let deathsig = deathsig as libc::c_ulong;
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, deathsig, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before prctl took effect: then no signal comes.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::other("runner died while the job was starting"));
    }
    Ok(())
}

/// Fails like `execvp` would for a program that is missing or not
/// executable, so the shim's caller can report `StartFailed` without spawning.
/// `path_var` is the job's `PATH`; relative names are resolved in `cwd` (the
/// job's work dir), since the exec happens there. Only fails when sure:
/// errors other than "not there" and "permission denied" pass, and the shim
/// will report what the exec says.
fn check_executable(program: &str, path_var: Option<&OsStr>, cwd: &Path) -> io::Result<()> {
    let not_found = || io::Error::from_raw_os_error(libc::ENOENT);
    if program.is_empty() {
        return Err(not_found());
    }
    if program.contains('/') {
        return match probe_executable(&cwd.join(program)) {
            Probe::Executable | Probe::Unsure => Ok(()),
            Probe::Missing => Err(not_found()),
            Probe::Denied => Err(io::Error::from_raw_os_error(libc::EACCES)),
        };
    }
    // glibc's execvp: confstr(_CS_PATH) when PATH is unset; an empty entry
    // is the current directory; EACCES wins over ENOENT at the end.
    let path_var = path_var.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut denied = false;
    for dir in path_var.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        match probe_executable(&cwd.join(dir).join(program)) {
            Probe::Executable | Probe::Unsure => return Ok(()),
            Probe::Missing => {}
            Probe::Denied => denied = true,
        }
    }
    if denied {
        Err(io::Error::from_raw_os_error(libc::EACCES))
    } else {
        Err(not_found())
    }
}

enum Probe {
    Executable,
    Missing,
    Denied,
    Unsure,
}

fn probe_executable(path: &Path) -> Probe {
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) => Probe::Missing,
                Some(libc::EACCES) => Probe::Denied,
                _ => Probe::Unsure,
            }
        }
    };
    if !metadata.is_file() {
        // execve of a directory or device: EACCES.
        return Probe::Denied;
    }
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Probe::Unsure;
    };
    // SAFETY: a valid NUL-terminated string.
    if unsafe { libc::access(path.as_ptr(), libc::X_OK) } == 0 {
        Probe::Executable
    } else {
        Probe::Denied
    }
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Called once the shim has exited: did it report that the command could
/// not be started? (The write end is closed, so this never blocks.)
fn shim_reported_start_failure(mut status: io::PipeReader) -> bool {
    let mut byte = [0u8; 1];
    matches!(status.read(&mut byte), Ok(1) if byte[0] == SHIM_START_FAILED_BYTE)
}

/// The shim: `rustci __shim -- CMD ARGS...` runs this with `CMD ARGS...`.
/// Starts the command as its child in its own process group (becoming the
/// group's leader first if it is not), and on SIGTERM, SIGINT or SIGHUP
/// (SIGTERM is its `PDEATHSIG` when the runner starts it) SIGKILLs the whole
/// group, itself included. Returns the command's exit code; if the command
/// was killed by a signal the shim dies of the same signal instead of
/// returning. If the command cannot be started: writes
/// `rustci: cannot start "CMD": ERROR` to stderr, reports it on the status
/// fd if the runner gave one, and returns [`SHIM_START_FAILED_EXIT`].
pub fn shim_main(args: Vec<OsString>) -> i32 {
    if let Err(e) = shim_setup() {
        let _ = writeln!(io::stderr(), "rustci: shim: {e}");
        return SHIM_INTERNAL_ERROR_EXIT;
    }
    let status_pipe = take_status_fd();
    let Some((program, rest)) = args.split_first() else {
        return shim_start_failed("", &io::Error::other("empty command"), status_pipe);
    };
    let mut command = std::process::Command::new(program);
    command
        .args(rest)
        .env_remove(SHIM_PARENT_ENV)
        .env_remove(SHIM_STATUS_FD_ENV)
        .env_remove(SHIM_LEASE_ENV);
    let lease = std::env::var_os(SHIM_LEASE_ENV).map(PathBuf::from);
    // SAFETY: getpid before the fork; the closure only makes
    // async-signal-safe syscalls. If the shim is SIGKILLed (OOM killer),
    // the command still dies, as it did when the runner was its parent.
    let shim = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || die_with_parent(shim, libc::SIGKILL));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return shim_start_failed(&program.to_string_lossy(), &e, status_pipe),
    };
    drop(status_pipe);
    // std retries the wait on EINTR.
    let status = match lease {
        Some(lease) => wait_within_lease(&mut child, &lease),
        None => child.wait(),
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            let _ = writeln!(io::stderr(), "rustci: shim: cannot wait for the job: {e}");
            kill_own_group();
            return SHIM_INTERNAL_ERROR_EXIT;
        }
    };
    if let Some(code) = status.code() {
        return code;
    }
    match status.signal() {
        Some(signal) => die_of(signal),
        None => SHIM_INTERNAL_ERROR_EXIT,
    }
}

/// Waits for the job, checking the agent's lease file meanwhile: once its
/// deadline has passed, the whole group dies (the agent that should have
/// renewed it may be paused, or cut off from the control plane, which will
/// run the job elsewhere). A missing or unreadable file changes nothing.
fn wait_within_lease(
    child: &mut std::process::Child,
    lease: &Path,
) -> io::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if read_lease(lease).is_some_and(|deadline| monotonic_ms() >= deadline) {
            let _ = writeln!(
                io::stderr(),
                "rustci: the agent's lease lapsed; the job is killed"
            );
            kill_own_group();
        }
        std::thread::sleep(SHIM_LEASE_POLL);
    }
}

/// Milliseconds on `CLOCK_MONOTONIC`: one clock for every process of this
/// machine, so the agent and the shims agree on a deadline.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing into `ts`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Records the lease deadline (`CLOCK_MONOTONIC` ms) for the shims: written
/// to a temporary file and renamed, so a reader never sees half of it.
pub fn write_lease(path: &Path, deadline_ms: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, deadline_ms.to_string())?;
    std::fs::rename(&tmp, path)
}

fn read_lease(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn shim_start_failed(program: &str, error: &io::Error, status_pipe: Option<std::fs::File>) -> i32 {
    let _ = writeln!(io::stderr(), "rustci: cannot start {program:?}: {error}");
    if let Some(mut pipe) = status_pipe {
        let _ = pipe.write_all(&[SHIM_START_FAILED_BYTE]);
    }
    SHIM_START_FAILED_EXIT
}

/// Process group leadership, signal handlers, and the orphan check.
fn shim_setup() -> io::Result<()> {
    // SAFETY: plain syscalls; the handler only calls kill (async-signal-safe).
    unsafe {
        // kill(0) must never hit the group of whoever started us by hand.
        if libc::getpgrp() != libc::getpid() && libc::setpgid(0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_terminating_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigfillset(&mut action.sa_mask);
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::sigaddset(&mut unblock, signal);
        }
        libc::sigprocmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
    }
    // The runner may have died between our exec and the sigaction above; a
    // SIGTERM then killed us by default action, unless it was ignored (an
    // inherited SIG_IGN). Either way, check now that nothing can be missed.
    let parent = std::env::var(SHIM_PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok());
    if let Some(parent) = parent {
        if unsafe { libc::getppid() } != parent {
            kill_own_group();
        }
    }
    Ok(())
}

extern "C" fn on_terminating_signal(_signal: libc::c_int) {
    kill_own_group();
}

/// SIGKILLs the shim's process group: the shim and everything of the job.
/// Async-signal-safe.
fn kill_own_group() {
    // SAFETY: kill is async-signal-safe; shim_setup made us the group leader.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// The status fd the runner passed, marked close-on-exec so the job does not
/// inherit it.
fn take_status_fd() -> Option<std::fs::File> {
    let fd: i32 = std::env::var(SHIM_STATUS_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: fcntl on a number; F_SETFD fails with EBADF if it is not open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the runner handed this descriptor to us and nothing else owns it.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Dies of `signal` (default action, no core file), so the runner sees the
/// same wait status as if the command had been its own child.
fn die_of(signal: libc::c_int) -> i32 {
    // SAFETY: plain syscalls. signal() fails harmlessly for SIGKILL/SIGSTOP.
    unsafe {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
    // Only for a signal whose default action is not to terminate.
    128 + signal
}

/// One fork request for the spawner thread.
struct SpawnRequest {
    command: tokio::process::Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, and tokio
/// threads come and go (blocking pool, `block_in_place`). So all forks happen
/// on this one thread, which lives as long as the process.
fn spawner() -> &'static std_mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<std_mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("rustci-spawner".into())
            .spawn(move || {
                for mut request in rx {
                    let _runtime = request.runtime.enter();
                    let result = request.command.spawn();
                    drop(request.command);
                    let _ = request.reply.send(result);
                }
            })
            .expect("cannot start the spawner thread");
        tx
    })
}

async fn spawn_on_spawner_thread(
    command: tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    let (reply, answer) = oneshot::channel();
    let request = SpawnRequest {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()
        .send(request)
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    answer
        .await
        .map_err(|_| io::Error::other("spawner thread dropped the request"))?
}

/// Whether a recorded group still holds a process of that attempt; kills it if so.
fn reap_record(path: &Path) -> bool {
    let Some((job, attempt, pgid)) = parse_record(path) else {
        warn!(path = %path.display(), "unreadable pgid record");
        return false;
    };
    if pgid <= 1 || pgid == unsafe { libc::getpgrp() } {
        warn!(pgid, "pgid record names a group we must not kill");
        return false;
    }
    if !group_runs_attempt(pgid, job, attempt) {
        debug!(pgid, job, attempt, "recorded group is gone");
        return false;
    }
    info!(pgid, job, attempt, "killing leftover process group");
    kill_group(pgid);
    true
}

fn parse_record(path: &Path) -> Option<(u64, u32, i32)> {
    let stem = path.file_stem()?.to_str()?;
    let (job, attempt) = stem.split_once('-')?;
    let pgid = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some((job.parse().ok()?, attempt.parse().ok()?, pgid))
}

/// True when a live process in group `pgid` has this attempt's environment.
fn group_runs_attempt(pgid: i32, job: u64, attempt: u32) -> bool {
    let want_job = format!("RUSTCI_JOB_ID={job}");
    let want_attempt = format!("RUSTCI_ATTEMPT={attempt}");
    live_group_members(pgid).into_iter().any(|pid| {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        vars.contains(&want_job.as_bytes()) && vars.contains(&want_attempt.as_bytes())
    })
}

/// Pids of the non-zombie processes whose process group is `pgid`, from /proc.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            matches!(parse_stat(&stat), Some((state, pgrp)) if pgrp == pgid && state != 'Z' && state != 'X')
        })
        .collect()
}

/// `(state, pgrp)` from a /proc/PID/stat line; the command name may contain
/// spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_cap_keeps_everything_up_to_the_cap_exactly() {
        let mut cap = LogCap::new(10);
        assert_eq!(
            cap.admit(4),
            Admitted {
                keep: 4,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(6),
            Admitted {
                keep: 6,
                truncated_now: false
            }
        );
        assert!(!cap.truncated);
    }

    #[test]
    fn log_cap_truncates_once_then_discards_everything() {
        let mut cap = LogCap::new(10);
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 7,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 3,
                truncated_now: true
            }
        );
        assert_eq!(
            cap.admit(7),
            Admitted {
                keep: 0,
                truncated_now: false
            }
        );
        assert_eq!(
            cap.admit(0),
            Admitted {
                keep: 0,
                truncated_now: false
            }
        );
    }

    #[test]
    fn stat_parsing_survives_command_names_with_spaces_and_parens() {
        let stat = "1234 (my (weird) cmd) S 1 4321 4321 0 -1 4194560";
        assert_eq!(parse_stat(stat), Some(('S', 4321)));
    }

    #[test]
    fn meminfo_parsing_reads_mem_total_in_kib() {
        let meminfo = "MemTotal:       16318856 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total_kb(meminfo), Some(16_318_856));
        assert_eq!(parse_mem_total_kb("nothing"), None);
    }

    #[test]
    fn pgid_records_round_trip_through_their_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = pgid_record_path(dir.path(), 42, 3);
        std::fs::write(&path, "777\n").unwrap();
        assert_eq!(parse_record(&path), Some((42, 3, 777)));
    }
}
