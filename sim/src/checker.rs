//! The invariant checkers: independent oracles.
//!
//! A [`Checker`] is fed observations (what clients were told, what runners
//! executed, what the replica proposed and applied, what each agent
//! advertised) and answers each with `Ok` or the [`Violation`] of one named
//! invariant. It reads no simulator internals, so unit tests can feed it
//! crafted violating histories.
//!
//! It decides from first principles, never by calling the core code whose
//! result it judges: it keeps its own ledger of the log (which node
//! incarnation each placement went to, each node's drain status, each job's
//! submission order and spec, cancels), does its own arithmetic per resource
//! dimension against the capacity the agent itself advertised, its own label
//! matching against the labels the agent advertised, its own ordering of
//! queued jobs by priority and submission index, and its own computation of
//! the node a pass holds for the first job that fits no node now (the
//! scheduler's reservation). From core's state it reads only plain data (a
//! job's state and its attempts' states and nodes).
//!
//! Everything per step is incremental: work is proportional to what the step
//! touched. Whole-state checks (replay, consistency) run at quiescent points.

use std::collections::{BTreeMap, BTreeSet};

use rustci_core::event::{Entry, Event, LogIndex};
use rustci_core::model::{
    AttemptNumber, AttemptState, Job, JobId, JobState, Labels, Resources, Usage,
};
use rustci_core::replica::Lifecycle;
use rustci_core::state::State;

/// The invariants, by the names reports and tests use.
pub mod inv {
    pub const ACKED_DURABLE: &str = "acked_submission_durable";
    pub const IDEMPOTENCY: &str = "idempotency_one_job";
    pub const EXCLUSIVE: &str = "exclusive_execution";
    pub const CAPACITY: &str = "capacity_and_constraints";
    pub const PRIORITY: &str = "priority_order";
    pub const TIGHTEST_FIT: &str = "tightest_fit";
    pub const PROGRESS: &str = "placement_progress";
    pub const RETRY_BUDGET: &str = "retry_budget";
    pub const INCARNATION: &str = "attempt_on_its_incarnation";
    pub const CANCEL: &str = "cancelled_never_starts";
    pub const DRAIN: &str = "drained_node_gets_nothing_new";
    pub const PASS_BOUNDS: &str = "pass_within_bounds";
    pub const TERMINAL: &str = "terminal_stays_terminal";
    pub const FENCING: &str = "stale_result_fenced";
    pub const NODE_DOWN: &str = "node_down_only_if_disturbed";
    pub const REPLAY: &str = "replay_equals_live";
    pub const CONSISTENCY: &str = "state_consistency";
    pub const TIMESTAMPS: &str = "log_timestamps_monotonic";
    pub const LIVE_LEADER: &str = "liveness_leader";
    pub const LIVE_JOBS: &str = "liveness_jobs_terminal";
    pub const LIVE_RESULTS: &str = "liveness_results_recorded";
    pub const RESULT_ONCE: &str = "result_recorded_once";
    /// At most one leader per term (Raft's election safety).
    pub const ELECTION_SAFETY: &str = "election_safety";
    /// Every replica applies the same entry at each index, and only
    /// entries durable on its own disk (Raft's state machine safety).
    pub const STATE_MACHINE_SAFETY: &str = "state_machine_safety";
    /// A leader moves its commit index only onto an entry of its own term
    /// (Raft §5.4.2): counting replicas never commits an older term's entry
    /// by itself, which is what makes Figure 8's overwrite impossible.
    pub const COMMIT_CURRENT_TERM: &str = "commit_only_current_term";
    /// An operator's membership change is answered with the replicas it
    /// asked for, and at the end every live replica counts exactly the
    /// committed membership (a replaced replica is out of it).
    pub const MEMBERSHIP: &str = "membership_in_effect";
    /// A read answered by a replica reflects every submission acknowledged
    /// before the read was sent (linearizable reads).
    pub const LINEARIZABLE_READS: &str = "linearizable_reads";
    pub const RESERVATION: &str = "reservation_respected";
    pub const STARVATION: &str = "no_starvation";
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

// --- the checker's own arithmetic and matching ---

/// `need` fits in `free`: every dimension on its own.
fn fits(need: Resources, free: Resources) -> bool {
    need.cpu_millis <= free.cpu_millis && need.memory_mb <= free.memory_mb
}

fn minus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis.saturating_sub(b.cpu_millis),
        memory_mb: a.memory_mb.saturating_sub(b.memory_mb),
    }
}

fn plus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis + b.cpu_millis,
        memory_mb: a.memory_mb + b.memory_mb,
    }
}

/// Every constraint names a label the node has, with the same value.
fn matches(labels: &Labels, constraints: &Labels) -> bool {
    for (key, want) in constraints {
        match labels.get(key) {
            Some(have) if have == want => {}
            _ => return false,
        }
    }
    true
}

/// Free capacity left after a placement, as parts per million of the
/// node's capacity, summed over the dimensions: lower is a tighter fit.
fn leftover_ppm(left: Resources, capacity: Resources) -> u128 {
    let ppm = |l: u64, c: u64| {
        if c == 0 {
            0
        } else {
            u128::from(l) * 1_000_000 / u128::from(c)
        }
    };
    ppm(left.cpu_millis, capacity.cpu_millis) + ppm(left.memory_mb, capacity.memory_mb)
}

/// What a node must still free for `need`, as parts per million of its
/// capacity, summed over the dimensions: lower means the job fits sooner.
fn shortfall_ppm(need: Resources, free: Resources, capacity: Resources) -> u128 {
    leftover_ppm(minus(need, free), capacity)
}

