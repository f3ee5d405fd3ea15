//! The [`KvTransport`] between GPUs of one host: CUDA IPC, device to device.
//!
//! The UCX path moves a prompt's K/V device → pinned host memory → (UCX, shared memory) → host
//! memory → device: two trips over PCIe and one through the host's memory, tens of
//! milliseconds for a long prompt of an 8B model. When the context and the decode worker run
//! on GPUs of the same host, the K/V need not leave device memory, nor be copied out of the
//! context worker's cache at all:
//!
//! - A GPU context worker takes one IPC handle of its KV cache allocation at start
//!   (`cuIpcGetMemHandle`; the backend allocates the cache with plain `cuMemAlloc`, since
//!   memory of the stream-ordered allocator cannot be shared): [`KvTransport::expose_cache`].
//! - An export is the prompt's blocks where they lie in the cache, pinned by the engine until
//!   the export is released or expires ([`super::cache`]). The KV handle carries the cache's
//!   IPC handle, the host's id, each block's offset in the allocation, and the offset of the
//!   export's seal ([`super::seal`]) in the cache's export slab, written (and, when the export
//!   is freed, cleared before the blocks are unpinned) by a copy on this transport's stream
//!   that is synchronized before anything else happens. No export copy, no export pool, so no
//!   cap: any prompt the cache holds goes device to device.
//! - A decode worker on the same host maps the exporter's cache (`cuIpcOpenMemHandle`, once
//!   per exporter and device, kept open while the exporter's liveness word moves and closed
//!   soon after it stops, [`super::ipc_liveness`]; a restarted exporter has a new handle) and
//!   copies the blocks straight into the blocks its engine
//!   reserved for the request ([`CudaIpcTransport::pull_into_cache`]): copies queued back to
//!   back on one stream per destination GPU (across GPUs, over NVLink or PCIe peer to peer, by
//!   the copy engines, so the decode steps running beside them keep every SM), synchronized,
//!   then the seal copied out and checked, then the export released. The engine never copies
//!   imported K/V itself: the request joins the next step with its blocks already written.
//! - Tensor-parallel groups on either side ([`super::relayout`]): a group's context worker
//!   shares every rank's cache (one IPC handle each, [`CudaIpcTransport::expose_ranks`]) and
//!   its handle lists them in rank order; a decode worker of any tensor-parallel size copies
//!   from each source rank the heads each of its ranks holds (2-D copies when the sizes
//!   differ: the heads are re-laid on the way), so a 70B hand-over never leaves the GPUs.
//!
//! Pulling into the reserved blocks is sound because a reservation is the engine's promise
//! that nothing reads or writes those blocks until the request is started
//! ([`crate::engine::Engine::reserve_import`]): no step schedules a reserved sequence, and
//! blocks are handed out only once every step that touched them has been collected.
//!
//! The pool ([`KvTransport::reserve`]: the engine copies the blocks into a slice of this
//! transport's pool; [`KvTransport::pull`] into a slice of the reader's) remains for callers
//! without an exposed cache or a reserved destination (tests, benches).
//!
//! Whether a transfer takes this path is decided per request: the api-server tells the
//! context worker which generation worker will read (its heartbeat's `kv_peer`), and the
//! context worker exports for CUDA IPC only to a GPU reader on its host. A reader that
//! cannot map the handle after all (no peer access between the two GPUs, processes in
//! different IPC namespaces) fails the pull: the decode worker prefills locally and stops
//! advertising CUDA IPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaStream};

use super::cache::ExposedCache;
use super::ipc_liveness::{self, LIVENESS_PERIOD, LivenessWriter, MappingWatch, WORD_BYTES, Word};
use super::pool::SlicePool;
use super::relayout::{self, Copy2d, HeadSplit};
use super::seal::{Nonce, SEAL_BYTES, Seal, SealMemory, SealSlot};
use super::{
    BoxFuture, CudaIpcSource, DeviceRange, ExportBuffer, Exported, KvCacheMemory, KvTransport,
    KvTransportKind, PulledKv, RemoteKv, RemoteMemory, TransferError, from_hex, to_hex,
};
use crate::backend::KvMemory;
use crate::kv_cache::KvLayout;

/// The export slab slot of a shared cache that holds its liveness word ([`ipc_liveness`]).
const LIVENESS_SLOT: usize = 0;

/// Bytes of a CUDA IPC memory handle.
const HANDLE_BYTES: usize = 64;

type HandleBytes = [u8; HANDLE_BYTES];

/// The CUDA IPC transport of one GPU worker (cheap to share).
pub struct CudaIpcTransport {
    shared: Arc<Shared>,
}

struct Shared {
    /// The GPUs this transport copies on: a worker's one GPU, or a tensor-parallel group's,
    /// in rank order. Seals and the pool are on the first.
    devices: Vec<DeviceSide>,
    /// Pull destinations (and pool-slice exports); None for a worker that only exports from
    /// its cache or pulls into it.
    pool: Option<DevicePool>,
    host_id: String,
}

/// One GPU of the transport: its context, its copy stream and the exporters' memory mapped
/// into it.
struct DeviceSide {
    ctx: Arc<CudaContext>,
    /// Pulls copy on this stream, one at a time (each is a few milliseconds of copy work at
    /// most; serializing them keeps one stream's synchronize meaning one pull).
    stream: Mutex<Arc<CudaStream>>,
    uuid: String,
    /// Exporters' memory mapped into this device's context, by IPC handle, with what says
    /// when to close it.
    peers: Mutex<HashMap<HandleBytes, (Arc<PeerMapping>, MappingWatch)>>,
}

