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
//! 4. No starvation: the first job of a pass that some ready node could ever
//!    take (constraints and total capacity) but that fits no node's free
//!    capacity *reserves* one node, the one where it needs the least freed:
//!    among the ready nodes that satisfy its constraints and are large
//!    enough, the least shortfall (per dimension what the job needs beyond
//!    the node's free capacity, each as a fraction of the node's capacity,
//!    summed), ties to the lowest name. For the rest of the pass the
//!    reserved node offers backfill only what it has free beyond the
//!    reserved job's need, per dimension (`free - need`, at least 0), and
//!    is scored as if that were all it had free. A backfill job placed
//!    there therefore never takes capacity the reserved job waits for: it
//!    cannot delay it, however the node's running attempts end. Since the
//!    reserved job is short on the node in at least one dimension and every
//!    job needs at least 1 of each, in practice the reserved node takes no
//!    new work until the reserved job is placed: it only drains.
//!
//! The reservation is derived, never stored: every pass computes it afresh
//! from the state, so it goes with the job when the job is placed,
//! cancelled or overtaken by a higher-priority job that fits nowhere, and
//! the log format knows nothing of it. Across passes it is stable: the
//! reserved node takes nothing new, so its shortfall only shrinks, while
//! other nodes' grows as backfill lands on them; it moves only to a node
//! that has come strictly closer (or as close, with a lower name). Once
//! the reserved node's running attempts end (each within its time-out) the
//! reserved job fits. `sim`'s `no_starvation` checker bounds that wait.
//! There is one reservation per pass: the job behind the reserved one is
//! skipped as before and reserves in its turn. The price is utilisation:
//! the held node idles its free part while it drains (no run-time
//! estimates exist to backfill it safely; a job's time-out bounds its run
//! but says nothing of when it really ends), which on a one-node cluster
//! means no backfill behind any job that does not fit.
//!
//! A job that fits nowhere stays queued; [`unplaced_reason`] says why and
//! [`explain`] shows the reservation.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use crate::bugs::BugSet;
use crate::model::{AttemptNumber, Job, JobId, JobState, Node, Resources};
use crate::sched_index::{Class, ClassId, Group, NodeSlot};
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
/// its bounds with runnable jobs left unexamined (or, over new submissions
/// alone, found its premise broken: see [`schedule_pass`]). (Before the indexes, a
/// parked job left behind the bound also counted, which asked for a full
/// pass that could place nothing more: with that rule restored, `rustci sim
/// --seeds 0..2000` gives the old trace for every seed; without it 3 seeds
/// in 500 run their passes at other times.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub placements: Vec<Placement>,
    pub truncated: bool,
    /// The node the pass held for the first job it met that fits no node
    /// now (rule 4 of the module documentation).
    pub reservation: Option<Reservation>,
}

/// A node held for a job that fits its total capacity but nothing's free
/// capacity now: backfill may use only what the node has beyond the job's
/// need (rule 4 of the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Reservation {
    pub job: JobId,
    pub node: String,
    /// What the node must still free for the job, per dimension: the job's
    /// need beyond the node's free capacity (0 where it has room).
    pub short_cpu_millis: u64,
    pub short_memory_mb: u64,
}

/// One scheduling pass over every queued job (up to the default bounds).
pub fn schedule(state: &mut State) -> Vec<Placement> {
    schedule_pass(state, None, PassBounds::default()).placements
}

