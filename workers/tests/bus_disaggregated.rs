//! Disaggregated serving at the bus level, with real processes: a nats-server, a
//! `worker --role context` and a `worker --role decode` on SmolLM2 (bf16), the KV cache moving
//! between them over UCX. This test plays the api-server's part with a NATS client: prefill
//! job to the context worker, its `kv_ready` handle in a decode job to the decode worker.
//!
//! Shows: the tokens equal `worker generate`'s, greedy and seeded; the decode worker reports
//! the bytes it pulled; a context worker killed after answering (before the pull) makes the
//! decode worker prefill locally with the same result; an export nobody pulls expires and is
//! freed (context heartbeats go back to zero pinned blocks).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_protocol::messages::{
    self, GenerateJob, Heartbeat, KvHandle, SamplingSpec, StopSpec, StreamMessage,
};
use tandem_protocol::subjects::Subjects;

const SERVED: &str = "disagg-test";

fn model_dir() -> PathBuf {
    let root = std::env::var_os("TANDEM_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-models"));
    let dir = root.join("smollm2-bf16");
    assert!(
        dir.join("config.json").is_file(),
        "{} is missing: run scripts/test-models",
        dir.display()
    );
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// A child killed on drop, its stderr lines collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        let name = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    fn wait_for(&mut self, needle: &str) {
        let start = Instant::now();
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "process exited before printing `{needle}`"
            );
            assert!(start.elapsed() < Duration::from_secs(120), "no `{needle}`");
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

fn start_nats() -> (Proc, String) {
    let port = free_port();
    let mut command = Command::new("/usr/sbin/nats-server");
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let proc = Proc::spawn("nats", command);
    let start = Instant::now();
    // Ready once it greets: a starting nats-server can accept and reset connections.
    while !tandem_protocol::ready::nats_greets(
        ([127, 0, 0, 1], port).into(),
        Duration::from_secs(2),
    ) {
        assert!(start.elapsed() < Duration::from_secs(10), "nats-server");
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, format!("nats://127.0.0.1:{port}"))
}

fn start_worker(nats: &str, role: &str, id: &str, extra: &[&str]) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .args(["--role", role, "--model"])
        .arg(model_dir())
        .args([
            "--nats",
            nats,
            "--served-model-name",
            SERVED,
            "--worker-id",
            id,
            "--threads",
            "1",
            "--heartbeat-ms",
            "200",
        ])
        .args(extra)
        .env("RUST_LOG", "info,tandem_workers=debug");
    let mut proc = Proc::spawn(id, command);
    proc.wait_for("joined the deployment");
    proc
}

