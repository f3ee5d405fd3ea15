//! Memory registration (`ucp_mem_map` of existing buffers, rkey packing) on the serving side and
//! remote keys (`ucp_ep_rkey_unpack`) on the pulling side.
//!
//! A [`RemoteKey`] carries the bounds of the region it was advertised for, and gets are checked
//! against them before UCX sees them: over cma and tcp UCX reads whatever address it is given in
//! the target process without checking it against the registration, so an out-of-range address
//! would read foreign memory (or crash the target) rather than fail.

use std::rc::Rc;

use crate::context::Context;
use crate::endpoint::Endpoint;
use crate::error::{Result, UcxError, check};
use crate::ffi;

/// Memory registered with UCX so peers can read it with RMA gets.
pub struct MemoryRegion {
    context: Context,
    memh: ffi::MemHandle,
    address: *mut u8,
    length: usize,
    /// Who owns the bytes; a `Vec` backing is dropped after the unmap in `Drop`.
    backing: Backing,
}

enum Backing {
    /// The caller's memory ([`MemoryRegion::register`]).
    Caller,
    /// Taken over from a `Vec` ([`MemoryRegion::from_vec`]).
    Vec(#[allow(dead_code)] Box<[u8]>),
    /// Allocated by UCX ([`MemoryRegion::allocate`]), freed by the unmap.
    Ucx,
}

impl MemoryRegion {
    /// Registers `length` bytes at `address` (for example the KV cache's blocks).
    ///
    /// # Safety
    /// The memory must stay allocated until this region is dropped; peers holding the packed
    /// rkey may read it at any time until then.
    pub unsafe fn register(context: &Context, address: *mut u8, length: usize) -> Result<Self> {
        check_length(length)?;
        let mut memh = std::ptr::null_mut();
        // SAFETY: context alive; the caller guarantees the memory range.
        check("ucp_mem_map", unsafe {
            ffi::tandem_mem_map(context.inner.handle, address.cast(), length, &mut memh)
        })?;
        Ok(Self {
            context: context.clone(),
            memh,
            address,
            length,
            backing: Backing::Caller,
        })
    }

    /// Registers a buffer the region takes ownership of (tests, benchmarks, staging buffers).
    pub fn from_vec(context: &Context, bytes: Vec<u8>) -> Result<Self> {
        let mut owned = bytes.into_boxed_slice();
        let (address, length) = (owned.as_mut_ptr(), owned.len());
        // SAFETY: the boxed slice never moves and is freed only after the unmap (`backing`).
        let mut region = unsafe { Self::register(context, address, length)? };
        region.backing = Backing::Vec(owned);
        Ok(region)
    }

    /// `length` zeroed bytes allocated and registered by UCX (`UCP_MEM_MAP_ALLOCATE`); fill them
    /// through [`MemoryRegion::bytes_mut`]. The staging buffer to prefer for exports: over shared
    /// memory UCX 1.13 places it in a segment the peer maps, and the peer's gets are plain copies
    /// (several times the bandwidth of registered user memory, which UCX reads through
    /// active-message emulation; see docs/benchmarks.md).
    pub fn allocate(context: &Context, length: usize) -> Result<Self> {
        check_length(length)?;
        let mut memh = std::ptr::null_mut();
        let mut address = std::ptr::null_mut();
        // SAFETY: context alive; out pointers valid.
        check("ucp_mem_map(ALLOCATE)", unsafe {
            ffi::tandem_mem_alloc(context.inner.handle, length, &mut memh, &mut address)
        })?;
        let address = address.cast::<u8>();
        // SAFETY: UCX allocated at least `length` writable bytes at `address`, ours until the
        // unmap; zeroed so no uninitialised byte is ever exposed through `bytes`.
        unsafe { std::ptr::write_bytes(address, 0, length) };
        Ok(Self {
            context: context.clone(),
            memh,
            address,
            length,
            backing: Backing::Ucx,
        })
    }

    /// Address of the first byte, as peers pass it to a get.
    pub fn address(&self) -> u64 {
        self.address as u64
    }

    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The bytes of a region this crate owns ([`MemoryRegion::from_vec`],
    /// [`MemoryRegion::allocate`]); `None` for caller memory.
    pub fn owned_bytes(&self) -> Option<&[u8]> {
        match self.backing {
            Backing::Caller => None,
            // SAFETY: `length` initialised bytes owned by this region, alive while it is.
            Backing::Vec(_) | Backing::Ucx => {
                Some(unsafe { std::slice::from_raw_parts(self.address, self.length) })
            }
        }
    }

    /// Mutable access to an owned region's bytes, to fill a staging buffer. Peers may read the
    /// region concurrently once its rkey is out: fill it before publishing the rkey.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self.backing {
            Backing::Caller => None,
            // SAFETY: as in `owned_bytes`, and `&mut self` makes the access exclusive here.
            Backing::Vec(_) | Backing::Ucx => {
                Some(unsafe { std::slice::from_raw_parts_mut(self.address, self.length) })
            }
        }
    }

