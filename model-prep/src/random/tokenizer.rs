//! A synthetic byte-level BPE tokenizer of any vocabulary size, for random-weight models.
//!
//! A random model still needs a tokenizer the workers can load, whose ids all fall inside the
//! embedding table, that turns any text into ids and back, and that has the ChatML special
//! tokens the default model uses (so `--chat` works the same on both). The vocabulary is:
//!
//! - ids 0, 1, 2: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (SmolLM2's ids, so the
//!   presets' bos = 1 and eos = 2 stay meaningful);
//! - ids 3..259: the 256 bytes, in GPT-2's byte-to-unicode alphabet, so every string is
//!   encodable and `decode(encode(text)) == text`;
//! - then merged tokens made up procedurally, deterministically: the strings a GPT-2
//!   pre-tokenizer can put in one piece (" the", "ing", "123", "...") in order of a simple
//!   character-frequency model, until the vocabulary has exactly the requested size.
//!
//! English text splits into pieces of two to four characters (a real 32k-vocabulary tokenizer
//! averages about four), so benchmark prompts have the same order of length in tokens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use tandem_model::{AddedTokenEntry, TokenizerConfig};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// `<|endoftext|>`: padding and unknown.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// `<|im_start|>`: opens a ChatML message; also the bos token, as in SmolLM2.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`: closes a ChatML message; the eos token.
pub const IM_END: &str = "<|im_end|>";

/// Special tokens, at ids 0, 1, 2.
pub const SPECIAL_TOKENS: [&str; 3] = [END_OF_TEXT, IM_START, IM_END];
pub const END_OF_TEXT_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// The smallest vocabulary: the special tokens and the 256 bytes, no merges.
pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

/// ChatML without a default system prompt: `<|im_start|>{role}\n{content}<|im_end|>\n`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Characters merges are made of, most useful first: the order fixes which merges a small
/// vocabulary keeps. Printable ASCII missing here is appended in code-point order.
const MERGE_CHAR_PRIORITY: &str =
    " etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789\n.,'\"-:;!?()";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "vocabulary size {requested} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} ids"
    )]
    TooSmall { requested: usize },
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
}

/// The tokenizer files of a random model.
#[derive(Debug, Clone)]
pub struct SyntheticTokenizer {
    /// `tokenizer.json`, serialized by the `tokenizers` crate.
    pub tokenizer_json: String,
    pub tokenizer_config: TokenizerConfig,
}

/// Builds a tokenizer whose vocabulary has exactly `vocab_size` ids.
/// `model_max_length` goes into `tokenizer_config.json`.
pub fn build(
    vocab_size: usize,
    model_max_length: u64,
) -> Result<SyntheticTokenizer, TokenizerError> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(TokenizerError::TooSmall {
            requested: vocab_size,
        });
    }
    let byte_chars = bytes_to_unicode();
    let mut vocab = Vocab::default();
    for token in SPECIAL_TOKENS {
        vocab.insert(token.to_string(), vocab.len() as u32);
    }
    for ch in &byte_chars {
        vocab.insert(ch.to_string(), vocab.len() as u32);
    }
    let tokens = merged_tokens(vocab_size - vocab.len());
    for token in &tokens {
        let text: String = token.iter().map(|&b| byte_chars[b as usize]).collect();
        vocab.insert(text, vocab.len() as u32);
    }
    let merges = merges_for(&tokens, &byte_chars);
    debug_assert_eq!(vocab.len(), vocab_size);

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // No prefix space: "Hello" and " Hello" stay different, as in GPT-2 style vocabularies.
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, false, true)));
    tokenizer
        .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let actual = tokenizer.get_vocab_size(true);
    if actual != vocab_size {
        return Err(TokenizerError::Build(format!(
            "built {actual} ids instead of {vocab_size}"
        )));
    }
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut other = std::collections::BTreeMap::new();
    other.insert(
        "clean_up_tokenization_spaces".to_string(),
        serde_json::Value::Bool(false),
    );
    let tokenizer_config = TokenizerConfig {
        chat_template: Some(serde_json::Value::String(CHAT_TEMPLATE.to_string())),
        bos_token: Some(AddedTokenEntry::Text(IM_START.to_string())),
        eos_token: Some(AddedTokenEntry::Text(IM_END.to_string())),
        unk_token: Some(AddedTokenEntry::Text(END_OF_TEXT.to_string())),
        pad_token: Some(AddedTokenEntry::Text(END_OF_TEXT.to_string())),
        add_bos_token: Some(false),
        add_eos_token: Some(false),
        model_max_length: Some(model_max_length),
        tokenizer_class: Some("GPT2Tokenizer".to_string()),
        other,
    };
    Ok(SyntheticTokenizer {
        tokenizer_json,
        tokenizer_config,
    })
}

/// A string to consider: (its weight, its bytes, index in `order` of its last byte, the
/// weight of the string without that byte).
type Candidate = (u128, Vec<u8>, usize, u128);

