//! The official `openai` Python client against `tandem serve` on the default model (SmolLM2,
//! prepared by scripts/test-models), unchanged: streaming and non-streamed chat, usage,
//! logprobs, /v1/completions, and the typed errors it raises for bad input
//! (tests/python/openai_conformance.py). Then SIGTERM to `tandem` leaves no process behind.
//!
//! Needs Python 3 with the `openai` package importable: scripts/test installs it into
//! `target/pylib` and points `TANDEM_TEST_PYTHONPATH` there.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tandem_test_kit::{
    Http, Proc, assert_all_gone, bin, descendants, free_port, model_dir, python,
};

fn check_openai_importable() {
    let output = python()
        .args(["-c", "import openai; print(openai.__version__)"])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the `openai` Python package is not importable: run scripts/test (it installs it into \
         target/pylib and sets TANDEM_TEST_PYTHONPATH): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn openai_client_works_unchanged_against_tandem_serve() {
    check_openai_importable();
    let port = free_port();
    let mut command = Command::new(bin("tandem"));
    command
        .arg("serve")
        .arg("--model")
        .arg(model_dir("smollm2-bf16"))
        .args(["--port", &port.to_string()]);
    let mut tandem = Proc::spawn("tandem", command);
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = tandem.try_wait() {
            panic!("tandem serve exited ({status}):\n{}", tandem.output());
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http.get("/health").status == 200
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "tandem serve was not healthy within 120 s:\n{}",
            tandem.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_conformance.py");
    let output = python()
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "openai conformance checks failed:\n{}\n{}\n--- tandem ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        tandem.output()
    );

    // The example client too, given the server as the official client takes it.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/openai_client.py");
    let output = python()
        .arg(&example)
        .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .args(["--max-tokens", "16", "What is the capital of France?"])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("Paris"),
        "examples/openai_client.py: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let children = descendants(tandem.pid());
    assert!(
        children.len() >= 3,
        "tandem runs nats-server, a worker and the api-server: {children:?}"
    );
    tandem.signal(libc::SIGTERM);
    let status = tandem.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "tandem exits cleanly on SIGTERM: {status}"
    );
    assert_all_gone(&children, Duration::from_secs(5));
}
