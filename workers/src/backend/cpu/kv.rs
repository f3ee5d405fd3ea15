//! The CPU's paged KV cache: `num_blocks` blocks of a [`KvLayout`] in one host allocation.
//!
//! Element type: f32 for f32 models (so parity with a float32 reference is not limited by the
//! cache), bf16 for bf16 models (half the memory and bytes read per attention step), f16 for f16
//! models; the model picks (see `ModelOptions`). Blocks are contiguous byte ranges, which is
//! what KV transfer registers and reads.

use half::{bf16, f16};

use crate::backend::BackendError;
use crate::kv_cache::{KvDType, KvLayout};

/// Storage of the cache, by element type.
#[derive(Debug)]
pub enum KvData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

#[derive(Debug)]
pub struct CpuKvCache {
    layout: KvLayout,
    num_blocks: usize,
    data: KvData,
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
    // SAFETY: f32/bf16/f16 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Copy>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: f32/bf16/f16 have no padding and every byte pattern is a valid value of them.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

impl CpuKvCache {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<Self, BackendError> {
        let too_large = || BackendError::KvCacheTooLarge {
            num_blocks,
            block_bytes: layout.block_bytes(),
        };
        let elems = layout
            .block_elems()
            .checked_mul(num_blocks)
            .ok_or_else(too_large)?;
        let data = match layout.dtype {
            KvDType::F32 => KvData::F32(zeroed(elems, 0.0, too_large)?),
            KvDType::Bf16 => KvData::Bf16(zeroed(elems, bf16::ZERO, too_large)?),
            KvDType::F16 => KvData::F16(zeroed(elems, f16::ZERO, too_large)?),
        };
        Ok(CpuKvCache {
            layout,
            num_blocks,
            data,
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
        }
    }

    fn all_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            KvData::F32(v) => bytes_of_mut(v),
            KvData::Bf16(v) => bytes_of_mut(v),
            KvData::F16(v) => bytes_of_mut(v),
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
}
