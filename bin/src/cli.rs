//! The command line: clap definitions and the client commands.
//!
//! Every command prints its result on stdout and exits 0, or prints one line
//! on stderr and exits non-zero (see the contract).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use rustci_net::client::{api_error, Client};
use rustci_net::dto::{
    ClusterView, JobList, JobView, NodeList, NodeView, ResourcesRequest, SubmitRequest,
};

#[derive(Parser, Debug)]
#[command(
    name = "rustci",
    version,
    about = "RustCI: a self-hosted CI control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// Address of any control-plane replica.
    #[arg(
        long,
        env = "RUSTCI_SERVER",
        default_value = "127.0.0.1:7878",
        global = true
    )]
    pub server: String,
    /// API token (sent as `Authorization: Bearer`).
    #[arg(long, env = "RUSTCI_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// One process: a single-replica control plane with a built-in native runner.
    Dev(DevArgs),
    /// One control-plane replica: the API and the agent endpoint on one port.
    Server(ServerArgs),
    /// A worker node: joins the control plane and runs the jobs it is given.
    Agent(AgentArgs),
    /// Submit a job; prints its id.
    Submit(SubmitArgs),
    /// List jobs, oldest first (every page of them).
    Jobs {
        #[arg(long)]
        state: Option<String>,
        /// Only jobs on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only jobs with this name.
        #[arg(long)]
        name: Option<String>,
        /// Show at most this many jobs (default: all).
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Inspect or cancel one job.
    Job {
        #[command(subcommand)]
        command: JobCmd,
    },
    /// Print a job attempt's output.
    Logs {
        id: String,
        /// Stream until the attempt ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Attempt number (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List worker nodes.
    Nodes {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Control one worker node.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// Cluster summary.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Read a (copied) data dir offline; never writes to it.
    Replay(crate::replay::ReplayArgs),
    /// Deterministic simulation: prints SEED= first; exit 0 when every invariant held.
    Sim(crate::simcmd::SimArgs),
    /// Benchmarks; one JSON object per result on stdout.
    Bench(crate::bench::BenchArgs),
}

#[derive(Args, Debug)]
pub struct DevArgs {
    #[arg(long, default_value = "./rustci-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Require `Authorization: Bearer <token>` on the API (needed to listen beyond loopback).
    #[arg(long, env = "RUSTCI_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Token agents must present (reserved for agents joining a dev server).
    #[arg(long, hide_env_values = true)]
    pub join_token: Option<String>,
    /// Name of the built-in runner's node (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// CPUs the built-in runner offers (default: the machine's).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory the built-in runner offers (default: the machine's).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Extra labels of the built-in node, KEY=VALUE.
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Threads serving the API (1: a single-threaded runtime, the fastest
    /// choice on small machines since the state machine is serial anyway).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// HTTP connections held at once; at the limit the one that waited
    /// longest for its client is closed to serve a newcomer.
    #[arg(long, default_value_t = rustci_net::server::CONNECTIONS_MAX)]
    pub connections_max: usize,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// This replica's id (1-based).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "./rustci-data")]
    pub data_dir: PathBuf,
    /// Another replica, ID=ADDR (repeatable). Multi-replica clusters are not
    /// supported yet: with peers the server refuses to start.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Require `Authorization: Bearer <token>` on the API (needed to listen beyond loopback).
    #[arg(long, env = "RUSTCI_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Token agents must present to join.
    #[arg(long, env = "RUSTCI_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Threads serving the API.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// HTTP connections held at once; at the limit the one that waited
    /// longest for its client is closed to serve a newcomer.
    #[arg(long, default_value_t = rustci_net::server::CONNECTIONS_MAX)]
    pub connections_max: usize,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Control-plane replicas, ADDR[,ADDR...]: the agent finds the leader.
    #[arg(long, env = "RUSTCI_SERVER", default_value = "127.0.0.1:7878")]
    pub server: String,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs offered to jobs (default: the machine's).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory offered to jobs (default: the machine's).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// A label of this node, KEY=VALUE (repeatable); `os`, `arch` and
    /// `hostname` are always set.
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Where jobs' work dirs and output live.
    #[arg(long, default_value = "./rustci-agent")]
    pub work_dir: PathBuf,
    /// Token the control plane requires of agents.
    #[arg(long, env = "RUSTCI_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// On SIGTERM or Ctrl-C, how long running jobs may take to finish
    /// before they are killed and run elsewhere (0..=86400).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs the job needs (fractions allowed: 0.5).
    #[arg(long, allow_negative_numbers = true)]
    pub cpus: Option<f64>,
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Node label the job requires, KEY=VALUE (repeatable).
    #[arg(long = "constraint", value_parser = parse_kv)]
    pub constraints: Vec<(String, String)>,
    /// Environment variable for the job, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    #[arg(long)]
    pub priority: Option<u64>,
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    #[arg(long)]
    pub retries: Option<u64>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait for a terminal state and exit with the job's exit code.
    #[arg(long)]
    pub wait: bool,
    /// Submit a job file (TOML, same fields as the JSON API) instead of `-- CMD`.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientOpts,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Print a job as JSON.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel a job (a no-op for a finished one).
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// A node's labels, capacity, allocation, attempts and last heartbeat.
    Status {
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// No new jobs for the node; running ones finish.
    Drain {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// End a drain: the node takes new jobs again.
    Undrain {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove the node; its running attempts are stopped and run elsewhere
    /// once its lease has lapsed.
    Remove {
        name: String,
        /// Why (shown with the node).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The outcome of a client command: the process exit code.
pub type Exit = i32;

async fn connect(opts: &ClientOpts) -> anyhow::Result<Client> {
    Ok(Client::connect(&opts.server, opts.token.clone()).await?)
}

fn job_path(id: &str) -> anyhow::Result<String> {
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| anyhow!("invalid job id {id:?}: job ids are integers"))?;
    Ok(format!("/v1/jobs/{id}"))
}

/// A job file: the JSON API's fields, in TOML.
fn read_job_file(path: &PathBuf) -> anyhow::Result<SubmitRequest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow!("invalid job file {}: {}", path.display(), e.message()))
}

fn build_request(args: &SubmitArgs) -> anyhow::Result<SubmitRequest> {
    let mut req = match &args.file {
        Some(path) => {
            if !args.command.is_empty() {
                bail!("give either -f FILE or -- CMD, not both");
            }
            read_job_file(path)?
        }
        None => {
            if args.command.is_empty() {
                bail!("no command given: use `rustci submit -- CMD ARGS...` or `-f job.toml`");
            }
            SubmitRequest {
                command: args.command.clone(),
                ..SubmitRequest::default()
            }
        }
    };
    if let Some(name) = &args.name {
        req.name = Some(name.clone());
    }
    if args.cpus.is_some() || args.memory_mb.is_some() {
        let mut r = req.resources.take().unwrap_or(ResourcesRequest::default());
        if let Some(cpus) = args.cpus {
            r.cpu_millis = Some(cpus_to_millis(cpus)?);
        }
        if let Some(m) = args.memory_mb {
            r.memory_mb = Some(m);
        }
        req.resources = Some(r);
    }
    if !args.constraints.is_empty() {
        req.constraints
            .get_or_insert_with(BTreeMap::new)
            .extend(args.constraints.iter().cloned());
    }
    if !args.env.is_empty() {
        req.env
            .get_or_insert_with(BTreeMap::new)
            .extend(args.env.iter().cloned());
    }
    req.priority = args.priority.or(req.priority);
    req.timeout_secs = args.timeout_secs.or(req.timeout_secs);
    req.max_retries = args.retries.or(req.max_retries);
    Ok(req)
}

pub fn cpus_to_millis(cpus: f64) -> anyhow::Result<u64> {
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1e6 {
        bail!("--cpus must be a positive number of cores, got {cpus}");
    }
    Ok((cpus * 1000.0).round().max(1.0) as u64)
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<Exit> {
    let req = build_request(&args)?;
    let body = serde_json::to_vec(&req)?;
    let mut client = connect(&args.client).await?;
    let mut headers = Vec::new();
    if let Some(k) = &args.idempotency_key {
        headers.push(("idempotency-key", k.as_str()));
    }
    let job: JobView = client
        .json(Method::POST, "/v1/jobs", Some(body), &headers)
        .await?;
    println!("{}", job.id);
    let _ = std::io::stdout().flush();
    if !args.wait {
        return Ok(0);
    }
    let job = wait_terminal(&mut client, job.id).await?;
    Ok(match job.state.as_str() {
        "succeeded" => 0,
        _ => job.exit_code.filter(|c| *c != 0).unwrap_or(1),
    })
}

/// Polls the job until it is terminal.
async fn wait_terminal(client: &mut Client, id: u64) -> anyhow::Result<JobView> {
    let path = format!("/v1/jobs/{id}");
    loop {
        let job: JobView = client.json(Method::GET, &path, None, &[]).await?;
        if job.is_terminal() {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Filters of `rustci jobs`, passed to `GET /v1/jobs` as they are.
#[derive(Debug, Default)]
pub struct JobsFilter {
    pub state: Option<String>,
    pub node: Option<String>,
    pub name: Option<String>,
}

/// Jobs asked for per page by `rustci jobs`.
const JOBS_CLI_PAGE: usize = 1000;

/// Every job matching `filter` (up to `limit`), following `next_cursor`
/// page by page.
pub async fn list_all_jobs(
    client: &mut Client,
    filter: &JobsFilter,
    limit: Option<usize>,
) -> anyhow::Result<Vec<JobView>> {
    let mut base = String::new();
    for (k, v) in [
        ("state", &filter.state),
        ("node", &filter.node),
        ("name", &filter.name),
    ] {
        if let Some(v) = v {
            base.push_str(&format!("&{k}={}", rustci_net::client::query_value(v)));
        }
    }
    let mut jobs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let want = limit.map_or(JOBS_CLI_PAGE, |l| (l - jobs.len()).min(JOBS_CLI_PAGE));
        if want == 0 {
            break;
        }
        let mut path = format!("/v1/jobs?limit={want}{base}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", rustci_net::client::query_value(c)));
        }
        let page: JobList = client.json(Method::GET, &path, None, &[]).await?;
        jobs.extend(page.jobs);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(jobs)
}

pub async fn jobs(
    client: &ClientOpts,
    filter: JobsFilter,
    limit: Option<usize>,
    as_json: bool,
) -> anyhow::Result<Exit> {
    let jobs = list_all_jobs(&mut connect(client).await?, &filter, limit).await?;
    let list = JobList {
        jobs,
        next_cursor: None,
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<8} {:<10} {:<4} {:<16} {:<5} {:<8} NAME",
        "ID", "STATE", "PRI", "NODE", "EXIT", "ATTEMPTS"
    );
    for j in &list.jobs {
        println!(
            "{:<8} {:<10} {:<4} {:<16} {:<5} {:<8} {}",
            j.id,
            j.state,
            j.priority,
            j.node.as_deref().unwrap_or("-"),
            j.exit_code.map_or("-".to_string(), |c| c.to_string()),
            j.attempts.len(),
            if j.name.is_empty() {
                j.command.join(" ")
            } else {
                j.name.clone()
            }
        );
    }
    Ok(0)
}

pub async fn job(cmd: JobCmd) -> anyhow::Result<Exit> {
    match cmd {
        JobCmd::Get { id, client } => {
            let job: JobView = connect(&client)
                .await?
                .json(Method::GET, &job_path(&id)?, None, &[])
                .await?;
            println!("{}", serde_json::to_string_pretty(&job)?);
        }
        JobCmd::Cancel { id, client } => {
            let path = format!("{}/cancel", job_path(&id)?);
            let job: JobView = connect(&client)
                .await?
                .json(Method::POST, &path, None, &[])
                .await?;
            println!("{} {}", job.id, job.state);
        }
    }
    Ok(0)
}

pub async fn logs(
    client: &ClientOpts,
    id: &str,
    follow: bool,
    attempt: Option<u32>,
) -> anyhow::Result<Exit> {
    let mut path = format!("{}/logs", job_path(id)?);
    let mut q = Vec::new();
    if let Some(a) = attempt {
        q.push(format!("attempt={a}"));
    }
    if follow {
        q.push("follow=true".to_string());
    }
    if !q.is_empty() {
        path = format!("{path}?{}", q.join("&"));
    }
    let mut c = connect(client).await?;
    let resp = c.send(Method::GET, &path, None, &[]).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(api_error(status, &bytes).into());
    }
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow!("output stream broken: {e}"))?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data)?;
            out.flush()?;
        }
    }
    Ok(0)
}

pub async fn nodes(client: &ClientOpts, as_json: bool) -> anyhow::Result<Exit> {
    let list: NodeList = connect(client)
        .await?
        .json(Method::GET, "/v1/nodes", None, &[])
        .await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<9} {:>6} {:>10} {:>12} {:>14} {:>8} {:>7}  LABELS",
        "NAME", "STATE", "CPUS", "MEMORY_MB", "ALLOC_CPU", "ALLOC_MEM_MB", "RUNNING", "HEARD"
    );
    for n in &list.nodes {
        println!(
            "{:<20} {:<9} {:>6} {:>10} {:>12} {:>14} {:>8} {:>7}  {}",
            n.name,
            n.state,
            n.cpus,
            n.memory_mb,
            n.allocated.cpu_millis as f64 / 1000.0,
            n.allocated.memory_mb,
            n.running,
            heard(n.last_heartbeat_secs_ago),
            labels_text(&n.labels),
        );
    }
    Ok(0)
}

