//! The agent: the sans-IO state machine a worker node runs.
//!
//! It joins the cluster, holds a lease by heartbeating, runs the attempts
//! the control plane assigns to its node incarnation, enforces their time-outs,
//! kills them on cancel or when its lease lapses, reports how they ended
//! until the report is acknowledged, and reconciles with the committed view
//! of its node that every lease renewal carries. It performs no IO and reads
//! no clock: `rustci agent`, the in-process runner of `rustci dev` and the
//! simulator all drive this one state machine.
//!
//! # Driver contract
//!
//! Inputs, each taking `now` (milliseconds on the agent's monotonic clock):
//! [`Agent::handle_tick`] (call every [`AGENT_TICK_MS`] or so),
//! [`Agent::handle_message`], [`Agent::handle_spawned`], [`Agent::handle_exit`].
//!
//! Outputs come from [`Agent::poll_output`], in order. A driver MUST:
//! 1. send every [`AgentOutput::Send`] to the control plane (it may be lost:
//!    the agent repeats what matters);
//! 2. start the process of every [`AgentOutput::Spawn`] and answer with
//!    [`Agent::handle_spawned`], then with [`Agent::handle_exit`] when it ends;
//! 3. on [`AgentOutput::Kill`], kill the attempt's whole process group (or
//!    cgroup) at once; its exit is reported through `handle_exit` as usual;
//! 4. on [`AgentOutput::LeaseUntil`], arm every running attempt's supervisor
//!    to kill it at that time unless renewed: a paused agent cannot kill.
//!
//! # Incarnations
//!
//! Every start of an agent process picks a new incarnation (the driver's
//! choice, growing across restarts), and so does every lapse of the lease:
//! whatever the old incarnation ran is killed and never reported, and the
//! control plane treats the new registration as a restart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::event::LogIndex;
use crate::model::{AttemptNumber, JobId, JobSpec, Labels, Outcome, Resources, Usage};
use crate::protocol::{AgentMsg, Assignment, LeaseConfig, NodeAd, Report, ReportKind, ServerMsg};

/// How often a driver should call [`Agent::handle_tick`].
pub const AGENT_TICK_MS: u64 = 100;
/// Heartbeats whose send time is remembered, to match their lease grants.
pub const HEARTBEATS_REMEMBERED_MAX: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: String,
    pub capacity: Resources,
    pub labels: Labels,
    pub lease: LeaseConfig,
}

/// What the driver must do; see the driver contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentOutput {
    Send(AgentMsg),
    Spawn {
        job: JobId,
        attempt: AttemptNumber,
        /// The agent incarnation it runs for.
        incarnation: u64,
        spec: JobSpec,
    },
    Kill {
        job: JobId,
        attempt: AttemptNumber,
    },
    /// The lease of `incarnation` now runs until this time (agent clock).
    LeaseUntil {
        until_ms: u64,
        incarnation: u64,
    },
    /// The control plane's view handed this agent an attempt placed on
    /// another node or incarnation. It was not started; log it loudly.
    Refused {
        job: JobId,
        attempt: AttemptNumber,
        node: String,
        incarnation: u64,
    },
}

#[derive(Clone, Debug)]
struct Leaving {
    reason: String,
    /// Told the control plane that it left: nothing more to do.
    gone: bool,
}

/// Why the agent killed an attempt: decides what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillReason {
    Cancel,
    Timeout,
    /// The lease lapsed or the control plane no longer has it: never
    /// reported.
    Stale,
}

#[derive(Clone, Debug)]
struct Run {
    /// The incarnation it was assigned to: its reports carry it.
    incarnation: u64,
    /// Log index of the placement (from `Start`, or of the view that
    /// carried it).
    assigned_index: LogIndex,
    timeout_ms: u64,
    /// When the process spawned; `None` while spawning.
    started_at: Option<u64>,
    kill: Option<KillReason>,
    /// The final report, once the process ended.
    done: Option<Report>,
    /// Log index as of which the control plane acknowledged `done`.
    acked_at: Option<LogIndex>,
    /// What the process used, once it ended and the executor measured it.
    usage: Option<Usage>,
}

