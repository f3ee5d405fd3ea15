//! `POST /v1/embeddings`: the request checked into its inputs and how each vector is written.

use super::sampling::{priority, prompt_truncation};
use super::{ModelLimits, PromptInput, PromptTruncation, check_model, vocabulary_ids};
use crate::error::ApiError;
use crate::openai::{EmbeddingRequest, PromptField};
use crate::pooling::EmbeddingConfig;

/// Most inputs one request may embed (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// How each vector goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// A list of numbers.
    Float,
    /// The little-endian f32 bytes, base64 (what the official clients ask by default).
    Base64,
}

/// An embeddings request with every value decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEmbeddings {
    pub inputs: Vec<PromptInput>,
    pub encoding: EncodingFormat,
    /// The first this many components (the model's `hidden_size` when not asked).
    pub dimensions: usize,
    /// L2-normalize each vector (after cutting it to `dimensions`).
    pub normalize: bool,
    pub truncate_prompt: Option<PromptTruncation>,
    pub priority: i32,
    /// The LoRA adapter `model` names (`None`: the served model).
    pub lora: Option<String>,
}

impl ValidEmbeddings {
    /// Cuts a tokenized input to `truncate_prompt_tokens` (its last tokens: the last one is
    /// the one pooled), then checks it against the context: empty, or longer than the context,
    /// is a 400 naming `input` (`input[i]` in a batch).
    pub fn fit_input(
        &self,
        index: usize,
        ids: &mut Vec<u32>,
        limits: &ModelLimits,
    ) -> Result<(), ApiError> {
        let context = limits.max_model_len as usize;
        let keep = match self.truncate_prompt {
            None => None,
            Some(PromptTruncation::Last(n)) => Some(n as usize),
            Some(PromptTruncation::ToFit) => Some(context),
        };
        if let Some(keep) = keep
            && ids.len() > keep
        {
            ids.drain(..ids.len() - keep);
        }
        let param = self.input_param(index);
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "the input is empty: each input needs at least one token",
                &param,
            ));
        }
        if ids.len() > context {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "This model's maximum context length is {context} tokens. However, you \
                     requested {} tokens in the input. Please reduce the length of the input \
                     (or send truncate_prompt_tokens).",
                    ids.len()
                ),
                param: Some(param),
                code: Some("context_length_exceeded"),
            });
        }
        Ok(())
    }

    /// The field an input's 400 names: `input`, or `input[i]` in a batch.
    pub fn input_param(&self, index: usize) -> String {
        if self.inputs.len() == 1 {
            "input".to_string()
        } else {
            format!("input[{index}]")
        }
    }

    /// The vector the client gets from the worker's hidden state: cut to `dimensions`, then
    /// normalized where the model normalizes.
    pub fn finish(&self, mut hidden: Vec<f32>) -> Vec<f32> {
        hidden.truncate(self.dimensions);
        if self.normalize {
            let norm = hidden
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                for x in &mut hidden {
                    *x = (f64::from(*x) / norm) as f32;
                }
            }
        }
        hidden
    }
}

