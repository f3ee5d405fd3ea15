//! The api-server's protocol handling, against a scripted bus peer (see
//! `common/bus_peer.rs`: canned worker answers, no engine): SSE framing and `[DONE]`, the usage
//! chunk, non-streamed responses, logprobs, cancellation on disconnect, and the timeouts.

mod common;

use std::time::{Duration, Instant};

use common::bus_peer::{
    PEER_ID, SCRIPT_ANSWER, SCRIPT_ENDLESS, SCRIPT_ERROR, SCRIPT_SILENT, SCRIPT_STALL,
    SCRIPTED_TEXT, ScriptedBusPeer,
};
use common::{SERVED_NAME, start_api_server, start_with_peer};
use serde_json::{Value, json};
use tandem_test_kit::Nats;

fn chat(max_tokens: u32, extra: Value) -> Value {
    let mut body = json!({"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": max_tokens});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn health_reports_the_live_worker() {
    let (_nats, _peer, server) = start_with_peer(&[]);
    let body = server.http.get("/health").json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["workers"]["both"], 1);
    let metrics = server.http.get("/metrics").body;
    assert!(
        metrics.contains("tandem_live_workers{role=\"both\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tandem_worker_free_kv_blocks{{role=\"both\",worker_id=\"{PEER_ID}\"}} 100"
        )),
        "{metrics}"
    );
}

#[test]
fn streamed_chat_has_openai_framing_usage_and_done() {
    let (_nats, peer, server) = start_with_peer(&[]);
    let stream = server.http.open_stream(
        "/v1/chat/completions",
        &chat(
            SCRIPT_ANSWER,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(stream.status(), 200);
    assert!(
        stream
            .headers()
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream")),
        "{:?}",
        stream.headers()
    );
    let events = stream.collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], SERVED_NAME);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, SCRIPTED_TEXT);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["usage"], Value::Null);
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    let prompt_tokens = peer.jobs()[0].prompt_ids.len() as u64;
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0,
                  "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
    );
    // The job carried the validated request.
    let job = &peer.jobs()[0];
    assert_eq!(job.stop.max_tokens, SCRIPT_ANSWER);
    assert_eq!(job.request_id, id);
    assert!(job.stream_subject.ends_with(&job.request_id));
}

#[test]
fn streamed_chat_without_include_usage_has_no_usage_field() {
    let (_nats, _peer, server) = start_with_peer(&[]);
    let events = server
        .http
        .open_stream(
            "/v1/chat/completions",
            &chat(SCRIPT_ANSWER, json!({"stream": true})),
        )
        .collect();
    assert_eq!(events.last().unwrap(), "[DONE]");
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("usage").is_none(), "{event}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn non_streamed_chat_and_completion_carry_text_usage_and_logprobs() {
    let (_nats, peer, server) = start_with_peer(&[]);
    let response = server.http.post(
        "/v1/chat/completions",
        &chat(SCRIPT_ANSWER, json!({"logprobs": true, "top_logprobs": 2})),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], SCRIPTED_TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["logprob"], -0.25);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(peer.jobs()[0].sampling.logprobs, Some(2));

    let response = server.http.post(
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": SCRIPT_ANSWER, "logprobs": 1}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], SCRIPTED_TEXT);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0,
                  "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
    );
    assert_eq!(
        body["choices"][0]["logprobs"]["text_offset"],
        json!([0, 3, 3])
    );
    assert_eq!(peer.jobs()[1].prompt_ids, vec![5, 6, 7]);
}

