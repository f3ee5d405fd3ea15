//! Special tokens: which tokens are matched whole in the text (added tokens), the BOS/EOS
//! template, the ids that end generation, and `tokenizer_config.json`.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::{Value, json};
use tandem_model::AddedTokenEntry;
use tandem_model::TokenizerConfig;

use super::GgufVocab;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A token matched whole in the input before the model sees the text.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AddedToken {
    pub id: u32,
    pub content: String,
    /// Special tokens are skipped by `decode(.., skip_special_tokens = true)`.
    pub special: bool,
}

/// The added tokens, in the order and with the flags transformers gives them:
///
/// 1. control tokens (type 3) as special tokens; in a byte-level vocabulary only those spelled in
///    the byte alphabet (a control token spelled otherwise is a llama.cpp mislabel);
/// 2. user-defined tokens (type 4, like `<think>`) as plain added tokens, when the model's
///    vocabulary has them under that spelling;
/// 3. the named BOS/EOS/UNK/PAD tokens not added yet, as special tokens.
///
/// None is normalized, so they match the raw text. Each gets the id the model's vocabulary has
/// for it (`model_vocab`). transformers' GGUF loader also adds its tokenizer classes' default
/// special tokens (`<|endoftext|>`, `<s>`, ...) with new ids past the vocabulary when a file
/// lacks them; we do not: those ids would be outside the model's embedding.
pub(super) fn added_tokens(
    vocab: &GgufVocab,
    model_vocab: &HashMap<String, u32>,
    byte_alphabet: Option<&[char; 256]>,
) -> Vec<AddedToken> {
    let mut added: Vec<AddedToken> = Vec::new();
    let mut contents: HashSet<String> = HashSet::new();
    let mut add = |content: &str, special: bool| {
        if contents.contains(content) {
            return;
        }
        if let Some(&id) = model_vocab.get(content) {
            contents.insert(content.to_owned());
            added.push(AddedToken {
                id,
                content: content.to_owned(),
                special,
            });
        }
    };

    let types = vocab.token_types.as_deref().unwrap_or(&[]);
    for (token, &kind) in vocab.tokens.iter().zip(types) {
        let spelled = byte_alphabet.is_none_or(|a| super::byte_level::is_byte_spelled(token, a));
        if kind == TOKEN_TYPE_CONTROL && spelled {
            add(token, true);
        }
    }
    for (token, &kind) in vocab.tokens.iter().zip(types) {
        if kind == TOKEN_TYPE_USER_DEFINED {
            add(token, false);
        }
    }
    for id in [
        vocab.bos_token_id,
        vocab.eos_token_id,
        vocab.unknown_token_id,
        vocab.padding_token_id,
    ]
    .into_iter()
    .flatten()
    {
        add(&vocab.tokens[id as usize], true);
    }
    added.sort_by_key(|token| token.id);
    added
}

pub(super) fn added_tokens_json(added: &[AddedToken]) -> Value {
    added
        .iter()
        .map(|token| {
            json!({
                "id": token.id,
                "content": token.content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": token.special,
            })
        })
        .collect()
}

/// Whether BOS/EOS are put around each encoded text, as transformers decides: the file's flags;
/// without `add_bos_token`, a SentencePiece vocabulary gets BOS (llama.cpp's default for it) and
/// a byte-level one does not.
pub(super) fn add_bos_eos(vocab: &GgufVocab) -> (bool, bool) {
    let add_bos = vocab.add_bos_token.unwrap_or(vocab.model == "llama");
    let add_eos = vocab.add_eos_token.unwrap_or(false);
    (add_bos, add_eos)
}

