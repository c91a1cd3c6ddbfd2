//! `rustci replay`: `--at INDEX` shows what `/v1/jobs` showed at that index;
//! `--node`, `--since`/`--until`, `--export` and `--verify` do what
//! docs/operations.md says; a running daemon's data dir is read through a
//! consistent copy; bad input gets one line, a non-zero exit, and changes
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn stdout_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn indexes(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect()
}

/// Every file under `dir` with its bytes: to see that nothing changed.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            for (k, v) in contents(&path) {
                out.insert(format!("{}/{k}", entry.file_name().to_string_lossy()), v);
            }
        } else {
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            );
        }
    }
    out
}

/// `/v1/jobs` and the applied index it shows, read so that no entry was
/// applied between the two (the index before and after agree).
fn jobs_at_an_index(dev: &Dev) -> (u64, Value) {
    loop {
        let before = dev.get_json("/v1/cluster")["applied_index"]
            .as_u64()
            .unwrap();
        let jobs = dev.get_json("/v1/jobs")["jobs"].clone();
        let after = dev.get_json("/v1/cluster")["applied_index"]
            .as_u64()
            .unwrap();
        if before == after {
            return (after, jobs);
        }
    }
}

#[test]
fn replay_at_each_index_shows_what_v1_jobs_showed_at_that_index() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &["--node-name", "alpha"]);
    let mut seen: BTreeMap<u64, Value> = BTreeMap::new();
    let mut record = |dev: &Dev| {
        let (index, jobs) = jobs_at_an_index(dev);
        seen.insert(index, jobs);
    };
    record(&dev);
    let bodies = [
        json!({"command": ["true"], "name": "ok"}),
        json!({"command": ["sh", "-c", "exit 3"], "max_retries": 1}),
        json!({"command": ["true"], "constraints": {"os": "plan9"}}),
        json!({"command": ["sleep", "30"], "priority": 90}),
    ];
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(dev.submit_json(body)["id"].as_u64().unwrap());
        record(&dev);
    }
    dev.wait_job(ids[3], Duration::from_secs(30), |j| j["state"] == "running");
    record(&dev);
    let (status, _) = http(
        &dev.addr,
        "POST",
        &format!("/v1/jobs/{}/cancel", ids[3]),
        None,
    );
    assert_eq!(status, 200);
    record(&dev);
    for id in [ids[0], ids[1], ids[3]] {
        dev.wait_job(id, Duration::from_secs(30), terminal);
    }
    dev.wait_job(ids[3], Duration::from_secs(30), |j| {
        j["attempts"][0]["state"] == "cancelled"
    });
    record(&dev);
    dev.terminate();
    assert!(seen.len() >= 5, "{:?}", seen.keys());

    for (index, jobs) in &seen {
        let out = run(
            &["replay", "--at", &index.to_string(), "--json"],
            Some(&data),
        );
        let lines = stdout_lines(&out);
        let summary = &lines.last().unwrap()["summary"];
        assert_eq!(summary["applied_index"], *index);
        assert_eq!(summary["job_list"], *jobs, "at index {index}");
    }
    // What was seen covers queued with a reason, retried, running, failed,
    // cancelled and succeeded jobs.
    let last = seen.values().last().unwrap().to_string();
    for state in ["queued", "failed", "cancelled", "succeeded"] {
        assert!(last.contains(&format!("\"state\":\"{state}\"")), "{last}");
    }
    assert!(last.contains("plan9"), "{last}");
}

