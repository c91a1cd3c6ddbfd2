//! Terms, votes and roles: who leads (paper §5.2, §5.4.1; PreVote and
//! CheckQuorum from Ongaro's thesis §9.6 and §6.2).

use super::msg::{Body, Message, NodeId, Payload};
use super::progress::Progress;
use super::ready::Role;
use super::Raft;

impl<T: Payload> Raft<T> {
    /// Applies the term rules to `msg`; false if it must go no further.
    pub(super) fn step_term(&mut self, msg: &Message<T>) -> bool {
        if msg.term > self.term {
            let campaign_msg = match msg.body {
                Body::PreVote { .. } => true,
                Body::Vote { transfer, .. } => !transfer,
                _ => false,
            };
            if campaign_msg && self.in_lease() {
                // A leader we (or, as the leader, a quorum) heard from within
                // an election timeout is alive: a node that lost touch must
                // not depose it.
                return false;
            }
            match msg.body {
                // A pre-vote moves no term; a granted answer carries the term
                // its sender would campaign in, not one anybody is in.
                Body::PreVote { .. } | Body::PreVoteResp { granted: true } => {}
                _ => {
                    let leader = msg.body.is_from_leader().then_some(msg.from);
                    self.become_follower(msg.term, leader);
                }
            }
            return true;
        }
        if msg.term < self.term {
            match msg.body {
                // A stale leader (or one cut off for a while) learns of the
                // newer term from the answer and steps down; without it, a
                // node that was partitioned could stall under CheckQuorum.
                Body::Append { .. } | Body::Heartbeat { .. } | Body::InstallSnapshot { .. } => {
                    self.send(
                        msg.from,
                        self.term,
                        Body::AppendResp {
                            index: 0,
                            reject: None,
                        },
                    );
                }
                Body::PreVote { .. } => {
                    self.send(msg.from, self.term, Body::PreVoteResp { granted: false });
                }
                _ => {}
            }
            return false;
        }
        true
    }

    /// A message whose term is ours (or a pre-vote at a later term).
    pub(super) fn step_current(&mut self, msg: Message<T>) {
        let from = msg.from;
        if msg.body.is_from_leader() {
            assert!(
                self.role != Role::Leader,
                "two leaders in term {}: {} and {}",
                self.term,
                self.config.id,
                from
            );
            if self.role != Role::Follower || self.leader != Some(from) {
                self.become_follower(self.term, Some(from));
            }
            self.leader_heard_ms = self.now_ms;
            self.election_reset_ms = self.now_ms;
        }
        match msg.body {
            Body::PreVote {
                last_index,
                last_term,
            } => self.handle_vote_request(from, msg.term, true, last_index, last_term),
            Body::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote_request(from, msg.term, false, last_index, last_term),
            Body::PreVoteResp { granted } => {
                let expected = if granted { self.term + 1 } else { self.term };
                if self.role == Role::PreCandidate && msg.term == expected {
                    self.poll(from, granted);
                }
            }
            Body::VoteResp { granted } => {
                if self.role == Role::Candidate {
                    self.poll(from, granted);
                }
            }
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => self.handle_append(from, prev_index, prev_term, entries, commit),
            // Answers count only from the voters a leader tracks (one of a
            // removed voter is late news).
            Body::AppendResp { index, reject } => {
                if self.role == Role::Leader && self.progress.contains_key(&from) {
                    self.handle_append_resp(from, index, reject);
                }
            }
            Body::Heartbeat { commit, round } => self.handle_heartbeat(from, commit, round),
            Body::InstallSnapshot { meta, voters } => {
                self.handle_install_snapshot(from, meta, voters)
            }
            Body::HeartbeatResp { round } => {
                if self.role == Role::Leader && self.progress.contains_key(&from) {
                    self.handle_heartbeat_resp(from, round);
                }
            }
            Body::TimeoutNow => self.campaign(true),
        }
    }

