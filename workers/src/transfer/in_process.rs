//! A [`KvTransport`] inside one process: exported buffers sit in a registry, a pull copies out
//! of it. For tests of the export / pull / import path without UCX; a released (dropped)
//! export reads as unavailable, like a context worker that has freed its blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{BoxFuture, Exported, KvTransport, RemoteKv, TransferError};

type Registry = Mutex<HashMap<u64, Arc<Vec<u8>>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The in-process transport (stateless: the registry is per process).
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcessTransport;

/// Removes the buffer from the registry when the export is dropped.
struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

impl KvTransport for InProcessTransport {
    fn backend(&self) -> &'static str {
        "in-process"
    }

    fn export(&self, kv: Vec<u8>) -> BoxFuture<Result<Exported, TransferError>> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let key = NEXT.fetch_add(1, Ordering::Relaxed);
        let kv = Arc::new(kv);
        // The buffer's real address: regions name bytes of it, as with UCX.
        let addr = kv.as_ptr() as u64;
        let len = kv.len() as u64;
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, kv);
        Box::pin(async move {
            Ok(Exported {
                address: b"in-process".to_vec(),
                rkey: key.to_le_bytes().to_vec(),
                addr,
                len,
                keepalive: Box::new(Registration(key)),
            })
        })
    }

    fn pull(
        &self,
        remote: RemoteKv,
        _timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, TransferError>> {
        Box::pin(async move {
            let key: [u8; 8] =
                remote.rkey.as_slice().try_into().map_err(|_| {
                    TransferError::InvalidHandle("in-process rkey is 8 bytes".into())
                })?;
            let key = u64::from_le_bytes(key);
            let buffer = registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned()
                .ok_or_else(|| {
                    TransferError::Unavailable(format!("in-process export {key} was released"))
                })?;
            let base = buffer.as_ptr() as u64;
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
            Ok(out)
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
            address: exported.address.clone(),
            rkey: exported.rkey.clone(),
            regions: block_regions(&exported, 1024),
        };
        let pulled = transport
            .pull(remote.clone(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(pulled, data);

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
}
