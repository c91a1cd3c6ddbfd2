//! Simulated worker nodes: the second driver of core's sans-IO
//! [`Agent`]. The simulator keeps no agent logic of its own; a node here is
//! only what a machine adds around the agent: its processes (which run for a
//! drawn time and die with the agent), the supervisors that kill them when
//! the lease lapses even while the agent is paused, a drifting clock, and
//! crashes and restarts.

use std::collections::BTreeMap;

use rustci_core::agent::{Agent, AgentConfig, AgentOutput, AGENT_TICK_MS};
use rustci_core::model::{
    AttemptNumber, AttemptState, JobId, JobSpec, Labels, Outcome, Resources, Usage,
};
use rustci_core::protocol::{AgentMsg, ReportKind, ServerMsg, SERVER_SILENT_MS};

use crate::checker::{Check, LiveResult};
use crate::world::{Body, Clock, Ep, Ev, World, DOWNTIME_MS_MAX};

/// A process of an attempt, as the machine runs it.
#[derive(Clone, Debug)]
pub(crate) struct Proc {
    resources: Resources,
}

/// One worker machine.
pub(crate) struct NodeHost {
    pub name: String,
    pub capacity: Resources,
    /// Advertised by the agent; a restart may come back with others.
    pub labels: Labels,
    /// The agent process; `None` while the machine is down.
    pub agent: Option<Agent>,
    /// Bumped at every crash and restart: events of a dead process are
    /// ignored.
    pub gen: u64,
    /// The incarnation the next agent process starts with.
    pub next_incarnation: u64,
    pub paused_until: u64,
    /// The replica the agent talks to; a replica that does not lead sends
    /// it on to the one it believes leads.
    pub server: usize,
    /// When (true ms) the agent last heard from a replica: one silent for
    /// [`SERVER_SILENT_MS`] is given up for the next (as the production
    /// agent redials when its connection goes quiet).
    pub server_heard: u64,
    /// Replicas tried since one last answered (bounds the redials).
    pub hops: usize,
    pub clock: Clock,
    pub procs: BTreeMap<(JobId, AttemptNumber), Proc>,
    pub running_total: Resources,
    /// When the supervisors kill every process unless the lease is renewed
    /// (true time).
    pub supervisor_deadline: Option<u64>,
    /// Final attempt states the agent reported, with the incarnation that
    /// reported them, for the liveness check.
    /// (job, attempt) -> (incarnation, state, usage) the agent reported.
    pub results: BTreeMap<(JobId, AttemptNumber), (u64, AttemptState, Option<Usage>)>,
}

impl NodeHost {
    pub fn new(name: String, capacity: Resources, labels: Labels, clock: Clock) -> NodeHost {
        NodeHost {
            name,
            capacity,
            labels,
            agent: None,
            gen: 0,
            next_incarnation: 1,
            paused_until: 0,
            server: 0,
            server_heard: 0,
            hops: 0,
            clock,
            procs: BTreeMap::new(),
            running_total: Resources::default(),
            supervisor_deadline: None,
            results: BTreeMap::new(),
        }
    }

    /// The incarnation of the running agent, if any.
    pub fn incarnation(&self) -> Option<u64> {
        self.agent.as_ref().map(Agent::incarnation)
    }
}

impl World {
    fn agent_now(&self, i: usize) -> u64 {
        self.nodes[i].clock.mono(self.now)
    }

    /// Starts the agent process of node `i`.
    pub(crate) fn agent_boot(&mut self, i: usize) {
        let lease = self.lease_config();
        let host = &mut self.nodes[i];
        host.gen += 1;
        let config = AgentConfig {
            name: host.name.clone(),
            capacity: host.capacity,
            labels: host.labels.clone(),
            lease,
        };
        // The previous process's work died with it (process group,
        // pdeathsig): the new one vouches for it.
        let predecessor = (host.next_incarnation > 1).then(|| host.next_incarnation - 1);
        let agent = Agent::new(config, host.next_incarnation, predecessor);
        host.agent = Some(agent);
        let gen = host.gen;
        let first = self.rng.range(1, AGENT_TICK_MS);
        self.push_in(first, Ev::AgentTick { node: i, gen });
    }

