//! The worker registry and the choice of a worker for each request.
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
//! Least-loaded counts, besides the running and queued sequences of the last heartbeat, the jobs
//! this api-server sent since that heartbeat: a burst of requests between two heartbeats is
//! spread over the workers instead of all going to the one that looked idle.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_protocol::config::RouterPolicy;
use tandem_protocol::messages::{Heartbeat, WorkerRole};

use crate::metrics::Metrics;

struct WorkerEntry {
    heartbeat: Heartbeat,
    last_seen: Instant,
    assigned_since_heartbeat: u32,
}

impl WorkerEntry {
    fn load(&self) -> u64 {
        self.heartbeat.running as u64
            + self.heartbeat.queued as u64
            + self.assigned_since_heartbeat as u64
    }

    /// Takes generation jobs (the `generate` subjects).
    fn generates(&self) -> bool {
        matches!(self.heartbeat.role, WorkerRole::Both | WorkerRole::Decode)
            && !self.heartbeat.draining
    }
}

#[derive(Default)]
struct Inner {
    workers: HashMap<String, WorkerEntry>,
    /// Round-robin position (also breaks least-loaded ties).
    cursor: usize,
}

/// Live workers per role, for /health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveCounts {
    pub context: u32,
    pub decode: u32,
    pub both: u32,
    /// Live, not draining, and taking generation jobs.
    pub accepting_generate: u32,
}

pub struct WorkerRegistry {
    inner: Mutex<Inner>,
    policy: RouterPolicy,
    worker_timeout: Duration,
    metrics: Metrics,
}

