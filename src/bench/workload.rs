//! The synthetic prompts a benchmark sends (words, or random token ids, of a given length)
//! and prompt files.

use std::ops::Range;
use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

/// What a synthetic prompt is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptUnits {
    /// Common English words, about one token each: lengths are approximate; any endpoint.
    Words,
    /// Random token ids from the range: lengths are exact token counts; completions only.
    TokenIds(Range<u32>),
}

/// Common English words: synthetic prompts are random sequences of them, so that a BPE
/// tokenizer sees about one token per word (the server's `usage` reports the real count).
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as", "by", "at",
    "from", "his", "her", "they", "which", "or", "this", "had", "not", "are", "but", "one", "all",
    "were", "when", "there", "can", "more", "time", "about", "many", "then", "them", "would",
    "write", "like", "these", "long", "make", "thing", "see", "two", "look", "day", "could",
    "come", "number", "sound", "most", "people", "water", "over", "know", "than", "call", "first",
    "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take",
    "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man",
    "year", "came", "show", "every", "good", "give", "our", "under", "name", "very", "through",
    "just", "form", "great", "think", "say", "help", "low", "line", "turn", "cause", "much",
    "mean", "before", "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three",
    "want", "air", "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port",
    "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow",
    "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house",
    "picture", "try", "again", "animal", "point", "mother", "world", "near", "build", "self",
    "earth", "father", "head", "stand", "own", "page", "should", "country", "found", "answer",
    "school", "grow", "study", "still", "learn", "plant", "cover", "food", "sun", "four",
    "between", "state", "keep", "eye", "never", "last", "let", "thought", "city", "tree", "cross",
    "farm", "hard", "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run",
    "while", "press", "close", "night", "real", "life", "few", "north", "open", "seem", "together",
    "next", "white",
];

/// `count` prompts of `words` words each, reproducible from `seed`.
pub fn synthetic(count: usize, words: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| random_words(&mut rng, words.max(1)))
        .collect()
}

/// `count` words drawn from [`WORDS`], space-separated.
pub(super) fn random_words(rng: &mut ChaCha8Rng, count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[(rng.next_u32() as usize) % WORDS.len()]);
    }
    text
}

/// `count` token ids drawn uniformly from `ids`.
pub(super) fn random_ids(rng: &mut ChaCha8Rng, count: usize, ids: &Range<u32>) -> Vec<u32> {
    let span = (ids.end - ids.start).max(1);
    (0..count)
        .map(|_| ids.start + rng.next_u32() % span)
        .collect()
}

/// Puts `items` in a random order (Fisher-Yates; the modulo's bias is far below what a
/// benchmark's order could notice).
pub(super) fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// `count` prompts of exactly `tokens` token ids each, drawn uniformly from `ids` and
/// reproducible from `seed`: the synthetic datasets of TensorRT-LLM's and vLLM's throughput
/// benchmarks (random token ids of a fixed input length).
pub fn synthetic_tokens(count: usize, tokens: usize, ids: Range<u32>, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| random_ids(&mut rng, tokens.max(1), &ids))
        .collect()
}

/// Prompts from a JSON file: a list of strings, a list of `{"prompt": ...}` objects, or
/// ShareGPT-style `{"conversations": [{"from"|"role": ..., "value"|"content": ...}, ...]}`
/// records (the first turn is the prompt).
pub fn from_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let items = value
        .as_array()
        .ok_or_else(|| format!("{}: expected a JSON list of prompts", path.display()))?;
    let prompts: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            prompt_of(item)
                .ok_or_else(|| format!("{}: entry {i} has no prompt text", path.display()))
        })
        .collect::<Result<_, _>>()?;
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(prompts)
}

fn prompt_of(item: &Value) -> Option<String> {
    if let Some(s) = item.as_str() {
        return Some(s.to_owned());
    }
    if let Some(s) = item["prompt"].as_str() {
        return Some(s.to_owned());
    }
    let first = item["conversations"].get(0)?;
    first["value"]
        .as_str()
        .or_else(|| first["content"].as_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prompts_have_the_length_stay_in_range_and_repeat_with_the_seed() {
        let a = synthetic_tokens(3, 2048, 1000..30_000, 5);
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|p| p.len() == 2048));
        assert!(a.iter().flatten().all(|&t| (1000..30_000).contains(&t)));
        assert_eq!(a, synthetic_tokens(3, 2048, 1000..30_000, 5));
        assert_ne!(a[0], a[1]);
        assert_ne!(a, synthetic_tokens(3, 2048, 1000..30_000, 6));
    }

    #[test]
    fn synthetic_prompts_have_the_length_and_repeat_with_the_seed() {
        let a = synthetic(3, 50, 1);
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|p| p.split(' ').count() == 50));
        assert_eq!(a, synthetic(3, 50, 1));
        assert_ne!(a, synthetic(3, 50, 2));
    }

    #[test]
    fn shuffling_keeps_every_item_and_repeats_with_the_seed() {
        let shuffled = |seed| {
            let mut items: Vec<u32> = (0..100).collect();
            shuffle(&mut items, &mut ChaCha8Rng::seed_from_u64(seed));
            items
        };
        let a = shuffled(3);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled(3));
        assert_ne!(a, shuffled(4));
    }

    #[test]
    fn prompt_files_in_three_shapes() {
        let dir = std::env::temp_dir().join(format!("tandem-bench-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.json");
        std::fs::write(
            &file,
            r#"["plain", {"prompt": "object"}, {"conversations": [{"from": "human", "value": "sharegpt"}, {"from": "gpt", "value": "x"}]}]"#,
        )
        .unwrap();
        assert_eq!(from_file(&file).unwrap(), ["plain", "object", "sharegpt"]);
        std::fs::write(&file, r#"[{"nothing": 1}]"#).unwrap();
        assert!(
            from_file(&file)
                .unwrap_err()
                .contains("entry 0 has no prompt")
        );
        std::fs::write(&file, "[]").unwrap();
        assert!(from_file(&file).unwrap_err().contains("no prompts"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
