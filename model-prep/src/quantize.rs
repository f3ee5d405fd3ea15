//! `model-prep quantize`: an FP8 copy of a 16/32-bit model directory.
//!
//! Every decoder projection (q/k/v/o, gate/up/down) is stored in FP8 e4m3 with an f32
//! `weight_scale` beside it: one per output row (the default: a row's largest magnitude maps
//! to 448, so a row of small weights keeps its precision) or one per tensor. Embeddings,
//! norms, biases and lm_head stay in the source's type, as in the FP8 checkpoints peers
//! publish. config.json gets a compressed-tensors `quantization_config` with dynamic per-token
//! activations, the form vLLM and SGLang load too. The tokenizer and the other files are
//! copied. This is round-to-nearest without calibration, as llm-compressor's FP8_DYNAMIC
//! scheme does: no data is needed.
//!
//! Projections the caller names ([`QuantizeOptions::keep`]: module names or globs) stay in the
//! source's type and are listed in the config's `ignore`, as llm-compressor's `ignore` keeps a
//! model's most sensitive layers in 16 bits. The workers fuse a layer's q/k/v, and its
//! gate/up, into one product of one type, so those are kept or quantized together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use tandem_model::quantization::{Fp8Scheme, WEIGHT_SCALE_SUFFIX, WeightScales};
use tandem_model::{
    CONFIG_FILE, F8E4M3_MAX, ModelConfig, SAFETENSORS_INDEX_FILE, WEIGHTS_FILE, WeightDType,
    tensor_names, write_json,
};

use crate::output::{OutputError, StagedDir};
use crate::progress;
use crate::safetensors_writer::{SafetensorsWriter, TensorSpec, WriteError};

/// What `quantize` wrote.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    pub directory: PathBuf,
    /// Projections stored in FP8.
    pub quantized: usize,
    /// Tensors copied as they were.
    pub kept: usize,
    pub source_bytes: u64,
    pub weight_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Config(#[from] tandem_model::ConfigError),
    #[error("{dir} is already quantized (`quantization_config` in its config.json)")]
    AlreadyQuantized { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("--keep {pattern}: {reason}")]
    Keep { pattern: String, reason: String },
}

/// How `quantize` writes the copy.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// One scale per output row, or per tensor.
    pub scales: WeightScales,
    /// Projections kept in the source's type: module names (`model.layers.0.mlp.down_proj`)
    /// or globs of them (`model.layers.*.mlp.down_proj`); each must match a projection.
    pub keep: Vec<String>,
    /// Replace a non-empty output directory.
    pub force: bool,
}

