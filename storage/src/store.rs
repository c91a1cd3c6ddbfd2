//! [`LogStore`]: the redb file that holds the log and the hard state.

use std::fs::{File, OpenOptions, TryLockError};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    ConcurrencyMode, Database, DatabaseError, Durability, ReadOnlyDatabase, ReadTransaction,
    ReadableDatabase, ReadableTable, TableDefinition, TableError,
};
use rustci_core::event::{Entry, LogIndex, ReplicaId, Term};
pub use rustci_core::raft::SnapshotMeta;
use serde::{Deserialize, Serialize};

use crate::datadir::{self, Identity, CLEAN_SHUTDOWN_FILE_NAME};
use crate::error::{
    AppendError, DbError, HardStateError, OpenError, PersistError, ReadError, SnapshotStoreError,
    TruncateError,
};
use crate::frame::{self, FRAME_HEADER_BYTES};

/// Frames keyed by log index. Keys are contiguous from `first_index` to `last_index`.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// The parts of frames too large to store inline, keyed by (index, part):
/// the entry's value in [`ENTRIES`] is then a split record (see [`split_record`]).
const ENTRY_PARTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("entry_parts");
/// Small named values (the hard state), each a frame under [`META_FRAME_KEY`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_HARD_STATE: &str = "hard_state";
/// The cluster id of the data dir's identity, so a log can be matched to it.
const META_CLUSTER_ID: &str = "cluster_id";
/// The checksum key of meta frames: no log entry has index 0.
const META_FRAME_KEY: u64 = 0;
/// The one stored snapshot: under [`SNAPSHOT_RECORD`] a frame (key 0) of
/// [`SnapshotRecord`], under [`SNAPSHOT_DATA`] the snapshot's bytes. The log
/// then starts right after the snapshot's index. Created by the first
/// compaction or install; older files have no such table and no snapshot.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const SNAPSHOT_RECORD: &str = "record";
const SNAPSHOT_DATA: &str = "data";

/// The redb file inside the data dir.
pub const LOG_FILE_NAME: &str = "log.redb";
/// The file a writer holds an exclusive lock on for as long as it runs.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Most entries one [`LogStore::append`] takes: one write transaction and one
/// fsync. Callers with more split them.
pub const APPEND_BATCH_ENTRIES_MAX: usize = 65_536;
/// Frames up to this size are stored inline in `entries`; larger ones are
/// split into parts of this size in `entry_parts`. redb gives a value that
/// does not fit a 4 KiB page a page of the next power of two, and copies
/// the leaf on every later append: one 320 KiB frame per transaction made
/// the file 2.8 times the frames (docs/benchmarks.md). A part fills one page.
pub const FRAME_PART_BYTES: usize = 3968;
/// First byte of a split record: never a frame version.
const SPLIT_MARKER: u8 = 0xC5;
const SPLIT_RECORD_BYTES: usize = 1 + 4 + 4;
/// Largest frame accepted for one entry (a job spec with a large env fits).
pub const ENTRY_FRAME_BYTES_MAX: usize = 1 << 20;
/// Most entries one [`LogStore::read_range`] returns, whatever is asked.
pub const READ_RANGE_ENTRIES_MAX: usize = 65_536;
/// redb page cache; a full replay reads each page once, so it need not hold the log.
pub const DB_CACHE_BYTES: usize = 256 << 20;
/// How processes share `log.redb`: the writer excludes every other process.
/// redb's single-writer mode would let other processes read while the
/// daemon writes, but it makes every commit two-phase (two fsyncs):
/// measured, it halved durable appends (p50 8.0 ms instead of 2.1-3.9 ms).
/// So a live copy is taken by the daemon itself (`POST /v1/backup`).
const CONCURRENCY: ConcurrencyMode = ConcurrencyMode::ExclusiveWriter;

/// Largest snapshot stored: redb keeps a value's length in 32 bits.
pub const SNAPSHOT_STORED_BYTES_MAX: usize = 3 << 30;

const _: () = assert!(ENTRY_FRAME_BYTES_MAX > FRAME_HEADER_BYTES);
const _: () = assert!(SNAPSHOT_STORED_BYTES_MAX < u32::MAX as usize);
const _: () = assert!(APPEND_BATCH_ENTRIES_MAX <= READ_RANGE_ENTRIES_MAX);

/// What [`SNAPSHOT_RECORD`] holds: which entry the snapshot covers, and the
/// length and CRC-32 of its bytes, so a damaged snapshot is found by the
/// store whatever the bytes mean (storage never interprets them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    index: LogIndex,
    term: Term,
    bytes: u64,
    crc32: u32,
}

/// A snapshot received from a leader, for [`LogStore::persist_with_snapshot`]
/// to install: it replaces the whole stored log.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotInstall<'a> {
    pub meta: SnapshotMeta,
    pub bytes: &'a [u8],
}

/// What Raft must have on disk before it answers a message: the current term,
/// the vote cast in it, and the highest index known committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<ReplicaId>,
    pub commit: LogIndex,
}