    pub(crate) fn crash_agent(&mut self, i: usize) {
        if self.agent_down(i) {
            self.stats.node_crashes += 1;
            self.checker.disturbed.insert(self.nodes[i].name.clone());
        }
    }

    /// The agent process ends (crash or exit): its processes die with it
    /// (process group, pdeathsig), and it starts again after a while.
    /// False if it was not running.
    fn agent_down(&mut self, i: usize) -> bool {
        let Some(agent) = self.nodes[i].agent.take() else {
            return false;
        };
        let host = &mut self.nodes[i];
        host.gen += 1;
        host.next_incarnation = agent.incarnation() + 1;
        for (job, attempt) in std::mem::take(&mut host.procs).into_keys() {
            self.checker.exec_end(job, attempt);
        }
        let host = &mut self.nodes[i];
        host.running_total = Resources::default();
        host.supervisor_deadline = None;
        host.results.clear();
        let delay = self.rng.range(100, DOWNTIME_MS_MAX);
        self.push_in(delay, Ev::AgentRestart { node: i });
        true
    }

    /// An operator stops the agent (SIGTERM): it drains (or kills its
    /// jobs), leaves, and its process exits; it starts again later.
    pub(crate) fn stop_agent(&mut self, i: usize, drain: bool) -> Check {
        if self.nodes[i].agent.is_none() {
            return Ok(());
        }
        // Once gone, it no longer heartbeats: a lost goodbye ends as down.
        self.checker.disturbed.insert(self.nodes[i].name.clone());
        self.stats.agent_stops += 1;
        let now = self.agent_now(i);
        if let Some(agent) = self.nodes[i].agent.as_mut() {
            agent.leave(now, "stopped by the simulated operator", drain);
        }
        self.agent_outputs(i)
    }

    pub(crate) fn agent_restart(&mut self, i: usize) -> Check {
        if self.rng.chance(self.plan.relabel_share) {
            self.nodes[i].labels = crate::world::draw_labels(&mut self.rng);
        }
        self.agent_boot(i);
        Ok(())
    }

    pub(crate) fn agent_tick(&mut self, i: usize, gen: u64) -> Check {
        if self.nodes[i].gen != gen {
            return Ok(());
        }
        let now = self.agent_now(i);
        if let Some(agent) = self.nodes[i].agent.as_mut() {
            agent.handle_tick(now);
        }
        let replicas = self.replica_count();
        let next = self.next_replica(self.nodes[i].server);
        let node = &mut self.nodes[i];
        if replicas > 1 && self.now.saturating_sub(node.server_heard) >= SERVER_SILENT_MS {
            node.server = next;
            node.server_heard = self.now;
        }
        let next = self.nodes[i].clock.true_ms(AGENT_TICK_MS);
        self.push_in(next, Ev::AgentTick { node: i, gen });
        self.agent_outputs(i)
    }

    /// Replica `from` sent the agent `msg`: the agent talks to it from now
    /// on, even if it had given it up as silent (its answer was late).
    pub(crate) fn agent_receive(&mut self, i: usize, from: usize, msg: ServerMsg) -> Check {
        self.nodes[i].server = from;
        self.nodes[i].server_heard = self.now;
        self.nodes[i].hops = 0;
        let now = self.agent_now(i);
        if let Some(agent) = self.nodes[i].agent.as_mut() {
            agent.handle_message(now, msg);
        }
        self.agent_outputs(i)
    }

