//! rustci-sim: the deterministic simulator of the RustCI control plane.
//!
//! It drives the very [`rustci_core::replica::Replica`] the production
//! driver runs, on one thread, in virtual time (ms), with one
//! `ChaCha8Rng` seeded from the seed for every random choice. It never reads
//! a clock, spawns a thread or iterates a `HashMap`: a seed always replays
//! the same run, and [`SimReport::trace_hash`] proves it.
//!
//! A run: draw the seed's fault plan (swarm testing), run a fault phase
//! (network delay, loss, duplication, reordering, partitions; disk fsync
//! delays and crashes that lose unsynced writes; clock offsets, drift, jumps
//! and pauses; replica and node crashes), heal, then a liveness phase that
//! must converge within [`SimOptions::liveness_ms_max`]. Checkers run after
//! every step; see `docs/simulation.md` for the list and the bounds.
//!
//! The CLI (`rustci sim`) calls [`header`], [`run_seed`], [`run_seeds`] and
//! [`check_determinism`]. Wall time is the caller's: [`run_seeds`] takes a
//! function that reads it, so nothing here touches a real clock.

pub mod checker;
mod nodes;
pub mod plan;
mod world;

use std::fmt;
use std::ops::Range;

pub use checker::{inv, Violation};
pub use plan::FaultPlan;

/// A bug planted in core, for proving the checkers bite. Selecting one needs
/// the `sim-bugs` feature; without it [`run_seed`] refuses the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlantedBug(pub Bug);

pub use rustci_core::bugs::Bug;

impl PlantedBug {
    pub const ALL: [PlantedBug; Bug::ALL.len()] = {
        let mut all = [PlantedBug(Bug::SchedulerSkipsCapacity); Bug::ALL.len()];
        let mut i = 0;
        while i < all.len() {
            all[i] = PlantedBug(Bug::ALL[i]);
            i += 1;
        }
        all
    };

