//! Log replication and commit (paper §5.3, §5.4.2): what a leader sends
//! each follower, how a follower merges it, and when an entry is committed.

use super::msg::{Body, Entry, LogIndex, NodeId, Payload, RejectHint, SnapshotMeta, Term, Voters};
use super::progress::ReplicationState;
use super::ready::{NeedEntries, Role};
use super::Raft;

impl<T: Payload> Raft<T> {
    /// Sends every follower what it lacks; with `empty_ok`, also an empty
    /// append to those that lack nothing, to carry a new commit index.
    pub(super) fn broadcast_append(&mut self, empty_ok: bool) {
        for peer in self.peers() {
            self.send_append(peer, empty_ok);
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        self.heartbeat_round += 1;
        let round = self.heartbeat_round;
        for peer in self.peers() {
            let matched = self.progress[&peer].match_index;
            let commit = matched.min(self.log.committed);
            self.send(peer, self.term, Body::Heartbeat { commit, round });
        }
    }

    /// Sends `peer` the entries from its `next_index` on, as many as one
    /// append may carry, unless its pipeline is paused. Entries no longer in
    /// memory are asked of the driver first.
    pub(super) fn send_append(&mut self, peer: NodeId, empty_ok: bool) {
        assert_eq!(self.role, Role::Leader);
        let inflight_max = self.config.inflight_appends_max;
        let pr = &self.progress[&peer];
        if pr.is_paused(inflight_max) {
            return;
        }
        let next = pr.next_index;
        let last = self.log.last_index();
        assert!(next >= 1 && next <= last + 1);
        let base = self.log.base();
        if next <= base.index {
            // Compacted away: only the snapshot can bring it up.
            let now = self.now_ms;
            self.progress
                .get_mut(&peer)
                .expect("peer")
                .become_snapshot(base.index, now);
            let voters = self.configs[0].1;
            self.send(
                peer,
                self.term,
                Body::InstallSnapshot { meta: base, voters },
            );
            return;
        }
        let entries = if next <= last {
            let sliced = self.log.slice(
                next,
                last,
                self.config.append_entries_max,
                self.config.append_bytes_max,
                T::size_bytes,
            );
            match sliced {
                Some(entries) => entries,
                None => {
                    let to = (self.log.cache_first() - 1)
                        .min(next + self.config.append_entries_max as u64 - 1);
                    self.progress.get_mut(&peer).expect("peer").loading = Some((next, to));
                    self.need_entries.push(NeedEntries {
                        peer,
                        from: next,
                        to,
                    });
                    return;
                }
            }
        } else if empty_ok || pr.state == ReplicationState::Probe {
            Vec::new()
        } else {
            return;
        };
        self.send_entries(peer, next - 1, entries);
    }

    fn send_entries(&mut self, peer: NodeId, prev_index: LogIndex, entries: Vec<Entry<T>>) {
        let prev_term = self.log.term(prev_index).expect("the leader holds prev");
        let last_sent = prev_index + entries.len() as u64;
        let inflight_max = self.config.inflight_appends_max;
        let pr = self.progress.get_mut(&peer).expect("peer");
        if !entries.is_empty() || pr.state == ReplicationState::Probe {
            pr.sent(last_sent, inflight_max);
        }
        let commit = self.log.committed;
        self.send(
            peer,
            self.term,
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            },
        );
    }

    /// Entries the driver read back from storage for `peer`.
    pub(super) fn send_loaded(&mut self, peer: NodeId, mut entries: Vec<Entry<T>>) {
        if self.role != Role::Leader {
            return;
        }
        let Some(pr) = self.progress.get_mut(&peer) else {
            return;
        };
        let Some((from, to)) = pr.loading.take() else {
            return;
        };
        let next = pr.next_index;
        if entries.is_empty() || from <= self.log.base().index {
            // Storage compacted them meanwhile: the snapshot will do.
            self.send_append(peer, true);
            return;
        }
        let as_asked = entries.len() as u64 == to - from + 1
            && entries
                .iter()
                .zip(from..)
                .all(|(e, i)| e.index == i && self.log.term(i) == Some(e.term));
        assert!(
            as_asked,
            "storage answered entries {from}..={to} with others"
        );
        if next != from {
            // The follower's position moved while storage was read.
            self.send_append(peer, true);
            return;
        }
        let mut bytes = 0u64;
        let mut keep = 0;
        for e in &entries {
            bytes = bytes.saturating_add(T::size_bytes(&e.data));
            if keep > 0
                && (keep >= self.config.append_entries_max || bytes > self.config.append_bytes_max)
            {
                break;
            }
            keep += 1;
        }
        entries.truncate(keep);
        self.send_entries(peer, from - 1, entries);
    }

