//! The [`KvTransport`] between processes: UCX (libucp) RMA reads, through tandem-ucx.
//!
//! A UCP worker is single-threaded (tandem-ucx's types are `!Send`), and the worker process is
//! async; so one thread, `ucx`, owns the UCX context, its worker, the endpoint cache and the
//! exported memory regions, on a current-thread runtime that also runs the worker's progress
//! loop (which sleeps on the worker's event descriptor instead of spinning a core). Everything
//! else reaches it through a command channel; [`UcxTransport`] is that channel's sending end.
//!
//! The progress loop runs all the time, not only during pulls: over tcp UCX emulates RMA with
//! messages that the *exporting* side must progress, so a context worker serves its exports
//! from this loop.
//!
//! A CPU context worker's exports are read straight out of its KV cache: the cache is
//! registered once at start ([`KvTransport::expose_cache`], [`super::cache`]), and an export
//! names its pinned blocks and a seal in the cache's export slab, under the cache's one key.
//! A GPU worker's cache is device memory, which this transport does not read: its exports to
//! UCX readers (another host, a CPU decode worker) are copied out into host memory.
//!
//! Copied exports and pull destinations are slices of one region mapped at start (the pool,
//! [`super::pool`]) when the worker asked for one and the slice fits; otherwise an export maps
//! a region of its own and a pull reads into a `Vec`. Each export's seal ([`super::seal`]) is
//! the [`SEAL_BYTES`] after its K/V, in the same registered memory; a pull reads it with a get
//! of its own, issued once the K/V gets have completed.

use std::collections::HashMap;
use std::time::Duration;

use tandem_ucx::{Context, EndpointCache, GetOp, MemoryRegion, RemoteKey, UcxError, Worker};
use tokio::sync::{mpsc, oneshot};

use super::cache::ExposedCache;
use super::pool::SlicePool;
use super::seal::{HostSeal, Nonce, SEAL_BYTES, SealSlot};
use super::{
    BoxFuture, ExportBuffer, Exported, HostRange, KvCacheMemory, KvTransport, KvTransportKind,
    PulledKv, RemoteKv, RemoteMemory, TransferError,
};
use crate::backend::KvMemory;

enum Command {
    Reserve {
        len: usize,
        reply: oneshot::Sender<Result<ExportBuffer, TransferError>>,
    },
    Unexport(u64),
    /// Registers a KV cache's memory (the caller keeps it allocated).
    ExposeCache {
        range: HostRange,
        reply: oneshot::Sender<Result<(u64, RemoteMemory), TransferError>>,
    },
    /// Unregisters an exposed cache, and says when that is done.
    Unexpose {
        id: u64,
        done: std::sync::mpsc::Sender<()>,
    },
    Pull {
        remote: RemoteKv,
        timeout: Duration,
        reply: oneshot::Sender<Result<PulledKv, TransferError>>,
    },
    /// A slice of the pool is free again (its export ended, or its pulled bytes were used).
    GiveBack {
        offset: usize,
        len: usize,
    },
}

/// The UCX transport of this process (cheap to share: a channel to the `ucx` thread).
pub struct UcxTransport {
    commands: mpsc::UnboundedSender<Command>,
    pool: Option<HostRange>,
}

/// What keeps an export's memory: dropping it hands the memory back.
type Keepalive = Box<dyn Send + Sync>;

/// The pool: one region, registered once, and its free slices.
struct KvPool {
    region: MemoryRegion,
    rkey: Vec<u8>,
    base: *mut u8,
    slices: SlicePool,
}

/// Unregisters (and frees) an export's own region when the context worker lets go of it.
struct ExportGuard {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        // The thread may have stopped with the process; then there is nothing to unregister.
        let _ = self.commands.send(Command::Unexport(self.id));
    }
}

/// Unregisters an exposed cache when dropped, and waits for that (its memory may be freed
/// right after).
struct CacheRegistration {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for CacheRegistration {
    fn drop(&mut self) {
        let (done, unexposed) = std::sync::mpsc::channel();
        let unexpose = Command::Unexpose { id: self.id, done };
        if self.commands.send(unexpose).is_ok()
            && unexposed.recv_timeout(Duration::from_secs(5)).is_err()
        {
            tracing::warn!("the UCX thread did not unregister the KV cache within 5 s");
        }
    }
}

/// Hands a slice back to the pool when dropped: what keeps a pooled export, or pulled bytes.
struct LentSlice {
    offset: usize,
    len: usize,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for LentSlice {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::GiveBack {
            offset: self.offset,
            len: self.len,
        });
    }
}

