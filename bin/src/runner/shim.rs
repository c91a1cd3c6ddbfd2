//! The per-attempt shim (`rustci __shim -- CMD...`): the job's supervisor,
//! which dies with the runner, takes the job's group with it, holds the
//! agent's lease, and is the job's child subreaper: whatever the job
//! starts stays its descendant (a `setsid` or daemonized process that
//! loses its parent is re-parented to the shim, not to init), so it can
//! kill all of it even without cgroups.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// Set by the terminating signals' handler; the wait loop acts on it.
static TERMINATING: AtomicBool = AtomicBool::new(false);
/// How often the shim's wait loop looks at its children, the signal flag
/// and the lease.
const SHIM_POLL: Duration = Duration::from_millis(10);
/// Rounds of "kill every descendant" before the shim gives up on them.
const DESCENDANT_KILL_ROUNDS_MAX: usize = 100;

/// The shim: `rustci __shim -- CMD ARGS...` runs this with `CMD ARGS...`.
/// Starts the command as its child in its own process group (becoming the
/// group's leader first if it is not), and on SIGTERM, SIGINT or SIGHUP
/// (SIGTERM is its `PDEATHSIG` when the runner starts it) SIGKILLs every
/// descendant (escapees from the group included) and then its whole group,
/// itself included. When the command ends, what it left running is killed
/// the same way. Returns the command's exit code; if the command
/// was killed by a signal the shim dies of the same signal instead of
/// returning. If the command cannot be started: writes
/// `rustci: cannot start "CMD": ERROR` to stderr, reports it on the status
/// fd if the runner gave one, and returns [`SHIM_START_FAILED_EXIT`].
pub fn shim_main(args: Vec<OsString>) -> i32 {
    // Nothing the shim inherited but stdio reaches the job (its status fd
    // is made close-on-exec too, below).
    crate::procenv::cloexec_inherited_fds();
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
        .env_remove(SHIM_LEASE_ENV)
        .env_remove(SHIM_CGROUPS_ENV);
    // Join the attempt's cgroups first: whatever the job starts is inside.
    if let Some(files) = std::env::var_os(SHIM_CGROUPS_ENV) {
        let me = std::process::id().to_string();
        for file in std::env::split_paths(&files) {
            if let Err(e) = std::fs::write(&file, &me) {
                let _ = writeln!(
                    io::stderr(),
                    "rustci: shim: cannot join {}: {e}",
                    file.display()
                );
            }
        }
    }
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
    let status = match wait_for_job(&mut child, lease.as_deref()) {
        Ok(status) => status,
        Err(e) => {
            let _ = writeln!(io::stderr(), "rustci: shim: cannot wait for the job: {e}");
            stop_everything();
        }
    };
    // Whatever the job left running (in its group or escaped from it) ends
    // with it; it is all accounted in the usage below.
    kill_descendants();
    if let Some(mut pipe) = status_pipe {
        let _ = pipe.write_all(&shim_usage_record());
    }
    if let Some(code) = status.code() {
        return code;
    }
    match status.signal() {
        Some(signal) => die_of(signal),
        None => SHIM_INTERNAL_ERROR_EXIT,
    }
}

/// Waits for the job's command, reaping every other descendant that ends
/// meanwhile (as a subreaper must). Stops everything on a terminating
/// signal, and once the agent's lease deadline (in `lease`, if given) has
/// passed: the agent that should have renewed it may be paused, or cut off
/// from the control plane, which will run the job elsewhere. No readable
/// deadline counts as lapsed: fail closed.
fn wait_for_job(
    child: &mut std::process::Child,
    lease: Option<&Path>,
) -> io::Result<std::process::ExitStatus> {
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    let mut lease_checked = std::time::Instant::now();
    loop {
        if TERMINATING.load(Ordering::SeqCst) {
            stop_everything();
        }
        if let Some(status) = reap_children(pid)? {
            return Ok(status);
        }
        if let Some(lease) = lease.filter(|_| lease_checked.elapsed() >= SHIM_LEASE_POLL) {
            lease_checked = std::time::Instant::now();
            if read_lease(lease).is_none_or(|deadline| boot_clock_ms() >= deadline) {
                let _ = writeln!(
                    io::stderr(),
                    "rustci: the agent's lease lapsed; the job is killed"
                );
                stop_everything();
            }
        }
        std::thread::sleep(SHIM_POLL);
    }
}

