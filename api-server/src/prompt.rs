//! Prompts to token ids, and token ids to the strings logprobs show.
//!
//! The work itself is tandem-text's (tokenizer with the model's special tokens, the model's
//! chat template); this module is the api-server's one door to it, so the routes see a small
//! trait ([`PromptCodec`]) and tokenizing runs off the async executor.

use std::sync::Arc;

use crate::error::ApiError;
use crate::validation::{PromptInput, Turn};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The chat template refused the conversation (for example roles that do not alternate);
    /// the message is about the request and is shown to the client.
    #[error("{0}")]
    Template(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

impl From<PromptError> for ApiError {
    fn from(err: PromptError) -> Self {
        match err {
            PromptError::Template(message) => ApiError::invalid(message, "messages"),
            PromptError::Tokenizer(detail) => ApiError::Internal(detail),
        }
    }
}

/// Tokenization as the api-server needs it. Implementations are CPU-bound and synchronous;
/// [`tokenize`] moves the call to a blocking thread.
pub trait PromptCodec: Send + Sync + 'static {
    /// Renders `turns` with the model's chat template, ending with the assistant's generation
    /// prompt, and tokenizes the result without adding special tokens a second time.
    fn encode_chat(&self, turns: &[Turn]) -> Result<Vec<u32>, PromptError>;
    /// Tokenizes a completion prompt, adding the tokenizer's special tokens (BOS) as
    /// Hugging Face's `encode` does by default.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError>;
    /// The text of one token, for logprobs (`token` and `bytes`).
    fn token_text(&self, id: u32) -> String;
}

/// Tokenizes `prompt` on a blocking thread.
pub async fn tokenize(
    codec: Arc<dyn PromptCodec>,
    prompt: PromptInput,
) -> Result<Vec<u32>, ApiError> {
    match prompt {
        PromptInput::Tokens(ids) => Ok(ids),
        PromptInput::Text(text) => tokio::task::spawn_blocking(move || codec.encode_text(&text))
            .await
            .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
            .map_err(ApiError::from),
        PromptInput::Chat(turns) => tokio::task::spawn_blocking(move || codec.encode_chat(&turns))
            .await
            .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
            .map_err(ApiError::from),
    }
}

/// TEMPORARY until tandem-text lands.
pub fn load_codec(_model_dir: &std::path::Path) -> Result<Box<dyn PromptCodec>, PromptError> {
    Err(PromptError::Tokenizer(
        "tandem-text not yet available".into(),
    ))
}