#[test]
fn streamed_completion_chunks_are_text_completions() {
    let (_nats, _peer, server) = start_with_peer(&[]);
    let events = server
        .http.open_stream(
            "/v1/completions",
            &json!({"prompt": [1, 2], "max_tokens": SCRIPT_ANSWER, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .collect();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, SCRIPTED_TEXT);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 5);
}

#[test]
fn no_accepted_in_time_is_503_and_cancels_the_job() {
    let (_nats, peer, server) = start_with_peer(&[]);
    let start = Instant::now();
    let response = server.http.post(
        "/v1/chat/completions",
        &chat(SCRIPT_SILENT, json!({"stream": true})),
    );
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(response.json()["error"]["code"], "worker_unavailable");
    let job = &peer.jobs()[0];
    assert!(
        peer.wait_for_cancel(&job.request_id, Duration::from_secs(2)),
        "no cancel published"
    );
}

/// Without migration (a stall would otherwise move the request, here to the same scripted
/// peer, which can only stall again).
#[test]
fn a_stalled_stream_ends_with_an_sse_error_and_a_cancel() {
    let (_nats, peer, server) = start_with_peer(&["--migration-limit", "0"]);
    let start = Instant::now();
    let events = server
        .http
        .open_stream(
            "/v1/chat/completions",
            &chat(SCRIPT_STALL, json!({"stream": true})),
        )
        .collect();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stalled"),
        "{error}"
    );
    let job = &peer.jobs()[0];
    assert!(peer.wait_for_cancel(&job.request_id, Duration::from_secs(2)));

    // Not streamed, the same stall is an HTTP 504.
    let response = server
        .http
        .post("/v1/chat/completions", &chat(SCRIPT_STALL, json!({})));
    assert_eq!(response.status, 504, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "timeout");
}

#[test]
fn a_worker_error_reaches_the_client() {
    let (_nats, _peer, server) = start_with_peer(&[]);
    let response = server
        .http
        .post("/v1/chat/completions", &chat(SCRIPT_ERROR, json!({})));
    assert_eq!(response.status, 500, "{}", response.body);
    assert_eq!(response.json()["error"]["message"], "scripted failure");
    let events = server
        .http
        .open_stream(
            "/v1/chat/completions",
            &chat(SCRIPT_ERROR, json!({"stream": true})),
        )
        .collect();
    assert!(
        events[events.len() - 2].contains("scripted failure"),
        "{events:?}"
    );
}

#[test]
fn a_client_that_disconnects_cancels_its_request() {
    let (_nats, peer, server) = start_with_peer(&[]);
    let mut stream = server.http.open_stream(
        "/v1/chat/completions",
        &chat(SCRIPT_ENDLESS, json!({"stream": true})),
    );
    assert_eq!(stream.status(), 200);
    // Role chunk, then at least one content chunk: the generation is running.
    stream.next_data().expect("role chunk");
    stream.next_data().expect("a content chunk");
    let request_id = peer.jobs()[0].request_id.clone();
    assert!(peer.cancels().is_empty());
    drop(stream);
    assert!(
        peer.wait_for_cancel(&request_id, Duration::from_secs(3)),
        "disconnect did not publish a cancel"
    );
    let metrics = server.http.get("/metrics").body;
    assert!(
        metrics
            .contains("tandem_requests_total{endpoint=\"chat\",outcome=\"client_disconnected\"} 1"),
        "{metrics}"
    );
}

/// `--max-pending-requests 1`: while one streamed request is in flight, the next is answered
/// 429 at once with `Retry-After` and an OpenAI error body (counted as `overloaded`); once
/// the first stream is gone its place is free again.
#[test]
fn past_the_pending_bound_requests_get_429_until_a_place_frees() {
    let nats = Nats::start();
    let _peer = ScriptedBusPeer::start(&nats.url, SERVED_NAME);
    let server = start_api_server(&nats, &["--max-pending-requests", "1"]);
    let start = Instant::now();
    while server.http.get("/health").status != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut held = server.http.open_stream(
        "/v1/chat/completions",
        &chat(SCRIPT_ENDLESS, json!({"stream": true})),
    );
    assert_eq!(held.status(), 200);
    held.next_data().expect("role chunk");

    let refused = server
        .http
        .post("/v1/chat/completions", &chat(SCRIPT_ANSWER, json!({})));
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let body = refused.json();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(
        server
            .http
            .get("/metrics")
            .body
            .contains("tandem_requests_total{endpoint=\"chat\",outcome=\"overloaded\"} 1")
    );

    drop(held);
    let start = Instant::now();
    loop {
        let reply = server
            .http
            .post("/v1/chat/completions", &chat(SCRIPT_ANSWER, json!({})));
        if reply.status == 200 {
            assert_eq!(
                reply.json()["choices"][0]["message"]["content"],
                SCRIPTED_TEXT
            );
            break;
        }
        assert_eq!(reply.status, 429, "{}", reply.body);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the place never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
