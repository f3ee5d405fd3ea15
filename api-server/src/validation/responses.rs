//! `/v1/responses` requests → the same [`ValidRequest`] chat completions produce, plus the
//! settings the `response` object echoes back.
//!
//! `store` (OpenAI's default true) asks the api-server to keep the response
//! ([`crate::response_store`]); `previous_response_id` and `conversation` are followed before
//! validation (the route puts the stored items in `input`). Function tools are served as on chat completions (the same rendering, parser
//! and grammar): declared flat (`{"type": "function", "name", "parameters"}`), called in
//! `function_call` output items, answered by `function_call_output` input items; hosted
//! tools (web search, file search, ...) are a 400 naming them.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;
use tandem_protocol::config::ReasoningParser;
use tandem_protocol::messages::GrammarSpec;

use super::{
    CommonFields, LogprobsFormat, ModelLimits, PromptInput, Role, Turn, ValidRequest, token_limit,
    top_logprobs, validate_common,
};
use crate::error::ApiError;
use crate::openai::{GenerationFields, ResponseInput, ResponsesRequest, TextConfig, TextFormat};
use crate::tools::validate::{FunctionFields, check_function_name, function_def, tool_request};
use crate::tools::{ToolCallRecord, ToolChoice, ToolRequest};

/// OpenAI's limits on `metadata`.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// The `include` value that asks for the output tokens' logprobs.
pub const INCLUDE_LOGPROBS: &str = "message.output_text.logprobs";
/// Asks for reasoning items' encrypted content: accepted, as tandem makes no reasoning items.
pub const INCLUDE_REASONING: &str = "reasoning.encrypted_content";

/// A validated `/v1/responses` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidResponses {
    pub request: ValidRequest,
    pub echo: ResponseSettings,
    /// `store` (default true, as OpenAI's): keep the finished response.
    pub store: bool,
    /// `background`: run the response whether or not the client stays (it is polled, and may
    /// be cancelled); stored; answered at once with the response queued, or streamed.
    pub background: bool,
}

/// What the `response` object reports about the request's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSettings {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub max_tool_calls: Option<i64>,
    pub parallel_tool_calls: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub top_logprobs: u32,
    pub text: TextConfig,
    pub tool_choice: Value,
    /// The declared function tools, as the response echoes them.
    pub tools: Vec<Value>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// `include` asked for the output's logprobs.
    pub include_logprobs: bool,
    pub truncation: Truncation,
}

/// `truncation`: what an input longer than the context gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// A 400 `context_length_exceeded` (OpenAI's default).
    Disabled,
    /// Its oldest items dropped until it fits (the instructions and system messages at its
    /// start kept), as OpenAI does.
    Auto,
}

impl Truncation {
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::Disabled => "disabled",
            Truncation::Auto => "auto",
        }
    }
}

/// Where a conversation truncated from its start may begin: after its leading system turns,
/// at a user turn (a template may require the turns after the system ones to start with the
/// user, and a tool result or an assistant turn alone would answer nothing), the earliest
/// first. Empty when no user turn follows the system ones.
pub fn truncation_starts(turns: &[Turn]) -> Vec<usize> {
    let system = turns.iter().take_while(|t| t.role == Role::System).count();
    (system..turns.len())
        .filter(|&i| turns[i].role == Role::User)
        .collect()
}

pub fn validate_responses(
    request: &ResponsesRequest,
    limits: &ModelLimits,
) -> Result<ValidResponses, ApiError> {
    let common = validate_common(
        CommonFields {
            model: &request.model,
            // The Responses API takes only the sampling parameters every endpoint shares.
            generation: &GenerationFields::from(request.sampling.clone()),
            stream: request.stream,
            stream_options: None,
            has_stream_options: request.stream_options.is_some(),
        },
        limits,
    )?;
    refuse_state(request)?;
    let tools = check_tools(request, limits.tool_support.is_some())?;
    check_reasoning(request, limits.reasoning_parser)?;
    let truncation = match request.truncation.as_deref() {
        None | Some("disabled") => Truncation::Disabled,
        Some("auto") => Truncation::Auto,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("truncation must be \"auto\" or \"disabled\", got {other:?}"),
                "truncation",
            ));
        }
    };
    if let Some(n) = request.max_tool_calls
        && n < 0
    {
        return Err(ApiError::invalid(
            format!("max_tool_calls must not be negative, got {n}"),
            "max_tool_calls",
        ));
    }

    let mut turns = Vec::new();
    if let Some(instructions) = &request.instructions {
        turns.push(Turn::text(Role::System, instructions.clone()));
    }
    match &request.input {
        None => return Err(ApiError::invalid("input is required", "input")),
        Some(ResponseInput::Text(text)) => turns.push(Turn::text(Role::User, text.clone())),
        Some(ResponseInput::Items(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid("input must not be empty", "input"));
            }
            let mut calls = CallsSoFar::default();
            for (i, item) in items.iter().enumerate() {
                input_item(format!("input[{i}]"), item, &mut turns, &mut calls)?;
            }
        }
    }

    let max_output_tokens = request
        .max_output_tokens
        .map(|n| token_limit(n, "max_output_tokens"))
        .transpose()?;
    let include_logprobs = check_include(request.include.as_deref().unwrap_or_default())?;
    let top = request
        .top_logprobs
        .map(|n| top_logprobs(n, "top_logprobs"))
        .transpose()?
        .unwrap_or(0);
    if top > 0 && !include_logprobs {
        return Err(ApiError::invalid(
            format!("top_logprobs needs include to list \"{INCLUDE_LOGPROBS}\""),
            "top_logprobs",
        ));
    }
    let (text, grammar) = text_format(request.text.as_ref())?;
    let metadata = metadata(request.metadata.as_ref())?;

    let mut sampling = common.sampling;
    let logprobs = include_logprobs.then_some(top);
    sampling.logprobs = logprobs;
    sampling.grammar = grammar;
    // text.format first: the tools' grammar refuses to stack on a JSON format's.
    if let (Some(tools), Some(support)) = (&tools, limits.tool_support) {
        crate::tools::grammar::constrain(tools, support.format, &mut sampling)?;
    }
    let echo = ResponseSettings {
        instructions: request.instructions.clone(),
        max_output_tokens,
        max_tool_calls: request.max_tool_calls,
        parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_logprobs: top,
        text,
        tool_choice: request
            .tool_choice
            .clone()
            .filter(|c| !c.is_null())
            .unwrap_or_else(|| Value::from("auto")),
        tools: echoed_tools(request),
        user: request.user.clone(),
        safety_identifier: request.safety_identifier.clone(),
        prompt_cache_key: request.prompt_cache_key.clone(),
        metadata,
        include_logprobs,
        truncation,
    };
    let store = request.store.unwrap_or(true);
    let background = request.background.unwrap_or(false);
    if background && !store {
        return Err(ApiError::invalid(
            "a background response is stored, to be polled with GET /v1/responses/{id}: \
             background needs store true",
            "background",
        ));
    }
    Ok(ValidResponses {
        store,
        background,
        request: ValidRequest {
            prompt: PromptInput::Chat(turns),
            max_tokens: max_output_tokens,
            sampling,
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            stream: common.stream,
            include_usage: false,
            continuous_usage: false,
            logprobs,
            logprobs_format: LogprobsFormat::Chat,
            prompt_param: "input",
            n: 1,
            tools,
            chat_echo: None,
            rendering: super::ChatRendering::default(),
            // The route names `text.format.schema` itself.
            grammar_param: None,
            output: super::OutputOptions::default(),
            truncate_prompt: None,
            prompt_logprobs: None,
            bad_words: Vec::new(),
            client_request_id: None,
            candidates: 1,
            echo: false,
            cache_salt: super::sampling::cache_salt(request.cache_salt.as_deref())?,
            priority: super::sampling::priority(request.priority)?,
            prediction: None,
            lora: common.lora,
        },
        echo,
    })
}

