//! The worker's side of the bus (docs/protocol.md, "Worker obligations").
//!
//! One task owns the subscriptions: generation jobs (queue group `decode`, plus this worker's
//! direct subject), cancellations, the heartbeat timer and the termination signals. A job is
//! acknowledged (`accepted`) before it is queued, registered under its bus id (so a cancel can
//! find it) and handed to the engine thread; a task per request forwards its events to the
//! request's stream subject.
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
    self, CancelRequest, GenerateJob, Heartbeat, StreamMessage, WorkerRole,
};
use tandem_protocol::subjects::{DECODE_QUEUE_GROUP, Subjects};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::job::generation_request;
use super::stream::{is_last, stream_messages};
use crate::engine::{EngineEvent, EngineHandle, RequestId};

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
#[derive(Debug, Clone)]
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
}

/// Bus request id -> engine request id, for the requests in flight.
type InFlight = Arc<Mutex<HashMap<String, RequestId>>>;

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashMap<String, RequestId>> {
    // A panicking forwarder cannot leave the map half-updated: every access is one call.
    in_flight.lock().unwrap_or_else(|e| e.into_inner())
}

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
    let queue_subject = subjects.generate();
    let mut queue_jobs = Some(
        client
            .queue_subscribe(queue_subject.clone(), DECODE_QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| subscribe_error(&queue_subject, &e))?,
    );
    let direct_subject = subjects.generate_direct(&settings.worker_id);
    let mut direct_jobs = client
        .subscribe(direct_subject.clone())
        .await
        .map_err(|e| subscribe_error(&direct_subject, &e))?;
    let cancel_subject = subjects.cancel();
    let mut cancels = client
        .subscribe(cancel_subject.clone())
        .await
        .map_err(|e| subscribe_error(&cancel_subject, &e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(BusError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(BusError::Signal)?;

    let worker = Worker {
        client: client.clone(),
        subjects: subjects.clone(),
        settings: settings.clone(),
        engine,
        in_flight: Arc::new(Mutex::new(HashMap::new())),
    };
    worker.publish_heartbeat(false).await;
    tracing::info!(
        worker_id = settings.worker_id,
        nats = settings.nats_url,
        subject = queue_subject,
        "joined the deployment"
    );

    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_started: Option<Instant> = None;
    loop {
        tokio::select! {
            Some(message) = next_job(&mut queue_jobs) => worker.take_job(&message.payload).await,
            Some(message) = direct_jobs.next() => worker.take_job(&message.payload).await,
            Some(message) = cancels.next() => worker.cancel(&message.payload),
            _ = heartbeat.tick() => {
                worker.publish_heartbeat(drain_started.is_some()).await;
                if let Some(since) = drain_started {
                    let in_flight = lock(&worker.in_flight).len();
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
                    in_flight = lock(&worker.in_flight).len(),
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
    worker.wait_for_streams(Duration::from_secs(5)).await;
    if let Err(e) = client.flush().await {
        tracing::warn!("flushing the NATS connection: {e}");
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
    if let Err(e) = subscriber.unsubscribe().await {
        tracing::warn!("unsubscribing: {e}");
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
}

impl Worker {
    async fn publish(&self, subject: String, message: &StreamMessage) {
        if let Err(e) = self
            .client
            .publish(subject.clone(), messages::encode(message).into())
            .await
        {
            tracing::warn!(subject, "publishing a stream message: {e}");
        }
    }

    /// Acknowledges, registers and queues one job; its events are forwarded by a task of its
    /// own.
    async fn take_job(&self, payload: &[u8]) {
        let job: GenerateJob = match messages::decode("generate job", payload) {
            Ok(job) => job,
            Err(e) => {
                // Without a parsed job there is no stream subject to answer on.
                tracing::warn!("dropping a malformed job: {e}");
                return;
            }
        };
        let stream_subject = job.stream_subject.clone();
        self.publish(
            stream_subject.clone(),
            &StreamMessage::Accepted {
                worker_id: self.settings.worker_id.clone(),
            },
        )
        .await;
        if job
            .deadline_unix_ms
            .is_some_and(|deadline| unix_ms() > deadline)
        {
            tracing::warn!(
                request_id = job.request_id,
                "dropping a job whose deadline passed before it started (the client was answered)"
            );
            self.publish(
                stream_subject,
                &StreamMessage::Error {
                    message: "the request's deadline passed before a worker started it".into(),
                },
            )
            .await;
            return;
        }
        let request = generation_request(&job, &self.settings.model_stop_ids);
        let with_logprobs = job.sampling.logprobs.is_some();
        let (sink, events) = mpsc::unbounded_channel::<EngineEvent>();
        // Registered before the engine can emit anything, so a cancel always finds it.
        let mut in_flight = lock(&self.in_flight);
        match self.engine.submit_with_sink(request, sink) {
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
                    stream_subject,
                    job.request_id,
                    events,
                    with_logprobs,
                    Arc::clone(&self.in_flight),
                ));
            }
            Err(e) => {
                drop(in_flight);
                self.publish(
                    stream_subject,
                    &StreamMessage::Error {
                        message: format!("the worker cannot take the request: {e}"),
                    },
                )
                .await;
            }
        }
    }

    fn cancel(&self, payload: &[u8]) {
        let cancel: CancelRequest = match messages::decode("cancel", payload) {
            Ok(cancel) => cancel,
            Err(e) => {
                tracing::warn!("ignoring a malformed cancel: {e}");
                return;
            }
        };
        let engine_id = lock(&self.in_flight).get(&cancel.request_id).copied();
        if let Some(engine_id) = engine_id {
            tracing::debug!(
                request_id = cancel.request_id,
                "cancelled by the api-server"
            );
            // An engine that has stopped has nothing left to cancel.
            let _ = self.engine.cancel(engine_id);
        }
    }

    fn cancel_all(&self) {
        for &engine_id in lock(&self.in_flight).values() {
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
            kv_transfer: None,
        };
        let subject = self
            .subjects
            .heartbeat(self.settings.role, &self.settings.worker_id);
        if let Err(e) = self
            .client
            .publish(subject, messages::encode(&heartbeat).into())
            .await
        {
            tracing::warn!("publishing a heartbeat: {e}");
        }
    }

    /// Waits (bounded) until the forwarding tasks have published their last messages.
    async fn wait_for_streams(&self, limit: Duration) {
        let start = Instant::now();
        while !lock(&self.in_flight).is_empty() && start.elapsed() < limit {
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
            if let Err(e) = client
                .publish(subject.clone(), messages::encode(&message).into())
                .await
            {
                tracing::warn!(request_id, "publishing tokens: {e}");
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
        };
        let _ = client
            .publish(subject, messages::encode(&message).into())
            .await;
    }
    lock(&in_flight).remove(&request_id);
}
