//! The scheduler against its specification, over arbitrary histories:
//! - the indexes the reducer keeps for it equal a computation from scratch
//!   after every event and after every pass;
//! - a pass places exactly what a simple reference scheduler, written here
//!   from the rules of `scheduler.rs`'s header, places (constraints, fit in
//!   every dimension, strict priority with FIFO within a priority and
//!   backfill, tightest fit with ties to the lowest name, the pass bounds).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, JobState, Labels, Outcome, Resources};
use rustci_core::scheduler::{self, Pass, PassBounds, Placement, Reservation};
use rustci_core::state::{QueueKey, State};

const NODES: [&str; 10] = ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"];

fn labels() -> impl Strategy<Value = Labels> {
    (
        prop::sample::select(vec!["a", "b"]),
        prop::option::of(prop::sample::select(vec!["l", "m"])),
    )
        .prop_map(|(pool, os)| {
            let mut l = Labels::new();
            l.insert("pool".into(), pool.into());
            if let Some(os) = os {
                l.insert("os".into(), os.into());
            }
            l
        })
}

fn capacity() -> impl Strategy<Value = Resources> {
    prop_oneof![
        6 => Just(Resources::new(8000, 16384)),
        2 => prop::sample::select(vec![
            Resources::new(4000, 8192),
            Resources::new(2000, 4096),
        ]),
        1 => (0u64..9000, 0u64..20000).prop_map(|(c, m)| Resources::new(c, m)),
    ]
}

fn spec() -> impl Strategy<Value = JobSpec> {
    (
        prop::sample::select(vec![1u64, 500, 1000, 2000, 3000, 5000, 9000]),
        prop::sample::select(vec![1u64, 512, 1024, 4096, 9000, 20000]),
        prop::sample::select(vec![0u8, 50, 100]),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::option::of(prop::sample::select(vec!["l", "m"])),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(cpu, mem, priority, pool, os, gpu)| {
            let mut constraints = Labels::new();
            if let Some(pool) = pool {
                constraints.insert("pool".into(), pool.into());
            }
            if let Some(os) = os {
                constraints.insert("os".into(), os.into());
            }
            if gpu {
                constraints.insert("gpu".into(), "yes".into());
            }
            JobSpec {
                name: String::new(),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                resources: Resources::new(cpu, mem),
                constraints,
                priority,
                timeout_secs: 10,
                max_retries: 1,
                workspace: Default::default(),
            }
        })
}

fn node() -> impl Strategy<Value = String> {
    prop::sample::select(NODES.to_vec()).prop_map(str::to_string)
}

