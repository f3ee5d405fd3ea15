//! `api-server --model DIR --nats URL [--port P] ...`. Every flag also reads an environment
//! variable, so containers can configure the server without building argument lists.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use tandem_protocol::config::{
    DEFAULT_KV_OVERLAP_WEIGHT, GenerationConfigSource, ReasoningParser, RouterPolicy,
    ToolCallParser, check_kv_overlap_weight,
};

use super::Argv;

const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 8000;
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 600_000;
const DEFAULT_ACCEPT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_FIRST_TOKEN_TIMEOUT_MS: u64 = 120_000;
const DEFAULT_STALL_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_WORKER_TIMEOUT_MS: u64 = 3_000;
const DEFAULT_MAX_LOCAL_PREFILL_LENGTH: usize = 0;
const DEFAULT_HTTP_WORKERS: usize = 0;
/// Requests in flight at most, by default: well above what one GPU worker batches (512), well
/// below what would exhaust the api-server's memory or the bus.
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 4096;

/// Migrations of one request at most, by default (Dynamo's default too): enough to ride out
/// a worker lost and a second failure, without passing a request that kills workers around
/// the whole deployment.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;
/// MiB of stored Responses API responses an api-server keeps by default.
pub const DEFAULT_RESPONSE_STORE_MIB: usize = 256;