/// This worker's device memory for transfers: one allocation, its IPC handle, its slices.
struct DevicePool {
    ctx: Arc<CudaContext>,
    base: CUdeviceptr,
    len: usize,
    handle: HandleBytes,
    slices: Mutex<SlicePool>,
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        lock(local_pools()).remove(&self.handle);
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in `DevicePool::new`, freed once; every slice
            // guard holds the `Shared` that owns this pool, so no slice outlives it.
            if let Err(e) = unsafe { cudarc::driver::result::free_sync(self.base) } {
                tracing::debug!("freeing the CUDA IPC pool: {e}");
            }
        }
    }
}

/// Pools and exposed caches of this process, by IPC handle, with their sizes: CUDA refuses to
/// open a process's own handle, so a pull of a local export (tests, or two transports in one
/// process) uses the allocation's address directly.
fn local_pools() -> &'static Mutex<HashMap<HandleBytes, (CUdeviceptr, usize)>> {
    static POOLS: OnceLock<Mutex<HashMap<HandleBytes, (CUdeviceptr, usize)>>> = OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Another process's pool, mapped into this one; unmapped when the last user drops it.
struct PeerMapping {
    ctx: Arc<CudaContext>,
    base: CUdeviceptr,
    /// Bytes mapped, as the driver reports them (`cuMemGetAddressRange`), not as a KV
    /// handle announces them: what a pull's regions are bounded by.
    len: usize,
    /// A pool of this process (nothing to unmap).
    local: bool,
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        if self.local || self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: opened by `cuIpcOpenMemHandle` in `Shared::map_peer`, closed once, after
        // the last pull that copied from it (each holds an `Arc` of this mapping).
        let status = unsafe { sys::cuIpcCloseMemHandle(self.base) };
        if status != sys::CUresult::CUDA_SUCCESS {
            tracing::debug!("cuIpcCloseMemHandle: {status:?}");
        }
    }
}

/// Hands a slice of the pool back when dropped: the keepalive of an export, or of pulled K/V.
struct PoolSlice {
    shared: Arc<Shared>,
    offset: usize,
    len: usize,
}

impl Drop for PoolSlice {
    fn drop(&mut self) {
        if let Some(pool) = &self.shared.pool {
            lock(&pool.slices).give_back(self.offset, self.len);
        }
    }
}

/// The seal of an export, in device memory (a slot of a shared cache's export slab, or after a
/// pool-slice export's K/V): written by a copy on the transport's stream, synchronized before
/// [`SealMemory::write`] returns (so before the handle goes out, or before the blocks are
/// unpinned or the slice goes back to the pool, and any later owner's write is issued).
struct DeviceSeal {
    shared: Arc<Shared>,
    ptr: CUdeviceptr,
}

