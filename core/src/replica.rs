//! The replica: the sans-IO state machine a control-plane process runs.
//!
//! It owns the reduced [`State`], decides what to propose (user commands,
//! runner reports, scheduler placements), and turns committed entries into
//! replies and runner commands. It performs no IO and reads no clock.
//!
//! # Driver contract
//!
//! Inputs, each taking `now` (milliseconds on the driver's clock):
//! [`Replica::start`], [`Replica::propose`], [`Replica::handle_runner_report`],
//! [`Replica::handle_persisted`], [`Replica::handle_tick`].
//!
//! Outputs come from [`Replica::poll_output`], in order. A driver MUST:
//! 1. make every entry of an [`Output::Persist`] durable (fsync) *before*
//!    calling [`Replica::handle_persisted`] with an index at or past it;
//! 2. act on outputs in the order they are returned: a `Reply` is only ever
//!    returned after the entry it acknowledges was reported persisted, so
//!    sending it at once keeps "acknowledged means durable";
//! 3. deliver every [`Output::Runner`] command to the runner of its node; a
//!    command may be lost (the node is gone) and the replica tolerates that.
//!
//! Today a replica commits an entry as soon as its own disk has it (a
//! single-replica cluster). Raft will sit between `propose` and commit,
//! behind the same inputs and outputs, so the drivers do not change.

use std::collections::VecDeque;

use crate::event::{Entry, Event, LogIndex, ReplicaId, Term};
use crate::model::{
    AttemptNumber, Job, JobId, JobSpec, Labels, Node, Outcome, Resources, TimestampMs,
};
use crate::scheduler;
use crate::state::{Applied, QueueKey, State};
use crate::validate::{self, ValidationError};

/// Proposals waiting for commit, beyond which new commands are refused
/// with [`CommandError::Overloaded`] (back-pressure instead of memory growth).
pub const PROPOSALS_INFLIGHT_MAX: usize = 1 << 16;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: ReplicaId,
    pub proposals_inflight_max: usize,
    /// The bounds of one scheduling pass. Production keeps the defaults; the
    /// simulator draws small ones per seed so truncated passes happen.
    pub pass_bounds: scheduler::PassBounds,
    /// SIM-BUGS: the planted bug selected by the simulator (none by
    /// default; dead code without the `sim-bugs` feature).
    /// [`Replica::recover`] copies it into the state for the reducer and
    /// the scheduler.
    pub bugs: crate::bugs::BugSet,
}

impl Config {
    pub fn new(id: ReplicaId) -> Config {
        Config {
            id,
            proposals_inflight_max: PROPOSALS_INFLIGHT_MAX,
            pass_bounds: scheduler::PassBounds::default(),
            bugs: crate::bugs::BugSet::default(),
        }
    }
}

/// The control-plane lifecycle, as shown by `GET /v1/cluster`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Initializing,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Initializing => "initializing",
            Lifecycle::Starting => "starting",
            Lifecycle::Running => "running",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Stopped => "stopped",
            Lifecycle::Failed => "failed",
        }
    }
}

/// Driver-chosen token that pairs a command with its reply.
pub type RequestId = u64;

/// A user or operator command. Validated by [`Replica::propose`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Submit {
        spec: JobSpec,
        idempotency_key: Option<String>,
    },
    Cancel {
        job: JobId,
    },
    DrainNode {
        name: String,
    },
    UndrainNode {
        name: String,
    },
    RemoveNode {
        name: String,
    },
    RegisterNode {
        name: String,
        capacity: Resources,
        labels: Labels,
        incarnation: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Job(Job),
    Node(Node),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<ReplicaId> },
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("the control plane is stopping")]
    Stopping,
}

/// What a node's runner must do. `incarnation` is the node incarnation the
/// attempt was placed on: a command is only ever for that incarnation, and
/// a restarted runner must not act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerCommand {
    Start {
        node: String,
        incarnation: u64,
        job: JobId,
        attempt: AttemptNumber,
        spec: JobSpec,
    },
    Kill {
        node: String,
        incarnation: u64,
        job: JobId,
        attempt: AttemptNumber,
    },
}

