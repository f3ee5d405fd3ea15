//! Moving a prefilled prompt's K/V from a context worker to a decode worker.
//!
//! One interface, [`KvTransport`], with three implementations: [`ucx`] (between processes and
//! hosts, through host memory, over the system's libucp), [`cuda_ipc`] (between GPUs of one
//! host, device to device) and [`in_process`] (a registry in this process, for tests of
//! everything around the transfer).
//!
//! **The hand-over without copies** ([`cache`]). Where a transport can read the context
//! worker's KV cache itself (CUDA IPC for a GPU cache and a GPU reader of the same host; UCX,
//! or the in-process registry, for a CPU worker's host cache), the cache allocation is
//! registered with it once at start ([`KvTransport::expose_cache`]: one CUDA IPC handle, or one
//! UCX registration and key), and an export is the prompt's blocks where they lie, one region
//! per block: the engine keeps them pinned (retained after the prefill, counted in the block
//! pool) until the decode worker's release, a cancel, or the export's expiry. The decode worker
//! reads them straight out of the cache. No export copy and no export pool, so nothing caps a
//! hand-over short of the cache itself; what bounds the cache that exports may pin is the
//! context worker's `max_tokens_in_buffer` and each export's expiry (a dead decode worker's
//! exports are unpinned when they expire).
//!
//! **Copied exports.** A GPU cache read by a UCX reader (another host, a CPU decode worker:
//! this UCX has no CUDA support) is copied out: the context worker *reserves* an export of the
//! prompt's size (host memory the transport registered), has the engine copy the blocks
//! straight into it and free them ([`crate::engine::Engine::take_retained_kv_into`]), and
//! describes it in the handle. Copied exports and pull destinations are slices of the
//! transport's pool when it keeps one ([`pool`]; registered once, and pinned once by a GPU
//! worker, whose copy engine then reads and writes them directly).
//!
//! The decode worker *pulls* the regions over UCX into a buffer of its own ([`PulledKv`], host
//! memory) and imports it into its engine, which writes it into the blocks it reserved for
//! the request; over CUDA IPC it copies them straight into those blocks
//! ([`cuda_ipc::CudaIpcTransport::pull_into_cache`]), re-laying the KV heads where the two
//! sides split them over different numbers of tensor-parallel ranks ([`relayout`]).
//!
//! Every export is sealed ([`seal`]): 16 bytes hold a random nonce while the export is live,
//! written once its K/V is complete and cleared before its memory can be reused (before the
//! blocks are unpinned, or a copied export's memory goes back to the pool); a pull reads the
//! seal after the K/V and drops what it read if the nonce is gone. A copied export's seal
//! follows its K/V; an in-place export's is a slot of the cache's export slab, after the blocks
//! in the same allocation (so the one registration covers it).

pub mod cache;
pub mod cuda_ipc;
pub mod in_process;
pub mod ipc_liveness;
pub mod pool;
pub mod relayout;
pub mod seal;
pub mod ucx;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use thiserror::Error;

use crate::backend::KvMemory;
pub use crate::backend::{DeviceRange, HostRange, KvBuffer, KvBytes, KvBytesMut, KvCacheMemory};
use tandem_protocol::messages::KvHandle;
pub use tandem_protocol::messages::{CudaIpcSource, KvTransportKind};

use self::cache::ExposedCache;
use self::seal::{Seal, SealGuard, SealSlot};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Debug, Error)]
pub enum TransferError {
    /// The source is gone, unreachable or too slow: the decode worker prefills locally.
    #[error("KV source unavailable: {0}")]
    Unavailable(String),
    /// The handle does not describe something this transport can read.
    #[error("invalid KV handle: {0}")]
    InvalidHandle(String),
    #[error("KV transport failed: {0}")]
    Backend(String),
    /// The regions were read, but the export's seal no longer held its nonce afterwards
    /// ([`seal`]): the exporter freed it before or during the read, and its memory may hold
    /// another request's K/V. What was read is dropped; the decode worker prefills locally.
    #[error("the KV export was freed before the pull ended: {0}")]
    ExportGone(String),
}

