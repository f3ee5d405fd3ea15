//! Disaggregated routing against scripted bus peers (`common/bus_peer.rs`): context
//! peers answer prefill jobs with a fake KV handle, a decode peer checks it got that handle
//! unchanged and streams tokens. Covers the prefill → decode hand-over, local prefills (no
//! context worker, short prompts), the fallbacks (silent, vanished or failing context worker),
//! a context worker answering the request itself, round robin over context workers, the
//! metrics and /health. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::bus_peer::{
    CONTEXT_ERROR, FAKE_BLOCK_BYTES, FAKE_BLOCK_TOKENS, FAKE_CONTEXT_CACHED_TOKENS,
    FAKE_PREFILL_TIMING, FAKE_PULL_MICROS, FAKE_ROOM_WAIT_MICROS, SCRIPT_ANSWER,
    SCRIPT_CONTEXT_ANSWERS, SCRIPT_CONTEXT_ERROR, SCRIPT_CONTEXT_SILENT, SCRIPT_CONTEXT_VANISHES,
    SCRIPT_DECODE_SILENT, SCRIPT_DECODE_VANISHES, SCRIPT_ENDLESS, SCRIPT_ERROR, SCRIPT_EXPORT_GONE,
    SCRIPT_HANDLE_REFUSED, SCRIPT_PULL_FAILS, SCRIPTED_TEXT, SCRIPTED_TRANSPORT, ScriptedBusPeer,
    fake_handle, scripted_kv_peer,
};
use common::{SERVED_NAME, start_api_server};
use serde_json::{Value, json};
use tandem_protocol::messages::{GenerateJob, KvTransferStats, WorkerRole};
use tandem_test_kit::prometheus::sample;
use tandem_test_kit::{ApiServer, Nats};

const DECODE_ID: &str = "dec";

struct Deployment {
    _nats: Nats,
    contexts: Vec<ScriptedBusPeer>,
    decode: ScriptedBusPeer,
    server: ApiServer,
}

impl Deployment {
    fn context(&self, id: &str) -> &ScriptedBusPeer {
        self.contexts
            .iter()
            .find(|peer| peer.id == id)
            .expect("a context peer of that id")
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&self.server.http.get("/metrics").body, series)
    }
}

