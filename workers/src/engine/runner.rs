//! What the engine needs from a model: one forward over a batch, writing its own KV cache.
//!
//! [`ModelRunner`] pairs a [`Model`] with the KV cache it writes; the [`StepModel`] trait lets
//! the scheduling logic of the engine be tested against a small deterministic fake.

use crate::backend::Backend;
use crate::model::{ForwardBatch, Model, ModelError};

/// A model with its KV cache, as the engine drives it.
pub trait StepModel: Send {
    /// Logits per row.
    fn vocab_size(&self) -> usize;
    /// The model's context length.
    fn max_model_len(&self) -> usize;
    /// Tokens that end generation unless a request ignores EOS.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Runs `batch`, writing the new tokens' K/V into the cache; one logits row per sequence
    /// with `wants_logits`, in batch order.
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// A loaded model and a KV cache of `num_blocks` blocks of `block_size` tokens.
pub struct ModelRunner<B: Backend> {
    model: Model<B>,
    kv: B::KvCache,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: Model<B>, block_size: usize, num_blocks: usize) -> Result<Self, ModelError> {
        let kv = model.alloc_kv_cache(block_size, num_blocks)?;
        Ok(Self { model, kv })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }
}

impl<B: Backend> StepModel for ModelRunner<B>
where
    B::KvCache: Send,
{
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.model.config().eos_token_ids()
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        self.model.forward(batch, &mut self.kv)
    }
}