/// One scheduling pass. With `only`, just those jobs (which must be sorted in
/// queue order) are considered: enough when nothing but new submissions
/// changed since a pass that placed all it could, because every older queued
/// job met at least as much free capacity then as it would now. The pass
/// also examines the *anchor*, the first runnable queued job not in `only`:
/// after a complete pass it is the job that fits nowhere and holds the
/// reservation, and it must hold the same node again here. Should the
/// premise fail (the anchor fits now; or a job of `only` ahead of it fits
/// nowhere and so would take the reservation over; or jobs of `only` ahead
/// of it were placed, which may move its reservation to another node), the
/// pass stops there and reports itself truncated, so that a full pass
/// follows: older jobs may fit the node the anchor held before.
///
/// The pass reads the state's scheduling indexes ([`crate::sched_index`])
/// and walks only the queued jobs some ready node could ever take (the
/// others are parked there). It lowers the indexed free capacity of the
/// nodes it places on as it goes and puts every one back before it returns:
/// the state is the same after the pass as before it.
pub fn schedule_pass(state: &mut State, only: Option<&[QueueKey]>, bounds: PassBounds) -> Pass {
    assert!(bounds.scan_jobs_max > 0 && bounds.placements_max > 0);
    let State {
        jobs,
        queue,
        nodes,
        sched,
        bugs,
        ..
    } = state;
    let bugs = *bugs;
    assert!(!sched.is_suspended(), "a pass needs the indexes kept");
    // Only jobs some ready node could ever take (constraints and total
    // capacity) count against the scan bound: otherwise a backlog of
    // unplaceable jobs at the head of the queue hides every job behind it.
    // Those are the runnable ones; the planted bug walks the whole queue
    // and counts every job.
    let walk_all = planted!(bugs, UnplaceableBlocksScan);
    let mut placements = Vec::new();
    let mut touched: Vec<NodeSlot> = Vec::new();
    let mut truncated = false;
    let mut scanned = 0usize;
    let mut position = 0usize;
    let mut cursor: Option<QueueKey> = None;
    let mut reservation: Option<Reservation> = None;
    // With `only`, the anchor joins the candidates (see above).
    let anchor: Option<QueueKey> = only.and_then(|keys| {
        sched
            .runnable
            .keys()
            .find(|k| keys.binary_search(k).is_err())
            .copied()
    });
    let only: Option<Vec<QueueKey>> = only.map(|keys| {
        let mut keys = keys.to_vec();
        if let Some(anchor) = anchor {
            let at = keys.binary_search(&anchor).unwrap_err();
            keys.insert(at, anchor);
        }
        keys
    });
    loop {
        let next = match &only {
            Some(keys) => {
                let key = keys.get(position).copied();
                position += 1;
                key
            }
            None if walk_all => next_key(queue, cursor),
            None => next_runnable(&sched.runnable, cursor),
        };
        let Some(key) = next else {
            break;
        };
        debug_assert!(cursor.is_none_or(|c| c < key), "candidates in queue order");
        cursor = Some(key);
        if sched.roomy == 0 {
            break;
        }
        let class = sched.runnable.get(&key).copied();
        if class.is_none() && !walk_all {
            continue;
        }
        if scanned >= bounds.scan_jobs_max || placements.len() >= bounds.placements_max {
            truncated = true;
            break;
        }
        let Some(job) = jobs.get(&key.job).filter(|j| j.state == JobState::Queued) else {
            continue;
        };
        scanned += 1;
        let Some(class) = class.and_then(|id| sched.classes.get(&id)) else {
            continue;
        };
        let need = job.spec.resources;
        let found = best_node(class, need, &bugs);
        let at_anchor = anchor == Some(key);
        if anchor.is_some() && !at_anchor && reservation.is_none() && found.is_none()
            || at_anchor && (found.is_some() || !placements.is_empty())
        {
            // The premise of a pass over new submissions failed.
            truncated = true;
            break;
        }
        let Some(name) = found else {
            if reservation.is_none() {
                if let Some((node, short)) = reserve(class, need) {
                    // Backfill sees only what is free beyond the reserved
                    // job's need (the planted bug forgets to hold it).
                    if !planted!(bugs, BackfillIgnoresReservation) {
                        let slot = sched.slot(&node).expect("an indexed node");
                        let left = sched.nodes[slot as usize].free.saturating_sub(&need);
                        sched.set_free(slot, left);
                        touched.push(slot);
                    }
                    reservation = Some(Reservation {
                        job: job.id,
                        node: node.to_string(),
                        short_cpu_millis: short.cpu_millis,
                        short_memory_mb: short.memory_mb,
                    });
                }
            }
            continue;
        };
        let slot = sched.slot(&name).expect("an indexed node");
        let left = sched.nodes[slot as usize].free.saturating_sub(&need);
        sched.set_free(slot, left);
        touched.push(slot);
        placements.push(Placement {
            job: job.id,
            attempt: job.attempts.len() as AttemptNumber + 1,
            node: name.to_string(),
        });
    }
    for slot in touched {
        let name = &sched.nodes[slot as usize].name;
        let free = nodes.get(&**name).map(Node::free).unwrap_or_default();
        sched.set_free(slot, free);
    }
    Pass {
        placements,
        truncated,
        reservation,
    }
}