/// The api-server's settings.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ApiServerArgs {
    /// Model directory (config.json, tokenizer.json, tokenizer_config.json).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    /// Name served in /v1/models and expected in requests; defaults to the directory name.
    /// It also names the NATS subjects, so workers must be started with the same name.
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "TANDEM_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    #[arg(long, env = "TANDEM_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    #[arg(long, env = "TANDEM_NATS", default_value = DEFAULT_NATS)]
    pub nats: String,
    /// Longest a request may take from arrival to its last token.
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,
    /// A worker must answer a job with `Accepted` within this time, else the client gets 503.
    #[arg(long, env = "TANDEM_ACCEPT_TIMEOUT_MS", default_value_t = DEFAULT_ACCEPT_TIMEOUT_MS)]
    pub accept_timeout_ms: u64,
    /// Longest wait from `Accepted` to the first token (queueing plus prefill).
    #[arg(
        long,
        env = "TANDEM_FIRST_TOKEN_TIMEOUT_MS",
        default_value_t = DEFAULT_FIRST_TOKEN_TIMEOUT_MS
    )]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two stream messages once tokens flow.
    #[arg(long, env = "TANDEM_STALL_TIMEOUT_MS", default_value_t = DEFAULT_STALL_TIMEOUT_MS)]
    pub stall_timeout_ms: u64,
    /// A worker whose last heartbeat is older than this is considered gone.
    #[arg(long, env = "TANDEM_WORKER_TIMEOUT_MS", default_value_t = DEFAULT_WORKER_TIMEOUT_MS)]
    pub worker_timeout_ms: u64,
    #[arg(
        long,
        env = "TANDEM_ROUTER_POLICY",
        default_value = router_policy_name(RouterPolicy::default()),
        value_parser = one_of(RouterPolicy::ALL, router_policy_name)
    )]
    pub router_policy: RouterPolicy,
    /// Prompts with fewer tokens are prefilled by the generation worker itself, with no KV
    /// transfer; longer ones go to a context worker when one is live. 0 (the default)
    /// disaggregates every request it can. The config's `router.max_local_prefill_length`.
    #[arg(
        long,
        env = "TANDEM_MAX_LOCAL_PREFILL_LENGTH",
        default_value_t = DEFAULT_MAX_LOCAL_PREFILL_LENGTH
    )]
    pub max_local_prefill_length: usize,
    /// `kv_aware` routing: the weight of a prompt block a worker would have to prefill (it
    /// does not hold it cached) against a block its running work holds. Higher favours the
    /// worker holding the prompt's prefix over the less loaded one; 0 routes by held blocks
    /// alone. The config's `router.kv_overlap_weight`.
    #[arg(
        long,
        env = "TANDEM_ROUTER_KV_OVERLAP_WEIGHT",
        value_name = "W",
        default_value_t = DEFAULT_KV_OVERLAP_WEIGHT,
        value_parser = parse_kv_overlap_weight
    )]
    pub router_kv_overlap_weight: f64,
    /// HTTP worker threads (actix); 0 = one per core.
    #[arg(long, env = "TANDEM_HTTP_WORKERS", default_value_t = DEFAULT_HTTP_WORKERS)]
    pub http_workers: usize,
    /// Generation requests accepted and not yet finished, at most (streaming ones count until
    /// their stream ends). Past it, 429 with `Retry-After` and an OpenAI error body, at once:
    /// a client can retry, or try another replica, instead of waiting in an unbounded queue.
    /// 0: no bound. The config's `max_pending_requests`.
    #[arg(
        long,
        env = "TANDEM_MAX_PENDING_REQUESTS",
        default_value_t = DEFAULT_MAX_PENDING_REQUESTS
    )]
    pub max_pending_requests: usize,
    /// How often one request may move to another worker when the worker generating it dies,
    /// stops heartbeating, fails it or drops it while draining: the new worker prefills the
    /// prompt plus the tokens generated so far and the client's stream goes on with no gap
    /// and no repeat. 0: never (the client gets the error). The config's `migration_limit`.
    #[arg(
        long,
        env = "TANDEM_MIGRATION_LIMIT",
        default_value_t = DEFAULT_MIGRATION_LIMIT
    )]
    pub migration_limit: u32,
    /// Memory for stored Responses API responses (`store: true`, OpenAI's default), in MiB:
    /// what `previous_response_id`, `GET`/`DELETE /v1/responses/{id}` and its `input_items`
    /// find. Past it the least recently used responses go first (a conversation being
    /// continued counts as used). Kept in this api-server's memory, where the other
    /// api-servers of the model find them (they ask it over NATS), until it stops. 0: nothing
    /// is stored here (responses say `store: false`; the others' are still found). The
    /// config's `response_store_mib`.
    #[arg(
        long,
        env = "TANDEM_RESPONSE_STORE_MIB",
        value_name = "MIB",
        default_value_t = DEFAULT_RESPONSE_STORE_MIB
    )]
    pub response_store_mib: usize,
    /// Which markup the model writes tool calls in, parsed into OpenAI `tool_calls`: `auto`
    /// reads it from the model's chat template (`<tool_call>`: hermes, `[TOOL_CALLS]`:
    /// mistral, `<|python_tag|>`: llama3_json; a template that shows no tools gets them in its
    /// system prompt in the hermes format); `none` turns tool calling off (requests with
    /// tools are refused unless `tool_choice` is "none"). The config's `tool_call_parser`.
    #[arg(
        long,
        env = "TANDEM_TOOL_CALL_PARSER",
        default_value = ToolCallParser::default().name(),
        value_parser = one_of(ToolCallParser::ALL, ToolCallParser::name)
    )]
    pub tool_call_parser: ToolCallParser,
    /// Which reasoning markup to split out of chat replies: with `qwen3` or `deepseek_r1`
    /// (vLLM's names; both read `<think>...</think>`), the thinking a reasoning model writes
    /// before its answer is returned as the message's `reasoning` (and `reasoning_content`)
    /// and counted in `usage.completion_tokens_details.reasoning_tokens`, and tool calls are
    /// parsed from the answer only; `none` leaves it in `content`. The config's
    /// `reasoning_parser`.
    #[arg(
        long,
        env = "TANDEM_REASONING_PARSER",
        default_value = ReasoningParser::default().name(),
        value_parser = one_of(ReasoningParser::ALL, ReasoningParser::name)
    )]
    pub reasoning_parser: ReasoningParser,
    /// Where requests that omit `temperature`, `top_p`, `top_k`, `min_p` or
    /// `repetition_penalty` take them from: `auto`, the model directory's generation_config.json (as vLLM does; OpenAI's
    /// defaults where it has none); `none`, OpenAI's defaults (temperature 1, top_p 1) whatever
    /// the model says; or a directory, its generation_config.json. The config's
    /// `generation_config`.
    #[arg(
        long,
        env = "TANDEM_GENERATION_CONFIG",
        value_name = "auto|none|DIR",
        default_value = "auto",
        value_parser = GenerationConfigSource::parse
    )]
    pub generation_config: GenerationConfigSource,
    /// An API key (repeat for several; TANDEM_API_KEY takes them comma-separated). With any
    /// key set, every /v1 request must carry `Authorization: Bearer KEY`, else 401. Prefer
    /// the environment or --api-key-file: a command line is visible to every local user.
    #[arg(
        long = "api-key",
        env = "TANDEM_API_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = ApiKey::parse
    )]
    pub api_keys: Vec<ApiKey>,
    /// A file of API keys, one per line (blank lines and `#` comments skipped).
    #[arg(long, env = "TANDEM_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// With keys set, /metrics requires one too (it is open by default, like /health).
    #[arg(long, env = "TANDEM_METRICS_REQUIRE_KEY")]
    pub metrics_require_key: bool,
    /// Salts each request's prompt in the workers' prefix caches by the API key it came
    /// with, so that clients of different keys never share (or time) each other's cached
    /// prompts; a request's own `cache_salt` is added to its key's. Needs API keys.
    #[arg(long, env = "TANDEM_CACHE_SALT_BY_API_KEY")]
    pub cache_salt_by_api_key: bool,
    #[command(flatten)]
    pub nats_auth: super::NatsAuthArgs,
}

