//! `/metrics` follows the Prometheus conventions: `promtool check metrics`
//! passes on the answer of `rustci dev` and of `rustci server`, and the
//! numbers mean what docs/operations.md says they mean.
//!
//! promtool comes with Debian's `prometheus` package; `.ci/run` installs
//! it. Where it is missing the test fails under CI (`CI` set) and otherwise
//! still runs its own checks of the format, saying that promtool did not.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// `promtool check metrics` on `text`: `Some(problems)` (empty when it
/// passed), `None` when promtool is not installed.
fn promtool(text: &str) -> Option<String> {
    let tool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = match Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required under CI (apt-get install prometheus)"
            );
            eprintln!("NOTE: promtool not found: only this test's own checks of the format ran");
            return None;
        }
        Err(e) => panic!("running {tool}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        assert!(problems.trim().is_empty(), "{problems}");
    } else {
        assert!(!problems.trim().is_empty(), "promtool failed silently");
    }
    Some(problems)
}

/// The exposition format's rules this project relies on, checked without
/// promtool: every family has HELP and TYPE before its samples; counters
/// and only counters end in `_total`; a histogram's buckets ascend, are
/// cumulative and end in `+Inf`, which equals `_count`.
fn check_format(text: &str) {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split_whitespace().next().unwrap().to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(helped.last().map(String::as_str), Some(name), "{line}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "{name} twice"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        let value = line.rsplit_once(' ').unwrap().1;
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    for (name, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        let (mut last_le, mut last_count) = (f64::MIN, 0u64);
        let mut inf = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else {
                continue;
            };
            let (le, count) = rest.split_once("\"} ").unwrap();
            let count: u64 = count.parse().unwrap();
            assert!(count >= last_count, "{name}: buckets are cumulative");
            last_count = count;
            if le == "+Inf" {
                inf = Some(count);
            } else {
                let le: f64 = le.parse().unwrap();
                assert!(le > last_le, "{name}: bounds ascend");
                last_le = le;
            }
        }
        assert_eq!(
            inf,
            Some(sample(text, &format!("{name}_count")) as u64),
            "{name}: +Inf bucket equals _count"
        );
    }
}

/// The value of the sample named exactly `key` (name and labels).
fn sample(text: &str, key: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == key).then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
}

fn metrics(addr: &str) -> String {
    let (status, text) = http(addr, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text
}

fn check_with_promtool(text: &str) {
    check_format(text);
    if let Some(problems) = promtool(text) {
        assert!(
            problems.trim().is_empty(),
            "promtool check metrics:\n{problems}\n{text}"
        );
    }
}

#[test]
fn dev_metrics_pass_promtool_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    // Before anything: one election, no submission yet.
    let text = metrics(&dev.addr);
    check_with_promtool(&text);
    assert_eq!(sample(&text, "rustci_raft_leader_changes_total"), 1.0);
    assert_eq!(sample(&text, "rustci_submit_duration_seconds_count"), 0.0);

    // One job that succeeds; one that fails once and is retried (its second
    // attempt waits in the queue from the end of the first).
    let ok = dev.submit_json(&json!({"command": ["true"]}));
    let retried = dev.submit_json(&json!({"command": ["false"], "max_retries": 1}));
    for job in [&ok, &retried] {
        dev.wait_job(
            job["id"].as_u64().unwrap(),
            Duration::from_secs(30),
            terminal,
        );
    }
    let text = metrics(&dev.addr);
    check_with_promtool(&text);
    let cluster = dev.get_json("/v1/cluster");
    assert_eq!(
        sample(&text, "rustci_raft_term"),
        cluster["term"].as_f64().unwrap()
    );
    // Nothing is written while the jobs are terminal and the node idle.
    assert_eq!(
        sample(&text, "rustci_raft_commit_index"),
        cluster["commit_index"].as_f64().unwrap()
    );
    assert_eq!(
        sample(&text, "rustci_raft_applied_index"),
        cluster["applied_index"].as_f64().unwrap()
    );
    assert_eq!(sample(&text, "rustci_raft_is_leader"), 1.0);
    assert_eq!(sample(&text, "rustci_raft_leader_changes_total"), 1.0);
    assert_eq!(sample(&text, "rustci_jobs{state=\"succeeded\"}"), 1.0);
    assert_eq!(sample(&text, "rustci_jobs{state=\"failed\"}"), 1.0);
    assert_eq!(sample(&text, "rustci_nodes{state=\"ready\"}"), 1.0);
    assert_eq!(sample(&text, "rustci_submit_duration_seconds_count"), 2.0);
    // Three placements: the two first attempts and the retry.
    assert_eq!(sample(&text, "rustci_queue_wait_seconds_count"), 3.0);
    assert!(sample(&text, "rustci_scheduling_duration_seconds_count") >= 1.0);
    // Every committed entry came in some batch.
    let batches = sample(&text, "rustci_commit_duration_seconds_count");
    let entries = sample(&text, "rustci_log_appended_entries_total");
    assert!(batches >= 1.0 && batches <= entries, "{batches} {entries}");
    assert!(sample(&text, "rustci_uptime_seconds") > 0.0);
    let node = dev.get_json("/v1/nodes")["nodes"][0].clone();
    let name = node["name"].as_str().unwrap();
    assert_eq!(
        sample(
            &text,
            &format!("rustci_node_capacity_memory_bytes{{node=\"{name}\"}}")
        ),
        node["memory_mb"].as_f64().unwrap() * 1024.0 * 1024.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("rustci_node_capacity_cpus{{node=\"{name}\"}}")
        ),
        node["cpus"].as_f64().unwrap()
    );
}

