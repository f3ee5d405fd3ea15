//! Logit and greedy parity of the CPU model with Hugging Face transformers (float32) on tiny
//! random models committed with their reference outputs: Llama, Llama with llama3 rope scaling,
//! Qwen2 (q/k/v bias, tied embeddings) and Qwen3 (q and k heads RMS-normed, head_dim 32 where
//! hidden/heads is 16); regenerate with
//! `scripts/fixtures/parity_reference.py tiny`. And our own `model-prep random --preset tiny
//! --seed 0` model (`$TANDEM_TEST_MODELS/tiny`), whose reference is committed; regenerate it
//! with `scripts/fixtures/parity_reference.py dir --model target/test-models/tiny --name
//! model-prep-tiny` if model-prep's random weights change.

mod parity_support;

use parity_support::*;

const MAX_REL_L2: f64 = 1e-4;

fn check_model(name: &str) {
    check_model_at(&fixture_dir(name), &fixture_dir(name), name);
}

fn check_model_at(model_dir: &std::path::Path, reference_dir: &std::path::Path, name: &str) {
    let reference = read_reference(reference_dir);
    let model = load_cpu(model_dir);
    for (prompt, expected) in reference.prompts.iter().zip(&reference.logits) {
        let mut session = Session::new(&model, prompt.ids.len());
        let whole = session.feed(&prompt.ids);
        let err = rel_l2(&whole, expected);
        assert!(
            err < MAX_REL_L2,
            "{name}/{}: relative L2 {err:e}",
            prompt.name
        );
        assert_eq!(argmax(&whole), prompt.top_ids[0], "{name}/{}", prompt.name);

        // Chunked prefill (the later chunks read the earlier ones from the cache) computes
        // every token exactly as one chunk does.
        let mut chunked = Session::new(&model, prompt.ids.len());
        let logits = chunked.prefill_chunked(&prompt.ids, &[5, 17, 30]);
        assert_eq!(
            logits, whole,
            "{name}/{}: chunked prefill differs",
            prompt.name
        );

        if !prompt.greedy.is_empty() {
            let tokens = greedy(
                &model,
                &prompt.ids,
                prompt.greedy.len(),
                &reference.eos_suppressed_in_greedy,
            );
            assert_eq!(
                tokens, prompt.greedy,
                "{name}/{}: greedy continuation",
                prompt.name
            );
        }
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check_model("tiny-llama");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check_model("tiny-llama3-rope");
}

#[test]
fn tiny_qwen2_with_qkv_bias_matches_transformers() {
    check_model("tiny-qwen2");
}

#[test]
fn tiny_qwen3_with_head_norms_matches_transformers() {
    check_model("tiny-qwen3");
}

#[test]
fn model_prep_random_tiny_matches_transformers() {
    check_model_at(
        &test_model_dir("tiny"),
        &fixture_dir("model-prep-tiny"),
        "model-prep-tiny",
    );
}
