//! What Raft nodes say to each other, and the entries and hard state they
//! agree on. Plain data: `net` and `storage` choose the wire and disk formats.

use std::fmt::Debug;

use serde::{Deserialize, Serialize};

pub use crate::event::{LogIndex, Term};

/// A member of the Raft group (the replica id, 1-based).
pub type NodeId = crate::event::ReplicaId;

/// What the application stores in the log. Raft never looks inside; it only
/// needs a size for batching and a payload for a new leader's first entry.
pub trait Payload: Clone + Debug + PartialEq {
    /// Approximate encoded size, for `Config::append_bytes_max`.
    fn size_bytes(&self) -> u64;
    /// The entry a node appends first when it becomes leader of `term`
    /// (the replica makes it a `LeaderElected` event). Committing it commits
    /// every earlier entry (paper §5.4.2, §8). `stamp` is whatever the
    /// driver last gave [`super::Raft::set_stamp`] (the replica's wall-clock
    /// stamp for new entries); Raft never reads it.
    fn leader_elected(term: Term, leader: NodeId, stamp: u64) -> Self;
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<T> {
    pub index: LogIndex,
    pub term: Term,
    pub data: T,
}

/// What a node must keep across crashes besides its log: the term it is in,
/// whom it voted for in that term, and how far it knows the log committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: Term,
    pub vote: Option<NodeId>,
    pub commit: LogIndex,
}

/// The last entry a snapshot of the application's state covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub index: LogIndex,
    pub term: Term,
}

/// A message between two nodes. `term` is the sender's term, except for a
/// pre-vote request (the term the sender would campaign in) and a granted
/// pre-vote response (that same future term).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message<T> {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: Body<T>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<T> {
    /// "Would you vote for me?", asked before disturbing anyone's term
    /// (Ongaro's thesis §9.6). Granting it records nothing.
    PreVote {
        last_index: LogIndex,
        last_term: Term,
    },
    PreVoteResp {
        granted: bool,
    },
    /// RequestVote (paper §5.2). `transfer` is set when the sender campaigns
    /// because the leader handed over to it (TimeoutNow): followers then
    /// grant it even though they heard from that leader recently.
    Vote {
        last_index: LogIndex,
        last_term: Term,
        transfer: bool,
    },
    VoteResp {
        granted: bool,
    },
    /// AppendEntries (paper §5.3). `entries` follow `prev_index` without gaps.
    Append {
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry<T>>,
        commit: LogIndex,
    },
    AppendResp {
        /// Accepted: the follower's log matches the leader's up to `index`.
        /// Rejected: the `prev_index` the follower could not match.
        index: LogIndex,
        reject: Option<RejectHint>,
    },
    /// The leader's periodic "I am here". `commit` is at most what the
    /// follower is known to hold, so it never commits entries it lacks.
    Heartbeat {
        commit: LogIndex,
        /// Counts the leader's heartbeat broadcasts; echoed in the answer,
        /// so the leader knows a quorum heard it after a read began
        /// (ReadIndex, thesis §6.4).
        round: u64,
    },
    HeartbeatResp {
        round: u64,
    },
    /// InstallSnapshot (paper §7): the entries this follower needs are
    /// compacted away. Raft handles only the metadata; the sending driver
    /// attaches the snapshot's bytes from its storage, the receiving driver
    /// keeps them until a persist unit installs them (or drops them).
    /// Answered with an `AppendResp`.
    InstallSnapshot {
        meta: SnapshotMeta,
    },
    /// The leader hands over: campaign now (leadership transfer, §3.10 of
    /// Ongaro's thesis).
    TimeoutNow,
}

/// Where a follower's log may start agreeing with the leader's, so the
/// leader skips a whole term's worth of entries per round trip instead of
/// one entry (paper §5.3, the optimization at the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectHint {
    /// The largest index at or below the rejected one whose term is at most
    /// the leader's `prev_term`.
    pub index: LogIndex,
    /// The follower's term at `index` (0 for index 0).
    pub term: Term,
}

impl<T> Body<T> {
    /// Messages a leader sends; a node that sees one at a newer term
    /// learns who leads it.
    pub fn is_from_leader(&self) -> bool {
        matches!(
            self,
            Body::Append { .. }
                | Body::Heartbeat { .. }
                | Body::InstallSnapshot { .. }
                | Body::TimeoutNow
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Body::PreVote { .. } => "pre_vote",
            Body::PreVoteResp { .. } => "pre_vote_resp",
            Body::Vote { .. } => "vote",
            Body::VoteResp { .. } => "vote_resp",
            Body::Append { .. } => "append",
            Body::AppendResp { .. } => "append_resp",
            Body::Heartbeat { .. } => "heartbeat",
            Body::HeartbeatResp { .. } => "heartbeat_resp",
            Body::InstallSnapshot { .. } => "install_snapshot",
            Body::TimeoutNow => "timeout_now",
        }
    }
}
