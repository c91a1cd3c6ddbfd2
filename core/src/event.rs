//! The event vocabulary: every control-plane decision, as it is written to the
//! log. State is only ever the fold of these through [`crate::state::State::apply`].
//!
//! Events record *decisions*, not requests: the scheduler's placement is an
//! event, and so is a runner's report; soft state (heartbeats) never is.

use serde::{Deserialize, Serialize};

use crate::model::{AttemptNumber, JobId, JobSpec, Labels, Outcome, Resources, TimestampMs, Usage};

/// A replica's identity within its cluster (1-based, as on the command line).
pub type ReplicaId = u64;
pub type Term = u64;
pub type LogIndex = u64;

/// One entry of the replicated log. `at` is stamped by the leader that
/// proposed it and never decreases along the log, so replay needs no clock.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub index: LogIndex,
    pub term: Term,
    pub at: TimestampMs,
    pub event: Event,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// A new leader's first entry of its term.
    LeaderElected { replica: ReplicaId, term: Term },
    /// A user submitted a job. The reducer assigns its id; a repeated
    /// idempotency key is a recorded no-op that answers with the first job.
    JobSubmitted {
        spec: JobSpec,
        idempotency_key: Option<String>,
    },
    /// A user cancelled a job. Terminal jobs ignore it.
    JobCancelled { job: JobId },
    /// The scheduler placed the job's next attempt on a node.
    AttemptAssigned {
        job: JobId,
        attempt: AttemptNumber,
        node: String,
    },
    /// The runner started the attempt's process.
    AttemptStarted { job: JobId, attempt: AttemptNumber },
    /// The runner reports how the attempt ended.
    AttemptFinished {
        job: JobId,
        attempt: AttemptNumber,
        outcome: Outcome,
        exit_code: Option<i32>,
        /// What it used, when the runner measured it.
        #[serde(default)]
        usage: Option<Usage>,
    },
    /// The attempt's node died or restarted: the attempt is gone and the job
    /// is queued again without spending a retry.
    AttemptLost { job: JobId, attempt: AttemptNumber },
    /// A node's agent joined (or re-joined with a new incarnation). With
    /// `predecessor` naming the node's current incarnation, the agent vouches
    /// that whatever that incarnation ran is dead (it lapsed and killed it,
    /// or it restarted and reaped it): its attempts are lost at once.
    /// Otherwise they are lost only once its lease has provably lapsed.
    NodeRegistered {
        name: String,
        capacity: Resources,
        labels: Labels,
        incarnation: u64,
        #[serde(default)]
        predecessor: Option<u64>,
    },
    /// No new work for this node; running attempts finish.
    NodeDrained { name: String },
    /// The node's agent (this incarnation of it) stopped heartbeating for
    /// longer than its grace period. Its attempts stay active until its
    /// lease has provably lapsed; then each is lost (`AttemptLost`).
    /// `incarnation` 0 (logs from before it was recorded): any incarnation.
    NodeDown {
        name: String,
        #[serde(default)]
        incarnation: u64,
    },
    /// A down node's agent came back with the same incarnation (no longer
    /// proposed: an agent that was down joins again as a new incarnation).
    NodeUp {
        name: String,
        #[serde(default)]
        incarnation: u64,
    },
    /// An operator removed the node, or its agent left. `reason` says why
    /// (empty in entries written before it was recorded).
    NodeRemoved {
        name: String,
        #[serde(default)]
        reason: String,
    },
    /// An operator ended a drain: the node takes new work again.
    /// (Added after the first release: new variants go last, so the logs
    /// written before it still decode.)
    NodeUndrained { name: String },
    /// The leader expired the idempotency keys of submissions stamped
    /// before `before` (its clock minus the window): a later submission
    /// with such a key creates a new job.
    IdempotencyKeysExpired { before: TimestampMs },
    /// The control plane's replicas are now exactly `members` (id and the
    /// address its API and peers listen on): one added or removed at a
    /// time by an operator. Raft counts votes and commits among them from
    /// the moment the entry is in a log (see `raft::Payload::voters_change`).
    MembersChanged {
        members: std::collections::BTreeMap<ReplicaId, String>,
    },
}

