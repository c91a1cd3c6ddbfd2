//! The seeded RNG and the per-seed fault plan (swarm testing).
//!
//! Each seed draws its own fault rates and workload mix first thing, from the
//! one RNG of the run, so the plan can be printed before anything runs and a
//! seed always means the same plan.
//!
//! Integer arithmetic only: probabilities and rates are basis points
//! ([`Bp`], 1/10,000), and exponential delays come from a fixed-point
//! logarithm. Floating-point functions such as `f64::ln` are not guaranteed
//! to give the same bits on every platform, and a seed must give the same
//! trace everywhere (`sim/clippy.toml` bans them here).

use std::fmt;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A probability or a rate in basis points: 10,000 is 1 (or 1 per second).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bp(pub u32);

impl Bp {
    pub const ONE: Bp = Bp(10_000);
    pub const ZERO: Bp = Bp(0);

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Bp {
    /// As a decimal with four places (`0.1234`), computed with integers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 10_000, self.0 % 10_000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:04}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

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

    /// True with probability `p`.
    pub fn chance(&mut self, p: Bp) -> bool {
        p.0 > 0 && self.below(10_000) < u64::from(p.0)
    }

    /// One of `items`, uniformly.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Exponentially distributed delay with the given mean (ms), at least 1:
    /// `mean * -ln(u)` for a uniform `u` in (0, 1], in fixed point.
    pub fn exp_ms(&mut self, mean_ms: u64) -> u64 {
        // u = x / 2^32 with x in 1..=2^32.
        let x = (self.next_u64() >> 32) + 1;
        let neg_ln_q16 = neg_ln_q16(x);
        ((u128::from(mean_ms) * u128::from(neg_ln_q16)) >> 16).max(1) as u64
    }
}

/// `-ln(x / 2^32)` in Q16 fixed point, for `x` in `1..=2^32`: the integer
/// part of `log2(x)` from the leading zeros, 16 fractional bits by repeated
/// squaring, then times ln 2. Exact integer arithmetic, so identical on
/// every platform.
fn neg_ln_q16(x: u64) -> u64 {
    debug_assert!((1..=1u64 << 32).contains(&x));
    let int_part = 63 - u64::from(x.leading_zeros());
    // y in [2^30, 2^31): the mantissa of x as Q30.
    let mut y = if int_part >= 30 {
        x >> (int_part - 30)
    } else {
        x << (30 - int_part)
    };
    let mut frac = 0u64;
    for _ in 0..16 {
        y = (y * y) >> 30;
        frac <<= 1;
        if y >= 1 << 31 {
            y >>= 1;
            frac |= 1;
        }
    }
    let log2_q16 = (int_part << 16) | frac;
    let neg_log2_q16 = (32u64 << 16) - log2_q16;
    // ln 2 in Q16 is 45426.1.
    (neg_log2_q16 * 45_426) >> 16
}

/// Every fault rate and workload knob of one seed. Rates are per message or
/// per simulated second, as named, in basis points.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub nodes: usize,
    pub clients: usize,
    // network (replica <-> nodes and clients)
    pub net_delay_min_ms: u64,
    pub net_delay_max_ms: u64,
    pub net_loss: Bp,
    pub net_duplicate: Bp,
    pub net_reorder: Bp,
    pub partitions_per_s: Bp,
    pub partition_one_way: Bp,
    // disk of the replica
    pub fsync_delay_max_ms: u64,
    pub unsynced_survives: Bp,
    pub read_error: Bp,
    // processes
    pub replica_crashes_per_s: Bp,
    pub node_crashes_per_s: Bp,
    pub pauses_per_s: Bp,
    pub clock_jumps_per_s: Bp,
    /// Agents stopped by an operator (SIGTERM): half drain, half kill.
    pub agent_stops_per_s: Bp,
    pub drift_ppm_max: u64,
    /// Share of node restarts that come back with other labels.
    pub relabel_share: Bp,
    // the scheduler's bounds (small ones make truncated passes happen)
    pub scan_jobs_max: usize,
    pub placements_max: usize,
    // workload
    /// Offered load as a share of the cluster's job slots; the submission
    /// rate follows from it (see `World::new`).
    pub load: Bp,
    pub cancel_share: Bp,
    pub drain_share: Bp,
    pub undrain_share: Bp,
    /// Operators removing a node (its agent is fenced and joins again).
    pub remove_share: Bp,
    pub no_key_share: Bp,
    pub constraint_share: Bp,
    /// Share of submissions that come as a burst of up to `burst_max` jobs
    /// sent at once.
    pub burst_share: Bp,
    pub burst_max: u64,
    /// 1..=5 evenly spread levels from 0 to 100; 6 means any of 0..=100.
    pub priority_levels: u64,
    pub job_secs_max: u64,
    /// Share of submissions that are *big*: 60-100% of one node's whole
    /// capacity, at the top priority (never with a single node). A seed with big jobs (a starvation
    /// seed) also sends its submissions as a steady stream packed into the
    /// second half of the fault phase, so that a queue of smaller jobs
    /// behind the big ones is still there when the load stops.
    pub big_job_share: Bp,
    pub fail_share: Bp,
    pub start_fail_share: Bp,
    pub retries_max: u64,
    pub client_timeout_ms: u64,
}

