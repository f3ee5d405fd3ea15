//! `/v1/completions` (text completions): request, `text_completion` response and chunks.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::common::{FinishReason, StreamOptions, Usage};
use super::sampling::GenerationFields;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptField>,
    /// OpenAI's default for this endpoint is 16.
    pub max_tokens: Option<i64>,
    #[serde(flatten)]
    pub generation: GenerationFields,
    pub best_of: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Number of alternatives per token (this endpoint's logprobs is a number).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// vLLM's: `json_object` or `json_schema`, as on chat completions.
    pub response_format: Option<super::ResponseFormat>,
}

/// `prompt`: a string, token ids, or a batch of either (only batches of one are served).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenBatches(Vec<Vec<i64>>),
}

/// A `text_completion` object; streamed chunks have the same shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<CompletionChoice>,
    /// Always present on a non-streamed answer; on chunks, as in
    /// [`super::ChatCompletionChunk::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// vLLM's `prompt_logprobs` of the prompt this choice answers, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<super::PromptLogprobs>,
}

/// The legacy logprobs form: parallel lists. With `echo` the prompt's tokens come first, the
/// first of them with `null` logprob and alternatives (nothing precedes it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    pub text_offset: Vec<u32>,
}

/// `{token: logprob, ...}` in rank order (a JSON object whose key order is kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_forms_parse() {
        let parse = |v: serde_json::Value| serde_json::from_value::<PromptField>(v).unwrap();
        assert_eq!(parse(json!("hi")), PromptField::Text("hi".into()));
        assert_eq!(parse(json!([1, 2])), PromptField::Tokens(vec![1, 2]));
        assert_eq!(parse(json!(["a"])), PromptField::Texts(vec!["a".into()]));
        assert_eq!(
            parse(json!([[1], [2]])),
            PromptField::TokenBatches(vec![vec![1], vec![2]])
        );
    }

    /// OpenAI's documented `text_completion` object, with logprobs.
    #[test]
    fn completion_has_openai_shape() {
        let completion = Completion {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 1589478378,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![CompletionChoice {
                text: " a test".into(),
                index: 0,
                logprobs: Some(CompletionLogprobs {
                    tokens: vec![" a".into(), " test".into()],
                    token_logprobs: vec![Some(-0.25), Some(-0.5)],
                    top_logprobs: vec![
                        Some(TopLogprobMap(vec![
                            (" a".into(), -0.25),
                            (" the".into(), -2.0),
                        ])),
                        Some(TopLogprobMap(vec![(" test".into(), -0.5)])),
                    ],
                    text_offset: vec![0, 2],
                }),
                finish_reason: Some(FinishReason::Length),
                prompt_logprobs: None,
            }],
            usage: Some(Some(Usage::new(5, 2))),
        };
        let text = serde_json::to_string(&completion).unwrap();
        assert!(
            text.contains(r#"{" a":-0.25," the":-2.0}"#),
            "rank order kept: {text}"
        );
        assert_eq!(
            serde_json::to_value(&completion).unwrap(),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1589478378, "model": "m",
                "system_fingerprint": null,
                "choices": [{
                    "text": " a test", "index": 0,
                    "logprobs": {"tokens": [" a", " test"], "token_logprobs": [-0.25, -0.5],
                                 "top_logprobs": [{" a": -0.25, " the": -2.0}, {" test": -0.5}],
                                 "text_offset": [0, 2]},
                    "finish_reason": "length"
                }],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0,
                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
            })
        );
    }
}
