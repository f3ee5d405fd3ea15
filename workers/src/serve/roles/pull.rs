//! The decode side of a disaggregated request: a job with a KV handle waits for room in the
//! engine, then its K/V is pulled over the transport the handle names and written into the
//! room reserved for it. When the pull fails, the prompt is prefilled locally with the
//! handle's seed (same tokens as the context worker's would have continued into); a layout
//! that does not match this engine's is an error to the client, never garbage. The context
//! worker is told to release its export either way.
//!
//! Room first, then the pull: the job is queued in the engine as a reservation
//! ([`crate::engine::Engine::reserve_import`]); in arrival order with other imports, once a
//! sequence slot and the prompt's blocks are free they are reserved for it, and only then is
//! the K/V read. So this worker never holds more pulled K/V than its cache has room for (no
//! pull parks memory of its own waiting for blocks), and pulls that wait count in its queue
//! (`queued`, bounded by `--max-queued-requests`). The wait is bounded by the export's expiry:
//! a job still without room shortly before it becomes a local prefill, queued in the engine
//! like any other (no memory held until it is admitted).
//!
//! Before any of that, the handle is authenticated for the job that carries it
//! ([`crate::serve::kv_auth`]: its MAC, under the deployment's KV secret, covers the handle
//! and the request it was exported for) and taken once ([`super::spent_handles`]). A handle
//! that fails is refused: nothing it names is read, allocated or released, the prompt is
//! prefilled here, `kv_pulled` says `handle_refused`, and the heartbeat counts it.
//!
//! After the read, the export's seal ([`crate::transfer::seal`]): a pull whose export was
//! freed before it ended (a release or cancel that came early, forged or not; a replay of a
//! handle another decode worker pulled already) finds the seal changed, and what it read,
//! possibly another request's K/V, is dropped: the prompt is prefilled here, `kv_pulled` says
//! `export_gone`, and the heartbeat counts it (`kv_pull.exports_gone`).
//!
//! A pull's cancellation: a cancel reaches the engine request (the reservation) through the
//! worker, and sets the pull's [`CancelToken`], which skips a pull not yet started (a transfer
//! in flight is not interrupted: the release must still go out, and the memory it writes must
//! stay valid until it ends). The engine ends the request with `finished` (`cancelled`), and
//! K/V that arrives after that is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    self, GenerateJob, KvHandle, KvLayoutSpec, KvPeer, KvPullStats, KvRelease, KvTransportKind,
    PullOutcome, StreamMessage,
};
use tokio::sync::mpsc;

use super::KvTransports;
use super::export::layout_spec;
use super::premapped::{PremappedCaches, cache_key};
use super::spent_handles::SpentHandles;
use crate::backend::{KvBuffer, KvBytes, KvBytesMut};
use crate::engine::{EngineEvent, EngineHandle, EventKind, ImportedKv, ImportedPrefill, RequestId};
use crate::sampler::SampledToken;
use crate::serve::connection::BusSettings;
use crate::serve::kv_auth::{Canonical, HandleBinding, KvSecret, MacError};
use crate::serve::test_hooks::DELAY_PULL_VAR;
use crate::serve::worker::{Identity, Worker, locked, publish_bounded, unix_ms};
use crate::transfer::cuda_ipc::CacheBlocks;
use crate::transfer::seal::{SEAL_BYTES, Seal};
use crate::transfer::{PulledKv, RemoteKv, TransferError, from_hex};

/// Of the time a job's export has left when it arrives, what is kept for the pull itself: the
/// wait for room ends this long before the export expires (or halfway, for an export that
/// has less than twice this left).
const PULL_TIME_RESERVE: Duration = Duration::from_secs(2);

/// Set once to cancel a pull; clones share it.
#[derive(Clone, Default)]
struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Pulled K/V not yet in the cache: how many blocks, and the most at once. Each pull holds a
/// [`HeldKv`] from the start of its transfer until the engine has written it (or the pull
/// failed), so this counts what the worker holds outside its cache.
#[derive(Default)]
struct HeldBlocks {
    pulls: AtomicUsize,
    blocks: AtomicUsize,
    peak_blocks: AtomicUsize,
}

impl HeldBlocks {
    fn hold(self: &Arc<Self>, blocks: usize) -> HeldGuard {
        self.pulls.fetch_add(1, Ordering::AcqRel);
        let now = self.blocks.fetch_add(blocks, Ordering::AcqRel) + blocks;
        self.peak_blocks.fetch_max(now, Ordering::AcqRel);
        HeldGuard {
            held: Arc::clone(self),
            blocks,
        }
    }
}

/// One pull's part of [`HeldBlocks`], given back when dropped.
#[derive(Debug)]
struct HeldGuard {
    held: Arc<HeldBlocks>,
    blocks: usize,
}

impl std::fmt::Debug for HeldBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldBlocks")
            .field("blocks", &self.blocks.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.held.pulls.fetch_sub(1, Ordering::AcqRel);
        self.held.blocks.fetch_sub(self.blocks, Ordering::AcqRel);
    }
}

/// Pulled K/V on its way into the cache, counted as held until the engine drops it (after
/// writing it into the reserved blocks, or when its request has ended).
#[derive(Debug)]
struct HeldKv {
    kv: PulledKv,
    _held: HeldGuard,
}

impl KvBuffer for HeldKv {
    fn bytes(&self) -> KvBytes<'_> {
        self.kv.bytes()
    }

    fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        KvBuffer::bytes_mut(&mut self.kv)
    }
}

