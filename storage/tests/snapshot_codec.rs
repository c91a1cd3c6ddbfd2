//! The snapshot codec: a snapshot taken anywhere in a log, decoded and
//! followed by the rest of the log, is the state a full replay gives; every
//! damaged or foreign input is an error, never a panic.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rustci_core::event::{Entry, Event};
use rustci_core::fuzzing::entries_from_bytes;
use rustci_core::model::{JobId, JobSpec, Outcome, Resources, Usage};
use rustci_core::state::State;
use rustci_storage::snapshot::{open_snapshot, SNAPSHOT_FORMAT, SNAPSHOT_HEADER_BYTES};
use rustci_storage::{decode_snapshot, encode_snapshot, SnapshotError};

/// A log of `len` bytes of input from a fixed generator (an LCG), so the
/// test is the same on every run: the fuzz decoder turns them into a dense
/// history of submissions, placements, results and node changes.
fn deterministic_log(seed: u64, len: usize) -> Vec<Entry> {
    let mut x = seed;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) as u8
        })
        .collect();
    entries_from_bytes(&bytes)
}

/// Replays `log[..split]`, snapshots, decodes, applies the rest, and checks
/// the result against a replay of everything.
fn assert_snapshot_then_rest_equals_replay(log: &[Entry], split: usize) -> State {
    let full = State::replay(log);
    let before = State::replay(&log[..split]);
    let bytes = encode_snapshot(&before);
    let mut resumed = decode_snapshot(&bytes).unwrap_or_else(|e| panic!("split {split}: {e}"));
    // The derived indexes after decode are those a replay builds.
    assert!(resumed == before, "split {split}: decoded state differs");
    assert_eq!(resumed.digest(), before.digest());
    assert_eq!(resumed.queue, before.queue, "split {split}: queue");
    assert_eq!(resumed.active_by_node, before.active_by_node);
    assert_eq!(resumed.job_counts, before.job_counts);
    assert_eq!(resumed.key_times, before.key_times);
    if let Err(why) = resumed.check_consistency() {
        panic!("split {split}: decoded state inconsistent: {why}");
    }
    assert_eq!(encode_snapshot(&resumed), bytes, "split {split}: re-encode");
    for entry in &log[split..] {
        resumed.apply(entry);
    }
    if let Err(why) = resumed.check_consistency() {
        panic!("split {split}: inconsistent after the rest: {why}");
    }
    assert_eq!(resumed.digest(), full.digest(), "split {split}: digest");
    assert!(resumed == full, "split {split}: state differs from replay");
    before
}

#[test]
fn snapshot_codec_a_snapshot_anywhere_in_a_busy_history_then_the_rest_equals_a_full_replay() {
    for seed in 1..=4 {
        let log = History::new(seed).entries(3000);
        let splits = (0..=log.len())
            .filter(|i| i % 23 == 0 || *i + 30 > log.len() || *i < 30)
            .collect::<Vec<_>>();
        let mut seen = Richness::default();
        for split in splits {
            seen.add(&assert_snapshot_then_rest_equals_replay(&log, split));
        }
        seen.assert_complete();
    }
}

#[test]
fn snapshot_codec_a_snapshot_at_every_index_of_fuzz_logs() {
    for seed in 1..=4 {
        let log = deterministic_log(seed, 4096);
        assert_eq!(log.len(), rustci_core::fuzzing::ENTRIES_MAX);
        for split in 0..=log.len() {
            assert_snapshot_then_rest_equals_replay(&log, split);
        }
    }
}

/// What the snapshots of a test held: every field of the image must be
/// exercised somewhere, so that a codec that drops one fails.
#[derive(Debug, Default)]
struct Richness {
    job_states: [bool; 6],
    attempts_lost: bool,
    ignored_entries: bool,
    idempotency: bool,
    active: bool,
    leader: bool,
    restarted_node: bool,
    left_reason: bool,
}

impl Richness {
    fn add(&mut self, state: &State) {
        for (seen, count) in self.job_states.iter_mut().zip(state.job_counts) {
            *seen |= count > 0;
        }
        self.attempts_lost |= state.attempts_lost > 0;
        self.ignored_entries |= state.ignored_entries > 0;
        self.idempotency |= !state.idempotency.is_empty();
        self.active |= !state.active_by_node.is_empty();
        self.leader |= state.leader.is_some() && state.leader_term > 0;
        self.restarted_node |= state.nodes.values().any(|n| n.incarnation > 5);
        self.left_reason |= state.nodes.values().any(|n| n.left_reason.is_some());
    }

    fn assert_complete(&self) {
        let all = self.job_states.iter().all(|s| *s)
            && self.attempts_lost
            && self.ignored_entries
            && self.idempotency
            && self.active
            && self.leader
            && self.restarted_node
            && self.left_reason;
        assert!(all, "a part of the state was never snapshotted: {self:?}");
    }
}

