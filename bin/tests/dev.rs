//! End to end: `rustci dev` as a separate process, used through its CLI and
//! HTTP API the way a user would. Each test has its own data dir and port.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn quickstart_submit_wait_exits_with_the_jobs_code_and_logs_show_its_output() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let out = dev.cli(&["submit", "--wait", "--", "sh", "-c", "echo hello; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (id, output) = stdout.split_once('\n').unwrap();
    assert!(
        id.parse::<u64>().is_ok(),
        "submit prints the job id first, got {id:?}"
    );
    assert_eq!(output, "hello\n", "then the job's output");
    let logs = dev.cli(&["logs", id]);
    assert!(logs.status.success());
    assert_eq!(String::from_utf8(logs.stdout).unwrap(), "hello\n");
    let ok = dev.cli(&["submit", "--wait", "--", "true"]);
    assert_eq!(ok.status.code(), Some(0));
    let job = dev.get_json(&format!("/v1/jobs/{id}"));
    assert_eq!(job["state"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["attempts"][0]["state"], "failed");
}

#[test]
fn cli_reports_an_unreachable_server_in_one_line_and_fails() {
    let out = run(
        &["jobs", "--server", &format!("127.0.0.1:{}", free_port())],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn two_hundred_concurrent_jobs_all_succeed_and_never_exceed_capacity() {
    let dir = scratch();
    // 3 cpus, jobs of 1 cpu: at most three may run at once.
    let dev = Dev::start(
        &dir.path().join("data"),
        &["--cpus", "3", "--memory-mb", "4096"],
    );
    let marks = dir.path().join("marks");
    let script = format!(
        "echo start $(date +%s%N) >> {m}; sleep 0.02; echo end $(date +%s%N) >> {m}",
        m = marks.display()
    );
    let ids: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    (0..25)
                        .map(|_| {
                            let job = dev.submit_json(&json!({
                                "command": ["sh", "-c", script],
                                "resources": {"cpu_millis": 1000, "memory_mb": 100},
                            }));
                            job["id"].as_u64().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 200);
    for id in &ids {
        let job = dev.wait_job(*id, Duration::from_secs(120), terminal);
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // From the jobs' own clocks: never more than three inside at once.
    let text = std::fs::read_to_string(&marks).unwrap();
    let mut points: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let (kind, t) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), if kind == "start" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(points.len(), 400);
    points.sort_by_key(|(t, d)| (*t, *d));
    let mut inside = 0;
    let mut peak = 0;
    for (_, d) in points {
        inside += d;
        peak = peak.max(inside);
    }
    assert!(peak <= 3, "{peak} jobs ran at once on a 3-cpu runner");
    // From the control plane's own log: allocations never exceeded capacity.
    let mut active = 0i64;
    let mut peak_log = 0;
    let mut after = 0;
    loop {
        let page = dev.get_json(&format!("/v1/events?after={after}"));
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        for e in events {
            match e["type"].as_str().unwrap() {
                "attempt_assigned" => active += 1,
                "attempt_finished" | "attempt_lost" => active -= 1,
                _ => {}
            }
            peak_log = peak_log.max(active);
        }
        after = page["next"].as_u64().unwrap();
    }
    assert!(
        peak_log <= 3,
        "the log shows {peak_log} attempts placed at once"
    );
    assert!(peak >= 2, "jobs did run side by side (peak {peak})");
}

#[test]
fn timeout_fails_the_job_as_timed_out_within_two_seconds_and_leaves_no_process() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let t = Instant::now();
    let mark = unique_mark();
    let job = dev.submit_json(&json!({
        "command": ["sh", "-c", "sleep 30 & sleep 30; wait"],
        "timeout_secs": 1,
        "env": {"TEST_MARK": mark},
    }));
    let id = job["id"].as_u64().unwrap();
    let job = dev.wait_job(id, Duration::from_secs(5), terminal);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(job["state"], "failed");
    assert_eq!(job["attempts"][0]["state"], "timed_out");
    assert!(processes_marked(&mark).is_empty(), "a sleep survived");
}

#[test]
fn cancel_kills_the_running_job_and_leaves_no_process() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    // A look-alike of the job from another copy of this suite on the same
    // machine: same command line, not ours; it must not count.
    let mut decoy = std::process::Command::new("sh")
        .args(["-c", "sleep 30; true"])
        .env("TEST_MARK", unique_mark())
        .spawn()
        .unwrap();
    let mark = unique_mark();
    let job = dev.submit_json(&json!({
        "command": ["sh", "-c", "sleep 30; true"],
        "env": {"TEST_MARK": mark},
    }));
    let id = job["id"].as_u64().unwrap();
    dev.wait_job(id, Duration::from_secs(10), |j| j["state"] == "running");
    // The marker finds the job's processes (so finding none later means
    // they are gone).
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_marked(&mark).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job's processes are not found"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let out = dev.cli(&["job", "cancel", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let job = dev.wait_job(id, Duration::from_secs(5), |j| {
        j["attempts"][0]["state"] == "cancelled"
    });
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(job["state"], "cancelled");
    assert!(processes_marked(&mark).is_empty(), "a sleep survived");
    let _ = decoy.kill();
    let _ = decoy.wait();
    // Cancelling a terminal job is a no-op that still answers 200.
    let (status, _) = http(&dev.addr, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(status, 200);
}

