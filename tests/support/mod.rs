//! The end-to-end tests' own deployment defaults, on top of the test kit (`tandem-test-kit`,
//! which starts and reaps the processes): the served model name, workers and an api-server
//! set up as these tests run them, the reading of a streamed OpenAI answer, and the Python
//! clients' scripts under tests/python.

#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tandem_test_kit::{ApiServer, Nats, Proc, WorkerSpec, bin};

pub const SERVED_NAME: &str = "e2e-model";

/// Runs tests/python/SCRIPT against the OpenAI API at `base_url` (`http://HOST:PORT/v1`)
/// with `args`, failing with its output unless it succeeds. The scripts need `openai`,
/// `openai-agents`, `langchain-openai` and `jsonschema` importable: scripts/test installs them
/// into `target/pylib` and points `TANDEM_TEST_PYTHONPATH` there.
pub fn run_python_script(script: &str, base_url: &str, args: &[&str]) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = tandem_test_kit::python()
        .arg(&path)
        .arg(base_url)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{script} {args:?} failed (scripts/test installs the Python clients into target/pylib \
         and sets TANDEM_TEST_PYTHONPATH):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `tandem` launcher, logging at info. It finds `worker` and `api-server` beside itself:
/// this makes sure they are built.
pub fn tandem() -> Command {
    let mut command = Command::new(bin("tandem"));
    bin("worker");
    bin("api-server");
    command.env("RUST_LOG", "info");
    command
}

/// `worker --role both` on the CPU, joined to `nats`; returns once it has joined.
pub fn start_worker(nats: &Nats, model: &Path, worker_id: &str, extra: &[&str]) -> Proc {
    start_worker_as(nats, model, "both", worker_id, extra)
}

/// `worker --role ROLE` on the CPU, joined to `nats`; returns once it has joined.
pub fn start_worker_as(
    nats: &Nats,
    model: &Path,
    role: &str,
    worker_id: &str,
    extra: &[&str],
) -> Proc {
    let spec = WorkerSpec {
        role,
        worker_id,
        served_model_name: SERVED_NAME,
        threads: 2,
        heartbeat_ms: 250,
        extra,
    };
    tandem_test_kit::start_worker(&nats.url, model, &spec)
}

/// The api-server on a free port, with a short worker timeout so a dead worker is noticed
/// quickly.
pub fn start_api_server(nats: &Nats, model: &Path) -> ApiServer {
    ApiServer::start(nats, model, SERVED_NAME, &["--worker-timeout-ms", "1500"])
}

/// The text of a streamed chat completion or completion (its deltas joined), the finish
/// reason, and the logprob token strings when logprobs were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    pub text: String,
    pub finish_reason: Option<String>,
    pub tokens: Vec<String>,
}

pub fn collect_stream(events: &[Value]) -> Streamed {
    let mut out = Streamed {
        text: String::new(),
        finish_reason: None,
        tokens: Vec::new(),
    };
    for event in events {
        assert!(event.get("error").is_none(), "stream error: {event}");
        for choice in event["choices"].as_array().into_iter().flatten() {
            if let Some(text) = choice["delta"]["content"].as_str() {
                out.text.push_str(text);
            }
            if let Some(text) = choice["text"].as_str() {
                out.text.push_str(text);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                out.finish_reason = Some(reason.to_owned());
            }
            for entry in choice["logprobs"]["content"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.tokens
                    .push(entry["token"].as_str().unwrap_or("").to_owned());
            }
        }
    }
    out
}
