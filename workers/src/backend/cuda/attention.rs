//! Attention dispatch: which kernel runs a batch's attention and how it is launched. Prefill
//! chunks go to the tensor-core kernels (`flash.cu`, or `flash_wgmma.cu` on Hopper), decodes
//! to [`super::decode_attention`], a mixed batch's two halves on two streams where
//! [`CudaOptions::concurrent_attention`](super::CudaOptions::concurrent_attention) allows; and
//! the rotary embedding that writes K/V into the paged cache.

use std::sync::{Arc, MutexGuard};

use super::launch::{KernelArgs, PushArg};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use super::tensor::{DeviceData, PrefillQuery};
use super::widened_kv::WidenedKv;
use super::{
    CudaBackend, CudaBatch, CudaKvCache, CudaTensor, kernels, rows_config, shape_err, tma,
};
use crate::backend::{AttentionShape, BackendError};
use crate::kv_cache::{KvDType, KvLayout};

/// Most shared memory `rope_cache_write` stages a row's f32 values in (the default limit of a
/// block without opting in): fused q/k/v rows of up to 12,288 values.
const ROPE_SHARED_MAX_BYTES: usize = 48 * 1024;

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

/// The attention kernels' scalar arguments that locate `layer`'s K/V in the paged cache.
pub(super) struct CacheArgs {
    pub(super) heads: i32,
    pub(super) kv_heads: i32,
    pub(super) block_size: i32,
    pub(super) block_elems: i64,
    pub(super) layer_offset: i64,
}

impl CacheArgs {
    pub(super) fn new(shape: &AttentionShape, layout: &KvLayout, layer: usize) -> Self {
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

/// The kernel of `list` (kernels by head dimension) for `head_dim`.
pub(super) fn kernel_for(
    list: &[(usize, cudarc::driver::CudaFunction)],
    head_dim: usize,
) -> Option<&cudarc::driver::CudaFunction> {
    list.iter()
        .find(|(d, _)| *d == head_dim)
        .map(|(_, kernel)| kernel)
}

impl CudaBackend {
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
        let mut b = KernelArgs::new(stream, launch.kernel);
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
        // The prefill rows' q in bf16 where rope wrote it so (null: f32 in `q`).
        let (q16, q16_first): (u64, i32) = match &qkv.prefill_q {
            Some(pq) => (pq.data.device_ptr(stream).0, pq.first_row as i32),
            None => (0, 0),
        };
        if launch.wgmma {
            b.arg(src.tensor_map)
                .arg(&use_tma)
                .arg(&num_tiles)
                .arg(&q16)
                .arg(&q16_first);
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
            // SAFETY of the allocation (`alloc_f32`): rotated in shared memory, rows keep only
            // q here, and nothing reads their k and v from it.
            let wide = DeviceData::F32(self.alloc_f32(rows * qkv.cols)?);
            Some(std::mem::replace(&mut qkv.data, wide))
        } else {
            None
        };
        let src: u64 = match &narrow {
            Some(DeviceData::Bf16(x)) => x.device_ptr(&self.stream).0,
            _ => 0,
        };
        let staged_bytes = qkv.cols * std::mem::size_of::<f32>();
        let staged =
            narrow.is_some() && self.options.rope_shared && staged_bytes <= ROPE_SHARED_MAX_BYTES;
        // The prefill rows' q in bf16, where the warpgroup kernel will read it.
        let q_width = shape.num_heads * shape.head_dim;
        let prefill_q = if staged
            && self.options.prefill_q_bf16
            && layout.dtype == KvDType::Fp8
            && rows > batch.decode_rows
            && self.wgmma_over_widened(shape, kv, batch).is_some()
        {
            Some(PrefillQuery {
                first_row: batch.decode_rows,
                data: self.alloc_bf16((rows - batch.decode_rows) * q_width)?,
            })
        } else {
            None
        };
        let (q16, q16_first): (u64, i32) = match &prefill_q {
            Some(pq) => (pq.data.device_ptr(&self.stream).0, pq.first_row as i32),
            None => (0, 0),
        };
        let q16_scale = shape.scale * std::f32::consts::LOG2_E;
        let staged_flag = i32::from(staged);
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
        let mut b = self.kernel_args(kernel);
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
            .arg(&src)
            .arg(&staged_flag)
            .arg(&q16)
            .arg(&q16_first)
            .arg(&q16_scale);
        let mut cfg = rows_config(rows, (pairs.next_multiple_of(32) as u32).clamp(32, 512));
        if staged {
            cfg.shared_mem_bytes = staged_bytes as u32;
        }
        let label = match (staged, &prefill_q) {
            (true, Some(_)) => "rope_cache_write_prefill_q_bf16",
            (true, None) => "rope_cache_write_shared",
            (false, _) => "rope_cache_write",
        };
        self.launch(b, cfg, label)?;
        // The bf16 rows are freed once the kernel that reads them has run (stream order).
        drop(narrow);
        qkv.prefill_q = prefill_q;
        Ok(())
    }

    /// The warpgroup kernel and the bf16 copy of the FP8 cache's prefill blocks it reads,
    /// where `batch`'s prefill attention runs so: a batch with prompt rows, over an FP8 cache
    /// whose layout fits the kernel's tensor map, with the copy allowed and allocated.
    fn wgmma_over_widened(
        &self,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        batch: &CudaBatch,
    ) -> Option<(FlashLaunch<'_>, MutexGuard<'_, Option<WidenedKv>>)> {
        let prefill = batch.num_tokens > batch.num_seqs;
        if !(prefill && kv.layout.dtype == KvDType::Fp8 && self.switches.fp8_prefill_widen()) {
            return None;
        }
        self.wgmma_launch(shape)
            .filter(|_| self.kv_tensor_map_fits(&kv.layout))
            .and_then(|launch| Some((launch, self.widened_kv(kv, batch)?)))
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
        let widened = self.wgmma_over_widened(shape, kv, batch);
        // Rope wrote the prefill rows' q for the warpgroup kernel alone only where this same
        // choice was made; the copy, once allocated for the batch, stays.
        if qkv.prefill_q.is_some() && widened.is_none() {
            return Err(shape_err(
                "attention",
                "the prefill rows' q was written in bf16 for the warpgroup kernel, which \
                 cannot run this batch"
                    .into(),
            ));
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
