//! LogStore: append/read, preconditions, recovery, truncation, hard state,
//! locking, corruption and the read-only guarantee.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{entry, run};
use proptest::prelude::*;
use rustci_core::event::Entry;
use rustci_storage::{
    encode_entry, AppendError, FrameFault, HardState, HardStateError, LogStore, OpenError,
    PersistError, ReadError, TruncateError, APPEND_BATCH_ENTRIES_MAX,
};

fn scan_all(store: &LogStore, from: u64) -> Result<Vec<Entry>, ReadError> {
    let mut out = Vec::new();
    store.scan(from, |e| {
        out.push(e);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn append_then_read_returns_the_same_entries(
        entries in common::entries(1, 1..300),
        split in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        let (a, b) = entries.split_at(split.index(entries.len()));
        store.append(a).unwrap();
        store.append(b).unwrap();
        prop_assert_eq!(store.last_index(), entries.len() as u64);
        prop_assert_eq!(store.last_term(), entries.last().unwrap().term);
        prop_assert_eq!(&store.read_range(1, usize::MAX).unwrap(), &entries);
        prop_assert_eq!(&scan_all(&store, 1).unwrap(), &entries);
        let from = split.index(entries.len());
        let window = &entries[from..(from + 5).min(entries.len())];
        prop_assert_eq!(&store.read_range(from as u64 + 1, 5).unwrap()[..], window);
        for e in &entries {
            prop_assert_eq!(store.term_at(e.index).unwrap(), Some(e.term));
        }
    }
}

#[test]
fn new_log_is_empty_and_starts_at_index_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        (store.first_index(), store.last_index(), store.last_term()),
        (1, 0, 0)
    );
    assert_eq!(store.term_at(0).unwrap(), Some(0));
    assert_eq!(store.term_at(1).unwrap(), None);
    assert!(store.read_range(1, 10).unwrap().is_empty());
    assert_eq!(store.hard_state(), HardState::default());
    assert_eq!(store.path(), dir.path().join("log.redb"));
}

#[test]
fn open_creates_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("a/b/c");
    let store = LogStore::open(&data_dir).unwrap();
    assert!(data_dir.join("log.redb").is_file());
    assert!(data_dir.join("LOCK").is_file());
    drop(store);
}

#[test]
fn append_rejects_gaps_overlaps_and_decreasing_terms_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 3, 2)).unwrap();

    let gap = store.append(&[entry(5, 2)]).unwrap_err();
    assert!(
        matches!(
            gap,
            AppendError::NotContiguous {
                expected: 4,
                found: 5,
                position: 0,
                ..
            }
        ),
        "{gap}"
    );
    let overlap = store.append(&[entry(3, 2)]).unwrap_err();
    assert!(matches!(
        overlap,
        AppendError::NotContiguous {
            expected: 4,
            found: 3,
            ..
        }
    ));
    let hole_inside = store.append(&[entry(4, 2), entry(6, 2)]).unwrap_err();
    assert!(matches!(
        hole_inside,
        AppendError::NotContiguous {
            position: 1,
            expected: 5,
            found: 6,
            ..
        }
    ));
    let below_last = store.append(&[entry(4, 1)]).unwrap_err();
    assert!(matches!(
        below_last,
        AppendError::TermDecreased {
            index: 4,
            term: 1,
            previous: 2,
            ..
        }
    ));
    let inside = store.append(&[entry(4, 3), entry(5, 2)]).unwrap_err();
    assert!(matches!(
        inside,
        AppendError::TermDecreased { index: 5, .. }
    ));
    assert!(
        inside.to_string().contains("terms never decrease"),
        "{inside}"
    );

    assert_eq!((store.last_index(), store.last_term()), (3, 2));
    assert_eq!(store.read_range(1, 100).unwrap(), run(1, 3, 2));
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.read_range(1, 100).unwrap(), run(1, 3, 2));
}

#[test]
fn append_refuses_a_batch_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let batch = run(1, APPEND_BATCH_ENTRIES_MAX as u64 + 1, 1);
    let error = store.append(&batch).unwrap_err();
    assert!(matches!(error, AppendError::BatchTooLarge { .. }));
    assert_eq!(store.last_index(), 0);
}

#[test]
fn empty_append_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&[]).unwrap();
    assert_eq!(store.last_index(), 0);
}