/// What the route follows before validation (`previous_response_id`, `conversation`): a
/// request that still has one was not followed.
fn refuse_state(request: &ResponsesRequest) -> Result<(), ApiError> {
    if request.previous_response_id.is_some() {
        return Err(ApiError::unsupported(
            "previous_response_id is followed by the route, not here",
            "previous_response_id",
        ));
    }
    if request.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::unsupported(
            "conversation is followed by the route, not here",
            "conversation",
        ));
    }
    Ok(())
}

/// Keys of a function tool: the declaration, and settings whose default tandem serves.
const FUNCTION_TOOL_KEYS: &[&str] = &[
    "type",
    "name",
    "description",
    "parameters",
    "strict",
    "defer_loading",
    "allowed_callers",
    "output_schema",
    "async",
];

/// `tools`, `tool_choice` and `parallel_tool_calls`: `None` when no tool is declared (then
/// only `tool_choice` "none" or "auto" is accepted, as an agent without tools sends).
fn check_tools(
    request: &ResponsesRequest,
    tool_calling: bool,
) -> Result<Option<ToolRequest>, ApiError> {
    let declared = request.tools.as_deref().unwrap_or_default();
    if declared.is_empty() {
        return match &request.tool_choice {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(choice)) if choice == "none" || choice == "auto" => Ok(None),
            Some(other) => Err(ApiError::invalid(
                format!("tool_choice {other} needs a tool, and tools declares none"),
                "tool_choice",
            )),
        };
    }
    let mut names = HashSet::new();
    let mut defs = Vec::with_capacity(declared.len());
    for (i, tool) in declared.iter().enumerate() {
        let param = format!("tools[{i}]");
        let Some(object) = tool.as_object() else {
            return Err(ApiError::invalid(
                "a tool must be an object ({\"type\": \"function\", \"name\": ...})",
                &param,
            ));
        };
        match object.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    format!(
                        "{param}.type {other:?} is not supported: tandem serves function tools \
                         (\"function\"), not hosted ones"
                    ),
                    &format!("{param}.type"),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    "a tool needs `type`: \"function\"",
                    &format!("{param}.type"),
                ));
            }
        }
        if let Some(key) = object
            .keys()
            .find(|k| !FUNCTION_TOOL_KEYS.contains(&k.as_str()))
        {
            return Err(ApiError::unknown_field(
                "A function tool",
                &format!("{param}.{key}"),
            ));
        }
        function_tool_settings(object, &param)?;
        let text = |key: &str| -> Result<Option<&str>, ApiError> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(ApiError::invalid(
                    format!("{key} must be a string"),
                    &format!("{param}.{key}"),
                )),
            }
        };
        let strict = match object.get("strict") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(ApiError::invalid(
                    "strict must be a boolean",
                    &format!("{param}.strict"),
                ));
            }
        };
        defs.push(function_def(
            FunctionFields {
                name: text("name")?,
                description: text("description")?,
                parameters: object.get("parameters"),
                strict,
            },
            &param,
            &mut names,
        )?);
    }
    let choice = tool_choice(request.tool_choice.as_ref(), &names)?;
    tool_request(
        defs,
        choice,
        request.parallel_tool_calls.unwrap_or(true),
        tool_calling,
    )
    .map(Some)
}

