//! Where a job runs and what code it finds there, specified by example: the
//! runner's `workdir` and `checkout` (both with and without the shim), and
//! the same through a real `rustci dev`: the API's validation, a checkout
//! at a branch, a tag and a commit, a failed checkout, one stuck until its
//! time-out or a cancel, a missing workdir, and how long failed work dirs
//! are kept; then through a real `rustci server` and `rustci agent`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rustci::runner::{NativeRunner, RunEvent, RunSpec, RunnerConfig};
use rustci_core::model::{Checkout, Outcome, Workspace};
use tokio::sync::mpsc;

/// Upper bound on any single wait for a runner event.
const EVENT_WAIT_MAX: Duration = Duration::from_secs(30);
/// Upper bound on a job of the end-to-end tests reaching its end.
const JOB_WAIT_MAX: Duration = Duration::from_secs(60);

/// A git repository made for a test: `main` with two commits (`v1` tags
/// the first), and a branch `feature/x` with a third. `version` says
/// which commit it is.
struct Repo {
    path: PathBuf,
    first: String,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=RustCI test",
            "-c",
            "user.email=test@rustci.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git is installed (the checkout tests need it)");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Repo {
    fn new(parent: &Path) -> Repo {
        let path = parent.join("repo");
        std::fs::create_dir_all(&path).unwrap();
        git(&path, &["init", "--quiet"]);
        let commit = |version: &str| {
            std::fs::write(path.join("version"), version).unwrap();
            git(&path, &["add", "version"]);
            git(&path, &["commit", "--quiet", "-m", version]);
            git(&path, &["rev-parse", "HEAD"])
        };
        let first = commit("one");
        git(&path, &["tag", "v1"]);
        commit("two");
        git(&path, &["checkout", "--quiet", "-b", "feature/x"]);
        commit("three");
        git(&path, &["checkout", "--quiet", "main"]);
        Repo { path, first }
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn at(&self, repo: &str, git_ref: &str) -> Workspace {
        Workspace::Checkout(Checkout {
            repo: repo.to_string(),
            git_ref: git_ref.to_string(),
        })
    }
}

/// A runner with its event stream in a private temp dir, with or without
/// the shim (the behaviour must not depend on it).
struct Harness {
    runner: NativeRunner,
    events: mpsc::UnboundedReceiver<RunEvent>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new(shim: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunnerConfig::new(dir.path().join("pids"));
        config.disk_reserve_bytes = 0;
        if shim {
            config.shim = Some(PathBuf::from(BIN));
        }
        let (tx, events) = mpsc::unbounded_channel();
        Harness {
            runner: NativeRunner::new(config, tx),
            events,
            dir,
        }
    }

    fn spec(&self, job: u64, command: &[&str], workspace: Workspace) -> RunSpec {
        let work_dir = match &workspace {
            Workspace::Dir(d) => PathBuf::from(d),
            _ => self.dir.path().join(format!("work/{job}-1")),
        };
        RunSpec {
            job,
            attempt: 1,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(120),
            work_dir,
            workspace,
            log_path: self.dir.path().join(format!("logs/{job}/1.log")),
            limits: None,
            lease_file: None,
        }
    }

    async fn next_event(&mut self) -> RunEvent {
        tokio::time::timeout(EVENT_WAIT_MAX, self.events.recv())
            .await
            .expect("no run event in time")
            .expect("event channel closed")
    }

    /// Runs `spec` to its end: (whether `Started` came, outcome, exit
    /// code, log).
    async fn run(&mut self, spec: &RunSpec) -> (bool, Outcome, Option<i32>, String) {
        self.runner.start(spec.clone());
        let mut started = false;
        loop {
            match self.next_event().await {
                RunEvent::Started { job, .. } if job == spec.job => started = true,
                RunEvent::Finished {
                    job,
                    outcome,
                    exit_code,
                    ..
                } if job == spec.job => {
                    let log = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
                    return (started, outcome, exit_code, log);
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
}

/// Runs `body` with a runner without the shim, then with it.
macro_rules! both_modes {
    ($name:ident, $body:expr) => {
        #[tokio::test]
        async fn $name() {
            for shim in [false, true] {
                let h = Harness::new(shim);
                ($body)(h, shim).await;
            }
        }
    };
}

both_modes!(
    checkout_puts_the_repository_at_a_branch_tag_or_commit_in_the_work_dir_first,
    |mut h: Harness, shim: bool| async move {
        let repo = Repo::new(h.dir.path());
        let path = repo.path.display().to_string();
        let cases = [
            (path.clone(), "HEAD".to_string(), "two"),
            (path.clone(), "main".to_string(), "two"),
            (repo.url(), "v1".to_string(), "one"),
            (repo.url(), "feature/x".to_string(), "three"),
            (path.clone(), repo.first.clone(), "one"),
        ];
        for (job, (url, git_ref, want)) in (1..).zip(cases) {
            let spec = h.spec(job, &["cat", "version"], repo.at(&url, &git_ref));
            let (started, outcome, code, log) = h.run(&spec).await;
            let case = format!("{url} at {git_ref} (shim: {shim}): {log}");
            assert!(started, "{case}");
            assert_eq!((outcome, code), (Outcome::Exited, Some(0)), "{case}");
            assert!(
                log.starts_with(&format!("rustci: checkout of {url} at {git_ref}\n")),
                "the log opens with what is checked out: {case}"
            );
            assert!(log.contains("rustci: checked out "), "{case}");
            assert!(log.ends_with(want), "the command saw the checkout: {case}");
            assert!(
                !spec.work_dir.exists(),
                "a succeeded attempt's checkout is removed: {case}"
            );
        }
        // A relative program is found in the checkout.
        std::fs::write(
            repo.path.join("build.sh"),
            "echo built from $(cat version)\n",
        )
        .unwrap();
        git(&repo.path, &["add", "build.sh"]);
        git(&repo.path, &["commit", "--quiet", "-m", "build script"]);
        let spec = h.spec(9, &["sh", "./build.sh"], repo.at(&path, "main"));
        let (_, outcome, code, log) = h.run(&spec).await;
        assert_eq!((outcome, code), (Outcome::Exited, Some(0)), "{log}");
        assert!(log.ends_with("built from two\n"), "{log}");
    }
);

both_modes!(
    a_failed_checkout_ends_the_attempt_start_failed_and_never_runs_the_command,
    |mut h: Harness, shim: bool| async move {
        let repo = Repo::new(h.dir.path());
        let marker = h.dir.path().join("the-command-ran");
        let touch = ["touch", marker.to_str().unwrap()];
        let path = repo.path.display().to_string();
        let missing = h.dir.path().join("no-such-repo").display().to_string();
        for (job, (url, git_ref, git_says)) in (1..).zip([
            (path.as_str(), "no-such-branch", "no-such-branch"),
            (missing.as_str(), "HEAD", "no-such-repo"),
        ]) {
            let spec = h.spec(job, &touch, repo.at(url, git_ref));
            let (_, outcome, code, log) = h.run(&spec).await;
            let case = format!("{url} at {git_ref} (shim: {shim}): {log}");
            assert_eq!((outcome, code), (Outcome::StartFailed, None), "{case}");
            assert!(
                log.contains(&format!(
                    "rustci: the checkout of {url} at {git_ref} failed: `git fetch` exited with 128; the command was not run\n"
                )),
                "{case}"
            );
            assert!(log.contains(git_says), "git's own words are there: {case}");
            assert!(!marker.exists(), "{case}");
            assert!(spec.work_dir.exists(), "kept to be looked at: {case}");
        }
        // No git on the job's PATH: said so.
        let mut spec = h.spec(3, &touch, repo.at(&path, "main"));
        spec.env.insert("PATH".into(), "/nonexistent".into());
        let (_, outcome, _, log) = h.run(&spec).await;
        assert_eq!(outcome, Outcome::StartFailed, "{log}");
        assert!(
            log.contains("git could not be started: is it installed and on the node's PATH?"),
            "{log}"
        );
        assert!(!marker.exists());
    }
);

/// A `git` that hangs: what a stalled fetch looks like to the runner.
fn hanging_git(dir: &Path) -> String {
    let bin = dir.join("hanging-git");
    std::fs::create_dir_all(&bin).unwrap();
    let git = bin.join("git");
    std::fs::write(&git, "#!/bin/sh\nexec sleep 300\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&git, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:/usr/bin:/bin", bin.display())
}

both_modes!(
    a_checkout_is_part_of_the_attempt_its_time_out_and_cancel_stop_it,
    |mut h: Harness, shim: bool| async move {
        let path = hanging_git(h.dir.path());
        let workspace = Workspace::Checkout(Checkout {
            repo: "/anywhere".into(),
            git_ref: "main".into(),
        });
        // The attempt's deadline covers the checkout.
        let mut spec = h.spec(1, &["true"], workspace.clone());
        spec.env.insert("PATH".into(), path.clone());
        spec.timeout = Duration::from_millis(500);
        let (started, outcome, _, log) = h.run(&spec).await;
        assert!(started, "shim: {shim}");
        assert_eq!(outcome, Outcome::TimedOut, "shim: {shim}: {log}");
        // A cancel stops it.
        let mut spec = h.spec(2, &["true"], workspace);
        spec.env.insert("PATH".into(), path);
        h.runner.start(spec.clone());
        assert!(matches!(
            h.next_event().await,
            RunEvent::Started { job: 2, .. }
        ));
        h.runner.kill(2, 1);
        match h.next_event().await {
            RunEvent::Finished { outcome, .. } => {
                assert_eq!(outcome, Outcome::Cancelled, "shim: {shim}")
            }
            other => panic!("unexpected event {other:?}"),
        }
        assert_eq!(h.runner.running(), 0);
    }
);

both_modes!(
    workdir_runs_the_command_in_the_nodes_directory_and_never_removes_it,
    |mut h: Harness, shim: bool| async move {
        let project = h.dir.path().join("project");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(project.join("here"), "in the project\n").unwrap();
        let dir = Workspace::Dir(project.display().to_string());
        let spec = h.spec(1, &["sh", "-c", "cat here; echo made > made"], dir.clone());
        let (started, outcome, code, log) = h.run(&spec).await;
        assert!(started);
        assert_eq!((outcome, code), (Outcome::Exited, Some(0)), "shim: {shim}");
        assert_eq!(log, "in the project\n");
        assert!(project.join("here").exists(), "a succeeded job leaves it");
        assert!(project.join("made").exists());
        let spec = h.spec(2, &["sh", "-c", "exit 3"], dir);
        let (_, _, code, _) = h.run(&spec).await;
        assert_eq!(code, Some(3));
        let sweeper = h.runner.workspace_sweeper();
        sweeper.sweep(&project).await;
        assert!(project.join("here").exists(), "nor does a failed one");

        // A workdir missing on the node: the attempt fails to start, says
        // why, and nothing is created.
        let missing = h.dir.path().join("not-on-this-node");
        let spec = h.spec(3, &["true"], Workspace::Dir(missing.display().to_string()));
        let (started, outcome, code, log) = h.run(&spec).await;
        assert!(!started, "nothing spawned");
        assert_eq!((outcome, code), (Outcome::StartFailed, None));
        assert_eq!(
            log,
            format!(
                "rustci: cannot start: workdir {} does not exist on this node\n",
                missing.display()
            )
        );
        assert!(!missing.exists());
        // A file is not a directory.
        let file = project.join("here");
        let spec = h.spec(4, &["true"], Workspace::Dir(file.display().to_string()));
        let (_, outcome, _, log) = h.run(&spec).await;
        assert_eq!(outcome, Outcome::StartFailed);
        assert!(log.contains("is not a directory"), "{log}");
    }
);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn logs(dev: &Dev, id: u64) -> String {
    let (status, text) = http(&dev.addr, "GET", &format!("/v1/jobs/{id}/logs"), None);
    assert_eq!(status, 200, "{text}");
    text
}

#[test]
fn the_api_refuses_a_bad_workdir_or_checkout_with_a_400_that_says_why_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    // The built-in node registers itself (a write) just after start-up:
    // only then is the log quiet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dev.get_json("/v1/nodes")["nodes"]
        .as_array()
        .is_none_or(|n| n.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the local node never registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = dev.get_json("/v1/cluster");
    let cases = [
        (
            r#"{"command": ["true"], "workdir": "relative/dir"}"#,
            "invalid_request",
            "workdir \"relative/dir\" must be an absolute path",
        ),
        (
            r#"{"command": ["true"], "workdir": "/a\u0000b"}"#,
            "invalid_request",
            "workdir contains a NUL byte",
        ),
        (
            r#"{"command": ["true"], "workdir": "/srv", "checkout": {"repo": "/r"}}"#,
            "invalid_request",
            "workdir and checkout cannot both be set",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "../sibling"}}"#,
            "invalid_request",
            "checkout.repo \"../sibling\" must be a URL",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "--upload-pack=touch /tmp/x"}}"#,
            "invalid_request",
            "not starting with '-'",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "/r", "ref": "--orphan"}}"#,
            "invalid_request",
            "checkout.ref \"--orphan\" is not a branch, tag or commit name",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "/r", "ref": "main..evil"}}"#,
            "invalid_request",
            "checkout.ref \"main..evil\"",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "/r", "ref": ""}}"#,
            "invalid_request",
            "checkout.ref \"\"",
        ),
        (
            r#"{"command": ["true"], "checkout": {"ref": "main"}}"#,
            "invalid_json",
            "repo",
        ),
        (
            r#"{"command": ["true"], "checkout": {"repo": "/r", "branch": "main"}}"#,
            "invalid_json",
            "branch",
        ),
        (
            r#"{"command": ["true"], "checkout": "/r"}"#,
            "invalid_json",
            "expected a checkout object {\"repo\": REPO, \"ref\": REF}",
        ),
    ];
    for (body, code, says) in cases {
        let (status, text) = http(&dev.addr, "POST", "/v1/jobs", Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], code, "{body}: {text}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let after = dev.get_json("/v1/cluster");
    assert_eq!(
        before["commit_index"], after["commit_index"],
        "nothing was written"
    );
    assert_eq!(before["state_digest"], after["state_digest"]);
    // The CLI: the same refusal in one line, and flags that cannot go together.
    let out = dev.cli(&["submit", "--workdir", "relative", "--", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("must be an absolute path"), "{out:?}");
    let out = dev.cli(&["submit", "--ref", "main", "--", "true"]);
    assert!(!out.status.success(), "--ref needs --checkout");
    let out = dev.cli(&["submit", "--workdir", "/", "--checkout", "/r", "--", "true"]);
    assert!(!out.status.success(), "--workdir or --checkout, not both");
    assert_eq!(dev.get_json("/v1/jobs")["jobs"], serde_json::json!([]));
}

#[test]
fn dev_runs_a_checkout_at_a_ref_and_a_failed_one_fails_the_job_saying_why_without_retry_storms() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::new(dir.path());
    let dev = Dev::start(&dir.path().join("data"), &[]);
    // The CLI, at a tag, over file://.
    let url = repo.url();
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--checkout",
        &url,
        "--ref",
        "v1",
        "--",
        "cat",
        "version",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains(&format!("rustci: checkout of {url} at v1\n")),
        "{text}"
    );
    assert!(text.ends_with("one"), "{text}");
    let id: u64 = text.lines().next().unwrap().parse().unwrap();
    let job = dev.get_json(&format!("/v1/jobs/{id}"));
    assert_eq!(
        job["checkout"],
        serde_json::json!({"repo": url, "ref": "v1"})
    );
    assert!(job.get("workdir").is_none(), "{job}");
    assert!(
        !dev.data_dir.join(format!("work/{id}-1")).exists(),
        "a succeeded attempt's checkout is removed"
    );
    // `ref` defaults to HEAD, through a job file.
    let file = dir.path().join("job.toml");
    std::fs::write(
        &file,
        format!(
            "command = [\"cat\", \"version\"]\ncheckout = {{ repo = \"{}\" }}\n",
            repo.path.display()
        ),
    )
    .unwrap();
    let out = dev.cli(&["submit", "--wait", "-f", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).ends_with("two"), "{out:?}");
    let out = dev.cli(&["job", "get", stdout(&out).lines().next().unwrap()]);
    assert!(
        stdout(&out).contains(&format!("checkout:     {} at HEAD\n", repo.path.display())),
        "{out:?}"
    );

    // A ref the repository does not have: only the node can tell. The job
    // fails as one that could not start, after its retries and no more,
    // and its output says why.
    let submitted = dev.submit_json(&serde_json::json!({
        "command": ["true"],
        "checkout": {"repo": url, "ref": "no-such-branch"},
        "max_retries": 1,
    }));
    let id = submitted["id"].as_u64().unwrap();
    let job = dev.wait_job(id, JOB_WAIT_MAX, terminal);
    assert_eq!(job["state"], "failed", "{job}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "one try and its one retry: {job}");
    for a in attempts {
        assert_eq!(a["outcome"], "start_failed", "{job}");
    }
    let text = logs(&dev, id);
    assert!(
        text.contains(&format!(
            "rustci: the checkout of {url} at no-such-branch failed: `git fetch` exited with 128; the command was not run"
        )),
        "{text}"
    );
    assert!(
        dev.data_dir.join(format!("work/{id}-2")).exists(),
        "a failed attempt's work dir is kept to be looked at"
    );
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--checkout",
        &url,
        "--ref",
        "no-such-branch",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(127), "could not start: {out:?}");
    assert!(stdout(&out).contains("no-such-branch failed"), "{out:?}");
}