/// How a reader reaches an exporter's memory (the KV handle's `address` and `rkey`, or its
/// `cuda_ipc`), besides which regions of it to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteMemory {
    /// Host memory registered for remote reads: the exporting endpoint's address and the key
    /// of the registration, as the transport packs them (UCX; the in-process registry).
    /// Region addresses are addresses in the exporter's address space.
    Registered { address: Vec<u8>, rkey: Vec<u8> },
    /// Device allocations that processes of the exporter's host map (CUDA IPC): one, or one
    /// per rank of a tensor-parallel exporter, in rank order, each holding its rank's KV heads
    /// ([`relayout`]). Region addresses are offsets that hold in each.
    CudaIpc(Vec<CudaIpcSource>),
}

/// K/V registered for remote reads: a buffer the K/V was copied into, or the prompt's blocks
/// in the KV cache itself ([`cache`]); dropping it clears its seal, then frees the buffer or
/// unpins the blocks.
pub struct Exported {
    pub memory: RemoteMemory,
    /// `(address, length)` of the K/V, in order, as the reader addresses `memory`: one region
    /// for a buffer, one per block for blocks read in place. The seal is not among them.
    pub regions: Vec<(u64, u64)>,
    /// The seal a reader checks after its read ([`seal`]); None only for exports of unit
    /// tests that read nothing.
    pub seal: Option<Seal>,
    /// Keeps the registration (and the memory) alive; for a sealed export, a [`SealGuard`].
    pub keepalive: Box<dyn Send + Sync>,
}

impl Exported {
    /// Where the K/V's first region starts.
    pub fn addr(&self) -> u64 {
        self.regions.first().map_or(0, |&(addr, _)| addr)
    }

    /// Bytes of K/V.
    pub fn len(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
impl Exported {
    /// A host export of 384 bytes at 4096, its seal after them, that keeps nothing alive
    /// (unit tests of what holds exports).
    pub(crate) fn fixture() -> Self {
        Exported {
            memory: RemoteMemory::Registered {
                address: vec![1],
                rkey: vec![2],
            },
            regions: vec![(4096, 3 * 128)],
            seal: Some(Seal {
                addr: 4096 + 3 * 128,
                nonce: [0x5e; seal::SEAL_BYTES],
            }),
            keepalive: Box::new(()),
        }
    }
}

/// Views of where a transfer's bytes lie (host memory for UCX and in-process, device memory
/// for CUDA IPC), for the owners of those bytes here.
impl KvMemory {
    /// The memory as the backend reads it. Sound because every owner ([`ExportBuffer`],
    /// [`PulledKv`]) is built by an `unsafe` constructor whose caller promises the bytes stay
    /// valid, and untouched by others, while the owner lives.
    fn bytes(&self) -> KvBytes<'_> {
        match *self {
            // SAFETY: see above.
            KvMemory::Host(range) => {
                KvBytes::Host(unsafe { std::slice::from_raw_parts(range.ptr, range.len) })
            }
            KvMemory::Device(range) => KvBytes::Device(range),
        }
    }

    /// [`Self::bytes`], to write.
    fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        match *self {
            // SAFETY: see `bytes`; `&mut self` makes this the only view.
            KvMemory::Host(range) => {
                KvBytesMut::Host(unsafe { std::slice::from_raw_parts_mut(range.ptr, range.len) })
            }
            KvMemory::Device(range) => KvBytesMut::Device(range),
        }
    }

    /// The host bytes to write, None for device memory.
    fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self.bytes_mut() {
            KvBytesMut::Host(bytes) => Some(bytes),
            KvBytesMut::Device(_) => None,
        }
    }
}

