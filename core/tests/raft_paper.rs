//! The rules of the Raft paper, one scenario each, against the sans-IO node
//! in `core/src/raft` through its public inputs and outputs only. The
//! scenarios follow the list of etcd's `raft_paper_test.go` (names in the
//! comments); the code and the tables are ours, written from the paper.

use rustci_core::raft::{
    Body, Config, Entry, HardState, LogIndex, Message, NodeId, Payload, ProposeError, Raft, Ready,
    Recovered, RejectHint, ReplicationState, Role, SnapshotMeta, Term, TransferError, Voters,
};

/// The test payload: a command number, or a leader's first entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum D {
    Cmd(u64),
    Elected { term: Term, leader: NodeId },
}

impl Payload for D {
    fn size_bytes(&self) -> u64 {
        8
    }
    fn leader_elected(term: Term, leader: NodeId, _stamp: u64) -> D {
        D::Elected { term, leader }
    }
}

const ELECTION_MS: u64 = 100;
const HEARTBEAT_MS: u64 = 10;

fn config(id: NodeId, size: u64) -> Config {
    let mut c = Config::new(id, 1..=size, id);
    c.election_timeout_ms = ELECTION_MS;
    c.heartbeat_interval_ms = HEARTBEAT_MS;
    // The paper's rules on their own; PreVote and CheckQuorum have their
    // own tests below.
    c.pre_vote = false;
    c.check_quorum = false;
    c
}

/// A log whose entry `i` (1-based) has term `terms[i - 1]`.
fn log_of(terms: &[Term]) -> Vec<Entry<D>> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &term)| Entry {
            index: i as u64 + 1,
            term,
            data: D::Cmd(i as u64 + 1),
        })
        .collect()
}

/// A node under test with its own clock and a driver that persists at once.
struct Node {
    r: Raft<D>,
    now: u64,
    size: u64,
    /// What the driver stored: the whole log and the hard state.
    disk: Vec<Entry<D>>,
    hard: HardState,
    config: Config,
}

impl Node {
    fn with(config: Config, hard_state: HardState, terms: &[Term]) -> Node {
        let size = config.voters.len() as u64;
        let disk = log_of(terms);
        let r = Raft::new(config.clone(), Recovered::from_log(hard_state, &disk), 0);
        Node {
            r,
            now: 0,
            size,
            disk,
            hard: hard_state,
            config,
        }
    }

    fn new(id: NodeId, size: u64) -> Node {
        Node::with(config(id, size), HardState::default(), &[])
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.r.tick(self.now);
    }

    /// Times out: past the longest drawn election timeout.
    fn time_out(&mut self) {
        self.advance(2 * ELECTION_MS);
    }

    fn step(&mut self, from: NodeId, term: Term, body: Body<D>) {
        let to = self.r.id();
        self.r.step(Message {
            from,
            to,
            term,
            body,
        });
    }

    /// `ready`, made durable at once, as a driver would.
    fn ready(&mut self) -> Ready<D> {
        let ready = self.r.ready();
        if let Some(p) = &ready.persist {
            if let Some(from) = p.truncate_from {
                self.disk.truncate(from as usize - 1);
            }
            self.disk.extend(p.entries.iter().cloned());
            if let Some(hs) = p.hard_state {
                self.hard = hs;
            }
            if let Some((index, term)) = p.last() {
                self.r.persisted(index, term);
            }
        }
        ready
    }

    /// Crashes and restarts from what the disk holds.
    fn restart(&mut self) {
        let recovered = Recovered::from_log(self.hard, &self.disk);
        self.r = Raft::new(self.config.clone(), recovered, self.now);
    }

    /// Answers the leader's requests for old entries from `disk`.
    fn serve(&mut self, ready: &Ready<D>) {
        for need in &ready.need_entries {
            let entries = self.disk[need.from as usize - 1..need.to as usize].to_vec();
            self.r.entries_loaded(need.peer, entries);
        }
    }

    fn messages(&mut self) -> Vec<Message<D>> {
        let mut msgs = self.ready().messages;
        msgs.sort_by_key(|m| m.to);
        msgs
    }

    /// Wins an election with every peer's vote; its first entry durable.
    fn elect(&mut self) {
        self.time_out();
        assert_eq!(self.r.role(), Role::Candidate);
        let term = self.r.term();
        for peer in 2..=self.size {
            if self.r.role() == Role::Candidate {
                self.step(peer, term, Body::VoteResp { granted: true });
            }
        }
        assert_eq!(self.r.role(), Role::Leader);
    }

    /// Delivers the next ready's messages, every follower accepting every
    /// append; returns the other messages.
    fn ack_all(&mut self) -> Vec<Message<D>> {
        let mut others = Vec::new();
        for m in self.messages() {
            if matches!(m.body, Body::Append { .. }) {
                self.r.step(accept(&m));
            } else {
                others.push(m);
            }
        }
        others
    }
}

/// The answer a follower whose log matches would give to an append.
fn accept(m: &Message<D>) -> Message<D> {
    let Body::Append {
        prev_index,
        entries,
        ..
    } = &m.body
    else {
        panic!("not an append: {m:?}")
    };
    Message {
        from: m.to,
        to: m.from,
        term: m.term,
        body: Body::AppendResp {
            index: prev_index + entries.len() as u64,
            reject: None,
        },
    }
}

// ---- §5.1: terms ----

/// TestFollowerUpdateTermFromMessage, TestCandidateUpdateTermFromMessage,
/// TestLeaderUpdateTermFromMessage: a node that sees a larger term adopts
/// it and becomes a follower of the sender, whatever its role.
#[test]
fn a_larger_term_makes_any_node_a_follower_of_that_term() {
    for role in [Role::Follower, Role::Candidate, Role::Leader] {
        let mut n = Node::new(1, 3);
        match role {
            Role::Candidate => n.time_out(),
            Role::Leader => {
                n.time_out();
                n.step(2, 1, Body::VoteResp { granted: true });
            }
            _ => {}
        }
        assert_eq!(n.r.role(), role);
        n.step(
            2,
            2,
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![],
                commit: 0,
            },
        );
        assert_eq!(n.r.role(), Role::Follower, "from {role:?}");
        assert_eq!(n.r.term(), 2);
        assert_eq!(n.r.leader(), Some(2));
        assert_eq!(n.r.vote(), None, "a new term has no vote yet");
    }
}

/// TestRejectStaleTermMessage: a message of an older term changes nothing;
/// an old leader's append is answered with the newer term so it steps down.
#[test]
fn a_stale_term_message_changes_nothing() {
    let mut n = Node::with(
        config(1, 3),
        HardState {
            term: 2,
            vote: None,
            commit: 0,
        },
        &[],
    );
    n.ready();
    n.step(
        2,
        1,
        Body::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![Entry {
                index: 1,
                term: 1,
                data: D::Cmd(9),
            }],
            commit: 0,
        },
    );
    assert_eq!(n.r.term(), 2);
    assert_eq!(n.r.last_index(), 0, "nothing appended");
    assert_eq!(n.r.leader(), None);
    let msgs = n.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].term, 2);
    assert!(matches!(msgs[0].body, Body::AppendResp { .. }));
    n.step(
        3,
        1,
        Body::Vote {
            last_index: 5,
            last_term: 1,
            transfer: false,
        },
    );
    assert_eq!(n.r.vote(), None);
    assert!(n.messages().is_empty(), "a stale vote request gets no vote");
}

