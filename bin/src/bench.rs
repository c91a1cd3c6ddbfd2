//! `rustci bench NAME`: benchmarks that print one JSON object per result.
//!
//! - `replay`: writes a synthetic log of N events (a realistic mix: each job
//!   is submitted, assigned, started and finished on one of 16 nodes) and
//!   rebuilds state from it the way start-up does (open, scan, decode, apply).
//! - `submit`: starts `rustci dev` as a child process on a scratch data dir
//!   (or uses `--server`), then C clients on keep-alive connections submit
//!   jobs for a fixed time; every 201 is a durable, acknowledged submission.
//!   The jobs carry a constraint no node has, so they stay queued: this
//!   measures the control plane, not process spawning.
//! - `schedule`: placement passes over a large cluster, in memory; with
//!   `--unplaceable N`, N jobs no node matches wait ahead of the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use hyper::Method;
use rustci_core::event::{Entry, Event};
use rustci_core::model::{JobId, JobSpec, Outcome, Resources};
use rustci_core::scheduler;
use rustci_core::state::State;
use rustci_net::client::Client;
use rustci_storage::LogStore;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchCmd,
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Rebuild state from a redb log of N events.
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// Durable submissions per second and latency against `rustci dev`,
    /// or against a local cluster of `rustci server`s (`--replicas 3`),
    /// the clients submitting to its leader.
    Submit {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// 1: one `rustci dev`; 3 or 5: that many `rustci server`s.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
        replicas: u64,
        /// Use a running server instead of starting one.
        #[arg(long)]
        server: Option<String>,
        #[arg(long, env = "RUSTCI_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Leader killed (`kill -9`) to the first acknowledged write: starts
    /// three `rustci server`s on loopback, clients submitting to every
    /// replica, and kills the leader `--kills` times (restarting it each
    /// time, so that it catches up and the next kill finds a full cluster).
    Failover {
        #[arg(long, default_value_t = 20)]
        kills: u32,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
        replicas: u64,
    },
    /// Simulated seconds per wall second over a sweep of seeds.
    Sim {
        #[arg(long, default_value = "0..200")]
        seeds: String,
    },
    /// Agent killed (`kill -9`) to its job running on another node: starts
    /// `rustci server` and three `rustci agent`s on loopback.
    Reschedule {
        #[arg(long, default_value_t = 10)]
        kills: u32,
    },
    /// Submission to start on an idle agent: starts `rustci server` and one
    /// `rustci agent` on loopback and runs jobs one at a time. Times come
    /// from the log's own stamps: placed after submitted, and started (the
    /// agent got the assignment, spawned it and reported back) after
    /// placed.
    Assign {
        #[arg(long, default_value_t = 200)]
        jobs: u32,
    },
    /// Scheduling passes over a large in-memory cluster.
    Schedule {
        #[arg(long, default_value_t = 1000)]
        nodes: u64,
        /// Jobs that fit (default 100,000; 1,000 with `--unplaceable`).
        #[arg(long)]
        jobs: Option<u64>,
        /// Jobs no node matches, queued ahead of the others (higher
        /// priority): they must cost the passes nothing.
        #[arg(long, default_value_t = 0)]
        unplaceable: u64,
        /// Nodes of three capacities and jobs of seven sizes, instead of one
        /// of each (the tightest-fit search meets more points).
        #[arg(long)]
        mixed: bool,
    },
}

pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    match args.which {
        BenchCmd::Replay { events } => {
            tokio::task::spawn_blocking(move || bench_replay(events)).await??
        }
        BenchCmd::Submit {
            clients,
            seconds,
            replicas,
            server,
            token,
        } => bench_submit(clients, seconds, replicas, server, token).await?,
        BenchCmd::Failover { kills, replicas } => bench_failover(kills, replicas).await?,
        BenchCmd::Schedule {
            nodes,
            jobs,
            unplaceable,
            mixed,
        } => {
            let default_jobs = if unplaceable > 0 { 1000 } else { 100_000 };
            bench_schedule(nodes, jobs.unwrap_or(default_jobs), unplaceable, mixed)
        }
        BenchCmd::Reschedule { kills } => bench_reschedule(kills).await?,
        BenchCmd::Assign { jobs } => bench_assign(jobs).await?,
        BenchCmd::Sim { seeds } => {
            let seeds = crate::simcmd::parse_range(&seeds)?;
            tokio::task::spawn_blocking(move || crate::simcmd::bench(seeds)).await??
        }
    }
    Ok(0)
}

