//! The device a worker computes on (`--device cpu|cuda:N`): loading the model onto it, sizing
//! the KV cache for it, and starting the engine whichever backend it is.
//!
//! The engine is generic over the backend; this is the one place that turns the run-time
//! `--device` choice into a concrete type, so `worker generate` and the bus roles share it.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use tandem_cli::args::{GpuArgs, WorkerArgs};
use tandem_model::{ModelConfig, WeightDType};
use tandem_protocol::config::KvCacheDtype;
use thiserror::Error;

use crate::backend::cpu::group::{CpuGroup, GroupOptions};
use crate::backend::cpu::quant::ActivationCodes;
use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::{Backend, BackendError};
use crate::engine::{
    Engine, EngineConfig, EngineError, EngineHandle, ForwardFaults, ModelRunner, StepModel,
    TensorParallelRunner, TextDecoder,
};
use crate::kv_cache::{KvDType, KvLayout};
use crate::model::weights::SharedGeneration;
use crate::model::{Model, ModelError, ModelOptions, TensorParallel};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal (`cuda:0`; plain `cuda` is `cuda:0`).
    Cuda(usize),
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected `cpu`, `cuda` or `cuda:N`")]
    Unknown(String),
    #[error("starting the {device} backend: {source}")]
    Backend {
        device: Device,
        source: BackendError,
    },
    #[error("loading the model from {}: {source}", path.display())]
    Model {
        path: std::path::PathBuf,
        source: ModelError,
    },
    #[error(
        "the KV cache gets no block: {free_mib} MiB of device memory free after loading the \
         model, --gpu-memory-fraction {fraction} of it is less than one block of {block_mib:.1} MiB"
    )]
    NoKvMemory {
        free_mib: usize,
        fraction: f64,
        block_mib: f64,
    },
    #[error("invalid engine settings: {0}")]
    Engine(#[from] EngineError),
    #[error(
        "the {device} backend failed its start-up check: {detail}. The device computes wrong \
         values; the worker does not serve from it"
    )]
    SelfCheck { device: String, detail: String },
    #[error("starting the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("--tensor-parallel {size}: {detail}")]
    TensorParallel { size: usize, detail: String },
    #[error(
        "the largest step ({tokens} tokens over {sequences} sequences: --max-num-batched-tokens, \
         --max-num-seqs) does not run beside the model: {source}. Lower them, or use more GPUs"
    )]
    LargestStep {
        tokens: usize,
        sequences: usize,
        source: ModelError,
    },
    #[error(
        "a prefill of {tokens} tokens, run at start-up to choose the FP8 products' \
         configurations, failed: {source} (TANDEM_FP8_TUNE=0 skips it)"
    )]
    Fp8Tuning { tokens: usize, source: ModelError },
}

impl std::str::FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A model on one of the backends.
pub enum LoadedModel {
    Cpu(Box<Model<CpuBackend>>),
    Cuda(Box<Model<CudaBackend>>),
    /// The ranks of a tensor-parallel group on the CPU, each a share of the model
    /// ([`crate::model::shard`]), and the group they sum their outputs over.
    CpuGroup {
        ranks: Vec<Model<CpuBackend>>,
        group: Arc<CpuGroup>,
    },
    /// The ranks of a tensor-parallel group of GPUs, one a GPU, summing over NCCL
    /// ([`crate::backend::cuda::nccl_communicators`]).
    CudaGroup {
        ranks: Vec<Model<CudaBackend>>,
    },
}

/// The KV cache's element type on `device` for `--kv-cache-dtype`: `None` leaves the CPU's to
/// the model (its weights' type); a GPU computes from bf16 weights and keeps a bf16 cache
/// whatever the files hold, unless told otherwise.
pub fn kv_dtype_on(device: Device, asked: KvCacheDtype) -> Option<KvDType> {
    match asked {
        KvCacheDtype::Auto => match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(KvDType::Bf16),
        },
        KvCacheDtype::Fp8 => Some(KvDType::Fp8),
        KvCacheDtype::Bf16 => Some(KvDType::Bf16),
        KvCacheDtype::F16 => Some(KvDType::F16),
        KvCacheDtype::F32 => Some(KvDType::F32),
    }
}