impl SealMemory for DeviceSeal {
    fn write(&self, bytes: &Nonce) -> Result<(), TransferError> {
        let device = self.shared.first();
        device
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let stream = lock(&device.stream);
        // SAFETY: `ptr` is the seal of memory this export holds (its slab slot, in a cache
        // the exposure keeps allocated, or its pool slice: either is let go of only after this
        // guard); `bytes` outlives the copy, which is synchronized below.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr, bytes, stream.cu_stream()) }
            .map_err(|e| cuda_error("writing a KV export's seal", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("writing a KV export's seal", e))
    }
}

/// Takes an exposed cache out of [`local_pools`] when dropped (its memory is the engine's).
struct LocalCache {
    handle: HandleBytes,
}

impl Drop for LocalCache {
    fn drop(&mut self) {
        lock(local_pools()).remove(&self.handle);
    }
}

/// Device memory of a pull that found no room in the pool; freed when dropped.
struct OwnAllocation {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
}

impl Drop for OwnAllocation {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in `Shared::destination`, freed once, after
            // the engine wrote the pulled K/V into its cache (this guard lives as long as the
            // `PulledKv`).
            if let Err(e) = unsafe { cudarc::driver::result::free_sync(self.ptr) } {
                tracing::debug!("freeing a CUDA IPC pull buffer: {e}");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn cuda_error(what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Backend(format!("{what}: {e}"))
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi prints it.
fn uuid_string(uuid: &sys::CUuuid) -> String {
    let hex: String = uuid
        .bytes
        .iter()
        .map(|&b| format!("{:02x}", b as u8))
        .collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl CudaIpcTransport {
    /// Allocates a device pool of `pool_bytes` on `cuda:{ordinal}` (0: none; every pull then
    /// allocates its own memory) and takes its IPC handle. `host_id` identifies this machine
    /// ([`super::host_id`]).
    pub fn start(
        ordinal: usize,
        pool_bytes: usize,
        host_id: String,
    ) -> Result<Self, TransferError> {
        Self::start_on(&[ordinal], pool_bytes, host_id)
    }

    /// The transport of a tensor-parallel group whose rank `r` runs on `cuda:{ordinals[r]}`:
    /// exports of every rank's cache ([`Self::expose_ranks`]) and pulls into every rank's
    /// ([`Self::pull_into_cache`]); no pool.
    pub fn start_group(ordinals: &[usize], host_id: String) -> Result<Self, TransferError> {
        Self::start_on(ordinals, 0, host_id)
    }

    fn start_on(
        ordinals: &[usize],
        pool_bytes: usize,
        host_id: String,
    ) -> Result<Self, TransferError> {
        if !crate::backend::cuda::driver_present() {
            return Err(TransferError::Backend(
                "CUDA IPC needs the NVIDIA driver (libcuda.so), which cannot be loaded here".into(),
            ));
        }
        if ordinals.is_empty() {
            return Err(TransferError::Backend("CUDA IPC on no GPU".into()));
        }
        let devices = ordinals
            .iter()
            .map(|&ordinal| DeviceSide::new(ordinal))
            .collect::<Result<Vec<_>, _>>()?;
        devices[0]
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let pool = (pool_bytes > 0)
            .then(|| DevicePool::new(&devices[0].ctx, pool_bytes))
            .transpose()?;
        tracing::info!(
            pool_mib = pool_bytes >> 20,
            devices = %devices.iter().map(|d| d.uuid.as_str()).collect::<Vec<_>>().join(","),
            "CUDA IPC ready: K/V moves device to device between GPU workers of this host"
        );
        let shared = Arc::new(Shared {
            devices,
            pool,
            host_id,
        });
        ipc_liveness::spawn_watcher(Arc::downgrade(&shared), |shared: &Shared| {
            for device in &shared.devices {
                device.check_mappings();
            }
        })
        .map_err(|e| {
            TransferError::Backend(format!("starting the CUDA IPC mappings' watcher: {e}"))
        })?;
        Ok(Self { shared })
    }
}

impl CudaIpcTransport {
    /// Shares a tensor-parallel group's KV cache: rank `r`'s part (`ranks[r]`, on this
    /// transport's `r`-th GPU) under an IPC handle of its own, taken once. Exports are the
    /// pinned blocks, at the same offset in every rank's allocation, and their seals slots of
    /// the first rank's export slab; handles list the ranks' allocations in order
    /// ([`tandem_protocol::messages::KvHandle::cuda_ipc_ranks`]).
    ///
    /// # Safety
    /// As [`KvTransport::expose_cache`], for every rank's allocation.
    pub unsafe fn expose_ranks(
        &self,
        ranks: Vec<KvCacheMemory>,
        owner: Box<dyn Send + Sync>,
    ) -> Result<Arc<ExposedCache>, TransferError> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.shared.expose(ranks, owner) }
    }

    /// Copies the K/V `remote` names straight into `into`'s blocks of this worker's cache
    /// (one part per GPU of this transport), whatever the tensor-parallel sizes of the two
    /// sides; then checks the export's seal. Returns the bytes copied. A device-to-device copy
    /// cannot wait on a dead peer (the mapping keeps the memory): the caller checks the
    /// handle's expiry before pulling.
    ///
    /// # Safety
    /// `into.shards` must describe this worker's cache, alive until the future completes, and
    /// `into.blocks` blocks that nothing else reads or writes until then (reserved for this
    /// pull, [`crate::engine::Engine::reserve_import`]). What the copies write there is K/V to
    /// use only if the pull succeeds (a changed seal leaves whatever was read).
    pub unsafe fn pull_into_cache(
        &self,
        remote: RemoteKv,
        into: CacheBlocks,
    ) -> BoxFuture<Result<u64, TransferError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.pull_into_cache_blocking(&remote, &into))
                .await
                .map_err(|e| TransferError::Backend(format!("the CUDA IPC copy task: {e}")))?
        })
    }

    /// The GPUs this transport copies on.
    pub fn devices(&self) -> usize {
        self.shared.devices.len()
    }

    /// Maps a context worker's shared cache (`sources`, one allocation per rank, from its
    /// heartbeat) before its first hand-over, on the devices that will read it
    /// ([`premap_pairs`]); mappings already open are reused, so calling it again costs a
    /// lookup. Blocking: mapping a whole cache takes most of a second. Returns how many
    /// mappings this call opened.
    pub fn premap(&self, sources: &[CudaIpcSource]) -> Result<usize, TransferError> {
        let sources = self.shared.parse_sources(sources)?;
        let mut opened = 0;
        for (source, device) in premap_pairs(sources.len(), self.shared.devices.len()) {
            let device = &self.shared.devices[device];
            device.bind()?;
            let (source, handle) = sources[source];
            let (_, new) = device.open_peer(handle, source.liveness_offset)?;
            opened += usize::from(new);
        }
        Ok(opened)
    }
}

/// Which (source rank, device) pairs a pull from an exporter of `sources` ranks into a reader
/// of `devices` GPUs reads: rank `r` on device `r` where the two splits are equal (each rank's
/// heads go to the same rank), every source on every device otherwise (a conservative set
/// for unequal splits, where a device reads the ranks whose heads overlap its own).
pub fn premap_pairs(sources: usize, devices: usize) -> Vec<(usize, usize)> {
    if sources == devices {
        (0..sources).map(|r| (r, r)).collect()
    } else {
        (0..sources)
            .flat_map(|s| (0..devices).map(move |d| (s, d)))
            .collect()
    }
}