/// Whether `members` can be a control plane's replicas: at least one, at
/// most [`crate::raft::VOTERS_MAX`], ids that Raft can count (1 to
/// [`crate::raft::NODE_ID_MAX`]) and an address each. An entry that breaks
/// this changes nothing, for the reducer and for Raft alike.
pub fn members_valid(members: &std::collections::BTreeMap<ReplicaId, String>) -> bool {
    !members.is_empty()
        && members.len() <= crate::raft::VOTERS_MAX
        && members.iter().all(|(&id, addr)| {
            crate::raft::Voters::valid_id(id) && !addr.is_empty() && addr.len() <= 256
        })
}

impl Event {
    /// About how many bytes the event takes encoded; Raft batches appends
    /// by it. Counts the variable-length parts, plus a constant.
    pub fn approx_bytes(&self) -> u64 {
        let strings =
            |it: &mut dyn Iterator<Item = &String>| -> u64 { it.map(|s| s.len() as u64 + 2).sum() };
        let variable = match self {
            Event::JobSubmitted {
                spec,
                idempotency_key,
            } => {
                spec.name.len() as u64
                    + strings(&mut spec.command.iter())
                    + strings(&mut spec.env.iter().flat_map(|(k, v)| [k, v]))
                    + strings(&mut spec.constraints.iter().flat_map(|(k, v)| [k, v]))
                    + idempotency_key.as_ref().map_or(0, |k| k.len() as u64)
            }
            Event::NodeRegistered { name, labels, .. } => {
                name.len() as u64 + strings(&mut labels.iter().flat_map(|(k, v)| [k, v]))
            }
            Event::NodeRemoved { name, reason } => (name.len() + reason.len()) as u64,
            Event::AttemptAssigned { node, .. } => node.len() as u64,
            Event::NodeDrained { name }
            | Event::NodeUndrained { name }
            | Event::NodeDown { name, .. }
            | Event::NodeUp { name, .. } => name.len() as u64,
            _ => 0,
        };
        64 + variable
    }

    /// The snake_case name used in the HTTP event stream and in traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::LeaderElected { .. } => "leader_elected",
            Event::JobSubmitted { .. } => "job_submitted",
            Event::JobCancelled { .. } => "job_cancelled",
            Event::AttemptAssigned { .. } => "attempt_assigned",
            Event::AttemptStarted { .. } => "attempt_started",
            Event::AttemptFinished { .. } => "attempt_finished",
            Event::AttemptLost { .. } => "attempt_lost",
            Event::NodeRegistered { .. } => "node_registered",
            Event::NodeDrained { .. } => "node_drained",
            Event::NodeDown { .. } => "node_down",
            Event::NodeUp { .. } => "node_up",
            Event::NodeRemoved { .. } => "node_removed",
            Event::NodeUndrained { .. } => "node_undrained",
            Event::IdempotencyKeysExpired { .. } => "idempotency_keys_expired",
            Event::MembersChanged { .. } => "members_changed",
        }
    }

    /// The attempt this event is about, if any.
    pub fn attempt(&self) -> Option<(JobId, AttemptNumber)> {
        match self {
            Event::AttemptAssigned { job, attempt, .. }
            | Event::AttemptStarted { job, attempt }
            | Event::AttemptFinished { job, attempt, .. }
            | Event::AttemptLost { job, attempt } => Some((*job, *attempt)),
            _ => None,
        }
    }

    /// The node this event names, if any (an attempt's events other than
    /// its placement name none: look the attempt up).
    pub fn node(&self) -> Option<&str> {
        match self {
            Event::AttemptAssigned { node, .. } => Some(node),
            Event::NodeRegistered { name, .. }
            | Event::NodeDrained { name }
            | Event::NodeDown { name, .. }
            | Event::NodeUp { name, .. }
            | Event::NodeRemoved { name, .. }
            | Event::NodeUndrained { name } => Some(name),
            _ => None,
        }
    }

    /// The job this event is about, if any (used by `replay --job`).
    pub fn job(&self) -> Option<JobId> {
        match self {
            Event::JobCancelled { job }
            | Event::AttemptAssigned { job, .. }
            | Event::AttemptStarted { job, .. }
            | Event::AttemptFinished { job, .. }
            | Event::AttemptLost { job, .. } => Some(*job),
            _ => None,
        }
    }
}
