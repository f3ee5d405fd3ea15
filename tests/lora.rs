//! LoRA adapters on live deployments (nats-server, workers and api-servers as real processes,
//! SmolLM2 in f32 on the CPU): a disaggregated deployment whose context and decode workers load
//! an adapter (`--lora-modules`) serves it under its own name, and its answers are those of a
//! second deployment serving the adapter merged into the weights (`model-prep lora merge`).
//! Checked end to end:
//! - `/v1/models` lists the adapter with the served model as its parent; an unknown model is
//!   404 `model_not_found`;
//! - greedy chat completions for the adapter (streamed and not) carry its name as `model` and
//!   equal the merged model's token for token, with their logprobs; the base model's answers
//!   on the same deployment differ from them;
//! - the adapter's prompts are prefilled by the context worker and handed to the decode worker
//!   (the handle's fingerprint is the adapter's, which the decode worker checks), with no
//!   fallback to a local prefill;
//! - the base model's requests for the same prompts, after the adapter's, are answered by the
//!   base model (none of the adapter's cached blocks is taken for them);
//! - `/v1/embeddings` and `/v1/completions` name the adapter too.
//!
//! Needs `$TANDEM_TEST_MODELS/smollm2-f32`, nats-server and the workspace binaries.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use model_prep::lora::{RandomAdapterOptions, merge_adapter, random_adapter};
use serde_json::{Value, json};
use support::{SERVED_NAME, collect_stream, start_api_server, start_worker_as};
use tandem_model::WeightDType;
use tandem_model::lora::Target;
use tandem_test_kit::prometheus::{sample, total};
use tandem_test_kit::{Http, Nats, model_dir};

const MODEL: &str = "smollm2-f32";
const ADAPTER: &str = "sql-lora";

/// A random rank-8 adapter of every projection for the model, and the model with it merged,
/// in the test's temporary directory.
fn prepare() -> (PathBuf, PathBuf) {
    let base = model_dir(MODEL);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let adapter = root.join("live-lora-adapter");
    random_adapter(
        &base,
        &adapter,
        &RandomAdapterOptions {
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.to_vec(),
            seed: 11,
            dtype: WeightDType::Bf16,
            strength: 0.25,
        },
        true,
    )
    .expect("a random adapter");
    let merged = root.join("live-lora-merged");
    merge_adapter(&base, &adapter, &merged, true).expect("the merged model");
    (adapter, merged)
}

/// A greedy chat completion's tokens (as logprob entries) and text.
fn chat(http: &Http, model: &str, question: &str) -> (Value, Vec<(String, f64)>) {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": true,
        "ignore_eos": true,
    });
    let response = http.post("/v1/chat/completions", &body);
    assert_eq!(response.status, 200, "{body}: {}", response.body);
    let json = response.json();
    let tokens = json["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|t| {
            (
                t["token"].as_str().unwrap().to_string(),
                t["logprob"].as_f64().unwrap(),
            )
        })
        .collect();
    (json, tokens)
}

const QUESTIONS: [&str; 3] = [
    "Write a SQL query that counts the orders of each customer in the table orders, and \
     explain each clause of it in one sentence so that a beginner can follow along.",
    "What is the capital of France?",
    "List three prime numbers larger than one hundred and say how you would check that each \
     of them is prime without a computer.",
];

