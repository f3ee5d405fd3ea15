//! The operations a device implements, and the host-side description of one forward pass.
//!
//! The model ([`crate::model`]) is written once against [`Backend`]; a backend owns its memory
//! (weights, activations, the paged KV cache) behind associated types, so a GPU backend keeps
//! everything on the device and the model never sees a device pointer. Every op works on the
//! flattened tokens of a whole [`crate::model::ForwardBatch`] (rows = tokens), so prefill chunks
//! and decode steps of many sequences run as one launch per op.
//!
//! Contract shared by all backends:
//! - Activations are row-major `[tokens, features]` f32 (a GPU backend may keep them in another
//!   type, as long as results match the CPU within the parity tolerance).
//! - Weights are `[out, in]` (PyTorch's `nn.Linear`), uploaded once, possibly as several tensors
//!   concatenated along the output dimension (fused q/k/v, fused gate/up).
//! - Batch invariance: an op's result for one row must not depend on the other rows of the
//!   batch (its reduction order is fixed per row), so a request gives the same tokens alone and
//!   batched. The CPU backend guarantees it bitwise; tests check it.

pub mod cpu;
pub mod cuda;
mod plan;

pub use plan::{BatchPlan, PlanSequence};

use crate::kv_cache::KvLayout;
use crate::sampler::device::{RowRequest, RowSummary};

/// A range of host memory that stays mapped as long as the process runs (the KV transport's
/// transfer pool): what [`Backend::pin_host_memory`] pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: an address range, not access to it; whoever dereferences it says why that is sound.
unsafe impl Send for HostRange {}
unsafe impl Sync for HostRange {}

/// Device memory in the backend's context (a transfer pool's slice, or another process's
/// allocation mapped by CUDA IPC): where K/V moves without leaving the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRange {
    /// The device address (`CUdeviceptr`).
    pub ptr: u64,
    pub len: usize,
}

/// K/V bytes of a transfer, read by [`Backend::write_kv_blocks`] or
/// [`Backend::write_kv_blocks_from_device`].
#[derive(Debug, Clone, Copy)]
pub enum KvBytes<'a> {
    Host(&'a [u8]),
    Device(DeviceRange),
}

/// Memory a transfer's K/V is written into, by [`Backend::read_kv_blocks`] or
/// [`Backend::read_kv_blocks_to_device`].
#[derive(Debug)]
pub enum KvBytesMut<'a> {
    Host(&'a mut [u8]),
    Device(DeviceRange),
}

impl KvBytes<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvBytes::Host(bytes) => bytes.len(),
            KvBytes::Device(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KvBytesMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvBytesMut::Host(bytes) => bytes.len(),
            KvBytesMut::Device(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Element type of a tensor read from a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        })
    }
}

/// A tensor in host memory (typically a view into a memory-mapped weight file), little-endian.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    pub dtype: DType,
    /// `[len]` for vectors (norm weights, biases), `[out, in]` for matrices.
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl HostTensor<'_> {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Head geometry of the attention ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` (`head_dim^-0.5` for the Llama family).
    pub scale: f32,
}

impl AttentionShape {
    /// Width of a fused q/k/v row: `[q heads | k heads | v heads] * head_dim`.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: {dtype} is not supported here")]
    UnsupportedDType { op: &'static str, dtype: DType },
    #[error("KV block {block} is out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { block: u32, num_blocks: usize },
    #[error("{op}: {detail}")]
    Device { op: &'static str, detail: String },
    #[error("KV cache of {num_blocks} blocks of {block_bytes} bytes does not fit in memory")]
    KvCacheTooLarge {
        num_blocks: usize,
        block_bytes: usize,
    },
}

/// The ops of one forward pass, queued over a batch's device metadata and the cache; returns
/// the logits ([`Backend::run_forward`]).
pub type ForwardLayers<'a, B> = dyn FnMut(
        &<B as Backend>::Batch,
        &mut <B as Backend>::KvCache,
    ) -> Result<Option<<B as Backend>::Tensor>, BackendError>
    + 'a;

/// A device: memory for weights, activations and the KV cache, and the ops of the forward pass.
///
/// Ops take the batch description produced by [`Backend::prepare_batch`] (positions, rotary
/// tables, slot mapping, block tables), uploaded once per forward.
pub trait Backend: Send + Sync {
    /// Activations, `[rows, cols]`.
    type Tensor: Send + Sync;
    /// A weight matrix `[out, in]` or vector `[len]`, in whatever format the backend computes
    /// from fastest.
    type Weight: Send + Sync;
    /// Storage for a number of KV blocks of one [`KvLayout`].
    type KvCache: Send + Sync;
    /// One forward's metadata, on the device.
    type Batch: Send + Sync;

