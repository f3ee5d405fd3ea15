//! An embedding model's sentence-transformers modules (`modules.json`): the pipeline after the
//! transformer (pooling, normalization, projections), which the api-server follows to pool
//! `/v1/embeddings` and `model-prep fetch` downloads with the model.

use serde::Deserialize;

/// The module list's file in a model directory.
pub const MODULES_FILE: &str = "modules.json";

/// One entry of `modules.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Module {
    /// The module's class (`sentence_transformers.models.Pooling`, `...Normalize`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its directory in the model's (its `config.json` is there); empty for the transformer.
    #[serde(default)]
    pub path: String,
}

impl Module {
    /// The class's own name (`Pooling` of `sentence_transformers.models.Pooling`).
    pub fn class(&self) -> &str {
        self.kind.rsplit('.').next().unwrap_or(&self.kind)
    }

    /// The module's config file, relative to the model directory: `PATH/config.json`.
    pub fn config_file(&self) -> String {
        format!("{}/config.json", self.path)
    }
}
