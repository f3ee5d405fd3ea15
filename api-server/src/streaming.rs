//! One generation over the bus: dispatch, the token stream, timeouts, cancellation, and the
//! hand-over of a disaggregated request from its context worker to its generation worker.
//!
//! [`Generation::start`] subscribes to the request's stream subject *before* publishing the job
//! (a worker can answer at once, and NATS does not keep messages for late subscribers), sends
//! the first job to the chosen worker's direct subject and waits for `Accepted`; no live worker
//! or no `Accepted` in time is an error before any byte of the response is written, so the
//! client gets a proper 503. [`Generation::next`] then yields the worker's tokens, turning
//! silence into timeout errors and a vanished worker into an error, never a hang.
//!
//! A disaggregated request ([`Prefill::Remote`]) starts in [`Phase::Prefill`]: the job goes to a
//! context worker's `prefill` subject. Its `kv_ready` makes [`Generation::next`] send the same
//! job with the KV handle to the generation worker ([`Phase::Generate`]); a context worker that
//! answers the whole request itself (it ended at its first token) is streamed as any worker.
//! A context worker that does not accept in time, stops heartbeating, or fails before any
//! token is replaced once by a local prefill on the generation worker
//! ([`Generation::fall_back`]); the client only notices the delay. docs/protocol.md has the
//! rules.
//!
//! Cancellation travels with the stream: [`Generation`] owns a [`CancelGuard`] that publishes a
//! `CancelRequest` when the generation is dropped before the worker finished — when the client
//! disconnects (actix drops the response body stream or the handler future) or when a timeout
//! ends the request here. The cancel goes to every worker, so it stops the request in either
//! phase.
//!
//! Text is the worker's: `TokenEvent.text` is produced by the worker's incremental detokenizer
//! after stop-string handling (docs/protocol.md, "Who detokenizes"), so the api-server only
//! concatenates it and never re-decodes tokens.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use futures::StreamExt;
use tandem_protocol::messages::{
    CancelRequest, FinishReason, GenerateJob, KvHandle, PullOutcome, SamplingSpec, StopSpec,
    StreamMessage, TokenEvent, Usage, decode, encode,
};
use tandem_protocol::subjects::Subjects;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::router::{FallbackReason, Prefill, WorkerRegistry};

/// How long each phase of a request may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From publishing the job to the worker's `Accepted`.
    pub accept: Duration,
    /// From `Accepted` to the first token.
    pub first_token: Duration,
    /// Between two stream messages once tokens flow.
    pub stall: Duration,
    /// From arrival to the last token.
    pub request: Duration,
}

/// How often a waiting request re-checks that its worker is still alive.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);

/// The bus connection and this model's subjects.
#[derive(Clone)]
pub struct Bus {
    pub client: Client,
    pub subjects: Subjects,
}

/// Publishes a `CancelRequest` for its request when dropped while armed.
pub struct CancelGuard {
    bus: Bus,
    request_id: String,
    armed: bool,
}

impl CancelGuard {
    fn new(bus: Bus, request_id: String) -> Self {
        CancelGuard {
            bus,
            request_id,
            armed: true,
        }
    }

    /// The worker has finished with the request: nothing to cancel.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Publishes the cancel now (once).
    fn fire(&mut self) {
        if !std::mem::take(&mut self.armed) {
            return;
        }
        let subject = self.bus.subjects.cancel();
        let payload = encode(&CancelRequest {
            request_id: self.request_id.clone(),
        });
        let client = self.bus.client.clone();
        let request_id = self.request_id.clone();
        // Drop cannot await; the publish is a channel send to the connection task.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match client.publish(subject, payload.into()).await {
                        Ok(()) => tracing::debug!(%request_id, "cancel published"),
                        Err(err) => tracing::warn!(%request_id, %err, "could not publish cancel"),
                    }
                });
            }
            Err(_) => tracing::warn!(%request_id, "no runtime to publish cancel on"),
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.fire();
    }
}

/// Counts one request in the metrics exactly once: with the outcome it ended with, or as
/// `client_disconnected` when dropped before an outcome was set.
pub struct RequestRecord {
    metrics: Metrics,
    endpoint: &'static str,
    arrival: Instant,
    last_token: Option<Instant>,
    outcome: Option<&'static str>,
}

impl RequestRecord {
    pub fn new(metrics: Metrics, endpoint: &'static str) -> Self {
        RequestRecord {
            metrics,
            endpoint,
            arrival: Instant::now(),
            last_token: None,
            outcome: None,
        }
    }

