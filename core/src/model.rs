//! The domain model: jobs, their numbered attempts, worker nodes and resources.
//!
//! Everything here is plain data. Serde derives describe the shape; the wire
//! formats themselves (JSON in `net`, MessagePack in `storage`) live at the
//! boundary crates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as stamped by the leader on every entry.
pub type TimestampMs = u64;

/// A job's identity: assigned by the reducer from a counter, so replay yields
/// the same ids.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Attempt numbers start at 1 and grow by one for each placement of a job.
pub type AttemptNumber = u32;

/// CPU in thousandths of a core and memory in MiB.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

impl Resources {
    pub const fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Self {
            cpu_millis,
            memory_mb,
        }
    }

    /// True when `self` fits inside `free` in every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millis <= free.cpu_millis && self.memory_mb <= free.memory_mb
    }

    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
        }
    }

    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
        }
    }
}

pub type Labels = BTreeMap<String, String>;

/// What a user asks to run. Validated by [`crate::validate::validate_spec`]
/// before it is ever proposed to the log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    /// Every entry must equal the node's label of the same key.
    pub constraints: Labels,
    /// 0..=100; higher is placed first.
    pub priority: u8,
    pub timeout_secs: u64,
    /// Failed or timed-out attempts that may be retried. Lost attempts do not count.
    pub max_retries: u32,
    /// Where the command runs and what code it finds there. Added after the
    /// first release: trailing, defaulted, and left out of the encoding while
    /// it is `Fresh`, so logs written before it still decode and agents that
    /// predate it still read every spec that does not use it (rmp-serde
    /// encodes a struct as an array and refuses extra elements).
    #[serde(default, skip_serializing_if = "Workspace::is_fresh")]
    pub workspace: Workspace,
}

/// Where an attempt's command runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workspace {
    /// An empty directory of the attempt's own, created for it and removed
    /// after it (the default).
    #[default]
    Fresh,
    /// An existing directory of the node (`workdir`, an absolute path),
    /// used as it is: never created, never removed. An attempt placed on a
    /// node that lacks it fails to start.
    Dir(String),
    /// A directory of the attempt's own, as `Fresh`, holding a checkout of
    /// a git repository at a ref before the command runs.
    Checkout(Checkout),
}

impl Workspace {
    pub fn is_fresh(&self) -> bool {
        matches!(self, Workspace::Fresh)
    }
}

/// A git repository at a ref, checked out into an attempt's work dir.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkout {
    /// A URL (`https://`, `ssh://`, `git://`, `file://`...), `user@host:path`,
    /// or an absolute path on the node.
    pub repo: String,
    /// A branch, a tag or a commit; `HEAD` is the repository's default branch.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "assigned" => JobState::Assigned,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    Assigned,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Lost,
    Cancelled,
}

impl AttemptState {
    /// An active attempt holds resources on its node and may be executing.
    pub fn is_active(self) -> bool {
        matches!(self, AttemptState::Assigned | AttemptState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Assigned => "assigned",
            AttemptState::Running => "running",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::TimedOut => "timed_out",
            AttemptState::Lost => "lost",
            AttemptState::Cancelled => "cancelled",
        }
    }
}

/// What an attempt used, as measured by the runner that executed it: the
/// attempt's cgroup where it had one, else the resource usage of the
/// command's process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Peak resident memory, MiB.
    pub peak_memory_mb: u64,
    /// Cpu time, user plus system, milliseconds.
    pub cpu_ms: u64,
}

/// How an attempt ended, as reported by the runner that executed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The process exited; 0 is success.
    Exited,
    /// The runner killed it at its deadline.
    TimedOut,
    /// The runner killed it because the job was cancelled.
    Cancelled,
    /// The runner could not start it (bad executable, no such file...).
    StartFailed,
    /// The kernel killed it for using more memory than `memory_mb`.
    Oom,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attempt {
    pub number: AttemptNumber,
    pub node: String,
    /// The node's incarnation when the attempt was placed: only that
    /// incarnation of the node may ever run it (a restarted agent must not).
    pub incarnation: u64,
    pub state: AttemptState,
    pub exit_code: Option<i32>,
    pub assigned_at: TimestampMs,
    pub started_at: Option<TimestampMs>,
    pub finished_at: Option<TimestampMs>,
    /// How the runner said it ended, once it did (`None` before, and for
    /// attempts lost or written before outcomes were recorded).
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Set when the job was cancelled while this attempt was active: the
    /// runner has been told to kill it, and its resources stay allocated until
    /// it reports back (or its node is declared down).
    pub cancel_requested: bool,
    /// What it used, when its runner measured it.
    #[serde(default)]
    pub usage: Option<Usage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    pub idempotency_key: Option<String>,
    pub submitted_at: TimestampMs,
    /// Failed or timed-out attempts so far; compared with `spec.max_retries`.
    pub retries_used: u32,
    pub attempts: Vec<Attempt>,
    /// Log index of the submission: the FIFO order within a priority.
    pub seq: u64,
}

impl Job {
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The attempt that holds resources, if any.
    pub fn active_attempt(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.state.is_active())
    }

    /// The node of the latest attempt (where it runs or last ran).
    pub fn node(&self) -> Option<&str> {
        self.attempts.last().map(|a| a.node.as_str())
    }

    pub fn exit_code(&self) -> Option<i32> {
        if self.state.is_terminal() {
            self.attempts.last().and_then(|a| a.exit_code)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Ready,
    Draining,
    Down,
    Left,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
            NodeState::Left => "left",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub state: NodeState,
    pub capacity: Resources,
    pub labels: Labels,
    /// Sum of the resources of the active attempts placed here.
    pub allocated: Resources,
    /// Changes every time the node's agent process starts; a registration with
    /// a new incarnation means whatever ran under the old one is gone.
    pub incarnation: u64,
    /// Why the node was removed or left; cleared when it joins again.
    pub left_reason: Option<String>,
}

impl Node {
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.allocated)
    }

    pub fn accepts_work(&self) -> bool {
        self.state == NodeState::Ready
    }

    /// True when every constraint equals this node's label of the same key.
    pub fn satisfies(&self, constraints: &Labels) -> bool {
        constraints
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}
