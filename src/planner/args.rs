//! `tandem plan`'s flags, and the device list they name.

use std::path::PathBuf;

/// `tandem plan --help`'s description.
pub const PLAN_LONG_ABOUT: &str = "\
Choose a deployment by measurement: profile the model's prefill and decode on the devices at hand,
then propose the context and decode workers (and their tensor_parallel_size), or aggregated
workers, that serve the most requests per second per device within a TTFT and an ITL target
for prompts of --isl tokens and outputs of --osl tokens. The proposal is a deployment config
for `tandem serve -c`, commented with the profile's numbers, the predicted goodput and a
`tandem bench` command that checks it.

Profiling (skipped with --profile-in): for each --tp size that fits the devices, a one-worker
aggregated deployment (`tandem serve` with a generated config) is started on the first devices,
measured through its OpenAI endpoint with prompts of exactly --isl random token ids, and
stopped (SIGTERM):
  1. prefill: one prompt alone, --prefill-repeats times (median), then --prefill-burst at once;
  2. decode: the steady-state inter-token latency at each batch of --batch-ladder (default
     powers of two up to --max-batch), up to what the worker's KV cache holds and to the
     first batch whose ITL is above --itl-ms;
  3. interference: decodes at each --interference-batch while --interference-prompts prompts
     are prefilled beside them (steps that carry a prefill chunk of --max-num-tokens).
--profile-out saves the profile as JSON; --profile-in plans from one without measuring
(re-plans for other targets or output lengths are instant).

Planning (docs/planner.md states the model): a context worker's TTFT is an M/D/1 queue's wait
at --ttft-percentile plus its prefill plus --handover-ms; a decode worker runs the batch of most
throughput whose ITL meets the target and its KV cache holds; an aggregated worker shares its
steps between prefill chunks and decodes, which both targets must survive. Every deployment
that fits the devices is scored; the table shows them all, with what limits each.";

const PLAN_EXAMPLES: &str = "\
Examples:
  # Two GPUs, Llama-3.1-8B, 3000-token prompts and 150-token outputs, TTFT 2 s, ITL 50 ms
  tandem plan --model models/llama-3.1-8b --gpus 2 --tp 1,2 --isl 3000 --osl 150 \\
      --ttft-ms 2000 --itl-ms 50 --profile-out profile.json --output deploy.yaml
  tandem serve -c deploy.yaml --model models/llama-3.1-8b

  # Re-plan from the stored profile for another target (no measuring)
  tandem plan --profile-in profile.json --gpus 8 --osl 256 --ttft-ms 1000 --itl-ms 20

  # On the CPU: two worker slots of the CPU, a short ladder
  tandem plan --model models/smollm2 --devices cpu,cpu --isl 256 --osl 64 \\
      --ttft-ms 5000 --itl-ms 500 --max-batch 8";

