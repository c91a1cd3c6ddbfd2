//! Membership changes (Ongaro's thesis §4.1-4.4, one voter at a time)
//! against the sans-IO node in `core/src/raft`, through its public inputs
//! and outputs only: a small lossless network of nodes whose drivers
//! persist at once, keep a snapshot and a log on a "disk", apply committed
//! entries and restart from what they stored.

use std::collections::{BTreeMap, BTreeSet};

use rustci_core::raft::{
    Body, ChangeError, Config, Entry, HardState, LogIndex, Message, NodeId, Payload, Raft,
    Recovered, Role, SnapshotMeta, Term, Voters,
};

/// The test payload: a command, a leader's first entry, or a change of the
/// voters to exactly this set.
#[derive(Clone, Debug, PartialEq, Eq)]
enum D {
    Cmd(u64),
    Elected { term: Term, leader: NodeId },
    Voters(Voters),
}

impl Payload for D {
    fn size_bytes(&self) -> u64 {
        8
    }
    fn leader_elected(term: Term, leader: NodeId, _stamp: u64) -> D {
        D::Elected { term, leader }
    }
    fn voters_change(&self) -> Option<Voters> {
        match self {
            D::Voters(v) => Some(*v),
            _ => None,
        }
    }
}

const ELECTION_MS: u64 = 100;
const HEARTBEAT_MS: u64 = 10;

fn v(ids: &[NodeId]) -> Voters {
    ids.iter().collect()
}

fn config(id: NodeId, voters: &[NodeId]) -> Config {
    let mut c = Config::new(id, voters.iter().copied(), id);
    c.election_timeout_ms = ELECTION_MS;
    c.heartbeat_interval_ms = HEARTBEAT_MS;
    // Followers that lag are served from storage, not from memory.
    c.cache_entries_max = 2;
    c.append_entries_max = 4;
    c
}

/// The application: every entry applied, in order (index `i` at `i - 1`).
type App = Vec<(Term, D)>;

/// The voters an application state was last changed to, if ever.
fn app_voters(app: &App) -> Option<Voters> {
    app.iter().rev().find_map(|(_, d)| d.voters_change())
}

struct Node {
    config: Config,
    /// None while down.
    r: Option<Raft<D>>,
    /// What the disk holds: a snapshot (of the application), the log after
    /// it, the hard state.
    snap: (SnapshotMeta, App),
    log: Vec<Entry<D>>,
    hard: HardState,
    app: App,
    /// Snapshots received with an InstallSnapshot, until the next ready.
    received: BTreeMap<SnapshotMeta, App>,
    /// The voters of the latest `Ready::voters`.
    reported: Option<Voters>,
    /// Every configuration reported, in order.
    reported_all: Vec<Voters>,
}

impl Node {
    fn new(config: Config, now: u64) -> Node {
        Node {
            r: Some(Raft::new(config.clone(), Recovered::empty(), now)),
            config,
            snap: (SnapshotMeta::default(), Vec::new()),
            log: Vec::new(),
            hard: HardState::default(),
            app: Vec::new(),
            received: BTreeMap::new(),
            reported: None,
            reported_all: Vec::new(),
        }
    }

    fn r(&mut self) -> &mut Raft<D> {
        self.r.as_mut().expect("the node is up")
    }

    fn base(&self) -> LogIndex {
        self.snap.0.index
    }

    fn stored(&self, index: LogIndex) -> Option<Entry<D>> {
        let base = self.base();
        (index > base)
            .then(|| self.log.get((index - base - 1) as usize).cloned())
            .flatten()
    }

