//! The worker's side of the bus (docs/protocol.md, "Worker obligations").
//!
//! One task owns the subscriptions: generation jobs (queue group `decode`, plus this worker's
//! direct subject), cancellations, the heartbeat timer and the termination signals. A job is
//! acknowledged (`accepted`) before it is queued, registered under its bus id (so a cancel can
//! find it) and handed to the engine thread; a task per request forwards its events to the
//! request's stream subject.
//!
//! Roles: a `both` or `decode` worker takes generation jobs; one that carries a KV handle is
//! pulled from its context worker over the [`KvTransport`] and imported (a failed pull falls
//! back to a local prefill with the same seed, so the output is the same), then generated
//! like any other. A `context` worker takes prefill jobs instead ([`super::context`]), and also
//! listens for releases of its exports and expires them.
//!
//! Here: the loop, job intake, local requests, cancellation, heartbeats. [`prefill`]: the
//! context role's prefills, exports, releases and expiry. [`pull`]: the decode side's pull and
//! import of a handle.
//!
//! Drain on SIGTERM/SIGINT: the queue-group subscription is dropped at once and a heartbeat
//! with `draining: true` goes out, so api-servers stop routing here; jobs already routed to the
//! direct subject (published before the api-server saw that heartbeat) are still taken. Once
//! nothing is in flight and one heartbeat interval has passed, the worker unsubscribes,
//! flushes and returns. A second signal stops at once, cancelling what is left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, Subscriber};
use futures::StreamExt;
use tandem_protocol::messages::{
    self, CancelRequest, GenerateJob, Heartbeat, KvPeer, StreamMessage, WorkerRole,
};
use tandem_protocol::subjects::{CONTEXT_QUEUE_GROUP, DECODE_QUEUE_GROUP, Subjects};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

mod prefill;
mod pull;

use super::context::StagingBuffer;
use super::job::generation_request;
use super::stream::{is_last, stream_messages};
use crate::engine::{EngineError, EngineEvent, EngineHandle, RequestId};
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
}

/// Who this worker is on the bus.
#[derive(Clone)]
pub struct BusSettings {
    pub nats_url: String,
    pub served_name: String,
    pub worker_id: String,
    pub role: WorkerRole,
    pub device: String,
    pub total_kv_blocks: usize,
    pub heartbeat: Duration,
    /// The tokenizer's end-of-sequence ids, added to every job's stop ids.
    pub model_stop_ids: Arc<[u32]>,
    /// The engine's KV cache layout (what handles must match).
    pub layout: KvLayout,
    /// Host-memory transfers (UCX): every context and decode worker has one.
    pub transport: Arc<dyn KvTransport>,
    /// Device-to-device transfers with GPU workers of this host (a GPU context or decode
    /// worker with a CUDA IPC pool).
    pub cuda_ipc: Option<Arc<dyn KvTransport>>,
    /// This machine ([`crate::transfer::host_id`]): CUDA IPC only between workers of one host.
    pub host_id: String,
    /// Context role: prompt tokens held for decode workers at most.
    pub max_tokens_in_buffer: usize,
    /// Context role: exports not released by then are freed.
    pub kv_transfer_timeout: Duration,
}

/// Bus request id -> engine request id, for the requests in flight.
type InFlight = Arc<Mutex<HashMap<String, RequestId>>>;

