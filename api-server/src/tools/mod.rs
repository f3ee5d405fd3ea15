//! Tool calling: what a chat request's `tools`, `tool_choice` and `parallel_tool_calls` become,
//! how tools and the history's calls reach the chat template, how the model's output is turned
//! back into OpenAI `tool_calls`, and the grammar that enforces `tool_choice: required` or a
//! named function.
//!
//! - [`validate`]: the request's tool fields and tool messages, checked at the edge (400s that
//!   name the field).
//! - [`format`](mod@format): the model family's call markup ([`ToolFormat`]: Hermes / Qwen2.5
//!   `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`), chosen from the chat template or
//!   by `--tool-call-parser`, and whether the template renders tools itself.
//! - [`render`]: the template's inputs (the `tools` variable, messages with `tool_calls` and
//!   `tool_call_id`), or, for a template that ignores tools (SmolLM2's), the tools written
//!   into the system prompt in the Hermes format.
//! - [`parser`]: the model's output, token by token, into content and call pieces; the same
//!   state machine serves streamed and whole replies, so they agree.
//! - [`grammar`]: the llguidance Lark grammar of "one (or more) calls of these tools in this
//!   family's markup", sent on the job as `SamplingSpec.grammar`.

pub mod format;
pub mod grammar;
pub mod parser;
pub mod render;
pub mod validate;

pub use format::{ToolFormat, ToolSupport};

/// A declared tool, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object (`{"type": "object", "properties": {}}` when the
    /// request gave none, as OpenAI treats a function without parameters).
    pub parameters: serde_json::Value,
    pub strict: bool,
}

/// `tool_choice`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text: tools are not shown to it and its output is not parsed.
    None,
    /// The model may call tools: they are rendered and its output parsed.
    Auto,
    /// The model must call at least one tool: enforced by a grammar.
    Required,
    /// The model must call this tool: enforced by a grammar.
    Named(String),
}

/// A request's tools and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<ToolDef>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false allows one call per reply.
    pub parallel: bool,
}

impl ToolRequest {
    /// Whether the tools are shown to the model and its output parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools a reply may call: all, or the named one.
    pub fn callable(&self) -> Vec<&ToolDef> {
        match &self.choice {
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// The tool definitions as chat templates expect them (OpenAI's request shape:
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`).
    pub fn template_tools(&self) -> serde_json::Value {
        self.tools
            .iter()
            .map(|tool| {
                let mut function = serde_json::Map::new();
                function.insert("name".into(), tool.name.clone().into());
                if let Some(description) = &tool.description {
                    function.insert("description".into(), description.clone().into());
                }
                function.insert("parameters".into(), tool.parameters.clone());
                serde_json::json!({"type": "function", "function": function})
            })
            .collect()
    }
}

/// A call in the conversation's history (an assistant message's `tool_calls` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallRecord {
    pub id: String,
    pub name: String,
    /// JSON text, as the client sent it back.
    pub arguments: String,
}

/// A new call's id: `call_` and 24 random alphanumerics, as OpenAI's look.
pub fn new_call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}
