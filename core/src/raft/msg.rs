//! What Raft nodes say to each other, and the entries and hard state they
//! agree on. Plain data: `net` and `storage` choose the wire and disk formats.

use std::fmt::Debug;

use serde::{Deserialize, Serialize};

pub use crate::event::{LogIndex, Term};

/// A member of the Raft group (the replica id, 1-based).
pub type NodeId = crate::event::ReplicaId;

/// What the application stores in the log. Raft never looks inside; it only
/// needs a size for batching, a payload for a new leader's first entry and
/// to know which entries change the voters.
pub trait Payload: Clone + Debug + PartialEq {
    /// Approximate encoded size, for `Config::append_bytes_max`.
    fn size_bytes(&self) -> u64;
    /// The entry a node appends first when it becomes leader of `term`
    /// (the replica makes it a `LeaderElected` event). Committing it commits
    /// every earlier entry (paper §5.4.2, §8). `stamp` is whatever the
    /// driver last gave [`super::Raft::set_stamp`] (the replica's wall-clock
    /// stamp for new entries); Raft never reads it.
    fn leader_elected(term: Term, leader: NodeId, stamp: u64) -> Self;
    /// The voters this entry makes the configuration, if it is a
    /// membership change (Ongaro's thesis §4.1): from the moment a node's
    /// log holds it, committed or not, the group is exactly these voters,
    /// until a later change (or a truncation that removes this one). A
    /// leader appends one only through [`super::Raft::propose_change`].
    fn voters_change(&self) -> Option<Voters> {
        None
    }
}

/// The largest node id a [`Voters`] set can hold.
pub const NODE_ID_MAX: NodeId = 63;

/// A set of voters: node ids `1..=NODE_ID_MAX` as a bitset, so that a
/// configuration is `Copy` and costs one word. Serialized as the list of
/// its ids.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Voters(u64);

impl Voters {
    pub const fn new() -> Voters {
        Voters(0)
    }

    /// Whether `id` can be a voter at all (`1..=NODE_ID_MAX`).
    pub const fn valid_id(id: NodeId) -> bool {
        id >= 1 && id <= NODE_ID_MAX
    }

    pub fn contains(self, id: NodeId) -> bool {
        Voters::valid_id(id) && self.0 & (1 << id) != 0
    }

    /// Adds `id` (panics if it is not a valid id); false if it was there.
    pub fn insert(&mut self, id: NodeId) -> bool {
        assert!(
            Voters::valid_id(id),
            "node id {id} is outside 1..={NODE_ID_MAX}"
        );
        let was = self.contains(id);
        self.0 |= 1 << id;
        !was
    }

    /// Removes `id`; false if it was not there.
    pub fn remove(&mut self, id: NodeId) -> bool {
        let was = self.contains(id);
        if was {
            self.0 &= !(1 << id);
        }
        was
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Votes (or acknowledgements) that make a majority of these voters.
    pub fn quorum(self) -> usize {
        self.len() / 2 + 1
    }

    /// The ids in ascending order.
    pub fn iter(self) -> VotersIter {
        VotersIter(self.0)
    }

    /// Ids in exactly one of the two sets (what a change adds or removes).
    pub fn symmetric_difference(self, other: Voters) -> Voters {
        Voters(self.0 ^ other.0)
    }
}

impl std::fmt::Debug for Voters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<NodeId> for Voters {
    fn from_iter<I: IntoIterator<Item = NodeId>>(ids: I) -> Voters {
        let mut v = Voters::new();
        for id in ids {
            v.insert(id);
        }
        v
    }
}

impl<'a> FromIterator<&'a NodeId> for Voters {
    fn from_iter<I: IntoIterator<Item = &'a NodeId>>(ids: I) -> Voters {
        ids.into_iter().copied().collect()
    }
}

/// The ids of a [`Voters`] set, ascending.
#[derive(Clone, Debug)]
pub struct VotersIter(u64);

impl Iterator for VotersIter {
    type Item = NodeId;
    fn next(&mut self) -> Option<NodeId> {
        if self.0 == 0 {
            return None;
        }
        let id = self.0.trailing_zeros() as NodeId;
        self.0 &= self.0 - 1;
        Some(id)
    }
}

impl IntoIterator for Voters {
    type Item = NodeId;
    type IntoIter = VotersIter;
    fn into_iter(self) -> VotersIter {
        self.iter()
    }
}

impl From<Voters> for std::collections::BTreeSet<NodeId> {
    fn from(v: Voters) -> Self {
        v.iter().collect()
    }
}

impl Serialize for Voters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Voters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Voters, D::Error> {
        let ids = Vec::<NodeId>::deserialize(d)?;
        let mut v = Voters::new();
        for id in ids {
            if !Voters::valid_id(id) {
                return Err(serde::de::Error::custom(format!(
                    "voter id {id} is outside 1..={NODE_ID_MAX}"
                )));
            }
            v.insert(id);
        }
        Ok(v)
    }
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
        /// The configuration in effect at `meta.index` (the latest change
        /// the snapshot covers): the follower's once it installs it.
        voters: Voters,
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
