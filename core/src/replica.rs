//! The replica: the sans-IO state machine a control-plane process runs.
//!
//! Two halves. [`crate::raft`] decides what is committed in the replicated
//! log; the application half (this module) owns the reduced [`State`],
//! decides what to propose (user commands, runner reports, scheduler
//! placements), and turns committed entries into replies and runner
//! commands. It performs no IO and reads no clock.
//!
//! # Driver contract
//!
//! Inputs, each taking `now` (wall-clock milliseconds: they only stamp
//! entries) and, where timers matter, `mono` (milliseconds on a monotonic
//! clock: elections, failure detection and leases never read the wall
//! clock): [`Replica::start`], [`Replica::propose`],
//! [`Replica::handle_agent`], [`Replica::handle_peer`],
//! [`Replica::handle_persisted`], [`Replica::handle_entries_loaded`],
//! [`Replica::handle_peer_snapshot`], [`Replica::handle_compacted`],
//! [`Replica::handle_tick`].
//!
//! Outputs come from [`Replica::poll_output`], in order. A driver MUST:
//! 1. make each [`Output::Persist`] unit durable as ONE atomic write
//!    (install `snapshot`, replacing the whole stored log; truncate the
//!    stored log from `truncate_from`, append `entries`, store
//!    `hard_state`; one transaction, one fsync), units in the order they
//!    were returned, and then call [`Replica::handle_persisted`] with the
//!    unit's id (an id covers every earlier unit). An [`Output::Compact`]
//!    is a write in the same sequence: once the units before it are
//!    durable, build the state at its index by folding the stored entries
//!    after the stored snapshot into that snapshot's state (the reducers
//!    are pure, so this is the state the replica applied; the live state is
//!    never copied), store it and drop the entries up to it, then call
//!    [`Replica::handle_compacted`] (or [`Replica::handle_compact_failed`]);
//! 2. act on outputs in the order they are returned. A `Reply` is only
//!    returned once its entry is committed (durable on a quorum) and
//!    applied, and an [`Output::Send`] only once every unit before it is
//!    durable (a vote or an append acknowledgement promises what the disk
//!    holds), so sending at once keeps both promises;
//! 3. deliver every [`Output::Send`] to the replica it names (it may be
//!    lost, duplicated or reordered: Raft tolerates that), and answer every
//!    [`Output::LoadEntries`] from storage with
//!    [`Replica::handle_entries_loaded`]. An InstallSnapshot message
//!    travels with the sender's stored snapshot of that metadata (dropped
//!    if storage moved on), and the receiver hands both to
//!    [`Replica::handle_peer_snapshot`];
//! 4. deliver every [`Output::ToAgent`] message to the agent of its node,
//!    and only to the incarnation it names; a message may be lost (the node
//!    is gone, the network dropped it) and the replica tolerates that: every
//!    lease renewal carries the node's committed view, and agents reconcile.
//!
//! Only the leader proposes and talks to agents, and only once it has
//! applied its own `LeaderElected` entry (its state is then complete). A
//! replica that stops leading fails the replies it still owes with
//! [`CommandError::NotLeader`] and forgets its in-flight bookkeeping; pending
//! replies are keyed by `(index, term)`, so an entry replaced by another
//! leader's fails its waiter instead of answering it with the wrong entry.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::event::{Entry, Event, LogIndex, ReplicaId, Term};
use crate::model::{
    AttemptNumber, AttemptState, Job, JobId, JobSpec, Labels, Node, NodeState, Resources,
    TimestampMs,
};
use crate::protocol::{AgentMsg, Assignment, LeaseConfig, NodeAd, Report, ReportKind, ServerMsg};
use crate::raft::{self, HardState, NeedEntries, ProposeError, Raft, Role};
use crate::scheduler;
use crate::state::{Applied, QueueKey, State};
use crate::validate::{self, ValidationError};

/// Proposals waiting for commit, beyond which new commands are refused
/// with [`CommandError::Overloaded`] (back-pressure instead of memory growth).
pub const PROPOSALS_INFLIGHT_MAX: usize = 1 << 16;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: ReplicaId,
    /// Every replica of the cluster, this one included (1, 3 or 5), as it
    /// started: the log's membership changes, if any, replace them.
    pub voters: BTreeSet<ReplicaId>,
    /// The addresses of the replicas the driver was told of (`--peer`, its
    /// own), for membership changes made before any was logged.
    pub addrs: BTreeMap<ReplicaId, String>,
    /// Raft's base election timeout; each wait is drawn from `[t, 2t)`.
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Seeds Raft's election timeout draws.
    pub seed: u64,
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
    /// Raft's bound on the entries one append carries (production keeps
    /// [`raft::APPEND_ENTRIES_MAX_DEFAULT`]; the simulator draws small ones
    /// per seed so a follower catching up sees a leader's log in pieces).
    pub append_entries_max: usize,
    /// Applied entries after which the replica snapshots its state and the
    /// log before it is compacted ([`Output::Compact`]); 0 never compacts.
    pub snapshot_entries: u64,
    /// SIM-BUGS: the planted bug selected by the simulator (none by
    /// default; dead code without the `sim-bugs` feature).
    /// [`Replica::recover`] copies it into the state for the reducer and
    /// the scheduler.
    pub bugs: crate::bugs::BugSet,
}

/// Default of [`Config::idempotency_window_ms`]: 24 hours.
pub const IDEMPOTENCY_WINDOW_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;

/// Default of [`Config::snapshot_entries`]: a replica that restarts replays
/// at most this many entries after its snapshot, and a follower further
/// behind than the leader's snapshot catches up by InstallSnapshot.
pub const SNAPSHOT_ENTRIES_DEFAULT: u64 = 50_000;

/// The application's state as of one applied entry, as a snapshot holds
/// it. The state is shared, not copied again, on its way to storage or a
/// follower; drivers encode it as they store or send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: raft::SnapshotMeta,
    pub state: std::sync::Arc<State>,
}

impl Snapshot {
    /// Whether `state` is the state at `meta`: a snapshot whose bytes
    /// decoded to another state (a broken or a hostile sender) is refused.
    pub fn is_consistent(&self) -> bool {
        self.meta.index > 0
            && self.state.applied_index == self.meta.index
            && self.state.applied_term == self.meta.term
    }

