//! The worker on the bus: `worker --role both --model DIR --nats URL`.
//!
//! Loads the model like `worker generate` (same tokenizer, detokenizer and stop handling), runs
//! the engine on its own thread with a KV cache sized by `--kv-cache-tokens`, and serves jobs
//! from NATS as docs/protocol.md describes:
//!
//! - [`bus`]: the connection, the serve loop (subscriptions, heartbeat timer, signals) and the
//!   drain on SIGTERM.
//! - `worker`: what every role shares: the bus client and subjects, the engine handle, the
//!   requests in flight, acknowledgement, cancellation in the engine, heartbeats.
//! - `roles`: what each role does with its jobs: `generation` (`both` and `decode`, with
//!   `pull` for disaggregated requests) and `context` (prefill, `export`, `export_ledger`).
//! - [`kv_auth`]: the deployment's KV secret and the MAC that binds a KV handle to its export
//!   and its request.
//! - [`job`]: a bus job in the engine's terms.
//! - [`stream`]: engine events into the stream messages the api-server reads.
//! - [`test_hooks`]: what tests that start a worker ask of it through its environment, read
//!   once here at start (with the engine's settings, [`EngineSettings::from_env`]).

pub mod bus;
mod connection;
pub mod grammar;
pub mod job;
pub mod kv_auth;
mod kv_events;
mod roles;
pub mod stream;
pub mod test_hooks;
mod worker;

use std::sync::Arc;

use tandem_protocol::messages::WorkerRole;
use thiserror::Error;

use crate::device::{Device, DeviceError, KvBudget, StartedEngine, load_model};
use crate::engine::{EngineConfig, EngineError, EngineSettings};
use crate::model_dir::{ModelDirError, ModelText, check_model_dir};

/// The flags of a worker serving on the bus (defined with the launcher's side of them).
pub use tandem_cli::args::WorkerArgs;

/// KV capacity of a CPU worker without --kv-cache-tokens.
const DEFAULT_CPU_KV_TOKENS: usize = 16384;

/// Default ceiling of the transfer pool.
const DEFAULT_TRANSFER_POOL_MAX_BYTES: usize = 1 << 30;

/// What a GPU context worker's default transfer pool adds for the exports' seals
/// ([`crate::transfer::seal`]): a seal after K/V that fills whole pages takes a page of its
/// own (slices start on pages), so this lets 64 such exports share the pool at once.
const SEAL_HEADROOM_BYTES: usize = 64 * crate::transfer::pool::SLICE_ALIGN;

/// Bytes of the host transfer pool: the flag's, or what `max_tokens_in_buffer` tokens take
/// (whole blocks; on a context worker, and room for the exports' seals) up to
/// [`DEFAULT_TRANSFER_POOL_MAX_BYTES`]. A `both` worker transfers nothing; a CPU context
/// worker's exports are read straight out of its cache, so it needs no pool either.
fn transfer_pool_bytes(
    role: WorkerRole,
    device: Device,
    flag_mib: Option<usize>,
    max_tokens_in_buffer: usize,
    layout: &crate::kv_cache::KvLayout,
) -> usize {
    let copies_exports = matches!(device, Device::Cuda(_));
    match (role, flag_mib) {
        (WorkerRole::Both, _) => 0,
        (_, Some(mib)) => mib << 20,
        (WorkerRole::Context, None) if !copies_exports => 0,
        (_, None) => {
            let seals = if role == WorkerRole::Context {
                SEAL_HEADROOM_BYTES
            } else {
                0
            };
            (buffer_bytes(max_tokens_in_buffer, layout) + seals)
                .min(DEFAULT_TRANSFER_POOL_MAX_BYTES)
        }
    }
}

/// Whether a GPU worker moves K/V over CUDA IPC with GPU workers of its host: context and
/// decode workers do, unless `--cuda-ipc-pool-mb 0` turns it off. No pool is allocated: a
/// context worker's exports are its cache's blocks, and a decode worker's pulls land in the
/// blocks its engine reserved for them. A size other than 0 is accepted (older configurations
/// set one) and said to be unused.
fn cuda_ipc_enabled(role: WorkerRole, flag_mib: Option<usize>) -> bool {
    match (role, flag_mib) {
        (WorkerRole::Both, _) | (_, Some(0)) => false,
        (_, Some(mib)) => {
            tracing::info!(
                "--cuda-ipc-pool-mb {mib}: CUDA IPC needs no pool (exports are read out of the \
                 context worker's cache, pulls land in the decode worker's); only 0, which \
                 turns CUDA IPC off, changes anything"
            );
            true
        }
        (_, None) => true,
    }
}

