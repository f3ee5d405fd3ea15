//! Structured outputs and `logit_bias` end to end, on SmolLM2 with CPU workers: an
//! aggregated deployment (one `both` worker) and a disaggregated one (a context and a decode
//! worker), each a real nats-server, workers and api-server.
//!
//! - tests/python/structured_outputs.py, with the official `openai` client and
//!   langchain-openai: 20 prompts with 20 JSON schemas, every reply parses and validates
//!   (Python `jsonschema`); disaggregated equals aggregated, every one of the 20 handed over
//!   from the context worker (its /metrics: 20 KV transfers, no fallback to a local prefill,
//!   which would give the same text); same seed, same output; `json_object`;
//!   `chat.completions.parse` with a Pydantic model; `with_structured_output`.
//! - `logit_bias`: -100 on the token greedy decoding picks bans it, +100 on another forces it
//!   at every position, on /v1/completions and on chat, aggregated and disaggregated (each
//!   request handed over there).
//! - A schema llguidance cannot compile is a 400 naming `response_format.json_schema.schema`
//!   with llguidance's message; a `response_format` of another type is a 400 naming it.
//! - vLLM's `structured_outputs` (`choice`, `regex`, `json` as an object and as a string,
//!   `json_object`, a Lark `grammar`) on chat and completions, and vLLM's `response_format`
//!   on completions, aggregated and disaggregated; vLLM's removed `guided_*` fields and the
//!   options tandem does not serve are 400s naming them.
//!
//! Needs Python 3 with `openai`, `langchain-openai` and `jsonschema` importable: scripts/test
//! installs them into `target/pylib` and points `TANDEM_TEST_PYTHONPATH` there.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{start_api_server, start_worker, start_worker_as};
use tandem_test_kit::{
    ApiServer, HandOvers, Http, Nats, Proc, bin, clear_tandem_env, model_dir, python,
};

const MODEL: &str = "smollm2-bf16";
/// The JSON-schema requests tests/python/structured_outputs.py sends the disaggregated
/// deployment (its `CASES`).
const SCHEMA_CASES: u64 = 20;

fn check_python_clients() {
    let output = python()
        .args(["-c", "import openai, langchain_openai, jsonschema"])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "`openai`, `langchain-openai` and `jsonschema` must be importable: run scripts/test \
         (it installs them into target/pylib and sets TANDEM_TEST_PYTHONPATH): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One deployment: its nats-server, workers and api-server, stopped on drop.
struct Deployment {
    _nats: Nats,
    api: ApiServer,
    _workers: Vec<Proc>,
    /// A context and a decode worker, rather than one `both` worker.
    disaggregated: bool,
}

impl Deployment {
    fn aggregated() -> Self {
        let nats = Nats::start();
        let api = start_api_server(&nats, &model_dir(MODEL));
        let worker = start_worker(&nats, &model_dir(MODEL), "agg", &[]);
        api.http.wait_for_workers(1, Duration::from_secs(60));
        Deployment {
            _nats: nats,
            api,
            _workers: vec![worker],
            disaggregated: false,
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
            disaggregated: true,
        }
    }

    fn http(&self) -> &Http {
        &self.api.http
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.api.port)
    }

    fn hand_overs(&self) -> HandOvers {
        HandOvers::read(self.http())
    }

    /// Panics unless, since `before`, each of `requests` went from a context worker to the
    /// decode worker over UCX with no fallback (none at all on the aggregated deployment).
    #[track_caller]
    fn assert_handed_over_since(&self, before: &HandOvers, requests: u64, what: &str) {
        let (requests, name) = if self.disaggregated {
            (requests, "disaggregated")
        } else {
            (0, "aggregated")
        };
        self.hand_overs().assert_handed_over_since(
            before,
            requests,
            "ucx",
            &format!("{what} ({name})"),
        );
    }
}

