//! The reducer's fuzz target, as a plain function so that `fuzz/` (nightly,
//! libFuzzer) and the stable corpus replay (`core/tests/fuzz_corpus.rs`)
//! run the very same code. Not part of the API.
//!
//! [`entries_from_bytes`] is a hand decoder: raw bytes become entries over a
//! small universe (job ids 0..=8, where 0 never exists; three node names;
//! attempt numbers 0..=4; a few resource sizes and labels), so that a large
//! share of the events are valid in the state they meet and the fuzzer
//! reaches deep job and node histories instead of a wall of no-ops. It needs
//! no dependency, so core's dependency tree is unchanged.

use std::collections::BTreeMap;

use crate::event::{Entry, Event};
use crate::model::{JobId, JobSpec, JobState, Labels, Outcome, Resources, Usage};
use crate::state::{Applied, State};

/// Most entries one input decodes to; keeps every run fast (each step checks
/// the whole state).
pub const ENTRIES_MAX: usize = 512;

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const CPU: [u64; 4] = [0, 1000, 3000, u64::MAX];
const MEMORY: [u64; 4] = [0, 256, 4096, u64::MAX];
const CAPACITY_CPU: [u64; 4] = [0, 2000, 8000, u64::MAX];
const CAPACITY_MEMORY: [u64; 4] = [0, 1024, 16384, u64::MAX];

/// Bytes in order; reads past the end give 0, so every input decodes.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn job(&mut self) -> JobId {
        JobId(u64::from(self.next() % 9))
    }

    fn attempt(&mut self) -> u32 {
        u32::from(self.next() % 5)
    }

    fn node(&mut self) -> String {
        NODES[usize::from(self.next()) % NODES.len()].to_string()
    }
}

fn labels(selector: u8) -> Labels {
    match selector & 3 {
        1 => BTreeMap::from([("os".to_string(), "linux".to_string())]),
        2 => BTreeMap::from([("os".to_string(), "mac".to_string())]),
        _ => BTreeMap::new(),
    }
}

/// Decodes `data` into a contiguous log from index 1: one tag byte per entry
/// (`tag % 14` picks the event kind, `tag / 14` advances the clock by that
/// many seconds), then one byte per parameter. Terms only grow.
pub fn entries_from_bytes(data: &[u8]) -> Vec<Entry> {
    let mut bytes = Bytes(data);
    let mut entries = Vec::new();
    let (mut term, mut at) = (1u64, 1_700_000_000_000u64);
    while !bytes.0.is_empty() && entries.len() < ENTRIES_MAX {
        let tag = bytes.next();
        at += u64::from(tag / 14) * 1000;
        let event = match tag % 14 {
            0 => {
                let b = bytes.next();
                term += u64::from(b >> 7);
                Event::LeaderElected {
                    replica: 1 + u64::from(b % 3),
                    term,
                }
            }
            1 => {
                let (size, sched, key) = (bytes.next(), bytes.next(), bytes.next());
                Event::JobSubmitted {
                    spec: JobSpec {
                        name: String::new(),
                        command: vec!["true".to_string()],
                        env: BTreeMap::new(),
                        resources: Resources::new(
                            CPU[usize::from(size & 3)],
                            MEMORY[usize::from((size >> 2) & 3)],
                        ),
                        constraints: labels(size >> 4),
                        priority: [0, 50, 100][usize::from(sched % 3)],
                        timeout_secs: 10,
                        max_retries: u32::from((sched >> 2) % 3),
                        workspace: Default::default(),
                    },
                    idempotency_key: match key % 5 {
                        0 => None,
                        k => Some(format!("k{k}")),
                    },
                }
            }
            2 => Event::JobCancelled { job: bytes.job() },
            3 => Event::AttemptAssigned {
                job: bytes.job(),
                attempt: bytes.attempt(),
                node: bytes.node(),
            },
            4 => Event::AttemptStarted {
                job: bytes.job(),
                attempt: bytes.attempt(),
            },
            5 => {
                let (job, attempt, b) = (bytes.job(), bytes.attempt(), bytes.next());
                Event::AttemptFinished {
                    job,
                    attempt,
                    outcome: [
                        Outcome::Exited,
                        Outcome::TimedOut,
                        Outcome::Cancelled,
                        Outcome::StartFailed,
                    ][usize::from(b & 3)],
                    exit_code: [None, Some(0), Some(1), Some(-9)][usize::from((b >> 2) & 3)],
                    usage: (b & 0x10 != 0).then(|| Usage {
                        peak_memory_mb: u64::from(b >> 5),
                        cpu_ms: u64::from(b),
                    }),
                }
            }
            6 => Event::AttemptLost {
                job: bytes.job(),
                attempt: bytes.attempt(),
            },
            7 => {
                let (name, b) = (bytes.node(), bytes.next());
                Event::NodeRegistered {
                    name,
                    capacity: Resources::new(
                        CAPACITY_CPU[usize::from(b & 3)],
                        CAPACITY_MEMORY[usize::from((b >> 2) & 3)],
                    ),
                    labels: labels(b >> 4),
                    incarnation: u64::from(b >> 6),
                    predecessor: (b & 0x20 != 0).then_some(u64::from(b >> 6).saturating_sub(1)),
                }
            }
            8 => Event::NodeDrained { name: bytes.node() },
            9 => Event::NodeDown {
                name: bytes.node(),
                incarnation: u64::from(bytes.next() >> 6),
            },
            10 => Event::NodeUp {
                name: bytes.node(),
                incarnation: u64::from(bytes.next() >> 6),
            },
            11 => Event::NodeRemoved {
                name: bytes.node(),
                reason: String::new(),
            },
            12 => Event::NodeUndrained { name: bytes.node() },
            _ => Event::IdempotencyKeysExpired {
                before: at.saturating_sub(u64::from(bytes.next()) * 1000),
            },
        };
        entries.push(Entry {
            index: entries.len() as u64 + 1,
            term,
            at,
            event,
        });
    }
    entries
}

