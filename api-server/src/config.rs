//! Command-line configuration. The flags are [`ServerConfig`] (`tandem_cli::args::ApiServerArgs`,
//! where the launcher fills and renders the same struct); every flag also reads an environment
//! variable, so the launcher and containers can configure the server without building argument
//! lists.

use clap::Parser;

pub use tandem_cli::args::ApiServerArgs as ServerConfig;

/// The `api-server` command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "api-server",
    about = "tandem's OpenAI-compatible HTTP front end",
    version
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ServerConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::config::RouterPolicy;

    #[test]
    fn flags_parse_with_defaults() {
        let config = Cli::try_parse_from([
            "api-server",
            "--model",
            "/models/smollm2",
            "--router-policy",
            "round-robin",
        ])
        .unwrap()
        .config;
        assert_eq!(config.port, 8000);
        assert_eq!(config.max_local_prefill_length, 0);
        assert_eq!(config.served_name(), "smollm2");
        assert_eq!(config.router_policy, RouterPolicy::RoundRobin);
        assert!(Cli::try_parse_from(["api-server"]).is_err());
        let config = Cli::try_parse_from([
            "api-server",
            "--model",
            "m",
            "--max-local-prefill-length",
            "64",
        ])
        .unwrap()
        .config;
        assert_eq!(config.max_local_prefill_length, 64);
    }
}
