//! Each checker bites: fed a crafted violating history, it names its
//! invariant; fed the matching valid history, it passes.

use std::collections::BTreeMap;

use rustci_core::event::{Entry, Event};
use rustci_core::model::{AttemptState, JobId, JobSpec, JobState, Outcome, Resources};
use rustci_core::replica::Lifecycle;
use rustci_core::state::State;
use rustci_sim::checker::{inv, Checker};

fn spec(name: &str, cpu: u64, priority: u8) -> JobSpec {
    JobSpec {
        name: name.into(),
        command: vec!["true".into()],
        env: BTreeMap::new(),
        resources: Resources::new(cpu, 10),
        constraints: BTreeMap::new(),
        priority,
        timeout_secs: 60,
        max_retries: 0,
    }
}

/// A tiny scenario language: entries get consecutive indexes.
#[derive(Clone)]
struct History {
    entries: Vec<Entry>,
}

impl History {
    fn new() -> History {
        History {
            entries: Vec::new(),
        }
    }
    fn then(mut self, event: Event) -> History {
        let index = self.entries.len() as u64 + 1;
        self.entries.push(Entry {
            index,
            term: 1,
            at: 1000 + index,
            event,
        });
        self
    }
    fn node(self, name: &str, cpu: u64) -> History {
        self.then(Event::NodeRegistered {
            name: name.into(),
            capacity: Resources::new(cpu, 1000),
            labels: BTreeMap::new(),
            incarnation: 1,
        })
    }
    fn submit(self, name: &str, cpu: u64, priority: u8) -> History {
        self.then(Event::JobSubmitted {
            spec: spec(name, cpu, priority),
            idempotency_key: Some(name.into()),
        })
    }
    fn assign(self, job: u64, attempt: u32, node: &str) -> History {
        self.then(Event::AttemptAssigned {
            job: JobId(job),
            attempt,
            node: node.into(),
        })
    }
    fn finish(self, job: u64, attempt: u32, exit_code: i32) -> History {
        self.then(Event::AttemptFinished {
            job: JobId(job),
            attempt,
            outcome: Outcome::Exited,
            exit_code: Some(exit_code),
        })
    }
    fn state(&self) -> State {
        State::replay(&self.entries)
    }
}

fn invariant(r: Result<(), rustci_sim::Violation>) -> &'static str {
    r.err().map_or("ok", |v| v.invariant)
}

#[test]
fn checker_acked_submission_must_survive() {
    let h = History::new().submit("a", 100, 50);
    let mut c = Checker::new();
    let job = h.state().job(JobId(1)).unwrap().clone();
    c.client_acked(Some("a"), &job).unwrap();
    assert_eq!(invariant(c.acked_present(&h.state())), "ok");
    assert_eq!(
        invariant(c.acked_present(&State::new())),
        inv::ACKED_DURABLE
    );
    // The id was reused by another submission: still lost.
    let other = History::new().submit("b", 100, 50).state();
    assert_eq!(invariant(c.acked_present(&other)), inv::ACKED_DURABLE);
}

#[test]
fn checker_one_idempotency_key_one_job() {
    let state = History::new()
        .submit("a", 100, 50)
        .submit("b", 100, 50)
        .state();
    let mut c = Checker::new();
    c.client_acked(Some("k"), state.job(JobId(1)).unwrap())
        .unwrap();
    let second = c.client_acked(Some("k"), state.job(JobId(2)).unwrap());
    assert_eq!(invariant(second), inv::IDEMPOTENCY);
    // Two jobs carrying one key in the state.
    let mut dup = state.clone();
    for job in dup.jobs.values_mut() {
        job.idempotency_key = Some("same".into());
    }
    assert_eq!(invariant(Checker::new().new_jobs(&dup)), inv::IDEMPOTENCY);
    assert_eq!(invariant(Checker::new().new_jobs(&state)), "ok");
}