/// A busy, mostly valid history, drawn by looking at the state it builds:
/// submissions, placements of queued jobs, starts and results of active
/// attempts, losses, cancels, node restarts, drains, downs and removals,
/// key expiry and elections. A small LCG keeps it the same on every run.
struct History {
    rng: u64,
    state: State,
    log: Vec<Entry>,
    term: u64,
    at: u64,
    incarnations: u64,
}

const NODES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];

impl History {
    fn new(seed: u64) -> History {
        History {
            rng: seed,
            state: State::new(),
            log: Vec::new(),
            term: 1,
            at: 1_700_000_000_000,
            incarnations: 0,
        }
    }

    fn next(&mut self, below: u64) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.rng >> 33) % below.max(1)
    }

    fn entries(mut self, count: usize) -> Vec<Entry> {
        for node in NODES {
            let event = self.register(node);
            self.push(event);
        }
        while self.log.len() < count {
            let event = self.event();
            self.push(event);
        }
        self.log
    }

    fn push(&mut self, event: Event) {
        self.at += self.next(2000);
        let entry = Entry {
            index: self.log.len() as u64 + 1,
            term: self.term,
            at: self.at,
            event,
        };
        self.state.apply(&entry);
        self.log.push(entry);
    }

    fn register(&mut self, name: &str) -> Event {
        self.incarnations += 1;
        let old = self.state.nodes.get(name).map(|n| n.incarnation);
        let labels = if self.next(2) == 0 {
            BTreeMap::from([("os".to_string(), "linux".to_string())])
        } else {
            BTreeMap::new()
        };
        Event::NodeRegistered {
            name: name.to_string(),
            capacity: Resources::new(4000 + 1000 * self.next(4), 8192),
            labels,
            incarnation: self.incarnations,
            predecessor: old.filter(|_| self.next(2) == 0),
        }
    }

    fn node(&mut self) -> String {
        NODES[self.next(NODES.len() as u64) as usize].to_string()
    }

    fn active(&mut self) -> Option<(JobId, u32)> {
        let active: Vec<(JobId, u32)> = self
            .state
            .jobs
            .values()
            .filter_map(|j| j.active_attempt().map(|a| (j.id, a.number)))
            .collect();
        (!active.is_empty()).then(|| active[self.next(active.len() as u64) as usize])
    }

    fn event(&mut self) -> Event {
        let roll = self.next(100);
        match roll {
            0..20 => {
                let key = (self.next(3) == 0).then(|| format!("key-{}", self.next(60)));
                let constraints = if self.next(4) == 0 {
                    BTreeMap::from([("os".to_string(), "linux".to_string())])
                } else {
                    BTreeMap::new()
                };
                Event::JobSubmitted {
                    spec: JobSpec {
                        name: format!("job-{}", self.log.len()),
                        command: vec!["true".to_string()],
                        env: BTreeMap::new(),
                        resources: Resources::new(500 * (1 + self.next(4)), 512),
                        constraints,
                        priority: [0, 50, 100][self.next(3) as usize],
                        timeout_secs: 60,
                        max_retries: self.next(3) as u32,
                        workspace: Default::default(),
                    },
                    idempotency_key: key,
                }
            }
            20..45 => {
                let queued: Vec<JobId> = self.state.queue.iter().map(|k| k.job).collect();
                if queued.is_empty() {
                    return Event::NodeUp {
                        name: self.node(),
                        incarnation: 0,
                    };
                }
                let job = queued[self.next(queued.len() as u64) as usize];
                let attempt = self.state.jobs[&job].attempts.len() as u32 + 1;
                Event::AttemptAssigned {
                    job,
                    attempt,
                    node: self.node(),
                }
            }
            45..60 => match self.active() {
                Some((job, attempt)) => Event::AttemptStarted { job, attempt },
                None => Event::NodeUndrained { name: self.node() },
            },
            60..80 => match self.active() {
                Some((job, attempt)) => {
                    let outcome = [
                        Outcome::Exited,
                        Outcome::Exited,
                        Outcome::TimedOut,
                        Outcome::Cancelled,
                        Outcome::StartFailed,
                    ][self.next(5) as usize];
                    Event::AttemptFinished {
                        job,
                        attempt,
                        outcome,
                        exit_code: [Some(0), Some(0), Some(1), None][self.next(4) as usize],
                        usage: (self.next(2) == 0).then_some(Usage {
                            peak_memory_mb: self.next(512),
                            cpu_ms: self.next(100_000),
                        }),
                    }
                }
                None => Event::JobCancelled {
                    job: JobId(self.next(9)),
                },
            },
            80..84 => match self.active() {
                Some((job, attempt)) => Event::AttemptLost { job, attempt },
                None => Event::NodeUndrained { name: self.node() },
            },
            84..88 => {
                let count = self.state.jobs.len() as u64;
                Event::JobCancelled {
                    job: JobId(1 + self.next(count + 1)),
                }
            }
            88..91 => {
                let name = self.node();
                self.register(&name)
            }
            91 => Event::NodeDrained { name: self.node() },
            92 => Event::NodeUndrained { name: self.node() },
            93 => Event::NodeDown {
                name: self.node(),
                incarnation: 0,
            },
            94 => Event::NodeUp {
                name: self.node(),
                incarnation: 0,
            },
            95 => Event::NodeRemoved {
                name: self.node(),
                reason: "decommissioned".to_string(),
            },
            96..98 => Event::IdempotencyKeysExpired {
                before: self.at.saturating_sub(self.next(600_000)),
            },
            _ => {
                self.term += 1;
                Event::LeaderElected {
                    replica: 1 + self.next(3),
                    term: self.term,
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn snapshot_codec_any_log_any_split(
        data in prop::collection::vec(any::<u8>(), 0..1500),
        split in any::<prop::sample::Index>(),
    ) {
        let log = entries_from_bytes(&data);
        let split = split.index(log.len() + 1);
        assert_snapshot_then_rest_equals_replay(&log, split);
    }

    #[test]
    fn snapshot_codec_garbage_is_an_error_never_a_panic(
        data in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        prop_assert!(decode_snapshot(&data).is_err());
    }

    #[test]
    fn snapshot_codec_garbage_behind_a_valid_header_is_an_error(
        payload in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let bytes = with_header(&payload);
        prop_assert!(decode_snapshot(&bytes).is_err());
    }
}

/// `payload` behind a header that is right for it (magic, format, length,
/// checksum): only the payload's own decoding and checks stand guard.
fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"RCSN");
    bytes.push(SNAPSHOT_FORMAT);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    assert_eq!(bytes.len(), SNAPSHOT_HEADER_BYTES + payload.len());
    bytes
}

fn small_snapshot() -> Vec<u8> {
    let log = deterministic_log(7, 300);
    let state = State::replay(&log);
    assert!(!state.jobs.is_empty());
    encode_snapshot(&state)
}

#[test]
fn snapshot_codec_every_truncation_is_an_error() {
    let bytes = small_snapshot();
    for len in 0..bytes.len() {
        let e = decode_snapshot(&bytes[..len]).unwrap_err();
        let expected = if len < SNAPSHOT_HEADER_BYTES {
            matches!(e, SnapshotError::Truncated { .. })
        } else {
            matches!(e, SnapshotError::Length { .. })
        };
        assert!(expected, "cut to {len}: {e}");
    }
}

#[test]
fn snapshot_codec_every_bit_flip_is_an_error() {
    let bytes = small_snapshot();
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1 << bit;
            let e = decode_snapshot(&damaged).unwrap_err();
            let expected = match at {
                0..4 => matches!(e, SnapshotError::NotASnapshot { .. }),
                4 => matches!(e, SnapshotError::Format { .. }),
                5..13 => matches!(e, SnapshotError::Length { .. }),
                _ => matches!(e, SnapshotError::Checksum { .. }),
            };
            assert!(expected, "bit {bit} of byte {at}: {e}");
        }
    }
}

