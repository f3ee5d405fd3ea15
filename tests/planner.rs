//! `tandem plan` end to end: it profiles the tiny model on the CPU with real `tandem serve`
//! deployments (a short ladder), writes a config and the profile, leaves no process behind,
//! and `tandem serve -c` that config serves a completion; a re-plan from the stored profile
//! gives the same config without measuring; and plans from a hand-written profile follow
//! the targets (a tight ITL: disaggregated; a loose one: aggregated; impossible ones: an
//! error that says so).
//!
//! Needs `$TANDEM_TEST_MODELS/tiny` (scripts/test-models) and the workspace binaries
//! (`cargo build --workspace --bins`; `cargo test --workspace` builds them).

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use support::tandem;
use tandem_test_kit::{Http, Proc, cmdline, free_port, model_dir, temp_dir};

/// `tandem plan ARGS`, run to its end.
fn plan(args: &[&str]) -> Output {
    tandem()
        .arg("plan")
        .args(args)
        .output()
        .expect("tandem plan runs")
}

fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn yaml(path: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && cmdline(pid).contains(needle))
        .collect()
}

#[test]
fn plan_profiles_the_cpu_and_its_config_serves() {
    let model = model_dir("tiny");
    let dir = temp_dir("planner");
    let work = dir.join("work");
    let profile = dir.join("profile.json");
    let config = dir.join("deploy.yaml");
    let alternative = dir.join("alternative.yaml");
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
    let targets = ["--osl", "16", "--ttft-ms", "30000", "--itl-ms", "5000"];
    let started = std::time::Instant::now();
    let out = plan(
        &[
            &[
                "--model",
                &path(&model),
                "--devices",
                "cpu,cpu",
                "--isl",
                "96",
                "--max-num-tokens",
                "64",
                "--batch-ladder",
                "1,2,4",
                "--prefill-repeats",
                "2",
                "--prefill-burst",
                "2",
                "--steady-tokens",
                "8",
                "--interference-batch",
                "2",
                "--interference-prompts",
                "2",
                "--work-dir",
                &path(&work),
                "--profile-out",
                &path(&profile),
                "--output",
                &path(&config),
                "--output-alternative",
                &path(&alternative),
            ][..],
            &targets,
        ]
        .concat(),
    );
    let stdout = succeeded(&out);
    let took = started.elapsed();
    eprintln!("tandem plan profiled and planned in {took:?}");
    // The table: every deployment of two CPU slots, the chosen one marked.
    for row in [
        "1 ctx TP1 + 1 dec TP1",
        "1 agg TP1",
        "2 agg TP1",
        "limited by",
    ] {
        assert!(stdout.contains(row), "{row}:\n{stdout}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("* ")), "{stdout}");
    // The profiled deployment was stopped: nothing runs its config any more.
    assert_eq!(processes_mentioning(&path(&work)), Vec::<u32>::new());

    let measured: Value =
        serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(measured["version"], 1);
    assert_eq!(measured["isl"], 96);
    assert_eq!(measured["block_size"], 16);
    let worker = &measured["workers"][0];
    assert_eq!(worker["tensor_parallel_size"], 1);
    assert_eq!(worker["device"], "cpu");
    assert!(worker["kv_cache_blocks"].as_u64().unwrap() > 0, "{worker}");
    assert!(
        worker["prefill"]["latency_ms"].as_f64().unwrap() > 0.0,
        "{worker}"
    );
    assert_eq!(worker["prefill"]["samples_ms"].as_array().unwrap().len(), 2);
    assert!(worker["prefill"]["burst_requests_per_s"].as_f64().unwrap() > 0.0);
    let decode = worker["decode"].as_array().unwrap();
    assert_eq!(
        decode
            .iter()
            .map(|p| p["batch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert!(
        decode.iter().all(|p| p["itl_ms"].as_f64().unwrap() > 0.0),
        "{worker}"
    );
    let mixed = worker["mixed"].as_array().unwrap();
    assert_eq!(mixed.len(), 1, "{worker}");
    assert_eq!(mixed[0]["batch"], 2);

    // The proposal, commented with the profile's numbers, and its alternative.
    let text = std::fs::read_to_string(&config).unwrap();
    for needle in [
        "# tandem plan:",
        "prefill alone",
        "decode ITL ms by batch",
        "# Chosen:",
        "tandem bench",
    ] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }
    let chosen = yaml(&config);
    let other = yaml(&alternative);
    let aggregated =
        |c: &serde_yaml_ng::Value| c["context_servers"]["num_instances"].as_u64() == Some(0);
    assert_ne!(aggregated(&chosen), aggregated(&other), "{text}");
    assert_eq!(chosen["generation_servers"]["device"].as_str(), Some("cpu"));

    // A re-plan from the stored profile measures nothing and gives the same config.
    let replanned = dir.join("replanned.yaml");
    let out = plan(
        &[
            &[
                "--profile-in",
                &path(&profile),
                "--devices",
                "cpu,cpu",
                "--output",
                &path(&replanned),
            ][..],
            &targets,
        ]
        .concat(),
    );
    succeeded(&out);
    assert_eq!(std::fs::read_to_string(&replanned).unwrap(), text);

    // `tandem serve -c` runs the proposal.
    let port = free_port();
    let mut command = tandem();
    command
        .args(["serve", "-c", &path(&config), "--model", &path(&model)])
        .args(["--port", &port.to_string(), "--shutdown-grace-s", "20"]);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line("tandem: serving", Duration::from_secs(120));
    let reply = Http::new(&format!("http://127.0.0.1:{port}")).post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["usage"]["completion_tokens"],
        8,
        "{}",
        reply.body
    );
    launcher.signal(libc::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
}

/// A profile of one TP=1 GPU worker whose decode step is 10 + 0.25 b ms, whose prefill of
/// 3000 tokens takes 200 ms, and whose steps with a prefill chunk take 120 ms more.
fn stored_profile() -> Value {
    let decode: Vec<Value> = [1u32, 2, 4, 8, 16, 32, 64, 128]
        .iter()
        .map(|&b| {
            let itl = 10.0 + 0.25 * f64::from(b);
            json!({"batch": b, "itl_ms": itl, "itl_p90_ms": itl, "gaps": 100, "output_tokens": 64})
        })
        .collect();
    let mixed: Vec<Value> = [8u32, 32]
        .iter()
        .map(|&b| {
            json!({"batch": b, "step_ms": 130.0 + 0.25 * f64::from(b), "gaps": 50, "prompts": 4,
                   "prompt_ttft_ms": 300.0})
        })
        .collect();
    json!({
        "version": 1,
        "model": "/models/llama-3.1-8b",
        "isl": 3000,
        "max_num_tokens": 2048,
        "block_size": 64,
        "gpu_memory_fraction": 0.9,
        "workers": [{
            "tensor_parallel_size": 1,
            "device": "cuda:0",
            "max_batch_size": 128,
            "kv_cache_blocks": 6500,
            "prefill": {"latency_ms": 200.0, "samples_ms": [200.0], "burst": 8,
                        "burst_requests_per_s": 5.2},
            "decode": decode,
            "mixed": mixed,
        }],
    })
}

#[test]
fn plans_from_a_stored_profile_follow_the_targets() {
    let dir = temp_dir("planner-profile-in");
    let profile = dir.join("profile.json");
    std::fs::write(&profile, stored_profile().to_string()).unwrap();
    let profile = profile.to_str().unwrap();
    let common = [
        "--profile-in",
        profile,
        "--gpus",
        "2",
        "--osl",
        "150",
        "--ttft-ms",
        "2000",
    ];

    // A tight ITL: a context and a decode worker, on one GPU each. The config goes to
    // stdout, the table to stderr.
    let out = plan(&[&common[..], &["--itl-ms", "15"]].concat());
    let stdout = succeeded(&out);
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&stdout).expect("stdout is the YAML");
    assert_eq!(
        config["context_servers"]["num_instances"].as_u64(),
        Some(1),
        "{stdout}"
    );
    assert_eq!(
        config["context_servers"]["device"][0].as_str(),
        Some("cuda:0")
    );
    assert_eq!(
        config["generation_servers"]["num_instances"].as_u64(),
        Some(1)
    );
    assert_eq!(
        config["generation_servers"]["device"][0].as_str(),
        Some("cuda:1")
    );
    // Decode at ITL <= 15 ms: 10 + 0.25 b gives b = 20.
    assert_eq!(
        config["generation_servers"]["max_batch_size"].as_u64(),
        Some(20)
    );
    assert_eq!(config["model"].as_str(), Some("/models/llama-3.1-8b"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 ctx TP1 + 1 dec TP1"), "{stderr}");

    // A loose ITL: two aggregated workers.
    let out = plan(&[&common[..], &["--itl-ms", "200"]].concat());
    let stdout = succeeded(&out);
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&stdout).unwrap();
    assert_eq!(
        config["context_servers"]["num_instances"].as_u64(),
        Some(0),
        "{stdout}"
    );
    assert_eq!(
        config["generation_servers"]["num_instances"].as_u64(),
        Some(2)
    );
    assert!(
        stdout.contains("# The best disaggregated deployment instead"),
        "{stdout}"
    );

    // Impossible targets: an error, with the table of what limits each deployment.
    let out = plan(&[
        "--profile-in",
        profile,
        "--gpus",
        "2",
        "--osl",
        "150",
        "--ttft-ms",
        "100",
        "--itl-ms",
        "5",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no deployment meets the targets"),
        "{stderr}"
    );
    assert!(stderr.contains("TTFT"), "{stderr}");
}

#[test]
fn help_explains_planning() {
    let out = Command::new(tandem_test_kit::bin("tandem"))
        .args(["plan", "--help"])
        .output()
        .expect("tandem runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "--profile-in",
        "--profile-out",
        "--tp",
        "--isl",
        "--osl",
        "--ttft-ms",
        "--itl-ms",
        "M/D/1",
    ] {
        assert!(help.contains(needle), "{needle}:\n{help}");
    }
}
