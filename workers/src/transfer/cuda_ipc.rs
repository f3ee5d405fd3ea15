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
//!   per exporter, closed when unused for [`IDLE_MAPPING_CLOSE`]; a restarted exporter has a
//!   new handle) and gathers the blocks, one copy each, queued back to back on one stream
//!   (across GPUs, the copies go over NVLink or PCIe peer to peer) into a slice of its own
//!   pool (or an allocation of its own when the pool is full: never a fallback),
//!   synchronizes, then copies the seal out and checks it, then releases the export; its
//!   engine writes the slice into its cache, device to device again.
//!
//! The pull copies into the decode worker's own memory rather than straight into its cache
//! blocks: the engine thread owns the cache, and the pull runs beside it; one extra
//! device-to-device copy of the prompt (HBM bandwidth, well under a millisecond for a
//! thousand tokens of an 8B model) keeps the cache the engine's alone.
//!
//! The pool-slice export ([`KvTransport::reserve`]: the engine copies the blocks into a slice
//! of this transport's pool) remains for callers without an exposed cache (tests, benches).
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
use super::pool::SlicePool;
use super::seal::{Nonce, SEAL_BYTES, SealMemory, SealSlot};
use super::{
    BoxFuture, CudaIpcSource, DeviceRange, ExportBuffer, Exported, KvCacheMemory, KvTransport,
    KvTransportKind, PulledKv, RemoteKv, RemoteMemory, TransferError, from_hex, to_hex,
};
use crate::backend::KvMemory;

/// A peer's pool mapped into this process is closed after this long without a pull: a
/// context worker that left must not keep its memory alive through our mapping.
pub const IDLE_MAPPING_CLOSE: Duration = Duration::from_secs(60);

/// Bytes of a CUDA IPC memory handle.
const HANDLE_BYTES: usize = 64;

type HandleBytes = [u8; HANDLE_BYTES];

