//! What to start: the deployment config plus the command-line overrides, turned into the
//! exact processes and arguments (`worker` per instance, one `api-server`) before anything
//! runs. Pure, so the mapping from config keys to processes is tested without processes.
//!
//! The children's arguments are the structs their binaries parse ([`WorkerArgs`],
//! [`ApiServerArgs`], in the `tandem-cli` crate), filled here and rendered by their `to_args`:
//! a flag renamed there is renamed here.
//!
//! The worker roles come from [`group_role`], the one place that maps config groups to
//! `worker --role` values (context → `context`; generation → `decode`, or `both` when there
//! are no context workers).
//!
//! A deployment over several hosts runs one launcher per host, each starting its share
//! ([`Parts`], `tandem serve --only`): the roles still follow the whole config, so a host
//! starting only the generation group of a config with context workers starts `decode`
//! workers.

use std::path::PathBuf;

use anyhow::bail;

use tandem_cli::args::{ApiServerArgs, WorkerArgs};
use tandem_protocol::config::{
    CacheTransceiverConfig, DeploymentConfig, RouterPolicy, ServerGroupConfig,
};
use tandem_protocol::messages::WorkerRole;

/// The two worker groups of a deployment config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// `context_servers`: prefill.
    Context,
    /// `generation_servers`: decode.
    Generation,
}

impl Group {
    /// The group's key in the deployment config.
    fn config_key(self) -> &'static str {
        match self {
            Group::Context => "context_servers",
            Group::Generation => "generation_servers",
        }
    }
}

/// The launcher-side name of instance `i` of a role (`worker-0` for aggregated workers).
/// How much lower CPU decode workers run than the CPU context workers beside them (Linux
/// `nice`): the scheduler then gives a prefill about 60% of contended cores, the decode steps
/// the rest. Measured on 2 cores (`tandem bench` 256/64 at concurrency 16, docs/benchmarks.md):
/// 5 (decode a third of a prefill's weight) made the bf16 default's inter-token latency p50
/// 56 ms for 6% more output than 2 (22 ms); 2 keeps both the bf16 and the GGUF-block models
/// under 50 ms.
pub const CPU_DECODE_NICE: u8 = 2;

/// The thread pools (and priorities) of the CPU workers started on this host, which share its
/// `cores`. Workers of one role split the cores among themselves. Context and decode workers
/// of a disaggregated deployment each take all of their role's share, since a request's
/// prefill and its decode come one after the other: one alone (a single request) runs on every
/// core, and under load the decode workers yield to the prefills ([`CPU_DECODE_NICE`]), since
/// a decode step of a few sequences would take the cores for little work while prompts queue,
/// and every queued prompt joins the decode batch once prefilled. Aggregated workers (role
/// `both`) beside others split the cores with all of them.
fn share_cpu_cores(workers: &mut [WorkerSpec], cores: usize) {
    let on_cpu = |w: &&mut WorkerSpec| w.device() == "cpu";
    let count = |role| {
        workers
            .iter()
            .filter(|w| w.device() == "cpu" && w.role() == role)
            .count()
    };
    let (context, decode, both) = (
        count(WorkerRole::Context),
        count(WorkerRole::Decode),
        count(WorkerRole::Both),
    );
    if both == 0 && context > 0 && decode > 0 {
        for worker in workers.iter_mut().filter(on_cpu) {
            if worker.role() == WorkerRole::Decode {
                worker.args.threads = (cores / decode).max(1);
                worker.args.nice = CPU_DECODE_NICE;
            } else {
                worker.args.threads = (cores / context).max(1);
            }
        }
    } else if context + decode + both > 1 {
        let threads = (cores / (context + decode + both)).max(1);
        for worker in workers.iter_mut().filter(on_cpu) {
            worker.args.threads = threads;
        }
    }
}

fn instance_name(role: WorkerRole, i: usize) -> String {
    match role {
        WorkerRole::Both => format!("worker-{i}"),
        WorkerRole::Context => format!("context-{i}"),
        WorkerRole::Decode => format!("decode-{i}"),
    }
}

/// The role the workers of `group` run.
///
/// Context workers prefill and hand the KV cache over; generation workers then decode
/// (`decode` workers also prefill locally when no context worker takes a job, or a pull
/// fails). With no context workers, generation workers do both in one process.
pub fn group_role(group: Group, context_instances: usize) -> WorkerRole {
    match group {
        Group::Context => WorkerRole::Context,
        Group::Generation if context_instances == 0 => WorkerRole::Both,
        Group::Generation => WorkerRole::Decode,
    }
}

/// A part of a deployment that one launcher can start (`tandem serve --only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The context workers (`context_servers`).
    Context,
    /// The generation workers (`generation_servers`).
    Generation,
    /// Both worker groups.
    Workers,
    /// The api-server.
    ApiServer,
}

/// What this launcher starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub context: bool,
    pub generation: bool,
    pub api_server: bool,
}

impl Default for Parts {
    /// Everything: the whole deployment on this host.
    fn default() -> Self {
        Parts {
            context: true,
            generation: true,
            api_server: true,
        }
    }
}

impl Parts {
    /// The parts named by `--only`; none named means everything.
    pub fn only(parts: &[Part]) -> Parts {
        if parts.is_empty() {
            return Parts::default();
        }
        let has = |part: Part| {
            parts.contains(&part) || (part != Part::ApiServer && parts.contains(&Part::Workers))
        };
        Parts {
            context: has(Part::Context),
            generation: has(Part::Generation),
            api_server: has(Part::ApiServer),
        }
    }

    fn everything(self) -> bool {
        self == Parts::default()
    }

    /// `context,api-server`, as `--only` spells it.
    fn describe(self) -> String {
        let mut names = Vec::new();
        for (on, name) in [
            (self.context, "context"),
            (self.generation, "generation"),
            (self.api_server, "api-server"),
        ] {
            if on {
                names.push(name);
            }
        }
        names.join(",")
    }
}

/// One `worker` process.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSpec {
    /// Launcher-side name (`worker-0`), the prefix of its output lines.
    pub name: String,
    /// Its flags, all but `--nats`: the NATS URL is known once NATS runs
    /// ([`Plan::worker_args`]).
    pub args: WorkerArgs,
    /// Environment variables of its process beyond the launcher's own (the group's
    /// `mps_sm_percent` as `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`).
    pub env: Vec<(String, String)>,
}

