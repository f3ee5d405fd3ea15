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

pub mod bus;
pub mod grammar;
pub mod job;
pub mod kv_auth;
mod roles;
pub mod stream;
mod worker;

use std::sync::Arc;

use tandem_protocol::messages::WorkerRole;
use thiserror::Error;

use crate::device::{Device, DeviceError, KvBudget, StartedEngine, load_model};
use crate::engine::{EngineConfig, EngineError};
use crate::model_dir::{ModelDirError, ModelText, check_model_dir};

/// The flags of a worker serving on the bus (defined with the launcher's side of them).
pub use tandem_cli::args::WorkerArgs;

/// KV capacity of a CPU worker without --kv-cache-tokens.
const DEFAULT_CPU_KV_TOKENS: usize = 16384;

/// Default ceiling of the transfer pool.
const DEFAULT_TRANSFER_POOL_MAX_BYTES: usize = 1 << 30;

/// What a context worker's default transfer pool adds for the exports' seals
/// ([`crate::transfer::seal`]): a seal after K/V that fills whole pages takes a page of its
/// own (slices start on pages), so this lets 64 such exports share the pool at once.
const SEAL_HEADROOM_BYTES: usize = 64 * crate::transfer::pool::SLICE_ALIGN;

/// Bytes of the transfer pool: the flag's, or what `max_tokens_in_buffer` tokens take (whole
/// blocks; on a context worker, and room for the exports' seals) up to
/// [`DEFAULT_TRANSFER_POOL_MAX_BYTES`]. A `both` worker transfers nothing.
fn transfer_pool_bytes(
    role: WorkerRole,
    flag_mib: Option<usize>,
    max_tokens_in_buffer: usize,
    layout: &crate::kv_cache::KvLayout,
) -> usize {
    if role == WorkerRole::Both {
        return 0;
    }
    let seals = if role == WorkerRole::Context {
        SEAL_HEADROOM_BYTES
    } else {
        0
    };
    match flag_mib {
        Some(mib) => mib << 20,
        None => (max_tokens_in_buffer.div_ceil(layout.block_size) * layout.block_bytes() + seals)
            .min(DEFAULT_TRANSFER_POOL_MAX_BYTES),
    }
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
}

/// Loads the model, starts the engine and serves on the bus until SIGTERM/SIGINT and the
/// drain that follows.
pub fn run(args: &WorkerArgs) -> Result<(), ServeError> {
    let role = args.role.ok_or(ServeError::MissingRole)?;
    let model_dir = args.model.clone().ok_or(ServeError::MissingModel)?;
    let device: Device = args.device.parse()?;
    if let Some(tokens) = args.kv_cache_tokens.filter(|&t| t < args.block_size) {
        return Err(ServeError::CacheTooSmall {
            tokens,
            block_size: args.block_size,
        });
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

    let started = std::time::Instant::now();
    let text = ModelText::load(&model_dir)?;
    let model = load_model(&model_dir, device, args.threads, &args.gpu)?;
    let host_id = crate::transfer::host_id();
    // Before the KV cache takes its share of the free device memory.
    let cuda_ipc = match device {
        Device::Cuda(ordinal) => start_cuda_ipc(
            ordinal,
            transfer_pool_bytes(
                role,
                args.cuda_ipc_pool_mb,
                args.max_tokens_in_buffer,
                &model.kv_layout(args.block_size),
            ),
            &host_id,
        ),
        Device::Cpu => None,
    };
    let max_model_len = model.config().max_position_embeddings;
    let vocab_size = model.config().vocab_size;
    let budget = KvBudget {
        tokens: args.kv_cache_tokens,
        cpu_default_tokens: DEFAULT_CPU_KV_TOKENS,
        gpu_memory_fraction: args.gpu_memory_fraction,
    };
    let config = EngineConfig {
        block_size: args.block_size,
        num_blocks: model.kv_blocks(args.block_size, budget)?,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        max_model_len: Some(max_model_len),
    };
    let backend = model.describe();
    let StartedEngine {
        handle,
        thread,
        layout,
        total_blocks,
    } = model.spawn_engine(&model_dir, config, Some(text.decoder()))?;
    tracing::info!(
        model = %model_dir.display(),
        served_name,
        worker_id,
        model_fingerprint,
        device = args.device,
        backend,
        kv_blocks = total_blocks,
        block_size = args.block_size,
        "model loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let pool_bytes = transfer_pool_bytes(
        role,
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
        cuda_ipc,
        host_id,
        max_tokens_in_buffer: args.max_tokens_in_buffer,
        kv_transfer_timeout: std::time::Duration::from_millis(args.kv_transfer_timeout_ms),
        max_running: args.max_num_seqs,
        max_queued: args.queue_bound(),
        kv_secret,
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

/// The CUDA IPC transport of a GPU worker with a pool of `pool_bytes` (none for 0). A worker
/// whose pool cannot be set up still serves, through UCX only, and says why.
fn start_cuda_ipc(
    ordinal: usize,
    pool_bytes: usize,
    host_id: &str,
) -> Option<Arc<dyn crate::transfer::KvTransport>> {
    if pool_bytes == 0 {
        return None;
    }
    match crate::transfer::cuda_ipc::CudaIpcTransport::start(ordinal, pool_bytes, host_id.into()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvDType, KvLayout};

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
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, None, 1000, &smollm2),
            63 * 368_640 + 64 * 4096,
            "1000 tokens are 63 whole blocks, and each export's seal may take a page"
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, None, 65536, &smollm2),
            DEFAULT_TRANSFER_POOL_MAX_BYTES
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, Some(64), 65536, &smollm2),
            64 << 20
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Context, Some(0), 65536, &smollm2),
            0
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Decode, None, 1000, &smollm2),
            63 * 368_640,
            "pulls have no seals"
        );
        assert_eq!(
            transfer_pool_bytes(WorkerRole::Both, Some(64), 65536, &smollm2),
            0
        );
    }
}