/// The node the scheduler must hold for a job that needs `need` and fits
/// none of `nodes` (name, capacity, free now; every one matching and large
/// enough) now: the least shortfall, then the lowest name.
fn node_to_hold<'a>(need: Resources, nodes: &[(&'a str, Resources, Resources)]) -> Option<&'a str> {
    nodes
        .iter()
        .min_by_key(|(name, cap, free)| (shortfall_ppm(need, *free, *cap), *name))
        .map(|(name, _, _)| *name)
}

/// A node held for a job during one pass: backfill may use only what the
/// node has free beyond the job's need.
struct Held<'a> {
    key: OrderKey,
    node: &'a str,
    need: Resources,
}

impl Held<'_> {
    /// What `node` offers a job behind the held one, out of `free`.
    fn offers(held: &Option<Held>, node: &str, free: Resources) -> Resources {
        match held {
            Some(h) if h.node == node => minus(free, h.need),
            _ => free,
        }
    }
}

fn failed_attempts(job: &Job) -> u32 {
    job.attempts
        .iter()
        .filter(|a| matches!(a.state, AttemptState::Failed | AttemptState::TimedOut))
        .count() as u32
}

/// Position of the last placement of each (job, attempt) in `entries`.
fn last_assignments(entries: &[Entry]) -> BTreeMap<(JobId, AttemptNumber), usize> {
    let mut last = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Event::AttemptAssigned { job, attempt, .. } = &e.event {
            last.insert((*job, *attempt), i);
        }
    }
    last
}

// --- the ledger: what the log said, as the checker understands it ---

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeStatus {
    Ready,
    Draining,
    Down,
    Left,
}

#[derive(Clone, Debug)]
struct NodeRec {
    incarnation: u64,
    status: NodeStatus,
}

/// A job as submitted, with what happened to it in the log.
#[derive(Clone, Debug)]
struct JobRec {
    name: String,
    priority: u8,
    /// Index of the submission: FIFO order within a priority.
    seq: LogIndex,
    need: Resources,
    constraints: Labels,
    max_retries: u32,
    /// Attempts placed before the job was first cancelled: none after may
    /// ever be placed or started.
    cancel_point: Option<AttemptNumber>,
    /// Placements the reducer accepted: attempt -> (node, its incarnation
    /// then, by the ledger).
    placed: BTreeMap<AttemptNumber, (String, u64)>,
}

/// A result a live agent reported: (job, attempt, the attempt state it
/// means, what the attempt used).
pub type LiveResult = (JobId, AttemptNumber, AttemptState, Option<Usage>);

/// Queue order by the checker's own rule: higher priority first, then
/// earlier submission.
type OrderKey = (std::cmp::Reverse<u8>, LogIndex, JobId);

#[derive(Default)]
pub struct Checker {
    /// Job ids a client got a success reply for, with the job's name (names
    /// are unique per submission, so a reused id cannot pass for the job).
    acked: BTreeMap<JobId, String>,
    /// Idempotency key -> the job id clients were told.
    replied_for_key: BTreeMap<String, JobId>,
    /// Idempotency key -> the job (id, name) that the state created for it.
    created_for_key: BTreeMap<String, (JobId, String)>,
    /// The next job id not yet looked at by the ledger.
    next_unseen_job: u64,
    /// Ground truth: attempts executing on runners now, by job.
    executing: BTreeMap<JobId, (AttemptNumber, String)>,
    /// Jobs seen terminal, with the terminal state.
    terminal: BTreeMap<JobId, JobState>,
    /// Nodes that were ever crashed, paused, cut off or on a lossy link.
    pub disturbed: BTreeSet<String>,
    /// `at` of the last entry proposed.
    last_at: u64,
    /// What each agent incarnation advertised: (capacity, labels).
    truth: BTreeMap<(String, u64), (Resources, Labels)>,
    // The ledger, rebuilt from the durable log at every replica restart.
    nodes: BTreeMap<String, NodeRec>,
    jobs: BTreeMap<JobId, JobRec>,
    /// Queued jobs (by the state's job states), in the checker's own order.
    queued: BTreeSet<OrderKey>,
    /// Active attempts by the state's data: job -> (node, attempt).
    active: BTreeMap<JobId, (String, AttemptNumber)>,
    /// Resources of the active attempts per node, by the checker's sums.
    allocated: BTreeMap<String, Resources>,
    /// Consecutive idle ticks at which some queued job was owed a placement.
    owed_ticks: u32,
    /// Attempts still running when their job's cancel was applied: the
    /// replica owes their runners a kill in the outputs of that apply.
    kills_owed: BTreeSet<(JobId, AttemptNumber)>,
    /// Jobs whose first cancel the ledger took in the batch being walked.
    first_cancels: Vec<JobId>,
    /// Attempts whose result the log holds: each may be recorded once.
    results: BTreeSet<(JobId, AttemptNumber)>,
    /// The longest time-out of any job submitted (s).
    timeout_secs_max: u64,
    /// Node events the ledger took (registrations, drains, undrains, downs,
    /// ups, removals): each restarts the starvation clock.
    node_changes: u64,
    /// In the liveness phase, the job first in line (the first queued job
    /// some ready node could ever take): (job, its placements so far,
    /// `node_changes` then, since when in simulated ms).
    first_in_line: Option<(JobId, usize, u64, u64)>,
}

/// Idle replica ticks a job may be owed a placement before it is a
/// violation (a pass runs on the next tick at the latest).
pub const OWED_TICKS_MAX: u32 = 3;

