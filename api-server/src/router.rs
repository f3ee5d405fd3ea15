//! The worker registry and the choice of workers for each request.
//!
//! Workers are discovered from their heartbeats (`tandem.{model}.heartbeat.{role}.{id}`), never
//! from a static list: a worker is live while its last heartbeat is younger than
//! `worker_timeout_ms`, and dropped after that. A job is published to the chosen worker's
//! direct subject, so the api-server knows who has it (for the `Accepted` timeout and metrics).
//!
//! Each request gets a [`Route`]: a generation worker (`decode` or `both`) always, and a context
//! worker for its prefill when disaggregation pays off ([`WorkerRegistry::route`]): at least
//! one live context worker and a prompt of at least `max_local_prefill_length` tokens. Both
//! pools are chosen with the same policy, each with its own round-robin cursor (one shared
//! cursor would advance twice per disaggregated request, and with two context workers always
//! land on the same one).
//!
//! The registry is a map behind a `std::sync::Mutex`: every critical section is a few map
//! operations over at most a few dozen workers and never spans an `.await`, which is cheaper
//! than a round trip to an owning task on the request path.
//!
//! Least-loaded counts, besides the running and queued sequences of the last heartbeat, the jobs
//! this api-server sent since that heartbeat: a burst of requests between two heartbeats is
//! spread over the workers instead of all going to the one that looked idle.
//!
//! A worker whose queue is full is skipped: its heartbeat says its bound (`max_queued`) and how
//! many sequences it runs at once (`max_running`), so the jobs sent since the heartbeat beyond
//! its free running slots count as queued (`WorkerEntry::is_full`); and a worker that refused
//! a job (`rejected`) is full until its next heartbeat. A context worker's prefill jobs are
//! also counted off as it answers them ([`ContextJob`]), so its count stays exact between
//! heartbeats and a refusal lasts until its next answer. When every generation worker is full a
//! request gets 429 ([`NoRoute::AllFull`]); when every context worker is, it is prefilled by
//! its generation worker ([`LocalPrefill::ContextFull`]).
//!
//! The registry reports what it sees to the metrics as events (each heartbeat, each worker that
//! left, the live counts per role); [`crate::metrics`] derives the series from them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_protocol::config::RouterPolicy;
use tandem_protocol::messages::{Heartbeat, KvPeer, WorkerRole};

use crate::metrics::{Event, Metrics};

/// How the registry routes.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    pub policy: RouterPolicy,
    /// A worker whose last heartbeat is older than this is gone.
    pub worker_timeout: Duration,
    /// Prompts with fewer tokens are prefilled by the generation worker itself (no transfer);
    /// 0 disaggregates every request a context worker can take.
    pub max_local_prefill_length: usize,
}

/// The two kinds of jobs a worker can be chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// Generation jobs (`generate` subjects): `decode` and `both` workers.
    Generate = 0,
    /// Prefill jobs (`prefill` subjects): `context` workers.
    Context = 1,
}

struct WorkerEntry {
    heartbeat: Heartbeat,
    last_seen: Instant,
    assigned_since_heartbeat: u32,
    /// Prefill jobs this api-server sent it that it has answered (a KV handle, an error) or
    /// that were given up since its last heartbeat: each left its queue, so the jobs counted
    /// against it are its heartbeat's plus those assigned since, less these
    /// ([`ContextJob`]).
    answered_since_heartbeat: u32,
    /// It refused a job since its last heartbeat (its queue is full).
    refused_since_heartbeat: bool,
    /// When the worker's engine last ran a step, or had nothing to do.
    progressed_at: Instant,
    /// Its heartbeats say it has work, yet its engine has run no step for
    /// [`STUCK_AFTER_TIMEOUTS`] worker timeouts: it takes nothing new.
    stuck: bool,
}

/// Worker timeouts without an engine step, while a worker has work, after which it is taken
/// out of rotation: its bus task heartbeats, but its engine answers nothing (its requests
/// migrate when their streams stall).
pub const STUCK_AFTER_TIMEOUTS: u32 = 3;

/// A worker as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub role: WorkerRole,
    pub draining: bool,
    pub running: u32,
    pub queued: u32,
    /// Forward passes run and failed since the worker started (absent from older workers).
    pub engine_steps: Option<u64>,
    pub engine_failed_steps: Option<u64>,
    pub stuck: bool,
    /// Its queue bound (absent: none), and whether it is full as far as this api-server
    /// knows (it takes no new job).
    pub max_queued: Option<u32>,
    pub full: bool,
}