/// A message that claims to come from the node itself or from an id no
/// voter can have changes nothing. (One from a node outside the
/// configuration is processed: see `raft_membership.rs`.)
#[test]
fn a_message_from_itself_or_an_impossible_id_is_ignored() {
    let mut n = Node::new(1, 3);
    for from in [1, 0, 64] {
        n.step(
            from,
            5,
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: log_of(&[5]),
                commit: 1,
            },
        );
        n.step(
            from,
            5,
            Body::Vote {
                last_index: 9,
                last_term: 5,
                transfer: false,
            },
        );
    }
    assert_eq!((n.r.term(), n.r.last_index(), n.r.vote()), (0, 0, None));
    assert!(n.messages().is_empty());
}

// ---- §5.2: elections ----

/// TestStartAsFollower.
#[test]
fn a_node_starts_as_a_follower_without_a_leader() {
    let n = Node::new(1, 3);
    assert_eq!(n.r.role(), Role::Follower);
    assert_eq!(n.r.leader(), None);
    assert_eq!(n.r.term(), 0);
}

/// TestLeaderBcastBeat: every heartbeat interval the leader sends every
/// follower a heartbeat, whose commit is at most what the follower holds.
#[test]
fn a_leader_sends_heartbeats_every_interval() {
    let mut n = Node::new(1, 3);
    n.elect();
    n.messages();
    n.advance(HEARTBEAT_MS);
    let msgs = n.messages();
    assert_eq!(msgs.len(), 2);
    for (m, to) in msgs.iter().zip([2, 3]) {
        assert_eq!(m.to, to);
        assert_eq!(m.term, 1);
        assert_eq!(
            m.body,
            Body::Heartbeat {
                commit: 0,
                round: 1
            }
        );
    }
    n.advance(HEARTBEAT_MS / 2);
    assert!(n.messages().is_empty(), "not before the interval");
}

/// TestFollowerStartElection, TestCandidateStartNewElection: after an
/// election timeout a follower (or a candidate that neither won nor lost)
/// increments its term, votes for itself and asks every other node.
#[test]
fn on_election_timeout_a_node_campaigns_in_the_next_term() {
    let mut n = Node::new(1, 3);
    for term in 1..=3 {
        n.time_out();
        assert_eq!(n.r.role(), Role::Candidate);
        assert_eq!(n.r.term(), term);
        assert_eq!(n.r.vote(), Some(1));
        let ready = n.ready();
        let hs = ready.persist.expect("the vote is persisted").hard_state;
        assert_eq!(
            hs,
            Some(HardState {
                term,
                vote: Some(1),
                commit: 0
            })
        );
        let mut msgs = ready.messages;
        msgs.sort_by_key(|m| m.to);
        assert_eq!(msgs.len(), 2);
        for (m, to) in msgs.iter().zip([2, 3]) {
            assert_eq!((m.to, m.term), (to, term));
            assert_eq!(
                m.body,
                Body::Vote {
                    last_index: 0,
                    last_term: 0,
                    transfer: false
                }
            );
        }
    }
}

