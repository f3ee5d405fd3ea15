//! Which markup the served model writes its tool calls in, and whether its chat template shows
//! it the tools.
//!
//! Chosen once at start from the model directory's chat template (the markup its tool-call
//! turns are rendered with), unless `--tool-call-parser` names one:
//! - `<tool_call>` in the template: Hermes 2 Pro / Hermes 3 / Qwen2.5
//!   (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, several in a row);
//! - `[TOOL_CALLS]`: Mistral v0.3 (`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`);
//! - `<|python_tag|>` or `"parameters"` with an `ipython` role: Llama 3.1 / 3.2
//!   (`{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, several
//!   separated by `;`);
//! - none of these: Hermes, the most widely trained format.
//!
//! A template that does not render the `tools` variable at all (SmolLM2's, Llama 2's) would
//! hide the tools from the model: then [`render`](super::render) writes them into the system
//! prompt in the Hermes format and the Hermes parser reads the reply.

use std::fmt;

/// A family's tool-call markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolFormat {
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3Json => "llama3_json",
            ToolFormat::Mistral => "mistral",
        }
    }

    /// The family's markup found in a chat template's source.
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("ipython") && template.contains("\"parameters\""))
        {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }

    /// Texts that open or close calls in this family's output. When the tokenizer has one as
    /// a special token, the workers' detokenizer drops its text (special tokens are skipped),
    /// so the api-server puts it back before parsing (`routes/chat.rs`).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &["<tool_call>", "</tool_call>"],
            ToolFormat::Llama3Json => &["<|python_tag|>"],
            ToolFormat::Mistral => &["[TOOL_CALLS]"],
        }
    }
}

impl fmt::Display for ToolFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How tools reach the model and how its reply is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSupport {
    pub format: ToolFormat,
    /// The chat template renders `tools` and tool turns itself; else they are written into
    /// the system prompt in the Hermes format (and `format` is Hermes).
    pub native: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_told_from_their_templates() {
        assert_eq!(
            ToolFormat::detect("{{- '\\n<tool_call>\\n{\"name\": \"' }}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::detect("{{- \"[TOOL_CALLS] [\" }}"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            ToolFormat::detect("{{- \"<|python_tag|>\" + tool_call.name }}"),
            Some(ToolFormat::Llama3Json)
        );
        assert_eq!(
            ToolFormat::detect("'ipython' ... '\"parameters\": '"),
            Some(ToolFormat::Llama3Json)
        );
        assert_eq!(ToolFormat::detect("{{ message['content'] }}"), None);
    }
}
