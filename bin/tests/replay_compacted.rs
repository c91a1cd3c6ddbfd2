//! `rustci replay` of a compacted log: it starts from the stored snapshot
//! and folds the entries after it, to the state the whole log gives; it
//! says once that the history before the snapshot is not shown; `--verify`
//! checks the snapshot too. A snapshot that does not decode, or a log that
//! does not start right after its snapshot, is a clear failure, never a
//! replay from the middle. The logs are written with the storage crate and
//! compacted by hand, as the daemon will.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources};
use rustci_core::state::State;
use rustci_storage::{encode_snapshot, HardState, LogStore};
use serde_json::Value;

/// Where the copies are compacted.
const SNAPSHOT_AT: u64 = 120;

/// Three nodes, then jobs submitted, placed (on two of them), started and
/// most finished; the term goes up once, and job 31's history (indexes 118
/// to 121) straddles the snapshot.
fn history() -> Vec<Entry> {
    let mut events = Vec::new();
    for (i, name) in ["n1", "n2", "n3"].into_iter().enumerate() {
        events.push(Event::NodeRegistered {
            name: name.to_string(),
            capacity: Resources::new(64_000, 64_000),
            labels: BTreeMap::new(),
            incarnation: 1 + i as u64,
            predecessor: None,
        });
    }
    for id in 1..=40u64 {
        events.push(Event::JobSubmitted {
            spec: JobSpec {
                name: format!("job-{id}"),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                resources: Resources::new(500, 256),
                constraints: BTreeMap::new(),
                priority: 0,
                timeout_secs: 60,
                max_retries: 1,
                workspace: Default::default(),
            },
            idempotency_key: None,
        });
        let job = JobId(id);
        events.push(Event::AttemptAssigned {
            job,
            attempt: 1,
            node: ["n1", "n2"][id as usize % 2].to_string(),
        });
        events.push(Event::AttemptStarted { job, attempt: 1 });
        if id % 5 != 0 {
            events.push(Event::AttemptFinished {
                job,
                attempt: 1,
                outcome: Outcome::Exited,
                exit_code: Some((id % 7 == 0) as i32),
                usage: None,
            });
        }
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Entry {
            index: i as u64 + 1,
            term: if i < 80 { 1 } else { 2 },
            at: 1_700_000_000_000 + 1000 * i as u64,
            event,
        })
        .collect()
}

/// Opens the log for writing. The lock is an flock, which a process the
/// tests spawn in parallel holds too between its fork and its exec: a
/// moment's `Locked` is that, and passes.
fn open_store(dir: &Path) -> LogStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LogStore::open(dir) {
            Err(rustci_storage::OpenError::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.unwrap(),
        }
    }
}

/// A data dir holding `log`, its whole length committed.
fn write_log(dir: &Path, log: &[Entry]) {
    let mut store = open_store(dir);
    store.append(log).unwrap();
    store
        .set_hard_state(&HardState {
            term: 2,
            voted_for: None,
            commit: log.len() as u64,
        })
        .unwrap();
    store.close_clean();
}

/// A copy of the data dir `from` at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Compacts the log in `dir` up to `index` behind `snapshot`.
fn compact(dir: &Path, log: &[Entry], index: u64, snapshot: &[u8]) {
    let mut store = open_store(dir);
    store
        .compact_to(index, log[index as usize - 1].term, snapshot)
        .unwrap();
    assert_eq!(store.first_index(), index + 1);
    store.close_clean();
}

/// The snapshot the daemon would take at `index`.
fn snapshot_at(log: &[Entry], index: u64) -> Vec<u8> {
    encode_snapshot(&State::replay(&log[..index as usize]))
}

/// A whole log at `whole` and a copy of it compacted at SNAPSHOT_AT.
fn whole_and_compacted(dir: &Path) -> (Vec<Entry>, std::path::PathBuf, std::path::PathBuf) {
    let log = history();
    assert!(log.len() as u64 > SNAPSHOT_AT + 30, "{}", log.len());
    let whole = dir.join("whole");
    let compacted = dir.join("compacted");
    write_log(&whole, &log);
    copy_dir(&whole, &compacted);
    compact(
        &compacted,
        &log,
        SNAPSHOT_AT,
        &snapshot_at(&log, SNAPSHOT_AT),
    );
    (log, whole, compacted)
}

