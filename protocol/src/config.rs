//! The deployment config (`tandem serve -c CONFIG.yaml`).
//!
//! It accepts the keys of TensorRT-LLM's `disagg_config.yaml` (`hostname`, `port`, `model`,
//! `backend`, `context_servers` / `generation_servers` with `num_instances`, `urls`,
//! `tensor_parallel_size`, `kv_cache_config`, `cache_transceiver_config` with `backend`,
//! `max_tokens_in_buffer`, `kv_transfer_timeout_ms`) so its users can bring their file, and adds
//! tandem's own (`nats`, `router`, per-group `device`, scheduler limits). Keys that neither
//! knows are collected in `ignored` so the launcher can log them, rather than failing on a
//! TensorRT-LLM option that has no meaning here. [`DeploymentConfig::validate`] checks values
//! and names the offending key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Yaml {
        path: String,
        source: serde_yaml_ng::Error,
    },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// How the api-server picks a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPolicy {
    RoundRobin,
    /// Fewest running + queued sequences, from heartbeats.
    #[default]
    LeastLoaded,
    /// The lowest cost in KV blocks: the prompt's blocks the worker would compute (those not
    /// in its prefix cache, from its KV events) plus the blocks its running work holds.
    KvAware,
}

impl RouterPolicy {
    /// Every policy, in declaration order.
    pub const ALL: [RouterPolicy; 3] = [
        RouterPolicy::RoundRobin,
        RouterPolicy::LeastLoaded,
        RouterPolicy::KvAware,
    ];
}

/// Which tool-call markup the api-server parses (`--tool-call-parser`, config key
/// `tool_call_parser`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallParser {
    /// From the model's chat template (Hermes when it shows none).
    #[default]
    Auto,
    /// `<tool_call>{...}</tool_call>` (Hermes 2 Pro / 3, Qwen2.5).
    Hermes,
    /// `{"name": ..., "parameters": {...}}` (Llama 3.1 / 3.2).
    Llama3Json,
    /// `[TOOL_CALLS] [{...}]` (Mistral v0.3).
    Mistral,
    /// Tool calling off: requests with tools are refused unless `tool_choice` is `none`.
    None,
}

impl ToolCallParser {
    /// Every choice, in declaration order.
    pub const ALL: [ToolCallParser; 5] = [
        ToolCallParser::Auto,
        ToolCallParser::Hermes,
        ToolCallParser::Llama3Json,
        ToolCallParser::Mistral,
        ToolCallParser::None,
    ];

    /// The name on the command line and in the config.
    pub fn name(self) -> &'static str {
        match self {
            ToolCallParser::Auto => "auto",
            ToolCallParser::Hermes => "hermes",
            ToolCallParser::Llama3Json => "llama3_json",
            ToolCallParser::Mistral => "mistral",
            ToolCallParser::None => "none",
        }
    }
}

/// Which reasoning markup the api-server splits out of chat replies (`--reasoning-parser`,
/// config key `reasoning_parser`; vLLM's names). Both read `<think>...</think>`: the text
/// inside is the reply's `reasoning`, the rest its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningParser {
    /// Replies are all answer: thinking stays in `content`.
    #[default]
    None,
    /// Qwen3 (and QwQ): `<think>` opens the reply, or the prompt when its template does.
    Qwen3,
    /// DeepSeek-R1 and its distills: the template opens `<think>` in the prompt.
    DeepseekR1,
}

impl ReasoningParser {
    /// Every choice, in declaration order.
    pub const ALL: [ReasoningParser; 3] = [
        ReasoningParser::None,
        ReasoningParser::Qwen3,
        ReasoningParser::DeepseekR1,
    ];

    /// The name on the command line and in the config.
    pub fn name(self) -> &'static str {
        match self {
            ReasoningParser::None => "none",
            ReasoningParser::Qwen3 => "qwen3",
            ReasoningParser::DeepseekR1 => "deepseek_r1",
        }
    }
}

/// Where the api-server takes the sampling defaults of requests that omit them
/// (`--generation-config`, config key `generation_config`; vLLM's flag of the same name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GenerationConfigSource {
    /// The model directory's `generation_config.json`, where it has one.
    #[default]
    Auto,
    /// None: requests that omit a field get OpenAI's default (vLLM's `vllm`).
    None,
    /// The `generation_config.json` of this directory (which must have one).
    Dir(std::path::PathBuf),
}