    /// Acts on the node's ready as a driver does (persisting at once);
    /// returns the messages to send.
    fn ready(&mut self) -> Vec<Message<D>> {
        let Some(r) = self.r.as_mut() else {
            return Vec::new();
        };
        let ready = r.ready();
        if let Some(voters) = ready.voters {
            self.reported = Some(voters);
            self.reported_all.push(voters);
        }
        if let Some(p) = &ready.persist {
            if let Some(meta) = p.snapshot {
                let app = self.received.remove(&meta).expect("received");
                self.snap = (meta, app);
                self.log.clear();
            }
            let base = self.snap.0.index;
            if let Some(from) = p.truncate_from {
                self.log.truncate((from - base - 1) as usize);
            }
            self.log.extend(p.entries.iter().cloned());
            if let Some(hs) = p.hard_state {
                self.hard = hs;
            }
            if let Some((index, term)) = p.last() {
                r.persisted(index, term);
            }
        }
        if ready.restore.is_some() {
            self.app = self.snap.1.clone();
        }
        for e in ready.committed {
            assert_eq!(e.index as usize, self.app.len() + 1, "applied in order");
            self.app.push((e.term, e.data));
        }
        for need in ready.need_entries {
            let entries: Vec<Entry<D>> = (need.from..=need.to)
                .map(|i| self.stored(i))
                .collect::<Option<_>>()
                .unwrap_or_default();
            self.r
                .as_mut()
                .expect("up")
                .entries_loaded(need.peer, entries);
        }
        self.received.clear();
        ready.messages
    }

    /// Snapshots the applied state and compacts the log behind it.
    fn compact(&mut self) {
        let index = self.app.len() as u64;
        let term = self.app.last().expect("applied").0;
        let dropped = (index - self.base()) as usize;
        self.log.drain(..dropped);
        self.snap = (SnapshotMeta { index, term }, self.app.clone());
        self.r().compact(index);
    }

    /// Restarts from the disk: restores the snapshot, replays the log up to
    /// the stored commit index, and names the configurations it went
    /// through (the snapshot's, then the log's, by `from_snapshot`).
    fn restart(&mut self, now: u64) {
        let (meta, state) = self.snap.clone();
        let mut recovered = Recovered::from_snapshot(self.hard, meta, &self.log);
        if let Some(voters) = app_voters(&state) {
            recovered = recovered.with_snapshot_voters(voters);
        }
        let commit = self.hard.commit.max(meta.index);
        self.app = state;
        let replay = (commit - meta.index) as usize;
        self.app
            .extend(self.log[..replay].iter().map(|e| (e.term, e.data.clone())));
        self.received.clear();
        self.reported = None;
        self.r = Some(Raft::new(self.config.clone(), recovered, now));
    }
}

/// A lossless network; nodes in `cut` neither send nor receive.
struct Net {
    now: u64,
    nodes: BTreeMap<NodeId, Node>,
    cut: BTreeSet<NodeId>,
}

impl Net {
    /// A group of `ids`, every node with them as its bootstrap voters.
    fn new(ids: &[NodeId]) -> Net {
        let mut net = Net {
            now: 0,
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
        };
        for &id in ids {
            net.start(id, ids);
        }
        net
    }

    /// Starts a node with an empty disk and bootstrap `voters`.
    fn start(&mut self, id: NodeId, voters: &[NodeId]) {
        let node = Node::new(config(id, voters), self.now);
        self.nodes.insert(id, node);
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).expect("node")
    }

    fn r(&mut self, id: NodeId) -> &mut Raft<D> {
        self.node(id).r()
    }

    /// Every node's ready, then every message; false once there was
    /// nothing to do.
    fn round(&mut self) -> bool {
        let mut queue = Vec::new();
        for n in self.nodes.values_mut() {
            queue.extend(n.ready());
        }
        // Entries loaded for a follower leave in the next ready.
        let busy = !queue.is_empty()
            || self
                .nodes
                .values()
                .any(|n| n.r.as_ref().is_some_and(|r| r.has_ready()));
        for m in queue {
            if self.cut.contains(&m.from) || self.cut.contains(&m.to) {
                continue;
            }
            let snapshot = match &m.body {
                Body::InstallSnapshot { meta, .. } => {
                    let stored = &self.nodes[&m.from].snap;
                    if stored.0 != *meta {
                        continue;
                    }
                    Some((*meta, stored.1.clone()))
                }
                _ => None,
            };
            let Some(to) = self.nodes.get_mut(&m.to).filter(|n| n.r.is_some()) else {
                continue;
            };
            if let Some((meta, app)) = snapshot {
                to.received.insert(meta, app);
            }
            to.r().step(m);
        }
        busy
    }

    /// Delivers until nothing moves (time stands still).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if !self.round() {
                return;
            }
        }
        panic!("the network did not settle");
    }

    /// Time passes in steps of 5 ms, the network settling after each.
    fn run(&mut self, ms: u64) {
        for _ in 0..ms / 5 {
            self.now += 5;
            let now = self.now;
            for n in self.nodes.values_mut() {
                if let Some(r) = &mut n.r {
                    r.tick(now);
                }
            }
            self.settle();
        }
    }

    /// The leader of the highest term among the nodes that are up.
    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(&id, n)| n.r.as_ref().map(|r| (id, r)))
            .filter(|(_, r)| r.role() == Role::Leader)
            .max_by_key(|(_, r)| r.term())
            .map(|(id, _)| id)
    }

    /// `id` campaigns now and wins; its first entry is committed.
    fn elect(&mut self, id: NodeId) {
        self.r(id).campaign_now();
        self.settle();
        assert_eq!(self.leader(), Some(id));
        assert_eq!(self.r(id).commit_index(), self.r(id).last_index());
    }

    /// Proposes commands `cmds` at the leader `id` and settles.
    fn commands(&mut self, id: NodeId, cmds: std::ops::Range<u64>) {
        for c in cmds {
            self.r(id).propose(D::Cmd(c)).expect("leader");
            self.settle();
        }
    }

    fn app(&self, id: NodeId) -> &App {
        &self.nodes[&id].app
    }

    fn applied_cmd(&self, id: NodeId, c: u64) -> bool {
        self.app(id).iter().any(|e| e.1 == D::Cmd(c))
    }
}

