//! Loose OpenAI requests in, validated requests with concrete values out.
//!
//! Every check that needs only the request (ranges, `n`, stop list, model name) happens here,
//! once; [`ValidRequest::stop_spec`] adds the one that needs the tokenized prompt (context
//! length). Defaults follow OpenAI and vLLM: chat requests without a token limit may fill the
//! context, text completions default to 16 tokens, a missing `model` means the served one.

pub mod chat_rendering;
pub mod embeddings;
pub mod prediction;
pub mod responses;
pub mod sampling;
pub mod structural_tag;
pub mod structured_outputs;
pub mod tokenize;

use tandem_protocol::messages::{GrammarSpec, SamplingSpec, StopSpec};

use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationFields, MessageContent,
    PromptField, ResponseFormat, StreamOptions,
};
use crate::tools::{ToolCallRecord, ToolRequest, ToolSupport};
pub use chat_rendering::ChatRendering;
use sampling::validate_generation;
pub use sampling::{
    MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_N, MAX_STOP_BYTES, MAX_STOP_SEQUENCES,
    SamplingDefaults,
};
pub use sampling::{OutputOptions, PromptTruncation};

pub const MAX_TOP_LOGPROBS: i64 = 20;
/// The param a `json_schema` response format's schema is named by in errors (the worker's
/// grammar compile, checked in the route, uses it too).
pub const JSON_SCHEMA_PARAM: &str = "response_format.json_schema.schema";
/// OpenAI's default `max_tokens` for `/v1/completions`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// What validation needs to know about the served model.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub served_model_name: String,
    /// Prompt plus completion tokens at most (the model's `max_context`: `max_position_embeddings`,
    /// capped at an attention window in use).
    pub max_model_len: u32,
    pub vocab_size: u32,
    /// How tool calls are rendered and parsed for this model; `None`: tool calling is off
    /// (`--tool-call-parser none`, or a model without a chat template).
    pub tool_support: Option<ToolSupport>,
    /// What requests that omit sampling fields get (the model's `generation_config.json`).
    pub sampling_defaults: SamplingDefaults,
    /// Which reasoning markup chat replies are split by (`--reasoning-parser`).
    pub reasoning_parser: tandem_protocol::config::ReasoningParser,
    /// The LoRA adapters live workers serve: names a request's `model` may give besides
    /// `served_model_name`.
    pub adapters: crate::lora::ServedAdapters,
}

/// A chat role we serve. `developer` (OpenAI's newer name for system) maps to system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering an assistant's call.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: String,
    /// An assistant turn's tool calls (its content may then be empty).
    pub tool_calls: Vec<ToolCallRecord>,
    /// A tool turn: the id of the call it answers.
    pub tool_call_id: Option<String>,
    /// A tool turn: the function that was called (the message's `name`, else the name of the
    /// call with `tool_call_id`).
    pub name: Option<String>,
    /// An assistant turn's reasoning, sent back as a reply gave it (`reasoning` or
    /// `reasoning_content`): given to the chat template as `reasoning_content`, which
    /// reasoning models' templates read (Qwen3's keeps the last turns' thinking).
    pub reasoning: Option<String>,
}

impl Turn {
    /// A turn of plain text.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Turn {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            reasoning: None,
        }
    }
}

/// The prompt before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Goes through the model's chat template.
    Chat(Vec<Turn>),
    /// Tokenized as is (with the tokenizer's own special-token handling).
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    /// `choices[].logprobs.content[]` objects.
    Chat,
    /// Parallel lists (`tokens`, `token_logprobs`, ...).
    Completion,
}

/// A request with every value decided except what depends on the prompt's length.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: PromptInput,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<u32>,
    pub sampling: SamplingSpec,
    pub stop_strings: Vec<String>,
    /// Ids that end the completion as the model's end of sequence does (vLLM's
    /// `stop_token_ids`; they stop it with `ignore_eos` too).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: no stop token or string ends the completion before it has this
    /// many tokens (at most the token limit).
    pub min_tokens: u32,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `stream_options.continuous_usage_stats`: every chunk carries the usage so far.
    pub continuous_usage: bool,
    /// Alternatives per token when logprobs were asked for (0 = only the chosen token's).
    pub logprobs: Option<u32>,
    pub logprobs_format: LogprobsFormat,
    /// The request field that holds the prompt (`messages`, `prompt`, `input`), for errors
    /// about it.
    pub prompt_param: &'static str,
    /// Choices to generate (`n`), 1 to [`MAX_N`].
    pub n: u32,
    /// A chat request's tools (`None`: none declared).
    pub tools: Option<ToolRequest>,
    /// How a chat prompt is rendered beyond its turns (the default for other prompts).
    pub rendering: ChatRendering,
    /// The request field `sampling.grammar` came from (`response_format.json_schema.schema`,
    /// `structured_outputs.regex`, ...), which a grammar that does not compile is a 400
    /// naming; `None` for a grammar made from `tools`, or none.
    pub grammar_param: Option<&'static str>,
    /// How the text and logprobs are written (vLLM's options).
    pub output: OutputOptions,
    /// vLLM's `truncate_prompt_tokens`, applied once the prompt is tokenized.
    pub truncate_prompt: Option<PromptTruncation>,
    /// vLLM's `prompt_logprobs`: the reply shows each prompt token's logprob and rank with
    /// this many alternatives (never streamed).
    pub prompt_logprobs: Option<u32>,
    /// vLLM's `bad_words`, as sent: tokenized with the prompt into `sampling.bad_words`.
    pub bad_words: Vec<String>,
    /// vLLM's `request_id`: the response's id is made of it ([`crate::reply_id`]).
    pub client_request_id: Option<String>,
    /// Completions generated: `n`, or `best_of` (`/v1/completions`) when larger, of which
    /// the `n` with the highest mean token logprob are returned (never streamed).
    pub candidates: u32,
    /// `/v1/completions`' `echo`: each choice's text (and logprobs) starts with the prompt.
    pub echo: bool,
    /// vLLM's `echo` on chat: the text each choice's content starts with (the last message's,
    /// an assistant's), `None` when there is none to echo.
    pub chat_echo: Option<String>,
    /// The request's `cache_salt` (vLLM's): its prompt is cached apart from other salts'.
    pub cache_salt: Option<String>,
    /// vLLM's `priority`: the workers serve lower values first (0 by default).
    pub priority: i32,
    /// OpenAI's `prediction` on chat: the text the answer is expected to repeat, tokenized
    /// with the prompt into the job's draft source ([`prediction`]).
    pub prediction: Option<String>,
    /// The LoRA adapter the request's `model` names (`None`: the served model).
    pub lora: Option<String>,
}