impl WorkerEntry {
    /// The jobs it holds as far as this api-server knows: its last heartbeat's running and
    /// queued sequences, plus the jobs sent to it since, less those it answered since.
    fn load(&self) -> u64 {
        (self.heartbeat.running as u64
            + self.heartbeat.queued as u64
            + self.assigned_since_heartbeat as u64)
            .saturating_sub(self.answered_since_heartbeat as u64)
    }

    /// Whether its queue is full: it refused a job since its last heartbeat (and answered
    /// none since), or the jobs sent to it since then, beyond its free running slots and less
    /// those it answered since, fill its queue up to its bound.
    fn is_full(&self) -> bool {
        let Some(max_queued) = self.heartbeat.max_queued else {
            return false;
        };
        let free_slots =
            self.heartbeat
                .max_running
                .map_or(0, |max| max.saturating_sub(self.heartbeat.running)) as i64;
        let sent_less_answered =
            self.assigned_since_heartbeat as i64 - self.answered_since_heartbeat as i64;
        let queued = self.heartbeat.queued as i64
            + if sent_less_answered >= 0 {
                (sent_less_answered - free_slots).max(0)
            } else {
                // Answers free running slots, which its queue fills first.
                sent_less_answered
            };
        self.refused_since_heartbeat || queued >= max_queued as i64
    }

    /// Takes new jobs of `pool`.
    fn takes(&self, pool: Pool) -> bool {
        let role_fits = match pool {
            Pool::Generate => matches!(self.heartbeat.role, WorkerRole::Both | WorkerRole::Decode),
            Pool::Context => self.heartbeat.role == WorkerRole::Context,
        };
        role_fits && !self.heartbeat.draining && !self.stuck
    }
}

#[derive(Default)]
struct Inner {
    workers: HashMap<String, WorkerEntry>,
    /// Round-robin position per [`Pool`] (also breaks least-loaded ties).
    cursors: [usize; 2],
}

pub use crate::outcomes::LiveCounts;

/// Where a request's prompt is prefilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefill {
    /// On this context worker, which then hands the KV cache to the generation worker.
    Remote { context_id: String },
    /// By the generation worker itself.
    Local(LocalPrefill),
}

/// Why a request is prefilled by its generation worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPrefill {
    /// Shorter than `max_local_prefill_length`: a transfer would cost more than it saves.
    ShortPrompt,
    /// No live, non-draining context worker.
    NoContextWorker,
    /// Every live context worker's queue is full.
    ContextFull,
    /// A request with `n` > 1: its choices run on one generation worker, which prefills the
    /// prompt once for all of them ([`WorkerRegistry::route_samples`]).
    Samples,
    /// A request for its prompt's logprobs (`echo` with `logprobs`): they are computed where
    /// the prompt is prefilled, and a context worker's prefill hands over K/V, not logprobs
    /// ([`WorkerRegistry::route_local`]; docs/protocol.md, "Prompt logprobs").
    PromptLogprobs,
}

/// Why a request has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No live, non-draining worker takes generation jobs.
    NoLiveWorker,
    /// Every one that does has a full queue.
    AllFull,
}

/// The workers chosen for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The `decode` or `both` worker that generates the tokens.
    pub generate_id: String,
    pub generate_role: WorkerRole,
    /// How that worker reads K/V (its last heartbeat's), for the context worker's export.
    pub generate_kv_peer: Option<KvPeer>,
    pub prefill: Prefill,
}

pub struct WorkerRegistry {
    inner: Mutex<Inner>,
    settings: RouterSettings,
    metrics: Metrics,
}