/// A voter added to a group of two catches up (from storage, since the
/// leader keeps few entries in memory) and counts for commit at once: with
/// the old member cut off, the leader commits with the new one.
#[test]
fn an_added_voter_catches_up_and_counts_for_commit() {
    let mut net = Net::new(&[1, 2]);
    net.elect(1);
    net.commands(1, 0..10);
    // The new member starts empty, with the configuration that adds it.
    net.start(3, &[1, 2, 3]);
    let index = net.r(1).propose_change(D::Voters(v(&[1, 2, 3]))).unwrap();
    assert_eq!(net.r(1).voters(), v(&[1, 2, 3]), "in effect at once");
    assert!(net.r(1).progress(3).is_some(), "the leader tracks it");
    net.settle();
    assert!(net.r(1).commit_index() >= index);
    for id in [2, 3] {
        assert_eq!(net.app(id), net.app(1), "node {id}");
        assert_eq!(net.nodes[&id].reported, Some(v(&[1, 2, 3])), "node {id}");
    }
    // Only the new voter makes the quorum now.
    net.cut.insert(2);
    net.commands(1, 10..11);
    assert!(net.applied_cmd(1, 10));
    assert!(net.applied_cmd(3, 10));
    assert!(!net.applied_cmd(2, 10));
    // And the group still needs a majority of three.
    net.cut.insert(3);
    net.commands(1, 11..12);
    assert!(!net.applied_cmd(1, 11));
}

/// A dead follower removed from a group of four: the change commits with
/// two of the three voters left, and so does everything after it, where
/// the old quorum (three of four) could commit nothing.
#[test]
fn removing_a_dead_follower_lets_commit_proceed_with_the_smaller_quorum() {
    let mut net = Net::new(&[1, 2, 3, 4]);
    net.elect(1);
    net.commands(1, 0..3);
    net.cut.insert(3);
    net.cut.insert(4);
    net.commands(1, 3..4);
    assert!(!net.applied_cmd(1, 3), "two of four commit nothing");
    let index = net.r(1).propose_change(D::Voters(v(&[1, 2, 3]))).unwrap();
    assert_eq!(net.r(1).progress(4), None, "a removed voter is forgotten");
    net.settle();
    assert_eq!(net.r(1).commit_index(), index, "two of three");
    assert!(net.applied_cmd(1, 3) && net.applied_cmd(2, 3));
    net.commands(1, 4..5);
    assert!(net.applied_cmd(2, 4));
    assert_eq!(net.r(2).voters(), v(&[1, 2, 3]));
}

