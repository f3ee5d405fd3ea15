//! Attention dispatch: which kernel runs a batch's attention and how it is launched. Prefill
//! chunks go to the tensor-core kernels (`flash.cu`, or `flash_wgmma.cu` on Hopper), decodes
//! to `decode_mma.cu`, the vectorized or the warp-per-key kernel (split over the context when
//! the batch alone leaves the device idle), a mixed batch's two halves on two streams where
//! [`CudaOptions::concurrent_attention`](super::CudaOptions::concurrent_attention) allows; and the rotary embedding that writes K/V into
//! the paged cache.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::tensor::DeviceData;
use super::{
    CudaBackend, CudaBatch, CudaKvCache, CudaTensor, kernels, rows_config, shape_err, tma,
};
use crate::backend::{AttentionShape, BackendError};
use crate::kv_cache::{KvDType, KvLayout};

/// K/V bytes of one KV head a decode attention split reads at least: see
/// `CudaBackend::attn_split_keys`.
const ATTN_SPLIT_BYTES: usize = 16 << 10;

/// Fewest keys per split of the tensor-core decode attention (`decode_mma.cu`), whose splits
/// are whole 64-key tiles: two tiles, so that each split has a copy in flight while it works
/// on the first (`TANDEM_ATTN_SPLIT_KEYS` overrides it, never below one tile).
const DECODE_MMA_SPLIT_KEYS: usize = 128;

/// A prefill attention kernel and its launch shape ([`CudaBackend::flash_kernel`]): every
/// one takes `flash.cu`'s arguments and covers a batch's 128-row tiles.
struct FlashLaunch<'a> {
    kernel: &'a cudarc::driver::CudaFunction,
    /// Query heads per block (the grid's y is heads / this).
    heads_per_block: usize,
    threads: u32,
    smem_bytes: u32,
    /// `flash_wgmma.cu`'s kernel, which also takes the cache's tensor map and the tile count.
    wgmma: bool,
    /// A block per multiprocessor walking the (tile, head) items (`WG_PERSISTENT`), instead of
    /// a block per item.
    persistent: bool,
}

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
    /// The kernel's persistent-block form, where there is one for this cache
    /// ([`CudaOptions::decode_persistent`](super::CudaOptions::decode_persistent)): it runs
    /// the launches whose contexts are not split.
    persistent: Option<&'a cudarc::driver::CudaFunction>,
}

/// The attention kernels' scalar arguments that locate `layer`'s K/V in the paged cache.
struct CacheArgs {
    heads: i32,
    kv_heads: i32,
    block_size: i32,
    block_elems: i64,
    layer_offset: i64,
}

impl CacheArgs {
    fn new(shape: &AttentionShape, layout: &KvLayout, layer: usize) -> Self {
        Self {
            heads: shape.num_heads as i32,
            kv_heads: shape.num_kv_heads as i32,
            block_size: layout.block_size as i32,
            block_elems: layout.block_elems() as i64,
            layer_offset: layout.offset(layer, 0, 0) as i64,
        }
    }
}

/// Where a prefill attention reads K/V: the paged cache itself, or a widened copy of its
/// prefill blocks ([`super::widened_kv`]) with the block tables that index the copy.
struct PrefillKv<'a> {
    data: &'a CudaSlice<u16>,
    block_tables: &'a u64,
    cache: CacheArgs,
    tensor_map: &'a CudaSlice<u64>,
    use_tma: bool,
}

/// Threads of a decode attention block (every decode kernel's).
const DECODE_THREADS: u32 = 128;

/// Query heads per block of the decode attention kernel (`ATTN_GMAX` in attention.cu).
const ATTN_GMAX: usize = 8;

