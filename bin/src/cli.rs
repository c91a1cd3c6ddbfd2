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
use rustci_core::model::Outcome;
use rustci_net::client::{api_error, Client};
use rustci_net::dto::{
    AttemptView, CheckoutRequest, ClusterView, JobList, JobView, NodeList, NodeView,
    ResourcesRequest, SubmitRequest,
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
        default_value = DEFAULT_SERVER,
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
        /// Show at most this many jobs (1 and up; default: all).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
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
        #[arg(long)]
        follow: bool,
        /// Attempt number (1 and up; default: the latest).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
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
    /// The committed event log: one line per event, or `--json` lines.
    Events {
        /// Keep waiting for new events.
        #[arg(long)]
        follow: bool,
        /// Start after this log index (0 and up; default 0: the beginning).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only the events about this job (an id, 1 and up): its
        /// submission, placements, starts, ends, losses and cancel.
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        job: Option<u64>,
        /// Only the events about this node: its own (registered, drained,
        /// down, up, removed) and those of the attempts placed on it.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// One JSON object per line (the API's form).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Change the control plane's replicas (replace a dead one: remove it,
    /// then add the new one).
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Cluster summary.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Replay a data dir's log (a running daemon's too, through a copy); never writes to it.
    Replay(crate::replay::ReplayArgs),
    /// A consistent copy of a data dir, safe while the daemon runs.
    Backup(crate::backup::BackupArgs),
    /// Deterministic simulation: prints SEED= first; exit 0 when every invariant held.
    Sim(crate::simcmd::SimArgs),
    /// Benchmarks; one JSON object per result on stdout.
    Bench(crate::bench::BenchArgs),
    /// Print a shell completion script: `rustci completions bash >
    /// /etc/bash_completion.d/rustci` (zsh: a `_rustci` file on `$fpath`;
    /// fish: `~/.config/fish/completions/rustci.fish`).
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `rustci completions SHELL`: the script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> Exit {
    use clap::CommandFactory as _;
    clap_complete::generate(shell, &mut Cli::command(), "rustci", &mut std::io::stdout());
    0
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
    /// Read the API token from this file (its first line), so it is in
    /// neither argv nor the config file.
    #[arg(long, value_name = "FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,
    /// Token agents must present (reserved for agents joining a dev server).
    #[arg(long, hide_env_values = true)]
    pub join_token: Option<String>,
    /// Read the join token from this file (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// Name of the built-in runner's node (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// CPUs the built-in runner offers (0.001 to 1,024, fractions allowed;
    /// default: the machine's).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory the built-in runner offers (MiB, 1 to 16,777,216; default:
    /// the machine's).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Extra labels of the built-in node, KEY=VALUE.
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Threads serving the API (1 to 256; default 1: a single-threaded
    /// runtime, the fastest choice on small machines since the state
    /// machine is serial anyway).
    #[arg(long, default_value_t = 1, value_parser = worker_threads_range())]
    pub worker_threads: usize,
    #[command(flatten)]
    pub control: ControlPlaneArgs,
    /// How long the work dir of an attempt that did not succeed is kept
    /// (seconds, 0 to 31,536,000; default 3,600); a succeeded attempt's is
    /// removed at once.
    #[arg(long, default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub keep_failed_workspaces_secs: u64,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// What every long-running subcommand (`dev`, `server`, `agent`) takes
/// about its own process: where its settings are and how it logs.
#[derive(Args, Debug)]
pub struct ProcessArgs {
    /// Read settings from this TOML file: its keys are this command's long
    /// flags (see docs/operations.md); flags and the environment override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How the process logs on stderr: `human` lines, or `json`, one object
    /// per line (`RUSTCI_LOG` sets the level filter).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// The daemons' log format on stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people.
    Human,
    /// One JSON object per line, with the spans' fields (replica, term,
    /// job, node), for log collectors.
    Json,
}

/// What `rustci dev` and `rustci server` share: how the control plane keeps
/// its state, its disk and its connections.
#[derive(Args, Debug)]
pub struct ControlPlaneArgs {
    /// How long an idempotency key names its job, in seconds (1 to
    /// 31,536,000; default 86,400: 24 hours). A later submission with a key
    /// bound longer ago creates a new job.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub idempotency_window_secs: u64,
    /// Free space (MiB, 0 to 1,048,576; default 256) kept on the data dir's
    /// file system for the log: job output stops below it, marked
    /// incomplete.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub disk_reserve_mb: u64,
    /// Total job output kept (MiB, 1 to 1,073,741,824; default 10,240):
    /// past it the oldest attempts' output is evicted (replaced by a line
    /// that says so).
    #[arg(long, default_value_t = 10_240, value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub output_quota_mb: u64,
    /// HTTP connections held at once (1 to 1,048,576; default 1,024); at
    /// the limit the one that waited longest for its client is closed to
    /// serve a newcomer.
    #[arg(
        long,
        default_value_t = rustci_net::server::CONNECTIONS_MAX,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_048_576)
    )]
    pub connections_max: usize,
    /// Failure detection: a node silent this long is declared down (ms,
    /// 3,000 to 600,000; default 3,000). Longer rides out slow networks,
    /// at the cost of noticing a dead node later. Its jobs run elsewhere
    /// only once its lease has provably lapsed, whatever this is.
    #[arg(
        long,
        default_value_t = rustci_core::protocol::DOWN_AFTER_MS,
        value_parser = clap::value_parser!(u64).range(NODE_DOWN_AFTER_MS_MIN..=NODE_DOWN_AFTER_MS_MAX)
    )]
    pub node_down_after_ms: u64,
    /// Entries applied between two snapshots of the control plane's state
    /// (0 to 100,000,000; 0 never compacts). The log before a snapshot is
    /// dropped: a restart replays at most this many entries, and a replica
    /// further behind catches up by receiving the leader's snapshot.
    #[arg(
        long,
        default_value_t = rustci_core::replica::SNAPSHOT_ENTRIES_DEFAULT,
        value_parser = clap::value_parser!(u64).range(0..=100_000_000)
    )]
    pub snapshot_entries: u64,
}

