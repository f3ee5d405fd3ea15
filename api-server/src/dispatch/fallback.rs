//! When and how a disaggregated request gives up on its context worker and has the
//! generation worker prefill the prompt itself (a *local prefill*), and the reasons counted in
//! `tandem_kv_transfer_fallbacks_total{reason}`.
//!
//! A failure of the context worker is replaced while the request is in its prefill phase and
//! the client has no token yet (`Generation::fall_back_on` for the api-server's own findings:
//! no `accepted` in time, heartbeats lost; `Generation::context_failure` for what the context
//! worker answers: `error`, or `finished` with `cancelled`/`error`). Each ends in
//! `Generation::fall_back`, at most once per request: afterwards the request is in its
//! generate phase, where failures go to the client. A request the router already sent to a
//! `decode` worker for want of a context worker is counted too ([`FallbackReason::of_route`]),
//! and the decode worker's failed pull is counted where `kv_pulled` is read (the hand-over).
//! docs/protocol.md ("Fallbacks of a disaggregated request") has the rules.

use std::time::Instant;

use tandem_protocol::messages::{FinishReason, StreamMessage, WorkerRole};

use super::Generation;
use super::cancel::CancelGuard;
use super::handover::Phase;
use crate::error::ApiError;
use crate::metrics::{Event, Metrics};
use crate::router::{LocalPrefill, Prefill, Route};

pub use crate::outcomes::FallbackReason;

impl FallbackReason {
    /// Whether `route`'s local prefill is a fallback. A local prefill for want of a context
    /// worker is one only when the generation worker is a `decode` worker, i.e. in a
    /// deployment built for disaggregation; `both` workers prefill locally by design, and
    /// counting every aggregated request as a fallback would drown the real ones. Context
    /// workers whose queues are full are a fallback whatever the generation worker.
    pub fn of_route(route: &Route) -> Option<FallbackReason> {
        match route.prefill {
            Prefill::Local(LocalPrefill::NoContextWorker)
                if route.generate_role == WorkerRole::Decode =>
            {
                Some(FallbackReason::NoContextWorker)
            }
            Prefill::Local(LocalPrefill::ContextFull) => Some(FallbackReason::ContextFull),
            _ => None,
        }
    }
}

/// Counts `route`'s local prefill if it is a fallback ([`FallbackReason::of_route`]).
pub(super) fn record_route(metrics: &Metrics, request_id: &str, route: &Route) {
    if let Some(reason) = FallbackReason::of_route(route) {
        let why = match reason {
            FallbackReason::ContextFull => "every context worker's queue is full",
            _ => "no live context worker",
        };
        tracing::warn!(%request_id, worker_id = %route.generate_id,
            "{why}: the generation worker prefills the prompt itself");
        metrics.record(Event::Fallback(reason));
    }
}

/// Suffix of the request id of a local-prefill retry (see [`Generation::fall_back`]).
const LOCAL_RETRY_SUFFIX: &str = "-local";

impl Generation {
    /// Whether a failure now is the context worker's to be replaced by a local prefill: in
    /// the prefill phase, before the client has any token.
    fn context_failure_recoverable(&self) -> bool {
        self.phase.is_prefill() && !self.first_token_seen
    }

    /// Falls back to a local prefill when `err` is the context worker's recoverable failure
    /// (it did not accept in time, its heartbeats stopped, or it and every other context
    /// worker refused the job: their queues are full); otherwise gives `err` back.
    pub(super) async fn fall_back_on(&mut self, err: ApiError) -> Result<(), ApiError> {
        if !self.context_failure_recoverable() {
            return Err(err);
        }
        match err {
            ApiError::NotAccepted { worker_id, .. } => {
                let detail = format!(
                    "context worker {worker_id} did not accept within {} ms",
                    self.timeouts.accept.as_millis()
                );
                self.fall_back(FallbackReason::ContextTimeout, &detail)
                    .await
            }
            ApiError::WorkerGone { detail } => {
                self.fall_back(FallbackReason::ContextGone, &detail).await
            }
            ApiError::WorkersFull { .. } => {
                self.fall_back(
                    FallbackReason::ContextFull,
                    "every context worker's queue is full",
                )
                .await
            }
            other => Err(other),
        }
    }

