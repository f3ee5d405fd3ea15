//! The `worker` binary. Today: `worker generate`, one local generation without the bus.
//! The bus roles (`worker --role context|decode|both --nats URL`) join as more subcommands
//! or top-level flags of [`Cli`].

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_workers::generate::{self, GenerateArgs};

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "tandem's inference worker",
    long_about = "tandem's inference worker: runs a Llama-family model (model directory made by \
                  `model-prep`) with a paged KV cache and continuous batching."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text for one prompt locally, without the bus, and print it.
    #[command(after_help = "Examples:\n  \
        worker generate --model models/smollm2 --prompt 'Once upon a time'\n  \
        worker generate --model models/smollm2 --chat --system 'Be brief.' --prompt 'What is the capital of France?'\n  \
        worker generate --model models/smollm2 --prompt 'Hi' --temperature 0.8 --top-p 0.9 --seed 1234 --json")]
    Generate(GenerateArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => run_generate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    if args.json {
        let output = generate::generate(args, |_| {})?;
        let mut out = stdout.lock();
        serde_json::to_writer(&mut out, &output).context("writing the JSON output")?;
        writeln!(out).context("writing the JSON output")?;
    } else {
        // Text streams out as it is generated.
        let mut write_error = None;
        generate::generate(args, |delta| {
            let mut out = stdout.lock();
            if let Err(e) = out.write_all(delta.as_bytes()).and_then(|()| out.flush()) {
                write_error.get_or_insert(e);
            }
        })?;
        if let Some(e) = write_error {
            return Err(e).context("writing the generated text");
        }
        writeln!(stdout.lock()).context("writing the generated text")?;
    }
    Ok(())
}