/// A function tool's settings beyond its declaration: accepted at the values that ask for
/// what tandem does (the tool is shown to the model and called by it directly), refused by
/// name otherwise.
fn function_tool_settings(
    tool: &serde_json::Map<String, Value>,
    param: &str,
) -> Result<(), ApiError> {
    let refuse = |key: &str, why: &str| {
        Err(ApiError::unsupported(
            format!("{key} is not supported: {why}"),
            &format!("{param}.{key}"),
        ))
    };
    for key in ["defer_loading", "async"] {
        match tool.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) if key == "defer_loading" => {
                return refuse(
                    key,
                    "tandem has no tool search; every tool is shown to the model",
                );
            }
            Some(Value::Bool(true)) => {
                return refuse(key, "a call's output is awaited before the model goes on");
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("{key} must be a boolean"),
                    &format!("{param}.{key}"),
                ));
            }
        }
    }
    match tool.get("allowed_callers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(callers)) if callers.iter().all(|c| c == "direct") => {}
        Some(_) => {
            return refuse(
                "allowed_callers",
                "the model calls tools directly (only [\"direct\"])",
            );
        }
    }
    match tool.get("output_schema") {
        None | Some(Value::Null) => Ok(()),
        Some(_) => refuse(
            "output_schema",
            "the model is not shown a schema of the tool's output; describe it in description",
        ),
    }
}

/// `tool_choice` with tools declared (`names`).
fn tool_choice(choice: Option<&Value>, names: &HashSet<String>) -> Result<ToolChoice, ApiError> {
    let named = match choice {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(mode)) => {
            return match mode.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                other => Err(ApiError::invalid(
                    format!(
                        "tool_choice must be \"none\", \"auto\", \"required\" or \
                         {{\"type\": \"function\", \"name\": ...}}, got {other:?}"
                    ),
                    "tool_choice",
                )),
            };
        }
        Some(Value::Object(named)) => named,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("tool_choice must be a string or an object, got {other}"),
                "tool_choice",
            ));
        }
    };
    match named.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(ApiError::unsupported(
                format!(
                    "tool_choice type {other:?} is not supported: tandem serves function tools \
                     (\"none\", \"auto\", \"required\" or a named function)"
                ),
                "tool_choice.type",
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "a named tool_choice needs `type`: \"function\"",
                "tool_choice.type",
            ));
        }
    }
    if let Some(key) = named
        .keys()
        .find(|k| !["type", "name"].contains(&k.as_str()))
    {
        return Err(ApiError::unknown_field(
            "A named tool_choice",
            &format!("tool_choice.{key}"),
        ));
    }
    let name = named
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("a named tool_choice needs name", "tool_choice.name"))?;
    if !names.contains(name) {
        return Err(ApiError::invalid(
            format!("tool_choice names function {name:?}, which is not in tools"),
            "tool_choice.name",
        ));
    }
    Ok(ToolChoice::Named(name.to_string()))
}

/// The declared tools as the response echoes them (OpenAI's flat function shape).
fn echoed_tools(request: &ResponsesRequest) -> Vec<Value> {
    request
        .tools
        .iter()
        .flatten()
        .map(|tool| {
            serde_json::json!({
                "type": "function",
                "name": tool.get("name"),
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            })
        })
        .collect()
}

fn check_reasoning(request: &ResponsesRequest, parser: ReasoningParser) -> Result<(), ApiError> {
    let Some(reasoning) = &request.reasoning else {
        return Ok(());
    };
    for (name, value) in [
        ("effort", &reasoning.effort),
        ("summary", &reasoning.summary),
        ("generate_summary", &reasoning.generate_summary),
    ] {
        let Some(value) = value else {
            continue;
        };
        // `none` asks for no reasoning: what a model served without a reasoning parser does.
        if value == "none" && parser == ReasoningParser::None {
            continue;
        }
        return Err(ApiError::unsupported(
            format!(
                "reasoning.{name} {value:?} is not supported: tandem has no reasoning effort or \
                 summary setting (a reasoning model's thinking is switched by its chat template)"
            ),
            &format!("reasoning.{name}"),
        ));
    }
    Ok(())
}

/// `include`: whether the output's logprobs are wanted.
fn check_include(include: &[String]) -> Result<bool, ApiError> {
    let mut logprobs = false;
    for (i, value) in include.iter().enumerate() {
        match value.as_str() {
            INCLUDE_LOGPROBS => logprobs = true,
            INCLUDE_REASONING => {}
            other => {
                return Err(ApiError::unsupported(
                    format!(
                        "include {other:?} is not supported: tandem serves text only, without \
                         tools or image inputs (supported: \"{INCLUDE_LOGPROBS}\", \
                         \"{INCLUDE_REASONING}\")"
                    ),
                    &format!("include[{i}]"),
                ));
            }
        }
    }
    Ok(logprobs)
}

/// `text`: the config the response echoes, and the grammar a JSON format puts on the sampler.
fn text_format(text: Option<&TextConfig>) -> Result<(TextConfig, Option<GrammarSpec>), ApiError> {
    let mut echo = text.cloned().unwrap_or_default();
    if echo.verbosity.is_some() {
        return Err(ApiError::unsupported(
            "text.verbosity is not supported: the served model has no verbosity \
             setting",
            "text.verbosity",
        ));
    }
    let format = echo.format.get_or_insert(TextFormat::Text);
    let grammar = match format {
        TextFormat::Text => None,
        TextFormat::JsonObject => Some(GrammarSpec::JsonSchema {
            schema: serde_json::json!({"type": "object"}),
        }),
        TextFormat::JsonSchema { name, schema, .. } => {
            if name.is_empty() {
                return Err(ApiError::invalid(
                    "text.format.name must not be empty",
                    "text.format.name",
                ));
            }
            if !schema.is_object() {
                return Err(ApiError::invalid(
                    "text.format.schema must be a JSON Schema object",
                    "text.format.schema",
                ));
            }
            Some(GrammarSpec::JsonSchema {
                schema: schema.clone(),
            })
        }
    };
    Ok((echo, grammar))
}