impl Shared {
    /// Takes an IPC handle of each rank's cache allocation (one, for a single GPU).
    ///
    /// # Safety
    /// As [`KvTransport::expose_cache`], for every allocation.
    unsafe fn expose(
        self: &Arc<Self>,
        ranks: Vec<KvCacheMemory>,
        owner: Box<dyn Send + Sync>,
    ) -> Result<Arc<ExposedCache>, TransferError> {
        if ranks.len() != self.devices.len() {
            return Err(TransferError::Backend(format!(
                "a cache of {} parts for a transport on {} GPUs",
                ranks.len(),
                self.devices.len()
            )));
        }
        let first = ranks[0];
        // Slot 0 of every rank's export slab holds its liveness word, not a seal.
        let liveness_offset = first.slot_offset(LIVENESS_SLOT);
        let mut sources = Vec::with_capacity(ranks.len());
        let mut registrations = Vec::with_capacity(ranks.len());
        let mut words = Vec::with_capacity(ranks.len());
        let mut first_ptr = 0;
        for (r, (rank, device)) in ranks.iter().zip(&self.devices).enumerate() {
            let KvMemory::Device(range) = rank.memory else {
                return Err(TransferError::Backend(format!(
                    "rank {r}'s KV cache is not device memory"
                )));
            };
            if (rank.block_bytes, rank.num_blocks, rank.slab_offset)
                != (first.block_bytes, first.num_blocks, first.slab_offset)
            {
                return Err(TransferError::Backend(format!(
                    "rank {r}'s KV cache is not shaped as rank 0's ({rank:?} and {first:?})"
                )));
            }
            device.bind()?;
            let mut raw = sys::CUipcMemHandle_st {
                reserved: [0; HANDLE_BYTES],
            };
            // SAFETY: the caller's promise: `range` is the rank's cache allocation, alive
            // while `owner` is; the driver refuses anything that is not the start of one.
            unsafe { sys::cuIpcGetMemHandle(&mut raw, range.ptr) }
                .result()
                .map_err(|e| cuda_error("cuIpcGetMemHandle on the KV cache", e))?;
            let handle: HandleBytes = raw.reserved.map(|b| b as u8);
            lock(local_pools()).insert(handle, (range.ptr, range.len));
            registrations.push(LocalCache { handle });
            sources.push(self.source(r, &handle, range.len, Some(liveness_offset as u64)));
            words.push(range.ptr + liveness_offset as u64);
            if r == 0 {
                first_ptr = range.ptr;
            }
        }
        tracing::info!(
            mib = first.memory.len() >> 20,
            ranks = ranks.len(),
            "KV cache shared over CUDA IPC: GPU decode workers of this host read exports \
             straight out of it"
        );
        // Stopped (and waited for) when the exposure is dropped, before `owner` frees the
        // memory it writes.
        let writer = Arc::clone(self);
        let liveness = LivenessWriter::spawn(LIVENESS_PERIOD, move |word| {
            writer.write_liveness(&words, word)
        })
        .map_err(|e| {
            TransferError::Backend(format!("starting the KV cache's liveness writer: {e}"))
        })?;
        let seals = Arc::clone(self);
        let (exposed, reserved) = ExposedCache::new(
            RemoteMemory::CudaIpc(sources),
            0,
            first,
            Box::new(move |offset| {
                Box::new(DeviceSeal {
                    shared: Arc::clone(&seals),
                    ptr: first_ptr + offset as u64,
                })
            }),
            Box::new((liveness, registrations)),
            owner,
        )
        .reserve_slot(LIVENESS_SLOT);
        debug_assert_eq!(reserved, liveness_offset);
        Ok(Arc::new(exposed))
    }

    /// Writes `word` at each rank's liveness word (`ptrs[r]`, on the transport's `r`-th GPU).
    fn write_liveness(&self, ptrs: &[CUdeviceptr], word: &Word) -> Result<(), String> {
        for (&ptr, device) in ptrs.iter().zip(&self.devices) {
            device.bind().map_err(|e| e.to_string())?;
            let stream = lock(&device.stream);
            // SAFETY: `ptr` is the liveness slot of this rank's cache allocation, which the
            // exposure keeps allocated until after this writer has stopped; `word` outlives
            // the copy, which is synchronized below.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(ptr, &word[..], stream.cu_stream())
            }
            .map_err(|e| e.to_string())?;
            stream.synchronize().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl DeviceSide {
    fn new(ordinal: usize) -> Result<Self, TransferError> {
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error("CUDA context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let uuid = ctx
            .uuid()
            .map(|u| uuid_string(&u))
            .map_err(|e| cuda_error("reading the GPU's UUID", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("CUDA IPC stream", e))?;
        Ok(Self {
            ctx,
            stream: Mutex::new(stream),
            uuid,
            peers: Mutex::new(HashMap::new()),
        })
    }

    fn bind(&self) -> Result<(), TransferError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))
    }

    /// The exporter's allocation mapped into this device's context (opened once, kept open
    /// while its exporter runs: [`ipc_liveness`]), its liveness word at `word_offset` where
    /// the handle names one. The caller has bound the context.
    fn map_peer(
        &self,
        handle: HandleBytes,
        word_offset: Option<u64>,
    ) -> Result<Arc<PeerMapping>, TransferError> {
        self.open_peer(handle, word_offset)
            .map(|(mapping, _)| mapping)
    }

    /// [`Self::map_peer`], and whether this call opened the mapping (it was not open).
    fn open_peer(
        &self,
        handle: HandleBytes,
        word_offset: Option<u64>,
    ) -> Result<(Arc<PeerMapping>, bool), TransferError> {
        let mut peers = lock(&self.peers);
        let now = Instant::now();
        if let Some((mapping, watch)) = peers.get_mut(&handle) {
            watch.used(now, word_offset);
            return Ok((Arc::clone(mapping), false));
        }
        let mapping = match lock(local_pools()).get(&handle) {
            Some(&(base, len)) => PeerMapping {
                ctx: Arc::clone(&self.ctx),
                base,
                len,
                local: true,
            },
            None => {
                let raw = sys::CUipcMemHandle_st {
                    reserved: handle.map(|b| b as _),
                };
                let mut base: CUdeviceptr = 0;
                // SAFETY: `raw` is a handle from a KV handle of this host; the driver checks
                // it. Lazy peer access lets memory on another GPU be mapped.
                let status = unsafe {
                    sys::cuIpcOpenMemHandle_v2(
                        &mut base,
                        raw,
                        sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                    )
                };
                status.result().map_err(|e| {
                    TransferError::Unavailable(format!(
                        "mapping the context worker's GPU memory (cuIpcOpenMemHandle): {e}"
                    ))
                })?;
                // Mapped now: dropping it unmaps, also when the size cannot be read.
                let mut mapping = PeerMapping {
                    ctx: Arc::clone(&self.ctx),
                    base,
                    len: 0,
                    local: false,
                };
                let (mut start, mut len): (CUdeviceptr, usize) = (0, 0);
                // SAFETY: `base` was just mapped in this context; the driver writes the two
                // outputs.
                let status = unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut len, base) };
                status.result().map_err(|e| {
                    TransferError::Unavailable(format!(
                        "reading the size of the context worker's GPU memory \
                         (cuMemGetAddressRange): {e}"
                    ))
                })?;
                mapping.len = len.saturating_sub((base - start) as usize);
                mapping
            }
        };
        let mapping = Arc::new(mapping);
        // A word outside the mapping (a handle that misstates it) is not watched.
        let word_offset = word_offset.filter(|&offset| {
            offset
                .checked_add(WORD_BYTES as u64)
                .is_some_and(|end| end <= mapping.len as u64)
        });
        peers.insert(
            handle,
            (Arc::clone(&mapping), MappingWatch::new(now, word_offset)),
        );
        Ok((mapping, true))
    }

    /// Reads the liveness words of the exporters mapped here, then closes the mappings whose
    /// exporters stopped (or, without a word, that no pull used for a minute). A mapping a
    /// pull is copying through stays mapped until that pull drops it.
    fn check_mappings(&self) {
        let watched: Vec<(HandleBytes, Arc<PeerMapping>, u64)> = lock(&self.peers)
            .iter()
            .filter(|(_, (mapping, _))| !mapping.local)
            .filter_map(|(handle, (mapping, watch))| {
                watch
                    .word_offset()
                    .map(|offset| (*handle, Arc::clone(mapping), offset))
            })
            .collect();
        let mut words = Vec::with_capacity(watched.len());
        if !watched.is_empty() && self.bind().is_ok() {
            for (handle, mapping, offset) in &watched {
                match self.read_word(mapping, *offset) {
                    Ok(word) => words.push((*handle, word)),
                    Err(e) => tracing::debug!("reading a KV exporter's liveness word: {e}"),
                }
            }
        }
        drop(watched);
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut peers = lock(&self.peers);
            for (handle, word) in words {
                if let Some((_, watch)) = peers.get_mut(&handle) {
                    watch.saw(word, now);
                }
            }
            peers.retain(|_, (mapping, watch)| match watch.close_reason(now) {
                Some(reason) => {
                    closed.push((Arc::clone(mapping), reason));
                    false
                }
                None => true,
            });
        }
        // Unmapping a large allocation takes a while: outside the lock.
        for (mapping, reason) in closed {
            tracing::info!(
                device = %self.uuid,
                mib = mapping.len >> 20,
                "closing the CUDA IPC mapping of a context worker's KV cache: {reason}"
            );
            drop(mapping);
        }
    }

    /// The liveness word at `offset` in `mapping`, read on this device's copy stream. The
    /// caller has bound the context.
    fn read_word(&self, mapping: &PeerMapping, offset: u64) -> Result<Word, TransferError> {
        let stream = lock(&self.stream);
        let mut word: Word = [0; WORD_BYTES];
        // SAFETY: the word lies inside the mapping (checked when it was watched); `word`
        // outlives the copy, which is synchronized before it is looked at.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut word,
                mapping.base + offset,
                stream.cu_stream(),
            )
        }
        .map_err(|e| cuda_error("reading a liveness word", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("reading a liveness word", e))?;
        Ok(word)
    }
}

