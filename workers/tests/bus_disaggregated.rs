//! Disaggregated serving at the bus level, with real processes: a nats-server, a
//! `worker --role context` and a `worker --role decode` on SmolLM2 (bf16), the KV cache moving
//! between them over UCX. This test plays the api-server's part with a NATS client: prefill
//! job to the context worker, its `kv_ready` handle in a decode job to the decode worker.
//!
//! Shows: the tokens equal `worker generate`'s, greedy and seeded; the decode worker reports
//! the bytes it pulled; a context worker killed after answering (before the pull) makes the
//! decode worker prefill locally with the same result; an export nobody pulls expires and is
//! freed (context heartbeats go back to zero pinned blocks).
//!
//! On a GPU machine, the same with two GPU workers of one host: the K/V moves device to
//! device over CUDA IPC, read straight out of the context worker's cache whatever its size
//! (and through host memory over UCX when the reader cannot read CUDA IPC), with the tokens of
//! `worker generate` on the GPU. Without a CUDA driver that test
//! says so and passes without running (CI has no GPU).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_protocol::messages::{
    self, GenerateJob, GrammarSpec, Heartbeat, KvHandle, KvPeer, PullOutcome, SamplingSpec,
    StopSpec, StreamMessage,
};
use tandem_protocol::subjects::Subjects;
use tandem_test_kit::{Nats, Proc, WorkerSpec, bin};

const SERVED: &str = "disagg-test";

fn model_dir() -> PathBuf {
    tandem_test_kit::model_dir("smollm2-bf16")
}

fn start_worker(nats: &str, role: &str, id: &str, extra: &[&str]) -> Proc {
    start_worker_on(&model_dir(), nats, role, id, extra)
}

fn start_worker_on(model: &Path, nats: &str, role: &str, id: &str, extra: &[&str]) -> Proc {
    let spec = WorkerSpec {
        role,
        worker_id: id,
        served_model_name: SERVED,
        threads: 1,
        heartbeat_ms: 200,
        extra,
    };
    tandem_test_kit::start_worker(nats, model, &spec)
}

/// `worker generate --chat --json` for `prompt`.
fn reference(prompt: &str, max_tokens: u32, seed: Option<u64>) -> serde_json::Value {
    reference_on(&model_dir(), "cpu", prompt, max_tokens, seed)
}