/// `metadata` checked against OpenAI's limits (16 pairs of strings, keys of at most 64
/// characters, values of at most 512).
pub fn metadata(
    metadata: Option<&BTreeMap<String, Value>>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(metadata) = metadata else {
        return Ok(BTreeMap::new());
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(ApiError::invalid(
            format!(
                "metadata has {} pairs; at most {MAX_METADATA_PAIRS} are allowed",
                metadata.len()
            ),
            "metadata",
        ));
    }
    metadata
        .iter()
        .map(|(key, value)| {
            let param = format!("metadata.{key}");
            if key.chars().count() > MAX_METADATA_KEY_CHARS {
                return Err(ApiError::invalid(
                    format!("metadata keys are at most {MAX_METADATA_KEY_CHARS} characters"),
                    &param,
                ));
            }
            match value {
                Value::String(s) if s.chars().count() <= MAX_METADATA_VALUE_CHARS => {
                    Ok((key.clone(), s.clone()))
                }
                Value::String(_) => Err(ApiError::invalid(
                    format!("metadata values are at most {MAX_METADATA_VALUE_CHARS} characters"),
                    &param,
                )),
                other => Err(ApiError::invalid(
                    format!("metadata values must be strings, got {other}"),
                    &param,
                )),
            }
        })
        .collect()
}

/// Keys an input message may carry: its own, and those of an output message sent back (an
/// earlier response's `output` item, as the Agents SDK replays a conversation).
const MESSAGE_KEYS: &[&str] = &["type", "role", "content", "id", "status", "phase"];
/// Keys of a text content part: `input_text`, or an `output_text` sent back.
const TEXT_PART_KEYS: &[&str] = &["type", "text", "annotations", "logprobs"];

/// Keys of a `function_call` item (a call the model made, sent back with the conversation).
const FUNCTION_CALL_KEYS: &[&str] = &["type", "id", "call_id", "name", "arguments", "status"];
/// Keys of a `function_call_output` item (the result of a call).
const FUNCTION_CALL_OUTPUT_KEYS: &[&str] = &["type", "id", "call_id", "output", "status"];

/// The calls the input has made so far, by call id: a `function_call_output` must answer
/// one, and takes its function's name from it.
#[derive(Debug, Default)]
struct CallsSoFar {
    names: BTreeMap<String, String>,
}

/// One input item, onto `turns`: a message (`type` "message" or absent) with text content; a
/// `function_call`, which joins the assistant turn before it (its text, or calls made in the
/// same turn) or starts one; a `function_call_output`, a tool turn answering a call made
/// earlier in the input.
fn input_item(
    param: String,
    item: &Value,
    turns: &mut Vec<Turn>,
    calls: &mut CallsSoFar,
) -> Result<(), ApiError> {
    let Some(object) = item.as_object() else {
        return Err(ApiError::invalid(
            "an input item must be an object (a message with role and content, or a \
             function_call or function_call_output)",
            &param,
        ));
    };
    match object.get("type").and_then(Value::as_str) {
        None | Some("message") => {
            let turn = message_item(&param, object)?;
            match turns.last_mut() {
                // The answer of the turn a reasoning item began.
                Some(last) if turn.role == Role::Assistant && is_thinking_alone(last) => {
                    last.content = turn.content;
                }
                _ => turns.push(turn),
            }
            Ok(())
        }
        Some("reasoning") => {
            let text = reasoning_item(&param, object)?;
            match turns.last_mut() {
                Some(last) if is_thinking_alone(last) => {
                    let thinking = last.reasoning.get_or_insert_with(String::new);
                    thinking.push_str("\n\n");
                    thinking.push_str(&text);
                }
                _ => {
                    let mut turn = Turn::text(Role::Assistant, "");
                    turn.reasoning = Some(text);
                    turns.push(turn);
                }
            }
            Ok(())
        }
        Some("function_call") => {
            let call = function_call_item(&param, object)?;
            if calls.names.contains_key(&call.id) {
                return Err(ApiError::invalid(
                    format!("call_id {:?} is used by an earlier function_call", call.id),
                    &format!("{param}.call_id"),
                ));
            }
            calls.names.insert(call.id.clone(), call.name.clone());
            match turns.last_mut() {
                Some(turn) if turn.role == Role::Assistant => turn.tool_calls.push(call),
                _ => {
                    let mut turn = Turn::text(Role::Assistant, "");
                    turn.tool_calls.push(call);
                    turns.push(turn);
                }
            }
            Ok(())
        }
        Some("function_call_output") => {
            turns.push(function_call_output_item(&param, object, calls)?);
            Ok(())
        }
        Some(other) => Err(ApiError::unsupported(
            format!(
                "input item type {other:?} is not supported: /v1/responses serves messages \
                 with text content, reasoning, function_call and function_call_output (no \
                 hosted tool calls or item references)"
            ),
            &format!("{param}.type"),
        )),
    }
}

/// Item `index` of a conversation's `items` (`POST /v1/conversations` or its `/items`), as
/// a response's input takes items: a message with text content, a `function_call` or a
/// `function_call_output`. An output's call may be anywhere earlier in the conversation, so
/// it is not looked for here (a response whose input answers no call is refused then).
pub fn check_conversation_item(index: usize, item: &Value) -> Result<(), ApiError> {
    let mut calls = CallsSoFar::default();
    if item.get("type").and_then(Value::as_str) == Some("function_call_output")
        && let Some(call_id) = item.get("call_id").and_then(Value::as_str)
    {
        calls.names.insert(call_id.to_string(), String::new());
    }
    let mut turns = Vec::new();
    input_item(format!("items[{index}]"), item, &mut turns, &mut calls)
}

