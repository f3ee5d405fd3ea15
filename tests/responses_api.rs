//! `/v1/responses` and the request-field checks against a live deployment (nats-server,
//! `worker --role both` and the api-server as real processes, on SmolLM2): the Responses API
//! gives the text chat completions give for the same conversation, in OpenAI's `response`
//! object and typed stream events; a token limit makes the response `incomplete`; a worker that
//! dies mid-stream ends it with `response.failed`; unknown fields are a 400 naming them on
//! every endpoint. Then the official `openai` client, the OpenAI Agents SDK and LangChain's
//! `ChatOpenAI` against the same deployment (tests/python/responses_conformance.py,
//! agents_sdk.py, langchain_openai_plain.py): the fields they send by default are accepted.
//!
//! The Python part needs `openai`, `openai-agents` and `langchain-openai` importable:
//! scripts/test installs them into `target/pylib` and points `TANDEM_TEST_PYTHONPATH` there.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::{Http, Nats, model_dir, prometheus, temp_dir};

const MODEL: &str = "smollm2-bf16";

/// A streamed response's events, read from the raw body: each `event:` line must name the
/// `type` of the JSON on its `data:` line.
fn response_events(http: &Http, body: &Value) -> Vec<Value> {
    let reply = http.post("/v1/responses", body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("text/event-stream"),
        "{reply:?}"
    );
    assert!(!reply.body.contains("[DONE]"), "{}", reply.body);
    reply
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let mut lines = event.lines();
            let kind = lines.next().and_then(|l| l.strip_prefix("event: "));
            let data = lines.next().and_then(|l| l.strip_prefix("data: "));
            let (Some(kind), Some(data)) = (kind, data) else {
                panic!("not an `event:` and `data:` pair: {event:?}");
            };
            let value: Value = serde_json::from_str(data).unwrap();
            assert_eq!(value["type"], kind, "{event}");
            value
        })
        .collect()
}

fn output_text(response: &Value) -> String {
    assert_eq!(
        response["output"].as_array().unwrap().len(),
        1,
        "{response}"
    );
    let message = &response["output"][0];
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    let part = &message["content"][0];
    assert_eq!(part["type"], "output_text");
    assert_eq!(part["annotations"], json!([]));
    part["text"].as_str().unwrap().to_owned()
}

