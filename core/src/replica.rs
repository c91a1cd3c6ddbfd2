//! The replica: the sans-IO state machine a control-plane process runs.
//!
//! It owns the reduced [`State`], decides what to propose (user commands,
//! runner reports, scheduler placements), and turns committed entries into
//! replies and runner commands. It performs no IO and reads no clock.
//!
//! # Driver contract
//!
//! Inputs, each taking `now` (wall-clock milliseconds: they only stamp
//! entries) and, where timers matter, `mono` (milliseconds on a monotonic
//! clock: failure detection and leases never read the wall clock):
//! [`Replica::start`], [`Replica::propose`], [`Replica::handle_agent`],
//! [`Replica::handle_persisted`], [`Replica::handle_tick`].
//!
//! Outputs come from [`Replica::poll_output`], in order. A driver MUST:
//! 1. make every entry of an [`Output::Persist`] durable (fsync) *before*
//!    calling [`Replica::handle_persisted`] with an index at or past it;
//! 2. act on outputs in the order they are returned: a `Reply` is only ever
//!    returned after the entry it acknowledges was reported persisted, so
//!    sending it at once keeps "acknowledged means durable";
//! 3. deliver every [`Output::ToAgent`] message to the agent of its node,
//!    and only to the incarnation it names; a message may be lost (the node
//!    is gone, the network dropped it) and the replica tolerates that: every
//!    lease renewal carries the node's committed view, and agents reconcile.
//!
//! Today a replica commits an entry as soon as its own disk has it (a
//! single-replica cluster). Raft will sit between `propose` and commit,
//! behind the same inputs and outputs, so the drivers do not change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::event::{Entry, Event, LogIndex, ReplicaId, Term};
use crate::model::{
    AttemptNumber, AttemptState, Job, JobId, JobSpec, Labels, Node, NodeState, Resources,
    TimestampMs,
};
use crate::protocol::{AgentMsg, Assignment, LeaseConfig, NodeAd, Report, ReportKind, ServerMsg};
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
    /// Heartbeat, lease and failure-detection timings.
    pub lease: LeaseConfig,
    /// How long an idempotency key names its job: a submission with a key
    /// bound longer ago than this creates a new job. The leader records the
    /// expiry in the log (`IdempotencyKeysExpired`).
    pub idempotency_window_ms: u64,
    /// SIM-BUGS: the planted bug selected by the simulator (none by
    /// default; dead code without the `sim-bugs` feature).
    /// [`Replica::recover`] copies it into the state for the reducer and
    /// the scheduler.
    pub bugs: crate::bugs::BugSet,
}

/// Default of [`Config::idempotency_window_ms`]: 24 hours.
pub const IDEMPOTENCY_WINDOW_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;