impl GenerationConfigSource {
    /// `auto`, `none`, or a directory.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "" => Err("give `auto`, `none` or a directory".into()),
            "auto" => Ok(GenerationConfigSource::Auto),
            "none" => Ok(GenerationConfigSource::None),
            dir => Ok(GenerationConfigSource::Dir(dir.into())),
        }
    }

    /// The spelling [`Self::parse`] reads back.
    pub fn name(&self) -> String {
        match self {
            GenerationConfigSource::Auto => "auto".into(),
            GenerationConfigSource::None => "none".into(),
            GenerationConfigSource::Dir(dir) => dir.display().to_string(),
        }
    }
}

impl Serialize for GenerationConfigSource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for GenerationConfigSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        GenerationConfigSource::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub policy: RouterPolicy,
    /// Prompts shorter than this are prefilled by the decode worker itself (no transfer).
    pub max_local_prefill_length: usize,
    /// A worker whose heartbeat is older than this is considered gone.
    pub worker_timeout_ms: u64,
    /// `kv_aware`: the weight of a prompt block a worker would have to prefill against a block
    /// its running work holds (Dynamo's `kv_overlap_score_weight`). Higher favours the worker
    /// holding the prompt's prefix over the less loaded one; 0 routes by held blocks alone.
    pub kv_overlap_weight: f64,
}

/// The default [`RouterConfig::kv_overlap_weight`].
pub const DEFAULT_KV_OVERLAP_WEIGHT: f64 = 4.0;

/// The largest [`RouterConfig::kv_overlap_weight`] accepted (past it the load term no longer
/// counts at all).
pub const MAX_KV_OVERLAP_WEIGHT: f64 = 1000.0;

/// Why a `kv_overlap_weight` is refused, if it is.
pub fn check_kv_overlap_weight(weight: f64) -> Result<(), String> {
    if weight.is_finite() && (0.0..=MAX_KV_OVERLAP_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(format!(
            "{weight} is not a weight from 0 to {MAX_KV_OVERLAP_WEIGHT}"
        ))
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            policy: RouterPolicy::default(),
            max_local_prefill_length: 0,
            worker_timeout_ms: 3_000,
            kv_overlap_weight: DEFAULT_KV_OVERLAP_WEIGHT,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    /// `nats://host:port` of an existing server; absent, the launcher starts its own
    /// `nats-server` on a free port.
    pub url: Option<String>,
}

/// TensorRT-LLM's `cache_transceiver_config`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheTransceiverConfig {
    /// `UCX` or `DEFAULT` (= UCX); TensorRT-LLM's `NIXL` and `MPI` are refused.
    pub backend: Option<String>,
    /// Cap on tokens whose KV a context worker keeps pinned waiting to be pulled.
    pub max_tokens_in_buffer: Option<usize>,
    /// Pinned KV blocks not pulled within this time are freed.
    pub kv_transfer_timeout_ms: Option<u64>,
    /// (tandem) MiB of host memory each decode worker, and each GPU context worker (for the
    /// exports it copies out to UCX readers), maps once for transfers (registered with UCX,
    /// pinned on a GPU); 0: none. A CPU context worker's exports are read out of its cache.
    pub transfer_pool_mb: Option<usize>,
    /// (tandem) 0 turns off CUDA IPC between GPU workers of one host (device to device, no
    /// UCX: read straight out of the context worker's KV cache, written straight into the
    /// decode worker's); any other value is accepted for older configurations and unused
    /// (CUDA IPC needs no pool).
    pub cuda_ipc_pool_mb: Option<usize>,
}

/// TensorRT-LLM's `kv_cache_config` plus tandem's block settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCacheConfig {
    /// Fraction of free device memory for the KV cache (GPU workers).
    pub free_gpu_memory_fraction: Option<f64>,
    /// KV capacity in tokens (overrides the fraction).
    pub max_tokens: Option<usize>,
    /// Tokens per KV block.
    pub block_size: Option<usize>,
    /// TensorRT-LLM's key for prefix caching: computed blocks stay cached for later requests
    /// with the same prefix (absent: on).
    pub enable_block_reuse: Option<bool>,
    /// TensorRT-LLM's key for the cache's element type (vLLM's `--kv-cache-dtype`): `auto`
    /// (absent: the model's own type, bf16 on a GPU) or `fp8`, which halves the bytes a token
    /// takes (twice the tokens in the same memory, half the bytes a hand-over moves). Context
    /// and decode workers handing prompts over need the same.
    pub dtype: Option<KvCacheDtype>,
    /// Keys of TensorRT-LLM's `kv_cache_config` tandem does not use, for the startup warning.
    #[serde(flatten)]
    pub ignored: BTreeMap<String, serde_yaml_ng::Value>,
}

/// The element type of a KV cache as configurations name it (`kv_cache_config.dtype`, the
/// workers' `--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// The model's: its weights' type on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    /// FP8 e4m3 codes (GPUs of compute capability 8.9 and later, and the CPU).
    Fp8,
    Bf16,
    /// f16 (the CPU only).
    F16,
    /// f32 (the CPU only).
    F32,
}