pub struct Agent {
    config: AgentConfig,
    incarnation: u64,
    /// The incarnation this one replaced (a lapse here, or the previous
    /// process, whose work the driver reaped before starting this one).
    predecessor: Option<u64>,
    next_seq: u64,
    /// (seq, sent at) of recent heartbeats of this incarnation.
    sent: VecDeque<(u64, u64)>,
    /// When the first heartbeat of this incarnation went out: until a lease
    /// is granted, work given to this incarnation is held no longer than a
    /// lease from then.
    first_sent_at: Option<u64>,
    lease_until: Option<u64>,
    next_heartbeat_at: u64,
    /// Log index of the newest view reconciled: older views are ignored.
    view_index: LogIndex,
    runs: BTreeMap<(JobId, AttemptNumber), Run>,
    /// Set once the agent is stopping: why, and whether it still lets its
    /// attempts finish (drain) or has killed them.
    leaving: Option<Leaving>,
    /// Kills that arrived before their start.
    killed_early: BTreeSet<(JobId, AttemptNumber)>,
    outputs: VecDeque<AgentOutput>,
}

impl Agent {
    /// An agent that joins at its first tick. `incarnation` must be larger
    /// than any this node had before. `predecessor` is the incarnation of
    /// the previous agent process of this node, if the driver knows it and
    /// has made sure that whatever it ran is dead.
    pub fn new(config: AgentConfig, incarnation: u64, predecessor: Option<u64>) -> Agent {
        assert!(config.lease.check().is_ok(), "inconsistent lease timings");
        Agent {
            config,
            incarnation,
            predecessor,
            next_seq: 1,
            sent: VecDeque::new(),
            first_sent_at: None,
            lease_until: None,
            next_heartbeat_at: 0,
            view_index: 0,
            runs: BTreeMap::new(),
            leaving: None,
            killed_early: BTreeSet::new(),
            outputs: VecDeque::new(),
        }
    }

    // --- getters ---

    pub fn name(&self) -> &str {
        &self.config.name
    }
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    pub fn lease_until(&self) -> Option<u64> {
        self.lease_until
    }
    /// Attempts whose process is spawning or running.
    pub fn running(&self) -> usize {
        self.runs.values().filter(|r| r.done.is_none()).count()
    }
    /// The resources of the attempts this incarnation runs.
    pub fn advertised(&self) -> NodeAd {
        // Vouch for the predecessor only once nothing of it runs any more.
        let stale = self
            .runs
            .values()
            .any(|r| r.done.is_none() && r.kill == Some(KillReason::Stale));
        NodeAd {
            name: self.config.name.clone(),
            incarnation: self.incarnation,
            capacity: self.config.capacity,
            labels: self.config.labels.clone(),
            predecessor: self.predecessor.filter(|_| !stale),
        }
    }

    // --- inputs ---

    /// Lapses the lease if it ran out. Every input checks it first: an
    /// agent that was paused must not act on what it finds waiting (a
    /// `Start` sent long ago) before it notices that its lease is gone.
    fn check_lease(&mut self, now: u64) {
        let holding = self
            .runs
            .values()
            .any(|r| r.done.is_none() && r.kill != Some(KillReason::Stale));
        if holding && !self.leased(now) {
            self.lapse(now);
        }
    }

    /// This incarnation may hold work at `now`: its lease runs, or none was
    /// granted yet and a lease from its first heartbeat would still run
    /// (the control plane counts a registration's lease from later).
    fn leased(&self, now: u64) -> bool {
        let deadline = self
            .lease_until
            .or_else(|| self.first_sent_at.map(|t| t + self.config.lease.lease_ms));
        deadline.is_some_and(|d| now < d)
    }

    /// The agent is stopping (SIGTERM). With `drain`, it takes no new work
    /// and lets its attempts finish; without (a second signal, or the drain
    /// time ran out), it kills them: they are reported `cancelled`, which
    /// the control plane takes as lost and runs elsewhere at once. Once
    /// nothing runs and every result is acknowledged, it tells the control
    /// plane that it left, with `reason`.
    pub fn leave(&mut self, now: u64, reason: &str, drain: bool) {
        if self.leaving.is_none() {
            self.leaving = Some(Leaving {
                reason: reason.to_string(),
                gone: false,
            });
            self.send_leaving(false);
        }
        if !drain {
            let running: Vec<(JobId, AttemptNumber)> = self
                .runs
                .iter()
                .filter(|(_, r)| r.done.is_none() && r.kill.is_none())
                .map(|(k, _)| *k)
                .collect();
            for (job, attempt) in running {
                self.kill(job, attempt, KillReason::Cancel);
            }
        }
        self.maybe_gone(now);
    }

    /// True once the agent told the control plane that it left.
    pub fn is_gone(&self) -> bool {
        self.leaving.as_ref().is_some_and(|l| l.gone)
    }

    fn send_leaving(&mut self, done: bool) {
        let Some(leaving) = &self.leaving else {
            return;
        };
        let msg = AgentMsg::Leaving {
            node: self.config.name.clone(),
            incarnation: self.incarnation,
            reason: leaving.reason.clone(),
            done,
        };
        self.outputs.push_back(AgentOutput::Send(msg));
    }