impl Config {
    pub fn new(id: ReplicaId) -> Config {
        Config {
            id,
            proposals_inflight_max: PROPOSALS_INFLIGHT_MAX,
            pass_bounds: scheduler::PassBounds::default(),
            lease: LeaseConfig::default(),
            idempotency_window_ms: IDEMPOTENCY_WINDOW_MS_DEFAULT,
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
        /// Why (shown with the node); may be empty.
        reason: String,
    },
    RegisterNode {
        name: String,
        capacity: Resources,
        labels: Labels,
        incarnation: u64,
        /// See `Event::NodeRegistered::predecessor`.
        predecessor: Option<u64>,
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
    #[error("the event log cannot grow: its disk is full; retry once space is freed")]
    StorageFull,
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
    /// A message for the agent of `node`, incarnation `incarnation` only.
    ToAgent {
        node: String,
        incarnation: u64,
        msg: ServerMsg,
    },
}

/// Why an entry was proposed: decides what happens when it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Command(RequestId),
    Placement,
    /// An agent's report: acknowledged to that incarnation once applied.
    Report {
        node: String,
        incarnation: u64,
    },
    /// An agent's first heartbeat of an incarnation.
    Registration,
    /// The leader's own decisions (failure detection, lease expiry).
    Internal,
}

/// What the leader knows of a node's agent: soft state, never logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Liveness {
    incarnation: u64,
    /// Last heartbeat from this incarnation (monotonic clock).
    heard_mono: u64,
    /// Last lease granted to it, or the moment a grant may have been made
    /// (monotonic clock): the node's attempts are requeued only
    /// `requeue_after_ms` after this.
    leased_mono: u64,
    /// The last lease any incarnation this one replaced may hold: their
    /// attempts (still active unless the new one vouched for them) are
    /// requeued only `requeue_after_ms` after it.
    replaced_leased_mono: Option<u64>,
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
    /// requeue, a pass cut short by its bounds or, over new submissions
    /// alone, by a reservation that moved) calls for a full pass.
    full_pass_needed: bool,
    /// Per node: when its agent was last heard from and last leased. Every
    /// node's grace period starts afresh when this replica starts leading.
    liveness: BTreeMap<String, Liveness>,
    /// Latest monotonic time seen; failure detection starts with the first.
    mono: Option<u64>,
    /// Registrations, downs and losses proposed and not yet applied, so that
    /// each is proposed once.
    registering: BTreeMap<String, u64>,
    downing: BTreeSet<String>,
    losing: BTreeSet<(JobId, AttemptNumber)>,
    /// Reports proposed and not yet applied.
    reporting: BTreeSet<(JobId, AttemptNumber, bool)>,
    /// An expiry of idempotency keys is proposed and not yet applied.
    expiring_keys: bool,
    /// The driver said the log cannot grow (disk full).
    storage_full: bool,
    /// Heartbeats this replica received (soft state, for metrics).
    heartbeats_received: u64,
}

impl Replica {
    /// Builds a replica from the state replayed out of its durable log.
    /// `last_index`/`last_term` describe that log; all of it is committed.
    pub fn recover(config: Config, state: State, last_index: LogIndex, last_term: Term) -> Replica {
        debug_assert_eq!(state.applied_index, last_index);
        let mut state = State {
            bugs: config.bugs,
            ..state
        };
        if state.sched.is_suspended() {
            state.rebuild_indexes();
        }
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
            liveness: BTreeMap::new(),
            mono: None,
            registering: BTreeMap::new(),
            downing: BTreeSet::new(),
            losing: BTreeSet::new(),
            reporting: BTreeSet::new(),
            expiring_keys: false,
            storage_full: false,
            heartbeats_received: 0,
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
    /// How long ago (monotonic ms, as of the latest input) this replica last
    /// heard from the node's agent; `None` before it heard anything.
    pub fn heard_ago_ms(&self, node: &str) -> Option<u64> {
        let live = self.liveness.get(node)?;
        Some(self.mono?.saturating_sub(live.heard_mono))
    }

    /// Agent heartbeats received since this replica started.
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received
    }

    /// True when writes can be served.
    pub fn is_ready(&self) -> bool {
        self.lifecycle == Lifecycle::Running && !self.storage_full
    }

    /// The driver's log cannot grow (its disk is full: `true`) or can again
    /// (`false`). While it cannot, new commands are refused with
    /// [`CommandError::StorageFull`] (what was already proposed waits for
    /// the disk) and the replica is not ready.
    pub fn handle_storage_full(&mut self, full: bool) {
        self.storage_full = full;
    }

