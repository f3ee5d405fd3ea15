//! `model-prep`: builds model directories (see the `tandem-model` crate for their schema).
//!
//! Every command writes into a [`output::StagedDir`] beside the destination and renames it
//! into place only when complete, so a failed or interrupted run never leaves a directory
//! that looks valid.

pub mod default_model;
pub mod fetch;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod inspect;
pub mod lora;
pub mod output;
pub mod progress;
pub mod quantize;
pub mod random;
pub mod safetensors_writer;