impl WorkerRegistry {
    pub fn new(policy: RouterPolicy, worker_timeout: Duration, metrics: Metrics) -> Self {
        WorkerRegistry {
            inner: Mutex::new(Inner::default()),
            policy,
            worker_timeout,
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
        let labels = [heartbeat.worker_id.as_str(), heartbeat.role.as_str()];
        self.metrics
            .worker_queue_depth
            .with_label_values(&labels)
            .set(heartbeat.queued as i64);
        self.metrics
            .worker_running
            .with_label_values(&labels)
            .set(heartbeat.running as i64);
        self.metrics
            .worker_free_kv_blocks
            .with_label_values(&labels)
            .set(heartbeat.free_kv_blocks as i64);
        self.metrics
            .worker_total_kv_blocks
            .with_label_values(&labels)
            .set(heartbeat.total_kv_blocks as i64);
        let mut inner = self.lock();
        if !inner.workers.contains_key(&heartbeat.worker_id) {
            tracing::info!(worker_id = %heartbeat.worker_id, role = heartbeat.role.as_str(),
                device = %heartbeat.device, "worker joined");
        }
        inner.workers.insert(
            heartbeat.worker_id.clone(),
            WorkerEntry {
                heartbeat,
                last_seen: now,
                assigned_since_heartbeat: 0,
            },
        );
        self.update_live_gauges(&inner);
    }

    /// Drops workers whose heartbeat is older than the timeout; returns their ids.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut inner = self.lock();
        let timeout = self.worker_timeout;
        let gone: Vec<String> = inner
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(entry) = inner.workers.remove(id) {
                tracing::warn!(worker_id = %id, "worker left (no heartbeat within {} ms)", timeout.as_millis());
                let labels = [id.as_str(), entry.heartbeat.role.as_str()];
                for gauge in [
                    &self.metrics.worker_queue_depth,
                    &self.metrics.worker_running,
                    &self.metrics.worker_free_kv_blocks,
                    &self.metrics.worker_total_kv_blocks,
                ] {
                    // Absent label sets are fine: the worker may never have reported them.
                    let _ = gauge.remove_label_values(&labels);
                }
            }
        }
        if !gone.is_empty() {
            self.update_live_gauges(&inner);
        }
        gone
    }

    fn update_live_gauges(&self, inner: &Inner) {
        let counts = counts_of(inner);
        self.metrics
            .live_workers
            .with_label_values(&["context"])
            .set(counts.context as i64);
        self.metrics
            .live_workers
            .with_label_values(&["decode"])
            .set(counts.decode as i64);
        self.metrics
            .live_workers
            .with_label_values(&["both"])
            .set(counts.both as i64);
    }

    /// Chooses a live worker for a generation job and counts the job against it; `None` when
    /// no live worker takes generation jobs.
    pub fn pick(&self, now: Instant) -> Option<String> {
        let mut inner = self.lock();
        let timeout = self.worker_timeout;
        let mut candidates: Vec<&String> = inner
            .workers
            .iter()
            .filter(|(_, w)| w.generates() && now.saturating_duration_since(w.last_seen) <= timeout)
            .map(|(id, _)| id)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        // HashMap order is arbitrary; a stable order makes round-robin and ties fair.
        candidates.sort();
        let start = inner.cursor % candidates.len();
        let rotated = candidates[start..].iter().chain(&candidates[..start]);
        let chosen = match self.policy {
            RouterPolicy::RoundRobin => candidates[start].clone(),
            RouterPolicy::LeastLoaded => rotated
                .min_by_key(|id| inner.workers[id.as_str()].load())
                .map(|id| (*id).clone())
                .expect("candidates is not empty"),
        };
        inner.cursor = inner.cursor.wrapping_add(1);
        if let Some(entry) = inner.workers.get_mut(&chosen) {
            entry.assigned_since_heartbeat += 1;
        }
        Some(chosen)
    }

    /// Whether `worker_id` has a recent heartbeat (a request it holds can still finish).
    pub fn is_live(&self, worker_id: &str, now: Instant) -> bool {
        self.lock()
            .workers
            .get(worker_id)
            .is_some_and(|w| now.saturating_duration_since(w.last_seen) <= self.worker_timeout)
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
        if worker.generates() {
            counts.accepting_generate += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn registry(policy: RouterPolicy) -> WorkerRegistry {
        WorkerRegistry::new(policy, Duration::from_millis(1000), Metrics::new())
    }

    #[test]
    fn no_worker_no_pick_and_context_workers_do_not_generate() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        assert_eq!(registry.pick(now), None);
        registry.observe(heartbeat("c", WorkerRole::Context, 0, 0), now);
        assert_eq!(registry.pick(now), None);
        let mut draining = heartbeat("d", WorkerRole::Both, 0, 0);
        draining.draining = true;
        registry.observe(draining, now);
        assert_eq!(
            registry.pick(now),
            None,
            "draining workers take nothing new"
        );
        assert_eq!(registry.live_counts().both, 1);
        assert_eq!(registry.live_counts().accepting_generate, 0);
    }

    #[test]
    fn least_loaded_spreads_a_burst_between_heartbeats() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("a", WorkerRole::Both, 3, 0), now);
        registry.observe(heartbeat("b", WorkerRole::Decode, 0, 0), now);
        let picks: Vec<String> = (0..5).map(|_| registry.pick(now).unwrap()).collect();
        // b gets three jobs to catch up with a's load, then they alternate.
        assert_eq!(picks.iter().filter(|p| *p == "b").count(), 4, "{picks:?}");
        assert_eq!(&picks[..3], ["b", "b", "b"]);
        // A fresh heartbeat replaces the local estimate.
        registry.observe(heartbeat("b", WorkerRole::Decode, 9, 0), now);
        assert_eq!(registry.pick(now).unwrap(), "a");
    }

    #[test]
    fn round_robin_cycles() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        for id in ["x", "y", "z"] {
            registry.observe(heartbeat(id, WorkerRole::Both, 0, 0), now);
        }
        let picks: Vec<String> = (0..6).map(|_| registry.pick(now).unwrap()).collect();
        assert_eq!(picks, ["x", "y", "z", "x", "y", "z"]);
    }

    #[test]
    fn silent_workers_expire() {
        let start = Instant::now();
        let metrics = Metrics::new();
        let registry = WorkerRegistry::new(
            RouterPolicy::LeastLoaded,
            Duration::from_millis(1000),
            metrics.clone(),
        );
        registry.observe(heartbeat("a", WorkerRole::Both, 0, 0), start);
        assert!(
            metrics
                .render()
                .contains("tandem_live_workers{role=\"both\"} 1")
        );
        let later = start + Duration::from_millis(1500);
        assert!(!registry.is_live("a", later));
        assert_eq!(
            registry.pick(later),
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
