//! No bus message exceeds the NATS server's `max_payload`, with real processes: a
//! nats-server, a context and a decode CPU worker, the api-server.
//!
//! - Against a server whose `max_payload` is 64 KiB: a prompt whose job cannot fit is refused
//!   with a 400 naming the field (`prompt`, `messages`), streamed or not, saying how many of
//!   its tokens fit — and exactly that many are served; the decode job of that prompt, which
//!   the KV handle pushes over the limit, falls back to a local prefill, counted under its own
//!   reason; a long generation with 20 alternatives per token, whose batches the decode worker
//!   must split (its stream is slowed, as over a slow bus, so one batch holds hundreds of
//!   tokens), arrives whole: every token, no migration.
//! - A long prompt is prefilled by the context worker and pulled by the decode worker (a KV
//!   transfer, no fallback) through a nats-server whose `max_payload` is 8 bytes per prompt
//!   token: nats-server's default 1 MiB for a prompt of 128k tokens
//!   (`TANDEM_TEST_LONG_PROMPT_TOKENS=131072`; by default 32k tokens and 256 KiB, since a
//!   128k-token prefill takes minutes on the CPU). The decode job fits because the handle
//!   names one region for the export, not one per block (8,192 regions of about 36 bytes
//!   would add 295 KB to a job of 918 KB).
//!
//! Both run on a random model of one layer, one head of 8 dimensions, a 120,000-token
//! vocabulary (the prompts' token ids take 6 digits on the wire) and a context of 129 Ki
//! tokens, made by `model-prep random` once per run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::SERVED_NAME;
use tandem_test_kit::prometheus::{metric, sample};
use tandem_test_kit::{ApiServer, Http, Nats, Proc, WorkerSpec, bin, temp_dir};

/// The small limit of the first test's nats-server.
const SMALL_MAX_PAYLOAD: usize = 64 * 1024;
/// Vocabulary of the test model: ids up to 119999, 6 digits on the wire.
const VOCAB: u32 = 120_000;
/// Context of the test model: 128 Ki tokens of prompt and 1 Ki to generate.
const CONTEXT: u32 = 132_096;

/// The test model, made once per test binary.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = temp_dir("bus-limits-model").join("model");
        let output = Command::new(bin("model-prep"))
            .args([
                "random", "--preset", "tiny", "--seed", "3", "--dtype", "f32",
            ])
            .args(["--num-hidden-layers", "1", "--hidden-size", "8"])
            .args(["--num-attention-heads", "1", "--num-key-value-heads", "1"])
            .args(["--intermediate-size", "16"])
            .args(["--vocab-size", &VOCAB.to_string()])
            .args(["--max-position-embeddings", &CONTEXT.to_string()])
            .arg("-o")
            .arg(&dir)
            .output()
            .expect("model-prep runs");
        assert!(
            output.status.success(),
            "model-prep random: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        dir
    })
}

/// `n` token ids spread over the upper vocabulary (6 digits each: 7 bytes with the comma),
/// none of them special.
fn prompt_ids(n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| 100_000 + (i * 7919 % u64::from(VOCAB - 100_000)) as u32)
        .collect()
}

/// A context worker and a decode worker on [`model`], joined to `nats`; `decode_env` goes
/// into the decode worker's environment.
fn start_workers(nats: &Nats, extra: &[&str], decode_env: &[(&str, &str)]) -> (Proc, Proc) {
    let start = |role: &'static str, id: &'static str, env: &[(&str, &str)]| {
        let spec = WorkerSpec {
            role,
            worker_id: id,
            served_model_name: SERVED_NAME,
            threads: 2,
            heartbeat_ms: 250,
            extra,
        };
        let mut command = spec.command(&nats.url, model());
        command.envs(env.iter().copied());
        let mut proc = Proc::spawn(id, command);
        proc.wait_for_line("joined the deployment", Duration::from_secs(60));
        proc
    };
    (
        start("context", "ctx", &[]),
        start("decode", "dec", decode_env),
    )
}

/// The api-server, with time limits for long prefills on a loaded CPU: these tests are about
/// message sizes, not liveness (a 128k-token prefill takes minutes, in steps of up to 15 s,
/// and can starve a worker's heartbeats on 2 busy cores).
fn start_api_server(nats: &Nats) -> ApiServer {
    ApiServer::start(
        nats,
        model(),
        SERVED_NAME,
        &[
            "--worker-timeout-ms",
            "20000",
            "--first-token-timeout-ms",
            "1200000",
        ],
    )
}

