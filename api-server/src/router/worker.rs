//! One worker as the registry knows it: its last heartbeat, and the jobs this api-server sent
//! it since, from which its load and whether its queue is full follow.
//!
//! A heartbeat is a snapshot; between two of them the entry counts what this api-server did:
//! the jobs it sent ([`WorkerEntry::count_assigned`]), the jobs that left the worker since
//! (prefill jobs it answered, [`WorkerEntry::count_answered`] through
//! [`super::context_job::ContextJob`]; generation jobs that ended or moved elsewhere,
//! [`WorkerEntry::count_ended`] through [`super::context_job::GenerationJob`]) and a refused
//! job ([`WorkerEntry::mark_refused`]). The next heartbeat replaces the entry and the counts
//! start again from what it says. Without the jobs that left, a worker serving short requests
//! quickly would look full after a heartbeat interval's worth of them, idle as it may be.

use std::time::Instant;

use tandem_protocol::messages::{Heartbeat, WorkerRole};

use crate::metrics::JobPool;

/// The two kinds of jobs a worker can be chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pool {
    /// Generation jobs (`generate` subjects): `decode` and `both` workers.
    Generate = 0,
    /// Prefill jobs (`prefill` subjects): `context` workers.
    Context = 1,
}

impl Pool {
    /// The pool as the metrics label it.
    pub(super) fn job_pool(self) -> JobPool {
        match self {
            Pool::Generate => JobPool::Generation,
            Pool::Context => JobPool::Context,
        }
    }
}

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

pub(super) struct WorkerEntry {
    pub(super) heartbeat: Heartbeat,
    pub(super) last_seen: Instant,
    /// When the worker's engine last ran a step, or had nothing to do.
    pub(super) progressed_at: Instant,
    /// Its heartbeats say it has work, yet its engine has run no step for
    /// [`super::registry::STUCK_AFTER_TIMEOUTS`] worker timeouts: it takes nothing new.
    pub(super) stuck: bool,
    assigned_since_heartbeat: u32,
    /// Jobs this api-server sent it that left it since its last heartbeat: prefill jobs it
    /// answered (a KV handle, an error) or that were given up, generation jobs that ended or
    /// moved to another worker. Each freed a place, so the jobs counted against it are its
    /// heartbeat's plus those assigned since, less these ([`super::context_job`]).
    left_since_heartbeat: u32,
    /// KV blocks of the prompts sent to it since its last heartbeat (the `kv_aware` load).
    blocks_assigned_since_heartbeat: u64,
    /// It refused a job since its last heartbeat (its queue is full).
    refused_since_heartbeat: bool,
}

impl WorkerEntry {
    /// The entry of a fresh heartbeat, with nothing counted since.
    pub(super) fn new(
        heartbeat: Heartbeat,
        last_seen: Instant,
        progressed_at: Instant,
        stuck: bool,
    ) -> Self {
        WorkerEntry {
            heartbeat,
            last_seen,
            progressed_at,
            stuck,
            assigned_since_heartbeat: 0,
            blocks_assigned_since_heartbeat: 0,
            left_since_heartbeat: 0,
            refused_since_heartbeat: false,
        }
    }

    /// Counts `jobs` more sent to it.
    pub(super) fn count_assigned(&mut self, jobs: u32) {
        self.assigned_since_heartbeat += jobs;
    }

    /// Counts the KV blocks of the prompts sent to it since its last heartbeat.
    pub(super) fn count_assigned_blocks(&mut self, blocks: u64) {
        self.blocks_assigned_since_heartbeat += blocks;
    }

    /// Counts off the blocks of a request that ended.
    pub(super) fn count_ended_blocks(&mut self, blocks: u64) {
        self.blocks_assigned_since_heartbeat =
            self.blocks_assigned_since_heartbeat.saturating_sub(blocks);
    }

    /// The KV blocks its work holds as far as this api-server knows: those in use at its last
    /// heartbeat, and those of the prompts sent to it since.
    pub(super) fn active_blocks(&self) -> u64 {
        u64::from(
            self.heartbeat
                .total_kv_blocks
                .saturating_sub(self.heartbeat.free_kv_blocks),
        ) + self.blocks_assigned_since_heartbeat
    }

    /// Counts a prefill job it answered (or that was given up): the job left its queue, which
    /// has room again, and a context worker that refused a job takes jobs again.
    pub(super) fn count_answered(&mut self) {
        self.count_ended();
        self.refused_since_heartbeat = false;
    }

