//! The CPU's paged KV cache: `num_blocks` blocks of a [`KvLayout`] in one host allocation.
//!
//! Element type: f32 for f32 models (so parity with a float32 reference is not limited by the
//! cache), bf16 for bf16 models (half the memory and bytes read per attention step), f16 for f16
//! models; the model picks (see `ModelOptions`) unless asked for FP8 (`--kv-cache-dtype fp8`). Blocks are contiguous byte ranges, which is
//! what KV transfer registers and reads: the allocation ends with the export slab
//! ([`KvCacheMemory`]), and a context worker registers the whole of it with UCX once so
//! decode workers read a prompt's blocks straight out of it.
//!
//! Those reads happen outside the engine's borrows of the cache (UCX's progress thread, or
//! another process through a shared mapping), while the engine runs forward passes: they are
//! sound because they only ever touch blocks pinned for an export, which the engine neither
//! writes nor frees until the export is released, and the slab, which the model never
//! touches.

use float8::F8E4M3;
use half::{bf16, f16};

use super::CpuBackend;
use crate::backend::{
    Backend, BackendError, EXPORT_SLOT_BYTES, HostRange, KvBlockIo, KvBytes, KvBytesMut,
    KvCacheMemory, KvMemory,
};
use crate::kv_cache::{KvDType, KvLayout};

/// Storage of the cache, by element type.
#[derive(Debug)]
pub enum KvData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Fp8(Vec<F8E4M3>),
}

#[derive(Debug)]
pub struct CpuKvCache {
    layout: KvLayout,
    num_blocks: usize,
    data: KvData,
    /// The allocation's first byte, taken when it was made (its heap buffer never moves).
    base: usize,
}

fn zeroed<T: Clone>(
    elems: usize,
    zero: T,
    too_large: impl Fn() -> BackendError,
) -> Result<Vec<T>, BackendError> {
    let mut v = Vec::new();
    v.try_reserve_exact(elems).map_err(|_| too_large())?;
    v.resize(elems, zero);
    Ok(v)
}

/// Bytes of a plain-data slice.
fn bytes_of<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: f32/bf16/f16/FP8 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Copy>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: f32/bf16/f16/FP8 have no padding and every byte pattern is a valid value of them.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

