//! Rebuilds a Hugging Face `tokenizers` `tokenizer.json` (and `tokenizer_config.json`) from the
//! `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! The goal is the tokenizer Hugging Face transformers builds when it loads the same GGUF
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): same ids for the same text, same
//! decoded text. Two vocabulary kinds are supported: byte-level BPE (`tokenizer.ggml.model =
//! "gpt2"`) and SentencePiece-style (`"llama"`).
//!
//! This module does not read GGUF files; the caller fills a [`GgufVocab`] from the metadata.

use std::path::{Path, PathBuf};

use tandem_model::TokenizerConfig;

/// The tokenizer metadata of a GGUF file, one field per `tokenizer.ggml.*` key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer of byte-level BPE vocabularies.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
    /// 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `"left right"` pairs, highest priority first.
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub eot_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

/// What [`build_tokenizer`] produces: the files of a model directory that describe its tokenizer.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// The serialized `tokenizer.json`.
    pub tokenizer_json: String,
    pub tokenizer_config: TokenizerConfig,
    /// The ids that end generation, for `generation_config.json`'s `eos_token_id`.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerBuildError {
    #[error("the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens is missing or empty)")]
    MissingTokens,
    #[error(
        "tokenizer.ggml.model is \"gpt2\" (byte-level BPE) but tokenizer.ggml.merges is missing"
    )]
    MissingMerges,
    #[error("unsupported tokenizer.ggml.model \"{0}\" (supported: gpt2, llama)")]
    UnknownModel(String),
    #[error("unsupported tokenizer.ggml.pre \"{pre}\" (supported: {supported})")]
    UnknownPre { pre: String, supported: String },
    #[error("{field} is {id} but the vocabulary has only {vocab_size} tokens")]
    IdOutOfRange {
        field: &'static str,
        id: u32,
        vocab_size: usize,
    },
    #[error("{field} has {len} entries but tokenizer.ggml.tokens has {vocab_size}")]
    LengthMismatch {
        field: &'static str,
        len: usize,
        vocab_size: usize,
    },
    #[error(
        "tokenizer.ggml.merges entry {index} ({merge:?}) is not two tokens separated by a space"
    )]
    BadMerge { index: usize, merge: String },
    #[error("the rebuilt tokenizer.json is not accepted by the tokenizers library: {0}")]
    Invalid(String),
    #[error("cannot serialize {file}: {source}")]
    Serialize {
        file: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TokenizerFiles {
    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<(), TokenizerBuildError> {
        let config = serde_json::to_string_pretty(&self.tokenizer_config).map_err(|source| {
            TokenizerBuildError::Serialize {
                file: "tokenizer_config.json",
                source,
            }
        })?;
        for (name, text) in [
            ("tokenizer.json", self.tokenizer_json.as_str()),
            ("tokenizer_config.json", config.as_str()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|source| TokenizerBuildError::Write { path, source })?;
        }
        Ok(())
    }
}

/// Builds the tokenizer files for `vocab`.
pub fn build_tokenizer(vocab: &GgufVocab) -> Result<TokenizerFiles, TokenizerBuildError> {
    // Interface placeholder committed early so the GGUF import compiles against it; the
    // builders land in the next commits.
    Err(TokenizerBuildError::UnknownModel(vocab.model.clone()))
}
