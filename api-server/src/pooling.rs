//! How the served model's embeddings are made from its hidden states (`/v1/embeddings`), read
//! from the model directory's sentence-transformers modules (`modules.json`, and the Pooling
//! module's `config.json`) as sentence-transformers and vLLM read them.
//!
//! The workers return the final-normed hidden state of a prompt's last token: last-token
//! pooling, what decoder embedding models (Qwen3-Embedding, gte-Qwen2, e5-mistral) are
//! trained with and what vLLM pools a decoder model's embeddings with when the directory says
//! nothing. A directory whose modules ask for anything else (mean or CLS pooling, a Dense
//! projection after the pooling) is not served embeddings: every request says why, rather
//! than answering vectors the model's users would not get from it elsewhere.
//!
//! Imports nothing of the crate.

use std::path::Path;

use serde::Deserialize;
use tandem_model::sentence_transformers::{MODULES_FILE, Module};

/// How embeddings are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// The vector's length: the model's `hidden_size`.
    pub hidden_size: u32,
    /// L2-normalize each vector (a `Normalize` module, or no `modules.json`).
    pub normalize: bool,
    /// Why the model's embeddings are not served; `None`: served.
    pub not_served: Option<String>,
}

/// The Pooling module's `config.json`: which of its modes are on.
#[derive(Deserialize)]
struct PoolingModes {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl PoolingModes {
    /// The modes that are on, by name.
    fn on(&self) -> Vec<&'static str> {
        [
            ("cls_token", self.pooling_mode_cls_token),
            ("mean_tokens", self.pooling_mode_mean_tokens),
            ("max_tokens", self.pooling_mode_max_tokens),
            (
                "mean_sqrt_len_tokens",
                self.pooling_mode_mean_sqrt_len_tokens,
            ),
            ("weightedmean_tokens", self.pooling_mode_weightedmean_tokens),
            ("lasttoken", self.pooling_mode_lasttoken),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

impl EmbeddingConfig {
    /// Reads `model_dir`'s modules for a model of `hidden_size`.
    pub fn read(model_dir: &Path, hidden_size: usize) -> Self {
        let hidden_size = u32::try_from(hidden_size).unwrap_or(u32::MAX);
        let path = model_dir.join(MODULES_FILE);
        if !path.exists() {
            return EmbeddingConfig {
                hidden_size,
                normalize: true,
                not_served: None,
            };
        }
        match read_modules(model_dir, &path) {
            Ok(normalize) => EmbeddingConfig {
                hidden_size,
                normalize,
                not_served: None,
            },
            Err(why) => EmbeddingConfig {
                hidden_size,
                normalize: false,
                not_served: Some(why),
            },
        }
    }
}

/// Whether the modules end in a `Normalize`; why they cannot be served otherwise.
fn read_modules(model_dir: &Path, path: &Path) -> Result<bool, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let modules: Vec<Module> = serde_json::from_str(&read(path)?)
        .map_err(|e| format!("{} is not a module list: {e}", path.display()))?;
    let mut normalize = false;
    let mut pooled = false;
    for module in &modules {
        match module.class() {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let config = model_dir.join(module.config_file());
                let modes: PoolingModes = serde_json::from_str(&read(&config)?)
                    .map_err(|e| format!("{} is not a pooling config: {e}", config.display()))?;
                let on = modes.on();
                if on != ["lasttoken"] {
                    return Err(format!(
                        "the model pools its embeddings by {} ({}); tandem pools the last token",
                        if on.is_empty() {
                            "no mode".to_string()
                        } else {
                            on.join(" and ")
                        },
                        config.display()
                    ));
                }
                pooled = true;
            }
            _ => {
                return Err(format!(
                    "the model's sentence-transformers modules include {} ({}), which tandem \
                     does not apply",
                    module.kind,
                    path.display()
                ));
            }
        }
    }
    if !pooled {
        return Err(format!("{} has no Pooling module", path.display()));
    }
    Ok(normalize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(modules: Option<&str>, pooling: Option<&str>) -> std::path::PathBuf {
        let dir = tandem_test_kit::temp_dir("pooling");
        if let Some(modules) = modules {
            std::fs::write(dir.join(MODULES_FILE), modules).unwrap();
        }
        if let Some(pooling) = pooling {
            std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
            std::fs::write(dir.join("1_Pooling/config.json"), pooling).unwrap();
        }
        dir
    }

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn a_directory_without_modules_pools_the_last_token_normalized() {
        let config = EmbeddingConfig::read(&dir_with(None, None), 576);
        assert_eq!(
            config,
            EmbeddingConfig {
                hidden_size: 576,
                normalize: true,
                not_served: None
            }
        );
    }

    #[test]
    fn last_token_pooling_is_served_and_normalize_follows_the_modules() {
        let last = r#"{"word_embedding_dimension": 1024, "pooling_mode_lasttoken": true,
            "pooling_mode_mean_tokens": false, "include_prompt": true}"#;
        let config = EmbeddingConfig::read(&dir_with(Some(MODULES), Some(last)), 1024);
        assert!(config.normalize);
        assert_eq!(config.not_served, None);
        let without_normalize = MODULES.replace(
            r#",
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}"#,
            "",
        );
        let config = EmbeddingConfig::read(&dir_with(Some(&without_normalize), Some(last)), 1024);
        assert!(!config.normalize);
        assert_eq!(config.not_served, None);
    }

    #[test]
    fn other_poolings_and_modules_are_refused_by_name() {
        let mean = r#"{"pooling_mode_mean_tokens": true}"#;
        let why = EmbeddingConfig::read(&dir_with(Some(MODULES), Some(mean)), 8)
            .not_served
            .unwrap();
        assert!(why.contains("mean_tokens"), "{why}");
        let dense = MODULES.replace("models.Normalize", "models.Dense");
        let last = r#"{"pooling_mode_lasttoken": true}"#;
        let why = EmbeddingConfig::read(&dir_with(Some(&dense), Some(last)), 8)
            .not_served
            .unwrap();
        assert!(why.contains("sentence_transformers.models.Dense"), "{why}");
        let why = EmbeddingConfig::read(&dir_with(Some(MODULES), None), 8)
            .not_served
            .unwrap();
        assert!(why.contains("cannot read"), "{why}");
    }
}
