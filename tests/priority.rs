//! vLLM's request `priority` on live deployments (nats-server, workers and the api-server as
//! real processes, SmolLM2 on the CPU), with workers that hold one sequence at a time: a
//! request of a higher priority (a lower number) that arrives while a long request of a
//! lower priority runs and another waits is served first. The running request is preempted
//! and later finishes with exactly the text it gives alone; the waiting one goes after it.
//! Aggregated (one `both` worker), and disaggregated, where the urgent request's K/V arrives
//! at a decode worker busy with the long one. Priorities outside 32 bits are a 400 naming
//! `priority`.
//!
//! Needs `$TANDEM_TEST_MODELS/smollm2-bf16`, nats-server and the workspace binaries.

mod support;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server, start_worker, start_worker_as};
use tandem_test_kit::prometheus::{metric, total};
use tandem_test_kit::{Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";

/// A greedy completion of `max_tokens` tokens that does not stop early, at `priority`.
fn completion(prompt: &str, max_tokens: u32, priority: i64) -> Value {
    json!({"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens,
           "temperature": 0, "ignore_eos": true, "priority": priority, "stream": true})
}

/// The streamed text of `body`, calling `first` once its first token arrives.
fn streamed_text(http: &Http, body: &Value, mut first: impl FnMut()) -> String {
    let mut text = String::new();
    let (status, _) = http.post_stream("/v1/completions", body, |event| {
        if text.is_empty() {
            first();
        }
        if let Some(piece) = event["choices"][0]["text"].as_str() {
            text.push_str(piece);
        }
    });
    assert_eq!(status, 200, "{body}");
    text
}

/// The long request (priority 1) runs; a second of priority 1 waits; then an urgent one
/// (priority -5) arrives. Returns the order the three finished in and the long one's text.
fn urgent_after_two(http: &Http, long_prompt: &str) -> (Vec<&'static str>, String) {
    let finished = Arc::new(Mutex::new(Vec::new()));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let spawn = |name: &'static str, body: Value, started: Option<std::sync::mpsc::Sender<()>>| {
        let http = http.clone();
        let finished = Arc::clone(&finished);
        thread::spawn(move || {
            let text = streamed_text(&http, &body, || {
                if let Some(started) = &started {
                    let _ = started.send(());
                }
            });
            finished.lock().unwrap().push(name);
            text
        })
    };
    let long = spawn("long", completion(long_prompt, 160, 1), Some(started_tx));
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the long request starts");
    let waiting = spawn("waiting", completion("The weather today", 8, 1), None);
    // The second is queued behind the running one before the urgent one comes.
    thread::sleep(Duration::from_millis(300));
    let urgent = spawn("urgent", completion("One, two, three,", 8, -5), None);
    urgent.join().unwrap();
    waiting.join().unwrap();
    let long_text = long.join().unwrap();
    let order = finished.lock().unwrap().clone();
    (order, long_text)
}

fn worker_preemptions(http: &Http) -> f64 {
    total(
        &http.get("/metrics").body,
        "tandem_worker_preemptions_total",
    )
}

const LONG_PROMPT: &str = "Write a long story about a lighthouse keeper and the sea.";

#[test]
fn a_request_of_a_higher_priority_is_served_first() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = start_api_server(&nats, &model);
    let _worker = start_worker(&nats, &model, "w0", &["--max-num-seqs", "1"]);
    api.http.wait_for_workers(1, Duration::from_secs(60));
    let http = &api.http;

    // Out of range: a 400 naming the field; in range and 0: served.
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1, "priority": 1_i64 << 40}),
    );
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "priority");
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "priority": -3}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    let alone = streamed_text(http, &completion(LONG_PROMPT, 160, 1), || {});
    let before = worker_preemptions(http);
    let started = Instant::now();
    let (order, long_text) = urgent_after_two(http, LONG_PROMPT);
    assert_eq!(
        order,
        ["urgent", "long", "waiting"],
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        long_text, alone,
        "the preempted request recomputed to the same text"
    );
    // The worker's heartbeat carries its preemptions.
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker_preemptions(http) < before + 1.0 {
        assert!(Instant::now() < deadline, "no preemption reported");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_urgent_request_preempts_on_a_busy_decode_worker() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = tandem_test_kit::ApiServer::start(
        &nats,
        &model,
        SERVED_NAME,
        // Every prompt is prefilled by the context worker.
        &[
            "--worker-timeout-ms",
            "1500",
            "--max-local-prefill-length",
            "0",
        ],
    );
    let _context = start_worker_as(&nats, &model, "context", "ctx", &[]);
    let _decode = start_worker_as(&nats, &model, "decode", "dec", &["--max-num-seqs", "1"]);
    api.http
        .wait_for_role("context", 1, Duration::from_secs(60));
    api.http.wait_for_role("decode", 1, Duration::from_secs(60));
    let http = &api.http;
    let alone = streamed_text(http, &completion(LONG_PROMPT, 160, 1), || {});
    let (order, long_text) = urgent_after_two(http, LONG_PROMPT);
    assert_eq!(order, ["urgent", "long", "waiting"]);
    assert_eq!(long_text, alone);
    // The decode worker made room for the urgent request's K/V by preempting the long one
    // (its heartbeat reports it).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http.get("/metrics").body;
        let preempted = metric(&metrics, "tandem_worker_preemptions_total", "dec").unwrap_or(0.0);
        if preempted >= 1.0 {
            assert!(
                metric(&metrics, "tandem_requests_disaggregated_total", "").unwrap() >= 3.0,
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the decode worker preempted nothing: {metrics}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
