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
//!   `work_dir`: by default an empty directory created per attempt; with
//!   `Workspace::Dir` a directory of the node the job named, which must
//!   exist and is never created or removed.
//! - **Checkout.** With `Workspace::Checkout` the attempt first runs the
//!   node's `git` in its work dir (`init`, `fetch -- REPO REF`, `checkout
//!   --detach FETCH_HEAD`), each step a process of the attempt like the
//!   command itself: same group, shim, cgroup, env (plus
//!   `GIT_TERMINAL_PROMPT=0`), log, cancel and deadline, and `Started`
//!   goes out when the first step spawns, so the checkout counts toward
//!   the time-out. A failed step ends the attempt `StartFailed` with a
//!   `rustci: the checkout of ... failed: ...` line in its log.
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
//! as the group leader, with `PDEATHSIG = SIGTERM`. The shim is the job's
//! child subreaper (`PR_SET_CHILD_SUBREAPER`): a process the job starts
//! that leaves the group (`setsid`, a daemon's double fork) and loses its
//! parent is re-parented to the shim, so every process of the job stays a
//! descendant of the shim. The shim catches SIGTERM/SIGINT/SIGHUP and then
//! SIGKILLs every descendant (found through `/proc`'s parent links, round
//! after round until none is left) and finally `kill(0, SIGKILL)`: its
//! whole group, itself included, so the job dies with the daemon even
//! without cgroups. It starts the command as its own child in the same
//! group (stdio inherited: the log pipe and `/dev/null`), waits for it,
//! reaping every other descendant that ends, kills what the command left
//! behind, writes what the tree used (`getrusage(RUSAGE_CHILDREN)`) on its
//! status pipe, and exits with the command's status, re-raising the signal
//! if the command was killed by one, so the runner sees the same
//! `exit_code` as without a shim. Cancel and time-out send the shim SIGTERM
//! first (it kills the escapees), then SIGKILL the group as a backstop.
//!
//! With [`RunnerConfig::lease_file`] (a `rustci agent`), the shim also holds
//! the agent's lease: it polls the file's deadline (`CLOCK_BOOTTIME` ms,
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
//! signal N (ours or anyone's) reports `exit_code: Some(-N)`. A signal we did
//! not send gives `Outcome::Exited` with `Some(-N)`; our own kills give
//! `TimedOut` or `Cancelled`. [`NativeRunner::shutdown`] reports `Cancelled`.
//!
//! # Known limits
//!
//! - Without a shim, a process that leaves the job's group (`setsid`,
//!   `setpgid`) escapes every group kill; if it keeps the output pipe open,
//!   the runner stops reading [`DRAIN_AFTER_EXIT_MS`] after the group died and
//!   drops its later output. With a shim it is killed (see above), unless it
//!   makes itself a subreaper too or the shim itself is SIGKILLed from
//!   outside; with cgroups it is killed whatever it does.
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

use rustci_core::model::{Checkout, Outcome, Usage, Workspace};
use rustci_net::disk::{room_for_output, OUTPUT_INCOMPLETE_MARKER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};

pub mod cgroup;
mod output;
mod reap;
mod shim;
mod spawn;

