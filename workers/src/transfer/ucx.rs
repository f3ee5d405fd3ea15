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

use std::collections::HashMap;
use std::time::Duration;

use tandem_ucx::{Context, EndpointCache, GetOp, MemoryRegion, RemoteKey, UcxError, Worker};
use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, ExportBuffer, Exported, KvTransport, RemoteKv, TransferError};

enum Command {
    Reserve {
        len: usize,
        reply: oneshot::Sender<Result<ExportBuffer, TransferError>>,
    },
    Unexport(u64),
    Pull {
        remote: RemoteKv,
        timeout: Duration,
        reply: oneshot::Sender<Result<Vec<u8>, TransferError>>,
    },
}

/// The UCX transport of this process (cheap to share: a channel to the `ucx` thread).
pub struct UcxTransport {
    commands: mpsc::UnboundedSender<Command>,
}

/// Unregisters (and frees) an export when the context worker lets go of it.
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

impl UcxTransport {
    /// Starts the `ucx` thread: UCX context and worker (reading UCX's own environment, e.g.
    /// `UCX_TLS`), and the progress loop.
    pub fn start() -> Result<Self, TransferError> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (ready, started) = std::sync::mpsc::channel();
        let loop_commands = commands.clone();
        std::thread::Builder::new()
            .name("ucx".into())
            .spawn(move || run(receiver, loop_commands, ready))
            .map_err(|e| TransferError::Backend(format!("starting the UCX thread: {e}")))?;
        match started.recv() {
            Ok(Ok(())) => Ok(Self { commands }),
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
    fn backend(&self) -> &'static str {
        "ucx"
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
    ) -> BoxFuture<Result<Vec<u8>, TransferError>> {
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
}

fn backend_error(what: &str, e: UcxError) -> TransferError {
    TransferError::Backend(format!("{what}: {e}"))
}

/// The `ucx` thread.
fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    own_sender: mpsc::UnboundedSender<Command>,
    ready: std::sync::mpsc::Sender<Result<(), TransferError>>,
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
                Ok((context, worker, address))
            });
        let (context, worker, address) = match started {
            Ok(parts) => {
                let _ = ready.send(Ok(()));
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
        let mut exports: HashMap<u64, MemoryRegion> = HashMap::new();
        let mut next_id = 1u64;
        while let Some(command) = commands.recv().await {
            match command {
                Command::Reserve { len, reply } => {
                    // Memory UCX allocates (a shared segment) rather than registered caller
                    // memory: over shm a reader then maps it and copies on its own, where
                    // registered user memory is served by messages this process must handle
                    // (15-25x slower here, docs/benchmarks.md).
                    let reserved = MemoryRegion::allocate(&context, len)
                        .and_then(|mut region| {
                            let rkey = region.pack_rkey()?;
                            let bytes = region
                                .bytes_mut()
                                .expect("UCX-allocated memory is owned")
                                .as_mut_ptr();
                            Ok((rkey, bytes, region))
                        })
                        .map_err(|e| backend_error("registering the KV buffer", e))
                        .map(|(rkey, bytes, region)| {
                            let id = next_id;
                            next_id += 1;
                            let exported = Exported {
                                address: address.clone(),
                                rkey,
                                addr: region.address(),
                                len: region.len() as u64,
                                keepalive: Box::new(ExportGuard {
                                    id,
                                    commands: own_sender.clone(),
                                }),
                            };
                            exports.insert(id, region);
                            // SAFETY: the region's `len` bytes live in `exports` until the
                            // guard in `exported` is dropped; only the buffer's owner writes
                            // them before the handle goes out.
                            unsafe { ExportBuffer::new(bytes, len, exported) }
                        });
                    let _ = reply.send(reserved);
                }
                Command::Unexport(id) => {
                    exports.remove(&id);
                }
                Command::Pull {
                    remote,
                    timeout,
                    reply,
                } => {
                    let endpoints = std::rc::Rc::clone(&endpoints);
                    tokio::task::spawn_local(async move {
                        let result = pull(&endpoints, &remote, timeout).await;
                        if result.is_err() {
                            // A failed endpoint is not reused; the next pull reconnects.
                            endpoints.remove(&remote.address);
                        }
                        let _ = reply.send(result);
                    });
                }
            }
        }
    });
}

/// Reads the coalesced regions of `remote` into one buffer, all gets in flight at once.
async fn pull(
    endpoints: &EndpointCache,
    remote: &RemoteKv,
    timeout: Duration,
) -> Result<Vec<u8>, TransferError> {
    let regions = remote.coalesced();
    let (Some(start), Some(end)) = (
        regions.iter().map(|&(addr, _)| addr).min(),
        regions.iter().map(|&(addr, len)| addr + len).max(),
    ) else {
        return Ok(Vec::new());
    };
    let endpoint = endpoints
        .get(&remote.address)
        .map_err(|e| TransferError::Unavailable(format!("connecting to the KV source: {e}")))?;
    let rkey = RemoteKey::unpack(&endpoint, &remote.rkey, start, (end - start) as usize)
        .map_err(|e| TransferError::InvalidHandle(format!("remote key: {e}")))?;
    let mut buffer = vec![0u8; remote.total_len() as usize];
    let mut ops = Vec::with_capacity(regions.len());
    let mut rest = buffer.as_mut_slice();
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
    // disjoint slices of `buffer`, borrowed by the ops until then.
    let result = unsafe { endpoint.get_all(ops, timeout) }.await;
    result.map_err(|e| TransferError::Unavailable(format!("reading the KV cache: {e}")))?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            address: exported.address.clone(),
            rkey: exported.rkey.clone(),
            regions: (0..exported.len / block)
                .map(|i| (exported.addr + i * block, block))
                .collect(),
        };
        let pulled = puller
            .pull(remote.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(pulled == data, "pulled bytes differ");
        // Released: a later pull of the same regions finds nothing registered. Over shm the
        // memory may still be mapped, so only check that the export can be dropped and a new
        // one is independent.
        drop(exported);
        let again = exporter.export(vec![7u8; 4096]).await.unwrap();
        let pulled = puller
            .pull(
                RemoteKv {
                    address: again.address.clone(),
                    rkey: again.rkey.clone(),
                    regions: vec![(again.addr, 4096)],
                },
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(pulled, vec![7u8; 4096]);
    }
}