const BENCH_NODES: u64 = 16;

fn bench_spec(i: u64) -> JobSpec {
    JobSpec {
        name: format!("build-{i}"),
        command: vec!["sh".into(), "-c".into(), "make test".into()],
        env: BTreeMap::new(),
        resources: Resources::new(500, 512),
        constraints: BTreeMap::new(),
        priority: (i % 3) as u8 * 25 + 25,
        timeout_secs: 600,
        max_retries: 1,
        workspace: Default::default(),
    }
}

/// The synthetic event stream: nodes register, then jobs run to completion.
fn synthetic_events(total: u64) -> impl Iterator<Item = Event> {
    let nodes = (0..BENCH_NODES).map(|n| Event::NodeRegistered {
        name: format!("node-{n}"),
        capacity: Resources::new(64_000, 256 * 1024),
        labels: [("os".to_string(), "linux".to_string())].into(),
        incarnation: 1,
        predecessor: None,
    });
    let jobs = (0..).flat_map(|i: u64| {
        let job = JobId(i + 1);
        let node = format!("node-{}", i % BENCH_NODES);
        [
            Event::JobSubmitted {
                spec: bench_spec(i),
                idempotency_key: None,
            },
            Event::AttemptAssigned {
                job,
                attempt: 1,
                node,
            },
            Event::AttemptStarted { job, attempt: 1 },
            Event::AttemptFinished {
                job,
                attempt: 1,
                outcome: Outcome::Exited,
                exit_code: Some(i32::from(i.is_multiple_of(7))),
                usage: None,
            },
        ]
    });
    nodes.chain(jobs).take(total as usize)
}

