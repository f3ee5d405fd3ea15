//! KV blocks between the device cache and host memory, through a reusable page-locked
//! (pinned) staging buffer.
//!
//! The context worker hands a prompt's K/V to the transfer and the decode worker writes a
//! pulled one into its cache, each a few hundred blocks of up to a few MB. A copy to or from
//! pageable memory goes through the driver's own bounce buffers and waits at every call; the
//! copy engine reads and writes pinned memory directly. So the blocks of a chunk are queued as
//! one asynchronous copy each into (or out of) the pinned buffer, waited for once, and moved to
//! (or from) the caller's bytes with one host copy.
//!
//! Better still, the caller's bytes are pinned themselves: a context or decode worker's KV
//! transport maps one transfer pool at start, and the worker pins it here ([`KvStaging::pin`],
//! `cuMemHostRegister`) once. Copies into or out of a pinned range go straight between the
//! cache and those bytes, with no staging buffer and no host copy.
//!
//! The cache holds bf16 as `u16`; its bytes are the little-endian bytes the KV layout
//! describes, so the staging copies are byte copies (CUDA hosts are little-endian).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream, PinnedHostSlice};

use super::pinned::lock;
use super::tensor::CudaKvCache;
use crate::backend::{BackendError, HostRange};

/// Bytes of the staging buffer (a larger request is copied in chunks of this size).
const STAGING_BYTES: usize = 64 << 20;

/// The pinned buffer, allocated at the first copy and kept, and the caller's ranges pinned
/// in place.
#[derive(Default)]
pub(super) struct KvStaging {
    buffer: Mutex<Option<PinnedHostSlice<u8>>>,
    pinned: Mutex<Vec<PinnedRange>>,
}

/// Host memory registered with the driver by [`KvStaging::pin`]; unregistered on drop.
struct PinnedRange {
    start: usize,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for PinnedRange {
    fn drop(&mut self) {
        // SAFETY: registered by `pin` in this context, unregistered once; nothing copies
        // into it any more (the backend is being dropped).
        let unregistered = self.ctx.bind_to_thread().map(|()| unsafe {
            cudarc::driver::sys::cuMemHostUnregister(self.start as *mut std::ffi::c_void)
        });
        if let Ok(status) = unregistered
            && status != cudarc::driver::sys::CUresult::CUDA_SUCCESS
        {
            tracing::debug!("cuMemHostUnregister: {status:?}");
        }
    }
}

#[cfg(target_endian = "big")]
compile_error!("the KV staging copies assume a little-endian host");

impl KvStaging {
    /// Registers `range` with the driver (page-locked, usable by every context), so copies
    /// into or out of it skip the staging buffer.
    ///
    /// # Safety
    /// `range` must stay mapped while this staging lives.
    pub unsafe fn pin(&self, ctx: &Arc<CudaContext>, range: HostRange) -> Result<(), BackendError> {
        dev!("pin host memory", ctx.bind_to_thread())?;
        // SAFETY: the caller keeps the range mapped until the registration is dropped.
        let status = unsafe {
            cudarc::driver::sys::cuMemHostRegister_v2(
                range.ptr.cast(),
                range.len,
                cudarc::driver::sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        };
        dev!("cuMemHostRegister", status.result())?;
        lock(&self.pinned).push(PinnedRange {
            start: range.ptr as usize,
            len: range.len,
            ctx: Arc::clone(ctx),
        });
        Ok(())
    }

    /// Whether `bytes` lie inside one range given to [`Self::pin`].
    fn is_pinned(&self, bytes: &[u8]) -> bool {
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        lock(&self.pinned)
            .iter()
            .any(|r| r.start <= start && end <= r.start + r.len)
    }

    /// Copies `blocks` out of `kv` into `dst`, block after block.
    pub fn read_blocks(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        kv: &CudaKvCache,
        blocks: &[u32],
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let block_bytes = check("read KV blocks", kv, blocks, dst.len())?;
        if self.is_pinned(dst) {
            for (&block, into) in blocks.iter().zip(dst.chunks_exact_mut(block_bytes)) {
                let from = kv.block_address(stream, block);
                // SAFETY: `from` is a whole block inside the cache (checked above) and `into`
                // is as long, page-locked; the stream is synchronized before returning.
                dev!("read KV blocks", unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(into, from, stream.cu_stream())
                })?;
            }
            return dev!("read KV blocks", stream.synchronize());
        }
        let mut guard = lock(&self.buffer);
        let staging = Self::buffer(&mut guard, ctx, block_bytes)?;
        let per_chunk = staging.len() / block_bytes;
        for (chunk_blocks, chunk_dst) in blocks
            .chunks(per_chunk)
            .zip(dst.chunks_mut(per_chunk * block_bytes))
        {
            let pinned = dev!("read KV blocks", staging.as_mut_slice())?;
            for (i, &block) in chunk_blocks.iter().enumerate() {
                let from = kv.block_address(stream, block);
                let into = &mut pinned[i * block_bytes..(i + 1) * block_bytes];
                // SAFETY: `from` is a whole block inside the cache (checked above) and `into`
                // is as long; the stream is synchronized before `pinned` is read or reused.
                dev!("read KV blocks", unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(into, from, stream.cu_stream())
                })?;
            }
            dev!("read KV blocks", stream.synchronize())?;
            chunk_dst.copy_from_slice(&pinned[..chunk_dst.len()]);
        }
        Ok(())
    }

