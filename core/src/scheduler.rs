//! The scheduler: a pure function from state to placement decisions.
//!
//! Rules, in order:
//! 1. A job may only go to a `ready` node whose labels satisfy every
//!    constraint and whose free resources fit the job in every dimension.
//! 2. Jobs are considered in strict priority order, FIFO within a priority
//!    (the state's queue order). A job that fits nowhere *now* is skipped and
//!    lower-priority jobs may use capacity it cannot use (backfill); a job is
//!    therefore never placed while a higher-priority job that would have fit
//!    on the same node waits.
//! 3. Among fitting nodes, bin packing: the node left with the least free
//!    capacity (summed over both dimensions, each as a fraction of that node's
//!    capacity) wins; ties go to the lowest node name.
//!
//! A job that fits nowhere stays queued; [`unplaced_reason`] says why.

use std::collections::BTreeMap;

use crate::model::{AttemptNumber, Job, JobId, JobState, Node, Resources};
use crate::state::{QueueKey, State};

/// Queued jobs looked at per pass; the rest wait for the next pass.
pub const SCAN_JOBS_MAX: usize = 1024;
/// Placements made per pass: bounds the size of one batch of proposals.
pub const PLACEMENTS_PER_PASS_MAX: usize = 256;

/// The bounds of one pass. Production uses the defaults; the simulator draws
/// small ones per seed, so that the code for truncated passes runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassBounds {
    /// Queued jobs that some ready node could ever take, examined per pass.
    pub scan_jobs_max: usize,
    /// Placements per pass.
    pub placements_max: usize,
}

impl Default for PassBounds {
    fn default() -> Self {
        PassBounds {
            scan_jobs_max: SCAN_JOBS_MAX,
            placements_max: PLACEMENTS_PER_PASS_MAX,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub attempt: AttemptNumber,
    pub node: String,
}

/// The result of one pass: placements, and whether the pass stopped at one of
/// its bounds with queued jobs left unexamined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub placements: Vec<Placement>,
    pub truncated: bool,
}

/// One scheduling pass over every queued job (up to the default bounds).
pub fn schedule(state: &State) -> Vec<Placement> {
    schedule_pass(state, None, PassBounds::default()).placements
}

/// One scheduling pass. With `only`, just those jobs (which must be sorted in
/// queue order) are considered: enough when nothing but new submissions
/// changed since a pass that placed all it could, because every older queued
/// job met at least as much free capacity then as it would now.
pub fn schedule_pass(state: &State, only: Option<&[QueueKey]>, bounds: PassBounds) -> Pass {
    debug_assert!(bounds.scan_jobs_max > 0 && bounds.placements_max > 0);
    let mut free: BTreeMap<&str, (Resources, &Node)> = state
        .nodes
        .values()
        .filter(|n| n.accepts_work())
        .map(|n| (n.name.as_str(), (n.free(), n)))
        .collect();
    let mut placements = Vec::new();
    let mut truncated = false;
    let candidates: Box<dyn Iterator<Item = &QueueKey>> = match only {
        Some(keys) => Box::new(keys.iter()),
        None => Box::new(state.queue.iter()),
    };
    // Only jobs some ready node could ever take (constraints and total
    // capacity) count against the scan bound: otherwise a backlog of
    // unplaceable jobs at the head of the queue hides every job behind it.
    let mut scanned = 0usize;
    for key in candidates {
        if !any_room(&free) {
            break;
        }
        if scanned >= bounds.scan_jobs_max || placements.len() >= bounds.placements_max {
            truncated = true;
            break;
        }
        let Some(job) = state
            .jobs
            .get(&key.job)
            .filter(|j| j.state == JobState::Queued)
        else {
            continue;
        };
        if !free.values().any(|(_, n)| {
            n.satisfies(&job.spec.constraints) && job.spec.resources.fits_in(&n.capacity)
        }) && !planted!(state.bugs, UnplaceableBlocksScan)
        {
            continue;
        }
        scanned += 1;
        if let Some(name) = best_node(state, job, &free) {
            let slot = free.get_mut(name).expect("best_node returns a key of free");
            slot.0 = slot.0.saturating_sub(&job.spec.resources);
            placements.push(Placement {
                job: job.id,
                attempt: job.attempts.len() as AttemptNumber + 1,
                node: name.to_string(),
            });
        }
    }
    Pass {
        placements,
        truncated,
    }
}

/// True while some node could still take the smallest possible job.
fn any_room(free: &BTreeMap<&str, (Resources, &Node)>) -> bool {
    free.values()
        .any(|(f, _)| f.cpu_millis > 0 && f.memory_mb > 0)
}

fn best_node<'a>(
    state: &State,
    job: &Job,
    free: &BTreeMap<&'a str, (Resources, &Node)>,
) -> Option<&'a str> {
    let need = job.spec.resources;
    let bugs = &state.bugs;
    let fits = |f: &Resources| {
        if planted!(bugs, SchedulerSkipsCapacity) {
            true
        } else if planted!(bugs, FitIgnoresMemory) {
            need.cpu_millis <= f.cpu_millis
        } else {
            need.fits_in(f)
        }
    };
    let matches = |node: &Node| {
        if planted!(bugs, ConstraintAnyMatch) && !job.spec.constraints.is_empty() {
            job.spec
                .constraints
                .iter()
                .any(|(k, v)| node.labels.get(k) == Some(v))
        } else {
            node.satisfies(&job.spec.constraints)
        }
    };
    let fitting = free
        .iter()
        .filter(|(_, (f, node))| fits(f) && matches(node))
        .map(|(name, (f, node))| (leftover_score(&f.saturating_sub(&need), node), *name));
    if planted!(bugs, LoosestFit) {
        return fitting
            .max_by_key(|(score, name)| (*score, std::cmp::Reverse(*name)))
            .map(|(_, name)| name);
    }
    fitting.min().map(|(_, name)| name)
}