impl CpuKvCache {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<Self, BackendError> {
        let too_large = || BackendError::KvCacheTooLarge {
            num_blocks,
            block_bytes: layout.block_bytes(),
        };
        // The blocks, then the export slab (a whole number of elements of any dtype).
        let slab_elems = num_blocks * EXPORT_SLOT_BYTES / layout.dtype.size_bytes();
        let elems = layout
            .block_elems()
            .checked_mul(num_blocks)
            .and_then(|blocks| blocks.checked_add(slab_elems))
            .ok_or_else(too_large)?;
        let mut data = match layout.dtype {
            KvDType::F32 => KvData::F32(zeroed(elems, 0.0, too_large)?),
            KvDType::Bf16 => KvData::Bf16(zeroed(elems, bf16::ZERO, too_large)?),
            KvDType::F16 => KvData::F16(zeroed(elems, f16::ZERO, too_large)?),
            KvDType::Fp8 => KvData::Fp8(zeroed(elems, F8E4M3::ZERO, too_large)?),
        };
        let base = match &mut data {
            KvData::F32(v) => v.as_mut_ptr() as usize,
            KvData::Bf16(v) => v.as_mut_ptr() as usize,
            KvData::F16(v) => v.as_mut_ptr() as usize,
            KvData::Fp8(v) => v.as_mut_ptr() as usize,
        };
        Ok(CpuKvCache {
            layout,
            num_blocks,
            data,
            base,
        })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn data(&self) -> &KvData {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut KvData {
        &mut self.data
    }

    /// Where the cache lies: its blocks, then the export slab.
    pub fn memory(&self) -> KvCacheMemory {
        let block_bytes = self.layout.block_bytes();
        KvCacheMemory {
            memory: KvMemory::Host(HostRange {
                ptr: self.base as *mut u8,
                len: self.all_bytes().len(),
            }),
            block_bytes,
            num_blocks: self.num_blocks,
            slab_offset: self.num_blocks * block_bytes,
        }
    }

    fn check_block(&self, block: u32) -> Result<std::ops::Range<usize>, BackendError> {
        if block as usize >= self.num_blocks {
            return Err(BackendError::BlockOutOfRange {
                block,
                num_blocks: self.num_blocks,
            });
        }
        let bytes = self.layout.block_bytes();
        Ok(block as usize * bytes..(block as usize + 1) * bytes)
    }

    /// The bytes of one block (a contiguous region: what KV transfer reads or registers).
    pub fn block_bytes(&self, block: u32) -> Result<&[u8], BackendError> {
        let range = self.check_block(block)?;
        Ok(&self.all_bytes()[range])
    }

    /// The bytes of one block, writable.
    pub fn block_bytes_mut(&mut self, block: u32) -> Result<&mut [u8], BackendError> {
        let range = self.check_block(block)?;
        Ok(&mut self.all_bytes_mut()[range])
    }

    fn all_bytes(&self) -> &[u8] {
        match &self.data {
            KvData::F32(v) => bytes_of(v),
            KvData::Bf16(v) => bytes_of(v),
            KvData::F16(v) => bytes_of(v),
            KvData::Fp8(v) => bytes_of(v),
        }
    }

    fn all_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            KvData::F32(v) => bytes_of_mut(v),
            KvData::Bf16(v) => bytes_of_mut(v),
            KvData::F16(v) => bytes_of_mut(v),
            KvData::Fp8(v) => bytes_of_mut(v),
        }
    }

    pub fn read_block(&self, block: u32, dst: &mut [u8]) -> Result<(), BackendError> {
        let src = self.block_bytes(block)?;
        if dst.len() != src.len() {
            return Err(BackendError::Shape {
                op: "read_kv_block",
                detail: format!("buffer of {} bytes for a block of {}", dst.len(), src.len()),
            });
        }
        dst.copy_from_slice(src);
        Ok(())
    }

