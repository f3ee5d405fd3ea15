//! `/v1/chat/completions`: the request, the response (`chat.completion`) and the stream chunk
//! (`chat.completion.chunk`).

use serde::{Deserialize, Serialize};

use super::common::{FinishReason, StreamOptions, Usage};
use super::sampling::GenerationFields;
use super::tools::{RequestToolCall, Tool, ToolCall, ToolCallDelta, ToolChoiceField};

/// The request as clients send it. Numbers are wide and signed so that an out-of-range value is
/// reported by validation with the field's name, rather than as a JSON type error.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are accepted.
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub generation: GenerationFields,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Functions the model may call (`api-server/src/tools/`).
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoiceField>,
    pub parallel_tool_calls: Option<bool>,
    /// OpenAI's deprecated forms of `tools` and `tool_choice`: refused with a 400 that says so.
    pub functions: Option<serde_json::Value>,
    pub function_call: Option<serde_json::Value>,
    pub response_format: Option<ResponseFormat>,
    /// vLLM's: the reply starts with the last message's content when that is an assistant's.
    pub echo: Option<bool>,
    /// OpenAI's Predicted Outputs: `{"type": "content", "content"}`, checked by
    /// `validation::prediction`.
    pub prediction: Option<serde_json::Value>,
    #[serde(flatten)]
    pub template: ChatTemplateFields,
}

/// vLLM's extensions for how messages are rendered through the model's chat template, on
/// `/v1/chat/completions` and `/tokenize`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ChatTemplateFields {
    /// End the prompt with the assistant's header, so that the model answers (default true).
    pub add_generation_prompt: Option<bool>,
    /// Continue the last message (an assistant's) instead of answering it: the prompt ends
    /// inside that message, right after its content (default false).
    pub continue_final_message: Option<bool>,
    /// Further variables for the chat template (`enable_thinking`, ...).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Documents for a retrieval-augmented template (its `documents` variable).
    pub documents: Option<Vec<serde_json::Value>>,
}

/// `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
/// Fields beyond OpenAI's are kept in `other`, so validation can name them in its 400.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub json_schema: Option<JsonSchemaFormat>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// An assistant message's calls (its `content` may then be null).
    pub tool_calls: Option<Vec<RequestToolCall>>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    /// An assistant message's reasoning, as a reply with a reasoning parser gave it (vLLM's
    /// name, and the older `reasoning_content`).
    pub reasoning: Option<String>,
    pub reasoning_content: Option<String>,
}

/// `content`: a string, or a list of typed parts of which only `text` parts are served.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A non-streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's `prompt_logprobs`, when asked for (`routes::logprobs::vllm_prompt_logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// vLLM's prompt logprobs: per prompt token, `null` or `{"<id>": {"logprob", "rank",
/// "decoded_token"}, ...}`.
pub type PromptLogprobs = Vec<Option<serde_json::Map<String, serde_json::Value>>>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
    /// The prompt's logprobs this choice's generation carried, shown once in the response
    /// ([`ChatCompletion::prompt_logprobs`]): every choice has the same prompt.
    #[serde(skip)]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the reply is only tool calls (or, with a reasoning parser, only
    /// reasoning: cut off before its answer).
    pub content: Option<String>,
    /// With a reasoning parser, the thinking the model wrote before its answer (vLLM's
    /// field); absent for a reply that did not reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The same text under its older name (DeepSeek's API, vLLM before 0.11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    pub refusal: Option<String>,
    /// Present only when the model called tools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// `logprobs` of a chat choice or chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
    pub refusal: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

