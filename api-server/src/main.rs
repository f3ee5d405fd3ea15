//! `api-server --model DIR --nats URL [--port P] ...`

use std::sync::Arc;

use anyhow::Context;
use api_server::config::ServerConfig;
use clap::Parser;
use tracing_subscriber::EnvFilter;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person; a launcher or log collector reads plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = ServerConfig::parse();
    let codec = api_server::prompt::load_codec(&config.model)
        .with_context(|| format!("loading the tokenizer of {}", config.model.display()))?;
    api_server::server::serve(config, Arc::from(codec)).await?;
    Ok(())
}