impl KvCacheDtype {
    pub const ALL: [KvCacheDtype; 5] = [
        KvCacheDtype::Auto,
        KvCacheDtype::Fp8,
        KvCacheDtype::Bf16,
        KvCacheDtype::F16,
        KvCacheDtype::F32,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Fp8 => "fp8",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::F32 => "f32",
        }
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        // vLLM spells FP8 e4m3 both ways.
        let name = if name == "fp8_e4m3" { "fp8" } else { name };
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|d| d.as_str()).collect();
                format!(
                    "{name:?} is not a KV cache type (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// `context_servers` / `generation_servers`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerGroupConfig {
    pub num_instances: Option<usize>,
    /// TensorRT-LLM's static list of server addresses. tandem workers are found through NATS
    /// heartbeats, so these only fix the instance count when `num_instances` is absent
    /// (a group with neither has one instance; `num_instances: 0` for context servers means
    /// decode workers prefill locally).
    pub urls: Vec<String>,
    /// Device of each instance: one entry for all (`cpu`, `cuda:0`) or one per instance.
    pub device: DeviceSpec,
    pub tensor_parallel_size: Option<usize>,
    pub pipeline_parallel_size: Option<usize>,
    /// TensorRT-LLM's `max_batch_size`: running sequences at most.
    pub max_batch_size: Option<usize>,
    /// (tandem) Jobs each worker of the group holds accepted but not started at most; past
    /// it, a job is refused and goes to another worker or gets 429. Absent: the worker's
    /// default (4 x the batch size); 0: no bound.
    pub max_queued_requests: Option<usize>,
    /// TensorRT-LLM's `max_num_tokens`: tokens per forward step at most.
    pub max_num_tokens: Option<usize>,
    /// (tandem) Tokens of growth kept free for every admitted request at admission (the
    /// workers' `--growth-reserve-tokens`); absent: the worker's default (256); 0: admit on
    /// the first prompt chunk alone.
    pub growth_reserve_tokens: Option<usize>,
    pub kv_cache_config: KvCacheConfig,
    pub cache_transceiver_config: Option<CacheTransceiverConfig>,
    /// (tandem) GPU workers: replay decode steps as CUDA graphs (absent: the worker's default,
    /// on unless `TANDEM_CUDA_GRAPHS=0`).
    pub cuda_graphs: Option<bool>,
    /// (tandem) GPU workers of this group run as MPS clients limited to this percentage of
    /// the GPU's SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`), so that a context and a decode
    /// worker on one GPU cannot take each other's: it needs an MPS control daemon on the host
    /// (`nvidia-cuda-mps-control -d`), and does nothing without one.
    pub mps_sm_percent: Option<u32>,
    /// (tandem) CPU workers of this group, models with GGUF blocks kept quantized: the bits
    /// each activation keeps in the integer products, 16 (the default: the dequantized
    /// weights' results) or 8 (llama.cpp's rounding, faster prefill); the workers'
    /// `--quant-activation-bits`.
    pub quant_activation_bits: Option<u8>,
    /// TensorRT-LLM's `speculative_config`, n-gram decoding only: the group's workers draft
    /// from each request's own tokens (their `--ngram-*` flags).
    pub speculative_config: Option<SpeculativeConfig>,
    #[serde(flatten)]
    pub ignored: BTreeMap<String, serde_yaml_ng::Value>,
}

/// `speculative_config` of a server group: `{decoding_type: NGram, max_draft_len,
/// max_matching_ngram_size}` (TensorRT-LLM's keys) and tandem's `min_matching_ngram_size`.
/// Decoding types that need a draft model or extra heads (`Eagle`, `MTP`, `Medusa`,
/// `DraftTarget`, ...) are refused: tandem runs none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    pub decoding_type: String,
    /// Draft tokens a decode verifies at most (1 to 64).
    pub max_draft_len: usize,
    /// The longest run of a sequence's last tokens looked up (default 4).
    pub max_matching_ngram_size: Option<usize>,
    /// The shortest run that still drafts (default 2).
    pub min_matching_ngram_size: Option<usize>,
}

