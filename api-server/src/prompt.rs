//! Prompts to token ids, and token ids to the strings logprobs show.
//!
//! The work itself is tandem-text's (tokenizer with the model's special tokens, the model's
//! chat template); this module is the api-server's one door to it, so the routes see a small
//! trait ([`PromptCodec`]) and tokenizing runs off the async executor.

use std::sync::Arc;

use tandem_text::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError, RenderOptions};
use tandem_text::tokenizer::TextTokenizer;

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

/// `err` with the request field that holds the prompt as its `param`: template errors name
/// `messages`, which on `/v1/responses` is `input`.
pub fn naming_prompt_param(err: ApiError, prompt_param: &str) -> ApiError {
    match err {
        ApiError::InvalidRequest {
            message,
            param: Some(param),
            code,
        } if param == "messages" => ApiError::InvalidRequest {
            message,
            param: Some(prompt_param.to_string()),
            code,
        },
        other => other,
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

/// Loads the model directory's tokenizer and chat template (tandem-text).
pub fn load_codec(model_dir: &std::path::Path) -> Result<Box<dyn PromptCodec>, PromptError> {
    let tokenizer =
        TextTokenizer::load(model_dir).map_err(|e| PromptError::Tokenizer(e.to_string()))?;
    // A model without a template still serves /v1/completions; chat requests are refused.
    let template = match ChatTemplate::from_tokenizer(&tokenizer) {
        Ok(template) => Some(template),
        Err(ChatTemplateError::Missing) => None,
        Err(err) => return Err(PromptError::Tokenizer(err.to_string())),
    };
    Ok(Box::new(TextCodec {
        tokenizer,
        template,
    }))
}

/// [`PromptCodec`] over tandem-text: the same tokenizer and template code the workers use.
struct TextCodec {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
}

impl PromptCodec for TextCodec {
    fn encode_chat(&self, turns: &[Turn]) -> Result<Vec<u32>, PromptError> {
        let template = self.template.as_ref().ok_or_else(|| {
            PromptError::Template("this model has no chat template; use /v1/completions".into())
        })?;
        let messages: Vec<ChatMessage> = turns
            .iter()
            .map(|t| ChatMessage::new(t.role.as_str(), t.content.as_str()))
            .collect();
        let options = RenderOptions {
            add_generation_prompt: true,
            ..RenderOptions::default()
        };
        let text = template
            .render(&messages, &options)
            .map_err(|err| match err {
                ChatTemplateError::Raised { message } => PromptError::Template(message),
                ChatTemplateError::InvalidMessage { .. } => PromptError::Template(err.to_string()),
                other => PromptError::Tokenizer(other.to_string()),
            })?;
        self.tokenizer
            .encode_templated(&text)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .token_bytes(id)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_name_the_endpoints_prompt_field() {
        let err = ApiError::from(PromptError::Template("roles must alternate".into()));
        match naming_prompt_param(err, "input") {
            ApiError::InvalidRequest { param, message, .. } => {
                assert_eq!(param.as_deref(), Some("input"));
                assert_eq!(message, "roles must alternate");
            }
            other => panic!("{other:?}"),
        }
        let other = ApiError::invalid("bad", "stop");
        assert!(matches!(
            naming_prompt_param(other, "input"),
            ApiError::InvalidRequest { param: Some(p), .. } if p == "stop"
        ));
    }
}