/// TestLeaderElectionInOneRoundRPC: a candidate wins with a majority of
/// votes, loses with a majority of refusals, and otherwise waits.
#[test]
fn one_round_of_votes_wins_loses_or_waits() {
    type Case = (u64, &'static [(NodeId, bool)], Role);
    let cases: &[Case] = &[
        (1, &[], Role::Leader),
        (3, &[(2, true), (3, true)], Role::Leader),
        (3, &[(2, true)], Role::Leader),
        (
            5,
            &[(2, true), (3, true), (4, true), (5, true)],
            Role::Leader,
        ),
        (5, &[(2, true), (3, true), (4, true)], Role::Leader),
        (5, &[(2, true), (3, true)], Role::Leader),
        (3, &[(2, false), (3, false)], Role::Follower),
        (
            5,
            &[(2, false), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        (
            5,
            &[(2, true), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        (3, &[], Role::Candidate),
        (5, &[(2, true)], Role::Candidate),
        (5, &[(2, false), (3, false)], Role::Candidate),
        (5, &[], Role::Candidate),
    ];
    for (i, &(size, votes, want)) in cases.iter().enumerate() {
        let mut n = Node::new(1, size);
        n.time_out();
        for &(from, granted) in votes {
            n.step(from, 1, Body::VoteResp { granted });
        }
        assert_eq!(n.r.role(), want, "case {i}");
        assert_eq!(n.r.term(), 1, "case {i}");
    }
}

/// TestFollowerVote: one vote per term, first come first served; the vote
/// goes out with the hard state that records it.
#[test]
fn a_follower_votes_for_at_most_one_candidate_per_term() {
    let cases = [
        (None, 2, true),
        (None, 3, true),
        (Some(2), 2, true),
        (Some(3), 3, true),
        (Some(2), 3, false),
        (Some(3), 2, false),
    ];
    for (i, (vote, candidate, granted)) in cases.into_iter().enumerate() {
        let hs = HardState {
            term: 1,
            vote,
            commit: 0,
        };
        let mut n = Node::with(config(1, 3), hs, &[]);
        n.ready();
        n.step(
            candidate,
            1,
            Body::Vote {
                last_index: 0,
                last_term: 0,
                transfer: false,
            },
        );
        let ready = n.ready();
        assert_eq!(
            ready.messages,
            vec![Message {
                from: 1,
                to: candidate,
                term: 1,
                body: Body::VoteResp { granted }
            }],
            "case {i}"
        );
        if granted && vote.is_none() {
            let hs = ready.persist.and_then(|p| p.hard_state);
            assert_eq!(
                hs.and_then(|h| h.vote),
                Some(candidate),
                "case {i}: vote persisted"
            );
        }
    }
}

/// TestCandidateFallback: a candidate that hears from a leader of its term
/// or a later one becomes its follower.
#[test]
fn a_candidate_falls_back_to_follower_on_a_leaders_append() {
    for term in [1, 2] {
        let mut n = Node::new(1, 3);
        n.time_out();
        assert_eq!(n.r.role(), Role::Candidate);
        n.step(
            2,
            term,
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![],
                commit: 0,
            },
        );
        assert_eq!(n.r.role(), Role::Follower);
        assert_eq!(n.r.term(), term);
        assert_eq!(n.r.leader(), Some(2));
    }
}

/// TestFollowerElectionTimeoutRandomized,
/// TestCandidateElectionTimeoutRandomized: the wait is drawn from
/// `[timeout, 2 * timeout)` and takes many values; the draws come from the
/// seed, so one seed gives one sequence.
#[test]
fn election_timeouts_are_randomized_within_bounds_and_seeded() {
    let draws = |seed: u64| {
        let mut c = config(1, 3);
        c.seed = seed;
        let mut n = Node::with(c, HardState::default(), &[]);
        let mut out = Vec::new();
        for _ in 0..200 {
            let before = n.r.term();
            // Tick one millisecond at a time until it campaigns.
            let start = n.now;
            while n.r.term() == before {
                n.advance(1);
            }
            out.push(n.now - start);
        }
        out
    };
    let a = draws(7);
    assert!(
        a.iter()
            .all(|&t| (ELECTION_MS..2 * ELECTION_MS).contains(&t)),
        "{a:?}"
    );
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(
        distinct.len() > 50,
        "only {} distinct timeouts",
        distinct.len()
    );
    assert_eq!(a, draws(7), "same seed, same timeouts");
    assert_ne!(a, draws(8));
}

// ---- §5.3: log replication ----

/// TestLeaderStartReplication: a proposal is appended to the leader's log,
/// handed to the driver to persist, and sent to every follower with the
/// index and term of the entry before it.
#[test]
fn a_leader_appends_a_proposal_and_sends_it_to_every_follower() {
    let mut n = Node::new(1, 3);
    n.elect();
    n.ack_all();
    n.ready();
    let li = n.r.last_index();
    assert_eq!(n.r.commit_index(), li);
    assert_eq!(n.r.propose(D::Cmd(42)), Ok(li + 1));
    let ready = n.ready();
    let want = vec![Entry {
        index: li + 1,
        term: 1,
        data: D::Cmd(42),
    }];
    assert_eq!(ready.persist.expect("persist").entries, want);
    let mut msgs = ready.messages;
    msgs.sort_by_key(|m| m.to);
    assert_eq!(msgs.len(), 2);
    for (m, to) in msgs.iter().zip([2, 3]) {
        assert_eq!(m.to, to);
        assert_eq!(
            m.body,
            Body::Append {
                prev_index: li,
                prev_term: 1,
                entries: want.clone(),
                commit: li
            }
        );
    }
}

/// TestLeaderCommitEntry: once a majority holds the entry it is committed,
/// handed out to apply, and followers learn the new commit index.
#[test]
fn a_replicated_entry_is_committed_applied_and_announced() {
    let mut n = Node::new(1, 3);
    n.elect();
    n.ack_all();
    n.ready();
    let li = n.r.last_index();
    n.r.propose(D::Cmd(42)).unwrap();
    n.ack_all();
    assert_eq!(n.r.commit_index(), li + 1);
    let ready = n.ready();
    assert_eq!(
        ready.committed,
        vec![Entry {
            index: li + 1,
            term: 1,
            data: D::Cmd(42)
        }]
    );
    let mut msgs = ready.messages;
    msgs.sort_by_key(|m| m.to);
    assert_eq!(msgs.len(), 2);
    for m in msgs {
        assert!(
            matches!(m.body, Body::Append { commit, .. } if commit == li + 1),
            "{m:?}"
        );
    }
}

/// TestLeaderAcknowledgeCommit: committed once a majority (the leader
/// included) holds it, not before.
#[test]
fn an_entry_is_committed_exactly_when_a_majority_holds_it() {
    let cases: &[(u64, &[NodeId], bool)] = &[
        (1, &[], true),
        (3, &[], false),
        (3, &[2], true),
        (3, &[2, 3], true),
        (5, &[], false),
        (5, &[2], false),
        (5, &[2, 3], true),
        (5, &[2, 3, 4], true),
        (5, &[2, 3, 4, 5], true),
    ];
    for (i, &(size, acceptors, committed)) in cases.iter().enumerate() {
        let mut n = Node::new(1, size);
        n.time_out();
        for peer in 2..=size {
            n.step(peer, 1, Body::VoteResp { granted: true });
        }
        assert_eq!(n.r.role(), Role::Leader);
        n.ack_all();
        n.ready();
        let li = n.r.last_index();
        n.r.propose(D::Cmd(1)).unwrap();
        for m in n.messages() {
            if acceptors.contains(&m.to) {
                n.r.step(accept(&m));
            }
        }
        assert_eq!(n.r.commit_index() > li, committed, "case {i}");
    }
}

/// TestLeaderCommitPrecedingEntries: committing an entry commits every
/// entry before it, earlier leaders' included, and they are applied in
/// order.
#[test]
fn committing_an_entry_commits_all_before_it() {
    for terms in [&[][..], &[2], &[1, 2], &[1]] {
        let hs = HardState {
            term: 2,
            vote: None,
            commit: 0,
        };
        let mut n = Node::with(config(1, 3), hs, terms);
        n.time_out();
        n.step(2, 3, Body::VoteResp { granted: true });
        assert_eq!(n.r.role(), Role::Leader);
        n.r.propose(D::Cmd(100)).unwrap();
        let mut applied = Vec::new();
        for _ in 0..4 {
            let ready = n.ready();
            applied.extend(ready.committed);
            for m in ready.messages {
                if let Body::Append { .. } = m.body {
                    n.r.step(accept(&m));
                }
            }
        }
        let li = terms.len() as u64;
        let mut want = log_of(terms);
        want.push(Entry {
            index: li + 1,
            term: 3,
            data: D::Elected { term: 3, leader: 1 },
        });
        want.push(Entry {
            index: li + 2,
            term: 3,
            data: D::Cmd(100),
        });
        assert_eq!(applied, want, "log {terms:?}");
    }
}

/// TestFollowerCommitEntry: a follower applies, in order, what the leader
/// says is committed, and no more.
#[test]
fn a_follower_applies_what_the_leader_committed() {
    for (count, commit) in [(1, 1), (2, 2), (2, 1)] {
        let mut n = Node::new(1, 3);
        let entries: Vec<Entry<D>> = log_of(&vec![1; count]);
        n.step(
            2,
            1,
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: entries.clone(),
                commit,
            },
        );
        assert_eq!(n.r.commit_index(), commit);
        // Applied once durable here: the first ready persists, the next applies.
        assert!(n.ready().committed.is_empty());
        assert_eq!(n.ready().committed, entries[..commit as usize].to_vec());
    }
}

/// TestFollowerCheckMsgApp: a follower accepts an append only if its log
/// holds the entry before the new ones; a refusal carries the hint.
#[test]
fn a_follower_checks_the_entry_before_an_append() {
    // Log (1,1) (2,2), entry 1 committed.
    let cases = [
        (0, 0, None, 1),
        (1, 1, None, 1),
        (2, 2, None, 2),
        // Term mismatch at 2: the hint goes back to index 1 (term 1 <= 1).
        (1, 2, Some(RejectHint { index: 1, term: 1 }), 2),
        // No entry 3.
        (3, 3, Some(RejectHint { index: 2, term: 2 }), 3),
    ];
    for (i, (prev_term, prev_index, hint, index)) in cases.into_iter().enumerate() {
        let hs = HardState {
            term: 2,
            vote: None,
            commit: 1,
        };
        let mut n = Node::with(config(1, 3), hs, &[1, 2]);
        n.step(
            2,
            2,
            Body::Append {
                prev_index,
                prev_term,
                entries: vec![],
                commit: 1,
            },
        );
        let msgs = n.messages();
        assert_eq!(
            msgs,
            vec![Message {
                from: 1,
                to: 2,
                term: 2,
                body: Body::AppendResp {
                    index,
                    reject: hint
                }
            }],
            "case {i}"
        );
    }
}

/// TestFollowerAppendEntries: a follower deletes a conflicting entry and
/// all after it, appends what is new, and hands exactly the changed suffix
/// to the driver (with the truncation) to persist.
#[test]
fn a_follower_replaces_a_conflicting_suffix() {
    let e = |index, term| Entry {
        index,
        term,
        data: D::Cmd(1000 + index * 10 + term),
    };
    let cases = [
        (
            2,
            2,
            vec![e(3, 3)],
            vec![(1, 1), (2, 2), (3, 3)],
            None,
            vec![e(3, 3)],
        ),
        (
            1,
            1,
            vec![e(2, 3), e(3, 4)],
            vec![(1, 1), (2, 3), (3, 4)],
            Some(2),
            vec![e(2, 3), e(3, 4)],
        ),
        (
            0,
            0,
            vec![Entry {
                index: 1,
                term: 1,
                data: D::Cmd(1),
            }],
            vec![(1, 1), (2, 2)],
            None,
            vec![],
        ),
        (0, 0, vec![e(1, 3)], vec![(1, 3)], Some(1), vec![e(1, 3)]),
    ];
    for (i, (prev_index, prev_term, entries, want_log, truncate, want_unstable)) in
        cases.into_iter().enumerate()
    {
        let hs = HardState {
            term: 2,
            vote: None,
            commit: 0,
        };
        let mut n = Node::with(config(1, 3), hs, &[1, 2]);
        n.ready();
        n.step(
            2,
            4,
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit: 0,
            },
        );
        let got: Vec<(LogIndex, Term)> = (1..=n.r.last_index())
            .map(|i| (i, n.r.term_at(i).unwrap()))
            .collect();
        assert_eq!(got, want_log, "case {i}");
        let persist = n.ready().persist.expect("term at least");
        assert_eq!(persist.truncate_from, truncate, "case {i}");
        assert_eq!(persist.entries, want_unstable, "case {i}");
    }
}

/// A small lossless network of nodes for scenarios that need several.
#[derive(Default)]
struct Net {
    nodes: Vec<Node>,
    /// Messages to nobody in `nodes` (a silent voter) are dropped.
    queue: Vec<Message<D>>,
    /// Nodes cut off from everyone: their messages, both ways, are dropped.
    cut_off: std::collections::BTreeSet<NodeId>,
    /// What each node applied, `(index, term)`.
    applied: std::collections::BTreeMap<NodeId, Vec<(LogIndex, Term)>>,
}

impl Net {
    fn of(nodes: Vec<Node>) -> Net {
        Net {
            nodes,
            ..Net::default()
        }
    }

    /// Every node's ready (persisted at once), then every message; false
    /// once there was nothing to do.
    fn round(&mut self) -> bool {
        let mut busy = false;
        for n in &mut self.nodes {
            let ready = n.ready();
            n.serve(&ready);
            busy |= !ready.need_entries.is_empty();
            let applied = self.applied.entry(n.r.id()).or_default();
            applied.extend(ready.committed.iter().map(|e| (e.index, e.term)));
            self.queue.extend(ready.messages);
        }
        busy |= !self.queue.is_empty();
        for m in std::mem::take(&mut self.queue) {
            if self.cut_off.contains(&m.from) || self.cut_off.contains(&m.to) {
                continue;
            }
            if let Some(n) = self.nodes.iter_mut().find(|n| n.r.id() == m.to) {
                n.r.step(m);
            }
        }
        busy
    }

    /// Runs until no message is left.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if !self.round() {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.r.id() == id)
            .expect("node")
    }

    fn log(&self, i: usize) -> Vec<(LogIndex, Term)> {
        let r = &self.nodes[i].r;
        (1..=r.last_index())
            .map(|j| (j, r.term_at(j).unwrap()))
            .collect()
    }
}

/// TestLeaderSyncFollowerLog (figure 7): whatever a follower's log looks
/// like, the leader brings it to exactly the leader's.
#[test]
fn a_leader_brings_any_follower_log_to_its_own() {
    let leader_log = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let term = 8;
    let followers: [&[Term]; 6] = [
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],
        &[1, 1, 1, 4],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        &[1, 1, 1, 4, 4, 4, 4],
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    ];
    for (i, follower_log) in followers.into_iter().enumerate() {
        let lead_hs = HardState {
            term,
            vote: None,
            commit: leader_log.len() as u64,
        };
        let mut lead = Node::with(config(1, 3), lead_hs, &leader_log);
        let f_hs = HardState {
            term: term - 1,
            vote: None,
            commit: 0,
        };
        let follower = Node::with(config(2, 3), f_hs, follower_log);
        // Node 3 is silent but votes for 1: node 2 may hold a longer log and
        // refuse.
        lead.time_out();
        lead.step(3, term + 1, Body::VoteResp { granted: true });
        assert_eq!(lead.r.role(), Role::Leader, "case {i}");
        let mut net = Net::of(vec![lead, follower]);
        net.nodes[0].r.propose(D::Cmd(7)).unwrap();
        net.settle();
        assert_eq!(net.log(0), net.log(1), "case {i}");
    }
}