    /// Counts a generation job that ended on it (or moved to another worker): its place is
    /// free. A refusal still holds until the next heartbeat: the worker counts its queue its
    /// own way (jobs waiting for KV room, say), and one job's end says little about that.
    pub(super) fn count_ended(&mut self) {
        self.left_since_heartbeat += 1;
    }

    /// It refused a job: full until its next heartbeat (or, a context worker, its next
    /// answer).
    pub(super) fn mark_refused(&mut self) {
        self.refused_since_heartbeat = true;
    }

    /// The jobs it holds as far as this api-server knows: its last heartbeat's running and
    /// queued sequences, plus the jobs sent to it since, less those that left it since.
    pub(super) fn load(&self) -> u64 {
        (self.heartbeat.running as u64
            + self.heartbeat.queued as u64
            + self.assigned_since_heartbeat as u64)
            .saturating_sub(self.left_since_heartbeat as u64)
    }

    /// Whether its queue is full: it refused a job since its last heartbeat (and, a context
    /// worker, answered none since), or the jobs sent to it since then, beyond its free
    /// running slots and less those that left it since, fill its queue up to its bound.
    pub(super) fn is_full(&self) -> bool {
        let Some(max_queued) = self.heartbeat.max_queued else {
            return false;
        };
        let free_slots =
            self.heartbeat
                .max_running
                .map_or(0, |max| max.saturating_sub(self.heartbeat.running)) as i64;
        let sent_less_left =
            self.assigned_since_heartbeat as i64 - self.left_since_heartbeat as i64;
        let queued = self.heartbeat.queued as i64
            + if sent_less_left >= 0 {
                (sent_less_left - free_slots).max(0)
            } else {
                // Jobs that left free running slots, which its queue fills first.
                sent_less_left
            };
        self.refused_since_heartbeat || queued >= max_queued as i64
    }

    /// Its queue as this api-server counts it, for a log line: its last heartbeat's running
    /// and queued sequences and their bounds, the jobs sent to it and that left it since, and
    /// whether it refused one since.
    pub(super) fn queue_view(&self) -> String {
        let bound = |max: Option<u32>| max.map_or("unbounded".to_owned(), |m| m.to_string());
        format!(
            "running {} of {}, queued {} of {} at its heartbeat; {} sent and {} left since{}",
            self.heartbeat.running,
            bound(self.heartbeat.max_running),
            self.heartbeat.queued,
            bound(self.heartbeat.max_queued),
            self.assigned_since_heartbeat,
            self.left_since_heartbeat,
            if self.refused_since_heartbeat {
                "; refused a job since"
            } else {
                ""
            }
        )
    }

    /// Takes new jobs of `pool`.
    /// Whether the worker serves LoRA adapter `adapter` (any worker serves the base model,
    /// `None`).
    pub(super) fn serves(&self, adapter: Option<&str>) -> bool {
        adapter.is_none_or(|name| self.heartbeat.lora_adapters.iter().any(|a| a.name == name))
    }

    pub(super) fn takes(&self, pool: Pool) -> bool {
        let role_fits = match pool {
            Pool::Generate => matches!(self.heartbeat.role, WorkerRole::Both | WorkerRole::Decode),
            Pool::Context => self.heartbeat.role == WorkerRole::Context,
        };
        role_fits && !self.heartbeat.draining && !self.stuck
    }

    /// The worker `worker_id` (this entry) as `/health` shows it.
    pub(super) fn status(&self, worker_id: &str) -> WorkerStatus {
        WorkerStatus {
            worker_id: worker_id.to_owned(),
            role: self.heartbeat.role,
            draining: self.heartbeat.draining,
            running: self.heartbeat.running,
            queued: self.heartbeat.queued,
            engine_steps: self.heartbeat.engine.map(|e| e.steps),
            engine_failed_steps: self.heartbeat.engine.map(|e| e.failed_steps),
            stuck: self.stuck,
            max_queued: self.heartbeat.max_queued,
            full: self.is_full(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{Heartbeat, WorkerRole};

    use crate::router::NoRoute;
    use crate::router::testing::{self, heartbeat, prompt, registry};

    #[test]
    fn a_worker_with_a_full_queue_gets_no_job_until_a_heartbeat_says_it_has_room() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        // Runs 2 at most, 1 now; queues 2 at most.
        let bounded = |queued| Heartbeat {
            numerics: None,
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
        assert_eq!(registry.route(&prompt(5), now), Err(NoRoute::AllFull));
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
        let registry = testing::registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("old", WorkerRole::Both, 64, 900), now);
        assert!((0..100).all(|_| registry.pick_generate(now).is_some()));
        assert_eq!(registry.refused("nobody"), None);
    }
}
