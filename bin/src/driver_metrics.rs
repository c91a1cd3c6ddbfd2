//! What the production driver measures for `/metrics`: commit latency, the
//! time of the steps that ran a scheduler pass, each placement's queue wait
//! and the leader elections committed. It watches the replica's outputs and
//! inputs go by; it never changes them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rustci_core::event::{Entry, Event, LogIndex};
use rustci_core::replica::Replica;
use rustci_core::state::State;
use rustci_net::metrics::Metrics;

/// Batches waiting for their commit that are tracked at most; past it the
/// oldest is forgotten (its commit goes unmeasured). The proposals in
/// flight are bounded far below this by the replica.
pub const BATCHES_TRACKED_MAX: usize = 1 << 16;

/// One batch handed to the log, waiting for its commit.
struct Proposed {
    /// Its last index: the batch is committed once the commit index is here.
    last: LogIndex,
    proposed: Instant,
    /// The queue wait (µs) of each placement in it.
    queue_waits_us: Vec<u64>,
    leader_elections: u64,
}

pub struct DriverMetrics {
    metrics: Arc<Metrics>,
    /// In log order.
    proposed: VecDeque<Proposed>,
}

impl DriverMetrics {
    pub fn new(metrics: Arc<Metrics>) -> DriverMetrics {
        DriverMetrics {
            metrics,
            proposed: VecDeque::new(),
        }
    }

    /// The replica asked for `entries` to be persisted; `state` is its
    /// applied state, in which every job placed by `entries` waits queued.
    pub fn proposed(&mut self, state: &State, entries: &[Entry]) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        let (first, last) = (first.index, last.index);
        // A log cut back under earlier batches (a new Raft leader's
        // entries replacing ours) never commits them as proposed.
        while self.proposed.back().is_some_and(|p| p.last >= first) {
            self.proposed.pop_back();
        }
        let mut batch = Proposed {
            last,
            proposed: Instant::now(),
            queue_waits_us: Vec::new(),
            leader_elections: 0,
        };
        for entry in entries {
            match &entry.event {
                Event::AttemptAssigned { job, attempt, .. } => {
                    if let Some(since) = queued_since(state, *job, *attempt) {
                        batch
                            .queue_waits_us
                            .push(entry.at.saturating_sub(since).saturating_mul(1000));
                    }
                }
                Event::LeaderElected { .. } => batch.leader_elections += 1,
                _ => {}
            }
        }
        if self.proposed.len() == BATCHES_TRACKED_MAX {
            self.proposed.pop_front();
        }
        self.proposed.push_back(batch);
    }

    /// The log is committed up to `index`.
    pub fn committed(&mut self, index: LogIndex) {
        while self.proposed.front().is_some_and(|p| p.last <= index) {
            let batch = self.proposed.pop_front().expect("front exists");
            self.metrics.commit.observe(batch.proposed.elapsed());
            for wait in batch.queue_waits_us {
                self.metrics.queue_wait.observe_us(wait);
            }
            self.metrics
                .leader_changes
                .fetch_add(batch.leader_elections, Ordering::Relaxed);
        }
    }

    /// Runs one replica step; when it ran a scheduler pass, records how long
    /// the step took.
    pub fn step<R>(&self, replica: &mut Replica, step: impl FnOnce(&mut Replica) -> R) -> R {
        let passes = replica.scheduler_passes();
        let started = Instant::now();
        let result = step(replica);
        if replica.scheduler_passes() != passes {
            self.metrics.scheduling.observe(started.elapsed());
        }
        result
    }
}

/// When the job's `attempt` began to wait: its submission for the first
/// attempt, the end of the attempt before for a later one.
fn queued_since(
    state: &State,
    job: rustci_core::model::JobId,
    attempt: rustci_core::model::AttemptNumber,
) -> Option<u64> {
    let job = state.job(job)?;
    if attempt <= 1 {
        return Some(job.submitted_at);
    }
    job.attempts
        .iter()
        .find(|a| a.number + 1 == attempt)
        .and_then(|a| a.finished_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elected(index: LogIndex, term: u64) -> Entry {
        Entry {
            index,
            term,
            at: 1_000,
            event: Event::LeaderElected { replica: 1, term },
        }
    }

    #[test]
    fn a_batch_is_measured_once_when_committed_and_never_if_cut_back() {
        let metrics = Arc::new(Metrics::new());
        let mut measured = DriverMetrics::new(metrics.clone());
        let state = State::new();
        measured.proposed(&state, &[elected(1, 1)]);
        measured.proposed(&state, &[elected(2, 1), elected(3, 1)]);
        measured.committed(2);
        assert_eq!(metrics.commit.count(), 1, "the second batch ends at 3");
        measured.committed(3);
        assert_eq!(metrics.commit.count(), 2);
        assert_eq!(metrics.leader_changes.load(Ordering::Relaxed), 3);
        // Proposed at 4 and 5, then 5 is replaced by another batch at 5.
        measured.proposed(&state, &[elected(4, 1)]);
        measured.proposed(&state, &[elected(5, 1)]);
        measured.proposed(&state, &[elected(5, 2)]);
        measured.committed(5);
        assert_eq!(metrics.commit.count(), 4);
        assert_eq!(metrics.leader_changes.load(Ordering::Relaxed), 5);
    }
}