    /// Leaves once nothing runs and every result was acknowledged.
    fn maybe_gone(&mut self, _now: u64) {
        let settled = self.runs.values().all(|r| {
            r.done.is_some() && r.acked_at.is_some()
                || r.kill == Some(KillReason::Stale) && r.done.is_none()
        });
        let holding = self
            .runs
            .values()
            .any(|r| r.done.is_none() && r.started_at.is_some());
        if settled && !holding && self.leaving.as_ref().is_some_and(|l| !l.gone) {
            self.send_leaving(true);
            if let Some(l) = self.leaving.as_mut() {
                l.gone = true;
            }
        }
    }

    /// The driver (re)connected to a control-plane replica, the new leader
    /// after a failover for instance: heartbeat at once rather than at the
    /// next interval. Heartbeats sent while no replica listened are lost,
    /// and waiting for the next one can let the lease run out meanwhile.
    pub fn handle_connected(&mut self, now: u64) {
        self.next_heartbeat_at = self.next_heartbeat_at.min(now);
        self.handle_tick(now);
    }

    /// Periodic work: the lease, time-outs, heartbeats and report resends.
    pub fn handle_tick(&mut self, now: u64) {
        self.check_lease(now);
        if self.leaving.is_some() {
            if self.is_gone() {
                return;
            }
            self.maybe_gone(now);
        }
        let expired: Vec<(JobId, AttemptNumber)> = self
            .runs
            .iter()
            .filter(|(_, r)| {
                r.kill.is_none()
                    && r.done.is_none()
                    && r.started_at
                        .is_some_and(|t| now >= t.saturating_add(r.timeout_ms))
            })
            .map(|(k, _)| *k)
            .collect();
        for (job, attempt) in expired {
            self.kill(job, attempt, KillReason::Timeout);
        }
        if now >= self.next_heartbeat_at {
            self.heartbeat(now);
            self.resend_reports();
            if self.leaving.as_ref().is_some_and(|l| !l.gone) {
                self.send_leaving(false);
            }
        }
    }

    /// A message from the control plane.
    pub fn handle_message(&mut self, now: u64, msg: ServerMsg) {
        self.check_lease(now);
        match msg {
            ServerMsg::Lease { seq, index, active } => {
                if let Some(&(_, sent_at)) = self.sent.iter().find(|(s, _)| *s == seq) {
                    let until = sent_at + self.config.lease.lease_ms;
                    if self.lease_until.is_none_or(|u| until > u) {
                        self.lease_until = Some(until);
                        self.outputs.push_back(AgentOutput::LeaseUntil {
                            until_ms: until,
                            incarnation: self.incarnation,
                        });
                    }
                    if !self.leased(now) {
                        // A grant that arrives after it ran out (a delayed
                        // reply, a paused agent): the leader may already have
                        // given this node's work away. Nothing from its view
                        // may start.
                        self.lapse(now);
                        return;
                    }
                    self.reconcile(now, index, active);
                }
            }
            ServerMsg::Joining { .. } => {}
            ServerMsg::Fenced { current, .. } => {
                self.incarnation = self.incarnation.max(current);
                self.lapse(now);
            }
            ServerMsg::Start { index, assignment } => {
                // A view at least as new as the placement already said what
                // to do with it (it may be settled and forgotten since): a
                // late `Start` must not run it again.
                if index <= self.view_index {
                    return;
                }
                if assignment.incarnation == self.incarnation && assignment.node == self.config.name
                {
                    if self.leased(now) {
                        self.start(now, index, &assignment);
                    } else {
                        // Too late: the control plane may already have
                        // given up on this incarnation.
                        self.lapse(now);
                    }
                }
            }
            ServerMsg::Kill {
                job,
                attempt,
                node,
                incarnation,
            } => {
                if incarnation != self.incarnation || node != self.config.name {
                    return;
                }
                match self.runs.get(&(job, attempt)) {
                    Some(run) if run.done.is_none() => self.kill(job, attempt, KillReason::Cancel),
                    Some(_) => {}
                    None => {
                        self.killed_early.insert((job, attempt));
                    }
                }
            }
            ServerMsg::ReportAck {
                job,
                attempt,
                index,
            } => {
                if let Some(run) = self.runs.get_mut(&(job, attempt)) {
                    if run.done.is_some() {
                        run.acked_at = Some(index);
                    }
                }
                if self.leaving.is_some() {
                    self.maybe_gone(now);
                }
            }
        }
    }