/// Reaps every child that has ended; the wait status of `main` if it is
/// one of them.
fn reap_children(main: libc::pid_t) -> io::Result<Option<std::process::ExitStatus>> {
    let mut found = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status it is given.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return Ok(found),
            -1 => {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECHILD) if found.is_some() => Ok(found),
                    _ => Err(e),
                };
            }
            pid if pid == main => found = Some(std::process::ExitStatus::from_raw(status)),
            _ => {}
        }
    }
}

/// Kills every descendant of the shim (the job's group and whatever left
/// it), and reaps them, until none is left or the rounds run out.
pub(super) fn kill_descendants() {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for _ in 0..DESCENDANT_KILL_ROUNDS_MAX {
        let _ = reap_children(0);
        let pids = descendants_of(me);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: a plain syscall.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = writeln!(io::stderr(), "rustci: shim: processes of the job survive");
}

/// Kills everything of the job, then the shim's group with the shim.
fn stop_everything() -> ! {
    kill_descendants();
    kill_own_group();
    // SIGKILL of ourselves does not return; this is for the type checker.
    std::process::exit(SHIM_INTERNAL_ERROR_EXIT)
}

/// Live (non-zombie) descendants of `root`, from /proc.
pub(super) fn descendants_of(root: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: BTreeMap<libc::pid_t, Vec<libc::pid_t>> = BTreeMap::new();
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, ppid, _)) = parse_stat(&stat) {
            if state != 'Z' && state != 'X' {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(parent) = todo.pop() {
        for child in children.remove(&parent).unwrap_or_default() {
            found.push(child);
            todo.push(child);
        }
    }
    found
}

/// Milliseconds on `CLOCK_BOOTTIME`: one clock for every process of this
/// machine, so the agent and the shims agree on a deadline, and one that
/// keeps counting while the machine is suspended (`CLOCK_MONOTONIC` stops,
/// and a lease would outlive a suspend while the control plane moves the
/// work elsewhere).
pub fn boot_clock_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing into `ts`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Records the lease deadline (`CLOCK_BOOTTIME` ms) for the shims: written
/// to a temporary file and renamed, so a reader never sees half of it.
pub fn write_lease(path: &Path, deadline_ms: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, deadline_ms.to_string())?;
    std::fs::rename(&tmp, path)
}

pub(super) fn read_lease(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub(super) fn shim_start_failed(
    program: &str,
    error: &io::Error,
    status_pipe: Option<std::fs::File>,
) -> i32 {
    let _ = writeln!(io::stderr(), "rustci: cannot start {program:?}: {error}");
    if let Some(mut pipe) = status_pipe {
        let _ = pipe.write_all(&[SHIM_START_FAILED_BYTE]);
    }
    SHIM_START_FAILED_EXIT
}

/// Process group leadership, signal handlers, and the orphan check.
pub(super) fn shim_setup() -> io::Result<()> {
    // SAFETY: plain syscalls; the handler only stores to an atomic
    // (async-signal-safe).
    unsafe {
        // kill(0) must never hit the group of whoever started us by hand.
        if libc::getpgrp() != libc::getpid() && libc::setpgid(0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Orphans of the job come to us, not to init: nothing it starts
        // leaves our sight.
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
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

/// Only raises the flag (async-signal-safe); the wait loop kills the job's
/// descendants and the group within [`SHIM_POLL`].
pub(super) extern "C" fn on_terminating_signal(_signal: libc::c_int) {
    TERMINATING.store(true, Ordering::SeqCst);
}

/// SIGKILLs the shim's process group: the shim and everything of the job.
/// Async-signal-safe.
pub(super) fn kill_own_group() {
    // SAFETY: kill is async-signal-safe; shim_setup made us the group leader.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// The status fd the runner passed, marked close-on-exec so the job does not
/// inherit it.
pub(super) fn take_status_fd() -> Option<std::fs::File> {
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
pub(super) fn die_of(signal: libc::c_int) -> i32 {
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
