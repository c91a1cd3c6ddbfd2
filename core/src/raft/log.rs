//! The node's view of its log: the term of every entry (as runs, so it stays
//! small however long the log grows), the newest entries in memory, and how
//! far the driver has made them durable.
//!
//! Older entries live only in the driver's storage; a leader that needs them
//! for a lagging follower asks for them (`Ready::need_entries`). Entries up
//! to the snapshot `base` are gone from storage too (compacted); a follower
//! that needs them gets the snapshot. This file never decides anything about
//! elections or commit; it keeps the books.

use std::collections::VecDeque;

use super::msg::{Entry, LogIndex, SnapshotMeta, Term};

/// The log view. Invariants (checked by [`Log::check`]):
/// - `runs` starts with index `base + 1` when the log holds entries after
///   the base, is strictly increasing in index and in term (from the base's
///   term on), and covers `base + 1..=last_index`;
/// - `cache` holds `cache_first()..=last_index` without gaps, and every
///   entry after `min(applied, stable_index)`;
/// - `applied <= committed <= last_index`, `applied <= stable_index`.
#[derive(Clone, Debug)]
pub(crate) struct Log<T> {
    /// The last entry covered by the latest snapshot (`0, 0` before any):
    /// its term is known, the entries up to it are not.
    base: SnapshotMeta,
    /// `(first index, term)` of each run of equal terms after `base`.
    runs: Vec<(LogIndex, Term)>,
    last_index: LogIndex,
    /// The newest entries; older ones were evicted once durable and applied.
    cache: VecDeque<Entry<T>>,
    /// Entries kept in memory beyond those that must stay.
    cache_entries_max: usize,
    /// The driver reported entries up to here durable (and they are still ours).
    pub(crate) stable_index: LogIndex,
    /// First entry not yet handed to the driver in a persist unit.
    persist_next: LogIndex,
    /// The last index handed to the driver in a persist unit that is still
    /// part of the log: a truncation below it must reach storage too.
    handed_last: LogIndex,
    /// A truncation the next persist unit must carry (lowest one wins).
    truncate_from: Option<LogIndex>,
    pub(crate) committed: LogIndex,
    /// Entries up to here were handed to the application.
    pub(crate) applied: LogIndex,
    /// A snapshot received from the leader replaced the log; the next persist
    /// unit installs it and the application restores from it.
    install: Option<SnapshotMeta>,
}

/// One persist unit's share of the log: install `snapshot` (dropping the
/// whole stored log), drop storage's entries from `truncate_from` on, then
/// append `entries`.
pub(crate) struct Unstable<T> {
    pub snapshot: Option<SnapshotMeta>,
    pub truncate_from: Option<LogIndex>,
    pub entries: Vec<Entry<T>>,
}

impl<T: Clone> Log<T> {
    /// A log recovered from storage: `base` is its snapshot, `runs` and
    /// `last_index` describe the entries after it, `tail` holds every entry
    /// after `committed` (all durable).
    pub(crate) fn recover(
        base: SnapshotMeta,
        runs: Vec<(LogIndex, Term)>,
        last_index: LogIndex,
        committed: LogIndex,
        tail: Vec<Entry<T>>,
        cache_entries_max: usize,
    ) -> Log<T> {
        assert!(committed <= last_index, "commit past the recovered log");
        assert!(
            base.index <= committed,
            "the snapshot holds committed entries only"
        );
        assert_eq!(
            tail.len() as u64,
            last_index - committed,
            "the recovered tail must hold every entry after the commit index"
        );
        let log = Log {
            base,
            runs,
            last_index,
            cache: tail.into(),
            cache_entries_max,
            stable_index: last_index,
            persist_next: last_index + 1,
            handed_last: last_index,
            truncate_from: None,
            committed,
            applied: committed,
            install: None,
        };
        for e in &log.cache {
            assert_eq!(Some(e.term), log.term(e.index), "tail disagrees with runs");
        }
        log.check();
        log
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.last_index
    }

    pub(crate) fn last_term(&self) -> Term {
        self.runs.last().map_or(self.base.term, |r| r.1)
    }

    /// The latest snapshot: entries up to it are compacted away.
    pub(crate) fn base(&self) -> SnapshotMeta {
        self.base
    }

    /// First index held in memory (`last_index + 1` when none is).
    pub(crate) fn cache_first(&self) -> LogIndex {
        self.cache.front().map_or(self.last_index + 1, |e| e.index)
    }