enum Db {
    Write(Database),
    ReadOnly(ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> Result<ReadTransaction, redb::TransactionError> {
        match self {
            Db::Write(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }
}

/// The event log of one replica: framed entries in redb plus the hard state.
///
/// Field order matters for drop: the database closes before the lock file is
/// released, so a successor never opens a file we still write.
pub struct LogStore {
    /// Shared with the [`LogReadHandle`]s, which never lock anything the
    /// writer holds: a panic in the writer cannot poison a reader.
    db: Arc<Db>,
    /// Held with an exclusive `try_lock` for the life of a writable store;
    /// `None` for read-only stores, which never create files.
    _lock: Option<File>,
    /// A repaired private copy of the log, when a read-only open found a file
    /// that was not closed cleanly; removed on drop.
    _copy: Option<tempfile::TempDir>,
    /// Set by `open_read_only`: every write is refused.
    read_only: bool,
    data_dir: PathBuf,
    /// `data_dir/log.redb`, named in every error (also when reading a copy).
    path: PathBuf,
    /// The stored snapshot's `{index, term}`, if any. The log then starts
    /// at `index + 1` (`first_index`), and an empty log ends at the
    /// snapshot (`last_index`, `last_term`).
    snapshot: Option<SnapshotMeta>,
    /// Index of the oldest stored entry; `last_index + 1` when the log is empty.
    first_index: LogIndex,
    /// Index of the newest stored entry; 0 when the log is empty.
    last_index: LogIndex,
    /// Term of the entry at `last_index`; 0 when the log is empty.
    last_term: Term,
    /// Cached copy of what is durable in `meta`.
    hard_state: HardState,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("snapshot", &self.snapshot)
            .field("first_index", &self.first_index)
            .field("last_index", &self.last_index)
            .field("last_term", &self.last_term)
            .field("hard_state", &self.hard_state)
            .finish()
    }
}

impl LogStore {
    /// Opens (creating if needed) the log in `data_dir`, holding `data_dir/LOCK`
    /// exclusively until the store is dropped.
    ///
    /// The data dir's identity (`data_dir/identity`, see [`Identity`]) and the
    /// log must belong together: a data dir with an identity whose log is
    /// missing, empty or another cluster's is refused with
    /// [`OpenError::LogLost`] or [`OpenError::ForeignLog`], and nothing is
    /// written. A new data dir gets both, the log first (built under a temp
    /// name, so a failed creation, a full disk for instance, leaves nothing
    /// that blocks the next start), then the identity. A data dir from before
    /// identities, with entries in its log, is adopted: it gets an identity.
    ///
    /// Unless the previous writer closed the log cleanly ([`LogStore::close_clean`]
    /// left its marker), redb's integrity check runs over the whole file
    /// first, so damage is found here, not later by the log writer.
    pub fn open(data_dir: &Path) -> Result<LogStore, OpenError> {
        LogStore::open_with(data_dir, || Identity::generate(1))
    }

    /// [`LogStore::open`], where a new data dir gets the identity `new`
    /// makes (a replica of a cluster: the cluster's id and its own replica
    /// id) instead of a random cluster id and replica 1.
    pub fn open_with(
        data_dir: &Path,
        new: impl FnOnce() -> std::io::Result<Identity>,
    ) -> Result<LogStore, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(|source| OpenError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join(LOG_FILE_NAME);
        let identity_path = data_dir.join(datadir::IDENTITY_FILE_NAME);
        // Leftovers of a creation or identity write that did not finish.
        let _ = std::fs::remove_file(datadir::temp_path(&path));
        let _ = std::fs::remove_file(datadir::temp_path(&identity_path));
        let mut identity = Identity::read(data_dir)
            .map_err(|(path, reason)| OpenError::Identity { path, reason })?;
        let log_len = match std::fs::metadata(&path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(OpenError::Io { path, source }),
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, source }
        };
        let mut created = false;
        match (&identity, log_len) {
            (Some(id), None | Some(0)) => {
                return Err(OpenError::LogLost {
                    data_dir: data_dir.to_path_buf(),
                    path,
                    cluster_id: id.cluster_id.clone(),
                    what: if log_len.is_none() {
                        "missing"
                    } else {
                        "empty (0 bytes)"
                    },
                });
            }
            (None, None | Some(0)) => {
                // A new data dir (a 0-byte log without an identity holds nothing).
                let id = new().map_err(io(&identity_path))?;
                create_log_file(&path, &id.cluster_id)?;
                id.write(data_dir).map_err(io(&identity_path))?;
                tracing::info!(data_dir = %data_dir.display(), cluster_id = %id.cluster_id, "created a new data dir");
                identity = Some(id);
                created = true;
            }
            (_, Some(_)) => {}
        }
        let marker = data_dir.join(CLEAN_SHUTDOWN_FILE_NAME);
        let was_clean = marker.exists();
        if was_clean {
            // Gone before anything is written: a crash from here on is unclean.
            std::fs::remove_file(&marker).map_err(io(&marker))?;
            datadir::sync_dir(data_dir).map_err(io(data_dir))?;
        }
        let mut db = Database::builder()
            .set_cache_size(DB_CACHE_BYTES)
            .set_concurrency_mode(CONCURRENCY)
            .open(&path)
            .map_err(|e| open_failed(data_dir, &path, e))?;
        if !was_clean && !created {
            check_integrity(&mut db, &path)?;
        }
        create_tables(&db, &path)?;
        let mut store = LogStore::new(Db::Write(db), Some(lock), None, false, data_dir, path);
        store.load()?;
        store.match_identity(identity)?;
        tracing::info!(
            path = %store.path.display(),
            first_index = store.first_index,
            last_index = store.last_index,
            last_term = store.last_term,
            "log opened"
        );
        Ok(store)
    }

    /// Checks that the log belongs to the data dir's identity, and completes
    /// whichever of the two is missing when that is safe.
    fn match_identity(&mut self, identity: Option<Identity>) -> Result<(), OpenError> {
        let stored = self.read_cluster_id()?;
        let data_dir = self.data_dir.clone();
        let identity_path = data_dir.join(datadir::IDENTITY_FILE_NAME);
        match (identity, stored) {
            (Some(id), Some(stored)) if id.cluster_id != stored => Err(OpenError::ForeignLog {
                path: self.path.clone(),
                log_cluster_id: stored,
                cluster_id: id.cluster_id,
            }),
            (Some(_), Some(_)) => Ok(()),
            (Some(id), None) if self.last_index == 0 => Err(OpenError::LogLost {
                data_dir,
                path: self.path.clone(),
                cluster_id: id.cluster_id,
                what: "empty (no entries and no cluster id)",
            }),
            (Some(id), None) => self.write_cluster_id(&id.cluster_id),
            (None, Some(stored)) => {
                // The creation stopped between the log and the identity.
                let mut id = Identity::generate(1).map_err(|source| OpenError::Io {
                    path: identity_path.clone(),
                    source,
                })?;
                id.cluster_id = stored;
                id.write(&data_dir).map_err(|source| OpenError::Io {
                    path: identity_path,
                    source,
                })
            }
            (None, None) => {
                // A data dir from before identities: adopt it.
                let id = Identity::generate(1).map_err(|source| OpenError::Io {
                    path: identity_path.clone(),
                    source,
                })?;
                id.write(&data_dir).map_err(|source| OpenError::Io {
                    path: identity_path,
                    source,
                })?;
                self.write_cluster_id(&id.cluster_id)?;
                tracing::info!(data_dir = %data_dir.display(), cluster_id = %id.cluster_id, entries = self.last_index, "adopted a data dir written before identities");
                Ok(())
            }
        }
    }

    /// The cluster id stored inside the log, if any.
    pub fn read_cluster_id(&self) -> Result<Option<String>, OpenError> {
        let txn = self.begin_read()?;
        let Some(meta) = open_read_table(&txn, META, &self.path)? else {
            return Ok(None);
        };
        let stored = meta
            .get(META_CLUSTER_ID)
            .map_err(|e| self.db_err("read cluster id", e))?;
        let Some(frame) = stored else {
            return Ok(None);
        };
        let id: String = frame::decode_value(META_FRAME_KEY, frame.value()).map_err(|e| {
            OpenError::Identity {
                path: self.path.clone(),
                reason: format!("the cluster id stored in the log is corrupt: {}", e.fault),
            }
        })?;
        Ok(Some(id))
    }

    fn write_cluster_id(&mut self, cluster_id: &str) -> Result<(), OpenError> {
        let Db::Write(db) = &*self.db else {
            unreachable!("only writable stores are matched to an identity");
        };
        write_cluster_id(db, &self.path, cluster_id)?;
        Ok(())
    }

    /// Closes the log and leaves the clean-shutdown marker, so the next start
    /// skips the integrity check. Without the marker (a crash, or a reader
    /// handle still open here) the next start runs it.
    pub fn close_clean(self) {
        let data_dir = self.data_dir.clone();
        let LogStore { db, _lock, .. } = self;
        let Ok(db) = Arc::try_unwrap(db) else {
            tracing::warn!(data_dir = %data_dir.display(), "log readers are still open: the next start checks the log's integrity");
            return;
        };
        drop(db);
        let marker = data_dir.join(CLEAN_SHUTDOWN_FILE_NAME);
        if let Err(e) = datadir::write_atomically(&marker, b"the log was closed cleanly\n") {
            tracing::warn!(error = %e, "cannot leave the clean-shutdown marker: the next start checks the log's integrity");
        }
        drop(_lock);
    }

    /// A handle for reading the log from other threads, sharing no lock with
    /// the writer (redb read transactions are snapshots).
    pub fn reader(&self) -> LogReadHandle {
        LogReadHandle {
            db: self.db.clone(),
            path: self.path.clone(),
        }
    }

    /// Opens the log for reading only (`rustci replay`). NEVER writes to the
    /// data dir: no LOCK file, no repair of `log.redb`.
    ///
    /// A cleanly closed log is opened in place with redb's `ReadOnlyDatabase`.
    /// A log whose writer crashed needs a repair that redb will not do
    /// read-only, so it is copied to a private temp dir and the copy is
    /// repaired and read (and deleted on drop). A log a live writer holds is
    /// refused with [`OpenError::Locked`]: copying it mid-commit could tear.
    pub fn open_read_only(data_dir: &Path) -> Result<LogStore, OpenError> {
        let path = data_dir.join(LOG_FILE_NAME);
        if !path.is_file() {
            return Err(OpenError::Missing { path });
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(OpenError::LogLost {
                data_dir: data_dir.to_path_buf(),
                path,
                cluster_id: Identity::read(data_dir)
                    .ok()
                    .flatten()
                    .map(|i| i.cluster_id)
                    .unwrap_or_else(|| "unknown".into()),
                what: "empty (0 bytes)",
            });
        }
        let opened = redb::Builder::new()
            .set_cache_size(DB_CACHE_BYTES)
            .set_concurrency_mode(CONCURRENCY)
            .open_read_only(&path);
        let (db, copy) = match opened {
            Ok(db) => (Db::ReadOnly(db), None),
            Err(DatabaseError::RepairAborted) => {
                let (db, copy) = open_repaired_copy(data_dir, &path)?;
                (Db::Write(db), Some(copy))
            }
            Err(e) => return Err(open_failed(data_dir, &path, e)),
        };
        let mut store = LogStore::new(db, None, copy, true, data_dir, path);
        store.load()?;
        Ok(store)
    }

    fn new(
        db: Db,
        lock: Option<File>,
        copy: Option<tempfile::TempDir>,
        read_only: bool,
        data_dir: &Path,
        path: PathBuf,
    ) -> LogStore {
        LogStore {
            db: Arc::new(db),
            _lock: lock,
            _copy: copy,
            read_only,
            data_dir: data_dir.to_path_buf(),
            path,
            snapshot: None,
            first_index: 1,
            last_index: 0,
            last_term: 0,
            hard_state: HardState::default(),
        }
    }

    /// Reads the bounds of the log and the hard state into the cache.
    fn load(&mut self) -> Result<(), OpenError> {
        let txn = self.begin_read()?;
        if let Some(table) = open_read_table(&txn, ENTRIES, &self.path)? {
            let first = table
                .first()
                .map_err(|e| self.db_err("read first entry", e))?;
            let last = table
                .last()
                .map_err(|e| self.db_err("read last entry", e))?;
            if let (Some((first, _)), Some((last, stored))) = (first, last) {
                let parts = open_read_table(&txn, ENTRY_PARTS, &self.path)?;
                let bytes = assemble(last.value(), stored.value(), parts.as_ref(), &self.path)?;
                let entry = frame::decode_entry(last.value(), &bytes)
                    .map_err(|e| ReadError::corrupt(&self.path, e))?;
                self.first_index = first.value();
                self.last_index = entry.index;
                self.last_term = entry.term;
            }
        }
        if let Some(meta) = open_read_table(&txn, META, &self.path)? {
            let stored = meta
                .get(META_HARD_STATE)
                .map_err(|e| self.db_err("read hard state", e))?;
            if let Some(frame) = stored {
                self.hard_state =
                    frame::decode_value(META_FRAME_KEY, frame.value()).map_err(|e| {
                        HardStateError::Corrupt {
                            path: self.path.clone(),
                            reason: e.fault,
                        }
                    })?;
            }
        }
        if let Some(record) = read_snapshot_record(&txn, &self.path)? {
            self.load_snapshot(record)?;
        }
        assert!(self.first_index >= 1 && self.first_index <= self.last_index + 1);
        Ok(())
    }

    /// Sets the bounds from the stored snapshot: the log must start right
    /// after it, or be empty (it ends at the snapshot then).
    fn load_snapshot(&mut self, record: SnapshotRecord) -> Result<(), OpenError> {
        let meta = SnapshotMeta {
            index: record.index,
            term: record.term,
        };
        if self.last_index == 0 {
            self.first_index = meta.index + 1;
            self.last_index = meta.index;
            self.last_term = meta.term;
        } else if self.first_index != meta.index + 1 || self.last_term < meta.term {
            return Err(ReadError::Snapshot {
                path: self.path.clone(),
                reason: format!(
                    "the snapshot covers up to index {} (term {}) but the log starts at index {} (last term {})",
                    meta.index, meta.term, self.first_index, self.last_term
                ),
            }
            .into());
        }
        self.snapshot = Some(meta);
        Ok(())
    }

    // ----- getters -------------------------------------------------------

    /// Index of the oldest stored entry; `last_index() + 1` when empty.
    pub fn first_index(&self) -> LogIndex {
        self.first_index
    }

    /// Index of the newest stored entry; 0 when the log is empty.
    pub fn last_index(&self) -> LogIndex {
        self.last_index
    }

    /// Term of the newest stored entry; 0 when the log is empty.
    pub fn last_term(&self) -> Term {
        self.last_term
    }

    /// The `log.redb` file (the original, also when a read-only open reads a copy).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The durable hard state (all zero / `None` in a new log).
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The stored snapshot's `{index, term}`, if any (no read: cached).
    pub fn snapshot_meta(&self) -> Option<SnapshotMeta> {
        self.snapshot
    }

    /// The stored snapshot and its bytes, checked against their stored
    /// length and CRC-32; `None` if there is none.
    pub fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ReadError> {
        let txn = self.begin_read()?;
        read_snapshot(&txn, &self.path)
    }

    /// The term of the entry at `index`: `Some(0)` for index 0 (the empty
    /// prefix), the snapshot's term at its index, `None` outside
    /// `first_index..=last_index` otherwise.
    pub fn term_at(&self, index: LogIndex) -> Result<Option<Term>, ReadError> {
        if index == 0 {
            return Ok(Some(0));
        }
        if let Some(snapshot) = self.snapshot.filter(|s| s.index == index) {
            return Ok(Some(snapshot.term));
        }
        if index < self.first_index || index > self.last_index {
            return Ok(None);
        }
        if index == self.last_index {
            return Ok(Some(self.last_term));
        }
        let entries = self.read_range(index, 1)?;
        assert!(entries.len() == 1 && entries[0].index == index);
        Ok(Some(entries[0].term))
    }

    // ----- writes --------------------------------------------------------

    /// Appends `entries` in ONE write transaction committed with immediate
    /// durability: one fsync for the whole batch (group commit). When this
    /// returns `Ok`, every entry is on disk.
    ///
    /// Precondition (checked, the log is unchanged on error): indexes run
    /// contiguously from `last_index() + 1`, terms never decrease (also
    /// against `last_term()`), at most [`APPEND_BATCH_ENTRIES_MAX`] entries.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), AppendError> {
        self.check_batch(entries.iter().map(|e| (e.index, e.term)))?;
        // Encode before the write transaction opens.
        let frames: Vec<Vec<u8>> = entries.iter().map(frame::encode_entry).collect();
        self.commit_frames(
            entries
                .iter()
                .zip(&frames)
                .map(|(e, f)| (e.index, e.term, f.as_slice())),
        )
    }

