//! `echo`, prompt logprobs, `max_tokens: 0`, `best_of` > `n` and batched prompts on
//! `/v1/completions` end to end
//!: nats-server, CPU workers with SmolLM2 prefilling in chunks of 32 tokens
//! (`--max-num-batched-tokens 32`), and the api-server as processes, aggregated and
//! disaggregated (where prompt logprobs are computed by the generation worker's own prefill).
//!
//! - `echo` returns the prompt followed by the completion; with `logprobs` the prompt's tokens
//!   come first in `logprobs`, the first with `null`;
//! - the logprob the engine reports for a generated token equals (within 1e-3) that token's
//!   prompt logprob once prompt and completion are echoed as a prompt (prompt logprobs checked
//!   against the generation path);
//! - lm-evaluation-harness's loglikelihood request (`prompt: [[ids]]`, `echo`, `max_tokens: 1`,
//!   `logprobs: 1`, `temperature: 0`, `seed`) and its `max_tokens: 0` form;
//! - a prompt of several prefill chunks gets exactly one logprob per position, equal to those
//!   of a prefix of it (causality, across chunk boundaries);
//! - streamed echo: the prompt in the first chunk, the same text and logprobs as not streamed;
//! - `best_of: 3, n: 1` returns the candidate with the highest mean token logprob among the
//!   three the same seeded request gives with `n: 3`, and usage counts all three;
//! - a batch of prompts: choices numbered prompt by prompt, each the text of its prompt alone,
//!   usage counting each prompt once, streamed alike, lm-eval's batched loglikelihood;
//! - the 400s: `max_tokens: 0` without echo, `best_of` streamed or below `n`;
//! - disaggregated, the requests without prompt logprobs that those checks compare with
//!   prompt-logprob requests (prefilled by the decode worker) are handed over from the
//!   context worker (/metrics: a KV transfer each, no fallback);
//! - the official `openai` client (tests/python/openai_echo.py; needs the `openai` package:
//!   scripts/test installs it and sets `TANDEM_TEST_PYTHONPATH`).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::{HandOvers, Http, Nats, model_dir};

const MODEL: &str = "smollm2-bf16";
/// The workers' prefill chunk (`--max-num-batched-tokens`).
const CHUNK: &str = "32";

fn completion(http: &Http, request: &Value) -> Value {
    let reply = http.post("/v1/completions", request);
    assert_eq!(reply.status, 200, "{request}: {}", reply.body);
    reply.json()
}

/// `token_logprobs` as options, `null` as `None`.
fn token_logprobs(choice: &Value) -> Vec<Option<f64>> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(Value::as_f64)
        .collect()
}