pub use output::truncation_marker;
use output::*;
pub use reap::live_group_members;
use reap::*;
pub use shim::{boot_clock_ms, shim_main, write_lease};
pub use spawn::INHERITED_ENV;
use spawn::*;

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
/// What the shim writes on its status pipe once the command has ended,
/// followed by the usage of the command's process tree: peak resident
/// memory in KiB and cpu time in microseconds, each a little-endian u64.
const SHIM_USAGE_BYTE: u8 = b'U';
/// Environment variable naming the fd (the write end of a pipe whose read
/// end the runner keeps) on which the shim reports a start failure, as one
/// byte, or what the command used. Removed from the job's environment.
const SHIM_STATUS_FD_ENV: &str = "RUSTCI_SHIM_STATUS_FD";
/// Environment variable with the pid of the runner that started the shim, so
/// the shim can tell whether it was orphaned before it could catch SIGTERM.
/// Removed from the job's environment.
const SHIM_PARENT_ENV: &str = "RUSTCI_SHIM_PARENT";
/// Environment variable with the path of the agent's lease file, for the
/// shim. Removed from the job's environment.
const SHIM_LEASE_ENV: &str = "RUSTCI_SHIM_LEASE";
/// Environment variable with the `cgroup.procs` files (a `PATH`-like list)
/// the shim joins before it starts the command. Removed from the job's
/// environment.
const SHIM_CGROUPS_ENV: &str = "RUSTCI_SHIM_CGROUPS";
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
    /// Measured from the moment the attempt's first process spawned (the
    /// first step of its checkout, if it has one).
    pub timeout: Duration,
    /// The process's current directory. The attempt's own (created if
    /// missing, removed after it) unless `workspace` is `Dir`.
    pub work_dir: PathBuf,
    /// What `work_dir` is: the attempt's own, empty (`Fresh`) or holding a
    /// git checkout made before the command runs (`Checkout`), or a
    /// directory of the node the job named (`Dir`, equal to `work_dir`),
    /// which must exist and is never created or removed.
    pub workspace: Workspace,
    /// Output is appended here; parent directories are created.
    pub log_path: PathBuf,
    /// `(memory_mb, cpu_millis)`: the attempt's limits where it runs in its
    /// own cgroup ([`RunnerConfig::cgroups`]); `None`: no limits.
    pub limits: Option<(u64, u64)>,
    /// The lease file of the agent incarnation that runs it, if not
    /// [`RunnerConfig::lease_file`]: each incarnation has its own, so a new
    /// one's lease never renews what an old one left.
    pub lease_file: Option<PathBuf>,
}

impl RunSpec {
    /// An attempt of a job as an agent runs it: its command, env and limits
    /// from the spec; no runner-side time-out (the agent enforces the job's
    /// and reports `timed_out`).
    pub fn for_attempt(
        job: rustci_core::model::JobId,
        attempt: u32,
        spec: rustci_core::model::JobSpec,
        work_dir: PathBuf,
        log_path: PathBuf,
    ) -> RunSpec {
        let work_dir = match &spec.workspace {
            Workspace::Dir(dir) => PathBuf::from(dir),
            Workspace::Fresh | Workspace::Checkout(_) => work_dir,
        };
        RunSpec {
            job: job.0,
            attempt,
            limits: Some((spec.resources.memory_mb, spec.resources.cpu_millis)),
            command: spec.command,
            env: spec.env,
            timeout: TIMEOUT_MAX,
            work_dir,
            workspace: spec.workspace,
            log_path,
            lease_file: None,
        }
    }

    /// True when `work_dir` belongs to the attempt (created for it, removed
    /// after it), false when it is a directory of the node the job named.
    pub fn owns_work_dir(&self) -> bool {
        !matches!(self.workspace, Workspace::Dir(_))
    }
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
        /// What it used: from its cgroup where it had one, else from the
        /// shim's account of the command's process tree (none when the
        /// shim was killed: cancel, time-out, lapse).
        usage: Option<Usage>,
    },
    /// The attempt never started: the node lacked its own resources (file
    /// descriptors, processes, memory, disk) for longer than it waits for
    /// them. Not the job's failure: drivers give the attempt back
    /// (`Agent::handle_not_started`). Sent instead of `Finished`.
    NotStarted {
        job: u64,
        attempt: u32,
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
    /// Per-attempt cgroups (with a shim): limits, containment of escaped
    /// processes, `oom`. `None`: process groups only.
    pub cgroups: Option<Arc<cgroup::Cgroups>>,
    /// Free space (bytes) kept on the output's file system: output stops
    /// below it, marked incomplete (0: none).
    pub disk_reserve_bytes: u64,
    /// How long the work dir of an attempt that did not succeed is kept
    /// (a succeeded attempt's goes at once): see
    /// [`WorkspaceSweeper`].
    pub keep_failed_workspaces: Duration,
}

/// Default of [`RunnerConfig::keep_failed_workspaces`]: one hour.
pub const KEEP_FAILED_WORKSPACES_DEFAULT: Duration = Duration::from_secs(3600);

/// This process's cgroups for attempts, if the machine has usable ones;
/// says once which containment jobs get.
pub fn detect_cgroups() -> Option<Arc<cgroup::Cgroups>> {
    match cgroup::Cgroups::detect(&std::process::id().to_string()) {
        Some(c) => {
            info!("jobs run in their own cgroups (memory, cpu and pids limits)");
            Some(Arc::new(c))
        }
        None => {
            warn!("no usable cgroups (v1 memory, cpu, pids): jobs are contained by process groups, with each attempt's shim as the child subreaper that kills what leaves the group; no memory, cpu or pids limits, and no oom outcome");
            None
        }
    }
}

