//! The roles a worker serves on the bus, one type each, over the shared
//! [`Worker`](super::worker::Worker):
//!
//! - [`GenerationRole`] (`generation.rs`): `both` and `decode` workers. They take generation
//!   jobs, prefill and generate locally, and pull a disaggregated request's K/V first
//!   ([`pull`]: the handle authenticated for its job and taken once ([`spent_handles`]), the
//!   wait for room in the engine, the pull, its cancellation token, and the local prefill a
//!   refused handle or a failed pull falls back to), and the context workers' shared caches
//!   it has mapped ahead of their hand-overs ([`premapped`]).
//! - [`ContextRole`] (`context.rs`): context workers. They take prefill jobs, export the K/V
//!   ([`export`]: the copy out of the engine and the handle that describes it, signed with the
//!   deployment's KV secret, [`super::kv_auth`]) and hold the exports until released or
//!   expired ([`export_ledger`]).
//!
//! The serve loop (`super::bus`) owns the subscriptions and drives a role through [`Role`];
//! each role's state is shared with the tasks it spawns for its requests.

mod context;
mod export;
mod export_ledger;
mod generation;
mod premapped;
mod pull;
mod spent_handles;

use std::sync::Arc;

use tandem_protocol::messages::{GenerateJob, KvPeer, KvPullStats, KvTransferStats};

pub(super) use context::ContextRole;
/// Handles as a context worker makes them, for the tests of what signs and reads them.
#[cfg(test)]
pub(super) use export::fixtures;
pub(super) use export::layout_spec;
pub(super) use generation::GenerationRole;

use super::connection::{BusError, BusSettings};
use crate::backend::KvCacheMemory;
use crate::kv_cache::KvLayout;
use crate::transfer::KvTransport;
use crate::transfer::cache::ExposedCache;
use crate::transfer::cuda_ipc::CudaIpcTransport;

/// This worker's ways of moving K/V, shared by its exporter or its puller.
pub(super) struct KvTransports {
    /// The engine's KV cache layout.
    pub layout: KvLayout,
    /// Host-memory transfers (UCX), with any peer.
    pub host: Arc<dyn KvTransport>,
    /// Device-to-device transfers (CUDA IPC), with GPU workers of this host.
    pub cuda_ipc: Option<Arc<CudaIpcTransport>>,
    /// A decode worker's GPU cache, one part per rank: CUDA IPC pulls write into it.
    pub device_cache_parts: Vec<KvCacheMemory>,
    /// A context worker's host cache registered with `host` (a CPU worker): exports are read
    /// straight out of it.
    pub host_cache: Option<Arc<ExposedCache>>,
    /// A context worker's GPU cache shared over `cuda_ipc`: exports to GPU readers of this host
    /// are read straight out of it.
    pub device_cache: Option<Arc<ExposedCache>>,
    /// This machine ([`crate::transfer::host_id`]): CUDA IPC only within it.
    pub host_id: String,
}

impl KvTransports {
    pub fn new(settings: &BusSettings) -> Self {
        Self {
            layout: settings.layout,
            host: Arc::clone(&settings.transport),
            cuda_ipc: settings.cuda_ipc.clone(),
            device_cache_parts: settings.device_cache_parts.clone(),
            host_cache: settings.host_cache.clone(),
            device_cache: settings.device_cache.clone(),
            host_id: settings.host_id.clone(),
        }
    }
}

/// Where a role's jobs arrive: a subject in a queue group (one worker of the group gets each
/// job), and this worker's own subject (jobs routed to it by name).
pub(super) struct JobSubjects {
    pub queue: String,
    pub queue_group: &'static str,
    pub direct: String,
}

/// What a role adds to the shared [`Worker`](super::worker::Worker): which jobs it takes and how it starts them, what
/// it holds outside the engine, its own subscriptions and timers, and its heartbeat fields.
pub(super) trait Role: Send + Sync + 'static {
    /// The role's subscriptions and timers besides its jobs and cancels, owned by the serve
    /// loop (which unsubscribes them when it leaves).
    type Inbox;
    /// What the inbox delivers.
    type Input;

    /// The subjects of this role's jobs.
    fn job_subjects(&self) -> JobSubjects;

    async fn open_inbox(&self) -> Result<Self::Inbox, BusError>;

    /// The inbox's next input. Cancel-safe: the serve loop selects on it.
    async fn next_input(inbox: &mut Self::Inbox) -> Self::Input;

    async fn handle_input(self: &Arc<Self>, input: Self::Input);

    async fn close_inbox(inbox: Self::Inbox);

    /// Starts a job the worker has acknowledged and whose deadline has not passed.
    async fn start(self: &Arc<Self>, job: GenerateJob);

    /// Stops whatever the role holds of `request_id` (its engine request, if any, is cancelled
    /// by the worker).
    async fn cancel(self: &Arc<Self>, request_id: &str);

    /// Work the role holds outside the engine's requests (pulls, prefills waiting for room,
    /// exports not yet released): the drain waits until there is none.
    fn held(&self) -> usize;

    /// Jobs the role holds outside the engine that have not started (prefills waiting for
    /// export room): part of the worker's queue.
    fn queued(&self) -> usize;

    /// The heartbeat's `kv_transfer` (a context worker's exports).
    fn kv_transfer(&self) -> Option<KvTransferStats>;

    /// The heartbeat's `kv_peer` (how this worker reads and writes K/V transfers).
    fn kv_peer(&self) -> Option<KvPeer>;

    /// The heartbeat's `kv_pull` (a generation worker's pulls).
    fn kv_pull(&self) -> Option<KvPullStats>;

    /// The worker has left the deployment: free what the role still holds for others (a
    /// context worker's exports, their seals cleared first).
    fn leave(&self) {}
}
