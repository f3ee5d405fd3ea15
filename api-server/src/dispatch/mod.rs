//! Dispatch: one request's generation over the bus, as a route drives it.
//!
//! [`Generation::start`] routes the request, subscribes to its stream subject *before*
//! publishing the job (a worker can answer at once, and NATS does not keep messages for late
//! subscribers), sends the first job to the chosen worker's direct subject and waits for
//! `Accepted`; no live worker or no `Accepted` in time is an error before any byte of the
//! response is written, so the client gets a proper 503. [`Generation::next`] then yields the
//! worker's tokens, turning silence into timeout errors and a vanished worker into an error,
//! never a hang; [`Generation::collect`] gathers them all for a response that is not streamed.
//!
//! The rest of a request's life is in the files named for it:
//! - [`handover`]: a disaggregated request starts in the prefill phase on a context worker;
//!   its `kv_ready` sends the decode job to the generation worker.
//! - [`fallback`]: when the context worker fails, it is replaced once by a local prefill on
//!   the generation worker; the client only notices the delay.
//! - [`migrate`]: when the generation worker fails mid-stream, the request moves to another
//!   one with the tokens generated so far; the client's stream goes on without a gap.
//! - [`reroute`]: a worker whose queue is full refuses a job (`rejected`); the same job goes to
//!   another worker, or the client gets 429.
//! - [`cancel`]: a generation dropped before its worker finished (the client went away, or a
//!   timeout ended it here) cancels the request on the bus.
//! - [`record`]: the request's metrics (token timing, usage, outcome).
//! - [`bus`]: the connection and subjects, subscribing to a stream and publishing a job.
//!
//! The SSE form of a generation is [`crate::sse`]; docs/protocol.md has the bus rules.
//!
//! Text is the worker's: `TokenEvent.text` is produced by the worker's incremental detokenizer
//! after stop-string handling (docs/protocol.md, "Who detokenizes"), so the api-server only
//! concatenates it and never re-decodes tokens.

pub mod bus;
pub mod cancel;
pub mod fallback;
pub mod handover;
pub mod migrate;
pub mod record;
pub mod reroute;
pub mod samples;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tandem_protocol::messages::{
    FinishReason, GenerateJob, PromptLogprob, SampleGroup, SamplingSpec, StopSpec, StreamMessage,
    TokenEvent, Usage, decode,
};

pub use bus::Bus;
pub use record::RequestRecord;

use crate::error::ApiError;
use crate::metrics::{Event, Metrics};
use crate::router::{ContextJob, GenerationJob, LocalPrefill, NoRoute, Prefill, WorkerRegistry};
use cancel::CancelGuard;
use handover::Phase;
use migrate::MigrationReason;

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

/// What a generation yields.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The logprobs of prompt positions 1 .. (a job with `sampling.prompt_logprobs`), all of
    /// them, once, before the first `Tokens` (or `Finished`, with `max_tokens` 0).
    PromptLogprobs(Vec<PromptLogprob>),
    Tokens(Vec<TokenEvent>),
    /// An embedding job's answer ([`JobSpec::embedding`]): the prompt's last hidden state,
    /// once, just before `Finished`.
    Embedding(Vec<f32>),
    /// The last event: `reason` is `Stop` or `Length`.
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
}

/// A whole generation, for a response that is not streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// The prompt's logprobs (positions 1 ..), when the job asked for them.
    pub prompt_logprobs: Vec<PromptLogprob>,
    /// Every token, in order.
    pub tokens: Vec<TokenEvent>,
    /// `Stop` or `Length`.
    pub reason: FinishReason,
    pub usage: Usage,
    /// An embedding job's answer.
    pub embedding: Option<Vec<f32>>,
}

impl Completed {
    /// The generated text (the tokens' texts, concatenated).
    pub fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }
}

/// Everything needed to dispatch one request.
#[derive(Clone, Copy)]
pub struct Dispatch<'a> {
    pub bus: &'a Bus,
    pub registry: &'a Arc<WorkerRegistry>,
    pub metrics: &'a Metrics,
    pub timeouts: Timeouts,
    /// How often a request may move to another worker (`--migration-limit`).
    pub migration_limit: u32,
}

