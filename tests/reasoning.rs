//! An api-server with `--reasoning-parser qwen3` in front of real CPU workers (SmolLM2, a
//! context and a decode worker, a real nats-server): a constrained reply's grammar starts
//! after the think block the reply may open (`GrammarSpec::AfterThinking`, compiled by both
//! workers against the model's tokenizer), so the answer is still valid JSON, greedy and
//! seeded, streamed or not, and the same request without a grammar is served as before. The
//! split itself, with replies that do think, is tested against a scripted worker in
//! `api-server/tests/reasoning.rs`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, collect_stream, start_worker_as};
use tandem_test_kit::{ApiServer, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";

fn schema() -> Value {
    json!({"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "country": {"enum": ["FR", "IT", "DE"]}},
           "required": ["city", "country"], "additionalProperties": false})
}

/// The reply's answer parsed as the schema's object, checked against it.
fn check_answer(answer: &str, body: &Value) {
    let value: Value = serde_json::from_str(answer)
        .unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {answer:?} in {body}"));
    let object = value.as_object().expect("an object");
    assert_eq!(object.len(), 2, "{value}");
    assert!(
        object["city"]
            .as_str()
            .is_some_and(|c| c.chars().count() <= 20)
    );
    assert!(["FR", "IT", "DE"].contains(&object["country"].as_str().unwrap()));
}

#[test]
fn a_grammar_holds_the_answer_after_the_thinking_the_reply_may_open() {
    let nats = Nats::start();
    let api = ApiServer::start(
        &nats,
        &model_dir(MODEL),
        SERVED_NAME,
        &["--worker-timeout-ms", "1500", "--reasoning-parser", "qwen3"],
    );
    let _context = start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
    let _decode = start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
    api.http
        .wait_for_role("context", 1, Duration::from_secs(60));
    api.http.wait_for_role("decode", 1, Duration::from_secs(60));

    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "place", "schema": schema()}});
    let ids = |text: &str| -> Vec<u64> {
        let reply = api.http.post(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    // SmolLM2 is no reasoning model: left alone under the grammar it may open a think block
    // and never close it. Logit biases make each branch certain: the end marker's tokens
    // favoured (the reply thinks briefly, then answers), or the block's first token banned
    // (the reply answers at once).
    let close = ids("</think>");
    let open = ids("<think>");
    let favour_close: serde_json::Map<String, Value> = close
        .iter()
        .map(|id| (id.to_string(), json!(100)))
        .collect();
    let ban_open = json!({open[0].to_string(): -100});
    for (question, sampling, bias, thinks) in [
        (
            "Where is the Eiffel Tower?",
            json!({"temperature": 0}),
            json!(favour_close),
            true,
        ),
        (
            "Name a city in Italy.",
            json!({"temperature": 1.0, "seed": 7}),
            json!(favour_close),
            true,
        ),
        (
            "Where is the Colosseum?",
            json!({"temperature": 0}),
            ban_open.clone(),
            false,
        ),
        (
            "Name a city in Germany.",
            json!({"temperature": 1.0, "seed": 3}),
            ban_open.clone(),
            false,
        ),
    ] {
        let mut request = json!({"messages": [{"role": "user", "content": question}],
                                 "max_tokens": 64, "response_format": format,
                                 "logit_bias": bias});
        for (key, value) in sampling.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = api.http.post("/v1/chat/completions", &request);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body = reply.json();
        let message = &body["choices"][0]["message"];
        let answer = message["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no answer: {body}"));
        check_answer(answer, &body);
        assert_eq!(message["reasoning"], message["reasoning_content"], "{body}");
        assert_eq!(message.get("reasoning").is_some(), thinks, "{body}");
        let reasoning_tokens = &body["usage"]["completion_tokens_details"]["reasoning_tokens"];
        assert_eq!(reasoning_tokens.as_u64().unwrap() > 0, thinks, "{body}");

        // Streamed: the same reply, token for token (same seed or greedy).
        request["stream"] = json!(true);
        let (status, events) = api
            .http
            .post_stream("/v1/chat/completions", &request, |_| {});
        assert_eq!(status, 200);
        assert_eq!(collect_stream(&events).text, answer);
    }

    // Without a grammar the reply is served as before, all content (SmolLM2 does not think).
    let reply = api.http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
                "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"], 0,
        "{body}"
    );
}