    /// A process ended by itself: it exits 0, or non-zero with `fail_share`.
    pub(crate) fn proc_end(
        &mut self,
        i: usize,
        gen: u64,
        job: JobId,
        attempt: AttemptNumber,
    ) -> Check {
        if self.nodes[i].gen != gen || !self.nodes[i].procs.contains_key(&(job, attempt)) {
            return Ok(());
        }
        self.stop_proc(i, job, attempt);
        let code = if self.rng.chance(self.plan.fail_share) {
            self.rng.range(1, 3) as i32
        } else {
            0
        };
        self.agent_exit(i, job, attempt, Some(code))
    }

    /// The agent learns about a process its supervisor killed.
    pub(crate) fn proc_gone(
        &mut self,
        i: usize,
        gen: u64,
        job: JobId,
        attempt: AttemptNumber,
    ) -> Check {
        if self.nodes[i].gen != gen {
            return Ok(());
        }
        self.agent_exit(i, job, attempt, None)
    }

    fn agent_exit(
        &mut self,
        i: usize,
        job: JobId,
        attempt: AttemptNumber,
        code: Option<i32>,
    ) -> Check {
        let now = self.agent_now(i);
        // A process that ran to its end was measured; the values are a
        // function of the attempt, so the checker can tell them apart.
        let usage = code.map(|_| Usage {
            peak_memory_mb: job.0 % 509 + u64::from(attempt),
            cpu_ms: job.0.wrapping_mul(37) % 10_007,
        });
        if let Some(agent) = self.nodes[i].agent.as_mut() {
            agent.handle_exit(now, job, attempt, code, usage);
        }
        self.agent_outputs(i)
    }

    /// The supervisors' lease check: every process of the node dies when
    /// the deadline passed without a renewal.
    pub(crate) fn supervise(&mut self, i: usize, gen: u64) -> Check {
        let host = &self.nodes[i];
        if host.gen != gen || host.supervisor_deadline.is_none_or(|d| self.now < d) {
            return Ok(());
        }
        self.nodes[i].supervisor_deadline = None;
        let keys: Vec<(JobId, AttemptNumber)> = self.nodes[i].procs.keys().copied().collect();
        for (job, attempt) in keys {
            self.stop_proc(i, job, attempt);
            self.push_in(
                0,
                Ev::ProcGone {
                    node: i,
                    gen,
                    job,
                    attempt,
                },
            );
        }
        Ok(())
    }

    fn stop_proc(&mut self, i: usize, job: JobId, attempt: AttemptNumber) {
        let host = &mut self.nodes[i];
        if let Some(p) = host.procs.remove(&(job, attempt)) {
            host.running_total = host.running_total.saturating_sub(&p.resources);
            self.checker.exec_end(job, attempt);
        }
    }

    /// Carries out what the agent asked for, in order.
    fn agent_outputs(&mut self, i: usize) -> Check {
        loop {
            let Some(out) = self.nodes[i].agent.as_mut().and_then(Agent::poll_output) else {
                if self.nodes[i].agent.as_ref().is_some_and(Agent::is_gone) {
                    // It left: its process exits.
                    self.agent_down(i);
                }
                return Ok(());
            };
            match out {
                AgentOutput::Send(msg) => self.agent_send(i, msg),
                AgentOutput::Spawn {
                    job,
                    attempt,
                    incarnation,
                    spec,
                } => self.spawn(i, job, attempt, incarnation, &spec)?,
                AgentOutput::Kill { job, attempt } => {
                    let was_running = self.nodes[i].procs.contains_key(&(job, attempt));
                    self.stop_proc(i, job, attempt);
                    if was_running {
                        let now = self.agent_now(i);
                        if let Some(agent) = self.nodes[i].agent.as_mut() {
                            agent.handle_exit(now, job, attempt, None, None);
                        }
                    }
                }
                AgentOutput::LeaseUntil { until_ms, .. } => {
                    // Convert the agent's deadline to true time.
                    let host = &self.nodes[i];
                    let local_now = host.clock.mono(self.now);
                    let ahead = until_ms.saturating_sub(local_now);
                    let deadline = self.now + host.clock.true_ms(ahead);
                    let gen = host.gen;
                    self.nodes[i].supervisor_deadline = Some(deadline);
                    self.push_at(deadline, Ev::Supervise { node: i, gen });
                }
                AgentOutput::Refused {
                    job,
                    attempt,
                    node,
                    incarnation,
                } => {
                    let host = &self.nodes[i];
                    let me = host.incarnation().unwrap_or(0);
                    return self.checker.foreign_attempt(
                        &host.name,
                        me,
                        job,
                        attempt,
                        &node,
                        incarnation,
                    );
                }
            }
        }
    }