/// What a node's runner observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerReport {
    Started {
        job: JobId,
        attempt: AttemptNumber,
    },
    Finished {
        job: JobId,
        attempt: AttemptNumber,
        outcome: Outcome,
        exit_code: Option<i32>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Entries to make durable, in index order. See the driver contract.
    Persist(Vec<Entry>),
    /// The answer to a command, sent only once its entry is durable.
    Reply {
        request: RequestId,
        result: Result<Reply, CommandError>,
    },
    Runner(RunnerCommand),
}

/// Why an entry was proposed: decides what happens when it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Command(RequestId),
    Placement,
    Internal,
}

pub struct Replica {
    config: Config,
    state: State,
    lifecycle: Lifecycle,
    term: Term,
    /// Index of the last entry proposed (appended to the local log).
    last_index: LogIndex,
    /// Highest index the driver reported durable.
    persisted_index: LogIndex,
    commit_index: LogIndex,
    /// `at` of the last proposed entry: stamps never decrease along the log.
    last_at: TimestampMs,
    /// Proposed, not yet applied, in index order.
    unapplied: VecDeque<(Entry, Origin)>,
    /// Proposed, not yet handed to the driver for persistence.
    to_persist: Vec<Entry>,
    outputs: VecDeque<Output>,
    /// Placements proposed and not yet applied; the scheduler waits for them
    /// so that it never places from a state that misses its own decisions.
    placements_inflight: usize,
    /// Jobs submitted since the last scheduling pass, in log order.
    new_jobs: Vec<JobId>,
    /// Something other than a submission (freed capacity, a node change, a
    /// requeue, a pass cut short by its bounds) calls for a full pass.
    full_pass_needed: bool,
}

impl Replica {
    /// Builds a replica from the state replayed out of its durable log.
    /// `last_index`/`last_term` describe that log; all of it is committed.
    pub fn recover(config: Config, state: State, last_index: LogIndex, last_term: Term) -> Replica {
        debug_assert_eq!(state.applied_index, last_index);
        let state = State {
            bugs: config.bugs,
            ..state
        };
        Replica {
            config,
            lifecycle: Lifecycle::Initializing,
            term: last_term,
            last_index,
            persisted_index: last_index,
            commit_index: last_index,
            last_at: state.last_at,
            state,
            unapplied: VecDeque::new(),
            to_persist: Vec::new(),
            outputs: VecDeque::new(),
            placements_inflight: 0,
            new_jobs: Vec::new(),
            full_pass_needed: true,
        }
    }

    // --- getters ---

    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn id(&self) -> ReplicaId {
        self.config.id
    }
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn commit_index(&self) -> LogIndex {
        self.commit_index
    }
    pub fn applied_index(&self) -> LogIndex {
        self.state.applied_index
    }
    pub fn last_index(&self) -> LogIndex {
        self.last_index
    }
    /// The leader as far as this replica knows.
    pub fn leader(&self) -> Option<ReplicaId> {
        match self.lifecycle {
            Lifecycle::Starting | Lifecycle::Running => Some(self.config.id),
            _ => None,
        }
    }
    /// True when writes can be served.
    pub fn is_ready(&self) -> bool {
        self.lifecycle == Lifecycle::Running
    }

    // --- inputs ---

    /// Starts serving: a single replica elects itself for the next term.
    pub fn start(&mut self, now: TimestampMs) {
        if self.lifecycle != Lifecycle::Initializing {
            return;
        }
        self.lifecycle = Lifecycle::Starting;
        self.term += 1;
        let event = Event::LeaderElected {
            replica: self.config.id,
            term: self.term,
        };
        self.append(now, event, Origin::Internal);
    }

    /// Stops accepting commands; entries already proposed still commit.
    pub fn stop(&mut self) {
        self.lifecycle = Lifecycle::Stopping;
    }

    /// Marks the replica failed (the driver hit an unrecoverable IO error).
    pub fn fail(&mut self) {
        self.lifecycle = Lifecycle::Failed;
    }

