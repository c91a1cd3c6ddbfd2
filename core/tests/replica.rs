//! Scenario tests of the replica state machine, driven over virtual time by
//! a tiny in-memory driver (the quinn-proto way: no IO, a bounded loop).

use std::collections::BTreeMap;

use rustci_core::event::{Entry, Event};
use rustci_core::model::{AttemptState, JobId, JobSpec, JobState, NodeState, Outcome, Resources};
use rustci_core::protocol::{AgentMsg, LeaseConfig, NodeAd, Report, ReportKind, ServerMsg};
use rustci_core::raft::HardState;
use rustci_core::replica::{
    Command, CommandError, Config, Output, PersistUnit, Recovery, Replica, Reply, Snapshot,
};
use rustci_core::state::State;
use rustci_core::validate;

/// What a runner observed, as the tests say it; sent as the agent of the
/// attempt's node incarnation would send it.
enum RunnerReport {
    Started {
        job: JobId,
        attempt: u32,
    },
    Finished {
        job: JobId,
        attempt: u32,
        outcome: Outcome,
        exit_code: Option<i32>,
    },
}

/// A replica with a perfect disk and agents that record what they are told.
struct Cluster {
    replica: Replica,
    /// The stored snapshot, and the log after it.
    snapshot: Option<Snapshot>,
    disk: Vec<Entry>,
    config: Config,
    hard_state: HardState,
    replies: BTreeMap<u64, Result<Reply, CommandError>>,
    /// Answers to linearizable reads, in order.
    reads: Vec<(u64, Result<(), CommandError>)>,
    /// Messages to agents: (node, incarnation, message).
    runner: Vec<ServerMsg>,
    to_agents: Vec<(String, u64, ServerMsg)>,
    now: u64,
    /// The monotonic clock.
    mono: u64,
    next_request: u64,
    /// Compactions whose fold was compared with the live state.
    folds_checked: u64,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_config(Config::new(1))
    }

    fn with_config(config: Config) -> Cluster {
        let mut c = Cluster {
            replica: Replica::recover(config.clone(), Recovery::empty(), 0),
            snapshot: None,
            disk: Vec::new(),
            config,
            hard_state: HardState::default(),
            replies: BTreeMap::new(),
            reads: Vec::new(),
            runner: Vec::new(),
            to_agents: Vec::new(),
            now: 1_000,
            mono: 0,
            next_request: 1,
            folds_checked: 0,
        };
        c.replica.start(c.now);
        c.drive();
        c
    }

    /// Restarts from the durable log, as `rustci dev` does after a crash.
    fn restart(&mut self) {
        let (state, base) = match &self.snapshot {
            Some(s) => (State::clone(&s.state), s.meta),
            None => (State::new(), Default::default()),
        };
        let recovery = Recovery::from_snapshot(state, base, &self.disk, self.hard_state);
        self.replica = Replica::recover(self.config.clone(), recovery, self.mono);
        self.replica.start(self.now);
        self.runner.clear();
        self.drive();
    }

    /// Carries out outputs until there are none (bounded).
    fn drive(&mut self) {
        for _ in 0..10_000 {
            let Some(out) = self.replica.poll_output() else {
                return;
            };
            match out {
                Output::Persist(unit) => {
                    let id = unit.id;
                    self.write(unit);
                    self.replica.handle_persisted(self.now, id);
                }
                Output::Compact(meta) => {
                    let base = match &self.snapshot {
                        Some(s) => State::clone(&s.state),
                        None => State::new(),
                    };
                    let snapshot = Snapshot::fold(meta, base, self.disk.clone())
                        .expect("the durable log reaches the compaction's index");
                    if self.replica.state().applied_index == meta.index {
                        assert_eq!(
                            *snapshot.state,
                            *self.replica.state(),
                            "the fold of the log is the applied state"
                        );
                        self.folds_checked += 1;
                    }
                    self.disk.retain(|e| e.index > meta.index);
                    self.snapshot = Some(snapshot);
                    self.replica.handle_compacted(self.now, meta);
                }
                Output::Send(msg) => panic!("a single replica sent {msg:?}"),
                Output::Members(members) => assert_eq!(members.len(), 1, "{members:?}"),
                Output::LoadEntries(need) => panic!("a single replica asked for {need:?}"),
                Output::ReadReady { request, result } => {
                    self.reads.push((request, result));
                }
                Output::Reply { request, result } => {
                    self.replies.insert(request, result);
                }
                Output::ToAgent {
                    node,
                    incarnation,
                    msg,
                } => {
                    if matches!(msg, ServerMsg::Start { .. } | ServerMsg::Kill { .. }) {
                        self.runner.push(msg.clone());
                    }
                    self.to_agents.push((node, incarnation, msg));
                }
            }
        }
        panic!("drive did not settle");
    }

    /// Makes a unit durable, as a driver does.
    fn write(&mut self, unit: PersistUnit) {
        if let Some(from) = unit.truncate_from {
            self.disk.retain(|e| e.index < from);
        }
        self.disk.extend(unit.entries);
        if let Some(h) = unit.hard_state {
            self.hard_state = h;
        }
    }

    /// Lets `ms` pass on both clocks, ticking the replica as a driver does.
    fn wait(&mut self, ms: u64) {
        let end = self.mono + ms;
        while self.mono < end {
            self.mono = (self.mono + rustci_core::replica::TICK_MS).min(end);
            self.now += rustci_core::replica::TICK_MS;
            self.replica.handle_tick(self.now, self.mono);
            self.drive();
        }
    }

    fn heartbeat(&mut self, name: &str, incarnation: u64, seq: u64) -> ServerMsg {
        let node = NodeAd {
            name: name.into(),
            incarnation,
            capacity: Resources::new(1000, 100),
            labels: BTreeMap::new(),
            predecessor: None,
        };
        self.to_agents.clear();
        self.replica
            .handle_agent(self.now, self.mono, AgentMsg::Heartbeat { node, seq });
        self.drive();
        self.to_agents
            .iter()
            .find(|(n, _, m)| n == name && !matches!(m, ServerMsg::Start { .. }))
            .map(|(_, _, m)| m.clone())
            .expect("a heartbeat is answered")
    }

    fn command(&mut self, cmd: Command) -> Result<Reply, CommandError> {
        let request = self.next_request;
        self.next_request += 1;
        self.replica.propose(self.now, request, cmd);
        self.drive();
        self.replies
            .remove(&request)
            .expect("every command gets a reply")
    }

    fn add_node(&mut self, name: &str, cpu: u64, mem: u64, labels: &[(&str, &str)]) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.command(Command::RegisterNode {
            name: name.into(),
            capacity: Resources::new(cpu, mem),
            labels,
            incarnation: 1,
            predecessor: None,
        })
        .unwrap();
    }

    fn submit(&mut self, spec: JobSpec) -> JobId {
        self.submit_keyed(spec, None).unwrap()
    }

    fn submit_keyed(&mut self, spec: JobSpec, key: Option<&str>) -> Result<JobId, CommandError> {
        match self.command(Command::Submit {
            spec,
            idempotency_key: key.map(str::to_string),
        })? {
            Reply::Job(job) => Ok(job.id),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn report(&mut self, report: RunnerReport) {
        let (job, attempt, kind) = match report {
            RunnerReport::Started { job, attempt } => (job, attempt, ReportKind::Started),
            RunnerReport::Finished {
                job,
                attempt,
                outcome,
                exit_code,
            } => (job, attempt, ReportKind::Finished { outcome, exit_code }),
        };
        let a = &self.replica.state().job(job).unwrap().attempts[attempt as usize - 1];
        let report = Report {
            node: a.node.clone(),
            incarnation: a.incarnation,
            job,
            attempt,
            kind,
            usage: None,
        };
        self.replica
            .handle_agent(self.now, self.mono, AgentMsg::Report(report));
        self.drive();
    }

    fn job_state(&self, id: JobId) -> JobState {
        self.replica.state().job(id).unwrap().state
    }

    fn starts(&self) -> Vec<(JobId, u32, String)> {
        self.runner
            .iter()
            .filter_map(|c| match c {
                ServerMsg::Start { assignment, .. } => {
                    Some((assignment.job, assignment.attempt, assignment.node.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn check(&self) {
        self.replica.state().check_consistency().unwrap();
        assert_eq!(
            State::replay(&self.disk).digest(),
            self.replica.state().digest(),
            "replay of the durable log equals the live state"
        );
    }
}

fn spec(cpu: u64, mem: u64) -> JobSpec {
    JobSpec {
        name: "t".into(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        resources: Resources::new(cpu, mem),
        constraints: BTreeMap::new(),
        priority: validate::PRIORITY_DEFAULT,
        timeout_secs: 60,
        max_retries: 0,
        workspace: Default::default(),
    }
}

#[test]
fn submission_is_acknowledged_only_after_it_is_durable() {
    let mut c = Cluster::new();
    c.replica.propose(
        c.now,
        7,
        Command::Submit {
            spec: spec(100, 10),
            idempotency_key: None,
        },
    );
    // Before the driver persists, nothing is replied.
    let mut outs = Vec::new();
    while let Some(o) = c.replica.poll_output() {
        outs.push(o);
    }
    assert!(outs.iter().all(|o| !matches!(o, Output::Reply { .. })));
    assert!(matches!(outs.as_slice(), [Output::Persist(u)] if u.entries.len() == 1));
    let Output::Persist(unit) = outs.remove(0) else {
        unreachable!()
    };
    let id = unit.id;
    c.write(unit);
    c.replica.handle_persisted(c.now, id);
    c.drive();
    assert!(matches!(c.replies.get(&7), Some(Ok(Reply::Job(_)))));
    c.check();
}

#[test]
fn scheduler_places_when_capacity_exists_and_never_overcommits() {
    let mut c = Cluster::new();
    c.add_node("n1", 2000, 1000, &[]);
    let ids: Vec<JobId> = (0..5).map(|_| c.submit(spec(1000, 100))).collect();
    let placed = c.starts();
    assert_eq!(placed.len(), 2, "two 1-cpu jobs fit a 2-cpu node");
    assert_eq!(c.job_state(ids[2]), JobState::Queued);
    // Finishing one frees room for exactly one more.
    let (job, attempt, _) = placed[0].clone();
    c.report(RunnerReport::Started { job, attempt });
    c.report(RunnerReport::Finished {
        job,
        attempt,
        outcome: Outcome::Exited,
        exit_code: Some(0),
    });
    assert_eq!(c.job_state(job), JobState::Succeeded);
    assert_eq!(c.starts().len(), 3);
    let node = &c.replica.state().nodes["n1"];
    assert!(node.allocated.fits_in(&node.capacity));
    c.check();
}

#[test]
fn scheduler_priority_order_then_fifo() {
    let mut c = Cluster::new();
    let low = c.submit(spec(1000, 10));
    let mut high_spec = spec(1000, 10);
    high_spec.priority = 90;
    let high = c.submit(high_spec);
    let low2 = c.submit(spec(1000, 10));
    c.add_node("n1", 1000, 100, &[]);
    assert_eq!(c.starts()[0].0, high, "higher priority first");
    let (job, attempt, _) = c.starts()[0].clone();
    c.report(RunnerReport::Finished {
        job,
        attempt,
        outcome: Outcome::Exited,
        exit_code: Some(0),
    });
    assert_eq!(c.starts()[1].0, low, "FIFO within a priority");
    assert_eq!(c.job_state(low2), JobState::Queued);
    c.check();
}

#[test]
fn scheduler_constraints_must_match_and_unplaceable_job_says_why() {
    let mut c = Cluster::new();
    c.add_node("linux", 4000, 4000, &[("os", "linux")]);
    let mut s = spec(100, 10);
    s.constraints.insert("os".into(), "windows".into());
    let id = c.submit(s);
    assert!(c.starts().is_empty());
    let job = c.replica.state().job(id).unwrap();
    let reason = rustci_core::scheduler::unplaced_reason(c.replica.state(), job).unwrap();
    assert!(reason.contains("os=windows"), "{reason}");
    let mut s = spec(100, 10);
    s.constraints.insert("os".into(), "linux".into());
    let ok = c.submit(s);
    assert_eq!(c.starts()[0].0, ok);
    c.check();
}

#[test]
fn scheduler_bin_packs_onto_the_tightest_node() {
    let mut c = Cluster::new();
    c.add_node("big", 8000, 8000, &[]);
    c.add_node("small", 2000, 2000, &[]);
    let id = c.submit(spec(1500, 1500));
    assert_eq!(c.starts(), vec![(id, 1, "small".to_string())]);
}

#[test]
fn failed_attempt_with_retries_left_is_queued_again() {
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    let mut s = spec(1000, 10);
    s.max_retries = 1;
    let id = c.submit(s);
    for (n, outcome) in [(1, Outcome::TimedOut), (2, Outcome::Exited)] {
        assert_eq!(c.starts().last().unwrap().1, n);
        c.report(RunnerReport::Started {
            job: id,
            attempt: n,
        });
        c.report(RunnerReport::Finished {
            job: id,
            attempt: n,
            outcome,
            exit_code: if outcome == Outcome::Exited {
                Some(3)
            } else {
                None
            },
        });
    }
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts[0].state, AttemptState::TimedOut);
    assert_eq!(job.attempts[1].state, AttemptState::Failed);
    assert_eq!(job.exit_code(), Some(3));
    c.check();
}

#[test]
fn stale_attempt_results_are_ignored() {
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    let id = c.submit(spec(1000, 10));
    // The node restarts (and vouches that its old work died with it):
    // attempt 1 is lost, attempt 2 is placed.
    c.command(Command::RegisterNode {
        name: "n1".into(),
        capacity: Resources::new(1000, 100),
        labels: BTreeMap::new(),
        incarnation: 2,
        predecessor: Some(1),
    })
    .unwrap();
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.attempts[0].state, AttemptState::Lost);
    assert_eq!(job.attempts.len(), 2);
    assert_eq!(job.retries_used, 0, "a lost attempt spends no retry");
    // A late success of attempt 1 must not finish the job.
    let before = c.replica.state().digest();
    c.replica.state().check_consistency().unwrap();
    let late = Report {
        node: "n1".into(),
        incarnation: 1,
        job: id,
        attempt: 1,
        kind: ReportKind::Finished {
            outcome: Outcome::Exited,
            exit_code: Some(0),
        },
        usage: None,
    };
    c.replica
        .handle_agent(c.now, c.mono, AgentMsg::Report(late));
    assert!(
        matches!(
            c.replica.poll_output(),
            Some(Output::ToAgent {
                msg: ServerMsg::ReportAck { attempt: 1, .. },
                ..
            })
        ),
        "a stale report is acknowledged (so it is not sent again)"
    );
    assert!(
        c.replica.poll_output().is_none(),
        "a stale report proposes nothing"
    );
    assert_eq!(c.replica.state().digest(), before);
    assert_eq!(c.job_state(id), JobState::Assigned);
    c.check();
}

#[test]
fn cancel_running_job_kills_the_attempt_and_keeps_resources_until_it_ends() {
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    let id = c.submit(spec(1000, 10));
    c.report(RunnerReport::Started {
        job: id,
        attempt: 1,
    });
    let reply = c.command(Command::Cancel { job: id }).unwrap();
    assert!(matches!(reply, Reply::Job(j) if j.state == JobState::Cancelled));
    assert!(c.runner.iter().any(|r| matches!(r,
        ServerMsg::Kill { job, attempt: 1, .. } if *job == id)));
    assert_eq!(c.replica.state().nodes["n1"].allocated.cpu_millis, 1000);
    c.report(RunnerReport::Finished {
        job: id,
        attempt: 1,
        outcome: Outcome::Cancelled,
        exit_code: None,
    });
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.attempts[0].state, AttemptState::Cancelled);
    assert_eq!(c.replica.state().nodes["n1"].allocated.cpu_millis, 0);
    // Cancelling again is a no-op that proposes nothing.
    let last = c.replica.last_index();
    assert!(c.command(Command::Cancel { job: id }).is_ok());
    assert_eq!(c.replica.last_index(), last);
    c.check();
}

#[test]
fn idempotency_key_makes_one_job() {
    let mut c = Cluster::new();
    let a = c.submit_keyed(spec(100, 10), Some("k1")).unwrap();
    let b = c.submit_keyed(spec(100, 10), Some("k1")).unwrap();
    let other = c.submit_keyed(spec(100, 10), Some("k2")).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, other);
    assert_eq!(c.replica.state().jobs.len(), 2);
    // Two submissions with one key in flight at once still make one job.
    for r in [100, 101] {
        c.replica.propose(
            c.now,
            r,
            Command::Submit {
                spec: spec(100, 10),
                idempotency_key: Some("k3".into()),
            },
        );
    }
    c.drive();
    let ids: Vec<JobId> = [100, 101]
        .iter()
        .map(|r| match c.replies.remove(r) {
            Some(Ok(Reply::Job(j))) => j.id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(c.replica.state().jobs.len(), 3);
    c.check();
}

#[test]
fn idempotency_keys_expire_after_the_window_and_replay_agrees() {
    let mut config = Config::new(1);
    config.idempotency_window_ms = 10_000;
    let mut c = Cluster::with_config(config);
    let a = c.submit_keyed(spec(100, 10), Some("k1")).unwrap();
    c.wait(5_000);
    let b = c.submit_keyed(spec(100, 10), Some("k2")).unwrap();
    assert_eq!(c.submit_keyed(spec(100, 10), Some("k1")).unwrap(), a);
    let expiries = |c: &Cluster| {
        c.disk
            .iter()
            .filter(|e| matches!(e.event, Event::IdempotencyKeysExpired { .. }))
            .count()
    };
    assert_eq!(expiries(&c), 0);
    // k1 is now past the window, k2 is not.
    c.wait(6_000);
    assert_eq!(expiries(&c), 1, "one expiry, proposed once");
    assert_eq!(c.replica.state().idempotency.len(), 1);
    let again = c.submit_keyed(spec(100, 10), Some("k1")).unwrap();
    assert_ne!(again, a, "an expired key makes a new job");
    assert_eq!(c.submit_keyed(spec(100, 10), Some("k2")).unwrap(), b);
    // The expiry is a decision in the log: replay agrees.
    assert_eq!(State::replay(&c.disk).digest(), c.replica.state().digest());
    c.check();
}

#[test]
fn bad_input_gets_an_error_and_changes_nothing() {
    let mut c = Cluster::new();
    let before = (c.replica.state().digest(), c.disk.len());
    let mut empty = spec(100, 10);
    empty.command.clear();
    let mut huge = spec(u64::MAX, 10);
    huge.priority = 50;
    for bad in [empty, huge] {
        assert!(matches!(
            c.submit_keyed(bad, None),
            Err(CommandError::Invalid(_))
        ));
    }
    assert!(matches!(
        c.command(Command::Cancel { job: JobId(999) }),
        Err(CommandError::NotFound { .. })
    ));
    assert!(matches!(
        c.command(Command::DrainNode {
            name: "nope".into()
        }),
        Err(CommandError::NotFound { .. })
    ));
    assert_eq!((c.replica.state().digest(), c.disk.len()), before);
}

#[test]
fn the_log_is_compacted_behind_snapshots_and_a_restart_recovers_from_the_latest() {
    let mut config = Config::new(1);
    config.snapshot_entries = 10;
    let mut c = Cluster::with_config(config);
    c.add_node("local", 2000, 1000, &[]);
    let jobs: Vec<JobId> = (0..35).map(|_| c.submit(spec(100, 10))).collect();
    let snapshot = c.snapshot.clone().expect("a snapshot after 35 submissions");
    let applied = c.replica.state().applied_index;
    // At most `snapshot_entries` entries stay behind the latest snapshot,
    // and the log holds only what follows it.
    assert!(
        applied - snapshot.meta.index < 10,
        "{applied} {:?}",
        snapshot.meta
    );
    assert_eq!(c.replica.snapshot(), snapshot.meta);
    assert_eq!(
        c.disk.first().map(|e| e.index),
        Some(snapshot.meta.index + 1)
    );
    assert_eq!(snapshot.state.applied_index, snapshot.meta.index);
    // Each snapshot is a fold of the log, and it was the live state.
    assert!(c.folds_checked >= 3, "{} folds checked", c.folds_checked);
    // What a restart recovers (before it elects itself and appends) is the
    // state it had: the snapshot plus the entries after it.
    let recovered = Recovery::from_snapshot(
        State::clone(&snapshot.state),
        snapshot.meta,
        &c.disk,
        c.hard_state,
    );
    let mut state = recovered.state;
    for e in &recovered.tail {
        state.apply(e);
    }
    assert_eq!(
        state.digest(),
        c.replica.state().digest(),
        "snapshot + log after it = the state ({} entries not yet known committed)",
        recovered.tail.len()
    );
    c.restart();
    for id in jobs {
        assert!(c.replica.state().job(id).is_some(), "job {id:?} survives");
    }
    // It keeps working: more submissions, another snapshot, another restart.
    let more = c.submit(spec(100, 10));
    c.restart();
    assert!(c.replica.state().job(more).is_some());
}

#[test]
fn recovery_after_crash_loses_running_attempts_and_runs_them_again() {
    let mut c = Cluster::new();
    c.add_node("local", 2000, 1000, &[]);
    let a = c.submit(spec(1000, 10));
    let b = c.submit(spec(1000, 10));
    let queued = c.submit(spec(1000, 10));
    c.report(RunnerReport::Started { job: a, attempt: 1 });
    c.restart();
    assert_eq!(
        c.replica.state().jobs.len(),
        3,
        "every acknowledged job survives"
    );
    // The runner comes back with a new incarnation.
    c.command(Command::RegisterNode {
        name: "local".into(),
        capacity: Resources::new(2000, 1000),
        labels: BTreeMap::new(),
        incarnation: 2,
        predecessor: Some(1),
    })
    .unwrap();
    let st = c.replica.state();
    for id in [a, b] {
        let job = st.job(id).unwrap();
        assert_eq!(job.attempts[0].state, AttemptState::Lost);
        assert_eq!(
            job.attempts.len(),
            2,
            "the lost job runs again first (FIFO)"
        );
    }
    assert_eq!(st.job(queued).unwrap().state, JobState::Queued);
    assert_eq!(c.starts().len(), 2, "two of three fit again");
    c.check();
}

#[test]
fn drained_node_gets_no_new_work_and_removed_node_loses_its_attempts_after_its_lease() {
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    c.add_node("n2", 1000, 100, &[]);
    let a = c.submit(spec(1000, 10));
    let first_node = c.starts()[0].2.clone();
    let other = if first_node == "n1" { "n2" } else { "n1" };
    let reply = c
        .command(Command::DrainNode { name: other.into() })
        .unwrap();
    assert!(matches!(reply, Reply::Node(n) if n.state == NodeState::Draining));
    let b = c.submit(spec(1000, 10));
    assert_eq!(c.job_state(b), JobState::Queued);
    c.command(Command::RemoveNode {
        name: first_node.clone(),
        reason: "disk failing".into(),
    })
    .unwrap();
    assert_eq!(
        c.replica.state().nodes[&first_node].left_reason.as_deref(),
        Some("disk failing")
    );
    assert_eq!(c.replica.state().nodes[&first_node].state, NodeState::Left);
    // Its agent is told to stop the attempt at once, but the job is placed
    // elsewhere only once the node's lease has provably lapsed.
    assert!(c.runner.iter().any(|r| matches!(r,
        ServerMsg::Kill { job, attempt: 1, .. } if *job == a)));
    assert_eq!(c.job_state(a), JobState::Assigned);
    let requeue_after = LeaseConfig::default().requeue_after_ms();
    c.wait(requeue_after - 200);
    assert_eq!(
        c.job_state(a),
        JobState::Assigned,
        "not before the lease lapsed"
    );
    c.wait(300);
    assert_eq!(c.job_state(a), JobState::Queued);
    c.check();
}

/// Found by `rustci sim --seed 61` (with frequent drains): a placement the
/// reducer ignored, because a drain proposed before it was applied first,
/// left the job queued with no scheduling pass to revisit it, and a later
/// lower-priority job took the capacity it could have used.
#[test]
fn seed_61_placement_ignored_by_a_racing_drain_is_placed_again() {
    let mut c = Cluster::new();
    c.add_node("x", 1000, 100, &[]);
    c.add_node("y", 4000, 1000, &[]);
    let mut high = spec(1000, 10);
    high.priority = 90;
    c.replica.propose(
        c.now,
        50,
        Command::Submit {
            spec: high,
            idempotency_key: None,
        },
    );
    c.replica
        .propose(c.now, 51, Command::DrainNode { name: "x".into() });
    let mut pending: Vec<PersistUnit> = Vec::new();
    while let Some(out) = c.replica.poll_output() {
        if let Output::Persist(unit) = out {
            pending.push(unit);
        }
    }
    // The submission is durable first: the pass places the job on the
    // tightest node, x, behind the drain that is not applied yet.
    let submit = pending.remove(0);
    assert!(matches!(
        submit.entries[..],
        [Entry {
            event: Event::JobSubmitted { .. },
            ..
        }]
    ));
    let submit_unit = submit.id;
    c.write(submit);
    c.replica.handle_persisted(c.now, submit_unit);
    while let Some(out) = c.replica.poll_output() {
        match out {
            Output::Persist(unit) => pending.push(unit),
            Output::Reply { request, result } => {
                c.replies.insert(request, result);
            }
            Output::ToAgent { msg, .. } => c.runner.push(msg),
            other => panic!("a single replica did {other:?}"),
        }
    }
    assert!(pending
        .iter()
        .flat_map(|u| &u.entries)
        .any(|e| matches!(&e.event,
        rustci_core::event::Event::AttemptAssigned { node, .. } if node == "x")));
    let last = pending.last().unwrap().id;
    for unit in pending {
        c.write(unit);
    }
    c.replica.handle_persisted(c.now, last);
    c.drive();
    let job = c.replica.state().job(JobId(1)).unwrap();
    assert_eq!(job.state, JobState::Assigned, "placed again, on y");
    assert_eq!(job.node(), Some("y"));
    c.check();
}

#[test]
fn a_backlog_of_unplaceable_jobs_does_not_hide_placeable_ones() {
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    let mut nowhere = spec(100, 10);
    nowhere.constraints.insert("os".into(), "macos".into());
    for _ in 0..(rustci_core::scheduler::SCAN_JOBS_MAX + 100) {
        c.submit(nowhere.clone());
    }
    let first = c.submit(spec(1000, 10));
    let second = c.submit(spec(1000, 10));
    assert_eq!(c.job_state(first), JobState::Assigned);
    c.report(RunnerReport::Finished {
        job: first,
        attempt: 1,
        outcome: Outcome::Exited,
        exit_code: Some(0),
    });
    assert_eq!(
        c.job_state(second),
        JobState::Assigned,
        "found behind the backlog"
    );
    c.check();
}

#[test]
fn an_agent_joins_with_its_first_heartbeat_and_is_leased_with_its_view() {
    let mut c = Cluster::new();
    let reply = c.heartbeat("w1", 5, 1);
    assert_eq!(reply, ServerMsg::Joining { seq: 1 });
    let node = &c.replica.state().nodes["w1"];
    assert_eq!((node.incarnation, node.state), (5, NodeState::Ready));
    let id = c.submit(spec(500, 10));
    assert_eq!(c.starts(), vec![(id, 1, "w1".to_string())]);
    match c.heartbeat("w1", 5, 2) {
        ServerMsg::Lease { seq: 2, active, .. } => {
            assert_eq!(active.len(), 1);
            assert_eq!((active[0].job, active[0].incarnation), (id, 5));
        }
        other => panic!("expected a lease, got {other:?}"),
    }
    // An older incarnation of the same node is fenced, never leased.
    assert!(matches!(c.heartbeat("w1", 4, 1), ServerMsg::Fenced { .. }));
    c.check();
}

#[test]
fn a_silent_node_is_declared_down_and_its_jobs_move_only_after_its_lease_lapsed() {
    let mut c = Cluster::new();
    c.heartbeat("w1", 1, 1);
    c.heartbeat("w2", 1, 1);
    let id = c.submit(spec(600, 10));
    let (_, _, first) = c.starts()[0].clone();
    let other = if first == "w1" { "w2" } else { "w1" };
    c.report(RunnerReport::Started {
        job: id,
        attempt: 1,
    });
    let lease = LeaseConfig::default();
    // The other node keeps heartbeating; the first falls silent.
    let mut seq = 2;
    let mut keep_alive = |c: &mut Cluster, ms: u64| {
        for _ in 0..ms / 500 {
            c.wait(500);
            c.heartbeat(other, 1, seq);
            seq += 1;
        }
    };
    keep_alive(&mut c, lease.down_after_ms - 500);
    assert_eq!(c.replica.state().nodes[&first].state, NodeState::Ready);
    keep_alive(&mut c, 1_000);
    assert_eq!(c.replica.state().nodes[&first].state, NodeState::Down);
    assert_eq!(
        c.replica.state().nodes[other].state,
        NodeState::Ready,
        "heartbeats keep a node up"
    );
    assert_eq!(
        c.job_state(id),
        JobState::Running,
        "not moved while its lease may hold"
    );
    // A heartbeat of the down incarnation renews nothing.
    assert!(matches!(
        c.heartbeat(&first, 1, 99),
        ServerMsg::Fenced { .. }
    ));
    keep_alive(&mut c, lease.requeue_after_ms() - lease.down_after_ms + 500);
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.attempts[0].state, AttemptState::Lost);
    assert_eq!(job.retries_used, 0, "a lost attempt spends no retry");
    assert_eq!(job.attempts[1].node, other, "placed on the live node");
    c.check();
}

#[test]
fn a_report_is_acknowledged_once_it_is_applied() {
    let mut c = Cluster::new();
    c.heartbeat("w1", 3, 1);
    let id = c.submit(spec(500, 10));
    c.to_agents.clear();
    c.report(RunnerReport::Finished {
        job: id,
        attempt: 1,
        outcome: Outcome::Exited,
        exit_code: Some(0),
    });
    assert_eq!(c.job_state(id), JobState::Succeeded);
    assert!(c.to_agents.iter().any(|(n, inc, m)| n == "w1"
        && *inc == 3
        && matches!(m, ServerMsg::ReportAck { job, attempt: 1, .. } if *job == id)));
    c.check();
}

#[test]
fn a_job_lost_too_many_times_fails_and_says_why() {
    use rustci_core::state::LOST_ATTEMPTS_MAX;
    let mut c = Cluster::new();
    c.add_node("n1", 1000, 100, &[]);
    let id = c.submit(spec(500, 10));
    for incarnation in 2..=(LOST_ATTEMPTS_MAX as u64 + 1) {
        assert_ne!(
            c.job_state(id),
            JobState::Failed,
            "at incarnation {incarnation}"
        );
        c.command(Command::RegisterNode {
            name: "n1".into(),
            capacity: Resources::new(1000, 100),
            labels: BTreeMap::new(),
            incarnation,
            predecessor: Some(incarnation - 1),
        })
        .unwrap();
    }
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts.len(), LOST_ATTEMPTS_MAX);
    assert_eq!(job.retries_used, 0, "lost attempts spend no retry");
    let reason = State::failure_reason(job).unwrap();
    assert!(reason.contains("lost 10 times"), "{reason}");
    c.check();
}

#[test]
fn a_new_incarnation_that_does_not_vouch_for_the_old_one_waits_out_its_lease() {
    let mut c = Cluster::new();
    c.heartbeat("w1", 1, 1);
    let id = c.submit(spec(500, 10));
    c.report(RunnerReport::Started {
        job: id,
        attempt: 1,
    });
    // Another process claims the node with a newer incarnation, without
    // vouching that incarnation 1's work is dead (it may still run it).
    c.heartbeat("w1", 2, 1);
    assert_eq!(c.replica.state().nodes["w1"].incarnation, 2);
    assert_eq!(c.job_state(id), JobState::Running, "not requeued at once");
    match c.heartbeat("w1", 2, 2) {
        ServerMsg::Lease { active, .. } => assert!(active.is_empty(), "not handed to the newcomer"),
        other => panic!("{other:?}"),
    }
    let requeue_after = LeaseConfig::default().requeue_after_ms();
    let mut seq = 3;
    let mut waited = 0;
    while waited + 500 < requeue_after {
        c.wait(500);
        waited += 500;
        c.heartbeat("w1", 2, seq);
        seq += 1;
    }
    assert_eq!(
        c.job_state(id),
        JobState::Running,
        "still within the old lease"
    );
    c.wait(600);
    let job = c.replica.state().job(id).unwrap();
    assert_eq!(job.attempts[0].state, AttemptState::Lost);
    assert_eq!(
        job.attempts.len(),
        2,
        "placed again, on the new incarnation"
    );
    assert_eq!(job.attempts[1].incarnation, 2);
    c.check();
}

fn prio(cpu: u64, mem: u64, priority: u8) -> JobSpec {
    JobSpec {
        priority,
        ..spec(cpu, mem)
    }
}

/// A cancel frees nothing, so it once asked for no pass; but a queued job's
/// cancel releases the node reserved for it, and the jobs it held back must
/// be placed then (found by `rustci sim`, seed 904 of the workload before
/// starvation seeds: `placement_progress`).
#[test]
fn cancelling_the_job_a_node_is_reserved_for_lets_the_jobs_behind_it_in() {
    let mut c = Cluster::new();
    c.add_node("n1", 2000, 1000, &[]);
    let running = c.submit(spec(1000, 100));
    let big = c.submit(prio(2000, 100, 90));
    let small = c.submit(prio(500, 100, 10));
    assert_eq!(c.starts().len(), 1, "n1 is held for the big job");
    assert_eq!(c.starts()[0].0, running);
    let reason = c.replica.state().job(small).unwrap().clone();
    let reason = rustci_core::scheduler::unplaced_reason(c.replica.state(), &reason).unwrap();
    assert!(reason.contains("reserved for job 2"), "{reason}");
    c.command(Command::Cancel { job: big }).unwrap();
    assert_eq!(c.starts().last().unwrap().0, small);
    c.check();
}

/// A pass over new submissions alone must not move the reservation under
/// older jobs: here a new urgent job takes room on the node held for the
/// big one, the big one is better off holding the other node, and the small
/// job it held back now fits the first: a full pass must follow and place
/// it.
#[test]
fn a_reservation_moved_by_a_new_job_is_followed_by_a_full_pass() {
    let mut c = Cluster::new();
    c.add_node("n1", 4000, 1000, &[]);
    c.add_node("n2", 4000, 4000, &[]);
    c.submit(spec(3000, 100));
    c.submit(spec(2000, 100));
    assert_eq!(
        c.starts().iter().map(|s| s.2.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    c.submit(prio(4000, 100, 90));
    let held = rustci_core::scheduler::reservation(c.replica.state()).unwrap();
    assert_eq!(held.node, "n2", "2 cores short there, 3 on n1");
    let small = c.submit(prio(500, 2000, 10));
    assert_eq!(c.job_state(small), JobState::Queued, "fits only n2, held");
    let urgent = c.submit(prio(1200, 100, 95));
    assert_eq!(c.job_state(urgent), JobState::Assigned);
    let held = rustci_core::scheduler::reservation(c.replica.state()).unwrap();
    assert_eq!(held.node, "n1", "now 3.2 cores short on n2");
    assert_eq!(
        c.job_state(small),
        JobState::Assigned,
        "n2 is free to take it"
    );
    assert_eq!(c.starts().last().unwrap(), &(small, 1, "n2".to_string()));
    c.check();
}

/// A single replica confirms a read at once, and the state it is served
/// from already holds every acknowledged write; a stopped one refuses.
#[test]
fn a_linearizable_read_sees_every_acknowledged_write() {
    let mut c = Cluster::new();
    let req = c.next_request;
    c.next_request += 1;
    c.replica.propose(
        c.now,
        req,
        Command::Submit {
            spec: spec(100, 64),
            idempotency_key: None,
        },
    );
    c.drive();
    assert!(matches!(c.replies.get(&req), Some(Ok(Reply::Job(_)))));
    c.replica.read(c.now, 100);
    c.drive();
    assert_eq!(c.reads, vec![(100, Ok(()))]);
    assert_eq!(c.replica.state().jobs.len(), 1);
    c.replica.stop();
    c.replica.read(c.now, 101);
    c.drive();
    assert!(matches!(
        c.reads[1],
        (101, Err(CommandError::NotLeader { .. }))
    ));
}

#[test]
fn the_cached_state_digest_follows_every_applied_entry() {
    let mut c = Cluster::new();
    c.add_node("local", 2000, 1000, &[]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let cached = c.replica.state_digest();
        assert_eq!(cached, c.replica.state().digest());
        // Asked again at the same index: the same answer.
        assert_eq!(c.replica.state_digest(), cached);
        seen.push(cached);
        c.submit(spec(100, 10));
    }
    assert_eq!(c.replica.state_digest(), c.replica.state().digest());
    seen.dedup();
    assert_eq!(
        seen.len(),
        3,
        "each submission changes the digest: {seen:?}"
    );
}