    fn agent_send(&mut self, i: usize, msg: AgentMsg) {
        match &msg {
            AgentMsg::Heartbeat { node, .. } => {
                self.checker.node_truth(
                    &node.name,
                    node.incarnation,
                    node.capacity,
                    node.labels.clone(),
                );
            }
            AgentMsg::Report(r) => {
                if let ReportKind::Finished { outcome, exit_code } = r.kind {
                    let state = match outcome {
                        Outcome::Exited if exit_code == Some(0) => AttemptState::Succeeded,
                        Outcome::Exited | Outcome::StartFailed | Outcome::Oom => {
                            AttemptState::Failed
                        }
                        Outcome::TimedOut => AttemptState::TimedOut,
                        Outcome::Cancelled => AttemptState::Cancelled,
                    };
                    self.nodes[i]
                        .results
                        .insert((r.job, r.attempt), (r.incarnation, state, r.usage));
                }
            }
            AgentMsg::Leaving { .. } => {}
        }
        let server = self.nodes[i].server;
        self.send(Ep::Node(i), Ep::Replica(server), 0, Body::FromAgent(msg));
    }

    fn spawn(
        &mut self,
        i: usize,
        job: JobId,
        attempt: AttemptNumber,
        incarnation: u64,
        spec: &JobSpec,
    ) -> Check {
        let now = self.agent_now(i);
        if self.rng.chance(self.plan.start_fail_share) {
            if let Some(agent) = self.nodes[i].agent.as_mut() {
                agent.handle_spawned(now, job, attempt, Err("no such file".into()));
            }
            return Ok(());
        }
        let host = &mut self.nodes[i];
        host.running_total = host.running_total.saturating_add(&spec.resources);
        host.procs.insert(
            (job, attempt),
            Proc {
                resources: spec.resources,
            },
        );
        let (name, total, gen) = (host.name.clone(), host.running_total, host.gen);
        self.checker
            .exec_start(job, attempt, &name, incarnation, total)?;
        if let Some(agent) = self.nodes[i].agent.as_mut() {
            agent.handle_spawned(now, job, attempt, Ok(()));
        }
        let duration = self.rng.range(50, self.plan.job_secs_max * 1000);
        self.push_in(
            duration,
            Ev::ProcEnd {
                node: i,
                gen,
                job,
                attempt,
            },
        );
        Ok(())
    }

    /// Results a live agent reported for attempts of its current
    /// incarnation: they must be recorded.
    pub(crate) fn live_agent_results(&self) -> Vec<LiveResult> {
        self.nodes
            .iter()
            .filter_map(|h| h.incarnation().map(|inc| (h, inc)))
            .flat_map(|(h, inc)| {
                h.results
                    .iter()
                    .filter(move |(_, (by, _, _))| *by == inc)
                    .map(|((j, n), (_, s, u))| (*j, *n, *s, *u))
            })
            .collect()
    }

    /// Every node is up, runs nothing, and the control plane has its
    /// agent's current incarnation registered and taking work (a fenced
    /// agent has joined again).
    pub(crate) fn nodes_settled(&self, state: &rustci_core::state::State) -> bool {
        self.nodes.iter().all(|h| {
            let registered = state.nodes.get(&h.name).is_some_and(|n| {
                Some(n.incarnation) == h.incarnation()
                    && n.state == rustci_core::model::NodeState::Ready
            });
            registered && h.procs.is_empty() && h.agent.as_ref().is_some_and(|a| a.running() == 0)
        })
    }
}