/// A decode peer, context peers `context_ids` (their heartbeats carrying `kv_transfer`) and
/// the api-server with `extra` flags, once /health shows every peer.
fn deploy_with(
    context_ids: &[&str],
    kv_transfer: Option<KvTransferStats>,
    extra: &[&str],
) -> Deployment {
    let nats = Nats::start();
    let decode =
        ScriptedBusPeer::start_as(&nats.url, SERVED_NAME, WorkerRole::Decode, DECODE_ID, None);
    let contexts: Vec<ScriptedBusPeer> = context_ids
        .iter()
        .map(|id| {
            ScriptedBusPeer::start_as(&nats.url, SERVED_NAME, WorkerRole::Context, id, kv_transfer)
        })
        .collect();
    let server = start_api_server(&nats, extra);
    let start = Instant::now();
    loop {
        let health = server.http.get("/health");
        if health.status == 200
            && health.json()["workers"]["accepting_prefill"] == context_ids.len()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the peers' heartbeats never reached /health: {}",
            health.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Deployment {
        _nats: nats,
        contexts,
        decode,
        server,
    }
}

fn deploy(context_ids: &[&str], extra: &[&str]) -> Deployment {
    deploy_with(context_ids, None, extra)
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn metric(body: &str, series: &str) -> f64 {
    sample(body, series).unwrap_or_else(|| panic!("{series} missing from\n{body}"))
}

fn fallbacks(reason: &str) -> String {
    format!("tandem_kv_transfer_fallbacks_total{{reason=\"{reason}\"}}")
}

fn streamed_chat(max_tokens: u32) -> Value {
    json!({"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}],
           "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}})
}

/// A streamed response: (the chunks' id, concatenated text, finish reason, usage).
fn read_stream(server: &ApiServer, body: &Value) -> (String, String, Value, Value) {
    let stream = server.http.open_stream("/v1/chat/completions", body);
    assert_eq!(stream.status(), 200);
    let events = stream.collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{events:?}"
    );
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|c| {
            c["choices"]
                .get(0)
                .map(|choice| choice["finish_reason"].clone())
                .filter(|r| !r.is_null())
        })
        .unwrap_or(Value::Null);
    let usage = chunks.last().unwrap()["usage"].clone();
    (
        chunks[0]["id"].as_str().unwrap().to_string(),
        text,
        finish,
        usage,
    )
}

/// `job` as its context worker got it: no handle, no reader, and the deadline (set per
/// dispatch) aside.
fn comparable(job: &GenerateJob) -> GenerateJob {
    GenerateJob {
        kv: None,
        kv_reader: None,
        deadline_unix_ms: None,
        ..job.clone()
    }
}

#[test]
fn a_request_is_prefilled_on_the_context_worker_and_decoded_from_its_handle() {
    let d = deploy(&["ctx-a"], &[]);
    let (id, text, finish, usage) = read_stream(&d.server, &streamed_chat(SCRIPT_ANSWER));
    assert_eq!(text, SCRIPTED_TEXT);
    assert_eq!(finish, "stop");
    assert_eq!(usage["completion_tokens"], 3);

    let prefill_jobs = d.context("ctx-a").jobs();
    let decode_jobs = d.decode.jobs();
    assert_eq!((prefill_jobs.len(), decode_jobs.len()), (1, 1));
    let prefill = &prefill_jobs[0];
    assert_eq!(prefill.request_id, id);
    assert_eq!(prefill.kv, None, "a prefill job carries no handle");
    assert_eq!(
        prefill.kv_reader,
        Some(scripted_kv_peer(DECODE_ID)),
        "a prefill job says how the chosen decode worker reads K/V"
    );
    assert_eq!(decode_jobs[0].kv_reader, None, "only prefill jobs carry it");
    // The decode job is the same job plus the context worker's handle, unchanged.
    assert_eq!(
        decode_jobs[0].kv.as_ref(),
        Some(&fake_handle("ctx-a", prefill))
    );
    assert_eq!(comparable(&decode_jobs[0]), comparable(prefill));
    assert_eq!(usage["prompt_tokens"], prefill.prompt_ids.len());
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], FAKE_CONTEXT_CACHED_TOKENS,
        "the context worker's cached prompt tokens are the request's: {usage}"
    );
    assert_eq!(prefill.cache_salt, None, "no cache_salt sent");

    // Not streamed: a 40-token prompt is 3 fake blocks.
    let response = d.server.http.post(
        "/v1/completions",
        &json!({"prompt": (1..=40).collect::<Vec<u32>>(), "max_tokens": SCRIPT_ANSWER}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["choices"][0]["text"], SCRIPTED_TEXT);
    assert_eq!(
        response.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        FAKE_CONTEXT_CACHED_TOKENS
    );
    assert_eq!(d.decode.jobs()[1].kv.as_ref().unwrap().blocks.len(), 3);

    let first_blocks = prefill
        .prompt_ids
        .len()
        .div_ceil(FAKE_BLOCK_TOKENS as usize) as u64;
    let bytes = (first_blocks + 3) * FAKE_BLOCK_BYTES;
    let metrics = d.server.http.get("/metrics").body;
    assert_eq!(
        metric(&metrics, "tandem_kv_transfer_bytes_total"),
        bytes as f64
    );
    assert_eq!(metric(&metrics, "tandem_kv_transfer_seconds_count"), 2.0);
    assert!((metric(&metrics, "tandem_kv_transfer_seconds_sum") - 0.005).abs() < 1e-9);
    assert_eq!(metric(&metrics, "tandem_requests_disaggregated_total"), 2.0);
    assert_eq!(
        metric(
            &metrics,
            &format!("tandem_kv_transfers_total{{transport=\"{SCRIPTED_TRANSPORT}\"}}")
        ),
        2.0,
        "pulls are counted by the transport the decode worker reports"
    );
    for reason in [
        "no_context_worker",
        "context_timeout",
        "context_gone",
        "pull_failed",
        "handle_refused",
        "export_gone",
    ] {
        assert_eq!(metric(&metrics, &fallbacks(reason)), 0.0, "{reason}");
    }
    // Both requests' time to first token, split with what the workers reported; `other` is
    // the rest of the TTFT the api-server measured, so the parts add up to it.
    let part = |part: &str, what: &str| {
        metric(
            &metrics,
            &format!("tandem_ttft_part_seconds_{what}{{part=\"{part}\"}}"),
        )
    };
    for (name, micros) in [
        ("context_queue", FAKE_PREFILL_TIMING.queued_us),
        ("prefill", FAKE_PREFILL_TIMING.prefill_us),
        ("decode_room_wait", FAKE_ROOM_WAIT_MICROS),
        ("kv_transfer", FAKE_PULL_MICROS),
    ] {
        assert_eq!(part(name, "count"), 2.0, "{name}");
        assert!(
            (part(name, "sum") - 2.0 * micros as f64 / 1e6).abs() < 1e-9,
            "{name}"
        );
    }
    assert_eq!(part("other", "count"), 2.0);
    let parts = ttft_parts(&metrics);
    let ttft = metric(
        &metrics,
        "tandem_time_to_first_token_seconds_sum{endpoint=\"chat\"}",
    ) + metric(
        &metrics,
        "tandem_time_to_first_token_seconds_sum{endpoint=\"completions\"}",
    );
    // Each request's parts are its TTFT, or the scripted parts where those exceed it (the
    // peers answer at once, so they may: then `other` is 0).
    let scripted = 2.0
        * (FAKE_PREFILL_TIMING.queued_us
            + FAKE_PREFILL_TIMING.prefill_us
            + FAKE_ROOM_WAIT_MICROS
            + FAKE_PULL_MICROS) as f64
        / 1e6;
    assert!(
        parts >= ttft.max(scripted) - 1e-6 && parts <= ttft + scripted + 1e-6,
        "parts {parts} s, TTFT {ttft} s, scripted parts {scripted} s"
    );
}

/// The sum of every part of `tandem_ttft_part_seconds`.
fn ttft_parts(metrics: &str) -> f64 {
    [
        "context_queue",
        "prefill",
        "decode_room_wait",
        "kv_transfer",
        "other",
    ]
    .iter()
    .map(|part| {
        metric(
            metrics,
            &format!("tandem_ttft_part_seconds_sum{{part=\"{part}\"}}"),
        )
    })
    .sum()
}

#[test]
fn without_a_context_worker_the_decode_worker_prefills_itself() {
    let d = deploy(&[], &[]);
    let health = d.server.http.get("/health").json();
    assert_eq!(health["workers"]["context"], 0);
    assert_eq!(health["workers"]["decode"], 1);
    let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_ANSWER));
    assert_eq!(text, SCRIPTED_TEXT);
    let jobs = d.decode.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kv, None);
    assert_eq!(d.metric(&fallbacks("no_context_worker")), 1.0);
    assert_eq!(d.metric("tandem_requests_disaggregated_total"), 0.0);
}

