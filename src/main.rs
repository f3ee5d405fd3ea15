//! `tandem serve`: the launcher. It turns a deployment config into processes (a nats-server
//! unless one is given, the workers, the api-server), waits until they serve, supervises them
//! and stops them all on Ctrl-C / SIGTERM.
//!
//! Modules: `cli` (flags and help), `model` (which model directory, the default model),
//! `plan` (config → processes and their arguments), `binaries` (finding the programs),
//! `child` (spawning, output, signals), `nats` (our own nats-server), `secrets` (the fresh
//! NATS token and KV secret of a deployment), `health` (readiness probe), `supervisor`
//! (start-up, supervision, shutdown). `tandem bench` and `tandem plan` are clients of a
//! deployment and live in the library (`tandem::bench`, `tandem::planner`).

mod binaries;
mod child;
mod cli;
mod health;
mod model;
mod nats;
mod plan;
mod restart;
mod secrets;
mod supervisor;

use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use tandem_protocol::config::DeploymentConfig;

use crate::cli::{Cli, Command, ServeArgs};
use crate::plan::Overrides;
use crate::supervisor::{Programs, Signals, Timing};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        // The load generator is a client: no runtime, no logging set-up of the launcher.
        Command::Bench(args) => {
            return match tandem::bench::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tandem bench: error: {}", tandem_cli::error_report(&e));
                    ExitCode::FAILURE
                }
            };
        }
        // The planner is a client too: it starts its deployments as `tandem serve` children.
        Command::Plan(args) => {
            return match tandem::planner::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tandem plan: error: {}", tandem_cli::error_report(&e));
                    ExitCode::FAILURE
                }
            };
        }
    };
    tandem_cli::init_logging("info");
    // Single-threaded on purpose: children are spawned from the main thread, which their
    // PR_SET_PDEATHSIG is tied to (see `child`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandem: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: error: {}", tandem_cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Some(DeploymentConfig::load(path)?),
        None => None,
    };
    let model = model::resolve(
        args.model.as_deref(),
        config.as_ref().and_then(|c| c.model.as_deref()),
        model::DefaultForm::for_deployment(config.as_ref()),
    )
    .await?;
    // Taken over only now: until here nothing runs that needs stopping, and a Ctrl-C during a
    // long default-model download should simply end the launcher (default action).
    let mut signals = Signals::install().context("installing the signal handlers")?;
    let overrides = Overrides {
        host: args.host.clone(),
        port: args.port,
        served_model_name: args.served_model_name.clone(),
        nats: args.nats.clone(),
        parts: plan::Parts::only(&args.only),
        kv_secret_in_env: [tandem_cli::args::KV_SECRET_VAR, "TANDEM_KV_SECRET_FILE"]
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty())),
    };
    if let Some(url) = &overrides.nats
        && !(url.starts_with("nats://") || url.starts_with("tls://"))
    {
        anyhow::bail!("--nats {url:?} is not a nats:// or tls:// URL");
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let plan = plan::plan(
        config.as_ref(),
        model.dir,
        model.default_served_name,
        &overrides,
        cores,
    )?;
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }

    let programs = Programs {
        worker: binaries::workspace_binary("worker")?,
        api_server: binaries::workspace_binary("api-server")?,
        nats_server: match plan.external_nats {
            Some(_) => None,
            None => Some(binaries::nats_server()?),
        },
    };
    // A taken port is found here rather than as an api-server failing after the workers load.
    if plan.api_server {
        TcpListener::bind((plan.host.as_str(), plan.port)).with_context(|| {
            format!(
                "cannot listen on {}:{} (choose another with --port or the config's `port`)",
                plan.host, plan.port
            )
        })?;
    }
    tracing::info!(
        "starting {} as `{}` with {}",
        plan.model.display(),
        plan.served_name,
        plan.describe_workers()
    );
    let timing = Timing {
        ready_timeout: Duration::from_secs(args.ready_timeout_s),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        restarts: restart::RestartPolicy {
            max_quick_exits: args.worker_restarts,
            ..restart::RestartPolicy::STANDARD
        },
    };
    supervisor::run(&plan, &programs, timing, &mut signals).await
}