    /// The snapshot an [`Output::Compact`] of `meta` asks for: `entries`,
    /// the stored log after the stored snapshot whose state is `base`, in
    /// order, folded into `base` up to `meta.index`. The reducers are pure,
    /// so the fold is the state the replica applied at `meta`, built away
    /// from the replica (a driver folds on a thread of its own: copying the
    /// live state would stall the replica for as long as the copy takes).
    ///
    /// `None` if the entries do not reach `meta` (the log moved on: a
    /// snapshot installed from the leader replaced it).
    pub fn fold(
        meta: raft::SnapshotMeta,
        base: State,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Option<Snapshot> {
        let mut state = base;
        for entry in entries {
            if entry.index > meta.index {
                break;
            }
            if entry.index == state.applied_index + 1 {
                state.apply_owned(entry);
            }
        }
        let snapshot = Snapshot {
            meta,
            state: std::sync::Arc::new(state),
        };
        snapshot.is_consistent().then_some(snapshot)
    }
}

impl Config {
    fn raft(&self) -> raft::Config {
        let mut c = raft::Config::new(self.id, self.voters.iter().copied(), self.seed);
        c.election_timeout_ms = self.election_timeout_ms;
        c.heartbeat_interval_ms = self.heartbeat_interval_ms;
        c.uncommitted_entries_max = self.proposals_inflight_max as u64;
        c.append_entries_max = self.append_entries_max;
        if self.voters.len() == 1 {
            // Raft keeps applied entries in memory for followers that lag;
            // a single replica has none to serve.
            c.cache_entries_max = 0;
        }
        c.bugs = self.bugs;
        c
    }
}

/// What the replicated log carries: an event and the wall-clock stamp its
/// leader gave it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub at: TimestampMs,
    pub event: Event,
}

impl raft::Payload for Record {
    fn size_bytes(&self) -> u64 {
        self.event.approx_bytes()
    }
    fn voters_change(&self) -> Option<raft::Voters> {
        match &self.event {
            Event::MembersChanged { members } if crate::event::members_valid(members) => {
                Some(members.keys().copied().collect())
            }
            _ => None,
        }
    }
    fn leader_elected(term: Term, leader: ReplicaId, stamp: u64) -> Record {
        Record {
            at: stamp,
            event: Event::LeaderElected {
                replica: leader,
                term,
            },
        }
    }
}

/// A message between replicas.
pub type PeerMessage = raft::Message<Record>;

/// An [`Entry`] as Raft holds it.
pub fn to_raft(entry: Entry) -> raft::Entry<Record> {
    raft::Entry {
        index: entry.index,
        term: entry.term,
        data: Record {
            at: entry.at,
            event: entry.event,
        },
    }
}

/// A Raft entry as the log stores it.
pub fn from_raft(entry: raft::Entry<Record>) -> Entry {
    Entry {
        index: entry.index,
        term: entry.term,
        at: entry.data.at,
        event: entry.data.event,
    }
}

/// What a replica's storage holds when it starts, as the driver read it.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// The state replayed from the stored snapshot (if any) and the stored
    /// log after it, up to `hard_state.commit`.
    pub state: State,
    pub hard_state: HardState,
    /// The stored snapshot's metadata (`0, 0` if none): the log starts
    /// after it.
    pub snapshot: raft::SnapshotMeta,
    /// `(first index, term)` of each run of equal terms in the stored log
    /// after the snapshot (see [`raft::term_runs`]).
    pub runs: Vec<(LogIndex, Term)>,
    pub last_index: LogIndex,
    /// The stored entries after `state.applied_index`.
    pub tail: Vec<Entry>,
    /// The replicas of the snapshot's state, if it names any (at the
    /// snapshot's index), then those of each committed `MembersChanged`
    /// after it, by index: Raft's configuration history.
    pub members: Vec<(LogIndex, BTreeMap<ReplicaId, String>)>,
}

impl Recovery {
    /// A replica that never ran.
    pub fn empty() -> Recovery {
        Recovery {
            state: State::new(),
            hard_state: HardState::default(),
            snapshot: raft::SnapshotMeta::default(),
            runs: Vec::new(),
            last_index: 0,
            tail: Vec::new(),
            members: Vec::new(),
        }
    }

    /// From a whole stored log and hard state: replays the committed prefix
    /// into `state` (for tests and the simulator; the daemon streams its log
    /// instead).
    pub fn from_log(state: State, log: &[Entry], hard_state: HardState) -> Recovery {
        Recovery::from_snapshot(state, raft::SnapshotMeta::default(), log, hard_state)
    }

    /// From a stored snapshot (`state` is the state it holds; `snapshot`
    /// is `0, 0` and `state` empty if there is none), the stored log after
    /// it and the hard state: replays the committed entries into `state`.
    pub fn from_snapshot(
        mut state: State,
        snapshot: raft::SnapshotMeta,
        log: &[Entry],
        hard_state: HardState,
    ) -> Recovery {
        assert_eq!(state.applied_index, snapshot.index, "the snapshot's state");
        assert!(log.first().is_none_or(|e| e.index == snapshot.index + 1));
        let last = log
            .last()
            .map(|e| (e.index, e.term))
            .or((snapshot.index > 0).then_some((snapshot.index, snapshot.term)));
        let mut hard_state = Recovery::legacy(hard_state, last);
        // A snapshot is committed state, stored maybe before the hard state
        // that says so.
        hard_state.commit = hard_state.commit.max(snapshot.index);
        let split = log.partition_point(|e| e.index <= hard_state.commit);
        let mut members = Vec::new();
        if !state.members.is_empty() {
            members.push((snapshot.index, state.members.clone()));
        }
        for entry in &log[..split] {
            state.apply(entry);
            if let Event::MembersChanged { members: m } = &entry.event {
                if crate::event::members_valid(m) {
                    members.push((entry.index, m.clone()));
                }
            }
        }
        let (runs, last_index) = raft::term_runs(snapshot, log.iter().map(|e| (e.index, e.term)));
        Recovery {
            state,
            hard_state,
            snapshot,
            runs,
            last_index,
            tail: log[split..].to_vec(),
            members,
        }
    }

    /// The hard state to recover with, given the stored one and the stored
    /// log's last `(index, term)`. A log written by a single replica before
    /// hard states were stored has none: all of it was committed then.
    pub fn legacy(stored: HardState, last: Option<(LogIndex, Term)>) -> HardState {
        match last {
            Some((index, term)) if stored == HardState::default() => HardState {
                term,
                vote: None,
                commit: index,
            },
            Some((_, term)) if stored.term < term => HardState { term, ..stored },
            _ => stored,
        }
    }
}

