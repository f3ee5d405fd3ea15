//! What every role of a worker shares: its NATS client and subjects, who it is on the bus, the
//! engine handle, and the requests it has handed to the engine.
//!
//! [`Worker`] acknowledges jobs (`accepted` before anything else, then the deadline check) or
//! refuses them (`rejected`) when its queue is at its bound ([`QueueBound`]), registers each
//! engine request under its bus id before the engine can emit anything (so a cancel always
//! finds it), forwards its events to the request's stream subject from a task of its own, and
//! publishes heartbeats. What a role does with a job is in [`super::roles`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::Client;
use tandem_protocol::messages::{
    self, GenerateJob, Heartbeat, KvPeer, KvPullStats, KvTransferStats, RejectReason,
    StreamMessage, WorkerRole,
};
use tandem_protocol::payload::{self, TooLarge};
use tandem_protocol::subjects::Subjects;
use tokio::sync::mpsc;

use super::job::generation_request;
pub(super) use super::job::unix_ms;
use super::stream::{is_last, stream_messages};
use crate::engine::{
    AdapterRef, EngineError, EngineEvent, EngineHandle, GenerationRequest, RequestId,
};

/// How long one publish may wait. async-nats buffers publishes while it reconnects and makes
/// callers wait once that buffer is full; a worker cut off from NATS must still notice signals
/// and finish its drain, so no publish waits longer than this.
pub(super) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Who a worker is on the bus: its heartbeat's fixed fields.
pub(super) struct Identity {
    pub worker_id: String,
    pub served_name: String,
    /// The served model directory's fingerprint (KV handles carry it).
    pub model_fingerprint: String,
    pub role: WorkerRole,
    pub device: String,
    pub total_kv_blocks: usize,
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Sequences the engine runs at once at most (`--max-num-seqs`).
    pub max_running: usize,
    /// Its weights' and KV cache's number formats.
    pub numerics: messages::WorkerNumerics,
    /// The LoRA adapters it serves, in the model's order (a job's adapter is its index here).
    pub lora_adapters: Vec<messages::LoraAdapterInfo>,
}

/// The bound on a worker's queue: the jobs it has accepted and not started (waiting in the
/// engine, pulls waiting for room in the KV cache, prefills waiting for export room), past
/// those its engine starts at its next step (one per free sequence slot: [`queue_length`]). A
/// job that would go past it is refused (`rejected`) instead of growing the queue for as long
/// as api-servers keep sending: they send it to another worker or answer 429.
pub(super) struct QueueBound {
    /// `None`: no bound.
    max: Option<usize>,
    /// The last job found the queue full (logged once per episode, not per job).
    full: AtomicBool,
}

impl QueueBound {
    pub fn new(max: Option<usize>) -> Self {
        Self {
            max,
            full: AtomicBool::new(false),
        }
    }

    pub fn max(&self) -> Option<usize> {
        self.max
    }

    /// Whether one more job may join a queue of `queued`; says in the log when the queue
    /// fills up and when it has room again.
    pub fn admits(&self, queued: usize) -> bool {
        let admits = self.max.is_none_or(|max| queued < max);
        let was_full = self.full.swap(!admits, Ordering::Relaxed);
        match (was_full, admits) {
            (false, false) => tracing::warn!(
                queued,
                max_queued = self.max,
                "queue full: refusing jobs (api-servers send them elsewhere or answer 429)"
            ),
            (true, true) => tracing::info!(queued, "queue has room again: taking jobs"),
            _ => {}
        }
        admits
    }
}

/// The queue a new job would join: the engine's requests not started (`engine_queued`) past
/// its free sequence slots (`max_running - running`: those start at its next step, so a burst
/// at an idle worker fills its slots before its queue), plus `role_queued` held by the role,
/// which no free slot starts.
fn queue_length(
    engine_queued: usize,
    running: usize,
    max_running: usize,
    role_queued: usize,
) -> usize {
    engine_queued.saturating_sub(max_running.saturating_sub(running)) + role_queued
}

/// What a role adds to a heartbeat.
#[derive(Default)]
pub(super) struct RoleLoad {
    /// Jobs the role holds outside the engine, not started (part of `queued`).
    pub queued: usize,
    pub kv_transfer: Option<KvTransferStats>,
    pub kv_peer: Option<KvPeer>,
    pub kv_pull: Option<KvPullStats>,
    /// The prefix cache as routers see it, when the engine caches prompts.
    pub prefix_cache: Option<messages::PrefixCacheInfo>,
}

