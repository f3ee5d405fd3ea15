//! The sampling settings of one request, validated once when the sampler is built.

use serde::{Deserialize, Serialize};

use super::SamplingError;

/// Sampling settings of one request. The api-server maps OpenAI fields onto these; inside the
/// engine they are trusted after [`SamplingParams::validate`].
///
/// Neutral values disable a stage: `temperature == 0` is greedy (every other knob but the
/// penalties and `logprobs` is then ignored), `top_k: None`, `top_p == 1`, `min_p == 0`,
/// `repetition_penalty == 1`, `presence_penalty == frequency_penalty == 0`.
///
/// Missing fields deserialize to their [`Default`] (OpenAI's defaults), so a message that
/// names only what it changes stays short.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` selects greedy decoding (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`k >= 1`); `None` keeps them all.
    pub top_k: Option<u32>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p` (in `(0, 1]`; `1` disables).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's (`[0, 1]`; `0`
    /// disables).
    pub min_p: f32,
    /// Seed of the per-request random stream; `None` draws one from OS entropy (see
    /// [`super::Sampler::seed`] to carry it to another worker).
    pub seed: Option<u64>,
    /// Hugging Face's repetition penalty over prompt and generated tokens (`> 0`; `1` disables).
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty over generated tokens (usually `[-2, 2]`).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty over generated tokens (usually `[-2, 2]`).
    pub frequency_penalty: f32,
    /// When `Some(n)`, report the `n` most likely alternatives with each sampled token (the
    /// sampled token's own log-probability is always reported).
    pub logprobs: Option<u32>,
    /// OpenAI's `logit_bias`: `(token id, bias)` added to the raw logits before anything
    /// else (penalties, temperature, truncation, logprobs). -100 bans a token in practice,
    /// +100 forces it.
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`: when not empty, every other token's logit is `-inf` (after
    /// `logit_bias`), so only these can be drawn or reported.
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words` as token sequences: a word's last token gets logit `-inf` wherever
    /// the generated tokens end with the tokens before it (a one-token word: always). The
    /// prompt does not count, as in vLLM: a word is banned from what the model writes.
    pub bad_words: Vec<Vec<u32>>,
    /// vLLM's `min_tokens`: while fewer tokens than this have been generated, the sequence's
    /// stop tokens (given by the engine, [`super::Sampler::set_stop_tokens`]) cannot be drawn:
    /// their logits are `-inf`, unless no other token could be drawn at all.
    pub min_tokens: u32,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, no truncation, no penalties, no seed.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The number of tokens top-k keeps from a vocabulary of `vocab_size` (all when unset).
    pub fn top_k_of(&self, vocab_size: usize) -> usize {
        self.top_k
            .map_or(vocab_size, |k| k as usize)
            .min(vocab_size)
    }

    /// Whether any of the three penalties changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Checks every value is in its range, naming the first one that is not.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let invalid =
            |name: &'static str, reason: String| Err(SamplingError::InvalidParam { name, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(
                "temperature",
                format!("{} is not a finite value >= 0", self.temperature),
            );
        }
        if self.top_k == Some(0) {
            return invalid(
                "top_k",
                "0 would keep no token; use None to keep all".into(),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!("{} is not a finite value > 0", self.repetition_penalty),
            );
        }
        if !self.presence_penalty.is_finite() {
            return invalid(
                "presence_penalty",
                format!("{} is not finite", self.presence_penalty),
            );
        }
        if !self.frequency_penalty.is_finite() {
            return invalid(
                "frequency_penalty",
                format!("{} is not finite", self.frequency_penalty),
            );
        }
        if let Some((token, bias)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return invalid(
                "logit_bias",
                format!("the bias of token {token} is {bias}, not finite"),
            );
        }
        if let Some(i) = self.bad_words.iter().position(Vec::is_empty) {
            return invalid("bad_words", format!("word {i} has no tokens"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_defaults() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "seed": 7}"#).expect("valid JSON");
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.5,
                seed: Some(7),
                ..Default::default()
            }
        );
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let cases: [(&str, SamplingParams); 7] = [
            (
                "temperature",
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "top_k",
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
        ];
        for (field, params) in cases {
            match params.validate() {
                Err(SamplingError::InvalidParam { name, .. }) => assert_eq!(name, field),
                other => panic!("{field}: expected InvalidParam, got {other:?}"),
            }
        }
    }
}
