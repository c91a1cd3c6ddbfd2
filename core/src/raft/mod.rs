//! Raft consensus as a sans-IO state machine: the piece that decides which
//! entries of the replicated log are committed.
//!
//! It does no IO, reads no clock and draws randomness only from a generator
//! seeded by [`Config::seed`], so a simulator seed replays exactly.
//! [`crate::replica`] runs on it.
//!
//! What it implements (references are to the Raft paper, "In Search of an
//! Understandable Consensus Algorithm", and Ongaro's thesis):
//! - elections with randomized timeouts in `[election, 2 * election)`
//!   (§5.2), PreVote (thesis §9.6) and CheckQuorum (thesis §6.2): a leader
//!   that has not heard from a quorum for an election timeout steps down,
//!   and reports `degraded` once some follower was silent half as long;
//! - replication with batching (`append_entries_max`, `append_bytes_max`)
//!   and pipelining (probe, then up to `inflight_appends_max` optimistic
//!   appends per follower), with the conflict hint of §5.3 so a lagging
//!   follower is found in one round trip per term, not per entry;
//! - commit of current-term entries only (§5.4.2); a new leader's first
//!   entry is [`Payload::leader_elected`] of its term;
//! - leadership transfer ([`Raft::transfer_leadership`], `TimeoutNow`);
//! - log compaction behind a snapshot of the application's state
//!   ([`Raft::compact`]) and InstallSnapshot for a follower that needs
//!   compacted entries (§7). Raft handles only a snapshot's metadata; its
//!   bytes travel between drivers beside the message;
//! - membership changes one voter at a time (thesis §4.1-4.4), so an
//!   operator replaces a dead replica by removing it, then adding a new one
//!   (see "Membership" below).
//!
//! Not yet: sending a snapshot in chunks; non-voting members (a new voter
//! counts for the quorum while it catches up, thesis §4.2.1).
//!
//! # Inputs
//!
//! [`Raft::new`] (from what storage holds), [`Raft::tick`] (monotonic
//! milliseconds; timers advance only here), [`Raft::step`] (a message from a
//! peer), [`Raft::propose`], [`Raft::propose_change`], [`Raft::persisted`],
//! [`Raft::entries_loaded`], [`Raft::compact`],
//! [`Raft::transfer_leadership`]. Between ticks, inputs see the time of the
//! last tick.
//!
//! # Driver contract
//!
//! After each batch of inputs the driver calls [`Raft::ready`] and acts on
//! the [`Ready`] it returns, in this order (there is no separate "advance":
//! what `ready` returns counts as handed over). It MUST:
//! 1. make `persist` durable as ONE atomic unit (install `snapshot`, which
//!    replaces the whole stored log, then truncate storage's log from
//!    `truncate_from`, append `entries`, store `hard_state`), units in the
//!    order they were returned, and then call [`Raft::persisted`] with
//!    [`Persist::last`] (when there is one). A notice about entries that
//!    were truncated meanwhile is recognised as late and ignored;
//! 2. send `messages` only once that unit and every earlier one is durable:
//!    a granted vote or an append acknowledgement promises what the disk
//!    holds, and a crash must not take it back. Messages may be lost,
//!    duplicated or reordered; Raft tolerates that;
//! 3. if `restore` is set, replace the application's state with that
//!    snapshot's; then apply `committed` entries in order, each once. They
//!    are committed and already durable on this node; the driver never
//!    applies anything else;
//! 4. answer every `need_entries` from storage with
//!    [`Raft::entries_loaded`] (synchronously or later; the leader sends
//!    nothing more to that follower until then), with no entries if storage
//!    compacted them meanwhile;
//! 5. report `status` (role, term, leader, `degraded`) to whoever cares,
//!    and follow `voters` (the configuration in effect): send to a new
//!    voter, stop sending to a removed one.
//!
//! Snapshots: when the driver has stored a snapshot of the application's
//! state at an applied index, it calls [`Raft::compact`] and may then drop
//! the stored entries up to it. When it sends a
//! [`Body::InstallSnapshot`] it attaches the stored snapshot with that
//! metadata (or drops the message if storage moved on); when it receives
//! one, it keeps the bytes until the persist unit that installs them (and
//! drops them if the next [`Ready`] does not).
//!
//! On restart the driver has restored its snapshot and applied exactly the
//! entries after it up to the stored commit index, and builds the node with
//! [`Recovered`], which names the configurations it went through
//! ([`Recovered::voters`]: the snapshot's, then each committed change).
//!
//! # Membership
//!
//! An entry whose [`Payload::voters_change`] is `Some(voters)` makes the
//! group exactly those voters. Every node uses the configuration of the
//! latest change entry in its log, committed or not, from the moment the
//! entry is appended (thesis §4.1); a truncation that removes it reverts to
//! the one before, and an installed snapshot brings the configuration at
//! its index ([`Body::InstallSnapshot`] carries it). Because a change adds
//! or removes one voter, any majority of the old voters overlaps any
//! majority of the new, so the switch needs no joint phase.
//!
//! Rules:
//! - a leader appends a change only through [`Raft::propose_change`], which
//!   refuses ([`ChangeError`]) at a follower, during a transfer, while an
//!   earlier change is uncommitted, before the leader committed an entry of
//!   its own term (Ongaro, raft-dev 2015), and a change of other than one
//!   voter or to an empty group or one above [`VOTERS_MAX`];
//! - votes, commit, CheckQuorum, ReadIndex and transfer count the voters in
//!   effect. The leader tracks exactly them: a new one from a probe after
//!   its log (it then gets entries from storage or the snapshot), a removed
//!   one is forgotten;
//! - a leader that removes itself keeps leading without counting itself
//!   until the change is committed, then steps down and sends `TimeoutNow`
//!   to an up-to-date voter;
//! - a node outside its configuration never campaigns. It still follows a
//!   leader and grants votes (thesis §4.1): its log may lack the change
//!   that made the sender a voter. Answers count only from voters in
//!   effect, and keeping another cluster's nodes out is the transport's job.
//!
//! The driver:
//! - starts a new member with an empty log and [`Config::voters`] set to
//!   the configuration that adds it (never alone, so it never elects
//!   itself), proposes the change at the leader, and knows every voter's
//!   address (the change entry can carry it);
//! - keeps the configuration in its application state (applying each
//!   committed change entry), so a snapshot holds the one at its index and
//!   a restart can fill [`Recovered::voters`];
//! - takes messages from any node of its cluster, not only from the voters
//!   it was started with.

