//! Which workers serve each request: the registry of the workers this api-server knows, and
//! the policies that choose among them.
//!
//! - `registry.rs`: the workers, discovered from their heartbeats; liveness, stuck engines, and
//!   the live counts reported to the metrics.
//! - `worker.rs`: one worker's entry: its last heartbeat and the jobs counted against it since
//!   (its load, and whether its queue is full).
//! - `context_job.rs`: the ticket of a prefill job, which counts the job off its context
//!   worker when it is answered.
//! - `route.rs`: a request's [`Route`]: its generation worker, and whether a context worker
//!   prefills its prompt.
//! - `policy.rs`: round robin, least loaded or KV-aware among a pool's candidates, a cursor
//!   per pool.
//! - `prefix_index.rs`: what each worker holds in its prefix cache, from its KV events; a
//!   prompt's block names as the workers name them.
//!
//! Least-loaded counts, besides the running and queued sequences of the last heartbeat, the
//! jobs this api-server sent since that heartbeat: a burst of requests between two heartbeats
//! is spread over the workers instead of all going to the one that looked idle.

mod context_job;
mod policy;
mod prefix_index;
mod registry;
mod route;
#[cfg(test)]
mod testing;
mod worker;

use std::time::Duration;

use tandem_protocol::config::RouterPolicy;

pub use crate::outcomes::LiveCounts;
pub use context_job::{ContextJob, GenerationJob};
pub use prefix_index::Source as PrefixSource;
pub use registry::{STUCK_AFTER_TIMEOUTS, WorkerRegistry};
pub use route::{LocalPrefill, NoRoute, Prefill, Route};
pub use worker::WorkerStatus;

/// How the registry routes.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    pub policy: RouterPolicy,
    /// A worker whose last heartbeat is older than this is gone.
    pub worker_timeout: Duration,
    /// Prompts with fewer tokens are prefilled by the generation worker itself (no transfer);
    /// 0 disaggregates every request a context worker can take.
    pub max_local_prefill_length: usize,
    /// `kv_aware`: the weight of a prompt block to prefill against a block held by running
    /// work (`--router-kv-overlap-weight`).
    pub kv_overlap_weight: f64,
}
