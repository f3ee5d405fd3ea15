//! `POST /v1/embeddings`: the request and the `list` of `embedding` objects it answers.

use serde::{Deserialize, Serialize};

use super::PromptField;

/// OpenAI's embeddings request (and vLLM's `truncate_prompt_tokens` and `priority`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    /// A string, a list of token ids, or a batch of either.
    pub input: Option<PromptField>,
    /// `float` (the default) or `base64`.
    pub encoding_format: Option<String>,
    /// The first this many components of each embedding (normalized again where the model
    /// normalizes).
    pub dimensions: Option<i64>,
    pub truncate_prompt_tokens: Option<i64>,
    pub priority: Option<i64>,
}

/// One input's embedding: its floats, or their little-endian f32 bytes in base64.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Embedding {
    pub object: &'static str,
    pub embedding: EmbeddingVector,
    pub index: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// The response: `{"object": "list", "data": [...], "model", "usage"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingList {
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}
