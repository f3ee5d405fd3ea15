//! `worker generate` end to end: the real binary on the real model and CPU backend.

mod engine_support;

use std::process::{Command, Output};

use engine_support::test_model;
use serde_json::Value;

fn worker(args: &[&str]) -> Output {
    Command::new(tandem_test_kit::bin("worker"))
        .args(args)
        .env_remove("TANDEM_MODEL")
        .output()
        .expect("running worker")
}

fn ok_stdout(args: &[&str]) -> String {
    let out = worker(args);
    assert!(
        out.status.success(),
        "worker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

fn json(args: &[&str]) -> Value {
    let stdout = ok_stdout(args);
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one line: {stdout:?}");
    serde_json::from_str(lines[0]).expect("--json prints JSON")
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id"))
        .collect()
}

#[test]
fn json_output_has_exactly_the_documented_shape() {
    let model = test_model("tiny");
    let model = model.to_str().unwrap();
    let v = json(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hello world",
        "--max-tokens",
        "7",
        "--json",
    ]);
    let obj = v.as_object().expect("an object");
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["output_ids", "prompt_ids", "text"]);
    assert!(!ids(&v["prompt_ids"]).is_empty());
    let output = ids(&v["output_ids"]);
    assert!(!output.is_empty() && output.len() <= 7);
    assert!(v["text"].is_string());
}

#[test]
fn text_output_is_the_json_text_and_greedy_is_deterministic() {
    let model = test_model("smollm2-bf16");
    let model = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ];
    let text = ok_stdout(&args);
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let v = json(&with_json);
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        v["text"].as_str().unwrap()
    );
    assert!(
        v["text"].as_str().unwrap().contains("Paris"),
        "SmolLM2 knows this one: {v}"
    );
}

#[test]
fn chat_applies_the_template_and_system_adds_a_message() {
    // The tiny model's template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message,
    // then `<|im_start|>assistant\n`; <|im_start|> is id 1 and <|im_end|> id 2.
    let model = test_model("tiny");
    let model = model.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--json",
        ];
        args.extend(extra);
        ids(&json(&args)["prompt_ids"])
    };
    let count = |ids: &[u64], id: u64| ids.iter().filter(|&&t| t == id).count();
    let plain = run(&[]);
    let chat = run(&["--chat"]);
    let system = run(&["--chat", "--system", "Be brief."]);
    assert_eq!(
        (count(&plain, 1), count(&plain, 2)),
        (0, 0),
        "no template without --chat: {plain:?}"
    );
    assert_eq!(chat.first(), Some(&1), "{chat:?}");
    assert_eq!(
        (count(&chat, 1), count(&chat, 2)),
        (2, 1),
        "user turn + generation prompt: {chat:?}"
    );
    assert_eq!(
        (count(&system, 1), count(&system, 2)),
        (3, 2),
        "system + user + generation prompt: {system:?}"
    );
    assert!(
        system.ends_with(&chat),
        "the system turn comes before the same user turn"
    );
    assert!(chat.len() > plain.len());
}

#[test]
fn the_same_seed_gives_the_same_output_and_another_seed_differs() {
    let model = test_model("tiny");
    let model = model.to_str().unwrap();
    let run = |seed: &str| {
        json(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "once upon a time",
            "--max-tokens",
            "24",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ])
    };
    let a = run("1234");
    let b = run("1234");
    assert_eq!(a, b, "same seed, same output");
    let others: Vec<_> = ["1", "2", "3"]
        .iter()
        .map(|s| run(s)["output_ids"].clone())
        .collect();
    assert!(
        others.iter().any(|o| *o != a["output_ids"]),
        "sampling must depend on the seed"
    );
}

