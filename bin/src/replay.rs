//! `rustci replay`: reads a data dir offline (read-only) and shows the event
//! timeline, the state at an index, or one job's history. Debugging an
//! incident is replaying its log through the very reducer the daemon runs.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use rustci_core::event::Entry;
use rustci_core::model::JobId;
use rustci_core::scheduler::unplaced_reason;
use rustci_core::state::{Applied, State};
use rustci_net::dto::{event_json, JobView, NodeView};
use rustci_storage::LogStore;

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The data dir to read (a copy is best; it is never written to).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Stop after this log index and show the state there.
    #[arg(long)]
    pub at: Option<u64>,
    /// Show only this job's history.
    #[arg(long)]
    pub job: Option<u64>,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<i32> {
    let dir = args.data_dir.clone();
    crate::daemon::guard_corruption(&dir, || run_inner(args))
}

fn run_inner(args: ReplayArgs) -> anyhow::Result<i32> {
    let store = LogStore::open_read_only(&args.data_dir).map_err(|e| anyhow!("{e}"))?;
    let upto = args.at.unwrap_or(u64::MAX);
    let job = args.job.map(JobId);
    let mut state = State::new();
    let mut shown = 0u64;
    let mut failure = None;
    let result = store.scan(store.first_index(), |entry| {
        if entry.index > upto {
            return std::ops::ControlFlow::Break(());
        }
        let applied = state.apply(&entry);
        let about_job = match (job, &applied) {
            (None, _) => true,
            (Some(j), Applied::Submitted(id) | Applied::Duplicate(id)) => *id == j,
            (Some(j), _) => entry.event.job() == Some(j),
        };
        if about_job && (args.at.is_none() || job.is_some()) {
            shown += 1;
            if let Err(e) = print_entry(&entry, &applied, args.json) {
                failure = Some(e);
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    result.map_err(|e| anyhow!("{e}"))?;
    if let Some(id) = job {
        let found = state
            .job(id)
            .ok_or_else(|| anyhow!("job {id} not found in the log"))?;
        let view = JobView::new(found, unplaced_reason(&state, found));
        if args.json {
            println!("{}", serde_json::json!({ "job": view }));
        } else {
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        return Ok(0);
    }
    print_summary(&state, shown, args.at.is_some(), args.json)?;
    Ok(0)
}

fn print_entry(entry: &Entry, applied: &Applied, json: bool) -> anyhow::Result<()> {
    let mut value = event_json(entry);
    if let Applied::Ignored(reason) = applied {
        value["ignored"] = (*reason).into();
    }
    if let Applied::Submitted(id) = applied {
        value["job"] = id.0.into();
    }
    if json {
        println!("{value}");
    } else {
        let obj = value.as_object().expect("event_json is an object");
        let details: Vec<String> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "index" | "term" | "at" | "type"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:>8} t{:<3} {} {:<17} {}",
            entry.index,
            entry.term,
            crate::cli::rfc3339(entry.at),
            entry.event.kind(),
            details.join(" ")
        );
    }
    Ok(())
}

fn print_summary(state: &State, shown: u64, with_state: bool, json: bool) -> anyhow::Result<()> {
    let counts: serde_json::Map<String, serde_json::Value> = rustci_core::model::JobState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), state.job_count(*s).into()))
        .collect();
    let digest = format!("{:016x}", state.digest());
    if json {
        let mut v = serde_json::json!({
            "summary": {
                "applied_index": state.applied_index,
                "jobs": counts,
                "nodes": state.nodes.len(),
                "state_digest": digest,
            }
        });
        if with_state {
            v["summary"]["job_list"] = state
                .jobs
                .values()
                .map(|j| serde_json::to_value(JobView::new(j, unplaced_reason(state, j))))
                .collect::<Result<Vec<_>, _>>()?
                .into();
            v["summary"]["node_list"] = state
                .nodes
                .values()
                .map(|n| serde_json::to_value(NodeView::new(n, 0, None)))
                .collect::<Result<Vec<_>, _>>()?
                .into();
        }
        println!("{v}");
        return Ok(());
    }
    if with_state {
        for j in state.jobs.values() {
            println!(
                "job {:<8} {:<10} attempts={} node={}",
                j.id,
                j.state.as_str(),
                j.attempts.len(),
                j.node().unwrap_or("-")
            );
        }
        for n in state.nodes.values() {
            println!(
                "node {:<16} {:<9} allocated cpu_millis={} memory_mb={}",
                n.name,
                n.state.as_str(),
                n.allocated.cpu_millis,
                n.allocated.memory_mb
            );
        }
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "applied_index={} entries_shown={} jobs: {} nodes={} state_digest={}",
        state.applied_index,
        shown,
        counts.join(" "),
        state.nodes.len(),
        digest
    );
    Ok(())
}