/// Loads the weights of `dir` onto `device` (`cpu` matters for the CPU only, `gpu` for a GPU
/// only), split over `tensor_parallel` ranks when more than one (sharing `cpu.threads` on the
/// CPU), with a KV cache of `kv_cache_dtype` ([`kv_dtype_on`]).
pub fn load_model(
    dir: &Path,
    device: Device,
    cpu: &CpuOptions,
    gpu: &GpuArgs,
    tensor_parallel: usize,
    kv_cache_dtype: KvCacheDtype,
) -> Result<LoadedModel, DeviceError> {
    let kv_dtype = kv_dtype_on(device, kv_cache_dtype);
    if tensor_parallel > 1 {
        return load_group(dir, device, cpu, gpu, tensor_parallel, kv_dtype);
    }
    let backend_err = |source| DeviceError::Backend { device, source };
    let model_err = |source| DeviceError::Model {
        path: dir.to_owned(),
        source,
    };
    match device {
        Device::Cpu => {
            let backend = CpuBackend::new(cpu).map_err(backend_err)?;
            let options = ModelOptions {
                kv_dtype,
                ..ModelOptions::default()
            };
            Model::load(dir, backend, &options)
                .map(|m| LoadedModel::Cpu(Box::new(m)))
                .map_err(model_err)
        }
        Device::Cuda(ordinal) => {
            let backend = CudaBackend::new(&cuda_options(ordinal, gpu)).map_err(backend_err)?;
            let options = ModelOptions {
                kv_dtype,
                ..ModelOptions::default()
            };
            Model::load(dir, backend, &options)
                .map(|m| LoadedModel::Cuda(Box::new(m)))
                .map_err(model_err)
        }
    }
}

/// A worker's CPU settings from its flags; `--quant-kernels` must name a set this CPU runs.
pub fn cpu_options(args: &WorkerArgs) -> Result<CpuOptions, UnknownQuantKernels> {
    let quant_isa = match &args.quant_kernels {
        None => None,
        Some(name) => {
            let available = tandem_cpu_quant::Isa::available();
            let isa = available.iter().copied().find(|isa| isa.name() == name);
            Some(isa.ok_or_else(|| UnknownQuantKernels {
                name: name.clone(),
                available: available.iter().map(|isa| isa.name()).collect(),
            })?)
        }
    };
    Ok(CpuOptions {
        threads: args.threads,
        quant_isa,
        quant_activations: ActivationCodes::from_bits(u32::from(args.quant_activation_bits))
            .expect("clap takes 8 or 16 bits"),
        ..CpuOptions::default()
    })
}

/// `--quant-kernels` named an instruction set this CPU does not run.
#[derive(Debug, thiserror::Error)]
#[error("--quant-kernels {name}: this CPU runs {}", available.join(", "))]
pub struct UnknownQuantKernels {
    pub name: String,
    pub available: Vec<&'static str>,
}

/// The settings of `cuda:{ordinal}`: a GPU flag that is given wins over its environment
/// variable, which wins over the default.
pub fn cuda_options(ordinal: usize, gpu: &GpuArgs) -> CudaOptions {
    let GpuArgs {
        cuda_graphs,
        device_sampling,
        attn_split_keys,
        l2_prefetch_mb,
    } = *gpu;
    let from_env = CudaOptions::from_env(ordinal);
    CudaOptions {
        cuda_graphs: cuda_graphs.unwrap_or(from_env.cuda_graphs),
        device_sampling: device_sampling.unwrap_or(from_env.device_sampling),
        attn_split_keys: attn_split_keys.or(from_env.attn_split_keys),
        l2_prefetch_mb: l2_prefetch_mb.or(from_env.l2_prefetch_mb),
        ..from_env
    }
}

