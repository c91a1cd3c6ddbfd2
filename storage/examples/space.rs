//! `cargo run --release -p rustci-storage --example space [JOBS]`: how big
//! `log.redb` gets for jobs with the largest specs the API accepts (a 256 KiB
//! command and 64 KiB of env), each job submitted, assigned, started and
//! finished in transactions of their own, as the daemon writes them.

use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources};

fn main() {
    let jobs: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("JOBS is a number"))
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let mut store = rustci_storage::LogStore::open(dir.path()).unwrap();
    let mut index = 0;
    let mut frames = 0u64;
    let mut payload = 0u64;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut text = |n: usize| -> String {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (b'a' + (seed % 26) as u8) as char
            })
            .collect()
    };
    for job in 1..=jobs {
        let command = vec!["sh".into(), "-c".into(), text(256 * 1024 - 64)];
        let env = (0..4)
            .map(|i| (format!("V{i}"), text(16 * 1024 - 16)))
            .collect();
        let spec = JobSpec {
            name: format!("big-{job}"),
            command,
            env,
            resources: Resources::new(100, 64),
            constraints: Default::default(),
            priority: 50,
            timeout_secs: 600,
            max_retries: 0,
            workspace: Default::default(),
        };
        payload += spec.command.iter().map(|c| c.len() as u64).sum::<u64>()
            + spec.env.values().map(|v| v.len() as u64).sum::<u64>();
        let events = [
            Event::JobSubmitted {
                spec,
                idempotency_key: None,
            },
            Event::AttemptAssigned {
                job: JobId(job),
                attempt: 1,
                node: "n".into(),
            },
            Event::AttemptStarted {
                job: JobId(job),
                attempt: 1,
            },
            Event::AttemptFinished {
                job: JobId(job),
                attempt: 1,
                outcome: Outcome::Exited,
                exit_code: Some(0),
                usage: None,
            },
        ];
        for event in events {
            index += 1;
            let entry = Entry {
                index,
                term: 1,
                at: index,
                event,
            };
            frames += rustci_storage::encode_entry(&entry).len() as u64;
            store.append(&[entry]).unwrap();
        }
    }
    drop(store);
    let file = std::fs::metadata(dir.path().join("log.redb"))
        .unwrap()
        .len();
    println!(
        "{{\"jobs\": {jobs}, \"entries\": {index}, \"payload_bytes\": {payload}, \"frame_bytes\": {frames}, \"file_bytes\": {file}, \"file_per_frame_byte\": {:.2}}}",
        file as f64 / frames as f64
    );
}