/// `worker generate`'s greedy ids for a plain prompt: (prompt ids, output ids).
fn greedy_ids(prompt: &str, max_tokens: u32) -> (Vec<u64>, Vec<u64>) {
    let output = clear_tandem_env(&mut Command::new(bin("worker")))
        .arg("generate")
        .arg("--model")
        .arg(model_dir(MODEL))
        .args(["--json", "--threads", "1", "--prompt", prompt])
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .expect("worker generate runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let ids = |field: &str| {
        json[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    (ids("prompt_ids"), ids("output_ids"))
}

/// The token strings of a /v1/completions answer with `logprobs`.
fn completion_tokens(http: &Http, body: Value) -> Vec<String> {
    let response = http.post("/v1/completions", &body);
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

fn check_logit_bias(deployment: &Deployment, prompt_ids: &[u64], greedy: &[u64]) {
    let http = deployment.http();
    let before = deployment.hand_overs();
    let body = |bias: Value, temperature: f64| {
        json!({"prompt": prompt_ids, "max_tokens": 3, "temperature": temperature, "seed": 5,
               "logprobs": 0, "logit_bias": bias})
    };
    let free = completion_tokens(http, body(json!({}), 0.0));
    assert_eq!(free.len(), 3, "{free:?}");
    let banned = completion_tokens(http, body(json!({ greedy[0].to_string(): -100 }), 0.0));
    assert_ne!(
        banned[0], free[0],
        "-100 on greedy's first token bans it: {banned:?} vs {free:?}"
    );
    // The token greedy picks second, forced at every position, even when sampling.
    let forced = completion_tokens(http, body(json!({ greedy[1].to_string(): 100 }), 1.0));
    assert_eq!(forced, vec![free[1].clone(); 3], "+100 forces it");

    let chat = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 3,
                "temperature": 0.7, "seed": 3, "logit_bias": { greedy[1].to_string(): 100 }}),
    );
    assert_eq!(chat.status, 200, "{}", chat.body);
    assert_eq!(
        chat.json()["choices"][0]["message"]["content"],
        free[1].repeat(3),
        "chat: +100 forces the token"
    );
    deployment.assert_handed_over_since(&before, 4, "the four logit_bias requests");
}

