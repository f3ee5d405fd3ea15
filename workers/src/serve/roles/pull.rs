//! The decode side of a disaggregated request: a job with a KV handle is pulled over the
//! transport the handle names and imported into the engine. When the pull fails, the prompt is
//! prefilled locally with the handle's seed (same tokens as the context worker's would have
//! continued into); a layout that does not match this engine's is an error to the client,
//! never garbage. The context worker is told to release its export either way.
//!
//! A pull's cancellation is a [`CancelToken`]: a cancel sets it, and the pull's task reads it
//! once the transfer is over (a transfer in flight is not interrupted: the release must still
//! go out, and the memory it writes must stay valid until it ends). A cancelled pull answers
//! `finished` (`cancelled`) instead of generating; one cancelled while its request is handed to
//! the engine has that request cancelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    self, GenerateJob, KvHandle, KvPeer, KvRelease, KvTransportKind, PullOutcome, StreamMessage,
    Usage as WireUsage,
};

use super::KvTransports;
use super::export::layout_spec;
use crate::engine::ImportedPrefill;
use crate::sampler::SampledToken;
use crate::serve::bus::BusSettings;
use crate::serve::job::generation_request;
use crate::serve::worker::{Worker, locked, publish_bounded, unix_ms};
use crate::transfer::{PulledKv, RemoteKv, TransferError};

/// Set once to cancel a pull; clones share it.
#[derive(Clone, Default)]
struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Pulls handles' K/V into this worker's engine, and knows the pulls in progress.
pub(in crate::serve) struct KvPuller {
    /// Host-memory transfers (UCX); device-to-device ones from GPU context workers of this
    /// host. A handle must match the layout.
    kv: KvTransports,
    /// Whether this worker advertises CUDA IPC reads: it has a pool, and no read of a CUDA IPC
    /// export has failed.
    cuda_ipc_reads: AtomicBool,
    /// The pulls in progress, by bus request id.
    in_progress: Mutex<HashMap<String, CancelToken>>,
}

/// How a pull ended.
enum Pull {
    Pulled(PulledKv),
    /// The handle's layout is not this engine's: no fallback can help.
    LayoutMismatch(String),
    /// The transfer failed: prefill locally.
    Failed(TransferError),
}

/// A pull's entry among those in progress, removed when its task drops this: once the
/// request is in the engine (or answered), so the drain counts it throughout.
struct Registration {
    puller: Arc<KvPuller>,
    request_id: String,
    token: CancelToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        locked(&self.puller.in_progress).remove(&self.request_id);
    }
}

impl KvPuller {
    pub fn new(settings: &BusSettings) -> Self {
        Self {
            kv: KvTransports::new(settings),
            cuda_ipc_reads: AtomicBool::new(settings.cuda_ipc.is_some()),
            in_progress: Mutex::new(HashMap::new()),
        }
    }

    /// Pulls a handle's K/V and imports it on a task of its own; on a failed pull, prefills
    /// locally with the handle's seed (same tokens). Releases the context worker's export
    /// either way.
    pub fn start(self: &Arc<Self>, worker: &Arc<Worker>, job: GenerateJob, handle: KvHandle) {
        let token = CancelToken::default();
        locked(&self.in_progress).insert(job.request_id.clone(), token.clone());
        let registration = Registration {
            puller: Arc::clone(self),
            request_id: job.request_id.clone(),
            token,
        };
        let (puller, worker) = (Arc::clone(self), Arc::clone(worker));
        tokio::spawn(async move {
            puller
                .pull_and_start(&worker, job, handle, registration)
                .await
        });
    }

    /// Cancels the pull of `request_id`, if one is in progress.
    pub fn cancel(&self, request_id: &str) {
        if let Some(token) = locked(&self.in_progress).get(request_id) {
            token.cancel();
        }
    }

    /// Pulls in progress.
    pub fn in_progress(&self) -> usize {
        locked(&self.in_progress).len()
    }

    /// How this worker reads K/V, for its heartbeat.
    pub fn kv_peer(&self) -> KvPeer {
        KvPeer {
            host_id: self.kv.host_id.clone(),
            cuda_ipc: self.cuda_ipc_reads.load(Ordering::Relaxed),
        }
    }