#[test]
fn prompts_shorter_than_max_local_prefill_length_are_prefilled_locally() {
    let d = deploy(&["ctx-a"], &["--max-local-prefill-length", "4"]);
    let complete = |prompt: Vec<u32>| {
        let response = d.server.http.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": SCRIPT_ANSWER}),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.json()["choices"][0]["text"], SCRIPTED_TEXT);
    };
    complete(vec![1, 2, 3]);
    assert!(d.context("ctx-a").jobs().is_empty());
    assert_eq!(d.decode.jobs()[0].kv, None);
    assert_eq!(d.metric(&fallbacks("no_context_worker")), 0.0);

    complete(vec![1, 2, 3, 4]);
    assert_eq!(d.context("ctx-a").jobs().len(), 1);
    assert!(d.decode.jobs()[1].kv.is_some());
    assert_eq!(d.metric("tandem_requests_disaggregated_total"), 1.0);
}

#[test]
fn a_context_worker_that_never_accepts_is_replaced_by_a_local_prefill() {
    let d = deploy(&["ctx-a"], &[]);
    let start = Instant::now();
    let (id, text, finish, _) = read_stream(&d.server, &streamed_chat(SCRIPT_CONTEXT_SILENT));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(text, SCRIPTED_TEXT);
    assert_eq!(finish, "stop");
    let decode_job = &d.decode.jobs()[0];
    assert_eq!(decode_job.kv, None);
    assert_eq!(decode_job.request_id, format!("{id}-local"));
    // The late prefill is cancelled (under the original id, which the retry does not use).
    assert!(
        d.context("ctx-a")
            .wait_for_cancel(&id, Duration::from_secs(2)),
        "no cancel for the abandoned prefill"
    );
    assert!(!d.decode.cancels().contains(&decode_job.request_id));
    assert_eq!(d.metric(&fallbacks("context_timeout")), 1.0);
}

