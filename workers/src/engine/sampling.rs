//! Tokens from a forward pass, by one of three paths: every logits row to the host sampler
//! (a backend without device sampling); the device's per-row summaries, with only the rows
//! they cannot decide copied to the host; and constrained rows masked by their grammar on the
//! device and sampled from a summary of the masked row. Grammar masks are computed on the mask
//! thread while the forward pass runs. Every path gives a request the same tokens.

use super::logprobs::AskedRows;
use super::speculation::RowPick;
use super::{
    Engine, EngineEvent, FinishReason, ForwardBatch, RequestId, StepModel, masks, overlap,
};
use crate::sampler::device::{RowRequest, RowSummary};
use crate::sampler::{SampledToken, SamplingError};
use crate::scheduler::ScheduledSeq;

impl<M: StepModel> Engine<M> {
    /// The forward pass whose logits rows come to the host, where every token is sampled.
    pub(super) fn forward_and_sample_on_host(
        &mut self,
        batch: &ForwardBatch,
        scheduled: &[ScheduledSeq],
        asked: &AskedRows,
        events: &mut Vec<EngineEvent>,
    ) {
        let forward = self.model.forward(batch);
        self.finish_masks(events);
        let rows = match forward {
            Ok(rows) if rows.len() == batch.logits_rows() => {
                self.forward_ran(scheduled);
                rows
            }
            Ok(rows) => {
                let message = format!(
                    "the model returned {} logits rows for {} sequences",
                    rows.len(),
                    batch.logits_rows()
                );
                self.fail_all(scheduled, &message, events);
                return;
            }
            Err(e) => {
                self.forward_failed(scheduled, &e, events);
                return;
            }
        };
        self.report_row_outputs(asked, events);
        let mut rows = rows.into_iter();
        for item in scheduled.iter().filter(|s| s.wants_logits) {
            if item.draft > 0 {
                let verified = rows.by_ref().take(1 + item.draft).map(RowPick::Logits);
                self.verify_draft(item.id, verified.collect(), events);
            } else if let Some(mut logits) = rows.next() {
                self.on_logits(item.id, &mut logits, events);
            }
        }
    }

    /// The forward pass with sampling on the device: each request whose token the device's
    /// summary decides skips the copy of its logits row; the others (penalties, `logit_bias`,
    /// invalid logits) get their row and the host sampler, with the same random draw.
    ///
    /// The pass is submitted before the in-flight step (if any) is collected; with `overlap`,
    /// a pass whose every token the device decides stays in flight itself ([`overlap`]).
    pub(super) fn forward_and_sample_on_device(
        &mut self,
        batch: &ForwardBatch,
        scheduled: Vec<ScheduledSeq>,
        asked: AskedRows,
        overlap: bool,
        events: &mut Vec<EngineEvent>,
    ) {
        // One entry per logits row: a decode verifying a draft has a row per draft token too,
        // each asked for as the decode at its position would be (the draft before it taken as
        // generated, which it is whenever that row's token counts).
        let mut wanting = Vec::new();
        let mut requests: Vec<Option<RowRequest>> = Vec::new();
        for item in scheduled.iter().filter(|s| s.wants_logits) {
            let mut seq = self.seqs.get_mut(&item.id);
            for row in 0..=item.draft {
                wanting.push(item.id);
                requests.push(seq.as_deref_mut().and_then(|seq| {
                    if seq.constrained {
                        // Its row comes to the host for the grammar's mask.
                        return None;
                    }
                    let generated = &seq.tokens[seq.prompt_len..];
                    if row == 0 {
                        return seq.sampler.device_request(generated, self.vocab_size);
                    }
                    let before: Vec<u32> =
                        generated.iter().chain(&seq.draft[..row]).copied().collect();
                    seq.sampler.device_request(&before, self.vocab_size)
                }));
            }
        }
        // Requests that need their full row still get a summary row (the cheapest kind).
        let placeholder = RowRequest {
            temperature: 0.0,
            uniform: 0.0,
            candidates: false,
            truncation: None,
        };
        let summary_requests: Vec<RowRequest> =
            requests.iter().map(|r| r.unwrap_or(placeholder)).collect();
        let submitted = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .submit_summarized(batch, &summary_requests);
        let mut step = overlap::DeviceStep {
            serial: 0,
            scheduled,
            wanting,
            requests,
            asked,
        };
        if submitted.is_ok() {
            step.serial = self.overlap.submitted(&step.scheduled);
        }
        // The in-flight step next: its tokens were this pass's chained inputs, and its events
        // come before this one's.
        self.collect_in_flight(events);
        if self.device_lost.is_some() {
            // Collecting it found the device lost: every request has ended, nothing to read.
            return;
        }
        if let Err(e) = submitted {
            self.finish_masks(events);
            self.forward_failed(&step.scheduled, &e, events);
            return;
        }
        // In flight only when some sequence continues: a step whose tokens all end their
        // sequences (a context worker's prefills) is collected at once, for its first tokens.
        if overlap && step.device_decides_all() && self.speculate(&step) > 0 {
            self.overlap.steps_in_flight += 1;
            self.overlap.in_flight = Some(step);
        } else {
            self.collect_device_step(step, events);
        }
    }

