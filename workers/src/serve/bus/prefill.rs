//! The context role's side of a worker: prefill jobs run prefill-only with a fixed seed, their
//! K/V exported and announced with `kv_ready`; releases and expiry free the exports, and jobs
//! waiting for room in the staging budget start as it frees up.

use std::sync::Arc;
use std::time::Instant;

use tandem_protocol::messages::{
    self, GenerateJob, KvPeer, KvRelease, KvTransportKind, StreamMessage,
};
use tokio::sync::mpsc;

use super::{Worker, locked, unix_ms};
use crate::engine::{EngineEvent, EventKind, RequestId};
use crate::serve::context::{HandleSource, exports_on_device, kv_handle};
use crate::serve::job::generation_request;
use crate::serve::stream::{stream_messages, token_event};

impl Worker {
    /// Context role: runs the prompt as a prefill-only request with a fixed seed; a task
    /// exports its K/V and answers `kv_ready` (or the whole answer, if it ends at once).
    pub(super) async fn start_prefill(self: &Arc<Self>, job: GenerateJob) {
        let prompt_tokens = job.prompt_ids.len();
        let mut request = generation_request(&job, &self.settings.model_stop_ids);
        if job.stop.max_tokens <= 1 {
            // Nothing is left for a decode worker: answer here.
            locked(&self.staging).unreserve(prompt_tokens);
            self.start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                .await;
            return;
        }
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        request.sampling.seed = Some(seed);
        request.prefill_only = true;
        let (sink, events) = mpsc::unbounded_channel::<EngineEvent>();
        let mut in_flight = locked(&self.in_flight);
        match self.engine.submit_with_sink(request, sink) {
            Ok(engine_id) => {
                in_flight.insert(job.request_id.clone(), engine_id);
                drop(in_flight);
                tracing::debug!(request_id = job.request_id, prompt_tokens, "prefill queued");
                let worker = Arc::clone(self);
                tokio::spawn(
                    async move { worker.finish_prefill(job, engine_id, seed, events).await },
                );
            }
            Err(e) => {
                drop(in_flight);
                locked(&self.staging).unreserve(prompt_tokens);
                self.publish(
                    job.stream_subject.clone(),
                    &StreamMessage::Error {
                        message: format!("the context worker cannot take the request: {e}"),
                    },
                )
                .await;
            }
        }
    }

