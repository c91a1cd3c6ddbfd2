//! Properties of the reducer over arbitrary event sequences, valid or not.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources, Usage};
use rustci_core::state::State;

fn node_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string)
}

fn spec() -> impl Strategy<Value = JobSpec> {
    (
        1u64..3000,
        1u64..3000,
        0u8..=100,
        0u32..3,
        prop::option::of(node_name()),
    )
        .prop_map(|(cpu, mem, priority, max_retries, want)| JobSpec {
            name: String::new(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            resources: Resources::new(cpu, mem),
            constraints: want.into_iter().map(|n| ("name".to_string(), n)).collect(),
            priority,
            timeout_secs: 10,
            max_retries,
            workspace: Default::default(),
        })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop::sample::select(vec![
        Outcome::Exited,
        Outcome::TimedOut,
        Outcome::Cancelled,
        Outcome::StartFailed,
    ])
}

/// Events over a small universe of ids, so that many of them are valid.
pub fn event() -> impl Strategy<Value = Event> {
    let job = (0u64..8).prop_map(JobId);
    let attempt = 0u32..4;
    prop_oneof![
        (1u64..4, 0u64..5).prop_map(|(replica, term)| Event::LeaderElected { replica, term }),
        (spec(), prop::option::of("[ab]")).prop_map(|(spec, idempotency_key)| {
            Event::JobSubmitted {
                spec,
                idempotency_key,
            }
        }),
        job.clone().prop_map(|job| Event::JobCancelled { job }),
        (job.clone(), attempt.clone(), node_name())
            .prop_map(|(job, attempt, node)| Event::AttemptAssigned { job, attempt, node }),
        (job.clone(), attempt.clone())
            .prop_map(|(job, attempt)| Event::AttemptStarted { job, attempt }),
        (
            job.clone(),
            attempt.clone(),
            outcome(),
            prop::option::of(-1i32..3),
            prop::option::of((0u64..4096, 0u64..100_000))
        )
            .prop_map(
                |(job, attempt, outcome, exit_code, usage)| Event::AttemptFinished {
                    job,
                    attempt,
                    outcome,
                    exit_code,
                    usage: usage.map(|(peak_memory_mb, cpu_ms)| Usage {
                        peak_memory_mb,
                        cpu_ms
                    }),
                }
            ),
        (job, attempt).prop_map(|(job, attempt)| Event::AttemptLost { job, attempt }),
        (node_name(), 0u64..4000, 0u64..4000, 0u64..3).prop_map(|(name, c, m, incarnation)| {
            Event::NodeRegistered {
                labels: [("name".to_string(), name.clone())].into(),
                name,
                capacity: Resources::new(c, m),
                incarnation,
                predecessor: None,
            }
        }),
        node_name().prop_map(|name| Event::NodeDrained { name }),
        node_name().prop_map(|name| Event::NodeDown {
            name,
            incarnation: 0
        }),
        node_name().prop_map(|name| Event::NodeUp {
            name,
            incarnation: 0
        }),
        node_name().prop_map(|name| Event::NodeRemoved {
            name,
            reason: "r".into()
        }),
        node_name().prop_map(|name| Event::NodeUndrained { name }),
        (0u64..200_000).prop_map(|before| Event::IdempotencyKeysExpired { before }),
    ]
}

fn entries(events: Vec<(Event, u64)>) -> Vec<Entry> {
    let mut at = 0;
    events
        .into_iter()
        .enumerate()
        .map(|(i, (event, dt))| {
            at += dt;
            Entry {
                index: i as u64 + 1,
                term: 1,
                at,
                event,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// apply never panics, keeps the state consistent after every step, and
    /// one-by-one application equals replay from scratch, digest for digest.
    #[test]
    fn reducer_is_total_consistent_and_replayable(
        events in prop::collection::vec((event(), 0u64..5_000), 0..120)
    ) {
        let log = entries(events);
        let mut live = State::new();
        for (i, entry) in log.iter().enumerate() {
            live.apply(entry);
            if let Err(e) = live.check_consistency() {
                return Err(TestCaseError::fail(format!("after entry {}: {e}", i + 1)));
            }
            // Terminal jobs stay terminal: checked by comparing with the prefix.
        }
        let replayed = State::replay(&log);
        prop_assert_eq!(live.digest(), replayed.digest());
        prop_assert_eq!(&live, &replayed);
        let mut owned = State::new();
        for entry in log.iter().cloned() {
            owned.apply_owned(entry);
        }
        prop_assert_eq!(&live, &owned, "apply_owned (replay's path) equals apply");
    }

    /// Terminal jobs stay terminal whatever comes after.
    #[test]
    fn reducer_terminal_jobs_stay_terminal(
        events in prop::collection::vec((event(), 0u64..5_000), 0..120)
    ) {
        let log = entries(events);
        let mut state = State::new();
        let mut terminal: BTreeMap<JobId, rustci_core::model::JobState> = BTreeMap::new();
        for entry in &log {
            state.apply(entry);
            for (id, s) in &terminal {
                prop_assert_eq!(state.jobs[id].state, *s, "job {} left its terminal state", id);
            }
            for (id, job) in state.jobs.iter() {
                if job.state.is_terminal() {
                    terminal.insert(*id, job.state);
                }
            }
        }
    }
}

#[test]
fn digest_differs_when_state_differs() {
    let a = State::new();
    let mut b = State::new();
    b.apply(&Entry {
        index: 1,
        term: 1,
        at: 5,
        event: Event::NodeDrained { name: "x".into() },
    });
    assert_ne!(a.digest(), b.digest());
}