impl SpeculativeConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            reason,
        };
        if self.decoding_type != "NGram" {
            return Err(invalid(
                "decoding_type",
                format!(
                    "{:?} is not served: tandem drafts by n-gram lookup only (NGram), with no \
                     draft model or extra heads",
                    self.decoding_type
                ),
            ));
        }
        if !(1..=64).contains(&self.max_draft_len) {
            return Err(invalid(
                "max_draft_len",
                format!("{} is not 1 to 64", self.max_draft_len),
            ));
        }
        let max = self.max_matching_ngram_size.unwrap_or(4);
        let min = self.min_matching_ngram_size.unwrap_or(2.min(max));
        if !(1..=64).contains(&max) || !(1..=max).contains(&min) {
            return Err(invalid(
                "min_matching_ngram_size",
                format!("1 <= min ({min}) <= max_matching_ngram_size ({max}) <= 64 does not hold"),
            ));
        }
        Ok(())
    }
}

/// One device for every instance, or a list with one per instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceSpec {
    All(String),
    PerInstance(Vec<String>),
}

impl Default for DeviceSpec {
    fn default() -> Self {
        DeviceSpec::All("cpu".into())
    }
}

impl ServerGroupConfig {
    /// Instances to start: `num_instances`, else the number of `urls`, else 1.
    pub fn instances(&self) -> usize {
        self.num_instances.unwrap_or(if self.urls.is_empty() {
            1
        } else {
            self.urls.len()
        })
    }

    /// Device of instance `i`.
    pub fn device_of(&self, i: usize) -> &str {
        match &self.device {
            DeviceSpec::All(device) => device,
            DeviceSpec::PerInstance(devices) => devices.get(i).map_or("cpu", String::as_str),
        }
    }

    fn validate(&self, group: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("{group}.{key}"),
            reason,
        };
        if let Some(n) = self.pipeline_parallel_size
            && n != 1
        {
            return Err(invalid(
                "pipeline_parallel_size",
                format!("{n} is not supported (tandem does not split layers over devices)"),
            ));
        }
        if self.tensor_parallel_size == Some(0) {
            return Err(invalid(
                "tensor_parallel_size",
                "0 is not a number of ranks".into(),
            ));
        }
        if let DeviceSpec::PerInstance(devices) = &self.device
            && devices.len() != self.instances()
        {
            return Err(invalid(
                "device",
                format!(
                    "{} devices listed for {} instances",
                    devices.len(),
                    self.instances()
                ),
            ));
        }
        let devices: Vec<&str> = match &self.device {
            DeviceSpec::All(device) => vec![device],
            DeviceSpec::PerInstance(devices) => devices.iter().map(String::as_str).collect(),
        };
        for device in devices {
            if !is_valid_device(device) {
                return Err(invalid(
                    "device",
                    format!("{device:?} is not a device (use `cpu` or `cuda:N`)"),
                ));
            }
        }
        if let Some(fraction) = self.kv_cache_config.free_gpu_memory_fraction
            && !(fraction > 0.0 && fraction <= 1.0)
        {
            return Err(invalid(
                "kv_cache_config.free_gpu_memory_fraction",
                format!("{fraction} is not in (0, 1]"),
            ));
        }
        if let Some(percent) = self.mps_sm_percent
            && !(1..=100).contains(&percent)
        {
            return Err(invalid(
                "mps_sm_percent",
                format!("{percent} is not a percentage of the SMs (1 to 100)"),
            ));
        }
        if let Some(bits) = self.quant_activation_bits
            && bits != 8
            && bits != 16
        {
            return Err(invalid(
                "quant_activation_bits",
                format!("{bits} is not 8 or 16"),
            ));
        }
        if self.kv_cache_config.block_size == Some(0) {
            return Err(invalid(
                "kv_cache_config.block_size",
                "must be positive".into(),
            ));
        }
        if let Some(transceiver) = &self.cache_transceiver_config {
            validate_transceiver(transceiver, &format!("{group}.cache_transceiver_config"))?;
        }
        if let Some(speculative) = &self.speculative_config {
            speculative.validate(&format!("{group}.speculative_config"))?;
        }
        Ok(())
    }
}

fn is_valid_device(device: &str) -> bool {
    device == "cpu"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

fn validate_transceiver(config: &CacheTransceiverConfig, key: &str) -> Result<(), ConfigError> {
    if let Some(backend) = &config.backend
        && !matches!(backend.to_ascii_uppercase().as_str(), "UCX" | "DEFAULT")
    {
        return Err(ConfigError::Invalid {
            key: format!("{key}.backend"),
            reason: format!("{backend:?} is not supported (UCX or DEFAULT)"),
        });
    }
    if config.max_tokens_in_buffer == Some(0) {
        return Err(ConfigError::Invalid {
            key: format!("{key}.max_tokens_in_buffer"),
            reason: "must be positive".into(),
        });
    }
    Ok(())
}

/// A LoRA adapter to serve beside the model (vLLM's `--lora-modules`): a PEFT directory
/// (`adapter_config.json`, `adapter_model.safetensors`) and the name requests ask for it by
/// as their `model`. `{name, path}` in a config; `NAME=PATH` on a command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraModule {
    pub name: String,
    pub path: std::path::PathBuf,
}