    /// The executor could not start the attempt for reasons of its own,
    /// not the job's (no file descriptors, memory or disk left on the
    /// node): the attempt is given back, reported `cancelled` without a
    /// cancel, which the control plane takes as lost (it runs again without
    /// spending a retry; a job lost too often fails, saying so).
    pub fn handle_not_started(&mut self, now: u64, job: JobId, attempt: AttemptNumber) {
        self.check_lease(now);
        let Some(run) = self.runs.get(&(job, attempt)) else {
            return;
        };
        if run.done.is_some() {
            return;
        }
        if run.kill == Some(KillReason::Stale) {
            self.runs.remove(&(job, attempt));
            return;
        }
        self.finish(job, attempt, Outcome::Cancelled, None);
    }

    /// The process of an attempt spawned (`Ok`) or could not be started.
    pub fn handle_spawned(
        &mut self,
        now: u64,
        job: JobId,
        attempt: AttemptNumber,
        result: Result<(), String>,
    ) {
        self.check_lease(now);
        let Some(run) = self.runs.get_mut(&(job, attempt)) else {
            return;
        };
        if run.done.is_some() {
            return;
        }
        if run.started_at.is_some() {
            // A supervisor that spawned but could not start the command
            // (the shim) says so after the spawn.
            if result.is_err() && run.kill != Some(KillReason::Stale) {
                self.finish(job, attempt, Outcome::StartFailed, None);
            }
            return;
        }
        if run.kill == Some(KillReason::Stale) {
            // Its incarnation is gone: stop the process, report nothing.
            match result {
                Ok(()) => {
                    run.started_at = Some(now);
                    self.outputs.push_back(AgentOutput::Kill { job, attempt });
                }
                Err(_) => {
                    self.runs.remove(&(job, attempt));
                }
            }
            return;
        }
        match result {
            Ok(()) => {
                run.started_at = Some(now);
                match run.kill {
                    // Killed while it was spawning: kill the process now.
                    Some(_) => self.outputs.push_back(AgentOutput::Kill { job, attempt }),
                    None => self.report(job, attempt, ReportKind::Started),
                }
            }
            Err(_) => self.finish(job, attempt, Outcome::StartFailed, None),
        }
    }

    /// The kernel killed the attempt's process for its memory limit.
    /// `usage` is what it used, if the executor measured it.
    pub fn handle_out_of_memory(
        &mut self,
        now: u64,
        job: JobId,
        attempt: AttemptNumber,
        usage: Option<Usage>,
    ) {
        self.check_lease(now);
        let Some(run) = self.runs.get_mut(&(job, attempt)) else {
            return;
        };
        if run.done.is_none() {
            run.usage = usage;
        }
        match (&run.done, run.kill) {
            (Some(_), _) => {}
            (None, Some(KillReason::Stale)) => {
                self.runs.remove(&(job, attempt));
            }
            (None, _) => self.finish(job, attempt, Outcome::Oom, None),
        }
    }

    /// The attempt's process ended (`exit_code` as the executor saw it;
    /// `usage` what it used, if the executor measured it).
    pub fn handle_exit(
        &mut self,
        now: u64,
        job: JobId,
        attempt: AttemptNumber,
        exit_code: Option<i32>,
        usage: Option<Usage>,
    ) {
        self.check_lease(now);
        let Some(run) = self.runs.get_mut(&(job, attempt)) else {
            return;
        };
        if run.done.is_some() {
            return;
        }
        run.usage = usage;
        match run.kill {
            Some(KillReason::Stale) => {
                self.runs.remove(&(job, attempt));
            }
            Some(KillReason::Timeout) => self.finish(job, attempt, Outcome::TimedOut, None),
            Some(KillReason::Cancel) => self.finish(job, attempt, Outcome::Cancelled, None),
            None => self.finish(job, attempt, Outcome::Exited, exit_code),
        }
    }

    // --- outputs ---

    pub fn poll_output(&mut self) -> Option<AgentOutput> {
        self.outputs.pop_front()
    }

    // --- internals ---

