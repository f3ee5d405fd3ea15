//! `model-prep inspect`: what a model directory holds, and whether a worker could load it.
//!
//! Reads only `config.json`, the tokenizer files and the safetensors headers (never tensor
//! data), so inspecting a 16 GB model is instant. Everything that would stop a worker from
//! loading the directory (missing or misshapen tensors, truncated weight files, no tokenizer)
//! is collected in [`ModelReport::problems`] rather than failing early, so one run lists them
//! all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_model::quantization;
use tandem_model::random_weights::RandomWeights;
use tandem_model::tensor_names::expected_tensors;
use tandem_model::{
    CONFIG_FILE, ConfigError, ModelConfig, RANDOM_WEIGHTS_FILE, RopeScaling,
    SAFETENSORS_INDEX_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TokenizerConfig, WEIGHTS_FILE,
    read_json,
};

/// Safetensors headers larger than this are treated as corrupt (real ones are well under 1 MiB
/// per thousand tensors).
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{dir} is not a model directory: {reason}")]
    NotAModel { dir: PathBuf, reason: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Everything `inspect` reports; serialized as is by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub directory: PathBuf,
    pub architecture: String,
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    /// Whether each q and k head is RMS-normed before rotation (Qwen3).
    pub qk_norm: bool,
    /// `torch_dtype` in config.json.
    pub config_dtype: Option<String>,
    /// The parameters config.json implies.
    pub expected_parameters: u64,
    pub weights: WeightsReport,
    pub tokenizer: Option<TokenizerReport>,
    pub files: Vec<FileEntry>,
    pub total_bytes: u64,
    /// Reasons a worker would refuse this directory; empty when it is complete.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WeightsReport {
    /// The safetensors files read, relative to the directory.
    pub files: Vec<String>,
    /// Tensor count per safetensors dtype (`BF16`, `F32`, ...).
    pub dtypes: BTreeMap<String, usize>,
    /// Parameters in the tensors present.
    pub parameters: u64,
    pub tensors_present: usize,
    pub tensors_expected: usize,
    pub missing: Vec<String>,
    /// Tensors present that the architecture does not use (ignored by the workers).
    pub extra: Vec<String>,
    /// `name: found [..], expected [..]`.
    pub wrong_shape: Vec<String>,
    /// Scale tensors of an FP8 checkpoint (`*.weight_scale`, `*.input_scale`, KV cache
    /// scales): part of the quantization, not extra.
    pub quantization_scales: usize,
    /// The FP8 scheme config.json declares, described.
    pub quantization: Option<String>,
    /// Weights the workers generate when they load the model (`random --generate-at-load`):
    /// every expected tensor, from this seed and dtype; no weight files.
    pub generated_at_load: Option<RandomWeights>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizerReport {
    /// Ids the tokenizer can produce, added tokens included.
    pub vocab_size: usize,
    pub special_tokens: Vec<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub has_chat_template: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Inspects `dir`. Errors only when it is not a model directory at all (no or invalid
/// `config.json`); other defects are listed in the report's `problems`.
pub fn inspect(dir: &Path) -> Result<ModelReport, InspectError> {
    if !dir.is_dir() {
        return Err(InspectError::NotAModel {
            dir: dir.to_path_buf(),
            reason: "it does not exist or is not a directory".into(),
        });
    }
    if !dir.join(CONFIG_FILE).is_file() {
        return Err(InspectError::NotAModel {
            dir: dir.to_path_buf(),
            reason: format!("it has no {CONFIG_FILE}"),
        });
    }
    let config = ModelConfig::load(dir)?;
    let mut problems = Vec::new();
    let weights = inspect_weights(dir, &config, &mut problems);
    let tokenizer = inspect_tokenizer(dir, &config, &mut problems);
    let files = list_files(dir);
    Ok(ModelReport {
        directory: dir.to_path_buf(),
        architecture: config.architecture().hf_class().to_string(),
        model_type: config.model_type.clone(),
        layers: config.num_hidden_layers,
        hidden_size: config.hidden_size,
        attention_heads: config.num_attention_heads,
        kv_heads: config.num_kv_heads(),
        head_dim: config.head_dim(),
        intermediate_size: config.intermediate_size,
        vocab_size: config.vocab_size,
        max_position_embeddings: config.max_position_embeddings,
        rope_theta: config.rope_theta,
        rope_scaling: config.rope_scaling.clone(),
        rms_norm_eps: config.rms_norm_eps,
        tie_word_embeddings: config.tie_word_embeddings,
        qkv_bias: config.qkv_bias(),
        qk_norm: config.qk_norm(),
        config_dtype: config.torch_dtype.clone(),
        expected_parameters: config.parameter_count(),
        weights,
        tokenizer,
        total_bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        problems,
    })
}

fn inspect_weights(dir: &Path, config: &ModelConfig, problems: &mut Vec<String>) -> WeightsReport {
    let mut report = WeightsReport::default();
    let files = match weight_files(dir) {
        Ok(files) => files,
        Err(_) if dir.join(RANDOM_WEIGHTS_FILE).is_file() => {
            match read_json::<RandomWeights>(&dir.join(RANDOM_WEIGHTS_FILE)) {
                Ok(spec) => {
                    let expected = expected_tensors(config);
                    let name = spec.dtype.safetensors_name();
                    report.dtypes.insert(name.into(), expected.len());
                    report.parameters = config.parameter_count();
                    report.tensors_present = expected.len();
                    report.tensors_expected = expected.len();
                    report.files = vec![RANDOM_WEIGHTS_FILE.into()];
                    report.generated_at_load = Some(spec);
                }
                Err(e) => problems.push(e.to_string()),
            }
            return report;
        }
        Err(problem) => {
            problems.push(problem);
            return report;
        }
    };
    let mut present: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    // GGUF blocks kept as U8 `[rows, row bytes]`: their shape in values is what is checked.
    let gguf = config.gguf_quant().unwrap_or_default().tensor_types;
    for file in &files {
        match read_header(&dir.join(file)) {
            Ok(entries) => {
                for (name, mut entry) in entries {
                    if let (Some(quant), "U8", &[rows, row_bytes]) =
                        (gguf.get(&name), entry.dtype.as_str(), &entry.shape[..])
                        && let Some(cols) = quant.row_elems(row_bytes)
                    {
                        entry.shape = vec![rows, cols];
                        entry.dtype = format!("U8 ({quant} blocks)");
                    }
                    *report.dtypes.entry(entry.dtype.clone()).or_default() += 1;
                    report.parameters += entry.shape.iter().map(|&d| d as u64).product::<u64>();
                    present.insert(name, entry.shape);
                }
            }
            Err(problem) => problems.push(format!("{file}: {problem}")),
        }
    }
    report.files = files;
    let expected = expected_tensors(config);
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    report.tensors_present = present.len();
    report.tensors_expected = expected.len();
    for (name, shape) in &expected {
        match present.get(name) {
            None => report.missing.push(name.clone()),
            Some(found) if found != shape => report
                .wrong_shape
                .push(format!("{name}: found {found:?}, expected {shape:?}")),
            Some(_) => {}
        }
    }
    let is_scale = |name: &str| {
        quantization::is_kv_cache_scale(name)
            || quantization::scaled_weight(name).is_some_and(|w| present.contains_key(&w))
    };
    report.quantization_scales = present.keys().filter(|n| is_scale(n)).count();
    report.quantization = config.quantization_config.as_ref().map(|q| {
        match quantization::Fp8Scheme::from_config(q) {
            Ok(s) => format!(
                "fp8 ({}): {:?} weight scales, {:?} activations, {} kept in 16 bits",
                s.method,
                s.weights,
                s.activations,
                if s.ignored.is_empty() {
                    "nothing".to_string()
                } else {
                    s.ignored.join(", ")
                }
            ),
            Err(reason) => format!("unsupported: {reason}"),
        }
    });
    report.extra = present
        .keys()
        .filter(|name| !expected_names.contains(name.as_str()) && !is_scale(name))
        .cloned()
        .collect();
    if !report.missing.is_empty() {
        problems.push(format!(
            "{} expected tensors are missing (first: {})",
            report.missing.len(),
            report.missing[0]
        ));
    }
    if !report.wrong_shape.is_empty() {
        problems.push(format!(
            "{} tensors have the wrong shape (first: {})",
            report.wrong_shape.len(),
            report.wrong_shape[0]
        ));
    }
    report
}

/// The safetensors files of the directory: the shards of the index, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<String>, String> {
    let index_path = dir.join(SAFETENSORS_INDEX_FILE);
    if index_path.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let index: Index = read_json(&index_path).map_err(|e| e.to_string())?;
        let shards: BTreeSet<String> = index.weight_map.into_values().collect();
        let missing: Vec<&String> = shards.iter().filter(|s| !dir.join(s).is_file()).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{SAFETENSORS_INDEX_FILE} names shards that are absent: {missing:?}"
            ));
        }
        return Ok(shards.into_iter().collect());
    }
    if dir.join(WEIGHTS_FILE).is_file() {
        return Ok(vec![WEIGHTS_FILE.to_string()]);
    }
    Err(format!(
        "no weights: neither {WEIGHTS_FILE} nor {SAFETENSORS_INDEX_FILE} is present"
    ))
}

