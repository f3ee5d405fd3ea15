//! The decode side of a disaggregated request: a job with a KV handle is pulled over the
//! transport the handle names and imported into the engine. When the pull fails, the prompt is
//! prefilled locally with the handle's seed (same tokens as the context worker's would have
//! continued into); a layout that does not match this engine's is an error to the client,
//! never garbage. The context worker is told to release its export either way.
//!
//! A pull's cancellation is a [`CancelToken`]: a cancel sets it, and the pull's task reads it
//! once the transfer is over (a transfer in flight is not interrupted: the release must still
//! go out, and the memory it writes must stay valid until it ends). A cancelled pull answers
//! `finished` (`cancelled`) instead of generating; one cancelled while its request is handed to
//! the engine has that request cancelled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_protocol::messages::{
    self, GenerateJob, KvHandle, KvLayoutSpec, KvPeer, KvRelease, KvTransportKind, PullOutcome,
    StreamMessage, Usage as WireUsage,
};

use super::KvTransports;
use super::export::layout_spec;
use crate::engine::ImportedPrefill;
use crate::sampler::SampledToken;
use crate::serve::bus::BusSettings;
use crate::serve::job::generation_request;
use crate::serve::worker::{Identity, Worker, locked, publish_bounded, unix_ms};
use crate::transfer::{PulledKv, RemoteKv, TransferError};

/// Set once to cancel a pull; clones share it.
#[derive(Clone, Default)]
struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Pulls handles' K/V into this worker's engine, and knows the pulls in progress.
pub(in crate::serve) struct KvPuller {
    /// Host-memory transfers (UCX); device-to-device ones from GPU context workers of this
    /// host. A handle must match the layout.
    kv: KvTransports,
    /// Whether this worker advertises CUDA IPC reads: it has a pool, and no read of a CUDA IPC
    /// export has failed.
    cuda_ipc_reads: AtomicBool,
    /// The pulls in progress, by bus request id.
    in_progress: Mutex<HashMap<String, CancelToken>>,
}

/// How a pull ended.
enum Pull {
    Pulled(PulledKv),
    /// The handle's layout is not this engine's: no fallback can help.
    LayoutMismatch(String),
    /// The transfer failed: prefill locally.
    Failed(TransferError),
}

/// A pull's entry among those in progress, removed when its task drops this: once the
/// request is in the engine (or answered), so the drain counts it throughout.
struct Registration {
    puller: Arc<KvPuller>,
    request_id: String,
    token: CancelToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        locked(&self.puller.in_progress).remove(&self.request_id);
    }
}

impl KvPuller {
    pub fn new(settings: &BusSettings) -> Self {
        Self {
            kv: KvTransports::new(settings),
            cuda_ipc_reads: AtomicBool::new(settings.cuda_ipc.is_some()),
            in_progress: Mutex::new(HashMap::new()),
        }
    }

    /// Pulls a handle's K/V and imports it on a task of its own; on a failed pull, prefills
    /// locally with the handle's seed (same tokens). Releases the context worker's export
    /// either way.
    pub fn start(self: &Arc<Self>, worker: &Arc<Worker>, job: GenerateJob, handle: KvHandle) {
        let token = CancelToken::default();
        locked(&self.in_progress).insert(job.request_id.clone(), token.clone());
        let registration = Registration {
            puller: Arc::clone(self),
            request_id: job.request_id.clone(),
            token,
        };
        let (puller, worker) = (Arc::clone(self), Arc::clone(worker));
        tokio::spawn(async move {
            puller
                .pull_and_start(&worker, job, handle, registration)
                .await
        });
    }

    /// Cancels the pull of `request_id`, if one is in progress.
    pub fn cancel(&self, request_id: &str) {
        if let Some(token) = locked(&self.in_progress).get(request_id) {
            token.cancel();
        }
    }

    /// Pulls in progress.
    pub fn in_progress(&self) -> usize {
        locked(&self.in_progress).len()
    }

    /// How this worker reads K/V, for its heartbeat.
    pub fn kv_peer(&self) -> KvPeer {
        KvPeer {
            host_id: self.kv.host_id.clone(),
            cuda_ipc: self.cuda_ipc_reads.load(Ordering::Relaxed),
            coalesced_regions: true,
        }
    }