/// An export whose memory is allocated and registered but not yet filled: the caller writes
/// the K/V into [`ExportBuffer::bytes_mut`] (host or device memory), then
/// [`ExportBuffer::finish`] seals it and gives the [`Exported`] whose description goes into
/// the KV handle. No peer can read it before then: the handle is what tells one where it is.
pub struct ExportBuffer {
    memory: KvMemory,
    exported: Exported,
    /// Where the seal goes, after the K/V.
    seal: Option<SealSlot>,
}

// SAFETY: the memory is owned by the export (kept alive by `exported.keepalive`, on
// whichever thread), reached only through `&mut self`.
unsafe impl Send for ExportBuffer {}

impl ExportBuffer {
    /// # Safety
    /// `bytes` must point at `len` writable bytes that stay valid while `exported` (its
    /// keepalive) lives, and that nothing else touches until the handle is published.
    pub unsafe fn new(bytes: *mut u8, len: usize, exported: Exported) -> Self {
        Self {
            memory: KvMemory::Host(HostRange { ptr: bytes, len }),
            exported,
            seal: None,
        }
    }

    /// # Safety
    /// `range` must be device memory that stays allocated while `exported` (its keepalive)
    /// lives, and that nothing else touches until the handle is published.
    pub unsafe fn on_device(range: DeviceRange, exported: Exported) -> Self {
        Self {
            memory: KvMemory::Device(range),
            exported,
            seal: None,
        }
    }

    /// The export with its seal in `slot` (memory of the export's, after its K/V), written by
    /// [`Self::finish`] and cleared when the export is dropped.
    pub fn with_seal(self, slot: SealSlot) -> Self {
        Self {
            seal: Some(slot),
            ..self
        }
    }

    pub fn len(&self) -> usize {
        self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The K/V written so far.
    pub fn bytes(&self) -> KvBytes<'_> {
        self.memory.bytes()
    }

    /// Where to write the K/V.
    pub fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        self.memory.bytes_mut()
    }

    /// The host bytes to write, or None for device memory.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        self.memory.host_bytes_mut()
    }

    /// The filled export, ready to be described in a handle: called once the K/V is
    /// complete in the buffer, it writes a fresh nonce into the seal, and has the export clear
    /// it before its memory is freed ([`seal`]). An error (the seal could not be written)
    /// frees the export.
    pub fn finish(self) -> Result<Exported, TransferError> {
        let Self {
            mut exported, seal, ..
        } = self;
        if let Some(SealSlot { addr, memory }) = seal {
            let nonce = seal::fresh_nonce();
            // Guarded first: if the nonce write fails half-way, the drop still clears it.
            let keepalive = std::mem::replace(&mut exported.keepalive, Box::new(()));
            let guard = SealGuard::new(memory, keepalive);
            guard.seal(&nonce)?;
            exported.keepalive = Box::new(guard);
            exported.seal = Some(Seal { addr, nonce });
        }
        Ok(exported)
    }
}

impl KvBuffer for ExportBuffer {
    fn bytes(&self) -> KvBytes<'_> {
        ExportBuffer::bytes(self)
    }

    fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        ExportBuffer::bytes_mut(self)
    }
}

impl std::fmt::Debug for ExportBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportBuffer")
            .field("len", &self.len())
            .field("memory", &self.exported.memory)
            .finish()
    }
}

/// What a puller needs: where to connect, which regions to read, in order, and the seal to
/// check once they are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKv {
    pub memory: RemoteMemory,
    /// `(address, length)` of each region, as `memory` addresses them, concatenated in this
    /// order into the result.
    pub regions: Vec<(u64, u64)>,
    /// The export's seal, read after the regions: the pull fails with
    /// [`TransferError::ExportGone`] unless it still holds its nonce. None: a handle from a
    /// context worker older than seals, read unchecked.
    pub seal: Option<Seal>,
}