fn check_refusals(http: &Http) {
    let chat = |format: Value| {
        http.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                    "response_format": format}),
        )
    };
    let bad = chat(json!({"type": "json_schema", "json_schema": {"name": "bad",
        "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}));
    assert_eq!(bad.status, 400, "{}", bad.body);
    let error = &bad.json()["error"];
    assert_eq!(
        error["param"], "response_format.json_schema.schema",
        "{error}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("missing"),
        "llguidance's message names the bad reference: {error}"
    );
    let other = chat(json!({"type": "yaml"}));
    assert_eq!(other.status, 400, "{}", other.body);
    assert_eq!(other.json()["error"]["param"], "response_format.type");
    let bias = http.post(
        "/v1/completions",
        &json!({"prompt": "x", "logit_bias": {"99999999": 1}}),
    );
    assert_eq!(bias.status, 400, "{}", bias.body);
    assert_eq!(bias.json()["error"]["param"], "logit_bias");
}

/// The reply text of a chat (or, with `prompt`, a completion) request with `extra` fields,
/// and its finish reason. Chat requests without `messages` ask `question` (each a prompt of
/// its own, so that no decode worker finds it in its prefix cache instead of pulling it).
fn constrained_text(http: &Http, question: &str, extra: Value) -> (String, String) {
    let completion = extra.get("prompt").is_some();
    let mut request = if completion {
        json!({"max_tokens": 24, "temperature": 0})
    } else {
        json!({"max_tokens": 24, "temperature": 0,
               "messages": [{"role": "user", "content": question}]})
    };
    for (key, value) in extra.as_object().unwrap() {
        request[key] = value.clone();
    }
    let path = if completion {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let reply = http.post(path, &request);
    assert_eq!(reply.status, 200, "{request}: {}", reply.body);
    let choice = &reply.json()["choices"][0];
    let text = if completion {
        &choice["text"]
    } else {
        &choice["message"]["content"]
    };
    (
        text.as_str().unwrap().to_owned(),
        choice["finish_reason"].as_str().unwrap().to_owned(),
    )
}

/// Checks that every `<call>` in `text` goes on with `{"country": "IT"|"FR"}` and `</call>`
/// (the last one may be cut when the token limit ended the reply); how many there are.
fn check_calls(text: &str, finish: &str) -> usize {
    let mut calls = 0;
    for (i, after) in text.split("<call>").enumerate().skip(1) {
        let Some((json, _)) = after.split_once("</call>") else {
            assert_eq!(finish, "length", "a call without its end: {text:?}");
            assert_eq!(i, text.split("<call>").count() - 1, "{text:?}");
            continue;
        };
        let value: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let country = value["country"].as_str().unwrap_or_default();
        assert!(
            ["IT", "FR"].contains(&country) && value.as_object().unwrap().len() == 1,
            "{text:?}"
        );
        calls += 1;
    }
    calls
}

/// vLLM's `structured_outputs`: each kind of constraint holds on chat and on completions, and
/// the fields vLLM removed or tandem does not serve are 400s naming them.
fn check_vllm_structured_outputs(deployment: &Deployment) {
    let http = deployment.http();
    // The choices are one token each: the context worker's first token completes the grammar
    // and ends the request there, with nothing to hand over.
    let (answer, finish) = constrained_text(
        http,
        "We are checking facts about European geography for a school quiz today. Is Paris in France?",
        json!({"structured_outputs": {"choice": ["yes", "no"]}}),
    );
    assert!(answer == "yes" || answer == "no", "{answer:?}");
    assert_eq!(finish, "stop");
    let colours = ["blue", "green", "grey"];
    let (colour, _) = constrained_text(
        http,
        "",
        json!({"prompt": "On a clear summer afternoon, far from the city lights and the clouds, the colour of the sky is", "structured_outputs": {"choice": colours}}),
    );
    assert!(colours.contains(&colour.as_str()), "{colour:?}");

    let before = deployment.hand_overs();

    let (email, finish) = constrained_text(
        http,
        "",
        json!({"messages": [{"role": "user",
                "content": "Alan Turing works at a company called Enigma. Write an email address for Alan Turing at Enigma, in lower case."}],
               "structured_outputs": {"regex": "[a-z]{1,12}@[a-z]{1,12}\\.com"}}),
    );
    let (user, domain) = email.split_once('@').expect("an @");
    let host = domain.strip_suffix(".com").expect("ends in .com");
    for part in [user, host] {
        assert!(
            (1..=12).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_lowercase()),
            "{email:?}"
        );
    }
    assert_eq!(finish, "stop");

    let schema = json!({"type": "object", "properties": {"city": {"type": "string"},
        "country": {"type": "string"}}, "required": ["city", "country"],
        "additionalProperties": false});
    // vLLM takes the schema as an object or as a string holding it.
    for (json, city) in [
        (schema.clone(), "Lyon"),
        (json!(schema.to_string()), "Turin"),
    ] {
        let (text, _) = constrained_text(
            http,
            &format!(
                "We are planning a long train journey across Europe next spring. Where is {city}? Answer with its city and country."
            ),
            json!({"max_tokens": 48, "structured_outputs": {"json": json}}),
        );
        let value: Value = serde_json::from_str(&text).expect("JSON");
        assert!(
            value["city"].is_string() && value["country"].is_string(),
            "{value}"
        );
        assert_eq!(value.as_object().unwrap().len(), 2, "{value}");
    }
    let (object, _) = constrained_text(
        http,
        "",
        json!({"max_tokens": 40, "structured_outputs": {"json_object": true},
               "prompt": "Pets of the house, one JSON object each.\nA cat named Tom as JSON: {\"name\": \"Tom\"}\nA dog named Rex as JSON:"}),
    );
    assert!(
        serde_json::from_str::<Value>(&object).unwrap().is_object(),
        "{object}"
    );
    let (sentence, _) = constrained_text(
        http,
        "We are checking facts about European geography for a school quiz tomorrow. Is Rome in Spain?",
        json!({"structured_outputs": {
            "grammar": "start: \"The answer is \" (\"yes\" | \"no\") \".\""}}),
    );
    assert!(
        ["The answer is yes.", "The answer is no."].contains(&sentence.as_str()),
        "{sentence:?}"
    );
    // vLLM's response_format on completions.
    let (pet, _) = constrained_text(
        http,
        "",
        json!({"max_tokens": 40, "prompt": "Pets of the house, one JSON object each.\nA cat \
               named Tom as JSON: {\"name\": \"Tom\"}\nA bird named Kiwi as JSON:",
               "response_format": {"type": "json_schema", "json_schema": {"name": "pet",
                   "schema": {"type": "object", "properties": {"name": {"type": "string"}},
                              "required": ["name"], "additionalProperties": false}}}}),
    );
    let pet: Value = serde_json::from_str(&pet).expect("JSON");
    assert!(pet["name"].is_string(), "{pet}");
    // vLLM's structural tags: free text, but each "<call>" the reply writes must go on with
    // the structure's JSON (here a key the examples do not use) and "</call>".
    let tag = json!({"type": "structural_tag", "triggers": ["<call>"], "structures": [
        {"begin": "<call>", "end": "</call>", "schema": {"type": "object",
         "properties": {"country": {"type": "string", "enum": ["IT", "FR"]}},
         "required": ["country"], "additionalProperties": false}}]});
    let calls = "Weather lookups, one call each.\nQ: weather in Paris?\nA: <call>{\"city\": \
                 \"Paris\"}</call>\nQ: weather in Lyon?\nA: <call>{\"city\": \"Lyon\"}</call>\n\
                 Q: weather in Rome?\nA:";
    let (text, finish) = constrained_text(
        http,
        "",
        json!({"max_tokens": 40, "prompt": calls, "response_format": tag}),
    );
    assert!(
        check_calls(&text, &finish) >= 1,
        "the reply wrote no call: {text:?}"
    );
    let (text, finish) = constrained_text(
        http,
        "",
        json!({"max_tokens": 40, "prompt": calls,
               "structured_outputs": {"structural_tag": tag.to_string()}}),
    );
    check_calls(&text, &finish);
    deployment.assert_handed_over_since(&before, 8, "the longer structured_outputs requests");

    let chat = |extra: Value| {
        let mut request = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        http.post("/v1/chat/completions", &request)
    };
    for (extra, param, code) in [
        (
            json!({"guided_choice": ["a"]}),
            "guided_choice",
            json!("unsupported_parameter"),
        ),
        (
            json!({"structured_outputs": {}}),
            "structured_outputs",
            Value::Null,
        ),
        (
            json!({"structured_outputs": {"choice": ["a"]},
                   "response_format": {"type": "json_object"}}),
            "structured_outputs",
            Value::Null,
        ),
        (
            json!({"structured_outputs": {"grammar": "root ::= \"a\""}}),
            "structured_outputs.grammar",
            Value::Null,
        ),
        (
            json!({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}),
            "structured_outputs.whitespace_pattern",
            json!("unsupported_parameter"),
        ),
        (
            json!({"structured_outputs": {"regex": "a", "regexp": "b"}}),
            "structured_outputs.regexp",
            json!("unknown_parameter"),
        ),
        (
            json!({"response_format": {"type": "structural_tag", "format": {}}}),
            "response_format.format",
            Value::Null,
        ),
        (
            json!({"structured_outputs": {"structural_tag": "{\"triggers\": [\"<a\"], \
                   \"structures\": [{\"begin\": \"<b>\", \"end\": \"\"}]}"}}),
            "structured_outputs.structural_tag.structures[0].begin",
            Value::Null,
        ),
    ] {
        let reply = chat(extra.clone());
        assert_eq!(reply.status, 400, "{extra}: {}", reply.body);
        let error = &reply.json()["error"];
        assert_eq!(error["param"], param, "{extra}: {error}");
        assert_eq!(error["code"], code, "{extra}: {error}");
    }
}

#[test]
fn structured_outputs_and_logit_bias_aggregated_and_disaggregated() {
    check_python_clients();
    let aggregated = Deployment::aggregated();
    let disaggregated = Deployment::disaggregated();

    check_refusals(aggregated.http());
    let (prompt_ids, greedy) = greedy_ids("The capital of France is", 3);
    check_logit_bias(&aggregated, &prompt_ids, &greedy);
    check_logit_bias(&disaggregated, &prompt_ids, &greedy);
    check_vllm_structured_outputs(&aggregated);
    check_vllm_structured_outputs(&disaggregated);

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/structured_outputs.py");
    let before = disaggregated.hand_overs();
    let output = python()
        .arg(&script)
        .arg(aggregated.base_url())
        .arg(disaggregated.base_url())
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "structured output checks failed:\n{}\n{}\n--- aggregated api-server ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        aggregated.api.proc.output()
    );
    println!("{}", String::from_utf8_lossy(&output.stdout));
    // The texts matched; they would also match if every grammar request had fallen back to
    // a local prefill on the decode worker.
    disaggregated.assert_handed_over_since(
        &before,
        SCHEMA_CASES,
        "the JSON-schema requests compared with the aggregated deployment's",
    );
}