/// Free capacity left after placement, as parts per million of the node's
/// capacity, summed over cpu and memory. Lower is a tighter fit.
fn leftover_score(left: &Resources, node: &Node) -> u64 {
    let ppm = |left: u64, cap: u64| -> u64 {
        if cap == 0 {
            0
        } else {
            ((u128::from(left) * 1_000_000) / u128::from(cap)) as u64
        }
    };
    ppm(left.cpu_millis, node.capacity.cpu_millis) + ppm(left.memory_mb, node.capacity.memory_mb)
}

/// Why a queued job is not placed, for users: `None` if it is not queued.
pub fn unplaced_reason(state: &State, job: &Job) -> Option<String> {
    if job.state != JobState::Queued {
        return None;
    }
    let ready: Vec<&Node> = state.nodes.values().filter(|n| n.accepts_work()).collect();
    if ready.is_empty() {
        return Some("no ready nodes".to_string());
    }
    let matching: Vec<&&Node> = ready
        .iter()
        .filter(|n| n.satisfies(&job.spec.constraints))
        .collect();
    if matching.is_empty() {
        let wanted: Vec<String> = job
            .spec
            .constraints
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Some(format!(
            "no ready node matches constraints {}",
            wanted.join(",")
        ));
    }
    let need = job.spec.resources;
    if !matching.iter().any(|n| need.fits_in(&n.capacity)) {
        return Some(format!(
            "no matching node is large enough (needs cpu_millis={}, memory_mb={})",
            need.cpu_millis, need.memory_mb
        ));
    }
    if matching.iter().any(|n| need.fits_in(&n.free())) {
        return Some("waiting for the scheduler (or for higher-priority jobs)".to_string());
    }
    Some(format!(
        "waiting for capacity (needs cpu_millis={}, memory_mb={})",
        need.cpu_millis, need.memory_mb
    ))
}
