//! Requests with `n` > 1 end to end: nats-server, CPU workers with SmolLM2 and the
//! api-server as processes, aggregated and disaggregated.
//!
//! - `n=3` returns three choices, streamed (chunks carry their choice's `index`) and not, the
//!   same three for the same seeded request twice, the first equal to the request with
//!   `n=1`; usage counts the prompt once and every choice's completion;
//! - greedy `n=2` gives two equal choices, equal to `n=1`;
//! - disaggregated, each `n=1` request of those comparisons is handed over from the context
//!   worker (/metrics: a KV transfer, no fallback) while `n` > 1 is prefilled by the decode
//!   worker by design (no hand-over, no fallback either);
//! - `best_of` below `n` is a 400 naming it (`best_of` above `n`: tests/echo.rs);
//! - afterwards every worker's KV blocks are free again (the shared prompt blocks included);
//! - the official `openai` client with `n=3`, streamed and not (tests/python/openai_samples.py;
//!   needs the `openai` package: scripts/test installs it and sets `TANDEM_TEST_PYTHONPATH`).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::prometheus::metric;
use tandem_test_kit::{HandOvers, Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";

fn chat(n: u32, seed: Option<u64>, temperature: f64) -> Value {
    let mut request = json!({
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Write one sentence about a lighthouse."}],
        "max_tokens": 16,
        "temperature": temperature,
        "n": n,
    });
    if let Some(seed) = seed {
        request["seed"] = json!(seed);
    }
    request
}

/// The choices of a chat completion that is not streamed, by index, and its usage.
fn chat_choices(http: &Http, request: &Value) -> (Vec<String>, Value) {
    let reply = http.post("/v1/chat/completions", request);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    let choices = body["choices"].as_array().expect("choices").clone();
    let mut texts = vec![String::new(); choices.len()];
    for choice in &choices {
        let index = choice["index"].as_u64().expect("index") as usize;
        assert!(choice["finish_reason"].is_string(), "{choice}");
        texts[index] = choice["message"]["content"].as_str().unwrap().to_owned();
    }
    (texts, body["usage"].clone())
}

/// The texts of a streamed request's choices by index, each choice's finish reasons, and
/// the usage chunk.
fn streamed_choices(http: &Http, path: &str, request: &Value) -> (Vec<String>, Value) {
    let mut request = request.clone();
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, events) = http.post_stream(path, &request, |_| {});
    assert_eq!(status, 200);
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    let mut finished: BTreeMap<u64, u32> = BTreeMap::new();
    let mut usage = Value::Null;
    for event in &events {
        assert!(event.get("error").is_none(), "stream error: {event}");
        if !event["usage"].is_null() {
            usage = event["usage"].clone();
        }
        for choice in event["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().expect("index");
            let text = texts.entry(index).or_default();
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            text.push_str(choice["text"].as_str().unwrap_or(""));
            if choice["finish_reason"].is_string() {
                *finished.entry(index).or_default() += 1;
            }
        }
    }
    assert!(
        finished.values().all(|&count| count == 1) && finished.len() == texts.len(),
        "every choice finishes once: {finished:?}"
    );
    (texts.into_values().collect(), usage)
}