mod log;
pub mod msg;
mod progress;
pub mod ready;

mod election;
mod replication;

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

pub use log::term_runs;
pub use msg::{
    Body, Entry, HardState, LogIndex, Message, NodeId, Payload, RejectHint, SnapshotMeta, Term,
    Voters, VotersIter, NODE_ID_MAX,
};
pub use progress::ReplicationState;
pub use ready::{NeedEntries, Persist, ReadState, Ready, Role, Status};

use log::Log;
use progress::Progress;

/// Most voters a group may have (7 tolerates 3 failures; more only slows
/// every commit down).
pub const VOTERS_MAX: usize = 7;
/// Messages a node may queue between two calls of [`Raft::ready`]; a driver
/// that stops draining is a bug, and this makes it loud.
pub const MESSAGES_PENDING_MAX: usize = 1 << 16;

pub const ELECTION_TIMEOUT_MS_DEFAULT: u64 = 300;
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 50;
pub const APPEND_ENTRIES_MAX_DEFAULT: usize = 256;
pub const APPEND_BYTES_MAX_DEFAULT: u64 = 1 << 20;
pub const INFLIGHT_APPENDS_MAX_DEFAULT: usize = 64;
pub const UNCOMMITTED_ENTRIES_MAX_DEFAULT: u64 = 1 << 16;
pub const CACHE_ENTRIES_MAX_DEFAULT: usize = 1 << 14;
pub const APPLY_ENTRIES_MAX_DEFAULT: usize = 1 << 12;

// A heartbeat must fit several times in an election timeout, or followers
// campaign against a healthy leader.
const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT * 4 <= ELECTION_TIMEOUT_MS_DEFAULT);
const _: () = assert!(APPEND_ENTRIES_MAX_DEFAULT as u64 <= UNCOMMITTED_ENTRIES_MAX_DEFAULT);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub id: NodeId,
    /// The bootstrap configuration: the voters before the first change
    /// entry, for a log that holds none and a [`Recovered`] that names
    /// none. A new member starts with the configuration that adds it.
    pub voters: Voters,
    /// Base election timeout; each wait is drawn from `[t, 2t)`.
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Entries per append message (at least one is always sent).
    pub append_entries_max: usize,
    /// Payload bytes per append message, by [`Payload::size_bytes`].
    pub append_bytes_max: u64,
    /// Appends in flight per follower in the replicate state.
    pub inflight_appends_max: usize,
    /// A leader refuses proposals ([`ProposeError::Overloaded`]) while this
    /// many entries wait for commit.
    pub uncommitted_entries_max: u64,
    /// Durable, applied entries kept in memory for followers; older ones are
    /// read back from storage ([`Ready::need_entries`]).
    pub cache_entries_max: usize,
    /// Committed entries handed out per [`Ready`].
    pub apply_entries_max: usize,
    /// Seeds the election timeout draws.
    pub seed: u64,
    /// SIM-BUGS: the planted bug selected by the simulator (none by default).
    pub bugs: crate::bugs::BugSet,
}

