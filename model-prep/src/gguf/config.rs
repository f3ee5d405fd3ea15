//! `config.json` from GGUF metadata (`{arch}.*` keys, as llama.cpp's converter writes them).
//!
//! Supported architectures: `llama` (Llama 2/3, Mistral and other Llama-shaped models) and
//! `qwen2`. Values stored as f32 in the GGUF (eps, rope theta) are written as the shortest
//! decimal that reads back as the same f32 (`1e-5`, not `9.999999747378752e-6`), so the
//! config reads like a Hub one and parses to the very same f32.

use std::path::Path;

use tandem_model::{Architecture, ConfigError, ModelConfig, RopeScaling, TokenIds};

use super::dequant::{DequantError, dequantize};
use super::reader::{GgufFile, MetaValue};

#[derive(Debug, thiserror::Error)]
pub enum ConfigFromGgufError {
    #[error("the GGUF has no general.architecture key")]
    NoArchitecture,
    #[error("unknown architecture {0:?} in general.architecture (supported: llama, qwen2)")]
    UnknownArchitecture(String),
    #[error("metadata key {0} is missing")]
    MissingKey(String),
    #[error(
        "the GGUF has no tokenizer: {0} is missing or empty (model-prep rebuilds tokenizer.json from the tokenizer.ggml.* metadata)"
    )]
    MissingTokenizer(&'static str),
    #[error("metadata key {key} should be {expected}, found a {found} value")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "{key} is {rope_dims} but heads are {head_dim} wide: partial rotary embeddings are not supported"
    )]
    PartialRotary {
        key: String,
        rope_dims: u64,
        head_dim: usize,
    },
    #[error("rope_freqs.weight: {0}")]
    RopeFreqs(String),
    #[error(transparent)]
    Dequant(#[from] DequantError),
    #[error("the config built from the GGUF metadata is not usable: {0}")]
    Invalid(ConfigError),
}

type Result<T> = std::result::Result<T, ConfigFromGgufError>;

/// Typed access to metadata keys with errors that name the key.
pub(crate) struct Meta<'a>(pub &'a GgufFile);

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.0.get(key)
    }

    fn wrong(key: &str, expected: &'static str, value: &MetaValue) -> ConfigFromGgufError {
        ConfigFromGgufError::WrongType {
            key: key.to_string(),
            expected,
            found: value.type_name(),
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| Self::wrong(key, "a non-negative integer", v))
            })
            .transpose()
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| ConfigFromGgufError::MissingKey(key.to_string()))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.opt_u64(key)?.map(|v| v as usize))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        Ok(self.u64(key)? as usize)
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a 32-bit token id", v)),
        }
    }

    /// A float; f32 values become the shortest decimal that reads back as the same f32.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::F32(v)) => Ok(Some(shortest_f64(*v))),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "a number", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| Self::wrong(key, "a string", v)))
            .transpose()
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        self.get(key)
            .map(|v| v.as_array().ok_or_else(|| Self::wrong(key, "an array", v)))
            .transpose()
    }

    /// Maps every item of array `key` with `item`, naming the key when an item does not fit.
    pub fn opt_list<T>(
        &self,
        key: &str,
        expected: &'static str,
        item: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| item(v).ok_or_else(|| Self::wrong(key, expected, v)))
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| Self::wrong(key, "a boolean", v)))
            .transpose()
    }
}

/// The f64 whose shortest decimal form equals that of `v` (`1e-5f32` -> `1e-5`).
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// The architecture named by `general.architecture`.
pub fn architecture(file: &GgufFile) -> Result<Architecture> {
    let meta = Meta(file);
    let arch = meta
        .opt_str("general.architecture")?
        .ok_or(ConfigFromGgufError::NoArchitecture)?;
    match arch {
        "llama" => Ok(Architecture::Llama),
        "qwen2" => Ok(Architecture::Qwen2),
        "qwen3" => Ok(Architecture::Qwen3),
        other => Err(ConfigFromGgufError::UnknownArchitecture(other.to_string())),
    }
}

