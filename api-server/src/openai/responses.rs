//! `/v1/responses`: the request, the `response` object and the typed stream events.
//!
//! tandem serves the Responses API for text in and text out: a `message` output item with one
//! `output_text` part, and a `function_call` item for each call of a declared function tool;
//! responses kept in the api-server's store are continued by `previous_response_id`
//! (`crate::response_store`). The shapes follow OpenAI's reference field for field, with the
//! fields a text server has no use for set to what they mean here (no reasoning, one service
//! tier), so the official SDKs and the Agents SDK read them unchanged.
//! `output_text` is not sent: like OpenAI, the SDKs compute it from `output`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chat::TokenLogprob;
use super::sampling::SamplingFields;

/// The request as clients send it. Input items, tools and the like stay JSON values here:
/// validation walks them to name the exact part it refuses (`input[2].content[0].type`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    pub input: Option<ResponseInput>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub stream: Option<bool>,
    pub stream_options: Option<ResponsesStreamOptions>,
    pub text: Option<TextConfig>,
    pub top_logprobs: Option<i64>,
    pub include: Option<Vec<String>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_tool_calls: Option<i64>,
    pub reasoning: Option<ReasoningConfig>,
    pub truncation: Option<String>,
    pub previous_response_id: Option<String>,
    pub conversation: Option<Value>,
    pub metadata: Option<BTreeMap<String, Value>>,
    pub user: Option<String>,
    pub store: Option<bool>,
    /// Run the response after answering: the client polls it (`GET /v1/responses/{id}`) and
    /// may cancel it.
    pub background: Option<bool>,
    pub service_tier: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    /// vLLM's: isolates the request's prompt in the workers' prefix caches.
    pub cache_salt: Option<String>,
    /// vLLM's: the request's scheduling priority, lower served first (0 by default).
    pub priority: Option<i64>,
}

/// `input`: a string (one user message) or a list of input items.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ResponseInput {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ResponsesStreamOptions {
    /// OpenAI pads deltas against side channels; tandem sends no padding, so either value
    /// gets the same stream.
    pub include_obfuscation: Option<bool>,
}

/// `text`: the output's format, and a verbosity that only some OpenAI models have.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TextFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbosity: Option<String>,
}

/// `text.format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

/// `reasoning`, which only reasoning models serve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasoningConfig {
    pub effort: Option<String>,
    pub summary: Option<String>,
    /// Deprecated name of `summary`.
    #[serde(default, skip_serializing)]
    pub generate_summary: Option<String>,
}

/// `status` of a response and of an output item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    /// A background response not started yet (as created).
    Queued,
    InProgress,
    Completed,
    Incomplete,
    Failed,
    /// A background response cancelled before it finished.
    Cancelled,
}

/// A `response` object, as answered and as carried by the stream's lifecycle events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    pub status: ResponseStatus,
    pub completed_at: Option<u64>,
    pub background: bool,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub max_tool_calls: Option<i64>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    /// The conversation the response's items were added to (`conversation`); absent when it
    /// named none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationRef>,
    pub prompt_cache_key: Option<String>,
    pub reasoning: ReasoningConfig,
    pub safety_identifier: Option<String>,
    pub service_tier: &'static str,
    pub store: bool,
    pub temperature: f32,
    pub text: TextConfig,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub top_logprobs: u32,
    pub top_p: f32,
    pub truncation: &'static str,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// `conversation` of a response object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversationRef {
    pub id: String,
}

/// `error` of a failed response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseError {
    pub code: &'static str,
    pub message: String,
}

/// `incomplete_details`: why generation stopped early (`max_output_tokens`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncompleteDetails {
    pub reason: &'static str,
}

/// An item of a response's `output`: the assistant's message, or a call of a function tool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OutputItem {
    Reasoning(ReasoningItem),
    Message(OutputMessage),
    FunctionCall(FunctionCallItem),
}

impl OutputItem {
    pub fn id(&self) -> &str {
        match self {
            OutputItem::Reasoning(reasoning) => &reasoning.id,
            OutputItem::Message(message) => &message.id,
            OutputItem::FunctionCall(call) => &call.id,
        }
    }
}

/// A `reasoning` output item (with `--reasoning-parser`): the thinking a reasoning model
/// wrote before its answer, whole, as `reasoning_text` content (the form OpenAI's
/// open-weight models' items take); no summary, never encrypted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasoningItem {
    /// The item's id (`rs_...`).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: ResponseStatus,
    /// Always empty: tandem writes no summaries.
    pub summary: Vec<Value>,
    pub content: Vec<ReasoningText>,
    /// Always null: the text is in `content`.
    pub encrypted_content: Option<String>,
}

/// A `reasoning_text` content part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasoningText {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
}

impl ReasoningItem {
    pub fn new(id: String, status: ResponseStatus, text: String) -> Self {
        ReasoningItem {
            id,
            kind: "reasoning",
            status,
            summary: Vec::new(),
            content: vec![ReasoningText {
                kind: "reasoning_text",
                text,
            }],
            encrypted_content: None,
        }
    }
}

