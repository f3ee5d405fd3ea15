//! `model-prep random`: a model directory with random weights of a preset's real shapes.
//!
//! Tests and GPU benchmarks need models of real sizes without downloading them. The output is
//! a complete model directory (config, generation config, tokenizer, safetensors) that the
//! workers load like any other; the same preset, seed and dtype always give byte-identical
//! files (see [`weights`] for how that survives parallelism).
//!
//! Memory stays at about two tensors: one thread generates tensor i+1 while another writes
//! tensor i, so an 8B model (16 GB in bf16) streams through without being held.

pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tandem_model::WeightDType;
use tandem_model::presets::{PRESET_NAMES, preset};
use tandem_model::quantization::{Fp8Scheme, WEIGHT_SCALE_SUFFIX, WeightScales};
use tandem_model::random_weights::{self as weights, GENERATOR_VERSION, RandomWeights};
use tandem_model::tensor_names::expected_tensors;
use tandem_model::{
    CONFIG_FILE, ConfigError, GENERATION_CONFIG_FILE, GenerationConfig, ModelConfig,
    RANDOM_WEIGHTS_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TokenIds, WEIGHTS_FILE, write_json,
};

use crate::output::{OutputError, StagedDir};
use crate::progress;
use crate::safetensors_writer::{SafetensorsWriter, TensorSpec, WriteError};

/// Vocabulary of the `tiny` preset (whose shapes leave it open): big enough for merges that
/// make text a few characters per token, small enough that its embedding is negligible.
pub const TINY_VOCAB_SIZE: usize = 512;

/// What to generate.
#[derive(Debug, Clone)]
pub struct RandomOptions {
    pub preset: String,
    /// Shapes that differ from the preset's.
    pub shape: ShapeOverrides,
    pub seed: u64,
    pub dtype: WeightDType,
    /// Replace a non-empty output directory.
    pub force: bool,
    /// Write no weight files, only the seed and dtype ([`RANDOM_WEIGHTS_FILE`]): the workers
    /// generate the same weights when they load the model. For shapes whose weights would not
    /// fit on the disk (a 70B model is 141 GB in bf16), and to skip writing them at all.
    pub generate_at_load: bool,
}

/// Shapes that differ from a preset's (`model-prep random --layers 1 ...`), for models of
/// unusual proportions a test needs: e.g. one layer and a 128k-token context, so a long prompt
/// prefills in seconds on a CPU. Each `None` keeps the preset's value. The head dimension
/// follows a new hidden size or head count (hidden / heads) unless it is given itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShapeOverrides {
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
}

