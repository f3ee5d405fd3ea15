//! End-to-end harness: real `nats-server`, `worker`, `api-server` and `tandem` processes on
//! free ports, their output captured line by line, killed (and reaped) when dropped; an HTTP
//! client (ureq) that reads SSE streams as they come.
//!
//! The binaries are the workspace's own, from the target directory this test runs from
//! (`cargo test --workspace` builds them all before any test runs).

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A workspace binary next to the test executable (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace --bins` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A test model made by scripts/test-models under `$TANDEM_TEST_MODELS` (default
/// `target/test-models`).
pub fn model_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("TANDEM_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-models"));
    let dir = root.join(name);
    assert!(
        dir.join("config.json").is_file(),
        "test model {} is missing: run scripts/test-models",
        dir.display()
    );
    dir
}

/// A port nothing listens on, never the same twice in this process (tests run in parallel
/// threads; see `spawn_listening` for the remaining race with other processes).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("the OS hands out a free port")
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// A child process whose stdout and stderr lines are collected (and echoed to the test's
/// stderr with a prefix, shown when a test fails). Killed and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for reader in [
            Box::new(stdout) as Box<dyn Read + Send>,
            Box::new(stderr) as Box<dyn Read + Send>,
        ] {
            let lines = Arc::clone(&lines);
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Lines printed so far that contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle`; panics (with the output) if the process exits
    /// or `limit` passes first.
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while self.count_lines(needle) == 0 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before printing `{needle}`:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} did not print `{needle}` within {limit:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped before drop.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "signalling {}", self.name);
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit; panics if it takes longer than `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "{} did not exit within {limit:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a server on a free port and waits until `ready(port)` says it serves, retrying on
/// another port if the port was taken between the probe and the server's bind.
fn spawn_listening(
    name: &str,
    mut command: impl FnMut(u16) -> Command,
    ready: impl Fn(u16) -> bool,
) -> (Proc, u16) {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let mut proc = Proc::spawn(name, command(port));
        let start = Instant::now();
        loop {
            if let Some(status) = proc.try_wait() {
                failures.push(format!("exited before listening on {port}: {status}"));
                break;
            }
            if ready(port) && proc.try_wait().is_none() {
                return (proc, port);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} did not listen on {port} within 60 s:\n{}",
                proc.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "{name} failed to start three times: {}",
        failures.join("; ")
    );
}

pub fn nats_server_path() -> PathBuf {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    panic!("nats-server is missing: sudo apt-get install -y nats-server (or scripts/install-deps)")
}

/// Ready once it answers HTTP (`tandem_protocol::ready`): a bare TCP accept can come from a
/// listener that is not the server's yet, or before its workers run (a request then gets a
/// reset, seen once in the disaggregation tests).
fn answers_http(port: u16) -> bool {
    tandem_protocol::ready::http_answers(([127, 0, 0, 1], port).into(), Duration::from_secs(2))
}

/// nats-server can accept and reset connections while it starts: ready once it greets.
fn nats_greets(port: u16) -> bool {
    tandem_protocol::ready::nats_greets(([127, 0, 0, 1], port).into(), Duration::from_secs(2))
}

pub struct Nats {
    pub url: String,
    _proc: Proc,
}

impl Nats {
    pub fn start() -> Self {
        let (proc, port) = spawn_listening(
            "nats",
            |port| {
                let mut command = Command::new(nats_server_path());
                command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
                command
            },
            nats_greets,
        );
        Nats {
            url: format!("nats://127.0.0.1:{port}"),
            _proc: proc,
        }
    }
}

pub const SERVED_NAME: &str = "e2e-model";

/// `worker --role both` on the CPU, joined to `nats`; returns once it has joined.
pub fn start_worker(nats: &Nats, model: &Path, worker_id: &str, extra: &[&str]) -> Proc {
    start_worker_as(nats, model, "both", worker_id, extra)
}

/// `worker --role ROLE` on the CPU, joined to `nats`; returns once it has joined.
pub fn start_worker_as(
    nats: &Nats,
    model: &Path,
    role: &str,
    worker_id: &str,
    extra: &[&str],
) -> Proc {
    let mut command = Command::new(bin("worker"));
    command
        .args(["--role", role, "--model"])
        .arg(model)
        .args([
            "--nats",
            &nats.url,
            "--served-model-name",
            SERVED_NAME,
            "--worker-id",
            worker_id,
            "--threads",
            "2",
            "--heartbeat-ms",
            "250",
        ])
        .args(extra)
        .env("RUST_LOG", "info,tandem_workers=debug");
    let mut proc = Proc::spawn(worker_id, command);
    proc.wait_for_line("joined the deployment", Duration::from_secs(120));
    proc
}

/// The api-server on a free port, with a short worker timeout so a dead worker is noticed
/// quickly.
pub struct ApiServer {
    pub base: String,
    pub proc: Proc,
}

impl ApiServer {
    pub fn start(nats: &Nats, model: &Path) -> Self {
        Self::start_with(nats, model, &[])
    }

    pub fn start_with(nats: &Nats, model: &Path, extra: &[&str]) -> Self {
        let (proc, port) = spawn_listening(
            "api-server",
            |port| {
                let mut command = Command::new(bin("api-server"));
                command
                    .arg("--model")
                    .arg(model)
                    .args([
                        "--served-model-name",
                        SERVED_NAME,
                        "--port",
                        &port.to_string(),
                        "--nats",
                        &nats.url,
                        "--worker-timeout-ms",
                        "1500",
                    ])
                    .args(extra)
                    .env("RUST_LOG", "warn");
                command
            },
            answers_http,
        );
        ApiServer {
            base: format!("http://127.0.0.1:{port}"),
            proc,
        }
    }

    pub fn client(&self) -> Http {
        Http::new(&self.base)
    }
}

/// A JSON-over-HTTP client for one server.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    agent: ureq::Agent,
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

impl Http {
    pub fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Http {
            base: base.to_owned(),
            agent,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        Reply {
            status: response.status().as_u16(),
            body: response
                .body_mut()
                .read_to_string()
                .unwrap_or_else(|e| panic!("GET {path} body: {e}")),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        Reply {
            status: response.status().as_u16(),
            body: response
                .body_mut()
                .read_to_string()
                .unwrap_or_else(|e| panic!("POST {path} body: {e}")),
        }
    }

    /// POSTs a streaming request and returns the `data:` payloads of its SSE events, read as
    /// they arrive, up to and excluding `[DONE]`. `on_event` sees each one as it comes.
    pub fn post_stream(
        &self,
        path: &str,
        body: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> (u16, Vec<Value>) {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        let mut events = Vec::new();
        let reader = BufReader::new(response.body_mut().as_reader());
        for line in reader.lines() {
            let line = line.unwrap_or_else(|e| panic!("reading the SSE stream of {path}: {e}"));
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let event: Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data}"));
            on_event(&event);
            events.push(event);
        }
        (status, events)
    }

    /// Polls `/health` until it is 200 and reports `both` live workers.
    pub fn wait_for_workers(&self, both: u64, limit: Duration) {
        self.wait_for_role("both", both, limit);
    }

    /// Polls `/health` until it is 200 and reports `count` live workers of `role`.
    pub fn wait_for_role(&self, role: &str, count: u64, limit: Duration) {
        let start = Instant::now();
        loop {
            let reply = self.get("/health");
            if reply.status == 200 && reply.json()["workers"][role] == count {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "/health did not show {count} live {role} workers within {limit:?}: {} {}",
                reply.status,
                reply.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The text of a streamed chat completion or completion (its deltas joined), the finish
/// reason, and the logprob token strings when logprobs were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    pub text: String,
    pub finish_reason: Option<String>,
    pub tokens: Vec<String>,
}

pub fn collect_stream(events: &[Value]) -> Streamed {
    let mut out = Streamed {
        text: String::new(),
        finish_reason: None,
        tokens: Vec::new(),
    };
    for event in events {
        assert!(event.get("error").is_none(), "stream error: {event}");
        for choice in event["choices"].as_array().into_iter().flatten() {
            if let Some(text) = choice["delta"]["content"].as_str() {
                out.text.push_str(text);
            }
            if let Some(text) = choice["text"].as_str() {
                out.text.push_str(text);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                out.finish_reason = Some(reason.to_owned());
            }
            for entry in choice["logprobs"]["content"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.tokens
                    .push(entry["token"].as_str().unwrap_or("").to_owned());
            }
        }
    }
    out
}

/// The value of the first Prometheus sample of `name` whose labels contain `labels` (a
/// fragment such as `"ctx"`; empty matches any) in a /metrics body.
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            (series_name == name && series_labels.contains(labels))
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// Writes `text` to a fresh file under the target directory and returns its path.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/e2e-tmp")
        .join(format!("{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file");
    path
}
