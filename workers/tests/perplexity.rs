//! The `perplexity` binary end to end on the tiny test model: a model against itself, the
//! chunked prefill against one forward, and the runs it refuses.
//!
//! The tiny model's context is 1024 tokens, under the default `--min-tokens` of 2000, so the
//! scoring runs pass a lower one.

use std::process::{Command, Output};

use serde_json::Value;
use tandem_test_kit::{model_dir, temp_file};

fn perplexity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_perplexity"))
        .args(args)
        .output()
        .expect("running perplexity")
}

fn json(args: &[&str]) -> Value {
    let out = perplexity(&[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "perplexity {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one line: {stdout:?}");
    serde_json::from_str(lines[0]).expect("--json prints JSON")
}

fn refusal(args: &[&str]) -> String {
    let out = perplexity(args);
    assert!(!out.status.success(), "perplexity {args:?} succeeded");
    String::from_utf8(out.stderr).expect("stderr is UTF-8")
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {v}"))
}

#[test]
fn a_model_against_itself_agrees_everywhere() {
    let tiny = model_dir("tiny");
    let tiny = tiny.to_str().unwrap();
    // The default text; 300 does not divide the 1024 tokens, so the last chunk is short.
    let v = json(&[
        "--model",
        tiny,
        "--reference",
        tiny,
        "--min-tokens",
        "1000",
        "--chunk",
        "300",
    ]);
    assert_eq!(v["text"], "/usr/share/common-licenses/GPL-3");
    // The tiny model's max_position_embeddings caps the default --max-tokens 4096.
    assert_eq!(v["tokens_run"], 1024);
    assert_eq!(v["tokens"], 1023);
    assert!(v["text_tokens"].as_u64().unwrap() > 1024, "{v}");
    let ppl = number(&v, "ppl");
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
    assert_eq!(number(&v, "ppl_ref"), ppl);
    assert_eq!(number(&v, "increase_pct"), 0.0);
    assert_eq!(number(&v, "top1_agreement"), 1.0);
    assert!(
        (number(&v, "mean_nll").exp() - ppl).abs() < 1e-9 * ppl,
        "{v}"
    );
    // The tiny model has f32 weights, so its KV follows as f32 unless told otherwise.
    assert_eq!(v["kv_dtype"], "f32");
    assert_eq!(v["reference_kv_dtype"], "f32");
}

#[test]
fn chunked_prefill_scores_as_one_forward_does() {
    let tiny = model_dir("tiny");
    let tiny = tiny.to_str().unwrap();
    let run = |chunk: &str| {
        json(&[
            "--model",
            tiny,
            "--min-tokens",
            "600",
            "--max-tokens",
            "600",
            "--chunk",
            chunk,
            "--kv-dtype",
            "bf16",
        ])
    };
    let whole = run("600");
    let chunked = run("128");
    assert_eq!(whole["tokens"], 599);
    assert_eq!(chunked["kv_dtype"], "bf16");
    assert!(whole["reference"].is_null() && whole["increase_pct"].is_null());
    let (a, b) = (number(&whole, "mean_nll"), number(&chunked, "mean_nll"));
    assert!(
        (a - b).abs() < 1e-5 * a.abs(),
        "one forward {a}, chunks of 128 {b}"
    );
}

/// `--prompt-ends` scores each position as a prompt's last row over the prefill's K/V: with the
/// prefill's activations as the rows' own, the same figures as scoring every row of the
/// prefill (a row's logits do not depend on the rows computed beside it); with 8-bit ones in
/// the prefill, other figures (the rows read that prefill's K/V, not their own pass's).
#[test]
fn prompt_ends_score_as_the_prefill_rows_do_unless_the_prefill_computes_otherwise() {
    let q4_1 = model_dir("smollm2-q4_1");
    let q4_1 = q4_1.to_str().unwrap();
    let run = |extra: &[&str]| {
        let base = [
            "--model",
            q4_1,
            "--min-tokens",
            "200",
            "--max-tokens",
            "200",
            "--chunk",
            "64",
        ];
        json(&[&base[..], extra].concat())
    };
    let rows = run(&[]);
    let ends = run(&["--prompt-ends"]);
    let ends_same_fill = run(&["--prompt-ends", "--fill-activation-bits", "16"]);
    let ends_8bit_fill = run(&["--prompt-ends", "--fill-activation-bits", "8"]);
    assert_eq!(rows["tokens"], 199);
    assert_eq!(ends["tokens"], 199);
    let nll = |v: &Value| number(v, "mean_nll");
    assert_eq!(nll(&ends), nll(&rows), "{ends}\n{rows}");
    assert_eq!(nll(&ends_same_fill), nll(&rows));
    assert_ne!(nll(&ends_8bit_fill), nll(&rows), "{ends_8bit_fill}");
    assert!(
        (nll(&ends_8bit_fill) - nll(&rows)).abs() < 0.05 * nll(&rows),
        "{ends_8bit_fill}\n{rows}"
    );
    let stderr = refusal(&["--model", q4_1, "--fill-activation-bits", "8"]);
    assert!(stderr.contains("--prompt-ends"), "{stderr}");
}

#[test]
fn a_text_under_the_minimum_is_refused_with_its_token_count() {
    let tiny = model_dir("tiny");
    let text = temp_file("short.txt", "A text far too short to measure a model by.");
    let stderr = refusal(&[
        "--model",
        tiny.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    let count: usize = stderr
        .split(" gives ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error names the token count: {stderr}"));
    assert!(count > 0 && count < 2000, "{stderr}");
    assert!(stderr.contains("at least 2000"), "{stderr}");
}

#[test]
fn a_context_under_the_minimum_is_refused() {
    let tiny = model_dir("tiny");
    let stderr = refusal(&["--model", tiny.to_str().unwrap()]);
    assert!(stderr.contains("only 1024 tokens can run"), "{stderr}");
    assert!(stderr.contains("max_position_embeddings 1024"), "{stderr}");
}

#[test]
fn models_with_different_tokenizers_are_refused() {
    let tiny = model_dir("tiny");
    let smollm2 = model_dir("smollm2-bf16");
    let stderr = refusal(&[
        "--model",
        tiny.to_str().unwrap(),
        "--reference",
        smollm2.to_str().unwrap(),
        "--min-tokens",
        "1000",
    ]);
    assert!(stderr.contains("tokenize the text differently"), "{stderr}");
}

#[test]
fn help_explains_every_option() {
    let out = perplexity(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for option in [
        "--model",
        "--reference",
        "--text",
        "--max-tokens",
        "--min-tokens",
        "--chunk",
        "--threads",
        "--kv-dtype",
        "--reference-kv-dtype",
        "--prompt-ends",
        "--fill-activation-bits",
        "--json",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
    let stderr = refusal(&["--model", "m", "--kv-dtype", "f64"]);
    assert!(
        stderr.contains("f64") && stderr.contains("bf16"),
        "{stderr}"
    );
}
