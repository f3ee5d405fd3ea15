//! `tokenizer_config.json`: the chat template and the special tokens around it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A special token given either as a plain string or as Hugging Face's `AddedToken` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AddedTokenEntry {
    Text(String),
    Object { content: String },
}

impl AddedTokenEntry {
    pub fn content(&self) -> &str {
        match self {
            AddedTokenEntry::Text(text) => text,
            AddedTokenEntry::Object { content } => content,
        }
    }
}

/// The fields of `tokenizer_config.json` tandem uses; the rest is kept but not interpreted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    /// A Jinja template, or (in some Hub repos) a list of named templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<AddedTokenEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<AddedTokenEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<AddedTokenEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<AddedTokenEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_bos_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_eos_token: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_class: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl TokenizerConfig {
    /// The default chat template: the string form, or the entry named "default" of the list form.
    pub fn default_chat_template(&self) -> Option<&str> {
        match self.chat_template.as_ref()? {
            serde_json::Value::String(template) => Some(template),
            serde_json::Value::Array(entries) => entries.iter().find_map(|entry| {
                (entry.get("name")?.as_str()? == "default")
                    .then(|| entry.get("template")?.as_str())
                    .flatten()
            }),
            _ => None,
        }
    }
}