#[test]
fn kill_9_and_restart_keeps_every_acknowledged_job_and_reruns_lost_attempts() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &["--cpus", "2"]);
    let mut ids = Vec::new();
    let mark = unique_mark();
    for i in 0..6 {
        let job = dev.submit_json(&json!({
            "command": ["sh", "-c", format!("echo run-{i}; sleep 3")],
            "resources": {"cpu_millis": 1000},
            "env": {"TEST_MARK": mark},
        }));
        ids.push(job["id"].as_u64().unwrap());
    }
    dev.wait_job(ids[0], Duration::from_secs(10), |j| j["state"] == "running");
    dev.wait_job(ids[1], Duration::from_secs(10), |j| j["state"] == "running");
    let addr = dev.addr.clone();
    dev.kill9();
    // The jobs' processes die with the daemon: each runs under a shim that
    // kills its process group when the daemon goes away.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !processes_marked(&mark).is_empty() {
        assert!(
            Instant::now() < deadline,
            "job processes outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dev = Dev::start_on(&data, &addr, &["--cpus", "2"]);
    for id in &ids {
        let job = dev.get_json(&format!("/v1/jobs/{id}"));
        assert_eq!(job["id"], *id, "acknowledged job {id} survived");
    }
    for id in &ids[..2] {
        let job = dev.wait_job(*id, Duration::from_secs(60), terminal);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["attempts"][0]["state"], "lost", "{job}");
        assert_eq!(job["attempts"][1]["state"], "succeeded");
    }
    for id in &ids[2..] {
        let job = dev.wait_job(*id, Duration::from_secs(60), terminal);
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let metrics = http(&dev.addr, "GET", "/metrics", None).1;
    assert!(
        metrics.contains("rustci_attempts_lost_total 2"),
        "{metrics}"
    );
}

#[test]
fn graceful_shutdown_then_restart_resumes_from_the_log() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &[]);
    let out = dev.cli(&["submit", "--wait", "--", "echo", "persisted"]);
    assert!(out.status.success());
    let before = dev.get_json("/v1/cluster");
    let status = dev.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    let dev = Dev::start(&data, &[]);
    let after = dev.get_json("/v1/cluster");
    assert_eq!(after["jobs"]["succeeded"], before["jobs"]["succeeded"]);
    assert!(after["term"].as_u64() > before["term"].as_u64());
    let logs = dev.cli(&["logs", "1"]);
    assert_eq!(String::from_utf8(logs.stdout).unwrap(), "persisted\n");
}

#[test]
fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let dir = scratch();
    let data = dir.path().join("data");
    let _dev = Dev::start(&data, &[]);
    let out = dev_refusing(&data, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("in use by another rustci process"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    // Ready comes with the leader's first entry; the built-in node's
    // registration follows on its first tick: count from after it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev.get_json("/v1/nodes")["nodes"][0]["state"] != "ready" {
        assert!(
            Instant::now() < deadline,
            "the built-in node did not register"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = dev.get_json("/v1/cluster");
    let big = vec![b'a'; 10 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed json",
            b"{\"command\": [".to_vec(),
            400,
            "invalid_json",
        ),
        ("not an object", b"[1,2]".to_vec(), 400, "invalid_json"),
        ("10 MiB body", big, 413, "payload_too_large"),
        (
            "empty command",
            br#"{"command": []}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "empty program",
            br#"{"command": [""]}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "negative cpu",
            br#"{"command": ["x"], "resources": {"cpu_millis": -5}}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "absurd memory",
            br#"{"command": ["x"], "resources": {"memory_mb": 99999999999}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "zero cpu",
            br#"{"command": ["x"], "resources": {"cpu_millis": 0}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "priority 101",
            br#"{"command": ["x"], "priority": 101}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "zero timeout",
            br#"{"command": ["x"], "timeout_secs": 0}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            br#"{"command": ["x"], "colour": "red"}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "unknown resource field",
            br#"{"command": ["x"], "resources": {"gpus": 1}}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "wrong type",
            br#"{"command": "echo hi"}"#.to_vec(),
            400,
            "invalid_json",
        ),
    ];
    for (what, body, status, code) in cases {
        let (got, text) = http_raw(&dev.addr, "POST", "/v1/jobs", Some(&body), &[]);
        assert_eq!(got, status, "{what}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
        assert_eq!(v["error"]["code"], code, "{what}: {text}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    for (method, path, status) in [
        ("GET", "/v1/jobs/12345", 404),
        ("GET", "/v1/jobs/not-a-number", 404),
        ("POST", "/v1/jobs/777/cancel", 404),
        ("POST", "/v1/nodes/ghost/drain", 404),
        ("GET", "/v1/jobs?state=sleeping", 400),
        ("GET", "/v1/events?after=minus-one", 400),
        ("DELETE", "/v1/jobs", 405),
        ("GET", "/v2/anything", 404),
    ] {
        let (got, text) = http(&dev.addr, method, path, None);
        assert_eq!(got, status, "{method} {path}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    let after = dev.get_json("/v1/cluster");
    assert_eq!(
        before["commit_index"], after["commit_index"],
        "nothing was written"
    );
    assert_eq!(before["state_digest"], after["state_digest"]);
    // The CLI refuses bad arguments with one line and a non-zero exit.
    let out = dev.cli(&["submit", "--cpus", "-1", "--", "true"]);
    assert!(!out.status.success());
    let out = dev.cli(&["submit"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no command"));
}

#[test]
fn a_corrupted_log_entry_stops_start_up_naming_the_file_and_index() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &[]);
    let out = dev.cli(&["submit", "--wait", "--", "true"]);
    assert!(out.status.success());
    dev.terminate();
    {
        let mut store = rustci_storage::LogStore::open(&data).unwrap();
        store
            .debug_overwrite_frame(3, b"\x01garbage-frame")
            .unwrap();
    }
    let out = dev_refusing(&data, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("corrupt log entry at index 3"), "{err}");
    assert!(err.contains("log.redb"), "{err}");
    // Replay reports it the same way, and never writes to the directory.
    let out = run(&["replay"], Some(&data));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("index 3"));
}

#[test]
fn replay_of_the_stored_log_equals_the_live_state() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &[]);
    for cmd in [["true"].as_slice(), &["false"], &["sh", "-c", "echo x"]] {
        let mut args = vec!["submit", "--wait", "--"];
        args.extend_from_slice(cmd);
        dev.cli(&args);
    }
    let live = dev.get_json("/v1/cluster");
    dev.terminate();
    let out = run(&["replay", "--json"], Some(&data));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(summary["summary"]["state_digest"], live["state_digest"]);
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("type").is_some())
        .collect();
    assert!(events.iter().any(|e| e["type"] == "job_submitted"));
    // One job's history.
    let out = run(&["replay", "--job", "2"], Some(&data));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("attempt_finished"), "{text}");
    assert!(text.contains("\"state\": \"failed\""), "{text}");
}

