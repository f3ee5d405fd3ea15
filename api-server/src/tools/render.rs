//! The chat template's inputs for a conversation with tools.
//!
//! A template that renders tools itself (Hermes 2 Pro / 3, Qwen2.5, Llama 3.1, Mistral v0.3)
//! gets what transformers' `apply_chat_template(messages, tools=...)` gives it, as vLLM
//! passes it: the `tools` variable (OpenAI's `{"type": "function", "function": {...}}`
//! objects), assistant messages with `tool_calls` (`{"id", "type", "function": {"name",
//! "arguments"}}`, `arguments` parsed into a mapping when it is JSON, since Llama's, Qwen's
//! and Mistral's templates write it with `tojson`, and Hermes' prints a string as is), and
//! `tool` messages with `tool_call_id` and `name`. Mistral's template takes only 9-character
//! call ids, so its ids are cut to their last 9 characters (as vLLM does).
//!
//! A template that ignores tools (SmolLM2's) would hide them from the model: then the tool
//! definitions go into the system prompt, with the markup to call them in (the Hermes
//! prompt, which Qwen2.5 and Hermes use too), the history's calls become that markup in the
//! assistant's text, and tool results become a user turn of `<tool_response>` blocks.

use tandem_text::chat_template::{ChatMessage, MessageContent};

use super::{ToolCallRecord, ToolFormat, ToolRequest, ToolSupport};
use crate::validation::{Role, Turn};

/// What the chat template renders: the messages and extra variables (`tools`).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateInput {
    pub messages: Vec<ChatMessage>,
    pub variables: serde_json::Map<String, serde_json::Value>,
}

/// The template's inputs for `turns` and the request's tools, as `support` says the model
/// takes them (`None`: tool calling is off; the turns are passed as they are).
pub fn template_input(
    turns: &[Turn],
    tools: Option<&ToolRequest>,
    support: Option<ToolSupport>,
) -> TemplateInput {
    let shown = tools.filter(|t| t.active());
    match support {
        Some(support) if !support.native => injected(turns, shown, support.format),
        support => {
            let format = support.map(|s| s.format);
            let mut variables = serde_json::Map::new();
            if let Some(tools) = shown {
                variables.insert("tools".into(), tools.template_tools());
            }
            TemplateInput {
                messages: turns.iter().map(|t| native_message(t, format)).collect(),
                variables,
            }
        }
    }
}

fn native_message(turn: &Turn, format: Option<ToolFormat>) -> ChatMessage {
    let call_id = |id: &str| match format {
        Some(ToolFormat::Mistral) => mistral_call_id(id),
        _ => id.to_string(),
    };
    // An assistant turn of calls alone has `content: null`, as clients send it.
    let content = if !turn.tool_calls.is_empty() && turn.content.is_empty() {
        None
    } else {
        Some(MessageContent::Text(turn.content.clone()))
    };
    let mut message = ChatMessage {
        role: turn.role.as_str().to_string(),
        content,
        extra: serde_json::Map::new(),
    };
    if !turn.tool_calls.is_empty() {
        let calls = turn
            .tool_calls
            .iter()
            .map(|call| {
                serde_json::json!({
                    "id": call_id(&call.id),
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments_value(call)},
                })
            })
            .collect();
        message.extra.insert("tool_calls".into(), calls);
    }
    if let Some(id) = &turn.tool_call_id {
        message
            .extra
            .insert("tool_call_id".into(), call_id(id).into());
    }
    if let Some(name) = &turn.name {
        message.extra.insert("name".into(), name.clone().into());
    }
    if let Some(reasoning) = &turn.reasoning {
        message
            .extra
            .insert("reasoning_content".into(), reasoning.clone().into());
    }
    message
}

/// Mistral's templates require call ids of 9 alphanumerics.
fn mistral_call_id(id: &str) -> String {
    let alphanumeric: Vec<char> = id.chars().filter(char::is_ascii_alphanumeric).collect();
    alphanumeric[alphanumeric.len().saturating_sub(9)..]
        .iter()
        .collect()
}

/// The arguments as a JSON value when they parse, else the string as sent.
fn arguments_value(call: &ToolCallRecord) -> serde_json::Value {
    serde_json::from_str(&call.arguments).unwrap_or_else(|_| call.arguments.clone().into())
}