/// `--heartbeat-interval-ms` of an agent. Its lease must outlive two
/// heartbeats (one may be lost) at the fixed lease length every agent and
/// control plane agree on.
pub const HEARTBEAT_INTERVAL_MS_MIN: u64 = 100;
pub const HEARTBEAT_INTERVAL_MS_MAX: u64 = 1_499;
/// `--node-down-after-ms` of a control plane: never below two of the
/// slowest heartbeats an agent may be set to, so one late heartbeat never
/// marks a node down.
pub const NODE_DOWN_AFTER_MS_MIN: u64 = 3_000;
pub const NODE_DOWN_AFTER_MS_MAX: u64 = 600_000;
const _: () = assert!(2 * HEARTBEAT_INTERVAL_MS_MAX < rustci_core::protocol::LEASE_MS);
const _: () = assert!(2 * HEARTBEAT_INTERVAL_MS_MAX < NODE_DOWN_AFTER_MS_MIN);
const _: () = assert!(
    HEARTBEAT_INTERVAL_MS_MIN <= rustci_core::protocol::HEARTBEAT_INTERVAL_MS
        && rustci_core::protocol::HEARTBEAT_INTERVAL_MS <= HEARTBEAT_INTERVAL_MS_MAX
);
const _: () = assert!(
    NODE_DOWN_AFTER_MS_MIN <= rustci_core::protocol::DOWN_AFTER_MS
        && rustci_core::protocol::DOWN_AFTER_MS <= NODE_DOWN_AFTER_MS_MAX
);

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// This replica's id (1 to 63).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=63))]
    pub id: u64,
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "./rustci-data")]
    pub data_dir: PathBuf,
    /// Another replica of the cluster, ID=ADDR (repeatable): give every
    /// other replica, with the address its API listens on. 1, 3 or 5
    /// replicas form a cluster.
    #[arg(long = "peer", value_name = "ID=ADDR")]
    pub peers: Vec<String>,
    /// The address other replicas and agents reach this one at, when it is
    /// not the listen address (listening on 0.0.0.0, for instance).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// A name shared by every replica of one cluster (default "rustci"):
    /// replicas with another token refuse each other's messages.
    #[arg(long, default_value = crate::daemon::CLUSTER_TOKEN_DEFAULT)]
    pub cluster_token: String,
    /// Silence from the leader after which a follower starts an election
    /// (ms, 20 to 60,000; each wait is drawn between it and twice it).
    #[arg(long, default_value_t = rustci_core::raft::ELECTION_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(20..=60_000))]
    pub election_timeout_ms: u64,
    /// How often the leader tells followers it is alive (ms, 5 to 30,000).
    #[arg(long, default_value_t = rustci_core::raft::HEARTBEAT_INTERVAL_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(5..=30_000))]
    pub raft_heartbeat_interval_ms: u64,
    /// Require `Authorization: Bearer <token>` on the API (needed to listen beyond loopback).
    #[arg(long, env = "RUSTCI_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Read the API token from this file (its first line), so it is in
    /// neither argv nor the config file.
    #[arg(long, value_name = "FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,
    /// Token agents must present to join.
    #[arg(long, env = "RUSTCI_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Read the join token from this file (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// Threads serving the API (1 to 256; default 1).
    #[arg(long, default_value_t = 1, value_parser = worker_threads_range())]
    pub worker_threads: usize,
    #[command(flatten)]
    pub control: ControlPlaneArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Control-plane replicas, ADDR[,ADDR...]: the agent finds the leader.
    #[arg(long, env = "RUSTCI_SERVER", default_value = "127.0.0.1:7878")]
    pub server: String,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs offered to jobs (0.001 to 1,024, fractions allowed; default:
    /// the machine's).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory offered to jobs (MiB, 1 to 16,777,216; default: the
    /// machine's).
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
    /// Read the join token from this file (its first line), so it is in
    /// neither argv nor the config file.
    #[arg(long, value_name = "FILE", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// How often the agent heartbeats, renewing its lease (ms, 100 to
    /// 1,499; default 1,000). Shorter notices a lost control plane sooner.
    #[arg(
        long,
        default_value_t = rustci_core::protocol::HEARTBEAT_INTERVAL_MS,
        value_parser = clap::value_parser!(u64).range(HEARTBEAT_INTERVAL_MS_MIN..=HEARTBEAT_INTERVAL_MS_MAX)
    )]
    pub heartbeat_interval_ms: u64,
    /// On SIGTERM or Ctrl-C, how long running jobs may take to finish
    /// before they are killed and run elsewhere (seconds, 0 to 86,400;
    /// default 600).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub drain_timeout_secs: u64,
    /// Free space (MiB, 0 to 1,048,576; default 256) kept on the work
    /// dir's file system: job output stops below it, marked incomplete.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub disk_reserve_mb: u64,
    /// How long the work dir of an attempt that did not succeed is kept
    /// (seconds, 0 to 31,536,000; default 3,600); a succeeded attempt's is
    /// removed at once.
    #[arg(long, default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub keep_failed_workspaces_secs: u64,
    #[command(flatten)]
    pub process: ProcessArgs,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs the job needs (0.001 to 1,024, fractions allowed: 0.5; default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub cpus: Option<f64>,
    /// Memory the job needs (MiB, 1 to 16,777,216; default 256).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Node label the job requires, KEY=VALUE (repeatable).
    #[arg(long = "constraint", value_parser = parse_kv)]
    pub constraints: Vec<(String, String)>,
    /// Environment variable for the job, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Placement priority (0 to 100, higher first; default 50).
    #[arg(long)]
    pub priority: Option<u64>,
    /// Longest run of an attempt (seconds, 1 to 604,800; default 3,600).
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Times a failed job runs again (0 to 100; default 0).
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
    /// Run in this directory of the node (an absolute path; it must exist
    /// there), instead of an empty work dir of the attempt's own.
    #[arg(long, value_name = "DIR", conflicts_with = "checkout")]
    pub workdir: Option<String>,
    /// Check out this git repository into the attempt's work dir before
    /// the command runs: a URL (https://, ssh://, file://...),
    /// user@host:path or an absolute path on the node.
    #[arg(long, value_name = "REPO")]
    pub checkout: Option<String>,
    /// The branch, tag or full commit id to check out (default: HEAD, the
    /// repository's default branch).
    #[arg(long = "ref", value_name = "REF", requires = "checkout")]
    pub git_ref: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Show a job: its spec, its state and a table of its attempts.
    Get {
        id: String,
        /// Print the job object as JSON (the API's form) instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Why a queued job is not placed (nodes evaluated, filtered by each
    /// constraint, exhausted per resource), or where its attempt went.
    Explain {
        id: String,
        #[arg(long)]
        json: bool,
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
pub enum ClusterCmd {
    /// Add a replica, ID=ADDR (the address its API listens on). Start it
    /// first with an empty data dir, `--id ID` and a `--peer` for every
    /// replica in the cluster.
    Add {
        #[arg(value_name = "ID=ADDR")]
        replica: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove a replica (a dead one, or one being retired).
    Remove {
        /// The id of the replica to remove (1 to 63).
        #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..=63))]
        id: u64,
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

/// A token given as itself, or read from `file`: its first line, without
/// the surrounding whitespace. `flag` names the file's flag (or config key)
/// in errors.
pub fn secret(
    value: Option<String>,
    file: Option<&std::path::Path>,
    flag: &str,
) -> anyhow::Result<Option<String>> {
    let Some(file) = file else {
        return Ok(value);
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--{flag} {}: cannot read the token", file.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        bail!("--{flag} {}: the file holds no token", file.display());
    }
    Ok(Some(token.to_string()))
}

/// `--worker-threads`: 1 to 256.
fn worker_threads_range() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256)
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
    Ok(Client::connect(&server_addr(&opts.server), opts.token.clone()).await?)
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
    toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let (line, column) = line_and_column(&text, span.start);
            format!(":{line}:{column}")
        });
        anyhow!("invalid job file {}{at}: {}", path.display(), e.message())
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A clap error in one line, with clap's tip if it has one, and, for a
/// command given to `submit` without `--`, how to give it.
pub fn one_line_usage_error(e: &clap::Error, subcommand: Option<&str>) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("bad arguments")
        .trim_start_matches("error: ")
        .to_string();
    let tip = lines
        .find_map(|l| l.strip_prefix("tip: "))
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    let dashdash = e.kind() == clap::error::ErrorKind::UnknownArgument
        && subcommand == Some("submit")
        && !first.contains("'-");
    if dashdash {
        return format!(
            "{first}: the job's command goes after `--`, as in `rustci submit [OPTIONS] -- CMD ARGS...`"
        );
    }
    // `-f` means one thing: a file (`submit -f job.toml`), never `--follow`.
    let short_f = matches!(
        e.get(clap::error::ContextKind::InvalidArg),
        Some(clap::error::ContextValue::String(arg)) if arg == "-f"
    );
    if e.kind() == clap::error::ErrorKind::UnknownArgument && short_f {
        return format!(
            "{first}: `-f` names a file (`rustci submit -f job.toml`); to follow, use `--follow`"
        );
    }
    format!("{first}{tip}")
}

/// `rustci events`: pages through `GET /v1/events`, long-polling with
/// `--follow`.
/// `--job` and `--node` of `rustci events`, applied by the server.
#[derive(Clone, Debug, Default)]
pub struct EventsFilter {
    pub job: Option<u64>,
    pub node: Option<String>,
}

pub async fn events(
    opts: &ClientOpts,
    mut after: u64,
    follow: bool,
    as_json: bool,
    filter: EventsFilter,
) -> anyhow::Result<Exit> {
    if let Some(node) = &filter.node {
        rustci_core::validate::validate_node_name(node)
            .map_err(|e| anyhow::anyhow!("--node {node:?}: {e}"))?;
    }
    let mut query = String::new();
    if let Some(job) = filter.job {
        query.push_str(&format!("&job={job}"));
    }
    if let Some(node) = &filter.node {
        // A valid node name needs no percent-encoding.
        query.push_str(&format!("&node={node}"));
    }
    let mut client = connect(opts).await?;
    loop {
        let wait = if follow { 30 } else { 0 };
        let path = format!("/v1/events?after={after}&wait_secs={wait}{query}");
        let page: rustci_net::dto::EventList = client.json(Method::GET, &path, None, &[]).await?;
        let mut out = std::io::stdout().lock();
        for event in &page.events {
            if as_json {
                writeln!(out, "{event}")?;
            } else {
                writeln!(out, "{}", event_line(event))?;
            }
        }
        out.flush()?;
        // A filtered page may hold no event yet move `next` on: the end is
        // a page that moves nothing.
        if page.next <= after && !follow {
            return Ok(0);
        }
        after = page.next.max(after);
    }
}

/// One event as a line: index, time, type, then its fields as key=value.
fn event_line(event: &serde_json::Value) -> String {
    let field = |k: &str| event.get(k).cloned().unwrap_or_default();
    let at = field("at").as_u64().map_or("-".to_string(), rfc3339);
    let mut line = format!(
        "{:>8} {at} {}",
        field("index"),
        field("type").as_str().unwrap_or("?")
    );
    if let Some(obj) = event.as_object() {
        for (k, v) in obj {
            if matches!(k.as_str(), "index" | "term" | "at" | "type") {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            line.push_str(&format!(" {k}={v}"));
        }
    }
    line
}

/// `rustci job explain` for a person.
fn describe_placement(e: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "state:              {}",
        e["state"].as_str().unwrap_or("?")
    );
    if let Some(reason) = e["reason"].as_str() {
        let _ = writeln!(out, "reason:             {reason}");
    }
    let _ = writeln!(
        out,
        "nodes evaluated:    {} of {} ({} not ready)",
        n("nodes_evaluated"),
        n("nodes"),
        n("nodes_not_ready")
    );
    if let Some(filtered) = e["filtered_by_constraint"].as_object() {
        for (constraint, count) in filtered {
            let _ = writeln!(out, "filtered by {constraint}: {count}");
        }
    }
    let _ = writeln!(out, "too small:          {}", n("too_small"));
    let _ = writeln!(out, "exhausted cpu:      {}", n("exhausted_cpu"));
    let _ = writeln!(out, "exhausted memory:   {}", n("exhausted_memory"));
    let _ = writeln!(out, "fitting now:        {}", n("fitting_now"));
    if let Some(r) = e["reservation"].as_object() {
        let _ = writeln!(
            out,
            "reservation:        node {} held for job {} (fits no node now; needs cpu {}m and memory {} MiB more freed there); other jobs may use it only beyond that job's need",
            r["node"].as_str().unwrap_or("?"),
            r["job"],
            r["short_cpu_millis"],
            r["short_memory_mb"]
        );
    }
    if let Some(p) = e["placed"].as_object() {
        let _ = writeln!(
            out,
            "attempt {} on {} ({}): the node has cpu {}m and memory {} MiB free with it (the tightest fit leaves the least)",
            p["attempt"],
            p["node"].as_str().unwrap_or("?"),
            p["attempt_state"].as_str().unwrap_or("?"),
            p["node_free_cpu_millis"],
            p["node_free_memory_mb"]
        );
    }
    out
}

use crate::daemon::wall_clock_ms;

/// A stamp (Unix ms) as RFC 3339, to the millisecond, UTC.
pub fn rfc3339(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// A duration as people write it: `850ms`, `12.3s`, `4m 5s`, `2h 3m`.
fn human_duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m {}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h {}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `rustci job get` for a person: the job, then a table of its attempts.
fn describe_job(job: &JobView, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let name = if job.name.is_empty() {
        "-"
    } else {
        job.name.as_str()
    };
    let ended = match (job.state.as_str(), job.exit_code) {
        ("succeeded" | "failed", Some(code)) => format!(" (exit code {code})"),
        _ => String::new(),
    };
    let _ = writeln!(out, "job {}  {}{ended}", job.id, job.state);
    let _ = writeln!(out, "name:         {name}");
    let _ = writeln!(out, "command:      {}", job.command.join(" "));
    if let Some(dir) = &job.workdir {
        let _ = writeln!(out, "workdir:      {dir}");
    }
    if let Some(c) = &job.checkout {
        let at = c.git_ref.as_deref().unwrap_or("HEAD");
        let _ = writeln!(out, "checkout:     {} at {at}", c.repo);
    }
    let _ = writeln!(
        out,
        "submitted:    {} ({} ago)",
        rfc3339(job.submitted_at),
        human_duration(now_ms.saturating_sub(job.submitted_at))
    );
    let _ = writeln!(
        out,
        "resources:    cpu {}m, memory {} MiB; priority {}; timeout {}",
        job.resources.cpu_millis,
        job.resources.memory_mb,
        job.priority,
        human_duration(job.timeout_secs.saturating_mul(1000))
    );
    if !job.constraints.is_empty() {
        let c: Vec<String> = job
            .constraints
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "constraints:  {}", c.join(", "));
    }
    let _ = writeln!(
        out,
        "retries:      {} of {} used",
        job.retries_used, job.max_retries
    );
    if let Some(reason) = &job.reason {
        let _ = writeln!(out, "reason:       {reason}");
    }
    if job.attempts.is_empty() {
        let _ = writeln!(out, "attempts:     none yet");
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<8} {:<16} {:<10} {:<13} {:<5} {:<25} {:<9} {:<8} CPU",
        "ATTEMPT", "NODE", "STATE", "OUTCOME", "EXIT", "STARTED", "DURATION", "PEAK"
    );
    for a in &job.attempts {
        let outcome = a.outcome.map_or("-".to_string(), |o| {
            serde_json::to_value(o)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        });
        let started = a.started_at.map_or("-".to_string(), rfc3339);
        let duration = match (a.started_at, a.finished_at) {
            (Some(s), Some(f)) => human_duration(f.saturating_sub(s)),
            (Some(s), None) => format!("{} so far", human_duration(now_ms.saturating_sub(s))),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<16} {:<10} {:<13} {:<5} {:<25} {:<9} {:<8} {}",
            a.number,
            a.node,
            a.state,
            outcome,
            a.exit_code.map_or("-".to_string(), |c| c.to_string()),
            started,
            duration,
            a.peak_memory_mb
                .map_or("-".to_string(), |m| format!("{m} MiB")),
            a.cpu_ms.map_or("-".to_string(), human_duration),
        );
    }
    out
}