/// What `max_tokens_in_buffer` tokens of K/V take, in whole blocks: the default size of both
/// transfer pools.
fn buffer_bytes(max_tokens_in_buffer: usize, layout: &crate::kv_cache::KvLayout) -> usize {
    max_tokens_in_buffer.div_ceil(layout.block_size) * layout.block_bytes()
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("--role is required (both, context or decode)")]
    MissingRole,
    #[error("--model is required (a model directory made by `model-prep`)")]
    MissingModel,
    #[error("starting the KV transport: {0}")]
    Transport(crate::transfer::TransferError),
    #[error(transparent)]
    ModelDir(#[from] ModelDirError),
    #[error("invalid engine settings: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("--gpu-memory-fraction {0} is not in (0, 1]")]
    GpuMemoryFraction(f64),
    #[error("--kv-cache-tokens {tokens} is less than one block of {block_size} tokens")]
    CacheTooSmall { tokens: usize, block_size: usize },
    #[error("starting the engine thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    KvSecret(#[from] kv_auth::KvSecretError),
    #[error("lowering the CPU priority by --nice {nice}: {source}")]
    Nice { nice: u8, source: std::io::Error },
    #[error("n-gram speculation: {0}")]
    Speculation(String),
    #[error(transparent)]
    QuantKernels(#[from] crate::device::UnknownQuantKernels),
}

/// Lowers the CPU scheduling priority of this thread by `nice` (to at most 19), before any other thread starts:
/// Linux keeps a nice value per thread, and threads inherit their creator's, so every thread
/// of the worker (the runtime's, the engine's, the CPU backend's pool) runs at it.
fn lower_priority(nice: u8) -> Result<(), ServeError> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: system calls on this thread's own priority; no memory is shared. (Reading its
    // own priority cannot fail; -1 is a valid nice value.)
    let done = unsafe {
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(
            libc::PRIO_PROCESS,
            0,
            (now + libc::c_int::from(nice)).min(19),
        )
    };
    if done != 0 {
        return Err(ServeError::Nice {
            nice,
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!(nice, "running at a lower CPU priority");
    Ok(())
}

/// Loads the model, starts the engine and serves on the bus until SIGTERM/SIGINT and the
/// drain that follows.
pub fn run(args: &WorkerArgs) -> Result<(), ServeError> {
    let role = args.role.ok_or(ServeError::MissingRole)?;
    let model_dir = args.model.clone().ok_or(ServeError::MissingModel)?;
    let device: Device = args.device.parse()?;
    lower_priority(args.nice)?;
    let block_size = args.block_size_on(matches!(device, Device::Cuda(_)));
    if let Some(tokens) = args.kv_cache_tokens.filter(|&t| t < block_size) {
        return Err(ServeError::CacheTooSmall { tokens, block_size });
    }
    if !(args.gpu_memory_fraction > 0.0 && args.gpu_memory_fraction <= 1.0) {
        return Err(ServeError::GpuMemoryFraction(args.gpu_memory_fraction));
    }
    let kv_secret = kv_auth::KvSecret::load(args.kv_secret_file.as_deref(), |name| {
        std::env::var(name).ok()
    })?
    .map(Arc::new);
    check_model_dir(&model_dir)?;
    let model_fingerprint = crate::model_dir::model_fingerprint(&model_dir)?;
    let served_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| tandem_protocol::subjects::default_served_name(&model_dir));
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| default_worker_id(role));

    let test_hooks = test_hooks::TestHooks::from_env();

    let started = std::time::Instant::now();
    let text = ModelText::load(&model_dir)?;
    let mut model = load_model(
        &model_dir,
        device,
        &crate::device::cpu_options(args)?,
        &args.gpu,
        args.tensor_parallel,
        args.kv_cache_dtype,
    )?;
    model
        .load_adapters(&model_dir, &args.lora_modules, &model_fingerprint)
        .map_err(ServeError::from)?;
    let lora_adapters: Vec<_> = model
        .adapters()
        .into_iter()
        .map(|(name, fingerprint)| tandem_protocol::messages::LoraAdapterInfo { name, fingerprint })
        .collect();
    let host_id = crate::transfer::host_id();
    // A group's K/V lies on its ranks' GPUs, each rank's heads in its own cache: CUDA IPC
    // shares (or writes) every rank's part.
    let cuda_ipc = match device {
        Device::Cuda(ordinal) if cuda_ipc_enabled(role, args.cuda_ipc_pool_mb) => {
            start_cuda_ipc(ordinal, args.tensor_parallel.max(1), &host_id)
        }
        Device::Cuda(_) | Device::Cpu => None,
    };
    let max_model_len = model.config().max_context();
    if let Some(window) = model.config().attention_window()
        && max_model_len < model.config().max_position_embeddings
    {
        tracing::warn!(
            window,
            max_position_embeddings = model.config().max_position_embeddings,
            "the model was trained with sliding-window attention, which the engine does not \
             implement: contexts are capped at the window, where full attention equals it"
        );
    }
    let vocab_size = model.config().vocab_size;
    let budget = KvBudget {
        tokens: args.kv_cache_tokens,
        cpu_default_tokens: DEFAULT_CPU_KV_TOKENS,
        gpu_memory_fraction: args.gpu_memory_fraction,
    };
    if budget.tokens.is_none() {
        model.reserve_activations(block_size, args.max_num_batched_tokens, args.max_num_seqs)?;
    }
    let config = EngineConfig {
        block_size,
        num_blocks: model.kv_blocks(block_size, budget)?,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        max_model_len: Some(max_model_len),
        growth_reserve_tokens: Some(args.growth_reserve_tokens).filter(|&t| t > 0),
        prefix_caching: args.prefix_caching,
        cache_namespace: model_fingerprint.clone(),
        settings: EngineSettings::from_env().with_flags(&args.engine),
        speculation: ngram_speculation(&args.speculation)?,
    };
    let backend = model.describe();
    let weights = model.weights_name();
    let StartedEngine {
        handle,
        thread,
        layout,
        total_blocks,
        kv_memory,
    } = model.spawn_engine(
        &model_dir,
        config,
        Some(text.decoder()),
        test_hooks.forward_faults,
    )?;
    tracing::info!(
        model = %model_dir.display(),
        served_name,
        worker_id,
        model_fingerprint,
        device = args.device,
        backend,
        kv_blocks = total_blocks,
        block_size,
        weights = %weights,
        rss_mb = resident_bytes().map(|b| b / (1 << 20)),
        "model loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let pool_bytes = transfer_pool_bytes(
        role,
        device,
        args.kv_transfer_pool_mb,
        args.max_tokens_in_buffer,
        &layout,
    );
    let transport =
        crate::transfer::default_transport(pool_bytes).map_err(ServeError::Transport)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Thread)?;
    if let Some(pool) = transport.pool() {
        // SAFETY: the transport keeps its pool mapped until the process exits.
        match runtime.block_on(unsafe { handle.pin_host_memory(pool) }) {
            Ok(true) => tracing::info!(
                mib = pool.len >> 20,
                "KV transfer pool pinned: the device copies straight to and from it"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "pinning the KV transfer pool failed ({e}); transfers are copied through the \
                 backend's staging buffer instead"
            ),
        }
    }
    let (host_cache, device_cache) = match role {
        WorkerRole::Context => runtime.block_on(expose_cache(
            &kv_memory,
            &transport,
            cuda_ipc.as_ref(),
            &handle,
        )),
        _ => (None, None),
    };
    // A GPU decode worker's pulls over CUDA IPC write straight into its cache.
    let device_cache_parts = match (role, &cuda_ipc) {
        (WorkerRole::Decode, Some(cuda_ipc))
            if kv_memory.len() == cuda_ipc.devices()
                && kv_memory
                    .iter()
                    .all(|part| matches!(part.memory, crate::backend::KvMemory::Device(_))) =>
        {
            kv_memory.clone()
        }
        _ => Vec::new(),
    };
    let settings = bus::BusSettings {
        nats_url: args.nats.clone(),
        nats_auth: args.nats_auth.clone(),
        served_name,
        model_fingerprint,
        worker_id,
        role,
        device: args.device.clone(),
        total_kv_blocks: total_blocks,
        heartbeat: std::time::Duration::from_millis(args.heartbeat_ms.max(50)),
        model_stop_ids: Arc::from(text.stop_token_ids()),
        grammars: Arc::new(grammar::WorkerGrammars::new(
            model_dir.clone(),
            vocab_size,
            text.stop_token_ids(),
        )),
        layout,
        transport,
        cuda_ipc: cuda_ipc.filter(|_| role != WorkerRole::Decode || !device_cache_parts.is_empty()),
        device_cache_parts,
        host_cache,
        device_cache,
        host_id,
        max_tokens_in_buffer: args.max_tokens_in_buffer,
        kv_transfer_timeout: std::time::Duration::from_millis(args.kv_transfer_timeout_ms),
        max_running: args.max_num_seqs,
        weights,
        lora_adapters,
        max_queued: args.queue_bound(),
        prefix_caching: args.prefix_caching,
        kv_secret,
        test_hooks,
    };
    runtime.block_on(bus::serve(settings, handle))?;
    // Tasks still pending (a request cut short by a second signal) hold engine handles.
    drop(runtime);
    // Every handle is gone: the engine thread has ended its requests and exits.
    if thread.join().is_err() {
        tracing::error!("the engine thread panicked");
    }
    Ok(())
}

