//! The simulated world: one thread, virtual time, one RNG.
//!
//! It owns the replicas (the very `rustci_core::replica::Replica` the
//! production driver runs, 1, 3 or 5 of them, talking Raft to each other),
//! their disks, the runner nodes, the clients, the network between them and
//! every process's clock. Each step pops the earliest event, carries it out,
//! and runs the checkers on what it touched.
//!
//! The checker's ledger follows the replica that leads (it proposes,
//! places and talks to agents); when another one starts leading, the ledger
//! starts again from that one's log. Every applied entry of every replica
//! is compared with the one committed log (state machine safety), and no
//! term has two leaders (election safety).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use rustci_core::event::{Entry, Event, LogIndex, ReplicaId};
use rustci_core::model::{AttemptNumber, Job, JobId, JobSpec, Labels, Resources};
use rustci_core::protocol::{AgentMsg, LeaseConfig, ReportKind, ServerMsg};
use rustci_core::raft::{Body as PeerBody, HardState, Role, SnapshotMeta, Term};
use rustci_core::replica::{
    Command, CommandError, Config, MemberChange, Output, PeerMessage, PersistUnit, Recovery,
    Replica, Reply, RequestId, Snapshot, TICK_MS,
};
use rustci_core::state::{Fnv64, State};

use crate::checker::{inv, Check, Checker, PreApply, Violation};
use crate::nodes::NodeHost;
use crate::plan::{Bp, FaultPlan, SimRng};
use crate::SimOptions;

/// The share of client operations that are linearizable reads.
const READ_SHARE: Bp = Bp(3_000);

/// Wall-clock origin of every process (2023-11-14), so `at` stamps look real.
const EPOCH_MS: i64 = 1_700_000_000_000;
/// Steps between whole-state consistency checks.
const CONSISTENCY_EVERY_STEPS: u64 = 512;
/// How often the liveness phase tests for convergence (true ms).
const CONVERGE_CHECK_MS: u64 = 1_000;
/// A run that takes more steps than this is itself a failure (runaway
/// loop), unless [`SimOptions::steps_max`] says otherwise.
pub const STEPS_MAX: u64 = 20_000_000;
/// Longest replica or node downtime after a crash (ms).
pub(crate) const DOWNTIME_MS_MAX: u64 = 8_000;
/// Longest pause of a process (ms).
const PAUSE_MS_MAX: u64 = 5_000;
/// Longest partition (ms).
const PARTITION_MS_MAX: u64 = 10_000;
/// Largest clock jump, either way (ms).
const CLOCK_JUMP_MS_MAX: u64 = 60_000;
/// How long the operator waits for an answer to a membership change before
/// it asks the next replica.
const OPERATOR_TIMEOUT_MS: u64 = 2_000;
/// Share of cluster seeds in which an operator replaces a replica.
const REPLACE_SHARE: Bp = Bp(4_000);

/// A network endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ep {
    Replica(usize),
    Node(usize),
    Client(usize),
    /// The operator who replaces a dead replica.
    Operator,
}

#[derive(Clone, Debug)]
pub enum Body {
    /// Client -> replica.
    Request { req: RequestId, cmd: Command },
    /// Replica -> client.
    Response {
        req: RequestId,
        result: Result<Reply, CommandError>,
    },
    /// Replica -> agent.
    ToAgent(ServerMsg),
    /// Agent -> replica.
    FromAgent(AgentMsg),
    /// Replica -> replica (Raft).
    Peer(PeerMessage),
    /// Replica -> replica: InstallSnapshot with the snapshot it offers.
    PeerSnapshot(PeerMessage, Snapshot),
    /// Client -> replica: a linearizable read. `acked` is the checker's
    /// count of submissions acknowledged before it was sent, `applied` the
    /// highest log index any replica had applied by then (the replica never
    /// sees either).
    Read {
        req: RequestId,
        acked: usize,
        applied: u64,
    },
    /// Replica -> client.
    ReadResponse {
        req: RequestId,
        result: Result<(), CommandError>,
    },
}

#[derive(Clone, Debug)]
pub struct Msg {
    pub from: Ep,
    pub to: Ep,
    /// For messages to a node: the incarnation they are for (a connection
    /// dies with its process, so a restarted node never gets them).
    pub to_inc: u64,
    pub body: Body,
}

#[derive(Clone, Debug)]
pub enum Ev {
    Deliver(Box<Msg>),
    FsyncDone {
        replica: usize,
        inc: u64,
    },
    Tick {
        replica: usize,
        inc: u64,
    },
    ReplicaRestart {
        replica: usize,
    },
    /// The agent process `gen` of a node ticks.
    AgentTick {
        node: usize,
        gen: u64,
    },
    /// An attempt's process exits by itself.
    ProcEnd {
        node: usize,
        gen: u64,
        job: JobId,
        attempt: AttemptNumber,
    },
    /// The agent learns that a process it started has exited (it was killed
    /// by its supervisor while the agent could not act).
    ProcGone {
        node: usize,
        gen: u64,
        job: JobId,
        attempt: AttemptNumber,
    },
    /// The supervisors of a node's attempts check their lease deadline.
    Supervise {
        node: usize,
        gen: u64,
    },
    AgentRestart {
        node: usize,
    },
    ClientWake {
        client: usize,
        gen: u64,
    },
    Fault,
    Unblock {
        from: Ep,
        to: Ep,
    },
    Heal,
    Converge,
    /// A replica dies with its disk, for good: the operator replaces it.
    Replace,
    /// The operator's wait for an answer ended (`next`: it timed out, try
    /// the next replica), or its back-off did.
    OperatorWake {
        gen: u64,
        next: bool,
    },
}

impl Ev {
    /// The process that must be running to handle this event. Supervisors
    /// are processes of their own: a paused agent does not pause them.
    fn target(&self) -> Option<Ep> {
        match self {
            Ev::Deliver(m) => Some(m.to),
            Ev::FsyncDone { replica, .. } | Ev::Tick { replica, .. } => Some(Ep::Replica(*replica)),
            Ev::AgentTick { node, .. } | Ev::ProcEnd { node, .. } | Ev::ProcGone { node, .. } => {
                Some(Ep::Node(*node))
            }
            _ => None,
        }
    }

    /// A compact, stable summary for the trace hash.
    fn trace_key(&self) -> (u8, u64, u64) {
        let ep = |e: &Ep| match e {
            Ep::Replica(r) => 900 + *r as u64,
            Ep::Node(i) => 1 + *i as u64,
            Ep::Client(i) => 1000 + *i as u64,
            Ep::Operator => 2000,
        };
        match self {
            Ev::Deliver(m) => {
                let kind = match &m.body {
                    Body::Request { req, .. } | Body::Response { req, .. } => *req,
                    Body::Read { req, .. } | Body::ReadResponse { req, .. } => 11 << 40 | req,
                    Body::ToAgent(msg) => match msg {
                        ServerMsg::Lease { seq, active, .. } => {
                            1 << 40 | seq << 16 | active.len() as u64
                        }
                        ServerMsg::Joining { seq } => 2 << 40 | seq,
                        ServerMsg::Fenced { .. } => 3 << 40,
                        ServerMsg::Start { assignment, .. } => 4 << 40 | assignment.job.0,
                        ServerMsg::Kill { job, .. } => 5 << 40 | job.0,
                        ServerMsg::ReportAck { job, .. } => 6 << 40 | job.0,
                    },
                    Body::FromAgent(AgentMsg::Heartbeat { seq, node }) => {
                        7 << 40 | node.incarnation << 20 | seq
                    }
                    Body::FromAgent(AgentMsg::Leaving { done, .. }) => 9 << 40 | u64::from(*done),
                    Body::FromAgent(AgentMsg::Report(r)) => {
                        8 << 40 | u64::from(matches!(r.kind, ReportKind::Started)) << 39 | r.job.0
                    }
                    Body::Peer(m) | Body::PeerSnapshot(m, _) => {
                        10 << 40 | m.term << 8 | peer_kind(&m.body)
                    }
                };
                (0, ep(&m.from) << 16 | ep(&m.to), kind)
            }
            Ev::FsyncDone { replica, inc } => (1, *inc, *replica as u64),
            Ev::Tick { replica, inc } => (2, *inc, *replica as u64),
            Ev::ReplicaRestart { replica } => (3, *replica as u64, 0),
            Ev::AgentTick { node, gen } => (4, *node as u64, *gen),
            Ev::ProcEnd { node, job, .. } => (5, *node as u64, job.0),
            Ev::AgentRestart { node } => (6, *node as u64, 0),
            Ev::ClientWake { client, gen } => (7, *client as u64, *gen),
            Ev::Fault => (8, 0, 0),
            Ev::Unblock { from, to } => (9, ep(from), ep(to)),
            Ev::Heal => (10, 0, 0),
            Ev::Converge => (11, 0, 0),
            Ev::ProcGone { node, job, .. } => (12, *node as u64, job.0),
            Ev::Supervise { node, gen } => (13, *node as u64, *gen),
            Ev::Replace => (14, 0, 0),
            Ev::OperatorWake { gen, next } => (15, *gen, u64::from(*next)),
        }
    }
}

/// A string that takes at most [`TRACE_LINE_CHARS`] bytes and then refuses
/// more, which ends the formatting early.
struct Bounded(String);

const TRACE_LINE_CHARS: usize = 300;

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = TRACE_LINE_CHARS.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.0.push_str(&s[..cut]);
        Err(std::fmt::Error)
    }
}

/// A small number per kind of Raft message, for the trace hash.
fn peer_kind(body: &rustci_core::raft::Body<rustci_core::replica::Record>) -> u64 {
    use rustci_core::raft::Body as B;
    match body {
        B::PreVote { .. } => 1,
        B::PreVoteResp { granted } => 2 | u64::from(*granted) << 4,
        B::Vote { .. } => 3,
        B::VoteResp { granted } => 4 | u64::from(*granted) << 4,
        B::Append { entries, .. } => 5 | (entries.len() as u64) << 4,
        B::AppendResp { index, .. } => 6 | index << 4,
        B::Heartbeat { commit, .. } => 7 | commit << 4,
        B::HeartbeatResp { .. } => 8,
        B::InstallSnapshot { .. } => 9,
        B::TimeoutNow => 10,
    }
}

/// A process clock: a rate error within the drift bound, an offset, jumps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    offset_ms: i64,
    pub(crate) drift_ppm: i64,
}

