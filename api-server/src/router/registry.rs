//! The workers this api-server knows, from their heartbeats: who is live, who is stuck, and
//! the jobs counted against each.
//!
//! Workers are discovered from their heartbeats (`tandem.{model}.heartbeat.{role}.{id}`), never
//! from a static list: a worker is live while its last heartbeat is younger than
//! `worker_timeout_ms`, and dropped after that. A job is published to the chosen worker's
//! direct subject, so the api-server knows who has it (for the `Accepted` timeout and metrics).
//!
//! The registry is a map behind a `std::sync::Mutex`: every critical section is a few map
//! operations over at most a few dozen workers and never spans an `.await`, which is cheaper
//! than a round trip to an owning task on the request path.
//!
//! A worker whose queue is full is skipped: its heartbeat says its bound (`max_queued`) and how
//! many sequences it runs at once (`max_running`), so the jobs sent since the heartbeat beyond
//! its free running slots count as queued; and a worker that refused a job
//! ([`WorkerRegistry::refused`]) is full until its next heartbeat. A context worker's prefill
//! jobs are also counted off as it answers them ([`super::ContextJob`]), so its count stays
//! exact between heartbeats and a refusal lasts until its next answer.
//!
//! The registry reports what it sees to the metrics as events (each heartbeat, each worker that
//! left, the live counts per role); [`crate::metrics`] derives the series from them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tandem_protocol::config::RouterPolicy;
use tandem_protocol::messages::{Heartbeat, KvEvents, KvPeer, KvSnapshot, WorkerRole};

use super::RouterSettings;
use super::policy::Policy;
use super::prefix_index::{PrefixIndex, PromptBlocks, Source};
use super::worker::{Pool, WorkerEntry, WorkerStatus};
use crate::metrics::{Event, Metrics};
use crate::outcomes::LiveCounts;
use crate::refusals::RefusalRun;

/// Worker timeouts without an engine step, while a worker has work, after which it is taken
/// out of rotation: its bus task heartbeats, but its engine answers nothing (its requests
/// migrate when their streams stall).
pub const STUCK_AFTER_TIMEOUTS: u32 = 3;

pub(super) struct Inner {
    pub(super) workers: HashMap<String, WorkerEntry>,
    policy: Policy,
    /// What each worker holds in its prefix cache.
    pub(super) prefix: PrefixIndex,
    /// Requests refused (429) because every live generation worker was full: logged as a
    /// run, not once per request.
    generation_full: RefusalRun,
}

/// The `kv_aware` policy's cost of sending `prompt` to worker `id` (entry `w`), in
/// thousandths of a KV block: `overlap_weight` x the prompt's blocks it does not hold cached
/// (what its prefill would compute), plus the blocks its work holds (its last heartbeat's used
/// blocks and the blocks of the prompts sent to it since). The load term is always there, so
/// one hot prefix cannot pile every request onto the worker that holds it: once its blocks in
/// use outweigh the prefill saved, others get the next requests.
fn kv_cost(
    index: &PrefixIndex,
    id: &str,
    w: &WorkerEntry,
    prompt: &mut PromptBlocks<'_>,
    overlap_weight: f64,
) -> u64 {
    let (prompt_blocks, held) = match index.info(id) {
        Some(info) => {
            let block_size = info.block_size.max(1) as usize;
            let prompt_blocks = prompt.len().div_ceil(block_size) as u64;
            (prompt_blocks, index.overlap(id, prompt.names(info)) as u64)
        }
        // A worker that caches nothing: its blocks are the CPU default's 16 tokens.
        None => (prompt.len().div_ceil(16) as u64, 0),
    };
    let weight_milli = (overlap_weight * 1000.0).round() as u64;
    weight_milli * (prompt_blocks - held.min(prompt_blocks)) + 1000 * w.active_blocks()
}

pub struct WorkerRegistry {
    inner: Mutex<Inner>,
    pub(super) settings: RouterSettings,
    metrics: Metrics,
    /// The LoRA adapters the live workers list, kept for validation and `/v1/models`.
    adapters: crate::lora::ServedAdapters,
}

