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

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{SERVED_NAME, start_api_server};
use tandem_test_kit::{ApiServer, Http, Nats, model_dir, temp_dir};

const MODEL: &str = "smollm2-bf16";

/// `dir` as a view of the test model: every file linked, but for a generation_config.json
/// with `set` merged into the model's own.
fn model_with_generation_config(dir: &Path, set: Value) {
    let source = model_dir(MODEL);
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "generation_config.json" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let own = std::fs::read(source.join("generation_config.json")).unwrap();
    let mut generation: Value = serde_json::from_slice(&own).unwrap();
    for (key, value) in set.as_object().unwrap() {
        generation[key] = value.clone();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation).unwrap(),
    )
    .unwrap();
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
