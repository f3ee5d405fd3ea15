//! Repetition, presence and frequency penalties, applied to the logits in place.
//!
//! - Repetition penalty (Hugging Face `RepetitionPenaltyLogitsProcessor`, CTRL paper): every
//!   token that occurs in the prompt or the generated text, counted once, has a positive logit
//!   divided by the penalty and a negative one multiplied by it.
//! - Presence / frequency penalties (OpenAI): over generated tokens only,
//!   `logit -= frequency_penalty * count + presence_penalty * (count > 0)`.
//!
//! Repetition first, then presence/frequency, as vLLM orders them.

use super::{SamplingError, SamplingParams};

/// Applies the penalties `params` asks for. `scratch` is reused between calls to avoid an
/// allocation per token; its contents are irrelevant.
pub(super) fn apply(
    params: &SamplingParams,
    logits: &mut [f32],
    previous_tokens: &[u32],
    generated: &[u32],
    scratch: &mut Vec<u32>,
) -> Result<(), SamplingError> {
    let vocab_size = logits.len();
    if params.repetition_penalty != 1.0 {
        let penalty = params.repetition_penalty;
        for_each_distinct(previous_tokens, vocab_size, scratch, |token, _count| {
            let logit = &mut logits[token as usize];
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        })?;
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
        for_each_distinct(generated, vocab_size, scratch, |token, count| {
            logits[token as usize] -= frequency * count as f32 + presence;
        })?;
    }
    Ok(())
}

/// Calls `f(token, count)` once per distinct token, after checking every id fits the vocabulary
/// (an id outside it means the caller mixed up models or tokenizers).
fn for_each_distinct(
    tokens: &[u32],
    vocab_size: usize,
    scratch: &mut Vec<u32>,
    mut f: impl FnMut(u32, usize),
) -> Result<(), SamplingError> {
    if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(SamplingError::TokenOutOfRange { token, vocab_size });
    }
    scratch.clear();
    scratch.extend_from_slice(tokens);
    scratch.sort_unstable();
    for run in scratch.chunk_by(|a, b| a == b) {
        f(run[0], run.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalised(
        params: SamplingParams,
        logits: &[f32],
        previous: &[u32],
        generated: &[u32],
    ) -> Vec<f32> {
        let mut logits = logits.to_vec();
        apply(&params, &mut logits, previous, generated, &mut Vec::new())
            .expect("ids are in range");
        logits
    }

    #[test]
    fn repetition_penalty_counts_each_token_once_and_respects_sign() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 0 appears three times: still divided once.
        let out = penalised(params, &[4.0, -1.0, 3.0, 0.0], &[0, 0, 1, 0], &[]);
        assert_eq!(out, vec![2.0, -2.0, 3.0, 0.0]);
    }

    #[test]
    fn presence_and_frequency_use_generated_counts_only() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        // Token 3 is only in the prompt: untouched. Token 1 generated twice, token 2 once.
        let out = penalised(params, &[1.0; 4], &[3, 1, 1, 2], &[1, 1, 2]);
        assert_eq!(out, vec![1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0]);
    }

    #[test]
    fn out_of_range_token_is_an_error() {
        let params = SamplingParams {
            repetition_penalty: 1.1,
            ..Default::default()
        };
        let err = apply(&params, &mut [0.0; 4], &[1, 9], &[], &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            SamplingError::TokenOutOfRange {
                token: 9,
                vocab_size: 4
            }
        ));
    }
}