    /// Waits for a submitted step's summaries and takes its tokens: sampled from the
    /// summaries where they decide, from the logits rows on the host where not.
    pub(super) fn collect_device_step(
        &mut self,
        step: overlap::DeviceStep,
        events: &mut Vec<EngineEvent>,
    ) {
        let Some(summaries) = self.collect_summaries(&step, events) else {
            return;
        };
        let overlap::DeviceStep {
            scheduled,
            wanting,
            requests,
            asked,
            ..
        } = step;
        self.report_row_outputs(&asked, events);
        let mut sampled = self.sample_from_summaries(&wanting, &requests, &summaries);
        self.check_queued_picks(&wanting, &sampled, &summaries, events);
        if self.device_masks && !self.sample_constrained_on_device(&wanting, &mut sampled, events) {
            return;
        }
        let on_host: Vec<usize> = (0..wanting.len())
            .filter(|&i| sampled[i].is_none() && self.seqs.contains_key(&wanting[i]))
            .collect();
        let Some(host_rows) = self.host_rows(&on_host, &scheduled, events) else {
            return;
        };
        let mut host_rows = on_host.iter().zip(host_rows).peekable();
        let mut picks = sampled.into_iter().enumerate();
        for item in scheduled.iter().filter(|s| s.wants_logits) {
            let rows: Vec<RowPick> = picks
                .by_ref()
                .take(1 + item.draft)
                .filter_map(|(i, token)| match token {
                    Some(token) => Some(RowPick::Picked(token)),
                    None => host_rows
                        .next_if(|(row, _)| **row == i)
                        .map(|(_, row)| RowPick::Logits(row)),
                })
                .collect();
            if item.draft > 0 {
                self.verify_draft(item.id, rows, events);
                continue;
            }
            match rows.into_iter().next() {
                Some(RowPick::Picked(token)) => self.accept_token(item.id, token, events),
                Some(RowPick::Logits(mut row)) => self.on_logits(item.id, &mut row, events),
                None => {}
            }
        }
    }

    /// Waits for `step`'s summaries, one per row wanting logits; `None` when the forward pass
    /// failed or returned the wrong count (its requests have ended).
    fn collect_summaries(
        &mut self,
        step: &overlap::DeviceStep,
        events: &mut Vec<EngineEvent>,
    ) -> Option<Vec<RowSummary>> {
        let forward = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .collect_summarized();
        // Done on the device (or failed): what it may have written is free to reuse.
        self.step_completed(step.serial);
        self.finish_masks(events);
        match forward {
            Ok(summaries) if summaries.len() == step.wanting.len() => {
                self.forward_ran(&step.scheduled);
                Some(summaries)
            }
            Ok(summaries) => {
                let message = format!(
                    "the model returned {} sampling summaries for {} sequences",
                    summaries.len(),
                    step.wanting.len()
                );
                self.fail_all(&step.scheduled, &message, events);
                None
            }
            Err(e) => {
                self.forward_failed(&step.scheduled, &e, events);
                None
            }
        }
    }