impl ValidRequest {
    /// The request field that holds the prompt, for errors about it.
    pub fn prompt_param(&self) -> &'static str {
        self.prompt_param
    }

    /// Drops the first prompt tokens that `truncate_prompt_tokens` leaves out: all but the
    /// last `n`, or (-1) all but as many as fit the context with the token limit (one token
    /// when there is none).
    pub fn truncate_prompt(&self, prompt_ids: &mut Vec<u32>, limits: &ModelLimits) {
        let keep = match self.truncate_prompt {
            None => return,
            Some(PromptTruncation::Last(n)) => n as usize,
            Some(PromptTruncation::ToFit) => (limits.max_model_len as usize)
                .saturating_sub(self.max_tokens.unwrap_or(1) as usize)
                .max(1),
        };
        if prompt_ids.len() > keep {
            prompt_ids.drain(..prompt_ids.len() - keep);
        }
    }

    /// The job's stop settings once the prompt has `prompt_len` tokens, checking that prompt and
    /// completion fit the context.
    pub fn stop_spec(&self, prompt_len: usize, limits: &ModelLimits) -> Result<StopSpec, ApiError> {
        let context = limits.max_model_len as usize;
        let param = self.prompt_param();
        if prompt_len == 0 {
            return Err(ApiError::invalid("the prompt is empty", param));
        }
        let too_long = |requested: usize| ApiError::InvalidRequest {
            message: format!(
                "This model's maximum context length is {context} tokens. However, you requested \
                 {} tokens ({prompt_len} in the {param}, {requested} in the completion). Please \
                 reduce the length of the {param} or completion.",
                prompt_len + requested
            ),
            param: Some(param.to_string()),
            code: Some("context_length_exceeded"),
        };
        let max_tokens = match self.max_tokens {
            Some(n) if prompt_len + n as usize > context => return Err(too_long(n as usize)),
            Some(n) => n,
            None if prompt_len >= context => return Err(too_long(1)),
            None => (context - prompt_len) as u32,
        };
        Ok(StopSpec {
            max_tokens,
            token_ids: self.stop_token_ids.clone(),
            strings: self.stop_strings.clone(),
            ignore_eos: self.ignore_eos,
            // Without a token limit the context's end may come first: the completion ends
            // there (`length`), as it would with `ignore_eos`.
            min_tokens: self.min_tokens.min(max_tokens),
            include_stop_str_in_output: self.output.include_stop_str_in_output,
            skip_special_tokens: self.output.skip_special_tokens,
        })
    }
}

/// What every endpoint's request has, borrowed from it: the model, the generation parameters
/// and whether to stream.
struct CommonFields<'a> {
    model: &'a Option<String>,
    generation: &'a GenerationFields,
    stream: Option<bool>,
    /// Chat's and completions' (the Responses API's has other fields: `None`).
    stream_options: Option<&'a StreamOptions>,
    /// Whether the request has `stream_options` (only allowed when streaming).
    has_stream_options: bool,
}

struct CommonValues {
    n: u32,
    sampling: SamplingSpec,
    stop_strings: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    min_tokens: u32,
    grammar_param: Option<&'static str>,
    output: OutputOptions,
    truncate_prompt: Option<PromptTruncation>,
    prompt_logprobs: Option<u32>,
    bad_words: Vec<String>,
    client_request_id: Option<String>,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    cache_salt: Option<String>,
    priority: i32,
    /// The LoRA adapter `model` names, if it names one.
    lora: Option<String>,
}

/// Sets `sampling.grammar` from `format` (chat's and vLLM's completions' `response_format`),
/// refusing it beside `structured_outputs` (whose field `grammar_param` names); the field the
/// grammar comes from after.
fn with_response_format(
    format: Option<&ResponseFormat>,
    sampling: &mut SamplingSpec,
    grammar_param: Option<&'static str>,
) -> Result<Option<&'static str>, ApiError> {
    let Some((grammar, param)) = format.map(response_format).transpose()?.flatten() else {
        return Ok(grammar_param);
    };
    if grammar_param.is_some() {
        return Err(ApiError::invalid(
            "structured_outputs cannot be combined with a JSON or structural tag \
             response_format: both constrain the whole reply",
            "structured_outputs",
        ));
    }
    sampling.grammar = Some(grammar);
    Ok(Some(param))
}

/// `min_tokens` may not ask for more than the token limit (`limit_param`'s value, or its
/// default), as vLLM checks it.
fn check_min_tokens(min_tokens: u32, limit: u32, limit_param: &str) -> Result<(), ApiError> {
    if min_tokens > limit {
        return Err(ApiError::invalid(
            format!("min_tokens ({min_tokens}) must be at most {limit_param} ({limit})"),
            "min_tokens",
        ));
    }
    Ok(())
}

/// `model`: absent or the served model (`None`), or a LoRA adapter a live worker serves (its
/// name); anything else is 404 `model_not_found`.
pub fn check_model(
    model: &Option<String>,
    limits: &ModelLimits,
) -> Result<Option<String>, ApiError> {
    match model {
        Some(name) if name == &limits.served_model_name => Ok(None),
        Some(name) if limits.adapters.contains(name) => Ok(Some(name.clone())),
        Some(name) => Err(ApiError::ModelNotFound {
            model: name.clone(),
        }),
        None => Ok(None),
    }
}

fn validate_common(
    fields: CommonFields<'_>,
    limits: &ModelLimits,
) -> Result<CommonValues, ApiError> {
    let lora = check_model(fields.model, limits)?;
    let generation = validate_generation(fields.generation, limits)?;
    let stream = fields.stream.unwrap_or(false);
    if stream && generation.prompt_logprobs.is_some() {
        return Err(ApiError::invalid(
            "prompt_logprobs are not streamed: send it with stream false",
            "prompt_logprobs",
        ));
    }
    let include_usage = fields
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let continuous_usage = fields
        .stream_options
        .and_then(|o| o.continuous_usage_stats)
        .unwrap_or(false);
    if continuous_usage && !include_usage {
        return Err(ApiError::invalid(
            "stream_options.continuous_usage_stats needs include_usage: true (the usage it \
             puts in every chunk is the usage include_usage reports at the end)",
            "stream_options.continuous_usage_stats",
        ));
    }
    if fields.has_stream_options && !stream {
        return Err(ApiError::invalid(
            "stream_options is only allowed when stream is true",
            "stream_options",
        ));
    }
    Ok(CommonValues {
        n: generation.n,
        sampling: generation.sampling,
        stop_strings: generation.stop_strings,
        stop_token_ids: generation.stop_token_ids,
        ignore_eos: generation.ignore_eos,
        min_tokens: generation.min_tokens,
        grammar_param: generation.grammar_param,
        output: generation.output,
        truncate_prompt: generation.truncate_prompt,
        prompt_logprobs: generation.prompt_logprobs,
        bad_words: generation.bad_words,
        client_request_id: generation.client_request_id,
        stream,
        include_usage,
        continuous_usage,
        cache_salt: generation.cache_salt,
        priority: generation.priority,
        lora,
    })
}

