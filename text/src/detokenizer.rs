//! Incremental detokenization: turns generated ids into text deltas as they arrive, never
//! emitting a broken character.
//!
//! A token need not end on a character boundary: byte-level BPE (GPT-2, Llama 3, SmolLM2)
//! splits a multi-byte character's bytes across tokens, and SentencePiece's byte fallback
//! spells an unknown character as several `<0xNN>` tokens. SentencePiece-style decoders also
//! strip the leading space of a decode, so decoding one token at a time loses spaces.
//!
//! The technique is TGI's and vLLM's prefix-offset / read-offset: decode a short window of
//! recent ids twice, without and with the ids not yet emitted, and emit the difference only when
//! it does not end in U+FFFD (an incomplete character). The window starts one emitted step
//! back, so the decoder always sees a token before the new ones (its leading space survives)
//! and stays small whatever the length of the output.
//!
//! Guarantee (tested): for ids fed one by one, the concatenated deltas plus [`finish`] equal
//! `decode(context + ids)` minus `decode(context)`, in particular `decode(ids)` with no
//! context, and no delta contains U+FFFD unless that decode does. One documented exception:
//! a SentencePiece byte-fallback run that mixes valid and invalid UTF-8 is replaced token by
//! token by the full decode but may keep its valid part here.
//!
//! [`finish`]: IncrementalDetokenizer::finish

use crate::tokenizer::{TextTokenizer, TokenizerError};

/// How many prompt tokens give the first generated token its context (vLLM uses 5): enough
/// to contain a whole character and the token before a leading space.
pub const CONTEXT_TOKENS: usize = 5;

