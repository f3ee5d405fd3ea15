//! A model directory's weights: its `*.safetensors`, memory-mapped, one file or a sharded
//! index, every tensor checked against the names and shapes the config implies
//! ([`tandem_model::tensor_names::expected_tensors`]) before anything is uploaded, so a
//! mismatched checkpoint fails at load with the tensor's name instead of computing garbage;
//! or, for a random-weight directory made with `model-prep random --generate-at-load`
//! ([`tandem_model::RANDOM_WEIGHTS_FILE`]), each tensor generated when it is uploaded, the same
//! bytes `model-prep random` would have written for that seed.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tandem_model::quantization::{self, ActivationScheme};
use tandem_model::random_weights::{self, GENERATOR_VERSION, RandomWeights};
use tandem_model::{
    ModelConfig, RANDOM_WEIGHTS_FILE, SAFETENSORS_INDEX_FILE, WEIGHTS_FILE, tensor_names,
};

use super::shard::OwnedTensor;
use crate::backend::{GgufQuant, GgufTensor, HostTensor, InputScale, QuantScales, WeightDType};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid safetensors: {source}")]
    Format {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: invalid index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error(
        "no weights in {dir}: expected {WEIGHTS_FILE}, {SAFETENSORS_INDEX_FILE} or \
         {RANDOM_WEIGHTS_FILE}"
    )]
    NoWeights { dir: PathBuf },
    #[error("{path}: {reason}")]
    Generated { path: PathBuf, reason: String },
    #[error("tensor {name} is missing (the config expects it with shape {shape:?})")]
    Missing { name: String, shape: Vec<usize> },
    #[error("tensor {name} has shape {found:?}, the config implies {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has dtype {dtype}; supported: F32, F16, BF16, and F8_E4M3 projections")]
    DType { name: String, dtype: String },
    #[error("FP8 tensor {name}: {reason}")]
    Quantized { name: String, reason: String },
    #[error("GGUF-quantized tensor {name}: {reason}")]
    Gguf { name: String, reason: String },
    #[error("tensor {name} is not part of a {arch} model of this config (check config.json)")]
    Unexpected { name: String, arch: &'static str },
}

/// One tensor: borrowed from a memory-mapped file, or generated when it is loaded.
#[derive(Debug, Clone)]
pub struct TensorEntry<'a> {
    /// The element type; for a GGUF block-quantized tensor (`gguf`), which has none, `F32`
    /// (what its values dequantize to).
    pub dtype: WeightDType,
    /// `[rows, cols]` in values (a GGUF tensor's file shape is `[rows, row bytes]`).
    pub shape: Vec<usize>,
    /// The GGUF block type of a tensor kept quantized ([`tandem_model::gguf_quant`]).
    pub gguf: Option<GgufQuant>,
    bytes: TensorBytes<'a>,
    /// An FP8 weight's scales (one, or one per row); empty otherwise.
    weight_scales: Vec<f32>,
    input_scale: InputScale,
}

impl<'a> TensorEntry<'a> {
    fn unscaled(dtype: WeightDType, shape: Vec<usize>, bytes: TensorBytes<'a>) -> Self {
        TensorEntry {
            dtype,
            shape,
            gguf: None,
            bytes,
            weight_scales: Vec::new(),
            input_scale: InputScale::PerToken,
        }
    }

    /// The tensor as GGUF blocks, if it is GGUF-quantized (always mapped from a file).
    pub fn gguf_view(&self) -> Option<GgufTensor<'_>> {
        match (&self.bytes, self.gguf, &self.shape[..]) {
            (TensorBytes::Mapped(bytes), Some(quant), &[rows, cols]) => Some(GgufTensor {
                quant,
                rows,
                cols,
                bytes,
            }),
            _ => None,
        }
    }

    fn scales(&self) -> QuantScales<'_> {
        QuantScales {
            weight: &self.weight_scales,
            input: self.input_scale,
        }
    }
}

#[derive(Debug, Clone)]
enum TensorBytes<'a> {
    Mapped(&'a [u8]),
    /// [`random_weights::tensor_bytes`] of this name, seed and encoding.
    Generated {
        name: String,
        seed: u64,
        encoding: WeightDType,
    },
}