/// The outcome of choosing a worker of one pool.
pub(super) enum Pick {
    Chosen(String),
    /// Live workers of the pool, each with a full queue.
    AllFull,
    /// No live worker of the pool (besides those excluded).
    NoneLive,
}

impl Pick {
    pub(super) fn chosen(self) -> Option<String> {
        match self {
            Pick::Chosen(id) => Some(id),
            Pick::AllFull | Pick::NoneLive => None,
        }
    }
}

impl WorkerRegistry {
    pub fn new(settings: RouterSettings, metrics: Metrics) -> Self {
        WorkerRegistry {
            inner: Mutex::new(Inner {
                workers: HashMap::new(),
                policy: Policy::new(settings.policy),
                prefix: PrefixIndex::default(),
                generation_full: RefusalRun::new("the generation workers' queues"),
            }),
            settings,
            metrics,
            adapters: Default::default(),
        }
    }

    /// Keeps `adapters` to the LoRA adapters the live workers list (the api-server's
    /// [`crate::validation::ModelLimits::adapters`]).
    pub fn with_adapters(mut self, adapters: crate::lora::ServedAdapters) -> Self {
        self.adapters = adapters;
        self
    }

    /// Sets the served adapters to those the workers in `inner` list.
    fn update_adapters(&self, inner: &Inner) {
        let names: std::collections::BTreeSet<String> = inner
            .workers
            .values()
            .flat_map(|w| w.heartbeat.lora_adapters.iter().map(|a| a.name.clone()))
            .collect();
        let listed = names.iter().cloned().collect::<Vec<_>>().join(", ");
        if self.adapters.set(names) {
            tracing::info!(adapters = %listed, "LoRA adapters served by the live workers");
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map (every update is a single
        // insert or remove), so the poison flag carries no information worth failing on.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a heartbeat; returns whether the worker's view of its prefix cache needs a
    /// snapshot (the caller fetches it: [`Self::kv_snapshot`]).
    pub fn observe(&self, heartbeat: Heartbeat, now: Instant) -> bool {
        self.metrics.record(Event::Heartbeat(&heartbeat));
        let mut inner = self.lock();
        let resync = inner
            .prefix
            .heartbeat(&heartbeat.worker_id, heartbeat.prefix_cache.as_ref());
        self.record_prefix_view(&inner, &heartbeat.worker_id, resync);
        if !inner.workers.contains_key(&heartbeat.worker_id) {
            tracing::info!(worker_id = %heartbeat.worker_id, role = heartbeat.role.as_str(),
                device = %heartbeat.device, "worker joined");
        }
        let has_work = heartbeat.running + heartbeat.queued > 0;
        let progressed_at = match inner.workers.get(&heartbeat.worker_id) {
            Some(previous)
                if has_work
                    && heartbeat.engine.is_some()
                    && heartbeat.engine.map(|e| e.steps)
                        == previous.heartbeat.engine.map(|e| e.steps) =>
            {
                previous.progressed_at
            }
            _ => now,
        };
        let stuck = now.saturating_duration_since(progressed_at)
            > self.settings.worker_timeout * STUCK_AFTER_TIMEOUTS;
        let was_stuck = inner
            .workers
            .get(&heartbeat.worker_id)
            .is_some_and(|w| w.stuck);
        if stuck && !was_stuck {
            tracing::warn!(worker_id = %heartbeat.worker_id, running = heartbeat.running,
                queued = heartbeat.queued, idle_ms = now.saturating_duration_since(progressed_at).as_millis() as u64,
                "the worker's engine makes no progress although it has work: taking it out of rotation");
        } else if was_stuck && !stuck {
            tracing::info!(worker_id = %heartbeat.worker_id, "the worker's engine runs again");
        }
        inner.workers.insert(
            heartbeat.worker_id.clone(),
            WorkerEntry::new(heartbeat, now, progressed_at, stuck),
        );
        self.metrics.record(Event::LiveWorkers(counts_of(&inner)));
        self.update_adapters(&inner);
        resync
    }

    /// Drops workers whose heartbeat is older than the timeout; returns their ids.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut inner = self.lock();
        let timeout = self.settings.worker_timeout;
        let gone: Vec<String> = inner
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            inner.prefix.forget(id);
            if let Some(entry) = inner.workers.remove(id) {
                tracing::warn!(worker_id = %id, "worker left (no heartbeat within {} ms)", timeout.as_millis());
                self.metrics.record(Event::WorkerLeft {
                    worker_id: id,
                    role: entry.heartbeat.role,
                });
            }
        }
        if !gone.is_empty() {
            self.metrics.record(Event::LiveWorkers(counts_of(&inner)));
            self.update_adapters(&inner);
        }
        gone
    }

    /// Records that `worker_id` refused a job because its queue is full: it gets no job until
    /// its next heartbeat says how full it is.
    pub fn refused(&self, worker_id: &str) -> Option<WorkerRole> {
        let mut inner = self.lock();
        let entry = inner.workers.get_mut(worker_id)?;
        entry.mark_refused();
        Some(entry.heartbeat.role)
    }

    /// A request's generation job on `worker_id` ended (or moved to another worker): it no
    /// longer counts against the worker, nor do its prompt's `blocks` (those sent since its
    /// last heartbeat; the next heartbeat counts what it really holds).
    pub(super) fn generation_ended(&self, worker_id: &str, blocks: u64) {
        if let Some(entry) = self.lock().workers.get_mut(worker_id) {
            entry.count_ended();
            entry.count_ended_blocks(blocks);
        }
    }

    /// Records that context worker `worker_id` answered a prefill job this api-server sent it
    /// (or that the job was given up): the job left its queue, which has room again.
    pub(super) fn prefill_answered(&self, worker_id: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.workers.get_mut(worker_id) {
            entry.count_answered();
        }
    }

    /// Chooses, by the policy, a live worker of `pool` not in `exclude` with room in its queue
    /// that serves `adapter` (a LoRA adapter's name; `None`: the base model), and counts the
    /// job against it.
    pub(super) fn pick(
        &self,
        inner: &mut Inner,
        pool: Pool,
        exclude: &[String],
        adapter: Option<&str>,
        now: Instant,
    ) -> Pick {
        self.pick_for(inner, pool, exclude, adapter, now, None)
    }

    /// The fingerprint under which live workers name the blocks of LoRA adapter `adapter`'s
    /// requests (their heartbeats' `lora_adapters`), if one lists it.
    pub(super) fn adapter_fingerprint(inner: &Inner, adapter: &str) -> Option<String> {
        inner.workers.values().find_map(|w| {
            w.heartbeat
                .lora_adapters
                .iter()
                .find(|a| a.name == adapter)
                .map(|a| a.fingerprint.clone())
        })
    }

    /// [`Self::pick`] for a job whose prompt is `prompt`: the `kv_aware` policy weighs what
    /// each candidate holds of it ([`kv_cost`]); the others ignore it.
    pub(super) fn pick_for(
        &self,
        inner: &mut Inner,
        pool: Pool,
        exclude: &[String],
        adapter: Option<&str>,
        now: Instant,
        mut prompt: Option<&mut PromptBlocks<'_>>,
    ) -> Pick {
        let timeout = self.settings.worker_timeout;
        let live: Vec<(&String, &WorkerEntry)> = inner
            .workers
            .iter()
            .filter(|(id, w)| {
                w.takes(pool)
                    && w.serves(adapter)
                    && now.saturating_duration_since(w.last_seen) <= timeout
                    && !exclude.contains(id)
            })
            .collect();
        let kv_aware = inner.policy.kind() == RouterPolicy::KvAware;
        let candidates: Vec<(&String, u64)> = live
            .iter()
            .filter(|(_, w)| !w.is_full())
            .map(|(id, w)| {
                let weight = match prompt.as_deref_mut() {
                    Some(prompt) if kv_aware => kv_cost(
                        &inner.prefix,
                        id,
                        w,
                        prompt,
                        self.settings.kv_overlap_weight,
                    ),
                    _ => w.load(),
                };
                (*id, weight)
            })
            .collect();
        if candidates.is_empty() {
            if live.is_empty() {
                return Pick::NoneLive;
            }
            if pool == Pool::Generate && exclude.is_empty() && inner.generation_full.refused(now) {
                let queues: Vec<String> = live
                    .iter()
                    .map(|(id, w)| format!("{id}: {}", w.queue_view()))
                    .collect();
                tracing::warn!(
                    workers = %queues.join("; "),
                    "every generation worker's queue is full: answering 429 (with \
                     Retry-After) until one has room"
                );
            }
            return Pick::AllFull;
        }
        if pool == Pool::Generate {
            inner.generation_full.taken(now);
        }
        let chosen = inner.policy.choose(pool, candidates);
        let sent_blocks = match (prompt, inner.prefix.info(&chosen).cloned()) {
            (Some(prompt), Some(info)) => {
                let names = prompt.names(&info).to_vec();
                let prompt_blocks = prompt.len().div_ceil(info.block_size.max(1) as usize) as u64;
                self.metrics.record(Event::Routed {
                    pool: pool.job_pool(),
                    cached_blocks: inner.prefix.overlap(&chosen, &names) as u64,
                    prompt_blocks,
                });
                inner.prefix.sent(&chosen, &names);
                prompt_blocks
            }
            _ => 0,
        };
        if let Some(entry) = inner.workers.get_mut(&chosen) {
            entry.count_assigned(1);
            entry.count_assigned_blocks(sent_blocks);
        }
        Pick::Chosen(chosen)
    }

    /// How the registry routes (an [`Inner`]'s policy).
    pub(super) fn policy_kind_of(inner: &Inner) -> RouterPolicy {
        inner.policy.kind()
    }

    /// The prompt tokens `worker_id` holds cached of `prompt`, as this api-server knows.
    pub(super) fn cached_tokens(
        &self,
        inner: &Inner,
        worker_id: &str,
        prompt: &mut PromptBlocks<'_>,
    ) -> usize {
        let Some(info) = inner.prefix.info(worker_id) else {
            return 0;
        };
        let block_size = info.block_size as usize;
        let held = inner.prefix.overlap(worker_id, prompt.names(info));
        held * block_size
    }

    /// A batch of a worker's KV events. Returns whether the worker's view needs a snapshot
    /// (the caller fetches it: [`Self::kv_snapshot`]).
    pub fn kv_events(&self, batch: KvEvents) -> bool {
        let worker_id = batch.worker_id.clone();
        let mut inner = self.lock();
        let resync = inner.prefix.events(batch);
        if resync {
            self.metrics.record(Event::PrefixResync {
                worker_id: &worker_id,
            });
        }
        resync
    }

    /// Reports where the view of `worker_id`'s prefix cache stands (and a snapshot asked
    /// for, `resync`) to the metrics.
    fn record_prefix_view(&self, inner: &Inner, worker_id: &str, resync: bool) {
        if resync {
            self.metrics.record(Event::PrefixResync { worker_id });
        }
        if let Some((source, lag_batches)) = inner.prefix.lag(worker_id) {
            self.metrics.record(Event::PrefixView {
                worker_id,
                synced: source == Source::Events,
                lag_batches,
            });
        }
    }

    /// A worker's snapshot, all its pages put together (`None`: it could not be had).
    pub fn kv_snapshot(&self, worker_id: &str, snapshot: Option<KvSnapshot>) {
        let mut inner = self.lock();
        match snapshot {
            Some(snapshot) => inner.prefix.snapshot(snapshot),
            None => inner.prefix.snapshot_failed(worker_id),
        }
        self.record_prefix_view(&inner, worker_id, false);
    }

    /// Whether `worker_id` has a recent heartbeat (a request it holds can still finish).
    pub fn is_live(&self, worker_id: &str, now: Instant) -> bool {
        self.lock().workers.get(worker_id).is_some_and(|w| {
            now.saturating_duration_since(w.last_seen) <= self.settings.worker_timeout
        })
    }

    /// Every live worker, by id, as `/health` shows it.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let inner = self.lock();
        let mut statuses: Vec<WorkerStatus> =
            inner.workers.iter().map(|(id, w)| w.status(id)).collect();
        statuses.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        statuses
    }

