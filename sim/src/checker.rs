//! The invariant checkers.
//!
//! A [`Checker`] is fed observations (what clients were told, what runners
//! executed, what the replica proposed and applied) and answers each with
//! `Ok` or the [`Violation`] of one named invariant. It reads no simulator
//! internals, so unit tests can feed it crafted violating histories.
//!
//! Everything per step is incremental: work is proportional to what the step
//! touched. Whole-state checks (replay, consistency) run at quiescent points.

use std::collections::{BTreeMap, BTreeSet};

use rustci_core::event::{Entry, Event};
use rustci_core::model::{AttemptNumber, Job, JobId, JobState, Resources};
use rustci_core::replica::Lifecycle;
use rustci_core::state::State;

/// The invariants, by the names reports and tests use.
pub mod inv {
    pub const ACKED_DURABLE: &str = "acked_submission_durable";
    pub const IDEMPOTENCY: &str = "idempotency_one_job";
    pub const EXCLUSIVE: &str = "exclusive_execution";
    pub const CAPACITY: &str = "capacity_and_constraints";
    pub const PRIORITY: &str = "priority_order";
    pub const TERMINAL: &str = "terminal_stays_terminal";
    pub const FENCING: &str = "stale_result_fenced";
    pub const NODE_DOWN: &str = "node_down_only_if_disturbed";
    pub const REPLAY: &str = "replay_equals_live";
    pub const CONSISTENCY: &str = "state_consistency";
    pub const TIMESTAMPS: &str = "log_timestamps_monotonic";
    pub const LIVE_LEADER: &str = "liveness_leader";
    pub const LIVE_JOBS: &str = "liveness_jobs_terminal";
    pub const LIVE_RESULTS: &str = "liveness_results_recorded";
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

pub type Check = Result<(), Violation>;

fn fail(invariant: &'static str, detail: String) -> Check {
    Err(Violation { invariant, detail })
}

/// Jobs as they were before a batch of entries was applied: `None` for a
/// job that did not exist yet.
pub type PreApply = BTreeMap<JobId, Option<Job>>;

#[derive(Default)]
pub struct Checker {
    /// Job ids a client got a success reply for, with the job's name (names
    /// are unique per submission, so a reused id cannot pass for the job).
    acked: BTreeMap<JobId, String>,
    /// Idempotency key -> the job id clients were told.
    replied_for_key: BTreeMap<String, JobId>,
    /// Idempotency key -> the job (id, name) that the state created for it.
    created_for_key: BTreeMap<String, (JobId, String)>,
    /// The next job id not yet looked at by [`Checker::new_jobs`].
    next_unseen_job: u64,
    /// Ground truth: attempts executing on runners now, by job.
    executing: BTreeMap<JobId, (AttemptNumber, String)>,
    /// Jobs seen terminal, with the terminal state.
    terminal: BTreeMap<JobId, JobState>,
    /// Nodes that were ever crashed, paused, cut off or on a lossy link.
    pub disturbed: BTreeSet<String>,
    /// `at` of the last entry proposed.
    last_at: u64,
}

impl Checker {
    pub fn new() -> Checker {
        Checker {
            next_unseen_job: 1,
            ..Checker::default()
        }
    }

    /// A client got `job` as the answer to a submission.
    pub fn client_acked(&mut self, key: Option<&str>, job: &Job) -> Check {
        self.acked.insert(job.id, job.spec.name.clone());
        if let Some(key) = key {
            let first = *self
                .replied_for_key
                .entry(key.to_string())
                .or_insert(job.id);
            if first != job.id {
                return fail(
                    inv::IDEMPOTENCY,
                    format!(
                        "key {key} answered with job {first} and later job {}",
                        job.id
                    ),
                );
            }
        }
        Ok(())
    }

    /// Every acknowledged job is in `state` (after a restart, and at the end).
    pub fn acked_present(&self, state: &State) -> Check {
        for (id, name) in &self.acked {
            match state.job(*id) {
                Some(job) if &job.spec.name == name => {}
                Some(job) => {
                    return fail(
                        inv::ACKED_DURABLE,
                        format!("acked job {id} ({name}) is now {}", job.spec.name),
                    )
                }
                None => return fail(inv::ACKED_DURABLE, format!("acked job {id} ({name}) lost")),
            }
        }
        Ok(())
    }

    /// Looks at the jobs created since the last call: one key, one job.
    pub fn new_jobs(&mut self, state: &State) -> Check {
        let from = self.next_unseen_job;
        self.next_unseen_job = self.next_unseen_job.max(state.jobs.next_id().0);
        for (id, job) in state.jobs.range(JobId(from)..) {
            let Some(key) = &job.idempotency_key else {
                continue;
            };
            let this = (*id, job.spec.name.clone());
            let first = self
                .created_for_key
                .entry(key.clone())
                .or_insert(this.clone());
            if *first != this {
                return fail(
                    inv::IDEMPOTENCY,
                    format!("key {key} made job {} and job {id}", first.0),
                );
            }
        }
        Ok(())
    }

