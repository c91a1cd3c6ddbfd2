//! The pure, total reducer: `State::apply(&Entry)`.
//!
//! Architecture invariant: `apply` never panics and consults nothing but its
//! arguments. An event that is invalid in the current state is a recorded
//! no-op (`Applied::Ignored` with a reason), so any sequence of entries, valid
//! or not, folds to a well-defined state, and replaying the log from index 1
//! gives the live state byte for byte (compared with [`State::digest`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use crate::event::{Entry, Event, LogIndex, ReplicaId, Term};
use crate::model::{
    Attempt, AttemptNumber, AttemptState, Job, JobId, JobSpec, JobState, Labels, Node, NodeState,
    Outcome, Resources, TimestampMs, Usage,
};
use crate::sched_index::SchedIndex;

/// Attempts of one job that may be lost (their node died or restarted)
/// before the job fails instead of running again.
pub const LOST_ATTEMPTS_MAX: usize = 10;

/// Queue order: higher priority first, then submission order (FIFO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    /// `100 - priority`, so that ascending order is highest priority first.
    pub inverse_priority: u8,
    pub seq: u64,
    pub job: JobId,
}

impl QueueKey {
    pub fn of(job: &Job) -> QueueKey {
        QueueKey {
            inverse_priority: 100u8.saturating_sub(job.spec.priority),
            seq: job.seq,
            job: job.id,
        }
    }
}

/// Every job, by id. Ids are dense (the reducer hands them out from 1), so
/// the table is indexed by `id - 1`: one bounds-checked load per lookup
/// instead of a tree walk, which is most of what replay does. Jobs are kept
/// in fixed-size chunks so that growing the table never moves the jobs
/// already in it (a single vector's doubling copied hundreds of MB at once
/// and stalled the driver). The method names follow `BTreeMap` so callers
/// read the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct JobTable {
    chunks: Vec<Vec<Job>>,
    len: usize,
}

/// Jobs per chunk of a [`JobTable`].
pub const JOB_TABLE_CHUNK: usize = 4096;

impl JobTable {
    fn slot(id: &JobId) -> Option<usize> {
        usize::try_from(id.0).ok()?.checked_sub(1)
    }

    pub fn get(&self, id: &JobId) -> Option<&Job> {
        let slot = Self::slot(id)?;
        self.chunks
            .get(slot / JOB_TABLE_CHUNK)?
            .get(slot % JOB_TABLE_CHUNK)
    }

    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut Job> {
        let slot = Self::slot(id)?;
        self.chunks
            .get_mut(slot / JOB_TABLE_CHUNK)?
            .get_mut(slot % JOB_TABLE_CHUNK)
    }

    pub fn contains_key(&self, id: &JobId) -> bool {
        self.get(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The id the next submission will get.
    pub fn next_id(&self) -> JobId {
        JobId(self.len as u64 + 1)
    }

    /// Jobs in id order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Job> + '_ {
        self.chunks.iter().flatten()
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut Job> + '_ {
        self.chunks.iter_mut().flatten()
    }

    /// `(id, job)` pairs in id order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&JobId, &Job)> + '_ {
        self.values().map(|j| (&j.id, j))
    }

