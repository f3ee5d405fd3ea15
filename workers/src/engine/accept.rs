//! Where every token lands: `accept_token` appends it to its request and applies the stop
//! conditions (stop tokens and strings, the grammar's end, `max_tokens`, the context limit);
//! `end` is the one way out of a request, which frees its blocks (or retains them for a
//! transfer, or pins them while a transfer or a queued step may still write them).

use super::imports::LentReservation;
use super::{Engine, EngineEvent, EventKind, FinishReason, RequestId, RetainedKv, StepModel};
use crate::sampler::SampledToken;

impl<M: StepModel> Engine<M> {
    /// Appends a token (sampled here, or imported with a prefill) to `id` and applies the stop
    /// conditions: the token's event, and the request's end when it is the last.
    pub(super) fn accept_token(
        &mut self,
        id: RequestId,
        sampled: SampledToken,
        events: &mut Vec<EngineEvent>,
    ) {
        let max_context_len = self.scheduler.max_context_len();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        // A token the next step already decodes replaces its placeholder; the scheduler
        // counted it when the placeholder was set.
        let counted = seq.pending_row.take().is_some();
        if counted {
            *seq.tokens.last_mut().expect("a placeholder is a token") = sampled.id;
        } else {
            seq.tokens.push(sampled.id);
        }
        self.scheduler.name_tokens(id, &[sampled.id]);
        let mut reason = None;
        let mut text_delta = String::new();
        let stop_token = seq.stop_token_ids.contains(&sampled.id);
        // The grammar is complete: nothing may follow (EOS forced, without a step for it).
        let mut grammar_end = false;
        if !stop_token && let Some(grammar) = seq.grammar.as_mut() {
            match grammar.advance(sampled.id) {
                Ok(()) => grammar_end = grammar.is_finished(),
                Err(e) => reason = Some(FinishReason::Error(e.to_string())),
            }
        }
        if stop_token {
            // The stop token's own text (an EOS marker) is not part of the output.
            reason = Some(FinishReason::Stop);
        } else if let Some(text) = seq.text.as_mut() {
            match text.push(sampled.id) {
                Ok(step) => {
                    text_delta = step.delta;
                    if step.stopped {
                        reason = Some(FinishReason::Stop);
                    }
                }
                Err(e) => reason = Some(FinishReason::Error(format!("detokenizing: {e}"))),
            }
        }
        if reason.is_none() && grammar_end {
            reason = Some(FinishReason::Stop);
        }
        if reason.is_none()
            && (seq.generated().len() >= seq.max_tokens
                || seq.prefill_only
                || seq.tokens.len() >= max_context_len)
        {
            reason = Some(FinishReason::Length);
        }
        // Text held back for a possible stop string is final once nothing else can follow
        // (unless a stop string matched: then it is the stop string, never emitted).
        if (stop_token || grammar_end || reason == Some(FinishReason::Length))
            && let Some(text) = seq.text.as_mut()
        {
            text_delta.push_str(&text.flush());
        }
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::Token {
                id: sampled.id,
                text_delta,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
            },
        });
        match reason {
            Some(reason) => self.end(id, reason, events),
            None if counted => {}
            None => {
                if let Err(e) = self.scheduler.append_token(id) {
                    self.end(id, FinishReason::Error(e.to_string()), events);
                }
            }
        }
    }

    /// The one way out of a request: frees (or, for a finished prefill-only request, retains)
    /// its blocks and emits its `Finished` event.
    pub(super) fn end(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        events: &mut Vec<EngineEvent>,
    ) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return;
        };
        let cached_tokens = self.scheduler.cached_tokens(id).unwrap_or(0);
        if seq.pending_row.take().is_some() {
            // Ended before its in-flight token was read: that token is not the request's.
            seq.tokens.pop();
        }
        let retain = seq.prefill_only && reason == FinishReason::Length;
        let retained_kv = if retain {
            match self.scheduler.pin(id) {
                Ok(block_table) => {
                    // Its first token is out now, so it has had a forward pass.
                    let first_forward = seq.first_forward.unwrap_or(seq.arrived);
                    Some(RetainedKv {
                        block_table,
                        num_tokens: seq.prompt_len,
                        queued: first_forward.saturating_duration_since(seq.arrived),
                        prefill: first_forward.elapsed(),
                    })
                }
                Err(e) => {
                    tracing::error!("retaining KV of request {id}: {e}");
                    None
                }
            }
        } else if let Some(lent) = self.lent_reservations.get_mut(&id) {
            // A transfer may still be writing its reserved blocks: they stay allocated until
            // the caller hands the request back.
            match self.scheduler.pin(id) {
                Ok(_) => *lent = LentReservation::Ended,
                Err(e) => tracing::error!("holding the reserved blocks of request {id}: {e}"),
            }
            None
        } else if let Some(serial) = self.overlap.writer_of(id) {
            // A queued step may still write its blocks: they stay allocated until it is done.
            match self.scheduler.pin(id) {
                Ok(_) => self.overlap.defer_release(serial, id),
                Err(e) => tracing::error!("holding the blocks of request {id}: {e}"),
            }
            None
        } else {
            if let Err(e) = self.scheduler.finish(id) {
                tracing::error!("freeing blocks of request {id}: {e}");
            }
            None
        };
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::Finished {
                reason,
                usage: seq.usage(cached_tokens),
                retained_kv,
            },
        });
    }
}
