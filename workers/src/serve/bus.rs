//! The worker's side of the bus (docs/protocol.md, "Worker obligations"): the connection, the
//! serve loop and the drain on SIGTERM.
//!
//! One task owns the subscriptions: the role's jobs (its queue group, plus this worker's direct
//! subject), cancellations, the role's own inbox (a context worker's KV releases and expiry
//! sweeps), the heartbeat timer and the termination signals. A job is acknowledged
//! (`accepted`) and checked against its deadline by the shared `Worker` (`worker.rs`) before
//! its role starts it (`Role::start`, `roles/`); a cancel reaches the engine request, if there
//! is one, and then the role (`Role::cancel`).
//!
//! Drain on SIGTERM/SIGINT: the queue-group subscription is dropped at once and a heartbeat
//! with `draining: true` goes out, so api-servers stop routing here; jobs already routed to the
//! direct subject (published before the api-server saw that heartbeat) are still taken. Once
//! nothing is in flight (no engine request, and nothing the role holds: a pull, a prefill
//! waiting for room, an export not yet released) and one heartbeat interval has passed, the
//! worker unsubscribes, flushes and returns. A second signal stops at once, cancelling what is
//! left.
//!
//! A lost device (a sticky CUDA error, [`crate::engine::Engine::device_lost`]): the engine has
//! ended every request with the error; at the next heartbeat tick the worker says it is
//! draining, leaves like a drain's end, and `serve` returns [`BusError::DeviceLost`], so the
//! process exits with an error and its supervisor starts a fresh one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subscriber;
use futures::StreamExt;
use tandem_protocol::messages::{self, CancelRequest, WorkerNumerics, WorkerRole};
use tandem_protocol::subjects::Subjects;
use tokio::signal::unix::{SignalKind, signal};

pub use super::connection::{BusError, BusSettings};
use super::connection::{subscribe, subscribe_error, unsubscribe};
use super::kv_events::PrefixCacheBus;
use super::roles::{ContextRole, GenerationRole, Role, layout_spec};
use super::worker::{Identity, InFlight, PUBLISH_TIMEOUT, QueueBound, RoleLoad, Worker};
use crate::engine::EngineHandle;

/// Serves until a termination signal and the drain that follows. Consumes the engine handle:
/// when this returns, the engine thread ends.
pub async fn serve(settings: BusSettings, engine: EngineHandle) -> Result<(), BusError> {
    let client = settings
        .nats_auth
        .connect_options(format!("tandem worker {}", settings.worker_id))
        .await
        .map_err(|e| BusError::Connect {
            url: settings.nats_url.clone(),
            detail: e.to_string(),
        })?
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| BusError::Connect {
            url: settings.nats_url.clone(),
            detail: e.to_string(),
        })?;
    let worker = Arc::new(Worker {
        client,
        subjects: Subjects::new(&settings.served_name),
        identity: Identity {
            worker_id: settings.worker_id.clone(),
            served_name: settings.served_name.clone(),
            model_fingerprint: settings.model_fingerprint.clone(),
            role: settings.role,
            device: settings.device.clone(),
            total_kv_blocks: settings.total_kv_blocks,
            heartbeat: settings.heartbeat,
            max_running: settings.max_running,
            numerics: WorkerNumerics {
                weights: settings.weights.clone(),
                kv_cache: layout_spec(&settings.layout).dtype,
            },
            lora_adapters: settings.lora_adapters.clone(),
        },
        engine,
        model_stop_ids: Arc::clone(&settings.model_stop_ids),
        grammars: Arc::clone(&settings.grammars),
        in_flight: InFlight::default(),
        queue: QueueBound::new(settings.max_queued),
        stream_delay: settings.test_hooks.stream_delay,
    });
    let prefix_cache = settings.prefix_caching.then(|| {
        PrefixCacheBus::new(
            settings.layout.block_size,
            settings.model_fingerprint.clone(),
            settings.test_hooks.drop_kv_events_batch,
        )
    });
    if let (Some(cache), Some(events)) = (&prefix_cache, worker.engine.take_kv_events()) {
        tokio::spawn(cache.clone().publish_events(Arc::clone(&worker), events));
        tokio::spawn(cache.clone().answer_snapshots(Arc::clone(&worker)));
    }
    say_how_handles_are_authenticated(&settings);
    match settings.role {
        WorkerRole::Context => {
            let role = ContextRole::new(Arc::clone(&worker), &settings);
            serve_role(&settings, worker, Arc::new(role), prefix_cache.as_ref()).await
        }
        WorkerRole::Both | WorkerRole::Decode => {
            let role = GenerationRole::new(Arc::clone(&worker), &settings);
            serve_role(&settings, worker, Arc::new(role), prefix_cache.as_ref()).await
        }
    }
}