impl Config {
    pub fn new(id: NodeId, voters: impl IntoIterator<Item = NodeId>, seed: u64) -> Config {
        Config {
            id,
            voters: voters.into_iter().collect(),
            election_timeout_ms: ELECTION_TIMEOUT_MS_DEFAULT,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS_DEFAULT,
            pre_vote: true,
            check_quorum: true,
            append_entries_max: APPEND_ENTRIES_MAX_DEFAULT,
            append_bytes_max: APPEND_BYTES_MAX_DEFAULT,
            inflight_appends_max: INFLIGHT_APPENDS_MAX_DEFAULT,
            uncommitted_entries_max: UNCOMMITTED_ENTRIES_MAX_DEFAULT,
            cache_entries_max: CACHE_ENTRIES_MAX_DEFAULT,
            apply_entries_max: APPLY_ENTRIES_MAX_DEFAULT,
            seed,
            bugs: crate::bugs::BugSet::default(),
        }
    }

    fn validate(&self) {
        // A node may be outside its configuration (it was removed); its
        // id must still be one a configuration can hold.
        assert!(Voters::valid_id(self.id), "node ids are 1..={NODE_ID_MAX}");
        assert!(!self.voters.is_empty(), "a group has a voter");
        assert!(self.voters.len() <= VOTERS_MAX);
        assert!(self.heartbeat_interval_ms > 0);
        assert!(self.heartbeat_interval_ms < self.election_timeout_ms);
        assert!(self.append_entries_max > 0 && self.append_bytes_max > 0);
        assert!(self.inflight_appends_max > 0);
        assert!(self.uncommitted_entries_max > 0);
        assert!(self.apply_entries_max > 0);
    }
}

/// What storage holds when a node starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovered<T> {
    pub hard_state: HardState,
    /// The stored snapshot (`0, 0` if none); the log starts after it.
    pub snapshot: SnapshotMeta,
    /// `(first index, term)` of each run of equal terms in the stored log
    /// after the snapshot (see [`term_runs`]).
    pub runs: Vec<(LogIndex, Term)>,
    pub last_index: LogIndex,
    /// Every stored entry after the commit index (entries at or before it
    /// are ignored).
    pub tail: Vec<Entry<T>>,
    /// The configurations the committed log went through, as the driver
    /// knows them from its snapshot and its replay up to the commit index:
    /// `(index, voters)` in ascending index order, at least the voters in
    /// effect at the snapshot (with the snapshot's index) and then each
    /// committed change entry after it (its index and
    /// [`Payload::voters_change`]). Earlier ones are allowed and ignored;
    /// empty means no change ever: [`Config::voters`] holds. Change
    /// entries in `tail` are found by Raft itself.
    pub voters: Vec<(LogIndex, Voters)>,
}

impl<T: Payload> Recovered<T> {
    /// A node that never ran.
    pub fn empty() -> Recovered<T> {
        Recovered {
            hard_state: HardState::default(),
            snapshot: SnapshotMeta::default(),
            runs: Vec::new(),
            last_index: 0,
            tail: Vec::new(),
            voters: Vec::new(),
        }
    }

    /// From a whole stored log (index 1 first); tests and small logs.
    pub fn from_log(hard_state: HardState, log: &[Entry<T>]) -> Recovered<T> {
        Recovered::from_snapshot(hard_state, SnapshotMeta::default(), log)
    }

    /// From a snapshot and every stored entry after it; the configurations
    /// are the committed change entries in `log` (add the snapshot's with
    /// [`Recovered::with_snapshot_voters`] if it had one).
    pub fn from_snapshot(
        hard_state: HardState,
        snapshot: SnapshotMeta,
        log: &[Entry<T>],
    ) -> Recovered<T> {
        let (runs, last_index) = term_runs(snapshot, log.iter().map(|e| (e.index, e.term)));
        let commit = hard_state.commit.max(snapshot.index);
        let tail = log.iter().filter(|e| e.index > commit).cloned().collect();
        let voters = log
            .iter()
            .filter(|e| e.index <= commit)
            .filter_map(|e| e.data.voters_change().map(|v| (e.index, v)))
            .collect();
        Recovered {
            hard_state,
            snapshot,
            runs,
            last_index,
            tail,
            voters,
        }
    }