impl RemoteKv {
    /// What `handle` says to read: its blocks, in `cuda_ipc`'s allocation for a CUDA IPC
    /// handle, else in the memory its `address` and `rkey` (hex) name.
    pub fn from_handle(handle: &KvHandle) -> Result<Self, TransferError> {
        let memory = match (
            &handle.backend,
            &handle.cuda_ipc,
            &handle.cuda_ipc_ranks[..],
        ) {
            (KvTransportKind::CudaIpc, Some(source), []) => {
                RemoteMemory::CudaIpc(vec![(**source).clone()])
            }
            (KvTransportKind::CudaIpc, None, ranks) if !ranks.is_empty() => {
                RemoteMemory::CudaIpc(ranks.to_vec())
            }
            (KvTransportKind::CudaIpc, Some(_), _) => {
                return Err(TransferError::InvalidHandle(
                    "a CUDA IPC handle with both one allocation and one per rank".into(),
                ));
            }
            (KvTransportKind::CudaIpc, None, _) => {
                return Err(TransferError::InvalidHandle(
                    "a CUDA IPC handle without its allocation".into(),
                ));
            }
            _ => RemoteMemory::Registered {
                address: from_hex(&handle.address)?,
                rkey: from_hex(&handle.rkey)?,
            },
        };
        Ok(Self {
            memory,
            regions: handle.blocks.iter().map(|r| (r.addr, r.len)).collect(),
            seal: handle.seal.as_ref().map(Seal::from_wire).transpose()?,
        })
    }

    pub fn total_len(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| len).sum()
    }

    /// Leaves out the first `blocks` blocks of `block_bytes` each (the reader holds them
    /// already): regions before them go, and a run of blocks that starts before them starts
    /// after them. Fails, reading nothing, when the regions hold fewer blocks or cut one.
    pub fn skip_blocks(&mut self, blocks: u64, block_bytes: u64) -> Result<(), TransferError> {
        let mut skip = blocks
            .checked_mul(block_bytes)
            .filter(|&bytes| bytes < self.total_len() || blocks == 0)
            .ok_or_else(|| {
                TransferError::InvalidHandle(format!(
                    "{blocks} blocks of {block_bytes} bytes to leave out of {} bytes",
                    self.total_len()
                ))
            })?;
        if block_bytes == 0 || self.regions.iter().any(|&(_, len)| len % block_bytes != 0) {
            return Err(TransferError::InvalidHandle(format!(
                "regions that are not whole blocks of {block_bytes} bytes"
            )));
        }
        let mut kept = Vec::with_capacity(self.regions.len());
        for &(addr, len) in &self.regions {
            if skip >= len {
                skip -= len;
            } else {
                kept.push((addr + skip, len - skip));
                skip = 0;
            }
        }
        self.regions = kept;
        Ok(())
    }

    /// Adjacent regions merged, so a request's blocks exported back to back are one read.
    pub fn coalesced(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(addr, len) in &self.regions {
            match out.last_mut() {
                Some((start, run)) if *start + *run == addr => *run += len,
                _ => out.push((addr, len)),
            }
        }
        out
    }
}

/// Exports K/V buffers on one side and pulls them on the other.
pub trait KvTransport: Send + Sync + 'static {
    /// The transport named in KV handles.
    fn backend(&self) -> KvTransportKind;
    /// Allocates and registers `len` bytes for remote reads, for the caller to fill, and the
    /// export's seal after them.
    fn reserve(&self, len: usize) -> BoxFuture<Result<ExportBuffer, TransferError>>;
    /// Exports a copy of `kv` (reserve, copy, finish); transports of host memory only.
    fn export(&self, kv: Vec<u8>) -> BoxFuture<Result<Exported, TransferError>> {
        let reserved = self.reserve(kv.len());
        Box::pin(async move {
            let mut buffer = reserved.await?;
            let bytes = buffer.host_bytes_mut().ok_or_else(|| {
                TransferError::Backend("this transport exports device memory".into())
            })?;
            bytes.copy_from_slice(&kv);
            buffer.finish()
        })
    }
    /// Reads `remote`'s regions into one buffer (a slice of the pool when there is room),
    /// failing with [`TransferError::Unavailable`] after `timeout` rather than waiting on a
    /// dead peer; then reads its seal, and fails with [`TransferError::ExportGone`] if the
    /// seal no longer holds its nonce.
    fn pull(
        &self,
        remote: RemoteKv,
        timeout: Duration,
    ) -> BoxFuture<Result<PulledKv, TransferError>>;
    /// The long-lived region exports and pulls take slices of, if the transport keeps one:
    /// the memory a device backend pins once so its copies go straight to and from it.
    fn pool(&self) -> Option<HostRange> {
        None
    }
    /// Registers the engine's KV cache for reads straight out of it, once, at start: exports
    /// are then the prompt's pinned blocks ([`cache`]). `Ok(None)`: this transport does not
    /// read that kind of memory (UCX and a GPU's cache); the caller copies exports out instead.
    ///
    /// # Safety
    /// `cache` must describe memory that stays allocated, and in place, while `owner` lives;
    /// the blocks readers read must not be written while their export lives, nor the slab by
    /// anyone but the returned [`ExposedCache`].
    unsafe fn expose_cache(
        &self,
        cache: KvCacheMemory,
        owner: Box<dyn Send + Sync>,
    ) -> BoxFuture<Result<Option<std::sync::Arc<ExposedCache>>, TransferError>> {
        let _ = (cache, owner);
        Box::pin(async { Ok(None) })
    }
}

