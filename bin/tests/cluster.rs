//! End to end with a replicated control plane: three `rustci server`
//! processes on loopback talking Raft, agents and clients that may talk to
//! any of them, and the leader killed with SIGKILL or stopped gracefully.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Cluster {
    dir: tempfile::TempDir,
    /// Arguments every server gets besides its identity and peers.
    extra: Vec<String>,
    addrs: BTreeMap<u64, String>,
    servers: BTreeMap<u64, Proc>,
    agents: Vec<Proc>,
}

impl Cluster {
    fn start(replicas: u64, agents: usize) -> Cluster {
        Cluster::start_with(replicas, agents, &[])
    }

    fn start_with(replicas: u64, agents: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addrs: BTreeMap<u64, String> = (1..=replicas)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut c = Cluster {
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            addrs,
            servers: BTreeMap::new(),
            agents: Vec::new(),
        };
        for id in 1..=replicas {
            c.start_server(id);
        }
        c.wait_leader(None);
        for i in 0..agents {
            let name = format!("agent{i}");
            let work = c.dir.path().join(&name);
            let servers: Vec<&str> = c.addrs.values().map(String::as_str).collect();
            let args: Vec<String> = [
                "agent",
                "--server",
                &servers.join(","),
                "--name",
                &name,
                "--cpus",
                "8",
                "--memory-mb",
                "8192",
                "--work-dir",
                work.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log = c.dir.path().join(format!("{name}.log"));
            c.agents.push(Proc::spawn(&args, &log));
        }
        c.wait_nodes_ready(agents);
        c
    }

    fn server_args(&self, id: u64) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            self.addrs[&id].clone(),
            "--data-dir".into(),
            self.data_dir(id).to_str().unwrap().into(),
        ];
        for (peer, addr) in &self.addrs {
            if *peer != id {
                args.push("--peer".into());
                args.push(format!("{peer}={addr}"));
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("replica{id}"))
    }

    fn start_server(&mut self, id: u64) {
        let args = self.server_args(id);
        let log = self.dir.path().join(format!("replica{id}.log"));
        // Appends: a restarted replica's log follows its first life's.
        let mut old = std::fs::read_to_string(&log).unwrap_or_default();
        if !old.is_empty() {
            old.push_str("\n--- restarted ---\n");
            std::fs::write(self.dir.path().join(format!("replica{id}.before.log")), old).unwrap();
        }
        self.servers.insert(id, Proc::spawn(&args, &log));
    }