    /// Context role: waits for the prefill's first token and end, then exports and answers.
    pub(super) async fn finish_prefill(
        self: Arc<Self>,
        job: GenerateJob,
        engine_id: RequestId,
        seed: u64,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
    ) {
        let prompt_tokens = job.prompt_ids.len();
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            let finished = event.is_finished();
            seen.push(event);
            if finished {
                break;
            }
        }
        let messages = match seen.last().map(|e| &e.kind) {
            Some(EventKind::Finished {
                retained_kv: Some(retained),
                ..
            }) => {
                let blocks = retained.block_table.len();
                let num_tokens = retained.num_tokens;
                // The first token goes to the decode worker whole: it reports its logprobs.
                let first = seen.iter().find_map(|e| match &e.kind {
                    EventKind::Token {
                        id,
                        text_delta,
                        logprob,
                        top_logprobs,
                    } => Some(token_event(
                        *id,
                        text_delta.clone(),
                        *logprob,
                        top_logprobs.clone(),
                        true,
                    )),
                    EventKind::Finished { .. } => None,
                });
                let exported = self.export(engine_id, blocks, job.kv_reader.as_ref()).await;
                match (first, exported) {
                    (Some(first), Ok((exported, backend))) => {
                        let expires =
                            unix_ms() + self.settings.kv_transfer_timeout.as_millis() as u64;
                        let handle = kv_handle(
                            &HandleSource {
                                worker_id: &self.settings.worker_id,
                                backend: &backend,
                                layout: &self.settings.layout,
                            },
                            &exported,
                            num_tokens,
                            first,
                            seed,
                            expires,
                        );
                        locked(&self.staging).stage(
                            job.request_id.clone(),
                            exported,
                            prompt_tokens,
                            blocks,
                        );
                        tracing::debug!(
                            request_id = job.request_id,
                            blocks = handle.blocks.len(),
                            %backend,
                            "prefill done, KV exported"
                        );
                        vec![StreamMessage::KvReady { handle }]
                    }
                    (first, exported) => {
                        locked(&self.staging).unreserve(prompt_tokens);
                        let detail = match (first, exported) {
                            (_, Err(e)) => e,
                            _ => "the prefill produced no token".into(),
                        };
                        tracing::error!(request_id = job.request_id, "KV export failed: {detail}");
                        vec![StreamMessage::Error {
                            message: format!(
                                "the context worker could not export the KV cache: {detail}"
                            ),
                        }]
                    }
                }
            }
            Some(_) => {
                // Ended at its first token (or failed, or was cancelled): the answer is here.
                locked(&self.staging).unreserve(prompt_tokens);
                stream_messages(seen, job.sampling.logprobs.is_some())
            }
            None => {
                locked(&self.staging).unreserve(prompt_tokens);
                vec![StreamMessage::Error {
                    message: "the worker's engine stopped unexpectedly".into(),
                }]
            }
        };
        for message in &messages {
            self.publish(job.stream_subject.clone(), message).await;
        }
        locked(&self.in_flight).remove(&job.request_id);
    }

    /// Exports the `blocks` retained by `engine_id`: reserves memory of the transport that
    /// suits `reader` (device memory for a CUDA IPC reader on this host, else host memory for
    /// UCX) and has the engine copy the blocks straight in (its blocks are freed either way).
    /// Returns the export and the name of the transport that holds it.
    pub(super) async fn export(
        &self,
        engine_id: RequestId,
        blocks: usize,
        reader: Option<&KvPeer>,
    ) -> Result<(crate::transfer::Exported, KvTransportKind), String> {
        let len = blocks * self.settings.layout.block_bytes();
        let on_device = self
            .settings
            .cuda_ipc
            .as_ref()
            .filter(|_| exports_on_device(reader, &self.settings.host_id, true));
        let mut reserved = None;
        if let Some(device) = on_device {
            match device.reserve(len).await {
                Ok(buffer) => reserved = Some((buffer, device.backend())),
                Err(e) => tracing::warn!("{e}: exporting through host memory (UCX) instead"),
            }
        }
        let (buffer, backend) = match reserved {
            Some(reserved) => reserved,
            None => match self.settings.transport.reserve(len).await {
                Ok(buffer) => (buffer, self.settings.transport.backend()),
                Err(e) => {
                    let _ = self.engine.release_kv(engine_id);
                    return Err(e.to_string());
                }
            },
        };
        let buffer = self
            .engine
            .take_retained_kv_into(engine_id, buffer)
            .await
            .map_err(|e| e.to_string())?;
        Ok((buffer.finish(), backend))
    }

    /// Context role: expires exports nobody released and starts waiting prefills that fit.
    pub(super) async fn sweep(self: &Arc<Self>) {
        let expired = locked(&self.staging).expire(Instant::now());
        for request_id in expired {
            tracing::warn!(
                request_id,
                "KV export expired before a decode worker released it"
            );
        }
        loop {
            let next = {
                let mut backlog = locked(&self.backlog);
                let fits = backlog
                    .front()
                    .is_some_and(|job| locked(&self.staging).try_reserve(job.prompt_ids.len()));
                if fits { backlog.pop_front() } else { None }
            };
            let Some(job) = next else {
                break;
            };
            if self.past_deadline(&job).await {
                locked(&self.staging).unreserve(job.prompt_ids.len());
                continue;
            }
            self.start_prefill(job).await;
        }
    }

    /// Context role: a decode worker has the K/V of a request.
    pub(super) async fn release(self: &Arc<Self>, payload: &[u8]) {
        match messages::decode::<KvRelease>("kv release", payload) {
            Ok(release) => {
                if locked(&self.staging).release(&release.request_id) {
                    tracing::debug!(request_id = release.request_id, "KV released");
                }
                self.sweep().await;
            }
            Err(e) => tracing::warn!("ignoring a malformed KV release: {e}"),
        }
    }
}