    pub fn write_block(&mut self, block: u32, src: &[u8]) -> Result<(), BackendError> {
        let dst = self.block_bytes_mut(block)?;
        if dst.len() != src.len() {
            return Err(BackendError::Shape {
                op: "write_kv_block",
                detail: format!("{} bytes for a block of {}", src.len(), dst.len()),
            });
        }
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// Block after block; the cache is host memory, so there is nothing to pin, and memory of a
/// device is refused.
impl KvBlockIo for CpuBackend {
    fn kv_cache_memory(&self, kv: &CpuKvCache) -> Option<KvCacheMemory> {
        Some(kv.memory())
    }

    fn read_kv_blocks(
        &self,
        kv: &CpuKvCache,
        blocks: &[u32],
        dst: KvBytesMut<'_>,
    ) -> Result<(), BackendError> {
        let KvBytesMut::Host(dst) = dst else {
            return Err(self.no_device_memory("read KV blocks to device memory"));
        };
        let block_bytes = kv.layout.block_bytes();
        for (&block, chunk) in blocks.iter().zip(dst.chunks_exact_mut(block_bytes)) {
            kv.read_block(block, chunk)?;
        }
        Ok(())
    }

    fn write_kv_blocks(
        &self,
        kv: &mut CpuKvCache,
        blocks: &[u32],
        src: KvBytes<'_>,
    ) -> Result<(), BackendError> {
        let KvBytes::Host(src) = src else {
            return Err(self.no_device_memory("write KV blocks from device memory"));
        };
        let block_bytes = kv.layout.block_bytes();
        for (&block, chunk) in blocks.iter().zip(src.chunks_exact(block_bytes)) {
            kv.write_block(block, chunk)?;
        }
        Ok(())
    }
}

impl CpuBackend {
    fn no_device_memory(&self, op: &'static str) -> BackendError {
        BackendError::Device {
            op,
            detail: format!("the {} backend has no device memory", self.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_stay_in_range() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 3,
            dtype: KvDType::Bf16,
        };
        let mut kv = CpuKvCache::new(layout, 4).unwrap();
        let bytes: Vec<u8> = (0..layout.block_bytes()).map(|i| i as u8).collect();
        kv.write_block(2, &bytes).unwrap();
        let mut back = vec![0u8; layout.block_bytes()];
        kv.read_block(2, &mut back).unwrap();
        assert_eq!(back, bytes);
        kv.read_block(1, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "neighbouring block untouched");
        assert!(matches!(
            kv.read_block(4, &mut back),
            Err(BackendError::BlockOutOfRange { block: 4, .. })
        ));
        assert!(kv.write_block(0, &bytes[1..]).is_err());
    }

    #[test]
    fn the_cache_describes_its_blocks_and_an_untouched_export_slab_after_them() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 3,
            dtype: KvDType::Bf16,
        };
        let mut kv = CpuKvCache::new(layout, 4).unwrap();
        let memory = kv.memory();
        let KvMemory::Host(range) = memory.memory else {
            panic!("a CPU cache is host memory");
        };
        assert_eq!(memory.num_blocks, 4);
        assert_eq!(memory.slab_offset, 4 * layout.block_bytes());
        assert_eq!(range.len, memory.slab_offset + memory.slab_bytes());
        assert_eq!(
            memory.slot_offset(3),
            memory.slab_offset + 3 * EXPORT_SLOT_BYTES
        );
        let bytes: Vec<u8> = (0..layout.block_bytes()).map(|i| i as u8 | 1).collect();
        for block in 0..4 {
            kv.write_block(block, &bytes).unwrap();
        }
        // SAFETY: the range is the cache's allocation, alive while `kv` is.
        let all = unsafe { std::slice::from_raw_parts(range.ptr, range.len) };
        assert_eq!(&all[memory.block_offset(2)..][..bytes.len()], &bytes[..]);
        assert!(
            all[memory.slab_offset..].iter().all(|&b| b == 0),
            "writing every block leaves the slab alone"
        );
    }

    #[test]
    fn the_backend_copies_blocks_in_order_and_refuses_device_memory() {
        let backend = CpuBackend::new(&Default::default()).unwrap();
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            dtype: KvDType::F32,
        };
        let mut kv = backend.alloc_kv_cache(&layout, 4).unwrap();
        let bytes: Vec<u8> = (0..2 * layout.block_bytes()).map(|i| i as u8).collect();
        backend
            .write_kv_blocks(&mut kv, &[3, 1], KvBytes::Host(&bytes))
            .unwrap();
        let mut back = vec![0u8; bytes.len()];
        backend
            .read_kv_blocks(&kv, &[3, 1], KvBytesMut::Host(&mut back))
            .unwrap();
        assert_eq!(back, bytes);
        backend
            .read_kv_blocks(&kv, &[1, 3], KvBytesMut::Host(&mut back))
            .unwrap();
        assert_eq!(back[..layout.block_bytes()], bytes[layout.block_bytes()..]);

        let device = crate::backend::DeviceRange {
            ptr: 0x1000,
            len: bytes.len(),
        };
        let err = backend
            .read_kv_blocks(&kv, &[3, 1], KvBytesMut::Device(device))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no device memory"), "{err}");
        let err = backend
            .write_kv_blocks(&mut kv, &[3, 1], KvBytes::Device(device))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no device memory"), "{err}");
        let range = crate::backend::HostRange {
            ptr: back.as_mut_ptr(),
            len: back.len(),
        };
        // SAFETY: the CPU backend pins nothing, so keeps no reference to the range.
        let pinned = unsafe { backend.pin_host_memory(range) }.unwrap();
        assert!(!pinned, "a host backend has nothing to pin");
    }
}
