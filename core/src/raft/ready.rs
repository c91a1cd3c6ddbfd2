//! The outputs of a Raft node, drained as one value ([`Ready`]) after each
//! batch of inputs. The order in which a driver acts on them is the driver
//! contract in the module doc of [`crate::raft`].

use super::msg::{Entry, HardState, LogIndex, Message, NodeId, SnapshotMeta, Term, Voters};

/// Everything a node wants done since the last [`super::Raft::ready`].
#[derive(Clone, Debug, PartialEq)]
pub struct Ready<T> {
    /// Make this durable as one unit (one transaction, one fsync) before
    /// sending any message of this `Ready`.
    pub persist: Option<Persist<T>>,
    /// Send these only after `persist` (and every earlier one) is durable:
    /// a vote or an append acknowledgement promises what the disk holds.
    pub messages: Vec<Message<T>>,
    /// Replace the application's state with the snapshot received from the
    /// leader with this metadata, before applying `committed`.
    pub restore: Option<SnapshotMeta>,
    /// Committed entries to apply, in index order, each exactly once. They
    /// are already durable here, so they may be applied at once.
    pub committed: Vec<Entry<T>>,
    /// Read these from storage and hand them back through
    /// [`super::Raft::entries_loaded`]: a follower needs entries no longer
    /// in memory.
    pub need_entries: Vec<NeedEntries>,
    /// The node's role, term, leader or `degraded` flag changed.
    pub status: Option<Status>,
    /// The configuration in effect changed (or this is the node's first
    /// `Ready`): the voters of the latest change entry in the log,
    /// committed or not. Send to a new voter, stop sending to a removed
    /// one.
    pub voters: Option<Voters>,
    /// Reads asked with [`super::Raft::read_index`] whose leadership check
    /// passed: each may be served once the application has applied
    /// `index`.
    pub reads: Vec<ReadState>,
}

/// A read confirmed linearizable at `index` (ReadIndex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub ctx: u64,
    pub index: super::msg::LogIndex,
}

impl<T> Ready<T> {
    pub fn is_empty(&self) -> bool {
        self.persist.is_none()
            && self.messages.is_empty()
            && self.restore.is_none()
            && self.committed.is_empty()
            && self.need_entries.is_empty()
            && self.status.is_none()
            && self.voters.is_none()
            && self.reads.is_empty()
    }
}

/// One atomic write, in this order: install `snapshot` (the one received
/// with that metadata; it replaces the whole stored log), drop stored
/// entries from `truncate_from` on, append `entries`, store `hard_state`
/// (each when given).
#[derive(Clone, Debug, PartialEq)]
pub struct Persist<T> {
    pub snapshot: Option<SnapshotMeta>,
    pub hard_state: Option<HardState>,
    pub truncate_from: Option<LogIndex>,
    pub entries: Vec<Entry<T>>,
}

impl<T> Persist<T> {
    /// `(index, term)` of the last entry, what [`super::Raft::persisted`]
    /// is told once the unit is durable (the snapshot's, if no entries).
    pub fn last(&self) -> Option<(LogIndex, Term)> {
        self.entries
            .last()
            .map(|e| (e.index, e.term))
            .or(self.snapshot.map(|s| (s.index, s.term)))
    }
}

/// The leader asks storage for entries `from..=to` for follower `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedEntries {
    pub peer: NodeId,
    pub from: LogIndex,
    pub to: LogIndex,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Asking for pre-votes; its term has not moved yet.
    PreCandidate,
    Candidate,
    Leader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    /// A leader that did not hear from every follower within the last
    /// election timeout (it still has a quorum, else it steps down).
    pub degraded: bool,
}