/// Says once, at start, whether this worker's KV handles are authenticated, and what to set
/// when they are not.
fn say_how_handles_are_authenticated(settings: &BusSettings) {
    const HOW: &str = "set the deployment's KV secret with TANDEM_KV_SECRET or --kv-secret-file \
                       (the same on every context and decode worker; `tandem serve` makes one)";
    match (&settings.kv_secret, settings.role) {
        (Some(_), WorkerRole::Context) => tracing::info!(
            "KV handles are signed with the deployment's KV secret, each for its request"
        ),
        (Some(_), _) => tracing::info!(
            "KV handles are authenticated with the deployment's KV secret: a handle is read \
             only for the request it was signed for, once"
        ),
        (None, WorkerRole::Context) => tracing::warn!(
            "no KV secret: the KV handles this worker exports are not signed, and decode \
             workers that hold a secret refuse them; {HOW}"
        ),
        (None, _) => tracing::warn!(
            "no KV secret: KV handles are not authenticated, so whoever can publish a job on \
             the bus can have this worker read any K/V a context worker exported into their \
             request; {HOW}"
        ),
    }
}

/// The serve loop of a worker in role `R`.
async fn serve_role<R: Role>(
    settings: &BusSettings,
    worker: Arc<Worker>,
    role: Arc<R>,
    prefix_cache: Option<&PrefixCacheBus>,
) -> Result<(), BusError> {
    let client = &worker.client;
    let jobs = role.job_subjects();
    let mut queue_jobs = Some(
        client
            .queue_subscribe(jobs.queue.clone(), jobs.queue_group.to_owned())
            .await
            .map_err(|e| subscribe_error(&jobs.queue, &e))?,
    );
    let mut direct_jobs = subscribe(client, jobs.direct).await?;
    let mut cancels = subscribe(client, worker.subjects.cancel()).await?;
    let mut inbox = role.open_inbox().await?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(BusError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(BusError::Signal)?;

    publish_heartbeat(&worker, &*role, prefix_cache, false).await;
    tracing::info!(
        worker_id = settings.worker_id,
        nats = settings.nats_url,
        subject = jobs.queue,
        "joined the deployment"
    );

    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_started: Option<Instant> = None;
    let mut device_lost: Option<String> = None;
    loop {
        tokio::select! {
            Some(message) = next_job(&mut queue_jobs) => take_job(&worker, &role, &message.payload).await,
            Some(message) = direct_jobs.next() => take_job(&worker, &role, &message.payload).await,
            Some(message) = cancels.next() => cancel(&worker, &role, &message.payload).await,
            input = R::next_input(&mut inbox) => role.handle_input(input).await,
            _ = heartbeat.tick() => {
                if let Some(reason) = worker.engine.device_lost() {
                    // Every request has already ended with the error; leave at once so that
                    // api-servers stop routing here, and exit for a restart.
                    tracing::error!(reason, "the device failed: leaving the deployment to restart");
                    device_lost = Some(reason.to_owned());
                    if let Some(subscriber) = queue_jobs.take() {
                        unsubscribe(subscriber).await;
                    }
                    publish_heartbeat(&worker, &*role, prefix_cache, true).await;
                    break;
                }
                publish_heartbeat(&worker, &*role, prefix_cache, drain_started.is_some()).await;
                if let Some(since) = drain_started {
                    let in_flight = worker.in_flight.len() + role.held();
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
                    in_flight = worker.in_flight.len() + role.held(),
                    "termination signal: draining (finishing in-flight requests, taking no new ones)"
                );
                drain_started = Some(Instant::now());
                if let Some(subscriber) = queue_jobs.take() {
                    unsubscribe(subscriber).await;
                }
                publish_heartbeat(&worker, &*role, prefix_cache, true).await;
            }
        }
    }
    // Leave: nobody routes here any more; the last heartbeat says so.
    unsubscribe(direct_jobs).await;
    unsubscribe(cancels).await;
    R::close_inbox(inbox).await;
    role.leave();
    worker.wait_for_streams(Duration::from_secs(5)).await;
    match tokio::time::timeout(PUBLISH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("flushing the NATS connection: {e}"),
        Err(_) => {
            tracing::warn!("flushing the NATS connection: no answer within {PUBLISH_TIMEOUT:?}")
        }
    }
    tracing::info!(worker_id = settings.worker_id, "left the deployment");
    match device_lost {
        Some(reason) => Err(BusError::DeviceLost(reason)),
        None => Ok(()),
    }
}

/// Acknowledges one job and, unless its deadline has passed, has the role start it; or
/// refuses it when the queue is full.
async fn take_job<R: Role>(worker: &Worker, role: &Arc<R>, payload: &[u8]) {
    if let Some(job) = worker.accept(payload, role.queued()).await {
        role.start(job).await;
    }
}

/// Cancels a request wherever it is: in the engine, then in the role (a pull, a prefill
/// waiting for room, an export).
async fn cancel<R: Role>(worker: &Worker, role: &Arc<R>, payload: &[u8]) {
    match messages::decode::<CancelRequest>("cancel", payload) {
        Ok(cancel) => {
            worker.cancel(&cancel.request_id);
            role.cancel(&cancel.request_id).await;
        }
        Err(e) => tracing::warn!("ignoring a malformed cancel: {e}"),
    }
}

async fn publish_heartbeat<R: Role>(
    worker: &Worker,
    role: &R,
    prefix_cache: Option<&PrefixCacheBus>,
    draining: bool,
) {
    let load = RoleLoad {
        queued: role.queued(),
        kv_transfer: role.kv_transfer(),
        kv_peer: role.kv_peer(),
        kv_pull: role.kv_pull(),
        prefix_cache: prefix_cache.map(|cache| cache.info(worker)),
    };
    worker.publish_heartbeat(draining, load).await;
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