    /// The packed remote key a peer needs (with [`Self::address`] and [`Self::len`]) to read it.
    pub fn pack_rkey(&self) -> Result<Vec<u8>> {
        let mut buffer = std::ptr::null_mut();
        let mut length = 0usize;
        // SAFETY: context and memh alive; out pointers valid.
        check("ucp_rkey_pack", unsafe {
            ffi::tandem_rkey_pack(
                self.context.inner.handle,
                self.memh,
                &mut buffer,
                &mut length,
            )
        })?;
        // SAFETY: UCX returned `length` bytes at `buffer`; released right after the copy.
        let packed = unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), length) }.to_vec();
        // SAFETY: the buffer came from ucp_rkey_pack.
        unsafe { ffi::tandem_rkey_buffer_release(buffer) };
        Ok(packed)
    }
}

fn check_length(length: usize) -> Result<()> {
    if length == 0 {
        return Err(UcxError::Invalid {
            what: "memory region",
            reason: "zero length".into(),
        });
    }
    Ok(())
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: memh came from ucp_mem_map on this context, unmapped once.
        let status = unsafe { ffi::tandem_mem_unmap(self.context.inner.handle, self.memh) };
        if let Err(err) = check("ucp_mem_unmap", status) {
            tracing::warn!(%err, "unregistering memory");
        }
    }
}

/// A peer's remote key unpacked on one endpoint, with the bounds of the region it covers.
/// Cheap to clone; in-flight gets hold a clone, so it is destroyed only after them, and it holds
/// its endpoint, so it is destroyed before the endpoint is closed (unless the endpoint was aborted
/// first; `ucp_rkey_destroy` then only returns memory to the worker, which is still alive).
#[derive(Clone)]
pub struct RemoteKey {
    pub(crate) inner: Rc<RemoteKeyInner>,
}

pub(crate) struct RemoteKeyInner {
    pub(crate) handle: ffi::RkeyHandle,
    pub(crate) region_address: u64,
    pub(crate) region_length: usize,
    pub(crate) endpoint: Endpoint,
}

impl RemoteKey {
    /// Unpacks `packed` (from the peer's [`MemoryRegion::pack_rkey`]) for use on `endpoint`, for
    /// the region of `region_length` bytes at `region_address` in the peer.
    pub fn unpack(
        endpoint: &Endpoint,
        packed: &[u8],
        region_address: u64,
        region_length: usize,
    ) -> Result<Self> {
        if packed.is_empty() {
            return Err(UcxError::Invalid {
                what: "packed rkey",
                reason: "empty".into(),
            });
        }
        let ep = endpoint.live_handle()?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: endpoint alive; UCX reads the packed bytes during the call only.
        check("ucp_ep_rkey_unpack", unsafe {
            ffi::tandem_rkey_unpack(ep, packed.as_ptr().cast(), &mut handle)
        })?;
        Ok(Self {
            inner: Rc::new(RemoteKeyInner {
                handle,
                region_address,
                region_length,
                endpoint: endpoint.clone(),
            }),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    pub fn region_address(&self) -> u64 {
        self.inner.region_address
    }

    pub fn region_length(&self) -> usize {
        self.inner.region_length
    }

    /// Checks that `length` bytes at `remote_address` lie inside the advertised region.
    pub(crate) fn check_range(&self, remote_address: u64, length: usize) -> Result<()> {
        let region_end = self.inner.region_address as u128 + self.inner.region_length as u128;
        let end = remote_address as u128 + length as u128;
        if remote_address < self.inner.region_address || end > region_end {
            return Err(UcxError::OutOfRange {
                remote_address,
                length,
                region_address: self.inner.region_address,
                region_length: self.inner.region_length,
            });
        }
        Ok(())
    }
}

impl Drop for RemoteKeyInner {
    fn drop(&mut self) {
        // SAFETY: unpacked by ucp_ep_rkey_unpack, destroyed once; no get using it is in flight
        // (they hold a clone of the RemoteKey).
        unsafe { ffi::tandem_rkey_destroy(self.handle) };
    }
}
