//! The `worker` binary: `worker --role both --model DIR --nats URL` serves on the bus;
//! `worker generate` runs one local generation without it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tandem_workers::generate::{self, GenerateArgs};
use tandem_workers::serve::{self, WorkerArgs};

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "tandem's inference worker",
    long_about = "tandem's inference worker: runs a Llama-family model (model directory made by \
                  `model-prep`) with a paged KV cache and continuous batching.\n\n\
                  With --role, it joins a deployment over NATS: takes generation jobs (queue \
                  group and its own direct subject), streams tokens to each request's stream \
                  subject, honours cancellation, and publishes heartbeats. SIGTERM or Ctrl-C \
                  drains it: in-flight requests finish, no new ones are taken; a second signal \
                  stops at once. The `generate` subcommand runs one prompt locally instead.",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        worker --role both --model models/smollm2 --nats nats://127.0.0.1:4222\n  \
        worker --role both --model models/smollm2 --nats nats://10.0.0.2:4222 --served-model-name smollm2 --kv-cache-tokens 32768\n  \
        worker generate --model models/smollm2 --chat --prompt 'What is the capital of France?'"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: WorkerArgs,
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
    let cli = Cli::parse();
    // A serving worker says what it does (info); `generate` prints only its output.
    let default_filter = if cli.command.is_some() {
        "warn"
    } else {
        "info"
    };
    tandem_cli::init_logging(default_filter);
    let result = match cli.command {
        Some(Command::Generate(args)) => run_generate(&args),
        None => serve::run(&cli.serve).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", tandem_cli::error_report(&e));
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