#[test]
fn dev_times_out_and_cancels_a_job_stuck_in_its_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let path = hanging_git(dir.path());
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let mark = unique_mark();
    let stuck = |timeout_secs: u64| {
        dev.submit_json(&serde_json::json!({
            "command": ["true"],
            "checkout": {"repo": "/anywhere", "ref": "main"},
            "env": {"PATH": path, "TEST_MARK": mark},
            "timeout_secs": timeout_secs,
        }))["id"]
            .as_u64()
            .unwrap()
    };
    // The job's time-out (the agent's, from the first step's start) covers
    // its checkout.
    let id = stuck(1);
    let job = dev.wait_job(id, JOB_WAIT_MAX, terminal);
    assert_eq!(job["attempts"][0]["state"], "timed_out", "{job}");
    assert!(logs(&dev, id).starts_with("rustci: checkout of /anywhere at main\n"));
    // A cancel stops it.
    let id = stuck(600);
    dev.wait_job(id, JOB_WAIT_MAX, |j| j["state"] == "running");
    let (status, text) = http(&dev.addr, "POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(status, 200, "{text}");
    let job = dev.wait_job(id, JOB_WAIT_MAX, |j| {
        j["attempts"][0]["state"] == "cancelled"
    });
    assert_eq!(job["state"], "cancelled");
    let deadline = Instant::now() + JOB_WAIT_MAX;
    while !processes_marked(&mark).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stuck git processes are gone"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_runs_a_job_in_its_workdir_and_a_missing_one_fails_to_start_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("here"), "in the project\n").unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let workdir = project.to_str().unwrap();
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--workdir",
        workdir,
        "--",
        "sh",
        "-c",
        "cat here; pwd",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let canonical = std::fs::canonicalize(&project).unwrap();
    assert!(
        stdout(&out).ends_with(&format!("in the project\n{}\n", canonical.display())),
        "{out:?}"
    );
    assert!(project.join("here").exists(), "the node's directory stays");
    let id: u64 = stdout(&out).lines().next().unwrap().parse().unwrap();
    assert_eq!(dev.get_json(&format!("/v1/jobs/{id}"))["workdir"], workdir);

    let missing = dir.path().join("elsewhere");
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--workdir",
        missing.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(
        stdout(&out).contains(&format!(
            "rustci: cannot start: workdir {} does not exist on this node",
            missing.display()
        )),
        "{out:?}"
    );
    assert!(stderr(&out).contains("could not be started"), "{out:?}");
    assert!(!missing.exists(), "never created");
}

