//! SentencePiece-style vocabularies (`tokenizer.ggml.model = "llama"`): pieces spelled with `▁`
//! for spaces, byte tokens `<0x00>`..`<0xFF>` for byte fallback, and scores instead of merges.
//!
//! transformers loads these as a BPE with byte fallback (its `LlamaTokenizer`), with the merges
//! recovered from the scores when the file has none ([`merges_from_scores`]); we build the same.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{Value, json};

/// The SentencePiece space marker.
const SPACE_MARKER: &str = "\u{2581}";

/// Merges implied by a vocabulary and its scores, in priority order.
///
/// Every way of cutting a token into two tokens of the vocabulary is a merge, with that token's
/// score; merges are ordered by score, then by the lengths of their halves (longest first), ties
/// kept in vocabulary order. This is transformers' `generate_merges`, replicated exactly
/// (including which duplicate of a repeated token wins) because a different order gives
/// different ids.
pub(super) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // Python's `{token: index}`: a later duplicate's id wins.
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.as_str(), id))
        .collect();
    // Python's `dict(zip(tokens, scores))`: first position, last score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token.as_str(), score).is_none() {
            order.push(token.as_str());
        }
    }

    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Candidate> = Vec::new();
    for token in order {
        let score = score_of[token];
        let start = merges.len();
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push(Candidate {
                    left,
                    right,
                    score,
                    left_chars: left.chars().count(),
                    right_chars: right.chars().count(),
                });
            }
        }
        merges[start..].sort_by_key(|m| (ids[m.left], ids[m.right]));
    }
    // Stable sort, descending: equal keys keep their order, as with Python's `reverse=True`.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_owned(), m.right.to_owned()))
        .collect()
}

/// The `pre_tokenizer` section: spaces become `▁`, and with `add_space_prefix` one is put in
/// front of the text.
///
/// transformers always prepends ("first": only when the text does not already start with `▁`,
/// its non-legacy Llama behaviour) and ignores `add_space_prefix = false`. We follow it when the
/// flag is true, but honour false ("never"), as llama.cpp and the SentencePiece model itself do:
/// ignoring it would change the first token of every input of a model trained without the prefix.
///
/// With the prefix, llama.cpp differs from transformers (and so from us) in two places: it adds
/// `▁` even when the text already starts with a space, and it adds one after every special token
/// too, not just at the start of the text.
pub(super) fn pre_tokenizer(add_space_prefix: bool) -> Value {
    json!({
        "type": "Metaspace",
        "replacement": SPACE_MARKER,
        "prepend_scheme": if add_space_prefix { "first" } else { "never" },
        "split": false,
    })
}

/// The `decoder` section: `▁` back to spaces, byte tokens back to bytes, and the prefix space
/// removed again when one was added.
pub(super) fn decoder(add_space_prefix: bool) -> Value {
    let mut steps = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE_MARKER}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": steps})
}

/// The `model` section: BPE with byte fallback. No unknown token in the model, as transformers
/// builds it: every byte has a token, so nothing is unknown.
pub(super) fn model(vocab: &HashMap<String, u32>, merges: &[(String, String)]) -> Value {
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": true,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges.iter().map(|(l, r)| [l, r]).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc", "▁", "▁ab"]);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, 0.0, -0.5];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("▁", "ab"),
                ("a", "b"),
                ("b", "c"),
                // "abc" = "ab"+"c" and "a"+"bc": same score, the longer left half first.
                ("ab", "c"),
                ("a", "bc"),
            ]
        );
    }

    #[test]
    fn equal_keys_keep_vocabulary_order() {
        let tokens = strings(&["x", "y", "yx", "xy"]);
        let merges = merges_from_scores(&tokens, &[0.0, 0.0, -1.0, -1.0]);
        assert_eq!(
            merges,
            vec![
                ("y".to_string(), "x".to_string()),
                ("x".to_string(), "y".to_string())
            ]
        );
    }

    #[test]
    fn no_prefix_means_never_prepend_and_no_strip() {
        assert_eq!(pre_tokenizer(false)["prepend_scheme"], "never");
        assert_eq!(pre_tokenizer(true)["prepend_scheme"], "first");
        assert_eq!(decoder(false)["decoders"].as_array().map(Vec::len), Some(3));
        assert_eq!(decoder(true)["decoders"].as_array().map(Vec::len), Some(4));
    }
}
