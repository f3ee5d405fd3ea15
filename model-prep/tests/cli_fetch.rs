//! End-to-end tests of `model-prep fetch` without the Hub: a refused connection, an
//! unresolvable host, a server that accepts and never answers, a Hub that says the repository
//! does not exist, and offline use of a Hugging Face cache laid out by hand.
//!
//! Each run points `HF_HOME` at a fresh directory so no real cache or token is used, and is
//! killed (failing the test) if it outlives its time bound.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs model-prep with `HF_HOME` at `hf_home` and the extra environment, within `limit`.
fn fetch(hf_home: &Path, env: &[(&str, &str)], args: &[&str], limit: Duration) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_model-prep"));
    command
        .arg("fetch")
        .args(args)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("the model-prep binary runs");
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("model-prep fetch {args:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The error line (logs come before it on stderr).
fn error_line(output: &Output) -> String {
    stderr(output)
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {:?}", stderr(output)))
        .to_string()
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn refused_connection_says_the_hub_is_unreachable_and_how_to_work_offline() {
    let root = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = root.path().join("model");
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_ENDPOINT", &endpoint)],
        &[
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "-o",
            out.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("cannot reach the Hugging Face Hub"), "{line}");
    assert!(line.contains(&endpoint), "{line}");
    assert!(line.contains("HF_HUB_OFFLINE=1"), "{line}");
    assert!(line.contains("model-prep default"), "{line}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "hf")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn unresolvable_host_says_the_hub_is_unreachable() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    // `.invalid` never resolves (RFC 6761): the same failure as a machine without DNS.
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_ENDPOINT", "https://huggingface.invalid")],
        &[
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "-o",
            out.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("cannot reach the Hugging Face Hub"), "{line}");
}

#[test]
fn silent_server_times_out_quickly() {
    let root = tempfile::tempdir().unwrap();
    // Accepts connections (the kernel completes them from the backlog) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let out = root.path().join("model");
    let started = Instant::now();
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_ENDPOINT", &endpoint)],
        &["a/b", "-o", out.to_str().unwrap(), "--connect-timeout", "1"],
        Duration::from_secs(20),
    );
    assert!(!output.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let line = error_line(&output);
    assert!(line.contains("cannot reach the Hugging Face Hub"), "{line}");
    drop(listener);
}

/// A fake Hub answering every request with `respond(method, path)`'s status line and headers.
fn fake_hub(respond: fn(&str, &str) -> String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or("");
            let path = parts.next().unwrap_or("");
            let head = respond(method, path);
            let _ = write!(
                stream,
                "{head}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    endpoint
}

#[test]
fn unknown_repository_is_named() {
    let root = tempfile::tempdir().unwrap();
    // What the Hub answers for a repository that does not exist (or is private).
    let endpoint = fake_hub(|_, path| {
        if path.contains("/resolve/") {
            "HTTP/1.1 401 Unauthorized\r\nX-Error-Code: RepoNotFound\r\nX-Error-Message: Repository not found".into()
        } else {
            "HTTP/1.1 200 OK".into()
        }
    });
    let out = root.path().join("model");
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_ENDPOINT", &endpoint)],
        &["nobody/no-such-model", "-o", out.to_str().unwrap()],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(
        line.contains("repository nobody/no-such-model was not found"),
        "{line}"
    );
    assert!(line.contains("HF_TOKEN"), "{line}");
    assert!(!out.exists());
}

#[test]
fn missing_file_is_named() {
    let root = tempfile::tempdir().unwrap();
    let endpoint = fake_hub(|_, path| {
        if path.contains("/resolve/") {
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound".into()
        } else {
            "HTTP/1.1 200 OK".into()
        }
    });
    let out = root.path().join("model");
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_ENDPOINT", &endpoint)],
        &["some/dataset-not-model", "-o", out.to_str().unwrap()],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(
        line.contains("some/dataset-not-model has no config.json at revision main"),
        "{line}"
    );
}

#[test]
fn offline_mode_without_cache_says_what_is_missing() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    let output = fetch(
        &root.path().join("hf"),
        &[("HF_HUB_OFFLINE", "1")],
        &[
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "-o",
            out.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("offline mode"), "{line}");
    assert!(line.contains("config.json"), "{line}");
    assert!(
        line.contains(root.path().join("hf").to_str().unwrap()),
        "{line}"
    );
}

/// Lays out a model directory as a Hugging Face cache snapshot of `repo` at `main`.
fn seed_cache(hf_home: &Path, repo: &str, model: &Path) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
}

fn random_tiny(dir: &Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_model-prep"))
        .args(["random", "--preset", "tiny", "-o", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn cached_model_is_fetched_offline_and_when_the_hub_is_unreachable() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("source");
    random_tiny(&model);
    let hf_home = root.path().join("hf");
    seed_cache(&hf_home, "someone/tiny", &model);

    let out = root.path().join("offline");
    let output = fetch(
        &hf_home,
        &[("HF_HUB_OFFLINE", "1")],
        &["someone/tiny", "-o", out.to_str().unwrap()],
        LIMIT,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("[from the local cache]"), "{summary}");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(model.join(file)).unwrap(),
            "{file}"
        );
    }

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = root.path().join("unreachable");
    let output = fetch(
        &hf_home,
        &[("HF_ENDPOINT", &format!("http://127.0.0.1:{port}"))],
        &["someone/tiny", "-o", out.to_str().unwrap()],
        LIMIT,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("unreachable"),
        "{}",
        stderr(&output)
    );
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn cached_repository_without_weights_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("source");
    random_tiny(&model);
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let hf_home = root.path().join("hf");
    seed_cache(&hf_home, "someone/no-weights", &model);
    let out = root.path().join("out");
    let output = fetch(
        &hf_home,
        &[("HF_HUB_OFFLINE", "1")],
        &["someone/no-weights", "-o", out.to_str().unwrap()],
        LIMIT,
    );
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("model.safetensors"), "{line}");
    assert!(!out.exists());
}
