//! File names inside a model directory, and JSON helpers that name the file in their errors.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use crate::ConfigError;

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Single-file weights, as `model-prep` writes them.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// A random-weight model without weight files: the seed and dtype a worker generates the
/// weights from when it loads the model (`model-prep random --generate-at-load`;
/// [`crate::random_weights::RandomWeights`]).
pub const RANDOM_WEIGHTS_FILE: &str = "random_weights.json";
/// Sharded weights, as large Hub models ship them (`weight_map`: tensor name -> shard file).
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads and parses one JSON file; the error names the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` as pretty JSON; the error names the file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}