impl WorkerRegistry {
    pub fn new(settings: RouterSettings, metrics: Metrics) -> Self {
        WorkerRegistry {
            inner: Mutex::new(Inner::default()),
            settings,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map (every update is a single
        // insert or remove), so the poison flag carries no information worth failing on.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a heartbeat.
    pub fn observe(&self, heartbeat: Heartbeat, now: Instant) {
        self.metrics.record(Event::Heartbeat(&heartbeat));
        let mut inner = self.lock();
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
            WorkerEntry {
                heartbeat,
                last_seen: now,
                assigned_since_heartbeat: 0,
                answered_since_heartbeat: 0,
                refused_since_heartbeat: false,
                progressed_at,
                stuck,
            },
        );
        self.metrics.record(Event::LiveWorkers(counts_of(&inner)));
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
        }
        gone
    }

    /// Chooses the workers of a request whose prompt has `prompt_tokens` tokens and counts
    /// the jobs against them; [`NoRoute`] when no live worker with room in its queue takes
    /// generation jobs.
    pub fn route(&self, prompt_tokens: usize, now: Instant) -> Result<Route, NoRoute> {
        let mut inner = self.lock();
        let generate_id = self.pick_generation(&mut inner, now)?;
        let generate_role = inner.workers[&generate_id].heartbeat.role;
        let generate_kv_peer = inner.workers[&generate_id].heartbeat.kv_peer.clone();
        let prefill = if prompt_tokens < self.settings.max_local_prefill_length {
            Prefill::Local(LocalPrefill::ShortPrompt)
        } else {
            match self.pick_excluding(&mut inner, Pool::Context, &[], now) {
                Pick::Chosen(context_id) => Prefill::Remote { context_id },
                Pick::AllFull => Prefill::Local(LocalPrefill::ContextFull),
                Pick::NoneLive => Prefill::Local(LocalPrefill::NoContextWorker),
            }
        };
        Ok(Route {
            generate_id,
            generate_role,
            generate_kv_peer,
            prefill,
        })
    }

    /// Chooses the generation worker of the `n` choices of one request (`n` > 1) and counts
    /// `n` jobs against it. The choices go to one worker so that they share the prompt's KV
    /// blocks there, and it prefills the prompt itself (no context worker): computed once
    /// for all choices, the prompt costs what one local prefill costs, where a context worker
    /// would add a transfer per choice (docs/protocol.md, "Requests with n > 1").
    pub fn route_samples(&self, n: u32, now: Instant) -> Result<Route, NoRoute> {
        self.route_local(n, LocalPrefill::Samples, now)
    }

    /// Chooses a generation worker for `n` jobs that it prefills itself (`why`: the choices
    /// of one request, or prompt logprobs) and counts them against it.
    pub fn route_local(&self, n: u32, why: LocalPrefill, now: Instant) -> Result<Route, NoRoute> {
        let mut inner = self.lock();
        let generate_id = self.pick_generation(&mut inner, now)?;
        let entry = inner
            .workers
            .get_mut(&generate_id)
            .expect("the chosen worker is known");
        entry.assigned_since_heartbeat += n.saturating_sub(1);
        Ok(Route {
            generate_id,
            generate_role: entry.heartbeat.role,
            generate_kv_peer: entry.heartbeat.kv_peer.clone(),
            prefill: Prefill::Local(why),
        })
    }

    /// Chooses a live worker with room for a generation job and counts the job against it;
    /// `None` when there is none.
    pub fn pick_generate(&self, now: Instant) -> Option<String> {
        self.pick_generate_excluding(&[], now)
    }

    /// [`Self::pick_generate`] among the workers other than `failed` (a request migrating
    /// off it: it may still heartbeat, e.g. when its engine failed the request).
    pub fn pick_generate_other_than(&self, failed: &str, now: Instant) -> Option<String> {
        self.pick_generate_excluding(&[failed.to_owned()], now)
    }

    /// [`Self::pick_generate`] among the workers not in `excluded` (those that refused the
    /// request's job).
    pub fn pick_generate_excluding(&self, excluded: &[String], now: Instant) -> Option<String> {
        let mut inner = self.lock();
        self.pick_excluding(&mut inner, Pool::Generate, excluded, now)
            .chosen()
    }

    /// A context worker not in `excluded` with room for a prefill job, counted against it.
    pub fn pick_context_excluding(&self, excluded: &[String], now: Instant) -> Option<String> {
        let mut inner = self.lock();
        self.pick_excluding(&mut inner, Pool::Context, excluded, now)
            .chosen()
    }

    /// Records that `worker_id` refused a job because its queue is full: it gets no job until
    /// its next heartbeat says how full it is.
    pub fn refused(&self, worker_id: &str) -> Option<WorkerRole> {
        let mut inner = self.lock();
        let entry = inner.workers.get_mut(worker_id)?;
        entry.refused_since_heartbeat = true;
        Some(entry.heartbeat.role)
    }

    /// Records that context worker `worker_id` answered a prefill job this api-server sent it
    /// (or that the job was given up): the job left its queue, which has room again.
    fn prefill_answered(&self, worker_id: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.workers.get_mut(worker_id) {
            entry.answered_since_heartbeat += 1;
            entry.refused_since_heartbeat = false;
        }
    }

    /// A request's generation worker (counted against it), or why there is none.
    fn pick_generation(&self, inner: &mut Inner, now: Instant) -> Result<String, NoRoute> {
        match self.pick_excluding(inner, Pool::Generate, &[], now) {
            Pick::Chosen(id) => Ok(id),
            Pick::AllFull => Err(NoRoute::AllFull),
            Pick::NoneLive => Err(NoRoute::NoLiveWorker),
        }
    }

    fn pick_excluding(
        &self,
        inner: &mut Inner,
        pool: Pool,
        exclude: &[String],
        now: Instant,
    ) -> Pick {
        let timeout = self.settings.worker_timeout;
        let live: Vec<(&String, &WorkerEntry)> = inner
            .workers
            .iter()
            .filter(|(id, w)| {
                w.takes(pool)
                    && now.saturating_duration_since(w.last_seen) <= timeout
                    && !exclude.contains(id)
            })
            .collect();
        let mut candidates: Vec<&String> = live
            .iter()
            .filter(|(_, w)| !w.is_full())
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return if live.is_empty() {
                Pick::NoneLive
            } else {
                Pick::AllFull
            };
        }
        // HashMap order is arbitrary; a stable order makes round-robin and ties fair.
        candidates.sort();
        let cursor = inner.cursors[pool as usize];
        let start = cursor % candidates.len();
        let rotated = candidates[start..].iter().chain(&candidates[..start]);
        let chosen = match self.settings.policy {
            RouterPolicy::RoundRobin => candidates[start].clone(),
            RouterPolicy::LeastLoaded => rotated
                .min_by_key(|id| inner.workers[id.as_str()].load())
                .map(|id| (*id).clone())
                .expect("candidates is not empty"),
        };
        inner.cursors[pool as usize] = cursor.wrapping_add(1);
        if let Some(entry) = inner.workers.get_mut(&chosen) {
            entry.assigned_since_heartbeat += 1;
        }
        Pick::Chosen(chosen)
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
        let mut statuses: Vec<WorkerStatus> = inner
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                worker_id: id.clone(),
                role: w.heartbeat.role,
                draining: w.heartbeat.draining,
                running: w.heartbeat.running,
                queued: w.heartbeat.queued,
                engine_steps: w.heartbeat.engine.map(|e| e.steps),
                engine_failed_steps: w.heartbeat.engine.map(|e| e.failed_steps),
                stuck: w.stuck,
                max_queued: w.heartbeat.max_queued,
                full: w.is_full(),
            })
            .collect();
        statuses.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        statuses
    }

    pub fn live_counts(&self) -> LiveCounts {
        counts_of(&self.lock())
    }
}

