//! `examples/disagg_client.rs` against a live `tandem serve` (tiny model, disaggregated: one
//! context and one decode worker): every prompt of examples/prompts.json gets an answer, on
//! both endpoints, streamed and not.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tandem_test_kit::{Proc, bin, free_port, model_dir, profile_dir, temp_file};

/// `target/<profile>/examples/disagg_client` (cargo test builds the examples).
fn client() -> PathBuf {
    let path = profile_dir().join("examples/disagg_client");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds it (or `cargo build --examples`)",
        path.display()
    );
    path
}

#[test]
fn the_client_prints_an_answer_for_every_prompt() {
    bin("worker");
    bin("api-server");
    let port = free_port();
    let config = temp_file(
        "disagg-client.yaml",
        &format!(
            "hostname: 127.0.0.1\nport: {port}\nmodel: {}\nserved_model_name: tiny-served\n\
             context_servers: {{ num_instances: 1 }}\ngeneration_servers: {{ num_instances: 1 }}\n",
            model_dir("tiny").display()
        ),
    );
    let mut serve = Command::new(bin("tandem"));
    serve.args(["serve", "-c"]).arg(&config);
    let mut server = Proc::spawn("tandem", serve);
    server.wait_for_line("tandem: serving", Duration::from_secs(120));

    let prompts_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/prompts.json");
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(&prompts_file).unwrap()).unwrap();
    assert!(prompts.len() >= 5);
    for endpoint in ["chat", "completions"] {
        for stream in [true, false] {
            let mut command = Command::new(client());
            command
                .arg("-c")
                .arg(&config)
                .arg("-p")
                .arg(&prompts_file)
                .args(["-e", endpoint, "--max-tokens", "8", "--concurrency", "3"]);
            if stream {
                command.arg("--stream");
            }
            let out = command.output().expect("the client runs");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let case = format!("{endpoint}, stream {stream}");
            assert!(
                out.status.success(),
                "{case}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("(tiny-served)"), "{case}: {stdout}");
            for (i, prompt) in prompts.iter().enumerate() {
                assert!(
                    stdout.contains(&format!("[{i}] prompt: {prompt}")),
                    "{case}: prompt {i} missing in {stdout}"
                );
            }
            assert_eq!(
                stdout.matches("(finish: ").count(),
                prompts.len(),
                "{case}: {stdout}"
            );
            assert!(!stdout.contains("ERROR"), "{case}: {stdout}");
        }
    }

    // An unknown model is the server's OpenAI error, printed, and a failing exit status.
    let out = Command::new(client())
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&prompts_file)
        .args(["--model", "no-such-model", "--max-tokens", "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("ERROR: HTTP 404"), "{stdout}");
}