/// A leader that removes itself keeps leading without counting itself (the
/// change needs both remaining voters), steps down once the change is
/// committed, hands over at once, and never campaigns again.
#[test]
fn a_leader_that_removes_itself_steps_down_once_the_change_commits() {
    let mut net = Net::new(&[1, 2, 3]);
    net.elect(1);
    let term = net.r(1).term();
    net.cut.insert(3);
    let index = net.r(1).propose_change(D::Voters(v(&[2, 3]))).unwrap();
    assert!(!net.r(1).is_voter());
    net.r(1).propose(D::Cmd(1)).expect("it still leads");
    net.settle();
    assert_eq!(
        net.r(1).role(),
        Role::Leader,
        "1 and 2 hold the change, but only 2 of {{2, 3}} counts"
    );
    assert!(net.r(1).commit_index() < index);
    net.cut.remove(&3);
    net.run(HEARTBEAT_MS);
    assert!(
        net.r(1).commit_index() > index,
        "the change and the command after it"
    );
    assert_eq!(net.r(1).role(), Role::Follower, "stepped down");
    // TimeoutNow: one of the others leads without waiting for a timeout.
    let leader = net.leader().expect("a new leader");
    assert!(leader == 2 || leader == 3);
    assert_eq!(net.r(leader).term(), term + 1);
    net.commands(leader, 2..3);
    let other = 5 - leader;
    assert!(net.applied_cmd(other, 2));
    // Node 1 hears from nobody now, and stays a follower forever.
    net.run(10 * ELECTION_MS);
    assert_eq!(net.r(1).role(), Role::Follower);
    assert!(net.r(1).term() <= term + 1);
    assert_eq!(net.leader(), Some(leader));
}

/// The operator replaces a dead replica: removes it, then adds a new one
/// (which starts empty with the new configuration). The new one catches up
/// from the log, or, once the leader compacted, from the snapshot whose
/// configuration (taken before it was added) does not name it yet.
#[test]
fn a_dead_replica_is_replaced_and_the_new_one_catches_up_by_log_or_snapshot() {
    for compacted in [false, true] {
        let mut net = Net::new(&[1, 2, 3]);
        net.elect(1);
        net.commands(1, 0..10);
        net.node(3).r = None;
        let removed = net.r(1).propose_change(D::Voters(v(&[1, 2]))).unwrap();
        net.settle();
        assert_eq!(net.r(1).commit_index(), removed);
        net.commands(1, 10..12);
        if compacted {
            net.node(1).compact();
        }
        net.start(4, &[1, 2, 4]);
        net.r(1).propose_change(D::Voters(v(&[1, 2, 4]))).unwrap();
        net.settle();
        assert_eq!(net.app(4), net.app(1), "compacted: {compacted}");
        assert_eq!(net.r(4).voters(), v(&[1, 2, 4]));
        assert_eq!(
            net.node(4).snap.0.index > 0,
            compacted,
            "installed a snapshot"
        );
        if compacted {
            // The snapshot's configuration, then the change after it.
            assert_eq!(
                net.nodes[&4].reported_all,
                vec![v(&[1, 2, 4]), v(&[1, 2]), v(&[1, 2, 4])]
            );
        }
        // The new replica counts: with 2 cut off, 1 and 4 commit.
        net.cut.insert(2);
        net.commands(1, 12..13);
        assert!(net.applied_cmd(4, 12), "compacted: {compacted}");
    }
}

/// One change at a time: a second one is refused until the first is
/// committed; so is a change of two voters, one that leaves no voter or too
/// many, one that is no change, one during a transfer or at a follower.
#[test]
fn a_change_is_refused_unless_it_is_the_only_one_and_changes_one_voter() {
    let mut net = Net::new(&[1, 2, 3]);
    net.elect(1);
    let index = net.r(1).propose_change(D::Voters(v(&[1, 2]))).unwrap();
    assert_eq!(
        net.r(1).propose_change(D::Voters(v(&[1]))),
        Err(ChangeError::ChangePending { index })
    );
    net.settle();
    let r = net.r(1);
    assert_eq!(
        r.propose_change(D::Voters(v(&[1, 3]))),
        Err(ChangeError::NotOneVoter {
            from: v(&[1, 2]),
            to: v(&[1, 3])
        })
    );
    assert_eq!(
        r.propose_change(D::Voters(v(&[1, 2]))),
        Err(ChangeError::NotOneVoter {
            from: v(&[1, 2]),
            to: v(&[1, 2])
        })
    );
    assert_eq!(r.propose_change(D::Cmd(1)), Err(ChangeError::NotAChange));
    assert_eq!(
        net.r(2).propose_change(D::Voters(v(&[1]))),
        Err(ChangeError::NotLeader {
            leader_hint: Some(1)
        })
    );
    net.r(1).transfer_leadership(2).unwrap();
    assert_eq!(
        net.r(1).propose_change(D::Voters(v(&[1]))),
        Err(ChangeError::Transferring { to: 2 })
    );

    // A single voter cannot remove itself; seven cannot become eight.
    let mut net = Net::new(&[1]);
    net.elect(1);
    assert_eq!(
        net.r(1).propose_change(D::Voters(Voters::new())),
        Err(ChangeError::NoVoters)
    );
    let seven: Vec<NodeId> = (1..=7).collect();
    let mut net = Net::new(&seven);
    net.elect(1);
    assert_eq!(
        net.r(1)
            .propose_change(D::Voters(v(&[1, 2, 3, 4, 5, 6, 7, 8]))),
        Err(ChangeError::TooManyVoters)
    );
}

