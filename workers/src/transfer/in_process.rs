//! A [`KvTransport`] inside one process: exported buffers, and KV caches exposed for reads in
//! place ([`super::cache`]), sit in a registry, a pull copies out of it. For tests of the
//! export / pull / import path without UCX; it follows UCX's model (a host cache registered
//! once, its blocks pinned per export, the seal in the cache's export slab). Exports are sealed like
//! the others' ([`super::seal`]): the seal after the K/V is written when the export is
//! finished and cleared before it leaves the registry, and a pull copies the K/V, lets go of
//! the registry, then reads the seal; a sealed export released before or during the pull
//! reads as gone ([`TransferError::ExportGone`]), like a context worker's freed export.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use std::sync::Arc;

use super::cache::ExposedCache;
use super::seal::{Nonce, SEAL_BYTES, SealMemory, SealSlot};
use super::{
    BoxFuture, ExportBuffer, Exported, KvCacheMemory, KvTransport, KvTransportKind, PulledKv,
    RemoteKv, RemoteMemory, TransferError,
};
use crate::backend::KvMemory;

/// Exported buffers by key: address and length (K/V and seal) of memory owned by the key's
/// [`Registration`], or of an exposed cache (its blocks and export slab, owned by its engine).
type Registry = Mutex<HashMap<u64, (usize, usize)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn locked() -> std::sync::MutexGuard<'static, HashMap<u64, (usize, usize)>> {
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

/// An export's seal, written under the registry's lock (pulls read it under the lock).
struct InProcessSeal {
    ptr: *mut u8,
}

// SAFETY: the seal's bytes belong to its export's registration, written under the lock.
unsafe impl Send for InProcessSeal {}
unsafe impl Sync for InProcessSeal {}

impl SealMemory for InProcessSeal {
    fn write(&self, bytes: &Nonce) -> Result<(), TransferError> {
        let _registry = locked();
        // SAFETY: the seal's bytes, after the K/V of an allocation its registration frees
        // only after this guard has cleared the seal.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, SEAL_BYTES) };
        Ok(())
    }
}