    /// Validates a command and proposes its entry; the reply comes later
    /// through [`Output::Reply`], or at once for a no-op or an error.
    pub fn propose(&mut self, now: TimestampMs, request: RequestId, command: Command) {
        match self.check(&command) {
            Err(e) => self.reply(request, Err(e)),
            Ok(Some(done)) => self.reply(request, Ok(done)),
            Ok(None) if planted!(self.config.bugs, AckBeforeDurable) => {
                self.ack_early(now, request, command)
            }
            Ok(None) => {
                let event = command_event(command);
                self.append(now, event, Origin::Command(request));
            }
        }
    }

    /// SIM-BUGS (c): answers a submission at once with the job the reducer
    /// is expected to create, before its entry is durable.
    fn ack_early(&mut self, now: TimestampMs, request: RequestId, command: Command) {
        let Command::Submit {
            spec,
            idempotency_key,
        } = command
        else {
            let event = command_event(command);
            self.append(now, event, Origin::Command(request));
            return;
        };
        let pending = self
            .unapplied
            .iter()
            .filter(|(e, _)| matches!(e.event, Event::JobSubmitted { .. }))
            .count() as u64;
        let job = Job {
            id: JobId(self.state.jobs.next_id().0 + pending),
            spec: spec.clone(),
            state: crate::model::JobState::Queued,
            idempotency_key: idempotency_key.clone(),
            submitted_at: now,
            retries_used: 0,
            attempts: Vec::new(),
            seq: self.last_index + 1,
        };
        self.reply(request, Ok(Reply::Job(job)));
        let event = Event::JobSubmitted {
            spec,
            idempotency_key,
        };
        self.append(now, event, Origin::Internal);
    }

    /// Validates a command against the limits and the current state.
    /// `Ok(Some(reply))` means it is a no-op answered at once.
    fn check(&self, command: &Command) -> Result<Option<Reply>, CommandError> {
        match self.lifecycle {
            Lifecycle::Starting | Lifecycle::Running => {}
            Lifecycle::Stopping | Lifecycle::Stopped => return Err(CommandError::Stopping),
            _ => return Err(CommandError::NotLeader { leader: None }),
        }
        if self.unapplied.len() >= self.config.proposals_inflight_max {
            return Err(CommandError::Overloaded);
        }
        match command {
            Command::Submit {
                spec,
                idempotency_key,
            } => {
                validate::validate_spec(spec)?;
                if let Some(key) = idempotency_key {
                    validate::validate_idempotency_key(key)?;
                    if let Some(id) = self.state.idempotency.get(key) {
                        return Ok(Some(Reply::Job(self.state.jobs[id].clone())));
                    }
                }
                Ok(None)
            }
            Command::Cancel { job } => {
                let found = self.state.job(*job).ok_or_else(|| CommandError::NotFound {
                    kind: "job",
                    name: job.to_string(),
                })?;
                if found.state.is_terminal() {
                    return Ok(Some(Reply::Job(found.clone())));
                }
                Ok(None)
            }
            Command::DrainNode { name }
            | Command::UndrainNode { name }
            | Command::RemoveNode { name } => {
                self.state
                    .nodes
                    .get(name)
                    .ok_or_else(|| CommandError::NotFound {
                        kind: "node",
                        name: name.clone(),
                    })?;
                Ok(None)
            }
            Command::RegisterNode {
                name,
                capacity,
                labels,
                ..
            } => {
                validate::validate_node_name(name)?;
                validate::validate_resources(capacity)?;
                validate::validate_labels(labels, "labels")?;
                Ok(None)
            }
        }
    }