#[test]
fn failed_work_dirs_stay_for_keep_failed_workspaces_secs_then_go_and_succeeded_ones_go_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(
        &dir.path().join("data"),
        &["--keep-failed-workspaces-secs", "2"],
    );
    let work = |id: u64| dev.data_dir.join(format!("work/{id}-1"));
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo kept > file; exit 1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let failed: u64 = stdout(&out).lines().next().unwrap().parse().unwrap();
    let out = dev.cli(&["submit", "--wait", "--", "sh", "-c", "echo gone > file"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let succeeded: u64 = stdout(&out).lines().next().unwrap().parse().unwrap();
    assert!(
        !work(succeeded).exists(),
        "a succeeded attempt's work dir goes at once"
    );
    // The failed one was there with its file (kept at least until now,
    // unless this machine took longer than the keep time to get here).
    // Swept within a second or so of its keep time; 30 s is for slow
    // machines (the sweep every minute of long keep times would miss it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while work(failed).exists() {
        assert!(
            Instant::now() < deadline,
            "the failed attempt's work dir was never swept"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // With the default keep time (an hour) it stays.
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let out = dev.cli(&[
        "submit",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo kept > file; exit 1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let failed: u64 = stdout(&out).lines().next().unwrap().parse().unwrap();
    let file = dev.data_dir.join(format!("work/{failed}-1/file"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept\n");
    std::thread::sleep(Duration::from_secs(3));
    assert!(file.exists(), "kept to be looked at");
}

/// A `rustci server` or `rustci agent` child process, killed when dropped.
struct Daemon(std::process::Child);

impl Daemon {
    fn spawn(args: &[&str], log: &Path) -> Daemon {
        let child = Command::new(BIN)
            .args(args)
            .env_remove("RUSTCI_JOIN_TOKEN")
            .env_remove("RUSTCI_SERVER")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + JOB_WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_remote_agent_checks_out_runs_in_workdirs_and_keeps_failed_work_dirs_for_its_keep_time() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::new(dir.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let _server = Daemon::spawn(
        &[
            "server",
            "--listen",
            &addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--join-token",
            "t",
        ],
        &dir.path().join("server.log"),
    );
    wait_until("the server is ready", || {
        http(&addr, "GET", "/readyz", None).0 == 200
    });
    let work = dir.path().join("agent");
    let _agent = Daemon::spawn(
        &[
            "agent",
            "--server",
            &addr,
            "--name",
            "w1",
            "--work-dir",
            work.to_str().unwrap(),
            "--join-token",
            "t",
            "--keep-failed-workspaces-secs",
            "2",
        ],
        &dir.path().join("agent.log"),
    );
    wait_until("the agent joined", || {
        let (_, body) = http(&addr, "GET", "/v1/nodes", None);
        body.contains("\"ready\"")
    });
    let submit = |body: serde_json::Value| -> u64 {
        let (status, text) = http(&addr, "POST", "/v1/jobs", Some(&body.to_string()));
        assert_eq!(status, 201, "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let ended = |id: u64| -> serde_json::Value {
        let mut job = serde_json::Value::Null;
        wait_until("the job ended", || {
            let (_, text) = http(&addr, "GET", &format!("/v1/jobs/{id}"), None);
            job = serde_json::from_str(&text).unwrap();
            terminal(&job)
        });
        job
    };
    let logs = |id: u64| http(&addr, "GET", &format!("/v1/jobs/{id}/logs"), None).1;

    let id = submit(serde_json::json!({
        "command": ["cat", "version"],
        "checkout": {"repo": repo.url(), "ref": "feature/x"},
    }));
    assert_eq!(ended(id)["state"], "succeeded", "{}", logs(id));
    let text = logs(id);
    assert!(
        text.starts_with(&format!(
            "rustci: checkout of {} at feature/x\n",
            repo.url()
        )),
        "{text}"
    );
    assert!(text.ends_with("three"), "{text}");

    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let id = submit(serde_json::json!({
        "command": ["sh", "-c", "echo here > made"],
        "workdir": project.to_str().unwrap(),
    }));
    assert_eq!(ended(id)["state"], "succeeded");
    assert!(project.join("made").exists());

    let missing = dir.path().join("missing");
    let id = submit(serde_json::json!({
        "command": ["true"],
        "workdir": missing.to_str().unwrap(),
    }));
    let job = ended(id);
    assert_eq!(job["attempts"][0]["outcome"], "start_failed", "{job}");
    assert!(
        logs(id).contains("does not exist on this node"),
        "{}",
        logs(id)
    );

    // A failed attempt's work dir on the agent goes after its keep time.
    let id = submit(serde_json::json!({"command": ["sh", "-c", "pwd; exit 1"]}));
    assert_eq!(ended(id)["state"], "failed");
    let kept = std::fs::canonicalize(&work)
        .unwrap()
        .join(format!("work/{id}-1"));
    assert_eq!(logs(id), format!("{}\n", kept.display()), "where it ran");
    let deadline = Instant::now() + Duration::from_secs(30);
    while kept.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never swept {}",
            kept.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