/// A request's job as validation and tokenization produced it.
pub struct JobSpec {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingSpec,
    pub stop: StopSpec,
    /// The request field that holds the prompt (`messages`, `prompt`): what a 400 names.
    pub prompt_param: &'static str,
    /// Which choice of a request with `n` > 1 this job is.
    pub samples: Option<SampleGroup>,
    /// The salt of its prompt in the workers' prefix caches (its `cache_salt`, after its API
    /// key's when salted by key).
    pub cache_salt: Option<String>,
    /// The request's scheduling priority on the workers (vLLM's `priority`).
    pub priority: i32,
    /// The request's `prediction`, tokenized: the decoding worker's draft source.
    pub prediction_ids: Vec<u32>,
    /// An embedding job (`/v1/embeddings`): the prompt's last hidden state comes back
    /// ([`GenEvent::Embedding`]), nothing is generated (`stop.max_tokens` 0).
    pub embedding: bool,
    /// The LoRA adapter the request names as its `model` (only workers serving it take the
    /// job); `None`: the base model.
    pub lora: Option<String>,
}

/// One request on the bus, from its first job to its last token.
pub struct Generation {
    /// The client's request id (the response's `id`).
    request_id: String,
    /// The job last published (a fallback or migration changes its id and stream subject; a
    /// hand-over adds the KV handle): what a worker that refuses it passes on.
    job: GenerateJob,
    /// The workers that refused the job now in flight (their queues are full), until one
    /// accepts it.
    refused: Vec<String>,
    phase: Phase,
    /// The prefill job a context worker holds while the phase is [`Phase::Prefill`]: dropped
    /// when the phase ends, which tells the registry the worker's queue has room again.
    context_job: Option<ContextJob>,
    /// The job (and its prompt's blocks) counted against its generation worker's load, until
    /// this ends or the job moves to another worker.
    generation_job: GenerationJob,
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
    /// Set by a migration until the new worker's first token: its prefill of prompt and
    /// resumed tokens runs under the first-token timeout, not the stall timeout.
    resuming: bool,
    /// The ids of the tokens the client has received, in order: a migration's `resume_ids`,
    /// and what the next `tokens` message's `index` must be.
    received_ids: Vec<u32>,
    /// A `tokens` message without `index` arrived (a worker that predates numbering): the
    /// stream cannot be checked against the usage it ends with.
    unnumbered: bool,
    migrations: u32,
    migration_limit: u32,
    done: bool,
    /// Prompt logprobs: how many the job asks for (the prompt's positions after the first;
    /// `None`: none), those received (a migrated job sends them again: kept once), and
    /// whether they went to the caller.
    prompt_logprobs_expected: Option<usize>,
    prompt_logprobs: Vec<PromptLogprob>,
    prompt_logprobs_received: usize,
    prompt_logprobs_delivered: bool,
    /// An event held back while the prompt logprobs go first.
    held: Option<GenEvent>,
    /// An embedding job's answer, from its `embedding` message until its `finished`.
    embedding: Option<Vec<f32>>,
    /// The request's place under `--max-pending-requests`, given back when the generation
    /// (and with it a streamed response's body) is dropped.
    /// (Shared by the choices of a request with `n` > 1: given back when the last ends.)
    admitted: Option<Arc<crate::admission::Admitted>>,
}

