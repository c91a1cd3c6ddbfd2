//! Shared scaffolding for the end-to-end tests: a `rustci dev` process on a
//! scratch data dir and a port of its own, and the CLI run as a user would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_rustci");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the binary to completion with `args`, plus `--data-dir DIR` when
/// given (not tied to any daemon: for commands that must fail or read offline).
pub fn run(args: &[&str], data_dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    cmd.output().unwrap()
}

/// `rustci dev` on a fresh port and `data_dir`, run to completion (it is
/// expected to refuse to start).
pub fn dev_refusing(data_dir: &Path, extra: &[&str]) -> Output {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["dev", "--listen", listen.as_str()];
    args.extend_from_slice(extra);
    run(&args, Some(data_dir))
}

/// A `rustci dev` child process; killed (SIGKILL) when dropped.
pub struct Dev {
    pub child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub stderr_path: PathBuf,
}

impl Dev {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Dev {
        Self::start_on(data_dir, &format!("127.0.0.1:{}", free_port()), extra)
    }

    pub fn start_on(data_dir: &Path, addr: &str, extra: &[&str]) -> Dev {
        Self::start_with(data_dir, addr, extra, |_| {})
    }

    /// Starts `rustci dev` with `prepare` applied to its command first
    /// (limits, inherited descriptors...).
    pub fn start_with(
        data_dir: &Path,
        addr: &str,
        extra: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Dev {
        let stderr_path = data_dir.with_extension(format!("{}.log", free_port()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["dev", "--listen", addr, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr);
        prepare(&mut command);
        let child = command.spawn().expect("rustci dev starts");
        let dev = Dev {
            child: Some(child),
            addr: addr.to_string(),
            data_dir: data_dir.to_path_buf(),
            stderr_path,
        };
        dev.wait_ready();
        dev
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http(&self.addr, "GET", "/readyz", None).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rustci dev did not become ready: {}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("RUSTCI_SERVER", &self.addr)
            .env_remove("RUSTCI_TOKEN")
            .output()
            .unwrap()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the graceful path.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().unwrap()
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = http(&self.addr, "GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn submit_json(&self, body: &serde_json::Value) -> serde_json::Value {
        let (status, text) = http(&self.addr, "POST", "/v1/jobs", Some(&body.to_string()));
        assert_eq!(status, 201, "submit: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn wait_job<F: Fn(&serde_json::Value) -> bool>(
        &self,
        id: u64,
        timeout: Duration,
        done: F,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.get_json(&format!("/v1/jobs/{id}"));
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not get there: {job}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Dev {
    /// Waits (up to 30 s) until some job satisfies `done`; returns its id.
    pub fn wait_job_where<F: Fn(&serde_json::Value) -> bool>(&self, done: F) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = self.get_json("/v1/jobs");
            if let Some(job) = list["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| done(j))
            {
                return job["id"].as_u64().unwrap();
            }
            assert!(Instant::now() < deadline, "no job got there: {list}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn terminal(job: &serde_json::Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// A minimal blocking HTTP/1.1 request (one per connection), so tests see
/// exactly what goes over the wire. Returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_raw(addr, method, path, body.map(str::as_bytes), &[])
}

pub fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((head, rest))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(rest)
        }
        Some((_, rest)) => rest.to_string(),
        None => String::new(),
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A marker unique to this test process and call: put it in a job's `env`
/// as `TEST_MARK` and find the job's processes with [`processes_marked`],
/// so that another copy of the suite on the same machine is never mistaken
/// for this one's.
pub fn unique_mark() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}-{n}", std::process::id())
}

/// Live processes (not zombies) whose environment holds `TEST_MARK=mark`.
pub fn processes_marked(mark: &str) -> Vec<i32> {
    let want = format!("TEST_MARK={mark}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            continue; // zombies are dead; PID 1 here may be slow to reap them
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// A `rustci` child process (a server or an agent) with its stderr in a
/// log file, killed (SIGKILL) when dropped. None of the test runner's own
/// `RUSTCI_*` settings reach it.
pub struct Proc {
    /// `None` once killed or reaped.
    pub child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &Path) -> Proc {
        Proc::spawn_in(args, log, Path::new("."))
    }

    pub fn spawn_in<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &Path, cwd: &Path) -> Proc {
        let child = Command::new(BIN)
            .current_dir(cwd)
            .args(args)
            .env_remove("RUSTCI_JOIN_TOKEN")
            .env_remove("RUSTCI_SERVER")
            .env_remove("RUSTCI_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// A child started some other way, its stderr already going to `log`.
    pub fn from_child(child: Child, log: PathBuf) -> Proc {
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