    async fn pull_and_start(
        &self,
        worker: &Worker,
        job: GenerateJob,
        handle: KvHandle,
        registration: Registration,
    ) {
        let started = Instant::now();
        let own = layout_spec(&self.kv.layout);
        let pull = if let Some(mismatch) = model_mismatch(&handle, &worker.identity) {
            Pull::LayoutMismatch(mismatch)
        } else if handle.layout != own {
            Pull::LayoutMismatch(format!(
                "KV layout mismatch: context worker {} has {:?}, decode worker {} has {:?} \
                 (both must serve the same model with the same block size and KV dtype)",
                handle.worker_id, handle.layout, worker.identity.worker_id, own
            ))
        } else if let Err(reason) = check_handle(&handle, &own, job.prompt_ids.len()) {
            Pull::Failed(TransferError::InvalidHandle(reason))
        } else {
            match self.pull(&handle).await {
                Ok(kv) => Pull::Pulled(kv),
                Err(e) => Pull::Failed(e),
            }
        };
        let micros = started.elapsed().as_micros() as u64;
        publish_release(worker, &handle, &job.request_id).await;
        let stream = job.stream_subject.clone();
        if registration.token.is_cancelled() {
            worker
                .publish(
                    stream,
                    &StreamMessage::Finished {
                        reason: messages::FinishReason::Cancelled,
                        usage: WireUsage {
                            prompt_tokens: job.prompt_ids.len() as u32,
                            completion_tokens: 0,
                        },
                    },
                )
                .await;
            return;
        }
        let mut request = generation_request(&job, &worker.model_stop_ids);
        request.sampling.seed = Some(handle.seed);
        match pull {
            Pull::Pulled(kv) => {
                tracing::debug!(
                    request_id = job.request_id,
                    bytes = kv.len(),
                    micros,
                    backend = %handle.backend,
                    "KV pulled"
                );
                worker
                    .publish(
                        stream,
                        &StreamMessage::KvPulled {
                            worker_id: worker.identity.worker_id.clone(),
                            bytes: kv.len() as u64,
                            micros,
                            outcome: PullOutcome::Pulled {
                                transport: handle.backend.clone(),
                            },
                        },
                    )
                    .await;
                let prefill = ImportedPrefill {
                    kv: Box::new(kv),
                    num_tokens: handle.num_tokens as usize,
                    first_token: SampledToken {
                        id: handle.first_token.id,
                        logprob: handle.first_token.logprob.unwrap_or(0.0),
                        top_logprobs: handle.first_token.top_logprobs.clone(),
                    },
                };
                worker
                    .start_request(&job, |engine, sink| {
                        engine.import_with_sink(request, prefill, sink)
                    })
                    .await;
            }
            Pull::LayoutMismatch(mismatch) => {
                tracing::error!(request_id = job.request_id, "{mismatch}");
                worker
                    .publish(stream, &StreamMessage::Error { message: mismatch })
                    .await;
            }
            Pull::Failed(e) => {
                tracing::warn!(
                    request_id = job.request_id,
                    context_worker = handle.worker_id,
                    "KV pull failed, prefilling locally: {e}"
                );
                worker
                    .publish(
                        stream,
                        &StreamMessage::KvPulled {
                            worker_id: worker.identity.worker_id.clone(),
                            bytes: 0,
                            micros: 0,
                            outcome: PullOutcome::Fallback {
                                reason: e.to_string(),
                            },
                        },
                    )
                    .await;
                worker
                    .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                    .await;
            }
        }
        // A cancel that came while `kv_pulled` was going out found no engine request yet.
        if registration.token.is_cancelled() {
            worker.cancel(&job.request_id);
        }
    }

