//! The decode side of a disaggregated request: a job with a KV handle is pulled over the
//! transport and imported into the engine, or, when the pull fails, prefilled locally with the
//! handle's seed; the context worker is told to release either way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    self, GenerateJob, KvHandle, KvRelease, StreamMessage, Usage as WireUsage,
};

use super::{Worker, locked, publish_bounded, unix_ms};
use crate::engine::ImportedPrefill;
use crate::sampler::SampledToken;
use crate::serve::context::layout_spec;
use crate::serve::job::generation_request;
use crate::transfer::{RemoteKv, from_hex};

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
                        "KV pulled"
                    );
                    worker
                        .publish(
                            stream,
                            &StreamMessage::KvPulled {
                                worker_id: worker.settings.worker_id.clone(),
                                bytes: kv.len() as u64,
                                micros,
                                fallback: None,
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
                                fallback: Some(e.to_string()),
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
        if handle.backend != self.settings.transport.backend() {
            return Err(TransferError::InvalidHandle(format!(
                "the handle is for transport `{}`, this worker uses `{}`",
                handle.backend,
                self.settings.transport.backend()
            )));
        }
        let remote = RemoteKv {
            address: from_hex(&handle.address)?,
            rkey: from_hex(&handle.rkey)?,
            regions: handle.blocks.iter().map(|r| (r.addr, r.len)).collect(),
        };
        let left = handle.expires_unix_ms.saturating_sub(unix_ms());
        let timeout = Duration::from_millis(left.clamp(100, 30_000));
        let kv = self.settings.transport.pull(remote, timeout).await?;
        let expected = handle.blocks.len() as u64 * handle.layout.block_bytes;
        if kv.len() as u64 != expected {
            return Err(TransferError::InvalidHandle(format!(
                "pulled {} bytes, expected {expected}",
                kv.len()
            )));
        }
        Ok(kv)
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