/// `tandem plan` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(long_about = PLAN_LONG_ABOUT, after_help = PLAN_EXAMPLES)]
#[command(group(clap::ArgGroup::new("device_list").required(true).args(["devices", "gpus"])))]
pub struct PlanArgs {
    /// Model directory made by `model-prep` (needed to profile).
    #[arg(long, value_name = "DIR", required_unless_present = "profile_in")]
    pub model: Option<PathBuf>,
    /// Devices the deployment may use, one entry per rank: `cuda:N`, or `cpu` (repeat it for
    /// several CPU workers; they share the cores, yet each counts as a device). Profiling runs
    /// on the first ones.
    #[arg(long, value_delimiter = ',', value_name = "DEV,...")]
    pub devices: Vec<String>,
    /// Instead of --devices: cuda:0 to cuda:N-1.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Tensor-parallel sizes to profile and plan with, those that fit the devices (default:
    /// 1; with --profile-in, every size the profile has).
    #[arg(long, value_delimiter = ',', value_name = "T,...")]
    pub tp: Vec<usize>,
    /// Prompt tokens per request (default with --profile-in: the profile's).
    #[arg(long, value_name = "N", required_unless_present = "profile_in")]
    pub isl: Option<usize>,
    /// Output tokens per request.
    #[arg(long, value_name = "N")]
    pub osl: usize,
    /// Time-to-first-token target, in ms (at --ttft-percentile).
    #[arg(long, value_name = "MS")]
    pub ttft_ms: f64,
    /// Mean inter-token latency target per request, in ms (as `tandem bench --goodput` counts it).
    #[arg(long, value_name = "MS")]
    pub itl_ms: f64,
    /// Which percentile of TTFT must meet --ttft-ms.
    #[arg(long, value_name = "P", default_value_t = 90.0)]
    pub ttft_percentile: f64,
    /// What the choice maximises: goodput per device (the most efficient deployment, which
    /// may leave devices unused), or goodput on the devices.
    #[arg(long, value_enum, default_value = "per-device")]
    pub maximize: super::search::Objective,
    /// Added to a disaggregated request's TTFT for the KV hand-over between workers, in ms.
    #[arg(long, value_name = "MS", default_value_t = 20.0)]
    pub handover_ms: f64,

    /// The decode ladder's largest batch (the ladder is 1, 2, 4, ... up to it). It ends
    /// earlier at the first batch the KV cache cannot hold, or after the first whose ITL is
    /// above --itl-ms.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_batch: usize,
    /// The decode ladder itself, instead of powers of two up to --max-batch.
    #[arg(long, value_delimiter = ',', value_name = "B,...")]
    pub batch_ladder: Vec<usize>,
    /// Prefills of one prompt alone (the median is used).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub prefill_repeats: usize,
    /// Prompts sent at once to measure back-to-back prefills (0: not measured).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub prefill_burst: usize,
    /// Tokens each decode request generates while its whole batch decodes together.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub steady_tokens: usize,
    /// Decode batches at which prefill interference is measured (0: none).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "B,...",
        default_value = "8,32"
    )]
    pub interference_batch: Vec<usize>,
    /// Prompts prefilled beside each interference batch.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub interference_prompts: usize,
    /// Tokens per forward step (`max_num_tokens`) of the profiled and proposed workers: the
    /// prefill chunk.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub max_num_tokens: usize,
    /// Tokens per KV block (default: 64 on GPUs, 16 on the CPU, as `tandem serve`).
    #[arg(long, value_name = "N")]
    pub block_size: Option<usize>,
    /// GPU workers: the share of free memory their KV cache takes.
    #[arg(long, value_name = "F", default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// KV cache capacity in tokens of the profiled and proposed workers (instead of the
    /// memory fraction; the CPU's default is the worker's).
    #[arg(long, value_name = "N")]
    pub kv_cache_tokens: Option<usize>,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds to wait for each profiled deployment to serve.
    #[arg(long, value_name = "S", default_value_t = 600)]
    pub ready_timeout_s: u64,
    /// Each request's time limit, in seconds.
    #[arg(long, value_name = "S", default_value_t = 600)]
    pub timeout_s: u64,
    /// Where the profiled deployments' configs and logs go (default: a temporary directory,
    /// removed after a successful profile).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Plan from this profile instead of measuring.
    #[arg(long, value_name = "FILE", conflicts_with = "profile_out")]
    pub profile_in: Option<PathBuf>,
    /// Save the profile here (JSON).
    #[arg(long, value_name = "FILE")]
    pub profile_out: Option<PathBuf>,
    /// Write the proposed deployment config here (default: stdout; the table then goes to
    /// stderr).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also write the best deployment of the other kind (aggregated for a disaggregated
    /// choice, and the reverse) as a config of its own.
    #[arg(long, value_name = "FILE")]
    pub output_alternative: Option<PathBuf>,
}