#[test]
fn replay_reads_a_running_daemons_data_dir_through_a_consistent_copy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let dev = Dev::start(&data, &[]);
    for cmd in ["true", "false"] {
        let out = dev.cli(&["submit", "--wait", "--", cmd]);
        assert!(out.status.code().is_some());
    }
    let live = dev.get_json("/v1/cluster");
    let top_before: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = std::process::Command::new(BIN)
        .args(["replay", "--json", "--data-dir"])
        .arg(&data)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let lines = stdout_lines(&out);
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["state_digest"], live["state_digest"]);
    assert_eq!(summary["applied_index"], live["applied_index"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running daemon"), "{err}");
    assert!(err.contains("consistent copy"), "{err}");
    // The copy is gone, and the data dir has nothing new.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let top_after: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top_before, top_after);
    // --verify works on the copy too.
    let out = std::process::Command::new(BIN)
        .args(["replay", "--verify", "--data-dir"])
        .arg(&data)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A finished dev data dir, and the event stream the daemon served.
fn recorded_run(dir: &Path) -> (std::path::PathBuf, Vec<Value>) {
    let data = dir.join("data");
    let mut dev = Dev::start(&data, &["--node-name", "alpha"]);
    for cmd in ["true", "false", "true"] {
        let out = dev.cli(&["submit", "--wait", "--", cmd]);
        assert!(out.status.code().is_some());
    }
    assert!(dev.cli(&["node", "drain", "alpha"]).status.success());
    let events = dev.get_json("/v1/events")["events"]
        .as_array()
        .unwrap()
        .clone();
    dev.terminate();
    (data, events)
}

#[test]
fn export_node_since_and_until_select_the_entries_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let (data, events) = recorded_run(dir.path());
    let replay = |args: &[&str]| stdout_lines(&run(&[&["replay"], args].concat(), Some(&data)));

    // --export: the API's event objects, one a line, nothing else (a
    // submission also names the job it created).
    let exported = replay(&["--export"]);
    let mut without_job = exported.clone();
    for e in &mut without_job {
        if e["type"] == "job_submitted" {
            e.as_object_mut().unwrap().remove("job");
        }
    }
    assert_eq!(without_job, events);
    assert_eq!(
        exported
            .iter()
            .filter(|e| e["type"] == "job_submitted")
            .map(|e| e["job"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // --node and --job: the same entries the events API picks.
    let node = replay(&["--node", "alpha", "--export"]);
    let node_want: Vec<u64> = indexes(&events)
        .into_iter()
        .filter(|i| {
            let e = &events[(*i - 1) as usize];
            e["type"] != "leader_elected" && e["type"] != "job_submitted"
        })
        .collect();
    assert_eq!(indexes(&node), node_want);
    let text = run(&["replay", "--node", "alpha"], Some(&data));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("\"state\": \"draining\""), "{text}");
    let job2 = replay(&["--job", "2", "--export"]);
    assert!(job2.iter().all(|e| e["job"] == 2));
    assert_eq!(job2[0]["type"], "job_submitted");

    // --since/--until by index, and by time (RFC 3339, with an offset too).
    let window = replay(&["--since", "3", "--until", "5", "--export"]);
    assert_eq!(indexes(&window), vec![3, 4, 5]);
    let at = |i: usize| events[i - 1]["at"].as_u64().unwrap();
    let rfc = |ms: u64| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    };
    let (from, to) = (at(4), at(7));
    let want: Vec<u64> = events
        .iter()
        .filter(|e| (from..=to).contains(&e["at"].as_u64().unwrap()))
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    let window = replay(&["--since", &rfc(from), "--until", &rfc(to), "--export"]);
    assert_eq!(indexes(&window), want);
    // The same instant written two hours east of UTC.
    let east = rfc(from + 2 * 3_600_000).replace('Z', "+02:00");
    let window = replay(&["--since", &east, "--until", &rfc(to), "--export"]);
    assert_eq!(indexes(&window), want);
    // --until: the summary is the state there.
    let lines = replay(&["--until", "5", "--json"]);
    assert_eq!(lines.last().unwrap()["summary"]["applied_index"], 5);
}

#[test]
fn verify_passes_a_sound_log_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let (data, events) = recorded_run(dir.path());
    let out = run(&["replay", "--verify"], Some(&data));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "ok    checksums",
        "ok    index continuity",
        "ok    terms and stamps",
        "ok    replayed state",
        "skip  snapshot digest",
        "verified:",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let out = run(&["replay", "--verify", "--json"], Some(&data));
    let report = &stdout_lines(&out)[0]["verify"];
    assert_eq!(report["ok"], true);
    assert_eq!(report["last_index"], events.len());

    // A corrupt frame: the checksum check fails naming its index.
    {
        let mut store = rustci_storage::LogStore::open(&data).unwrap();
        store.debug_overwrite_frame(3, b"\x01garbage").unwrap();
    }
    let out = run(&["replay", "--verify"], Some(&data));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL  checksums") && text.contains("index 3"),
        "{text}"
    );
    assert!(text.contains("NOT verified"), "{text}");

    // Stamps that go back in time (written straight to a log).
    let crafted = dir.path().join("crafted");
    std::fs::create_dir(&crafted).unwrap();
    {
        use rustci_core::event::{Entry, Event};
        let mut store = rustci_storage::LogStore::open(&crafted).unwrap();
        let entry = |index, at, event| Entry {
            index,
            term: 1,
            at,
            event,
        };
        store
            .append(&[
                entry(
                    1,
                    1_000,
                    Event::LeaderElected {
                        replica: 1,
                        term: 1,
                    },
                ),
                entry(2, 500, Event::NodeDrained { name: "x".into() }),
            ])
            .unwrap();
        store.close_clean();
    }
    let out = run(&["replay", "--verify"], Some(&crafted));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL  terms and stamps: stamp 500 at index 2"),
        "{text}"
    );
}

#[test]
fn bad_input_gets_one_line_a_non_zero_exit_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = recorded_run(dir.path());
    let before = contents(&data);
    let missing = dir.path().join("missing");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--at", "abc"],
        vec!["--at", "999999"],
        vec!["--since", "yesterday"],
        vec!["--until", "2026-13-45T00:00:00Z"],
        vec!["--since", "5", "--until", "2"],
        vec!["--node", "bad name"],
        vec!["--job", "99"],
        vec!["--node", "ghost"],
        vec!["--export", "--json"],
        vec!["--verify", "--at", "3"],
    ];
    for case in &cases {
        let out = run(&[&["replay"], case.as_slice()].concat(), Some(&data));
        assert!(!out.status.success(), "{case:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{case:?}: {err}");
        assert!(out.stdout.is_empty(), "{case:?}: {out:?}");
    }
    let out = run(&["replay"], Some(&missing));
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    assert!(!missing.exists());
    assert!(contents(&data) == before, "replay changed the data dir");
}
