//! The native runner, specified by example: each test names one behaviour a
//! driver or a user relies on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rustci::runner::{
    live_group_members, machine_capacity, pgid_record_path, truncation_marker, NativeRunner,
    RunEvent, RunSpec, RunnerConfig, SHIM_ARG, SHIM_START_FAILED_EXIT,
};
use rustci_core::model::Outcome;
use tokio::sync::mpsc;

/// Upper bound on any single wait in these tests.
const EVENT_WAIT_MAX: Duration = Duration::from_secs(15);
/// How long a SIGKILLed group may take to disappear from /proc.
const GROUP_DEATH_WAIT_MAX: Duration = Duration::from_secs(2);

/// The `rustci` binary, used as the runner's shim.
const SHIM_EXE: &str = env!("CARGO_BIN_EXE_rustci");

/// How the runner starts the job's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The command itself leads the attempt's process group.
    Direct,
    /// `rustci __shim -- command` leads it (`RunnerConfig::shim`).
    Shim,
}

impl Mode {
    fn shim(self) -> Option<PathBuf> {
        match self {
            Mode::Direct => None,
            Mode::Shim => Some(PathBuf::from(SHIM_EXE)),
        }
    }
}

/// Defines, for each `async fn name(h: Harness, mode: Mode) {...}`, a module
/// `name` with two tests: `name::direct` and `name::shim`. The behaviour a
/// driver sees must not depend on whether a shim is used.
macro_rules! in_both_modes {
    ($(async fn $name:ident($h:ident: Harness, $mode:ident: Mode) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[allow(unused_mut, unused_variables)]
            async fn body(mut $h: Harness, $mode: Mode) $body

            #[tokio::test]
            async fn direct() {
                body(Harness::new_in(Mode::Direct), Mode::Direct).await
            }

            #[tokio::test]
            async fn shim() {
                body(Harness::new_in(Mode::Shim), Mode::Shim).await
            }
        }
    )*};
}