    /// The configuration in effect at the snapshot.
    pub fn with_snapshot_voters(mut self, voters: Voters) -> Recovered<T> {
        self.voters.insert(0, (self.snapshot.index, voters));
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("leadership is being handed to {to}")]
    Transferring { to: NodeId },
    #[error("too many entries wait for commit")]
    Overloaded,
}

/// Why [`Raft::propose_change`] refused a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("leadership is being handed to {to}")]
    Transferring { to: NodeId },
    #[error("the entry changes no voters")]
    NotAChange,
    #[error("the change at index {index} is not committed yet")]
    ChangePending { index: LogIndex },
    #[error("the leader has not committed an entry of its term yet")]
    NoCommitInTerm,
    #[error("a change adds or removes exactly one voter, not {from:?} to {to:?}")]
    NotOneVoter { from: Voters, to: Voters },
    #[error("a group needs a voter")]
    NoVoters,
    #[error("a group has at most {VOTERS_MAX} voters")]
    TooManyVoters,
    #[error("too many entries wait for commit")]
    Overloaded,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("{0} is not another voter")]
    NotAPeer(NodeId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader (leader: {leader_hint:?})")]
    NotLeader { leader_hint: Option<NodeId> },
    #[error("the leader has not committed an entry of its term yet")]
    NoCommitInTerm,
}

/// One Raft node. See the module doc for its driver contract.
#[derive(Clone, Debug)]
pub struct Raft<T> {
    config: Config,
    rng: ChaCha8Rng,
    term: Term,
    /// Whom this node voted for in `term` (durable before any vote is sent).
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: Log<T>,
    /// The hard state last handed to the driver: a unit carries it only
    /// when it changed.
    hard_state_handed: HardState,
    /// Monotonic time of the last tick.
    now_ms: u64,
    /// When the election timer was last reset, and the drawn timeout.
    election_reset_ms: u64,
    election_timeout_ms: u64,
    /// A leader's next heartbeat.
    heartbeat_due_ms: u64,
    /// When this node last heard from its leader (or, as the leader, from a
    /// quorum): while that is within an election timeout, CheckQuorum has a
    /// follower ignore vote requests (the leader's lease).
    leader_heard_ms: u64,
    /// Votes (or pre-votes) received in the current campaign.
    votes: BTreeMap<NodeId, bool>,
    /// A leader's view of each follower.
    progress: BTreeMap<NodeId, Progress>,
    /// See [`Status::degraded`].
    degraded: bool,
    /// Leadership is being handed to this voter until this deadline; the
    /// leader takes no proposals meanwhile.
    transfer: Option<(NodeId, u64)>,
    messages: Vec<Message<T>>,
    need_entries: Vec<NeedEntries>,
    /// The status last reported in a [`Ready`].
    status_reported: Option<Status>,
    /// Handed to [`Payload::leader_elected`]; see [`Raft::set_stamp`].
    stamp: u64,
    /// A leader's heartbeat broadcasts so far (see `Body::Heartbeat`).
    heartbeat_round: u64,
    /// Reads waiting for a quorum to answer heartbeat round `round`, in
    /// the order they came (their rounds ascend).
    reads_pending: std::collections::VecDeque<ReadPending>,
    /// Reads whose leadership check passed, for the next [`Ready`].
    reads_ready: Vec<ReadState>,
    /// The configurations of the log: the one in effect at the base
    /// (snapshot) with the base's index, then `(index, voters)` of each
    /// change entry after it, ascending. The last is in effect (thesis
    /// §4.1: the latest in the log, committed or not).
    configs: Vec<(LogIndex, Voters)>,
    /// The voters last reported in a [`Ready`].
    voters_reported: Option<Voters>,
}

#[derive(Clone, Copy, Debug)]
struct ReadPending {
    ctx: u64,
    index: LogIndex,
    round: u64,
}