/// Pulls handles' K/V into this worker's engine, and knows the pulls in progress.
pub(in crate::serve) struct KvPuller {
    /// Host-memory transfers (UCX); device-to-device ones from GPU context workers of this
    /// host. A handle must match the layout.
    kv: KvTransports,
    /// Whether this worker advertises CUDA IPC reads: it has a pool, and no read of a CUDA IPC
    /// export has failed.
    cuda_ipc_reads: AtomicBool,
    /// The decode jobs in progress (waiting for room, pulling), by bus request id.
    in_progress: Mutex<HashMap<String, CancelToken>>,
    held: Arc<HeldBlocks>,
    /// The deployment's KV secret: a handle is read only if its MAC verifies for the job
    /// that carries it. `None`: handles are believed as they come (said once at start).
    secret: Option<Arc<KvSecret>>,
    /// Handles taken already: each is read once.
    spent: Mutex<SpentHandles>,
    /// Handles refused before anything was read, since start (the heartbeat's
    /// `kv_pull.refused_handles`).
    refused: AtomicU64,
    /// Pulls whose export's seal had changed by the end of the read, since start (the
    /// heartbeat's `kv_pull.exports_gone`).
    exports_gone: AtomicU64,
    /// When a refusal was last logged at `warn` (unix ms): a flood of forged jobs is counted,
    /// and logged at `debug` past one warning a second.
    refusal_warned_ms: AtomicU64,
    /// [`DELAY_PULL_VAR`].
    test_delay: Option<Duration>,
    /// Context workers' shared caches heard of, and which are mapped (the heartbeat's
    /// `kv_peer.cuda_ipc_mapped`).
    premapped: Arc<Mutex<PremappedCaches>>,
}

/// Why a decode job's handle is not read. The job is served all the same: its prompt is
/// prefilled here, and `kv_pulled` says the handle was refused.
#[derive(Debug)]
enum Refusal {
    /// The handle is not authenticated for this job (no MAC while this worker has a secret,
    /// a malformed one, or one that does not verify for the job's request). Nothing it says
    /// is believed: not even its context worker is told to release.
    Unauthenticated(MacError),
    /// This worker took the same handle for the same request before: its export has been
    /// released, and its memory may hold another request's K/V.
    Spent,
    /// The handle names no seal (a context worker older than seals), and this worker
    /// authenticates handles: it could not tell whether the export's memory was freed and
    /// reused before or during the read.
    Unsealed,
    /// Not a handle this worker can read ([`check_handle`]).
    Malformed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unauthenticated(e) => e.fmt(f),
            Refusal::Spent => f.write_str(
                "the handle was taken before for this request (a replay): its export was \
                 released after the first pull",
            ),
            Refusal::Unsealed => f.write_str(
                "the handle names no seal (a context worker older than seals), and this worker \
                 authenticates KV handles: a read could not tell the export's memory reused",
            ),
            Refusal::Malformed(reason) => write!(f, "invalid KV handle: {reason}"),
        }
    }
}

/// Where a pull put the K/V.
enum Pulled {
    /// In memory of the transport's (held until the engine has written it into the cache).
    Buffer(HeldKv),
    /// Straight into the blocks the engine reserved (a CUDA IPC pull): `bytes` copied.
    InReservedBlocks { bytes: u64 },
}

impl Pulled {
    fn bytes(&self) -> u64 {
        match self {
            Pulled::Buffer(held) => held.kv.len() as u64,
            Pulled::InReservedBlocks { bytes } => *bytes,
        }
    }
}

/// How a pull ended.
enum Pull {
    /// With the K/V, how long it took, and how long the job waited for room before it.
    Pulled {
        kv: Pulled,
        micros: u64,
        room_wait_us: u64,
    },
    /// The transfer failed: prefill locally.
    Failed(TransferError),
}

/// A decode job's entry among those in progress, removed when its task drops this: once its
/// K/V is handed to the engine (or it is answered), so the drain counts it throughout.
struct Registration {
    puller: Arc<KvPuller>,
    request_id: String,
    token: CancelToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        locked(&self.puller.in_progress).remove(&self.request_id);
    }
}

/// A decode job queued in the engine for room.
struct Queued {
    job: GenerateJob,
    handle: KvHandle,
    engine_id: RequestId,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    registration: Registration,
}

impl KvPuller {
    pub fn new(settings: &BusSettings) -> Self {
        Self {
            kv: KvTransports::new(settings),
            cuda_ipc_reads: AtomicBool::new(settings.cuda_ipc.is_some()),
            in_progress: Mutex::new(HashMap::new()),
            held: Arc::default(),
            secret: settings.kv_secret.clone(),
            spent: Mutex::default(),
            refused: AtomicU64::new(0),
            exports_gone: AtomicU64::new(0),
            refusal_warned_ms: AtomicU64::new(0),
            test_delay: settings.test_hooks.pull_delay,
            premapped: Arc::default(),
        }
    }

    /// Starts a decode job: authenticates its handle for the job and checks it, queues it in
    /// the engine for room (at once, so the next job finds it in the queue), and pulls and
    /// imports it on a task of its own once the room is reserved. A handle that is refused
    /// (not authenticated for this job, taken before, or malformed) is read from nowhere: the
    /// prompt is prefilled here instead. One of another model or layout is an error. The
    /// context worker of an authenticated handle is told to release its export either way.
    pub async fn start(self: &Arc<Self>, worker: &Arc<Worker>, job: GenerateJob, handle: KvHandle) {
        // Nothing a handle says is acted on before it is authenticated for this job.
        let authenticated = self.authenticate(&job, &handle);
        let Ok(mut request) = worker.job_request(&job).await else {
            if authenticated.is_ok() {
                publish_release(worker, &handle, &job.request_id).await;
            }
            return;
        };
        if let Err(refusal) = authenticated {
            self.refuse(worker, &job, &handle, refusal).await;
            worker
                .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                .await;
            return;
        }
        request.sampling.seed = Some(handle.seed);
        // The grammar is fed the imported first token when the K/V arrives, as a sampled one.
        let own = layout_spec(&self.kv.layout);
        let mismatch = model_mismatch(&handle, worker.job_fingerprint(&job), &worker.identity)
            .or_else(|| {
                (handle.layout != own).then(|| {
                    format!(
                        "KV layout mismatch: context worker {} has {:?}, decode worker {} has {:?} \
                     (both must serve the same model with the same block size and KV dtype)",
                        handle.worker_id, handle.layout, worker.identity.worker_id, own
                    )
                })
            });
        if let Some(mismatch) = mismatch {
            tracing::error!(request_id = job.request_id, "{mismatch}");
            publish_release(worker, &handle, &job.request_id).await;
            worker
                .publish(
                    job.stream_subject.clone(),
                    &StreamMessage::Error {
                        message: mismatch,
                        param: None,
                    },
                )
                .await;
            return;
        }
        if let Err(reason) = check_handle(&handle, &own, job.prompt_ids.len()) {
            publish_release(worker, &handle, &job.request_id).await;
            self.refuse(worker, &job, &handle, Refusal::Malformed(reason))
                .await;
            worker
                .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                .await;
            return;
        }
        let submitted = worker.submit(&job.request_id, |engine, sink| {
            engine.reserve_import_with_sink(request, sink)
        });
        let (engine_id, events) = match submitted {
            Ok(submitted) => submitted,
            Err(e) => {
                publish_release(worker, &handle, &job.request_id).await;
                worker.refuse(&job, &e).await;
                return;
            }
        };
        tracing::debug!(
            request_id = job.request_id,
            engine_id,
            prompt_tokens = job.prompt_ids.len(),
            "decode job queued for room in the KV cache"
        );
        let token = CancelToken::default();
        locked(&self.in_progress).insert(job.request_id.clone(), token.clone());
        let queued = Queued {
            registration: Registration {
                puller: Arc::clone(self),
                request_id: job.request_id.clone(),
                token,
            },
            job,
            handle,
            engine_id,
            events,
        };
        let (puller, worker) = (Arc::clone(self), Arc::clone(worker));
        tokio::spawn(async move { puller.pull_when_room(&worker, queued).await });
    }

