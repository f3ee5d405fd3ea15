//! Rebuilds a Hugging Face `tokenizers` `tokenizer.json` (and `tokenizer_config.json`) from the
//! `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! The goal is the tokenizer Hugging Face transformers builds when it loads the same GGUF
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): same ids for the same text, same
//! decoded text. Two vocabulary kinds are supported: byte-level BPE (`tokenizer.ggml.model =
//! "gpt2"`) and SentencePiece-style (`"llama"`).
//!
//! This module does not read GGUF files; the caller fills a [`GgufVocab`] from the metadata.
//!
//! Where transformers and llama.cpp disagree we follow transformers, with two exceptions, both
//! documented where they are decided: a SentencePiece vocabulary with `add_space_prefix = false`
//! gets no prefix space (`sentencepiece::pre_tokenizer`), and no token is invented past the
//! vocabulary (`special_tokens::added_tokens`).
//!
//! Not covered: transformers' architecture-specific SentencePiece builders (Gemma respells
//! space tokens and orders merges by position; Phi-3 prepends with a normalizer). They are chosen
//! by `general.architecture`, which a [`GgufVocab`] does not carry; such files get the generic
//! Llama build. Unigram (`"t5"`) and WordPiece (`"bert"`) vocabularies are refused.

mod byte_level;
mod sentencepiece;
mod special_tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::json;
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
    /// The ids that end generation, for `generation_config.json`'s `eos_token_id`: the EOS id
    /// first, then EOT and the vocabulary's other end-of-turn markers (see
    /// `special_tokens::end_of_generation_ids` for why one EOS is not enough).
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
    #[error(
        "tokenizer.ggml.model is \"llama\" (SentencePiece) but the GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores to order the merges by"
    )]
    MissingScores,
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

/// Builds the tokenizer files for `vocab`: the tokenizer transformers builds from the same GGUF.
pub fn build_tokenizer(vocab: &GgufVocab) -> Result<TokenizerFiles, TokenizerBuildError> {
    validate(vocab)?;
    let byte_level = vocab.model == "gpt2";
    let alphabet = byte_level::byte_alphabet();

    // The model's vocabulary, as Python's `{token: id}`: a later duplicate wins.
    let model_vocab: HashMap<String, u32> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let spelled = if byte_level {
                byte_level::model_spelling(token, &alphabet)
            } else {
                token.clone()
            };
            (spelled, id as u32)
        })
        .collect();
    let merges = match (&vocab.merges, &vocab.scores) {
        (Some(merges), _) => parse_merges(merges)?,
        (None, Some(scores)) if !byte_level => {
            sentencepiece::merges_from_scores(&vocab.tokens, scores)
        }
        (None, _) if byte_level => return Err(TokenizerBuildError::MissingMerges),
        (None, _) => return Err(TokenizerBuildError::MissingScores),
    };

    let added = special_tokens::added_tokens(vocab, &model_vocab, byte_level.then_some(&alphabet));
    let (add_bos, add_eos) = special_tokens::add_bos_eos(vocab);
    // The template names BOS/EOS by the id the tokenizer has for their text, as transformers'
    // `convert_tokens_to_ids` does; a token the tokenizer cannot produce is left out.
    let named = |id: Option<u32>| {
        let text = vocab.tokens[id? as usize].as_str();
        let resolved = *model_vocab.get(text)?;
        Some((text, resolved))
    };
    let post_processor = special_tokens::post_processor(
        named(vocab.bos_token_id),
        named(vocab.eos_token_id),
        add_bos,
        add_eos,
    );

    let (pre_tokenizer, decoder, model) = if byte_level {
        (
            byte_level::pre_tokenizer(vocab.pre.as_deref())?,
            byte_level::decoder(),
            byte_level::model(&model_vocab, &merges),
        )
    } else {
        let add_space_prefix = vocab.add_space_prefix.unwrap_or(true);
        (
            sentencepiece::pre_tokenizer(add_space_prefix),
            sentencepiece::decoder(add_space_prefix),
            sentencepiece::model(&model_vocab, &merges),
        )
    };
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": special_tokens::added_tokens_json(&added),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    });
    // Loading it is the check that the tokenizers library accepts what we wrote (merges of
    // tokens the vocabulary lacks are caught here); its own serialization is the canonical file.
    let tokenizer: tokenizers::Tokenizer = document
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| TokenizerBuildError::Invalid(e.to_string()))?;
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| TokenizerBuildError::Invalid(e.to_string()))?;

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: special_tokens::tokenizer_config(vocab, add_bos, add_eos),
        eos_token_ids: special_tokens::end_of_generation_ids(vocab),
        bos_token_id: vocab.bos_token_id,
    })
}

