//! How fast `LogStore::scan` decodes a log of small entries.
//!
//! `cargo run --release -p rustci-storage --example scan_speed [entries]`
//! (default 1,000,000). Writes a synthetic log to a temp dir, reopens it, and
//! prints entries/s for a full scan and for frame decoding alone.

use std::ops::ControlFlow;
use std::time::Instant;

use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, Outcome};
use rustci_storage::{decode_entry, encode_entry, LogStore, APPEND_BATCH_ENTRIES_MAX};

fn synthetic(index: u64) -> Entry {
    let job = JobId(index / 4);
    let event = match index % 4 {
        0 => Event::AttemptAssigned {
            job,
            attempt: 1,
            node: format!("node-{}", index % 64),
        },
        1 => Event::AttemptStarted { job, attempt: 1 },
        2 => Event::AttemptFinished {
            job,
            attempt: 1,
            outcome: Outcome::Exited,
            exit_code: Some(0),
            usage: None,
        },
        _ => Event::JobCancelled { job },
    };
    Entry {
        index,
        term: 1 + index / 100_000,
        at: 1_700_000_000_000 + index,
        event,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let write_started = Instant::now();
    {
        let mut store = LogStore::open(dir.path())?;
        let mut next = 1;
        while next <= total {
            let last = (next + APPEND_BATCH_ENTRIES_MAX as u64 - 1).min(total);
            let batch: Vec<Entry> = (next..=last).map(synthetic).collect();
            store.append(&batch)?;
            next = last + 1;
        }
    }
    let write_s = write_started.elapsed().as_secs_f64();
    let size = std::fs::metadata(dir.path().join("log.redb"))?.len();
    println!(
        "wrote {total} entries in {write_s:.2}s ({:.0}/s), log.redb {} MiB",
        total as f64 / write_s,
        size >> 20
    );

    let store = LogStore::open_read_only(dir.path())?;
    for round in 1..=3 {
        let started = Instant::now();
        let mut count = 0u64;
        let mut checksum = 0u64;
        store.scan(1, |entry| {
            count += 1;
            checksum = checksum.wrapping_add(entry.at);
            ControlFlow::Continue(())
        })?;
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(count, total);
        println!(
            "scan round {round}: {count} entries in {secs:.3}s = {:.2} M entries/s (checksum {checksum})",
            count as f64 / secs / 1e6
        );
    }

    // redb alone: the same range walk, without checksum or decode.
    let db = redb::ReadOnlyDatabase::open(dir.path().join("log.redb"))?;
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
    let txn = redb::ReadableDatabase::begin_read(&db)?;
    let table = txn.open_table(table)?;
    let started = Instant::now();
    let mut bytes = 0usize;
    for item in redb::ReadableTable::range(&table, 1..)? {
        let (_, frame) = item?;
        bytes += frame.value().len();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "redb range walk only: {total} entries in {secs:.3}s = {:.2} M entries/s ({bytes} bytes)",
        total as f64 / secs / 1e6
    );

    let frames: Vec<(u64, Vec<u8>)> = (1..=total.min(1_000_000))
        .map(|i| (i, encode_entry(&synthetic(i))))
        .collect();
    let started = Instant::now();
    let mut checksum = 0u64;
    for (index, frame) in &frames {
        checksum = checksum.wrapping_add(decode_entry(*index, frame)?.at);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "decode only: {} frames in {secs:.3}s = {:.2} M frames/s (checksum {checksum}); mean frame {} bytes",
        frames.len(),
        frames.len() as f64 / secs / 1e6,
        frames.iter().map(|(_, f)| f.len()).sum::<usize>() / frames.len().max(1)
    );
    Ok(())
}
