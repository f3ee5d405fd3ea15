//! Tool calls through the api-server's route, against a scripted bus peer (no engine, see
//! `common/bus_peer.rs`) whose reply is a Hermes call with its markup split across tokens and
//! messages: the non-streamed reply has `tool_calls` and no markup; the stream has OpenAI's
//! deltas (id, type and name first, then the arguments) that add up to the same call, and
//! never markup in `content`; `tool_choice` with a named function puts the grammar on the
//! job. The test model's template ignores tools, so they go in its system prompt (Hermes).

mod common;

use common::bus_peer::{SCRIPT_TOOL_CALL, TOOL_CALL_ARGUMENTS};
use common::{SERVED_NAME, start_with_peer};
use serde_json::{Value, json};
use tandem_protocol::messages::GrammarSpec;

fn request(extra: Value) -> Value {
    let mut body = json!({
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": SCRIPT_TOOL_CALL,
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn a_tool_call_is_returned_whole_and_streamed_in_openai_deltas() {
    let (_nats, peer, server) = start_with_peer(&[]);

    let response = server
        .http
        .post("/v1/chat/completions", &request(json!({})));
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(choice["message"]["content"], "Checking.", "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], TOOL_CALL_ARGUMENTS);
    assert_eq!(choice["message"]["tool_calls"].as_array().unwrap().len(), 1);

    let stream = server
        .http
        .open_stream("/v1/chat/completions", &request(json!({"stream": true})));
    assert_eq!(stream.status(), 200);
    let events = stream.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let events: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut content = String::new();
    let (mut id, mut name, mut arguments) = (None, None, String::new());
    let mut finish = None;
    for event in &events {
        let Some(choice) = event["choices"].get(0) else {
            continue;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str() {
            assert!(!text.contains('<'), "markup in content: {event}");
            content.push_str(text);
        }
        for piece in delta["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(piece["index"], 0, "{event}");
            if let Some(piece_id) = piece["id"].as_str() {
                assert!(id.is_none(), "a second id: {event}");
                assert_eq!(piece["type"], "function", "{event}");
                id = Some(piece_id.to_string());
                name = piece["function"]["name"].as_str().map(str::to_string);
            } else {
                assert!(id.is_some(), "arguments before the id: {event}");
                assert!(piece.get("type").is_none() && piece["function"].get("name").is_none());
            }
            arguments.push_str(piece["function"]["arguments"].as_str().unwrap());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(content, "Checking.");
    assert!(id.unwrap().starts_with("call_"));
    assert_eq!(name.as_deref(), Some("get_weather"));
    assert_eq!(arguments, TOOL_CALL_ARGUMENTS);
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // Auto: no grammar. A named function: the grammar of its call goes on the job.
    assert!(peer.jobs().iter().all(|job| job.sampling.grammar.is_none()));
    let named =
        request(json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
    let response = server.http.post("/v1/chat/completions", &named);
    assert_eq!(response.status, 200, "{}", response.body);
    let job = peer.jobs().pop().expect("a job");
    match &job.sampling.grammar {
        Some(GrammarSpec::Lark { grammar }) => {
            assert!(
                grammar.contains("get_weather") && grammar.contains("%json"),
                "{grammar}"
            )
        }
        other => panic!("{other:?}"),
    }
}