/// A fresh registry key.
fn next_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Takes an exposed cache out of the registry when dropped (its memory is the engine's).
struct CacheRegistration {
    key: u64,
}

impl Drop for CacheRegistration {
    fn drop(&mut self) {
        locked().remove(&self.key);
    }
}

/// The in-process transport (stateless: the registry is per process).
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcessTransport;

/// Owns an export's memory: removes it from the registry, then frees it, when the export is
/// dropped (a pull copies under the registry's lock, so never from freed memory).
struct Registration {
    key: u64,
    memory: *mut [u8],
}

// SAFETY: the memory is plain bytes owned by this registration.
unsafe impl Send for Registration {}
unsafe impl Sync for Registration {}

impl Drop for Registration {
    fn drop(&mut self) {
        locked().remove(&self.key);
        // SAFETY: made by `Box::into_raw` in `reserve`, freed once, here, after no pull can
        // reach it any more.
        drop(unsafe { Box::from_raw(self.memory) });
    }
}

impl KvTransport for InProcessTransport {
    fn backend(&self) -> KvTransportKind {
        KvTransportKind::InProcess
    }

    fn reserve(&self, len: usize) -> BoxFuture<Result<ExportBuffer, TransferError>> {
        let key = next_key();
        let memory = Box::into_raw(vec![0u8; len + SEAL_BYTES].into_boxed_slice());
        let bytes = memory.cast::<u8>();
        // The buffer's real address: regions name bytes of it, as with UCX.
        let addr = bytes as usize;
        locked().insert(key, (addr, len + SEAL_BYTES));
        let exported = Exported {
            memory: RemoteMemory::Registered {
                address: b"in-process".to_vec(),
                rkey: key.to_le_bytes().to_vec(),
            },
            regions: vec![(addr as u64, len as u64)],
            seal: None,
            keepalive: Box::new(Registration { key, memory }),
        };
        // SAFETY: `len` bytes owned by the registration in `exported`, then the seal; the key
        // that lets a pull read them is only known from the export's description.
        let buffer = unsafe { ExportBuffer::new(bytes, len, exported) }.with_seal(SealSlot {
            addr: (addr + len) as u64,
            memory: Box::new(InProcessSeal {
                // SAFETY: inside the allocation (`len + SEAL_BYTES` bytes).
                ptr: unsafe { bytes.add(len) },
            }),
        });
        Box::pin(async move { Ok(buffer) })
    }

    /// Registers a host cache under a key of its own, as UCX registers it; a device cache is
    /// not this transport's.
    unsafe fn expose_cache(
        &self,
        cache: KvCacheMemory,
        owner: Box<dyn Send + Sync>,
    ) -> BoxFuture<Result<Option<Arc<ExposedCache>>, TransferError>> {
        let KvMemory::Host(range) = cache.memory else {
            return Box::pin(async { Ok(None) });
        };
        let key = next_key();
        let base = range.ptr as usize;
        locked().insert(key, (base, range.len));
        let exposed = ExposedCache::new(
            RemoteMemory::Registered {
                address: b"in-process".to_vec(),
                rkey: key.to_le_bytes().to_vec(),
            },
            base as u64,
            cache,
            Box::new(move |offset| {
                Box::new(InProcessSeal {
                    ptr: (base + offset) as *mut u8,
                })
            }),
            Box::new(CacheRegistration { key }),
            owner,
        );
        Box::pin(async move { Ok(Some(Arc::new(exposed))) })
    }

    fn pull(
        &self,
        remote: RemoteKv,
        _timeout: Duration,
    ) -> BoxFuture<Result<PulledKv, TransferError>> {
        Box::pin(async move {
            let RemoteMemory::Registered { rkey, .. } = &remote.memory else {
                return Err(TransferError::InvalidHandle(
                    "the in-process transport reads its own registry, not device memory".into(),
                ));
            };
            let key: [u8; 8] = rkey
                .as_slice()
                .try_into()
                .map_err(|_| TransferError::InvalidHandle("in-process rkey is 8 bytes".into()))?;
            let key = u64::from_le_bytes(key);
            let released = || match remote.seal {
                // A sealed export that is gone: its seal would read cleared.
                Some(_) => {
                    TransferError::ExportGone(format!("in-process export {key} was released"))
                }
                None => TransferError::Unavailable(format!("in-process export {key} was released")),
            };
            let mut out = Vec::with_capacity(remote.total_len() as usize);
            copy_out(key, &remote.coalesced(), &mut out)?.ok_or_else(released)?;
            let Some(seal) = remote.seal else {
                return Ok(out.into());
            };
            // The K/V is copied and the registry let go of, as a remote reader's gets end:
            // only now is the seal read.
            let mut read = Vec::with_capacity(SEAL_BYTES);
            copy_out(key, &[seal.region()], &mut read)?.ok_or_else(released)?;
            let read: Nonce = read.try_into().expect("a seal's bytes were read");
            seal.check(&read)?;
            Ok(out.into())
        })
    }
}

/// Appends the bytes of `regions` of export `key` to `out`, under the registry's lock: None
/// when the export is not registered (any more).
fn copy_out(
    key: u64,
    regions: &[(u64, u64)],
    out: &mut Vec<u8>,
) -> Result<Option<()>, TransferError> {
    let registry = locked();
    let Some(&(base, size)) = registry.get(&key) else {
        return Ok(None);
    };
    // SAFETY: registered memory stays allocated while its key is in the registry, which is
    // locked until the copy is done.
    let buffer = unsafe { std::slice::from_raw_parts(base as *const u8, size) };
    let base = base as u64;
    for &(addr, len) in regions {
        let start = addr
            .checked_sub(base)
            .filter(|s| s + len <= buffer.len() as u64);
        let Some(start) = start else {
            return Err(TransferError::InvalidHandle(format!(
                "region {addr:#x}+{len} is outside the exported buffer"
            )));
        };
        out.extend_from_slice(&buffer[start as usize..(start + len) as usize]);
    }
    Ok(Some(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_regions(exported: &Exported, block: u64) -> Vec<(u64, u64)> {
        (0..exported.len() / block)
            .map(|i| (exported.addr() + i * block, block))
            .collect()
    }

    #[tokio::test]
    async fn pulls_what_was_exported_until_it_is_released() {
        let transport = InProcessTransport;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let exported = transport.export(data.clone()).await.unwrap();
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: block_regions(&exported, 1024),
            seal: exported.seal,
        };
        let pulled = transport
            .pull(remote.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(pulled.host(), Some(&data[..]));

        let outside = RemoteKv {
            regions: vec![(exported.addr() + 4000, 200)],
            ..remote.clone()
        };
        assert!(matches!(
            transport.pull(outside, Duration::from_secs(1)).await,
            Err(TransferError::InvalidHandle(_))
        ));
        // A seal that holds another nonce: the memory is another export's now.
        let mut reused = remote.clone();
        if let Some(seal) = &mut reused.seal {
            seal.nonce[0] ^= 0xff;
        }
        let err = transport
            .pull(reused, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::ExportGone(_)) && err.to_string().contains("another"),
            "{err}"
        );
        drop(exported);
        assert!(matches!(
            transport.pull(remote.clone(), Duration::from_secs(1)).await,
            Err(TransferError::ExportGone(_))
        ));
        // Read without its seal (a handle older than seals), a released export is simply
        // unavailable.
        let unsealed = RemoteKv {
            seal: None,
            ..remote
        };
        assert!(matches!(
            transport.pull(unsealed, Duration::from_secs(1)).await,
            Err(TransferError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_reserved_export_reads_as_its_owner_filled_it() {
        let transport = InProcessTransport;
        let mut buffer = transport.reserve(3000).await.unwrap();
        for (i, b) in buffer.host_bytes_mut().unwrap().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let exported = buffer.finish().unwrap();
        let seal = exported.seal.expect("every export is sealed");
        assert_eq!(seal.addr, exported.addr() + 3000, "after the K/V");
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: vec![(exported.addr() + 1000, 1000), (exported.addr(), 1000)],
            seal: Some(seal),
        };
        let pulled = transport
            .pull(remote, Duration::from_secs(1))
            .await
            .unwrap();
        let expected: Vec<u8> = (1000..2000)
            .chain(0..1000)
            .map(|i: usize| (i % 251) as u8)
            .collect();
        assert_eq!(pulled.host(), Some(&expected[..]));
    }

    #[tokio::test]
    async fn a_host_cache_is_read_in_place_until_its_export_is_released() {
        let transport = InProcessTransport;
        let block = 256;
        let (memory, cache) = crate::transfer::cache::tests::host_cache(4, block);
        // SAFETY: `memory` outlives the exposed cache.
        let exposed = unsafe { transport.expose_cache(cache, Box::new(())) }
            .await
            .unwrap()
            .expect("a host cache");
        let exported = exposed.export(&[3, 1], Box::new(())).unwrap();
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: exported.regions.clone(),
            seal: exported.seal,
        };
        let pulled = transport
            .pull(remote.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        let expected: Vec<u8> = [vec![4u8; block], vec![2u8; block]].concat();
        assert_eq!(pulled.host(), Some(&expected[..]));
        drop(exported);
        assert!(matches!(
            transport.pull(remote.clone(), Duration::from_secs(1)).await,
            Err(TransferError::ExportGone(_))
        ));
        // Unregistered with the cache: nothing of it can be read any more.
        drop(exposed);
        assert!(
            transport
                .pull(remote, Duration::from_secs(1))
                .await
                .is_err()
        );
        drop(memory);
    }
}
