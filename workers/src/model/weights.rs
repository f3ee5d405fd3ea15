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

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tandem_model::random_weights::{self, Encoding, GENERATOR_VERSION, RandomWeights};
use tandem_model::{
    ModelConfig, RANDOM_WEIGHTS_FILE, SAFETENSORS_INDEX_FILE, WEIGHTS_FILE, tensor_names,
};

use super::shard::OwnedTensor;
use crate::backend::{DType, HostTensor};

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
    #[error("tensor {name} has dtype {dtype}; supported: F32, F16, BF16")]
    DType { name: String, dtype: String },
    #[error("tensor {name} is not part of a {arch} model of this config (check config.json)")]
    Unexpected { name: String, arch: &'static str },
}

/// One tensor: borrowed from a memory-mapped file, or generated when it is loaded.
#[derive(Debug, Clone)]
pub struct TensorEntry<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: TensorBytes<'a>,
}

#[derive(Debug, Clone)]
enum TensorBytes<'a> {
    Mapped(&'a [u8]),
    /// [`random_weights::tensor_bytes`] of this name, seed and encoding.
    Generated {
        name: String,
        seed: u64,
        encoding: Encoding,
    },
}

/// A weight on its way to a backend: a view of the file's tensor, or bytes of its own (a
/// generated tensor, or a tensor-parallel rank's share, [`super::shard`]).
pub enum Piece<'a> {
    Whole(HostTensor<'a>),
    Owned(OwnedTensor),
}

impl Piece<'_> {
    pub fn view(&self) -> HostTensor<'_> {
        match self {
            Piece::Whole(t) => *t,
            Piece::Owned(t) => t.view(),
        }
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
            }),
            TensorBytes::Generated { .. } => {
                Piece::Owned(self.load_rows(0..self.shape.first().copied().unwrap_or(1)))
            }
        }
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
            WeightSource::Generated(spec) => {
                let dtype = match spec.dtype {
                    Encoding::F32 => DType::F32,
                    Encoding::F16 => DType::F16,
                    Encoding::Bf16 => DType::Bf16,
                };
                Ok(tensor_names::expected_tensors(config)
                    .into_iter()
                    .map(|(name, shape)| {
                        let bytes = TensorBytes::Generated {
                            name: name.clone(),
                            seed: spec.seed,
                            encoding: spec.dtype,
                        };
                        (
                            name,
                            TensorEntry {
                                dtype,
                                shape,
                                bytes,
                            },
                        )
                    })
                    .collect())
            }
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
        for (path, map) in &self.files {
            let st = SafeTensors::deserialize(map).map_err(|source| WeightsError::Format {
                path: path.clone(),
                source,
            })?;
            for (name, view) in st.iter() {
                let dtype = match view.dtype() {
                    Dtype::F32 => DType::F32,
                    Dtype::F16 => DType::F16,
                    Dtype::BF16 => DType::Bf16,
                    other => {
                        return Err(WeightsError::DType {
                            name: name.to_string(),
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                found.insert(
                    name.to_string(),
                    TensorEntry {
                        dtype,
                        shape: view.shape().to_vec(),
                        bytes: TensorBytes::Mapped(view.data()),
                    },
                );
            }
        }
        check(config, &mut found)?;
        Ok(found)
    }
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
}