    /// A runner's observation of one of its attempts. Reports about attempts
    /// that are no longer current are dropped here and, should one slip
    /// through, fenced by the reducer.
    pub fn handle_runner_report(&mut self, now: TimestampMs, report: RunnerReport) {
        let (job, attempt) = match &report {
            RunnerReport::Started { job, attempt }
            | RunnerReport::Finished { job, attempt, .. } => (*job, *attempt),
        };
        let current = self
            .state
            .job(job)
            .and_then(Job::active_attempt)
            .is_some_and(|a| a.number == attempt);
        // SIM-BUGS (b): the planted bug also drops this first line of fencing.
        let current = current || planted!(self.config.bugs, StaleResultApplied);
        if !current || !matches!(self.lifecycle, Lifecycle::Starting | Lifecycle::Running) {
            return;
        }
        let event = match report {
            RunnerReport::Started { job, attempt } => Event::AttemptStarted { job, attempt },
            RunnerReport::Finished {
                job,
                attempt,
                outcome,
                exit_code,
            } => Event::AttemptFinished {
                job,
                attempt,
                outcome,
                exit_code,
            },
        };
        self.append(now, event, Origin::Internal);
    }

    /// The driver made the log durable up to `index`.
    pub fn handle_persisted(&mut self, now: TimestampMs, index: LogIndex) {
        debug_assert!(index <= self.last_index, "persisted past the last proposal");
        self.persisted_index = self.persisted_index.max(index.min(self.last_index));
        // Single replica: durable on the local disk means committed.
        self.commit_index = self.persisted_index;
        self.apply_committed();
        self.maybe_schedule(now);
    }

    /// Periodic work; call every [`TICK_MS`] or so.
    pub fn handle_tick(&mut self, now: TimestampMs) {
        self.maybe_schedule(now);
    }

    // --- outputs ---