impl PlanArgs {
    /// The device of each rank the deployment may use.
    pub fn device_list(&self) -> anyhow::Result<Vec<String>> {
        let devices: Vec<String> = match self.gpus {
            Some(n) => (0..n).map(|i| format!("cuda:{i}")).collect(),
            None => self.devices.iter().map(|d| d.trim().to_owned()).collect(),
        };
        if devices.is_empty() {
            anyhow::bail!("no devices: give --gpus N (at least 1) or --devices LIST");
        }
        for d in &devices {
            let valid = d == "cpu"
                || d.strip_prefix("cuda:")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !valid {
                anyhow::bail!("--devices: {d:?} is not a device (`cpu` or `cuda:N`)");
            }
        }
        Ok(devices)
    }

    /// The decode ladder: --batch-ladder, else 1, 2, 4, ... up to --max-batch (and it).
    pub fn ladder(&self) -> Vec<usize> {
        let mut ladder: Vec<usize> = if self.batch_ladder.is_empty() {
            let mut l: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
                .take_while(|&b| b < self.max_batch)
                .collect();
            l.push(self.max_batch.max(1));
            l
        } else {
            self.batch_ladder.clone()
        };
        ladder.retain(|&b| b > 0);
        ladder.sort_unstable();
        ladder.dedup();
        ladder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: PlanArgs,
    }

    fn parse(argv: &[&str]) -> Result<PlanArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("plan").chain(argv.iter().copied())).map(|w| w.args)
    }

    const TARGETS: [&str; 6] = ["--osl", "150", "--ttft-ms", "2000", "--itl-ms", "50"];

    #[test]
    fn devices_come_from_a_list_or_a_gpu_count() {
        let args = parse(
            &[
                &["--model", "m", "--isl", "3000", "--gpus", "2"][..],
                &TARGETS,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(args.device_list().unwrap(), ["cuda:0", "cuda:1"]);
        let args = parse(
            &[
                &[
                    "--model",
                    "m",
                    "--isl",
                    "3000",
                    "--devices",
                    "cuda:2,cuda:3",
                ][..],
                &TARGETS,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(args.device_list().unwrap(), ["cuda:2", "cuda:3"]);
        let args = parse(
            &[
                &["--model", "m", "--isl", "3000", "--devices", "gpu0"][..],
                &TARGETS,
            ]
            .concat(),
        )
        .unwrap();
        assert!(
            args.device_list()
                .unwrap_err()
                .to_string()
                .contains("\"gpu0\"")
        );
        // One of the two is required, and only one.
        assert!(parse(&[&["--model", "m", "--isl", "3000"][..], &TARGETS].concat()).is_err());
        assert!(
            parse(
                &[
                    &[
                        "--model",
                        "m",
                        "--isl",
                        "1",
                        "--gpus",
                        "1",
                        "--devices",
                        "cpu"
                    ][..],
                    &TARGETS
                ]
                .concat()
            )
            .is_err()
        );
    }

    #[test]
    fn a_stored_profile_needs_no_model_and_no_isl() {
        let args =
            parse(&[&["--profile-in", "p.json", "--gpus", "4"][..], &TARGETS].concat()).unwrap();
        assert_eq!(args.isl, None);
        assert!(parse(&[&["--gpus", "4"][..], &TARGETS].concat()).is_err());
    }

    #[test]
    fn the_ladder_is_powers_of_two_up_to_the_max_batch() {
        let args = parse(
            &[
                &[
                    "--model",
                    "m",
                    "--isl",
                    "1",
                    "--gpus",
                    "1",
                    "--max-batch",
                    "48",
                ][..],
                &TARGETS,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(args.ladder(), [1, 2, 4, 8, 16, 32, 48]);
        let args = parse(
            &[
                &[
                    "--model",
                    "m",
                    "--isl",
                    "1",
                    "--gpus",
                    "1",
                    "--batch-ladder",
                    "8,1,0,8,3",
                ][..],
                &TARGETS,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(args.ladder(), [1, 3, 8]);
    }
}
