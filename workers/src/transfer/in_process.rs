//! A [`KvTransport`] inside one process: exported buffers sit in a registry, a pull copies out
//! of it. For tests of the export / pull / import path without UCX; a released (dropped)
//! export reads as unavailable, like a context worker that has freed its blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{
    BoxFuture, ExportBuffer, Exported, KvTransport, KvTransportKind, PulledKv, RemoteKv,
    RemoteMemory, TransferError,
};

/// Exported buffers by key: address and length of memory owned by the key's [`Registration`].
type Registry = Mutex<HashMap<u64, (usize, usize)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn locked() -> std::sync::MutexGuard<'static, HashMap<u64, (usize, usize)>> {
    registry().lock().unwrap_or_else(|e| e.into_inner())
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
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let key = NEXT.fetch_add(1, Ordering::Relaxed);
        let memory = Box::into_raw(vec![0u8; len].into_boxed_slice());
        let bytes = memory.cast::<u8>();
        // The buffer's real address: regions name bytes of it, as with UCX.
        let addr = bytes as usize;
        locked().insert(key, (addr, len));
        let exported = Exported {
            memory: RemoteMemory::Registered {
                address: b"in-process".to_vec(),
                rkey: key.to_le_bytes().to_vec(),
            },
            addr: addr as u64,
            len: len as u64,
            keepalive: Box::new(Registration { key, memory }),
        };
        // SAFETY: `len` bytes owned by the registration in `exported`; the key that lets a
        // pull read them is only known from the export's description.
        let buffer = unsafe { ExportBuffer::new(bytes, len, exported) };
        Box::pin(async move { Ok(buffer) })
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
            let registry = locked();
            let &(base, size) = registry.get(&key).ok_or_else(|| {
                TransferError::Unavailable(format!("in-process export {key} was released"))
            })?;
            // SAFETY: registered memory stays allocated while its key is in the registry,
            // which is locked until the copy is done.
            let buffer = unsafe { std::slice::from_raw_parts(base as *const u8, size) };
            let base = base as u64;
            let mut out = Vec::with_capacity(remote.total_len() as usize);
            for (addr, len) in remote.coalesced() {
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
            Ok(out.into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_regions(exported: &Exported, block: u64) -> Vec<(u64, u64)> {
        (0..exported.len / block)
            .map(|i| (exported.addr + i * block, block))
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
        };
        let pulled = transport
            .pull(remote.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(pulled.host(), Some(&data[..]));

        let outside = RemoteKv {
            regions: vec![(exported.addr + 4000, 200)],
            ..remote.clone()
        };
        assert!(matches!(
            transport.pull(outside, Duration::from_secs(1)).await,
            Err(TransferError::InvalidHandle(_))
        ));
        drop(exported);
        assert!(matches!(
            transport.pull(remote, Duration::from_secs(1)).await,
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
        let exported = buffer.finish();
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: vec![(exported.addr + 1000, 1000), (exported.addr, 1000)],
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
}