/// Detokenization state of one sequence. It borrows the tokenizer per call, so it can live in
/// a request's state without a reference or an `Arc`.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// Context tokens followed by every generated id.
    ids: Vec<u32>,
    /// Start of the decode window: text before it is emitted and out of the picture.
    prefix_offset: usize,
    /// End of what has been emitted: `ids[prefix_offset..read_offset]` is the window's prefix.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// Output from the first generated token, decoded as `decode(generated ids)` would be.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self::with_context(&[], skip_special_tokens)
    }

    /// Output that continues `prompt_ids`: the last [`CONTEXT_TOKENS`] of them precede the
    /// first generated token in every decode, so e.g. SentencePiece's `▁Paris` after a prompt
    /// comes out as `" Paris"` (as vLLM and TGI return it), not `"Paris"`.
    pub fn with_context(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            skip_special_tokens,
        }
    }

    /// Adds one generated id and returns the text that became final (often empty while a
    /// character is incomplete or when a special token is skipped).
    pub fn step(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix_text = self.decode(tokenizer, self.prefix_offset..self.read_offset)?;
        let new_text = self.decode(tokenizer, self.prefix_offset..self.ids.len())?;
        if new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // A decoder that rewrote the prefix (none of Llama-family's do) would leave no
        // boundary to cut at: wait for more ids rather than emit a wrong delta.
        match new_text.get(prefix_text.len()..) {
            Some(delta)
                if new_text.len() > prefix_text.len() && new_text.starts_with(&prefix_text) =>
            {
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(delta.to_string())
            }
            _ => Ok(String::new()),
        }
    }

    /// End of generation: returns what is still held back (an incomplete character is then
    /// emitted as U+FFFD, as a full decode would).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, TokenizerError> {
        let prefix_text = self.decode(tokenizer, self.prefix_offset..self.read_offset)?;
        let new_text = self.decode(tokenizer, self.prefix_offset..self.ids.len())?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(new_text
            .strip_prefix(prefix_text.as_str())
            .unwrap_or_default()
            .to_string())
    }

    fn decode(
        &self,
        tokenizer: &TextTokenizer,
        range: std::ops::Range<usize>,
    ) -> Result<String, TokenizerError> {
        if range.is_empty() {
            return Ok(String::new());
        }
        tokenizer.decode(&self.ids[range], self.skip_special_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tokenizers::{byte_level_bpe, sentencepiece_bpe};

    const TEXTS: &[&str] = &[
        "Hello world!",
        " leading space and  double  spaces ",
        "Café crème brûlée, naïve façade.",
        "你好，世界。今天天气很好。",
        "こんにちは、世界！",
        "🚀🎉😀 👍🏽 🇫🇷 ❤️ family: 👨‍👩‍👧",
        "fn main() {\n\tprintln!(\"{}\", x); // 注释\n}",
        "Mixed: Zürich 日本 🚀 end",
        "Ελληνικά and Привет",
        "\n\nnewlines\n",
        "ÿ\u{7f}\u{1}",
    ];

    /// Feeds `ids` one by one after `context`, checks the deltas against the full decode.
    fn check(tokenizer: &TextTokenizer, context: &[u32], ids: &[u32], skip_special: bool) {
        let decode = |ids: &[u32]| tokenizer.decode(ids, skip_special).expect("decodes");
        let full_context = decode(context);
        let all: Vec<u32> = context.iter().chain(ids).copied().collect();
        let full = decode(&all);
        let expected = full
            .strip_prefix(full_context.as_str())
            .expect("decode of context is a prefix of decode of context + ids");

        let mut detokenizer = IncrementalDetokenizer::with_context(context, skip_special);
        let mut streamed = String::new();
        for &id in ids {
            let delta = detokenizer.step(tokenizer, id).expect("decodes");
            assert!(
                !delta.contains(char::REPLACEMENT_CHARACTER)
                    || expected.contains(char::REPLACEMENT_CHARACTER),
                "delta {delta:?} has U+FFFD but the full decode {expected:?} does not"
            );
            streamed.push_str(&delta);
        }
        streamed.push_str(&detokenizer.finish(tokenizer).expect("decodes"));
        assert_eq!(streamed, expected, "ids {ids:?} after context {context:?}");
    }

    fn splits_characters(tokenizer: &TextTokenizer, ids: &[u32]) -> bool {
        ids.iter().any(|&id| {
            tokenizer
                .decode(&[id], false)
                .expect("decodes")
                .contains(char::REPLACEMENT_CHARACTER)
        })
    }

    #[test]
    fn byte_level_bpe_streams_exactly_the_full_decode() {
        let tokenizer = byte_level_bpe();
        let mut split_any = false;
        for text in TEXTS {
            let ids = tokenizer.encode_with(text, false).unwrap();
            assert_eq!(tokenizer.decode(&ids, false).unwrap(), *text, "round trip");
            split_any |= splits_characters(&tokenizer, &ids);
            check(&tokenizer, &[], &ids, false);
            // As a continuation of a prompt.
            let prompt = tokenizer.encode_with("Answer: ", false).unwrap();
            check(&tokenizer, &prompt, &ids, false);
        }
        assert!(
            split_any,
            "the test tokenizer should have tokens ending inside characters"
        );
    }

    #[test]
    fn sentencepiece_byte_fallback_and_leading_spaces() {
        let tokenizer = sentencepiece_bpe();
        let byte_token = tokenizer
            .token_to_id("<0xE4>")
            .expect("byte fallback tokens exist");
        let mut used_fallback = false;
        for text in TEXTS {
            let ids = tokenizer.encode_with(text, false).unwrap();
            used_fallback |= ids.iter().any(|&id| id >= byte_token - 0xE4);
            check(&tokenizer, &[], &ids, false);
            let prompt = tokenizer.encode_with("Answer:", false).unwrap();
            check(&tokenizer, &prompt, &ids, false);
        }
        assert!(
            used_fallback,
            "CJK/emoji should be spelled with <0xNN> tokens"
        );

        // The leading space of a continuation survives (one token at a time would lose it).
        let prompt = tokenizer
            .encode_with("The capital of France is", false)
            .unwrap();
        // The normalizer prepends `▁`: these are the `▁Paris` tokens a model would generate.
        let answer = tokenizer.encode_with("Paris", false).unwrap();
        assert_eq!(tokenizer.decode(&answer, true).unwrap(), "Paris");
        let mut detokenizer = IncrementalDetokenizer::with_context(&prompt, true);
        let mut text = String::new();
        for &id in &answer {
            text.push_str(&detokenizer.step(&tokenizer, id).unwrap());
        }
        text.push_str(&detokenizer.finish(&tokenizer).unwrap());
        assert_eq!(text, " Paris");
    }

    #[test]
    fn random_byte_level_ids_including_invalid_utf8() {
        let tokenizer = byte_level_bpe();
        let vocab = tokenizer.vocab_size() as u64;
        // xorshift: deterministic ids without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let len = 1 + (next() % 24) as usize;
            let ids: Vec<u32> = (0..len).map(|_| (next() % vocab) as u32).collect();
            check(&tokenizer, &[], &ids, false);
            check(&tokenizer, &[], &ids, true);
        }
    }

    #[test]
    fn incomplete_character_waits_then_finish_flushes() {
        let tokenizer = byte_level_bpe();
        let ids = tokenizer.encode_with("🚀", false).unwrap();
        // Find a prefix of the emoji's byte tokens that is not a whole character.
        let mut detokenizer = IncrementalDetokenizer::new(false);
        let first = detokenizer.step(&tokenizer, ids[0]).unwrap();
        if ids.len() > 1 {
            assert_eq!(first, "", "an incomplete character is held back");
        }
        let mut rest: String = ids[1..]
            .iter()
            .map(|&id| detokenizer.step(&tokenizer, id).unwrap())
            .collect();
        rest.push_str(&detokenizer.finish(&tokenizer).unwrap());
        assert_eq!(first + &rest, "🚀");

        // Generation that ends inside a character ends with U+FFFD, as a full decode does.
        let mut detokenizer = IncrementalDetokenizer::new(false);
        let lone = tokenizer
            .token_to_id("ð")
            .expect("byte-level alphabet has the 0xF0 byte");
        assert_eq!(detokenizer.step(&tokenizer, lone).unwrap(), "");
        assert_eq!(detokenizer.finish(&tokenizer).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let tokenizer = byte_level_bpe();
        let end = tokenizer.token_to_id("<|im_end|>").unwrap();
        let mut ids = tokenizer.encode_with("Hi 🚀", false).unwrap();
        ids.push(end);
        ids.extend(tokenizer.encode_with(" after", false).unwrap());
        check(&tokenizer, &[], &ids, true);
        check(&tokenizer, &[], &ids, false);
    }
}
