//! OpenAI's Predicted Outputs (`prediction` on chat completions) on live deployments
//! (nats-server, workers and the api-server as real processes, SmolLM2 on the CPU): the
//! decoding worker verifies draft tokens read from the prediction several at a time. Checked
//! end to end, aggregated and disaggregated (the prediction travels with the decode job):
//! - the answer with a prediction is the answer without one (greedy, and sampled with a
//!   seed), whether the prediction is right, wrong or right for a while;
//! - `usage.completion_tokens_details` reports the draft tokens kept and thrown away: a right
//!   prediction has most of the answer's tokens kept and none thrown away;
//! - the workers' counters (`tandem_worker_spec_decode_*_total`) add up the same;
//! - a malformed prediction is a 400 naming the field at fault.
//!
//! Needs `$TANDEM_TEST_MODELS/smollm2-bf16`, nats-server and the workspace binaries.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{collect_stream, start_api_server, start_worker, start_worker_as};
use tandem_test_kit::prometheus::total;
use tandem_test_kit::{ApiServer, Http, Nats, Proc, model_dir};

const MODEL: &str = "smollm2-bf16";

/// A text the model is asked to copy out: what a prediction is for (an edit of a known text).
const TEXT: &str = "The lighthouse stood on the rocks at the end of the bay. Every night \
                    its keeper climbed the stairs, lit the lamp and watched the ships pass \
                    on their way to the harbour.";

struct Deployment {
    _nats: Nats,
    api: ApiServer,
    _workers: Vec<Proc>,
}

impl Deployment {
    fn aggregated() -> Self {
        let nats = Nats::start();
        let api = start_api_server(&nats, &model_dir(MODEL));
        let worker = start_worker(&nats, &model_dir(MODEL), "w0", &[]);
        api.http.wait_for_workers(1, Duration::from_secs(60));
        Deployment {
            _nats: nats,
            api,
            _workers: vec![worker],
        }
    }

    fn disaggregated() -> Self {
        let nats = Nats::start();
        let api = start_api_server(&nats, &model_dir(MODEL));
        let context = start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
        let decode = start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
        api.http
            .wait_for_role("context", 1, Duration::from_secs(60));
        api.http.wait_for_role("decode", 1, Duration::from_secs(60));
        Deployment {
            _nats: nats,
            api,
            _workers: vec![context, decode],
        }
    }

    fn http(&self) -> &Http {
        &self.api.http
    }
}

/// A chat request asking for `TEXT` back, greedy unless `sampling` says otherwise.
fn copy_request(sampling: Value) -> Value {
    let mut body = json!({
        "messages": [
            {"role": "system", "content": "You copy texts exactly, with nothing before or after."},
            {"role": "user", "content": format!("Copy this text:\n\n{TEXT}")},
        ],
        "max_completion_tokens": 60,
        "temperature": 0,
    });
    for (key, value) in sampling.as_object().into_iter().flatten() {
        body[key] = value.clone();
    }
    body
}

fn with_prediction(mut body: Value, prediction: Value) -> Value {
    body["prediction"] = prediction;
    body
}