/// An API key. Its `Debug` shows no part of it, so a logged config never leaks one.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key as given: not empty, no whitespace and no comma (the separator of
    /// `TANDEM_API_KEY`).
    pub fn parse(text: &str) -> Result<ApiKey, String> {
        if text.is_empty() {
            return Err("an API key cannot be empty".into());
        }
        if text.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err("an API key cannot contain whitespace or commas".into());
        }
        Ok(ApiKey(text.to_string()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The key itself, for the one place that must pass it on (a child's environment).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiServerArgs {
    /// The defaults, serving the model in `model`: what `api-server --model DIR` runs with
    /// when no environment variable sets anything.
    pub fn new(model: PathBuf) -> Self {
        ApiServerArgs {
            model,
            served_model_name: None,
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            nats: DEFAULT_NATS.into(),
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            accept_timeout_ms: DEFAULT_ACCEPT_TIMEOUT_MS,
            first_token_timeout_ms: DEFAULT_FIRST_TOKEN_TIMEOUT_MS,
            stall_timeout_ms: DEFAULT_STALL_TIMEOUT_MS,
            worker_timeout_ms: DEFAULT_WORKER_TIMEOUT_MS,
            router_policy: RouterPolicy::default(),
            max_local_prefill_length: DEFAULT_MAX_LOCAL_PREFILL_LENGTH,
            router_kv_overlap_weight: DEFAULT_KV_OVERLAP_WEIGHT,
            http_workers: DEFAULT_HTTP_WORKERS,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            migration_limit: DEFAULT_MIGRATION_LIMIT,
            response_store_mib: DEFAULT_RESPONSE_STORE_MIB,
            tool_call_parser: ToolCallParser::default(),
            reasoning_parser: ReasoningParser::default(),
            generation_config: GenerationConfigSource::Auto,
            api_keys: Vec::new(),
            api_key_file: None,
            metrics_require_key: false,
            cache_salt_by_api_key: false,
            nats_auth: super::NatsAuthArgs::default(),
        }
    }

    /// The served name: the flag, else the model directory's last component.
    pub fn served_name(&self) -> String {
        self.served_model_name
            .clone()
            .unwrap_or_else(|| tandem_protocol::subjects::default_served_name(&self.model))
    }

    /// The arguments that make `api-server` parse back to `self`.
    ///
    /// The settings a deployment config sets (model, name, address, NATS, routing) are always
    /// given. The timeouts a config has no key for and `--http-workers` are given only when
    /// they differ from their defaults: left at them, their environment variables reach an
    /// api-server started by `tandem serve` as they reach one started by hand.
    ///
    /// API keys are never rendered (argv is visible to every local user): the launcher passes
    /// them in the child's environment ([`Self::api_keys_env`]).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut argv = Argv::default();
        argv.push("--model", &self.model);
        argv.push_some("--served-model-name", self.served_model_name.as_ref());
        argv.push("--host", &self.host);
        argv.push_display("--port", self.port);
        argv.push("--nats", &self.nats);
        for (flag, value, default) in [
            (
                "--request-timeout-ms",
                self.request_timeout_ms,
                DEFAULT_REQUEST_TIMEOUT_MS,
            ),
            (
                "--accept-timeout-ms",
                self.accept_timeout_ms,
                DEFAULT_ACCEPT_TIMEOUT_MS,
            ),
            (
                "--first-token-timeout-ms",
                self.first_token_timeout_ms,
                DEFAULT_FIRST_TOKEN_TIMEOUT_MS,
            ),
            (
                "--stall-timeout-ms",
                self.stall_timeout_ms,
                DEFAULT_STALL_TIMEOUT_MS,
            ),
        ] {
            if value != default {
                argv.push_display(flag, value);
            }
        }
        argv.push_display("--worker-timeout-ms", self.worker_timeout_ms);
        argv.push("--router-policy", router_policy_name(self.router_policy));
        argv.push_display("--max-local-prefill-length", self.max_local_prefill_length);
        if self.router_kv_overlap_weight != DEFAULT_KV_OVERLAP_WEIGHT {
            argv.push_display("--router-kv-overlap-weight", self.router_kv_overlap_weight);
        }
        if self.http_workers != DEFAULT_HTTP_WORKERS {
            argv.push_display("--http-workers", self.http_workers);
        }
        if self.max_pending_requests != DEFAULT_MAX_PENDING_REQUESTS {
            argv.push_display("--max-pending-requests", self.max_pending_requests);
        }
        if self.migration_limit != DEFAULT_MIGRATION_LIMIT {
            argv.push_display("--migration-limit", self.migration_limit);
        }
        if self.response_store_mib != DEFAULT_RESPONSE_STORE_MIB {
            argv.push_display("--response-store-mib", self.response_store_mib);
        }
        if self.tool_call_parser != ToolCallParser::default() {
            argv.push("--tool-call-parser", self.tool_call_parser.name());
        }
        if self.reasoning_parser != ReasoningParser::default() {
            argv.push("--reasoning-parser", self.reasoning_parser.name());
        }
        if self.generation_config != GenerationConfigSource::Auto {
            argv.push("--generation-config", self.generation_config.name());
        }
        argv.push_some(
            "--api-key-file",
            self.api_key_file.as_ref().map(|p| p.display()),
        );
        if self.metrics_require_key {
            argv.0.push("--metrics-require-key".into());
        }
        if self.cache_salt_by_api_key {
            argv.0.push("--cache-salt-by-api-key".into());
        }
        self.nats_auth.push_args(&mut argv);
        argv.0
    }

    /// The environment that gives a child api-server `self`'s API keys: `TANDEM_API_KEY`,
    /// comma-separated; none when there are none.
    pub fn api_keys_env(&self) -> Option<(String, String)> {
        (!self.api_keys.is_empty()).then(|| {
            let keys: Vec<&str> = self.api_keys.iter().map(ApiKey::expose).collect();
            ("TANDEM_API_KEY".to_string(), keys.join(","))
        })
    }
}

/// `--router-policy`'s name of a policy (the config file spells them with `_`).
fn router_policy_name(policy: RouterPolicy) -> &'static str {
    match policy {
        RouterPolicy::RoundRobin => "round-robin",
        RouterPolicy::LeastLoaded => "least-loaded",
        RouterPolicy::KvAware => "kv-aware",
    }
}

