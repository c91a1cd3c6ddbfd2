//! `rustci backup --data-dir D --to DIR`: a consistent copy of a data dir,
//! safe while the daemon runs.
//!
//! The log is copied as of ONE redb read transaction (every frame checked on
//! the way): the log as of one commit, a prefix of what was acknowledged,
//! never a torn file. While a daemon runs it holds the file's lock (redb's
//! exclusive-writer mode; the mode that lets other processes read makes
//! every commit two-phase and halved durable appends), so the copy is taken
//! by the daemon itself: the CLI asks it with `POST /v1/backup`, at the
//! address the daemon left in `D/api-address` (or `--server`). With no daemon
//! running, the CLI opens the log read-only and copies it itself, the same
//! way.
//!
//! Also copied: the identity, and job output as far as it is written (output
//! files only grow). Not copied: work dirs, and the runner's records of live
//! processes (a daemon started on the copy must not reap the original's).
//! The copy is built in a hidden sibling directory and renamed to DIR when
//! complete and durable; the CLI then replays it once to verify it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use clap::Args;
use rustci_net::client::Client;
use rustci_net::control::{BackupDone, BackupError};
use rustci_storage::datadir::{sync_dir, write_atomically};
use rustci_storage::{BackupSummary, Identity, LogStore, OpenError};

/// The file in a data dir where a running daemon leaves its API address.
pub const API_ADDRESS_FILE_NAME: &str = "api-address";

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The data dir to copy (the daemon may be running on it).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Where the copy goes: a directory that does not exist yet (or is empty).
    #[arg(long)]
    pub to: PathBuf,
    /// The running daemon's API address; default: the one it left in the data dir.
    #[arg(long)]
    pub server: Option<String>,
    /// API token (sent as `Authorization: Bearer`).
    #[arg(long, env = "RUSTCI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<i32> {
    let to =
        std::path::absolute(&args.to).map_err(|e| anyhow!("--to {}: {e}", args.to.display()))?;
    check_target(&to).map_err(|e| anyhow!("{}", message(e)))?;
    let data_dir = args.data_dir.clone();
    let offline = {
        let (data_dir, to) = (data_dir.clone(), to.clone());
        tokio::task::spawn_blocking(move || {
            crate::daemon::guard_corruption(&data_dir, || {
                match LogStore::open_read_only(&data_dir) {
                    Ok(store) => Ok(Some(
                        make_copy(&data_dir, &to, true, |staging| store.backup_to(staging))
                            .map_err(|e| anyhow!("{}", message(e)))?,
                    )),
                    Err(OpenError::Locked { .. }) => Ok(None),
                    Err(e) => Err(anyhow!("{e}")),
                }
            })
        })
        .await??
    };
    let done = match offline {
        Some(done) => done,
        None => online(&args, &to).await?,
    };
    // Read the copy back through the very replay start-up runs.
    let verified = tokio::task::spawn_blocking(move || {
        let copy = LogStore::open_read_only(&to).map_err(|e| anyhow!("verifying the copy: {e}"))?;
        let state =
            crate::daemon::replay_store(&copy).map_err(|e| anyhow!("verifying the copy: {e}"))?;
        Ok::<_, anyhow::Error>((to, state.digest(), state.applied_index))
    })
    .await??;
    let (to, digest, applied) = verified;
    if applied != done.last_index {
        bail!(
            "verifying the copy: it replays to index {applied}, but {} entries were copied",
            done.last_index
        );
    }
    println!(
        "backed up {} to {}: {} entries up to index {} ({} bytes of entries), {} output files, state_digest={digest:016x}",
        data_dir.display(),
        to.display(),
        done.entries,
        done.last_index,
        done.frame_bytes,
        done.output_files,
    );
    Ok(0)
}

/// Asks the daemon that holds the data dir to take the copy.
async fn online(args: &BackupArgs, to: &Path) -> anyhow::Result<BackupDone> {
    let daemon = Daemon {
        data_dir: &args.data_dir,
        server: args.server.as_deref(),
        token: args.token.clone(),
    };
    copy_through_daemon(&daemon, to, true).await
}

/// A daemon holding a data dir, and how to reach it.
pub struct Daemon<'a> {
    pub data_dir: &'a Path,
    /// Its API address; default: the one it left in the data dir.
    pub server: Option<&'a str>,
    pub token: Option<String>,
}