    /// `(id, job)` pairs from `range.start` on, in id order.
    pub fn range(
        &self,
        range: std::ops::RangeFrom<JobId>,
    ) -> impl Iterator<Item = (&JobId, &Job)> + '_ {
        let from = Self::slot(&range.start).unwrap_or(0).min(self.len);
        self.chunks[from / JOB_TABLE_CHUNK..]
            .iter()
            .flatten()
            .skip(from % JOB_TABLE_CHUNK)
            .map(|j| (&j.id, j))
    }

    /// Adds the next job; its id must be `next_id()`.
    pub(crate) fn push(&mut self, job: Job) {
        debug_assert_eq!(job.id, self.next_id());
        if self.len.is_multiple_of(JOB_TABLE_CHUNK) {
            self.chunks.push(Vec::with_capacity(JOB_TABLE_CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(job);
            self.len += 1;
        }
    }
}

impl std::ops::Index<&JobId> for JobTable {
    type Output = Job;
    fn index(&self, id: &JobId) -> &Job {
        self.get(id).expect("no job with this id")
    }
}

/// What applying one entry did; the replica turns it into replies and runner
/// commands. Never stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// A new job was created.
    Submitted(JobId),
    /// The idempotency key already named this job; nothing was created.
    Duplicate(JobId),
    /// An attempt was placed; the runner of its node must start it.
    Assigned {
        job: JobId,
        attempt: AttemptNumber,
    },
    /// A job with an active attempt was cancelled; its runner must kill it.
    CancelActive {
        job: JobId,
        attempt: AttemptNumber,
    },
    /// The event was invalid in the current state and changed nothing but
    /// the applied index.
    Ignored(&'static str),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct State {
    pub applied_index: LogIndex,
    pub applied_term: Term,
    /// `at` of the last applied entry.
    pub last_at: TimestampMs,
    pub leader: Option<ReplicaId>,
    pub leader_term: Term,
    pub jobs: JobTable,
    pub idempotency: BTreeMap<String, JobId>,
    /// The keys of `idempotency` by the stamp of the submission that bound
    /// them, oldest first: what the next expiry removes.
    pub key_times: BTreeSet<(TimestampMs, String)>,
    pub nodes: BTreeMap<String, Node>,
    /// Jobs in state `queued`, in placement order. Derived from `jobs`, kept
    /// in step by every transition so the scheduler never scans all jobs.
    pub queue: BTreeSet<QueueKey>,
    /// Active attempts per node, for losing them when the node goes away.
    pub active_by_node: BTreeMap<String, BTreeSet<JobId>>,
    /// Count of jobs per state, indexed like [`JobState::ALL`].
    pub job_counts: [u64; 6],
    /// Entries that were no-ops (invalid in the state they met).
    pub ignored_entries: u64,
    /// The replicas by id, with their addresses, as the last
    /// `MembersChanged` made them (empty: never changed, the replicas are
    /// those the cluster started with), and that entry's index.
    pub members: BTreeMap<crate::event::ReplicaId, String>,
    pub members_index: LogIndex,
    /// Attempts that ended `lost` (their node died, restarted or was removed).
    pub attempts_lost: u64,
    /// SIM-BUGS: the planted bug the simulator selected, if any; ignored by
    /// `==`, `Hash` and so by [`State::digest`], and dead code without the
    /// `sim-bugs` feature.
    pub bugs: crate::bugs::BugSet,
    /// The scheduler's indexes (free capacity per node, ready nodes per
    /// constraint class, parked jobs): caches derived from the fields above,
    /// kept in step by every transition, rebuilt by replay, and ignored by
    /// `==`, `Hash` and so by [`State::digest`]. See [`crate::sched_index`].
    pub sched: SchedIndex,
}

pub(crate) fn state_slot(s: JobState) -> usize {
    match s {
        JobState::Queued => 0,
        JobState::Assigned => 1,
        JobState::Running => 2,
        JobState::Succeeded => 3,
        JobState::Failed => 4,
        JobState::Cancelled => 5,
    }
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// The job's place in the queue. Every queue insert and removal goes
    /// through here, so the order is decided in one place.
    pub fn queue_key(&self, job: &Job) -> QueueKey {
        let mut key = QueueKey::of(job);
        if planted!(self.bugs, QueueLifo) {
            key.seq = u64::MAX - key.seq;
        }
        if planted!(self.bugs, PriorityInverted) {
            key.inverse_priority = job.spec.priority;
        }
        key
    }

    /// Folds entries from scratch: what start-up and `rustci replay` do.
    pub fn replay<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> State {
        let mut state = State::for_replay();
        for entry in entries {
            state.apply(entry);
        }
        state.rebuild_indexes();
        state
    }

    /// An empty state that does not keep the scheduler's indexes while the
    /// log is folded into it (they cost replay about a third of its speed);
    /// [`State::rebuild_indexes`] builds them once at the end.
    pub fn for_replay() -> State {
        State {
            sched: SchedIndex::suspended(),
            ..State::default()
        }
    }

    /// Builds the scheduler's indexes from scratch (and keeps them from
    /// then on): every node, then every queued job in queue order.
    pub fn rebuild_indexes(&mut self) {
        let mut sched = SchedIndex::default();
        for node in self.nodes.values() {
            sched.node_reset(node, &self.bugs);
        }
        for key in &self.queue {
            if let Some(job) = self.jobs.get(&key.job) {
                sched.job_queued(*key, &job.spec.constraints, job.spec.resources, &self.bugs);
            }
        }
        self.sched = sched;
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Why a job failed, when the attempts' states alone do not say it.
    pub fn failure_reason(job: &Job) -> Option<String> {
        if job.state != JobState::Failed {
            return None;
        }
        let last = job.attempts.last()?;
        (last.state == AttemptState::Lost).then(|| {
            format!("lost {LOST_ATTEMPTS_MAX} times (its nodes died or restarted under it); not retried further")
        })
    }

    pub fn job_count(&self, s: JobState) -> u64 {
        self.job_counts[state_slot(s)]
    }

    /// A stable 64-bit digest of the whole state (FNV-1a over its `Hash`),
    /// equal for equal states on every platform and run.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv64::new();
        self.hash(&mut h);
        h.finish()
    }

    /// Applies one committed entry. Total: never panics, whatever the entry.
    pub fn apply(&mut self, entry: &Entry) -> Applied {
        self.applied_index = entry.index;
        self.applied_term = entry.term;
        self.last_at = self.last_at.max(entry.at);
        let applied = self.apply_event(entry);
        if matches!(applied, Applied::Ignored(_)) {
            self.ignored_entries += 1;
        }
        applied
    }

    /// Like [`State::apply`], but takes the entry by value so a submission's
    /// spec moves into the job instead of being copied: what replay uses.
    pub fn apply_owned(&mut self, entry: Entry) -> Applied {
        match entry.event {
            Event::JobSubmitted {
                spec,
                idempotency_key,
            } => {
                self.applied_index = entry.index;
                self.applied_term = entry.term;
                self.last_at = self.last_at.max(entry.at);
                let idempotency_key =
                    idempotency_key.filter(|_| !planted!(self.bugs, OwnedReplayDropsKey));
                let applied = self.submit(entry.index, entry.at, Cow::Owned(spec), idempotency_key);
                if matches!(applied, Applied::Ignored(_)) {
                    self.ignored_entries += 1;
                }
                applied
            }
            _ => self.apply(&entry),
        }
    }

    fn apply_event(&mut self, entry: &Entry) -> Applied {
        let at = entry.at;
        match &entry.event {
            Event::LeaderElected { replica, term } => {
                self.leader = Some(*replica);
                self.leader_term = *term;
                Applied::Done
            }
            Event::JobSubmitted {
                spec,
                idempotency_key,
            } => self.submit(
                entry.index,
                at,
                Cow::Borrowed(spec),
                idempotency_key.clone(),
            ),
            Event::JobCancelled { job } => self.cancel(*job),
            Event::AttemptAssigned { job, attempt, node } => self.assign(*job, *attempt, node, at),
            Event::AttemptStarted { job, attempt } => self.started(*job, *attempt, at),
            Event::AttemptFinished {
                job,
                attempt,
                outcome,
                exit_code,
                usage,
            } => self.finished(*job, *attempt, *outcome, *exit_code, *usage, at),
            Event::AttemptLost { job, attempt } => self.lost(*job, *attempt, at),
            Event::NodeRegistered {
                name,
                capacity,
                labels,
                incarnation,
                predecessor,
            } => self.register(name, *capacity, labels, *incarnation, *predecessor, at),
            Event::NodeDrained { name } => self.node_transition(name, at, NodeTransition::Drain),
            Event::NodeUndrained { name } => {
                self.node_transition(name, at, NodeTransition::Undrain)
            }
            Event::IdempotencyKeysExpired { before } => self.expire_keys(*before),
            Event::MembersChanged { members } => {
                if !crate::event::members_valid(members) {
                    return Applied::Ignored("an impossible set of replicas");
                }
                self.members = members.clone();
                self.members_index = entry.index;
                Applied::Done
            }
            Event::NodeDown { name, incarnation } => {
                if !self.is_incarnation(name, *incarnation) {
                    return Applied::Ignored("down of a replaced incarnation");
                }
                self.node_transition(name, at, NodeTransition::Down)
            }
            Event::NodeUp { name, incarnation } => {
                if !self.is_incarnation(name, *incarnation) {
                    return Applied::Ignored("up of a replaced incarnation");
                }
                self.node_transition(name, at, NodeTransition::Up)
            }
            Event::NodeRemoved { name, reason } => {
                let applied = self.node_transition(name, at, NodeTransition::Remove);
                if applied == Applied::Done {
                    if let Some(node) = self.nodes.get_mut(name) {
                        node.left_reason = Some(reason.clone()).filter(|r| !r.is_empty());
                    }
                }
                applied
            }
        }
    }

    fn submit(
        &mut self,
        index: LogIndex,
        at: TimestampMs,
        spec: Cow<'_, JobSpec>,
        key: Option<String>,
    ) -> Applied {
        if let Some(key) = &key {
            if let Some(existing) = self.idempotency.get(key) {
                return Applied::Duplicate(*existing);
            }
        }
        let id = self.jobs.next_id();
        let job = Job {
            id,
            spec: spec.into_owned(),
            state: JobState::Queued,
            idempotency_key: key.clone(),
            submitted_at: at,
            retries_used: 0,
            attempts: Vec::new(),
            seq: index,
        };
        let queue_key = self.queue_key(&job);
        self.queue.insert(queue_key);
        self.sched.job_queued(
            queue_key,
            &job.spec.constraints,
            job.spec.resources,
            &self.bugs,
        );
        self.job_counts[state_slot(JobState::Queued)] += 1;
        if let Some(key) = key.filter(|_| !planted!(self.bugs, IdempotencyKeyForgotten)) {
            self.key_times.insert((at, key.clone()));
            self.idempotency.insert(key, id);
        }
        self.jobs.push(job);
        Applied::Submitted(id)
    }

    /// Forgets the idempotency keys bound by submissions stamped before
    /// `before`.
    fn expire_keys(&mut self, before: TimestampMs) -> Applied {
        let mut expired = 0usize;
        while let Some((at, _)) = self.key_times.first() {
            if *at >= before {
                break;
            }
            let (_, key) = self.key_times.pop_first().expect("just seen");
            self.idempotency.remove(&key);
            expired += 1;
        }
        if expired == 0 {
            return Applied::Ignored("no idempotency key to expire");
        }
        Applied::Done
    }

    /// Moves a job to `to`, keeping the queue and the counts in step.
    fn set_job_state(&mut self, id: JobId, to: JobState) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let from = job.state;
        if from == to {
            return;
        }
        let key = self.queue_key(job);
        if from == JobState::Queued {
            self.queue.remove(&key);
            self.sched
                .job_unqueued(&key, &job.spec.constraints, job.spec.resources);
        }
        if to == JobState::Queued {
            self.queue.insert(key);
            self.sched
                .job_queued(key, &job.spec.constraints, job.spec.resources, &self.bugs);
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.state = to;
        }
        self.job_counts[state_slot(from)] = self.job_counts[state_slot(from)].saturating_sub(1);
        self.job_counts[state_slot(to)] += 1;
    }

    fn cancel(&mut self, id: JobId) -> Applied {
        let Some(job) = self.jobs.get_mut(&id) else {
            return Applied::Ignored("cancel of an unknown job");
        };
        if job.state.is_terminal() {
            return Applied::Ignored("cancel of a terminal job");
        }
        let active = match job.attempts.last_mut() {
            Some(a) if a.state.is_active() => {
                a.cancel_requested = true;
                Some(a.number)
            }
            _ => None,
        };
        self.set_job_state(id, JobState::Cancelled);
        match active {
            Some(attempt) => Applied::CancelActive { job: id, attempt },
            None => Applied::Done,
        }
    }

    fn assign(
        &mut self,
        id: JobId,
        attempt: AttemptNumber,
        node_name: &str,
        at: TimestampMs,
    ) -> Applied {
        let Some(job) = self.jobs.get(&id) else {
            return Applied::Ignored("assignment of an unknown job");
        };
        if job.state != JobState::Queued {
            return Applied::Ignored("assignment of a job that is not queued");
        }
        if attempt as usize != job.attempts.len() + 1 {
            return Applied::Ignored("assignment with a stale attempt number");
        }
        let Some(node) = self.nodes.get_mut(node_name) else {
            return Applied::Ignored("assignment to an unknown node");
        };
        if !node.accepts_work() {
            return Applied::Ignored("assignment to a node that is not ready");
        }
        if !node.satisfies(&job.spec.constraints) {
            return Applied::Ignored("assignment to a node that violates the constraints");
        }
        if !job.spec.resources.fits_in(&node.free()) {
            return Applied::Ignored("assignment to a node without capacity");
        }
        node.allocated = node.allocated.saturating_add(&job.spec.resources);
        let incarnation = node.incarnation;
        let free = node.free();
        if let Some(slot) = self.sched.slot(node_name) {
            self.sched.set_free(slot, free);
        }
        match self.active_by_node.get_mut(node_name) {
            Some(set) => {
                set.insert(id);
            }
            None => {
                self.active_by_node
                    .insert(node_name.to_string(), BTreeSet::from([id]));
            }
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.attempts.push(Attempt {
                number: attempt,
                node: node_name.to_string(),
                incarnation,
                outcome: None,
                state: AttemptState::Assigned,
                exit_code: None,
                assigned_at: at,
                started_at: None,
                finished_at: None,
                cancel_requested: false,
                usage: None,
            });
        }
        self.set_job_state(id, JobState::Assigned);
        Applied::Assigned { job: id, attempt }
    }

    /// The current attempt of `id` if it is number `attempt` and active:
    /// the fencing check every attempt event passes through.
    fn active_attempt_mut(&mut self, id: JobId, attempt: AttemptNumber) -> Option<&mut Attempt> {
        if planted!(self.bugs, StaleResultApplied) {
            // SIM-BUGS (b): no fencing, any attempt with that number will do.
            return self
                .jobs
                .get_mut(&id)?
                .attempts
                .iter_mut()
                .find(|a| a.number == attempt);
        }
        self.jobs
            .get_mut(&id)?
            .attempts
            .last_mut()
            .filter(|a| a.number == attempt && a.state.is_active())
    }

    fn started(&mut self, id: JobId, attempt: AttemptNumber, at: TimestampMs) -> Applied {
        let Some(a) = self.active_attempt_mut(id, attempt) else {
            return Applied::Ignored("start of a stale or inactive attempt");
        };
        if a.state != AttemptState::Assigned {
            return Applied::Ignored("start of an attempt that already started");
        }
        a.state = AttemptState::Running;
        a.started_at = Some(at);
        if self.jobs.get(&id).map(|j| j.state) == Some(JobState::Assigned) {
            self.set_job_state(id, JobState::Running);
        }
        Applied::Done
    }

    fn finished(
        &mut self,
        id: JobId,
        attempt: AttemptNumber,
        outcome: Outcome,
        exit_code: Option<i32>,
        usage: Option<Usage>,
        at: TimestampMs,
    ) -> Applied {
        let Some(a) = self.active_attempt_mut(id, attempt) else {
            return Applied::Ignored("result of a stale or inactive attempt");
        };
        let cancel_requested = a.cancel_requested;
        let attempt_state = match outcome {
            Outcome::Exited if exit_code == Some(0) => AttemptState::Succeeded,
            Outcome::Exited | Outcome::StartFailed | Outcome::Oom => AttemptState::Failed,
            Outcome::TimedOut => AttemptState::TimedOut,
            Outcome::Cancelled if cancel_requested => AttemptState::Cancelled,
            // The runner stopped it without being asked to (its agent shut
            // down): the attempt is lost, not the job's fault.
            Outcome::Cancelled => AttemptState::Lost,
        };
        a.state = attempt_state;
        a.exit_code = exit_code;
        a.outcome = Some(outcome);
        a.usage = usage;
        a.finished_at = Some(at);
        if a.started_at.is_none() && outcome != Outcome::StartFailed {
            a.started_at = Some(at);
        }
        let node = a.node.clone();
        if attempt_state == AttemptState::Lost {
            self.attempts_lost += 1;
        }
        self.release(id, &node);
        self.settle_job(id, attempt_state);
        Applied::Done
    }

    fn lost(&mut self, id: JobId, attempt: AttemptNumber, at: TimestampMs) -> Applied {
        let Some(a) = self.active_attempt_mut(id, attempt) else {
            return Applied::Ignored("loss of a stale or inactive attempt");
        };
        a.state = AttemptState::Lost;
        a.finished_at = Some(at);
        let node = a.node.clone();
        self.attempts_lost += 1;
        self.release(id, &node);
        self.settle_job(id, AttemptState::Lost);
        Applied::Done
    }

    /// Frees the node's share of an attempt that just ended.
    fn release(&mut self, id: JobId, node_name: &str) {
        let Some(resources) = self.jobs.get(&id).map(|j| j.spec.resources) else {
            return;
        };
        if let Some(node) = self.nodes.get_mut(node_name) {
            node.allocated = node.allocated.saturating_sub(&resources);
            if let Some(slot) = self.sched.slot(node_name) {
                self.sched.set_free(slot, node.free());
            }
        }
        if let Some(set) = self.active_by_node.get_mut(node_name) {
            set.remove(&id);
            if set.is_empty() {
                self.active_by_node.remove(node_name);
            }
        }
    }

    /// Decides the job's state after its current attempt ended as `ended`.
    fn settle_job(&mut self, id: JobId, ended: AttemptState) {
        let bugs = self.bugs;
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal()
            && !(planted!(bugs, LostRequeuesCancelled) && ended == AttemptState::Lost)
        {
            // Cancelled while running: the job stays cancelled.
            return;
        }
        let budget = if planted!(bugs, RetryOneTooMany) {
            job.spec.max_retries.saturating_add(1)
        } else if planted!(bugs, RetryOneTooFew) {
            job.spec.max_retries.saturating_sub(1)
        } else {
            job.spec.max_retries
        };
        let next = match ended {
            AttemptState::Succeeded => JobState::Succeeded,
            AttemptState::Lost if planted!(bugs, LostSpendsRetry) => {
                job.retries_used += 1;
                if job.retries_used <= job.spec.max_retries {
                    JobState::Queued
                } else {
                    JobState::Failed
                }
            }
            // A job whose nodes keep dying under it is not retried for
            // ever: it fails, and says why (`State::failure_reason`).
            AttemptState::Lost
                if job
                    .attempts
                    .iter()
                    .filter(|a| a.state == AttemptState::Lost)
                    .count()
                    >= LOST_ATTEMPTS_MAX =>
            {
                JobState::Failed
            }
            AttemptState::Lost => JobState::Queued,
            AttemptState::Failed | AttemptState::TimedOut => {
                if job.retries_used < budget {
                    job.retries_used += 1;
                    JobState::Queued
                } else {
                    JobState::Failed
                }
            }
            AttemptState::Cancelled => JobState::Cancelled,
            AttemptState::Assigned | AttemptState::Running => return,
        };
        self.set_job_state(id, next);
    }

    fn register(
        &mut self,
        name: &str,
        capacity: Resources,
        labels: &Labels,
        incarnation: u64,
        predecessor: Option<u64>,
        at: TimestampMs,
    ) -> Applied {
        let restarted = match self.nodes.get_mut(name) {
            Some(node) => {
                // Lost at once only when the new incarnation vouches that the
                // old one's work is dead; otherwise the leader loses it once
                // the old incarnation's lease has provably lapsed.
                let restarted =
                    node.incarnation != incarnation && predecessor == Some(node.incarnation);
                node.capacity = capacity;
                node.labels = labels.clone();
                node.incarnation = incarnation;
                if matches!(node.state, NodeState::Down | NodeState::Left) {
                    node.state = NodeState::Ready;
                    node.left_reason = None;
                }
                restarted
            }
            None => {
                self.nodes.insert(
                    name.to_string(),
                    Node {
                        name: name.to_string(),
                        state: NodeState::Ready,
                        capacity,
                        labels: labels.clone(),
                        allocated: Resources::default(),
                        incarnation,
                        left_reason: None,
                    },
                );
                false
            }
        };
        if let Some(node) = self.nodes.get(name) {
            self.sched.node_reset(node, &self.bugs);
        }
        if restarted {
            // Whatever ran under the old incarnation died with it.
            self.lose_all_on(name, at);
        }
        Applied::Done
    }

    fn lose_all_on(&mut self, node_name: &str, at: TimestampMs) {
        let ids: Vec<JobId> = self
            .active_by_node
            .get(node_name)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for id in ids {
            let number = self
                .jobs
                .get(&id)
                .and_then(|j| j.active_attempt())
                .map(|a| a.number);
            if let Some(number) = number {
                self.lost(id, number, at);
            }
        }
    }

    fn node_transition(&mut self, name: &str, at: TimestampMs, t: NodeTransition) -> Applied {
        let Some(node) = self.nodes.get_mut(name) else {
            return Applied::Ignored("transition of an unknown node");
        };
        let (allowed, to) = match t {
            NodeTransition::Drain if planted!(self.bugs, DrainIgnored) => {
                (node.state == NodeState::Ready, NodeState::Ready)
            }
            NodeTransition::Drain => (node.state == NodeState::Ready, NodeState::Draining),
            NodeTransition::Undrain => (node.state == NodeState::Draining, NodeState::Ready),
            NodeTransition::Down => (
                matches!(node.state, NodeState::Ready | NodeState::Draining),
                NodeState::Down,
            ),
            NodeTransition::Up => (node.state == NodeState::Down, NodeState::Ready),
            NodeTransition::Remove => (node.state != NodeState::Left, NodeState::Left),
        };
        if !allowed {
            return Applied::Ignored("node transition not allowed from its state");
        }
        node.state = to;
        self.sched.node_reset(node, &self.bugs);
        // A down or removed node's attempts stay active: its agent may still
        // run them until its lease lapses. The leader loses them after that
        // (`AttemptLost`), and only then are they placed elsewhere.
        let _ = at;
        Applied::Done
    }

    /// `incarnation` names the node's current incarnation (0: any).
    fn is_incarnation(&self, name: &str, incarnation: u64) -> bool {
        incarnation == 0
            || self
                .nodes
                .get(name)
                .is_some_and(|n| n.incarnation == incarnation)
    }
}

