//! The prefill → decode hand-over of a disaggregated request: which worker has the request
//! (`Phase`), the decode job sent on the context worker's `kv_ready`, and the decode
//! worker's report of its KV pull (`kv_pulled`, the one place its outcome, a transport or a
//! fallback, is read). What both workers say of their parts of the time to first token goes
//! to the request's [`record`](super::record).
//!
//! The decode job is the same job, with the same request id and stream subject, plus the KV
//! handle; it keeps the first-token budget the prefill started (prefill, transfer and first
//! token share it). The api-server never releases KV blocks itself: the decode worker does
//! after its pull. docs/protocol.md ("A request, step by step") has the rules.

use std::time::{Duration, Instant};

use tandem_protocol::messages::{GenerateJob, KvHandle, PrefillTiming, PullOutcome};

use super::bus::EncodedJob;
use super::{Generation, unix_ms_at};
use crate::error::ApiError;
use crate::metrics::Event;
use crate::outcomes::FallbackReason;

/// Which worker has the request now, doing what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Phase {
    /// A context worker prefills the prompt; `generate_id` is to take the decode job when the
    /// KV cache is ready.
    Prefill {
        context_id: String,
        generate_id: String,
    },
    /// A generation worker (`decode` or `both`) produces the tokens: after a hand-over, or
    /// after prefilling the prompt itself.
    Generate { worker_id: String },
}

impl Phase {
    /// The worker whose answer and heartbeats the request waits on.
    pub(super) fn worker_id(&self) -> &str {
        match self {
            Phase::Prefill { context_id, .. } => context_id,
            Phase::Generate { worker_id } => worker_id,
        }
    }

    pub(super) fn set_worker_id(&mut self, id: String) {
        match self {
            Phase::Prefill { context_id, .. } => *context_id = id,
            Phase::Generate { worker_id } => *worker_id = id,
        }
    }

    pub(super) fn is_prefill(&self) -> bool {
        matches!(self, Phase::Prefill { .. })
    }
}

impl Generation {
    /// Sends the decode job with the context worker's KV handle; `prefill_timing` is the
    /// context worker's share of the time to first token (kept for the request's record).
    pub(super) async fn hand_over(
        &mut self,
        handle: KvHandle,
        prefill_timing: Option<PrefillTiming>,
        cached_tokens: u32,
    ) -> Result<(), ApiError> {
        let Phase::Prefill {
            context_id,
            generate_id,
        } = self.phase.clone()
        else {
            tracing::warn!(request_id = %self.request_id, "ignoring a kv_ready outside the prefill phase");
            return Ok(());
        };
        self.record.kv_ready(prefill_timing, cached_tokens);
        let regions = handle.blocks.len();
        let job = GenerateJob {
            // The decode worker starts it before the first token is due, or not at all.
            deadline_unix_ms: Some(unix_ms_at(self.first_token_by)),
            kv: Some(handle),
            kv_reader: None,
            ..self.job.clone()
        };
        let encoded = match self.bus.encode_job(&job) {
            Ok(encoded) => encoded,
            // The prompt fitted on its own (the prefill job went out); with the handle it does
            // not. The generation worker prefills it instead, and the export is released by
            // the cancel of the prefill job.
            Err(too_large) => {
                let detail = format!(
                    "context worker {context_id}'s KV handle ({regions} regions) makes the \
                     decode job {too_large}"
                );
                return self
                    .fall_back(FallbackReason::DecodeJobTooLarge, &detail)
                    .await;
            }
        };
        self.metrics.record(Event::Disaggregated);
        let worker_id = self.live_generate_worker(generate_id)?;
        tracing::debug!(request_id = %self.request_id, %context_id, %worker_id,
            regions, "KV ready: decode job sent");
        self.publish_generate_job(worker_id, encoded, "publishing the decode job")
            .await?;
        self.job = job;
        self.await_accepted().await
    }

    /// Publishes `job` to generation worker `worker_id`: the generate phase of a hand-over or
    /// a fallback begins (the caller then awaits its `accepted`).
    pub(super) async fn publish_generate_job(
        &mut self,
        worker_id: String,
        job: EncodedJob,
        what: &'static str,
    ) -> Result<(), ApiError> {
        // The context worker's part is over (answered, or given up by a fallback).
        self.context_job = None;
        self.bus
            .publish_job(self.bus.subjects.generate_direct(&worker_id), job, what)
            .await?;
        self.phase = Phase::Generate { worker_id };
        Ok(())
    }

    /// `chosen` while it is live, else another generation worker (the chosen one may have
    /// gone while the context worker prefilled), which the job is then counted against.
    pub(super) fn live_generate_worker(&mut self, chosen: String) -> Result<String, ApiError> {
        let now = Instant::now();
        if self.registry.is_live(&chosen, now) {
            return Ok(chosen);
        }
        let other = self
            .registry
            .pick_generate(now)
            .ok_or(ApiError::NoLiveWorker)?;
        tracing::warn!(request_id = %self.request_id, gone = %chosen, %other,
            "the chosen generation worker left; using another");
        self.generation_job.moved_to(other.clone());
        Ok(other)
    }

    /// Accounts a decode worker's report of its KV pull (`kv_pulled`): the transfer, or the
    /// failed pull after which the decode worker prefilled the prompt itself.
    pub(super) fn kv_pulled(
        &mut self,
        worker_id: &str,
        bytes: u64,
        micros: u64,
        room_wait_us: Option<u64>,
        outcome: PullOutcome,
    ) {
        match outcome {
            PullOutcome::Pulled { transport } => {
                let transport = transport.as_str();
                self.metrics.record(Event::KvPulled {
                    bytes,
                    micros,
                    transport,
                });
                self.record.kv_pulled(
                    room_wait_us.map(Duration::from_micros),
                    Duration::from_micros(micros),
                );
                tracing::debug!(request_id = %self.request_id, %worker_id, bytes, micros,
                    transport, "KV pulled");
            }
            PullOutcome::Fallback { reason } => {
                self.record.pull_not_done();
                self.metrics
                    .record(Event::Fallback(FallbackReason::PullFailed));
                tracing::warn!(request_id = %self.request_id, %worker_id,
                    "KV pull failed, the decode worker prefills itself: {reason}");
            }
            PullOutcome::Refused { reason } => {
                self.record.pull_not_done();
                self.metrics
                    .record(Event::Fallback(FallbackReason::HandleRefused));
                tracing::warn!(request_id = %self.request_id, %worker_id,
                    "the decode worker refused the KV handle and prefills itself: {reason}");
            }
            PullOutcome::ExportGone { reason } => {
                self.record.pull_not_done();
                self.metrics
                    .record(Event::Fallback(FallbackReason::ExportGone));
                tracing::warn!(request_id = %self.request_id, %worker_id,
                    "the context worker freed the KV export before the decode worker's pull \
                     ended; the decode worker prefills itself: {reason}");
            }
        }
    }
}
