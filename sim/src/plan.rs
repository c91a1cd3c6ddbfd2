//! The seeded RNG and the per-seed fault plan (swarm testing).
//!
//! Each seed draws its own fault rates and workload mix first thing, from the
//! one RNG of the run, so the plan can be printed before anything runs and a
//! seed always means the same plan.

use std::fmt;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// The only source of randomness of a run.
pub struct SimRng(ChaCha8Rng);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(ChaCha8Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Exponentially distributed delay with the given mean (ms), at least 1.
    pub fn exp_ms(&mut self, mean_ms: f64) -> u64 {
        let u = self.unit().max(1e-12);
        ((-u.ln() * mean_ms) as u64).max(1)
    }
}

/// Every fault rate and workload knob of one seed. Rates are per message or
/// per simulated second, as named.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub nodes: usize,
    pub clients: usize,
    // network (replica <-> nodes and clients)
    pub net_delay_min_ms: u64,
    pub net_delay_max_ms: u64,
    pub net_loss: f64,
    pub net_duplicate: f64,
    pub net_reorder: f64,
    pub partitions_per_s: f64,
    pub partition_one_way: f64,
    // disk of the replica
    pub fsync_delay_max_ms: u64,
    pub unsynced_survives: f64,
    pub read_error: f64,
    // processes
    pub replica_crashes_per_s: f64,
    pub node_crashes_per_s: f64,
    pub pauses_per_s: f64,
    pub clock_jumps_per_s: f64,
    pub drift_ppm_max: u64,
    // workload
    /// Offered load as a share of the cluster's job slots; the submission
    /// rate follows from it (see `World::submit_mean_gap_ms`).
    pub load: f64,
    pub cancel_share: f64,
    pub drain_share: f64,
    pub no_key_share: f64,
    pub constraint_share: f64,
    pub priority_levels: u64,
    pub job_secs_max: u64,
    pub fail_share: f64,
    pub start_fail_share: f64,
    pub client_timeout_ms: u64,
}

impl FaultPlan {
    /// Draws the plan of a seed. `drift_ppm_max` is the configured bound the
    /// clocks stay within (the control plane's arithmetic assumes it).
    pub fn draw(rng: &mut SimRng, drift_ppm_max: u64) -> FaultPlan {
        let delay_min = rng.range(0, 20);
        FaultPlan {
            nodes: rng.range(1, 5) as usize,
            clients: rng.range(1, 4) as usize,
            net_delay_min_ms: delay_min,
            net_delay_max_ms: delay_min + rng.range(0, 200),
            net_loss: swarm(rng, 0.5, 0.2),
            net_duplicate: swarm(rng, 0.5, 0.1),
            net_reorder: swarm(rng, 0.5, 0.2),
            partitions_per_s: swarm(rng, 0.5, 0.2),
            partition_one_way: rng_frac(rng, 1.0),
            fsync_delay_max_ms: rng.range(1, 50),
            unsynced_survives: swarm(rng, 0.5, 0.8),
            read_error: swarm(rng, 0.3, 0.5),
            replica_crashes_per_s: swarm(rng, 0.6, 0.15),
            node_crashes_per_s: swarm(rng, 0.5, 0.1),
            pauses_per_s: swarm(rng, 0.4, 0.1),
            clock_jumps_per_s: swarm(rng, 0.4, 0.1),
            drift_ppm_max,
            load: 0.1 + rng_frac(rng, 1.0),
            cancel_share: swarm(rng, 0.6, 0.3),
            drain_share: swarm(rng, 0.3, 0.1),
            no_key_share: swarm(rng, 0.3, 0.3),
            constraint_share: swarm(rng, 0.5, 0.5),
            priority_levels: rng.range(1, 5),
            job_secs_max: rng.range(1, 10),
            fail_share: rng_frac(rng, 0.4),
            start_fail_share: swarm(rng, 0.3, 0.1),
            client_timeout_ms: rng.range(200, 3000),
        }
    }
}

/// A rate up to `max` with probability `p_on`, else 0: swarm testing
/// switches whole fault classes off for some seeds.
fn swarm(rng: &mut SimRng, p_on: f64, max: f64) -> f64 {
    let x = rng_frac(rng, max);
    if rng.chance(p_on) {
        x
    } else {
        0.0
    }
}

fn rng_frac(rng: &mut SimRng, max: f64) -> f64 {
    // Rounded to 4 places so the printed plan is the plan.
    (rng.unit() * max * 10_000.0).round() / 10_000.0
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nodes={} clients={} net_delay_ms={}..{} net_loss={} net_duplicate={} \
             net_reorder={} partitions_per_s={} partition_one_way={} \
             fsync_delay_max_ms={} unsynced_survives={} read_error={} \
             replica_crashes_per_s={} node_crashes_per_s={} pauses_per_s={} \
             clock_jumps_per_s={} drift_ppm_max={} load={} cancel_share={} \
             drain_share={} no_key_share={} constraint_share={} priority_levels={} \
             job_secs_max={} fail_share={} start_fail_share={} client_timeout_ms={}",
            self.nodes,
            self.clients,
            self.net_delay_min_ms,
            self.net_delay_max_ms,
            self.net_loss,
            self.net_duplicate,
            self.net_reorder,
            self.partitions_per_s,
            self.partition_one_way,
            self.fsync_delay_max_ms,
            self.unsynced_survives,
            self.read_error,
            self.replica_crashes_per_s,
            self.node_crashes_per_s,
            self.pauses_per_s,
            self.clock_jumps_per_s,
            self.drift_ppm_max,
            self.load,
            self.cancel_share,
            self.drain_share,
            self.no_key_share,
            self.constraint_share,
            self.priority_levels,
            self.job_secs_max,
            self.fail_share,
            self.start_fail_share,
            self.client_timeout_ms,
        )
    }
}