/// `response_format` as the grammar the output must match, and the field a grammar that does
/// not compile is a 400 naming: none for `text`, any JSON object for `json_object`, the
/// schema for `json_schema`, and vLLM's `structural_tag` ([`structural_tag`]). Whether it
/// compiles is checked where the tokenizer is ([`crate::grammar`]).
pub fn response_format(
    format: &ResponseFormat,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    if format.kind.as_deref() == Some("structural_tag") {
        if format.json_schema.is_some() {
            return Err(ApiError::invalid(
                "response_format.json_schema is only allowed with type json_schema, not \
                 structural_tag",
                "response_format.json_schema",
            ));
        }
        let mut tag = format.other.clone();
        tag.insert("type".into(), "structural_tag".into());
        let grammar = structural_tag::structural_tag(&tag, "response_format")?;
        return Ok(Some((grammar, "response_format.structures")));
    }
    if let Some(field) = format.other.keys().next() {
        return Err(ApiError::invalid(
            format!("response_format.{field} is not a response_format field"),
            &format!("response_format.{field}"),
        ));
    }
    let kind = format.kind.as_deref().ok_or_else(|| {
        ApiError::invalid(
            "response_format needs a type (text, json_object, json_schema or structural_tag)",
            "response_format.type",
        )
    })?;
    if kind != "json_schema" && format.json_schema.is_some() {
        return Err(ApiError::invalid(
            format!(
                "response_format.json_schema is only allowed with type json_schema, not {kind}"
            ),
            "response_format.json_schema",
        ));
    }
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some((
            GrammarSpec::JsonSchema {
                schema: serde_json::json!({"type": "object"}),
            },
            JSON_SCHEMA_PARAM,
        ))),
        "json_schema" => {
            let format = format.json_schema.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    "response_format of type json_schema needs json_schema",
                    "response_format.json_schema",
                )
            })?;
            if let Some(field) = format.other.keys().next() {
                return Err(ApiError::invalid(
                    format!("response_format.json_schema.{field} is not a json_schema field"),
                    &format!("response_format.json_schema.{field}"),
                ));
            }
            // OpenAI's rule for the name: a-z, A-Z, 0-9, underscores and dashes, at most 64.
            let name_ok = format.name.as_deref().is_some_and(|name| {
                !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
            if !name_ok {
                return Err(ApiError::invalid(
                    "response_format.json_schema.name is required: 1 to 64 of a-z, A-Z, 0-9, \
                     underscores and dashes",
                    "response_format.json_schema.name",
                ));
            }
            match &format.schema {
                Some(schema @ (serde_json::Value::Object(_) | serde_json::Value::Bool(_))) => {
                    Ok(Some((
                        GrammarSpec::JsonSchema {
                            schema: schema.clone(),
                        },
                        JSON_SCHEMA_PARAM,
                    )))
                }
                Some(other) => Err(ApiError::invalid(
                    format!("the schema must be a JSON Schema object, got {other}"),
                    JSON_SCHEMA_PARAM,
                )),
                None => Err(ApiError::invalid(
                    "response_format.json_schema needs a schema",
                    JSON_SCHEMA_PARAM,
                )),
            }
        }
        other => Err(ApiError::invalid(
            format!(
                "response_format type {other:?} is not supported (text, json_object, \
                 json_schema or structural_tag)"
            ),
            "response_format.type",
        )),
    }
}

fn token_limit(value: i64, param: &str) -> Result<u32, ApiError> {
    if value >= 1 && value <= u32::MAX as i64 {
        Ok(value as u32)
    } else {
        Err(ApiError::invalid(
            format!("{param} must be at least 1, got {value}"),
            param,
        ))
    }
}

fn top_logprobs(value: i64, param: &str) -> Result<u32, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&value) {
        Ok(value as u32)
    } else {
        Err(ApiError::invalid(
            format!("{param} must be in [0, {MAX_TOP_LOGPROBS}], got {value}"),
            param,
        ))
    }
}

fn validate_message(index: usize, message: &ChatMessage) -> Result<Turn, ApiError> {
    let param = format!("messages[{index}]");
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        "function" => {
            return Err(ApiError::invalid(
                "role \"function\" is deprecated and not served; answer tool calls with role \
                 \"tool\" and the call's tool_call_id",
                &format!("{param}.role"),
            ));
        }
        other => {
            return Err(ApiError::invalid(
                format!(
                    "role {other:?} is not supported (system, developer, user, assistant or tool)"
                ),
                &format!("{param}.role"),
            ));
        }
    };
    let tool_calls = match (&message.tool_calls, role) {
        (None, _) => Vec::new(),
        (Some(calls), Role::Assistant) => {
            crate::tools::validate::validate_tool_calls(&param, calls)?
        }
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "only assistant messages carry tool_calls",
                &format!("{param}.tool_calls"),
            ));
        }
    };
    let tool_call_id = match (&message.tool_call_id, role) {
        (Some(id), Role::Tool) if !id.is_empty() => Some(id.clone()),
        (_, Role::Tool) => {
            return Err(ApiError::invalid(
                "a tool message needs tool_call_id: the id of the call it answers",
                &format!("{param}.tool_call_id"),
            ));
        }
        (_, _) => None,
    };
    let content = match &message.content {
        Some(MessageContent::Text(text)) => text.clone(),
        Some(MessageContent::Parts(parts)) => {
            // Text parts are joined with newlines, as vLLM does.
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => texts.push(t.as_str()),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            "a text content part needs `text`",
                            &format!("{param}.content[{i}].text"),
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::invalid(
                            format!("content part type {other:?} is not supported (only text)"),
                            &format!("{param}.content[{i}].type"),
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        // An assistant turn may carry only tool calls (or be a prefill of nothing).
        None if role == Role::Assistant => String::new(),
        None => {
            return Err(ApiError::invalid(
                format!("a {} message needs content", role.as_str()),
                &format!("{param}.content"),
            ));
        }
    };
    let reasoning = match (&message.reasoning, &message.reasoning_content) {
        (None, None) => None,
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "reasoning and reasoning_content are two names of one text: they differ",
                &format!("{param}.reasoning_content"),
            ));
        }
        (Some(text), _) | (None, Some(text)) if role == Role::Assistant => Some(text.clone()),
        (reasoning, _) => {
            let field = if reasoning.is_some() {
                "reasoning"
            } else {
                "reasoning_content"
            };
            return Err(ApiError::invalid(
                "only assistant messages carry reasoning",
                &format!("{param}.{field}"),
            ));
        }
    };
    Ok(Turn {
        role,
        content,
        tool_calls,
        tool_call_id,
        name: message.name.clone().filter(|_| role == Role::Tool),
        reasoning,
    })
}