/// A prefill job sent to a context worker, until the worker answers it (a KV handle or an
/// error) or the request gives it up: dropping it tells the registry that the job left the
/// worker's queue. Between heartbeats this is what keeps the registry's count of a context
/// worker's jobs exact, so that a queue bound (`max_queued_requests`) sends prompts to a
/// local prefill only while the context worker's queue is really full, not while it merely
/// has had no heartbeat since its last answers.
pub struct ContextJob {
    registry: Arc<WorkerRegistry>,
    context_id: String,
    /// Whether dropping it counts an answer: not for a job the worker refused (it never
    /// held it; [`WorkerRegistry::refused`] marks the worker full instead).
    armed: bool,
}

impl ContextJob {
    /// The job just sent to `context_id`, which [`WorkerRegistry::route`] or
    /// [`WorkerRegistry::pick_context_excluding`] counted against it.
    pub fn new(registry: Arc<WorkerRegistry>, context_id: String) -> Self {
        ContextJob {
            registry,
            context_id,
            armed: true,
        }
    }

    /// The worker refused the job: it never held it, so no answer is counted.
    pub fn refused(mut self) {
        self.armed = false;
    }
}

impl Drop for ContextJob {
    fn drop(&mut self) {
        if self.armed {
            self.registry.prefill_answered(&self.context_id);
        }
    }
}

