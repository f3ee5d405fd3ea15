//! The request's tool fields, checked once at the edge: every refusal is a 400 naming the
//! field (`tools[1].function.name`, `tool_choice.function.name`,
//! `messages[3].tool_calls[0].function.arguments`, ...).

use std::collections::HashSet;

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, RequestToolCall, ToolChoiceField};

use super::{ToolCallRecord, ToolChoice, ToolDef, ToolRequest};

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$`.
pub const MAX_FUNCTION_NAME_CHARS: usize = 64;

/// `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the request declares no tools
/// (then only `tool_choice: "none"` is accepted). `tool_calling` says whether this server
/// parses tool calls at all (`--tool-call-parser none` turns it off).
pub fn validate_tools(
    request: &ChatCompletionRequest,
    tool_calling: bool,
) -> Result<Option<ToolRequest>, ApiError> {
    if request.functions.is_some() {
        return Err(ApiError::invalid(
            "functions is deprecated and not served; declare them in tools \
             ({\"type\": \"function\", \"function\": {...}})",
            "functions",
        ));
    }
    if request.function_call.is_some() {
        return Err(ApiError::invalid(
            "function_call is deprecated and not served; use tool_choice",
            "function_call",
        ));
    }
    let Some(tools) = &request.tools else {
        return match &request.tool_choice {
            None => {
                if request.parallel_tool_calls.is_some() {
                    Err(ApiError::invalid(
                        "parallel_tool_calls is only allowed when tools are specified",
                        "parallel_tool_calls",
                    ))
                } else {
                    Ok(None)
                }
            }
            Some(ToolChoiceField::Mode(mode)) if mode == "none" => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "tool_choice is only allowed when tools are specified",
                "tool_choice",
            )),
        };
    };
    if tools.is_empty() {
        return Err(ApiError::invalid(
            "tools must not be empty; leave it out to declare no tools",
            "tools",
        ));
    }
    let mut defs = Vec::with_capacity(tools.len());
    let mut names = HashSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        match tool.kind.as_deref() {
            Some("function") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("tool type {other:?} is not supported (only \"function\")"),
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
        let function = tool.function.as_ref().ok_or_else(|| {
            ApiError::invalid("a tool needs `function`", &format!("{param}.function"))
        })?;
        defs.push(function_def(
            FunctionFields {
                name: function.name.as_deref(),
                description: function.description.as_deref(),
                parameters: function.parameters.as_ref(),
                strict: function.strict,
            },
            &format!("{param}.function"),
            &mut names,
        )?);
    }
    let choice = match &request.tool_choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceField::Mode(mode)) => match mode.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "tool_choice must be \"none\", \"auto\", \"required\" or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {other:?}"
                    ),
                    "tool_choice",
                ));
            }
        },
        Some(ToolChoiceField::Named(named)) => {
            if named.kind.as_deref() != Some("function") {
                return Err(ApiError::invalid(
                    "a named tool_choice needs `type`: \"function\"",
                    "tool_choice.type",
                ));
            }
            let name = named
                .function
                .as_ref()
                .and_then(|f| f.name.as_deref())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "a named tool_choice needs function.name",
                        "tool_choice.function.name",
                    )
                })?;
            if !names.contains(name) {
                return Err(ApiError::invalid(
                    format!("tool_choice names function {name:?}, which is not in tools"),
                    "tool_choice.function.name",
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    tool_request(
        defs,
        choice,
        request.parallel_tool_calls.unwrap_or(true),
        tool_calling,
    )
    .map(Some)
}

/// A declared function's fields, as either endpoint's request shape carries them (nested
/// under `function` on chat completions, flat on `/v1/responses`).
#[derive(Debug, Clone, Copy)]
pub struct FunctionFields<'a> {
    pub name: Option<&'a str>,
    pub description: Option<&'a str>,
    pub parameters: Option<&'a serde_json::Value>,
    pub strict: Option<bool>,
}

/// One declared function, checked: a valid name not declared before (`names` collects
/// them) and a parameters schema of an object. `param` is the object holding the fields
/// (`tools[1].function`, or `tools[1]` on `/v1/responses`).
pub fn function_def(
    fields: FunctionFields<'_>,
    param: &str,
    names: &mut HashSet<String>,
) -> Result<ToolDef, ApiError> {
    let name_param = format!("{param}.name");
    let name = fields
        .name
        .ok_or_else(|| ApiError::invalid("a function needs a name", &name_param))?;
    check_function_name(name, &name_param)?;
    if !names.insert(name.to_string()) {
        return Err(ApiError::invalid(
            format!("function name {name:?} is declared twice; tool names must be unique"),
            &name_param,
        ));
    }
    let parameters = match fields.parameters {
        None | Some(serde_json::Value::Null) => {
            serde_json::json!({"type": "object", "properties": {}})
        }
        Some(schema) => {
            check_parameters_schema(schema, &format!("{param}.parameters"))?;
            schema.clone()
        }
    };
    Ok(ToolDef {
        name: name.to_string(),
        description: fields.description.map(str::to_string),
        parameters,
        strict: fields.strict.unwrap_or(false),
    })
}

/// The request's tools once declared and chosen; refused when the server parses no calls
/// (`--tool-call-parser none`) unless the choice is `none`.
pub fn tool_request(
    tools: Vec<ToolDef>,
    choice: ToolChoice,
    parallel: bool,
    tool_calling: bool,
) -> Result<ToolRequest, ApiError> {
    if choice != ToolChoice::None && !tool_calling {
        return Err(ApiError::invalid(
            "tool calling is turned off on this server (--tool-call-parser none); send \
             tool_choice \"none\" or no tools",
            "tools",
        ));
    }
    Ok(ToolRequest {
        tools,
        choice,
        parallel,
    })
}

pub fn check_function_name(name: &str, param: &str) -> Result<(), ApiError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || name.chars().count() > MAX_FUNCTION_NAME_CHARS || !valid_chars {
        return Err(ApiError::invalid(
            format!(
                "function name {name:?} is invalid: 1 to {MAX_FUNCTION_NAME_CHARS} letters, \
                 digits, underscores or dashes"
            ),
            param,
        ));
    }
    Ok(())
}

