//! The agent protocol: what agents and the control plane tell each other, as
//! plain data, and the lease arithmetic both sides rely on.
//!
//! The wire format (rmp-serde frames with [`PROTOCOL_VERSION`]) belongs to
//! `net`; here are only the messages and the rules.
//!
//! # Leases and exclusive execution
//!
//! An agent heartbeats every [`LeaseConfig::heartbeat_interval_ms`]. The
//! leader answers a heartbeat of the node's current incarnation with
//! [`ServerMsg::Lease`]; the agent's lease then runs until the time it *sent*
//! that heartbeat plus [`LeaseConfig::lease_ms`], on its own clock. When its
//! lease lapses the agent kills every attempt it runs, never reports them,
//! and joins again under a new incarnation.
//!
//! The leader declares a node down after [`LeaseConfig::down_after_ms`]
//! without a heartbeat, and stops renewing the lease of a node that is down
//! or removed. It hands the node's attempts to other nodes only once
//! [`LeaseConfig::requeue_after_ms`] have passed on its own clock since the
//! last lease it granted: the lease, stretched by the clock drift bound on
//! the agent's side, plus the time to kill a process group, stretched again
//! by the drift bound on the leader's side. By then every attempt the node
//! ran is dead, so no two attempts of a job ever run at the same time.

use serde::{Deserialize, Serialize};

use crate::event::LogIndex;
use crate::model::{AttemptNumber, JobId, JobSpec, Labels, Outcome, Resources, Usage};

/// Version of the agent protocol; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Heartbeat period of an agent (its clock).
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// How long an acknowledged heartbeat keeps an agent's lease (its clock,
/// from when it sent the heartbeat).
pub const LEASE_MS: u64 = 3_000;
/// Silence after which the leader declares a node down (its clock).
pub const DOWN_AFTER_MS: u64 = 3_000;
/// Silence from its replica after which an agent gives the connection up
/// and dials every replica again (its clock): two unanswered heartbeats at
/// the default interval, and at least a second before the lease lapses
/// whatever the interval. A paused leader keeps its connections open, so
/// this is how agents find the new one; the new leader's grace period for
/// each node counts on it.
pub const SERVER_SILENT_MS: u64 = 2 * HEARTBEAT_INTERVAL_MS;
/// Bound on how fast or slow any clock runs, in parts per million.
pub const DRIFT_PPM_MAX: u64 = 200;
/// Longest time from a lease lapsing to the agent's processes being dead:
/// its tick, the kill of the process groups and their reaping.
pub const KILL_GRACE_MS: u64 = 500;

// A lease survives one lost heartbeat (and a late second).
const _: () = assert!(2 * HEARTBEAT_INTERVAL_MS < LEASE_MS);
// A node is not declared down while one heartbeat may merely be late.
const _: () = assert!(2 * HEARTBEAT_INTERVAL_MS < DOWN_AFTER_MS);
const _: () = assert!(DRIFT_PPM_MAX < 1_000_000 && KILL_GRACE_MS > 0);
// An agent whose leader went silent looks for the new one a second before
// its lease lapses.
const _: () = assert!(SERVER_SILENT_MS + 1_000 <= LEASE_MS);

/// The failure-detection and lease timings of a cluster. Agents and the
/// control plane must agree on them; [`LeaseConfig::check`] says whether a
/// set is consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
    pub down_after_ms: u64,
    pub drift_ppm_max: u64,
    pub kill_grace_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            lease_ms: LEASE_MS,
            down_after_ms: DOWN_AFTER_MS,
            drift_ppm_max: DRIFT_PPM_MAX,
            kill_grace_ms: KILL_GRACE_MS,
        }
    }
}

impl LeaseConfig {
    /// Time on the leader's clock, from the last lease it granted a node,
    /// after which none of that node's attempts can still be running.
    pub fn requeue_after_ms(&self) -> u64 {
        let stretch = |ms: u64| -> u64 {
            let num = u128::from(ms) * u128::from(1_000_000 + self.drift_ppm_max);
            num.div_ceil(1_000_000) as u64
        };
        stretch(stretch(self.lease_ms) + self.kill_grace_ms)
    }

