//! The context role: the context worker's half of a disaggregated request (docs/protocol.md).
//!
//! It takes prefill jobs (queue group `context`, and its direct subject). A job reserves its
//! prompt's tokens in the [`ExportLedger`]'s budget, or waits in the backlog until releases
//! and expiries make room. It then runs as a prefill-only engine request with a fixed seed
//! (drawn here when the client gave none, and sent along so the decode worker continues the
//! same random stream). When its first token is out, the prompt's blocks are exported
//! ([`super::export`]: read in place, pinned until the export is dropped, or copied out and
//! freed at once), the ledger holds the export, and the worker answers `kv_ready` with the
//! handle, signed for the request with the deployment's KV secret ([`crate::serve::kv_auth`]),
//! and the job's wait and prefill time (`prefill_timing`, for the api-server's split of the
//! request's time to first token). A request that ends at its first
//! token (a stop token or stop string, or `max_tokens` 1) is answered here in full instead.
//!
//! Its own inbox: decode workers' releases (`kv.release.{worker_id}`), and a sweep every 50 ms
//! that expires exports nobody released and starts waiting prefills that fit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subscriber;
use futures::StreamExt;
use tandem_protocol::messages::{
    self, GenerateJob, KvPeer, KvPullStats, KvRelease, KvTransferStats, PrefillTiming,
    StreamMessage,
};
use tandem_protocol::payload;
use tandem_protocol::subjects::CONTEXT_QUEUE_GROUP;
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};

use super::export::{Exporter, HandleSource, kv_handle};
use super::export_ledger::ExportLedger;
use super::{JobSubjects, Role};
use crate::engine::{EngineEvent, EventKind, RequestId};
use crate::serve::connection::{self, BusError, BusSettings};
use crate::serve::kv_auth::{HandleBinding, KvSecret};
use crate::serve::stream::{stream_messages, token_event};
use crate::serve::worker::{Worker, locked, unix_ms};

/// How often exports are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

pub(in crate::serve) struct ContextRole {
    worker: Arc<Worker>,
    exporter: Exporter,
    /// Exports held for decode workers, and the budget prefills reserve from.
    ledger: Mutex<ExportLedger>,
    /// Acknowledged prefill jobs waiting for room in the ledger's budget.
    backlog: Mutex<VecDeque<WaitingPrefill>>,
    /// The deployment's KV secret: every handle is signed for its request with it. `None`:
    /// handles go out unsigned (said once at start).
    secret: Option<Arc<KvSecret>>,
}

/// A prefill job waiting for room in the export budget, and when the worker took it (its wait
/// counts in the request's `prefill_timing.queued_us`).
struct WaitingPrefill {
    job: GenerateJob,
    received: Instant,
}

/// The context role's own subscription and timer.
pub(in crate::serve) struct ContextInbox {
    releases: Subscriber,
    sweep: Interval,
}

pub(in crate::serve) enum ContextInput {
    /// A decode worker has the K/V of a request (or gave up on it).
    Release(async_nats::Message),
    Sweep,
}

impl ContextRole {
    pub fn new(worker: Arc<Worker>, settings: &BusSettings) -> Self {
        Self {
            worker,
            exporter: Exporter::new(settings),
            ledger: Mutex::new(ExportLedger::new(
                export_budget(settings),
                settings.kv_transfer_timeout,
            )),
            backlog: Mutex::new(VecDeque::new()),
            secret: settings.kv_secret.clone(),
        }
    }

    /// A job that ends at its first token or before (`max_tokens` 0 or 1): run as a whole
    /// request of the engine, its answer streamed from here; no export, no budget.
    async fn answer_whole(self: &Arc<Self>, job: GenerateJob) {
        let Ok(request) = self.worker.job_request(&job).await else {
            return;
        };
        self.worker
            .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
            .await;
    }