    pub fn arrival(&self) -> Instant {
        self.arrival
    }

    /// Records the arrival of `count` tokens at once (spread evenly for the inter-token
    /// histogram, since the worker batches what it produced since its last publish).
    fn tokens(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        let labels = [self.endpoint];
        match self.last_token {
            None => {
                self.metrics
                    .time_to_first_token
                    .with_label_values(&labels)
                    .observe(now.duration_since(self.arrival).as_secs_f64());
                let histogram = self.metrics.inter_token_latency.with_label_values(&labels);
                for _ in 1..count {
                    histogram.observe(0.0);
                }
            }
            Some(last) => {
                let gap = now.duration_since(last).as_secs_f64() / count as f64;
                let histogram = self.metrics.inter_token_latency.with_label_values(&labels);
                for _ in 0..count {
                    histogram.observe(gap);
                }
            }
        }
        self.last_token = Some(now);
    }

    fn usage(&self, usage: Usage) {
        self.metrics
            .prompt_tokens
            .inc_by(usage.prompt_tokens as u64);
        self.metrics
            .completion_tokens
            .inc_by(usage.completion_tokens as u64);
    }

    pub fn fail(&mut self, error: &ApiError) {
        self.outcome.get_or_insert(error.outcome());
    }

    fn succeed(&mut self) {
        self.outcome.get_or_insert("success");
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or("client_disconnected");
        self.metrics
            .requests
            .with_label_values(&[self.endpoint, outcome])
            .inc();
    }
}

/// What a generation yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Tokens(Vec<TokenEvent>),
    /// The last event: `reason` is `Stop` or `Length`.
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
}

/// Everything needed to dispatch one request.
pub struct Dispatch<'a> {
    pub bus: &'a Bus,
    pub registry: &'a Arc<WorkerRegistry>,
    pub metrics: &'a Metrics,
    pub timeouts: Timeouts,
}

/// A request's job as validation and tokenization produced it.
pub struct JobSpec {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingSpec,
    pub stop: StopSpec,
}

/// Which worker has the request now, doing what.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// A context worker prefills the prompt; `generate_id` is to take the decode job when the
    /// KV cache is ready.
    Prefill {
        context_id: String,
        generate_id: String,
    },
    /// A generation worker (`decode` or `both`) produces the tokens: after a hand-over, or
    /// after prefilling the prompt itself.
    Generate { worker_id: String },
}

impl Phase {
    fn worker_id(&self) -> &str {
        match self {
            Phase::Prefill { context_id, .. } => context_id,
            Phase::Generate { worker_id } => worker_id,
        }
    }

    fn set_worker_id(&mut self, id: String) {
        match self {
            Phase::Prefill { context_id, .. } => *context_id = id,
            Phase::Generate { worker_id } => *worker_id = id,
        }
    }
}

/// Suffix of the request id of a local-prefill retry (see [`Generation::fall_back`]).
const LOCAL_RETRY_SUFFIX: &str = "-local";

