//! Tool calling on the wire: the request's `tools`, `tool_choice` and the assistant's
//! `tool_calls` (in a request's history, in a reply, and as stream deltas).
//!
//! Request shapes are loose (every field optional) so that validation can name the field at
//! fault; reply shapes are OpenAI's exactly.

use serde::{Deserialize, Serialize};

/// One entry of `tools`: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionDefinition>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FunctionDefinition {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A JSON Schema of the arguments object.
    pub parameters: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or a named function.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceField {
    Mode(String),
    Named(NamedToolChoice),
}

/// `{"type": "function", "function": {"name": "..."}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<NamedFunction>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NamedFunction {
    pub name: Option<String>,
}

/// A tool call in a request's history (an assistant message's `tool_calls`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<RequestFunctionCall>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestFunctionCall {
    pub name: Option<String>,
    /// A JSON string, as OpenAI sends it back.
    pub arguments: Option<String>,
}

/// A tool call of a reply's `message.tool_calls`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text, as the model wrote it.
    pub arguments: String,
}

/// A piece of a tool call in a stream chunk's `delta.tool_calls`: the first piece of a call
/// has its `id`, `type` and `function.name`; later ones only `index` and argument text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_choice_takes_a_mode_or_a_name() {
        let mode: ToolChoiceField = serde_json::from_value(json!("required")).unwrap();
        assert_eq!(mode, ToolChoiceField::Mode("required".into()));
        let named: ToolChoiceField =
            serde_json::from_value(json!({"type": "function", "function": {"name": "f"}})).unwrap();
        assert_eq!(
            named,
            ToolChoiceField::Named(NamedToolChoice {
                kind: Some("function".into()),
                function: Some(NamedFunction {
                    name: Some("f".into())
                }),
            })
        );
    }

    /// OpenAI's documented shapes: a call in a reply, and the first and a later stream piece.
    #[test]
    fn calls_and_deltas_have_openai_shape() {
        let call = ToolCall {
            id: "call_abc".into(),
            kind: "function",
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&call).unwrap(),
            json!({"id": "call_abc", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}})
        );
        let first = ToolCallDelta {
            index: 0,
            id: Some("call_abc".into()),
            kind: Some("function"),
            function: FunctionCallDelta {
                name: Some("get_weather".into()),
                arguments: String::new(),
            },
        };
        assert_eq!(
            serde_json::to_value(&first).unwrap(),
            json!({"index": 0, "id": "call_abc", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}})
        );
        let piece = ToolCallDelta {
            index: 1,
            id: None,
            kind: None,
            function: FunctionCallDelta {
                name: None,
                arguments: "{\"ci".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&piece).unwrap(),
            json!({"index": 1, "function": {"arguments": "{\"ci"}})
        );
    }
}