/// Reads a safetensors header and checks that every tensor's data lies inside the file.
fn read_header(path: &Path) -> Result<BTreeMap<String, HeaderEntry>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| "too short to be a safetensors file".to_string())?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(format!(
            "corrupt safetensors header (declares {header_len} header bytes in a {file_len}-byte file)"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read the header: {e}"))?;
    let mut raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("invalid header JSON: {e}"))?;
    raw.remove("__metadata__");
    let data_len = file_len - 8 - header_len;
    let mut entries = BTreeMap::new();
    for (name, value) in raw {
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| format!("invalid header entry for {name}: {e}"))?;
        if entry.data_offsets[1] > data_len || entry.data_offsets[0] > entry.data_offsets[1] {
            return Err(format!(
                "truncated: tensor {name} ends at byte {} of the data, which has {data_len} bytes",
                entry.data_offsets[1]
            ));
        }
        entries.insert(name, entry);
    }
    Ok(entries)
}

fn inspect_tokenizer(
    dir: &Path,
    config: &ModelConfig,
    problems: &mut Vec<String>,
) -> Option<TokenizerReport> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        problems.push(format!("no {TOKENIZER_FILE}"));
        return None;
    }
    let tokenizer = match tokenizers::Tokenizer::from_file(&path) {
        Ok(tokenizer) => tokenizer,
        Err(e) => {
            problems.push(format!("{TOKENIZER_FILE} does not load: {e}"));
            return None;
        }
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    if vocab_size > config.vocab_size {
        problems.push(format!(
            "the tokenizer has {vocab_size} ids but the embedding only {} rows",
            config.vocab_size
        ));
    }
    let mut special_tokens: Vec<(u32, String)> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special)
        .map(|(id, token)| (id, token.content))
        .collect();
    special_tokens.sort();
    let tokenizer_config: Option<TokenizerConfig> = {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if config_path.is_file() {
            match read_json(&config_path) {
                Ok(config) => Some(config),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            }
        } else {
            None
        }
    };
    let content =
        |entry: Option<&tandem_model::AddedTokenEntry>| entry.map(|e| e.content().to_string());
    Some(TokenizerReport {
        vocab_size,
        special_tokens: special_tokens
            .into_iter()
            .map(|(id, content)| format!("{id}={content}"))
            .collect(),
        bos_token: content(tokenizer_config.as_ref().and_then(|c| c.bos_token.as_ref())),
        eos_token: content(tokenizer_config.as_ref().and_then(|c| c.eos_token.as_ref())),
        has_chat_template: tokenizer_config
            .as_ref()
            .is_some_and(|c| c.default_chat_template().is_some()),
    })
}

