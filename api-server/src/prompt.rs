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

/// Loads the model directory's tokenizer and chat template.
pub fn load_codec(model_dir: &std::path::Path) -> Result<Box<dyn PromptCodec>, PromptError> {
    Ok(Box::new(interim::InterimCodec::load(model_dir)?))
}

/// INTERIM, to be replaced by tandem-text's tokenizer and chat template as soon as that crate
/// has them (it was empty when the api-server was written): `tokenizers` for tokenizer.json and
/// minijinja for the `chat_template` of tokenizer_config.json (or chat_template.jinja), with
/// the variables Hugging Face passes (`messages`, `add_generation_prompt`, `bos_token`,
/// `eos_token`, `raise_exception`).
mod interim {
    use std::path::Path;

    use serde_json::Value;

    use super::{PromptCodec, PromptError};
    use crate::validation::Turn;

    pub struct InterimCodec {
        tokenizer: tokenizers::Tokenizer,
        template: Option<minijinja::Environment<'static>>,
        bos_token: String,
        eos_token: String,
    }

    fn special_token(config: &Value, key: &str) -> String {
        match &config[key] {
            Value::String(token) => token.clone(),
            Value::Object(added) => added
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        }
    }

    impl InterimCodec {
        pub fn load(dir: &Path) -> Result<Self, PromptError> {
            let tokenizer =
                tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
                    PromptError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
                })?;
            let config: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Value::Null);
            let source = match &config["chat_template"] {
                Value::String(template) => Some(template.clone()),
                Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
            };
            let template = match source {
                Some(source) => {
                    let mut env = minijinja::Environment::new();
                    env.set_unknown_method_callback(
                        minijinja_contrib::pycompat::unknown_method_callback,
                    );
                    env.add_function(
                        "raise_exception",
                        |message: String| -> Result<String, minijinja::Error> {
                            Err(minijinja::Error::new(
                                minijinja::ErrorKind::InvalidOperation,
                                message,
                            ))
                        },
                    );
                    env.add_template_owned("chat", source).map_err(|e| {
                        PromptError::Tokenizer(format!("chat template does not parse: {e}"))
                    })?;
                    Some(env)
                }
                None => None,
            };
            Ok(InterimCodec {
                tokenizer,
                template,
                bos_token: special_token(&config, "bos_token"),
                eos_token: special_token(&config, "eos_token"),
            })
        }

        fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PromptError> {
            self.tokenizer
                .encode(text, add_special_tokens)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|e| PromptError::Tokenizer(e.to_string()))
        }
    }

    impl PromptCodec for InterimCodec {
        fn encode_chat(&self, turns: &[Turn]) -> Result<Vec<u32>, PromptError> {
            let env = self.template.as_ref().ok_or_else(|| {
                PromptError::Template("this model has no chat template; use /v1/completions".into())
            })?;
            let messages: Vec<minijinja::Value> = turns
                .iter()
                .map(|t| {
                    minijinja::Value::from_pairs([
                        ("role", minijinja::Value::from(t.role.as_str())),
                        ("content", minijinja::Value::from(t.content.as_str())),
                    ])
                })
                .collect();
            let template = env
                .get_template("chat")
                .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
            let text = template
                .render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos_token.as_str(),
                    eos_token => self.eos_token.as_str(),
                })
                .map_err(|e| {
                    PromptError::Template(format!("the chat template refused the messages: {e}"))
                })?;
            self.encode(&text, false)
        }

        fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError> {
            self.encode(text, true)
        }

        fn token_text(&self, id: u32) -> String {
            self.tokenizer.decode(&[id], false).unwrap_or_default()
        }
    }
}
