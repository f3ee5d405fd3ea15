//! The api-server binary against a real nats-server with no worker: health, models, metrics,
//! and the error paths a client meets first.

mod common;

use std::time::{Duration, Instant};

use common::{SERVED_NAME, start_api_server};
use serde_json::json;
use tandem_test_kit::Nats;

fn assert_openai_error(body: &serde_json::Value, kind: &str) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

#[test]
fn health_is_503_with_a_reason_while_no_worker_is_known() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    let response = server.http.get("/health");
    assert_eq!(response.status, 503, "{}", response.body);
    let body = response.json();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"].as_str().unwrap().contains("no live worker"),
        "{body}"
    );
}

#[test]
fn requests_without_workers_get_503_quickly() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
        ),
        ("/v1/completions", json!({"prompt": "Hi", "max_tokens": 4})),
        ("/v1/responses", json!({"input": "Hi"})),
        ("/v1/responses", json!({"input": "Hi", "stream": true})),
    ] {
        let start = Instant::now();
        let response = server.http.post(path, &body);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{path} took {:?}",
            start.elapsed()
        );
        assert_eq!(response.status, 503, "{path}: {}", response.body);
        let body = response.json();
        assert_openai_error(&body, "server_error");
        assert_eq!(body["error"]["code"], "no_live_worker");
    }
}

#[test]
fn malformed_json_and_wrong_types_get_400_with_an_openai_body() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    for (path, body) in [
        (
            "/v1/chat/completions",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}",
        ),
        ("/v1/chat/completions", "not json"),
        ("/v1/chat/completions", "{\"messages\": \"Hi\"}"),
        (
            "/v1/chat/completions",
            "{\"messages\": [], \"temperature\": \"hot\"}",
        ),
        ("/v1/completions", "{\"prompt\": {\"a\": 1}}"),
        ("/v1/responses", "{\"input\": 5}"),
        ("/v1/responses", "[\"Hi\"]"),
        ("/v1/responses", "not json"),
    ] {
        let response = server.http.post_text(path, body);
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        assert!(
            response
                .header("content-type")
                .unwrap_or("")
                .starts_with("application/json")
        );
        assert_openai_error(&response.json(), "invalid_request_error");
    }
}

#[test]
fn invalid_requests_get_400_naming_the_field() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    let response = server.http.post(
        "/v1/chat/completions",
        &json!({"model": SERVED_NAME, "messages": []}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    let body = response.json();
    assert_openai_error(&body, "invalid_request_error");
    assert_eq!(body["error"]["param"], "messages");

    let response = server.http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}),
    );
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["param"], "temperature");

    // A stop string too long for a bus message is the client's error, not the bus's (it was
    // answered 503 "cannot reach its workers").
    let response = server.http.post(
        "/v1/completions",
        &json!({"prompt": "Hi", "stop": "x".repeat(1_100_000)}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.json()["error"]["param"], "stop");

    let response = server.http.post(
        "/v1/chat/completions",
        &json!({"model": "other", "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(response.status, 404, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "model_not_found");

    // The tiny test model's context is 1024 tokens.
    let response = server.http.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 1022}),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "context_length_exceeded");
}

#[test]
fn models_lists_the_served_name() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    let response = server.http.get("/v1/models");
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], SERVED_NAME);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], 1024);
}

/// Parses the Prometheus text format: every sample line is `name{labels} value` with a
/// numeric value, and every family has HELP and TYPE lines.
#[test]
fn metrics_parse_as_prometheus_text() {
    let nats = Nats::start();
    let server = start_api_server(&nats, &[]);
    // One failed request so the request counter has a sample.
    server.http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    let response = server.http.get("/metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let mut typed = std::collections::HashSet::new();
    let mut samples = 0;
    for line in response.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            typed.insert(parts.next().unwrap().to_string());
            assert!(
                matches!(parts.next(), Some("counter" | "gauge" | "histogram")),
                "{line}"
            );
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (name_and_labels, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {line:?}"));
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = name_and_labels.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "sample without TYPE: {line}");
            samples += 1;
        }
    }
    assert!(samples > 0);
    for family in [
        "tandem_requests_total",
        "tandem_time_to_first_token_seconds",
        "tandem_inter_token_latency_seconds",
        "tandem_prompt_tokens_total",
        "tandem_completion_tokens_total",
        "tandem_live_workers",
    ] {
        assert!(
            typed.contains(family),
            "{family} missing:\n{}",
            response.body
        );
    }
    assert!(
        response
            .body
            .contains("tandem_requests_total{endpoint=\"chat\",outcome=\"unavailable\"} 1"),
        "{}",
        response.body
    );
}