    /// Whether `handle` may be read for `job` ([`authenticate`]). Takes it.
    fn authenticate(&self, job: &GenerateJob, handle: &KvHandle) -> Result<(), Refusal> {
        authenticate(
            self.secret.as_deref(),
            &mut locked(&self.spent),
            (job, handle),
            unix_ms(),
        )
    }

    /// Counts and logs a refused handle, and says on the job's stream that the prompt is
    /// prefilled here (`kv_pulled` with `handle_refused`).
    async fn refuse(&self, worker: &Worker, job: &GenerateJob, handle: &KvHandle, why: Refusal) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = unix_ms();
        let last = self.refusal_warned_ms.load(Ordering::Relaxed);
        let warn = now >= last.saturating_add(1000)
            && self
                .refusal_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        // `context_worker` is what the handle claims: for an unauthenticated one, anything.
        if warn {
            tracing::warn!(
                request_id = job.request_id,
                context_worker = handle.worker_id,
                "KV handle refused, prefilling locally: {why}"
            );
        } else {
            tracing::debug!(
                request_id = job.request_id,
                context_worker = handle.worker_id,
                "KV handle refused, prefilling locally: {why}"
            );
        }
        report_fallback(
            worker,
            job,
            PullOutcome::Refused {
                reason: why.to_string(),
            },
        )
        .await;
    }

    /// Cancels the pull of `request_id`, if one is in progress.
    pub fn cancel(&self, request_id: &str) {
        if let Some(token) = locked(&self.in_progress).get(request_id) {
            token.cancel();
        }
    }

    /// Decode jobs in progress (waiting for room, or pulling).
    pub fn in_progress(&self) -> usize {
        locked(&self.in_progress).len()
    }

    /// Whether this worker maps GPU context workers' caches ahead of their hand-overs (it
    /// reads CUDA IPC), so wants to hear their heartbeats.
    pub fn premaps(&self) -> bool {
        self.kv.cuda_ipc.is_some()
    }

    /// A context worker's heartbeat: where it shares its cache over CUDA IPC on this host
    /// (`peer.cuda_ipc_cache`), maps the cache now, off the request path, so that its first
    /// hand-over does not wait most of a second for the mapping. Later heartbeats find the
    /// mapping open and cost a lookup.
    pub fn premap(&self, worker_id: &str, peer: KvPeer) {
        let Some(transport) = &self.kv.cuda_ipc else {
            return;
        };
        if peer.cuda_ipc_cache.is_empty()
            || peer.host_id != self.kv.host_id
            || !self.cuda_ipc_reads.load(Ordering::Relaxed)
        {
            return;
        }
        let handles = cache_key(&peer.cuda_ipc_cache);
        locked(&self.premapped).heard(worker_id, handles.clone(), Instant::now());
        let transport = Arc::clone(transport);
        let premapped = Arc::clone(&self.premapped);
        let worker_id = worker_id.to_owned();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = transport.premap(&peer.cuda_ipc_cache);
            let news = locked(&premapped).mapped(&worker_id, &handles, result.is_ok());
            match result {
                Ok(0) => {}
                Ok(mappings) => tracing::info!(
                    context_worker = worker_id,
                    mappings,
                    ms = started.elapsed().as_millis() as u64,
                    "mapped a context worker's KV cache (CUDA IPC) ahead of its hand-overs"
                ),
                // The first pull maps it (or fails and falls back) as before.
                Err(e) if news => tracing::warn!(
                    context_worker = worker_id,
                    "could not map a context worker's KV cache (CUDA IPC) ahead of its \
                     hand-overs; its first hand-over will try again: {e}"
                ),
                Err(e) => tracing::debug!(
                    context_worker = worker_id,
                    "mapping a context worker's KV cache ahead, again: {e}"
                ),
            }
        });
    }

    /// How this worker reads K/V, for its heartbeat.
    pub fn kv_peer(&self) -> KvPeer {
        KvPeer {
            host_id: self.kv.host_id.clone(),
            cuda_ipc: self.cuda_ipc_reads.load(Ordering::Relaxed),
            coalesced_regions: true,
            cuda_ipc_ranks: true,
            cuda_ipc_cache: Vec::new(),
            cuda_ipc_mapped: locked(&self.premapped).mapped_workers(Instant::now()),
        }
    }

    /// The heartbeat's `kv_pull`.
    pub fn stats(&self, engine: &EngineHandle) -> KvPullStats {
        KvPullStats {
            waiting: engine.imports_waiting() as u32,
            in_flight: self.held.pulls.load(Ordering::Relaxed) as u32,
            waited: engine.imports_waited(),
            peak_held_blocks: self.held.peak_blocks.load(Ordering::Relaxed) as u32,
            refused_handles: self.refused.load(Ordering::Relaxed),
            exports_gone: self.exports_gone.load(Ordering::Relaxed),
        }
    }

    /// Waits for the engine to reserve the job's room (bounded by the export's expiry), pulls
    /// the K/V into it, and forwards the request's events; on a failed pull, or no room in
    /// time, the prompt is prefilled here instead.
    async fn pull_when_room(&self, worker: &Worker, queued: Queued) {
        let Queued {
            job,
            handle,
            engine_id,
            mut events,
            registration,
        } = queued;
        let left = Duration::from_millis(handle.expires_unix_ms.saturating_sub(unix_ms()));
        let wait = if left >= 2 * PULL_TIME_RESERVE {
            left - PULL_TIME_RESERVE
        } else {
            left / 2
        };
        let waited = Instant::now();
        let (blocks, cached_blocks) = match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(EngineEvent {
                kind:
                    EventKind::RoomReserved {
                        blocks,
                        cached_blocks,
                    },
                ..
            })) => (blocks, cached_blocks),
            // Ended before it had room: cancelled, refused, or the engine stopped.
            Ok(first) => {
                publish_release(worker, &handle, &job.request_id).await;
                worker
                    .forward(&job, events, first.into_iter().collect())
                    .await;
                return;
            }
            Err(_) => {
                let error = TransferError::Unavailable(format!(
                    "no room in the KV cache within {} ms, before the export expires",
                    wait.as_millis()
                ));
                publish_release(worker, &handle, &job.request_id).await;
                fell_back(worker, &job, &handle, &error).await;
                if let Err(e) = worker.engine.prefill_reserved(engine_id) {
                    tracing::warn!(request_id = job.request_id, "local prefill: {e}");
                }
                worker.forward(&job, events, Vec::new()).await;
                return;
            }
        };
        let room_wait = waited.elapsed();
        tracing::debug!(
            request_id = job.request_id,
            blocks = blocks.len(),
            cached_blocks,
            waited_ms = room_wait.as_millis() as u64,
            "room reserved: pulling"
        );
        if !registration.token.is_cancelled() {
            if let Some(delay) = self.test_delay {
                tracing::warn!(
                    request_id = job.request_id,
                    "{DELAY_PULL_VAR}: pulling in {} ms",
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
            }
            let started = Instant::now();
            let pull = match self.pull(&handle, blocks, cached_blocks).await {
                Ok(kv) => Pull::Pulled {
                    kv,
                    micros: started.elapsed().as_micros() as u64,
                    room_wait_us: room_wait.as_micros() as u64,
                },
                Err(e) => Pull::Failed(e),
            };
            publish_release(worker, &handle, &job.request_id).await;
            self.hand_over(worker, (&job, &handle, engine_id), pull)
                .await;
        } else {
            // The engine has the cancel too: its `finished` follows, and the reserved blocks
            // (never written) go back.
            if let Err(e) = worker.engine.return_reservation(engine_id) {
                tracing::debug!(request_id = job.request_id, "returning the room: {e}");
            }
            publish_release(worker, &handle, &job.request_id).await;
        }
        drop(registration);
        worker.forward(&job, events, Vec::new()).await;
    }

    /// Hands a pull's outcome to the engine: the K/V into the reserved room, or (a failed
    /// pull) a local prefill there with the handle's seed.
    async fn hand_over(
        &self,
        worker: &Worker,
        (job, handle, engine_id): (&GenerateJob, &KvHandle, RequestId),
        pull: Pull,
    ) {
        let handed = match pull {
            Pull::Pulled {
                kv,
                micros,
                room_wait_us,
            } => {
                let bytes = kv.bytes();
                tracing::debug!(
                    request_id = job.request_id,
                    bytes,
                    micros,
                    backend = %handle.backend,
                    in_place = matches!(kv, Pulled::InReservedBlocks { .. }),
                    "KV pulled"
                );
                worker
                    .publish(
                        job.stream_subject.clone(),
                        &StreamMessage::KvPulled {
                            worker_id: worker.identity.worker_id.clone(),
                            bytes,
                            micros,
                            room_wait_us: Some(room_wait_us),
                            outcome: PullOutcome::Pulled {
                                transport: handle.backend.clone(),
                            },
                        },
                    )
                    .await;
                let prefill = ImportedPrefill {
                    kv: match kv {
                        Pulled::Buffer(held) => ImportedKv::Bytes(Box::new(held)),
                        Pulled::InReservedBlocks { .. } => ImportedKv::InReservedBlocks,
                    },
                    num_tokens: handle.num_tokens as usize,
                    first_token: SampledToken {
                        id: handle.first_token.id,
                        logprob: handle.first_token.logprob.unwrap_or(0.0),
                        top_logprobs: handle.first_token.top_logprobs.clone(),
                    },
                };
                worker.engine.import_reserved(engine_id, prefill)
            }
            Pull::Failed(e) => {
                if matches!(e, TransferError::ExportGone(_)) {
                    self.exports_gone.fetch_add(1, Ordering::Relaxed);
                }
                fell_back(worker, job, handle, &e).await;
                worker.engine.prefill_reserved(engine_id)
            }
        };
        // The engine stopped: the forwarder reports it when the request's events end.
        if let Err(e) = handed {
            tracing::warn!(
                request_id = job.request_id,
                "handing the pull to the engine: {e}"
            );
        }
    }

    /// Reads the handle's blocks over the transport it names, bounded by its expiry: over
    /// UCX into a buffer, over CUDA IPC straight into `blocks`, the blocks the engine reserved
    /// for the request. The first `cached_blocks` of them came from this worker's prefix cache
    /// with their K/V: only the blocks after them are read.
    async fn pull(
        &self,
        handle: &KvHandle,
        mut blocks: Vec<u32>,
        cached_blocks: usize,
    ) -> Result<Pulled, TransferError> {
        let mut remote = RemoteKv::from_handle(handle)?;
        // The handle's regions count a tensor-parallel exporter's share of each block per
        // rank (as `check_handle` checked them).
        let ranks = handle.cuda_ipc_ranks.len().max(1) as u64;
        remote.skip_blocks(
            cached_blocks as u64,
            self.kv.layout.block_bytes() as u64 / ranks,
        )?;
        blocks.drain(..cached_blocks.min(blocks.len()));
        let left = handle.expires_unix_ms.saturating_sub(unix_ms());
        let host = &self.kv.host;
        if handle.backend == host.backend() {
            let held = self.held.hold(blocks.len());
            let timeout = Duration::from_millis(left.clamp(100, 30_000));
            let expected = remote.total_len();
            let kv = host.pull(remote, timeout).await?;
            if kv.len() as u64 != expected {
                return Err(TransferError::InvalidHandle(format!(
                    "pulled {} bytes, expected {expected}",
                    kv.len()
                )));
            }
            return Ok(Pulled::Buffer(HeldKv { kv, _held: held }));
        }
        if handle.backend != KvTransportKind::CudaIpc {
            return Err(TransferError::InvalidHandle(format!(
                "the handle is for transport `{}`, this worker reads `{}`{}",
                handle.backend,
                host.backend(),
                if self.kv.cuda_ipc.is_some() {
                    " and `cuda-ipc`"
                } else {
                    ""
                }
            )));
        }
        let Some(device) = &self.kv.cuda_ipc else {
            return Err(TransferError::InvalidHandle(
                "the K/V was exported to GPU memory for CUDA IPC, and this worker does not \
                 read CUDA IPC (a CPU worker, or --cuda-ipc-pool-mb 0)"
                    .into(),
            ));
        };
        // One host, one clock: past its expiry the export's memory may hold another
        // request's K/V soon (the grace period bounds a pull started before it, not after).
        if left == 0 {
            return Err(TransferError::Unavailable(
                "the KV export expired before the pull".into(),
            ));
        }
        let into = CacheBlocks {
            layout: self.kv.layout,
            shards: self.kv.device_cache_parts.clone(),
            blocks,
        };
        // SAFETY: `shards` is this worker's cache (the engine's, alive while the worker
        // serves), and `blocks` the blocks the engine reserved for this request: it neither
        // schedules a reserved request nor gives its blocks to anyone else until the request
        // is handed back (`import_reserved`, `prefill_reserved` or `return_reservation`, all
        // after this pull), also when it is cancelled meanwhile.
        let pulled = unsafe { device.pull_into_cache(remote, into) }.await;
        let bytes = pulled.inspect_err(|e| {
            // A changed seal is the export's fate, not the GPUs' failing to share.
            if !matches!(e, TransferError::ExportGone(_)) {
                self.cuda_ipc_read_failed(e)
            }
        })?;
        Ok(Pulled::InReservedBlocks { bytes })
    }

    /// A CUDA IPC read failed (no peer access between the GPUs, or processes that cannot share
    /// GPU memory): stop advertising CUDA IPC, so context workers export for this worker
    /// through host memory once the next heartbeat is out.
    fn cuda_ipc_read_failed(&self, error: &TransferError) {
        let was = self.cuda_ipc_reads.swap(false, Ordering::Relaxed);
        if was {
            tracing::error!(
                "reading a context worker's GPU memory over CUDA IPC failed ({error}); this \
                 worker now asks for host-memory (UCX) transfers. Same-host GPU transfers need \
                 peer access between the GPUs and a shared IPC namespace (docker --ipc=host)."
            );
        }
    }
}