    pub fn storage_full(&self) -> bool {
        self.storage_full
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
            // Valid, but there is no room to record it.
            Ok(None) if self.storage_full => self.reply(request, Err(CommandError::StorageFull)),
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
            Command::RemoveNode { reason, .. } if reason.len() > validate::REASON_BYTES_MAX => Err(
                CommandError::Invalid(ValidationError::ReasonTooLong(reason.len())),
            ),
            Command::DrainNode { name }
            | Command::UndrainNode { name }
            | Command::RemoveNode { name, .. } => {
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
                incarnation,
                ..
            } => {
                if *incarnation == 0 {
                    return Err(ValidationError::ZeroIncarnation.into());
                }
                validate::validate_node_name(name)?;
                validate::validate_resources(capacity)?;
                validate::validate_labels(labels, "labels")?;
                Ok(None)
            }
        }
    }

    /// A message from a node's agent. `mono` is the monotonic clock.
    pub fn handle_agent(&mut self, now: TimestampMs, mono: u64, msg: AgentMsg) {
        if !matches!(self.lifecycle, Lifecycle::Starting | Lifecycle::Running) {
            return;
        }
        self.observe(mono);
        match msg {
            AgentMsg::Heartbeat { node, seq } => {
                self.heartbeats_received += 1;
                self.heartbeat(now, mono, node, seq)
            }
            AgentMsg::Report(report) => self.report(now, report),
            AgentMsg::Leaving {
                node,
                incarnation,
                reason,
                done,
            } => self.leaving(now, node, incarnation, reason, done),
        }
    }

    /// An agent stopping: its node is drained, then removed with `reason`.
    fn leaving(
        &mut self,
        now: TimestampMs,
        name: String,
        incarnation: u64,
        reason: String,
        done: bool,
    ) {
        let Some(node) = self.state.nodes.get(&name) else {
            return;
        };
        if node.incarnation != incarnation {
            return;
        }
        let command = match (done, node.state) {
            (false, NodeState::Ready) => Command::DrainNode { name },
            (true, NodeState::Ready | NodeState::Draining | NodeState::Down) => {
                let mut reason = reason;
                let mut cut = validate::REASON_BYTES_MAX.min(reason.len());
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                Command::RemoveNode { name, reason }
            }
            _ => return,
        };
        if self.check(&command).is_ok() {
            self.append(now, command_event(command), Origin::Internal);
        }
    }

    fn heartbeat(&mut self, now: TimestampMs, mono: u64, ad: NodeAd, seq: u64) {
        let (name, incarnation) = (ad.name.clone(), ad.incarnation);
        let to_agent = |msg| Output::ToAgent {
            node: name.clone(),
            incarnation,
            msg,
        };
        match self.state.nodes.get(&ad.name) {
            Some(n) if n.incarnation == incarnation => {
                if matches!(n.state, NodeState::Down | NodeState::Left)
                    || self.downing.contains(&ad.name)
                {
                    let reason = format!("node {} is {}", n.name, n.state.as_str());
                    let current = n.incarnation;
                    self.outputs
                        .push_back(to_agent(ServerMsg::Fenced { reason, current }));
                    return;
                }
                self.leased(&name, incarnation, mono);
                let msg = ServerMsg::Lease {
                    seq,
                    index: self.state.applied_index,
                    active: self.view(&name),
                };
                self.outputs.push_back(to_agent(msg));
            }
            Some(n) if incarnation < n.incarnation => {
                let reason = format!(
                    "incarnation {incarnation} was replaced by {}",
                    n.incarnation
                );
                let current = n.incarnation;
                self.outputs
                    .push_back(to_agent(ServerMsg::Fenced { reason, current }));
            }
            _ => {
                if self.registering.get(&name) != Some(&incarnation) {
                    let command = Command::RegisterNode {
                        name: ad.name,
                        capacity: ad.capacity,
                        labels: ad.labels,
                        incarnation,
                        predecessor: ad.predecessor,
                    };
                    if let Err(e) = self.check(&command) {
                        let reason = format!("registration refused: {e}");
                        self.outputs
                            .push_back(to_agent(ServerMsg::Fenced { reason, current: 0 }));
                        return;
                    }
                    self.registering.insert(name.clone(), incarnation);
                    // A lease may be granted from the moment this
                    // incarnation is registered.
                    self.leased(&name, incarnation, mono);
                    self.append(now, command_event(command), Origin::Registration);
                }
                self.outputs.push_back(to_agent(ServerMsg::Joining { seq }));
            }
        }
    }

    /// The node's agent was heard from and (may have been) granted a lease
    /// at `mono`.
    fn leased(&mut self, name: &str, incarnation: u64, mono: u64) {
        let replaced = self.liveness.get(name).and_then(|old| {
            if old.incarnation == incarnation {
                old.replaced_leased_mono
            } else {
                Some(old.leased_mono.max(old.replaced_leased_mono.unwrap_or(0)))
            }
        });
        let live = Liveness {
            incarnation,
            heard_mono: mono,
            leased_mono: mono,
            replaced_leased_mono: replaced,
        };
        self.liveness.insert(name.to_string(), live);
    }

    /// An agent's report about one of its attempts. One about an attempt
    /// that is not the job's active attempt on that node incarnation is
    /// never applied; it is acknowledged so the agent stops sending it.
    fn report(&mut self, now: TimestampMs, report: Report) {
        let (job, attempt) = (report.job, report.attempt);
        let current = self
            .state
            .job(job)
            .and_then(Job::active_attempt)
            .is_some_and(|a| {
                a.number == attempt && a.node == report.node && a.incarnation == report.incarnation
            });
        // SIM-BUGS (b): the planted bug also drops this first line of fencing.
        let current = current || planted!(self.config.bugs, StaleResultApplied);
        let finished = matches!(report.kind, ReportKind::Finished { .. });
        if !current {
            if finished {
                self.outputs.push_back(Output::ToAgent {
                    node: report.node,
                    incarnation: report.incarnation,
                    msg: ServerMsg::ReportAck {
                        job,
                        attempt,
                        index: self.state.applied_index,
                    },
                });
            }
            return;
        }
        if !self.reporting.insert((job, attempt, finished))
            && !planted!(self.config.bugs, ReportAppendedTwice)
        {
            return;
        }
        let event = match report.kind {
            ReportKind::Started => Event::AttemptStarted { job, attempt },
            ReportKind::Finished { outcome, exit_code } => Event::AttemptFinished {
                job,
                attempt,
                outcome,
                exit_code,
                usage: report.usage,
            },
        };
        let origin = Origin::Report {
            node: report.node,
            incarnation: report.incarnation,
        };
        self.append(now, event, origin);
    }

    /// The committed view of a node: the active attempts of its current
    /// incarnation (those of a replaced one are not its to run).
    pub fn view(&self, node: &str) -> Vec<Assignment> {
        let current = self.state.nodes.get(node).map(|n| n.incarnation);
        let mut active = Vec::new();
        for id in self.state.active_by_node.get(node).into_iter().flatten() {
            let Some(job) = self.state.job(*id) else {
                continue;
            };
            let theirs = |a: &&crate::model::Attempt| {
                Some(a.incarnation) == current || planted!(self.config.bugs, RestartNotNoticed)
            };
            if let Some(a) = job.active_attempt().filter(theirs) {
                active.push(Assignment {
                    job: *id,
                    attempt: a.number,
                    node: a.node.clone(),
                    incarnation: a.incarnation,
                    started: a.state != AttemptState::Assigned,
                    cancel_requested: a.cancel_requested,
                    spec: job.spec.clone(),
                });
            }
        }
        active
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

    /// Periodic work; call every [`TICK_MS`] or so. `mono` is the
    /// monotonic clock: nodes silent for `down_after_ms` are declared down,
    /// and the attempts of a down or removed node are lost (and requeued)
    /// once its lease has provably lapsed.
    pub fn handle_tick(&mut self, now: TimestampMs, mono: u64) {
        if self.lifecycle == Lifecycle::Running {
            self.observe(mono);
            self.detect_failures(now, mono);
            self.expire_keys(now);
        }
        self.maybe_schedule(now);
    }

    /// Proposes the expiry of the idempotency keys bound longer than the
    /// window ago, once the oldest one is.
    fn expire_keys(&mut self, now: TimestampMs) {
        let Some(before) = now.checked_sub(self.config.idempotency_window_ms) else {
            return;
        };
        let due = self
            .state
            .key_times
            .first()
            .is_some_and(|(at, _)| *at < before);
        if due && !self.expiring_keys {
            self.expiring_keys = true;
            self.append(
                now,
                Event::IdempotencyKeysExpired { before },
                Origin::Internal,
            );
        }
    }

    /// Starts every node's grace period at the first monotonic reading.
    fn observe(&mut self, mono: u64) {
        if self.mono.is_none() {
            for node in self.state.nodes.values() {
                self.liveness.insert(
                    node.name.clone(),
                    Liveness {
                        incarnation: node.incarnation,
                        heard_mono: mono,
                        leased_mono: mono,
                        // Any replaced incarnation may have been leased by a
                        // leader before this one: count from now.
                        replaced_leased_mono: Some(mono),
                    },
                );
            }
        }
        // A leader that could not run for a while (paused, its host
        // stalled) heard nobody in the meantime: every node is credited
        // with the time the leader was not listening. Leases are not
        // extended: only what an agent was told counts for those.
        if let Some(last) = self.mono {
            let stall = mono.saturating_sub(last).saturating_sub(2 * TICK_MS);
            if stall > 0 {
                for live in self.liveness.values_mut() {
                    live.heard_mono = (live.heard_mono + stall).min(mono);
                }
            }
        }
        self.mono = Some(self.mono.map_or(mono, |m| m.max(mono)));
    }

    /// The node's active attempts that `which` selects and that are not
    /// being lost already, as (job, attempt).
    fn unlost_active(
        &self,
        node: &str,
        which: impl Fn(&crate::model::Attempt) -> bool,
    ) -> Vec<(JobId, AttemptNumber)> {
        let ids = self.state.active_by_node.get(node).into_iter().flatten();
        ids.filter_map(|id| {
            let a = self.state.job(*id).and_then(Job::active_attempt)?;
            let key = (*id, a.number);
            (which(a) && !self.losing.contains(&key)).then_some(key)
        })
        .collect()
    }

    fn detect_failures(&mut self, now: TimestampMs, mono: u64) {
        let lease = self.config.lease;
        let requeue_after = lease.requeue_after_ms();
        let mut down = Vec::new();
        let mut lost = Vec::new();
        for node in self.state.nodes.values() {
            let Some(live) = self.liveness.get(&node.name) else {
                continue;
            };
            // Attempts of a replaced incarnation that did not vouch for them.
            let replaced_lapsed = live
                .replaced_leased_mono
                .is_some_and(|t| mono.saturating_sub(t) >= requeue_after);
            if replaced_lapsed {
                // Attempts placed on an incarnation the node no longer has.
                lost.extend(self.unlost_active(&node.name, |a| a.incarnation != node.incarnation));
            }
            match node.state {
                NodeState::Ready | NodeState::Draining => {
                    let silent = mono.saturating_sub(live.heard_mono) >= lease.down_after_ms;
                    if silent && !self.downing.contains(&node.name) {
                        down.push((node.name.clone(), node.incarnation));
                    }
                }
                NodeState::Down | NodeState::Left => {
                    let lapsed = mono.saturating_sub(live.leased_mono) >= requeue_after
                        || planted!(self.config.bugs, RequeueBeforeLeaseLapses);
                    if !lapsed {
                        continue;
                    }
                    lost.extend(self.unlost_active(&node.name, |_| true));
                }
            }
        }
        for (name, incarnation) in down {
            self.downing.insert(name.clone());
            self.append(now, Event::NodeDown { name, incarnation }, Origin::Internal);
        }
        for (job, attempt) in lost {
            // Once each (a down node's attempt may also be a replaced one's).
            if self.losing.insert((job, attempt)) {
                self.append(now, Event::AttemptLost { job, attempt }, Origin::Internal);
            }
        }
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
            self.settle_proposal(&entry);
            self.after_apply(&entry, origin, applied);
        }
    }

    /// Forgets that an applied entry was in flight.
    fn settle_proposal(&mut self, entry: &Entry) {
        match &entry.event {
            Event::NodeRegistered {
                name, incarnation, ..
            } if self.registering.get(name) == Some(incarnation) => {
                self.registering.remove(name);
            }
            Event::NodeDown { name, .. } => {
                self.downing.remove(name);
            }
            Event::AttemptLost { job, attempt } => {
                self.losing.remove(&(*job, *attempt));
            }
            Event::AttemptStarted { job, attempt } => {
                self.reporting.remove(&(*job, *attempt, false));
            }
            Event::AttemptFinished { job, attempt, .. } => {
                self.reporting.remove(&(*job, *attempt, true));
            }
            Event::IdempotencyKeysExpired { .. } => self.expiring_keys = false,
            _ => {}
        }
    }

    fn after_apply(&mut self, entry: &Entry, origin: Origin, applied: Applied) {
        if let Origin::Report { node, incarnation } = &origin {
            if matches!(entry.event, Event::AttemptFinished { .. }) {
                if let Some((job, attempt)) = entry.event.job().zip(attempt_of(&entry.event)) {
                    self.outputs.push_back(Output::ToAgent {
                        node: node.clone(),
                        incarnation: *incarnation,
                        msg: ServerMsg::ReportAck {
                            job,
                            attempt,
                            index: entry.index,
                        },
                    });
                }
            }
        }
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
                | Event::NodeDrained { .. },
                _,
            ) => {}
            // A cancel frees nothing, but a queued job's cancel may release
            // the node reserved for it: found by `rustci sim`, seed 904
            // (before the new workload), when the jobs behind it waited.
            (Event::NodeRegistered { .. }, _) if planted!(self.config.bugs, RejoinNeedsNoPass) => {}
            _ => self.full_pass_needed = true,
        }
        match &applied {
            Applied::Assigned { job, attempt } => {
                let assignment = self.view_of(*job).filter(|a| a.attempt == *attempt);
                if let Some(assignment) = assignment {
                    self.outputs.push_back(Output::ToAgent {
                        node: assignment.node.clone(),
                        incarnation: assignment.incarnation,
                        msg: ServerMsg::Start {
                            index: entry.index,
                            assignment,
                        },
                    });
                }
            }
            Applied::CancelActive { job, attempt } => self.kill(*job, *attempt),
            _ => {}
        }
        if let (Event::NodeRemoved { name, .. }, Applied::Done) = (&entry.event, &applied) {
            // Stop what runs there now; the attempts are requeued once the
            // node's lease has lapsed (or its agent reports them killed).
            let ids: Vec<JobId> = self
                .state
                .active_by_node
                .get(name)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for id in ids {
                if let Some(number) = self
                    .state
                    .job(id)
                    .and_then(Job::active_attempt)
                    .map(|a| a.number)
                {
                    self.kill(id, number);
                }
            }
        }
        if let Origin::Command(request) = origin {
            let reply = self.reply_for(entry, &applied);
            self.reply(request, reply);
        }
    }

    /// The job's active attempt as its agent sees it.
    fn view_of(&self, job: JobId) -> Option<Assignment> {
        let job = self.state.job(job)?;
        let a = job.active_attempt()?;
        Some(Assignment {
            job: job.id,
            attempt: a.number,
            node: a.node.clone(),
            incarnation: a.incarnation,
            started: a.state != AttemptState::Assigned,
            cancel_requested: a.cancel_requested,
            spec: job.spec.clone(),
        })
    }

    fn kill(&mut self, job: JobId, attempt: AttemptNumber) {
        if let Some(a) = self.view_of(job).filter(|a| a.attempt == attempt) {
            self.outputs.push_back(Output::ToAgent {
                node: a.node.clone(),
                incarnation: a.incarnation,
                msg: ServerMsg::Kill {
                    job,
                    attempt,
                    node: a.node,
                    incarnation: a.incarnation,
                },
            });
        }
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
                | Event::NodeRemoved { name, .. }
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
            scheduler::schedule_pass(&mut self.state, None, bounds)
        } else {
            let mut keys: Vec<QueueKey> = self
                .new_jobs
                .iter()
                .filter_map(|id| self.state.job(*id).map(|j| self.state.queue_key(j)))
                .collect();
            keys.sort_unstable();
            scheduler::schedule_pass(&mut self.state, Some(&keys), bounds)
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
        Command::RemoveNode { name, reason } => Event::NodeRemoved { name, reason },
        Command::RegisterNode {
            name,
            capacity,
            labels,
            incarnation,
            predecessor,
        } => Event::NodeRegistered {
            name,
            capacity,
            labels,
            incarnation,
            predecessor,
        },
    }
}

fn attempt_of(event: &Event) -> Option<AttemptNumber> {
    match event {
        Event::AttemptAssigned { attempt, .. }
        | Event::AttemptStarted { attempt, .. }
        | Event::AttemptFinished { attempt, .. }
        | Event::AttemptLost { attempt, .. } => Some(*attempt),
        _ => None,
    }
}
