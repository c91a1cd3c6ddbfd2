//! A data dir knows which cluster it belongs to (issue 8, item 1): with its
//! identity present, a missing, empty or foreign log is refused and nothing
//! is written; a creation that failed part way never blocks the next start;
//! an old data dir (a log, no identity) is adopted. Also: readers never
//! share a lock with the writer (item 2), the clean-shutdown marker, and a
//! consistent copy while the writer appends (item 9).

use std::ops::ControlFlow;
use std::path::Path;

use rustci_core::event::{Entry, Event};
use rustci_storage::{
    Identity, LogStore, OpenError, CLEAN_SHUTDOWN_FILE_NAME, IDENTITY_FILE_NAME, LOG_FILE_NAME,
};

fn leader(index: u64) -> Entry {
    Entry {
        index,
        term: 1,
        at: index,
        event: Event::LeaderElected {
            replica: 1,
            term: 1,
        },
    }
}

fn with_entries(dir: &Path, n: u64) {
    let mut store = LogStore::open(dir).unwrap();
    let from = store.last_index() + 1;
    let entries: Vec<Entry> = (from..from + n).map(leader).collect();
    store.append(&entries).unwrap();
}

fn count(store: &LogStore) -> u64 {
    let mut n = 0;
    store
        .scan(1, |_| {
            n += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    n
}

/// Every file name in `dir`, sorted: to show that a refusal wrote nothing.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_new_data_dir_gets_an_identity_that_the_log_shares() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let id = Identity::read(dir.path()).unwrap().expect("an identity");
    assert_eq!(id.replica_id, 1);
    assert_eq!(id.cluster_id.len(), 32);
    assert_eq!(
        store.read_cluster_id().unwrap(),
        Some(id.cluster_id.clone())
    );
    drop(store);
    // An empty log with its own cluster id is a cluster that never got
    // further than its creation: it opens.
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index(), 0);
    assert_eq!(Identity::read(dir.path()).unwrap(), Some(id));
}

#[test]
fn a_missing_log_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    with_entries(dir.path(), 5);
    std::fs::remove_file(dir.path().join(LOG_FILE_NAME)).unwrap();
    let before = listing(dir.path());
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::LogLost { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("log.redb") && msg.contains("missing"), "{msg}");
    assert!(msg.contains("refusing to start a new cluster"), "{msg}");
    assert_eq!(listing(dir.path()), before, "the refusal wrote nothing");
}

#[test]
fn an_empty_log_is_refused_whether_zero_bytes_or_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    with_entries(dir.path(), 5);
    let log = dir.path().join(LOG_FILE_NAME);
    std::fs::write(&log, b"").unwrap();
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0, "left as it was");

    // A brand-new redb file (tables, no entries, no cluster id).
    std::fs::remove_file(&log).unwrap();
    let db = redb::Database::create(&log).unwrap();
    drop(db);
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::LogLost { .. }), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn another_clusters_log_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    with_entries(a.path(), 3);
    with_entries(b.path(), 3);
    std::fs::copy(b.path().join(LOG_FILE_NAME), a.path().join(LOG_FILE_NAME)).unwrap();
    let err = LogStore::open(a.path()).unwrap_err();
    assert!(matches!(err, OpenError::ForeignLog { .. }), "{err}");
}

#[test]
fn an_old_data_dir_without_identity_is_adopted_with_its_entries() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/log-33623db");
    std::fs::copy(
        Path::new(fixture).join(LOG_FILE_NAME),
        dir.path().join(LOG_FILE_NAME),
    )
    .unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index(), 32);
    assert_eq!(count(&store), 32);
    let id = Identity::read(dir.path()).unwrap().expect("adopted");
    assert_eq!(
        store.read_cluster_id().unwrap(),
        Some(id.cluster_id.clone())
    );
    drop(store);
    // From now on it is guarded like any other.
    std::fs::remove_file(dir.path().join(LOG_FILE_NAME)).unwrap();
    assert!(matches!(
        LogStore::open(dir.path()).unwrap_err(),
        OpenError::LogLost { .. }
    ));
}