#[test]
fn a_served_adapter_answers_as_its_merged_weights() {
    let (adapter, merged) = prepare();
    let module = format!("{ADAPTER}={}", adapter.display());
    let lora_flags = ["--lora-modules", module.as_str()];

    // The deployment under test: a context and a decode worker, both loading the adapter.
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &lora_flags);
    let _decode = start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &lora_flags);
    api.http
        .wait_for_role("context", 1, Duration::from_secs(60));
    api.http.wait_for_role("decode", 1, Duration::from_secs(60));
    let http = &api.http;

    // The reference: the merged weights, one worker.
    let merged_nats = Nats::start();
    let reference = start_api_server(&merged_nats, &merged);
    let _merged_worker = start_worker_as(&merged_nats, &merged, "both", "merged", &[]);
    reference
        .http
        .wait_for_role("both", 1, Duration::from_secs(60));

    let models = http.get("/v1/models").json();
    let cards = models["data"].as_array().unwrap();
    assert_eq!(cards.len(), 2, "{models}");
    assert_eq!(cards[0]["id"], SERVED_NAME);
    assert!(cards[0].get("parent").is_none(), "{models}");
    assert_eq!(cards[1]["id"], ADAPTER);
    assert_eq!(cards[1]["parent"], SERVED_NAME);
    let card = http.get(&format!("/v1/models/{ADAPTER}"));
    assert_eq!(card.status, 200, "{}", card.body);
    assert_eq!(card.json()["parent"], SERVED_NAME);

    let unknown = http.post(
        "/v1/chat/completions",
        &json!({"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");

    for question in QUESTIONS {
        let (answer, tokens) = chat(http, ADAPTER, question);
        assert_eq!(answer["model"], ADAPTER);
        let (_, want) = chat(&reference.http, SERVED_NAME, question);
        let texts = |t: &[(String, f64)]| t.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>();
        assert_eq!(
            texts(&tokens),
            texts(&want),
            "{question}: the adapter's answer differs from the merged weights'"
        );
        for (i, ((_, got), (_, expected))) in tokens.iter().zip(&want).enumerate() {
            assert!(
                (got - expected).abs() < 2e-3,
                "{question}: token {i}'s logprob {got} against {expected}"
            );
        }
        // The base model's answer on the same deployment: another distribution.
        let (_, base) = chat(http, SERVED_NAME, question);
        let moved = base
            .iter()
            .zip(&tokens)
            .map(|((_, a), (_, b))| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(
            texts(&base) != texts(&tokens) || moved > 0.05,
            "{question}: the base model answers as the adapter ({moved}): {base:?}"
        );
    }

    // Every prompt went through the context worker and was handed over whole.
    let metrics = http.get("/metrics").body;
    let disaggregated = sample(&metrics, "tandem_requests_disaggregated_total").unwrap_or(0.0);
    assert!(disaggregated >= 6.0, "{metrics}");
    assert!(
        total(&metrics, "tandem_kv_transfers_total") >= 6.0,
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_kv_transfer_fallbacks_total"),
        0.0,
        "{metrics}"
    );

    // Streamed, the chunks name the adapter and carry the same text.
    let body = json!({
        "model": ADAPTER,
        "messages": [{"role": "user", "content": QUESTIONS[1]}],
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    });
    let (status, events) = http.post_stream("/v1/chat/completions", &body, |_| {});
    assert_eq!(status, 200);
    assert!(events.iter().all(|e| e["model"] == ADAPTER), "{events:?}");
    let streamed = collect_stream(&events);
    let (whole, _) = chat(http, ADAPTER, QUESTIONS[1]);
    assert_eq!(
        streamed.text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Completions and embeddings name it too, and compute with it.
    let completion = |model: &str| {
        let response = http.post(
            "/v1/completions",
            &json!({"model": model, "prompt": "SELECT name FROM", "max_tokens": 8,
                    "temperature": 0, "logprobs": 0}),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    };
    let adapted = completion(ADAPTER);
    assert_eq!(adapted["model"], ADAPTER);
    // Greedy text may survive the adapter; the distribution does not.
    let logprobs = |c: &Value| c["choices"][0]["logprobs"]["token_logprobs"].clone();
    assert_ne!(logprobs(&adapted), logprobs(&completion(SERVED_NAME)));
    let embedding = |model: &str| {
        let response = http.post(
            "/v1/embeddings",
            &json!({"model": model, "input": "SELECT name FROM customers"}),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    };
    let adapted = embedding(ADAPTER);
    assert_eq!(adapted["model"], ADAPTER);
    let base = embedding(SERVED_NAME);
    assert_ne!(
        adapted["data"][0]["embedding"],
        base["data"][0]["embedding"]
    );

    // The adapter's requests are counted under its name (the unknown name's 404 is not: only
    // served adapters become labels), and both workers list it. A request's count is recorded
    // as its last reply ends, so the scrape may come a moment early.
    let asked = QUESTIONS.len() as f64 + 4.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = http.get("/metrics").body;
        let counted = total(&metrics, "tandem_lora_requests_total");
        if counted >= asked || std::time::Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let series = |name: &str, labels: &str| sample(&metrics, &format!("{name}{{{labels}}}"));
    assert_eq!(
        series(
            "tandem_lora_requests_total",
            &format!("adapter=\"{ADAPTER}\",outcome=\"success\"")
        ),
        Some(asked),
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_lora_requests_total"),
        asked,
        "{metrics}"
    );
    let generated = series(
        "tandem_lora_completion_tokens_total",
        &format!("adapter=\"{ADAPTER}\""),
    )
    .unwrap_or(0.0);
    assert!(generated >= 24.0, "{metrics}");
    assert!(
        generated < total(&metrics, "tandem_completion_tokens_total"),
        "{metrics}"
    );
    assert!(
        series(
            "tandem_lora_prompt_tokens_total",
            &format!("adapter=\"{ADAPTER}\"")
        )
        .unwrap_or(0.0)
            > 0.0,
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_worker_lora_adapter"),
        2.0,
        "{metrics}"
    );
}
