//! What a leader knows of each follower's log, and how it paces appends to
//! it: one probe at a time until the follower's log is found to match, then
//! a pipeline of optimistic appends bounded by `inflight_appends_max`.

use std::collections::VecDeque;

use super::msg::LogIndex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// Where the follower's log matches is unknown: one append at a time,
    /// each waiting for its answer (or the next heartbeat answer).
    Probe,
    /// The follower's log matches up to `match_index`: appends stream
    /// without waiting, `next_index` moved ahead optimistically.
    Replicate,
    /// It needs entries compacted away: a snapshot is on its way; nothing
    /// else is sent until it is answered (or `election_timeout` passes).
    Snapshot,
}

#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// The follower holds the leader's log up to here (known for sure).
    pub match_index: LogIndex,
    /// The next entry to send it.
    pub next_index: LogIndex,
    pub state: ReplicationState,
    /// Probe: an append is out and unanswered; send nothing more until an
    /// answer or a heartbeat answer.
    pub probe_sent: bool,
    /// Replicate: the last index of each append in flight, oldest first
    /// (at most `inflight_appends_max`).
    pub inflight: VecDeque<LogIndex>,
    /// When the follower last answered (the leader's monotonic clock):
    /// CheckQuorum and the `degraded` flag read it.
    pub heard_ms: u64,
    /// Entries `lo..=hi` were asked of the driver's storage and not yet
    /// given: nothing is sent to this follower until they come.
    pub loading: Option<(LogIndex, LogIndex)>,
    /// Snapshot: when it was sent and the index it covers.
    pub snapshot_sent: (u64, LogIndex),
    /// The latest heartbeat round the follower answered in this term.
    pub acked_round: u64,
}

impl Progress {
    /// A new leader's view: it knows nothing of the follower's log and
    /// counts it as heard from `now_ms` (a fresh grace period).
    pub fn new(last_index: LogIndex, now_ms: u64) -> Progress {
        Progress {
            match_index: 0,
            next_index: last_index + 1,
            state: ReplicationState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            heard_ms: now_ms,
            loading: None,
            snapshot_sent: (0, 0),
            acked_round: 0,
        }
    }

    pub fn is_paused(&self, inflight_max: usize) -> bool {
        self.loading.is_some()
            || match self.state {
                ReplicationState::Probe => self.probe_sent,
                ReplicationState::Replicate => self.inflight.len() >= inflight_max,
                ReplicationState::Snapshot => true,
            }
    }

    pub fn become_probe(&mut self) {
        self.state = ReplicationState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        self.next_index = self.next_index.max(self.match_index + 1);
    }

    pub fn become_replicate(&mut self) {
        self.state = ReplicationState::Replicate;
        self.probe_sent = false;
        self.inflight.clear();
        self.next_index = self.match_index + 1;
    }

    /// A snapshot covering up to `index` went out at `now_ms`.
    pub fn become_snapshot(&mut self, index: LogIndex, now_ms: u64) {
        self.state = ReplicationState::Snapshot;
        self.probe_sent = false;
        self.inflight.clear();
        self.snapshot_sent = (now_ms, index);
    }

    /// An append carrying entries up to `last` went out.
    pub fn sent(&mut self, last: LogIndex, inflight_max: usize) {
        match self.state {
            ReplicationState::Probe => self.probe_sent = true,
            ReplicationState::Replicate => {
                assert!(self.inflight.len() < inflight_max, "sent while paused");
                self.next_index = last + 1;
                self.inflight.push_back(last);
            }
            ReplicationState::Snapshot => unreachable!("appends wait for the snapshot"),
        }
    }

    /// The follower accepted up to `index`. False if that is old news.
    pub fn accepted(&mut self, index: LogIndex) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflight.front().is_some_and(|&i| i <= index) {
            self.inflight.pop_front();
        }
        updated
    }

    /// The follower rejected `rejected` (the `prev_index` we sent); `probe`
    /// is where the hint says to look next. False if the rejection answers
    /// an append that no longer matters.
    pub fn rejected(&mut self, rejected: LogIndex, probe: LogIndex) -> bool {
        // What the follower acknowledged it holds for good: a refusal of
        // an index up to there is an old answer that arrived late
        // (reordered), in either state, and asks for nothing.
        let stale = match self.state {
            ReplicationState::Replicate => rejected <= self.match_index,
            ReplicationState::Probe => {
                rejected != self.next_index - 1 || rejected <= self.match_index
            }
            ReplicationState::Snapshot => true,
        };
        if stale {
            return false;
        }
        // The follower does not hold `rejected` as the leader does: the next
        // probe looks before it, even where the hint cannot (it stops at the
        // leader's snapshot, and a next index at or before the snapshot
        // sends the snapshot).
        self.next_index = rejected.min(probe + 1).max(self.match_index + 1);
        self.become_probe();
        true
    }
}