#[test]
fn append_frames_takes_preencoded_frames_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let frames: Vec<_> = run(1, 3, 1)
        .iter()
        .map(|e| (e.index, e.term, encode_entry(e)))
        .collect();
    store.append_frames(&frames).unwrap();
    assert_eq!(store.read_range(1, 10).unwrap(), run(1, 3, 1));

    let misplaced = vec![(4, 1, encode_entry(&entry(5, 1)))];
    let error = store.append_frames(&misplaced).unwrap_err();
    assert!(
        matches!(
            error,
            AppendError::BadFrame {
                index: 4,
                fault: FrameFault::Checksum { .. },
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(store.last_index(), 3);
}

#[test]
fn reopen_after_drop_recovers_first_and_last_index_and_term() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        store.append(&run(1, 10, 1)).unwrap();
        store.append(&run(11, 12, 4)).unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        (store.first_index(), store.last_index(), store.last_term()),
        (1, 12, 4)
    );
    assert_eq!(store.term_at(10).unwrap(), Some(1));
    assert_eq!(store.term_at(13).unwrap(), None);
}

#[test]
fn truncate_suffix_then_append_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 5, 1)).unwrap();
    store.append(&run(6, 10, 2)).unwrap();

    store.truncate_suffix(7).unwrap();
    assert_eq!((store.last_index(), store.last_term()), (6, 2));
    store.truncate_suffix(6).unwrap();
    assert_eq!((store.last_index(), store.last_term()), (5, 1));
    store.truncate_suffix(100).unwrap(); // Beyond the end: nothing to do.
    assert_eq!(store.last_index(), 5);

    store.append(&run(6, 8, 3)).unwrap();
    let mut expected = run(1, 5, 1);
    expected.extend(run(6, 8, 3));
    assert_eq!(scan_all(&store, 1).unwrap(), expected);
    drop(store);

    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!((store.last_index(), store.last_term()), (8, 3));
    assert_eq!(scan_all(&store, 1).unwrap(), expected);
}

#[test]
fn truncate_suffix_to_nothing_leaves_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 3, 1)).unwrap();
    store.truncate_suffix(1).unwrap();
    assert_eq!(
        (store.first_index(), store.last_index(), store.last_term()),
        (1, 0, 0)
    );
    store.append(&run(1, 1, 2)).unwrap();
    assert_eq!(store.last_term(), 2);
}

#[test]
fn truncate_suffix_never_removes_committed_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 5, 1)).unwrap();
    store
        .set_hard_state(&HardState {
            term: 1,
            voted_for: Some(1),
            commit: 3,
        })
        .unwrap();
    let error = store.truncate_suffix(3).unwrap_err();
    assert!(matches!(
        error,
        TruncateError::Committed {
            from_index: 3,
            commit: 3,
            ..
        }
    ));
    assert_eq!(store.last_index(), 5);
    store.truncate_suffix(4).unwrap();
    assert_eq!(store.last_index(), 3);
}

#[test]
fn persist_truncates_appends_and_stores_the_hard_state_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let first = HardState {
        term: 1,
        voted_for: Some(1),
        commit: 2,
    };
    store.persist(None, &run(1, 5, 1), Some(&first)).unwrap();
    // A new leader's entries replace 4 and 5 (a follower's unit).
    let second = HardState {
        term: 2,
        voted_for: None,
        commit: 3,
    };
    store
        .persist(Some(4), &run(4, 6, 2), Some(&second))
        .unwrap();
    let mut expected = run(1, 3, 1);
    expected.extend(run(4, 6, 2));
    assert_eq!(scan_all(&store, 1).unwrap(), expected);
    assert_eq!((store.last_index(), store.last_term()), (6, 2));
    // A truncation with nothing after it moves the end back.
    store.persist(Some(5), &[], None).unwrap();
    assert_eq!((store.last_index(), store.last_term()), (4, 2));
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), second);
    assert_eq!(scan_all(&store, 1).unwrap(), expected[..4].to_vec());
}