    /// Runs the prompt as a prefill-only request with a fixed seed; a task exports its K/V
    /// and answers `kv_ready` (or the whole answer, if it ends at once). The job's tokens are
    /// reserved in the ledger. The worker took the job at `received`.
    async fn start_prefill(self: &Arc<Self>, job: GenerateJob, received: Instant) {
        let prompt_tokens = job.prompt_ids.len();
        // The first token is drawn under the grammar; the decode worker's grammar takes it.
        let Ok(mut request) = self.worker.job_request(&job).await else {
            locked(&self.ledger).unreserve(prompt_tokens);
            return;
        };
        if job.stop.max_tokens <= 1 {
            // Nothing is left for a decode worker (a job that waited in the backlog before
            // `start` answered such jobs at once): answer here.
            locked(&self.ledger).unreserve(prompt_tokens);
            self.worker
                .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                .await;
            return;
        }
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        request.sampling.seed = Some(seed);
        request.prefill_only = true;
        // The engine counts its own queue from here; the wait before it is the export
        // budget's (and the grammar's compilation).
        let before_engine = received.elapsed();
        let submitted = self.worker.submit(&job.request_id, |engine, sink| {
            engine.submit_with_sink(request, sink)
        });
        match submitted {
            Ok((engine_id, events)) => {
                tracing::debug!(request_id = job.request_id, prompt_tokens, "prefill queued");
                let role = Arc::clone(self);
                tokio::spawn(async move {
                    role.finish_prefill(job, engine_id, seed, events, before_engine)
                        .await
                });
            }
            Err(e) => {
                locked(&self.ledger).unreserve(prompt_tokens);
                self.worker
                    .publish(
                        job.stream_subject.clone(),
                        &StreamMessage::Error {
                            message: format!("the context worker cannot take the request: {e}"),
                            param: None,
                        },
                    )
                    .await;
            }
        }
    }