/// [`reference`] greedy, with a KV cache of `kv_dtype`.
fn reference_with_kv(prompt: &str, max_tokens: u32, kv_dtype: &str) -> serde_json::Value {
    let output = Command::new(bin("worker"))
        .arg("generate")
        .arg("--model")
        .arg(model_dir())
        .args(["--kv-cache-dtype", kv_dtype])
        .args(["--chat", "--json", "--prompt", prompt])
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

/// [`reference`] for the model in `model`, on `device`.
fn reference_on(
    model: &Path,
    device: &str,
    prompt: &str,
    max_tokens: u32,
    seed: Option<u64>,
) -> serde_json::Value {
    let mut command = Command::new(bin("worker"));
    command
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--device", device])
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
        lora: None,
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
        kv_reader: None,
        resume_ids: Vec::new(),
        samples: None,
        cache_salt: None,
        priority: 0,
        prediction_ids: Vec::new(),
        embedding: false,
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
    prefill_on(client, stream, job, "ctx").await
}

/// [`prefill`] on context worker `context_id`.
async fn prefill_on(
    client: &async_nats::Client,
    stream: &mut async_nats::Subscriber,
    job: &GenerateJob,
    context_id: &str,
) -> KvHandle {
    client
        .publish(
            Subjects::new(SERVED).prefill_direct(context_id),
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
        Some(StreamMessage::KvReady { handle, .. }) => *handle,
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

/// Waits (10 s at most) until `workers` workers have each sent a heartbeat with every KV block
/// free, nothing pinned for a decode worker and nothing running.
async fn wait_until_every_block_is_free(heartbeats: &mut async_nats::Subscriber, workers: usize) {
    let mut settled = std::collections::HashSet::new();
    let start = Instant::now();
    while settled.len() < workers {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "blocks were not all freed"
        );
        let beat = next_heartbeat(heartbeats).await;
        let pinned = beat.kv_transfer.map_or(0, |s| s.pinned_blocks);
        if beat.free_kv_blocks == beat.total_kv_blocks && pinned == 0 && beat.running == 0 {
            settled.insert(beat.worker_id);
        }
    }
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
        context.kill();
    }
    job.kv = Some(handle);
    let decode = decode(client, &mut stream, &job).await;
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut pulled = None;
    for message in decode {
        match message {
            StreamMessage::Tokens { tokens, .. } => {
                for t in tokens {
                    ids.push(t.id);
                    text.push_str(&t.text);
                }
            }
            StreamMessage::KvPulled { .. } => pulled = Some(message),
            StreamMessage::Error { message, .. } => panic!("decode failed: {message}"),
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
    let nats = Nats::start();
    let url = &nats.url;
    let mut context = start_worker(url, "context", "ctx", &["--kv-transfer-timeout-ms", "1500"]);
    let _decode = start_worker(url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();

    let cases = [
        ("What is the capital of France?", None),
        ("Write a haiku about the sea.", None),
        ("Tell me a story about a dragon.", Some(11u64)),
    ];
    for (i, (prompt, seed)) in cases.iter().enumerate() {
        let expected = reference(prompt, 24, *seed);
        // Each under its own salt: the prompts share the chat template's first tokens, which
        // the decode worker would otherwise hold cached from the first case and not pull.
        let mut job = job(&format!("r{i}"), prompt_ids(&expected), 24, *seed);
        job.cache_salt = Some(format!("case-{i}"));
        let (ids, text, pulled) = disaggregated(&client, job, None).await;
        assert_eq!(ids, output_ids(&expected), "{prompt}");
        assert_eq!(text, expected["text"], "{prompt}");
        let StreamMessage::KvPulled { bytes, outcome, .. } = pulled else {
            unreachable!()
        };
        assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
        // bf16 SmolLM2: 30 layers x K,V x 3 heads x 64 dims x 2 bytes per token, whole blocks.
        let blocks = prompt_ids(&expected).len().div_ceil(16) as u64;
        assert_eq!(bytes, blocks * 16 * 30 * 2 * 3 * 64 * 2);
    }

    // Every KV block is free again on both workers, and nothing is pinned.
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    wait_until_every_block_is_free(&mut heartbeats, 2).await;

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
    let StreamMessage::KvPulled { outcome, .. } = pulled else {
        unreachable!()
    };
    assert!(
        matches!(outcome, PullOutcome::Fallback { .. }),
        "the pull from a dead worker fails over"
    );
}

/// The next heartbeat of `worker` (within 10 s).
async fn heartbeat_of(heartbeats: &mut async_nats::Subscriber, worker: &str) -> Heartbeat {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no heartbeat of {worker}"
        );
        let beat = next_heartbeat(heartbeats).await;
        if beat.worker_id == worker {
            return beat;
        }
    }
}

/// Waits until a heartbeat of `worker` satisfies `done`, within `limit`; returns it.
async fn wait_for_heartbeat(
    heartbeats: &mut async_nats::Subscriber,
    worker: &str,
    limit: Duration,
    done: impl Fn(&Heartbeat) -> bool,
) -> Heartbeat {
    let start = Instant::now();
    loop {
        let beat = heartbeat_of(heartbeats, worker).await;
        if done(&beat) {
            return beat;
        }
        assert!(
            start.elapsed() < limit,
            "{worker}: not within {limit:?}: {beat:?}"
        );
    }
}

/// The hand-over without copies: a CPU context worker's export is the prompt's
/// blocks in its own KV cache, registered with UCX once. They stay pinned (not free in the
/// cache, counted in `kv_transfer.pinned_blocks`) from `kv_ready` until the decode worker's
/// release, which frees them, every block of the cache free again; the decode worker reads
/// them out of the cache (its handle names them where they lie) and continues with
/// `worker generate`'s tokens. An export nobody releases stays pinned until it expires, and
/// its blocks are free again within the expiry and its grace period.
#[tokio::test]
async fn an_exports_blocks_stay_pinned_in_the_context_cache_until_release_or_expiry() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", &["--kv-transfer-timeout-ms", "1000"]);
    let _decode = start_worker(url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    let idle = heartbeat_of(&mut heartbeats, "ctx").await;
    let total = idle.total_kv_blocks;
    assert_eq!(idle.free_kv_blocks, total);

    let expected = reference("Tell me a story about a dragon.", 12, None);
    let job = job("pinned", prompt_ids(&expected), 12, None);
    let blocks = prompt_ids(&expected).len().div_ceil(16) as u32;
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    let handle = prefill(&client, &mut stream, &job).await;
    assert_eq!(handle.backend.as_str(), "ucx");
    assert!(
        !handle.blocks.is_empty() && handle.blocks.len() as u32 <= blocks,
        "runs of the prompt's blocks where they lie in the cache: {:?}",
        handle.blocks
    );
    // Pinned: held for the decode worker, and not free in the cache.
    let beat = wait_for_heartbeat(&mut heartbeats, "ctx", Duration::from_secs(5), |b| {
        b.kv_transfer.is_some_and(|s| s.pinned_blocks == blocks)
    })
    .await;
    assert_eq!(
        beat.free_kv_blocks,
        total - blocks,
        "the export's blocks are in use"
    );

    let mut decoding = job.clone();
    decoding.kv = Some(handle);
    let messages = decode(&client, &mut stream, &decoding).await;
    let ids: Vec<u32> = messages
        .iter()
        .flat_map(|m| match m {
            StreamMessage::Tokens { tokens, .. } => tokens.iter().map(|t| t.id).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(ids, output_ids(&expected));
    let pulled = messages.iter().find_map(|m| match m {
        StreamMessage::KvPulled { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    assert!(
        matches!(pulled, Some(PullOutcome::Pulled { .. })),
        "{pulled:?}"
    );
    // Released after the pull: every block of the cache is free again.
    wait_for_heartbeat(&mut heartbeats, "ctx", Duration::from_secs(5), |b| {
        b.free_kv_blocks == total && b.kv_transfer.is_some_and(|s| s.pinned_blocks == 0)
    })
    .await;

    // Nobody pulls this one: pinned until it expires (1 s) and its grace period (5 s) is
    // over, then free.
    let orphan = job_with_id(&job, "orphan");
    let mut stream = client
        .subscribe(orphan.stream_subject.clone())
        .await
        .unwrap();
    prefill(&client, &mut stream, &orphan).await;
    let pinned_at = Instant::now();
    wait_for_heartbeat(&mut heartbeats, "ctx", Duration::from_secs(5), |b| {
        b.free_kv_blocks == total - blocks
    })
    .await;
    let freed = wait_for_heartbeat(&mut heartbeats, "ctx", Duration::from_secs(10), |b| {
        b.free_kv_blocks == total
    })
    .await;
    let stats = freed.kv_transfer.expect("a context worker's stats");
    assert_eq!((stats.pinned_blocks, stats.expirations), (0, 1));
    assert!(
        pinned_at.elapsed() >= Duration::from_secs(1),
        "not unpinned before its expiry"
    );
}

/// `job` under another request id (and stream).
fn job_with_id(job: &GenerateJob, request_id: &str) -> GenerateJob {
    GenerateJob {
        request_id: request_id.into(),
        stream_subject: Subjects::new(SERVED).stream(request_id),
        ..job.clone()
    }
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
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", &[]);
    // Same model, other block size: the handle's layout differs from the decode worker's.
    let _decode = start_worker(url, "decode", "dec", &["--block-size", "32"]);
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
        Some(StreamMessage::Error { message, .. }) => {
            assert!(message.contains("KV layout mismatch"), "{message}");
            assert!(
                message.contains("block_size: 16") && message.contains("block_size: 32"),
                "{message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Context and decode workers with FP8 KV caches hand prompts over as FP8 blocks, half the
/// bytes of bf16 ones, and continue exactly as one worker generating with an FP8 cache alone.
#[tokio::test]
async fn fp8_caches_hand_over_fp8_blocks() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", &["--kv-cache-dtype", "fp8"]);
    let _decode = start_worker(url, "decode", "dec", &["--kv-cache-dtype", "fp8"]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let prompt = "What is the capital of France?";
    let expected = reference_with_kv(prompt, 24, "fp8");
    let job = job("fp8", prompt_ids(&expected), 24, None);
    let (ids, text, pulled) = disaggregated(&client, job, None).await;
    assert_eq!(ids, output_ids(&expected));
    assert_eq!(text, expected["text"]);
    let StreamMessage::KvPulled { bytes, outcome, .. } = pulled else {
        unreachable!()
    };
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    // 30 layers x K,V x 3 heads x 64 dims x 1 byte per token, whole blocks.
    let blocks = prompt_ids(&expected).len().div_ceil(16) as u64;
    assert_eq!(bytes, blocks * 16 * 30 * 2 * 3 * 64);
}

/// A decode worker of a bf16 cache refuses a context worker's FP8 blocks by their layout,
/// naming both element types, and reads nothing.
#[tokio::test]
async fn a_bf16_decode_worker_refuses_fp8_blocks() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", &["--kv-cache-dtype", "fp8"]);
    let _decode = start_worker(url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let expected = reference("Hi", 4, None);
    let mut job = job("fp8-to-bf16", prompt_ids(&expected), 4, None);
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    let handle = prefill(&client, &mut stream, &job).await;
    assert_eq!(handle.layout.dtype.as_str(), "fp8");
    job.kv = Some(handle);
    let decode = decode(&client, &mut stream, &job).await;
    assert!(
        !decode
            .iter()
            .any(|m| matches!(m, StreamMessage::Tokens { .. })),
        "no token from a cache of another type: {decode:?}"
    );
    match decode.last() {
        Some(StreamMessage::Error { message, .. }) => {
            assert!(message.contains("KV layout mismatch"), "{message}");
            assert!(
                message.contains(r#"dtype: "fp8""#) && message.contains(r#"dtype: "bf16""#),
                "{message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A job whose grammar does not compile (the api-server compiles it at the edge, but a job may
/// come from another client of the bus) ends with an error that says so, on a context and on
/// a decode worker, never a hang; both serve the next job.
#[tokio::test]
async fn a_grammar_that_does_not_compile_ends_the_job_with_an_error() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", &[]);
    let _decode = start_worker(url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let expected = reference("Hi", 4, None);
    let subjects = Subjects::new(SERVED);
    for (subject, name) in [
        (subjects.prefill_direct("ctx"), "ctx"),
        (subjects.generate_direct("dec"), "dec"),
    ] {
        let mut bad = job(
            &format!("bad-grammar-{name}"),
            prompt_ids(&expected),
            4,
            None,
        );
        bad.sampling.grammar = Some(GrammarSpec::Lark {
            grammar: "start: undefined_rule".into(),
        });
        let mut stream = client.subscribe(bad.stream_subject.clone()).await.unwrap();
        client
            .publish(subject, messages::encode(&bad).into())
            .await
            .unwrap();
        let answer = read_until(&mut stream, |m| {
            matches!(
                m,
                StreamMessage::Error { .. }
                    | StreamMessage::Finished { .. }
                    | StreamMessage::KvReady { .. }
            )
        })
        .await;
        match answer.last() {
            Some(StreamMessage::Error { message, .. }) => assert!(
                message.contains("does not compile") && message.contains("undefined_rule"),
                "{name}: {message}"
            ),
            other => panic!("{name}: expected an error, got {other:?}"),
        }
    }
    let mut good = job("after-bad-grammars", prompt_ids(&expected), 4, None);
    let mut stream = client.subscribe(good.stream_subject.clone()).await.unwrap();
    good.kv = Some(prefill(&client, &mut stream, &good).await);
    let answer = decode(&client, &mut stream, &good).await;
    assert!(
        matches!(answer.last(), Some(StreamMessage::Finished { .. })),
        "{answer:?}"
    );
}

/// The test model under another name in a temporary directory, the same but for one more
/// key in its config.json: a model of the same shapes (so of the same KV layout) with another
/// fingerprint. The weights are hard-linked (copied where links fail).
fn variant_of_model(dir: &Path) -> PathBuf {
    let variant = std::env::temp_dir().join(format!("tandem-model-variant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&variant);
    std::fs::create_dir_all(&variant).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let from = entry.unwrap().path();
        let to = variant.join(from.file_name().unwrap());
        if from.file_name().unwrap() == "config.json" {
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&from).unwrap()).unwrap();
            config["tandem_test_variant"] = serde_json::json!(1);
            std::fs::write(&to, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        } else if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    variant
}

/// A decode worker refuses the KV of another model even when its layout matches,
/// and serves on: the same job without a handle is then prefilled locally and answered.
#[tokio::test]
async fn a_handle_of_another_model_is_refused_and_the_worker_serves_on() {
    let nats = Nats::start();
    let url = &nats.url;
    let variant = variant_of_model(&model_dir());
    let _context = start_worker(url, "context", "ctx", &[]);
    let _decode = start_worker_on(&variant, url, "decode", "dec", &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let expected = reference("Hi", 4, None);
    let mut job = job("other-model", prompt_ids(&expected), 4, None);
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    let handle = prefill(&client, &mut stream, &job).await;
    assert_eq!(handle.model_fingerprint.len(), 32, "{handle:?}");
    job.kv = Some(handle);
    let refused = decode(&client, &mut stream, &job).await;
    assert!(
        !refused
            .iter()
            .any(|m| matches!(m, StreamMessage::Tokens { .. })),
        "no token from another model's cache: {refused:?}"
    );
    match refused.last() {
        Some(StreamMessage::Error { message, .. }) => {
            assert!(message.contains("KV of another model"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // Alive and serving: the prompt prefilled by the decode worker itself (the variant's
    // weights are the same, so its tokens are the reference's).
    let mut local = job.clone();
    local.request_id = "other-model-local".into();
    local.stream_subject = Subjects::new(SERVED).stream(&local.request_id);
    local.kv = None;
    let mut stream = client
        .subscribe(local.stream_subject.clone())
        .await
        .unwrap();
    let served = decode(&client, &mut stream, &local).await;
    let tokens: Vec<u32> = served
        .iter()
        .filter_map(|m| match m {
            StreamMessage::Tokens { tokens, .. } => Some(tokens.iter().map(|t| t.id)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(tokens, output_ids(&expected), "{served:?}");
    let _ = std::fs::remove_dir_all(&variant);
}

/// A release for an export the context worker never made (forged, or late) is dropped and
/// counted in its heartbeat (`tandem_kv_unmatched_releases_total` on the api-server), and the
/// worker goes on heartbeating.
#[tokio::test]
async fn a_foreign_release_is_counted_and_ignored() {
    let nats = Nats::start();
    let _context = start_worker(&nats.url, "context", "ctx", &[]);
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let mut heartbeats = client
        .subscribe(Subjects::new(SERVED).heartbeat_all())
        .await
        .unwrap();
    let release = messages::KvRelease {
        request_id: "never-exported".into(),
    };
    client
        .publish(
            Subjects::new(SERVED).kv_release("ctx"),
            messages::encode(&release).into(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no heartbeat counted the release"
        );
        let stats = next_heartbeat(&mut heartbeats).await.kv_transfer.unwrap();
        if stats.unmatched_releases == 1 {
            assert_eq!((stats.releases, stats.pinned_blocks), (0, 0));
            break;
        }
    }
}

/// The model of the GPU test: `TANDEM_GPU_TEST_MODEL`, else the `tiny` test model.
fn gpu_model_dir() -> PathBuf {
    let dir = std::env::var_os("TANDEM_GPU_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| tandem_test_kit::model_dir("tiny"));
    assert!(
        dir.join("config.json").is_file(),
        "{} is missing: run scripts/test-models or set TANDEM_GPU_TEST_MODEL",
        dir.display()
    );
    dir
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The `kv_peer` of worker `id`'s next heartbeat that has one.
async fn kv_peer_of(heartbeats: &mut async_nats::Subscriber, id: &str) -> KvPeer {
    heartbeat_of(heartbeats, id)
        .await
        .kv_peer
        .expect("context and decode workers advertise kv_peer")
}

/// One disaggregated request through the bus with `reader` on its prefill job, sent to the
/// decode worker `decode_id`; returns the handle's backend, the tokens and the KvPulled.
async fn disaggregated_via(
    client: &async_nats::Client,
    job: GenerateJob,
    reader: Option<KvPeer>,
    decode_id: &str,
) -> (String, Vec<u32>, StreamMessage) {
    disaggregated_between(client, job, reader, "ctx", decode_id).await
}

/// [`disaggregated_via`], prefilled by context worker `context_id`.
async fn disaggregated_between(
    client: &async_nats::Client,
    mut job: GenerateJob,
    reader: Option<KvPeer>,
    context_id: &str,
    decode_id: &str,
) -> (String, Vec<u32>, StreamMessage) {
    job.kv_reader = reader;
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    let handle = prefill_on(client, &mut stream, &job, context_id).await;
    let backend = handle.backend.to_string();
    job.kv_reader = None;
    job.kv = Some(handle);
    client
        .publish(
            Subjects::new(SERVED).generate_direct(decode_id),
            messages::encode(&job).into(),
        )
        .await
        .unwrap();
    let messages = read_until(&mut stream, |m| {
        matches!(
            m,
            StreamMessage::Finished { .. } | StreamMessage::Error { .. }
        )
    })
    .await;
    let mut ids = Vec::new();
    let mut pulled = None;
    for message in messages {
        match message {
            StreamMessage::Tokens { tokens, .. } => ids.extend(tokens.iter().map(|t| t.id)),
            StreamMessage::KvPulled { .. } => pulled = Some(message),
            StreamMessage::Error { message, .. } => panic!("decode failed: {message}"),
            _ => {}
        }
    }
    (
        backend,
        ids,
        pulled.expect("the decode worker reports the pull"),
    )
}

#[tokio::test]
async fn gpu_workers_of_one_host_move_kv_device_to_device_over_cuda_ipc() {
    if !tandem_workers::backend::cuda::driver_present() {
        tandem_test_skip::skip("no CUDA driver on this machine");
        return;
    }
    let model = gpu_model_dir();
    // Both on cuda:0 unless told otherwise (`cuda:1` on a machine with two GPUs).
    let decode_device =
        std::env::var("TANDEM_TEST_DECODE_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let nats = Nats::start();
    let url = &nats.url;
    let gpu = |device: &str| {
        vec![
            "--device".to_string(),
            device.to_string(),
            "--kv-cache-tokens".into(),
            "16384".into(),
        ]
    };
    // 1 MiB: what used to cap CUDA IPC transfers (pools of that size); now exports are the
    // context worker's cache blocks and pulls land in the decode worker's, and a pool size
    // other than 0 changes nothing. The long prompt moves far more than that (about 23 MB on
    // SmolLM2 shapes), device to device all the same.
    let mut context_args = gpu("cuda:0");
    context_args.extend(["--cuda-ipc-pool-mb".into(), "1".into()]);
    let mut decode_args = gpu(&decode_device);
    decode_args.extend(["--cuda-ipc-pool-mb".into(), "1".into()]);
    let mut no_ipc_args = gpu(&decode_device);
    no_ipc_args.extend(["--cuda-ipc-pool-mb".into(), "0".into()]);
    let _context = start_worker_on(&model, url, "context", "ctx", &strs(&context_args));
    let decode = start_worker_on(&model, url, "decode", "dec", &strs(&decode_args));
    let _no_ipc = start_worker_on(&model, url, "decode", "dec-no-ipc", &strs(&no_ipc_args));
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    let reader = kv_peer_of(&mut heartbeats, "dec").await;
    assert!(
        reader.cuda_ipc && reader.cuda_ipc_ranks,
        "a GPU decode worker reads CUDA IPC, of tensor-parallel exporters too"
    );
    assert!(
        !kv_peer_of(&mut heartbeats, "dec-no-ipc").await.cuda_ipc,
        "--cuda-ipc-pool-mb 0 turns it off"
    );

    let prompt = "Once upon a time there was a small village by the sea where every morning \
                  the fishermen went out before dawn and came back with the tide";
    // About a thousand tokens (SmolLM2's tokenizer): an export of many blocks, for models
    // whose context holds it.
    let long = prompt.repeat(30);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    let mut cases = vec![(prompt, None), (prompt, Some(5u64)), ("Hi", None)];
    if config["max_position_embeddings"].as_u64().unwrap_or(0) >= 4096 {
        cases.push((long.as_str(), None));
    }
    for (i, (prompt, seed)) in cases.iter().enumerate() {
        let expected = reference_on(&model, "cuda:0", prompt, 16, *seed);
        let job = || job(&format!("g{i}"), prompt_ids(&expected), 16, *seed);
        for (label, reader, decode_id, backend) in [
            ("cuda-ipc", Some(reader.clone()), "dec", "cuda-ipc"),
            // No reader said (or one that cannot read CUDA IPC): host memory over UCX.
            ("ucx", None, "dec", "ucx"),
            (
                "ucx to a worker without CUDA IPC",
                None,
                "dec-no-ipc",
                "ucx",
            ),
        ] {
            let (exported, ids, pulled) =
                disaggregated_via(&client, job(), reader, decode_id).await;
            assert_eq!(exported, backend, "{label}: the export's transport");
            assert_eq!(
                ids,
                output_ids(&expected),
                "{label}: {prompt} seed {seed:?}"
            );
            let StreamMessage::KvPulled {
                bytes,
                micros,
                outcome,
                ..
            } = pulled
            else {
                unreachable!()
            };
            let PullOutcome::Pulled { transport } = &outcome else {
                panic!("{label}: {outcome:?}")
            };
            assert_eq!(transport.as_str(), backend, "{label}");
            eprintln!(
                "{label}: {bytes} bytes pulled in {micros} us ({} prompt tokens){}",
                prompt_ids(&expected).len(),
                if bytes > 1 << 20 {
                    ", past the 1 MiB pools"
                } else {
                    ""
                }
            );
        }
        // A CUDA IPC export handed to a decode worker without CUDA IPC: it cannot read it, so
        // it prefills locally (same tokens) instead of reading garbage.
        let (exported, ids, pulled) =
            disaggregated_via(&client, job(), Some(reader.clone()), "dec-no-ipc").await;
        assert_eq!(exported, "cuda-ipc");
        assert_eq!(
            ids,
            output_ids(&expected),
            "local prefill after an unreadable handle"
        );
        let StreamMessage::KvPulled { outcome, .. } = pulled else {
            unreachable!()
        };
        let PullOutcome::Fallback { reason: fallback } = outcome else {
            panic!("the pull falls back")
        };
        assert!(fallback.contains("does not read CUDA IPC"), "{fallback}");
    }

    // Every block is free again on every worker, nothing is pinned, and the reader still
    // advertises CUDA IPC (none of its reads failed).
    wait_until_every_block_is_free(&mut heartbeats, 3).await;
    assert!(kv_peer_of(&mut heartbeats, "dec").await.cuda_ipc);
    drop(decode);
}

/// CUDA IPC between tensor-parallel workers on two GPUs: a context worker of 2 ranks
/// (cuda:0-1) hands prompts to a decode worker of 1 (cuda:1), one of 1 (cuda:0) to one of 2
/// (cuda:0-1), and 2 to 2, each device to device (the heads re-laid on the way where the sizes
/// differ), with the tokens of one GPU's `worker generate` (the tiny model's greedy and
/// seeded tokens agree across tensor-parallel sizes). Needs two GPUs; skipped, saying so,
/// otherwise.
#[tokio::test]
async fn tensor_parallel_gpu_workers_hand_prompts_over_cuda_ipc_device_to_device() {
    if !tandem_workers::backend::cuda::driver_present() {
        tandem_test_skip::skip("no CUDA driver on this machine");
        return;
    }
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    if gpus < 2 {
        tandem_test_skip::skip(format!(
            "tensor parallelism needs two GPUs, this machine has {gpus}"
        ));
        return;
    }
    let model = gpu_model_dir();
    let nats = Nats::start();
    let url = &nats.url;
    let worker = |device: &str, ranks: &str| {
        vec![
            "--device".to_string(),
            device.to_string(),
            "--tensor-parallel".into(),
            ranks.into(),
            "--kv-cache-tokens".into(),
            "16384".into(),
        ]
    };
    let _ctx2 = start_worker_on(
        &model,
        url,
        "context",
        "ctx-tp2",
        &strs(&worker("cuda:0", "2")),
    );
    let _ctx1 = start_worker_on(
        &model,
        url,
        "context",
        "ctx-tp1",
        &strs(&worker("cuda:0", "1")),
    );
    let _dec1 = start_worker_on(
        &model,
        url,
        "decode",
        "dec-tp1",
        &strs(&worker("cuda:1", "1")),
    );
    let _dec2 = start_worker_on(
        &model,
        url,
        "decode",
        "dec-tp2",
        &strs(&worker("cuda:0", "2")),
    );
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    let mut readers = std::collections::HashMap::new();
    for id in ["dec-tp1", "dec-tp2"] {
        let peer = kv_peer_of(&mut heartbeats, id).await;
        assert!(
            peer.cuda_ipc && peer.cuda_ipc_ranks,
            "{id} reads tensor-parallel CUDA IPC exports: {peer:?}"
        );
        readers.insert(id, peer);
    }
    let prompt = "Once upon a time there was a small village by the sea where every morning \
                  the fishermen went out before dawn and came back with the tide";
    for (i, seed) in [None, Some(11u64)].into_iter().enumerate() {
        let expected = reference_on(&model, "cuda:0", prompt, 16, seed);
        for (n, (context_id, decode_id)) in [
            ("ctx-tp2", "dec-tp1"),
            ("ctx-tp1", "dec-tp2"),
            ("ctx-tp2", "dec-tp2"),
        ]
        .into_iter()
        .enumerate()
        {
            let job = job(&format!("tp{i}-{n}"), prompt_ids(&expected), 16, seed);
            let (exported, ids, pulled) = disaggregated_between(
                &client,
                job,
                Some(readers[decode_id].clone()),
                context_id,
                decode_id,
            )
            .await;
            let label = format!("{context_id} -> {decode_id}, seed {seed:?}");
            assert_eq!(exported, "cuda-ipc", "{label}: the export's transport");
            let StreamMessage::KvPulled {
                bytes,
                micros,
                outcome,
                ..
            } = pulled
            else {
                unreachable!()
            };
            let PullOutcome::Pulled { transport } = &outcome else {
                panic!("{label}: {outcome:?}")
            };
            assert_eq!(transport.as_str(), "cuda-ipc", "{label}");
            assert_eq!(ids, output_ids(&expected), "{label}");
            eprintln!("{label}: {bytes} bytes in {micros} us, device to device");
        }
    }
    // Every block is free again on every worker, nothing is pinned.
    wait_until_every_block_is_free(&mut heartbeats, 4).await;
}
