//! tandem's worker: the inference engine and the roles a worker plays.
//!
//! - [`model`]: the Llama-family model, written once against [`backend::Backend`].
//! - [`backend`]: the operations a device implements (CPU, CUDA).
//! - [`kv_cache`]: the paged, block-major KV cache and its block pool.
//! - [`scheduler`]: continuous batching and chunked prefill under a token budget.
//! - [`sampler`]: turns logits into tokens (greedy, temperature, top-k/p, penalties, seeds).
//! - [`engine`]: the step loop that ties them together.
//! - [`device`]: `--device cpu|cuda:N`: the model and the engine on that backend.
//! - [`model_dir`]: opening a model directory (checks, text side, weights on a device).
//! - [`generate`]: `worker generate`, one local generation without the bus.
//! - [`serve`]: the worker on the bus (`worker --role both|context|decode --nats URL`).
//! - [`transfer`]: moving a prefilled prompt's K/V between workers (UCX; in-process for tests).

pub mod backend;
pub mod device;
pub mod engine;
pub mod generate;
pub mod grammar_bench;
pub mod kv_cache;
pub mod model;
pub mod model_dir;
pub mod sampler;
pub mod scheduler;
pub mod serve;
pub mod tp_bench;
pub mod transfer;