/// "1.2s ago"-style age of the last heartbeat, or "-".
fn heard(secs: Option<f64>) -> String {
    secs.map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"))
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn node_status(client: &ClientOpts, name: &str, as_json: bool) -> anyhow::Result<Exit> {
    let view: rustci_net::dto::NodeStatusView = connect(client)
        .await?
        .json(Method::GET, &format!("/v1/nodes/{name}"), None, &[])
        .await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(0);
    }
    let n = &view.node;
    println!("name:            {}", n.name);
    println!("state:           {}", n.state);
    println!("incarnation:     {}", view.incarnation);
    println!("capacity:        cpus={} memory_mb={}", n.cpus, n.memory_mb);
    println!(
        "allocated:       cpus={} memory_mb={}",
        n.allocated.cpu_millis as f64 / 1000.0,
        n.allocated.memory_mb
    );
    println!("labels:          {}", labels_text(&n.labels));
    println!(
        "last heartbeat:  {}",
        match n.last_heartbeat_secs_ago {
            Some(s) => format!("{s:.1}s ago"),
            None => "never (since this replica started)".into(),
        }
    );
    println!("attempts:        {}", view.attempts.len());
    for a in &view.attempts {
        println!("  job {} attempt {}: {}", a.job, a.attempt, a.state);
    }
    Ok(0)
}