    /// A runner started executing an attempt. `running` is the total of the
    /// resources executing on that node including this attempt.
    pub fn exec_start(
        &mut self,
        job: JobId,
        attempt: AttemptNumber,
        node: &str,
        running: Resources,
        capacity: Resources,
    ) -> Check {
        if let Some((other, on)) = self.executing.get(&job) {
            return fail(
                inv::EXCLUSIVE,
                format!("job {job}: attempt {attempt} starts on {node} while attempt {other} runs on {on}"),
            );
        }
        self.executing.insert(job, (attempt, node.to_string()));
        if !running.fits_in(&capacity) {
            return fail(
                inv::CAPACITY,
                format!("node {node} executes {running:?} > capacity {capacity:?}"),
            );
        }
        Ok(())
    }

    pub fn exec_end(&mut self, job: JobId, attempt: AttemptNumber) {
        if self.executing.get(&job).is_some_and(|(a, _)| *a == attempt) {
            self.executing.remove(&job);
        }
    }

    /// The scheduler proposed `entries` from `state` (the state it ran on):
    /// every placement fits and matches, and no queued job of higher
    /// priority that would have fit on that node is left waiting.
    pub fn placements(&self, state: &State, entries: &[Entry]) -> Check {
        let mut free: BTreeMap<&str, Resources> = BTreeMap::new();
        let mut placed: BTreeSet<JobId> = BTreeSet::new();
        for entry in entries {
            let Event::AttemptAssigned { job, node, .. } = &entry.event else {
                continue;
            };
            let (Some(j), Some(n)) = (state.job(*job), state.nodes.get(node)) else {
                return fail(
                    inv::CAPACITY,
                    format!("placement of {job} on unknown {node}"),
                );
            };
            let f = free.entry(n.name.as_str()).or_insert_with(|| n.free());
            let need = j.spec.resources;
            if !n.accepts_work() || !n.satisfies(&j.spec.constraints) || !need.fits_in(f) {
                return fail(
                    inv::CAPACITY,
                    format!(
                        "job {job} ({need:?}, {:?}) placed on {node} ({:?}, free {f:?}, {:?})",
                        j.spec.constraints, n.state, n.labels
                    ),
                );
            }
            let inverse = 100u8.saturating_sub(j.spec.priority);
            for key in &state.queue {
                if key.inverse_priority >= inverse {
                    break;
                }
                if placed.contains(&key.job) {
                    continue;
                }
                let Some(q) = state.job(key.job) else {
                    continue;
                };
                if q.spec.resources.fits_in(f) && n.satisfies(&q.spec.constraints) {
                    return fail(
                        inv::PRIORITY,
                        format!(
                            "job {job} (priority {}) placed on {node} while job {} (priority {}) that fits waits",
                            j.spec.priority, q.id, q.spec.priority
                        ),
                    );
                }
            }
            *f = f.saturating_sub(&need);
            placed.insert(*job);
        }
        Ok(())
    }

    /// The replica commanded a runner to start `job` on `node`.
    pub fn runner_start(&self, state: &State, job: JobId, node: &str) -> Check {
        let (Some(j), Some(n)) = (state.job(job), state.nodes.get(node)) else {
            return fail(inv::CAPACITY, format!("start of {job} on unknown {node}"));
        };
        if !n.allocated.fits_in(&n.capacity) || !n.satisfies(&j.spec.constraints) {
            return fail(
                inv::CAPACITY,
                format!(
                    "node {node}: allocated {:?} of {:?}",
                    n.allocated, n.capacity
                ),
            );
        }
        Ok(())
    }

    /// Records the jobs `entries` are about, before they are applied.
    pub fn pre_apply(state: &State, entries: &[Entry]) -> PreApply {
        let mut pre = PreApply::new();
        for e in entries {
            if let Some(id) = e.event.job() {
                pre.entry(id).or_insert_with(|| state.job(id).cloned());
            }
        }
        pre
    }

