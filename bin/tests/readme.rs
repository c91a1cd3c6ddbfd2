//! The README, as a new user runs it: every command of its "Quickstart"
//! and "Look at the log" sections, taken from README.md itself, in one
//! shell, in order, in a git repository (the stand-in for a fresh clone)
//! where `rustci dev` runs with its default data dir. A `# prints X`
//! comment after a command is the last line it prints; every command not
//! followed by `echo $?` exits 0. Then the jobs they submitted end as the README
//! means them to, and what the README says of Ctrl-C holds.
//!
//! Two things are not as written, and only these: the daemon listens on a
//! port of its own (`RUSTCI_SERVER` for the CLI, and `localhost:7878` in
//! the `curl` lines rewritten to it), and `/tmp/incident` is a path in the
//! test's own directory. `./target/release/rustci` is the binary under
//! test. The agents section runs the same way, against the server and
//! agents it starts (on a port of its own). Building and `cargo test`
//! (the "Set up" section) are not run here.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Bound on the whole quickstart (a checkout and a few jobs).
const SCRIPT_WAIT_MAX: Duration = Duration::from_secs(300);
/// Bound on a daemon's exit after a signal.
const EXIT_WAIT_MAX: Duration = Duration::from_secs(60);
/// Printed after each command, with its exit status.
const END_MARK: &str = "@@readme-command-ended";
/// The sections of the README run against `rustci dev`.
const SECTIONS: [&str; 2] = ["## Quickstart", "## Look at the log"];
/// The section run against `rustci server` and two agents.
const AGENTS_SECTION: &str = "## A control plane and worker agents";

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

/// One command of the README: its text (continuation lines and a here
/// document included) and the last line it prints, when the README says.
#[derive(Debug)]
struct ReadmeCommand {
    text: String,
    prints_last: Option<String>,
}

/// The fenced `sh` blocks of `section` (up to the next `## ` heading).
fn shell_blocks(readme: &str, section: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {section:?}"));
    let rest = &readme[start + 1..];
    let body = match rest[section.len()..].find("\n## ") {
        Some(end) => &rest[..section.len() + end],
        None => rest,
    };
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in body.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed code block in {section}");
    blocks
}

/// A trailing `  # comment` outside quotes: (the command, the comment).
fn trailing_comment(line: &str) -> Option<(String, String)> {
    let at = line.rfind(" # ")?;
    let before = &line[..at];
    let balanced = before.matches('\'').count().is_multiple_of(2)
        && before.matches('"').count().is_multiple_of(2);
    balanced.then(|| {
        (
            before.trim_end().to_string(),
            line[at + 3..].trim().to_string(),
        )
    })
}

/// What a `# prints X` comment (`X last`, `X, words`) says the command
/// prints last; other comments only explain.
fn prints_last(comment: &str) -> Option<String> {
    let said = comment.strip_prefix("prints ")?;
    let said = said.split(", ").next().unwrap_or(said);
    Some(said.strip_suffix(" last").unwrap_or(said).to_string())
}

/// Splits a block into commands; comment lines and blank lines go.
fn commands(block: &str) -> Vec<ReadmeCommand> {
    let mut out = Vec::new();
    let mut lines = block.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut text = line.to_string();
        let mut last = line.to_string();
        while last.ends_with('\\') {
            last = lines.next().expect("a continuation line").to_string();
            text.push('\n');
            text.push_str(&last);
        }
        if let Some(word) = heredoc_word(&text) {
            for body in lines.by_ref() {
                text.push('\n');
                text.push_str(body);
                if body == word {
                    break;
                }
            }
            assert!(
                text.ends_with(&format!("\n{word}")),
                "unterminated here document"
            );
            out.push(ReadmeCommand {
                text,
                prints_last: None,
            });
            continue;
        }
        let prints_last = trailing_comment(&last).and_then(|(command, comment)| {
            let said = prints_last(&comment)?;
            text.truncate(text.len() - last.len());
            text.push_str(&command);
            Some(said)
        });
        out.push(ReadmeCommand { text, prints_last });
    }
    out
}

