//! `worker generate` against Hugging Face transformers, end to end: on SmolLM2 imported in
//! f32, `--chat` produces transformers' `apply_chat_template` prompt ids, and the greedy output
//! is transformers' greedy continuation (fixture `tests/fixtures/parity/smollm2/reference.json`,
//! made by `scripts/fixtures/parity_reference.py`). The reference was generated with EOS
//! suppressed, so ours matches it up to the EOS where we stop.

mod engine_support;

use std::process::Command;

use engine_support::test_model;
use serde::Deserialize;

#[derive(Deserialize)]
struct Prompt {
    name: String,
    ids: Vec<u64>,
    #[serde(default)]
    greedy: Vec<u64>,
}

#[derive(Deserialize)]
struct Reference {
    eos_suppressed_in_greedy: Vec<u64>,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Output {
    prompt_ids: Vec<u64>,
    output_ids: Vec<u64>,
}

#[test]
fn chat_greedy_matches_transformers_on_smollm2_f32() {
    let model = test_model("smollm2-f32");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/smollm2/reference.json");
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("reference.json")).unwrap();
    for (name, text) in [
        ("chat_france", "What is the capital of France?"),
        ("chat_haiku", "Write a haiku about the sea."),
    ] {
        let want = reference.prompts.iter().find(|p| p.name == name).unwrap();
        let out = Command::new(tandem_test_kit::bin("worker"))
            .args([
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--chat",
                "--prompt",
                text,
            ])
            .args([
                "--max-tokens",
                &want.greedy.len().to_string(),
                "--threads",
                "2",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Output = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            got.prompt_ids, want.ids,
            "{name}: chat template + tokenizer"
        );
        let stopped_at_eos = got
            .output_ids
            .last()
            .is_some_and(|t| reference.eos_suppressed_in_greedy.contains(t));
        let compared = got.output_ids.len() - usize::from(stopped_at_eos);
        assert!(compared > 0, "{name}: nothing generated");
        assert_eq!(
            got.output_ids[..compared],
            want.greedy[..compared],
            "{name}: greedy tokens differ from transformers"
        );
        if !stopped_at_eos {
            assert_eq!(got.output_ids.len(), want.greedy.len());
        }
    }
}
