//! What a forward computes besides logits: prompt logprobs (which rows of a prefill chunk
//! score prompt positions not reported yet: a recompute after a preemption skips those
//! reported before it) and the prompt's last hidden state of an embedding request; their
//! report once the forward pass has computed them, before any token of the request.

use super::{Engine, EngineEvent, EventKind, FinishReason, RequestId, Sequence, StepModel};
use crate::model::RowLogprobs;

/// What the sequences of a step ask of its forward besides logits, in batch order.
#[derive(Default)]
pub(super) struct AskedRows {
    /// The prompt positions each sequence reports ([`AskedLogprobs`]).
    pub(super) logprobs: Vec<AskedLogprobs>,
    /// The embedding requests whose prompt the step completes: each gets its last token's
    /// final-normed hidden state ([`crate::model::SequenceSlice::wants_hidden`]).
    pub(super) hidden: Vec<RequestId>,
}

impl AskedRows {
    pub(super) fn is_empty(&self) -> bool {
        self.logprobs.is_empty() && self.hidden.is_empty()
    }
}

/// The prompt positions a sequence reports in a step: `count` positions from `start`.
pub(super) struct AskedLogprobs {
    pub(super) id: RequestId,
    pub(super) start: usize,
    pub(super) count: usize,
}

impl<M: StepModel> Engine<M> {
    /// Emits what the forward computed for the sequences that asked ([`AskedRows`]), before
    /// any token of theirs.
    pub(super) fn report_row_outputs(&mut self, asked: &AskedRows, events: &mut Vec<EngineEvent>) {
        if asked.is_empty() {
            return;
        }
        let outputs = self.model.take_row_outputs();
        self.report_prompt_logprobs(&asked.logprobs, outputs.logprobs, events);
        self.report_hidden(&asked.hidden, outputs.hidden, events);
    }

    /// Emits each embedding request's hidden state ([`EventKind::Hidden`]). One that did not
    /// come back, or came back not finite, ends with an error.
    fn report_hidden(
        &mut self,
        asked: &[RequestId],
        vectors: Vec<Vec<f32>>,
        events: &mut Vec<EngineEvent>,
    ) {
        let mut vectors = vectors.into_iter();
        for &id in asked {
            let failure = match vectors.next() {
                None => Some("the model computed no hidden state for the prompt".to_string()),
                Some(v) if v.iter().any(|x| !x.is_finite()) => {
                    Some("the forward pass produced an invalid hidden state".to_string())
                }
                Some(v) => {
                    events.push(EngineEvent {
                        request_id: id,
                        kind: EventKind::Hidden { vector: v },
                    });
                    None
                }
            };
            if let Some(message) = failure {
                tracing::error!(request_id = id, "embedding: {message}");
                self.end(id, FinishReason::Error(message), events);
            }
        }
    }

    /// Emits the prompt logprobs the forward computed for the sequences that asked (before
    /// any token of theirs), and moves each one's next position past them. A sequence whose
    /// rows did not come back, or came back not finite, ends with an error: never a response
    /// with positions missing.
    fn report_prompt_logprobs(
        &mut self,
        asked: &[AskedLogprobs],
        lists: Vec<Vec<crate::model::TokenLogprob>>,
        events: &mut Vec<EngineEvent>,
    ) {
        if asked.is_empty() {
            return;
        }
        let mut lists = lists.into_iter();
        for ask in asked {
            let list = lists.next().unwrap_or_default();
            let failure = if list.len() != ask.count {
                Some(format!(
                    "the model computed {} prompt logprobs of {}",
                    list.len(),
                    ask.count
                ))
            } else if list.iter().any(|l| l.logprob.is_nan()) {
                Some("the forward pass produced invalid logits for the prompt".to_string())
            } else {
                None
            };
            if let Some(message) = failure {
                tracing::error!(request_id = ask.id, "prompt logprobs: {message}");
                self.end(ask.id, FinishReason::Error(message), events);
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&ask.id) else {
                continue;
            };
            seq.prompt_logprobs_next = ask.start + ask.count;
            events.push(EngineEvent {
                request_id: ask.id,
                kind: EventKind::PromptLogprobs {
                    start: ask.start,
                    logprobs: list,
                },
            });
        }
    }
}

/// The rows of a chunk of `seq` (positions `cached .. cached + count`) whose logits score
/// prompt positions not reported yet: row `p` scores position `p + 1`, for `p + 1` from the
/// sequence's next unreported position to the prompt's last. `None` for a sequence that asks
/// for no prompt logprobs, or a chunk with none left to report (a decode step, a recompute of
/// positions reported before its preemption).
pub(super) fn prompt_rows(seq: &Sequence, cached: usize, count: usize) -> Option<RowLogprobs> {
    let top_k = seq.prompt_logprobs?;
    let first_row = seq.prompt_logprobs_next - 1;
    if first_row < cached {
        // Rows before the chunk were never reported: no path computes a prompt without its
        // rows (shares and imports are refused), so this would be a bug; the api-server sees
        // the missing positions and fails the request.
        tracing::error!(
            first_row,
            cached,
            "prompt logprobs: positions before this chunk were not reported"
        );
    }
    let start = first_row.max(cached);
    let end = (cached + count).min(seq.prompt_len.saturating_sub(1));
    (start < end).then(|| RowLogprobs {
        first: start - cached,
        targets: seq.tokens[start + 1..end + 1].to_vec(),
        top_k,
    })
}
