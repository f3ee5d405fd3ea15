//! A prefill's K/V leaving the context worker: how the decode worker will read it, its seal
//! ([`crate::transfer::seal`]), and the [`KvHandle`] that tells the decode worker where to read
//! and which seal to check.
//!
//! Where the transport can read the KV cache itself ([`crate::transfer::cache`]: CUDA IPC for
//! a GPU reader of this host, UCX on a CPU worker), the export is the prompt's blocks in
//! place, pinned until the export is dropped: no copy, and no pool whose cap could make a
//! hand-over fall back. Otherwise (a GPU worker's cache, read over UCX by another host or a CPU
//! decode worker) the engine copies the blocks into host memory the transport registered,
//! and frees them.

use tandem_protocol::messages::{
    KvDTypeSpec, KvHandle, KvLayoutSpec, KvPeer, KvRegion, KvTransportKind, TokenEvent,
};

use super::KvTransports;
use crate::engine::{EngineHandle, RequestId};
use crate::kv_cache::{KvDType, KvLayout};
use crate::serve::connection::BusSettings;
use crate::transfer::cache::ExposedCache;
use crate::transfer::{Exported, KvTransport, RemoteMemory, to_hex};

/// Unpins an export's blocks when dropped (the engine's blocks of a prefill-only request,
/// retained after it): the keepalive of an export read in place, dropped only after its seal
/// was zeroed.
struct Unpin {
    engine: EngineHandle,
    engine_id: RequestId,
}

impl Drop for Unpin {
    fn drop(&mut self) {
        // An engine that stopped has let go of its cache anyway.
        let _ = self.engine.release_kv(self.engine_id);
    }
}

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
            KvDType::Fp8 => KvDTypeSpec::Fp8,
        },
        block_bytes: layout.block_bytes() as u64,
    }
}

/// How this worker's GPU cache is shared over CUDA IPC, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedCache {
    None,
    /// One allocation.
    Whole,
    /// One allocation per rank of a tensor-parallel group.
    Ranks,
}

/// Whether a prefill's K/V is exported for CUDA IPC (read out of this worker's GPU cache)
/// rather than for UCX: only for a reader that reads CUDA IPC on this worker's host, when this
/// worker's cache is shared over CUDA IPC, and (a tensor-parallel group's cache, in its ranks'
/// allocations) when the reader reads such exports. Any other reader (another host, a CPU
/// worker, an older build, an api-server that did not say) gets a host export, which every
/// decode worker can pull.
pub fn exports_on_device(reader: Option<&KvPeer>, host_id: &str, cache: SharedCache) -> bool {
    let Some(reader) = reader.filter(|r| r.cuda_ipc && r.host_id == host_id) else {
        return false;
    };
    match cache {
        SharedCache::None => false,
        SharedCache::Whole => true,
        SharedCache::Ranks => reader.cuda_ipc_ranks,
    }
}

/// Who exports: the worker, its transport and its cache layout.
pub struct HandleSource<'a> {
    pub worker_id: &'a str,
    pub model_fingerprint: &'a str,
    pub backend: &'a KvTransportKind,
    pub layout: &'a KvLayout,
}

/// The regions of a handle for `exported`: runs of adjacent blocks merged into one region
/// when the reader reads regions of several blocks (`coalesced`), else one region per block
/// (of `block_bytes`: one rank's part of a block, for a tensor-parallel group's export).
/// An export copied out of the cache is one run (its blocks back to back), so its handle is a
/// few hundred bytes for any prompt; blocks read in place are as adjacent as the cache
/// allocated them. One region per block takes about 40 bytes of the bus's `max_payload` per
/// block (8,192 blocks for a 128k-token prompt in blocks of 16).
pub fn handle_regions(exported: &Exported, block_bytes: u64, coalesced: bool) -> Vec<KvRegion> {
    let mut out: Vec<KvRegion> = Vec::new();
    for &(addr, len) in &exported.regions {
        if coalesced {
            match out.last_mut() {
                Some(last) if last.addr + last.len == addr => last.len += len,
                _ => out.push(KvRegion { addr, len }),
            }
        } else {
            out.extend((0..len / block_bytes).map(|i| KvRegion {
                addr: addr + i * block_bytes,
                len: block_bytes,
            }));
        }
    }
    out
}

/// The handle of an exported request, unsigned; `coalesced`: its reader reads regions of
/// several blocks ([`handle_regions`]).
pub fn kv_handle(
    source: &HandleSource<'_>,
    exported: &Exported,
    coalesced: bool,
    num_tokens: usize,
    first_token: TokenEvent,
    seed: u64,
    expires_unix_ms: u64,
) -> KvHandle {
    let HandleSource {
        worker_id,
        model_fingerprint,
        backend,
        layout,
    } = *source;
    let (address, rkey, cuda_ipc, cuda_ipc_ranks) = match &exported.memory {
        RemoteMemory::Registered { address, rkey } => {
            (to_hex(address), to_hex(rkey), None, Vec::new())
        }
        RemoteMemory::CudaIpc(sources) => match &sources[..] {
            [source] => (
                String::new(),
                String::new(),
                Some(Box::new(source.clone())),
                Vec::new(),
            ),
            ranks => (String::new(), String::new(), None, ranks.to_vec()),
        },
    };
    let parts = cuda_ipc_ranks.len().max(1) as u64;
    let blocks = handle_regions(exported, layout.block_bytes() as u64 / parts, coalesced);
    KvHandle {
        worker_id: worker_id.to_owned(),
        model_fingerprint: model_fingerprint.to_owned(),
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
        cuda_ipc_ranks,
        seal: exported.seal.map(|seal| seal.to_wire()),
        // Signed by the caller, which knows the request ([`crate::serve::kv_auth`]).
        mac: String::new(),
    }
}