/// A context worker's KV cache registered for exports read straight out of it: a host
/// cache with the host transport (UCX), a device cache with CUDA IPC (a tensor-parallel
/// group's, every rank's part). A worker whose cache cannot be registered still serves,
/// copying its exports out (host memory, UCX), and says why. The registrations hold an engine
/// handle: the cache outlives them.
async fn expose_cache(
    parts: &[crate::backend::KvCacheMemory],
    host: &Arc<dyn crate::transfer::KvTransport>,
    cuda_ipc: Option<&Arc<crate::transfer::cuda_ipc::CudaIpcTransport>>,
    engine: &crate::engine::EngineHandle,
) -> (
    Option<Arc<crate::transfer::cache::ExposedCache>>,
    Option<Arc<crate::transfer::cache::ExposedCache>>,
) {
    use crate::backend::KvMemory;
    use crate::transfer::KvTransport;
    let on_device = parts
        .iter()
        .all(|part| matches!(part.memory, KvMemory::Device(_)));
    // SAFETY (both calls): the cache is the engine's, allocated once and never moved while the
    // engine lives, which the engine handle handed over keeps it doing; the engine writes no
    // block while it is pinned for an export, and never the export slab.
    let exposed = match (parts, cuda_ipc) {
        ([], _) => return (None, None),
        // A CPU group's ranks: its exports are put together and copied out.
        ([_, _, ..], _) if !on_device => return (None, None),
        ([part], _) if !on_device => {
            unsafe { host.expose_cache(*part, Box::new(engine.clone())) }.await
        }
        // A GPU cache without CUDA IPC: every export is copied out for UCX.
        (_, None) => return (None, None),
        ([part], Some(cuda_ipc)) => {
            unsafe { cuda_ipc.expose_cache(*part, Box::new(engine.clone())) }.await
        }
        (parts, Some(cuda_ipc)) => {
            unsafe { cuda_ipc.expose_ranks(parts.to_vec(), Box::new(engine.clone())) }.map(Some)
        }
    };
    match exposed {
        Ok(Some(cache)) if on_device => (None, Some(cache)),
        Ok(Some(cache)) => (Some(cache), None),
        Ok(None) => (None, None),
        Err(e) => {
            tracing::warn!(
                "registering the KV cache for transfers failed ({e}); exports are copied out \
                 of it into host memory (UCX) instead"
            );
            (None, None)
        }
    }
}

