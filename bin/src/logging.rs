//! How the process logs: `tracing` events on stderr, as lines for people or
//! (`--log-format json`) as one JSON object per line for a log collector.
//!
//! The daemons open spans that carry what an event is about, so a JSON
//! line names it without the message having to: `replica` (`id`, `term`)
//! around the control plane's tasks, `node` (`node`) around a node's
//! runner, `attempt` (`job`, `attempt`) around each attempt's supervision.
//! In JSON, every span around an event is in its `spans` list, innermost
//! last.
//!
//! Never writes to stdout: that is the CLI's output.

use std::sync::OnceLock;

use crate::cli::LogFormat;

/// The format chosen at start-up, for [`announce`] and [`fatal`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the subscriber. The level filter is `RUSTCI_LOG` (an
/// `EnvFilter`), by default `info` for the daemons and `warn` for the CLI.
pub fn init(daemon: bool, format: LogFormat) {
    let _ = FORMAT.set(format);
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUSTCI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => {
            // Colours only on a terminal, and never with NO_COLOR set
            // (no-color.org).
            use std::io::IsTerminal as _;
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

fn json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// A line for the person who started the process ("serving on ...",
/// "stopping"): as itself on stderr, or as a log event in JSON so that
/// stderr stays one JSON object per line.
pub fn announce(line: &str) {
    if json() {
        tracing::info!("{line}");
    } else {
        eprintln!("{line}");
    }
}

/// The error that ends the process, in one line (see the contract).
pub fn fatal(line: &str) {
    if json() {
        tracing::error!("{line}");
    } else {
        eprintln!("{line}");
    }
}