    /// Reads the handle's blocks over the transport it names, bounded by its expiry.
    async fn pull(&self, handle: &KvHandle) -> Result<PulledKv, TransferError> {
        let remote = RemoteKv::from_handle(handle)?;
        let left = handle.expires_unix_ms.saturating_sub(unix_ms());
        let host = &self.kv.host;
        let kv = if handle.backend == host.backend() {
            let timeout = Duration::from_millis(left.clamp(100, 30_000));
            host.pull(remote, timeout).await?
        } else if handle.backend == KvTransportKind::CudaIpc {
            let Some(device) = &self.kv.cuda_ipc else {
                return Err(TransferError::InvalidHandle(
                    "the K/V was exported to GPU memory for CUDA IPC, and this worker has no \
                     CUDA IPC pool (a CPU worker, or --cuda-ipc-pool-mb 0)"
                        .into(),
                ));
            };
            // One host, one clock: past its expiry the export's memory may hold another
            // request's K/V soon (the grace period bounds a pull started before it, not after).
            if left == 0 {
                return Err(TransferError::Unavailable(
                    "the KV export expired before the pull".into(),
                ));
            }
            device
                .pull(remote, Duration::from_millis(left))
                .await
                .inspect_err(|e| self.cuda_ipc_read_failed(e))?
        } else {
            return Err(TransferError::InvalidHandle(format!(
                "the handle is for transport `{}`, this worker reads `{}`{}",
                handle.backend,
                host.backend(),
                if self.kv.cuda_ipc.is_some() {
                    " and `cuda-ipc`"
                } else {
                    ""
                }
            )));
        };
        let expected: u64 = handle.blocks.iter().map(|r| r.len).sum();
        if kv.len() as u64 != expected {
            return Err(TransferError::InvalidHandle(format!(
                "pulled {} bytes, expected {expected}",
                kv.len()
            )));
        }
        Ok(kv)
    }

    /// A CUDA IPC read failed (no peer access between the GPUs, or processes that cannot share
    /// GPU memory): stop advertising CUDA IPC, so context workers export for this worker
    /// through host memory once the next heartbeat is out.
    fn cuda_ipc_read_failed(&self, error: &TransferError) {
        let was = self.cuda_ipc_reads.swap(false, Ordering::Relaxed);
        if was {
            tracing::error!(
                "reading a context worker's GPU memory over CUDA IPC failed ({error}); this \
                 worker now asks for host-memory (UCX) transfers. Same-host GPU transfers need \
                 peer access between the GPUs and a shared IPC namespace (docker --ipc=host)."
            );
        }
    }
}

/// Longest `address` or `rkey` a handle may carry, in hex digits (UCX's packed worker
/// addresses and remote keys are a few hundred bytes).
const MAX_HANDLE_HEX: usize = 16 * 1024;
/// Hex digits of a CUDA IPC memory handle (`CUipcMemHandle`: 64 bytes).
const CUDA_IPC_HANDLE_HEX: usize = 128;

/// Why `handle` holds another model's K/V than `own` serves, if it names one. A handle without
/// a fingerprint comes from a context worker, or through an api-server, older than the field
/// (a rolling upgrade): it passes, with a warning, and its layout is all that is checked.
fn model_mismatch(handle: &KvHandle, own: &Identity) -> Option<String> {
    if handle.model_fingerprint.is_empty() {
        tracing::warn!(
            context_worker = handle.worker_id,
            "a KV handle without a model fingerprint (an older context worker or api-server); \
             checked by its layout only"
        );
        return None;
    }
    (handle.model_fingerprint != own.model_fingerprint).then(|| {
        format!(
            "KV of another model: context worker {} serves the model with fingerprint {:?}, \
             decode worker {} the one with {:?} (workers of one served name must load the \
             same model directory: same config and weights)",
            handle.worker_id, handle.model_fingerprint, own.worker_id, own.model_fingerprint
        )
    })
}

