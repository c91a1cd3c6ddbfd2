//! Per-attempt control groups (cgroup v1, as this machine has): a memory
//! limit from `memory_mb`, a cpu quota from `cpu_millis`, a pids limit, and
//! the one thing a process group cannot give: a job that calls `setsid` or
//! daemonizes stays in its cgroup, so cancel, time-out and the end of the
//! attempt kill all of it. An attempt killed for its memory ends `oom`.
//!
//! Each attempt's shim puts itself into the attempt's cgroups before it
//! starts the command, so everything the job forks is inside from the first
//! instruction. Without usable cgroups (not mounted, not writable) the
//! runner falls back to process groups and says so once at start.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The controllers used, and what each limits.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// Controllers used where the machine has them: `cpuacct` accounts the
/// attempt's cpu time (where it is mounted with `cpu`, the `cpu` cgroup
/// already has its files).
const OPTIONAL_CONTROLLERS: [&str; 1] = ["cpuacct"];
/// Processes (and threads) one attempt may have at once.
pub const PIDS_MAX: u64 = 4096;
/// The cpu quota's period.
const CPU_PERIOD_US: u64 = 100_000;
/// Rounds of "kill every process in the cgroup" before giving up.
const KILL_ROUNDS_MAX: usize = 50;

/// This runner's cgroups: one directory per controller, under which each
/// attempt gets its own.
#[derive(Debug, PartialEq, Eq)]
pub struct Cgroups {
    /// controller -> this runner's directory.
    roots: Vec<(&'static str, PathBuf)>,
}

impl Cgroups {
    /// Creates this runner's cgroups under `/sys/fs/cgroup/<controller>/`
    /// named `rustci-<instance>`; `None` if cgroup v1 with the memory, cpu
    /// and pids controllers is not there or not writable.
    pub fn detect(instance: &str) -> Option<Cgroups> {
        Self::detect_in(Path::new("/sys/fs/cgroup"), instance)
    }

    fn detect_in(base: &Path, instance: &str) -> Option<Cgroups> {
        let mut roots = Vec::new();
        for controller in CONTROLLERS {
            let dir = base.join(controller);
            if !dir.join("cgroup.procs").is_file() {
                return None;
            }
            reap_dead_runners(controller, &dir);
            let mine = dir.join(format!("rustci-{instance}"));
            std::fs::create_dir_all(&mine).ok()?;
            roots.push((controller, mine));
        }
        for controller in OPTIONAL_CONTROLLERS {
            let dir = base.join(controller);
            // The same hierarchy as one already used (`cpu,cpuacct`).
            let shared = roots
                .iter()
                .any(|(_, r)| r.parent().is_some_and(|p| same_dir(p, &dir)));
            if shared || !dir.join("cgroup.procs").is_file() {
                continue;
            }
            reap_dead_runners(controller, &dir);
            let mine = dir.join(format!("rustci-{instance}"));
            if std::fs::create_dir_all(&mine).is_ok() {
                roots.push((controller, mine));
            }
        }
        Some(Cgroups { roots })
    }

    /// The cgroups of one attempt, created with its limits.
    pub fn attempt(
        &self,
        job: u64,
        attempt: u32,
        memory_mb: u64,
        cpu_millis: u64,
    ) -> io::Result<AttemptCgroup> {
        let mut dirs = Vec::new();
        for (controller, root) in &self.roots {
            let dir = root.join(format!("{job}-{attempt}"));
            // A leftover of a crashed runner: empty it first.
            if dir.exists() {
                let old = AttemptCgroup {
                    dirs: vec![(controller, dir.clone())],
                };
                old.kill_all();
                old.remove();
            }
            std::fs::create_dir(&dir)?;
            match *controller {
                "memory" => {
                    let bytes = memory_mb.saturating_mul(1024 * 1024);
                    std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                    // Best effort: no swap beyond the limit where the kernel
                    // accounts swap.
                    let _ =
                        std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                }
                "cpu" => {
                    let quota = (cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000);
                    std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                }
                "pids" => std::fs::write(dir.join("pids.max"), PIDS_MAX.to_string())?,
                _ => {}
            }
            dirs.push((*controller, dir));
        }
        Ok(AttemptCgroup { dirs })
    }
}

impl Drop for Cgroups {
    /// Removes this runner's (empty) cgroups when it stops.
    fn drop(&mut self) {
        for (_, root) in &self.roots {
            let _ = std::fs::remove_dir(root);
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Cgroups of runners that died (`rustci-<pid>` whose process is gone): what
/// still runs in them is killed and the cgroups are removed, as
/// `NativeRunner::reap_leftovers` does for process groups.
fn reap_dead_runners(controller: &'static str, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("rustci-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let root = entry.path();
        for attempt in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if attempt.path().is_dir() {
                let old = AttemptCgroup {
                    dirs: vec![(controller, attempt.path())],
                };
                old.kill_all();
                old.remove();
            }
        }
        let _ = std::fs::remove_dir(&root);
    }
}

/// One attempt's cgroups.
#[derive(Debug)]
pub struct AttemptCgroup {
    dirs: Vec<(&'static str, PathBuf)>,
}

impl AttemptCgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    fn members(&self) -> Vec<i32> {
        let Some((_, dir)) = self.dirs.first() else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process in the attempt's cgroup, whatever its process
    /// group or session, until none is left (bounded).
    pub fn kill_all(&self) {
        for _ in 0..KILL_ROUNDS_MAX {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                // SAFETY: a plain syscall.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(cgroup = ?self.dirs.first(), "processes survive in the attempt's cgroup");
    }

    /// The kernel killed a process of the attempt for its memory limit.
    pub fn oom_killed(&self) -> bool {
        let Some((_, dir)) = self.dirs.iter().find(|(c, _)| *c == "memory") else {
            return false;
        };
        let control = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap_or_default();
        control
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    /// Peak memory of the attempt, MiB.
    pub fn peak_memory_mb(&self) -> Option<u64> {
        let (_, dir) = self.dirs.iter().find(|(c, _)| *c == "memory")?;
        let bytes: u64 = std::fs::read_to_string(dir.join("memory.max_usage_in_bytes"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(bytes / (1024 * 1024))
    }

    /// Cpu time of the attempt (user plus system), milliseconds, from
    /// `cpuacct.usage` (nanoseconds) wherever a cgroup of it has one.
    pub fn cpu_ms(&self) -> Option<u64> {
        self.dirs.iter().find_map(|(_, dir)| {
            let nanos: u64 = std::fs::read_to_string(dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(nanos / 1_000_000)
        })
    }

    /// Removes the (empty) cgroups.
    pub fn remove(&self) {
        for (_, dir) in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot remove the attempt's cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_controllers_there_are_no_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Cgroups::detect_in(dir.path(), "t").is_none());
    }
}
