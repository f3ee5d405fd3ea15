//! The model directory: the one definition that `model-prep` writes and the workers read.
//!
//! A model directory is Hugging Face shaped (`config.json`, `*.safetensors` with HF tensor
//! names, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`), so a directory
//! downloaded from the Hub and one imported from a GGUF look the same to a worker. This crate
//! owns the file names, the serde schema of the JSON files, the tensor naming scheme, and the
//! random-weight presets and generator; it has no heavy dependencies so every crate can use it.

mod config;
mod dtype;
mod files;
mod generation;
pub mod gguf_quant;
pub mod lora;
pub mod presets;
pub mod quantization;
pub mod random_weights;
pub mod sentence_transformers;
pub mod tensor_names;
mod tokenizer_config;

pub use config::{Architecture, ConfigError, ModelConfig, RopeParameters, RopeScaling, TokenIds};
pub use dtype::{F8E4M3_MAX, WeightDType};
pub use files::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, RANDOM_WEIGHTS_FILE, SAFETENSORS_INDEX_FILE,
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_json, write_json,
};
pub use generation::GenerationConfig;
pub use gguf_quant::{GgufQuant, GgufQuantConfig};
pub use tokenizer_config::{AddedTokenEntry, TokenizerConfig};