/// Whether `handle` may be read for `job`: its MAC verifies for the job and it names its
/// export's seal when this worker has the deployment's `secret`, and it is not among the
/// handles `spent` already; it is then spent. Checked before anything the handle says is
/// acted on.
///
/// An unsealed handle is refused where handles are authenticated: such a worker promises
/// that a pull never reads another request's K/V, and without a seal a pull cannot tell
/// an export freed early (by a forged release, say) and reused. Without a secret nothing is
/// promised, and a handle from a context worker older than seals is read as it comes.
fn authenticate(
    secret: Option<&KvSecret>,
    spent: &mut SpentHandles,
    (job, handle): (&GenerateJob, &KvHandle),
    now_ms: u64,
) -> Result<(), Refusal> {
    let binding = HandleBinding::of(job);
    let canonical = Canonical::of(handle, &binding);
    if let Some(secret) = secret {
        secret
            .verify(&canonical, &handle.mac, &binding)
            .map_err(Refusal::Unauthenticated)?;
        if handle.seal.is_none() {
            return Err(Refusal::Unsealed);
        }
    }
    if spent.take(canonical.digest(), handle.expires_unix_ms, now_ms) {
        Ok(())
    } else {
        Err(Refusal::Spent)
    }
}

/// Longest `address` or `rkey` a handle may carry, in hex digits (UCX's packed worker
/// addresses and remote keys are a few hundred bytes).
const MAX_HANDLE_HEX: usize = 16 * 1024;
/// Hex digits of a CUDA IPC memory handle (`CUipcMemHandle`: 64 bytes).
const CUDA_IPC_HANDLE_HEX: usize = 128;
/// Most ranks a tensor-parallel exporter's handle may name (a node's GPUs).
const MAX_CUDA_IPC_RANKS: usize = 64;