/// The conflict hint skips a whole term per round trip: a follower that
/// diverged over many entries is found in few messages.
#[test]
fn a_diverged_follower_is_found_in_one_round_trip_per_term() {
    let mut lead_terms = vec![1; 3];
    lead_terms.extend([4; 50]);
    let mut follower_terms = vec![1; 3];
    follower_terms.extend([2; 30]);
    follower_terms.extend([3; 30]);
    let mut lead = Node::with(
        config(1, 3),
        HardState {
            term: 5,
            vote: None,
            commit: 3,
        },
        &lead_terms,
    );
    let follower = Node::with(
        config(2, 3),
        HardState {
            term: 5,
            vote: None,
            commit: 3,
        },
        &follower_terms,
    );
    lead.time_out();
    lead.step(3, 6, Body::VoteResp { granted: true });
    let mut net = Net::of(vec![lead, follower]);
    let mut rejections = 0;
    for _ in 0..100 {
        let mut served = false;
        for n in &mut net.nodes {
            let ready = n.ready();
            n.serve(&ready);
            served |= !ready.need_entries.is_empty();
            net.queue.extend(ready.messages);
        }
        if net.queue.is_empty() && !served {
            break;
        }
        for m in std::mem::take(&mut net.queue) {
            if matches!(
                m.body,
                Body::AppendResp {
                    reject: Some(_),
                    ..
                }
            ) {
                rejections += 1;
            }
            if let Some(n) = net.nodes.iter_mut().find(|n| n.r.id() == m.to) {
                n.r.step(m);
            }
        }
    }
    assert_eq!(net.log(0), net.log(1));
    assert!(
        rejections <= 3,
        "{rejections} rejections for 2 diverging terms"
    );
}

// ---- §5.4: safety ----

/// TestVoteRequest: a vote request carries the index and term of the
/// candidate's last entry and goes to every other node.
#[test]
fn a_vote_request_describes_the_candidates_last_entry() {
    for (terms, want_term) in [(&[1][..], 2), (&[1, 2][..], 3)] {
        let mut n = Node::new(1, 3);
        let entries = log_of(terms);
        let last = entries.last().map(|e| (e.index, e.term)).unwrap();
        n.step(
            2,
            want_term - 1,
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries,
                commit: 0,
            },
        );
        n.messages();
        n.time_out();
        let msgs = n.messages();
        assert_eq!(msgs.len(), 2);
        for (m, to) in msgs.iter().zip([2, 3]) {
            assert_eq!((m.to, m.term), (to, want_term));
            assert_eq!(
                m.body,
                Body::Vote {
                    last_index: last.0,
                    last_term: last.1,
                    transfer: false
                }
            );
        }
    }
}

/// TestVoter: a node refuses its vote to a candidate whose log is less up
/// to date than its own (§5.4.1).
#[test]
fn a_voter_refuses_a_candidate_with_a_less_up_to_date_log() {
    let cases: &[(&[Term], Term, LogIndex, bool)] = &[
        (&[1], 1, 1, true),
        (&[1], 1, 2, true),
        (&[1, 1], 1, 1, false),
        (&[1], 2, 1, true),
        (&[1], 2, 2, true),
        (&[1, 1], 2, 1, true),
        (&[2], 1, 1, false),
        (&[2], 1, 2, false),
        (&[2, 2], 1, 1, false),
        (&[1, 1], 1, 1, false),
    ];
    for (i, &(terms, last_term, last_index, granted)) in cases.iter().enumerate() {
        let hs = HardState {
            term: terms.iter().copied().max().unwrap(),
            vote: None,
            commit: 0,
        };
        let mut n = Node::with(config(1, 2), hs, terms);
        n.ready();
        n.step(
            2,
            3,
            Body::Vote {
                last_index,
                last_term,
                transfer: false,
            },
        );
        let msgs = n.messages();
        assert_eq!(msgs.len(), 1, "case {i}");
        assert_eq!(msgs[0].body, Body::VoteResp { granted }, "case {i}");
    }
}

