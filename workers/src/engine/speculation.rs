//! Speculative decoding with drafts that need no model ([`super::drafter`]): before a step,
//! each decoding sequence with a drafter proposes draft tokens; the scheduler lets its decode
//! carry them ([`crate::scheduler::Scheduler::propose_draft`]); the forward pass returns a
//! logits row for the decode's own token and one per draft token; then the rows are sampled
//! in order, each exactly as a plain decode would sample it (same filters, grammar mask,
//! penalties and seeded draw for its position), until a pick differs from the draft. With
//! sampling on the device, each row's summary is asked for as its position's decode would ask
//! (the draft before it taken as generated), and decides the row's token where it can; the
//! other rows come to the host.
//!
//! Sampling every row with the sampler itself is the rejection rule of speculative sampling
//! for a draft that is certain (a draft token is kept with the probability the model gives
//! it, and on a miss the token drawn instead follows the model's distribution without it),
//! so the output is the one the same request gets without a draft, token for token, as long
//! as the forward pass computes the same logits for a row whether it runs alone or in a
//! chunk. The K/V of the kept draft tokens were computed by the same pass; those of the
//! others are overwritten later (the scheduler never counted them).

use super::{Engine, EngineEvent, FinishReason, RequestId, StepModel};
use crate::sampler::SampledToken;

/// Where a verified row's token comes from: picked from the row's summary on the device, or
/// to be sampled from the row itself on the host.
pub(super) enum RowPick {
    Picked(SampledToken),
    Logits(Vec<f32>),
}
/// Draft tokens of one sequence: verified and kept, verified and thrown away. Usage reports
/// those of a client's prediction (OpenAI's `accepted_prediction_tokens` and
/// `rejected_prediction_tokens`); heartbeats carry every sequence's in the engine's
/// progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftCounts {
    pub accepted: usize,
    pub rejected: usize,
}

impl<M: StepModel> Engine<M> {
    /// Proposes the next step's drafts: every sequence with a drafter whose next step is a
    /// decode. None while a step is in flight (its tokens, the drafts' context, are not
    /// known yet).
    pub(super) fn propose_drafts(&mut self) {
        if self.overlap.in_flight.is_some() {
            return;
        }
        let max_context = self.scheduler.max_context_len();
        for (&id, seq) in self.seqs.iter_mut() {
            let Some(drafter) = seq.drafter.as_mut() else {
                continue;
            };
            seq.draft.clear();
            if seq.pending_row.is_some() || !self.scheduler.is_decoding(id) {
                continue;
            }
            // The decode's own row picks one token; every draft token kept adds one more.
            let generated = seq.tokens.len() - seq.prompt_len;
            let room = (seq.max_tokens.saturating_sub(generated))
                .min(max_context.saturating_sub(seq.tokens.len()))
                .saturating_sub(1);
            seq.draft = drafter.propose(&seq.tokens, room);
            self.scheduler.propose_draft(id, seq.draft.len());
        }
    }

    /// Whether any of `ids` drafts: its steps are collected at once (the next step's drafts
    /// need their tokens), never left in flight.
    pub(super) fn any_drafter(&self, mut ids: impl Iterator<Item = RequestId>) -> bool {
        ids.any(|id| self.seqs.get(&id).is_some_and(|s| s.drafter.is_some()))
    }

    /// Takes a decode's rows (its own token's, then one per draft token) in order until a
    /// pick differs from the draft or the request ends; the kept draft tokens' K/V count as
    /// computed.
    pub(super) fn verify_draft(
        &mut self,
        id: RequestId,
        rows: Vec<RowPick>,
        events: &mut Vec<EngineEvent>,
    ) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let draft = std::mem::take(&mut seq.draft);
        debug_assert!(
            rows.len() <= draft.len() + 1,
            "a row per draft token and one"
        );
        // Counted as thrown away until kept, so the usage of a request that ends on the way
        // is right.
        seq.drafts.rejected += draft.len();
        self.progress.draft_tokens += draft.len() as u64;
        let mut accepted = 0;
        let mut last = None;
        for (i, row) in rows.into_iter().enumerate() {
            if i > 0
                && let Err(e) = self.scheduler.draft_token_computed(id)
            {
                self.end(id, FinishReason::Error(e.to_string()), events);
                return;
            }
            let sampled = match row {
                RowPick::Picked(sampled) => sampled,
                RowPick::Logits(mut row) => match self.sample_row(id, &mut row, events) {
                    Some(sampled) => sampled,
                    None => return,
                },
            };
            let kept = draft.get(i) == Some(&sampled.id);
            if kept && let Some(seq) = self.seqs.get_mut(&id) {
                seq.drafts.accepted += 1;
                seq.drafts.rejected -= 1;
                accepted += 1;
                self.progress.accepted_draft_tokens += 1;
            }
            last = Some(sampled.id);
            self.accept_token(id, sampled, events);
            if !kept || !self.seqs.contains_key(&id) {
                break;
            }
        }
        if let (Some(seq), Some(last)) = (self.seqs.get_mut(&id), last)
            && let Some(drafter) = seq.drafter.as_mut()
        {
            drafter.verified(draft.len(), accepted, last, seq.tokens.len());
        }
    }
}