/// The shared part of a worker, whatever its role.
pub(super) struct Worker {
    pub client: Client,
    pub subjects: Subjects,
    pub identity: Identity,
    pub engine: EngineHandle,
    /// The tokenizer's end-of-sequence ids, added to every job's stop ids.
    pub model_stop_ids: Arc<[u32]>,
    /// Compiles jobs' grammars.
    pub grammars: Arc<super::grammar::WorkerGrammars>,
    pub in_flight: InFlight,
    pub queue: QueueBound,
    /// A bus test's wait per batch of a stream's events
    /// ([`super::test_hooks::TestHooks::stream_delay`]); `None` in production.
    pub stream_delay: Option<Duration>,
}

/// The requests this worker has handed to its engine: bus request id -> engine request id.
/// An entry lives from the submission until the request's last stream message is out.
#[derive(Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<HashMap<String, RequestId>>>);

impl InFlight {
    /// The map, locked; callers hold it across a submission so the entry exists before the
    /// engine's first event.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, RequestId>> {
        locked(&self.0)
    }

    pub fn remove(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Worker {
    /// The NATS server's `max_payload`, from its `INFO` at the last (re)connect.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// Publishes a stream message within the server's `max_payload` ([`publish_stream`]),
    /// each publish bounded by [`PUBLISH_TIMEOUT`]. One that cannot fit is logged and not
    /// sent (the roles check what could be large, a `kv_ready`, before).
    pub async fn publish(&self, subject: String, message: &StreamMessage) {
        if let Err(too_large) = publish_stream(&self.client, &subject, message.clone()).await {
            tracing::error!(subject, "a stream message not sent: it is {too_large}");
        }
    }

    /// Jobs accepted and not started: queued in the engine (or on their way to it), and
    /// `role_queued` held by the role outside the engine.
    pub fn queued(&self, role_queued: usize) -> usize {
        self.engine.queued_requests() + role_queued
    }

    /// The queue the bound applies to ([`queue_length`]).
    fn queue_length(&self, role_queued: usize) -> usize {
        let active = self.engine.active_requests();
        let running = active - self.engine.waiting_requests().min(active);
        queue_length(
            self.engine.queued_requests(),
            running,
            self.identity.max_running,
            role_queued,
        )
    }

    /// Decodes a job and acknowledges it (`accepted`), or refuses it (`rejected`) when the
    /// queue (`role_queued` of it held by the role) is at its bound; `None` for a refused or
    /// malformed job, or one whose deadline passed before it started. The job is the role's
    /// to start, at once (so the next job finds it counted).
    pub async fn accept(&self, payload: &[u8], role_queued: usize) -> Option<GenerateJob> {
        let job: GenerateJob = match messages::decode("generate job", payload) {
            Ok(job) => job,
            Err(e) => {
                // Without a parsed job there is no stream subject to answer on.
                tracing::warn!("dropping a malformed job: {e}");
                return None;
            }
        };
        if !self.queue.admits(self.queue_length(role_queued)) {
            tracing::debug!(request_id = job.request_id, "queue full: job refused");
            self.publish(
                job.stream_subject.clone(),
                &StreamMessage::Rejected {
                    worker_id: self.identity.worker_id.clone(),
                    reason: RejectReason::QueueFull,
                },
            )
            .await;
            return None;
        }
        self.publish(
            job.stream_subject.clone(),
            &StreamMessage::Accepted {
                worker_id: self.identity.worker_id.clone(),
            },
        )
        .await;
        if self.past_deadline(&job).await {
            return None;
        }
        Some(job)
    }

    /// Drops a job whose deadline passed before it started (its client has been answered).
    pub async fn past_deadline(&self, job: &GenerateJob) -> bool {
        if job
            .deadline_unix_ms
            .is_none_or(|deadline| unix_ms() <= deadline)
        {
            return false;
        }
        tracing::warn!(
            request_id = job.request_id,
            "dropping a job whose deadline passed before it started (the client was answered)"
        );
        self.publish(
            job.stream_subject.clone(),
            &StreamMessage::Error {
                message: "the request's deadline passed before a worker started it".into(),
                param: None,
            },
        )
        .await;
        true
    }

    /// Hands a request to the engine with `submit`, registered under `request_id` before the
    /// engine can emit anything; returns its engine id and its events.
    pub fn submit(
        &self,
        request_id: &str,
        submit: impl FnOnce(
            &EngineHandle,
            mpsc::UnboundedSender<EngineEvent>,
        ) -> Result<RequestId, EngineError>,
    ) -> Result<(RequestId, mpsc::UnboundedReceiver<EngineEvent>), EngineError> {
        let (sink, events) = mpsc::unbounded_channel::<EngineEvent>();
        let mut in_flight = self.in_flight.lock();
        let engine_id = submit(&self.engine, sink)?;
        in_flight.insert(request_id.to_owned(), engine_id);
        Ok((engine_id, events))
    }

    /// Starts a request that streams to its client from here: submitted with `submit`, its
    /// events forwarded to the stream subject by a task of its own.
    pub async fn start_request(
        &self,
        job: &GenerateJob,
        submit: impl FnOnce(
            &EngineHandle,
            mpsc::UnboundedSender<EngineEvent>,
        ) -> Result<RequestId, EngineError>,
    ) {
        match self.submit(&job.request_id, submit) {
            Ok((engine_id, events)) => {
                tracing::debug!(
                    request_id = job.request_id,
                    engine_id,
                    prompt_tokens = job.prompt_ids.len(),
                    resumed_tokens = job.resume_ids.len(),
                    "job queued"
                );
                tokio::spawn(self.forward(job, events, Vec::new()));
            }
            Err(e) => self.refuse(job, &e).await,
        }
    }

    /// The engine request for `job`: its grammar compiled, its LoRA adapter found. A grammar
    /// that does not compile or an adapter this worker does not serve ends the request: its
    /// client is told why, and `Err` says there is nothing to run.
    pub async fn job_request(&self, job: &GenerateJob) -> Result<GenerationRequest, ()> {
        let adapter = match self.job_adapter(job) {
            Ok(adapter) => adapter,
            // Not the request's fault (an api-server sends a job only to workers that list
            // its adapter): another worker may take it.
            Err(message) => {
                self.end_job(job, message).await;
                return Err(());
            }
        };
        let grammar = match self.grammars.compile(job).await {
            Ok(grammar) => grammar,
            Err(message) => {
                self.end_job(job, message).await;
                return Err(());
            }
        };
        let mut request = generation_request(job, &self.model_stop_ids);
        request.grammar = grammar;
        request.adapter = adapter;
        Ok(request)
    }

    /// The adapter `job` names, if any, as the engine knows it.
    fn job_adapter(&self, job: &GenerateJob) -> Result<Option<AdapterRef>, String> {
        let Some(name) = &job.lora else {
            return Ok(None);
        };
        let index = self
            .identity
            .lora_adapters
            .iter()
            .position(|a| &a.name == name)
            .ok_or_else(|| {
                format!(
                    "worker {} does not serve the LoRA adapter `{name}` (it serves {})",
                    self.identity.worker_id,
                    match self.identity.lora_adapters.len() {
                        0 => "none".to_string(),
                        _ => self
                            .identity
                            .lora_adapters
                            .iter()
                            .map(|a| format!("`{}`", a.name))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                )
            })?;
        Ok(Some(AdapterRef {
            index: index as u32,
            fingerprint: self.identity.lora_adapters[index].fingerprint.clone(),
        }))
    }

    /// The model fingerprint `job`'s K/V are computed with: its adapter's, or the model's.
    pub fn job_fingerprint(&self, job: &GenerateJob) -> &str {
        job.lora
            .as_ref()
            .and_then(|name| self.identity.lora_adapters.iter().find(|a| &a.name == name))
            .map_or(&self.identity.model_fingerprint, |a| &a.fingerprint)
    }

    /// Ends `job` before it runs: its client is told `message`.
    async fn end_job(&self, job: &GenerateJob, message: String) {
        tracing::info!(request_id = job.request_id, "{message}");
        self.publish(
            job.stream_subject.clone(),
            &StreamMessage::Error {
                message,
                param: None,
            },
        )
        .await;
    }

    /// Answers a job the engine would not take with an error.
    pub async fn refuse(&self, job: &GenerateJob, error: &EngineError) {
        self.publish(
            job.stream_subject.clone(),
            &StreamMessage::Error {
                message: format!("the worker cannot take the request: {error}"),
                param: None,
            },
        )
        .await;
    }

    /// Forwards a submitted request's events (`taken`, read already, then the rest of
    /// `events`) to its stream subject until its last message, then forgets the request.
    pub fn forward(
        &self,
        job: &GenerateJob,
        events: mpsc::UnboundedReceiver<EngineEvent>,
        taken: Vec<EngineEvent>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        forward(
            self.client.clone(),
            StreamTarget {
                subject: job.stream_subject.clone(),
                request_id: job.request_id.clone(),
            },
            Events { taken, events },
            job.sampling.logprobs.is_some(),
            // A resumed request's tokens continue the numbering of the ones resumed.
            job.resume_ids.len() as u32,
            self.in_flight.clone(),
            self.stream_delay,
        )
    }

    /// Cancels the engine request of `request_id`, if it has one.
    pub fn cancel(&self, request_id: &str) {
        let engine_id = self.in_flight.lock().get(request_id).copied();
        if let Some(engine_id) = engine_id {
            tracing::debug!(request_id, "cancelled by the api-server");
            // An engine that has stopped has nothing left to cancel.
            let _ = self.engine.cancel(engine_id);
        }
    }

    /// Cancels every engine request (a second termination signal).
    pub fn cancel_all(&self) {
        for &engine_id in self.in_flight.lock().values() {
            let _ = self.engine.cancel(engine_id);
        }
    }

    /// Publishes a heartbeat: the engine's load and queue bound, and what the role adds.
    pub async fn publish_heartbeat(&self, draining: bool, role: RoleLoad) {
        let active = self.engine.active_requests();
        let waiting = self.engine.waiting_requests().min(active);
        let identity = &self.identity;
        let heartbeat = Heartbeat {
            worker_id: identity.worker_id.clone(),
            role: identity.role,
            model: identity.served_name.clone(),
            device: identity.device.clone(),
            running: (active - waiting) as u32,
            queued: self.queued(role.queued) as u32,
            free_kv_blocks: self.engine.free_blocks() as u32,
            total_kv_blocks: identity.total_kv_blocks as u32,
            draining,
            interval_ms: identity.heartbeat.as_millis() as u64,
            kv_transfer: role.kv_transfer,
            kv_peer: role.kv_peer,
            kv_pull: role.kv_pull,
            lora_adapters: identity.lora_adapters.clone(),
            max_queued: self.queue.max().map(|max| max as u32),
            max_running: Some(identity.max_running as u32),
            engine: Some({
                let progress = self.engine.progress();
                messages::EngineProgress {
                    steps: progress.steps,
                    failed_steps: progress.failed_steps,
                    preemptions: progress.preemptions,
                    draft_tokens: progress.draft_tokens,
                    accepted_draft_tokens: progress.accepted_draft_tokens,
                }
            }),
            prefix_cache: role.prefix_cache,
            numerics: Some(identity.numerics.clone()),
        };
        let subject = self.subjects.heartbeat(identity.role, &identity.worker_id);
        publish_bounded(
            &self.client,
            subject,
            messages::encode(&heartbeat),
            "a heartbeat",
        )
        .await;
    }

    /// Waits (bounded) until the engine requests have published their last messages.
    pub async fn wait_for_streams(&self, limit: Duration) {
        let start = Instant::now();
        while !self.in_flight.is_empty() && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Where a request's events go: its stream subject, under its id.
struct StreamTarget {
    subject: String,
    request_id: String,
}

/// A request's events: some read already, then the channel.
struct Events {
    taken: Vec<EngineEvent>,
    events: mpsc::UnboundedReceiver<EngineEvent>,
}

/// Forwards one request's events to its stream subject until its last message, then forgets
/// the request.
async fn forward(
    client: Client,
    StreamTarget {
        subject,
        request_id,
    }: StreamTarget,
    Events { taken, mut events }: Events,
    with_logprobs: bool,
    mut next_index: u32,
    in_flight: InFlight,
    stream_delay: Option<Duration>,
) {
    let mut ended = false;
    let mut taken = Some(taken).filter(|taken| !taken.is_empty());
    loop {
        let mut batch = match taken.take() {
            Some(taken) => taken,
            None => match events.recv().await {
                Some(first) => vec![first],
                None => break,
            },
        };
        if let Some(delay) = stream_delay {
            tokio::time::sleep(delay).await;
        }
        while let Ok(event) = events.try_recv() {
            batch.push(event);
        }
        for message in stream_messages(batch, with_logprobs, &mut next_index) {
            ended |= is_last(&message);
            if let Err(too_large) = publish_stream(&client, &subject, message).await {
                // Only a token whose alternatives alone pass the limit gets here. Dropping
                // `events` cancels the engine request.
                tracing::error!(%request_id, "a generated token is {too_large}: request failed");
                let message = StreamMessage::Error {
                    message: format!(
                        "a generated token with its log-probabilities is {too_large}; ask \
                         for fewer top_logprobs"
                    ),
                    param: None,
                };
                let _ = publish_stream(&client, &subject, message).await;
                ended = true;
                break;
            }
        }
        if ended {
            break;
        }
    }
    if !ended {
        // The engine thread went away without a last event (it panicked).
        let message = StreamMessage::Error {
            message: "the worker's engine stopped unexpectedly".into(),
            param: None,
        };
        publish_bounded(&client, subject, messages::encode(&message), "an error").await;
    }
    in_flight.remove(&request_id);
}

/// Publishes one stream message within the NATS server's `max_payload` (read now: a
/// reconnect may have reached a server with another limit): a `tokens` message too large for
/// one is split into several, numbered on from its `index`
/// ([`payload::tokens_messages`]). A message that cannot fit (any other kind, or a single
/// token) is not sent: `Err`.
pub(super) async fn publish_stream(
    client: &Client,
    subject: &str,
    message: StreamMessage,
) -> Result<(), TooLarge> {
    let max_payload = client.max_payload();
    let payloads = match message {
        StreamMessage::Tokens { tokens, index } => {
            let count = tokens.len();
            let payloads = payload::tokens_messages(tokens, index, max_payload)?;
            if payloads.len() > 1 {
                tracing::debug!(
                    subject,
                    tokens = count,
                    messages = payloads.len(),
                    max_payload,
                    "tokens split into several messages to fit max_payload"
                );
            }
            payloads
        }
        StreamMessage::PromptLogprobs { start, logprobs } => {
            payload::prompt_logprobs_messages(start, logprobs, max_payload)?
        }
        other => vec![payload::encode_within(&other, max_payload)?],
    };
    for payload in payloads {
        publish_bounded(client, subject.to_owned(), payload, "a stream message").await;
    }
    Ok(())
}

/// Publishes `payload` on `subject`, giving up (with a warning) after [`PUBLISH_TIMEOUT`].
pub(super) async fn publish_bounded(
    client: &Client,
    subject: String,
    payload: Vec<u8>,
    what: &str,
) {
    match tokio::time::timeout(
        PUBLISH_TIMEOUT,
        client.publish(subject.clone(), payload.into()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(subject, "publishing {what}: {e}"),
        Err(_) => tracing::warn!(
            subject,
            "publishing {what}: NATS did not take it within {PUBLISH_TIMEOUT:?}"
        ),
    }
}

/// Locks `mutex`, also after a panic elsewhere (the data is plain bookkeeping, valid between
/// any two statements).
pub(super) fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_queue_admits_jobs_below_its_bound_only() {
        let bound = QueueBound::new(Some(2));
        assert!(bound.admits(0) && bound.admits(1));
        assert!(!bound.admits(2), "at the bound: refused");
        assert!(!bound.admits(7));
        assert!(bound.full.load(Ordering::Relaxed));
        assert!(bound.admits(1), "room again");
        assert!(!bound.full.load(Ordering::Relaxed));
        let unbounded = QueueBound::new(None);
        assert!(unbounded.admits(usize::MAX - 1));
        assert_eq!(unbounded.max(), None);
    }

    #[test]
    fn free_sequence_slots_are_not_queue() {
        // An idle engine of 2 slots: the first 2 jobs start at its next step.
        assert_eq!(queue_length(0, 0, 2, 0), 0);
        assert_eq!(queue_length(2, 0, 2, 0), 0);
        assert_eq!(queue_length(3, 0, 2, 0), 1);
        // Slots taken: every job not started waits.
        assert_eq!(queue_length(3, 2, 2, 0), 3);
        assert_eq!(queue_length(1, 1, 2, 0), 0);
        // Prefills waiting for export room wait whatever the slots.
        assert_eq!(queue_length(0, 0, 2, 4), 4);
    }
}
