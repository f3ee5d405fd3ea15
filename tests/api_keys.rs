//! API keys end to end, with real processes: `tandem serve` with `api_keys` in its
//! config starts an api-server that refuses /v1 requests without a valid key (401, an
//! OpenAI-shaped body, `WWW-Authenticate: Bearer`) and serves those with one, streaming and
//! not, on chat and completions; /health and /metrics stay open; the key appears in no
//! process's command line and in no log line.
//!
//! Needs `$TANDEM_TEST_MODELS/tiny` and the workspace binaries.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::tandem;
use tandem_test_kit::{
    Http, Proc, assert_no_command_line_shows, descendants, free_port, model_dir, temp_dir,
};

const KEY: &str = "sk-tandem-test-4f1c9a";
const OTHER_KEY: &str = "sk-team-b-77d0";

/// The official `openai` client (from `TANDEM_TEST_PYTHONPATH`, which scripts/test fills):
/// with the key (from `OPENAI_API_KEY`, as apps pass it) a completion streams; with a wrong
/// one the client raises its `AuthenticationError`.
fn openai_client_with_and_without_the_key(base: &str) {
    let script = r#"
import openai, os, sys
client = openai.OpenAI(base_url=sys.argv[1] + "/v1")
text = "".join(c.choices[0].text for c in client.completions.create(
    model="keyed", prompt="Hi", max_tokens=2, stream=True))
print("streamed", repr(text))
try:
    openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-wrong").models.list()
    sys.exit("a wrong key was served")
except openai.AuthenticationError as e:
    print("refused", e.status_code)
"#;
    let python = std::env::var("TANDEM_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    if let Some(path) = std::env::var_os("TANDEM_TEST_PYTHONPATH") {
        command.env("PYTHONPATH", path);
    }
    let output = command
        .env("OPENAI_API_KEY", KEY)
        .args(["-c", script, base])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("refused 401"),
        "the openai client (needs the `openai` package: scripts/test installs it into \
         target/pylib and sets TANDEM_TEST_PYTHONPATH):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn api_keys_guard_v1_and_never_show() {
    let port = free_port();
    let dir = temp_dir("api-keys");
    let key_file = dir.join("keys");
    std::fs::write(&key_file, format!("# team b\n{OTHER_KEY}\n")).unwrap();
    let config = dir.join("deploy.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {model}\nport: {port}\nserved_model_name: keyed\n\
             api_keys: [\"{KEY}\"]\napi_key_file: {file}\n\
             context_servers: {{ num_instances: 0 }}\n\
             generation_servers: {{ num_instances: 1, device: cpu }}\n",
            model = model_dir("tiny").display(),
            file = key_file.display(),
        ),
    )
    .unwrap();
    let mut command = tandem();
    command
        .args(["serve", "--shutdown-grace-s", "20", "-c"])
        .arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line("tandem: serving", Duration::from_secs(120));
    let base = format!("http://127.0.0.1:{port}");

    let completion = json!({"model": "keyed", "prompt": "Hi", "max_tokens": 2});
    let chat = json!({"model": "keyed", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 2});
    let tokenize = json!({"prompt": "Hi"});
    // No key, a wrong key, a key of the wrong scheme: 401 on every /v1 route and the
    // tokenizer's.
    for client in [
        Http::new(&base),
        Http::new(&base).with_bearer("sk-wrong"),
        Http::new(&base).with_bearer(&KEY[..KEY.len() - 1]),
    ] {
        for (path, body) in [
            ("/v1/completions", &completion),
            ("/v1/chat/completions", &chat),
            ("/tokenize", &tokenize),
        ] {
            let reply = client.post(path, body);
            assert_eq!(reply.status, 401, "{path}: {}", reply.body);
            let error = &reply.json()["error"];
            assert_eq!(error["code"], "invalid_api_key", "{}", reply.body);
            assert_eq!(error["type"], "invalid_request_error", "{}", reply.body);
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            assert!(
                !reply.body.contains("sk-"),
                "the body echoes a key: {}",
                reply.body
            );
        }
        assert_eq!(client.get("/v1/models").status, 401);
        // Probes and scrapes stay open.
        assert_eq!(client.get("/health").status, 200);
        assert_eq!(client.get("/metrics").status, 200);
    }

    // Either key (the config's, the file's) is served, streaming and not.
    for key in [KEY, OTHER_KEY] {
        let client = Http::new(&base).with_bearer(key);
        for (path, body) in [
            ("/v1/completions", &completion),
            ("/v1/chat/completions", &chat),
        ] {
            let reply = client.post(path, body);
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            let mut streaming = body.clone();
            streaming["stream"] = json!(true);
            let (status, events) = client.post_stream(path, &streaming, |_| {});
            assert_eq!(status, 200, "{path} streaming");
            assert!(!events.is_empty(), "{path} streamed nothing");
        }
        assert_eq!(client.get("/v1/models").status, 200);
    }
    openai_client_with_and_without_the_key(&base);
    let metrics = Http::new(&base).get("/metrics").body;
    assert!(
        metrics.contains("tandem_unauthorized_requests_total 13"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("unauthorized"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The key is in no command line of the deployment, nor in any log line.
    let mut processes = descendants(launcher.pid());
    processes.push(launcher.pid());
    assert!(
        processes.len() >= 4,
        "launcher, nats, worker, api-server: {processes:?}"
    );
    assert_no_command_line_shows(launcher.pid(), KEY);
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let output = launcher.output();
    assert!(
        !output.contains(KEY) && !output.contains(OTHER_KEY),
        "a log line shows a key"
    );
    assert!(output.contains("API keys required on /v1"), "{output}");
}