/// Checks what the builders index by: the model kind, array lengths and special token ids.
fn validate(vocab: &GgufVocab) -> Result<(), TokenizerBuildError> {
    if vocab.tokens.is_empty() {
        return Err(TokenizerBuildError::MissingTokens);
    }
    match vocab.model.as_str() {
        "gpt2" => {
            if vocab.merges.is_none() {
                return Err(TokenizerBuildError::MissingMerges);
            }
            // Fails early on an unknown pre-tokenizer, before any work.
            byte_level::pre_tokenizer(vocab.pre.as_deref())?;
        }
        "llama" => {
            if vocab.merges.is_none() && vocab.scores.is_none() {
                return Err(TokenizerBuildError::MissingScores);
            }
        }
        other => return Err(TokenizerBuildError::UnknownModel(other.to_owned())),
    }
    let vocab_size = vocab.tokens.len();
    let lengths = [
        ("tokenizer.ggml.scores", vocab.scores.as_ref().map(Vec::len)),
        (
            "tokenizer.ggml.token_type",
            vocab.token_types.as_ref().map(Vec::len),
        ),
    ];
    for (field, len) in lengths {
        if let Some(len) = len.filter(|&len| len != vocab_size) {
            return Err(TokenizerBuildError::LengthMismatch {
                field,
                len,
                vocab_size,
            });
        }
    }
    let ids = [
        ("tokenizer.ggml.bos_token_id", vocab.bos_token_id),
        ("tokenizer.ggml.eos_token_id", vocab.eos_token_id),
        ("tokenizer.ggml.unknown_token_id", vocab.unknown_token_id),
        ("tokenizer.ggml.padding_token_id", vocab.padding_token_id),
        ("tokenizer.ggml.eot_token_id", vocab.eot_token_id),
    ];
    for (field, id) in ids {
        if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
            return Err(TokenizerBuildError::IdOutOfRange {
                field,
                id,
                vocab_size,
            });
        }
    }
    Ok(())
}