    /// Like [`LogStore::append`] for frames the caller made with
    /// [`crate::encode_entry`] (for instance off the writer's thread).
    /// `(index, term, frame)`: the header and checksum of each frame are
    /// verified against `index`, the payload is trusted to hold `term`.
    pub fn append_frames(
        &mut self,
        frames: &[(LogIndex, Term, Vec<u8>)],
    ) -> Result<(), AppendError> {
        self.check_batch(frames.iter().map(|(i, t, _)| (*i, *t)))?;
        for (index, _, bytes) in frames {
            frame::open_frame(*index, bytes).map_err(|e| AppendError::BadFrame {
                path: self.path.clone(),
                index: e.index,
                fault: e.fault,
            })?;
        }
        self.commit_frames(frames.iter().map(|(i, t, f)| (*i, *t, f.as_slice())))
    }

    /// Makes one Raft persist unit durable in ONE write transaction (one
    /// fsync): drops the stored entries from `truncate_from` on, appends
    /// `entries`, stores `hard_state`, each when given. All of it or none of
    /// it is on disk afterwards.
    ///
    /// Refused, with the log unchanged: truncating at or below the stored
    /// commit index or the snapshot, entries that do not follow the
    /// (truncated) log or whose terms decrease, more than
    /// [`APPEND_BATCH_ENTRIES_MAX`] entries, a hard state whose term goes
    /// back or that changes a vote cast in its term.
    pub fn persist(
        &mut self,
        truncate_from: Option<LogIndex>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), PersistError> {
        self.persist_with_snapshot(None, truncate_from, entries, hard_state)
    }