    /// What went wrong, when `message` is the context worker's recoverable failure. Any failed
    /// end of the context worker's job before a token is retried once as a local prefill,
    /// but an error that names the request's field at fault, which goes to the client; for
    /// other faults of the request the generation worker fails it the same way, and its
    /// error is the one the client gets.
    pub(super) fn context_failure(&self, message: &StreamMessage) -> Option<String> {
        if !self.context_failure_recoverable() {
            return None;
        }
        match message {
            StreamMessage::Finished {
                reason: reason @ (FinishReason::Cancelled | FinishReason::Error),
                ..
            } => Some(format!("it ended the prefill with {reason:?}")),
            // Not when the request is at fault: a local prefill would fail it the same way.
            StreamMessage::Error {
                message,
                param: None,
            } => Some(message.clone()),
            _ => None,
        }
    }

    /// Gives up on the context worker and has the generation worker prefill the prompt
    /// itself. At most once per request: afterwards the phase is [`Phase::Generate`].
    ///
    /// The retry runs under a new request id (`{id}-local`) and stream subject, and the
    /// context worker's job is cancelled under the old one: the cancel goes to every worker,
    /// so under one id it could stop the retry too, and a context worker that was only late
    /// could otherwise still put its `kv_ready` or tokens on the stream being read.
    pub(super) async fn fall_back(
        &mut self,
        reason: FallbackReason,
        detail: &str,
    ) -> Result<(), ApiError> {
        let Phase::Prefill {
            context_id,
            generate_id,
        } = self.phase.clone()
        else {
            return Err(ApiError::Internal(format!(
                "fallback ({}) requested for {} outside its prefill phase",
                reason.label(),
                self.request_id
            )));
        };
        tracing::warn!(request_id = %self.request_id, %context_id, reason = reason.label(),
            "giving up on the context worker ({detail}): the generation worker prefills the \
             prompt itself");
        self.metrics.record(Event::Fallback(reason));
        self.record.no_handover();
        self.cancel.fire();
        let job_id = format!("{}{LOCAL_RETRY_SUFFIX}", self.request_id);
        let job = self.job_again(&job_id, self.job.resume_ids.clone());
        let stream_subject = job.stream_subject.clone();
        let encoded = self
            .bus
            .encode_job(&job)
            .map_err(|too_large| ApiError::JobTooLarge {
                job: "local prefill job",
                too_large,
            })?;
        self.subscriber = self.bus.subscribe(&stream_subject).await?;
        self.pending.clear();
        self.cancel = CancelGuard::new(self.bus.clone(), job_id);
        let worker_id = self.live_generate_worker(generate_id)?;
        self.publish_generate_job(worker_id, encoded, "publishing the job")
            .await?;
        self.job = job;
        self.await_accepted().await?;
        self.first_token_by = Instant::now() + self.timeouts.first_token;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(role: WorkerRole, prefill: Prefill) -> Route {
        Route {
            generate_id: "gen".into(),
            generate_role: role,
            generate_kv_peer: None,
            prefill,
            generate_blocks: 0,
        }
    }

    #[test]
    fn only_a_decode_worker_prefilling_for_want_of_a_context_worker_is_a_fallback() {
        let no_context = Prefill::Local(LocalPrefill::NoContextWorker);
        assert_eq!(
            FallbackReason::of_route(&route(WorkerRole::Decode, no_context.clone())),
            Some(FallbackReason::NoContextWorker)
        );
        assert_eq!(
            FallbackReason::of_route(&route(WorkerRole::Both, no_context)),
            None
        );
        for role in [WorkerRole::Both, WorkerRole::Decode] {
            assert_eq!(
                FallbackReason::of_route(&route(role, Prefill::Local(LocalPrefill::ContextFull))),
                Some(FallbackReason::ContextFull)
            );
        }
        assert_eq!(
            FallbackReason::of_route(&route(
                WorkerRole::Decode,
                Prefill::Local(LocalPrefill::ShortPrompt)
            )),
            None
        );
        assert_eq!(
            FallbackReason::of_route(&route(
                WorkerRole::Decode,
                Prefill::Remote {
                    context_id: "ctx".into()
                }
            )),
            None
        );
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<&str> =
            FallbackReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), FallbackReason::ALL.len());
    }
}
