//! `model-prep import-gguf`: a GGUF file -> a Hugging Face style model directory.
//!
//! Everything that can be checked without converting weights is checked first (the file's
//! structure, tokenizer metadata, architecture and config, tensor names and shapes, tensor
//! types, the output directory, the tokenizer rebuild), so bad input fails in well under a
//! second and before anything is written. Tensors are then converted one at a time (peak
//! memory is one tensor in f32 plus its encoding) into a [`StagedDir`], which is renamed into
//! place only after every file is complete.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tandem_model::{
    CONFIG_FILE, ConfigError, GENERATION_CONFIG_FILE, GenerationConfig, ModelConfig, TokenIds,
    WEIGHTS_FILE, write_json,
};

use crate::gguf::names::unpermute_rows;
use crate::gguf::{
    ConfigFromGgufError, DequantError, GgmlType, GgufError, GgufFile, NameError, dequantize,
    model_config, plan_tensors, vocab,
};
use crate::gguf_tokenizer::{TokenizerBuildError, build_tokenizer};
use crate::output::{OutputError, StagedDir};
use crate::progress::bytes_bar;
use crate::safetensors_writer::{SafetensorsWriter, StoredDType, TensorSpec, WriteError};
use tandem_model::{GgufQuant, GgufQuantConfig, WeightDType};

/// How to import.
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    /// The dtype of the written weights; `F32` keeps the dequantized values exactly.
    pub dtype: WeightDType,
    /// Replace a non-empty output directory.
    pub force: bool,
    /// Keep matrices of the GGUF types the CPU backend multiplies quantized (Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) as their GGUF blocks
    /// ([`tandem_model::gguf_quant`]); other tensors (norms, other types) are dequantized into
    /// `dtype` as usual.
    pub keep_quant: bool,
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub output: PathBuf,
    pub config: ModelConfig,
    pub tensor_count: usize,
    pub parameter_count: u64,
    /// Size of `model.safetensors`'s tensor data.
    pub weights_bytes: u64,
    /// GGUF tensor types converted, with how many tensors had each.
    pub source_types: BTreeMap<String, usize>,
    /// With `keep_quant`: the quantized types of matrices dequantized all the same (types
    /// the workers do not multiply as blocks), with how many matrices had each.
    pub dequantized_quant_types: BTreeMap<String, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {source}")]
    Metadata {
        path: PathBuf,
        source: ConfigFromGgufError,
    },
    #[error("{path}: {source}")]
    Tensors { path: PathBuf, source: NameError },
    #[error("{path}: {source}")]
    Dequant { path: PathBuf, source: DequantError },
    #[error("{path}: cannot rebuild the tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerBuildError,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Imports `gguf` into the model directory `out` (see the module doc for the guarantees).
