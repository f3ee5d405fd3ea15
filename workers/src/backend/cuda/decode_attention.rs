//! Decode attention: which kernel runs the decode rows of a batch (one query token a
//! sequence) and how it is launched. `decode_mma.cu`'s tensor-core kernels where the head dim
//! has one (over an FP8 cache, where no context is split, by persistent warps,
//! `decode_mma_warps.cu`), else the
//! vectorized or the warp-per-key kernel of `attention.cu`; each token's keys split over
//! several blocks, merged by `attention_combine`, when the batch alone would leave the device
//! idle.

use super::launch::PushArg;
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::attention::{CacheArgs, kernel_for};
use super::{CudaBackend, CudaBatch, CudaKvCache, CudaTensor, kernels, shape_err};
use crate::backend::{AttentionShape, BackendError};
use crate::kv_cache::{KvDType, KvLayout};

/// K/V bytes of one KV head a decode attention split reads at least: see
/// `CudaBackend::attn_split_keys`.
const ATTN_SPLIT_BYTES: usize = 16 << 10;

/// Fewest keys per split of the tensor-core decode attention (`decode_mma.cu`), whose splits
/// are whole 64-key tiles: two tiles, so that each split has a copy in flight while it works
/// on the first (`TANDEM_ATTN_SPLIT_KEYS` overrides it, never below one tile).
const DECODE_MMA_SPLIT_KEYS: usize = 128;

/// A decode attention kernel and its launch shape ([`CudaBackend::decode_kernel`]): every one
/// takes `attention.cu`'s arguments, one block per token, KV head and `heads_per_block` query
/// heads of its group, and split over the context by `split_keys` keys at least.
struct DecodeLaunch<'a> {
    kernel: &'a cudarc::driver::CudaFunction,
    /// Query heads per block.
    heads_per_block: usize,
    /// Dynamic shared memory of a block.
    shared_mem_bytes: usize,
    /// Fewest keys per split of the context.
    split_keys: usize,
    /// The kernel's persistent form, where there is one for this cache
    /// ([`CudaOptions::decode_persistent`](super::CudaOptions::decode_persistent)): it runs
    /// the launches whose contexts are not split.
    persistent: Option<&'a cudarc::driver::CudaFunction>,
}

/// Threads of a decode attention block (every decode kernel's).
const DECODE_THREADS: u32 = 128;

/// Query heads per block of the decode attention kernel (`ATTN_GMAX` in attention.cu).
const ATTN_GMAX: usize = 8;

impl CudaBackend {
    /// Fewest keys per split when a decode attention is split over the context to fill the
    /// device: each warp walks its share one key after another, so shorter splits mean shorter
    /// dependent chains, but more partial results to merge. 16 KiB of K/V per split (32 keys of
    /// head_dim 128, 64 of head_dim 64) was the best measured on an H100 at batch 1, context
    /// 1024: Llama-3.1-8B 6.45 ms with 128 keys, 6.30 with 64, 6.14-6.21 with 32, no better
    /// with 16; SmolLM2-135M 1.27 ms with 128 keys, 1.20-1.23 with 64, 1.34 with 32.
    fn attn_split_keys(&self, head_dim: usize) -> usize {
        self.options
            .attn_split_keys
            .unwrap_or((ATTN_SPLIT_BYTES / (4 * head_dim)).max(16))
    }

