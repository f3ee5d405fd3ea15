//! The engine's view of text: each sequence's generated tokens become text incrementally,
//! and stop strings are matched across token boundaries.
//!
//! The engine works on token ids; a [`TextDecoder`] (built from the model's tokenizer) gives
//! each request a [`TextStream`]. An engine without one emits no text and refuses stop strings.
//! [`TokenizerText`] is the one built from a model's tokenizer.

use std::sync::Arc;

use tandem_text::stop::{StopMatcher, StopOutcome};
use tandem_text::tokenizer::TextTokenizer;

/// What one token did to a sequence's text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextStep {
    /// Text that became final with this token (may be empty while bytes of a character are
    /// incomplete or text is held back because it may begin a stop string).
    pub delta: String,
    /// A stop string matched; `delta` ends right before it and nothing more will come.
    pub stopped: bool,
}

/// The incremental text of one sequence.
pub trait TextStream: Send {
    /// Adds a generated token.
    fn push(&mut self, token: u32) -> Result<TextStep, String>;
    /// Text still held back, released when the sequence ends for another reason than a
    /// stop string.
    fn flush(&mut self) -> String;
}

/// Starts a [`TextStream`] per request.
pub trait TextDecoder: Send + Sync {
    /// `prompt_ids` give the detokenizer its context (some tokenizers decode a token
    /// differently after others); `stop_strings` are the request's.
    fn start(
        &self,
        prompt_ids: &[u32],
        stop_strings: &[String],
    ) -> Result<Box<dyn TextStream>, String>;
}

/// The [`TextDecoder`] of a model's tokenizer: incremental detokenization (special tokens
/// skipped) followed by tandem-text's streaming [`StopMatcher`].
#[derive(Debug, Clone)]
pub struct TokenizerText {
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerText {
    pub fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        Self { tokenizer }
    }
}

/// Prompt tokens given to the detokenizer as context: enough for tokenizers whose decoding
/// of a token depends on its neighbours (SentencePiece's leading space), few enough to keep
/// every decode call short.
const CONTEXT_TOKENS: usize = 6;

impl TextDecoder for TokenizerText {
    fn start(
        &self,
        prompt_ids: &[u32],
        stop_strings: &[String],
    ) -> Result<Box<dyn TextStream>, String> {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(CONTEXT_TOKENS)..];
        Ok(Box::new(TokenizerStream {
            tokenizer: Arc::clone(&self.tokenizer),
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            stop: StopMatcher::new(stop_strings.iter().cloned()),
        }))
    }
}

/// Decodes windows of ids and releases only the text that a window of more ids would not
/// change (the prefix/read offsets of Hugging Face's text-generation-inference): a token that
/// ends in the middle of a UTF-8 character produces no text until the character completes.
struct TokenizerStream {
    tokenizer: Arc<TextTokenizer>,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the ids whose text has been released.
    read_offset: usize,
    stop: StopMatcher,
}

impl TokenizerStream {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }

    /// Text of the ids after `read_offset`, when it is complete.
    fn next_text(&mut self, at_end: bool) -> Result<String, String> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        let complete = at_end || !full.ends_with('\u{FFFD}');
        match full.get(prefix.len()..) {
            Some(new) if complete && full.len() > prefix.len() && full.starts_with(&prefix) => {
                let new = new.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }
}

impl TextStream for TokenizerStream {
    fn push(&mut self, token: u32) -> Result<TextStep, String> {
        self.ids.push(token);
        let delta = self.next_text(false)?;
        Ok(match self.stop.push(&delta) {
            StopOutcome::Continue { text } => TextStep {
                delta: text,
                stopped: false,
            },
            StopOutcome::Stopped { text, .. } => TextStep {
                delta: text,
                stopped: true,
            },
        })
    }

    fn flush(&mut self) -> String {
        // Bytes of an incomplete character come out as U+FFFD rather than vanish.
        let rest = self.next_text(true).unwrap_or_default();
        match self.stop.push(&rest) {
            StopOutcome::Continue { mut text } => {
                text.push_str(&self.stop.finish());
                text
            }
            StopOutcome::Stopped { text, .. } => text,
        }
    }
}
