//! `rustci events --job ID --node NAME` and `GET /v1/events?job=&node=`:
//! the filtered stream is exactly what an independent reading of the whole
//! stream says concerns the job or the node.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn indexes(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect()
}

/// The oracle, from the unfiltered stream alone: the k-th `job_submitted`
/// creates job k (no idempotency keys here); an attempt is on the node its
/// `attempt_assigned` names.
fn about_job(all: &[Value], job: u64) -> Vec<u64> {
    let mut submitted = 0;
    let mut out = Vec::new();
    for e in all {
        if e["type"] == "job_submitted" {
            submitted += 1;
            if submitted == job {
                out.push(e["index"].as_u64().unwrap());
            }
        } else if e["job"] == job {
            out.push(e["index"].as_u64().unwrap());
        }
    }
    out
}

fn about_node(all: &[Value], node: &str) -> Vec<u64> {
    let mut placed = BTreeSet::new();
    let mut out = Vec::new();
    for e in all {
        let attempt = (e["job"].as_u64(), e["attempt"].as_u64());
        let ours = if e["type"] == "attempt_assigned" {
            if e["node"] == node {
                placed.insert(attempt);
            }
            e["node"] == node
        } else if e["type"].as_str().unwrap().starts_with("attempt_") {
            placed.contains(&attempt)
        } else {
            e["name"] == node
        };
        if ours {
            out.push(e["index"].as_u64().unwrap());
        }
    }
    out
}