/// `--server`/`RUSTCI_SERVER` as a socket address: accepts `host:port`,
/// `http://host:port[/]` and a bare host (port 7878); empty means the
/// default.
pub fn server_addr(given: &str) -> String {
    let s = given.trim();
    let s = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    if s.is_empty() {
        return DEFAULT_SERVER.to_string();
    }
    let has_port = match s.rsplit_once(':') {
        // `[::1]:7878` or `host:7878`; a bare IPv6 address has colons
        // but no brackets.
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        s.to_string()
    } else if s.contains(':') && !s.starts_with('[') {
        format!("[{s}]:7878")
    } else {
        format!("{s}:7878")
    }
}

/// Where the CLI goes by default.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7878";

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
    // Where the job runs: a flag replaces what the file says.
    if let Some(dir) = &args.workdir {
        req.workdir = Some(dir.clone());
        req.checkout = None;
    }
    if let Some(repo) = &args.checkout {
        req.checkout = Some(CheckoutRequest {
            repo: repo.clone(),
            git_ref: args.git_ref.clone(),
        });
        req.workdir = None;
    }
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
    drop(client);
    let followed = follow_job(&args.client, job.id, 1, Follow::AllAttempts).await;
    match followed {
        Ok(Followed::Ended(job)) => {
            let (code, how) = job_ending(&job);
            eprintln!("rustci: job {} {how}", job.id);
            Ok(code)
        }
        Ok(Followed::Unplaceable(reason)) => {
            eprintln!(
                "rustci: job {} cannot be placed: {reason} (it stays queued; `rustci job cancel {}` drops it)",
                job.id, job.id
            );
            Ok(EXIT_UNPLACEABLE)
        }
        Err(e) => {
            eprintln!("rustci: lost track of job {}: {e:#}", job.id);
            Ok(EXIT_SERVER_ERROR)
        }
    }
}

