//! A worker that refuses a job: its queue is at its bound (`rejected`, docs/protocol.md). It
//! holds nothing of the job, so the same job (same request id and stream subject) goes to
//! another worker of its kind that has not refused it: a prefill job to another context worker,
//! a generation job (the first, a decode job after `kv_ready`, a fallback's or a migration's)
//! to another generation worker. When none is left, the request gets
//! [`ApiError::WorkersFull`]: for a prefill job that is a fallback to a local prefill
//! ([`super::fallback`]), for a generation job a 429 with `Retry-After` (an SSE error event if
//! the stream had started). The refusing worker takes no job from this api-server until its
//! next heartbeat ([`crate::router::WorkerRegistry::refused`]), or, a context worker, until
//! it answers one of this api-server's prefill jobs; each refusal is counted in
//! `tandem_jobs_rejected_total{pool}`.

use std::sync::Arc;
use std::time::Instant;

use tandem_protocol::messages::RejectReason;

use super::Generation;
use super::handover::Phase;
use crate::error::ApiError;
use crate::metrics::{Event, JobPool};
use crate::router::ContextJob;

impl Generation {
    /// Sends the job `worker_id` refused to another worker of its kind (the caller awaits its
    /// `accepted`); [`ApiError::WorkersFull`] when every other one has refused it or is full.
    pub(super) async fn reroute(
        &mut self,
        worker_id: String,
        reason: RejectReason,
    ) -> Result<(), ApiError> {
        let pool = if self.phase.is_prefill() {
            JobPool::Context
        } else {
            JobPool::Generation
        };
        self.metrics.record(Event::Rejected(pool));
        self.registry.refused(&worker_id);
        self.refused.push(worker_id.clone());
        let now = Instant::now();
        // It fitted when it was first published; a reconnect may have reached a server with a
        // smaller `max_payload`.
        let encode = |generation: &Generation| {
            generation
                .bus
                .encode_job(&generation.job)
                .map_err(|too_large| ApiError::JobTooLarge {
                    job: "refused job",
                    too_large,
                })
        };
        match self.phase.clone() {
            Phase::Prefill { generate_id, .. } => {
                let Some(other) = self.registry.pick_context_excluding(
                    &self.job.prompt_ids,
                    &self.refused,
                    self.job.lora.as_deref(),
                    now,
                ) else {
                    tracing::warn!(request_id = %self.request_id, refused_by = ?self.refused,
                        %reason, "every context worker refused the prefill job");
                    return Err(ApiError::WorkersFull { pool: "context" });
                };
                tracing::info!(request_id = %self.request_id, refused_by = %worker_id, to = %other,
                    %reason, "a context worker refused the prefill job: sending it to another");
                self.bus
                    .publish_job(
                        self.bus.subjects.prefill_direct(&other),
                        encode(self)?,
                        "publishing a refused prefill job",
                    )
                    .await?;
                if let Some(refused) = self.context_job.take() {
                    refused.refused();
                }
                self.context_job = Some(ContextJob::new(Arc::clone(&self.registry), other.clone()));
                self.phase = Phase::Prefill {
                    context_id: other,
                    generate_id,
                };
            }
            Phase::Generate { .. } => {
                // The refusing worker never held the job: its end is not counted there.
                self.generation_job.refused();
                let Some(other) = self.registry.pick_generate_excluding(
                    &self.refused,
                    self.job.lora.as_deref(),
                    now,
                ) else {
                    tracing::warn!(request_id = %self.request_id, refused_by = ?self.refused,
                        %reason, "every generation worker refused the job or is full");
                    return Err(ApiError::WorkersFull { pool: "generation" });
                };
                tracing::info!(request_id = %self.request_id, refused_by = %worker_id, to = %other,
                    %reason, "a generation worker refused the job: sending it to another");
                self.generation_job.moved_to(other.clone());
                let encoded = encode(self)?;
                self.publish_generate_job(other, encoded, "publishing a refused job")
                    .await?;
            }
        }
        Ok(())
    }
}