/// `worker generate --chat --json` for `prompt`.
fn reference(prompt: &str, max_tokens: u32, seed: Option<u64>) -> serde_json::Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command
        .arg("generate")
        .arg("--model")
        .arg(model_dir())
        .args(["--chat", "--json", "--prompt", prompt])
        .args(["--max-tokens", &max_tokens.to_string()]);
    if let Some(seed) = seed {
        command.args(["--temperature", "0.8", "--seed", &seed.to_string()]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

fn job(request_id: &str, prompt_ids: Vec<u32>, max_tokens: u32, seed: Option<u64>) -> GenerateJob {
    GenerateJob {
        request_id: request_id.into(),
        prompt_ids,
        sampling: SamplingSpec {
            temperature: if seed.is_some() { 0.8 } else { 0.0 },
            seed,
            ..SamplingSpec::default()
        },
        stop: StopSpec {
            max_tokens,
            ..StopSpec::default()
        },
        stream_subject: Subjects::new(SERVED).stream(request_id),
        deadline_unix_ms: None,
        kv: None,
    }
}

/// Reads stream messages until one satisfies `done` (or 60 s pass).
async fn read_until(
    stream: &mut async_nats::Subscriber,
    mut done: impl FnMut(&StreamMessage) -> bool,
) -> Vec<StreamMessage> {
    let mut out = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a stream message within 60 s")
            .expect("the subscription is open");
        let message: StreamMessage = messages::decode("stream", &message.payload).unwrap();
        let finished = done(&message);
        out.push(message);
        if finished {
            return out;
        }
    }
}

/// Publishes `job` as a prefill job to the context worker `ctx` and returns its handle.
async fn prefill(
    client: &async_nats::Client,
    stream: &mut async_nats::Subscriber,
    job: &GenerateJob,
) -> KvHandle {
    client
        .publish(
            Subjects::new(SERVED).prefill_direct("ctx"),
            messages::encode(job).into(),
        )
        .await
        .unwrap();
    let prefill = read_until(stream, |m| {
        matches!(
            m,
            StreamMessage::KvReady { .. } | StreamMessage::Error { .. }
        )
    })
    .await;
    match prefill.last().cloned() {
        Some(StreamMessage::KvReady { handle }) => handle,
        _ => panic!("no kv_ready: {prefill:?}"),
    }
}

/// Publishes `job` (with its handle) as a decode job to `dec` and returns its messages up
/// to the last one.
async fn decode(
    client: &async_nats::Client,
    stream: &mut async_nats::Subscriber,
    job: &GenerateJob,
) -> Vec<StreamMessage> {
    client
        .publish(
            Subjects::new(SERVED).generate_direct("dec"),
            messages::encode(job).into(),
        )
        .await
        .unwrap();
    read_until(stream, |m| {
        matches!(
            m,
            StreamMessage::Finished { .. } | StreamMessage::Error { .. }
        )
    })
    .await
}

/// The next heartbeat of any worker (within 5 s).
async fn next_heartbeat(heartbeats: &mut async_nats::Subscriber) -> Heartbeat {
    let message = tokio::time::timeout(Duration::from_secs(5), heartbeats.next())
        .await
        .expect("a heartbeat within 5 s")
        .expect("the subscription is open");
    messages::decode("heartbeat", &message.payload).unwrap()
}

/// Runs one disaggregated request; returns (token ids, text, KvPulled message).
async fn disaggregated(
    client: &async_nats::Client,
    mut job: GenerateJob,
    kill_context_after_prefill: Option<&mut Proc>,
) -> (Vec<u32>, String, StreamMessage) {
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    let handle = prefill(client, &mut stream, &job).await;
    if let Some(context) = kill_context_after_prefill {
        let _ = context.child.kill();
        let _ = context.child.wait();
    }
    job.kv = Some(handle);
    let decode = decode(client, &mut stream, &job).await;
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut pulled = None;
    for message in decode {
        match message {
            StreamMessage::Tokens { tokens } => {
                for t in tokens {
                    ids.push(t.id);
                    text.push_str(&t.text);
                }
            }
            StreamMessage::KvPulled { .. } => pulled = Some(message),
            StreamMessage::Error { message } => panic!("decode failed: {message}"),
            _ => {}
        }
    }
    (
        ids,
        text,
        pulled.expect("the decode worker reports the pull"),
    )
}

fn prompt_ids(reference: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(reference["prompt_ids"].clone()).unwrap()
}

fn output_ids(reference: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(reference["output_ids"].clone()).unwrap()
}

#[tokio::test]
async fn context_and_decode_workers_reproduce_worker_generate_over_ucx() {
    let (_nats, url) = start_nats();
    let mut context = start_worker(
        &url,
        "context",
        "ctx",
        &["--kv-transfer-timeout-ms", "1500"],
    );
    let _decode = start_worker(&url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();

    let cases = [
        ("What is the capital of France?", None),
        ("Write a haiku about the sea.", None),
        ("Tell me a story about a dragon.", Some(11u64)),
    ];
    for (i, (prompt, seed)) in cases.iter().enumerate() {
        let expected = reference(prompt, 24, *seed);
        let (ids, text, pulled) = disaggregated(
            &client,
            job(&format!("r{i}"), prompt_ids(&expected), 24, *seed),
            None,
        )
        .await;
        assert_eq!(ids, output_ids(&expected), "{prompt}");
        assert_eq!(text, expected["text"], "{prompt}");
        let StreamMessage::KvPulled {
            bytes, fallback, ..
        } = pulled
        else {
            unreachable!()
        };
        assert!(fallback.is_none(), "{fallback:?}");
        // bf16 SmolLM2: 30 layers x K,V x 3 heads x 64 dims x 2 bytes per token, whole blocks.
        let blocks = prompt_ids(&expected).len().div_ceil(16) as u64;
        assert_eq!(bytes, blocks * 16 * 30 * 2 * 3 * 64 * 2);
    }

    // Every KV block is free again on both workers, and nothing is pinned.
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    let mut settled = std::collections::HashSet::new();
    let start = Instant::now();
    while settled.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "blocks were not all freed"
        );
        let beat = next_heartbeat(&mut heartbeats).await;
        let pinned = beat.kv_transfer.map_or(0, |s| s.pinned_blocks);
        if beat.free_kv_blocks == beat.total_kv_blocks && pinned == 0 && beat.running == 0 {
            settled.insert(beat.worker_id);
        }
    }

    // An export nobody pulls expires: heartbeats show it pinned, then freed.
    let expected = reference("Hi", 8, None);
    let orphan = job("orphan", prompt_ids(&expected), 8, None);
    let mut stream = client
        .subscribe(orphan.stream_subject.clone())
        .await
        .unwrap();
    prefill(&client, &mut stream, &orphan).await;
    let start = Instant::now();
    let (mut saw_pinned, mut expired) = (false, false);
    while !expired {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the export did not expire"
        );
        let beat = next_heartbeat(&mut heartbeats).await;
        if let Some(stats) = beat.kv_transfer {
            saw_pinned |= stats.pinned_blocks > 0;
            expired = stats.expirations >= 1 && stats.pinned_blocks == 0;
        }
    }
    assert!(
        saw_pinned,
        "the export was visible as pinned before it expired"
    );

    // The context worker dies after answering, before the pull: the decode worker prefills
    // locally with the handle's seed, so the output is still the reference.
    let expected = reference("Name three colors.", 16, Some(3));
    let (ids, _, pulled) = disaggregated(
        &client,
        job("after-kill", prompt_ids(&expected), 16, Some(3)),
        Some(&mut context),
    )
    .await;
    assert_eq!(ids, output_ids(&expected));
    let StreamMessage::KvPulled { fallback, .. } = pulled else {
        unreachable!()
    };
    assert!(fallback.is_some(), "the pull from a dead worker fails over");
}

