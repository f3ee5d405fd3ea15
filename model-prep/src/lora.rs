//! `model-prep lora`: LoRA adapters in PEFT's format for a model directory.
//!
//! - [`random_adapter`] writes an adapter of random factors for a model's shapes (benchmarks
//!   and tests: what serving an adapter costs, and whether the arithmetic is right, need no
//!   trained adapter). Unlike PEFT's initialization (`B` zero, so a fresh adapter changes
//!   nothing), both factors are random, so the adapter changes every output it targets.
//! - [`merge_adapter`] writes a copy of the model with an adapter folded into its weights
//!   (`W + scale * B A`, computed in f32 and stored in the model's type): what a deployment
//!   that serves one adapter only runs without the adapter's products, and the reference a
//!   served adapter is checked against.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use tandem_model::lora::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, Factor, Target, parse_tensor_name,
    tensor_name,
};
use tandem_model::{CONFIG_FILE, ModelConfig, WEIGHTS_FILE, WeightDType, write_json};

use crate::output::{OutputError, StagedDir};
use crate::progress;
use crate::quantize::{QuantizeError, copy_other_files, map_weight_files, sixteen_bit_tensors};
use crate::safetensors_writer::{SafetensorsWriter, TensorSpec, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum LoraPrepError {
    #[error(transparent)]
    Config(#[from] tandem_model::ConfigError),
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error(transparent)]
    Files(#[from] QuantizeError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// What [`random_adapter`] writes.
#[derive(Debug, Clone)]
pub struct RandomAdapterOptions {
    pub rank: usize,
    pub alpha: f64,
    /// The projections it targets (every layer's).
    pub targets: Vec<Target>,
    pub seed: u64,
    /// The factors' type: F32, BF16 or F16.
    pub dtype: WeightDType,
    /// How large the adapter's change of a projection's output is against the output, for
    /// weights of typical scale (rms `1/sqrt(in)`): 0.25 moves a model's logits clearly.
    pub strength: f64,
}

/// What [`random_adapter`] or [`merge_adapter`] wrote.
#[derive(Debug, Clone)]
pub struct LoraSummary {
    pub directory: PathBuf,
    /// Projections the adapter changes (over all layers).
    pub modules: usize,
    pub bytes: u64,
}

/// Writes a random adapter for the model in `model_dir` into `out` (atomically).
pub fn random_adapter(
    model_dir: &Path,
    out: &Path,
    options: &RandomAdapterOptions,
    force: bool,
) -> Result<LoraSummary, LoraPrepError> {
    let config = ModelConfig::load(model_dir)?;
    let fail = |reason: String| LoraPrepError::Adapter {
        path: out.to_path_buf(),
        reason,
    };
    if options.rank == 0 {
        return Err(fail("rank 0".into()));
    }
    if options.targets.is_empty() {
        return Err(fail("no target modules".into()));
    }
    if !matches!(
        options.dtype,
        WeightDType::F32 | WeightDType::Bf16 | WeightDType::F16
    ) {
        return Err(fail(format!(
            "factors in {:?}: F32, BF16 or F16",
            options.dtype
        )));
    }
    let adapter_config = AdapterConfig {
        peft_type: Some("LORA".into()),
        r: options.rank,
        lora_alpha: options.alpha,
        use_rslora: false,
        use_dora: false,
        fan_in_fan_out: false,
        bias: Some("none".into()),
        modules_to_save: None,
        alpha_pattern: HashMap::new(),
    };
    let scale = adapter_config.scale(options.rank) as f64;
    let r = options.rank;
    let mut specs = Vec::new();
    for layer in 0..config.num_hidden_layers {
        for &target in &options.targets {
            let (rows, cols) = target.shape(&config);
            for (factor, shape) in [(Factor::A, vec![r, cols]), (Factor::B, vec![rows, r])] {
                specs.push(TensorSpec {
                    name: tensor_name(layer, target, factor),
                    dtype: options.dtype.into(),
                    shape,
                });
            }
        }
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    let staged = StagedDir::new(out, force)?;
    let dir = staged.path().to_path_buf();
    let mut json = serde_json::to_value(&adapter_config).expect("a config serializes");
    let object = json.as_object_mut().expect("an object");
    let mut targets: Vec<&str> = options.targets.iter().map(|t| t.short_name()).collect();
    targets.sort();
    targets.dedup();
    object.insert("target_modules".into(), targets.into());
    object.insert("task_type".into(), "CAUSAL_LM".into());
    object.insert(
        "base_model_name_or_path".into(),
        model_dir.display().to_string().into(),
    );
    object.insert(
        "tandem_random".into(),
        serde_json::json!({ "seed": options.seed, "strength": options.strength }),
    );
    write_json(&dir.join(ADAPTER_CONFIG_FILE), &json).map_err(|e| fail(e.to_string()))?;
    let bytes: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let mut writer = SafetensorsWriter::create(&dir.join(ADAPTER_WEIGHTS_FILE), specs, &metadata)?;
    for name in &names {
        let (layer, target, factor) =
            parse_tensor_name(name, config.num_hidden_layers).expect("names we wrote");
        let (rows, cols) = target.shape(&config);
        // A's rows have unit variance against a unit input; B's entries make `scale * B A x`
        // about `strength` times a projection of rms 1/sqrt(in) weights ([`Self::strength`]).
        let (count, bound) = match factor {
            Factor::A => (r * cols, (3.0 / cols as f64).sqrt()),
            Factor::B => (
                rows * r,
                options.strength * 3.0f64.sqrt() / ((r as f64).sqrt() * scale),
            ),
        };
        // One stream per tensor, so that the values do not depend on the targets chosen.
        let mut rng = ChaCha8Rng::seed_from_u64(
            options.seed ^ (layer as u64) << 8 ^ (target as u64) << 4 ^ factor as u64,
        );
        let values: Vec<f32> = (0..count)
            .map(|_| (rng.random_range(-bound..bound)) as f32)
            .collect();
        writer.write_tensor(name, &options.dtype.encode(&values))?;
    }
    writer.finish()?;
    let directory = staged.commit()?;
    Ok(LoraSummary {
        directory,
        modules: config.num_hidden_layers * options.targets.len(),
        bytes,
    })
}

/// An adapter's factors in f32, by (layer, projection): `(r, A [r, in], B [out, r] scaled)`.
type Factors = HashMap<(usize, Target), (usize, Vec<f32>, Vec<f32>)>;

/// One factor's shape and values.
type Factor32 = (Vec<usize>, Vec<f32>);

/// Reads the adapter in `adapter_dir` for a model of `config`, checked against its shapes.
fn read_adapter(adapter_dir: &Path, config: &ModelConfig) -> Result<Factors, LoraPrepError> {
    let fail = |reason: String| LoraPrepError::Adapter {
        path: adapter_dir.to_path_buf(),
        reason,
    };
    let text = std::fs::read(adapter_dir.join(ADAPTER_CONFIG_FILE))
        .map_err(|e| fail(format!("reading {ADAPTER_CONFIG_FILE}: {e}")))?;
    let adapter: AdapterConfig =
        serde_json::from_slice(&text).map_err(|e| fail(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    adapter
        .check()
        .map_err(|e| fail(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    let bytes = std::fs::read(adapter_dir.join(ADAPTER_WEIGHTS_FILE))
        .map_err(|e| fail(format!("reading {ADAPTER_WEIGHTS_FILE}: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("{ADAPTER_WEIGHTS_FILE}: {e}")))?;
    let mut halves: HashMap<(usize, Target), [Option<Factor32>; 2]> = HashMap::new();
    for (name, view) in st.iter() {
        let (layer, target, factor) =
            parse_tensor_name(name, config.num_hidden_layers).map_err(fail)?;
        let dtype = match view.dtype() {
            Dtype::F32 => WeightDType::F32,
            Dtype::BF16 => WeightDType::Bf16,
            Dtype::F16 => WeightDType::F16,
            other => return Err(fail(format!("tensor {name} is {other:?}"))),
        };
        let values = view
            .data()
            .chunks_exact(dtype.size_bytes())
            .map(|b| dtype.decode(b))
            .collect();
        let slot = &mut halves.entry((layer, target)).or_default()[factor as usize];
        *slot = Some((view.shape().to_vec(), values));
    }
    let mut out = HashMap::new();
    for ((layer, target), [a, b]) in halves {
        let (Some((a_shape, a)), Some((b_shape, mut b))) = (a, b) else {
            return Err(fail(format!(
                "layer {layer}'s {} has only one of lora_A and lora_B",
                target.short_name()
            )));
        };
        let (rows, cols) = target.shape(config);
        let r = a_shape[0];
        if a_shape != [r, cols] || b_shape != [rows, r] || r == 0 {
            return Err(fail(format!(
                "layer {layer}'s {}: lora_A {a_shape:?} and lora_B {b_shape:?}, [r, {cols}] and \
                 [{rows}, r] expected",
                target.short_name()
            )));
        }
        let scale = adapter.scale(r);
        b.iter_mut().for_each(|v| *v *= scale);
        out.insert((layer, target), (r, a, b));
    }
    Ok(out)
}

/// The weight name of layer `layer`'s `target` projection in a model directory.
fn weight_name(layer: usize, target: Target) -> String {
    format!("model.layers.{layer}.{}.weight", target.module())
}

/// Writes the model in `model_dir` with the adapter in `adapter_dir` folded into its weights
/// into `out` (atomically). The model must be 16/32-bit safetensors (not FP8 or GGUF blocks).
pub fn merge_adapter(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    force: bool,
) -> Result<LoraSummary, LoraPrepError> {
    let config = ModelConfig::load(model_dir)?;
    let model_err = |reason: String| LoraPrepError::Model {
        path: model_dir.to_path_buf(),
        reason,
    };
    if config.quantization_config.is_some() {
        return Err(model_err(
            "a quantized model (`quantization_config` in config.json): merge into its 16/32-bit \
             original"
                .into(),
        ));
    }
    let factors = read_adapter(adapter_dir, &config)?;
    let by_weight: HashMap<String, &(usize, Vec<f32>, Vec<f32>)> = factors
        .iter()
        .map(|(&(layer, target), f)| (weight_name(layer, target), f))
        .collect();
    let maps = map_weight_files(model_dir)?;
    let tensors = sixteen_bit_tensors(&maps)?;
    if let Some(missing) = by_weight
        .keys()
        .find(|name| !tensors.iter().any(|t| &t.0 == *name))
    {
        return Err(model_err(format!(
            "the adapter changes {missing}, which the model's files do not hold"
        )));
    }
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, dtype, shape, _)| TensorSpec {
            name: name.clone(),
            dtype: (*dtype).into(),
            shape: shape.clone(),
        })
        .collect();
    let staged = StagedDir::new(out, force)?;
    let dir = staged.path().to_path_buf();
    copy_other_files(model_dir, &dir)?;
    std::fs::copy(model_dir.join(CONFIG_FILE), dir.join(CONFIG_FILE)).map_err(|e| {
        LoraPrepError::Model {
            path: model_dir.join(CONFIG_FILE),
            reason: e.to_string(),
        }
    })?;
    let bytes: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let mut writer = SafetensorsWriter::create(&dir.join(WEIGHTS_FILE), specs, &metadata)?;
    let bar = progress::bytes_bar(bytes, "merging the adapter");
    for (name, dtype, shape, data) in &tensors {
        match by_weight.get(name) {
            Some((r, a, b)) => {
                let cols = shape[1];
                let mut w: Vec<f32> = data
                    .chunks_exact(dtype.size_bytes())
                    .map(|x| dtype.decode(x))
                    .collect();
                w.par_chunks_mut(cols).enumerate().for_each(|(row, out)| {
                    let b_row = &b[row * r..(row + 1) * r];
                    for (k, &bk) in b_row.iter().enumerate() {
                        let a_row = &a[k * cols..(k + 1) * cols];
                        for (o, &av) in out.iter_mut().zip(a_row) {
                            *o += bk * av;
                        }
                    }
                });
                writer.write_tensor(name, &dtype.encode(&w))?;
            }
            None => writer.write_tensor(name, data)?,
        }
        bar.inc(data.len() as u64);
    }
    writer.finish()?;
    bar.finish_and_clear();
    let directory = staged.commit()?;
    Ok(LoraSummary {
        directory,
        modules: factors.len(),
        bytes,
    })
}