/// The outcome of choosing a worker of one pool.
enum Pick {
    Chosen(String),
    /// Live workers of the pool, each with a full queue.
    AllFull,
    /// No live worker of the pool (besides those excluded).
    NoneLive,
}

impl Pick {
    fn chosen(self) -> Option<String> {
        match self {
            Pick::Chosen(id) => Some(id),
            Pick::AllFull | Pick::NoneLive => None,
        }
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
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcomes::FallbackReason;
    use tandem_protocol::messages::KvTransferStats;

    fn heartbeat(id: &str, role: WorkerRole, running: u32, queued: u32) -> Heartbeat {
        Heartbeat {
            worker_id: id.into(),
            role,
            model: "m".into(),
            device: "cpu".into(),
            running,
            queued,
            free_kv_blocks: 10,
            total_kv_blocks: 20,
            draining: false,
            interval_ms: 500,
            kv_transfer: None,
            kv_peer: None,
            engine: Some(tandem_protocol::messages::EngineProgress::default()),
            max_queued: None,
            max_running: None,
            kv_pull: None,
        }
    }

    fn settings(policy: RouterPolicy, max_local_prefill_length: usize) -> RouterSettings {
        RouterSettings {
            policy,
            worker_timeout: Duration::from_millis(1000),
            max_local_prefill_length,
        }
    }

    fn registry(policy: RouterPolicy) -> WorkerRegistry {
        WorkerRegistry::new(settings(policy, 0), Metrics::new())
    }

    fn context_of(route: &Route) -> Option<&str> {
        match &route.prefill {
            Prefill::Remote { context_id } => Some(context_id),
            Prefill::Local(_) => None,
        }
    }

    #[test]
    fn no_worker_no_pick_and_context_workers_do_not_generate() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        assert_eq!(registry.pick_generate(now), None);
        registry.observe(heartbeat("c", WorkerRole::Context, 0, 0), now);
        assert_eq!(registry.pick_generate(now), None);
        assert_eq!(
            registry.route(10, now),
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
    fn least_loaded_spreads_a_burst_between_heartbeats() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("a", WorkerRole::Both, 3, 0), now);
        registry.observe(heartbeat("b", WorkerRole::Decode, 0, 0), now);
        let picks: Vec<String> = (0..5)
            .map(|_| registry.pick_generate(now).unwrap())
            .collect();
        // b gets three jobs to catch up with a's load, then they alternate.
        assert_eq!(picks.iter().filter(|p| *p == "b").count(), 4, "{picks:?}");
        assert_eq!(&picks[..3], ["b", "b", "b"]);
        // A fresh heartbeat replaces the local estimate.
        registry.observe(heartbeat("b", WorkerRole::Decode, 9, 0), now);
        assert_eq!(registry.pick_generate(now).unwrap(), "a");
    }