/// Checks everything a handle from the bus claims before anything is allocated or read: its
/// token count is the job's prompt, its regions are whole blocks (one each, or runs of several:
/// this worker advertises `coalesced_regions`) adding up to exactly the blocks the tokens
/// need, its addressing fields are bounded, and a CUDA IPC handle's regions lie inside the
/// allocation it announces. A handle that fails is a failed pull (a local prefill), never a
/// read of memory it did not describe. (The layout is compared before.)
fn check_handle(handle: &KvHandle, own: &KvLayoutSpec, prompt_tokens: usize) -> Result<(), String> {
    let tokens = handle.num_tokens as usize;
    if tokens == 0 || tokens != prompt_tokens {
        return Err(format!(
            "the handle holds K/V of {tokens} tokens for a prompt of {prompt_tokens}"
        ));
    }
    let blocks = tokens.div_ceil(own.block_size.max(1) as usize) as u64;
    if handle.blocks.is_empty() || handle.blocks.len() as u64 > blocks {
        return Err(format!(
            "{} regions for {tokens} tokens in blocks of {} (expected 1 to {blocks})",
            handle.blocks.len(),
            own.block_size
        ));
    }
    if let Some(bad) = handle.blocks.iter().find(|r| {
        r.len == 0 || r.len % own.block_bytes.max(1) != 0 || r.addr.checked_add(r.len).is_none()
    }) {
        return Err(format!(
            "a region of {} bytes at {:#x} (blocks are {} bytes)",
            bad.len, bad.addr, own.block_bytes
        ));
    }
    let covered = handle.blocks.iter().try_fold(0u64, |sum, r| {
        sum.checked_add(r.len / own.block_bytes.max(1))
    });
    if covered != Some(blocks) {
        return Err(format!(
            "regions of {} blocks for {tokens} tokens in blocks of {} (expected {blocks})",
            covered.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
            own.block_size
        ));
    }
    if handle.address.len() > MAX_HANDLE_HEX || handle.rkey.len() > MAX_HANDLE_HEX {
        return Err("the handle's address or remote key is too long".into());
    }
    match (&handle.backend, &handle.cuda_ipc) {
        (KvTransportKind::CudaIpc, Some(source)) => {
            if source.mem_handle.len() != CUDA_IPC_HANDLE_HEX {
                return Err(format!(
                    "a CUDA IPC memory handle of {} hex digits (expected {CUDA_IPC_HANDLE_HEX})",
                    source.mem_handle.len()
                ));
            }
            if let Some(outside) = handle
                .blocks
                .iter()
                .find(|r| r.addr + r.len > source.alloc_bytes)
            {
                return Err(format!(
                    "a region at offset {:#x} ends past the exported {} bytes",
                    outside.addr, source.alloc_bytes
                ));
            }
        }
        (KvTransportKind::CudaIpc, None) => {
            return Err("a CUDA IPC handle without its allocation".into());
        }
        (_, Some(_)) => return Err("a host-memory handle that names GPU memory".into()),
        (_, None) => {
            if handle.address.is_empty() || handle.rkey.is_empty() {
                return Err("a host-memory handle without an address or remote key".into());
            }
        }
    }
    Ok(())
}