/// Why `handle` holds another model's K/V than `own` serves, if it names one. A handle without
/// a fingerprint comes from a context worker, or through an api-server, older than the field
/// (a rolling upgrade): it passes, with a warning, and its layout is all that is checked.
///
/// `expected` is the fingerprint of what the job computes with: the model's, or its LoRA
/// adapter's ([`crate::model::lora`]), so K/V of another adapter are refused the same way.
fn model_mismatch(handle: &KvHandle, expected: &str, own: &Identity) -> Option<String> {
    if handle.model_fingerprint.is_empty() {
        tracing::warn!(
            context_worker = handle.worker_id,
            "a KV handle without a model fingerprint (an older context worker or api-server); \
             checked by its layout only"
        );
        return None;
    }
    (handle.model_fingerprint != expected).then(|| {
        format!(
            "KV of another model: context worker {} computed it with fingerprint {:?}, \
             decode worker {} computes the job with {:?} (workers of one served name must load \
             the same model directory and LoRA adapters: same config and weights)",
            handle.worker_id, handle.model_fingerprint, own.worker_id, expected
        )
    })
}

/// Checks everything a handle from the bus claims before anything is allocated or read: its
/// token count is the job's prompt, its regions are whole blocks (one each, or runs of several:
/// this worker advertises `coalesced_regions`) adding up to exactly the blocks the tokens
/// need, its addressing fields are bounded and hex, its seal (if it names one) is 16 bytes
/// that are not all zeros, and a CUDA IPC handle's regions and seal lie inside the allocation
/// it announces (the pull checks them against the memory it maps, too). A handle that fails
/// is refused (a local prefill), never a read of memory it did not describe. (Its MAC and
/// its model and layout are checked before.)
fn check_handle(handle: &KvHandle, own: &KvLayoutSpec, prompt_tokens: usize) -> Result<(), String> {
    let tokens = handle.num_tokens as usize;
    if tokens == 0 || tokens != prompt_tokens {
        return Err(format!(
            "the handle holds K/V of {tokens} tokens for a prompt of {prompt_tokens}"
        ));
    }
    // A tensor-parallel exporter's regions count one rank's share of each block.
    let ranks = handle.cuda_ipc_ranks.len().max(1) as u64;
    if ranks > 1
        && (!(own.num_kv_heads as u64).is_multiple_of(ranks)
            || !own.block_bytes.is_multiple_of(ranks))
    {
        return Err(format!(
            "K/V of {ranks} tensor-parallel ranks for {} KV heads",
            own.num_kv_heads
        ));
    }
    let block_bytes = (own.block_bytes / ranks).max(1);
    let blocks = tokens.div_ceil(own.block_size.max(1) as usize) as u64;
    if handle.blocks.is_empty() || handle.blocks.len() as u64 > blocks {
        return Err(format!(
            "{} regions for {tokens} tokens in blocks of {} (expected 1 to {blocks})",
            handle.blocks.len(),
            own.block_size
        ));
    }
    if let Some(bad) = handle
        .blocks
        .iter()
        .find(|r| r.len == 0 || r.len % block_bytes != 0 || r.addr.checked_add(r.len).is_none())
    {
        return Err(format!(
            "a region of {} bytes at {:#x} (blocks are {block_bytes} bytes{})",
            bad.len,
            bad.addr,
            if ranks > 1 { " a rank" } else { "" }
        ));
    }
    let covered = handle
        .blocks
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.len / block_bytes));
    if covered != Some(blocks) {
        return Err(format!(
            "regions of {} blocks for {tokens} tokens in blocks of {} (expected {blocks})",
            covered.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
            own.block_size
        ));
    }
    if handle.address.len() > MAX_HANDLE_HEX || handle.rkey.len() > MAX_HANDLE_HEX {
        return Err("the handle's address or remote key is too long".into());
    }
    for (what, hex) in [("address", &handle.address), ("remote key", &handle.rkey)] {
        if let Err(e) = from_hex(hex) {
            return Err(format!("the handle's {what} is not hex ({e})"));
        }
    }
    let seal = match &handle.seal {
        Some(seal) => Some(Seal::from_wire(seal).map_err(|e| format!("the handle's seal: {e}"))?),
        None => None,
    };
    let sources: Vec<&tandem_protocol::messages::CudaIpcSource> = handle
        .cuda_ipc
        .as_deref()
        .into_iter()
        .chain(&handle.cuda_ipc_ranks)
        .collect();
    match (&handle.backend, &sources[..]) {
        (KvTransportKind::CudaIpc, []) => {
            return Err("a CUDA IPC handle without its allocation".into());
        }
        (KvTransportKind::CudaIpc, sources) => {
            if handle.cuda_ipc.is_some() && !handle.cuda_ipc_ranks.is_empty() {
                return Err("a CUDA IPC handle with both one allocation and one per rank".into());
            }
            if sources.len() > MAX_CUDA_IPC_RANKS {
                return Err(format!(
                    "{} CUDA IPC allocations (at most {MAX_CUDA_IPC_RANKS})",
                    sources.len()
                ));
            }
            for (rank, source) in sources.iter().enumerate() {
                if source.mem_handle.len() != CUDA_IPC_HANDLE_HEX
                    || from_hex(&source.mem_handle).is_err()
                {
                    return Err(format!(
                        "a CUDA IPC memory handle of {} characters (expected \
                         {CUDA_IPC_HANDLE_HEX} hex digits)",
                        source.mem_handle.len()
                    ));
                }
                if let Some(outside) = handle
                    .blocks
                    .iter()
                    .find(|r| r.addr + r.len > source.alloc_bytes)
                {
                    return Err(format!(
                        "a region at offset {:#x} ends past the exported {} bytes",
                        outside.addr, source.alloc_bytes
                    ));
                }
                if let Some(seal) = seal
                    && rank == 0
                    && seal.addr + SEAL_BYTES as u64 > source.alloc_bytes
                {
                    return Err(format!(
                        "the seal at offset {:#x} ends past the exported {} bytes",
                        seal.addr, source.alloc_bytes
                    ));
                }
            }
        }
        (_, [_, ..]) => return Err("a host-memory handle that names GPU memory".into()),
        (_, []) => {
            if handle.address.is_empty() || handle.rkey.is_empty() {
                return Err("a host-memory handle without an address or remote key".into());
            }
        }
    }
    Ok(())
}

