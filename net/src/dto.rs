//! JSON shapes of the HTTP API (see `docs/api.md`). Requests are strict:
//! unknown fields are rejected. Views are built from core's model here, at
//! the boundary, so core carries no HTTP concerns.

use std::collections::BTreeMap;

use rustci_core::event::{Entry, ReplicaId};
use rustci_core::model::{
    Attempt, Checkout, Job, JobSpec, Labels, Node, Outcome, Resources, Workspace,
};
use rustci_core::validate::{
    self, ValidationError, MAX_RETRIES_DEFAULT, PRIORITY_DEFAULT, RESOURCES_DEFAULT,
    TIMEOUT_SECS_DEFAULT,
};
use serde::{Deserialize, Serialize};

/// `POST /v1/jobs` body. Only `command` is required.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u64>,
    /// An existing directory of the node to run in (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// A git repository at a ref, checked out into the attempt's own work
    /// dir before the command runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<CheckoutRequest>,
}

/// `checkout` of a submission (and of a job object): `ref` defaults to
/// `HEAD`, the repository's default branch.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(
    deny_unknown_fields,
    expecting = "a checkout object {\"repo\": REPO, \"ref\": REF}"
)]
pub struct CheckoutRequest {
    pub repo: String,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

impl SubmitRequest {
    /// Fills in defaults and range-checks the numbers that do not fit core's
    /// narrower types; the full validation happens in core.
    pub fn into_spec(self) -> Result<JobSpec, ValidationError> {
        let priority = self.priority.unwrap_or(PRIORITY_DEFAULT.into());
        if priority > u64::from(validate::PRIORITY_MAX) {
            return Err(ValidationError::Priority(priority));
        }
        let max_retries = self.max_retries.unwrap_or(MAX_RETRIES_DEFAULT.into());
        if max_retries > u64::from(validate::MAX_RETRIES_MAX) {
            return Err(ValidationError::Retries(max_retries));
        }
        let r = self.resources.unwrap_or_default();
        let workspace = match (self.workdir, self.checkout) {
            (None, None) => Workspace::Fresh,
            (Some(dir), None) => Workspace::Dir(dir),
            (None, Some(c)) => Workspace::Checkout(Checkout {
                repo: c.repo,
                git_ref: c
                    .git_ref
                    .unwrap_or_else(|| validate::CHECKOUT_REF_DEFAULT.to_string()),
            }),
            (Some(_), Some(_)) => return Err(ValidationError::WorkdirAndCheckout),
        };
        let spec = JobSpec {
            name: self.name.unwrap_or_default(),
            command: self.command,
            env: self.env.unwrap_or_default(),
            resources: Resources::new(
                r.cpu_millis.unwrap_or(RESOURCES_DEFAULT.cpu_millis),
                r.memory_mb.unwrap_or(RESOURCES_DEFAULT.memory_mb),
            ),
            constraints: self.constraints.unwrap_or_default(),
            priority: priority as u8,
            timeout_secs: self.timeout_secs.unwrap_or(TIMEOUT_SECS_DEFAULT),
            max_retries: max_retries as u32,
            workspace,
        };
        validate::validate_spec(&spec)?;
        Ok(spec)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct AttemptView {
    pub number: u32,
    pub node: String,
    pub state: String,
    pub exit_code: Option<i32>,
    pub assigned_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// How the runner said it ended: `exited`, `timed_out`, `cancelled`,
    /// `start_failed` or `oom` (killed for exceeding `memory_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Peak resident memory of the attempt, MiB, once it ended (when its
    /// runner measured it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_mb: Option<u64>,
    /// Cpu time the attempt used, user plus system, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
}

impl From<&Attempt> for AttemptView {
    fn from(a: &Attempt) -> Self {
        AttemptView {
            number: a.number,
            node: a.node.clone(),
            state: a.state.as_str().to_string(),
            exit_code: a.exit_code,
            assigned_at: a.assigned_at,
            started_at: a.started_at,
            finished_at: a.finished_at,
            outcome: a.outcome,
            peak_memory_mb: a.usage.map(|u| u.peak_memory_mb),
            cpu_ms: a.usage.map(|u| u.cpu_ms),
        }
    }
}

/// The job object of the contract, plus the spec fields a user submitted
/// and `reason` (why a queued job is not placed, or why a failed job gave up).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct JobView {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub priority: u8,
    pub resources: Resources,
    pub constraints: Labels,
    pub node: Option<String>,
    pub exit_code: Option<i32>,
    pub submitted_at: u64,
    pub attempts: Vec<AttemptView>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u64,
    pub max_retries: u32,
    pub retries_used: u32,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The directory of the node the job runs in, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// What the job checks out before it runs, when it does (`ref` always
    /// set: the default filled in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<CheckoutRequest>,
}

/// `workdir` and `checkout` of a job object.
fn workspace_view(w: &Workspace) -> (Option<String>, Option<CheckoutRequest>) {
    match w {
        Workspace::Fresh => (None, None),
        Workspace::Dir(dir) => (Some(dir.clone()), None),
        Workspace::Checkout(c) => (
            None,
            Some(CheckoutRequest {
                repo: c.repo.clone(),
                git_ref: Some(c.git_ref.clone()),
            }),
        ),
    }
}

impl JobView {
    pub fn new(job: &Job, reason: Option<String>) -> JobView {
        let (workdir, checkout) = workspace_view(&job.spec.workspace);
        JobView {
            id: job.id.0,
            name: job.spec.name.clone(),
            state: job.state.as_str().to_string(),
            priority: job.spec.priority,
            resources: job.spec.resources,
            constraints: job.spec.constraints.clone(),
            node: job.node().map(str::to_string),
            exit_code: job.exit_code(),
            submitted_at: job.submitted_at,
            attempts: job.attempts.iter().map(AttemptView::from).collect(),
            command: job.spec.command.clone(),
            env: job.spec.env.clone(),
            timeout_secs: job.spec.timeout_secs,
            max_retries: job.spec.max_retries,
            retries_used: job.retries_used,
            idempotency_key: job.idempotency_key.clone(),
            reason,
            workdir,
            checkout,
        }
    }

