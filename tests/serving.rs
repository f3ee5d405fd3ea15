//! Serving end to end with real processes: nats-server, `worker --role both` and the
//! api-server, on SmolLM2 (bf16, imported from the default model's GGUF).
//!
//! What these show: the API's temperature-0 output is `worker generate`'s; 64
//! concurrent streams each get exactly the tokens they get alone, also when every client
//! names its request with the same id (vLLM's `request_id`, or a gateway's `X-Request-Id`,
//! which the response's `id` and header carry); workers started by hand
//! join and take traffic, and SIGTERM drains one without failing a request; with migration
//! off, a killed worker fails its requests quickly (never a hang) and traffic moves to the
//! others (with it on, they migrate: tests/faults.rs).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SERVED_NAME, Streamed, collect_stream, start_api_server};
use tandem_test_kit::{ApiServer, Nats, bin, model_dir};

const MODEL: &str = "smollm2-bf16";

fn worker_generate(args: &[&str]) -> Value {
    let output = Command::new(bin("worker"))
        .arg("generate")
        .arg("--model")
        .arg(model_dir(MODEL))
        .args(args)
        .arg("--json")
        .output()
        .expect("worker generate runs");
    assert!(
        output.status.success(),
        "worker generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("worker generate --json prints JSON")
}

#[test]
fn temperature_zero_output_equals_worker_generate() {
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &[]);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));

    for prompt in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
    ] {
        let reference = worker_generate(&["--chat", "--prompt", prompt, "--max-tokens", "32"]);
        let expected_text = reference["text"].as_str().unwrap();
        let request = json!({
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32,
            "temperature": 0,
        });
        let reply = http.post("/v1/chat/completions", &request);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let body = reply.json();
        assert_eq!(
            body["choices"][0]["message"]["content"], expected_text,
            "{prompt}"
        );
        assert_eq!(
            body["usage"]["prompt_tokens"],
            reference["prompt_ids"].as_array().unwrap().len(),
            "{prompt}"
        );
        assert_eq!(
            body["usage"]["completion_tokens"],
            reference["output_ids"].as_array().unwrap().len(),
            "{prompt}"
        );

        let mut streamed_request = request.clone();
        streamed_request["stream"] = json!(true);
        let (status, events) = http.post_stream("/v1/chat/completions", &streamed_request, |_| {});
        assert_eq!(status, 200);
        assert_eq!(collect_stream(&events).text, expected_text, "{prompt}");
    }

    // A plain completion equals `worker generate` without the chat template.
    let prompt = "The three primary colors are";
    let reference = worker_generate(&["--prompt", prompt, "--max-tokens", "24"]);
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["choices"][0]["text"], reference["text"]);
}

/// Prompt `i` of the concurrency test: different lengths, half greedy, half seeded sampling.
fn concurrent_request(i: usize) -> Value {
    let topics = [
        "the moon",
        "bread",
        "a lighthouse keeper who collects old maps of the northern coast",
        "rain",
        "why the sky is blue, in two sentences",
        "a cat",
        "prime numbers",
        "the history of the bicycle and how it changed the lives of people in cities",
    ];
    let topic = topics[i % topics.len()];
    let mut request = json!({
        "messages": [{"role": "user", "content": format!("Tell me about {topic}. ({i})")}],
        "max_tokens": 12 + (i % 5) * 3,
        "stream": true,
        "logprobs": true,
    });
    if i.is_multiple_of(2) {
        request["temperature"] = json!(0);
    } else {
        request["temperature"] = json!(0.9);
        request["top_p"] = json!(0.95);
        request["seed"] = json!(1000 + i);
    }
    request
}

#[test]
fn concurrent_streams_each_get_the_tokens_they_get_alone() {
    const REQUESTS: usize = 64;
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &[]);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));

    let run = |i: usize| -> Streamed {
        let (status, events) =
            http.post_stream("/v1/chat/completions", &concurrent_request(i), |_| {});
        assert_eq!(status, 200, "request {i}");
        collect_stream(&events)
    };
    let alone: Vec<Streamed> = (0..REQUESTS).map(run).collect();
    // Together, every client names its request the same, half by the body's field and half
    // by a gateway's header: the ids are the reply's, never the jobs' on the bus.
    let gateway = http.clone().with_header("X-Request-Id", "gw-same");
    let named = |i: usize| -> Streamed {
        let mut request = concurrent_request(i);
        let (client, expected) = if i.is_multiple_of(2) {
            request["request_id"] = json!("same");
            (http, "same")
        } else {
            (&gateway, "gw-same")
        };
        let mut stream = client.open_stream("/v1/chat/completions", &request);
        assert_eq!(stream.status(), 200, "request {i}");
        assert_eq!(stream.header("x-request-id"), Some(expected));
        let mut events = Vec::new();
        while let Some(data) = stream.next_data() {
            if data == "[DONE]" {
                break;
            }
            let event: Value = serde_json::from_str(&data).unwrap();
            assert_eq!(event["id"], format!("chatcmpl-{expected}"), "{event}");
            events.push(event);
        }
        collect_stream(&events)
    };
    let together: Vec<Streamed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..REQUESTS)
            .map(|i| scope.spawn(move || named(i)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect()
    });
    for (i, (alone, together)) in alone.iter().zip(&together).enumerate() {
        assert!(
            !alone.tokens.is_empty() && alone.finish_reason.is_some(),
            "request {i}: {alone:?}"
        );
        assert_eq!(
            alone, together,
            "request {i} differs when batched with others"
        );
    }
}