impl DevicePool {
    fn new(ctx: &Arc<CudaContext>, pool_bytes: usize) -> Result<Self, TransferError> {
        // SAFETY: a plain allocation; nothing reads a slice before an export or a pull has
        // written it.
        let base = unsafe { cudarc::driver::result::malloc_sync(pool_bytes) }.map_err(|e| {
            cuda_error(
                &format!(
                    "allocating {} MiB of device memory for the CUDA IPC pool",
                    pool_bytes >> 20
                ),
                e,
            )
        })?;
        let mut raw = sys::CUipcMemHandle_st {
            reserved: [0; HANDLE_BYTES],
        };
        // SAFETY: `base` is the start of a `cuMemAlloc` allocation of this context.
        let status = unsafe { sys::cuIpcGetMemHandle(&mut raw, base) };
        let pool = DevicePool {
            ctx: Arc::clone(ctx),
            base,
            len: pool_bytes,
            handle: raw.reserved.map(|b| b as u8),
            slices: Mutex::new(SlicePool::new(pool_bytes)),
        };
        status
            .result()
            .map_err(|e| cuda_error("cuIpcGetMemHandle on the CUDA IPC pool", e))?;
        lock(local_pools()).insert(pool.handle, (base, pool_bytes));
        Ok(pool)
    }
}

impl Shared {
    /// The first device: where seals and the pool are.
    fn first(&self) -> &DeviceSide {
        &self.devices[0]
    }

    /// How a reader reaches the allocation on device `device` whose IPC handle is `handle`,
    /// of `len` bytes, with its liveness word at `liveness_offset` (a shared cache's).
    fn source(
        &self,
        device: usize,
        handle: &HandleBytes,
        len: usize,
        liveness_offset: Option<u64>,
    ) -> CudaIpcSource {
        CudaIpcSource {
            host_id: self.host_id.clone(),
            device: self.devices[device].uuid.clone(),
            mem_handle: to_hex(handle),
            alloc_bytes: len as u64,
            liveness_offset,
        }
    }

    /// Bytes of the pool not handed out.
    fn pool_free_bytes(&self) -> usize {
        self.pool
            .as_ref()
            .map_or(0, |pool| lock(&pool.slices).free_bytes())
    }

    /// A free slice of `len` bytes of the pool and its guard.
    fn take(self: &Arc<Self>, len: usize) -> Option<(DeviceRange, PoolSlice)> {
        let pool = self.pool.as_ref()?;
        let offset = lock(&pool.slices).take(len)?;
        let range = DeviceRange {
            ptr: pool.base + offset as u64,
            len,
        };
        let guard = PoolSlice {
            shared: Arc::clone(self),
            offset,
            len,
        };
        Some((range, guard))
    }