/// `WORD` of `<<WORD` or `<<'WORD'`.
fn heredoc_word(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("<<")?;
    let word: String = rest
        .trim_start_matches('-')
        .trim_matches(|c| c == '\'' || c == '"' || c == ' ')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// The README's commands, in order, with their expectations.
fn readme_commands() -> Vec<ReadmeCommand> {
    let readme = readme();
    let all: Vec<ReadmeCommand> = SECTIONS
        .iter()
        .flat_map(|s| shell_blocks(&readme, s))
        .flat_map(|b| commands(&b))
        .collect();
    assert!(all.len() > 15, "the README's commands were found: {all:?}");
    let promised = all.iter().filter(|c| c.prints_last.is_some()).count();
    assert!(promised >= 5, "the `# prints` comments were found: {all:?}");
    all
}

/// A git repository holding the README, where the user runs it.
fn fresh_clone(dir: &Path) -> std::path::PathBuf {
    let clone = dir.join("rustci");
    std::fs::create_dir_all(clone.join("target/release")).unwrap();
    std::fs::write(clone.join("README.md"), readme()).unwrap();
    std::os::unix::fs::symlink(BIN, clone.join("target/release/rustci")).unwrap();
    std::fs::write(clone.join(".gitignore"), "/target\n/rustci-data*\n").unwrap();
    for args in [
        &["init", "--quiet"][..],
        &["add", "README.md", ".gitignore"],
        &["commit", "--quiet", "-m", "RustCI"],
    ] {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=RustCI test",
                "-c",
                "user.email=test@rustci.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(&clone)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git is installed (the README needs it)");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    }
    clone
}

/// `rustci dev` as the README starts it: in the clone, default data dir.
fn start_dev(clone: &Path, addr: &str) -> Dev {
    Dev::start_with(&clone.join("rustci-data"), addr, &[], |c| {
        c.current_dir(clone);
    })
}

/// What one command did.
#[derive(Debug)]
struct Ran {
    command: String,
    status: i32,
    stdout: String,
}

/// How a section's commands are run: the server they talk to, the text
/// replaced in them, and what the script does first.
struct Setting<'a> {
    server: &'a str,
    replace: Vec<(String, String)>,
    prelude: &'a str,
}

/// Runs the commands in one bash (aliases on, as in a terminal), each
/// followed by a line with its status that leaves `$?` as it was. The bash
/// leads a process group of its own, killed whole if it overstays.
fn run_script(clone: &Path, commands: &[ReadmeCommand], setting: &Setting, name: &str) -> Vec<Ran> {
    use std::os::unix::process::CommandExt;
    let mut script = format!("shopt -s expand_aliases\n{}\n", setting.prelude);
    for c in commands {
        let mut text = c.text.clone();
        for (from, to) in &setting.replace {
            text = text.replace(from.as_str(), to);
        }
        script.push_str(&text);
        script.push_str(&format!(
            "\n__rc=$?; printf '\\n{END_MARK} %d\\n' \"$__rc\"; (exit $__rc)\n"
        ));
    }
    let scratch = clone.parent().unwrap();
    let script_path = scratch.join(format!("{name}.sh"));
    std::fs::write(&script_path, &script).unwrap();
    let out_path = scratch.join(format!("{name}.out"));
    let err_path = scratch.join(format!("{name}.err"));
    let mut child = Command::new("bash")
        .arg(&script_path)
        .current_dir(clone)
        .env("RUSTCI_SERVER", setting.server)
        .env_remove("RUSTCI_TOKEN")
        .env_remove("RUSTCI_JOIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let deadline = Instant::now() + SCRIPT_WAIT_MAX;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!(
                "the README's commands did not finish: {}\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    // bash exits as its last command did: judged below, with the others.
    let _ = status;
    let mut ran = Vec::new();
    let mut rest = stdout.as_str();
    for c in commands {
        let mark = format!("\n{END_MARK} ");
        let at = rest
            .find(&mark)
            .unwrap_or_else(|| panic!("no end of {:?} in:\n{stdout}\n{stderr}", c.text));
        let (output, after) = rest.split_at(at);
        let after = &after[mark.len()..];
        let (code, tail) = after.split_once('\n').unwrap();
        ran.push(Ran {
            command: c.text.clone(),
            status: code.parse().unwrap(),
            stdout: output.to_string(),
        });
        rest = tail;
    }
    if std::env::var_os("README_SHOW").is_some() {
        for r in &ran {
            eprintln!("$ {}\n[exit {}]\n{}", r.command, r.status, r.stdout);
        }
        eprintln!("stderr:\n{stderr}");
    }
    ran
}

/// Every command exits 0 unless `echo $?` follows it, and prints last what
/// its comment says; what is not so, in words.
fn problems(commands: &[ReadmeCommand], ran: &[Ran]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, (c, r)) in commands.iter().zip(ran).enumerate() {
        let checked_by_next = commands
            .get(i + 1)
            .is_some_and(|n| n.text.trim() == "echo $?");
        if !checked_by_next && r.status != 0 {
            problems.push(format!("`{}` exited {}: {}", c.text, r.status, r.stdout));
        }
        if let Some(want) = &c.prints_last {
            let last = r.stdout.lines().rev().find(|l| !l.trim().is_empty());
            if last.map(str::trim) != Some(want.as_str()) {
                problems.push(format!(
                    "`{}` printed last {last:?}, the README says {want:?}; it printed:\n{}",
                    c.text, r.stdout
                ));
            }
        }
    }
    problems
}

