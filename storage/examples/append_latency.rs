//! `cargo run --release -p rustci-storage --example append_latency`: time of
//! one durable append (one redb write transaction + fsync) for batch sizes.

use std::time::Instant;

use rustci_core::event::{Entry, Event};

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = rustci_storage::LogStore::open(dir.path()).unwrap();
    let mut index = 0;
    for batch in [1usize, 16, 64, 256] {
        let mut times = Vec::new();
        for _ in 0..300 {
            let entries: Vec<Entry> = (0..batch)
                .map(|_| {
                    index += 1;
                    Entry {
                        index,
                        term: 1,
                        at: index,
                        event: Event::NodeDrained { name: "n".into() },
                    }
                })
                .collect();
            let t = Instant::now();
            store.append(&entries).unwrap();
            times.push(t.elapsed().as_micros());
        }
        times.sort();
        println!(
            "batch={batch:4} p50={}us p90={}us p99={}us",
            times[times.len() / 2],
            times[times.len() * 9 / 10],
            times[times.len() * 99 / 100]
        );
    }
}