/// A runner with its event stream, in a private temp dir.
struct Harness {
    runner: NativeRunner,
    events: mpsc::UnboundedReceiver<RunEvent>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::new_in(Mode::Direct)
    }

    fn new_in(mode: Mode) -> Self {
        Self::build(rustci::runner::LOG_CAP_BYTES_DEFAULT, mode)
    }

    fn build(log_cap_bytes: u64, mode: Mode) -> Self {
        Self::configured(mode, |c| c.log_cap_bytes = log_cap_bytes)
    }

    /// A harness whose runner config `tune` adjusts first.
    fn configured(mode: Mode, tune: impl FnOnce(&mut RunnerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunnerConfig {
            log_cap_bytes: rustci::runner::LOG_CAP_BYTES_DEFAULT,
            pid_dir: dir.path().join("pids"),
            shim: mode.shim(),
            lease_file: None,
            cgroups: None,
            disk_reserve_bytes: 0,
            keep_failed_workspaces: Duration::from_secs(3600),
        };
        tune(&mut config);
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
            limits: None,
            lease_file: None,
            workspace: Default::default(),
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
                    usage: _,
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

in_both_modes! {
    async fn exec_runs_the_command_directly_with_its_arguments_no_shell(h: Harness, mode: Mode) {
        let (outcome, code, log) = h.run(&["printf", "%s|%s", "a b", "$HOME;*"]).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
        assert_eq!(log, "a b|$HOME;*");
    }
}

in_both_modes! {
    async fn exec_environment_is_path_home_lang_plus_the_jobs_plus_rustci_ids(h: Harness, mode: Mode) {
        let mut spec = h.spec(7, &sh("echo \"$PATH|$FOO|$RUSTCI_JOB_ID|$RUSTCI_ATTEMPT\""));
        spec.attempt = 1;
        spec.env.insert("FOO".into(), "bar baz".into());
        spec.env.insert("RUSTCI_JOB_ID".into(), "spoofed".into());
        h.runner.start(spec.clone());
        assert_eq!(h.finished(7).await, (Outcome::Exited, Some(0)));
        let path = std::env::var("PATH").unwrap();
        assert_eq!(read_log(&spec), format!("{path}|bar baz|7|1\n"));
        // The shim's own variables do not reach the job, nor anything else
        // of this process's environment.
        let spec = h.spec(8, &sh("env | grep '^RUSTCI_SHIM' || echo none"));
        h.runner.start(spec.clone());
        h.finished(8).await;
        assert_eq!(read_log(&spec), "none\n");
        let spec = h.spec(9, &["env"]);
        h.runner.start(spec.clone());
        h.finished(9).await;
        let mut names: Vec<String> = read_log(&spec)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        names.sort();
        assert_eq!(names, ["HOME", "LANG", "PATH", "RUSTCI_ATTEMPT", "RUSTCI_JOB_ID"]);
    }
}

in_both_modes! {
    async fn exec_work_dir_is_created_per_attempt_and_is_the_cwd(h: Harness, mode: Mode) {
        // Failing, so that its work dir is kept to be looked at.
        let spec = h.spec(1, &sh("pwd; exit 1"));
        assert!(!spec.work_dir.exists());
        h.runner.start(spec.clone());
        assert_eq!(h.finished(1).await, (Outcome::Exited, Some(1)));
        let cwd = std::fs::canonicalize(&spec.work_dir).unwrap();
        assert_eq!(read_log(&spec), format!("{}\n", cwd.display()));
    }
}

in_both_modes! {
    async fn exec_stdin_is_dev_null(h: Harness, mode: Mode) {
        let (_, code, log) = h.run(&sh("readlink /proc/$$/fd/0; cat; echo eof")).await;
        assert_eq!(code, Some(0));
        assert_eq!(log, "/dev/null\neof\n");
    }
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

in_both_modes! {
    async fn log_interleaves_stdout_and_stderr_in_write_order(h: Harness, mode: Mode) {
        let script = "echo 1; echo 2 >&2; echo 3; echo 4 >&2; echo 5";
        let (_, code, log) = h.run(&sh(script)).await;
        assert_eq!(code, Some(0));
        assert_eq!(log, "1\n2\n3\n4\n5\n");
    }
}

in_both_modes! {
    async fn log_keeps_write_order_across_many_alternating_stdout_and_stderr_lines(h: Harness, mode: Mode) {
        let script = "i=0; while [ $i -lt 500 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done";
        let (_, code, log) = h.run(&sh(script)).await;
        assert_eq!(code, Some(0));
        let expected: String = (0..500).map(|i| format!("o{i}\ne{i}\n")).collect();
        assert_eq!(log, expected);
    }
}

in_both_modes! {
    async fn start_of_an_attempt_already_running_is_ignored(h: Harness, mode: Mode) {
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
}

in_both_modes! {
    async fn log_is_appended_to_and_its_parent_dirs_created(h: Harness, mode: Mode) {
        let spec = h.spec(1, &["echo", "second"]);
        assert!(!spec.log_path.parent().unwrap().exists());
        std::fs::create_dir_all(spec.log_path.parent().unwrap()).unwrap();
        std::fs::write(&spec.log_path, "first\n").unwrap();
        h.runner.start(spec.clone());
        h.finished(1).await;
        assert_eq!(read_log(&spec), "first\nsecond\n");
    }
}

in_both_modes! {
    async fn log_can_be_followed_while_the_job_runs(h: Harness, mode: Mode) {
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
}

in_both_modes! {
    async fn log_is_complete_when_finished_arrives(h: Harness, mode: Mode) {
        // 1 MiB, well past the 64 KiB a pipe holds, written as fast as possible.
        let (_, code, log) = h.run(&sh("head -c 1048576 /dev/zero | tr '\\0' x")).await;
        assert_eq!(code, Some(0));
        assert_eq!(log.len(), 1 << 20);
    }
}

in_both_modes! {
    async fn log_past_the_cap_gets_one_marker_and_the_job_does_not_block(h: Harness, mode: Mode) {
        let cap = 1000;
        let mut h = Harness::build(cap, mode);
        let started = Instant::now();
        let script = "head -c 4000000 /dev/zero | tr '\\0' x; echo done >&2";
        let (outcome, code, log) = h.run(&sh(script)).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
        assert!(started.elapsed() < Duration::from_secs(10));
        let marker = truncation_marker(cap);
        assert_eq!(marker, "\n[rustci: output truncated at 1000 bytes]\n");
        assert_eq!(log, format!("{}{marker}", "x".repeat(cap as usize)));
    }
}

in_both_modes! {
    async fn exit_code_is_reported_as_exited(h: Harness, mode: Mode) {
        let (outcome, code, _) = h.run(&sh("exit 7")).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(7)));
    }
}

in_both_modes! {
    async fn exit_by_a_signal_we_did_not_send_is_exited_with_minus_the_signal(h: Harness, mode: Mode) {
        let (outcome, code, _) = h.run(&sh("kill -9 $$")).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(-9)));
        let (outcome, code, _) = h.run(&sh("kill -TERM $$")).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(-15)));
    }
}