    /// Human-readable description (device, threads, formats) for logs and benchmarks.
    fn describe(&self) -> String;

    /// Runs `f` (a whole forward) in the backend's execution context: the CPU backend runs it on
    /// one of its own threads so that the ops inside do not hand work across threads at every
    /// call. Others run it in place.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Uploads `parts` concatenated along dimension 0 (all parts have the same dtype and the
    /// same trailing dimensions).
    fn upload_weight(&self, parts: &[HostTensor<'_>]) -> Result<Self::Weight, BackendError>;

    /// Allocates a zeroed cache of `num_blocks` blocks of `layout`.
    fn alloc_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<Self::KvCache, BackendError>;
    fn kv_cache_layout(&self, kv: &Self::KvCache) -> KvLayout;
    fn kv_cache_blocks(&self, kv: &Self::KvCache) -> usize;
    /// Copies one block's bytes (`layout.block_bytes()` of them) out of the cache.
    fn read_kv_block(
        &self,
        kv: &Self::KvCache,
        block: u32,
        dst: &mut [u8],
    ) -> Result<(), BackendError>;
    /// Overwrites one block with `src` (`layout.block_bytes()` bytes in the layout's dtype).
    fn write_kv_block(
        &self,
        kv: &mut Self::KvCache,
        block: u32,
        src: &[u8],
    ) -> Result<(), BackendError>;

    /// Pins `range` for the device's copy engine, so that [`Self::read_kv_blocks`] and
    /// [`Self::write_kv_blocks`] on bytes inside it copy straight to or from the device
    /// instead of through a staging buffer. False where there is nothing to pin (host
    /// backends).
    ///
    /// # Safety
    /// `range` must stay mapped for as long as this backend lives.
    unsafe fn pin_host_memory(&self, _range: HostRange) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Copies `blocks`, in order, out of the cache into `dst` (`blocks.len()` blocks back to
    /// back): a prompt's K/V handed to a transfer. The default copies block after block; a
    /// device backend queues all the copies and waits once.
    fn read_kv_blocks(
        &self,
        kv: &Self::KvCache,
        blocks: &[u32],
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let block_bytes = self.kv_cache_layout(kv).block_bytes();
        for (&block, chunk) in blocks.iter().zip(dst.chunks_exact_mut(block_bytes)) {
            self.read_kv_block(kv, block, chunk)?;
        }
        Ok(())
    }

    /// Overwrites `blocks` with `src`, laid out as [`Self::read_kv_blocks`] writes it.
    fn write_kv_blocks(
        &self,
        kv: &mut Self::KvCache,
        blocks: &[u32],
        src: &[u8],
    ) -> Result<(), BackendError> {
        let block_bytes = self.kv_cache_layout(kv).block_bytes();
        for (&block, chunk) in blocks.iter().zip(src.chunks_exact(block_bytes)) {
            self.write_kv_block(kv, block, chunk)?;
        }
        Ok(())
    }

    /// [`Self::read_kv_blocks`] into device memory of this backend's device (a CUDA IPC
    /// export): device-to-device copies. Host backends have no device memory.
    fn read_kv_blocks_to_device(
        &self,
        _kv: &Self::KvCache,
        _blocks: &[u32],
        _dst: DeviceRange,
    ) -> Result<(), BackendError> {
        Err(BackendError::Device {
            op: "read KV blocks to device memory",
            detail: format!("the {} backend has no device memory", self.describe()),
        })
    }

    /// [`Self::write_kv_blocks`] from device memory of this backend's device (a CUDA IPC
    /// pull's destination).
    fn write_kv_blocks_from_device(
        &self,
        _kv: &mut Self::KvCache,
        _blocks: &[u32],
        _src: DeviceRange,
    ) -> Result<(), BackendError> {
        Err(BackendError::Device {
            op: "write KV blocks from device memory",
            detail: format!("the {} backend has no device memory", self.describe()),
        })
    }

    fn prepare_batch(&self, plan: &BatchPlan) -> Result<Self::Batch, BackendError>;

    /// Runs one forward: `layers` queues every op of the pass over the batch's device
    /// metadata and returns the logits. The default uploads `plan` and calls it; the CUDA
    /// backend replays a captured graph of it for decode steps.
    fn run_forward(
        &self,
        plan: &BatchPlan,
        kv: &mut Self::KvCache,
        layers: &mut ForwardLayers<'_, Self>,
    ) -> Result<Option<Self::Tensor>, BackendError>
    where
        Self: Sized,
    {
        let meta = self.prepare_batch(plan)?;
        layers(&meta, kv)
    }

    /// Rows of `table` (`[vocab, hidden]`) for the batch's tokens: `[tokens, hidden]`.
    fn embedding(
        &self,
        table: &Self::Weight,
        batch: &Self::Batch,
    ) -> Result<Self::Tensor, BackendError>;

    /// `x / sqrt(mean(x^2) + eps) * weight`, per row.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor, BackendError>;

    /// `residual += x`, then returns `rms_norm(residual)`: the residual connection fused with
    /// the next norm (one pass over the rows instead of two).
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor, BackendError>;

    /// A hint that the next [`Self::linear`] reads `weight`: a backend whose ops in between
    /// (norms, attention, SiLU) leave memory bandwidth idle may start loading it. The default
    /// ignores it.
    fn prefetch_weight(&self, weight: &Self::Weight) {
        let _ = weight;
    }

    /// `x @ weight^T + bias`: `[rows, in] x [out, in] -> [rows, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor, BackendError>;

    /// On fused q/k/v rows (`[tokens, qkv_width]`): applies the rotary embedding to q (in
    /// place) and k, and writes the rotated k and v of every token into `layer` of its KV slot.
    fn rope_and_cache_write(
        &self,
        qkv: &mut Self::Tensor,
        batch: &Self::Batch,
        shape: &AttentionShape,
        kv: &mut Self::KvCache,
        layer: usize,
    ) -> Result<(), BackendError>;

    /// Attention of every new token's q heads (read from the fused rows) over its sequence's
    /// cached and new keys of `layer`: causal within the new tokens, full over the cached ones,
    /// grouped-query. Returns `[tokens, num_heads * head_dim]`.
    fn paged_attention(
        &self,
        qkv: &Self::Tensor,
        batch: &Self::Batch,
        shape: &AttentionShape,
        kv: &Self::KvCache,
        layer: usize,
    ) -> Result<Self::Tensor, BackendError>;

    /// `silu(gate) * up` on fused rows `[gate | up]`: `[rows, 2f] -> [rows, f]`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor, BackendError>;

    /// The batch's logits rows ([`BatchPlan::logits_rows`]) of `x`, in order.
    fn gather_logits_rows(
        &self,
        x: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<Self::Tensor, BackendError>;

    /// Copies a tensor to the host: one `Vec` per row.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<Vec<f32>>, BackendError>;

    /// Copies rows `rows` (ascending) of a tensor to the host.
    fn rows_to_host(
        &self,
        x: &Self::Tensor,
        rows: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut all = self.to_host(x)?;
        Ok(rows.iter().map(|&r| std::mem::take(&mut all[r])).collect())
    }

    /// Whether [`Backend::summarize_rows`] is implemented. The CPU's logits are host memory
    /// already, so it samples from the rows themselves.
    fn summarizes_rows(&self) -> bool {
        false
    }

    /// Sampling summaries of the logits rows `logits` (one per request, in row order) so the
    /// rows need not be copied to the host ([`crate::sampler::device`]).
    fn summarize_rows(
        &self,
        _logits: &Self::Tensor,
        _requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError> {
        Err(BackendError::Device {
            op: "summarize_rows",
            detail: format!("the {} backend samples from host rows", self.describe()),
        })
    }
}