pub async fn node(cmd: NodeCmd) -> anyhow::Result<Exit> {
    if let NodeCmd::Status { name, json, client } = &cmd {
        return node_status(client, name, *json).await;
    }
    let (client, path) = match &cmd {
        NodeCmd::Drain { name, client } => (client, format!("/v1/nodes/{name}/drain")),
        NodeCmd::Undrain { name, client } => (client, format!("/v1/nodes/{name}/undrain")),
        NodeCmd::Remove { name, client, .. } => (client, format!("/v1/nodes/{name}/remove")),
        NodeCmd::Status { .. } => unreachable!("answered above"),
    };
    let body = match &cmd {
        NodeCmd::Remove { reason, .. } => {
            Some(serde_json::to_vec(&serde_json::json!({"reason": reason}))?)
        }
        _ => None,
    };
    let node: NodeView = connect(client)
        .await?
        .json(Method::POST, &path, body, &[])
        .await?;
    println!("{} {}", node.name, node.state);
    Ok(0)
}

pub async fn status(client: &ClientOpts, as_json: bool) -> anyhow::Result<Exit> {
    let c: ClusterView = connect(client)
        .await?
        .json(Method::GET, "/v1/cluster", None, &[])
        .await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(0);
    }
    println!("state:         {}", c.state);
    println!(
        "leader:        {}",
        c.leader.map_or("unknown".to_string(), |l| format!(
            "{l} ({})",
            c.leader_addr.as_deref().unwrap_or("?")
        ))
    );
    println!("term:          {}", c.term);
    println!("commit index:  {}", c.commit_index);
    println!("applied index: {}", c.applied_index);
    let replicas: Vec<String> = c
        .replicas
        .iter()
        .map(|r| format!("{}={} ({})", r.id, r.addr, r.role))
        .collect();
    println!("replicas:      {}", replicas.join(", "));
    println!("nodes:         {}", c.nodes);
    let jobs: Vec<String> = c.jobs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("jobs:          {}", jobs.join(" "));
    println!("uptime:        {}s", c.uptime_secs);
    Ok(0)
}