/// `"left right"` strings into pairs.
fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>, TokenizerBuildError> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            let mut parts = merge.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(left), Some(right), None) if !left.is_empty() && !right.is_empty() => {
                    Ok((left.to_owned(), right.to_owned()))
                }
                _ => Err(TokenizerBuildError::BadMerge {
                    index,
                    merge: merge.clone(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete little byte-level vocabulary: the 256 byte tokens, one merge, one control token.
    fn byte_level_vocab() -> GgufVocab {
        let alphabet = byte_level::byte_alphabet();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        tokens.push("ab".into());
        let mut token_types = vec![1; tokens.len()];
        token_types[0] = 3;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("qwen2".into()),
            tokens,
            token_types: Some(token_types),
            merges: Some(vec!["a b".into()]),
            eos_token_id: Some(0),
            ..Default::default()
        }
    }

    fn sentencepiece_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(["▁", "a", "b", "▁a", "ab"].map(String::from));
        let mut token_types = vec![2, 3, 3];
        token_types.extend([6; 256]);
        token_types.extend([1; 5]);
        let mut scores = vec![0.0; 3 + 256];
        scores.extend([-1.0, -2.0, -3.0, -4.0, -5.0]);
        GgufVocab {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(token_types),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            ..Default::default()
        }
    }

    fn encode(files: &TokenizerFiles, text: &str) -> Vec<u32> {
        let tokenizer: tokenizers::Tokenizer = files
            .tokenizer_json
            .parse()
            .expect("the built tokenizer loads");
        tokenizer
            .encode(text, true)
            .expect("encodes")
            .get_ids()
            .to_vec()
    }

    #[test]
    fn valid_vocabularies_build() {
        let files = build_tokenizer(&byte_level_vocab()).expect("byte-level vocabulary builds");
        // "ab" merged, then " " and the control token matched whole; no BOS by default.
        assert_eq!(encode(&files, "ab <|endoftext|>"), vec![257, 33, 0]);
        let files =
            build_tokenizer(&sentencepiece_vocab()).expect("sentencepiece vocabulary builds");
        // BOS by default, "▁a" from the prefix space, "b", and byte fallback for "é".
        assert_eq!(
            encode(&files, "ab é"),
            vec![1, 262, 261, 259, 0xC3 + 3, 0xA9 + 3]
        );
    }

    #[test]
    fn missing_tokens() {
        let vocab = GgufVocab {
            tokens: vec![],
            ..byte_level_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::MissingTokens)
        ));
    }

    #[test]
    fn byte_level_without_merges() {
        let vocab = GgufVocab {
            merges: None,
            ..byte_level_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::MissingMerges)
        ));
    }

    #[test]
    fn sentencepiece_without_scores_or_merges() {
        let vocab = GgufVocab {
            scores: None,
            ..sentencepiece_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::MissingScores)
        ));
    }

    #[test]
    fn unknown_model() {
        let vocab = GgufVocab {
            model: "rwkv".into(),
            ..byte_level_vocab()
        };
        let err = build_tokenizer(&vocab).expect_err("rwkv is not supported");
        assert!(matches!(&err, TokenizerBuildError::UnknownModel(m) if m == "rwkv"));
        assert!(err.to_string().contains("gpt2, llama"), "{err}");
    }

    #[test]
    fn unknown_pre_names_the_supported_ones() {
        let vocab = GgufVocab {
            pre: Some("chatglm-bpe".into()),
            ..byte_level_vocab()
        };
        let err = build_tokenizer(&vocab).expect_err("chatglm-bpe is not supported");
        let message = err.to_string();
        assert!(matches!(err, TokenizerBuildError::UnknownPre { .. }));
        for name in ["chatglm-bpe", "smollm", "llama-bpe", "gpt2", "qwen2"] {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn special_id_out_of_range() {
        let size = byte_level_vocab().tokens.len();
        let vocab = GgufVocab {
            bos_token_id: Some(size as u32),
            ..byte_level_vocab()
        };
        let err = build_tokenizer(&vocab).expect_err("BOS past the vocabulary");
        assert!(matches!(
            err,
            TokenizerBuildError::IdOutOfRange { field: "tokenizer.ggml.bos_token_id", id, vocab_size }
                if id as usize == size && vocab_size == size
        ));
        let vocab = GgufVocab {
            eot_token_id: Some(u32::MAX),
            ..sentencepiece_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::IdOutOfRange {
                field: "tokenizer.ggml.eot_token_id",
                ..
            })
        ));
    }

    #[test]
    fn inconsistent_array_lengths() {
        let mut vocab = sentencepiece_vocab();
        vocab.scores.as_mut().expect("has scores").pop();
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::LengthMismatch {
                field: "tokenizer.ggml.scores",
                ..
            })
        ));
        let mut vocab = byte_level_vocab();
        vocab.token_types.as_mut().expect("has types").push(1);
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::LengthMismatch {
                field: "tokenizer.ggml.token_type",
                ..
            })
        ));
    }

    #[test]
    fn malformed_merges() {
        let vocab = GgufVocab {
            merges: Some(vec!["a b".into(), "abc".into()]),
            ..byte_level_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::BadMerge { index: 1, .. })
        ));
        // A merge of tokens the vocabulary lacks is refused by the tokenizers library.
        let vocab = GgufVocab {
            merges: Some(vec!["a b".into(), "ab zz".into()]),
            ..byte_level_vocab()
        };
        assert!(matches!(
            build_tokenizer(&vocab),
            Err(TokenizerBuildError::Invalid(_))
        ));
    }

    #[test]
    fn write_to_reports_the_path() {
        let files = build_tokenizer(&byte_level_vocab()).expect("builds");
        let missing = std::env::temp_dir().join("tandem-no-such-dir/nested");
        let err = files
            .write_to(&missing)
            .expect_err("the directory does not exist");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