/// A child process killed when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn events_filtered_by_job_and_node_are_exactly_those_about_them() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(
        &dir.path().join("data"),
        &["--node-name", "alpha", "--label", "pool=a"],
    );
    // A second node, so that `--node` has something to leave out.
    let work = dir.path().join("beta");
    let _beta = Reaped(
        Command::new(BIN)
            .args(["agent", "--server", &dev.addr, "--name", "beta"])
            .args(["--cpus", "1", "--memory-mb", "512", "--label", "pool=b"])
            .arg("--work-dir")
            .arg(&work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !dev.get_json("/v1/nodes")["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "beta" && n["state"] == "ready")
    {
        assert!(std::time::Instant::now() < deadline, "beta did not join");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (cmd, pool) in [("true", "a"), ("false", "b"), ("true", "a"), ("true", "b")] {
        let constraint = format!("pool={pool}");
        let out = dev.cli(&["submit", "--wait", "--constraint", &constraint, "--", cmd]);
        assert!(out.status.code().is_some(), "{out:?}");
    }
    assert!(dev.cli(&["node", "drain", "alpha"]).status.success());
    assert!(dev.cli(&["node", "undrain", "alpha"]).status.success());
    let all = json_lines(&dev.cli(&["events", "--json"]));
    assert!(all.len() > 12, "{all:?}");

    for job in [1u64, 2, 3, 4] {
        let got = json_lines(&dev.cli(&["events", "--json", "--job", &job.to_string()]));
        let want = about_job(&all, job);
        assert_eq!(indexes(&got), want, "job {job}");
        let kinds: BTreeSet<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
        for kind in [
            "job_submitted",
            "attempt_assigned",
            "attempt_started",
            "attempt_finished",
        ] {
            assert!(kinds.contains(kind), "job {job}: {kind} missing: {got:?}");
        }
    }

    let got = json_lines(&dev.cli(&["events", "--json", "--node", "alpha"]));
    let want = about_node(&all, "alpha");
    assert_eq!(indexes(&got), want);
    let kinds: BTreeSet<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in [
        "node_registered",
        "node_drained",
        "node_undrained",
        "attempt_assigned",
        "attempt_finished",
    ] {
        assert!(kinds.contains(kind), "{kind} missing: {got:?}");
    }
    assert!(!kinds.contains("job_submitted") && !kinds.contains("leader_elected"));
    // beta's: its registration and jobs 2 and 4, nothing of alpha's.
    let beta = json_lines(&dev.cli(&["events", "--json", "--node", "beta"]));
    assert_eq!(indexes(&beta), about_node(&all, "beta"));
    let jobs: BTreeSet<u64> = beta.iter().filter_map(|e| e["job"].as_u64()).collect();
    assert_eq!(jobs, BTreeSet::from([2, 4]));
    assert!(beta.iter().any(|e| e["type"] == "node_registered"));
    let alpha_jobs: BTreeSet<u64> = got.iter().filter_map(|e| e["job"].as_u64()).collect();
    assert_eq!(alpha_jobs, BTreeSet::from([1, 3]));

    // Both: what both keep.
    let got = json_lines(&dev.cli(&["events", "--json", "--job", "2", "--node", "alpha"]));
    let node: BTreeSet<u64> = want.iter().copied().collect();
    let both: Vec<u64> = about_job(&all, 2)
        .into_iter()
        .filter(|i| node.contains(i))
        .collect();
    assert_eq!(indexes(&got), both);
    // `--after` still applies, and the text form filters the same way.
    let after = about_job(&all, 2)[0].to_string();
    let got = json_lines(&dev.cli(&["events", "--json", "--job", "2", "--after", &after]));
    assert_eq!(indexes(&got), about_job(&all, 2)[1..].to_vec());
    let text = dev.cli(&["events", "--node", "alpha"]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout).lines().count(),
        want.len()
    );
}

#[test]
fn a_filtered_page_with_no_match_still_moves_next_on() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &["--node-name", "alpha"]);
    dev.submit_json(&json!({"command": ["true"]}));
    let cluster = dev.get_json("/v1/cluster");
    let page = dev.get_json("/v1/events?node=ghost");
    assert_eq!(page["events"], json!([]));
    assert!(page["next"].as_u64().unwrap() >= cluster["applied_index"].as_u64().unwrap());
    let out = dev.cli(&["events", "--node", "ghost"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_filters_get_a_clear_error_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let job = dev.submit_json(&json!({"command": ["true"]}));
    dev.wait_job(
        job["id"].as_u64().unwrap(),
        Duration::from_secs(30),
        terminal,
    );
    let before = dev.get_json("/v1/cluster")["commit_index"].clone();
    for (path, status, code) in [
        ("/v1/events?job=99", 404, "not_found"),
        ("/v1/events?job=abc", 400, "invalid_query"),
        ("/v1/events?job=-1", 400, "invalid_query"),
        ("/v1/events?node=bad%20name", 400, "invalid_query"),
        ("/v1/events?node=", 400, "invalid_query"),
    ] {
        let (got, body) = http(&dev.addr, "GET", path, None);
        assert_eq!(got, status, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], code, "{path}");
    }
    for args in [
        ["events", "--job", "99"].as_slice(),
        &["events", "--job", "x"],
        &["events", "--node", "bad name"],
    ] {
        let out = dev.cli(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(dev.get_json("/v1/cluster")["commit_index"], before);
}

#[test]
fn follow_with_a_job_streams_its_events_as_they_commit() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let other = dev.submit_json(&json!({"command": ["true"]}));
    let job = dev.submit_json(&json!({"command": ["sh", "-c", "sleep 0.5"]}));
    let id = job["id"].as_u64().unwrap();
    let mut child = Command::new(BIN)
        .args(["events", "--follow", "--json", "--job", &id.to_string()])
        .env("RUSTCI_SERVER", &dev.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Ends when the job's last event arrives (or the test's own timeout).
    while !seen.iter().any(|e: &Value| e["type"] == "attempt_finished") {
        let line = lines.next().expect("the stream goes on").unwrap();
        seen.push(serde_json::from_str(&line).unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen
        .iter()
        .all(|e| e["job"] == id || e["type"] == "job_submitted"));
    assert!(seen.iter().all(|e| e["job"] != other["id"]));
    assert_eq!(seen[0]["type"], "job_submitted");
    dev.wait_job(id, Duration::from_secs(30), terminal);
}

/// A filtered page scans at most 10,000 entries: past a long stretch of
/// entries about something else, the page comes back empty with `next`
/// moved on, and `rustci events` follows it to the events after.
#[test]
fn a_filter_finds_events_past_ten_thousand_entries_about_something_else() {
    use rustci_core::event::{Entry, Event};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &["--node-name", "alpha"]);
    dev.submit_json(&json!({"command": ["true"]}));
    dev.wait_job(1, Duration::from_secs(30), terminal);
    dev.terminate();
    // 10,500 drains of a node that never existed: recorded no-ops.
    let stretch = 10_500u64;
    {
        let mut store = rustci_storage::LogStore::open(&data).unwrap();
        let (last, term) = (store.last_index(), store.last_term());
        let at = store.read_range(last, 1).unwrap()[0].at;
        let entries: Vec<Entry> = (1..=stretch)
            .map(|i| Entry {
                index: last + i,
                term,
                at,
                event: Event::NodeDrained {
                    name: "ghost".into(),
                },
            })
            .collect();
        store.append(&entries).unwrap();
        store.close_clean();
    }
    let dev = Dev::start(&data, &["--node-name", "alpha"]);
    let job = dev.submit_json(&json!({"command": ["true"]}));
    dev.wait_job(
        job["id"].as_u64().unwrap(),
        Duration::from_secs(30),
        terminal,
    );
    let all = json_lines(&dev.cli(&["events", "--json"]));
    let want = about_node(&all, "alpha");
    let first_after = *want.iter().find(|i| **i > stretch).unwrap();
    let last_before = *want.iter().rev().find(|i| **i < stretch).unwrap();
    // Right after the first run's last event: 10,000 entries of nothing.
    let page = dev.get_json(&format!("/v1/events?node=alpha&after={last_before}"));
    assert_eq!(page["events"], json!([]), "{page}");
    assert_eq!(page["next"], last_before + 10_000);
    // The CLI goes on past such a page to the restart's registration and
    // the job.
    let after = last_before.to_string();
    let got = json_lines(&dev.cli(&["events", "--json", "--node", "alpha", "--after", &after]));
    let rest: Vec<u64> = want.iter().copied().filter(|i| *i > last_before).collect();
    assert_eq!(indexes(&got), rest);
    assert_eq!(rest[0], first_after);
    let got = json_lines(&dev.cli(&["events", "--json", "--node", "alpha"]));
    assert_eq!(indexes(&got), want);
}