impl WorkerSpec {
    pub fn role(&self) -> WorkerRole {
        self.args
            .role
            .expect("the plan gives every worker its role")
    }

    pub fn device(&self) -> &str {
        &self.args.device
    }
}

/// The CUDA MPS client's share of the SMs, in percent (a group's `mps_sm_percent`).
pub const MPS_PERCENT_VAR: &str = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE";

/// Where the workers' KV secret comes from (context workers sign KV handles with it, decode
/// workers check them; docs/security.md). Every worker that exchanges K/V with another must
/// hold the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvSecretSource {
    /// The config's `kv_secret_file`: each worker gets `--kv-secret-file` (a path, no secret).
    File(PathBuf),
    /// The launcher's environment names one (`TANDEM_KV_SECRET` or `TANDEM_KV_SECRET_FILE`):
    /// the workers inherit it.
    Environment,
    /// A fresh random secret per deployment, made at start and handed to the workers in
    /// their environment: a deployment started whole by this launcher.
    Generated,
    /// This launcher starts no worker (`--only api-server`).
    NotNeeded,
}

/// Everything `tandem serve` starts, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub model: PathBuf,
    pub served_name: String,
    /// Address the api-server binds.
    pub host: String,
    pub port: u16,
    /// An existing NATS server; `None` starts one.
    pub external_nats: Option<String>,
    pub workers: Vec<WorkerSpec>,
    /// Whether this launcher starts the api-server (not when `--only` leaves it to another
    /// host).
    pub api_server: bool,
    pub router_policy: RouterPolicy,
    pub worker_timeout_ms: u64,
    /// Prompts shorter than this are prefilled by the decode worker itself.
    pub max_local_prefill_length: usize,
    /// `router.kv_overlap_weight`.
    pub kv_overlap_weight: f64,
    /// The api-server's API keys (config `api_keys`), passed in its environment.
    pub api_keys: Vec<tandem_cli::args::ApiKey>,
    /// The config's `api_key_file`, passed as `--api-key-file`.
    pub api_key_file: Option<PathBuf>,
    pub metrics_require_key: bool,
    /// The config's `cache_salt_by_api_key`.
    pub cache_salt_by_api_key: bool,
    /// The config's `max_pending_requests` (absent: the api-server's default).
    pub max_pending_requests: Option<usize>,
    /// The config's `migration_limit` (absent: the api-server's default).
    pub migration_limit: Option<u32>,
    /// The config's `response_store_mib` (absent: the api-server's default).
    pub response_store_mib: Option<usize>,
    /// The config's `tool_call_parser` (absent: the api-server's default, `auto`).
    pub tool_call_parser: Option<tandem_protocol::config::ToolCallParser>,
    /// The config's `reasoning_parser` (absent: none).
    pub reasoning_parser: Option<tandem_protocol::config::ReasoningParser>,
    /// The config's `generation_config` (absent: the api-server's default, `auto`).
    pub generation_config: Option<tandem_protocol::config::GenerationConfigSource>,
    /// The workers' KV secret.
    pub kv_secret: KvSecretSource,
    /// Things the operator should know (keys without effect, groups not started).
    pub warnings: Vec<String>,
}

/// Command-line values that override the config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub served_model_name: Option<String>,
    pub nats: Option<String>,
    /// What this launcher starts (`--only`).
    pub parts: Parts,
    /// The launcher's environment holds a KV secret (`TANDEM_KV_SECRET` or
    /// `TANDEM_KV_SECRET_FILE`), which its workers inherit.
    pub kv_secret_in_env: bool,
}

/// The config's `lora_modules`, checked before anything starts: distinct names, none the
/// served model's, each directory holding an adapter. (Whether the model and device serve
/// them, each worker says as it loads.)
fn check_lora_modules(
    config: &DeploymentConfig,
    served_name: &str,
) -> anyhow::Result<Vec<tandem_protocol::config::LoraModule>> {
    let modules = &config.lora_modules;
    for (i, module) in modules.iter().enumerate() {
        let key = format!("lora_modules[{i}]");
        if let Err(why) = tandem_protocol::config::LoraModule::check_name(&module.name) {
            bail!("config key `{key}.name`: {why}");
        }
        if module.name == served_name {
            bail!(
                "config key `{key}.name`: `{}` is the served model's name; an adapter needs a \
                 name of its own",
                module.name
            );
        }
        if modules[..i].iter().any(|m| m.name == module.name) {
            bail!("config key `{key}.name`: `{}` is given twice", module.name);
        }
        let adapter_config = module.path.join(tandem_model::lora::ADAPTER_CONFIG_FILE);
        if !adapter_config.is_file() {
            bail!(
                "config key `{key}.path`: {} holds no {} (a PEFT LoRA adapter directory)",
                module.path.display(),
                tandem_model::lora::ADAPTER_CONFIG_FILE
            );
        }
    }
    Ok(modules.clone())
}

