//! `worker` serving on the bus: `worker --role ROLE --model DIR --nats URL ...`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;
use clap::builder::{PossibleValue, PossibleValuesParser, RangedU64ValueParser, TypedValueParser};
use tandem_protocol::config::KvCacheDtype;
use tandem_protocol::messages::WorkerRole;

use super::Argv;

/// The environment variable holding the deployment's KV secret itself (`tandem serve` hands
/// its workers a fresh one this way; `--kv-secret-file` names a file instead).
pub const KV_SECRET_VAR: &str = "TANDEM_KV_SECRET";

const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_DEVICE: &str = "cpu";
const DEFAULT_THREADS: usize = 0;
const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.9;
/// `--quant-activation-bits` when not given.
pub const DEFAULT_QUANT_ACTIVATION_BITS: u8 = 16;
/// Tokens per KV block on the CPU ([`WorkerArgs::block_size_on`]).
pub const DEFAULT_CPU_BLOCK_SIZE: usize = 16;
/// Tokens per KV block on a GPU: prefill attention's TMA copies are one block each
/// (docs/benchmarks.md).
pub const DEFAULT_GPU_BLOCK_SIZE: usize = 64;
const DEFAULT_MAX_NUM_SEQS: usize = 64;
const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 512;
/// Tokens of growth kept free per admitted sequence (`--growth-reserve-tokens`); the
/// scheduler's `DEFAULT_GROWTH_RESERVE_TOKENS`, which a workers test holds equal to this.
pub const DEFAULT_GROWTH_RESERVE_TOKENS: usize = 256;
const DEFAULT_HEARTBEAT_MS: u64 = 1000;
const DEFAULT_MAX_TOKENS_IN_BUFFER: usize = 65536;
const DEFAULT_KV_TRANSFER_TIMEOUT_MS: u64 = 30_000;
/// Without --max-queued-requests, a worker queues this many times --max-num-seqs jobs: a
/// burst of a few batches' worth waits, a flood is refused (and sent elsewhere or answered
/// 429) instead of waiting for minutes.
pub const DEFAULT_QUEUED_PER_SEQ: usize = 4;