/// Waits until every worker in `ids` reports nothing running or queued and all its KV blocks
/// free.
fn wait_idle(http: &Http, ids: &[&str]) {
    let start = Instant::now();
    loop {
        let body = http.get("/metrics").body;
        let idle = ids.iter().all(|id| {
            let label = format!("\"{id}\"");
            let free = metric(&body, "tandem_worker_free_kv_blocks", &label);
            metric(&body, "tandem_worker_running", &label) == Some(0.0)
                && metric(&body, "tandem_worker_queue_depth", &label) == Some(0.0)
                && free.is_some()
                && free == metric(&body, "tandem_worker_total_kv_blocks", &label)
        });
        if idle {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "KV blocks not all free again:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What both deployments must show; `disaggregated`: a context and a decode worker, through
/// which a request with `n` = 1 must go (one with `n` > 1 is prefilled by the decode worker,
/// as on a `both` worker), so that comparing the two compares the hand-over with a local
/// prefill.
fn n_choices_work(http: &Http, disaggregated: bool) {
    let crossing = |requests| if disaggregated { requests } else { 0 };
    // Seeded: three choices, the same three twice, the first what n=1 gives.
    let before = HandOvers::read(http);
    let (three, usage) = chat_choices(http, &chat(3, Some(7), 0.9));
    assert_eq!(three.len(), 3);
    assert!(three.iter().all(|t| !t.is_empty()), "{three:?}");
    assert_ne!(three[0], three[1], "choices draw from different streams");
    let (again, _) = chat_choices(http, &chat(3, Some(7), 0.9));
    assert_eq!(three, again, "the same seeded request, the same choices");
    let local = HandOvers::read(http);
    local.assert_handed_over_since(&before, 0, "ucx", "n=3, prefilled where it is decoded");
    let (one, one_usage) = chat_choices(http, &chat(1, Some(7), 0.9));
    HandOvers::read(http).assert_handed_over_since(
        &local,
        crossing(1),
        "ucx",
        "the seeded request with n=1",
    );
    assert_eq!(one[0], three[0], "choice 0 is the request with n=1");
    assert_eq!(usage["prompt_tokens"], one_usage["prompt_tokens"]);
    assert!(usage["completion_tokens"].as_u64().unwrap() > 16);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streamed: the same three choices, one finish chunk each, the usage of all of them.
    let (streamed, streamed_usage) =
        streamed_choices(http, "/v1/chat/completions", &chat(3, Some(7), 0.9));
    assert_eq!(streamed, three);
    assert_eq!(streamed_usage, usage);

    // Without a seed the choices differ.
    let (free, _) = chat_choices(http, &chat(3, None, 1.0));
    assert!(
        free[0] != free[1] || free[1] != free[2],
        "unseeded choices all equal: {free:?}"
    );

    // Greedy: every choice is the greedy answer.
    let (greedy, _) = chat_choices(http, &chat(2, None, 0.0));
    let before = HandOvers::read(http);
    let (greedy_one, _) = chat_choices(http, &chat(1, None, 0.0));
    HandOvers::read(http).assert_handed_over_since(
        &before,
        crossing(1),
        "ucx",
        "the greedy request with n=1",
    );
    assert_eq!(greedy, vec![greedy_one[0].clone(); 2]);

    // Completions: n and best_of = n; best_of below n is refused naming it.
    let completion = json!({"prompt": "The three primary colors are", "max_tokens": 8,
        "temperature": 0.8, "seed": 3, "n": 2, "best_of": 2});
    let reply = http.post("/v1/completions", &completion);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    let texts: Vec<&str> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 2);
    let (streamed, _) = streamed_choices(http, "/v1/completions", &completion);
    assert_eq!(streamed, texts);
    let mut refused = completion.clone();
    refused["best_of"] = json!(1);
    let reply = http.post("/v1/completions", &refused);
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "best_of");
    let reply = http.post("/v1/chat/completions", &chat(129, None, 1.0));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["param"], "n");
}

#[test]
fn n_choices_on_an_aggregated_deployment() {
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &[]);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    n_choices_work(http, false);
    openai_client_n_choices(&http.base);
    wait_idle(http, &["w0"]);
    a_client_that_leaves_cancels_every_choice(http);
    wait_idle(http, &["w0"]);
}

/// A streamed `n=3` request whose client leaves after its first tokens: every choice is
/// cancelled (the caller then sees all KV blocks free again, where a choice left running
/// would hold its blocks for 2000 tokens).
fn a_client_that_leaves_cancels_every_choice(http: &Http) {
    let mut request = chat(3, Some(1), 1.0);
    request["max_tokens"] = json!(2000);
    request["stream"] = json!(true);
    let mut stream = http.open_stream("/v1/chat/completions", &request);
    assert_eq!(stream.status(), 200);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        let data = stream.next_data().expect("the stream goes on");
        let event: Value = serde_json::from_str(&data).unwrap();
        for choice in event["choices"].as_array().into_iter().flatten() {
            if !choice["delta"]["content"].as_str().unwrap_or("").is_empty() {
                seen.insert(choice["index"].as_u64().unwrap());
            }
        }
    }
    drop(stream);
}

/// tests/python/openai_samples.py against the api-server at `base`.
fn openai_client_n_choices(base: &str) {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_samples.py");
    let output = tandem_test_kit::python()
        .arg(&script)
        .arg(format!("{base}/v1"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "openai client checks of n > 1 failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn n_choices_on_a_disaggregated_deployment() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
    let _decode = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    n_choices_work(http, true);
    wait_idle(http, &["ctx", "dec"]);
}