    /// Device memory for a pull of `len` bytes: a pool slice, or an allocation of its own.
    fn destination(
        self: &Arc<Self>,
        len: usize,
    ) -> Result<(DeviceRange, bool, Box<dyn Send + Sync>), TransferError> {
        if let Some((range, guard)) = self.take(len) {
            return Ok((range, true, Box::new(guard)));
        }
        tracing::debug!(
            len,
            free = self.pool_free_bytes(),
            "CUDA IPC pool has no free slice this long; allocating device memory for this pull"
        );
        // SAFETY: written by the pull's copies before anything reads it.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(len.max(1)) }.map_err(|e| {
            TransferError::Unavailable(format!("allocating {len} bytes of device memory: {e}"))
        })?;
        let guard = OwnAllocation {
            ctx: Arc::clone(&self.first().ctx),
            ptr,
        };
        Ok((DeviceRange { ptr, len }, false, Box::new(guard)))
    }

    /// The exporter's allocations, as the handle names them: checked to be of this host and
    /// parsed.
    fn sources<'a>(
        &self,
        remote: &'a RemoteKv,
    ) -> Result<Vec<(&'a CudaIpcSource, HandleBytes)>, TransferError> {
        let RemoteMemory::CudaIpc(sources) = &remote.memory else {
            return Err(TransferError::InvalidHandle(
                "a CUDA IPC handle without its allocation".into(),
            ));
        };
        if sources.is_empty() {
            return Err(TransferError::InvalidHandle(
                "a CUDA IPC handle without its allocation".into(),
            ));
        }
        self.parse_sources(sources)
    }

    /// Each source with its IPC handle, once checked to be of this host.
    fn parse_sources<'a>(
        &self,
        sources: &'a [CudaIpcSource],
    ) -> Result<Vec<(&'a CudaIpcSource, HandleBytes)>, TransferError> {
        sources
            .iter()
            .map(|source| {
                if source.host_id != self.host_id {
                    return Err(TransferError::InvalidHandle(format!(
                        "the K/V is in GPU memory of another host (host id {}, this one is {})",
                        source.host_id, self.host_id
                    )));
                }
                let handle: HandleBytes =
                    from_hex(&source.mem_handle)?.try_into().map_err(|_| {
                        TransferError::InvalidHandle("a CUDA IPC handle is 64 bytes".into())
                    })?;
                Ok((source, handle))
            })
            .collect()
    }

    /// Reads the export's seal out of `mapping` (the first allocation's, mapped on the first
    /// device) once the K/V copies are complete, and checks it ([`super::seal`]).
    fn check_seal(&self, mapping: &PeerMapping, seal: Option<Seal>) -> Result<(), TransferError> {
        let Some(seal) = seal else {
            return Ok(());
        };
        let device = self.first();
        device.bind()?;
        let stream = lock(&device.stream);
        let mut read: Nonce = [0; SEAL_BYTES];
        // SAFETY: the seal lies inside the mapping (the caller checked); `read` outlives the
        // copy, which is synchronized before it is looked at.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut read,
                mapping.base + seal.addr,
                stream.cu_stream(),
            )
        }
        .map_err(|e| TransferError::Unavailable(format!("reading the KV export's seal: {e}")))?;
        stream.synchronize().map_err(|e| {
            TransferError::Unavailable(format!("reading the KV export's seal: {e}"))
        })?;
        seal.check(&read)
    }

    /// Copies `remote`'s regions out of the exporter's allocation into device memory of ours.
    fn pull_blocking(self: &Arc<Self>, remote: &RemoteKv) -> Result<PulledKv, TransferError> {
        let sources = self.sources(remote)?;
        let [(source, handle)] = sources[..] else {
            return Err(TransferError::InvalidHandle(format!(
                "K/V in {} allocations (a tensor-parallel exporter) is pulled into a cache, \
                 not a buffer",
                sources.len()
            )));
        };
        let regions = remote.coalesced();
        // The seal is read from the allocation too: it is bounded like the regions.
        let read: Vec<(u64, u64)> = regions
            .iter()
            .copied()
            .chain(remote.seal.map(|seal| seal.region()))
            .collect();
        check_regions(&read, source.alloc_bytes, "the exported allocation")?;
        let device = self.first();
        device.bind()?;
        let peer = device.map_peer(handle, source.liveness_offset)?;
        // The handle's `alloc_bytes` is its word; the mapping's size is the driver's.
        check_regions(&read, peer.len as u64, "the memory the handle maps")?;
        let len = remote.total_len() as usize;
        let (into, lent, guard) = self.destination(len)?;
        let stream = lock(&device.stream);
        let mut at = into.ptr;
        for &(addr, region_len) in &regions {
            // SAFETY: the source lies inside the mapped allocation (checked above against the
            // size the driver reports) and the destination inside `into` (the regions add up
            // to its length); the stream is synchronized before either is released.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    at,
                    peer.base + addr,
                    region_len as usize,
                    stream.cu_stream(),
                )
            }
            .map_err(|e| {
                TransferError::Unavailable(format!("copying the K/V between GPUs: {e}"))
            })?;
            at += region_len;
        }
        stream.synchronize().map_err(|e| {
            TransferError::Unavailable(format!("copying the K/V between GPUs: {e}"))
        })?;
        drop(stream);
        // SAFETY: `into` is device memory kept by `guard` and written completely above.
        let pulled = unsafe { PulledKv::on_device(into, lent, guard) };
        // The K/V copies are complete (synchronized): only now is the seal read.
        self.check_seal(&peer, remote.seal)?;
        Ok(pulled)
    }

    /// Copies `remote`'s blocks into `into`'s blocks of this worker's cache, re-laying the
    /// heads where the exporter splits them over another number of ranks; returns the bytes
    /// copied.
    fn pull_into_cache_blocking(
        &self,
        remote: &RemoteKv,
        into: &CacheBlocks,
    ) -> Result<u64, TransferError> {
        let sources = self.sources(remote)?;
        if into.shards.len() != self.devices.len() {
            return Err(TransferError::Backend(format!(
                "a cache of {} shards for a transport on {} GPUs",
                into.shards.len(),
                self.devices.len()
            )));
        }
        let from = HeadSplit::new(into.layout, sources.len()).map_err(|e| {
            TransferError::InvalidHandle(format!("the exporter's tensor-parallel split: {e}"))
        })?;
        let to = HeadSplit::new(into.layout, into.shards.len()).map_err(TransferError::Backend)?;
        let src_block = from.block_bytes() as u64;
        let mut offsets = Vec::with_capacity(into.blocks.len());
        for &(addr, len) in &remote.regions {
            if len == 0 || len % src_block != 0 {
                return Err(TransferError::InvalidHandle(format!(
                    "a region of {len} bytes, for blocks of {src_block} bytes a rank"
                )));
            }
            offsets.extend((0..len / src_block).map(|k| addr + k * src_block));
        }
        let copies = relayout::plan(&from, &offsets, &to, &into.blocks)
            .map_err(TransferError::InvalidHandle)?;
        // Every source byte inside its allocation as the handle states it (and, below, as
        // the driver maps it); the seal inside the first; every destination byte inside the
        // blocks of the cache.
        let mut reads: Vec<Vec<(u64, u64)>> = vec![Vec::new(); sources.len()];
        for copy in &copies {
            reads[copy.src_shard].push((copy.src_offset, copy.src_end() - copy.src_offset));
        }
        reads[0].extend(remote.seal.map(|seal| seal.region()));
        for (read, (source, _)) in reads.iter().zip(&sources) {
            check_regions(read, source.alloc_bytes, "the exported allocation")?;
        }
        for (shard, cache) in into.shards.iter().enumerate() {
            let blocks_end = (cache.num_blocks * cache.block_bytes) as u64;
            if cache.block_bytes != to.block_bytes() || !matches!(cache.memory, KvMemory::Device(_))
            {
                return Err(TransferError::Backend(format!(
                    "cache shard {shard} is not device memory of {}-byte blocks",
                    to.block_bytes()
                )));
            }
            if let Some(copy) = copies
                .iter()
                .find(|c| c.dst_shard == shard && c.dst_end() > blocks_end)
            {
                return Err(TransferError::Backend(format!(
                    "a copy to {}..{} is past the cache's {blocks_end} bytes of blocks",
                    copy.dst_offset,
                    copy.dst_end()
                )));
            }
        }
        // Each destination GPU maps the sources it reads and queues its copies; all GPUs copy
        // at once, then each stream is synchronized.
        let mut first_mapping = None;
        let mut streams = Vec::with_capacity(self.devices.len());
        for (shard, device) in self.devices.iter().enumerate() {
            let KvMemory::Device(cache) = into.shards[shard].memory else {
                unreachable!("checked above");
            };
            device.bind()?;
            let mut mapped: HashMap<usize, Arc<PeerMapping>> = HashMap::new();
            for copy in copies.iter().filter(|c| c.dst_shard == shard) {
                if let std::collections::hash_map::Entry::Vacant(entry) =
                    mapped.entry(copy.src_shard)
                {
                    let (source, handle) = sources[copy.src_shard];
                    let mapping = device.map_peer(handle, source.liveness_offset)?;
                    check_regions(
                        &reads[copy.src_shard],
                        mapping.len as u64,
                        "the memory the handle maps",
                    )?;
                    entry.insert(mapping);
                }
            }
            let stream = lock(&device.stream);
            for copy in copies.iter().filter(|c| c.dst_shard == shard) {
                let source = &mapped[&copy.src_shard];
                // SAFETY: the source lies inside the mapped allocation and the destination
                // inside the cache's blocks (both checked above); the blocks are reserved for
                // this pull (the caller's promise), and the stream is synchronized before this
                // returns.
                unsafe { copy_on(stream.cu_stream(), source.base, cache.ptr, copy) }.map_err(
                    |e| TransferError::Unavailable(format!("copying the K/V between GPUs: {e}")),
                )?;
            }
            if shard == 0 {
                // The seal is read through the first device's mapping of the first source.
                first_mapping = Some(match mapped.get(&0) {
                    Some(mapping) => Arc::clone(mapping),
                    None => {
                        let mapping =
                            device.map_peer(sources[0].1, sources[0].0.liveness_offset)?;
                        check_regions(&reads[0], mapping.len as u64, "the memory the handle maps")?;
                        mapping
                    }
                });
            }
            streams.push(stream);
        }
        for (device, stream) in self.devices.iter().zip(&streams) {
            device.bind()?;
            stream.synchronize().map_err(|e| {
                TransferError::Unavailable(format!("copying the K/V between GPUs: {e}"))
            })?;
        }
        drop(streams);
        let mapping = first_mapping.expect("the first device maps the first source");
        self.check_seal(&mapping, remote.seal)?;
        Ok(copies.iter().map(Copy2d::bytes).sum())
    }
}

