//! Planted bugs, compiled only with the `sim-bugs` feature.
//!
//! The simulator proves its checkers bite by switching one of these on and
//! sweeping seeds until an invariant fails. Core stays pure: the selection is
//! a value carried by [`crate::replica::Config`] (and copied into
//! [`crate::state::State`] for the reducer and the scheduler), never a global.
//!
//! Each variant is one small, plausible slip of the kind a contributor could
//! make; `docs/simulation.md` keeps the mutation study (which invariant
//! catches each, and how fast). Code sites test a bug with the [`planted!`]
//! macro, which is the constant `false` in a build without the feature.

/// One planted bug. The first three are the simulator's original self-test;
/// the rest are the mutation study of `docs/simulation.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bug {
    /// `scheduler::schedule_pass` places jobs without checking free capacity.
    SchedulerSkipsCapacity,
    /// The reducer (and the replica's pre-filter) apply a runner result to an
    /// attempt that is no longer the job's active attempt.
    StaleResultApplied,
    /// The replica acknowledges a submission before its entry is durable.
    AckBeforeDurable,
    /// The scheduler's fit check compares cpu only, not memory.
    FitIgnoresMemory,
    /// The scheduler's constraint match accepts a node that matches any one
    /// constraint instead of all of them.
    ConstraintAnyMatch,
    /// Within a priority the queue is LIFO instead of FIFO.
    QueueLifo,
    /// Lower priorities sort first.
    PriorityInverted,
    /// A failed attempt is retried while `retries_used <= max_retries`.
    RetryOneTooMany,
    /// A job fails one attempt before its retry budget is spent.
    RetryOneTooFew,
    /// A lost attempt spends a retry.
    LostSpendsRetry,
    /// A node that re-registers with a new incarnation is handed the
    /// attempts of the old one in its view.
    RestartNotNoticed,
    /// The replica forgets that a pass stopped at its bounds.
    TruncatedPassForgotten,
    /// Jobs no ready node could ever take count against the scan bound.
    UnplaceableBlocksScan,
    /// The replica schedules only new submissions after a node (re)joined,
    /// so neither its capacity nor the attempts it requeued are looked at.
    RejoinNeedsNoPass,
    /// A lost attempt of a cancelled job requeues it.
    LostRequeuesCancelled,
    /// The reducer records a drain but the node keeps accepting work.
    DrainIgnored,
    /// The reducer forgets a submission's idempotency key.
    IdempotencyKeyForgotten,
    /// Among fitting nodes the loosest fit wins instead of the tightest.
    LoosestFit,
    /// Entries are stamped with the proposer's clock even when it went back.
    StampFollowsClock,
    /// Replay by value (`State::apply_owned`, what start-up uses) moves the
    /// spec into the job and drops the idempotency key.
    OwnedReplayDropsKey,
    /// The attempts of a down or removed node are requeued without waiting
    /// for its lease to lapse.
    RequeueBeforeLeaseLapses,
    /// A report resent while its first copy is still on its way to the log
    /// is appended again.
    ReportAppendedTwice,
    /// The scheduler computes the reservation for a job that fits no node
    /// now but lets backfill use the reserved node as if it were not held.
    BackfillIgnoresReservation,
    /// Raft: votes and append acknowledgements are sent before the unit
    /// that records them is durable (a crash takes them back).
    VoteWithoutPersist,
    /// Raft: the leader commits what its own disk holds, quorum or not.
    AckWithoutQuorum,
    /// Raft: the leader commits the highest index a quorum holds even when
    /// that entry is of an earlier term (the paper's Figure 8, §5.4.2).
    CommitEarlierTermByCount,
    /// A replica that does not lead answers a linearizable read from its
    /// own applied state instead of refusing it (stale follower reads).
    ReadFromFollower,
}

impl Bug {
    pub const ALL: [Bug; 27] = [
        Bug::SchedulerSkipsCapacity,
        Bug::StaleResultApplied,
        Bug::AckBeforeDurable,
        Bug::FitIgnoresMemory,
        Bug::ConstraintAnyMatch,
        Bug::QueueLifo,
        Bug::PriorityInverted,
        Bug::RetryOneTooMany,
        Bug::RetryOneTooFew,
        Bug::LostSpendsRetry,
        Bug::RestartNotNoticed,
        Bug::TruncatedPassForgotten,
        Bug::UnplaceableBlocksScan,
        Bug::RejoinNeedsNoPass,
        Bug::LostRequeuesCancelled,
        Bug::DrainIgnored,
        Bug::IdempotencyKeyForgotten,
        Bug::LoosestFit,
        Bug::StampFollowsClock,
        Bug::OwnedReplayDropsKey,
        Bug::RequeueBeforeLeaseLapses,
        Bug::ReportAppendedTwice,
        Bug::BackfillIgnoresReservation,
        Bug::VoteWithoutPersist,
        Bug::AckWithoutQuorum,
        Bug::CommitEarlierTermByCount,
        Bug::ReadFromFollower,
    ];
}

/// Which planted bug is active, if any. None by default.
///
/// Never part of a state's identity: equality and hashing ignore it, so a
/// state folded with a bug selected still digests like any other state.
#[derive(Clone, Copy, Debug, Default)]
pub struct BugSet {
    pub active: Option<Bug>,
}

impl BugSet {
    pub fn only(bug: Bug) -> BugSet {
        BugSet { active: Some(bug) }
    }

    pub fn is(&self, bug: Bug) -> bool {
        self.active == Some(bug)
    }
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

/// `planted!(bugs, Name)`: true when the planted bug `Bug::Name` is selected
/// in `bugs` (a [`BugSet`]); the constant `false` without `sim-bugs`.
#[cfg(feature = "sim-bugs")]
#[macro_export]
macro_rules! planted {
    ($bugs:expr, $bug:ident) => {
        $bugs.is($crate::bugs::Bug::$bug)
    };
}

/// `planted!(bugs, Name)`: true when the planted bug `Bug::Name` is selected
/// in `bugs`; the constant `false` in this build (no `sim-bugs`).
#[cfg(not(feature = "sim-bugs"))]
#[macro_export]
macro_rules! planted {
    ($bugs:expr, $bug:ident) => {
        $crate::bugs::dormant(&$bugs, stringify!($bug))
    };
}

/// What [`planted!`] expands to without `sim-bugs`: always false (it names
/// the bug so that two different sites never read as the same condition).
#[cfg(not(feature = "sim-bugs"))]
#[inline(always)]
pub fn dormant(_bugs: &BugSet, _bug: &'static str) -> bool {
    false
}
