//! Reaping what a runner that died left behind, from its pgid records.

use super::*;

/// Whether a recorded group still holds a process of that attempt; kills it if so.
pub(super) fn reap_record(path: &Path) -> bool {
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

pub(super) fn parse_record(path: &Path) -> Option<(u64, u32, i32)> {
    let stem = path.file_stem()?.to_str()?;
    let (job, attempt) = stem.split_once('-')?;
    let pgid = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some((job.parse().ok()?, attempt.parse().ok()?, pgid))
}

/// True when a live process in group `pgid` has this attempt's environment.
pub(super) fn group_runs_attempt(pgid: i32, job: u64, attempt: u32) -> bool {
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
            matches!(parse_stat(&stat), Some((state, _, pgrp)) if pgrp == pgid && state != 'Z' && state != 'X')
        })
        .collect()
}

/// `(state, ppid, pgrp)` from a /proc/PID/stat line; the command name may
/// contain spaces and parentheses, so fields are counted after the last `)`.
pub(super) fn parse_stat(stat: &str) -> Option<(char, i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}
