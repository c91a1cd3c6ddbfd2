//! Operating the daemons: the config file (`--config`), the token files,
//! the JSON logs, the shell completions and the systemd units in docs/,
//! each tried on real processes as an operator would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A daemon process killed (SIGKILL) when dropped, its stderr in a file.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(args: &[&str], log: &Path) -> Daemon {
        Self::spawn_with_env(args, log, &[])
    }

    fn spawn_with_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Daemon {
        let child = clean(Command::new(BIN))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `addr` answers `/readyz` (failing at once if the
    /// process exits instead).
    fn wait_ready(&mut self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(addr, "GET", "/readyz", None).0 != 200 {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("exited ({status}) instead of serving: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "not ready on {addr}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and waits for the graceful stop.
    fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The command without the settings a test's environment could leak in.
fn clean(mut cmd: Command) -> Command {
    for var in [
        "RUSTCI_SERVER",
        "RUSTCI_TOKEN",
        "RUSTCI_API_TOKEN",
        "RUSTCI_JOIN_TOKEN",
        "RUSTCI_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a command that must end by itself (a refusal, a one-shot): a
/// daemon that starts serving instead is killed after a minute, and the
/// test fails rather than hangs.
fn rustci(args: &[&str]) -> Output {
    let child = clean(Command::new(BIN))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out,
        Err(_) => {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            let out = rx.recv().unwrap();
            panic!(
                "rustci {args:?} kept running: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `rustci <sub> --config FILE` with `text` as the file, expecting a
/// refusal; returns its one line of stderr and the file's path.
fn refused(sub: &str, text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "rustci.toml", text);
    let path = path.to_str().unwrap().to_string();
    let out = rustci(&[sub, "--config", &path]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "rustci {sub} started with a bad config {text:?}: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line on stderr for {text:?}: {stderr}"
    );
    (stderr.trim().to_string(), path)
}

#[test]
fn config_an_unknown_key_is_refused_naming_the_key_the_file_and_a_close_one() {
    let (line, path) = refused("dev", "listen = \"127.0.0.1:0\"\nlistn = \"127.0.0.1:1\"\n");
    assert!(line.contains(&format!("{path}:2:1")), "{line}");
    assert!(line.contains("`listn`"), "{line}");
    assert!(line.contains("did you mean `listen`"), "{line}");
}

#[test]
fn config_a_key_of_another_subcommand_says_where_it_belongs() {
    let (line, path) = refused("server", "work-dir = \"/tmp/w\"\n");
    assert!(line.contains(&path), "{line}");
    assert!(line.contains("`work-dir`"), "{line}");
    assert!(line.contains("rustci agent"), "{line}");
}

#[test]
fn config_a_value_of_the_wrong_type_names_the_key_file_line_column_and_the_form() {
    let (line, path) = refused("agent", "name = \"w1\"\n\ncpus = \"two\"\n");
    assert!(line.contains(&format!("{path}:3:8")), "{line}");
    assert!(line.contains("`cpus`"), "{line}");
    assert!(line.contains("expected a number, found a string"), "{line}");
    // A typo in another subcommand's table is found too.
    let (line, path) = refused("dev", "[server]\nid = \"one\"\n");
    assert!(line.contains(&format!("{path}:2:6")), "{line}");
    assert!(line.contains("`id`"), "{line}");
    assert!(line.contains("expected an integer"), "{line}");
}

#[test]
fn config_a_value_the_flag_refuses_is_refused_naming_the_key() {
    let (line, path) = refused("dev", "listen = \"127.0.0.1:99999\"\n");
    assert!(line.contains(&format!("{path}:1:10")), "{line}");
    assert!(line.contains("`listen`"), "{line}");
    assert!(line.contains("127.0.0.1:99999"), "{line}");
    let (line, _) = refused("agent", "drain-timeout-secs = 100000\n");
    assert!(line.contains("`drain-timeout-secs`"), "{line}");
    assert!(line.contains("86400"), "the range: {line}");
    let (line, _) = refused("agent", "heartbeat-interval-ms = 1500\n");
    assert!(line.contains("`heartbeat-interval-ms`"), "{line}");
    assert!(line.contains("1499"), "the range: {line}");
    let (line, _) = refused("server", "log-format = \"xml\"\n");
    assert!(line.contains("`log-format`"), "{line}");
    assert!(line.contains("json"), "the choices: {line}");
}

#[test]
fn config_a_missing_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let out = rustci(&["server", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
}

#[test]
fn config_a_toml_syntax_error_is_refused_with_its_line_and_column() {
    let (line, path) = refused("dev", "listen = \"127.0.0.1:0\"\ndata-dir = [\n");
    assert!(line.contains(&format!("{path}:2:")), "{line}");
    assert!(line.contains("invalid TOML"), "{line}");
}

#[test]
fn config_two_keys_that_exclude_each_other_are_refused() {
    let (line, path) = refused("dev", "api-token = \"a\"\napi-token-file = \"/tmp/t\"\n");
    assert!(line.contains(&path), "{line}");
    assert!(
        line.contains("`api-token`") && line.contains("`api-token-file`"),
        "{line}"
    );
}

#[test]
fn config_a_good_file_takes_effect_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let config = write(
        dir.path(),
        "rustci.toml",
        &format!(
            r#"# settings for every subcommand
data_dir = "{}"
node-name = "from-the-top"

[dev]
listen = "{addr}"
node-name = "from-file"
memory-mb = 512
label = {{ pool = "a", disk = "ssd" }}

[agent]
name = "ignored-here"
"#,
            data.display()
        ),
    );
    let mut dev = Daemon::spawn(
        &[
            "dev",
            "--config",
            config.to_str().unwrap(),
            "--memory-mb",
            "640",
        ],
        &dir.path().join("dev.log"),
    );
    dev.wait_ready(&addr);
    let (status, body) = http(&addr, "GET", "/v1/nodes", None);
    assert_eq!(status, 200, "{body}");
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let node = &nodes["nodes"][0];
    assert_eq!(node["name"], "from-file", "{body}");
    assert_eq!(
        node["memory_mb"], 640,
        "the flag wins over the file: {body}"
    );
    assert_eq!(node["labels"]["pool"], "a", "{body}");
    assert_eq!(node["labels"]["disk"], "ssd", "{body}");
    dev.terminate();
    assert!(data.join("log.redb").exists(), "data-dir from the file");
}

#[test]
fn config_token_files_keep_secrets_out_of_argv_for_server_and_agent() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let token = write(dir.path(), "join.token", "s3cret-from-a-file\n");
    let server_config = write(
        dir.path(),
        "server.toml",
        &format!(
            "listen = \"{addr}\"\ndata-dir = \"{}\"\njoin-token-file = \"{}\"\n",
            dir.path().join("data").display(),
            token.display()
        ),
    );
    let agent_config = write(
        dir.path(),
        "agent.toml",
        &format!(
            "server = \"{addr}\"\nname = \"w1\"\nwork-dir = \"{}\"\njoin-token-file = \"{}\"\nlabel = [\"pool=b\"]\nlog_format = \"json\"\n",
            dir.path().join("w1").display(),
            token.display()
        ),
    );
    let mut server = Daemon::spawn(
        &["server", "--config", server_config.to_str().unwrap()],
        &dir.path().join("server.log"),
    );
    server.wait_ready(&addr);
    // An agent with another token is refused at once...
    let wrong = rustci(&[
        "agent",
        "--config",
        agent_config.to_str().unwrap(),
        "--join-token",
        "not-it",
    ]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("token"),
        "{wrong:?}"
    );
    // ...and the one with the file joins.
    let agent = Daemon::spawn(
        &["agent", "--config", agent_config.to_str().unwrap()],
        &dir.path().join("agent.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http(&addr, "GET", "/v1/nodes", None);
        if body.contains("\"w1\"") && body.contains("\"ready\"") {
            assert!(body.contains("\"pool\":\"b\""), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not join: {body}\n{}\n{}",
            server.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent logs as its file says (JSON), inside its node's span.
    let connected = agent
        .log()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["message"] == "connected to the control plane")
        .unwrap_or_else(|| panic!("{}", agent.log()));
    assert_eq!(connected["spans"][0]["name"], "node", "{connected}");
    assert_eq!(connected["spans"][0]["node"], "w1", "{connected}");
}

#[test]
fn an_empty_token_file_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.token", "\n");
    let out = rustci(&[
        "dev",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--api-token-file",
        empty.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--api-token-file"), "{stderr}");
}

#[test]
fn log_format_json_writes_one_object_per_line_with_replica_term_node_and_job() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let mut dev = Daemon::spawn(
        &[
            "dev",
            "--listen",
            &addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--node-name",
            "n1",
            "--log-format",
            "json",
        ],
        &dir.path().join("dev.log"),
    );
    dev.wait_ready(&addr);
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/jobs",
        Some(r#"{"command": ["sh", "-c", "echo hi"]}"#),
    );
    assert_eq!(status, 201, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, job) = http(&addr, "GET", "/v1/jobs/1", None);
        if job.contains("\"succeeded\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{job}");
        std::thread::sleep(Duration::from_millis(20));
    }
    dev.terminate();
    let log = dev.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}\n{log}"))
        })
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
    }
    // The announcements for people are JSON too.
    assert!(
        lines
            .iter()
            .any(|l| l["message"].as_str().unwrap().contains("serving the API")),
        "{log}"
    );
    // An attempt's lines say which replica (and its term), node and job.
    let finished = lines
        .iter()
        .find(|l| l["message"] == "attempt finished")
        .unwrap_or_else(|| panic!("no 'attempt finished': {log}"));
    let spans = finished["spans"].as_array().expect("a span list");
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span: {finished}"))
    };
    assert_eq!(span("replica")["id"], 1, "{finished}");
    assert!(span("replica")["term"].as_u64() >= Some(1), "{finished}");
    assert_eq!(span("node")["node"], "n1", "{finished}");
    assert_eq!(span("attempt")["job"], 1, "{finished}");
}

#[test]
fn completions_for_bash_are_valid_bash_and_know_the_subcommands_and_flags() {
    let out = rustci(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "rustci.bash", &script);
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    for word in [
        "dev",
        "server",
        "agent",
        "submit",
        "logs",
        "completions",
        "--config",
        "--log-format",
        "--join-token-file",
    ] {
        assert!(script.contains(word), "the bash script lacks {word}");
    }
    // Sourced, it registers a completion for `rustci`.
    let sourced = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p rustci", path.display()))
        .output()
        .unwrap();
    assert!(
        sourced.status.success() && String::from_utf8_lossy(&sourced.stdout).contains("rustci"),
        "{sourced:?}"
    );
}

#[test]
fn completions_for_zsh_and_fish_name_the_subcommands() {
    for (shell, header) in [("zsh", "#compdef rustci"), ("fish", "complete -c rustci")] {
        let out = rustci(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(header), "{shell}: {script}");
        for word in ["dev", "server", "agent", "submit"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
}

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// The unit's `ExecStart=` words.
fn exec_start(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_units_in_docs_pass_systemd_analyze_verify() {
    let which = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .unwrap();
    if !which.status.success() {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["rustci-server.service", "rustci-agent.service"] {
        let text = std::fs::read_to_string(docs().join("systemd").join(name)).unwrap();
        let exec = exec_start(&text);
        assert_eq!(exec[0], "/usr/local/bin/rustci", "{name}");
        // verify insists that the binary exists: point it at this build.
        let unit = write(dir.path(), name, &text.replace(&exec[0], BIN));
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {name}: {stderr}"
        );
    }
}

/// The units' command lines, with the example config of docs/, start a
/// server and an agent that joins it (flags override what only fits a real
/// install: addresses, directories, token files).
#[test]
fn systemd_units_command_lines_with_the_example_config_run_a_server_and_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let example = docs().join("rustci.toml");
    let addr = format!("127.0.0.1:{}", free_port());
    let token = write(dir.path(), "join.token", "t0ken\n");
    let api_token = write(dir.path(), "api.token", "api-t0ken\n");
    let command = |unit: &str, overrides: &[String]| -> Vec<String> {
        let text = std::fs::read_to_string(docs().join("systemd").join(unit)).unwrap();
        let mut words = exec_start(&text)[1..].to_vec();
        let config = words.iter().position(|w| w == "--config").unwrap() + 1;
        assert_eq!(words[config], "/etc/rustci/rustci.toml", "{unit}");
        words[config] = example.to_str().unwrap().to_string();
        words.extend_from_slice(overrides);
        words
    };
    let s = |x: &str| x.to_string();
    let server_args = command(
        "rustci-server.service",
        &[
            s("--listen"),
            addr.clone(),
            s("--data-dir"),
            dir.path().join("data").to_str().unwrap().to_string(),
            s("--join-token-file"),
            token.to_str().unwrap().to_string(),
            s("--api-token-file"),
            api_token.to_str().unwrap().to_string(),
        ],
    );
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let mut server = Daemon::spawn(&server_args, &dir.path().join("server.log"));
    server.wait_ready(&addr);
    let agent_args = command(
        "rustci-agent.service",
        &[
            s("--server"),
            addr.clone(),
            s("--name"),
            s("example"),
            s("--work-dir"),
            dir.path().join("agent").to_str().unwrap().to_string(),
            s("--join-token-file"),
            token.to_str().unwrap().to_string(),
        ],
    );
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent = Daemon::spawn(&agent_args, &dir.path().join("agent.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_raw(
            &addr,
            "GET",
            "/v1/nodes",
            None,
            &[("Authorization", "Bearer api-t0ken")],
        );
        if body.contains("\"example\"") && body.contains("\"ready\"") {
            // The example's [agent] label came through.
            assert!(body.contains("\"pool\":\"linux\""), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not join: {body}\n{}\n{}",
            server.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state of node `name` as the server on `addr` sees it.
fn node_state(addr: &str, name: &str) -> String {
    let (_, body) = http(addr, "GET", "/v1/nodes", None);
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == name)
        .map_or(String::new(), |n| n["state"].as_str().unwrap().to_string())
}

/// Two servers, each with an agent; the one whose config sets a long
/// `node-down-after-ms` loses its agent first, yet still counts it ready
/// when the other, with the default, has declared its own down.
#[test]
fn config_node_down_after_ms_sets_how_long_a_silent_node_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    for (name, extra) in [
        ("patient", "node-down-after-ms = 600000\n"),
        ("default", ""),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "[server]\nlisten = \"{addr}\"\ndata-dir = \"{}\"\n{extra}\n[agent]\nserver = \"{addr}\"\nname = \"{name}\"\nwork-dir = \"{}\"\n",
                dir.path().join(format!("{name}-data")).display(),
                dir.path().join(format!("{name}-work")).display(),
            ),
        );
        let config = config.to_str().unwrap().to_string();
        let mut server = Daemon::spawn(
            &["server", "--config", &config],
            &dir.path().join(format!("{name}-server.log")),
        );
        server.wait_ready(&addr);
        let agent = Daemon::spawn(
            &["agent", "--config", &config],
            &dir.path().join(format!("{name}-agent.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while node_state(&addr, name) != "ready" {
            assert!(Instant::now() < deadline, "{}", agent.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        servers.push((addr, server));
        agents.push(agent);
    }
    // The patient server's agent dies first, by more than a heartbeat.
    drop(agents.remove(0));
    std::thread::sleep(Duration::from_secs(2));
    drop(agents.remove(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_state(&servers[1].0, "default") != "down" {
        assert!(Instant::now() < deadline, "the default server never saw it");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node_state(&servers[0].0, "patient"), "ready");
}

/// The environment sits between the command line and the file: a token in
/// `RUSTCI_API_TOKEN` wins over the file's `api-token-file` (which it
/// excludes), and the command line wins over both, also with a flag that
/// excludes the environment's (`--api-token-file`).
#[test]
fn config_the_environment_overrides_the_file_and_the_command_line_both() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = write(dir.path(), "api.token", "from-file\n");
    let file_flag = write(dir.path(), "flag.token", "from-file-flag\n");
    let file_flag = file_flag.to_str().unwrap().to_string();
    let mut tried = Vec::new();
    for (flags, winner) in [
        (&[][..], "from-env"),
        (&["--api-token", "from-flag"][..], "from-flag"),
        // A flag that excludes the environment's wins over it too.
        (
            &["--api-token-file", file_flag.as_str()][..],
            "from-file-flag",
        ),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = write(
            dir.path(),
            "rustci.toml",
            &format!(
                "listen = \"{addr}\"\ndata-dir = \"{}\"\napi-token-file = \"{}\"\n",
                dir.path().join(format!("data-{winner}")).display(),
                token_file.display()
            ),
        );
        let mut args = vec!["dev", "--config", config.to_str().unwrap()];
        args.extend_from_slice(flags);
        let mut dev = Daemon::spawn_with_env(
            &args,
            &dir.path().join(format!("{winner}.log")),
            &[("RUSTCI_API_TOKEN", "from-env")],
        );
        dev.wait_ready(&addr);
        for token in ["from-file", "from-env", "from-flag", "from-file-flag"] {
            let bearer = format!("Bearer {token}");
            let (status, _) = http_raw(
                &addr,
                "GET",
                "/v1/jobs",
                None,
                &[("Authorization", bearer.as_str())],
            );
            tried.push((winner, token, status));
            let expected = if token == winner { 200 } else { 401 };
            assert_eq!(status, expected, "{winner} should win: {tried:?}");
        }
        dev.terminate();
    }
}