/// Options of a worker serving on the bus. [`Default`] is what the binary parses from no flags
/// and no environment variables.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct WorkerArgs {
    /// What this worker does: `both` prefills and decodes its own requests.
    #[arg(long, value_name = "ROLE", value_parser = role_parser())]
    pub role: Option<WorkerRole>,
    /// Model directory (made by `model-prep`).
    #[arg(long, env = "TANDEM_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// NATS server to join.
    #[arg(long, env = "TANDEM_NATS", default_value = DEFAULT_NATS, value_name = "URL")]
    pub nats: String,
    /// Device to run on: `cpu`, or `cuda:N` (the N-th NVIDIA GPU; needs the NVIDIA driver,
    /// libnvrtc and libcublas, loaded at start).
    #[arg(long, default_value = DEFAULT_DEVICE, value_name = "DEVICE")]
    pub device: String,
    /// Name the model is served under; must equal the api-server's (default for both: the
    /// model directory's name).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME", value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// LoRA adapters to serve beside the model, each `NAME=DIR` (a PEFT directory:
    /// adapter_config.json and adapter_model.safetensors); a request asks for one by giving
    /// NAME as its `model`, and computes with the model's weights plus the adapter's on the
    /// projections it targets, in the same batches as every other request. CPU workers, and
    /// GPU workers of 16-bit models (not FP8). Every worker of a served name that may take such a request (its context and
    /// decode workers) must load the same adapters.
    #[arg(long, value_name = "NAME=DIR", num_args = 1.., value_parser = parse_lora_module)]
    pub lora_modules: Vec<tandem_protocol::config::LoraModule>,
    /// This worker's id on the bus (default: role, host name and process id).
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// CPU threads for the model; 0 uses every core.
    #[arg(long, default_value_t = DEFAULT_THREADS, value_name = "N")]
    pub threads: usize,
    /// Lower the worker's CPU scheduling priority by N (Linux `nice`, 0 to 19) for all its
    /// threads. `tandem serve` gives CPU decode workers 2 where CPU context workers share
    /// their cores: a decode step of a few sequences then yields the cores to a prefill rather
    /// than taking them for little work while prompts queue.
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub nice: u8,
    /// CPU workers, models with GGUF blocks kept quantized: the bits each activation keeps in
    /// the integer products. 16 (two 8-bit codes, a value's and its rounding residual's)
    /// computes what the dequantized weights in f32 do; 8 (one code, as llama.cpp rounds)
    /// prefills about 1.9x faster and decodes a few percent faster, but moves the logits
    /// enough to flip a small model's near ties.
    #[arg(long, default_value_t = DEFAULT_QUANT_ACTIVATION_BITS, value_name = "BITS",
          value_parser = quant_activation_bits_parser())]
    pub quant_activation_bits: u8,
    /// CPU workers, models with GGUF blocks kept quantized: the instruction set of the integer
    /// products, by name (portable, avx2, avx2-vnni, avx512-vnni, avx512-amx; neon,
    /// neon-dotprod on Arm); default the best this CPU runs (avx512-amx: AVX-512 VNNI with AMX
    /// tiles for prompts and batches of 16 rows or more, where the CPU and kernel have them).
    /// Every set computes the same bits; a set this CPU lacks is refused at start, naming the
    /// ones it has.
    #[arg(long, env = "TANDEM_QUANT_KERNELS", value_name = "SET")]
    pub quant_kernels: Option<String>,
    /// Split the model over N tensor-parallel ranks (its heads and MLP channels, summed after
    /// each layer's attention and MLP). On the CPU the ranks are threads sharing --threads; on
    /// --device cuda:K they take cuda:K to cuda:K+N-1, one GPU each, and sum over NCCL
    /// (libnccl.so must be on the library path). The heads, KV heads and MLP width must
    /// divide by N. KV hand-overs carry the whole model's layout through host memory, so
    /// workers of different N hand prompts to each other.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = parse_ranks)]
    pub tensor_parallel: usize,
    /// KV cache capacity in tokens, over all sequences. Default: 16384 on the CPU; on a GPU,
    /// what --gpu-memory-fraction of the memory left after loading the model holds.
    #[arg(long, value_name = "N")]
    pub kv_cache_tokens: Option<usize>,
    /// GPU only, without --kv-cache-tokens: the fraction of the device memory free after
    /// loading the model and running the largest step once (--max-num-batched-tokens over
    /// --max-num-seqs sequences, whose activations keep their memory) that the KV cache
    /// takes, in (0, 1]; it always leaves 512 MiB free besides.
    #[arg(long, default_value_t = DEFAULT_GPU_MEMORY_FRACTION, value_name = "F")]
    pub gpu_memory_fraction: f64,
    /// Tokens per KV block. Default: 64 on a GPU (prefill attention copies K/V one block at a
    /// time, and larger blocks make it 1.3x faster on an H100), 16 on the CPU. A context and a
    /// decode worker handing K/V over need the same (`tandem serve` gives every worker of a
    /// deployment one).
    #[arg(long, value_name = "N")]
    pub block_size: Option<usize>,
    /// Element type of the KV cache: `auto` is the model's (bf16 on a GPU); `fp8` stores K/V
    /// as FP8 e4m3 (a scale of 1), half the bytes of bf16 a token: twice the tokens in the same
    /// memory and half the bytes read per decode step and moved per hand-over, at some
    /// accuracy (docs/benchmarks.md). GPUs need compute capability 8.9 (Ada, Hopper) for it.
    /// A context and a decode worker handing K/V over need the same.
    #[arg(long, default_value_t = KvCacheDtype::Auto, value_name = "TYPE",
          value_parser = kv_cache_dtype_parser())]
    pub kv_cache_dtype: KvCacheDtype,
    /// Sequences in one batch at most.
    #[arg(long, default_value_t = DEFAULT_MAX_NUM_SEQS, value_name = "N")]
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = DEFAULT_MAX_NUM_BATCHED_TOKENS, value_name = "N")]
    pub max_num_batched_tokens: usize,
    /// A waiting request is admitted only while the free KV blocks also cover its whole
    /// prompt and next N tokens, and the same for every running request (each capped at its
    /// prompt plus max_tokens), so that an admitted request is not preempted (its prefill
    /// recomputed) before it has grown that far. 0: admit as soon as the first prompt chunk
    /// fits (more requests at once, more preemptions).
    #[arg(long, default_value_t = DEFAULT_GROWTH_RESERVE_TOKENS, value_name = "N")]
    pub growth_reserve_tokens: usize,
    /// Prefix caching: full KV blocks a request computed stay in the cache after it ends
    /// (evicted least recently used when room is needed), and a later request whose prompt
    /// starts with the same tokens (and the same cache_salt) takes them instead of computing
    /// them again. false: every prompt is computed in full.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub prefix_caching: bool,
    /// Interval between heartbeats; keep it well under the api-server's --worker-timeout-ms.
    #[arg(long, default_value_t = DEFAULT_HEARTBEAT_MS, value_name = "MS")]
    pub heartbeat_ms: u64,
    /// Context role: prompt tokens whose K/V may wait for decode workers at once, pinned in
    /// the KV cache (decode workers read it from there) or copied out for them; prefill jobs
    /// beyond it wait for releases (TensorRT-LLM's cache_transceiver max_tokens_in_buffer).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS_IN_BUFFER, value_name = "N")]
    pub max_tokens_in_buffer: usize,
    /// Context role: K/V not released by a decode worker within this time is freed.
    #[arg(long, default_value_t = DEFAULT_KV_TRANSFER_TIMEOUT_MS, value_name = "MS")]
    pub kv_transfer_timeout_ms: u64,
    /// Jobs this worker holds accepted but not started at most, besides those its free
    /// sequence slots start at once (waiting in the engine, decode jobs waiting for room in
    /// the KV cache, prefills waiting for --max-tokens-in-buffer); a job past it is refused,
    /// and the api-server sends it to another worker or answers 429. Default: 4 x
    /// --max-num-seqs. 0: no bound.
    #[arg(long, env = "TANDEM_MAX_QUEUED_REQUESTS", value_name = "N")]
    pub max_queued_requests: Option<usize>,
    /// Context and decode roles: MiB of host memory mapped once for KV transfers (registered
    /// with UCX and, on a GPU, pinned for the copy engine): pull destinations on a decode
    /// worker, and on a GPU context worker the exports it copies out for UCX readers (another
    /// host, a CPU decode worker; a CPU context worker's exports are read straight out of its
    /// KV cache). A transfer that finds no room uses memory of its own. Default: what
    /// --max-tokens-in-buffer tokens take (on a GPU context worker, 256 KiB more for the
    /// exports' seals), at most 1024 MiB; none on a CPU context worker. 0: no pool.
    #[arg(long, value_name = "MIB")]
    pub kv_transfer_pool_mb: Option<usize>,
    /// GPU context and decode workers: 0 turns off CUDA IPC transfers with GPU workers of the
    /// same host, which move K/V device to device instead of through host memory and UCX (on
    /// by default, tensor-parallel workers included). A context worker shares its KV cache
    /// (decode workers read a prompt's blocks straight out of it, every rank's part); a decode
    /// worker copies them straight into the blocks it reserved for the request. Neither needs
    /// a pool: any other value is accepted for older configurations and unused.
    #[arg(long, value_name = "MIB")]
    pub cuda_ipc_pool_mb: Option<usize>,
    /// A file holding the deployment's KV secret (else TANDEM_KV_SECRET, if set): at least 32
    /// bytes, the same on every context and decode worker (`tandem serve` makes one per
    /// deployment). Context workers sign each KV handle with it for its request; decode
    /// workers read a handle only if it verifies for the job that carries it, and only once.
    /// Without a secret, handles go out unsigned and are read as they come (said at start).
    #[arg(long, env = "TANDEM_KV_SECRET_FILE", value_name = "FILE")]
    pub kv_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub speculation: SpeculationArgs,
    #[command(flatten)]
    pub nats_auth: super::NatsAuthArgs,
}