pub struct Generation {
    /// The client's request id (the response's `id`).
    request_id: String,
    /// The job in flight (a fallback changes its id and stream subject); a hand-over sends it
    /// again with the KV handle.
    job: GenerateJob,
    phase: Phase,
    subscriber: async_nats::Subscriber,
    /// Messages read while waiting for `Accepted` that belong to the stream proper.
    pending: VecDeque<StreamMessage>,
    cancel: CancelGuard,
    bus: Bus,
    registry: Arc<WorkerRegistry>,
    metrics: Metrics,
    timeouts: Timeouts,
    deadline: Instant,
    /// The first token is due by then: set when the first worker accepts, and not moved by
    /// a hand-over (prefill, transfer and first token share the budget); a fallback to a
    /// local prefill starts it again.
    first_token_by: Instant,
    record: RequestRecord,
    first_token_seen: bool,
    done: bool,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `instant` as unix milliseconds.
fn unix_ms_at(instant: Instant) -> u64 {
    unix_ms(SystemTime::now() + instant.saturating_duration_since(Instant::now()))
}

impl Generation {
    /// Routes the request, sends its first job (a prefill job to a context worker, or the
    /// whole job to a generation worker) and waits for `Accepted`. A context worker that does
    /// not accept in time is replaced by a local prefill on the generation worker here, so
    /// the client never sees it.
    pub async fn start(
        dispatch: Dispatch<'_>,
        request_id: String,
        job: JobSpec,
        record: RequestRecord,
    ) -> Result<Generation, ApiError> {
        let timeouts = dispatch.timeouts;
        // `record` counts the failure as it drops.
        let fail = |err: ApiError, mut record: RequestRecord| {
            record.fail(&err);
            err
        };
        let Some(route) = dispatch
            .registry
            .route(job.prompt_ids.len(), Instant::now())
        else {
            return Err(fail(ApiError::NoLiveWorker, record));
        };
        if let Some(reason) = route.counts_as_fallback() {
            tracing::warn!(%request_id, worker_id = %route.generate_id,
                "no live context worker: the decode worker prefills the prompt itself");
            dispatch
                .metrics
                .kv_transfer_fallbacks
                .with_label_values(&[reason.label()])
                .inc();
        }
        let subjects = &dispatch.bus.subjects;
        let stream_subject = subjects.stream(&request_id);
        let subscriber = match dispatch.bus.client.subscribe(stream_subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                return Err(fail(
                    ApiError::bus("subscribing to the token stream", err),
                    record,
                ));
            }
        };
        let elapsed = record.arrival().elapsed();
        let message = GenerateJob {
            request_id: request_id.clone(),
            prompt_ids: job.prompt_ids,
            sampling: job.sampling,
            stop: job.stop,
            stream_subject,
            // By then the client has had an error (no Accepted, or no first token).
            deadline_unix_ms: Some(unix_ms(
                SystemTime::now() + timeouts.accept + timeouts.first_token,
            )),
            kv: None,
            // The context worker exports where the chosen generation worker reads fastest.
            kv_reader: match route.prefill {
                Prefill::Remote { .. } => route.generate_kv_peer.clone(),
                Prefill::Local(_) => None,
            },
        };
        let (phase, subject) = match route.prefill {
            Prefill::Remote { context_id } => (
                Phase::Prefill {
                    generate_id: route.generate_id,
                    context_id: context_id.clone(),
                },
                subjects.prefill_direct(&context_id),
            ),
            Prefill::Local(_) => (
                Phase::Generate {
                    worker_id: route.generate_id.clone(),
                },
                subjects.generate_direct(&route.generate_id),
            ),
        };
        let mut cancel = CancelGuard::new(dispatch.bus.clone(), request_id.clone());
        if let Err(err) = dispatch
            .bus
            .client
            .publish(subject, encode(&message).into())
            .await
        {
            cancel.disarm();
            return Err(fail(ApiError::bus("publishing the job", err), record));
        }
        tracing::debug!(%request_id, ?phase, "job published");
        let now = Instant::now();
        let mut generation = Generation {
            request_id,
            job: message,
            phase,
            subscriber,
            pending: VecDeque::new(),
            cancel,
            bus: dispatch.bus.clone(),
            registry: Arc::clone(dispatch.registry),
            metrics: dispatch.metrics.clone(),
            timeouts,
            deadline: now + timeouts.request.saturating_sub(elapsed),
            first_token_by: now + timeouts.accept + timeouts.first_token,
            record,
            first_token_seen: false,
            done: false,
        };
        let accepted = match generation.await_accepted().await {
            Err(ApiError::NotAccepted { worker_id, .. })
                if matches!(generation.phase, Phase::Prefill { .. }) =>
            {
                let detail = format!(
                    "context worker {worker_id} did not accept within {} ms",
                    timeouts.accept.as_millis()
                );
                generation
                    .fall_back(FallbackReason::ContextTimeout, &detail)
                    .await
            }
            other => {
                other.map(|()| generation.first_token_by = Instant::now() + timeouts.first_token)
            }
        };
        match accepted {
            Ok(()) => Ok(generation),
            Err(err) => {
                // Dropping `generation` counts the failure and publishes a cancel, in case the
                // job is only late and would otherwise run for nobody.
                generation.record.fail(&err);
                Err(err)
            }
        }
    }