    /// Whether a live leader's lease protects this node from campaigns.
    fn in_lease(&self) -> bool {
        self.config.check_quorum
            && self.leader.is_some()
            && self.now_ms - self.leader_heard_ms < self.config.election_timeout_ms
    }

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: u64,
        pre_vote: bool,
        last_index: u64,
        last_term: u64,
    ) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && term > self.term);
        let grant = can_vote && self.log.is_up_to_date(last_index, last_term);
        if pre_vote {
            let answer_term = if grant { term } else { self.term };
            self.send(from, answer_term, Body::PreVoteResp { granted: grant });
            return;
        }
        if grant {
            // Durable before the answer leaves (the driver contract): a node
            // that restarts remembers it voted in this term.
            self.vote = Some(from);
            self.reset_election_timer();
        }
        self.send(from, self.term, Body::VoteResp { granted: grant });
    }

    /// Starts an election: a pre-vote round first when configured, unless
    /// the leader handed over (`transfer`).
    pub(super) fn campaign(&mut self, transfer: bool) {
        let pre_vote = self.config.pre_vote && !transfer;
        self.start_election(pre_vote, transfer);
    }

    fn start_election(&mut self, pre_vote: bool, transfer: bool) {
        // A node outside its configuration never campaigns: it was removed,
        // or its log does not hold the change that adds it yet.
        if self.role == Role::Leader || !self.is_voter() {
            return;
        }
        if pre_vote {
            self.role = Role::PreCandidate;
            self.leader = None;
            self.votes.clear();
            self.reset_election_timer();
        } else {
            let term = self.term + 1;
            self.become_follower(term, None);
            self.role = Role::Candidate;
            self.vote = Some(self.config.id);
        }
        self.votes.insert(self.config.id, true);
        let term = if pre_vote { self.term + 1 } else { self.term };
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.peers() {
            let body = if pre_vote {
                Body::PreVote {
                    last_index,
                    last_term,
                }
            } else {
                Body::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            };
            self.send(peer, term, body);
        }
        self.tally();
    }

    /// A vote counts only from a voter of the configuration in effect.
    fn poll(&mut self, from: NodeId, granted: bool) {
        if !self.voters().contains(from) {
            return;
        }
        self.votes.entry(from).or_insert(granted);
        self.tally();
    }

    fn tally(&mut self) {
        let granted = self.votes.values().filter(|&&g| g).count();
        let rejected = self.votes.len() - granted;
        let quorum = self.voters().quorum();
        if granted >= quorum {
            match self.role {
                Role::PreCandidate => self.start_election(false, false),
                Role::Candidate => self.become_leader(),
                _ => unreachable!("only a campaign tallies votes"),
            }
        } else if self.voters().len() - rejected < quorum {
            self.become_follower(self.term, None);
        }
    }

    fn become_leader(&mut self) {
        assert_eq!(self.role, Role::Candidate);
        assert!(self.is_voter());
        self.role = Role::Leader;
        self.leader = Some(self.config.id);
        self.votes.clear();
        self.degraded = false;
        self.leader_heard_ms = self.now_ms;
        self.heartbeat_due_ms = self.now_ms + self.config.heartbeat_interval_ms;
        let last = self.log.last_index();
        self.progress = self
            .peers()
            .into_iter()
            .map(|p| (p, Progress::new(last, self.now_ms)))
            .collect();
        // Committing an entry of its own term is how a leader learns which
        // earlier entries are committed (§5.4.2); this one is it.
        let first = T::leader_elected(self.term, self.config.id, self.stamp);
        assert!(
            first.voters_change().is_none(),
            "a leader's first entry changes no voters"
        );
        self.log.push(self.term, first);
        self.broadcast_append(false);
    }

    pub(super) fn tick_leader(&mut self) {
        if self.now_ms >= self.heartbeat_due_ms {
            self.heartbeat_due_ms = self.now_ms + self.config.heartbeat_interval_ms;
            self.broadcast_heartbeat();
        }
        if let Some((_, deadline)) = self.transfer {
            if self.now_ms >= deadline {
                self.transfer = None;
            }
        }
        if self.config.check_quorum {
            self.check_quorum();
        }
    }

    /// CheckQuorum: step down once fewer than a quorum of the voters in
    /// effect (this node included if it is one) answered within an election
    /// timeout; `degraded` once any follower was silent for half of one.
    fn check_quorum(&mut self) {
        let timeout = self.config.election_timeout_ms;
        let now = self.now_ms;
        let silent_for = |heard: u64| now.saturating_sub(heard);
        let active = usize::from(self.is_voter())
            + self
                .progress
                .values()
                .filter(|p| silent_for(p.heard_ms) < timeout)
                .count();
        self.degraded = self
            .progress
            .values()
            .any(|p| silent_for(p.heard_ms) >= timeout / 2);
        if active < self.voters().quorum() {
            self.become_follower(self.term, None);
        } else {
            self.leader_heard_ms = now;
        }
    }
}