#[test]
fn stop_strings_cut_the_output() {
    let model = test_model("smollm2-bf16");
    let model = model.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        model,
        "--prompt",
        "Count: 1, 2, 3,",
        "--max-tokens",
        "12",
        "--json",
    ];
    let full = json(&base);
    let text = full["text"].as_str().unwrap().to_owned();
    // Stop at the 2 characters starting at the 4th: the output is the text before their
    // first occurrence, without them.
    let stop: String = text.chars().skip(3).take(2).collect();
    assert!(!stop.is_empty(), "need some text to cut: {text:?}");
    let mut args = base.to_vec();
    args.extend(["--stop", &stop]);
    let cut = json(&args);
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(cut["text"].as_str().unwrap(), expected);
}

#[test]
fn bad_model_dir_and_bad_device_fail_clearly() {
    let out = worker(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model") && err.contains("does not exist"),
        "{err}"
    );

    let empty = std::env::temp_dir().join(format!("tandem-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = worker(&[
        "generate",
        "--model",
        empty.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("model-prep"),
        "{err}"
    );

    let model = test_model("tiny");
    let out = worker(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "tpu:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown device `tpu:0`") && err.contains("cuda:N"),
        "{err}"
    );

    // Without a driver, asking for a GPU says so once and names the way out.
    if !tandem_workers::backend::cuda::driver_present() {
        let out = worker(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--device",
            "cuda:0",
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cuda:0")
                && err.contains("use --device cpu")
                && err.matches("cannot be loaded").count() == 1,
            "{err}"
        );
    }
}

#[test]
fn three_tensor_parallel_ranks_generate_what_the_whole_model_does() {
    // SmolLM2-135M: 9 query heads, 3 KV heads, 1536 MLP channels, all divisible by 3; the
    // ranks run in threads of the one worker process and sum their outputs after o_proj and
    // down (workers/src/model/shard.rs).
    let model = test_model("smollm2-f32");
    let model = model.to_str().unwrap();
    let run = |ranks: &str| {
        json(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "16",
            "--threads",
            "3",
            "--tensor-parallel",
            ranks,
            "--json",
        ])
    };
    let whole = run("1");
    let split = run("3");
    assert_eq!(
        split["output_ids"], whole["output_ids"],
        "{split} vs {whole}"
    );
    assert!(whole["text"].as_str().unwrap().contains("Paris"), "{whole}");
    // Two ranks cannot split 9 heads: refused by name, before anything runs.
    let out = worker(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hi",
        "--tensor-parallel",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("attention heads (9) do not divide over 2 tensor-parallel ranks"),
        "{err}"
    );
}

#[test]
fn help_names_every_flag() {
    let help = ok_stdout(&["generate", "--help"]);
    for flag in [
        "--model",
        "--prompt",
        "--chat",
        "--system",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--stop",
        "--json",
        "--device",
        "--threads",
        "--tensor-parallel",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

/// A random-weight directory without weight files (`model-prep random --generate-at-load`):
/// the worker generates the weights `model-prep random` writes for the same seed and dtype, so
/// it generates the same tokens as the `tiny` test model (seed 0, f32), whole and split over
/// two tensor-parallel ranks; a directory written for another generator is refused by name.
#[test]
fn weights_generated_at_load_are_the_ones_model_prep_writes() {
    let tiny = test_model("tiny");
    let dir = std::env::temp_dir().join(format!("tandem-generated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let entry = entry.unwrap();
        if !entry
            .file_name()
            .to_string_lossy()
            .ends_with(".safetensors")
        {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let spec = dir.join("random_weights.json");
    std::fs::write(&spec, r#"{"seed": 0, "dtype": "f32", "generator": 1}"#).unwrap();
    let run = |model: &std::path::Path, ranks: &str| {
        ids(&json(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "the sea and the sky",
            "--max-tokens",
            "16",
            "--tensor-parallel",
            ranks,
            "--json",
        ])["output_ids"])
    };
    let written = run(&tiny, "1");
    assert_eq!(run(&dir, "1"), written);
    assert_eq!(run(&dir, "2"), written);

    std::fs::write(&spec, r#"{"seed": 0, "dtype": "f32", "generator": 99}"#).unwrap();
    let out = worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("random_weights.json") && err.contains("weight generator 99"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