/// The kernel of `list` (kernels by head dimension) for `head_dim`.
fn kernel_for(
    list: &[(usize, cudarc::driver::CudaFunction)],
    head_dim: usize,
) -> Option<&cudarc::driver::CudaFunction> {
    list.iter()
        .find(|(d, _)| *d == head_dim)
        .map(|(_, kernel)| kernel)
}

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

    /// The TMA tensor map `flash_wgmma.cu` copies K/V tiles with: the cache (`blocks` blocks
    /// of `layout` at `data`) as a 5-D tensor, innermost first [dimension, KV head, token,
    /// K/V of each layer, block], boxes of 64 dimensions of one head for a block's tokens, in
    /// the 128-byte swizzle. `None` where the warpgroup kernel is off or absent, or the layout
    /// does not fit it (head dim 128; a block of 8 to 64 tokens dividing its 64-key tiles).
    pub(super) fn kv_tensor_map(
        &self,
        layout: &KvLayout,
        blocks: usize,
        data: &CudaSlice<u16>,
    ) -> Option<[u64; 16]> {
        if !self.kv_tensor_map_fits(layout) {
            return None;
        }
        let bs = layout.block_size;
        let elem = 2u64;
        let dims = [
            layout.head_dim as u64,
            layout.num_kv_heads as u64,
            bs as u64,
            2 * layout.num_layers as u64,
            blocks as u64,
        ];
        let strides = [
            layout.head_dim as u64 * elem,
            layout.token_stride() as u64 * elem,
            layout.kv_stride() as u64 * elem,
            layout.block_elems() as u64 * elem,
        ];
        let (ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(data, &self.stream);
        tma::encode_bf16_swizzled(ptr, &dims, &strides, &[64, 1, bs as u32, 1, 1])
            .map_err(|result| {
                tracing::warn!(
                    ?result,
                    "no TMA tensor map of the KV cache: prefill attention copies by cp.async"
                )
            })
            .ok()
    }

    /// Whether the warpgroup kernel is there and `layout` fits its tensor map (head dim 128; a
    /// block of 8 to 64 tokens, a power of two, dividing its 64-key tiles).
    pub(super) fn kv_tensor_map_fits(&self, layout: &KvLayout) -> bool {
        let Some((_, config)) = self.kernels.flash_wgmma.as_ref() else {
            return false;
        };
        let bs = layout.block_size;
        layout.head_dim == 128
            && (8..=64).contains(&bs)
            && config.keys.is_multiple_of(bs)
            && bs.is_power_of_two()
    }

    /// The warpgroup prefill kernel's launch, for head dim 128 on Hopper with `flash_wgmma`
    /// on.
    fn wgmma_launch(&self, shape: &AttentionShape) -> Option<FlashLaunch<'_>> {
        let (kernel, config) = self.kernels.flash_wgmma.as_ref()?;
        (self.switches.flash_wgmma() && shape.head_dim == 128).then(|| FlashLaunch {
            kernel,
            heads_per_block: 1,
            threads: kernels::WgmmaFlashConfig::THREADS,
            smem_bytes: config.smem_bytes() as u32,
            wgmma: true,
            persistent: config.persistent,
        })
    }

    /// The prefill attention kernel for `shape` and how to launch it: the warpgroup kernel for
    /// head dim 128 on Hopper (`flash_wgmma` on); else `flash.cu`'s, with two heads of one KV
    /// head per block where the query group size is even (and `flash_head_pairs` is on), else
    /// one.
    fn flash_kernel(&self, shape: &AttentionShape, dtype: KvDType) -> Option<FlashLaunch<'_>> {
        let fp8 = dtype == KvDType::Fp8;
        if !fp8 && let Some(launch) = self.wgmma_launch(shape) {
            return Some(launch);
        }
        let group = shape.num_heads / shape.num_kv_heads;
        let (singles, pairs) = if fp8 {
            let k = &self.kernels.fp8_attention;
            (&k.flash_prefill, &k.flash_prefill_pairs)
        } else {
            (
                &self.kernels.flash_prefill,
                &self.kernels.flash_prefill_pairs,
            )
        };
        let (kernel, heads_per_block) =
            if self.options.flash_head_pairs && group.is_multiple_of(kernels::FLASH_PAIR_HEADS) {
                kernel_for(pairs, shape.head_dim).map(|k| (k, kernels::FLASH_PAIR_HEADS))
            } else {
                kernel_for(singles, shape.head_dim).map(|k| (k, 1))
            }?;
        Some(FlashLaunch {
            kernel,
            heads_per_block,
            threads: 128 * heads_per_block as u32,
            smem_bytes: self
                .kernels
                .flash_config
                .smem_bytes(shape.head_dim, heads_per_block) as u32,
            wgmma: false,
            persistent: false,
        })
    }

    /// Attention of the query rows the prefill tiles of `batch` cover, into their rows of
    /// `out`, on the tensor cores (`flash.cu`), reading K/V from `src`.
    #[allow(clippy::too_many_arguments)]
    fn flash_prefill(
        &self,
        stream: &Arc<CudaStream>,
        launch: FlashLaunch<'_>,
        qkv: &CudaTensor,
        out: &mut CudaSlice<u16>,
        batch: &CudaBatch,
        shape: &AttentionShape,
        src: PrefillKv<'_>,
    ) -> Result<(), BackendError> {
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let q = qkv.as_f32("flash_prefill")?;
        let cache = src.cache;
        let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
        let mut b = stream.launch_builder(launch.kernel);
        b.arg(q)
            .arg(src.data)
            .arg(batch.positions())
            .arg(batch.seq_token_start())
            .arg(batch.seq_token_count())
            .arg(batch.seq_block_start())
            .arg(src.block_tables)
            .arg(batch.tile_seq())
            .arg(batch.tile_row())
            .arg(out)
            .arg(&cache.heads)
            .arg(&cache.kv_heads)
            .arg(&cache.block_size)
            .arg(&cache.block_elems)
            .arg(&cache.layer_offset)
            .arg(&scale_log2);
        let use_tma = i32::from(src.use_tma);
        let num_tiles = batch.num_tiles as i32;
        if launch.wgmma {
            b.arg(src.tensor_map).arg(&use_tma).arg(&num_tiles);
        }
        let heads = (shape.num_heads / launch.heads_per_block) as u32;
        let items = batch.num_tiles as u32 * heads;
        let cfg = LaunchConfig {
            grid_dim: if launch.persistent {
                (items.min(self.multiprocessors as u32), 1, 1)
            } else {
                (batch.num_tiles as u32, heads, 1)
            },
            block_dim: (launch.threads, 1, 1),
            shared_mem_bytes: launch.smem_bytes,
        };
        self.launch(b, cfg, "flash_prefill")
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
                let persistent = kernel_for(&fp8.decode_mma_persistent, shape.head_dim)
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
    fn decode_attention(
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
                "paged_attention_persistent",
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
        let mut b = self.stream.launch_builder(kernel);
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
            let mut b = self.stream.launch_builder(&self.kernels.attention_combine);
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
}

impl CudaBackend {
    /// The launch of the persistent FP8 decode attention (`decode_mma_persistent.cu`) over
    /// `rows` tokens of `head_blocks` items each: as many blocks as the multiprocessors hold at
    /// once (or the
    /// [`CudaOptions::decode_persistent_blocks`](super::CudaOptions::decode_persistent_blocks)
    /// cap), each walking every `blocks`-th (token, KV head, head chunk) item.
    fn persistent_decode_config(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        rows: usize,
        head_blocks: usize,
        shape: &AttentionShape,
    ) -> Result<LaunchConfig, BackendError> {
        let group = shape.num_heads / shape.num_kv_heads;
        let smem =
            (self.kernels.decode_mma_config).smem_bytes_fp8_persistent(shape.head_dim, group);
        let per_multiprocessor =
            self.persistent_occupancy(kernel, shape.head_dim, DECODE_THREADS, smem)?;
        let blocks = (rows * head_blocks)
            .min((per_multiprocessor * self.multiprocessors).max(1))
            .min(self.options.decode_persistent_blocks.unwrap_or(usize::MAX))
            .max(1);
        Ok(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }

    /// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that one
    /// multiprocessor holds at once running `kernel`: asked of the driver once per shape.
    fn persistent_occupancy(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        head_dim: usize,
        threads: u32,
        smem: usize,
    ) -> Result<usize, BackendError> {
        let mut known = self
            .persistent_occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&(_, blocks)) = known.iter().find(|(key, _)| *key == (head_dim, smem)) {
            return Ok(blocks);
        }
        let blocks = dev!(
            "occupancy of paged_decode_mma_fp8_persistent",
            kernel.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
        )? as usize;
        known.push(((head_dim, smem), blocks));
        Ok(blocks)
    }
}

fn check_attention(
    qkv: &CudaTensor,
    batch: &CudaBatch,
    shape: &AttentionShape,
    kv: &CudaKvCache,
    layer: usize,
) -> Result<(), BackendError> {
    let layout = kv.layout;
    if qkv.cols != shape.qkv_width() || qkv.rows != batch.num_tokens {
        return Err(shape_err(
            "attention",
            format!(
                "qkv is {}x{}, expected {}x{}",
                qkv.rows,
                qkv.cols,
                batch.num_tokens,
                shape.qkv_width()
            ),
        ));
    }
    if layout.num_kv_heads != shape.num_kv_heads
        || layout.head_dim != shape.head_dim
        || layer >= layout.num_layers
        || layout.block_size != batch.block_size
        || batch.rope_half * 2 != shape.head_dim
        || shape.num_kv_heads == 0
        || !shape.num_heads.is_multiple_of(shape.num_kv_heads)
    {
        return Err(shape_err(
            "attention",
            format!("cache layout {layout:?} does not fit {shape:?}, layer {layer}"),
        ));
    }
    Ok(())
}

impl CudaBackend {
    pub(super) fn rope_and_write_cache(
        &self,
        qkv: &mut CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &mut CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        let layout = kv.layout;
        let rows = qkv.rows;
        // Rows written in bf16 (`project_qkv`) are widened into f32 rows by the kernel.
        let narrow = if let DeviceData::Bf16(_) = &qkv.data {
            let wide = DeviceData::F32(self.alloc_f32(rows * qkv.cols)?);
            Some(std::mem::replace(&mut qkv.data, wide))
        } else {
            None
        };
        let src: u64 = match &narrow {
            Some(DeviceData::Bf16(x)) => x.device_ptr(&self.stream).0,
            _ => 0,
        };
        let q = qkv.as_f32_mut("rope_and_cache_write")?;
        let (heads, kv_heads, dim, bs) = (
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
            layout.block_size as i32,
        );
        let block_elems = layout.block_elems() as i64;
        let layer_offset = layout.offset(layer, 0, 0) as i64;
        let pairs = (shape.num_heads + shape.num_kv_heads) * shape.head_dim / 2;
        let kernel = match layout.dtype {
            KvDType::Fp8 => &self.kernels.rope_cache_write_fp8,
            _ => &self.kernels.rope_cache_write,
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(q)
            .arg(batch.rope_cos())
            .arg(batch.rope_sin())
            .arg(batch.slot_mapping())
            .arg(&mut *kv.data)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&dim)
            .arg(&bs)
            .arg(&block_elems)
            .arg(&layer_offset)
            .arg(&src);
        self.launch(
            b,
            rows_config(rows, (pairs.next_multiple_of(32) as u32).clamp(32, 512)),
            "rope_cache_write",
        )?;
        // The bf16 rows are freed once the kernel that reads them has run (stream order).
        drop(narrow);
        Ok(())
    }

    pub(super) fn attention(
        &self,
        qkv: &CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<CudaTensor, BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        let width = shape.num_heads * shape.head_dim;
        let mut out = self.alloc_bf16(qkv.rows * width)?;
        // Over an FP8 cache, the warpgroup kernel reads a bf16 copy of the prefill blocks
        // where it can ([`CudaOptions::fp8_prefill_widen`](super::CudaOptions::fp8_prefill_widen)).
        let prefill = batch.num_tokens > batch.num_seqs;
        let mut widened = None;
        if prefill && kv.layout.dtype == KvDType::Fp8 && self.switches.fp8_prefill_widen() {
            widened = self
                .wgmma_launch(shape)
                .filter(|_| self.kv_tensor_map_fits(&kv.layout))
                .and_then(|launch| Some((launch, self.widened_kv(kv, batch)?)));
        }
        let flash = match widened {
            Some((launch, copy)) => Some((launch, Some(copy))),
            None if prefill => self.flash_kernel(shape, kv.layout.dtype).map(|l| (l, None)),
            None => None,
        };
        if let Some((flash, mut copy)) = flash {
            // Prefill chunks through the tensor-core kernel; the decodes batched with them
            // through the decode kernel, which reads each KV head's context once for its
            // whole query group (the prefill kernel would read it once per query head). With
            // a side stream the two run at once, each into its own rows of `out`.
            let side = self
                .side
                .as_ref()
                .filter(|_| batch.decode_rows > 0 && self.switches.concurrent_attention());
            let prefill_stream = match side {
                Some(side) => dev!("paged_attention", side.fork(&self.stream))?,
                None => &self.stream,
            };
            let src = match copy.as_deref_mut().and_then(Option::as_mut) {
                Some(copy) => {
                    self.widen_blocks(prefill_stream, copy, kv, batch, layer)?;
                    PrefillKv {
                        data: &copy.data,
                        block_tables: batch.prefill_tables(),
                        cache: CacheArgs::new(shape, &copy.layout, 0),
                        tensor_map: &copy.tensor_map,
                        use_tma: true,
                    }
                }
                None => PrefillKv {
                    data: &kv.data,
                    block_tables: batch.block_tables(),
                    cache: CacheArgs::new(shape, &kv.layout, layer),
                    tensor_map: &kv.tensor_map,
                    use_tma: kv.has_tensor_map,
                },
            };
            self.flash_prefill(prefill_stream, flash, qkv, &mut out, batch, shape, src)?;
            if batch.decode_rows > 0 {
                self.decode_attention(qkv, &mut out, batch.decode_rows, batch, shape, kv, layer)?;
            }
            if let Some(side) = side {
                dev!("paged_attention", side.join(&self.stream))?;
            }
        } else {
            self.decode_attention(qkv, &mut out, qkv.rows, batch, shape, kv, layer)?;
        }
        Ok(CudaTensor::from_bf16(qkv.rows, width, out))
    }
}