    /// The client's request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Waits for the current phase's worker to accept the job just published.
    async fn await_accepted(&mut self) -> Result<(), ApiError> {
        let accept_by = Instant::now() + self.timeouts.accept;
        loop {
            let remaining = accept_by.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(remaining, self.subscriber.next()).await {
                Err(_) => {
                    return Err(ApiError::NotAccepted {
                        worker_id: self.phase.worker_id().to_owned(),
                        timeout_ms: self.timeouts.accept.as_millis() as u64,
                    });
                }
                Ok(None) => {
                    return Err(ApiError::bus("waiting for Accepted", "subscription closed"));
                }
                Ok(Some(message)) => message,
            };
            match decode::<StreamMessage>("stream message", &message.payload) {
                Ok(StreamMessage::Accepted { worker_id }) => {
                    if worker_id != self.phase.worker_id() {
                        tracing::warn!(request_id = %self.request_id, expected = %self.phase.worker_id(),
                            %worker_id, "job accepted by another worker than the one it was sent to");
                        self.phase.set_worker_id(worker_id);
                    }
                    return Ok(());
                }
                // A worker that answers without `Accepted` (an immediate error, or tokens) has
                // the job all the same.
                Ok(other) => {
                    self.pending.push_back(other);
                    return Ok(());
                }
                Err(err) => {
                    tracing::warn!(request_id = %self.request_id, %err, "ignoring undecodable stream message")
                }
            }
        }
    }

    /// Gives up on the context worker and has the generation worker prefill the prompt
    /// itself. At most once per request: afterwards the phase is [`Phase::Generate`].
    ///
    /// The retry runs under a new request id (`{id}-local`) and stream subject, and the
    /// context worker's job is cancelled under the old one: the cancel goes to every worker,
    /// so under one id it could stop the retry too, and a context worker that was only late
    /// could otherwise still put its `kv_ready` or tokens on the stream being read.
    async fn fall_back(&mut self, reason: FallbackReason, detail: &str) -> Result<(), ApiError> {
        let Phase::Prefill {
            context_id,
            generate_id,
        } = self.phase.clone()
        else {
            return Err(ApiError::Internal(format!(
                "fallback ({}) requested for {} outside its prefill phase",
                reason.label(),
                self.request_id
            )));
        };
        tracing::warn!(request_id = %self.request_id, %context_id, reason = reason.label(),
            "context worker failed ({detail}): the generation worker prefills the prompt itself");
        self.metrics
            .kv_transfer_fallbacks
            .with_label_values(&[reason.label()])
            .inc();
        self.cancel.fire();
        let job_id = format!("{}{LOCAL_RETRY_SUFFIX}", self.request_id);
        let subjects = &self.bus.subjects;
        let stream_subject = subjects.stream(&job_id);
        self.subscriber = self
            .bus
            .client
            .subscribe(stream_subject.clone())
            .await
            .map_err(|err| ApiError::bus("subscribing to the token stream", err))?;
        self.pending.clear();
        self.cancel = CancelGuard::new(self.bus.clone(), job_id.clone());
        let worker_id = self.live_generate_worker(generate_id)?;
        let job = GenerateJob {
            request_id: job_id,
            stream_subject,
            deadline_unix_ms: Some(unix_ms(
                SystemTime::now() + self.timeouts.accept + self.timeouts.first_token,
            )),
            kv: None,
            kv_reader: None,
            ..self.job.clone()
        };
        self.bus
            .client
            .publish(subjects.generate_direct(&worker_id), encode(&job).into())
            .await
            .map_err(|err| ApiError::bus("publishing the job", err))?;
        self.job = job;
        self.phase = Phase::Generate { worker_id };
        self.await_accepted().await?;
        self.first_token_by = Instant::now() + self.timeouts.first_token;
        Ok(())
    }

    /// Sends the decode job with the context worker's KV handle.
    async fn hand_over(&mut self, handle: KvHandle) -> Result<(), ApiError> {
        let Phase::Prefill {
            context_id,
            generate_id,
        } = self.phase.clone()
        else {
            tracing::warn!(request_id = %self.request_id, "ignoring a kv_ready outside the prefill phase");
            return Ok(());
        };
        self.metrics.requests_disaggregated.inc();
        let worker_id = self.live_generate_worker(generate_id)?;
        tracing::debug!(request_id = %self.request_id, %context_id, %worker_id,
            blocks = handle.blocks.len(), "KV ready: decode job sent");
        let job = GenerateJob {
            // The decode worker starts it before the first token is due, or not at all.
            deadline_unix_ms: Some(unix_ms_at(self.first_token_by)),
            kv: Some(handle),
            kv_reader: None,
            ..self.job.clone()
        };
        self.bus
            .client
            .publish(
                self.bus.subjects.generate_direct(&worker_id),
                encode(&job).into(),
            )
            .await
            .map_err(|err| ApiError::bus("publishing the decode job", err))?;
        self.phase = Phase::Generate { worker_id };
        self.await_accepted().await
    }