/// One unit for the driver to make durable atomically: see the driver
/// contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistUnit {
    /// Increases by one per unit; [`Replica::handle_persisted`] takes it.
    pub id: u64,
    /// First, install this snapshot received from the leader: it replaces
    /// the whole stored log (and any older snapshot).
    pub snapshot: Option<Snapshot>,
    /// Drop every stored entry from this index on, first.
    pub truncate_from: Option<LogIndex>,
    /// Then append these (contiguous, in index order).
    pub entries: Vec<Entry>,
    /// Then store this.
    pub hard_state: Option<HardState>,
}

impl Config {
    pub fn new(id: ReplicaId) -> Config {
        Config {
            id,
            voters: BTreeSet::from([id]),
            addrs: BTreeMap::new(),
            election_timeout_ms: raft::ELECTION_TIMEOUT_MS_DEFAULT,
            heartbeat_interval_ms: raft::HEARTBEAT_INTERVAL_MS_DEFAULT,
            seed: id,
            proposals_inflight_max: PROPOSALS_INFLIGHT_MAX,
            pass_bounds: scheduler::PassBounds::default(),
            lease: LeaseConfig::default(),
            idempotency_window_ms: IDEMPOTENCY_WINDOW_MS_DEFAULT,
            snapshot_entries: SNAPSHOT_ENTRIES_DEFAULT,
            append_entries_max: raft::APPEND_ENTRIES_MAX_DEFAULT,
            bugs: crate::bugs::BugSet::default(),
        }
    }
}

/// The control-plane lifecycle, as shown by `GET /v1/cluster`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Initializing,
    /// A single replica elected itself and is applying its log.
    Starting,
    /// A single replica serving.
    Running,
    /// One of several replicas, knowing no leader, or a leader that has
    /// not yet applied its own first entry.
    ElectingLeader,
    Leader,
    Follower,
    /// A leader that lost contact with part of the cluster (it still has a
    /// quorum, else it steps down).
    Degraded,
    Stopping,
    Stopped,
    Failed,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 10] = [
        Lifecycle::Initializing,
        Lifecycle::Starting,
        Lifecycle::Running,
        Lifecycle::ElectingLeader,
        Lifecycle::Leader,
        Lifecycle::Follower,
        Lifecycle::Degraded,
        Lifecycle::Stopping,
        Lifecycle::Stopped,
        Lifecycle::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Initializing => "initializing",
            Lifecycle::Starting => "starting",
            Lifecycle::Running => "running",
            Lifecycle::ElectingLeader => "electing_leader",
            Lifecycle::Leader => "leader",
            Lifecycle::Follower => "follower",
            Lifecycle::Degraded => "degraded",
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
    /// An operator adds or removes a replica: see [`Replica::change_members`].
    ChangeMembers(MemberChange),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Job(Job),
    Node(Node),
    /// The replicas after a membership change, with their addresses.
    Members(BTreeMap<ReplicaId, String>),
}

/// One replica added to or removed from the control plane (one at a time:
/// remove a dead replica, then add its replacement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// A new replica with this id, whose API and peers listen at `addr`.
    Add {
        id: ReplicaId,
        addr: String,
    },
    Remove {
        id: ReplicaId,
    },
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
    /// This replica stopped leading while the command's entry was in its
    /// log but not known to be committed: the next leader may still commit
    /// it. The outcome is unknown; a retry with the same idempotency key is
    /// safe.
    #[error("leadership changed before the request was known to be committed: it may or may not have been applied (leader now: {leader:?}); retry it with the same Idempotency-Key")]
    LeadershipLost { leader: Option<ReplicaId> },
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("the control plane is stopping")]
    Stopping,
    #[error("the event log cannot grow: its disk is full; retry once space is freed")]
    StorageFull,
    /// A membership change that cannot be made now (`retry`: once the
    /// change before it or the new leader's first entry is committed) or
    /// at all.
    #[error("{reason}")]
    Membership { reason: String, retry: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A unit to make durable. See the driver contract.
    Persist(PersistUnit),
    /// A message for another replica.
    Send(PeerMessage),
    /// Read entries `from..=to` from storage for replica `peer` and hand
    /// them to [`Replica::handle_entries_loaded`].
    LoadEntries(NeedEntries),
    /// Snapshot the applied state at this index (a fold of the stored log;
    /// see [`Snapshot::fold`]), store it and drop the stored entries up to
    /// it (after every earlier unit, as one atomic write), then call
    /// [`Replica::handle_compacted`].
    Compact(raft::SnapshotMeta),
    /// The answer to a command, sent only once its entry is durable.
    Reply {
        request: RequestId,
        result: Result<Reply, CommandError>,
    },
    /// A read asked with [`Replica::read`] may be served now from
    /// [`Replica::state`] (linearizable: it reflects every write
    /// acknowledged before the read was asked), or cannot be (`Err`).
    ReadReady {
        request: RequestId,
        result: Result<(), CommandError>,
    },
    /// The replicas in effect changed (a membership change was appended,
    /// committed or undone): send Raft messages to exactly these, at these
    /// addresses (`None`: not known here).
    Members(BTreeMap<ReplicaId, Option<String>>),
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
    /// Decides what is committed.
    raft: Raft<Record>,
    state: State,
    /// [`State::digest`] at an applied index: hashing the whole state takes
    /// the driver tens of milliseconds on a large one, and the state at an
    /// applied index is always the same (the log's fold up to it).
    digest_cache: std::cell::Cell<Option<(LogIndex, u64)>>,
    /// Initializing, then Running once started, Stopping, Stopped or
    /// Failed; [`Replica::lifecycle`] refines Running by Raft's role.
    phase: Lifecycle,
    /// This replica leads and has applied its own `LeaderElected` entry:
    /// its state holds every committed entry, so it may propose, schedule
    /// and talk to agents.
    leading: bool,
    /// The largest stamp in the local log (applied or not): stamps never
    /// decrease along the log, also across leaders.
    max_at: TimestampMs,
    /// Why each entry this leader proposed was proposed, by index, with
    /// the term it was proposed in.
    origins: BTreeMap<LogIndex, (Term, Origin)>,
    /// Indexes of the submissions among them (what the next job id is).
    submits_unapplied: BTreeSet<LogIndex>,
    /// Ids of the persist units handed out and reported durable.
    units_issued: u64,
    units_persisted: u64,
    /// Per unit not yet durable: its id and the `(index, term)` Raft is
    /// told once it is.
    units_pending: VecDeque<(u64, Option<(LogIndex, Term)>)>,
    /// Messages waiting for the unit (id) before them to be durable.
    held: VecDeque<(u64, PeerMessage)>,
    /// Reads Raft is confirming (ReadIndex), by request.
    reads_asked: BTreeSet<RequestId>,
    /// Reads confirmed at an index, waiting for it to be applied.
    reads_confirmed: VecDeque<(LogIndex, RequestId)>,
    /// A snapshot received from the leader with its InstallSnapshot
    /// message, kept until Raft installs it (or does not want it).
    snapshot_received: Option<Snapshot>,
    /// A compaction handed to the driver and not yet reported done.
    compacting: Option<LogIndex>,
    /// The index of a compaction that failed: the next waits for
    /// `snapshot_entries` more entries after it.
    compact_after: LogIndex,
    /// Snapshots installed from a leader (soft state, for metrics and the
    /// simulator).
    snapshots_installed: u64,
    /// Every replica address this one knows of (see [`Replica::member_addrs`]).
    addrs: BTreeMap<ReplicaId, String>,
    /// A hard state whose only change is the commit index: it needs no
    /// fsync of its own and rides with the next unit.
    deferred_hard_state: Option<HardState>,
    /// The hard state last handed out in a unit.
    hard_state_out: HardState,
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
    /// Latest monotonic time seen while leading; failure detection starts
    /// with the first.
    mono: Option<u64>,
    /// The first monotonic time seen while leading.
    leading_since: Option<u64>,
    /// Latest monotonic time given to Raft.
    raft_mono: u64,
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
    /// Times this replica saw the leader change (soft state, for metrics).
    leader_changes: u64,
    leader_seen: Option<ReplicaId>,
    /// Scheduler passes run (soft state, for metrics: a driver that sees it
    /// change across a call knows that call ran a pass and can time it).
    scheduler_passes: u64,
}