/// A `function_call` output item: the model calls a declared function tool; the client runs
/// it and sends the result back as a `function_call_output` input item with the same
/// `call_id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCallItem {
    /// The item's id (`fc_...`).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: ResponseStatus,
    /// The call's id (`call_...`), which its output names.
    pub call_id: String,
    pub name: String,
    /// The arguments' JSON text, as the model wrote it.
    pub arguments: String,
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputMessage {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: ResponseStatus,
    pub role: &'static str,
    pub content: Vec<OutputText>,
}

/// An `output_text` content part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    /// Always empty: tandem cites nothing.
    pub annotations: Vec<Value>,
    /// The tokens' logprobs when `include` asked for `message.output_text.logprobs`.
    pub logprobs: Vec<TokenLogprob>,
}

impl OutputText {
    pub fn new(text: String, logprobs: Vec<TokenLogprob>) -> Self {
        OutputText {
            kind: "output_text",
            text,
            annotations: Vec::new(),
            logprobs,
        }
    }
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u32,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u32,
}

/// Tokens taken from a worker's prefix cache, and written to OpenAI's prompt cache (always 0
/// here: tandem's cache needs no writes paid for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InputTokensDetails {
    pub cached_tokens: u32,
    pub cache_write_tokens: u32,
}

/// Reasoning tokens: the reply's tokens up to the end of its thinking, with a reasoning
/// parser (0 otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u32,
}

impl From<tandem_protocol::messages::Usage> for ResponseUsage {
    fn from(usage: tandem_protocol::messages::Usage) -> Self {
        ResponseUsage {
            input_tokens_details: InputTokensDetails {
                cached_tokens: usage.cached_tokens,
                cache_write_tokens: 0,
            },
            ..ResponseUsage::new(usage.prompt_tokens, usage.completion_tokens)
        }
    }
}

impl ResponseUsage {
    pub fn new(input_tokens: u32, output_tokens: u32) -> Self {
        ResponseUsage {
            input_tokens,
            input_tokens_details: InputTokensDetails::default(),
            output_tokens,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: input_tokens + output_tokens,
        }
    }
}

/// One event of a streamed response: `{"type": ..., "sequence_number": n, ...}`, sent as
/// `event: <type>` and `data: <json>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamEvent {
    #[serde(flatten)]
    pub event: ResponseEvent,
    /// 0, 1, 2, ... in the order the events are sent.
    pub sequence_number: u64,
}

/// The events tandem sends, in the order it sends them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum ResponseEvent {
    #[serde(rename = "response.created")]
    Created { response: ResponseObject },
    #[serde(rename = "response.in_progress")]
    InProgress { response: ResponseObject },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded { output_index: u32, item: OutputItem },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: OutputText,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
        logprobs: Vec<TokenLogprob>,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        item_id: String,
        output_index: u32,
        content_index: u32,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: OutputText,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone { output_index: u32, item: OutputItem },
    /// More of a reasoning item's text.
    #[serde(rename = "response.reasoning_text.delta")]
    ReasoningTextDelta {
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
    },
    /// A reasoning item's whole text, once written.
    #[serde(rename = "response.reasoning_text.done")]
    ReasoningTextDone {
        item_id: String,
        output_index: u32,
        content_index: u32,
        text: String,
    },
    /// More of a function call's arguments.
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta {
        item_id: String,
        output_index: u32,
        delta: String,
    },
    /// A function call's whole arguments, once written.
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCallArgumentsDone {
        item_id: String,
        output_index: u32,
        arguments: String,
    },
    /// The last event of a response that finished.
    #[serde(rename = "response.completed")]
    Completed { response: ResponseObject },
    /// The last event of a response cut short by `max_output_tokens` (or the context).
    #[serde(rename = "response.incomplete")]
    Incomplete { response: ResponseObject },
    /// The last event of a response that failed mid-way (the worker died, a timeout).
    #[serde(rename = "response.failed")]
    Failed { response: ResponseObject },
}