/// Tells the context worker that exported `handle` to free it.
async fn publish_release(worker: &Worker, handle: &KvHandle, request_id: &str) {
    let release = KvRelease {
        request_id: request_id.to_owned(),
    };
    publish_bounded(
        &worker.client,
        worker.subjects.kv_release(&handle.worker_id),
        messages::encode(&release),
        "a KV release",
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle as a context worker makes it: 5 tokens in 3 blocks of 2 tokens (128 bytes),
    /// exported to host memory.
    fn valid_handle() -> (KvHandle, KvLayoutSpec) {
        use super::super::export::fixtures;
        (
            fixtures::handle(1, u64::MAX),
            layout_spec(&fixtures::layout()),
        )
    }

    #[test]
    fn a_handle_of_another_model_is_refused_and_one_without_a_fingerprint_passes() {
        let (handle, _) = valid_handle();
        let own = |fingerprint: &str| Identity {
            worker_id: "dec".into(),
            served_name: "m".into(),
            model_fingerprint: fingerprint.into(),
            role: tandem_protocol::messages::WorkerRole::Decode,
            device: "cpu".into(),
            total_kv_blocks: 8,
            heartbeat: Duration::from_secs(1),
        };
        assert_eq!(
            model_mismatch(&handle, &own(&handle.model_fingerprint)),
            None
        );
        let refused = model_mismatch(&handle, &own("1234")).expect("another model");
        assert!(
            refused.contains("KV of another model") && refused.contains("\"1234\""),
            "{refused}"
        );
        let older = KvHandle {
            model_fingerprint: String::new(),
            ..handle
        };
        assert_eq!(model_mismatch(&older, &own("1234")), None);
    }

    #[test]
    fn a_handle_is_checked_whole_before_anything_is_read() {
        let (good, own) = valid_handle();
        assert_eq!(check_handle(&good, &own, 5), Ok(()));
        let refused = |mutate: &dyn Fn(&mut KvHandle), prompt: usize, needle: &str| {
            let mut handle = good.clone();
            mutate(&mut handle);
            let err = check_handle(&handle, &own, prompt).unwrap_err();
            assert!(err.contains(needle), "{err} (wanted {needle:?})");
        };
        refused(&|_| {}, 6, "for a prompt of 6");
        refused(&|h| h.num_tokens = 0, 0, "0 tokens");
        refused(&|h| h.blocks.truncate(2), 5, "regions of 2 blocks");
        refused(&|h| h.blocks.clear(), 5, "0 regions");
        refused(&|h| h.blocks.push(h.blocks[2]), 5, "4 regions for 5 tokens");
        refused(&|h| h.blocks[1].len = 4096, 5, "regions of 34 blocks");
        refused(&|h| h.blocks[1].len = 100, 5, "a region of 100 bytes");
        refused(&|h| h.blocks[1].len = 0, 5, "a region of 0 bytes");
        // One region for the whole export (a reader of coalesced regions), or any runs of
        // whole blocks, as long as they add up to the prompt's blocks.
        let coalesced = super::super::export::fixtures::handle_of(true, 1, u64::MAX);
        assert_eq!(coalesced.blocks.len(), 1);
        assert_eq!(check_handle(&coalesced, &own, 5), Ok(()));
        let mut runs = good.clone();
        runs.blocks = vec![
            tandem_protocol::messages::KvRegion {
                addr: 4096,
                len: 256,
            },
            good.blocks[2],
        ];
        assert_eq!(check_handle(&runs, &own, 5), Ok(()));
        refused(
            &|h| h.blocks = vec![coalesced.blocks[0], coalesced.blocks[0]],
            5,
            "regions of 6 blocks",
        );
        let mut too_long = coalesced.clone();
        too_long.blocks[0].len += 128;
        assert!(
            check_handle(&too_long, &own, 5)
                .unwrap_err()
                .contains("regions of 4 blocks")
        );
        refused(&|h| h.blocks[2].addr = u64::MAX - 10, 5, "a region of");
        refused(&|h| h.rkey = "ab".repeat(MAX_HANDLE_HEX), 5, "too long");
        refused(&|h| h.address.clear(), 5, "without an address");
        let gpu = |h: &mut KvHandle, alloc_bytes: u64, hex: usize| {
            h.backend = KvTransportKind::CudaIpc;
            h.cuda_ipc = Some(Box::new(tandem_protocol::messages::CudaIpcSource {
                host_id: "h".into(),
                device: "GPU-0".into(),
                mem_handle: "0".repeat(hex),
                alloc_bytes,
            }));
        };
        let mut on_gpu = good.clone();
        gpu(&mut on_gpu, 1 << 20, CUDA_IPC_HANDLE_HEX);
        assert_eq!(check_handle(&on_gpu, &own, 5), Ok(()));
        refused(
            &|h| gpu(h, 4096, CUDA_IPC_HANDLE_HEX),
            5,
            "ends past the exported 4096 bytes",
        );
        refused(&|h| gpu(h, 1 << 20, 12), 5, "12 hex digits");
        refused(
            &|h| h.backend = KvTransportKind::CudaIpc,
            5,
            "without its allocation",
        );
        refused(
            &|h| {
                gpu(h, 1 << 20, CUDA_IPC_HANDLE_HEX);
                h.backend = KvTransportKind::Ucx;
            },
            5,
            "names GPU memory",
        );
    }

    #[test]
    fn a_cancel_token_is_shared_by_its_clones() {
        let token = CancelToken::default();
        let held_by_the_pull = token.clone();
        assert!(!held_by_the_pull.is_cancelled());
        token.cancel();
        assert!(held_by_the_pull.is_cancelled());
    }
}
