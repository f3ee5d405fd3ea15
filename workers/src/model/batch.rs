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
    /// Log-probabilities of the sequence's own next tokens at some of its rows (prompt
    /// logprobs), reduced on the way out so no full logits row is kept ([`RowLogprobs`]).
    pub row_logprobs: Option<RowLogprobs>,
    /// Whether to return the hidden state of this sequence's last new token after the final
    /// norm (what the lm_head reads): the last-token pooling of an embedding request
    /// ([`RowOutputs::hidden`]).
    pub wants_hidden: bool,
    /// The LoRA adapter this sequence computes with (an index into the model's adapters,
    /// [`crate::model::lora`]); `None`: the base model.
    pub adapter: Option<u32>,
}

/// Which rows of a [`SequenceSlice`] report the log-probability of the token that follows
/// them: rows `first .. first + targets.len()` (indices among the slice's new tokens), row
/// `first + i` scoring `targets[i]` (the sequence's next token, which for the chunk's last row
/// lies beyond the chunk), with the `top_k` best alternatives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLogprobs {
    pub first: usize,
    pub targets: Vec<u32>,
    pub top_k: usize,
}

/// What a forward computes besides its logits rows, for the sequences that ask, each list in
/// batch order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowOutputs {
    /// One list per sequence with [`SequenceSlice::row_logprobs`], one entry per asked row.
    pub logprobs: Vec<Vec<TokenLogprob>>,
    /// One vector (`hidden_size` floats) per sequence with [`SequenceSlice::wants_hidden`].
    pub hidden: Vec<Vec<f32>>,
}

impl RowOutputs {
    pub fn clear(&mut self) {
        self.logprobs.clear();
        self.hidden.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.logprobs.is_empty() && self.hidden.is_empty()
    }
}

/// What one row of [`RowLogprobs`] reports (the sampler computes it, with the normalizer and
/// ranking it reports a generated token's with).
pub use crate::sampler::TokenLogprob;

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
    /// Tokens the host does not know yet: `(i, row)` makes `tokens[i]` the token the device
    /// picked for logits row `row` of the forward summarized just before this one (the
    /// `drawn` of its [`crate::sampler::device::RowSummary`]), so this forward can be queued
    /// before that one's summaries reach the host ([`crate::engine`]'s overlapped steps).
    /// Only a backend that samples on the device resolves them; `tokens[i]` is 0 until then.
    pub chained: Vec<ChainedToken>,
}

/// One entry of [`ForwardBatch::chained`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainedToken {
    /// Index into [`ForwardBatch::tokens`].
    pub token: usize,
    /// Logits row of the previous summarized forward whose picked token goes there.
    pub row: usize,
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
            row_logprobs: None,
            wants_hidden: false,
            adapter: None,
        });
        self.tokens.extend_from_slice(new_tokens);
    }

    /// Appends a decode that verifies a draft: the sequence's last token, then the draft
    /// tokens (`tokens`), each as a one-token slice of its own at its position, over the
    /// sequence's blocks, every one returning its logits. Each row is then computed as the
    /// plain decode of that token would compute it (a backend's decode kernels, its CUDA
    /// graphs), reading the K/V the rows before it write in the same pass.
    pub fn push_verifying(&mut self, tokens: &[u32], cached_len: usize, block_table: Vec<u32>) {
        for (i, token) in tokens.iter().enumerate() {
            self.push(&[*token], cached_len + i, block_table.clone(), true);
        }
    }

    /// Appends a sequence's one new token, which is the token the device picked for logits row
    /// `row` of the previous summarized forward ([`Self::chained`]).
    pub fn push_chained(
        &mut self,
        cached_len: usize,
        block_table: Vec<u32>,
        wants_logits: bool,
        row: usize,
    ) {
        self.chained.push(ChainedToken {
            token: self.tokens.len(),
            row,
        });
        self.push(&[0], cached_len, block_table, wants_logits);
    }

    /// Asks the last pushed sequence for the log-probabilities of `request`'s rows.
    pub fn want_row_logprobs(&mut self, request: RowLogprobs) {
        let seq = self
            .sequences
            .last_mut()
            .expect("want_row_logprobs follows push");
        debug_assert!(request.first + request.targets.len() <= seq.token_count);
        seq.row_logprobs = Some(request);
    }

    /// Asks the last pushed sequence for its last token's hidden state
    /// ([`SequenceSlice::wants_hidden`]).
    pub fn want_hidden(&mut self) {
        self.sequences
            .last_mut()
            .expect("want_hidden follows push")
            .wants_hidden = true;
    }

    /// Makes the sequences pushed from `first` on (one request's slices: a verified draft
    /// pushes several) compute with `adapter`.
    pub fn set_adapter_from(&mut self, first: usize, adapter: Option<u32>) {
        for seq in &mut self.sequences[first..] {
            seq.adapter = adapter;
        }
    }

    /// The rows (token indices) of each adapter's sequences that `keep` keeps, by adapter
    /// index, ascending.
    pub fn adapter_rows(&self, keep: impl Fn(&SequenceSlice) -> bool) -> Vec<(u32, Vec<u32>)> {
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        for seq in self.sequences.iter().filter(|s| keep(s)) {
            let Some(adapter) = seq.adapter else { continue };
            let rows = (seq.token_start..seq.token_start + seq.token_count).map(|r| r as u32);
            match groups.iter_mut().find(|(a, _)| *a == adapter) {
                Some((_, group)) => group.extend(rows),
                None => groups.push((adapter, rows.collect())),
            }
        }
        groups.sort_by_key(|(a, _)| *a);
        groups
    }

    /// Whether any sequence asks for row log-probabilities.
    pub fn has_row_logprobs(&self) -> bool {
        self.sequences.iter().any(|s| s.row_logprobs.is_some())
    }

    /// Whether any sequence asks for something besides its logits ([`RowOutputs`]).
    pub fn has_row_outputs(&self) -> bool {
        self.sequences
            .iter()
            .any(|s| s.row_logprobs.is_some() || s.wants_hidden)
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