    /// The next thing the driver must do. Pending entries to persist come out
    /// as one batch, ahead of later outputs (group commit falls out of this).
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(out) = self.outputs.pop_front() {
            return Some(out);
        }
        if !self.to_persist.is_empty() {
            return Some(Output::Persist(std::mem::take(&mut self.to_persist)));
        }
        None
    }

    // --- internals ---

    fn append(&mut self, now: TimestampMs, event: Event, origin: Origin) {
        self.last_at = if planted!(self.config.bugs, StampFollowsClock) {
            now
        } else {
            self.last_at.max(now)
        };
        self.last_index += 1;
        let entry = Entry {
            index: self.last_index,
            term: self.term,
            at: self.last_at,
            event,
        };
        self.to_persist.push(entry.clone());
        self.unapplied.push_back((entry, origin));
    }

    fn reply(&mut self, request: RequestId, result: Result<Reply, CommandError>) {
        self.outputs.push_back(Output::Reply { request, result });
    }

    fn apply_committed(&mut self) {
        while self
            .unapplied
            .front()
            .is_some_and(|(e, _)| e.index <= self.commit_index)
        {
            let (entry, origin) = self.unapplied.pop_front().expect("front exists");
            let applied = self.state.apply(&entry);
            self.after_apply(&entry, origin, applied);
        }
    }

    fn after_apply(&mut self, entry: &Entry, origin: Origin, applied: Applied) {
        if let Event::LeaderElected { replica, .. } = entry.event {
            if replica == self.config.id && self.lifecycle == Lifecycle::Starting {
                self.lifecycle = Lifecycle::Running;
            }
        }
        if origin == Origin::Placement {
            self.placements_inflight -= 1;
        }
        match (&entry.event, &applied) {
            // A placement the reducer refused (its node was drained, removed
            // or filled between the pass and the apply) leaves its job queued
            // with no pass to revisit it: found by `rustci sim`, seed 61.
            (_, Applied::Ignored(_)) if origin == Origin::Placement => self.full_pass_needed = true,
            (_, Applied::Ignored(_) | Applied::Duplicate(_)) => {}
            (_, Applied::Submitted(id)) => self.new_jobs.push(*id),
            (
                Event::AttemptStarted { .. }
                | Event::LeaderElected { .. }
                | Event::AttemptAssigned { .. }
                | Event::NodeDrained { .. }
                | Event::JobCancelled { .. },
                _,
            ) => {}
            (Event::NodeRegistered { .. }, _) if planted!(self.config.bugs, RejoinNeedsNoPass) => {}
            _ => self.full_pass_needed = true,
        }
        match &applied {
            Applied::Assigned { job, attempt } => {
                if let Some((spec, node, incarnation)) = self.attempt_node(*job) {
                    let spec = spec.clone();
                    self.outputs.push_back(Output::Runner(RunnerCommand::Start {
                        node,
                        incarnation,
                        job: *job,
                        attempt: *attempt,
                        spec,
                    }));
                }
            }
            Applied::CancelActive { job, attempt } => {
                if let Some((_, node, incarnation)) = self.attempt_node(*job) {
                    self.outputs.push_back(Output::Runner(RunnerCommand::Kill {
                        node,
                        incarnation,
                        job: *job,
                        attempt: *attempt,
                    }));
                }
            }
            _ => {}
        }
        if let Origin::Command(request) = origin {
            let reply = self.reply_for(entry, &applied);
            self.reply(request, reply);
        }
    }

    /// The spec of a job and the node (and its incarnation) of its latest
    /// attempt.
    fn attempt_node(&self, job: JobId) -> Option<(&JobSpec, String, u64)> {
        let job = self.state.job(job)?;
        let attempt = job.attempts.last()?;
        Some((&job.spec, attempt.node.clone(), attempt.incarnation))
    }

    fn reply_for(&self, entry: &Entry, applied: &Applied) -> Result<Reply, CommandError> {
        let job_reply = |id: &JobId| {
            self.state
                .job(*id)
                .cloned()
                .map(Reply::Job)
                .ok_or_else(|| CommandError::NotFound {
                    kind: "job",
                    name: id.to_string(),
                })
        };
        let node_reply = |name: &String| {
            self.state
                .nodes
                .get(name)
                .cloned()
                .map(Reply::Node)
                .ok_or_else(|| CommandError::NotFound {
                    kind: "node",
                    name: name.clone(),
                })
        };
        match (&entry.event, applied) {
            (_, Applied::Submitted(id) | Applied::Duplicate(id)) => job_reply(id),
            (Event::JobCancelled { job }, _) => job_reply(job),
            (
                Event::NodeDrained { name }
                | Event::NodeUndrained { name }
                | Event::NodeRemoved { name }
                | Event::NodeRegistered { name, .. },
                _,
            ) => node_reply(name),
            _ => Err(CommandError::NotFound {
                kind: "entry",
                name: entry.index.to_string(),
            }),
        }
    }

    fn maybe_schedule(&mut self, now: TimestampMs) {
        if self.placements_inflight > 0 || self.lifecycle != Lifecycle::Running {
            return;
        }
        if !self.full_pass_needed && self.new_jobs.is_empty() {
            return;
        }
        let bounds = self.config.pass_bounds;
        let pass = if self.full_pass_needed {
            scheduler::schedule_pass(&self.state, None, bounds)
        } else {
            let mut keys: Vec<QueueKey> = self
                .new_jobs
                .iter()
                .filter_map(|id| self.state.job(*id).map(|j| self.state.queue_key(j)))
                .collect();
            keys.sort_unstable();
            scheduler::schedule_pass(&self.state, Some(&keys), bounds)
        };
        self.new_jobs.clear();
        self.full_pass_needed =
            pass.truncated && !planted!(self.config.bugs, TruncatedPassForgotten);
        for p in pass.placements {
            let event = Event::AttemptAssigned {
                job: p.job,
                attempt: p.attempt,
                node: p.node,
            };
            self.placements_inflight += 1;
            self.append(now, event, Origin::Placement);
        }
    }
}

/// How often a driver should call [`Replica::handle_tick`].
pub const TICK_MS: u64 = 100;

fn command_event(command: Command) -> Event {
    match command {
        Command::Submit {
            spec,
            idempotency_key,
        } => Event::JobSubmitted {
            spec,
            idempotency_key,
        },
        Command::Cancel { job } => Event::JobCancelled { job },
        Command::DrainNode { name } => Event::NodeDrained { name },
        Command::UndrainNode { name } => Event::NodeUndrained { name },
        Command::RemoveNode { name } => Event::NodeRemoved { name },
        Command::RegisterNode {
            name,
            capacity,
            labels,
            incarnation,
        } => Event::NodeRegistered {
            name,
            capacity,
            labels,
            incarnation,
        },
    }
}