/// Builds the plan. `config` is `None` when no file was given: then the defaults of the config
/// schema, one context and one decode worker on the CPU (disaggregated, as DESIGN.md fixes). `model` is already resolved (flag, config or default model); `model_name` is the
/// served name used when neither the flag nor the config names one (else the directory's
/// name). `cores` sizes the CPU workers' thread pools.
///
/// Fails when `overrides.parts` is part of a deployment with no NATS server to share with
/// the other hosts, starts nothing, or starts workers without a KV secret they can share with
/// the other hosts' workers.
pub fn plan(
    config: Option<&DeploymentConfig>,
    model: PathBuf,
    model_name: Option<&str>,
    overrides: &Overrides,
    cores: usize,
) -> anyhow::Result<Plan> {
    let defaults = DeploymentConfig::default();
    let config = config.unwrap_or(&defaults);
    let mut warnings = Vec::new();
    for key in config.ignored_keys() {
        warnings.push(format!("config key `{key}` is not used by tandem; ignored"));
    }

    let served_name = overrides
        .served_model_name
        .clone()
        .or_else(|| config.served_model_name.clone())
        .or_else(|| model_name.map(str::to_string))
        .unwrap_or_else(|| tandem_protocol::subjects::default_served_name(&model));

    let lora_modules = check_lora_modules(config, &served_name)?;
    let context_instances = config.context_servers.instances();
    let mut workers = Vec::new();
    let parts = overrides.parts;
    for (group, started, group_config, instances) in [
        (
            Group::Context,
            parts.context,
            &config.context_servers,
            context_instances,
        ),
        (
            Group::Generation,
            parts.generation,
            &config.generation_servers,
            config.generation_servers.instances(),
        ),
    ] {
        if instances == 0 || !started {
            continue;
        }
        let role = group_role(group, context_instances);
        let args = group_args(role, group_config, config.transceiver_for(group_config));
        for i in 0..instances {
            let device = group_config.device_of(i).to_string();
            let mut env = Vec::new();
            if let Some(percent) = group_config.mps_sm_percent {
                if device == "cpu" {
                    warnings.push(format!(
                        "`{}.mps_sm_percent` has no effect on the CPU worker {}",
                        group.config_key(),
                        instance_name(role, i)
                    ));
                } else {
                    env.push((MPS_PERCENT_VAR.to_string(), percent.to_string()));
                }
            }
            workers.push(WorkerSpec {
                name: instance_name(role, i),
                args: WorkerArgs {
                    model: Some(model.clone()),
                    served_model_name: Some(served_name.clone()),
                    lora_modules: lora_modules.clone(),
                    device,
                    ..args.clone()
                },
                env,
            });
        }
    }

    // One KV block size for the whole deployment, since context and decode workers hand K/V
    // over in blocks: where a group leaves it unset, the GPU size if any worker of the config
    // (started here or not: `--only` launchers of one config must agree) is on a GPU.
    let any_gpu = [&config.context_servers, &config.generation_servers]
        .into_iter()
        .any(|group| (0..group.instances()).any(|i| group.device_of(i) != "cpu"));
    for worker in &mut workers {
        worker.args.block_size = Some(worker.args.block_size_on(any_gpu));
    }

    // One KV element type for the deployment, since context workers hand K/V to decode
    // workers as it lies in their caches: a group that leaves it unset takes the other's
    // (the config's validation refuses two that differ).
    let dtypes = [&config.context_servers, &config.generation_servers]
        .map(|group| group.kv_cache_config.dtype);
    if let [Some(dtype), None] | [None, Some(dtype)] = dtypes {
        for worker in &mut workers {
            worker.args.kv_cache_dtype = dtype;
        }
    }

    share_cpu_cores(&mut workers, cores);
    // Heartbeats well inside the api-server's timeout, so one late beat never drops a worker.
    let heartbeat_ms = (config.router.worker_timeout_ms / 3).clamp(50, 1000);
    for worker in &mut workers {
        worker.args.heartbeat_ms = heartbeat_ms;
    }

    let external_nats = overrides.nats.clone().or_else(|| config.nats.url.clone());
    if !parts.everything() {
        let only = parts.describe();
        if external_nats.is_none() {
            bail!(
                "--only {only} starts part of a deployment, whose other parts run elsewhere: \
                 give the NATS server they share with --nats URL or the config's nats.url"
            );
        }
        if workers.is_empty() && !parts.api_server {
            bail!(
                "--only {only} starts nothing: the config has no instances in that group \
                 (context_servers / generation_servers num_instances)"
            );
        }
    }
    let kv_secret = kv_secret_source(config, overrides, !workers.is_empty())?;
    if config.cache_salt_by_api_key && config.api_keys.0.is_empty() && config.api_key_file.is_none()
    {
        bail!(
            "config key `cache_salt_by_api_key` salts the prefix caches by API key, and the \
             config has none: set `api_keys` or `api_key_file`, or leave it out"
        );
    }

    Ok(Plan {
        model,
        served_name,
        host: overrides
            .host
            .clone()
            .unwrap_or_else(|| config.hostname.clone()),
        port: overrides.port.unwrap_or(config.port),
        external_nats,
        workers,
        api_server: parts.api_server,
        router_policy: config.router.policy,
        worker_timeout_ms: config.router.worker_timeout_ms,
        max_local_prefill_length: config.router.max_local_prefill_length,
        kv_overlap_weight: config.router.kv_overlap_weight,
        api_keys: config
            .api_keys
            .0
            .iter()
            .map(|k| tandem_cli::args::ApiKey::parse(k))
            .collect::<Result<_, _>>()
            .map_err(|reason| anyhow::anyhow!("config key `api_keys`: {reason}"))?,
        api_key_file: config.api_key_file.as_ref().map(PathBuf::from),
        metrics_require_key: config.metrics_require_key,
        cache_salt_by_api_key: config.cache_salt_by_api_key,
        max_pending_requests: config.max_pending_requests,
        migration_limit: config.migration_limit,
        response_store_mib: config.response_store_mib,
        tool_call_parser: config.tool_call_parser,
        reasoning_parser: config.reasoning_parser,
        generation_config: config.generation_config.clone(),
        kv_secret,
        warnings,
    })
}

/// Where the workers' KV secret comes from: the config's `kv_secret_file`, else the
/// launcher's environment, else a fresh one, which only a launcher starting the whole
/// deployment can make: with `--only`, other hosts' workers exchange K/V with these, and a
/// secret of this launcher's own would make them refuse each other's handles.
fn kv_secret_source(
    config: &DeploymentConfig,
    overrides: &Overrides,
    starts_workers: bool,
) -> anyhow::Result<KvSecretSource> {
    if !starts_workers {
        return Ok(KvSecretSource::NotNeeded);
    }
    if let Some(file) = &config.kv_secret_file {
        return Ok(KvSecretSource::File(PathBuf::from(file)));
    }
    if overrides.kv_secret_in_env {
        return Ok(KvSecretSource::Environment);
    }
    if !overrides.parts.everything() {
        bail!(
            "--only {} starts workers of a deployment whose other workers run elsewhere, and \
             they must all hold the same KV secret (context workers sign KV handles with it, \
             decode workers check them): put one secret of at least 32 bytes in a file on \
             every host (e.g. `openssl rand -hex 32 > /etc/tandem/kv-secret`, mode 600) and \
             name it in the config's kv_secret_file, or set TANDEM_KV_SECRET_FILE",
            overrides.parts.describe()
        );
    }
    Ok(KvSecretSource::Generated)
}