#[test]
fn a_context_worker_that_vanishes_before_its_handle_is_replaced_by_a_local_prefill() {
    // The first-token budget must outlast the worker timeout (1 s) for the fallback to win.
    let d = deploy(&["ctx-a"], &["--first-token-timeout-ms", "5000"]);
    let start = Instant::now();
    let (_, text, finish, _) = read_stream(&d.server, &streamed_chat(SCRIPT_CONTEXT_VANISHES));
    let elapsed = start.elapsed();
    assert!(!d.context("ctx-a").heartbeating());
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "fell back before the heartbeat could be missed: {elapsed:?}"
    );
    assert_eq!(text, SCRIPTED_TEXT);
    assert_eq!(finish, "stop");
    assert_eq!(d.decode.jobs()[0].kv, None);
    assert_eq!(d.metric(&fallbacks("context_gone")), 1.0);
}

#[test]
fn a_context_worker_that_ends_the_request_itself_is_streamed_to_the_client() {
    let d = deploy(&["ctx-a"], &[]);
    let (_, text, finish, usage) = read_stream(&d.server, &streamed_chat(SCRIPT_CONTEXT_ANSWERS));
    assert_eq!(text, "Hel");
    assert_eq!(finish, "stop");
    assert_eq!(usage["completion_tokens"], 1);
    assert!(d.decode.jobs().is_empty(), "nothing is left to decode");
    assert_eq!(d.metric("tandem_requests_disaggregated_total"), 1.0);
}

#[test]
fn round_robin_alternates_context_workers() {
    let d = deploy(&["ctx-a", "ctx-b"], &["--router-policy", "round-robin"]);
    for _ in 0..4 {
        let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_ANSWER));
        assert_eq!(text, SCRIPTED_TEXT);
    }
    let order: Vec<String> = d
        .decode
        .jobs()
        .iter()
        .map(|job| job.kv.as_ref().expect("a handle").worker_id.clone())
        .collect();
    assert_eq!(order.len(), 4);
    assert_ne!(order[0], order[1], "{order:?}");
    assert_eq!((&order[0], &order[1]), (&order[2], &order[3]), "{order:?}");
    assert_eq!(d.context("ctx-a").jobs().len(), 2);
    assert_eq!(d.context("ctx-b").jobs().len(), 2);
}

#[test]
fn context_failures_fall_back_and_request_failures_reach_the_client() {
    let d = deploy(&["ctx-a"], &[]);
    // The context worker's own failure: the decode worker prefills and answers.
    let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_CONTEXT_ERROR));
    assert_eq!(text, SCRIPTED_TEXT);
    assert!(!text.contains(CONTEXT_ERROR));
    assert_eq!(d.metric(&fallbacks("context_error")), 1.0);

    // A failure of the request itself: the decode worker fails it too, and the client gets
    // that error as with aggregated serving.
    let response = d.server.http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": SCRIPT_ERROR}),
    );
    assert_eq!(response.status, 500, "{}", response.body);
    assert_eq!(response.json()["error"]["message"], "scripted failure");
    let jobs = d.decode.jobs();
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs[1].request_id.ends_with("-local") && jobs[1].kv.is_none(),
        "{:?}",
        jobs[1]
    );
    assert_eq!(d.metric(&fallbacks("context_error")), 2.0);
}

#[test]
fn failed_pulls_and_context_heartbeats_show_in_metrics_and_health() {
    let stats = KvTransferStats {
        pinned_blocks: 3,
        pinned_tokens: 40,
        expirations: 2,
        releases: 7,
        unmatched_releases: 0,
    };
    let d = deploy_with(&["ctx-a"], Some(stats), &[]);
    let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_PULL_FAILS));
    assert_eq!(text, SCRIPTED_TEXT);
    // A refused handle (say, workers with different KV secrets) is a fallback of its own.
    let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_HANDLE_REFUSED));
    assert_eq!(text, SCRIPTED_TEXT);
    // So is an export freed before the pull ended (its seal changed: say, a forged release).
    let (_, text, _, _) = read_stream(&d.server, &streamed_chat(SCRIPT_EXPORT_GONE));
    assert_eq!(text, SCRIPTED_TEXT);
    let metrics = d.server.http.get("/metrics").body;
    assert_eq!(metric(&metrics, &fallbacks("pull_failed")), 1.0);
    assert_eq!(metric(&metrics, &fallbacks("handle_refused")), 1.0);
    assert_eq!(metric(&metrics, &fallbacks("export_gone")), 1.0);
    assert_eq!(metric(&metrics, "tandem_kv_transfer_bytes_total"), 0.0);
    assert_eq!(metric(&metrics, "tandem_kv_transfer_seconds_count"), 0.0);
    // Prefilled by the decode worker: no hand-over's time to split.
    assert_eq!(
        metric(&metrics, "tandem_ttft_part_seconds_count{part=\"other\"}"),
        0.0
    );
    for (series, value) in [
        ("tandem_kv_pinned_blocks{worker_id=\"ctx-a\"}", 3.0),
        ("tandem_kv_pinned_tokens{worker_id=\"ctx-a\"}", 40.0),
        ("tandem_kv_expirations_total{worker_id=\"ctx-a\"}", 2.0),
        ("tandem_kv_releases_total{worker_id=\"ctx-a\"}", 7.0),
        ("tandem_live_workers{role=\"context\"}", 1.0),
    ] {
        assert_eq!(metric(&metrics, series), value, "{series}");
    }
    let health = d.server.http.get("/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["workers"]["context"], 1);
    assert_eq!(health["workers"]["accepting_prefill"], 1);
    assert_eq!(health["workers"]["accepting_generate"], 1);
}