    /// The decode attention kernel for `shape`: the tensor-core kernel where the head dim has
    /// one (and [`CudaOptions::decode_mma`](super::CudaOptions::decode_mma) is on), else the
    /// vectorized kernel, else the warp-per-key one.
    fn decode_kernel(
        &self,
        shape: &AttentionShape,
        layout: &KvLayout,
    ) -> Result<DecodeLaunch<'_>, BackendError> {
        let dtype = layout.dtype;
        let split_keys = self.attn_split_keys(shape.head_dim);
        if dtype == KvDType::Fp8 {
            // An FP8 cache: the tensor-core kernel where the head dim has one (and it is on),
            // else the vectorized kernel, else the warp-per-key one.
            let fp8 = &self.kernels.fp8_attention;
            if let Some(kernel) = (fp8.decode_mma)
                .for_shape(shape.head_dim, layout.block_size)
                .filter(|_| self.switches.decode_mma())
            {
                let whole_tiles = layout
                    .block_size
                    .is_multiple_of(kernels::DecodeMmaConfig::KEYS);
                let persistent = kernel_for(&fp8.decode_mma_warps, shape.head_dim)
                    .filter(|_| whole_tiles && self.options.decode_persistent);
                return Ok(DecodeLaunch {
                    kernel,
                    heads_per_block: kernels::DecodeMmaConfig::HEADS,
                    shared_mem_bytes: self
                        .kernels
                        .decode_mma_config
                        .smem_bytes_fp8(shape.head_dim),
                    split_keys: self
                        .options
                        .attn_split_keys
                        .unwrap_or(DECODE_MMA_SPLIT_KEYS)
                        .max(kernels::DecodeMmaConfig::KEYS),
                    persistent,
                });
            }
            let launch = kernel_for(&fp8.decode_vec, shape.head_dim)
                .map(|kernel| (kernel, kernels::ATTN_VEC_HEADS))
                .or_else(|| kernel_for(&fp8.decode, shape.head_dim).map(|k| (k, ATTN_GMAX)));
            let Some((kernel, heads_per_block)) = launch else {
                let dims: Vec<usize> = (fp8.decode_vec.iter().chain(&fp8.decode))
                    .map(|(d, _)| *d)
                    .collect();
                return Err(shape_err(
                    "paged_attention",
                    format!(
                        "head_dim {} over an FP8 cache (its CUDA kernels cover {dims:?})",
                        shape.head_dim
                    ),
                ));
            };
            return Ok(DecodeLaunch {
                kernel,
                heads_per_block,
                shared_mem_bytes: 0,
                split_keys,
                persistent: None,
            });
        }
        // The tensor-core kernel where the head dim has one, else the vectorized kernel, else
        // the warp-per-key one: (kernel, query heads per block, dynamic shared memory, fewest
        // keys per split).
        let mma = (self.kernels.paged_decode_mma)
            .for_shape(shape.head_dim, layout.block_size)
            .filter(|_| self.switches.decode_mma())
            .map(|kernel| {
                let config = self.kernels.decode_mma_config;
                (
                    kernel,
                    kernels::DecodeMmaConfig::HEADS,
                    config.smem_bytes(shape.head_dim),
                    self.options
                        .attn_split_keys
                        .unwrap_or(DECODE_MMA_SPLIT_KEYS)
                        .max(kernels::DecodeMmaConfig::KEYS),
                )
            });
        let vectorized = kernel_for(&self.kernels.paged_attention_vec, shape.head_dim)
            .filter(|_| self.options.vec_attention)
            .map(|kernel| (kernel, kernels::ATTN_VEC_HEADS, 0, split_keys));
        let Some((kernel, heads_per_block, shared_mem_bytes, split_keys)) =
            mma.or(vectorized).or_else(|| {
                kernel_for(&self.kernels.paged_attention, shape.head_dim)
                    .map(|k| (k, ATTN_GMAX, 0, split_keys))
            })
        else {
            let dims: Vec<usize> = self
                .kernels
                .paged_attention
                .iter()
                .map(|(d, _)| *d)
                .collect();
            return Err(shape_err(
                "paged_attention",
                format!(
                    "head_dim {} (the CUDA kernels cover {dims:?})",
                    shape.head_dim
                ),
            ));
        };
        Ok(DecodeLaunch {
            kernel,
            heads_per_block,
            shared_mem_bytes,
            split_keys,
            persistent: None,
        })
    }

    /// Decode attention (one query token per sequence) of token rows `0..rows` of `batch`,
    /// into those rows of `out`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_attention(
        &self,
        qkv: &CudaTensor,
        out: &mut CudaSlice<u16>,
        rows: usize,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        let DecodeLaunch {
            kernel,
            heads_per_block,
            shared_mem_bytes,
            split_keys,
            persistent,
        } = self.decode_kernel(shape, &kv.layout)?;
        let layout = kv.layout;
        let q = qkv.as_f32("paged_attention")?;
        // One block per token, KV head and chunk of `heads_per_block` query heads; long contexts
        // are split over several blocks when the batch alone would leave most multiprocessors
        // idle.
        let group = shape.num_heads / shape.num_kv_heads;
        let head_blocks = shape.num_kv_heads * group.div_ceil(heads_per_block);
        let blocks = rows * head_blocks;
        let target = 2 * self.multiprocessors;
        let splits = if blocks >= target || batch.max_context <= 256 {
            1
        } else {
            target
                .div_ceil(blocks)
                .min(batch.max_context.div_ceil(split_keys))
                .clamp(1, 64)
        };
        let persistent = persistent.filter(|_| splits == 1);
        let heads_total = rows * shape.num_heads;
        let partial_acc = self.alloc_f32(if splits > 1 {
            heads_total * splits * shape.head_dim
        } else {
            1
        })?;
        let partial_ml = self.alloc_f32(if splits > 1 {
            heads_total * splits * 2
        } else {
            1
        })?;
        let cache = CacheArgs::new(shape, &layout, layer);
        let pf = self.take_prefetch(rows);
        let (kernel, cfg, op) = match persistent {
            Some(kernel) => (
                kernel,
                self.persistent_decode_config(kernel, rows, head_blocks, shape)?,
                "paged_attention_warps",
            ),
            None => (
                kernel,
                LaunchConfig {
                    grid_dim: (rows as u32, head_blocks as u32, splits as u32),
                    block_dim: (DECODE_THREADS, 1, 1),
                    shared_mem_bytes: shared_mem_bytes as u32,
                },
                "paged_attention",
            ),
        };
        // The persistent kernel also takes the token rows.
        let rows_arg = rows as i32;
        let mut b = self.kernel_args(kernel);
        b.arg(q)
            .arg(&*kv.data)
            .arg(batch.positions())
            .arg(batch.token_seq())
            .arg(batch.seq_block_start())
            .arg(batch.block_tables())
            .arg(&mut *out)
            .arg(&partial_acc)
            .arg(&partial_ml)
            .arg(&cache.heads)
            .arg(&cache.kv_heads)
            .arg(&cache.block_size)
            .arg(&cache.block_elems)
            .arg(&cache.layer_offset)
            .arg(&shape.scale)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        if persistent.is_some() {
            b.arg(&rows_arg);
        }
        self.launch(b, cfg, op)?;
        if splits > 1 {
            let (dim, s) = (shape.head_dim as i32, splits as i32);
            let mut b = self.kernel_args(&self.kernels.attention_combine);
            b.arg(&partial_acc)
                .arg(&partial_ml)
                .arg(out)
                .arg(&dim)
                .arg(&s);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, shape.num_heads as u32, 1),
                block_dim: (shape.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(b, cfg, "attention_combine")?;
        }
        Ok(())
    }

    /// The launch of the persistent FP8 decode attention over `rows` tokens of `head_blocks`
    /// items each: as many blocks as the multiprocessors hold at once, no more than the items
    /// need (or the
    /// [`CudaOptions::decode_persistent_blocks`](super::CudaOptions::decode_persistent_blocks)
    /// cap), each warp walking every n-th (token, KV head, head chunk) item.
    fn persistent_decode_config(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        rows: usize,
        head_blocks: usize,
        shape: &AttentionShape,
    ) -> Result<LaunchConfig, BackendError> {
        let smem = self
            .kernels
            .decode_mma_config
            .smem_bytes_fp8_warps(shape.head_dim);
        let per_multiprocessor = self.persistent_occupancy(kernel, shape.head_dim, smem)?;
        let blocks = (rows * head_blocks)
            .div_ceil(kernels::DecodeMmaConfig::WARPS)
            .min((per_multiprocessor * self.multiprocessors).max(1))
            .min(self.options.decode_persistent_blocks.unwrap_or(usize::MAX))
            .max(1);
        Ok(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }

    /// Blocks of [`DECODE_THREADS`] threads and `smem` bytes of dynamic shared memory that one
    /// multiprocessor holds at once running the persistent decode attention `kernel` of
    /// `head_dim`: asked of the driver once per shape.
    fn persistent_occupancy(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        head_dim: usize,
        smem: usize,
    ) -> Result<usize, BackendError> {
        let key = OccupancyKey { head_dim, smem };
        let mut known = self
            .persistent_occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&(_, blocks)) = known.iter().find(|(k, _)| *k == key) {
            return Ok(blocks);
        }
        let blocks = dev!(
            "occupancy of a persistent decode attention",
            kernel.occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, smem, None)
        )? as usize;
        tracing::debug!(
            kernel = "paged_decode_mma_fp8_warps",
            head_dim,
            smem,
            blocks,
            "blocks a multiprocessor holds"
        );
        known.push((key, blocks));
        Ok(blocks)
    }
}

/// The persistent decode kernel's shape, by which the driver's occupancy is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OccupancyKey {
    head_dim: usize,
    smem: usize,
}