    /// `chosen` while it is live, else another generation worker (the chosen one may have
    /// gone while the context worker prefilled).
    fn live_generate_worker(&self, chosen: String) -> Result<String, ApiError> {
        let now = Instant::now();
        if self.registry.is_live(&chosen, now) {
            return Ok(chosen);
        }
        let other = self
            .registry
            .pick_generate(now)
            .ok_or(ApiError::NoLiveWorker)?;
        tracing::warn!(request_id = %self.request_id, gone = %chosen, %other,
            "the chosen generation worker left; using another");
        Ok(other)
    }

    /// Accounts a decode worker's report of its KV pull.
    fn observe_pull(&self, worker_id: &str, bytes: u64, micros: u64, outcome: PullOutcome) {
        match outcome {
            PullOutcome::Pulled { transport } => {
                self.metrics.kv_transfer_bytes.inc_by(bytes);
                self.metrics
                    .kv_transfer_seconds
                    .observe(micros as f64 / 1e6);
                let transport = transport.as_str();
                self.metrics
                    .kv_transfers
                    .with_label_values(&[transport])
                    .inc();
                tracing::debug!(request_id = %self.request_id, %worker_id, bytes, micros,
                    transport, "KV pulled");
            }
            PullOutcome::Fallback { reason } => {
                self.metrics
                    .kv_transfer_fallbacks
                    .with_label_values(&[FallbackReason::PullFailed.label()])
                    .inc();
                tracing::warn!(request_id = %self.request_id, %worker_id,
                    "KV pull failed, the decode worker prefills itself: {reason}");
            }
        }
    }

    /// The next event; `None` after the last one (or after an error).
    pub async fn next(&mut self) -> Option<Result<GenEvent, ApiError>> {
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        match &result {
            Ok(GenEvent::Tokens(tokens)) => self.record.tokens(tokens.len(), Instant::now()),
            Ok(GenEvent::Finished { usage, .. }) => {
                self.done = true;
                self.cancel.disarm();
                self.record.usage(*usage);
                self.record.succeed();
            }
            Err(err) => {
                self.done = true;
                self.record.fail(err);
                // Timeouts and bus failures leave the worker running: stop it. After a worker
                // error the cancel is harmless.
                self.cancel.fire();
            }
        }
        Some(result)
    }

    /// Whether a failure now is the context worker's to be replaced by a local prefill: in
    /// the prefill phase, before the client has any token.
    fn context_failure_recoverable(&self) -> bool {
        matches!(self.phase, Phase::Prefill { .. }) && !self.first_token_seen
    }

    async fn next_inner(&mut self) -> Result<GenEvent, ApiError> {
        loop {
            let message = match self.pending.pop_front() {
                Some(message) => message,
                None => match self.receive().await {
                    Err(ApiError::WorkerGone { detail }) if self.context_failure_recoverable() => {
                        self.fall_back(FallbackReason::ContextGone, &detail).await?;
                        continue;
                    }
                    other => other?,
                },
            };
            match message {
                StreamMessage::Accepted { .. } => continue,
                StreamMessage::KvReady { handle } => {
                    self.hand_over(handle).await?;
                    continue;
                }
                StreamMessage::KvPulled {
                    worker_id,
                    bytes,
                    micros,
                    outcome,
                } => {
                    self.observe_pull(&worker_id, bytes, micros, outcome);
                    continue;
                }
                StreamMessage::Tokens { tokens } => {
                    self.first_token_seen = true;
                    return Ok(GenEvent::Tokens(tokens));
                }
                // See docs/protocol.md ("Fallbacks"): any failed end of the context worker's
                // job before a token is retried once as a local prefill; if the request
                // itself is at fault, the generation worker fails it the same way and its
                // error is the one the client gets.
                StreamMessage::Finished {
                    reason: reason @ (FinishReason::Cancelled | FinishReason::Error),
                    ..
                } if self.context_failure_recoverable() => {
                    let detail = format!("it ended the prefill with {reason:?}");
                    self.fall_back(FallbackReason::ContextError, &detail)
                        .await?;
                    continue;
                }
                StreamMessage::Error { message } if self.context_failure_recoverable() => {
                    self.fall_back(FallbackReason::ContextError, &message)
                        .await?;
                    continue;
                }
                StreamMessage::Finished { reason, usage } => {
                    return match reason {
                        FinishReason::Stop | FinishReason::Length => {
                            if matches!(self.phase, Phase::Prefill { .. }) {
                                // The context worker answered it all (it ended at its
                                // first token).
                                self.metrics.requests_disaggregated.inc();
                            }
                            Ok(GenEvent::Finished { reason, usage })
                        }
                        FinishReason::Cancelled => {
                            self.cancel.disarm();
                            Err(ApiError::WorkerGone {
                                detail: "the worker cancelled the request".into(),
                            })
                        }
                        FinishReason::Error => {
                            self.cancel.disarm();
                            Err(ApiError::Worker {
                                message: "the worker failed to finish the request".into(),
                            })
                        }
                    };
                }
                StreamMessage::Error { message } => {
                    self.cancel.disarm();
                    return Err(ApiError::Worker { message });
                }
            }
        }
    }

