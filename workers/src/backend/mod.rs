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
pub mod fp8;
mod kv_io;
mod lora_stack;
mod plan;

pub use kv_io::{
    DeviceRange, EXPORT_SLOT_BYTES, HostRange, KvBlockIo, KvBuffer, KvBytes, KvBytesMut,
    KvCacheMemory, KvMemory,
};
pub use lora_stack::{
    HostPair as LoraHostPair, LORA_RANK_MULTIPLE, LoraStack, stack_host as stack_lora_host,
    stacked_rank,
};
pub use plan::{BatchPlan, PlanSequence};

pub use tandem_model::{GgufQuant, WeightDType};

use crate::kv_cache::{KvDType, KvLayout};
use crate::sampler::device::{RowRequest, RowSummary};

/// A tensor in host memory (typically a view into a memory-mapped weight file), little-endian.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    pub dtype: WeightDType,
    /// `[len]` for vectors (norm weights, biases), `[out, in]` for matrices.
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// An FP8 weight's scales ([`WeightDType::F8E4M3`]); empty for the other types.
    pub scales: QuantScales<'a>,
}

impl<'a> HostTensor<'a> {
    /// A tensor of a type without scales.
    pub fn new(dtype: WeightDType, shape: &'a [usize], bytes: &'a [u8]) -> Self {
        HostTensor {
            dtype,
            shape,
            bytes,
            scales: QuantScales::default(),
        }
    }

    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// The scale of row `row` of an FP8 matrix (1 for other types).
    pub fn row_scale(&self, row: usize) -> f32 {
        match self.scales.weight {
            [] => 1.0,
            [one] => *one,
            rows => rows[row],
        }
    }
}

/// A GGUF block-quantized matrix in host memory: `rows` rows of `cols` values, each row its
/// ggml blocks of `quant` as the file holds them ([`tandem_model::gguf_quant`]).
#[derive(Debug, Clone, Copy)]
pub struct GgufTensor<'a> {
    pub quant: GgufQuant,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

/// How an FP8 weight's stored values become its values, and how its input is quantized:
/// [`tandem_model::quantization`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuantScales<'a> {
    /// One scale for the whole matrix, or one per row (output feature); empty: no scales.
    pub weight: &'a [f32],
    pub input: InputScale,
}