/// Once the load stops and the network has healed, the job first in line
/// must be placed within the longest time-out of any job plus this: the
/// node held for it takes nothing new, so it is free once the attempts
/// there have ended (each within its time-out), reported (heartbeats every
/// second, resent until acknowledged) and a pass has run. A node event
/// (a join, a drain, a down...) restarts the clock.
pub const STARVATION_SLACK_MS: u64 = 10_000;

impl Checker {
    pub fn new() -> Checker {
        Checker {
            next_unseen_job: 1,
            ..Checker::default()
        }
    }

    /// An agent incarnation started, advertising `capacity` and `labels`:
    /// the ground truth its placements are judged against.
    pub fn node_truth(
        &mut self,
        name: &str,
        incarnation: u64,
        capacity: Resources,
        labels: Labels,
    ) {
        self.truth
            .insert((name.to_string(), incarnation), (capacity, labels));
    }

    fn truth_of(&self, node: &str, incarnation: u64) -> (Resources, Labels) {
        self.truth
            .get(&(node.to_string(), incarnation))
            .cloned()
            .unwrap_or_default()
    }

    /// The advertised capacity and labels of a node's current incarnation
    /// by the ledger, when the ledger thinks it takes work.
    fn ready_node(&self, node: &str) -> Option<(Resources, Labels)> {
        let rec = self.nodes.get(node)?;
        (rec.status == NodeStatus::Ready).then(|| self.truth_of(node, rec.incarnation))
    }