/// Speculative decoding from every request's own tokens (n-gram prompt lookup, as vLLM's
/// `ngram` method and TensorRT-LLM's `NGram` decoding): a decode also verifies the tokens that
/// followed the last place its latest tokens occurred in its prompt or output, keeping them up
/// to the first the sampler does not pick. The answers stay the same; copies, quotes and edits
/// of the prompt come faster, free text pays for the rows it verifies in vain. A request's
/// own `prediction` drafts from that instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
#[command(next_help_heading = "Speculative decoding")]
pub struct SpeculationArgs {
    /// Draft tokens a decode verifies at most (vLLM's num_speculative_tokens); 0 turns n-gram
    /// speculation off.
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u16).range(0..=64).map(usize::from))]
    pub ngram_draft_tokens: usize,
    /// The longest run of a sequence's last tokens looked up (vLLM's prompt_lookup_max).
    #[arg(long, default_value_t = DEFAULT_NGRAM_MAX_MATCH, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub ngram_max_match: usize,
    /// The shortest run that still drafts (vLLM's prompt_lookup_min); at most
    /// --ngram-max-match.
    #[arg(long, default_value_t = DEFAULT_NGRAM_MIN_MATCH, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub ngram_min_match: usize,
}

/// `--ngram-max-match` when not given.
pub const DEFAULT_NGRAM_MAX_MATCH: usize = 4;
/// `--ngram-min-match` when not given.
pub const DEFAULT_NGRAM_MIN_MATCH: usize = 2;

