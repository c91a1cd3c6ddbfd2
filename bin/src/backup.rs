//! `rustci backup --data-dir D --to DIR`: a consistent copy of a data dir,
//! safe while the daemon runs.
//!
//! The daemon opens `log.redb` in redb's single-writer mode, which lets other
//! processes open it read-only and read consistent snapshots while it
//! writes. The copy of the log is taken in ONE read transaction (every frame
//! checked on the way), so it is the log as of one commit: a prefix of
//! what the daemon acknowledged, never a torn file. The identity is copied,
//! and so is job output as far as it is written (output files only grow).
//! Work dirs and the runner's records of live processes are not copied: a
//! daemon started on the copy must not reap the original's processes.
//!
//! The copy is built in a hidden sibling directory and renamed to DIR when
//! complete and durable, then read back and replayed once to verify it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use rustci_storage::datadir::{sync_dir, write_atomically};
use rustci_storage::{Identity, LogStore};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The data dir to copy (the daemon may be running on it).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Where the copy goes: a directory that does not exist yet (or is empty).
    #[arg(long)]
    pub to: PathBuf,
}

pub fn run(args: BackupArgs) -> anyhow::Result<i32> {
    let dir = args.data_dir.clone();
    crate::daemon::guard_corruption(&dir, || run_inner(args))
}

fn run_inner(args: BackupArgs) -> anyhow::Result<i32> {
    let BackupArgs { data_dir, to } = args;
    if to.exists() {
        let empty = to.is_dir()
            && std::fs::read_dir(&to)
                .with_context(|| format!("cannot read {}", to.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "--to {}: exists and is not an empty directory; a backup goes into a new directory",
                to.display()
            );
        }
    }
    let identity = Identity::read(&data_dir).map_err(|(path, reason)| {
        anyhow!(
            "data dir identity {} is unreadable: {reason}",
            path.display()
        )
    })?;
    let store = LogStore::open_read_only(&data_dir).map_err(|e| anyhow!("{e}"))?;
    let name = to
        .file_name()
        .ok_or_else(|| anyhow!("--to {}: not a directory name", to.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let result = (|| {
        let summary = store.backup_to(&staging).map_err(|e| anyhow!("{e}"))?;
        drop(store);
        if let Some(identity) = &identity {
            identity
                .write(&staging)
                .with_context(|| format!("cannot write the identity into {}", staging.display()))?;
        }
        let outputs = copy_tree(&data_dir.join("output"), &staging.join("output"))?;
        sync_dir(&staging)?;
        if to.exists() {
            std::fs::remove_dir(&to).with_context(|| format!("cannot replace {}", to.display()))?;
        }
        std::fs::rename(&staging, &to)
            .with_context(|| format!("cannot rename {} to {}", staging.display(), to.display()))?;
        sync_dir(&parent)?;
        Ok::<_, anyhow::Error>((summary, outputs))
    })();
    let (summary, outputs) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // Read the copy back through the very replay start-up runs.
    let copy = LogStore::open_read_only(&to).map_err(|e| anyhow!("verifying the copy: {e}"))?;
    let state =
        crate::daemon::replay_store(&copy).map_err(|e| anyhow!("verifying the copy: {e}"))?;
    println!(
        "backed up {} to {}: {} entries up to index {} ({} bytes of entries), {} output files, state_digest={:016x}",
        data_dir.display(),
        to.display(),
        summary.entries,
        summary.last_index,
        summary.frame_bytes,
        outputs,
        state.digest()
    );
    Ok(0)
}

/// Copies the files under `from` (if it exists) into `to`; returns how many.
/// A file that vanishes meanwhile is skipped.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<u64> {
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", from.display())),
    };
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut copied = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copied += copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            let bytes = match std::fs::read(entry.path()) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot read {}", entry.path().display()))
                }
            };
            write_atomically(&target, &bytes)
                .with_context(|| format!("cannot write {}", target.display()))?;
            copied += 1;
        }
    }
    Ok(copied)
}