/// `submit --wait`'s exit code when the job was cancelled.
pub const EXIT_CANCELLED: Exit = 121;
/// ... when it failed because it was lost (its node died) too many times.
pub const EXIT_LOST: Exit = 122;
/// ... when no node can take it (constraints or size), after a short grace.
pub const EXIT_UNPLACEABLE: Exit = 123;
/// ... when it timed out, as `timeout(1)` exits.
pub const EXIT_TIMED_OUT: Exit = 124;
/// ... when the server could not be reached or answered with an error
/// while the job was being followed.
pub const EXIT_SERVER_ERROR: Exit = 120;
/// ... when its command could not be started, as a shell does.
pub const EXIT_START_FAILED: Exit = 127;
/// ... when it was killed for using more memory than `memory_mb` (the
/// kernel's SIGKILL: 128 + 9).
pub const EXIT_OOM: Exit = 137;
/// How long a queued job may look unplaceable before `submit --wait` gives
/// up on it (a node may be just joining).
const UNPLACEABLE_GRACE: Duration = Duration::from_secs(3);

/// What to follow of a job's output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// This attempt only.
    OneAttempt,
    /// This attempt and every later one, until the job ends.
    AllAttempts,
}

enum Followed {
    /// The job (or the one attempt followed) ended.
    Ended(Box<JobView>),
    /// Queued, and no ready node could take it for [`UNPLACEABLE_GRACE`].
    Unplaceable(String),
}