impl UcxTransport {
    /// Starts the `ucx` thread: UCX context and worker (reading UCX's own environment, e.g.
    /// `UCX_TLS`), and the progress loop. No pool.
    pub fn start() -> Result<Self, TransferError> {
        Self::start_with_pool(0)
    }

    /// [`Self::start`] with a pool of `pool_bytes` (0: none) for exports and pulls, mapped
    /// and registered now. The pool lives as long as the process: the `ucx` thread never ends.
    pub fn start_with_pool(pool_bytes: usize) -> Result<Self, TransferError> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (ready, started) = std::sync::mpsc::channel();
        let loop_commands = commands.clone();
        std::thread::Builder::new()
            .name("ucx".into())
            .spawn(move || run(receiver, loop_commands, pool_bytes, ready))
            .map_err(|e| TransferError::Backend(format!("starting the UCX thread: {e}")))?;
        match started.recv() {
            Ok(Ok(pool)) => Ok(Self { commands, pool }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransferError::Backend(
                "the UCX thread stopped while starting".into(),
            )),
        }
    }

    fn send(&self, command: Command) -> Result<(), TransferError> {
        self.commands
            .send(command)
            .map_err(|_| TransferError::Backend("the UCX thread has stopped".into()))
    }
}

impl KvTransport for UcxTransport {
    fn backend(&self) -> KvTransportKind {
        KvTransportKind::Ucx
    }

    fn reserve(&self, len: usize) -> BoxFuture<Result<ExportBuffer, TransferError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Command::Reserve { len, reply });
        Box::pin(async move {
            sent?;
            answer.await.map_err(|_| {
                TransferError::Backend("the UCX thread stopped during an export".into())
            })?
        })
    }

    fn pull(
        &self,
        remote: RemoteKv,
        timeout: Duration,
    ) -> BoxFuture<Result<PulledKv, TransferError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Command::Pull {
            remote,
            timeout,
            reply,
        });
        Box::pin(async move {
            sent?;
            answer.await.map_err(|_| {
                TransferError::Backend("the UCX thread stopped during a pull".into())
            })?
        })
    }

    fn pool(&self) -> Option<HostRange> {
        self.pool
    }

    /// Registers a host cache (user memory, `ucp_mem_map`) once; a device cache is not this
    /// transport's to read.
    unsafe fn expose_cache(
        &self,
        cache: KvCacheMemory,
        owner: Box<dyn Send + Sync>,
    ) -> BoxFuture<Result<Option<std::sync::Arc<ExposedCache>>, TransferError>> {
        let KvMemory::Host(range) = cache.memory else {
            return Box::pin(async { Ok(None) });
        };
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Command::ExposeCache { range, reply });
        let commands = self.commands.clone();
        let (base, len) = (range.ptr as usize, range.len);
        Box::pin(async move {
            sent?;
            let (id, memory) = answer.await.map_err(|_| {
                TransferError::Backend("the UCX thread stopped while registering the cache".into())
            })??;
            tracing::info!(
                mib = len >> 20,
                "KV cache registered with UCX: decode workers read exports straight out of it"
            );
            Ok(Some(std::sync::Arc::new(ExposedCache::new(
                memory,
                base as u64,
                cache,
                Box::new(move |offset| {
                    // SAFETY: a slot of the cache's export slab, inside the registered memory
                    // that `owner` keeps allocated; only this export's guard writes it.
                    Box::new(unsafe { HostSeal::new((base + offset) as *mut u8) })
                }),
                Box::new(CacheRegistration { id, commands }),
                owner,
            ))))
        })
    }
}

fn backend_error(what: &str, e: UcxError) -> TransferError {
    TransferError::Backend(format!("{what}: {e}"))
}