/// Says that the decode worker prefills the prompt itself (`kv_pulled` with a fallback, or
/// `export_gone` for a changed seal), and why, in the log.
async fn fell_back(worker: &Worker, job: &GenerateJob, handle: &KvHandle, error: &TransferError) {
    let reason = error.to_string();
    let outcome = if matches!(error, TransferError::ExportGone(_)) {
        // What was read is dropped unused; the operator should know that exports are
        // freed before their pulls (releases or cancels that are early or forged, replays).
        tracing::warn!(
            request_id = job.request_id,
            context_worker = handle.worker_id,
            "KV pull read an export that was freed meanwhile; dropped what it read, \
             prefilling locally: {error}"
        );
        PullOutcome::ExportGone { reason }
    } else {
        tracing::warn!(
            request_id = job.request_id,
            context_worker = handle.worker_id,
            "KV pull failed, prefilling locally: {error}"
        );
        PullOutcome::Fallback { reason }
    };
    report_fallback(worker, job, outcome).await;
}

/// `kv_pulled` without bytes: the prompt is prefilled here (`outcome` says why).
async fn report_fallback(worker: &Worker, job: &GenerateJob, outcome: PullOutcome) {
    worker
        .publish(
            job.stream_subject.clone(),
            &StreamMessage::KvPulled {
                worker_id: worker.identity.worker_id.clone(),
                bytes: 0,
                micros: 0,
                room_wait_us: None,
                outcome,
            },
        )
        .await;
}

