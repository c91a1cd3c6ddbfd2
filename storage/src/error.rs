//! One error enum per operation, plus the umbrella [`Error`]. Every message
//! names the file (and, for entries, the index) it is about.

use std::path::PathBuf;

use crate::frame::{FrameError, FrameFault};

/// A failure inside redb, with the file it happened on and what we were doing.
/// Damage is told in terms of the file and its index (the B-tree that maps
/// log indexes to frames), never in redb's internal words alone.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe_db_error(op, path, source))]
pub struct DbError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: Box<redb::Error>,
}

fn describe_db_error(op: &str, path: &std::path::Path, source: &redb::Error) -> String {
    match source {
        redb::Error::Corrupted(detail) => corrupt_file_message(path, detail),
        redb::Error::Io(e) => format!("{op} on {path}: {e}", path = path.display()),
        other => format!("{op} on {path}: {other}", path = path.display()),
    }
}

/// The one wording for a log file whose structure (not one entry) is
/// damaged: start-up, `rustci replay` and `rustci backup` all use it.
pub fn corrupt_file_message(path: &std::path::Path, detail: &str) -> String {
    format!(
        "the log file {} is corrupt: its index is damaged ({detail}); keep the file for inspection and restore the data dir from a backup",
        path.display()
    )
}

impl DbError {
    pub(crate) fn new(
        op: &'static str,
        path: &std::path::Path,
        source: impl Into<redb::Error>,
    ) -> Self {
        Self {
            op,
            path: path.to_path_buf(),
            source: Box::new(source.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("data dir {data_dir} is in use by another rustci process (lock {lock})")]
    Locked { data_dir: PathBuf, lock: PathBuf },
    #[error("cannot create data dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no log at {path} (nothing to open read-only)")]
    Missing { path: PathBuf },
    #[error("data dir {data_dir} belongs to cluster {cluster_id} (see its identity file) but its log {path} is {what}: refusing to start a new cluster over it; restore the log from a backup, or move the data dir away to start afresh")]
    LogLost {
        data_dir: PathBuf,
        path: PathBuf,
        cluster_id: String,
        what: &'static str,
    },
    #[error("the log {path} belongs to cluster {log_cluster_id}, not to this data dir's cluster {cluster_id}: refusing to start")]
    ForeignLog {
        path: PathBuf,
        log_cluster_id: String,
        cluster_id: String,
    },
    #[error("data dir identity {path} is unreadable: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("{}", crate::error::corrupt_file_message(path, detail))]
    Damaged { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to} for a read-only replay: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    HardState(#[from] HardStateError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A frame failed its checks; it is never returned as an entry.
    #[error("corrupt log entry at index {index} in {path}: {reason}")]
    Corrupt {
        index: u64,
        path: PathBuf,
        reason: FrameFault,
    },
    /// The stored indexes skip a number: an entry is missing.
    #[error("log in {path} has a gap: expected index {expected}, found {found}")]
    Gap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// Entries asked for are behind the snapshot: compaction removed them.
    #[error("log in {path}: entries from index {from} are compacted; the log starts at {first} (after its snapshot)")]
    Compacted {
        path: PathBuf,
        from: u64,
        first: u64,
    },
    /// The stored snapshot (or its record) fails its checks.
    #[error("snapshot in {path} is corrupt: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ReadError {
    pub(crate) fn corrupt(path: &std::path::Path, e: FrameError) -> Self {
        ReadError::Corrupt {
            index: e.index,
            path: path.to_path_buf(),
            reason: e.fault,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    #[error("append to {path}: entry at position {position} has index {found}, expected {expected} (entries must follow the last index contiguously)")]
    NotContiguous {
        path: PathBuf,
        position: usize,
        expected: u64,
        found: u64,
    },
    #[error("append to {path}: entry {index} has term {term}, below the preceding term {previous} (terms never decrease)")]
    TermDecreased {
        path: PathBuf,
        index: u64,
        term: u64,
        previous: u64,
    },
    #[error("append to {path}: batch of {entries} entries exceeds the limit of {max}")]
    BatchTooLarge {
        path: PathBuf,
        entries: usize,
        max: usize,
    },
    #[error("append to {path}: entry {index} is {bytes} bytes framed, over the limit of {max}")]
    EntryTooLarge {
        path: PathBuf,
        index: u64,
        bytes: usize,
        max: usize,
    },
    #[error("append to {path}: frame for entry {index} does not decode: {fault}")]
    BadFrame {
        path: PathBuf,
        index: u64,
        fault: FrameFault,
    },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Why [`crate::LogStore::persist`] refused or failed; the log is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error(transparent)]
    Truncate(#[from] TruncateError),
    #[error(transparent)]
    HardState(#[from] HardStateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotStoreError),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TruncateError {
    #[error("truncate {path} from index {from_index}: entries up to the commit index {commit} are committed and never removed")]
    Committed {
        path: PathBuf,
        from_index: u64,
        commit: u64,
    },
    #[error("truncate {path} from index {from_index}: entries up to the snapshot at index {snapshot_index} are compacted into it and never removed")]
    Compacted {
        path: PathBuf,
        from_index: u64,
        snapshot_index: u64,
    },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Why storing a snapshot ([`crate::LogStore::compact_to`], or an install
/// in [`crate::LogStore::persist_with_snapshot`]) was refused or failed; the
/// log and the stored snapshot are unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotStoreError {
    #[error("snapshot at index {index} in {path}: the log ends at {last_index}; compaction needs the entry it covers (a leader's snapshot is installed instead)")]
    BeyondLog {
        path: PathBuf,
        index: u64,
        last_index: u64,
    },
    #[error(
        "snapshot at index {index} in {path}: its term {term} is not the entry's term {stored:?}"
    )]
    TermMismatch {
        path: PathBuf,
        index: u64,
        term: u64,
        stored: Option<u64>,
    },
    #[error("snapshot at index {index} in {path}: it would go back behind {kept} (the stored snapshot or commit index)")]
    Stale {
        path: PathBuf,
        index: u64,
        kept: u64,
    },
    #[error("snapshot at index {index} in {path} is {bytes} bytes, over the limit of {max}")]
    TooLarge {
        path: PathBuf,
        index: u64,
        bytes: usize,
        max: usize,
    },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardStateError {
    #[error("hard state in {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: FrameFault },
    #[error("hard state in {path}: term {term} is below the stored term {stored} (terms never decrease)")]
    TermDecreased {
        path: PathBuf,
        term: u64,
        stored: u64,
    },
    #[error(
        "hard state in {path}: already voted for {voted_for:?} in term {term} (one vote per term)"
    )]
    VoteChanged {
        path: PathBuf,
        term: u64,
        voted_for: Option<u64>,
    },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Any storage error, for callers that do not care which operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Truncate(#[from] TruncateError),
    #[error(transparent)]
    HardState(#[from] HardStateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotStoreError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Db(#[from] DbError),
}