/// Asks the daemon holding `daemon.data_dir` for a consistent copy at `to`
/// (`POST /v1/backup`), with job output or the log alone.
pub async fn copy_through_daemon(
    daemon: &Daemon<'_>,
    to: &Path,
    output: bool,
) -> anyhow::Result<BackupDone> {
    let data_dir = daemon.data_dir;
    let identity = Identity::read(data_dir)
        .map_err(|(path, reason)| anyhow!("data dir identity {} is unreadable: {reason}", path.display()))?
        .ok_or_else(|| {
            anyhow!(
                "data dir {} is in use by a rustci daemon but has no identity file yet; try again in a moment",
                data_dir.display()
            )
        })?;
    let server = match daemon.server {
        Some(s) => s.to_string(),
        None => {
            let file = data_dir.join(API_ADDRESS_FILE_NAME);
            std::fs::read_to_string(&file)
                .map_err(|e| anyhow!("data dir {} is in use by a running daemon, but its address is unknown ({}: {e}); pass --server", data_dir.display(), file.display()))?
                .trim()
                .to_string()
        }
    };
    let mut client = Client::connect(&server, daemon.token.clone()).await?;
    let body = serde_json::json!({
        "to": to.to_string_lossy(),
        "cluster_id": identity.cluster_id,
        "output": output,
    });
    let done: BackupDone = client
        .json(
            hyper::Method::POST,
            "/v1/backup",
            Some(serde_json::to_vec(&body)?),
            &[],
        )
        .await?;
    Ok(done)
}

fn message(e: BackupError) -> String {
    match e {
        BackupError::Invalid(m) | BackupError::WrongCluster(m) | BackupError::Failed(m) => m,
    }
}

/// `to` must not exist, or be an empty directory.
fn check_target(to: &Path) -> Result<(), BackupError> {
    if !to.exists() {
        return Ok(());
    }
    let empty = to.is_dir()
        && std::fs::read_dir(to)
            .map_err(|e| BackupError::Invalid(format!("cannot read {}: {e}", to.display())))?
            .next()
            .is_none();
    if !empty {
        return Err(BackupError::Invalid(format!(
            "--to {}: exists and is not an empty directory; a backup goes into a new directory",
            to.display()
        )));
    }
    Ok(())
}

/// Builds the copy of `data_dir` at `to`: the log through `copy_log` (one
/// read transaction), the identity, the job output (with `output`); in a
/// hidden sibling directory renamed to `to` once durable. On error nothing
/// is left at `to`.
pub fn make_copy(
    data_dir: &Path,
    to: &Path,
    output: bool,
    copy_log: impl FnOnce(&Path) -> Result<BackupSummary, rustci_storage::Error>,
) -> Result<BackupDone, BackupError> {
    check_target(to)?;
    let failed = |what: String| BackupError::Failed(what);
    let identity = Identity::read(data_dir).map_err(|(path, reason)| {
        failed(format!(
            "data dir identity {} is unreadable: {reason}",
            path.display()
        ))
    })?;
    let name = to
        .file_name()
        .ok_or_else(|| {
            BackupError::Invalid(format!("--to {}: not a directory name", to.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(|e| failed(format!("cannot create {}: {e}", staging.display())))?;
    let result = (|| {
        let summary = copy_log(&staging).map_err(|e| failed(e.to_string()))?;
        if let Some(identity) = &identity {
            identity.write(&staging).map_err(|e| {
                failed(format!(
                    "cannot write the identity into {}: {e}",
                    staging.display()
                ))
            })?;
        }
        let output_files = if output {
            copy_tree(&data_dir.join("output"), &staging.join("output"))?
        } else {
            0
        };
        sync_dir(&staging).map_err(|e| failed(format!("{}: {e}", staging.display())))?;
        if to.exists() {
            std::fs::remove_dir(to)
                .map_err(|e| failed(format!("cannot replace {}: {e}", to.display())))?;
        }
        std::fs::rename(&staging, to).map_err(|e| {
            failed(format!(
                "cannot rename {} to {}: {e}",
                staging.display(),
                to.display()
            ))
        })?;
        sync_dir(&parent).map_err(|e| failed(format!("{}: {e}", parent.display())))?;
        Ok(BackupDone {
            entries: summary.entries,
            last_index: summary.last_index,
            frame_bytes: summary.frame_bytes,
            output_files,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Copies the files under `from` (if it exists) into `to`; returns how many.
/// A file that vanishes meanwhile is skipped.
fn copy_tree(from: &Path, to: &Path) -> Result<u64, BackupError> {
    let io = |p: &Path, e: std::io::Error| BackupError::Failed(format!("{}: {e}", p.display()));
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(from, e)),
    };
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    let mut copied = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io(from, e))?;
        let kind = entry.file_type().map_err(|e| io(&entry.path(), e))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copied += copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            let bytes = match std::fs::read(entry.path()) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&entry.path(), e)),
            };
            write_atomically(&target, &bytes).map_err(|e| io(&target, e))?;
            copied += 1;
        }
    }
    Ok(copied)
}
