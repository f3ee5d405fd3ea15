//! KV blocks in and out of a backend's cache: the one API a KV transfer uses, at every layer
//! (backend, model runner, engine, engine handle).
//!
//! A transfer's bytes are host memory (UCX, in-process, a `Vec`) or device memory of the
//! backend's device (CUDA IPC); [`KvBytes`] and [`KvBytesMut`] are views of either, and
//! [`KvBlockIo`] reads blocks into one and writes blocks from one. A backend picks its fastest
//! copy per kind of memory; a host backend refuses device memory.
//!
//! The types, each with one meaning:
//! - [`HostRange`], [`DeviceRange`]: address ranges, no access (pinning; the device half of a
//!   view).
//! - [`KvBytes`], [`KvBytesMut`]: borrowed views of bytes to read from or write into.
//! - [`KvBuffer`]: owned memory that hands out those views (a `Vec`, a transfer's export or
//!   pull), moved to the engine's thread and back.
//! - [`KvCacheMemory`]: where the cache itself lies, for transfers that read a prompt's blocks
//!   straight out of it ([`KvBlockIo::kv_cache_memory`]).

/// A range of host memory that stays mapped as long as the process runs (the KV transport's
/// transfer pool): what [`KvBlockIo::pin_host_memory`] pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: an address range, not access to it; whoever dereferences it says why that is sound.
unsafe impl Send for HostRange {}
unsafe impl Sync for HostRange {}

/// Device memory in the backend's context (a transfer pool's slice, or another process's
/// allocation mapped by CUDA IPC): where K/V moves without leaving the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRange {
    /// The device address (`CUdeviceptr`).
    pub ptr: u64,
    pub len: usize,
}

/// Bytes of one slot of a cache's export slab ([`KvCacheMemory::slab_offset`]): what a
/// transfer writes there per export (its seal, `crate::transfer::seal`).
pub const EXPORT_SLOT_BYTES: usize = 16;

/// Host or device memory, as an address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMemory {
    Host(HostRange),
    Device(DeviceRange),
}

impl KvMemory {
    pub fn len(&self) -> usize {
        match self {
            KvMemory::Host(range) => range.len,
            KvMemory::Device(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a backend's KV cache lies: one allocation, block `b` at `b * block_bytes` from its
/// start, and after the blocks (and anything else the backend keeps there) the *export slab*:
/// `num_blocks` slots of [`EXPORT_SLOT_BYTES`], zeroed when the cache is allocated and never
/// read or written by the model. A transfer that hands a prompt's blocks over in place (the
/// decode worker reads them straight out of this memory) registers the allocation once and
/// keeps each export's seal in a slot of the slab, so one registration covers both; an export
/// pins at least one block, so the slab never runs out of slots.
///
/// The allocation lives, and does not move, as long as the cache does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheMemory {
    /// The whole allocation.
    pub memory: KvMemory,
    pub block_bytes: usize,
    /// Blocks handed to sequences (extra blocks the backend keeps for itself not counted).
    pub num_blocks: usize,
    /// Offset of the export slab from the allocation's start.
    pub slab_offset: usize,
}

impl KvCacheMemory {
    /// Offset of `block` from the allocation's start.
    pub fn block_offset(&self, block: u32) -> usize {
        block as usize * self.block_bytes
    }

    /// Offset of slot `slot` of the export slab.
    pub fn slot_offset(&self, slot: usize) -> usize {
        self.slab_offset + slot * EXPORT_SLOT_BYTES
    }

    /// Bytes of the export slab.
    pub fn slab_bytes(&self) -> usize {
        self.num_blocks * EXPORT_SLOT_BYTES
    }
}

/// K/V bytes to read, by [`KvBlockIo::write_kv_blocks`]: host or device memory.
#[derive(Debug, Clone, Copy)]
pub enum KvBytes<'a> {
    Host(&'a [u8]),
    Device(DeviceRange),
}

/// Memory to write K/V into, by [`KvBlockIo::read_kv_blocks`]: host or device memory.
#[derive(Debug)]
pub enum KvBytesMut<'a> {
    Host(&'a mut [u8]),
    Device(DeviceRange),
}

impl KvBytes<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvBytes::Host(bytes) => bytes.len(),
            KvBytes::Device(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KvBytesMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvBytesMut::Host(bytes) => bytes.len(),
            KvBytesMut::Device(range) => range.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Copies of whole KV blocks between a backend's cache and a transfer's memory. The blocks
/// are laid out back to back in `blocks` order, each `layout.block_bytes()` long in the
/// layout's dtype; the caller passes exactly that many bytes.
pub trait KvBlockIo: super::Backend {
    /// Pins `range` for the device's copy engine, so that copies to or from host memory
    /// inside it go straight to or from the device instead of through a staging buffer.
    /// False where there is nothing to pin (host backends).
    ///
    /// # Safety
    /// `range` must stay mapped for as long as this backend lives.
    unsafe fn pin_host_memory(&self, range: HostRange) -> Result<bool, super::BackendError> {
        let _ = range;
        Ok(false)
    }

    /// Where the cache lies, for transfers that read blocks straight out of it; None where
    /// its memory cannot be handed out (the default).
    fn kv_cache_memory(&self, kv: &Self::KvCache) -> Option<KvCacheMemory> {
        let _ = kv;
        None
    }

    /// Copies `blocks`, in order, out of the cache into `dst`: a prompt's K/V handed to a
    /// transfer.
    fn read_kv_blocks(
        &self,
        kv: &Self::KvCache,
        blocks: &[u32],
        dst: KvBytesMut<'_>,
    ) -> Result<(), super::BackendError>;

    /// Overwrites `blocks` with `src`, laid out as [`Self::read_kv_blocks`] writes it.
    fn write_kv_blocks(
        &self,
        kv: &mut Self::KvCache,
        blocks: &[u32],
        src: KvBytes<'_>,
    ) -> Result<(), super::BackendError>;
}

/// Owned K/V memory, host or device: an imported prefill's bytes on their way into the cache
/// (a `Vec`, or a transport's pull, handed back to its pool when dropped), or the memory a
/// retained prompt's K/V is copied into (a transport's export). Whoever holds it may read it
/// and write it; the engine takes it on its thread for the copy.
pub trait KvBuffer: std::any::Any + Send + std::fmt::Debug {
    fn bytes(&self) -> KvBytes<'_>;
    fn bytes_mut(&mut self) -> KvBytesMut<'_>;
}

impl KvBuffer for Vec<u8> {
    fn bytes(&self) -> KvBytes<'_> {
        KvBytes::Host(self)
    }

    fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        KvBytesMut::Host(self)
    }
}