fn next_key(set: &BTreeSet<QueueKey>, after: Option<QueueKey>) -> Option<QueueKey> {
    match after {
        None => set.first().copied(),
        Some(k) => set.range((Excluded(k), Unbounded)).next().copied(),
    }
}

fn next_runnable(map: &BTreeMap<QueueKey, ClassId>, after: Option<QueueKey>) -> Option<QueueKey> {
    match after {
        None => map.keys().next().copied(),
        Some(k) => map.range((Excluded(k), Unbounded)).next().map(|(k, _)| *k),
    }
}

/// The node of the class to reserve for a job that needs `need` and fits no
/// node now: among the nodes large enough, the least shortfall score, then
/// the lowest name. Returns it with what it must still free. Visits every
/// free-capacity point of the large enough groups (once per pass at most).
fn reserve(class: &Class, need: Resources) -> Option<(Arc<str>, Resources)> {
    let mut best: Option<(u64, &Arc<str>, Resources)> = None;
    for (capacity, group) in &class.groups {
        if !need.fits_in(capacity) {
            continue;
        }
        for (&(cpu, mem), names) in &group.by_cpu {
            let Some(name) = names.first() else {
                continue;
            };
            let short = need.saturating_sub(&Resources::new(cpu, mem));
            let s = shortfall_score(&short, capacity);
            if best.is_none_or(|(b, n, _)| (s, &**name) < (b, &**n)) {
                best = Some((s, name, short));
            }
        }
    }
    best.map(|(_, name, short)| (Arc::clone(name), short))
}

/// What a node must free for a job, as parts per million of its capacity,
/// summed over cpu and memory. Lower means the job fits sooner.
fn shortfall_score(short: &Resources, capacity: &Resources) -> u64 {
    ppm(short.cpu_millis, capacity.cpu_millis) + ppm(short.memory_mb, capacity.memory_mb)
}

/// The tightest fitting node of the class for `need`: least leftover score,
/// then lowest name.
fn best_node(class: &Class, need: Resources, bugs: &BugSet) -> Option<Arc<str>> {
    // What must fit: all of `need`, unless a planted bug forgets a part.
    let fit = if planted!(bugs, SchedulerSkipsCapacity) {
        Resources::default()
    } else if planted!(bugs, FitIgnoresMemory) {
        Resources::new(need.cpu_millis, 0)
    } else {
        need
    };
    if planted!(bugs, LoosestFit) {
        return loosest(class, need, fit);
    }
    let mut best: Option<(u64, &Arc<str>)> = None;
    for (capacity, group) in &class.groups {
        if !fit.fits_in(capacity) {
            continue;
        }
        if let Some(found) = tightest_in_group(*capacity, group, need, fit) {
            if best.is_none_or(|b| (found.0, &**found.1) < (b.0, &**b.1)) {
                best = Some(found);
            }
        }
    }
    best.map(|(_, name)| Arc::clone(name))
}

/// The tightest fit among nodes of one capacity, without visiting them all:
/// the threshold algorithm over the two orders of the group's points. A
/// point not yet met in the cpu order has at least the free cpu of the last
/// one met there, and likewise for memory, so its score is at least the sum
/// of the two scores' parts there; once the best found is below that sum,
/// no point left can beat it. A walk that runs out has met every point that
/// fits in its dimension, so every fitting point was scored.
fn tightest_in_group(
    capacity: Resources,
    group: &Group,
    need: Resources,
    fit: Resources,
) -> Option<(u64, &Arc<str>)> {
    let score = |cpu: u64, mem: u64| {
        leftover_score(&Resources::new(cpu, mem).saturating_sub(&need), &capacity)
    };
    let mut best: Option<(u64, &Arc<str>)> = None;
    let mut by_cpu = group.by_cpu.range((fit.cpu_millis, 0)..);
    let mut by_mem = group.by_mem.range((fit.memory_mb, 0)..);
    let mut steps = 0usize;
    loop {
        steps += 1;
        assert!(
            steps <= group.by_cpu.len() + 1,
            "each walk meets each point once"
        );
        let Some((&(cpu, mem), names)) = by_cpu.next() else {
            break;
        };
        let floor_cpu = ppm(cpu.saturating_sub(need.cpu_millis), capacity.cpu_millis);
        if mem >= fit.memory_mb {
            offer(&mut best, score(cpu, mem), names);
        }
        let Some(&(mem, cpu)) = by_mem.next() else {
            break;
        };
        let floor_mem = ppm(mem.saturating_sub(need.memory_mb), capacity.memory_mb);
        if cpu >= fit.cpu_millis {
            if let Some(names) = group.by_cpu.get(&(cpu, mem)) {
                offer(&mut best, score(cpu, mem), names);
            }
        }
        if best.is_some_and(|(s, _)| s < floor_cpu + floor_mem) {
            break;
        }
    }
    best
}