/// TestLeaderOnlyCommitsLogFromCurrentTerm: a leader never commits an
/// earlier term's entry by counting replicas (§5.4.2, figure 8); it commits
/// it only with an entry of its own term.
#[test]
fn a_leader_commits_only_entries_of_its_own_term_by_counting() {
    // Log (1,1) (2,2); node 1 becomes leader of term 3 and appends its
    // first entry at 3, then a proposal at 4.
    for (acked, want_commit) in [(1, 0), (2, 0), (3, 3)] {
        let mut n = Node::with(
            config(1, 2),
            HardState {
                term: 2,
                vote: None,
                commit: 0,
            },
            &[1, 2],
        );
        n.time_out();
        n.step(2, 3, Body::VoteResp { granted: true });
        assert_eq!(n.r.role(), Role::Leader);
        n.r.propose(D::Cmd(5)).unwrap();
        n.ready();
        n.step(
            2,
            3,
            Body::AppendResp {
                index: acked,
                reject: None,
            },
        );
        assert_eq!(
            n.r.commit_index(),
            want_commit,
            "follower holds up to {acked}"
        );
    }
}

// ---- beyond the paper's list ----

/// Votes and append acknowledgements leave in the same `Ready` as the
/// persist unit that makes them true; a late persist notice for entries
/// that were replaced meanwhile is ignored.
#[test]
fn a_late_persist_notice_for_truncated_entries_is_ignored() {
    let mut n = Node::new(1, 3);
    n.step(
        2,
        1,
        Body::Append {
            prev_index: 0,
            prev_term: 0,
            entries: log_of(&[1, 1, 1]),
            commit: 0,
        },
    );
    let first = n.r.ready();
    let (last, last_term) = first.persist.as_ref().unwrap().last().unwrap();
    assert_eq!((last, last_term), (3, 1));
    // Before the driver reports the unit durable, a new leader replaces 2..
    let e = |index| Entry {
        index,
        term: 2,
        data: D::Cmd(50 + index),
    };
    n.step(
        3,
        2,
        Body::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![e(2), e(3)],
            commit: 0,
        },
    );
    // The late notice about (3, term 1) must not count entry (3, term 2).
    n.r.persisted(3, 1);
    n.step(
        3,
        2,
        Body::Heartbeat {
            commit: 3,
            round: 0,
        },
    );
    assert!(
        n.r.ready().committed.is_empty(),
        "nothing applied before it is durable"
    );
    n.r.persisted(3, 2);
    let ready = n.r.ready();
    assert_eq!(
        ready
            .committed
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 2), (3, 2)]
    );
}

/// A PreVote round moves nobody's term: a node that was cut off cannot
/// inflate terms and depose a healthy leader when it returns.
#[test]
fn pre_vote_moves_no_term_until_a_majority_would_vote() {
    let mut c = config(1, 3);
    c.pre_vote = true;
    let mut n = Node::with(c, HardState::default(), &[]);
    for _ in 0..5 {
        n.time_out();
        assert_eq!(n.r.role(), Role::PreCandidate);
        assert_eq!(n.r.term(), 0);
        let msgs = n.messages();
        assert!(msgs
            .iter()
            .all(|m| m.term == 1 && matches!(m.body, Body::PreVote { .. })));
    }
    n.step(2, 1, Body::PreVoteResp { granted: true });
    assert_eq!(n.r.role(), Role::Candidate);
    assert_eq!(n.r.term(), 1);
    // A voter grants a pre-vote without recording a vote or a term.
    let mut c = config(2, 3);
    c.pre_vote = true;
    let mut v = Node::with(c, HardState::default(), &[]);
    v.step(
        1,
        1,
        Body::PreVote {
            last_index: 0,
            last_term: 0,
        },
    );
    assert_eq!((v.r.term(), v.r.vote()), (0, None));
    let ready = v.ready();
    assert!(ready.persist.is_none());
    assert_eq!(ready.messages[0].body, Body::PreVoteResp { granted: true });
    assert_eq!(ready.messages[0].term, 1);
}

/// CheckQuorum: a follower that heard from its leader within an election
/// timeout ignores vote requests; a leader that stops hearing from followers
/// is first `degraded`, then steps down once it lacks a quorum.
#[test]
fn check_quorum_leases_and_steps_down_a_cut_off_leader() {
    let mut c = config(2, 3);
    c.check_quorum = true;
    let mut f = Node::with(c, HardState::default(), &[]);
    f.step(
        1,
        1,
        Body::Heartbeat {
            commit: 0,
            round: 0,
        },
    );
    f.messages();
    f.step(
        3,
        2,
        Body::Vote {
            last_index: 9,
            last_term: 1,
            transfer: false,
        },
    );
    assert_eq!(f.r.term(), 1, "in the lease a vote request is ignored");
    assert!(f.messages().is_empty());
    f.step(
        3,
        2,
        Body::Vote {
            last_index: 9,
            last_term: 1,
            transfer: true,
        },
    );
    assert_eq!(f.r.term(), 2, "a handed-over campaign is not ignored");
    assert_eq!(f.messages()[0].body, Body::VoteResp { granted: true });

    let mut c = config(1, 3);
    c.check_quorum = true;
    let mut n = Node::with(c, HardState::default(), &[]);
    n.elect();
    // Node 2 keeps answering, node 3 is silent.
    for _ in 0..4 {
        n.advance(HEARTBEAT_MS);
        n.step(2, 1, Body::HeartbeatResp { round: 0 });
    }
    n.advance(HEARTBEAT_MS);
    n.step(2, 1, Body::HeartbeatResp { round: 0 });
    assert_eq!(n.r.role(), Role::Leader);
    assert!(n.r.degraded(), "node 3 silent for half an election timeout");
    let status = n.ready().status.expect("degraded is reported");
    assert!(status.degraded);
    // Now node 2 is silent too.
    n.advance(ELECTION_MS / 2);
    assert_eq!(n.r.role(), Role::Leader);
    n.advance(ELECTION_MS / 2);
    assert_eq!(
        n.r.role(),
        Role::Follower,
        "no quorum heard within a timeout"
    );
    assert_eq!(
        n.r.propose(D::Cmd(1)),
        Err(ProposeError::NotLeader { leader_hint: None })
    );
}