/// The markup of `calls` in `format`, as the model would have written them.
pub fn calls_markup(calls: &[ToolCallRecord], format: ToolFormat) -> String {
    let call_json = |call: &ToolCallRecord, key: &str| {
        let arguments =
            serde_json::to_string(&arguments_value(call)).expect("a JSON value serializes");
        let name = serde_json::to_string(&call.name).expect("a string serializes");
        format!("{{\"name\": {name}, \"{key}\": {arguments}}}")
    };
    match format {
        ToolFormat::Hermes => calls
            .iter()
            .map(|c| format!("<tool_call>\n{}\n</tool_call>", call_json(c, "arguments")))
            .collect::<Vec<_>>()
            .join("\n"),
        ToolFormat::Llama3Json => calls
            .iter()
            .map(|c| call_json(c, "parameters"))
            .collect::<Vec<_>>()
            .join("; "),
        ToolFormat::Mistral => format!(
            "[TOOL_CALLS] [{}]",
            calls
                .iter()
                .map(|c| call_json(c, "arguments"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The system prompt that declares `tools` and how to call them in `format`.
pub fn tools_system_prompt(tools: &ToolRequest, format: ToolFormat) -> String {
    let definitions = tools
        .template_tools()
        .as_array()
        .expect("template_tools is a list")
        .iter()
        .map(|tool| serde_json::to_string(tool).expect("a JSON value serializes"))
        .collect::<Vec<_>>()
        .join("\n");
    let how = match format {
        ToolFormat::Hermes => {
            "For each function call, return a json object with function name and arguments \
             within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
             <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
        }
        ToolFormat::Llama3Json => {
            "To call a function, respond with JSON in the format {\"name\": function name, \
             \"parameters\": dictionary of argument name and its value}. Do not use variables."
        }
        ToolFormat::Mistral => {
            "To call functions, respond with [TOOL_CALLS] followed by a JSON list of calls: \
             [TOOL_CALLS] [{\"name\": <function-name>, \"arguments\": <args-json-object>}]"
        }
    };
    format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n\
         <tools>\n{definitions}\n</tools>\n\n{how}"
    )
}

fn injected(turns: &[Turn], tools: Option<&ToolRequest>, format: ToolFormat) -> TemplateInput {
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(turns.len() + 1);
    let mut rest = turns;
    if let Some(tools) = tools {
        let block = tools_system_prompt(tools, format);
        let system = match turns.first() {
            Some(first) if first.role == Role::System => {
                rest = &turns[1..];
                format!("{}\n\n{block}", first.content)
            }
            _ => block,
        };
        messages.push(ChatMessage::new("system", system));
    }
    // The last message is a user turn of tool results (the previous turn was a result).
    let mut after_result = false;
    for turn in rest {
        match turn.role {
            Role::Tool => {
                let response = format!("<tool_response>\n{}\n</tool_response>", turn.content);
                // Consecutive results share one user turn, as Qwen2.5's template does.
                match messages.last_mut() {
                    Some(last) if after_result => {
                        if let Some(MessageContent::Text(text)) = &mut last.content {
                            text.push('\n');
                            text.push_str(&response);
                        }
                    }
                    _ => messages.push(ChatMessage::new("user", response)),
                }
            }
            Role::Assistant if !turn.tool_calls.is_empty() => {
                let markup = calls_markup(&turn.tool_calls, format);
                let text = if turn.content.is_empty() {
                    markup
                } else {
                    format!("{}\n{markup}", turn.content)
                };
                messages.push(ChatMessage::new("assistant", text));
            }
            role => messages.push(ChatMessage::new(role.as_str(), turn.content.clone())),
        }
        after_result = turn.role == Role::Tool;
    }
    TemplateInput {
        messages,
        variables: serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{ToolChoice, ToolDef};
    use serde_json::json;

    fn weather_tools(choice: ToolChoice) -> ToolRequest {
        ToolRequest {
            tools: vec![ToolDef {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                strict: false,
            }],
            choice,
            parallel: true,
        }
    }

    fn round_trip() -> Vec<Turn> {
        vec![
            Turn::text(Role::User, "Weather in Paris?"),
            Turn {
                tool_calls: vec![ToolCallRecord {
                    id: "call_0123456789abcdef".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..Turn::text(Role::Assistant, "")
            },
            Turn {
                tool_call_id: Some("call_0123456789abcdef".into()),
                name: Some("get_weather".into()),
                ..Turn::text(Role::Tool, "21 C")
            },
        ]
    }

    #[test]
    fn native_templates_get_tools_and_structured_calls() {
        let tools = weather_tools(ToolChoice::Auto);
        let support = ToolSupport {
            format: ToolFormat::Hermes,
            native: true,
        };
        let input = template_input(&round_trip(), Some(&tools), Some(support));
        assert_eq!(input.variables["tools"], tools.template_tools());
        let json = serde_json::to_value(&input.messages).unwrap();
        assert_eq!(
            json[1],
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_0123456789abcdef",
                "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]})
        );
        assert_eq!(
            json[2],
            json!({"role": "tool", "content": "21 C", "tool_call_id": "call_0123456789abcdef",
                   "name": "get_weather"})
        );
        // tool_choice none: the tools are not shown.
        let none = weather_tools(ToolChoice::None);
        let input = template_input(&round_trip(), Some(&none), Some(support));
        assert!(input.variables.is_empty());
        // Mistral: 9-character ids.
        let mistral = ToolSupport {
            format: ToolFormat::Mistral,
            native: true,
        };
        let input = template_input(&round_trip(), Some(&tools), Some(mistral));
        let json = serde_json::to_value(&input.messages).unwrap();
        assert_eq!(json[1]["tool_calls"][0]["id"], "789abcdef");
        assert_eq!(json[2]["tool_call_id"], "789abcdef");
    }

    #[test]
    fn templates_without_tools_get_them_in_the_system_prompt() {
        let tools = weather_tools(ToolChoice::Auto);
        let support = ToolSupport {
            format: ToolFormat::Hermes,
            native: false,
        };
        let mut turns = round_trip();
        turns.insert(0, Turn::text(Role::System, "Be brief."));
        turns.push(Turn {
            tool_call_id: Some("call_0123456789abcdef".into()),
            ..Turn::text(Role::Tool, "windy")
        });
        let input = template_input(&turns, Some(&tools), Some(support));
        assert!(input.variables.is_empty());
        let texts: Vec<(String, String)> = input
            .messages
            .iter()
            .map(|m| {
                let Some(MessageContent::Text(text)) = &m.content else {
                    panic!("{m:?}")
                };
                (m.role.clone(), text.clone())
            })
            .collect();
        assert_eq!(texts.len(), 4, "{texts:?}");
        assert_eq!(texts[0].0, "system");
        assert!(
            texts[0].1.starts_with("Be brief.\n\n# Tools\n"),
            "{}",
            texts[0].1
        );
        assert!(
            texts[0].1.contains(
                r#"<tools>
{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}
</tools>"#
            ),
            "{}",
            texts[0].1
        );
        assert!(texts[0].1.contains("<tool_call>"), "{}", texts[0].1);
        assert_eq!(
            texts[2],
            (
                "assistant".into(),
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>"
                    .into()
            )
        );
        assert_eq!(
            texts[3],
            (
                "user".into(),
                "<tool_response>\n21 C\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
                    .into()
            )
        );
        assert!(input.messages.iter().all(|m| m.extra.is_empty()));
    }

    #[test]
    fn markup_per_family() {
        let calls = [
            ToolCallRecord {
                id: "a".into(),
                name: "f".into(),
                arguments: r#"{"x": 1}"#.into(),
            },
            ToolCallRecord {
                id: "b".into(),
                name: "g".into(),
                arguments: "{}".into(),
            },
        ];
        assert_eq!(
            calls_markup(&calls, ToolFormat::Llama3Json),
            r#"{"name": "f", "parameters": {"x":1}}; {"name": "g", "parameters": {}}"#
        );
        assert_eq!(
            calls_markup(&calls, ToolFormat::Mistral),
            r#"[TOOL_CALLS] [{"name": "f", "arguments": {"x":1}}, {"name": "g", "arguments": {}}]"#
        );
    }
}