/// The `count` most likely merged tokens (as the bytes they stand for), most likely first.
///
/// A string's weight is the product of its characters' weights, Zipf-like by their rank in
/// [`MERGE_CHAR_PRIORITY`] (`rank + 2`, smaller is likelier; integers, so the result is the
/// same everywhere). Only strings a GPT-2 pre-tokenizer can put in one piece are kept. Every
/// substring of a string weighs less than the string, so a token's parts always come before it.
/// Best-first search over "string + one more character", expanding lazily: popping
/// `left + order[i]` pushes its sibling `left + order[i + 1]` and, when kept, its first child.
fn merged_tokens(count: usize) -> Vec<Vec<u8>> {
    let mut order: Vec<u8> = MERGE_CHAR_PRIORITY.bytes().collect();
    for byte in 0x20u8..0x7f {
        if !order.contains(&byte) {
            order.push(byte);
        }
    }
    let weight = |index: usize| index as u128 + 2;
    // (weight of the string, the string, index in `order` of its last char, weight of `left`)
    let mut heap: BinaryHeap<Reverse<Candidate>> = order
        .iter()
        .enumerate()
        .map(|(i, &c)| Reverse((weight(i) * weight(0), vec![c, order[0]], 0, weight(i))))
        .collect();
    let mut tokens = Vec::with_capacity(count);
    while tokens.len() < count {
        let Some(Reverse((score, merged, last, left_score))) = heap.pop() else {
            break;
        };
        if last + 1 < order.len() {
            let mut sibling = merged.clone();
            *sibling
                .last_mut()
                .expect("merged strings have two or more bytes") = order[last + 1];
            heap.push(Reverse((
                left_score * weight(last + 1),
                sibling,
                last + 1,
                left_score,
            )));
        }
        if is_pretoken_shape(&merged) {
            let mut child = merged.clone();
            child.push(order[0]);
            heap.push(Reverse((score * weight(0), child, 0, score)));
            tokens.push(merged);
        }
    }
    tokens
}

/// The merges that build `tokens`, in their order: one per split of a token into two parts
/// that are both in the vocabulary. BPE applies the lowest-ranked adjacent pair first, so
/// "the" may become "t" + "he" as well as "th" + "e"; listing every split lets both paths
/// reach the whole token.
fn merges_for(tokens: &[Vec<u8>], byte_chars: &[char]) -> Vec<(String, String)> {
    let known: HashSet<&[u8]> = tokens.iter().map(Vec::as_slice).collect();
    let in_vocab = |part: &[u8]| part.len() == 1 || known.contains(part);
    let as_token =
        |bytes: &[u8]| -> String { bytes.iter().map(|&b| byte_chars[b as usize]).collect() };
    let mut merges = Vec::new();
    for token in tokens {
        for split in (1..token.len()).rev() {
            let (left, right) = token.split_at(split);
            if in_vocab(left) && in_vocab(right) {
                merges.push((as_token(left), as_token(right)));
            }
        }
    }
    merges
}

/// Whether GPT-2's pre-tokenizer regex can yield `bytes` as (a prefix of) one piece.
fn is_pretoken_shape(bytes: &[u8]) -> bool {
    let body = bytes.strip_prefix(b" ").unwrap_or(bytes);
    let all = |pred: fn(&u8) -> bool| !body.is_empty() && body.iter().all(pred);
    let same_whitespace = bytes.iter().all(|&b| b == bytes[0]) && bytes[0].is_ascii_whitespace();
    same_whitespace
        || all(u8::is_ascii_alphabetic)
        || all(u8::is_ascii_digit)
        || all(|b| b.is_ascii_punctuation())
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to code points from U+0100 upwards (space becomes `Ġ`).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next_extra = 0x100u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                let code = next_extra;
                next_extra += 1;
                code
            };
            char::from_u32(code).expect("code points below U+0200 are valid chars")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vocab_size: usize) -> Tokenizer {
        let files = build(vocab_size, 1024).unwrap();
        files.tokenizer_json.parse().unwrap()
    }

    const SAMPLES: &[&str] = &[
        "Hello, world!",
        "  leading spaces, trailing spaces   ",
        "tabs\tand\nnewlines\r\n\n",
        "digits 0123456789 and 3.14159",
        "accents: déjà vu, naïve, Ærøskøbing",
        "CJK: 你好，世界。日本語のテキスト",
        "emoji: 🦀🚀👩‍💻",
        "code: fn main() { println!(\"{}\", x[0] >> 2); }",
        "<|im_start|>user\nhi<|im_end|>\n",
        "",
    ];

    #[test]
    fn round_trips_text_and_ids_stay_in_range() {
        for vocab_size in [MIN_VOCAB_SIZE, 512, 32000] {
            let tokenizer = load(vocab_size);
            assert_eq!(tokenizer.get_vocab_size(true), vocab_size);
            for text in SAMPLES {
                let encoding = tokenizer.encode(*text, false).unwrap();
                let ids = encoding.get_ids();
                assert!(
                    ids.iter().all(|&id| (id as usize) < vocab_size),
                    "{text:?}: {ids:?}"
                );
                let decoded = tokenizer.decode(ids, false).unwrap();
                assert_eq!(&decoded, text, "vocab {vocab_size}");
            }
        }
    }

    #[test]
    fn special_tokens_have_fixed_ids() {
        let tokenizer = load(512);
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(token), Some(id as u32));
        }
        let ids = tokenizer
            .encode("<|im_start|>user\nhi<|im_end|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids.first(), Some(&BOS_ID));
        assert_eq!(ids.last(), Some(&EOS_ID));
    }

    #[test]
    fn merges_shorten_text_and_are_deterministic() {
        let tokenizer = load(32000);
        let text = "the quick brown fox jumps over the lazy dog";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().len();
        assert!(
            ids < text.len() / 2,
            "{ids} tokens for {} bytes",
            text.len()
        );
        assert_eq!(
            build(4096, 1024).unwrap().tokenizer_json,
            build(4096, 1024).unwrap().tokenizer_json
        );
    }

    #[test]
    fn too_small_vocabulary_is_an_error() {
        let err = build(100, 1024).unwrap_err();
        assert!(err.to_string().contains("at least 259"), "{err}");
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let chars = bytes_to_unicode();
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        assert_eq!(chars[b'a' as usize], 'a');
        let unique: HashSet<char> = chars.iter().copied().collect();
        assert_eq!(unique.len(), 256);
        assert_eq!(unique, ByteLevel::alphabet().into_iter().collect());
    }
}
