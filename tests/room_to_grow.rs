//! Admission with room to grow, end to end: nats-server, a CPU worker with SmolLM2 and a KV
//! cache far too small for the load, and the api-server, as processes.
//!
//! Six greedy completions of 48 tokens at once on 16 blocks of 16 tokens (each request needs
//! up to 6 blocks to reach its end):
//! - admitted as soon as a prompt's first chunk fits (`--growth-reserve-tokens 0`), they run
//!   the cache dry and the worker preempts (`tandem_worker_preemptions_total` > 0);
//! - with the default room to grow, a request is admitted only with the blocks to reach its
//!   end, and nobody is preempted (the counter reads 0);
//! - both ways every request completes, with the same text (greedy; recompute gives back what
//!   was preempted), and every block is free again;
//! - the same for a decode worker that imports the prompts from a context worker: its imports
//!   wait for room to grow too, nothing is preempted there, and every prompt is handed over
//!   (/metrics: a KV transfer each, no fallback to a local prefill).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::prometheus::metric;
use tandem_test_kit::{HandOvers, Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";
const REQUESTS: usize = 6;

fn completion(k: usize) -> Value {
    json!({
        "model": SERVED_NAME,
        "prompt": format!("Request {k}: write a long story about lighthouse number {k}, its keeper and the sea."),
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Sends every request at once; returns each one's text, in order.
fn all_at_once(http: &Http) -> Vec<String> {
    let threads: Vec<_> = (0..REQUESTS)
        .map(|k| {
            let http = http.clone();
            std::thread::spawn(move || {
                let reply = http.post("/v1/completions", &completion(k));
                assert_eq!(reply.status, 200, "request {k}: {}", reply.body);
                let body = reply.json();
                assert_eq!(body["usage"]["completion_tokens"], 48, "{body}");
                body["choices"][0]["text"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Waits until the worker is idle with every block free, and returns its preemption count.
fn preemptions_once_idle(http: &Http, worker: &str) -> f64 {
    let label = format!("\"{worker}\"");
    let start = Instant::now();
    loop {
        let body = http.get("/metrics").body;
        let free = metric(&body, "tandem_worker_free_kv_blocks", &label);
        let idle = metric(&body, "tandem_worker_running", &label) == Some(0.0)
            && free.is_some()
            && free == metric(&body, "tandem_worker_total_kv_blocks", &label);
        if idle && let Some(count) = metric(&body, "tandem_worker_preemptions_total", &label) {
            return count;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker did not report itself idle with its preemptions:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The small cache of these tests: 16 blocks of 16 tokens.
const SMALL_CACHE: [&str; 4] = ["--kv-cache-tokens", "256", "--block-size", "16"];

/// Serves the load disaggregated, the decode worker with the small cache and the default
/// room to grow; its texts and the decode worker's preemptions.
fn serve_disaggregated() -> (Vec<String>, f64) {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let block = ["--block-size", "16"];
    let _context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &block);
    let _decode = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &SMALL_CACHE);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    let before = HandOvers::read(http);
    let texts = all_at_once(http);
    let preemptions = preemptions_once_idle(http, "dec");
    HandOvers::read(http).assert_handed_over_since(
        &before,
        REQUESTS as u64,
        "ucx",
        "the load served disaggregated",
    );
    (texts, preemptions)
}

/// Serves the load on a worker with `extra` flags; its texts and preemptions.
fn serve(extra: &[&str]) -> (Vec<String>, f64) {
    let nats = Nats::start();
    let mut flags = SMALL_CACHE.to_vec();
    flags.extend_from_slice(extra);
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &flags);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    let texts = all_at_once(http);
    (texts, preemptions_once_idle(http, "w0"))
}

#[test]
fn room_to_grow_at_admission_means_no_preemption_and_the_same_text() {
    let (first_chunk_admission, preempted) = serve(&["--growth-reserve-tokens", "0"]);
    assert!(
        preempted > 0.0,
        "16 blocks for six requests of up to 6 blocks each must preempt"
    );
    let (room_to_grow, none) = serve(&[]);
    assert_eq!(
        none, 0.0,
        "nobody is preempted once admitted with room to grow"
    );
    assert_eq!(first_chunk_admission, room_to_grow);
    let (disaggregated, none) = serve_disaggregated();
    assert_eq!(none, 0.0, "imports wait for room to grow as well");
    assert_eq!(disaggregated, room_to_grow);
}