/// Queues `copy` on `stream`: from the allocation mapped at `src_base` to the one at
/// `dst_base`, contiguous or row by row (the copy engines handle both in one call).
///
/// # Safety
/// Both ranges must lie inside live allocations of the stream's context (or mapped into it),
/// and stay so until the stream is synchronized.
unsafe fn copy_on(
    stream: sys::CUstream,
    src_base: CUdeviceptr,
    dst_base: CUdeviceptr,
    copy: &Copy2d,
) -> Result<(), cudarc::driver::DriverError> {
    let (src, dst) = (src_base + copy.src_offset, dst_base + copy.dst_offset);
    if copy.height == 1 {
        // SAFETY: the caller's promise.
        return unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, copy.width, stream) };
    }
    let params = sys::CUDA_MEMCPY2D_st {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: copy.src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: copy.dst_pitch,
        WidthInBytes: copy.width,
        Height: copy.height,
    };
    // SAFETY: the caller's promise; `params` outlives the call, which reads it before
    // returning.
    unsafe { sys::cuMemcpy2DAsync_v2(&params, stream) }.result()
}

/// Where a pull into the cache writes: blocks a decode worker's engine reserved for the
/// request, in its cache (one allocation per GPU of the transport, in rank order).
#[derive(Debug, Clone)]
pub struct CacheBlocks {
    /// The whole model's layout (every KV head), as the handle states it.
    pub layout: KvLayout,
    /// The cache, as each rank's backend describes its part.
    pub shards: Vec<KvCacheMemory>,
    /// The reserved blocks, in the prompt's order.
    pub blocks: Vec<u32>,
}