    /// The token of each row whose summary decides it; `None` for the rows that take the host
    /// path.
    fn sample_from_summaries(
        &self,
        wanting: &[RequestId],
        requests: &[Option<RowRequest>],
        summaries: &[RowSummary],
    ) -> Vec<Option<SampledToken>> {
        wanting
            .iter()
            .zip(requests)
            .zip(summaries)
            .map(|((id, request), summary)| {
                // Constrained requests take the host path (their row gets the grammar's
                // mask), and so do requests ended since the forward (their row is dropped)
                // and those the device was asked nothing for (penalties, bias).
                let seq = self.seqs.get(id).filter(|seq| !seq.constrained)?;
                request.and_then(|_| seq.sampler.sample_from_summary(summary, self.vocab_size))
            })
            .collect()
    }

    /// A sequence whose next decode is queued already ran it on the device's pick: the
    /// summary must decide the same token, or that decode computed the wrong one; such a
    /// sequence ends with an error.
    fn check_queued_picks(
        &mut self,
        wanting: &[RequestId],
        sampled: &[Option<SampledToken>],
        summaries: &[RowSummary],
        events: &mut Vec<EngineEvent>,
    ) {
        for ((id, token), summary) in wanting.iter().zip(sampled).zip(summaries) {
            let Some(seq) = self.seqs.get(id) else {
                continue;
            };
            if seq.pending_row.is_some() && token.as_ref().map(|t| t.id) != Some(summary.drawn) {
                let message = if summary.non_finite > 0 {
                    format!(
                        "sampling: logits contain {} NaN or +inf values: the forward pass produced invalid values",
                        summary.non_finite
                    )
                } else {
                    format!(
                        "sampling: the host read token {:?} where the device picked {} for the queued step",
                        token.as_ref().map(|t| t.id),
                        summary.drawn
                    )
                };
                self.end(*id, FinishReason::Error(message), events);
            }
        }
    }

    /// The logits rows `on_host` of the last collected pass, copied to the host; `None` when
    /// the copy failed (the step's requests, or on a lost device every request, have ended).
    fn host_rows(
        &mut self,
        on_host: &[usize],
        scheduled: &[ScheduledSeq],
        events: &mut Vec<EngineEvent>,
    ) -> Option<Vec<Vec<f32>>> {
        if on_host.is_empty() {
            return Some(Vec::new());
        }
        let rows = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .last_logits_rows(on_host);
        let message = match rows {
            Ok(rows) if rows.len() == on_host.len() => return Some(rows),
            Ok(rows) => format!(
                "the model returned {} logits rows for {} sequences",
                rows.len(),
                on_host.len()
            ),
            Err(e) if e.is_device_lost() => {
                let message = format!("copying logits rows for host sampling failed: {e}");
                self.lose_device(message, events);
                return None;
            }
            Err(e) => format!("copying logits rows for host sampling failed: {e}"),
        };
        tracing::error!("{message}");
        self.fail_all(scheduled, &message, events);
        None
    }