/// Keeps the better of `best` and the first (lowest) name at a point.
fn offer<'a>(best: &mut Option<(u64, &'a Arc<str>)>, score: u64, names: &'a BTreeSet<Arc<str>>) {
    let Some(name) = names.first() else {
        return;
    };
    if best.is_none_or(|(s, n)| (score, &**name) < (s, &**n)) {
        *best = Some((score, name));
    }
}

/// SIM-BUGS: the loosest fit instead of the tightest (every point visited).
fn loosest(class: &Class, need: Resources, fit: Resources) -> Option<Arc<str>> {
    let mut worst: Option<(u64, &Arc<str>)> = None;
    for (capacity, group) in &class.groups {
        for (&(cpu, mem), names) in &group.by_cpu {
            let Some(name) = names.first() else {
                continue;
            };
            if !fit.fits_in(&Resources::new(cpu, mem)) {
                continue;
            }
            let s = leftover_score(&Resources::new(cpu, mem).saturating_sub(&need), capacity);
            if worst
                .is_none_or(|(w, n)| (s, std::cmp::Reverse(&**name)) > (w, std::cmp::Reverse(&**n)))
            {
                worst = Some((s, name));
            }
        }
    }
    worst.map(|(_, name)| Arc::clone(name))
}

fn ppm(left: u64, cap: u64) -> u64 {
    if cap == 0 {
        0
    } else {
        ((u128::from(left) * 1_000_000) / u128::from(cap)) as u64
    }
}

/// Free capacity left after placement, as parts per million of the node's
/// capacity, summed over cpu and memory. Lower is a tighter fit.
fn leftover_score(left: &Resources, capacity: &Resources) -> u64 {
    ppm(left.cpu_millis, capacity.cpu_millis) + ppm(left.memory_mb, capacity.memory_mb)
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
    let held = reservation(state);
    if let Some(r) = held.as_ref().filter(|r| r.job == job.id) {
        return Some(format!(
            "waiting for capacity; node {} is reserved for it (needs cpu_millis={}, memory_mb={} more freed there)",
            r.node, r.short_cpu_millis, r.short_memory_mb
        ));
    }
    let fits_now = |n: &Node| need.fits_in(&n.free());
    if let Some(r) = &held {
        let elsewhere = matching.iter().any(|n| n.name != r.node && fits_now(n));
        if !elsewhere && matching.iter().any(|n| n.name == r.node && fits_now(n)) {
            return Some(format!(
                "waiting for capacity; it fits only node {}, which is reserved for job {} ahead of it",
                r.node, r.job
            ));
        }
    }
    if matching.iter().any(|n| fits_now(n)) {
        return Some("waiting for the scheduler (or for higher-priority jobs)".to_string());
    }
    Some(format!(
        "waiting for capacity (needs cpu_millis={}, memory_mb={})",
        need.cpu_millis, need.memory_mb
    ))
}

