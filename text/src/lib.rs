//! Text handling shared by the api-server and the workers: the tokenizer with the model's
//! special tokens, Hugging Face-compatible chat templates, and incremental detokenization
//! with stop strings. No engine dependency.
//!
//! The path of a chat request:
//! 1. [`tokenizer::TextTokenizer::load`] the model directory once;
//!    [`chat_template::ChatTemplate::from_tokenizer`] compiles its template once.
//! 2. [`chat_template::ChatTemplate::render`] the messages, then
//!    [`tokenizer::TextTokenizer::encode_templated`] (no second BOS: the template wrote it).
//!    Plain completion prompts use [`tokenizer::TextTokenizer::encode`] instead.
//! 3. Per generated id: stop when [`tokenizer::TextTokenizer::is_stop_token`]; otherwise
//!    [`detokenizer::IncrementalDetokenizer::step`] gives the new text, which goes through
//!    [`stop::StopMatcher::push`] before it is sent. At the end, flush
//!    `IncrementalDetokenizer::finish` through the matcher, then `StopMatcher::finish`.

pub mod chat_template;
pub mod detokenizer;
pub mod grammar;
pub mod stop;
pub mod tokenizer;

#[cfg(test)]
mod test_tokenizers;
