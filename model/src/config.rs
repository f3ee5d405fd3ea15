//! `config.json`: the model's architecture and shapes, in Hugging Face's field names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gguf_quant::GgufQuantConfig;
use crate::quantization::Fp8Scheme;
use crate::{CONFIG_FILE, read_json};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: unsupported architecture {found:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: invalid value for `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The Llama family the engine implements. They differ only in details the model definition
/// switches on (Qwen2's q/k/v bias, Qwen3's RMS norm of each q and k head), not in structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen3's dense models: Qwen2's shapes without the q/k/v bias (unless `attention_bias`),
    /// each q and k head RMS-normed before rotation.
    Qwen3,
}

impl Architecture {
    /// The `architectures[0]` string Hugging Face uses.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` string Hugging Face uses.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            _ => None,
        }
    }
}

/// A token id or a list of them (`eos_token_id` is either in Hugging Face configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` as Hugging Face writes it. Only `llama3` (and no scaling) are implemented;
/// other types are rejected at load so a model never runs with silently wrong positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<u64>,
}

/// transformers 5's `rope_parameters`: the base and the scaling in one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<u64>,
}

/// `config.json` of a Llama-family model, with Hugging Face's field names.
///
/// Unknown fields are ignored so Hub configs load; [`ModelConfig::load`] validates what the
/// engine relies on, and the accessors give derived values (head_dim, kv heads, architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Llama's and Qwen3's switch for biases on q/k/v/o (Qwen2 always has q/k/v biases and no
    /// o bias).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Mistral's attention window (each token attends to this many before it); Qwen's
    /// configs carry one too, in use only with `use_sliding_window` ([`Self::max_context`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// transformers >= 5 writes `rope_theta` and the scaling inside this object instead of
    /// the top-level keys; [`ModelConfig::load`] folds it into `rope_theta`/`rope_scaling` so
    /// such a config never runs with a silently wrong rotary base.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<RopeParameters>,
    /// The dtype the weights are stored in (`bfloat16`, `float16`, `float32`).
    #[serde(default, alias = "dtype", skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// A quantized checkpoint's scheme as written: FP8 ([`crate::quantization`], read by
    /// [`ModelConfig::fp8_scheme`]) or GGUF blocks kept as they are ([`crate::gguf_quant`], read
    /// by [`ModelConfig::gguf_quant`]); [`ModelConfig::validate`] refuses any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl ModelConfig {
    /// Reads `DIR/config.json` and checks it describes a model the engine can run.
    pub fn load(model_dir: &Path) -> Result<Self, ConfigError> {
        let path = model_dir.join(CONFIG_FILE);
        let mut config: ModelConfig = read_json(&path)?;
        config.fold_rope_parameters();
        config.validate(&path)?;
        Ok(config)
    }

    /// Moves transformers 5's `rope_parameters` into `rope_theta` / `rope_scaling`.
    pub fn fold_rope_parameters(&mut self) {
        let Some(params) = self.rope_parameters.take() else {
            return;
        };
        if let Some(theta) = params.rope_theta {
            self.rope_theta = theta;
        }
        let rope_type = params.rope_type.unwrap_or_else(|| "default".into());
        if rope_type != "default" {
            self.rope_scaling = Some(RopeScaling {
                rope_type,
                factor: params.factor,
                low_freq_factor: params.low_freq_factor,
                high_freq_factor: params.high_freq_factor,
                original_max_position_embeddings: params.original_max_position_embeddings,
            });
        }
    }

    /// Checks shapes and options; `path` only names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if self.try_architecture().is_none() {
            return Err(ConfigError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: self
                    .architectures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| self.model_type.clone()),
            });
        }
        for (key, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive".into()));
            }
        }
        let kv_heads = self.num_kv_heads();
        if kv_heads == 0 || !self.num_attention_heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{kv_heads} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "head_dim",
                "absent, and hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                "rotary embeddings need an even head_dim".into(),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("{:?} is not supported (silu only)", self.hidden_act),
            ));
        }
        if let Some(quantization) = &self.quantization_config {
            if GgufQuantConfig::is_gguf(quantization) {
                GgufQuantConfig::from_config(quantization)
                    .map_err(|reason| invalid("quantization_config", reason))?;
            } else {
                Fp8Scheme::from_config(quantization)
                    .map_err(|reason| invalid("quantization_config", reason))?;
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            match scaling.rope_type.as_str() {
                "default" => {}
                "llama3" => {
                    if scaling.factor.is_none()
                        || scaling.low_freq_factor.is_none()
                        || scaling.high_freq_factor.is_none()
                        || scaling.original_max_position_embeddings.is_none()
                    {
                        return Err(invalid(
                            "rope_scaling",
                            "llama3 scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings".into(),
                        ));
                    }
                }
                other => {
                    return Err(invalid(
                        "rope_scaling",
                        format!("rope type {other:?} is not supported (llama3 only)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The FP8 scheme of a quantized checkpoint; `None` for a 16/32-bit one. Valid after
    /// [`ModelConfig::validate`].
    pub fn fp8_scheme(&self) -> Option<Fp8Scheme> {
        self.quantization_config
            .as_ref()
            .filter(|q| !GgufQuantConfig::is_gguf(q))
            .map(|q| {
                Fp8Scheme::from_config(q).expect("ModelConfig::validate checks quantization_config")
            })
    }

    /// The GGUF block types of a directory that keeps a GGUF's quantization; `None` for any
    /// other. Valid after [`ModelConfig::validate`].
    pub fn gguf_quant(&self) -> Option<GgufQuantConfig> {
        self.quantization_config
            .as_ref()
            .filter(|q| GgufQuantConfig::is_gguf(q))
            .map(|q| {
                GgufQuantConfig::from_config(q)
                    .expect("ModelConfig::validate checks quantization_config")
            })
    }

    fn try_architecture(&self) -> Option<Architecture> {
        self.architectures
            .first()
            .and_then(|name| Architecture::from_hf(name))
            .or_else(|| Architecture::from_hf(&self.model_type))
    }

    /// The architecture; valid after [`ModelConfig::validate`].
    pub fn architecture(&self) -> Architecture {
        self.try_architecture()
            .expect("ModelConfig::validate rejects unknown architectures")
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always; Llama and Qwen3 when
    /// `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.architecture() == Architecture::Qwen2 || self.attention_bias
    }

    /// Whether the output projection carries a bias (Llama and Qwen3 with `attention_bias`).
    pub fn o_bias(&self) -> bool {
        self.architecture() != Architecture::Qwen2 && self.attention_bias
    }

    /// Whether each q and k head is RMS-normed (weights of `head_dim`) before rotation: Qwen3.
    pub fn qk_norm(&self) -> bool {
        self.architecture() == Architecture::Qwen3
    }

    /// The attention window the model was trained with, where it has one in use (Mistral's
    /// `sliding_window`; Qwen's with `use_sliding_window`); `None`: full attention.
    pub fn attention_window(&self) -> Option<usize> {
        match self.architecture() {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window == Some(true) => {
                self.sliding_window
            }
            _ => None,
        }
    }

    /// The longest context served: `max_position_embeddings`, capped at the attention window
    /// where the model has one. The engine attends over the whole context, which equals
    /// sliding-window attention for contexts up to the window and differs beyond it, so no
    /// longer context is served (vLLM capped its context the same way before it implemented
    /// windows).
    pub fn max_context(&self) -> usize {
        match self.attention_window() {
            Some(window) if window > 0 => self.max_position_embeddings.min(window),
            _ => self.max_position_embeddings,
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Number of parameters the named tensors hold (tied embeddings counted once).
    pub fn parameter_count(&self) -> u64 {
        crate::tensor_names::expected_tensors(self)
            .iter()
            .map(|(_, shape)| shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }

    /// A config of the given shapes with the other fields at Llama defaults.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        vocab_size: usize,
    ) -> Self {
        ModelConfig {
            architectures: vec![Architecture::Llama.hf_class().to_string()],
            model_type: Architecture::Llama.model_type().to_string(),
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: Some(hidden_size / num_attention_heads),
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            attention_bias: false,
            hidden_act: default_hidden_act(),
            sliding_window: None,
            use_sliding_window: None,
            rope_parameters: None,
            torch_dtype: None,
            quantization_config: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2_json() -> &'static str {
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,
            "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,
            "eos_token_id":2,"torch_dtype":"bfloat16","unknown_field":42}"#
    }

    #[test]
    fn parses_hub_config_and_derives_shapes() {
        let config: ModelConfig = serde_json::from_str(smollm2_json()).unwrap();
        config.validate(Path::new("config.json")).unwrap();
        assert_eq!(config.architecture(), Architecture::Llama);
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.num_kv_heads(), 3);
        assert_eq!(config.eos_token_ids(), vec![2]);
        assert!(!config.qkv_bias());
        // SmolLM2-135M has 134.5M parameters with tied embeddings.
        assert_eq!(config.parameter_count(), 134_515_008);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_shapes() {
        let mut config: ModelConfig = serde_json::from_str(smollm2_json()).unwrap();
        config.architectures = vec!["GPT2LMHeadModel".into()];
        config.model_type = "gpt2".into();
        let err = config.validate(Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");

        let mut config: ModelConfig = serde_json::from_str(smollm2_json()).unwrap();
        config.num_key_value_heads = Some(4);
        let err = config.validate(Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn gguf_quantization_config_is_read_apart_from_fp8() {
        let mut config: ModelConfig = serde_json::from_str(smollm2_json()).unwrap();
        config.quantization_config = Some(serde_json::json!({
            "quant_method": "gguf",
            "tensor_types": {"model.embed_tokens.weight": "Q8_0"}
        }));
        config.validate(Path::new("config.json")).unwrap();
        assert_eq!(config.fp8_scheme(), None);
        let gguf = config.gguf_quant().unwrap();
        assert_eq!(gguf.main_type(), Some(crate::GgufQuant::Q8_0));
        config.quantization_config = Some(serde_json::json!({
            "quant_method": "gguf",
            "tensor_types": {"model.embed_tokens.weight": "IQ2_XS"}
        }));
        let err = config.validate(Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("IQ2_XS"), "{err}");
    }

    #[test]
    fn llama3_rope_scaling_needs_all_its_fields() {
        let mut config: ModelConfig = serde_json::from_str(smollm2_json()).unwrap();
        config.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: None,
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        });
        assert!(config.validate(Path::new("c")).is_err());
        config.rope_scaling.as_mut().unwrap().low_freq_factor = Some(1.0);
        config.validate(Path::new("c")).unwrap();
        config.rope_scaling.as_mut().unwrap().rope_type = "yarn".into();
        assert!(config.validate(Path::new("c")).is_err());
    }

    #[test]
    fn transformers5_rope_parameters_are_folded_in() {
        let dir = std::env::temp_dir().join(format!("tandem-rope-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = smollm2_json().replace(
            "\"rope_theta\":100000.0,",
            r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
               "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"#,
        );
        std::fs::write(dir.join(CONFIG_FILE), json).unwrap();
        let config = ModelConfig::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.rope_theta, 500000.0);
        let scaling = config.rope_scaling.unwrap();
        assert_eq!(scaling.rope_type, "llama3");
        assert_eq!(scaling.factor, Some(8.0));
        assert!(config.rope_parameters.is_none());
    }

    #[test]
    fn an_attention_window_in_use_caps_the_context() {
        let mut config = ModelConfig::llama(64, 128, 2, 4, 2, 256);
        config.max_position_embeddings = 32768;
        config.sliding_window = Some(4096);
        // Llama has no window; Qwen's is off unless use_sliding_window.
        assert_eq!(config.max_context(), 32768);
        config.architectures = vec!["Qwen2ForCausalLM".into()];
        assert_eq!(config.max_context(), 32768);
        config.use_sliding_window = Some(true);
        assert_eq!(config.max_context(), 4096);
        config.architectures = vec!["MistralForCausalLM".into()];
        config.use_sliding_window = None;
        assert_eq!(config.attention_window(), Some(4096));
        assert_eq!(config.max_context(), 4096);
        config.sliding_window = Some(65536);
        assert_eq!(config.max_context(), 32768);
    }

    #[test]
    fn eos_may_be_a_list() {
        let json = smollm2_json().replace("\"eos_token_id\":2", "\"eos_token_id\":[2,7]");
        let config: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(config.eos_token_ids(), vec![2, 7]);
    }
}
