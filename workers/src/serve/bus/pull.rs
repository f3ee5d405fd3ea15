//! The decode side of a disaggregated request: a job with a KV handle is pulled over the
//! transport and imported into the engine, or, when the pull fails, prefilled locally with the
//! handle's seed; the context worker is told to release either way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    self, GenerateJob, KvHandle, KvRelease, KvTransportKind, PullOutcome, StreamMessage,
    Usage as WireUsage,
};

use super::{Worker, locked, publish_bounded, unix_ms};
use crate::engine::ImportedPrefill;
use crate::sampler::SampledToken;
use crate::serve::context::layout_spec;
use crate::serve::job::generation_request;
use crate::transfer::RemoteKv;

impl Worker {
    /// Decode side: pulls a handle's K/V and imports it; on a failed pull, prefills locally
    /// with the handle's seed (same tokens). Releases the context worker's export either way.
    pub(super) fn start_pull(self: &Arc<Self>, job: GenerateJob, handle: KvHandle) {
        let own = layout_spec(&self.settings.layout);
        locked(&self.pulling).insert(job.request_id.clone(), false);
        let worker = Arc::clone(self);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = if handle.layout != own {
                Err(Err(format!(
                    "KV layout mismatch: context worker {} has {:?}, decode worker {} has {:?} \
                     (both must serve the same model with the same block size and KV dtype)",
                    handle.worker_id, handle.layout, worker.settings.worker_id, own
                )))
            } else {
                worker.pull(&handle).await.map_err(Ok)
            };
            let micros = started.elapsed().as_micros() as u64;
            worker.publish_release(&handle, &job.request_id).await;
            let cancelled = locked(&worker.pulling)
                .remove(&job.request_id)
                .unwrap_or(false);
            let stream = job.stream_subject.clone();
            if cancelled {
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
            let mut request = generation_request(&job, &worker.settings.model_stop_ids);
            request.sampling.seed = Some(handle.seed);
            match result {
                Ok(kv) => {
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
                                worker_id: worker.settings.worker_id.clone(),
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
                Err(Err(mismatch)) => {
                    tracing::error!(request_id = job.request_id, "{mismatch}");
                    worker
                        .publish(stream, &StreamMessage::Error { message: mismatch })
                        .await;
                }
                Err(Ok(e)) => {
                    tracing::warn!(
                        request_id = job.request_id,
                        context_worker = handle.worker_id,
                        "KV pull failed, prefilling locally: {e}"
                    );
                    worker
                        .publish(
                            stream,
                            &StreamMessage::KvPulled {
                                worker_id: worker.settings.worker_id.clone(),
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
        });
    }

    pub(super) async fn pull(
        &self,
        handle: &KvHandle,
    ) -> Result<crate::transfer::PulledKv, crate::transfer::TransferError> {
        use crate::transfer::TransferError;
        let remote = RemoteKv::from_handle(handle)?;
        let left = handle.expires_unix_ms.saturating_sub(unix_ms());
        let host = &self.settings.transport;
        let kv = if handle.backend == host.backend() {
            let timeout = Duration::from_millis(left.clamp(100, 30_000));
            host.pull(remote, timeout).await?
        } else if handle.backend == KvTransportKind::CudaIpc {
            let Some(device) = &self.settings.cuda_ipc else {
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
                if self.settings.cuda_ipc.is_some() {
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
    fn cuda_ipc_read_failed(&self, error: &crate::transfer::TransferError) {
        let was = self
            .cuda_ipc_reads
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        if was {
            tracing::error!(
                "reading a context worker's GPU memory over CUDA IPC failed ({error}); this \
                 worker now asks for host-memory (UCX) transfers. Same-host GPU transfers need \
                 peer access between the GPUs and a shared IPC namespace (docker --ipc=host)."
            );
        }
    }

    pub(super) async fn publish_release(&self, handle: &KvHandle, request_id: &str) {
        let release = KvRelease {
            request_id: request_id.to_owned(),
        };
        publish_bounded(
            &self.client,
            self.subjects.kv_release(&handle.worker_id),
            messages::encode(&release),
            "a KV release",
        )
        .await;
    }
}