    fn heartbeat(&mut self, now: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.sent.len() == HEARTBEATS_REMEMBERED_MAX {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now));
        self.first_sent_at.get_or_insert(now);
        self.next_heartbeat_at = now + self.config.lease.heartbeat_interval_ms;
        let node = self.advertised();
        self.outputs
            .push_back(AgentOutput::Send(AgentMsg::Heartbeat { node, seq }));
    }

    fn start(&mut self, now: u64, index: LogIndex, a: &Assignment) {
        let key = (a.job, a.attempt);
        if self.runs.contains_key(&key) {
            return;
        }
        if !self.leased(now) {
            return;
        }
        let run = Run {
            incarnation: self.incarnation,
            assigned_index: index,
            timeout_ms: a.spec.timeout_secs.saturating_mul(1000),
            started_at: None,
            kill: None,
            done: None,
            acked_at: None,
            usage: None,
        };
        self.runs.insert(key, run);
        // Stopping: never started, so reported `cancelled`, which the leader
        // takes as lost and places elsewhere at once.
        if self.killed_early.remove(&key) || a.cancel_requested || self.leaving.is_some() {
            self.finish(a.job, a.attempt, Outcome::Cancelled, None);
            return;
        }
        if self.lease_until.is_none() {
            // No lease granted yet: the supervisors must still stop this
            // work when the provisional lease (from the first heartbeat)
            // runs out, even if the agent cannot.
            if let Some(first) = self.first_sent_at {
                let until_ms = first + self.config.lease.lease_ms;
                self.outputs.push_back(AgentOutput::LeaseUntil {
                    until_ms,
                    incarnation: self.incarnation,
                });
            }
        }
        self.outputs.push_back(AgentOutput::Spawn {
            job: a.job,
            attempt: a.attempt,
            incarnation: self.incarnation,
            spec: a.spec.clone(),
        });
    }

    fn kill(&mut self, job: JobId, attempt: AttemptNumber, reason: KillReason) {
        let Some(run) = self.runs.get_mut(&(job, attempt)) else {
            return;
        };
        if run.done.is_some() || run.kill.is_some() {
            return;
        }
        run.kill = Some(reason);
        // Still spawning: the kill goes out once the spawn is reported.
        if run.started_at.is_some() {
            self.outputs.push_back(AgentOutput::Kill { job, attempt });
        }
    }

    fn finish(
        &mut self,
        job: JobId,
        attempt: AttemptNumber,
        outcome: Outcome,
        exit_code: Option<i32>,
    ) {
        let kind = ReportKind::Finished { outcome, exit_code };
        let report = self.report_of(job, attempt, kind.clone());
        if let Some(run) = self.runs.get_mut(&(job, attempt)) {
            run.done = Some(report);
        }
        self.report(job, attempt, kind);
    }

    /// A report about one of this agent's runs, in the name of the
    /// incarnation it was assigned to.
    fn report_of(&self, job: JobId, attempt: AttemptNumber, kind: ReportKind) -> Report {
        let run = self.runs.get(&(job, attempt));
        let incarnation = run.map_or(self.incarnation, |r| r.incarnation);
        let usage = match kind {
            ReportKind::Finished { .. } => run.and_then(|r| r.usage),
            ReportKind::Started => None,
        };
        Report {
            node: self.config.name.clone(),
            incarnation,
            job,
            attempt,
            kind,
            usage,
        }
    }

    fn report(&mut self, job: JobId, attempt: AttemptNumber, kind: ReportKind) {
        let report = self.report_of(job, attempt, kind);
        self.outputs
            .push_back(AgentOutput::Send(AgentMsg::Report(report)));
    }

    fn resend_reports(&mut self) {
        let pending: Vec<Report> = self
            .runs
            .values()
            .filter(|r| r.acked_at.is_none())
            .filter_map(|r| r.done.clone())
            .collect();
        for report in pending {
            self.outputs
                .push_back(AgentOutput::Send(AgentMsg::Report(report)));
        }
    }

    /// The lease lapsed (or the control plane fenced this incarnation):
    /// kill everything, report nothing of it, join again as a new
    /// incarnation.
    fn lapse(&mut self, now: u64) {
        let keys: Vec<(JobId, AttemptNumber)> = self.runs.keys().copied().collect();
        for (job, attempt) in keys {
            let run = self.runs.get_mut(&(job, attempt)).expect("listed");
            if run.done.is_some() {
                self.runs.remove(&(job, attempt));
                continue;
            }
            let spawned = run.started_at.is_some();
            let already = run.kill.is_some();
            run.kill = Some(KillReason::Stale);
            if spawned && !already {
                self.outputs.push_back(AgentOutput::Kill { job, attempt });
            }
        }
        self.killed_early.clear();
        self.predecessor = Some(self.incarnation);
        self.incarnation += 1;
        self.sent.clear();
        self.first_sent_at = None;
        self.lease_until = None;
        self.next_heartbeat_at = now;
        // Join again at once, unless the old work is still being killed:
        // then at the next tick, so that the new incarnation can vouch that
        // its predecessor's work is dead.
        let stale = self.runs.values().any(|r| r.done.is_none());
        if !stale {
            self.heartbeat(now);
        }
    }

    /// Brings what runs here in line with the control plane's committed view
    /// of this node as of `index`.
    fn reconcile(&mut self, now: u64, index: LogIndex, active: Vec<Assignment>) {
        if index < self.view_index {
            return;
        }
        self.view_index = index;
        let mut listed = BTreeSet::new();
        for a in active {
            let key = (a.job, a.attempt);
            if a.node != self.config.name || a.incarnation != self.incarnation {
                self.outputs.push_back(AgentOutput::Refused {
                    job: a.job,
                    attempt: a.attempt,
                    node: a.node.clone(),
                    incarnation: a.incarnation,
                });
                continue;
            }
            listed.insert(key);
            let Some(run) = self.runs.get(&key) else {
                // Its Start was lost (or its Kill arrived first).
                self.start(now, index, &a);
                continue;
            };
            match (&run.done, run.kill) {
                (None, None) if a.cancel_requested => {
                    self.kill(a.job, a.attempt, KillReason::Cancel)
                }
                (None, _) if !a.started && run.started_at.is_some() => {
                    self.report(a.job, a.attempt, ReportKind::Started)
                }
                (None, _) => {}
                (Some(report), _) => {
                    let report = report.clone();
                    self.outputs
                        .push_back(AgentOutput::Send(AgentMsg::Report(report)));
                }
            }
        }
        // What the view does not list, though it is at least as new as the
        // placement, is settled (or was taken away): stop it, forget it.
        let gone: Vec<(JobId, AttemptNumber)> = self
            .runs
            .iter()
            .filter(|(k, r)| !listed.contains(*k) && r.assigned_index <= index)
            .map(|(k, _)| *k)
            .collect();
        for (job, attempt) in gone {
            let done = self.runs[&(job, attempt)].done.is_some();
            if done {
                self.runs.remove(&(job, attempt));
            } else {
                self.kill(job, attempt, KillReason::Stale);
            }
        }
        self.killed_early.retain(|k| listed.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            name: "n1".into(),
            capacity: Resources::new(4000, 4096),
            labels: Labels::new(),
            lease: LeaseConfig::default(),
        }
    }

    fn spec(timeout_secs: u64) -> JobSpec {
        JobSpec {
            name: "j".into(),
            command: vec!["true".into()],
            env: Default::default(),
            resources: Resources::new(100, 64),
            constraints: Labels::new(),
            priority: 50,
            timeout_secs,
            max_retries: 0,
            workspace: Default::default(),
        }
    }

    fn assignment(job: u64, incarnation: u64) -> Assignment {
        Assignment {
            job: JobId(job),
            attempt: 1,
            node: "n1".into(),
            incarnation,
            started: false,
            cancel_requested: false,
            spec: spec(10),
        }
    }

    /// The work was answered with a Cancelled report and never started.
    fn assert_reported_cancelled_without_spawning(out: &[AgentOutput]) {
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Spawn { .. })));
        assert!(out
            .iter()
            .any(|o| matches!(o, AgentOutput::Send(AgentMsg::Report(r))
            if r.kind == ReportKind::Finished { outcome: Outcome::Cancelled, exit_code: None })));
    }

    fn drain(a: &mut Agent) -> Vec<AgentOutput> {
        std::iter::from_fn(|| a.poll_output()).collect()
    }

    /// Joined at `now`, then handed job 1's first attempt at `now + 10`:
    /// it is spawning.
    fn spawning(now: u64) -> Agent {
        let mut a = joined(now);
        a.handle_message(
            now + 10,
            ServerMsg::Start {
                index: 5,
                assignment: assignment(1, 7),
            },
        );
        assert!(matches!(drain(&mut a)[..], [AgentOutput::Spawn { .. }]));
        a
    }

    fn joined(now: u64) -> Agent {
        let mut a = Agent::new(config(), 7, None);
        a.handle_tick(now);
        let out = drain(&mut a);
        assert!(matches!(
            out[0],
            AgentOutput::Send(AgentMsg::Heartbeat { seq: 1, .. })
        ));
        a.handle_message(
            now + 5,
            ServerMsg::Lease {
                seq: 1,
                index: 1,
                active: vec![],
            },
        );
        assert_eq!(
            drain(&mut a),
            vec![AgentOutput::LeaseUntil {
                until_ms: now + 3_000,
                incarnation: 7,
            }]
        );
        a
    }

    #[test]
    fn agent_lease_runs_from_when_the_heartbeat_was_sent() {
        let mut a = joined(1_000);
        assert_eq!(a.lease_until(), Some(4_000));
        // A grant for an unknown heartbeat extends nothing.
        a.handle_message(
            1_500,
            ServerMsg::Lease {
                seq: 99,
                index: 2,
                active: vec![],
            },
        );
        assert_eq!(a.lease_until(), Some(4_000));
    }

    /// After a failover the agent finds the new leader between two
    /// heartbeats; the one sent while it had no leader was lost. It must
    /// not wait for the next interval: its lease runs from the last
    /// acknowledged heartbeat, and could run out meanwhile.
    #[test]
    fn agent_heartbeats_at_once_when_it_reconnects() {
        let mut a = joined(1_000);
        // The heartbeat of 2,000 went to a dead leader.
        a.handle_tick(2_000);
        assert!(matches!(
            drain(&mut a)[..],
            [AgentOutput::Send(AgentMsg::Heartbeat { seq: 2, .. })]
        ));
        a.handle_tick(2_300);
        assert!(drain(&mut a).is_empty(), "not due yet");
        a.handle_connected(2_400);
        assert!(matches!(
            drain(&mut a)[..],
            [AgentOutput::Send(AgentMsg::Heartbeat { seq: 3, .. })]
        ));
        a.handle_message(
            2_450,
            ServerMsg::Lease {
                seq: 3,
                index: 2,
                active: vec![],
            },
        );
        assert_eq!(a.lease_until(), Some(5_400));
    }

    #[test]
    fn agent_gives_back_an_attempt_its_executor_could_not_start() {
        let mut a = spawning(0);
        // Out of file descriptors: not the job's failure.
        a.handle_not_started(20, JobId(1), 1);
        let out = drain(&mut a);
        assert_reported_cancelled_without_spawning(&out);
        // Once only.
        a.handle_not_started(30, JobId(1), 1);
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn agent_runs_an_assignment_and_reports_until_acknowledged() {
        let mut a = spawning(0);
        a.handle_spawned(20, JobId(1), 1, Ok(()));
        assert!(
            matches!(&drain(&mut a)[..], [AgentOutput::Send(AgentMsg::Report(r))] if r.kind == ReportKind::Started)
        );
        let used = Usage {
            peak_memory_mb: 12,
            cpu_ms: 340,
        };
        a.handle_exit(500, JobId(1), 1, Some(0), Some(used));
        let out = drain(&mut a);
        assert!(matches!(&out[..], [AgentOutput::Send(AgentMsg::Report(r))]
            if r.kind == ReportKind::Finished { outcome: Outcome::Exited, exit_code: Some(0) }
                && r.incarnation == 7 && r.usage == Some(used)));
        // Not acknowledged: sent again with the next heartbeat, usage too.
        a.handle_tick(1_000);
        let out = drain(&mut a);
        assert!(out
            .iter()
            .any(|o| matches!(o, AgentOutput::Send(AgentMsg::Report(r)) if r.usage == Some(used))));
        a.handle_message(
            1_010,
            ServerMsg::ReportAck {
                job: JobId(1),
                attempt: 1,
                index: 6,
            },
        );
        a.handle_tick(2_000);
        let out = drain(&mut a);
        assert!(!out
            .iter()
            .any(|o| matches!(o, AgentOutput::Send(AgentMsg::Report(_)))));
    }

    #[test]
    fn agent_kills_what_times_out_and_reports_timed_out() {
        let mut a = joined(0);
        let mut short = assignment(1, 7);
        short.spec.timeout_secs = 1;
        a.handle_message(
            10,
            ServerMsg::Start {
                index: 5,
                assignment: short,
            },
        );
        a.handle_spawned(20, JobId(1), 1, Ok(()));
        drain(&mut a);
        a.handle_tick(1_019);
        assert!(!drain(&mut a)
            .iter()
            .any(|o| matches!(o, AgentOutput::Kill { .. })));
        a.handle_tick(1_020);
        assert!(drain(&mut a).contains(&AgentOutput::Kill {
            job: JobId(1),
            attempt: 1
        }));
        a.handle_exit(1_030, JobId(1), 1, None, None);
        assert!(
            matches!(&drain(&mut a)[..], [AgentOutput::Send(AgentMsg::Report(r))]
            if r.kind == ReportKind::Finished { outcome: Outcome::TimedOut, exit_code: None })
        );
    }

    #[test]
    fn agent_kills_everything_when_its_lease_lapses_and_joins_as_a_new_incarnation() {
        let mut a = joined(0);
        a.handle_message(
            10,
            ServerMsg::Start {
                index: 5,
                assignment: assignment(1, 7),
            },
        );
        a.handle_spawned(20, JobId(1), 1, Ok(()));
        drain(&mut a);
        // Heartbeats go out, nothing comes back.
        a.handle_tick(1_000);
        a.handle_tick(2_000);
        drain(&mut a);
        a.handle_tick(2_999);
        assert!(!drain(&mut a)
            .iter()
            .any(|o| matches!(o, AgentOutput::Kill { .. })));
        a.handle_tick(3_000);
        let out = drain(&mut a);
        assert_eq!(
            out[0],
            AgentOutput::Kill {
                job: JobId(1),
                attempt: 1
            }
        );
        assert!(
            matches!(&out[1], AgentOutput::Send(AgentMsg::Heartbeat { node, .. }) if node.incarnation == 8)
        );
        // The killed attempt is never reported.
        a.handle_exit(3_010, JobId(1), 1, None, None);
        a.handle_tick(4_000);
        assert!(!drain(&mut a)
            .iter()
            .any(|o| matches!(o, AgentOutput::Send(AgentMsg::Report(_)))));
        // A late start for the old incarnation is ignored.
        a.handle_message(
            4_010,
            ServerMsg::Start {
                index: 9,
                assignment: assignment(2, 7),
            },
        );
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn agent_refuses_attempts_placed_on_another_incarnation_and_reconciles_the_rest() {
        let mut a = joined(0);
        a.handle_tick(1_000);
        drain(&mut a);
        let mut cancelled = assignment(3, 7);
        cancelled.cancel_requested = true;
        let view = vec![assignment(1, 6), assignment(2, 7), cancelled];
        a.handle_message(
            1_010,
            ServerMsg::Lease {
                seq: 2,
                index: 9,
                active: view,
            },
        );
        let out = drain(&mut a);
        assert!(out.contains(&AgentOutput::Refused {
            job: JobId(1),
            attempt: 1,
            node: "n1".into(),
            incarnation: 6
        }));
        assert!(out
            .iter()
            .any(|o| matches!(o, AgentOutput::Spawn { job: JobId(2), .. })));
        assert!(!out.iter().any(|o| matches!(
            o,
            AgentOutput::Spawn {
                job: JobId(1) | JobId(3),
                ..
            }
        )));
        assert!(out.iter().any(|o| matches!(o, AgentOutput::Send(AgentMsg::Report(r))
            if r.job == JobId(3) && r.kind == ReportKind::Finished { outcome: Outcome::Cancelled, exit_code: None })));
        // A newer view without job 2 means it was taken away: killed, unreported.
        a.handle_spawned(1_020, JobId(2), 1, Ok(()));
        drain(&mut a);
        a.handle_tick(2_000);
        drain(&mut a);
        a.handle_message(
            2_010,
            ServerMsg::Lease {
                seq: 3,
                index: 12,
                active: vec![],
            },
        );
        let out = drain(&mut a);
        assert!(out.contains(&AgentOutput::Kill {
            job: JobId(2),
            attempt: 1
        }));
        a.handle_exit(2_020, JobId(2), 1, None, None);
        assert!(drain(&mut a).is_empty());
    }

    #[test]
    fn agent_kill_before_start_never_spawns() {
        let mut a = joined(0);
        a.handle_message(
            10,
            ServerMsg::Kill {
                job: JobId(1),
                attempt: 1,
                node: "n1".into(),
                incarnation: 7,
            },
        );
        a.handle_message(
            20,
            ServerMsg::Start {
                index: 5,
                assignment: assignment(1, 7),
            },
        );
        assert_reported_cancelled_without_spawning(&drain(&mut a));
    }

    #[test]
    fn agent_a_grant_that_arrives_after_it_ran_out_starts_nothing() {
        let mut a = joined(0);
        a.handle_tick(1_000);
        drain(&mut a);
        // The reply to heartbeat 2 (sent at 1,000) comes at 5,000: its lease
        // ended at 4,000, and the leader may have moved the work since.
        let view = vec![assignment(1, 7)];
        a.handle_message(
            5_000,
            ServerMsg::Lease {
                seq: 2,
                index: 9,
                active: view,
            },
        );
        let out = drain(&mut a);
        assert!(
            !out.iter().any(|o| matches!(o, AgentOutput::Spawn { .. })),
            "{out:?}"
        );
        assert_eq!(a.incarnation(), 8, "it joins again as a new incarnation");
    }

    #[test]
    fn agent_fenced_jumps_past_the_registered_incarnation_at_once() {
        let mut a = joined(0);
        a.handle_message(
            10,
            ServerMsg::Fenced {
                reason: "replaced".into(),
                current: 1_000,
            },
        );
        assert_eq!(a.incarnation(), 1_001);
    }

    #[test]
    fn agent_that_is_leaving_reports_new_work_cancelled_instead_of_ignoring_it() {
        let mut a = joined(0);
        a.leave(10, "stopping", true);
        drain(&mut a);
        a.handle_message(
            20,
            ServerMsg::Start {
                index: 5,
                assignment: assignment(1, 7),
            },
        );
        assert_reported_cancelled_without_spawning(&drain(&mut a));
    }
}