impl RunnerConfig {
    pub fn new(pid_dir: impl Into<PathBuf>) -> Self {
        Self {
            log_cap_bytes: LOG_CAP_BYTES_DEFAULT,
            pid_dir: pid_dir.into(),
            shim: None,
            lease_file: None,
            cgroups: None,
            disk_reserve_bytes: rustci_net::disk::DISK_RESERVE_BYTES_DEFAULT,
            keep_failed_workspaces: KEEP_FAILED_WORKSPACES_DEFAULT,
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

    /// A handle that removes old work dirs (see [`WorkspaceSweeper`]).
    pub fn workspace_sweeper(&self) -> WorkspaceSweeper {
        WorkspaceSweeper {
            shared: Arc::clone(&self.shared),
            keep: self.config.keep_failed_workspaces,
            reserve: self.config.disk_reserve_bytes,
        }
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

/// How an attempt ended: outcome, exit code, what it used.
type Ended = (Outcome, Option<i32>, Option<Usage>);

/// The attempt could not be started for lack of the node's own resources,
/// however long it waited for them.
struct NotStarted;

/// Why one try to start an attempt failed.
enum Unstarted {
    /// The job's fault (bad executable...): already in its log.
    Job,
    /// The node's: out of descriptors, processes, memory or disk.
    Node(io::Error),
}

/// Errors that are the node's shortage rather than the job's fault.
fn node_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT
        )
    )
}

/// First wait before trying again to start an attempt the node lacked the
/// resources for; it doubles up to the max.
const NODE_SHORTAGE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const NODE_SHORTAGE_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long an attempt waits for the node's resources before it is given
/// back to the control plane (it then runs again, maybe elsewhere, without
/// spending a retry).
const NODE_SHORTAGE_WAIT_MAX: Duration = Duration::from_secs(30);

impl AttemptTask {
    async fn run(self, cancel: oneshot::Receiver<()>) {
        let ended = self.execute(cancel).await;
        // A succeeded attempt's work dir goes at once; others stay for a
        // while, to be looked at (`WorkspaceSweeper`), unless the disk is
        // nearly full: then the log's room comes first.
        let low = self
            .spec
            .work_dir
            .parent()
            .is_some_and(|root| !room_for_output(root, self.config.disk_reserve_bytes));
        let succeeded = matches!(ended, Ok((Outcome::Exited, Some(0), _)));
        if self.spec.owns_work_dir() && (low || succeeded) {
            remove_workspace(&self.spec.work_dir).await;
        }
        let event = match ended {
            Ok((outcome, exit_code, usage)) => {
                info!(?outcome, ?exit_code, ?usage, "attempt finished");
                RunEvent::Finished {
                    job: self.spec.job,
                    attempt: self.spec.attempt,
                    outcome,
                    exit_code,
                    usage,
                }
            }
            Err(NotStarted) => RunEvent::NotStarted {
                job: self.spec.job,
                attempt: self.spec.attempt,
            },
        };
        self.send(event);
        drop(self.guard);
    }

    fn send(&self, event: RunEvent) {
        if self.events.send(event).is_err() {
            debug!("run event receiver dropped");
        }
    }

    /// Prepares the work dir (a checkout, or a look at the node's
    /// directory), then runs the command. Every process of the attempt
    /// shares its deadline, its cancel and its log; `Started` goes out when
    /// the first of them spawns, so a checkout counts toward the time-out.
    async fn execute(&self, mut cancel: oneshot::Receiver<()>) -> Result<Ended, NotStarted> {
        let mut deadline = None;
        match &self.spec.workspace {
            Workspace::Fresh => {}
            Workspace::Dir(dir) => {
                if let Err(why) = usable_workdir(Path::new(dir)) {
                    warn!(workdir = %dir, %why, "the job's workdir is not usable");
                    self.log_line(&format!("rustci: cannot start: {why}\n"))
                        .await;
                    return Ok((Outcome::StartFailed, None, None));
                }
            }
            Workspace::Checkout(checkout) => {
                if let Some(ended) = self.checkout(checkout, &mut cancel, &mut deadline).await? {
                    return Ok(ended);
                }
            }
        }
        self.run_process(&self.spec, &mut cancel, &mut deadline)
            .await
    }