#[test]
fn snapshot_codec_a_log_frame_is_not_a_snapshot() {
    let log = deterministic_log(3, 100);
    let frame = rustci_storage::encode_entry(&log[0]);
    let e = decode_snapshot(&frame).unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::NotASnapshot { .. } | SnapshotError::Truncated { .. }
        ),
        "{e}"
    );
}

#[test]
fn snapshot_codec_an_unknown_format_names_it() {
    let mut bytes = small_snapshot();
    bytes[4] = SNAPSHOT_FORMAT + 1;
    let e = decode_snapshot(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "unknown snapshot format {} (this build reads format {SNAPSHOT_FORMAT})",
            SNAPSHOT_FORMAT + 1
        )
    );
}

#[test]
fn snapshot_codec_bytes_after_the_state_are_refused() {
    let bytes = small_snapshot();
    let mut payload = open_snapshot(&bytes).unwrap().to_vec();
    payload.push(0xc0); // a MessagePack nil
    let e = decode_snapshot(&with_header(&payload)).unwrap_err();
    assert!(matches!(e, SnapshotError::Payload { .. }), "{e}");
}

/// A well-formed image of an impossible state: a node allocated resources
/// no active attempt holds. The checksum is right, so only the consistency
/// check after the rebuild can refuse it.
#[test]
fn snapshot_codec_an_impossible_state_is_refused() {
    let log = deterministic_log(7, 300);
    let mut state = State::replay(&log);
    let node = state.nodes.values_mut().next().expect("a node");
    node.allocated.cpu_millis += 1;
    let e = decode_snapshot(&encode_snapshot(&state)).unwrap_err();
    assert!(matches!(e, SnapshotError::Image(_)), "{e}");
    assert!(e.to_string().contains("allocated"), "{e}");
}

#[test]
fn snapshot_codec_a_job_out_of_order_is_refused() {
    let log = deterministic_log(7, 300);
    let state = State::replay(&log);
    assert!(state.jobs.len() >= 2);
    let mut image = state.image();
    let mut jobs: Vec<_> = state.jobs.values().cloned().collect();
    jobs.swap(0, 1);
    image.jobs = rustci_core::snapshot::JobsImage::Owned(jobs);
    let e = State::from_image(image).unwrap_err();
    assert!(e.to_string().contains("ids are dense"), "{e}");
}