/// The projections (`<module>.weight` names) `patterns` keep, checked: every pattern matches
/// a projection, and a fused group (a layer's q/k/v, its gate/up) is kept whole or not at all.
fn kept_projections(
    projections: &[&str],
    patterns: &[String],
) -> Result<std::collections::BTreeSet<String>, QuantizeError> {
    let mut kept = std::collections::BTreeSet::new();
    for pattern in patterns {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .build()
            .map_err(|e| QuantizeError::Keep {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?
            .compile_matcher();
        let mut matched = false;
        for name in projections {
            if glob.is_match(strip_weight(name)) {
                matched = true;
                kept.insert(name.to_string());
            }
        }
        if !matched {
            return Err(QuantizeError::Keep {
                pattern: pattern.clone(),
                reason: format!(
                    "matches no projection (modules are named like {})",
                    projections
                        .first()
                        .map_or("model.layers.0.mlp.down_proj", |n| strip_weight(n))
                ),
            });
        }
    }
    for group in [
        ["q_proj", "k_proj", "v_proj"].as_slice(),
        &["gate_proj", "up_proj"],
    ] {
        for name in &kept {
            let module = strip_weight(name);
            let Some((layer, last)) = module.rsplit_once('.') else {
                continue;
            };
            if !group.contains(&last) {
                continue;
            }
            let missing: Vec<String> = group
                .iter()
                .map(|p| format!("{layer}.{p}.weight"))
                .filter(|n| projections.contains(&n.as_str()) && !kept.contains(n))
                .collect();
            if !missing.is_empty() {
                return Err(QuantizeError::Keep {
                    pattern: patterns.join(" --keep "),
                    reason: format!(
                        "keeps {module} but not {}: the workers multiply {} as one product, \
                         kept or quantized together",
                        missing
                            .iter()
                            .map(|n| strip_weight(n))
                            .collect::<Vec<_>>()
                            .join(", "),
                        group.join("/"),
                    ),
                });
            }
        }
    }
    Ok(kept)
}

/// Writes the FP8 copy of `source` into `out` (atomically), as `options` say.
pub fn quantize(
    source: &Path,
    out: &Path,
    options: &QuantizeOptions,
) -> Result<QuantizeSummary, QuantizeError> {
    let (scales, force) = (options.scales, options.force);
    let mut config = ModelConfig::load(source)?;
    if config.quantization_config.is_some() {
        return Err(QuantizeError::AlreadyQuantized {
            dir: source.to_path_buf(),
        });
    }
    let maps = map_weight_files(source)?;
    let tensors = sixteen_bit_tensors(&maps)?;
    let projections: Vec<&str> = tensors
        .iter()
        .filter(|(name, _, shape, _)| tensor_names::is_projection(name) && shape.len() == 2)
        .map(|(name, ..)| name.as_str())
        .collect();
    let kept_16 = kept_projections(&projections, &options.keep)?;
    let quantized_here = |name: &str, shape: &[usize]| {
        tensor_names::is_projection(name) && shape.len() == 2 && !kept_16.contains(name)
    };

    let mut specs = Vec::new();
    for (name, dtype, shape, _) in &tensors {
        if quantized_here(name, shape) {
            let scale_shape = match scales {
                WeightScales::PerTensor => vec![1],
                WeightScales::PerChannel => vec![shape[0], 1],
            };
            specs.push(TensorSpec {
                name: format!("{}{WEIGHT_SCALE_SUFFIX}", strip_weight(name)),
                dtype: WeightDType::F32.into(),
                shape: scale_shape,
            });
            specs.push(TensorSpec {
                name: name.clone(),
                dtype: WeightDType::F8E4M3.into(),
                shape: shape.clone(),
            });
        } else {
            specs.push(TensorSpec {
                name: name.clone(),
                dtype: (*dtype).into(),
                shape: shape.clone(),
            });
        }
    }
    let staged = StagedDir::new(out, force)?;
    let dir = staged.path().to_path_buf();
    copy_other_files(source, &dir)?;
    let mut ignored = vec![
        tensor_names::LM_HEAD
            .trim_end_matches(".weight")
            .to_string(),
    ];
    ignored.extend(kept_16.iter().map(|n| strip_weight(n).to_string()));
    config.quantization_config = Some(Fp8Scheme::compressed_tensors_config(scales, &ignored));
    write_json(&dir.join(CONFIG_FILE), &config)?;

    let source_bytes: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
    let weight_bytes: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let mut writer = SafetensorsWriter::create(&dir.join(WEIGHTS_FILE), specs, &metadata)?;
    let bar = progress::bytes_bar(source_bytes, "quantizing to fp8");
    let (mut quantized, mut kept) = (0, 0);
    // The writer takes tensors in name order: a projection's scale comes before it.
    for (name, dtype, shape, bytes) in &tensors {
        if quantized_here(name, shape) {
            let (fp8, row_scales) = quantize_matrix(*dtype, bytes, shape[0], shape[1], scales);
            let scale_bytes: Vec<u8> = row_scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            writer.write_tensor(
                &format!("{}{WEIGHT_SCALE_SUFFIX}", strip_weight(name)),
                &scale_bytes,
            )?;
            writer.write_tensor(name, &fp8)?;
            quantized += 1;
        } else {
            writer.write_tensor(name, bytes)?;
            kept += 1;
        }
        bar.inc(bytes.len() as u64);
    }
    writer.finish()?;
    bar.finish_and_clear();
    let directory = staged.commit()?;
    Ok(QuantizeSummary {
        directory,
        quantized,
        kept,
        source_bytes,
        weight_bytes,
    })
}

fn strip_weight(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// The FP8 bytes of a `[rows, cols]` matrix and its scales (one per row, or one): each scale
/// maps its largest magnitude to the largest FP8 value; an all-zero row gets scale 1.
pub fn quantize_matrix(
    dtype: WeightDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: WeightScales,
) -> (Vec<u8>, Vec<f32>) {
    let size = dtype.size_bytes();
    let values: Vec<f32> = bytes.chunks_exact(size).map(|b| dtype.decode(b)).collect();
    let amax = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale_of = |amax: f32| if amax > 0.0 { amax / F8E4M3_MAX } else { 1.0 };
    let row_scales: Vec<f32> = match scales {
        WeightScales::PerTensor => vec![scale_of(amax(&values))],
        WeightScales::PerChannel => values
            .par_chunks(cols)
            .map(|row| scale_of(amax(row)))
            .collect(),
    };
    let mut out = vec![0u8; rows * cols];
    out.par_chunks_mut(cols)
        .zip(values.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, row))| {
            let scale = row_scales[if row_scales.len() == 1 { 0 } else { r }];
            let scaled: Vec<f32> = row.iter().map(|v| v / scale).collect();
            WeightDType::F8E4M3.encode_into(&scaled, o);
        });
    (out, row_scales)
}

/// One tensor of a 16/32-bit model's files: name, type, shape and bytes.
pub(crate) type SourceTensor<'a> = (String, WeightDType, Vec<usize>, &'a [u8]);