    /// Like [`JobView::new`] but consumes the job, moving its strings
    /// instead of copying them (the submit path answers with a fresh copy
    /// the replica made for this reply).
    pub fn from_owned(job: Job) -> JobView {
        let node = job.node().map(str::to_string);
        let exit_code = job.exit_code();
        let (workdir, checkout) = workspace_view(&job.spec.workspace);
        JobView {
            id: job.id.0,
            name: job.spec.name,
            state: job.state.as_str().to_string(),
            priority: job.spec.priority,
            resources: job.spec.resources,
            constraints: job.spec.constraints,
            node,
            exit_code,
            submitted_at: job.submitted_at,
            attempts: job.attempts.iter().map(AttemptView::from).collect(),
            command: job.spec.command,
            env: job.spec.env,
            timeout_secs: job.spec.timeout_secs,
            max_retries: job.spec.max_retries,
            retries_used: job.retries_used,
            idempotency_key: job.idempotency_key,
            reason: None,
            workdir,
            checkout,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// A page of `GET /v1/jobs`, oldest first. `next_cursor` (passed back as
/// `cursor=`) continues after this page; `null` when there is nothing more.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub state: String,
    /// Whole cores (fractional when the capacity is not a multiple of 1000 millis).
    pub cpus: f64,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub labels: Labels,
    pub allocated: Resources,
    pub running: usize,
    pub last_heartbeat_secs_ago: Option<f64>,
    /// Why the node was removed or left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl NodeView {
    pub fn new(node: &Node, running: usize, last_heartbeat_secs_ago: Option<f64>) -> NodeView {
        NodeView {
            name: node.name.clone(),
            state: node.state.as_str().to_string(),
            cpus: node.capacity.cpu_millis as f64 / 1000.0,
            cpu_millis: node.capacity.cpu_millis,
            memory_mb: node.capacity.memory_mb,
            labels: node.labels.clone(),
            allocated: node.allocated,
            running,
            last_heartbeat_secs_ago,
            reason: node.left_reason.clone(),
        }
    }
}

/// `GET /v1/nodes/{name}`: a node, its agent's incarnation and the attempts
/// it holds.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NodeStatusView {
    #[serde(flatten)]
    pub node: NodeView,
    pub incarnation: u64,
    pub attempts: Vec<NodeAttemptView>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NodeAttemptView {
    pub job: u64,
    pub attempt: u32,
    pub state: String,
    pub incarnation: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ReplicaView {
    pub id: ReplicaId,
    pub addr: String,
    pub role: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ClusterView {
    pub id: ReplicaId,
    pub state: String,
    pub leader: Option<ReplicaId>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub replicas: Vec<ReplicaView>,
    pub uptime_secs: u64,
    pub nodes: usize,
    pub jobs: BTreeMap<String, u64>,
    /// Digest of the reduced state: equal on every replica at the same
    /// applied index, and equal to `rustci replay`'s for the same log.
    pub state_digest: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct EventList {
    pub events: Vec<serde_json::Value>,
    pub next: u64,
}

/// `{"index", "term", "at", "type", ...fields}`: an entry for the event stream.
pub fn event_json(entry: &Entry) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("index".into(), entry.index.into());
    obj.insert("term".into(), entry.term.into());
    obj.insert("at".into(), entry.at.into());
    obj.insert("type".into(), entry.event.kind().into());
    // Externally tagged: {"Variant": {fields}}; lift the fields up.
    if let Ok(serde_json::Value::Object(outer)) = serde_json::to_value(&entry.event) {
        for (_, inner) in outer {
            if let serde_json::Value::Object(fields) = inner {
                obj.extend(fields);
            }
        }
    }
    serde_json::Value::Object(obj)
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
