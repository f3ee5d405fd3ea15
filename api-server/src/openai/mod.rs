//! OpenAI's request and response shapes, as they appear on the wire.
//!
//! Requests are loose: every field is `Option` (or defaulted) and nothing is checked here; the
//! generation parameters the endpoints share are declared once ([`sampling`]) and flattened
//! into each request type;
//! [`crate::fields`] refuses fields an endpoint does not know before a body becomes one of these
//! types, and [`crate::validation`] turns them into concrete values once.
//! Responses and stream chunks follow OpenAI's documented JSON exactly (field names, `object`
//! strings, `null`s that clients expect to see), which the tests compare against literal JSON.

pub mod chat;
pub mod common;
pub mod completions;
pub mod conversations;
pub mod embeddings;
pub mod models;
pub mod responses;
pub mod sampling;
pub mod tokenize;
pub mod tools;

pub use chat::*;
pub use common::*;
pub use completions::*;
pub use conversations::*;
pub use embeddings::*;
pub use models::*;
pub use responses::*;
pub use sampling::*;
pub use tokenize::*;
pub use tools::*;
