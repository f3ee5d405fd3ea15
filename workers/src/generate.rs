//! `worker generate`: one local generation without the bus.
//!
//! Loads the model directory (weights, tokenizer, chat template), tokenizes the prompt —
//! through the chat template with `--chat` — and runs it through the same [`Engine`](crate::engine::Engine) and
//! engine thread the bus roles use, so its output is the reference the disaggregated path
//! must reproduce token for token.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use tandem_cli::args::{EngineArgs, GpuArgs};
use thiserror::Error;

use crate::backend::cpu::CpuOptions;
use crate::backend::cpu::quant::ActivationCodes;
use crate::device::{DeviceError, StartedEngine, load_model};
use crate::engine::{
    DEFAULT_GROWTH_RESERVE_TOKENS, EngineConfig, EngineError, EngineSettings, EventKind,
    FinishReason, ForwardFaults, GenerationRequest,
};
use tandem_protocol::config::KvCacheDtype;

use crate::model_dir::{ModelDirError, ModelText, check_model_dir};
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
    /// Drop tokens less likely than P times the most likely one, [0, 1]; 0 keeps them all.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_p: f32,
    /// Generate at least N tokens before an end-of-sequence token or a stop string may end
    /// the output.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub min_tokens: u32,
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
    /// Device to run on: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// CPU threads; 0 uses every core.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// CPU, GGUF blocks kept quantized: bits each activation keeps in the integer products,
    /// 16 (two 8-bit codes: the dequantized weights' results) or 8 (llama.cpp's rounding).
    #[arg(long, default_value_t = ActivationCodes::default(), value_name = "BITS")]
    pub quant_activation_bits: ActivationCodes,
    /// Split the model over N tensor-parallel ranks (heads and MLP channels): threads sharing
    /// --threads on the CPU; on --device cuda:K, cuda:K to cuda:K+N-1 summing over NCCL. The
    /// heads, KV heads and MLP width must divide by N.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = tandem_cli::args::parse_ranks)]
    pub tensor_parallel: usize,
    /// Element type of the KV cache: `auto` (the model's; bf16 on a GPU) or `fp8` (FP8 e4m3,
    /// half the bytes of bf16), or on the CPU `bf16`, `f16`, `f32`.
    #[arg(long, default_value_t = KvCacheDtype::Auto, value_name = "TYPE",
          value_parser = tandem_cli::args::kv_cache_dtype_parser())]
    pub kv_cache_dtype: KvCacheDtype,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
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
    #[error(transparent)]
    ModelDir(#[from] ModelDirError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Text(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Runs one generation; `on_text` receives the text as it is generated.
pub fn generate(
    args: &GenerateArgs,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    check_model_dir(&args.model)?;
    let text = ModelText::load(&args.model)?;
    let prompt_ids = if args.chat || args.system.is_some() {
        text.chat_prompt_ids(args.system.as_deref(), &args.prompt)
    } else {
        text.prompt_ids(&args.prompt)
    }
    .map_err(GenerateError::Text)?;
    let model = load_model(
        &args.model,
        args.device.parse()?,
        &CpuOptions {
            threads: args.threads,
            quant_activations: args.quant_activation_bits,
            ..CpuOptions::default()
        },
        &args.gpu,
        args.tensor_parallel,
        args.kv_cache_dtype,
    )?;
    let config = EngineConfig {
        settings: EngineSettings::from_env().with_flags(&args.engine),
        ..engine_config(
            prompt_ids.len(),
            args.max_tokens,
            model.config().max_context(),
        )
    };
    // The test hooks are the serving worker's: none here.
    let StartedEngine { handle, thread, .. } = model.spawn_engine(
        &args.model,
        config,
        Some(text.decoder()),
        ForwardFaults::default(),
    )?;

    let request = GenerationRequest {
        prompt_ids: prompt_ids.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: args.min_p,
            min_tokens: args.min_tokens,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop_token_ids: text.stop_token_ids(),
        ignore_eos: false,
        stop_strings: args.stop.clone(),
        include_stop_str_in_output: false,
        skip_special_tokens: true,
        prefill_only: false,
        deadline: None,
        resume_ids: Vec::new(),
        prompt_logprobs: None,
        embedding: false,
        cache_salt: None,
        priority: 0,
        sample_group: None,
        grammar: None,
        prediction: Vec::new(),
        adapter: None,
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
            // Only requests queued for an import have room reserved, and only requests that
            // ask for them get prompt logprobs or a hidden state.
            EventKind::RoomReserved { .. }
            | EventKind::PromptLogprobs { .. }
            | EventKind::Hidden { .. } => {}
        }
    }
    drop(handle);
    // The thread exits once the last handle is gone; a panic there is a failed generation.
    let joined = thread.join();
    match finish {
        Some(FinishReason::Error(message) | FinishReason::Refused { message, .. }) => {
            Err(GenerateError::Failed(message))
        }
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
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        // One request: nothing to share.
        prefix_caching: false,
        ..EngineConfig::default()
    }
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
            growth_reserve_tokens: None,
            prefix_caching: false,
        });
        assert!(scheduler.is_ok_and(|s| s.max_context_len() == 2048));
    }
}