/// A context worker's transports and what chooses between them.
pub(super) struct Exporter {
    /// Host-memory exports (UCX) for any reader; device-memory exports (CUDA IPC) for GPU
    /// readers of this host.
    pub kv: KvTransports,
}

impl Exporter {
    pub fn new(settings: &BusSettings) -> Self {
        Self {
            kv: KvTransports::new(settings),
        }
    }

    /// How this worker exchanges K/V, for its heartbeat (it exports; it reads no handles).
    pub fn kv_peer(&self) -> KvPeer {
        KvPeer {
            host_id: self.kv.host_id.clone(),
            cuda_ipc: self.kv.device_cache.is_some(),
            coalesced_regions: false,
            cuda_ipc_ranks: false,
            cuda_ipc_cache: match self.kv.device_cache.as_deref().map(ExposedCache::memory) {
                Some(RemoteMemory::CudaIpc(sources)) => sources.clone(),
                _ => Vec::new(),
            },
            cuda_ipc_mapped: Vec::new(),
        }
    }

    /// How this worker's cache is shared over CUDA IPC.
    fn shared_cache(&self) -> SharedCache {
        match (&self.kv.device_cache, &self.kv.cuda_ipc) {
            (Some(_), Some(transport)) if transport.devices() > 1 => SharedCache::Ranks,
            (Some(_), Some(_)) => SharedCache::Whole,
            _ => SharedCache::None,
        }
    }

    /// Exports the `blocks` retained by `engine_id` for `reader`: in place where a transport
    /// reads the cache (CUDA IPC for a reader of this host that reads it, else UCX on a CPU
    /// worker), the blocks pinned until the export is dropped; else copied by the engine into
    /// host memory registered for UCX, the blocks freed at once. Either way the export is
    /// sealed before this returns. Returns the export and the name of the transport that
    /// reads it. On an error the blocks are freed.
    pub async fn export(
        &self,
        engine: &EngineHandle,
        engine_id: RequestId,
        blocks: &[u32],
        reader: Option<&KvPeer>,
    ) -> Result<(Exported, KvTransportKind), String> {
        let on_device = exports_on_device(reader, &self.kv.host_id, self.shared_cache());
        let in_place = match (&self.kv.device_cache, &self.kv.cuda_ipc) {
            (Some(cache), Some(device)) if on_device => Some((cache, device.backend())),
            _ => self
                .kv
                .host_cache
                .as_ref()
                .map(|cache| (cache, self.kv.host.backend())),
        };
        if let Some((cache, backend)) = in_place {
            let unpin = Box::new(Unpin {
                engine: engine.clone(),
                engine_id,
            });
            let exported = cache.export(blocks, unpin).map_err(|e| e.to_string())?;
            return Ok((exported, backend));
        }
        let len = blocks.len() * self.kv.layout.block_bytes();
        let buffer = match self.kv.host.reserve(len).await {
            Ok(buffer) => buffer,
            Err(e) => {
                let _ = engine.release_kv(engine_id);
                return Err(e.to_string());
            }
        };
        let buffer = engine
            .take_retained_kv_into(engine_id, buffer)
            .await
            .map_err(|e| e.to_string())?;
        let exported = buffer.finish().map_err(|e| e.to_string())?;
        Ok((exported, self.kv.host.backend()))
    }
}

/// A handle as a context worker makes it, for the tests of what reads handles.
#[cfg(test)]
pub(in crate::serve) mod fixtures {
    use super::*;

