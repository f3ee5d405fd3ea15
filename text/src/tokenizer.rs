//! The model's tokenizer (`tokenizer.json`) together with the special tokens and stop ids that
//! `tokenizer_config.json`, `generation_config.json` and `config.json` define.
//!
//! # Special tokens and chat templates
//! A chat template already writes the BOS text (e.g. `<|begin_of_text|>` or `<s>`) into the
//! prompt. Encoding that text *with* special tokens would add a second BOS through the
//! tokenizer's post-processor. Like Hugging Face's `apply_chat_template(tokenize=True)`, encode
//! templated prompts with `add_special_tokens = false` ([`TextTokenizer::encode_templated`]);
//! plain-completion prompts use `add_special_tokens = true` ([`TextTokenizer::encode`]), which
//! is what `tokenizer(text)` does in transformers.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_model::{
    CONFIG_FILE, ConfigError, GENERATION_CONFIG_FILE, GenerationConfig, TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE, TokenIds, TokenizerConfig, read_json,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where newer transformers versions save the chat template, beside tokenizer_config.json.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: special token `{field}` = {token:?} is not in the tokenizer's vocabulary")]
    UnknownSpecialToken {
        path: PathBuf,
        field: &'static str,
        token: String,
    },
    #[error("cannot encode text: {0}")]
    Encode(#[source] BoxError),
    #[error("cannot decode token ids: {0}")]
    Decode(#[source] BoxError),
}

/// A special token's text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// `config.json` read only for its end-of-sequence ids, so the text crate does not depend on
/// the architecture being one the engine supports.
#[derive(Deserialize)]
struct ConfigEos {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

/// The tokenizer of one model directory.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    /// `chat_template.jinja`, where newer transformers versions save the template.
    chat_template_file: Option<String>,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    stop_token_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_token_ids", &self.stop_token_ids)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json`, `generation_config.json` and
    /// `config.json` (each optional: Hub repositories do not always ship them) from `model_dir`.
    pub fn load(model_dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = model_dir.join(TOKENIZER_FILE);
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|source| {
            TokenizerError::Load {
                path: tokenizer_path,
                source,
            }
        })?;
        let config: TokenizerConfig =
            read_optional(&model_dir.join(TOKENIZER_CONFIG_FILE))?.unwrap_or_default();
        let generation: GenerationConfig =
            read_optional(&model_dir.join(GENERATION_CONFIG_FILE))?.unwrap_or_default();
        let model_eos =
            read_optional::<ConfigEos>(&model_dir.join(CONFIG_FILE))?.and_then(|c| c.eos_token_id);
        let mut tokenizer = Self::from_parts(
            inner,
            config,
            generation.eos_token_id.as_ref(),
            model_eos.as_ref(),
            &model_dir.join(TOKENIZER_CONFIG_FILE),
        )?;
        let template_path = model_dir.join(CHAT_TEMPLATE_FILE);
        if template_path.exists() {
            let source =
                std::fs::read_to_string(&template_path).map_err(|source| TokenizerError::Load {
                    path: template_path,
                    source: Box::new(source),
                })?;
            tokenizer.chat_template_file = Some(source);
        }
        Ok(tokenizer)
    }

    /// Builds from already-loaded parts; `config_path` is only used in error messages.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        generation_eos: Option<&TokenIds>,
        model_eos: Option<&TokenIds>,
        config_path: &Path,
    ) -> Result<Self, TokenizerError> {
        let special = |field: &'static str, entry: Option<&tandem_model::AddedTokenEntry>| {
            entry
                .map(|entry| {
                    let text = entry.content().to_string();
                    match inner.token_to_id(&text) {
                        Some(id) => Ok(SpecialToken { text, id }),
                        None => Err(TokenizerError::UnknownSpecialToken {
                            path: config_path.to_path_buf(),
                            field,
                            token: text,
                        }),
                    }
                })
                .transpose()
        };
        let bos = special("bos_token", config.bos_token.as_ref())?;
        let eos = special("eos_token", config.eos_token.as_ref())?;
        let mut stop_token_ids: Vec<u32> = generation_eos
            .into_iter()
            .chain(model_eos)
            .flat_map(TokenIds::to_vec)
            .chain(eos.as_ref().map(|t| t.id))
            .collect();
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        Ok(Self {
            inner,
            config,
            chat_template_file: None,
            bos,
            eos,
            stop_token_ids,
        })
    }

    /// Encodes a plain prompt the way `tokenizer(text)` does in transformers: the
    /// post-processor adds the special tokens the model expects (e.g. BOS for Llama).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    /// Encodes a prompt produced by the chat template, which already contains its special
    /// tokens as text: no BOS is added (`add_special_tokens=False`, as transformers'
    /// `apply_chat_template(tokenize=True)` does).
    pub fn encode_templated(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, false)
    }

    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text. `skip_special_tokens` drops added special tokens (the default for
    /// completions returned to clients, as in vLLM and TGI).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    pub fn bos_token(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos_token(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// Ids that end generation: `generation_config.json`'s `eos_token_id` ∪ `config.json`'s ∪
    /// the tokenizer's `eos_token`, sorted and without duplicates (Llama 3 Instruct, for one,
    /// ends turns with `<|eot_id|>`, listed only in generation_config).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_token_ids.binary_search(&id).is_ok()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary entry of `id` (byte-level BPE entries are in their `Ġ`-mapped form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes token `id` stands for, as OpenAI's logprobs `bytes` report them: a
    /// byte-fallback `<0xNN>` is that byte, a byte-level BPE piece is its bytes (possibly part
    /// of a character), a SentencePiece piece has `▁` as a space (kept even at the start,
    /// where a decode would strip it). `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if let Some(byte) = byte_fallback_value(&piece) {
            return Some(vec![byte]);
        }
        if piece.contains('▁') {
            return Some(piece.replace('▁', " ").into_bytes());
        }
        let text = self.inner.decode(&[id], false).ok()?;
        if !text.contains(char::REPLACEMENT_CHARACTER) {
            return Some(text.into_bytes());
        }
        // Byte-level BPE: every character of the piece stands for one byte.
        piece.chars().map(byte_level_byte).collect()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The model's chat template: `chat_template.jinja` when the directory has one (as
    /// transformers, which saves templates there since 4.43, gives it precedence), otherwise
    /// the default template of `tokenizer_config.json`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template_file
            .as_deref()
            .or_else(|| self.config.default_chat_template())
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The wrapped `tokenizers` tokenizer (the detokenizer decodes windows through it).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `<0xNN>` → `NN`.
fn byte_fallback_value(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the other 68
/// are mapped, in order, to U+0100 onwards.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let code = u32::from(c);
    if let Ok(byte) = u8::try_from(code) {
        return printable(byte).then_some(byte);
    }
    let index = code.checked_sub(256)? as usize;
    (0..=255u8).filter(|&b| !printable(b)).nth(index)
}