async fn assert_times_out_and_group_dies(script: &str, mode: Mode) {
    let mut h = Harness::new_in(mode);
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

in_both_modes! {
    async fn timeout_kills_the_job_at_its_deadline(h: Harness, mode: Mode) {
        assert_times_out_and_group_dies("sleep 30", mode).await;
    }

    async fn timeout_kills_background_grandchildren_too(h: Harness, mode: Mode) {
        assert_times_out_and_group_dies("sleep 30 & sleep 30; wait", mode).await;
    }
}

in_both_modes! {
    async fn kill_cancels_the_whole_group(h: Harness, mode: Mode) {
        h.runner.start(h.spec(1, &sh("sleep 30 & sleep 30; wait")));
        h.expect_started(1).await;
        let pgid = h.pgid(1);
        h.runner.kill(1, 1);
        assert_eq!(h.finished(1).await, (Outcome::Cancelled, None));
        assert!(group_dies(pgid), "group {pgid} still alive");
        assert_eq!(h.runner.running(), 0);
    }
}

in_both_modes! {
    async fn kill_of_an_unknown_or_finished_attempt_is_a_no_op(h: Harness, mode: Mode) {
        h.runner.kill(99, 1);
        let (outcome, code, _) = h.run(&["true"]).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
        h.runner.kill(1, 1);
        h.runner.kill(1, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(h.events.try_recv().is_err(), "no second Finished");
    }
}

in_both_modes! {
    async fn start_failed_for_a_missing_executable_says_why_in_the_log(h: Harness, mode: Mode) {
        let spec = h.spec(1, &["nosuchcmd-rustci", "arg"]);
        h.runner.start(spec.clone());
        // No Started: the first event is Finished.
        let first = h.next_event().await;
        let expected = RunEvent::Finished {
            job: 1,
            attempt: 1,
            outcome: Outcome::StartFailed,
            exit_code: None,
            usage: None,
        };
        assert_eq!(first, expected);
        let log = read_log(&spec);
        assert!(
            log.starts_with("rustci: cannot start \"nosuchcmd-rustci\": No such file or directory"),
            "{log}"
        );
        assert_eq!(h.runner.running(), 0);
    }
}

in_both_modes! {
    async fn start_failed_for_an_empty_command(h: Harness, mode: Mode) {
        let (outcome, code, log) = h.run(&[]).await;
        assert_eq!((outcome, code), (Outcome::StartFailed, None));
        assert!(log.contains("empty command"), "{log}");
    }
}

in_both_modes! {
    async fn pgid_is_recorded_while_running_and_removed_when_finished(h: Harness, mode: Mode) {
        h.runner.start(h.spec(1, &["sleep", "30"]));
        h.expect_started(1).await;
        let record = pgid_record_path(&h.pid_dir(), 1, 1);
        assert!(record.exists());
        assert!(h.pgid(1) > 1);
        h.runner.kill(1, 1);
        h.finished(1).await;
        assert!(!record.exists());
    }
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
    shutdown_cancels_everything(Mode::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_everything_and_waits_for_every_finished_with_a_shim() {
    shutdown_cancels_everything(Mode::Shim).await;
}

async fn shutdown_cancels_everything(mode: Mode) {
    let mut h = Harness::new_in(mode);
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

in_both_modes! {
    async fn background_leftovers_die_when_the_main_process_exits(h: Harness, mode: Mode) {
        // The group's id, which is not sh's pid when a shim leads the group.
        let spec = h.spec(1, &sh("sleep 30 & cut -d' ' -f5 /proc/$$/stat"));
        let started = Instant::now();
        h.runner.start(spec.clone());
        assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
        assert!(started.elapsed() < Duration::from_secs(5));
        let pgid: i32 = read_log(&spec).trim().parse().unwrap();
        assert!(group_dies(pgid), "background sleep outlived its attempt");
    }
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

/// Set in the environment of the helper daemon started by the crash tests.
const CRASH_HELPER_DIR: &str = "RUSTCI_RUNNER_TEST_CRASH_HELPER_DIR";
/// Set (to anything) when the helper daemon must run its job under the shim.
const CRASH_HELPER_SHIM: &str = "RUSTCI_RUNNER_TEST_CRASH_HELPER_SHIM";
/// The crash tests' job: a foreground and a background grandchild.
const CRASH_JOB_SCRIPT: &str = "echo start; sleep 30 & sleep 30; wait";

/// Not a test on its own: a stand-in daemon, run as a child process by
/// `crash_of_the_runner_process_...`. It starts one job, says so, and waits
/// to be killed.
#[test]
fn crash_helper_daemon() {
    let Ok(dir) = std::env::var(CRASH_HELPER_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mut config = RunnerConfig::new(dir.join("pids"));
    if std::env::var_os(CRASH_HELPER_SHIM).is_some() {
        config.shim = Mode::Shim.shim();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let runner = NativeRunner::new(config, tx);
        runner.start(RunSpec {
            job: 5,
            attempt: 1,
            command: sh(CRASH_JOB_SCRIPT).iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            work_dir: dir.join("work"),
            log_path: dir.join("job.log"),
            limits: None,
            lease_file: None,
            workspace: Default::default(),
        });
        assert!(matches!(rx.recv().await, Some(RunEvent::Started { .. })));
        std::fs::write(dir.join("ready"), "").unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

/// Starts the stand-in daemon, waits until its job's group holds
/// `members` live processes, and returns the daemon and the job's pgid.
fn start_crash_helper(
    dir: &std::path::Path,
    mode: Mode,
    members: usize,
) -> (std::process::Child, i32) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "crash_helper_daemon",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_HELPER_DIR, dir)
        .stdout(std::process::Stdio::null());
    if mode == Mode::Shim {
        command.env(CRASH_HELPER_SHIM, "1");
    }
    let daemon = command.spawn().unwrap();
    let deadline = Instant::now() + EVENT_WAIT_MAX;
    while !dir.join("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "helper daemon never started its job"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let record = pgid_record_path(&dir.join("pids"), 5, 1);
    let pgid: i32 = std::fs::read_to_string(record)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    while live_group_members(pgid).len() < members {
        assert!(Instant::now() < deadline, "the job never forked");
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, pgid)
}

#[test]
fn crash_of_the_runner_process_kills_the_job_and_reap_leftovers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // sh and its two sleeps.
    let (mut daemon, pgid) = start_crash_helper(dir.path(), Mode::Direct, 3);
    let pid_dir = dir.path().join("pids");
    let record = pgid_record_path(&pid_dir, 5, 1);

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
fn crash_of_the_runner_process_with_a_shim_kills_the_whole_group_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The shim, sh and its two sleeps.
    let (mut daemon, pgid) = start_crash_helper(dir.path(), Mode::Shim, 4);
    let pid_dir = dir.path().join("pids");

    daemon.kill().unwrap(); // SIGKILL: no cleanup runs in the daemon.
    daemon.wait().unwrap();

    // No reap_leftovers needed: the shim's SIGTERM handler kills the group.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let alive = live_group_members(pgid);
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{alive:?} of group {pgid} outlived the runner"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("job.log")).unwrap(),
        "start\n"
    );
    // The record is still there (the daemon died); the next start drops it.
    assert_eq!(NativeRunner::reap_leftovers(&pid_dir), 0);
    assert!(!pgid_record_path(&pid_dir, 5, 1).exists());
}

/// `rustci __shim -- command...`, in its own process group (the shim makes
/// sure of that itself; this is belt and braces for the test process).
fn shim_command(command: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut shim = Command::new(SHIM_EXE);
    shim.arg(SHIM_ARG).arg("--").args(command).process_group(0);
    shim
}

#[test]
fn shim_forwards_the_commands_exit_code_and_death_by_signal() {
    use std::os::unix::process::ExitStatusExt;
    let status = shim_command(&sh("exit 7")).status().unwrap();
    assert_eq!(status.code(), Some(7));
    let status = shim_command(&["true"]).status().unwrap();
    assert_eq!(status.code(), Some(0));
    let status = shim_command(&sh("kill -TERM $$")).status().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let status = shim_command(&sh("kill -SEGV $$")).status().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSEGV));
}

#[test]
fn shim_that_cannot_start_the_command_says_why_and_exits_with_its_code() {
    let output = shim_command(&["nosuchcmd-rustci", "arg"]).output().unwrap();
    assert_eq!(output.status.code(), Some(SHIM_START_FAILED_EXIT));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with("rustci: cannot start \"nosuchcmd-rustci\": No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn shim_orphaned_before_it_could_catch_sigterm_kills_its_group_without_running_the_command() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let script = format!("touch {}", marker.display());
    // Pid 1 is not the shim's parent: as if the runner had died already.
    let status = shim_command(&sh(&script))
        .env("RUSTCI_SHIM_PARENT", "1")
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!marker.exists(), "the command ran");
}

#[tokio::test]
async fn exec_with_a_shim_the_shim_leads_the_group_and_the_command_is_its_child() {
    // As the daemons do at start: what this test process inherited (from
    // whoever ran the suite) is not passed on to jobs started without a shim.
    rustci::procenv::cloexec_inherited_fds();
    let mut h = Harness::new_in(Mode::Shim);
    let script = "echo $PPID; cut -d' ' -f5 /proc/$$/stat; readlink /proc/$PPID/exe; \
                  cd /proc/$$/fd && echo *";
    let (_, code, log) = h.run(&sh(script)).await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert_eq!(
        lines[0], lines[1],
        "the shim (sh's parent) must lead the group"
    );
    assert_ne!(lines[1], unsafe { libc::getpgrp() }.to_string());
    let shim = std::fs::canonicalize(SHIM_EXE).unwrap();
    assert_eq!(lines[2], shim.display().to_string());
    // Same descriptors as without a shim: its status pipe does not leak.
    let mut direct = Harness::new_in(Mode::Direct);
    let (_, _, direct_log) = direct.run(&sh("cd /proc/$$/fd && echo *")).await;
    assert_eq!(format!("{}\n", lines[3]), direct_log);
}

in_both_modes! {
    async fn exit_code_equal_to_the_shims_start_failure_code_is_a_plain_exit(
        h: Harness,
        mode: Mode
    ) {
        let (outcome, code, _) = h.run(&sh(&format!("exit {SHIM_START_FAILED_EXIT}"))).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(SHIM_START_FAILED_EXIT)));
    }

    async fn start_failed_for_a_file_that_is_not_executable(h: Harness, mode: Mode) {
        let spec = h.spec(1, &["./script"]);
        std::fs::create_dir_all(&spec.work_dir).unwrap();
        std::fs::write(spec.work_dir.join("script"), "#!/bin/sh\necho ran\n").unwrap();
        h.runner.start(spec.clone());
        // Also with a shim: no Started, the runner checks before spawning.
        let first = h.next_event().await;
        let expected = RunEvent::Finished {
            job: 1,
            attempt: 1,
            outcome: Outcome::StartFailed,
            exit_code: None,
            usage: None,
        };
        assert_eq!(first, expected);
        let log = read_log(&spec);
        assert!(log.starts_with("rustci: cannot start \"./script\": Permission denied"), "{log}");
    }

    async fn start_failed_when_the_exec_itself_fails(h: Harness, mode: Mode) {
        // Executable, but its interpreter does not exist: only exec can tell.
        let spec = h.spec(1, &["./script"]);
        std::fs::create_dir_all(&spec.work_dir).unwrap();
        let script = spec.work_dir.join("script");
        std::fs::write(&script, "#!/nonexistent/rustci-interpreter\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        h.runner.start(spec.clone());
        // With a shim, a Started comes first (see the runner's known limits).
        assert_eq!(h.finished(1).await, (Outcome::StartFailed, None));
        let log = read_log(&spec);
        let expected = "rustci: cannot start \"./script\": No such file or directory (os error 2)\n";
        assert_eq!(log, expected);
        assert_eq!(h.runner.running(), 0);
    }
}

#[test]
fn machine_capacity_reports_real_cpus_and_memory() {
    let (cpu_millis, memory_mb) = machine_capacity();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(cpu_millis, cpus * 1000);
    assert!(memory_mb > 64, "{memory_mb} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_kills_its_job_when_the_agents_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let lease = dir.path().join("lease");
    rustci::runner::write_lease(&lease, rustci::runner::boot_clock_ms() + 60_000).unwrap();
    let config = RunnerConfig {
        log_cap_bytes: rustci::runner::LOG_CAP_BYTES_DEFAULT,
        pid_dir: dir.path().join("pids"),
        shim: Some(PathBuf::from(SHIM_EXE)),
        lease_file: Some(lease.clone()),
        cgroups: None,
        disk_reserve_bytes: 0,
        keep_failed_workspaces: Duration::from_secs(3600),
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    let runner = NativeRunner::new(config, tx);
    let spec = RunSpec {
        job: 1,
        attempt: 1,
        command: vec!["sh".into(), "-c".into(), "sleep 30 & sleep 30; wait".into()],
        env: Default::default(),
        timeout: rustci::runner::TIMEOUT_MAX,
        work_dir: dir.path().join("work"),
        log_path: dir.path().join("out.log"),
        limits: None,
        lease_file: None,
        workspace: Default::default(),
    };
    runner.start(spec.clone());
    assert!(matches!(
        events.recv().await,
        Some(RunEvent::Started { .. })
    ));
    // Renewed: it keeps running.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runner.running(), 1);
    // The agent stops renewing; the deadline passes: the shim kills the group.
    let lapsed_at = std::time::Instant::now();
    rustci::runner::write_lease(&lease, rustci::runner::boot_clock_ms()).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the job ends soon after its lease")
        .unwrap();
    assert!(matches!(ev, RunEvent::Finished { .. }), "{ev:?}");
    assert!(lapsed_at.elapsed() < Duration::from_secs(2));
    assert!(
        read_log(&spec).contains("lease lapsed"),
        "{}",
        read_log(&spec)
    );
}

/// Without cgroups the shim measures the command's process tree: its peak
/// memory and cpu time reach the Finished event. (Without a shim nothing
/// measures: no usage rather than a made-up one.)
#[tokio::test]
async fn the_shim_measures_what_the_command_used() {
    let mut h = Harness::new_in(Mode::Shim);
    // 80 MiB touched, then at least 300 ms of cpu.
    let script = "x = bytearray(80 * 1024 * 1024)\n\
                  import time\n\
                  t = time.process_time()\n\
                  while time.process_time() - t < 0.3: pass\n";
    h.runner.start(h.spec(1, &["python3", "-c", script]));
    let usage = loop {
        match h.next_event().await {
            RunEvent::Started { .. } => continue,
            RunEvent::Finished { outcome, usage, .. } => {
                assert_eq!(outcome, Outcome::Exited);
                break usage;
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    let usage = usage.expect("the shim reports usage");
    assert!(usage.peak_memory_mb >= 80, "{usage:?}");
    assert!(usage.peak_memory_mb < 1024, "{usage:?}");
    assert!(usage.cpu_ms >= 300, "{usage:?}");
    let mut direct = Harness::new_in(Mode::Direct);
    direct.runner.start(direct.spec(1, &["true"]));
    loop {
        if let RunEvent::Finished { usage, .. } = direct.next_event().await {
            assert_eq!(usage, None);
            break;
        }
    }
}

/// Without cgroups, the shim is the job's child subreaper: a process that
/// leaves the job's group and session (`setsid`) and loses its parent is
/// still found and killed by cancel, by time-out, and when the job ends.
mod escapees_without_cgroups {
    use super::*;

    /// Starts a job whose `setsid` child writes its pid to a file in the
    /// harness's dir and sleeps; returns that pid once it runs.
    async fn start_escapee(h: &mut Harness, job: u64, then: &str, timeout: Duration) -> i32 {
        let marks = h.dir.path().join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        let script =
            format!(r#"setsid sh -c 'echo $$ > "$D/pid-$RUSTCI_JOB_ID"; exec sleep 300' & {then}"#);
        let mut spec = h.spec(job, &sh(&script));
        spec.env.insert("D".into(), marks.to_str().unwrap().into());
        spec.timeout = timeout;
        h.runner.start(spec);
        let file = marks.join(format!("pid-{job}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // The escapee is in a session (and group) of its own.
                assert_ne!(unsafe { libc::getsid(pid) }, unsafe { libc::getsid(0) });
                return pid;
            }
            assert!(Instant::now() < deadline, "the escapee never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    fn dies(pid: i32) -> bool {
        let deadline = Instant::now() + GROUP_DEATH_WAIT_MAX;
        while Instant::now() < deadline {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[tokio::test]
    async fn cancel_kills_a_setsid_escapee() {
        let mut h = Harness::new_in(Mode::Shim);
        let pid = start_escapee(&mut h, 1, "sleep 300", Duration::from_secs(60)).await;
        assert!(alive(pid));
        h.runner.kill(1, 1);
        assert_eq!(h.finished(1).await, (Outcome::Cancelled, None));
        assert!(dies(pid), "escapee {pid} survived the cancel");
    }

    #[tokio::test]
    async fn timeout_kills_a_setsid_escapee() {
        let mut h = Harness::new_in(Mode::Shim);
        let pid = start_escapee(&mut h, 1, "sleep 300", Duration::from_secs(2)).await;
        assert_eq!(h.finished(1).await, (Outcome::TimedOut, None));
        assert!(dies(pid), "escapee {pid} survived the time-out");
    }

    #[tokio::test]
    async fn the_end_of_the_job_kills_a_setsid_escapee() {
        let mut h = Harness::new_in(Mode::Shim);
        // The job's shell waits until the escapee runs, then exits 0.
        let pid = start_escapee(
            &mut h,
            1,
            r#"while [ ! -s "$D/pid-$RUSTCI_JOB_ID" ]; do sleep 0.05; done; exit 0"#,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
        assert!(dies(pid), "escapee {pid} outlived its job");
    }
}

/// Output stops while the disk has no more free space than the reserve,
/// and the log says so: cut output is never taken for complete.
#[tokio::test]
async fn output_stops_at_the_disk_reserve_and_says_it_is_incomplete() {
    let mut h = Harness::configured(Mode::Shim, |c| c.disk_reserve_bytes = u64::MAX);
    let (outcome, code, log) = h.run(&["echo", "hello"]).await;
    assert_eq!((outcome, code), (Outcome::Exited, Some(0)));
    assert_eq!(log, rustci_net::disk::OUTPUT_INCOMPLETE_MARKER);
    // With room, the same output is all there.
    let mut h = Harness::configured(Mode::Shim, |c| c.disk_reserve_bytes = 1);
    let (_, _, log) = h.run(&["echo", "hello"]).await;
    assert_eq!(log, "hello\n");
}

/// A succeeded attempt's work dir is removed when it ends; a failed one's
/// stays until the sweeper finds it older than the keep time.
#[tokio::test]
async fn work_dirs_go_when_the_attempt_succeeds_and_failed_ones_after_the_keep_time() {
    let mut h = Harness::configured(Mode::Shim, |c| {
        c.keep_failed_workspaces = Duration::from_millis(300)
    });
    // Work dirs named as the drivers name them: `<root>/<job>-<attempt>`.
    let root = h.dir.path().join("workspaces");
    let named = |mut spec: RunSpec| {
        spec.work_dir = root.join(format!("{}-{}", spec.job, spec.attempt));
        spec
    };
    let ok = named(h.spec(1, &sh("echo data > file")));
    h.runner.start(ok.clone());
    assert_eq!(h.finished(1).await, (Outcome::Exited, Some(0)));
    assert!(
        !ok.work_dir.exists(),
        "a succeeded attempt's work dir is removed"
    );
    let failed = named(h.spec(2, &sh("echo data > file; exit 3")));
    h.runner.start(failed.clone());
    assert_eq!(h.finished(2).await, (Outcome::Exited, Some(3)));
    assert!(
        failed.work_dir.join("file").exists(),
        "kept to be looked at"
    );
    let sweeper = h.runner.workspace_sweeper();
    // A running attempt's work dir is never swept, however old.
    let running = named(h.spec(3, &["sleep", "30"]));
    h.runner.start(running.clone());
    h.expect_started(3).await;
    assert_eq!(sweeper.sweep(&root).await, 0, "too young to go");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sweeper.sweep(&root).await, 1);
    assert!(!failed.work_dir.exists());
    assert!(running.work_dir.exists());
    h.runner.kill(3, 1);
}
