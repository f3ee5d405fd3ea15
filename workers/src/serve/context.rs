//! The context worker's half of a disaggregated request (docs/protocol.md).
//!
//! A prefill job runs as a prefill-only engine request with a fixed seed (drawn here when the
//! client gave none, and sent along so the decode worker continues the same random stream).
//! When its first token is out, the engine hands over the prompt's K/V (its blocks are free
//! again at once), the transport exports that copy, and the worker answers `kv_ready` with the
//! handle. The export stays registered until the decode worker's release, or until it expires
//! (`kv_transfer_timeout_ms`), whichever comes first. A request that ends at its first token
//! (a stop token or stop string, or `max_tokens` 1) is answered here in full instead.
//!
//! [`StagingBuffer`] is the bookkeeping of those exports: it bounds them by
//! `max_tokens_in_buffer` (jobs wait for room instead of growing it), frees them on release
//! and expiry, and counts both for heartbeats.
//!
//! An expired export is not unregistered at once: it lingers for [`EXPIRED_EXPORT_GRACE`]
//! outside the budget. A decode worker bounds its pull by the handle's expiry, but a pull
//! started just before it (its deadline is at least 100 ms, and hosts' clocks differ) may
//! still be reading; the transfer pool hands freed memory to the next export, and such a pull
//! must not read another request's K/V.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    KvDTypeSpec, KvHandle, KvLayoutSpec, KvPeer, KvRegion, KvTransferStats, KvTransportKind,
    TokenEvent,
};

use crate::kv_cache::{KvDType, KvLayout};
use crate::transfer::{Exported, RemoteMemory, to_hex};

/// The layout as the wire contract spells it.
pub fn layout_spec(layout: &KvLayout) -> KvLayoutSpec {
    KvLayoutSpec {
        num_layers: layout.num_layers as u32,
        num_kv_heads: layout.num_kv_heads as u32,
        head_dim: layout.head_dim as u32,
        block_size: layout.block_size as u32,
        dtype: match layout.dtype {
            KvDType::F32 => KvDTypeSpec::F32,
            KvDType::Bf16 => KvDTypeSpec::Bf16,
            KvDType::F16 => KvDTypeSpec::F16,
        },
        block_bytes: layout.block_bytes() as u64,
    }
}

/// Whether a prefill's K/V is exported into device memory for CUDA IPC rather than into host
/// memory for UCX: only for a reader that reads CUDA IPC on this worker's host, when this
/// worker has a CUDA IPC pool. Any other reader (another host, a CPU worker, an api-server
/// that did not say) gets a host export, which every decode worker can pull.
pub fn exports_on_device(reader: Option<&KvPeer>, host_id: &str, has_cuda_ipc: bool) -> bool {
    has_cuda_ipc && reader.is_some_and(|r| r.cuda_ipc && r.host_id == host_id)
}

/// Who exports: the worker, its transport and its cache layout.
pub struct HandleSource<'a> {
    pub worker_id: &'a str,
    pub backend: &'a KvTransportKind,
    pub layout: &'a KvLayout,
}

/// The handle of an exported request: one region per block of the exported buffer.
pub fn kv_handle(
    source: &HandleSource<'_>,
    exported: &Exported,
    num_tokens: usize,
    first_token: TokenEvent,
    seed: u64,
    expires_unix_ms: u64,
) -> KvHandle {
    let HandleSource {
        worker_id,
        backend,
        layout,
    } = *source;
    let block_bytes = layout.block_bytes() as u64;
    let blocks = (0..exported.len / block_bytes)
        .map(|i| KvRegion {
            addr: exported.addr + i * block_bytes,
            len: block_bytes,
        })
        .collect();
    let (address, rkey, cuda_ipc) = match &exported.memory {
        RemoteMemory::Registered { address, rkey } => (to_hex(address), to_hex(rkey), None),
        RemoteMemory::CudaIpc(source) => {
            (String::new(), String::new(), Some(Box::new(source.clone())))
        }
    };
    KvHandle {
        worker_id: worker_id.to_owned(),
        backend: backend.clone(),
        address,
        rkey,
        blocks,
        layout: layout_spec(layout),
        num_tokens: num_tokens as u32,
        first_token,
        seed,
        expires_unix_ms,
        cuda_ipc,
    }
}

