//! End to end with remote agents: `rustci server` and several `rustci agent`
//! processes on loopback, driven through the CLI and HTTP as a user would.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

struct Cluster {
    dir: tempfile::TempDir,
    addr: String,
    server: Proc,
    agents: BTreeMap<String, Proc>,
}

const JOIN_TOKEN: &str = "join-secret";

impl Cluster {
    fn start(agents: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let data = dir.path().join("data");
        let server = Proc::spawn(
            &[
                "server",
                "--listen",
                &addr,
                "--data-dir",
                data.to_str().unwrap(),
                "--join-token",
                JOIN_TOKEN,
            ],
            &dir.path().join("server.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(&addr, "GET", "/readyz", None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "server not ready: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut c = Cluster {
            dir,
            addr,
            server,
            agents: BTreeMap::new(),
        };
        for (name, label) in agents {
            c.add_agent(name, label);
        }
        c.wait_nodes_ready(agents.len());
        c
    }

    fn agent_args(&self, name: &str, label: &str, token: &str) -> Vec<String> {
        let work = self.dir.path().join(format!("agent-{name}"));
        vec![
            "agent".into(),
            "--server".into(),
            self.addr.clone(),
            "--name".into(),
            name.into(),
            "--cpus".into(),
            "8".into(),
            "--memory-mb".into(),
            "8192".into(),
            "--label".into(),
            label.into(),
            "--work-dir".into(),
            work.to_str().unwrap().into(),
            "--join-token".into(),
            token.into(),
        ]
    }

    fn add_agent(&mut self, name: &str, label: &str) {
        let args = self.agent_args(name, label, JOIN_TOKEN);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.path().join(format!("agent-{name}.log"));
        self.agents
            .insert(name.to_string(), Proc::spawn(&args, &log));
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = http(&self.addr, "GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn wait_nodes_ready(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.get("/v1/nodes");
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

    fn submit(&self, body: &serde_json::Value) -> u64 {
        let (status, text) = http(&self.addr, "POST", "/v1/jobs", Some(&body.to_string()));
        assert_eq!(status, 201, "submit: {text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
            .as_u64()
            .unwrap()
    }

    fn job(&self, id: u64) -> serde_json::Value {
        self.get(&format!("/v1/jobs/{id}"))
    }
}

/// A job that holds a lock of its own while it runs for `secs`: a second
/// execution overlapping the first cannot take it, says so and fails. It
/// records its marks and its process id under `marks`.
fn locking_job(marks: &Path, secs: u32) -> serde_json::Value {
    let script = format!(
        r#"exec 9>"$D/lock-$RUSTCI_JOB_ID"
if flock -n 9; then
  echo "start $RUSTCI_JOB_ID $RUSTCI_ATTEMPT" >> "$D/marks.txt"
  sleep {secs} & echo $! > "$D/pid-$RUSTCI_JOB_ID-$RUSTCI_ATTEMPT"; wait
  echo "end $RUSTCI_JOB_ID $RUSTCI_ATTEMPT" >> "$D/marks.txt"
else
  echo "OVERLAP $RUSTCI_JOB_ID $RUSTCI_ATTEMPT" >> "$D/marks.txt"; exit 1
fi"#
    );
    json!({
        "command": ["sh", "-c", script],
        "env": {"D": marks.to_str().unwrap()},
        "resources": {"cpu_millis": 500, "memory_mb": 64},
    })
}

impl Cluster {
    /// Waits until every job of `ids` runs; returns their views.
    fn wait_all_running(&self, ids: &[u64]) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let jobs: Vec<serde_json::Value> = ids.iter().map(|id| self.job(*id)).collect();
            if jobs.iter().all(|j| j["state"] == "running") {
                return jobs;
            }
            assert!(Instant::now() < deadline, "not all running: {jobs:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z ")
}

#[test]
fn a_killed_agents_jobs_run_elsewhere_within_seconds_never_twice_at_once() {
    let mut c = Cluster::start(&[("a1", "zone=x"), ("a2", "zone=y"), ("a3", "zone=z")]);
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let ids: Vec<u64> = (0..24).map(|_| c.submit(&locking_job(&marks, 6))).collect();
    // Wait until every job runs, then kill -9 the agent with the most.
    let placed = c.wait_all_running(&ids);
    let mut per_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for j in &placed {
        per_node
            .entry(j["node"].as_str().unwrap().to_string())
            .or_default()
            .push(j["id"].as_u64().unwrap());
    }
    let (victim, victims_jobs) = per_node
        .iter()
        .max_by_key(|(_, v)| v.len())
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    // Every job wrote its process ids by now (it runs).
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    c.agents.get_mut(&victim).unwrap().kill9();
    // The killed agent's job processes die with it.
    let pids: Vec<i32> = victims_jobs
        .iter()
        .filter_map(|id| std::fs::read_to_string(marks.join(format!("pid-{id}-1"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), victims_jobs.len(), "every job recorded its pid");
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "job processes outlived their agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each of its jobs runs again elsewhere, within seconds.
    let mut moved_after = Vec::new();
    for id in &victims_jobs {
        let deadline = killed_at + Duration::from_secs(15);
        loop {
            let j = c.job(*id);
            let attempts = j["attempts"].as_array().unwrap();
            let last = attempts.last().unwrap();
            if attempts.len() >= 2 && last["state"] == "running" {
                assert_ne!(last["node"], victim.as_str(), "{j}");
                assert_eq!(attempts[0]["state"], "lost", "{j}");
                break;
            }
            assert!(Instant::now() < deadline, "job {id} did not move: {j}");
            std::thread::sleep(Duration::from_millis(20));
        }
        moved_after.push(killed_at.elapsed());
    }
    let slowest = moved_after.iter().max().unwrap();
    eprintln!("jobs of the killed agent running elsewhere after {slowest:?}");
    assert!(
        *slowest < Duration::from_secs(6),
        "took {slowest:?} (the lease rule allows 3.5 s plus a pass)"
    );
    // All 24 succeed, and no two executions of a job overlapped.
    for id in &ids {
        let j = c.job(*id);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut j = j;
        while j["state"] != "succeeded" {
            assert!(Instant::now() < deadline, "job {id}: {j}");
            assert!(
                !matches!(j["state"].as_str(), Some("failed" | "cancelled")),
                "{j}"
            );
            std::thread::sleep(Duration::from_millis(100));
            j = c.job(*id);
        }
    }
    let text = std::fs::read_to_string(marks.join("marks.txt")).unwrap();
    assert!(!text.contains("OVERLAP"), "{text}");
    // The server's own log says what happened, not only the event log.
    let log = c.server.log();
    assert!(
        log.contains("node down") && log.contains(&format!("node={victim}")),
        "{log}"
    );
    assert!(log.contains("attempt lost with its node"), "{log}");
    // The output of a finished job stays readable with its agent gone.
    let (status, _) = http(
        &c.addr,
        "GET",
        &format!("/v1/jobs/{}/logs?attempt=1", victims_jobs[0]),
        None,
    );
    assert_eq!(status, 200);
    drop(c.server.log());
}

#[test]
fn an_agent_with_a_wrong_token_is_refused_and_never_joins() {
    let c = Cluster::start(&[("good", "zone=a")]);
    let args = c.agent_args("intruder", "zone=b", "wrong");
    let out = Command::new(BIN)
        .args(&args)
        .env_remove("RUSTCI_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("join token"), "{stderr}");
    let nodes = c.get("/v1/nodes");
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["good"]);
    // Garbage on the agent endpoint gets a clear refusal and changes nothing.
    let (status, body) = http(&c.addr, "GET", "/v1/agent", None);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("upgrade_required"), "{body}");
    assert!(
        c.server.log().contains("refused"),
        "logged once: {}",
        c.server.log()
    );
}

#[test]
fn output_of_a_remote_job_is_readable_from_the_server() {
    let c = Cluster::start(&[("w", "zone=a")]);
    let id = c.submit(
        &json!({"command": ["sh", "-c", "for i in 1 2 3; do echo line $i; done; echo err >&2"]}),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.job(id)["state"] != "succeeded" {
        assert!(Instant::now() < deadline, "{}", c.job(id));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = http(&c.addr, "GET", &format!("/v1/jobs/{id}/logs"), None);
    assert_eq!(status, 200);
    assert_eq!(body, "line 1\nline 2\nline 3\nerr\n");
}

#[test]
fn a_job_sees_its_own_env_and_nothing_of_the_agents() {
    let mut c = Cluster::start(&[]);
    // This agent takes its join token from the environment, as an operator
    // would; the job must not see it, nor anything else of the agent's.
    let mut args = c.agent_args("envy", "zone=e", JOIN_TOKEN);
    args.truncate(args.len() - 2);
    let log = c.dir.path().join("agent-envy.log");
    let child = Command::new(BIN)
        .args(&args)
        .env("RUSTCI_JOIN_TOKEN", JOIN_TOKEN)
        .env("AGENT_ONLY_SECRET", "do-not-leak")
        .env("LANG", "C.UTF-8")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    c.agents.insert("envy".into(), Proc::from_child(child, log));
    c.wait_nodes_ready(1);
    let id = c.submit(&json!({"command": ["env"], "env": {"MINE": "yes"}}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.job(id)["state"] != "succeeded" {
        assert!(Instant::now() < deadline, "{}", c.job(id));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, env) = http(&c.addr, "GET", &format!("/v1/jobs/{id}/logs"), None);
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    let mut names = names;
    names.sort_unstable();
    assert_eq!(
        names,
        vec![
            "HOME",
            "LANG",
            "MINE",
            "PATH",
            "RUSTCI_ATTEMPT",
            "RUSTCI_JOB_ID"
        ],
        "{env}"
    );
    assert!(
        !env.contains(JOIN_TOKEN) && !env.contains("do-not-leak"),
        "{env}"
    );
}

#[test]
fn a_paused_agents_jobs_die_at_its_lease_and_run_elsewhere_never_twice_at_once() {
    let c = Cluster::start(&[("p1", "zone=x"), ("p2", "zone=y")]);
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let ids: Vec<u64> = (0..4).map(|_| c.submit(&locking_job(&marks, 8))).collect();
    let placed = c.wait_all_running(&ids);
    let victim = placed[0]["node"].as_str().unwrap().to_string();
    let victims_jobs: Vec<u64> = placed
        .iter()
        .filter(|j| j["node"] == victim.as_str())
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pids: Vec<i32> = victims_jobs
        .iter()
        .filter_map(|id| std::fs::read_to_string(marks.join(format!("pid-{id}-1"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), victims_jobs.len());
    let agent_pid = c.agents[&victim].child.as_ref().unwrap().id() as i32;
    unsafe {
        libc::kill(agent_pid, libc::SIGSTOP);
    }
    let stopped = Instant::now();
    // Its jobs run elsewhere, and by then the paused agent's processes are
    // gone: their shims killed them when its lease lapsed.
    for id in &victims_jobs {
        loop {
            let j = c.job(*id);
            let attempts = j["attempts"].as_array().unwrap();
            if attempts.len() >= 2 && attempts.last().unwrap()["state"] == "running" {
                assert_ne!(attempts.last().unwrap()["node"], victim.as_str(), "{j}");
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(15),
                "job {id} did not move: {j}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            pids.iter().all(|p| !pid_alive(*p)),
            "a paused agent's job still runs while it runs elsewhere"
        );
    }
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    unsafe {
        libc::kill(agent_pid, libc::SIGCONT);
    }
    // The agent comes back as a new incarnation; the stale attempts stay
    // lost (never reported as current), and every job succeeds once.
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut j = c.job(*id);
        while j["state"] != "succeeded" {
            assert!(Instant::now() < deadline, "job {id}: {j}");
            std::thread::sleep(Duration::from_millis(100));
            j = c.job(*id);
        }
    }
    for id in &victims_jobs {
        let j = c.job(*id);
        assert_eq!(j["attempts"][0]["state"], "lost", "{j}");
    }
    let text = std::fs::read_to_string(marks.join("marks.txt")).unwrap();
    assert!(!text.contains("OVERLAP"), "{text}");
    c.wait_nodes_ready(2);
}

fn signal(p: &Proc, sig: i32) {
    unsafe {
        libc::kill(p.child.as_ref().unwrap().id() as i32, sig);
    }
}

fn wait_exit(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
            p.child = None;
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit: {}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_agent_lets_its_jobs_finish_then_leaves_with_the_reason() {
    let mut c = Cluster::start(&[("d1", "zone=a")]);
    let id = c.submit(&json!({"command": ["sh", "-c", "sleep 2; echo done"]}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.job(id)["state"] != "running" {
        assert!(Instant::now() < deadline, "{}", c.job(id));
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&c.agents["d1"], libc::SIGTERM);
    // Drained at once: a new job waits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.get("/v1/nodes")["nodes"][0]["state"] != "draining" {
        assert!(Instant::now() < deadline, "{}", c.get("/v1/nodes"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiting = c.submit(&json!({"command": ["true"]}));
    let status = wait_exit(c.agents.get_mut("d1").unwrap(), Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", c.agents["d1"].log());
    assert_eq!(c.job(id)["state"], "succeeded", "the running job finished");
    assert_eq!(c.job(waiting)["state"], "queued");
    let node = &c.get("/v1/nodes")["nodes"][0];
    assert_eq!(node["state"], "left", "{node}");
    assert!(
        node["reason"].as_str().unwrap().contains("stopped"),
        "{node}"
    );
}

#[test]
fn a_second_stop_signal_kills_the_jobs_and_they_run_elsewhere_at_once() {
    let mut c = Cluster::start(&[("k1", "zone=a")]);
    let id = c.submit(&json!({"command": ["sleep", "60"], "constraints": {"zone": "a"}}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.job(id)["state"] != "running" {
        assert!(Instant::now() < deadline, "{}", c.job(id));
        std::thread::sleep(Duration::from_millis(20));
    }
    c.add_agent("k2", "zone=a");
    c.wait_nodes_ready(2);
    signal(&c.agents["k1"], libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    signal(&c.agents["k1"], libc::SIGTERM);
    let stopped = Instant::now();
    let status = wait_exit(c.agents.get_mut("k1").unwrap(), Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", c.agents["k1"].log());
    loop {
        let j = c.job(id);
        let attempts = j["attempts"].as_array().unwrap();
        if attempts.len() == 2 && attempts[1]["state"] == "running" {
            assert_eq!(attempts[0]["state"], "lost", "{j}");
            assert_eq!(attempts[1]["node"], "k2", "{j}");
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "not moved at once: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_terminal(c: &Cluster, id: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = c.job(id);
        if matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return j;
        }
        assert!(Instant::now() < deadline, "{j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Jobs run in cgroups where the machine has them (this one does: cgroup v1
/// as root); elsewhere these checks do not apply.
fn has_cgroups(c: &Cluster, agent: &str) -> bool {
    let log = c.agents[agent].log();
    log.contains("jobs run in their own cgroups")
}

#[test]
fn a_job_over_its_memory_ends_oom_and_escaped_processes_die_with_their_attempt() {
    let c = Cluster::start(&[("m1", "zone=a")]);
    if !has_cgroups(&c, "m1") {
        eprintln!("no cgroups here: skipping the cgroup checks");
        return;
    }
    let hog = c.submit(&json!({
        "command": ["sh", "-c", "head -c 400000000 /dev/zero | tail -c 300000000 > /dev/null; echo survived"],
        "resources": {"cpu_millis": 500, "memory_mb": 64},
    }));
    let j = wait_terminal(&c, hog);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"][0]["outcome"], "oom", "{j}");
    // What an attempt used is recorded on it, from its cgroups.
    let script = "x = bytearray(100 * 1024 * 1024)\n\
                  import time\n\
                  t = time.process_time()\n\
                  while time.process_time() - t < 0.3: pass\n";
    let busy = c.submit(&json!({
        "command": ["python3", "-c", script],
        "resources": {"cpu_millis": 1000, "memory_mb": 512},
    }));
    let j = wait_terminal(&c, busy);
    assert_eq!(j["state"], "succeeded", "{j}");
    let peak = j["attempts"][0]["peak_memory_mb"]
        .as_u64()
        .expect("peak memory");
    let cpu = j["attempts"][0]["cpu_ms"].as_u64().expect("cpu time");
    assert!((100..512).contains(&peak), "{j}");
    assert!(cpu >= 300, "{j}");
    // A job that escapes its process group (setsid) is still killed, by
    // cancel and by its time-out.
    let marks = c.dir.path().join("escape");
    std::fs::create_dir_all(&marks).unwrap();
    let script = r#"setsid sh -c 'echo $$ > "$D/pid-$RUSTCI_JOB_ID"; exec sleep 300' & sleep 300"#;
    let cancelled = c.submit(&json!({
        "command": ["sh", "-c", script],
        "env": {"D": marks.to_str().unwrap()},
    }));
    let timed_out = c.submit(&json!({
        "command": ["sh", "-c", script],
        "env": {"D": marks.to_str().unwrap()},
        "timeout_secs": 2,
    }));
    c.wait_all_running(&[cancelled, timed_out]);
    std::thread::sleep(Duration::from_millis(500));
    let escaped = |id: u64| -> i32 {
        std::fs::read_to_string(marks.join(format!("pid-{id}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (p1, p2) = (escaped(cancelled), escaped(timed_out));
    assert!(pid_alive(p1) && pid_alive(p2));
    let (status, _) = http(
        &c.addr,
        "POST",
        &format!("/v1/jobs/{cancelled}/cancel"),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(wait_terminal(&c, cancelled)["state"], "cancelled");
    assert_eq!(wait_terminal(&c, timed_out)["state"], "failed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(p1) || pid_alive(p2) {
        assert!(
            Instant::now() < deadline,
            "a setsid escapee survived its attempt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A listed server that accepts connections and never answers (a hung
/// replica, a black-holed address) does not hold the agent up: it dials
/// every listed server at once and joins through the one that answers.
#[test]
fn a_silent_server_in_the_list_does_not_delay_joining() {
    let mut c = Cluster::start(&[]);
    // Listening sockets that never accept: connect succeeds (backlog), and
    // then nothing ever comes back.
    let silent: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut servers: Vec<String> = silent
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    servers.push(c.addr.clone());
    let mut args = c.agent_args("late", "zone=a", JOIN_TOKEN);
    let at = args.iter().position(|a| a == "--server").unwrap() + 1;
    args[at] = servers.join(",");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = c.dir.path().join("agent-late.log");
    let started = Instant::now();
    c.agents.insert("late".into(), Proc::spawn(&args, &log));
    c.wait_nodes_ready(1);
    // Dialling one server after the other waits out 5 s per silent one.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "joined after {took:?}");
}

/// The default `--work-dir` is relative (`./rustci-agent`). The jobs' shims
/// read the lease from inside the job's own workspace, so a relative path
/// once named nothing there, and every job longer than the shim's first
/// lease check was killed as "lease lapsed".
#[test]
fn an_agent_with_a_relative_work_dir_runs_jobs_longer_than_a_lease_check() {
    let mut c = Cluster::start(&[]);
    let mut args = c.agent_args("rel", "zone=a", JOIN_TOKEN);
    let at = args.iter().position(|a| a == "--work-dir").unwrap();
    args[at + 1] = "relative-work".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = c.dir.path().join("agent-rel.log");
    let agent = Proc::spawn_in(&args, &log, c.dir.path());
    c.agents.insert("rel".into(), agent);
    c.wait_nodes_ready(1);
    let id = c.submit(&json!({"command": ["sh", "-c", "echo start; sleep 2; echo end"]}));
    let job = wait_terminal(&c, id);
    let (_, out) = http(&c.addr, "GET", &format!("/v1/jobs/{id}/logs"), None);
    assert_eq!(job["state"], "succeeded", "{job}\n{out}");
    assert_eq!(out, "start\nend\n");
    assert!(c.dir.path().join("relative-work").is_dir());
}