    /// Checks out `checkout` into the work dir with the `git` binary of the
    /// node, one process per step, each run as the command is (its own
    /// group, the shim, the log). `Some` when the attempt ends here: a step
    /// failed (said in the log; `StartFailed`, so the job's own exit codes
    /// keep their meaning), or it was cancelled or timed out.
    async fn checkout(
        &self,
        checkout: &Checkout,
        cancel: &mut oneshot::Receiver<()>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<Option<Ended>, NotStarted> {
        let git_ref = &checkout.git_ref;
        let repo = redact_password(&checkout.repo);
        self.log_line(&format!("rustci: checkout of {repo} at {git_ref}\n"))
            .await;
        for (step, command) in checkout_steps(checkout) {
            let mut env = self.spec.env.clone();
            // No credential prompt can ever be answered: fail instead.
            env.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
            let spec = RunSpec {
                command,
                env,
                ..self.spec.clone()
            };
            let ended = self.run_process(&spec, cancel, deadline).await?;
            let why = match ended {
                (Outcome::Exited, Some(0), _) => continue,
                (Outcome::Exited, Some(code), _) if code < 0 => {
                    format!("`git {step}` was killed by signal {}", -code)
                }
                (Outcome::Exited, Some(code), _) => format!("`git {step}` exited with {code}"),
                (Outcome::StartFailed, ..) => {
                    "git could not be started: is it installed and on the node's PATH?".into()
                }
                (Outcome::Oom, ..) => format!(
                    "`git {step}` was killed for using more memory than the job's memory_mb"
                ),
                // Cancelled, timed out: the attempt ends as it would have.
                (outcome, code, usage) => return Ok(Some((outcome, code, usage))),
            };
            warn!(%repo, %git_ref, %why, "checkout failed");
            self.log_line(&format!(
                "rustci: the checkout of {repo} at {git_ref} failed: {why}; the command was not run\n"
            ))
            .await;
            return Ok(Some((Outcome::StartFailed, None, None)));
        }
        Ok(None)
    }

    /// Appends one line of the runner's own to the attempt's log.
    async fn log_line(&self, line: &str) {
        let written = match open_log(&self.spec.log_path).await {
            Ok(mut log) => write_and_flush(&mut log, line.as_bytes()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            warn!(path = %self.spec.log_path.display(), error = %e, "cannot write log");
        }
    }

    /// Starts one process of the attempt (waiting out a shortage of the
    /// node's own resources) and supervises it to its end. The first to
    /// spawn sends `Started` and sets the attempt's `deadline`.
    async fn run_process(
        &self,
        spec: &RunSpec,
        cancel: &mut oneshot::Receiver<()>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<Ended, NotStarted> {
        let first_try = std::time::Instant::now();
        let mut backoff = NODE_SHORTAGE_BACKOFF_MIN;
        let (log, spawned, cgroup) = loop {
            match self.start(spec).await {
                Ok(started) => break started,
                Err(Unstarted::Job) => return Ok((Outcome::StartFailed, None, None)),
                Err(Unstarted::Node(e)) => {
                    // The node's shortage, not the job's fault: wait for it
                    // to pass, then give the attempt back.
                    if first_try.elapsed() >= NODE_SHORTAGE_WAIT_MAX {
                        warn!(error = %e, "cannot start the attempt for lack of the node's own resources; giving it back");
                        return Err(NotStarted);
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot start the attempt for lack of the node's own resources");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut *cancel => return Ok((Outcome::Cancelled, None, None)),
                    }
                    backoff = (backoff * 2).min(NODE_SHORTAGE_BACKOFF_MAX);
                }
            }
        };
        let record = self.record_pgid(spawned.pgid);
        info!(pgid = spawned.pgid, program = %spec.command[0], "process started");
        let deadline = *deadline.get_or_insert_with(|| {
            self.send(RunEvent::Started {
                job: self.spec.job,
                attempt: self.spec.attempt,
            });
            tokio::time::Instant::now() + self.spec.timeout.min(TIMEOUT_MAX)
        });
        let result = self
            .supervise(spawned, log, cancel, deadline, cgroup.as_ref())
            .await;
        if let Some(c) = &cgroup {
            c.remove();
        }
        if let Some(record) = record {
            if let Err(e) = std::fs::remove_file(&record) {
                warn!(path = %record.display(), error = %e, "cannot remove pgid record");
            }
        }
        Ok(result)
    }

    /// Opens the log, creates the attempt's cgroups and spawns it. A
    /// failure is the job's (a missing executable: it is in the log) or the
    /// node's (no descriptors, processes, memory or disk left).
    async fn start(
        &self,
        spec: &RunSpec,
    ) -> Result<(tokio::fs::File, Spawned, Option<cgroup::AttemptCgroup>), Unstarted> {
        let mut log = match open_log(&spec.log_path).await {
            Ok(log) => log,
            Err(e) if node_shortage(&e) => return Err(Unstarted::Node(e)),
            Err(e) => {
                warn!(path = %spec.log_path.display(), error = %e, "cannot open log");
                return Err(Unstarted::Job);
            }
        };
        let shim = self.config.shim.as_deref();
        let lease = spec
            .lease_file
            .as_deref()
            .or(self.config.lease_file.as_deref());
        let cgroup = self.cgroup();
        let cgroup_procs = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        match spawn_attempt(spec, shim, lease, &cgroup_procs).await {
            Ok(spawned) => Ok((log, spawned, cgroup)),
            Err(e) => {
                if let Some(c) = &cgroup {
                    c.kill_all();
                    c.remove();
                }
                if node_shortage(&e) {
                    return Err(Unstarted::Node(e));
                }
                let program = spec.command.first().map_or("", String::as_str);
                let line = format!("rustci: cannot start {program:?}: {e}\n");
                warn!(error = %e, "cannot start");
                if let Err(e) = write_and_flush(&mut log, line.as_bytes()).await {
                    warn!(error = %e, "cannot write log");
                }
                Err(Unstarted::Job)
            }
        }
    }

    /// Waits for exit, deadline or cancellation; kills the group; drains the output.
    async fn supervise(
        &self,
        spawned: Spawned,
        log: tokio::fs::File,
        cancel: &mut oneshot::Receiver<()>,
        deadline: tokio::time::Instant,
        cgroup: Option<&cgroup::AttemptCgroup>,
    ) -> Ended {
        let Spawned {
            mut child,
            output,
            pgid,
            shim_status,
        } = spawned;
        let (stop_tx, stop_rx) = oneshot::channel();
        let pump = tokio::spawn(
            pump_output(
                output,
                log,
                self.spec.log_path.clone(),
                self.config.log_cap_bytes,
                self.config.disk_reserve_bytes,
                stop_rx,
            )
            .in_current_span(),
        );
        let outcome = tokio::select! {
            biased;
            _ = child.wait() => Outcome::Exited,
            _ = cancel => Outcome::Cancelled,
            _ = tokio::time::sleep_until(deadline) => Outcome::TimedOut,
        };
        // Cancel or time-out with a shim: the shim kills the job's
        // descendants, those that left the group too, then itself; the group
        // kill below is the backstop.
        if outcome != Outcome::Exited && shim_status.is_some() {
            terminate_shim(&mut child, pgid).await;
        }
        // Also on a normal exit: whatever the job left in its group dies now.
        // (Then the leader is already reaped; see "Known limits" on pgid reuse.)
        // Its cgroup also holds what escaped the group (`setsid`, daemons).
        kill_group(pgid);
        if let Some(c) = cgroup {
            c.kill_all();
        }
        let exit_code = match child.wait().await {
            // Killed by signal N: -N (as Python's `returncode`), so the
            // signal is kept; `submit --wait` exits 128 + N for it.
            // Our own kills (cancel, time-out) report no code.
            Ok(status) if outcome == Outcome::Exited => {
                status.code().or_else(|| status.signal().map(|s| -s))
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "cannot wait for the job process");
                None
            }
        };
        finish_output(pump, stop_tx).await;
        let status = shim_status.map(read_shim_status).unwrap_or_default();
        if outcome == Outcome::Exited && status.start_failed {
            warn!("the shim could not start the command");
            return (Outcome::StartFailed, None, None);
        }
        let usage = measured_usage(cgroup, status.usage);
        if let Some(c) = cgroup {
            if outcome == Outcome::Exited && c.oom_killed() {
                warn!("the job exceeded its memory limit and was killed");
                return (Outcome::Oom, exit_code, usage);
            }
        }
        (outcome, exit_code, usage)
    }

    /// The attempt's own cgroups, when the runner has cgroups, a shim to
    /// join them and limits to set; a failure is logged, and the attempt
    /// runs without.
    fn cgroup(&self) -> Option<cgroup::AttemptCgroup> {
        let cgroups = self.config.cgroups.as_ref()?;
        self.config.shim.as_ref()?;
        let (memory_mb, cpu_millis) = self.spec.limits?;
        match cgroups.attempt(self.spec.job, self.spec.attempt, memory_mb, cpu_millis) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "cannot create the attempt's cgroup; running without");
                None
            }
        }
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

/// What an attempt used. Its cgroup saw everything the job started,
/// escapees included, even when the shim was killed; the shim saw the
/// process tree it waited for. Each value comes from the cgroup when it has
/// it.
fn measured_usage(cgroup: Option<&cgroup::AttemptCgroup>, shim: Option<Usage>) -> Option<Usage> {
    let Some(c) = cgroup else {
        return shim;
    };
    let peak = c.peak_memory_mb().or(shim.map(|u| u.peak_memory_mb));
    let cpu = c.cpu_ms().or(shim.map(|u| u.cpu_ms));
    match (peak, cpu) {
        (None, None) => None,
        (peak, cpu) => Some(Usage {
            peak_memory_mb: peak.unwrap_or(0),
            cpu_ms: cpu.unwrap_or(0),
        }),
    }
}

/// Whether the node's directory a job named (`workdir`) can be run in;
/// the reason, in words, when not.
fn usable_workdir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("workdir {} is not a directory", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "workdir {} does not exist on this node",
            dir.display()
        )),
        Err(e) => Err(format!("workdir {} cannot be used: {e}", dir.display())),
    }
}

