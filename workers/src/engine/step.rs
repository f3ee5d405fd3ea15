//! One step of the engine: cancellations, arrived imports and expired deadlines first, then
//! the scheduler's decision turned into a [`ForwardBatch`], run on the host or device
//! sampling path, and the step's record for the profile.

use std::time::Instant;

use super::logprobs::{AskedLogprobs, AskedRows, prompt_rows};
use super::{
    Engine, EngineEvent, FinishReason, ForwardBatch, RequestId, StepModel, finished_without_tokens,
    profile,
};
use crate::scheduler::{ScheduledSeq, SeqStatus};

/// What one step runs: its batch, and what the step does around it.
#[derive(Default)]
struct StepBatch {
    batch: ForwardBatch,
    /// What the sequences ask besides logits ([`AskedRows`]).
    asked: AskedRows,
    /// Requests with `max_tokens` 0 whose prompt this step completes: they end after it,
    /// sampling nothing.
    prompt_done: Vec<RequestId>,
    decode_tokens: usize,
    prompt_tokens: usize,
}

impl<M: StepModel> Engine<M> {
    /// Ends a request at the start of the next step (its blocks are freed there). False when
    /// the request is not active (already ended, or retained after a prefill).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let active = (self.seqs.contains_key(&id)
            || self.pending_imports.iter().any(|p| p.id == id))
            && self.scheduler.status(id) != Some(SeqStatus::Pinned)
            && !self.pending_cancel.contains(&id);
        if active {
            self.pending_cancel.push(id);
        }
        active
    }

    /// Runs one step; returns the events of every request it touched.
    pub fn step(&mut self) -> Vec<EngineEvent> {
        let start = Instant::now();
        // What earlier calls left (a collect without a step of its own) is not this step's.
        let _ = self.model.take_forward_timing();
        let mut events = std::mem::take(&mut self.deferred_events);
        self.apply_cancellations(&mut events);
        self.write_arrived_imports(&mut events);
        self.admit_imports(&mut events);
        self.drop_expired(&mut events);
        self.propose_drafts();
        let mut decision = self.scheduler.schedule();
        self.progress.preemptions += decision.preempted.len() as u64;
        if decision.preempted.len() > decision.preempted_for_priority {
            tracing::debug!(preempted = ?decision.preempted, "KV cache full: preempted for recompute");
        }
        if decision.preempted_for_priority > 0 {
            tracing::debug!(preempted = ?decision.preempted,
                "preempted for a waiting request of a higher priority");
        }
        if decision.is_empty() {
            self.collect_in_flight(&mut events);
            return events;
        }
        let StepBatch {
            batch,
            asked,
            prompt_done,
            decode_tokens,
            prompt_tokens,
        } = self.build_batch(&mut decision.scheduled, start);
        self.start_masks(&decision.scheduled);
        let scheduled_at = Instant::now();
        let mut record = profile::StepRecord {
            decode_tokens,
            prompt_tokens,
            preempted: decision.preempted.len(),
            sequences: decision.scheduled.len(),
            schedule: scheduled_at - start,
            ..Default::default()
        };
        if self.model.device_sampling().is_some() {
            let overlap = self.overlap.enabled
                && prompt_done.is_empty()
                && !self.any_drafter(decision.scheduled.iter().map(|s| s.id));
            self.forward_and_sample_on_device(
                &batch,
                decision.scheduled,
                asked,
                overlap,
                &mut events,
            );
        } else {
            self.forward_and_sample_on_host(&batch, &decision.scheduled, &asked, &mut events);
        }
        for id in prompt_done {
            // Still running unless the forward failed (then it has ended already).
            self.end(id, FinishReason::Length, &mut events);
        }
        record.overlapped = self.overlap.in_flight.is_some();
        self.record_step(record, scheduled_at);
        events
    }

    /// Ends the requests cancelled since the last step: a queued import leaves its queue
    /// without having held a block; anything else goes through `end`.
    fn apply_cancellations(&mut self, events: &mut Vec<EngineEvent>) {
        for id in std::mem::take(&mut self.pending_cancel) {
            if let Some(at) = self.pending_imports.iter().position(|p| p.id == id) {
                let import = self
                    .pending_imports
                    .remove(at)
                    .expect("position is in range");
                events.push(finished_without_tokens(
                    id,
                    import.seq.prompt_len,
                    FinishReason::Cancelled,
                ));
            } else {
                self.end(id, FinishReason::Cancelled, events);
            }
        }
    }

    /// The forward batch of the scheduled chunks (a decode of a token the in-flight step
    /// picks is chained to it), with the prompt logprobs they ask for. Marks each sequence
    /// started at `start`; a request with `max_tokens` 0 whose prompt this step completes
    /// asks for no logits and is listed to end after the step.
    fn build_batch(&mut self, scheduled: &mut [ScheduledSeq], start: Instant) -> StepBatch {
        let mut step = StepBatch::default();
        for item in scheduled {
            let seq = self
                .seqs
                .get_mut(&item.id)
                .expect("the scheduler schedules only sequences the engine holds");
            // Started: a preemption later does not make it droppable.
            seq.deadline = None;
            seq.first_forward.get_or_insert(start);
            if item.cached_len >= seq.prompt_len {
                step.decode_tokens += item.token_count;
            } else {
                step.prompt_tokens += item.token_count;
            }
            let embeds = item.wants_logits && seq.embedding;
            if item.wants_logits && seq.max_tokens == 0 {
                item.wants_logits = false;
                step.prompt_done.push(item.id);
            }
            let first_slice = step.batch.sequences.len();
            if item.draft > 0 {
                // The last token, then the draft the scheduler took (all or its first part).
                seq.draft.truncate(item.draft);
                let mut verifying = vec![*seq.tokens.last().expect("a decode has tokens")];
                verifying.extend_from_slice(&seq.draft);
                step.batch
                    .push_verifying(&verifying, item.cached_len, item.block_table.clone());
                step.batch.set_adapter_from(first_slice, seq.adapter);
                continue;
            }
            seq.draft.clear();
            let new_tokens = &seq.tokens[item.cached_len..item.cached_len + item.token_count];
            match seq.pending_row {
                // The decode of the token the in-flight step picks: the device fills it in.
                Some(row) if item.token_count == 1 && item.cached_len + 1 == seq.tokens.len() => {
                    step.batch.push_chained(
                        item.cached_len,
                        item.block_table.clone(),
                        item.wants_logits,
                        row,
                    )
                }
                _ => step.batch.push(
                    new_tokens,
                    item.cached_len,
                    item.block_table.clone(),
                    item.wants_logits,
                ),
            }
            step.batch.set_adapter_from(first_slice, seq.adapter);
            if let Some(request) = prompt_rows(seq, item.cached_len, item.token_count) {
                step.asked.logprobs.push(AskedLogprobs {
                    id: item.id,
                    start: item.cached_len + request.first + 1,
                    count: request.targets.len(),
                });
                step.batch.want_row_logprobs(request);
            }
            if embeds {
                step.asked.hidden.push(item.id);
                step.batch.want_hidden();
            }
        }
        step
    }

    /// Adds the step to the profile (when its lines are on): the forward pass's split
    /// between queueing and the device, and the rest of the time since `scheduled_at` as
    /// sampling.
    fn record_step(&mut self, mut record: profile::StepRecord, scheduled_at: Instant) {
        let Some(profile) = &mut self.profile else {
            return;
        };
        let took = scheduled_at.elapsed();
        record.forward = self
            .model
            .take_forward_timing()
            .unwrap_or(profile::ForwardTiming {
                enqueue: took,
                device: std::time::Duration::ZERO,
            });
        record.sample = took.saturating_sub(record.forward.enqueue + record.forward.device);
        profile.record_step(&record);
    }

    /// Ends the requests whose deadline passed before their first forward pass.
    fn drop_expired(&mut self, events: &mut Vec<EngineEvent>) {
        let now = Instant::now();
        let expired: Vec<RequestId> = self
            .seqs
            .iter()
            .filter(|(_, seq)| seq.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            tracing::debug!(
                request_id = id,
                "deadline passed before the engine started it"
            );
            self.end(
                id,
                FinishReason::Error(
                    "the request's deadline passed before the engine started it".into(),
                ),
                events,
            );
        }
    }
}
