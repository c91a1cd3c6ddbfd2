//! Issue 8, items 1, 2 and 9, end to end: a data dir whose log was lost is
//! refused; a failure inside the log writer fails the waiting request at
//! once and stops the daemon naming the cause; `rustci backup` takes a
//! consistent copy while the daemon runs under write load.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rustci::daemon::{start_dev, DevConfig};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn one_line(stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_data_dir_whose_log_was_lost_refuses_to_start_in_one_line() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, &[]);
    let out = dev.cli(&["submit", "--wait", "--", "echo", "old job"]);
    assert!(out.status.success());
    assert!(dev.terminate().success());
    let log = data.join("log.redb");

    std::fs::remove_file(&log).unwrap();
    let out = dev_refusing(&data, &[]);
    assert!(!out.status.success());
    let err = one_line(&out.stderr);
    assert!(err.contains("log.redb is missing"), "{err}");
    assert!(!log.exists(), "the refusal created nothing");

    std::fs::write(&log, b"").unwrap();
    let out = dev_refusing(&data, &[]);
    assert!(!out.status.success());
    let err = one_line(&out.stderr);
    assert!(err.contains("log.redb is empty"), "{err}");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
}

#[test]
fn a_panic_in_the_log_writer_fails_the_waiting_request_with_503_and_stops_the_daemon() {
    let dir = scratch();
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt
        .block_on(start_dev(DevConfig::server(
            data.clone(),
            "127.0.0.1:0".parse().unwrap(),
        )))
        .unwrap();
    let addr = handle.addr.to_string();
    let submit = r#"{"command": ["true"]}"#;
    assert_eq!(http(&addr, "POST", "/v1/jobs", Some(submit)).0, 201);

    rustci_storage::fault::panic_next_append(&data);
    // `http` gives up after 30 s and answers status 0: before the fix, the
    // request waited forever for an entry the dead writer never wrote.
    let (status, body) = http(&addr, "POST", "/v1/jobs", Some(submit));
    assert_eq!(status, 503, "{body}");

    // The daemon stops by itself, naming the cause.
    let stopped = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            handle.run_until(std::future::pending()),
        )
        .await
    });
    let err = stopped.expect("the daemon stopped by itself").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("log writer panicked"), "{msg}");
    assert!(msg.contains("log.redb"), "{msg}");
    assert_ne!(http(&addr, "GET", "/readyz", None).0, 200);
    drop(rt);

    // The acknowledged job is in the log, and the next start checks the file.
    let store = rustci_storage::LogStore::open(&data).unwrap();
    let state = rustci::daemon::replay_store(&store).unwrap();
    assert_eq!(state.jobs.len(), 1);
}

#[test]
fn backup_takes_consistent_copies_while_the_daemon_runs_under_write_load() {
    let dir = scratch();
    let data = dir.path().join("data");
    let dev = Dev::start(&data, &["--cpus", "1"]);
    let out = dev.cli(&["submit", "--wait", "--", "echo", "output kept"]);
    assert!(out.status.success());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (addr, stop) = (dev.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = r#"{"command": ["true"], "env": {"PAD": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;
                if http(&addr, "POST", "/v1/jobs", Some(body)).0 == 201 {
                    acked += 1;
                }
            }
            acked
        })
    };
    let mut last_index = 0;
    for n in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let to = dir.path().join(format!("copy-{n}"));
        let started = Instant::now();
        let out = run(&["backup", "--to", to.to_str().unwrap()], Some(&data));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("state_digest="), "{text}");
        eprintln!("backup {n}: {:?}: {text}", started.elapsed());
        // The copy replays on its own, and is a data dir a daemon can start on.
        let replay = run(&["replay", "--json"], Some(&to));
        assert!(
            replay.status.success(),
            "{}",
            String::from_utf8_lossy(&replay.stderr)
        );
        let summary = String::from_utf8_lossy(&replay.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        let index = v["summary"]["applied_index"].as_u64().unwrap();
        assert!(
            index > last_index,
            "each copy is later: {index} > {last_index}"
        );
        last_index = index;
        assert!(to.join("identity").is_file());
        assert_eq!(
            std::fs::read_to_string(to.join("output/1/1.log")).unwrap(),
            "output kept\n"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = load.join().unwrap();
    assert!(acked > 0);
    // A copy starts as a daemon of its own, with the jobs it copied.
    let copy = dir.path().join("copy-2");
    let restored = Dev::start(&copy, &["--cpus", "1"]);
    let job = restored.get_json("/v1/jobs/1");
    assert_eq!(job["state"], "succeeded", "{job}");

    // A second copy into the same place is refused and changes nothing.
    let out = run(&["backup", "--to", copy.to_str().unwrap()], Some(&data));
    assert!(!out.status.success());
    let err = one_line(&out.stderr);
    assert!(err.contains("not an empty directory"), "{err}");
}
