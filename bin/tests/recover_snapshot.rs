//! Start-up from a compacted log: recovery begins at the stored snapshot
//! and replays only the entries after it, to the same state a full log
//! gives. These tests compact the store by hand, with histories chosen to
//! reach every kind of entry.

use std::collections::BTreeMap;

use rustci::daemon::{recover_store, replay_store};
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources};
use rustci_core::state::State;
use rustci_storage::{encode_snapshot, HardState, LogStore};

/// Three nodes, then jobs submitted, placed, started and most finished;
/// the term goes up once along the way.
fn history() -> Vec<Entry> {
    let mut events = Vec::new();
    for (i, name) in ["n1", "n2", "n3"].into_iter().enumerate() {
        events.push(Event::NodeRegistered {
            name: name.to_string(),
            capacity: Resources::new(64_000, 64_000),
            labels: BTreeMap::new(),
            incarnation: 1 + i as u64,
            predecessor: None,
        });
    }
    for id in 1..=50u64 {
        events.push(Event::JobSubmitted {
            spec: JobSpec {
                name: format!("job-{id}"),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                resources: Resources::new(500, 256),
                constraints: BTreeMap::new(),
                priority: (id % 3) as u8 * 50,
                timeout_secs: 60,
                max_retries: 1,
                workspace: Default::default(),
            },
            idempotency_key: (id % 4 == 0).then(|| format!("key-{id}")),
        });
        let job = JobId(id);
        events.push(Event::AttemptAssigned {
            job,
            attempt: 1,
            node: ["n1", "n2", "n3"][id as usize % 3].to_string(),
        });
        events.push(Event::AttemptStarted { job, attempt: 1 });
        if id % 5 != 0 {
            events.push(Event::AttemptFinished {
                job,
                attempt: 1,
                outcome: Outcome::Exited,
                exit_code: Some((id % 7 == 0) as i32),
                usage: None,
            });
        }
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Entry {
            index: i as u64 + 1,
            term: if i < 100 { 1 } else { 2 },
            at: 1_700_000_000_000 + 1000 * i as u64,
            event,
        })
        .collect()
}

fn store_with(dir: &std::path::Path, log: &[Entry], commit: u64) -> LogStore {
    let mut store = LogStore::open(dir).unwrap();
    store.append(log).unwrap();
    store
        .set_hard_state(&HardState {
            term: 2,
            voted_for: None,
            commit,
        })
        .unwrap();
    store
}

fn compact(store: &mut LogStore, log: &[Entry], index: u64) {
    let state = State::replay(&log[..index as usize]);
    let term = log[index as usize - 1].term;
    store
        .compact_to(index, term, &encode_snapshot(&state))
        .unwrap();
}

#[test]
fn recovery_from_a_snapshot_equals_recovery_from_the_whole_log() {
    let log = history();
    assert!(log.len() > 190, "{} entries", log.len());
    let (whole, compacted) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = recover_store(&store_with(whole.path(), &log, 150)).unwrap();
    let mut store = store_with(compacted.path(), &log, 150);
    compact(&mut store, &log, 120);
    drop(store);
    let store = LogStore::open(compacted.path()).unwrap();
    assert_eq!(store.first_index(), 121);
    let resumed = recover_store(&store).unwrap();
    assert_eq!(resumed.state.applied_index, 150);
    assert!(resumed.state == full.state, "the same state");
    assert_eq!(resumed.state.digest(), full.state.digest());
    resumed.state.check_consistency().unwrap();
    assert_eq!(resumed.hard_state, full.hard_state);
    assert_eq!(resumed.last_index, full.last_index);
    assert_eq!(
        resumed.tail, full.tail,
        "the entries after the commit index"
    );
    assert_eq!(full.runs, vec![(1, 1), (101, 2)]);
    assert_eq!(
        resumed.runs,
        vec![(121, 2)],
        "runs start after the snapshot"
    );
    let replayed = replay_store(&store).unwrap();
    assert!(replayed == State::replay(&log), "rustci's replay_store too");
}

#[test]
fn recovery_from_a_snapshot_ahead_of_the_stored_commit_index_counts_it_committed() {
    let log = history();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), &log, 150);
    compact(&mut store, &log, 180);
    let recovery = recover_store(&store).unwrap();
    assert_eq!(recovery.hard_state.commit, 180);
    assert_eq!(recovery.state.applied_index, 180);
    assert!(recovery.state == State::replay(&log[..180]));
    assert_eq!(recovery.tail, log[180..].to_vec());
}

#[test]
fn recovery_refuses_a_snapshot_of_another_index_or_garbage() {
    let log = history();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), &log, 150);
    let wrong = encode_snapshot(&State::replay(&log[..90]));
    store.compact_to(100, 1, &wrong).unwrap();
    let e = recover_store(&store).unwrap_err().to_string();
    assert!(e.contains("not at index 100"), "{e}");
    store.compact_to(110, 2, b"not a snapshot at all").unwrap();
    let e = format!("{:#}", recover_store(&store).unwrap_err());
    assert!(
        e.contains("snapshot at index 110") && e.contains("not a snapshot"),
        "{e}"
    );
}