/// The `ucx` thread.
fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    own_sender: mpsc::UnboundedSender<Command>,
    pool_bytes: usize,
    ready: std::sync::mpsc::Sender<Result<Option<HostRange>, TransferError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(TransferError::Backend(format!(
                "UCX thread runtime: {e}"
            ))));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let started = Context::new()
            .map_err(|e| backend_error("ucp_init", e))
            .and_then(|context| {
                let worker =
                    Worker::new(&context).map_err(|e| backend_error("ucp_worker_create", e))?;
                let address = worker
                    .address()
                    .map_err(|e| backend_error("ucp_worker_get_address", e))?;
                let pool = (pool_bytes > 0)
                    .then(|| KvPool::map(&context, pool_bytes))
                    .transpose()?;
                Ok((context, worker, address, pool))
            });
        let (context, worker, address, mut pool) = match started {
            Ok(parts) => {
                let range = parts.3.as_ref().map(|p| HostRange {
                    ptr: p.base,
                    len: p.slices.len(),
                });
                let _ = ready.send(Ok(range));
                parts
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let progress_worker = worker.clone();
        tokio::task::spawn_local(async move {
            let Err(e) = progress_worker.progress_loop().await;
            tracing::error!("UCX progress loop stopped: {e}");
        });
        let endpoints = std::rc::Rc::new(EndpointCache::new(&worker));
        // Exports that mapped a region of their own, by id.
        let mut exports: HashMap<u64, MemoryRegion> = HashMap::new();
        let mut next_id = 1u64;
        while let Some(command) = commands.recv().await {
            match command {
                Command::Reserve { len, reply } => {
                    let reserved = reserve(
                        &context,
                        &address,
                        pool.as_mut(),
                        &mut exports,
                        &mut next_id,
                        len,
                        &own_sender,
                    );
                    let _ = reply.send(reserved);
                }
                Command::Unexport(id) => {
                    exports.remove(&id);
                }
                Command::ExposeCache { range, reply } => {
                    // SAFETY: `expose_cache`'s caller keeps the memory allocated until the
                    // registration is dropped, which unregisters it first.
                    let registered =
                        unsafe { MemoryRegion::register(&context, range.ptr, range.len) }
                            .map_err(|e| backend_error("registering the KV cache", e))
                            .and_then(|region| {
                                let rkey = region
                                    .pack_rkey()
                                    .map_err(|e| backend_error("packing the KV cache's key", e))?;
                                Ok((region, rkey))
                            });
                    let _ = reply.send(registered.map(|(region, rkey)| {
                        let id = next_id;
                        next_id += 1;
                        exports.insert(id, region);
                        let memory = RemoteMemory::Registered {
                            address: address.clone(),
                            rkey,
                        };
                        (id, memory)
                    }));
                }
                Command::Unexpose { id, done } => {
                    exports.remove(&id);
                    let _ = done.send(());
                }
                Command::GiveBack { offset, len } => {
                    if let Some(pool) = pool.as_mut() {
                        pool.slices.give_back(offset, len);
                    }
                }
                Command::Pull {
                    remote,
                    timeout,
                    reply,
                } => {
                    let endpoints = std::rc::Rc::clone(&endpoints);
                    let len = remote.total_len() as usize;
                    let lent = pool.as_mut().and_then(|pool| pool.lend(len, &own_sender));
                    tokio::task::spawn_local(async move {
                        let into = lent.unwrap_or_else(|| vec![0u8; len].into());
                        let result = pull(&endpoints, &remote, timeout, into).await;
                        if let (Err(e), RemoteMemory::Registered { address, .. }) =
                            (&result, &remote.memory)
                            && !matches!(e, TransferError::ExportGone(_))
                        {
                            // A failed endpoint is not reused; the next pull reconnects. (A
                            // changed seal is the export's doing, not the endpoint's.)
                            endpoints.remove(address);
                        }
                        let _ = reply.send(result);
                    });
                }
            }
        }
    });
}

/// `len` bytes UCX allocates and registers, with their packed key and first byte.
///
/// Memory UCX allocates (a shared segment) rather than registered caller memory: over shm a
/// reader then maps it and copies on its own, where registered user memory is served by
/// messages this process must handle (15-25x slower here, docs/benchmarks.md).
fn map_region(
    context: &Context,
    len: usize,
) -> Result<(MemoryRegion, Vec<u8>, *mut u8), TransferError> {
    let mut region = MemoryRegion::allocate(context, len)
        .map_err(|e| backend_error(&format!("mapping {len} bytes for KV transfers"), e))?;
    let rkey = region
        .pack_rkey()
        .map_err(|e| backend_error("packing a KV region's key", e))?;
    let base = region
        .bytes_mut()
        .expect("UCX-allocated memory is owned")
        .as_mut_ptr();
    Ok((region, rkey, base))
}

