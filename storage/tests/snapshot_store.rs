//! Snapshots in the store: compaction behind a snapshot, the install of a
//! leader's snapshot, the bounds of the log after either (also after a
//! reopen), and crashes in the middle of them.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use common::{entry, run};
use rustci_core::event::Entry;
use rustci_storage::{
    AppendError, HardState, LogStore, PersistError, ReadError, SnapshotInstall, SnapshotMeta,
    SnapshotStoreError, TruncateError,
};

fn scan_all(store: &LogStore, from: u64) -> Result<Vec<Entry>, ReadError> {
    let mut out = Vec::new();
    store.scan(from, |e| {
        out.push(e);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// A log of entries 1..=10: terms 1 up to 5, 2 up to 10.
fn ten(dir: &Path) -> LogStore {
    let mut store = LogStore::open(dir).unwrap();
    store.append(&run(1, 5, 1)).unwrap();
    store.append(&run(6, 10, 2)).unwrap();
    store
}

fn bounds(store: &LogStore) -> (u64, u64, u64, Option<SnapshotMeta>) {
    (
        store.first_index(),
        store.last_index(),
        store.last_term(),
        store.snapshot_meta(),
    )
}

fn meta(index: u64, term: u64) -> Option<SnapshotMeta> {
    Some(SnapshotMeta { index, term })
}

#[test]
fn compaction_keeps_the_entries_after_the_snapshot_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(6, 2, b"state at 6").unwrap();
    assert_eq!(bounds(&store), (7, 10, 2, meta(6, 2)));
    let check = |store: &LogStore| {
        assert_eq!(bounds(store), (7, 10, 2, meta(6, 2)));
        assert_eq!(scan_all(store, store.first_index()).unwrap(), run(7, 10, 2));
        assert_eq!(store.read_range(8, 2).unwrap(), run(8, 9, 2));
        assert_eq!(store.term_at(6).unwrap(), Some(2), "the snapshot's term");
        assert_eq!(store.term_at(5).unwrap(), None, "compacted");
        assert_eq!(store.term_at(7).unwrap(), Some(2));
        let (m, bytes) = store.snapshot().unwrap().unwrap();
        assert_eq!(
            (m, bytes.as_slice()),
            (meta(6, 2).unwrap(), &b"state at 6"[..])
        );
        let (m, _) = store.reader().snapshot().unwrap().unwrap();
        assert_eq!(m, meta(6, 2).unwrap(), "the read handle sees it too");
    };
    check(&store);
    drop(store);
    check(&LogStore::open(dir.path()).unwrap());
}

#[test]
fn compaction_reading_compacted_entries_is_an_error_not_a_silent_skip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(6, 2, b"s").unwrap();
    for from in [0, 1, 6] {
        let e = scan_all(&store, from).unwrap_err();
        assert!(
            matches!(e, ReadError::Compacted { first: 7, .. }),
            "{from}: {e}"
        );
        let e = store.reader().read_range(from, 10).unwrap_err();
        assert!(matches!(e, ReadError::Compacted { .. }), "{e}");
    }
    // The whole log compacted: an empty log, still not a silent skip.
    store.compact_to(10, 2, b"s").unwrap();
    assert_eq!(bounds(&store), (11, 10, 2, meta(10, 2)));
    assert!(matches!(
        store.read_range(9, 5),
        Err(ReadError::Compacted { first: 11, .. })
    ));
    assert_eq!(store.read_range(11, 5).unwrap(), vec![]);
}

#[test]
fn compaction_of_the_whole_log_then_appends_continue_at_the_next_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(10, 2, b"all").unwrap();
    drop(store);
    let mut store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (11, 10, 2, meta(10, 2)));
    let e = store.append(&[entry(12, 2)]).unwrap_err();
    assert!(
        matches!(e, AppendError::NotContiguous { expected: 11, .. }),
        "{e}"
    );
    let e = store.append(&[entry(11, 1)]).unwrap_err();
    assert!(matches!(e, AppendError::TermDecreased { .. }), "{e}");
    store.append(&run(11, 12, 3)).unwrap();
    assert_eq!(bounds(&store), (11, 12, 3, meta(10, 2)));
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(scan_all(&store, 11).unwrap(), run(11, 12, 3));
}