/// The client's error when no worker can take a request's generation job.
pub(crate) fn no_route_error(no_route: NoRoute) -> ApiError {
    match no_route {
        NoRoute::NoLiveWorker => ApiError::NoLiveWorker,
        NoRoute::AllFull => ApiError::WorkersFull { pool: "generation" },
    }
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
    /// Holds `admitted` as long as this generation lives.
    pub(crate) fn hold(&mut self, admitted: Arc<crate::admission::Admitted>) {
        self.admitted = Some(admitted);
    }

    /// Routes the request, sends its first job (a prefill job to a context worker, or the
    /// whole job to a generation worker) and waits for `Accepted`. A context worker that does
    /// not accept in time is replaced by a local prefill on the generation worker here, so
    /// the client never sees it.
    pub async fn start(
        dispatch: Dispatch<'_>,
        request_id: String,
        job: JobSpec,
        mut record: RequestRecord,
    ) -> Result<Generation, ApiError> {
        // Prompt logprobs are computed where the prompt is prefilled: the generation worker.
        // An embedding is routed as any prompt: a context worker answers it whole (it has
        // nothing to hand over), as it answers a request that ends at its first token.
        let route = if job.sampling.prompt_logprobs.is_some() {
            dispatch.registry.route_local(
                1,
                LocalPrefill::PromptLogprobs,
                job.lora.as_deref(),
                Instant::now(),
            )
        } else {
            dispatch.registry.route_salted(
                &job.prompt_ids,
                job.cache_salt.as_deref(),
                job.lora.as_deref(),
                Instant::now(),
            )
        };
        let route = route.map_err(|no_route| {
            let err = no_route_error(no_route);
            record.fail(&err);
            err
        })?;
        Self::start_on(dispatch, route, request_id, job, record).await
    }

    /// [`Self::start`] on a route chosen before (the choices of a request with `n` > 1 share
    /// one: [`WorkerRegistry::route_samples`]).
    pub async fn start_on(
        dispatch: Dispatch<'_>,
        route: crate::router::Route,
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
        let bus = dispatch.bus;
        let stream_subject = bus.stream_subject(&request_id);
        let elapsed = record.arrival().elapsed();
        let prompt_logprobs_expected = job
            .sampling
            .prompt_logprobs
            .map(|_| job.prompt_ids.len().saturating_sub(1));
        let message = GenerateJob {
            request_id: request_id.clone(),
            prompt_ids: job.prompt_ids,
            sampling: job.sampling,
            stop: job.stop,
            stream_subject: stream_subject.clone(),
            // By then the client has had an error (no Accepted, or no first token).
            deadline_unix_ms: Some(unix_ms(
                SystemTime::now() + timeouts.accept + timeouts.first_token,
            )),
            kv: None,
            resume_ids: Vec::new(),
            samples: job.samples,
            cache_salt: job.cache_salt,
            priority: job.priority,
            prediction_ids: job.prediction_ids,
            // The context worker exports where the chosen generation worker reads fastest.
            kv_reader: match route.prefill {
                Prefill::Remote { .. } => route.generate_kv_peer.clone(),
                Prefill::Local(_) => None,
            },
            embedding: job.embedding,
            lora: job.lora,
        };
        // Sized before anything is sent: a job the bus cannot carry is the client's 400.
        let encoded = match bus.encode_job(&message) {
            Ok(encoded) => encoded,
            Err(too_large) => {
                let err = ApiError::prompt_too_large(&message, too_large, job.prompt_param);
                tracing::debug!(%request_id, prompt_tokens = message.prompt_ids.len(),
                    "refused: the job is {too_large}");
                return Err(fail(err, record));
            }
        };
        fallback::record_route(dispatch.metrics, &request_id, &route);
        let subscriber = match bus.subscribe(&stream_subject).await {
            Ok(subscriber) => subscriber,
            Err(err) => return Err(fail(err, record)),
        };
        let generation_job = GenerationJob::new(
            Arc::clone(dispatch.registry),
            route.generate_id.clone(),
            route.generate_blocks,
        );
        let context_job = match &route.prefill {
            Prefill::Remote { context_id } => Some(ContextJob::new(
                Arc::clone(dispatch.registry),
                context_id.clone(),
            )),
            Prefill::Local(_) => None,
        };
        let (phase, subject) = match route.prefill {
            Prefill::Remote { context_id } => (
                Phase::Prefill {
                    generate_id: route.generate_id,
                    context_id: context_id.clone(),
                },
                bus.subjects.prefill_direct(&context_id),
            ),
            Prefill::Local(_) => (
                Phase::Generate {
                    worker_id: route.generate_id.clone(),
                },
                bus.subjects.generate_direct(&route.generate_id),
            ),
        };
        let mut cancel = CancelGuard::new(bus.clone(), request_id.clone());
        if let Err(err) = bus
            .publish_job(subject, encoded, "publishing the job")
            .await
        {
            cancel.disarm();
            return Err(fail(err, record));
        }
        tracing::debug!(%request_id, ?phase, "job published");
        let now = Instant::now();
        let mut generation = Generation {
            request_id,
            job: message,
            refused: Vec::new(),
            phase,
            context_job,
            generation_job,
            subscriber,
            pending: VecDeque::new(),
            cancel,
            bus: bus.clone(),
            registry: Arc::clone(dispatch.registry),
            metrics: dispatch.metrics.clone(),
            timeouts,
            deadline: now + timeouts.request.saturating_sub(elapsed),
            first_token_by: now + timeouts.accept + timeouts.first_token,
            record,
            first_token_seen: false,
            resuming: false,
            received_ids: Vec::new(),
            unnumbered: false,
            migrations: 0,
            migration_limit: dispatch.migration_limit,
            done: false,
            prompt_logprobs_expected,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_received: 0,
            prompt_logprobs_delivered: false,
            held: None,
            embedding: None,
            admitted: None,
        };
        let accepted = match generation.await_accepted().await {
            Ok(()) => {
                generation.first_token_by = Instant::now() + timeouts.first_token;
                Ok(())
            }
            // A context worker is replaced by a local prefill; a generation worker that does
            // not accept (it died since its last heartbeat) by another one.
            Err(err) => match generation.fall_back_on(err).await {
                Err(err) => generation.migrate_on(err).await,
                recovered => recovered,
            },
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

    /// This request's job sent again as `job_id` (its own stream subject, a fresh deadline, no
    /// KV handle) with `resume_ids`: what a fallback to a local prefill and a migration send.
    fn job_again(&self, job_id: &str, resume_ids: Vec<u32>) -> GenerateJob {
        GenerateJob {
            request_id: job_id.to_owned(),
            stream_subject: self.bus.stream_subject(job_id),
            deadline_unix_ms: Some(unix_ms(
                SystemTime::now() + self.timeouts.accept + self.timeouts.first_token,
            )),
            kv: None,
            kv_reader: None,
            resume_ids,
            ..self.job.clone()
        }
    }

    /// The client's request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The prompt's token ids, as the job carries them.
    pub fn prompt_ids(&self) -> &[u32] {
        &self.job.prompt_ids
    }

    /// Takes the prompt logprobs of a `prompt_logprobs` message: positions from `start`,
    /// those not received before (a migrated job computes the prompt again and sends them
    /// again). A message past the next position means some were lost: an error.
    fn absorb_prompt_logprobs(
        &mut self,
        start: u32,
        logprobs: Vec<PromptLogprob>,
    ) -> Result<(), ApiError> {
        let new = new_prompt_logprobs(self.prompt_logprobs_received, start, logprobs)?;
        self.prompt_logprobs_received += new.len();
        if !self.prompt_logprobs_delivered {
            self.prompt_logprobs.extend(new);
        }
        Ok(())
    }

    /// Before the first tokens (or the end) of a job that asked for prompt logprobs: the
    /// worker's failure if some never came (a message lost on the bus), for the caller to
    /// migrate on before it takes the tokens.
    fn missing_prompt_logprobs(&self) -> Option<ApiError> {
        let expected = self.prompt_logprobs_expected?;
        (!self.prompt_logprobs_delivered && self.prompt_logprobs.len() != expected).then(|| {
            ApiError::Worker {
                message: format!(
                    "the worker sent {} of the prompt's {expected} logprobs before its first token",
                    self.prompt_logprobs.len()
                ),
            }
        })
    }

    /// `event` (the first tokens, or the end), after the prompt logprobs if the job asked for
    /// them and they have not gone out (all of them: [`Self::missing_prompt_logprobs`] was
    /// checked): then they go now, whole, and `event` next.
    fn after_prompt_logprobs(&mut self, event: GenEvent) -> GenEvent {
        if self.prompt_logprobs_expected.is_none() || self.prompt_logprobs_delivered {
            return event;
        }
        self.prompt_logprobs_delivered = true;
        self.held = Some(event);
        GenEvent::PromptLogprobs(std::mem::take(&mut self.prompt_logprobs))
    }

    /// Waits for the current phase's worker to accept the job just published. A worker that
    /// refuses it (its queue is full) is replaced by another that has not ([`reroute`]).
    async fn await_accepted(&mut self) -> Result<(), ApiError> {
        let mut accept_by = Instant::now() + self.timeouts.accept;
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
                    self.refused.clear();
                    return Ok(());
                }
                Ok(StreamMessage::Rejected { worker_id, reason }) => {
                    self.reroute(worker_id, reason).await?;
                    accept_by = Instant::now() + self.timeouts.accept;
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
            Ok(GenEvent::PromptLogprobs(_) | GenEvent::Embedding(_)) => {}
            Ok(GenEvent::Tokens(tokens)) => self.record.tokens(tokens.len(), Instant::now()),
            Ok(GenEvent::Finished { usage, .. }) => {
                self.done = true;
                self.cancel.disarm();
                self.record.succeed(*usage);
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

    /// Every event up to the last, gathered.
    pub async fn collect(self) -> Result<Completed, ApiError> {
        self.collect_watching(|_| {}).await
    }

    /// Every event up to the last, gathered; `arrived` sees each batch of tokens as it comes.
    pub async fn collect_watching(
        mut self,
        mut arrived: impl FnMut(&[TokenEvent]),
    ) -> Result<Completed, ApiError> {
        let mut collected = Vec::new();
        let mut prompt_logprobs = Vec::new();
        let mut embedding = None;
        loop {
            match self.next().await {
                Some(Ok(GenEvent::PromptLogprobs(logprobs))) => prompt_logprobs = logprobs,
                Some(Ok(GenEvent::Embedding(vector))) => embedding = Some(vector),
                Some(Ok(GenEvent::Tokens(tokens))) => {
                    arrived(&tokens);
                    collected.extend(tokens);
                }
                Some(Ok(GenEvent::Finished { reason, usage })) => {
                    return Ok(Completed {
                        prompt_logprobs,
                        tokens: collected,
                        reason,
                        usage,
                        embedding,
                    });
                }
                Some(Err(err)) => return Err(err),
                None => {
                    return Err(ApiError::Internal(
                        "token stream ended without Finished".into(),
                    ));
                }
            }
        }
    }

    async fn next_inner(&mut self) -> Result<GenEvent, ApiError> {
        if let Some(held) = self.held.take() {
            return Ok(held);
        }
        loop {
            let message = match self.pending.pop_front() {
                Some(message) => message,
                None => match self.receive().await {
                    Ok(message) => message,
                    Err(err) => {
                        if let Err(err) = self.fall_back_on(err).await {
                            self.migrate_on(err).await?;
                        }
                        continue;
                    }
                },
            };
            if let Some(detail) = self.context_failure(&message) {
                self.fall_back(fallback::FallbackReason::ContextError, &detail)
                    .await?;
                continue;
            }
            match message {
                StreamMessage::Accepted { .. } => continue,
                StreamMessage::Rejected { worker_id, .. } => {
                    // Only ever instead of `accepted`, which `await_accepted` reads.
                    tracing::warn!(request_id = %self.request_id, %worker_id,
                        "ignoring a refusal of a job the worker had taken");
                    continue;
                }
                StreamMessage::KvReady {
                    handle,
                    prefill_timing,
                    cached_tokens,
                } => {
                    // A decode worker that does not take the decode job (it died since its
                    // last heartbeat): the request migrates to a local prefill elsewhere, and
                    // the context worker's export expires unread.
                    if let Err(err) = self.hand_over(*handle, prefill_timing, cached_tokens).await {
                        self.migrate_on(err).await?;
                    }
                    continue;
                }
                StreamMessage::KvPulled {
                    worker_id,
                    bytes,
                    micros,
                    room_wait_us,
                    outcome,
                } => {
                    self.kv_pulled(&worker_id, bytes, micros, room_wait_us, outcome);
                    continue;
                }
                StreamMessage::PromptLogprobs { start, logprobs } => {
                    if let Err(err) = self.absorb_prompt_logprobs(start, logprobs) {
                        self.migrate_on(err).await?;
                    }
                    continue;
                }
                StreamMessage::Embedding { vector } => {
                    if self.job.embedding {
                        self.embedding = Some(vector);
                    } else {
                        tracing::warn!(request_id = %self.request_id,
                            "ignoring an embedding for a job that asked for none");
                    }
                    continue;
                }
                StreamMessage::Tokens { tokens, index } => {
                    self.unnumbered |= index.is_none();
                    let received = self.received_ids.len();
                    let tokens = match in_sequence(received, tokens, index) {
                        Ok((tokens, repeated)) => {
                            if repeated > 0 {
                                tracing::warn!(request_id = %self.request_id, received,
                                    repeated, "dropped tokens the client has already");
                            }
                            tokens
                        }
                        Err(gap) => {
                            self.migrate_on(gap).await?;
                            continue;
                        }
                    };
                    if tokens.is_empty() {
                        continue;
                    }
                    if let Some(missing) = self.missing_prompt_logprobs() {
                        // Before the client has these tokens: the migrated job sends them again.
                        self.migrate_on(missing).await?;
                        continue;
                    }
                    self.received_ids.extend(tokens.iter().map(|t| t.id));
                    self.first_token_seen = true;
                    self.resuming = false;
                    return Ok(self.after_prompt_logprobs(GenEvent::Tokens(tokens)));
                }
                StreamMessage::Finished { reason, mut usage } => {
                    usage.cached_tokens = self.record.cached_tokens(usage.cached_tokens);
                    return match reason {
                        FinishReason::Stop | FinishReason::Length => {
                            // Tokens lost after the last one received (a message the bus
                            // refused or dropped) leave no gap to see: the usage tells.
                            if !self.unnumbered
                                && let Some(lost) = lost_tail(self.received_ids.len(), usage)
                            {
                                self.cancel.disarm();
                                self.migrate_on(lost).await?;
                                continue;
                            }
                            if let Some(missing) = self.missing_prompt_logprobs() {
                                self.cancel.disarm();
                                self.migrate_on(missing).await?;
                                continue;
                            }
                            if self.phase.is_prefill() {
                                // The context worker answered it all (it ended at its
                                // first token).
                                self.metrics.record(Event::Disaggregated);
                            }
                            if self.job.embedding {
                                let Some(vector) = self.embedding.take() else {
                                    self.cancel.disarm();
                                    let err = ApiError::Worker {
                                        message: "the worker finished the embedding job without \
                                                  its embedding"
                                            .into(),
                                    };
                                    self.migrate_on(err).await?;
                                    continue;
                                };
                                self.held = Some(GenEvent::Finished { reason, usage });
                                return Ok(GenEvent::Embedding(vector));
                            }
                            Ok(self.after_prompt_logprobs(GenEvent::Finished { reason, usage }))
                        }
                        FinishReason::Cancelled => {
                            self.cancel.disarm();
                            let err = ApiError::WorkerGone {
                                detail: "the worker cancelled the request".into(),
                            };
                            self.migrate(MigrationReason::WorkerCancelled, err).await?;
                            continue;
                        }
                        FinishReason::Error => {
                            self.cancel.disarm();
                            let err = ApiError::Worker {
                                message: "the worker failed to finish the request".into(),
                            };
                            self.migrate_on(err).await?;
                            continue;
                        }
                    };
                }
                // The request's own fault: any worker would refuse it the same way.
                StreamMessage::Error {
                    message,
                    param: Some(param),
                } => {
                    self.cancel.disarm();
                    return Err(ApiError::invalid(message, &param));
                }
                StreamMessage::Error {
                    message,
                    param: None,
                } => {
                    self.cancel.disarm();
                    self.migrate_on(ApiError::Worker { message }).await?;
                    continue;
                }
            }
        }
    }

    /// Waits for the next stream message, bounded by the phase's timeout and the request's
    /// deadline, checking the current worker's liveness meanwhile.
    async fn receive(&mut self) -> Result<StreamMessage, ApiError> {
        let (phase_end, phase_timeout, phase_error): (Instant, Duration, fn(u64) -> ApiError) =
            if self.first_token_seen && !self.resuming {
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

/// The error of a numbered stream that ends (`finished`, with `usage`) before the client has
/// every token the worker generated: its last tokens were lost. (Every token a worker
/// generates, the one that ends the request included, goes out in a `tokens` message and is
/// counted in `completion_tokens`, resumed tokens of a migrated job as well.)
fn lost_tail(received: usize, usage: Usage) -> Option<ApiError> {
    (usage.completion_tokens as usize > received).then_some(ApiError::StreamGap {
        expected: received as u32,
        got: usage.completion_tokens,
    })
}

/// The positions of a `prompt_logprobs` message (from `start`) past the `received` ones
/// (positions 1 ..= received): a repeat is dropped, a message past the next position means
/// some were lost (a worker error: the request migrates).
fn new_prompt_logprobs(
    received: usize,
    start: u32,
    mut logprobs: Vec<PromptLogprob>,
) -> Result<Vec<PromptLogprob>, ApiError> {
    let next = received + 1;
    if start as usize > next {
        return Err(ApiError::Worker {
            message: format!(
                "the worker's prompt logprobs skipped positions {next} to {}",
                start - 1
            ),
        });
    }
    let repeated = (next - start as usize).min(logprobs.len());
    logprobs.drain(..repeated);
    Ok(logprobs)
}

/// `tokens` (a `tokens` message starting at position `index`) checked against the `received`
/// tokens the client has: a message from a worker that numbers its tokens must continue
/// exactly after them. Tokens the client has already (a duplicate) are dropped, and counted
/// in the second value; a message past the next position means tokens were lost, an error
/// (a migration resumes after the last token received). An unnumbered message passes.
fn in_sequence(
    received: usize,
    mut tokens: Vec<TokenEvent>,
    index: Option<u32>,
) -> Result<(Vec<TokenEvent>, usize), ApiError> {
    let Some(index) = index else {
        return Ok((tokens, 0));
    };
    let expected = received as u32;
    if index > expected {
        return Err(ApiError::StreamGap {
            expected,
            got: index,
        });
    }
    let repeated = ((expected - index) as usize).min(tokens.len());
    tokens.drain(..repeated);
    Ok((tokens, repeated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[u32]) -> Vec<TokenEvent> {
        ids.iter()
            .map(|&id| TokenEvent {
                id,
                text: id.to_string(),
                logprob: None,
                top_logprobs: Vec::new(),
            })
            .collect()
    }

    fn ids(result: Result<(Vec<TokenEvent>, usize), ApiError>) -> (Vec<u32>, usize) {
        let (tokens, repeated) = result.unwrap();
        (tokens.iter().map(|t| t.id).collect(), repeated)
    }

    #[test]
    fn a_stream_that_ends_short_of_its_usage_lost_its_tail() {
        let usage = |completion_tokens| Usage {
            prompt_tokens: 9,
            completion_tokens,
            cached_tokens: 0,
            ..Default::default()
        };
        assert!(lost_tail(5, usage(5)).is_none());
        assert!(
            lost_tail(5, usage(4)).is_none(),
            "fewer counted than received is not a loss"
        );
        assert!(matches!(
            lost_tail(3, usage(1500)),
            Some(ApiError::StreamGap {
                expected: 3,
                got: 1500
            })
        ));
    }

    #[test]
    fn prompt_logprobs_are_kept_once_and_a_skip_is_an_error() {
        let entries = |from: u32, count: u32| -> Vec<PromptLogprob> {
            (from..from + count)
                .map(|p| PromptLogprob {
                    logprob: -(p as f32),
                    rank: 1,
                    top_logprobs: Vec::new(),
                })
                .collect()
        };
        let positions = |r: Result<Vec<PromptLogprob>, ApiError>| -> Vec<f32> {
            r.unwrap().iter().map(|l| -l.logprob).collect()
        };
        assert_eq!(
            positions(new_prompt_logprobs(0, 1, entries(1, 3))),
            vec![1.0, 2.0, 3.0]
        );
        assert_eq!(
            positions(new_prompt_logprobs(3, 4, entries(4, 2))),
            vec![4.0, 5.0]
        );
        // A migrated job sends them again from 1: only the new ones are kept.
        assert_eq!(
            positions(new_prompt_logprobs(3, 1, entries(1, 5))),
            vec![4.0, 5.0]
        );
        assert!(positions(new_prompt_logprobs(5, 1, entries(1, 2))).is_empty());
        assert!(matches!(
            new_prompt_logprobs(3, 6, entries(6, 1)),
            Err(ApiError::Worker { .. })
        ));
    }

    #[test]
    fn numbered_tokens_must_continue_the_stream() {
        // In order, and unnumbered (an older worker).
        assert_eq!(
            ids(in_sequence(2, tokens(&[7, 8]), Some(2))),
            (vec![7, 8], 0)
        );
        assert_eq!(ids(in_sequence(2, tokens(&[7]), None)), (vec![7], 0));
        // A repeat, whole or in part, is cut.
        assert_eq!(
            ids(in_sequence(3, tokens(&[6, 7, 8]), Some(1))),
            (vec![8], 2)
        );
        assert_eq!(ids(in_sequence(3, tokens(&[5, 6]), Some(0))), (vec![], 2));
        // A gap is an error naming both positions.
        assert!(matches!(
            in_sequence(2, tokens(&[9]), Some(4)),
            Err(ApiError::StreamGap {
                expected: 2,
                got: 4
            })
        ));
    }
}