/// Serves until a termination signal and the drain that follows. Consumes the engine handle:
/// when this returns, the engine thread ends.
pub async fn serve(settings: BusSettings, engine: EngineHandle) -> Result<(), BusError> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("tandem worker {}", settings.worker_id))
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| BusError::Connect {
            url: settings.nats_url.clone(),
            detail: e.to_string(),
        })?;
    let subjects = Subjects::new(&settings.served_name);
    let subscribe_error = |subject: &str, e: &dyn std::fmt::Display| BusError::Subscribe {
        subject: subject.to_owned(),
        detail: e.to_string(),
    };
    let context = settings.role == WorkerRole::Context;
    let (queue_subject, queue_group, direct_subject) = if context {
        (
            subjects.prefill(),
            CONTEXT_QUEUE_GROUP,
            subjects.prefill_direct(&settings.worker_id),
        )
    } else {
        (
            subjects.generate(),
            DECODE_QUEUE_GROUP,
            subjects.generate_direct(&settings.worker_id),
        )
    };
    let mut queue_jobs = Some(
        client
            .queue_subscribe(queue_subject.clone(), queue_group.to_owned())
            .await
            .map_err(|e| subscribe_error(&queue_subject, &e))?,
    );
    let mut direct_jobs = client
        .subscribe(direct_subject.clone())
        .await
        .map_err(|e| subscribe_error(&direct_subject, &e))?;
    // Releases are only for context workers; others never receive any on their subject.
    let release_subject = subjects.kv_release(&settings.worker_id);
    let mut releases = client
        .subscribe(release_subject.clone())
        .await
        .map_err(|e| subscribe_error(&release_subject, &e))?;
    let cancel_subject = subjects.cancel();
    let mut cancels = client
        .subscribe(cancel_subject.clone())
        .await
        .map_err(|e| subscribe_error(&cancel_subject, &e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(BusError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(BusError::Signal)?;

    let worker = Arc::new(Worker {
        client: client.clone(),
        subjects: subjects.clone(),
        settings: settings.clone(),
        engine,
        in_flight: Arc::new(Mutex::new(HashMap::new())),
        staging: Mutex::new(StagingBuffer::new(
            settings.max_tokens_in_buffer,
            settings.kv_transfer_timeout,
        )),
        backlog: Mutex::new(std::collections::VecDeque::new()),
        pulling: Mutex::new(HashMap::new()),
        cuda_ipc_reads: std::sync::atomic::AtomicBool::new(settings.cuda_ipc.is_some()),
    });
    worker.publish_heartbeat(false).await;
    tracing::info!(
        worker_id = settings.worker_id,
        nats = settings.nats_url,
        subject = queue_subject,
        "joined the deployment"
    );

    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(Duration::from_millis(50));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_started: Option<Instant> = None;
    loop {
        tokio::select! {
            Some(message) = next_job(&mut queue_jobs) => worker.take_job(&message.payload).await,
            Some(message) = direct_jobs.next() => worker.take_job(&message.payload).await,
            Some(message) = cancels.next() => worker.cancel(&message.payload).await,
            Some(message) = releases.next() => worker.release(&message.payload).await,
            _ = sweep.tick(), if context => worker.sweep().await,
            _ = heartbeat.tick() => {
                worker.publish_heartbeat(drain_started.is_some()).await;
                if let Some(since) = drain_started {
                    let in_flight = worker.in_flight_count();
                    if in_flight == 0 && since.elapsed() >= settings.heartbeat {
                        break;
                    }
                    tracing::info!(in_flight, "draining");
                }
            }
            _ = termination(&mut sigterm, &mut sigint) => {
                if drain_started.is_some() {
                    tracing::warn!("second termination signal: cancelling what is left and stopping now");
                    worker.cancel_all();
                    break;
                }
                tracing::info!(
                    in_flight = worker.in_flight_count(),
                    "termination signal: draining (finishing in-flight requests, taking no new ones)"
                );
                drain_started = Some(Instant::now());
                if let Some(subscriber) = queue_jobs.take() {
                    unsubscribe(subscriber).await;
                }
                worker.publish_heartbeat(true).await;
            }
        }
    }
    // Leave: nobody routes here any more; the last heartbeat says so.
    unsubscribe(direct_jobs).await;
    unsubscribe(cancels).await;
    unsubscribe(releases).await;
    worker.wait_for_streams(Duration::from_secs(5)).await;
    match tokio::time::timeout(PUBLISH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("flushing the NATS connection: {e}"),
        Err(_) => {
            tracing::warn!("flushing the NATS connection: no answer within {PUBLISH_TIMEOUT:?}")
        }
    }
    tracing::info!(worker_id = settings.worker_id, "left the deployment");
    Ok(())
}

async fn next_job(subscriber: &mut Option<Subscriber>) -> Option<async_nats::Message> {
    match subscriber {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

async fn termination(
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
}

async fn unsubscribe(mut subscriber: Subscriber) {
    match tokio::time::timeout(PUBLISH_TIMEOUT, subscriber.unsubscribe()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("unsubscribing: {e}"),
        Err(_) => tracing::warn!("unsubscribing: NATS did not answer within {PUBLISH_TIMEOUT:?}"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Worker {
    client: Client,
    subjects: Subjects,
    settings: BusSettings,
    engine: EngineHandle,
    in_flight: InFlight,
    /// Context role: exports held for decode workers.
    staging: Mutex<StagingBuffer>,
    /// Context role: accepted prefill jobs waiting for room in the staging buffer.
    backlog: Mutex<std::collections::VecDeque<GenerateJob>>,
    /// Decode side: requests whose KV is being pulled, with whether they were cancelled.
    pulling: Mutex<HashMap<String, bool>>,
    /// Decode side: this worker advertises CUDA IPC reads (it has a pool, and no read of a
    /// CUDA IPC export has failed).
    cuda_ipc_reads: std::sync::atomic::AtomicBool,
}

/// How long one publish may wait. async-nats buffers publishes while it reconnects and makes
/// callers wait once that buffer is full; a worker cut off from NATS must still notice signals
/// and finish its drain, so no publish waits longer than this.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes `payload` on `subject`, giving up (with a warning) after [`PUBLISH_TIMEOUT`].
async fn publish_bounded(client: &Client, subject: String, payload: Vec<u8>, what: &str) {
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

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    async fn publish(&self, subject: String, message: &StreamMessage) {
        publish_bounded(
            &self.client,
            subject,
            messages::encode(message),
            "a stream message",
        )
        .await;
    }

    /// Requests in flight (engine, pull, staged exports, backlog): the drain waits for none.
    fn in_flight_count(&self) -> usize {
        locked(&self.in_flight).len()
            + locked(&self.pulling).len()
            + locked(&self.backlog).len()
            + usize::from(!locked(&self.staging).is_empty())
    }

    /// Acknowledges one job and starts it by role: a prefill (context), a pull and import
    /// (a job with a KV handle), or a local generation.
    async fn take_job(self: &Arc<Self>, payload: &[u8]) {
        let job: GenerateJob = match messages::decode("generate job", payload) {
            Ok(job) => job,
            Err(e) => {
                // Without a parsed job there is no stream subject to answer on.
                tracing::warn!("dropping a malformed job: {e}");
                return;
            }
        };
        self.publish(
            job.stream_subject.clone(),
            &StreamMessage::Accepted {
                worker_id: self.settings.worker_id.clone(),
            },
        )
        .await;
        if self.past_deadline(&job).await {
            return;
        }
        if self.settings.role == WorkerRole::Context {
            let admitted = locked(&self.staging).try_reserve(job.prompt_ids.len());
            if admitted {
                self.start_prefill(job).await;
            } else {
                tracing::debug!(
                    request_id = job.request_id,
                    "staging buffer full: the prefill waits for releases"
                );
                locked(&self.backlog).push_back(job);
            }
        } else if let Some(handle) = job.kv.clone() {
            self.start_pull(job, handle);
        } else {
            let request = generation_request(&job, &self.settings.model_stop_ids);
            self.start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                .await;
        }
    }

    /// Drops a job whose deadline passed before it started (its client has been answered).
    async fn past_deadline(&self, job: &GenerateJob) -> bool {
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
            },
        )
        .await;
        true
    }

    /// Registers a request and hands it to the engine with `submit`; a task forwards its
    /// events to the stream subject.
    async fn start_request(
        &self,
        job: &GenerateJob,
        submit: impl FnOnce(
            &EngineHandle,
            mpsc::UnboundedSender<EngineEvent>,
        ) -> Result<RequestId, EngineError>,
    ) {
        let with_logprobs = job.sampling.logprobs.is_some();
        let (sink, events) = mpsc::unbounded_channel::<EngineEvent>();
        // Registered before the engine can emit anything, so a cancel always finds it.
        let mut in_flight = locked(&self.in_flight);
        match submit(&self.engine, sink) {
            Ok(engine_id) => {
                in_flight.insert(job.request_id.clone(), engine_id);
                drop(in_flight);
                tracing::debug!(
                    request_id = job.request_id,
                    engine_id,
                    prompt_tokens = job.prompt_ids.len(),
                    "job queued"
                );
                tokio::spawn(forward(
                    self.client.clone(),
                    job.stream_subject.clone(),
                    job.request_id.clone(),
                    events,
                    with_logprobs,
                    Arc::clone(&self.in_flight),
                ));
            }
            Err(e) => {
                drop(in_flight);
                self.publish(
                    job.stream_subject.clone(),
                    &StreamMessage::Error {
                        message: format!("the worker cannot take the request: {e}"),
                    },
                )
                .await;
            }
        }
    }

    async fn cancel(self: &Arc<Self>, payload: &[u8]) {
        let cancel: CancelRequest = match messages::decode("cancel", payload) {
            Ok(cancel) => cancel,
            Err(e) => {
                tracing::warn!("ignoring a malformed cancel: {e}");
                return;
            }
        };
        let id = cancel.request_id;
        let engine_id = locked(&self.in_flight).get(&id).copied();
        if let Some(engine_id) = engine_id {
            tracing::debug!(request_id = id, "cancelled by the api-server");
            // An engine that has stopped has nothing left to cancel.
            let _ = self.engine.cancel(engine_id);
        }
        if let Some(cancelled) = locked(&self.pulling).get_mut(&id) {
            *cancelled = true;
        }
        let waiting = {
            let mut backlog = locked(&self.backlog);
            let before = backlog.len();
            backlog.retain(|job| job.request_id != id);
            before != backlog.len()
        };
        if waiting {
            tracing::debug!(request_id = id, "cancelled while waiting for staging room");
        }
        // An export nobody will pull any more.
        if locked(&self.staging).release(&id) {
            self.sweep().await;
        }
    }

    fn cancel_all(&self) {
        for &engine_id in locked(&self.in_flight).values() {
            let _ = self.engine.cancel(engine_id);
        }
    }

    async fn publish_heartbeat(&self, draining: bool) {
        let active = self.engine.active_requests();
        let queued = self.engine.waiting_requests().min(active);
        let heartbeat = Heartbeat {
            worker_id: self.settings.worker_id.clone(),
            role: self.settings.role,
            model: self.settings.served_name.clone(),
            device: self.settings.device.clone(),
            running: (active - queued) as u32,
            queued: queued as u32,
            free_kv_blocks: self.engine.free_blocks() as u32,
            total_kv_blocks: self.settings.total_kv_blocks as u32,
            draining,
            interval_ms: self.settings.heartbeat.as_millis() as u64,
            kv_transfer: (self.settings.role == WorkerRole::Context)
                .then(|| locked(&self.staging).stats()),
            kv_peer: (self.settings.role != WorkerRole::Both).then(|| KvPeer {
                host_id: self.settings.host_id.clone(),
                cuda_ipc: self
                    .cuda_ipc_reads
                    .load(std::sync::atomic::Ordering::Relaxed),
            }),
        };
        let subject = self
            .subjects
            .heartbeat(self.settings.role, &self.settings.worker_id);
        publish_bounded(
            &self.client,
            subject,
            messages::encode(&heartbeat),
            "a heartbeat",
        )
        .await;
    }

    /// Waits (bounded) until the forwarding tasks have published their last messages.
    async fn wait_for_streams(&self, limit: Duration) {
        let start = Instant::now();
        while !locked(&self.in_flight).is_empty() && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Forwards one request's events to its stream subject until its last message, then forgets
/// the request.
async fn forward(
    client: Client,
    subject: String,
    request_id: String,
    mut events: mpsc::UnboundedReceiver<EngineEvent>,
    with_logprobs: bool,
    in_flight: InFlight,
) {
    let mut ended = false;
    while let Some(first) = events.recv().await {
        let mut batch = vec![first];
        while let Ok(event) = events.try_recv() {
            batch.push(event);
        }
        for message in stream_messages(batch, with_logprobs) {
            ended |= is_last(&message);
            publish_bounded(
                &client,
                subject.clone(),
                messages::encode(&message),
                "tokens",
            )
            .await;
        }
        if ended {
            break;
        }
    }
    if !ended {
        // The engine thread went away without a last event (it panicked).
        let message = StreamMessage::Error {
            message: "the worker's engine stopped unexpectedly".into(),
        };
        publish_bounded(&client, subject, messages::encode(&message), "an error").await;
    }
    locked(&in_flight).remove(&request_id);
}