#[test]
fn checker_no_two_attempts_execute_at_once() {
    let mut c = Checker::new();
    let cap = Resources::new(4000, 4000);
    let one = Resources::new(1000, 10);
    c.exec_start(JobId(1), 1, "n1", one, cap).unwrap();
    let r = c.exec_start(JobId(1), 2, "n2", one, cap);
    assert_eq!(invariant(r), inv::EXCLUSIVE);
    let mut c = Checker::new();
    c.exec_start(JobId(1), 1, "n1", one, cap).unwrap();
    c.exec_end(JobId(1), 1);
    assert_eq!(invariant(c.exec_start(JobId(1), 2, "n2", one, cap)), "ok");
}

#[test]
fn checker_capacity_and_constraints() {
    let mut c = Checker::new();
    let r = c.exec_start(
        JobId(1),
        1,
        "n1",
        Resources::new(5000, 10),
        Resources::new(4000, 4000),
    );
    assert_eq!(invariant(r), inv::CAPACITY);
    // A placement proposed onto a node without room.
    let h = History::new().node("n1", 1000).submit("big", 2000, 50);
    let proposals = h.clone().assign(1, 1, "n1");
    let r = c.placements(&h.state(), &proposals.entries[2..]);
    assert_eq!(invariant(r), inv::CAPACITY);
    // A placement that violates the job's constraints.
    let mut s = spec("gpu", 100, 50);
    s.constraints.insert("gpu".into(), "yes".into());
    let h = History::new().node("n1", 1000).then(Event::JobSubmitted {
        spec: s,
        idempotency_key: None,
    });
    let p = h.clone().assign(1, 1, "n1");
    let r = c.placements(&h.state(), &p.entries[2..]);
    assert_eq!(invariant(r), inv::CAPACITY);
    // And a start commanded while the node is overcommitted.
    let mut over = History::new()
        .node("n1", 1000)
        .submit("a", 500, 50)
        .assign(1, 1, "n1")
        .state();
    assert_eq!(invariant(c.runner_start(&over, JobId(1), "n1")), "ok");
    over.nodes.get_mut("n1").unwrap().allocated = Resources::new(1500, 10);
    let r = c.runner_start(&over, JobId(1), "n1");
    assert_eq!(invariant(r), inv::CAPACITY);
}

#[test]
fn checker_higher_priority_is_placed_first() {
    let h = History::new()
        .node("n1", 1000)
        .submit("low", 500, 10)
        .submit("high", 500, 90);
    let state = h.state();
    let c = Checker::new();
    let low_first = History::new().assign(1, 1, "n1");
    let r = c.placements(&state, &low_first.entries);
    assert_eq!(invariant(r), inv::PRIORITY);
    // High first, then low: fine.
    let ok = History::new().assign(2, 1, "n1").assign(1, 1, "n1");
    assert_eq!(invariant(c.placements(&state, &ok.entries)), "ok");
    // High too big to fit: backfilling the low one is fine.
    let big = History::new()
        .node("n1", 1000)
        .submit("low", 500, 10)
        .submit("high", 2000, 90);
    let r = c.placements(&big.state(), &low_first.entries);
    assert_eq!(invariant(r), "ok");
}

#[test]
fn checker_terminal_jobs_stay_terminal() {
    let done = History::new()
        .node("n1", 1000)
        .submit("a", 500, 50)
        .assign(1, 1, "n1")
        .finish(1, 1, 0);
    let state = done.state();
    assert_eq!(state.job(JobId(1)).unwrap().state, JobState::Succeeded);
    let mut c = Checker::new();
    let pre = Checker::pre_apply(&state, &done.entries);
    assert_eq!(invariant(c.applied(&pre, &[], &state)), "ok");
    let mut reverted = state.clone();
    reverted.jobs.get_mut(&JobId(1)).unwrap().state = JobState::Queued;
    assert_eq!(invariant(c.applied(&pre, &[], &reverted)), inv::TERMINAL);
    // Also across a restart, from what was seen before it.
    assert_eq!(invariant(c.terminal_survives(&state)), "ok");
    assert_eq!(invariant(c.terminal_survives(&reverted)), inv::TERMINAL);
}