/// A weight on its way to a backend: a view of the file's tensor, or bytes of its own (a
/// generated tensor, or a tensor-parallel rank's share, [`super::shard`]).
pub enum Piece<'a> {
    Whole(HostTensor<'a>),
    Owned(OwnedTensor),
    /// A generated tensor the ranks of a group take in turn ([`SharedGeneration`]).
    Shared(Arc<OwnedTensor>),
}

impl Piece<'_> {
    pub fn view(&self) -> HostTensor<'_> {
        match self {
            Piece::Whole(t) => *t,
            Piece::Owned(t) => t.view(),
            Piece::Shared(t) => t.view(),
        }
    }
}

/// The whole generated tensors of a tensor-parallel group whose ranks load at once: the first
/// rank to ask for one generates it, the others wait for it and take the same bytes, and it
/// is dropped once every rank has taken it. Each rank needs `o_proj`, `down`, the embedding,
/// lm_head and norms whole (or their columns), so without this every rank generated them
/// again: 26 of the 48 billion values a rank of the 70B shapes generates. The ranks take
/// tensors in the same order, so at most a few wait here at a time.
pub struct SharedGeneration {
    ranks: usize,
    slots: Mutex<HashMap<String, Slot>>,
    ready: Condvar,
}

enum Slot {
    Generating,
    Ready {
        tensor: Arc<OwnedTensor>,
        takers_left: usize,
    },
}

impl std::fmt::Debug for SharedGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedGeneration for {} ranks", self.ranks)
    }
}

impl SharedGeneration {
    pub fn new(ranks: usize) -> Arc<Self> {
        Arc::new(SharedGeneration {
            ranks,
            slots: Mutex::default(),
            ready: Condvar::new(),
        })
    }

    /// Tensor `name`: generated by `generate` here if no rank has started it, else the one
    /// another rank generates.
    pub fn take(&self, name: &str, generate: impl FnOnce() -> OwnedTensor) -> Arc<OwnedTensor> {
        let lock = || self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slots = lock();
        loop {
            match slots.get_mut(name) {
                None => break,
                Some(Slot::Generating) => {
                    slots = self
                        .ready
                        .wait(slots)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Some(Slot::Ready {
                    tensor,
                    takers_left,
                }) => {
                    let tensor = tensor.clone();
                    *takers_left -= 1;
                    if *takers_left == 0 {
                        slots.remove(name);
                    }
                    return tensor;
                }
            }
        }
        slots.insert(name.to_owned(), Slot::Generating);
        drop(slots);
        // Should `generate` unwind, the slot is freed so that a waiting rank generates it.
        struct Unclaim<'a>(&'a SharedGeneration, &'a str, bool);
        impl Drop for Unclaim<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    let mut slots = self.0.slots.lock().unwrap_or_else(PoisonError::into_inner);
                    slots.remove(self.1);
                    self.0.ready.notify_all();
                }
            }
        }
        let mut claim = Unclaim(self, name, false);
        let tensor = Arc::new(generate());
        claim.2 = true;
        let mut slots = lock();
        if self.ranks > 1 {
            slots.insert(
                name.to_owned(),
                Slot::Ready {
                    tensor: tensor.clone(),
                    takers_left: self.ranks - 1,
                },
            );
        } else {
            slots.remove(name);
        }
        self.ready.notify_all();
        tensor
    }

    /// Tensors generated and not yet taken by every rank.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl TensorEntry<'_> {
    /// The tensor's bytes: a view of the mapped file, or generated now.
    pub fn load(&self) -> Piece<'_> {
        match &self.bytes {
            TensorBytes::Mapped(bytes) => Piece::Whole(HostTensor {
                dtype: self.dtype,
                shape: &self.shape,
                bytes,
                scales: self.scales(),
            }),
            TensorBytes::Generated { .. } => Piece::Owned(self.load_rows(self.all_rows())),
        }
    }

    /// Every row of the tensor (every element of a vector), for [`Self::load_rows`].
    pub fn all_rows(&self) -> std::ops::Range<usize> {
        0..self.shape.first().copied().unwrap_or(1)
    }

    /// Whether the tensor's bytes are generated rather than read from a file.
    pub fn is_generated(&self) -> bool {
        matches!(self.bytes, TensorBytes::Generated { .. })
    }

    /// Rows `range` of the tensor (its first dimension), as [`super::shard::rows`] cuts them
    /// from [`Self::load`]; a generated tensor generates only those rows.
    pub fn load_rows(&self, range: std::ops::Range<usize>) -> OwnedTensor {
        match &self.bytes {
            TensorBytes::Mapped(_) => super::shard::rows(&self.load().view(), range),
            TensorBytes::Generated {
                name,
                seed,
                encoding,
            } => {
                let init = random_weights::Init::for_tensor(name);
                let row: usize = self.shape.iter().skip(1).product();
                let elements = self.shape.iter().product();
                let mut shape = self.shape.clone();
                if let Some(rows) = shape.first_mut() {
                    *rows = range.len();
                }
                OwnedTensor {
                    dtype: self.dtype,
                    shape,
                    bytes: random_weights::tensor_bytes_range(
                        *seed,
                        name,
                        init,
                        *encoding,
                        elements,
                        range.start * row..range.end * row,
                    ),
                    // Generated FP8 weights have one scale for the tensor.
                    weight_scales: self.weight_scales.clone(),
                    input_scale: self.input_scale,
                }
            }
        }
    }
}