impl<T: Payload> Raft<T> {
    /// A node that starts (or restarts) as a follower from what its storage
    /// holds, at monotonic time `now_ms`.
    pub fn new(config: Config, recovered: Recovered<T>, now_ms: u64) -> Raft<T> {
        config.validate();
        let hs = recovered.hard_state;
        if let Some(v) = hs.vote {
            assert!(Voters::valid_id(v), "voted for node {v}");
        }
        // A snapshot may be durable before the hard state that commits it.
        let commit = hs.commit.max(recovered.snapshot.index);
        let tail: Vec<Entry<T>> = recovered
            .tail
            .into_iter()
            .filter(|e| e.index > commit)
            .collect();
        let base = recovered.snapshot.index;
        let mut configs = vec![(base, config.voters)];
        let mut prev = None;
        for (index, voters) in recovered.voters {
            assert!(
                index <= commit,
                "a recovered configuration is of the committed log"
            );
            assert!(
                prev.is_none_or(|p| index > p),
                "recovered configurations ascend"
            );
            prev = Some(index);
            if index <= base {
                configs[0].1 = voters;
            } else {
                configs.push((index, voters));
            }
        }
        configs.extend(
            tail.iter()
                .filter_map(|e| e.data.voters_change().map(|v| (e.index, v))),
        );
        let log = Log::recover(
            recovered.snapshot,
            recovered.runs,
            recovered.last_index,
            commit,
            tail,
            config.cache_entries_max,
        );
        assert!(
            log.last_term() <= hs.term,
            "the log holds a term from the future"
        );
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut raft = Raft {
            config,
            rng,
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader: None,
            log,
            hard_state_handed: hs,
            now_ms,
            election_reset_ms: now_ms,
            election_timeout_ms: 0,
            heartbeat_due_ms: now_ms,
            leader_heard_ms: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            degraded: false,
            transfer: None,
            messages: Vec::new(),
            need_entries: Vec::new(),
            status_reported: None,
            stamp: 0,
            heartbeat_round: 0,
            reads_pending: std::collections::VecDeque::new(),
            reads_ready: Vec::new(),
            configs,
            voters_reported: None,
        };
        raft.reset_election_timer();
        raft
    }

    // ---- getters ----

    pub fn id(&self) -> NodeId {
        self.config.id
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    pub fn degraded(&self) -> bool {
        self.degraded
    }
    /// The configuration in effect: the voters of the latest change entry
    /// in the log, committed or not (the recovered or bootstrap one if the
    /// log holds none).
    pub fn voters(&self) -> Voters {
        self.configs.last().expect("a configuration").1
    }
    /// The configuration of the latest committed change (as far as this
    /// node knows the commit index).
    pub fn voters_committed(&self) -> Voters {
        self.voters_at(self.log.committed)
    }
    /// Whether this node is one of the voters in effect.
    pub fn is_voter(&self) -> bool {
        self.voters().contains(self.config.id)
    }
    pub fn commit_index(&self) -> LogIndex {
        self.log.committed
    }
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }
    pub fn last_term(&self) -> Term {
        self.log.last_term()
    }
    /// The latest snapshot's metadata (`0, 0` if none).
    pub fn snapshot(&self) -> SnapshotMeta {
        self.log.base()
    }
    /// The term of the entry at `index` (0 at 0, `None` past the end or
    /// before the snapshot).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }
    /// The election timeout currently drawn (for tests of its randomness).
    pub fn election_timeout_drawn_ms(&self) -> u64 {
        self.election_timeout_ms
    }
    /// The leader's view of a follower: `(match, next, state)`.
    pub fn progress(&self, peer: NodeId) -> Option<(LogIndex, LogIndex, ReplicationState)> {
        self.progress
            .get(&peer)
            .map(|p| (p.match_index, p.next_index, p.state))
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }
    pub fn status(&self) -> Status {
        Status {
            role: self.role,
            term: self.term,
            leader: self.leader,
            degraded: self.degraded,
        }
    }

    // ---- inputs ----

    /// Time passes (monotonic milliseconds, never decreasing).
    pub fn tick(&mut self, now_ms: u64) {
        assert!(now_ms >= self.now_ms, "monotonic time went back");
        self.now_ms = now_ms;
        if self.role == Role::Leader {
            self.tick_leader();
        } else if now_ms - self.election_reset_ms >= self.election_timeout_ms {
            // A node outside its configuration never campaigns.
            self.campaign(false);
        }
        self.check();
    }

    /// Campaigns now instead of when the election timer fires: a
    /// single-voter group elects itself at start-up without waiting out a
    /// timeout. A no-op for a leader and for a node that is not a voter.
    pub fn campaign_now(&mut self) {
        self.campaign(false);
        self.check();
    }

    /// An opaque value for [`Payload::leader_elected`] when this node next
    /// becomes leader (the replica passes the stamp its next entry would
    /// get). Raft itself never interprets it.
    pub fn set_stamp(&mut self, stamp: u64) {
        self.stamp = stamp;
    }

