//! `/v1/responses` requests → the same [`ValidRequest`] chat completions produce, plus the
//! settings the `response` object echoes back.
//!
//! tandem is stateless: it stores no response, so `store` is accepted (OpenAI's default is
//! true and SDKs send it) and answered with `store: false`, and what needs a stored response
//! (`previous_response_id`, `conversation`) is a 400 that says to send the whole conversation
//! in `input`. Tools are served on `/v1/chat/completions`; here only an empty tool list is
//! accepted, so an agent without tools runs unchanged.

use std::collections::BTreeMap;

use serde_json::Value;
use tandem_protocol::messages::GrammarSpec;

use super::{
    CommonFields, LogprobsFormat, ModelLimits, PromptInput, Role, Turn, ValidRequest, token_limit,
    top_logprobs, validate_common,
};
use crate::error::ApiError;
use crate::openai::{GenerationFields, ResponseInput, ResponsesRequest, TextConfig, TextFormat};

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
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// `include` asked for the output's logprobs.
    pub include_logprobs: bool,
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
            include_usage: None,
            has_stream_options: request.stream_options.is_some(),
        },
        limits,
    )?;
    refuse_state(request)?;
    check_tools(request)?;
    check_reasoning(request)?;
    match request.truncation.as_deref() {
        None | Some("disabled") => {}
        Some("auto") => {
            return Err(ApiError::invalid(
                "truncation \"auto\" is not supported: an input longer than the context is a \
                 400 (truncation \"disabled\"); shorten the input",
                "truncation",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("truncation must be \"auto\" or \"disabled\", got {other:?}"),
                "truncation",
            ));
        }
    }
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
            for (i, item) in items.iter().enumerate() {
                turns.push(input_item(i, item)?);
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
        user: request.user.clone(),
        safety_identifier: request.safety_identifier.clone(),
        prompt_cache_key: request.prompt_cache_key.clone(),
        metadata,
        include_logprobs,
    };
    Ok(ValidResponses {
        request: ValidRequest {
            prompt: PromptInput::Chat(turns),
            max_tokens: max_output_tokens,
            sampling,
            stop_strings: Vec::new(),
            ignore_eos: false,
            stream: common.stream,
            include_usage: false,
            logprobs,
            logprobs_format: LogprobsFormat::Chat,
            prompt_param: "input",
            n: 1,
            // Tools on /v1/responses are refused at the edge (docs/api.md).
            tools: None,
            candidates: 1,
            echo: false,
            cache_salt: super::sampling::cache_salt(request.cache_salt.as_deref())?,
        },
        echo,
    })
}

/// What would need a stored response or conversation.
fn refuse_state(request: &ResponsesRequest) -> Result<(), ApiError> {
    if request.previous_response_id.is_some() {
        return Err(ApiError::unsupported(
            "tandem stores no responses, so previous_response_id cannot be followed: \
             send the earlier turns in input (as messages)",
            "previous_response_id",
        ));
    }
    if request.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::unsupported(
            "tandem stores no conversations: send the earlier turns in input (as \
             messages)",
            "conversation",
        ));
    }
    Ok(())
}

fn check_tools(request: &ResponsesRequest) -> Result<(), ApiError> {
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools are not served on /v1/responses: tandem serves tool calling on \
             /v1/chat/completions; here tools may only be empty",
            "tools",
        ));
    }
    match &request.tool_choice {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(choice)) if choice == "none" || choice == "auto" => Ok(()),
        Some(other) => Err(ApiError::invalid(
            format!(
                "tool_choice {other} needs a tool, and tools are not served on /v1/responses \
                 (only \"none\" or \"auto\")"
            ),
            "tool_choice",
        )),
    }
}

fn check_reasoning(request: &ResponsesRequest) -> Result<(), ApiError> {
    let Some(reasoning) = &request.reasoning else {
        return Ok(());
    };
    for (name, value) in [
        ("effort", &reasoning.effort),
        ("summary", &reasoning.summary),
        ("generate_summary", &reasoning.generate_summary),
    ] {
        // `none` asks for no reasoning, which is what the served model does.
        if let Some(value) = value
            && value != "none"
        {
            return Err(ApiError::unsupported(
                format!(
                    "reasoning.{name} {value:?} is not supported: the served model is not a \
                     reasoning model"
                ),
                &format!("reasoning.{name}"),
            ));
        }
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

fn metadata(
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

/// One input item: a message (`type` "message" or absent) with text content.
fn input_item(index: usize, item: &Value) -> Result<Turn, ApiError> {
    let param = format!("input[{index}]");
    let Some(object) = item.as_object() else {
        return Err(ApiError::invalid(
            "an input item must be an object (a message with role and content)",
            &param,
        ));
    };
    match object.get("type").and_then(Value::as_str) {
        None | Some("message") => {}
        Some(other) => {
            return Err(ApiError::unsupported(
                format!(
                    "input item type {other:?} is not supported: /v1/responses serves messages \
                     with text content (no tool calls, reasoning or item references)"
                ),
                &format!("{param}.type"),
            ));
        }
    }
    if let Some(key) = object.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("unknown field {key:?} in an input message"),
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
        return Err(ApiError::invalid(
            format!("unknown field {key:?} in a text content part"),
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
            served_model_name: "smol".into(),
            max_model_len: 100,
            vocab_size: 1000,
            tool_support: None,
            sampling_defaults: Default::default(),
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
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
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