/// How long an expired export stays registered before its memory is reused.
pub const EXPIRED_EXPORT_GRACE: Duration = Duration::from_secs(5);

struct Staged {
    exported: Exported,
    tokens: usize,
    blocks: usize,
    expires: Instant,
}

/// Exports waiting for their decode worker, bounded by a token budget.
pub struct StagingBuffer {
    max_tokens: usize,
    timeout: Duration,
    staged: HashMap<String, Staged>,
    /// Tokens of staged exports plus prefills admitted but not yet staged.
    tokens: usize,
    expirations: u64,
    releases: u64,
    /// Expired exports and when they may be unregistered.
    lingering: Vec<(Instant, Exported)>,
}

impl StagingBuffer {
    pub fn new(max_tokens: usize, timeout: Duration) -> Self {
        Self {
            max_tokens,
            timeout,
            staged: HashMap::new(),
            tokens: 0,
            expirations: 0,
            releases: 0,
            lingering: Vec::new(),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reserves room for a prompt of `tokens` before its prefill starts; false when the
    /// buffer is full (the job waits). A prompt larger than the whole budget is let through
    /// when nothing else is staged, so it cannot wait forever.
    pub fn try_reserve(&mut self, tokens: usize) -> bool {
        if self.tokens + tokens <= self.max_tokens || self.tokens == 0 {
            self.tokens += tokens;
            true
        } else {
            false
        }
    }

    /// Gives back a reservation whose prefill did not end in an export.
    pub fn unreserve(&mut self, tokens: usize) {
        self.tokens = self.tokens.saturating_sub(tokens);
    }

    /// Records the export of a reserved prefill.
    pub fn stage(&mut self, request_id: String, exported: Exported, tokens: usize, blocks: usize) {
        let staged = Staged {
            exported,
            tokens,
            blocks,
            expires: Instant::now() + self.timeout,
        };
        if let Some(old) = self.staged.insert(request_id, staged) {
            self.unreserve(old.tokens);
        }
    }

    /// The decode worker has the K/V (or gave up on it): free it. False if unknown (already
    /// expired or released).
    pub fn release(&mut self, request_id: &str) -> bool {
        match self.staged.remove(request_id) {
            Some(staged) => {
                self.unreserve(staged.tokens);
                self.releases += 1;
                true
            }
            None => false,
        }
    }

    /// Ends the exports whose time is up (they linger for [`EXPIRED_EXPORT_GRACE`], outside
    /// the budget) and unregisters those whose grace is over; returns the newly expired ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        self.lingering.retain(|(until, _)| *until > now);
        let expired: Vec<String> = self
            .staged
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(staged) = self.staged.remove(id) {
                self.unreserve(staged.tokens);
                self.expirations += 1;
                self.lingering
                    .push((now + EXPIRED_EXPORT_GRACE, staged.exported));
            }
        }
        expired
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    pub fn stats(&self) -> KvTransferStats {
        KvTransferStats {
            pinned_blocks: self.staged.values().map(|s| s.blocks as u32).sum(),
            pinned_tokens: self.staged.values().map(|s| s.tokens as u32).sum(),
            expirations: self.expirations,
            releases: self.releases,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported() -> Exported {
        Exported {
            memory: RemoteMemory::Registered {
                address: vec![1],
                rkey: vec![2],
            },
            addr: 4096,
            len: 3 * 128,
            keepalive: Box::new(()),
        }
    }

    /// Sets its flag when dropped (the export's memory given back).
    struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn an_expired_export_stays_registered_for_the_grace_period_outside_the_budget() {
        let timeout = Duration::from_millis(50);
        let mut buffer = StagingBuffer::new(100, timeout);
        let (released, expired) = (Default::default(), Default::default());
        let flagged = |flag: &std::sync::Arc<std::sync::atomic::AtomicBool>| Exported {
            keepalive: Box::new(DropFlag(flag.clone())),
            ..exported()
        };
        let is_set = |flag: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
            flag.load(std::sync::atomic::Ordering::SeqCst)
        };
        assert!(buffer.try_reserve(50) && buffer.try_reserve(50));
        buffer.stage("released".into(), flagged(&released), 50, 4);
        buffer.stage("expired".into(), flagged(&expired), 50, 4);
        assert!(buffer.release("released"));
        assert!(is_set(&released), "a release unregisters at once");
        let at = Instant::now() + timeout * 2;
        assert_eq!(buffer.expire(at), vec!["expired".to_string()]);
        assert!(
            !is_set(&expired),
            "still registered during the grace period"
        );
        assert!(buffer.try_reserve(100), "but no longer in the budget");
        assert!(buffer.is_empty());
        buffer.expire(at + EXPIRED_EXPORT_GRACE / 2);
        assert!(!is_set(&expired));
        buffer.expire(at + EXPIRED_EXPORT_GRACE);
        assert!(is_set(&expired), "unregistered once the grace is over");
    }

    #[test]
    fn the_budget_bounds_reservations_and_release_or_expiry_frees_them() {
        let mut buffer = StagingBuffer::new(100, Duration::from_millis(50));
        assert!(buffer.try_reserve(60));
        assert!(!buffer.try_reserve(50), "60 + 50 > 100");
        assert!(buffer.try_reserve(40));
        buffer.stage("a".into(), exported(), 60, 3);
        buffer.stage("b".into(), exported(), 40, 2);
        assert_eq!(buffer.stats().pinned_blocks, 5);
        assert!(buffer.release("a"));
        assert!(!buffer.release("a"), "released twice");
        assert!(buffer.try_reserve(50));
        buffer.unreserve(50);
        let later = Instant::now() + Duration::from_millis(60);
        assert_eq!(buffer.expire(later), vec!["b".to_string()]);
        let stats = buffer.stats();
        assert_eq!(
            (stats.releases, stats.expirations, stats.pinned_tokens),
            (1, 1, 0)
        );
        assert!(buffer.is_empty());
        // An oversized prompt passes when nothing else is staged.
        assert!(buffer.try_reserve(500));
        assert!(!buffer.try_reserve(1));
    }

    #[test]
    fn only_a_cuda_ipc_reader_on_this_host_gets_a_device_export() {
        let reader = |host: &str, cuda_ipc| KvPeer {
            host_id: host.into(),
            cuda_ipc,
        };
        assert!(exports_on_device(Some(&reader("h1", true)), "h1", true));
        assert!(
            !exports_on_device(Some(&reader("h2", true)), "h1", true),
            "another host"
        );
        assert!(
            !exports_on_device(Some(&reader("h1", false)), "h1", true),
            "a reader without CUDA IPC (a CPU worker, or one whose IPC reads failed)"
        );
        assert!(
            !exports_on_device(Some(&reader("h1", true)), "h1", false),
            "no CUDA IPC pool here"
        );
        assert!(
            !exports_on_device(None, "h1", true),
            "the api-server did not say who reads"
        );
    }

    #[test]
    fn handles_list_one_region_per_block() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 2,
            dtype: KvDType::F32,
        };
        assert_eq!(layout.block_bytes(), 128);
        let first = TokenEvent {
            id: 5,
            text: String::new(),
            logprob: None,
            top_logprobs: vec![],
        };
        let source = HandleSource {
            worker_id: "ctx",
            backend: &KvTransportKind::Ucx,
            layout: &layout,
        };
        let handle = kv_handle(&source, &exported(), 5, first, 9, 123);
        assert_eq!(handle.blocks.len(), 3);
        assert_eq!(
            handle.blocks[2],
            KvRegion {
                addr: 4096 + 256,
                len: 128
            }
        );
        assert_eq!(handle.layout.dtype, KvDTypeSpec::F32);
        assert_eq!(
            (handle.address.as_str(), handle.rkey.as_str()),
            ("01", "02")
        );
    }
}