/// Tells the context worker that exported `handle` to free it.
async fn publish_release(worker: &Worker, handle: &KvHandle, request_id: &str) {
    let release = KvRelease {
        request_id: request_id.to_owned(),
    };
    publish_bounded(
        &worker.client,
        worker.subjects.kv_release(&handle.worker_id),
        messages::encode(&release),
        "a KV release",
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle as a context worker makes it: 5 tokens in 3 blocks of 2 tokens (128 bytes),
    /// exported to host memory.
    fn valid_handle() -> (KvHandle, KvLayoutSpec) {
        use super::super::export::fixtures;
        (
            fixtures::handle(1, u64::MAX),
            layout_spec(&fixtures::layout()),
        )
    }

    #[test]
    fn a_handle_of_another_model_is_refused_and_one_without_a_fingerprint_passes() {
        let (handle, _) = valid_handle();
        let own = |fingerprint: &str| Identity {
            lora_adapters: Vec::new(),
            worker_id: "dec".into(),
            served_name: "m".into(),
            model_fingerprint: fingerprint.into(),
            role: tandem_protocol::messages::WorkerRole::Decode,
            device: "cpu".into(),
            total_kv_blocks: 8,
            heartbeat: Duration::from_secs(1),
            max_running: 4,
            numerics: tandem_protocol::messages::WorkerNumerics {
                weights: "bf16".into(),
                kv_cache: tandem_protocol::messages::KvDTypeSpec::Bf16,
            },
        };
        let fingerprint = handle.model_fingerprint.clone();
        assert_eq!(
            model_mismatch(&handle, &fingerprint, &own(&fingerprint)),
            None
        );
        let refused = model_mismatch(&handle, "1234", &own("1234")).expect("another model");
        assert!(
            refused.contains("KV of another model") && refused.contains("\"1234\""),
            "{refused}"
        );
        // A job for a LoRA adapter expects the adapter's fingerprint: K/V of the base
        // model (or another adapter) are refused.
        let refused = model_mismatch(&handle, "adapter-fp", &own(&fingerprint))
            .expect("the base model's K/V for an adapter's job");
        assert!(refused.contains("\"adapter-fp\""), "{refused}");
        let older = KvHandle {
            model_fingerprint: String::new(),
            ..handle
        };
        assert_eq!(model_mismatch(&older, "1234", &own("1234")), None);
    }

    #[test]
    fn a_tensor_parallel_exporters_handle_counts_a_ranks_share_of_each_block() {
        let (mut handle, mut own) = valid_handle();
        // Two KV heads, so two ranks of 64 bytes a block each.
        own.num_kv_heads = 2;
        own.block_bytes = 256;
        handle.layout = own.clone();
        let source = |device: &str| tandem_protocol::messages::CudaIpcSource {
            host_id: "h".into(),
            device: device.into(),
            mem_handle: "0".repeat(CUDA_IPC_HANDLE_HEX),
            alloc_bytes: 1 << 20,
            liveness_offset: None,
        };
        handle.backend = KvTransportKind::CudaIpc;
        handle.address.clear();
        handle.rkey.clear();
        handle.cuda_ipc_ranks = vec![source("GPU-0"), source("GPU-1")];
        handle.blocks = (0..3)
            .map(|b| tandem_protocol::messages::KvRegion {
                addr: 4096 + b * 128,
                len: 128,
            })
            .collect();
        assert_eq!(check_handle(&handle, &own, 5), Ok(()));
        let refused = |mutate: &dyn Fn(&mut KvHandle), needle: &str| {
            let mut bad = handle.clone();
            mutate(&mut bad);
            let err = check_handle(&bad, &own, 5).unwrap_err();
            assert!(err.contains(needle), "{err} (wanted {needle:?})");
        };
        refused(
            &|h| h.blocks[0].len = 256,
            "regions of 4 blocks for 5 tokens",
        );
        refused(&|h| h.blocks[0].len = 64, "blocks are 128 bytes a rank");
        refused(
            &|h| h.cuda_ipc_ranks.push(source("GPU-2")),
            "3 tensor-parallel ranks for 2 KV heads",
        );
        refused(
            &|h| h.cuda_ipc = Some(Box::new(source("GPU-0"))),
            "both one allocation and one per rank",
        );
        refused(
            &|h| h.cuda_ipc_ranks[1].alloc_bytes = 4096,
            "ends past the exported 4096 bytes",
        );
        refused(
            &|h| h.backend = KvTransportKind::Ucx,
            "a host-memory handle that names GPU memory",
        );
    }

    #[test]
    fn a_handle_is_checked_whole_before_anything_is_read() {
        let (good, own) = valid_handle();
        assert_eq!(check_handle(&good, &own, 5), Ok(()));
        let refused = |mutate: &dyn Fn(&mut KvHandle), prompt: usize, needle: &str| {
            let mut handle = good.clone();
            mutate(&mut handle);
            let err = check_handle(&handle, &own, prompt).unwrap_err();
            assert!(err.contains(needle), "{err} (wanted {needle:?})");
        };
        refused(&|_| {}, 6, "for a prompt of 6");
        refused(&|h| h.num_tokens = 0, 0, "0 tokens");
        refused(&|h| h.blocks.truncate(2), 5, "regions of 2 blocks");
        refused(&|h| h.blocks.clear(), 5, "0 regions");
        refused(&|h| h.blocks.push(h.blocks[2]), 5, "4 regions for 5 tokens");
        refused(&|h| h.blocks[1].len = 4096, 5, "regions of 34 blocks");
        refused(&|h| h.blocks[1].len = 100, 5, "a region of 100 bytes");
        refused(&|h| h.blocks[1].len = 0, 5, "a region of 0 bytes");
        // One region for the whole export (a reader of coalesced regions), or any runs of
        // whole blocks, as long as they add up to the prompt's blocks.
        let coalesced = super::super::export::fixtures::handle_of(true, 1, u64::MAX);
        assert_eq!(coalesced.blocks.len(), 1);
        assert_eq!(check_handle(&coalesced, &own, 5), Ok(()));
        let mut runs = good.clone();
        runs.blocks = vec![
            tandem_protocol::messages::KvRegion {
                addr: 4096,
                len: 256,
            },
            good.blocks[2],
        ];
        assert_eq!(check_handle(&runs, &own, 5), Ok(()));
        refused(
            &|h| h.blocks = vec![coalesced.blocks[0], coalesced.blocks[0]],
            5,
            "regions of 6 blocks",
        );
        let mut too_long = coalesced.clone();
        too_long.blocks[0].len += 128;
        assert!(
            check_handle(&too_long, &own, 5)
                .unwrap_err()
                .contains("regions of 4 blocks")
        );
        refused(&|h| h.blocks[2].addr = u64::MAX - 10, 5, "a region of");
        refused(&|h| h.rkey = "ab".repeat(MAX_HANDLE_HEX), 5, "too long");
        refused(&|h| h.address.clear(), 5, "without an address");
        let gpu = |h: &mut KvHandle, alloc_bytes: u64, hex: usize| {
            h.backend = KvTransportKind::CudaIpc;
            h.cuda_ipc = Some(Box::new(tandem_protocol::messages::CudaIpcSource {
                host_id: "h".into(),
                device: "GPU-0".into(),
                mem_handle: "0".repeat(hex),
                alloc_bytes,
                liveness_offset: None,
            }));
        };
        let mut on_gpu = good.clone();
        gpu(&mut on_gpu, 1 << 20, CUDA_IPC_HANDLE_HEX);
        assert_eq!(check_handle(&on_gpu, &own, 5), Ok(()));
        refused(
            &|h| gpu(h, 4096, CUDA_IPC_HANDLE_HEX),
            5,
            "ends past the exported 4096 bytes",
        );
        refused(&|h| gpu(h, 1 << 20, 12), 5, "of 12 characters");
        refused(
            &|h| {
                gpu(h, 1 << 20, CUDA_IPC_HANDLE_HEX);
                if let Some(source) = &mut h.cuda_ipc {
                    source.mem_handle = "g".repeat(CUDA_IPC_HANDLE_HEX);
                }
            },
            5,
            "of 128 characters",
        );
        // The seal: 16 bytes, not the zeros of a freed export, and inside a CUDA IPC
        // allocation.
        refused(
            &|h| h.seal.as_mut().unwrap().nonce = "00".repeat(SEAL_BYTES),
            5,
            "seal nonce of zeros",
        );
        refused(
            &|h| h.seal.as_mut().unwrap().nonce = "ab".repeat(SEAL_BYTES - 1),
            5,
            "seal nonce of 30 hex digits",
        );
        refused(
            &|h| {
                gpu(h, 4096 + 384 + 8, CUDA_IPC_HANDLE_HEX);
            },
            5,
            "the seal at offset 0x1180 ends past the exported 4488 bytes",
        );
        let unsealed = KvHandle {
            seal: None,
            ..good.clone()
        };
        assert_eq!(
            check_handle(&unsealed, &own, 5),
            Ok(()),
            "an older context worker's handle has the right shape (the MAC check refuses it \
             where handles are authenticated)"
        );
        refused(&|h| h.address = "0".into(), 5, "address is not hex");
        refused(&|h| h.rkey = "zz".into(), 5, "remote key is not hex");
        refused(
            &|h| h.backend = KvTransportKind::CudaIpc,
            5,
            "without its allocation",
        );
        refused(
            &|h| {
                gpu(h, 1 << 20, CUDA_IPC_HANDLE_HEX);
                h.backend = KvTransportKind::Ucx;
            },
            5,
            "names GPU memory",
        );
    }

    /// A decode job for `request_id` whose prompt is the fixture handle's 5 tokens.
    fn job_of(request_id: &str) -> GenerateJob {
        GenerateJob {
            lora: None,
            request_id: request_id.into(),
            prompt_ids: vec![1, 2, 3, 4, 5],
            sampling: tandem_protocol::messages::SamplingSpec::default(),
            stop: tandem_protocol::messages::StopSpec::default(),
            stream_subject: format!("tandem.m.stream.{request_id}"),
            deadline_unix_ms: None,
            kv: None,
            kv_reader: None,
            resume_ids: Vec::new(),
            samples: None,
            cache_salt: None,
            priority: 0,
            prediction_ids: Vec::new(),
            embedding: false,
        }
    }

    #[test]
    fn a_handle_is_read_only_for_the_job_it_was_signed_for_and_once() {
        let secret = KvSecret::load(None, |_| Some("k".repeat(32)))
            .unwrap()
            .unwrap();
        let (a, b) = (job_of("a"), job_of("b"));
        let (mut handle, _) = valid_handle();
        secret.sign(&mut handle, &HandleBinding::of(&a));
        let now = 1_000;
        let mut spent = SpentHandles::default();
        let mut check = |secret: Option<&KvSecret>, job: &GenerateJob, handle: &KvHandle| {
            authenticate(secret, &mut spent, (job, handle), now)
        };
        // A's handle in B's job: refused, and not spent by the attempt.
        assert!(matches!(
            check(Some(&secret), &b, &handle),
            Err(Refusal::Unauthenticated(MacError::Mismatch { .. }))
        ));
        let unsigned = KvHandle {
            mac: String::new(),
            ..handle.clone()
        };
        assert!(matches!(
            check(Some(&secret), &a, &unsigned),
            Err(Refusal::Unauthenticated(MacError::Missing))
        ));
        assert!(check(Some(&secret), &a, &handle).is_ok());
        // The same job again (a replay after the pull): its export is gone.
        let replay = check(Some(&secret), &a, &handle).unwrap_err();
        assert!(matches!(replay, Refusal::Spent), "{replay}");
        assert!(replay.to_string().contains("a replay"), "{replay}");
        // Without a secret a handle is believed as it comes, but still taken once.
        assert!(check(None, &b, &unsigned).is_ok());
        assert!(matches!(check(None, &b, &unsigned), Err(Refusal::Spent)));

        // A signed handle without a seal (a context worker older than seals) is refused
        // where handles are authenticated, and read as it comes where they are not.
        let mut unsealed = valid_handle().0;
        unsealed.seal = None;
        let c = job_of("c");
        secret.sign(&mut unsealed, &HandleBinding::of(&c));
        let refusal = check(Some(&secret), &c, &unsealed).unwrap_err();
        assert!(matches!(refusal, Refusal::Unsealed), "{refusal}");
        assert!(refusal.to_string().contains("names no seal"), "{refusal}");
        assert!(
            check(None, &c, &unsealed).is_ok(),
            "not spent by the refusal"
        );
    }

    #[test]
    fn a_cancel_token_is_shared_by_its_clones() {
        let token = CancelToken::default();
        let held_by_the_pull = token.clone();
        assert!(!held_by_the_pull.is_cancelled());
        token.cancel();
        assert!(held_by_the_pull.is_cancelled());
    }
}