/// Keys of a `reasoning` item (an earlier response's thinking, sent back).
const REASONING_KEYS: &[&str] = &[
    "type",
    "id",
    "summary",
    "content",
    "encrypted_content",
    "status",
];

/// Whether `turn` is an assistant turn begun by a reasoning item, with no answer or call yet.
fn is_thinking_alone(turn: &Turn) -> bool {
    turn.role == Role::Assistant
        && turn.reasoning.is_some()
        && turn.content.is_empty()
        && turn.tool_calls.is_empty()
}

/// A `reasoning` item's text: its `reasoning_text` content parts (a tandem response's), else
/// its `summary_text` parts, joined. It begins the assistant turn the next message or call
/// items finish, and reaches the chat template as that turn's `reasoning_content`.
fn reasoning_item(
    param: &str,
    object: &serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    if let Some(key) = object
        .keys()
        .find(|k| !REASONING_KEYS.contains(&k.as_str()))
    {
        return Err(ApiError::unknown_field(
            "A reasoning item",
            &format!("{param}.{key}"),
        ));
    }
    if !matches!(object.get("encrypted_content"), None | Some(Value::Null)) {
        return Err(ApiError::invalid(
            "encrypted reasoning cannot be read here: tandem's reasoning items carry their \
             text in content",
            &format!("{param}.encrypted_content"),
        ));
    }
    let parts = |key: &str, kind: &str| -> Result<Vec<String>, ApiError> {
        let Some(value) = object.get(key).filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        let Some(parts) = value.as_array() else {
            return Err(ApiError::invalid(
                format!("{key} must be a list of {kind} parts"),
                &format!("{param}.{key}"),
            ));
        };
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let at = format!("{param}.{key}[{i}]");
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some(t), Some(text)) if t == kind => Ok(text.to_string()),
                    (Some(t), _) if t == kind => Err(ApiError::invalid(
                        format!("a {kind} part needs text (a string)"),
                        &format!("{at}.text"),
                    )),
                    _ => Err(ApiError::invalid(
                        format!("{key} holds {kind} parts"),
                        &format!("{at}.type"),
                    )),
                }
            })
            .collect()
    };
    let content = parts("content", "reasoning_text")?;
    let summary = parts("summary", "summary_text")?;
    Ok(if content.is_empty() { summary } else { content }.join("\n\n"))
}

/// A string field of an input item, required.
fn required_text<'a>(
    object: &'a serde_json::Map<String, Value>,
    key: &str,
    param: &str,
    what: &str,
) -> Result<&'a str, ApiError> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        _ => Err(ApiError::invalid(
            format!("{what} needs {key} (a string)"),
            &format!("{param}.{key}"),
        )),
    }
}

/// A `function_call` item: the call as the history records it.
fn function_call_item(
    param: &str,
    object: &serde_json::Map<String, Value>,
) -> Result<ToolCallRecord, ApiError> {
    if let Some(key) = object
        .keys()
        .find(|k| !FUNCTION_CALL_KEYS.contains(&k.as_str()))
    {
        return Err(ApiError::unknown_field(
            "A function_call item",
            &format!("{param}.{key}"),
        ));
    }
    let call_id = required_text(object, "call_id", param, "a function_call")?;
    if call_id.is_empty() {
        return Err(ApiError::invalid(
            "call_id must not be empty",
            &format!("{param}.call_id"),
        ));
    }
    let name = required_text(object, "name", param, "a function_call")?;
    check_function_name(name, &format!("{param}.name"))?;
    let arguments = required_text(object, "arguments", param, "a function_call")?;
    Ok(ToolCallRecord {
        id: call_id.to_string(),
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

/// A `function_call_output` item: a tool turn answering a call of the input.
fn function_call_output_item(
    param: &str,
    object: &serde_json::Map<String, Value>,
    calls: &CallsSoFar,
) -> Result<Turn, ApiError> {
    if let Some(key) = object
        .keys()
        .find(|k| !FUNCTION_CALL_OUTPUT_KEYS.contains(&k.as_str()))
    {
        return Err(ApiError::unknown_field(
            "A function_call_output item",
            &format!("{param}.{key}"),
        ));
    }
    let call_id = required_text(object, "call_id", param, "a function_call_output")?;
    let Some(name) = calls.names.get(call_id) else {
        return Err(ApiError::invalid(
            format!(
                "call_id {call_id:?} answers no function_call earlier in input (tandem stores \
                 no responses: send the call's function_call item before its output)"
            ),
            &format!("{param}.call_id"),
        ));
    };
    let output = match object.get("output") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                texts.push(text_part(&format!("{param}.output[{i}]"), part)?);
            }
            texts.join("\n")
        }
        _ => {
            return Err(ApiError::invalid(
                "a function_call_output needs output: a string or a list of input_text parts",
                &format!("{param}.output"),
            ));
        }
    };
    let mut turn = Turn::text(Role::Tool, output);
    turn.tool_call_id = Some(call_id.to_string());
    turn.name = Some(name.clone());
    Ok(turn)
}

