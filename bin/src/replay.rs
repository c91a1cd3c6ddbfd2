//! `rustci replay`: reads a data dir offline (read-only) and shows the event
//! timeline, the state at an index, one job's or one node's history, or
//! verifies the log. Debugging an incident is replaying its log through the
//! very reducer the daemon runs.
//!
//! It never writes to the data dir. A data dir a running daemon holds (the
//! log's file lock) is read through a consistent copy of its log that the
//! daemon takes itself (`POST /v1/backup` without job output, as `rustci
//! backup` does), into a private temp dir removed afterwards.
//!
//! A compacted log starts from its stored snapshot: the snapshot is decoded
//! and checked, the entries after it are folded on top, and the output says
//! once that the history before it is not shown.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{anyhow, bail};
use clap::Args;
use rustci_core::event::{Entry, Event, LogIndex};
use rustci_core::model::{JobId, TimestampMs};
use rustci_core::scheduler::unplaced_reason;
use rustci_core::state::{Applied, State};
use rustci_net::dto::{event_json, JobView, NodeView};
use rustci_net::events::EventFilter;
use rustci_storage::{
    decode_snapshot, LogStore, OpenError, ReadError, SnapshotError, SnapshotMeta,
};

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The data dir to read (never written to). A running daemon's works
    /// too: a consistent copy of its log is taken through it first.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Stop after this log index and show the state there.
    #[arg(long, value_name = "INDEX")]
    pub at: Option<u64>,
    /// Show only this job's history, then the job.
    #[arg(long, value_name = "ID")]
    pub job: Option<u64>,
    /// Show only this node's history (its own events and those of the
    /// attempts placed on it), then the node.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Show the entries from this point on: a log index, or an RFC 3339
    /// time such as 2026-11-26T07:00:00Z.
    #[arg(long, value_name = "INDEX|TIME", value_parser = parse_point)]
    pub since: Option<Point>,
    /// Stop after this point (a log index or an RFC 3339 time); the summary
    /// is the state there.
    #[arg(long, value_name = "INDEX|TIME", value_parser = parse_point)]
    pub until: Option<Point>,
    /// Check the whole log: every frame's checksum (and the snapshot's),
    /// index continuity, terms and stamps that never decrease, the replayed
    /// state's own consistency, and that a snapshot decodes to a consistent
    /// state at its index. Exits non-zero when a check fails.
    #[arg(long, conflicts_with_all = ["at", "job", "node", "since", "until", "export"])]
    pub verify: bool,
    /// The entries shown, as newline-delimited JSON (the objects of
    /// `GET /v1/events`) and nothing else: no summary.
    #[arg(long, conflicts_with = "json")]
    pub export: bool,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// The running daemon's API address, when the data dir is in use;
    /// default: the one it left in the data dir.
    #[arg(long)]
    pub server: Option<String>,
    /// API token for that daemon (sent as `Authorization: Bearer`).
    #[arg(long, env = "RUSTCI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A point in the log: an index, or a time (Unix ms, compared with the
/// entries' `at` stamps, which never decrease).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Index(LogIndex),
    Time(TimestampMs),
}

/// `1234` or an RFC 3339 time (`Z` or a `±HH:MM` offset).
pub fn parse_point(s: &str) -> Result<Point, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Point::Index)
            .map_err(|_| format!("{s:?} is too large for a log index"));
    }
    parse_rfc3339_ms(s).map(Point::Time).map_err(|e| {
        format!(
            "{s:?} is neither a log index nor an RFC 3339 time (like 2026-11-26T07:00:00Z): {e}"
        )
    })
}

/// RFC 3339 to Unix ms. humantime takes `Z` only; an offset is applied here.
fn parse_rfc3339_ms(s: &str) -> Result<TimestampMs, String> {
    let (base, offset_secs) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((base, off))
            if (off.starts_with('+') || off.starts_with('-'))
                && off.as_bytes()[3] == b':'
                && base.contains('T') =>
        {
            let hours: i64 = off[1..3].parse().map_err(|_| "bad offset".to_string())?;
            let minutes: i64 = off[4..6].parse().map_err(|_| "bad offset".to_string())?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{base}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (s.to_string(), 0),
    };
    let at = humantime::parse_rfc3339(&base).map_err(|e| e.to_string())?;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before 1970".to_string())?
        .as_millis() as i64;
    u64::try_from(ms - offset_secs * 1000).map_err(|_| "before 1970".to_string())
}