    /// Waits for the prefill's first token and end, then exports and answers. The job
    /// waited `before_engine` from its arrival here to its submission to the engine.
    async fn finish_prefill(
        self: Arc<Self>,
        job: GenerateJob,
        engine_id: RequestId,
        seed: u64,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
        before_engine: Duration,
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
                usage,
                ..
            }) => {
                let cached_tokens = usage.cached_tokens as u32;
                let block_table = retained.block_table.clone();
                let blocks = block_table.len();
                let num_tokens = retained.num_tokens;
                let prefill_timing = PrefillTiming {
                    queued_us: micros(before_engine + retained.queued),
                    prefill_us: micros(retained.prefill),
                };
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
                    EventKind::Finished { .. }
                    | EventKind::RoomReserved { .. }
                    | EventKind::PromptLogprobs { .. }
                    | EventKind::Hidden { .. } => None,
                });
                let exported = self
                    .exporter
                    .export(
                        &self.worker.engine,
                        engine_id,
                        &block_table,
                        job.kv_reader.as_ref(),
                    )
                    .await;
                match (first, exported) {
                    (Some(first), Ok((exported, backend))) => {
                        let timeout = locked(&self.ledger).timeout();
                        let expires = unix_ms() + timeout.as_millis() as u64;
                        let coalesced = job.kv_reader.as_ref().is_some_and(|r| r.coalesced_regions);
                        let mut handle = kv_handle(
                            &HandleSource {
                                worker_id: &self.worker.identity.worker_id,
                                model_fingerprint: self.worker.job_fingerprint(&job),
                                backend: &backend,
                                layout: &self.exporter.kv.layout,
                            },
                            &exported,
                            coalesced,
                            num_tokens,
                            first,
                            seed,
                            expires,
                        );
                        if let Some(secret) = &self.secret {
                            secret.sign(&mut handle, &HandleBinding::of(&job));
                        }
                        let regions = handle.blocks.len();
                        let ready = StreamMessage::KvReady {
                            handle: Box::new(handle),
                            prefill_timing: Some(prefill_timing),
                            cached_tokens,
                        };
                        match payload::encode_within(&ready, self.worker.max_payload()) {
                            Ok(_) => {
                                let held = locked(&self.ledger).hold(
                                    job.request_id.clone(),
                                    exported,
                                    prompt_tokens,
                                    blocks,
                                );
                                match held {
                                    Ok(()) => {
                                        tracing::debug!(
                                            request_id = job.request_id,
                                            regions,
                                            %backend,
                                            "prefill done, KV exported"
                                        );
                                        vec![ready]
                                    }
                                    Err(cancelled) => {
                                        // Nobody will pull it: freed now, and nobody listens.
                                        drop(cancelled);
                                        tracing::debug!(
                                            request_id = job.request_id,
                                            "cancelled while its KV was exported: freed"
                                        );
                                        Vec::new()
                                    }
                                }
                            }
                            Err(too_large) => {
                                // Nobody can pull an export whose handle cannot be sent: it
                                // is freed here, and the api-server prefills elsewhere.
                                locked(&self.ledger).unreserve(prompt_tokens);
                                drop(exported);
                                tracing::error!(
                                    request_id = job.request_id,
                                    regions,
                                    "the KV handle is {too_large}: not handed over"
                                );
                                vec![StreamMessage::Error {
                                    message: format!(
                                        "the context worker's KV handle ({regions} regions) is \
                                         {too_large}"
                                    ),
                                    param: None,
                                }]
                            }
                        }
                    }
                    (first, exported) => {
                        locked(&self.ledger).unreserve(prompt_tokens);
                        let detail = match (first, exported) {
                            (_, Err(e)) => e,
                            _ => "the prefill produced no token".into(),
                        };
                        tracing::error!(request_id = job.request_id, "KV export failed: {detail}");
                        vec![StreamMessage::Error {
                            message: format!(
                                "the context worker could not export the KV cache: {detail}"
                            ),
                            param: None,
                        }]
                    }
                }
            }
            Some(_) => {
                // Ended at its first token (or failed, or was cancelled): the answer is here.
                locked(&self.ledger).unreserve(prompt_tokens);
                stream_messages(seen, job.sampling.logprobs.is_some(), &mut 0)
            }
            None => {
                locked(&self.ledger).unreserve(prompt_tokens);
                vec![StreamMessage::Error {
                    message: "the worker's engine stopped unexpectedly".into(),
                    param: None,
                }]
            }
        };
        for message in &messages {
            self.worker
                .publish(job.stream_subject.clone(), message)
                .await;
        }
        self.worker.in_flight.remove(&job.request_id);
        locked(&self.ledger).prefill_over(&job.request_id);
    }

    /// Expires exports nobody released and starts waiting prefills that fit.
    async fn sweep(self: &Arc<Self>) {
        let expired = locked(&self.ledger).expire(Instant::now());
        for request_id in expired {
            tracing::warn!(
                request_id,
                "KV export expired before a decode worker released it"
            );
        }
        loop {
            let next = {
                let mut backlog = locked(&self.backlog);
                let fits = backlog.front().is_some_and(|waiting| {
                    locked(&self.ledger).try_reserve(waiting.job.prompt_ids.len())
                });
                if fits { backlog.pop_front() } else { None }
            };
            let Some(WaitingPrefill { job, received }) = next else {
                break;
            };
            if self.worker.past_deadline(&job).await {
                locked(&self.ledger).unreserve(job.prompt_ids.len());
                continue;
            }
            self.start_prefill(job, received).await;
        }
    }

    /// A decode worker has the K/V of a request.
    async fn release(self: &Arc<Self>, payload: &[u8]) {
        match messages::decode::<KvRelease>("kv release", payload) {
            Ok(release) => {
                if locked(&self.ledger).release(&release.request_id) {
                    tracing::debug!(request_id = release.request_id, "KV released");
                } else {
                    // Counted in the heartbeat (tandem_kv_unmatched_releases_total); a flood
                    // of forged releases must not flood the log too.
                    tracing::debug!(
                        request_id = release.request_id,
                        "a KV release for no held export (late, repeated or foreign): ignored"
                    );
                }
                self.sweep().await;
            }
            Err(e) => tracing::warn!("ignoring a malformed KV release: {e}"),
        }
    }
}

