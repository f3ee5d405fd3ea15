//! Which of a pool's candidates gets a job, by the configured [`RouterPolicy`]: the next in
//! turn (round robin), or the one with the fewest jobs (least loaded), ties going to the next
//! in turn.
//!
//! Each pool keeps its own round-robin cursor: one shared cursor would advance twice per
//! disaggregated request, and with two context workers always land on the same one. The
//! policy sees only the candidates the registry offers (live, taking jobs of the pool, with
//! room in their queues) and their loads; a policy that needs the request itself (the
//! prompt's token ids, for KV-aware routing) gets them from [`super::route`], which has them.

use tandem_protocol::config::RouterPolicy;

use super::worker::Pool;

/// The configured policy and its round-robin position per [`Pool`].
pub(super) struct Policy {
    kind: RouterPolicy,
    cursors: [usize; 2],
}

impl Policy {
    pub(super) fn new(kind: RouterPolicy) -> Self {
        Policy {
            kind,
            cursors: [0; 2],
        }
    }

    pub(super) fn kind(&self) -> RouterPolicy {
        self.kind
    }

    /// Chooses one of `candidates` (worker ids with their loads, at least one) for a job of
    /// `pool`, and moves the pool's cursor on.
    pub(super) fn choose(&mut self, pool: Pool, mut candidates: Vec<(&String, u64)>) -> String {
        // HashMap order is arbitrary; a stable order makes round-robin and ties fair.
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        let cursor = &mut self.cursors[pool as usize];
        let start = *cursor % candidates.len();
        let chosen = match self.kind {
            RouterPolicy::RoundRobin => candidates[start].0,
            // Loads for least loaded, costs in KV blocks for KV-aware: the lowest wins, ties
            // going to the next in turn (deterministic for one router; routers' cursors
            // differ, so several routers do not all pick the same worker on a tie).
            RouterPolicy::LeastLoaded | RouterPolicy::KvAware => candidates[start..]
                .iter()
                .chain(&candidates[..start])
                .min_by_key(|(_, load)| *load)
                .map(|(id, _)| *id)
                .expect("candidates is not empty"),
        };
        *cursor = cursor.wrapping_add(1);
        chosen.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::WorkerRole;

    use crate::router::testing::{context_of, heartbeat, prompt, registry};

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
    fn least_loaded_context_workers_follow_their_load() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        registry.observe(heartbeat("busy", WorkerRole::Context, 2, 1), now);
        registry.observe(heartbeat("idle", WorkerRole::Context, 0, 0), now);
        let contexts: Vec<String> = (0..4)
            .map(|_| {
                context_of(&registry.route(&prompt(5), now).unwrap())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        // idle catches up with busy's load of 3, then they alternate.
        assert_eq!(&contexts[..3], ["idle", "idle", "idle"], "{contexts:?}");
        let mut draining = heartbeat("idle", WorkerRole::Context, 0, 0);
        draining.draining = true;
        registry.observe(draining, now);
        assert_eq!(
            context_of(&registry.route(&prompt(5), now).unwrap()),
            Some("busy")
        );
    }
}
