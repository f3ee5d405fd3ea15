//! The model's sampling defaults end to end: nats-server, a CPU worker with SmolLM2 and the
//! api-server as processes, over a copy of the model directory whose `generation_config.json`
//! sets temperature 0.
//!
//! - chat completions and completions that send no temperature are greedy: the same text
//!   whatever their seeds, equal to the request that sends temperature 0;
//! - a request's own temperature wins over the model's (temperature 1.5 with a seed gives
//!   another text than greedy decoding: 24 tokens sampled at 1.5 from a 49k-token vocabulary);
//! - the Responses API echoes the temperature the request ran with, the model's;
//! - a second api-server on the same bus with `--generation-config none` ignores the model's
//!   file: its requests without a temperature sample at OpenAI's 1 (seeds give other texts
//!   than greedy decoding), and its Responses API echoes 1;
//! - an out-of-range default stops the api-server at startup, naming the file and the key.
//!
//! And vLLM's `min_p` and `min_tokens` on a disaggregated deployment (a context worker samples
//! each request's first token, a decode worker the rest): tokens less likely than `min_p`
//! times the top one never drawn; no stop token or string ending a completion before
//! `min_tokens`, on either worker. Then vLLM's output options there: the stop string kept
//! (`include_stop_str_in_output`), tokens named by id in logprobs
//! (`return_tokens_as_token_ids`), only `allowed_token_ids` drawn, a special token's text
//! written with `skip_special_tokens: false`, `truncate_prompt_tokens`, and `prompt_logprobs`
//! (the logprobs echo gives, with ranks and alternatives), and `continuous_usage_stats`; and
//! `bad_words`, a word's ban on the context worker and a phrase's on the decode worker.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::{ApiServer, HandOvers, Http, Nats, model_dir, temp_dir};

const MODEL: &str = "smollm2-bf16";

/// `dir` as a view of the test model with `set` merged into its generation_config.json.
fn model_with_generation_config(dir: &Path, set: Value) {
    tandem_test_kit::model_with_edited_json(
        &model_dir(MODEL),
        dir,
        "generation_config.json",
        |generation| {
            for (key, value) in set.as_object().unwrap() {
                generation[key] = value.clone();
            }
        },
    );
}