/// One `chat.completion.chunk` of a stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then `null` on every chunk but the last,
    /// which has `choices: []` and the usage (OpenAI's documented behaviour).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Reasoning text of this chunk ([`AssistantMessage::reasoning`]), under both names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl Delta {
    /// A delta with `text` as its reasoning (both names); none when it is empty.
    pub fn reasoning(text: String) -> Delta {
        let text = (!text.is_empty()).then_some(text);
        Delta {
            reasoning_content: text.clone(),
            reasoning: text,
            ..Delta::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::common::StopField;
    use serde_json::json;

    #[test]
    fn request_accepts_string_and_part_contents() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
            ],
            "stop": "\n",
            "stream_options": {"include_usage": true},
            "unknown_field": 1
        }))
        .unwrap();
        let messages = request.messages.unwrap();
        assert_eq!(
            messages[0].content,
            Some(MessageContent::Text("Be brief.".into()))
        );
        assert_eq!(
            messages[1].content,
            Some(MessageContent::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("Hi".into())
            }]))
        );
        assert_eq!(request.generation.stop, Some(StopField::One("\n".into())));
    }

    #[test]
    fn request_reads_response_format_and_logit_bias() {
        let request: ChatCompletionRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "Hi"}],
            "logit_bias": {"50256": -100, "13": 5.5},
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": true, "description": "d",
                "schema": {"type": "object"}, "extra": 1}}
        }))
        .unwrap();
        let bias = request.generation.logit_bias.unwrap();
        assert_eq!(bias["50256"], json!(-100));
        let format = request.response_format.unwrap();
        assert_eq!(format.kind.as_deref(), Some("json_schema"));
        let schema = format.json_schema.unwrap();
        assert_eq!(schema.name.as_deref(), Some("answer"));
        assert_eq!(schema.strict, Some(true));
        assert_eq!(schema.schema, Some(json!({"type": "object"})));
        assert_eq!(schema.other["extra"], json!(1));
    }

    /// OpenAI's documented `chat.completion` object, field for field.
    #[test]
    fn completion_has_openai_shape() {
        let completion = ChatCompletion {
            id: "chatcmpl-123".into(),
            object: "chat.completion",
            created: 1677652288,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: Some("Hello there.".into()),
                    reasoning: None,
                    reasoning_content: None,
                    refusal: None,
                    tool_calls: Vec::new(),
                },
                logprobs: None,
                finish_reason: FinishReason::Stop,
                prompt_logprobs: None,
            }],
            usage: Usage::new(9, 12),
            prompt_logprobs: None,
        };
        assert_eq!(
            serde_json::to_value(&completion).unwrap(),
            json!({
                "id": "chatcmpl-123",
                "object": "chat.completion",
                "created": 1677652288,
                "model": "m",
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there.", "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                          "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0,
                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
            })
        );
    }

    /// OpenAI's documented chunks: the first with the role, usage `null` while
    /// `include_usage` is on, and logprobs in the `content` list form.
    #[test]
    fn chunks_have_openai_shape() {
        let first = ChatCompletionChunk {
            id: "chatcmpl-123".into(),
            object: "chat.completion.chunk",
            created: 1694268190,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Delta::default()
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&first).unwrap(),
            json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                   "model": "m", "system_fingerprint": null,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}]})
        );
        let with_logprobs = ChatCompletionChunk {
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some("Hi".into()),
                    ..Delta::default()
                },
                logprobs: Some(ChatLogprobs {
                    content: vec![TokenLogprob {
                        token: "Hi".into(),
                        logprob: -0.5,
                        bytes: Some(vec![72, 105]),
                        top_logprobs: vec![TopLogprob {
                            token: "Hi".into(),
                            logprob: -0.5,
                            bytes: Some(vec![72, 105]),
                        }],
                    }],
                    refusal: None,
                }),
                finish_reason: None,
            }],
            usage: Some(None),
            ..first.clone()
        };
        assert_eq!(
            serde_json::to_value(&with_logprobs).unwrap(),
            json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                   "model": "m", "system_fingerprint": null,
                   "choices": [{"index": 0, "delta": {"content": "Hi"},
                                "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                    "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}],
                                    "refusal": null},
                                "finish_reason": null}],
                   "usage": null})
        );
        let usage = ChatCompletionChunk {
            choices: vec![],
            usage: Some(Some(Usage::new(3, 4))),
            ..first
        };
        assert_eq!(
            serde_json::to_value(&usage).unwrap(),
            json!({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                   "model": "m", "system_fingerprint": null, "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0,
                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}})
        );
    }
}
