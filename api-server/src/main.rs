//! `api-server --model DIR --nats URL [--port P] ...`

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use api_server::config::{Cli, ServerConfig};
use clap::Parser;

#[actix_web::main]
async fn main() -> ExitCode {
    tandem_cli::init_logging("info");
    let config = Cli::parse().config;
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", tandem_cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let codec = api_server::prompt::load_codec(
        &config.model,
        config.tool_call_parser,
        config.reasoning_parser,
    )
    .with_context(|| format!("loading the tokenizer of {}", config.model.display()))?;
    api_server::server::serve(config, Arc::from(codec)).await?;
    Ok(())
}