/// Pipelining: in the replicate state the leader streams appends without
/// waiting, up to `inflight_appends_max`; each holds at most
/// `append_entries_max` entries; a heartbeat answer frees a slot.
#[test]
fn appends_are_batched_and_pipelined_within_bounds() {
    let mut c = config(1, 2);
    c.append_entries_max = 3;
    c.inflight_appends_max = 2;
    let mut n = Node::with(c, HardState::default(), &[]);
    n.elect();
    n.ack_all();
    assert_eq!(n.r.progress(2).unwrap().2, ReplicationState::Replicate);
    n.messages();
    for i in 0..10 {
        n.r.propose(D::Cmd(i)).unwrap();
    }
    let msgs = n.messages();
    let sizes: Vec<usize> = msgs
        .iter()
        .map(|m| match &m.body {
            Body::Append { entries, .. } => entries.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sizes,
        vec![1, 1],
        "each proposal went out at once, then the pipe was full"
    );
    n.step(2, 1, Body::HeartbeatResp { round: 0 });
    let msgs = n.messages();
    assert_eq!(msgs.len(), 1);
    assert!(matches!(&msgs[0].body, Body::Append { entries, .. } if entries.len() == 3));
}

/// A follower too far behind for the leader's memory gets entries the
/// driver reads from storage (`need_entries`, `entries_loaded`).
#[test]
fn a_lagging_follower_is_served_from_storage() {
    let mut c = config(1, 2);
    c.cache_entries_max = 4;
    let terms = [1; 20];
    let mut n = Node::with(
        c,
        HardState {
            term: 1,
            vote: None,
            commit: 20,
        },
        &terms,
    );
    n.elect();
    // Follower 2 has nothing: it refuses the first probe, with a hint
    // that sends the leader back to index 1, long evicted from memory.
    let msgs = n.messages();
    assert!(msgs
        .iter()
        .any(|m| matches!(m.body, Body::Append { prev_index: 20, .. })));
    let term = n.r.term();
    n.step(
        2,
        term,
        Body::AppendResp {
            index: 20,
            reject: Some(RejectHint { index: 0, term: 0 }),
        },
    );
    let ready = n.ready();
    assert_eq!(ready.need_entries.len(), 1, "{ready:?}");
    let need = ready.need_entries[0];
    assert_eq!((need.peer, need.from), (2, 1));
    let loaded: Vec<Entry<D>> = log_of(&terms)[need.from as usize - 1..need.to as usize].to_vec();
    n.r.entries_loaded(2, loaded.clone());
    let msgs = n.messages();
    assert_eq!(
        msgs[0].body,
        Body::Append {
            prev_index: 0,
            prev_term: 0,
            entries: loaded,
            commit: 20
        }
    );
    assert_eq!(n.r.progress(2).map(|p| p.2), Some(ReplicationState::Probe));
}

/// Leadership transfer: the leader stops taking proposals, brings the
/// target up to date, and sends it TimeoutNow; the target campaigns at once
/// and its request overrides the lease.
#[test]
fn leadership_transfer_hands_over_to_an_up_to_date_follower() {
    let mut c = config(1, 3);
    c.check_quorum = true;
    let mut n = Node::with(c, HardState::default(), &[]);
    n.elect();
    assert_eq!(n.r.transfer_leadership(1), Err(TransferError::NotAPeer(1)));
    n.r.transfer_leadership(2).unwrap();
    assert_eq!(
        n.r.propose(D::Cmd(1)),
        Err(ProposeError::Transferring { to: 2 })
    );
    let msgs = n.messages();
    for m in msgs
        .iter()
        .filter(|m| matches!(m.body, Body::Append { .. }))
    {
        n.r.step(accept(m));
    }
    let msgs = n.messages();
    let timeout_now: Vec<_> = msgs.iter().filter(|m| m.body == Body::TimeoutNow).collect();
    assert_eq!(timeout_now.len(), 1);
    assert_eq!(timeout_now[0].to, 2);

    let mut f = Node::with(
        {
            let mut c = config(2, 3);
            c.pre_vote = true;
            c.check_quorum = true;
            c
        },
        HardState::default(),
        &[],
    );
    f.step(
        1,
        1,
        Body::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![Entry {
                index: 1,
                term: 1,
                data: D::Elected { term: 1, leader: 1 },
            }],
            commit: 0,
        },
    );
    f.messages();
    f.step(1, 1, Body::TimeoutNow);
    assert_eq!(
        f.r.role(),
        Role::Candidate,
        "no pre-vote round on a hand-over"
    );
    assert_eq!(f.r.term(), 2);
    let votes = f.messages();
    assert!(votes
        .iter()
        .all(|m| matches!(m.body, Body::Vote { transfer: true, .. })));
    // The old leader, in its lease, still yields to a handed-over campaign.
    n.r.step(votes.into_iter().find(|m| m.to == 1).unwrap());
    assert_eq!(n.r.role(), Role::Follower);
    assert_eq!(n.r.term(), 2);
}

/// Found by the safety harness (seeds 17, 78, 97 of `raft_safety.rs`): an
/// append lost in the replicate state, with nothing new to send after it,
/// left the follower one entry short forever. A heartbeat answer from a
/// follower that lacks entries now draws an append from `next_index`,
/// which it refuses, and the refusal sends the leader back to probe.
#[test]
fn a_lost_append_is_recovered_after_a_heartbeat_answer() {
    let mut n = Node::new(1, 2);
    n.elect();
    n.ack_all();
    n.ready();
    assert_eq!(n.r.progress(2).unwrap().2, ReplicationState::Replicate);
    n.r.propose(D::Cmd(1)).unwrap();
    let lost = n.messages();
    assert_eq!(lost.len(), 1, "the append that the network drops");
    let (matched, next, _) = n.r.progress(2).unwrap();
    n.step(2, 1, Body::HeartbeatResp { round: 0 });
    let msgs = n.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let Body::Append { prev_index, .. } = msgs[0].body else {
        panic!("{msgs:?}")
    };
    assert_eq!(prev_index, next - 1);
    n.step(
        2,
        1,
        Body::AppendResp {
            index: prev_index,
            reject: Some(RejectHint {
                index: matched,
                term: 1,
            }),
        },
    );
    let msgs = n.messages();
    assert!(
        matches!(&msgs[0].body, Body::Append { prev_index, entries, .. } if *prev_index == matched && entries.len() == 1),
        "{msgs:?}"
    );
}

/// A refusal that arrives late (the network duplicated or reordered it),
/// of an index the follower has acknowledged since, asks for nothing: the
/// leader probing that follower neither moves back nor sends its probe
/// again. (Resending on every such answer sent the same entries several
/// times; against a follower that had lost acknowledged entries, under a
/// planted bug, it fed an append storm that never ended.)
#[test]
fn a_late_refusal_of_an_acknowledged_index_sends_nothing() {
    let mut c = config(1, 2);
    c.append_entries_max = 3;
    let hard_state = HardState {
        term: 1,
        vote: None,
        commit: 0,
    };
    let mut n = Node::with(c, hard_state, &[1, 1, 1]);
    n.elect();
    let term = n.r.term();
    let probe = appends(&mut n);
    assert!(
        matches!(probe[0].body, Body::Append { prev_index: 3, .. }),
        "{probe:?}"
    );
    // Follower 2 has nothing; the network delivers its refusal twice, the
    // second copy much later.
    let refusal = Body::AppendResp {
        index: 3,
        reject: Some(RejectHint { index: 0, term: 0 }),
    };
    n.step(2, term, refusal.clone());
    let catch_up = appends(&mut n);
    assert!(
        matches!(&catch_up[0].body, Body::Append { prev_index: 0, entries, .. } if entries.len() == 3),
        "{catch_up:?}"
    );
    n.r.step(accept(&catch_up[0]));
    assert_eq!(n.r.progress(2).unwrap().0, 3);
    let lost = appends(&mut n);
    assert!(
        matches!(lost[0].body, Body::Append { prev_index: 3, .. }),
        "the append of entry 4, which the network drops: {lost:?}"
    );
    n.r.propose(D::Cmd(1)).unwrap();
    appends(&mut n);
    // The follower refuses the append of entry 5 (it lacks 4): the leader
    // probes from what it acknowledged.
    n.step(
        2,
        term,
        Body::AppendResp {
            index: 4,
            reject: Some(RejectHint { index: 3, term: 1 }),
        },
    );
    let probe = appends(&mut n);
    assert!(
        matches!(probe[0].body, Body::Append { prev_index: 3, .. }),
        "{probe:?}"
    );
    let before = n.r.progress(2);
    assert_eq!(before, Some((3, 4, ReplicationState::Probe)));
    // The late copy of the first refusal: index 3 is acknowledged.
    n.step(2, term, refusal);
    let msgs = appends(&mut n);
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(n.r.progress(2), before);
}

