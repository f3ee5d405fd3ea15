//! tandem's OpenAI-compatible HTTP front end.
//!
//! A request goes: [`routes`] (HTTP, JSON; one file per endpoint) → [`fields`] (no field the
//! endpoint does not know) → [`validation`] (loose
//! [`openai`] types to concrete values) → [`prompt`] (chat template, tokens, via tandem-text)
//! → [`router`] (which generation worker, and which context worker prefills when the request
//! is disaggregated) → [`dispatch`] (the jobs on NATS, the prefill → decode hand-over and its
//! fallbacks, the token stream back, timeouts, cancellation, the request's metrics) → the
//! route's JSON response, or SSE chunks through [`sse`].
//!
//! Beside the request path: [`error`] is the one error type and the one place that maps it to
//! an HTTP/OpenAI error body and to an SSE error event; [`metrics`] derives the Prometheus
//! series from the events the router and the dispatch report; [`server`] starts everything and
//! follows heartbeats; [`state`] is what the routes share; [`config`] the command line;
//! [`disconnect`] notices clients that leave mid-request; [`tools`] is tool calling (request
//! checks, template inputs, the calls parsed from the output, the grammar of a required call).
//! [`grammar`] compiles a request's `response_format` grammar at the edge; [`reply_id`] is
//! the id a reply carries (the client's, if it named its request) apart from its jobs' id;
//! [`response_store`] keeps the Responses API's stored responses.
//!
//! At the bottom, importing nothing of the crate: [`openai`] (the wire types), [`outcomes`]
//! (the fallback and migration reasons and live-worker counts that dispatch and the router
//! report and [`metrics`] exports), [`event_stream`] (the `data:` frames of a stream),
//! [`refusals`] (runs of 429s as the log tells them) and [`reasoning`] (a reasoning model's
//! thinking split from its answer).
//! Modules import only downward: no module imports one that imports it back.
//! The bus contract itself is the `tandem-protocol` crate; see docs/protocol.md.

pub mod admission;
pub mod auth;
pub mod config;
pub mod disconnect;
pub mod dispatch;
pub mod error;
pub mod event_stream;
pub mod fields;
pub mod grammar;
pub mod lora;
pub mod metrics;
pub mod openai;
pub mod outcomes;
pub mod pooling;
pub mod prompt;
pub mod reasoning;
pub mod refusals;
pub mod reply_id;
pub mod response_store;
pub mod router;
pub mod routes;
pub mod server;
pub mod sse;
pub mod state;
pub mod tools;
pub mod validation;