pub fn import_gguf(
    gguf: &Path,
    out: &Path,
    options: &ImportOptions,
) -> Result<ImportSummary, ImportError> {
    let file = GgufFile::open(gguf)?;
    let path = || gguf.to_path_buf();
    let metadata_error = |source| ImportError::Metadata {
        path: path(),
        source,
    };
    let vocab = vocab(&file).map_err(metadata_error)?;
    let mut config = model_config(&file).map_err(metadata_error)?;
    config.torch_dtype = Some(options.dtype.torch_name().to_string());
    let plans = plan_tensors(file.tensors(), &config).map_err(|source| ImportError::Tensors {
        path: path(),
        source,
    })?;
    let mut source_types = BTreeMap::new();
    for plan in &plans {
        let info = &file.tensors()[plan.gguf_index];
        if !info.ggml_type.is_supported() {
            return Err(ImportError::Dequant {
                path: path(),
                source: DequantError::Unsupported {
                    tensor: info.name.clone(),
                    ggml_type: info.ggml_type,
                },
            });
        }
        *source_types.entry(info.ggml_type.name()).or_insert(0) += 1;
    }

    // The tensors kept as GGUF blocks: matrices of a type the workers multiply quantized,
    // whose rows are whole blocks.
    let kept: Vec<Option<GgufQuant>> = plans
        .iter()
        .map(|plan| {
            let info = &file.tensors()[plan.gguf_index];
            let quant = GgufQuant::ALL
                .into_iter()
                .find(|q| q.ggml_id() == info.ggml_type.0)?;
            let keep = options.keep_quant
                && plan.shape.len() == 2
                && quant.row_bytes(plan.shape[1]).is_some();
            keep.then_some(quant)
        })
        .collect();
    let mut dequantized_quant_types = BTreeMap::new();
    if options.keep_quant {
        for (plan, quant) in plans.iter().zip(&kept) {
            let ggml_type = file.tensors()[plan.gguf_index].ggml_type;
            let quantized = ![GgmlType::F32, GgmlType::F16, GgmlType::BF16].contains(&ggml_type);
            if quant.is_none() && quantized && plan.shape.len() == 2 {
                *dequantized_quant_types.entry(ggml_type.name()).or_insert(0) += 1;
            }
        }
    }
    if kept.iter().any(Option::is_some) {
        let mut gguf = GgufQuantConfig::default();
        for (plan, quant) in plans.iter().zip(&kept) {
            if let Some(quant) = quant {
                gguf.tensor_types.insert(plan.hf_name.clone(), *quant);
            }
        }
        config.quantization_config = Some(gguf.to_config());
    }

    let staged = StagedDir::new(out, options.force)?;
    let tokenizer = build_tokenizer(&vocab).map_err(|source| ImportError::Tokenizer {
        path: path(),
        source,
    })?;

    let specs: Vec<TensorSpec> = plans
        .iter()
        .zip(&kept)
        .map(|(plan, quant)| match quant {
            Some(quant) => TensorSpec {
                name: plan.hf_name.clone(),
                dtype: StoredDType::U8,
                shape: vec![
                    plan.shape[0],
                    quant.row_bytes(plan.shape[1]).expect("kept: whole blocks"),
                ],
            },
            None => TensorSpec {
                name: plan.hf_name.clone(),
                dtype: options.dtype.into(),
                shape: plan.shape.clone(),
            },
        })
        .collect();
    let weights_bytes = specs.iter().map(|s| s.byte_len() as u64).sum();
    let parameter_count = plans
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    let mut st_metadata = BTreeMap::new();
    st_metadata.insert("format".to_string(), "pt".to_string());
    st_metadata.insert(
        "source".to_string(),
        gguf.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut writer =
        SafetensorsWriter::create(&staged.path().join(WEIGHTS_FILE), specs, &st_metadata)?;

    let total_bytes = plans
        .iter()
        .map(|p| file.tensors()[p.gguf_index].n_bytes)
        .sum();
    let bar = bytes_bar(total_bytes, "converting tensors");
    for (plan, quant) in plans.iter().zip(&kept) {
        let info = &file.tensors()[plan.gguf_index];
        if quant.is_some() {
            let mut bytes = file.tensor_data(info).to_vec();
            if let Some(heads) = plan.unpermute_heads {
                bytes =
                    unpermute_rows(&info.name, &bytes, plan.shape[0], heads).map_err(|source| {
                        ImportError::Tensors {
                            path: path(),
                            source,
                        }
                    })?;
            }
            writer.write_tensor(&plan.hf_name, &bytes)?;
            bar.inc(info.n_bytes);
            continue;
        }
        let dequant_error = |source| ImportError::Dequant {
            path: path(),
            source,
        };
        let mut values = dequantize(&info.name, info.ggml_type, file.tensor_data(info))
            .map_err(dequant_error)?;
        if let Some(heads) = plan.unpermute_heads {
            values =
                unpermute_rows(&info.name, &values, plan.shape[0], heads).map_err(|source| {
                    ImportError::Tensors {
                        path: path(),
                        source,
                    }
                })?;
        }
        writer.write_tensor(&plan.hf_name, &encode(options.dtype, &values))?;
        bar.inc(info.n_bytes);
    }
    writer.finish()?;
    bar.finish_and_clear();

    write_json(&staged.path().join(CONFIG_FILE), &config)?;
    write_json(
        &staged.path().join(GENERATION_CONFIG_FILE),
        &generation_config(&tokenizer.eos_token_ids, tokenizer.bos_token_id, &vocab),
    )?;
    tokenizer
        .write_to(staged.path())
        .map_err(|source| ImportError::Tokenizer {
            path: path(),
            source,
        })?;
    let output = staged.commit()?;
    Ok(ImportSummary {
        output,
        config,
        tensor_count: plans.len(),
        parameter_count,
        weights_bytes,
        source_types,
        dequantized_quant_types,
    })
}

/// Encodes in parallel slices (the rounding is per element, so slicing changes nothing).
fn encode(dtype: WeightDType, values: &[f32]) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    if values.len() <= CHUNK {
        return dtype.encode(values);
    }
    let parts: Vec<Vec<u8>> = values
        .par_chunks(CHUNK)
        .map(|chunk| dtype.encode(chunk))
        .collect();
    parts.concat()
}

/// `generation_config.json`: the tokenizer's end-of-generation ids, and no sampling defaults
/// (the GGUF carries none).
fn generation_config(
    eos_token_ids: &[u32],
    bos_token_id: Option<u32>,
    vocab: &crate::gguf_tokenizer::GgufVocab,
) -> GenerationConfig {
    // Deduplicated, keeping the tokenizer's order (the primary eos first).
    let mut seen = BTreeSet::new();
    let eos: Vec<u32> = eos_token_ids
        .iter()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect();
    GenerationConfig {
        bos_token_id: bos_token_id.map(TokenIds::One),
        eos_token_id: match eos.as_slice() {
            [] => None,
            [one] => Some(TokenIds::One(*one)),
            _ => Some(TokenIds::Many(eos)),
        },
        pad_token_id: vocab.padding_token_id,
        ..GenerationConfig::default()
    }
}