    /// The term of the entry at `index`; the base's term at the base (0 for
    /// index 0), `None` before the base (compacted) or past the end.
    pub(crate) fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.base.index {
            return Some(self.base.term);
        }
        if index < self.base.index || index > self.last_index {
            return None;
        }
        let run = self.runs.partition_point(|r| r.0 <= index);
        assert!(run > 0, "runs cover the whole log");
        Some(self.runs[run - 1].1)
    }

    /// Is a log ending at `(last_index, last_term)` at least as up to date
    /// as ours (paper §5.4.1)?
    pub(crate) fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index)
    }

    /// The largest index at or below `index` whose term is at most `term`,
    /// looking no further back than the base (committed, so it agrees with
    /// every leader); an `index` before the base comes back as it is. Used
    /// on both sides of the conflict hint.
    pub(crate) fn last_index_with_term_at_most(&self, index: LogIndex, term: Term) -> LogIndex {
        let mut i = index.min(self.last_index);
        if i <= self.base.index {
            return i;
        }
        let mut run = self.runs.partition_point(|r| r.0 <= i);
        while run > 0 {
            let (first, t) = self.runs[run - 1];
            if t <= term {
                return i;
            }
            i = first - 1;
            run -= 1;
        }
        self.base.index
    }

    /// Entries `lo..=hi` if all are in memory, at most `entries_max` of them
    /// and `bytes_max` bytes (at least one), by `size`.
    pub(crate) fn slice(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        entries_max: usize,
        bytes_max: u64,
        size: impl Fn(&T) -> u64,
    ) -> Option<Vec<Entry<T>>> {
        assert!(lo > self.base.index && hi <= self.last_index && lo <= hi);
        if lo < self.cache_first() {
            return None;
        }
        let start = (lo - self.cache_first()) as usize;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for e in self.cache.range(start..).take_while(|e| e.index <= hi) {
            bytes = bytes.saturating_add(size(&e.data));
            if !out.is_empty() && (out.len() >= entries_max || bytes > bytes_max) {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// Appends one entry at the end (a leader's proposal).
    pub(crate) fn push(&mut self, term: Term, data: T) -> LogIndex {
        assert!(
            term >= self.last_term(),
            "terms never decrease along the log"
        );
        let index = self.last_index + 1;
        if term != self.last_term() || self.runs.is_empty() {
            self.runs.push((index, term));
        }
        self.cache.push_back(Entry { index, term, data });
        self.last_index = index;
        index
    }

    /// Drops every entry from `from` on. Committed entries are never
    /// dropped; the caller checked (and the assertion keeps it honest).
    pub(crate) fn truncate(&mut self, from: LogIndex) {
        assert!(from > self.committed, "truncating committed entry {from}");
        assert!(
            from >= self.cache_first(),
            "uncommitted entries stay in memory"
        );
        if from > self.last_index {
            return;
        }
        let keep = (from - self.cache_first()) as usize;
        self.cache.truncate(keep);
        let run = self.runs.partition_point(|r| r.0 < from);
        self.runs.truncate(run);
        self.last_index = from - 1;
        self.stable_index = self.stable_index.min(from - 1);
        self.persist_next = self.persist_next.min(from);
        if from <= self.handed_last {
            self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
            self.handed_last = from - 1;
        }
    }

    /// Merges a leader's entries (which follow `prev_index` in its log):
    /// skips those we already have, truncates at the first conflict, appends
    /// the rest. Returns the index of the last entry the leader sent.
    pub(crate) fn merge(&mut self, prev_index: LogIndex, entries: Vec<Entry<T>>) -> LogIndex {
        let last_new = prev_index + entries.len() as u64;
        let mut rest = entries.into_iter().peekable();
        while let Some(e) = rest.peek() {
            match self.term(e.index) {
                Some(t) if t == e.term => {
                    rest.next();
                }
                Some(_) => {
                    self.truncate(e.index);
                    break;
                }
                None => break,
            }
        }
        for e in rest {
            assert_eq!(e.index, self.last_index + 1, "entries follow without gaps");
            self.push(e.term, e.data);
        }
        last_new
    }

    /// The driver made entries up to `(index, term)` durable. A notice about
    /// entries since replaced (another term at that index) or dropped is
    /// late and changes nothing.
    pub(crate) fn persisted(&mut self, index: LogIndex, term: Term) -> bool {
        if index <= self.stable_index
            || self.term(index) != Some(term)
            || index >= self.persist_next
        {
            return false;
        }
        self.stable_index = index;
        true
    }

    /// Takes what the next persist unit must carry.
    pub(crate) fn take_unstable(&mut self) -> Unstable<T> {
        let from = self.persist_next.max(self.cache_first());
        assert_eq!(
            from, self.persist_next,
            "unpersisted entries stay in memory"
        );
        let entries: Vec<Entry<T>> = if from <= self.last_index {
            let start = (from - self.cache_first()) as usize;
            self.cache.range(start..).cloned().collect()
        } else {
            Vec::new()
        };
        self.persist_next = self.last_index + 1;
        self.handed_last = self.last_index;
        Unstable {
            snapshot: self.install.take(),
            truncate_from: self.truncate_from.take(),
            entries,
        }
    }

    pub(crate) fn has_unstable(&self) -> bool {
        self.persist_next <= self.last_index
            || self.truncate_from.is_some()
            || self.install.is_some()
    }

    /// Committed, durable entries not yet handed to the application, at most
    /// `entries_max` of them; marks them applied.
    pub(crate) fn take_committed(&mut self, entries_max: usize) -> Vec<Entry<T>> {
        let hi = self.committed.min(self.stable_index);
        if hi <= self.applied {
            return Vec::new();
        }
        let lo = self.applied + 1;
        assert!(lo >= self.cache_first(), "unapplied entries stay in memory");
        let start = (lo - self.cache_first()) as usize;
        let out: Vec<Entry<T>> = self
            .cache
            .range(start..)
            .take_while(|e| e.index <= hi)
            .take(entries_max)
            .cloned()
            .collect();
        self.applied = out.last().map_or(self.applied, |e| e.index);
        self.evict();
        out
    }

    pub(crate) fn has_committed(&self) -> bool {
        self.committed.min(self.stable_index) > self.applied
    }

    /// Forgets the oldest in-memory entries beyond the cache bound, but only
    /// those durable and applied (storage can give them back).
    fn evict(&mut self) {
        let evictable_to = self.applied.min(self.stable_index);
        while self.cache.len() > self.cache_entries_max {
            match self.cache.front() {
                Some(e) if e.index <= evictable_to => {
                    self.cache.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The driver stored a snapshot of the application's state at `index`
    /// and drops the entries up to it: they become the base.
    pub(crate) fn compact(&mut self, index: LogIndex) {
        assert!(index > self.base.index, "compacting behind the base");
        assert!(
            index <= self.applied && index <= self.stable_index,
            "snapshot of unapplied entries"
        );
        let term = self.term(index).expect("compacted entry is in the log");
        let next_term = self.term(index + 1);
        let first_kept = self.runs.partition_point(|r| r.0 <= index);
        let mut runs: Vec<(LogIndex, Term)> = self.runs.split_off(first_kept);
        if let Some(t) = next_term {
            if runs.first().is_none_or(|r| r.0 > index + 1) {
                runs.insert(0, (index + 1, t));
            }
        }
        self.runs = runs;
        self.base = SnapshotMeta { index, term };
        while self.cache.front().is_some_and(|e| e.index <= index) {
            self.cache.pop_front();
        }
    }

    /// A leader's snapshot replaces the whole log (whose entries after the
    /// snapshot's index, if any, are not known to agree with it).
    pub(crate) fn install(&mut self, meta: SnapshotMeta) {
        assert!(meta.index > self.committed, "installing an old snapshot");
        self.base = meta;
        self.runs.clear();
        self.cache.clear();
        self.last_index = meta.index;
        self.committed = meta.index;
        self.applied = meta.index;
        // Committed on a quorum already; nothing here counts on its being
        // durable locally, and acknowledgements wait for the unit anyway.
        self.stable_index = meta.index;
        self.persist_next = meta.index + 1;
        self.handed_last = meta.index;
        self.truncate_from = None;
        self.install = Some(meta);
    }

    /// Checks the invariants listed on [`Log`]; cheap enough to run after
    /// every input in debug builds.
    pub(crate) fn check(&self) {
        assert!(self.base.index <= self.applied);
        assert!(self.applied <= self.committed && self.committed <= self.last_index);
        assert!(self.applied <= self.stable_index && self.stable_index <= self.last_index);
        assert!(self.persist_next <= self.last_index + 1);
        if self.last_index == self.base.index {
            assert!(self.runs.is_empty());
        } else {
            assert_eq!(self.runs.first().map(|r| r.0), Some(self.base.index + 1));
            assert!(self.runs.first().is_some_and(|r| r.1 >= self.base.term));
            assert!(self
                .runs
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
            assert!(self.runs.last().is_some_and(|r| r.0 <= self.last_index));
        }
        assert!(self.cache_first() > self.base.index);
        assert!(self.cache_first() <= self.applied.min(self.stable_index) + 1);
        if let (Some(f), Some(b)) = (self.cache.front(), self.cache.back()) {
            assert_eq!(b.index, self.last_index);
            assert_eq!(b.index - f.index + 1, self.cache.len() as u64);
        }
    }
}

/// The runs of a log given as `(index, term)` pairs in index order from
/// `base.index + 1`: what a driver computes while it replays its log at
/// start-up.
pub fn term_runs(
    base: SnapshotMeta,
    log: impl IntoIterator<Item = (LogIndex, Term)>,
) -> (Vec<(LogIndex, Term)>, LogIndex) {
    let mut runs: Vec<(LogIndex, Term)> = Vec::new();
    let mut last = base.index;
    for (index, term) in log {
        assert_eq!(index, last + 1, "the log is contiguous from the base");
        if runs.last().is_none_or(|r| r.1 != term) {
            assert!(
                runs.last().map_or(term >= base.term, |r| r.1 < term),
                "terms never decrease"
            );
            runs.push((index, term));
        }
        last = index;
    }
    (runs, last)
}