    #[test]
    fn a_migration_never_goes_back_to_the_worker_it_leaves() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("sick", WorkerRole::Both, 0, 0), now);
        assert_eq!(registry.pick_generate_other_than("sick", now), None);
        registry.observe(heartbeat("busy", WorkerRole::Decode, 9, 0), now);
        for _ in 0..3 {
            assert_eq!(
                registry.pick_generate_other_than("sick", now).as_deref(),
                Some("busy"),
                "the failed worker is skipped even when it is the least loaded"
            );
        }
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
    fn a_worker_with_a_full_queue_gets_no_job_until_a_heartbeat_says_it_has_room() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        // Runs 2 at most, 1 now; queues 2 at most.
        let bounded = |queued| Heartbeat {
            max_queued: Some(2),
            max_running: Some(2),
            ..heartbeat("w", WorkerRole::Decode, 1, queued)
        };
        registry.observe(bounded(0), now);
        // Its free slot, then two places in its queue; then it is full.
        for _ in 0..3 {
            assert_eq!(registry.pick_generate(now).as_deref(), Some("w"));
        }
        assert_eq!(registry.pick_generate(now), None);
        assert_eq!(registry.route(5, now), Err(NoRoute::AllFull));
        assert!(registry.statuses()[0].full);
        assert_eq!(registry.statuses()[0].max_queued, Some(2));
        // Its next heartbeat counts what it has: one queued, room for one more job.
        registry.observe(bounded(1), now);
        assert_eq!(registry.pick_generate(now).as_deref(), Some("w"));
        assert_eq!(registry.pick_generate(now).as_deref(), Some("w"));
        assert_eq!(registry.pick_generate(now), None);
        // A worker that refused a job is full until its next heartbeat, whatever it said.
        registry.observe(bounded(0), now);
        assert_eq!(registry.refused("w"), Some(WorkerRole::Decode));
        assert_eq!(registry.pick_generate(now), None);
        registry.observe(bounded(0), now);
        assert!(registry.pick_generate(now).is_some());
        // One without a bound (or older than the field) is never full.
        let registry = super::tests::registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("old", WorkerRole::Both, 64, 900), now);
        assert!((0..100).all(|_| registry.pick_generate(now).is_some()));
        assert_eq!(registry.refused("nobody"), None);
    }

    #[test]
    fn full_context_workers_mean_a_local_prefill_and_refusers_are_skipped() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        let full = Heartbeat {
            max_queued: Some(1),
            ..heartbeat("ctx-a", WorkerRole::Context, 0, 1)
        };
        registry.observe(full, now);
        let route = registry.route(5, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ContextFull));
        assert_eq!(
            FallbackReason::of_route(&route),
            Some(FallbackReason::ContextFull)
        );
        registry.observe(heartbeat("ctx-b", WorkerRole::Context, 0, 0), now);
        assert_eq!(context_of(&registry.route(5, now).unwrap()), Some("ctx-b"));
        // A job refused by ctx-b has nowhere else to go: ctx-a is full.
        assert_eq!(
            registry.pick_context_excluding(&["ctx-b".to_owned()], now),
            None
        );
        assert_eq!(
            registry.pick_generate_excluding(&["dec".to_owned()], now),
            None
        );
        assert_eq!(
            registry.pick_generate_excluding(&[], now).as_deref(),
            Some("dec")
        );
    }

    #[test]
    fn a_context_worker_answering_its_jobs_has_room_before_its_next_heartbeat() {
        let now = Instant::now();
        let registry = Arc::new(registry(RouterPolicy::LeastLoaded));
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        // Runs 2 prompts at most and queues 1; idle at its heartbeat.
        let context = Heartbeat {
            max_queued: Some(1),
            max_running: Some(2),
            ..heartbeat("ctx", WorkerRole::Context, 0, 0)
        };
        registry.observe(context, now);
        let mut jobs: Vec<ContextJob> = (0..3)
            .map(|_| {
                let id = context_of(&registry.route(3000, now).unwrap())
                    .unwrap()
                    .to_owned();
                ContextJob::new(Arc::clone(&registry), id)
            })
            .collect();
        // Two running and one queued: the next prompt is prefilled locally.
        let route = registry.route(3000, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ContextFull));
        // One answered: room for one more, before any heartbeat.
        drop(jobs.remove(0));
        assert_eq!(context_of(&registry.route(3000, now).unwrap()), Some("ctx"));
        jobs.push(ContextJob::new(Arc::clone(&registry), "ctx".to_owned()));
        assert_eq!(
            registry.route(3000, now).unwrap().prefill,
            Prefill::Local(LocalPrefill::ContextFull)
        );
        // A refused job counts no answer: the worker stays full until it answers one.
        let refused = ContextJob::new(Arc::clone(&registry), "ctx".to_owned());
        assert_eq!(registry.refused("ctx"), Some(WorkerRole::Context));
        refused.refused();
        assert_eq!(registry.pick_context_excluding(&[], now), None);
        drop(jobs.remove(0));
        assert_eq!(
            registry.pick_context_excluding(&[], now).as_deref(),
            Some("ctx")
        );
        // The heartbeat that saw the answered jobs leave starts the count afresh.
        registry.observe(
            Heartbeat {
                max_queued: Some(1),
                max_running: Some(2),
                ..heartbeat("ctx", WorkerRole::Context, 2, 1)
            },
            now,
        );
        drop(jobs);
        assert_eq!(registry.statuses()[0].worker_id, "ctx");
        assert!(!registry.statuses()[0].full);
    }

    #[test]
    fn round_robin_cycles() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        for id in ["x", "y", "z"] {
            registry.observe(heartbeat(id, WorkerRole::Both, 0, 0), now);
        }
        let picks: Vec<String> = (0..6)
            .map(|_| registry.pick_generate(now).unwrap())
            .collect();
        assert_eq!(picks, ["x", "y", "z", "x", "y", "z"]);
    }

    #[test]
    fn disaggregated_routes_pick_both_pools_each_in_turn() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        for id in ["ctx-a", "ctx-b"] {
            registry.observe(heartbeat(id, WorkerRole::Context, 0, 0), now);
        }
        let routes: Vec<Route> = (0..4).map(|_| registry.route(5, now).unwrap()).collect();
        let contexts: Vec<&str> = routes.iter().filter_map(context_of).collect();
        assert_eq!(contexts, ["ctx-a", "ctx-b", "ctx-a", "ctx-b"]);
        assert!(routes.iter().all(|r| r.generate_id == "dec"));
        assert!(routes.iter().all(|r| FallbackReason::of_route(r).is_none()));
    }

    #[test]
    fn a_route_carries_how_its_generation_worker_reads_kv() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        let peer = KvPeer {
            host_id: "boot-1".into(),
            cuda_ipc: true,
            coalesced_regions: true,
            cuda_ipc_ranks: true,
        };
        registry.observe(
            Heartbeat {
                kv_peer: Some(peer.clone()),
                ..heartbeat("dec", WorkerRole::Decode, 0, 0)
            },
            now,
        );
        registry.observe(heartbeat("ctx", WorkerRole::Context, 0, 0), now);
        let route = registry.route(5, now).unwrap();
        assert_eq!(context_of(&route), Some("ctx"));
        assert_eq!(route.generate_kv_peer, Some(peer));
        // A later heartbeat that withdraws CUDA IPC (its reads failed) is what routes see.
        registry.observe(
            Heartbeat {
                kv_peer: Some(KvPeer {
                    host_id: "boot-1".into(),
                    cuda_ipc: false,
                    coalesced_regions: true,
                    cuda_ipc_ranks: false,
                }),
                ..heartbeat("dec", WorkerRole::Decode, 0, 0)
            },
            now,
        );
        let route = registry.route(5, now).unwrap();
        assert_eq!(route.generate_kv_peer.map(|p| p.cuda_ipc), Some(false));
    }

    #[test]
    fn least_loaded_context_workers_follow_their_load() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        registry.observe(heartbeat("busy", WorkerRole::Context, 2, 1), now);
        registry.observe(heartbeat("idle", WorkerRole::Context, 0, 0), now);
        let contexts: Vec<String> = (0..4)
            .map(|_| {
                context_of(&registry.route(5, now).unwrap())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        // idle catches up with busy's load of 3, then they alternate.
        assert_eq!(&contexts[..3], ["idle", "idle", "idle"], "{contexts:?}");
        let mut draining = heartbeat("idle", WorkerRole::Context, 0, 0);
        draining.draining = true;
        registry.observe(draining, now);
        assert_eq!(context_of(&registry.route(5, now).unwrap()), Some("busy"));
    }

    #[test]
    fn short_prompts_and_missing_context_workers_prefill_locally() {
        let now = Instant::now();
        let registry = WorkerRegistry::new(settings(RouterPolicy::LeastLoaded, 8), Metrics::new());
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        let route = registry.route(100, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::NoContextWorker));
        assert_eq!(
            FallbackReason::of_route(&route),
            Some(FallbackReason::NoContextWorker)
        );
        registry.observe(heartbeat("ctx", WorkerRole::Context, 0, 0), now);
        let route = registry.route(7, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ShortPrompt));
        assert_eq!(FallbackReason::of_route(&route), None);
        assert_eq!(context_of(&registry.route(8, now).unwrap()), Some("ctx"));
        // A stale context worker is not picked, even before expiry.
        let later = now + Duration::from_millis(1500);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), later);
        assert_eq!(
            registry.route(100, later).unwrap().prefill,
            Prefill::Local(LocalPrefill::NoContextWorker)
        );
    }

    #[test]
    fn aggregated_workers_prefilling_locally_is_no_fallback() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("agg", WorkerRole::Both, 0, 0), now);
        let route = registry.route(100, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::NoContextWorker));
        assert_eq!(FallbackReason::of_route(&route), None);
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
