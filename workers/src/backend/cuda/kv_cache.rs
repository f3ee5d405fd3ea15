//! The paged KV cache in device memory: its allocation (one `cuMemAlloc`, shareable through
//! CUDA IPC), copies of whole blocks on the device and to or from transfers ([`KvBlockIo`]).

use super::launch::PushArg;
use cudarc::driver::LaunchConfig;

use super::{CudaBackend, CudaKvCache, device_error, shape_err, staging};
use crate::backend::{
    BackendError, DeviceRange, EXPORT_SLOT_BYTES, HostRange, KvBlockIo, KvBytes, KvBytesMut,
    KvCacheMemory,
};
use crate::kv_cache::{KvDType, KvLayout};

impl CudaBackend {
    /// Copies KV block `src` over block `dst` on the device (prefix reuse, benchmarks).
    pub fn copy_kv_block(
        &self,
        kv: &mut CudaKvCache,
        src: u32,
        dst: u32,
    ) -> Result<(), BackendError> {
        let bytes = kv.layout.block_bytes();
        kv.block_range(src, bytes)?;
        kv.block_range(dst, bytes)?;
        let from = kv.block_address(&self.stream, src);
        let to = kv.block_address(&self.stream, dst);
        // SAFETY: both ranges are inside the cache's allocation (checked above) and distinct
        // or identical blocks (a copy onto itself is a no-op for the copy engine).
        dev!("copy KV block", unsafe {
            cudarc::driver::result::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream())
        })
    }

    /// Copies one block's bytes out of the cache, one synchronous copy through pageable
    /// memory: what the batched copies ([`KvBlockIo`]) are measured and tested against.
    pub fn read_kv_block(
        &self,
        kv: &CudaKvCache,
        block: u32,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let range = kv.block_range(block, dst.len())?;
        let mut host = vec![0u16; range.len()];
        dev!(
            "read KV block",
            self.stream.memcpy_dtoh(&kv.data.slice(range), &mut host)
        )?;
        for (d, v) in dst.chunks_exact_mut(2).zip(&host) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Overwrites one block with `src`, as [`Self::read_kv_block`] reads it.
    pub fn write_kv_block(
        &self,
        kv: &mut CudaKvCache,
        block: u32,
        src: &[u8],
    ) -> Result<(), BackendError> {
        let range = kv.block_range(block, src.len())?;
        let host: Vec<u16> = src
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        dev!(
            "write KV block",
            self.stream
                .memcpy_htod(&host, &mut kv.data.slice_mut(range))
        )?;
        // The host vector is dropped when this returns: wait for the copy to read it.
        self.synchronize()
    }

    /// Copies `blocks` between `kv` and device memory `range` (the blocks back to back) in
    /// one launch of `copy_kv_blocks`, and waits: the range is a transfer's (a CUDA IPC
    /// export or pull), handed on or back to its pool as soon as this returns. One copy per
    /// block instead costs a few microseconds each (SmolLM2's 0.37 MB blocks moved at 80 GB/s
    /// that way on an H100).
    fn copy_kv_blocks_on_device(
        &self,
        kv: &CudaKvCache,
        blocks: &[u32],
        range: DeviceRange,
        to_range: bool,
    ) -> Result<(), BackendError> {
        let op = if to_range {
            "read KV blocks to device memory"
        } else {
            "write KV blocks from device memory"
        };
        let block_bytes = staging::check(op, kv, blocks, range.len)?;
        if blocks.is_empty() {
            return Ok(());
        }
        if !block_bytes.is_multiple_of(16) || !range.ptr.is_multiple_of(16) {
            return Err(shape_err(
                op,
                format!(
                    "{block_bytes}-byte blocks at {:#x} are not 16-byte aligned",
                    range.ptr
                ),
            ));
        }
        let table = dev!("copy KV blocks", self.stream.clone_htod(blocks))?;
        let cache = kv.block_address(&self.stream, 0);
        let (count, vecs, to) = (
            blocks.len() as i32,
            (block_bytes / 16) as i64,
            i32::from(to_range),
        );
        let mut b = self.kernel_args(&self.kernels.copy_kv_blocks);
        b.arg(&cache)
            .arg(&range.ptr)
            .arg(&table)
            .arg(&count)
            .arg(&vecs)
            .arg(&to);
        // Enough blocks to keep every SM's memory pipes busy; each walks its share of a block.
        let per_block = (block_bytes / 16).div_ceil(256).clamp(1, 64) as u32;
        let cfg = LaunchConfig {
            grid_dim: (per_block, blocks.len().min(65_535) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(b, cfg, op)?;
        dev!("copy KV blocks", self.stream.synchronize())
    }
}

/// Host memory through the pinned staging buffer, or straight for a range pinned by
/// [`KvBlockIo::pin_host_memory`] (`staging.rs`); device memory in one `copy_kv_blocks` launch.
impl KvBlockIo for CudaBackend {
    fn kv_cache_memory(&self, kv: &CudaKvCache) -> Option<KvCacheMemory> {
        Some(kv.memory(&self.stream))
    }

    unsafe fn pin_host_memory(&self, range: HostRange) -> Result<bool, BackendError> {
        // SAFETY: the caller keeps the range mapped as long as this backend lives.
        unsafe { self.kv_staging.pin(&self.ctx, range) }?;
        Ok(true)
    }

    fn read_kv_blocks(
        &self,
        kv: &CudaKvCache,
        blocks: &[u32],
        dst: KvBytesMut<'_>,
    ) -> Result<(), BackendError> {
        match dst {
            KvBytesMut::Host(bytes) => {
                self.kv_staging
                    .read_blocks(&self.ctx, &self.stream, kv, blocks, bytes)
            }
            KvBytesMut::Device(range) => self.copy_kv_blocks_on_device(kv, blocks, range, true),
        }
    }

    fn write_kv_blocks(
        &self,
        kv: &mut CudaKvCache,
        blocks: &[u32],
        src: KvBytes<'_>,
    ) -> Result<(), BackendError> {
        match src {
            KvBytes::Host(bytes) => {
                self.kv_staging
                    .write_blocks(&self.ctx, &self.stream, kv, blocks, bytes)
            }
            KvBytes::Device(range) => self.copy_kv_blocks_on_device(kv, blocks, range, false),
        }
    }
}

impl CudaBackend {
    pub(super) fn allocate_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<CudaKvCache, BackendError> {
        match layout.dtype {
            KvDType::Bf16 => {}
            KvDType::Fp8 if self.compute_capability >= (8, 9) => {}
            KvDType::Fp8 => {
                let (major, minor) = self.compute_capability;
                return Err(BackendError::Device {
                    op: "CUDA KV cache",
                    detail: format!(
                        "an FP8 KV cache needs FP8 conversions, which {} (compute capability \
                         {major}.{minor}) lacks (8.9 or newer: Ada, Hopper, Blackwell): use \
                         --kv-cache-dtype auto (bf16) here",
                        self.name
                    ),
                });
            }
            dtype => {
                return Err(BackendError::UnsupportedKvDType {
                    op: "CUDA KV cache (bf16 or fp8)",
                    dtype,
                });
            }
        }
        // One block more than asked for: the scratch block CUDA-graph dummies write into
        // (`CudaKvCache::scratch_block`), which must lie inside the allocation; then the
        // export slab (`KvCacheMemory`).
        let too_large = || BackendError::KvCacheTooLarge {
            num_blocks,
            block_bytes: layout.block_bytes(),
        };
        // Counted in 16-bit words whatever the element type (blocks are a whole number of
        // them: K and V of a layer make every block's element count even).
        let slab_words = num_blocks * EXPORT_SLOT_BYTES / 2;
        let elems = (layout.block_bytes() / 2)
            .checked_mul(num_blocks + 1)
            .and_then(|blocks| blocks.checked_add(slab_words))
            .ok_or_else(too_large)?
            .max(1);
        self.ctx.bind_to_thread().map_err(|_| too_large())?;
        // Plain `cuMemAlloc`, not the stream-ordered allocator: CUDA IPC can share only such
        // memory, and a context worker hands the cache to decode workers of its host through
        // one IPC handle of it.
        // SAFETY: a fresh allocation, zeroed below before anything reads it.
        let ptr =
            unsafe { cudarc::driver::result::malloc_sync(elems * 2) }.map_err(|_| too_large())?;
        // SAFETY: `ptr` is the `elems * 2` bytes just allocated.
        if let Err(e) = unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, elems * 2) } {
            // SAFETY: allocated above, freed once.
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
            return Err(device_error("zeroing the KV cache", &e));
        }
        // SAFETY: `ptr` holds `elems` u16s; the cache frees it with `free_sync` (`Drop`).
        let data = unsafe { self.stream.upgrade_device_ptr::<u16>(ptr, elems) };
        // The warpgroup prefill kernel reads bf16 tiles only.
        let map = (layout.dtype == KvDType::Bf16)
            .then(|| self.kv_tensor_map(layout, num_blocks + 1, &data))
            .flatten();
        let has_tensor_map = map.is_some();
        let tensor_map = self
            .stream
            .clone_htod(&map.unwrap_or([0u64; 16]))
            .map_err(|e| device_error("KV cache tensor map", &e))?;
        Ok(CudaKvCache {
            layout: *layout,
            num_blocks,
            data: std::mem::ManuallyDrop::new(data),
            tensor_map,
            has_tensor_map,
        })
    }
}
