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
    /// vLLM's extension, on a LoRA adapter's card: the model it adapts (absent on the served
    /// model's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
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
                parent: None,
            }],
        }
    }

    /// The served model's card followed by one per LoRA adapter of it (`adapters`, by name).
    pub fn with_adapters(
        id: String,
        created: u64,
        max_model_len: u32,
        adapters: Vec<String>,
    ) -> Self {
        let mut list = Self::single(id.clone(), created, max_model_len);
        list.data.extend(adapters.into_iter().map(|name| ModelCard {
            id: name,
            object: "model",
            created,
            owned_by: "tandem",
            max_model_len,
            parent: Some(id.clone()),
        }));
        list
    }
}
