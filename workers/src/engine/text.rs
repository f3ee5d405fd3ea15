//! The engine's view of text: each sequence's generated tokens become text incrementally,
//! and stop strings are matched across token boundaries.
//!
//! The engine works on token ids; a [`TextDecoder`] (built from the model's tokenizer) gives
//! each request a [`TextStream`]. An engine without one emits no text and refuses stop strings.
//! [`TokenizerText`] is the one built from a model's tokenizer.

use std::sync::Arc;

use tandem_text::detokenizer::IncrementalDetokenizer;
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

/// What one request asks of its text.
#[derive(Debug, Clone, Copy)]
pub struct TextOptions<'a> {
    /// Strings that end the text.
    pub stop_strings: &'a [String],
    /// Stop strings are looked for only in the text after the first this many tokens
    /// (vLLM's `min_tokens`: the text those tokens bring is released as it comes).
    pub min_tokens: usize,
    /// The text ends with the stop string that ended it, rather than before it.
    pub include_stop_strings: bool,
    /// Special tokens write no text (the default); false writes theirs.
    pub skip_special_tokens: bool,
}

/// Starts a [`TextStream`] per request.
pub trait TextDecoder: Send + Sync {
    /// `prompt_ids` give the detokenizer its context (some tokenizers decode a token
    /// differently after others).
    fn start(
        &self,
        prompt_ids: &[u32],
        options: &TextOptions<'_>,
    ) -> Result<Box<dyn TextStream>, String>;
}

/// The [`TextDecoder`] of a model's tokenizer: tandem-text's [`IncrementalDetokenizer`]
/// (special tokens skipped) followed by its streaming [`StopMatcher`].
#[derive(Debug, Clone)]
pub struct TokenizerText {
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerText {
    pub fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        Self { tokenizer }
    }
}

impl TextDecoder for TokenizerText {
    fn start(
        &self,
        prompt_ids: &[u32],
        options: &TextOptions<'_>,
    ) -> Result<Box<dyn TextStream>, String> {
        Ok(Box::new(TokenizerStream {
            tokenizer: Arc::clone(&self.tokenizer),
            // The prompt's tail is context, so a first token's leading space survives.
            detokenizer: IncrementalDetokenizer::with_context(
                prompt_ids,
                options.skip_special_tokens,
            ),
            stop: StopMatcher::new(options.stop_strings.iter().cloned()),
            stop_strings: options
                .include_stop_strings
                .then(|| options.stop_strings.to_vec()),
            unchecked_tokens: options.min_tokens,
        }))
    }
}

/// tandem-text's incremental detokenizer (never a broken character, special tokens skipped)
/// feeding its stop matcher.
struct TokenizerStream {
    tokenizer: Arc<TextTokenizer>,
    detokenizer: IncrementalDetokenizer,
    stop: StopMatcher,
    /// The request's stop strings when the text keeps the one that ends it.
    stop_strings: Option<Vec<String>>,
    /// Tokens still to come whose text passes the stop matcher by (`min_tokens`).
    unchecked_tokens: usize,
}

impl TokenizerStream {
    /// The text before stop string `stop_index`, and the string itself when kept.
    fn stopped(&self, mut text: String, stop_index: usize) -> String {
        if let Some(stop) = self.stop_strings.as_ref().and_then(|s| s.get(stop_index)) {
            text.push_str(stop);
        }
        text
    }
}

impl TextStream for TokenizerStream {
    fn push(&mut self, token: u32) -> Result<TextStep, String> {
        let delta = self
            .detokenizer
            .step(&self.tokenizer, token)
            .map_err(|e| e.to_string())?;
        if self.unchecked_tokens > 0 {
            // Nothing is held by the matcher yet: it sees only the text after these tokens.
            self.unchecked_tokens -= 1;
            return Ok(TextStep {
                delta,
                stopped: false,
            });
        }
        Ok(match self.stop.push(&delta) {
            StopOutcome::Continue { text } => TextStep {
                delta: text,
                stopped: false,
            },
            StopOutcome::Stopped { text, stop_index } => TextStep {
                delta: self.stopped(text, stop_index),
                stopped: true,
            },
        })
    }

    fn flush(&mut self) -> String {
        let rest = match self.detokenizer.finish(&self.tokenizer) {
            Ok(rest) => rest,
            Err(e) => {
                tracing::warn!("detokenizing the end of a sequence: {e}");
                String::new()
            }
        };
        match self.stop.push(&rest) {
            StopOutcome::Continue { mut text } => {
                text.push_str(&self.stop.finish());
                text
            }
            StopOutcome::Stopped { text, stop_index } => self.stopped(text, stop_index),
        }
    }
}
