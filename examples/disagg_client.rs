//! Sends every prompt of a JSON file to a running deployment and prints the answers, in the
//! spirit of TensorRT-LLM's `examples/disaggregated/clients/disagg_client.py`:
//!
//! ```bash
//! tandem serve -c examples/configs/cpu-disaggregated.yaml &
//! cargo run --example disagg_client -- -c examples/configs/cpu-disaggregated.yaml \
//!     -p examples/prompts.json -e chat --stream
//! ```
//!
//! The server's address comes from the deployment config (`hostname`, `port`; `0.0.0.0` is
//! reached at 127.0.0.1) and the model name from `served_model_name`, else from `/v1/models`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use tandem::bench::workload;
use tandem::openai_client::{Client, Endpoint, Prompt, Request};
use tandem_protocol::config::DeploymentConfig;

#[derive(Parser)]
#[command(
    about = "Send every prompt of a JSON file to a tandem deployment and print the answers",
    after_help = "Example:\n  cargo run --example disagg_client -- -c examples/configs/cpu-disaggregated.yaml \
-p examples/prompts.json -e chat --stream"
)]
struct Args {
    /// The deployment's YAML config (the one given to `tandem serve -c`).
    #[arg(short = 'c', long = "config", value_name = "CONFIG")]
    config: PathBuf,
    /// Prompts: a JSON list of strings (or of {"prompt": ...} objects).
    #[arg(short = 'p', long = "prompts", value_name = "FILE")]
    prompts: PathBuf,
    /// Endpoint: `chat` (/v1/chat/completions) or `completions` (/v1/completions).
    #[arg(short = 'e', long = "endpoint", value_enum, default_value = "chat")]
    endpoint: Endpoint,
    /// Stream the answers (Server-Sent Events) and print them as they come.
    #[arg(long)]
    stream: bool,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Prompts in flight at once (answers are printed in prompt order when not streaming).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Model name (default: the config's `served_model_name`, else the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// Each request's time limit.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("disagg_client: {failures} request(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("disagg_client: error: {}", tandem_cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<usize> {
    let config = DeploymentConfig::load(&args.config)?;
    let host = match config.hostname.as_str() {
        "0.0.0.0" | "::" | "" => "127.0.0.1",
        h => h,
    };
    let client = Client::new(
        &format!("http://{host}:{}/v1", config.port),
        std::env::var("OPENAI_API_KEY").ok(),
        Duration::from_secs(args.timeout_s.max(1)),
    );
    let model = match (&args.model, &config.served_model_name) {
        (Some(m), _) | (None, Some(m)) => m.clone(),
        (None, None) => client
            .models()
            .map_err(|e| anyhow::anyhow!("asking {}/models: {e}", client.base()))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{}/models lists no model", client.base()))?,
    };
    let prompts = workload::from_file(&args.prompts).map_err(anyhow::Error::msg)?;
    println!(
        "{} prompts to {}{} ({model}){}",
        prompts.len(),
        client.base(),
        args.endpoint.path(),
        if args.stream { ", streaming" } else { "" }
    );
    // Streamed answers print as they arrive, so prompts go one at a time; otherwise answers
    // are collected and printed in prompt order.
    let concurrency = if args.stream {
        1
    } else {
        args.concurrency.max(1)
    };
    let answers: Vec<Mutex<Option<String>>> = prompts.iter().map(|_| Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..concurrency.min(prompts.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(prompt) = prompts.get(i) else { break };
                    let request = Request {
                        model: model.clone(),
                        prompt: Prompt::Text(prompt.clone()),
                        max_tokens: args.max_tokens,
                        stream: args.stream,
                        temperature: args.temperature,
                        top_p: None,
                        ignore_eos: false,
                    };
                    if args.stream {
                        println!("\n[{i}] prompt: {prompt}");
                        print!("[{i}] answer: ");
                    }
                    let result = client.send(args.endpoint, &request, |piece| {
                        if args.stream {
                            print!("{piece}");
                            let _ = std::io::stdout().flush();
                        }
                    });
                    let line = match result {
                        Ok(reply) => {
                            format!(
                                "(finish: {}, tokens: {} prompt + {} completion, {:.0} ms)",
                                reply.finish_reason.as_deref().unwrap_or("?"),
                                reply.prompt_tokens.unwrap_or(0),
                                reply.output_tokens(),
                                reply.total.as_secs_f64() * 1e3
                            ) + &if args.stream {
                                String::new()
                            } else {
                                format!("\n[{i}] answer: {}", reply.text)
                            }
                        }
                        Err(e) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            format!("ERROR: {e}")
                        }
                    };
                    if args.stream {
                        println!("\n[{i}] {line}");
                    } else {
                        *answers[i].lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("\n[{i}] prompt: {prompt}\n[{i}] {line}"));
                    }
                }
            });
        }
    });
    for answer in answers {
        if let Some(text) = answer.into_inner().unwrap_or_else(|p| p.into_inner()) {
            println!("{text}");
        }
    }
    Ok(failures.into_inner())
}