/// A message item with text content.
fn message_item(param: &str, object: &serde_json::Map<String, Value>) -> Result<Turn, ApiError> {
    let param = param.to_string();
    if let Some(key) = object.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
        return Err(ApiError::unknown_field(
            "An input message",
            &format!("{param}.{key}"),
        ));
    }
    let role = match object.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("system" | "developer") => Role::System,
        Some("assistant") => Role::Assistant,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("role {other:?} is not supported (user, assistant, system or developer)"),
                &format!("{param}.role"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "an input message needs a role",
                &format!("{param}.role"),
            ));
        }
    };
    let content = match object.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                texts.push(text_part(&format!("{param}.content[{i}]"), part)?);
            }
            texts.join("\n")
        }
        _ => {
            return Err(ApiError::invalid(
                "an input message needs content: a string or a list of input_text parts",
                &format!("{param}.content"),
            ));
        }
    };
    Ok(Turn::text(role, content))
}

fn text_part(param: &str, part: &Value) -> Result<String, ApiError> {
    let kind = part.get("type").and_then(Value::as_str);
    match kind {
        Some("input_text" | "output_text") => {}
        Some(other) => {
            return Err(ApiError::unsupported(
                format!(
                    "content part type {other:?} is not supported: tandem takes text only \
                     (input_text)"
                ),
                &format!("{param}.type"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "a content part needs a type (input_text)",
                &format!("{param}.type"),
            ));
        }
    }
    if let Some(key) = part
        .as_object()
        .and_then(|o| o.keys().find(|k| !TEXT_PART_KEYS.contains(&k.as_str())))
    {
        return Err(ApiError::unknown_field(
            "A text content part",
            &format!("{param}.{key}"),
        ));
    }
    match part.get("text") {
        Some(Value::String(text)) => Ok(text.clone()),
        _ => Err(ApiError::invalid(
            "a text content part needs text (a string)",
            &format!("{param}.text"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn limits() -> ModelLimits {
        ModelLimits {
            adapters: Default::default(),
            served_model_name: "smol".into(),
            max_model_len: 100,
            vocab_size: 1000,
            tool_support: None,
            sampling_defaults: Default::default(),
            reasoning_parser: Default::default(),
        }
    }

    fn validate(body: Value) -> Result<ValidResponses, ApiError> {
        let request: ResponsesRequest = serde_json::from_value(body).unwrap();
        validate_responses(&request, &limits())
    }

    fn param_of(result: Result<ValidResponses, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    fn turn(role: Role, content: &str) -> Turn {
        Turn::text(role, content)
    }

    #[test]
    fn the_echoed_sampling_is_what_the_request_ran_with_model_defaults_included() {
        let limits = ModelLimits {
            sampling_defaults: crate::validation::SamplingDefaults {
                temperature: Some(0.2),
                top_p: Some(0.9),
                ..Default::default()
            },
            ..limits()
        };
        let request: ResponsesRequest = serde_json::from_value(json!({"input": "x"})).unwrap();
        let valid = validate_responses(&request, &limits).unwrap();
        assert_eq!((valid.echo.temperature, valid.echo.top_p), (0.2, 0.9));
        assert_eq!(valid.request.sampling.temperature, 0.2);
    }

    #[test]
    fn a_string_input_is_one_user_turn_after_the_instructions() {
        let valid = validate(json!({"input": "Hi", "instructions": "Be brief.",
                                    "max_output_tokens": 20, "temperature": 0}))
        .unwrap();
        assert_eq!(
            valid.request.prompt,
            PromptInput::Chat(vec![
                turn(Role::System, "Be brief."),
                turn(Role::User, "Hi")
            ])
        );
        assert_eq!(valid.request.max_tokens, Some(20));
        assert_eq!(valid.request.prompt_param, "input");
        assert_eq!(valid.request.sampling.temperature, 0.0);
        assert_eq!(valid.echo.instructions.as_deref(), Some("Be brief."));
        assert_eq!(valid.echo.tool_choice, json!("auto"));
        assert!(valid.echo.parallel_tool_calls);
        assert_eq!(valid.echo.text.format, Some(TextFormat::Text));
        assert!(!valid.request.stream && valid.request.logprobs.is_none());
    }

    #[test]
    fn message_items_of_every_form_become_turns() {
        let valid = validate(json!({"input": [
            {"role": "developer", "content": "sys"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            // An earlier response's output item, sent back as the Agents SDK does.
            {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "c", "annotations": [], "logprobs": []}]},
            {"role": "user", "content": "d"}
        ], "store": true, "tools": [], "include": [], "tool_choice": "auto",
           "parallel_tool_calls": false, "reasoning": {"effort": null}, "truncation": "disabled",
           "metadata": {"team": "infra"}, "user": "u-1", "service_tier": "auto"}))
        .unwrap();
        assert_eq!(
            valid.request.prompt,
            PromptInput::Chat(vec![
                turn(Role::System, "sys"),
                turn(Role::User, "a\nb"),
                turn(Role::Assistant, "c"),
                turn(Role::User, "d"),
            ])
        );
        assert_eq!(
            valid.echo.metadata.get("team").map(String::as_str),
            Some("infra")
        );
        assert!(!valid.echo.parallel_tool_calls);
    }

    #[test]
    fn logprobs_come_with_include() {
        let valid = validate(json!({"input": "x", "include": [INCLUDE_LOGPROBS],
                                    "top_logprobs": 3}))
        .unwrap();
        assert_eq!(valid.request.logprobs, Some(3));
        assert_eq!(valid.request.sampling.logprobs, Some(3));
        assert!(valid.echo.include_logprobs);
        let valid = validate(json!({"input": "x", "include": [INCLUDE_LOGPROBS]})).unwrap();
        assert_eq!(valid.request.logprobs, Some(0));
    }

    #[test]
    fn json_formats_become_a_grammar() {
        let valid =
            validate(json!({"input": "x", "text": {"format": {"type": "json_object"}}})).unwrap();
        assert_eq!(
            valid.request.sampling.grammar,
            Some(GrammarSpec::JsonSchema {
                schema: json!({"type": "object"})
            })
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}},
                            "required": ["a"]});
        let valid = validate(
            json!({"input": "x", "text": {"format": {"type": "json_schema",
            "name": "thing", "schema": schema, "strict": true}}}),
        )
        .unwrap();
        assert_eq!(
            valid.request.sampling.grammar,
            Some(GrammarSpec::JsonSchema { schema })
        );
        assert!(matches!(
            valid.echo.text.format,
            Some(TextFormat::JsonSchema { ref name, .. }) if name == "thing"
        ));
    }

    fn tool_limits() -> ModelLimits {
        ModelLimits {
            tool_support: Some(crate::tools::ToolSupport {
                format: crate::tools::ToolFormat::Hermes,
                native: false,
            }),
            ..limits()
        }
    }

    fn validate_with_tools(body: Value) -> Result<ValidResponses, ApiError> {
        let request: ResponsesRequest = serde_json::from_value(body).unwrap();
        validate_responses(&request, &tool_limits())
    }

    fn weather() -> Value {
        json!({"type": "function", "name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]},
               "strict": true})
    }

    /// A conversation as the Agents SDK sends its second turn: the question, the model's text
    /// and call (items of the first response), the call's output.
    #[test]
    fn reasoning_items_begin_the_assistant_turn_their_answer_or_calls_finish() {
        let valid = validate_with_tools(json!({"input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"id": "rs_1", "type": "reasoning", "summary": [], "status": "completed",
             "encrypted_content": null,
             "content": [{"type": "reasoning_text", "text": "Need the tool."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\": \"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Warm."}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "21 C.", "annotations": []}]},
            {"role": "user", "content": "Thanks"},
        ], "tools": [weather()]}))
        .unwrap();
        let PromptInput::Chat(turns) = &valid.request.prompt else {
            panic!("a chat prompt");
        };
        let shape: Vec<(Role, &str, Option<&str>, usize)> = turns
            .iter()
            .map(|t| {
                (
                    t.role,
                    t.content.as_str(),
                    t.reasoning.as_deref(),
                    t.tool_calls.len(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (Role::User, "Weather in Paris?", None, 0),
                (Role::Assistant, "", Some("Need the tool."), 1),
                (Role::Tool, "21 C", None, 0),
                (Role::Assistant, "21 C.", Some("Warm."), 0),
                (Role::User, "Thanks", None, 0),
            ]
        );
        for (item, param) in [
            (
                json!({"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}),
                "input[0].encrypted_content",
            ),
            (
                json!({"type": "reasoning", "summary": [], "signature": "x"}),
                "input[0].signature",
            ),
            (
                json!({"type": "reasoning", "content": [{"type": "output_text", "text": "x"}]}),
                "input[0].content[0].type",
            ),
        ] {
            let err = validate_with_tools(json!({"input": [item], "tools": [weather()]}));
            assert_eq!(param_of(err), param);
        }
    }

    #[test]
    fn function_calls_and_their_outputs_become_tool_turns() {
        let valid = validate_with_tools(json!({"input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
            {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\": \"Paris\"}", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather",
             "arguments": "{\"city\": \"Lyon\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "19 C"}]},
        ], "tools": [weather()], "tool_choice": "auto", "parallel_tool_calls": true}))
        .unwrap();
        let PromptInput::Chat(turns) = &valid.request.prompt else {
            panic!("a chat prompt");
        };
        assert_eq!(turns.len(), 4, "{turns:?}");
        assert_eq!(turns[1].role, Role::Assistant);
        assert_eq!(turns[1].content, "Let me check.");
        let calls: Vec<(&str, &str, &str)> = turns[1]
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("call_1", "get_weather", "{\"city\": \"Paris\"}"),
                ("call_2", "get_weather", "{\"city\": \"Lyon\"}")
            ]
        );
        for (turn, (id, content)) in turns[2..]
            .iter()
            .zip([("call_1", "21 C"), ("call_2", "19 C")])
        {
            assert_eq!(turn.role, Role::Tool);
            assert_eq!(turn.tool_call_id.as_deref(), Some(id));
            assert_eq!(turn.name.as_deref(), Some("get_weather"));
            assert_eq!(turn.content, content);
        }
        let tools = valid.request.tools.expect("tools");
        assert_eq!(tools.tools[0].name, "get_weather");
        assert!(tools.tools[0].strict);
        assert_eq!(tools.choice, ToolChoice::Auto);
        assert!(valid.request.sampling.grammar.is_none());
        assert_eq!(valid.echo.tools, vec![weather()]);

        // A call with no text before it starts an assistant turn of its own.
        let valid = validate_with_tools(json!({"input": [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
        ], "tools": [weather()]}))
        .unwrap();
        let PromptInput::Chat(turns) = &valid.request.prompt else {
            panic!("a chat prompt");
        };
        assert_eq!(
            (turns[1].role, turns[1].content.as_str()),
            (Role::Assistant, "")
        );
        assert_eq!(turns[1].tool_calls.len(), 1);
    }

    #[test]
    fn required_and_named_choices_become_a_grammar() {
        for choice in [
            json!("required"),
            json!({"type": "function", "name": "get_weather"}),
        ] {
            let valid = validate_with_tools(json!({"input": "x", "tools": [weather()],
                                                   "tool_choice": choice}))
            .unwrap();
            assert!(
                matches!(
                    valid.request.sampling.grammar,
                    Some(GrammarSpec::Lark { .. })
                ),
                "{choice}"
            );
            assert_eq!(valid.echo.tool_choice, choice);
        }
        let valid =
            validate_with_tools(json!({"input": "x", "tools": [weather()], "tool_choice": "none"}))
                .unwrap();
        assert!(!valid.request.tools.unwrap().active());
        assert!(valid.request.sampling.grammar.is_none());
    }

    #[test]
    fn refused_tools_name_their_field() {
        let cases = [
            (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({"tools": [{"name": "f"}]}), "tools[0].type"),
            (json!({"tools": ["f"]}), "tools[0]"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools[0].function",
            ),
            (json!({"tools": [{"type": "function"}]}), "tools[0].name"),
            (
                json!({"tools": [{"type": "function", "name": "a b"}]}),
                "tools[0].name",
            ),
            (json!({"tools": [weather(), weather()]}), "tools[1].name"),
            (
                json!({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}),
                "tools[0].parameters",
            ),
            (
                json!({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}),
                "tools[0].strict",
            ),
            (
                json!({"tools": [{"type": "function", "name": "f", "defer_loading": true}]}),
                "tools[0].defer_loading",
            ),
            (
                json!({"tools": [{"type": "function", "name": "f", "allowed_callers": ["programmatic"]}]}),
                "tools[0].allowed_callers",
            ),
            (
                json!({"tools": [{"type": "function", "name": "f", "output_schema": {"type": "string"}}]}),
                "tools[0].output_schema",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "name": "g"}}),
                "tool_choice.name",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "file_search"}}),
                "tool_choice.type",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}),
                "tool_choice.type",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                "tool_choice.function",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "required",
                       "text": {"format": {"type": "json_object"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}),
                "input[0].arguments",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                  "arguments": "{}", "colour": 1}]}),
                "input[0].colour",
            ),
            (
                json!({"input": [
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}),
                "input[1].call_id",
            ),
            (
                json!({"input": [
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c"}]}),
                "input[1].output",
            ),
            (
                json!({"input": [
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c",
                     "output": [{"type": "input_image", "image_url": "u"}]}]}),
                "input[1].output[0].type",
            ),
        ];
        for (mut body, param) in cases {
            body.as_object_mut()
                .unwrap()
                .entry("input")
                .or_insert(json!("x"));
            assert_eq!(param_of(validate_with_tools(body.clone())), param, "{body}");
        }
        // Hosted tools and unknown tool fields say which kind of refusal they are.
        let code = |body: Value| match validate_with_tools(body) {
            Err(ApiError::InvalidRequest { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            code(json!({"input": "x", "tools": [{"type": "web_search"}]})),
            Some("unsupported_parameter")
        );
        assert_eq!(
            code(json!({"input": "x", "tools": [{"type": "function", "name": "f", "colour": 1}]})),
            Some("unknown_parameter")
        );
        // With tool calling off on the server, declared tools are refused unless unused.
        assert_eq!(
            param_of(validate(json!({"input": "x", "tools": [weather()]}))),
            "tools"
        );
        assert!(
            validate(json!({"input": "x", "tools": [weather()], "tool_choice": "none"})).is_ok()
        );
    }

    #[test]
    fn truncation_starts_at_user_turns_after_the_system_ones() {
        let valid = validate(
            json!({"instructions": "sys", "truncation": "auto", "input": [
                {"role": "system", "content": "s2"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"},
            ]}),
        )
        .unwrap();
        assert_eq!(valid.echo.truncation, Truncation::Auto);
        let PromptInput::Chat(turns) = &valid.request.prompt else {
            panic!("a chat prompt");
        };
        assert_eq!(truncation_starts(turns), [2, 4, 6]);
        assert_eq!(
            truncation_starts(&[turn(Role::System, "s"), turn(Role::Assistant, "x")]),
            Vec::<usize>::new()
        );
        assert_eq!(
            validate(json!({"input": "x"})).unwrap().echo.truncation,
            Truncation::Disabled
        );
    }

    #[test]
    fn refused_values_name_their_field() {
        let cases = [
            (json!({}), "input"),
            (json!({"input": []}), "input"),
            (
                json!({"input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (
                json!({"input": "x", "conversation": "conv_1"}),
                "conversation",
            ),
            (
                json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}),
                "tools",
            ),
            (
                json!({"input": "x", "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning.effort",
            ),
            (
                json!({"input": "x", "truncation": "sometimes"}),
                "truncation",
            ),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "temperature": 3}), "temperature"),
            (json!({"input": "x", "top_p": 0}), "top_p"),
            (json!({"input": "x", "top_logprobs": 2}), "top_logprobs"),
            (
                json!({"input": "x", "include": [INCLUDE_LOGPROBS], "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"input": "x", "include": ["file_search_call.results"]}),
                "include[0]",
            ),
            (
                json!({"input": "x", "text": {"verbosity": "low"}}),
                "text.verbosity",
            ),
            (
                json!({"input": "x", "stream_options": {"include_obfuscation": false}}),
                "stream_options",
            ),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata.k"),
            (
                json!({"input": [{"role": "tool", "content": "x"}]}),
                "input[0].role",
            ),
            (json!({"input": [{"role": "user"}]}), "input[0].content"),
            (
                json!({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": [{"type": "web_search_call", "id": "ws_1"}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"role": "user", "content": "x", "colour": "red"}]}),
                "input[0].colour",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(validate(body.clone())), param, "{body}");
        }
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            param_of(validate(json!({"input": "x", "metadata": many}))),
            "metadata"
        );
        assert!(matches!(
            validate(json!({"model": "gpt-4o", "input": "x"})),
            Err(ApiError::ModelNotFound { .. })
        ));
    }
}