impl ShapeOverrides {
    fn apply(&self, config: &mut ModelConfig) {
        let set = |field: &mut usize, value: Option<usize>| {
            if let Some(value) = value {
                *field = value;
            }
        };
        set(&mut config.hidden_size, self.hidden_size);
        set(&mut config.intermediate_size, self.intermediate_size);
        set(&mut config.num_hidden_layers, self.num_hidden_layers);
        set(&mut config.num_attention_heads, self.num_attention_heads);
        set(&mut config.vocab_size, self.vocab_size);
        set(
            &mut config.max_position_embeddings,
            self.max_position_embeddings,
        );
        if let Some(kv_heads) = self.num_key_value_heads {
            config.num_key_value_heads = Some(kv_heads);
        }
        config.head_dim = match self.head_dim {
            Some(head_dim) => Some(head_dim),
            None if self.hidden_size.is_some() || self.num_attention_heads.is_some() => {
                Some(config.hidden_size / config.num_attention_heads.max(1))
            }
            None => config.head_dim,
        };
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct RandomSummary {
    pub directory: PathBuf,
    pub config: ModelConfig,
    pub tensors: usize,
    pub parameters: u64,
    pub weight_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RandomError {
    #[error("unknown preset {name:?} (known presets: {})", PRESET_NAMES.join(", "))]
    UnknownPreset { name: String },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tokenizer for preset {preset}: {source}")]
    Tokenizer {
        preset: String,
        source: tokenizer::TokenizerError,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the weight writer thread panicked")]
    WriterPanicked,
}

/// The config a preset's random model gets: the preset's shapes with `shape`'s changes, the
/// vocabulary size and special-token ids of the synthetic tokenizer, and the dtype.
pub fn preset_config(
    name: &str,
    shape: &ShapeOverrides,
    dtype: WeightDType,
) -> Result<ModelConfig, RandomError> {
    let mut config = preset(name).ok_or_else(|| RandomError::UnknownPreset {
        name: name.to_string(),
    })?;
    if config.vocab_size == 0 {
        config.vocab_size = TINY_VOCAB_SIZE;
    }
    shape.apply(&mut config);
    // The synthetic tokenizer has its own special tokens; the config must name those, not the
    // original model's (Llama 3's bos 128000 would be an ordinary merge here).
    config.bos_token_id = Some(TokenIds::One(tokenizer::BOS_ID));
    config.eos_token_id = Some(TokenIds::One(tokenizer::EOS_ID));
    // An FP8 model's other tensors are bf16 (`torch_dtype` names those, as FP8 checkpoints do).
    let unquantized = weights::tensor_dtype(tandem_model::tensor_names::EMBED_TOKENS, dtype);
    config.torch_dtype = Some(unquantized.torch_name().to_string());
    if dtype == WeightDType::F8E4M3 {
        config.quantization_config = Some(Fp8Scheme::compressed_tensors_config(
            WeightScales::PerTensor,
            &[tandem_model::tensor_names::LM_HEAD
                .trim_end_matches(".weight")
                .to_string()],
        ));
    }
    config.validate(Path::new(CONFIG_FILE))?;
    Ok(config)
}

/// Writes a random model into `out` (atomically: nothing appears there unless complete).
pub fn generate(options: &RandomOptions, out: &Path) -> Result<RandomSummary, RandomError> {
    let config = preset_config(&options.preset, &options.shape, options.dtype)?;
    let staged = StagedDir::new(out, options.force)?;
    let dir = staged.path();

    let tokenizer = tokenizer::build(config.vocab_size, config.max_position_embeddings as u64)
        .map_err(|source| RandomError::Tokenizer {
            preset: options.preset.clone(),
            source,
        })?;
    std::fs::write(dir.join(TOKENIZER_FILE), &tokenizer.tokenizer_json).map_err(|source| {
        WriteError::Io {
            path: dir.join(TOKENIZER_FILE),
            source,
        }
    })?;
    write_json(
        &dir.join(TOKENIZER_CONFIG_FILE),
        &tokenizer.tokenizer_config,
    )?;
    write_json(&dir.join(CONFIG_FILE), &config)?;
    let generation = GenerationConfig {
        bos_token_id: Some(TokenIds::One(tokenizer::BOS_ID)),
        eos_token_id: Some(TokenIds::One(tokenizer::EOS_ID)),
        pad_token_id: Some(tokenizer::END_OF_TEXT_ID),
        ..GenerationConfig::default()
    };
    write_json(&dir.join(GENERATION_CONFIG_FILE), &generation)?;

    let (tensors, weight_bytes) = if options.generate_at_load {
        let spec = RandomWeights {
            seed: options.seed,
            dtype: options.dtype,
            generator: GENERATOR_VERSION,
        };
        write_json(&dir.join(RANDOM_WEIGHTS_FILE), &spec)?;
        (expected_tensors(&config).len(), 0)
    } else {
        write_weights(&config, options, &dir.join(WEIGHTS_FILE))?
    };
    let directory = staged.commit()?;
    Ok(RandomSummary {
        directory,
        parameters: config.parameter_count(),
        config,
        tensors,
        weight_bytes,
    })
}

/// Generates and writes every tensor; returns (tensor count, bytes of tensor data).
fn write_weights(
    config: &ModelConfig,
    options: &RandomOptions,
    path: &Path,
) -> Result<(usize, u64), RandomError> {
    let mut specs: Vec<TensorSpec> = Vec::new();
    for (name, shape) in expected_tensors(config) {
        let dtype = weights::tensor_dtype(&name, options.dtype);
        if dtype == WeightDType::F8E4M3 {
            specs.push(TensorSpec {
                name: scale_name(&name),
                dtype: WeightDType::F32.into(),
                shape: vec![1],
            });
        }
        specs.push(TensorSpec {
            name,
            dtype: dtype.into(),
            shape,
        });
    }
    let total_bytes: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("tandem.random.preset".to_string(), options.preset.clone());
    metadata.insert("tandem.random.seed".to_string(), options.seed.to_string());
    let mut writer = SafetensorsWriter::create(path, specs.clone(), &metadata)?;

    let bar = progress::bytes_bar(total_bytes, "random weights");
    // Capacity 1: at most one finished tensor waits while the next is generated.
    let (sender, receiver) = mpsc::sync_channel::<(String, Vec<u8>)>(1);
    let written = std::thread::scope(|scope| {
        let writer_bar = bar.clone();
        let writer_thread = scope.spawn(move || -> Result<(), WriteError> {
            for (name, bytes) in receiver {
                writer.write_tensor(&name, &bytes)?;
                writer_bar.inc(bytes.len() as u64);
            }
            writer.finish()
        });
        for spec in &specs {
            let bytes = if spec.name.ends_with(WEIGHT_SCALE_SUFFIX) {
                weights::FP8_SCALE.to_le_bytes().to_vec()
            } else {
                let elements = spec.shape.iter().product();
                let init = weights::Init::for_tensor(&spec.name);
                let dtype = weights::tensor_dtype(&spec.name, options.dtype);
                weights::tensor_bytes(options.seed, &spec.name, init, dtype, elements)
            };
            if sender.send((spec.name.clone(), bytes)).is_err() {
                // The writer stopped early; its error is reported below.
                break;
            }
        }
        drop(sender);
        writer_thread.join()
    });
    bar.finish_and_clear();
    written.map_err(|_| RandomError::WriterPanicked)??;
    Ok((specs.len(), total_bytes))
}

/// `x.weight_scale` of weight `x.weight`.
fn scale_name(weight: &str) -> String {
    format!(
        "{}{WEIGHT_SCALE_SUFFIX}",
        weight.strip_suffix(".weight").unwrap_or(weight)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_model_is_complete_and_loads() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("tiny");
        let options = RandomOptions {
            preset: "tiny".into(),
            shape: ShapeOverrides::default(),
            seed: 0,
            dtype: WeightDType::F32,
            force: false,
            generate_at_load: false,
        };
        let summary = generate(&options, &out).unwrap();
        let config = ModelConfig::load(&out).unwrap();
        assert_eq!(config.vocab_size, TINY_VOCAB_SIZE);
        assert_eq!(config.torch_dtype.as_deref(), Some("float32"));
        assert_eq!(summary.parameters, config.parameter_count());

        let bytes = std::fs::read(out.join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let expected = expected_tensors(&config);
        assert_eq!(st.len(), expected.len());
        for (name, shape) in &expected {
            let tensor = st.tensor(name).unwrap();
            assert_eq!(tensor.shape(), shape.as_slice(), "{name}");
            assert_eq!(tensor.dtype(), safetensors::Dtype::F32);
        }
        let norm = st.tensor("model.norm.weight").unwrap();
        assert!(norm.data().chunks(4).all(|b| b == 1f32.to_le_bytes()));

        let tokenizer = tokenizers::Tokenizer::from_file(out.join(TOKENIZER_FILE)).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), config.vocab_size);
        let files: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "no staging directory left behind");
    }

    #[test]
    fn unknown_preset_names_the_known_ones() {
        let err =
            preset_config("gpt-5", &ShapeOverrides::default(), WeightDType::Bf16).unwrap_err();
        assert!(err.to_string().contains("smollm2-135m"), "{err}");
    }

    #[test]
    fn every_preset_config_has_the_tokenizer_ids() {
        for name in PRESET_NAMES {
            let config =
                preset_config(name, &ShapeOverrides::default(), WeightDType::Bf16).unwrap();
            assert_eq!(config.eos_token_ids(), vec![tokenizer::EOS_ID]);
            assert!(config.vocab_size >= tokenizer::MIN_VOCAB_SIZE);
        }
    }

    #[test]
    fn shape_overrides_change_only_what_they_name() {
        let tiny = preset_config("tiny", &ShapeOverrides::default(), WeightDType::F32).unwrap();
        let long = ShapeOverrides {
            num_hidden_layers: Some(1),
            max_position_embeddings: Some(131_072),
            vocab_size: Some(32_000),
            ..ShapeOverrides::default()
        };
        let config = preset_config("tiny", &long, WeightDType::F32).unwrap();
        assert_eq!(config.num_hidden_layers, 1);
        assert_eq!(config.max_position_embeddings, 131_072);
        assert_eq!(config.vocab_size, 32_000);
        assert_eq!(config.hidden_size, tiny.hidden_size);
        assert_eq!(config.head_dim(), tiny.head_dim());
        // A new hidden size or head count moves the head dimension with it, unless given.
        let narrow = ShapeOverrides {
            hidden_size: Some(16),
            num_attention_heads: Some(2),
            num_key_value_heads: Some(1),
            ..ShapeOverrides::default()
        };
        let config = preset_config("tiny", &narrow, WeightDType::F32).unwrap();
        assert_eq!((config.head_dim(), config.num_kv_heads()), (8, 1));
        let explicit = ShapeOverrides {
            head_dim: Some(4),
            ..narrow
        };
        assert_eq!(
            preset_config("tiny", &explicit, WeightDType::F32)
                .unwrap()
                .head_dim(),
            4
        );
        // Shapes the model cannot have are refused, naming the key.
        let odd = ShapeOverrides {
            head_dim: Some(3),
            ..ShapeOverrides::default()
        };
        let err = preset_config("tiny", &odd, WeightDType::F32).unwrap_err();
        assert!(err.to_string().contains("head_dim"), "{err}");
    }
}