#[test]
fn hand_started_workers_join_take_traffic_and_drain_on_sigterm() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    let mut first = support::start_worker(&nats, &model_dir(MODEL), "hand-a", &[]);
    let second = support::start_worker(&nats, &model_dir(MODEL), "hand-b", &[]);
    http.wait_for_workers(2, Duration::from_secs(30));

    // Eight long requests in flight over both workers; SIGTERM the first worker once every
    // stream has produced tokens.
    const REQUESTS: usize = 8;
    const TOKENS: u64 = 48;
    let started = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Streamed> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let http = &http;
                let started = &started;
                scope.spawn(move || {
                    let request = json!({
                        "messages": [{"role": "user", "content": format!("Count slowly from {i}.")}],
                        "max_tokens": TOKENS,
                        "temperature": 0,
                        "ignore_eos": true,
                        "stream": true,
                        "stream_options": {"include_usage": true},
                    });
                    let mut first_token = true;
                    let mut usage = Value::Null;
                    let (status, events) = http.post_stream("/v1/chat/completions", &request, |event| {
                        if first_token && event["choices"][0]["delta"]["content"].is_string() {
                            first_token = false;
                            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        if !event["usage"].is_null() {
                            usage = event["usage"].clone();
                        }
                    });
                    assert_eq!(status, 200);
                    assert_eq!(usage["completion_tokens"], TOKENS, "request {i}");
                    collect_stream(&events)
                })
            })
            .collect();
        let start = Instant::now();
        while started.load(std::sync::atomic::Ordering::SeqCst) < REQUESTS {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "streams did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            first.count_lines("job queued") > 0 && second.count_lines("job queued") > 0,
            "both workers take traffic: a took {}, b took {}",
            first.count_lines("job queued"),
            second.count_lines("job queued")
        );
        first.signal(libc::SIGTERM);
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect()
    });
    for (i, result) in results.iter().enumerate() {
        assert_eq!(
            result.finish_reason.as_deref(),
            Some("length"),
            "request {i}"
        );
    }
    let status = first.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status}"
    );
    assert!(first.output().contains("left the deployment"));

    // It has left: the api-server routes everything to the other one.
    http.wait_for_workers(1, Duration::from_secs(10));
    let taken_before = second.count_lines("job queued");
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(second.count_lines("job queued"), taken_before + 1);
}

/// With migration off (`--migration-limit 0`) a killed worker's request fails, quickly; with
/// it on (the default) it would move to the survivor (tests/faults.rs).
#[test]
fn a_killed_worker_fails_its_requests_quickly_without_migration_and_traffic_moves_on() {
    let nats = Nats::start();
    let api = ApiServer::start(
        &nats,
        &model_dir(MODEL),
        SERVED_NAME,
        &["--worker-timeout-ms", "1500", "--migration-limit", "0"],
    );
    let http = &api.http;
    let mut doomed = support::start_worker(&nats, &model_dir(MODEL), "doomed", &[]);
    let survivor = support::start_worker(&nats, &model_dir(MODEL), "survivor", &[]);
    http.wait_for_workers(2, Duration::from_secs(30));

    // Two long streams: least-loaded routing puts one on each worker.
    let outcomes: Vec<(Streamed, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let http = &http;
                scope.spawn(move || {
                    let request = json!({
                        "messages": [{"role": "user", "content": format!("Story {i}")}],
                        "max_tokens": 200,
                        "temperature": 0,
                        "ignore_eos": true,
                        "stream": true,
                    });
                    let mut events = Vec::new();
                    let start = Instant::now();
                    let (_, all) = http
                        .post_stream("/v1/chat/completions", &request, |e| events.push(e.clone()));
                    let elapsed = start.elapsed();
                    let error = all.iter().find(|e| e.get("error").is_some()).cloned();
                    let mut streamed = collect_stream(
                        &all.iter()
                            .filter(|e| e.get("error").is_none())
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    if let Some(error) = error {
                        streamed.finish_reason = Some(format!("error: {}", error["error"]));
                    }
                    (streamed, elapsed)
                })
            })
            .collect();
        let start = Instant::now();
        while doomed.count_lines("job queued") == 0 || survivor.count_lines("job queued") == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "requests did not reach both workers"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        doomed.signal(libc::SIGKILL);
        handles
            .into_iter()
            .map(|h| h.join().expect("a request thread panicked"))
            .collect()
    });
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(s, _)| s.finish_reason.as_deref() != Some("length"))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "exactly the killed worker's request fails: {outcomes:?}"
    );
    let (streamed, elapsed) = failed[0];
    assert!(
        streamed
            .finish_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("error")),
        "{streamed:?}"
    );
    assert!(
        *elapsed < Duration::from_secs(20),
        "the failed request ended in {elapsed:?}"
    );
    let _ = doomed.wait_exit(Duration::from_secs(5));

    http.wait_for_workers(1, Duration::from_secs(10));
    for _ in 0..3 {
        let reply = http.post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}