#[test]
fn compaction_again_moves_the_snapshot_forward_and_never_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(3, 1, b"at 3").unwrap();
    store.compact_to(8, 2, b"at 8").unwrap();
    assert_eq!(bounds(&store), (9, 10, 2, meta(8, 2)));
    assert_eq!(store.snapshot().unwrap().unwrap().1, b"at 8");
    let e = store.compact_to(5, 1, b"back").unwrap_err();
    assert!(
        matches!(e, SnapshotStoreError::Stale { kept: 8, .. }),
        "{e}"
    );
    let e = store.compact_to(11, 2, b"ahead").unwrap_err();
    assert!(matches!(e, SnapshotStoreError::BeyondLog { .. }), "{e}");
    let e = store.compact_to(9, 1, b"wrong term").unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotStoreError::TermMismatch {
                stored: Some(2),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        bounds(&store),
        (9, 10, 2, meta(8, 2)),
        "refusals change nothing"
    );
    assert_eq!(store.snapshot().unwrap().unwrap().1, b"at 8");
}

#[test]
fn compaction_truncating_at_or_below_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    assert_eq!(store.hard_state().commit, 0, "nothing committed is stored");
    store.compact_to(6, 2, b"s").unwrap();
    for from in [1, 6] {
        let e = store.truncate_suffix(from).unwrap_err();
        assert!(
            matches!(
                e,
                TruncateError::Compacted {
                    snapshot_index: 6,
                    ..
                }
            ),
            "{from}: {e}"
        );
        let e = store.persist(Some(from), &[], None).unwrap_err();
        assert!(matches!(e, PersistError::Truncate(_)), "{e}");
    }
    assert_eq!(bounds(&store), (7, 10, 2, meta(6, 2)));
    // Right after the snapshot is allowed: the log becomes empty at it.
    store.persist(Some(7), &run(7, 8, 3), None).unwrap();
    assert_eq!(bounds(&store), (7, 8, 3, meta(6, 2)));
    store.truncate_suffix(7).unwrap();
    assert_eq!(bounds(&store), (7, 6, 2, meta(6, 2)));
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (7, 6, 2, meta(6, 2)));
}

#[test]
fn install_replaces_the_whole_log_and_entries_follow_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(4, 1, b"old").unwrap();
    let hard = HardState {
        term: 5,
        voted_for: None,
        commit: 20,
    };
    // A snapshot ahead of the log, then entries after it, in one unit.
    store
        .persist_with_snapshot(
            Some(SnapshotInstall {
                meta: SnapshotMeta { index: 20, term: 4 },
                bytes: b"leader's state at 20",
            }),
            None,
            &run(21, 22, 5),
            Some(&hard),
        )
        .unwrap();
    let check = |store: &LogStore| {
        assert_eq!(bounds(store), (21, 22, 5, meta(20, 4)));
        assert_eq!(store.hard_state(), hard);
        assert_eq!(scan_all(store, 21).unwrap(), run(21, 22, 5));
        assert_eq!(
            store.snapshot().unwrap().unwrap().1,
            b"leader's state at 20"
        );
    };
    check(&store);
    drop(store);
    check(&LogStore::open(dir.path()).unwrap());
}

#[test]
fn install_behind_the_log_drops_the_entries_after_it_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store
        .install_snapshot(SnapshotMeta { index: 7, term: 2 }, b"at 7")
        .unwrap();
    assert_eq!(bounds(&store), (8, 7, 2, meta(7, 2)));
    assert_eq!(
        store.read_range(8, 10).unwrap(),
        vec![],
        "the whole log is gone"
    );
    drop(store);
    let mut store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (8, 7, 2, meta(7, 2)));
    store.append(&run(8, 9, 3)).unwrap();
    assert_eq!(bounds(&store), (8, 9, 3, meta(7, 2)));
}

#[test]
fn install_below_the_commit_index_or_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store
        .set_hard_state(&HardState {
            term: 2,
            voted_for: None,
            commit: 8,
        })
        .unwrap();
    let e = store
        .install_snapshot(SnapshotMeta { index: 7, term: 2 }, b"x")
        .unwrap_err();
    assert!(
        matches!(
            e,
            PersistError::Snapshot(SnapshotStoreError::Stale { kept: 8, .. })
        ),
        "{e}"
    );
    store.compact_to(9, 2, b"at 9").unwrap();
    let e = store
        .install_snapshot(SnapshotMeta { index: 8, term: 2 }, b"x")
        .unwrap_err();
    assert!(
        matches!(
            e,
            PersistError::Snapshot(SnapshotStoreError::Stale { kept: 9, .. })
        ),
        "{e}"
    );
    assert_eq!(bounds(&store), (10, 10, 2, meta(9, 2)));
}