fn chat_text(http: &Http, messages: Value, max_tokens: u32) -> String {
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn responses_api_and_field_checks_on_a_live_deployment() {
    let nats = Nats::start();
    let mut worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &[]);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));

    // A string input: the text chat completions give for the same user message, in the
    // documented `response` object.
    let question = "What is the capital of France?";
    let expected = chat_text(http, json!([{"role": "user", "content": question}]), 24);
    let reply = http.post(
        "/v1/responses",
        &json!({"model": SERVED_NAME, "input": question, "max_output_tokens": 24,
                "temperature": 0, "metadata": {"team": "infra"}, "store": true,
                "user": "u-1"}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert!(
        response["output"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("msg_")
    );
    assert_eq!(response["object"], "response");
    assert_eq!(response["model"], SERVED_NAME);
    assert_eq!(output_text(&response), expected);
    assert!(expected.contains("Paris"), "{expected}");
    assert!(response["created_at"].is_u64() && response["completed_at"].is_u64());
    assert_eq!(response["metadata"], json!({"team": "infra"}));
    assert_eq!(response["user"], "u-1");
    assert_eq!(response["store"], true, "kept, as store: true asked");
    assert_eq!(response["temperature"], 0.0);
    assert_eq!(response["max_output_tokens"], 24);
    assert_eq!(response["text"], json!({"format": {"type": "text"}}));
    assert_eq!(response["tools"], json!([]));
    assert_eq!(response["previous_response_id"], Value::Null);
    let finished = response["status"].as_str().unwrap();
    let usage = &response["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
    );
    // Served from the workers' prefix caches: at most the prompt.
    assert!(
        usage["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            <= usage["input_tokens"].as_u64().unwrap(),
        "{usage}"
    );
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);

    // Instructions and a list of messages: the same prompt as the chat messages with a
    // system message first.
    let conversation = json!([
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "An apple."}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Name another one."}]}
    ]);
    let expected_turn = chat_text(
        http,
        json!([
            {"role": "system", "content": "Answer in three words."},
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "Name another one."}
        ]),
        16,
    );
    let reply = http.post(
        "/v1/responses",
        &json!({"input": conversation, "instructions": "Answer in three words.",
                "max_output_tokens": 16, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(output_text(&reply.json()), expected_turn);
    assert_eq!(reply.json()["instructions"], "Answer in three words.");

    // Streamed: the documented events in order, numbered from 0, deltas adding up to the
    // non-streamed text, the last event carrying the whole response.
    let events = response_events(
        http,
        &json!({"input": question, "max_output_tokens": 24, "temperature": 0,
                "stream": true}),
    );
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], i as u64, "{event}");
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|k| *k != "response.output_text.delta")
        .collect();
    let last = format!("response.{finished}");
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            last.as_str(),
        ]
    );
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, expected);
    let done = events.last().unwrap();
    assert_eq!(output_text(&done["response"]), expected);
    assert_eq!(done["response"]["usage"], usage.clone());
    assert_eq!(
        done["response"]["id"], events[0]["response"]["id"],
        "one id for the whole stream"
    );

    // A token limit: `incomplete`, with the reason, streamed or not.
    let reply = http.post(
        "/v1/responses",
        &json!({"input": "Write a long story about the sea.", "max_output_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cut = reply.json();
    assert_eq!(cut["status"], "incomplete", "{cut}");
    assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(cut["output"][0]["status"], "incomplete");
    assert_eq!(cut["usage"]["output_tokens"], 4);
    let events = response_events(
        http,
        &json!({"input": "Write a long story about the sea.", "max_output_tokens": 4,
                "stream": true}),
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );

    // Logprobs, when `include` asks for them.
    let reply = http.post(
        "/v1/responses",
        &json!({"input": question, "max_output_tokens": 3, "temperature": 0,
                "include": ["message.output_text.logprobs"], "top_logprobs": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let logprobs = reply.json()["output"][0]["content"][0]["logprobs"].clone();
    assert_eq!(logprobs.as_array().unwrap().len(), 3, "{logprobs}");
    assert!(
        logprobs
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["top_logprobs"].as_array().unwrap().len() == 2
                && l["logprob"].as_f64().unwrap() <= 0.0),
        "{logprobs}"
    );

    // Unknown fields on every endpoint, and fields tandem refuses: 400s naming them.
    for (path, body, param, code) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                   "temprature": 0.2}),
            "temprature",
            "unknown_parameter",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 1, "best_off": 2}),
            "best_off",
            "unknown_parameter",
        ),
        (
            "/v1/responses",
            json!({"input": "x", "max_tokens": 1}),
            "max_tokens",
            "unknown_parameter",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "a"}}),
            "audio",
            "unsupported_parameter",
        ),
        (
            "/v1/responses",
            json!({"input": "x", "prompt": {"id": "pmpt_123"}}),
            "prompt",
            "unsupported_parameter",
        ),
        (
            "/v1/responses",
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
            "unsupported_parameter",
        ),
    ] {
        let reply = http.post(path, &body);
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert_eq!(error["param"], param, "{error}");
        assert_eq!(error["code"], code, "{error}");
        assert!(
            error["message"].as_str().unwrap().contains(param),
            "{error}"
        );
    }
    // What clients send with their defaults is accepted.
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                "user": "u", "metadata": {"k": "v"}, "store": false,
                "service_tier": "auto", "stream": false, "n": 1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    // Stored-response routes for a response that is not stored: 404, saying why.
    for (method, path) in [
        ("GET", "/v1/responses/resp_123"),
        ("DELETE", "/v1/responses/resp_123"),
        ("GET", "/v1/responses/resp_123/input_items"),
        ("POST", "/v1/responses/resp_123/cancel"),
    ] {
        let reply = match method {
            "GET" => http.get(path),
            "POST" => http.post(path, &json!({})),
            _ => http.delete(path),
        };
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "response_not_found", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("the api-server that made it"),
            "{error}"
        );
    }

    // The served model by its id; another id, an endpoint tandem does not serve, a route
    // asked with another method: OpenAI's error bodies, never an empty answer.
    let models = http.get("/v1/models").json();
    let served = models["data"][0]["id"].as_str().unwrap().to_string();
    let card = http.get(&format!("/v1/models/{served}"));
    assert_eq!(card.status, 200, "{}", card.body);
    assert_eq!(card.json(), models["data"][0]);
    for (method, path, status, code, header) in [
        (
            "GET",
            "/v1/models/org/other-model",
            404,
            "model_not_found",
            None,
        ),
        ("POST", "/v1/moderations", 404, "unknown_url", None),
        (
            "GET",
            "/v1/embeddings",
            405,
            "method_not_allowed",
            Some("POST"),
        ),
        ("GET", "/v2/chat", 404, "unknown_url", None),
        (
            "GET",
            "/v1/chat/completions",
            405,
            "method_not_allowed",
            Some("POST"),
        ),
    ] {
        let reply = match method {
            "GET" => http.get(path),
            _ => http.post(path, &json!({})),
        };
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.body);
        assert_eq!(reply.json()["error"]["code"], code, "{method} {path}");
        assert_eq!(reply.header("allow"), header, "{method} {path}");
    }

    // vLLM's /tokenize counts the tokens a request is prefilled with: a chat's messages
    // (with tools), a completion's prompt; /detokenize reads them back.
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let weather = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    for body in [
        json!({"messages": messages}),
        json!({"messages": messages, "tools": weather}),
    ] {
        let counted = http.post("/tokenize", &body);
        assert_eq!(counted.status, 200, "{}", counted.body);
        let counted = counted.json();
        let mut chat = body.clone();
        chat["max_tokens"] = json!(1);
        let served = http.post("/v1/chat/completions", &chat).json();
        assert_eq!(
            counted["count"], served["usage"]["prompt_tokens"],
            "{body}: {counted} against {served}"
        );
        assert_eq!(
            counted["tokens"].as_array().unwrap().len() as u64,
            counted["count"]
        );
        assert!(counted["max_model_len"].as_u64().unwrap() > 0);
    }
    let prompt = "The capital of France is";
    let counted = http
        .post(
            "/tokenize",
            &json!({"prompt": prompt, "return_token_strs": true}),
        )
        .json();
    let served = http
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 1}),
        )
        .json();
    assert_eq!(counted["count"], served["usage"]["prompt_tokens"]);
    assert_eq!(
        counted["token_strs"].as_array().unwrap().len() as u64,
        counted["count"]
    );
    let plain = http
        .post(
            "/tokenize",
            &json!({"prompt": prompt, "add_special_tokens": false}),
        )
        .json();
    let read = http
        .post("/detokenize", &json!({"tokens": plain["tokens"]}))
        .json();
    assert_eq!(read["prompt"], prompt, "{read}");
    for (path, body, param, code) in [
        (
            "/tokenize",
            json!({"prompt": "x", "messages": messages}),
            "prompt",
            Value::Null,
        ),
        (
            "/tokenize",
            json!({"prompt": "x", "chat_template": "{{x}}"}),
            "chat_template",
            json!("unsupported_parameter"),
        ),
        (
            "/tokenize",
            json!({"prompt": "x", "tokens": [1]}),
            "tokens",
            json!("unknown_parameter"),
        ),
        (
            "/detokenize",
            json!({"tokens": [1, 1_000_000]}),
            "tokens[1]",
            Value::Null,
        ),
    ] {
        let reply = http.post(path, &body);
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], param, "{path} {body}");
        assert_eq!(reply.json()["error"]["code"], code, "{path} {body}");
    }
    assert_eq!(
        http.post("/tokenize", &json!({"model": "other", "prompt": "x"}))
            .status,
        404
    );

    // vLLM's stop_token_ids: a greedy completion stops at the first of them it samples, the
    // token's own text left out, finish_reason "stop".
    let prompt = "One, two, three,";
    let greedy = http
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
        )
        .json();
    let text = greedy["choices"][0]["text"].as_str().unwrap().to_string();
    let ids = |text: &str| -> Vec<u64> {
        let counted = http.post(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        );
        serde_json::from_value(counted.json()["tokens"].clone()).unwrap()
    };
    let generated = ids(&format!("{prompt}{text}"))[ids(prompt).len()..].to_vec();
    // The first generated token unlike every one before it.
    let at = (1..generated.len())
        .find(|&i| !generated[..i].contains(&generated[i]))
        .expect("a token unlike those before it");
    let stopped = http
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "stop_token_ids": [generated[at]]}),
        )
        .json();
    let read = http
        .post("/detokenize", &json!({"tokens": generated[..at]}))
        .json();
    assert_eq!(stopped["choices"][0]["text"], read["prompt"], "{stopped}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["usage"]["completion_tokens"], at + 1);
    let chat = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                "stop_token_ids": [1, 2]}),
    );
    assert_eq!(chat.status, 200, "{}", chat.body);
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": "x", "stop_token_ids": [5, -1]}),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["param"], "stop_token_ids[1]");

    // The requests are counted under their endpoint.
    let metrics = http.get("/metrics").body;
    assert!(
        prometheus::metric(
            &metrics,
            "tandem_requests_total",
            "endpoint=\"responses\",outcome=\"success\""
        )
        .unwrap_or(0.0)
            >= 6.0,
        "{metrics}"
    );
    assert!(
        prometheus::metric(
            &metrics,
            "tandem_requests_total",
            "endpoint=\"responses\",outcome=\"invalid_request\""
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{metrics}"
    );

    // The Python clients, on the same deployment.
    let base_url = format!("http://127.0.0.1:{}/v1", api.port);
    run_python("responses_conformance.py", &base_url);
    run_python("agents_sdk.py", &base_url);
    run_python("langchain_openai_plain.py", &base_url);

    // The only worker dies mid-stream: the stream ends with `response.failed`, never hangs.
    let mut stream = http.open_stream(
        "/v1/responses",
        &json!({"input": "Count from one to one thousand.", "max_output_tokens": 2000,
                "stream": true, "temperature": 0}),
    );
    assert_eq!(stream.status(), 200);
    let mut deltas = 0;
    while deltas < 3 {
        let event: Value = serde_json::from_str(&stream.next_data().unwrap()).unwrap();
        if event["type"] == "response.output_text.delta" {
            deltas += 1;
        }
    }
    worker.kill();
    let started = Instant::now();
    let mut last = Value::Null;
    while let Some(data) = stream.next_data() {
        last = serde_json::from_str(&data).unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the failure took {:?}",
        started.elapsed()
    );
    assert_eq!(last["type"], "response.failed", "{last}");
    assert_eq!(last["response"]["status"], "failed");
    assert!(last["response"]["error"]["message"].is_string(), "{last}");
    assert!(!output_text(&last["response"]).is_empty(), "{last}");
}

