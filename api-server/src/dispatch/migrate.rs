//! Request migration: when the worker generating a request fails it mid-stream (its
//! heartbeats stop, it answers with an error, it drops the request while draining, the stream
//! stalls or loses tokens), the request moves to another generation worker and the client's
//! stream goes on as if nothing happened.
//!
//! The new job is the request's own (prompt, sampling, stop) plus `resume_ids`: every token the
//! client has received. The new worker prefills prompt and resumed tokens, replays them through
//! its detokenizer and stop matcher without emitting them, and continues with token
//! `resume_ids.len()`, numbering its `tokens` messages from there. So the client sees no gap
//! and no repeat; greedy output is the undisturbed run's; a seeded request draws from the same
//! random stream (a draw depends on seed and position only); usage counts each token once.
//!
//! The new worker is another one than the worker that failed; after a stream gap or a stall
//! (lost messages: maybe the bus's fault) the same worker may take it when no other can.
//! Like a fallback, the new job runs under a new request id (`{id}-m{n}`) and stream subject:
//! the failed job is cancelled under its own id, and whatever it still publishes goes to a
//! subject nobody reads. A request migrates at most `--migration-limit` times; past it, or with
//! no other live generation worker, the client gets the error that ended the last attempt.
//! Failures of a context worker before the hand-over are not migrations: [`super::fallback`]
//! replaces them with a local prefill.

use std::time::Instant;

use super::Generation;
use super::cancel::CancelGuard;
use crate::error::ApiError;
use crate::metrics::Event;

pub use crate::outcomes::MigrationReason;

impl MigrationReason {
    /// The reason to migrate on `err`, or None when `err` is not the worker's failure (the
    /// request's own time limit, the bus, a bad request): those go to the client. (A worker
    /// that cancels the request itself is told apart where its `finished` is read.)
    pub fn of(err: &ApiError) -> Option<MigrationReason> {
        match err {
            ApiError::WorkerGone { .. } => Some(MigrationReason::WorkerGone),
            ApiError::Worker { .. } => Some(MigrationReason::WorkerError),
            ApiError::NotAccepted { .. } => Some(MigrationReason::NotAccepted),
            ApiError::Stalled { .. } => Some(MigrationReason::Stalled),
            ApiError::StreamGap { .. } => Some(MigrationReason::StreamGap),
            _ => None,
        }
    }
}

/// Suffix of a migrated job's request id, before the migration's number.
const MIGRATION_SUFFIX: &str = "-m";

impl Generation {
    /// Moves the request to another generation worker when `err` is its worker's failure
    /// and migrations are left; otherwise gives `err` back (the client's error).
    pub(super) async fn migrate_on(&mut self, err: ApiError) -> Result<(), ApiError> {
        match MigrationReason::of(&err) {
            Some(reason) => self.migrate(reason, err).await,
            None => Err(err),
        }
    }

    /// Moves the request to another generation worker for `reason` while migrations are
    /// left; otherwise gives `err` (what ended this attempt) back.
    pub(super) async fn migrate(
        &mut self,
        reason: MigrationReason,
        err: ApiError,
    ) -> Result<(), ApiError> {
        if self.migrations >= self.migration_limit {
            if self.migration_limit > 0 {
                tracing::warn!(request_id = %self.request_id, migrations = self.migrations,
                    "migration limit reached: the request fails");
            }
            return Err(err);
        }
        let failed = self.phase.worker_id().to_owned();
        let job_id = format!(
            "{}{MIGRATION_SUFFIX}{}",
            self.request_id,
            self.migrations + 1
        );
        let job = self.job_again(&job_id, self.received_ids.clone());
        let stream_subject = job.stream_subject.clone();
        // Prompt and resumed tokens together may not fit where the prompt alone did: the
        // request ends, saying why (the failed job is cancelled as the generation drops).
        let encoded = match self.bus.encode_job(&job) {
            Ok(encoded) => encoded,
            Err(too_large) => {
                tracing::warn!(request_id = %self.request_id, %failed,
                    reason = reason.label(), resumed_tokens = self.received_ids.len(),
                    "worker failed the request ({err}), and its migrated job is {too_large}: \
                     the request fails");
                return Err(ApiError::JobTooLarge {
                    job: "migrated job",
                    too_large,
                });
            }
        };
        let now = Instant::now();
        // Lost or late messages may be the bus's fault, not the worker's: it may take the
        // request again when no other worker can.
        let worker_id = self
            .registry
            .pick_generate_other_than(&failed, self.job.lora.as_deref(), now)
            .or_else(|| {
                matches!(
                    reason,
                    MigrationReason::StreamGap | MigrationReason::Stalled
                )
                .then(|| {
                    self.registry
                        .pick_generate_excluding(&[], self.job.lora.as_deref(), now)
                })
                .flatten()
            });
        let Some(worker_id) = worker_id else {
            tracing::warn!(request_id = %self.request_id, %failed,
                "no other live generation worker to migrate to: the request fails");
            return Err(err);
        };
        self.generation_job.moved_to(worker_id.clone());
        self.migrations += 1;
        tracing::warn!(request_id = %self.request_id, %failed, to = %worker_id,
            reason = reason.label(), resumed_tokens = self.received_ids.len(),
            migration = self.migrations, "worker failed the request ({err}): migrating it");
        self.metrics.record(Event::Migrated(reason));
        // Before its first token the request leaves the hand-over: the new worker prefills.
        self.record.no_handover();
        // The failed job may still run (an error, a stall): stop it under its own id.
        self.cancel.fire();
        self.subscriber = self.bus.subscribe(&stream_subject).await?;
        self.pending.clear();
        self.cancel = CancelGuard::new(self.bus.clone(), job_id);
        self.publish_generate_job(worker_id, encoded, "publishing a migrated job")
            .await?;
        self.job = job;
        // The new worker prefills before its next token: the first-token budget applies.
        self.first_token_by = Instant::now() + self.timeouts.accept + self.timeouts.first_token;
        self.resuming = true;
        match self.await_accepted().await {
            Ok(()) => Ok(()),
            // Not accepted: another migration, while the limit allows.
            Err(err) => Box::pin(self.migrate_on(err)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workers_failures_migrate() {
        let gone = ApiError::WorkerGone {
            detail: "worker w stopped sending heartbeats".into(),
        };
        assert_eq!(
            MigrationReason::of(&gone),
            Some(MigrationReason::WorkerGone)
        );
        assert_eq!(
            MigrationReason::of(&ApiError::StreamGap {
                expected: 3,
                got: 5
            }),
            Some(MigrationReason::StreamGap)
        );
        for theirs in [
            ApiError::RequestTimeout { timeout_ms: 1 },
            ApiError::FirstTokenTimeout { timeout_ms: 1 },
            ApiError::NoLiveWorker,
            ApiError::bus("publishing", "down"),
            ApiError::invalid("bad", "stop"),
        ] {
            assert_eq!(MigrationReason::of(&theirs), None, "{theirs}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<&str> =
            MigrationReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), MigrationReason::ALL.len());
    }
}