/// The answer's text and usage.
fn answer(http: &Http, body: &Value) -> (String, Value) {
    let reply = http.post("/v1/chat/completions", body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    let text = json["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    (text, json["usage"].clone())
}

fn drafts(usage: &Value) -> (u64, u64) {
    let details = &usage["completion_tokens_details"];
    (
        details["accepted_prediction_tokens"].as_u64().unwrap(),
        details["rejected_prediction_tokens"].as_u64().unwrap(),
    )
}

fn worker_drafts(http: &Http) -> (f64, f64) {
    let metrics = http.get("/metrics").body;
    (
        total(&metrics, "tandem_worker_spec_decode_draft_tokens_total"),
        total(&metrics, "tandem_worker_spec_decode_accepted_tokens_total"),
    )
}

/// Waits for the workers' next heartbeats to carry `at_least` draft tokens verified.
fn wait_for_worker_drafts(http: &Http, at_least: f64) -> (f64, f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = worker_drafts(http);
        if counts.0 >= at_least || std::time::Instant::now() > deadline {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything the module doc lists, on one deployment.
fn predictions_change_the_pace_never_the_answer(deployment: &Deployment) {
    let http = deployment.http();
    let (reference, usage) = answer(http, &copy_request(json!({})));
    assert!(reference.len() > 60, "the model copies: {reference:?}");
    assert_eq!(drafts(&usage), (0, 0), "no prediction: {usage}");
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();

    // The answer itself as the prediction, as a string and as text parts.
    let right = json!({"type": "content", "content": reference});
    let (text, usage) = answer(http, &with_prediction(copy_request(json!({})), right));
    assert_eq!(text, reference);
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        completion_tokens
    );
    let (accepted, rejected) = drafts(&usage);
    assert!(
        accepted * 2 > completion_tokens,
        "most tokens come from kept drafts: {usage}"
    );
    assert!(
        rejected <= 9,
        "a right prediction throws little away: {usage}"
    );
    let (head, tail) = reference.split_at(reference.len() / 2);
    let parts = json!({"type": "content", "content": [
        {"type": "text", "text": head}, {"type": "text", "text": tail}]});
    let (text, _) = answer(http, &with_prediction(copy_request(json!({})), parts));
    assert_eq!(text, reference);

    // A wrong prediction, then one right for a while: the same answer.
    let wrong = json!({"type": "content",
                       "content": "Nothing here resembles the answer at all, 12345."});
    let (text, usage) = answer(http, &with_prediction(copy_request(json!({})), wrong));
    assert_eq!(text, reference);
    let (accepted, _) = drafts(&usage);
    assert!(accepted * 4 < completion_tokens, "{usage}");
    let half = format!("{head} and then something else entirely.");
    let (text, usage) = answer(
        http,
        &with_prediction(
            copy_request(json!({})),
            json!({"type": "content", "content": half}),
        ),
    );
    assert_eq!(text, reference);
    assert!(drafts(&usage).0 > 0, "{usage}");

    // Sampled with a seed: the draws are the same with and without drafts.
    let sampled = json!({"temperature": 0.8, "seed": 11});
    let (plain, _) = answer(http, &copy_request(sampled.clone()));
    let (text, usage) = answer(
        http,
        &with_prediction(
            copy_request(sampled.clone()),
            json!({"type": "content", "content": plain}),
        ),
    );
    assert_eq!(text, plain, "sampled with seed 11");
    assert!(drafts(&usage).0 > 0, "{usage}");

    // Streamed: the same text, the usage in the last chunk.
    let mut body = with_prediction(
        copy_request(json!({})),
        json!({"type": "content", "content": reference}),
    );
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut events = Vec::new();
    let (status, _) = http.post_stream("/v1/chat/completions", &body, |event| {
        events.push(event.clone())
    });
    assert_eq!(status, 200);
    assert_eq!(collect_stream(&events).text, reference);
    let usage = &events.last().expect("a usage chunk")["usage"];
    assert!(drafts(usage).0 * 2 > completion_tokens, "{usage}");

    // The workers count what the requests reported, and more (the sampled ones' drafts).
    let (verified, kept) = wait_for_worker_drafts(http, 1.0);
    assert!(
        verified > 0.0 && kept > 0.0 && kept <= verified,
        "{verified} {kept}"
    );

    // Malformed predictions: 400s naming the field.
    for (prediction, param) in [
        (json!("text"), "prediction"),
        (json!({"type": "file", "content": "x"}), "prediction.type"),
        (
            json!({"type": "content", "content": 5}),
            "prediction.content",
        ),
        (
            json!({"type": "content", "content": [{"type": "image_url", "image_url": {}}]}),
            "prediction.content[0].type",
        ),
        (
            json!({"type": "content", "content": "x", "strict": true}),
            "prediction.strict",
        ),
    ] {
        let reply = http.post(
            "/v1/chat/completions",
            &with_prediction(copy_request(json!({})), prediction.clone()),
        );
        assert_eq!(reply.status, 400, "{prediction}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], param, "{prediction}");
    }
}

#[test]
fn predictions_on_an_aggregated_worker() {
    predictions_change_the_pace_never_the_answer(&Deployment::aggregated());
}

#[test]
fn predictions_travel_with_the_decode_job_of_a_disaggregated_request() {
    predictions_change_the_pace_never_the_answer(&Deployment::disaggregated());
}