impl Clock {
    fn draw(rng: &mut SimRng, drift_ppm_max: u64) -> Clock {
        Clock {
            offset_ms: rng.range(0, 2_000) as i64 - 1_000,
            drift_ppm: rng.range(0, 2 * drift_ppm_max) as i64 - drift_ppm_max as i64,
        }
    }

    /// The wall clock this process reads at true time `t`.
    fn wall(&self, t: u64) -> u64 {
        let t = t as i64;
        (EPOCH_MS + t + t * self.drift_ppm / 1_000_000 + self.offset_ms).max(0) as u64
    }

    /// The monotonic clock this process reads at true time `t`: it drifts,
    /// but never jumps.
    pub(crate) fn mono(&self, t: u64) -> u64 {
        let t = t as i64;
        (t + t * self.drift_ppm / 1_000_000).max(0) as u64
    }

    /// True duration of `local_ms` measured on this process's clock.
    pub(crate) fn true_ms(&self, local_ms: u64) -> u64 {
        let den = (1_000_000 + self.drift_ppm) as u128;
        ((u128::from(local_ms) * 1_000_000 / den) as u64).max(1)
    }
}

/// The replica's disk. Units handed over by `Output::Persist` sit in
/// `pending` (written, not synced) until an fsync covering them completes.
/// A crash keeps `durable` plus, with `unsynced_survives`, a prefix of the
/// pending units: redb commits a unit atomically, so a torn write loses or
/// keeps whole units (a corrupt frame would stop production recovery with
/// an error; the simulator does not model bit rot).
#[derive(Default)]
struct Disk {
    /// The durable snapshot; `durable` holds the entries after it.
    snapshot: Option<Snapshot>,
    durable: Vec<Entry>,
    hard_state: HardState,
    pending: Vec<Write>,
    /// Pending writes the in-flight fsync covers (0: none in flight).
    syncing: usize,
}

/// One atomic write handed to the disk.
enum Write {
    Unit(PersistUnit),
    /// A compaction behind the replica's own snapshot at `meta`, which the
    /// disk folds from what it holds, as the daemon's log writer does.
    Compact {
        meta: SnapshotMeta,
        bugs: rustci_core::bugs::BugSet,
    },
}

impl Disk {
    /// Makes `write` durable, as one. Fails (changing nothing) for a
    /// compaction whose index the durable log does not reach.
    fn write(&mut self, write: Write) -> Result<(), String> {
        match write {
            Write::Unit(unit) => {
                if let Some(snapshot) = unit.snapshot {
                    // An install replaces the whole log.
                    self.durable.clear();
                    self.snapshot = Some(snapshot);
                }
                if let Some(from) = unit.truncate_from {
                    self.durable.retain(|e| e.index < from);
                }
                self.durable.extend(unit.entries);
                if let Some(h) = unit.hard_state {
                    self.hard_state = h;
                }
            }
            Write::Compact { meta, bugs } => {
                // A snapshot installed from the leader since is newer.
                if meta.index > self.base().index {
                    let base = self.snapshot_state(bugs);
                    let Some(snapshot) = Snapshot::fold(meta, base, self.durable.iter().cloned())
                    else {
                        return Err(format!(
                            "asked to compact to {} (term {}), the durable log ends at {} after a snapshot at {}",
                            meta.index,
                            meta.term,
                            self.last_index(),
                            self.base().index
                        ));
                    };
                    self.durable.retain(|e| e.index > meta.index);
                    self.snapshot = Some(snapshot);
                }
            }
        }
        Ok(())
    }

    fn base(&self) -> SnapshotMeta {
        self.snapshot.as_ref().map(|s| s.meta).unwrap_or_default()
    }

    /// The index of the last durable entry (the snapshot's if none).
    fn last_index(&self) -> LogIndex {
        self.durable.last().map_or(self.base().index, |e| e.index)
    }

    /// The durable entries with indexes in `(after, to]` (clamped to the
    /// log's end); `None` if some were compacted away.
    fn entries(&self, after: LogIndex, to: LogIndex) -> Option<&[Entry]> {
        let base = self.base().index;
        if after < base {
            return None;
        }
        let from = (after - base) as usize;
        let to = ((to.max(after) - base) as usize).min(self.durable.len());
        Some(self.durable.get(from.min(to)..to).unwrap_or_default())
    }

    /// The state the durable snapshot holds (empty without one).
    fn snapshot_state(&self, bugs: rustci_core::bugs::BugSet) -> State {
        let mut state = match &self.snapshot {
            Some(s) => State::clone(&s.state),
            None => State::new(),
        };
        state.bugs = bugs;
        if state.sched.is_suspended() {
            state.rebuild_indexes();
        }
        state
    }
}

struct ReplicaHost {
    replica: Option<Replica>,
    /// Bumped at every crash: events of a dead incarnation are ignored.
    inc: u64,
    clock: Clock,
    paused_until: u64,
    disk: Disk,
    restart_pending: bool,
    last_replay_check_ms: u64,
    /// The replica's `snapshots_installed` last seen.
    installs_seen: u64,
    /// The replica's commit index after the last input it took.
    commit_seen: u64,
    /// The replicas it was started with ([`Config::voters`]) and their
    /// addresses ([`Config::addrs`]).
    voters: BTreeSet<ReplicaId>,
    addrs: BTreeMap<ReplicaId, String>,
    /// Dead with its disk, for good (replaced): it never restarts, and
    /// nothing picks it any more.
    gone: bool,
}

impl ReplicaHost {
    fn new(clock: Clock, addrs: BTreeMap<ReplicaId, String>) -> ReplicaHost {
        ReplicaHost {
            replica: None,
            inc: 0,
            clock,
            paused_until: 0,
            disk: Disk::default(),
            restart_pending: false,
            last_replay_check_ms: 0,
            installs_seen: 0,
            commit_seen: 0,
            voters: addrs.keys().copied().collect(),
            addrs,
            gone: false,
        }
    }
}

/// The address of replica `id` in the simulated network (which routes by
/// index: `Ep::Replica(id - 1)`).
fn replica_addr(id: ReplicaId) -> String {
    format!("r{id}")
}

/// An operator replacing a dead replica, the way the docs tell one to:
/// the replica crashes and its disk is lost for good; the operator removes
/// it (asking any live replica, following `NotLeader`, retrying until
/// answered), starts a new replica with the next unused id and an empty
/// disk, and adds it.
struct Replacement {
    /// When the replica dies (true ms, inside the fault phase).
    at: u64,
    /// The leader dies (else `pick` chooses among the live replicas).
    leader: bool,
    pick: u64,
    /// The change being asked for (`None`: not yet, or done).
    change: Option<MemberChange>,
    done: bool,
    /// The replica the operator asks.
    target: usize,
    /// Invalidates stale wake-ups.
    gen: u64,
    /// Requests sent for the current change (a late answer to any counts).
    reqs: BTreeSet<RequestId>,
    /// The host that died, and the one that replaced it.
    removed: Option<usize>,
    added: Option<usize>,
}

/// One request of a client's operation (a burst has many).
struct Item {
    cmd: Command,
    /// The idempotency key of a submission.
    key: Option<String>,
    /// Retry after a time-out (submissions with a key, cancels, drains).
    retry: bool,
    done: bool,
}

impl Item {
    fn new(cmd: Command) -> Item {
        Item {
            cmd,
            key: None,
            retry: true,
            done: false,
        }
    }
}

struct Client {
    /// The requests of the current operation; it ends when all are done.
    op: Vec<Item>,
    /// Invalidates stale wake-ups.
    gen: u64,
    /// Request ids sent for the current op, by item (a late reply to any
    /// counts).
    reqs: BTreeMap<RequestId, usize>,
    /// The replica it sends to; a refusal naming the leader moves it.
    target: usize,
    /// A linearizable read in flight, if that is the current operation.
    reading: Option<RequestId>,
    /// The next wake-up retries after a refusal, not after a timeout: the
    /// client stays with the replica it was sent to.
    backing_off: bool,
}

/// Whom a request came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Client(usize),
    Operator,
    Internal,
    /// A client's read; `acked` and `applied` as in [`Body::Read`].
    Read {
        client: usize,
        acked: usize,
        applied: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Faults,
    Liveness,
    Done,
}

/// Counters for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub replica_crashes: u64,
    pub node_crashes: u64,
    pub agent_stops: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub clock_jumps: u64,
    pub read_errors: u64,
    pub submissions_acked: u64,
    pub jobs: u64,
    pub jobs_terminal: u64,
    pub entries: u64,
    /// Snapshots replicas stored to compact their logs, and sent to
    /// followers behind them.
    pub compactions: u64,
    pub snapshots_sent: u64,
    /// Replicas replaced by the operator (removed, and a new one added).
    pub replacements: u64,
    /// Linearizable reads a replica answered `Ok` (each one checked by
    /// `linearizable_reads`), and reads it refused.
    pub reads_served: u64,
    pub reads_refused: u64,
}

pub struct World {
    opts: SimOptions,
    pub plan: FaultPlan,
    pub(crate) rng: SimRng,
    pub now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    hosts: Vec<ReplicaHost>,
    /// The replica the checker's ledger follows: the one leading, once it
    /// applied its own first entry.
    ledger: Option<usize>,
    /// The committed log as the first replica to apply each entry saw it.
    committed: Vec<Entry>,
    /// The leader of each term seen so far.
    leaders: BTreeMap<Term, usize>,
    pub(crate) nodes: Vec<NodeHost>,
    node_index: BTreeMap<String, usize>,
    clients: Vec<Client>,
    blocked: BTreeSet<(Ep, Ep)>,
    net_faults: bool,
    pub(crate) checker: Checker,
    pub phase: Phase,
    pub steps: u64,
    hash: Fnv64,
    /// Last events, formatted; only kept when `opts.trace_tail > 0`.
    pub tail: std::collections::VecDeque<String>,
    next_request: RequestId,
    /// Requests in flight: the replica that has them, and whose they are.
    routes: BTreeMap<RequestId, (usize, Route)>,
    submitted: u64,
    acked_jobs: Vec<JobId>,
    submit_mean_gap_ms: u64,
    heal_at: u64,
    /// Entries between two snapshots ([`Config::snapshot_entries`]).
    pub snapshot_entries: u64,
    /// Entries per Raft append ([`Config::append_entries_max`]).
    pub append_entries_max: usize,
    /// The operator's replacement of a replica, in the seeds that have one.
    replacement: Option<Replacement>,
    pub failure: Option<Violation>,
    pub stats: Stats,
}