    /// A message from a peer; one addressed to another node is the
    /// driver's mistake and panics. Requests are processed whatever this
    /// node's configuration (thesis §4.1): a leader or a candidate this
    /// node's log does not know as a voter yet may well be one (a node
    /// whose log lacks the change that added it). Answers count only from
    /// the voters in effect; one from itself or from an id no voter can
    /// have is ignored. Keeping other clusters out is the transport's job.
    pub fn step(&mut self, msg: Message<T>) {
        assert_eq!(msg.to, self.config.id, "message for another node");
        if msg.from == self.config.id || !Voters::valid_id(msg.from) {
            return;
        }
        if self.step_term(&msg) {
            self.step_current(msg);
        }
        self.check();
    }

    /// Appends `data` to the log as the leader; it is committed once a
    /// quorum holds it (watch `Ready::committed` for its index).
    pub fn propose(&mut self, data: T) -> Result<LogIndex, ProposeError> {
        assert!(
            data.voters_change().is_none(),
            "a membership change goes through propose_change"
        );
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some((to, _)) = self.transfer {
            return Err(ProposeError::Transferring { to });
        }
        if self.log.last_index() - self.log.committed >= self.config.uncommitted_entries_max {
            return Err(ProposeError::Overloaded);
        }
        let index = self.log.push(self.term, data);
        self.broadcast_append(false);
        self.check();
        Ok(index)
    }

    /// As the leader, appends `data`, an entry whose
    /// [`Payload::voters_change`] adds or removes one voter (thesis §4.1:
    /// single-server changes). The new configuration takes effect at once,
    /// on every node as its log receives the entry, and is safe because any
    /// majority of the old voters overlaps any majority of the new. Refused
    /// while an earlier change is not committed, before the leader
    /// committed an entry of its own term (the bug in the thesis' first
    /// version, raft-dev 2015: a change of a deposed leader could be lost
    /// after another one was committed), during a leadership transfer, and
    /// for a group left empty or above [`VOTERS_MAX`]. A leader that
    /// removes itself keeps leading, not counting itself, until the change
    /// commits, then steps down.
    pub fn propose_change(&mut self, data: T) -> Result<LogIndex, ChangeError> {
        let Some(to) = data.voters_change() else {
            return Err(ChangeError::NotAChange);
        };
        if self.role != Role::Leader {
            return Err(ChangeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if let Some((to, _)) = self.transfer {
            return Err(ChangeError::Transferring { to });
        }
        let (latest, from) = *self.configs.last().expect("a configuration");
        if latest > self.log.committed {
            return Err(ChangeError::ChangePending { index: latest });
        }
        if self.log.term(self.log.committed) != Some(self.term) {
            return Err(ChangeError::NoCommitInTerm);
        }
        if from.symmetric_difference(to).len() != 1 {
            return Err(ChangeError::NotOneVoter { from, to });
        }
        if to.is_empty() {
            return Err(ChangeError::NoVoters);
        }
        if to.len() > VOTERS_MAX {
            return Err(ChangeError::TooManyVoters);
        }
        if self.log.last_index() - self.log.committed >= self.config.uncommitted_entries_max {
            return Err(ChangeError::Overloaded);
        }
        let index = self.log.push(self.term, data);
        self.configs.push((index, to));
        self.voters_changed(from);
        self.broadcast_append(false);
        // A smaller quorum may commit what waited (and a leader left alone
        // commits the change itself once it is durable).
        if self.maybe_commit() {
            self.committed_more();
        }
        self.check();
        Ok(index)
    }

    /// The driver made the log durable up to `(index, term)`.
    pub fn persisted(&mut self, index: LogIndex, term: Term) {
        if self.log.persisted(index, term) && self.role == Role::Leader && self.maybe_commit() {
            self.committed_more();
        }
        self.check();
    }

    /// Entries read from storage for `peer`, answering a
    /// [`NeedEntries`] (in index order, as asked).
    pub fn entries_loaded(&mut self, peer: NodeId, entries: Vec<Entry<T>>) {
        self.send_loaded(peer, entries);
        self.check();
    }

    /// The driver stored a snapshot of the application's state as of the
    /// applied entry `index` and drops the log up to it (§7). `index` must
    /// be applied, durable and past the current snapshot.
    pub fn compact(&mut self, index: LogIndex) {
        self.log.compact(index);
        let at = self.voters_at(index);
        self.configs.retain(|c| c.0 > index);
        self.configs.insert(0, (index, at));
        self.check();
    }

    /// A linearizable read (ReadIndex, thesis §6.4): as the leader, notes
    /// the commit index and confirms that it still leads by a heartbeat
    /// round sent after now, answered by a quorum; a later [`Ready`]
    /// carries `ReadState { ctx, index }` once it does, and the read may be
    /// served from any state that has applied `index`. Reads of one step
    /// share one round. A leader that has not committed an entry of its
    /// own term yet does not know the commit index and refuses, as does a
    /// follower; a leader that steps down drops its pending reads (the
    /// application fails them).
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ReadError> {
        if self.role != Role::Leader {
            return Err(ReadError::NotLeader {
                leader_hint: self.leader,
            });
        }
        let index = self.log.committed;
        if self.log.term(index) != Some(self.term) {
            return Err(ReadError::NoCommitInTerm);
        }
        if usize::from(self.is_voter()) >= self.voters().quorum() {
            self.reads_ready.push(ReadState { ctx, index });
        } else {
            self.reads_pending.push_back(ReadPending {
                ctx,
                index,
                round: self.heartbeat_round + 1,
            });
        }
        self.check();
        Ok(())
    }

    /// Moves the reads whose round a quorum answered to `reads_ready`.
    pub(crate) fn confirm_reads(&mut self) {
        while let Some(read) = self.reads_pending.front().copied() {
            let answered = usize::from(self.is_voter())
                + self
                    .progress
                    .values()
                    .filter(|p| p.acked_round >= read.round)
                    .count();
            if answered < self.voters().quorum() {
                break;
            }
            self.reads_pending.pop_front();
            self.reads_ready.push(ReadState {
                ctx: read.ctx,
                index: read.index,
            });
        }
    }

    /// As the leader, hands leadership to `to` (graceful shutdown): stops
    /// taking proposals, brings `to` up to date, then tells it to campaign.
    /// Abandoned after an election timeout.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if to == self.config.id || !self.voters().contains(to) {
            return Err(TransferError::NotAPeer(to));
        }
        self.transfer = Some((to, self.now_ms + self.config.election_timeout_ms));
        self.maybe_send_timeout_now(to);
        self.send_append(to, true);
        self.check();
        Ok(())
    }