#[test]
fn idempotency_key_returns_the_first_job() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let body = br#"{"command": ["true"]}"#;
    let hdr = [("Idempotency-Key", "build-42")];
    let (s1, a) = http_raw(&dev.addr, "POST", "/v1/jobs", Some(body), &hdr);
    let (s2, b) = http_raw(&dev.addr, "POST", "/v1/jobs", Some(body), &hdr);
    assert_eq!((s1, s2), (201, 201));
    let a: serde_json::Value = serde_json::from_str(&a).unwrap();
    let b: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(a["id"], b["id"]);
    let jobs = dev.get_json("/v1/jobs");
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn job_file_constraints_priority_and_listing() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &["--label", "pool=ci"]);
    let file = dir.path().join("job.toml");
    std::fs::write(
        &file,
        "command = [\"sh\", \"-c\", \"echo from-file\"]\nname = \"filejob\"\npriority = 80\n[constraints]\npool = \"ci\"\n[resources]\ncpu_millis = 500\n",
    )
    .unwrap();
    let out = dev.cli(&["submit", "--wait", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let id = lines.next().unwrap().to_string();
    assert_eq!(lines.collect::<Vec<_>>(), ["from-file"], "then its output");
    let job = dev.get_json(&format!("/v1/jobs/{id}"));
    assert_eq!(job["name"], "filejob");
    assert_eq!(job["priority"], 80);
    assert_eq!(job["resources"]["cpu_millis"], 500);
    // A job nobody can run stays queued and says why.
    let stuck = dev.submit_json(&json!({"command": ["true"], "constraints": {"os": "plan9"}}));
    let stuck = dev.get_json(&format!("/v1/jobs/{}", stuck["id"]));
    assert_eq!(stuck["state"], "queued");
    assert!(
        stuck["reason"].as_str().unwrap().contains("os=plan9"),
        "{stuck}"
    );
    let listed = dev.get_json("/v1/jobs?state=queued");
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "command = [\"x\"]\nfoo = 1\n").unwrap();
    let out = dev.cli(&["submit", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("foo"));
    let nodes = dev.get_json("/v1/nodes");
    assert_eq!(nodes["nodes"][0]["labels"]["pool"], "ci");
    let status = dev.cli(&["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("running"));
}

#[test]
fn logs_follow_streams_until_the_attempt_ends() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let job = dev.submit_json(&json!({"command": ["sh", "-c", "echo one; sleep 0.5; echo two"]}));
    let id = job["id"].to_string();
    let t = Instant::now();
    let out = dev.cli(&["logs", "--follow", &id]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "one\ntwo\n");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "follow waited for the end"
    );
    let metrics = http(&dev.addr, "GET", "/metrics", None).1;
    assert!(
        metrics.contains("rustci_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    let mut seen = BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (k, v) = line.rsplit_once(' ').unwrap();
        seen.insert(k.to_string(), v.to_string());
    }
    assert!(seen.contains_key("rustci_raft_commit_index"));
    assert!(seen.contains_key("rustci_queue_length"));
    for name in [
        "rustci_oldest_queued_job_wait_seconds",
        "rustci_unplaceable_jobs{reason=\"constraints\"}",
        "rustci_heartbeats_received_total",
        "rustci_attempts_lost_total",
    ] {
        assert!(seen.contains_key(name), "{name} missing: {metrics}");
    }
    assert!(
        seen.keys()
            .any(|k| k.starts_with("rustci_node_allocated_cpus{node=")),
        "{metrics}"
    );
    let heartbeats: u64 = seen["rustci_heartbeats_received_total"].parse().unwrap();
    assert!(heartbeats > 0, "the built-in runner heartbeats too");
}

#[test]
fn api_token_is_required_when_set_and_dev_without_token_serves_loopback_only() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &["--api-token", "s3cret"]);
    let (status, body) = http(&dev.addr, "GET", "/v1/jobs", None);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_raw(
        &dev.addr,
        "GET",
        "/v1/jobs",
        None,
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(status, 200);
    let out = run(&["jobs", "--server", &dev.addr, "--token", "s3cret"], None);
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &["dev", "--listen", "0.0.0.0:0"],
        Some(&dir.path().join("other")),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-token"));
}

#[test]
fn garbage_anywhere_in_the_log_file_gets_a_clear_error_never_a_panic() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &[]);
    for i in 0..3 {
        let out = dev.cli(&["submit", "--wait", "--", "echo", &i.to_string()]);
        assert!(out.status.success());
    }
    dev.terminate();
    let pristine = std::fs::read(data.join("log.redb")).unwrap();
    let mut refused = 0;
    for offset in (0..pristine.len()).step_by(2048) {
        let mut bytes = pristine.clone();
        for (i, b) in bytes[offset..].iter_mut().take(64).enumerate() {
            *b ^= 0xA5 ^ (i as u8);
        }
        std::fs::write(data.join("log.redb"), &bytes).unwrap();
        let out = run(&["replay"], Some(&data));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "offset {offset}: {err}");
        if !out.status.success() {
            refused += 1;
            assert_eq!(err.trim().lines().count(), 1, "offset {offset}: {err}");
            assert!(
                err.contains("log.redb") || err.contains("corrupt"),
                "offset {offset}: {err}"
            );
        }
    }
    assert!(refused > 0, "some corruption was detected");
}