impl KvPool {
    fn map(context: &Context, len: usize) -> Result<Self, TransferError> {
        let (region, rkey, base) = map_region(context, len)?;
        let slices = SlicePool::new(region.len());
        tracing::info!(
            bytes = slices.len(),
            "KV transfer pool mapped (UCX-allocated, registered once)"
        );
        Ok(Self {
            region,
            rkey,
            base,
            slices,
        })
    }
}

impl KvPool {
    /// A free slice of `len` bytes: its first byte and the guard that hands it back (through
    /// `commands`) when dropped; None when no free range is that long.
    fn take(
        &mut self,
        len: usize,
        commands: &mpsc::UnboundedSender<Command>,
    ) -> Option<(*mut u8, LentSlice)> {
        let offset = self.slices.take(len)?;
        debug_assert!(offset + len <= self.region.len());
        // SAFETY: `offset + len` is inside the region (the slice pool's bound).
        let bytes = unsafe { self.base.add(offset) };
        let guard = LentSlice {
            offset,
            len,
            commands: commands.clone(),
        };
        Some((bytes, guard))
    }

    /// A slice of `len` bytes for a pull to read into, handed back when the returned bytes
    /// are dropped; None when the pool has no room.
    fn lend(&mut self, len: usize, commands: &mpsc::UnboundedSender<Command>) -> Option<PulledKv> {
        let (bytes, guard) = self.take(len, commands)?;
        // SAFETY: the region stays mapped for the process's life; the slice is this value's
        // alone until the guard hands it back.
        Some(unsafe { PulledKv::lent(bytes, len, Box::new(guard)) })
    }
}

/// A new export of `len` bytes by the UCX worker at `address`, and its seal after them: a
/// slice of the pool when one is free, else a region of its own (kept in `exports` under a
/// new id). Its keepalive is the guard that hands the slice back or unmaps the region.
fn reserve(
    context: &Context,
    address: &[u8],
    pool: Option<&mut KvPool>,
    exports: &mut HashMap<u64, MemoryRegion>,
    next_id: &mut u64,
    len: usize,
    commands: &mpsc::UnboundedSender<Command>,
) -> Result<ExportBuffer, TransferError> {
    let sealed_len = len + SEAL_BYTES;
    let pooled = pool.and_then(|pool| match pool.take(sealed_len, commands) {
        Some((bytes, guard)) => Some((pool.rkey.clone(), bytes, Box::new(guard) as Keepalive)),
        None => {
            tracing::debug!(
                len,
                free = pool.slices.free_bytes(),
                "KV transfer pool has no free slice this long; mapping a region for this export"
            );
            None
        }
    });
    let (rkey, bytes, keepalive) = match pooled {
        Some(slice) => slice,
        None => {
            let (region, rkey, bytes) = map_region(context, sealed_len)?;
            let id = *next_id;
            *next_id += 1;
            exports.insert(id, region);
            let guard = ExportGuard {
                id,
                commands: commands.clone(),
            };
            (rkey, bytes, Box::new(guard) as Keepalive)
        }
    };
    let exported = Exported {
        memory: RemoteMemory::Registered {
            address: address.to_vec(),
            rkey,
        },
        regions: vec![(bytes as u64, len as u64)],
        seal: None,
        keepalive,
    };
    // SAFETY: the `len + SEAL_BYTES` bytes (a slice of the pool or a region of their own) stay
    // mapped and handed to this export until its keepalive is dropped; only the buffer's
    // owner writes the first `len` before the handle goes out, and only the seal the rest.
    let (buffer, seal) = unsafe {
        (
            ExportBuffer::new(bytes, len, exported),
            HostSeal::new(bytes.add(len)),
        )
    };
    Ok(buffer.with_seal(SealSlot {
        addr: bytes as u64 + len as u64,
        memory: Box::new(seal),
    }))
}