#[test]
fn checker_stale_attempt_results_change_nothing() {
    // Attempt 1 failed and the job was retried as attempt 2.
    let mut s = spec("a", 500, 50);
    s.max_retries = 1;
    let h = History::new()
        .node("n1", 1000)
        .then(Event::JobSubmitted {
            spec: s,
            idempotency_key: None,
        })
        .assign(1, 1, "n1")
        .finish(1, 1, 3)
        .assign(1, 2, "n1");
    let state = h.state();
    let late = History::new().finish(1, 1, 0);
    let pre = Checker::pre_apply(&state, &late.entries);
    let mut c = Checker::new();
    // The real reducer fences it: nothing changes.
    let mut fenced = state.clone();
    fenced.apply(&late.entries[0]);
    assert_eq!(invariant(c.applied(&pre, &late.entries, &fenced)), "ok");
    // A reducer that applied it rewrote the stale attempt.
    let mut applied = state.clone();
    let a1 = &mut applied.jobs.get_mut(&JobId(1)).unwrap().attempts[0];
    a1.state = AttemptState::Succeeded;
    a1.exit_code = Some(0);
    let r = c.applied(&pre, &late.entries, &applied);
    assert_eq!(invariant(r), inv::FENCING);
}

#[test]
fn checker_node_down_only_if_disturbed() {
    let h = History::new()
        .node("n1", 1000)
        .then(Event::NodeDown { name: "n1".into() });
    let state = h.state();
    let mut c = Checker::new();
    let pre = Checker::pre_apply(&state, &h.entries);
    let r = c.applied(&pre, &h.entries, &state);
    assert_eq!(invariant(r), inv::NODE_DOWN);
    c.disturbed.insert("n1".into());
    assert_eq!(invariant(c.applied(&pre, &h.entries, &state)), "ok");
}

#[test]
fn checker_replay_consistency_and_timestamps() {
    let h = History::new()
        .node("n1", 1000)
        .submit("a", 500, 50)
        .assign(1, 1, "n1");
    let live = h.state();
    assert_eq!(invariant(Checker::replay(&h.entries, &live)), "ok");
    let r = Checker::replay(&h.entries[..2], &live);
    assert_eq!(invariant(r), inv::REPLAY);
    assert_eq!(invariant(Checker::consistency(&live)), "ok");
    let mut broken = live.clone();
    broken.nodes.get_mut("n1").unwrap().allocated = Resources::default();
    assert_eq!(invariant(Checker::consistency(&broken)), inv::CONSISTENCY);
    let mut c = Checker::new();
    assert_eq!(invariant(c.proposed(&h.entries)), "ok");
    let mut back = h.entries.clone();
    back[2].at = 1;
    assert_eq!(invariant(Checker::new().proposed(&back)), inv::TIMESTAMPS);
}

#[test]
fn checker_liveness_after_healing() {
    let running = Some(Lifecycle::Running);
    assert_eq!(invariant(Checker::live_leader(running)), "ok");
    assert_eq!(invariant(Checker::live_leader(None)), inv::LIVE_LEADER);
    let starting = Some(Lifecycle::Starting);
    assert_eq!(invariant(Checker::live_leader(starting)), inv::LIVE_LEADER);
    // A queued job that a ready node could run has not converged...
    let stuck = History::new().node("n1", 1000).submit("a", 500, 50);
    assert_eq!(
        invariant(Checker::live_jobs(&stuck.state())),
        inv::LIVE_JOBS
    );
    // ...but one that no node could ever run is excluded.
    let never = History::new().node("n1", 1000).submit("a", 5000, 50);
    assert_eq!(invariant(Checker::live_jobs(&never.state())), "ok");
    let state = stuck.assign(1, 1, "n1").finish(1, 1, 2).state();
    let ran = [(JobId(1), 1, AttemptState::Failed)];
    assert_eq!(invariant(Checker::live_results(&state, &ran)), "ok");
    let claimed = [(JobId(1), 1, AttemptState::Succeeded)];
    let r = Checker::live_results(&state, &claimed);
    assert_eq!(invariant(r), inv::LIVE_RESULTS);
}