impl LoraModule {
    /// An adapter's name is what a request's `model` names: 1 to 256 visible ASCII
    /// characters besides `=` (which separates it from the path on a command line).
    pub fn check_name(name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > 256 {
            return Err(format!(
                "adapter name `{name}`: 1 to 256 characters expected"
            ));
        }
        if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic() || *c == '=') {
            return Err(format!(
                "adapter name `{name}`: {c:?} is not allowed (visible ASCII characters besides `=`)"
            ));
        }
        Ok(())
    }

    /// The command-line form, `NAME=PATH`.
    pub fn to_arg(&self) -> String {
        format!("{}={}", self.name, self.path.display())
    }
}

impl std::str::FromStr for LoraModule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = s.split_once('=').ok_or_else(|| {
            format!("`{s}`: expected NAME=PATH (an adapter's name and its directory)")
        })?;
        Self::check_name(name)?;
        if path.is_empty() {
            return Err(format!("`{s}`: the adapter's directory is empty"));
        }
        Ok(LoraModule {
            name: name.to_string(),
            path: path.into(),
        })
    }
}

/// The whole deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeploymentConfig {
    /// Address the api-server binds.
    pub hostname: String,
    pub port: u16,
    /// Model directory (as prepared by `model-prep`); absent, the embedded default model.
    pub model: Option<String>,
    /// Name served in `/v1/models` and expected in requests; defaults to the directory name.
    pub served_model_name: Option<String>,
    /// TensorRT-LLM's runtime backend (`pytorch`, ...): accepted and ignored.
    pub backend: Option<String>,
    pub context_servers: ServerGroupConfig,
    pub generation_servers: ServerGroupConfig,
    /// Applies to both groups unless a group sets its own.
    pub cache_transceiver_config: CacheTransceiverConfig,
    pub nats: NatsConfig,
    pub router: RouterConfig,
    /// (tandem) API keys the api-server requires on /v1 (`Authorization: Bearer <key>`);
    /// the launcher checks each (`tandem_cli::args::ApiKey::parse`).
    pub api_keys: ApiKeyList,
    /// (tandem) A file of API keys, one per line, read by the api-server.
    pub api_key_file: Option<String>,
    /// (tandem) With keys, /metrics requires one too.
    pub metrics_require_key: bool,
    /// (tandem) The workers' prefix caches are salted by API key: clients of different keys
    /// never share cached prompts. Needs keys.
    pub cache_salt_by_api_key: bool,
    /// (tandem) Generation requests the api-server holds at once (accepted, not finished);
    /// past it, 429. Absent: the api-server's default; 0: no bound.
    pub max_pending_requests: Option<usize>,
    /// (tandem) How often one request may move to another worker when its worker fails
    /// mid-stream. Absent: the api-server's default (3); 0: never.
    pub migration_limit: Option<u32>,
    /// (tandem) MiB of stored Responses API responses the api-server keeps in memory (for
    /// `previous_response_id` and `GET /v1/responses/{id}`). Absent: the api-server's
    /// default (256); 0: none.
    pub response_store_mib: Option<usize>,
    /// (tandem) Which tool-call markup the api-server parses: `auto` (from the chat
    /// template), `hermes`, `llama3_json`, `mistral` or `none`. Absent: `auto`.
    pub tool_call_parser: Option<ToolCallParser>,
    /// Which reasoning markup the api-server splits out of chat replies into `reasoning`:
    /// `qwen3`, `deepseek_r1` or `none` (vLLM's `--reasoning-parser`). Absent: `none`.
    pub reasoning_parser: Option<ReasoningParser>,
    /// (tandem) Where requests that omit sampling fields take their defaults from: `auto`
    /// (the model directory's generation_config.json), `none` (OpenAI's defaults) or a
    /// directory holding a generation_config.json. Absent: `auto`.
    pub generation_config: Option<GenerationConfigSource>,
    /// (tandem) A file holding the deployment's KV secret, with which context workers sign KV
    /// handles and decode workers check them (the same file on every host). Absent: the
    /// launcher makes a fresh secret for a deployment it starts whole.
    pub kv_secret_file: Option<String>,
    /// (tandem) LoRA adapters every worker serves beside the model (`{name, path}` each; the
    /// workers' `--lora-modules`): requests name one as their `model`. CPU workers, and GPU
    /// workers of 16-bit models.
    pub lora_modules: Vec<LoraModule>,
    #[serde(flatten)]
    pub ignored: BTreeMap<String, serde_yaml_ng::Value>,
}

/// The config's API keys. `Debug` shows how many, never the keys.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyList(pub Vec<String>);