/// The CUDA IPC transport of a GPU worker on `cuda:{ordinal}` and, for a tensor-parallel
/// group of `ranks`, the GPUs after it. A worker whose transport cannot be set up still
/// serves, through UCX only, and says why.
fn start_cuda_ipc(
    ordinal: usize,
    ranks: usize,
    host_id: &str,
) -> Option<Arc<crate::transfer::cuda_ipc::CudaIpcTransport>> {
    use crate::transfer::cuda_ipc::CudaIpcTransport;
    let started = if ranks == 1 {
        CudaIpcTransport::start(ordinal, 0, host_id.into())
    } else {
        let ordinals: Vec<usize> = (ordinal..ordinal + ranks).collect();
        CudaIpcTransport::start_group(&ordinals, host_id.into())
    };
    match started {
        Ok(transport) => Some(Arc::new(transport)),
        Err(e) => {
            tracing::warn!("no CUDA IPC transfers ({e}); K/V moves through host memory (UCX) only");
            None
        }
    }
}

/// `both-myhost-12345`: unique per process on a host, readable in logs and metrics.
fn default_worker_id(role: WorkerRole) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{}-{}-{}",
        role.as_str(),
        tandem_protocol::subjects::subject_token(&host),
        std::process::id()
    )
}

/// The process's resident memory (Linux's `/proc/self/status`), for the start-up log: the
/// weights as the backend holds them plus the KV cache and everything else.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The engine's n-gram speculation from the worker's flags; `None` when off.
fn ngram_speculation(
    args: &tandem_cli::args::SpeculationArgs,
) -> Result<Option<crate::engine::drafter::DraftConfig>, ServeError> {
    if args.ngram_draft_tokens == 0 {
        return Ok(None);
    }
    let config = crate::engine::drafter::DraftConfig {
        max_draft_tokens: args.ngram_draft_tokens,
        max_match: args.ngram_max_match,
        min_match: args.ngram_min_match,
    };
    config.validate().map_err(ServeError::Speculation)?;
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvDType, KvLayout};

    #[test]
    fn the_worker_flag_defaults_to_the_engines_growth_reserve() {
        assert_eq!(
            tandem_cli::args::DEFAULT_GROWTH_RESERVE_TOKENS,
            crate::engine::DEFAULT_GROWTH_RESERVE_TOKENS
        );
        assert_eq!(
            WorkerArgs::default().growth_reserve_tokens,
            crate::engine::DEFAULT_GROWTH_RESERVE_TOKENS
        );
    }

    #[test]
    fn the_transfer_pool_holds_the_token_budget_and_seals_up_to_a_ceiling() {
        // SmolLM2-135M: 368,640 bytes per 16-token block.
        let smollm2 = KvLayout {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            dtype: KvDType::Bf16,
        };
        let gpu = Device::Cuda(0);
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, gpu, None, 1000, &smollm2),
            63 * 368_640 + 64 * 4096,
            "1000 tokens are 63 whole blocks, and each export's seal may take a page"
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, gpu, None, 65536, &smollm2),
            DEFAULT_TRANSFER_POOL_MAX_BYTES
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, gpu, Some(64), 65536, &smollm2),
            64 << 20
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, gpu, Some(0), 65536, &smollm2),
            0
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, Device::Cpu, None, 1000, &smollm2),
            0,
            "a CPU context worker's exports are its cache's blocks"
        );
        for device in [gpu, Device::Cpu] {
            assert_eq!(
                transfer_pool_bytes(WorkerRole::Decode, device, None, 1000, &smollm2),
                63 * 368_640,
                "pulls have no seals"
            );
            assert_eq!(
                transfer_pool_bytes(WorkerRole::Both, device, Some(64), 65536, &smollm2),
                0
            );
        }
    }

    #[test]
    fn context_and_decode_workers_move_kv_over_cuda_ipc_unless_0_turns_it_off() {
        for role in [WorkerRole::Context, WorkerRole::Decode] {
            assert!(cuda_ipc_enabled(role, None));
            assert!(cuda_ipc_enabled(role, Some(64)), "a size: accepted, unused");
            assert!(!cuda_ipc_enabled(role, Some(0)), "0: no CUDA IPC");
        }
        assert!(!cuda_ipc_enabled(WorkerRole::Both, None));
    }
}