    /// The name used on the command line (`--bug NAME`).
    pub fn name(self) -> &'static str {
        self.info().0
    }

    /// The replicas a run needs for the bug to matter: Raft's bugs need a
    /// cluster.
    pub fn replicas(self) -> usize {
        match self.0 {
            Bug::VoteWithoutPersist
            | Bug::AckWithoutQuorum
            | Bug::CommitEarlierTermByCount
            | Bug::ReadFromFollower => 3,
            _ => 1,
        }
    }

    /// False for a bug the sweep does not catch yet (within 1,000 seeds);
    /// the sweep test skips it. Every planted bug is caught now.
    pub fn caught_yet(self) -> bool {
        true
    }

    /// The invariants expected to catch it first (the first is the one it
    /// was planted for; others are close cousins that may notice first).
    pub fn caught_by(self) -> &'static [&'static str] {
        self.info().1
    }

    fn info(self) -> (&'static str, &'static [&'static str]) {
        use inv::*;
        match self.0 {
            Bug::SchedulerSkipsCapacity => ("skip-capacity-check", &[CAPACITY]),
            Bug::StaleResultApplied => (
                "apply-stale-result",
                &[FENCING, RESULT_ONCE, CAPACITY, CONSISTENCY],
            ),
            Bug::AckBeforeDurable => (
                "ack-before-durable",
                &[ACKED_DURABLE, LIVE_RESULTS, LINEARIZABLE_READS],
            ),
            Bug::FitIgnoresMemory => ("fit-ignores-memory", &[CAPACITY]),
            Bug::ConstraintAnyMatch => ("constraint-any-match", &[CAPACITY]),
            Bug::QueueLifo => ("queue-lifo", &[PRIORITY]),
            Bug::PriorityInverted => ("priority-inverted", &[PRIORITY, PROGRESS]),
            Bug::RetryOneTooMany => ("retry-one-too-many", &[RETRY_BUDGET]),
            Bug::RetryOneTooFew => ("retry-one-too-few", &[RETRY_BUDGET]),
            Bug::LostSpendsRetry => ("lost-spends-retry", &[RETRY_BUDGET]),
            Bug::RestartNotNoticed => ("restart-not-noticed", &[INCARNATION]),
            Bug::TruncatedPassForgotten => ("truncated-pass-forgotten", &[PROGRESS, PRIORITY]),
            Bug::UnplaceableBlocksScan => ("unplaceable-blocks-scan", &[PROGRESS]),
            Bug::RejoinNeedsNoPass => ("rejoin-needs-no-pass", &[PROGRESS, PRIORITY]),
            Bug::LostRequeuesCancelled => ("lost-requeues-cancelled", &[TERMINAL, CANCEL]),
            Bug::DrainIgnored => ("drain-ignored", &[DRAIN]),
            Bug::IdempotencyKeyForgotten => ("idempotency-key-forgotten", &[IDEMPOTENCY]),
            Bug::LoosestFit => ("loosest-fit", &[TIGHTEST_FIT]),
            Bug::StampFollowsClock => ("stamp-follows-clock", &[TIMESTAMPS]),
            Bug::OwnedReplayDropsKey => (
                "owned-replay-drops-key",
                &[REPLAY, IDEMPOTENCY, ACKED_DURABLE],
            ),
            Bug::RequeueBeforeLeaseLapses => ("requeue-before-lease-lapses", &[EXCLUSIVE]),
            Bug::ReportAppendedTwice => ("report-appended-twice", &[RESULT_ONCE]),
            Bug::VoteWithoutPersist => (
                "vote-without-persist",
                &[
                    ELECTION_SAFETY,
                    STATE_MACHINE_SAFETY,
                    ACKED_DURABLE,
                    TERMINAL,
                ],
            ),
            Bug::AckWithoutQuorum => (
                "ack-without-quorum",
                &[STATE_MACHINE_SAFETY, ACKED_DURABLE, TERMINAL],
            ),
            Bug::CommitEarlierTermByCount => (
                "commit-earlier-term-by-count",
                &[
                    COMMIT_CURRENT_TERM,
                    STATE_MACHINE_SAFETY,
                    ACKED_DURABLE,
                    TERMINAL,
                ],
            ),
            Bug::ReadFromFollower => ("read-from-follower", &[LINEARIZABLE_READS]),
            Bug::BackfillIgnoresReservation => {
                ("backfill-ignores-reservation", &[RESERVATION, STARVATION])
            }
        }
    }

    pub fn parse(s: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// True when this build can plant bugs (the `sim-bugs` feature).
pub const PLANTED_BUGS_AVAILABLE: bool = cfg!(feature = "sim-bugs");

/// One run's settings. Everything but `seed` has a default the repro line
/// leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOptions {
    pub seed: u64,
    /// Control-plane replicas: 1, 3 or 5.
    pub replicas: usize,
    /// Simulated length of the fault phase.
    pub fault_phase_ms: u64,
    /// Bound on the liveness phase: after healing, everything must converge
    /// within this much simulated time.
    pub liveness_ms_max: u64,
    /// Clock drift bound (parts per million); clocks drift within it.
    pub drift_ppm_max: u64,
    /// A planted fault, not a bug: every agent's clock runs this many ppm
    /// slow, past the bound the control plane assumes (0: off).
    pub drift_fault_ppm: u64,
    /// Submissions per run, at most.
    pub jobs_max: u64,
    /// Least simulated time between two replay-equality checks.
    pub replay_check_interval_ms: u64,
    pub planted_bug: Option<PlantedBug>,
    /// Entries between two snapshots of a replica's state (0: the log is
    /// never compacted); `None` draws it from the seed.
    pub snapshot_entries: Option<u64>,
    /// Whether an operator replaces a replica (crashed, its disk lost) in
    /// the fault phase of a cluster run; `None` draws it from the seed
    /// (40% of multi-replica seeds).
    pub replace_replica: Option<bool>,
    /// Events kept for a failure's trace tail (0: none, fastest).
    pub trace_tail: usize,
    /// A run of more steps than this fails as a runaway.
    pub steps_max: u64,
}

pub const FAULT_PHASE_MS_DEFAULT: u64 = 60_000;
/// A single small node running 200 long jobs through partitions and lease
/// lapses can take 400 s to drain its queue after healing (seed 7727); the
/// bound is about converging at all, `placement_progress` about promptness.
pub const LIVENESS_MS_MAX_DEFAULT: u64 = 600_000;
pub const DRIFT_PPM_MAX_DEFAULT: u64 = 200;
pub const JOBS_MAX_DEFAULT: u64 = 200;
pub const REPLAY_CHECK_INTERVAL_MS_DEFAULT: u64 = 5_000;
/// Lines of trace kept for a failure report.
pub const TRACE_TAIL_DEFAULT: usize = 40;

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            replicas: 1,
            fault_phase_ms: FAULT_PHASE_MS_DEFAULT,
            liveness_ms_max: LIVENESS_MS_MAX_DEFAULT,
            drift_ppm_max: DRIFT_PPM_MAX_DEFAULT,
            drift_fault_ppm: 0,
            jobs_max: JOBS_MAX_DEFAULT,
            replay_check_interval_ms: REPLAY_CHECK_INTERVAL_MS_DEFAULT,
            planted_bug: None,
            snapshot_entries: None,
            steps_max: world::STEPS_MAX,
            replace_replica: None,
            trace_tail: 0,
        }
    }

    /// The command line that reproduces this run.
    pub fn repro(&self) -> String {
        let d = SimOptions::new(self.seed);
        let mut s = format!("rustci sim --seed {}", self.seed);
        if self.replicas != d.replicas {
            s += &format!(" --replicas {}", self.replicas);
        }
        if self.fault_phase_ms != d.fault_phase_ms {
            s += &format!(" --fault-ms {}", self.fault_phase_ms);
        }
        if self.liveness_ms_max != d.liveness_ms_max {
            s += &format!(" --liveness-ms-max {}", self.liveness_ms_max);
        }
        if self.drift_ppm_max != d.drift_ppm_max {
            s += &format!(" --drift-ppm-max {}", self.drift_ppm_max);
        }
        if self.drift_fault_ppm != d.drift_fault_ppm {
            s += &format!(" --drift-fault-ppm {}", self.drift_fault_ppm);
        }
        if self.jobs_max != d.jobs_max {
            s += &format!(" --jobs-max {}", self.jobs_max);
        }
        if let Some(n) = self.snapshot_entries {
            s += &format!(" --snapshot-entries {n}");
        }
        if let Some(b) = self.replace_replica {
            s += &format!(" --replace-replica {b}");
        }
        if self.replay_check_interval_ms != d.replay_check_interval_ms {
            s += &format!(" --replay-check-ms {}", self.replay_check_interval_ms);
        }
        if let Some(bug) = self.planted_bug {
            s += &format!(" --bug {}", bug.name());
        }
        s
    }
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The invariant's name, one of [`inv`].
    pub invariant: &'static str,
    pub detail: String,
    /// The step (event number) at which it failed.
    pub step: u64,
    /// Simulated time of the failure.
    pub time_ms: u64,
    /// The last events before the failure.
    pub trace_tail: Vec<String>,
    /// `rustci sim --seed S ...`
    pub repro: String,
}