#[test]
fn persist_refuses_a_bad_unit_whole_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let voted = HardState {
        term: 3,
        voted_for: Some(1),
        commit: 3,
    };
    store.persist(None, &run(1, 5, 3), Some(&voted)).unwrap();
    let before = scan_all(&store, 1).unwrap();
    // Truncating committed entries.
    let e = store.persist(Some(3), &run(3, 3, 3), None).unwrap_err();
    assert!(
        matches!(e, PersistError::Truncate(TruncateError::Committed { .. })),
        "{e}"
    );
    // Entries that do not follow the truncated log.
    let e = store.persist(Some(5), &run(6, 6, 3), None).unwrap_err();
    assert!(
        matches!(e, PersistError::Append(AppendError::NotContiguous { .. })),
        "{e}"
    );
    // Good entries with a hard state that changes the vote: none of it lands.
    let other_vote = HardState {
        voted_for: Some(2),
        ..voted
    };
    let e = store
        .persist(Some(5), &run(5, 6, 3), Some(&other_vote))
        .unwrap_err();
    assert!(
        matches!(
            e,
            PersistError::HardState(HardStateError::VoteChanged { .. })
        ),
        "{e}"
    );
    assert_eq!(scan_all(&store, 1).unwrap(), before);
    assert_eq!(store.hard_state(), voted);
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(scan_all(&store, 1).unwrap(), before);
    assert_eq!(store.hard_state(), voted);
}

#[test]
fn hard_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 7,
        voted_for: Some(2),
        commit: 0,
    };
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        store.set_hard_state(&hard_state).unwrap();
        assert_eq!(store.hard_state(), hard_state);
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), hard_state);
}

#[test]
fn hard_state_refuses_a_lower_term_and_a_second_vote_in_one_term() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let voted = HardState {
        term: 5,
        voted_for: Some(1),
        commit: 0,
    };
    store.set_hard_state(&voted).unwrap();
    let lower = HardState { term: 4, ..voted };
    assert!(matches!(
        store.set_hard_state(&lower).unwrap_err(),
        HardStateError::TermDecreased {
            term: 4,
            stored: 5,
            ..
        }
    ));
    let other_vote = HardState {
        voted_for: Some(2),
        ..voted
    };
    assert!(matches!(
        store.set_hard_state(&other_vote).unwrap_err(),
        HardStateError::VoteChanged { term: 5, .. }
    ));
    // The same vote again, a new term, and a commit advance are all fine.
    store
        .set_hard_state(&HardState { commit: 0, ..voted })
        .unwrap();
    store
        .set_hard_state(&HardState {
            term: 6,
            voted_for: None,
            commit: 0,
        })
        .unwrap();
    assert_eq!(store.hard_state().term, 6);
}

#[test]
fn second_open_of_the_same_data_dir_fails_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let first = LogStore::open(dir.path()).unwrap();
    let error = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(error, OpenError::Locked { .. }), "{error}");
    let expected = format!(
        "data dir {} is in use by another rustci process (lock {}/LOCK)",
        dir.path().display(),
        dir.path().display()
    );
    assert_eq!(error.to_string(), expected);
    drop(first);
    LogStore::open(dir.path()).expect("the lock is released on drop");
}

fn planted(corruption: &str) -> (tempfile::TempDir, LogStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 50, 1)).unwrap();
    let good = encode_entry(&entry(42, 1));
    let bad = match corruption {
        "flipped byte" => {
            let mut f = good.clone();
            let last = f.len() - 1;
            f[last] ^= 0x01;
            f
        }
        "wrong version" => {
            let mut f = good.clone();
            f[0] = 9;
            f
        }
        "truncated" => good[..good.len() / 2].to_vec(),
        "under the wrong index" => encode_entry(&entry(41, 1)),
        _ => unreachable!(),
    };
    store.debug_overwrite_frame(42, &bad).unwrap();
    (dir, store)
}

#[test]
fn corrupt_frames_are_reported_with_their_index_by_read_range_and_scan() {
    for corruption in [
        "flipped byte",
        "wrong version",
        "truncated",
        "under the wrong index",
    ] {
        let (dir, store) = planted(corruption);
        let log = dir.path().join("log.redb");

        let error = store.read_range(1, 100).unwrap_err();
        assert!(
            matches!(&error, ReadError::Corrupt { index: 42, path, .. } if *path == log),
            "{corruption}: {error}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "corrupt log entry at index 42 in {}: ",
                log.display()
            )),
            "{corruption}: {message}"
        );

        let mut seen = Vec::new();
        let error = store
            .scan(1, |e| {
                seen.push(e.index);
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert!(
            matches!(error, ReadError::Corrupt { index: 42, .. }),
            "{corruption}: {error}"
        );
        assert_eq!(
            seen,
            (1..=41).collect::<Vec<_>>(),
            "{corruption}: never applied"
        );

        // Reads that stop before the bad entry are fine.
        assert_eq!(store.read_range(1, 41).unwrap().len(), 41);
        assert_eq!(store.read_range(43, 100).unwrap().len(), 8);
    }
}