    /// Constrained requests whose sampler can use a device summary (no penalties or bias) get
    /// their grammar's mask applied to their logits row on the device and sample from the
    /// masked row's summary, so their rows never come to the host; the rest (and any row whose
    /// summary does not decide) stay on the host path, where `on_logits` masks the row. Returns false when the device was lost (every request ended).
    fn sample_constrained_on_device(
        &mut self,
        wanting: &[RequestId],
        sampled: &mut [Option<SampledToken>],
        events: &mut Vec<EngineEvent>,
    ) -> bool {
        let mut rows = Vec::new();
        let mut requests = Vec::new();
        for (i, id) in wanting.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(id) else {
                continue;
            };
            // A decode verifying a draft takes its rows from the host: the mask of a row after
            // the first follows from the tokens before it, known only as they are taken.
            if !seq.constrained || !matches!(seq.mask, Some(Ok(_))) || !seq.draft.is_empty() {
                continue;
            }
            if let Some(request) = seq
                .sampler
                .device_request(&seq.tokens[seq.prompt_len..], self.vocab_size)
            {
                rows.push(i);
                requests.push(request);
            }
        }
        if rows.is_empty() {
            return true;
        }
        let masks: Vec<&[u32]> = rows
            .iter()
            .map(|&i| match &self.seqs[&wanting[i]].mask {
                Some(Ok(mask)) => mask.words(),
                _ => unreachable!("rows holds constrained requests with a mask"),
            })
            .collect();
        let summaries = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .summarize_last_masked(&rows, &masks, &requests);
        let summaries = match summaries {
            Ok(summaries) if summaries.len() == rows.len() => summaries,
            Ok(summaries) => {
                tracing::warn!(
                    summaries = summaries.len(),
                    rows = rows.len(),
                    "masked summaries do not match their rows; constrained rows sampled on the host"
                );
                return true;
            }
            Err(e) if e.is_device_lost() => {
                self.lose_device(format!("masking constrained rows failed: {e}"), events);
                return false;
            }
            Err(e) => {
                tracing::warn!(
                    "masking constrained rows on the device failed, sampling them on the host: {e}"
                );
                return true;
            }
        };
        for (&i, summary) in rows.iter().zip(&summaries) {
            let Some(seq) = self.seqs.get_mut(&wanting[i]) else {
                continue;
            };
            if let Some(token) = seq.sampler.sample_from_summary(summary, self.vocab_size) {
                // The mask is spent; the token advances the grammar in `accept_token`.
                seq.mask = None;
                sampled[i] = Some(token);
            }
        }
        true
    }

    /// Hands the grammar states of the step's constrained sequences that will sample to the
    /// mask thread, which computes their masks while the forward pass runs.
    pub(super) fn start_masks(&mut self, scheduled: &[ScheduledSeq]) {
        let jobs: Vec<masks::MaskJob> = scheduled
            .iter()
            .filter(|item| item.wants_logits)
            .filter_map(|item| {
                let seq = self.seqs.get_mut(&item.id)?;
                seq.mask = None;
                Some(masks::MaskJob {
                    id: item.id,
                    constraint: seq.grammar.take()?,
                    mask: None,
                })
            })
            .collect();
        self.masks.submit(jobs);
    }

    /// Takes the grammar states back from the mask thread with their masks (waiting for it if
    /// it is not done); a request whose state was lost ends with an error.
    fn finish_masks(&mut self, events: &mut Vec<EngineEvent>) {
        match self.masks.collect() {
            Ok(jobs) => {
                for job in jobs {
                    if let Some(seq) = self.seqs.get_mut(&job.id) {
                        seq.grammar = Some(job.constraint);
                        seq.mask = job.mask;
                    }
                }
            }
            Err(lost) => {
                tracing::error!(
                    requests = lost.len(),
                    "the grammar mask thread stopped; ending its requests"
                );
                for id in lost {
                    self.end(
                        id,
                        FinishReason::Error("grammar: the mask thread stopped".into()),
                        events,
                    );
                }
            }
        }
    }

    /// Samples the next token of `id` and applies the stop conditions.
    fn on_logits(&mut self, id: RequestId, logits: &mut [f32], events: &mut Vec<EngineEvent>) {
        if let Some(sampled) = self.sample_row(id, logits, events) {
            self.accept_token(id, sampled, events);
        }
    }

    /// The next token of `id` from its logits row (under its grammar's mask, computed now if
    /// the mask thread did not); `None` when the request has ended (here, when its grammar or
    /// its sampling settings failed).
    pub(super) fn sample_row(
        &mut self,
        id: RequestId,
        logits: &mut [f32],
        events: &mut Vec<EngineEvent>,
    ) -> Option<SampledToken> {
        let seq = self.seqs.get_mut(&id)?;
        if seq.constrained {
            let mask = match (seq.mask.take(), seq.grammar.as_mut()) {
                (Some(mask), _) => mask,
                // Not computed during the forward (no mask thread): now.
                (None, Some(grammar)) => grammar.compute_mask().map_err(|e| e.to_string()),
                (None, None) => Err("the grammar's state was lost".to_string()),
            };
            match mask {
                Ok(mask) => mask.apply(logits),
                Err(e) => {
                    self.end(id, FinishReason::Error(format!("grammar: {e}")), events);
                    return None;
                }
            }
        }
        match seq
            .sampler
            .sample(logits, &seq.tokens, &seq.tokens[seq.prompt_len..])
        {
            Ok(sampled) => Some(sampled),
            Err(e @ SamplingError::Unsatisfiable { param }) => {
                let message = e.to_string();
                self.end(id, FinishReason::Refused { message, param }, events);
                None
            }
            Err(e) => {
                self.end(id, FinishReason::Error(format!("sampling: {e}")), events);
                None
            }
        }
    }
}
