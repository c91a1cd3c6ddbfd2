//! A log written by an earlier release (commit 33623db, before events gained
//! incarnations and `NodeUndrained`) still opens, decodes and replays: events
//! evolve only by new variants and new trailing `#[serde(default)]` fields
//! (docs/storage.md).
//!
//! The fixture was made with that release's `rustci dev`: a job that
//! succeeded, one that failed after its retry, an idempotent duplicate, an
//! unplaceable job, a cancel of a running job, a time-out, a drain, a
//! `kill -9` with a job queued behind the drain, a restart, and a graceful
//! stop.

use std::ops::ControlFlow;
use std::path::Path;

use rustci_core::event::Event;
use rustci_core::model::{
    AttemptState, Checkout, JobId, JobSpec, JobState, NodeState, Resources, Workspace,
};
use rustci_core::state::State;
use rustci_storage::LogStore;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/log-33623db");

#[test]
fn a_log_written_by_release_33623db_still_replays() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(FIXTURE).join("log.redb"),
        dir.path().join("log.redb"),
    )
    .unwrap();
    let store = LogStore::open_read_only(dir.path()).unwrap();
    assert_eq!(store.last_index(), 32);
    let mut entries = Vec::new();
    store
        .scan(1, |e| {
            entries.push(e);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(entries.len(), 32);
    let leaders = entries
        .iter()
        .filter(|e| matches!(e.event, Event::LeaderElected { .. }))
        .count();
    assert_eq!(leaders, 2, "two starts of the daemon");

    let state = State::replay(&entries);
    state.check_consistency().unwrap();
    let owned = entries.iter().cloned().fold(State::new(), |mut s, e| {
        s.apply_owned(e);
        s
    });
    assert_eq!(owned.digest(), state.digest());

    let job = |id: u64| state.job(JobId(id)).unwrap();
    let states: Vec<(&str, JobState)> = (1..=8)
        .map(|id| (job(id).spec.name.as_str(), job(id).state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("ok", JobState::Succeeded),
            ("fails", JobState::Failed),
            ("keyed", JobState::Succeeded),
            ("nowhere", JobState::Queued),
            ("long", JobState::Cancelled),
            ("timeout", JobState::Failed),
            ("queued-while-drained", JobState::Queued),
            ("running-at-crash", JobState::Queued),
        ]
    );
    assert_eq!(state.jobs.len(), 8, "the duplicate key made no job");
    assert_eq!(job(2).attempts.len(), 2);
    assert_eq!(job(2).exit_code(), Some(3));
    assert_eq!(job(5).attempts[0].state, AttemptState::Cancelled);
    assert_eq!(job(6).attempts[0].state, AttemptState::TimedOut);
    // The log never recorded an attempt's node incarnation: the reducer
    // derives it from the registration in force at the placement.
    let first_registration = entries
        .iter()
        .find_map(|e| match &e.event {
            Event::NodeRegistered { incarnation, .. } => Some(*incarnation),
            _ => None,
        })
        .unwrap();
    assert_eq!(job(1).attempts[0].incarnation, first_registration);
    let node = &state.nodes["fixture-node"];
    assert_eq!(node.state, NodeState::Draining);
}

/// The shape `NodeDown` and `NodeUp` had before they named an incarnation.
#[derive(serde::Serialize)]
#[allow(clippy::enum_variant_names)] // the names are the events' own
enum EventBeforeIncarnations {
    NodeDown { name: String },
    NodeUp { name: String },
    NodeRemoved { name: String },
}

#[test]
fn an_event_written_before_it_gained_a_field_decodes_with_the_default() {
    for (old, want) in [
        (
            EventBeforeIncarnations::NodeDown { name: "n1".into() },
            Event::NodeDown {
                name: "n1".into(),
                incarnation: 0,
            },
        ),
        (
            EventBeforeIncarnations::NodeUp { name: "n2".into() },
            Event::NodeUp {
                name: "n2".into(),
                incarnation: 0,
            },
        ),
        (
            EventBeforeIncarnations::NodeRemoved { name: "n3".into() },
            Event::NodeRemoved {
                name: "n3".into(),
                reason: String::new(),
            },
        ),
    ] {
        let mut bytes = Vec::new();
        rmp_serde::encode::write(&mut bytes, &old).unwrap();
        let decoded: Event = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded, want);
    }
}

/// The shape `JobSpec` had before it gained `workspace` (`workdir` and
/// `checkout`).
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct SpecBeforeWorkspace {
    name: String,
    command: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
    resources: Resources,
    constraints: std::collections::BTreeMap<String, String>,
    priority: u8,
    timeout_secs: u64,
    max_retries: u32,
}

fn spec(workspace: Workspace) -> JobSpec {
    JobSpec {
        name: "build".into(),
        command: vec!["make".into(), "test".into()],
        env: [("K".to_string(), "v".to_string())].into(),
        resources: Resources::new(500, 128),
        constraints: [("os".to_string(), "linux".to_string())].into(),
        priority: 70,
        timeout_secs: 60,
        max_retries: 2,
        workspace,
    }
}

#[test]
fn a_spec_without_workspace_encodes_as_before_so_old_logs_and_old_agents_read_it() {
    let old = SpecBeforeWorkspace {
        name: "build".into(),
        command: vec!["make".into(), "test".into()],
        env: [("K".to_string(), "v".to_string())].into(),
        resources: Resources::new(500, 128),
        constraints: [("os".to_string(), "linux".to_string())].into(),
        priority: 70,
        timeout_secs: 60,
        max_retries: 2,
    };
    let old_bytes = rmp_serde::to_vec(&old).unwrap();
    // Old bytes (a log, a server) decode with the default.
    let decoded: JobSpec = rmp_serde::from_slice(&old_bytes).unwrap();
    assert_eq!(decoded, spec(Workspace::Fresh));
    // A spec that does not use it is encoded byte for byte as before: an
    // agent of the previous release decodes it.
    assert_eq!(
        rmp_serde::to_vec(&spec(Workspace::Fresh)).unwrap(),
        old_bytes
    );
    let back: SpecBeforeWorkspace =
        rmp_serde::from_slice(&rmp_serde::to_vec(&spec(Workspace::Fresh)).unwrap()).unwrap();
    assert_eq!(back, old);
    // One that uses it round-trips.
    for workspace in [
        Workspace::Dir("/srv/project".into()),
        Workspace::Checkout(Checkout {
            repo: "file:///srv/git/project.git".into(),
            git_ref: "v1.2".into(),
        }),
    ] {
        let bytes = rmp_serde::to_vec(&spec(workspace.clone())).unwrap();
        let decoded: JobSpec = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded.workspace, workspace);
    }
}
