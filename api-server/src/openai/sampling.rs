//! The generation parameters the endpoints share, declared once.
//!
//! Each endpoint's request type flattens them (`#[serde(flatten)]`), so a parameter such as
//! `top_p` has one declaration here, one entry in [`crate::fields`]'s tables and one check in
//! `validation/sampling.rs`, whichever endpoint carries it. Flattening accepts no field the
//! request types did not: unknown fields are refused from the body's JSON object before it is
//! read as a request type ([`crate::fields`]).
//!
//! Numbers are wide and signed, as in the request types, so that an out-of-range value is
//! reported by validation with the field's name rather than as a JSON type error.

use serde::Deserialize;

use super::common::StopField;

/// The sampling parameters every endpoint takes (chat, text completions, responses).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

/// What chat and text completions take to generate, beyond the token limit and logprobs (whose
/// names and forms differ between the two): [`SamplingFields`], OpenAI's penalties, seed, stop
/// sequences and choices, and vLLM's extensions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationFields {
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub n: Option<i64>,
    pub stop: Option<StopField>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    /// vLLM's extensions, handy for benchmarks.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    /// Tokens to generate before a stop token or string may end the completion.
    pub min_tokens: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    /// Token ids that end the completion as the model's end of sequence does.
    pub stop_token_ids: Option<Vec<i64>>,
    /// `{"token id": bias}`, token ids as strings (OpenAI's shape).
    pub logit_bias: Option<LogitBiasField>,
    /// vLLM's: isolates the request's prompt in the workers' prefix caches.
    pub cache_salt: Option<String>,
    /// vLLM's constrained decoding: the output matches a JSON schema, a regular expression,
    /// one of a list of strings or a grammar.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's: only these token ids may be generated.
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM's: the id the response carries (`chatcmpl-<id>`, `cmpl-<id>`); the request's
    /// jobs keep an id of tandem's own.
    pub request_id: Option<String>,
    /// vLLM's: words the completion may not contain (each tokenized with and without a
    /// leading space; the last token of each is banned where the others were just generated).
    pub bad_words: Option<Vec<String>>,
    /// vLLM's: the text ends with the stop string that ended it.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's (default true): special tokens write no text.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's: logprobs name tokens `token_id:<id>` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's: only the last this many prompt tokens are used (-1: as many as fit).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's: the logprob and rank of every prompt token, with this many alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's: the request's scheduling priority, lower served first (0 by default).
    pub priority: Option<i64>,
}

/// vLLM's `structured_outputs`: one constraint, and options of its JSON. Fields tandem does
/// not serve are refused by [`crate::fields`]' table for it before this is read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StructuredOutputs {
    /// A JSON schema, or a string holding one.
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A grammar in llguidance's Lark dialect.
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    /// vLLM's structural tag: a string holding its JSON (or the object).
    pub structural_tag: Option<serde_json::Value>,
    pub disable_any_whitespace: Option<bool>,
    pub disable_fallback: Option<bool>,
}

/// `logit_bias`: token ids (as JSON object keys, so strings) to a bias in [-100, 100].
pub type LogitBiasField = serde_json::Map<String, serde_json::Value>;

impl From<SamplingFields> for GenerationFields {
    /// The generation parameters of an endpoint that takes only [`SamplingFields`]: the others
    /// absent, as from a request that did not send them.
    fn from(sampling: SamplingFields) -> Self {
        GenerationFields {
            sampling,
            ..GenerationFields::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattened_fields_read_as_the_request_types_did() {
        let fields: GenerationFields = serde_json::from_value(json!({
            "temperature": 1, "top_p": 0.5, "n": 2, "stop": ["a", "b"], "seed": -3,
            "top_k": null, "logit_bias": {"13": 5.5}, "unknown": true
        }))
        .unwrap();
        assert_eq!(
            fields,
            GenerationFields {
                sampling: SamplingFields {
                    temperature: Some(1.0),
                    top_p: Some(0.5),
                },
                n: Some(2),
                stop: Some(StopField::Many(vec!["a".into(), "b".into()])),
                seed: Some(-3),
                logit_bias: json!({"13": 5.5}).as_object().cloned(),
                ..GenerationFields::default()
            }
        );
    }
}