impl Replica {
    /// Builds a replica from what its storage holds, at monotonic time
    /// `mono`. It follows until [`Replica::start`].
    pub fn recover(config: Config, recovery: Recovery, mono: u64) -> Replica {
        let Recovery {
            state,
            hard_state,
            snapshot,
            runs,
            last_index,
            tail,
            members,
        } = recovery;
        debug_assert_eq!(state.applied_index, hard_state.commit.min(last_index));
        let mut state = State {
            bugs: config.bugs,
            ..state
        };
        if state.sched.is_suspended() {
            state.rebuild_indexes();
        }
        let max_at = tail.iter().map(|e| e.at).fold(state.last_at, u64::max);
        let mut addrs = config.addrs.clone();
        for (_, m) in &members {
            addrs.extend(m.iter().map(|(id, a)| (*id, a.clone())));
        }
        for e in &tail {
            if let Event::MembersChanged { members: m } = &e.event {
                addrs.extend(m.iter().map(|(id, a)| (*id, a.clone())));
            }
        }
        let mut voters: Vec<(LogIndex, raft::Voters)> = members
            .iter()
            .map(|(i, m)| (*i, m.keys().copied().collect()))
            .collect();
        if voters.first().is_some_and(|(i, _)| *i > snapshot.index) {
            // The snapshot predates every change: the replicas it started
            // with were the voters then.
            voters.insert(0, (snapshot.index, config.voters.iter().copied().collect()));
        }
        let recovered = raft::Recovered {
            hard_state,
            snapshot,
            runs,
            last_index,
            tail: tail.into_iter().map(to_raft).collect(),
            voters,
        };
        let raft = Raft::new(config.raft(), recovered, mono);
        Replica {
            config,
            raft,
            phase: Lifecycle::Initializing,
            leading: false,
            max_at,
            state,
            origins: BTreeMap::new(),
            submits_unapplied: BTreeSet::new(),
            units_issued: 0,
            units_persisted: 0,
            units_pending: VecDeque::new(),
            held: VecDeque::new(),
            reads_asked: BTreeSet::new(),
            reads_confirmed: VecDeque::new(),
            snapshot_received: None,
            compacting: None,
            compact_after: 0,
            snapshots_installed: 0,
            digest_cache: std::cell::Cell::new(None),
            addrs,
            deferred_hard_state: None,
            hard_state_out: hard_state,
            outputs: VecDeque::new(),
            placements_inflight: 0,
            new_jobs: Vec::new(),
            full_pass_needed: true,
            liveness: BTreeMap::new(),
            mono: None,
            leading_since: None,
            raft_mono: mono,
            registering: BTreeMap::new(),
            downing: BTreeSet::new(),
            losing: BTreeSet::new(),
            reporting: BTreeSet::new(),
            expiring_keys: false,
            storage_full: false,
            heartbeats_received: 0,
            leader_changes: 0,
            leader_seen: None,
            scheduler_passes: 0,
        }
    }

    // --- getters ---

    pub fn state(&self) -> &State {
        &self.state
    }