impl State {
    /// Checks the relations between the state's parts that every transition
    /// must keep (derived indexes agree with the jobs, allocations add up).
    /// Used by tests and by the simulator after every step.
    pub fn check_consistency(&self) -> Result<(), String> {
        if self.key_times.len() != self.idempotency.len() {
            return Err(format!(
                "{} idempotency keys but {} key times",
                self.idempotency.len(),
                self.key_times.len()
            ));
        }
        for (at, key) in &self.key_times {
            let bound = self.idempotency.get(key).and_then(|id| self.jobs.get(id));
            if bound.is_none_or(|job| job.submitted_at != *at) {
                return Err(format!(
                    "idempotency key {key:?} at {at} names no job submitted then"
                ));
            }
        }
        let mut counts = [0u64; 6];
        let mut allocated: BTreeMap<&str, Resources> = BTreeMap::new();
        let mut active: BTreeMap<&str, BTreeSet<JobId>> = BTreeMap::new();
        for (id, job) in self.jobs.iter() {
            counts[state_slot(job.state)] += 1;
            let queued = self.queue.contains(&self.queue_key(job));
            if queued != (job.state == JobState::Queued) {
                return Err(format!(
                    "job {id}: in queue {queued} but state {:?}",
                    job.state
                ));
            }
            for (i, a) in job.attempts.iter().enumerate() {
                if a.number as usize != i + 1 {
                    return Err(format!("job {id}: attempt {} at position {i}", a.number));
                }
                if a.state.is_active() && i + 1 != job.attempts.len() {
                    return Err(format!(
                        "job {id}: active attempt {} is not the last",
                        a.number
                    ));
                }
            }
            let live = job.active_attempt();
            let expect_live = matches!(job.state, JobState::Assigned | JobState::Running);
            if expect_live && live.is_none() {
                return Err(format!(
                    "job {id}: {:?} without an active attempt",
                    job.state
                ));
            }
            if matches!(
                job.state,
                JobState::Queued | JobState::Succeeded | JobState::Failed
            ) && live.is_some()
            {
                return Err(format!("job {id}: {:?} with an active attempt", job.state));
            }
            if let Some(a) = live {
                let slot = allocated.entry(a.node.as_str()).or_default();
                *slot = slot.saturating_add(&job.spec.resources);
                active.entry(a.node.as_str()).or_default().insert(*id);
            }
        }
        if counts != self.job_counts {
            return Err(format!(
                "job counts {:?} != recount {counts:?}",
                self.job_counts
            ));
        }
        for (name, node) in &self.nodes {
            let want = allocated.get(name.as_str()).copied().unwrap_or_default();
            if node.allocated != want {
                return Err(format!(
                    "node {name}: allocated {:?} != active {want:?}",
                    node.allocated
                ));
            }
        }
        let by_node: BTreeMap<&str, BTreeSet<JobId>> = self
            .active_by_node
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if by_node != active {
            return Err("active_by_node disagrees with the jobs' active attempts".to_string());
        }
        self.check_indexes()
    }

    /// Compares the scheduler's indexes with a computation from scratch.
    pub fn check_indexes(&self) -> Result<(), String> {
        let queued = self.queue.iter().filter_map(|key| {
            let job = self.jobs.get(&key.job)?;
            Some((*key, &job.spec.constraints, job.spec.resources))
        });
        self.sched
            .check(&self.nodes, queued, &self.bugs)
            .map_err(|e| format!("scheduler index: {e}"))
    }
}

#[derive(Clone, Copy)]
enum NodeTransition {
    Drain,
    Undrain,
    Down,
    Up,
    Remove,
}

/// FNV-1a, 64 bit: a hasher with no random keys, so digests are stable
/// across processes (std's `DefaultHasher` makes no such promise).
pub struct Fnv64(u64);

impl Fnv64 {
    pub fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64::new()
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