impl Point {
    /// Whether `entry` lies before this point.
    fn comes_after(self, entry: &Entry) -> bool {
        match self {
            Point::Index(i) => entry.index < i,
            Point::Time(t) => entry.at < t,
        }
    }

    /// Whether `entry` lies past this point.
    fn comes_before(self, entry: &Entry) -> bool {
        match self {
            Point::Index(i) => entry.index > i,
            Point::Time(t) => entry.at > t,
        }
    }
}

pub fn run(args: ReplayArgs) -> anyhow::Result<i32> {
    check_args(&args)?;
    let dir = args.data_dir.clone();
    crate::daemon::guard_corruption(&dir, || {
        let (store, _copy) = match open(&args) {
            Ok(opened) => opened,
            Err(e) if args.verify => match e.downcast::<Unopenable>() {
                Ok(unopenable) => return Ok(verify_unopenable(&unopenable, args.json)),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if args.verify {
            return verify(&store, args.json);
        }
        replay(&store, &args)
    })
}

/// A log the store refuses to open because of its snapshot: the snapshot's
/// record fails its checks, or the log does not start right after it.
/// `--verify` reports it as a failed check rather than an error.
#[derive(Debug)]
struct Unopenable {
    path: PathBuf,
    reason: String,
}

impl std::fmt::Display for Unopenable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snapshot in {} is corrupt: {}",
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for Unopenable {}

fn open_read_only(dir: &std::path::Path) -> anyhow::Result<LogStore> {
    LogStore::open_read_only(dir).map_err(|e| match e {
        OpenError::Read(ReadError::Snapshot { path, reason }) => {
            anyhow::Error::new(Unopenable { path, reason })
        }
        e => anyhow!("{e}"),
    })
}

/// Why the stored snapshot cannot be replayed from.
struct SnapshotFault {
    /// Its bytes fail a checksum (the store's or the snapshot's own) or are
    /// cut short, rather than decoding to something wrong.
    damaged: bool,
    /// What is wrong, naming the file and the snapshot's index.
    message: String,
}

/// The stored snapshot, if any, with its state decoded and checked: it must
/// pass its checksums, decode, be consistent, and hold the state at the
/// index and term it is stored under.
fn read_snapshot(store: &LogStore) -> Option<(SnapshotMeta, Result<State, SnapshotFault>)> {
    let meta = store.snapshot_meta()?;
    let fault = |damaged, why: String| SnapshotFault {
        damaged,
        message: format!(
            "the snapshot at index {} (term {}) in {} {why}",
            meta.index,
            meta.term,
            store.path().display()
        ),
    };
    let state = match store.snapshot() {
        Err(ReadError::Snapshot { reason, .. }) => {
            Err(fault(true, format!("is corrupt: {reason}")))
        }
        Err(e) => Err(fault(false, format!("cannot be read: {e}"))),
        Ok(None) => Err(fault(false, "is recorded, but not stored".into())),
        Ok(Some((stored, _))) if stored != meta => Err(fault(
            false,
            format!(
                "changed while read (now at index {}, term {})",
                stored.index, stored.term
            ),
        )),
        Ok(Some((_, bytes))) => match decode_snapshot(&bytes) {
            Err(e) => {
                let damaged = matches!(
                    e,
                    SnapshotError::Checksum { .. }
                        | SnapshotError::Length { .. }
                        | SnapshotError::Truncated { .. }
                );
                Err(fault(damaged, format!("does not decode: {e}")))
            }
            Ok(state) if (state.applied_index, state.applied_term) != (meta.index, meta.term) => {
                Err(fault(
                    false,
                    format!(
                        "holds the state at index {} (term {}), not at its own",
                        state.applied_index, state.applied_term
                    ),
                ))
            }
            Ok(state) => match state.check_consistency() {
                Err(problem) => Err(fault(
                    false,
                    format!("decodes to an inconsistent state: {problem}"),
                )),
                Ok(()) => Ok(state),
            },
        },
    };
    Some((meta, state))
}

/// Where the history a replay shows begins: after the snapshot, if any.
struct History {
    snapshot: Option<SnapshotMeta>,
    /// Said once to a reader, when the log is compacted.
    note: Option<String>,
}

impl History {
    fn starts_at(&self) -> LogIndex {
        self.snapshot.map_or(1, |s| s.index + 1)
    }

    /// The fields JSON output carries about it.
    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("history_starts_at".into(), self.starts_at().into());
        fields.insert(
            "snapshot".into(),
            self.snapshot
                .map(|s| serde_json::json!({"index": s.index, "term": s.term}))
                .into(),
        );
        if let Some(note) = &self.note {
            fields.insert("history_note".into(), note.clone().into());
        }
        fields
    }
}

/// What a reader of a compacted log's replay must know.
fn compacted_note(snapshot: SnapshotMeta, since: Option<Point>, base: &State) -> String {
    let first = snapshot.index + 1;
    let mut note = format!(
        "history before index {first} was compacted into a snapshot (index {}, term {}) and is not shown: the replay starts from the snapshot's state",
        snapshot.index, snapshot.term
    );
    let since_before = match since {
        Some(Point::Index(i)) => i <= snapshot.index,
        Some(Point::Time(t)) => t <= base.last_at,
        None => false,
    };
    if let Some(since) = since.filter(|_| since_before) {
        note.push_str(&format!(
            "; --since {} lies before it, so the history shown starts at index {first}",
            describe(since)
        ));
    }
    note
}

fn describe(point: Point) -> String {
    match point {
        Point::Index(i) => format!("index {i}"),
        Point::Time(t) => crate::cli::rfc3339(t),
    }
}

fn check_args(args: &ReplayArgs) -> anyhow::Result<()> {
    if let Some(node) = &args.node {
        rustci_core::validate::validate_node_name(node)
            .map_err(|e| anyhow!("--node {node:?}: {e}"))?;
    }
    if let (Some(since), Some(until)) = (args.since, args.until) {
        let empty = match (since, until) {
            (Point::Index(a), Point::Index(b)) | (Point::Time(a), Point::Time(b)) => a > b,
            _ => false,
        };
        if empty {
            bail!("--since is past --until: no entry lies between them");
        }
    }
    Ok(())
}

/// Opens the log read-only; a log a running daemon holds is read through a
/// consistent copy the daemon takes (returned: removed when dropped).
fn open(args: &ReplayArgs) -> anyhow::Result<(LogStore, Option<tempfile::TempDir>)> {
    match LogStore::open_read_only(&args.data_dir) {
        Ok(store) => Ok((store, None)),
        Err(OpenError::Read(ReadError::Snapshot { path, reason })) => {
            Err(anyhow::Error::new(Unopenable { path, reason }))
        }
        Err(OpenError::Locked { .. }) => {
            let copy = tempfile::Builder::new()
                .prefix("rustci-replay-")
                .tempdir()
                .map_err(|e| anyhow!("cannot make a temp dir for the copy: {e}"))?;
            let to = copy.path().join("log-copy");
            let daemon = crate::backup::Daemon {
                data_dir: &args.data_dir,
                server: args.server.as_deref(),
                token: args.token.clone(),
            };
            let done = tokio::runtime::Handle::current()
                .block_on(crate::backup::copy_through_daemon(&daemon, &to, false))
                .map_err(|e| {
                    anyhow!(
                        "{} is in use by a running daemon, and a copy through it failed: {e:#}",
                        args.data_dir.display()
                    )
                })?;
            eprintln!(
                "rustci replay: {} is in use by a running daemon: replaying a consistent copy of its log, up to index {}",
                args.data_dir.display(),
                done.last_index
            );
            let store = open_read_only(&to)?;
            Ok((store, Some(copy)))
        }
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn replay(store: &LogStore, args: &ReplayArgs) -> anyhow::Result<i32> {
    if let Some(at) = args.at {
        if at > store.last_index() {
            bail!(
                "--at {at} is past the log's last index {}",
                store.last_index()
            );
        }
    }
    // A compacted log starts from its snapshot; one that cannot be read is
    // an error, never a replay from the middle as if the log were whole.
    let (mut state, snapshot) = match read_snapshot(store) {
        None => (State::new(), None),
        Some((meta, Ok(state))) => (state, Some(meta)),
        Some((_, Err(fault))) => bail!("{}", fault.message),
    };
    if let Some(s) = snapshot {
        let earliest = format!(
            "the history up to there was compacted into the snapshot at index {}, the earliest state replay can show",
            s.index
        );
        if let Some(at) = args.at.filter(|&at| at < s.index) {
            bail!("--at {at} lies before the snapshot: {earliest}");
        }
        let until_before = match args.until {
            Some(Point::Index(i)) => i < s.index,
            Some(Point::Time(t)) => t < state.last_at,
            None => false,
        };
        if until_before {
            let until = args.until.map(describe).unwrap_or_default();
            bail!("--until {until} lies before the snapshot: {earliest}");
        }
    }
    let history = History {
        snapshot,
        note: snapshot.map(|s| compacted_note(s, args.since, &state)),
    };
    if let Some(note) = &history.note {
        if args.export {
            // stdout is the entries and nothing else.
            eprintln!("rustci replay: {note}");
        } else if !args.json {
            println!("{note}");
        }
    }
    let filter = EventFilter {
        job: args.job.map(JobId),
        node: args.node.clone(),
    };
    let windowed = args.since.is_some() || args.until.is_some();
    let timeline = args.at.is_none() || !filter.is_empty() || windowed || args.export;
    let mut shown = 0u64;
    let mut failure = None;
    let result = store.scan(store.first_index(), |entry| {
        let past_at = args.at.is_some_and(|at| entry.index > at);
        if past_at || args.until.is_some_and(|u| u.comes_before(&entry)) {
            return ControlFlow::Break(());
        }
        let applied = state.apply(&entry);
        let duplicate_of_job = matches!(
            (args.job, &applied),
            (Some(j), Applied::Duplicate(id)) if id.0 == j
        );
        let in_window = args.since.is_none_or(|s| !s.comes_after(&entry));
        let about = filter.matches(&state, &entry) || duplicate_of_job;
        if timeline && in_window && about {
            shown += 1;
            if let Err(e) = print_entry(&entry, &applied, args.json || args.export) {
                failure = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    result.map_err(|e| anyhow!("{e}"))?;
    if args.export {
        return Ok(0);
    }
    if let Some(id) = filter.job {
        let found = state
            .job(id)
            .ok_or_else(|| anyhow!("job {id} not found in the log"))?;
        print_view("job", &job_view(&state, found), &history, args.json)?;
    }
    if let Some(name) = &filter.node {
        let found = state
            .nodes
            .get(name)
            .ok_or_else(|| anyhow!("node {name} not found in the log"))?;
        print_view(
            "node",
            &NodeView::new(found, running_on(&state, name), None),
            &history,
            args.json,
        )?;
    }
    if filter.is_empty() {
        print_summary(&state, shown, args.at.is_some(), &history, args.json)?;
    }
    Ok(0)
}

/// A job as `GET /v1/jobs` shows it, from the replayed state.
fn job_view(state: &State, job: &rustci_core::model::Job) -> JobView {
    JobView::new(
        job,
        unplaced_reason(state, job).or_else(|| State::failure_reason(job)),
    )
}

fn running_on(state: &State, node: &str) -> usize {
    state.active_by_node.get(node).map_or(0, |s| s.len())
}

fn print_view(
    kind: &str,
    view: &impl serde::Serialize,
    history: &History,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let mut line = history.fields();
        line.insert(kind.into(), serde_json::to_value(view)?);
        println!("{}", serde_json::Value::Object(line));
    } else {
        println!("{}", serde_json::to_string_pretty(view)?);
    }
    Ok(())
}

fn print_entry(entry: &Entry, applied: &Applied, json: bool) -> anyhow::Result<()> {
    let mut value = event_json(entry);
    if let Applied::Ignored(reason) = applied {
        value["ignored"] = (*reason).into();
    }
    if let Applied::Submitted(id) = applied {
        value["job"] = id.0.into();
    }
    if json {
        println!("{value}");
    } else {
        let obj = value.as_object().expect("event_json is an object");
        let details: Vec<String> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "index" | "term" | "at" | "type"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:>8} t{:<3} {} {:<17} {}",
            entry.index,
            entry.term,
            crate::cli::rfc3339(entry.at),
            entry.event.kind(),
            details.join(" ")
        );
    }
    Ok(())
}

fn print_summary(
    state: &State,
    shown: u64,
    with_state: bool,
    history: &History,
    json: bool,
) -> anyhow::Result<()> {
    let counts: serde_json::Map<String, serde_json::Value> = rustci_core::model::JobState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), state.job_count(*s).into()))
        .collect();
    let digest = format!("{:016x}", state.digest());
    if json {
        let mut v = serde_json::json!({
            "summary": {
                "applied_index": state.applied_index,
                "jobs": counts,
                "nodes": state.nodes.len(),
                "state_digest": digest,
            }
        });
        for (k, value) in history.fields() {
            v["summary"][k] = value;
        }
        if with_state {
            v["summary"]["job_list"] = state
                .jobs
                .values()
                .map(|j| serde_json::to_value(job_view(state, j)))
                .collect::<Result<Vec<_>, _>>()?
                .into();
            v["summary"]["node_list"] = state
                .nodes
                .values()
                .map(|n| serde_json::to_value(NodeView::new(n, running_on(state, &n.name), None)))
                .collect::<Result<Vec<_>, _>>()?
                .into();
        }
        println!("{v}");
        return Ok(());
    }
    if with_state {
        for j in state.jobs.values() {
            println!(
                "job {:<8} {:<10} attempts={} node={}",
                j.id,
                j.state.as_str(),
                j.attempts.len(),
                j.node().unwrap_or("-")
            );
        }
        for n in state.nodes.values() {
            println!(
                "node {:<16} {:<9} allocated cpu_millis={} memory_mb={}",
                n.name,
                n.state.as_str(),
                n.allocated.cpu_millis,
                n.allocated.memory_mb
            );
        }
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "applied_index={} entries_shown={} jobs: {} nodes={} state_digest={}",
        state.applied_index,
        shown,
        counts.join(" "),
        state.nodes.len(),
        digest
    );
    Ok(())
}

/// One check of `--verify` and what it found.
struct Check {
    name: &'static str,
    /// `None`: passed; `Some(why)`: failed.
    problem: Option<String>,
    detail: String,
}

/// `--verify`: reads the snapshot (if any) and every entry after it, checks
/// what the log promises, replays it and checks the state. A compacted
/// log's checks start from its snapshot: the first entry must follow it,
/// and terms and stamps continue from its term and its state's `last_at`.
fn verify(store: &LogStore, json: bool) -> anyhow::Result<i32> {
    let first = store.first_index();
    let last = store.last_index();
    let snapshot = read_snapshot(store);
    let meta = snapshot.as_ref().map(|(m, _)| *m);
    // The state the entries are folded into, and the (index, term, at) the
    // first entry must follow.
    let (mut state, mut previous, snapshot_check) = match snapshot {
        None => (State::for_replay(), None, None),
        Some((m, Ok(state))) => {
            let follows = (m.index, m.term, state.last_at);
            let digest = state.digest();
            (state, Some(follows), Some(Ok(digest)))
        }
        Some((m, Err(fault))) => (
            State::for_replay(),
            Some((m.index, m.term, 0)),
            Some(Err(fault)),
        ),
    };
    let base_ok = !matches!(snapshot_check, Some(Err(_)));
    let mut order_problem = None;
    let mut leader_problem = None;
    let mut entries = 0u64;
    let scanned = store.scan(first, |entry| {
        entries += 1;
        if let Some((index, term, at)) = previous {
            let after = if entries == 1 && meta.is_some() {
                "the snapshot's "
            } else {
                ""
            };
            let broken = if entry.index != index + 1 {
                Some(format!(
                    "index {} follows {after}index {index}",
                    entry.index
                ))
            } else if entry.term < term {
                Some(format!(
                    "term {} at index {} after {after}term {term}",
                    entry.term, entry.index
                ))
            } else if entry.at < at {
                Some(format!(
                    "stamp {} at index {} after {after}stamp {at}",
                    entry.at, entry.index
                ))
            } else {
                None
            };
            if order_problem.is_none() {
                order_problem = broken;
            }
        }
        if let Event::LeaderElected { term, .. } = entry.event {
            if term != entry.term && leader_problem.is_none() {
                leader_problem = Some(format!(
                    "index {} elects a leader for term {term} in an entry of term {}",
                    entry.index, entry.term
                ));
            }
        }
        previous = Some((entry.index, entry.term, entry.at));
        if base_ok {
            state.apply_owned(entry);
        }
        ControlFlow::Continue(())
    });
    state.rebuild_indexes();
    let read_all = scanned.is_ok() && previous.map_or(0, |p| p.0) == last;
    let snapshot_fault = match &snapshot_check {
        Some(Err(fault)) => Some(fault),
        _ => None,
    };
    let damaged = snapshot_fault
        .filter(|f| f.damaged)
        .map(|f| f.message.clone());
    let entries_problem = scanned.as_ref().err().map(|e| e.to_string());
    let mut checks = vec![Check {
        name: "checksums",
        problem: match (entries_problem, damaged) {
            (Some(a), Some(b)) => Some(format!("{b}; {a}")),
            (a, b) => a.or(b),
        },
        detail: match meta {
            None => format!("{entries} entries read, each frame's version and checksum"),
            Some(_) => format!(
                "the snapshot's checksums, and {entries} entries read after it, each frame's version and checksum"
            ),
        },
    }];
    let expected_first = meta.map_or(1, |m| m.index + 1);
    checks.push(Check {
        name: "index continuity",
        problem: if first != expected_first && first <= last {
            Some(match meta {
                None => format!(
                    "the log starts at index {first}, and there is no snapshot to start from"
                ),
                Some(m) => format!(
                    "the log starts at index {first}, not right after its snapshot at index {}",
                    m.index
                ),
            })
        } else if let Err(ReadError::Gap {
            expected, found, ..
        }) = &scanned
        {
            Some(format!("expected index {expected}, found {found}"))
        } else if !read_all {
            Some(format!(
                "checked up to index {} only: the log could not be read further",
                previous.map_or(0, |p| p.0)
            ))
        } else {
            order_problem.clone().filter(|p| p.starts_with("index"))
        },
        detail: match meta {
            None => format!("indexes {first}..={last} with no gap"),
            Some(m) => format!(
                "indexes {first}..={last} with no gap, right after the snapshot at index {}",
                m.index
            ),
        },
    });
    checks.push(Check {
        name: "terms and stamps",
        problem: order_problem
            .filter(|p| !p.starts_with("index"))
            .or(leader_problem),
        detail: match meta {
            None => "terms and `at` stamps never decrease; each leader_elected names its entry's term".into(),
            Some(_) => "terms and `at` stamps never decrease, from the snapshot's on; each leader_elected names its entry's term".into(),
        },
    });
    let hard = store.hard_state();
    checks.push(Check {
        name: "replayed state",
        problem: if !base_ok {
            Some(
                "not replayed: the snapshot it starts from is unusable (see snapshot digest)"
                    .into(),
            )
        } else if !read_all {
            Some("not replayed: the log could not be read to its end".into())
        } else if hard.commit > last {
            Some(format!(
                "the stored commit index {} is past the last index {last}",
                hard.commit
            ))
        } else {
            state.check_consistency().err()
        },
        detail: match meta {
            None => format!(
                "applied to index {}, state_digest={:016x}",
                state.applied_index,
                state.digest()
            ),
            Some(m) => format!(
                "applied to index {} from the snapshot at index {}, state_digest={:016x}",
                state.applied_index,
                m.index,
                state.digest()
            ),
        },
    });
    let mut skipped = Vec::new();
    match (meta, snapshot_check) {
        (Some(m), Some(check)) => checks.push(Check {
            name: "snapshot digest",
            detail: match &check {
                Ok(digest) => format!(
                    "the snapshot at index {} (term {}) decodes to a consistent state at its index and term, state_digest={digest:016x}",
                    m.index, m.term
                ),
                Err(_) => String::new(),
            },
            problem: check.err().map(|f| f.message),
        }),
        _ => skipped.push((
            "snapshot digest",
            "no snapshot in this data dir (the log is not compacted): there is no snapshot to decode and check",
        )),
    }
    Ok(report(
        &checks,
        &skipped,
        meta,
        Some((first, last, entries)),
        Some(&state),
        json,
    ))
}

/// `--verify` of a log the store refuses to open because of its snapshot.
fn verify_unopenable(e: &Unopenable, json: bool) -> i32 {
    // The store's reason for a log that does not start right after its
    // snapshot names where the log starts; anything else is the snapshot's
    // record failing its checks.
    let continuity = e.reason.contains("the log starts at index");
    let why = e.to_string();
    let not_checked = "not checked: the log does not open".to_string();
    let check = |name, failed: bool| Check {
        name,
        problem: Some(if failed {
            why.clone()
        } else {
            not_checked.clone()
        }),
        detail: String::new(),
    };
    let checks = [
        check("checksums", !continuity),
        check("index continuity", continuity),
        check("terms and stamps", false),
        check("replayed state", false),
        check("snapshot digest", false),
    ];
    report(&checks, &[], None, None, None, json)
}

/// Prints `--verify`'s findings; returns the exit code.
fn report(
    checks: &[Check],
    skipped: &[(&str, &str)],
    snapshot: Option<SnapshotMeta>,
    read: Option<(LogIndex, LogIndex, u64)>,
    state: Option<&State>,
    json: bool,
) -> i32 {
    let failed = checks.iter().filter(|c| c.problem.is_some()).count();
    if json {
        let list: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "check": c.name,
                    "ok": c.problem.is_none(),
                    "detail": c.detail,
                    "problem": c.problem,
                })
            })
            .collect();
        let skipped: Vec<serde_json::Value> = skipped
            .iter()
            .map(|(check, why)| serde_json::json!({"check": check, "why": why}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "verify": {
                    "ok": failed == 0,
                    "checks": list,
                    "skipped": skipped,
                    "first_index": read.map(|r| r.0),
                    "last_index": read.map(|r| r.1),
                    "snapshot": snapshot.map(|s| serde_json::json!({"index": s.index, "term": s.term})),
                    "state_digest": state.map(|s| format!("{:016x}", s.digest())),
                }
            })
        );
    } else {
        for c in checks {
            match &c.problem {
                None => println!("ok    {}: {}", c.name, c.detail),
                Some(p) => println!("FAIL  {}: {p}", c.name),
            }
        }
        for (check, why) in skipped {
            println!("skip  {check}: {why}");
        }
        if failed == 0 {
            let (first, last, entries) = read.unwrap_or_default();
            match snapshot {
                None => println!("verified: {entries} entries, indexes {first}..={last}"),
                Some(s) => println!(
                    "verified: the snapshot at index {} and {entries} entries after it, indexes {first}..={last}",
                    s.index
                ),
            }
        } else {
            println!("NOT verified: {failed} check(s) failed");
        }
    }
    if failed > 0 {
        eprintln!("rustci replay: the log failed {failed} check(s) of --verify");
        return 1;
    }
    0
}