#[test]
fn handles_serialize_with_their_layout() {
    // The handle is the contract between two processes: check one survives the wire as is.
    let handle: KvHandle = serde_json::from_value(serde_json::json!({
        "worker_id": "ctx", "backend": "ucx", "address": "00ff", "rkey": "10",
        "blocks": [{"addr": 4096, "len": 128}],
        "layout": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16,
                   "dtype": "bf16", "block_bytes": 368640},
        "num_tokens": 5, "first_token": {"id": 7, "text": "a"}, "seed": 1,
        "expires_unix_ms": 10
    }))
    .unwrap();
    let json = serde_json::to_value(&handle).unwrap();
    assert_eq!(json["layout"]["block_bytes"], 368640);
    assert_eq!(serde_json::from_value::<KvHandle>(json).unwrap(), handle);
}

#[tokio::test]
async fn a_layout_mismatch_is_an_error_never_garbage() {
    let (_nats, url) = start_nats();
    let _context = start_worker(&url, "context", "ctx", &[]);
    // Same model, other block size: the handle's layout differs from the decode worker's.
    let _decode = start_worker(&url, "decode", "dec", &["--block-size", "32"]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let expected = reference("Hi", 4, None);
    let mut job = job("mismatch", prompt_ids(&expected), 4, None);
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    job.kv = Some(prefill(&client, &mut stream, &job).await);
    let decode = decode(&client, &mut stream, &job).await;
    assert!(
        !decode
            .iter()
            .any(|m| matches!(m, StreamMessage::Tokens { .. })),
        "no token from a mismatched cache: {decode:?}"
    );
    match decode.last() {
        Some(StreamMessage::Error { message }) => {
            assert!(message.contains("KV layout mismatch"), "{message}");
            assert!(
                message.contains("block_size: 16") && message.contains("block_size: 32"),
                "{message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}
