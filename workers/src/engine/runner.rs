//! What the engine needs from a model: one forward over a batch, writing its own KV cache.
//!
//! [`ModelRunner`] pairs a [`Model`] with the KV cache it writes; the [`StepModel`] trait lets
//! the scheduling logic of the engine be tested against a small deterministic fake.

use crate::backend::{Backend, DeviceRange, HostRange};
use crate::kv_cache::KvLayout;
use crate::kv_cache::block_pool::BlockId;
use crate::model::{ForwardBatch, Model, ModelError};
use crate::sampler::device::{RowRequest, RowSummary};

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
    /// Whether [`StepModel::forward_summarized`] samples on the device.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Runs `batch` like [`StepModel::forward`] but returns a sampling summary per logits row
    /// ([`crate::sampler::device`]) instead of the row; the rows stay available to
    /// [`StepModel::last_logits_rows`] until the next forward.
    fn forward_summarized(
        &mut self,
        _batch: &ForwardBatch,
        _requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError> {
        Err(ModelError::InvalidBatch(
            "this model samples from host rows".into(),
        ))
    }
    /// Rows `rows` (ascending indices among the logits rows) of the last
    /// [`StepModel::forward_summarized`], for requests its summaries do not decide.
    fn last_logits_rows(&mut self, _rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
        Err(ModelError::InvalidBatch(
            "no logits kept from a summarized forward".into(),
        ))
    }
    /// The cache's block layout (the contract of a KV transfer).
    fn kv_layout(&self) -> KvLayout;
    /// [`Backend::pin_host_memory`]: false where nothing is pinned.
    ///
    /// # Safety
    /// `range` must stay mapped for as long as the model lives.
    unsafe fn pin_host_memory(&mut self, _range: HostRange) -> Result<bool, ModelError> {
        Ok(false)
    }
    /// Copies `blocks` out of the cache, back to back, into `dst` (`blocks.len()` times the
    /// layout's block bytes).
    fn read_kv_blocks(&self, blocks: &[BlockId], dst: &mut [u8]) -> Result<(), ModelError>;
    /// Overwrites `blocks` with `src`, laid out as [`Self::read_kv_blocks`] produces it.
    fn write_kv_blocks(&mut self, blocks: &[BlockId], src: &[u8]) -> Result<(), ModelError>;
    /// [`Self::read_kv_blocks`] into device memory ([`Backend::read_kv_blocks_to_device`]).
    fn read_kv_blocks_to_device(
        &self,
        _blocks: &[BlockId],
        _dst: DeviceRange,
    ) -> Result<(), ModelError> {
        Err(ModelError::InvalidBatch(
            "this model's KV cache is not in device memory".into(),
        ))
    }
    /// [`Self::write_kv_blocks`] from device memory
    /// ([`Backend::write_kv_blocks_from_device`]).
    fn write_kv_blocks_from_device(
        &mut self,
        _blocks: &[BlockId],
        _src: DeviceRange,
    ) -> Result<(), ModelError> {
        Err(ModelError::InvalidBatch(
            "this model's KV cache is not in device memory".into(),
        ))
    }
}

/// A loaded model and a KV cache of `num_blocks` blocks of `block_size` tokens.
pub struct ModelRunner<B: Backend> {
    model: Model<B>,
    kv: B::KvCache,
    /// The logits of the last summarized forward, for rows sampled on the host after all.
    last_logits: Option<B::Tensor>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: Model<B>, block_size: usize, num_blocks: usize) -> Result<Self, ModelError> {
        let kv = model.alloc_kv_cache(block_size, num_blocks)?;
        Ok(Self {
            model,
            kv,
            last_logits: None,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }
}

impl<B: Backend> StepModel for ModelRunner<B>
where
    B::KvCache: Send,
    B::Tensor: Send,
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

    fn samples_on_device(&self) -> bool {
        self.model.backend().summarizes_rows()
    }

    fn forward_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError> {
        self.last_logits = None;
        let Some(logits) = self.model.forward_logits(batch, &mut self.kv)? else {
            return Ok(Vec::new());
        };
        let backend = self.model.backend();
        let summaries = backend.run(|| backend.summarize_rows(&logits, requests))?;
        self.last_logits = Some(logits);
        Ok(summaries)
    }

    fn last_logits_rows(&mut self, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
        let logits = self.last_logits.as_ref().ok_or_else(|| {
            ModelError::InvalidBatch("no logits kept from a summarized forward".into())
        })?;
        let backend = self.model.backend();
        Ok(backend.run(|| backend.rows_to_host(logits, rows))?)
    }

    fn kv_layout(&self) -> KvLayout {
        self.model.backend().kv_cache_layout(&self.kv)
    }

    unsafe fn pin_host_memory(&mut self, range: HostRange) -> Result<bool, ModelError> {
        // SAFETY: the caller's promise, passed on.
        Ok(unsafe { self.model.backend().pin_host_memory(range) }?)
    }

    fn read_kv_blocks(&self, blocks: &[BlockId], dst: &mut [u8]) -> Result<(), ModelError> {
        let block_bytes = self.kv_layout().block_bytes();
        check_len(blocks, block_bytes, dst.len())?;
        Ok(self.model.backend().read_kv_blocks(&self.kv, blocks, dst)?)
    }

    fn write_kv_blocks(&mut self, blocks: &[BlockId], src: &[u8]) -> Result<(), ModelError> {
        let block_bytes = self.kv_layout().block_bytes();
        check_len(blocks, block_bytes, src.len())?;
        Ok(self
            .model
            .backend()
            .write_kv_blocks(&mut self.kv, blocks, src)?)
    }

    fn read_kv_blocks_to_device(
        &self,
        blocks: &[BlockId],
        dst: DeviceRange,
    ) -> Result<(), ModelError> {
        check_len(blocks, self.kv_layout().block_bytes(), dst.len)?;
        Ok(self
            .model
            .backend()
            .read_kv_blocks_to_device(&self.kv, blocks, dst)?)
    }

    fn write_kv_blocks_from_device(
        &mut self,
        blocks: &[BlockId],
        src: DeviceRange,
    ) -> Result<(), ModelError> {
        check_len(blocks, self.kv_layout().block_bytes(), src.len)?;
        Ok(self
            .model
            .backend()
            .write_kv_blocks_from_device(&mut self.kv, blocks, src)?)
    }
}

fn check_len(blocks: &[BlockId], block_bytes: usize, len: usize) -> Result<(), ModelError> {
    if blocks.len() * block_bytes != len {
        return Err(ModelError::InvalidBatch(format!(
            "{len} bytes for {} KV blocks of {block_bytes} bytes",
            blocks.len()
        )));
    }
    Ok(())
}
