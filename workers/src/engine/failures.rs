//! Failed forward passes and the lost device: a failure ends the requests of its step; one
//! that lost the device, or too many in a row, ends every request and the engine takes no
//! more (the worker leaves the deployment and restarts).

use super::{Engine, EngineEvent, FinishReason, RequestId, StepModel, finished_without_tokens};
use crate::scheduler::ScheduledSeq;

/// Consecutive failed forward passes after which the engine stops as on a lost device (every
/// request ends, new ones are refused, the worker leaves and restarts): a failure that
/// repeats whatever the batch is the engine's, not the requests', and each further step would
/// only fail more requests.
pub const MAX_FAILED_FORWARDS_IN_A_ROW: u32 = 3;

impl<M: StepModel> Engine<M> {
    /// A failed forward pass ends the requests of its step; one that lost the device ends
    /// every request ([`Self::lose_device`]).
    pub(super) fn forward_failed(
        &mut self,
        scheduled: &[ScheduledSeq],
        error: &crate::model::ModelError,
        events: &mut Vec<EngineEvent>,
    ) {
        let message = format!("forward pass failed: {error}");
        self.progress.failed_steps += 1;
        self.failed_in_a_row += 1;
        if error.is_device_lost() {
            self.lose_device(message, events);
        } else if self.failed_in_a_row >= MAX_FAILED_FORWARDS_IN_A_ROW {
            let message = format!(
                "{} forward passes in a row failed, the last: {error}",
                self.failed_in_a_row
            );
            self.lose_device(message, events);
        } else {
            tracing::error!("{message}");
            self.fail_all(scheduled, &message, events);
        }
    }

    /// Counts a forward pass that ran.
    pub(super) fn forward_ran(&mut self, scheduled: &[ScheduledSeq]) {
        self.progress.steps += 1;
        self.failed_in_a_row = 0;
        // Their K/V are written: full blocks may now be found by later prompts.
        self.scheduler.commit(scheduled);
    }

    /// The device is unusable: every request, running or queued, ends with `message` (their
    /// clients hear it now rather than when their turn comes to fail), and the engine takes
    /// nothing more.
    pub(super) fn lose_device(&mut self, message: String, events: &mut Vec<EngineEvent>) {
        let mut ids: Vec<RequestId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        tracing::error!(
            requests = ids.len() + self.pending_imports.len(),
            "{message}; ending every request, taking no more"
        );
        for id in ids {
            self.end(id, FinishReason::Error(message.clone()), events);
        }
        for import in std::mem::take(&mut self.pending_imports) {
            events.push(finished_without_tokens(
                import.id,
                import.seq.prompt_len,
                FinishReason::Error(message.clone()),
            ));
        }
        self.arrived_imports.clear();
        self.pending_cancel.clear();
        for id in self.overlap.abandon() {
            if let Err(e) = self.scheduler.finish(id) {
                tracing::error!("freeing blocks of request {id}: {e}");
            }
        }
        self.device_lost = Some(message);
    }

    pub(super) fn fail_all(
        &mut self,
        scheduled: &[ScheduledSeq],
        message: &str,
        events: &mut Vec<EngineEvent>,
    ) {
        for item in scheduled {
            self.end(item.id, FinishReason::Error(message.to_owned()), events);
        }
    }
}
