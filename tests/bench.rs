//! `tandem bench` against a live `tandem serve` (tiny model): two concurrency levels and a
//! Poisson level give consistent JSON and a PNG, the shared-prefix and multi-turn workloads
//! send what they say; a server that is not there is an error, not a hang.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_test_kit::{Proc, bin, free_port, model_dir, temp_dir};

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(bin("tandem"))
        .arg("bench")
        .args(args)
        .output()
        .expect("tandem bench runs")
}

/// The JSON a run wrote to `json`, once it exited with success.
fn succeeded_with_json(out: &std::process::Output, json: &std::path::Path) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn bench_measures_a_live_server() {
    bin("worker");
    bin("api-server");
    let port = free_port();
    let mut serve = Command::new(bin("tandem"));
    serve
        .args(["serve", "--model"])
        .arg(model_dir("tiny"))
        .args(["--port", &port.to_string()]);
    let mut server = Proc::spawn("tandem", serve);
    server.wait_for_line("tandem: serving", Duration::from_secs(120));
    let url = format!("http://127.0.0.1:{port}/v1");
    let dir = temp_dir("bench");
    let json = dir.join("bench.json");
    let png = dir.join("bench.png");

    let out = bench(&[
        "--url",
        &url,
        "--concurrency",
        "1,4",
        "--num-prompts",
        "6",
        "--input-len",
        "24",
        "--output-len",
        "8",
        "--goodput",
        "ttft:60000,itl:60000",
        "--output-json",
        json.to_str().unwrap(),
        "--output-png",
        png.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("c=1") && stdout.contains("c=4"), "{stdout}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["model"], "tiny");
    let levels = doc["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    // What the server counted per level, from its /metrics: nothing preempted, nothing
    // fell back.
    assert!(stdout.contains("preemptions 0;"), "{stdout}");
    // And the number formats its workers serve in (the tiny model's f32 weights and cache on
    // the CPU), leading the line.
    assert!(stdout.contains("server: workers "), "{stdout}");
    for level in levels {
        let server = &level["server"];
        assert_eq!(server["preemptions"], 0, "{level}");
        let workers = server["workers"].as_object().unwrap();
        assert!(
            !workers.is_empty() && workers.keys().all(|k| k.ends_with("f32 weights, f32 KV")),
            "{level}"
        );
        assert_eq!(
            server["kv_transfer_fallbacks"],
            serde_json::json!({}),
            "{level}"
        );
        assert!(server["kv_transfers"].is_object(), "{level}");
        // `tandem serve` without a config runs a context and a decode worker: every request
        // is handed over, and its time to first token split into the mean of each part.
        let handed_over: u64 = server["kv_transfers"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(handed_over, 6, "{level}");
        let parts = server["ttft_parts_ms"].as_object().unwrap();
        let names = [
            "context_queue",
            "prefill",
            "decode_room_wait",
            "kv_transfer",
            "other",
        ];
        assert_eq!(parts.len(), names.len(), "{level}");
        let part = |name: &str| parts[name].as_f64().unwrap();
        assert!(names.iter().all(|&name| part(name) >= 0.0), "{level}");
        assert!(
            part("prefill") > 0.0 && part("kv_transfer") > 0.0,
            "{level}"
        );
        // The server's TTFT (the parts' sum) ends before the client sees the first token.
        let server_ttft: f64 = names.iter().map(|&name| part(name)).sum();
        assert!(
            server_ttft <= level["ttft_ms"]["mean"].as_f64().unwrap() + 1e-6,
            "{level}"
        );
    }
    assert!(
        stdout.contains("; TTFT parts, mean ms: context_queue "),
        "{stdout}"
    );
    for (level, concurrency) in levels.iter().zip([1, 4]) {
        assert_eq!(level["concurrency"], concurrency);
        assert_eq!(level["completed"], 6, "{level}");
        assert_eq!(level["failed"], 0, "{level}");
        // ignore_eos: every request generates exactly --output-len tokens.
        assert_eq!(level["output_tokens"], 6 * 8, "{level}");
        assert!(
            level["prompt_tokens"].as_u64().unwrap() >= 6 * 24,
            "{level}"
        );
        let ms = |key: &str, q: &str| level[key][q].as_f64().unwrap();
        assert!(ms("ttft_ms", "p50") > 0.0);
        assert!(ms("ttft_ms", "p50") <= ms("e2e_ms", "p50"));
        assert!(ms("ttft_ms", "p99") <= ms("e2e_ms", "p99") + 1e-9);
        assert!(ms("itl_ms", "p50") <= ms("itl_ms", "p99"));
        assert!(ms("e2e_ms", "p99") <= level["duration_s"].as_f64().unwrap() * 1e3);
        // Generous limits: every completed request is good.
        assert_eq!(level["goodput"], level["request_throughput"]);
        assert!(level["output_token_throughput"].as_f64().unwrap() > 0.0);
    }
    let image = std::fs::read(&png).unwrap();
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        image.len() > 10_000,
        "a chart with text and lines, not an empty image"
    );

    // Poisson arrivals: the level is the rate; an impossible limit gives zero goodput.
    let out = bench(&[
        "--url",
        &url,
        "--request-rate",
        "20",
        "--num-prompts",
        "4",
        "--output-len",
        "4",
        "--goodput",
        "ttft:0.001",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let doc = succeeded_with_json(&out, &json);
    let level = &doc["levels"][0];
    assert_eq!(level["request_rate"], 20.0);
    assert_eq!(level["completed"], 4);
    assert_eq!(level["goodput"], 0.0);

    // Exact prompt lengths: random token ids on the completions endpoint, every prompt
    // counted by the server as exactly --input-tokens (the tiny model's vocabulary is 512).
    let out = bench(&[
        "--url",
        &url,
        "--endpoint",
        "completions",
        "--offline",
        "--num-prompts",
        "5",
        "--input-tokens",
        "40",
        "--token-ids",
        "3-500",
        "--output-len",
        "4",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let doc = succeeded_with_json(&out, &json);
    assert_eq!(doc["input_tokens"], 40);
    assert_eq!(doc["input_len"], Value::Null);
    let level = &doc["levels"][0];
    assert_eq!(level["completed"], 5, "{level}");
    assert_eq!(level["prompt_tokens"], 5 * 40, "{level}");
    assert_eq!(level["output_tokens"], 5 * 4, "{level}");
    // Token ids go to the completions endpoint only: said before anything is sent.
    let out = bench(&["--url", &url, "--input-tokens", "40", "--num-prompts", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--endpoint completions"), "{stderr}");

    // Shared prefixes: 2 groups x 3 prompts of exactly 32 + 8 token ids, shuffled together.
    let out = bench(&[
        "--url",
        &url,
        "--workload",
        "shared-prefix",
        "--endpoint",
        "completions",
        "--random-token-ids",
        "--token-ids",
        "3-500",
        "--prefix-groups",
        "2",
        "--prompts-per-group",
        "3",
        "--system-prompt-len",
        "32",
        "--question-len",
        "8",
        "--output-len",
        "4",
        "--concurrency",
        "2",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = succeeded_with_json(&out, &json);
    assert!(
        stdout.contains("shared prefix: 2 groups x 3 prompts"),
        "{stdout}"
    );
    assert_eq!(doc["workload"]["kind"], "shared-prefix");
    assert_eq!(doc["workload"]["prefix_groups"], 2);
    assert_eq!(doc["workload"]["system_prompt_len"], 32);
    assert_eq!(doc["num_prompts"], 6);
    let level = &doc["levels"][0];
    assert_eq!(level["completed"], 6, "{level}");
    assert_eq!(level["prompt_tokens"], 6 * (32 + 8), "{level}");
    assert_eq!(level["output_tokens"], 6 * 4, "{level}");
    assert_cache_is_reported_or_null(level);

    // Conversations: 2 of 3 turns on the chat endpoint, each turn resending the history.
    let out = bench(&[
        "--url",
        &url,
        "--workload",
        "multi-turn",
        "--conversations",
        "2",
        "--turns",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--concurrency",
        "2",
        "--output-json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = succeeded_with_json(&out, &json);
    assert!(
        stdout.contains("turns: TTFT p50 / p99 first turn"),
        "{stdout}"
    );
    assert_eq!(doc["workload"]["kind"], "multi-turn");
    assert_eq!(doc["workload"]["turns"], 3);
    assert_eq!(doc["num_prompts"], 6);
    let level = &doc["levels"][0];
    assert_eq!(level["completed"], 6, "{level}");
    assert_eq!(level["output_tokens"], 6 * 4, "{level}");
    // Turn k's prompt holds k user messages of 8 words and k - 1 replies: well over the six
    // 8-word messages of independent prompts.
    assert!(
        level["prompt_tokens"].as_u64().unwrap() > 2 * (8 + 16 + 24),
        "{level}"
    );
    let by_turn = &level["ttft_ms_by_turn"];
    assert_eq!(by_turn["turns"].as_array().unwrap().len(), 3, "{level}");
    assert!(
        by_turn["later_turns"]["p50"].as_f64().unwrap() > 0.0,
        "{level}"
    );
    assert_cache_is_reported_or_null(level);
    // The replies come back as text: multi-turn refuses token ids before sending anything.
    let out = bench(&[
        "--url",
        &url,
        "--workload",
        "multi-turn",
        "--endpoint",
        "completions",
        "--input-tokens",
        "40",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not token ids"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A level's prompt-cache hits: the server's count where it gives one (a share of the prompt
/// tokens), else null, never a made-up zero.
fn assert_cache_is_reported_or_null(level: &Value) {
    let cache = &level["prompt_cache"];
    if cache.is_null() {
        return;
    }
    let rate = cache["hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate), "{level}");
    assert!(
        cache["cached_tokens"].as_u64().unwrap() <= cache["prompt_tokens"].as_u64().unwrap(),
        "{level}"
    );
}

#[test]
fn no_server_is_an_error_not_a_hang() {
    let port = free_port();
    let started = Instant::now();
    let out = bench(&[
        "--url",
        &format!("http://127.0.0.1:{port}/v1"),
        "--num-prompts",
        "2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tandem bench: error"), "{stderr}");
    assert!(stderr.contains("/models"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let out = bench(&["--concurrency", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency must be at least 1"));
}