    fn cluster_view(&self, id: u64) -> Option<serde_json::Value> {
        let (status, body) = http(&self.addrs[&id], "GET", "/v1/cluster", None);
        (status == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    /// Waits until the live replicas agree on a leader other than `not`.
    fn wait_leader(&self, not: Option<u64>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leaders: BTreeSet<Option<u64>> = self
                .servers
                .keys()
                .filter_map(|&id| self.cluster_view(id))
                .map(|v| v["leader"].as_u64())
                .collect();
            // Only a replica still tracked is asked whether it leads: a
            // paused one would hold the question for the read timeout.
            if let [Some(l)] = leaders.iter().copied().collect::<Vec<_>>()[..] {
                // `degraded`: a leader out of touch with a replica (the
                // killed one).
                let leads = self.servers.contains_key(&l)
                    && self
                        .cluster_view(l)
                        .is_some_and(|v| v["state"] == "leader" || v["state"] == "degraded");
                if Some(l) != not && leads {
                    return l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader agreed on: {leaders:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|(id, p)| format!("--- replica {id} ---\n{}", p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn any(&self) -> &str {
        let id = self.servers.keys().next().unwrap();
        &self.addrs[id]
    }

    fn get(&self, addr: &str, path: &str) -> serde_json::Value {
        let (status, body) = http(addr, "GET", path, None);
        assert_eq!(status, 200, "GET {path} on {addr}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn wait_nodes_ready(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.get(self.any(), "/v1/nodes");
            let ready = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["state"] == "ready")
                .count();
            if ready >= n {
                return;
            }
            assert!(Instant::now() < deadline, "nodes not ready: {nodes}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every live replica has applied the same index with the
    /// same state digest.
    fn wait_agreement(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let views: Vec<serde_json::Value> = self
                .servers
                .keys()
                .filter_map(|&id| self.cluster_view(id))
                .collect();
            let seen: BTreeSet<(u64, String)> = views
                .iter()
                .map(|v| {
                    (
                        v["applied_index"].as_u64().unwrap(),
                        v["state_digest"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            if views.len() == self.servers.len() && seen.len() == 1 {
                return views[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "replicas disagree: {views:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Submits with an idempotency key until some replica acknowledges it,
/// trying the replicas in turn; returns the job id.
fn submit_until_acked(addrs: &[String], key: &str, body: &str, start: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = start;
    loop {
        let addr = &addrs[i % addrs.len()];
        let (status, text) = http_raw(
            addr,
            "POST",
            "/v1/jobs",
            Some(body.as_bytes()),
            &[("Idempotency-Key", key)],
        );
        if status == 201 {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            return v["id"].as_u64().unwrap();
        }
        assert!(
            status == 0 || status == 503,
            "submit {key} to {addr}: {status} {text}"
        );
        assert!(Instant::now() < deadline, "{key} never acknowledged");
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Submits `n` jobs through `addr` that print, sleep `secs` and print
/// again, and waits until they all run; returns their ids.
fn start_long_jobs(c: &Cluster, addr: &str, prefix: &str, n: usize, secs: u32) -> Vec<u64> {
    let long =
        json!({"command": ["sh", "-c", format!("echo start; sleep {secs}; echo end")]}).to_string();
    let ids: Vec<u64> = (0..n)
        .map(|i| submit_until_acked(&[addr.to_string()], &format!("{prefix}-{i}"), &long, 0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ids
        .iter()
        .all(|id| c.get(addr, &format!("/v1/jobs/{id}"))["state"] == "running")
    {
        assert!(Instant::now() < deadline, "long jobs not running");
        std::thread::sleep(Duration::from_millis(50));
    }
    ids
}

/// Waits (30 s at most) until job `id` ends, as `addr` answers; returns it.
fn wait_ended(c: &Cluster, addr: &str, id: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = c.get(addr, &format!("/v1/jobs/{id}"));
        if terminal(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never ended: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_jobs(addr: &str) -> Vec<serde_json::Value> {
    let mut jobs = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/v1/jobs?limit=1000&cursor={cursor}"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        jobs.extend(page["jobs"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return jobs,
        }
    }
}

#[test]
fn three_replicas_survive_kill_9_of_the_leader_without_losing_or_duplicating_jobs() {
    let mut c = Cluster::start(3, 2);
    let leader = c.wait_leader(None);
    let follower = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    let follower_addr = c.addrs[&follower].clone();
    // Long jobs running across the failover: they must keep running.
    let long_ids = start_long_jobs(&c, &follower_addr, "long", 2, 4);

    // A client submitting continuously with idempotency keys, to any replica.
    let addrs: Vec<String> = c.addrs.values().cloned().collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (addrs, stop) = (addrs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked: Vec<(String, u64, Instant)> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("k{n}");
                let body = json!({"command": ["true"], "name": key}).to_string();
                let id = submit_until_acked(&addrs, &key, &body, n);
                acked.push((key, id, Instant::now()));
                n += 1;
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.servers.get_mut(&leader).unwrap().kill9();
    let killed_at = Instant::now();
    c.servers.remove(&leader);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = client.join().unwrap();
    let new_leader = c.wait_leader(Some(leader));
    assert_ne!(new_leader, leader);

    // Writes resumed: the longest wait between acknowledgements around the
    // kill (reported, bounded loosely: timing targets are benchmarks).
    let gap = acked
        .windows(2)
        .filter(|w| w[1].2 > killed_at)
        .map(|w| w[1].2.duration_since(w[0].2))
        .max()
        .unwrap_or_default();
    eprintln!(
        "acknowledged {} submissions; longest gap across the kill {gap:?}",
        acked.len()
    );
    assert!(
        acked.iter().any(|(_, _, at)| *at > killed_at),
        "no write acknowledged after the kill"
    );
    assert!(gap < Duration::from_secs(10), "writes stalled for {gap:?}");

    // Nothing acknowledged is lost, nothing is duplicated.
    let jobs = all_jobs(&c.addrs[&new_leader]);
    let by_id: BTreeMap<u64, &serde_json::Value> = jobs
        .iter()
        .map(|j| (j["id"].as_u64().unwrap(), j))
        .collect();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for j in &jobs {
        if let Some(k) = j["idempotency_key"].as_str() {
            *per_key.entry(k.to_string()).or_default() += 1;
        }
    }
    for (key, id, _) in &acked {
        let job = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged job {id} ({key}) lost"));
        assert_eq!(job["idempotency_key"], key.as_str(), "job {id}");
        assert_eq!(per_key[key], 1, "key {key} has {} jobs", per_key[key]);
    }

    // The long jobs kept running through the failover: one attempt each,
    // and it succeeded.
    for id in &long_ids {
        let job = wait_ended(&c, &c.addrs[&new_leader], *id);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(
            job["attempts"].as_array().unwrap().len(),
            1,
            "{job}\n{}\n{}",
            http(&c.addrs[&new_leader], "GET", "/v1/events?node=agent0", None).1,
            c.agents
                .iter()
                .map(Proc::log)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let (_, out) = http(&follower_addr, "GET", &format!("/v1/jobs/{id}/logs"), None);
        assert_eq!(out, "start\nend\n", "job {id}");
    }

    // The killed replica comes back, catches up, and all three agree.
    c.start_server(leader);
    let agreed = c.wait_agreement();
    assert!(agreed["applied_index"].as_u64().unwrap() > 0);
    let restarted = c.cluster_view(leader).unwrap();
    assert_eq!(restarted["state"], "follower", "{restarted}");
}

#[test]
fn a_replica_killed_while_the_others_compact_their_logs_catches_up_by_snapshot() {
    // Snapshots every 20 entries: the leader's log is compacted far past
    // where the killed replica stopped, so only its snapshot can bring that
    // replica up.
    let mut c = Cluster::start_with(3, 0, &["--snapshot-entries", "20"]);
    let leader = c.wait_leader(None);
    let lagging = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    let leader_addr = c.addrs[&leader].clone();
    let body = json!({"command": ["true"]}).to_string();
    let submit_to_leader = |prefix: &str, n: usize| {
        for i in 0..n {
            let key = format!("{prefix}-{i}");
            let (status, text) = http_raw(
                &leader_addr,
                "POST",
                "/v1/jobs",
                Some(body.as_bytes()),
                &[("Idempotency-Key", &key)],
            );
            assert_eq!(status, 201, "{text}");
        }
    };
    submit_to_leader("before", 5);
    c.wait_agreement();
    c.servers.get_mut(&lagging).unwrap().kill9();
    c.servers.remove(&lagging);
    submit_to_leader("while-down", 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.servers[&leader]
        .log()
        .contains("log compacted behind a snapshot")
    {
        assert!(Instant::now() < deadline, "{}", c.servers[&leader].log());
        std::thread::sleep(Duration::from_millis(50));
    }

    c.start_server(lagging);
    let agreed = c.wait_agreement();
    assert!(agreed["applied_index"].as_u64().unwrap() > 85, "{agreed}");
    let sent = c.servers[&leader].log();
    assert!(
        sent.contains("sending a snapshot to a replica too far behind"),
        "{sent}"
    );
    let restored = c.servers[&lagging].log();
    assert!(
        restored.contains("restored the state from the leader's snapshot"),
        "{restored}"
    );
    // Every acknowledged job is there, once, as the restored replica
    // serves it (it relays reads to the leader, so ask it to lead).
    let jobs = all_jobs(&c.addrs[&lagging]);
    assert_eq!(jobs.len(), 85, "{jobs:?}");

    // It stored what it installed: killed again, it recovers from its own
    // snapshot and the entries after it, and still agrees.
    c.servers.get_mut(&lagging).unwrap().kill9();
    c.servers.remove(&lagging);
    let (status, text) = http(&leader_addr, "POST", "/v1/jobs", Some(&body));
    assert_eq!(status, 201, "{text}");
    c.start_server(lagging);
    let again = c.wait_agreement();
    assert!(
        again["applied_index"].as_u64().unwrap() > agreed["applied_index"].as_u64().unwrap(),
        "{again}"
    );
}

#[test]
fn a_dead_replica_whose_disk_is_lost_is_replaced_by_a_new_one() {
    let mut c = Cluster::start_with(3, 0, &["--snapshot-entries", "30"]);
    let leader = c.wait_leader(None);
    let dead = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    let body = json!({"command": ["true"]}).to_string();
    let submit = |c: &Cluster, key: &str| {
        let addrs: Vec<String> = c.servers.keys().map(|id| c.addrs[id].clone()).collect();
        submit_until_acked(&addrs, key, &body, 0)
    };
    for i in 0..40 {
        submit(&c, &format!("before-{i}"));
    }
    // The replica dies and its disk with it.
    c.servers.get_mut(&dead).unwrap().kill9();
    c.servers.remove(&dead);
    std::fs::remove_dir_all(c.data_dir(dead)).unwrap();

    // Remove it (through any replica: a follower relays to the leader)...
    let any = c.addrs[c.servers.keys().next().unwrap()].clone();
    let (status, text) = http(
        &any,
        "DELETE",
        &format!("/v1/cluster/replicas/{dead}"),
        None,
    );
    assert_eq!(status, 200, "{text}");
    let now: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(now["replicas"].as_array().unwrap().len(), 2, "{now}");
    // Removing it again changes nothing; bad requests are refused.
    let (status, again) = http(
        &any,
        "DELETE",
        &format!("/v1/cluster/replicas/{dead}"),
        None,
    );
    assert_eq!((status, &again), (200, &text));
    let (status, bad) = http(
        &any,
        "POST",
        "/v1/cluster/replicas",
        Some("{\"id\": 99, \"addr\": \"x:1\"}"),
    );
    assert_eq!(status, 400, "{bad}");
    assert!(bad.contains("invalid_membership_change"), "{bad}");
    let (status, bad) = http(&any, "POST", "/v1/cluster/replicas", Some("{\"id\": 4}"));
    assert_eq!(status, 400, "{bad}");
    for i in 0..10 {
        submit(&c, &format!("while-two-{i}"));
    }

    // ...then start its replacement, empty, under a new id, and add it.
    c.addrs.remove(&dead);
    let new = 4;
    c.addrs.insert(new, format!("127.0.0.1:{}", free_port()));
    c.start_server(new);
    // As an operator would: with the CLI, through any replica.
    let out = run(
        &[
            "cluster",
            "add",
            &format!("{new}={}", c.addrs[&new]),
            "--server",
            &any,
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let want: BTreeSet<u64> = c.addrs.keys().copied().collect();
    for id in &want {
        assert!(
            text.contains(&format!("  {id} {}", c.addrs[id])),
            "{id} missing: {text}"
        );
    }
    // Adding it again changes nothing.
    let add = json!({"id": new, "addr": c.addrs[&new]}).to_string();
    let (status, again) = http(&any, "POST", "/v1/cluster/replicas", Some(&add));
    assert_eq!(status, 200, "{again}");
    // It catches up (by the leader's snapshot: the log was compacted).
    let agreed = c.wait_agreement();
    assert!(agreed["applied_index"].as_u64().unwrap() > 50, "{agreed}");
    let view = c.cluster_view(new).unwrap();
    let shown: BTreeSet<u64> = view["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(shown, want, "{view}");

    // It counts: with the old leader killed, the two left (one of them the
    // new replica) elect a leader and take writes, and nothing is lost.
    let leader = c.wait_leader(None);
    c.servers.get_mut(&leader).unwrap().kill9();
    c.servers.remove(&leader);
    let new_leader = c.wait_leader(Some(leader));
    submit(&c, "after");
    let jobs = all_jobs(&c.addrs[&new_leader]);
    assert_eq!(jobs.len(), 51, "{}", c.logs());
}

#[test]
fn a_leader_stopped_gracefully_hands_over_and_a_follower_forwards_to_the_new_one() {
    let mut c = Cluster::start(3, 0);
    let leader = c.wait_leader(None);
    let other = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    let other_addr = c.addrs[&other].clone();
    // A write through a follower is forwarded to the leader.
    let body = json!({"command": ["true"]}).to_string();
    let (status, text) = http(&other_addr, "POST", "/v1/jobs", Some(&body));
    assert_eq!(status, 201, "{text}");
    let status = c.servers.get_mut(&leader).unwrap().terminate();
    assert!(status.success(), "{status:?}");
    let log = c.servers[&leader].log();
    assert!(log.contains("handed leadership over"), "{log}");
    c.servers.remove(&leader);
    let new_leader = c.wait_leader(Some(leader));
    let (status, text) = http(&other_addr, "POST", "/v1/jobs", Some(&body));
    assert_eq!(status, 201, "{text}");
    let view = c.cluster_view(new_leader).unwrap();
    assert_eq!(view["jobs"]["queued"], 2, "{view}");
}

#[test]
fn garbage_or_another_clusters_messages_on_the_peer_endpoint_change_nothing() {
    use rustci_core::raft::{Body, Message};
    use rustci_net::peer::{encode_batch, PeerBatch, PEER_PATH, PEER_PROTOCOL_VERSION};
    let c = Cluster::start(3, 0);
    let leader = c.wait_leader(None);
    let agreed = c.wait_agreement();
    let target = &c.addrs[&leader];
    let refused = |body: &[u8], want_status: u16, want_code: &str| {
        let (status, text) = http_raw(target, "POST", PEER_PATH, Some(body), &[]);
        assert_eq!(status, want_status, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], want_code, "{text}");
    };
    refused(b"\x93garbage", 400, "bad_peer_message");
    refused(b"{\"json\": true}", 400, "bad_peer_message");
    // A well-formed batch that would depose the leader (a much newer
    // term), from a replica of another cluster.
    let mut batch = PeerBatch {
        protocol: PEER_PROTOCOL_VERSION,
        cluster_id: "0123456789abcdef0123456789abcdef".into(),
        from: if leader == 1 { 2 } else { 1 },
        to: leader,
        messages: vec![Message {
            from: if leader == 1 { 2 } else { 1 },
            to: leader,
            term: 1000,
            body: Body::Vote {
                last_index: 1_000_000,
                last_term: 1000,
                transfer: true,
            },
        }],
        snapshot: None,
    };
    refused(&encode_batch(&batch), 409, "wrong_cluster");
    batch.protocol = PEER_PROTOCOL_VERSION + 1;
    refused(&encode_batch(&batch), 400, "unsupported_peer_protocol");
    // This cluster's own id, and a batch that claims a snapshot's larger
    // body limit without carrying that snapshot.
    let log = c.servers[&leader].log();
    batch.protocol = PEER_PROTOCOL_VERSION;
    batch.cluster_id = log
        .split("cluster_id=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{log}"))
        .to_string();
    let (status, text) = http_raw(
        target,
        "POST",
        PEER_PATH,
        Some(&encode_batch(&batch)),
        &[(rustci_net::peer::PEER_SNAPSHOT_BYTES_HEADER, "1000000")],
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("declares a snapshot of 1000000 bytes"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let after = c.wait_agreement();
    assert_eq!(after["term"], agreed["term"], "{after}");
    assert_eq!(after["leader"], agreed["leader"], "{after}");
    assert_eq!(after["applied_index"], agreed["applied_index"], "{after}");
    assert_eq!(after["state_digest"], agreed["state_digest"], "{after}");
}

#[test]
fn a_replica_refuses_another_replicas_or_another_clusters_data_dir() {
    let mut c = Cluster::start(3, 0);
    c.wait_leader(None);
    for p in c.servers.values_mut() {
        p.kill9();
    }
    let run = |args: &[String]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // Replica 2's flags on replica 1's data dir.
    let mut args = c.server_args(2);
    let at = args.iter().position(|a| a == "--data-dir").unwrap();
    args[at + 1] = c.data_dir(1).to_str().unwrap().into();
    let err = run(&args);
    assert!(err.contains("is replica 1's, not replica 2's"), "{err}");
    // Replica 1 with another cluster token (another cluster id).
    let mut args = c.server_args(1);
    args.extend(["--cluster-token".to_string(), "other".to_string()]);
    let err = run(&args);
    assert!(err.contains("belongs to cluster"), "{err}");
    // Nothing was changed: replica 1 starts as itself again.
    let identity = std::fs::read_to_string(c.data_dir(1).join("identity")).unwrap();
    assert!(identity.contains("replica_id = 1"), "{identity}");
}

/// Nomad #3840: a leader change must not mark healthy nodes down. A paused
/// leader is the hard case: its agents' connections stay open and silent,
/// so each agent has to notice the silence and find the new leader before
/// that leader's grace period for the node runs out.
#[test]
fn a_paused_leader_is_replaced_without_marking_any_healthy_node_down() {
    let mut c = Cluster::start(3, 2);
    let leader = c.wait_leader(None);
    let leader_addr = c.addrs[&leader].clone();
    let long_ids = start_long_jobs(&c, &leader_addr, "p", 2, 9);

    // SIGSTOP: the process keeps its sockets, it only stops answering.
    eprintln!(
        "DEBUG pausing {leader} at {:?}",
        std::time::SystemTime::now()
    );
    let paused = c.servers.remove(&leader).unwrap();
    let pid = paused.child.as_ref().unwrap().id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let new_leader = c.wait_leader(Some(leader));
    let new_addr = c.addrs[&new_leader].clone();
    let elected_at = Instant::now();
    // Past the new leader's grace period (two heartbeats plus the 3 s a
    // node may be silent) with margin: every node stays ready throughout.
    while elected_at.elapsed() < Duration::from_secs(7) {
        let nodes = c.get(&new_addr, "/v1/nodes");
        for node in nodes["nodes"].as_array().unwrap() {
            assert_eq!(
                node["state"],
                "ready",
                "{node}\n{}",
                c.agents
                    .iter()
                    .map(Proc::log)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    let (_, events) = http(&new_addr, "GET", "/v1/events", None);
    assert!(!events.contains("node_down"), "{events}");

    // The jobs ran through it: one attempt each, succeeded.
    for id in &long_ids {
        let job = wait_ended(&c, &new_addr, *id);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(
            job["attempts"].as_array().unwrap().len(),
            1,
            "{job}\n{}\n{}\n{}",
            http(&new_addr, "GET", "/v1/events?node=agent0", None).1,
            c.agents
                .iter()
                .map(Proc::log)
                .collect::<Vec<_>>()
                .join("\n"),
            c.logs()
        );
    }
    // The old leader, resumed, follows.
    c.servers.insert(leader, paused);
    let view = loop {
        if let Some(v) = c.cluster_view(leader) {
            if v["state"] == "follower" {
                break v;
            }
        }
        assert!(
            elected_at.elapsed() < Duration::from_secs(60),
            "the old leader never follows"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(view["leader"], new_leader, "{view}");
}

/// A replica that must install the leader's snapshot on a disk without room
/// for it waits (its writes get 507 meanwhile) instead of failing inside
/// redb and stopping; once space returns it installs it and agrees.
#[test]
fn a_snapshot_install_waits_for_disk_space_instead_of_stopping_the_replica() {
    let mut c = Cluster::start_with(3, 0, &["--snapshot-entries", "20"]);
    let leader = c.wait_leader(None);
    let lagging = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    let leader_addr = c.addrs[&leader].clone();
    let big = "x".repeat(200 * 1024);
    let submit = |n: usize| {
        for _ in 0..n {
            let body = json!({"command": ["true", big], "constraints": {"never": "matched"}});
            let (status, text) = http(&leader_addr, "POST", "/v1/jobs", Some(&body.to_string()));
            assert_eq!(status, 201, "{text}");
        }
    };
    submit(5);
    c.wait_agreement();
    c.servers.get_mut(&lagging).unwrap().kill9();
    c.servers.remove(&lagging);
    // Its data dir moves onto a 64 MB tmpfs.
    let dir = c.data_dir(lagging);
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root could not mount a tmpfs"
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", old.display()))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(copied.success());
    // About 8 MB of state the leader compacts behind its snapshot.
    submit(40);
    // Leave 6 MB: room for appends (4 MB spare), not for the snapshot.
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&dir)
        .output()
        .unwrap();
    let free: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let fill = dir.join("fill");
    std::fs::write(&fill, vec![0u8; free.saturating_sub(6 << 20) as usize]).unwrap();
    c.start_server(lagging);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.servers[&lagging]
        .log()
        .contains("the event log's disk is full")
    {
        assert!(Instant::now() < deadline, "{}", c.servers[&lagging].log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let alive = c.cluster_view(lagging);
    assert!(alive.is_some(), "{}", c.servers[&lagging].log());
    // Space returns: it installs the snapshot and all three agree.
    std::fs::remove_file(&fill).unwrap();
    let agreed = c.wait_agreement();
    assert!(agreed["applied_index"].as_u64().unwrap() > 45, "{agreed}");
    assert!(
        c.servers[&lagging]
            .log()
            .contains("installing the leader's snapshot"),
        "{}",
        c.servers[&lagging].log()
    );
}

/// The state, and so the snapshot, may be larger than any batch of
/// entries: a replica far behind still catches up when the leader's
/// snapshot is larger than a peer batch may be (64 MiB).
#[test]
fn a_snapshot_larger_than_a_peer_batch_still_reaches_a_lagging_replica() {
    let mut c = Cluster::start_with(3, 0, &["--snapshot-entries", "150"]);
    let leader = c.wait_leader(None);
    let lagging = *c.addrs.keys().find(|&&id| id != leader).unwrap();
    c.servers.get_mut(&lagging).unwrap().kill9();
    c.servers.remove(&lagging);
    let live: Vec<String> = c.servers.keys().map(|id| c.addrs[id].clone()).collect();
    // 72 MB of commands (the largest a job may have is 256 KiB), retried
    // with their keys through any leader change.
    let big = "x".repeat(240 * 1024);
    let body = json!({"command": ["true", big], "constraints": {"never": "matched"}}).to_string();
    for i in 0..310 {
        submit_until_acked(&live, &format!("big-{i}"), &body, 0);
    }
    // Twice: the second snapshot holds about 300 of those jobs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c
        .servers
        .values()
        .map(|s| s.log().matches("log compacted behind a snapshot").count())
        .min()
        < Some(2)
    {
        assert!(Instant::now() < deadline, "{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let leader = c.wait_leader(None);
    c.start_server(lagging);
    let agreed = c.wait_agreement();
    assert!(agreed["applied_index"].as_u64().unwrap() > 300, "{agreed}");
    let sent = c.servers[&leader].log();
    let line = sent
        .lines()
        .find(|l| l.contains("sending a snapshot to a replica too far behind"))
        .unwrap_or_else(|| panic!("{sent}"));
    let bytes: u64 = line
        .split("bytes=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(bytes > 64 << 20, "{line}");
}
