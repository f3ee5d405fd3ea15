//! Tool calling against a live deployment (real nats-server, `worker --role both`, api-server)
//! serving SmolLM2, from Python clients as users run them (tests/python/tool_calls.py):
//! - the official `openai` client and langchain-openai's `bind_tools`: a tool round trip (the
//!   call, then an answer to its result: text that carries the result, `finish_reason`
//!   "stop"), the streamed call reassembling to the non-streamed one, `tool_choice: "none"`,
//!   and the 400s that name the field;
//! - `tool_choice: "required"` and a named function: every reply a valid call of a declared
//!   tool (its arguments validated with `jsonschema`), streamed or not. This one needs the
//!   workers to enforce `SamplingSpec.grammar` (llguidance).
//!
//! - function tools on `/v1/responses` (tests/python/responses_tools.py): `function_call` output
//!   items, streamed as typed events, the round trip through `function_call_output`, required
//!   and named choices, the 400s; langchain-openai's `bind_tools` through the Responses API;
//!   and an OpenAI Agents SDK agent whose function tool the SDK runs.
//!
//! The scripts' checks raise (never `assert`, which `python -O` drops) and it exits non-zero
//! on the first that fails, which fails the test.
//!
//! Needs Python 3 with `openai`, `openai-agents`, `langchain-openai` and `jsonschema`
//! importable: scripts/test installs them into `target/pylib` and points
//! `TANDEM_TEST_PYTHONPATH` there.

mod support;

use std::time::Duration;

use support::{start_api_server, start_worker};
use tandem_test_kit::{Nats, model_dir, python};

const MODEL: &str = "smollm2-bf16";

fn check_importable(modules: &str) {
    let output = python()
        .args(["-c", &format!("import {modules}")])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "Python packages {modules} are not importable: run scripts/test (it installs them into \
         target/pylib and sets TANDEM_TEST_PYTHONPATH): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs tests/python/SCRIPT with `args` against a fresh deployment.
fn run_script(script: &str, args: &[&str]) {
    let nats = Nats::start();
    let _worker = start_worker(&nats, &model_dir(MODEL), "tools-w0", &[]);
    let server = start_api_server(&nats, &model_dir(MODEL));
    server.http.wait_for_workers(1, Duration::from_secs(30));
    support::run_python_script(script, &format!("{}/v1", server.http.base), args);
}

#[test]
fn tool_round_trips_with_openai_and_langchain() {
    check_importable("openai, langchain_openai");
    run_script("tool_calls.py", &["auto"]);
}

/// Needs grammar-constrained decoding on the workers (`SamplingSpec.grammar`).
#[test]
fn required_and_named_tool_choice_always_call_a_declared_tool() {
    check_importable("openai, jsonschema");
    run_script("tool_calls.py", &["required"]);
}

#[test]
fn function_tools_on_the_responses_api_with_openai_and_the_agents_sdk() {
    check_importable("openai, agents, langchain_openai, jsonschema");
    run_script("responses_tools.py", &[]);
}