/// Every tool message answers a call made earlier in the conversation (OpenAI refuses the
/// others); its `name` is filled in from that call when the client left it out.
fn link_tool_results(turns: &mut [Turn]) -> Result<(), ApiError> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for (index, turn) in turns.iter_mut().enumerate() {
        calls.extend(
            turn.tool_calls
                .iter()
                .map(|call| (call.id.clone(), call.name.clone())),
        );
        let Some(id) = &turn.tool_call_id else {
            continue;
        };
        match calls.iter().find(|(call_id, _)| call_id == id) {
            Some((_, name)) => {
                turn.name.get_or_insert_with(|| name.clone());
            }
            None => {
                return Err(ApiError::invalid(
                    format!(
                        "tool_call_id {id:?} answers no tool call of an earlier assistant message"
                    ),
                    &format!("messages[{index}].tool_call_id"),
                ));
            }
        }
    }
    Ok(())
}

pub fn validate_chat(
    request: &ChatCompletionRequest,
    limits: &ModelLimits,
) -> Result<ValidRequest, ApiError> {
    let common = validate_common(
        CommonFields {
            model: &request.model,
            generation: &request.generation,
            stream: request.stream,
            stream_options: request.stream_options.as_ref(),
            has_stream_options: request.stream_options.is_some(),
        },
        limits,
    )?;
    let messages = request
        .messages
        .as_ref()
        .ok_or_else(|| ApiError::invalid("messages is required", "messages"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", "messages"));
    }
    let mut turns = messages
        .iter()
        .enumerate()
        .map(|(i, m)| validate_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    link_tool_results(&mut turns)?;
    let rendering = chat_rendering::chat_rendering(&request.template, &turns)?;
    let chat_echo = match (request.echo, turns.last()) {
        (Some(true), Some(last)) if last.role == Role::Assistant => Some(last.content.clone()),
        _ => None,
    };
    let tools = crate::tools::validate::validate_tools(request, limits.tool_support.is_some())?;

    // max_completion_tokens is OpenAI's current name; when both are sent it wins.
    let max_tokens = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) => Some(token_limit(n, "max_completion_tokens")?),
        (None, Some(n)) => Some(token_limit(n, "max_tokens")?),
        (None, None) => None,
    };
    if let Some(limit) = max_tokens {
        let param = if request.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        check_min_tokens(common.min_tokens, limit, param)?;
    }
    let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, top) => Some(
            top.map(|n| top_logprobs(n, "top_logprobs"))
                .transpose()?
                .unwrap_or(0),
        ),
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs to be true",
                "top_logprobs",
            ));
        }
        (false, _) => None,
    };
    let mut sampling = common.sampling;
    sampling.logprobs = logprobs;
    // response_format first: the tools' grammar refuses to stack on a response_format one.
    let grammar_param = with_response_format(
        request.response_format.as_ref(),
        &mut sampling,
        common.grammar_param,
    )?;
    if let (Some(tools), Some(support)) = (&tools, limits.tool_support) {
        crate::tools::grammar::constrain(tools, support.format, &mut sampling)?;
    }
    Ok(ValidRequest {
        prompt: PromptInput::Chat(turns),
        max_tokens,
        sampling,
        stop_strings: common.stop_strings,
        stop_token_ids: common.stop_token_ids,
        ignore_eos: common.ignore_eos,
        min_tokens: common.min_tokens,
        stream: common.stream,
        include_usage: common.include_usage,
        continuous_usage: common.continuous_usage,
        logprobs,
        logprobs_format: LogprobsFormat::Chat,
        prompt_param: "messages",
        n: common.n,
        tools,
        chat_echo,
        rendering,
        grammar_param,
        output: common.output,
        truncate_prompt: common.truncate_prompt,
        prompt_logprobs: common.prompt_logprobs,
        bad_words: common.bad_words,
        client_request_id: common.client_request_id,
        candidates: common.n,
        echo: false,
        cache_salt: common.cache_salt,
        priority: common.priority,
        prediction: prediction::prediction_text(request.prediction.as_ref())?,
        lora: common.lora,
    })
}

/// A prompt's token ids, each in the vocabulary.
fn token_ids(ids: &[i64], limits: &ModelLimits) -> Result<Vec<u32>, ApiError> {
    vocabulary_ids(ids, limits, |_| "prompt".to_string())
}

/// Token ids a request sends, each in the vocabulary; one outside it is a 400 naming
/// `param(index)` (`prompt`, `stop_token_ids[2]`, `tokens[0]`).
pub fn vocabulary_ids(
    ids: &[i64],
    limits: &ModelLimits,
    param: impl Fn(usize) -> String,
) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            if id >= 0 && id < limits.vocab_size as i64 {
                Ok(id as u32)
            } else {
                Err(ApiError::invalid(
                    format!(
                        "token id {id} is outside the vocabulary (0 to {})",
                        limits.vocab_size - 1
                    ),
                    &param(i),
                ))
            }
        })
        .collect()
}

/// Most prompts in one `/v1/completions` request (a batch: `prompt` as a list).
pub const MAX_BATCH_PROMPTS: usize = 256;
/// Most choices one `/v1/completions` request generates: prompts x `best_of` (or `n`).
pub const MAX_BATCH_CHOICES: usize = 1024;