fn tokens(choice: &Value) -> Vec<String> {
    choice["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

fn usage(body: &Value) -> (u64, u64) {
    (
        body["usage"]["prompt_tokens"].as_u64().unwrap(),
        body["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// Token ids of a prompt of `len` tokens (ordinary vocabulary entries, no special tokens).
fn id_prompt(len: usize, salt: u64) -> Vec<u64> {
    (0..len as u64)
        .map(|i| 300 + (i * 37 + salt * 101) % 9000)
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

/// The shape of an echoed choice with logprobs: prompt tokens then completion tokens, the
/// first logprob and alternatives `null`, every other a logprob with `top` alternatives,
/// offsets that never go back and put the completion after the prompt's text.
fn check_echoed(
    choice: &Value,
    prompt_text: &str,
    prompt_tokens: usize,
    generated: usize,
    top: usize,
) {
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(prompt_text), "{choice}");
    let logprobs = token_logprobs(choice);
    assert_eq!(logprobs.len(), prompt_tokens + generated, "{choice}");
    assert_eq!(logprobs[0], None, "the first prompt token has no logprob");
    assert!(choice["logprobs"]["top_logprobs"][0].is_null(), "{choice}");
    for (i, logprob) in logprobs.iter().enumerate().skip(1) {
        let logprob = logprob.unwrap_or_else(|| panic!("position {i} has no logprob: {choice}"));
        assert!(logprob <= 0.0, "{choice}");
        let alternatives = choice["logprobs"]["top_logprobs"][i].as_object().unwrap();
        assert_eq!(alternatives.len(), top, "position {i}: {choice}");
    }
    let offsets: Vec<u64> = choice["logprobs"]["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), logprobs.len());
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    if generated > 0 {
        assert_eq!(offsets[prompt_tokens], prompt_text.chars().count() as u64);
    }
}

fn echo_works(http: &Http) {
    let prompt = "The capital of France is";

    // Echo without logprobs: the prompt, then the completion.
    let plain = completion(
        http,
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
    );
    let echoed = completion(
        http,
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true}),
    );
    let completion_text = plain["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("{prompt}{completion_text}")
    );
    assert!(echoed["choices"][0]["logprobs"].is_null());
    assert_eq!(usage(&echoed), usage(&plain));

    // With logprobs: the prompt's tokens first.
    let request = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true,
        "logprobs": 2});
    let body = completion(http, &request);
    let (prompt_tokens, generated) = usage(&body);
    let choice = &body["choices"][0];
    check_echoed(
        choice,
        prompt,
        prompt_tokens as usize,
        generated as usize,
        2,
    );
    assert_eq!(
        choice["text"].as_str().unwrap(),
        format!("{prompt}{completion_text}")
    );

    // A generated token's logprob equals its prompt logprob once prompt + completion are
    // echoed as a prompt (both the same row of logits: decode step against prefill chunk).
    let generated_logprobs = token_logprobs(choice)[prompt_tokens as usize..].to_vec();
    let all_tokens = tokens(choice);
    let full_text = choice["text"].as_str().unwrap().to_owned();
    let rescored = completion(
        http,
        &json!({"prompt": full_text, "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    let rescored_choice = &rescored["choices"][0];
    // The completion's text tokenizes back into the same tokens as far as BPE splits it the
    // same way (it may merge "\n" "\n" into "\n\n"): those positions line up.
    let rescored_tokens = tokens(rescored_choice);
    let same = all_tokens
        .iter()
        .zip(&rescored_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        same >= prompt_tokens as usize + 2,
        "prompt + completion tokenize differently: {all_tokens:?} vs {rescored_tokens:?}"
    );
    let rescored_logprobs = token_logprobs(rescored_choice);
    for (i, expected) in generated_logprobs.iter().enumerate() {
        let position = prompt_tokens as usize + i;
        if position >= same {
            break;
        }
        let (got, expected) = (rescored_logprobs[position].unwrap(), expected.unwrap());
        assert!(
            close(got, expected),
            "position {position}: prompt logprob {got}, generated logprob {expected}"
        );
    }
    // And the prompt's own positions agree with the first request's.
    for (a, b) in token_logprobs(choice)[1..prompt_tokens as usize]
        .iter()
        .zip(&rescored_logprobs[1..])
    {
        assert!(close(a.unwrap(), b.unwrap()), "{a:?} vs {b:?}");
    }
    assert_eq!(rescored_choice["finish_reason"], "length");
    assert_eq!(usage(&rescored).1, 0, "max_tokens 0 generates nothing");

    // lm-evaluation-harness's loglikelihood request (local-completions, tokenized prompts).
    let ids = id_prompt(9, 1);
    let lm_eval = completion(
        http,
        &json!({"model": SERVED_NAME, "prompt": [ids], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": true}),
    );
    let choice = &lm_eval["choices"][0];
    assert_eq!(usage(&lm_eval), (9, 1));
    let prompt_text: String = tokens(choice)[..9].concat();
    check_echoed(choice, &prompt_text, 9, 1, 1);
    // What lm-eval reads: the continuation's logprobs `[ctxlen:-1]` and whether each is the
    // greedy token (its logprob the best of its alternatives).
    let logprobs = token_logprobs(choice);
    for i in 4..9 {
        let best = choice["logprobs"]["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(logprobs[i].unwrap() <= best + 1e-6);
    }
    // Its max_tokens 0 form: the same prompt logprobs, nothing generated.
    let zero = completion(
        http,
        &json!({"prompt": [ids], "temperature": 0, "max_tokens": 0, "logprobs": 1,
            "echo": true}),
    );
    let zero_choice = &zero["choices"][0];
    assert_eq!(usage(&zero), (9, 0));
    assert_eq!(zero_choice["finish_reason"], "length");
    assert_eq!(zero_choice["text"].as_str().unwrap(), prompt_text);
    assert_eq!(token_logprobs(zero_choice), logprobs[..9].to_vec());
    check_echoed(zero_choice, &prompt_text, 9, 0, 1);

    // max_tokens 0 with echo alone: the prompt's text, no logprobs.
    let bare = completion(
        http,
        &json!({"prompt": prompt, "max_tokens": 0, "echo": true}),
    );
    assert_eq!(bare["choices"][0]["text"], prompt);
    assert!(bare["choices"][0]["logprobs"].is_null());
    assert_eq!(bare["choices"][0]["finish_reason"], "length");
    assert_eq!(usage(&bare), (prompt_tokens, 0));

    // A prompt of several prefill chunks: one logprob per position, and the positions of a
    // prefix (fewer chunks, other boundaries) score the same.
    let long = id_prompt(100, 2);
    let body = completion(
        http,
        &json!({"prompt": long, "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    let long_logprobs = token_logprobs(&body["choices"][0]);
    assert_eq!(long_logprobs.len(), 100);
    assert_eq!(long_logprobs[0], None);
    assert!(long_logprobs[1..].iter().all(Option::is_some));
    let prefix = completion(
        http,
        &json!({"prompt": long[..45].to_vec(), "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    let prefix_logprobs = token_logprobs(&prefix["choices"][0]);
    assert_eq!(prefix_logprobs.len(), 45);
    for position in 1..45 {
        let (a, b) = (
            long_logprobs[position].unwrap(),
            prefix_logprobs[position].unwrap(),
        );
        assert!(
            close(a, b),
            "position {position}: {a} in 100 tokens, {b} in 45"
        );
    }

    // Streamed: the prompt (and its logprobs) in the first chunk, the same text and logprobs
    // as the answer that is not streamed.
    let mut streamed_request = request.clone();
    streamed_request["stream"] = json!(true);
    let (status, events) = http.post_stream("/v1/completions", &streamed_request, |_| {});
    assert_eq!(status, 200);
    let chunks: Vec<&Value> = events
        .iter()
        .flat_map(|e| {
            assert!(e.get("error").is_none(), "{e}");
            e["choices"].as_array().into_iter().flatten()
        })
        .collect();
    assert!(
        chunks[0]["text"].as_str().unwrap().starts_with(prompt),
        "the first chunk echoes the prompt: {}",
        chunks[0]
    );
    assert!(tokens(chunks[0]).len() > prompt_tokens as usize);
    let text: String = chunks.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(text, body_text(&body_of(http, &request)));
    let streamed_logprobs: Vec<Option<f64>> = chunks
        .iter()
        .filter(|c| !c["logprobs"].is_null())
        .flat_map(|c| token_logprobs(c))
        .collect();
    assert_eq!(
        streamed_logprobs,
        token_logprobs(&body_of(http, &request)["choices"][0])
    );
    assert_eq!(
        chunks
            .iter()
            .filter(|c| c["finish_reason"].is_string())
            .count(),
        1
    );
    // Streamed with max_tokens 0: one chunk, the prompt and the finish reason.
    let (status, events) = http.post_stream(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1,
            "stream": true}),
        |_| {},
    );
    assert_eq!(status, 200);
    let chunks: Vec<&Value> = events
        .iter()
        .flat_map(|e| e["choices"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(chunks.len(), 1, "{events:?}");
    assert_eq!(chunks[0]["text"], prompt);
    assert_eq!(chunks[0]["finish_reason"], "length");
    assert_eq!(token_logprobs(chunks[0]).len(), prompt_tokens as usize);

    // Echo with n = 2: each choice echoes the prompt and its logprobs.
    let two = completion(
        http,
        &json!({"prompt": prompt, "max_tokens": 3, "n": 2, "seed": 5, "temperature": 0.9,
            "echo": true, "logprobs": 1}),
    );
    for choice in two["choices"].as_array().unwrap() {
        let generated = token_logprobs(choice).len() - prompt_tokens as usize;
        check_echoed(choice, prompt, prompt_tokens as usize, generated, 1);
    }

    // The 400s.
    for (body, param) in [
        (json!({"prompt": prompt, "max_tokens": 0}), "max_tokens"),
        (
            json!({"prompt": prompt, "best_of": 2, "stream": true}),
            "best_of",
        ),
        (json!({"prompt": prompt, "n": 3, "best_of": 2}), "best_of"),
    ] {
        let reply = http.post("/v1/completions", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], param, "{body}");
    }
}

fn body_of(http: &Http, request: &Value) -> Value {
    completion(http, request)
}

fn body_text(body: &Value) -> String {
    body["choices"][0]["text"].as_str().unwrap().to_owned()
}

/// `best_of: 3, n: 1` returns, of the three candidates the same seeded request gives with
/// `n: 3`, the one with the highest mean token logprob, and counts all three in its usage.
fn best_of_works(http: &Http) {
    let request = |n: u32, best_of: Option<u32>| {
        let mut request = json!({"prompt": "Once upon a time", "max_tokens": 8,
            "temperature": 1.0, "seed": 11, "n": n});
        if let Some(best_of) = best_of {
            request["best_of"] = json!(best_of);
        } else {
            request["logprobs"] = json!(0);
        }
        request
    };
    let three = completion(http, &request(3, None));
    let candidates: Vec<(String, f64)> = three["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|choice| {
            let logprobs: Vec<f64> = token_logprobs(choice).into_iter().flatten().collect();
            let mean = logprobs.iter().sum::<f64>() / logprobs.len() as f64;
            (choice["text"].as_str().unwrap().to_owned(), mean)
        })
        .collect();
    assert!(
        candidates[0].0 != candidates[1].0 || candidates[1].0 != candidates[2].0,
        "{candidates:?}"
    );
    let best = candidates.iter().fold(
        &candidates[0],
        |best, c| if c.1 > best.1 { c } else { best },
    );
    let chosen = completion(http, &request(1, Some(3)));
    let choices = chosen["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(
        choices[0]["text"].as_str().unwrap(),
        best.0,
        "{candidates:?}"
    );
    assert!(
        choices[0]["logprobs"].is_null(),
        "logprobs were not asked for"
    );
    assert_eq!(
        usage(&chosen),
        usage(&three),
        "usage counts every candidate"
    );
}

/// A batch of prompts (`prompt` as a list): its choices numbered prompt by prompt, each
/// greedy choice the text of its prompt sent alone, the usage the sum of theirs (each prompt
/// once); streamed, the same texts by index and the same usage; lm-evaluation-harness's
/// loglikelihood request with `batch_size` 2 (`prompt: [[ids], [ids]]`), each prompt's logprobs
/// those of it alone; `best_of` keeping each prompt's best.
fn batch_works(http: &Http) {
    let texts = ["The capital of France is", "One, two, three,"];
    let alone: Vec<Value> = texts
        .iter()
        .map(|prompt| {
            completion(
                http,
                &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
            )
        })
        .collect();
    let batch = completion(
        http,
        &json!({"prompt": texts, "n": 2, "max_tokens": 6, "temperature": 0}),
    );
    let choices = batch["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{batch}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i, "{batch}");
        assert_eq!(
            choice["text"],
            alone[i / 2]["choices"][0]["text"],
            "choice {i}"
        );
    }
    let (prompt_tokens, completion_tokens) = alone
        .iter()
        .map(usage)
        .fold((0, 0), |(p, c), (p1, c1)| (p + p1, c + 2 * c1));
    assert_eq!(usage(&batch), (prompt_tokens, completion_tokens));

    // Streamed: each index's text, and the usage at the end.
    let mut streamed = vec![String::new(); 4];
    let (status, events) = http.post_stream(
        "/v1/completions",
        &json!({"prompt": texts, "n": 2, "max_tokens": 6, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
        |_| {},
    );
    assert_eq!(status, 200);
    for event in &events {
        for choice in event["choices"].as_array().unwrap() {
            streamed[choice["index"].as_u64().unwrap() as usize]
                .push_str(choice["text"].as_str().unwrap());
        }
    }
    let texts_whole: Vec<&str> = choices
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, texts_whole);
    let last = events.last().unwrap();
    assert_eq!(usage(last), usage(&batch), "{last}");

    // lm-evaluation-harness with batch_size 2.
    let prompts = [id_prompt(9, 1), id_prompt(14, 2)];
    let loglikelihood = |prompt: Value| {
        json!({"prompt": prompt, "echo": true, "max_tokens": 1, "logprobs": 1,
               "temperature": 0, "seed": 1234})
    };
    let both = completion(http, &loglikelihood(json!(prompts)));
    for (i, prompt) in prompts.iter().enumerate() {
        let one = completion(http, &loglikelihood(json!([prompt])));
        let (a, b) = (&both["choices"][i], &one["choices"][0]);
        assert_eq!(tokens(a), tokens(b), "prompt {i}");
        for (x, y) in token_logprobs(a).iter().zip(token_logprobs(b)) {
            assert!(
                x.zip(y).is_none_or(|(x, y)| close(x, y)) && x.is_some() == y.is_some(),
                "prompt {i}: {x:?} against {y:?}"
            );
        }
    }

    // best_of per prompt: each prompt's best of two, usage counting all four candidates.
    let best = completion(
        http,
        &json!({"prompt": texts, "best_of": 2, "max_tokens": 4, "temperature": 1.0,
                "seed": 5}),
    );
    assert_eq!(best["choices"].as_array().unwrap().len(), 2, "{best}");
    assert_eq!(usage(&best).0, prompt_tokens);
}

/// tests/python/openai_echo.py against the api-server at `base`.
fn openai_client_echo(base: &str) {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_echo.py");
    let output = tandem_test_kit::python()
        .arg(&script)
        .arg(format!("{base}/v1"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "openai client checks of echo failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn echo_and_best_of_on_an_aggregated_deployment() {
    let nats = Nats::start();
    let extra = ["--max-num-batched-tokens", CHUNK, "--max-num-seqs", "8"];
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w0", &extra);
    let api = start_api_server(&nats, &model_dir(MODEL));
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    echo_works(http);
    best_of_works(http);
    batch_works(http);
    openai_client_echo(&http.base);
}

#[test]
fn echo_on_a_disaggregated_deployment() {
    let nats = Nats::start();
    let extra = ["--max-num-batched-tokens", CHUNK, "--max-num-seqs", "8"];
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &extra);
    let _decode = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &extra);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    // Of echo_works' requests, the plain completion and the one with echo alone go through
    // the context worker; those with prompt logprobs (and `max_tokens: 0`, which asks for
    // them) are prefilled by the generation worker (the context worker hands over K/V, not
    // logprobs), and `n` > 1 too.
    let before = HandOvers::read(http);
    echo_works(http);
    HandOvers::read(http).assert_handed_over_since(
        &before,
        2,
        "ucx",
        "echo checks: the plain and the echo-alone completions",
    );
    let before = HandOvers::read(http);
    completion(
        http,
        &json!({"prompt": "Hello there", "max_tokens": 2, "echo": true, "logprobs": 1}),
    );
    let local = HandOvers::read(http);
    local.assert_handed_over_since(&before, 0, "ucx", "prompt logprobs, prefilled locally");
    completion(
        http,
        &json!({"prompt": "Hello there", "max_tokens": 2, "echo": true}),
    );
    HandOvers::read(http).assert_handed_over_since(
        &local,
        1,
        "ucx",
        "echo alone, disaggregated as usual",
    );
}