    // ---- outputs ----

    /// Drains everything to do. See the driver contract.
    pub fn ready(&mut self) -> Ready<T> {
        // Reads that came since the last broadcast ask for one more: one
        // round confirms every read of the step.
        if self
            .reads_pending
            .back()
            .is_some_and(|r| r.round > self.heartbeat_round)
        {
            self.broadcast_heartbeat();
        }
        let hard_state = self.hard_state();
        let hard_changed = hard_state != self.hard_state_handed;
        let mut restore = None;
        let persist = if hard_changed || self.log.has_unstable() {
            let unstable = self.log.take_unstable();
            self.hard_state_handed = hard_state;
            restore = unstable.snapshot;
            Some(Persist {
                snapshot: unstable.snapshot,
                hard_state: hard_changed.then_some(hard_state),
                truncate_from: unstable.truncate_from,
                entries: unstable.entries,
            })
        } else {
            None
        };
        let status = self.status();
        let status_changed = self.status_reported != Some(status);
        self.status_reported = Some(status);
        let voters = self.voters();
        let voters_changed = self.voters_reported != Some(voters);
        self.voters_reported = Some(voters);
        let ready = Ready {
            persist,
            messages: std::mem::take(&mut self.messages),
            restore,
            committed: self.log.take_committed(self.config.apply_entries_max),
            need_entries: std::mem::take(&mut self.need_entries),
            status: status_changed.then_some(status),
            voters: voters_changed.then_some(voters),
            reads: std::mem::take(&mut self.reads_ready),
        };
        self.check();
        ready
    }

    /// Whether [`Raft::ready`] would return anything.
    pub fn has_ready(&self) -> bool {
        self.hard_state() != self.hard_state_handed
            || self.log.has_unstable()
            || !self.messages.is_empty()
            || self.log.has_committed()
            || !self.need_entries.is_empty()
            || !self.reads_ready.is_empty()
            || self
                .reads_pending
                .back()
                .is_some_and(|r| r.round > self.heartbeat_round)
            || self.status_reported != Some(self.status())
            || self.voters_reported != Some(self.voters())
    }

    // ---- shared internals ----

    fn send(&mut self, to: NodeId, term: Term, body: Body<T>) {
        assert!(
            self.messages.len() < MESSAGES_PENDING_MAX,
            "the driver stopped draining"
        );
        self.messages.push(Message {
            from: self.config.id,
            to,
            term,
            body,
        });
    }

    /// The voters in effect other than this node.
    fn peers(&self) -> Vec<NodeId> {
        self.voters()
            .iter()
            .filter(|&v| v != self.config.id)
            .collect()
    }