/// A new leader that has not committed an entry of its own term refuses a
/// change (Ongaro, raft-dev 2015: otherwise a change of a deposed leader
/// that it does not know of can be lost after it commits its own, and two
/// disjoint majorities elect two leaders); once its first entry commits, it
/// takes one.
#[test]
fn a_change_before_the_leader_committed_in_its_term_is_refused() {
    let mut net = Net::new(&[1, 2, 3]);
    net.cut.insert(2);
    net.cut.insert(3);
    // Node 1 elected by hand: its first entry is not committed.
    net.r(1).campaign_now();
    let term = net.r(1).term() + 1;
    net.node(1).ready();
    for from in [2, 3] {
        net.r(1).step(Message {
            from,
            to: 1,
            term,
            body: Body::PreVoteResp { granted: true },
        });
    }
    net.node(1).ready();
    net.r(1).step(Message {
        from: 2,
        to: 1,
        term,
        body: Body::VoteResp { granted: true },
    });
    assert_eq!(net.r(1).role(), Role::Leader);
    assert_eq!(
        net.r(1).propose_change(D::Voters(v(&[1, 2]))),
        Err(ChangeError::NoCommitInTerm)
    );
    net.cut.clear();
    net.settle();
    assert!(net.r(1).propose_change(D::Voters(v(&[1, 2]))).is_ok());
}

/// A change that only its leader holds is lost when another leader is
/// elected: the truncation reverts the old leader's configuration (and the
/// driver hears of it), and a follower's likewise.
#[test]
fn an_uncommitted_change_truncated_by_a_new_leader_reverts_the_configuration() {
    let mut net = Net::new(&[1, 2, 3]);
    net.elect(1);
    net.cut.insert(1);
    net.r(1).propose_change(D::Voters(v(&[1, 2]))).unwrap();
    net.settle();
    assert_eq!(net.nodes[&1].reported, Some(v(&[1, 2])));
    // 2 and 3 never saw it; one of them leads after a timeout.
    net.run(3 * ELECTION_MS);
    let leader = net.leader().expect("a leader");
    assert!(leader == 2 || leader == 3);
    net.commands(leader, 0..1);
    net.cut.clear();
    net.run(3 * HEARTBEAT_MS);
    assert_eq!(net.r(1).voters(), v(&[1, 2, 3]), "reverted");
    assert_eq!(net.nodes[&1].reported, Some(v(&[1, 2, 3])));
    assert_eq!(net.app(1), net.app(leader));

    // A follower that holds an uncommitted change and gets another
    // leader's entry at its index.
    let e = |index, term, data| Entry { index, term, data };
    let log = vec![e(1, 1, D::Cmd(1)), e(2, 1, D::Voters(v(&[1, 2])))];
    let hs = HardState {
        term: 1,
        vote: None,
        commit: 1,
    };
    let mut r: Raft<D> = Raft::new(config(1, &[1, 2, 3]), Recovered::from_log(hs, &log), 0);
    assert_eq!(r.voters(), v(&[1, 2]), "the tail's change is in effect");
    assert_eq!(r.voters_committed(), v(&[1, 2, 3]));
    r.step(Message {
        from: 3,
        to: 1,
        term: 2,
        body: Body::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![e(2, 2, D::Cmd(2))],
            commit: 2,
        },
    });
    assert_eq!(r.voters(), v(&[1, 2, 3]), "reverted");
    assert_eq!(r.ready().voters, Some(v(&[1, 2, 3])));
}