/// The `post_processor` section: a `TemplateProcessing` that adds BOS and/or EOS, the same
/// template transformers' `update_post_processor` writes (also when it adds nothing).
/// `bos`/`eos` are (token, id); a flag whose token is absent adds nothing.
pub(super) fn post_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
    add_bos: bool,
    add_eos: bool,
) -> Value {
    let bos = bos.filter(|_| add_bos);
    let eos = eos.filter(|_| add_eos);
    let special = |(token, _): (&str, u32), type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id, pieces) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        pieces.extend(bos.map(|b| special(b, type_id)));
        pieces.push(sequence(name, type_id));
        pieces.extend(eos.map(|e| special(e, type_id)));
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let special_tokens: serde_json::Map<String, Value> = [bos, eos]
        .into_iter()
        .flatten()
        .map(|(token, id)| {
            (
                token.to_owned(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            )
        })
        .collect();
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// Texts of tokens that end a turn or a document, from llama.cpp's end-of-generation heuristic
/// (`llama_vocab::impl::load`): GGUF files name one EOS (and sometimes an EOT), but chat models
/// stop on several tokens.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// The ids that end generation, for `generation_config.json`'s `eos_token_id`: the EOS id, then
/// the EOT id, then every token of the vocabulary whose text is one of llama.cpp's
/// end-of-generation markers (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, `<|end|>`,
/// `<end_of_turn>`, `<|eom_id|>`, ...), without duplicates.
///
/// The GGUF's single `eos_token_id` is not enough: a chat model ends its turn with a marker that
/// is often not the file's EOS (Llama 3 files set EOS to `<|end_of_text|>` but the assistant
/// turn ends with `<|eot_id|>`; some ChatML GGUFs set EOS to `<|endoftext|>` or even
/// `<|im_start|>`), and generation that only stopped on EOS would run past the end of the
/// answer. llama.cpp stops on this whole set; so do we.
pub(super) fn end_of_generation_ids(vocab: &GgufVocab) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    for id in [vocab.eos_token_id, vocab.eot_token_id]
        .into_iter()
        .flatten()
    {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let markers: BTreeSet<u32> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter(|(_, token)| END_OF_GENERATION_TEXTS.contains(&token.as_str()))
        .map(|(id, _)| id as u32)
        .collect();
    for id in markers {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// `tokenizer_config.json`: the chat template, the named special tokens as the file spells them,
/// and the BOS/EOS flags. The class is `PreTrainedTokenizerFast`, which makes transformers (4
/// and 5) load `tokenizer.json` as written instead of rebuilding it.
pub(super) fn tokenizer_config(vocab: &GgufVocab, add_bos: bool, add_eos: bool) -> TokenizerConfig {
    let entry =
        |id: Option<u32>| id.map(|id| AddedTokenEntry::Text(vocab.tokens[id as usize].clone()));
    TokenizerConfig {
        chat_template: vocab.chat_template.clone().map(Value::String),
        bos_token: entry(vocab.bos_token_id),
        eos_token: entry(vocab.eos_token_id),
        unk_token: entry(vocab.unknown_token_id),
        pad_token: entry(vocab.padding_token_id),
        add_bos_token: Some(add_bos),
        add_eos_token: Some(add_eos),
        model_max_length: None,
        tokenizer_class: Some("PreTrainedTokenizerFast".to_owned()),
        other: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml_vocab() -> GgufVocab {
        GgufVocab {
            model: "gpt2".into(),
            tokens: [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "a",
                "<x y>",
                "<think>",
            ]
            .map(String::from)
            .to_vec(),
            token_types: Some(vec![3, 3, 3, 1, 3, 4]),
            bos_token_id: Some(1),
            eos_token_id: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn eos_ids_include_end_of_turn_markers() {
        let vocab = chatml_vocab();
        // EOS first (as the file says), then the markers in id order.
        assert_eq!(end_of_generation_ids(&vocab), vec![1, 0, 2]);
        let vocab = GgufVocab {
            eos_token_id: Some(2),
            eot_token_id: Some(2),
            ..chatml_vocab()
        };
        assert_eq!(end_of_generation_ids(&vocab), vec![2, 0]);
    }

    #[test]
    fn control_tokens_outside_the_byte_alphabet_are_not_added() {
        let vocab = chatml_vocab();
        let model_vocab: HashMap<String, u32> = [
            ("<|endoftext|>", 0),
            ("<|im_start|>", 1),
            ("<|im_end|>", 2),
            ("a", 3),
            ("<xĠy>", 4),
            ("<think>", 5),
        ]
        .map(|(t, i)| (t.to_string(), i))
        .into_iter()
        .collect();
        let alphabet = super::super::byte_level::byte_alphabet();
        let added = added_tokens(&vocab, &model_vocab, Some(&alphabet));
        let summary: Vec<(u32, &str, bool)> = added
            .iter()
            .map(|t| (t.id, t.content.as_str(), t.special))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "<|endoftext|>", true),
                (1, "<|im_start|>", true),
                (2, "<|im_end|>", true),
                (5, "<think>", false),
            ]
        );
    }

    #[test]
    fn template_adds_bos_and_eos_as_asked() {
        let none = post_processor(Some(("<s>", 1)), Some(("</s>", 2)), false, false);
        assert_eq!(none["single"].as_array().map(Vec::len), Some(1));
        assert_eq!(none["special_tokens"], json!({}));
        let both = post_processor(Some(("<s>", 1)), Some(("</s>", 2)), true, true);
        assert_eq!(both["single"].as_array().map(Vec::len), Some(3));
        assert_eq!(both["pair"].as_array().map(Vec::len), Some(6));
        assert_eq!(both["special_tokens"]["</s>"]["ids"], json!([2]));
        let no_token = post_processor(None, None, true, true);
        assert_eq!(no_token["single"].as_array().map(Vec::len), Some(1));
    }
}