#[test]
fn a_drained_node_takes_nothing_new_until_it_is_undrained() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &["--node-name", "box"]);
    let out = dev.cli(&["node", "drain", "box"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "box draining");
    let job = dev.submit_json(&json!({"command": ["true"]}));
    let id = job["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let job = dev.get_json(&format!("/v1/jobs/{id}"));
    assert_eq!(job["state"], "queued", "{job}");
    let out = dev.cli(&["node", "undrain", "box"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "box ready");
    let job = dev.wait_job(id, Duration::from_secs(10), terminal);
    assert_eq!(job["state"], "succeeded", "{job}");
    // Undraining a ready node changes nothing; an unknown one is a 404.
    let out = dev.cli(&["node", "undrain", "box"]);
    assert!(out.status.success(), "{out:?}");
    let (status, _) = http(&dev.addr, "POST", "/v1/nodes/ghost/undrain", None);
    assert_eq!(status, 404);
}

/// Whatever the daemon inherited (here a pipe's write end at fd 251, as a
/// shell or supervisor may leave open) never reaches a job: a job sees
/// stdin, stdout and stderr only.
#[test]
fn descriptors_the_daemon_inherited_never_reach_a_job() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = scratch();
    let (_reader, writer) = std::io::pipe().unwrap();
    let fd = writer.as_raw_fd();
    let addr = format!("127.0.0.1:{}", free_port());
    let dev = Dev::start_with(&dir.path().join("data"), &addr, &[], |c| unsafe {
        c.pre_exec(move || {
            // dup2 leaves the copy without close-on-exec.
            if libc::dup2(fd, 251) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    });
    let job = dev.submit_json(&json!({"command": ["ls", "/proc/self/fd"]}));
    let id = job["id"].as_u64().unwrap();
    let job = dev.wait_job(id, Duration::from_secs(10), terminal);
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = dev.cli(&["logs", &id.to_string()]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    let fds: Vec<&str> = listed.split_whitespace().collect();
    // `ls` itself holds 3: the directory it reads.
    assert_eq!(fds, ["0", "1", "2", "3"], "{listed}");
}

/// With few file descriptors, attempts the daemon cannot start for lack of
/// its own descriptors wait for them instead of failing the job: every job
/// succeeds on its first attempt, with no retries to spend.
#[test]
fn a_daemon_short_of_descriptors_does_not_fail_the_jobs() {
    let dir = scratch();
    let addr = format!("127.0.0.1:{}", free_port());
    // About 14 for the daemon itself, then room for a few attempts.
    let dev = Dev::start_with(
        &dir.path().join("data"),
        &addr,
        &["--cpus", "8"],
        open_files_limit(32),
    );
    let ids: Vec<u64> = (0..12)
        .map(|_| {
            let job = dev.submit_json(&json!({
                "command": ["sleep", "0.5"],
                "resources": {"cpu_millis": 100, "memory_mb": 16},
                "max_retries": 0,
            }));
            job["id"].as_u64().unwrap()
        })
        .collect();
    for id in ids {
        let job = dev.wait_job(id, Duration::from_secs(60), terminal);
        assert_eq!(job["state"], "succeeded", "{job}\n{}", dev.stderr());
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job}");
    }
    assert!(
        dev.stderr().contains("lack of the node's own resources"),
        "the limit was reached: {}",
        dev.stderr()
    );
}

/// `submit --wait` streams the job's output as it runs (every attempt,
/// retries too), says on stderr how the job ended, and exits as a shell
/// user expects: the job's code, 128+N for signal N, 124 for a time-out,
/// 127 when the command cannot start, and distinct codes for a job no node
/// can take (123, at once rather than hanging) and a cancelled one (121).
#[test]
fn submit_wait_streams_output_and_exits_as_a_shell_would() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--retries",
        "1",
        "--",
        "sh",
        "-c",
        "echo try $RUSTCI_ATTEMPT; echo oops >&2; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert!(
        lines.next().unwrap().parse::<u64>().is_ok(),
        "the id first: {stdout}"
    );
    assert_eq!(
        lines.collect::<Vec<_>>(),
        ["try 1", "oops", "try 2", "oops"],
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("attempt 2 failed with exit code 4"),
        "{stderr}"
    );
    assert!(
        stderr.trim_end().ends_with("failed with exit code 4"),
        "{stderr}"
    );
    let code = |args: &[&str]| {
        let mut all = vec!["submit", "--wait"];
        all.extend_from_slice(args);
        let out = dev.cli(&all);
        (out.status.code(), text(&out.stderr))
    };
    assert_eq!(code(&["--", "true"]).0, Some(0));
    let (c, err) = code(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(c, Some(128 + 15), "{err}");
    assert!(err.contains("killed by signal 15"), "{err}");
    let (c, err) = code(&["--timeout-secs", "1", "--", "sleep", "30"]);
    assert_eq!(c, Some(124), "{err}");
    assert!(err.contains("timed out"), "{err}");
    let (c, err) = code(&["--", "no-such-command-rustci"]);
    assert_eq!(c, Some(127), "{err}");
    let t = Instant::now();
    let (c, err) = code(&["--constraint", "gpu=none-here", "--", "true"]);
    assert_eq!(c, Some(123), "{err}");
    assert!(err.contains("gpu=none-here"), "says why: {err}");
    assert!(t.elapsed() < Duration::from_secs(20), "fails fast");
    // Cancelled while it waits.
    let waiting = std::process::Command::new(BIN)
        .args(["submit", "--wait", "--", "sleep", "30"])
        .env("RUSTCI_SERVER", &dev.addr)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = dev.wait_job_where(|j| j["state"] == "running");
    let out = dev.cli(&["job", "cancel", &id.to_string()]);
    assert!(out.status.success());
    let done = waiting.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(121), "{done:?}");
    assert!(text(&done.stderr).contains("was cancelled"));
}

/// `logs --follow` follows a job through its retries, with a line on stderr
/// per attempt and how each ended.
#[test]
fn logs_follow_goes_on_through_retries() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let job = dev.submit_json(&json!({
        "command": ["sh", "-c", "sleep 0.3; echo run $RUSTCI_ATTEMPT; exit 1"],
        "max_retries": 2,
    }));
    let id = job["id"].to_string();
    let out = dev.cli(&["logs", "--follow", &id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "run 1\nrun 2\nrun 3\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in 1..=3 {
        assert!(
            stderr.contains(&format!("attempt {n} failed with exit code 1")),
            "{stderr}"
        );
    }
    // One attempt only, when asked for it.
    let out = dev.cli(&["logs", "--follow", "--attempt", "2", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "run 2\n");
}

/// The everyday slips of a new user get one helpful line: no arguments
/// show the usage, a typo suggests the command, a command given to
/// `submit` without `--` says where it goes, a bad job file says where the
/// fault is, and `RUSTCI_SERVER` takes the forms people write.
#[test]
fn cli_slips_get_one_helpful_line() {
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    let bare = run(&[], None);
    assert_eq!(bare.status.code(), Some(2));
    let usage = text(&bare.stderr);
    assert!(
        usage.contains("Usage: rustci <COMMAND>") && usage.contains("submit"),
        "{usage}"
    );
    let typo = run(&["sumbit"], None);
    let err = text(&typo.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("'submit'"), "suggests the command: {err}");
    let nodash = run(&["submit", "echo", "hi"], None);
    let err = text(&nodash.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("after `--`"), "{err}");
    let dir = scratch();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, "name = \"x\"\ncommand = [\"true\"\npriority = 5\n").unwrap();
    let bad = run(&["submit", "-f", file.to_str().unwrap()], None);
    let err = text(&bad.stderr);
    assert!(!bad.status.success());
    assert!(err.contains("job.toml:3:1"), "line and column: {err}");
    // The server's address in the forms people write.
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let port = dev.addr.rsplit_once(':').unwrap().1.to_string();
    for form in [
        dev.addr.clone(),
        format!("http://{}", dev.addr),
        format!("http://{}/", dev.addr),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["jobs"])
            .env("RUSTCI_SERVER", &form)
            .output()
            .unwrap();
        assert!(out.status.success(), "{form}: {out:?}");
    }
    // Empty means the default (nothing listens on it here, or a stranger
    // does): the error names the default address.
    let out = std::process::Command::new(BIN)
        .args(["jobs"])
        .env("RUSTCI_SERVER", "")
        .output()
        .unwrap();
    if !out.status.success() {
        assert!(text(&out.stderr).contains("127.0.0.1:7878"), "{out:?}");
    }
    assert_ne!(port, "7878");
    // Something that is not RustCI: one line that says so.
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = stranger.local_addr().unwrap().to_string();
    let answer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = stranger.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let body = "<html><body>hello</body></html>";
        let _ = write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let out = std::process::Command::new(BIN)
        .args(["jobs", "--server", &addr])
        .output()
        .unwrap();
    answer.join().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("did not answer as a RustCI control plane"),
        "{err}"
    );
}