impl Default for SpeculationArgs {
    fn default() -> Self {
        SpeculationArgs {
            ngram_draft_tokens: 0,
            ngram_max_match: DEFAULT_NGRAM_MAX_MATCH,
            ngram_min_match: DEFAULT_NGRAM_MIN_MATCH,
        }
    }
}

impl SpeculationArgs {
    /// The flags when n-gram speculation is on; none when off (the lookup lengths then mean
    /// nothing).
    fn push_args(&self, argv: &mut Argv) {
        let SpeculationArgs {
            ngram_draft_tokens,
            ngram_max_match,
            ngram_min_match,
        } = *self;
        if ngram_draft_tokens == 0 {
            return;
        }
        argv.push_display("--ngram-draft-tokens", ngram_draft_tokens);
        argv.push_display("--ngram-max-match", ngram_max_match);
        argv.push_display("--ngram-min-match", ngram_min_match);
    }
}

/// GPU settings of a worker on a `cuda:N` device (the CPU backend ignores them). A flag left
/// out takes its environment variable, else the default; docs/configuration.md lists both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Args)]
#[command(next_help_heading = "GPU")]
pub struct GpuArgs {
    /// Replay decode steps as CUDA graphs (default: true, unless TANDEM_CUDA_GRAPHS=0).
    #[arg(long, value_name = "BOOL")]
    pub cuda_graphs: Option<bool>,
    /// Sample from per-row summaries computed on the device; false copies every logits row to
    /// the host, to compare the two paths (default: true, unless TANDEM_DEVICE_SAMPLING=0).
    #[arg(long, value_name = "BOOL")]
    pub device_sampling: Option<bool>,
    /// Fewest keys per split of a decode attention split over the context, for tuning
    /// (default: TANDEM_ATTN_SPLIT_KEYS, else 16 KiB of one KV head's K/V).
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub attn_split_keys: Option<usize>,
    /// MiB of the next projection's weight read into L2 ahead of it; 0: none (default:
    /// TANDEM_L2_PREFETCH_MB, else a sixth of the device's L2).
    #[arg(long, value_name = "MIB")]
    pub l2_prefetch_mb: Option<usize>,
}

/// Switches of the engine's step loop (`worker --role ...` and `worker generate`). A flag left
/// out takes its environment variable, else the default; docs/configuration.md lists both. The
/// first two compare two paths of a GPU worker that give the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Args)]
#[command(next_help_heading = "Engine")]
pub struct EngineArgs {
    /// With device sampling, queue the next step's forward pass before reading this step's
    /// tokens when the device picks every one of them, so the host's work runs while the
    /// device computes; false reads each step before scheduling the next, to compare
    /// (default: true, unless TANDEM_OVERLAP=0).
    #[arg(long, value_name = "BOOL")]
    pub overlap: Option<bool>,
    /// With device sampling, apply a constrained request's grammar mask to its logits row on
    /// the device and sample it from a summary; false copies constrained rows to the host
    /// sampler, to compare (default: true, unless TANDEM_DEVICE_MASKS=0).
    #[arg(long, value_name = "BOOL")]
    pub device_masks: Option<bool>,
    /// Seconds between the engine's summary lines (steps, tokens per second, where a step's
    /// time goes) while it has work; 0 turns them off (default: TANDEM_ENGINE_LOG_SECS, else
    /// 10).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub engine_log_secs: Option<f64>,
}

/// A number of seconds: finite and not negative.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(secs),
        _ => Err(format!("`{text}` is not a number of seconds (0 or more)")),
    }
}

/// A tensor-parallel group's size: a whole number, at least 1.
fn parse_lora_module(s: &str) -> Result<tandem_protocol::config::LoraModule, String> {
    s.parse()
}

