//! A reasoning model's thinking through the api-server's chat route, against a scripted bus
//! peer (no engine, see `common/bus_peer.rs`) whose reply is a think block, its markers cut
//! across tokens and messages, then an answer: with `--reasoning-parser qwen3` the thinking
//! is the message's `reasoning` (and `reasoning_content`), streamed in deltas that add up to
//! it and never carry the markers, counted in `reasoning_tokens`; tool calls are parsed from
//! the answer; without the parser the reply is all content; assistant messages send their
//! reasoning back, and malformed ones are refused by name.

mod common;

use common::bus_peer::{
    REASONING_ANSWER, REASONING_TEXT, REASONING_TOKEN_COUNT, SCRIPT_REASONING,
    SCRIPT_REASONING_TOOL_CALL, TOOL_CALL_ARGUMENTS, reasoning_tokens,
};
use common::{SERVED_NAME, start_with_peer};
use serde_json::{Value, json};

const PARSER: [&str; 2] = ["--reasoning-parser", "qwen3"];

fn chat(max_tokens: u32, extra: Value) -> Value {
    let mut body = json!({"model": SERVED_NAME, "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": "Why?"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The chunks of a streamed reply (before `[DONE]`), parsed.
fn stream_events(server: &tandem_test_kit::ApiServer, body: &Value) -> Vec<Value> {
    let stream = server.http.open_stream("/v1/chat/completions", body);
    assert_eq!(stream.status(), 200);
    let events = stream.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[test]
fn thinking_is_the_reasoning_and_the_rest_the_content() {
    let (_nats, _peer, server) = start_with_peer(&PARSER);
    let response = server.http.post(
        "/v1/chat/completions",
        &chat(SCRIPT_REASONING, json!({"n": 2})),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    for choice in body["choices"].as_array().unwrap() {
        let message = &choice["message"];
        assert_eq!(message["reasoning"], REASONING_TEXT, "{body}");
        assert_eq!(message["reasoning_content"], REASONING_TEXT, "{body}");
        assert_eq!(message["content"], REASONING_ANSWER, "{body}");
        assert_eq!(choice["finish_reason"], "stop");
    }
    // Both replies thought: counted on /metrics too.
    let metrics = server.http.get("/metrics").body;
    let expected_tokens = format!(
        "tandem_reasoning_tokens_total {}",
        2 * REASONING_TOKEN_COUNT
    );
    assert!(metrics.contains(&expected_tokens), "{metrics}");
    assert!(
        metrics.contains("tandem_reasoning_replies_total 2"),
        "{metrics}"
    );
    let usage = &body["usage"];
    let tokens = reasoning_tokens().len() as u64;
    assert_eq!(usage["completion_tokens"], 2 * tokens, "{usage}");
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"],
        2 * REASONING_TOKEN_COUNT,
        "{usage}"
    );
}

#[test]
fn streamed_thinking_adds_up_to_the_reasoning_without_its_markers() {
    let (_nats, _peer, server) = start_with_peer(&PARSER);
    let events = stream_events(
        &server,
        &chat(
            SCRIPT_REASONING,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    let (mut reasoning, mut reasoning_content, mut content) =
        (String::new(), String::new(), String::new());
    let mut answer_started = false;
    for event in &events {
        let Some(choice) = event["choices"].get(0) else {
            continue;
        };
        let delta = &choice["delta"];
        assert_eq!(delta["reasoning"], delta["reasoning_content"], "{event}");
        if let Some(text) = delta["reasoning"].as_str() {
            assert!(!answer_started, "reasoning after the answer began: {event}");
            assert!(!text.contains("think>") && !text.contains("<th"), "{event}");
            reasoning.push_str(text);
            reasoning_content.push_str(delta["reasoning_content"].as_str().unwrap());
        }
        if let Some(text) = delta["content"].as_str() {
            assert!(!text.contains("think>"), "a marker in content: {event}");
            answer_started |= !text.is_empty();
            content.push_str(text);
        }
    }
    assert_eq!(reasoning, REASONING_TEXT);
    assert_eq!(reasoning_content, REASONING_TEXT);
    assert_eq!(content, REASONING_ANSWER);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"], REASONING_TOKEN_COUNT,
        "{usage}"
    );
}

#[test]
fn without_a_reasoning_parser_the_thinking_stays_in_the_content() {
    let (_nats, _peer, server) = start_with_peer(&[]);
    let body = server
        .http
        .post("/v1/chat/completions", &chat(SCRIPT_REASONING, json!({})))
        .json();
    let message = &body["choices"][0]["message"];
    let whole: String = reasoning_tokens().iter().map(|t| t.text.as_str()).collect();
    assert_eq!(message["content"], whole.as_str(), "{body}");
    assert!(message.get("reasoning").is_none(), "{body}");
    assert!(message.get("reasoning_content").is_none(), "{body}");
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[test]
fn a_tool_call_after_the_thinking_is_parsed_from_the_answer() {
    let (_nats, _peer, server) = start_with_peer(&PARSER);
    let tools = json!({"tools": [{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
    let body = server
        .http
        .post(
            "/v1/chat/completions",
            &chat(SCRIPT_REASONING_TOOL_CALL, tools.clone()),
        )
        .json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(choice["message"]["reasoning"], REASONING_TEXT, "{body}");
    assert_eq!(choice["message"]["content"], "Checking.", "{body}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], TOOL_CALL_ARGUMENTS);

    // Streamed: the same reasoning, then the call in deltas.
    let mut streamed = tools;
    streamed["stream"] = json!(true);
    let events = stream_events(&server, &chat(SCRIPT_REASONING_TOOL_CALL, streamed));
    let mut reasoning = String::new();
    let mut arguments = String::new();
    for event in &events {
        let delta = &event["choices"][0]["delta"];
        reasoning.push_str(delta["reasoning"].as_str().unwrap_or_default());
        for piece in delta["tool_calls"].as_array().into_iter().flatten() {
            arguments.push_str(piece["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    assert_eq!(reasoning, REASONING_TEXT);
    assert_eq!(arguments, TOOL_CALL_ARGUMENTS);
}

#[test]
fn assistant_messages_send_their_reasoning_back_and_malformed_ones_are_refused() {
    let (_nats, _peer, server) = start_with_peer(&PARSER);
    let turns = |assistant: Value, user: Value| {
        json!({"model": SERVED_NAME, "max_tokens": SCRIPT_REASONING, "messages": [
            user, assistant, {"role": "user", "content": "And then?"}]})
    };
    let user = json!({"role": "user", "content": "Why?"});
    for assistant in [
        json!({"role": "assistant", "content": "Because.", "reasoning": "Think."}),
        json!({"role": "assistant", "content": "Because.", "reasoning_content": "Think."}),
        json!({"role": "assistant", "content": "Because.", "reasoning": "Think.",
               "reasoning_content": "Think."}),
    ] {
        let response = server
            .http
            .post("/v1/chat/completions", &turns(assistant, user.clone()));
        assert_eq!(response.status, 200, "{}", response.body);
    }
    for (assistant, user, param) in [
        (
            json!({"role": "assistant", "content": "B.", "reasoning": "A.",
                   "reasoning_content": "C."}),
            user.clone(),
            "messages[1].reasoning_content",
        ),
        (
            json!({"role": "assistant", "content": "B."}),
            json!({"role": "user", "content": "Why?", "reasoning": "A."}),
            "messages[0].reasoning",
        ),
    ] {
        let response = server
            .http
            .post("/v1/chat/completions", &turns(assistant, user));
        assert_eq!(response.status, 400, "{}", response.body);
        assert_eq!(
            response.json()["error"]["param"],
            param,
            "{}",
            response.body
        );
    }
}

#[test]
fn a_response_has_its_thinking_as_a_reasoning_item_that_a_follow_up_takes_back() {
    let (_nats, _peer, server) = start_with_peer(&PARSER);
    let request = json!({"model": SERVED_NAME, "input": "Why?",
                         "max_output_tokens": SCRIPT_REASONING});
    let response = server.http.post("/v1/responses", &request);
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 2, "{body}");
    assert_eq!(output[0]["type"], "reasoning");
    assert!(output[0]["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(
        output[0]["content"],
        json!([{"type": "reasoning_text", "text": REASONING_TEXT}])
    );
    assert_eq!(output[1]["type"], "message");
    assert_eq!(output[1]["content"][0]["text"], REASONING_ANSWER);
    assert_eq!(
        body["usage"]["output_tokens_details"]["reasoning_tokens"],
        REASONING_TOKEN_COUNT
    );

    // The stored output (a reasoning item first) is the next request's history, and so is
    // the same output sent back by a client that keeps its own.
    let follow_up = json!({"model": SERVED_NAME, "input": "And then?",
                           "previous_response_id": body["id"], "max_output_tokens": 16});
    let response = server.http.post("/v1/responses", &follow_up);
    assert_eq!(response.status, 200, "{}", response.body);
    let mut input = body["output"].as_array().unwrap().clone();
    input.insert(0, json!({"role": "user", "content": "Why?"}));
    input.push(json!({"role": "user", "content": "And then?"}));
    let stateless = json!({"model": SERVED_NAME, "input": input, "max_output_tokens": 16});
    let response = server.http.post("/v1/responses", &stateless);
    assert_eq!(response.status, 200, "{}", response.body);

    // No effort setting to honour: with a reasoning model even `none` is refused by name.
    let mut effort = request.clone();
    effort["reasoning"] = json!({"effort": "none"});
    let response = server.http.post("/v1/responses", &effort);
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.json()["error"]["param"], "reasoning.effort");

    // Streamed: the reasoning item's events, then the message's.
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let stream = server.http.open_stream("/v1/responses", &streamed);
    assert_eq!(stream.status(), 200);
    let events: Vec<Value> = stream
        .collect()
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let thinking: String = events
        .iter()
        .filter(|e| e["type"] == "response.reasoning_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(thinking, REASONING_TEXT);
    let done = events
        .iter()
        .find(|e| e["type"] == "response.reasoning_text.done")
        .expect("reasoning_text.done");
    assert_eq!(done["text"], REASONING_TEXT);
    let answer: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(answer, REASONING_ANSWER);
}

#[test]
fn a_chat_replys_grammar_starts_after_the_thinking_and_a_completions_does_not() {
    use tandem_protocol::messages::GrammarSpec;
    let (_nats, peer, server) = start_with_peer(&PARSER);
    let schema = json!({"type": "object"});
    let format = json!({"response_format": {"type": "json_schema",
                        "json_schema": {"name": "o", "schema": schema}}});
    let response = server.http.post(
        "/v1/chat/completions",
        &chat(SCRIPT_REASONING, format.clone()),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let mut completion = json!({"model": SERVED_NAME, "prompt": "Why?",
                                "max_tokens": SCRIPT_REASONING});
    completion["response_format"] = format["response_format"].clone();
    let response = server.http.post("/v1/completions", &completion);
    assert_eq!(response.status, 200, "{}", response.body);
    let grammars: Vec<Option<GrammarSpec>> = peer
        .jobs()
        .into_iter()
        .map(|job| job.sampling.grammar)
        .collect();
    let json_schema = GrammarSpec::JsonSchema {
        schema: json!({"type": "object"}),
    };
    assert_eq!(
        grammars,
        [
            // The test model's template opens no think block: the reply may.
            Some(json_schema.clone().after_thinking(false)),
            Some(json_schema),
        ]
    );
}
