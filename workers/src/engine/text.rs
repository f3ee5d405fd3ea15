//! The engine's view of text: each sequence's generated tokens become text incrementally,
//! and stop strings are matched across token boundaries.
//!
//! The engine works on token ids; a [`TextDecoder`] (built from the model's tokenizer) gives
//! each request a [`TextStream`]. An engine without one emits no text and refuses stop strings.

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