/// Builds and validates the model's `config.json` from the GGUF metadata.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    let architecture = architecture(file)?;
    let meta = Meta(file);
    let arch = architecture.model_type();
    let key = |k: &str| format!("{arch}.{k}");

    let hidden_size = meta.usize(&key("embedding_length"))?;
    let num_attention_heads = meta.usize(&key("attention.head_count"))?;
    let num_key_value_heads = meta
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if num_attention_heads > 0 => hidden_size / num_attention_heads,
        None => 0,
    };
    if let Some(rope_dims) = meta.opt_u64(&key("rope.dimension_count"))?
        && rope_dims != head_dim as u64
    {
        return Err(ConfigFromGgufError::PartialRotary {
            key: key("rope.dimension_count"),
            rope_dims,
            head_dim,
        });
    }
    let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => {
            token_count(file).ok_or_else(|| ConfigFromGgufError::MissingKey(key("vocab_size")))?
        }
    };
    let rope_theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let max_position_embeddings = meta.opt_usize(&key("context_length"))?.unwrap_or(2048);
    let mut rope_scaling = rope_scaling_from_keys(&meta, arch)?;
    if rope_scaling.is_none() && file.tensor("rope_freqs.weight").is_some() {
        rope_scaling = Some(llama3_from_rope_freqs(file, rope_theta, head_dim)?);
    }
    let has = |name: &str| file.tensor(name).is_some();

    let mut config = ModelConfig {
        architectures: vec![architecture.hf_class().to_string()],
        model_type: architecture.model_type().to_string(),
        hidden_size,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads: Some(num_key_value_heads),
        head_dim: Some(head_dim),
        vocab_size,
        rms_norm_eps: meta
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: !has("output.weight"),
        bos_token_id: meta
            .opt_u32("tokenizer.ggml.bos_token_id")?
            .map(TokenIds::One),
        eos_token_id: meta
            .opt_u32("tokenizer.ggml.eos_token_id")?
            .map(TokenIds::One),
        attention_bias: matches!(architecture, Architecture::Llama | Architecture::Qwen3)
            && has("blk.0.attn_q.bias"),
        hidden_act: "silu".into(),
        sliding_window: None,
        use_sliding_window: None,
        rope_parameters: None,
        torch_dtype: None,
        quantization_config: None,
    };
    if architecture == Architecture::Qwen2 {
        // Qwen2's HF config has no attention_bias key; its q/k/v biases are implied.
        config.attention_bias = false;
    }
    config
        .validate(Path::new("config.json"))
        .map_err(ConfigFromGgufError::Invalid)?;
    Ok(config)
}

/// `{arch}.rope.scaling.*`, when the converter wrote them.
fn rope_scaling_from_keys(meta: &Meta, arch: &str) -> Result<Option<RopeScaling>> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let rope_type = meta.opt_str(&key("type"))?;
    let factor = meta.opt_f64(&key("factor"))?;
    let rope_type = match (rope_type, factor) {
        (None | Some("none"), _) => return Ok(None),
        (Some(t), _) => t.to_string(),
    };
    Ok(Some(RopeScaling {
        rope_type,
        factor,
        low_freq_factor: meta.opt_f64(&key("low_freq_factor"))?,
        high_freq_factor: meta.opt_f64(&key("high_freq_factor"))?,
        original_max_position_embeddings: meta.opt_u64(&key("original_context_length"))?,
    }))
}