/// `repo` with the password of a `scheme://user:password@host/...` URL
/// masked, for the job's log (the spec, like its `env`, keeps it).
fn redact_password(repo: &str) -> String {
    let Some((scheme, rest)) = repo.split_once("://") else {
        return repo.to_string();
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return repo.to_string();
    };
    let Some((user, _password)) = userinfo.split_once(':') else {
        return repo.to_string();
    };
    let path = &rest[authority.len()..];
    format!("{scheme}://{user}:***@{host}{path}")
}

/// The git commands of a checkout into the current directory, each with a
/// short name for messages. The repository and the ref come after `--`,
/// and validation refused any that starts with `-`, so neither can be
/// taken for an option. Fetching the one ref (not cloning) lets it be a
/// branch, a tag or a full commit id alike.
fn checkout_steps(checkout: &Checkout) -> Vec<(&'static str, Vec<String>)> {
    let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    vec![
        ("init", args(&["git", "init", "--quiet"])),
        (
            "fetch",
            args(&[
                "git",
                "fetch",
                "--no-tags",
                "--",
                &checkout.repo,
                &checkout.git_ref,
            ]),
        ),
        (
            "checkout",
            args(&[
                "git",
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                "--detach",
                "FETCH_HEAD",
            ]),
        ),
        (
            "log",
            args(&[
                "git",
                "--no-pager",
                "log",
                "-1",
                "--format=rustci: checked out %H (%s)",
            ]),
        ),
    ]
}