/// Where a model directory's weights come from.
pub enum WeightSource {
    Files(WeightFiles),
    /// A random-weight directory without weight files ([`RANDOM_WEIGHTS_FILE`]).
    Generated(RandomWeights),
}

impl WeightSource {
    /// The directory's safetensors ([`WeightFiles::open`]) where it has any, else its
    /// [`RANDOM_WEIGHTS_FILE`].
    pub fn open(model_dir: &Path) -> Result<Self, WeightsError> {
        match WeightFiles::open(model_dir) {
            Err(WeightsError::NoWeights { .. }) if model_dir.join(RANDOM_WEIGHTS_FILE).exists() => {
                let path = model_dir.join(RANDOM_WEIGHTS_FILE);
                let spec: RandomWeights =
                    tandem_model::read_json(&path).map_err(|e| WeightsError::Generated {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if spec.generator != GENERATOR_VERSION {
                    return Err(WeightsError::Generated {
                        path,
                        reason: format!(
                            "written for weight generator {}, this worker has {GENERATOR_VERSION}: \
                             make the directory again with this release's model-prep",
                            spec.generator
                        ),
                    });
                }
                Ok(WeightSource::Generated(spec))
            }
            files => files.map(WeightSource::Files),
        }
    }

    /// Every tensor, checked against `config` (generated ones have its shapes by definition).
    pub fn tensors(
        &self,
        config: &ModelConfig,
    ) -> Result<HashMap<String, TensorEntry<'_>>, WeightsError> {
        match self {
            WeightSource::Files(files) => files.tensors(config),
            WeightSource::Generated(spec) => Ok(tensor_names::expected_tensors(config)
                .into_iter()
                .map(|(name, shape)| {
                    let dtype = random_weights::tensor_dtype(&name, spec.dtype);
                    let bytes = TensorBytes::Generated {
                        name: name.clone(),
                        seed: spec.seed,
                        encoding: dtype,
                    };
                    let mut entry = TensorEntry::unscaled(dtype, shape, bytes);
                    if dtype == WeightDType::F8E4M3 {
                        entry.weight_scales = vec![random_weights::FP8_SCALE];
                    }
                    (name, entry)
                })
                .collect()),
        }
    }
}

/// The memory-mapped weight files of a model directory.
pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl WeightFiles {
    /// Maps `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(model_dir: &Path) -> Result<Self, WeightsError> {
        let index_path = model_dir.join(SAFETENSORS_INDEX_FILE);
        let single = model_dir.join(WEIGHTS_FILE);
        let paths = if index_path.exists() {
            shard_paths(model_dir, &index_path)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(WeightsError::NoWeights {
                dir: model_dir.to_path_buf(),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the model directory is not modified while a worker runs; a concurrent
            // writer could change the mapped bytes, which the format checks below would not see.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            files.push((path, map));
        }
        Ok(WeightFiles { files })
    }

    /// All tensors of all files, checked against `config`.
    pub fn tensors(
        &self,
        config: &ModelConfig,
    ) -> Result<HashMap<String, TensorEntry<'_>>, WeightsError> {
        let mut found = HashMap::new();
        let mut scales: HashMap<String, Vec<f32>> = HashMap::new();
        let mut gguf_types = config.gguf_quant().unwrap_or_default().tensor_types;
        let gguf_err = |name: &str, reason: String| WeightsError::Gguf {
            name: name.to_string(),
            reason,
        };
        for (path, map) in &self.files {
            let st = SafeTensors::deserialize(map).map_err(|source| WeightsError::Format {
                path: path.clone(),
                source,
            })?;
            for (name, view) in st.iter() {
                if view.dtype() == Dtype::U8 {
                    let quant = gguf_types.remove(name).ok_or_else(|| {
                        gguf_err(
                            name,
                            "a U8 tensor that config.json's `quantization_config.tensor_types` \
                             does not list"
                                .into(),
                        )
                    })?;
                    let &[rows, row_bytes] = view.shape() else {
                        return Err(gguf_err(
                            name,
                            format!("file shape {:?} is not [rows, row bytes]", view.shape()),
                        ));
                    };
                    let cols = quant.row_elems(row_bytes).ok_or_else(|| {
                        gguf_err(
                            name,
                            format!(
                                "{row_bytes} bytes a row is not a whole number of {quant} blocks"
                            ),
                        )
                    })?;
                    let mut entry = TensorEntry::unscaled(
                        WeightDType::F32,
                        vec![rows, cols],
                        TensorBytes::Mapped(view.data()),
                    );
                    entry.gguf = Some(quant);
                    found.insert(name.to_string(), entry);
                    continue;
                }
                let dtype = match view.dtype() {
                    Dtype::F32 => WeightDType::F32,
                    Dtype::F16 => WeightDType::F16,
                    Dtype::BF16 => WeightDType::Bf16,
                    Dtype::F8_E4M3 => WeightDType::F8E4M3,
                    other => {
                        return Err(WeightsError::DType {
                            name: name.to_string(),
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                if quantization::scaled_weight(name).is_some()
                    || quantization::is_kv_cache_scale(name)
                {
                    let values = scale_values(name, dtype, view.data())?;
                    scales.insert(name.to_string(), values);
                    continue;
                }
                found.insert(
                    name.to_string(),
                    TensorEntry::unscaled(
                        dtype,
                        view.shape().to_vec(),
                        TensorBytes::Mapped(view.data()),
                    ),
                );
            }
        }
        if let Some(name) = gguf_types.keys().next() {
            return Err(gguf_err(
                name,
                "listed in `quantization_config.tensor_types` but not a U8 tensor of the \
                 checkpoint"
                    .into(),
            ));
        }
        if let Some(base) = tensor_names::EMBED_TOKENS.strip_prefix(tensor_names::MODEL_PREFIX)
            && !found.contains_key(tensor_names::EMBED_TOKENS)
            && found.contains_key(base)
        {
            // A base model's checkpoint (a `Qwen3Model` rather than a `Qwen3ForCausalLM`, as
            // embedding models are saved) names its tensors without the causal LM's prefix.
            found = with_model_prefix(found);
            scales = with_model_prefix(scales);
        }
        attach_scales(config, &mut found, scales)?;
        check(config, &mut found)?;
        Ok(found)
    }
}

/// `map`'s names given the causal LM's `model.` prefix (an lm_head, where a base model's
/// checkpoint keeps one, has none either way).
fn with_model_prefix<V>(map: HashMap<String, V>) -> HashMap<String, V> {
    map.into_iter()
        .map(|(name, v)| {
            if name.starts_with("lm_head.") {
                (name, v)
            } else {
                (format!("{}{name}", tensor_names::MODEL_PREFIX), v)
            }
        })
        .collect()
}

/// A scale tensor's values as f32 (checkpoints store them in f32, sometimes bf16).
fn scale_values(name: &str, dtype: WeightDType, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
    if dtype == WeightDType::F8E4M3 {
        return Err(WeightsError::DType {
            name: name.to_string(),
            dtype: "F8_E4M3 (a scale must be f32, f16 or bf16)".into(),
        });
    }
    Ok(bytes
        .chunks_exact(dtype.size_bytes())
        .map(|b| dtype.decode(b))
        .collect())
}

/// Gives each FP8 weight its scales and checks the checkpoint is one the workers run: FP8
/// tensors only for projections, each with its `weight_scale` (one, or one per row), a config
/// that declares the scheme, and static activation scales where the scheme says so. KV cache
/// scales are for an FP8 KV cache, which reads them itself.
fn attach_scales(
    config: &ModelConfig,
    found: &mut HashMap<String, TensorEntry<'_>>,
    mut scales: HashMap<String, Vec<f32>>,
) -> Result<(), WeightsError> {
    let scheme = config.fp8_scheme();
    let bad = |name: &str, reason: String| WeightsError::Quantized {
        name: name.to_string(),
        reason,
    };
    for (name, entry) in found.iter_mut() {
        if entry.dtype != WeightDType::F8E4M3 {
            continue;
        }
        let Some(scheme) = &scheme else {
            return Err(bad(
                name,
                "config.json has no `quantization_config` describing the checkpoint's FP8 \
                 scheme"
                    .into(),
            ));
        };
        if !tensor_names::is_projection(name) || entry.shape.len() != 2 {
            return Err(bad(
                name,
                "only the decoder layers' projections may be FP8 (embeddings, norms and \
                 lm_head must be 16 or 32-bit)"
                    .into(),
            ));
        }
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let weight_scale = scales
            .remove(&format!("{module}{}", quantization::WEIGHT_SCALE_SUFFIX))
            .ok_or_else(|| bad(name, "its `weight_scale` is missing".into()))?;
        let rows = entry.shape[0];
        if weight_scale.len() != 1 && weight_scale.len() != rows {
            return Err(bad(
                name,
                format!(
                    "{} weight scales for {rows} rows (one per tensor or one per row are \
                     supported)",
                    weight_scale.len()
                ),
            ));
        }
        if let Some(s) = weight_scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(bad(
                name,
                format!("weight scale {s} is not a positive number"),
            ));
        }
        entry.weight_scales = weight_scale;
        let input = scales.remove(&format!("{module}{}", quantization::INPUT_SCALE_SUFFIX));
        entry.input_scale = match (scheme.activations, input) {
            (ActivationScheme::StaticPerTensor, Some(values)) => match values[..] {
                [s] if s.is_finite() && s > 0.0 => InputScale::Static(s),
                _ => {
                    return Err(bad(
                        name,
                        format!("`input_scale` must be one positive number, not {values:?}"),
                    ));
                }
            },
            (ActivationScheme::StaticPerTensor, None) => {
                return Err(bad(
                    name,
                    format!(
                        "the {} scheme has static activation scales and its `input_scale` is \
                         missing",
                        scheme.method
                    ),
                ));
            }
            // A dynamic scheme computes its scales; a stray static one is not used.
            (ActivationScheme::DynamicPerToken, _) => InputScale::PerToken,
            (ActivationScheme::None, _) => InputScale::Unquantized,
        };
    }
    for name in scales.keys() {
        if quantization::is_kv_cache_scale(name) {
            tracing::debug!(tensor = %name, "KV cache scale: read by an FP8 KV cache only");
            continue;
        }
        return Err(bad(
            name,
            "a scale of a weight that is not FP8 (or not in this checkpoint)".into(),
        ));
    }
    Ok(())
}

/// The distinct shard files of an index, in a stable order.
fn shard_paths(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let text = std::fs::read_to_string(index_path).map_err(io_err(index_path))?;
    let bad = |reason: String| WeightsError::Index {
        path: index_path.to_path_buf(),
        reason,
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("{tensor}: file name is not a string")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "{tensor}: shard {file:?} is outside the directory"
            )));
        }
        shards.insert(file.to_string(), ());
    }
    Ok(shards.into_keys().map(|f| dir.join(f)).collect())
}