/// The flags of a group's workers: their role, and the group's scheduler, KV cache, GPU and
/// (context and decode workers) KV transfer keys; the rest at the worker's defaults.
fn group_args(
    role: WorkerRole,
    group: &ServerGroupConfig,
    transceiver: &CacheTransceiverConfig,
) -> WorkerArgs {
    let defaults = WorkerArgs::default();
    let mut args = WorkerArgs {
        role: Some(role),
        kv_cache_tokens: group.kv_cache_config.max_tokens,
        block_size: group.kv_cache_config.block_size,
        kv_cache_dtype: group.kv_cache_config.dtype.unwrap_or_default(),
        tensor_parallel: group.tensor_parallel_size.unwrap_or(1),
        max_num_seqs: group.max_batch_size.unwrap_or(defaults.max_num_seqs),
        max_queued_requests: group.max_queued_requests,
        max_num_batched_tokens: group
            .max_num_tokens
            .unwrap_or(defaults.max_num_batched_tokens),
        growth_reserve_tokens: group
            .growth_reserve_tokens
            .unwrap_or(defaults.growth_reserve_tokens),
        prefix_caching: group
            .kv_cache_config
            .enable_block_reuse
            .unwrap_or(defaults.prefix_caching),
        // The worker uses it on a GPU only.
        gpu_memory_fraction: group
            .kv_cache_config
            .free_gpu_memory_fraction
            .unwrap_or(defaults.gpu_memory_fraction),
        quant_activation_bits: group
            .quant_activation_bits
            .unwrap_or(defaults.quant_activation_bits),
        speculation: match &group.speculative_config {
            Some(config) => {
                let max_match = config
                    .max_matching_ngram_size
                    .unwrap_or(defaults.speculation.ngram_max_match);
                tandem_cli::args::SpeculationArgs {
                    ngram_draft_tokens: config.max_draft_len,
                    ngram_max_match: max_match,
                    ngram_min_match: config
                        .min_matching_ngram_size
                        .unwrap_or(defaults.speculation.ngram_min_match.min(max_match)),
                }
            }
            None => defaults.speculation,
        },
        ..defaults
    };
    args.gpu.cuda_graphs = group.cuda_graphs;
    // Context and decode workers move K/V through their transfer pools (host memory for
    // UCX, device memory for CUDA IPC on GPU workers).
    if role != WorkerRole::Both {
        args.kv_transfer_pool_mb = transceiver.transfer_pool_mb;
        args.cuda_ipc_pool_mb = transceiver.cuda_ipc_pool_mb;
    }
    // Only a context worker holds K/V for others to pull.
    if role == WorkerRole::Context {
        if let Some(tokens) = transceiver.max_tokens_in_buffer {
            args.max_tokens_in_buffer = tokens;
        }
        if let Some(ms) = transceiver.kv_transfer_timeout_ms {
            args.kv_transfer_timeout_ms = ms;
        }
    }
    args
}

impl Plan {
    /// `worker` arguments for one instance, joining NATS at `nats_url` (and reading the
    /// config's `kv_secret_file`, if it names one).
    pub fn worker_args(&self, worker: &WorkerSpec, nats_url: &str) -> WorkerArgs {
        let kv_secret_file = match &self.kv_secret {
            KvSecretSource::File(path) => Some(path.clone()),
            _ => worker.args.kv_secret_file.clone(),
        };
        WorkerArgs {
            nats: nats_url.to_string(),
            kv_secret_file,
            ..worker.args.clone()
        }
    }

    /// `api-server` arguments, joining NATS at `nats_url`.
    pub fn api_server_args(&self, nats_url: &str) -> ApiServerArgs {
        ApiServerArgs {
            served_model_name: Some(self.served_name.clone()),
            host: self.host.clone(),
            port: self.port,
            nats: nats_url.to_string(),
            router_policy: self.router_policy,
            worker_timeout_ms: self.worker_timeout_ms,
            max_local_prefill_length: self.max_local_prefill_length,
            router_kv_overlap_weight: self.kv_overlap_weight,
            api_keys: self.api_keys.clone(),
            api_key_file: self.api_key_file.clone(),
            metrics_require_key: self.metrics_require_key,
            cache_salt_by_api_key: self.cache_salt_by_api_key,
            max_pending_requests: self
                .max_pending_requests
                .unwrap_or(tandem_cli::args::DEFAULT_MAX_PENDING_REQUESTS),
            migration_limit: self
                .migration_limit
                .unwrap_or(tandem_cli::args::DEFAULT_MIGRATION_LIMIT),
            response_store_mib: self
                .response_store_mib
                .unwrap_or(tandem_cli::args::DEFAULT_RESPONSE_STORE_MIB),
            tool_call_parser: self.tool_call_parser.unwrap_or_default(),
            reasoning_parser: self.reasoning_parser.unwrap_or_default(),
            generation_config: self.generation_config.clone().unwrap_or_default(),
            ..ApiServerArgs::new(self.model.clone())
        }
    }

    /// Workers to wait for: (context, generation) — generation being `both` or `decode`.
    pub fn expected_workers(&self) -> (usize, usize) {
        let context = self
            .workers
            .iter()
            .filter(|w| w.role() == WorkerRole::Context)
            .count();
        (context, self.workers.len() - context)
    }

    /// `1 worker`, `2 workers`, `2 context + 1 decode workers`, `no workers`.
    pub fn describe_workers(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        match self.expected_workers() {
            (0, 0) => "no workers".to_string(),
            (0, n) => format!("{n} worker{}", plural(n)),
            (context, decode) => {
                format!(
                    "{context} context + {decode} decode worker{}",
                    plural(context + decode)
                )
            }
        }
    }

