//! Text handling shared by the api-server and the workers: the tokenizer with the model's
//! special tokens, Hugging Face-compatible chat templates, and incremental detokenization
//! with stop strings.

pub mod chat_template;
pub mod detokenizer;
pub mod stop;
pub mod tokenizer;

#[cfg(test)]
mod test_tokenizers;