#[test]
fn crash_in_the_middle_of_a_compaction_leaves_the_old_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(2, 1, b"first").unwrap();
    rustci_storage::fault::panic_next_snapshot(dir.path());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = store.compact_to(8, 2, b"second");
    }));
    assert!(panicked.is_err(), "the planted fault fired");
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (3, 10, 2, meta(2, 1)), "the old bounds");
    assert_eq!(
        store.snapshot().unwrap().unwrap().1,
        b"first",
        "the old snapshot"
    );
    let mut expected = run(3, 5, 1);
    expected.extend(run(6, 10, 2));
    assert_eq!(scan_all(&store, 3).unwrap(), expected, "every old entry");
}

#[test]
fn crash_in_the_middle_of_an_install_leaves_the_old_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    rustci_storage::fault::panic_next_snapshot(dir.path());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = store.persist_with_snapshot(
            Some(SnapshotInstall {
                meta: SnapshotMeta { index: 30, term: 3 },
                bytes: b"new",
            }),
            None,
            &run(31, 32, 3),
            None,
        );
    }));
    assert!(panicked.is_err(), "the planted fault fired");
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (1, 10, 2, None));
    assert!(store.snapshot().unwrap().is_none());
    assert_eq!(scan_all(&store, 1).unwrap().len(), 10);
}

#[test]
fn crash_right_after_a_compaction_commits_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(8, 2, b"kept").unwrap();
    drop(store); // no clean close: the next open runs the integrity check
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store), (9, 10, 2, meta(8, 2)));
    assert_eq!(store.snapshot().unwrap().unwrap().1, b"kept");
}

#[test]
fn compaction_of_split_frames_removes_their_parts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let big = |index: u64| Entry {
        event: rustci_core::event::Event::NodeRemoved {
            name: "n".into(),
            reason: "x".repeat(3 * rustci_storage::FRAME_PART_BYTES),
        },
        ..entry(index, 1)
    };
    store.append(&[big(1), big(2), big(3)]).unwrap();
    store.compact_to(2, 1, b"s").unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(scan_all(&store, 3).unwrap(), vec![big(3)]);
    let backup = tempfile::tempdir().unwrap();
    let summary = store.backup_to(backup.path()).unwrap();
    assert_eq!((summary.entries, summary.last_index), (1, 3));
}

#[test]
fn a_backup_of_a_compacted_log_keeps_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ten(dir.path());
    store.compact_to(6, 2, b"at 6").unwrap();
    let backup = tempfile::tempdir().unwrap();
    store.reader().backup_to(backup.path()).unwrap();
    let copy = LogStore::open_read_only(backup.path()).unwrap();
    assert_eq!(bounds(&copy), (7, 10, 2, meta(6, 2)));
    assert_eq!(copy.snapshot().unwrap().unwrap().1, b"at 6");
    assert_eq!(scan_all(&copy, 7).unwrap(), run(7, 10, 2));
}

#[test]
fn a_log_from_before_snapshots_opens_without_one() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/log-33623db");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(fixture).join("log.redb"),
        dir.path().join("log.redb"),
    )
    .unwrap();
    let store = LogStore::open_read_only(dir.path()).unwrap();
    assert_eq!(bounds(&store), (1, 32, store.last_term(), None));
    assert!(store.snapshot().unwrap().is_none());
    assert!(store.reader().snapshot().unwrap().is_none());
    assert_eq!(scan_all(&store, 1).unwrap().len(), 32);
    drop(store);
    // Opened for writing (adopted: it predates identities), it compacts.
    let mut store = LogStore::open(dir.path()).unwrap();
    let term = store.term_at(20).unwrap().unwrap();
    store.compact_to(20, term, b"s").unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(bounds(&store).0, 21);
    assert_eq!(scan_all(&store, 21).unwrap().len(), 12);
}

#[test]
fn a_read_only_store_refuses_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = ten(dir.path());
    store.close_clean();
    let mut store = LogStore::open_read_only(dir.path()).unwrap();
    let e = store.compact_to(5, 1, b"s").unwrap_err();
    assert!(matches!(e, SnapshotStoreError::ReadOnly { .. }), "{e}");
}
