//! The reducer state's snapshot image: the part of a [`State`] that the log
//! defines, as plain serde data, and the way back to a whole `State`.
//!
//! What it is for: log compaction. A driver stores a snapshot of the state
//! at an index and drops the log up to it; start-up (or a follower that
//! receives the snapshot) rebuilds the state from the image and replays only
//! the entries after it.
//!
//! What it never does: turn the image into bytes. Core knows no wire format
//! (see ARCHITECTURE.md); the versioned, checksummed byte codec is
//! `rustci_storage::snapshot`, which serializes a [`StateImage`].
//!
//! The image holds only fundamental fields. Everything derived is rebuilt
//! by [`State::from_image`]: the idempotency keys by time (from the keys and
//! the jobs they name), the queue, the active attempts per node, the counts
//! per state, and the scheduler's indexes ([`State::rebuild_indexes`]). The
//! rebuilt state must then pass [`State::check_consistency`], so an image
//! that is well formed but impossible (a node allocated more than its active
//! attempts, a key naming no job) is refused rather than loaded.
//!
//! Field order is the format: the codec writes structs as arrays. A new
//! field goes at the end with `#[serde(default)]`; anything else is a new
//! snapshot format version in the codec.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{LogIndex, ReplicaId, Term};
use crate::model::{Job, JobId, JobState, Node, TimestampMs};
use crate::state::{state_slot, JobTable, State};

/// The fundamental fields of a [`State`], borrowed from a live state when
/// encoding ([`State::image`]) and owned when decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateImage<'a> {
    pub applied_index: LogIndex,
    pub applied_term: Term,
    pub last_at: TimestampMs,
    pub leader: Option<ReplicaId>,
    pub leader_term: Term,
    /// Every job in id order; ids run densely from 1.
    pub jobs: JobsImage<'a>,
    pub idempotency: Cow<'a, BTreeMap<String, JobId>>,
    /// Nodes with their `allocated` resources: derivable, but kept so the
    /// consistency check on decode compares them with the active attempts.
    pub nodes: Cow<'a, BTreeMap<String, Node>>,
    pub ignored_entries: u64,
    pub attempts_lost: u64,
    /// Added with membership changes: images written before have none.
    #[serde(default)]
    pub members: Cow<'a, BTreeMap<ReplicaId, String>>,
    #[serde(default)]
    pub members_index: LogIndex,
}

/// The job table of an image: a sequence of jobs in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobsImage<'a> {
    Borrowed(&'a JobTable),
    Owned(Vec<Job>),
}

impl JobsImage<'_> {
    pub fn len(&self) -> usize {
        match self {
            JobsImage::Borrowed(table) => table.len(),
            JobsImage::Owned(jobs) => jobs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for JobsImage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            JobsImage::Borrowed(table) => serializer.collect_seq(table.values()),
            JobsImage::Owned(jobs) => serializer.collect_seq(jobs),
        }
    }
}

impl<'de> Deserialize<'de> for JobsImage<'_> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<Job>::deserialize(deserializer).map(JobsImage::Owned)
    }
}

/// Why an image cannot become a state. The image decoded, but what it
/// says is impossible for a state the reducer built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error(
        "job at position {position} has id {found}, expected {expected} (ids are dense from 1)"
    )]
    JobIdsNotDense {
        position: usize,
        expected: u64,
        found: u64,
    },
    #[error("idempotency key {key:?} names job {job}, which does not exist")]
    KeyWithoutJob { key: String, job: u64 },
    #[error("the state it describes is inconsistent: {0}")]
    Inconsistent(String),
}

impl State {
    /// The image of this state's fundamental fields, borrowing them.
    pub fn image(&self) -> StateImage<'_> {
        StateImage {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            last_at: self.last_at,
            leader: self.leader,
            leader_term: self.leader_term,
            jobs: JobsImage::Borrowed(&self.jobs),
            idempotency: Cow::Borrowed(&self.idempotency),
            nodes: Cow::Borrowed(&self.nodes),
            ignored_entries: self.ignored_entries,
            attempts_lost: self.attempts_lost,
            members: Cow::Borrowed(&self.members),
            members_index: self.members_index,
        }
    }

    /// The state an image describes, with every derived index rebuilt and
    /// checked ([`State::check_consistency`]). The planted-bug selection is
    /// the default (none); a caller that runs with one sets `bugs` and calls
    /// [`State::rebuild_indexes`], as `Replica::recover` does.
    pub fn from_image(image: StateImage<'_>) -> Result<State, ImageError> {
        let mut state = State {
            applied_index: image.applied_index,
            applied_term: image.applied_term,
            last_at: image.last_at,
            leader: image.leader,
            leader_term: image.leader_term,
            idempotency: image.idempotency.into_owned(),
            nodes: image.nodes.into_owned(),
            ignored_entries: image.ignored_entries,
            attempts_lost: image.attempts_lost,
            members: image.members.into_owned(),
            members_index: image.members_index,
            ..State::for_replay()
        };
        let jobs = match image.jobs {
            JobsImage::Borrowed(table) => table.values().cloned().collect(),
            JobsImage::Owned(jobs) => jobs,
        };
        for (position, job) in jobs.into_iter().enumerate() {
            let expected = state.jobs.next_id();
            if job.id != expected {
                return Err(ImageError::JobIdsNotDense {
                    position,
                    expected: expected.0,
                    found: job.id.0,
                });
            }
            state.jobs.push(job);
        }
        state.rebuild_derived()?;
        state.rebuild_indexes();
        state
            .check_consistency()
            .map_err(ImageError::Inconsistent)?;
        Ok(state)
    }

    /// Rebuilds the derived fields the reducer keeps beside the jobs (all
    /// but the scheduler's indexes) from the jobs and the keys.
    fn rebuild_derived(&mut self) -> Result<(), ImageError> {
        let mut key_times = BTreeSet::new();
        for (key, id) in &self.idempotency {
            let Some(job) = self.jobs.get(id) else {
                return Err(ImageError::KeyWithoutJob {
                    key: key.clone(),
                    job: id.0,
                });
            };
            key_times.insert((job.submitted_at, key.clone()));
        }
        let mut queue = BTreeSet::new();
        let mut active_by_node: BTreeMap<String, BTreeSet<JobId>> = BTreeMap::new();
        let mut job_counts = [0u64; 6];
        for job in self.jobs.values() {
            job_counts[state_slot(job.state)] += 1;
            if job.state == JobState::Queued {
                queue.insert(self.queue_key(job));
            }
            if let Some(attempt) = job.active_attempt() {
                active_by_node
                    .entry(attempt.node.clone())
                    .or_default()
                    .insert(job.id);
            }
        }
        self.key_times = key_times;
        self.queue = queue;
        self.active_by_node = active_by_node;
        self.job_counts = job_counts;
        Ok(())
    }
}