/// How often drivers sweep old work dirs, at most...
pub const WORKSPACE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// ...and at least: a short keep time is swept more often, never busily.
pub const WORKSPACE_SWEEP_INTERVAL_MIN: Duration = Duration::from_secs(1);
const _: () =
    assert!(WORKSPACE_SWEEP_INTERVAL_MIN.as_millis() <= WORKSPACE_SWEEP_INTERVAL.as_millis());

/// Removes the work dirs of attempts that ended a while ago; cheap to clone.
#[derive(Clone)]
pub struct WorkspaceSweeper {
    shared: Arc<Shared>,
    keep: Duration,
    /// Below this much free space, kept work dirs go whatever their age.
    reserve: u64,
}

impl WorkspaceSweeper {
    /// Removes the work dirs under `root` (named `<job>-<attempt>`) of
    /// attempts not running here whose last change is older than
    /// [`RunnerConfig::keep_failed_workspaces`]: what failed attempts (and
    /// a runner that died) left. Returns how many it removed. Drivers call
    /// it at start and then every [`WorkspaceSweeper::interval`].
    pub async fn sweep(&self, root: &Path) -> usize {
        let keep = if room_for_output(root, self.reserve) {
            self.keep
        } else {
            Duration::ZERO
        };
        let running: Vec<AttemptKey> = self
            .shared
            .attempts
            .lock()
            .expect("runner lock")
            .keys()
            .copied()
            .collect();
        let root = root.to_path_buf();
        let removed = tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&root) else {
                return 0;
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(key) = name
                    .split_once('-')
                    .and_then(|(j, a)| Some((j.parse::<u64>().ok()?, a.parse::<u32>().ok()?)))
                else {
                    continue;
                };
                if running.contains(&key) {
                    continue;
                }
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= keep);
                if old && std::fs::remove_dir_all(entry.path()).is_ok() {
                    removed += 1;
                }
            }
            removed
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            info!(
                removed,
                "removed the work dirs of attempts past their keep time"
            );
        }
        removed
    }

    /// How often [`WorkspaceSweeper::run`] sweeps: half the keep time,
    /// within [`WORKSPACE_SWEEP_INTERVAL_MIN`] and
    /// [`WORKSPACE_SWEEP_INTERVAL`], so a failed attempt's work dir goes
    /// at most half its keep time (or a second) late, and within a minute
    /// of it for long ones.
    pub fn interval(&self) -> Duration {
        (self.keep / 2).clamp(WORKSPACE_SWEEP_INTERVAL_MIN, WORKSPACE_SWEEP_INTERVAL)
    }

    /// Sweeps `root` now and then every [`WorkspaceSweeper::interval`],
    /// forever (spawn it).
    pub async fn run(self, root: PathBuf) {
        let every = self.interval();
        loop {
            self.sweep(&root).await;
            tokio::time::sleep(every).await;
        }
    }
}

