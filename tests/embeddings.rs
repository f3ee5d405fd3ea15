//! `/v1/embeddings` on a live disaggregated deployment (nats-server, a context and a decode
//! worker and the api-server as real processes, SmolLM2 on the CPU): each input's vector is
//! the final-normed hidden state of its last token, computed by the context worker the input
//! is routed to, which answers it whole. Checked end to end:
//! - the vector is the one the model's lm_head reads: its best row of the (tied) embedding
//!   matrix, read here from the model's safetensors, is the token a greedy completion of the
//!   same text writes first;
//! - vectors are unit length (the default pooling normalizes), the same for an input alone or
//!   in a batch, as text or as its token ids, and again once the prompt is cached;
//! - `dimensions` cuts and normalizes again, `encoding_format: base64` carries the same
//!   floats, `usage` counts each input's tokens;
//! - bad requests are 400s naming the field; the official `openai` client reads the vectors.
//!
//! Needs `$TANDEM_TEST_MODELS/smollm2-bf16`, nats-server and the workspace binaries.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, run_python_script, start_api_server, start_worker_as};
use tandem_test_kit::prometheus::{sample, total};
use tandem_test_kit::{Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";

fn vector(item: &Value) -> Vec<f32> {
    item["embedding"]
        .as_array()
        .expect("a list of floats")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Relative L2 distance of `a` from `b`.
fn distance(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    d.sqrt() / norm(b)
}

/// The `[vocab, hidden]` token embedding matrix of a bf16 safetensors file, as f32.
fn embedding_matrix(path: &std::path::Path) -> (Vec<f32>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let entry = &header["model.embed_tokens.weight"];
    assert_eq!(entry["dtype"], "BF16");
    let hidden = entry["shape"][1].as_u64().unwrap() as usize;
    let start = 8 + header_len + entry["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + header_len + entry["data_offsets"][1].as_u64().unwrap() as usize;
    let floats = bytes[start..end]
        .chunks_exact(2)
        .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
        .collect();
    (floats, hidden)
}

fn embed(http: &Http, body: Value) -> Value {
    let response = http.post("/v1/embeddings", &body);
    assert_eq!(response.status, 200, "{body}: {}", response.body);
    response.json()
}

fn refused(http: &Http, body: Value) -> (String, Option<String>) {
    let response = http.post("/v1/embeddings", &body);
    assert_eq!(response.status, 400, "{body}: {}", response.body);
    let error = &response.json()["error"];
    (
        error["param"].as_str().unwrap_or_default().to_string(),
        error["code"].as_str().map(str::to_string),
    )
}

#[test]
fn embeddings_are_the_last_hidden_state_the_lm_head_reads() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
    let _decode = start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
    api.http
        .wait_for_role("context", 1, Duration::from_secs(60));
    api.http.wait_for_role("decode", 1, Duration::from_secs(60));
    let http = &api.http;

    let texts = [
        "The capital of France is",
        "Rust is a programming language that",
        "One, two, three, four,",
    ];
    let batch = embed(http, json!({"model": SERVED_NAME, "input": texts}));
    // Each answered whole by the context worker: nothing handed over, nothing fell back.
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(&metrics, "tandem_requests_disaggregated_total"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_kv_transfers_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        total(&metrics, "tandem_kv_transfer_fallbacks_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(batch["object"], "list");
    assert_eq!(batch["model"], SERVED_NAME);
    let data = batch["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    let (matrix, hidden) = embedding_matrix(&model_dir(MODEL).join("model.safetensors"));
    let mut prompt_tokens = 0;
    let mut vectors = Vec::new();
    for (i, (item, text)) in data.iter().zip(texts).enumerate() {
        assert_eq!(
            (item["object"].as_str(), item["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let v = vector(item);
        assert_eq!(v.len(), hidden);
        assert!(
            (norm(&v) - 1.0).abs() < 1e-4,
            "input {i}: norm {}",
            norm(&v)
        );
        // The lm_head (tied: the embedding matrix) applied to the vector: its best token is
        // the first token of the greedy completion of the same text.
        let best = matrix
            .chunks_exact(hidden)
            .map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
            .0;
        let completion = http.post(
            "/v1/completions",
            &json!({"prompt": text, "max_tokens": 1, "temperature": 0,
                "return_tokens_as_token_ids": true, "logprobs": 0}),
        );
        assert_eq!(completion.status, 200, "{}", completion.body);
        let first = completion.json()["choices"][0]["logprobs"]["tokens"][0]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(first, format!("token_id:{best}"), "input {i}: {text:?}");
        let count = http.post("/tokenize", &json!({"prompt": text})).json()["count"]
            .as_u64()
            .unwrap();
        prompt_tokens += count;
        vectors.push(v);
    }
    assert_eq!(
        batch["usage"]["prompt_tokens"].as_u64(),
        Some(prompt_tokens)
    );
    assert_eq!(batch["usage"]["total_tokens"].as_u64(), Some(prompt_tokens));

    // Alone (now cached), and as token ids: the same vector.
    let alone = embed(http, json!({"input": texts[1]}));
    assert!(distance(&vector(&alone["data"][0]), &vectors[1]) < 1e-5);
    let ids = http.post("/tokenize", &json!({"prompt": texts[2]})).json()["tokens"].clone();
    let by_ids = embed(http, json!({"input": ids}));
    assert!(distance(&vector(&by_ids["data"][0]), &vectors[2]) < 1e-5);

    // `dimensions`: the first components, normalized again.
    let short = embed(http, json!({"input": texts[0], "dimensions": 64}));
    let v = vector(&short["data"][0]);
    let cut: Vec<f32> = vectors[0][..64]
        .iter()
        .map(|x| x / norm(&vectors[0][..64]))
        .collect();
    assert_eq!(v.len(), 64);
    assert!(distance(&v, &cut) < 1e-5);

    // base64: the little-endian f32 bytes of the same floats.
    let encoded = embed(
        http,
        json!({"input": texts[0], "encoding_format": "base64"}),
    );
    let text = encoded["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    let bytes = base64_decode(text);
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(distance(&floats, &vectors[0]) < 1e-6);

    // Refusals, by field.
    assert_eq!(
        refused(http, json!({"input": "a", "dimension": 3})),
        ("dimension".into(), Some("unknown_parameter".into()))
    );
    assert_eq!(
        refused(http, json!({"input": "a", "dimensions": 0})).0,
        "dimensions"
    );
    assert_eq!(
        refused(http, json!({"input": "a", "dimensions": hidden + 1})).0,
        "dimensions"
    );
    assert_eq!(
        refused(http, json!({"input": "a", "encoding_format": "int8"})).0,
        "encoding_format"
    );
    assert_eq!(refused(http, json!({"input": ["a", ""]})).0, "input[1]");
    assert_eq!(refused(http, json!({"input": []})).0, "input");
    let too_long: Vec<u32> = (0..9000).map(|i| 100 + i % 1000).collect();
    assert_eq!(
        refused(http, json!({"input": too_long})),
        ("input".into(), Some("context_length_exceeded".into()))
    );
    // Cut to its last tokens, the same input fits.
    let cut = embed(
        http,
        json!({"input": too_long, "truncate_prompt_tokens": 16}),
    );
    assert_eq!(cut["usage"]["prompt_tokens"], 16);

    // Counted under their own endpoint.
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(
            &metrics,
            "tandem_requests_total{endpoint=\"embeddings\",outcome=\"success\"}"
        ),
        Some(6.0),
        "{metrics}"
    );

    // The official client (base64 by default, decoded into floats).
    let expected = serde_json::to_string(&vectors[0]).unwrap();
    run_python_script(
        "openai_embeddings.py",
        &format!("http://127.0.0.1:{}/v1", api.port),
        &[SERVED_NAME, texts[0], &expected],
    );
}

/// Standard base64 (with padding), decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(value(c)) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