#[test]
fn checksum_mismatch_message_reads_plainly() {
    let (dir, store) = planted("flipped byte");
    let error = store.read_range(42, 1).unwrap_err();
    let prefix = format!(
        "corrupt log entry at index 42 in {}: checksum mismatch",
        dir.path().join("log.redb").display()
    );
    assert!(error.to_string().starts_with(&prefix), "{error}");
}

#[test]
fn corrupt_last_entry_fails_open_with_its_index() {
    let (dir, mut store) = planted("flipped byte");
    store.debug_overwrite_frame(50, b"\x01garbage").unwrap();
    drop(store);
    let error = LogStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(error, OpenError::Read(ReadError::Corrupt { index: 50, .. })),
        "{error}"
    );
}

/// Names, lengths, mtimes and bytes of every file under `dir`.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, (SystemTime, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert!(meta.is_file());
        out.insert(
            entry.path(),
            (
                meta.modified().unwrap(),
                std::fs::read(entry.path()).unwrap(),
            ),
        );
    }
    out
}

#[test]
fn open_read_only_never_changes_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        store.append(&run(1, 100, 1)).unwrap();
        store
            .set_hard_state(&HardState {
                term: 1,
                voted_for: Some(1),
                commit: 100,
            })
            .unwrap();
    }
    let before = fingerprint(dir.path());
    {
        let reader = LogStore::open_read_only(dir.path()).unwrap();
        let second_reader = LogStore::open_read_only(dir.path()).unwrap();
        assert!(reader.is_read_only());
        assert_eq!((reader.last_index(), reader.last_term()), (100, 1));
        assert_eq!(reader.hard_state().commit, 100);
        assert_eq!(scan_all(&reader, 1).unwrap(), run(1, 100, 1));
        assert_eq!(second_reader.read_range(1, 1000).unwrap().len(), 100);
        let mut reader = reader;
        assert!(matches!(
            reader.append(&[entry(101, 1)]),
            Err(AppendError::ReadOnly { .. })
        ));
        assert!(matches!(
            reader.truncate_suffix(101),
            Err(TruncateError::ReadOnly { .. })
        ));
    }
    assert_eq!(fingerprint(dir.path()), before);
}

#[test]
fn open_read_only_does_not_create_a_lock_or_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let error = LogStore::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(error, OpenError::Missing { .. }), "{error}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn open_read_only_of_a_log_that_was_not_closed_cleanly_reads_a_repaired_copy() {
    // A copy of the file taken while its writer is still open is exactly what
    // a crash leaves behind: every append was fsynced, but no clean close.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 20, 1)).unwrap();
    store.append(&run(21, 30, 2)).unwrap();
    std::fs::copy(dir.path().join("log.redb"), crashed.path().join("log.redb")).unwrap();
    let before = fingerprint(crashed.path());
    {
        let reader = LogStore::open_read_only(crashed.path()).unwrap();
        assert_eq!((reader.last_index(), reader.last_term()), (30, 2));
        assert_eq!(reader.path(), crashed.path().join("log.redb"));
        let mut expected = run(1, 20, 1);
        expected.extend(run(21, 30, 2));
        assert_eq!(scan_all(&reader, 1).unwrap(), expected);
    }
    assert_eq!(fingerprint(crashed.path()), before);
    drop(store);
}

#[test]
fn open_read_only_while_a_writer_holds_the_log_fails_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let writer = LogStore::open(dir.path()).unwrap();
    let error = LogStore::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(error, OpenError::Locked { .. }), "{error}");
    drop(writer);
}

#[test]
fn a_gap_in_the_stored_indexes_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&run(1, 5, 1)).unwrap();
    store
        .debug_overwrite_frame(8, &encode_entry(&entry(8, 1)))
        .unwrap();
    let error = scan_all(&store, 1).unwrap_err();
    assert!(
        matches!(
            error,
            ReadError::Gap {
                expected: 6,
                found: 8,
                ..
            }
        ),
        "{error}"
    );
}