/// A flag's parser that takes one of `all`'s names (`name` of each) and gives the value so
/// named; `--help` lists the names.
/// `--router-kv-overlap-weight`: a finite weight from 0 to the config's maximum.
fn parse_kv_overlap_weight(text: &str) -> Result<f64, String> {
    let weight: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    check_kv_overlap_weight(weight)?;
    Ok(weight)
}

fn one_of<T, const N: usize>(
    all: [T; N],
    name: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T>
where
    T: Copy + Send + Sync + 'static,
{
    PossibleValuesParser::new(all.map(name)).map(move |given| {
        all.into_iter()
            .find(|&value| name(value) == given)
            .expect("the possible values are the values' names")
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::*;

    fn parse(argv: &[OsString]) -> ApiServerArgs {
        testing::parse("api-server", argv)
    }

    #[test]
    fn the_command_line_is_consistent() {
        testing::assert_consistent::<ApiServerArgs>("api-server");
    }

    #[test]
    fn every_flag_set_round_trips() {
        let args = ApiServerArgs {
            model: "/models/smol lm".into(),
            served_model_name: Some("smol".into()),
            host: "0.0.0.0".into(),
            port: 9100,
            nats: "nats://10.0.0.5:4222".into(),
            request_timeout_ms: 1,
            accept_timeout_ms: 2,
            first_token_timeout_ms: 3,
            stall_timeout_ms: 4,
            worker_timeout_ms: 1500,
            router_policy: RouterPolicy::RoundRobin,
            max_local_prefill_length: 64,
            router_kv_overlap_weight: 2.5,
            http_workers: 3,
            max_pending_requests: 7,
            migration_limit: 0,
            response_store_mib: 0,
            tool_call_parser: ToolCallParser::Mistral,
            reasoning_parser: ReasoningParser::Qwen3,
            generation_config: GenerationConfigSource::Dir("/etc/tandem/sampling".into()),
            api_keys: Vec::new(),
            api_key_file: Some("/run/secrets/keys".into()),
            metrics_require_key: true,
            cache_salt_by_api_key: true,
            nats_auth: super::super::NatsAuthArgs {
                nats_user: Some("front".into()),
                nats_tls_ca: Some("/etc/nats/ca.pem".into()),
                nats_tls_required: true,
                ..Default::default()
            },
        };
        assert_eq!(parse(&args.to_args()), args);
        for router_policy in RouterPolicy::ALL {
            let args = ApiServerArgs {
                router_policy,
                ..args.clone()
            };
            assert_eq!(parse(&args.to_args()), args);
        }
        for generation_config in [GenerationConfigSource::Auto, GenerationConfigSource::None] {
            let args = ApiServerArgs {
                generation_config,
                ..args.clone()
            };
            assert_eq!(parse(&args.to_args()), args);
        }
    }

    #[test]
    fn a_launcher_filled_api_server_round_trips() {
        // As `tandem serve` fills it for the default deployment.
        let args = ApiServerArgs {
            served_model_name: Some("smol".into()),
            nats: "nats://127.0.0.1:40123".into(),
            ..ApiServerArgs::new("/m/smol".into())
        };
        let argv = args.to_args();
        let text: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            text.join(" "),
            "--model /m/smol --served-model-name smol --host 127.0.0.1 --port 8000 \
             --nats nats://127.0.0.1:40123 --worker-timeout-ms 3000 \
             --router-policy least-loaded --max-local-prefill-length 0"
        );
        // The timeouts left out: parsed back, they are their defaults (or the environment's).
        let mut parsed = parse(&argv);
        for (value, default) in [
            (&mut parsed.request_timeout_ms, args.request_timeout_ms),
            (&mut parsed.accept_timeout_ms, args.accept_timeout_ms),
            (
                &mut parsed.first_token_timeout_ms,
                args.first_token_timeout_ms,
            ),
            (&mut parsed.stall_timeout_ms, args.stall_timeout_ms),
        ] {
            *value = default;
        }
        parsed.http_workers = args.http_workers;
        assert_eq!(parsed, args);
    }

    #[test]
    fn api_keys_never_reach_the_command_line_and_never_show() {
        let args = ApiServerArgs {
            api_keys: vec![
                ApiKey::parse("sk-one").unwrap(),
                ApiKey::parse("sk-two").unwrap(),
            ],
            ..ApiServerArgs::new("/m".into())
        };
        let argv = args.to_args();
        assert!(
            !argv.iter().any(|a| a.to_string_lossy().contains("sk-")),
            "{argv:?}"
        );
        assert!(!format!("{args:?}").contains("sk-"), "{args:?}");
        assert_eq!(
            args.api_keys_env(),
            Some(("TANDEM_API_KEY".to_string(), "sk-one,sk-two".to_string()))
        );
        assert_eq!(ApiServerArgs::new("/m".into()).api_keys_env(), None);
        // As the flag (repeated or comma-separated) they parse; empty or spaced ones do not.
        let parsed: ApiServerArgs = testing::try_parse(
            "api-server",
            &[
                "--model",
                "m",
                "--api-key",
                "sk-one",
                "--api-key",
                "sk-two,sk-3",
            ],
        )
        .unwrap();
        assert_eq!(parsed.api_keys.len(), 3);
        for bad in ["", "sk one"] {
            assert!(
                testing::try_parse::<ApiServerArgs>(
                    "api-server",
                    &["--model", "m", "--api-key", bad]
                )
                .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn router_policies_parse_by_their_flag_names() {
        let args: ApiServerArgs = testing::try_parse(
            "api-server",
            &[
                "--model",
                "/models/smollm2",
                "--router-policy",
                "round-robin",
            ],
        )
        .unwrap();
        assert_eq!(args.router_policy, RouterPolicy::RoundRobin);
        assert_eq!(args.served_name(), "smollm2");
        assert!(
            testing::try_parse::<ApiServerArgs>(
                "api-server",
                &["--model", "m", "--router-policy", "round_robin"],
            )
            .is_err()
        );
    }
}
