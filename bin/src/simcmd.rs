//! `rustci sim`: deterministic simulation runs from the command line. The
//! simulator itself (and every invariant) lives in `rustci-sim`; this only
//! parses options, reads the wall clock for the speed figure, and prints.

use std::ops::Range;
use std::time::Instant;

use anyhow::{anyhow, bail};
use clap::Args;
use rustci_sim::{check_determinism_with, header, run_seed, run_seeds, PlantedBug, SimOptions};

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Run one seed and print its fault plan, report and statistics.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run a range of seeds, A..B (B excluded).
    #[arg(long)]
    pub seeds: Option<String>,
    /// Run each seed twice and compare trace hashes.
    #[arg(long)]
    pub check_determinism: bool,
    /// Control-plane replicas: 1, 3 or 5.
    #[arg(long, default_value_t = 1, value_parser = parse_replicas)]
    pub replicas: usize,
    /// Simulated length of the fault phase (ms).
    #[arg(long = "fault-ms")]
    pub fault_ms: Option<u64>,
    /// Bound on convergence after healing (simulated ms).
    #[arg(long)]
    pub liveness_ms_max: Option<u64>,
    /// Clock drift bound in parts per million.
    #[arg(long)]
    pub drift_ppm_max: Option<u64>,
    /// A planted fault: every agent's clock runs this many parts per
    /// million slow, beyond the drift bound the control plane assumes (the
    /// lease arithmetic no longer holds; exclusive execution must be seen to
    /// break).
    #[arg(long)]
    pub drift_fault_ppm: Option<u64>,
    /// Submissions per run, at most.
    #[arg(long)]
    pub jobs_max: Option<u64>,
    /// Entries between two snapshots of a replica's state (0: logs are
    /// never compacted); by default each seed draws it (a third never
    /// compact, the rest every 8 to 400 entries).
    #[arg(long)]
    pub snapshot_entries: Option<u64>,
    /// With 3 or 5 replicas: whether an operator replaces a replica in the
    /// fault phase (crashes it, loses its disk, removes it, adds a new one:
    /// `true` or `false`); by default each seed draws it (40% do).
    #[arg(long)]
    pub replace_replica: Option<bool>,
    /// Least simulated time between replay-equality checks (ms).
    #[arg(long = "replay-check-ms")]
    pub replay_check_ms: Option<u64>,
    /// Plant a bug (needs a build with `--features sim-bugs`):
    /// see `docs/simulation.md` for the list.
    #[arg(long, env = "RUSTCI_SIM_BUG")]
    pub bug: Option<String>,
}

fn parse_replicas(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err(format!("a cluster has 1, 3 or 5 replicas, not {s:?}")),
    }
}

impl SimArgs {
    fn options(&self, seed: u64) -> anyhow::Result<SimOptions> {
        let mut o = SimOptions::new(seed);
        o.replicas = self.replicas;
        if let Some(v) = self.fault_ms {
            o.fault_phase_ms = v;
        }
        if let Some(v) = self.liveness_ms_max {
            o.liveness_ms_max = v;
        }
        if let Some(v) = self.drift_ppm_max {
            o.drift_ppm_max = v;
        }
        if let Some(v) = self.jobs_max {
            o.jobs_max = v;
        }
        o.snapshot_entries = self.snapshot_entries;
        o.replace_replica = self.replace_replica;
        if let Some(v) = self.drift_fault_ppm {
            anyhow::ensure!(v < 1_000_000, "--drift-fault-ppm must be below 1000000");
            o.drift_fault_ppm = v;
        }
        if let Some(v) = self.replay_check_ms {
            o.replay_check_interval_ms = v;
        }
        if let Some(name) = &self.bug {
            let names: Vec<&str> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
            o.planted_bug = Some(PlantedBug::parse(name).ok_or_else(|| {
                anyhow!("unknown planted bug {name:?}; known: {}", names.join(", "))
            })?);
        }
        Ok(o)
    }
}

pub fn parse_range(s: &str) -> anyhow::Result<Range<u64>> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| anyhow!("--seeds takes A..B, got {s:?}"))?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| anyhow!("bad seed {a:?}"))?,
        b.trim().parse().map_err(|_| anyhow!("bad seed {b:?}"))?,
    );
    if b <= a {
        bail!("--seeds A..B needs A < B, got {s}");
    }
    Ok(a..b)
}

pub fn run(args: SimArgs) -> anyhow::Result<i32> {
    match (&args.seed, &args.seeds) {
        (Some(seed), _) => run_one(&args, *seed),
        (None, Some(range)) => run_many(&args, parse_range(range)?),
        (None, None) => bail!("give --seed S or --seeds A..B"),
    }
}

fn run_one(args: &SimArgs, seed: u64) -> anyhow::Result<i32> {
    let opts = args.options(seed)?;
    println!("{}", header(&opts));
    if args.check_determinism {
        return Ok(match check_determinism_with(&opts) {
            Ok(hash) => {
                println!("deterministic: trace_hash={hash:016x} (two runs)");
                0
            }
            Err(e) => {
                println!("NOT DETERMINISTIC: {e}");
                1
            }
        });
    }
    let report = run_seed(&opts);
    println!("{report}");
    println!("{:?}", report.stats);
    Ok(if report.passed { 0 } else { 1 })
}

fn run_many(args: &SimArgs, seeds: Range<u64>) -> anyhow::Result<i32> {
    let base = args.options(seeds.start)?;
    // The contract's first line, `SEED=`, here naming the whole range; each
    // failing seed's report then carries its own `rustci sim --seed S` repro.
    println!("SEED={}..{}", seeds.start, seeds.end);
    let start = Instant::now();
    let mut wall = || start.elapsed().as_secs_f64();
    let mut nondeterministic = Vec::new();
    let summary = run_seeds(seeds.clone(), &base, &mut wall, &mut |r| {
        if !r.passed {
            println!("{r}");
        }
    });
    if args.check_determinism {
        for seed in seeds {
            if let Err(e) = check_determinism_with(&SimOptions {
                seed,
                ..base.clone()
            }) {
                println!("NOT DETERMINISTIC seed={seed}: {e}");
                nondeterministic.push(seed);
            }
        }
    }
    print!("{summary}");
    Ok(
        if summary.failures.is_empty() && nondeterministic.is_empty() {
            0
        } else {
            1
        },
    )
}

/// `rustci bench sim`: simulated seconds per wall second over a sweep.
pub fn bench(seeds: Range<u64>) -> anyhow::Result<()> {
    let base = SimOptions::new(seeds.start);
    let start = Instant::now();
    let mut wall = || start.elapsed().as_secs_f64();
    let summary = run_seeds(seeds.clone(), &base, &mut wall, &mut |_| {});
    if !summary.failures.is_empty() {
        bail!(
            "{} seeds failed: {:?}",
            summary.failures.len(),
            summary.failures
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "sim",
            "seeds": summary.seeds,
            "replicas": 1,
            "simulated_secs": (summary.simulated_ms as f64 / 1000.0).round(),
            "wall_secs": (summary.wall_secs * 1000.0).round() / 1000.0,
            "simulated_secs_per_wall_sec": summary.speed().round(),
            "seeds_per_sec": (summary.seeds as f64 / summary.wall_secs * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