/// `dir` as a view of the test model whose chat template first writes a system turn from a
/// `house_rules` template variable, and one from `documents`, when given.
/// Stored responses (`store: true`, the default) with real processes, on an api-server with two
/// API keys: a response is found again (`GET`, the object as returned) by its key only; the
/// next turn by `previous_response_id`, streamed, gives the text chat completions give for the
/// whole conversation and is stored as its last event had it; a third turn carries both
/// earlier ones; `input_items` lists a response's own input with ids, paged; `store: false`
/// keeps nothing; deleting a response breaks the chains that continue it, with a 400 that
/// names the missing response.
#[test]
fn stored_responses_continue_a_conversation_for_their_key_only() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = tandem_test_kit::ApiServer::start(
        &nats,
        &model,
        SERVED_NAME,
        &[
            "--worker-timeout-ms",
            "1500",
            "--api-key",
            "sk-store-a",
            "--api-key",
            "sk-store-b",
        ],
    );
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    api.http.wait_for_workers(1, Duration::from_secs(30));
    let a = &api.http.clone().with_bearer("sk-store-a");
    let b = &api.http.clone().with_bearer("sk-store-b");
    let turn = |http: &Http, body: Value| {
        let reply = http.post("/v1/responses", &body);
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
        reply.json()
    };
    let first_question = "My name is Ada. Say hello to me.";
    let first = turn(
        a,
        json!({"input": first_question, "max_output_tokens": 12, "temperature": 0}),
    );
    assert_eq!(first["store"], true, "{first}");
    let first_id = first["id"].as_str().unwrap();
    let stored = a.get(&format!("/v1/responses/{first_id}"));
    assert_eq!(stored.status, 200, "{}", stored.body);
    assert_eq!(stored.json(), first, "the object as it was returned");
    // Another key finds nothing, and cannot continue it.
    let other = b.get(&format!("/v1/responses/{first_id}"));
    assert_eq!(other.status, 404, "{}", other.body);
    let other = b.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": first_id, "max_output_tokens": 1}),
    );
    assert_eq!(other.status, 400, "{}", other.body);
    assert_eq!(other.json()["error"]["param"], "previous_response_id");

    // The next turn by previous_response_id, streamed: the whole conversation's text.
    let second_question = "What is my name?";
    let events = response_events(
        a,
        &json!({"input": second_question, "previous_response_id": first_id,
                "max_output_tokens": 12, "temperature": 0, "stream": true}),
    );
    let second = events.last().unwrap()["response"].clone();
    assert_eq!(second["previous_response_id"], first_id, "{second}");
    assert_eq!(second["store"], true);
    let expected = chat_text(
        a,
        json!([
            {"role": "user", "content": first_question},
            {"role": "assistant", "content": output_text(&first)},
            {"role": "user", "content": second_question},
        ]),
        12,
    );
    assert_eq!(output_text(&second), expected);
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(a.get(&format!("/v1/responses/{second_id}")).json(), second);
    // A third turn carries both: its prompt holds the second's prompt and answer.
    let third = turn(
        a,
        json!({"input": "Thanks.", "previous_response_id": second_id,
               "max_output_tokens": 4, "temperature": 0}),
    );
    let tokens = |response: &Value, key: &str| response["usage"][key].as_u64().unwrap();
    assert!(
        tokens(&third, "input_tokens")
            > tokens(&second, "input_tokens") + tokens(&second, "output_tokens"),
        "{third}"
    );

    // The second response's own input: one message with an id; paged.
    let items = a
        .get(&format!("/v1/responses/{second_id}/input_items"))
        .json();
    assert_eq!(items["object"], "list");
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{items}");
    assert_eq!(data[0]["content"], second_question);
    assert!(data[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(items["first_id"], data[0]["id"]);
    assert_eq!(items["has_more"], false);
    let listed = json!({"input": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
    ], "max_output_tokens": 1});
    let listed_id = turn(a, listed)["id"].as_str().unwrap().to_string();
    let page = |query: &str| {
        let reply = a.get(&format!("/v1/responses/{listed_id}/input_items?{query}"));
        assert_eq!(reply.status, 200, "{query}: {}", reply.body);
        let body = reply.json();
        let texts: Vec<String> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["content"].as_str().unwrap().to_string())
            .collect();
        (
            texts,
            body["has_more"].as_bool().unwrap(),
            body["last_id"].clone(),
        )
    };
    let (newest, more, last) = page("limit=2");
    assert_eq!(
        (newest, more),
        (vec!["three".to_string(), "two".to_string()], true)
    );
    let (rest, more, _) = page(&format!("limit=2&after={}", last.as_str().unwrap()));
    assert_eq!((rest, more), (vec!["one".to_string()], false));
    assert_eq!(page("order=asc").0, ["one", "two", "three"]);
    let bad = a.get(&format!("/v1/responses/{listed_id}/input_items?limit=0"));
    assert_eq!(bad.json()["error"]["param"], "limit", "{}", bad.body);

    // store: false keeps nothing.
    let unkept = turn(
        a,
        json!({"input": "x", "max_output_tokens": 1, "store": false}),
    );
    assert_eq!(unkept["store"], false);
    let id = unkept["id"].as_str().unwrap();
    assert_eq!(a.get(&format!("/v1/responses/{id}")).status, 404);

    // Deleting the first response breaks the chains after it.
    assert_eq!(b.delete(&format!("/v1/responses/{first_id}")).status, 404);
    let deleted = a.delete(&format!("/v1/responses/{first_id}"));
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["deleted"], true);
    assert_eq!(a.get(&format!("/v1/responses/{first_id}")).status, 404);
    let broken = a.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": second_id, "max_output_tokens": 1}),
    );
    assert_eq!(broken.status, 400, "{}", broken.body);
    let error = &broken.json()["error"];
    assert_eq!(error["param"], "previous_response_id");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(first_id) && message.contains("no longer stored"),
        "{error}"
    );
    // Four kept (three turns and the listed one), one deleted.
    let metrics = api.http.get("/metrics").body;
    assert_eq!(
        prometheus::metric(&metrics, "tandem_response_store_responses", ""),
        Some(3.0),
        "{metrics}"
    );
}