/// `duration` in whole microseconds, as the wire counts them.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The ledger's token budget: `max_tokens_in_buffer`, and where exports are read in place
/// (they pin the prompt's blocks in the cache) no more than the cache holds, so that the
/// exports and the prefills admitted beside them fit it (up to the rounding of prompts to
/// whole blocks) rather than prefills queueing in the engine behind blocks that only a release
/// or an expiry frees.
fn export_budget(settings: &BusSettings) -> usize {
    let in_place = settings.host_cache.is_some() || settings.device_cache.is_some();
    let cache_tokens = settings.total_kv_blocks * settings.layout.block_size;
    if in_place && settings.max_tokens_in_buffer > cache_tokens {
        tracing::info!(
            max_tokens_in_buffer = settings.max_tokens_in_buffer,
            cache_tokens,
            "exports pin their blocks in the KV cache: at most the cache's tokens are held for \
             decode workers"
        );
        cache_tokens
    } else {
        settings.max_tokens_in_buffer
    }
}

impl Role for ContextRole {
    type Inbox = ContextInbox;
    type Input = ContextInput;

    fn job_subjects(&self) -> JobSubjects {
        let subjects = &self.worker.subjects;
        JobSubjects {
            queue: subjects.prefill(),
            queue_group: CONTEXT_QUEUE_GROUP,
            direct: subjects.prefill_direct(&self.worker.identity.worker_id),
        }
    }

    async fn open_inbox(&self) -> Result<ContextInbox, BusError> {
        let releases = connection::subscribe(
            &self.worker.client,
            self.worker
                .subjects
                .kv_release(&self.worker.identity.worker_id),
        )
        .await?;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(ContextInbox { releases, sweep })
    }

    async fn next_input(inbox: &mut ContextInbox) -> ContextInput {
        tokio::select! {
            Some(message) = inbox.releases.next() => ContextInput::Release(message),
            _ = inbox.sweep.tick() => ContextInput::Sweep,
        }
    }

    async fn handle_input(self: &Arc<Self>, input: ContextInput) {
        match input {
            ContextInput::Release(message) => self.release(&message.payload).await,
            ContextInput::Sweep => self.sweep().await,
        }
    }

    async fn close_inbox(inbox: ContextInbox) {
        connection::unsubscribe(inbox.releases).await;
    }

    /// Reserves the prompt's tokens and prefills, or queues the job until there is room.
    async fn start(self: &Arc<Self>, job: GenerateJob) {
        let received = Instant::now();
        if job.stop.max_tokens <= 1 {
            // Answered here whole (an embedding, a one-token reply): nothing is exported, so
            // it takes none of the export budget and never waits for releases.
            self.answer_whole(job).await;
            return;
        }
        let admitted = locked(&self.ledger).try_reserve(job.prompt_ids.len());
        if admitted {
            self.start_prefill(job, received).await;
        } else {
            tracing::debug!(
                request_id = job.request_id,
                "export budget full: the prefill waits for releases"
            );
            locked(&self.backlog).push_back(WaitingPrefill { job, received });
        }
    }

    async fn cancel(self: &Arc<Self>, request_id: &str) {
        let waiting = {
            let mut backlog = locked(&self.backlog);
            let before = backlog.len();
            backlog.retain(|waiting| waiting.job.request_id != request_id);
            before != backlog.len()
        };
        if waiting {
            tracing::debug!(request_id, "cancelled while waiting for export budget");
        }
        // An export nobody will pull any more, or (its prefill in flight) one being made.
        let exporting = self.worker.in_flight.lock().contains_key(request_id);
        if locked(&self.ledger).cancel(request_id, exporting) {
            self.sweep().await;
        }
    }

    fn held(&self) -> usize {
        locked(&self.backlog).len() + usize::from(!locked(&self.ledger).is_empty())
    }

    fn queued(&self) -> usize {
        locked(&self.backlog).len()
    }

    fn kv_transfer(&self) -> Option<KvTransferStats> {
        Some(locked(&self.ledger).stats())
    }

    fn kv_peer(&self) -> Option<KvPeer> {
        Some(self.exporter.kv_peer())
    }

    fn kv_pull(&self) -> Option<KvPullStats> {
        None
    }

    /// Frees the exports nobody released (a second termination signal, or a lost device):
    /// their seals are cleared first, so a decode worker still reading one drops what it read.
    fn leave(&self) {
        let held = locked(&self.ledger).free_all();
        if held > 0 {
            tracing::warn!(held, "leaving with KV exports nobody released: freed");
        }
    }
}