/// The `error` object of a 400, after checking the status.
fn refusal(http: &Http, path: &str, body: &Value) -> Value {
    let reply = http.post(path, body);
    assert_eq!(reply.status, 400, "{path}: {}", reply.body);
    reply.json()["error"].clone()
}

/// "… at most N tokens …" of a refusal's message.
fn tokens_that_fit(error: &Value) -> usize {
    let message = error["message"].as_str().expect("a message");
    message
        .split("at most ")
        .nth(2)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {message}"))
}

/// The samples of `name` whose labels contain `labels` (empty: all), summed.
fn total(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The `logprobs` entries of a non-streamed chat completion, checking each has `top`
/// alternatives.
fn chat_logprobs(body: &Value, top: usize) -> usize {
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {body}"));
    for entry in content {
        assert_eq!(
            entry["top_logprobs"].as_array().map(Vec::len),
            Some(top),
            "{entry}"
        );
    }
    content.len()
}

#[test]
fn a_small_max_payload_refuses_what_cannot_fit_and_splits_long_token_streams() {
    let dir = temp_dir("bus-limits-small");
    let nats = Nats::start_with_config(&dir, &format!("max_payload: {SMALL_MAX_PAYLOAD}"));
    let (_ctx, dec) = start_workers(
        &nats,
        &["--kv-cache-tokens", "32768"],
        &[("TANDEM_TEST_STREAM_DELAY_MS", "400")],
    );
    let api = start_api_server(&nats);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    // 20,000 token ids of 5 digits: about 120 KB of job, twice the limit.
    let long = prompt_ids(20_000);
    let completion = |ids: &[u32], stream: bool| {
        json!({"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
               "stream": stream})
    };
    let mut fit = None;
    for stream in [false, true] {
        let error = refusal(http, "/v1/completions", &completion(&long, stream));
        assert_eq!(error["param"], "prompt", "{error}");
        assert_eq!(error["code"], "prompt_too_large", "{error}");
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("20000 tokens") && message.contains("max_payload"),
            "{message}"
        );
        let n = tokens_that_fit(&error);
        assert!((5_000..20_000).contains(&n), "{n} tokens fit: {message}");
        assert_eq!(*fit.get_or_insert(n), n, "streamed or not, the same job");
    }
    // A chat whose messages make a prompt too large for the bus (not for the context).
    let words = [
        "lantern", "copper", "meadow", "quartz", "harbor", "violet", "ember",
    ];
    let text: Vec<String> = (0..20_000)
        .map(|i| format!("{}{}", words[i % words.len()], i % 97))
        .collect();
    let chat = |stream: bool| {
        json!({"messages": [{"role": "user", "content": text.join(" ")}], "max_tokens": 4,
               "stream": stream})
    };
    for stream in [false, true] {
        let error = refusal(http, "/v1/chat/completions", &chat(stream));
        assert_eq!(error["param"], "messages", "{error}");
        assert_eq!(error["code"], "prompt_too_large", "{error}");
    }

    // Exactly as many tokens as the refusal said fit are served; one more is refused. The
    // prefill job of that prompt fills the limit, so its decode job, with the KV handle, does
    // not fit: the decode worker prefills it instead.
    let fit = fit.unwrap();
    let served = http.post("/v1/completions", &completion(&long[..fit], false));
    assert_eq!(served.status, 200, "{}", served.body);
    let served = served.json();
    assert_eq!(served["usage"]["prompt_tokens"], fit);
    assert_eq!(served["usage"]["completion_tokens"], 4);
    let error = refusal(
        http,
        "/v1/completions",
        &completion(&long[..fit + 1], false),
    );
    assert_eq!(error["param"], "prompt");
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(
            &metrics,
            "tandem_kv_transfer_fallbacks_total{reason=\"decode_job_too_large\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        total(
            &metrics,
            "tandem_requests_total",
            "outcome=\"invalid_request\""
        ),
        5.0,
        "four refusals of the long prompt and chat, one of the prompt one token too long"
    );

    // A long generation with 20 alternatives per token, handed over from the context worker:
    // the decode worker's stream waits 400 ms per batch, so a batch holds hundreds of tokens
    // (about 450 bytes each), several times the limit; it is split, and every token arrives.
    const LONG: usize = 1500;
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Count the stars."}],
                "max_tokens": LONG, "ignore_eos": true, "temperature": 0,
                "logprobs": true, "top_logprobs": 20}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(
        body["usage"]["completion_tokens"], LONG,
        "{}",
        body["usage"]
    );
    assert_eq!(chat_logprobs(&body, 20), LONG);
    let (status, events) = http.post_stream(
        "/v1/completions",
        &json!({"prompt": "Name the rivers", "max_tokens": LONG, "ignore_eos": true,
                "temperature": 0, "logprobs": 20, "stream": true,
                "stream_options": {"include_usage": true}}),
        |_| {},
    );
    assert_eq!(status, 200);
    let mut streamed = 0;
    let mut usage = None;
    for event in &events {
        assert!(event.get("error").is_none(), "{event}");
        for choice in event["choices"].as_array().into_iter().flatten() {
            let tokens = choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
            let alternatives = choice["logprobs"]["top_logprobs"].as_array();
            assert!(
                alternatives.is_none_or(|a| a.iter().all(|m| m.as_object().unwrap().len() == 20))
            );
            streamed += tokens;
        }
        if !event["usage"].is_null() {
            usage = Some(event["usage"].clone());
        }
    }
    assert_eq!(streamed, LONG);
    assert_eq!(usage.expect("usage")["completion_tokens"], LONG);
    let split = dec.count_lines("tokens split into several messages");
    assert!(
        split >= 2,
        "the decode worker split its batches:\n{}",
        dec.output()
    );
    let metrics = http.get("/metrics").body;
    assert_eq!(
        total(&metrics, "tandem_request_migrations_total", ""),
        0.0,
        "no token went missing: {metrics}"
    );
    assert!(
        metric(&metrics, "tandem_kv_transfers_total", "ucx").unwrap_or(0.0) >= 2.0,
        "both long generations were handed over: {metrics}"
    );
}