/// Scan and placement bounds drawn for seeds that use small ones.
pub const SMALL_SCAN_JOBS_MAX: u64 = 16;
pub const SMALL_PLACEMENTS_MAX: u64 = 8;

impl FaultPlan {
    /// Draws the plan of a seed. `drift_ppm_max` is the configured bound the
    /// clocks stay within (the control plane's arithmetic assumes it).
    pub fn draw(rng: &mut SimRng, drift_ppm_max: u64) -> FaultPlan {
        let mut plan = FaultPlan::draw_raw(rng, drift_ppm_max);
        // One node holding for every big job drains for each in turn: 200
        // long jobs then outlast the liveness bound (6 seeds in 10,000).
        if plan.nodes == 1 {
            plan.big_job_share = Bp::ZERO;
        }
        plan
    }

    fn draw_raw(rng: &mut SimRng, drift_ppm_max: u64) -> FaultPlan {
        let delay_min = rng.range(0, 20);
        let small_bounds = rng.chance(Bp(7_000));
        let (scan_jobs_max, placements_max) = if small_bounds {
            (
                rng.range(2, SMALL_SCAN_JOBS_MAX) as usize,
                rng.range(1, SMALL_PLACEMENTS_MAX) as usize,
            )
        } else {
            (
                rustci_core::scheduler::SCAN_JOBS_MAX,
                rustci_core::scheduler::PLACEMENTS_PER_PASS_MAX,
            )
        };
        FaultPlan {
            nodes: rng.range(1, 5) as usize,
            clients: rng.range(1, 4) as usize,
            net_delay_min_ms: delay_min,
            net_delay_max_ms: delay_min + rng.range(0, 200),
            net_loss: swarm(rng, 5_000, 2_000),
            net_duplicate: swarm(rng, 5_000, 1_000),
            net_reorder: swarm(rng, 5_000, 2_000),
            partitions_per_s: swarm(rng, 5_000, 2_000),
            partition_one_way: upto(rng, 10_000),
            fsync_delay_max_ms: rng.range(1, 50),
            unsynced_survives: swarm(rng, 5_000, 8_000),
            read_error: swarm(rng, 3_000, 5_000),
            replica_crashes_per_s: swarm(rng, 6_000, 1_500),
            node_crashes_per_s: swarm(rng, 5_000, 1_000),
            pauses_per_s: swarm(rng, 4_000, 1_000),
            clock_jumps_per_s: swarm(rng, 4_000, 1_000),
            agent_stops_per_s: swarm(rng, 4_000, 500),
            drift_ppm_max,
            relabel_share: swarm(rng, 5_000, 5_000),
            scan_jobs_max,
            placements_max,
            load: Bp(1_000 + upto(rng, 10_000).0),
            cancel_share: swarm(rng, 6_000, 3_000),
            drain_share: swarm(rng, 4_000, 1_000),
            undrain_share: swarm(rng, 7_000, 1_000),
            remove_share: swarm(rng, 4_000, 500),
            no_key_share: swarm(rng, 3_000, 3_000),
            constraint_share: swarm(rng, 7_000, 8_000),
            burst_share: swarm(rng, 6_000, 1_500),
            burst_max: rng.range(2, 40),
            priority_levels: rng.range(1, 6),
            job_secs_max: rng.range(1, 10),
            big_job_share: swarm(rng, 3_000, 1_500),
            fail_share: upto(rng, 4_000),
            start_fail_share: swarm(rng, 3_000, 1_000),
            retries_max: rng.range(0, 4),
            client_timeout_ms: rng.range(200, 3000),
        }
    }

