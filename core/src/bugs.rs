//! Planted bugs, compiled only with the `sim-bugs` feature.
//!
//! The simulator proves its checkers bite by switching one of these on and
//! sweeping seeds until an invariant fails. Core stays pure: the selection is
//! a value carried by [`crate::replica::Config`] (and copied into
//! [`crate::state::State`] for the reducer and the scheduler), never a global.

/// Which planted bugs are active. All off by default.
///
/// Never part of a state's identity: equality and hashing ignore it, so a
/// state folded with bugs selected still digests like any other state.
#[derive(Clone, Copy, Debug, Default)]
pub struct BugSet {
    /// (a) `scheduler::schedule_pass` places jobs without checking free capacity.
    pub scheduler_skips_capacity: bool,
    /// (b) The reducer (and the replica's pre-filter) apply a runner result
    /// to an attempt that is no longer the job's active attempt.
    pub stale_result_applied: bool,
    /// (c) The replica acknowledges a submission before its entry is durable.
    pub ack_before_durable: bool,
}

impl PartialEq for BugSet {
    fn eq(&self, _: &BugSet) -> bool {
        true
    }
}

impl Eq for BugSet {}

impl std::hash::Hash for BugSet {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}
