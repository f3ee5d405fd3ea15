//! The tickets of a request's jobs on its workers (a prefill job on a context worker, its
//! generation job), which count each job off its worker's load when the job leaves it.

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

/// A request's generation job as counted against its generation worker: one job, and the
/// KV blocks of its prompt (the `kv_aware` policy's load) since the worker's last heartbeat.
/// Dropping it, as the request ends, counts both off, so that requests that finished between
/// two heartbeats stop weighing on the worker and stop filling its queue in the registry's
/// count: without that a worker serving many short requests looked full to the router (429)
/// a heartbeat interval's worth of requests after its heartbeat, however idle it was.
pub struct GenerationJob {
    registry: Arc<WorkerRegistry>,
    worker_id: String,
    blocks: u64,
    /// Whether its end is counted off `worker_id`: not once the worker refused it (it never
    /// held it; [`WorkerRegistry::refused`] marks the worker full instead).
    armed: bool,
}

impl GenerationJob {
    /// The job counted against `worker_id` (with `blocks` of its prompt) when the request was
    /// routed.
    pub fn new(registry: Arc<WorkerRegistry>, worker_id: String, blocks: u64) -> Self {
        GenerationJob {
            registry,
            worker_id,
            blocks,
            armed: true,
        }
    }

    /// The worker it is counted against.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The worker refused the job: it never held it, so its end is not counted there.
    pub fn refused(&mut self) {
        self.armed = false;
    }

    /// The job was sent again to `worker_id`, which a pick just counted it against (a
    /// migration, a refused job sent on, a generation worker that left while the prompt was
    /// prefilled): the worker it leaves counts it off.
    pub fn moved_to(&mut self, worker_id: String) {
        self.count_off();
        self.worker_id = worker_id;
        self.blocks = 0;
        self.armed = true;
    }

    fn count_off(&mut self) {
        if self.armed {
            self.registry.generation_ended(&self.worker_id, self.blocks);
            self.armed = false;
        }
    }
}

impl Drop for GenerationJob {
    fn drop(&mut self) {
        self.count_off();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{Heartbeat, WorkerRole};

    use super::*;
    use crate::router::testing::{context_of, heartbeat, prompt, registry};
    use crate::router::{LocalPrefill, NoRoute, Prefill};

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
            registry.pick_context_excluding(&prompt(3000), &[], None, now),
            None
        );
        drop(jobs.remove(0));
        assert_eq!(
            registry
                .pick_context_excluding(&prompt(3000), &[], None, now)
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

    #[test]
    fn a_generation_worker_whose_requests_end_has_room_before_its_next_heartbeat() {
        let now = Instant::now();
        let registry = Arc::new(registry(RouterPolicy::LeastLoaded));
        // Runs 1 at most and queues 1; idle at its heartbeat.
        let bounded = |id| Heartbeat {
            numerics: None,
            max_queued: Some(1),
            max_running: Some(1),
            ..heartbeat(id, WorkerRole::Decode, 0, 0)
        };
        registry.observe(bounded("a"), now);
        let job = |registry: &Arc<WorkerRegistry>| {
            let route = registry.route(&prompt(5), now).unwrap();
            GenerationJob::new(
                Arc::clone(registry),
                route.generate_id,
                route.generate_blocks,
            )
        };
        // Many requests one after another, each ended before the next: never full.
        for _ in 0..50 {
            drop(job(&registry));
        }
        // One running and one queued: full until one ends.
        let mut held = vec![job(&registry), job(&registry)];
        assert_eq!(registry.route(&prompt(5), now), Err(NoRoute::AllFull));
        drop(held.pop());
        held.push(job(&registry));
        assert_eq!(registry.route(&prompt(5), now), Err(NoRoute::AllFull));

        // A job that moves counts off the worker it leaves and onto the one it goes to.
        registry.observe(bounded("b"), now);
        let mut moving = held.pop().unwrap();
        assert_eq!(moving.worker_id(), "a");
        let other = registry.pick_generate_other_than("a", None, now).unwrap();
        assert_eq!(other, "b");
        moving.moved_to(other);
        // A job `b` refuses counts nothing off it: full until its next heartbeat, even after
        // the job it holds ends.
        let mut refused = GenerationJob::new(
            Arc::clone(&registry),
            registry.pick_generate_other_than("a", None, now).unwrap(),
            0,
        );
        assert_eq!(registry.refused("b"), Some(WorkerRole::Decode));
        refused.refused();
        drop(refused);
        drop(moving);
        // `a` holds one: room for one more, then every worker is full.
        held.push(job(&registry));
        assert_eq!(held[1].worker_id(), "a");
        assert_eq!(registry.route(&prompt(5), now), Err(NoRoute::AllFull));
        // `a`'s jobs end: it takes jobs again, before any heartbeat.
        held.clear();
        assert_eq!(registry.route(&prompt(5), now).unwrap().generate_id, "a");
    }
}
