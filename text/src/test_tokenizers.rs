//! Small tokenizers built in memory for unit tests, so the text crate's tests need no model
//! directory: a byte-level BPE (GPT-2 / Llama 3 / SmolLM2 style) and a SentencePiece-style BPE
//! with metaspace and byte fallback (Llama 2 / Mistral style).

use std::path::Path;

use tandem_model::{AddedTokenEntry, TokenizerConfig};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, Tokenizer};

use crate::tokenizer::TextTokenizer;

/// Text with multi-byte characters frequent enough that training merges bytes *inside* them,
/// so tokens end in the middle of characters.
const CORPUS: &[&str] = &[
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "fn main() { println!(\"{}\", 1 + 2); } // code with    spaces\tand tabs",
    "Café crème brûlée, naïve façade, Ångström, Zürich, smörgåsbord.",
    "你好，世界。我们在学习分词器。今天天气很好。你好你好世界世界",
    "日本語のテキストも少し。こんにちは、世界！",
    "Emoji: 🚀🚀 🎉🎉 😀😀 👍🏽 🇫🇷 ❤️ — «quotes» … ½ ∑ ∞",
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم",
];

fn corpus() -> impl Iterator<Item = String> {
    // Repeat so the multi-byte pairs are frequent enough to be merged.
    (0..20).flat_map(|_| CORPUS.iter().map(|s| s.to_string()))
}

fn text_tokenizer(inner: Tokenizer, bos: Option<&str>, eos: Option<&str>) -> TextTokenizer {
    let config = TokenizerConfig {
        bos_token: bos.map(|t| AddedTokenEntry::Text(t.into())),
        eos_token: eos.map(|t| AddedTokenEntry::Text(t.into())),
        ..Default::default()
    };
    TextTokenizer::from_parts(inner, config, None, None, Path::new("<test tokenizer>"))
        .expect("test tokenizer's special tokens are in its vocabulary")
}

/// Byte-level BPE with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as special tokens.
pub(crate) fn byte_level_bpe() -> TextTokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(700)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus())
        .expect("training a small BPE succeeds");
    text_tokenizer(tokenizer, Some("<|im_start|>"), Some("<|im_end|>"))
}

/// SentencePiece-style BPE as Llama 2's tokenizer.json spells it: normalizer prepends `▁` and
/// maps spaces to `▁`, post-processor adds `<s>`, byte fallback to `<0xNN>`, decoder replace + byte fallback + fuse +
/// strip one leading space. Trained on the ASCII and accented lines only, so CJK and emoji go
/// through byte fallback.
pub(crate) fn sentencepiece_bpe() -> TextTokenizer {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let specials = ["<unk>", "<s>", "</s>"];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(300)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .build()
        .into();
    let latin = (0..20).flat_map(|_| CORPUS[..3].iter().map(|s| s.to_string()));
    tokenizer
        .train(&mut trainer, latin)
        .expect("training a small BPE succeeds");

    let mut json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).expect("serializes")).expect("valid JSON");
    let vocab = json["model"]["vocab"]
        .as_object_mut()
        .expect("BPE vocab is an object");
    for byte in 0..=255u32 {
        let next_id = vocab.len();
        vocab.insert(format!("<0x{byte:02X}>"), next_id.into());
    }
    json["model"]["byte_fallback"] = true.into();
    json["model"]["unk_token"] = "<unk>".into();
    json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    ]});
    json["pre_tokenizer"] = serde_json::Value::Null;
    json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    ]});
    // Llama's post-processor: `<s>` before every encoded sequence with special tokens.
    let bos_id = json["added_tokens"]
        .as_array()
        .and_then(|tokens| tokens.iter().find(|t| t["content"] == "<s>"))
        .map(|t| t["id"].clone())
        .expect("<s> is an added token");
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]}}
    });
    let inner: Tokenizer = json
        .to_string()
        .parse()
        .expect("edited tokenizer.json loads");
    text_tokenizer(inner, Some("<s>"), Some("</s>"))
}