/// A small file system mounted for one test (tmpfs; needs root, as CI
/// has), unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// On a 48 MB data dir, a job that writes 100 MB into its workspace does
/// not stop the daemon and its cut output says so; a full disk answers
/// writes 507 (reads still work, /readyz says why); once space is freed,
/// writes succeed again without a restart, and nothing acknowledged is lost.
#[test]
fn a_full_disk_gets_507_and_the_daemon_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount("48m") else {
        // Mounting needs root (CI and the dev machines are root).
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root could not mount a tmpfs"
        );
        return;
    };
    let data = disk.dir.path().join("data");
    let dev = Dev::start(&data, &[]);
    let hog = dev.cli(&[
        "submit",
        "--wait",
        "--",
        "sh",
        "-c",
        "head -c 100000000 /dev/zero > big; echo wrote $?; exit 1",
    ]);
    assert_eq!(hog.status.code(), Some(1), "{hog:?}");
    let id = String::from_utf8_lossy(&hog.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let logs = dev.cli(&["logs", &id]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("output incomplete"),
        "never served as complete: {text:?}"
    );
    // Fill the disk from outside: writes get 507, reads still answer.
    let fill = disk.dir.path().join("fill");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100"])
        .arg(format!("of={}", fill.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let (status, body) = http(
        &dev.addr,
        "POST",
        "/v1/jobs",
        Some(r#"{"command": ["true"]}"#),
    );
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("storage_full"), "{body}");
    let (status, body) = http(&dev.addr, "GET", "/readyz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    assert_eq!(
        http(&dev.addr, "GET", &format!("/v1/jobs/{id}"), None).0,
        200
    );
    // Space returns: writes succeed again, no restart.
    std::fs::remove_file(&fill).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let job = loop {
        let (status, body) = http(
            &dev.addr,
            "POST",
            "/v1/jobs",
            Some(r#"{"command": ["true"]}"#),
        );
        if status == 201 {
            break serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
        assert_eq!(status, 507, "{body}");
        assert!(Instant::now() < deadline, "writes did not resume");
        std::thread::sleep(Duration::from_millis(100));
    };
    let done = dev.wait_job(
        job["id"].as_u64().unwrap(),
        Duration::from_secs(10),
        terminal,
    );
    assert_eq!(done["state"], "succeeded");
    assert_eq!(http(&dev.addr, "GET", "/readyz", None).0, 200);
}

/// Out of descriptors, `accept` fails: the daemon backs off and says so
/// once instead of spinning and logging a line every few milliseconds, and
/// serves again once descriptors are free.
#[test]
fn accept_failures_back_off_and_are_logged_once() {
    let dir = scratch();
    let addr = format!("127.0.0.1:{}", free_port());
    let dev = Dev::start_with(&dir.path().join("data"), &addr, &[], open_files_limit(40));
    // Idle connections until the daemon has no descriptor left for more.
    let held: Vec<std::net::TcpStream> = (0..60)
        .filter_map(|_| std::net::TcpStream::connect(&dev.addr).ok())
        .collect();
    assert!(held.len() >= 40, "connections held: {}", held.len());
    std::thread::sleep(Duration::from_secs(2));
    let failures = dev.stderr().matches("accept failed").count();
    assert!(failures >= 1, "the limit was reached: {}", dev.stderr());
    assert!(failures <= 3, "logged {failures} times in 2 s: spinning");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(&dev.addr, "GET", "/healthz", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "serves again once descriptors are free"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `rustci dev` with a node no job could use refuses to start, in one line,
/// and creates nothing; its log has colours only on a terminal.
#[test]
fn dev_refuses_an_unusable_node_and_logs_without_colours_off_a_terminal() {
    let dir = scratch();
    let data = dir.path().join("data");
    for (args, says) in [
        (&["--node-name", "bad name!"][..], "--node-name"),
        (&["--memory-mb", "0"][..], "memory_mb"),
        (&["--cpus", "0"][..], "--cpus"),
    ] {
        let out = dev_refusing(&data, args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with("rustci: ") && last.contains(says),
            "{args:?}: {err}"
        );
        assert!(!data.exists(), "{args:?} created the data dir");
    }
    // stderr is a file here: no escape codes, even with the default level.
    let dev = Dev::start(&data, &[]);
    let log = dev.stderr();
    assert!(log.contains("rustci dev is serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes off a terminal: {log:?}"
    );
}

/// `rustci events` prints the committed log one event a line (or JSON
/// lines with `--json`); `rustci job get` reads as a person would read it,
/// with `--json` for the API's form.
#[test]
fn events_and_job_get_read_as_people_read_them() {
    let dir = scratch();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let out = dev.cli(&[
        "submit", "--wait", "--name", "greet", "--", "sh", "-c", "exit 2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let events = dev.cli(&["events"]);
    assert!(events.status.success(), "{events:?}");
    let text = String::from_utf8_lossy(&events.stdout).to_string();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    for kind in [
        "leader_elected",
        "job_submitted",
        "attempt_assigned",
        "attempt_finished",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing: {text}");
    }
    let json = dev.cli(&["events", "--json", "--after", "2"]);
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&json.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["index"], 3);
    let human = dev.cli(&["job", "get", "1"]);
    let text = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(text.starts_with("job 1  failed (exit code 2)"), "{text}");
    assert!(text.contains("name:         greet"), "{text}");
    assert!(text.contains("ATTEMPT"), "{text}");
    let row = text.lines().last().unwrap();
    assert!(
        row.starts_with('1') && row.contains("failed") && row.contains("exited"),
        "{row}"
    );
    // RFC 3339 stamps.
    assert!(text.contains('T') && text.contains('Z'), "{text}");
    let machine = dev.cli(&["job", "get", "--json", "1"]);
    let job: serde_json::Value = serde_json::from_slice(&machine.stdout).unwrap();
    assert_eq!(job["exit_code"], 2);
}

/// Prepares a daemon's command to run with at most `n` open files.
fn open_files_limit(n: u64) -> impl FnOnce(&mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    move |c| unsafe {
        c.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `rustci job explain` (and `GET /v1/jobs/{id}/placement`) says why a
/// queued job waits: nodes evaluated, filtered by which constraint, too
/// small or exhausted; and where a placed attempt went.
#[test]
fn job_explain_says_why_a_job_waits_and_where_it_went() {
    let dir = scratch();
    let dev = Dev::start(
        &dir.path().join("data"),
        &["--cpus", "2", "--memory-mb", "1024", "--label", "pool=ci"],
    );
    let elsewhere = dev.submit_json(&json!({"command": ["true"], "constraints": {"pool": "gpu"}}));
    let e = dev.get_json(&format!("/v1/jobs/{}/placement", elsewhere["id"]));
    assert_eq!(e["state"], "queued");
    assert_eq!(e["nodes_evaluated"], 1);
    assert_eq!(e["filtered_by_constraint"]["pool=gpu"], 1, "{e}");
    assert_eq!(e["fitting_now"], 0);
    let huge = dev.submit_json(&json!({"command": ["true"], "resources": {"cpu_millis": 4000}}));
    let e = dev.get_json(&format!("/v1/jobs/{}/placement", huge["id"]));
    assert_eq!(e["too_small"], 1, "{e}");
    let running =
        dev.submit_json(&json!({"command": ["sleep", "30"], "resources": {"cpu_millis": 1500}}));
    let id = running["id"].as_u64().unwrap();
    dev.wait_job(id, Duration::from_secs(10), |j| j["state"] == "running");
    let e = dev.get_json(&format!("/v1/jobs/{id}/placement"));
    assert_eq!(
        e["placed"]["node"],
        dev.get_json("/v1/nodes")["nodes"][0]["name"]
    );
    assert_eq!(e["placed"]["node_free_cpu_millis"], 500, "{e}");
    // A job that needs more cpu than is free now: exhausted, not too small.
    let waits = dev.submit_json(&json!({"command": ["true"], "resources": {"cpu_millis": 1000}}));
    let out = dev.cli(&["job", "explain", &waits["id"].to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("exhausted cpu:      1"), "{text}");
    assert!(text.contains("nodes evaluated:    1 of 1"), "{text}");
    // It is the first job in line that fits nowhere now: the node is held
    // for it, 500 millicores short.
    assert!(
        text.contains(&format!("held for job {}", waits["id"])),
        "{text}"
    );
    let e = dev.get_json(&format!("/v1/jobs/{}/placement", waits["id"]));
    assert_eq!(e["reservation"]["job"], waits["id"], "{e}");
    assert_eq!(e["reservation"]["short_cpu_millis"], 500, "{e}");
    // The jobs table says why each queued job waits.
    let table = dev.cli(&["jobs", "--state", "queued"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("[no ready node matches constraints pool=gpu]"),
        "{table}"
    );
    assert!(table.contains("is reserved for it"), "{table}");
    let (status, _) = http(&dev.addr, "GET", "/v1/jobs/999/placement", None);
    assert_eq!(status, 404);
    dev.cli(&["job", "cancel", &id.to_string()]);
}

/// The daemon's snapshots are folded from its log by a thread of its own,
/// never copied from the live state: each one must be the live state at its
/// index, or what a restart (or `rustci replay`) rebuilds from it differs.
#[test]
fn snapshots_folded_from_the_log_are_the_live_state_and_a_stop_waits_for_the_builder() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &["--snapshot-entries", "25"]);
    let body = json!({"command": ["true"], "constraints": {"never": "matched"}});
    for _ in 0..140 {
        dev.submit_json(&body);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev
        .stderr()
        .matches("log compacted behind a snapshot")
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "{}", dev.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let live = dev.get_json("/v1/cluster");
    let at = live["applied_index"].as_u64().unwrap();
    let digest = live["state_digest"].as_str().unwrap().to_string();
    // A replay starts from the newest snapshot the builder folded.
    let replay = run(
        &[
            "replay",
            "--server",
            &dev.addr,
            "--at",
            &at.to_string(),
            "--json",
        ],
        Some(&data),
    );
    assert!(replay.status.success(), "{replay:?}");
    let text = String::from_utf8(replay.stdout).unwrap();
    let summary: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("summary").is_some())
        .unwrap_or_else(|| panic!("no summary in {text}"));
    let summary = &summary["summary"];
    let seen = format!(
        "applied_index {} snapshot {} state_digest {}",
        summary["applied_index"], summary["snapshot"], summary["state_digest"]
    );
    assert_eq!(summary["applied_index"], at, "{seen}");
    assert!(summary["snapshot"].is_object(), "{seen}");
    assert_eq!(
        summary["state_digest"], digest,
        "replayed from the folded snapshot: {seen}"
    );

    // A graceful stop lets the builder finish and closes the log cleanly.
    assert!(dev.terminate().success(), "{}", dev.stderr());
    assert!(
        !dev.stderr().contains("log readers are still open"),
        "{}",
        dev.stderr()
    );
    assert!(data.join("clean-shutdown").exists(), "{}", dev.stderr());

    // The restart starts from the snapshot and has every job.
    let dev = Dev::start(&data, &["--snapshot-entries", "25"]);
    assert!(
        dev.stderr()
            .contains("replay starts from the stored snapshot"),
        "{}",
        dev.stderr()
    );
    let jobs = dev.get_json("/v1/jobs?state=queued&limit=1000");
    let n = jobs["jobs"].as_array().map_or(0, |a| a.len());
    assert_eq!(n, 140, "{jobs}");
}

/// A compaction writes the whole state at once: on a disk with room for
/// appends but not for the snapshot, it is put off with a clear error and
/// writes go on (a failed write inside redb would stop the daemon); once
/// space returns, the next compaction goes through.
#[test]
fn a_snapshot_that_does_not_fit_on_the_disk_is_put_off_and_writes_go_on() {
    let Some(disk) = SmallDisk::mount("96m") else {
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root could not mount a tmpfs"
        );
        return;
    };
    let data = disk.dir.path().join("data");
    let dev = Dev::start(&data, &["--snapshot-entries", "60"]);
    // About 8 MB of state in 40 jobs, before the first compaction.
    let big = "x".repeat(200 * 1024);
    for _ in 0..40 {
        let (status, body) = http(
            &dev.addr,
            "POST",
            "/v1/jobs",
            Some(
                &json!({"command": ["true", big], "constraints": {"never": "matched"}}).to_string(),
            ),
        );
        assert_eq!(status, 201, "{body}");
    }
    assert!(!dev.stderr().contains("log compacted"), "{}", dev.stderr());
    // Leave 6 MB free: room for appends (they keep 4 MB spare), not for
    // an 8 MB snapshot.
    let free = |path: &std::path::Path| -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let fill = disk.dir.path().join("fill");
    let hog = free(disk.dir.path()).saturating_sub(6 * 1024 * 1024);
    std::fs::write(&fill, vec![0u8; hog as usize]).unwrap();
    let small = json!({"command": ["true"], "constraints": {"never": "matched"}}).to_string();
    for i in 0..40 {
        let (status, body) = http(&dev.addr, "POST", "/v1/jobs", Some(&small));
        assert_eq!(status, 201, "submission {i}: {body}\n{}", dev.stderr());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev
        .stderr()
        .contains("no room on the disk for the snapshot")
    {
        assert!(Instant::now() < deadline, "{}", dev.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dev.stderr().contains("log compacted"), "{}", dev.stderr());
    assert_eq!(http(&dev.addr, "GET", "/readyz", None).0, 200);

    // Space returns: a later compaction goes through, nothing was lost.
    std::fs::remove_file(&fill).unwrap();
    for _ in 0..70 {
        let (status, body) = http(&dev.addr, "POST", "/v1/jobs", Some(&small));
        assert_eq!(status, 201, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.stderr().contains("log compacted behind a snapshot") {
        assert!(Instant::now() < deadline, "{}", dev.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let jobs = dev.get_json("/v1/jobs?state=queued&limit=1000");
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 150);
}
