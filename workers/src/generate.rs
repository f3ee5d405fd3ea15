//! `worker generate`: one local generation without the bus.
//!
//! Loads the model directory (weights, tokenizer, chat template), tokenizes the prompt —
//! through the chat template with `--chat` — and runs it through the same [`Engine`] and
//! engine thread the bus roles use, so its output is the reference the disaggregated path
//! must reproduce token for token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::Serialize;
use tandem_model::{CONFIG_FILE, TOKENIZER_FILE};
use thiserror::Error;

use crate::backend::BackendError;
use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::engine::{
    Engine, EngineConfig, EngineError, EngineHandle, EventKind, FinishReason, GenerationRequest,
    ModelRunner, TextDecoder,
};
use crate::model::{Model, ModelError, ModelOptions};
use crate::sampler::SamplingParams;

/// Options of `worker generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model directory (made by `model-prep`: config.json, *.safetensors, tokenizer.json, ...).
    #[arg(long, env = "TANDEM_MODEL", value_name = "DIR")]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Apply the model's chat template: the prompt becomes one user message, followed by the
    /// assistant's generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the user message (implies --chat).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding (the default: deterministic output).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0, 1].
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Random seed: the same seed and prompt give the same output (drawn at random if unset).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop when this string is generated (not included in the output); repeatable.
    #[arg(long = "stop", value_name = "S")]
    pub stop: Vec<String>,
    /// Print one JSON object {"prompt_ids": [...], "output_ids": [...], "text": "..."}
    /// instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Device to run on. Supported: cpu.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// CPU threads; 0 uses every core.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

/// What `--json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, including the stop token when one ended generation.
    pub output_ids: Vec<u32>,
    /// Generated text (stop tokens and stop strings excluded).
    pub text: String,
}

#[derive(Debug, Error)]
pub enum GenerateError {
    #[error("unsupported device `{0}`: this worker supports: cpu")]
    UnsupportedDevice(String),
    #[error("model directory {}: {reason}", path.display())]
    ModelDir { path: PathBuf, reason: String },
    #[error("loading the model from {}: {source}", path.display())]
    Model { path: PathBuf, source: ModelError },
    #[error("starting the CPU backend: {0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Text(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("starting the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Runs one generation; `on_text` receives the text as it is generated.
pub fn generate(
    args: &GenerateArgs,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    if args.device != "cpu" {
        return Err(GenerateError::UnsupportedDevice(args.device.clone()));
    }
    check_model_dir(&args.model)?;
    let text = text::ModelText::load(&args.model).map_err(GenerateError::Text)?;
    let prompt_ids = if args.chat || args.system.is_some() {
        text.chat_prompt_ids(args.system.as_deref(), &args.prompt)
    } else {
        text.prompt_ids(&args.prompt)
    }
    .map_err(GenerateError::Text)?;

    let backend = CpuBackend::new(&CpuOptions {
        threads: args.threads,
        ..Default::default()
    })?;
    let model = Model::load(&args.model, backend, &ModelOptions::default()).map_err(|source| {
        GenerateError::Model {
            path: args.model.clone(),
            source,
        }
    })?;
    let config = engine_config(
        prompt_ids.len(),
        args.max_tokens,
        model.config().max_position_embeddings,
    );
    let runner =
        ModelRunner::new(model, config.block_size, config.num_blocks).map_err(|source| {
            GenerateError::Model {
                path: args.model.clone(),
                source,
            }
        })?;
    let decoder: Arc<dyn TextDecoder> = text.decoder();
    let engine = Engine::new(runner, config, Some(decoder))?;
    let (handle, thread) = EngineHandle::spawn(engine, "engine").map_err(GenerateError::Thread)?;

    let request = GenerationRequest {
        prompt_ids: prompt_ids.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop_token_ids: text.stop_token_ids(),
        ignore_eos: false,
        stop_strings: args.stop.clone(),
        prefill_only: false,
    };
    let stream = handle.submit(request)?;
    let mut output = GenerateOutput {
        prompt_ids,
        output_ids: Vec::new(),
        text: String::new(),
    };
    let mut finish = None;
    for event in stream {
        match event.kind {
            EventKind::Token { id, text_delta, .. } => {
                output.output_ids.push(id);
                if !text_delta.is_empty() {
                    on_text(&text_delta);
                    output.text.push_str(&text_delta);
                }
            }
            EventKind::Finished { reason, .. } => finish = Some(reason),
        }
    }
    drop(handle);
    // The thread exits once the last handle is gone; a panic there is a failed generation.
    let joined = thread.join();
    match finish {
        Some(FinishReason::Error(message)) => Err(GenerateError::Failed(message)),
        Some(_) => Ok(output),
        None if joined.is_err() => Err(GenerateError::Failed("the engine thread panicked".into())),
        None => Err(GenerateError::Failed("the engine stopped early".into())),
    }
}

/// One sequence: a cache just large enough for the prompt plus `max_tokens` (capped by the
/// context length), prefilled in chunks of up to 512 tokens.
fn engine_config(prompt_len: usize, max_tokens: usize, max_model_len: usize) -> EngineConfig {
    let block_size = 16;
    let tokens = (prompt_len + max_tokens)
        .min(max_model_len)
        .max(prompt_len + 1);
    EngineConfig {
        block_size,
        num_blocks: tokens.div_ceil(block_size),
        max_num_batched_tokens: 512,
        max_num_seqs: 1,
        max_model_len: Some(max_model_len),
    }
}

/// A clear error for the usual mistakes (wrong path, a GGUF file instead of a directory)
/// before the loaders' more technical ones.
fn check_model_dir(path: &Path) -> Result<(), GenerateError> {
    let fail = |reason: String| {
        Err(GenerateError::ModelDir {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_fits_prompt_and_max_tokens_within_the_context() {
        let c = engine_config(10, 30, 2048);
        assert_eq!(c.num_blocks, 3);
        let c = engine_config(100, 5000, 2048);
        assert_eq!(c.num_blocks * c.block_size, 2048);
        let scheduler = crate::scheduler::Scheduler::new(crate::scheduler::SchedulerConfig {
            max_num_batched_tokens: c.max_num_batched_tokens,
            max_num_seqs: c.max_num_seqs,
            block_size: c.block_size,
            num_blocks: c.num_blocks,
            max_model_len: 2048,
        });
        assert!(scheduler.is_ok_and(|s| s.max_context_len() == 2048));
    }

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

/// The model's text side: tokenizer, chat template, and a [`TextDecoder`] for the engine.
mod text {
    use std::path::Path;
    use std::sync::Arc;

    use tandem_text::chat_template::{ChatMessage, ChatTemplate, RenderOptions};
    use tandem_text::tokenizer::TextTokenizer;

    use crate::engine::{TextDecoder, TokenizerText};

    pub struct ModelText {
        tokenizer: Arc<TextTokenizer>,
    }

    impl ModelText {
        pub fn load(model_dir: &Path) -> Result<Self, String> {
            let tokenizer = TextTokenizer::load(model_dir).map_err(|e| e.to_string())?;
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
        pub fn chat_prompt_ids(
            &self,
            system: Option<&str>,
            prompt: &str,
        ) -> Result<Vec<u32>, String> {
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
}