/// [`load_model`] over `size` tensor-parallel ranks, each holding its share of the weights
/// ([`crate::model::shard`]): on the CPU, ranks in threads of this process sharing `threads`
/// (at least one each); on `cuda:N`, one rank per GPU, `cuda:N` to `cuda:N+size-1`, summing
/// over NCCL.
fn load_group(
    dir: &Path,
    device: Device,
    cpu: &CpuOptions,
    gpu: &GpuArgs,
    size: usize,
    kv_dtype: Option<KvDType>,
) -> Result<LoadedModel, DeviceError> {
    let backend_err = |source| DeviceError::Backend { device, source };
    /// Rank `rank` of `size`'s share of the model in `dir`, on `backend`.
    fn load<B: Backend>(
        dir: &Path,
        rank: usize,
        size: usize,
        backend: B,
        kv_dtype: Option<KvDType>,
        shared_generation: &Arc<SharedGeneration>,
    ) -> Result<Model<B>, DeviceError> {
        let options = ModelOptions {
            kv_dtype,
            tensor_parallel: TensorParallel::new(rank, size).expect("rank < size"),
            shared_generation: Some(shared_generation.clone()),
        };
        Model::load(dir, backend, &options).map_err(|source| DeviceError::Model {
            path: dir.to_owned(),
            source,
        })
    }
    /// Every rank at once, each in a thread of its own: a generated model's whole tensors
    /// are generated once for all of them (`SharedGeneration`), and one rank's uploads overlap
    /// another's generating.
    fn load_all<B: Backend + Send>(
        dir: &Path,
        backends: Vec<B>,
        kv_dtype: Option<KvDType>,
    ) -> Result<Vec<Model<B>>, DeviceError>
    where
        Model<B>: Send,
    {
        let size = backends.len();
        let share = SharedGeneration::new(size);
        on_each_rank(backends.into_iter().enumerate(), |(rank, backend)| {
            load(dir, rank, size, backend, kv_dtype, &share)
        })
    }
    match device {
        Device::Cpu => {
            let threads = if cpu.threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                cpu.threads
            };
            let group = Arc::new(CpuGroup::new(GroupOptions {
                size,
                timeout: crate::backend::cpu::group::DEFAULT_TIMEOUT,
            }));
            let backends = (0..size)
                .map(|rank| {
                    let options = CpuOptions {
                        threads: (threads / size).max(1),
                        ..cpu.clone()
                    };
                    CpuBackend::in_group(&options, group.clone(), rank).map_err(backend_err)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ranks = load_all(dir, backends, kv_dtype)?;
            Ok(LoadedModel::CpuGroup { ranks, group })
        }
        Device::Cuda(first) => {
            let mut backends = (first..first + size)
                .map(|ordinal| {
                    CudaBackend::new(&cuda_options(ordinal, gpu)).map_err(|source| {
                        DeviceError::Backend {
                            device: Device::Cuda(ordinal),
                            source,
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| DeviceError::TensorParallel {
                    size,
                    detail: format!(
                        "its ranks run on cuda:{first} to cuda:{}, one GPU each: {e}",
                        first + size - 1
                    ),
                })?;
            let streams = backends.iter().map(|b| b.stream().clone()).collect();
            let comms = crate::backend::cuda::nccl_communicators(streams).map_err(backend_err)?;
            for (backend, comm) in backends.iter_mut().zip(comms) {
                backend.join_group(comm);
            }
            let ranks = load_all(dir, backends, kv_dtype)?;
            Ok(LoadedModel::CudaGroup { ranks })
        }
    }
}

/// `f` of every rank's item, each in a thread of its own, all at once (a group's collectives
/// need every rank); the results in rank order, or the first rank's error.
fn on_each_rank<T: Send, R: Send>(
    items: impl IntoIterator<Item = T>,
    f: impl Fn(T) -> Result<R, DeviceError> + Sync,
) -> Result<Vec<R>, DeviceError> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank's thread panicked"))
            .collect()
    })
}

/// A running engine thread and what the bus needs to know about it.
pub struct StartedEngine {
    pub handle: EngineHandle,
    pub thread: JoinHandle<()>,
    pub layout: KvLayout,
    pub total_blocks: usize,
    /// Where the engine's KV cache lies (one part per tensor-parallel rank), for exports read
    /// straight out of it and pulls written straight into it; empty where it cannot be
    /// handed out.
    pub kv_memory: Vec<crate::backend::KvCacheMemory>,
}

/// How many KV blocks to allocate.
#[derive(Debug, Clone, Copy)]
pub struct KvBudget {
    /// A fixed capacity in tokens; `None` sizes it from the device.
    pub tokens: Option<usize>,
    /// CPU capacity in tokens when `tokens` is `None`.
    pub cpu_default_tokens: usize,
    /// On a GPU, with `tokens` `None`: this fraction of the memory free after loading the model.
    pub gpu_memory_fraction: f64,
}

impl LoadedModel {
    /// Loads LoRA adapters beside the model ([`Model::load_adapters`]), whose fingerprint is
    /// `base_fingerprint`. A tensor-parallel group refuses them.
    pub fn load_adapters(
        &mut self,
        dir: &Path,
        modules: &[crate::model::lora::LoraModule],
        base_fingerprint: &str,
    ) -> Result<(), DeviceError> {
        let model_err = |source| DeviceError::Model {
            path: dir.to_owned(),
            source,
        };
        match self {
            LoadedModel::Cpu(m) => m.load_adapters(modules, base_fingerprint),
            LoadedModel::Cuda(m) => m.load_adapters(modules, base_fingerprint),
            LoadedModel::CpuGroup { ranks, .. } => {
                ranks[0].load_adapters(modules, base_fingerprint)
            }
            LoadedModel::CudaGroup { ranks } => ranks[0].load_adapters(modules, base_fingerprint),
        }
        .map_err(model_err)
    }

    /// The loaded LoRA adapters' names and fingerprints, in load order (a request's
    /// [`crate::engine::AdapterRef::index`] is its place here).
    pub fn adapters(&self) -> Vec<(String, String)> {
        fn list<B: Backend>(adapters: &[crate::model::lora::Adapter<B>]) -> Vec<(String, String)> {
            adapters
                .iter()
                .map(|a| (a.name.clone(), a.fingerprint.clone()))
                .collect()
        }
        match self {
            LoadedModel::Cpu(m) => list(m.adapters()),
            LoadedModel::Cuda(m) => list(m.adapters()),
            LoadedModel::CpuGroup { ranks, .. } => list(ranks[0].adapters()),
            LoadedModel::CudaGroup { ranks } => list(ranks[0].adapters()),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            LoadedModel::Cpu(m) => m.config(),
            LoadedModel::Cuda(m) => m.config(),
            LoadedModel::CpuGroup { ranks, .. } => ranks[0].config(),
            LoadedModel::CudaGroup { ranks } => ranks[0].config(),
        }
    }

    /// The projections' weights as this model computes with them: `fp8` for an FP8
    /// checkpoint; on a GPU `bf16` for any other; on the CPU the checkpoint's type, or
    /// `gguf-q4_1` (the main type) for GGUF blocks kept quantized.
    pub fn weights_name(&self) -> String {
        let gguf = match self {
            LoadedModel::Cpu(m) => m.gguf_quant(),
            LoadedModel::CpuGroup { ranks, .. } => ranks[0].gguf_quant(),
            _ => None,
        };
        if let Some(quant) = gguf {
            return format!("gguf-{}", quant.name().to_lowercase());
        }
        let (dtype, gpu) = match self {
            LoadedModel::Cpu(m) => (m.weight_dtype(), false),
            LoadedModel::Cuda(m) => (m.weight_dtype(), true),
            LoadedModel::CpuGroup { ranks, .. } => (ranks[0].weight_dtype(), false),
            LoadedModel::CudaGroup { ranks } => (ranks[0].weight_dtype(), true),
        };
        match dtype {
            WeightDType::F8E4M3 => "fp8".to_owned(),
            _ if gpu => "bf16".to_owned(),
            other => other.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            LoadedModel::Cpu(m) => m.backend().describe(),
            LoadedModel::Cuda(m) => m.backend().describe(),
            LoadedModel::CpuGroup { ranks, .. } => format!(
                "{} tensor-parallel ranks of {}",
                ranks.len(),
                ranks[0].backend().describe()
            ),
            LoadedModel::CudaGroup { ranks } => format!(
                "{} tensor-parallel ranks on cuda:{} to cuda:{} ({})",
                ranks.len(),
                ranks[0].backend().context().ordinal(),
                ranks[ranks.len() - 1].backend().context().ordinal(),
                ranks[0].backend().describe()
            ),
        }
    }

    /// The KV cache layout for blocks of `block_size` tokens: a group's is the whole model's,
    /// what a transfer carries (each rank holds its KV heads).
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        let whole = |rank: KvLayout, size: usize| KvLayout {
            num_kv_heads: rank.num_kv_heads * size,
            ..rank
        };
        match self {
            LoadedModel::Cpu(m) => m.kv_layout(block_size),
            LoadedModel::Cuda(m) => m.kv_layout(block_size),
            LoadedModel::CpuGroup { ranks, .. } => {
                whole(ranks[0].kv_layout(block_size), ranks.len())
            }
            LoadedModel::CudaGroup { ranks } => whole(ranks[0].kv_layout(block_size), ranks.len()),
        }
    }

    /// Blocks of `block_size` tokens that `budget` allows: on GPUs, what the fraction of the
    /// free memory holds on the fullest GPU (every rank has a cache of as many blocks).
    pub fn kv_blocks(&self, block_size: usize, budget: KvBudget) -> Result<usize, DeviceError> {
        if let Some(tokens) = budget.tokens {
            return Ok(tokens / block_size);
        }
        match self {
            LoadedModel::Cpu(_) | LoadedModel::CpuGroup { .. } => {
                Ok(budget.cpu_default_tokens / block_size)
            }
            LoadedModel::Cuda(m) => gpu_kv_blocks(m, block_size, &budget),
            LoadedModel::CudaGroup { ranks } => ranks
                .iter()
                .map(|m| gpu_kv_blocks(m, block_size, &budget))
                .try_fold(usize::MAX, |fewest, blocks| Ok(fewest.min(blocks?))),
        }
    }

    /// Runs the largest step the engine will run once, on a GPU, before the KV cache is sized:
    /// `tokens` new tokens over `sequences` sequences (as many as run at once, each asking
    /// for its logits row). The stream-ordered allocator keeps what the step's activations
    /// took (the CUDA backend's pool never returns freed memory), so [`Self::kv_blocks`] then
    /// sizes the cache from what is free beside them, as vLLM's profiling run does; without
    /// it a model that leaves little memory beside its weights (70B over two 80 GB GPUs) got a
    /// cache that left its first full step out of memory. A no-op on the CPU.
    pub fn reserve_activations(
        &self,
        block_size: usize,
        tokens: usize,
        sequences: usize,
    ) -> Result<(), DeviceError> {
        let gpus: Vec<&Model<CudaBackend>> = match self {
            LoadedModel::Cpu(_) | LoadedModel::CpuGroup { .. } => return Ok(()),
            LoadedModel::Cuda(m) => vec![m],
            LoadedModel::CudaGroup { ranks } => ranks.iter().collect(),
        };
        let config = self.config();
        let LargestStep {
            tokens,
            sequences,
            prefill,
            decode,
            num_blocks,
        } = LargestStep::new(
            tokens,
            sequences,
            config.max_context(),
            config.vocab_size,
            block_size,
        );
        let started = std::time::Instant::now();
        // Every rank at once: the step's all-reduces need the whole group.
        on_each_rank(gpus, |m| {
            let err = |source| DeviceError::LargestStep {
                tokens,
                sequences,
                source,
            };
            let mut kv = m.alloc_kv_cache(block_size, num_blocks).map_err(err)?;
            m.forward(&prefill, &mut kv).map_err(err)?;
            m.forward(&decode, &mut kv).map_err(err)?;
            tune_fp8_row_buckets(m, &mut kv, tokens, block_size)
        })?;
        tracing::info!(
            tokens,
            sequences,
            ms = started.elapsed().as_millis() as u64,
            "ran the largest step once: its activation memory stays out of the KV cache"
        );
        Ok(())
    }

    /// Allocates the KV cache, builds the engine and starts its thread. `faults` are a fault
    /// test's ([`ForwardFaults`]; none in production), counted from the first forward pass,
    /// the start-up check's included.
    pub fn spawn_engine(
        self,
        dir: &Path,
        config: EngineConfig,
        decoder: Option<Arc<dyn TextDecoder>>,
        faults: ForwardFaults,
    ) -> Result<StartedEngine, DeviceError> {
        /// Each model with a cache of `config`'s blocks, failing as `faults` say.
        fn runners<B: Backend>(
            models: Vec<Model<B>>,
            dir: &Path,
            config: &EngineConfig,
            faults: ForwardFaults,
        ) -> Result<Vec<ModelRunner<B>>, DeviceError> {
            models
                .into_iter()
                .map(|model| {
                    let mut runner = ModelRunner::new(model, config.block_size, config.num_blocks)?;
                    runner.inject_faults(faults);
                    Ok(runner)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| DeviceError::Model {
                    path: dir.to_owned(),
                    source,
                })
        }
        match self {
            LoadedModel::Cpu(m) => {
                let runner = runners(vec![*m], dir, &config, faults)?.remove(0);
                start(runner, config, decoder, None)
            }
            // A GPU can compute garbage without an error (a library kernel that did not run):
            // checked once before the worker serves from it.
            LoadedModel::Cuda(m) => {
                let device = m.backend().describe();
                let runner = runners(vec![*m], dir, &config, faults)?.remove(0);
                start(runner, config, decoder, Some(&device))
            }
            LoadedModel::CpuGroup { ranks, group } => {
                let runners = runners(ranks, dir, &config, faults)?;
                let abort = Box::new(move |why: &str| group.abort(why));
                let group =
                    TensorParallelRunner::spawn(runners, abort).map_err(DeviceError::Thread)?;
                start(group, config, decoder, None)
            }
            LoadedModel::CudaGroup { ranks } => {
                let device = format!("{} GPUs", ranks.len());
                let runners = runners(ranks, dir, &config, faults)?;
                // NCCL's communicators cannot be aborted from here while a rank may be using
                // its own: a rank left waiting in an all-reduce is ended by the process's exit
                // once the group reports itself broken.
                let abort = Box::new(|why: &str| {
                    tracing::warn!(reason = why, "tensor-parallel GPU group aborted")
                });
                let group =
                    TensorParallelRunner::spawn(runners, abort).map_err(DeviceError::Thread)?;
                start(group, config, decoder, Some(&device))
            }
        }
    }
}

/// Prefills of one power of two of tokens each, from [`FIRST_TUNED_ROWS`] to below `largest`
/// (whose step ran already), on a model of FP8 projections whose products choose their
/// configuration by timing: each product shape is timed at its first eager product (a few
/// milliseconds to a second each), and without this the first steps of each new size in
/// service would pay it, at every size a server meets for the first time. The products'
/// shapes depend only on the rows, so prefills cover decode batches of the same rows too.
fn tune_fp8_row_buckets(
    m: &Model<CudaBackend>,
    kv: &mut <CudaBackend as Backend>::KvCache,
    largest: usize,
    block_size: usize,
) -> Result<(), DeviceError> {
    if m.weight_dtype() != WeightDType::F8E4M3 || !m.backend().tunes_fp8_products() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let config = m.config();
    let buckets = tuned_row_buckets(largest);
    for &rows in &buckets {
        let step = LargestStep::new(rows, 1, config.max_context(), config.vocab_size, block_size);
        m.forward(&step.prefill, kv)
            .map_err(|source| DeviceError::Fp8Tuning {
                tokens: rows,
                source,
            })?;
    }
    if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
        tracing::info!(
            first,
            last,
            ms = started.elapsed().as_millis() as u64,
            "chose the FP8 products' configurations by timing for steps of {first} to {last} \
             tokens"
        );
    }
    Ok(())
}

/// The fewest rows [`tune_fp8_row_buckets`] prefills: the FP8 products' smallest row bucket.
const FIRST_TUNED_ROWS: usize = 16;

/// The row counts prefilled to tune the FP8 products beside a largest step of `largest`
/// tokens: each power of two from [`FIRST_TUNED_ROWS`] below it.
fn tuned_row_buckets(largest: usize) -> Vec<usize> {
    std::iter::successors(Some(FIRST_TUNED_ROWS), |b| Some(b * 2))
        .take_while(|&b| b < largest)
        .collect()
}

/// The step [`LoadedModel::reserve_activations`] runs: a prefill of `tokens` new tokens over
/// `sequences` sequences, each asking for its logits, then one more token of each as a decode
/// step (the all-reduces of a tensor-parallel group at that size, whose buffers NCCL sets up
/// at their first use); every sequence on blocks of its own, `num_blocks` in all.
#[derive(Debug)]
struct LargestStep {
    tokens: usize,
    sequences: usize,
    prefill: crate::model::ForwardBatch,
    decode: crate::model::ForwardBatch,
    num_blocks: usize,
}

impl LargestStep {
    fn new(
        tokens: usize,
        sequences: usize,
        max_position_embeddings: usize,
        vocab: usize,
        block_size: usize,
    ) -> Self {
        let tokens = tokens.max(1);
        // No sequence longer than the model's context (the engine admits none): a budget past
        // it is spread over more sequences. The decode token comes after each one's share.
        let longest = max_position_embeddings.saturating_sub(1).max(1);
        let sequences = sequences.max(tokens.div_ceil(longest)).clamp(1, tokens);
        let mut prefill = crate::model::ForwardBatch::default();
        let mut decode = crate::model::ForwardBatch::default();
        let mut next_block = 0u32;
        for s in 0..sequences {
            let len = tokens / sequences + usize::from(s < tokens % sequences);
            let ids: Vec<u32> = (0..len)
                .map(|i| ((s * 7919 + i * 31 + 13) % vocab) as u32)
                .collect();
            let table: Vec<u32> =
                (next_block..next_block + (len + 1).div_ceil(block_size) as u32).collect();
            next_block += table.len() as u32;
            prefill.push(&ids, 0, table.clone(), true);
            decode.push(&[(s % vocab) as u32], len, table, true);
        }
        LargestStep {
            tokens,
            sequences,
            prefill,
            decode,
            num_blocks: next_block as usize + 1,
        }
    }
}

/// Device memory the KV cache always leaves free (see [`gpu_kv_blocks`]).
const GPU_HEADROOM: usize = 512 << 20;

/// Blocks of `block_bytes` in `fraction` of `free` bytes, but never in more than all of it
/// but [`GPU_HEADROOM`]: what the reservation step cannot show (CUDA graphs' own memory,
/// cuBLAS workspaces of new shapes) still needs room where the model leaves little beside
/// it. Less the scratch block the CUDA backend allocates with the cache.
fn cache_blocks(free: usize, fraction: f64, block_bytes: usize) -> usize {
    let bytes = ((free as f64 * fraction) as usize).min(free.saturating_sub(GPU_HEADROOM));
    (bytes / block_bytes).saturating_sub(1)
}

/// Blocks of the cache that `budget`'s fraction of `m`'s free GPU memory holds.
fn gpu_kv_blocks(
    m: &Model<CudaBackend>,
    block_size: usize,
    budget: &KvBudget,
) -> Result<usize, DeviceError> {
    let (free, _total) = m
        .backend()
        .memory_info()
        .map_err(|source| DeviceError::Backend {
            device: Device::Cuda(m.backend().context().ordinal()),
            source,
        })?;
    let block_bytes = m.kv_layout(block_size).block_bytes();
    let blocks = cache_blocks(free, budget.gpu_memory_fraction, block_bytes);
    if blocks == 0 {
        return Err(DeviceError::NoKvMemory {
            free_mib: free >> 20,
            fraction: budget.gpu_memory_fraction,
            block_mib: block_bytes as f64 / (1 << 20) as f64,
        });
    }
    Ok(blocks)
}

/// Starts the engine thread over `runner`, after the start-up check of `self_check`'s device
/// where one is named ([`check_prefill`]).
fn start(
    mut runner: impl StepModel + 'static,
    config: EngineConfig,
    decoder: Option<Arc<dyn TextDecoder>>,
    self_check: Option<&str>,
) -> Result<StartedEngine, DeviceError> {
    if let Some(device) = self_check {
        check_prefill(&mut runner, &config, device)?;
    }
    let engine = Engine::new(runner, config, decoder)?;
    let layout = engine.kv_layout();
    let total_blocks = engine.total_blocks();
    let kv_memory = engine.kv_cache_parts();
    let (handle, thread) = EngineHandle::spawn(engine, "engine").map_err(DeviceError::Thread)?;
    Ok(StartedEngine {
        handle,
        thread,
        layout,
        total_blocks,
        kv_memory,
    })
}

/// Tokens of the start-up check's first prompt: enough rows for the prefill's matrix kernels
/// (the library's, past the decode kernels' sizes), within the step's token budget. The
/// second fills the whole budget, where the library picks other kernels.
const CHECK_TOKENS: usize = 512;

/// Prefills of a fixed prompt (written into the empty cache, which later steps overwrite),
/// of [`CHECK_TOKENS`] and of the whole step budget, whose logits must be finite: a device
/// that computes NaN (as cuBLAS's cluster kernels did under an MPS share of the SMs:
/// docs/benchmarks.md, "One H100: online, aggregated and disaggregated under MPS") fails
/// here, at start, rather than on every request it is sent.
fn check_prefill(
    runner: &mut impl StepModel,
    config: &EngineConfig,
    device: &str,
) -> Result<(), DeviceError> {
    let capacity = config.num_blocks.saturating_sub(1) * config.block_size;
    let largest = config
        .max_num_batched_tokens
        .min(runner.max_model_len().saturating_sub(1))
        .min(capacity);
    check_prefill_of(runner, config, device, CHECK_TOKENS.min(largest))?;
    if largest > CHECK_TOKENS {
        check_prefill_of(runner, config, device, largest)?;
    }
    Ok(())
}

/// One prefill of `n` tokens whose logits must be finite.
fn check_prefill_of(
    runner: &mut impl StepModel,
    config: &EngineConfig,
    device: &str,
    n: usize,
) -> Result<(), DeviceError> {
    let vocab = runner.vocab_size();
    if n == 0 {
        return Ok(());
    }
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let mut batch = crate::model::ForwardBatch::default();
    batch.push(
        &tokens,
        0,
        (0..n.div_ceil(config.block_size) as u32).collect(),
        true,
    );
    let fail = |detail: String| DeviceError::SelfCheck {
        device: device.to_owned(),
        detail,
    };
    let rows = runner
        .forward(&batch)
        .map_err(|e| fail(format!("a {n}-token prefill failed: {e}")))?;
    let bad = rows.iter().flatten().filter(|l| !l.is_finite()).count();
    if bad > 0 {
        return Err(fail(format!(
            "a {n}-token prefill gave {bad} NaN or infinite logits of {vocab}"
        )));
    }
    tracing::debug!(
        tokens = n,
        "start-up check: the prefill's logits are finite"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_tuning_prefills_every_row_bucket_below_the_largest_step() {
        assert_eq!(
            tuned_row_buckets(8192),
            [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        );
        // The largest step's own bucket (8,192 for 5,000 tokens) ran already.
        assert_eq!(tuned_row_buckets(5000).last(), Some(&4096));
        assert_eq!(tuned_row_buckets(17), [16]);
        assert!(tuned_row_buckets(16).is_empty());
        assert!(tuned_row_buckets(1).is_empty());
    }

    #[test]
    fn the_largest_step_spreads_its_tokens_within_the_context_on_blocks_of_their_own() {
        let step = LargestStep::new(2048, 32, 131_072, 1000, 64);
        assert_eq!((step.tokens, step.sequences), (2048, 32));
        assert_eq!(step.prefill.tokens.len(), 2048);
        assert_eq!(step.prefill.sequences.len(), 32);
        assert_eq!(step.decode.tokens.len(), 32);
        // A budget longer than the model's context is spread over more sequences.
        let step = LargestStep::new(8192, 1, 2048, 1000, 16);
        assert_eq!(step.sequences, 5);
        let lens: Vec<usize> = step
            .prefill
            .sequences
            .iter()
            .map(|s| s.token_count)
            .collect();
        assert!(lens.iter().all(|&l| l < 2048), "{lens:?}");
        assert_eq!(lens.iter().sum::<usize>(), 8192);
        // Each sequence's blocks hold its prompt and the decode token, and no block is shared.
        let mut blocks: Vec<u32> = Vec::new();
        for (p, d) in step.prefill.sequences.iter().zip(&step.decode.sequences) {
            assert_eq!(d.cached_len, p.token_count);
            assert_eq!(p.block_table, d.block_table);
            assert!(p.block_table.len() * 16 > p.token_count);
            blocks.extend(&p.block_table);
        }
        let n = blocks.len();
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), n);
        assert!(blocks.iter().all(|&b| (b as usize) < step.num_blocks));
        // More sequences than tokens: one token each.
        assert_eq!(LargestStep::new(4, 128, 2048, 1000, 16).sequences, 4);
    }

    #[test]
    fn the_kv_cache_takes_its_fraction_but_leaves_the_headroom() {
        const MIB: usize = 1 << 20;
        // Plenty free: the fraction decides (90% of 60 GiB in 2 MiB blocks, less the scratch).
        assert_eq!(cache_blocks(60 << 30, 0.9, 2 * MIB), 27648 - 1);
        // Little free (a 70B rank on an 80 GB GPU leaves ~2 GiB): the headroom decides.
        assert_eq!(cache_blocks(2 << 30, 0.9, 2 * MIB), (2048 - 512) / 2 - 1);
        // Less than the headroom: no block, which the caller reports as out of memory.
        assert_eq!(cache_blocks(256 * MIB, 0.9, 2 * MIB), 0);
    }

    /// A model whose logits are NaN from prefills of `nan_from` tokens on (a device broken
    /// for some shapes), and which records the sizes it prefilled.
    struct Logits {
        nan_from: usize,
        sizes: Vec<usize>,
    }

    impl Logits {
        fn nan_from(nan_from: usize) -> Self {
            Logits {
                nan_from,
                sizes: Vec::new(),
            }
        }
    }

    impl StepModel for Logits {
        fn vocab_size(&self) -> usize {
            8
        }
        fn max_model_len(&self) -> usize {
            4096
        }
        fn eos_token_ids(&self) -> Vec<u32> {
            Vec::new()
        }
        fn forward(
            &mut self,
            batch: &crate::model::ForwardBatch,
        ) -> Result<Vec<Vec<f32>>, ModelError> {
            let n = batch.tokens.len();
            self.sizes.push(n);
            let value = if n >= self.nan_from { f32::NAN } else { 0.5 };
            Ok(vec![vec![value; 8]; batch.logits_rows()])
        }
        fn kv_layout(&self) -> KvLayout {
            unreachable!("the check moves no KV")
        }
        fn read_kv_blocks(
            &self,
            _: &[crate::kv_cache::block_pool::BlockId],
            _: crate::backend::KvBytesMut<'_>,
        ) -> Result<(), ModelError> {
            unreachable!("the check moves no KV")
        }
        fn write_kv_blocks(
            &mut self,
            _: &[crate::kv_cache::block_pool::BlockId],
            _: crate::backend::KvBytes<'_>,
        ) -> Result<(), ModelError> {
            unreachable!("the check moves no KV")
        }
    }

    #[test]
    fn the_start_up_check_refuses_a_device_that_computes_nan() {
        let config = EngineConfig {
            block_size: 16,
            num_blocks: 64,
            max_num_batched_tokens: 2048,
            ..EngineConfig::default()
        };
        // 512 tokens, then the whole budget as far as the cache holds it (63 blocks).
        let mut fine = Logits::nan_from(usize::MAX);
        check_prefill(&mut fine, &config, "cuda:0").unwrap();
        assert_eq!(fine.sizes, [512, 1008]);
        let err = check_prefill(&mut Logits::nan_from(0), &config, "cuda:0 (test)")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cuda:0 (test) backend failed its start-up check")
                && err.contains("512-token prefill gave 8 NaN or infinite logits of 8")
                && err.contains("does not serve from it"),
            "{err}"
        );
        // Broken only for the larger product: the second prefill finds it.
        let err = check_prefill(&mut Logits::nan_from(600), &config, "cuda:0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("1008-token prefill gave 8 NaN"), "{err}");
        // A budget under 512 tokens: one prefill of the budget.
        let mut small = Logits::nan_from(usize::MAX);
        let budget = EngineConfig {
            max_num_batched_tokens: 300,
            ..config
        };
        check_prefill(&mut small, &budget, "cuda:0").unwrap();
        assert_eq!(small.sizes, [300]);
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{err}");
        }
    }

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        if crate::backend::cuda::driver_present() {
            // A GPU machine: covered by the GPU tests instead.
            tandem_test_skip::skip("a CUDA driver is present");
            return;
        }
        let err = load_model(
            Path::new("/nonexistent"),
            Device::Cuda(0),
            &CpuOptions::default(),
            &GpuArgs::default(),
            1,
            KvCacheDtype::Auto,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("libcuda.so cannot be loaded"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
    }

    #[test]
    fn tensor_parallel_gpus_name_the_ranks_devices_when_one_fails() {
        // cuda:90 and cuda:91: no machine has them, GPU or not.
        let err = load_model(
            Path::new("/nonexistent"),
            Device::Cuda(90),
            &CpuOptions::default(),
            &GpuArgs::default(),
            2,
            KvCacheDtype::Auto,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with(
                "--tensor-parallel 2: its ranks run on cuda:90 to cuda:91, one GPU each"
            ),
            "{err}"
        );
    }

    #[test]
    fn gpu_flags_win_over_the_environment() {
        let flags = GpuArgs {
            cuda_graphs: Some(false),
            device_sampling: Some(false),
            attn_split_keys: Some(7),
            l2_prefetch_mb: Some(3),
        };
        let options = cuda_options(1, &flags);
        assert_eq!(
            (
                options.ordinal,
                options.cuda_graphs,
                options.device_sampling,
                options.attn_split_keys,
                options.l2_prefetch_mb
            ),
            (1, false, false, Some(7), Some(3))
        );
        // The settings without a flag come from the environment, as without flags at all.
        assert_eq!(
            options.kernel_defines,
            CudaOptions::from_env(1).kernel_defines
        );
        assert_eq!(
            cuda_options(1, &GpuArgs::default()),
            CudaOptions::from_env(1)
        );
    }

    #[test]
    fn quant_kernels_are_taken_by_name_and_a_set_this_cpu_lacks_is_refused_naming_its_own() {
        let with = |name: Option<&str>| {
            cpu_options(&WorkerArgs {
                quant_kernels: name.map(str::to_string),
                ..WorkerArgs::default()
            })
        };
        assert_eq!(with(None).unwrap().quant_isa, None);
        assert_eq!(
            with(Some("portable")).unwrap().quant_isa,
            Some(tandem_cpu_quant::Isa::Portable)
        );
        let err = with(Some("sse9")).unwrap_err().to_string();
        assert!(
            err.starts_with("--quant-kernels sse9: this CPU runs portable"),
            "{err}"
        );
    }
}
