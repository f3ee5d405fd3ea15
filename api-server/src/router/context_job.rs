//! The ticket of a prefill job on a context worker, which counts the job off the worker's
//! load when the job leaves its queue.

use std::sync::Arc;

use super::registry::WorkerRegistry;

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

/// The KV blocks of a request's prompt counted against its generation worker's load (the
/// `kv_aware` policy's) since the worker's last heartbeat: dropping it, as the request ends,
/// counts them off, so that requests that finished between two heartbeats stop weighing on
/// the worker.
pub struct GenerationBlocks {
    registry: Arc<WorkerRegistry>,
    worker_id: String,
    blocks: u64,
}

impl GenerationBlocks {
    pub fn new(registry: Arc<WorkerRegistry>, worker_id: String, blocks: u64) -> Self {
        GenerationBlocks {
            registry,
            worker_id,
            blocks,
        }
    }
}

impl Drop for GenerationBlocks {
    fn drop(&mut self) {
        if self.blocks > 0 {
            self.registry.generation_ended(&self.worker_id, self.blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{Heartbeat, WorkerRole};

    use super::*;
    use crate::router::testing::{context_of, heartbeat, prompt, registry};
    use crate::router::{LocalPrefill, Prefill};

    #[test]
    fn a_context_worker_answering_its_jobs_has_room_before_its_next_heartbeat() {
        let now = Instant::now();
        let registry = Arc::new(registry(RouterPolicy::LeastLoaded));
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        // Runs 2 prompts at most and queues 1; idle at its heartbeat.
        let context = Heartbeat {
            numerics: None,
            max_queued: Some(1),
            max_running: Some(2),
            ..heartbeat("ctx", WorkerRole::Context, 0, 0)
        };
        registry.observe(context, now);
        let mut jobs: Vec<ContextJob> = (0..3)
            .map(|_| {
                let id = context_of(&registry.route(&prompt(3000), now).unwrap())
                    .unwrap()
                    .to_owned();
                ContextJob::new(Arc::clone(&registry), id)
            })
            .collect();
        // Two running and one queued: the next prompt is prefilled locally.
        let route = registry.route(&prompt(3000), now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ContextFull));
        // One answered: room for one more, before any heartbeat.
        drop(jobs.remove(0));
        assert_eq!(
            context_of(&registry.route(&prompt(3000), now).unwrap()),
            Some("ctx")
        );
        jobs.push(ContextJob::new(Arc::clone(&registry), "ctx".to_owned()));
        assert_eq!(
            registry.route(&prompt(3000), now).unwrap().prefill,
            Prefill::Local(LocalPrefill::ContextFull)
        );
        // A refused job counts no answer: the worker stays full until it answers one.
        let refused = ContextJob::new(Arc::clone(&registry), "ctx".to_owned());
        assert_eq!(registry.refused("ctx"), Some(WorkerRole::Context));
        refused.refused();
        assert_eq!(
            registry.pick_context_excluding(&prompt(3000), &[], now),
            None
        );
        drop(jobs.remove(0));
        assert_eq!(
            registry
                .pick_context_excluding(&prompt(3000), &[], now)
                .as_deref(),
            Some("ctx")
        );
        // The heartbeat that saw the answered jobs leave starts the count afresh.
        registry.observe(
            Heartbeat {
                numerics: None,
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
}
