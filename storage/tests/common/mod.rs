//! Shared test helpers: proptest strategies for events and entries.
#![allow(dead_code)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources, Usage};

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9-]{0,12}"
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(name(), name(), 0..3)
}

fn resources() -> impl Strategy<Value = Resources> {
    (any::<u64>(), any::<u64>()).prop_map(|(c, m)| Resources::new(c, m))
}

fn spec() -> impl Strategy<Value = JobSpec> {
    (
        name(),
        proptest::collection::vec(".{0,8}", 0..4),
        labels(),
        resources(),
        labels(),
        any::<u8>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(name, command, env, resources, constraints, priority, timeout_secs, max_retries)| {
                JobSpec {
                    name,
                    command,
                    env,
                    resources,
                    constraints,
                    priority,
                    timeout_secs,
                    max_retries,
                    workspace: Default::default(),
                }
            },
        )
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Exited),
        Just(Outcome::TimedOut),
        Just(Outcome::Cancelled),
        Just(Outcome::StartFailed),
    ]
}

pub fn event() -> impl Strategy<Value = Event> {
    let job = any::<u64>().prop_map(JobId);
    prop_oneof![
        (any::<u64>(), any::<u64>())
            .prop_map(|(replica, term)| Event::LeaderElected { replica, term }),
        (spec(), proptest::option::of(name())).prop_map(|(spec, idempotency_key)| {
            Event::JobSubmitted {
                spec,
                idempotency_key,
            }
        }),
        job.clone().prop_map(|job| Event::JobCancelled { job }),
        (job.clone(), any::<u32>(), name())
            .prop_map(|(job, attempt, node)| Event::AttemptAssigned { job, attempt, node }),
        (job.clone(), any::<u32>())
            .prop_map(|(job, attempt)| Event::AttemptStarted { job, attempt }),
        (
            job.clone(),
            any::<u32>(),
            outcome(),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<(u64, u64)>())
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
        (job, any::<u32>()).prop_map(|(job, attempt)| Event::AttemptLost { job, attempt }),
        (name(), resources(), labels(), any::<u64>()).prop_map(
            |(name, capacity, labels, incarnation)| Event::NodeRegistered {
                name,
                capacity,
                labels,
                incarnation,
                predecessor: None,
            }
        ),
        name().prop_map(|name| Event::NodeDrained { name }),
        (name(), 0u64..3).prop_map(|(name, incarnation)| Event::NodeDown { name, incarnation }),
        (name(), 0u64..3).prop_map(|(name, incarnation)| Event::NodeUp { name, incarnation }),
        name().prop_map(|name| Event::NodeRemoved {
            name,
            reason: String::new()
        }),
        any::<u64>().prop_map(|before| Event::IdempotencyKeysExpired { before }),
    ]
}

/// A contiguous run of entries from index `first`, with non-decreasing terms
/// and timestamps.
pub fn entries(first: u64, len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Entry>> {
    proptest::collection::vec((event(), 0..2u64, 0..1000u64), len).prop_map(move |steps| {
        let (mut term, mut at) = (1, 1_700_000_000_000);
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (event, term_step, at_step))| {
                term += term_step;
                at += at_step;
                Entry {
                    index: first + i as u64,
                    term,
                    at,
                    event,
                }
            })
            .collect()
    })
}

/// A plain entry for tests that do not care about the event.
pub fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        at: 1_700_000_000_000 + index,
        event: Event::NodeUp {
            name: format!("node-{index}"),
            incarnation: 0,
        },
    }
}

pub fn run(first: u64, last: u64, term: u64) -> Vec<Entry> {
    (first..=last).map(|i| entry(i, term)).collect()
}