impl std::fmt::Debug for ApiKeyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeyList({} redacted)", self.0.len())
    }
}

impl Default for DeploymentConfig {
    /// One context and one decode worker on the CPU, serving on localhost:8000.
    fn default() -> Self {
        DeploymentConfig {
            hostname: "127.0.0.1".into(),
            port: 8000,
            model: None,
            served_model_name: None,
            backend: None,
            context_servers: ServerGroupConfig::default(),
            generation_servers: ServerGroupConfig::default(),
            cache_transceiver_config: CacheTransceiverConfig::default(),
            nats: NatsConfig::default(),
            router: RouterConfig::default(),
            api_keys: ApiKeyList::default(),
            api_key_file: None,
            metrics_require_key: false,
            cache_salt_by_api_key: false,
            max_pending_requests: None,
            migration_limit: None,
            response_store_mib: None,
            tool_call_parser: None,
            reasoning_parser: None,
            generation_config: None,
            kv_secret_file: None,
            lora_modules: Vec::new(),
            ignored: BTreeMap::new(),
        }
    }
}

impl DeploymentConfig {
    /// Reads and validates a YAML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: DeploymentConfig =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Yaml {
                path: origin.to_string(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.context_servers.validate("context_servers")?;
        self.generation_servers.validate("generation_servers")?;
        validate_transceiver(&self.cache_transceiver_config, "cache_transceiver_config")?;
        if self.generation_servers.instances() == 0 {
            return Err(ConfigError::Invalid {
                key: "generation_servers.num_instances".into(),
                reason: "at least one generation (decode) worker is needed".into(),
            });
        }
        if let (Some(context), Some(generation)) = (
            self.context_servers.kv_cache_config.dtype,
            self.generation_servers.kv_cache_config.dtype,
        ) && context != generation
            && self.context_servers.instances() > 0
        {
            return Err(ConfigError::Invalid {
                key: "generation_servers.kv_cache_config.dtype".into(),
                reason: format!(
                    "{generation} differs from context_servers' {context}: decode workers refuse \
                     every hand-over of another KV layout; give both groups one (or one group \
                     only: the other takes it)"
                ),
            });
        }
        check_kv_overlap_weight(self.router.kv_overlap_weight).map_err(|reason| {
            ConfigError::Invalid {
                key: "router.kv_overlap_weight".into(),
                reason,
            }
        })?;
        if let Some(url) = &self.nats.url
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err(ConfigError::Invalid {
                key: "nats.url".into(),
                reason: format!("{url:?} is not a nats:// or tls:// URL"),
            });
        }
        Ok(())
    }

    /// The transceiver settings of a group: its own, else the top-level ones.
    pub fn transceiver_for<'a>(
        &'a self,
        group: &'a ServerGroupConfig,
    ) -> &'a CacheTransceiverConfig {
        group
            .cache_transceiver_config
            .as_ref()
            .unwrap_or(&self.cache_transceiver_config)
    }

    /// Keys accepted but without effect, `group.key` style, for a startup warning.
    pub fn ignored_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.ignored.keys().cloned().collect();
        for (group, config) in [
            ("context_servers", &self.context_servers),
            ("generation_servers", &self.generation_servers),
        ] {
            keys.extend(config.ignored.keys().map(|k| format!("{group}.{k}")));
            keys.extend(
                config
                    .kv_cache_config
                    .ignored
                    .keys()
                    .map(|k| format!("{group}.kv_cache_config.{k}")),
            );
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lora_module_is_a_name_and_a_directory() {
        let m: LoraModule = "sql=/adapters/sql".parse().unwrap();
        assert_eq!(m.name, "sql");
        assert_eq!(m.path, std::path::PathBuf::from("/adapters/sql"));
        assert_eq!(m.to_arg(), "sql=/adapters/sql");
        // The path may hold `=`; the name may not.
        let m: LoraModule = "a=/x=y".parse().unwrap();
        assert_eq!(m.path, std::path::PathBuf::from("/x=y"));
        let long = format!("{}=/p", "x".repeat(257));
        for bad in ["sql", "=/p", "sql=", "s ql=/p", long.as_str()] {
            assert!(bad.parse::<LoraModule>().is_err(), "{bad}");
        }
        let config: DeploymentConfig =
            serde_yaml_ng::from_str("lora_modules:\n  - {name: sql, path: /adapters/sql}\n")
                .unwrap();
        assert_eq!(
            config.lora_modules,
            vec!["sql=/adapters/sql".parse().unwrap()]
        );
    }

    use super::*;

    /// The example from TensorRT-LLM's disaggregated serving docs, as its users write it.
    const TRTLLM_CONFIG: &str = r#"
hostname: localhost
port: 8000
model: TinyLlama/TinyLlama-1.1B-Chat-v1.0
backend: "pytorch"
disable_overlap_scheduler: True
context_servers:
  num_instances: 1
  tensor_parallel_size: 1
  pipeline_parallel_size: 1
  kv_cache_config:
    free_gpu_memory_fraction: 0.2
  cache_transceiver_config:
    backend: "UCX"
    max_tokens_in_buffer: 2048
  urls:
      - "localhost:8001"
generation_servers:
  num_instances: 1
  tensor_parallel_size: 1
  cache_transceiver_config:
    backend: "UCX"
  urls:
      - "localhost:8002"
"#;

    #[test]
    fn accepts_a_tensorrt_llm_disagg_config() {
        let config = DeploymentConfig::parse(TRTLLM_CONFIG, "disagg.yaml").unwrap();
        assert_eq!(config.port, 8000);
        assert_eq!(config.context_servers.instances(), 1);
        assert_eq!(config.generation_servers.instances(), 1);
        assert_eq!(
            config
                .transceiver_for(&config.context_servers)
                .max_tokens_in_buffer,
            Some(2048)
        );
        assert_eq!(config.context_servers.device_of(0), "cpu");
        assert_eq!(
            config.ignored_keys(),
            vec!["disable_overlap_scheduler".to_string()]
        );
    }

    #[test]
    fn ours_add_nats_router_and_devices() {
        let yaml = r#"
model: /models/llama
nats: { url: "nats://10.0.0.5:4222" }
router: { policy: round_robin, max_local_prefill_length: 64 }
context_servers: { num_instances: 2, device: [ "cuda:0", "cuda:1" ] }
generation_servers: { num_instances: 1, device: "cuda:2" }
kv_secret_file: /run/secrets/tandem-kv
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        assert_eq!(config.router.policy, RouterPolicy::RoundRobin);
        assert_eq!(config.context_servers.device_of(1), "cuda:1");
        assert_eq!(config.generation_servers.device_of(0), "cuda:2");
        assert_eq!(
            config.kv_secret_file.as_deref(),
            Some("/run/secrets/tandem-kv")
        );
        assert!(
            config.ignored_keys().is_empty(),
            "{:?}",
            config.ignored_keys()
        );
    }

    #[test]
    fn kv_cache_dtype_is_read_and_unknown_cache_keys_are_reported() {
        let yaml = "context_servers: { kv_cache_config: { dtype: fp8, tokens_per_block: 32 } }\n\
                    generation_servers: { kv_cache_config: { dtype: fp8 } }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        assert_eq!(
            config.context_servers.kv_cache_config.dtype,
            Some(KvCacheDtype::Fp8)
        );
        assert_eq!(
            config.generation_servers.kv_cache_config.dtype,
            Some(KvCacheDtype::Fp8)
        );
        assert_eq!("auto".parse::<KvCacheDtype>(), Ok(KvCacheDtype::Auto));
        assert_eq!(
            config.ignored_keys(),
            vec!["context_servers.kv_cache_config.tokens_per_block".to_string()]
        );
        let err = DeploymentConfig::parse(
            "context_servers: { kv_cache_config: { dtype: int4 } }",
            "c.yaml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        assert_eq!("fp8_e4m3".parse::<KvCacheDtype>(), Ok(KvCacheDtype::Fp8));
        let err = "int4".parse::<KvCacheDtype>().unwrap_err();
        assert!(err.contains("auto, fp8, bf16, f16, f32"), "{err}");
    }

    #[test]
    fn context_and_generation_kv_cache_dtypes_must_agree() {
        let yaml = "context_servers: { kv_cache_config: { dtype: fp8 } }\n\
                    generation_servers: { kv_cache_config: { dtype: bf16 } }";
        let err = DeploymentConfig::parse(yaml, "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("generation_servers.kv_cache_config.dtype")
                && err.contains("bf16 differs from context_servers' fp8"),
            "{err}"
        );
        // Without context workers there is no hand-over.
        let yaml = "context_servers: { num_instances: 0, kv_cache_config: { dtype: fp8 } }\n\
                    generation_servers: { kv_cache_config: { dtype: bf16 } }";
        DeploymentConfig::parse(yaml, "c.yaml").unwrap();
    }

    #[test]
    fn speculative_config_is_ngram_decoding_with_its_limits() {
        let yaml = "generation_servers: { speculative_config: { decoding_type: NGram, \
                    max_draft_len: 5, max_matching_ngram_size: 3 } }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let speculative = config
            .generation_servers
            .speculative_config
            .clone()
            .unwrap();
        assert_eq!(speculative.max_draft_len, 5);
        assert_eq!(speculative.max_matching_ngram_size, Some(3));
        assert!(config.ignored_keys().is_empty());
        for (yaml, key) in [
            (
                "decoding_type: Eagle, max_draft_len: 3",
                "generation_servers.speculative_config.decoding_type",
            ),
            (
                "decoding_type: NGram, max_draft_len: 0",
                "generation_servers.speculative_config.max_draft_len",
            ),
            (
                "decoding_type: NGram, max_draft_len: 4, min_matching_ngram_size: 5",
                "generation_servers.speculative_config.min_matching_ngram_size",
            ),
        ] {
            let yaml = format!("generation_servers: {{ speculative_config: {{ {yaml} }} }}");
            let err = DeploymentConfig::parse(&yaml, "c.yaml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
        let unknown = "generation_servers: { speculative_config: { decoding_type: NGram, \
                       max_draft_len: 4, speculative_model: x } }";
        let err = DeploymentConfig::parse(unknown, "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("speculative_model"), "{err}");
    }

    #[test]
    fn quant_activation_bits_is_a_group_key_of_8_or_16() {
        let yaml = "context_servers: { quant_activation_bits: 8 }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        assert_eq!(config.context_servers.quant_activation_bits, Some(8));
        assert_eq!(config.generation_servers.quant_activation_bits, None);
        assert!(config.ignored_keys().is_empty());
        let err =
            DeploymentConfig::parse("generation_servers: { quant_activation_bits: 4 }", "c.yaml")
                .unwrap_err()
                .to_string();
        assert!(err.contains("quant_activation_bits"), "{err}");
        assert!(err.contains("8 or 16"), "{err}");
    }

    #[test]
    fn cuda_graphs_is_a_group_key() {
        let yaml = "generation_servers: { device: \"cuda:0\", cuda_graphs: false }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        assert_eq!(config.generation_servers.cuda_graphs, Some(false));
        assert_eq!(config.context_servers.cuda_graphs, None);
        assert!(
            config.ignored_keys().is_empty(),
            "{:?}",
            config.ignored_keys()
        );
        let err = DeploymentConfig::parse("context_servers: { cuda_graphs: sometimes }", "c.yaml")
            .unwrap_err();
        assert!(err.to_string().contains("c.yaml"), "{err}");
    }

    #[test]
    fn mps_sm_percent_is_a_group_key_of_1_to_100() {
        let yaml = "context_servers: { device: \"cuda:0\", mps_sm_percent: 60 }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        assert_eq!(config.context_servers.mps_sm_percent, Some(60));
        assert_eq!(config.generation_servers.mps_sm_percent, None);
        for bad in ["0", "101"] {
            let yaml = format!("generation_servers: {{ mps_sm_percent: {bad} }}");
            let err = DeploymentConfig::parse(&yaml, "c.yaml").unwrap_err();
            assert!(
                err.to_string()
                    .contains("generation_servers.mps_sm_percent"),
                "{err}"
            );
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "context_servers: { tensor_parallel_size: 0 }",
                "context_servers.tensor_parallel_size",
            ),
            (
                "generation_servers: { num_instances: 0 }",
                "generation_servers.num_instances",
            ),
            (
                "generation_servers: { num_instances: 2, device: [cpu] }",
                "generation_servers.device",
            ),
            (
                "context_servers: { device: gpu0 }",
                "context_servers.device",
            ),
            (
                "cache_transceiver_config: { backend: NIXL }",
                "cache_transceiver_config.backend",
            ),
            ("nats: { url: \"localhost:4222\" }", "nats.url"),
            (
                "router: { kv_overlap_weight: -1 }",
                "router.kv_overlap_weight",
            ),
            (
                "router: { kv_overlap_weight: .nan }",
                "router.kv_overlap_weight",
            ),
            (
                "router: { kv_overlap_weight: 1e6 }",
                "router.kv_overlap_weight",
            ),
        ];
        for (yaml, key) in cases {
            let err = DeploymentConfig::parse(yaml, "c.yaml").unwrap_err();
            assert!(err.to_string().contains(key), "{yaml}: {err}");
        }
        let weighted = DeploymentConfig::parse("router: { kv_overlap_weight: 2.5 }", "c.yaml");
        assert_eq!(weighted.unwrap().router.kv_overlap_weight, 2.5);
        let err = DeploymentConfig::parse("port: [1", "c.yaml").unwrap_err();
        assert!(err.to_string().contains("c.yaml"), "{err}");
    }

    #[test]
    fn empty_config_is_the_default_deployment() {
        let config = DeploymentConfig::parse("{}", "c.yaml").unwrap();
        assert_eq!(config, DeploymentConfig::default());
    }
}