fn write_log(dir: &Path, total: u64) -> anyhow::Result<()> {
    let mut store = LogStore::open(dir).map_err(|e| anyhow!("{e}"))?;
    let mut batch = Vec::with_capacity(50_000);
    for (i, event) in synthetic_events(total).enumerate() {
        batch.push(Entry {
            index: i as u64 + 1,
            term: 1,
            at: 1_700_000_000_000 + i as u64,
            event,
        });
        if batch.len() == batch.capacity() {
            store.append(&batch).map_err(|e| anyhow!("{e}"))?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.append(&batch).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

fn bench_replay(events: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_log(dir.path(), events)?;
    let t = Instant::now();
    let store = LogStore::open_read_only(dir.path()).map_err(|e| anyhow!("{e}"))?;
    let state = crate::daemon::replay_store(&store)?;
    let secs = t.elapsed().as_secs_f64();
    if state.applied_index != events {
        bail!("replayed {} of {events} events", state.applied_index);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "replay",
            "events": events,
            "jobs": state.jobs.len(),
            "seconds": round3(secs),
            "events_per_sec": (events as f64 / secs).round(),
            "ignored_entries": state.ignored_entries,
        })
    );
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// With `mixed`, node `n`'s capacity and job `i`'s size, cycling through
/// small fixed sets (a multiplicative hash spreads the job sizes).
const MIXED_CAPACITIES: [(u64, u64); 3] = [
    (8_000, 32 * 1024),
    (16_000, 64 * 1024),
    (32_000, 128 * 1024),
];
const MIXED_SIZES: [(u64, u64); 7] = [
    (250, 256),
    (500, 512),
    (1_000, 4 * 1024),
    (2_000, 1024),
    (4_000, 16 * 1024),
    (500, 8 * 1024),
    (6_000, 2 * 1024),
];

fn bench_schedule(nodes: u64, jobs: u64, unplaceable: u64, mixed: bool) {
    let mut state = State::new();
    let mut index = 0;
    let mut push = |state: &mut State, event: Event| {
        index += 1;
        state.apply(&Entry {
            index,
            term: 1,
            at: index,
            event,
        });
    };
    for n in 0..nodes {
        push(
            &mut state,
            Event::NodeRegistered {
                name: format!("node-{n:05}"),
                capacity: if mixed {
                    let (cpu, mem) = MIXED_CAPACITIES[(n % 3) as usize];
                    Resources::new(cpu, mem)
                } else {
                    Resources::new(16_000, 64 * 1024)
                },
                labels: [("pool".to_string(), format!("p{}", n % 4))].into(),
                incarnation: 1,
                predecessor: None,
            },
        );
    }
    for i in 0..unplaceable {
        let mut spec = bench_spec(i);
        spec.priority = 100;
        spec.constraints.insert("pool".into(), "none".into());
        push(
            &mut state,
            Event::JobSubmitted {
                spec,
                idempotency_key: None,
            },
        );
    }
    for i in 0..jobs {
        let mut spec = bench_spec(i);
        if mixed {
            let (cpu, mem) = MIXED_SIZES[(i.wrapping_mul(2_654_435_761) >> 7) as usize % 7];
            spec.resources = Resources::new(cpu, mem);
        }
        spec.constraints
            .insert("pool".into(), format!("p{}", i % 4));
        push(
            &mut state,
            Event::JobSubmitted {
                spec,
                idempotency_key: None,
            },
        );
    }
    let t = Instant::now();
    let mut placed = 0u64;
    let mut passes = 0u64;
    loop {
        let decisions = scheduler::schedule(&mut state);
        if decisions.is_empty() {
            break;
        }
        passes += 1;
        placed += decisions.len() as u64;
        for p in decisions {
            push(
                &mut state,
                Event::AttemptAssigned {
                    job: p.job,
                    attempt: p.attempt,
                    node: p.node,
                },
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "schedule",
            "nodes": nodes,
            "jobs": jobs,
            "unplaceable": unplaceable,
            "mixed": mixed,
            "ms": round3(secs * 1000.0),
            "placed": placed,
            "passes": passes,
            "seconds": round3(secs),
            "placements_per_sec": (placed as f64 / secs).round(),
        })
    );
}

/// A free loopback port: bind to port 0 and release it.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

async fn wait_ready(addr: &str, token: Option<String>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut c) = Client::connect(addr, token.clone()).await {
            if c.call(Method::GET, "/readyz", None, &[]).await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server at {addr} did not become ready in 30 s")
}

/// Starts `rustci agent NAME` against `addr`, its work dir under `scratch`.
fn spawn_agent(addr: &str, scratch: &Path, name: &str) -> anyhow::Result<Child> {
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--server", addr, "--name", name, "--cpus", "4"])
        .arg("--work-dir")
        .arg(scratch.join(name))
        .env_remove("RUSTCI_JOIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rustci agent")?;
    Ok(Child(child))
}

async fn get_json(client: &mut Client, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client.json(Method::GET, path, None, &[]).await?)
}

/// Waits until `n` nodes are ready.
async fn wait_nodes(client: &mut Client, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let nodes = get_json(client, "/v1/nodes").await?;
        let ready = nodes["nodes"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|n| n["state"] == "ready").count());
        if ready >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{n} nodes did not become ready in 30 s")
}

