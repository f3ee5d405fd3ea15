//! The wire contract between tandem's api-server and its workers.
//!
//! - [`subjects`]: NATS subject names and queue groups.
//! - [`messages`]: the versioned JSON messages sent on them.
//! - [`payload`]: the messages that grow with a request, sized against the NATS server's
//!   `max_payload` (jobs checked, `tokens` batches split).
//! - [`config`]: the deployment config file (YAML), which accepts TensorRT-LLM's
//!   `disagg_config.yaml` keys and adds tandem's own.
//! - [`ready`]: whether a NATS or HTTP server just started serves clients yet.
//! - [`block_hash`]: the names of cached KV blocks, which workers key their prefix caches by
//!   and routers compute to find what each worker holds of a prompt.
//!
//! Both sides depend on this crate and never on each other; it has no heavy dependencies.
//! docs/protocol.md and docs/configuration.md describe the same contract for operators.

pub mod block_hash;
pub mod config;
pub mod messages;
pub mod payload;
pub mod ready;
pub mod subjects;

pub use messages::PROTOCOL_VERSION;