/// Streams a job's output to stdout from attempt `first` on, with a line
/// on stderr as each attempt starts and ends, until the job is terminal
/// (or, with [`Follow::OneAttempt`], that attempt ended).
async fn follow_job(
    opts: &ClientOpts,
    id: u64,
    first: u32,
    what: Follow,
) -> anyhow::Result<Followed> {
    let mut client = connect(opts).await?;
    let path = format!("/v1/jobs/{id}");
    let mut next = first.max(1);
    let mut unplaceable_since: Option<std::time::Instant> = None;
    loop {
        let job: JobView = client.json(Method::GET, &path, None, &[]).await?;
        let latest = job.attempts.last().map_or(0, |a| a.number);
        if latest >= next {
            unplaceable_since = None;
            if let Some(a) = job.attempts.iter().find(|a| a.number == next) {
                eprintln!("rustci: job {id} attempt {next} on {}", a.node);
            }
            stream_logs(&mut client, id, Some(next), true).await?;
            // The stream ends with the attempt; its result follows shortly.
            let job = loop {
                let job: JobView = client.json(Method::GET, &path, None, &[]).await?;
                let active = job
                    .attempts
                    .iter()
                    .find(|a| a.number == next)
                    .is_some_and(|a| matches!(a.state.as_str(), "assigned" | "running"));
                if !active {
                    break job;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if let Some(a) = job.attempts.iter().find(|a| a.number == next) {
                eprintln!("rustci: job {id} attempt {next} {}", attempt_ending(a));
            }
            let later = job.attempts.last().is_some_and(|a| a.number > next);
            if what == Follow::OneAttempt || (job.is_terminal() && !later) {
                return Ok(Followed::Ended(Box::new(job)));
            }
            next += 1;
            continue;
        }
        if job.is_terminal() {
            return Ok(Followed::Ended(Box::new(job)));
        }
        match job.reason.as_deref().filter(|r| never_placeable(r)) {
            Some(reason) => {
                let since = *unplaceable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= UNPLACEABLE_GRACE {
                    return Ok(Followed::Unplaceable(reason.to_string()));
                }
            }
            None => unplaceable_since = None,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A queued job's reason that no ready node could ever take it as the
/// cluster stands (`rustci_core::scheduler::unplaced_reason`).
fn never_placeable(reason: &str) -> bool {
    ["no ready node", "no matching node is large enough"]
        .iter()
        .any(|p| reason.starts_with(p))
}

/// How an attempt ended, in words.
fn attempt_ending(a: &AttemptView) -> String {
    match (a.state.as_str(), a.outcome, a.exit_code) {
        ("succeeded", ..) => "succeeded".into(),
        ("timed_out", ..) => "timed out".into(),
        ("cancelled", ..) => "was cancelled".into(),
        ("lost", ..) => "was lost (its node went away or stopped it); the job runs again".into(),
        (_, Some(Outcome::Oom), _) => {
            "failed: killed for using more memory than its memory_mb".into()
        }
        (_, Some(Outcome::StartFailed), _) => {
            "failed: it could not be started (its output says why)".into()
        }
        (_, _, Some(code)) if code < 0 => format!("failed: killed by signal {}", -code),
        (_, _, Some(code)) => format!("failed with exit code {code}"),
        (_, _, None) => "failed: killed by a signal".into(),
    }
}

/// `submit --wait`'s exit code for a terminal job, and what to say.
fn job_ending(job: &JobView) -> (Exit, String) {
    let last = job.attempts.last();
    match job.state.as_str() {
        "succeeded" => (0, "succeeded".into()),
        "cancelled" => (EXIT_CANCELLED, "was cancelled".into()),
        _ => match last {
            None => (EXIT_CANCELLED, "ended without running".into()),
            Some(a) => match (a.state.as_str(), a.outcome, a.exit_code) {
                ("timed_out", ..) => (EXIT_TIMED_OUT, "timed out".into()),
                ("lost", ..) => (
                    EXIT_LOST,
                    format!(
                        "failed: {}",
                        job.reason
                            .as_deref()
                            .unwrap_or("its attempts were lost too often")
                    ),
                ),
                (_, Some(Outcome::Oom), _) => (EXIT_OOM, attempt_ending(a)),
                (_, Some(Outcome::StartFailed), _) => (EXIT_START_FAILED, attempt_ending(a)),
                (_, _, Some(code)) if code < 0 => (128 - code, attempt_ending(a)),
                (_, _, Some(code)) if code != 0 => (code, attempt_ending(a)),
                (_, _, _) => (128 + libc::SIGKILL, attempt_ending(a)),
            },
        },
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
            {
                let name = if j.name.is_empty() {
                    j.command.join(" ")
                } else {
                    j.name.clone()
                };
                // Every queued job says why it waits (and a failed one why
                // it gave up, when it was not its own exit).
                match &j.reason {
                    Some(reason) => format!("{name}  [{reason}]"),
                    None => name,
                }
            }
        );
    }
    Ok(0)
}

pub async fn job(cmd: JobCmd) -> anyhow::Result<Exit> {
    match cmd {
        JobCmd::Explain { id, json, client } => {
            let e: serde_json::Value = connect(&client)
                .await?
                .json(
                    Method::GET,
                    &format!("{}/placement", job_path(&id)?),
                    None,
                    &[],
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{}", describe_placement(&e));
            }
        }
        JobCmd::Get { id, json, client } => {
            let job: JobView = connect(&client)
                .await?
                .json(Method::GET, &job_path(&id)?, None, &[])
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print!("{}", describe_job(&job, wall_clock_ms()));
            }
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
    job_path(id)?;
    let num: u64 = id.parse().context("job ids are numbers")?;
    if follow {
        // From the given attempt (only that one), or from the latest and
        // on through retries and reschedules until the job ends.
        let (first, what) = match attempt {
            Some(n) => (n, Follow::OneAttempt),
            None => {
                let job: JobView = connect(client)
                    .await?
                    .json(Method::GET, &format!("/v1/jobs/{num}"), None, &[])
                    .await?;
                let latest = job.attempts.last().map_or(1, |a| a.number);
                (latest, Follow::AllAttempts)
            }
        };
        return match follow_job(client, num, first, what).await? {
            Followed::Ended(_) => Ok(0),
            Followed::Unplaceable(reason) => bail!("job {num} cannot be placed: {reason}"),
        };
    }
    let mut c = connect(client).await?;
    stream_logs(&mut c, num, attempt, false).await?;
    Ok(0)
}

/// Copies an attempt's output (default: the latest) to stdout; with
/// `follow`, until the attempt ends.
async fn stream_logs(
    c: &mut Client,
    id: u64,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/jobs/{id}/logs");
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
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow!("output stream broken: {e}"))?;
        if let Some(data) = frame.data_ref() {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()?;
        }
    }
    Ok(())
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

pub async fn cluster(cmd: ClusterCmd) -> anyhow::Result<Exit> {
    #[derive(serde::Deserialize)]
    struct Replica {
        id: u64,
        addr: String,
    }
    #[derive(serde::Deserialize)]
    struct Members {
        replicas: Vec<Replica>,
    }
    let (client, method, path, body) = match &cmd {
        ClusterCmd::Add { replica, client } => {
            let (id, addr) = replica.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("{replica:?}: expected ID=ADDR, like 4=10.0.0.4:7878")
            })?;
            let id: u64 = id.trim().parse().ok().filter(|&i| i >= 1).ok_or_else(|| {
                anyhow::anyhow!("{replica:?}: the id must be a whole number from 1 up")
            })?;
            let addr = server_addr(addr.trim());
            let body = serde_json::to_vec(&serde_json::json!({"id": id, "addr": addr}))?;
            (
                client,
                Method::POST,
                "/v1/cluster/replicas".to_string(),
                Some(body),
            )
        }
        ClusterCmd::Remove { id, client } => (
            client,
            Method::DELETE,
            format!("/v1/cluster/replicas/{id}"),
            None,
        ),
    };
    let members: Members = connect(client)
        .await?
        .json(method, &path, body, &[])
        .await?;
    println!("replicas now:");
    for r in members.replicas {
        println!("  {} {}", r.id, r.addr);
    }
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

/// Replicas a cluster may have at most.
pub const REPLICAS_MAX: usize = 7;

/// `--peer ID=ADDR` values, checked: ids other than `me` and each other,
/// addresses given, and a cluster of at most [`REPLICAS_MAX`].
pub fn parse_peers(
    me: u64,
    peers: &[String],
) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut out = std::collections::BTreeMap::new();
    for p in peers {
        let Some((id, addr)) = p.split_once('=') else {
            anyhow::bail!("--peer {p:?}: expected ID=ADDR, like 2=10.0.0.2:7878");
        };
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&i| rustci_core::raft::Voters::valid_id(i))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--peer {p:?}: the id must be a whole number from 1 to {}",
                    rustci_core::raft::NODE_ID_MAX
                )
            })?;
        let addr = addr.trim();
        if addr.is_empty() {
            anyhow::bail!("--peer {p:?}: the address is missing");
        }
        let addr = server_addr(addr);
        if id == me {
            anyhow::bail!("--peer {p:?}: {id} is this replica's own --id; list only the others");
        }
        if out.insert(id, addr).is_some() {
            anyhow::bail!("--peer: replica {id} is listed twice");
        }
    }
    if out.len() + 1 > REPLICAS_MAX {
        anyhow::bail!(
            "--peer: {} replicas; a cluster has 1, 3 or 5 (at most {REPLICAS_MAX})",
            out.len() + 1
        );
    }
    if out.len() % 2 == 1 {
        tracing::warn!(
            replicas = out.len() + 1,
            "an even number of replicas survives no more failures than one fewer: use 3 or 5"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every arg of `cmd` and its subcommands, with the command path.
    fn every_arg(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.to_string(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            every_arg(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// The subcommands whose numeric flags other work in flight is changing
    /// (replay's filters, the benchmarks, the simulator's knobs); the rest
    /// are held to the rule.
    const RANGES_PENDING: [&str; 3] = ["rustci replay", "rustci bench", "rustci sim"];

    #[test]
    fn every_numeric_flag_documents_its_range() {
        use std::any::TypeId;
        let numeric = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i64>(),
            TypeId::of::<f64>(),
        ];
        let mut args = Vec::new();
        every_arg(&Cli::command(), "rustci", &mut args);
        let mut undocumented = Vec::new();
        let mut checked = 0;
        for (path, arg) in &args {
            if RANGES_PENDING.iter().any(|p| path.starts_with(p)) {
                continue;
            }
            let t = arg.get_value_parser().type_id();
            if !arg.get_action().takes_values() || !numeric.iter().any(|n| t == *n) {
                continue;
            }
            checked += 1;
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long = arg
                .get_long_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let text = format!("{help} {long}");
            let range = text.chars().any(|c| c.is_ascii_digit())
                && (text.contains(" to ") || text.contains(" and up"));
            if !range {
                undocumented.push(format!("{path} --{}", arg.get_long().unwrap_or("?")));
            }
        }
        assert!(checked > 20, "numeric flags were found: {checked}");
        assert!(
            undocumented.is_empty(),
            "numeric flags without their range in --help: {undocumented:?}"
        );
    }

    #[test]
    fn short_f_means_a_file_everywhere() {
        let mut args = Vec::new();
        every_arg(&Cli::command(), "rustci", &mut args);
        let f: Vec<String> = args
            .iter()
            .filter(|(_, a)| a.get_short() == Some('f'))
            .map(|(path, a)| format!("{path} --{}", a.get_long().unwrap_or("?")))
            .collect();
        assert_eq!(f, ["rustci submit --file"]);
        // `logs -f`, as other tools spell following, is pointed to --follow.
        for cmd in [
            &["rustci", "logs", "-f", "1"][..],
            &["rustci", "events", "-f"],
        ] {
            let e = Cli::try_parse_from(cmd).unwrap_err();
            let line = one_line_usage_error(&e, Some(cmd[1]));
            assert!(line.contains("--follow"), "{cmd:?}: {line}");
        }
    }

    #[test]
    fn server_addresses_in_the_forms_people_write() {
        assert_eq!(server_addr("10.0.0.5:9000"), "10.0.0.5:9000");
        assert_eq!(server_addr("http://10.0.0.5:9000/"), "10.0.0.5:9000");
        assert_eq!(server_addr("ci.example"), "ci.example:7878");
        assert_eq!(server_addr("http://ci.example"), "ci.example:7878");
        assert_eq!(server_addr("  "), DEFAULT_SERVER);
        assert_eq!(server_addr(""), DEFAULT_SERVER);
        assert_eq!(server_addr("[::1]:9000"), "[::1]:9000");
        assert_eq!(server_addr("::1"), "[::1]:7878");
    }

    #[test]
    fn durations_and_stamps_read_as_people_write_them() {
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_340), "12.3s");
        assert_eq!(human_duration(245_000), "4m 5s");
        assert_eq!(human_duration(7_380_000), "2h 3m");
        assert_eq!(rfc3339(1_795_668_452_674), "2026-11-26T04:47:32.674Z");
    }

    #[test]
    fn positions_in_a_job_file_are_one_based_lines_and_columns() {
        let text = "a = 1\nbé = [2\nc";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 6), (2, 1));
        // Columns count characters, not bytes.
        assert_eq!(line_and_column(text, text.find('[').unwrap()), (2, 6));
        assert_eq!(line_and_column(text, text.len() + 10), (3, 2));
    }
}
