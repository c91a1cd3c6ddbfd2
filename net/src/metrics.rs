//! What `/metrics` measures beyond the replica's state: latency histograms
//! and the driver's counters, and the Prometheus text exposition format
//! they are rendered in.
//!
//! The driver and the API record into one shared [`Metrics`] through
//! atomics: recording never takes a lock, never allocates and never waits
//! for a scrape. Nothing here decides anything.
//!
//! Conventions (prometheus.io/docs/practices/naming): names carry their base
//! unit (`_seconds`, `_bytes`), counters end in `_total`, histograms have
//! bucket boundaries in seconds. Bounds are kept in microseconds as integers
//! so that their order is checked at compile time and an observation never
//! meets a rounding error at a boundary.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds (µs) of request and commit latencies: 100 µs to 10 s.
pub const LATENCY_BUCKETS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// Bucket bounds (µs) of a scheduler pass: 10 µs to 1 s.
pub const SCHEDULING_BUCKETS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];
/// Bucket bounds (µs) of a job's wait in the queue: 1 ms (a free node: the
/// commit of the submission, a pass, the commit of the placement) to 1 h
/// (a full cluster).
pub const QUEUE_WAIT_BUCKETS_US: &[u64] = &[
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
];
/// Buckets of one histogram at most (the `+Inf` bucket not counted).
pub const BUCKETS_MAX: usize = 16;

const fn strictly_ascending(bounds: &[u64]) -> bool {
    let mut i = 1;
    while i < bounds.len() {
        if bounds[i - 1] >= bounds[i] {
            return false;
        }
        i += 1;
    }
    !bounds.is_empty() && bounds[0] > 0
}
const _: () = assert!(strictly_ascending(LATENCY_BUCKETS_US));
const _: () = assert!(strictly_ascending(SCHEDULING_BUCKETS_US));
const _: () = assert!(strictly_ascending(QUEUE_WAIT_BUCKETS_US));
const _: () = assert!(LATENCY_BUCKETS_US.len() <= BUCKETS_MAX);
const _: () = assert!(SCHEDULING_BUCKETS_US.len() <= BUCKETS_MAX);
const _: () = assert!(QUEUE_WAIT_BUCKETS_US.len() <= BUCKETS_MAX);

/// A Prometheus histogram with fixed bounds. Each bucket counts the
/// observations that fell in it alone; rendering makes them cumulative.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// One per bound, plus the last for observations above every bound.
    buckets: [AtomicU64; BUCKETS_MAX + 1],
    count: AtomicU64,
    /// Sum of every observation, in µs (584,000 years before it wraps).
    sum_us: AtomicU64,
}

impl Histogram {
    pub const fn new(bounds_us: &'static [u64]) -> Histogram {
        assert!(bounds_us.len() <= BUCKETS_MAX);
        Histogram {
            bounds_us,
            buckets: [const { AtomicU64::new(0) }; BUCKETS_MAX + 1],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        self.observe_us(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn observe_us(&self, us: u64) {
        // The first bound at or above the observation (`le` is inclusive).
        let slot = self.bounds_us.partition_point(|b| *b < us);
        assert!(slot <= self.bounds_us.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes the family: `# HELP`, `# TYPE`, the cumulative buckets,
    /// `_sum` and `_count`. Read while others record, the buckets may lag
    /// `_count` by an observation or two; Prometheus tolerates that, and
    /// `_count` is rendered as the `+Inf` bucket so the two always agree.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds_us.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                seconds(*bound)
            );
        }
        cumulative += self.buckets[self.bounds_us.len()].load(Ordering::Relaxed);
        let count = cumulative.max(self.count());
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = seconds(self.sum_us.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Microseconds as seconds, exactly (no float rounding): `2500` -> `0.0025`.
pub fn seconds(us: u64) -> String {
    fixed(us, 6)
}

/// `n / 10^digits`, written exactly: `fixed(1500, 3)` is `1.5`.
pub fn fixed(n: u64, digits: u32) -> String {
    assert!(digits <= 18);
    let one = 10u64.pow(digits);
    let (whole, frac) = (n / one, n % one);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:0width$}", width = digits as usize);
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it quoted.
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the driver and the API record for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    /// `POST /v1/jobs` from the request's arrival to its answer, for the
    /// submissions answered with a job (201, or the first job for a
    /// repeated idempotency key).
    pub submit: Histogram,
    /// A batch of entries from its proposal to its commit (durable on this
    /// replica's disk; with replication, on a quorum's).
    pub commit: Histogram,
    /// The replica steps that ran a scheduler pass: the pass and the
    /// applying of the commits that called for it.
    pub scheduling: Histogram,
    /// A job's wait in the queue, per placement: from its submission (or,
    /// for a later attempt, the end of the attempt before) to the
    /// placement's commit, by the log's own stamps.
    pub queue_wait: Histogram,
    /// `LeaderElected` entries this replica committed since it started.
    pub leader_changes: AtomicU64,
}

impl Metrics {
    pub const fn new() -> Metrics {
        Metrics {
            submit: Histogram::new(LATENCY_BUCKETS_US),
            commit: Histogram::new(LATENCY_BUCKETS_US),
            scheduling: Histogram::new(SCHEDULING_BUCKETS_US),
            queue_wait: Histogram::new(QUEUE_WAIT_BUCKETS_US),
            leader_changes: AtomicU64::new(0),
        }
    }

    /// The histograms' families.
    pub fn render_histograms(&self, out: &mut String) {
        self.submit.render(
            out,
            "rustci_submit_duration_seconds",
            "Job submissions (POST /v1/jobs answered with a job) from arrival to answer.",
        );
        self.commit.render(
            out,
            "rustci_commit_duration_seconds",
            "Batches of log entries from proposal to commit.",
        );
        self.scheduling.render(
            out,
            "rustci_scheduling_duration_seconds",
            "Replica steps that ran a scheduler pass (the pass and the commits applied before it).",
        );
        self.queue_wait.render(
            out,
            "rustci_queue_wait_seconds",
            "Time a job waited in the queue before a placement, per placement, by the log's stamps.",
        );
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(10), "0.00001");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(3_600_000_000), "3600");
        assert_eq!(seconds(1_250_000), "1.25");
        assert_eq!(fixed(1500, 3), "1.5");
        assert_eq!(fixed(250, 3), "0.25");
        assert_eq!(fixed(7, 0), "7");
    }

    #[test]
    fn a_histogram_counts_each_observation_in_the_first_bucket_at_or_above_it() {
        let h = Histogram::new(&[1_000, 10_000]);
        h.observe_us(1_000); // on the bound: `le` is inclusive
        h.observe(Duration::from_micros(1_001));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "rustci_x_seconds", "X.");
        assert_eq!(
            out,
            "# HELP rustci_x_seconds X.\n# TYPE rustci_x_seconds histogram\n\
             rustci_x_seconds_bucket{le=\"0.001\"} 1\n\
             rustci_x_seconds_bucket{le=\"0.01\"} 2\n\
             rustci_x_seconds_bucket{le=\"+Inf\"} 3\n\
             rustci_x_seconds_sum 5.002001\n\
             rustci_x_seconds_count 3\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
