//! tandem's OpenAI-compatible HTTP front end.
//!
//! A request goes: [`routes`] (HTTP, JSON) → [`validation`] (loose [`openai`] types to concrete
//! values) → [`prompt`] (chat template, tokens, via tandem-text) → [`router`] (which generation
//! worker, and which context worker prefills when the request is disaggregated) →
//! [`streaming`] (the jobs on NATS, the prefill → decode hand-over and its fallbacks, the token
//! stream back, timeouts, cancellation) → the route's response or SSE chunks. [`error`] is the one error type and its two client-facing forms.
//! The bus contract itself is the `tandem-protocol` crate; see docs/protocol.md.

pub mod config;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod prompt;
pub mod router;
pub mod routes;
pub mod server;
pub mod state;
pub mod streaming;
pub mod validation;