    /// 2 layers, 1 KV head of 4 f32 dimensions, blocks of 2 tokens: 128-byte blocks.
    pub fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 2,
            dtype: KvDType::F32,
        }
    }

    /// 5 tokens in 3 blocks of [`layout`], exported to host memory (UCX,
    /// `Exported::fixture`, sealed), first token 5, one region per block.
    pub fn handle(seed: u64, expires_unix_ms: u64) -> KvHandle {
        handle_of(false, seed, expires_unix_ms)
    }

    /// [`handle`], with one region for the export when `coalesced`.
    pub fn handle_of(coalesced: bool, seed: u64, expires_unix_ms: u64) -> KvHandle {
        let first = TokenEvent {
            id: 5,
            text: String::new(),
            logprob: None,
            top_logprobs: vec![],
        };
        let source = HandleSource {
            worker_id: "ctx",
            model_fingerprint: "0f0f",
            backend: &KvTransportKind::Ucx,
            layout: &layout(),
        };
        kv_handle(
            &source,
            &Exported::fixture(),
            coalesced,
            5,
            first,
            seed,
            expires_unix_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cuda_ipc_reader_on_this_host_gets_a_device_export() {
        let reader = |host: &str, cuda_ipc| KvPeer {
            host_id: host.into(),
            cuda_ipc,
            coalesced_regions: true,
            cuda_ipc_ranks: true,
            cuda_ipc_cache: Vec::new(),
            cuda_ipc_mapped: Vec::new(),
        };
        let whole = SharedCache::Whole;
        assert!(exports_on_device(Some(&reader("h1", true)), "h1", whole));
        assert!(
            !exports_on_device(Some(&reader("h2", true)), "h1", whole),
            "another host"
        );
        assert!(
            !exports_on_device(Some(&reader("h1", false)), "h1", whole),
            "a reader without CUDA IPC (a CPU worker, or one whose IPC reads failed)"
        );
        assert!(
            !exports_on_device(Some(&reader("h1", true)), "h1", SharedCache::None),
            "no cache shared over CUDA IPC here"
        );
        assert!(
            !exports_on_device(None, "h1", whole),
            "the api-server did not say who reads"
        );
        // A tensor-parallel group's cache: only for readers of its ranks' allocations.
        assert!(exports_on_device(
            Some(&reader("h1", true)),
            "h1",
            SharedCache::Ranks
        ));
        let older = KvPeer {
            cuda_ipc_ranks: false,
            ..reader("h1", true)
        };
        assert!(
            exports_on_device(Some(&older), "h1", whole),
            "one allocation: any CUDA IPC reader"
        );
        assert!(
            !exports_on_device(Some(&older), "h1", SharedCache::Ranks),
            "a reader of one allocation gets a tensor-parallel group's K/V through host memory"
        );
    }

    #[test]
    fn handles_list_one_region_per_block() {
        assert_eq!(fixtures::layout().block_bytes(), 128);
        let handle = fixtures::handle(9, 123);
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
        let seal = handle.seal.expect("the export's seal is named");
        assert_eq!(seal.addr, 4096 + 3 * 128, "after the K/V");
        assert_eq!(seal.nonce, "5e".repeat(16));
    }

    #[test]
    fn blocks_read_in_place_are_one_region_each_or_merged_where_adjacent() {
        let exported = Exported {
            regions: vec![(1024, 128), (1152, 128), (640, 128), (768, 128)],
            ..Exported::fixture()
        };
        let region = |addr, len| KvRegion { addr, len };
        assert_eq!(
            handle_regions(&exported, 128, true),
            vec![region(1024, 256), region(640, 256)],
            "runs of adjacent blocks, in the prompt's order"
        );
        assert_eq!(
            handle_regions(&exported, 128, false),
            vec![
                region(1024, 128),
                region(1152, 128),
                region(640, 128),
                region(768, 128)
            ]
        );
    }

    #[test]
    fn a_tensor_parallel_export_names_its_ranks_allocations_and_their_share_of_a_block() {
        let source = |device: &str| tandem_protocol::messages::CudaIpcSource {
            host_id: "h".into(),
            device: device.into(),
            mem_handle: "00".repeat(64),
            alloc_bytes: 1 << 20,
            liveness_offset: None,
        };
        // Two ranks: a block is 128 bytes of the whole layout, 64 in each rank's cache.
        let exported = Exported {
            memory: RemoteMemory::CudaIpc(vec![source("GPU-0"), source("GPU-1")]),
            regions: vec![(0, 64), (64, 64), (256, 64)],
            ..Exported::fixture()
        };
        let layout = fixtures::layout();
        let handle_of = |coalesced| {
            kv_handle(
                &HandleSource {
                    worker_id: "ctx",
                    model_fingerprint: "0f0f",
                    backend: &KvTransportKind::CudaIpc,
                    layout: &layout,
                },
                &exported,
                coalesced,
                5,
                TokenEvent {
                    id: 5,
                    text: String::new(),
                    logprob: None,
                    top_logprobs: vec![],
                },
                1,
                2,
            )
        };
        let handle = handle_of(true);
        assert_eq!(handle.cuda_ipc, None);
        assert_eq!(handle.cuda_ipc_ranks.len(), 2);
        assert_eq!(handle.cuda_ipc_ranks[1].device, "GPU-1");
        let region = |addr, len| KvRegion { addr, len };
        assert_eq!(handle.blocks, vec![region(0, 128), region(256, 64)]);
        assert_eq!(handle.layout.block_bytes, 128, "the whole model's layout");
        assert_eq!(
            handle_of(false).blocks,
            vec![region(0, 64), region(64, 64), region(256, 64)],
            "one region per block: a rank's share of it"
        );
    }

    #[test]
    fn a_reader_of_coalesced_regions_gets_one_region_for_the_export() {
        let handle = fixtures::handle_of(true, 9, 123);
        assert_eq!(
            handle.blocks,
            vec![KvRegion {
                addr: 4096,
                len: 3 * 128
            }]
        );
        assert_eq!(handle.num_tokens, 5);
    }
}