/// Checks an embeddings request against the model and how it is pooled.
pub fn validate_embeddings(
    request: &EmbeddingRequest,
    limits: &ModelLimits,
    pooling: &EmbeddingConfig,
) -> Result<ValidEmbeddings, ApiError> {
    let lora = check_model(&request.model, limits)?;
    if let Some(why) = &pooling.not_served {
        return Err(ApiError::InvalidRequest {
            message: format!("embeddings of this model are not served: {why}"),
            param: Some("model".to_string()),
            code: None,
        });
    }
    let token_ids = |ids: &[i64], param: String| vocabulary_ids(ids, limits, |_| param.clone());
    let inputs = match &request.input {
        None => return Err(ApiError::invalid("input is required", "input")),
        Some(PromptField::Text(text)) => vec![PromptInput::Text(text.clone())],
        // `[]` reads as an empty token list: no input at all.
        Some(PromptField::Tokens(ids)) if ids.is_empty() => Vec::new(),
        Some(PromptField::Tokens(ids)) => {
            vec![PromptInput::Tokens(token_ids(ids, "input".into())?)]
        }
        Some(PromptField::Texts(texts)) => texts.iter().cloned().map(PromptInput::Text).collect(),
        Some(PromptField::TokenBatches(batches)) => batches
            .iter()
            .enumerate()
            .map(|(i, ids)| token_ids(ids, format!("input[{i}]")).map(PromptInput::Tokens))
            .collect::<Result<_, _>>()?,
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid(
            "input must not be an empty list",
            "input",
        ));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid(
            format!(
                "{} inputs in one request: at most {MAX_EMBEDDING_INPUTS}",
                inputs.len()
            ),
            "input",
        ));
    }
    let encoding = match request.encoding_format.as_deref() {
        None | Some("float") => EncodingFormat::Float,
        Some("base64") => EncodingFormat::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
                "encoding_format",
            ));
        }
    };
    let hidden = pooling.hidden_size as i64;
    let dimensions = match request.dimensions {
        None => hidden as usize,
        Some(d) if (1..=hidden).contains(&d) => d as usize,
        Some(d) => {
            return Err(ApiError::invalid(
                format!("dimensions must be from 1 to the model's {hidden}, got {d}"),
                "dimensions",
            ));
        }
    };
    let truncate_prompt = prompt_truncation(request.truncate_prompt_tokens)?;
    Ok(ValidEmbeddings {
        inputs,
        encoding,
        dimensions,
        normalize: pooling.normalize,
        truncate_prompt,
        priority: priority(request.priority)?,
        lora,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::SamplingDefaults;

    fn limits() -> ModelLimits {
        ModelLimits {
            adapters: Default::default(),
            served_model_name: "m".into(),
            max_model_len: 8,
            vocab_size: 100,
            tool_support: None,
            sampling_defaults: SamplingDefaults::default(),
            reasoning_parser: Default::default(),
        }
    }

    fn pooling() -> EmbeddingConfig {
        EmbeddingConfig {
            hidden_size: 4,
            normalize: true,
            not_served: None,
        }
    }

    fn request(json: serde_json::Value) -> EmbeddingRequest {
        serde_json::from_value(json).unwrap()
    }

    fn refused(json: serde_json::Value) -> (String, Option<String>) {
        match validate_embeddings(&request(json), &limits(), &pooling()) {
            Err(ApiError::InvalidRequest { message, param, .. }) => (message, param),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn inputs_of_every_shape_are_read() {
        let valid = validate_embeddings(
            &request(serde_json::json!({"input": "hi"})),
            &limits(),
            &pooling(),
        )
        .unwrap();
        assert_eq!(valid.inputs, vec![PromptInput::Text("hi".into())]);
        assert_eq!(valid.encoding, EncodingFormat::Float);
        assert_eq!(valid.dimensions, 4);
        let valid = validate_embeddings(
            &request(
                serde_json::json!({"input": [[1, 2], [3]], "encoding_format": "base64",
                "dimensions": 2}),
            ),
            &limits(),
            &pooling(),
        )
        .unwrap();
        assert_eq!(
            valid.inputs,
            vec![
                PromptInput::Tokens(vec![1, 2]),
                PromptInput::Tokens(vec![3])
            ]
        );
        assert_eq!(valid.encoding, EncodingFormat::Base64);
        assert_eq!(valid.dimensions, 2);
    }

    #[test]
    fn bad_values_are_refused_naming_their_field() {
        for (json, field) in [
            (serde_json::json!({}), "input"),
            (serde_json::json!({"input": []}), "input"),
            (serde_json::json!({"input": [[1], [100]]}), "input[1]"),
            (
                serde_json::json!({"input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (
                serde_json::json!({"input": "a", "dimensions": 5}),
                "dimensions",
            ),
            (
                serde_json::json!({"input": "a", "dimensions": 0}),
                "dimensions",
            ),
            (
                serde_json::json!({"input": "a", "truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
            ),
            (
                serde_json::json!({"input": "a", "priority": 1u64 << 40}),
                "priority",
            ),
        ] {
            let (message, param) = refused(json.clone());
            assert_eq!(param.as_deref(), Some(field), "{json}: {message}");
        }
        let many: Vec<String> = (0..=MAX_EMBEDDING_INPUTS).map(|i| i.to_string()).collect();
        assert_eq!(
            refused(serde_json::json!({"input": many})).1.as_deref(),
            Some("input")
        );
        let not_served = EmbeddingConfig {
            not_served: Some("mean pooling".into()),
            ..pooling()
        };
        let err = validate_embeddings(
            &request(serde_json::json!({"input": "a"})),
            &limits(),
            &not_served,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mean pooling"), "{err}");
    }

    #[test]
    fn inputs_are_cut_from_the_left_and_checked_against_the_context() {
        let mut valid = validate_embeddings(
            &request(serde_json::json!({"input": ["a", "b"]})),
            &limits(),
            &pooling(),
        )
        .unwrap();
        let mut long: Vec<u32> = (0..9).collect();
        let err = valid.fit_input(1, &mut long, &limits()).unwrap_err();
        assert!(
            matches!(err, ApiError::InvalidRequest { param: Some(ref p), code: Some("context_length_exceeded"), .. } if p == "input[1]")
        );
        assert!(valid.fit_input(0, &mut Vec::new(), &limits()).is_err());
        valid.truncate_prompt = Some(PromptTruncation::Last(3));
        valid.fit_input(0, &mut long, &limits()).unwrap();
        assert_eq!(long, vec![6, 7, 8]);
        valid.truncate_prompt = Some(PromptTruncation::ToFit);
        let mut long: Vec<u32> = (0..9).collect();
        valid.fit_input(0, &mut long, &limits()).unwrap();
        assert_eq!(long.len(), 8);
    }

    #[test]
    fn vectors_are_cut_then_normalized() {
        let mut valid = validate_embeddings(
            &request(serde_json::json!({"input": "a", "dimensions": 2})),
            &limits(),
            &pooling(),
        )
        .unwrap();
        assert_eq!(valid.finish(vec![3.0, 4.0, 100.0, 1.0]), vec![0.6, 0.8]);
        valid.normalize = false;
        assert_eq!(valid.finish(vec![3.0, 4.0, 100.0, 1.0]), vec![3.0, 4.0]);
    }
}