pub fn parse_ranks(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{text}` is not a number of ranks (1 or more)")),
    }
}

impl Default for WorkerArgs {
    fn default() -> Self {
        WorkerArgs {
            role: None,
            model: None,
            nats: DEFAULT_NATS.into(),
            device: DEFAULT_DEVICE.into(),
            served_model_name: None,
            lora_modules: Vec::new(),
            worker_id: None,
            threads: DEFAULT_THREADS,
            nice: 0,
            quant_activation_bits: DEFAULT_QUANT_ACTIVATION_BITS,
            quant_kernels: None,
            tensor_parallel: 1,
            kv_cache_tokens: None,
            gpu_memory_fraction: DEFAULT_GPU_MEMORY_FRACTION,
            block_size: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            growth_reserve_tokens: DEFAULT_GROWTH_RESERVE_TOKENS,
            prefix_caching: true,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            max_tokens_in_buffer: DEFAULT_MAX_TOKENS_IN_BUFFER,
            kv_transfer_timeout_ms: DEFAULT_KV_TRANSFER_TIMEOUT_MS,
            max_queued_requests: None,
            kv_transfer_pool_mb: None,
            cuda_ipc_pool_mb: None,
            kv_secret_file: None,
            gpu: GpuArgs::default(),
            engine: EngineArgs::default(),
            speculation: SpeculationArgs::default(),
            nats_auth: super::NatsAuthArgs::default(),
        }
    }
}

impl WorkerArgs {
    /// Tokens per KV block: `--block-size`, else the default for a GPU or the CPU.
    pub fn block_size_on(&self, gpu: bool) -> usize {
        self.block_size.unwrap_or(if gpu {
            DEFAULT_GPU_BLOCK_SIZE
        } else {
            DEFAULT_CPU_BLOCK_SIZE
        })
    }

    /// The bound on the worker's queue: `--max-queued-requests`, else
    /// `DEFAULT_QUEUED_PER_SEQ` x `--max-num-seqs`; `None` (no bound) for 0.
    pub fn queue_bound(&self) -> Option<usize> {
        match self.max_queued_requests {
            Some(0) => None,
            Some(max) => Some(max),
            None => Some(DEFAULT_QUEUED_PER_SEQ * self.max_num_seqs),
        }
    }

    /// The arguments that make `worker` parse back to `self`: every flag, but those of unset
    /// options. The environment variables of the flags that have one (`TANDEM_MODEL`,
    /// `TANDEM_NATS`, `TANDEM_SERVED_MODEL_NAME`) then have no say, but the GPU settings'
    /// (read by the worker, not by clap) still apply to those left unset.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut argv = Argv::default();
        argv.push_some("--role", self.role);
        if let Some(model) = &self.model {
            argv.push("--model", model);
        }
        argv.push("--nats", &self.nats);
        argv.push("--device", &self.device);
        argv.push_some("--served-model-name", self.served_model_name.as_ref());
        for module in &self.lora_modules {
            argv.push("--lora-modules", module.to_arg());
        }
        argv.push_some("--worker-id", self.worker_id.as_ref());
        argv.push_display("--threads", self.threads);
        argv.push_display("--nice", self.nice);
        argv.push_display("--quant-activation-bits", self.quant_activation_bits);
        argv.push_some("--quant-kernels", self.quant_kernels.as_ref());
        argv.push_display("--tensor-parallel", self.tensor_parallel);
        argv.push_some("--kv-cache-tokens", self.kv_cache_tokens);
        argv.push_display("--gpu-memory-fraction", self.gpu_memory_fraction);
        argv.push_some("--block-size", self.block_size);
        argv.push_display("--kv-cache-dtype", self.kv_cache_dtype);
        argv.push_display("--max-num-seqs", self.max_num_seqs);
        argv.push_display("--max-num-batched-tokens", self.max_num_batched_tokens);
        argv.push_display("--growth-reserve-tokens", self.growth_reserve_tokens);
        argv.push_display("--prefix-caching", self.prefix_caching);
        argv.push_display("--heartbeat-ms", self.heartbeat_ms);
        argv.push_display("--max-tokens-in-buffer", self.max_tokens_in_buffer);
        argv.push_display("--kv-transfer-timeout-ms", self.kv_transfer_timeout_ms);
        argv.push_some("--max-queued-requests", self.max_queued_requests);
        argv.push_some("--kv-transfer-pool-mb", self.kv_transfer_pool_mb);
        argv.push_some("--cuda-ipc-pool-mb", self.cuda_ipc_pool_mb);
        // The path, never the secret.
        argv.push_some(
            "--kv-secret-file",
            self.kv_secret_file.as_ref().map(|p| p.display()),
        );
        let GpuArgs {
            cuda_graphs,
            device_sampling,
            attn_split_keys,
            l2_prefetch_mb,
        } = self.gpu;
        argv.push_some("--cuda-graphs", cuda_graphs);
        argv.push_some("--device-sampling", device_sampling);
        argv.push_some("--attn-split-keys", attn_split_keys);
        argv.push_some("--l2-prefetch-mb", l2_prefetch_mb);
        self.engine.push_args(&mut argv);
        self.speculation.push_args(&mut argv);
        self.nats_auth.push_args(&mut argv);
        argv.0
    }
}

impl EngineArgs {
    /// The flags of the settings that are given.
    fn push_args(&self, argv: &mut Argv) {
        let EngineArgs {
            overlap,
            device_masks,
            engine_log_secs,
        } = *self;
        argv.push_some("--overlap", overlap);
        argv.push_some("--device-masks", device_masks);
        argv.push_some("--engine-log-secs", engine_log_secs);
    }
}

/// `--role`: the wire names of [`WorkerRole`], each with its help, in the order `--help`
/// lists them.
/// `--kv-cache-dtype`: the names of [`KvCacheDtype`].
pub fn kv_cache_dtype_parser() -> impl TypedValueParser<Value = KvCacheDtype> {
    let values = KvCacheDtype::ALL.map(|d| PossibleValue::new(d.as_str()));
    PossibleValuesParser::new(values).map(|name| {
        name.parse::<KvCacheDtype>()
            .expect("the possible values are the types' names")
    })
}

fn quant_activation_bits_parser() -> impl TypedValueParser<Value = u8> {
    PossibleValuesParser::new(["8", "16"])
        .map(|bits| bits.parse::<u8>().expect("the possible values are numbers"))
}

fn role_parser() -> impl TypedValueParser<Value = WorkerRole> {
    let values = [WorkerRole::Both, WorkerRole::Context, WorkerRole::Decode]
        .map(|role| PossibleValue::new(role.as_str()).help(role_help(role)));
    PossibleValuesParser::new(values).map(|name| {
        name.parse::<WorkerRole>()
            .expect("the possible values are the roles' names")
    })
}

fn role_help(role: WorkerRole) -> &'static str {
    match role {
        WorkerRole::Both => "Prefill and decode in one process (aggregated serving)",
        WorkerRole::Context => {
            "Prefill only: answers prefill jobs with a KV handle for a decode worker"
        }
        WorkerRole::Decode => {
            "Generation, pulling each prompt's KV cache from a context worker (or prefilling \
             locally when there is none, or the pull fails)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::*;

    fn parse(argv: &[OsString]) -> WorkerArgs {
        testing::parse("worker", argv)
    }

    #[test]
    fn the_command_line_is_consistent() {
        testing::assert_consistent::<WorkerArgs>("worker");
    }

    #[test]
    fn every_flag_set_round_trips() {
        let args = WorkerArgs {
            role: Some(WorkerRole::Context),
            model: Some("/models/smol lm".into()),
            nats: "nats://10.0.0.2:4222".into(),
            device: "cuda:1".into(),
            served_model_name: Some("smol".into()),
            lora_modules: vec![
                "sql=/adapters/sql".parse().unwrap(),
                "chat=/adapters/my chat".parse().unwrap(),
            ],
            worker_id: Some("context-a".into()),
            threads: 3,
            nice: 5,
            quant_activation_bits: 8,
            quant_kernels: Some("avx2".into()),
            tensor_parallel: 2,
            kv_cache_tokens: Some(4096),
            gpu_memory_fraction: 0.55,
            block_size: Some(32),
            kv_cache_dtype: KvCacheDtype::Fp8,
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            growth_reserve_tokens: 0,
            prefix_caching: false,
            heartbeat_ms: 333,
            max_tokens_in_buffer: 2048,
            kv_transfer_timeout_ms: 9000,
            max_queued_requests: Some(12),
            kv_transfer_pool_mb: Some(0),
            cuda_ipc_pool_mb: Some(512),
            kv_secret_file: Some("/run/secrets/kv".into()),
            gpu: GpuArgs {
                cuda_graphs: Some(false),
                device_sampling: Some(true),
                attn_split_keys: Some(32),
                l2_prefetch_mb: Some(0),
            },
            engine: EngineArgs {
                overlap: Some(false),
                device_masks: Some(true),
                engine_log_secs: Some(2.5),
            },
            speculation: SpeculationArgs {
                ngram_draft_tokens: 6,
                ngram_max_match: 5,
                ngram_min_match: 3,
            },
            nats_auth: super::super::NatsAuthArgs {
                nats_creds: Some("/run/secrets/w.creds".into()),
                nats_nkey_file: Some("/run/secrets/seed".into()),
                nats_user: Some("worker".into()),
                nats_password_file: Some("/run/secrets/pw".into()),
                nats_token_file: Some("/run/secrets/token".into()),
                nats_tls_ca: Some("/etc/nats/ca.pem".into()),
                nats_tls_cert: Some("/etc/nats/w.pem".into()),
                nats_tls_key: Some("/etc/nats/w.key".into()),
                nats_tls_required: true,
            },
        };
        // No field is at its default, so a flag that does not parse back shows.
        let defaults = WorkerArgs::default();
        assert_ne!(args.threads, defaults.threads);
        assert_ne!(args.nats, defaults.nats);
        assert_eq!(parse(&args.to_args()), args);
        for role in WorkerRole::ALL {
            let args = WorkerArgs {
                role: Some(role),
                ..args.clone()
            };
            assert_eq!(parse(&args.to_args()), args);
        }
    }

    #[test]
    fn a_launcher_filled_worker_round_trips() {
        // As `tandem serve` fills a decode worker of the default deployment.
        let args = WorkerArgs {
            role: Some(WorkerRole::Decode),
            model: Some("/m/smol".into()),
            nats: "nats://127.0.0.1:40123".into(),
            served_model_name: Some("smol".into()),
            threads: 4,
            heartbeat_ms: 1000,
            ..WorkerArgs::default()
        };
        let argv = args.to_args();
        let text: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            text[..10],
            [
                "--role",
                "decode",
                "--model",
                "/m/smol",
                "--nats",
                "nats://127.0.0.1:40123",
                "--device",
                "cpu",
                "--served-model-name",
                "smol"
            ]
        );
        assert!(!text.contains(&"--cuda-graphs"), "{text:?}");
        assert_eq!(parse(&argv), args);
    }

    #[test]
    fn default_is_what_clap_parses_from_no_flags() {
        let mut parsed = parse(&[]);
        // The flags that read the environment: whatever it holds here is not a default.
        parsed.model = None;
        parsed.served_model_name = None;
        parsed.nats = DEFAULT_NATS.into();
        parsed.max_queued_requests = None;
        parsed.kv_secret_file = None;
        assert_eq!(parsed, WorkerArgs::default());
    }

    #[test]
    fn the_queue_bound_follows_the_batch_size_unless_set() {
        let args = WorkerArgs {
            max_num_seqs: 8,
            ..WorkerArgs::default()
        };
        assert_eq!(args.queue_bound(), Some(32));
        let set = |max| WorkerArgs {
            max_queued_requests: Some(max),
            ..args.clone()
        };
        assert_eq!(set(3).queue_bound(), Some(3));
        assert_eq!(set(0).queue_bound(), None, "0: no bound");
        let parsed = parse(&["--max-queued-requests".into(), "5".into()]);
        assert_eq!(parsed.max_queued_requests, Some(5));
    }

    #[test]
    fn roles_parse_by_their_wire_names_only() {
        for role in WorkerRole::ALL {
            let args = parse(&["--role".into(), role.as_str().into()]);
            assert_eq!(args.role, Some(role));
        }
        let try_parse = |argv: &[&str]| testing::try_parse::<WorkerArgs>("worker", argv);
        let err = try_parse(&["--role", "prefill"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("[possible values: both, context, decode]"),
            "{err}"
        );
        assert!(try_parse(&["--attn-split-keys", "0"]).is_err());
        assert!(try_parse(&["--cuda-graphs", "0"]).is_err());
        assert!(try_parse(&["--engine-log-secs", "-1"]).is_err());
        assert!(try_parse(&["--overlap", "0"]).is_err());
    }
}
