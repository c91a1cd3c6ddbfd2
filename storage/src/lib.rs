//! rustci-storage: the durable event log of one RustCI replica, in redb.
//!
//! What it is for: keeping the replicated log (`rustci_core::event::Entry`,
//! each in a versioned, checksummed frame) and Raft's hard state on disk, with
//! group commit (one fsync per [`LogStore::append`] batch), and reading the
//! log back fast enough to rebuild state by replay at start-up.
//!
//! What it never does: interpret events (reducers live in `rustci-core`),
//! decide what is committed (Raft does), return or apply a frame that fails
//! its checks (it is a [`ReadError::Corrupt`] naming the index), or write to
//! a data dir opened with [`LogStore::open_read_only`].
//!
//! Files in a data dir: `LOCK` (held exclusively by the one writer, via
//! `File::try_lock`) and `log.redb` with tables `entries: u64 -> &[u8]`
//! (frames keyed by index), `entry_parts` (frames too large for a page),
//! `meta: &str -> &[u8]` (the hard state, as a frame with key 0) and
//! `snapshot: &str -> &[u8]` (the one stored snapshot, once the log was
//! compacted). The frame layout is documented in [`frame`], the snapshot's
//! bytes in [`snapshot`].
//!
//! API:
//! - [`encode_entry`] / [`decode_entry`]: the frame codec (decode never panics).
//! - [`LogStore::open`] (writer; holds `LOCK`, fails with
//!   [`OpenError::Locked`] when another process or handle has it) and
//!   [`LogStore::open_read_only`] (replay; never writes).
//! - writes: [`LogStore::append`] (group commit), [`LogStore::append_frames`]
//!   (same, for frames encoded off the writer's thread),
//!   [`LogStore::persist`] (one Raft persist unit) and
//!   [`LogStore::persist_with_snapshot`] (the same, first installing a
//!   leader's snapshot), [`LogStore::truncate_suffix`],
//!   [`LogStore::set_hard_state`], [`LogStore::compact_to`] (log compaction
//!   behind a snapshot), [`LogStore::install_snapshot`].
//! - reads: [`LogStore::scan`] (the replay path: one read transaction, one
//!   range walk, no allocation per entry beyond the entry itself),
//!   [`LogStore::read_range`], [`LogStore::term_at`],
//!   [`LogStore::snapshot`] (also on [`LogReadHandle`]), and the getters
//!   `first_index`, `last_index`, `last_term`, `snapshot_meta`,
//!   `hard_state`, `path`.
//! - [`encode_snapshot`] / [`decode_snapshot`]: the reducer state's
//!   snapshot codec (versioned, checksummed; decode never panics and
//!   rebuilds every derived index).
//!
//! Durability: every write method commits one redb transaction with
//! `Durability::Immediate` before it returns `Ok`; the cached bounds and hard
//! state change only after that commit.
//!
//! Read-only opens: redb 4 has a `ReadOnlyDatabase`, which opens a cleanly
//! closed file in place without writing (it takes a shared file lock only).
//! It refuses a file that needs repair (its writer crashed); then the file is
//! copied to a private temp dir and the copy is repaired and read. A file
//! held by a live writer is refused as [`OpenError::Locked`].
//!
//! Compaction: the store holds at most one snapshot, `{index, term}` and
//! bytes it never interprets, and then the log starts at `index + 1`
//! (`first_index`); an empty log ends at the snapshot (`last_index = index`,
//! `last_term = term`). A log that was never compacted starts at 1. Entries
//! behind the snapshot are never returned: reading them is
//! [`ReadError::Compacted`], and truncating at or below the snapshot is
//! refused. Nothing in RustCI compacts a log yet (the replica does not ask
//! for it); start-up already starts from a stored snapshot.

pub mod datadir;
pub mod error;
#[doc(hidden)]
pub mod fault;
pub mod frame;
/// The frame decoder's fuzz target (shared by `fuzz/` and `tests/fuzz_corpus.rs`).
#[doc(hidden)]
pub mod fuzzing;
pub mod snapshot;
mod store;

pub use datadir::{Identity, CLEAN_SHUTDOWN_FILE_NAME, IDENTITY_FILE_NAME};
pub use error::corrupt_file_message;
pub use error::{
    AppendError, DbError, Error, HardStateError, OpenError, PersistError, ReadError,
    SnapshotStoreError, TruncateError,
};
pub use frame::{decode_entry, encode_entry, FrameError, FrameFault, FRAME_VERSION};
pub use snapshot::{decode_snapshot, encode_snapshot, SnapshotError};
pub use store::{
    BackupSummary, HardState, LogReadHandle, LogStore, SnapshotInstall, SnapshotMeta,
    APPEND_BATCH_ENTRIES_MAX, DB_CACHE_BYTES, ENTRY_FRAME_BYTES_MAX, FRAME_PART_BYTES,
    LOCK_FILE_NAME, LOG_FILE_NAME, READ_RANGE_ENTRIES_MAX, SNAPSHOT_STORED_BYTES_MAX,
};