    /// Overwrites `blocks` of `kv` with `src`, laid out as [`Self::read_blocks`] writes it.
    pub fn write_blocks(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        kv: &mut CudaKvCache,
        blocks: &[u32],
        src: &[u8],
    ) -> Result<(), BackendError> {
        let block_bytes = check("write KV blocks", kv, blocks, src.len())?;
        if self.is_pinned(src) {
            for (&block, from) in blocks.iter().zip(src.chunks_exact(block_bytes)) {
                let to = kv.block_address(stream, block);
                // SAFETY: `to` is a whole block inside the cache (checked above) and `from` is
                // as long, page-locked; the stream is synchronized before returning.
                dev!("write KV blocks", unsafe {
                    cudarc::driver::result::memcpy_htod_async(to, from, stream.cu_stream())
                })?;
            }
            return dev!("write KV blocks", stream.synchronize());
        }
        let mut guard = lock(&self.buffer);
        let staging = Self::buffer(&mut guard, ctx, block_bytes)?;
        let per_chunk = staging.len() / block_bytes;
        for (chunk_blocks, chunk_src) in blocks
            .chunks(per_chunk)
            .zip(src.chunks(per_chunk * block_bytes))
        {
            let pinned = dev!("write KV blocks", staging.as_mut_slice())?;
            pinned[..chunk_src.len()].copy_from_slice(chunk_src);
            for (i, &block) in chunk_blocks.iter().enumerate() {
                let to = kv.block_address(stream, block);
                let from = &pinned[i * block_bytes..(i + 1) * block_bytes];
                // SAFETY: `to` is a whole block inside the cache (checked above) and `from` is
                // as long; the stream is synchronized before `pinned` is written again.
                dev!("write KV blocks", unsafe {
                    cudarc::driver::result::memcpy_htod_async(to, from, stream.cu_stream())
                })?;
            }
            dev!("write KV blocks", stream.synchronize())?;
        }
        Ok(())
    }

    /// The staging buffer, (re)allocated to hold at least one block.
    fn buffer<'a>(
        slot: &'a mut Option<PinnedHostSlice<u8>>,
        ctx: &Arc<CudaContext>,
        block_bytes: usize,
    ) -> Result<&'a mut PinnedHostSlice<u8>, BackendError> {
        let wanted = STAGING_BYTES.max(block_bytes);
        if slot.as_ref().is_none_or(|b| b.len() < block_bytes) {
            *slot = None;
            *slot = Some(super::pinned::alloc(ctx, wanted)?);
        }
        Ok(slot.as_mut().expect("allocated above"))
    }
}

/// Checks that `len` bytes are `blocks` whole blocks of `kv` and that every block is in the
/// cache; returns the block size.
pub(super) fn check(
    op: &'static str,
    kv: &CudaKvCache,
    blocks: &[u32],
    len: usize,
) -> Result<usize, BackendError> {
    let block_bytes = kv.layout().block_bytes();
    if blocks.len() * block_bytes != len {
        return Err(BackendError::Shape {
            op,
            detail: format!(
                "{len} bytes for {} blocks of {block_bytes} bytes",
                blocks.len()
            ),
        });
    }
    for &block in blocks {
        kv.block_range(block, block_bytes)?;
    }
    Ok(block_bytes)
}