    /// Where a client on this host reaches the api-server (a wildcard bind address is
    /// reached through loopback).
    pub fn client_host(&self) -> &str {
        match self.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1",
            "::" | "[::]" => "::1",
            host => host,
        }
    }

    /// The OpenAI base URL, for the ready line.
    pub fn base_url(&self) -> String {
        let host = self.client_host();
        if host.contains(':') {
            format!("http://[{host}]:{}/v1", self.port)
        } else {
            format!("http://{host}:{}/v1", self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(plan: &Plan, worker: usize) -> Vec<String> {
        plan.worker_args(&plan.workers[worker], "nats://n:1")
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn no_config_is_one_context_and_one_decode_worker_on_cpu() {
        let plan = plan(None, "/m/smol".into(), None, &Overrides::default(), 8).unwrap();
        let roles: Vec<_> = plan
            .workers
            .iter()
            .map(|w| (w.name.as_str(), w.role()))
            .collect();
        assert_eq!(
            roles,
            [
                ("context-0", WorkerRole::Context),
                ("decode-0", WorkerRole::Decode)
            ]
        );
        assert!(plan.workers.iter().all(|w| w.device() == "cpu"));
        assert_eq!(plan.served_name, "smol");
        assert_eq!(plan.port, 8000);
        assert_eq!(plan.external_nats, None);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        let args = args_of(&plan, 1);
        assert_eq!(
            args[..10],
            [
                "--role",
                "decode",
                "--model",
                "/m/smol",
                "--nats",
                "nats://n:1",
                "--device",
                "cpu",
                "--served-model-name",
                "smol"
            ]
        );
        // The context and the decode worker each take every core, the decode worker at a
        // lower priority.
        let flag = |args: &[String], name: &str| {
            let at = args.iter().position(|a| a == name);
            at.map(|i| args[i + 1].clone())
        };
        assert_eq!(flag(&args, "--threads").as_deref(), Some("8"), "{args:?}");
        assert_eq!(flag(&args, "--nice").as_deref(), Some("2"), "{args:?}");
        let context = args_of(&plan, 0);
        assert_eq!(flag(&context, "--threads").as_deref(), Some("8"));
        assert_eq!(flag(&context, "--nice").as_deref(), Some("0"));
        assert_eq!(plan.describe_workers(), "1 context + 1 decode workers");
        let api: Vec<String> = plan
            .api_server_args("nats://n:1")
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let at = api.iter().position(|a| a == "--max-local-prefill-length");
        assert_eq!(at.map(|i| api[i + 1].as_str()), Some("0"), "{api:?}");
    }

    #[test]
    fn a_deployment_gets_one_block_size_the_gpu_one_if_any_worker_is_on_a_gpu() {
        let blocks = |yaml: &str| {
            let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
            let plan = plan(Some(&config), "/m".into(), None, &Overrides::default(), 8).unwrap();
            plan.workers
                .iter()
                .map(|w| w.args.block_size)
                .collect::<Vec<_>>()
        };
        assert_eq!(blocks("port: 1"), [Some(16), Some(16)]);
        // A CPU context worker hands K/V to a GPU decode worker: both take the GPU's size.
        assert_eq!(
            blocks("generation_servers: { device: \"cuda:0\" }"),
            [Some(64), Some(64)]
        );
        // A group's own size stays; the other group takes the default.
        assert_eq!(
            blocks(
                "generation_servers: { device: \"cuda:0\", kv_cache_config: { block_size: 32 } }"
            ),
            [Some(64), Some(32)]
        );
    }

    #[test]
    fn a_kv_cache_dtype_set_on_one_group_is_the_deployments() {
        let dtypes = |yaml: &str| {
            let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
            let plan = plan(Some(&config), "/m".into(), None, &Overrides::default(), 8).unwrap();
            plan.workers
                .iter()
                .map(|w| (w.args.role, w.args.kv_cache_dtype.as_str()))
                .collect::<Vec<_>>()
        };
        use tandem_protocol::messages::WorkerRole::{Context, Decode};
        assert_eq!(
            dtypes("context_servers: { kv_cache_config: { dtype: fp8 } }"),
            [(Some(Context), "fp8"), (Some(Decode), "fp8")]
        );
        assert_eq!(
            dtypes("port: 1"),
            [(Some(Context), "auto"), (Some(Decode), "auto")]
        );
        // The flag reaches the workers' command lines.
        let config = DeploymentConfig::parse(
            "generation_servers: { kv_cache_config: { dtype: fp8 } }",
            "c.yaml",
        )
        .unwrap();
        let plan = plan(Some(&config), "/m".into(), None, &Overrides::default(), 8).unwrap();
        let argv: Vec<String> = plan.workers[0]
            .args
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let at = argv.iter().position(|a| a == "--kv-cache-dtype").unwrap();
        assert_eq!(argv[at + 1], "fp8");
    }

    #[test]
    fn the_default_models_name_yields_to_the_flag_and_config() {
        let name = |config: Option<&DeploymentConfig>, flag: Option<&str>| {
            let overrides = Overrides {
                served_model_name: flag.map(str::to_string),
                ..Overrides::default()
            };
            plan(config, "/cache/link".into(), Some("Default"), &overrides, 1)
                .unwrap()
                .served_name
        };
        assert_eq!(name(None, None), "Default");
        assert_eq!(name(None, Some("flag")), "flag");
        let config = DeploymentConfig::parse("served_model_name: cfg", "c.yaml").unwrap();
        assert_eq!(name(Some(&config), None), "cfg");
    }

    #[test]
    fn lora_modules_reach_every_worker_and_are_checked_first() {
        let dir = std::env::temp_dir().join(format!("tandem-plan-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        let planned = |yaml: &str| {
            let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
            plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 4)
        };
        let ok = planned(&format!(
            "served_model_name: base\nlora_modules: [{{name: sql, path: {}}}]",
            dir.display()
        ))
        .unwrap();
        assert_eq!(ok.workers.len(), 2);
        for worker in &ok.workers {
            let argv: Vec<String> = worker
                .args
                .to_args()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect();
            let at = argv.iter().position(|a| a == "--lora-modules").unwrap();
            assert_eq!(argv[at + 1], format!("sql={}", dir.display()));
        }
        for (yaml, says) in [
            (
                format!(
                    "served_model_name: base\nlora_modules: [{{name: base, path: {}}}]",
                    dir.display()
                ),
                "served model's name",
            ),
            (
                format!(
                    "lora_modules: [{{name: a, path: {0}}}, {{name: a, path: {0}}}]",
                    dir.display()
                ),
                "given twice",
            ),
            (
                "lora_modules: [{name: a, path: /nonexistent/adapter}]".to_string(),
                "lora_modules[0].path",
            ),
        ] {
            let err = planned(&yaml).unwrap_err().to_string();
            assert!(err.contains(says), "{yaml}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn salting_by_api_key_needs_keys_and_reaches_the_api_server() {
        let planned = |yaml: &str| {
            let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
            plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 4)
        };
        let refused = planned("cache_salt_by_api_key: true")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("cache_salt_by_api_key"), "{refused}");
        let keyed = planned("cache_salt_by_api_key: true\napi_keys: [\"sk-a-123456\"]").unwrap();
        let args = keyed.api_server_args("nats://n:4222").to_args();
        assert!(
            args.iter().any(|a| a == "--cache-salt-by-api-key"),
            "{args:?}"
        );
        let unsalted = planned("api_keys: [\"sk-a-123456\"]").unwrap();
        let args = unsalted.api_server_args("nats://n:4222").to_args();
        assert!(
            !args.iter().any(|a| a == "--cache-salt-by-api-key"),
            "{args:?}"
        );
    }

    #[test]
    fn context_servers_make_the_generation_workers_decode() {
        let config = DeploymentConfig::parse(
            "context_servers: { num_instances: 2, device: cuda:0 }\ngeneration_servers: { num_instances: 1 }",
            "c.yaml",
        )
        .unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 4).unwrap();
        let workers: Vec<(&str, WorkerRole, &str)> = plan
            .workers
            .iter()
            .map(|w| (w.name.as_str(), w.role(), w.device()))
            .collect();
        assert_eq!(
            workers,
            [
                ("context-0", WorkerRole::Context, "cuda:0"),
                ("context-1", WorkerRole::Context, "cuda:0"),
                ("decode-0", WorkerRole::Decode, "cpu"),
            ]
        );
        assert_eq!(plan.expected_workers(), (2, 1));
        assert!(args_of(&plan, 0).join(" ").starts_with("--role context"));
        assert!(args_of(&plan, 2).join(" ").starts_with("--role decode"));
        // The empty config is TensorRT-LLM's default: one context and one decode worker.
        let config = DeploymentConfig::parse("{}", "c.yaml").unwrap();
        let plan =
            super::plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 4).unwrap();
        let roles: Vec<WorkerRole> = plan.workers.iter().map(|w| w.role()).collect();
        assert_eq!(roles, [WorkerRole::Context, WorkerRole::Decode]);
    }

    #[test]
    fn generation_group_keys_become_worker_flags() {
        let yaml = r#"
served_model_name: llama
router: { policy: round_robin, worker_timeout_ms: 1500 }
context_servers: { num_instances: 0 }
generation_servers:
  num_instances: 3
  device: ["cpu", "cpu", "cuda:1"]
  max_batch_size: 8
  max_queued_requests: 20
  max_num_tokens: 256
  growth_reserve_tokens: 0
  kv_cache_config: { max_tokens: 4096, block_size: 32 }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 8).unwrap();
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        let names: Vec<&str> = plan.workers.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["worker-0", "worker-1", "worker-2"]);
        assert_eq!(plan.workers[2].device(), "cuda:1");
        let args = args_of(&plan, 0).join(" ");
        for expected in [
            "--served-model-name llama",
            "--kv-cache-tokens 4096",
            "--block-size 32",
            "--max-num-seqs 8",
            "--max-queued-requests 20",
            "--max-num-batched-tokens 256",
            "--growth-reserve-tokens 0",
            // Two CPU workers split 8 cores.
            "--threads 4",
            "--heartbeat-ms 500",
        ] {
            assert!(args.contains(expected), "{expected}: {args}");
        }
        // The GPU worker keeps the worker's default thread count.
        assert_eq!(plan.workers[2].args.threads, WorkerArgs::default().threads);
        let api: Vec<String> = plan
            .api_server_args("nats://n:1")
            .to_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let api = api.join(" ");
        assert!(api.contains("--router-policy round-robin"), "{api}");
        assert!(api.contains("--worker-timeout-ms 1500"), "{api}");
    }

    #[test]
    fn context_workers_get_the_transfer_settings() {
        let yaml = r#"
cache_transceiver_config: { max_tokens_in_buffer: 4096, kv_transfer_timeout_ms: 9000 }
context_servers: { cache_transceiver_config: { max_tokens_in_buffer: 2048 } }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let own = config.transceiver_for(&config.context_servers);
        let role = |role| WorkerArgs {
            role: Some(role),
            ..WorkerArgs::default()
        };
        let args = group_args(WorkerRole::Context, &config.context_servers, own);
        // A group's own transceiver block replaces the top-level one as a whole.
        assert_eq!(
            args,
            WorkerArgs {
                max_tokens_in_buffer: 2048,
                ..role(WorkerRole::Context)
            }
        );
        let top = config.transceiver_for(&config.generation_servers);
        let args = group_args(WorkerRole::Context, &config.generation_servers, top);
        assert_eq!(
            args,
            WorkerArgs {
                max_tokens_in_buffer: 4096,
                kv_transfer_timeout_ms: 9000,
                ..role(WorkerRole::Context)
            }
        );
        assert_eq!(
            group_args(WorkerRole::Both, &config.generation_servers, top),
            role(WorkerRole::Both)
        );
    }

    #[test]
    fn context_and_decode_workers_get_the_transfer_pool_sizes() {
        let yaml = "cache_transceiver_config: { transfer_pool_mb: 256, cuda_ipc_pool_mb: 512, \
                    max_tokens_in_buffer: 64 }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let transceiver = config.transceiver_for(&config.generation_servers);
        let args = |role| group_args(role, &config.generation_servers, transceiver);
        let pools = |role| WorkerArgs {
            role: Some(role),
            kv_transfer_pool_mb: Some(256),
            cuda_ipc_pool_mb: Some(512),
            ..WorkerArgs::default()
        };
        assert_eq!(
            args(WorkerRole::Context),
            WorkerArgs {
                max_tokens_in_buffer: 64,
                ..pools(WorkerRole::Context)
            }
        );
        assert_eq!(args(WorkerRole::Decode), pools(WorkerRole::Decode));
        assert_eq!(
            args(WorkerRole::Both),
            WorkerArgs {
                role: Some(WorkerRole::Both),
                ..WorkerArgs::default()
            }
        );
    }

    #[test]
    fn flags_override_the_config() {
        let yaml =
            "hostname: 0.0.0.0\nport: 9000\nserved_model_name: a\nnats: { url: \"nats://x:1\" }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let overrides = Overrides {
            port: Some(9100),
            served_model_name: Some("b".into()),
            nats: Some("nats://y:2".into()),
            ..Overrides::default()
        };
        let plan = plan(Some(&config), "/m/x".into(), None, &overrides, 2).unwrap();
        assert_eq!(plan.port, 9100);
        assert_eq!(plan.served_name, "b");
        assert_eq!(plan.external_nats.as_deref(), Some("nats://y:2"));
        assert_eq!(plan.base_url(), "http://127.0.0.1:9100/v1");
    }

    #[test]
    fn unused_keys_are_reported() {
        let yaml = "disable_overlap_scheduler: true";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        let warnings = plan.warnings.join("\n");
        assert!(warnings.contains("disable_overlap_scheduler"), "{warnings}");
    }

    #[test]
    fn the_gpu_memory_fraction_goes_to_the_groups_workers() {
        let yaml = r#"
context_servers: { device: "cuda:0", kv_cache_config: { free_gpu_memory_fraction: 0.3 } }
generation_servers: { device: "cuda:0", kv_cache_config: { free_gpu_memory_fraction: 0.55 } }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert!(
            args_of(&plan, 0)
                .join(" ")
                .contains("--gpu-memory-fraction 0.3")
        );
        assert!(
            args_of(&plan, 1)
                .join(" ")
                .contains("--gpu-memory-fraction 0.55")
        );
    }

    #[test]
    fn mps_sm_percent_goes_to_the_groups_gpu_workers_environment() {
        let yaml = r#"
context_servers: { device: "cuda:0", mps_sm_percent: 60 }
generation_servers: { num_instances: 2, device: ["cuda:0", "cpu"], mps_sm_percent: 40 }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        let env = |i: usize| plan.workers[i].env.clone();
        assert_eq!(env(0), [(MPS_PERCENT_VAR.to_string(), "60".to_string())]);
        assert_eq!(env(1), [(MPS_PERCENT_VAR.to_string(), "40".to_string())]);
        assert!(env(2).is_empty(), "a CPU worker gets no MPS share");
        assert_eq!(
            plan.warnings,
            ["`generation_servers.mps_sm_percent` has no effect on the CPU worker decode-1"]
        );
    }

    #[test]
    fn the_quant_activation_bits_key_goes_to_the_groups_workers() {
        let yaml = "context_servers: { quant_activation_bits: 8 }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        assert!(
            args_of(&plan, 0)
                .join(" ")
                .contains("--quant-activation-bits 8")
        );
        assert!(
            args_of(&plan, 1)
                .join(" ")
                .contains("--quant-activation-bits 16")
        );
    }

    #[test]
    fn the_speculative_config_goes_to_the_groups_workers() {
        let yaml = "generation_servers: { speculative_config: { decoding_type: NGram, \
                    max_draft_len: 6, max_matching_ngram_size: 3 } }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        let decode = args_of(&plan, 1).join(" ");
        assert!(
            decode.contains("--ngram-draft-tokens 6 --ngram-max-match 3 --ngram-min-match 2"),
            "{decode}"
        );
        let context = args_of(&plan, 0).join(" ");
        assert!(!context.contains("--ngram"), "off: no flag, {context}");
    }

    #[test]
    fn the_cuda_graphs_key_goes_to_the_groups_workers() {
        let yaml = r#"
context_servers: { device: "cuda:0", cuda_graphs: false }
generation_servers: { device: "cuda:1" }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 2).unwrap();
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(plan.workers[0].args.gpu.cuda_graphs, Some(false));
        assert!(args_of(&plan, 0).join(" ").ends_with("--cuda-graphs false"));
        // Absent: no flag, so the worker's default (or TANDEM_CUDA_GRAPHS) applies.
        assert_eq!(plan.workers[1].args.gpu.cuda_graphs, None);
        assert!(!args_of(&plan, 1).join(" ").contains("--cuda-graphs"));
    }

    #[test]
    fn the_launchers_arguments_parse_back_in_the_binaries() {
        use clap::Parser;
        #[derive(Parser)]
        struct Worker {
            #[command(flatten)]
            args: WorkerArgs,
        }
        #[derive(Parser)]
        struct ApiServer {
            #[command(flatten)]
            args: ApiServerArgs,
        }
        let yaml = r#"
router: { policy: round_robin, worker_timeout_ms: 1500, max_local_prefill_length: 16 }
tool_call_parser: llama3_json
reasoning_parser: deepseek_r1
generation_config: none
cache_transceiver_config: { max_tokens_in_buffer: 4096, transfer_pool_mb: 64 }
context_servers: { num_instances: 2, device: ["cuda:0", "cuda:1"], cuda_graphs: false }
generation_servers:
  num_instances: 2
  max_batch_size: 8
  kv_cache_config: { max_tokens: 4096, block_size: 32, free_gpu_memory_fraction: 0.5 }
"#;
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let plan = plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 8).unwrap();
        for worker in &plan.workers {
            let args = plan.worker_args(worker, "nats://n:1");
            let argv = std::iter::once("worker".into()).chain(args.to_args());
            let parsed = Worker::try_parse_from(argv).unwrap().args;
            assert_eq!(parsed, args, "{}", worker.name);
        }
        let args = plan.api_server_args("nats://n:1");
        assert_eq!(
            args.tool_call_parser,
            tandem_protocol::config::ToolCallParser::Llama3Json
        );
        assert_eq!(
            args.reasoning_parser,
            tandem_protocol::config::ReasoningParser::DeepseekR1
        );
        assert_eq!(
            args.generation_config,
            tandem_protocol::config::GenerationConfigSource::None
        );
        let argv = std::iter::once("api-server".into()).chain(args.to_args());
        let parsed = ApiServer::try_parse_from(argv).unwrap().args;
        // The timeouts the launcher leaves out come from the environment, if it sets them.
        let parsed = ApiServerArgs {
            request_timeout_ms: args.request_timeout_ms,
            accept_timeout_ms: args.accept_timeout_ms,
            first_token_timeout_ms: args.first_token_timeout_ms,
            stall_timeout_ms: args.stall_timeout_ms,
            http_workers: args.http_workers,
            ..parsed
        };
        assert_eq!(parsed, args);
    }

    /// `--only parts`, with a KV secret in the launcher's environment (as every host of
    /// such a deployment needs one: [`a_split_deployment_needs_a_shared_kv_secret`]).
    fn only(parts: &[Part], nats: Option<&str>) -> Overrides {
        Overrides {
            parts: Parts::only(parts),
            nats: nats.map(str::to_string),
            kv_secret_in_env: true,
            ..Overrides::default()
        }
    }

    #[test]
    fn only_starts_this_hosts_share() {
        let yaml =
            "context_servers: { num_instances: 2 }\ngeneration_servers: { num_instances: 3 }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let names = |parts: &[Part]| {
            let plan = plan(
                Some(&config),
                "/m/x".into(),
                None,
                &only(parts, Some("nats://n:1")),
                4,
            )
            .unwrap();
            let names: Vec<String> = plan.workers.iter().map(|w| w.name.clone()).collect();
            (names.join(" "), plan.api_server)
        };
        // The roles follow the whole config: generation workers decode, since context
        // workers exist (on another host).
        assert_eq!(
            names(&[Part::Generation]),
            ("decode-0 decode-1 decode-2".into(), false)
        );
        assert_eq!(
            names(&[Part::Context]),
            ("context-0 context-1".into(), false)
        );
        assert_eq!(
            names(&[Part::Workers]),
            (
                "context-0 context-1 decode-0 decode-1 decode-2".into(),
                false
            )
        );
        assert_eq!(names(&[Part::ApiServer]), (String::new(), true));
        assert_eq!(
            names(&[Part::ApiServer, Part::Context]),
            ("context-0 context-1".into(), true)
        );
        // Nothing named: everything.
        assert!(names(&[]).1);
        assert_eq!(names(&[]).0.split(' ').count(), 5);
        let plan = super::plan(
            Some(&config),
            "/m/x".into(),
            None,
            &only(&[Part::ApiServer], Some("nats://n:1")),
            4,
        )
        .unwrap();
        assert_eq!(plan.describe_workers(), "no workers");
        // Three CPU decode workers on this host share its cores among themselves, at the
        // normal priority (no context worker beside them).
        let plan = super::plan(
            Some(&config),
            "/m/x".into(),
            None,
            &only(&[Part::Generation], Some("nats://n:1")),
            6,
        )
        .unwrap();
        assert!(args_of(&plan, 0).join(" ").contains("--threads 2 --nice 0"));
    }

    #[test]
    fn cpu_workers_of_each_role_split_the_cores_and_decode_yields() {
        let threads_and_nice = |yaml: &str| -> Vec<(WorkerRole, usize, u8)> {
            let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
            let plan =
                super::plan(Some(&config), "/m/x".into(), None, &Overrides::default(), 8).unwrap();
            let workers = plan.workers.iter();
            workers
                .map(|w| (w.role(), w.args.threads, w.args.nice))
                .collect()
        };
        use WorkerRole::*;
        assert_eq!(
            threads_and_nice("context_servers: { num_instances: 2 }"),
            [
                (Context, 4, 0),
                (Context, 4, 0),
                (Decode, 8, CPU_DECODE_NICE)
            ]
        );
        // Aggregated workers split the cores among all; no priorities.
        assert_eq!(
            threads_and_nice(
                "context_servers: { num_instances: 0 }\ngeneration_servers: { num_instances: 2 }"
            ),
            [(Both, 4, 0), (Both, 4, 0)]
        );
        // A GPU context worker leaves the CPU decode worker every core, at normal priority.
        assert_eq!(
            threads_and_nice("context_servers: { device: cuda:0 }"),
            [(Context, 0, 0), (Decode, 0, 0)]
        );
    }

    #[test]
    fn only_needs_a_shared_nats_and_something_to_start() {
        let err = plan(None, "/m/x".into(), None, &only(&[Part::Context], None), 4).unwrap_err();
        assert!(
            err.to_string()
                .contains("--only context starts part of a deployment"),
            "{err}"
        );
        assert!(err.to_string().contains("nats.url"), "{err}");
        // The config's nats.url is as good as --nats.
        let config = DeploymentConfig::parse(
            "nats: { url: \"nats://h:4222\" }\ncontext_servers: { num_instances: 0 }",
            "c.yaml",
        )
        .unwrap();
        let err = plan(
            Some(&config),
            "/m/x".into(),
            None,
            &only(&[Part::Context], None),
            4,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("--only context starts nothing"),
            "{err}"
        );
        let plan = super::plan(
            Some(&config),
            "/m/x".into(),
            None,
            &only(&[Part::Workers], None),
            4,
        )
        .unwrap();
        assert_eq!(plan.external_nats.as_deref(), Some("nats://h:4222"));
        assert_eq!(plan.workers.len(), 1);
        assert_eq!(plan.workers[0].role(), WorkerRole::Both);
    }

    #[test]
    fn a_whole_deployment_gets_a_fresh_kv_secret_and_the_config_can_name_a_file() {
        let plan = plan(None, "/m/x".into(), None, &Overrides::default(), 4).unwrap();
        assert_eq!(plan.kv_secret, KvSecretSource::Generated);
        assert!(!args_of(&plan, 0).join(" ").contains("--kv-secret-file"));
        // One in the launcher's environment is inherited as it is.
        let inherited = Overrides {
            kv_secret_in_env: true,
            ..Overrides::default()
        };
        let plan = super::plan(None, "/m/x".into(), None, &inherited, 4).unwrap();
        assert_eq!(plan.kv_secret, KvSecretSource::Environment);
        // The config's file wins, and goes to every worker as a path (never the secret).
        let config = DeploymentConfig::parse("kv_secret_file: /run/secrets/kv", "c.yaml").unwrap();
        let plan = super::plan(Some(&config), "/m/x".into(), None, &inherited, 4).unwrap();
        assert_eq!(
            plan.kv_secret,
            KvSecretSource::File("/run/secrets/kv".into())
        );
        for worker in 0..plan.workers.len() {
            assert!(
                args_of(&plan, worker)
                    .join(" ")
                    .ends_with("--kv-secret-file /run/secrets/kv"),
                "{:?}",
                args_of(&plan, worker)
            );
        }
    }

    #[test]
    fn a_split_deployment_needs_a_shared_kv_secret() {
        let yaml = "nats: { url: \"nats://h:4222\" }";
        let config = DeploymentConfig::parse(yaml, "c.yaml").unwrap();
        let without_secret = |parts: &[Part]| Overrides {
            kv_secret_in_env: false,
            ..only(parts, None)
        };
        for parts in [&[Part::Context][..], &[Part::Generation], &[Part::Workers]] {
            let err = plan(
                Some(&config),
                "/m/x".into(),
                None,
                &without_secret(parts),
                4,
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("must all hold the same KV secret") && err.contains("kv_secret_file"),
                "{err}"
            );
        }
        // The api-server alone starts no worker: it needs none.
        let plan = super::plan(
            Some(&config),
            "/m/x".into(),
            None,
            &without_secret(&[Part::ApiServer]),
            4,
        )
        .unwrap();
        assert_eq!(plan.kv_secret, KvSecretSource::NotNeeded);
        // The same file on every host.
        let config = DeploymentConfig::parse(
            &format!("{yaml}\nkv_secret_file: /etc/tandem/kv-secret"),
            "c.yaml",
        )
        .unwrap();
        let plan = super::plan(
            Some(&config),
            "/m/x".into(),
            None,
            &without_secret(&[Part::Generation]),
            4,
        )
        .unwrap();
        assert_eq!(
            plan.kv_secret,
            KvSecretSource::File("/etc/tandem/kv-secret".into())
        );
    }
}