#[test]
fn a_creation_that_stopped_part_way_never_blocks_the_next_start() {
    // A full disk during the first start leaves at most the temp file the
    // log is built in, or a log without its identity file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.redb.tmp"), vec![0xAB; 5000]).unwrap();
    std::fs::write(dir.path().join("identity.tmp"), b"format_vers").unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index(), 0);
    drop(store);
    assert!(!dir.path().join("log.redb.tmp").exists());
    assert!(!dir.path().join("identity.tmp").exists());

    // The log was renamed in, the identity never written.
    let id = Identity::read(dir.path()).unwrap().unwrap();
    std::fs::remove_file(dir.path().join(IDENTITY_FILE_NAME)).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        store.read_cluster_id().unwrap(),
        Some(id.cluster_id.clone())
    );
    assert_eq!(
        Identity::read(dir.path()).unwrap().unwrap().cluster_id,
        id.cluster_id
    );

    // A 0-byte log without an identity holds nothing: a new data dir.
    drop(store);
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join(LOG_FILE_NAME), b"").unwrap();
    assert_eq!(LogStore::open(fresh.path()).unwrap().last_index(), 0);
}

#[test]
fn a_garbled_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    with_entries(dir.path(), 1);
    std::fs::write(dir.path().join(IDENTITY_FILE_NAME), b"cluster_id = nope\n").unwrap();
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::Identity { .. }), "{err}");
}

#[test]
fn a_panic_in_the_writer_leaves_readers_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.append(&[leader(1), leader(2)]).unwrap();
    let reader = store.reader();
    rustci_storage::fault::panic_next_append(dir.path());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = store.append(&[leader(3)]);
    }));
    assert!(panicked.is_err(), "the planted fault fired");
    drop(store);
    let read = reader.read_range(1, 10).unwrap();
    assert_eq!(read.len(), 2, "only what committed before the panic");
}

#[test]
fn only_a_clean_close_leaves_the_marker_and_the_next_open_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join(CLEAN_SHUTDOWN_FILE_NAME);
    with_entries(dir.path(), 3); // dropped, not closed cleanly
    assert!(!marker.exists());
    let store = LogStore::open(dir.path()).unwrap(); // runs the integrity check
    store.close_clean();
    assert!(marker.exists());
    let store = LogStore::open(dir.path()).unwrap();
    assert!(!marker.exists(), "gone before anything is written");
    let reader = store.reader();
    store.close_clean(); // a reader is still open: no claim of a clean close
    assert!(!marker.exists());
    drop(reader);
}

#[test]
fn a_damaged_file_index_is_found_at_open_after_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    with_entries(dir.path(), 2000);
    let log = dir.path().join(LOG_FILE_NAME);
    let pristine = std::fs::read(&log).unwrap();
    // Flip bytes page by page until one flip gives an error: a flip that
    // redb's check finds must be reported in the words of the file and its
    // index, as one error, never a panic.
    let mut found = 0;
    for page in (1..pristine.len() / 4096).step_by(3) {
        let mut bytes = pristine.clone();
        for b in &mut bytes[page * 4096 + 64..page * 4096 + 96] {
            *b ^= 0x5A;
        }
        std::fs::write(&log, &bytes).unwrap();
        // (redb's debug builds panic on some damage it finds while reading;
        // start-up and replay turn such a panic into the same message.)
        let opened = std::panic::catch_unwind(|| LogStore::open(dir.path()).map(drop));
        if let Ok(Err(OpenError::Damaged { .. })) = opened {
            found += 1;
            let err = LogStore::open(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("log.redb is corrupt: its index is damaged"),
                "{err}"
            );
        }
    }
    assert!(found > 0, "the integrity check found some of the flips");
}

#[test]
fn a_backup_is_a_consistent_copy_while_the_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store
        .append(&(1..=100).map(leader).collect::<Vec<_>>())
        .unwrap();
    let reader = store.reader();
    let writer = std::thread::spawn(move || {
        for i in 101..=600 {
            store.append(&[leader(i)]).unwrap();
        }
        store
    });
    let copies = tempfile::tempdir().unwrap();
    let mut last = 0;
    for n in 0..5 {
        let to = copies.path().join(format!("copy-{n}"));
        std::fs::create_dir(&to).unwrap();
        let summary = reader.backup_to(&to).unwrap();
        assert!(summary.last_index >= 100 && summary.last_index >= last);
        assert_eq!(summary.entries, summary.last_index);
        last = summary.last_index;
        let copy = LogStore::open_read_only(&to).unwrap();
        assert_eq!(copy.last_index(), summary.last_index);
        assert_eq!(count(&copy), summary.last_index, "a prefix, no gaps");
    }
    writer.join().unwrap();
}