    /// `entries` were applied: terminal jobs stayed terminal, stale attempt
    /// reports changed nothing, and nodes went down only if disturbed.
    pub fn applied(&mut self, pre: &PreApply, entries: &[Entry], state: &State) -> Check {
        for e in entries {
            let (job, attempt) = match &e.event {
                Event::AttemptStarted { job, attempt }
                | Event::AttemptFinished { job, attempt, .. }
                | Event::AttemptLost { job, attempt } => (*job, *attempt),
                Event::NodeDown { name } if !self.disturbed.contains(name) => {
                    return fail(inv::NODE_DOWN, format!("node {name} marked down"));
                }
                _ => continue,
            };
            let Some(Some(before)) = pre.get(&job) else {
                continue;
            };
            let stale = before.active_attempt().is_none_or(|a| a.number != attempt);
            if !stale {
                continue;
            }
            let was = before.attempts.iter().find(|a| a.number == attempt);
            let now = state
                .job(job)
                .and_then(|j| j.attempts.iter().find(|a| a.number == attempt));
            if was != now {
                return fail(
                    inv::FENCING,
                    format!("job {job}: report of stale attempt {attempt} changed it: {was:?} -> {now:?}"),
                );
            }
        }
        for (id, before) in pre {
            let Some(after) = state.job(*id) else {
                continue;
            };
            let was_terminal = before
                .as_ref()
                .filter(|b| b.state.is_terminal())
                .map(|b| b.state)
                .or_else(|| self.terminal.get(id).copied());
            if let Some(was) = was_terminal.filter(|was| *was != after.state) {
                return fail(
                    inv::TERMINAL,
                    format!("job {id} went from {was:?} to {:?}", after.state),
                );
            }
            if after.state.is_terminal() {
                self.terminal.insert(*id, after.state);
            }
        }
        Ok(())
    }

    /// After a restart: every job seen terminal still is.
    pub fn terminal_survives(&self, state: &State) -> Check {
        for (id, was) in &self.terminal {
            let now = state.job(*id).map(|j| j.state);
            if now != Some(*was) {
                return fail(inv::TERMINAL, format!("job {id} was {was:?}, now {now:?}"));
            }
        }
        Ok(())
    }

    /// Entries proposed: their stamps never decrease along the log.
    pub fn proposed(&mut self, entries: &[Entry]) -> Check {
        for e in entries {
            if e.at < self.last_at {
                return fail(
                    inv::TIMESTAMPS,
                    format!("entry {} at {} after {}", e.index, e.at, self.last_at),
                );
            }
            self.last_at = e.at;
        }
        Ok(())
    }

    /// After a crash the log may end earlier: stamps restart from its end.
    pub fn log_truncated(&mut self, last_at: u64) {
        self.last_at = last_at;
    }

    /// Replaying the durable log (with the same reducer) gives the live state.
    pub fn replay(durable: &[Entry], live: &State) -> Check {
        let mut replayed = State::new();
        #[cfg(feature = "sim-bugs")]
        {
            replayed.bugs = live.bugs;
        }
        for e in durable {
            replayed.apply(e);
        }
        if replayed.digest() != live.digest() {
            return fail(
                inv::REPLAY,
                format!(
                    "replay of {} entries digests {:x}, live {:x}",
                    durable.len(),
                    replayed.digest(),
                    live.digest()
                ),
            );
        }
        Ok(())
    }

    pub fn consistency(state: &State) -> Check {
        state.check_consistency().map_err(|detail| Violation {
            invariant: inv::CONSISTENCY,
            detail,
        })
    }

    /// After healing and the liveness bound: a leader exists.
    pub fn live_leader(lifecycle: Option<Lifecycle>) -> Check {
        match lifecycle {
            Some(Lifecycle::Running) => Ok(()),
            other => fail(inv::LIVE_LEADER, format!("replica is {other:?}")),
        }
    }

    /// After healing: every job is terminal, or could never be placed (no
    /// ready node matches its constraints and is large enough).
    pub fn live_jobs(state: &State) -> Check {
        for job in state.jobs.values() {
            if job.state.is_terminal() || !placeable(state, job) && job.state == JobState::Queued {
                continue;
            }
            return fail(
                inv::LIVE_JOBS,
                format!(
                    "job {} still {:?}: {:?}",
                    job.id,
                    job.state,
                    job.attempts.last()
                ),
            );
        }
        Ok(())
    }

    /// After healing: a result a live runner reported for an attempt is
    /// recorded on that attempt. `results` are (job, attempt, attempt state).
    pub fn live_results(
        state: &State,
        results: &[(JobId, AttemptNumber, rustci_core::model::AttemptState)],
    ) -> Check {
        for (job, attempt, want) in results {
            let got = state
                .job(*job)
                .and_then(|j| j.attempts.iter().find(|a| a.number == *attempt))
                .map(|a| a.state);
            if got != Some(*want) {
                return fail(
                    inv::LIVE_RESULTS,
                    format!("job {job} attempt {attempt}: ran to {want:?}, recorded {got:?}"),
                );
            }
        }
        Ok(())
    }
}

/// Some ready node matches the job's constraints and is large enough.
pub fn placeable(state: &State, job: &Job) -> bool {
    state.nodes.values().any(|n| {
        n.accepts_work()
            && n.satisfies(&job.spec.constraints)
            && job.spec.resources.fits_in(&n.capacity)
    })
}