fn chat_text(http: &Http, extra: Value) -> String {
    let mut request = json!({
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Write one sentence about a lighthouse."}],
        "max_tokens": 24,
    });
    for (key, value) in extra.as_object().unwrap() {
        request[key] = value.clone();
    }
    let reply = http.post("/v1/chat/completions", &request);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn requests_without_a_temperature_take_the_models() {
    let model = temp_dir("greedy-by-default").join("model");
    model_with_generation_config(&model, json!({"temperature": 0.0, "do_sample": false}));
    let nats = Nats::start();
    let _worker = support::start_worker(&nats, &model, "w0", &[]);
    let api = start_api_server(&nats, &model);
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));

    let greedy = chat_text(http, json!({"temperature": 0}));
    assert!(!greedy.is_empty());
    for seed in [1, 2, 3] {
        assert_eq!(
            chat_text(http, json!({"seed": seed})),
            greedy,
            "seed {seed}: no temperature sent, the model's 0 applies"
        );
    }
    let hot = chat_text(http, json!({"temperature": 1.5, "seed": 1}));
    assert_ne!(hot, greedy, "the request's temperature wins");

    let completion = |extra: Value| {
        let mut request =
            json!({"model": SERVED_NAME, "prompt": "The lighthouse", "max_tokens": 12});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = http.post("/v1/completions", &request);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        completion(json!({"seed": 7})),
        completion(json!({"temperature": 0}))
    );

    let reply = http.post(
        "/v1/responses",
        &json!({"model": SERVED_NAME, "input": "Hi", "max_output_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["temperature"], json!(0.0), "{body}");

    // The same model and worker behind an api-server told to ignore the model's defaults.
    let openai_defaults = ApiServer::start(
        &nats,
        &model,
        SERVED_NAME,
        &["--worker-timeout-ms", "1500", "--generation-config", "none"],
    );
    let plain = &openai_defaults.http;
    plain.wait_for_workers(1, Duration::from_secs(30));
    assert_eq!(
        chat_text(plain, json!({"temperature": 0})),
        greedy,
        "same worker, same greedy text"
    );
    let sampled: Vec<String> = [1, 2, 3]
        .into_iter()
        .map(|seed| chat_text(plain, json!({"seed": seed})))
        .collect();
    assert!(
        sampled.iter().any(|text| *text != greedy),
        "no temperature sent and the model's ignored: OpenAI's 1 samples ({sampled:?})"
    );
    let reply = plain.post(
        "/v1/responses",
        &json!({"model": SERVED_NAME, "input": "Hi", "max_output_tokens": 4}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["temperature"], json!(1.0), "{}", reply.body);
}

#[test]
fn an_out_of_range_default_stops_the_api_server_naming_it() {
    let model = temp_dir("bad-defaults").join("model");
    model_with_generation_config(&model, json!({"temperature": 0.7, "top_p": 1.5}));
    let output = std::process::Command::new(tandem_test_kit::bin("api-server"))
        .arg("--model")
        .arg(&model)
        .args(["--nats", "nats://127.0.0.1:1", "--port", "0"])
        .output()
        .expect("api-server runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("generation_config.json"), "{stderr}");
    assert!(stderr.contains("top_p 1.5"), "{stderr}");
}

/// The `choices[0]` of a completion, and its usage's `completion_tokens`.
fn completion_choice(http: &Http, request: Value) -> (Value, u64) {
    let reply = http.post("/v1/completions", &request);
    assert_eq!(reply.status, 200, "{request}: {}", reply.body);
    let body = reply.json();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    (body["choices"][0].clone(), tokens)
}

#[test]
fn min_p_and_min_tokens_on_a_disaggregated_deployment() {
    let nats = Nats::start();
    let model = model_dir(MODEL);
    let api = start_api_server(&nats, &model);
    let _context = support::start_worker_as(&nats, &model, "context", "ctx", &[]);
    let _decode = support::start_worker_as(&nats, &model, "decode", "dec", &[]);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    // A greedy chat answer that ends on its own (the model's end of sequence), then the same
    // question with min_tokens past that end: the answer goes on from where it ended.
    let chat = |extra: Value| {
        let mut request = json!({"model": SERVED_NAME, "temperature": 0, "max_tokens": 96,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = http.post("/v1/chat/completions", &request);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    };
    let natural = chat(json!({}));
    assert_eq!(natural["choices"][0]["finish_reason"], "stop", "{natural}");
    let ended_at = natural["usage"]["completion_tokens"].as_u64().unwrap();
    let answer = natural["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let before = HandOvers::read(http);
    let longer = chat(json!({"min_tokens": ended_at + 8}));
    HandOvers::read(http).assert_handed_over_since(&before, 1, "ucx", "the chat with min_tokens");
    let more = longer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        longer["usage"]["completion_tokens"].as_u64().unwrap() >= ended_at + 8,
        "{longer}"
    );
    assert!(
        more.starts_with(answer) && more.len() > answer.len(),
        "{answer:?} then {more:?}"
    );

    // The first token, sampled by the context worker, held back too: a completion asked to
    // stop at its own first greedy token ends at once without min_tokens, and goes on with it.
    let prompt = "One, two, three,";
    let greedy = |extra: Value| {
        let mut request =
            json!({"model": SERVED_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        completion_choice(http, request)
    };
    let (plain, _) = greedy(json!({}));
    let text = plain["text"].as_str().unwrap();
    let ids = |text: &str| -> Vec<u64> {
        let counted = http.post(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        );
        serde_json::from_value(counted.json()["tokens"].clone()).unwrap()
    };
    let first = ids(&format!("{prompt}{text}"))[ids(prompt).len()];
    let (stopped, tokens) = greedy(json!({"stop_token_ids": [first]}));
    assert_eq!(
        (stopped["text"].as_str(), tokens),
        (Some(""), 1),
        "{stopped}"
    );
    let before = HandOvers::read(http);
    let (held, tokens) = greedy(json!({"stop_token_ids": [first], "min_tokens": 4}));
    HandOvers::read(http).assert_handed_over_since(&before, 1, "ucx", "a first token held");
    assert!(tokens >= 4, "{held}");
    assert_ne!(held["text"], "", "{held}");

    // Stop strings are looked for after the first min_tokens tokens only.
    assert!(text.contains(','), "{text:?}");
    let (cut, _) = greedy(json!({"stop": ","}));
    let (later, _) = greedy(json!({"stop": ",", "min_tokens": 3}));
    let (cut, later) = (
        cut["text"].as_str().unwrap(),
        later["text"].as_str().unwrap(),
    );
    assert_eq!(cut, &text[..text.find(',').unwrap()]);
    assert!(
        later.len() > cut.len() && later.contains(',') && text.starts_with(later),
        "{cut:?} and {later:?} of {text:?}"
    );

    // min_p: every token drawn at temperature 1 is at least min_p times as likely as the
    // top one (the reported logprobs are the untruncated distribution's); without it, some
    // are not.
    let min_p: f64 = 0.2;
    let below_min_p = |extra: Value| {
        let mut request = json!({"model": SERVED_NAME, "prompt": "Once upon a time",
            "max_tokens": 32, "temperature": 1.0, "logprobs": 1});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let (choice, _) = completion_choice(http, request);
        let drawn = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        let best = choice["logprobs"]["top_logprobs"].as_array().unwrap();
        drawn
            .iter()
            .zip(best)
            .filter(|(drawn, best)| {
                let top = best.as_object().unwrap().values().next().unwrap();
                drawn.as_f64().unwrap() < top.as_f64().unwrap() + min_p.ln() - 1e-3
            })
            .count()
    };
    let mut unconstrained = 0;
    for seed in 1..=4 {
        assert_eq!(
            below_min_p(json!({"seed": seed, "min_p": min_p})),
            0,
            "seed {seed}"
        );
        unconstrained += below_min_p(json!({"seed": seed}));
    }
    assert!(unconstrained > 0, "without min_p some draws fall below it");

    // vLLM's output options. The stop string kept at the end of the text:
    let (kept, _) = greedy(json!({"stop": ",", "include_stop_str_in_output": true}));
    assert_eq!(kept["text"], format!("{cut},"), "{kept}");
    // Logprobs naming tokens by id, which allowed_token_ids then limits: greedy decoding
    // among three tokens of a text unlike the greedy one's.
    let named = |extra: Value| -> Vec<u64> {
        let mut request = json!({"logprobs": 2, "return_tokens_as_token_ids": true});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let (choice, _) = greedy(request);
        let names = choice["logprobs"]["tokens"].as_array().unwrap();
        for alternatives in choice["logprobs"]["top_logprobs"].as_array().unwrap() {
            for name in alternatives.as_object().unwrap().keys() {
                assert!(name.starts_with("token_id:"), "{choice}");
            }
        }
        names
            .iter()
            .map(|name| name.as_str().unwrap()["token_id:".len()..].parse().unwrap())
            .collect()
    };
    let greedy_ids = named(json!({}));
    assert_eq!(
        greedy_ids,
        ids(&format!("{prompt}{text}"))[ids(prompt).len()..]
    );
    let allowed = ids(" red green blue");
    let limited = named(json!({"allowed_token_ids": allowed}));
    assert_eq!(limited.len(), 8);
    assert!(limited.iter().all(|id| allowed.contains(id)), "{limited:?}");
    assert!(greedy_ids.iter().any(|id| !allowed.contains(id)));
    // vLLM's bad_words: no word's tokens (as the word tokenizes alone and after a space)
    // among the drawn ones, the last token banned only where the others were just drawn. A
    // one-word ban changes the first token, which the context worker draws; a phrase's
    // changes a later one, which the decode worker draws, and what came before stays.
    let sequences = |word: &str| [ids(word), ids(&format!(" {word}"))];
    let holds = |drawn: &[u64], sequence: &[u64]| {
        drawn
            .windows(sequence.len())
            .any(|window| window == sequence)
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let word = words[0].trim_matches(|c: char| !c.is_alphanumeric());
    assert!(
        sequences(word).iter().any(|s| s[..] == greedy_ids[..1]),
        "{word:?} is the greedy text's first token: {text:?}"
    );
    let phrase = format!("{} {}", words[0], words[1]);
    let before = HandOvers::read(http);
    for (banned, kept) in [(word.to_string(), 0), (phrase, 1)] {
        let drawn = named(json!({"bad_words": [banned]}));
        assert_eq!(drawn.len(), 8);
        assert!(
            sequences(&banned).iter().any(|s| holds(&greedy_ids, s)),
            "{banned:?} is in the greedy tokens {greedy_ids:?}"
        );
        for sequence in sequences(&banned) {
            assert!(!holds(&drawn, &sequence), "{banned:?} in {drawn:?}");
        }
        assert_ne!(drawn, greedy_ids, "{banned:?}");
        assert_eq!(drawn[..kept], greedy_ids[..kept], "{banned:?}");
    }
    HandOvers::read(http).assert_handed_over_since(&before, 2, "ucx", "requests with bad_words");
    // Bans that leave no allowed token are the request's error, a 400 naming `bad_words`
    // (not a worker's failure, which would move the request to another worker): on the
    // context worker's first token (only " four" allowed and banned), and on the decode
    // worker's second (" four" and "," allowed, "four," and "four four" banned after it).
    assert_eq!(
        ids(&format!(" {word} {word}")),
        [greedy_ids[0], greedy_ids[0]]
    );
    let migrations = |http: &Http| {
        let metrics = http.get("/metrics").body;
        tandem_test_kit::prometheus::total(&metrics, "tandem_request_migrations_total")
    };
    let migrated = migrations(http);
    for (allowed, banned) in [
        (vec![greedy_ids[0]], vec![word.to_string()]),
        (
            greedy_ids[..2].to_vec(),
            vec![words[0].to_string(), format!("{word} {word}")],
        ),
    ] {
        let reply = http.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                    "allowed_token_ids": allowed, "bad_words": banned}),
        );
        assert_eq!(reply.status, 400, "{banned:?}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["param"], "bad_words", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("rules out every token"),
            "{error}"
        );
    }
    assert_eq!(
        migrations(http),
        migrated,
        "nothing moved to another worker"
    );
    // A special token's text, written only when asked: `<|im_start|>` forced by logit_bias.
    let special = ids("<|im_start|>");
    assert_eq!(special.len(), 1, "one special token");
    let forced = |skip: bool| {
        greedy(
            json!({"max_tokens": 1, "logit_bias": {special[0].to_string(): 100},
                      "skip_special_tokens": skip}),
        )
        .0["text"]
            .clone()
    };
    assert_eq!(forced(true), "");
    assert_eq!(forced(false), "<|im_start|>");
    // Only the prompt's last tokens.
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 2, "truncate_prompt_tokens": 3}),
    );
    assert_eq!(reply.json()["usage"]["prompt_tokens"], 3, "{}", reply.body);
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 2, "truncate_prompt_tokens": 10}),
    );
    assert_eq!(reply.json()["usage"]["prompt_tokens"], 10, "{}", reply.body);

    // vLLM's prompt_logprobs: each prompt token's logprob (as echo's logprobs give it), rank
    // and alternatives, keyed by id; on chat at the response's top level.
    let reply = http.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let shown = reply.json()["choices"][0]["prompt_logprobs"].clone();
    let prompt_ids: Vec<u64> = serde_json::from_value(
        http.post("/tokenize", &json!({"prompt": prompt})).json()["tokens"].clone(),
    )
    .unwrap();
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), prompt_ids.len());
    assert!(shown[0].is_null());
    let echoed = http
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2}),
        )
        .json();
    let echoed = echoed["choices"][0]["logprobs"]["token_logprobs"].clone();
    for (position, (entry, id)) in shown.iter().zip(&prompt_ids).enumerate().skip(1) {
        let entry = entry.as_object().unwrap();
        let own = &entry[&id.to_string()];
        assert!(own["rank"].as_u64().unwrap() >= 1, "{own}");
        let logprob = own["logprob"].as_f64().unwrap();
        assert!(
            (logprob - echoed[position].as_f64().unwrap()).abs() < 1e-4,
            "position {position}: {own} against echo's {}",
            echoed[position]
        );
        assert!((1..=3).contains(&entry.len()), "{entry:?}");
        let ranks: Vec<u64> = entry
            .values()
            .map(|v| v["rank"].as_u64().unwrap())
            .collect();
        assert!(ranks.contains(&1) && ranks.contains(&2), "{entry:?}");
    }
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1,
                "prompt_logprobs": 0}),
    );
    let body = reply.json();
    let shown = body["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        shown.len() as u64,
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(
        shown[1..]
            .iter()
            .all(|entry| entry.as_object().unwrap().len() == 1)
    );
    assert!(
        body["choices"][0].get("prompt_logprobs").is_none(),
        "{body}"
    );

    // vLLM's continuous_usage_stats: every streamed chunk carries the usage so far, its
    // completion tokens counting up to the final usage.
    for (path, request) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hello"}]}),
        ),
        ("/v1/completions", json!({"prompt": prompt})),
    ] {
        let mut request = request;
        for (key, value) in json!({"max_tokens": 6, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}})
        .as_object()
        .unwrap()
        {
            request[key] = value.clone();
        }
        let streamed = http.post(path, &request);
        assert_eq!(streamed.status, 200, "{}", streamed.body);
        let chunks: Vec<Value> = streamed
            .body
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let counts: Vec<u64> = chunks
            .iter()
            .map(|chunk| {
                chunk["usage"]["completion_tokens"]
                    .as_u64()
                    .expect("a usage")
            })
            .collect();
        let last = chunks.last().unwrap();
        assert!(last["choices"].as_array().unwrap().is_empty(), "{last}");
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{path}: {counts:?}"
        );
        assert_eq!(*counts.last().unwrap(), 6, "{path}: {counts:?}");
        let prompt_tokens = last["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            chunks
                .iter()
                .all(|chunk| chunk["usage"]["prompt_tokens"] == prompt_tokens),
            "{path}"
        );
    }

    for (body, param) in [
        (
            json!({"prompt": "x", "prompt_logprobs": 21}),
            "prompt_logprobs",
        ),
        (
            json!({"prompt": "x", "prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
        ),
        (
            json!({"prompt": "x", "prompt_logprobs": 1, "echo": true}),
            "prompt_logprobs",
        ),
        (
            json!({"prompt": "x", "allowed_token_ids": []}),
            "allowed_token_ids",
        ),
        (
            json!({"prompt": "x", "truncate_prompt_tokens": 0}),
            "truncate_prompt_tokens",
        ),
        (
            json!({"prompt": "x", "spaces_between_special_tokens": false}),
            "spaces_between_special_tokens",
        ),
        (json!({"prompt": "x", "min_p": 2}), "min_p"),
        (json!({"prompt": "x", "min_tokens": -2}), "min_tokens"),
        (
            json!({"prompt": "x", "max_tokens": 4, "min_tokens": 5}),
            "min_tokens",
        ),
    ] {
        let reply = http.post("/v1/completions", &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], param, "{body}");
    }
}