    fn free_on(&self, node: &str, capacity: Resources) -> Resources {
        minus(
            capacity,
            self.allocated.get(node).copied().unwrap_or_default(),
        )
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
    /// Returns the new jobs by the index of their submission entry.
    fn new_jobs(&mut self, state: &State) -> Result<BTreeMap<LogIndex, JobId>, Violation> {
        let from = self.next_unseen_job;
        self.next_unseen_job = self.next_unseen_job.max(state.jobs.next_id().0);
        let mut by_seq = BTreeMap::new();
        for (id, job) in state.jobs.range(JobId(from)..) {
            by_seq.insert(job.seq, *id);
            let Some(key) = &job.idempotency_key else {
                continue;
            };
            let this = (*id, job.spec.name.clone());
            let first = self
                .created_for_key
                .entry(key.clone())
                .or_insert(this.clone());
            if *first != this {
                return Err(Violation {
                    invariant: inv::IDEMPOTENCY,
                    detail: format!("key {key} made job {} and job {id}", first.0),
                });
            }
        }
        Ok(by_seq)
    }

    /// A runner started executing an attempt on incarnation `incarnation` of
    /// `node`. `running` is the total of the resources executing on that
    /// node including this attempt.
    pub fn exec_start(
        &mut self,
        job: JobId,
        attempt: AttemptNumber,
        node: &str,
        incarnation: u64,
        running: Resources,
    ) -> Check {
        if let Some((other, on)) = self.executing.get(&job) {
            return fail(
                inv::EXCLUSIVE,
                format!("job {job}: attempt {attempt} starts on {node} while attempt {other} runs on {on}"),
            );
        }
        self.executing.insert(job, (attempt, node.to_string()));
        let (capacity, labels) = self.truth_of(node, incarnation);
        if !fits(running, capacity) {
            let here: Vec<String> = self
                .executing
                .iter()
                .filter(|(_, (_, on))| on == node)
                .map(|(j, (a, _))| format!("{j}/{a}"))
                .collect();
            return fail(
                inv::CAPACITY,
                format!(
                    "node {node} executes {running:?} > capacity {capacity:?} (job/attempt: {})",
                    here.join(" ")
                ),
            );
        }
        let Some(rec) = self.jobs.get(&job) else {
            return Ok(());
        };
        if !matches(&labels, &rec.constraints) {
            return fail(
                inv::CAPACITY,
                format!(
                    "job {job} ({:?}) executes on {node} ({labels:?})",
                    rec.constraints
                ),
            );
        }
        if let Some(point) = rec.cancel_point.filter(|p| attempt > *p) {
            return fail(
                inv::CANCEL,
                format!("job {job}: attempt {attempt} starts after a cancel at attempt {point}"),
            );
        }
        match rec.placed.get(&attempt) {
            Some((on, inc)) if on == node && *inc == incarnation => Ok(()),
            Some((on, inc)) => fail(
                inv::INCARNATION,
                format!(
                    "job {job} attempt {attempt} placed on {on} incarnation {inc} starts on {node} incarnation {incarnation}"
                ),
            ),
            None => Ok(()),
        }
    }

    pub fn exec_end(&mut self, job: JobId, attempt: AttemptNumber) {
        if self.executing.get(&job).is_some_and(|(a, _)| *a == attempt) {
            self.executing.remove(&job);
        }
    }

    /// An agent was told by the control plane to run an attempt that was
    /// placed on another node or another incarnation of its node: it must
    /// not start it, and it is a violation.
    pub fn foreign_attempt(
        &self,
        me: &str,
        my_incarnation: u64,
        job: JobId,
        attempt: AttemptNumber,
        node: &str,
        incarnation: u64,
    ) -> Check {
        fail(
            inv::INCARNATION,
            format!(
                "{me} incarnation {my_incarnation} is handed job {job} attempt {attempt} placed on {node} incarnation {incarnation}"
            ),
        )
    }

    /// The scheduler proposed `entries` from the state it ran on (which the
    /// ledger mirrors): every placement goes to a ready node, matches and
    /// fits by the checker's own arithmetic, takes the tightest fit, and no
    /// queued job ahead of it by priority and submission order that would
    /// have fit on that node is left waiting.
    pub fn placements(&self, entries: &[Entry], placements_max: usize) -> Check {
        let count = entries
            .iter()
            .filter(|e| matches!(e.event, Event::AttemptAssigned { .. }))
            .count();
        if count > placements_max {
            return fail(
                inv::PASS_BOUNDS,
                format!("one pass proposed {count} placements, more than {placements_max}"),
            );
        }
        let mut free: BTreeMap<&str, Resources> = BTreeMap::new();
        let mut placed: BTreeSet<JobId> = BTreeSet::new();
        // The pass's reservation, once a job ahead of a placement fits no
        // node (rule 4 of the scheduler): queued jobs up to `walked` were
        // looked at for it.
        let mut held: Option<Held> = None;
        let mut walked: Option<OrderKey> = None;
        let mut ready: Option<Vec<(&str, Resources, Labels)>> = None;
        for entry in entries {
            let Event::AttemptAssigned { job, node, .. } = &entry.event else {
                continue;
            };
            let Some(rec) = self.jobs.get(job) else {
                return fail(inv::CAPACITY, format!("placement of unknown job {job}"));
            };
            let key = (std::cmp::Reverse(rec.priority), rec.seq, *job);
            if held.is_none() {
                let ready = ready.get_or_insert_with(|| self.ready_list());
                held = self.held_ahead_of(ready, key, walked, &free, &placed);
            }
            walked = Some(walked.map_or(key, |w| w.max(key)));
            let Some((capacity, labels)) = self.ready_node(node) else {
                return fail(
                    inv::DRAIN,
                    format!(
                        "job {job} placed on {node}, which is {:?}",
                        self.nodes.get(node.as_str()).map(|n| n.status)
                    ),
                );
            };
            let f = *free
                .entry(node.as_str())
                .or_insert_with(|| self.free_on(node, capacity));
            if !matches(&labels, &rec.constraints) || !fits(rec.need, f) {
                return fail(
                    inv::CAPACITY,
                    format!(
                        "job {job} ({:?}, {:?}) placed on {node} ({labels:?}, free {f:?})",
                        rec.need, rec.constraints
                    ),
                );
            }
            // What the node offers this job: all it has free, unless it is
            // held for a job ahead.
            let offered = Held::offers(&held, node, f);
            if let Some(h) = held.as_ref().filter(|_| !fits(rec.need, offered)) {
                return fail(
                    inv::RESERVATION,
                    format!(
                        "job {job} (needs {:?}) placed on {node}, which is held for job {} (needs {:?}) and has {f:?} free",
                        rec.need, h.key.2, h.need
                    ),
                );
            }
            for ahead in self.queued.range(..key) {
                let q = ahead.2;
                if placed.contains(&q) {
                    continue;
                }
                let Some(qrec) = self.jobs.get(&q) else {
                    continue;
                };
                // (On a held node the job ahead may have seen only what the
                // node offers; but nothing is placed there past the
                // reservation check above, since the held job is short in
                // some dimension and every job needs some of each.)
                if fits(qrec.need, f) && matches(&labels, &qrec.constraints) {
                    return fail(
                        inv::PRIORITY,
                        format!(
                            "job {job} (priority {}, submitted at {}) placed on {node} while job {q} (priority {}, submitted at {}) that fits waits",
                            rec.priority, rec.seq, qrec.priority, qrec.seq
                        ),
                    );
                }
            }
            let score = leftover_ppm(minus(offered, rec.need), capacity);
            for (other, rec_other) in &self.nodes {
                if other == node || rec_other.status != NodeStatus::Ready {
                    continue;
                }
                let (cap, lab) = self.truth_of(other, rec_other.incarnation);
                let f_other = free
                    .get(other.as_str())
                    .copied()
                    .unwrap_or_else(|| self.free_on(other, cap));
                let f_other = Held::offers(&held, other, f_other);
                if !matches(&lab, &rec.constraints) || !fits(rec.need, f_other) {
                    continue;
                }
                let s = leftover_ppm(minus(f_other, rec.need), cap);
                if (s, other.as_str()) < (score, node.as_str()) {
                    return fail(
                        inv::TIGHTEST_FIT,
                        format!("job {job} placed on {node} (leftover {score} ppm) while {other} fits tighter ({s} ppm)"),
                    );
                }
            }
            free.insert(node.as_str(), minus(f, rec.need));
            placed.insert(*job);
        }
        Ok(())
    }

    /// The ready nodes by the ledger, with what their current incarnation
    /// advertised: (name, capacity, labels). Built once per check, not per
    /// job (it copies the labels).
    fn ready_list(&self) -> Vec<(&str, Resources, Labels)> {
        self.nodes
            .keys()
            .filter_map(|n| self.ready_node(n).map(|(c, l)| (n.as_str(), c, l)))
            .collect()
    }

    /// The nodes of `ready` that satisfy `rec`'s constraints and are large
    /// enough for it: (name, capacity, free by the checker's sums, or
    /// `free` where a pass in progress placed).
    fn could_take<'a>(
        &self,
        ready: &[(&'a str, Resources, Labels)],
        rec: &JobRec,
        free: &BTreeMap<&str, Resources>,
    ) -> Vec<(&'a str, Resources, Resources)> {
        ready
            .iter()
            .filter(|(_, cap, labels)| matches(labels, &rec.constraints) && fits(rec.need, *cap))
            .map(|(n, cap, _)| {
                let f = free
                    .get(n)
                    .copied()
                    .unwrap_or_else(|| self.free_on(n, *cap));
                (*n, *cap, f)
            })
            .collect()
    }

    /// The reservation a pass makes among the queued jobs after `after` and
    /// ahead of `key` that it did not place: the first one some ready node
    /// could ever take that fits none now (`free`: the pass's placements so
    /// far) holds the node that needs the least freed.
    fn held_ahead_of(
        &self,
        ready: &[(&str, Resources, Labels)],
        key: OrderKey,
        after: Option<OrderKey>,
        free: &BTreeMap<&str, Resources>,
        placed: &BTreeSet<JobId>,
    ) -> Option<Held<'_>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        for ahead in self.queued.range((from, Excluded(key))) {
            if placed.contains(&ahead.2) {
                continue;
            }
            let Some(rec) = self.jobs.get(&ahead.2) else {
                continue;
            };
            let nodes = self.could_take(ready, rec, free);
            if nodes.is_empty() || nodes.iter().any(|(_, _, f)| fits(rec.need, *f)) {
                continue;
            }
            let node = node_to_hold(rec.need, &nodes)?;
            let node = self.nodes.get_key_value(node)?.0.as_str();
            return Some(Held {
                key: *ahead,
                node,
                need: rec.need,
            });
        }
        None
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

    /// `entries` were applied and gave `state`. Walks them through the
    /// ledger, judging every placement the reducer accepted; then checks
    /// terminal jobs, stale reports, node downs, capacity and retry budgets
    /// of everything the entries touched.
    pub fn applied(&mut self, pre: &PreApply, entries: &[Entry], state: &State) -> Check {
        let by_seq = self.new_jobs(state)?;
        let mut touched: BTreeSet<JobId> = by_seq.values().copied().collect();
        let last = last_assignments(entries);
        for (i, e) in entries.iter().enumerate() {
            self.ledger_step(i, e, state, &by_seq, &last, &mut touched)?;
            self.fencing(pre, e, state)?;
        }
        self.terminal_jobs(pre, &touched, state)?;
        self.owe_kills(pre, state);
        self.refresh(&touched, state)
    }

    /// A cancel applied while the job's attempt ran must send its runner a
    /// kill (reconciliation would repair a lost one, but only if the state
    /// asks for it, so the kill must be there).
    fn owe_kills(&mut self, pre: &PreApply, state: &State) {
        for job in std::mem::take(&mut self.first_cancels) {
            let job = &job;
            let was_terminal = pre
                .get(job)
                .and_then(|j| j.as_ref())
                .is_some_and(|j| j.state.is_terminal());
            if was_terminal {
                continue;
            }
            let Some(active) = state
                .job(*job)
                .filter(|j| j.state == JobState::Cancelled)
                .and_then(|j| j.attempts.last())
                .filter(|a| a.state.is_active())
            else {
                continue;
            };
            if self
                .active
                .get(job)
                .is_some_and(|(_, n)| *n == active.number)
            {
                self.kills_owed.insert((*job, active.number));
            }
        }
    }

    /// The replica told a runner to kill an attempt.
    pub fn runner_kill(&mut self, job: JobId, attempt: AttemptNumber) {
        self.kills_owed.remove(&(job, attempt));
    }

    /// After the outputs of an applied batch: every kill owed went out.
    pub fn kills_sent(&mut self) -> Check {
        match self.kills_owed.pop_first() {
            None => Ok(()),
            Some((job, attempt)) => fail(
                inv::CANCEL,
                format!(
                    "job {job} was cancelled while attempt {attempt} ran, and no kill was sent"
                ),
            ),
        }
    }

    /// After a restart: the ledger is rebuilt from the durable log and the
    /// recovered state, and judged again.
    pub fn resync(&mut self, durable: &[Entry], state: &State) -> Check {
        self.nodes.clear();
        self.jobs.clear();
        self.queued.clear();
        self.active.clear();
        self.allocated.clear();
        self.owed_ticks = 0;
        self.next_unseen_job = 1;
        self.first_cancels.clear();
        self.results.clear();
        self.first_in_line = None;
        let by_seq = self.new_jobs(state)?;
        let mut touched: BTreeSet<JobId> = by_seq.values().copied().collect();
        let last = last_assignments(durable);
        for (i, e) in durable.iter().enumerate() {
            self.ledger_step(i, e, state, &by_seq, &last, &mut touched)?;
        }
        // A restart sends no kills: reconciliation carries the cancels.
        self.first_cancels.clear();
        self.refresh(&touched, state)
    }

    /// Takes one entry (at `position` in the list being walked) into the
    /// ledger. `state` is the state after the whole list was applied.
    fn ledger_step(
        &mut self,
        position: usize,
        entry: &Entry,
        state: &State,
        by_seq: &BTreeMap<LogIndex, JobId>,
        last: &BTreeMap<(JobId, AttemptNumber), usize>,
        touched: &mut BTreeSet<JobId>,
    ) -> Check {
        match &entry.event {
            Event::JobSubmitted { spec, .. } => {
                if let Some(id) = by_seq.get(&entry.index) {
                    self.timeout_secs_max = self.timeout_secs_max.max(spec.timeout_secs);
                    self.jobs.insert(
                        *id,
                        JobRec {
                            name: spec.name.clone(),
                            priority: spec.priority,
                            seq: entry.index,
                            need: spec.resources,
                            constraints: spec.constraints.clone(),
                            max_retries: spec.max_retries,
                            cancel_point: None,
                            placed: BTreeMap::new(),
                        },
                    );
                }
            }
            Event::JobCancelled { job } => {
                touched.insert(*job);
                if let Some(rec) = self.jobs.get_mut(job) {
                    if rec.cancel_point.is_none() {
                        let placed = rec.placed.keys().next_back().copied().unwrap_or(0);
                        rec.cancel_point = Some(placed);
                        self.first_cancels.push(*job);
                    }
                }
            }
            Event::AttemptAssigned { job, attempt, node } => {
                touched.insert(*job);
                // A refused placement leaves its attempt number free for a
                // later one, so only the last placement of an attempt
                // number can be the one the state shows.
                let accepted = last.get(&(*job, *attempt)) == Some(&position)
                    && state
                        .job(*job)
                        .and_then(|j| j.attempts.get((*attempt as usize).wrapping_sub(1)))
                        .is_some_and(|a| a.number == *attempt && a.node == *node);
                if accepted {
                    self.accepted_placement(*job, *attempt, node, state)?;
                }
            }
            Event::AttemptFinished { job, attempt, .. } => {
                touched.insert(*job);
                // A result is recorded once: a report resent while its first
                // copy was on its way to the log must not be appended again.
                if !self.results.insert((*job, *attempt)) {
                    return fail(
                        inv::RESULT_ONCE,
                        format!(
                            "job {job} attempt {attempt}: a second result in the log at index {}",
                            entry.index
                        ),
                    );
                }
            }
            Event::AttemptStarted { job, .. } | Event::AttemptLost { job, .. } => {
                touched.insert(*job);
            }
            // The replicas, not the jobs or nodes the ledger follows.
            Event::MembersChanged { .. } => {}
            Event::IdempotencyKeysExpired { before } => {
                // An expired key may name a new job from now on.
                let stamp = |id: &JobId| state.job(*id).map_or(0, |j| j.submitted_at);
                self.created_for_key
                    .retain(|_, (id, _)| stamp(id) >= *before);
                self.replied_for_key.retain(|_, id| stamp(id) >= *before);
            }
            Event::NodeRegistered {
                name, incarnation, ..
            } => {
                self.touch_node(name, touched);
                self.node_changes += 1;
                let rec = self.nodes.entry(name.clone()).or_insert(NodeRec {
                    incarnation: *incarnation,
                    status: NodeStatus::Ready,
                });
                rec.incarnation = *incarnation;
                if matches!(rec.status, NodeStatus::Down | NodeStatus::Left) {
                    rec.status = NodeStatus::Ready;
                }
            }
            Event::NodeDrained { name } => {
                self.node_moves(name, &[NodeStatus::Ready], NodeStatus::Draining)
            }
            Event::NodeUndrained { name } => {
                self.node_moves(name, &[NodeStatus::Draining], NodeStatus::Ready)
            }
            Event::NodeUp { name, incarnation } => {
                if self.is_incarnation(name, *incarnation) {
                    self.node_moves(name, &[NodeStatus::Down], NodeStatus::Ready);
                }
            }
            Event::NodeDown { name, incarnation } => {
                if !self.is_incarnation(name, *incarnation) {
                    return Ok(());
                }
                if !self.disturbed.contains(name) {
                    return fail(inv::NODE_DOWN, format!("node {name} marked down"));
                }
                self.node_moves(
                    name,
                    &[NodeStatus::Ready, NodeStatus::Draining],
                    NodeStatus::Down,
                );
            }
            Event::NodeRemoved { name, .. } => {
                self.touch_node(name, touched);
                self.node_moves(
                    name,
                    &[NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Down],
                    NodeStatus::Left,
                );
            }
            Event::LeaderElected { .. } => {}
        }
        Ok(())
    }

    /// `incarnation` is the node's current one by the ledger (0: any).
    fn is_incarnation(&self, name: &str, incarnation: u64) -> bool {
        incarnation == 0
            || self
                .nodes
                .get(name)
                .is_some_and(|n| n.incarnation == incarnation)
    }

    fn node_moves(&mut self, name: &str, from: &[NodeStatus], to: NodeStatus) {
        if let Some(rec) = self.nodes.get_mut(name) {
            if from.contains(&rec.status) {
                rec.status = to;
                self.node_changes += 1;
            }
        }
    }

    /// Every job the ledger knows active on `node` may change.
    fn touch_node(&self, node: &str, touched: &mut BTreeSet<JobId>) {
        touched.extend(
            self.active
                .iter()
                .filter(|(_, (n, _))| n == node)
                .map(|(id, _)| *id),
        );
    }

    /// The reducer accepted a placement: the node must have been ready by
    /// the ledger, the job not cancelled, and the node's advertised labels
    /// must satisfy every constraint.
    fn accepted_placement(
        &mut self,
        job: JobId,
        attempt: AttemptNumber,
        node: &str,
        state: &State,
    ) -> Check {
        let Some(node_rec) = self.nodes.get(node).cloned() else {
            return fail(
                inv::DRAIN,
                format!("job {job} placed on {node}, never registered"),
            );
        };
        if node_rec.status != NodeStatus::Ready {
            return fail(
                inv::DRAIN,
                format!(
                    "job {job} attempt {attempt} placed on {node}, which is {:?}",
                    node_rec.status
                ),
            );
        }
        let (_, labels) = self.truth_of(node, node_rec.incarnation);
        let Some(rec) = self.jobs.get_mut(&job) else {
            return fail(
                inv::CAPACITY,
                format!(
                    "placement of job {job}, never submitted (state has {:?})",
                    state.job(job).map(|j| &j.spec.name)
                ),
            );
        };
        if let Some(point) = rec.cancel_point {
            return fail(
                inv::CANCEL,
                format!("job {job} cancelled at attempt {point} gets attempt {attempt} on {node}"),
            );
        }
        if !matches(&labels, &rec.constraints) {
            return fail(
                inv::CAPACITY,
                format!(
                    "job {job} ({:?}) placed on {node} ({labels:?})",
                    rec.constraints
                ),
            );
        }
        rec.placed
            .insert(attempt, (node.to_string(), node_rec.incarnation));
        // A job ahead of the one first in line took a node (a retry of a
        // higher-priority job, say): strict priority, not starvation, so
        // the starvation clock starts again.
        let key = (std::cmp::Reverse(rec.priority), rec.seq, job);
        if let Some((first, ..)) = self.first_in_line {
            let first_key = self
                .jobs
                .get(&first)
                .map(|r| (std::cmp::Reverse(r.priority), r.seq, first));
            if first_key.is_some_and(|f| key < f) {
                self.first_in_line = None;
            }
        }
        Ok(())
    }

    /// A report about a stale attempt changed nothing.
    fn fencing(&self, pre: &PreApply, e: &Entry, state: &State) -> Check {
        let (job, attempt) = match &e.event {
            Event::AttemptStarted { job, attempt }
            | Event::AttemptFinished { job, attempt, .. }
            | Event::AttemptLost { job, attempt } => (*job, *attempt),
            _ => return Ok(()),
        };
        let Some(Some(before)) = pre.get(&job) else {
            return Ok(());
        };
        let stale = before
            .attempts
            .last()
            .is_none_or(|a| a.number != attempt || !a.state.is_active());
        if !stale {
            return Ok(());
        }
        let was = before.attempts.iter().find(|a| a.number == attempt);
        let now = state
            .job(job)
            .and_then(|j| j.attempts.iter().find(|a| a.number == attempt));
        if was != now {
            return fail(
                inv::FENCING,
                format!(
                    "job {job}: report of stale attempt {attempt} changed it: {was:?} -> {now:?}"
                ),
            );
        }
        Ok(())
    }

    /// Every job the batch touched (named by an entry, or active on a node
    /// an entry was about) that was terminal before still is.
    fn terminal_jobs(&mut self, pre: &PreApply, touched: &BTreeSet<JobId>, state: &State) -> Check {
        let ids: BTreeSet<JobId> = pre.keys().chain(touched).copied().collect();
        for id in &ids {
            let Some(after) = state.job(*id) else {
                continue;
            };
            let was_terminal = pre
                .get(id)
                .and_then(|b| b.as_ref())
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

    /// Re-reads the touched jobs' states: the queue and the active attempts
    /// by the checker's books, then capacity per node and retry budgets.
    fn refresh(&mut self, touched: &BTreeSet<JobId>, state: &State) -> Check {
        let mut nodes: BTreeSet<String> = BTreeSet::new();
        for id in touched {
            let Some(rec) = self.jobs.get(id) else {
                continue;
            };
            let Some(job) = state.job(*id) else {
                continue;
            };
            let key = (std::cmp::Reverse(rec.priority), rec.seq, *id);
            if job.state == JobState::Queued {
                self.queued.insert(key);
            } else {
                self.queued.remove(&key);
            }
            let now_active = job
                .attempts
                .last()
                .filter(|a| a.state.is_active())
                .map(|a| (a.node.clone(), a.number));
            let was = match &now_active {
                Some(act) => self.active.insert(*id, act.clone()),
                None => self.active.remove(id),
            };
            if was != now_active {
                nodes.extend(was.map(|(n, _)| n));
                nodes.extend(now_active.map(|(n, _)| n));
            }
            let failed = failed_attempts(job);
            let budget = rec.max_retries + 1;
            let lost = job
                .attempts
                .iter()
                .filter(|a| a.state == AttemptState::Lost)
                .count();
            // A job also fails, with its retries unspent, once it was lost
            // LOST_ATTEMPTS_MAX times.
            let gave_up = lost >= rustci_core::state::LOST_ATTEMPTS_MAX;
            if failed > budget
                || job.state == JobState::Failed && failed != budget && !gave_up
                || !job.state.is_terminal() && (failed >= budget || gave_up)
            {
                return fail(
                    inv::RETRY_BUDGET,
                    format!(
                        "job {id} ({}) is {:?} after {failed} failed attempts with max_retries {}",
                        rec.name, job.state, rec.max_retries
                    ),
                );
            }
        }
        for node in nodes {
            let mut sum = Resources::default();
            for (id, (n, _)) in &self.active {
                if *n == node {
                    if let Some(rec) = self.jobs.get(id) {
                        sum = plus(sum, rec.need);
                    }
                }
            }
            let (capacity, _) = self
                .nodes
                .get(&node)
                .map(|r| self.truth_of(&node, r.incarnation))
                .unwrap_or_default();
            if !fits(sum, capacity) {
                return fail(
                    inv::CAPACITY,
                    format!("node {node}: active attempts hold {sum:?} > capacity {capacity:?}"),
                );
            }
            self.allocated.insert(node, sum);
        }
        Ok(())
    }

    /// The first queued job (in the checker's order) that the scheduler
    /// must place now: one that fits a ready node's free capacity with fewer
    /// than `scan_jobs_max` jobs ahead of it that some ready node could ever
    /// take (the pass's scan bound counts only those). The first of those
    /// that fits no node holds one (rule 4 of the scheduler): jobs behind it
    /// are owed only what that node has beyond its need.
    pub fn owed_placement(&self, scan_jobs_max: usize) -> Option<JobId> {
        let none = BTreeMap::new();
        let ready = self.ready_list();
        let mut held: Option<(&str, Resources)> = None;
        let mut scanned = 0usize;
        for (_, _, id) in &self.queued {
            if scanned >= scan_jobs_max {
                return None;
            }
            let Some(rec) = self.jobs.get(id) else {
                continue;
            };
            let nodes = self.could_take(&ready, rec, &none);
            if nodes.is_empty() {
                continue;
            }
            let offered = |name: &str, f: Resources| match held {
                Some((n, need)) if n == name => minus(f, need),
                _ => f,
            };
            if nodes
                .iter()
                .any(|(name, _, f)| fits(rec.need, offered(name, *f)))
            {
                return Some(*id);
            }
            if held.is_none() {
                held = node_to_hold(rec.need, &nodes).map(|n| (n, rec.need));
            }
            scanned += 1;
        }
        None
    }

    /// Once the load has stopped and the network healed (`liveness`), the
    /// job first in line (the first queued job some ready node could ever
    /// take) must not wait longer than the longest time-out plus
    /// [`STARVATION_SLACK_MS`]: the node held for it drains. Its clock
    /// starts when it comes first in line, and again when it is placed and
    /// requeued, a job ahead of it is placed (a retry of a higher-priority
    /// job: strict priority) or any node changes. Without the reservation a stream of
    /// smaller jobs behind it takes every core that frees up, for as long
    /// as the queue behind it lasts.
    pub fn starvation(&mut self, now_ms: u64, liveness: bool) -> Check {
        if !liveness {
            self.first_in_line = None;
            return Ok(());
        }
        let none = BTreeMap::new();
        let ready = self.ready_list();
        let first = self.queued.iter().map(|k| k.2).find(|id| {
            self.jobs
                .get(id)
                .is_some_and(|rec| !self.could_take(&ready, rec, &none).is_empty())
        });
        let Some(job) = first else {
            self.first_in_line = None;
            return Ok(());
        };
        let placements = self.jobs.get(&job).map_or(0, |r| r.placed.len());
        let mark = (job, placements, self.node_changes);
        let since = match self.first_in_line {
            Some((j, p, c, since)) if (j, p, c) == mark => since,
            _ => {
                self.first_in_line = Some((job, placements, self.node_changes, now_ms));
                now_ms
            }
        };
        let bound = self.timeout_secs_max * 1000 + STARVATION_SLACK_MS;
        let waited = now_ms.saturating_sub(since);
        if waited > bound {
            let rec = &self.jobs[&job];
            return fail(
                inv::STARVATION,
                format!(
                    "job {job} (needs {:?}, priority {}) has been first in line for {waited} ms since the load stopped, more than {bound} ms",
                    rec.need, rec.priority
                ),
            );
        }
        Ok(())
    }

    /// A replica tick: `idle` when the replica is serving and has nothing
    /// proposed that is not applied yet (so no pass is in flight). A job
    /// owed a placement for more than [`OWED_TICKS_MAX`] idle ticks in a
    /// row means the scheduler skipped a pass it needed.
    pub fn tick(&mut self, idle: bool, scan_jobs_max: usize) -> Check {
        if !idle {
            self.owed_ticks = 0;
            return Ok(());
        }
        let Some(job) = self.owed_placement(scan_jobs_max) else {
            self.owed_ticks = 0;
            return Ok(());
        };
        self.owed_ticks += 1;
        if self.owed_ticks > OWED_TICKS_MAX {
            return fail(
                inv::PROGRESS,
                format!(
                    "job {job} fits a ready node but stayed queued for {} idle ticks",
                    self.owed_ticks
                ),
            );
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

    /// Replaying the durable log gives the live state, both by the reducer
    /// taking entries by reference (`State::apply`) and by the path
    /// production replay takes (`State::apply_owned`).
    pub fn replay(durable: &[Entry], live: &State) -> Check {
        // As production replays: without the scheduler's indexes (the
        // digest leaves them out; `consistency` judges the live ones).
        let mut by_ref = State::for_replay();
        let mut owned = State::for_replay();
        by_ref.bugs = live.bugs;
        owned.bugs = live.bugs;
        for e in durable {
            by_ref.apply(e);
            owned.apply_owned(e.clone());
        }
        for (path, replayed) in [("apply", &by_ref), ("apply_owned", &owned)] {
            if replayed.digest() != live.digest() {
                return fail(
                    inv::REPLAY,
                    format!(
                        "replay ({path}) of {} entries digests {:x}, live {:x}",
                        durable.len(),
                        replayed.digest(),
                        live.digest()
                    ),
                );
            }
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
            Some(Lifecycle::Running | Lifecycle::Leader | Lifecycle::Degraded) => Ok(()),
            other => fail(inv::LIVE_LEADER, format!("replica is {other:?}")),
        }
    }

    /// Some ready node (by the ledger) matches the job's constraints and is
    /// large enough, by what the agents advertised.
    pub fn placeable(&self, job: JobId) -> bool {
        let Some(rec) = self.jobs.get(&job) else {
            return true;
        };
        self.nodes.keys().any(|n| {
            self.ready_node(n).is_some_and(|(cap, labels)| {
                matches(&labels, &rec.constraints) && fits(rec.need, cap)
            })
        })
    }

    /// After healing: every job is terminal, or queued and could never be
    /// placed (no ready node matches its constraints and is large enough).
    pub fn live_jobs(&self, state: &State) -> Check {
        for job in state.jobs.values() {
            if job.state.is_terminal() || job.state == JobState::Queued && !self.placeable(job.id) {
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
    pub fn live_results(state: &State, results: &[LiveResult]) -> Check {
        for (job, attempt, want, usage) in results {
            let want = (*want, *usage);
            let got = state
                .job(*job)
                .and_then(|j| j.attempts.iter().find(|a| a.number == *attempt))
                .map(|a| (a.state, a.usage));
            if got != Some(want) {
                return fail(
                    inv::LIVE_RESULTS,
                    format!("job {job} attempt {attempt}: ran to {want:?}, recorded {got:?}"),
                );
            }
        }
        Ok(())
    }
}