/// The outcome of one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    pub seed: u64,
    pub passed: bool,
    pub failure: Option<Failure>,
    pub simulated_ms: u64,
    pub steps: u64,
    /// Hash of every event and every proposed entry: equal for equal runs.
    pub trace_hash: u64,
    /// The fault plan, as printed by [`header`].
    pub fault_plan: String,
    pub stats: Stats,
}

pub use world::Stats;

/// `SEED=<s>` and the fault plan: what a run prints before anything else.
pub fn header(opts: &SimOptions) -> String {
    let mut rng = plan::SimRng::new(opts.seed);
    let plan = FaultPlan::draw(&mut rng, opts.drift_ppm_max);
    let bug = opts
        .planted_bug
        .map(|b| format!("\nPLANTED_BUG={}", b.name()))
        .unwrap_or_default();
    format!("SEED={}\nFAULT_PLAN {plan}{bug}", opts.seed)
}

/// Runs one seed to the end (or its first failure).
pub fn run_seed(opts: &SimOptions) -> SimReport {
    let report = run_once(opts);
    match &report.failure {
        // Re-run with a trace buffer to give the failure its tail: the run is
        // deterministic, so the second one fails the same way.
        Some(f) if f.trace_tail.is_empty() && opts.trace_tail == 0 => {
            let traced = run_once(&SimOptions {
                trace_tail: TRACE_TAIL_DEFAULT,
                ..opts.clone()
            });
            debug_assert_eq!(traced.trace_hash, report.trace_hash);
            SimReport {
                failure: traced.failure,
                ..report
            }
        }
        _ => report,
    }
}