/// Every expected tensor present with its shape; nothing unexpected except what Hugging Face
/// itself ignores (a tied model's `lm_head.weight`, rotary caches).
fn check(
    config: &ModelConfig,
    found: &mut HashMap<String, TensorEntry<'_>>,
) -> Result<(), WeightsError> {
    let expected = tensor_names::expected_tensors(config);
    for (name, shape) in &expected {
        let entry = found.get(name).ok_or_else(|| WeightsError::Missing {
            name: name.clone(),
            shape: shape.clone(),
        })?;
        if &entry.shape != shape {
            return Err(WeightsError::Shape {
                name: name.clone(),
                expected: shape.clone(),
                found: entry.shape.clone(),
            });
        }
    }
    let expected_names: std::collections::HashSet<&str> =
        expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut ignored = Vec::new();
    for name in found.keys() {
        if expected_names.contains(name.as_str()) {
            continue;
        }
        if (name == tensor_names::LM_HEAD && config.tie_word_embeddings)
            || name.ends_with("rotary_emb.inv_freq")
        {
            ignored.push(name.clone());
            continue;
        }
        return Err(WeightsError::Unexpected {
            name: name.clone(),
            arch: config.architecture().hf_class(),
        });
    }
    for name in ignored {
        tracing::debug!(tensor = %name, "ignoring tensor the model does not use");
        found.remove(&name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn config() -> ModelConfig {
        ModelConfig::llama(8, 16, 1, 2, 1, 10)
    }

    fn owned(value: u8) -> OwnedTensor {
        OwnedTensor::new(WeightDType::Bf16, vec![2], vec![value; 4])
    }

    #[test]
    fn ranks_sharing_generation_generate_each_tensor_once_and_all_take_it() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let share = SharedGeneration::new(3);
        let generated = AtomicUsize::new(0);
        let names: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
        let taken: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(|| {
                        names
                            .iter()
                            .enumerate()
                            .map(|(i, name)| {
                                let t = share.take(name, || {
                                    generated.fetch_add(1, Ordering::SeqCst);
                                    std::thread::sleep(std::time::Duration::from_micros(50));
                                    owned(i as u8)
                                });
                                t.bytes[0]
                            })
                            .collect::<Vec<u8>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(generated.load(Ordering::SeqCst), 50);
        let expected: Vec<u8> = (0..50).collect();
        assert!(taken.iter().all(|t| *t == expected));
        // Taken by every rank: nothing is held any more.
        assert_eq!(share.held(), 0);
    }

    #[test]
    fn a_generation_that_panics_leaves_the_tensor_to_the_next_rank() {
        let share = SharedGeneration::new(2);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            share.take("w", || panic!("out of memory"))
        }));
        assert!(panicked.is_err());
        assert_eq!(share.held(), 0);
        assert_eq!(share.take("w", || owned(7)).bytes, vec![7; 4]);
        assert_eq!(share.held(), 1, "one rank has still to take it");
        assert_eq!(share.take("w", || unreachable!()).bytes, vec![7; 4]);
        assert_eq!(share.held(), 0);
    }

    /// A scratch directory unique to this test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tandem-weights-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes `tensors` (f32 zeros of the given shapes) into `dir/file`.
    fn write(dir: &Path, file: &str, tensors: &[(String, Vec<usize>)]) {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape)| vec![0u8; shape.iter().product::<usize>() * 4])
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                (
                    name.clone(),
                    TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }

    #[test]
    fn gguf_blocks_load_where_the_config_names_their_type() {
        let mut config = ModelConfig::llama(32, 64, 1, 2, 1, 10);
        let q = tensor_names::layer(0).q_proj;
        let write_with = |dir: &Path, u8_tensor: &str| {
            let expected = tensor_names::expected_tensors(&config);
            let f32_bytes: Vec<Vec<u8>> = expected
                .iter()
                .map(|(_, shape)| vec![0u8; shape.iter().product::<usize>() * 4])
                .collect();
            let blocks = vec![0u8; 32 * 34];
            let views: Vec<(String, TensorView<'_>)> = expected
                .iter()
                .zip(&f32_bytes)
                .map(|((name, shape), bytes)| {
                    let view = if name == u8_tensor {
                        TensorView::new(Dtype::U8, vec![32, 34], &blocks).unwrap()
                    } else {
                        TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()
                    };
                    (name.clone(), view)
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
        };
        let dir = scratch("gguf");
        write_with(&dir, &q);
        // Not named in the config: refused by name.
        let files = WeightFiles::open(&dir).unwrap();
        let err = files.tensors(&config).unwrap_err().to_string();
        assert!(err.contains(&q) && err.contains("does not list"), "{err}");
        // Named: a [rows, cols] tensor of Q8_0 blocks.
        let mut types = tandem_model::GgufQuantConfig::default();
        types.tensor_types.insert(q.clone(), GgufQuant::Q8_0);
        config.quantization_config = Some(types.to_config());
        let tensors = files.tensors(&config).unwrap();
        let entry = &tensors[&q];
        assert_eq!(entry.shape, [32, 32]);
        let view = entry.gguf_view().unwrap();
        assert_eq!(
            (view.quant, view.rows, view.cols),
            (GgufQuant::Q8_0, 32, 32)
        );
        // Named but absent as blocks: refused.
        types
            .tensor_types
            .insert(tensor_names::layer(0).k_proj, GgufQuant::Q4_1);
        config.quantization_config = Some(types.to_config());
        let err = files.tensors(&config).unwrap_err().to_string();
        assert!(
            err.contains("k_proj") && err.contains("not a U8 tensor"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_base_model_s_tensors_are_read_under_the_causal_lm_s_names() {
        let dir = scratch("base-model");
        let expected = tensor_names::expected_tensors(&config());
        let unprefixed: Vec<(String, Vec<usize>)> = expected
            .iter()
            .map(|(name, shape)| {
                let name = name
                    .strip_prefix(tensor_names::MODEL_PREFIX)
                    .unwrap_or(name);
                (name.to_string(), shape.clone())
            })
            .collect();
        assert_ne!(unprefixed, expected, "the names lose their prefix");
        write(&dir, WEIGHTS_FILE, &unprefixed);
        let files = WeightFiles::open(&dir).unwrap();
        let tensors = files.tensors(&config()).unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut wanted: Vec<&String> = expected.iter().map(|(n, _)| n).collect();
        wanted.sort();
        assert_eq!(names, wanted);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loads_a_sharded_checkpoint_through_its_index() {
        let dir = scratch("sharded");
        let expected = tensor_names::expected_tensors(&config());
        let (a, b) = expected.split_at(expected.len() / 2);
        write(&dir, "model-00001-of-00002.safetensors", a);
        write(&dir, "model-00002-of-00002.safetensors", b);
        let map: serde_json::Map<String, serde_json::Value> = a
            .iter()
            .map(|(n, _)| (n.clone(), "model-00001-of-00002.safetensors".into()))
            .chain(
                b.iter()
                    .map(|(n, _)| (n.clone(), "model-00002-of-00002.safetensors".into())),
            )
            .collect();
        std::fs::write(
            dir.join(SAFETENSORS_INDEX_FILE),
            serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
        )
        .unwrap();
        let files = WeightFiles::open(&dir).unwrap();
        let tensors = files.tensors(&config()).unwrap();
        assert_eq!(tensors.len(), expected.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_the_missing_misshapen_or_unexpected_tensor() {
        let dir = scratch("checks");
        let mut tensors = tensor_names::expected_tensors(&config());
        let dropped = tensors.remove(3);
        write(&dir, WEIGHTS_FILE, &tensors);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config())
            .err()
            .unwrap();
        assert!(
            matches!(&err, WeightsError::Missing { name, .. } if *name == dropped.0),
            "{err}"
        );

        tensors.insert(3, (dropped.0.clone(), vec![1, 1]));
        write(&dir, WEIGHTS_FILE, &tensors);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config())
            .err()
            .unwrap();
        assert!(
            matches!(&err, WeightsError::Shape { name, .. } if *name == dropped.0),
            "{err}"
        );

        tensors[3].1 = dropped.1.clone();
        tensors.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![8]));
        write(&dir, WEIGHTS_FILE, &tensors);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config())
            .err()
            .unwrap();
        assert!(matches!(&err, WeightsError::Unexpected { .. }), "{err}");

        std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
        assert!(matches!(
            WeightFiles::open(&dir),
            Err(WeightsError::NoWeights { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes the tiny config's tensors with the projections in FP8 (per-row scales), plus
    /// `extra` tensors, and a config with `quantization`.
    fn write_fp8(
        dir: &Path,
        quantization: Option<serde_json::Value>,
        drop_scale: bool,
        extra: &[(&str, Vec<usize>, Dtype)],
    ) -> ModelConfig {
        let mut config = config();
        config.quantization_config = quantization;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, shape) in tensor_names::expected_tensors(&config) {
            let elements: usize = shape.iter().product();
            if tensor_names::is_projection(&name) {
                let scale = name.replace(".weight", ".weight_scale");
                if !(drop_scale && name.contains("layers.0.self_attn.q_proj")) {
                    let rows = shape[0];
                    owned.push((
                        scale,
                        Dtype::F32,
                        vec![rows, 1],
                        [0.5f32]
                            .repeat(rows)
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    ));
                }
                owned.push((name, Dtype::F8_E4M3, shape, vec![0x38; elements]));
            } else {
                owned.push((name, Dtype::F32, shape, vec![0; elements * 4]));
            }
        }
        for (name, shape, dtype) in extra {
            let bytes = vec![
                0x3f;
                shape.iter().product::<usize>().max(1)
                    * if *dtype == Dtype::F32 { 4 } else { 1 }
            ];
            owned.push((name.to_string(), *dtype, shape.clone(), bytes));
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
        config
    }

    fn compressed_tensors() -> Option<serde_json::Value> {
        Some(
            tandem_model::quantization::Fp8Scheme::compressed_tensors_config(
                tandem_model::quantization::WeightScales::PerChannel,
                &["lm_head".to_string()],
            ),
        )
    }

    #[test]
    fn fp8_weights_get_their_scales_and_bad_checkpoints_are_named() {
        let dir = scratch("fp8");
        let config = write_fp8(
            &dir,
            compressed_tensors(),
            false,
            &[(
                "model.layers.1.self_attn.k_proj.k_scale",
                vec![],
                Dtype::F32,
            )],
        );
        let files = WeightFiles::open(&dir).unwrap();
        let tensors = files.tensors(&config).unwrap();
        let q = &tensors["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(q.dtype, WeightDType::F8E4M3);
        let piece = q.load();
        let view = piece.view();
        assert_eq!(view.scales.weight.len(), q.shape[0]);
        assert_eq!(view.row_scale(3), 0.5);
        assert_eq!(view.scales.input, InputScale::PerToken);
        // 0x38 is 1.0: each weight is 0.5.
        assert!(!tensors.contains_key("model.layers.1.self_attn.k_proj.k_scale"));

        // No quantization_config: the FP8 tensors are refused by name.
        let config = write_fp8(&dir, None, false, &[]);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config)
            .err()
            .unwrap();
        assert!(err.to_string().contains("quantization_config"), "{err}");

        // A missing weight_scale.
        let config = write_fp8(&dir, compressed_tensors(), true, &[]);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("q_proj.weight") && err.to_string().contains("weight_scale"),
            "{err}"
        );

        // Static activations need every input_scale.
        let mut modelopt = serde_json::json!({"quant_method": "modelopt", "quant_algo": "FP8"});
        let config = write_fp8(&dir, Some(modelopt.clone()), false, &[]);
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config)
            .err()
            .unwrap();
        assert!(err.to_string().contains("input_scale"), "{err}");
        modelopt["exclude_modules"] = serde_json::json!(["lm_head"]);
        let names: Vec<String> = tensor_names::expected_tensors(&config)
            .into_iter()
            .filter(|(n, _)| tensor_names::is_projection(n))
            .map(|(n, _)| n.replace(".weight", ".input_scale"))
            .collect();
        let extra: Vec<(&str, Vec<usize>, Dtype)> = names
            .iter()
            .map(|n| (n.as_str(), vec![], Dtype::F32))
            .collect();
        let config = write_fp8(&dir, Some(modelopt), false, &extra);
        let files = WeightFiles::open(&dir).unwrap();
        let tensors = files.tensors(&config).unwrap();
        let input = tensors["model.layers.0.mlp.down_proj.weight"]
            .load()
            .view()
            .scales
            .input;
        assert!(
            matches!(input, InputScale::Static(s) if s > 0.0),
            "{input:?}"
        );

        // A scale of no FP8 weight.
        let config = write_fp8(
            &dir,
            compressed_tensors(),
            false,
            &[("model.norm.weight_scale", vec![1], Dtype::F32)],
        );
        let err = WeightFiles::open(&dir)
            .unwrap()
            .tensors(&config)
            .err()
            .unwrap();
        assert!(err.to_string().contains("model.norm.weight_scale"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