/// K/V read by [`KvTransport::pull`]: in a `Vec`, in a slice of the transport's host pool
/// (its pages faulted once, and pinned on a GPU worker), or in device memory (a CUDA IPC
/// pull), handed back when this is dropped.
pub struct PulledKv {
    memory: KvMemory,
    lent: bool,
    /// What keeps the bytes: the `Vec` (its heap buffer does not move with it), or the guard
    /// that hands the pool slice back (or frees the device memory) when dropped.
    _owner: Box<dyn Send + Sync>,
}

// SAFETY: the memory is kept by `_owner` and reached only through this value.
unsafe impl Send for PulledKv {}
unsafe impl Sync for PulledKv {}

impl PulledKv {
    /// # Safety
    /// `bytes` must point at `len` bytes that nothing else touches and that stay valid until
    /// `guard` is dropped.
    pub unsafe fn lent(bytes: *mut u8, len: usize, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            memory: KvMemory::Host(HostRange { ptr: bytes, len }),
            lent: true,
            _owner: guard,
        }
    }

    /// # Safety
    /// `range` must be device memory that nothing else touches and that stays allocated
    /// until `guard` is dropped.
    pub unsafe fn on_device(range: DeviceRange, lent: bool, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            memory: KvMemory::Device(range),
            lent,
            _owner: guard,
        }
    }

    pub fn len(&self) -> usize {
        self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Host or device memory.
    pub fn bytes(&self) -> KvBytes<'_> {
        self.memory.bytes()
    }

    /// The bytes, when they are in host memory.
    pub fn host(&self) -> Option<&[u8]> {
        match self.bytes() {
            KvBytes::Host(bytes) => Some(bytes),
            KvBytes::Device(_) => None,
        }
    }

    /// The host bytes to write (a pull filling them), None for device memory.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        self.memory.host_bytes_mut()
    }

    /// Whether the bytes are a slice of the transport's pool.
    pub fn is_lent(&self) -> bool {
        self.lent
    }
}

impl From<Vec<u8>> for PulledKv {
    fn from(mut bytes: Vec<u8>) -> Self {
        Self {
            memory: KvMemory::Host(HostRange {
                ptr: bytes.as_mut_ptr(),
                len: bytes.len(),
            }),
            lent: false,
            _owner: Box::new(bytes),
        }
    }
}

impl std::fmt::Debug for PulledKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulledKv")
            .field("len", &self.len())
            .field("device", &matches!(self.memory, KvMemory::Device(_)))
            .field("lent", &self.is_lent())
            .finish()
    }
}

impl KvBuffer for PulledKv {
    fn bytes(&self) -> KvBytes<'_> {
        PulledKv::bytes(self)
    }

    fn bytes_mut(&mut self) -> KvBytesMut<'_> {
        self.memory.bytes_mut()
    }
}