/// Llama 3.1+ GGUFs carry their rope scaling only as `rope_freqs.weight`, the per-frequency
/// divisors llama.cpp's converter computed from the HF `rope_scaling` (factor, low/high freq
/// factors, original context). Meta's released models all use low 1, high 4, original 8192
/// with factor 8 (3.1) or 32 (3.2); the factor is the largest divisor. The other parameters
/// are accepted only if recomputing the divisors with them reproduces the tensor, so a model
/// with other values is an error rather than silently wrong positions.
fn llama3_from_rope_freqs(file: &GgufFile, theta: f64, head_dim: usize) -> Result<RopeScaling> {
    let info = file
        .tensor("rope_freqs.weight")
        .expect("caller checked rope_freqs.weight exists");
    let divisors = dequantize(&info.name, info.ggml_type, file.tensor_data(info))?;
    if divisors.len() != head_dim / 2 {
        return Err(ConfigFromGgufError::RopeFreqs(format!(
            "{} values, expected head_dim / 2 = {}",
            divisors.len(),
            head_dim / 2
        )));
    }
    let factor = divisors.iter().copied().fold(f32::MIN, f32::max) as f64;
    let (low, high, original) = (1.0, 4.0, 8192u64);
    let low_wavelen = original as f64 / low;
    let high_wavelen = original as f64 / high;
    for (i, &found) in divisors.iter().enumerate() {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let expected = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (original as f64 / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        if (expected - f64::from(found)).abs() > 1e-3 * expected {
            return Err(ConfigFromGgufError::RopeFreqs(format!(
                "value {i} is {found}, but llama3 scaling with factor {factor}, low_freq_factor {low}, \
                 high_freq_factor {high}, original context {original} gives {expected}; \
                 this rope scaling is not supported"
            )));
        }
    }
    Ok(RopeScaling {
        rope_type: "llama3".into(),
        factor: Some(factor),
        low_freq_factor: Some(low),
        high_freq_factor: Some(high),
        original_max_position_embeddings: Some(original),
    })
}

/// Number of tokens, for `vocab_size` when the architecture key is absent.
pub fn token_count(file: &GgufFile) -> Option<usize> {
    file.get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(<[MetaValue]>::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::tests::GgufBuilder;

    fn open(builder: GgufBuilder) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, builder.build()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        (dir, file)
    }

    fn smollm_like(arch: &str) -> GgufBuilder {
        GgufBuilder::new()
            .str("general.architecture", arch)
            .u32(&format!("{arch}.block_count"), 30)
            .u32(&format!("{arch}.context_length"), 8192)
            .u32(&format!("{arch}.embedding_length"), 576)
            .u32(&format!("{arch}.feed_forward_length"), 1536)
            .u32(&format!("{arch}.attention.head_count"), 9)
            .u32(&format!("{arch}.attention.head_count_kv"), 3)
            .f32(&format!("{arch}.rope.freq_base"), 100000.0)
            .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)
            .u32(&format!("{arch}.rope.dimension_count"), 64)
            .strings("tokenizer.ggml.tokens", &["a", "b", "c"])
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2)
    }

    #[test]
    fn llama_metadata_becomes_hf_config() {
        let (_d, file) = open(smollm_like("llama"));
        let config = model_config(&file).unwrap();
        assert_eq!(config.architectures, vec!["LlamaForCausalLM"]);
        assert_eq!(
            (
                config.num_hidden_layers,
                config.hidden_size,
                config.num_attention_heads,
                config.num_kv_heads(),
                config.intermediate_size
            ),
            (30, 576, 9, 3, 1536)
        );
        assert_eq!(
            config.vocab_size, 3,
            "token count when vocab_size is absent"
        );
        assert_eq!(config.rms_norm_eps, 1e-5);
        assert_eq!(config.rope_theta, 1e5);
        assert_eq!(config.max_position_embeddings, 8192);
        assert!(config.tie_word_embeddings);
        assert_eq!(config.eos_token_ids(), vec![2]);
        assert_eq!(config.rope_scaling, None);
    }

    #[test]
    fn qwen2_and_unknown_architectures() {
        let (_d, file) = open(smollm_like("qwen2").u32("qwen2.vocab_size", 151936));
        let config = model_config(&file).unwrap();
        assert_eq!(config.architecture(), Architecture::Qwen2);
        assert!(config.qkv_bias());
        assert_eq!(config.vocab_size, 151936);

        let (_d, file) = open(smollm_like("gemma3"));
        let err = model_config(&file).unwrap_err().to_string();
        assert!(err.contains("unknown architecture \"gemma3\""), "{err}");
    }

    #[test]
    fn llama3_scaling_from_keys_and_missing_keys() {
        let (_d, file) = open(
            smollm_like("llama")
                .str("llama.rope.scaling.type", "llama3")
                .f32("llama.rope.scaling.factor", 8.0)
                .f32("llama.rope.scaling.low_freq_factor", 1.0)
                .f32("llama.rope.scaling.high_freq_factor", 4.0)
                .u32("llama.rope.scaling.original_context_length", 8192),
        );
        let scaling = model_config(&file).unwrap().rope_scaling.unwrap();
        assert_eq!(scaling.rope_type, "llama3");
        assert_eq!(scaling.factor, Some(8.0));
        assert_eq!(scaling.original_max_position_embeddings, Some(8192));

        let (_d, file) = open(smollm_like("llama").str("llama.rope.scaling.type", "yarn"));
        let err = model_config(&file).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");

        let (_d, file) = open(GgufBuilder::new().str("general.architecture", "llama"));
        let err = model_config(&file).unwrap_err().to_string();
        assert!(err.contains("llama.embedding_length is missing"), "{err}");

        let (_d, file) = open(smollm_like("llama").u32("llama.attention.key_length", 32));
        let err = model_config(&file).unwrap_err().to_string();
        assert!(err.contains("partial rotary"), "{err}");
    }

    #[test]
    fn llama3_scaling_recovered_from_rope_freqs() {
        let (theta, head_dim, factor) = (500000.0f64, 64usize, 8.0f64);
        let divisors: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let wavelen =
                    2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64);
                if wavelen < 2048.0 {
                    1.0
                } else if wavelen > 8192.0 {
                    factor as f32
                } else {
                    let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        let base = || {
            GgufBuilder::new()
                .str("general.architecture", "llama")
                .u32("llama.block_count", 2)
                .u32("llama.embedding_length", 576)
                .u32("llama.feed_forward_length", 1536)
                .u32("llama.attention.head_count", 9)
                .f32("llama.rope.freq_base", theta as f32)
                .u32("llama.vocab_size", 10)
        };
        let bytes = |v: &[f32]| v.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let (_d, file) = open(base().tensor("rope_freqs.weight", &[32], 0, bytes(&divisors)));
        let scaling = model_config(&file).unwrap().rope_scaling.unwrap();
        assert_eq!(scaling.rope_type, "llama3");
        assert_eq!(scaling.factor, Some(8.0));
        assert_eq!(scaling.original_max_position_embeddings, Some(8192));

        // A high-frequency divisor other than 1 is not llama3 scaling with these parameters.
        let mut bent = divisors.clone();
        bent[2] = 1.5;
        let (_d, file) = open(base().tensor("rope_freqs.weight", &[32], 0, bytes(&bent)));
        let err = model_config(&file).unwrap_err().to_string();
        assert!(err.contains("rope_freqs.weight: value 2"), "{err}");
    }
}
