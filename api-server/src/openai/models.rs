//! `/v1/models`.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    /// Unix seconds; the server's start time.
    pub created: u64,
    pub owned_by: &'static str,
    /// vLLM's extension: the context length, which clients use to size prompts.
    pub max_model_len: u32,
}

impl ModelList {
    pub fn single(id: String, created: u64, max_model_len: u32) -> Self {
        ModelList {
            object: "list",
            data: vec![ModelCard {
                id,
                object: "model",
                created,
                owned_by: "tandem",
                max_model_len,
            }],
        }
    }
}
