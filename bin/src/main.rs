//! `rustci`: the daemon, the CLI and the benchmarks in one binary.

use std::process::ExitCode;

use rustci::cli::{self, Cli, Cmd};
use rustci::config::ParseError;
use rustci::daemon::{self, DevConfig};
use rustci_core::model::Resources;

fn main() -> ExitCode {
    // `rustci __shim -- CMD ARGS...`: the per-attempt supervisor the runner
    // starts (see rustci::runner). Before anything else: no clap, no tracing.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == rustci::runner::SHIM_ARG) {
        let command = args.skip_while(|a| a != "--").skip(1).collect();
        std::process::exit(rustci::runner::shim_main(command));
    }
    let cli = match rustci::config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ParseError::Config(line)) => {
            // The contract: one line on stderr (naming the file and the
            // key), non-zero exit.
            eprintln!("rustci: {line}");
            return ExitCode::from(2);
        }
        Err(ParseError::Usage(e)) if !e.use_stderr() => e.exit(), // --help, --version
        Err(ParseError::Usage(e))
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            // `rustci` (or `rustci node`) alone: the usage, as help shows it.
            eprint!("{}", e.render());
            return ExitCode::from(2);
        }
        Err(ParseError::Usage(e)) => {
            // The contract: one line on stderr, non-zero exit.
            eprintln!(
                "rustci: {}",
                cli::one_line_usage_error(&e, std::env::args().nth(1).as_deref())
            );
            return ExitCode::from(2);
        }
    };
    let daemonish = matches!(cli.command, Cmd::Dev(_) | Cmd::Server(_) | Cmd::Agent(_));
    if !daemonish {
        // A CLI whose output is piped into `head` should end quietly when
        // the pipe closes, as Unix tools do, not panic in println!. (The
        // daemon keeps Rust's default: a closed socket is an error there.)
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Before any thread or descriptor of our own exists.
    let inherited = daemonish.then(rustci::procenv::cloexec_inherited_fds);
    let log_format = match &cli.command {
        Cmd::Dev(a) => a.process.log_format,
        Cmd::Server(a) => a.process.log_format,
        Cmd::Agent(a) => a.process.log_format,
        _ => cli::LogFormat::Human,
    };
    rustci::logging::init(daemonish, log_format);
    if daemonish {
        if let Some(n @ 1..) = inherited {
            tracing::debug!(
                descriptors = n,
                "inherited descriptors marked close-on-exec: jobs never see them"
            );
        }
        match rustci::procenv::raise_fd_limit() {
            Ok((before, after)) if after > before => {
                tracing::debug!(
                    before,
                    after,
                    "raised the open-files limit to the hard limit"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    let mut builder = match &cli.command {
        // The control plane's hot path is serial (one driver task, one log
        // writer thread); extra API threads mostly add cross-thread wake-ups.
        // Measured on 2 cores: one API thread serves ~15% more submissions.
        Cmd::Dev(args) if args.worker_threads <= 1 => tokio::runtime::Builder::new_current_thread(),
        Cmd::Dev(args) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.worker_threads);
            b
        }
        Cmd::Server(args) if args.worker_threads <= 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Cmd::Server(args) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.worker_threads);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rustci: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            rustci::logging::fatal(&format!("rustci: {msg}"));
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::Dev(args) => {
            let capacity = match (args.cpus, args.memory_mb) {
                (None, None) => None,
                (cpus, mem) => {
                    let (mc, mm) = rustci::runner::machine_capacity();
                    let cpu = match cpus {
                        Some(c) => cli::cpus_to_millis(c)?,
                        None => mc,
                    };
                    Some(Resources::new(cpu, mem.unwrap_or(mm)))
                }
            };
            // The built-in node must be one jobs can use: refuse at once
            // rather than serve with no usable node.
            let node_name = args.node_name.clone().unwrap_or_else(daemon::hostname);
            rustci_core::validate::validate_node_name(&node_name)
                .map_err(|e| anyhow::anyhow!("--node-name: {e}"))?;
            if let Some(c) = &capacity {
                rustci_core::validate::validate_resources(c).map_err(|e| {
                    anyhow::anyhow!("the built-in node's size (--cpus, --memory-mb): {e}")
                })?;
            }
            let labels: rustci_core::model::Labels = args.labels.iter().cloned().collect();
            rustci_core::validate::validate_labels(&labels, "--label")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let config = DevConfig {
                data_dir: args.data_dir,
                listen: args.listen,
                api_token: cli::secret(
                    args.api_token,
                    args.api_token_file.as_deref(),
                    "api-token-file",
                )?,
                join_token: cli::secret(
                    args.join_token,
                    args.join_token_file.as_deref(),
                    "join-token-file",
                )?,
                local_runner: true,
                node_name,
                capacity,
                labels,
                idempotency_window: std::time::Duration::from_secs(
                    args.control.idempotency_window_secs,
                ),
                disk_reserve_bytes: args.control.disk_reserve_mb * 1024 * 1024,
                output_quota_bytes: args.control.output_quota_mb * 1024 * 1024,
                keep_failed_workspaces: std::time::Duration::from_secs(
                    args.keep_failed_workspaces_secs,
                ),
                connections_max: args.control.connections_max,
                node_down_after_ms: args.control.node_down_after_ms,
                snapshot_entries: args.control.snapshot_entries,
                ..DevConfig::server(std::path::PathBuf::new(), args.listen)
            };
            let handle = daemon::start_dev(config).await?;
            rustci::logging::announce(&format!(
                "rustci dev: serving the API on http://{}",
                handle.addr
            ));
            handle.run_until(shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Server(args) => {
            let peers = cli::parse_peers(args.id, &args.peers)?;
            if args.election_timeout_ms < 2 * args.raft_heartbeat_interval_ms {
                anyhow::bail!(
                    "--election-timeout-ms ({}) must be at least twice --raft-heartbeat-interval-ms ({})",
                    args.election_timeout_ms,
                    args.raft_heartbeat_interval_ms
                );
            }
            let config = DevConfig {
                data_dir: args.data_dir,
                listen: args.listen,
                api_token: cli::secret(
                    args.api_token,
                    args.api_token_file.as_deref(),
                    "api-token-file",
                )?,
                join_token: cli::secret(
                    args.join_token,
                    args.join_token_file.as_deref(),
                    "join-token-file",
                )?,
                local_runner: false,
                node_name: String::new(),
                capacity: None,
                labels: Default::default(),
                idempotency_window: std::time::Duration::from_secs(
                    args.control.idempotency_window_secs,
                ),
                disk_reserve_bytes: args.control.disk_reserve_mb * 1024 * 1024,
                output_quota_bytes: args.control.output_quota_mb * 1024 * 1024,
                keep_failed_workspaces: rustci::runner::KEEP_FAILED_WORKSPACES_DEFAULT,
                connections_max: args.control.connections_max,
                node_down_after_ms: args.control.node_down_after_ms,
                snapshot_entries: args.control.snapshot_entries,
                id: args.id,
                peers,
                advertise: args.advertise,
                cluster_token: args.cluster_token,
                election_timeout_ms: args.election_timeout_ms,
                heartbeat_interval_ms: args.raft_heartbeat_interval_ms,
            };
            let handle = daemon::start_dev(config).await?;
            rustci::logging::announce(&format!(
                "rustci server: serving the API and agents on http://{}",
                handle.addr
            ));
            handle.run_until(shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Agent(args) => {
            let (mc, mm) = rustci::runner::machine_capacity();
            let cpu = match args.cpus {
                Some(c) => cli::cpus_to_millis(c)?,
                None => mc,
            };
            let mut labels = daemon::default_labels();
            labels.extend(args.labels);
            let config = rustci::agent::AgentProcessConfig {
                servers: args
                    .server
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                join_token: cli::secret(
                    args.join_token,
                    args.join_token_file.as_deref(),
                    "join-token-file",
                )?,
                name: args.name.unwrap_or_else(daemon::hostname),
                capacity: Resources::new(cpu, args.memory_mb.unwrap_or(mm)),
                labels,
                work_dir: args.work_dir,
                drain_timeout: std::time::Duration::from_secs(args.drain_timeout_secs),
                disk_reserve_bytes: args.disk_reserve_mb * 1024 * 1024,
                keep_failed_workspaces: std::time::Duration::from_secs(
                    args.keep_failed_workspaces_secs,
                ),
                heartbeat_interval_ms: args.heartbeat_interval_ms,
            };
            let (stop_tx, stop_rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if stop_tx.send(()).is_err() {
                        return;
                    }
                }
            });
            rustci::agent::run(config, stop_rx).await?;
            Ok(0)
        }
        Cmd::Submit(args) => cli::submit(args).await,
        Cmd::Jobs {
            state,
            node,
            name,
            limit,
            json,
            client,
        } => {
            let filter = cli::JobsFilter { state, node, name };
            cli::jobs(&client, filter, limit, json).await
        }
        Cmd::Job { command } => cli::job(command).await,
        Cmd::Logs {
            id,
            follow,
            attempt,
            client,
        } => cli::logs(&client, &id, follow, attempt).await,
        Cmd::Nodes { json, client } => cli::nodes(&client, json).await,
        Cmd::Node { command } => cli::node(command).await,
        Cmd::Cluster { command } => cli::cluster(command).await,
        Cmd::Status { json, client } => cli::status(&client, json).await,
        Cmd::Events {
            follow,
            after,
            job,
            node,
            json,
            client,
        } => {
            cli::events(
                &client,
                after,
                follow,
                json,
                cli::EventsFilter { job, node },
            )
            .await
        }
        Cmd::Replay(args) => tokio::task::spawn_blocking(move || rustci::replay::run(args)).await?,
        Cmd::Backup(args) => rustci::backup::run(args).await,
        Cmd::Sim(args) => tokio::task::spawn_blocking(move || rustci::simcmd::run(args)).await?,
        Cmd::Bench(args) => rustci::bench::run(args).await,
        Cmd::Completions { shell } => Ok(cli::completions(shell)),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
/// The first Ctrl-C or SIGTERM: a graceful stop (running attempts are
/// ended; they run again after a restart). A second one while it is under
/// way stops the process at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    rustci::logging::announce("rustci: stopping gracefully (again to stop at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        rustci::logging::announce("rustci: stopping at once");
        std::process::exit(130);
    });
}
