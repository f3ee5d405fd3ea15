//! Overlapped steps: the next forward pass is queued before the host reads this one's tokens.
//!
//! With sampling on the device, a step's host work (scheduling, reading the summaries,
//! detokenizing, stop checks, delivering events) used to leave the device idle: 5-9% of a
//! step at large batches. When every token of a step is one the device picks by itself (the
//! `drawn` of its summary: greedy, or a draw over the whole vocabulary; no grammar, no host
//! row, no prompt logprobs), the engine keeps that step *in flight*: each of its sequences
//! gets a placeholder token ([`PENDING_TOKEN`]) and its scheduler entry counts the token, so
//! the next step schedules their decodes at once, as [`crate::model::ChainedToken`]s the device
//! fills in from the in-flight step's picks. That step is queued first, then the in-flight
//! one is collected (its placeholders replaced by the tokens the host reads, the same ones),
//! so the host works while the device runs.
//!
//! A sequence that a collected token ends (EOS, a stop string) already has a decode in the
//! queued step: that row is computed and dropped. Its blocks may still be written by that
//! step, so they stay allocated (pinned in the scheduler) until it is collected: no other
//! sequence, and no KV transfer into the cache, gets them before. Overlap is on unless
//! [`super::EngineSettings::overlap`] turns it off (`TANDEM_OVERLAP=0`, `--overlap false`):
//! then every step is collected before the next is scheduled; the tokens are the same.

use std::collections::HashMap;

use super::{Engine, EngineEvent, RequestId, StepModel};
use crate::sampler::device::RowRequest;
use crate::scheduler::ScheduledSeq;

/// The token a sequence holds while the device has picked it and the host has not read it.
/// Outside every vocabulary: a batch carrying it to a forward pass is refused, not run.
pub const PENDING_TOKEN: u32 = u32::MAX;

/// A step whose forward pass was submitted and whose summaries are not collected yet.
pub(super) struct DeviceStep {
    pub serial: u64,
    pub scheduled: Vec<ScheduledSeq>,
    /// The sequences wanting logits, in row order.
    pub wanting: Vec<RequestId>,
    /// What each row's summary was asked for; `None` where the row goes to the host.
    pub requests: Vec<Option<RowRequest>>,
    pub asked: super::logprobs::AskedRows,
}

impl DeviceStep {
    /// Whether the device decides every token of the step by itself: what lets the next step
    /// be queued before this one is collected.
    pub fn device_decides_all(&self) -> bool {
        self.asked.is_empty()
            && !self.requests.is_empty()
            && self
                .requests
                .iter()
                .all(|r| r.is_some_and(|r| r.temperature == 0.0 || !r.candidates))
    }
}

/// The engine's overlap state.
pub(super) struct Overlap {
    pub enabled: bool,
    /// The step whose tokens the next step may chain.
    pub in_flight: Option<DeviceStep>,
    next_serial: u64,
    /// Per sequence, the last submitted step that computes for it and is not collected yet.
    writing: HashMap<RequestId, u64>,
    /// Ended sequences whose blocks a step (the serial) may still write: pinned until then.
    deferred_release: Vec<(u64, RequestId)>,
    /// Steps kept in flight since start.
    pub steps_in_flight: u64,
}

impl Overlap {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            in_flight: None,
            next_serial: 0,
            writing: HashMap::new(),
            deferred_release: Vec::new(),
            steps_in_flight: 0,
        }
    }

    /// Records a submitted step's sequences as written by it; its serial.
    pub fn submitted(&mut self, scheduled: &[ScheduledSeq]) -> u64 {
        self.next_serial += 1;
        for item in scheduled {
            self.writing.insert(item.id, self.next_serial);
        }
        self.next_serial
    }

    /// The step `serial` (and every earlier one) is done on the device: the sequences ended
    /// while it could write their blocks, to release now.
    pub fn completed(&mut self, serial: u64) -> Vec<RequestId> {
        self.writing.retain(|_, s| *s > serial);
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .deferred_release
            .drain(..)
            .partition(|&(s, _)| s <= serial);
        self.deferred_release = waiting;
        done.into_iter().map(|(_, id)| id).collect()
    }

    /// The uncollected step that may still write `id`'s blocks, if any.
    pub fn writer_of(&self, id: RequestId) -> Option<u64> {
        self.writing.get(&id).copied()
    }

    pub fn defer_release(&mut self, serial: u64, id: RequestId) {
        self.deferred_release.push((serial, id));
    }

    /// Forgets every step (the device is lost): what is deferred, to release now.
    pub fn abandon(&mut self) -> Vec<RequestId> {
        self.in_flight = None;
        self.writing.clear();
        self.deferred_release.drain(..).map(|(_, id)| id).collect()
    }
}

impl<M: StepModel> Engine<M> {
    /// Gives every sequence of the submitted `step` whose token will not end it a placeholder
    /// token, counted by the scheduler, so the next step can schedule its decode; how many.
    pub(super) fn speculate(&mut self, step: &DeviceStep) -> usize {
        let mut speculated = 0;
        let max_context_len = self.scheduler.max_context_len();
        for (row, id) in step.wanting.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(id) else {
                continue;
            };
            // A token that ends the sequence by length needs no decode after it.
            let ends = seq.generated().len() + 1 >= seq.max_tokens
                || seq.prefill_only
                || seq.tokens.len() + 1 >= max_context_len;
            if ends || seq.pending_row.is_some() {
                continue;
            }
            if self.scheduler.append_token(*id).is_ok() {
                seq.tokens.push(PENDING_TOKEN);
                seq.pending_row = Some(row);
                speculated += 1;
            }
        }
        speculated
    }

    /// Collects the in-flight step, if there is one.
    pub(super) fn collect_in_flight(&mut self, events: &mut Vec<EngineEvent>) {
        if let Some(step) = self.overlap.in_flight.take() {
            self.collect_device_step(step, events);
        }
    }

    /// The device is done with step `serial`: frees the blocks of the sequences that ended
    /// while it could still write them.
    pub(super) fn step_completed(&mut self, serial: u64) {
        for id in self.overlap.completed(serial) {
            if let Err(e) = self.scheduler.finish(id) {
                tracing::error!("freeing blocks of request {id}: {e}");
            }
        }
    }
}