impl World {
    pub fn new(opts: &SimOptions) -> World {
        let mut rng = SimRng::new(opts.seed);
        let plan = FaultPlan::draw(&mut rng, opts.drift_ppm_max);
        assert!(
            matches!(opts.replicas, 1 | 3 | 5),
            "a cluster has 1, 3 or 5 replicas"
        );
        let addrs: BTreeMap<ReplicaId, String> = (1..=opts.replicas as ReplicaId)
            .map(|id| (id, replica_addr(id)))
            .collect();
        let hosts = (0..opts.replicas)
            .map(|_| ReplicaHost::new(Clock::draw(&mut rng, opts.drift_ppm_max), addrs.clone()))
            .collect();
        let mut agents = Vec::new();
        for i in 0..plan.nodes {
            let labels = draw_labels(&mut rng);
            let capacity = Resources::new(rng.range(2, 8) * 1000, rng.range(2, 16) * 1024);
            let mut clock = Clock::draw(&mut rng, opts.drift_ppm_max);
            if opts.drift_fault_ppm > 0 {
                // The planted fault: this machine's clock runs slow past the
                // bound, so its lease outlasts what the leader waits for.
                clock.drift_ppm = -(opts.drift_fault_ppm as i64);
            }
            agents.push(NodeHost::new(
                format!("n{}", i + 1),
                capacity,
                labels,
                clock,
            ));
        }
        let node_index = agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i))
            .collect();
        // Slots: how many average jobs run at once; the mean attempt lasts
        // about half of job_secs_max. Each client waits
        // clients / (load * slots / mean job length) between submissions.
        // An average job asks for 1.05 cores and 1,056 MiB: the cluster's
        // slots are whichever of cpu and memory runs out first.
        let cpu_total: u64 = agents.iter().map(|a| a.capacity.cpu_millis).sum();
        let memory_total: u64 = agents.iter().map(|a| a.capacity.memory_mb).sum();
        let slots_milli = (cpu_total * 1000 / 1050)
            .min(memory_total * 1000 / 1056)
            .max(1000);
        let mean_job_ms = plan.job_secs_max * 500;
        let submit_mean_gap_ms = if plan.big_job_share.is_zero() {
            (plan.clients as u64 * mean_job_ms * 10_000 * 1000
                / (u64::from(plan.load.0.max(1)) * slots_milli))
                .max(1)
        } else {
            // A starvation seed: every submission within a third of the
            // fault phase, starting half way through it.
            (plan.clients as u64 * opts.fault_phase_ms / 3 / opts.jobs_max.max(1)).max(1)
        };
        let clients = (0..plan.clients)
            .map(|_| Client {
                op: Vec::new(),
                gen: 0,
                reqs: BTreeMap::new(),
                reading: None,
                backing_off: false,
                target: 0,
            })
            .collect();
        let net_faults = true;
        let mut w = World {
            opts: opts.clone(),
            submit_mean_gap_ms,
            plan,
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            hosts,
            ledger: None,
            committed: Vec::new(),
            leaders: BTreeMap::new(),
            nodes: agents,
            node_index,
            clients,
            blocked: BTreeSet::new(),
            net_faults,
            checker: Checker::new(),
            phase: Phase::Faults,
            steps: 0,
            hash: Fnv64::new(),
            tail: Default::default(),
            next_request: 1,
            routes: BTreeMap::new(),
            submitted: 0,
            acked_jobs: Vec::new(),
            heal_at: opts.fault_phase_ms,
            append_entries_max: {
                // Half the cluster seeds send appends of a few entries, so
                // a follower catching up gets a new leader's log in pieces
                // (what Figure 8's unsafe commit needs). A stream of its own
                // keeps every other draw of the seed as it was.
                let mut rng = SimRng::new(opts.seed ^ 0xa99e_4d5e_0000_0002);
                if opts.replicas > 1 && rng.chance(Bp(5_000)) {
                    rng.range(4, 16) as usize
                } else {
                    rustci_core::raft::APPEND_ENTRIES_MAX_DEFAULT
                }
            },
            snapshot_entries: opts.snapshot_entries.unwrap_or_else(|| {
                // From a stream of its own, so that seeds found before
                // compaction existed draw the same plan as then.
                let mut rng = SimRng::new(opts.seed ^ 0x5a9a_5407_c0de_0001);
                if rng.chance(Bp(3_333)) {
                    0
                } else {
                    rng.range(8, 400)
                }
            }),
            replacement: {
                // From a stream of its own too: seeds that replace no
                // replica run as they did before replacements existed.
                let mut rng = SimRng::new(opts.seed ^ 0x7e91_ace0_dead_0002);
                let drawn = rng.chance(REPLACE_SHARE);
                let at = rng.range(opts.fault_phase_ms / 10, opts.fault_phase_ms * 7 / 10);
                let leader = rng.chance(Bp(3_333));
                let pick = rng.next_u64();
                (opts.replicas > 1 && opts.replace_replica.unwrap_or(drawn)).then_some(
                    Replacement {
                        at,
                        leader,
                        pick,
                        change: None,
                        done: false,
                        target: 0,
                        gen: 0,
                        reqs: BTreeSet::new(),
                        removed: None,
                        added: None,
                    },
                )
            },
            failure: None,
            stats: Stats::default(),
        };
        if !w.plan.net_loss.is_zero() {
            for a in &w.nodes {
                w.checker.disturbed.insert(a.name.clone());
            }
        }
        w.boot();
        w
    }

    fn boot(&mut self) {
        for r in 0..self.hosts.len() {
            self.restart_replica_now(r);
        }
        for i in 0..self.nodes.len() {
            self.agent_boot(i);
        }
        let start = if self.plan.big_job_share.is_zero() {
            0
        } else {
            self.heal_at / 2
        };
        for c in 0..self.clients.len() {
            let gap = self.rng.exp_ms(self.submit_mean_gap_ms);
            self.push_in(start + gap, Ev::ClientWake { client: c, gen: 0 });
        }
        self.schedule_fault();
        if let Some(at) = self.replacement.as_ref().map(|r| r.at) {
            self.push_at(at, Ev::Replace);
        }
        self.push_at(self.heal_at, Ev::Heal);
    }

    // --- the event loop ---

    pub(crate) fn push_at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((t.max(self.now), self.seq), ev);
    }

    pub(crate) fn push_in(&mut self, delay: u64, ev: Ev) {
        self.push_at(self.now + delay, ev);
    }

    /// Runs until the liveness phase converges, an invariant fails or the
    /// bound passes.
    pub fn run(&mut self) {
        while self.phase != Phase::Done && self.failure.is_none() {
            let Some(((t, _), ev)) = self.events.pop_first() else {
                self.fail(inv::LIVE_JOBS, "the event queue ran dry".into());
                break;
            };
            self.now = t;
            self.steps += 1;
            if self.steps > self.opts.steps_max {
                let max = self.opts.steps_max;
                self.fail(
                    inv::LIVE_JOBS,
                    format!("more than {max} steps (a runaway run)"),
                );
                break;
            }
            if let Some(target) = ev.trace_key_target_paused(self) {
                self.push_at(target, ev);
                continue;
            }
            let (k, a, b) = ev.trace_key();
            (t, k, a, b).hash(&mut self.hash);
            if self.opts.trace_tail > 0 {
                if self.tail.len() == self.opts.trace_tail {
                    self.tail.pop_front();
                }
                // Formatting stops at the line's length: a Raft append can
                // carry thousands of entries.
                let mut line = Bounded(String::new());
                let _ = std::fmt::Write::write_fmt(
                    &mut line,
                    format_args!("t={t}ms step={} {ev:?}", self.steps),
                );
                self.tail.push_back(line.0);
            }
            let result = self.step(ev);
            if let Err(v) = result {
                self.failure = Some(v);
                break;
            }
            if self.steps.is_multiple_of(CONSISTENCY_EVERY_STEPS) {
                for h in &self.hosts {
                    if let Some(r) = &h.replica {
                        if let Err(v) = Checker::consistency(r.state()) {
                            self.failure = Some(v);
                            break;
                        }
                    }
                }
            }
        }
    }

    pub fn trace_hash(&self) -> u64 {
        self.hash.finish()
    }

    fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.failure.is_none() {
            self.failure = Some(Violation { invariant, detail });
        }
    }

    fn paused_until(&self, ep: Ep) -> u64 {
        match ep {
            Ep::Replica(r) => self.hosts[r].paused_until,
            Ep::Node(i) => self.nodes[i].paused_until,
            Ep::Client(_) | Ep::Operator => 0,
        }
    }

    fn step(&mut self, ev: Ev) -> Check {
        match ev {
            Ev::Deliver(msg) => self.deliver(*msg),
            Ev::FsyncDone { replica, inc } if inc == self.hosts[replica].inc => {
                self.fsync_done(replica)
            }
            Ev::Tick { replica, inc } if inc == self.hosts[replica].inc => self.tick(replica),
            Ev::FsyncDone { .. } | Ev::Tick { .. } => Ok(()),
            Ev::ReplicaRestart { replica } => self.replica_restart(replica),
            Ev::AgentTick { node, gen } => self.agent_tick(node, gen),
            Ev::ProcEnd {
                node,
                gen,
                job,
                attempt,
            } => self.proc_end(node, gen, job, attempt),
            Ev::ProcGone {
                node,
                gen,
                job,
                attempt,
            } => self.proc_gone(node, gen, job, attempt),
            Ev::Supervise { node, gen } => self.supervise(node, gen),
            Ev::AgentRestart { node } => self.agent_restart(node),
            Ev::ClientWake { client, gen } => self.client_wake(client, gen),
            Ev::Fault => self.fault(),
            Ev::Unblock { from, to } => {
                self.blocked.remove(&(from, to));
                Ok(())
            }
            Ev::Heal => self.heal(),
            Ev::Converge => self.converge(),
            Ev::Replace => self.replace_start(),
            Ev::OperatorWake { gen, next } => self.operator_wake(gen, next),
        }
    }

    // --- network ---

    pub(crate) fn send(&mut self, from: Ep, to: Ep, to_inc: u64, body: Body) {
        self.stats.messages_sent += 1;
        let faults = self.net_faults && self.phase == Phase::Faults;
        if self.blocked.contains(&(from, to)) || faults && self.rng.chance(self.plan.net_loss) {
            self.stats.messages_dropped += 1;
            return;
        }
        let copies = if faults && self.rng.chance(self.plan.net_duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self
                .rng
                .range(self.plan.net_delay_min_ms, self.plan.net_delay_max_ms);
            if faults && self.rng.chance(self.plan.net_reorder) {
                delay += self.rng.range(0, 1_000);
            }
            let msg = Msg {
                from,
                to,
                to_inc,
                body: body.clone(),
            };
            self.push_in(delay, Ev::Deliver(Box::new(msg)));
        }
    }

    fn deliver(&mut self, msg: Msg) -> Check {
        if self.blocked.contains(&(msg.from, msg.to)) {
            self.stats.messages_dropped += 1;
            return Ok(());
        }
        match msg.to {
            Ep::Replica(r) => self.replica_receive(r, msg.from, msg.body),
            Ep::Node(i) => {
                // A message is for one incarnation of the agent: the
                // connection of another is gone.
                let Body::ToAgent(body) = msg.body else {
                    return Ok(());
                };
                if self.nodes[i].incarnation() != Some(msg.to_inc) {
                    self.stats.messages_dropped += 1;
                    return Ok(());
                }
                let Ep::Replica(from) = msg.from else {
                    return Ok(());
                };
                self.agent_receive(i, from, body)
            }
            Ep::Client(c) => self.client_receive(c, msg.body),
            Ep::Operator => self.operator_receive(msg.body),
        }
    }

    // --- the replica hosts ---

    fn replica_now(&self, r: usize) -> u64 {
        self.hosts[r].clock.wall(self.now)
    }

    fn replica_mono(&self, r: usize) -> u64 {
        self.hosts[r].clock.mono(self.now)
    }

    /// The cluster's lease timings, with the drift bound the clocks keep.
    pub(crate) fn lease_config(&self) -> LeaseConfig {
        LeaseConfig {
            drift_ppm_max: self.opts.drift_ppm_max,
            ..LeaseConfig::default()
        }
    }

    fn config(&self, r: usize) -> Config {
        let id = r as u64 + 1;
        let mut config = Config::new(id);
        config.voters = self.hosts[r].voters.clone();
        config.addrs = self.hosts[r].addrs.clone();
        // Each replica draws its election timeouts from its own stream.
        config.seed = self.opts.seed.wrapping_mul(31).wrapping_add(id);
        // Raft wants a round trip well inside an election timeout.
        config.election_timeout_ms = config
            .election_timeout_ms
            .max(4 * self.plan.net_delay_max_ms);
        config.heartbeat_interval_ms = (config.election_timeout_ms / 6).max(50);
        config.pass_bounds = self.plan.pass_bounds();
        config.lease = self.lease_config();
        config.snapshot_entries = self.snapshot_entries;
        config.append_entries_max = self.append_entries_max;
        if let Some(bug) = self.opts.planted_bug {
            config.bugs = rustci_core::bugs::BugSet::only(bug.0);
        }
        config
    }

    fn restart_replica_now(&mut self, r: usize) {
        let disk = &self.hosts[r].disk;
        let state = disk.snapshot_state(self.config(r).bugs);
        let recovery = Recovery::from_snapshot(state, disk.base(), &disk.durable, disk.hard_state);
        let mono = self.replica_mono(r);
        let mut replica = Replica::recover(self.config(r), recovery, mono);
        // What it recovered was committed before: the rule is about where
        // a leader moves its commit index, not where it starts.
        let recovered_commit = replica.commit_index();
        replica.start(self.replica_now(r));
        let host = &mut self.hosts[r];
        host.replica = Some(replica);
        host.restart_pending = false;
        host.installs_seen = 0;
        host.commit_seen = recovered_commit;
        let tick = host.clock.true_ms(TICK_MS);
        let inc = host.inc;
        self.push_in(tick, Ev::Tick { replica: r, inc });
    }

    fn replica_restart(&mut self, r: usize) -> Check {
        if self.hosts[r].replica.is_some() || self.hosts[r].gone {
            return Ok(());
        }
        if self.phase == Phase::Faults && self.rng.chance(self.plan.read_error) {
            // Reading the log failed: the process exits and is restarted.
            self.stats.read_errors += 1;
            let delay = self.rng.range(100, 2_000);
            self.push_in(delay, Ev::ReplicaRestart { replica: r });
            return Ok(());
        }
        self.restart_replica_now(r);
        self.after_input(r, 0, None)?;
        self.drain_outputs(r)
    }

    /// The replicas in the cluster: every host but those replaced.
    pub(crate) fn replica_count(&self) -> usize {
        self.hosts.iter().filter(|h| !h.gone).count()
    }

    /// The indexes of the replicas in the cluster (all of them unless one
    /// was replaced).
    fn live_hosts(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&r| !self.hosts[r].gone)
            .collect()
    }

    /// The replica after `r` in a client's or an agent's list (replaced
    /// ones are off it).
    pub(crate) fn next_replica(&self, r: usize) -> usize {
        let n = self.hosts.len();
        (1..=n)
            .map(|k| (r + k) % n)
            .find(|&o| !self.hosts[o].gone)
            .unwrap_or(r)
    }

    /// The replica the ledger follows.
    fn leader(&self) -> Option<&Replica> {
        self.hosts[self.ledger?].replica.as_ref()
    }

    fn crash_replica(&mut self, r: usize) {
        if self.hosts[r].replica.is_none() {
            return;
        }
        self.stats.replica_crashes += 1;
        if self.ledger == Some(r) {
            self.ledger = None;
        }
        let host = &mut self.hosts[r];
        host.replica = None;
        host.inc += 1;
        let disk = &mut host.disk;
        let pending = std::mem::take(&mut disk.pending);
        disk.syncing = 0;
        for write in pending {
            if !self.rng.chance(self.plan.unsynced_survives) {
                break;
            }
            // A compaction the log cannot fold is reported when it syncs;
            // a crash first loses it.
            let _ = disk.write(write);
        }
        // Connections die with the process: in-flight requests get no reply.
        self.routes.retain(|_, (at, _)| *at != r);
        self.hosts[r].restart_pending = true;
        let delay = self.rng.range(100, DOWNTIME_MS_MAX);
        self.push_in(delay, Ev::ReplicaRestart { replica: r });
    }

    fn replica_receive(&mut self, r: usize, from: Ep, body: Body) -> Check {
        let now = self.replica_now(r);
        let mono = self.replica_mono(r);
        let Some(replica) = self.hosts[r].replica.as_mut() else {
            self.stats.messages_dropped += 1;
            // Its connection is refused: an agent or a client dials the
            // next replica on its list.
            // (Unless it moved on already: a late message says nothing.)
            let next = self.next_replica(r);
            match from {
                Ep::Node(i) if self.nodes[i].server == r => self.nodes[i].server = next,
                Ep::Client(c) if self.clients[c].target == r => self.clients[c].target = next,
                Ep::Operator => {
                    if let Some(op) = self.replacement.as_mut().filter(|op| op.target == r) {
                        op.target = next;
                    }
                }
                _ => {}
            }
            return Ok(());
        };
        let applied = replica.applied_index();
        let pre = self.pre_apply(r);
        let n = self.replica_count();
        let next = self.next_replica(r);
        let replica = self.hosts[r].replica.as_mut().expect("up");
        match body {
            Body::Request { req, cmd } => {
                let route = match from {
                    Ep::Client(c) => Route::Client(c),
                    Ep::Operator => Route::Operator,
                    _ => return Ok(()),
                };
                self.routes.insert(req, (r, route));
                replica.propose(now, req, cmd);
            }
            Body::Read {
                req,
                acked,
                applied,
            } => {
                let Ep::Client(client) = from else {
                    return Ok(());
                };
                let route = Route::Read {
                    client,
                    acked,
                    applied,
                };
                self.routes.insert(req, (r, route));
                replica.read(now, req);
            }
            Body::FromAgent(msg) => {
                if !replica.is_leading() {
                    // As the production link does: the agent is sent on to
                    // the replica this one believes leads, and sends again
                    // there at once.
                    let current = matches!(from, Ep::Node(i) if self.nodes[i].server == r);
                    if let (Ep::Node(i), true) = (from, current) {
                        match replica.leader() {
                            Some(l) if l as usize != r + 1 => {
                                let next = l as usize - 1;
                                self.nodes[i].server = next;
                                self.send(from, Ep::Replica(next), 0, Body::FromAgent(msg));
                            }
                            // It was elected and is catching up: the agent
                            // stays and tries again with its next message.
                            Some(_) => {}
                            // No leader known here: the agent tries the next
                            // replica at once, around the list once at most
                            // until some replica answers.
                            None => {
                                self.nodes[i].server = next;
                                if self.nodes[i].hops < n {
                                    self.nodes[i].hops += 1;
                                    self.send(from, Ep::Replica(next), 0, Body::FromAgent(msg));
                                }
                            }
                        }
                    }
                    return Ok(());
                }
                replica.handle_agent(now, mono, msg)
            }
            Body::Peer(msg) => replica.handle_peer(now, mono, msg),
            Body::PeerSnapshot(msg, snapshot) => {
                replica.handle_peer_snapshot(now, mono, msg, snapshot)
            }
            Body::Response { .. } | Body::ReadResponse { .. } | Body::ToAgent(_) => return Ok(()),
        }
        self.after_input(r, applied, pre)?;
        self.drain_outputs(r)
    }

    /// What the ledger needs from before an input to the replica it
    /// follows: the jobs the durable, unapplied entries may touch.
    fn pre_apply(&self, r: usize) -> Option<PreApply> {
        if self.ledger != Some(r) {
            return None;
        }
        let replica = self.hosts[r].replica.as_ref()?;
        let disk = &self.hosts[r].disk;
        let unapplied = disk
            .entries(replica.applied_index(), LogIndex::MAX)
            .expect("a replica's snapshot is at most what it applied");
        Some(Checker::pre_apply(replica.state(), unapplied))
    }

    /// After an input to replica `r` that had applied up to `applied`:
    /// what it applied matches the one committed log, no term has two
    /// leaders, and the ledger takes what the leader applied (or starts
    /// again from the replica that now leads).
    fn after_input(&mut self, r: usize, applied: u64, pre: Option<PreApply>) -> Check {
        let Some(replica) = self.hosts[r].replica.as_ref() else {
            return Ok(());
        };
        let to = replica.applied_index();
        let mut from = applied.min(to);
        let installed = replica.snapshots_installed();
        let meta = replica.snapshot();
        if installed != self.hosts[r].installs_seen {
            // It took the leader's snapshot in place of entries: that state
            // must be the committed log's at the snapshot.
            self.hosts[r].installs_seen = installed;
            let index = meta.index as usize;
            let known = self.committed.get(index - 1).map(|e| e.term);
            if known != Some(meta.term) {
                return Err(Violation {
                    invariant: inv::STATE_MACHINE_SAFETY,
                    detail: format!(
                        "replica {} installed a snapshot at {} (term {}), the committed log has term {known:?} there",
                        r + 1,
                        meta.index,
                        meta.term
                    ),
                });
            }
            if to == meta.index {
                let replica = self.hosts[r].replica.as_ref().expect("up");
                Checker::replay(&self.committed[..index], replica.state())?;
            }
            from = from.max(meta.index);
        }
        let replica = self.hosts[r].replica.as_ref().expect("up");
        let commit = replica.commit_index();
        if replica.role() == Role::Leader && commit > self.hosts[r].commit_seen {
            let term = replica.term();
            if replica.term_at(commit) != Some(term) {
                return Err(Violation {
                    invariant: inv::COMMIT_CURRENT_TERM,
                    detail: format!(
                        "leader {} of term {term} moved its commit index from {} to {commit}, an entry of term {:?}",
                        r + 1,
                        self.hosts[r].commit_seen,
                        replica.term_at(commit)
                    ),
                });
            }
        }
        self.hosts[r].commit_seen = commit;
        let disk = &self.hosts[r].disk;
        // A restart replays from the stored snapshot (what it holds was
        // judged as it was made or installed).
        let from = from.max(disk.base().index.min(to));
        let newly = match disk.entries(from, to) {
            Some(newly) if newly.len() as u64 == to - from => newly,
            _ => {
                return Err(Violation {
                    invariant: inv::STATE_MACHINE_SAFETY,
                    detail: format!(
                    "replica {} applied up to {to} with entries up to {} durable (snapshot at {})",
                    r + 1,
                    disk.last_index(),
                    disk.base().index
                ),
                })
            }
        };
        for e in newly {
            let i = e.index as usize;
            match self.committed.get(i - 1) {
                Some(c) if c == e => {}
                Some(c) => {
                    return Err(Violation {
                        invariant: inv::STATE_MACHINE_SAFETY,
                        detail: format!(
                            "replica {} applied {} {:?} at {i}, another applied {} {:?}",
                            r + 1,
                            e.term,
                            e.event.kind(),
                            c.term,
                            c.event.kind()
                        ),
                    })
                }
                None => {
                    // Stamps never decrease along the committed log.
                    self.checker.proposed(std::slice::from_ref(e))?;
                    self.committed.push(e.clone());
                }
            }
        }
        let replica = self.hosts[r].replica.as_ref().expect("up");
        if replica.role() == Role::Leader {
            let term = replica.term();
            if let Some(&other) = self.leaders.get(&term) {
                if other != r {
                    return Err(Violation {
                        invariant: inv::ELECTION_SAFETY,
                        detail: format!(
                            "replicas {} and {} both lead term {term}",
                            other + 1,
                            r + 1
                        ),
                    });
                }
            }
            self.leaders.insert(term, r);
        }
        let leading = replica.is_leading();
        // A leader of an older term that has not heard of the newer one
        // yet (it was paused, or cut off) may still think it leads: it is
        // not followed while the ledger follows a newer leader, nor once a
        // later term has had a leader at all, even one that has stepped
        // down since and left the ledger with nobody to follow (seed 2424).
        let newest = self
            .ledger
            .and_then(|l| self.hosts[l].replica.as_ref())
            .is_none_or(|l| l.term() < replica.term())
            && self
                .leaders
                .last_key_value()
                .is_none_or(|(&term, _)| term <= replica.term());
        if self.ledger == Some(r) {
            match pre {
                Some(pre) if leading => {
                    self.checker.applied(&pre, newly, replica.state())?;
                }
                _ => self.ledger = None,
            }
        } else if leading && newest {
            // The first input that finds this replica leading: its state
            // holds every committed entry, so nothing acknowledged or
            // terminal may be missing, and the ledger starts from its log.
            self.ledger = Some(r);
            let state = replica.state();
            self.checker.acked_present(state)?;
            self.checker.terminal_survives(state)?;
            // Its disk may be compacted: the ledger takes the committed
            // log every replica applied, whole.
            let log = &self.committed[..(to as usize).min(self.committed.len())];
            self.checker.resync(log, state)?;
        }
        Ok(())
    }

    fn tick(&mut self, r: usize) -> Check {
        let now = self.replica_now(r);
        let mono = self.replica_mono(r);
        let applied = self.hosts[r].replica.as_ref().map(|x| x.applied_index());
        let pre = self.pre_apply(r);
        if let Some(x) = self.hosts[r].replica.as_mut() {
            x.handle_tick(now, mono);
        }
        let tick = self.hosts[r].clock.true_ms(TICK_MS);
        let inc = self.hosts[r].inc;
        self.push_in(tick, Ev::Tick { replica: r, inc });
        if let Some(applied) = applied {
            self.after_input(r, applied, pre)?;
        }
        self.drain_outputs(r)?;
        if self.ledger != Some(r) {
            return Ok(());
        }
        let Some(x) = self.hosts[r].replica.as_ref() else {
            return Ok(());
        };
        // Idle: serving, and everything it proposed is applied (no pass in
        // flight), so any pass it needed has had its chance to run.
        let idle = x.is_ready() && x.last_index() == x.applied_index();
        self.checker.tick(idle, self.plan.scan_jobs_max)?;
        self.checker
            .starvation(self.now, self.phase == Phase::Liveness)
    }

    /// Carries out replica `r`'s outputs in order, as the production driver
    /// does, checking placements and starts as they go out.
    fn drain_outputs(&mut self, r: usize) -> Check {
        loop {
            let Some(replica) = self.hosts[r].replica.as_mut() else {
                return Ok(());
            };
            let Some(out) = replica.poll_output() else {
                return Ok(());
            };
            let leading = replica.is_leading();
            match out {
                Output::Persist(unit) => {
                    let entries = &unit.entries;
                    if leading && self.ledger == Some(r) {
                        self.checker.placements(entries, self.plan.placements_max)?;
                    }
                    for e in entries {
                        (r, e.index, e.at, e.event.kind()).hash(&mut self.hash);
                    }
                    self.stats.entries += entries.len() as u64;
                    let disk = &mut self.hosts[r].disk;
                    disk.pending.push(Write::Unit(unit));
                    if disk.syncing == 0 {
                        self.start_fsync(r);
                    }
                }
                // The simulated network routes by replica index: a change
                // of members needs no new connection.
                Output::Members(_) => {}
                Output::Compact(meta) => {
                    self.stats.compactions += 1;
                    let bugs = self.config(r).bugs;
                    let disk = &mut self.hosts[r].disk;
                    disk.pending.push(Write::Compact { meta, bugs });
                    if disk.syncing == 0 {
                        self.start_fsync(r);
                    }
                }
                Output::Send(msg) => {
                    let to = msg.to as usize - 1;
                    let body = match &msg.body {
                        PeerBody::InstallSnapshot { meta, .. } => {
                            // The driver attaches the snapshot it stored, if
                            // it still is the one Raft offers.
                            match &self.hosts[r].disk.snapshot {
                                Some(s) if s.meta == *meta => {
                                    self.stats.snapshots_sent += 1;
                                    Body::PeerSnapshot(msg, s.clone())
                                }
                                _ => continue,
                            }
                        }
                        _ => Body::Peer(msg),
                    };
                    self.send(Ep::Replica(r), Ep::Replica(to), 0, body);
                }
                Output::ReadReady { request, result } => {
                    if let Some((
                        _,
                        Route::Read {
                            client,
                            acked,
                            applied,
                        },
                    )) = self.routes.remove(&request)
                    {
                        if result.is_ok() {
                            self.stats.reads_served += 1;
                            self.check_read(r, acked, applied)?;
                        } else {
                            self.stats.reads_refused += 1;
                        }
                        self.send(
                            Ep::Replica(r),
                            Ep::Client(client),
                            0,
                            Body::ReadResponse {
                                req: request,
                                result,
                            },
                        );
                    }
                }
                Output::LoadEntries(need) => {
                    // Raft asks only for durable entries; compacted ones
                    // are answered with none (the snapshot will do).
                    let disk = &self.hosts[r].disk;
                    let entries = disk
                        .entries(need.from.saturating_sub(1), need.to)
                        .unwrap_or_default()
                        .to_vec();
                    let now = self.replica_now(r);
                    let replica = self.hosts[r].replica.as_mut().expect("up");
                    replica.handle_entries_loaded(now, need.peer, entries);
                }
                Output::Reply { request, result } => match self.routes.remove(&request) {
                    Some((_, Route::Client(c))) => self.send(
                        Ep::Replica(r),
                        Ep::Client(c),
                        0,
                        Body::Response {
                            req: request,
                            result,
                        },
                    ),
                    Some((_, Route::Operator)) => self.send(
                        Ep::Replica(r),
                        Ep::Operator,
                        0,
                        Body::Response {
                            req: request,
                            result,
                        },
                    ),
                    Some((_, Route::Internal | Route::Read { .. })) | None => {}
                },
                Output::ToAgent {
                    node,
                    incarnation,
                    msg,
                } => {
                    if let ServerMsg::Kill { job, attempt, .. } = &msg {
                        if self.ledger == Some(r) {
                            self.checker.runner_kill(*job, *attempt);
                        }
                    }
                    // Only the incarnation named receives it: a restarted
                    // agent never gets what was meant for its predecessor.
                    if let Some(&i) = self.node_index.get(&node) {
                        self.send(Ep::Replica(r), Ep::Node(i), incarnation, Body::ToAgent(msg));
                    }
                }
            }
        }
    }

    fn start_fsync(&mut self, r: usize) {
        let host = &mut self.hosts[r];
        host.disk.syncing = host.disk.pending.len();
        let inc = host.inc;
        let delay = self.rng.range(1, self.plan.fsync_delay_max_ms);
        self.push_in(delay, Ev::FsyncDone { replica: r, inc });
    }

    fn fsync_done(&mut self, r: usize) -> Check {
        let disk = &mut self.hosts[r].disk;
        let synced: Vec<Write> = disk.pending.drain(..disk.syncing).collect();
        disk.syncing = 0;
        let mut last_unit = None;
        let mut compacted = Vec::new();
        for write in synced {
            match &write {
                Write::Unit(unit) => last_unit = Some(unit.id),
                Write::Compact { meta, .. } => compacted.push(*meta),
            }
            if let Err(detail) = disk.write(write) {
                return Err(Violation {
                    invariant: inv::STATE_MACHINE_SAFETY,
                    detail: format!("replica {} {detail}", r + 1),
                });
            }
        }
        let now = self.replica_now(r);
        let pre = self.pre_apply(r);
        let replica = self.hosts[r]
            .replica
            .as_mut()
            .expect("fsync of a live replica");
        let applied = replica.applied_index();
        if let Some(unit) = last_unit {
            replica.handle_persisted(now, unit);
        }
        for meta in compacted {
            replica.handle_compacted(now, meta);
        }
        self.after_input(r, applied, pre)?;
        self.drain_outputs(r)?;
        if self.ledger == Some(r) {
            self.checker.kills_sent()?;
        }
        let disk = &self.hosts[r].disk;
        if !disk.pending.is_empty() && disk.syncing == 0 {
            self.start_fsync(r);
        }
        self.maybe_check_replay(r)
    }

    /// Replay equality at quiescent points (everything proposed is durable
    /// and applied), at most every `replay_check_interval_ms`.
    fn maybe_check_replay(&mut self, r: usize) -> Check {
        if self.now < self.hosts[r].last_replay_check_ms + self.opts.replay_check_interval_ms {
            return Ok(());
        }
        self.check_replay_if_quiescent(r, false)
    }

    fn check_replay_if_quiescent(&mut self, r: usize, required: bool) -> Check {
        let host = &self.hosts[r];
        let Some(replica) = host.replica.as_ref() else {
            return Ok(());
        };
        let durable_last = host.disk.last_index();
        let quiescent = host.disk.pending.is_empty()
            && replica.last_index() == durable_last
            && replica.applied_index() == durable_last;
        if !quiescent {
            if required {
                return Err(Violation {
                    invariant: inv::LIVE_JOBS,
                    detail: format!(
                        "replica {}'s log did not settle (entries not durable or not applied)",
                        r + 1
                    ),
                });
            }
            return Ok(());
        }
        self.hosts[r].last_replay_check_ms = self.now;
        let host = &self.hosts[r];
        let replica = host.replica.as_ref().expect("up");
        // The committed log, whole: the disk may start at a snapshot.
        let applied = replica.applied_index() as usize;
        if self.committed.len() >= applied {
            Checker::replay(&self.committed[..applied], replica.state())?;
        } else {
            return Err(Violation {
                invariant: inv::REPLAY,
                detail: format!(
                    "replica {} applied {applied} entries, the committed log has {}",
                    r + 1,
                    self.committed.len()
                ),
            });
        }
        Checker::consistency(replica.state())
    }

    // --- clients ---

    fn client_wake(&mut self, c: usize, gen: u64) -> Check {
        if self.clients[c].gen != gen {
            return Ok(());
        }
        if self.clients[c].reading.take().is_some() {
            // The read timed out: nothing to check; the next op goes to
            // the next replica, as a client with a list of them does.
            self.clients[c].target = self.next_replica(self.clients[c].target);
            self.client_done(c);
            return Ok(());
        }
        if !self.clients[c].op.is_empty() {
            // Timed out waiting for replies: resend what may be retried
            // (to the next replica, as a client with a list of them does),
            // give up on the rest. After a refusal it stays where it was
            // sent.
            if !std::mem::take(&mut self.clients[c].backing_off) {
                self.clients[c].target = self.next_replica(self.clients[c].target);
            }
            for item in &mut self.clients[c].op {
                if !item.retry {
                    item.done = true;
                }
            }
            if self.clients[c].op.iter().all(|item| item.done) {
                self.client_done(c);
            } else {
                self.client_send(c);
            }
            return Ok(());
        }
        if self.phase != Phase::Faults || self.submitted >= self.opts.jobs_max {
            return Ok(());
        }
        if self.rng.chance(READ_SHARE) {
            self.client_read(c);
            return Ok(());
        }
        self.clients[c].op = self.new_op(c);
        self.client_send(c);
        Ok(())
    }

    /// Sends a linearizable read to the client's replica.
    fn client_read(&mut self, c: usize) {
        let req = self.next_request;
        self.next_request += 1;
        let acked = self.acked_jobs.len();
        let applied = self.committed.len() as u64;
        let target = self.clients[c].target;
        self.clients[c].reading = Some(req);
        self.send(
            Ep::Client(c),
            Ep::Replica(target),
            0,
            Body::Read {
                req,
                acked,
                applied,
            },
        );
        let client = &mut self.clients[c];
        client.gen += 1;
        let gen = client.gen;
        let timeout = self.plan.client_timeout_ms;
        self.push_in(timeout, Ev::ClientWake { client: c, gen });
    }

    /// Replica `r` is about to answer a read sent when `acked` submissions
    /// had been acknowledged and some replica had applied the log up to
    /// `applied`: its state must hold every one of those submissions, and
    /// reflect the log at least up to `applied`. The second is more than
    /// linearizability asks of a read (an entry applied but not yet
    /// acknowledged is a concurrent write), but ReadIndex guarantees it: a
    /// leader that a quorum confirms after the read arrived holds every
    /// entry committed before, and serves once it has applied its commit
    /// index. It is what lets the checker see a stale leader's read without
    /// waiting for a client to be acknowledged first.
    fn check_read(&self, r: usize, acked: usize, applied: u64) -> Check {
        let replica = self.hosts[r].replica.as_ref().expect("up");
        let state = replica.state();
        let fail = |detail: String| {
            Err(Violation {
                invariant: inv::LINEARIZABLE_READS,
                detail,
            })
        };
        if let Some(id) = self.acked_jobs[..acked]
            .iter()
            .find(|id| state.job(**id).is_none())
        {
            return fail(format!(
                "replica {} answered a read at applied index {} (term {}) without job {id}, acknowledged before the read was sent",
                r + 1,
                state.applied_index,
                replica.term()
            ));
        }
        if state.applied_index < applied {
            return fail(format!(
                "replica {} answered a read at applied index {} (term {}), but index {applied} was applied before the read was sent",
                r + 1,
                state.applied_index,
                replica.term()
            ));
        }
        Ok(())
    }

    /// The next operation of a client: a drain, an undrain, a cancel, a
    /// submission, or a burst of submissions sent at once.
    fn new_op(&mut self, c: usize) -> Vec<Item> {
        let p = &self.plan;
        let roll = self.rng.below(10_000) as u32;
        let (drain, undrain, cancel) = (p.drain_share.0, p.undrain_share.0, p.cancel_share.0);
        let nodes = self.plan.nodes as u64;
        if roll < drain && nodes > 1 {
            let name = self.nodes[self.rng.below(nodes) as usize].name.clone();
            return vec![Item::new(Command::DrainNode { name })];
        }
        if roll < drain + undrain {
            let name = self.nodes[self.rng.below(nodes) as usize].name.clone();
            return vec![Item::new(Command::UndrainNode { name })];
        }
        let remove = p.remove_share.0;
        if roll < drain + undrain + remove {
            let name = self.nodes[self.rng.below(nodes) as usize].name.clone();
            let reason = "the simulated operator removed it".to_string();
            return vec![Item::new(Command::RemoveNode { name, reason })];
        }
        if roll < drain + undrain + remove + cancel && !self.acked_jobs.is_empty() {
            // Half the time the newest job (likely queued or just placed),
            // else any (running, finished, cancelled already...).
            let job = if self.rng.chance(Bp(5_000)) {
                *self.acked_jobs.last().expect("not empty")
            } else {
                *self.rng.pick(&self.acked_jobs)
            };
            return vec![Item::new(Command::Cancel { job })];
        }
        let burst = if self.rng.chance(self.plan.burst_share) {
            self.rng.range(2, self.plan.burst_max)
        } else {
            1
        };
        let mut items = Vec::new();
        for _ in 0..burst {
            if self.submitted >= self.opts.jobs_max {
                break;
            }
            self.submitted += 1;
            let spec = self.new_spec(c);
            let key = (!self.rng.chance(self.plan.no_key_share)).then(|| spec.name.clone());
            items.push(Item {
                retry: key.is_some(),
                cmd: Command::Submit {
                    spec,
                    idempotency_key: key.clone(),
                },
                key,
                done: false,
            });
        }
        items
    }

    fn new_spec(&mut self, c: usize) -> JobSpec {
        if self.rng.chance(self.plan.big_job_share) {
            return self.big_spec(c);
        }
        let mut constraints = Labels::new();
        if self.rng.chance(self.plan.constraint_share) {
            // One to three constraints, each on any label key with any of
            // its values (some that no node has), so that a partial match
            // differs from a full one.
            for _ in 0..self.rng.range(1, 3) {
                let (key, values) = *self.rng.pick(&LABEL_DOMAINS);
                let value = *self.rng.pick(values);
                constraints.insert(key.into(), value.into());
            }
        }
        let priority = self.plan.priority(&mut self.rng);
        let max_secs = self.plan.job_secs_max;
        JobSpec {
            name: format!("c{c}-j{}", self.submitted),
            command: vec!["sim-job".into()],
            env: Default::default(),
            resources: Resources::new(self.rng.range(1, 20) * 100, self.rng.range(1, 32) * 64),
            constraints,
            priority,
            timeout_secs: self.rng.range(1, max_secs + 3),
            max_retries: self.rng.range(0, self.plan.retries_max) as u32,
            workspace: Default::default(),
        }
    }

    /// A big job: 60-100% of one node's whole capacity in each dimension, at
    /// the top priority, with no constraints. It fits that node's total
    /// capacity but, in a busy cluster, rarely any node's free capacity:
    /// the jobs behind it would take every core that frees up, were it not
    /// for the reservation.
    fn big_spec(&mut self, c: usize) -> JobSpec {
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        let capacity = self.nodes[node].capacity;
        let share = self.rng.range(60, 100);
        let max_secs = self.plan.job_secs_max;
        JobSpec {
            name: format!("c{c}-j{}-big", self.submitted),
            command: vec!["sim-job".into()],
            env: Default::default(),
            resources: Resources::new(
                (capacity.cpu_millis * share / 100).max(1),
                (capacity.memory_mb * share / 100).max(1),
            ),
            constraints: Labels::new(),
            priority: 100,
            timeout_secs: self.rng.range(1, max_secs + 3),
            max_retries: self.rng.range(0, self.plan.retries_max) as u32,
            workspace: Default::default(),
        }
    }

    /// Sends every request of the current op that has no answer yet.
    fn client_send(&mut self, c: usize) {
        self.clients[c].backing_off = false;
        let pending: Vec<(usize, Command)> = self.clients[c]
            .op
            .iter()
            .enumerate()
            .filter(|(_, item)| !item.done)
            .map(|(i, item)| (i, item.cmd.clone()))
            .collect();
        for (i, cmd) in pending {
            let req = self.next_request;
            self.next_request += 1;
            self.clients[c].reqs.insert(req, i);
            let target = self.clients[c].target;
            self.send(
                Ep::Client(c),
                Ep::Replica(target),
                0,
                Body::Request { req, cmd },
            );
        }
        let client = &mut self.clients[c];
        client.gen += 1;
        let gen = client.gen;
        let timeout = self.plan.client_timeout_ms;
        self.push_in(timeout, Ev::ClientWake { client: c, gen });
    }

    fn client_done(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.op.clear();
        client.reqs.clear();
        client.gen += 1;
        let gen = client.gen;
        let gap = self.rng.exp_ms(self.submit_mean_gap_ms);
        self.push_in(gap, Ev::ClientWake { client: c, gen });
    }

    fn client_receive(&mut self, c: usize, body: Body) -> Check {
        if let Body::ReadResponse { req, result } = body {
            if self.clients[c].reading == Some(req) {
                self.clients[c].reading = None;
                if let Err(CommandError::NotLeader { leader }) = result {
                    let next = self.next_replica(self.clients[c].target);
                    self.clients[c].target = match leader {
                        Some(l) => l as usize - 1,
                        None => next,
                    };
                }
                self.client_done(c);
            }
            return Ok(());
        }
        let Body::Response { req, result } = body else {
            return Ok(());
        };
        let Some(&i) = self.clients[c].reqs.get(&req) else {
            return Ok(());
        };
        let Some(item) = self.clients[c].op.get(i).filter(|item| !item.done) else {
            return Ok(());
        };
        match result {
            Ok(Reply::Job(job)) if matches!(item.cmd, Command::Submit { .. }) => {
                let key = item.key.clone();
                self.clients[c].op[i].done = true;
                self.ack(key.as_deref(), &job)?;
            }
            Ok(_) | Err(CommandError::NotFound { .. } | CommandError::Invalid(_)) => {
                self.clients[c].op[i].done = true;
            }
            Err(e) => {
                // Not the leader: go where it says, or try another replica.
                if let CommandError::NotLeader { leader }
                | CommandError::LeadershipLost { leader } = e
                {
                    let next = self.next_replica(self.clients[c].target);
                    let client = &mut self.clients[c];
                    client.target = match leader {
                        Some(l) => l as usize - 1,
                        None => next,
                    };
                }
                // Not ready / overloaded: back off, then retry (or give up).
                let client = &mut self.clients[c];
                client.backing_off = true;
                client.gen += 1;
                let gen = client.gen;
                self.push_in(200, Ev::ClientWake { client: c, gen });
                return Ok(());
            }
        }
        if self.clients[c].op.iter().all(|item| item.done) {
            self.client_done(c);
        }
        Ok(())
    }

    fn ack(&mut self, key: Option<&str>, job: &Job) -> Check {
        self.stats.submissions_acked += 1;
        self.acked_jobs.push(job.id);
        self.checker.client_acked(key, job)
    }

    // --- faults ---

    /// The rate of each fault class per second, in basis points.
    fn fault_weights(&self) -> [u64; 6] {
        let p = &self.plan;
        [
            p.partitions_per_s,
            p.replica_crashes_per_s,
            p.node_crashes_per_s,
            p.pauses_per_s,
            p.clock_jumps_per_s,
            p.agent_stops_per_s,
        ]
        .map(|r| u64::from(r.0))
    }

    fn schedule_fault(&mut self) {
        let rate: u64 = self.fault_weights().iter().sum();
        if let Some(mean_ms) = (1000 * 10_000u64).checked_div(rate) {
            let gap = self.rng.exp_ms(mean_ms);
            self.push_in(gap, Ev::Fault);
        }
    }

    fn fault(&mut self) -> Check {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let p = self.plan.clone();
        let weights = self.fault_weights();
        let roll = self.rng.below(weights.iter().sum());
        let nodes = self.nodes.len() as u64;
        let node = self.rng.below(nodes) as usize;
        let live = self.live_hosts();
        let replica = live[self.rng.below(live.len() as u64) as usize];
        let mut kind = weights.len() - 1;
        let mut acc = 0;
        for (k, w) in weights.iter().enumerate() {
            acc += w;
            if roll < acc {
                kind = k;
                break;
            }
        }
        match kind {
            0 => self.partition(node, replica, &p),
            // In a cluster, now and then the power fails under all of
            // them at once: only what a quorum made durable may count.
            1 if self.hosts.len() > 1 && self.rng.chance(Bp(2_000)) => {
                for r in live {
                    self.crash_replica(r);
                }
            }
            1 => self.crash_replica(replica),
            2 => self.crash_agent(node),
            3 => self.pause(node, replica),
            4 => self.clock_jump(node, replica),
            _ => {
                let drain = self.rng.chance(Bp(5_000));
                self.stop_agent(node, drain)?
            }
        }
        self.schedule_fault();
        Ok(())
    }

    fn pause(&mut self, node: usize, replica: usize) {
        self.stats.pauses += 1;
        let until = self.now + self.rng.range(100, PAUSE_MS_MAX);
        if self.rng.chance(Bp(5_000)) {
            self.hosts[replica].paused_until = until;
        } else {
            self.nodes[node].paused_until = until;
            self.checker.disturbed.insert(self.nodes[node].name.clone());
        }
    }

    fn clock_jump(&mut self, node: usize, replica: usize) {
        self.stats.clock_jumps += 1;
        let jump = self.rng.range(1, CLOCK_JUMP_MS_MAX) as i64;
        let jump = if self.rng.chance(Bp(5_000)) {
            jump
        } else {
            -jump
        };
        if self.rng.chance(Bp(5_000)) {
            self.hosts[replica].clock.offset_ms += jump;
        } else {
            self.nodes[node].clock.offset_ms += jump;
        }
    }

    /// Cuts a node's or a client's links to every replica, or (in a
    /// cluster) one replica's links to every other replica: that replica is
    /// isolated, the leader sometimes. One way only, sometimes.
    fn partition(&mut self, node: usize, replica: usize, p: &FaultPlan) {
        self.stats.partitions += 1;
        let n = self.hosts.len();
        let live = self.live_hosts();
        let pairs: Vec<(Ep, Ep)> = if n > 1 && self.rng.chance(Bp(4_000)) {
            // Half of these cut off the replica the ledger follows.
            let cut = match self.ledger {
                Some(l) if self.rng.chance(Bp(5_000)) => l,
                _ => replica,
            };
            live.iter()
                .filter(|&&o| o != cut)
                .map(|&o| (Ep::Replica(cut), Ep::Replica(o)))
                .collect()
        } else {
            // Mostly a node's link; sometimes a client's.
            let other = if self.rng.chance(Bp(8_000)) || self.clients.is_empty() {
                self.checker.disturbed.insert(self.nodes[node].name.clone());
                Ep::Node(node)
            } else {
                Ep::Client(self.rng.below(self.clients.len() as u64) as usize)
            };
            live.iter().map(|&r| (Ep::Replica(r), other)).collect()
        };
        let one_way = self.rng.chance(p.partition_one_way);
        let outward = self.rng.chance(Bp(5_000));
        let mut links = Vec::new();
        for (a, b) in pairs {
            match (one_way, outward) {
                (true, true) => links.push((a, b)),
                (true, false) => links.push((b, a)),
                (false, _) => links.extend([(a, b), (b, a)]),
            }
        }
        let heal = self.rng.range(100, PARTITION_MS_MAX);
        for (from, to) in links {
            self.blocked.insert((from, to));
            self.push_in(heal, Ev::Unblock { from, to });
        }
    }

    /// End of the fault phase: the network heals, processes resume and
    /// restart, clients stop submitting; the liveness phase begins.
    fn heal(&mut self) -> Check {
        self.phase = Phase::Liveness;
        self.blocked.clear();
        for h in &mut self.hosts {
            h.paused_until = h.paused_until.min(self.now);
        }
        for a in &mut self.nodes {
            a.paused_until = a.paused_until.min(self.now);
        }
        for r in self.live_hosts() {
            if self.hosts[r].replica.is_none() && !self.hosts[r].restart_pending {
                self.push_in(0, Ev::ReplicaRestart { replica: r });
            }
        }
        self.push_in(CONVERGE_CHECK_MS, Ev::Converge);
        Ok(())
    }

    /// Every replica is up with the leader's whole log durable and
    /// applied.
    fn replicas_settled(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        self.hosts.iter().filter(|h| !h.gone).all(|h| {
            h.replica.as_ref().is_some_and(|r| {
                r.applied_index() == leader.last_index()
                    && r.last_index() == leader.last_index()
                    && h.disk.pending.is_empty()
            })
        })
    }

    fn converged(&self) -> bool {
        let Some(replica) = self.leader() else {
            return false;
        };
        replica.is_ready()
            && self.clients.iter().all(|c| c.op.is_empty())
            && self.replacement.as_ref().is_none_or(|op| op.done)
            && self.nodes_settled(replica.state())
            && self.replicas_settled()
            && replica.state().jobs.values().all(|j| {
                // Terminal with its last attempt settled (a cancelled job's
                // attempt stays active until its runner reports the kill).
                j.state.is_terminal() && j.active_attempt().is_none()
                    || j.state == rustci_core::model::JobState::Queued
                        && !self.checker.placeable(j.id)
            })
    }

    fn converge(&mut self) -> Check {
        let deadline = self.heal_at + self.opts.liveness_ms_max;
        if !self.converged() && self.now < deadline {
            self.undrain_all()?;
            self.push_in(CONVERGE_CHECK_MS, Ev::Converge);
            return Ok(());
        }
        self.final_checks()?;
        if !self.converged() {
            return Err(Violation {
                invariant: inv::LIVE_JOBS,
                detail: format!(
                    "not converged {} ms after healing (leader: {:?}, clients idle: {}, nodes registered and idle: {}, replicas caught up: {}, replacement done: {})",
                    self.opts.liveness_ms_max,
                    self.ledger.map(|r| r + 1),
                    self.clients.iter().all(|c| c.op.is_empty()),
                    self.leader().is_some_and(|r| self.nodes_settled(r.state())),
                    self.replicas_settled(),
                    self.replacement.as_ref().is_none_or(|op| op.done),
                ),
            });
        }
        self.phase = Phase::Done;
        Ok(())
    }

    /// After healing, an operator ends every drain, so that every job that
    /// some node could ever run must finish.
    fn undrain_all(&mut self) -> Check {
        let Some(r) = self.ledger else {
            return Ok(());
        };
        let now = self.replica_now(r);
        let Some(replica) = self.hosts[r].replica.as_mut() else {
            return Ok(());
        };
        if !replica.is_ready() {
            return Ok(());
        }
        let draining: Vec<String> = replica
            .state()
            .nodes
            .values()
            .filter(|n| n.state == rustci_core::model::NodeState::Draining)
            .map(|n| n.name.clone())
            .collect();
        for name in draining {
            let req = self.next_request;
            self.next_request += 1;
            self.routes.insert(req, (r, Route::Internal));
            replica.propose(now, req, Command::UndrainNode { name });
        }
        self.drain_outputs(r)
    }

    fn final_checks(&mut self) -> Check {
        Checker::live_leader(self.leader().map(|r| r.lifecycle()))?;
        let leader = self.ledger.expect("a live leader");
        let state = self.leader().expect("a live leader").state();
        self.checker.acked_present(state)?;
        self.checker.live_jobs(state)?;
        let results = self.live_agent_results();
        Checker::live_results(state, &results)?;
        // Every replica holds the same state.
        for (r, h) in self.hosts.iter().enumerate().filter(|(_, h)| !h.gone) {
            let other = h.replica.as_ref().expect("all up").state();
            if other.digest() != state.digest() {
                return Err(Violation {
                    invariant: inv::STATE_MACHINE_SAFETY,
                    detail: format!(
                        "replica {} digests {:x}, the leader {:x}",
                        r + 1,
                        other.digest(),
                        state.digest()
                    ),
                });
            }
        }
        let jobs = state.jobs.len() as u64;
        let terminal = state
            .jobs
            .values()
            .filter(|j| j.state.is_terminal())
            .count() as u64;
        self.stats.jobs = jobs;
        self.stats.jobs_terminal = terminal;
        self.check_replay_if_quiescent(leader, true)?;
        for r in self.live_hosts() {
            self.check_replay_if_quiescent(r, true)?;
        }
        if self.replacement.as_ref().is_none_or(|op| op.done) {
            self.check_membership()?;
        }
        Ok(())
    }

    /// At the end: the committed log's last membership (the replicas it
    /// started with if none) is exactly the replicas running, the replaced
    /// one is out of it, and every live replica counts exactly those
    /// voters and reports them as its committed members.
    fn check_membership(&self) -> Check {
        let committed: BTreeSet<ReplicaId> = self
            .committed
            .iter()
            .rev()
            .find_map(|e| match &e.event {
                Event::MembersChanged { members } => Some(members.keys().copied().collect()),
                _ => None,
            })
            .unwrap_or_else(|| (1..=self.opts.replicas as ReplicaId).collect());
        let fail = |detail: String| {
            Err(Violation {
                invariant: inv::MEMBERSHIP,
                detail,
            })
        };
        let live: BTreeSet<ReplicaId> = self
            .live_hosts()
            .into_iter()
            .map(|r| r as ReplicaId + 1)
            .collect();
        if committed != live {
            return fail(format!(
                "the committed membership is {committed:?}, the replicas running are {live:?}"
            ));
        }
        if let Some(removed) = self.replacement.as_ref().and_then(|op| op.removed) {
            if committed.contains(&(removed as ReplicaId + 1)) {
                return fail(format!(
                    "replica {} was removed, yet the committed membership {committed:?} holds it",
                    removed + 1
                ));
            }
        }
        for r in self.live_hosts() {
            let replica = self.hosts[r].replica.as_ref().expect("all up");
            let voters = replica.voters();
            let members: BTreeSet<ReplicaId> = replica.members().keys().copied().collect();
            if voters != committed || members != committed {
                return fail(format!(
                    "replica {} counts voters {voters:?} and members {members:?}, the committed membership is {committed:?}",
                    r + 1
                ));
            }
        }
        Ok(())
    }

    // --- the operator's replacement of a replica ---

    /// A replica dies with its disk, for good (the leader, in some seeds);
    /// the operator asks a live replica to remove it.
    fn replace_start(&mut self) -> Check {
        let Some(op) = self.replacement.as_ref() else {
            return Ok(());
        };
        let live = self.live_hosts();
        let victim = match self.ledger {
            Some(l) if op.leader => l,
            _ => live[(op.pick % live.len() as u64) as usize],
        };
        let host = &mut self.hosts[victim];
        host.replica = None;
        host.inc += 1;
        host.disk = Disk::default();
        host.gone = true;
        host.restart_pending = true;
        if self.ledger == Some(victim) {
            self.ledger = None;
        }
        // Connections die with the process.
        self.routes.retain(|_, (at, _)| *at != victim);
        let target = self.next_replica(victim);
        let op = self.replacement.as_mut().expect("a replacement");
        op.removed = Some(victim);
        op.target = target;
        op.change = Some(MemberChange::Remove {
            id: victim as ReplicaId + 1,
        });
        self.operator_send();
        Ok(())
    }

    /// Sends the current change to the replica the operator asks, and
    /// waits for the answer.
    fn operator_send(&mut self) {
        let req = self.next_request;
        let Some(op) = self.replacement.as_mut() else {
            return;
        };
        let Some(change) = op.change.clone() else {
            return;
        };
        self.next_request += 1;
        op.reqs.insert(req);
        op.gen += 1;
        let (gen, target) = (op.gen, op.target);
        let cmd = Command::ChangeMembers(change);
        self.send(
            Ep::Operator,
            Ep::Replica(target),
            0,
            Body::Request { req, cmd },
        );
        self.push_in(OPERATOR_TIMEOUT_MS, Ev::OperatorWake { gen, next: true });
    }

    fn operator_wake(&mut self, gen: u64, next: bool) -> Check {
        let Some(op) = self.replacement.as_ref().filter(|op| op.gen == gen) else {
            return Ok(());
        };
        if next {
            // No answer: this replica may be cut off, paused or dead.
            let target = self.next_replica(op.target);
            self.replacement.as_mut().expect("a replacement").target = target;
        }
        self.operator_send();
        Ok(())
    }

    fn operator_receive(&mut self, body: Body) -> Check {
        let Body::Response { req, result } = body else {
            return Ok(());
        };
        let Some(op) = self.replacement.as_ref() else {
            return Ok(());
        };
        let Some(change) = op.change.clone().filter(|_| op.reqs.contains(&req)) else {
            return Ok(());
        };
        let next = self.next_replica(op.target);
        let back_off = |w: &mut World| {
            let op = w.replacement.as_mut().expect("a replacement");
            op.gen += 1;
            let gen = op.gen;
            w.push_in(200, Ev::OperatorWake { gen, next: false });
            Ok(())
        };
        match result {
            Ok(Reply::Members(members)) => self.change_made(change, members),
            Err(CommandError::NotLeader { leader } | CommandError::LeadershipLost { leader }) => {
                self.replacement.as_mut().expect("a replacement").target = match leader {
                    Some(l) => l as usize - 1,
                    None => next,
                };
                back_off(self)
            }
            // Once the change before it, or the leader's first entry, is
            // committed; or once the leader has room.
            Err(
                CommandError::Membership { retry: true, .. }
                | CommandError::Overloaded
                | CommandError::Stopping,
            ) => back_off(self),
            other => Err(Violation {
                invariant: inv::MEMBERSHIP,
                detail: format!("the operator's {change:?} was answered {other:?}"),
            }),
        }
    }

    /// The change the operator asked for is committed, `members` after it:
    /// after the removal, a new replica starts with an empty disk and the
    /// operator adds it; after the addition, the replacement is done.
    fn change_made(&mut self, change: MemberChange, members: BTreeMap<ReplicaId, String>) -> Check {
        let mut live: BTreeSet<ReplicaId> = self
            .live_hosts()
            .into_iter()
            .map(|r| r as ReplicaId + 1)
            .collect();
        let fail = |detail: String| {
            Err(Violation {
                invariant: inv::MEMBERSHIP,
                detail,
            })
        };
        match change {
            MemberChange::Remove { id } => {
                let ids: BTreeSet<ReplicaId> = members.keys().copied().collect();
                if ids != live {
                    return fail(format!(
                        "removing replica {id} was answered with members {ids:?}, the replicas left are {live:?}"
                    ));
                }
                let r = self.hosts.len();
                let id = r as ReplicaId + 1;
                let addr = replica_addr(id);
                let mut addrs = members;
                addrs.insert(id, addr.clone());
                let clock = Clock::draw(&mut self.rng, self.opts.drift_ppm_max);
                self.hosts.push(ReplicaHost::new(clock, addrs));
                self.restart_replica_now(r);
                self.after_input(r, 0, None)?;
                self.drain_outputs(r)?;
                let op = self.replacement.as_mut().expect("a replacement");
                op.added = Some(r);
                op.change = Some(MemberChange::Add { id, addr });
                op.reqs.clear();
                self.operator_send();
                Ok(())
            }
            MemberChange::Add { id, addr } => {
                live.insert(id);
                let ids: BTreeSet<ReplicaId> = members.keys().copied().collect();
                if ids != live || members.get(&id) != Some(&addr) {
                    return fail(format!(
                        "adding replica {id} at {addr} was answered with members {members:?}, the replicas are {live:?}"
                    ));
                }
                let op = self.replacement.as_mut().expect("a replacement");
                op.change = None;
                op.done = true;
                op.reqs.clear();
                op.gen += 1;
                self.stats.replacements += 1;
                Ok(())
            }
        }
    }
}

impl Ev {
    /// `Some(t)` when the event's process is paused until `t`: the event
    /// waits (a paused process handles nothing, its timers fire late).
    fn trace_key_target_paused(&self, w: &World) -> Option<u64> {
        let until = w.paused_until(self.target()?);
        (until > w.now).then_some(until)
    }
}

/// The label keys nodes carry and constraints ask for, with their values;
/// the last value of each is one no node ever has.
const LABEL_DOMAINS: [(&str, &[&str]); 4] = [
    ("os", &["linux", "macos", "plan9"]),
    ("arch", &["x86_64", "aarch64", "riscv"]),
    ("zone", &["a", "b", "c", "z"]),
    ("gpu", &["yes", "no", "maybe"]),
];

/// A node's labels: an os, an arch and a zone always, a gpu sometimes.
pub(crate) fn draw_labels(rng: &mut SimRng) -> Labels {
    let mut labels = Labels::new();
    for (key, values) in LABEL_DOMAINS {
        if key == "gpu" && rng.chance(Bp(6_000)) {
            continue;
        }
        // Never the last value (no node has it).
        let value = values[rng.below(values.len() as u64 - 1) as usize];
        labels.insert(key.into(), value.into());
    }
    labels
}