    /// [`LogStore::persist`] with, first, the install of a snapshot received
    /// from a leader: it is stored and the WHOLE log is dropped, so the log
    /// ends at the snapshot (`first_index = index + 1`, `last_index = index`,
    /// `last_term = term`) and `entries` must follow it. One transaction, one
    /// fsync, in Raft's order: install, truncate, append, hard state.
    ///
    /// An install is refused ([`SnapshotStoreError::Stale`]) below the
    /// stored snapshot or the stored commit index: the log holds committed
    /// entries it would lose.
    pub fn persist_with_snapshot(
        &mut self,
        install: Option<SnapshotInstall<'_>>,
        truncate_from: Option<LogIndex>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), PersistError> {
        if self.read_only {
            return Err(AppendError::ReadOnly {
                path: self.path.clone(),
            }
            .into());
        }
        if let Some(install) = &install {
            self.check_install(install)?;
        }
        // The log as the install leaves it: empty, ending at the snapshot.
        let (last_index, last_term, snapshot_index) = match &install {
            Some(i) => (i.meta.index, i.meta.term, i.meta.index),
            None => (
                self.last_index,
                self.last_term,
                self.snapshot.map_or(0, |s| s.index),
            ),
        };
        let truncate = truncate_from.filter(|&from| from <= last_index);
        let (base_index, base_term) = match truncate {
            Some(from) => {
                if from <= self.hard_state.commit {
                    return Err(TruncateError::Committed {
                        path: self.path.clone(),
                        from_index: from,
                        commit: self.hard_state.commit,
                    }
                    .into());
                }
                if from <= snapshot_index {
                    return Err(TruncateError::Compacted {
                        path: self.path.clone(),
                        from_index: from,
                        snapshot_index,
                    }
                    .into());
                }
                // No install here: after one the log is empty, so `from`
                // would be past its end.
                let term = self.term_at(from - 1).map_err(TruncateError::from)?;
                (from - 1, term.unwrap_or(0))
            }
            None => (last_index, last_term),
        };
        self.check_batch_after(
            base_index,
            base_term,
            entries.iter().map(|e| (e.index, e.term)),
        )?;
        if let Some(h) = hard_state {
            self.check_hard_state(h)?;
        }
        let frames: Vec<Vec<u8>> = entries.iter().map(frame::encode_entry).collect();
        let Db::Write(db) = &*self.db else {
            unreachable!("read-only stores are refused above");
        };
        let path = &self.path;
        let mut txn = db.begin_write().map_err(err(path, "begin persist"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(err(path, "set durability"))?;
        if let Some(install) = &install {
            write_snapshot(&txn, path, install.meta, install.bytes)?;
        }
        {
            let mut table = txn.open_table(ENTRIES).map_err(err(path, "open entries"))?;
            let mut parts = txn
                .open_table(ENTRY_PARTS)
                .map_err(err(path, "open entry parts"))?;
            if install.is_some() {
                table
                    .retain(|_, _| false)
                    .map_err(err(path, "remove entries"))?;
                parts
                    .retain(|_, _| false)
                    .map_err(err(path, "remove entry parts"))?;
            }
            if let Some(from) = truncate {
                table
                    .retain_in(from.., |_, _| false)
                    .map_err(err(path, "remove entries"))?;
                parts
                    .retain_in((from, 0).., |_, _| false)
                    .map_err(err(path, "remove entry parts"))?;
            }
            let frames = entries
                .iter()
                .zip(&frames)
                .map(|(e, f)| (e.index, e.term, f.as_slice()));
            insert_frames(&mut table, &mut parts, frames, path, &self.data_dir)?;
        }
        if let Some(h) = hard_state {
            let bytes = frame::encode_value(META_FRAME_KEY, h);
            let mut meta = txn.open_table(META).map_err(err(path, "open meta"))?;
            meta.insert(META_HARD_STATE, bytes.as_slice())
                .map_err(err(path, "write hard state"))?;
        }
        if install.is_some() && crate::fault::take_snapshot_panic(&self.data_dir) {
            panic!("injected fault: a panic before a snapshot install commits");
        }
        txn.commit().map_err(err(path, "commit persist"))?;
        if let Some(install) = &install {
            tracing::info!(path = %self.path.display(), index = install.meta.index, term = install.meta.term, bytes = install.bytes.len(), "snapshot installed; the log was replaced");
            self.snapshot = Some(install.meta);
            self.first_index = install.meta.index + 1;
        }
        if let Some(from) = truncate {
            tracing::info!(path = %self.path.display(), from_index = from, "log suffix truncated");
        }
        let (last_index, last_term) = entries
            .last()
            .map_or((base_index, base_term), |e| (e.index, e.term));
        self.last_index = last_index;
        self.last_term = last_term;
        if last_index == 0 {
            self.first_index = 1;
        }
        if let Some(h) = hard_state {
            self.hard_state = *h;
        }
        self.assert_bounds();
        Ok(())
    }

    /// The relations between the cached bounds and the snapshot.
    fn assert_bounds(&self) {
        assert!(self.first_index >= 1 && self.first_index <= self.last_index + 1);
        if let Some(s) = self.snapshot {
            assert_eq!(
                self.first_index,
                s.index + 1,
                "the log starts after its snapshot"
            );
            assert!(self.last_index >= s.index && self.last_term >= s.term);
        }
    }

    fn check_install(&self, install: &SnapshotInstall<'_>) -> Result<(), SnapshotStoreError> {
        let kept = self
            .hard_state
            .commit
            .max(self.snapshot.map_or(0, |s| s.index));
        if install.meta.index < kept {
            return Err(SnapshotStoreError::Stale {
                path: self.path.clone(),
                index: install.meta.index,
                kept,
            });
        }
        self.check_snapshot_size(install.meta.index, install.bytes)
    }

    fn check_snapshot_size(&self, index: LogIndex, bytes: &[u8]) -> Result<(), SnapshotStoreError> {
        if bytes.len() > SNAPSHOT_STORED_BYTES_MAX {
            return Err(SnapshotStoreError::TooLarge {
                path: self.path.clone(),
                index,
                bytes: bytes.len(),
                max: SNAPSHOT_STORED_BYTES_MAX,
            });
        }
        Ok(())
    }

    /// Installs a snapshot received from a leader and nothing else: as
    /// [`LogStore::persist_with_snapshot`] with no truncation, entries or
    /// hard state.
    pub fn install_snapshot(
        &mut self,
        meta: SnapshotMeta,
        bytes: &[u8],
    ) -> Result<(), PersistError> {
        self.persist_with_snapshot(Some(SnapshotInstall { meta, bytes }), None, &[], None)
    }

    /// Log compaction: stores `bytes` as the snapshot of the state at
    /// `index` (whose entry has term `term`) and deletes every entry at or
    /// below `index`, in ONE write transaction committed with immediate
    /// durability. Afterwards `first_index() == index + 1`; the entries
    /// after `index` stay. It replaces any older snapshot.
    ///
    /// Refused, with the log and snapshot unchanged: an index past the last
    /// entry ([`SnapshotStoreError::BeyondLog`]), below the stored snapshot
    /// (`Stale`), a term that is not the entry's (`TermMismatch`), more than
    /// [`SNAPSHOT_STORED_BYTES_MAX`] bytes. The caller snapshots only
    /// applied (so committed) state; the store does not check the commit
    /// index, which may be stored later than the snapshot.
    pub fn compact_to(
        &mut self,
        index: LogIndex,
        term: Term,
        bytes: &[u8],
    ) -> Result<(), SnapshotStoreError> {
        if self.read_only {
            return Err(SnapshotStoreError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if index > self.last_index {
            return Err(SnapshotStoreError::BeyondLog {
                path: self.path.clone(),
                index,
                last_index: self.last_index,
            });
        }
        if let Some(s) = self.snapshot.filter(|s| index < s.index) {
            return Err(SnapshotStoreError::Stale {
                path: self.path.clone(),
                index,
                kept: s.index,
            });
        }
        let stored = self.term_at(index)?;
        if index == 0 || stored != Some(term) {
            return Err(SnapshotStoreError::TermMismatch {
                path: self.path.clone(),
                index,
                term,
                stored,
            });
        }
        self.check_snapshot_size(index, bytes)?;
        let meta = SnapshotMeta { index, term };
        let Db::Write(db) = &*self.db else {
            unreachable!("read-only stores are refused above");
        };
        let path = &self.path;
        let mut txn = db.begin_write().map_err(err(path, "begin compaction"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(err(path, "set durability"))?;
        write_snapshot(&txn, path, meta, bytes)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(err(path, "open entries"))?;
            let mut parts = txn
                .open_table(ENTRY_PARTS)
                .map_err(err(path, "open entry parts"))?;
            table
                .retain_in(..=index, |_, _| false)
                .map_err(err(path, "remove compacted entries"))?;
            parts
                .retain_in(..(index + 1, 0), |_, _| false)
                .map_err(err(path, "remove compacted entry parts"))?;
        }
        if crate::fault::take_snapshot_panic(&self.data_dir) {
            panic!("injected fault: a panic before a compaction commits");
        }
        txn.commit().map_err(err(path, "commit compaction"))?;
        tracing::info!(path = %self.path.display(), index, term, bytes = bytes.len(), "log compacted behind a snapshot");
        self.snapshot = Some(meta);
        self.first_index = index + 1;
        self.assert_bounds();
        Ok(())
    }

    fn check_hard_state(&self, hard_state: &HardState) -> Result<(), HardStateError> {
        let old = self.hard_state;
        if hard_state.term < old.term {
            return Err(HardStateError::TermDecreased {
                path: self.path.clone(),
                term: hard_state.term,
                stored: old.term,
            });
        }
        if hard_state.term == old.term
            && old.voted_for.is_some()
            && hard_state.voted_for != old.voted_for
        {
            return Err(HardStateError::VoteChanged {
                path: self.path.clone(),
                term: old.term,
                voted_for: old.voted_for,
            });
        }
        Ok(())
    }

    fn check_batch(
        &self,
        batch: impl ExactSizeIterator<Item = (LogIndex, Term)>,
    ) -> Result<(), AppendError> {
        self.check_batch_after(self.last_index, self.last_term, batch)
    }

    fn check_batch_after(
        &self,
        last_index: LogIndex,
        last_term: Term,
        batch: impl ExactSizeIterator<Item = (LogIndex, Term)>,
    ) -> Result<(), AppendError> {
        if self.read_only {
            return Err(AppendError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if batch.len() > APPEND_BATCH_ENTRIES_MAX {
            return Err(AppendError::BatchTooLarge {
                path: self.path.clone(),
                entries: batch.len(),
                max: APPEND_BATCH_ENTRIES_MAX,
            });
        }
        let mut previous_term = last_term;
        for (position, (index, term)) in batch.enumerate() {
            let expected = last_index + 1 + position as u64;
            if index != expected {
                return Err(AppendError::NotContiguous {
                    path: self.path.clone(),
                    position,
                    expected,
                    found: index,
                });
            }
            if term < previous_term {
                return Err(AppendError::TermDecreased {
                    path: self.path.clone(),
                    index,
                    term,
                    previous: previous_term,
                });
            }
            previous_term = term;
        }
        Ok(())
    }

    /// Writes pre-checked frames in one durable transaction.
    fn commit_frames<'f>(
        &mut self,
        frames: impl Iterator<Item = (LogIndex, Term, &'f [u8])>,
    ) -> Result<(), AppendError> {
        let Db::Write(db) = &*self.db else {
            unreachable!("check_batch refuses read-only stores");
        };
        let path = &self.path;
        let mut txn = db.begin_write().map_err(err(path, "begin append"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(err(path, "set durability"))?;
        let last = {
            let mut table = txn.open_table(ENTRIES).map_err(err(path, "open entries"))?;
            let mut parts = txn
                .open_table(ENTRY_PARTS)
                .map_err(err(path, "open entry parts"))?;
            insert_frames(&mut table, &mut parts, frames, path, &self.data_dir)?
        };
        let Some((last_index, last_term)) = last else {
            return Ok(()); // An empty batch: nothing to commit.
        };
        txn.commit().map_err(err(path, "commit append"))?;
        assert!(last_index > self.last_index && last_term >= self.last_term);
        self.last_index = last_index;
        self.last_term = last_term;
        Ok(())
    }

    /// Removes every entry with index >= `from_index`, durably, and moves
    /// `last_index`/`last_term` back. Committed entries (at or below the
    /// durable `hard_state().commit`) are never removed.
    pub fn truncate_suffix(&mut self, from_index: LogIndex) -> Result<(), TruncateError> {
        if self.read_only {
            return Err(TruncateError::ReadOnly {
                path: self.path.clone(),
            });
        }
        // A persist unit with nothing but a truncation.
        self.persist(Some(from_index), &[], None)
            .map_err(|e| match e {
                PersistError::Truncate(e) => e,
                PersistError::Db(e) => TruncateError::Db(e),
                other => unreachable!("a bare truncation fails only as one: {other}"),
            })
    }

    /// Stores `hard_state` durably. Refuses a term that goes backwards and a
    /// second, different vote in the same term (Raft's one vote per term).
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), HardStateError> {
        if self.read_only {
            return Err(HardStateError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_hard_state(hard_state)?;
        let bytes = frame::encode_value(META_FRAME_KEY, hard_state);
        let Db::Write(db) = &*self.db else {
            unreachable!("read-only stores are refused above");
        };
        let path = &self.path;
        let mut txn = db.begin_write().map_err(err(path, "begin hard state"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(err(path, "set durability"))?;
        {
            let mut meta = txn.open_table(META).map_err(err(path, "open meta"))?;
            meta.insert(META_HARD_STATE, bytes.as_slice())
                .map_err(err(path, "write hard state"))?;
        }
        txn.commit().map_err(err(path, "commit hard state"))?;
        self.hard_state = *hard_state;
        Ok(())
    }

    /// TEST ONLY: writes `bytes` under `index` as they are, so tests of other
    /// crates can plant a corrupt entry. Does not touch the cached bounds.
    #[doc(hidden)]
    pub fn debug_overwrite_frame(
        &mut self,
        index: LogIndex,
        bytes: &[u8],
    ) -> Result<(), AppendError> {
        let Db::Write(db) = &*self.db else {
            return Err(AppendError::ReadOnly {
                path: self.path.clone(),
            });
        };
        if self.read_only {
            return Err(AppendError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let path = &self.path;
        let txn = db.begin_write().map_err(err(path, "begin overwrite"))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(err(path, "open entries"))?;
            table
                .insert(index, bytes)
                .map_err(err(path, "overwrite entry"))?;
        }
        txn.commit().map_err(err(path, "commit overwrite"))?;
        Ok(())
    }

    // ----- reads ---------------------------------------------------------

    /// Up to `min(max_entries, READ_RANGE_ENTRIES_MAX)` entries from index
    /// `from` on, in order. A frame that fails its checks is an error, never
    /// an entry.
    pub fn read_range(&self, from: LogIndex, max_entries: usize) -> Result<Vec<Entry>, ReadError> {
        let max_entries = max_entries.min(READ_RANGE_ENTRIES_MAX);
        let mut entries = Vec::with_capacity(max_entries.min(1024));
        if max_entries == 0 {
            return Ok(entries);
        }
        self.scan(from, |entry| {
            entries.push(entry);
            if entries.len() == max_entries {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        assert!(entries.len() <= max_entries);
        Ok(entries)
    }

    /// Calls `f` with every entry from index `from` on, in index order, in
    /// one read transaction (a consistent snapshot), until `f` breaks. Stops
    /// at the first bad frame or gap in the indexes with [`ReadError`]; the
    /// bad entry is never passed to `f`.
    pub fn scan(
        &self,
        from: LogIndex,
        f: impl FnMut(Entry) -> ControlFlow<()>,
    ) -> Result<(), ReadError> {
        scan_db(&self.db, &self.path, from, f)
    }

    /// Copies the log into `dest_dir/log.redb` (which must not exist) as of
    /// ONE read transaction: a consistent snapshot, also while a writer (in
    /// this process or another) appends. Every frame is checked on the way;
    /// a corrupt one stops the copy with [`ReadError::Corrupt`]. The copy is
    /// built under a temp name, made durable, then renamed in.
    pub fn backup_to(&self, dest_dir: &Path) -> Result<BackupSummary, crate::Error> {
        backup_db(&self.db, &self.path, dest_dir)
    }

    fn begin_read(&self) -> Result<ReadTransaction, DbError> {
        self.db
            .begin_read()
            .map_err(|e| self.db_err("begin read", e))
    }

    fn db_err(&self, op: &'static str, e: impl Into<redb::Error>) -> DbError {
        DbError::new(op, &self.path, e)
    }
}

/// Takes the exclusive lock on `data_dir/LOCK`, creating the file if needed.
fn lock_data_dir(data_dir: &Path) -> Result<File, OpenError> {
    let lock_path = data_dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| OpenError::LockFile {
            path: lock_path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked {
            data_dir: data_dir.to_path_buf(),
            lock: lock_path,
        }),
        Err(TryLockError::Error(source)) => Err(OpenError::LockFile {
            path: lock_path,
            source,
        }),
    }
}

fn open_failed(data_dir: &Path, path: &Path, e: DatabaseError) -> OpenError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Locked {
            data_dir: data_dir.to_path_buf(),
            lock: data_dir.join(LOCK_FILE_NAME),
        },
        e => OpenError::Db(DbError::new("open", path, e)),
    }
}

fn create_tables(db: &Database, path: &Path) -> Result<(), DbError> {
    let txn = db.begin_write().map_err(err(path, "begin create tables"))?;
    txn.open_table(ENTRIES)
        .map_err(err(path, "create entries"))?;
    txn.open_table(ENTRY_PARTS)
        .map_err(err(path, "create entry parts"))?;
    txn.open_table(META).map_err(err(path, "create meta"))?;
    txn.commit().map_err(err(path, "commit create tables"))?;
    Ok(())
}

/// Copies a log that needs repair into a private temp dir and opens (and so
/// repairs) the copy. Reads the original only.
fn open_repaired_copy(
    data_dir: &Path,
    path: &Path,
) -> Result<(Database, tempfile::TempDir), OpenError> {
    let copy_failed = |to: &Path| {
        let to = to.to_path_buf();
        move |source| OpenError::Copy {
            from: path.to_path_buf(),
            to,
            source,
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("rustci-replay-")
        .tempdir()
        .map_err(copy_failed(&std::env::temp_dir()))?;
    let copy = dir.path().join(LOG_FILE_NAME);
    std::fs::copy(path, &copy).map_err(copy_failed(&copy))?;
    tracing::warn!(
        path = %path.display(),
        copy = %copy.display(),
        "log was not closed cleanly; replaying a repaired private copy"
    );
    let mut db = Database::builder()
        .set_cache_size(DB_CACHE_BYTES)
        .open(&copy)
        .map_err(|e| open_failed(data_dir, &copy, e))?;
    // The same check start-up runs on a file that was not closed cleanly,
    // so `rustci replay` and `rustci dev` agree on what is corrupt; it names
    // the original file.
    check_integrity(&mut db, path)?;
    Ok((db, dir))
}

/// Opens a table in a read transaction; `None` if it was never created.
fn open_read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
    path: &Path,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, DbError> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(DbError::new("open table", path, e)),
    }
}

/// `map_err` adapter: a redb error of any kind, tagged with the file and operation.
fn err<'p, E: Into<redb::Error>>(
    path: &'p Path,
    op: &'static str,
) -> impl FnOnce(E) -> DbError + 'p {
    move |e| DbError::new(op, path, e)
}

/// What [`LogStore::backup_to`] copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupSummary {
    pub entries: u64,
    pub last_index: LogIndex,
    /// Framed bytes of the entries copied.
    pub frame_bytes: u64,
}

/// Reads the log from any thread: redb read transactions are snapshots, so
/// this handle never waits for, nor shares a lock with, the writer.
#[derive(Clone)]
pub struct LogReadHandle {
    db: Arc<Db>,
    path: PathBuf,
}

impl LogReadHandle {
    /// As [`LogStore::read_range`].
    pub fn read_range(&self, from: LogIndex, max_entries: usize) -> Result<Vec<Entry>, ReadError> {
        let max_entries = max_entries.min(READ_RANGE_ENTRIES_MAX);
        let mut entries = Vec::with_capacity(max_entries.min(1024));
        if max_entries == 0 {
            return Ok(entries);
        }
        scan_db(&self.db, &self.path, from, |entry| {
            entries.push(entry);
            if entries.len() == max_entries {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(entries)
    }

    /// As [`LogStore::scan`].
    pub fn scan(
        &self,
        from: LogIndex,
        f: impl FnMut(Entry) -> ControlFlow<()>,
    ) -> Result<(), ReadError> {
        scan_db(&self.db, &self.path, from, f)
    }

    /// As [`LogStore::backup_to`].
    pub fn backup_to(&self, dest_dir: &Path) -> Result<BackupSummary, crate::Error> {
        backup_db(&self.db, &self.path, dest_dir)
    }

    /// The stored snapshot's `{index, term}`, without its bytes.
    pub fn snapshot_meta(&self) -> Result<Option<SnapshotMeta>, ReadError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| DbError::new("begin read", &self.path, e))?;
        Ok(
            read_snapshot_record(&txn, &self.path)?.map(|r| SnapshotMeta {
                index: r.index,
                term: r.term,
            }),
        )
    }

    /// The log file this handle reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// As [`LogStore::snapshot`]: the snapshot as of one read transaction.
    pub fn snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ReadError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| DbError::new("begin read", &self.path, e))?;
        read_snapshot(&txn, &self.path)
    }
}

/// Stores `bytes` as the one snapshot, with its record, inside `txn`.
fn write_snapshot(
    txn: &redb::WriteTransaction,
    path: &Path,
    meta: SnapshotMeta,
    bytes: &[u8],
) -> Result<(), DbError> {
    let record = SnapshotRecord {
        index: meta.index,
        term: meta.term,
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    };
    let record = frame::encode_value(META_FRAME_KEY, &record);
    let mut table = txn
        .open_table(SNAPSHOT)
        .map_err(err(path, "open snapshot"))?;
    table
        .insert(SNAPSHOT_RECORD, record.as_slice())
        .map_err(err(path, "write snapshot record"))?;
    table
        .insert(SNAPSHOT_DATA, bytes)
        .map_err(err(path, "write snapshot"))?;
    Ok(())
}

/// The stored snapshot's record, checked as a frame; `None` if there is none.
fn read_snapshot_record(
    txn: &ReadTransaction,
    path: &Path,
) -> Result<Option<SnapshotRecord>, ReadError> {
    let Some(table) = open_read_table(txn, SNAPSHOT, path)? else {
        return Ok(None);
    };
    let stored = table
        .get(SNAPSHOT_RECORD)
        .map_err(|e| DbError::new("read snapshot record", path, e))?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    let record: SnapshotRecord =
        frame::decode_value(META_FRAME_KEY, stored.value()).map_err(|e| ReadError::Snapshot {
            path: path.to_path_buf(),
            reason: format!("its record: {}", e.fault),
        })?;
    Ok(Some(record))
}

/// The stored snapshot and its bytes, checked against the record.
fn read_snapshot(
    txn: &ReadTransaction,
    path: &Path,
) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ReadError> {
    let Some(record) = read_snapshot_record(txn, path)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| ReadError::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    let Some(table) = open_read_table(txn, SNAPSHOT, path)? else {
        return Err(corrupt("its table is gone".into()));
    };
    let stored = table
        .get(SNAPSHOT_DATA)
        .map_err(|e| DbError::new("read snapshot", path, e))?
        .ok_or_else(|| corrupt("its record is stored but its bytes are not".into()))?;
    let bytes = stored.value();
    if bytes.len() as u64 != record.bytes {
        return Err(corrupt(format!(
            "{} bytes stored, {} recorded",
            bytes.len(),
            record.bytes
        )));
    }
    let computed = crc32fast::hash(bytes);
    if computed != record.crc32 {
        return Err(corrupt(format!(
            "checksum mismatch (recorded {:#010x}, computed {computed:#010x})",
            record.crc32
        )));
    }
    let meta = SnapshotMeta {
        index: record.index,
        term: record.term,
    };
    Ok(Some((meta, bytes.to_vec())))
}

fn scan_db(
    db: &Db,
    path: &Path,
    from: LogIndex,
    mut f: impl FnMut(Entry) -> ControlFlow<()>,
) -> Result<(), ReadError> {
    let txn = db
        .begin_read()
        .map_err(|e| DbError::new("begin read", path, e))?;
    let Some(table) = open_read_table(&txn, ENTRIES, path)? else {
        return Ok(());
    };
    let parts = open_read_table(&txn, ENTRY_PARTS, path)?;
    // No entry has index 0: asking from 0 is asking from the start.
    let from = from.max(1);
    let snapshot_index = read_snapshot_record(&txn, path)?.map_or(0, |r| r.index);
    if from <= snapshot_index {
        return Err(ReadError::Compacted {
            path: path.to_path_buf(),
            from,
            first: snapshot_index + 1,
        });
    }
    let range = table
        .range(from..)
        .map_err(|e| DbError::new("scan entries", path, e))?;
    // The first entry found must be `from` itself: a later one means the
    // entries asked for are missing, never a silent skip.
    let mut expected: Option<LogIndex> = Some(from);
    for item in range {
        let (key, bytes) = item.map_err(|e| DbError::new("scan entries", path, e))?;
        let index = key.value();
        if let Some(expected) = expected {
            if index != expected {
                return Err(ReadError::Gap {
                    path: path.to_path_buf(),
                    expected,
                    found: index,
                });
            }
        }
        let frame = assemble(index, bytes.value(), parts.as_ref(), path)?;
        let entry = frame::decode_entry(index, &frame).map_err(|e| ReadError::corrupt(path, e))?;
        expected = Some(index + 1);
        if f(entry).is_break() {
            break;
        }
    }
    Ok(())
}

/// Framed bytes per write transaction of a backup copy.
const BACKUP_TXN_BYTES: usize = 16 << 20;

fn backup_db(db: &Db, path: &Path, dest_dir: &Path) -> Result<BackupSummary, crate::Error> {
    let dest = dest_dir.join(LOG_FILE_NAME);
    let tmp = datadir::temp_path(&dest);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OpenError::Io { path: p, source }
    };
    if dest.exists() {
        return Err(OpenError::Io {
            path: dest,
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        }
        .into());
    }
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let txn = db
            .begin_read()
            .map_err(|e| DbError::new("begin read", path, e))?;
        let out = Database::builder()
            .create(&tmp)
            .map_err(|e| DbError::new("create backup", &tmp, e))?;
        create_tables(&out, &tmp)?;
        let mut summary = BackupSummary {
            entries: 0,
            last_index: 0,
            frame_bytes: 0,
        };
        if let Some(meta) = open_read_table(&txn, META, path)? {
            let w = out.begin_write().map_err(err(&tmp, "begin backup"))?;
            {
                let mut to = w.open_table(META).map_err(err(&tmp, "open meta"))?;
                for item in meta
                    .iter()
                    .map_err(|e| DbError::new("read meta", path, e))?
                {
                    let (k, v) = item.map_err(|e| DbError::new("read meta", path, e))?;
                    to.insert(k.value(), v.value())
                        .map_err(err(&tmp, "write meta"))?;
                }
            }
            w.commit().map_err(err(&tmp, "commit backup"))?;
        }
        // The snapshot goes with the log it was compacted from, checked.
        if let Some((meta, bytes)) = read_snapshot(&txn, path)? {
            let w = out.begin_write().map_err(err(&tmp, "begin backup"))?;
            write_snapshot(&w, &tmp, meta, &bytes)?;
            w.commit().map_err(err(&tmp, "commit backup"))?;
        }
        let parts = open_read_table(&txn, ENTRY_PARTS, path)?;
        if let Some(entries) = open_read_table(&txn, ENTRIES, path)? {
            let mut range = entries
                .range(0..)
                .map_err(|e| DbError::new("scan entries", path, e))?
                .peekable();
            let mut expected: Option<LogIndex> = None;
            while range.peek().is_some() {
                let mut w = out.begin_write().map_err(err(&tmp, "begin backup"))?;
                w.set_durability(Durability::None)
                    .map_err(err(&tmp, "set durability"))?;
                let mut bytes_in_txn = 0;
                {
                    let mut to = w.open_table(ENTRIES).map_err(err(&tmp, "open entries"))?;
                    let mut to_parts = w
                        .open_table(ENTRY_PARTS)
                        .map_err(err(&tmp, "open entry parts"))?;
                    while bytes_in_txn < BACKUP_TXN_BYTES {
                        let Some(item) = range.next() else { break };
                        let (key, bytes) =
                            item.map_err(|e| DbError::new("scan entries", path, e))?;
                        let index = key.value();
                        if expected.is_some_and(|e| e != index) {
                            return Err(ReadError::Gap {
                                path: path.to_path_buf(),
                                expected: expected.unwrap_or(0),
                                found: index,
                            }
                            .into());
                        }
                        let frame = assemble(index, bytes.value(), parts.as_ref(), path)?;
                        frame::open_frame(index, &frame)
                            .map_err(|e| ReadError::corrupt(path, e))?;
                        insert_frame(&mut to, &mut to_parts, index, &frame)
                            .map_err(err(&tmp, "write entry"))?;
                        expected = Some(index + 1);
                        bytes_in_txn += frame.len();
                        summary.entries += 1;
                        summary.last_index = index;
                        summary.frame_bytes += frame.len() as u64;
                    }
                }
                w.commit().map_err(err(&tmp, "commit backup"))?;
            }
        }
        // One durable commit makes every non-durable one before it durable.
        let mut w = out.begin_write().map_err(err(&tmp, "begin backup"))?;
        w.set_durability(Durability::Immediate)
            .map_err(err(&tmp, "set durability"))?;
        w.commit().map_err(err(&tmp, "commit backup"))?;
        drop(out);
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        datadir::sync_dir(dest_dir).map_err(io(dest_dir))?;
        Ok::<_, crate::Error>(summary)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Builds a new, empty log with its tables and `cluster_id` under a temp
/// name, makes it durable, and renames it to `path`: a creation that fails
/// part way (a full disk) leaves only the temp file, removed at the next open.
fn create_log_file(path: &Path, cluster_id: &str) -> Result<(), OpenError> {
    let tmp = datadir::temp_path(path);
    let result = (|| {
        let db = Database::builder()
            .set_concurrency_mode(CONCURRENCY)
            .create(&tmp)
            .map_err(|e| DbError::new("create log", &tmp, e))?;
        create_tables(&db, &tmp)?;
        write_cluster_id(&db, &tmp, cluster_id)?;
        drop(db);
        std::fs::rename(&tmp, path).map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        datadir::sync_dir(dir).map_err(|source| OpenError::Io {
            path: dir.to_path_buf(),
            source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_cluster_id(db: &Database, path: &Path, cluster_id: &str) -> Result<(), DbError> {
    let bytes = frame::encode_value(META_FRAME_KEY, &cluster_id.to_string());
    let mut txn = db.begin_write().map_err(err(path, "begin cluster id"))?;
    txn.set_durability(Durability::Immediate)
        .map_err(err(path, "set durability"))?;
    {
        let mut meta = txn.open_table(META).map_err(err(path, "open meta"))?;
        meta.insert(META_CLUSTER_ID, bytes.as_slice())
            .map_err(err(path, "write cluster id"))?;
    }
    txn.commit().map_err(err(path, "commit cluster id"))
}

/// redb's own check of the whole file (page checksums and the allocator
/// state). A file it had to repair is logged; one it cannot repair is
/// [`OpenError::Damaged`].
fn check_integrity(db: &mut Database, path: &Path) -> Result<(), OpenError> {
    let started = std::time::Instant::now();
    match db.check_integrity() {
        Ok(true) => {
            tracing::info!(path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "the log was not closed cleanly; its integrity check passed");
            Ok(())
        }
        Ok(false) => {
            tracing::warn!(path = %path.display(), "the log was not closed cleanly; its integrity check found damage and repaired the file's index");
            Ok(())
        }
        Err(e) => Err(OpenError::Damaged {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Stores `frame` under `index`: inline when it fits [`FRAME_PART_BYTES`],
/// else as parts plus a split record.
/// Inserts pre-checked frames inside an open write transaction; returns the
/// last `(index, term)` inserted.
fn insert_frames<'f>(
    table: &mut redb::Table<u64, &[u8]>,
    parts: &mut redb::Table<(u64, u32), &[u8]>,
    frames: impl Iterator<Item = (LogIndex, Term, &'f [u8])>,
    path: &Path,
    data_dir: &Path,
) -> Result<Option<(LogIndex, Term)>, AppendError> {
    let mut last = None;
    for (index, term, bytes) in frames {
        if bytes.len() > ENTRY_FRAME_BYTES_MAX {
            return Err(AppendError::EntryTooLarge {
                path: path.to_path_buf(),
                index,
                bytes: bytes.len(),
                max: ENTRY_FRAME_BYTES_MAX,
            });
        }
        insert_frame(table, parts, index, bytes).map_err(err(path, "insert entry"))?;
        last = Some((index, term));
        if crate::fault::take_append_panic(data_dir) {
            panic!("injected fault: a panic inside the write transaction");
        }
    }
    Ok(last)
}

fn insert_frame(
    entries: &mut redb::Table<u64, &[u8]>,
    parts: &mut redb::Table<(u64, u32), &[u8]>,
    index: LogIndex,
    frame: &[u8],
) -> Result<(), redb::StorageError> {
    if frame.len() <= FRAME_PART_BYTES {
        entries.insert(index, frame)?;
        return Ok(());
    }
    let mut count = 0u32;
    for (part, bytes) in frame.chunks(FRAME_PART_BYTES).enumerate() {
        parts.insert((index, part as u32), bytes)?;
        count += 1;
    }
    entries.insert(index, split_record(frame.len(), count).as_slice())?;
    Ok(())
}

/// The value stored in `entries` for a frame kept in parts: a marker byte
/// (never a frame version), the frame's length and its number of parts.
fn split_record(len: usize, parts: u32) -> [u8; SPLIT_RECORD_BYTES] {
    let mut record = [0u8; SPLIT_RECORD_BYTES];
    record[0] = SPLIT_MARKER;
    record[1..5].copy_from_slice(&(len as u32).to_le_bytes());
    record[5..9].copy_from_slice(&parts.to_le_bytes());
    record
}

/// The frame stored under `index`: `stored` itself, or the parts a split
/// record names, joined. Missing or odd parts are a corrupt entry; the
/// frame's own checksum then covers the joined bytes.
fn assemble<'v, T>(
    index: LogIndex,
    stored: &'v [u8],
    parts: Option<&T>,
    path: &Path,
) -> Result<std::borrow::Cow<'v, [u8]>, ReadError>
where
    T: ReadableTable<(u64, u32), &'static [u8]>,
{
    if stored.first() != Some(&SPLIT_MARKER) {
        return Ok(std::borrow::Cow::Borrowed(stored));
    }
    let corrupt = |reason: String| ReadError::Corrupt {
        index,
        path: path.to_path_buf(),
        reason: crate::frame::FrameFault::Parts { reason },
    };
    if stored.len() != SPLIT_RECORD_BYTES {
        return Err(corrupt(format!(
            "split record is {} bytes, not {SPLIT_RECORD_BYTES}",
            stored.len()
        )));
    }
    let len = u32::from_le_bytes([stored[1], stored[2], stored[3], stored[4]]) as usize;
    let count = u32::from_le_bytes([stored[5], stored[6], stored[7], stored[8]]);
    if len > ENTRY_FRAME_BYTES_MAX || len.div_ceil(FRAME_PART_BYTES) != count as usize {
        return Err(corrupt(format!(
            "split record of {len} bytes in {count} parts"
        )));
    }
    let Some(parts) = parts else {
        return Err(corrupt("its parts table is missing".into()));
    };
    let mut frame = Vec::with_capacity(len);
    let range = parts
        .range((index, 0)..(index, count))
        .map_err(|e| DbError::new("read entry parts", path, e))?;
    let mut seen = 0u32;
    for item in range {
        let (key, bytes) = item.map_err(|e| DbError::new("read entry parts", path, e))?;
        if key.value().1 != seen {
            return Err(corrupt(format!("part {seen} is missing")));
        }
        frame.extend_from_slice(bytes.value());
        seen += 1;
    }
    if seen != count || frame.len() != len {
        return Err(corrupt(format!(
            "{seen} of {count} parts, {} of {len} bytes",
            frame.len()
        )));
    }
    Ok(std::borrow::Cow::Owned(frame))
}