    /// A follower merges a leader's append (paper §5.3).
    pub(super) fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry<T>>,
        commit: LogIndex,
    ) {
        if prev_index < self.log.committed {
            let committed = self.log.committed;
            self.send(
                from,
                self.term,
                Body::AppendResp {
                    index: committed,
                    reject: None,
                },
            );
            return;
        }
        if self.log.term(prev_index) == Some(prev_term) {
            assert!(entries
                .iter()
                .zip(prev_index + 1..)
                .all(|(e, i)| e.index == i && e.term <= self.term));
            // Entries from the first one the log does not hold (as `merge`
            // finds it) replace whatever follows: their change entries
            // replace the configurations from there on.
            let first_new = entries
                .iter()
                .find(|e| self.log.term(e.index) != Some(e.term))
                .map(|e| e.index);
            let changes: Vec<(LogIndex, Voters)> = entries
                .iter()
                .filter(|e| first_new.is_some_and(|f| e.index >= f))
                .filter_map(|e| e.data.voters_change().map(|v| (e.index, v)))
                .collect();
            let before = self.voters();
            let last_new = self.log.merge(prev_index, entries);
            if let Some(first_new) = first_new {
                self.configs_truncated(first_new);
                self.configs.extend(changes);
                self.voters_changed(before);
            }
            let commit = commit.min(last_new);
            if commit > self.log.committed {
                self.log.committed = commit;
            }
            self.send(
                from,
                self.term,
                Body::AppendResp {
                    index: last_new,
                    reject: None,
                },
            );
        } else {
            let hint_index = self
                .log
                .last_index_with_term_at_most(prev_index.min(self.log.last_index()), prev_term);
            let hint_term = self.log.term(hint_index).expect("hint is in the log");
            self.send(
                from,
                self.term,
                Body::AppendResp {
                    index: prev_index,
                    reject: Some(RejectHint {
                        index: hint_index,
                        term: hint_term,
                    }),
                },
            );
        }
    }

    /// A follower offered the leader's snapshot (paper §7), with the
    /// configuration in effect at its index.
    pub(super) fn handle_install_snapshot(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        voters: Voters,
    ) {
        let index = if meta.index <= self.log.committed {
            // Old news: what it covers is committed here already.
            self.log.committed
        } else if self.log.term(meta.index) == Some(meta.term) {
            // The log holds the snapshot's last entry, hence all before it.
            self.log.committed = meta.index;
            meta.index
        } else {
            let before = self.voters();
            self.log.install(meta);
            self.configs = vec![(meta.index, voters)];
            self.voters_changed(before);
            meta.index
        };
        self.send(
            from,
            self.term,
            Body::AppendResp {
                index,
                reject: None,
            },
        );
    }

    pub(super) fn handle_heartbeat(&mut self, from: NodeId, commit: LogIndex, round: u64) {
        let commit = commit.min(self.log.last_index());
        if commit > self.log.committed {
            self.log.committed = commit;
        }
        self.send(from, self.term, Body::HeartbeatResp { round });
    }

    pub(super) fn handle_append_resp(
        &mut self,
        from: NodeId,
        index: LogIndex,
        reject: Option<RejectHint>,
    ) {
        let now = self.now_ms;
        match reject {
            None => {
                let pr = self.progress.get_mut(&from).expect("peer");
                pr.heard_ms = now;
                if !pr.accepted(index) {
                    return;
                }
                let snapshot_done = pr.match_index >= pr.snapshot_sent.1;
                match pr.state {
                    ReplicationState::Probe => pr.become_replicate(),
                    ReplicationState::Snapshot if snapshot_done => pr.become_replicate(),
                    _ => {}
                }
                if self.maybe_commit() {
                    self.committed_more();
                    if self.role != Role::Leader {
                        // It removed itself and stepped down.
                        return;
                    }
                }
                self.maybe_send_timeout_now(from);
                self.send_append(from, false);
            }
            Some(hint) => {
                let probe = self.log.last_index_with_term_at_most(hint.index, hint.term);
                let pr = self.progress.get_mut(&from).expect("peer");
                pr.heard_ms = now;
                if pr.rejected(index, probe) {
                    self.send_append(from, true);
                }
            }
        }
    }

    pub(super) fn handle_heartbeat_resp(&mut self, from: NodeId, round: u64) {
        let last = self.log.last_index();
        let now = self.now_ms;
        let snapshot_timeout_ms = self.config.election_timeout_ms;
        let pr = self.progress.get_mut(&from).expect("peer");
        pr.heard_ms = now;
        pr.acked_round = pr.acked_round.max(round);
        self.confirm_reads();
        let pr = self.progress.get_mut(&from).expect("peer");
        if pr.state == ReplicationState::Snapshot {
            if now - pr.snapshot_sent.0 < snapshot_timeout_ms {
                return;
            }
            // The snapshot (or its answer) was lost: start over.
            pr.become_probe();
        }
        // A lost append leaves a probe waiting or a pipeline full forever;
        // each heartbeat answer lets one more append out.
        pr.probe_sent = false;
        if pr.state == ReplicationState::Replicate {
            pr.inflight.pop_front();
        }
        if pr.match_index < last {
            // Also when nothing is new: an append from `next_index` that the
            // follower refuses reveals an append lost on the way.
            self.send_append(from, true);
        }
    }

    /// Advances the commit index to the highest index a quorum of the
    /// voters in effect holds (this node counts only if it is one), if that
    /// entry is of the current term (§5.4.2: counting replicas never
    /// commits an older term's entry by itself; the planted
    /// `CommitEarlierTermByCount` does, as soon as a quorum holds it, which
    /// is Figure 8's unsafe commit).
    pub(super) fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<LogIndex> = self
            .progress
            .values()
            .map(|p| p.match_index)
            .chain(self.is_voter().then_some(self.log.stable_index))
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_index = if planted!(self.config.bugs, AckWithoutQuorum) {
            self.log.stable_index
        } else {
            matched[self.voters().quorum() - 1]
        };
        let of_this_term = self.log.term(quorum_index) == Some(self.term);
        if quorum_index > self.log.committed
            && (of_this_term || planted!(self.config.bugs, CommitEarlierTermByCount))
        {
            self.log.committed = quorum_index;
            return true;
        }
        false
    }

    /// Tells the transfer target to campaign once its log is the leader's.
    pub(super) fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        if self.transfer.map(|t| t.0) == Some(peer)
            && self.progress[&peer].match_index == self.log.last_index()
        {
            self.send(peer, self.term, Body::TimeoutNow);
        }
    }
}
