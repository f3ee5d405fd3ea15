//! The input of one forward pass: a flattened token list with per-sequence metadata.
//!
//! Prefill chunks and decode steps of different sequences share one forward: each sequence
//! contributes a contiguous run of tokens (one for a decode step, up to the chunk size for a
//! prefill chunk) whose K/V are written into its blocks before attention reads them.

/// One sequence's part of a [`ForwardBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSlice {
    /// Index of this sequence's first token in [`ForwardBatch::tokens`].
    pub token_start: usize,
    /// Number of new tokens this step (1 for decode).
    pub token_count: usize,
    /// Tokens already in the KV cache before this step; the new tokens take positions
    /// `cached_len .. cached_len + token_count`.
    pub cached_len: usize,
    /// Physical block ids holding this sequence's KV, in order; must cover
    /// `cached_len + token_count` tokens.
    pub block_table: Vec<u32>,
    /// Whether to return logits for this sequence's last new token (false for a prefill
    /// chunk that is not the prompt's last).
    pub wants_logits: bool,
}

impl SequenceSlice {
    /// Total tokens in the cache after this step.
    pub fn context_len(&self) -> usize {
        self.cached_len + self.token_count
    }
}

/// A batch for one forward pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// All new tokens of all sequences, sequence after sequence.
    pub tokens: Vec<u32>,
    pub sequences: Vec<SequenceSlice>,
}

impl ForwardBatch {
    /// Appends a sequence's new tokens.
    pub fn push(
        &mut self,
        new_tokens: &[u32],
        cached_len: usize,
        block_table: Vec<u32>,
        wants_logits: bool,
    ) {
        self.sequences.push(SequenceSlice {
            token_start: self.tokens.len(),
            token_count: new_tokens.len(),
            cached_len,
            block_table,
            wants_logits,
        });
        self.tokens.extend_from_slice(new_tokens);
    }

    /// Position of every token (`cached_len + i`), in token order.
    pub fn positions(&self) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.tokens.len());
        for seq in &self.sequences {
            positions.extend((seq.cached_len..seq.context_len()).map(|p| p as u32));
        }
        positions
    }

    /// Number of sequences that want logits: the number of rows the forward returns.
    pub fn logits_rows(&self) -> usize {
        self.sequences.iter().filter(|s| s.wants_logits).count()
    }
}