    /// The relations the timings must keep: a lease outlives a lost
    /// heartbeat, and a node is not declared down for one late heartbeat.
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 || self.kill_grace_ms == 0 {
            return Err("heartbeat interval and kill grace must be positive".into());
        }
        if 2 * self.heartbeat_interval_ms >= self.lease_ms {
            return Err(format!(
                "lease ({} ms) must exceed two heartbeat intervals ({} ms)",
                self.lease_ms, self.heartbeat_interval_ms
            ));
        }
        if 2 * self.heartbeat_interval_ms >= self.down_after_ms {
            return Err(format!(
                "down-after ({} ms) must exceed two heartbeat intervals ({} ms)",
                self.down_after_ms, self.heartbeat_interval_ms
            ));
        }
        if self.drift_ppm_max >= 1_000_000 {
            return Err("the drift bound must be below 1,000,000 ppm".into());
        }
        Ok(())
    }
}

/// What an agent advertises about itself in every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAd {
    pub name: String,
    /// New at every start of the agent and after every lapsed lease.
    pub incarnation: u64,
    pub capacity: Resources,
    pub labels: Labels,
    /// The incarnation this one replaces, once whatever it ran is dead (see
    /// `Event::NodeRegistered`).
    #[serde(default)]
    pub predecessor: Option<u64>,
}

/// An attempt the control plane has active on a node, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub attempt: AttemptNumber,
    /// The node and node incarnation it was placed on: no other may run it.
    pub node: String,
    pub incarnation: u64,
    /// The control plane recorded that it started.
    pub started: bool,
    /// The job was cancelled: kill it (or never start it).
    pub cancel_requested: bool,
    pub spec: JobSpec,
}

/// What an agent observed about one of its attempts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReportKind {
    Started,
    Finished {
        outcome: Outcome,
        exit_code: Option<i32>,
    },
}

/// A report about an attempt from the agent incarnation that ran it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub incarnation: u64,
    pub job: JobId,
    pub attempt: AttemptNumber,
    pub kind: ReportKind,
    /// With a final report: what the attempt used, when measured.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Agent to control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// Sent every heartbeat interval; also how an agent joins.
    Heartbeat { node: NodeAd, seq: u64 },
    /// Sent until acknowledged.
    Report(Report),
    /// The agent is stopping: with `done` false it asks for no new work
    /// (its node is drained); with `done` true it has stopped everything and
    /// leaves (its node is removed, with `reason`).
    Leaving {
        node: String,
        incarnation: u64,
        reason: String,
        done: bool,
    },
}

/// Control plane to agent. Every message is for one node incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Heartbeat `seq` renewed the lease. `active` is the node's committed
    /// view as of log index `index`: the agent reconciles with it.
    Lease {
        seq: u64,
        index: LogIndex,
        active: Vec<Assignment>,
    },
    /// This incarnation is not registered yet; its registration is on the way.
    Joining { seq: u64 },
    /// This incarnation was declared down, removed or replaced: whatever it
    /// runs is stale. The agent kills it all and joins again under an
    /// incarnation above both its own and `current` (the node's registered
    /// one), so it never has to climb to it one step at a time.
    Fenced { reason: String, current: u64 },
    /// Run this attempt (placed as of log index `index`).
    Start {
        index: LogIndex,
        assignment: Assignment,
    },
    /// Kill this attempt (its job was cancelled).
    Kill {
        job: JobId,
        attempt: AttemptNumber,
        node: String,
        incarnation: u64,
    },
    /// The report about this attempt is recorded (or no longer matters) as
    /// of log index `index`: stop sending it.
    ReportAck {
        job: JobId,
        attempt: AttemptNumber,
        index: LogIndex,
    },
}

impl ServerMsg {
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMsg::Lease { .. } => "lease",
            ServerMsg::Joining { .. } => "joining",
            ServerMsg::Fenced { .. } => "fenced",
            ServerMsg::Start { .. } => "start",
            ServerMsg::Kill { .. } => "kill",
            ServerMsg::ReportAck { .. } => "report_ack",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeue_waits_out_the_lease_stretched_twice_by_drift_plus_the_kill() {
        let c = LeaseConfig::default();
        // (3000 * 1.0002 = 3000.6 -> 3001, + 500) * 1.0002 = 3501.7 -> 3502
        assert_eq!(c.requeue_after_ms(), 3_502);
        let no_drift = LeaseConfig {
            drift_ppm_max: 0,
            ..c
        };
        assert_eq!(no_drift.requeue_after_ms(), 3_500);
        assert!(c.check().is_ok());
        let short = LeaseConfig {
            lease_ms: 2_000,
            ..c
        };
        assert!(short.check().unwrap_err().contains("lease"));
    }
}