    pub fn live_counts(&self) -> LiveCounts {
        counts_of(&self.lock())
    }
}

/// Counts entries as they are (expiry runs on its own timer, every fraction of the timeout).
fn counts_of(inner: &Inner) -> LiveCounts {
    let mut counts = LiveCounts::default();
    for worker in inner.workers.values() {
        match worker.heartbeat.role {
            WorkerRole::Context => counts.context += 1,
            WorkerRole::Decode => counts.decode += 1,
            WorkerRole::Both => counts.both += 1,
        }
        if worker.takes(Pool::Generate) {
            counts.accepting_generate += 1;
        }
        if worker.takes(Pool::Context) {
            counts.accepting_prefill += 1;
        }
    }
    counts.cuda_ipc_unmapped = cuda_ipc_unmapped(inner.workers.iter().filter_map(|(id, w)| {
        let taking = w.takes(Pool::Context) || w.takes(Pool::Generate);
        let peer = w.heartbeat.kv_peer.as_ref().filter(|_| taking)?;
        Some((id.as_str(), w.heartbeat.role, peer))
    }));
    counts
}

/// [`LiveCounts::cuda_ipc_unmapped`] of the workers taking jobs (id, role, `kv_peer`).
fn cuda_ipc_unmapped<'a>(
    workers: impl Iterator<Item = (&'a str, WorkerRole, &'a KvPeer)> + Clone,
) -> u32 {
    let sharing = workers
        .clone()
        .filter(|(_, role, peer)| *role == WorkerRole::Context && !peer.cuda_ipc_cache.is_empty());
    let readers = workers.filter(|(_, role, peer)| *role == WorkerRole::Decode && peer.cuda_ipc);
    let mut unmapped = 0;
    for (_, _, reader) in readers {
        unmapped += sharing
            .clone()
            .filter(|(id, _, peer)| {
                peer.host_id == reader.host_id
                    && !reader.cuda_ipc_mapped.iter().any(|m| m.as_str() == *id)
            })
            .count() as u32;
    }
    unmapped
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{KvEvent, KvTransferStats, PrefixCacheInfo, WorkerRole};

    use super::*;
    use crate::router::NoRoute;
    use crate::router::testing::{heartbeat, prompt, registry, settings};

    #[test]
    fn the_metrics_say_where_each_prefix_view_stands_and_count_its_resyncs() {
        let now = Instant::now();
        let metrics = Metrics::new();
        let registry = WorkerRegistry::new(settings(RouterPolicy::KvAware, 0), metrics.clone());
        let beat = |seq| Heartbeat {
            numerics: None,
            prefix_cache: Some(PrefixCacheInfo {
                block_size: 16,
                namespace: "fp".into(),
                events_epoch: "e".into(),
                events_seq: seq,
                queried_tokens: 0,
                hit_tokens: 0,
                evicted_blocks: 0,
            }),
            ..heartbeat("w", WorkerRole::Both, 0, 0)
        };
        let has = |lines: &[&str]| {
            let text = metrics.render();
            for line in lines {
                assert!(text.contains(line), "{line} missing from\n{text}");
            }
        };
        // A router that starts after the worker published 3 batches asks for a snapshot.
        assert!(registry.observe(beat(3), now));
        has(&[
            "tandem_prefix_view_synced{worker_id=\"w\"} 0",
            "tandem_prefix_view_lag_batches{worker_id=\"w\"} 3",
            "tandem_prefix_view_resyncs_total{worker_id=\"w\"} 1",
        ]);
        registry.kv_snapshot(
            "w",
            Some(KvSnapshot {
                worker_id: "w".into(),
                epoch: "e".into(),
                seq: 3,
                blocks: vec![1, 2],
                next_offset: None,
            }),
        );
        has(&[
            "tandem_prefix_view_synced{worker_id=\"w\"} 1",
            "tandem_prefix_view_lag_batches{worker_id=\"w\"} 0",
        ]);
        // Batch 4 lost: batch 5 is a gap.
        let batch = KvEvents {
            worker_id: "w".into(),
            epoch: "e".into(),
            seq: 5,
            events: vec![KvEvent::Stored { blocks: vec![3] }],
        };
        assert!(registry.kv_events(batch));
        assert!(!registry.observe(beat(5), now));
        has(&[
            "tandem_prefix_view_synced{worker_id=\"w\"} 1",
            "tandem_prefix_view_lag_batches{worker_id=\"w\"} 2",
            "tandem_prefix_view_resyncs_total{worker_id=\"w\"} 2",
        ]);
    }

    #[test]
    fn pairs_of_one_host_count_until_the_decode_worker_maps_the_context_cache() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        let peer = |host: &str, cuda_ipc: bool| KvPeer {
            host_id: host.into(),
            cuda_ipc,
            coalesced_regions: true,
            cuda_ipc_ranks: true,
            cuda_ipc_cache: Vec::new(),
            cuda_ipc_mapped: Vec::new(),
        };
        let sharing = |id: &str, host: &str| {
            let mut hb = heartbeat(id, WorkerRole::Context, 0, 0);
            let mut kv_peer = peer(host, true);
            kv_peer.cuda_ipc_cache = vec![tandem_protocol::messages::CudaIpcSource {
                host_id: host.into(),
                device: "GPU-0".into(),
                mem_handle: format!("{id:0>128}"),
                alloc_bytes: 1 << 30,
                liveness_offset: Some(0),
            }];
            hb.kv_peer = Some(kv_peer);
            hb
        };
        let reader = |id: &str, host: &str, cuda_ipc: bool, mapped: &[&str]| {
            let mut hb = heartbeat(id, WorkerRole::Decode, 0, 0);
            let mut kv_peer = peer(host, cuda_ipc);
            kv_peer.cuda_ipc_mapped = mapped.iter().map(|m| m.to_string()).collect();
            hb.kv_peer = Some(kv_peer);
            hb
        };
        let unmapped = || registry.live_counts().cuda_ipc_unmapped;
        registry.observe(sharing("ctx-a", "h1"), now);
        registry.observe(sharing("ctx-b", "h1"), now);
        registry.observe(sharing("ctx-far", "h2"), now);
        assert_eq!(unmapped(), 0, "no reader yet");
        registry.observe(reader("dec-1", "h1", true, &[]), now);
        assert_eq!(
            unmapped(),
            2,
            "two caches of its host, the other host's not counted"
        );
        // A reader without CUDA IPC pulls over UCX: nothing to map.
        registry.observe(reader("dec-ucx", "h1", false, &[]), now);
        assert_eq!(unmapped(), 2);
        registry.observe(reader("dec-1", "h1", true, &["ctx-a"]), now);
        assert_eq!(unmapped(), 1);
        registry.observe(reader("dec-1", "h1", true, &["ctx-a", "ctx-b"]), now);
        assert_eq!(unmapped(), 0);
        // A second reader on the far host has one cache to map; a draining one none.
        registry.observe(reader("dec-2", "h2", true, &[]), now);
        assert_eq!(unmapped(), 1);
        let mut draining = reader("dec-2", "h2", true, &[]);
        draining.draining = true;
        registry.observe(draining, now);
        assert_eq!(unmapped(), 0);
    }

    #[test]
    fn no_worker_no_pick_and_context_workers_do_not_generate() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        assert_eq!(registry.pick_generate(now), None);
        registry.observe(heartbeat("c", WorkerRole::Context, 0, 0), now);
        assert_eq!(registry.pick_generate(now), None);
        assert_eq!(
            registry.route(&prompt(10), now),
            Err(NoRoute::NoLiveWorker),
            "a context worker alone serves nothing"
        );
        let mut draining = heartbeat("d", WorkerRole::Both, 0, 0);
        draining.draining = true;
        registry.observe(draining, now);
        assert_eq!(
            registry.pick_generate(now),
            None,
            "draining workers take nothing new"
        );
        let counts = registry.live_counts();
        assert_eq!((counts.both, counts.context), (1, 1));
        assert_eq!(counts.accepting_generate, 0);
        assert_eq!(counts.accepting_prefill, 1);
    }

    #[test]
    fn a_worker_whose_engine_stops_stepping_with_work_leaves_rotation_and_comes_back() {
        let start = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        let beat = |running: u32, steps: u64, at_ms: u64| {
            let mut hb = heartbeat("w", WorkerRole::Both, running, 0);
            hb.engine = Some(tandem_protocol::messages::EngineProgress {
                steps,
                ..Default::default()
            });
            registry.observe(hb, start + Duration::from_millis(at_ms));
        };
        // Idle for long: not stuck. Working and stepping: not stuck.
        beat(0, 5, 0);
        beat(0, 5, 10_000);
        beat(1, 6, 10_500);
        beat(1, 7, 11_000);
        let at = |ms| start + Duration::from_millis(ms);
        assert!(registry.pick_generate(at(11_000)).is_some());
        // Working, no step for more than 3 worker timeouts (1 s each): out of rotation.
        beat(1, 7, 12_000);
        beat(1, 7, 13_500);
        assert!(
            registry.pick_generate(at(13_500)).is_some(),
            "2.5 s: not yet"
        );
        beat(1, 7, 14_100);
        assert_eq!(registry.pick_generate(at(14_100)), None);
        assert!(registry.statuses()[0].stuck);
        assert_eq!(registry.live_counts().accepting_generate, 0);
        // A step again: back.
        beat(1, 8, 14_600);
        assert!(registry.pick_generate(at(14_600)).is_some());
        assert!(!registry.statuses()[0].stuck);
    }

    #[test]
    fn context_heartbeats_feed_the_transfer_metrics() {
        let start = Instant::now();
        let metrics = Metrics::new();
        let registry = WorkerRegistry::new(settings(RouterPolicy::LeastLoaded, 0), metrics.clone());
        let mut beat = heartbeat("ctx", WorkerRole::Context, 0, 0);
        beat.kv_transfer = Some(KvTransferStats {
            pinned_blocks: 3,
            pinned_tokens: 40,
            expirations: 2,
            releases: 5,
            unmatched_releases: 1,
        });
        registry.observe(beat.clone(), start);
        beat.kv_transfer = Some(KvTransferStats {
            pinned_blocks: 1,
            pinned_tokens: 16,
            expirations: 4,
            releases: 9,
            unmatched_releases: 3,
        });
        registry.observe(beat.clone(), start);
        let text = metrics.render();
        for line in [
            "tandem_kv_pinned_blocks{worker_id=\"ctx\"} 1",
            "tandem_kv_pinned_tokens{worker_id=\"ctx\"} 16",
            "tandem_kv_expirations_total{worker_id=\"ctx\"} 4",
            "tandem_kv_releases_total{worker_id=\"ctx\"} 9",
            "tandem_kv_unmatched_releases_total{worker_id=\"ctx\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // The same id restarted: its counts start over.
        beat.kv_transfer = Some(KvTransferStats {
            expirations: 1,
            ..KvTransferStats::default()
        });
        registry.observe(beat, start);
        assert!(
            metrics
                .render()
                .contains("tandem_kv_expirations_total{worker_id=\"ctx\"} 1")
        );
        registry.expire(start + Duration::from_millis(1500));
        let text = metrics.render();
        assert!(!text.contains("worker_id=\"ctx\""), "{text}");
    }

    #[test]
    fn silent_workers_expire() {
        let start = Instant::now();
        let metrics = Metrics::new();
        let registry = WorkerRegistry::new(settings(RouterPolicy::LeastLoaded, 0), metrics.clone());
        registry.observe(heartbeat("a", WorkerRole::Both, 0, 0), start);
        assert!(
            metrics
                .render()
                .contains("tandem_live_workers{role=\"both\"} 1")
        );
        let later = start + Duration::from_millis(1500);
        assert!(!registry.is_live("a", later));
        assert_eq!(
            registry.pick_generate(later),
            None,
            "a stale worker is not picked even before expiry"
        );
        assert_eq!(registry.expire(later), vec!["a".to_string()]);
        let text = metrics.render();
        assert!(
            text.contains("tandem_live_workers{role=\"both\"} 0"),
            "{text}"
        );
        assert!(!text.contains("worker_id=\"a\""), "{text}");
    }
}