#[test]
fn every_command_of_the_readme_quickstart_works_as_written() {
    let commands = readme_commands();
    let dir = tempfile::tempdir().unwrap();
    let clone = fresh_clone(dir.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut dev = start_dev(&clone, &addr);
    let port = addr.rsplit_once(':').unwrap().1;
    let incident = dir.path().join("incident").display().to_string();
    let setting = Setting {
        server: &addr,
        replace: vec![
            ("localhost:7878".into(), format!("127.0.0.1:{port}")),
            ("/tmp/incident".into(), incident),
        ],
        prelude: "",
    };
    let ran = run_script(&clone, &commands, &setting, "quickstart");
    let problems = problems(&commands, &ran);
    assert!(
        problems.is_empty(),
        "the README drifted from what works:\n{}\n\n(daemon: {})",
        problems.join("\n"),
        dev.stderr()
    );

    // The jobs ended as the README means them to: the first exits 3, the
    // sleep is cancelled, every other one succeeds (the checkouts too).
    let jobs = dev.get_json("/v1/jobs");
    let states: Vec<(u64, String)> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_u64().unwrap(),
                j["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = [
        "failed",
        "succeeded",
        "succeeded",
        "cancelled",
        "succeeded",
        "succeeded",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| (i as u64 + 1, s.to_string()))
    .collect();
    assert_eq!(states, want, "{jobs}");
    let checkout = dev.get_json("/v1/jobs/2");
    assert_eq!(checkout["checkout"]["ref"], "HEAD", "{checkout}");

    // "Stop the daemon with Ctrl-C. Starting it again resumes from the log."
    let mut child = dev.child.take().unwrap();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "a graceful stop: {}", dev.stderr());
    drop(dev);
    let dev = start_dev(&clone, &addr);
    assert_eq!(dev.get_json("/v1/jobs")["jobs"], jobs["jobs"]);
}

