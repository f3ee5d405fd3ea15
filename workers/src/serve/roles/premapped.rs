//! Which context workers' shared KV caches a decode worker has mapped (CUDA IPC), for its
//! heartbeat's `kv_peer.cuda_ipc_mapped`.
//!
//! A decode worker maps a context worker's cache when it hears of it (its heartbeat's
//! `kv_peer.cuda_ipc_cache`), so that no hand-over waits for the mapping. The api-server
//! counts the pairs still unmapped, and the launcher waits for none before it reports the
//! deployment ready: the first request then pays no mapping either. So a worker is listed
//! only once the cache its *latest* heartbeat describes is mapped: a context worker that
//! restarted under the same id shares a new cache (other handles), and is unlisted until
//! that one is mapped too. A worker not heard of for [`FORGET_AFTER`] is dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_protocol::messages::CudaIpcSource;

/// A context worker not heard of for this long has stopped (heartbeats come every second or
/// so; the api-server drops a worker after a few missed): it is no longer listed.
pub const FORGET_AFTER: Duration = Duration::from_secs(30);

/// The caches a decode worker has heard of, and which of them it has mapped.
#[derive(Debug, Default)]
pub struct PremappedCaches {
    by_worker: HashMap<String, Heard>,
}

#[derive(Debug)]
struct Heard {
    /// The cache's allocations as its latest heartbeat names them (their IPC handles).
    handles: Vec<String>,
    /// Whether exactly those allocations are mapped.
    state: Mapping,
    last_heard: Instant,
}

/// Where the mapping of a heard-of cache stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Pending,
    Mapped,
    Failed,
}

/// What identifies a shared cache: its allocations' IPC handles, in rank order.
pub fn cache_key(sources: &[CudaIpcSource]) -> Vec<String> {
    sources.iter().map(|s| s.mem_handle.clone()).collect()
}

impl PremappedCaches {
    /// A heartbeat of `worker_id` named the cache `handles`: a cache other than the one
    /// mapped (the worker restarted) is unlisted until [`Self::mapped`] says it is mapped.
    pub fn heard(&mut self, worker_id: &str, handles: Vec<String>, now: Instant) {
        self.by_worker
            .retain(|_, heard| now.saturating_duration_since(heard.last_heard) < FORGET_AFTER);
        match self.by_worker.get_mut(worker_id) {
            Some(heard) => {
                if heard.handles != handles {
                    heard.handles = handles;
                    heard.state = Mapping::Pending;
                }
                heard.last_heard = now;
            }
            None => {
                self.by_worker.insert(
                    worker_id.to_owned(),
                    Heard {
                        handles,
                        state: Mapping::Pending,
                        last_heard: now,
                    },
                );
            }
        }
    }

    /// The cache `handles` of `worker_id` is mapped (or its mapping failed: `ok` false).
    /// True when that changes what was known of the cache (the first failure is worth a
    /// warning, the next ones each heartbeat are not). A result for a cache its latest
    /// heartbeat no longer names changes nothing.
    pub fn mapped(&mut self, worker_id: &str, handles: &[String], ok: bool) -> bool {
        let state = if ok { Mapping::Mapped } else { Mapping::Failed };
        match self.by_worker.get_mut(worker_id) {
            Some(heard) if heard.handles == handles && heard.state != state => {
                heard.state = state;
                true
            }
            _ => false,
        }
    }

    /// The context workers heard of within [`FORGET_AFTER`] whose latest cache is mapped,
    /// sorted.
    pub fn mapped_workers(&self, now: Instant) -> Vec<String> {
        let mut ids: Vec<String> = self
            .by_worker
            .iter()
            .filter(|(_, heard)| {
                heard.state == Mapping::Mapped
                    && now.saturating_duration_since(heard.last_heard) < FORGET_AFTER
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handles(tag: &str) -> Vec<String> {
        vec![format!("{tag}0"), format!("{tag}1")]
    }

    #[test]
    fn a_worker_is_listed_once_its_latest_cache_is_mapped() {
        let start = Instant::now();
        let mut caches = PremappedCaches::default();
        caches.heard("ctx-b", handles("b"), start);
        caches.heard("ctx-a", handles("a"), start);
        assert!(caches.mapped_workers(start).is_empty());
        caches.mapped("ctx-a", &handles("a"), true);
        caches.mapped("ctx-b", &handles("b"), true);
        assert_eq!(caches.mapped_workers(start), ["ctx-a", "ctx-b"]);
        // Later heartbeats naming the same cache keep it listed.
        caches.heard("ctx-a", handles("a"), start + Duration::from_secs(1));
        assert_eq!(caches.mapped_workers(start), ["ctx-a", "ctx-b"]);
    }

    #[test]
    fn a_restarted_worker_is_unlisted_until_its_new_cache_is_mapped() {
        let start = Instant::now();
        let mut caches = PremappedCaches::default();
        caches.heard("ctx", handles("old"), start);
        caches.mapped("ctx", &handles("old"), true);
        caches.heard("ctx", handles("new"), start);
        assert!(caches.mapped_workers(start).is_empty());
        // A late result for the old cache changes nothing.
        caches.mapped("ctx", &handles("old"), true);
        assert!(caches.mapped_workers(start).is_empty());
        caches.mapped("ctx", &handles("new"), true);
        assert_eq!(caches.mapped_workers(start), ["ctx"]);
    }

    #[test]
    fn a_failed_mapping_and_a_silent_worker_are_not_listed() {
        let start = Instant::now();
        let mut caches = PremappedCaches::default();
        caches.heard("failed", handles("f"), start);
        assert!(caches.mapped("failed", &handles("f"), false));
        // The same failure again says nothing new.
        assert!(!caches.mapped("failed", &handles("f"), false));
        caches.heard("silent", handles("s"), start);
        caches.mapped("silent", &handles("s"), true);
        assert_eq!(caches.mapped_workers(start), ["silent"]);
        let later = start + FORGET_AFTER;
        assert!(caches.mapped_workers(later).is_empty());
        // And it is dropped at the next heartbeat of anyone.
        caches.heard("other", handles("o"), later);
        assert_eq!(caches.by_worker.len(), 1);
    }
}