    /// Waits for the next stream message, bounded by the phase's timeout and the request's
    /// deadline, checking the current worker's liveness meanwhile.
    async fn receive(&mut self) -> Result<StreamMessage, ApiError> {
        let (phase_end, phase_timeout, phase_error): (Instant, Duration, fn(u64) -> ApiError) =
            if self.first_token_seen {
                (
                    Instant::now() + self.timeouts.stall,
                    self.timeouts.stall,
                    |timeout_ms| ApiError::Stalled { timeout_ms },
                )
            } else {
                (
                    self.first_token_by,
                    self.timeouts.first_token,
                    |timeout_ms| ApiError::FirstTokenTimeout { timeout_ms },
                )
            };
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Err(ApiError::RequestTimeout {
                    timeout_ms: self.timeouts.request.as_millis() as u64,
                });
            }
            if now >= phase_end {
                return Err(phase_error(phase_timeout.as_millis() as u64));
            }
            let worker_id = self.phase.worker_id();
            if !self.registry.is_live(worker_id, now) {
                return Err(ApiError::WorkerGone {
                    detail: format!("worker {worker_id} stopped sending heartbeats"),
                });
            }
            let wait = LIVENESS_CHECK.min(phase_end - now).min(self.deadline - now);
            match tokio::time::timeout(wait, self.subscriber.next()).await {
                Err(_) => continue,
                Ok(None) => {
                    return Err(ApiError::bus(
                        "reading the token stream",
                        "subscription closed",
                    ));
                }
                Ok(Some(message)) => {
                    match decode::<StreamMessage>("stream message", &message.payload) {
                        Ok(message) => return Ok(message),
                        Err(err) => {
                            return Err(ApiError::Internal(format!(
                                "undecodable message on the stream of {}: {err}",
                                self.request_id
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// Turns generation events into one endpoint's SSE chunks (`data: {json}\n\n` each).
pub trait ChunkFormat: 'static {
    /// Chunks sent before any token (the chat role chunk).
    fn opening(&mut self) -> Vec<bytes::Bytes>;
    /// The chunk carrying `tokens`, if they carry anything a client would see.
    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<bytes::Bytes>;
    /// The finish chunk and, with `include_usage`, the usage chunk.
    fn finished(&mut self, reason: FinishReason, usage: Usage) -> Vec<bytes::Bytes>;
}

/// `data: {json}\n\n`.
pub fn sse_data<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    let json = serde_json::to_string(value).expect("response chunks are JSON-representable");
    bytes::Bytes::from(format!("data: {json}\n\n"))
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// The SSE body of a streamed response: the format's chunks, an error event if the generation
/// fails mid-way, and `data: [DONE]` last. Dropping the stream (client gone) drops the
/// [`Generation`] and so cancels the request on the bus.
pub fn sse_body<F: ChunkFormat>(
    generation: Generation,
    mut format: F,
) -> impl futures::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
    let queue: VecDeque<bytes::Bytes> = format.opening().into();
    futures::stream::unfold(
        (Some(generation), format, queue),
        |(mut generation, mut format, mut queue)| async move {
            loop {
                if let Some(chunk) = queue.pop_front() {
                    return Some((Ok(chunk), (generation, format, queue)));
                }
                let running = generation.as_mut()?;
                match running.next().await {
                    Some(Ok(GenEvent::Tokens(tokens))) => {
                        queue.extend(format.tokens(&tokens));
                    }
                    Some(Ok(GenEvent::Finished { reason, usage })) => {
                        queue.extend(format.finished(reason, usage));
                        queue.push_back(bytes::Bytes::from_static(SSE_DONE));
                        generation = None;
                    }
                    Some(Err(err)) => {
                        queue.push_back(err.sse_event());
                        queue.push_back(bytes::Bytes::from_static(SSE_DONE));
                        generation = None;
                    }
                    None => generation = None,
                }
            }
        },
    )
}
