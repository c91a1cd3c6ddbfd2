//! The native runner, specified by example: each test names one behaviour a
//! driver or a user relies on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rustci::runner::{
    live_group_members, machine_capacity, pgid_record_path, truncation_marker, NativeRunner,
    RunEvent, RunSpec, RunnerConfig,
};
use rustci_core::model::Outcome;
use tokio::sync::mpsc;

/// Upper bound on any single wait in these tests.
const EVENT_WAIT_MAX: Duration = Duration::from_secs(15);
/// How long a SIGKILLed group may take to disappear from /proc.
const GROUP_DEATH_WAIT_MAX: Duration = Duration::from_secs(2);

/// A runner with its event stream, in a private temp dir.
struct Harness {
    runner: NativeRunner,
    events: mpsc::UnboundedReceiver<RunEvent>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_log_cap(rustci::runner::LOG_CAP_BYTES_DEFAULT)
    }

    fn with_log_cap(log_cap_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = RunnerConfig {
            log_cap_bytes,
            pid_dir: dir.path().join("pids"),
        };
        let (tx, events) = mpsc::unbounded_channel();
        Self {
            runner: NativeRunner::new(config, tx),
            events,
            dir,
        }
    }

    fn pid_dir(&self) -> PathBuf {
        self.dir.path().join("pids")
    }

    fn spec(&self, job: u64, command: &[&str]) -> RunSpec {
        RunSpec {
            job,
            attempt: 1,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            work_dir: self.dir.path().join(format!("work/{job}/1")),
            log_path: self.dir.path().join(format!("logs/{job}/1.log")),
        }
    }

    async fn next_event(&mut self) -> RunEvent {
        tokio::time::timeout(EVENT_WAIT_MAX, self.events.recv())
            .await
            .expect("no run event in time")
            .expect("event channel closed")
    }

    async fn expect_started(&mut self, job: u64) {
        assert_eq!(
            self.next_event().await,
            RunEvent::Started { job, attempt: 1 }
        );
    }

    /// Waits for the attempt's Finished, skipping any Started; returns
    /// (outcome, exit_code).
    async fn finished(&mut self, job: u64) -> (Outcome, Option<i32>) {
        loop {
            match self.next_event().await {
                RunEvent::Started { .. } => continue,
                RunEvent::Finished {
                    job: j,
                    attempt: 1,
                    outcome,
                    exit_code,
                } if j == job => return (outcome, exit_code),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    /// Runs a command to completion; returns (outcome, exit_code, log).
    async fn run(&mut self, command: &[&str]) -> (Outcome, Option<i32>, String) {
        let spec = self.spec(1, command);
        self.runner.start(spec.clone());
        let (outcome, code) = self.finished(1).await;
        (outcome, code, read_log(&spec))
    }

    /// The pgid recorded for a running attempt.
    fn pgid(&self, job: u64) -> i32 {
        let path = pgid_record_path(&self.pid_dir(), job, 1);
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

fn read_log(spec: &RunSpec) -> String {
    std::fs::read_to_string(&spec.log_path).unwrap_or_default()
}

fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// Polls until no live process is left in the group (zombies don't count).
fn group_dies(pgid: i32) -> bool {
    let deadline = Instant::now() + GROUP_DEATH_WAIT_MAX;
    while Instant::now() < deadline {
        if live_group_members(pgid).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test]
async fn exec_runs_the_command_directly_with_its_arguments_no_shell() {
    let mut h = Harness::new();
    let (outcome, code, log) = h.run(&["printf", "%s|%s", "a b", "$HOME;*"]).await;
    assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
    assert_eq!(log, "a b|$HOME;*");
}

#[tokio::test]
async fn exec_environment_is_the_daemons_plus_the_jobs_plus_rustci_ids() {
    let mut h = Harness::new();
    let mut spec = h.spec(7, &sh("echo \"$PATH|$FOO|$RUSTCI_JOB_ID|$RUSTCI_ATTEMPT\""));
    spec.attempt = 1;
    spec.env.insert("FOO".into(), "bar baz".into());
    spec.env.insert("RUSTCI_JOB_ID".into(), "spoofed".into());
    h.runner.start(spec.clone());
    assert_eq!(h.finished(7).await, (Outcome::Exited, Some(0)));
    let path = std::env::var("PATH").unwrap();
    assert_eq!(read_log(&spec), format!("{path}|bar baz|7|1\n"));
}

#[tokio::test]
async fn exec_work_dir_is_created_per_attempt_and_is_the_cwd() {
    let mut h = Harness::new();
    let spec = h.spec(1, &["pwd"]);
    assert!(!spec.work_dir.exists());
    h.runner.start(spec.clone());
    assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
    let cwd = std::fs::canonicalize(&spec.work_dir).unwrap();
    assert_eq!(read_log(&spec), format!("{}\n", cwd.display()));
}

#[tokio::test]
async fn exec_stdin_is_dev_null() {
    let mut h = Harness::new();
    let (_, code, log) = h.run(&sh("readlink /proc/$$/fd/0; cat; echo eof")).await;
    assert_eq!(code, Some(0));
    assert_eq!(log, "/dev/null\neof\n");
}

#[tokio::test]
async fn exec_each_attempt_leads_its_own_process_group() {
    let mut h = Harness::new();
    let (_, code, log) = h.run(&sh("echo $$; cut -d' ' -f5 /proc/$$/stat")).await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert_eq!(lines[0], lines[1], "pid must equal pgid");
    let own_pgid = unsafe { libc::getpgrp() }.to_string();
    assert_ne!(lines[1], own_pgid);
}

#[tokio::test]
async fn log_interleaves_stdout_and_stderr_in_write_order() {
    let mut h = Harness::new();
    let script = "echo 1; echo 2 >&2; echo 3; echo 4 >&2; echo 5";
    let (_, code, log) = h.run(&sh(script)).await;
    assert_eq!(code, Some(0));
    assert_eq!(log, "1\n2\n3\n4\n5\n");
}

#[tokio::test]
async fn log_keeps_write_order_across_many_alternating_stdout_and_stderr_lines() {
    let mut h = Harness::new();
    let script = "i=0; while [ $i -lt 500 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done";
    let (_, code, log) = h.run(&sh(script)).await;
    assert_eq!(code, Some(0));
    let expected: String = (0..500).map(|i| format!("o{i}\ne{i}\n")).collect();
    assert_eq!(log, expected);
}

#[tokio::test]
async fn start_of_an_attempt_already_running_is_ignored() {
    let mut h = Harness::new();
    let spec = h.spec(1, &sh("echo once; sleep 0.3"));
    h.runner.start(spec.clone());
    h.runner.start(spec.clone());
    assert_eq!(h.runner.running(), 1);
    h.expect_started(1).await;
    assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.events.try_recv().is_err(),
        "one Started and one Finished only"
    );
    assert_eq!(read_log(&spec), "once\n");
}

#[tokio::test]
async fn log_is_appended_to_and_its_parent_dirs_created() {
    let mut h = Harness::new();
    let spec = h.spec(1, &["echo", "second"]);
    assert!(!spec.log_path.parent().unwrap().exists());
    std::fs::create_dir_all(spec.log_path.parent().unwrap()).unwrap();
    std::fs::write(&spec.log_path, "first\n").unwrap();
    h.runner.start(spec.clone());
    h.finished(1).await;
    assert_eq!(read_log(&spec), "first\nsecond\n");
}

#[tokio::test]
async fn log_can_be_followed_while_the_job_runs() {
    let mut h = Harness::new();
    let spec = h.spec(1, &sh("echo first; sleep 3; echo second"));
    h.runner.start(spec.clone());
    h.expect_started(1).await;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while read_log(&spec) != "first\n" {
        assert!(
            Instant::now() < deadline,
            "output not visible while running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.runner.running(), 1, "job must still be running");
    h.runner.kill(1, 1);
    h.finished(1).await;
}

#[tokio::test]
async fn log_is_complete_when_finished_arrives() {
    let mut h = Harness::new();
    // 1 MiB, well past the 64 KiB a pipe holds, written as fast as possible.
    let (_, code, log) = h.run(&sh("head -c 1048576 /dev/zero | tr '\\0' x")).await;
    assert_eq!(code, Some(0));
    assert_eq!(log.len(), 1 << 20);
}

#[tokio::test]
async fn log_past_the_cap_gets_one_marker_and_the_job_does_not_block() {
    let cap = 1000;
    let mut h = Harness::with_log_cap(cap);
    let started = Instant::now();
    let script = "head -c 4000000 /dev/zero | tr '\\0' x; echo done >&2";
    let (outcome, code, log) = h.run(&sh(script)).await;
    assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
    assert!(started.elapsed() < Duration::from_secs(10));
    let marker = truncation_marker(cap);
    assert_eq!(marker, "\n[rustci: output truncated at 1000 bytes]\n");
    assert_eq!(log, format!("{}{marker}", "x".repeat(cap as usize)));
}

#[tokio::test]
async fn exit_code_is_reported_as_exited() {
    let mut h = Harness::new();
    let (outcome, code, _) = h.run(&sh("exit 7")).await;
    assert_eq!((outcome, code), (Outcome::Exited, Some(7)));
}

#[tokio::test]
async fn exit_by_a_signal_we_did_not_send_is_exited_without_a_code() {
    let mut h = Harness::new();
    let (outcome, code, _) = h.run(&sh("kill -9 $$")).await;
    assert_eq!((outcome, code), (Outcome::Exited, None));
}

async fn assert_times_out_and_group_dies(script: &str) {
    let mut h = Harness::new();
    let mut spec = h.spec(1, &sh(script));
    spec.timeout = Duration::from_secs(1);
    let started = Instant::now();
    h.runner.start(spec);
    h.expect_started(1).await;
    let pgid = h.pgid(1);
    assert!(!live_group_members(pgid).is_empty());
    assert_eq!(h.finished(1).await, (Outcome::TimedOut, None));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(group_dies(pgid), "group {pgid} still alive");
}

#[tokio::test]
async fn timeout_kills_the_job_at_its_deadline() {
    assert_times_out_and_group_dies("sleep 30").await;
}

#[tokio::test]
async fn timeout_kills_background_grandchildren_too() {
    assert_times_out_and_group_dies("sleep 30 & sleep 30; wait").await;
}

#[tokio::test]
async fn kill_cancels_the_whole_group() {
    let mut h = Harness::new();
    h.runner.start(h.spec(1, &sh("sleep 30 & sleep 30; wait")));
    h.expect_started(1).await;
    let pgid = h.pgid(1);
    h.runner.kill(1, 1);
    assert_eq!(h.finished(1).await, (Outcome::Cancelled, None));
    assert!(group_dies(pgid), "group {pgid} still alive");
    assert_eq!(h.runner.running(), 0);
}

#[tokio::test]
async fn kill_of_an_unknown_or_finished_attempt_is_a_no_op() {
    let mut h = Harness::new();
    h.runner.kill(99, 1);
    let (outcome, code, _) = h.run(&["true"]).await;
    assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
    h.runner.kill(1, 1);
    h.runner.kill(1, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.events.try_recv().is_err(), "no second Finished");
}

#[tokio::test]
async fn start_failed_for_a_missing_executable_says_why_in_the_log() {
    let mut h = Harness::new();
    let spec = h.spec(1, &["nosuchcmd-rustci", "arg"]);
    h.runner.start(spec.clone());
    // No Started: the first event is Finished.
    let first = h.next_event().await;
    let expected = RunEvent::Finished {
        job: 1,
        attempt: 1,
        outcome: Outcome::StartFailed,
        exit_code: None,
    };
    assert_eq!(first, expected);
    let log = read_log(&spec);
    assert!(
        log.starts_with("rustci: cannot start \"nosuchcmd-rustci\": No such file or directory"),
        "{log}"
    );
    assert_eq!(h.runner.running(), 0);
}

#[tokio::test]
async fn start_failed_for_an_empty_command() {
    let mut h = Harness::new();
    let (outcome, code, log) = h.run(&[]).await;
    assert_eq!((outcome, code), (Outcome::StartFailed, None));
    assert!(log.contains("empty command"), "{log}");
}

#[tokio::test]
async fn pgid_is_recorded_while_running_and_removed_when_finished() {
    let mut h = Harness::new();
    h.runner.start(h.spec(1, &["sleep", "30"]));
    h.expect_started(1).await;
    let record = pgid_record_path(&h.pid_dir(), 1, 1);
    assert!(record.exists());
    assert!(h.pgid(1) > 1);
    h.runner.kill(1, 1);
    h.finished(1).await;
    assert!(!record.exists());
}

#[tokio::test]
async fn running_counts_attempts_from_start_until_finished() {
    let mut h = Harness::new();
    assert_eq!(h.runner.running(), 0);
    h.runner.start(h.spec(1, &["sleep", "30"]));
    h.runner.start(h.spec(2, &["sleep", "30"]));
    assert_eq!(h.runner.running(), 2);
    h.runner.kill(2, 1);
    h.finished(2).await;
    assert_eq!(h.runner.running(), 1);
    h.runner.kill(1, 1);
    h.finished(1).await;
    assert_eq!(h.runner.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_everything_and_waits_for_every_finished() {
    let mut h = Harness::new();
    for job in 1..=3 {
        h.runner
            .start(h.spec(job, &sh("sleep 30 & sleep 30; wait")));
    }
    let mut pgids = Vec::new();
    for _ in 1..=3 {
        let RunEvent::Started { job, .. } = h.next_event().await else {
            panic!("expected Started");
        };
        pgids.push(h.pgid(job));
    }
    tokio::time::timeout(EVENT_WAIT_MAX, h.runner.shutdown())
        .await
        .expect("shutdown hung");
    assert_eq!(h.runner.running(), 0);
    let mut finished = Vec::new();
    while let Ok(event) = h.events.try_recv() {
        finished.push(event);
    }
    assert_eq!(finished.len(), 3, "{finished:?}");
    for event in finished {
        let RunEvent::Finished { outcome, .. } = event else {
            panic!("expected Finished, got {event:?}");
        };
        assert_eq!(outcome, Outcome::Cancelled);
    }
    for pgid in pgids {
        assert!(group_dies(pgid), "group {pgid} still alive");
    }
}

#[tokio::test]
async fn background_leftovers_die_when_the_main_process_exits() {
    let mut h = Harness::new();
    let spec = h.spec(1, &sh("sleep 30 & echo $$"));
    let started = Instant::now();
    h.runner.start(spec.clone());
    assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
    assert!(started.elapsed() < Duration::from_secs(5));
    let pgid: i32 = read_log(&spec).trim().parse().unwrap();
    assert!(group_dies(pgid), "background sleep outlived its attempt");
}

fn start_leftover_group(job: &str, attempt: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    Command::new("sleep")
        .arg("30")
        .process_group(0)
        .env("RUSTCI_JOB_ID", job)
        .env("RUSTCI_ATTEMPT", attempt)
        .spawn()
        .unwrap()
}

#[test]
fn reap_leftovers_kills_a_recorded_group_and_removes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut leftover = start_leftover_group("9", "2");
    let pgid = leftover.id() as i32;
    let record = pgid_record_path(dir.path(), 9, 2);
    std::fs::write(&record, format!("{pgid}\n")).unwrap();

    assert_eq!(NativeRunner::reap_leftovers(dir.path()), 1);

    let status = leftover.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!record.exists());
}

#[test]
fn reap_leftovers_spares_a_pgid_now_used_by_someone_else_and_drops_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    // The recorded pgid now belongs to a group that is not attempt 9/2.
    let mut stranger = start_leftover_group("10", "2");
    let pgid = stranger.id() as i32;
    std::fs::write(pgid_record_path(dir.path(), 9, 2), format!("{pgid}\n")).unwrap();
    std::fs::write(dir.path().join("garbage.pgid"), "not a pid").unwrap();
    std::fs::write(pgid_record_path(dir.path(), 1, 1), "1\n").unwrap();
    std::fs::write(dir.path().join("unrelated.txt"), "keep me").unwrap();

    assert_eq!(NativeRunner::reap_leftovers(dir.path()), 0);

    assert_eq!(stranger.try_wait().unwrap(), None, "stranger was killed");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["unrelated.txt".to_string()]);
}

#[test]
fn reap_leftovers_of_a_missing_dir_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(NativeRunner::reap_leftovers(&dir.path().join("none")), 0);
}

/// Set in the environment of the helper daemon started by the crash test.
const CRASH_HELPER_DIR: &str = "RUSTCI_RUNNER_TEST_CRASH_HELPER_DIR";

/// Not a test on its own: a stand-in daemon, run as a child process by
/// `crash_of_the_runner_process_...`. It starts one job, says so, and waits
/// to be killed.
#[test]
fn crash_helper_daemon() {
    let Ok(dir) = std::env::var(CRASH_HELPER_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let runner = NativeRunner::new(RunnerConfig::new(dir.join("pids")), tx);
        runner.start(RunSpec {
            job: 5,
            attempt: 1,
            command: sh("sleep 30 & sleep 30; wait")
                .iter()
                .map(|s| s.to_string())
                .collect(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            work_dir: dir.join("work"),
            log_path: dir.join("job.log"),
        });
        assert!(matches!(rx.recv().await, Some(RunEvent::Started { .. })));
        std::fs::write(dir.join("ready"), "").unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

#[test]
fn crash_of_the_runner_process_kills_the_job_and_reap_leftovers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_helper_daemon",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_HELPER_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + EVENT_WAIT_MAX;
    while !dir.path().join("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "helper daemon never started its job"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid_dir = dir.path().join("pids");
    let record = pgid_record_path(&pid_dir, 5, 1);
    let pgid: i32 = std::fs::read_to_string(&record)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    daemon.kill().unwrap(); // SIGKILL: no cleanup runs in the daemon.
    daemon.wait().unwrap();

    // PDEATHSIG kills the job's main process (the group leader)...
    let deadline = Instant::now() + GROUP_DEATH_WAIT_MAX;
    while live_group_members(pgid).contains(&pgid) {
        assert!(Instant::now() < deadline, "job leader outlived the runner");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...but not what it forked: that is what the pgid record is for.
    assert!(record.exists());
    assert_eq!(NativeRunner::reap_leftovers(&pid_dir), 1);
    assert!(group_dies(pgid), "group {pgid} survived reap_leftovers");
    assert!(!record.exists());
}

#[test]
fn machine_capacity_reports_real_cpus_and_memory() {
    let (cpu_millis, memory_mb) = machine_capacity();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(cpu_millis, cpus * 1000);
    assert!(memory_mb > 64, "{memory_mb} MiB");
}