fn replay(data: &Path, args: &[&str]) -> std::process::Output {
    run(&[&["replay"], args].concat(), Some(data))
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The index of every entry line among `lines`.
fn indexes(lines: &[Value]) -> Vec<u64> {
    lines.iter().filter_map(|l| l["index"].as_u64()).collect()
}

/// `--verify --json`'s report.
fn verify_report(data: &Path) -> (bool, Value) {
    let out = replay(data, &["--verify", "--json"]);
    let report = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {out:?}"))["verify"]
        .clone();
    (out.status.success(), report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

#[test]
fn a_compacted_log_replays_to_the_state_of_the_whole_log_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let (log, whole, compacted) = whole_and_compacted(dir.path());
    let last = log.len() as u64;

    // --verify passes on both, to the same digest; the compacted one checks
    // its snapshot instead of skipping the check.
    let (ok, full) = verify_report(&whole);
    assert!(ok, "{full}");
    assert_eq!(full["skipped"][0]["check"], "snapshot digest");
    assert_eq!(full["snapshot"], Value::Null);
    let (ok, report) = verify_report(&compacted);
    assert!(ok, "{report}");
    assert_eq!(report["state_digest"], full["state_digest"]);
    assert_eq!(
        report["state_digest"].as_str().unwrap(),
        format!("{:016x}", State::replay(&log).digest())
    );
    assert_eq!(report["last_index"], last);
    assert_eq!(report["first_index"], SNAPSHOT_AT + 1);
    assert_eq!(report["snapshot"]["index"], SNAPSHOT_AT);
    assert_eq!(report["skipped"], serde_json::json!([]));
    assert_eq!(check(&report, "snapshot digest")["ok"], true);
    let out = replay(&compacted, &["--verify"]);
    assert!(out.status.success(), "{out:?}");
    let shown = text(&out);
    for line in [
        "ok    checksums",
        "ok    index continuity",
        "ok    terms and stamps",
        "ok    replayed state",
        "ok    snapshot digest: the snapshot at index 120 (term 2) decodes to a consistent state at its index and term",
        "verified: the snapshot at index 120 and",
    ] {
        assert!(shown.contains(line), "{line}: {shown}");
    }
    assert!(!shown.contains("skip"), "{shown}");

    // The summary: the same state, and where the history starts.
    let summary = |data: &Path, args: &[&str]| {
        let lines = json_lines(&replay(data, &[args, &["--json"]].concat()));
        lines.last().unwrap()["summary"].clone()
    };
    let (a, b) = (summary(&whole, &[]), summary(&compacted, &[]));
    assert_eq!(a["state_digest"], b["state_digest"]);
    assert_eq!(a["applied_index"], b["applied_index"]);
    assert_eq!(a["history_starts_at"], 1);
    assert_eq!(b["history_starts_at"], SNAPSHOT_AT + 1);
    assert_eq!(b["snapshot"]["index"], SNAPSHOT_AT);
    assert_eq!(b["snapshot"]["term"], 2);
    assert!(
        b["history_note"].as_str().unwrap().contains("compacted"),
        "{b}"
    );
    let (a, b) = (
        summary(&whole, &["--at", "150"]),
        summary(&compacted, &["--at", "150"]),
    );
    assert_eq!(a["job_list"], b["job_list"]);
    assert_eq!(a["node_list"], b["node_list"]);
    let (a, b) = (
        summary(&whole, &["--until", "140"]),
        summary(&compacted, &["--until", "140"]),
    );
    assert_eq!(a["applied_index"], 140);
    assert_eq!(a["state_digest"], b["state_digest"]);
    // At the snapshot itself: its state.
    let b = summary(&compacted, &["--at", &SNAPSHOT_AT.to_string()]);
    assert_eq!(
        b["state_digest"].as_str().unwrap(),
        format!(
            "{:016x}",
            State::replay(&log[..SNAPSHOT_AT as usize]).digest()
        )
    );

    // A job whose history straddles the snapshot: its entries after it,
    // then the same job.
    let job = |data: &Path| json_lines(&replay(data, &["--job", "31", "--json"]));
    let (a, b) = (job(&whole), job(&compacted));
    assert!(indexes(&a).iter().any(|&i| i <= SNAPSHOT_AT), "{a:?}");
    let after: Vec<u64> = indexes(&a)
        .into_iter()
        .filter(|&i| i > SNAPSHOT_AT)
        .collect();
    assert!(!after.is_empty());
    assert_eq!(indexes(&b), after);
    assert_eq!(a.last().unwrap()["job"], b.last().unwrap()["job"]);
    assert_eq!(b.last().unwrap()["history_starts_at"], SNAPSHOT_AT + 1);
    let node = |data: &Path| json_lines(&replay(data, &["--node", "n1", "--json"]));
    let (a, b) = (node(&whole), node(&compacted));
    assert_eq!(a.last().unwrap()["node"], b.last().unwrap()["node"]);

    // --since before the snapshot is not an error: the entries shown start
    // right after it, and the output says so, once.
    let out = replay(&compacted, &["--since", "50"]);
    assert!(out.status.success(), "{out:?}");
    let shown = text(&out);
    let first_line = shown.lines().next().unwrap();
    assert!(
        first_line.starts_with("history before index 121 was compacted into a snapshot")
            && first_line.contains(
                "--since index 50 lies before it, so the history shown starts at index 121"
            ),
        "{shown}"
    );
    assert_eq!(shown.matches("compacted").count(), 1, "{shown}");
    let first_entry = shown.lines().nth(1).unwrap();
    assert!(first_entry.trim_start().starts_with("121 t2"), "{shown}");
    let since = json_lines(&replay(&compacted, &["--since", "50", "--json"]));
    assert_eq!(
        indexes(&since),
        (SNAPSHOT_AT + 1..=last).collect::<Vec<_>>()
    );
    // A time before the snapshot too.
    let out = replay(&compacted, &["--since", "2023-11-14T00:00:00Z"]);
    assert!(text(&out).contains("lies before it"), "{out:?}");
    // --since after the snapshot: the note, without the clause.
    let out = replay(&compacted, &["--since", "130"]);
    let shown = text(&out);
    assert!(
        shown.contains("was compacted") && !shown.contains("lies before"),
        "{shown}"
    );

    // --export: the entries after the snapshot and nothing else on stdout;
    // the note goes to stderr.
    let out = replay(&compacted, &["--export"]);
    let exported = json_lines(&out);
    assert_eq!(
        indexes(&exported),
        (SNAPSHOT_AT + 1..=last).collect::<Vec<_>>()
    );
    assert_eq!(exported.len() as u64, last - SNAPSHOT_AT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("history before index 121 was compacted"),
        "{err}"
    );

    // A state before the snapshot is gone: one line, a non-zero exit.
    for args in [
        ["--at", "100"],
        ["--until", "119"],
        ["--until", "2023-11-14T22:13:21Z"],
    ] {
        let out = replay(&compacted, &args);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("lies before the snapshot") && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }

    // Compacted up to its last entry: the snapshot alone.
    let all = dir.path().join("all");
    copy_dir(&whole, &all);
    compact(&all, &log, last, &snapshot_at(&log, last));
    let (ok, report) = verify_report(&all);
    assert!(ok, "{report}");
    assert_eq!(report["state_digest"], full["state_digest"]);
    assert_eq!(
        check(&report, "checksums")["detail"],
        "the snapshot's checksums, and 0 entries read after it, each frame's version and checksum"
    );
}

#[test]
fn a_corrupt_snapshot_is_an_error_naming_the_file_and_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let log = history();
    let whole = dir.path().join("whole");
    write_log(&whole, &log);

    // A byte of the payload flipped after the snapshot's own checksum was
    // taken (the store's record checksums what it was given).
    let mut flipped = snapshot_at(&log, SNAPSHOT_AT);
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let wrong_index = encode_snapshot(&State::replay(&log[..90]));
    let cases: [(&str, Vec<u8>, &str, bool); 3] = [
        ("flipped", flipped, "snapshot checksum mismatch", true),
        (
            "garbage",
            b"not a snapshot at all".to_vec(),
            "not a snapshot",
            false,
        ),
        (
            "wrong-index",
            wrong_index,
            "holds the state at index 90 (term 2), not at its own",
            false,
        ),
    ];
    for (name, bytes, why, damaged) in cases {
        let data = dir.path().join(name);
        copy_dir(&whole, &data);
        compact(&data, &log, SNAPSHOT_AT, &bytes);
        let file = data.join("log.redb");
        let named = format!("the snapshot at index 120 (term 2) in {}", file.display());

        // Every replay mode: one line naming the file and the index, exit
        // 1, nothing on stdout.
        for args in [
            &[][..],
            &["--json"],
            &["--job", "31"],
            &["--since", "50"],
            &["--export"],
        ] {
            let out = replay(&data, args);
            assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{name} {args:?}: {err}");
            assert!(
                err.contains(&named) && err.contains(why),
                "{name} {args:?}: {err}"
            );
            assert!(!err.contains("panic"), "{name}: {err}");
            assert!(out.stdout.is_empty(), "{name} {args:?}: {out:?}");
        }

        // --verify: the snapshot digest check fails saying why (and the
        // checksums check, when the bytes are damaged); the entries after
        // it are still checked.
        let out = replay(&data, &["--verify"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let shown = text(&out);
        assert!(
            shown.contains(&format!("FAIL  snapshot digest: {named}")) && shown.contains(why),
            "{name}: {shown}"
        );
        assert_eq!(
            shown.contains("FAIL  checksums"),
            damaged,
            "{name}: {shown}"
        );
        assert!(shown.contains("ok    index continuity"), "{name}: {shown}");
        assert!(
            shown.contains("FAIL  replayed state: not replayed"),
            "{name}: {shown}"
        );
        assert!(shown.contains("NOT verified"), "{name}: {shown}");
        let (ok, report) = verify_report(&data);
        assert!(!ok);
        assert_eq!(report["ok"], false);
        assert_eq!(check(&report, "snapshot digest")["ok"], false);
    }
}

#[test]
fn verify_continues_stamps_from_the_snapshots_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = history();
    let data = dir.path().join("data");
    write_log(&data, &log);
    // The snapshot's state says its last entry was stamped after the entry
    // that follows it.
    let mut state = State::replay(&log[..SNAPSHOT_AT as usize]);
    let next = log[SNAPSHOT_AT as usize].at;
    state.last_at = next + 5_000;
    compact(&data, &log, SNAPSHOT_AT, &encode_snapshot(&state));
    let out = replay(&data, &["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let shown = text(&out);
    let expected = format!(
        "FAIL  terms and stamps: stamp {next} at index 121 after the snapshot's stamp {}",
        next + 5_000
    );
    assert!(shown.contains(&expected), "{shown}");
    assert!(shown.contains("ok    snapshot digest"), "{shown}");
}

#[test]
fn a_log_that_does_not_start_right_after_its_snapshot_fails_continuity() {
    let dir = tempfile::tempdir().unwrap();
    let log = history();
    let data = dir.path().join("data");
    write_log(&data, &log);
    compact(&data, &log, SNAPSHOT_AT, &snapshot_at(&log, SNAPSHOT_AT));
    // An entry the snapshot covers, back in the log before it.
    {
        let mut store = open_store(&data);
        let frame = rustci_storage::encode_entry(&log[118]);
        store.debug_overwrite_frame(119, &frame).unwrap();
    }
    let out = replay(&data, &["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let shown = text(&out);
    assert!(
        shown.contains("FAIL  index continuity:")
            && shown.contains("the snapshot covers up to index 120")
            && shown.contains("the log starts at index 119"),
        "{shown}"
    );
    assert!(shown.contains("NOT verified"), "{shown}");
    let (ok, report) = verify_report(&data);
    assert!(!ok);
    assert_eq!(check(&report, "index continuity")["ok"], false);
    // Any other mode: an error saying the same, never a replay.
    let out = replay(&data, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the log starts at index 119"), "{err}");
}
