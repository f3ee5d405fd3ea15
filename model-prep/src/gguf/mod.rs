//! GGUF files (llama.cpp's model format): reading, dequantizing, and translating to the
//! Hugging Face model directory schema of `tandem-model`.
//!
//! - [`reader`] parses the header, metadata and tensor table over a memory map, checking every
//!   length and offset against the file so a truncated or corrupt file is an error, not a panic
//!   or a huge allocation.
//! - [`types`] knows ggml's tensor types and their block layouts.
//! - [`dequant`] turns tensor data of the supported types into f32, bit-exactly as ggml does.
//! - [`names`] maps GGUF tensor names to Hugging Face names and undoes llama.cpp's Q/K row
//!   permutation.
//! - [`config`] builds `config.json` from the metadata, [`vocab`](mod@vocab) the tokenizer vocabulary.

pub mod config;
pub mod dequant;
mod iq;
mod iq_grids;
pub mod names;
pub mod reader;
pub mod types;
pub mod vocab;

pub use config::{ConfigFromGgufError, model_config};
pub use dequant::{DequantError, dequantize};
pub use names::{NameError, TensorPlan, plan_tensors};
pub use reader::{GgufError, GgufFile, MetaValue, TensorInfo};
pub use types::GgmlType;
pub use vocab::vocab;
