//! [`BatchPlan`]: a [`ForwardBatch`] flattened into the arrays the ops index by token, built on
//! the host once per forward and uploaded by [`super::Backend::prepare_batch`].
//!
//! The arrays follow vLLM's paged-attention inputs (slot mapping, flattened block tables,
//! per-sequence start and lengths) so a GPU kernel needs no other metadata.

use crate::model::{ChainedToken, ForwardBatch};

/// One sequence of a [`BatchPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSequence {
    /// First row of this sequence's new tokens.
    pub token_start: usize,
    pub token_count: usize,
    /// Tokens already cached before this step.
    pub cached_len: usize,
    /// This sequence's block table is `block_tables[block_table_start..][..num_blocks]`.
    pub block_table_start: usize,
    pub num_blocks: usize,
}

impl PlanSequence {
    pub fn context_len(&self) -> usize {
        self.cached_len + self.token_count
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per token, its KV slot: `block * block_size + offset_in_block`.
    pub slot_mapping: Vec<u64>,
    pub sequences: Vec<PlanSequence>,
    pub block_tables: Vec<u32>,
    pub block_size: usize,
    /// Rows (token indices) whose logits the forward returns: each wanting sequence's last.
    pub logits_rows: Vec<u32>,
    /// Some sequence asks for row log-probabilities (prompt logprobs) or its last hidden state
    /// (an embedding, [`crate::model::RowOutputs`]): the pass copies them to the host as it
    /// goes, so it is never captured into a graph.
    pub row_logprobs: bool,
    /// Some sequence computes with a LoRA adapter ([`crate::model::SequenceSlice::adapter`]):
    /// the pass runs the adapters' products over those rows. A graph captured for such a step
    /// runs them for every row ([`super::Backend::add_lora_stacked`]), so it is kept apart
    /// from the base model's graphs of the same size, which do not.
    pub lora: bool,
    /// Per token, the adapter the stacked pass adds the products of
    /// ([`super::Backend::add_lora_stacked`]): where its sequence computes one token this step,
    /// that sequence's adapter's index in the model's adapters plus one; 0 for the base model
    /// and for the rows of longer chunks (prompts), whose products each adapter's GEMMs add.
    pub row_adapters: Vec<u32>,
    /// `cos(position * inv_freq[i])`, `[tokens, rope_half]`.
    pub rope_cos: Vec<f32>,
    /// `sin(position * inv_freq[i])`, `[tokens, rope_half]`.
    pub rope_sin: Vec<f32>,
    /// `head_dim / 2`.
    pub rope_half: usize,
    /// Tokens the device picked in the previous summarized forward ([`ForwardBatch::chained`]).
    pub chained: Vec<ChainedToken>,
}

impl BatchPlan {
    /// Flattens `batch`; `inv_freq` has `head_dim / 2` rotary frequencies. The batch must be
    /// valid (see [`crate::model::Model::forward`], which checks it first).
    pub fn new(batch: &ForwardBatch, block_size: usize, inv_freq: &[f32]) -> Self {
        let tokens = batch.tokens.clone();
        let positions = batch.positions();
        let rope_half = inv_freq.len();
        let mut slot_mapping = Vec::with_capacity(tokens.len());
        let mut sequences = Vec::with_capacity(batch.sequences.len());
        let mut block_tables = Vec::new();
        let mut logits_rows = Vec::new();
        let mut row_adapters = Vec::with_capacity(tokens.len());
        for seq in &batch.sequences {
            let adapter = match seq.adapter {
                Some(k) if seq.token_count == 1 => k + 1,
                _ => 0,
            };
            row_adapters.extend(std::iter::repeat_n(adapter, seq.token_count));
            for pos in seq.cached_len..seq.context_len() {
                let block = seq.block_table[pos / block_size] as u64;
                slot_mapping.push(block * block_size as u64 + (pos % block_size) as u64);
            }
            let num_blocks = seq.context_len().div_ceil(block_size);
            sequences.push(PlanSequence {
                token_start: seq.token_start,
                token_count: seq.token_count,
                cached_len: seq.cached_len,
                block_table_start: block_tables.len(),
                num_blocks,
            });
            block_tables.extend_from_slice(&seq.block_table[..num_blocks]);
            if seq.wants_logits {
                logits_rows.push((seq.token_start + seq.token_count - 1) as u32);
            }
        }
        let mut rope_cos = Vec::with_capacity(tokens.len() * rope_half);
        let mut rope_sin = Vec::with_capacity(tokens.len() * rope_half);
        for &pos in &positions {
            // As Hugging Face computes it: the angle in f32 (position * inv_freq), then cos/sin.
            for &f in inv_freq {
                let angle = pos as f32 * f;
                rope_cos.push(angle.cos());
                rope_sin.push(angle.sin());
            }
        }
        BatchPlan {
            tokens,
            positions,
            slot_mapping,
            sequences,
            block_tables,
            block_size,
            logits_rows,
            row_logprobs: batch.has_row_outputs(),
            lora: batch.sequences.iter().any(|s| s.adapter.is_some()),
            row_adapters,
            rope_cos,
            rope_sin,
            rope_half,
            chained: batch.chained.clone(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Block table of sequence `seq`.
    pub fn block_table(&self, seq: &PlanSequence) -> &[u32] {
        &self.block_tables[seq.block_table_start..seq.block_table_start + seq.num_blocks]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_slots_tables_and_logits_rows() {
        let mut batch = ForwardBatch::default();
        batch.push(&[5, 6, 7], 2, vec![9, 4], true); // positions 2..5, block 4 holds 4
        batch.push(&[8], 0, vec![3, 99], false); // extra table entries are ignored
        let plan = BatchPlan::new(&batch, 4, &[1.0, 0.5]);
        assert_eq!(plan.positions, vec![2, 3, 4, 0]);
        assert_eq!(plan.slot_mapping, vec![9 * 4 + 2, 9 * 4 + 3, 4 * 4, 3 * 4]);
        assert_eq!(plan.block_tables, vec![9, 4, 3]);
        assert_eq!(plan.sequences[1].block_table_start, 2);
        assert_eq!(plan.logits_rows, vec![2]);
        assert_eq!(plan.rope_cos.len(), 8);
        assert_eq!(plan.rope_cos[2], (3.0f32 * 1.0).cos());
        assert_eq!(plan.rope_sin[3], (3.0f32 * 0.5).sin());
        assert_eq!(plan.row_adapters, vec![0; 4]);
        assert!(!plan.lora);
    }

    #[test]
    fn decode_rows_name_their_sequences_adapter_and_prompt_rows_none() {
        let mut batch = ForwardBatch::default();
        batch.push(&[5, 6], 0, vec![1], true);
        batch.push(&[7], 3, vec![2], true);
        batch.set_adapter_from(1, Some(2));
        batch.push(&[8, 9, 1], 0, vec![3], true);
        batch.set_adapter_from(2, Some(0));
        batch.push(&[4], 5, vec![4, 5], true);
        batch.set_adapter_from(3, Some(0));
        let plan = BatchPlan::new(&batch, 4, &[1.0]);
        assert_eq!(plan.row_adapters, vec![0, 0, 3, 0, 0, 0, 1]);
        assert!(plan.lora);
    }

    #[test]
    fn a_verified_draft_is_a_decode_per_token_over_the_sequences_blocks() {
        let mut batch = ForwardBatch::default();
        batch.push(&[1], 6, vec![2, 3], true);
        batch.push_verifying(&[5, 6, 7], 4, vec![8, 9]);
        batch.push(&[4, 4], 0, vec![1], true);
        let plan = BatchPlan::new(&batch, 4, &[1.0]);
        assert_eq!(plan.logits_rows, vec![0, 1, 2, 3, 5]);
        assert_eq!(plan.positions, vec![6, 4, 5, 6, 0, 1]);
        assert_eq!(plan.slot_mapping[1..4], [9 * 4, 9 * 4 + 1, 9 * 4 + 2]);
        assert_eq!(plan.sequences[3].cached_len, 6);
        assert_eq!(batch.logits_rows(), 5);
    }
}