/// The reservation a pass would make now, computed by visiting every node
/// (for [`explain`] and [`unplaced_reason`], never on a pass): the first
/// runnable queued job holds one if it fits no ready node's free capacity.
/// After a complete pass that is the job the pass reserved for; while a
/// pass is due (the first runnable job fits somewhere) there is none.
pub fn reservation(state: &State) -> Option<Reservation> {
    let head = if state.sched.is_suspended() {
        state.queue.iter().find(|k| {
            state.jobs.get(&k.job).is_some_and(|j| {
                state.nodes.values().any(|n| {
                    n.accepts_work()
                        && n.satisfies(&j.spec.constraints)
                        && j.spec.resources.fits_in(&n.capacity)
                })
            })
        })
    } else {
        state.sched.runnable.keys().next()
    };
    let job = state.jobs.get(&head?.job)?;
    let need = job.spec.resources;
    let mut best: Option<(u64, &Node)> = None;
    for node in state.nodes.values() {
        if !node.accepts_work()
            || !node.satisfies(&job.spec.constraints)
            || !need.fits_in(&node.capacity)
        {
            continue;
        }
        let free = node.free();
        if need.fits_in(&free) {
            return None;
        }
        let s = shortfall_score(&need.saturating_sub(&free), &node.capacity);
        if best.is_none_or(|(b, n)| (s, node.name.as_str()) < (b, n.name.as_str())) {
            best = Some((s, node));
        }
    }
    let (_, node) = best?;
    let short = need.saturating_sub(&node.free());
    Some(Reservation {
        job: job.id,
        node: node.name.clone(),
        short_cpu_millis: short.cpu_millis,
        short_memory_mb: short.memory_mb,
    })
}

/// Why a job is where it is, in the manner of Nomad's allocation metrics:
/// what `GET /v1/jobs/{id}/placement` and `rustci job explain` show. It is
/// computed on demand by visiting every node, never on the scheduler's path.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The job's state.
    pub state: String,
    /// Nodes known to the control plane.
    pub nodes: usize,
    /// Ready nodes, all looked at.
    pub nodes_evaluated: usize,
    /// Nodes draining, down or gone: not looked at.
    pub nodes_not_ready: usize,
    /// Ready nodes filtered out, by the first constraint (`key=value`) each
    /// failed.
    pub filtered_by_constraint: BTreeMap<String, usize>,
    /// Matching nodes too small for the job even when empty.
    pub too_small: usize,
    /// Matching nodes big enough, but without the cpu free now.
    pub exhausted_cpu: usize,
    /// Matching nodes big enough, but without the memory free now.
    pub exhausted_memory: usize,
    /// Matching nodes with room for the job now.
    pub fitting_now: usize,
    /// A queued job's short reason (as the job object's `reason`).
    pub reason: Option<String>,
    /// The active (or last) attempt's placement.
    pub placed: Option<Placed>,
    /// The node held for the first job in line that fits no node now
    /// (this job or another), as a pass would hold it now.
    pub reservation: Option<Reservation>,
}

/// Where an attempt was placed, and its score: what the node had left after
/// it (the scheduler picks the tightest fit, the least left).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Placed {
    pub attempt: AttemptNumber,
    pub node: String,
    pub attempt_state: String,
    /// Free on the node now, with this attempt's resources taken (for an
    /// active attempt): the fit's leftover.
    pub node_free_cpu_millis: u64,
    pub node_free_memory_mb: u64,
}

/// Explains `job`'s placement in `state`.
pub fn explain(state: &State, job: &Job) -> Explanation {
    let need = job.spec.resources;
    let mut e = Explanation {
        state: job.state.as_str().to_string(),
        nodes: state.nodes.len(),
        reason: unplaced_reason(state, job),
        ..Explanation::default()
    };
    for node in state.nodes.values() {
        if !node.accepts_work() {
            e.nodes_not_ready += 1;
            continue;
        }
        e.nodes_evaluated += 1;
        let failed = job
            .spec
            .constraints
            .iter()
            .find(|(k, v)| node.labels.get(*k) != Some(*v));
        if let Some((k, v)) = failed {
            *e.filtered_by_constraint
                .entry(format!("{k}={v}"))
                .or_insert(0) += 1;
            continue;
        }
        if !need.fits_in(&node.capacity) {
            e.too_small += 1;
            continue;
        }
        let free = node.free();
        let cpu_short = need.cpu_millis > free.cpu_millis;
        let memory_short = need.memory_mb > free.memory_mb;
        e.exhausted_cpu += usize::from(cpu_short);
        e.exhausted_memory += usize::from(memory_short);
        e.fitting_now += usize::from(!cpu_short && !memory_short);
    }
    e.reservation = reservation(state);
    e.placed = job.attempts.last().map(|a| {
        let free = state.nodes.get(&a.node).map(Node::free).unwrap_or_default();
        Placed {
            attempt: a.number,
            node: a.node.clone(),
            attempt_state: a.state.as_str().to_string(),
            node_free_cpu_millis: free.cpu_millis,
            node_free_memory_mb: free.memory_mb,
        }
    });
    e
}