impl ResponseEvent {
    /// The `type` string, for the SSE `event:` line.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseEvent::Created { .. } => "response.created",
            ResponseEvent::InProgress { .. } => "response.in_progress",
            ResponseEvent::OutputItemAdded { .. } => "response.output_item.added",
            ResponseEvent::ContentPartAdded { .. } => "response.content_part.added",
            ResponseEvent::OutputTextDelta { .. } => "response.output_text.delta",
            ResponseEvent::OutputTextDone { .. } => "response.output_text.done",
            ResponseEvent::ContentPartDone { .. } => "response.content_part.done",
            ResponseEvent::OutputItemDone { .. } => "response.output_item.done",
            ResponseEvent::ReasoningTextDelta { .. } => "response.reasoning_text.delta",
            ResponseEvent::ReasoningTextDone { .. } => "response.reasoning_text.done",
            ResponseEvent::FunctionCallArgumentsDelta { .. } => {
                "response.function_call_arguments.delta"
            }
            ResponseEvent::FunctionCallArgumentsDone { .. } => {
                "response.function_call_arguments.done"
            }
            ResponseEvent::Completed { .. } => "response.completed",
            ResponseEvent::Incomplete { .. } => "response.incomplete",
            ResponseEvent::Failed { .. } => "response.failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(status: ResponseStatus, text: &str) -> ResponseObject {
        ResponseObject {
            id: "resp_1".into(),
            object: "response",
            created_at: 1741476542,
            status,
            completed_at: Some(1741476543),
            background: false,
            error: None,
            incomplete_details: None,
            instructions: Some("Be brief.".into()),
            max_output_tokens: Some(16),
            max_tool_calls: None,
            model: "m".into(),
            output: vec![OutputItem::Message(OutputMessage {
                id: "msg_1".into(),
                kind: "message",
                status,
                role: "assistant",
                content: vec![OutputText::new(text.into(), vec![])],
            })],
            parallel_tool_calls: true,
            previous_response_id: None,
            conversation: None,
            prompt_cache_key: None,
            reasoning: ReasoningConfig::default(),
            safety_identifier: None,
            service_tier: "default",
            store: false,
            temperature: 1.0,
            text: TextConfig {
                format: Some(TextFormat::Text),
                verbosity: None,
            },
            tool_choice: json!("auto"),
            tools: vec![],
            top_logprobs: 0,
            top_p: 1.0,
            truncation: "disabled",
            usage: Some(ResponseUsage::new(9, 3)),
            user: None,
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        }
    }

    /// OpenAI's documented `response` object, field for field.
    #[test]
    fn response_has_openai_shape() {
        assert_eq!(
            serde_json::to_value(response(ResponseStatus::Completed, "Hi.")).unwrap(),
            json!({
                "id": "resp_1", "object": "response", "created_at": 1741476542,
                "status": "completed", "completed_at": 1741476543, "background": false,
                "error": null, "incomplete_details": null, "instructions": "Be brief.",
                "max_output_tokens": 16, "max_tool_calls": null, "model": "m",
                "output": [{"id": "msg_1", "type": "message", "status": "completed",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi.",
                                         "annotations": [], "logprobs": []}]}],
                "parallel_tool_calls": true, "previous_response_id": null,
                "prompt_cache_key": null,
                "reasoning": {"effort": null, "summary": null}, "safety_identifier": null,
                "service_tier": "default", "store": false, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled",
                "usage": {"input_tokens": 9,
                          "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                          "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": 12},
                "user": null, "metadata": {"k": "v"}
            })
        );
    }

    /// The typed events: `type` and `sequence_number` beside the event's own fields.
    #[test]
    fn stream_events_have_openai_shape() {
        let delta = StreamEvent {
            event: ResponseEvent::OutputTextDelta {
                item_id: "msg_1".into(),
                output_index: 0,
                content_index: 0,
                delta: "Hi".into(),
                logprobs: vec![],
            },
            sequence_number: 4,
        };
        assert_eq!(delta.event.kind(), "response.output_text.delta");
        assert_eq!(
            serde_json::to_value(&delta).unwrap(),
            json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                   "content_index": 0, "delta": "Hi", "logprobs": [], "sequence_number": 4})
        );
        let part = StreamEvent {
            event: ResponseEvent::ContentPartAdded {
                item_id: "msg_1".into(),
                output_index: 0,
                content_index: 0,
                part: OutputText::new(String::new(), vec![]),
            },
            sequence_number: 3,
        };
        assert_eq!(
            serde_json::to_value(&part).unwrap(),
            json!({"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0,
                   "content_index": 0, "sequence_number": 3,
                   "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        );
        let mut failed = response(ResponseStatus::Failed, "");
        failed.error = Some(ResponseError {
            code: "server_error",
            message: "The worker serving this request stopped before finishing it.".into(),
        });
        let value = serde_json::to_value(StreamEvent {
            event: ResponseEvent::Failed { response: failed },
            sequence_number: 9,
        })
        .unwrap();
        assert_eq!(value["type"], "response.failed");
        assert_eq!(value["response"]["status"], "failed");
        assert_eq!(value["response"]["error"]["code"], "server_error");
    }

    #[test]
    fn request_forms_parse() {
        let request: ResponsesRequest = serde_json::from_value(json!({
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"},
                                "strict": true}},
            "reasoning": {"effort": null}
        }))
        .unwrap();
        assert!(matches!(request.input, Some(ResponseInput::Items(ref items)) if items.len() == 1));
        assert!(matches!(
            request.text.unwrap().format,
            Some(TextFormat::JsonSchema {
                strict: Some(true),
                ..
            })
        ));
        let request: ResponsesRequest =
            serde_json::from_value(json!({"input": "Hi", "text": {"format": {"type": "text"}}}))
                .unwrap();
        assert_eq!(request.input, Some(ResponseInput::Text("Hi".into())));
    }
}
