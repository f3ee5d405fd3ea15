//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the GPT-2 byte alphabet, the BPE model and
//! the pre-tokenizer named by `tokenizer.ggml.pre`.
//!
//! transformers builds these as `GPT2Tokenizer(vocab, merges)` and then, for the pre-tokenizers
//! in its table, replaces GPT-2's split with a `Split(regex) + ByteLevel(use_regex=false)`
//! sequence; we produce the same components.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::TokenizerBuildError;

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards in byte order.
pub(super) fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let spelled = char::from_u32(next_extra)
                .expect("invariant: U+0100..U+0143 are valid scalar values");
            next_extra += 1;
            spelled
        };
    }
    table
}

/// Whether every character of `token` is in the byte alphabet, i.e. the token is already spelled
/// the byte-level way (real byte-level vocabularies always are).
pub(super) fn is_byte_spelled(token: &str, alphabet: &[char; 256]) -> bool {
    token.chars().all(|c| alphabet.contains(&c))
}

/// The token as the BPE model must store it. A token spelled with characters outside the byte
/// alphabet (llama.cpp writes some added tokens with real spaces) is respelled from its UTF-8
/// bytes, as transformers does, so that it can still be produced from text.
pub(super) fn model_spelling(token: &str, alphabet: &[char; 256]) -> String {
    if is_byte_spelled(token, alphabet) {
        token.to_owned()
    } else {
        token.bytes().map(|b| alphabet[b as usize]).collect()
    }
}

/// Split regex of Llama 3 and the vocabularies derived from it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's: Qwen2's with combining marks kept inside words.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// OpenAI's o200k (GPT-4o), also used by Llama 4.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text is split before BPE, per `tokenizer.ggml.pre`.
///
/// The table is transformers' (`integrations/gguf/gguf_tokenizer_mapping.py`), which uses the
/// regexes of the models' own `tokenizer.json` files. `gpt2`, `smollm` and `default` keep GPT-2's
/// built-in split, as transformers does. For `smollm` llama.cpp also splits digits one by one;
/// SmolLM's vocabulary has no merge involving a digit, so both give the same ids. For `default`
/// llama.cpp uses other regexes (punctuation runs and digits split apart), so on such text its
/// ids differ from transformers' and ours.
const PRE_TOKENIZERS: &[(&str, Option<&str>)] = &[
    ("default", None),
    ("gpt2", None),
    ("smollm", None),
    ("llama-bpe", Some(LLAMA3_SPLIT)),
    ("llama3", Some(LLAMA3_SPLIT)),
    ("llama-v3", Some(LLAMA3_SPLIT)),
    ("falcon3", Some(LLAMA3_SPLIT)),
    ("falcon-h1", Some(LLAMA3_SPLIT)),
    ("pixtral", Some(LLAMA3_SPLIT)),
    ("midm-2.0", Some(LLAMA3_SPLIT)),
    ("lfm2", Some(LLAMA3_SPLIT)),
    ("dbrx", Some(LLAMA3_SPLIT)),
    ("smaug-bpe", Some(LLAMA3_SPLIT)),
    ("qwen2", Some(QWEN2_SPLIT)),
    ("deepseek-r1-qwen", Some(QWEN2_SPLIT)),
    ("megrez", Some(QWEN2_SPLIT)),
    ("qwen35", Some(QWEN35_SPLIT)),
    ("tekken", Some(TEKKEN_SPLIT)),
    ("gpt-4o", Some(GPT4O_SPLIT)),
    ("llama4", Some(GPT4O_SPLIT)),
    ("minimax-m2", Some(GPT4O_SPLIT)),
];

/// The names [`pre_tokenizer`] accepts, for error messages.
pub(super) fn supported_pre_tokenizers() -> String {
    PRE_TOKENIZERS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `pre_tokenizer` section of tokenizer.json for `pre` (absent = "default").
pub(super) fn pre_tokenizer(pre: Option<&str>) -> Result<Value, TokenizerBuildError> {
    let name = pre.unwrap_or("default");
    let split = PRE_TOKENIZERS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, split)| *split)
        .ok_or_else(|| TokenizerBuildError::UnknownPre {
            pre: name.to_owned(),
            supported: supported_pre_tokenizers(),
        })?;
    Ok(match split {
        None => byte_level_step(true),
        Some(regex) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level_step(false),
            ],
        }),
    })
}

fn byte_level_step(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The `decoder` section: bytes back from the alphabet.
pub(super) fn decoder() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
}

/// The `model` section: BPE over the respelled vocabulary. `vocab` maps each model spelling to
/// its id (a later duplicate wins, as in transformers' dict).
pub(super) fn model(vocab: &HashMap<String, u32>, merges: &[(String, String)]) -> Value {
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": false,
        "byte_fallback": false,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges.iter().map(|(l, r)| [l, r]).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_matches_gpt2() {
        let alphabet = byte_alphabet();
        assert_eq!(alphabet[b' ' as usize], 'Ġ');
        assert_eq!(alphabet[b'\n' as usize], 'Ċ');
        assert_eq!(alphabet[b'\t' as usize], 'ĉ');
        assert_eq!(alphabet[b'A' as usize], 'A');
        assert_eq!(alphabet[0xAD], 'Ń');
        assert_eq!(alphabet[0xE9], 'é');
        let distinct: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn respells_tokens_outside_the_alphabet() {
        let alphabet = byte_alphabet();
        assert_eq!(model_spelling("ĠHello", &alphabet), "ĠHello");
        assert_eq!(model_spelling("<a b>", &alphabet), "<aĠb>");
        assert_eq!(model_spelling("日", &alphabet), "æĹ¥");
    }

    #[test]
    fn unknown_pre_lists_supported() {
        let err = pre_tokenizer(Some("nonesuch")).expect_err("unknown pre must fail");
        let message = err.to_string();
        assert!(message.contains("nonesuch"), "{message}");
        assert!(
            message.contains("llama-bpe") && message.contains("qwen2"),
            "{message}"
        );
    }
}