/// The CUDA IPC transport of one GPU worker (cheap to share).
pub struct CudaIpcTransport {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<CudaContext>,
    /// Pulls copy on this stream, one at a time (each is well under a millisecond of copy
    /// work; serializing them keeps one stream's synchronize meaning one pull).
    stream: Mutex<Arc<CudaStream>>,
    /// Pull destinations (and pool-slice exports); None for a worker that only exports from
    /// its cache.
    pool: Option<DevicePool>,
    host_id: String,
    device_uuid: String,
    /// Exporters' pools mapped into this process, by IPC handle, with their last use.
    peers: Mutex<HashMap<HandleBytes, (Arc<PeerMapping>, Instant)>>,
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
        self.shared
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let stream = lock(&self.shared.stream);
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
        if !crate::backend::cuda::driver_present() {
            return Err(TransferError::Backend(
                "CUDA IPC needs the NVIDIA driver (libcuda.so), which cannot be loaded here".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error("CUDA context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let device_uuid = ctx
            .uuid()
            .map(|u| uuid_string(&u))
            .map_err(|e| cuda_error("reading the GPU's UUID", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("CUDA IPC stream", e))?;
        let pool = (pool_bytes > 0)
            .then(|| DevicePool::new(&ctx, pool_bytes))
            .transpose()?;
        tracing::info!(
            pool_mib = pool_bytes >> 20,
            device = %device_uuid,
            "CUDA IPC ready: K/V moves device to device between GPU workers of this host"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                stream: Mutex::new(stream),
                pool,
                host_id,
                device_uuid,
                peers: Mutex::new(HashMap::new()),
            }),
        })
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
    /// How a reader reaches the allocation whose IPC handle is `handle`, of `len` bytes.
    fn source(&self, handle: &HandleBytes, len: usize) -> CudaIpcSource {
        CudaIpcSource {
            host_id: self.host_id.clone(),
            device: self.device_uuid.clone(),
            mem_handle: to_hex(handle),
            alloc_bytes: len as u64,
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

    /// The exporter's pool mapped into this process (opened once, reused while in use).
    fn map_peer(&self, handle: HandleBytes) -> Result<Arc<PeerMapping>, TransferError> {
        let mut peers = lock(&self.peers);
        let now = Instant::now();
        // Close mappings nobody used for a while (an in-flight pull keeps its own `Arc`).
        peers.retain(|_, (_, used)| now.duration_since(*used) < IDLE_MAPPING_CLOSE);
        if let Some((mapping, used)) = peers.get_mut(&handle) {
            *used = now;
            return Ok(Arc::clone(mapping));
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
                // it. Lazy peer access lets a pool on another GPU be mapped.
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
        peers.insert(handle, (Arc::clone(&mapping), now));
        Ok(mapping)
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
            ctx: Arc::clone(&self.ctx),
            ptr,
        };
        Ok((DeviceRange { ptr, len }, false, Box::new(guard)))
    }

    /// Copies `remote`'s regions out of the exporter's pool into device memory of ours.
    fn pull_blocking(self: &Arc<Self>, remote: &RemoteKv) -> Result<PulledKv, TransferError> {
        let RemoteMemory::CudaIpc(source) = &remote.memory else {
            return Err(TransferError::InvalidHandle(
                "a CUDA IPC handle without its allocation".into(),
            ));
        };
        if source.host_id != self.host_id {
            return Err(TransferError::InvalidHandle(format!(
                "the K/V is in GPU memory of another host (host id {}, this one is {})",
                source.host_id, self.host_id
            )));
        }
        let handle: HandleBytes = from_hex(&source.mem_handle)?
            .try_into()
            .map_err(|_| TransferError::InvalidHandle("a CUDA IPC handle is 64 bytes".into()))?;
        let regions = remote.coalesced();
        // The seal is read from the allocation too: it is bounded like the regions.
        let read: Vec<(u64, u64)> = regions
            .iter()
            .copied()
            .chain(remote.seal.map(|seal| seal.region()))
            .collect();
        check_regions(&read, source.alloc_bytes, "the exported allocation")?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("CUDA context", e))?;
        let peer = self.map_peer(handle)?;
        // The handle's `alloc_bytes` is its word; the mapping's size is the driver's.
        check_regions(&read, peer.len as u64, "the memory the handle maps")?;
        let len = remote.total_len() as usize;
        let (into, lent, guard) = self.destination(len)?;
        let stream = lock(&self.stream);
        let mut at = into.ptr;
        for &(addr, region_len) in &regions {
            // SAFETY: the source lies inside the mapped allocation (checked above against the
            // size the driver reports) and the destination inside `into` (the regions add up to its length); the
            // stream is synchronized before either is released.
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
        // SAFETY: `into` is device memory kept by `guard` and written completely above.
        let pulled = unsafe { PulledKv::on_device(into, lent, guard) };
        let Some(seal) = remote.seal else {
            return Ok(pulled);
        };
        // The K/V copies are complete (synchronized): only now is the seal read
        // ([`super::seal`]).
        let mut read: Nonce = [0; SEAL_BYTES];
        // SAFETY: the seal lies inside the mapping (checked above); `read` outlives the copy,
        // which is synchronized before it is looked at.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut read,
                peer.base + seal.addr,
                stream.cu_stream(),
            )
        }
        .map_err(|e| TransferError::Unavailable(format!("reading the KV export's seal: {e}")))?;
        stream.synchronize().map_err(|e| {
            TransferError::Unavailable(format!("reading the KV export's seal: {e}"))
        })?;
        seal.check(&read)?;
        Ok(pulled)
    }
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
                memory: RemoteMemory::CudaIpc(shared.source(&pool.handle, pool.len)),
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
        let KvMemory::Device(range) = cache.memory else {
            return Box::pin(async { Ok(None) });
        };
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            shared
                .ctx
                .bind_to_thread()
                .map_err(|e| cuda_error("CUDA context", e))?;
            let mut raw = sys::CUipcMemHandle_st {
                reserved: [0; HANDLE_BYTES],
            };
            // SAFETY: the caller's promise: `range` is the cache's allocation, alive while
            // `owner` is; the driver refuses anything that is not the start of one.
            unsafe { sys::cuIpcGetMemHandle(&mut raw, range.ptr) }
                .result()
                .map_err(|e| cuda_error("cuIpcGetMemHandle on the KV cache", e))?;
            let handle: HandleBytes = raw.reserved.map(|b| b as u8);
            lock(local_pools()).insert(handle, (range.ptr, range.len));
            tracing::info!(
                mib = range.len >> 20,
                "KV cache shared over CUDA IPC: GPU decode workers of this host read exports \
                 straight out of it"
            );
            let seals = Arc::clone(&shared);
            Ok(Some(Arc::new(ExposedCache::new(
                RemoteMemory::CudaIpc(shared.source(&handle, range.len)),
                0,
                cache,
                Box::new(move |offset| {
                    Box::new(DeviceSeal {
                        shared: Arc::clone(&seals),
                        ptr: range.ptr + offset as u64,
                    })
                }),
                Box::new(LocalCache { handle }),
                owner,
            ))))
        })
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
            return; // a GPU machine: the GPU tests start it for real
        }
        let err = CudaIpcTransport::start(0, 1 << 20, "host".into())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("libcuda.so"), "{err}");
    }
}