/// Every node restarts from its disk after a replacement and a compaction:
/// each recovers the configuration (from the snapshot, the replayed log or
/// the tail), and the group elects and commits with the new voters.
#[test]
fn a_restart_recovers_the_configuration() {
    let mut net = Net::new(&[1, 2, 3]);
    net.elect(1);
    net.commands(1, 0..5);
    net.node(3).r = None;
    net.r(1).propose_change(D::Voters(v(&[1, 2]))).unwrap();
    net.settle();
    net.commands(1, 5..7);
    net.start(4, &[1, 2, 4]);
    net.r(1).propose_change(D::Voters(v(&[1, 2, 4]))).unwrap();
    net.settle();
    net.commands(1, 7..9);
    net.node(2).compact();
    let now = net.now;
    for id in [1, 2, 4] {
        net.node(id).restart(now);
        assert_eq!(net.r(id).voters(), v(&[1, 2, 4]), "node {id}");
    }
    // Node 2 restarted from a snapshot that holds both changes.
    assert!(net.nodes[&2].snap.0.index > 0);
    net.run(4 * ELECTION_MS);
    let leader = net.leader().expect("a leader");
    net.cut.insert(if leader == 1 { 2 } else { 1 });
    net.commands(leader, 9..10);
    assert!(net.applied_cmd(4, 9) || leader == 4);

    // A change still in the tail (not known committed) is in effect after
    // a restart, the committed one before it is what it reverts to.
    let e = |index, term, data| Entry { index, term, data };
    let log = vec![
        e(1, 1, D::Voters(v(&[1, 2]))),
        e(2, 1, D::Voters(v(&[1, 2, 5]))),
    ];
    let hs = HardState {
        term: 1,
        vote: None,
        commit: 1,
    };
    let mut r: Raft<D> = Raft::new(config(1, &[1, 2, 3]), Recovered::from_log(hs, &log), 0);
    assert_eq!(
        (r.voters(), r.voters_committed()),
        (v(&[1, 2, 5]), v(&[1, 2]))
    );
    assert_eq!(r.ready().voters, Some(v(&[1, 2, 5])), "reported at start");
}

/// A voter whose log lacks the change that added another node still
/// follows and votes for it (thesis §4.1: requests are processed whatever
/// the configuration): here the new node is the only one that can lead.
#[test]
fn a_voter_that_lacks_the_change_votes_for_and_follows_the_new_member() {
    let mut net = Net::new(&[1, 2]);
    net.elect(1);
    net.commands(1, 0..3);
    net.start(3, &[1, 2, 3]);
    net.cut.insert(2);
    let index = net.r(1).propose_change(D::Voters(v(&[1, 2, 3]))).unwrap();
    net.settle();
    assert_eq!(net.r(1).commit_index(), index, "1 and 3 of three");
    net.commands(1, 3..4);
    // The leader dies; 2 (whose configuration is {1, 2}) is behind, so
    // only 3 can be elected, with 2's vote.
    net.node(1).r = None;
    net.cut.clear();
    assert_eq!(net.r(2).voters(), v(&[1, 2]));
    net.run(6 * ELECTION_MS);
    assert_eq!(net.leader(), Some(3));
    net.commands(3, 4..5);
    assert!(net.applied_cmd(2, 4));
    assert_eq!(net.r(2).voters(), v(&[1, 2, 3]));
}

/// The voter set prints and serializes as its ids.
#[test]
fn voters_print_and_serialize_as_their_ids() {
    let voters = v(&[3, 1, 63]);
    assert_eq!(format!("{voters:?}"), "{1, 3, 63}");
    assert_eq!(voters.iter().collect::<Vec<_>>(), vec![1, 3, 63]);
    assert_eq!(voters.len(), 3);
    assert_eq!(voters.quorum(), 2);
    let json = serde_json::to_string(&voters).unwrap();
    assert_eq!(json, "[1,3,63]");
    assert_eq!(serde_json::from_str::<Voters>(&json).unwrap(), voters);
    assert!(serde_json::from_str::<Voters>("[0]").is_err());
    assert!(serde_json::from_str::<Voters>("[64]").is_err());
    let mut w = voters;
    assert!(w.remove(63) && !w.remove(63) && w.insert(2) && !w.insert(2));
    assert_eq!(w, v(&[1, 2, 3]));
}