    /// The configuration in effect at `index` (at or after the base).
    fn voters_at(&self, index: LogIndex) -> Voters {
        assert!(index >= self.configs[0].0, "before the base");
        let at = self.configs.partition_point(|c| c.0 <= index);
        self.configs[at - 1].1
    }

    /// Drops the change entries from `from` on (a truncation); the
    /// configuration reverts to the latest one before it.
    fn configs_truncated(&mut self, from: LogIndex) {
        assert!(from > self.configs[0].0, "truncating into the base");
        self.configs.retain(|c| c.0 < from);
    }

    /// The configuration in effect may have changed from `before`: a
    /// leader tracks exactly the new voters (a new one from a probe after
    /// its log, a removed one forgotten), and a node outside the new
    /// configuration stops campaigning.
    fn voters_changed(&mut self, before: Voters) {
        let after = self.voters();
        if after == before {
            return;
        }
        match self.role {
            Role::Leader => {
                let (last, now) = (self.log.last_index(), self.now_ms);
                for peer in self.peers() {
                    self.progress
                        .entry(peer)
                        .or_insert_with(|| Progress::new(last, now));
                }
                self.progress.retain(|p, _| after.contains(*p));
                if self.transfer.is_some_and(|(to, _)| !after.contains(to)) {
                    self.transfer = None;
                }
            }
            Role::Candidate | Role::PreCandidate if !after.contains(self.config.id) => {
                self.become_follower(self.term, None);
            }
            // A campaign's tally counts the voters in effect.
            Role::Candidate | Role::PreCandidate => self.votes.retain(|v, _| after.contains(*v)),
            Role::Follower => {}
        }
    }

    /// The leader's commit index moved: followers learn it, and a leader
    /// that removed itself steps down once that change is committed
    /// (thesis §4.2.2), asking the most up-to-date voter to campaign at
    /// once rather than after an election timeout.
    fn committed_more(&mut self) {
        self.broadcast_append(true);
        let (index, _) = *self.configs.last().expect("a configuration");
        if self.is_voter() || self.log.committed < index {
            return;
        }
        let last = self.log.last_index();
        let heir = self
            .progress
            .iter()
            .find(|(_, p)| p.match_index == last)
            .map(|(&id, _)| id);
        if let Some(heir) = heir {
            self.send(heir, self.term, Body::TimeoutNow);
        }
        self.become_follower(self.term, None);
    }

    fn reset_election_timer(&mut self) {
        let base = self.config.election_timeout_ms;
        self.election_reset_ms = self.now_ms;
        self.election_timeout_ms = base + self.rng.next_u64() % base;
    }

    /// Becomes a follower of `term` (keeping the vote if the term is the
    /// same), with `leader` if known.
    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        assert!(term >= self.term);
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        if leader.is_some() {
            self.leader_heard_ms = self.now_ms;
        }
        // Reads were the leader's to confirm; the application fails them.
        self.reads_pending.clear();
        self.reads_ready.clear();
        self.votes.clear();
        self.progress.clear();
        self.transfer = None;
        self.degraded = false;
        self.reset_election_timer();
    }

    /// Invariants that hold after every input.
    fn check(&self) {
        self.log.check();
        assert!(self.log.last_term() <= self.term);
        // The configurations: the base's first, then change entries of
        // the log, ascending; never an empty or oversized group.
        assert_eq!(self.configs[0].0, self.log.base().index);
        assert!(self.configs.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(self
            .configs
            .last()
            .is_some_and(|c| c.0 <= self.log.last_index()));
        assert!(self
            .configs
            .iter()
            .all(|c| !c.1.is_empty() && c.1.len() <= VOTERS_MAX));
        let voters = self.voters();
        match self.role {
            Role::Leader => {
                assert_eq!(self.leader, Some(self.config.id));
                assert_eq!(self.vote, Some(self.config.id));
                // It tracks exactly the other voters in effect.
                assert!(self.progress.keys().copied().eq(self.peers()));
                // Outside its configuration only until its removal commits.
                assert!(
                    self.is_voter()
                        || self
                            .configs
                            .last()
                            .is_some_and(|c| c.0 > self.log.committed)
                );
            }
            Role::Candidate => {
                assert_eq!(self.vote, Some(self.config.id));
                assert!(self.leader.is_none());
                assert!(self.is_voter(), "a candidate is a voter");
            }
            Role::PreCandidate => {
                assert!(self.leader.is_none());
                assert!(self.is_voter(), "a candidate is a voter");
            }
            Role::Follower => assert!(self.progress.is_empty()),
        }
        assert!(self.votes.keys().all(|&v| voters.contains(v)));
    }
}
