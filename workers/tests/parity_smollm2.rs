//! Parity of the CPU model with Hugging Face transformers (float32) on SmolLM2-135M-Instruct:
//! our own `model-prep` import of the GGUF in f32 (`$TANDEM_TEST_MODELS/smollm2-f32`) against
//! logits and greedy continuations transformers computed from the same GGUF
//! (`scripts/fixtures/parity_reference.py smollm2`). Only the reference is committed.

mod parity_support;

use parity_support::*;

const MAX_REL_L2: f64 = 1e-4;

#[test]
fn smollm2_f32_logits_and_greedy_tokens_match_transformers() {
    let reference = read_reference(&fixture_dir("smollm2"));
    let model = load_cpu(&test_model_dir("smollm2-f32"));
    for (prompt, expected) in reference.prompts.iter().zip(&reference.logits) {
        let mut session = Session::new(&model, prompt.ids.len());
        let whole = session.feed(&prompt.ids);
        let err = rel_l2(&whole, expected);
        eprintln!(
            "{}: {} tokens, relative L2 {err:e}",
            prompt.name,
            prompt.ids.len()
        );
        assert!(err < MAX_REL_L2, "{}: relative L2 {err:e}", prompt.name);
        assert_eq!(argmax(&whole), prompt.top_ids[0], "{}", prompt.name);

        // The same prompt with a prefix already cached (chunked prefill across blocks).
        if prompt.ids.len() > 2 * BLOCK_SIZE {
            let mut chunked = Session::new(&model, prompt.ids.len());
            let logits = chunked.prefill_chunked(&prompt.ids, &[BLOCK_SIZE + 3, 11]);
            assert_eq!(logits, whole, "{}: chunked prefill differs", prompt.name);
        }

        if !prompt.greedy.is_empty() {
            let tokens = greedy(
                &model,
                &prompt.ids,
                prompt.greedy.len(),
                &reference.eos_suppressed_in_greedy,
            );
            assert_eq!(tokens, prompt.greedy, "{}: greedy tokens", prompt.name);
        }
    }
}