/// How the input of an FP8 product is quantized (the checkpoint's activation scheme).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum InputScale {
    /// Each token's row by its own largest magnitude (dynamic).
    #[default]
    PerToken,
    /// By the checkpoint's static scale, the same for every token.
    Static(f32),
    /// Not at all: a weight-only checkpoint, whose products run in 16 bits.
    Unquantized,
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
    #[error("{op}: a KV cache of {} is not supported here", dtype.name())]
    UnsupportedKvDType { op: &'static str, dtype: KvDType },
    #[error("KV block {block} is out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { block: u32, num_blocks: usize },
    #[error("{op}: {detail}")]
    Device { op: &'static str, detail: String },
    /// The device is in an error state that no later call recovers from (a "sticky" CUDA
    /// error such as an illegal address): every later op fails too, so the worker must stop
    /// serving and restart.
    #[error("{op}: {detail} (the device is unusable until the worker restarts)")]
    DeviceLost { op: &'static str, detail: String },
    /// A collective of a tensor-parallel group failed: a rank left, timed out, or disagreed.
    #[error("{op}: {detail}")]
    Collective { op: &'static str, detail: String },
    #[error("KV cache of {num_blocks} blocks of {block_bytes} bytes does not fit in memory")]
    KvCacheTooLarge {
        num_blocks: usize,
        block_bytes: usize,
    },
}

impl BackendError {
    /// [`Backend::all_reduce_sum`] of a backend that is no rank of a tensor-parallel group.
    pub fn not_in_group() -> Self {
        BackendError::Collective {
            op: "all_reduce_sum",
            detail: "this backend is not a rank of a tensor-parallel group".into(),
        }
    }

    /// Whether the device is lost for good ([`BackendError::DeviceLost`]).
    pub fn is_device_lost(&self) -> bool {
        matches!(self, BackendError::DeviceLost { .. })
    }
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
/// tables, slot mapping, block tables), uploaded once per forward. Copies of KV blocks to and
/// from a transfer are [`KvBlockIo`]; sampling on the device is the optional
/// [`DeviceSampler`].
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

    /// Uploads GGUF block-quantized `parts` (the same `cols`; their types may differ, as a
    /// Q4_K_M file's q/k and v do) concatenated along rows, kept quantized. A backend without
    /// kernels for the type refuses it by name (the default: none).
    fn upload_gguf_weight(&self, parts: &[GgufTensor<'_>]) -> Result<Self::Weight, BackendError> {
        let quant = parts
            .first()
            .map_or("no tensors".into(), |p| p.quant.to_string());
        Err(BackendError::Device {
            op: "upload_weight",
            detail: format!(
                "GGUF {quant} weights are run quantized by the CPU backend only; import the GGUF \
                 without --keep-quant (bf16) for this device"
            ),
        })
    }

    /// Allocates a zeroed cache of `num_blocks` blocks of `layout`.
    fn alloc_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<Self::KvCache, BackendError>;
    fn kv_cache_layout(&self, kv: &Self::KvCache) -> KvLayout;
    fn kv_cache_blocks(&self, kv: &Self::KvCache) -> usize;

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
    /// (norms, attention, SiLU) leave memory bandwidth idle may start loading it, and one
    /// whose norms can write their rows in the form that projection reads (FP8 codes) may
    /// write only that form, so the norm's output must go to that projection and nowhere
    /// else. The default ignores it.
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

    /// [`Self::linear`] for a projection whose output only a residual add reads
    /// ([`Self::add_rms_norm`], directly or through [`Self::gather_logits_rows`] and
    /// [`Self::gather_rows`]): a backend may write it narrower (the CUDA backend writes o_proj
    /// and down in bf16 for prefill-sized batches, and its residual add rounds an f32 input to
    /// bf16 the same way).
    fn linear_to_residual(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor, BackendError> {
        self.linear(x, weight, bias)
    }

    /// [`Self::linear`] for the fused q/k/v projection, whose output
    /// [`Self::rope_and_cache_write`] reads first: a backend may write it narrower where that
    /// op widens it as it reads (the CUDA backend, for FP8 weights at prefill sizes, where
    /// cuBLASLt writes only bf16 with the scales applied).
    fn linear_qkv(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor, BackendError> {
        self.linear(x, weight, bias)
    }

    /// On fused q/k/v rows as [`Self::linear_qkv`] wrote them: RMS-normalizes each q head by
    /// `q_norm` and each k head by `k_norm` (vectors of `head_dim`), in place, leaving v as
    /// it is (Qwen3's norms, before rotation). Rows keep the width and type they had.
    fn head_rms_norm(
        &self,
        qkv: &mut Self::Tensor,
        q_norm: &Self::Weight,
        k_norm: &Self::Weight,
        shape: &AttentionShape,
        eps: f32,
    ) -> Result<(), BackendError>;

    /// On fused q/k/v rows (`[tokens, qkv_width]`): applies the rotary embedding to q (in
    /// place) and k, and writes the rotated k and v of every token into `layer` of its KV slot.
    /// Rows [`Self::linear_qkv`] wrote narrower are widened first: after it, `qkv` holds them
    /// as [`Self::linear`] would have written them, rotated.
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

    /// Replaces `x` by its sum over the tensor-parallel group this backend is a rank of, the
    /// same bits on every rank ([`crate::model::shard`]). The model calls it only with more
    /// than one rank; a backend outside a group refuses.
    fn all_reduce_sum(&self, x: &mut Self::Tensor) -> Result<(), BackendError> {
        let _ = x;
        Err(BackendError::not_in_group())
    }

    /// The MLP's first half: `silu_mul(linear(x, gate_up))`, with `next` (the weight that
    /// reads the activation) announced between the two ([`Self::prefetch_weight`]). A backend
    /// may keep the projection's output narrower than [`Self::linear`]'s, since only the
    /// activation reads it (the CUDA backend writes it in bf16 for prefill-sized batches: half
    /// the bytes of the widest activation of a layer, written and read back).
    fn linear_silu_mul(
        &self,
        x: &Self::Tensor,
        gate_up: &Self::Weight,
        next: &Self::Weight,
    ) -> Result<Self::Tensor, BackendError> {
        let projected = self.linear(x, gate_up, None)?;
        self.prefetch_weight(next);
        self.silu_mul(&projected)
    }

    /// The batch's logits rows ([`BatchPlan::logits_rows`]) of `x`, in order.
    fn gather_logits_rows(
        &self,
        x: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<Self::Tensor, BackendError>;

    /// Rows `rows` (token indices given by the host, any order) of `x`: what the prompt
    /// logprobs of a prefill chunk gather, a group of rows at a time
    /// ([`crate::model::RowLogprobs`]).
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor, BackendError>;

    /// `y[rows[i]] += delta[i]` for every `i` (rows distinct): what [`Self::add_lora`] adds.
    /// A backend that does not serve adapters refuses ([`Self::enable_lora`] says so at load).
    fn add_rows(
        &self,
        y: &mut Self::Tensor,
        rows: &[u32],
        delta: &Self::Tensor,
    ) -> Result<(), BackendError> {
        let _ = (y, rows, delta);
        Err(BackendError::Device {
            op: "add_rows",
            detail: format!("LoRA adapters are not served by {}", self.describe()),
        })
    }

    /// `y[rows] += B (A x[rows])`: a LoRA adapter's products (`a` `[r, in]`, `b` `[out, r]`,
    /// scaled) over the rows of its sequences, added to the output `y` of the projection that
    /// read `x` ([`crate::model::lora`]).
    fn add_lora(
        &self,
        y: &mut Self::Tensor,
        x: &Self::Tensor,
        rows: &[u32],
        a: &Self::Weight,
        b: &Self::Weight,
    ) -> Result<(), BackendError> {
        let xa = self.gather_rows(x, rows)?;
        let t = self.linear(&xa, a, None)?;
        let delta = self.linear(&t, b, None)?;
        self.add_rows(y, rows, &delta)
    }

    /// The most rows [`Self::add_lora_stacked`] goes through in one batch; 0 where the backend
    /// has no such pass (the model then adds each adapter's rows with [`Self::add_lora`]).
    fn lora_stacked_rows(&self) -> usize {
        0
    }

    /// `y[t] += B_k (A_k x[t])` for every row `t` of `batch` the plan gives adapter `k`
    /// ([`BatchPlan::row_adapters`]), from every adapter's pair of one projection stacked
    /// ([`LoraStack`]); other rows are left as they are. One pass for any mix of adapters,
    /// whose arguments do not change with the mix. `first_rows`: `None` goes through every
    /// row (a decode step: its graph replays the pass whichever rows ask for adapters);
    /// `Some(n)` through the first `n` only, past which no row has an adapter here.
    fn add_lora_stacked(
        &self,
        y: &mut Self::Tensor,
        x: &Self::Tensor,
        batch: &Self::Batch,
        stack: &LoraStack<Self::Weight>,
        first_rows: Option<usize>,
    ) -> Result<(), BackendError> {
        let _ = (y, x, batch, stack, first_rows);
        Err(BackendError::Device {
            op: "add_lora_stacked",
            detail: format!("stacked LoRA products are not run by {}", self.describe()),
        })
    }

    /// Readies this backend for LoRA adapters' products over a model whose projections are
    /// `weights` (whatever the forward must keep for them, such as the projections' inputs
    /// as values), or says why it cannot serve them ([`crate::model::Model::load_adapters`]
    /// refuses with it). Called once, before the adapters are loaded.
    fn enable_lora(&self, weights: WeightDType) -> Result<(), String> {
        let _ = weights;
        Err(format!(
            "LoRA adapters are not served by {}",
            self.describe()
        ))
    }

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

    /// The backend's sampler on the device, where it has one (and it is on); without one,
    /// logits rows are copied to the host and sampled there (the CPU's logits are host memory
    /// already).
    fn device_sampler(&self) -> Option<&dyn DeviceSampler<Self::Tensor>> {
        None
    }
}

/// Sampling summaries of logits rows computed where the rows are, so they need not be copied
/// to the host ([`crate::sampler::device`]): a capability some backends have
/// ([`Backend::device_sampler`]).
pub trait DeviceSampler<T>: Send + Sync {
    /// One summary per row of `logits`, in row order, as `requests` (one per row) ask.
    fn summarize_rows(
        &self,
        logits: &T,
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError>;

    /// [`Self::summarize_rows`] without waiting: the summaries (and their copy to the host)
    /// are queued behind the work that computes `logits`, and [`Self::take_summaries`] waits
    /// for them. A forward queued after this one may read the tokens these summaries pick
    /// (each row's `drawn`) through its [`crate::model::ForwardBatch::chained`] tokens, so the
    /// host can queue it before it has read them.
    fn queue_summaries(&self, logits: &T, requests: &[RowRequest]) -> Result<(), BackendError>;

    /// The oldest summaries [`Self::queue_summaries`] queued and nothing took yet, waiting
    /// for them to reach the host.
    fn take_summaries(&self) -> Result<Vec<RowSummary>, BackendError>;

    /// Summaries of rows `rows` of `logits` after each is masked by a grammar's token mask
    /// (`masks[i]`: bits, 32 tokens a word; a clear bit, or a token past the mask, makes that
    /// logit -inf), as `requests` ask: a constrained request samples on the device like a free
    /// one, without its row coming to the host. `logits` itself is left unchanged.
    fn summarize_masked_rows(
        &self,
        logits: &T,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError>;
}