/// Starts `rustci server` on a free loopback port, data under `scratch`;
/// returns it once ready, with its address.
async fn spawn_server(scratch: &Path) -> anyhow::Result<(Child, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let server = std::process::Command::new(std::env::current_exe()?)
        .args(["server", "--listen", &addr, "--data-dir"])
        .arg(scratch.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rustci server")?;
    let server = Child(server);
    wait_ready(&addr, None).await?;
    Ok((server, addr))
}

/// `rustci server`s forming one cluster on loopback, data under a
/// scratch dir; killed when dropped.
struct BenchCluster {
    scratch: PathBuf,
    addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, Child>,
}

impl BenchCluster {
    async fn start(scratch: &Path, replicas: u64) -> anyhow::Result<BenchCluster> {
        let mut addrs = BTreeMap::new();
        for id in 1..=replicas {
            addrs.insert(id, format!("127.0.0.1:{}", free_port()?));
        }
        let mut c = BenchCluster {
            scratch: scratch.to_path_buf(),
            addrs,
            procs: BTreeMap::new(),
        };
        for id in 1..=replicas {
            c.spawn(id)?;
        }
        c.leader(None).await?;
        Ok(c)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args([
            "server",
            "--id",
            &id.to_string(),
            "--listen",
            &self.addrs[&id],
        ])
        .arg("--data-dir")
        .arg(self.scratch.join(format!("replica{id}")));
        for (peer, addr) in &self.addrs {
            if *peer != id {
                cmd.arg("--peer").arg(format!("{peer}={addr}"));
            }
        }
        let child = cmd
            .env_remove("RUSTCI_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rustci server")?;
        self.procs.insert(id, Child(child));
        Ok(())
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }

    async fn view(&self, id: u64) -> Option<serde_json::Value> {
        let mut c = Client::connect(&self.addrs[&id], None).await.ok()?;
        get_json(&mut c, "/v1/cluster").await.ok()
    }

    /// The leader every live replica agrees on (other than `not`), once it
    /// serves writes.
    async fn leader(&self, not: Option<u64>) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let mut leaders = std::collections::BTreeSet::new();
            for &id in self.procs.keys() {
                leaders.insert(self.view(id).await.and_then(|v| v["leader"].as_u64()));
            }
            if let [Some(l)] = leaders.into_iter().collect::<Vec<_>>()[..] {
                let ready = async {
                    let mut c = Client::connect(&self.addrs[&l], None).await.ok()?;
                    c.call(Method::GET, "/readyz", None, &[]).await.ok()
                };
                if Some(l) != not && ready.await.is_some() {
                    return Ok(l);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("the cluster agreed on no leader within 30 s")
    }

    /// Waits until every replica is up and has applied what the cluster
    /// had committed when the wait began (writes go on meanwhile).
    async fn caught_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut target = None;
        while Instant::now() < deadline {
            let mut applied = Vec::new();
            for &id in self.procs.keys() {
                applied.push(self.view(id).await.map(|v| {
                    (
                        v["commit_index"].as_u64().unwrap_or(0),
                        v["applied_index"].as_u64().unwrap_or(0),
                    )
                }));
            }
            if applied.iter().all(Option::is_some) {
                let applied: Vec<(u64, u64)> = applied.into_iter().flatten().collect();
                let want = *target
                    .get_or_insert_with(|| applied.iter().map(|&(c, _)| c).max().unwrap_or(0));
                if applied.iter().all(|&(_, a)| a >= want) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the replicas did not catch up within 60 s")
    }
}

/// Submissions from `clients` tasks, each to every replica in turn until
/// one acknowledges; when each acknowledged request was sent, and when it
/// was acknowledged.
type Acked = Arc<std::sync::Mutex<Vec<(Instant, Instant)>>>;

fn spawn_writers(
    addrs: Vec<String>,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    let body = serde_json::to_vec(&serde_json::json!({
        "command": ["true"],
        "constraints": {"bench": "queue-only"},
    }))
    .expect("a JSON body");
    (0..clients)
        .map(|c| {
            let (addrs, stop, acked, body) =
                (addrs.clone(), stop.clone(), acked.clone(), body.clone());
            tokio::spawn(async move {
                let mut at = c;
                let mut conn: Option<Client> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if conn.is_none() {
                        let addr = &addrs[at % addrs.len()];
                        conn = tokio::time::timeout(
                            Duration::from_millis(200),
                            Client::connect(addr, None),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok);
                    }
                    let sent = Instant::now();
                    let ok = match conn.as_mut() {
                        Some(client) => tokio::time::timeout(
                            Duration::from_millis(500),
                            client.call(Method::POST, "/v1/jobs", Some(body.clone()), &[]),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok()),
                        None => false,
                    };
                    if ok {
                        acked
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((sent, Instant::now()));
                    } else {
                        conn = None;
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

async fn bench_failover(kills: u32, replicas: u64) -> anyhow::Result<()> {
    anyhow::ensure!(kills > 0, "--kills must be at least 1");
    let scratch = tempfile::tempdir()?;
    let mut cluster = BenchCluster::start(scratch.path(), replicas).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers = spawn_writers(
        cluster.addrs.values().cloned().collect(),
        8,
        stop.clone(),
        acked.clone(),
    );
    let mut resumed_ms = Vec::new();
    for _ in 0..kills {
        cluster.caught_up().await?;
        let leader = cluster.leader(None).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed_at = Instant::now();
        cluster.kill9(leader);
        // The first write sent after the kill and acknowledged (one the
        // old leader answered before it died does not count).
        let first = loop {
            let first = acked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(sent, _)| *sent > killed_at)
                .map(|&(_, at)| at)
                .min();
            if let Some(t) = first {
                break t;
            }
            anyhow::ensure!(
                killed_at.elapsed() < Duration::from_secs(30),
                "no write acknowledged within 30 s of killing the leader"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        resumed_ms.push(first.duration_since(killed_at).as_secs_f64() * 1000.0);
        cluster.spawn(leader)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let n = resumed_ms.len();
    let (p50, p99, max) = percentiles(resumed_ms);
    println!(
        "{}",
        serde_json::json!({
            "bench": "failover",
            "replicas": replicas,
            "kills": n,
            "writes_resumed_p50_ms": p50,
            "writes_resumed_p99_ms": p99,
            "writes_resumed_max_ms": max,
            "election_timeout_ms": rustci_core::raft::ELECTION_TIMEOUT_MS_DEFAULT,
        })
    );
    Ok(())
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (
        round3(pct(0.5)),
        round3(pct(0.99)),
        round3(*v.last().unwrap_or(&0.0)),
    )
}

async fn bench_assign(jobs: u32) -> anyhow::Result<()> {
    anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
    let scratch = tempfile::tempdir()?;
    let (_server, addr) = spawn_server(scratch.path()).await?;
    let _agent = spawn_agent(&addr, scratch.path(), "a1")?;
    let mut client = Client::connect(&addr, None).await?;
    wait_nodes(&mut client, 1).await?;
    let body = serde_json::to_vec(&serde_json::json!({"command": ["true"]}))?;
    let (mut placed_ms, mut started_ms) = (Vec::new(), Vec::new());
    for _ in 0..jobs {
        let job: serde_json::Value = client
            .json(Method::POST, "/v1/jobs", Some(body.clone()), &[])
            .await?;
        let id = job["id"].as_u64().context("job id")?;
        let path = format!("/v1/jobs/{id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let j = loop {
            let j = get_json(&mut client, &path).await?;
            if j["state"] == "succeeded" {
                break j;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {id} did not succeed: {j}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let a = &j["attempts"][0];
        let ms = |v: &serde_json::Value| v.as_u64().context("a timestamp");
        let (submitted, assigned) = (ms(&j["submitted_at"])?, ms(&a["assigned_at"])?);
        let started = ms(&a["started_at"])?;
        placed_ms.push(assigned.saturating_sub(submitted) as f64);
        started_ms.push(started.saturating_sub(assigned) as f64);
    }
    let (placed_p50, placed_p99, placed_max) = percentiles(placed_ms);
    let (p50, p99, max) = percentiles(started_ms);
    println!(
        "{}",
        serde_json::json!({
            "bench": "assign",
            "jobs": jobs,
            "submitted_to_placed_p50_ms": placed_p50,
            "submitted_to_placed_p99_ms": placed_p99,
            "submitted_to_placed_max_ms": placed_max,
            "placed_to_started_p50_ms": p50,
            "placed_to_started_p99_ms": p99,
            "placed_to_started_max_ms": max,
        })
    );
    Ok(())
}

async fn bench_reschedule(kills: u32) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let (_server, addr) = spawn_server(scratch.path()).await?;
    let names = ["a1", "a2", "a3"];
    let mut agents: BTreeMap<&str, Child> = BTreeMap::new();
    for name in names {
        agents.insert(name, spawn_agent(&addr, scratch.path(), name)?);
    }
    let mut client = Client::connect(&addr, None).await?;
    wait_nodes(&mut client, names.len()).await?;
    let body = serde_json::to_vec(&serde_json::json!({"command": ["sleep", "600"]}))?;
    let mut moved_ms = Vec::new();
    for k in 0..kills {
        let job: serde_json::Value = client
            .json(Method::POST, "/v1/jobs", Some(body.clone()), &[])
            .await?;
        let id = job["id"].as_u64().context("job id")?;
        let path = format!("/v1/jobs/{id}");
        let node = loop {
            let j = get_json(&mut client, &path).await?;
            if j["state"] == "running" {
                break j["node"].as_str().unwrap_or_default().to_string();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let victim = names
            .iter()
            .copied()
            .find(|n| *n == node)
            .context("the job runs on one of the agents")?;
        // Kill at a different point of the heartbeat cycle each time (a
        // freshly started agent has just heartbeated: always the worst case).
        tokio::time::sleep(Duration::from_millis(u64::from(k % 10) * 100)).await;
        if let Some(mut child) = agents.remove(victim) {
            let _ = child.0.kill();
            let _ = child.0.wait();
        }
        let killed = Instant::now();
        loop {
            let j = get_json(&mut client, &path).await?;
            let attempts = j["attempts"].as_array().cloned().unwrap_or_default();
            if attempts.len() >= 2 && attempts.last().is_some_and(|a| a["state"] == "running") {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("job {id} did not run elsewhere within 60 s: {j}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        moved_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        let _: serde_json::Value = client
            .json(Method::POST, &format!("{path}/cancel"), None, &[])
            .await?;
        agents.insert(victim, spawn_agent(&addr, scratch.path(), victim)?);
        wait_nodes(&mut client, names.len()).await?;
    }
    let (p50, p99, max) = percentiles(moved_ms);
    println!(
        "{}",
        serde_json::json!({
            "bench": "reschedule",
            "kills": kills,
            "agents": names.len(),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "lease_rule_ms": rustci_core::protocol::LeaseConfig::default().requeue_after_ms(),
        })
    );
    Ok(())
}

async fn bench_submit(
    clients: usize,
    seconds: u64,
    replicas: u64,
    server: Option<String>,
    token: Option<String>,
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut _child = None;
    let mut _cluster = None;
    let addr = match server {
        Some(a) => a,
        None if replicas > 1 => {
            let cluster = BenchCluster::start(scratch.path(), replicas).await?;
            let leader = cluster.leader(None).await?;
            let addr = cluster.addrs[&leader].clone();
            _cluster = Some(cluster);
            addr
        }
        None => {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let exe = std::env::current_exe()?;
            let child = std::process::Command::new(exe)
                .args(["dev", "--listen", &addr, "--data-dir"])
                .arg(scratch.path().join("data"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting rustci dev")?;
            _child = Some(Child(child));
            addr
        }
    };
    wait_ready(&addr, token.clone()).await?;
    let body = serde_json::to_vec(&serde_json::json!({
        "command": ["true"],
        "constraints": {"bench": "queue-only"},
    }))?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, token, body) = (addr.clone(), token.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&addr, token).await?;
            let mut latencies_us = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let start = Instant::now();
                match client
                    .call(Method::POST, "/v1/jobs", Some(body.clone()), &[])
                    .await
                {
                    Ok(_) => latencies_us.push(start.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, anyhow::Error>((latencies_us, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (lat, err) = task.await??;
        all.extend(lat);
        errors += err;
    }
    let secs = t.elapsed().as_secs_f64();
    if all.is_empty() {
        bail!("no submission succeeded ({errors} errors): is the server reachable and the token right?");
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        round3(f64::from(all[i]) / 1000.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "submit",
            "replicas": replicas,
            "clients": clients,
            "seconds": round3(secs),
            "submissions": all.len(),
            "errors": errors,
            "submissions_per_sec": (all.len() as f64 / secs).round(),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    );
    Ok(())
}