    /// [`State::digest`] of the applied state, computed once per applied
    /// index: polls of `/v1/cluster` between writes cost nothing. Under
    /// writes each poll at a new index still hashes the whole state on the
    /// driver.
    pub fn state_digest(&self) -> u64 {
        let at = self.state.applied_index;
        match self.digest_cache.get() {
            Some((index, digest)) if index == at => digest,
            _ => {
                let digest = self.state.digest();
                self.digest_cache.set(Some((at, digest)));
                digest
            }
        }
    }
    pub fn id(&self) -> ReplicaId {
        self.config.id
    }
    /// The replicas in effect (the latest membership change in the log,
    /// committed or not, else those it started with).
    pub fn voters(&self) -> BTreeSet<ReplicaId> {
        self.raft.voters().into()
    }
    /// The addresses of replicas this one knows of: the flags it started
    /// with, then what membership changes said.
    pub fn member_addrs(&self) -> &BTreeMap<ReplicaId, String> {
        &self.addrs
    }
    /// The committed membership with addresses (what a change starts
    /// from): the last `MembersChanged` applied, else the replicas it
    /// started with.
    pub fn members(&self) -> BTreeMap<ReplicaId, String> {
        if !self.state.members.is_empty() {
            return self.state.members.clone();
        }
        self.config
            .voters
            .iter()
            .map(|&id| (id, self.addrs.get(&id).cloned().unwrap_or_default()))
            .collect()
    }
    pub fn lifecycle(&self) -> Lifecycle {
        if self.phase != Lifecycle::Running {
            return self.phase;
        }
        let single = self.raft.voters().len() == 1;
        match (self.raft.role(), self.leading) {
            (Role::Leader, true) if single => Lifecycle::Running,
            (Role::Leader, false) if single => Lifecycle::Starting,
            (Role::Leader, true) if self.raft.degraded() => Lifecycle::Degraded,
            (Role::Leader, true) => Lifecycle::Leader,
            (Role::Follower, _) if self.raft.leader().is_some() => Lifecycle::Follower,
            _ => Lifecycle::ElectingLeader,
        }
    }
    pub fn term(&self) -> Term {
        self.raft.term()
    }
    pub fn commit_index(&self) -> LogIndex {
        self.raft.commit_index()
    }
    pub fn applied_index(&self) -> LogIndex {
        self.state.applied_index
    }
    pub fn last_index(&self) -> LogIndex {
        self.raft.last_index()
    }
    /// The leader as far as this replica knows.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.raft.leader()
    }
    /// Raft's role (a leader may not be leading yet: see `is_leading`).
    pub fn role(&self) -> Role {
        self.raft.role()
    }
    /// This replica leads and its state is complete: it takes commands.
    pub fn is_leading(&self) -> bool {
        self.leading
    }
    /// Times the known leader changed since this replica started.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes
    }
    /// How long ago (monotonic ms, as of the latest input) this replica last
    /// heard from the node's agent; `None` before it heard anything.
    pub fn heard_ago_ms(&self, node: &str) -> Option<u64> {
        let live = self.liveness.get(node)?;
        Some(self.mono?.saturating_sub(live.heard_mono))
    }

    /// Scheduler passes this replica has run since it started.
    pub fn scheduler_passes(&self) -> u64 {
        self.scheduler_passes
    }

    /// Agent heartbeats received since this replica started.
    /// The term of the entry at `index` in this replica's log (`None` past
    /// its end or before its snapshot).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.raft.term_at(index)
    }
    /// The latest snapshot the log was compacted behind (`0, 0` if none).
    pub fn snapshot(&self) -> raft::SnapshotMeta {
        self.raft.snapshot()
    }
    /// Snapshots installed from a leader since start.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received
    }

    /// True when writes can be served.
    pub fn is_ready(&self) -> bool {
        self.leading && self.phase == Lifecycle::Running && !self.storage_full
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

    /// Starts serving. A single replica elects itself at once; one of
    /// several waits for a leader or its election timeout.
    pub fn start(&mut self, now: TimestampMs) {
        if self.phase != Lifecycle::Initializing {
            return;
        }
        self.phase = Lifecycle::Running;
        if self.raft.voters().len() == 1 && self.raft.is_voter() {
            self.raft.set_stamp(self.next_stamp(now));
            self.raft.campaign_now();
        }
        self.process(now);
    }

    /// Stops accepting commands; entries already proposed still commit.
    pub fn stop(&mut self) {
        self.phase = Lifecycle::Stopping;
    }

    /// Marks the replica failed (the driver hit an unrecoverable IO error).
    pub fn fail(&mut self) {
        self.phase = Lifecycle::Failed;
    }

    /// Validates a command and proposes its entry; the reply comes later
    /// through [`Output::Reply`], or at once for a no-op or an error.
    pub fn propose(&mut self, now: TimestampMs, request: RequestId, command: Command) {
        if let Command::ChangeMembers(change) = command {
            return self.change_members(now, request, change);
        }
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
        self.process(now);
    }

    /// Adds or removes one replica (an operator's membership change): the
    /// leader appends `MembersChanged` with the replicas after the change,
    /// and Raft counts among them from then on. Answered with
    /// [`Reply::Members`] once committed; a change already made is answered
    /// at once (a retry after an unknown outcome is safe).
    pub fn change_members(&mut self, now: TimestampMs, request: RequestId, change: MemberChange) {
        match self.member_change(&change) {
            Err(e) => self.reply(request, Err(e)),
            Ok(None) => self.reply(request, Ok(Reply::Members(self.members()))),
            Ok(Some(members)) => {
                let at = self.next_stamp(now);
                let record = Record {
                    at,
                    event: Event::MembersChanged { members },
                };
                match self.raft.propose_change(record) {
                    Ok(index) => {
                        self.max_at = at;
                        self.origins
                            .insert(index, (self.raft.term(), Origin::Command(request)));
                    }
                    Err(e) => {
                        let leader = self.raft.leader().filter(|&l| l != self.config.id);
                        let error = match e {
                            raft::ChangeError::NotLeader { .. }
                            | raft::ChangeError::Transferring { .. } => {
                                CommandError::NotLeader { leader }
                            }
                            raft::ChangeError::Overloaded => CommandError::Overloaded,
                            e @ (raft::ChangeError::ChangePending { .. }
                            | raft::ChangeError::NoCommitInTerm) => CommandError::Membership {
                                reason: e.to_string(),
                                retry: true,
                            },
                            e => CommandError::Membership {
                                reason: e.to_string(),
                                retry: false,
                            },
                        };
                        self.reply(request, Err(error));
                    }
                }
            }
        }
        self.process(now);
    }

    /// The replicas after `change`, or `None` if they are already so.
    fn member_change(
        &self,
        change: &MemberChange,
    ) -> Result<Option<BTreeMap<ReplicaId, String>>, CommandError> {
        match self.phase {
            Lifecycle::Running if self.leading => {}
            Lifecycle::Stopping | Lifecycle::Stopped => return Err(CommandError::Stopping),
            _ => {
                return Err(CommandError::NotLeader {
                    leader: self.raft.leader().filter(|&l| l != self.config.id),
                })
            }
        }
        if self.storage_full {
            return Err(CommandError::StorageFull);
        }
        let invalid = |reason: String| CommandError::Membership {
            reason,
            retry: false,
        };
        let mut members = self.members();
        match change {
            MemberChange::Add { id, addr } => {
                if !raft::Voters::valid_id(*id) {
                    return Err(invalid(format!(
                        "replica id {id} is out of range: ids are 1 to {}",
                        raft::NODE_ID_MAX
                    )));
                }
                if addr.trim().is_empty() || addr.len() > 256 {
                    return Err(invalid(format!(
                        "replica {id} needs the address its API listens on (host:port)"
                    )));
                }
                match members.get(id) {
                    Some(a) if a == addr => return Ok(None),
                    Some(a) => {
                        return Err(invalid(format!(
                            "replica {id} is a member already, at {a}: remove it first to move it"
                        )))
                    }
                    None => {}
                }
                members.insert(*id, addr.clone());
            }
            MemberChange::Remove { id } => {
                if members.remove(id).is_none() {
                    return Ok(None);
                }
            }
        }
        if let Some((id, _)) = members.iter().find(|(_, a)| a.is_empty()) {
            return Err(invalid(format!(
                "the address of replica {id} is unknown here: start this replica with --peer {id}=ADDR"
            )));
        }
        if !crate::event::members_valid(&members) {
            return Err(invalid(format!(
                "a control plane has 1 to {} replicas",
                raft::VOTERS_MAX
            )));
        }
        Ok(Some(members))
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
        let pending = self.submits_unapplied.len() as u64;
        let job = Job {
            id: JobId(self.state.jobs.next_id().0 + pending),
            spec: spec.clone(),
            state: crate::model::JobState::Queued,
            idempotency_key: idempotency_key.clone(),
            submitted_at: now,
            retries_used: 0,
            attempts: Vec::new(),
            seq: self.raft.last_index() + 1,
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
        match self.phase {
            Lifecycle::Running if self.leading => {}
            Lifecycle::Running => {
                return Err(CommandError::NotLeader {
                    leader: self.raft.leader().filter(|&l| l != self.config.id),
                })
            }
            Lifecycle::Stopping | Lifecycle::Stopped => return Err(CommandError::Stopping),
            _ => return Err(CommandError::NotLeader { leader: None }),
        }
        if self.origins.len() >= self.config.proposals_inflight_max {
            return Err(CommandError::Overloaded);
        }
        match command {
            Command::ChangeMembers(_) => unreachable!("membership changes are checked apart"),
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
        if self.leading {
            // A leader that was paused may have lost its quorum meanwhile:
            // CheckQuorum runs before it grants anyone a lease.
            self.raft_tick(now, mono);
            self.process(now);
        }
        if !(self.leading && self.phase == Lifecycle::Running) {
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
        self.process(now);
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

    /// The driver made every [`PersistUnit`] up to id `unit` durable.
    pub fn handle_persisted(&mut self, now: TimestampMs, unit: u64) {
        assert!(
            unit <= self.units_issued,
            "persisted a unit never handed out"
        );
        self.units_persisted = self.units_persisted.max(unit);
        while let Some(&(id, last)) = self.units_pending.front() {
            if id > self.units_persisted {
                break;
            }
            self.units_pending.pop_front();
            if let Some((index, term)) = last {
                self.raft.persisted(index, term);
            }
        }
        self.release_held();
        self.process(now);
    }

    /// A linearizable read (ReadIndex): answered with
    /// [`Output::ReadReady`] once this replica has confirmed that it still
    /// leads and has applied every write committed before now; then
    /// [`Replica::state`] may be read for it. Not leading: refused at once
    /// with [`CommandError::NotLeader`].
    pub fn read(&mut self, now: TimestampMs, request: RequestId) {
        let leader = self.raft.leader().filter(|&l| l != self.config.id);
        if !self.leading && planted!(self.config.bugs, ReadFromFollower) {
            self.outputs.push_back(Output::ReadReady {
                request,
                result: Ok(()),
            });
            return;
        }
        if !(self.leading && self.phase == Lifecycle::Running) {
            self.outputs.push_back(Output::ReadReady {
                request,
                result: Err(CommandError::NotLeader { leader }),
            });
            return;
        }
        match self.raft.read_index(request) {
            Ok(()) => {
                self.reads_asked.insert(request);
            }
            Err(_) => self.outputs.push_back(Output::ReadReady {
                request,
                result: Err(CommandError::NotLeader { leader }),
            }),
        }
        self.process(now);
    }

    /// A message from another replica. `mono` is the monotonic clock.
    pub fn handle_peer(&mut self, now: TimestampMs, mono: u64, msg: PeerMessage) {
        if msg.to != self.config.id {
            return; // Misrouted: not ours to answer.
        }
        self.raft_tick(now, mono);
        self.raft.step(msg);
        self.process(now);
    }

    /// An InstallSnapshot message from the leader with the snapshot its
    /// driver attached (decoded from the bytes the leader stored). One whose
    /// state is not the state at the message's metadata is dropped, as is
    /// the message without its snapshot: the leader sends it again.
    pub fn handle_peer_snapshot(
        &mut self,
        now: TimestampMs,
        mono: u64,
        msg: PeerMessage,
        snapshot: Snapshot,
    ) {
        let raft::Body::InstallSnapshot { meta, .. } = msg.body else {
            return self.handle_peer(now, mono, msg);
        };
        if msg.to != self.config.id || snapshot.meta != meta || !snapshot.is_consistent() {
            return;
        }
        self.snapshot_received = Some(snapshot);
        self.handle_peer(now, mono, msg);
        // Installed by now, or not wanted.
        self.snapshot_received = None;
    }

    /// The driver stored the snapshot of an [`Output::Compact`] and dropped
    /// the stored entries up to it; Raft drops them from memory too, and
    /// sends a follower that needs them the snapshot instead.
    pub fn handle_compacted(&mut self, now: TimestampMs, meta: raft::SnapshotMeta) {
        if self.compacting == Some(meta.index) {
            self.compacting = None;
        }
        // A snapshot installed from the leader meanwhile is newer.
        if meta.index > self.raft.snapshot().index
            && self.raft.term_at(meta.index) == Some(meta.term)
        {
            self.raft.compact(meta.index);
        }
        self.process(now);
    }

    /// The driver could not store the snapshot of an [`Output::Compact`]:
    /// the log keeps its entries, and the next try comes after another
    /// [`Config::snapshot_entries`] entries.
    pub fn handle_compact_failed(&mut self, meta: raft::SnapshotMeta) {
        if self.compacting == Some(meta.index) {
            self.compacting = None;
            self.compact_after = meta.index;
        }
    }

    /// Entries read from storage for `peer`, answering an
    /// [`Output::LoadEntries`] (none if storage no longer has them).
    pub fn handle_entries_loaded(
        &mut self,
        now: TimestampMs,
        peer: ReplicaId,
        entries: Vec<Entry>,
    ) {
        self.raft
            .entries_loaded(peer, entries.into_iter().map(to_raft).collect());
        self.process(now);
    }

    /// Leadership goes to `to` (graceful shutdown of the leader): Raft
    /// brings it up to date and tells it to campaign. `false` if this
    /// replica does not lead or `to` is not a peer.
    pub fn transfer_leadership(&mut self, now: TimestampMs, to: ReplicaId) -> bool {
        let ok = self.raft.transfer_leadership(to).is_ok();
        self.process(now);
        ok
    }

    /// The peer that is most up to date, for a leadership transfer.
    pub fn best_transferee(&self) -> Option<ReplicaId> {
        self.config
            .voters
            .iter()
            .filter(|&&v| v != self.config.id)
            .filter_map(|&v| self.raft.progress(v).map(|(matched, _, _)| (matched, v)))
            .max_by_key(|&(matched, v)| (matched, std::cmp::Reverse(v)))
            .map(|(_, v)| v)
    }

    fn raft_tick(&mut self, now: TimestampMs, mono: u64) {
        self.raft_mono = self.raft_mono.max(mono);
        self.raft.set_stamp(self.next_stamp(now));
        self.raft.tick(self.raft_mono);
    }

    /// Periodic work; call every [`TICK_MS`] or so. `mono` is the
    /// monotonic clock: nodes silent for `down_after_ms` are declared down,
    /// and the attempts of a down or removed node are lost (and requeued)
    /// once its lease has provably lapsed.
    pub fn handle_tick(&mut self, now: TimestampMs, mono: u64) {
        if self.phase != Lifecycle::Initializing {
            self.raft_tick(now, mono);
            self.process(now);
        }
        if self.leading && self.phase == Lifecycle::Running {
            self.observe(mono);
            self.detect_failures(now, mono);
            self.expire_keys(now);
        }
        self.process(now);
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
        self.leading_since.get_or_insert(mono);
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
        // In a cluster, agents first have to find a new leader: they learn
        // of it from a follower or when their replica goes quiet, within
        // two heartbeats. Only then does the silence count.
        let grace_from = match self.leading_since {
            Some(since) if self.raft.voters().len() > 1 => since + 2 * lease.heartbeat_interval_ms,
            _ => 0,
        };
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
                    let heard = live.heard_mono.max(grace_from);
                    let silent = mono.saturating_sub(heard) >= lease.down_after_ms;
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
        self.outputs.pop_front()
    }

    // --- internals ---

    /// The stamp of the next entry this replica proposes: never below any
    /// stamp in its log.
    fn next_stamp(&self, now: TimestampMs) -> TimestampMs {
        if planted!(self.config.bugs, StampFollowsClock) {
            now
        } else {
            self.max_at.max(now)
        }
    }

    fn append(&mut self, now: TimestampMs, event: Event, origin: Origin) {
        let at = self.next_stamp(now);
        let record = Record {
            at,
            event: event.clone(),
        };
        match self.raft.propose(record) {
            Ok(index) => {
                self.max_at = at;
                if matches!(event, Event::JobSubmitted { .. }) {
                    self.submits_unapplied.insert(index);
                }
                self.origins.insert(index, (self.raft.term(), origin));
            }
            Err(e) => {
                let error = match e {
                    ProposeError::Overloaded => CommandError::Overloaded,
                    _ => CommandError::NotLeader {
                        leader: self.raft.leader().filter(|&l| l != self.config.id),
                    },
                };
                self.abandon(&event, origin, error);
            }
        }
    }

    /// An entry proposed for `origin` will never be applied as such: its
    /// bookkeeping is undone and a waiting command fails with `error`.
    fn abandon(&mut self, event: &Event, origin: Origin, error: CommandError) {
        let entry = Entry {
            index: 0,
            term: 0,
            at: 0,
            event: event.clone(),
        };
        self.settle_proposal(&entry);
        match origin {
            Origin::Command(request) => self.reply(request, Err(error)),
            Origin::Placement => {
                self.placements_inflight -= 1;
                self.full_pass_needed = true;
            }
            _ => {}
        }
    }

    fn reply(&mut self, request: RequestId, result: Result<Reply, CommandError>) {
        self.outputs.push_back(Output::Reply { request, result });
    }

    /// Hands Raft's outputs to the driver and applies what is committed,
    /// until neither Raft nor the scheduler has more to do.
    fn process(&mut self, now: TimestampMs) {
        loop {
            if self.raft.has_ready() {
                self.raft.set_stamp(self.next_stamp(now));
                let ready = self.raft.ready();
                self.take_ready(ready);
                continue;
            }
            let before = self.raft.last_index();
            self.maybe_schedule(now);
            if self.raft.last_index() == before && !self.raft.has_ready() {
                break;
            }
        }
        self.maybe_compact();
    }

    fn take_ready(&mut self, ready: raft::Ready<Record>) {
        let mut installing = None;
        if let Some(meta) = ready.restore {
            let snapshot = self
                .snapshot_received
                .take()
                .filter(|s| s.meta == meta)
                .expect("Raft installs only the snapshot that came with its message");
            self.restore(&snapshot);
            installing = Some(snapshot);
        }
        if let Some(persist) = ready.persist {
            assert_eq!(
                persist.snapshot,
                installing.as_ref().map(|s| s.meta),
                "a snapshot is stored as it is restored"
            );
            self.persist(persist, installing);
        }
        let wait = if planted!(self.config.bugs, VoteWithoutPersist) {
            0
        } else {
            self.units_issued
        };
        for msg in ready.messages {
            if msg.body.is_from_leader() && self.held.is_empty() {
                // A leader's appends promise nothing about its own disk:
                // they go out while it writes the same entries (Raft
                // thesis §10.2.1), so its fsync and the followers' overlap.
                // It counts itself towards a commit only once they are
                // durable (`raft.persisted`).
                self.outputs.push_back(Output::Send(msg));
            } else {
                self.held.push_back((wait, msg));
            }
        }
        self.release_held();
        for entry in ready.committed {
            self.apply_committed(from_raft(entry));
        }
        for need in ready.need_entries {
            self.outputs.push_back(Output::LoadEntries(need));
        }
        for read in ready.reads {
            if self.reads_asked.remove(&read.ctx) {
                self.reads_confirmed.push_back((read.index, read.ctx));
            }
        }
        self.release_reads();
        if let Some(voters) = ready.voters {
            let members = voters
                .iter()
                .map(|id| (id, self.addrs.get(&id).cloned()))
                .collect();
            self.outputs.push_back(Output::Members(members));
        }
        if let Some(status) = ready.status {
            if status.leader != self.leader_seen {
                if status.leader.is_some() {
                    self.leader_changes += 1;
                }
                self.leader_seen = status.leader;
            }
            if status.role != Role::Leader && (self.leading || !self.origins.is_empty()) {
                self.step_down(status.leader);
            }
        }
    }

    /// Turns Raft's persist request into a unit for the driver. A change of
    /// the commit index alone needs no fsync: it rides with the next unit.
    fn persist(&mut self, persist: raft::Persist<Record>, snapshot: Option<Snapshot>) {
        let hard_state = persist.hard_state.or(self.deferred_hard_state);
        let commit_only = snapshot.is_none()
            && persist.entries.is_empty()
            && persist.truncate_from.is_none()
            && hard_state.is_some_and(|h| {
                h.term == self.hard_state_out.term && h.vote == self.hard_state_out.vote
            });
        if commit_only {
            self.deferred_hard_state = hard_state;
            return;
        }
        self.deferred_hard_state = None;
        let last = persist.last();
        let entries: Vec<Entry> = persist.entries.into_iter().map(from_raft).collect();
        for e in &entries {
            if let Event::MembersChanged { members } = &e.event {
                self.addrs
                    .extend(members.iter().map(|(id, a)| (*id, a.clone())));
            }
        }
        if let Some(max) = entries.iter().map(|e| e.at).max() {
            self.max_at = self.max_at.max(max);
        }
        if let Some(h) = hard_state {
            self.hard_state_out = h;
        }
        self.units_issued += 1;
        self.units_pending.push_back((self.units_issued, last));
        self.outputs.push_back(Output::Persist(PersistUnit {
            id: self.units_issued,
            snapshot,
            truncate_from: persist.truncate_from,
            entries,
            hard_state,
        }));
    }

    /// Replaces the state with a snapshot's (a follower far behind the
    /// leader). A follower owes nothing as leader, so only the state and
    /// what follows it change.
    fn restore(&mut self, snapshot: &Snapshot) {
        assert!(
            !self.leading && self.origins.is_empty(),
            "a leader restores nothing"
        );
        let mut state = State::clone(&snapshot.state);
        state.bugs = self.config.bugs;
        if state.sched.is_suspended() {
            state.rebuild_indexes();
        }
        self.max_at = self.max_at.max(state.last_at);
        self.addrs
            .extend(state.members.iter().map(|(id, a)| (*id, a.clone())));
        self.state = state;
        self.snapshots_installed += 1;
        // A compaction of the old log is moot: the install replaced it.
        self.compacting = None;
        // Reads wait for an applied index; it only grew.
        self.release_reads();
    }

    /// Once enough entries were applied since the last snapshot, hands the
    /// driver a snapshot of the state to store and compact the log behind.
    fn maybe_compact(&mut self) {
        let every = self.config.snapshot_entries;
        let applied = self.state.applied_index;
        if every == 0
            || self.compacting.is_some()
            || applied < self.raft.snapshot().index.max(self.compact_after) + every
            || self.phase != Lifecycle::Running
        {
            return;
        }
        let meta = raft::SnapshotMeta {
            index: applied,
            term: self.state.applied_term,
        };
        debug_assert_eq!(self.raft.term_at(applied), Some(meta.term));
        self.compacting = Some(applied);
        self.outputs.push_back(Output::Compact(meta));
    }

    /// Sends the messages whose units are durable.
    fn release_held(&mut self) {
        while self
            .held
            .front()
            .is_some_and(|(wait, _)| *wait <= self.units_persisted)
        {
            let (_, msg) = self.held.pop_front().expect("front exists");
            self.outputs.push_back(Output::Send(msg));
        }
    }

    /// Answers the confirmed reads whose index is applied.
    fn release_reads(&mut self) {
        while let Some(&(index, request)) = self.reads_confirmed.front() {
            if index > self.state.applied_index {
                break;
            }
            self.reads_confirmed.pop_front();
            self.outputs.push_back(Output::ReadReady {
                request,
                result: Ok(()),
            });
        }
    }

    /// This replica no longer leads: what it owed as leader is dropped.
    fn step_down(&mut self, leader: Option<ReplicaId>) {
        self.leading = false;
        let leader = leader.filter(|&l| l != self.config.id);
        let reads = std::mem::take(&mut self.reads_asked).into_iter().chain(
            std::mem::take(&mut self.reads_confirmed)
                .into_iter()
                .map(|(_, r)| r),
        );
        for request in reads.collect::<Vec<_>>() {
            self.outputs.push_back(Output::ReadReady {
                request,
                result: Err(CommandError::NotLeader { leader }),
            });
        }
        for (_, (_, origin)) in std::mem::take(&mut self.origins) {
            if let Origin::Command(request) = origin {
                self.reply(request, Err(CommandError::LeadershipLost { leader }));
            }
        }
        self.submits_unapplied.clear();
        self.placements_inflight = 0;
        self.new_jobs.clear();
        self.full_pass_needed = true;
        self.liveness.clear();
        self.mono = None;
        self.leading_since = None;
        self.registering.clear();
        self.downing.clear();
        self.losing.clear();
        self.reporting.clear();
        self.expiring_keys = false;
    }

    fn apply_committed(&mut self, entry: Entry) {
        self.submits_unapplied.remove(&entry.index);
        let origin = match self.origins.remove(&entry.index) {
            Some((term, origin)) if term == entry.term => Some(origin),
            Some((_, origin)) => {
                // Another leader's entry replaced ours at this index.
                let leader = self.raft.leader().filter(|&l| l != self.config.id);
                self.abandon(&entry.event, origin, CommandError::NotLeader { leader });
                None
            }
            None => None,
        };
        let applied = self.state.apply(&entry);
        if !self.leading {
            let own_first = matches!(entry.event, Event::LeaderElected { replica, term }
                if replica == self.config.id && term == self.raft.term());
            if own_first && self.raft.role() == Role::Leader {
                // Everything committed before this leader's term is applied.
                self.leading = true;
                self.full_pass_needed = true;
            }
            return;
        }
        self.settle_proposal(&entry);
        self.after_apply(&entry, origin.unwrap_or(Origin::Internal), applied);
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
            (Event::MembersChanged { members }, Applied::Done) => {
                Ok(Reply::Members(members.clone()))
            }
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
        if self.placements_inflight > 0 || !self.leading || self.phase != Lifecycle::Running {
            return;
        }
        if !self.full_pass_needed && self.new_jobs.is_empty() {
            return;
        }
        let bounds = self.config.pass_bounds;
        self.scheduler_passes += 1;
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
        Command::ChangeMembers(_) => {
            unreachable!("membership changes append through Raft's propose_change")
        }
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
