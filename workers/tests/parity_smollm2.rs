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

/// The GGUF's Q4_1/Q8_0 blocks kept quantized (`model-prep default --keep-quant`,
/// `$TANDEM_TEST_MODELS/smollm2-q4_1`): the same weights as the f32 import, with activations
/// rounded to 8-bit blocks before each product, against the same transformers reference.
/// Measured on this model: relative L2 of the last position's logits 2e-2 to 7.2e-2 (bf16 weights: 3e-3 to 2e-2), bound 1e-1,
/// the top token and greedy continuations the reference's except at near ties (two logits
/// within 0.5: the first token of `chat_france`, measured 25.24 against 25.33).
#[test]
fn smollm2_kept_quantized_logits_stay_close_to_the_dequantized_model() {
    const MAX_QUANT_REL_L2: f64 = 1e-1;
    let reference = read_reference(&fixture_dir("smollm2"));
    let model = load_cpu(&test_model_dir("smollm2-q4_1"));
    let bf16 = load_cpu(&test_model_dir("smollm2-bf16"));
    assert_eq!(
        model.gguf_quant(),
        Some(tandem_workers::backend::GgufQuant::Q4_1)
    );
    for (prompt, expected) in reference.prompts.iter().zip(&reference.logits) {
        let mut session = Session::new(&model, prompt.ids.len());
        let whole = session.feed(&prompt.ids);
        let err = rel_l2(&whole, expected);
        let bf16_err = rel_l2(
            &Session::new(&bf16, prompt.ids.len()).feed(&prompt.ids),
            expected,
        );
        eprintln!(
            "{}: {} tokens, relative L2 {err:e} (quantized), {bf16_err:e} (bf16 weights)",
            prompt.name,
            prompt.ids.len()
        );
        assert!(
            err < MAX_QUANT_REL_L2,
            "{}: relative L2 {err:e}",
            prompt.name
        );
        // The top token is the reference's, or one the reference ranks within 0.5 of its top
        // logit (a near tie the activations' rounding may flip).
        let top = argmax(&whole) as usize;
        let best = expected[prompt.top_ids[0] as usize];
        eprintln!(
            "{}: top token {top} (reference logit {} vs the reference's top {best})",
            prompt.name, expected[top]
        );
        assert!(
            best - expected[top] < 0.5,
            "{}: top token {top}, reference logit {} vs {best}",
            prompt.name,
            expected[top]
        );

        // Batch invariance holds for the quantized kernels too: chunked prefill is bitwise
        // the whole prompt's.
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
            let same = tokens
                .iter()
                .zip(&prompt.greedy)
                .take_while(|(a, b)| a == b)
                .count();
            eprintln!(
                "{}: greedy agrees for {same} of {} tokens",
                prompt.name,
                prompt.greedy.len()
            );
            // Where the continuation parts from the reference's, it parts at a near tie of
            // this model's own logits after the reference's tokens so far.
            if same < prompt.greedy.len() {
                let mut context = prompt.ids.clone();
                context.extend(&prompt.greedy[..same]);
                let logits = Session::new(&model, context.len()).feed(&context);
                let (ours, theirs) = (tokens[same] as usize, prompt.greedy[same] as usize);
                eprintln!(
                    "{}: at token {same}: ours {ours} ({}), the reference's {theirs} ({})",
                    prompt.name, logits[ours], logits[theirs]
                );
                assert!(
                    logits[ours] - logits[theirs] < 0.5,
                    "{}: greedy parts at token {same} without a near tie",
                    prompt.name
                );
            }
        }
    }
}
