//! Which committed events concern a job or a node: the filters of
//! `GET /v1/events?job=ID&node=NAME`, `rustci events` and `rustci replay`.
//!
//! An event concerns a job when it names the job, or is the submission that
//! created it (the job's `seq`). It concerns a node when it names the node
//! (its registration, drain, down, up, removal, undrain, or a placement on
//! it), or is about an attempt placed on the node. Both are read off a state
//! at or after the entry: a job's `seq` and an attempt's node never change
//! once set, so the live state answers for every past entry. Reads only.

use rustci_core::event::Entry;
use rustci_core::model::JobId;
use rustci_core::state::State;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub job: Option<JobId>,
    pub node: Option<String>,
}

impl EventFilter {
    /// No filter: every event matches.
    pub fn is_empty(&self) -> bool {
        self.job.is_none() && self.node.is_none()
    }

    /// Whether `entry` concerns the job and the node asked for (both, when
    /// both are given). `state` must have applied `entry` already.
    pub fn matches(&self, state: &State, entry: &Entry) -> bool {
        assert!(
            entry.index <= state.applied_index,
            "filtering an entry not applied yet"
        );
        self.job.is_none_or(|job| concerns_job(state, entry, job))
            && self
                .node
                .as_deref()
                .is_none_or(|node| concerns_node(state, entry, node))
    }
}

fn concerns_job(state: &State, entry: &Entry, job: JobId) -> bool {
    if entry.event.job() == Some(job) {
        return true;
    }
    matches!(entry.event, rustci_core::event::Event::JobSubmitted { .. })
        && state.job(job).is_some_and(|j| j.seq == entry.index)
}

fn concerns_node(state: &State, entry: &Entry, node: &str) -> bool {
    if let Some(named) = entry.event.node() {
        return named == node;
    }
    let Some((job, attempt)) = entry.event.attempt() else {
        return false;
    };
    state
        .job(job)
        .and_then(|j| j.attempts.iter().find(|a| a.number == attempt))
        .is_some_and(|a| a.node == node)
}
