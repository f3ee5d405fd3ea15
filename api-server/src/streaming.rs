//! One generation over the bus: dispatch, the token stream, timeouts, cancellation.
//!
//! [`Generation::start`] subscribes to the request's stream subject *before* publishing the job
//! (a worker can answer at once, and NATS does not keep messages for late subscribers), sends
//! the job to the chosen worker's direct subject and waits for `Accepted`; no live worker or no
//! `Accepted` in time is an error before any byte of the response is written, so the client
//! gets a proper 503. [`Generation::next`] then yields the worker's tokens, turning silence into
//! timeout errors and a vanished worker into an error, never a hang.
//!
//! Cancellation travels with the stream: [`Generation`] owns a [`CancelGuard`] that publishes a
//! `CancelRequest` when the generation is dropped before the worker finished — when the client
//! disconnects (actix drops the response body stream or the handler future) or when a timeout
//! ends the request here.
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
    CancelRequest, FinishReason, GenerateJob, SamplingSpec, StopSpec, StreamMessage, TokenEvent,
    Usage, decode, encode,
};
use tandem_protocol::subjects::Subjects;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::router::WorkerRegistry;

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
    pub timeouts: Timeouts,
}

/// A request's job as validation and tokenization produced it.
pub struct JobSpec {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingSpec,
    pub stop: StopSpec,
}

pub struct Generation {
    request_id: String,
    worker_id: String,
    subscriber: async_nats::Subscriber,
    /// Messages read while waiting for `Accepted` that belong to the stream proper.
    pending: VecDeque<StreamMessage>,
    cancel: CancelGuard,
    registry: Arc<WorkerRegistry>,
    timeouts: Timeouts,
    deadline: Instant,
    record: RequestRecord,
    first_token_seen: bool,
    done: bool,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Generation {
    /// Picks a worker, sends it the job and waits for `Accepted`.
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
        let Some(worker_id) = dispatch.registry.pick(Instant::now()) else {
            return Err(fail(ApiError::NoLiveWorker, record));
        };
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
        // By then the client has had an error (no Accepted, or no first token).
        let deadline_unix_ms = unix_ms(SystemTime::now() + timeouts.accept + timeouts.first_token);
        let message = GenerateJob {
            request_id: request_id.clone(),
            prompt_ids: job.prompt_ids,
            sampling: job.sampling,
            stop: job.stop,
            stream_subject,
            deadline_unix_ms: Some(deadline_unix_ms),
            kv: None,
        };
        let mut cancel = CancelGuard::new(dispatch.bus.clone(), request_id.clone());
        if let Err(err) = dispatch
            .bus
            .client
            .publish(
                subjects.generate_direct(&worker_id),
                encode(&message).into(),
            )
            .await
        {
            cancel.disarm();
            return Err(fail(ApiError::bus("publishing the job", err), record));
        }
        tracing::debug!(%request_id, %worker_id, "job published");
        let mut generation = Generation {
            request_id,
            worker_id,
            subscriber,
            pending: VecDeque::new(),
            cancel,
            registry: Arc::clone(dispatch.registry),
            timeouts,
            deadline: Instant::now() + timeouts.request.saturating_sub(elapsed),
            record,
            first_token_seen: false,
            done: false,
        };
        match generation.await_accepted().await {
            Ok(()) => Ok(generation),
            Err(err) => {
                // Dropping `generation` counts the failure and publishes a cancel, in case the
                // job is only late and would otherwise run for nobody.
                generation.record.fail(&err);
                Err(err)
            }
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    async fn await_accepted(&mut self) -> Result<(), ApiError> {
        let accept_by = Instant::now() + self.timeouts.accept;
        loop {
            let remaining = accept_by.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(remaining, self.subscriber.next()).await {
                Err(_) => {
                    return Err(ApiError::NotAccepted {
                        worker_id: self.worker_id.clone(),
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
                    if worker_id != self.worker_id {
                        tracing::warn!(request_id = %self.request_id, expected = %self.worker_id,
                            %worker_id, "job accepted by another worker than the one it was sent to");
                        self.worker_id = worker_id;
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

    async fn next_inner(&mut self) -> Result<GenEvent, ApiError> {
        loop {
            let message = match self.pending.pop_front() {
                Some(message) => message,
                None => self.receive().await?,
            };
            match message {
                // Disaggregation messages: routed by the next change of this file.
                StreamMessage::Accepted { .. }
                | StreamMessage::KvReady { .. }
                | StreamMessage::KvPulled { .. } => continue,
                StreamMessage::Tokens { tokens } => {
                    self.first_token_seen = true;
                    return Ok(GenEvent::Tokens(tokens));
                }
                StreamMessage::Finished { reason, usage } => {
                    return match reason {
                        FinishReason::Stop | FinishReason::Length => {
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
    /// deadline, checking the worker's liveness meanwhile.
    async fn receive(&mut self) -> Result<StreamMessage, ApiError> {
        let (phase_timeout, phase_error): (Duration, fn(u64) -> ApiError) = if self.first_token_seen
        {
            (self.timeouts.stall, |timeout_ms| ApiError::Stalled {
                timeout_ms,
            })
        } else {
            (self.timeouts.first_token, |timeout_ms| {
                ApiError::FirstTokenTimeout { timeout_ms }
            })
        };
        let phase_end = Instant::now() + phase_timeout;
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
            if !self.registry.is_live(&self.worker_id, now) {
                return Err(ApiError::WorkerGone {
                    detail: format!("worker {} stopped sending heartbeats", self.worker_id),
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