/// Every tensor of the mapped files (F32, F16 or BF16, anything else an error naming it), in
/// name order.
pub(crate) fn sixteen_bit_tensors(
    maps: &[(PathBuf, Mmap)],
) -> Result<Vec<SourceTensor<'_>>, QuantizeError> {
    let mut tensors = Vec::new();
    for (path, map) in maps {
        let st = SafeTensors::deserialize(map).map_err(|e| QuantizeError::Weights {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => WeightDType::F32,
                Dtype::F16 => WeightDType::F16,
                Dtype::BF16 => WeightDType::Bf16,
                other => {
                    return Err(QuantizeError::Weights {
                        path: path.clone(),
                        reason: format!("tensor {name} is {other:?}; F32, F16 or BF16 expected"),
                    });
                }
            };
            tensors.push((name, dtype, view.shape().to_vec(), view.data()));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// The source's weight files, memory-mapped.
pub(crate) fn map_weight_files(source: &Path) -> Result<Vec<(PathBuf, Mmap)>, QuantizeError> {
    let mut paths = Vec::new();
    let index = source.join(SAFETENSORS_INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| QuantizeError::Io {
            path: index.clone(),
            source: e,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| QuantizeError::Weights {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let mut files: Vec<String> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        paths.extend(files.into_iter().map(|f| source.join(f)));
    } else {
        paths.push(source.join(WEIGHTS_FILE));
    }
    paths
        .into_iter()
        .map(|path| {
            let file = std::fs::File::open(&path).map_err(|e| QuantizeError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: the source directory is not modified while it is read.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| QuantizeError::Io {
                path: path.clone(),
                source: e,
            })?;
            Ok((path, map))
        })
        .collect()
}

/// Copies every file of `source` but its weights and config.json (tokenizer, generation
/// config, chat template, markers).
pub(crate) fn copy_other_files(source: &Path, out: &Path) -> Result<(), QuantizeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QuantizeError::Io { path, source }
    };
    for entry in std::fs::read_dir(source).map_err(io(source))? {
        let entry = entry.map_err(io(source))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let skip = name.ends_with(".safetensors")
            || name == SAFETENSORS_INDEX_FILE
            || name == CONFIG_FILE
            // model-prep's import marker describes the source's weights, not these.
            || name == "tandem-source.json";
        if skip || !entry.file_type().map_err(io(&entry.path()))?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&*name)).map_err(io(&entry.path()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_keep_small_rows_precise() {
        // Row 0 is 1000x smaller than row 1: its own scale keeps it at FP8's relative error.
        let values = [0.001f32, -0.002, 0.0005, 1.0, -2.0, 0.5];
        let bytes = WeightDType::F32.encode(&values);
        let (fp8, scales) =
            quantize_matrix(WeightDType::F32, &bytes, 2, 3, WeightScales::PerChannel);
        assert_eq!(scales.len(), 2);
        for (i, v) in values.iter().enumerate() {
            let back = WeightDType::F8E4M3.decode(&fp8[i..i + 1]) * scales[i / 3];
            assert!(
                (back - v).abs() <= v.abs() / 16.0,
                "{v} came back as {back}"
            );
        }
        let (_, one) = quantize_matrix(WeightDType::F32, &bytes, 2, 3, WeightScales::PerTensor);
        assert_eq!(one, vec![2.0 / F8E4M3_MAX]);
        let zeros = WeightDType::F32.encode(&[0.0; 3]);
        assert_eq!(
            quantize_matrix(WeightDType::F32, &zeros, 1, 3, WeightScales::PerChannel).1,
            vec![1.0]
        );
    }

    fn two_layers() -> Vec<String> {
        let mut names = Vec::new();
        for layer in 0..2 {
            for p in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ] {
                names.push(format!("model.layers.{layer}.{p}.weight"));
            }
            for p in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                names.push(format!("model.layers.{layer}.{p}.weight"));
            }
        }
        names
    }

    fn keep(patterns: &[&str]) -> Result<Vec<String>, QuantizeError> {
        let names = two_layers();
        let projections: Vec<&str> = names.iter().map(String::as_str).collect();
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        kept_projections(&projections, &patterns).map(|k| k.into_iter().collect())
    }

    #[test]
    fn kept_projections_by_name_and_glob() {
        assert_eq!(keep(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            keep(&["model.layers.1.mlp.down_proj"]).unwrap(),
            vec!["model.layers.1.mlp.down_proj.weight"]
        );
        assert_eq!(
            keep(&["model.layers.*.mlp.down_proj"]).unwrap(),
            vec![
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.mlp.down_proj.weight"
            ]
        );
        // A whole layer: every projection of it, fused groups whole.
        assert_eq!(keep(&["model.layers.0.*"]).unwrap().len(), 7);
        assert_eq!(
            keep(&["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn kept_projections_refuse_typos_and_split_groups() {
        let e = keep(&["model.layers.7.mlp.down_proj"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("matches no projection"), "{e}");
        let e = keep(&["model.layers.0.self_attn.q_proj"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj"),
            "{e}"
        );
        let e = keep(&["model.layers.*.mlp.up_proj"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gate_proj/up_proj"), "{e}");
        let e = keep(&["model.layers.[0"]).unwrap_err().to_string();
        assert!(e.starts_with("--keep model.layers.[0:"), "{e}");
    }
}