/// Two api-servers of one model share their stored responses over NATS: a response made on
/// one is retrieved, continued, listed and deleted through the other; a conversation whose
/// turns alternate between them is rebuilt whole (the same text as chat completions give for
/// it); another key finds nothing on either. Background responses are polled through the
/// other api-server to the text the foreground gives, and cancelled through it while they
/// run. When the api-server holding a response is killed, the other says that response is
/// gone with it (a 404 for the stored-response routes, a 400 naming `previous_response_id`
/// for a follow-up), and still serves.
#[test]
fn stored_responses_are_reached_through_any_api_server() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let flags = [
        "--worker-timeout-ms",
        "1500",
        "--api-key",
        "sk-share-a",
        "--api-key",
        "sk-share-b",
    ];
    let api_one = tandem_test_kit::ApiServer::start(&nats, &model, SERVED_NAME, &flags);
    let mut api_two = tandem_test_kit::ApiServer::start(&nats, &model, SERVED_NAME, &flags);
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    api_one.http.wait_for_workers(1, Duration::from_secs(30));
    api_two.http.wait_for_workers(1, Duration::from_secs(30));
    let one = &api_one.http.clone().with_bearer("sk-share-a");
    let two = &api_two.http.clone().with_bearer("sk-share-a");
    let other_key = &api_two.http.clone().with_bearer("sk-share-b");
    let turn = |http: &Http, body: Value| {
        let reply = http.post("/v1/responses", &body);
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
        reply.json()
    };
    let id_of = |response: &Value| response["id"].as_str().unwrap().to_string();

    let first_question = "My name is Ada. Say hello to me.";
    let first = turn(
        one,
        json!({"input": first_question, "max_output_tokens": 12, "temperature": 0}),
    );
    let first_id = id_of(&first);
    let digits = first_id.strip_prefix("resp_").unwrap();
    assert!(
        digits.len() == 48 && digits.bytes().all(|b| b.is_ascii_hexdigit()),
        "{first_id}"
    );
    // Retrieved through the other api-server, as it was returned; not with another key.
    let stored = two.get(&format!("/v1/responses/{first_id}"));
    assert_eq!(stored.status, 200, "{}", stored.body);
    assert_eq!(stored.json(), first);
    assert_eq!(
        other_key.get(&format!("/v1/responses/{first_id}")).status,
        404
    );

    // Continued on the second api-server, then on the first again: the whole conversation.
    let second_question = "What is my name?";
    let second = turn(
        two,
        json!({"input": second_question, "previous_response_id": first_id,
               "max_output_tokens": 12, "temperature": 0}),
    );
    let second_id = id_of(&second);
    assert_ne!(
        &second_id[5..21],
        &first_id[5..21],
        "made by another api-server"
    );
    let expected = chat_text(
        one,
        json!([
            {"role": "user", "content": first_question},
            {"role": "assistant", "content": output_text(&first)},
            {"role": "user", "content": second_question},
        ]),
        12,
    );
    assert_eq!(output_text(&second), expected);
    let third_question = "And what did I ask first?";
    let third = turn(
        one,
        json!({"input": third_question, "previous_response_id": second_id,
               "max_output_tokens": 8, "temperature": 0}),
    );
    let expected = chat_text(
        two,
        json!([
            {"role": "user", "content": first_question},
            {"role": "assistant", "content": output_text(&first)},
            {"role": "user", "content": second_question},
            {"role": "assistant", "content": output_text(&second)},
            {"role": "user", "content": third_question},
        ]),
        8,
    );
    assert_eq!(output_text(&third), expected);
    let third_id = id_of(&third);
    let items = one
        .get(&format!("/v1/responses/{second_id}/input_items"))
        .json();
    assert_eq!(items["data"][0]["content"], second_question, "{items}");
    let refused = other_key.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": second_id, "max_output_tokens": 1}),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);

    // Deleted through the second api-server: gone from the first, and the chain is broken
    // there.
    let deleted = two.delete(&format!("/v1/responses/{first_id}"));
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(one.get(&format!("/v1/responses/{first_id}")).status, 404);
    let broken = two.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": third_id, "max_output_tokens": 1}),
    );
    assert_eq!(broken.status, 400, "{}", broken.body);
    let message = broken.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&first_id) && message.contains("no longer stored"),
        "{message}"
    );
    let metrics = api_two.http.get("/metrics").body;
    assert!(
        prometheus::metric(
            &metrics,
            "tandem_response_store_peer_requests_total",
            "outcome=\"found\""
        )
        .unwrap()
            >= 3.0,
        "{metrics}"
    );

    // Background: answered at once (queued), polled through the other api-server until it
    // has finished, with the text the same request gives in the foreground.
    let queued = turn(
        two,
        json!({"input": first_question, "max_output_tokens": 12, "temperature": 0,
               "background": true}),
    );
    assert_eq!(
        (&queued["status"], &queued["background"], &queued["output"]),
        (&json!("queued"), &json!(true), &json!([])),
        "{queued}"
    );
    let background_id = id_of(&queued);
    let poll = |http: &Http, id: &str, until: &[&str]| {
        let started = Instant::now();
        loop {
            let reply = http.get(&format!("/v1/responses/{id}"));
            assert_eq!(reply.status, 200, "{}", reply.body);
            let object = reply.json();
            if until.contains(&object["status"].as_str().unwrap()) {
                return object;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{object}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let finished = poll(one, &background_id, &["completed", "incomplete", "failed"]);
    assert_eq!(finished["background"], true);
    assert_eq!(output_text(&finished), output_text(&first), "{finished}");
    // A long one (at least 300 numbers, by its schema) is cancelled through the other
    // api-server while it runs; nothing continues it before; cancelling again returns it.
    let long = turn(
        one,
        json!({"input": "List numbers.", "max_output_tokens": 3000, "temperature": 0,
               "background": true, "text": {"format": {"type": "json_schema", "name": "numbers",
               "schema": {"type": "object", "properties": {"n": {"type": "array",
               "items": {"type": "integer"}, "minItems": 300}}, "required": ["n"]}}}}),
    );
    let long_id = id_of(&long);
    poll(two, &long_id, &["in_progress"]);
    let early = two.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": long_id, "max_output_tokens": 1}),
    );
    assert_eq!(early.status, 400, "{}", early.body);
    assert!(early.body.contains("still in progress"), "{}", early.body);
    let cancelled = two.post(&format!("/v1/responses/{long_id}/cancel"), &json!({}));
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json()["status"], "cancelled");
    assert_eq!(
        one.get(&format!("/v1/responses/{long_id}")).json()["status"],
        "cancelled"
    );
    let again = one.post(&format!("/v1/responses/{long_id}/cancel"), &json!({}));
    assert_eq!(
        (again.status, again.json()["status"].clone()),
        (200, json!("cancelled"))
    );
    let metrics = api_one.http.get("/metrics").body;
    assert_eq!(
        prometheus::metric(&metrics, "tandem_responses_background_running", ""),
        Some(0.0),
        "{metrics}"
    );
    // A foreground response cannot be cancelled; a background one must be stored.
    let foreground = one.post(&format!("/v1/responses/{third_id}/cancel"), &json!({}));
    assert_eq!(foreground.status, 400, "{}", foreground.body);
    let refused = one.post(
        "/v1/responses",
        &json!({"input": "x", "background": true, "store": false}),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"]["param"], "background");
    // Streamed in the background: the events of a foreground stream, and the response stored
    // as its last event has it, found through the other api-server.
    let events = response_events(
        one,
        &json!({"input": first_question, "max_output_tokens": 12, "temperature": 0,
                "background": true, "stream": true}),
    );
    let last = events.last().unwrap()["response"].clone();
    assert_eq!(last["background"], true, "{last}");
    assert_eq!(output_text(&last), output_text(&first));
    let stored = poll(
        two,
        last["id"].as_str().unwrap(),
        &["completed", "incomplete"],
    );
    assert_eq!(stored, last);
    // A client that leaves a background stream leaves the response running: it is still in
    // progress after the client has gone, until cancelled.
    let mut stream = one.open_stream(
        "/v1/responses",
        &json!({"input": "List numbers.", "max_output_tokens": 3000, "temperature": 0,
                "background": true, "stream": true, "text": {"format": {"type": "json_schema",
                "name": "numbers", "schema": {"type": "object", "properties": {"n": {
                "type": "array", "items": {"type": "integer"}, "minItems": 300}},
                "required": ["n"]}}}}),
    );
    let created: Value = serde_json::from_str(&stream.next_data().unwrap()).unwrap();
    let left_id = created["response"]["id"].as_str().unwrap().to_string();
    drop(stream);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        two.get(&format!("/v1/responses/{left_id}")).json()["status"],
        "in_progress"
    );
    // Its stream resumed through the other api-server after its first two events, while it
    // runs: the events from 2 on, as they come.
    let mut resumed = two.open_get_stream(&format!(
        "/v1/responses/{left_id}?stream=true&starting_after=1"
    ));
    assert_eq!(resumed.status(), 200);
    let mut seen = Vec::new();
    while seen.len() < 12 {
        let event: Value = serde_json::from_str(&resumed.next_data().unwrap()).unwrap();
        seen.push(event);
    }
    let numbers: Vec<u64> = seen
        .iter()
        .map(|event| event["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (2..14).collect::<Vec<u64>>(), "{seen:?}");
    assert_eq!(seen[0]["type"], "response.output_item.added", "{seen:?}");
    assert_eq!(seen[2]["type"], "response.output_text.delta", "{seen:?}");
    // Cancelled meanwhile: the resumed stream ends with the events made before.
    let cancelled = two.post(&format!("/v1/responses/{left_id}/cancel"), &json!({}));
    assert_eq!(
        cancelled.json()["status"],
        "cancelled",
        "{}",
        cancelled.body
    );
    let rest = resumed.collect();
    let last_number = rest
        .last()
        .map(|data| serde_json::from_str::<Value>(data).unwrap()["sequence_number"].clone());
    assert!(
        last_number.is_none_or(|n| n.as_u64().unwrap() >= 13),
        "{rest:?}"
    );
    // A whole stream, once ended, is resumed the same through either api-server: every
    // event from the start, or those after one.
    let whole = response_events(
        one,
        &json!({"input": "Say hi.", "max_output_tokens": 6, "temperature": 0,
                "background": true, "stream": true}),
    );
    let whole_id = whole[0]["response"]["id"].as_str().unwrap().to_string();
    let replayed = |http: &Http, query: &str| -> Vec<Value> {
        let reply = http.get(&format!("/v1/responses/{whole_id}?stream=true{query}"));
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply
            .body
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap())
            .collect()
    };
    let started = Instant::now();
    while two.get(&format!("/v1/responses/{whole_id}")).json()["status"] == "in_progress" {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(replayed(two, ""), whole);
    assert_eq!(replayed(one, "&starting_after=3"), whole[4..]);
    // Refused: a response that was not streamed in the background, starting_after without
    // stream, include, a stream that is not a boolean.
    let refusal = |http: &Http, path: String| {
        let reply = http.get(&path);
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        reply.json()["error"]["param"].as_str().unwrap().to_string()
    };
    let foreground = id_of(&turn(one, json!({"input": "Hi", "max_output_tokens": 2})));
    assert_eq!(
        refusal(two, format!("/v1/responses/{foreground}?stream=true")),
        "stream"
    );
    assert_eq!(
        refusal(two, format!("/v1/responses/{whole_id}?starting_after=2")),
        "starting_after"
    );
    assert_eq!(
        refusal(one, format!("/v1/responses/{whole_id}?include=x")),
        "include"
    );
    assert_eq!(
        refusal(one, format!("/v1/responses/{whole_id}?stream=maybe")),
        "query"
    );

    // The second api-server dies: its responses go with it, and the first says so.
    api_two.proc.kill();
    let started = Instant::now();
    let gone = loop {
        let reply = one.get(&format!("/v1/responses/{second_id}"));
        if reply.status == 404 || started.elapsed() > Duration::from_secs(10) {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(gone.status, 404, "{}", gone.body);
    let error = &gone.json()["error"];
    assert_eq!(error["code"], "response_not_found");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no longer answers"),
        "{error}"
    );
    let follow_up = one.post(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": third_id, "max_output_tokens": 1}),
    );
    assert_eq!(follow_up.status, 400, "{}", follow_up.body);
    let error = &follow_up.json()["error"];
    assert_eq!(error["param"], "previous_response_id");
    assert!(
        error["message"].as_str().unwrap().contains(&second_id),
        "{error}"
    );
    // It still serves, and stores.
    let fresh = id_of(&turn(
        one,
        json!({"input": "Hello", "max_output_tokens": 2}),
    ));
    assert_eq!(one.get(&format!("/v1/responses/{fresh}")).status, 200);
    let metrics = api_one.http.get("/metrics").body;
    assert!(
        prometheus::metric(
            &metrics,
            "tandem_response_store_peer_requests_total",
            "outcome=\"gone\""
        )
        .unwrap()
            >= 2.0,
        "{metrics}"
    );
}

fn model_with_house_rules(dir: &std::path::Path) {
    tandem_test_kit::model_with_edited_json(
        &model_dir(MODEL),
        dir,
        "tokenizer_config.json",
        |config| {
            let template = config["chat_template"].as_str().unwrap().to_owned();
            config["chat_template"] = json!(format!(
                "{{% if house_rules %}}<|im_start|>system\n{{{{ house_rules }}}}<|im_end|>\n{{% endif %}}\
             {{% if documents %}}<|im_start|>system\n{{% for d in documents %}}{{{{ d.text }}}}\n\
             {{% endfor %}}<|im_end|>\n{{% endif %}}{template}"
            ));
        },
    );
}

/// vLLM's chat template options: `add_generation_prompt: false` leaves the assistant's
/// header out; `continue_final_message` ends the prompt inside the last (assistant) message,
/// which the model continues; `chat_template_kwargs` and `documents` reach the template (here
/// variables the api-server's copy of the template renders). `/tokenize` renders each as the
/// chat request is prefilled. vLLM's chat `echo` starts the reply with the assistant's words
/// it continues. vLLM's fields tandem does not serve are 400s naming them.
#[test]
fn chat_template_options_on_a_live_deployment() {
    let model = temp_dir("house-rules").join("model");
    model_with_house_rules(&model);
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &[]);
    let api = start_api_server(&nats, &model);
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));

    let question = json!({"role": "user", "content": "What is the capital of France?"});
    let prefill = "The capital of France is";
    let begun = json!([question, {"role": "assistant", "content": prefill}]);
    // The prompt a /tokenize body renders: its token count and text.
    let rendered = |body: Value| -> (u64, String) {
        let counted = http.post("/tokenize", &body);
        assert_eq!(counted.status, 200, "{body}: {}", counted.body);
        let counted = counted.json();
        let read = http
            .post("/detokenize", &json!({"tokens": counted["tokens"]}))
            .json();
        (
            counted["count"].as_u64().unwrap(),
            read["prompt"].as_str().unwrap().to_owned(),
        )
    };
    let (_, answering) = rendered(json!({"messages": [question]}));
    assert!(
        answering.ends_with("<|im_start|>assistant\n"),
        "{answering:?}"
    );
    let (_, bare) = rendered(json!({"messages": [question], "add_generation_prompt": false}));
    assert_eq!(format!("{bare}<|im_start|>assistant\n"), answering);
    let (continued_count, continued) =
        rendered(json!({"messages": begun, "continue_final_message": true}));
    assert!(
        continued.ends_with(&format!("<|im_start|>assistant\n{prefill}")),
        "{continued:?}"
    );
    let rules = "Answer in one word.";
    let (ruled_count, ruled) =
        rendered(json!({"messages": [question], "chat_template_kwargs": {"house_rules": rules}}));
    assert!(
        ruled.contains(&format!("<|im_start|>system\n{rules}<|im_end|>")),
        "{ruled:?}"
    );

    // vLLM's `documents`: the template's variable of that name.
    let (_, grounded) = rendered(json!({"messages": [question],
        "documents": [{"title": "Atlas", "text": "Paris is the capital of France."}]}));
    assert!(
        grounded.contains("<|im_start|>system\nParis is the capital of France.\n<|im_end|>"),
        "{grounded:?}"
    );

    let chat = |extra: Value| -> Value {
        let mut request = json!({"model": SERVED_NAME, "temperature": 0, "max_tokens": 6});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = http.post("/v1/chat/completions", &request);
        assert_eq!(reply.status, 200, "{request}: {}", reply.body);
        reply.json()
    };
    // The model goes on from the assistant's words: the answer's next word, not a new turn.
    let going_on = chat(json!({"messages": begun, "continue_final_message": true}));
    assert_eq!(going_on["usage"]["prompt_tokens"], continued_count);
    let words = going_on["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(words.trim_start().starts_with("Paris"), "{words:?}");
    // vLLM's chat `echo`: the reply starts with the assistant's words it continues, whole
    // and streamed (the first chunk carries them).
    let echoed = chat(json!({"messages": begun, "continue_final_message": true, "echo": true}));
    assert_eq!(
        echoed["choices"][0]["message"]["content"],
        format!("{prefill}{words}")
    );
    let streamed = http.post(
        "/v1/chat/completions",
        &json!({"model": SERVED_NAME, "temperature": 0, "max_tokens": 6, "stream": true,
                "messages": begun, "continue_final_message": true, "echo": true}),
    );
    let deltas: Vec<String> = streamed
        .body
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| {
            let chunk: Value = serde_json::from_str(data).unwrap();
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(deltas[0], prefill, "{deltas:?}");
    assert_eq!(deltas.concat(), format!("{prefill}{words}"));
    let plain = chat(json!({"messages": [question], "echo": true}));
    assert!(
        !plain["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("What is"),
        "nothing echoed after a user message: {plain}"
    );
    let ruled_reply = chat(json!({"messages": [question],
        "chat_template_kwargs": {"house_rules": rules}}));
    assert_eq!(ruled_reply["usage"]["prompt_tokens"], ruled_count);

    for (body, param, code) in [
        (
            json!({"messages": begun, "continue_final_message": true,
                   "add_generation_prompt": true}),
            "continue_final_message",
            Value::Null,
        ),
        (
            json!({"messages": [question], "continue_final_message": true}),
            "continue_final_message",
            Value::Null,
        ),
        (
            json!({"messages": [question], "chat_template_kwargs": {"tools": []}}),
            "chat_template_kwargs.tools",
            Value::Null,
        ),
        (
            json!({"messages": [question], "chat_template": "{{ messages }}"}),
            "chat_template",
            json!("unsupported_parameter"),
        ),
        // vLLM's fields tandem does not serve, refused by name.
        (
            json!({"messages": [question], "add_special_tokens": true}),
            "add_special_tokens",
            json!("unsupported_parameter"),
        ),
        (
            json!({"messages": [question], "priority": 1_i64 << 40}),
            "priority",
            json!(null),
        ),
        (
            json!({"messages": [question], "use_beam_search": true}),
            "use_beam_search",
            json!("unsupported_parameter"),
        ),
    ] {
        let reply = http.post("/v1/chat/completions", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], param, "{body}");
        assert_eq!(reply.json()["error"]["code"], code, "{body}");
    }
}

/// `truncation: "auto"` on the tiny model (a context of 1,024 tokens): a conversation longer
/// than the context is answered from its latest turns that fit, the instructions kept, where
/// `"disabled"` is a 400; `/tokenize` of the kept turns counts the response's input tokens, and
/// one more exchange would not have fit.
#[test]
fn truncation_auto_keeps_the_latest_turns_that_fit() {
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model_dir("tiny"), "w0", &[]);
    let api = start_api_server(&nats, &model_dir("tiny"));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    let context = http.get("/v1/models").json()["data"][0]["max_model_len"]
        .as_u64()
        .unwrap();
    let instructions = "Answer briefly.";
    let count = |turns: &[Value]| -> u64 {
        let mut messages = vec![json!({"role": "system", "content": instructions})];
        messages.extend_from_slice(turns);
        let counted = http.post("/tokenize", &json!({"messages": messages}));
        assert_eq!(counted.status, 200, "{}", counted.body);
        counted.json()["count"].as_u64().unwrap()
    };
    // Exchanges of distinct text until the whole passes the context by half.
    let mut turns: Vec<Value> = Vec::new();
    for i in 0.. {
        let text = |who: &str| format!("{who} {i}: {}", "the quick brown fox ".repeat(6));
        turns.push(json!({"role": "user", "content": text("question")}));
        turns.push(json!({"role": "assistant", "content": text("answer")}));
        if count(&turns) > context * 3 / 2 {
            break;
        }
    }
    turns.push(json!({"role": "user", "content": "And now?"}));
    let request = |truncation: &str| {
        json!({"instructions": instructions, "input": turns, "max_output_tokens": 4,
               "truncation": truncation})
    };
    let refused = http.post("/v1/responses", &request("disabled"));
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "context_length_exceeded");

    let reply = http.post("/v1/responses", &request("auto"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["truncation"], "auto");
    let input_tokens = response["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input_tokens + 4 <= context, "{input_tokens} of {context}");
    // The kept turns start at a question: those from that question on count the input, and
    // one exchange more would not fit.
    let kept = (0..turns.len())
        .step_by(2)
        .find(|&start| count(&turns[start..]) == input_tokens)
        .unwrap_or_else(|| panic!("no question starts the {input_tokens} input tokens"));
    assert!(kept > 0, "nothing was dropped");
    assert!(count(&turns[kept - 2..]) + 4 > context);

    // A last message longer than the context alone cannot be truncated to fit.
    let long = json!({"input": "the quick brown fox ".repeat(400), "max_output_tokens": 4,
                      "truncation": "auto"});
    let reply = http.post("/v1/responses", &long);
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "context_length_exceeded");
}

/// Runs tests/python/SCRIPT against `base_url` (`http://host:port/v1`).
fn run_python(script: &str, base_url: &str) {
    support::run_python_script(script, base_url, &[]);
}