/// Removes an attempt's work dir (off the async threads: it may be big).
async fn remove_workspace(dir: &Path) {
    let dir = dir.to_path_buf();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err((dir, e)),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err((dir, e))) = removed {
        warn!(dir = %dir.display(), error = %e, "cannot remove the work dir");
    }
}

/// How long a shim may take to kill its job's descendants when asked.
const SHIM_STOP_GRACE: Duration = Duration::from_secs(2);

/// Asks the shim (the group leader, `pid` = `pgid`) to stop the job: SIGTERM
/// makes it kill every descendant, escapees included, and then itself.
async fn terminate_shim(child: &mut tokio::process::Child, pgid: i32) {
    // SAFETY: a plain syscall on the shim's pid (still our unreaped child).
    unsafe {
        libc::kill(pgid, libc::SIGTERM);
    }
    if tokio::time::timeout(SHIM_STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        warn!(pgid, "the shim did not stop in time; killing its group");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_command_names_with_spaces_and_parens() {
        let stat = "1234 (my (weird) cmd) S 1 4321 4321 0 -1 4194560";
        assert_eq!(parse_stat(stat), Some(('S', 1, 4321)));
    }

    #[test]
    fn meminfo_parsing_reads_mem_total_in_kib() {
        let meminfo = "MemTotal:       16318856 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total_kb(meminfo), Some(16_318_856));
        assert_eq!(parse_mem_total_kb("nothing"), None);
    }

    #[test]
    fn a_checkout_url_shows_no_password_in_the_log() {
        for (repo, shown) in [
            (
                "https://user:s3cret@example.com/org/p.git",
                "https://user:***@example.com/org/p.git",
            ),
            (
                "https://token@example.com/p.git",
                "https://token@example.com/p.git",
            ),
            ("https://example.com/p.git", "https://example.com/p.git"),
            ("git@example.com:org/p.git", "git@example.com:org/p.git"),
            ("/srv/git/p@v2", "/srv/git/p@v2"),
            ("ssh://git:pw@h:22/p", "ssh://git:***@h:22/p"),
        ] {
            assert_eq!(redact_password(repo), shown);
        }
    }

    #[test]
    fn pgid_records_round_trip_through_their_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = pgid_record_path(dir.path(), 42, 3);
        std::fs::write(&path, "777\n").unwrap();
        assert_eq!(parse_record(&path), Some((42, 3, 777)));
    }
}
