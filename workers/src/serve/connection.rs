//! What a worker needs to be on the bus, below the serve loop ([`super::bus`]) and the roles
//! it runs ([`super::roles`]): the worker's settings, the bus's errors, and subscriptions
//! opened and closed with bounded waits.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Subscriber};
use tandem_protocol::messages::WorkerRole;
use thiserror::Error;

use super::worker::PUBLISH_TIMEOUT;
use crate::kv_cache::KvLayout;
use crate::transfer::KvTransport;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {detail} (is nats-server running there?)")]
    Connect { url: String, detail: String },
    #[error("subscribing to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
    #[error("installing the signal handler: {0}")]
    Signal(std::io::Error),
    /// The engine's device failed for good: the worker left the deployment and exits, so
    /// that its supervisor (the `tandem` launcher, systemd, Kubernetes) starts a fresh one.
    #[error("left the deployment because the device failed: {0}")]
    DeviceLost(String),
}

/// Who this worker is on the bus, and what its role needs.
#[derive(Clone)]
pub struct BusSettings {
    pub nats_url: String,
    /// Credentials and TLS for the connection.
    pub nats_auth: tandem_cli::args::NatsAuthArgs,
    pub served_name: String,
    /// [`crate::model_dir::model_fingerprint`] of the served model: in every KV handle this
    /// worker exports, and what handles it pulls must name.
    pub model_fingerprint: String,
    /// The LoRA adapters the model serves, in its order (heartbeats list them).
    pub lora_adapters: Vec<tandem_protocol::messages::LoraAdapterInfo>,
    pub worker_id: String,
    pub role: WorkerRole,
    pub device: String,
    pub total_kv_blocks: usize,
    pub heartbeat: Duration,
    /// The tokenizer's end-of-sequence ids, added to every job's stop ids.
    pub model_stop_ids: Arc<[u32]>,
    /// Compiles jobs' grammars (structured outputs).
    pub grammars: Arc<super::grammar::WorkerGrammars>,
    /// The engine's KV cache layout (what handles must match).
    pub layout: KvLayout,
    /// Host-memory transfers (UCX): every context and decode worker has one.
    pub transport: Arc<dyn KvTransport>,
    /// Device-to-device transfers with GPU workers of this host (a GPU context or decode
    /// worker, on each of its tensor-parallel ranks' GPUs).
    pub cuda_ipc: Option<Arc<crate::transfer::cuda_ipc::CudaIpcTransport>>,
    /// Decode role: the engine's KV cache on the GPU (one part per tensor-parallel rank),
    /// which CUDA IPC pulls write straight into; empty elsewhere.
    pub device_cache_parts: Vec<crate::backend::KvCacheMemory>,
    /// Context role: the KV cache registered with `transport` (a CPU worker's host cache), for
    /// exports read straight out of it.
    pub host_cache: Option<Arc<crate::transfer::cache::ExposedCache>>,
    /// Context role: the KV cache shared over `cuda_ipc` (a GPU worker's), for exports to GPU
    /// readers of this host read straight out of it.
    pub device_cache: Option<Arc<crate::transfer::cache::ExposedCache>>,
    /// This machine ([`crate::transfer::host_id`]): CUDA IPC only between workers of one host.
    pub host_id: String,
    /// Context role: prompt tokens held for decode workers at most.
    pub max_tokens_in_buffer: usize,
    /// Context role: exports not released by then are freed.
    pub kv_transfer_timeout: Duration,
    /// Sequences the engine runs at once at most (`--max-num-seqs`).
    pub max_running: usize,
    /// The projections' weights as the model computes with them (`fp8`, `bf16`, ...).
    pub weights: String,
    /// Jobs accepted and not started at most; past it, jobs are refused (`rejected`). `None`:
    /// no bound.
    pub max_queued: Option<usize>,
    /// The engine caches prompts' blocks: the worker publishes KV events and answers
    /// snapshot requests for routers.
    pub prefix_caching: bool,
    /// The deployment's KV secret: a context worker signs its handles with it, a decode
    /// worker reads only handles whose MAC verifies for the job ([`super::kv_auth`]). `None`:
    /// unsigned handles, believed as they come.
    pub kv_secret: Option<Arc<super::kv_auth::KvSecret>>,
    /// What the tests that started this worker asked of it; none in production.
    pub test_hooks: super::test_hooks::TestHooks,
}

/// Subscribes to `subject`.
pub(crate) async fn subscribe(client: &Client, subject: String) -> Result<Subscriber, BusError> {
    client
        .subscribe(subject.clone())
        .await
        .map_err(|e| subscribe_error(&subject, &e))
}

pub(crate) fn subscribe_error(subject: &str, e: &dyn std::fmt::Display) -> BusError {
    BusError::Subscribe {
        subject: subject.to_owned(),
        detail: e.to_string(),
    }
}

/// Unsubscribes, bounded by [`PUBLISH_TIMEOUT`].
pub(crate) async fn unsubscribe(mut subscriber: Subscriber) {
    match tokio::time::timeout(PUBLISH_TIMEOUT, subscriber.unsubscribe()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("unsubscribing: {e}"),
        Err(_) => tracing::warn!("unsubscribing: NATS did not answer within {PUBLISH_TIMEOUT:?}"),
    }
}