/// The arguments schema must be a JSON Schema of an object. Whether llguidance can compile
/// it is checked only where a grammar is built from it (`tool_choice` required or named).
fn check_parameters_schema(schema: &serde_json::Value, param: &str) -> Result<(), ApiError> {
    let Some(object) = schema.as_object() else {
        return Err(ApiError::invalid(
            "parameters must be a JSON Schema object",
            param,
        ));
    };
    match object.get("type") {
        None => Ok(()),
        Some(serde_json::Value::String(t)) if t == "object" => Ok(()),
        Some(other) => Err(ApiError::invalid(
            format!("parameters must describe an object (\"type\": \"object\"), got type {other}"),
            param,
        )),
    }
}

/// An assistant message's `tool_calls`; `param` is the message's (`messages[2]`).
pub fn validate_tool_calls(
    param: &str,
    calls: &[RequestToolCall],
) -> Result<Vec<ToolCallRecord>, ApiError> {
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let param = format!("{param}.tool_calls[{j}]");
            if let Some(kind) = call.kind.as_deref()
                && kind != "function"
            {
                return Err(ApiError::invalid(
                    format!("tool call type {kind:?} is not supported (only \"function\")"),
                    &format!("{param}.type"),
                ));
            }
            let id = call
                .id
                .as_deref()
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid("a tool call needs an id", &format!("{param}.id"))
                })?;
            let function = call.function.as_ref().ok_or_else(|| {
                ApiError::invalid("a tool call needs `function`", &format!("{param}.function"))
            })?;
            let name_param = format!("{param}.function.name");
            let name = function.name.as_deref().ok_or_else(|| {
                ApiError::invalid("a tool call needs a function name", &name_param)
            })?;
            check_function_name(name, &name_param)?;
            let arguments = function.arguments.as_deref().ok_or_else(|| {
                ApiError::invalid(
                    "a tool call needs `arguments` (a JSON string)",
                    &format!("{param}.function.arguments"),
                )
            })?;
            Ok(ToolCallRecord {
                id: id.to_string(),
                name: name.to_string(),
                arguments: arguments.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn tools_of(body: Value) -> Result<Option<ToolRequest>, ApiError> {
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        validate_tools(&request, true)
    }

    fn param_of<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    #[test]
    fn tools_and_choices_are_validated() {
        let valid = tools_of(
            json!({"tools": [weather(), {"type": "function", "function": {"name": "now"}}]}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(valid.choice, ToolChoice::Auto);
        assert!(valid.parallel);
        assert_eq!(valid.tools[0].name, "get_weather");
        assert_eq!(
            valid.tools[1].parameters,
            json!({"type": "object", "properties": {}}),
            "no parameters: an empty object"
        );
        let named = tools_of(json!({"tools": [weather()], "parallel_tool_calls": false,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(named.choice, ToolChoice::Named("get_weather".into()));
        assert!(!named.parallel);
        assert_eq!(
            tools_of(json!({"tools": [weather()], "tool_choice": "required"}))
                .unwrap()
                .unwrap()
                .choice,
            ToolChoice::Required
        );
        assert!(
            !tools_of(json!({"tools": [weather()], "tool_choice": "none"}))
                .unwrap()
                .unwrap()
                .active()
        );
        assert_eq!(tools_of(json!({})).unwrap(), None);
        assert_eq!(tools_of(json!({"tool_choice": "none"})).unwrap(), None);
    }

    #[test]
    fn bad_tool_fields_name_their_field() {
        let cases = [
            (json!({"tools": []}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"function": {"name": "f"}}]}),
                "tools[0].type",
            ),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [weather(), {"type": "function", "function": {}}]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "x".repeat(65)}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [weather(), weather()]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"type": "string"}}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "any"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function"}}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"function": {"name": "get_weather"}}}),
                "tool_choice.type",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"parallel_tool_calls": true}), "parallel_tool_calls"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(tools_of(body.clone())), param, "{body}");
        }
    }

    #[test]
    fn tool_calling_off_refuses_all_but_none() {
        let request: ChatCompletionRequest =
            serde_json::from_value(json!({"tools": [weather()]})).unwrap();
        assert_eq!(param_of(validate_tools(&request, false)), "tools");
        let request: ChatCompletionRequest =
            serde_json::from_value(json!({"tools": [weather()], "tool_choice": "none"})).unwrap();
        assert!(validate_tools(&request, false).is_ok());
    }

    #[test]
    fn history_calls_are_validated() {
        let calls: Vec<RequestToolCall> = serde_json::from_value(json!([
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ]))
        .unwrap();
        assert_eq!(
            validate_tool_calls("messages[1]", &calls).unwrap(),
            vec![ToolCallRecord {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{}".into()
            }]
        );
        for (calls, param) in [
            (
                json!([{"function": {"name": "f", "arguments": "{}"}}]),
                "messages[1].tool_calls[0].id",
            ),
            (
                json!([{"id": "c", "type": "code", "function": {"name": "f", "arguments": "{}"}}]),
                "messages[1].tool_calls[0].type",
            ),
            (json!([{"id": "c"}]), "messages[1].tool_calls[0].function"),
            (
                json!([{"id": "c", "function": {"arguments": "{}"}}]),
                "messages[1].tool_calls[0].function.name",
            ),
            (
                json!([{"id": "c", "function": {"name": "f"}}]),
                "messages[1].tool_calls[0].function.arguments",
            ),
        ] {
            let calls: Vec<RequestToolCall> = serde_json::from_value(calls).unwrap();
            assert_eq!(param_of(validate_tool_calls("messages[1]", &calls)), param);
        }
    }
}
