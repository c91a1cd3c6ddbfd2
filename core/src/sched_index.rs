//! The scheduler's indexes: caches derived from the log, kept in step by the
//! reducer so that a placement costs about the same on 5 nodes as on 5,000.
//!
//! What they hold (all a function of the state's nodes and queued jobs):
//! - per node: whether it takes work, its capacity, free capacity and labels;
//! - per *constraint class* (one distinct set of constraints that a queued
//!   job asks for): the ready nodes that satisfy it, grouped by capacity, and
//!   within a group by free capacity twice over (ordered by free cpu and by
//!   free memory), so the tightest fit is found without visiting every node;
//! - per class, the queued jobs bucketed by what they need; a bucket no
//!   ready node of the class is large enough for is *parked*;
//! - `runnable`: the queued jobs of the unparked buckets in queue order, which
//!   is all a pass ever walks. A parked job costs nothing per pass and is
//!   woken only when a node that could take it joins, changes labels or
//!   capacity, or comes back from a drain or from down.
//!
//! Architecture invariant: the indexes are caches. Nothing the log defines
//! lives only here; replay rebuilds them; `==`, `Hash` and so
//! [`crate::state::State::digest`] ignore them (two states equal by the log
//! digest the same whatever their caches hold). `check` compares them with
//! a computation from scratch; the reducer proptests call it after every
//! event and the simulator after every step.
//!
//! This module never decides a placement; `scheduler.rs` does, reading these
//! indexes. During a pass the scheduler lowers the free capacity of the nodes
//! it places on ([`SchedIndex::set_free`]) and puts it back at the end of the
//! pass, so the indexes equal the state again after every pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::bugs::BugSet;
use crate::model::{Labels, Node, Resources};
use crate::state::QueueKey;

/// Index of a node in [`SchedIndex`]: nodes are never forgotten by the
/// state (a node that left stays, `left`), so slots are never reused.
pub type NodeSlot = u32;

/// A constraint class's identity, handed out from a counter.
pub type ClassId = u32;

/// Classes kept while no queued job uses them, so that a constraint set that
/// comes back soon does not rebuild its node set; past this the class that
/// has been idle longest is dropped.
pub const CLASSES_IDLE_MAX: usize = 64;

/// A point in a capacity group: (free cpu, free memory).
type Point = (u64, u64);

/// Ready nodes of one class that have the same capacity. Ordering by free
/// capacity only ranks nodes by tightness within one capacity (the score is
/// free capacity as a fraction of the node's own capacity).
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    /// (free cpu, free memory) -> the nodes there, by name.
    pub(crate) by_cpu: BTreeMap<Point, BTreeSet<Arc<str>>>,
    /// The same points as (free memory, free cpu).
    pub(crate) by_mem: BTreeSet<Point>,
}

impl Group {
    fn insert(&mut self, free: Resources, name: &Arc<str>) {
        let names = self
            .by_cpu
            .entry((free.cpu_millis, free.memory_mb))
            .or_default();
        if names.is_empty() {
            self.by_mem.insert((free.memory_mb, free.cpu_millis));
        }
        names.insert(Arc::clone(name));
    }

    fn remove(&mut self, free: Resources, name: &str) {
        let point = (free.cpu_millis, free.memory_mb);
        let Some(names) = self.by_cpu.get_mut(&point) else {
            return;
        };
        names.remove(name);
        if names.is_empty() {
            self.by_cpu.remove(&point);
            self.by_mem.remove(&(free.memory_mb, free.cpu_millis));
        }
    }

    fn is_empty(&self) -> bool {
        self.by_cpu.is_empty()
    }
}

/// Queued jobs of one class that need the same resources.
#[derive(Clone, Debug, Default)]
pub(crate) struct Bucket {
    /// No ready node of the class is large enough: the jobs are not in
    /// `runnable`.
    pub(crate) parked: bool,
    pub(crate) jobs: BTreeSet<QueueKey>,
}

#[derive(Clone, Debug)]
pub(crate) struct Class {
    pub(crate) constraints: Labels,
    /// Node capacity -> the ready nodes of the class with it.
    pub(crate) groups: BTreeMap<Resources, Group>,
    /// Need -> the queued jobs of the class that need it.
    pub(crate) buckets: BTreeMap<Resources, Bucket>,
    /// Queued jobs in `buckets`.
    pub(crate) queued: usize,
    /// When it became idle (no queued job), on the index's own counter.
    pub(crate) idle_since: Option<u64>,
}

