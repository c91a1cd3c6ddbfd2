//! The data dir's disk, as job output sees it: free space, the reserve kept
//! for the log, and the lines that mark output that is not all there.
//!
//! The event log is what must never stop growing for want of space, so job
//! output (stored by the runner of `rustci dev`, or shipped by agents to
//! the control plane) stops being written while the file system holding it
//! has less free space than the reserve, and says so in the output itself:
//! a reader never takes cut output for a complete one.

use std::path::Path;

/// Default space kept free for the log: job output stops below it (and
/// below a quarter of the file system, whichever is less).
pub const DISK_RESERVE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

/// Written once at the end of output that stopped for want of disk space.
pub const OUTPUT_INCOMPLETE_MARKER: &str =
    "\n[rustci: output incomplete: the disk is nearly full; the rest was not kept]\n";

/// The empty file beside an output file that says its output is not all
/// there, for when not even [`OUTPUT_INCOMPLETE_MARKER`] could be written
/// (a full disk still has room for an empty file's entry).
pub fn incomplete_path(log: &Path) -> std::path::PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".incomplete");
    std::path::PathBuf::from(name)
}

/// What an evicted attempt's output is replaced with.
pub fn evicted_marker(quota_bytes: u64) -> String {
    format!(
        "[rustci: this attempt's output was evicted to keep stored output under its quota of {} MiB]\n",
        quota_bytes / (1024 * 1024)
    )
}

/// Bytes available to unprivileged writers on the file system of `path`
/// (or of its nearest existing ancestor); `None` if it cannot be read.
pub fn free_bytes(path: &Path) -> Option<u64> {
    space(path).map(|(free, _)| free)
}

/// (free, total) bytes of the file system of `path` or of its nearest
/// existing ancestor.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut dir = Some(path);
    while let Some(d) = dir {
        if d.exists() {
            let mut c = d.as_os_str().as_bytes().to_vec();
            c.push(0);
            // SAFETY: `c` is NUL-terminated; statvfs fills the struct given.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statvfs(c.as_ptr().cast(), &mut st) };
            if rc != 0 {
                return None;
            }
            let unit = st.f_frsize as u64;
            return Some((
                (st.f_bavail as u64).saturating_mul(unit),
                (st.f_blocks as u64).saturating_mul(unit),
            ));
        }
        dir = d.parent();
    }
    None
}

/// Whether output may still be written under `dir`: the free space stays
/// above `reserve` bytes (0: no reserve). An unreadable file system counts
/// as having room (writes then fail or not on their own).
pub fn room_for_output(dir: &Path, reserve: u64) -> bool {
    reserve == 0 || free_bytes(dir).is_none_or(|free| free > reserve)
}

/// The reserve to keep under `dir` for a configured one: at most a quarter
/// of the file system, so that a small disk stays usable.
pub fn effective_reserve(dir: &Path, configured: u64) -> u64 {
    space(dir).map_or(configured, |(_, total)| configured.min(total / 4))
}

/// Default quota of all stored job output.
pub const OUTPUT_QUOTA_BYTES_DEFAULT: u64 = 10 * 1024 * 1024 * 1024;
/// Output files changed this recently may still be written: never evicted.
pub const EVICT_QUIET: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the output store is checked against its quota.
pub const OUTPUT_JANITOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps the output files under `root` (`<job>/<attempt>.log`) within
/// `quota` bytes in all: while over it, the oldest (by last change, and
/// quiet for at least `quiet`) is replaced by [`evicted_marker`]. Returns
/// (bytes stored after, files evicted).
pub fn evict_over_quota(root: &Path, quota: u64, quiet: std::time::Duration) -> (u64, usize) {
    let mut files = Vec::new();
    for job in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(job.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let changed = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.push((changed, meta.len(), file.path()));
        }
    }
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    if total <= quota {
        return (total, 0);
    }
    files.sort();
    let marker = evicted_marker(quota);
    let mut evicted = 0;
    for (changed, len, path) in files {
        if total <= quota {
            break;
        }
        let quiet_enough = changed.elapsed().is_ok_and(|age| age >= quiet);
        if !quiet_enough || len <= marker.len() as u64 {
            continue;
        }
        if std::fs::write(&path, &marker).is_ok() {
            total = total - len + marker.len() as u64;
            evicted += 1;
        }
    }
    (total, evicted)
}

/// Checks the output store under `root` against `quota` now and then every
/// [`OUTPUT_JANITOR_INTERVAL`], forever (spawn it).
pub async fn run_output_janitor(root: std::path::PathBuf, quota: u64) {
    loop {
        let dir = root.clone();
        let done =
            tokio::task::spawn_blocking(move || evict_over_quota(&dir, quota, EVICT_QUIET)).await;
        if let Ok((total, evicted @ 1..)) = done {
            tracing::warn!(
                evicted,
                stored_bytes = total,
                quota,
                "evicted the oldest job output to stay within the output quota"
            );
        }
        tokio::time::sleep(OUTPUT_JANITOR_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_from_the_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let missing = dir.path().join("a/b/c");
        assert!(free_bytes(&missing).is_some());
        assert!(room_for_output(&missing, 0));
        assert!(room_for_output(&missing, 1));
        assert!(!room_for_output(&missing, u64::MAX));
    }

    #[test]
    fn the_oldest_output_is_evicted_first_down_to_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let write = |job: u32, attempt: u32, bytes: usize, age_secs: u64| {
            let path = dir
                .path()
                .join(job.to_string())
                .join(format!("{attempt}.log"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![b'x'; bytes]).unwrap();
            let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(when).unwrap();
            path
        };
        let oldest = write(1, 1, 4000, 300);
        let older = write(2, 1, 4000, 200);
        let fresh = write(3, 1, 4000, 0);
        // Under the quota: nothing happens.
        assert_eq!(
            evict_over_quota(dir.path(), 20_000, EVICT_QUIET),
            (12_000, 0)
        );
        // Over it: the oldest goes first, and only as many as needed.
        let (total, evicted) = evict_over_quota(dir.path(), 9_000, EVICT_QUIET);
        assert_eq!(evicted, 1);
        assert!(total <= 9_000);
        let marker = evicted_marker(9_000);
        assert_eq!(std::fs::read_to_string(&oldest).unwrap(), marker);
        assert_eq!(std::fs::read(&older).unwrap().len(), 4000);
        // What is still being written is never evicted, even over quota.
        let (total, evicted) = evict_over_quota(dir.path(), 1, EVICT_QUIET);
        assert_eq!(evicted, 1, "only the quiet one");
        assert_eq!(std::fs::read(&fresh).unwrap().len(), 4000);
        assert!(total > 1);
    }
}