/// The appends among a node's next messages.
fn appends(n: &mut Node) -> Vec<Message<D>> {
    let mut msgs = n.messages();
    msgs.retain(|m| matches!(m.body, Body::Append { .. }));
    msgs
}

/// A follower commits no further than the last entry an append proved to
/// match the leader's: entries after it may be another term's leftovers
/// (§5.3: "set commitIndex = min(leaderCommit, index of last new entry)").
#[test]
fn a_follower_commits_no_further_than_the_append_proved() {
    // Entry 3 is a leftover of term 3 that the term-4 leader does not have.
    let hs = HardState {
        term: 3,
        vote: None,
        commit: 0,
    };
    let mut n = Node::with(config(1, 3), hs, &[1, 1, 3]);
    n.ready();
    let entries = vec![Entry {
        index: 2,
        term: 1,
        data: D::Cmd(2),
    }];
    n.step(
        2,
        4,
        Body::Append {
            prev_index: 1,
            prev_term: 1,
            entries,
            commit: 3,
        },
    );
    assert_eq!(n.r.last_index(), 3, "nothing conflicted, nothing truncated");
    assert_eq!(n.r.commit_index(), 2);
    n.step(
        2,
        4,
        Body::Heartbeat {
            commit: 2,
            round: 0,
        },
    );
    assert_eq!(n.r.commit_index(), 2);
}

// ---- §7: log compaction ----

/// A leader that compacted its log sends a follower that needs compacted
/// entries its snapshot, then streams the entries after it.
#[test]
fn a_follower_behind_the_snapshot_gets_installsnapshot() {
    let mut n = Node::with(
        config(1, 2),
        HardState {
            term: 1,
            vote: None,
            commit: 10,
        },
        &[1; 10],
    );
    n.r.compact(10);
    assert_eq!(n.r.snapshot(), SnapshotMeta { index: 10, term: 1 });
    assert_eq!(n.r.term_at(9), None, "compacted");
    n.elect();
    n.messages();
    let term = n.r.term();
    n.step(
        2,
        term,
        Body::AppendResp {
            index: 10,
            reject: Some(RejectHint { index: 0, term: 0 }),
        },
    );
    let msgs = n.messages();
    assert_eq!(
        msgs,
        vec![Message {
            from: 1,
            to: 2,
            term,
            body: Body::InstallSnapshot {
                meta: SnapshotMeta { index: 10, term: 1 },
                voters: Voters::from_iter([1, 2]),
            }
        }]
    );
    assert_eq!(n.r.progress(2).unwrap().2, ReplicationState::Snapshot);
    n.step(2, term, Body::HeartbeatResp { round: 0 });
    assert!(
        n.messages().is_empty(),
        "nothing else while the snapshot is out"
    );
    n.step(
        2,
        term,
        Body::AppendResp {
            index: 10,
            reject: None,
        },
    );
    assert_eq!(n.r.progress(2).unwrap().2, ReplicationState::Replicate);
    let msgs = n.messages();
    assert!(
        matches!(&msgs[0].body, Body::Append { prev_index: 10, prev_term: 1, entries, .. } if entries[0].index == 11),
        "{msgs:?}"
    );
}

/// Found by the safety harness with membership changes: a follower whose
/// entry at the leader's snapshot index is of another term refuses an
/// append after the snapshot, and the conflict hint cannot look behind the
/// snapshot; the leader sent the same append forever instead of the
/// snapshot.
#[test]
fn a_follower_that_conflicts_at_the_snapshot_index_gets_the_snapshot() {
    let mut n = Node::with(
        config(1, 2),
        HardState {
            term: 2,
            vote: None,
            commit: 5,
        },
        &[1, 1, 1, 2, 2],
    );
    n.r.compact(5);
    n.elect();
    n.messages();
    let term = n.r.term();
    // The follower's log is [1, 1, 1, 1, 1]: it refuses the probe after
    // the snapshot, and only the snapshot can bring it up.
    n.step(
        2,
        term,
        Body::AppendResp {
            index: 5,
            reject: Some(RejectHint { index: 5, term: 1 }),
        },
    );
    let msgs = n.messages();
    assert!(
        matches!(
            &msgs[..],
            [Message {
                body: Body::InstallSnapshot { .. },
                ..
            }]
        ),
        "{msgs:?}"
    );
}

/// A follower whose log lacks the snapshot's last entry drops its log for
/// the snapshot: the persist unit installs it, the application restores
/// from it, and the answer goes out with that unit.
#[test]
fn a_follower_replaces_its_log_with_a_snapshot_it_lacks() {
    let hs = HardState {
        term: 3,
        vote: None,
        commit: 1,
    };
    let mut n = Node::with(config(1, 3), hs, &[1, 1, 3]);
    n.ready();
    let meta = SnapshotMeta { index: 5, term: 4 };
    n.step(
        2,
        4,
        Body::InstallSnapshot {
            meta,
            voters: n.r.voters(),
        },
    );
    let ready = n.ready();
    let persist = ready.persist.expect("persist");
    assert_eq!(persist.snapshot, Some(meta));
    assert_eq!(persist.hard_state.map(|h| h.commit), Some(5));
    assert_eq!(ready.restore, Some(meta));
    assert!(ready.committed.is_empty());
    assert_eq!(
        ready.messages,
        vec![Message {
            from: 1,
            to: 2,
            term: 4,
            body: Body::AppendResp {
                index: 5,
                reject: None
            }
        }]
    );
    assert_eq!(
        (n.r.last_index(), n.r.term_at(5), n.r.term_at(3)),
        (5, Some(4), None)
    );
    let e = Entry {
        index: 6,
        term: 4,
        data: D::Cmd(6),
    };
    n.step(
        2,
        4,
        Body::Append {
            prev_index: 5,
            prev_term: 4,
            entries: vec![e.clone()],
            commit: 6,
        },
    );
    n.ready();
    assert_eq!(n.ready().committed, vec![e]);
}

/// A follower whose log already holds the snapshot's last entry keeps its
/// log and only learns the commit; an old snapshot changes nothing.
#[test]
fn a_follower_keeps_a_log_that_holds_the_snapshot() {
    let hs = HardState {
        term: 2,
        vote: None,
        commit: 0,
    };
    let mut n = Node::with(config(1, 3), hs, &[1, 1, 2, 2]);
    n.ready();
    n.step(
        2,
        2,
        Body::InstallSnapshot {
            meta: SnapshotMeta { index: 3, term: 2 },
            voters: n.r.voters(),
        },
    );
    let ready = n.ready();
    assert_eq!(ready.persist.as_ref().and_then(|p| p.snapshot), None);
    assert_eq!(ready.restore, None);
    assert_eq!(n.r.last_index(), 4);
    assert_eq!(n.r.commit_index(), 3);
    assert_eq!(
        ready.messages[0].body,
        Body::AppendResp {
            index: 3,
            reject: None
        }
    );
    n.step(
        2,
        2,
        Body::InstallSnapshot {
            meta: SnapshotMeta { index: 2, term: 1 },
            voters: n.r.voters(),
        },
    );
    let ready = n.ready();
    assert_eq!(ready.restore, None);
    assert_eq!(
        ready.messages[0].body,
        Body::AppendResp {
            index: 3,
            reject: None
        }
    );
}