    /// The bounds the replica runs with.
    pub fn pass_bounds(&self) -> rustci_core::scheduler::PassBounds {
        rustci_core::scheduler::PassBounds {
            scan_jobs_max: self.scan_jobs_max,
            placements_max: self.placements_max,
        }
    }

    /// The priority values this seed draws from.
    pub fn priority(&self, rng: &mut SimRng) -> u8 {
        match self.priority_levels {
            0 | 1 => 50,
            levels @ 2..=5 => (rng.below(levels) * 100 / (levels - 1)) as u8,
            _ => rng.range(0, 100) as u8,
        }
    }
}

/// A rate up to `max` with probability `p_on`, else 0: swarm testing
/// switches whole fault classes off for some seeds.
fn swarm(rng: &mut SimRng, p_on: u32, max: u32) -> Bp {
    let x = upto(rng, max);
    if rng.chance(Bp(p_on)) {
        x
    } else {
        Bp::ZERO
    }
}

fn upto(rng: &mut SimRng, max: u32) -> Bp {
    Bp(rng.range(0, u64::from(max)) as u32)
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nodes={} clients={} net_delay_ms={}..{} net_loss={} net_duplicate={} \
             net_reorder={} partitions_per_s={} partition_one_way={} \
             fsync_delay_max_ms={} unsynced_survives={} read_error={} \
             replica_crashes_per_s={} node_crashes_per_s={} pauses_per_s={} \
             clock_jumps_per_s={} agent_stops_per_s={} drift_ppm_max={} relabel_share={} \
             scan_jobs_max={} \
             placements_max={} load={} cancel_share={} drain_share={} undrain_share={} \
             remove_share={} no_key_share={} constraint_share={} burst_share={} burst_max={} \
             priority_levels={} job_secs_max={} big_job_share={} fail_share={} start_fail_share={} \
             retries_max={} client_timeout_ms={}",
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
            self.agent_stops_per_s,
            self.drift_ppm_max,
            self.relabel_share,
            self.scan_jobs_max,
            self.placements_max,
            self.load,
            self.cancel_share,
            self.drain_share,
            self.undrain_share,
            self.remove_share,
            self.no_key_share,
            self.constraint_share,
            self.burst_share,
            self.burst_max,
            self.priority_levels,
            self.job_secs_max,
            self.big_job_share,
            self.fail_share,
            self.start_fail_share,
            self.retries_max,
            self.client_timeout_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_ln_is_close_to_the_real_one() {
        // -ln(1) = 0, -ln(1/2) = 0.6931, -ln(2^-32) = 22.18.
        assert_eq!(neg_ln_q16(1 << 32), 0);
        assert!((neg_ln_q16(1 << 31) as i64 - 45_426).abs() <= 2);
        assert!((neg_ln_q16(1) as i64 - 1_453_640).abs() <= 40);
        // -ln(0.1) = 2.302585 -> 150902 in Q16.
        assert!((neg_ln_q16(429_496_730) as i64 - 150_902).abs() <= 8);
    }

    #[test]
    fn exponential_delays_have_the_mean_asked_for() {
        let mut rng = SimRng::new(3);
        let n = 20_000u64;
        let sum: u64 = (0..n).map(|_| rng.exp_ms(1_000)).sum();
        let mean = sum / n;
        assert!((950..=1_050).contains(&mean), "mean {mean}");
    }

    #[test]
    fn basis_points_print_as_decimals() {
        assert_eq!(Bp(1_234).to_string(), "0.1234");
        assert_eq!(Bp(500).to_string(), "0.05");
        assert_eq!(Bp(0).to_string(), "0");
        assert_eq!(Bp(10_000).to_string(), "1");
        assert_eq!(Bp(11_000).to_string(), "1.1");
    }
}
