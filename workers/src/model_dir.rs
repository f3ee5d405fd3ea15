//! A model directory as every worker mode opens it: checked up front for the usual mistakes,
//! then the text side (tokenizer, chat template, stop ids); the weights go onto a device
//! through [`crate::device`].
//!
//! `worker generate` and the bus roles load through here, so both run the same tokenizer,
//! detokenizer and stop handling over the same weights — the reason their outputs agree.

pub mod fingerprint;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_model::{CONFIG_FILE, TOKENIZER_FILE};
use tandem_text::chat_template::{ChatMessage, ChatTemplate, RenderOptions};
use tandem_text::tokenizer::TextTokenizer;
use thiserror::Error;

use crate::engine::{TextDecoder, TokenizerText};
use crate::model::ModelError;

pub use fingerprint::model_fingerprint;

#[derive(Debug, Error)]
pub enum ModelDirError {
    #[error("model directory {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("model directory {}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("loading the model from {}: {source}", path.display())]
    Model { path: PathBuf, source: ModelError },
}

/// A clear error for the usual mistakes (wrong path, a GGUF file instead of a directory)
/// before the loaders' more technical ones.
pub fn check_model_dir(path: &Path) -> Result<(), ModelDirError> {
    let fail = |reason: String| {
        Err(ModelDirError::Invalid {
            path: path.to_owned(),
            reason,
        })
    };
    if !path.exists() {
        return fail("does not exist (make one with `model-prep default -o DIR`)".into());
    }
    if !path.is_dir() {
        return fail(
            "is not a directory (a GGUF file must first be imported: `model-prep import-gguf FILE -o DIR`)"
                .into(),
        );
    }
    for file in [CONFIG_FILE, TOKENIZER_FILE] {
        if !path.join(file).is_file() {
            return fail(format!(
                "has no {file}: not a model directory (make one with `model-prep default -o DIR`)"
            ));
        }
    }
    Ok(())
}

/// The model's text side: tokenizer, chat template, and a [`TextDecoder`] for the engine.
pub struct ModelText {
    tokenizer: Arc<TextTokenizer>,
}

impl ModelText {
    pub fn load(model_dir: &Path) -> Result<Self, ModelDirError> {
        let tokenizer = TextTokenizer::load(model_dir).map_err(|e| ModelDirError::Tokenizer {
            path: model_dir.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// A plain prompt, with the special tokens the tokenizer adds (BOS for Llama).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, String> {
        self.tokenizer.encode(prompt).map_err(|e| e.to_string())
    }

    /// The prompt as one user message (after an optional system message) through the
    /// model's chat template, ending with the assistant's generation prompt.
    pub fn chat_prompt_ids(&self, system: Option<&str>, prompt: &str) -> Result<Vec<u32>, String> {
        let template = ChatTemplate::from_tokenizer(&self.tokenizer)
            .map_err(|e| format!("chat template: {e}"))?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        let options = RenderOptions {
            add_generation_prompt: true,
            ..RenderOptions::default()
        };
        let text = template
            .render(&messages, &options)
            .map_err(|e| format!("chat template: {e}"))?;
        self.tokenizer
            .encode_templated(&text)
            .map_err(|e| e.to_string())
    }

    /// Ids that end generation (EOS of the tokenizer, config and generation config).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        self.tokenizer.stop_token_ids().to_vec()
    }

    pub fn decoder(&self) -> Arc<dyn TextDecoder> {
        Arc::new(TokenizerText::new(Arc::clone(&self.tokenizer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_model_dirs_get_a_clear_error() {
        let missing = Path::new("/nonexistent/tandem-model");
        let err = check_model_dir(missing).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let file = std::env::temp_dir().join(format!("tandem-gen-test-{}", std::process::id()));
        std::fs::write(&file, b"GGUF").unwrap();
        let err = check_model_dir(&file).unwrap_err().to_string();
        assert!(err.contains("import-gguf"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = check_model_dir(&std::env::temp_dir())
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