fn run_once(opts: &SimOptions) -> SimReport {
    let mut world = world::World::new(opts);
    let fault_plan = world.plan.to_string();
    if opts.planted_bug.is_some() && !PLANTED_BUGS_AVAILABLE {
        world.failure = Some(Violation {
            invariant: "planted_bug_unavailable",
            detail: "this build lacks the sim-bugs feature".into(),
        });
    } else {
        world.run();
    }
    let failure = world.failure.take().map(|v| Failure {
        invariant: v.invariant,
        detail: v.detail,
        step: world.steps,
        time_ms: world.now,
        trace_tail: world.tail.iter().cloned().collect(),
        repro: opts.repro(),
    });
    SimReport {
        seed: opts.seed,
        passed: failure.is_none(),
        failure,
        simulated_ms: world.now,
        steps: world.steps,
        trace_hash: world.trace_hash(),
        fault_plan,
        stats: world.stats.clone(),
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            None => write!(
                f,
                "PASS seed={} simulated_ms={} steps={} jobs={} trace_hash={:016x}",
                self.seed, self.simulated_ms, self.steps, self.stats.jobs, self.trace_hash
            ),
            Some(fl) => {
                writeln!(
                    f,
                    "FAIL seed={} invariant={} step={} time_ms={}",
                    self.seed, fl.invariant, fl.step, fl.time_ms
                )?;
                writeln!(f, "  {}", fl.detail)?;
                for line in &fl.trace_tail {
                    writeln!(f, "  | {line}")?;
                }
                write!(f, "repro: {}", fl.repro)
            }
        }
    }
}

/// A sweep over many seeds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub seeds: u64,
    pub passed: u64,
    /// (seed, invariant, repro) of every failing seed.
    pub failures: Vec<(u64, &'static str, String)>,
    pub simulated_ms: u64,
    pub steps: u64,
    /// Seeds in which an operator replaced a replica ([`Stats::replacements`]).
    pub replacements: u64,
    /// Linearizable reads served (and checked) over all seeds
    /// ([`Stats::reads_served`]).
    pub reads_served: u64,
    /// Wall time of the sweep as the caller measured it.
    pub wall_secs: f64,
}

impl Summary {
    /// Simulated seconds per wall second.
    pub fn speed(&self) -> f64 {
        if self.wall_secs > 0.0 {
            self.simulated_ms as f64 / 1000.0 / self.wall_secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seeds={} passed={} failed={} simulated_s={:.1} steps={} wall_s={:.2} speed={:.0} simulated s per wall s seeds_per_s={:.1}",
            self.seeds,
            self.passed,
            self.failures.len(),
            self.simulated_ms as f64 / 1000.0,
            self.steps,
            self.wall_secs,
            self.speed(),
            if self.wall_secs > 0.0 { self.seeds as f64 / self.wall_secs } else { 0.0 },
        )?;
        if self.replacements > 0 {
            writeln!(f, "replicas_replaced_in={} seeds", self.replacements)?;
        }
        if self.reads_served > 0 {
            writeln!(f, "reads_served={}", self.reads_served)?;
        }
        for (seed, invariant, repro) in &self.failures {
            writeln!(f, "FAIL seed={seed} invariant={invariant} repro: {repro}")?;
        }
        Ok(())
    }
}

/// Runs every seed of `seeds` with `base`'s other options. `wall_secs`
/// reads the caller's clock (seconds since any origin); `on_report` sees
/// each seed's report as it finishes (to print failures at once).
pub fn run_seeds(
    seeds: Range<u64>,
    base: &SimOptions,
    wall_secs: &mut dyn FnMut() -> f64,
    on_report: &mut dyn FnMut(&SimReport),
) -> Summary {
    let start = wall_secs();
    let mut summary = Summary::default();
    for seed in seeds {
        let report = run_seed(&SimOptions {
            seed,
            ..base.clone()
        });
        summary.seeds += 1;
        summary.simulated_ms += report.simulated_ms;
        summary.steps += report.steps;
        summary.replacements += u64::from(report.stats.replacements > 0);
        summary.reads_served += report.stats.reads_served;
        match &report.failure {
            None => summary.passed += 1,
            Some(f) => summary.failures.push((seed, f.invariant, f.repro.clone())),
        }
        on_report(&report);
    }
    summary.wall_secs = wall_secs() - start;
    summary
}

/// Runs `seed` twice and compares trace hashes.
pub fn check_determinism(seed: u64) -> Result<u64, String> {
    check_determinism_with(&SimOptions::new(seed))
}

pub fn check_determinism_with(opts: &SimOptions) -> Result<u64, String> {
    let a = run_once(opts);
    let b = run_once(opts);
    if a.trace_hash == b.trace_hash && a.steps == b.steps && a.simulated_ms == b.simulated_ms {
        Ok(a.trace_hash)
    } else {
        Err(format!(
            "seed {}: trace hashes differ: {:016x} ({} steps) vs {:016x} ({} steps)",
            opts.seed, a.trace_hash, a.steps, b.trace_hash, b.steps
        ))
    }
}