/// A node restarts from a snapshot and the log after it; a snapshot that
/// became durable before the hard state that commits it counts as
/// committed.
#[test]
fn a_node_restarts_from_a_snapshot_and_the_log_after_it() {
    let meta = SnapshotMeta { index: 5, term: 2 };
    let tail: Vec<Entry<D>> = [(6, 2), (7, 3)]
        .into_iter()
        .map(|(index, term)| Entry {
            index,
            term,
            data: D::Cmd(index),
        })
        .collect();
    let hs = HardState {
        term: 3,
        vote: None,
        commit: 3,
    };
    let r: Raft<D> = Raft::new(config(1, 3), Recovered::from_snapshot(hs, meta, &tail), 0);
    assert_eq!(r.commit_index(), 5);
    assert_eq!(r.snapshot(), meta);
    assert_eq!((r.last_index(), r.last_term()), (7, 3));
    assert_eq!(
        (r.term_at(4), r.term_at(5), r.term_at(6)),
        (None, Some(2), Some(2))
    );
}

/// The paper's figure 8 on three nodes: an entry of an earlier term that
/// reached a majority is not committed by counting, because a node with a
/// later term's entry at its index can still be elected and overwrite it.
#[test]
fn figure_8_an_old_term_entry_on_a_majority_is_not_committed_by_counting() {
    let nodes = (1..=3)
        .map(|id| {
            let mut c = config(id, 3);
            c.append_entries_max = 1;
            Node::with(c, HardState::default(), &[])
        })
        .collect();
    let mut net = Net::of(nodes);
    // S1 leads term 1; its first entry is committed everywhere.
    net.node(1).time_out();
    net.settle();
    assert_eq!(net.node(1).r.role(), Role::Leader);
    // S1 appends X = (2, term 1) and is cut off before anyone gets it.
    net.cut_off.insert(1);
    net.node(1).r.propose(D::Cmd(99)).unwrap();
    net.settle();
    // S3 leads term 2 with S2's vote; its first entry Y = (2, term 2)
    // reaches nobody.
    net.cut_off = [1].into();
    net.node(3).time_out();
    while net.node(3).r.role() != Role::Leader {
        assert!(net.round(), "S3 is not elected");
    }
    assert_eq!(net.node(3).r.term(), 2);
    net.cut_off = [1, 3].into();
    net.settle();
    // S1 restarts and comes back while S3 is cut off; it leads term 3 with
    // S2's vote and
    // gives S2 the entry X, one entry per append. Stop the moment S1 knows
    // S2 holds X: X is on a majority (S1, S2), S1's own entry of term 3 is not.
    net.cut_off = [3].into();
    net.node(1).restart();
    for _ in 0..5 {
        if net.node(1).r.role() == Role::Leader {
            break;
        }
        net.node(1).time_out();
        for _ in 0..3 {
            net.round();
        }
    }
    assert_eq!(
        (net.node(1).r.role(), net.node(1).r.term()),
        (Role::Leader, 3)
    );
    let mut rounds = 0;
    while net.node(1).r.progress(2).unwrap().0 < 2 {
        assert!(net.round() && rounds < 20, "S2 never got X");
        rounds += 1;
    }
    assert_eq!(net.node(2).r.term_at(2), Some(1));
    assert_eq!(
        net.node(1).r.commit_index(),
        1,
        "X (term 1) is not committed by counting"
    );
    // S1 is cut off before its term-3 entry leaves; S3 restarts and, with a
    // later last term than S2's, is elected and overwrites X with Y.
    net.cut_off = [1].into();
    net.node(3).restart();
    for _ in 0..5 {
        if net.node(3).r.role() == Role::Leader && net.node(3).r.term() > 3 {
            break;
        }
        net.node(3).time_out();
        net.settle();
    }
    assert_eq!(net.node(3).r.role(), Role::Leader);
    net.settle();
    assert_eq!(net.node(2).r.term_at(2), Some(2), "X was overwritten by Y");
    // Nobody ever applied X.
    for (id, applied) in &net.applied {
        assert!(
            !applied.contains(&(2, 1)),
            "node {id} applied X: {applied:?}"
        );
    }
}

// ---- linearizable reads (ReadIndex, thesis §6.4) ----

/// A leader with a committed entry of its term: its `LeaderElected` entry
/// acknowledged by every follower.
fn leader_with_commit(size: u64) -> Node {
    let mut n = Node::new(1, size);
    n.elect();
    n.ack_all();
    assert_eq!(n.r.commit_index(), 1);
    n.ready();
    n
}

/// A read is confirmed only once a quorum answers a heartbeat round sent
/// after the read was asked; answers to an earlier round do not count,
/// and every read of one step shares one round.
#[test]
fn a_read_waits_for_a_quorum_to_answer_a_heartbeat_sent_after_it() {
    let mut n = leader_with_commit(5);
    // A round before the read.
    n.advance(HEARTBEAT_MS);
    let before: Vec<u64> = n
        .messages()
        .iter()
        .filter_map(|m| match m.body {
            Body::Heartbeat { round, .. } => Some(round),
            _ => None,
        })
        .collect();
    assert_eq!(before.len(), 4);
    n.r.read_index(7).unwrap();
    n.r.read_index(8).unwrap();
    let ready = n.ready();
    assert!(ready.reads.is_empty(), "not before a quorum answered");
    let rounds: Vec<u64> = ready
        .messages
        .iter()
        .filter_map(|m| match m.body {
            Body::Heartbeat { round, .. } => Some(round),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len(), 4, "one round for both reads: {rounds:?}");
    let (old, new) = (before[0], rounds[0]);
    assert!(new > old);
    // Every follower answers the old round: nothing is confirmed.
    for peer in 2..=5 {
        n.step(peer, 1, Body::HeartbeatResp { round: old });
    }
    assert!(n.ready().reads.is_empty(), "old answers must not count");
    // One answer to the new round (two with the leader): not a quorum of 5.
    n.step(2, 1, Body::HeartbeatResp { round: new });
    assert!(n.ready().reads.is_empty());
    n.step(3, 1, Body::HeartbeatResp { round: new });
    let reads = n.ready().reads;
    assert_eq!(
        reads.iter().map(|r| (r.ctx, r.index)).collect::<Vec<_>>(),
        vec![(7, 1), (8, 1)]
    );
}

/// Only a leader that committed an entry of its term serves reads; one
/// that steps down drops the reads it was confirming; a single node
/// confirms at once.
#[test]
fn reads_need_a_leader_with_a_commit_in_its_term_and_die_with_its_leadership() {
    use rustci_core::raft::ReadError;
    let mut f = Node::new(2, 3);
    assert!(matches!(
        f.r.read_index(1),
        Err(ReadError::NotLeader { .. })
    ));
    let mut fresh = Node::new(1, 3);
    fresh.elect();
    assert_eq!(fresh.r.read_index(1), Err(ReadError::NoCommitInTerm));

    let mut n = leader_with_commit(3);
    n.r.read_index(9).unwrap();
    n.ready();
    // A newer term deposes it before any answer.
    n.step(2, 5, Body::HeartbeatResp { round: 99 });
    assert_eq!(n.r.role(), Role::Follower);
    assert!(n.ready().reads.is_empty());

    let mut single = Node::new(1, 1);
    single.time_out();
    assert_eq!(single.r.role(), Role::Leader);
    single.ready();
    single.ready();
    assert_eq!(single.r.commit_index(), 1);
    single.r.read_index(3).unwrap();
    assert_eq!(single.ready().reads.len(), 1);
}
