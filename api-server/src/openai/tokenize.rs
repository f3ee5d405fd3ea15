//! `/tokenize` and `/detokenize`: vLLM's extensions for counting and reading tokens as the
//! server does (a chat's messages through the model's chat template, or a completion's prompt).

use serde::{Deserialize, Serialize};

use super::chat::{ChatMessage, ChatTemplateFields};
use super::tools::Tool;

/// `POST /tokenize`: a completion's `prompt`, or a chat's `messages` (and `tools`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub tools: Option<Vec<Tool>>,
    /// Whether the tokenizer adds its special tokens (BOS): a prompt's default is true, as on
    /// `/v1/completions`; messages are rendered with theirs and take none more.
    pub add_special_tokens: Option<bool>,
    /// How `messages` are rendered, as on chat completions.
    #[serde(flatten)]
    pub template: ChatTemplateFields,
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: u32,
    pub tokens: Vec<u32>,
    /// Each token's text, when `return_token_strs` asked for it.
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}