/// Whether every region (offset, length) lies inside `alloc_bytes` bytes (`what`, for the
/// error): a region past it would make the copy read memory outside the export, or fault.
fn check_regions(
    regions: &[(u64, u64)],
    alloc_bytes: u64,
    what: &str,
) -> Result<(), TransferError> {
    match regions
        .iter()
        .find(|&&(addr, len)| addr.checked_add(len).is_none_or(|end| end > alloc_bytes))
    {
        Some(&(addr, len)) => Err(TransferError::InvalidHandle(format!(
            "region {addr}+{len} is outside {what} of {alloc_bytes} bytes"
        ))),
        None => Ok(()),
    }
}

impl KvTransport for CudaIpcTransport {
    fn backend(&self) -> KvTransportKind {
        KvTransportKind::CudaIpc
    }

    /// A slice of the device pool, for the engine to copy the blocks into, and the export's
    /// seal after them; an error (the caller exports through host memory instead) when the
    /// pool has no room.
    fn reserve(&self, len: usize) -> BoxFuture<Result<ExportBuffer, TransferError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let Some((pool, (slice, guard))) = shared
                .pool
                .as_ref()
                .and_then(|pool| Some((pool, shared.take(len + SEAL_BYTES)?)))
            else {
                return Err(TransferError::Unavailable(format!(
                    "the CUDA IPC pool has no free slice of {len} bytes ({} of {} free)",
                    shared.pool_free_bytes(),
                    shared.pool.as_ref().map_or(0, |pool| pool.len)
                )));
            };
            let offset = slice.ptr - pool.base;
            let exported = Exported {
                memory: RemoteMemory::CudaIpc(vec![shared.source(0, &pool.handle, pool.len, None)]),
                regions: vec![(offset, len as u64)],
                seal: None,
                keepalive: Box::new(guard),
            };
            let seal = DeviceSeal {
                shared: Arc::clone(&shared),
                ptr: slice.ptr + len as u64,
            };
            let range = DeviceRange {
                ptr: slice.ptr,
                len,
            };
            // SAFETY: the slice is this export's until its keepalive hands it back; the K/V
            // is its first `len` bytes, the seal the rest.
            let buffer = unsafe { ExportBuffer::on_device(range, exported) };
            Ok(buffer.with_seal(SealSlot {
                addr: offset + len as u64,
                memory: Box::new(seal),
            }))
        })
    }

    /// Takes the IPC handle of a device cache (the start of a `cuMemAlloc` allocation) once:
    /// exports are then its pinned blocks, and their seals slots of its export slab. A host
    /// cache is not this transport's.
    unsafe fn expose_cache(
        &self,
        cache: KvCacheMemory,
        owner: Box<dyn Send + Sync>,
    ) -> BoxFuture<Result<Option<Arc<ExposedCache>>, TransferError>> {
        if !matches!(cache.memory, KvMemory::Device(_)) {
            return Box::pin(async { Ok(None) });
        }
        let shared = Arc::clone(&self.shared);
        // SAFETY: the caller's promise, passed on.
        Box::pin(async move { unsafe { shared.expose(vec![cache], owner) }.map(Some) })
    }

    /// Copies the exporter's blocks into device memory of this worker. A device-to-device
    /// copy cannot wait on a dead peer (the mapping keeps the memory), so `timeout` is not
    /// needed; the caller checks the handle's expiry before pulling.
    fn pull(
        &self,
        remote: RemoteKv,
        _timeout: Duration,
    ) -> BoxFuture<Result<PulledKv, TransferError>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.pull_blocking(&remote))
                .await
                .map_err(|e| TransferError::Backend(format!("the CUDA IPC copy task: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_splits_premap_rank_to_rank_and_others_every_pair() {
        assert_eq!(premap_pairs(1, 1), [(0, 0)]);
        assert_eq!(premap_pairs(2, 2), [(0, 0), (1, 1)]);
        assert_eq!(premap_pairs(1, 2), [(0, 0), (0, 1)]);
        assert_eq!(premap_pairs(2, 1), [(0, 0), (1, 0)]);
    }

    #[test]
    fn uuids_read_like_nvidia_smi() {
        let uuid = sys::CUuuid {
            bytes: [
                0x5c, 0x1e, 0x2a, 0x0b, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
                0xbb, 0xcc,
            ]
            .map(|b: u8| b as _),
        };
        assert_eq!(
            uuid_string(&uuid),
            "GPU-5c1e2a0b-1122-3344-5566-778899aabbcc"
        );
    }

    #[test]
    fn regions_past_the_allocation_are_refused_before_any_copy() {
        assert!(check_regions(&[(0, 64), (64, 64)], 128, "the pool").is_ok());
        for (regions, needle) in [
            (
                vec![(0, 64), (96, 64)],
                "region 96+64 is outside the pool of 128 bytes",
            ),
            (vec![(128, 1)], "region 128+1"),
            (vec![(u64::MAX - 1, 4)], "outside the pool"),
        ] {
            let err = check_regions(&regions, 128, "the pool")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} (wanted {needle:?})");
        }
    }

    #[test]
    fn without_a_driver_the_transport_says_so() {
        if crate::backend::cuda::driver_present() {
            // A GPU machine: the GPU tests start the transport for real.
            tandem_test_skip::skip("a CUDA driver is present");
            return;
        }
        let err = CudaIpcTransport::start(0, 1 << 20, "host".into())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("libcuda.so"), "{err}");
    }
}