/// Reads a JSON file that may be absent; any other failure is an error naming the file.
fn read_optional<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(read_json(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tokenizers::{byte_level_bpe, sentencepiece_bpe};

    #[test]
    fn templated_prompts_get_no_second_bos() {
        let tokenizer = sentencepiece_bpe();
        let bos = tokenizer.bos_token().expect("has a BOS").clone();
        assert_eq!(bos.text, "<s>");
        let plain = tokenizer.encode("Hello world").unwrap();
        assert_eq!(
            plain[0], bos.id,
            "plain prompts get the post-processor's BOS"
        );
        assert_eq!(plain.iter().filter(|&&id| id == bos.id).count(), 1);

        // A chat template wrote `<s>` as text: it must become exactly one BOS id.
        let templated = tokenizer
            .encode_templated("<s>[INST] Hello world [/INST]")
            .unwrap();
        assert_eq!(templated[0], bos.id);
        assert_eq!(templated.iter().filter(|&&id| id == bos.id).count(), 1);
        assert_eq!(
            tokenizer.decode(&templated, true).unwrap(),
            "[INST] Hello world [/INST]"
        );
    }

    #[test]
    fn token_bytes_spell_the_text() {
        let text = "Hello wörld 🚀 你好";
        let byte_level = byte_level_bpe();
        let ids = byte_level.encode_with(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| byte_level.token_bytes(id).unwrap())
            .collect();
        assert_eq!(bytes, text.as_bytes());

        let sentencepiece = sentencepiece_bpe();
        let ids = sentencepiece.encode_with(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| sentencepiece.token_bytes(id).unwrap())
            .collect();
        // The normalizer's prepended `▁` is a space here.
        assert_eq!(bytes, format!(" {text}").as_bytes());
        assert_eq!(byte_level.token_bytes(u32::MAX), None);
    }

    #[test]
    fn stop_ids_are_the_union_of_all_sources() {
        let base = byte_level_bpe();
        let eos = base.token_to_id("<|im_end|>").unwrap();
        let config = TokenizerConfig {
            eos_token: Some(tandem_model::AddedTokenEntry::Text("<|im_end|>".into())),
            ..Default::default()
        };
        let tokenizer = TextTokenizer::from_parts(
            base.inner().clone(),
            config,
            Some(&TokenIds::Many(vec![7, eos, 5])),
            Some(&TokenIds::One(5)),
            Path::new("x"),
        )
        .unwrap();
        let mut expected = vec![5, 7, eos];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(tokenizer.stop_token_ids(), &expected[..]);
        assert!(tokenizer.is_stop_token(7) && tokenizer.is_stop_token(eos));
        assert!(!tokenizer.is_stop_token(6));
        assert_eq!(tokenizer.eos_token().unwrap().id, eos);
    }

    #[test]
    fn unknown_special_token_names_file_and_field() {
        let base = byte_level_bpe();
        let config = TokenizerConfig {
            bos_token: Some(tandem_model::AddedTokenEntry::Text("<nope>".into())),
            ..Default::default()
        };
        let err = TextTokenizer::from_parts(
            base.inner().clone(),
            config,
            None,
            None,
            Path::new("/m/tokenizer_config.json"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("/m/tokenizer_config.json")
                && message.contains("bos_token")
                && message.contains("<nope>"),
            "{message}"
        );
    }

    #[test]
    fn load_reads_every_file_of_a_model_directory() {
        let dir = std::env::temp_dir().join(format!("tandem-text-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = byte_level_bpe();
        base.inner().save(dir.join(TOKENIZER_FILE), false).unwrap();
        let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
        std::fs::write(
            dir.join(TOKENIZER_CONFIG_FILE),
            serde_json::json!({"chat_template": template, "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>", "special": true}})
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join(GENERATION_CONFIG_FILE),
            r#"{"eos_token_id": [0, 2]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join(CONFIG_FILE),
            r#"{"eos_token_id": 1, "model_type": "anything"}"#,
        )
        .unwrap();

        let tokenizer = TextTokenizer::load(&dir).unwrap();
        assert_eq!(tokenizer.chat_template(), Some(template));
        assert_eq!(tokenizer.bos_token().unwrap().text, "<|im_start|>");
        assert_eq!(tokenizer.stop_token_ids(), &[0, 1, 2]);
        assert_eq!(tokenizer.vocab_size(), base.vocab_size());
        assert_eq!(tokenizer.id_to_token(2).as_deref(), Some("<|im_end|>"));
        let ids = tokenizer.encode("Zürich 🚀").unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), "Zürich 🚀");

        // chat_template.jinja takes precedence over tokenizer_config.json's template.
        std::fs::write(dir.join(CHAT_TEMPLATE_FILE), "{{ 'from file' }}").unwrap();
        let tokenizer = TextTokenizer::load(&dir).unwrap();
        assert_eq!(tokenizer.chat_template(), Some("{{ 'from file' }}"));

        // Broken JSON names its file; a missing tokenizer.json names its path.
        std::fs::write(dir.join(GENERATION_CONFIG_FILE), "{").unwrap();
        let err = TextTokenizer::load(&dir).unwrap_err().to_string();
        assert!(err.contains(GENERATION_CONFIG_FILE), "{err}");
        std::fs::remove_file(dir.join(TOKENIZER_FILE)).unwrap();
        let err = TextTokenizer::load(&dir).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_FILE), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
