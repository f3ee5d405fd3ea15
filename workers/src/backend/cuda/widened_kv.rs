//! A bf16 copy of the FP8 cache blocks a prefill batch reads, one layer at a time, so that the
//! warpgroup prefill kernel (`flash_wgmma.cu`, bf16 tiles through TMA) runs over an FP8 cache
//! too. `flash.cu`'s FP8 kernel widens codes as it loads them but runs on `mma.sync`, about
//! three times the warpgroup kernel's time at 2,048 tokens on an H100; widening the blocks
//! first costs one pass over them (a few microseconds a layer) and the products are the same:
//! e4m3 values are bf16 values.
//!
//! The copy lives as long as the backend and grows to the largest batch seen (the
//! stream-ordered allocator keeps what the warm-up step took out of the KV cache's share), up
//! to [`WIDENED_KV_MAX_BYTES`]; a batch that needs more, or whose copy cannot be allocated,
//! runs the FP8 kernel instead.

use std::sync::{Mutex, MutexGuard};

use super::launch::{KernelArgs, PushArg};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig};

use super::{CudaBackend, CudaBatch, CudaKvCache};
use crate::backend::BackendError;
use crate::kv_cache::{KvDType, KvLayout};

/// The most memory the copy may take: 256 MiB, the K/V of one layer of 65,536 tokens of
/// Llama-3.1-8B's shapes (8 KV heads of 128 dims).
pub(super) const WIDENED_KV_MAX_BYTES: usize = 256 << 20;

/// The copy: `capacity` blocks of one layer of `layout` (K then V), bf16, with its TMA tensor
/// map in device memory.
pub(super) struct WidenedKv {
    pub(super) data: CudaSlice<u16>,
    pub(super) tensor_map: CudaSlice<u64>,
    pub(super) layout: KvLayout,
    capacity: usize,
}

/// The backend's copy, made at the first prefill over an FP8 cache that wants one.
#[derive(Default)]
pub(super) struct WidenedKvSlot(Mutex<Option<WidenedKv>>);

/// The one-layer bf16 layout a copy of `layout`'s blocks has.
fn one_layer(layout: &KvLayout) -> KvLayout {
    KvLayout {
        num_layers: 1,
        dtype: KvDType::Bf16,
        ..*layout
    }
}

impl CudaBackend {
    /// The copy, holding room for `batch`'s prefill blocks of `kv`'s layout, or `None` where
    /// it would pass [`WIDENED_KV_MAX_BYTES`], cannot be allocated, or has no tensor map (the
    /// warpgroup kernel copies its tiles with one).
    pub(super) fn widened_kv(
        &self,
        kv: &CudaKvCache,
        batch: &CudaBatch,
    ) -> Option<MutexGuard<'_, Option<WidenedKv>>> {
        let layout = one_layer(&kv.layout);
        let blocks = batch.num_prefill_blocks;
        if blocks == 0 || blocks * layout.block_elems() * 2 > WIDENED_KV_MAX_BYTES {
            return None;
        }
        let mut slot = self.widened.0.lock().unwrap_or_else(|e| e.into_inner());
        let fits = slot
            .as_ref()
            .is_some_and(|w| w.layout == layout && w.capacity >= blocks);
        if !fits {
            // Room for the batch and a quarter more, so that a growing load grows it rarely.
            let max_blocks = WIDENED_KV_MAX_BYTES / (layout.block_elems() * 2);
            let capacity = (blocks + blocks / 4).min(max_blocks);
            *slot = None;
            match self.alloc_widened(&layout, capacity) {
                Ok(copy) => *slot = copy,
                Err(e) => {
                    tracing::warn!(
                        blocks = capacity,
                        "no bf16 copy of the FP8 cache for the warpgroup prefill kernel \
                         ({e}): prefill attention runs the FP8 kernel"
                    );
                }
            }
        }
        slot.is_some().then_some(slot)
    }

    fn alloc_widened(
        &self,
        layout: &KvLayout,
        capacity: usize,
    ) -> Result<Option<WidenedKv>, BackendError> {
        // SAFETY: every block the prefill kernel reads is written by `widen_blocks` first.
        let data = dev!("widened KV copy", unsafe {
            self.stream.alloc::<u16>(capacity * layout.block_elems())
        })?;
        let Some(map) = self.kv_tensor_map(layout, capacity, &data) else {
            return Ok(None);
        };
        let tensor_map = dev!("widened KV copy", self.stream.clone_htod(&map))?;
        Ok(Some(WidenedKv {
            data,
            tensor_map,
            layout: *layout,
            capacity,
        }))
    }

    /// Widens `layer`'s K/V of `batch`'s prefill blocks of the FP8 cache `kv` into `copy`, on
    /// `stream`.
    pub(super) fn widen_blocks(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        copy: &mut WidenedKv,
        kv: &CudaKvCache,
        batch: &CudaBatch,
        layer: usize,
    ) -> Result<(), BackendError> {
        let layout = kv.layout;
        let layer_elems = copy.layout.block_elems() as i64;
        let block_elems = layout.block_elems() as i64;
        let layer_offset = layout.offset(layer, 0, 0) as i64;
        let blocks = batch.num_prefill_blocks as i32;
        let mut b = KernelArgs::new(stream, &self.kernels.fp8_attention.widen_blocks);
        b.arg(&*kv.data)
            .arg(batch.prefill_blocks())
            .arg(&blocks)
            .arg(&mut copy.data)
            .arg(&block_elems)
            .arg(&layer_offset)
            .arg(&layer_elems);
        let threads = 256u32;
        let chunks = (layer_elems as u32 / 8).div_ceil(threads).max(1);
        let cfg = LaunchConfig {
            grid_dim: (chunks, (blocks as u32).clamp(1, 65_535), 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(b, cfg, "widen_fp8_kv_blocks")
    }
}
