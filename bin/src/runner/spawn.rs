//! Starting an attempt: the command (or the shim around it) as a process
//! group leader with a clean environment, forked on one spawner thread so
//! that `PDEATHSIG` follows the runner.

use super::*;

/// Creates the work dir, builds the command and forks on the spawner thread.
pub(super) async fn spawn_attempt(
    spec: &RunSpec,
    shim: Option<&Path>,
    lease: Option<&Path>,
    cgroup_procs: &[PathBuf],
) -> io::Result<Spawned> {
    if spec.command.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    }
    // The attempt's own work dir is made here; a node's directory the job
    // named was checked before and is never created.
    if spec.owns_work_dir() {
        tokio::fs::create_dir_all(&spec.work_dir).await?;
    }
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
            if !cgroup_procs.is_empty() {
                let joined = std::env::join_paths(cgroup_procs).map_err(io::Error::other)?;
                command.env(SHIM_CGROUPS_ENV, joined);
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

pub(super) fn build_command(
    spec: &RunSpec,
    output: io::PipeWriter,
) -> io::Result<tokio::process::Command> {
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
pub(super) fn build_shim_command(
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
pub(super) fn configure_leader(
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
pub(super) fn die_with_parent(parent: libc::pid_t, deathsig: libc::c_int) -> io::Result<()> {
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
pub(super) fn check_executable(
    program: &str,
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> io::Result<()> {
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

pub(super) enum Probe {
    Executable,
    Missing,
    Denied,
    Unsure,
}

pub(super) fn probe_executable(path: &Path) -> Probe {
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

pub(super) fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the shim said on its status pipe.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ShimStatus {
    /// The command could not be started.
    pub start_failed: bool,
    /// What the command's process tree used, once it ended.
    pub usage: Option<Usage>,
}

/// Called once the shim has exited: reads what it reported. (The write end
/// is closed, so this never blocks.)
pub(super) fn read_shim_status(mut status: io::PipeReader) -> ShimStatus {
    let mut bytes = Vec::with_capacity(17);
    // At most one record; a short or odd read reports nothing.
    let _ = (&mut status).take(64).read_to_end(&mut bytes);
    parse_shim_status(&bytes)
}

pub(super) fn parse_shim_status(bytes: &[u8]) -> ShimStatus {
    match bytes {
        [SHIM_START_FAILED_BYTE, ..] => ShimStatus {
            start_failed: true,
            usage: None,
        },
        [SHIM_USAGE_BYTE, rest @ ..] if rest.len() == 16 => {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[i * 8..i * 8 + 8]);
                u64::from_le_bytes(b)
            };
            ShimStatus {
                start_failed: false,
                usage: Some(Usage {
                    peak_memory_mb: word(0).div_ceil(1024),
                    cpu_ms: word(1) / 1000,
                }),
            }
        }
        _ => ShimStatus::default(),
    }
}

/// The usage record the shim writes once its command has ended: the
/// resources of every descendant it (and they) waited for.
pub(super) fn shim_usage_record() -> [u8; 17] {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1_000_000 + t.tv_usec.max(0) as u64;
    let cpu_us = micros(usage.ru_utime) + micros(usage.ru_stime);
    let peak_kb = usage.ru_maxrss.max(0) as u64;
    let mut record = [0u8; 17];
    record[0] = SHIM_USAGE_BYTE;
    record[1..9].copy_from_slice(&peak_kb.to_le_bytes());
    record[9..17].copy_from_slice(&cpu_us.to_le_bytes());
    record
}

/// One fork request for the spawner thread.
pub(super) struct SpawnRequest {
    command: tokio::process::Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, and tokio
/// threads come and go (blocking pool, `block_in_place`). So all forks happen
/// on this one thread, which lives as long as the process.
pub(super) fn spawner() -> &'static std_mpsc::Sender<SpawnRequest> {
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

pub(super) async fn spawn_on_spawner_thread(
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
