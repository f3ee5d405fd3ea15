//! Command-line configuration (every flag also reads an environment variable, so the launcher
//! and containers can configure the server without building argument lists).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use tandem_protocol::config::RouterPolicy;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "api-server",
    about = "tandem's OpenAI-compatible HTTP front end",
    version
)]
pub struct ServerConfig {
    /// Model directory (config.json, tokenizer.json, tokenizer_config.json).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: PathBuf,
    /// Name served in /v1/models and expected in requests; defaults to the directory name.
    /// It also names the NATS subjects, so workers must be started with the same name.
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,
    #[arg(long, env = "TANDEM_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Longest a request may take from arrival to its last token.
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT_MS", default_value_t = 600_000)]
    pub request_timeout_ms: u64,
    /// A worker must answer a job with `Accepted` within this time, else the client gets 503.
    #[arg(long, env = "TANDEM_ACCEPT_TIMEOUT_MS", default_value_t = 2_000)]
    pub accept_timeout_ms: u64,
    /// Longest wait from `Accepted` to the first token (queueing plus prefill).
    #[arg(long, env = "TANDEM_FIRST_TOKEN_TIMEOUT_MS", default_value_t = 120_000)]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two stream messages once tokens flow.
    #[arg(long, env = "TANDEM_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    pub stall_timeout_ms: u64,
    /// A worker whose last heartbeat is older than this is considered gone.
    #[arg(long, env = "TANDEM_WORKER_TIMEOUT_MS", default_value_t = 3_000)]
    pub worker_timeout_ms: u64,
    #[arg(long, env = "TANDEM_ROUTER_POLICY", value_enum, default_value_t = PolicyArg::LeastLoaded)]
    pub router_policy: PolicyArg,
    /// Prompts with fewer tokens are prefilled by the generation worker itself, with no KV
    /// transfer; longer ones go to a context worker when one is live. 0 (the default)
    /// disaggregates every request it can. The config's `router.max_local_prefill_length`.
    #[arg(long, env = "TANDEM_MAX_LOCAL_PREFILL_LENGTH", default_value_t = 0)]
    pub max_local_prefill_length: usize,
    /// HTTP worker threads (actix); 0 = one per core.
    #[arg(long, env = "TANDEM_HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,
}

/// clap's view of [`RouterPolicy`] (the protocol crate stays free of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    RoundRobin,
    LeastLoaded,
}

impl From<PolicyArg> for RouterPolicy {
    fn from(policy: PolicyArg) -> Self {
        match policy {
            PolicyArg::RoundRobin => RouterPolicy::RoundRobin,
            PolicyArg::LeastLoaded => RouterPolicy::LeastLoaded,
        }
    }
}

impl ServerConfig {
    /// The served name: the flag, else the model directory's last component.
    pub fn served_name(&self) -> String {
        self.served_model_name
            .clone()
            .unwrap_or_else(|| tandem_protocol::subjects::default_served_name(&self.model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let config = ServerConfig::try_parse_from([
            "api-server",
            "--model",
            "/models/smollm2",
            "--router-policy",
            "round-robin",
        ])
        .unwrap();
        assert_eq!(config.port, 8000);
        assert_eq!(config.max_local_prefill_length, 0);
        assert_eq!(config.served_name(), "smollm2");
        assert_eq!(
            RouterPolicy::from(config.router_policy),
            RouterPolicy::RoundRobin
        );
        assert!(ServerConfig::try_parse_from(["api-server"]).is_err());
        let config = ServerConfig::try_parse_from([
            "api-server",
            "--model",
            "m",
            "--max-local-prefill-length",
            "64",
        ])
        .unwrap();
        assert_eq!(config.max_local_prefill_length, 64);
    }
}