/// A `rustci server` child process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn server_metrics_pass_promtool_with_no_node_and_a_queued_job() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let _server = Server(
        Command::new(BIN)
            .args(["server", "--listen", &addr, "--data-dir"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(&addr, "GET", "/readyz", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "rustci server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = http(&addr, "POST", "/v1/jobs", Some(r#"{"command": ["true"]}"#));
    assert_eq!(status, 201, "{body}");
    let text = metrics(&addr);
    check_with_promtool(&text);
    assert_eq!(sample(&text, "rustci_jobs{state=\"queued\"}"), 1.0);
    assert_eq!(
        sample(&text, "rustci_unplaceable_jobs{reason=\"no_ready_node\"}"),
        1.0
    );
    assert_eq!(sample(&text, "rustci_queue_wait_seconds_count"), 0.0);
    assert_eq!(sample(&text, "rustci_submit_duration_seconds_count"), 1.0);
    assert_eq!(sample(&text, "rustci_raft_leader_changes_total"), 1.0);
}

#[test]
fn promtool_refuses_what_breaks_the_conventions() {
    // The check above can fail: an abbreviated unit and a counter without
    // `_total` are refused (skipped where promtool is missing).
    let bad = "# HELP rustci_x_mb X.\n# TYPE rustci_x_mb gauge\nrustci_x_mb 1\n\
               # HELP rustci_y Y.\n# TYPE rustci_y counter\nrustci_y 1\n";
    if let Some(problems) = promtool(bad) {
        assert!(problems.contains("rustci_x_mb"), "{problems}");
        assert!(problems.contains("rustci_y"), "{problems}");
    }
}

/// Issue 11's acceptance: `promtool check metrics` passes on a cluster's
/// leader and on a follower, and each says which it is.
#[test]
fn cluster_leader_and_follower_metrics_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let _servers: Vec<Server> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(BIN);
            cmd.args([
                "server",
                "--id",
                &(i + 1).to_string(),
                "--listen",
                &addrs[i],
            ])
            .arg("--data-dir")
            .arg(dir.path().join(format!("r{i}")));
            for (j, a) in addrs.iter().enumerate() {
                if j != i {
                    cmd.arg("--peer").arg(format!("{}={a}", j + 1));
                }
            }
            Server(
                cmd.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let leaders: Vec<u64> = addrs
            .iter()
            .filter_map(|a| {
                let (status, body) = http(a, "GET", "/v1/cluster", None);
                (status == 200).then(|| serde_json::from_str::<serde_json::Value>(&body).unwrap())
            })
            .filter(|v| v["state"] == "leader")
            .map(|v| v["id"].as_u64().unwrap())
            .collect();
        if let [l] = leaders[..] {
            break l as usize - 1;
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(50));
    };
    let follower = (leader + 1) % 3;
    // Through the follower: relayed to the leader.
    let (status, body) = http(
        &addrs[follower],
        "POST",
        "/v1/jobs",
        Some(r#"{"command": ["true"]}"#),
    );
    assert_eq!(status, 201, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, want) in [(leader, "leader"), (follower, "follower")] {
        let text = loop {
            let text = metrics(&addrs[i]);
            if sample(&text, "rustci_jobs{state=\"queued\"}") == 1.0 {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} never applied the job"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        check_with_promtool(&text);
        assert_eq!(
            sample(&text, &format!("rustci_replica_state{{state=\"{want}\"}}")),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, "rustci_raft_is_leader"),
            f64::from(u8::from(want == "leader"))
        );
    }
}