/// The reducer target over raw bytes: [`entries_from_bytes`], then [`reducer`].
pub fn reducer_bytes(data: &[u8]) {
    reducer(&entries_from_bytes(data));
}

/// Folds `entries` one by one and panics if an invariant breaks:
/// - `apply` never panics, and `check_consistency` holds after every step;
/// - `apply_owned` gives the same answer and the same state as `apply`;
/// - an `Ignored` entry changes nothing but the applied position and the
///   ignored count, and a `Duplicate` nothing but the applied position
///   (compared by digest, so no step clones the state);
/// - a terminal job never changes state again, and jobs are never removed;
/// - replaying from scratch gives the live state (compared by digest too).
pub fn reducer(entries: &[Entry]) {
    let mut live = State::new();
    let mut owned = State::new();
    // The terminal state each job reached, if it did.
    let mut terminal: Vec<Option<JobState>> = Vec::new();
    for entry in entries {
        let before = live.digest();
        let position = (live.applied_index, live.applied_term, live.last_at);
        let applied = live.apply(entry);
        assert_eq!(owned.apply_owned(entry.clone()), applied, "at {entry:?}");
        assert!(owned == live, "apply_owned and apply disagree at {entry:?}");
        if let Err(why) = live.check_consistency() {
            panic!("inconsistent after {entry:?} ({applied:?}): {why}");
        }
        assert_eq!(live.applied_index, entry.index);
        assert!(live.jobs.len() >= terminal.len(), "a job disappeared");
        terminal.resize(live.jobs.len(), None);
        for (job, end) in live.jobs.values().zip(terminal.iter_mut()) {
            match end {
                Some(end) => assert_eq!(job.state, *end, "terminal job {} changed", job.id),
                None if job.state.is_terminal() => *end = Some(job.state),
                None => {}
            }
        }
        let no_op = match applied {
            Applied::Ignored(_) => Some(1),
            Applied::Duplicate(_) => Some(0),
            Applied::Submitted(id) => {
                assert_eq!(id.0, live.jobs.len() as u64, "ids are dense");
                None
            }
            Applied::Done | Applied::Assigned { .. } | Applied::CancelActive { .. } => None,
        };
        if let Some(ignored) = no_op {
            // Rewind the position and the count; the rest must be as before.
            let now = (live.applied_index, live.applied_term, live.last_at);
            (live.applied_index, live.applied_term, live.last_at) = position;
            live.ignored_entries -= ignored;
            assert_eq!(live.digest(), before, "{applied:?} but changed: {entry:?}");
            (live.applied_index, live.applied_term, live.last_at) = now;
            live.ignored_entries += ignored;
        }
    }
    let replayed = State::replay(entries);
    assert_eq!(replayed.digest(), live.digest(), "replay digest differs");
    assert!(replayed == live, "replay differs");
}