fn list_files(dir: &Path) -> Vec<FileEntry> {
    let mut files: Vec<FileEntry> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            metadata.is_file().then(|| FileEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                bytes: metadata.len(),
            })
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

/// Bytes in binary units, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parameter counts as people say them: 134.5M, 8.03B.
pub fn human_count(count: u64) -> String {
    match count {
        c if c >= 1_000_000_000 => format!("{:.2}B", c as f64 / 1e9),
        c if c >= 1_000_000 => format!("{:.1}M", c as f64 / 1e6),
        c if c >= 1_000 => format!("{:.1}K", c as f64 / 1e3),
        c => c.to_string(),
    }
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.weights;
        writeln!(f, "model directory   {}", self.directory.display())?;
        writeln!(
            f,
            "architecture      {} ({})",
            self.architecture, self.model_type
        )?;
        writeln!(
            f,
            "parameters        {} ({} in the tensors present)",
            human_count(self.expected_parameters),
            human_count(w.parameters)
        )?;
        let dtypes: Vec<String> = w
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} ({n} tensors)"))
            .collect();
        writeln!(
            f,
            "dtype             {} (config: {})",
            if dtypes.is_empty() {
                "-".to_string()
            } else {
                dtypes.join(", ")
            },
            self.config_dtype.as_deref().unwrap_or("unset")
        )?;
        if let Some(spec) = &w.generated_at_load {
            writeln!(
                f,
                "weights           generated at load (seed {}, generator {}): no weight files",
                spec.seed, spec.generator
            )?;
        }
        if let Some(q) = &w.quantization {
            writeln!(
                f,
                "quantization      {q}; {} scale tensors",
                w.quantization_scales
            )?;
        }
        writeln!(f, "layers            {}", self.layers)?;
        writeln!(f, "hidden size       {}", self.hidden_size)?;
        writeln!(
            f,
            "attention heads   {} (kv heads {}, head dim {})",
            self.attention_heads, self.kv_heads, self.head_dim
        )?;
        writeln!(f, "ffn size          {}", self.intermediate_size)?;
        writeln!(f, "vocab size        {}", self.vocab_size)?;
        writeln!(f, "context length    {}", self.max_position_embeddings)?;
        let scaling = match &self.rope_scaling {
            None => "none".to_string(),
            Some(s) => format!(
                "{} (factor {})",
                s.rope_type,
                s.factor.map_or("-".to_string(), |x| x.to_string())
            ),
        };
        writeln!(
            f,
            "rope              theta {}, scaling {scaling}",
            self.rope_theta
        )?;
        writeln!(f, "rms norm eps      {}", self.rms_norm_eps)?;
        writeln!(f, "tied embeddings   {}", yes_no(self.tie_word_embeddings))?;
        writeln!(f, "qkv bias          {}", yes_no(self.qkv_bias))?;
        writeln!(f, "q/k head norms    {}", yes_no(self.qk_norm))?;
        writeln!(
            f,
            "tensors           {} present, {} expected, {} missing, {} extra, {} wrong shape",
            w.tensors_present,
            w.tensors_expected,
            w.missing.len(),
            w.extra.len(),
            w.wrong_shape.len()
        )?;
        for name in &w.missing {
            writeln!(f, "  missing         {name}")?;
        }
        for name in &w.extra {
            writeln!(f, "  extra           {name}")?;
        }
        for line in &w.wrong_shape {
            writeln!(f, "  wrong shape     {line}")?;
        }
        match &self.tokenizer {
            None => writeln!(f, "tokenizer         none")?,
            Some(t) => {
                writeln!(f, "tokenizer         {} ids", t.vocab_size)?;
                writeln!(
                    f,
                    "  bos / eos       {} / {}",
                    t.bos_token.as_deref().unwrap_or("-"),
                    t.eos_token.as_deref().unwrap_or("-")
                )?;
                writeln!(f, "  chat template   {}", yes_no(t.has_chat_template))?;
                let shown: Vec<&str> = t
                    .special_tokens
                    .iter()
                    .take(8)
                    .map(String::as_str)
                    .collect();
                let more = t.special_tokens.len().saturating_sub(shown.len());
                writeln!(
                    f,
                    "  special tokens  {}{}",
                    shown.join(" "),
                    if more > 0 {
                        format!(" (+{more} more)")
                    } else {
                        String::new()
                    }
                )?;
            }
        }
        writeln!(
            f,
            "files             {} total",
            human_bytes(self.total_bytes)
        )?;
        for file in &self.files {
            writeln!(f, "  {:<28} {:>10}", file.name, human_bytes(file.bytes))?;
        }
        if self.problems.is_empty() {
            writeln!(f, "status            complete")?;
        } else {
            for problem in &self.problems {
                writeln!(f, "problem           {problem}")?;
            }
        }
        Ok(())
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{RandomOptions, generate};
    use tandem_model::WeightDType;

    fn tiny(dir: &Path) {
        let options = RandomOptions {
            preset: "tiny".into(),
            shape: Default::default(),
            seed: 1,
            dtype: WeightDType::Bf16,
            force: false,
            generate_at_load: false,
        };
        generate(&options, dir).unwrap();
    }

    #[test]
    fn complete_model_has_no_problems() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        tiny(&dir);
        let report = inspect(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.weights.dtypes.keys().collect::<Vec<_>>(), ["BF16"]);
        assert_eq!(report.weights.parameters, report.expected_parameters);
        let tokenizer = report.tokenizer.as_ref().unwrap();
        assert!(tokenizer.has_chat_template);
        assert_eq!(tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
        let text = report.to_string();
        assert!(text.contains("status            complete"), "{text}");
    }

    #[test]
    fn truncated_weights_and_missing_tokenizer_are_problems() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        tiny(&dir);
        let weights = dir.join(WEIGHTS_FILE);
        let len = std::fs::metadata(&weights).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .unwrap();
        file.set_len(len - 100).unwrap();
        std::fs::remove_file(dir.join(TOKENIZER_FILE)).unwrap();
        let report = inspect(&dir).unwrap();
        let problems = report.problems.join("\n");
        assert!(problems.contains("truncated"), "{problems}");
        assert!(problems.contains("no tokenizer.json"), "{problems}");
    }

    #[test]
    fn missing_and_misshapen_tensors_are_listed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        tiny(&dir);
        let mut config: serde_json::Value = read_json(&dir.join(CONFIG_FILE)).unwrap();
        config["num_hidden_layers"] = 3.into();
        config["intermediate_size"] = 100.into();
        tandem_model::write_json(&dir.join(CONFIG_FILE), &config).unwrap();
        let report = inspect(&dir).unwrap();
        assert!(
            report
                .weights
                .missing
                .iter()
                .any(|n| n.starts_with("model.layers.2."))
        );
        assert!(
            report
                .weights
                .wrong_shape
                .iter()
                .any(|l| l.contains("gate_proj"))
        );
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    }

    #[test]
    fn directory_without_config_is_not_a_model() {
        let root = tempfile::tempdir().unwrap();
        let err = inspect(root.path()).unwrap_err();
        assert!(err.to_string().contains("has no config.json"), "{err}");
        let err = inspect(&root.path().join("absent")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(16 << 30), "16.0 GiB");
        assert_eq!(human_count(134_515_008), "134.5M");
        assert_eq!(human_count(8_030_261_248), "8.03B");
    }
}