    async fn pull_and_start(
        &self,
        worker: &Worker,
        job: GenerateJob,
        handle: KvHandle,
        registration: Registration,
    ) {
        let started = Instant::now();
        let own = layout_spec(&self.kv.layout);
        let pull = if handle.layout != own {
            Pull::LayoutMismatch(format!(
                "KV layout mismatch: context worker {} has {:?}, decode worker {} has {:?} \
                 (both must serve the same model with the same block size and KV dtype)",
                handle.worker_id, handle.layout, worker.identity.worker_id, own
            ))
        } else {
            match self.pull(&handle).await {
                Ok(kv) => Pull::Pulled(kv),
                Err(e) => Pull::Failed(e),
            }
        };
        let micros = started.elapsed().as_micros() as u64;
        publish_release(worker, &handle, &job.request_id).await;
        let stream = job.stream_subject.clone();
        if registration.token.is_cancelled() {
            worker
                .publish(
                    stream,
                    &StreamMessage::Finished {
                        reason: messages::FinishReason::Cancelled,
                        usage: WireUsage {
                            prompt_tokens: job.prompt_ids.len() as u32,
                            completion_tokens: 0,
                        },
                    },
                )
                .await;
            return;
        }
        let mut request = generation_request(&job, &worker.model_stop_ids);
        request.sampling.seed = Some(handle.seed);
        match pull {
            Pull::Pulled(kv) => {
                tracing::debug!(
                    request_id = job.request_id,
                    bytes = kv.len(),
                    micros,
                    backend = %handle.backend,
                    "KV pulled"
                );
                worker
                    .publish(
                        stream,
                        &StreamMessage::KvPulled {
                            worker_id: worker.identity.worker_id.clone(),
                            bytes: kv.len() as u64,
                            micros,
                            outcome: PullOutcome::Pulled {
                                transport: handle.backend.clone(),
                            },
                        },
                    )
                    .await;
                let prefill = ImportedPrefill {
                    kv: Box::new(kv),
                    num_tokens: handle.num_tokens as usize,
                    first_token: SampledToken {
                        id: handle.first_token.id,
                        logprob: handle.first_token.logprob.unwrap_or(0.0),
                        top_logprobs: handle.first_token.top_logprobs.clone(),
                    },
                };
                worker
                    .start_request(&job, |engine, sink| {
                        engine.import_with_sink(request, prefill, sink)
                    })
                    .await;
            }
            Pull::LayoutMismatch(mismatch) => {
                tracing::error!(request_id = job.request_id, "{mismatch}");
                worker
                    .publish(stream, &StreamMessage::Error { message: mismatch })
                    .await;
            }
            Pull::Failed(e) => {
                tracing::warn!(
                    request_id = job.request_id,
                    context_worker = handle.worker_id,
                    "KV pull failed, prefilling locally: {e}"
                );
                worker
                    .publish(
                        stream,
                        &StreamMessage::KvPulled {
                            worker_id: worker.identity.worker_id.clone(),
                            bytes: 0,
                            micros: 0,
                            outcome: PullOutcome::Fallback {
                                reason: e.to_string(),
                            },
                        },
                    )
                    .await;
                worker
                    .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                    .await;
            }
        }
        // A cancel that came while `kv_pulled` was going out found no engine request yet.
        if registration.token.is_cancelled() {
            worker.cancel(&job.request_id);
        }
    }

    /// Reads the handle's blocks over the transport it names, bounded by its expiry.
    async fn pull(&self, handle: &KvHandle) -> Result<PulledKv, TransferError> {
        let remote = RemoteKv::from_handle(handle)?;
        let left = handle.expires_unix_ms.saturating_sub(unix_ms());
        let host = &self.kv.host;
        let kv = if handle.backend == host.backend() {
            let timeout = Duration::from_millis(left.clamp(100, 30_000));
            host.pull(remote, timeout).await?
        } else if handle.backend == KvTransportKind::CudaIpc {
            let Some(device) = &self.kv.cuda_ipc else {
                return Err(TransferError::InvalidHandle(
                    "the K/V was exported to GPU memory for CUDA IPC, and this worker has no \
                     CUDA IPC pool (a CPU worker, or --cuda-ipc-pool-mb 0)"
                        .into(),
                ));
            };
            // One host, one clock: past its expiry the export's memory may hold another
            // request's K/V soon (the grace period bounds a pull started before it, not after).
            if left == 0 {
                return Err(TransferError::Unavailable(
                    "the KV export expired before the pull".into(),
                ));
            }
            device
                .pull(remote, Duration::from_millis(left))
                .await
                .inspect_err(|e| self.cuda_ipc_read_failed(e))?
        } else {
            return Err(TransferError::InvalidHandle(format!(
                "the handle is for transport `{}`, this worker reads `{}`{}",
                handle.backend,
                host.backend(),
                if self.kv.cuda_ipc.is_some() {
                    " and `cuda-ipc`"
                } else {
                    ""
                }
            )));
        };
        let expected = handle.blocks.len() as u64 * handle.layout.block_bytes;
        if kv.len() as u64 != expected {
            return Err(TransferError::InvalidHandle(format!(
                "pulled {} bytes, expected {expected}",
                kv.len()
            )));
        }
        Ok(kv)
    }

    /// A CUDA IPC read failed (no peer access between the GPUs, or processes that cannot share
    /// GPU memory): stop advertising CUDA IPC, so context workers export for this worker
    /// through host memory once the next heartbeat is out.
    fn cuda_ipc_read_failed(&self, error: &TransferError) {
        let was = self.cuda_ipc_reads.swap(false, Ordering::Relaxed);
        if was {
            tracing::error!(
                "reading a context worker's GPU memory over CUDA IPC failed ({error}); this \
                 worker now asks for host-memory (UCX) transfers. Same-host GPU transfers need \
                 peer access between the GPUs and a shared IPC namespace (docker --ipc=host)."
            );
        }
    }
}

/// Tells the context worker that exported `handle` to free it.
async fn publish_release(worker: &Worker, handle: &KvHandle, request_id: &str) {
    let release = KvRelease {
        request_id: request_id.to_owned(),
    };
    publish_bounded(
        &worker.client,
        worker.subjects.kv_release(&handle.worker_id),
        messages::encode(&release),
        "a KV release",
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_token_is_shared_by_its_clones() {
        let token = CancelToken::default();
        let held_by_the_pull = token.clone();
        assert!(!held_by_the_pull.is_cancelled());
        token.cancel();
        assert!(held_by_the_pull.is_cancelled());
    }
}