/// One validated request per prompt: one, or each of a batch (`prompt` as a list of strings
/// or of token lists), with the same settings; their choices are numbered prompt by prompt.
pub fn validate_completion(
    request: &CompletionRequest,
    limits: &ModelLimits,
) -> Result<Vec<ValidRequest>, ApiError> {
    let common = validate_common(
        CommonFields {
            model: &request.model,
            generation: &request.generation,
            stream: request.stream,
            stream_options: request.stream_options.as_ref(),
            has_stream_options: request.stream_options.is_some(),
        },
        limits,
    )?;
    let echo = request.echo.unwrap_or(false);
    if echo && common.prompt_logprobs.is_some() {
        return Err(ApiError::invalid(
            "prompt_logprobs cannot be combined with echo: echo with logprobs shows the \
             prompt's logprobs already",
            "prompt_logprobs",
        ));
    }
    if echo && common.truncate_prompt.is_some() {
        // The echo writes the prompt as sent; a truncated one would not match its logprobs.
        return Err(ApiError::invalid(
            "truncate_prompt_tokens cannot be combined with echo",
            "truncate_prompt_tokens",
        ));
    }
    if request.suffix.is_some() {
        return Err(ApiError::invalid("suffix is not supported", "suffix"));
    }
    // OpenAI's rule: best_of candidates are generated and the n best returned, so best_of
    // is at least n; the ranking needs every candidate whole, so it is never streamed.
    let candidates = match request.best_of {
        None => common.n,
        Some(best_of) if best_of < common.n as i64 || best_of > MAX_N => {
            return Err(ApiError::invalid(
                format!(
                    "best_of must be at least n ({}) and at most {MAX_N}, got {best_of}",
                    common.n
                ),
                "best_of",
            ));
        }
        Some(best_of) => best_of as u32,
    };
    if candidates > common.n && common.stream {
        return Err(ApiError::invalid(
            "best_of greater than n cannot be streamed: the best candidates are known only \
             once every candidate has finished",
            "best_of",
        ));
    }
    let prompts = match &request.prompt {
        None => return Err(ApiError::invalid("prompt is required", "prompt")),
        Some(PromptField::Text(text)) => vec![PromptInput::Text(text.clone())],
        Some(PromptField::Tokens(ids)) => vec![PromptInput::Tokens(token_ids(ids, limits)?)],
        Some(PromptField::Texts(texts)) => texts.iter().cloned().map(PromptInput::Text).collect(),
        Some(PromptField::TokenBatches(batches)) => batches
            .iter()
            .map(|ids| token_ids(ids, limits).map(PromptInput::Tokens))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt must not be an empty list",
            "prompt",
        ));
    }
    if prompts.len() > MAX_BATCH_PROMPTS || prompts.len() * candidates as usize > MAX_BATCH_CHOICES
    {
        return Err(ApiError::invalid(
            format!(
                "a batch of {} prompts with {candidates} choices each is too large: at most \
                 {MAX_BATCH_PROMPTS} prompts and {MAX_BATCH_CHOICES} choices (prompts x best_of \
                 or n) in one request",
                prompts.len()
            ),
            "prompt",
        ));
    }
    let max_tokens = match request.max_tokens {
        // OpenAI's legacy contract: the prompt echoed (with its logprobs), nothing generated
        // (lm-evaluation-harness scores prompts this way). Without echo there would be
        // nothing to return: a 400, as vLLM answers.
        Some(0) if echo => 0,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1, got 0 (0 is served only with echo: the \
                 prompt, and its logprobs, without a completion)",
                "max_tokens",
            ));
        }
        Some(n) => token_limit(n, "max_tokens")?,
        None => DEFAULT_COMPLETION_MAX_TOKENS,
    };
    check_min_tokens(common.min_tokens, max_tokens, "max_tokens")?;
    let logprobs = request
        .logprobs
        .map(|n| top_logprobs(n, "logprobs"))
        .transpose()?;
    let mut sampling = common.sampling;
    sampling.logprobs = logprobs;
    if echo && logprobs.is_some() {
        sampling.prompt_logprobs = logprobs;
    } else if max_tokens == 0 {
        // A job that generates nothing is a prompt-only job, which workers run for its
        // prompt logprobs: asked for (none shown), so echo without logprobs works too.
        sampling.prompt_logprobs = Some(0);
    }
    let grammar_param = with_response_format(
        request.response_format.as_ref(),
        &mut sampling,
        common.grammar_param,
    )?;
    if candidates > common.n && sampling.logprobs.is_none() {
        // The ranking reads each token's logprob; the response shows none unless asked.
        sampling.logprobs = Some(0);
    }
    let first = ValidRequest {
        prompt: prompts[0].clone(),
        max_tokens: Some(max_tokens),
        sampling,
        stop_strings: common.stop_strings,
        stop_token_ids: common.stop_token_ids,
        ignore_eos: common.ignore_eos,
        min_tokens: common.min_tokens,
        stream: common.stream,
        include_usage: common.include_usage,
        continuous_usage: common.continuous_usage,
        logprobs,
        logprobs_format: LogprobsFormat::Completion,
        prompt_param: "prompt",
        n: common.n,
        tools: None,
        chat_echo: None,
        rendering: ChatRendering::default(),
        grammar_param,
        output: common.output,
        truncate_prompt: common.truncate_prompt,
        prompt_logprobs: common.prompt_logprobs,
        bad_words: common.bad_words,
        client_request_id: common.client_request_id,
        candidates,
        echo,
        cache_salt: common.cache_salt,
        priority: common.priority,
        prediction: None,
        lora: common.lora,
    };
    Ok(prompts
        .into_iter()
        .map(|prompt| ValidRequest {
            prompt,
            ..first.clone()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn model_names_the_served_model_or_a_served_adapter() {
        let limits = limits();
        assert_eq!(check_model(&None, &limits).unwrap(), None);
        assert_eq!(check_model(&Some("smol".into()), &limits).unwrap(), None);
        let unknown = check_model(&Some("sql".into()), &limits).unwrap_err();
        assert!(
            matches!(unknown, ApiError::ModelNotFound { .. }),
            "{unknown:?}"
        );
        limits.adapters.set(["sql".to_string()].into());
        assert_eq!(
            check_model(&Some("sql".into()), &limits).unwrap(),
            Some("sql".into())
        );
    }

    fn limits() -> ModelLimits {
        ModelLimits {
            adapters: Default::default(),
            served_model_name: "smol".into(),
            max_model_len: 100,
            vocab_size: 1000,
            tool_support: Some(ToolSupport {
                format: crate::tools::ToolFormat::Hermes,
                native: false,
            }),
            sampling_defaults: SamplingDefaults::default(),
            reasoning_parser: Default::default(),
        }
    }

    fn chat(body: Value) -> Result<ValidRequest, ApiError> {
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        validate_chat(&request, &limits())
    }

    /// The first (or only) prompt's validated request.
    fn completion(body: Value) -> Result<ValidRequest, ApiError> {
        let request: CompletionRequest = serde_json::from_value(body).unwrap();
        validate_completion(&request, &limits()).map(|mut batch| batch.remove(0))
    }

    fn param_of(result: Result<ValidRequest, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    fn user(text: &str) -> Value {
        json!([{"role": "user", "content": text}])
    }

    #[test]
    fn chat_defaults_and_values() {
        let valid = chat(json!({"messages": [
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null}
        ]}))
        .unwrap();
        assert_eq!(
            valid.prompt,
            PromptInput::Chat(vec![
                Turn::text(Role::System, "sys"),
                Turn::text(Role::User, "a\nb"),
                Turn::text(Role::Assistant, ""),
            ])
        );
        assert_eq!(valid.max_tokens, None);
        assert_eq!(valid.sampling, SamplingSpec::default());
        assert!(!valid.stream && !valid.include_usage && valid.logprobs.is_none());

        let valid = chat(
            json!({"model": "smol", "messages": user("x"), "max_tokens": 5,
            "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": -1,
            "stop": ["a", "b"], "presence_penalty": -2, "frequency_penalty": 2,
            "logprobs": true, "top_logprobs": 20, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(valid.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(valid.sampling.temperature, 0.0);
        assert_eq!(valid.sampling.top_p, 0.5);
        assert_eq!(valid.sampling.seed, Some(u64::MAX));
        assert_eq!(valid.sampling.logprobs, Some(20));
        assert_eq!(valid.stop_strings, vec!["a", "b"]);
        assert!(valid.stream && valid.include_usage);
    }

    /// A model's sampling defaults (its generation_config.json) fill what a request omits;
    /// what it sends wins; out-of-range defaults are refused by key.
    #[test]
    fn omitted_sampling_fields_take_the_models_defaults() {
        let generation: tandem_model::GenerationConfig = serde_json::from_value(
            json!({"temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                   "do_sample": true}),
        )
        .unwrap();
        let defaults = SamplingDefaults::from_generation_config(&generation).unwrap();
        assert_eq!(
            defaults.describe(),
            "temperature=0.2 top_p=0.9 top_k=40 min_p=0.05"
        );
        let model = ModelLimits {
            sampling_defaults: defaults,
            ..limits()
        };
        let request: ChatCompletionRequest =
            serde_json::from_value(json!({"messages": user("x")})).unwrap();
        let valid = validate_chat(&request, &model).unwrap();
        assert_eq!(
            (
                valid.sampling.temperature,
                valid.sampling.top_p,
                valid.sampling.top_k
            ),
            (0.2, 0.9, 40)
        );
        assert_eq!(valid.sampling.min_p, 0.05);
        assert_eq!(
            valid.sampling.repetition_penalty, 1.0,
            "not in the file: OpenAI's"
        );
        let request: ChatCompletionRequest = serde_json::from_value(
            json!({"messages": user("x"), "temperature": 1.5, "top_k": -1, "min_p": 0}),
        )
        .unwrap();
        let valid = validate_chat(&request, &model).unwrap();
        assert_eq!((valid.sampling.temperature, valid.sampling.top_k), (1.5, 0));
        assert_eq!(valid.sampling.min_p, 0.0, "the request's value wins");
        assert_eq!(valid.sampling.top_p, 0.9);
        // Completions too.
        let request: CompletionRequest = serde_json::from_value(json!({"prompt": "x"})).unwrap();
        assert_eq!(
            validate_completion(&request, &model).unwrap()[0]
                .sampling
                .temperature,
            0.2
        );

        let bad: tandem_model::GenerationConfig =
            serde_json::from_value(json!({"temperature": 0.7, "top_p": 1.5})).unwrap();
        let err = SamplingDefaults::from_generation_config(&bad).unwrap_err();
        assert!(err.contains("top_p 1.5"), "{err}");
        let bad: tandem_model::GenerationConfig =
            serde_json::from_value(json!({"min_p": 2})).unwrap();
        let err = SamplingDefaults::from_generation_config(&bad).unwrap_err();
        assert!(err.contains("min_p 2"), "{err}");
        let none = SamplingDefaults::from_generation_config(&Default::default()).unwrap();
        assert_eq!(none.spec(), SamplingSpec::default());
    }

    /// `echo` (prompt logprobs with `logprobs`), `max_tokens` 0 only with it (lm-eval's
    /// loglikelihood request and its `max_tokens: 0` form), `best_of` at least `n`, its
    /// ranking's logprobs asked for internally, and never streamed.
    #[test]
    fn echo_max_tokens_zero_and_best_of() {
        let lm_eval = completion(json!({"prompt": [[5, 6, 7]], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}))
        .unwrap();
        assert!(lm_eval.echo);
        assert_eq!(lm_eval.sampling.prompt_logprobs, Some(1));
        assert_eq!(lm_eval.sampling.logprobs, Some(1));
        assert_eq!(lm_eval.max_tokens, Some(1));
        let zero = completion(json!({"prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 0}))
            .unwrap();
        assert_eq!(zero.max_tokens, Some(0));
        assert_eq!(zero.sampling.prompt_logprobs, Some(0));
        assert_eq!(zero.stop_spec(5, &limits()).unwrap().max_tokens, 0);
        let bare = completion(json!({"prompt": "x", "max_tokens": 0, "echo": true})).unwrap();
        assert_eq!(bare.logprobs, None, "no logprobs shown");
        assert_eq!(bare.sampling.prompt_logprobs, Some(0), "a prompt-only job");
        let text_only = completion(json!({"prompt": "x", "echo": true})).unwrap();
        assert!(text_only.echo);
        assert_eq!(
            text_only.sampling.prompt_logprobs, None,
            "no logprobs asked"
        );
        assert!(!completion(json!({"prompt": "x"})).unwrap().echo);

        let best = completion(json!({"prompt": "x", "best_of": 3, "seed": 1})).unwrap();
        assert_eq!((best.n, best.candidates), (1, 3));
        assert_eq!(best.logprobs, None, "the response shows none");
        assert_eq!(best.sampling.logprobs, Some(0), "the ranking reads them");
        let shown =
            completion(json!({"prompt": "x", "n": 2, "best_of": 4, "logprobs": 2})).unwrap();
        assert_eq!(
            (shown.n, shown.candidates, shown.sampling.logprobs),
            (2, 4, Some(2))
        );
        let equal =
            completion(json!({"prompt": "x", "n": 2, "best_of": 2, "stream": true})).unwrap();
        assert_eq!(equal.candidates, 2, "best_of = n streams as n choices");

        for (body, param) in [
            (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
            (
                json!({"prompt": "x", "max_tokens": 0, "logprobs": 1}),
                "max_tokens",
            ),
            (
                json!({"prompt": "x", "max_tokens": -1, "echo": true}),
                "max_tokens",
            ),
            (json!({"prompt": "x", "n": 3, "best_of": 2}), "best_of"),
            (json!({"prompt": "x", "best_of": 0}), "best_of"),
            (json!({"prompt": "x", "best_of": MAX_N + 1}), "best_of"),
            (
                json!({"prompt": "x", "best_of": 2, "stream": true}),
                "best_of",
            ),
        ] {
            assert_eq!(param_of(completion(body.clone())), param, "{body}");
        }
    }

    #[test]
    fn n_choices_up_to_the_limit_and_best_of_equal_to_n() {
        assert_eq!(chat(json!({"messages": user("x")})).unwrap().n, 1);
        assert_eq!(chat(json!({"messages": user("x"), "n": 3})).unwrap().n, 3);
        assert_eq!(
            chat(json!({"messages": user("x"), "n": MAX_N})).unwrap().n,
            MAX_N as u32
        );
        let valid = completion(json!({"prompt": "x", "n": 2, "best_of": 2})).unwrap();
        assert_eq!(valid.n, 2);
    }

    #[test]
    fn chat_out_of_range_values_name_their_field() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (json!({}), "messages"),
            (
                json!({"messages": user("x"), "temperature": 2.5}),
                "temperature",
            ),
            (
                json!({"messages": user("x"), "temperature": -0.1}),
                "temperature",
            ),
            (json!({"messages": user("x"), "top_p": 0}), "top_p"),
            (json!({"messages": user("x"), "top_p": 1.01}), "top_p"),
            (json!({"messages": user("x"), "n": 0}), "n"),
            (json!({"messages": user("x"), "n": 129}), "n"),
            (
                json!({"messages": user("x"), "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (json!({"messages": user("x"), "stop": ""}), "stop"),
            (
                json!({"messages": user("x"), "stop": ["ok", "x".repeat(MAX_STOP_BYTES + 1)]}),
                "stop",
            ),
            (
                json!({"messages": user("x"), "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"messages": user("x"), "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"messages": user("x"), "presence_penalty": 2.1}),
                "presence_penalty",
            ),
            (
                json!({"messages": user("x"), "frequency_penalty": -3}),
                "frequency_penalty",
            ),
            (
                json!({"messages": user("x"), "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"messages": user("x"), "max_completion_tokens": -5}),
                "max_completion_tokens",
            ),
            (
                json!({"messages": user("x"), "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "function", "content": "x", "name": "f"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "critic", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
                "messages[0].tool_calls",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c",
                    "function": {"name": "f"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0].type",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(chat(body.clone())), param, "{body}");
        }
    }

    #[test]
    fn a_tool_round_trip_is_validated_and_linked() {
        let valid = chat(json!({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}
        ], "tools": [{"type": "function", "function": {"name": "get_weather"}}],
           "tool_choice": "required"}))
        .unwrap();
        let PromptInput::Chat(turns) = &valid.prompt else {
            panic!("{:?}", valid.prompt)
        };
        assert_eq!(turns[1].tool_calls[0].name, "get_weather");
        assert_eq!(turns[1].content, "");
        assert_eq!(turns[2].role, Role::Tool);
        assert_eq!(
            turns[2].name.as_deref(),
            Some("get_weather"),
            "named after its call"
        );
        let tools = valid.tools.expect("tools");
        assert_eq!(tools.choice, crate::tools::ToolChoice::Required);
        assert!(
            matches!(
                valid.sampling.grammar,
                Some(tandem_protocol::messages::GrammarSpec::Lark { .. })
            ),
            "required: a grammar"
        );
        // Tool calling off: refused, unless tool_choice is none.
        let off = ModelLimits {
            tool_support: None,
            ..limits()
        };
        let body = json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}]});
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        assert_eq!(param_of(validate_chat(&request, &off)), "tools");
    }

    #[test]
    fn logit_bias_is_checked_and_sorted() {
        let valid =
            chat(json!({"messages": user("x"), "logit_bias": {"999": 100, "7": -100, "12": 0.5}}))
                .unwrap();
        assert_eq!(
            valid.sampling.logit_bias,
            vec![(7, -100.0), (12, 0.5), (999, 100.0)]
        );
        let valid = completion(json!({"prompt": "x", "logit_bias": {"3": -1}})).unwrap();
        assert_eq!(valid.sampling.logit_bias, vec![(3, -1.0)]);
        let many: serde_json::Map<String, Value> =
            (0..301).map(|i| (i.to_string(), json!(1))).collect();
        for bias in [
            json!({"1000": 1}),
            json!({"-1": 1}),
            json!({"abc": 1}),
            json!({"5": 100.5}),
            json!({"5": "high"}),
            json!({"5": 1, "05": 2}),
            Value::Object(many),
        ] {
            assert_eq!(
                param_of(chat(
                    json!({"messages": user("x"), "logit_bias": bias.clone()})
                )),
                "logit_bias",
                "{bias}"
            );
            assert_eq!(
                param_of(completion(
                    json!({"prompt": "x", "logit_bias": bias.clone()})
                )),
                "logit_bias",
                "{bias}"
            );
        }
    }

    #[test]
    fn response_formats_become_grammars() {
        let grammar = |format: Value| {
            chat(json!({"messages": user("x"), "response_format": format}))
                .unwrap()
                .sampling
                .grammar
        };
        assert_eq!(grammar(json!({"type": "text"})), None);
        assert_eq!(
            grammar(json!({"type": "json_object"})),
            Some(GrammarSpec::JsonSchema {
                schema: json!({"type": "object"})
            })
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            grammar(json!({"type": "json_schema", "json_schema": {
                "name": "my_answer-1", "strict": true, "description": "an answer",
                "schema": schema.clone()}})),
            Some(GrammarSpec::JsonSchema { schema })
        );
        let cases = [
            (json!({}), "response_format.type"),
            (json!({"type": "yaml"}), "response_format.type"),
            (json!({"type": "text", "extra": 1}), "response_format.extra"),
            (
                json!({"type": "json_object", "json_schema": {"name": "a", "schema": {}}}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a"}}),
                JSON_SCHEMA_PARAM,
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": "x"}}),
                JSON_SCHEMA_PARAM,
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "format": 1}}),
                "response_format.json_schema.format",
            ),
        ];
        for (format, param) in cases {
            assert_eq!(
                param_of(chat(
                    json!({"messages": user("x"), "response_format": format.clone()})
                )),
                param,
                "{format}"
            );
        }
    }

    #[test]
    fn a_model_other_than_the_served_one_is_not_found() {
        let err = chat(json!({"model": "gpt-4", "messages": user("x")})).unwrap_err();
        assert!(
            matches!(err, ApiError::ModelNotFound { ref model } if model == "gpt-4"),
            "{err:?}"
        );
    }

    #[test]
    fn min_p_and_min_tokens_reach_the_job_and_their_ranges_are_checked() {
        let valid = chat(json!({"messages": user("x"), "min_p": 0.1, "min_tokens": 5,
                                "max_tokens": 8}))
        .unwrap();
        assert_eq!(valid.sampling.min_p, 0.1);
        let stop = valid.stop_spec(3, &limits()).unwrap();
        assert_eq!((stop.min_tokens, stop.max_tokens), (5, 8));
        // Without a token limit the context bounds it (100 tokens, 98 after the prompt).
        let long = chat(json!({"messages": user("x"), "min_tokens": 500})).unwrap();
        assert_eq!(long.stop_spec(2, &limits()).unwrap().min_tokens, 98);
        let plain = completion(json!({"prompt": "x", "min_tokens": 16})).unwrap();
        assert_eq!(plain.stop_spec(1, &limits()).unwrap().min_tokens, 16);
        assert_eq!(plain.sampling.min_p, 0.0);

        for (body, param) in [
            (json!({"messages": user("x"), "min_p": 1.5}), "min_p"),
            (json!({"messages": user("x"), "min_p": -0.1}), "min_p"),
            (
                json!({"messages": user("x"), "min_tokens": -1}),
                "min_tokens",
            ),
            (
                json!({"messages": user("x"), "min_tokens": 9, "max_tokens": 8}),
                "min_tokens",
            ),
            (
                json!({"messages": user("x"), "min_tokens": 9, "max_completion_tokens": 8}),
                "min_tokens",
            ),
        ] {
            assert_eq!(param_of(chat(body.clone())), param, "{body}");
        }
        // The completions' default limit (16) bounds it too, as in vLLM.
        let err = completion(json!({"prompt": "x", "min_tokens": 17})).unwrap_err();
        assert!(err.to_string().contains("max_tokens (16)"), "{err}");
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "min_tokens": 17}))),
            "min_tokens"
        );
    }

    #[test]
    fn vllm_output_options_and_prompt_truncation() {
        let valid = chat(
            json!({"messages": user("x"), "allowed_token_ids": [9, 3, 9],
            "include_stop_str_in_output": true, "skip_special_tokens": false,
            "return_tokens_as_token_ids": true, "truncate_prompt_tokens": 4}),
        )
        .unwrap();
        assert_eq!(
            valid.sampling.allowed_token_ids,
            [3, 9],
            "sorted, once each"
        );
        assert_eq!(
            valid.output,
            OutputOptions {
                include_stop_str_in_output: true,
                skip_special_tokens: false,
                tokens_as_ids: true,
            }
        );
        let stop = valid.stop_spec(4, &limits()).unwrap();
        assert!(stop.include_stop_str_in_output && !stop.skip_special_tokens);
        let mut ids = vec![1, 2, 3, 4, 5, 6];
        valid.truncate_prompt(&mut ids, &limits());
        assert_eq!(ids, [3, 4, 5, 6], "the last 4");
        // -1: as many as leave room for the token limit (context 100).
        let fit = chat(json!({"messages": user("x"), "truncate_prompt_tokens": -1,
            "max_tokens": 90}))
        .unwrap();
        let mut ids: Vec<u32> = (0..50).collect();
        fit.truncate_prompt(&mut ids, &limits());
        assert_eq!(ids, (40..50).collect::<Vec<u32>>());
        let plain = chat(json!({"messages": user("x")})).unwrap();
        assert_eq!(plain.output, OutputOptions::default());
        assert!(plain.bad_words.is_empty());
        let banning = completion(json!({"prompt": "x", "bad_words": [" Paris", "the end"]}));
        assert_eq!(banning.unwrap().bad_words, [" Paris", "the end"]);
        assert!(plain.stop_spec(4, &limits()).unwrap().skip_special_tokens);

        for (body, param) in [
            (
                json!({"messages": user("x"), "allowed_token_ids": []}),
                "allowed_token_ids",
            ),
            (
                json!({"messages": user("x"), "allowed_token_ids": [1, 1000]}),
                "allowed_token_ids[1]",
            ),
            (
                json!({"messages": user("x"), "truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
            ),
            (
                json!({"messages": user("x"), "bad_words": ["ok", "  "]}),
                "bad_words[1]",
            ),
            (
                json!({"messages": user("x"), "bad_words": ["x".repeat(1025)]}),
                "bad_words[0]",
            ),
            (
                json!({"messages": user("x"), "bad_words": vec!["w"; 129]}),
                "bad_words",
            ),
            (
                json!({"messages": user("x"), "truncate_prompt_tokens": -2}),
                "truncate_prompt_tokens",
            ),
        ] {
            assert_eq!(param_of(chat(body.clone())), param, "{body}");
        }
        assert_eq!(
            param_of(completion(
                json!({"prompt": "x", "echo": true, "truncate_prompt_tokens": 2})
            )),
            "truncate_prompt_tokens"
        );
        // vLLM's continuous_usage_stats, with include_usage only.
        let running = chat(json!({"messages": user("x"), "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}}))
        .unwrap();
        assert!(running.include_usage && running.continuous_usage);
        assert_eq!(
            param_of(chat(json!({"messages": user("x"), "stream": true,
                "stream_options": {"continuous_usage_stats": true}}))),
            "stream_options.continuous_usage_stats"
        );
        // vLLM's response_format on completions, as on chat; not beside structured_outputs.
        let formatted =
            completion(json!({"prompt": "x", "response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(
            formatted.sampling.grammar,
            Some(GrammarSpec::JsonSchema {
                schema: json!({"type": "object"})
            })
        );
        assert_eq!(formatted.grammar_param, Some(JSON_SCHEMA_PARAM));
        assert_eq!(
            param_of(completion(json!({"prompt": "x",
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"}}))),
            "structured_outputs"
        );
    }

    #[test]
    fn completion_prompts_and_defaults() {
        let valid = completion(json!({"prompt": "hi"})).unwrap();
        assert_eq!(valid.prompt, PromptInput::Text("hi".into()));
        assert_eq!(valid.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
        assert_eq!(
            completion(json!({"prompt": [1, 2]})).unwrap().prompt,
            PromptInput::Tokens(vec![1, 2])
        );
        assert_eq!(
            completion(json!({"prompt": [[3]]})).unwrap().prompt,
            PromptInput::Tokens(vec![3])
        );
        assert_eq!(
            completion(json!({"prompt": "x", "stop_token_ids": [7, 3]}))
                .unwrap()
                .stop_spec(1, &limits())
                .unwrap()
                .token_ids,
            [7, 3]
        );
        assert_eq!(
            completion(json!({"prompt": ["x"], "logprobs": 3}))
                .unwrap()
                .logprobs,
            Some(3)
        );
        for (body, param) in [
            (json!({"prompt": [1, 1000]}), "prompt"),
            (json!({"prompt": [-1]}), "prompt"),
            (json!({"prompt": [[1], [1000]]}), "prompt"),
            (json!({"prompt": vec!["a"; 257]}), "prompt"),
            (
                json!({"prompt": vec!["a"; 9], "n": 2, "best_of": 128}),
                "prompt",
            ),
            (json!({}), "prompt"),
            (json!({"prompt": "x", "n": 2, "best_of": 1}), "best_of"),
            (json!({"prompt": "x", "n": -1}), "n"),
            (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        ] {
            assert_eq!(param_of(completion(body.clone())), param, "{body}");
        }
    }

    /// A batch: one request per prompt, in order, with the same settings.
    #[test]
    fn a_batch_of_prompts_is_one_request_each() {
        let batch = |body: Value| {
            let request: CompletionRequest = serde_json::from_value(body).unwrap();
            validate_completion(&request, &limits()).unwrap()
        };
        let texts = batch(json!({"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 5}));
        let prompts: Vec<&PromptInput> = texts.iter().map(|v| &v.prompt).collect();
        assert_eq!(
            prompts,
            [
                &PromptInput::Text("a".into()),
                &PromptInput::Text("b".into()),
                &PromptInput::Text("c".into())
            ]
        );
        assert!(texts.iter().all(|v| v.n == 2 && v.max_tokens == Some(5)));
        let ids = batch(json!({"prompt": [[1, 2], [3]], "echo": true, "logprobs": 1}));
        assert_eq!(ids[1].prompt, PromptInput::Tokens(vec![3]));
        assert!(ids[1].echo && ids[1].sampling.prompt_logprobs == Some(1));
    }

    #[test]
    fn context_length_bounds_the_completion() {
        let valid = chat(json!({"messages": user("x")})).unwrap();
        assert_eq!(
            valid.stop_spec(30, &limits()).unwrap().max_tokens,
            70,
            "fills the context"
        );
        assert!(valid.stop_spec(100, &limits()).is_err());
        let valid = chat(json!({"messages": user("x"), "max_tokens": 50, "stop": "\n"})).unwrap();
        let stop = valid.stop_spec(50, &limits()).unwrap();
        assert_eq!(
            (stop.max_tokens, stop.strings.clone()),
            (50, vec!["\n".to_string()])
        );
        match valid.stop_spec(51, &limits()) {
            Err(ApiError::InvalidRequest { code, message, .. }) => {
                assert_eq!(code, Some("context_length_exceeded"));
                assert!(
                    message.contains("maximum context length is 100"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(valid.stop_spec(0, &limits()).is_err(), "empty prompt");
    }
}