/// Prompt tokens of the hand-over test: `TANDEM_TEST_LONG_PROMPT_TOKENS`, by default 32768.
/// A prompt of 131072 tokens takes minutes to prefill on 2 CPU cores (the CPU backend's
/// attention visits each key of each query one by one: about 8.6e9 visits), too long for CI;
/// a quarter of it takes a sixteenth of that, and the nats-server's `max_payload` shrinks
/// with the prompt (8 bytes per token: nats-server's default 1 MiB at 131072), so the same
/// message sizes are at stake in the same proportions.
fn long_prompt_tokens() -> usize {
    std::env::var("TANDEM_TEST_LONG_PROMPT_TOKENS")
        .ok()
        .map(|n| {
            n.parse()
                .expect("TANDEM_TEST_LONG_PROMPT_TOKENS is a number")
        })
        .unwrap_or(32_768)
}

/// The job of a prompt of `tokens` fits in `8 * tokens` bytes (7 per token id, and the rest);
/// with a KV handle of one region per block (about 36 bytes per 16 tokens) its decode job
/// would not: the decode worker pulls because the handle is one region.
#[test]
fn a_long_prompt_hands_over_between_context_and_decode_workers() {
    let tokens = long_prompt_tokens();
    assert!(
        tokens + 8 <= CONTEXT as usize,
        "at most {} tokens",
        CONTEXT - 8
    );
    let max_payload = 8 * tokens;
    let dir = temp_dir("bus-limits-long");
    let nats = Nats::start_with_config(&dir, &format!("max_payload: {max_payload}"));
    let cache = (CONTEXT + 1024).to_string();
    let (_ctx, _dec) = start_workers(
        &nats,
        &[
            "--kv-cache-tokens",
            &cache,
            "--max-tokens-in-buffer",
            &cache,
            "--max-num-batched-tokens",
            "4096",
        ],
        &[],
    );
    let api = start_api_server(&nats);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    let started = Instant::now();
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": prompt_ids(tokens), "max_tokens": 8, "temperature": 0,
                "ignore_eos": true}),
    );
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["completion_tokens"], 8);
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(&metrics, "tandem_kv_transfers_total{transport=\"ucx\"}"),
        Some(1.0),
        "the decode worker pulled the K/V: {metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_kv_transfer_fallbacks_total", ""),
        0.0,
        "no fallback: {metrics}"
    );
    eprintln!(
        "a {tokens}-token prompt served disaggregated through a nats-server with max_payload \
         {max_payload} in {elapsed:.1?}"
    );
}