/// The section on agents, as written but for `cargo build --release` (the
/// binary is built) and the server's port: `rustci server` listens on a
/// port of its own, which `RUSTCI_SERVER` gives the agents and the CLI.
#[test]
fn every_command_of_the_readme_agents_section_works_as_written() {
    let readme = readme();
    let commands: Vec<ReadmeCommand> = shell_blocks(&readme, AGENTS_SECTION)
        .iter()
        .flat_map(|b| commands(b))
        .filter(|c| c.text != "cargo build --release")
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    let dir = tempfile::tempdir().unwrap();
    let clone = fresh_clone(dir.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let setting = Setting {
        server: &addr,
        replace: vec![(
            "rustci server ".into(),
            format!("rustci server --listen {addr} "),
        )],
        // What the README starts in the background stops with the shell.
        prelude: "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
    };
    let ran = run_script(&clone, &commands, &setting, "agents");
    let problems = problems(&commands, &ran);
    assert!(
        problems.is_empty(),
        "the README drifted from what works:\n{}",
        problems.join("\n")
    );
    let submitted = ran.last().unwrap();
    assert!(
        submitted.command.contains("--constraint pool=b"),
        "{submitted:?}"
    );
    assert!(submitted.stdout.contains("\non "), "{submitted:?}");
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + EXIT_WAIT_MAX;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_readme_parser_finds_commands_their_continuations_here_documents_and_outputs() {
    let block = "alias x=y\n\n# a comment\nrun a \\\n  b   # prints last words last\necho $?   # prints 3\nrun   # prints 4, its id\nrun   # explains\ncat > f <<EOF\nk = \"# not a comment\"\nEOF\nsh -c 'echo # kept'\n";
    let got: Vec<(String, Option<String>)> = commands(block)
        .into_iter()
        .map(|c| (c.text, c.prints_last))
        .collect();
    assert_eq!(
        got,
        vec![
            ("alias x=y".to_string(), None),
            ("run a \\\n  b".to_string(), Some("last words".to_string())),
            ("echo $?".to_string(), Some("3".to_string())),
            ("run".to_string(), Some("4".to_string())),
            ("run   # explains".to_string(), None),
            (
                "cat > f <<EOF\nk = \"# not a comment\"\nEOF".to_string(),
                None
            ),
            ("sh -c 'echo # kept'".to_string(), None),
        ]
    );
}

/// "Ctrl-C stops it gracefully ... A second Ctrl-C stops it at once." The
/// graceful stop is made slow on purpose: the job's shim is stopped
/// (SIGSTOP), so the runner waits out its grace before it kills the group,
/// and this test holds the job's output pipe open, so the runner then waits
/// out its drain too: seconds in which the second Ctrl-C must cut it short.
#[test]
fn a_second_ctrl_c_stops_the_daemon_at_once_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(&dir.path().join("data"), &[]);
    let mark = unique_mark();
    let job = dev.submit_json(&serde_json::json!({
        "command": ["sleep", "600"],
        "env": {"TEST_MARK": mark},
    }));
    let id = job["id"].as_u64().unwrap();
    dev.wait_job(id, Duration::from_secs(30), |j| j["state"] == "running");
    let record = dev.data_dir.join(format!("runner/{id}-1.pgid"));
    let pgid: i32 = std::fs::read_to_string(&record)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let sleep_pid = loop {
        let marked = processes_marked(&mark);
        if let Some(pid) = marked.iter().copied().find(|p| *p != pgid) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the job's process: {marked:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let held_output = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{sleep_pid}/fd/1"))
        .expect("the job's output pipe");
    unsafe {
        libc::kill(pgid, libc::SIGSTOP);
    }
    let mut child = dev.child.take().unwrap();
    let pid = child.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let deadline = Instant::now() + EXIT_WAIT_MAX;
    while !dev.stderr().contains("stopping gracefully") {
        assert!(
            Instant::now() < deadline,
            "no graceful stop: {}",
            dev.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = wait_exit(&mut child);
    // The job's processes go whatever happened (this test stopped them).
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
        libc::kill(pgid, libc::SIGCONT);
    }
    drop(held_output);
    assert_eq!(
        status.code(),
        Some(130),
        "the second Ctrl-C ends it at once: {}",
        dev.stderr()
    );
    assert!(
        dev.stderr().contains("stopping at once"),
        "{}",
        dev.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_marked(&mark).is_empty() {
        assert!(Instant::now() < deadline, "the job's processes are gone");
        std::thread::sleep(Duration::from_millis(20));
    }
}