impl Class {
    /// Some ready node of the class is large enough for `need`.
    fn could_take(&self, need: &Resources) -> bool {
        self.groups.keys().any(|capacity| need.fits_in(capacity))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct NodeEntry {
    pub(crate) name: Arc<str>,
    pub(crate) ready: bool,
    pub(crate) capacity: Resources,
    /// Free capacity as the index holds it: the node's, except for the nodes
    /// a pass in progress placed on.
    pub(crate) free: Resources,
    pub(crate) labels: Labels,
    /// The classes it is a member of (empty unless ready).
    pub(crate) classes: Vec<ClassId>,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct SchedIndex {
    pub(crate) slots: BTreeMap<String, NodeSlot>,
    pub(crate) nodes: Vec<NodeEntry>,
    pub(crate) classes: BTreeMap<ClassId, Class>,
    pub(crate) class_of: BTreeMap<Labels, ClassId>,
    next_class: ClassId,
    /// Idle classes, oldest first: (idle since, class).
    idle: BTreeSet<(u64, ClassId)>,
    /// Counts class idlings, to order `idle`.
    idle_clock: u64,
    /// Queued jobs that some ready node could ever take (it satisfies their
    /// constraints and is large enough), in queue order, with their class.
    pub(crate) runnable: BTreeMap<QueueKey, ClassId>,
    /// Ready nodes with some free cpu and some free memory: while there is
    /// none, a pass stops at once.
    pub(crate) roomy: usize,
    /// Not kept (replay folds the log first and rebuilds the indexes once at
    /// the end, see [`crate::state::State::for_replay`]): everything above
    /// is empty, and no pass may run.
    pub(crate) suspended: bool,
}

/// Caches are not part of a state's identity.
impl PartialEq for SchedIndex {
    fn eq(&self, _: &SchedIndex) -> bool {
        true
    }
}

impl Eq for SchedIndex {}

impl std::hash::Hash for SchedIndex {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl std::fmt::Debug for SchedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedIndex")
            .field("nodes", &self.nodes.len())
            .field("classes", &self.classes.len())
            .field("runnable", &self.runnable.len())
            .field("roomy", &self.roomy)
            .finish()
    }
}

/// True when a node with `labels` satisfies every constraint (or, with the
/// planted bug, any one of them).
pub(crate) fn member(labels: &Labels, constraints: &Labels, bugs: &BugSet) -> bool {
    if planted!(bugs, ConstraintAnyMatch) && !constraints.is_empty() {
        return constraints.iter().any(|(k, v)| labels.get(k) == Some(v));
    }
    constraints
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

fn has_room(free: &Resources) -> bool {
    free.cpu_millis > 0 && free.memory_mb > 0
}

impl SchedIndex {
    pub fn runnable_len(&self) -> usize {
        self.runnable.len()
    }

    pub fn classes_len(&self) -> usize {
        self.classes.len()
    }

    /// True while the indexes are not kept (during replay).
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// Empty indexes that stay empty until rebuilt.
    pub(crate) fn suspended() -> SchedIndex {
        SchedIndex {
            suspended: true,
            ..SchedIndex::default()
        }
    }

    pub(crate) fn slot(&self, name: &str) -> Option<NodeSlot> {
        self.slots.get(name).copied()
    }

    /// A node was registered, or its state, labels or capacity changed:
    /// re-files it from `node` and parks or wakes the jobs of every class it
    /// joined or left.
    pub(crate) fn node_reset(&mut self, node: &Node, bugs: &BugSet) {
        if self.suspended {
            return;
        }
        let slot = match self.slots.get(node.name.as_str()) {
            Some(slot) => *slot,
            None => {
                let slot = NodeSlot::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
                self.slots.insert(node.name.clone(), slot);
                self.nodes.push(NodeEntry {
                    name: Arc::from(node.name.as_str()),
                    ready: false,
                    capacity: node.capacity,
                    free: node.free(),
                    labels: Labels::new(),
                    classes: Vec::new(),
                });
                slot
            }
        };
        let old_classes = self.unfile(slot);
        let entry = &mut self.nodes[slot as usize];
        entry.ready = node.accepts_work();
        entry.capacity = node.capacity;
        entry.free = node.free();
        if entry.labels != node.labels {
            entry.labels = node.labels.clone();
        }
        let mut affected: BTreeSet<ClassId> = old_classes.into_iter().collect();
        if entry.ready {
            let members: Vec<ClassId> = self
                .classes
                .iter()
                .filter(|(_, c)| member(&entry.labels, &c.constraints, bugs))
                .map(|(id, _)| *id)
                .collect();
            affected.extend(members.iter().copied());
            self.file(slot, members);
        }
        for class in affected {
            self.repark(class);
        }
    }

    /// Takes a node out of every class; returns the classes it was in.
    fn unfile(&mut self, slot: NodeSlot) -> Vec<ClassId> {
        let entry = &mut self.nodes[slot as usize];
        if !entry.ready {
            debug_assert!(entry.classes.is_empty());
            return Vec::new();
        }
        if has_room(&entry.free) {
            self.roomy -= 1;
        }
        let classes = std::mem::take(&mut entry.classes);
        for id in &classes {
            let Some(class) = self.classes.get_mut(id) else {
                continue;
            };
            if let Some(group) = class.groups.get_mut(&entry.capacity) {
                group.remove(entry.free, &entry.name);
                if group.is_empty() {
                    class.groups.remove(&entry.capacity);
                }
            }
        }
        entry.ready = false;
        classes
    }

    /// Puts a ready node into `members`.
    fn file(&mut self, slot: NodeSlot, members: Vec<ClassId>) {
        let entry = &mut self.nodes[slot as usize];
        debug_assert!(entry.ready && entry.classes.is_empty());
        if has_room(&entry.free) {
            self.roomy += 1;
        }
        for id in &members {
            if let Some(class) = self.classes.get_mut(id) {
                class
                    .groups
                    .entry(entry.capacity)
                    .or_default()
                    .insert(entry.free, &entry.name);
            }
        }
        entry.classes = members;
    }

    /// Sets a node's free capacity: after the reducer changed its allocation,
    /// or during a pass (the scheduler puts the node's own value back at the
    /// end of it).
    pub(crate) fn set_free(&mut self, slot: NodeSlot, free: Resources) {
        debug_assert!(!self.suspended);
        let entry = &mut self.nodes[slot as usize];
        if entry.free == free {
            return;
        }
        if entry.ready {
            if has_room(&entry.free) {
                self.roomy -= 1;
            }
            if has_room(&free) {
                self.roomy += 1;
            }
            for id in &entry.classes {
                let Some(group) = self
                    .classes
                    .get_mut(id)
                    .and_then(|c| c.groups.get_mut(&entry.capacity))
                else {
                    continue;
                };
                group.remove(entry.free, &entry.name);
                group.insert(free, &entry.name);
            }
        }
        entry.free = free;
    }

    /// Parks the class's buckets no ready node of it is large enough for and
    /// wakes those one now is.
    fn repark(&mut self, id: ClassId) {
        let Some(class) = self.classes.get_mut(&id) else {
            return;
        };
        let capacities: Vec<Resources> = class.groups.keys().copied().collect();
        for (need, bucket) in class.buckets.iter_mut() {
            let parked = !capacities.iter().any(|c| need.fits_in(c));
            if parked == bucket.parked {
                continue;
            }
            bucket.parked = parked;
            for key in &bucket.jobs {
                if parked {
                    self.runnable.remove(key);
                } else {
                    self.runnable.insert(*key, id);
                }
            }
        }
    }

    /// The class of `constraints`, made (with its member nodes) if new.
    fn class_for(&mut self, constraints: &Labels, bugs: &BugSet) -> ClassId {
        if let Some(id) = self.class_of.get(constraints) {
            return *id;
        }
        let id = self.next_class;
        self.next_class += 1;
        let mut class = Class {
            constraints: constraints.clone(),
            groups: BTreeMap::new(),
            buckets: BTreeMap::new(),
            queued: 0,
            idle_since: None,
        };
        for entry in self.nodes.iter_mut().filter(|e| e.ready) {
            if member(&entry.labels, constraints, bugs) {
                class
                    .groups
                    .entry(entry.capacity)
                    .or_default()
                    .insert(entry.free, &entry.name);
                entry.classes.push(id);
            }
        }
        self.classes.insert(id, class);
        self.class_of.insert(constraints.clone(), id);
        id
    }

    /// A job entered the queue with `key`.
    pub(crate) fn job_queued(
        &mut self,
        key: QueueKey,
        constraints: &Labels,
        need: Resources,
        bugs: &BugSet,
    ) {
        if self.suspended {
            return;
        }
        let id = self.class_for(constraints, bugs);
        let class = self.classes.get_mut(&id).expect("class_for made it");
        if let Some(since) = class.idle_since.take() {
            self.idle.remove(&(since, id));
        }
        class.queued += 1;
        let could = class.could_take(&need);
        let bucket = class.buckets.entry(need).or_insert_with(|| Bucket {
            parked: !could,
            jobs: BTreeSet::new(),
        });
        bucket.jobs.insert(key);
        if !bucket.parked {
            self.runnable.insert(key, id);
        }
    }

    /// A job with `key` left the queue.
    pub(crate) fn job_unqueued(&mut self, key: &QueueKey, constraints: &Labels, need: Resources) {
        if self.suspended {
            return;
        }
        let Some(id) = self.class_of.get(constraints).copied() else {
            return;
        };
        let class = self.classes.get_mut(&id).expect("class_of names a class");
        let Some(bucket) = class.buckets.get_mut(&need) else {
            return;
        };
        if !bucket.jobs.remove(key) {
            return;
        }
        if bucket.jobs.is_empty() {
            class.buckets.remove(&need);
        }
        self.runnable.remove(key);
        class.queued -= 1;
        if class.queued == 0 {
            self.idle_clock += 1;
            class.idle_since = Some(self.idle_clock);
            self.idle.insert((self.idle_clock, id));
            while self.idle.len() > CLASSES_IDLE_MAX {
                let (_, oldest) = self.idle.pop_first().expect("longer than the bound");
                self.drop_class(oldest);
            }
        }
    }

    fn drop_class(&mut self, id: ClassId) {
        let Some(class) = self.classes.remove(&id) else {
            return;
        };
        debug_assert_eq!(class.queued, 0);
        self.class_of.remove(&class.constraints);
        for group in class.groups.values() {
            for name in group.by_cpu.values().flatten() {
                if let Some(slot) = self.slots.get(&**name) {
                    self.nodes[*slot as usize].classes.retain(|c| *c != id);
                }
            }
        }
    }

    /// Compares every index with one computed from scratch out of `nodes`
    /// and the queued jobs (`queued`: key, constraints, need).
    pub(crate) fn check<'a>(
        &self,
        nodes: &BTreeMap<String, Node>,
        queued: impl Iterator<Item = (QueueKey, &'a Labels, Resources)>,
        bugs: &BugSet,
    ) -> Result<(), String> {
        if self.suspended {
            return Err("not kept (suspended for replay)".to_string());
        }
        if self.slots.len() != self.nodes.len() || self.slots.len() != nodes.len() {
            return Err(format!(
                "index has {} slots for {} nodes ({} in state)",
                self.slots.len(),
                self.nodes.len(),
                nodes.len()
            ));
        }
        let mut roomy = 0usize;
        for (name, node) in nodes {
            let Some(slot) = self.slot(name) else {
                return Err(format!("node {name} is not indexed"));
            };
            let e = &self.nodes[slot as usize];
            let want_classes: Vec<ClassId> = if node.accepts_work() {
                self.classes
                    .iter()
                    .filter(|(_, c)| member(&node.labels, &c.constraints, bugs))
                    .map(|(id, _)| *id)
                    .collect()
            } else {
                Vec::new()
            };
            let mut have_classes = e.classes.clone();
            have_classes.sort_unstable();
            if &*e.name != name.as_str()
                || e.ready != node.accepts_work()
                || e.capacity != node.capacity
                || e.free != node.free()
                || e.labels != node.labels
                || have_classes != want_classes
            {
                return Err(format!("node {name}: index entry {e:?} disagrees with {node:?} (classes {want_classes:?})"));
            }
            if e.ready && has_room(&e.free) {
                roomy += 1;
            }
        }
        if roomy != self.roomy {
            return Err(format!(
                "{} roomy nodes indexed, {roomy} by recount",
                self.roomy
            ));
        }
        // Groups: exactly the ready member nodes, at their free capacity.
        for (id, class) in &self.classes {
            if self.class_of.get(&class.constraints) != Some(id) {
                return Err(format!("class {id} is not filed under its constraints"));
            }
            let mut want: BTreeMap<Resources, BTreeMap<Point, BTreeSet<&str>>> = BTreeMap::new();
            for (name, node) in nodes {
                if node.accepts_work() && member(&node.labels, &class.constraints, bugs) {
                    let free = node.free();
                    want.entry(node.capacity)
                        .or_default()
                        .entry((free.cpu_millis, free.memory_mb))
                        .or_default()
                        .insert(name.as_str());
                }
            }
            let have: BTreeMap<Resources, BTreeMap<Point, BTreeSet<&str>>> = class
                .groups
                .iter()
                .map(|(cap, g)| {
                    let points = g
                        .by_cpu
                        .iter()
                        .map(|(p, names)| (*p, names.iter().map(|n| &**n).collect()))
                        .collect();
                    (*cap, points)
                })
                .collect();
            if have != want {
                return Err(format!(
                    "class {id} ({:?}): groups {have:?}, by recount {want:?}",
                    class.constraints
                ));
            }
            for (cap, g) in &class.groups {
                let mem: BTreeSet<Point> = g.by_cpu.keys().map(|(c, m)| (*m, *c)).collect();
                if mem != g.by_mem {
                    return Err(format!("class {id} group {cap:?}: memory order disagrees"));
                }
            }
            if (class.queued == 0) != class.idle_since.is_some() {
                return Err(format!(
                    "class {id}: {} queued, idle {:?}",
                    class.queued, class.idle_since
                ));
            }
        }
        if self.class_of.len() != self.classes.len() {
            return Err("class_of and classes disagree".to_string());
        }
        // Buckets and runnable: every queued job in its class's bucket, and
        // runnable exactly when some ready node satisfies it and is large
        // enough (judged here from the nodes, not from the classes).
        let mut want_buckets: BTreeMap<ClassId, BTreeMap<Resources, BTreeSet<QueueKey>>> =
            BTreeMap::new();
        let mut want_runnable: BTreeMap<QueueKey, ClassId> = BTreeMap::new();
        for (key, constraints, need) in queued {
            let Some(id) = self.class_of.get(constraints) else {
                return Err(format!("queued job {} has no class", key.job));
            };
            want_buckets
                .entry(*id)
                .or_default()
                .entry(need)
                .or_default()
                .insert(key);
            let could = nodes.values().any(|n| {
                n.accepts_work()
                    && member(&n.labels, constraints, bugs)
                    && need.fits_in(&n.capacity)
            });
            if could {
                want_runnable.insert(key, *id);
            }
        }
        for (id, class) in &self.classes {
            let have: BTreeMap<Resources, BTreeSet<QueueKey>> = class
                .buckets
                .iter()
                .map(|(need, b)| (*need, b.jobs.clone()))
                .collect();
            let want = want_buckets.remove(id).unwrap_or_default();
            if have != want {
                return Err(format!("class {id}: buckets disagree with the queue"));
            }
            let count: usize = have.values().map(BTreeSet::len).sum();
            if count != class.queued {
                return Err(format!(
                    "class {id}: {} queued, {count} in buckets",
                    class.queued
                ));
            }
            for (need, b) in &class.buckets {
                if b.parked == class.could_take(need) {
                    return Err(format!("class {id}: bucket {need:?} parked {}", b.parked));
                }
            }
        }
        if want_runnable != self.runnable {
            return Err(format!(
                "runnable holds {} jobs, {} by recount",
                self.runnable.len(),
                want_runnable.len()
            ));
        }
        let idle: BTreeSet<(u64, ClassId)> = self
            .classes
            .iter()
            .filter_map(|(id, c)| c.idle_since.map(|s| (s, *id)))
            .collect();
        if idle != self.idle || idle.len() > CLASSES_IDLE_MAX {
            return Err("idle classes disagree".to_string());
        }
        Ok(())
    }
}