#[test]
fn a_client_gone_during_the_prefill_cancels_it_on_the_context_worker() {
    let d = deploy(&["ctx-a"], &[]);
    let stream = d
        .server
        .http
        .open_stream("/v1/chat/completions", &streamed_chat(SCRIPT_ENDLESS));
    assert_eq!(stream.status(), 200);
    let request_id = d.context("ctx-a").jobs()[0].request_id.clone();
    drop(stream);
    assert!(
        d.context("ctx-a")
            .wait_for_cancel(&request_id, Duration::from_secs(3)),
        "disconnect did not cancel the prefill"
    );
    assert!(d.decode.jobs().is_empty());
}

/// The SSE events of a streamed chat whose generation fails after the headers: the error
/// event's `code`.
fn streamed_error_code(server: &ApiServer, max_tokens: u32) -> String {
    let stream = server
        .http
        .open_stream("/v1/chat/completions", &streamed_chat(max_tokens));
    assert_eq!(stream.status(), 200);
    let events = stream.collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    error["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error event: {events:?}"))
        .to_string()
}

#[test]
fn a_decode_worker_that_does_not_take_the_handle_fails_the_request_quickly() {
    let d = deploy(&["ctx-a"], &[]);
    let start = Instant::now();
    // Streamed, the status went out with the context worker's `accepted`.
    assert_eq!(
        streamed_error_code(&d.server, SCRIPT_DECODE_SILENT),
        "worker_unavailable"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let request_id = d.context("ctx-a").jobs()[0].request_id.clone();
    assert!(
        d.decode
            .wait_for_cancel(&request_id, Duration::from_secs(2)),
        "the late decode job is not cancelled"
    );
    // Not streamed: 503.
    let response = d.server.http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": SCRIPT_DECODE_SILENT}),
    );
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "worker_unavailable");
}

#[test]
fn a_decode_worker_that_dies_mid_stream_ends_the_request_with_an_error() {
    // A stall timeout longer than the worker timeout: the lost heartbeat is what ends it.
    let d = deploy(&["ctx-a"], &["--stall-timeout-ms", "5000"]);
    let start = Instant::now();
    assert_eq!(
        streamed_error_code(&d.server, SCRIPT_DECODE_VANISHES),
        "worker_error"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(!d.decode.heartbeating());
    let metrics = d.server.http.get("/metrics").body;
    assert_eq!(metric(&metrics, "tandem_requests_disaggregated_total"), 1.0);
    for reason in ["context_timeout", "context_gone", "context_error"] {
        assert_eq!(metric(&metrics, &fallbacks(reason)), 0.0, "{reason}");
    }
}

#[test]
fn a_requests_cache_salt_travels_with_its_jobs_and_an_empty_one_is_refused() {
    let d = deploy(&["ctx-a"], &[]);
    let mut body = streamed_chat(SCRIPT_ANSWER);
    body["cache_salt"] = json!("tenant-7");
    let (_, text, _, _) = read_stream(&d.server, &body);
    assert_eq!(text, SCRIPTED_TEXT);
    let prefill_jobs = d.context("ctx-a").jobs();
    let decode_jobs = d.decode.jobs();
    assert_eq!(prefill_jobs[0].cache_salt.as_deref(), Some("tenant-7"));
    assert_eq!(decode_jobs[0].cache_salt.as_deref(), Some("tenant-7"));

    let mut body = streamed_chat(SCRIPT_ANSWER);
    body["cache_salt"] = json!("");
    let response = d.server.http.post("/v1/chat/completions", &body);
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(
        response.json()["error"]["param"],
        "cache_salt",
        "{}",
        response.body
    );
    assert!(response.body.contains("non-empty"), "{}", response.body);
}