fn event() -> impl Strategy<Value = Event> {
    let job = (1u64..40).prop_map(JobId);
    let attempt = 1u32..3;
    prop_oneof![
        6 => spec().prop_map(|spec| Event::JobSubmitted {
            spec,
            idempotency_key: None
        }),
        1 => job.clone().prop_map(|job| Event::JobCancelled { job }),
        3 => (job.clone(), attempt.clone(), prop::sample::select(vec![0, 1])).prop_map(
            |(job, attempt, code)| Event::AttemptFinished {
                job,
                attempt,
                outcome: Outcome::Exited,
                exit_code: Some(code),
                usage: None,
            }
        ),
        1 => (job, attempt).prop_map(|(job, attempt)| Event::AttemptLost { job, attempt }),
        3 => (node(), capacity(), labels(), 1u64..4, prop::bool::ANY).prop_map(
            |(name, capacity, labels, incarnation, vouch)| Event::NodeRegistered {
                name,
                capacity,
                labels,
                incarnation,
                predecessor: vouch.then_some(incarnation - 1),
            }
        ),
        1 => node().prop_map(|name| Event::NodeDrained { name }),
        1 => node().prop_map(|name| Event::NodeUndrained { name }),
        1 => node().prop_map(|name| Event::NodeDown {
            name,
            incarnation: 0
        }),
        1 => node().prop_map(|name| Event::NodeUp {
            name,
            incarnation: 0
        }),
        1 => node().prop_map(|name| Event::NodeRemoved {
            name,
            reason: String::new()
        }),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Apply(Event),
    /// A pass with these bounds, its placements applied after; `only`
    /// restricts it to the newest queued jobs, as the replica does after
    /// submissions alone.
    Schedule {
        scan_jobs_max: usize,
        placements_max: usize,
        only_newest: Option<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => event().prop_map(Op::Apply),
        1 => (1usize..12, 1usize..8, prop::option::of(1usize..6)).prop_map(
            |(scan_jobs_max, placements_max, only_newest)| Op::Schedule {
                scan_jobs_max,
                placements_max,
                only_newest,
            }
        ),
    ]
}

struct Log {
    state: State,
    index: u64,
    entries: Vec<Entry>,
}

impl Log {
    fn new() -> Log {
        Log {
            state: State::new(),
            index: 0,
            entries: Vec::new(),
        }
    }

    fn apply(&mut self, event: Event) {
        self.index += 1;
        let entry = Entry {
            index: self.index,
            term: 1,
            at: self.index,
            event,
        };
        self.state.apply(&entry);
        self.entries.push(entry);
    }
}

// --- the reference scheduler: every node looked at, for every job ---

fn satisfies(labels: &Labels, constraints: &Labels) -> bool {
    constraints.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn fits(need: Resources, free: Resources) -> bool {
    need.cpu_millis <= free.cpu_millis && need.memory_mb <= free.memory_mb
}

fn score(left_cpu: u64, left_mem: u64, capacity: Resources) -> u64 {
    let ppm = |l: u64, c: u64| {
        if c == 0 {
            0
        } else {
            (u128::from(l) * 1_000_000 / u128::from(c)) as u64
        }
    };
    ppm(left_cpu, capacity.cpu_millis) + ppm(left_mem, capacity.memory_mb)
}

/// What a node must still free for `need`, as ppm of its capacity summed
/// over both dimensions (the reservation's rule).
fn shortfall(need: Resources, free: Resources, capacity: Resources) -> u64 {
    score(
        need.cpu_millis.saturating_sub(free.cpu_millis),
        need.memory_mb.saturating_sub(free.memory_mb),
        capacity,
    )
}

fn reference(state: &State, only: Option<&[QueueKey]>, bounds: PassBounds) -> Pass {
    let mut free: BTreeMap<&str, Resources> = state
        .nodes
        .values()
        .filter(|n| n.state == rustci_core::model::NodeState::Ready)
        .map(|n| {
            let f = Resources::new(
                n.capacity.cpu_millis.saturating_sub(n.allocated.cpu_millis),
                n.capacity.memory_mb.saturating_sub(n.allocated.memory_mb),
            );
            (n.name.as_str(), f)
        })
        .collect();
    let ready: Vec<&str> = free.keys().copied().collect();
    let ever = |key: &QueueKey| {
        let job = &state.jobs[&key.job];
        job.state == JobState::Queued
            && ready.iter().any(|n| {
                let node = &state.nodes[*n];
                satisfies(&node.labels, &job.spec.constraints)
                    && fits(job.spec.resources, node.capacity)
            })
    };
    // With `only`, the first job some ready node could ever take that is
    // not among them (the anchor) joins them.
    let anchor: Option<QueueKey> = only.and_then(|keys| {
        state
            .queue
            .iter()
            .find(|k| !keys.contains(k) && ever(k))
            .copied()
    });
    let candidates: Vec<QueueKey> = match only {
        Some(keys) => {
            let mut keys: BTreeSet<QueueKey> = keys.iter().copied().collect();
            keys.extend(anchor);
            keys.into_iter().collect()
        }
        None => state.queue.iter().copied().collect(),
    };
    let mut placements = Vec::new();
    let mut reservation: Option<Reservation> = None;
    let mut scanned = 0;
    let mut truncated = false;
    for key in candidates {
        if !free.values().any(|f| f.cpu_millis > 0 && f.memory_mb > 0) {
            break;
        }
        let job = &state.jobs[&key.job];
        if job.state != JobState::Queued {
            continue;
        }
        let need = job.spec.resources;
        if !ever(&key) {
            continue;
        }
        if scanned >= bounds.scan_jobs_max || placements.len() >= bounds.placements_max {
            truncated = true;
            break;
        }
        scanned += 1;
        let mut best: Option<(u64, &str)> = None;
        for (name, f) in &free {
            let node = &state.nodes[*name];
            if !satisfies(&node.labels, &job.spec.constraints) || !fits(need, *f) {
                continue;
            }
            let s = score(
                f.cpu_millis - need.cpu_millis,
                f.memory_mb - need.memory_mb,
                node.capacity,
            );
            if best.is_none_or(|b| (s, *name) < b) {
                best = Some((s, name));
            }
        }
        // A pass over new jobs stops, asking for a full pass, when a new job
        // ahead of the anchor fits nowhere, or at the anchor when it fits or
        // jobs ahead of it were placed.
        let new_blocked = best.is_none() && reservation.is_none();
        if anchor.is_some_and(|a| a != key) && new_blocked
            || anchor == Some(key) && (best.is_some() || !placements.is_empty())
        {
            truncated = true;
            break;
        }
        if let Some((_, name)) = best {
            let f = free.get_mut(name).expect("a ready node");
            *f = Resources::new(f.cpu_millis - need.cpu_millis, f.memory_mb - need.memory_mb);
            placements.push(Placement {
                job: job.id,
                attempt: job.attempts.len() as u32 + 1,
                node: name.to_string(),
            });
        } else if reservation.is_none() {
            // Fits nowhere now: hold the large enough node that needs the
            // least freed; backfill sees only what it has beyond the need.
            let mut held: Option<(u64, &str)> = None;
            for (name, f) in &free {
                let node = &state.nodes[*name];
                if !satisfies(&node.labels, &job.spec.constraints) || !fits(need, node.capacity) {
                    continue;
                }
                let s = shortfall(need, *f, node.capacity);
                if held.is_none_or(|h| (s, *name) < h) {
                    held = Some((s, name));
                }
            }
            let (_, name) = held.expect("a job some ready node could ever take");
            let f = free.get_mut(name).expect("a ready node");
            reservation = Some(Reservation {
                job: job.id,
                node: name.to_string(),
                short_cpu_millis: need.cpu_millis.saturating_sub(f.cpu_millis),
                short_memory_mb: need.memory_mb.saturating_sub(f.memory_mb),
            });
            *f = Resources::new(
                f.cpu_millis.saturating_sub(need.cpu_millis),
                f.memory_mb.saturating_sub(need.memory_mb),
            );
        }
    }
    Pass {
        placements,
        truncated,
        reservation,
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut log = Log::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Apply(event) => log.apply(event),
            Op::Schedule {
                scan_jobs_max,
                placements_max,
                only_newest,
            } => {
                let bounds = PassBounds {
                    scan_jobs_max,
                    placements_max,
                };
                let only: Option<Vec<QueueKey>> = only_newest.map(|n| {
                    let mut newest: Vec<QueueKey> = log.state.queue.iter().copied().collect();
                    newest.sort_by_key(|k| std::cmp::Reverse(k.seq));
                    newest.truncate(n);
                    newest.sort_unstable();
                    newest
                });
                let want = reference(&log.state, only.as_deref(), bounds);
                let before = log.state.digest();
                let got = scheduler::schedule_pass(&mut log.state, only.as_deref(), bounds);
                prop_assert_eq!(
                    &got.placements,
                    &want.placements,
                    "op {}: pass differs from the reference",
                    i
                );
                prop_assert_eq!(
                    &got.reservation,
                    &want.reservation,
                    "op {}: reservation differs from the reference",
                    i
                );
                prop_assert_eq!(before, log.state.digest(), "a pass changed the state");
                if let Err(e) = log.state.check_indexes() {
                    return Err(TestCaseError::fail(format!(
                        "after the pass of op {i}: {e}"
                    )));
                }
                for p in got.placements {
                    log.apply(Event::AttemptAssigned {
                        job: p.job,
                        attempt: p.attempt,
                        node: p.node,
                    });
                }
                // What `explain` shows is what the pass held, once its
                // placements are in (a complete pass placed every job ahead
                // of the one it reserved for).
                if only.is_none() && !got.truncated && got.reservation.is_some() {
                    prop_assert_eq!(
                        scheduler::reservation(&log.state),
                        got.reservation,
                        "op {}: explain's reservation",
                        i
                    );
                }
            }
        }
        if let Err(e) = log.state.check_consistency() {
            return Err(TestCaseError::fail(format!("after op {i}: {e}")));
        }
    }
    // Replay (which rebuilds the indexes once at the end) gives indexes
    // that equal a recount, and a pass over the replayed state places what
    // a pass over the live one does.
    let mut replayed = State::replay(&log.entries);
    if let Err(e) = replayed.check_indexes() {
        return Err(TestCaseError::fail(format!("replayed: {e}")));
    }
    prop_assert_eq!(
        scheduler::schedule(&mut replayed),
        scheduler::schedule(&mut log.state)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After every event and every pass the indexes equal a recount, and
    /// every pass places exactly what the reference scheduler places.
    #[test]
    fn scheduler_matches_the_reference_and_indexes_match_a_recount(
        ops in prop::collection::vec(op(), 0..160)
    ) {
        run(ops)?;
    }
}

/// Many nodes of one capacity and many classes: the threshold search ends
/// early, and still agrees with the reference on every pass.
#[test]
fn tightest_fit_on_a_large_uniform_cluster_agrees_with_the_reference() {
    let mut log = Log::new();
    for n in 0..200u64 {
        let mut labels = Labels::new();
        labels.insert("pool".into(), format!("p{}", n % 3));
        log.apply(Event::NodeRegistered {
            name: format!("node-{n:03}"),
            capacity: Resources::new(16_000, 65_536),
            labels,
            incarnation: 1,
            predecessor: None,
        });
    }
    let sizes = [(500, 512), (4000, 1024), (250, 16_000), (1000, 4096)];
    for i in 0..3000u64 {
        let (cpu, mem) = sizes[(i % 4) as usize];
        let mut constraints = Labels::new();
        if i % 5 != 0 {
            constraints.insert("pool".into(), format!("p{}", i % 3));
        }
        log.apply(Event::JobSubmitted {
            spec: JobSpec {
                name: format!("j{i}"),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                resources: Resources::new(cpu, mem),
                constraints,
                priority: (i % 3) as u8 * 10,
                timeout_secs: 10,
                max_retries: 0,
                workspace: Default::default(),
            },
            idempotency_key: None,
        });
    }
    let mut placed = 0;
    let mut finished: BTreeSet<JobId> = BTreeSet::new();
    for round in 0..40 {
        let bounds = PassBounds::default();
        let want = reference(&log.state, None, bounds);
        let got = scheduler::schedule_pass(&mut log.state, None, bounds);
        assert_eq!(got, want, "round {round}");
        placed += got.placements.len();
        for p in got.placements {
            log.apply(Event::AttemptAssigned {
                job: p.job,
                attempt: p.attempt,
                node: p.node,
            });
        }
        // Finish every seventh running job, so capacity frees up unevenly.
        let running: Vec<JobId> = log
            .state
            .jobs
            .values()
            .filter(|j| j.state == JobState::Assigned && j.id.0 % 7 == round % 7)
            .map(|j| j.id)
            .collect();
        for job in running {
            if finished.insert(job) {
                log.apply(Event::AttemptFinished {
                    job,
                    attempt: 1,
                    outcome: Outcome::Exited,
                    exit_code: Some(0),
                    usage: None,
                });
            }
        }
        log.state.check_consistency().expect("consistent");
    }
    assert!(placed > 1000, "placed {placed}");
}

/// The indexes are caches: a state with different (here: empty) indexes is
/// equal to and digests like the state the log defines.
#[test]
fn indexes_are_not_part_of_the_digest() {
    let mut log = Log::new();
    log.apply(Event::NodeRegistered {
        name: "n0".into(),
        capacity: Resources::new(1000, 1000),
        labels: Labels::new(),
        incarnation: 1,
        predecessor: None,
    });
    log.apply(Event::JobSubmitted {
        spec: JobSpec {
            name: "j".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            resources: Resources::new(2000, 1),
            constraints: Labels::new(),
            priority: 50,
            timeout_secs: 10,
            max_retries: 0,
            workspace: Default::default(),
        },
        idempotency_key: None,
    });
    assert_eq!(log.state.sched.runnable_len(), 0, "too large: parked");
    let mut other = log.state.clone();
    other.sched = Default::default();
    assert_eq!(other.digest(), log.state.digest());
    assert_eq!(other, log.state);
}

fn job_spec(cpu: u64, mem: u64, constraints: Labels) -> JobSpec {
    JobSpec {
        name: "j".into(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        resources: Resources::new(cpu, mem),
        constraints,
        priority: 50,
        timeout_secs: 10,
        max_retries: 0,
        workspace: Default::default(),
    }
}

/// Two nodes at different free capacities tie on score; the search must
/// not stop at its bound while a node that ties and sorts first by name is
/// still unseen. Here "z" (300, 700) is met first and "a" (500, 500) ties
/// with it exactly when the bound equals their score.
#[test]
fn a_tie_between_different_free_capacities_goes_to_the_lowest_name() {
    let mut log = Log::new();
    let free = [
        ("z", 300, 700),
        ("p", 500, 100),
        ("q", 100, 500),
        ("r", 120, 500),
        ("a", 500, 500),
    ];
    for (name, _, _) in free {
        log.apply(Event::NodeRegistered {
            name: name.into(),
            capacity: Resources::new(1000, 1000),
            labels: [("name".to_string(), name.to_string())].into(),
            incarnation: 1,
            predecessor: None,
        });
    }
    for (i, (name, cpu, mem)) in free.into_iter().enumerate() {
        let pin: Labels = [("name".to_string(), name.to_string())].into();
        log.apply(Event::JobSubmitted {
            spec: job_spec(1000 - cpu, 1000 - mem, pin),
            idempotency_key: None,
        });
        log.apply(Event::AttemptAssigned {
            job: JobId(i as u64 + 1),
            attempt: 1,
            node: name.into(),
        });
    }
    log.apply(Event::JobSubmitted {
        spec: job_spec(150, 150, Labels::new()),
        idempotency_key: None,
    });
    let want = reference(&log.state, None, PassBounds::default()).placements;
    assert_eq!(want.len(), 1);
    assert_eq!(want[0].node, "a");
    let got = scheduler::schedule(&mut log.state);
    assert_eq!(got, want);
}

/// Two nodes of 4 cores kept full by a stream of 1-core jobs; a 4-core job
/// of higher priority arrives. Strict priority with backfill alone would
/// hand every freed core to the next small job and the large one would
/// wait for as long as the stream lasts. With the reservation the node
/// that needs the least freed takes nothing new, so the large job runs
/// once the four attempts there have ended, while the other node keeps
/// taking the stream.
#[test]
fn a_large_job_behind_a_stream_of_small_ones_is_placed_once_its_node_drains() {
    let mut log = Log::new();
    for name in ["n0", "n1"] {
        log.apply(Event::NodeRegistered {
            name: name.into(),
            capacity: Resources::new(4000, 4096),
            labels: Labels::new(),
            incarnation: 1,
            predecessor: None,
        });
    }
    let small = |log: &mut Log| {
        let mut spec = job_spec(1000, 512, Labels::new());
        spec.priority = 0;
        log.apply(Event::JobSubmitted {
            spec,
            idempotency_key: None,
        });
    };
    let pass = |log: &mut Log| {
        let want = reference(&log.state, None, PassBounds::default());
        let got = scheduler::schedule_pass(&mut log.state, None, PassBounds::default());
        assert_eq!(got, want);
        for p in &got.placements {
            log.apply(Event::AttemptAssigned {
                job: p.job,
                attempt: p.attempt,
                node: p.node.clone(),
            });
        }
        got
    };
    for _ in 0..8 {
        small(&mut log);
    }
    assert_eq!(pass(&mut log).placements.len(), 8, "both nodes full");
    log.apply(Event::JobSubmitted {
        spec: job_spec(4000, 1024, Labels::new()),
        idempotency_key: None,
    });
    let big = JobId(9);
    // Each round the oldest running small job ends and two more arrive.
    let mut placed_in = None;
    let mut held: BTreeSet<String> = BTreeSet::new();
    for round in 0..20 {
        let oldest = log
            .state
            .jobs
            .values()
            .filter(|j| j.state == JobState::Assigned && j.id != big)
            .map(|j| j.id)
            .min()
            .expect("a running small job");
        log.apply(Event::AttemptFinished {
            job: oldest,
            attempt: 1,
            outcome: Outcome::Exited,
            exit_code: Some(0),
            usage: None,
        });
        small(&mut log);
        small(&mut log);
        let got = pass(&mut log);
        if got.placements.iter().any(|p| p.job == big) {
            assert_eq!(got.reservation, None);
            placed_in = Some(round);
            break;
        }
        let r = got.reservation.expect("the large job holds a node");
        assert_eq!(r.job, big);
        assert!(
            got.placements.iter().all(|p| p.node != r.node),
            "round {round}: backfill on the held node {}",
            r.node
        );
        held.insert(r.node);
    }
    // n0 holds the four oldest jobs and is held from the start: the large
    // job runs when they have ended, in round 3.
    assert_eq!(held, BTreeSet::from(["n0".to_string()]));
    assert_eq!(placed_in, Some(3));
}

/// A cancelled job's reservation goes with it: the node it held takes
/// backfill again at the next pass.
#[test]
fn a_reservation_is_released_when_its_job_is_cancelled() {
    let mut log = Log::new();
    log.apply(Event::NodeRegistered {
        name: "n0".into(),
        capacity: Resources::new(2000, 2048),
        labels: Labels::new(),
        incarnation: 1,
        predecessor: None,
    });
    log.apply(Event::JobSubmitted {
        spec: job_spec(1000, 512, Labels::new()),
        idempotency_key: None,
    });
    log.apply(Event::AttemptAssigned {
        job: JobId(1),
        attempt: 1,
        node: "n0".into(),
    });
    log.apply(Event::JobSubmitted {
        spec: job_spec(2000, 512, Labels::new()),
        idempotency_key: None,
    });
    let mut small = job_spec(500, 512, Labels::new());
    small.priority = 0;
    log.apply(Event::JobSubmitted {
        spec: small,
        idempotency_key: None,
    });
    let held = scheduler::schedule_pass(&mut log.state, None, PassBounds::default());
    assert_eq!(held.placements, vec![]);
    assert_eq!(
        held.reservation,
        Some(Reservation {
            job: JobId(2),
            node: "n0".into(),
            short_cpu_millis: 1000,
            short_memory_mb: 0,
        })
    );
    log.apply(Event::JobCancelled { job: JobId(2) });
    let freed = scheduler::schedule_pass(&mut log.state, None, PassBounds::default());
    assert_eq!(freed.reservation, None);
    assert_eq!(
        freed.placements,
        vec![Placement {
            job: JobId(3),
            attempt: 1,
            node: "n0".into()
        }]
    );
}
