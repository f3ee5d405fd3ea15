//! Tensor-parallel workers serving end to end: nats-server, context and decode CPU workers of
//! SmolLM2 (9 query heads, 3 KV heads: three ranks hold 3 and 1 each) and the api-server, as
//! processes.
//!
//! - a context worker of 3 ranks hands its prompts to a decode worker of 1, and a context
//!   worker of 1 to a decode worker of 3: the hand-over carries the whole model's KV layout,
//!   each block's token rows put together from the ranks' head slices (and split again on the
//!   way in);
//! - every prompt goes over (UCX, `tandem_kv_transfers_total`, no fallback), and every greedy
//!   completion equals an aggregated worker's of one rank.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::{HandOvers, Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";
const REQUESTS: usize = 4;

fn completion(k: usize) -> Value {
    json!({
        "model": SERVED_NAME,
        "prompt": format!("Question {k}: name a country in Europe and its capital city. Answer:"),
        "max_tokens": 24,
        "temperature": 0,
    })
}

/// Every request at once; each one's text, in order.
fn texts(http: &Http) -> Vec<String> {
    let threads: Vec<_> = (0..REQUESTS)
        .map(|k| {
            let http = http.clone();
            std::thread::spawn(move || {
                let reply = http.post("/v1/completions", &completion(k));
                assert_eq!(reply.status, 200, "request {k}: {}", reply.body);
                reply.json()["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A context worker of `context_ranks` and a decode worker of `decode_ranks`; their texts.
fn disaggregated(context_ranks: &str, decode_ranks: &str) -> Vec<String> {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = start_api_server(&nats, &model);
    let flags = |ranks| ["--tensor-parallel", ranks];
    let _context = support::start_worker_as(&nats, &model, "context", "ctx", &flags(context_ranks));
    let _decode = support::start_worker_as(&nats, &model, "decode", "dec", &flags(decode_ranks));
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(60));
    http.wait_for_role("decode", 1, Duration::from_secs(60));
    let before = HandOvers::read(http);
    let texts = texts(http);
    HandOvers::read(http).assert_handed_over_since(
        &before,
        REQUESTS as u64,
        "ucx",
        &format!("context {context_ranks} ranks -> decode {decode_ranks}"),
    );
    texts
}

#[test]
fn prompts_go_between_workers_of_different_tensor_parallel_sizes() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    let api = start_api_server(&nats, &model);
    api.http.wait_for_workers(1, Duration::from_secs(30));
    let whole = texts(&api.http);
    drop(api);

    assert_eq!(
        disaggregated("3", "1"),
        whole,
        "context of 3 ranks -> decode of 1"
    );
    assert_eq!(
        disaggregated("1", "3"),
        whole,
        "context of 1 rank -> decode of 3"
    );
}
