//! Test harness: a real `nats-server` and the real `api-server` binary on free ports, each
//! killed when dropped, a minimal HTTP/1.1 client (with chunked decoding, for SSE), and the
//! model directory the server reads its tokenizer and limits from.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod bus_peer;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A port nothing listens on, never the same twice in this process: tests run in parallel
/// threads, and a port released by one test's probe could otherwise be handed to another
/// test's server before the first one binds it (one server then fails to start, and a
/// readiness probe may even connect to the wrong process).
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

/// Spawns a server on a free port and waits until `ready(port)` says it serves. A port can
/// still be taken between the probe and the server's bind (by another process, or as the
/// ephemeral port of an outgoing connection), so a server that exits before listening is
/// started again on another port, up to three times.
fn spawn_listening(
    what: &str,
    mut command: impl FnMut(u16) -> Command,
    ready: impl Fn(u16) -> bool,
) -> (Child, u16) {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let mut child = command(port)
            .spawn()
            .unwrap_or_else(|e| panic!("{what} starts: {e}"));
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                failures.push(format!("exited before listening on {port}: {status}"));
                break;
            }
            if ready(port) {
                // The listener is the child's only if the child is still alive.
                if let Ok(None) = child.try_wait() {
                    return (child, port);
                }
                continue;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{what} did not listen on {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "{what} failed to start three times: {}",
        failures.join("; ")
    );
}

/// A child process killed (and reaped) on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

pub struct NatsServer {
    pub url: String,
    _process: Process,
}

impl NatsServer {
    pub fn start() -> Self {
        assert!(
            std::path::Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} is missing: sudo apt-get install nats-server"
        );
        let (child, port) = spawn_listening(
            "nats-server",
            |port| {
                let mut command = Command::new(NATS_SERVER);
                command
                    .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                command
            },
            nats_greets,
        );
        NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            _process: Process(child),
        }
    }
}

/// The model directory for tests: `$TANDEM_TEST_MODELS/tiny` (config.json and tokenizer files
/// are all the api-server reads).
pub fn test_model_dir() -> PathBuf {
    let root = std::env::var_os("TANDEM_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-models"));
    let dir = root.join("tiny");
    assert!(
        dir.join("config.json").exists() && dir.join("tokenizer.json").exists(),
        "test model {} is missing: run scripts/test-models (model-prep random --preset tiny --seed 0 -o {})",
        dir.display(),
        dir.display()
    );
    dir
}

pub const SERVED_NAME: &str = "test-model";

pub struct ApiServer {
    pub port: u16,
    _process: Process,
}

impl ApiServer {
    /// Starts the binary with short timeouts (so failure paths are quick to test), plus
    /// `extra` flags (a flag given there replaces the default of the same name), and waits
    /// until it serves HTTP.
    pub fn start(nats: &NatsServer, extra: &[&str]) -> Self {
        let model = test_model_dir();
        let (child, port) = spawn_listening(
            "api-server",
            |port| {
                let mut flags: Vec<(String, String)> = [
                    ("--model", model.to_str().expect("test paths are UTF-8")),
                    ("--served-model-name", SERVED_NAME),
                    ("--port", &port.to_string()),
                    ("--nats", &nats.url),
                    ("--accept-timeout-ms", "500"),
                    ("--first-token-timeout-ms", "1500"),
                    ("--stall-timeout-ms", "700"),
                    ("--worker-timeout-ms", "1000"),
                    ("--http-workers", "2"),
                ]
                .iter()
                .map(|(flag, value)| (flag.to_string(), value.to_string()))
                .collect();
                let mut rest = Vec::new();
                let mut extra = extra.iter();
                while let Some(arg) = extra.next() {
                    match flags.iter_mut().find(|(flag, _)| flag == arg) {
                        Some((_, value)) => {
                            *value = extra
                                .next()
                                .unwrap_or_else(|| panic!("{arg} needs a value"))
                                .to_string();
                        }
                        None => rest.push(arg.to_string()),
                    }
                }
                let mut command = Command::new(env!("CARGO_BIN_EXE_api-server"));
                command
                    .args(flags.into_iter().flat_map(|(flag, value)| [flag, value]))
                    .args(rest)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                command
            },
            answers_http,
        );
        ApiServer {
            port,
            _process: Process(child),
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(self.port, "POST", path, Some(body))
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Response {
        self.post(path, &body.to_string())
    }

    /// Opens a POST whose response is read incrementally (SSE).
    pub fn open_stream(&self, path: &str, body: &serde_json::Value) -> SseReader {
        let stream = send(self.port, "POST", path, Some(&body.to_string()));
        SseReader::new(stream)
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn send(port: u16, method: &str, path: &str, body: Option<&str>) -> TcpStream {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).expect("api-server accepts connections");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("socket option");
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()))
        .expect("request written");
    stream
}

/// Reads the status line and headers.
fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    (status, headers)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    })
}

/// One chunk of a chunked body; `None` at the end.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

pub fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> Response {
    let stream = send(port, method, path, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut bytes = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(&mut reader) {
            bytes.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut bytes).expect("body");
    }
    Response {
        status,
        headers,
        body: String::from_utf8(bytes).expect("UTF-8 body"),
    }
}

/// Reads an SSE response event by event.
pub struct SseReader {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    buffer: String,
}

impl SseReader {
    fn new(stream: TcpStream) -> Self {
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        let chunked = is_chunked(&headers);
        SseReader {
            reader,
            status,
            headers,
            chunked,
            buffer: String::new(),
        }
    }

    /// The next event's `data:` payload; `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some(data);
            }
            let more = if self.chunked {
                read_chunk(&mut self.reader)?
            } else {
                let mut buf = vec![0; 4096];
                let n = self.reader.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                buf.truncate(n);
                buf
            };
            self.buffer
                .push_str(std::str::from_utf8(&more).expect("UTF-8 SSE"));
        }
    }

    /// Every remaining `data:` payload.
    pub fn collect(mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(data) = self.next_data() {
            all.push(data);
        }
        all
    }
}
