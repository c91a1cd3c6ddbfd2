//! Issue 8, item 8: large entries do not blow up the file. Before frames
//! were split into page-sized parts, one 320 KiB entry per transaction made
//! `log.redb` 2.8 times the frames it held.

use std::ops::ControlFlow;

use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobSpec, Resources};
use rustci_storage::{encode_entry, LogStore, ReadError, FRAME_PART_BYTES, LOG_FILE_NAME};

fn big_entry(index: u64, bytes: usize) -> Entry {
    let text: String = (0..bytes)
        .map(|i| (b'a' + ((i * 7 + index as usize) % 26) as u8) as char)
        .collect();
    Entry {
        index,
        term: 1,
        at: index,
        event: Event::JobSubmitted {
            spec: JobSpec {
                name: format!("big-{index}"),
                command: vec!["sh".into(), "-c".into(), text],
                env: Default::default(),
                resources: Resources::new(100, 64),
                constraints: Default::default(),
                priority: 50,
                timeout_secs: 600,
                max_retries: 0,
                workspace: Default::default(),
            },
            idempotency_key: None,
        },
    }
}

fn small_entry(index: u64) -> Entry {
    Entry {
        index,
        term: 1,
        at: index,
        event: Event::NodeDrained { name: "n".into() },
    }
}

fn all(store: &LogStore) -> Result<Vec<Entry>, ReadError> {
    let mut out = Vec::new();
    store.scan(1, |e| {
        out.push(e);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

#[test]
fn forty_large_entries_take_under_one_and_a_half_times_their_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let mut frames = 0u64;
    let mut written = Vec::new();
    let mut index = 0;
    for _ in 0..40 {
        // As the daemon writes a job: one large entry, then small ones, each
        // its own transaction.
        index += 1;
        let big = big_entry(index, 320 * 1024);
        frames += encode_entry(&big).len() as u64;
        store.append(std::slice::from_ref(&big)).unwrap();
        written.push(big);
        for _ in 0..3 {
            index += 1;
            let small = small_entry(index);
            frames += encode_entry(&small).len() as u64;
            store.append(std::slice::from_ref(&small)).unwrap();
            written.push(small);
        }
    }
    assert_eq!(all(&store).unwrap(), written);
    drop(store);
    let file = std::fs::metadata(dir.path().join(LOG_FILE_NAME))
        .unwrap()
        .len();
    let ratio = file as f64 / frames as f64;
    assert!(
        ratio < 1.5,
        "log.redb is {file} bytes for {frames} bytes of frames ({ratio:.2}x)"
    );
    // It reopens with its bounds, and every entry reads back.
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index(), index);
    assert_eq!(all(&store).unwrap(), written);
}

#[test]
fn split_entries_truncate_reopen_and_copy_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    let sizes = [
        10,
        FRAME_PART_BYTES - 200,
        FRAME_PART_BYTES + 1,
        3 * FRAME_PART_BYTES,
        900_000,
    ];
    let entries: Vec<Entry> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| big_entry(i as u64 + 1, *n))
        .collect();
    store.append(&entries).unwrap();
    assert_eq!(store.read_range(1, 10).unwrap(), entries);
    store.truncate_suffix(4).unwrap();
    assert_eq!(store.last_index(), 3);
    assert_eq!(store.term_at(3).unwrap(), Some(1));
    store.append(&entries[3..]).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.last_index(), 5);
    assert_eq!(all(&store).unwrap(), entries);
    let copy = tempfile::tempdir().unwrap();
    store.backup_to(copy.path()).unwrap();
    let copy = LogStore::open_read_only(copy.path()).unwrap();
    assert_eq!(all(&copy).unwrap(), entries);
}

#[test]
fn a_missing_part_is_a_corrupt_entry_naming_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store
        .append(&[small_entry(1), big_entry(2, 50_000), small_entry(3)])
        .unwrap();
    drop(store);
    {
        let db = redb::Database::open(dir.path().join(LOG_FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let parts: redb::TableDefinition<(u64, u32), &[u8]> =
                redb::TableDefinition::new("entry_parts");
            let mut parts = txn.open_table(parts).unwrap();
            parts.remove((2, 3)).unwrap().expect("entry 2 has a part 3");
        }
        txn.commit().unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    let err = all(&store).unwrap_err().to_string();
    assert!(err.contains("corrupt log entry at index 2"), "{err}");
    assert!(err.contains("part 3 is missing"), "{err}");
}