/// Reads the coalesced regions of `remote` into `into` (their total length), all gets in
/// flight at once; then, once they have all completed, its seal.
async fn pull(
    endpoints: &EndpointCache,
    remote: &RemoteKv,
    timeout: Duration,
    mut into: PulledKv,
) -> Result<PulledKv, TransferError> {
    let started = std::time::Instant::now();
    let RemoteMemory::Registered { address, rkey } = &remote.memory else {
        return Err(TransferError::InvalidHandle(
            "UCX reads registered host memory, not a CUDA IPC allocation".into(),
        ));
    };
    let regions = remote.coalesced();
    let seal = remote.seal.map(|seal| seal.region());
    let (Some(start), Some(end)) = (
        regions.iter().chain(&seal).map(|&(addr, _)| addr).min(),
        regions
            .iter()
            .chain(&seal)
            .map(|&(addr, len)| addr + len)
            .max(),
    ) else {
        return Ok(into);
    };
    let endpoint = endpoints
        .get(address)
        .map_err(|e| TransferError::Unavailable(format!("connecting to the KV source: {e}")))?;
    let rkey = RemoteKey::unpack(&endpoint, rkey, start, (end - start) as usize)
        .map_err(|e| TransferError::InvalidHandle(format!("remote key: {e}")))?;
    let mut ops = Vec::with_capacity(regions.len());
    let mut rest = into
        .host_bytes_mut()
        .expect("UCX pulls read into host memory (a pool slice or a Vec)");
    for &(addr, len) in &regions {
        let (local, tail) = rest.split_at_mut(len as usize);
        rest = tail;
        ops.push(GetOp {
            local,
            remote_address: addr,
            rkey: rkey.clone(),
        });
    }
    // SAFETY: the future is awaited to completion right here (never leaked); the buffers are
    // disjoint slices of `into`, borrowed by the ops until then.
    let result = unsafe { endpoint.get_all(ops, timeout) }.await;
    result.map_err(|e| TransferError::Unavailable(format!("reading the KV cache: {e}")))?;
    let Some(seal) = remote.seal else {
        return Ok(into);
    };
    // The K/V gets have completed: only now is the seal read ([`super::seal`]). The fence
    // keeps this thread's own loads (a shared-memory get is a copy here) in that order.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let mut read: Nonce = [0; SEAL_BYTES];
    let op = GetOp {
        local: &mut read,
        remote_address: seal.addr,
        rkey,
    };
    // Within the pull's time, what the K/V gets left of it (and at least a moment).
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    // SAFETY: as above; `read` is borrowed by the op until the future completes.
    let result = unsafe { endpoint.get_all(vec![op], left) }.await;
    result.map_err(|e| TransferError::Unavailable(format!("reading the KV export's seal: {e}")))?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    seal.check(&read)?;
    Ok(into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::cache::tests::host_cache;

    #[tokio::test]
    async fn exports_and_pulls_through_ucx_in_one_process() {
        let exporter = UcxTransport::start().expect("UCX starts (libucx installed)");
        let puller = UcxTransport::start().expect("a second UCX worker starts");
        let data: Vec<u8> = (0..(3 << 20) as u32)
            .map(|i| ((i * 31) >> 3) as u8)
            .collect();
        let exported = exporter.export(data.clone()).await.unwrap();
        let block = 64 * 1024;
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: (0..exported.len() / block)
                .map(|i| (exported.addr() + i * block, block))
                .collect(),
            seal: exported.seal,
        };
        let pulled = puller
            .pull(remote.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(pulled.host() == Some(&data[..]), "pulled bytes differ");
        // Released: a later pull of the same regions finds nothing registered. Over shm the
        // memory may still be mapped, so only check that the export can be dropped and a new
        // one is independent.
        drop(exported);
        let again = exporter.export(vec![7u8; 4096]).await.unwrap();
        let pulled = puller
            .pull(
                RemoteKv {
                    memory: again.memory.clone(),
                    regions: vec![(again.addr(), 4096)],
                    seal: again.seal,
                },
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(pulled.host(), Some(&[7u8; 4096][..]));
    }

    #[tokio::test]
    async fn exports_are_pool_slices_while_they_fit_and_own_regions_after() {
        let exporter = UcxTransport::start_with_pool(1 << 20).expect("UCX starts");
        let puller = UcxTransport::start().expect("a second UCX worker starts");
        let pool = exporter.pool().expect("a pool was asked for");
        assert_eq!(pool.len, 1 << 20);
        assert!(puller.pool().is_none());
        let in_pool = |e: &Exported| {
            let start = pool.ptr as u64;
            e.addr() >= start && e.addr() + e.len() <= start + pool.len as u64
        };
        let read = |e: &Exported| {
            puller.pull(
                RemoteKv {
                    memory: e.memory.clone(),
                    regions: vec![(e.addr(), e.len())],
                    seal: e.seal,
                },
                Duration::from_secs(10),
            )
        };
        let a = exporter.export(vec![1u8; 600 << 10]).await.unwrap();
        let b = exporter.export(vec![2u8; 300 << 10]).await.unwrap();
        // 600 KiB + 300 KiB taken (4 KiB more each for their seals): 116 KiB left, too
        // little for this one.
        let c = exporter.export(vec![3u8; 200 << 10]).await.unwrap();
        assert!(in_pool(&a) && in_pool(&b), "the first two fit the pool");
        assert!(!in_pool(&c), "the third maps a region of its own");
        assert_eq!(
            read(&a).await.unwrap().host().unwrap().to_vec(),
            vec![1u8; 600 << 10]
        );
        assert_eq!(
            read(&b).await.unwrap().host().unwrap().to_vec(),
            vec![2u8; 300 << 10]
        );
        assert_eq!(
            read(&c).await.unwrap().host().unwrap().to_vec(),
            vec![3u8; 200 << 10]
        );
        // A released slice is handed out again.
        let a_addr = a.addr();
        drop(a);
        let d = exporter.export(vec![4u8; 500 << 10]).await.unwrap();
        assert_eq!(d.addr(), a_addr, "the freed slice is reused");
        assert_eq!(
            read(&d).await.unwrap().host().unwrap().to_vec(),
            vec![4u8; 500 << 10]
        );
        assert_eq!(
            read(&b).await.unwrap().host().unwrap().to_vec(),
            vec![2u8; 300 << 10],
            "b untouched"
        );
    }

    #[tokio::test]
    async fn pulls_read_into_pool_slices_while_they_fit_and_into_vecs_after() {
        let exporter = UcxTransport::start().expect("UCX starts");
        let puller = UcxTransport::start_with_pool(1 << 20).expect("a second UCX worker starts");
        let data: Vec<u8> = (0..600u32 << 10).map(|i| ((i * 13) >> 2) as u8).collect();
        let exported = exporter.export(data.clone()).await.unwrap();
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: vec![(exported.addr(), exported.len())],
            seal: exported.seal,
        };
        let pull = || puller.pull(remote.clone(), Duration::from_secs(10));
        let first = pull().await.unwrap();
        assert!(first.is_lent(), "the first pull reads into the pool");
        let second = pull().await.unwrap();
        assert!(!second.is_lent(), "no room left for a second: a Vec");
        assert!(first.host() == Some(&data[..]) && second.host() == Some(&data[..]));
        let first_at = first.host().unwrap().as_ptr();
        drop(first);
        let third = pull().await.unwrap();
        assert!(third.is_lent());
        assert_eq!(
            third.host().unwrap().as_ptr(),
            first_at,
            "the slice given back is lent again"
        );
        assert!(third.host() == Some(&data[..]));
    }

    #[tokio::test]
    async fn a_pull_of_an_export_freed_and_reused_fails_on_its_seal() {
        let exporter = UcxTransport::start_with_pool(1 << 20).expect("UCX starts");
        let puller = UcxTransport::start().expect("a second UCX worker starts");
        let remote = |e: &Exported| RemoteKv {
            memory: e.memory.clone(),
            regions: vec![(e.addr(), e.len())],
            seal: e.seal,
        };
        let read = |remote: RemoteKv| puller.pull(remote, Duration::from_secs(10));
        let (a_bytes, c_bytes) = (vec![1u8; 64 << 10], vec![3u8; 64 << 10]);
        let a = exporter.export(a_bytes.clone()).await.unwrap();
        let of_a = remote(&a);
        let seal_a = a.seal.expect("every export is sealed");
        assert_eq!(seal_a.addr, a.addr() + a.len(), "the seal follows the K/V");
        assert!(read(of_a.clone()).await.unwrap().host() == Some(&a_bytes[..]));

        // Freed (a release, early or forged): the seal is cleared before the slice goes back.
        drop(a);
        let gone = read(of_a.clone()).await.unwrap_err();
        assert!(
            matches!(gone, TransferError::ExportGone(_)) && gone.to_string().contains("cleared"),
            "{gone}"
        );
        // Reused: the next export of that size lands in A's memory.
        let c = exporter.export(c_bytes.clone()).await.unwrap();
        assert_eq!(c.addr(), of_a.regions[0].0, "C's K/V lies where A's did");
        assert_eq!(c.seal.unwrap().addr, seal_a.addr);
        let reused = read(of_a.clone()).await.unwrap_err();
        assert!(
            matches!(reused, TransferError::ExportGone(_))
                && reused.to_string().contains("another export"),
            "{reused}"
        );
        // What the seal keeps out: A's regions, read unchecked, are C's K/V now.
        let unchecked = RemoteKv {
            seal: None,
            ..of_a.clone()
        };
        assert!(read(unchecked).await.unwrap().host() == Some(&c_bytes[..]));
        // C's own handle reads C.
        assert!(read(remote(&c)).await.unwrap().host() == Some(&c_bytes[..]));
    }

    /// Records when it is dropped (an export's blocks unpinned).
    struct Unpinned(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Unpinned {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_host_cache_registered_once_is_read_in_place_and_its_seals_guard_reuse() {
        let exporter = UcxTransport::start().expect("UCX starts");
        let puller = UcxTransport::start().expect("a second UCX worker starts");
        let block = 16 << 10;
        let (memory, cache) = host_cache(8, block);
        // SAFETY: `memory` outlives the exposed cache (dropped at the end of the test).
        let exposed = unsafe { exporter.expose_cache(cache, Box::new(())) }
            .await
            .unwrap()
            .expect("UCX reads a host cache in place");
        let unpinned = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let export = |blocks: &[u32]| {
            exposed
                .export(blocks, Box::new(Unpinned(unpinned.clone())))
                .unwrap()
        };
        let remote = |e: &Exported| RemoteKv {
            memory: e.memory.clone(),
            regions: e.regions.clone(),
            seal: e.seal,
        };
        let read = |remote: RemoteKv| puller.pull(remote, Duration::from_secs(10));
        let expected = |blocks: &[u8]| -> Vec<u8> {
            blocks.iter().flat_map(|&b| vec![b + 1; block]).collect()
        };
        let a = export(&[5, 2, 3]);
        assert_eq!(
            a.regions[0],
            (memory.as_ptr() as u64 + 5 * block as u64, block as u64),
            "block 5 where it lies in the cache"
        );
        let of_a = remote(&a);
        let pulled = read(of_a.clone()).await.unwrap();
        assert!(pulled.host() == Some(&expected(&[5, 2, 3])[..]));
        let b = export(&[0]);
        assert!(read(remote(&b)).await.unwrap().host() == Some(&expected(&[0])[..]));
        assert_eq!(unpinned.load(std::sync::atomic::Ordering::SeqCst), 0);

        // Released: the seal is cleared before the blocks are unpinned.
        drop(a);
        assert_eq!(unpinned.load(std::sync::atomic::Ordering::SeqCst), 1);
        let gone = read(of_a.clone()).await.unwrap_err();
        assert!(
            matches!(gone, TransferError::ExportGone(_)) && gone.to_string().contains("cleared"),
            "{gone}"
        );
        // The next export takes A's slot: A's handle now finds another nonce.
        let c = export(&[5, 2, 3]);
        assert_eq!(
            c.seal.unwrap().addr,
            of_a.seal.unwrap().addr,
            "A's slot reused"
        );
        let reused = read(of_a).await.unwrap_err();
        assert!(reused.to_string().contains("another export"), "{reused}");
        assert!(read(remote(&c)).await.unwrap().host() == Some(&expected(&[5, 2, 3])[..]));
        drop((b, c));
        assert_eq!(exposed.live_exports(), 0);
        drop(exposed);
        drop(memory);
    }
}