/// The transport a worker process uses on the bus: UCX, with a transfer pool of `pool_bytes`
/// (0: none; every export then maps its own region and every pull reads into a `Vec`).
pub fn default_transport(
    pool_bytes: usize,
) -> Result<std::sync::Arc<dyn KvTransport>, TransferError> {
    Ok(std::sync::Arc::new(ucx::UcxTransport::start_with_pool(
        pool_bytes,
    )?))
}

/// This machine's identity for CUDA IPC (processes of one host only): Linux's boot id, which
/// containers on the host share, else the host name.
pub fn host_id() -> String {
    [
        "/proc/sys/kernel/random/boot_id",
        "/proc/sys/kernel/hostname",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok())
    .map(|text| text.trim().to_owned())
    .find(|id| !id.is_empty())
    .unwrap_or_else(|| "unknown-host".into())
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

pub fn from_hex(text: &str) -> Result<Vec<u8>, TransferError> {
    if !text.len().is_multiple_of(2) {
        return Err(TransferError::InvalidHandle(
            "hex field of odd length".into(),
        ));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| TransferError::InvalidHandle(format!("bad hex at {i}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = [0u8, 1, 0xab, 0xff, 0x10];
        assert_eq!(to_hex(&bytes), "0001abff10");
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    #[test]
    fn adjacent_regions_coalesce() {
        let remote = RemoteKv {
            memory: RemoteMemory::Registered {
                address: vec![],
                rkey: vec![],
            },
            regions: vec![(100, 10), (110, 10), (130, 5), (135, 5), (200, 1)],
            seal: None,
        };
        assert_eq!(remote.coalesced(), vec![(100, 20), (130, 10), (200, 1)]);
        assert_eq!(remote.total_len(), 31);
    }

    #[test]
    fn skipping_blocks_a_reader_holds_leaves_the_rest_in_order() {
        let remote = |regions: Vec<(u64, u64)>| RemoteKv {
            memory: RemoteMemory::Registered {
                address: vec![],
                rkey: vec![],
            },
            regions,
            seal: None,
        };
        // One block a region, and runs of blocks: 10-byte blocks.
        let mut single = remote(vec![(100, 10), (300, 10), (200, 10)]);
        single.skip_blocks(2, 10).unwrap();
        assert_eq!(single.regions, vec![(200, 10)]);
        let mut runs = remote(vec![(100, 30), (500, 20)]);
        runs.skip_blocks(1, 10).unwrap();
        assert_eq!(runs.regions, vec![(110, 20), (500, 20)]);
        runs.skip_blocks(3, 10).unwrap();
        assert_eq!(runs.regions, vec![(510, 10)]);
        let mut none = remote(vec![(100, 30)]);
        none.skip_blocks(0, 10).unwrap();
        assert_eq!(none.regions, vec![(100, 30)]);
        // Every block, or more, leaves nothing to read: refused; so is a cut block.
        assert!(remote(vec![(100, 30)]).skip_blocks(3, 10).is_err());
        assert!(remote(vec![(100, 30)]).skip_blocks(u64::MAX, 10).is_err());
        assert!(remote(vec![(100, 25)]).skip_blocks(1, 10).is_err());
    }

    fn handle(backend: KvTransportKind, cuda_ipc: Option<CudaIpcSource>) -> KvHandle {
        serde_json::from_value(serde_json::json!({
            "worker_id": "ctx", "backend": backend, "address": "00ff", "rkey": "10",
            "blocks": [{"addr": 4096, "len": 128}, {"addr": 4224, "len": 128}],
            "layout": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "block_size": 4,
                       "dtype": "f32", "block_bytes": 128},
            "num_tokens": 5, "first_token": {"id": 7, "text": "a"}, "seed": 1,
            "expires_unix_ms": 10, "cuda_ipc": cuda_ipc
        }))
        .unwrap()
    }

    #[test]
    fn a_handle_names_the_memory_its_transport_reads() {
        let registered = RemoteMemory::Registered {
            address: vec![0x00, 0xff],
            rkey: vec![0x10],
        };
        // UCX, and a transport this build does not know (refused later, by the puller).
        for backend in [KvTransportKind::Ucx, KvTransportKind::Other("rdma".into())] {
            let remote = RemoteKv::from_handle(&handle(backend, None)).unwrap();
            assert_eq!(remote.memory, registered);
            assert_eq!(remote.regions, vec![(4096, 128), (4224, 128)]);
        }
        let source = CudaIpcSource {
            host_id: "h".into(),
            device: "GPU-0".into(),
            mem_handle: "00".repeat(64),
            alloc_bytes: 1 << 20,
            liveness_offset: None,
        };
        let remote =
            RemoteKv::from_handle(&handle(KvTransportKind::CudaIpc, Some(source.clone()))).unwrap();
        assert_eq!(remote.memory, RemoteMemory::CudaIpc(vec![source.clone()]));
        // A tensor-parallel exporter's: its ranks' allocations in order, never both forms.
        let mut ranked = handle(KvTransportKind::CudaIpc, None);
        ranked.cuda_ipc_ranks = vec![source.clone(), source.clone()];
        let remote = RemoteKv::from_handle(&ranked).unwrap();
        assert_eq!(
            remote.memory,
            RemoteMemory::CudaIpc(vec![source.clone(), source.clone()])
        );
        ranked.cuda_ipc = Some(Box::new(source));
        assert!(matches!(
            RemoteKv::from_handle(&ranked),
            Err(TransferError::InvalidHandle(_))
        ));
        assert!(matches!(
            RemoteKv::from_handle(&handle(KvTransportKind::CudaIpc, None)),
            Err(TransferError::InvalidHandle(_))
        ));
    }

    #[test]
    fn a_handle_names_the_seal_to_check_after_the_read() {
        let mut sealed = handle(KvTransportKind::Ucx, None);
        let seal = Seal {
            addr: 4352,
            nonce: seal::fresh_nonce(),
        };
        sealed.seal = Some(seal.to_wire());
        assert_eq!(RemoteKv::from_handle(&sealed).unwrap().seal, Some(seal));
        let older = handle(KvTransportKind::Ucx, None);
        assert_eq!(RemoteKv::from_handle(&older).unwrap().seal, None);
        sealed.seal = Some(tandem_protocol::messages::KvSeal {
            addr: 4352,
            nonce: "00".repeat(seal::SEAL_BYTES),
        });
        assert!(matches!(
            RemoteKv::from_handle(&sealed),
            Err(TransferError::InvalidHandle(_))
        ));
    }

    #[test]
    fn finishing_an_export_seals_it_and_its_drop_clears_the_seal_before_the_memory_goes() {
        use std::sync::{Arc, Mutex};

        use seal::tests::{Memory, Recorded};

        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bytes = vec![0u8; 64];
        let exported = Exported {
            seal: None,
            keepalive: Box::new(Memory(log.clone())),
            ..Exported::fixture()
        };
        // SAFETY: `bytes` outlives the buffer and the export.
        let buffer =
            unsafe { ExportBuffer::new(bytes.as_mut_ptr(), 48, exported) }.with_seal(SealSlot {
                addr: 4096 + 48,
                memory: Box::new(Recorded(log.clone())),
            });
        assert_eq!(buffer.len(), 48, "the caller sees the K/V only");
        assert!(
            log.lock().unwrap().is_empty(),
            "not sealed before it is filled"
        );
        let exported = buffer.finish().unwrap();
        assert_eq!(*log.lock().unwrap(), ["sealed"]);
        let seal = exported.seal.expect("a sealed export names its seal");
        assert_eq!(seal.addr, 4096 + 48);
        assert_ne!(seal.nonce, [0; seal::SEAL_BYTES]);
        drop(exported);
        assert_eq!(*log.lock().unwrap(), ["sealed", "zeroed", "memory back"]);
        drop(bytes);
    }
}
