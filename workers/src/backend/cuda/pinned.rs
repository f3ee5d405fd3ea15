//! Page-locked (pinned) host buffers that the backend keeps and reuses (the KV staging buffer,
//! the batch metadata's upload slots, the sampling summaries' readback), and the copies that
//! use a prefix of one: the copy engine reads and writes pinned memory directly, so a copy
//! from or to it is queued and returns, where one through pageable memory may wait for the
//! work queued before it.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use crate::backend::BackendError;

/// A pinned buffer of `len` elements. Flags 0: cached host memory, which the CPU reads back at
/// full speed (cudarc's default, write-combined, is slow to read).
pub(super) fn alloc<T: DeviceRepr>(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<T>, BackendError> {
    // SAFETY: every user writes an element (by a copy or on the host) before reading it.
    dev!("pinned host buffer", unsafe {
        ctx.alloc_pinned_with_flags::<T>(len, 0)
    })
}

/// Queues the copy of `src` (a prefix of a pinned buffer) into the first `src.len()` elements
/// of `dst`. `src` must stay unchanged until the copy has run (an event the caller records).
pub(super) fn to_device<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &[T],
    dst: &mut CudaSlice<T>,
) -> Result<(), BackendError> {
    if src.is_empty() {
        return Ok(());
    }
    assert!(
        dst.len() >= src.len(),
        "a device buffer too small for its upload"
    );
    let (dst_ptr, _sync) = dst.device_ptr(stream);
    // SAFETY: `dst` holds at least `src.len()` elements; the caller keeps `src` (pinned)
    // alive and unchanged until the copy ran.
    dev!("pinned upload", unsafe {
        cudarc::driver::result::memcpy_htod_async(dst_ptr, src, stream.cu_stream())
    })
}

/// Queues the copy of `src` into the first `src.len()` elements of `dst` (cudarc's
/// `memcpy_dtoh` copies the whole destination, which is larger when it is reused). `dst` is
/// read once the copy has run (an event the caller records and waits for).
pub(super) fn from_device<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    dst: &mut PinnedHostSlice<T>,
) -> Result<(), BackendError> {
    let n = src.len();
    // Waits for nothing: a buffer is reused only after what was copied into it was read.
    let host = dev!("pinned readback", dst.as_mut_slice())?;
    let (src_ptr, _sync) = src.device_ptr(stream);
    // SAFETY: `host[..n]` is pinned memory the caller keeps until the copy is waited for;
    // `src` holds `n` elements, alive until the copy ran (its free is stream-ordered).
    dev!("pinned readback", unsafe {
        cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], src_ptr, stream.cu_stream())
    })
}

/// The buffers behind a mutex: a panic elsewhere leaves them usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
