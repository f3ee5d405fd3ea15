//! Profiling: for each tensor-parallel size that fits the devices, one aggregated worker is
//! started on the first of them ([`Deployment`]), measured ([`Probe`]) and stopped, and the
//! results are gathered into a [`Profile`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::args::PlanArgs;
use super::deployment::{Deployment, WorkerSpec};
use super::measure::{self, Probe, Steps};
use super::profile::{PROFILE_VERSION, Profile, WorkerProfile};
use super::search;
use crate::openai_client::Client;

/// How long the api-server may take to count the worker's first heartbeat in /metrics.
const METRICS_TIMEOUT: Duration = Duration::from_secs(30);

/// The fields of the model's `config.json` profiling needs.
#[derive(Debug, Deserialize)]
struct ModelShape {
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
}

impl ModelShape {
    fn read(model: &Path) -> anyhow::Result<ModelShape> {
        let path = model.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a model directory?)",
                path.display(),
                model.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("reading the model shape in {}", path.display()))
    }

    /// Why `tp` ranks cannot split this model, if they cannot (the heads, KV heads and MLP
    /// width must divide by it).
    fn split_problem(&self, tp: usize) -> Option<String> {
        let kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        [
            ("attention heads", self.num_attention_heads),
            ("KV heads", kv_heads),
            ("MLP width", self.intermediate_size),
        ]
        .iter()
        .find(|(_, n)| n % tp != 0)
        .map(|(what, n)| format!("its {n} {what} do not divide by {tp}"))
    }

    /// Ids that are tokens of every vocabulary of this size: the upper part of the first
    /// 30,000 (as `tandem bench --token-ids`), scaled down for small vocabularies.
    fn token_ids(&self) -> std::ops::Range<u32> {
        let hi = self.vocab_size.min(30_000) as u32;
        let lo = (hi / 10).min(1000);
        lo..hi.max(lo + 1)
    }
}

/// Measures every TP size of `args` that fits `devices`.
pub fn profile(args: &PlanArgs, devices: &[String]) -> anyhow::Result<Profile> {
    let model = args
        .model
        .as_deref()
        .context("--model is needed to profile")?;
    let model = std::fs::canonicalize(model)
        .with_context(|| format!("model directory {}", model.display()))?;
    let shape = ModelShape::read(&model)?;
    let isl = args.isl.context("--isl is needed to profile")?;
    if isl == 0 {
        bail!("--isl must be at least 1");
    }
    let gpu = devices[0].starts_with("cuda:");
    let block_size = args.block_size.unwrap_or(if gpu { 64 } else { 16 });
    let tps = if args.tp.is_empty() {
        vec![1]
    } else {
        args.tp.clone()
    };
    let mut sizes = Vec::new();
    for &tp in &tps {
        let problem = if tp == 0 {
            Some("0 ranks".to_owned())
        } else if search::assign(devices, &[(1, tp)]).is_none() {
            Some(format!(
                "the first {tp} devices are not {tp} consecutive ones"
            ))
        } else {
            shape.split_problem(tp)
        };
        match problem {
            Some(why) => eprintln!("tandem plan: TP={tp} not profiled: {why}"),
            None => sizes.push(tp),
        }
    }
    if sizes.is_empty() {
        bail!("no --tp size fits the devices ({})", devices.join(","));
    }
    let steps = steps(args);
    let kv_cache_tokens = args.kv_cache_tokens;
    let gpu_memory_fraction =
        (gpu && kv_cache_tokens.is_none()).then_some(args.gpu_memory_fraction);
    let (work_dir, temporary) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tandem-plan-{}", std::process::id())),
            true,
        ),
    };
    let tandem = std::env::current_exe().context("finding the tandem executable")?;
    let mut workers = Vec::new();
    for tp in sizes {
        let spec = WorkerSpec {
            device: devices[0].clone(),
            tensor_parallel_size: tp,
            max_batch_size: deployment_batch(&steps),
            max_num_tokens: args.max_num_tokens,
            block_size,
            gpu_memory_fraction,
            kv_cache_tokens,
        };
        let context = Context {
            tandem: &tandem,
            model: &model,
            work_dir: &work_dir,
            shape: &shape,
            isl,
            args,
            steps: &steps,
        };
        workers.push(profile_one(&context, &spec).with_context(|| format!("profiling TP={tp}"))?);
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(Profile {
        version: PROFILE_VERSION,
        model: model.display().to_string(),
        isl,
        max_num_tokens: args.max_num_tokens,
        block_size,
        gpu_memory_fraction,
        kv_cache_tokens,
        workers,
    })
}

/// What [`profile_one`] needs besides the worker.
struct Context<'a> {
    tandem: &'a Path,
    model: &'a Path,
    work_dir: &'a PathBuf,
    shape: &'a ModelShape,
    isl: usize,
    args: &'a PlanArgs,
    steps: &'a Steps,
}

/// Starts, measures and stops one worker.
fn profile_one(cx: &Context<'_>, spec: &WorkerSpec) -> anyhow::Result<WorkerProfile> {
    let tp = spec.tensor_parallel_size;
    let progress = ProgressBar::new(cx.steps.count() + 1);
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix:>6} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .expect("a valid template"),
    );
    progress.set_prefix(format!("TP={tp}"));
    progress.set_message(format!("starting a worker on {}", spec.device));
    progress.suspend(|| {
        eprintln!(
            "tandem plan: TP={tp} on {} (max_num_tokens {})",
            spec.device, spec.max_num_tokens
        )
    });
    let deployment = Deployment::start(
        cx.tandem,
        cx.model,
        spec,
        cx.work_dir,
        Duration::from_secs(cx.args.ready_timeout_s),
    )?;
    progress.inc(1);
    let client = Client::new(
        deployment.url(),
        std::env::var("TANDEM_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        Duration::from_secs(cx.args.timeout_s.max(1)),
    );
    let model = client
        .models()
        .context("asking the deployment for its model")?
        .into_iter()
        .next()
        .context("the deployment lists no model")?;
    let kv_cache_blocks = measure::kv_cache_blocks(&client, METRICS_TIMEOUT)?;
    progress.suspend(|| {
        eprintln!(
            "  KV cache: {kv_cache_blocks} blocks of {} tokens ({} tokens)",
            spec.block_size,
            kv_cache_blocks * spec.block_size as u64
        )
    });
    let probe = Probe {
        client: &client,
        model,
        isl: cx.isl,
        token_ids: cx.shape.token_ids(),
        max_context: cx.shape.max_position_embeddings.unwrap_or(usize::MAX),
        max_num_tokens: spec.max_num_tokens,
        block_size: spec.block_size,
        kv_cache_blocks,
        progress: &progress,
        seed: AtomicU64::new(cx.args.seed),
    };
    let prefill = probe.prefill(cx.steps)?;
    let decode = probe.decode(cx.steps, &prefill)?;
    let mixed = probe.interference(cx.steps, &prefill, &decode)?;
    progress.set_message("stopping");
    deployment.stop()?;
    progress.finish_and_clear();
    Ok(WorkerProfile {
        tensor_parallel_size: tp,
        device: spec.device.clone(),
        max_batch_size: spec.max_batch_size,
        kv_cache_blocks,
        prefill,
        decode,
        mixed,
    })
}

/// The measuring steps the flags ask for; interference only at batches the ladder reaches.
fn steps(args: &PlanArgs) -> Steps {
    let batches = args.ladder();
    let top = batches.last().copied().unwrap_or(1);
    let mut interference: Vec<usize> = args
        .interference_batch
        .iter()
        .copied()
        .filter(|&b| b > 0 && b <= top)
        .collect();
    interference.sort_unstable();
    interference.dedup();
    Steps {
        prefill_repeats: args.prefill_repeats.max(1),
        prefill_burst: args.prefill_burst,
        batches,
        steady_tokens: args.steady_tokens.max(2),
        stop_above_itl_ms: Some(args.itl_ms),
        interference_batches: interference,
        interference_prompts: args.interference_prompts.max(1),
    }
}

/// `max_batch_size` of the profiled worker: every request of any step runs at once.
fn deployment_batch(steps: &Steps) -> usize {
    let ladder = steps.batches.last().copied().unwrap_or(1);
    let interference = steps
        .interference_batches
        .last()
        .map_or(0, |b| b + steps.interference_prompts);
    ladder.max(interference).max(steps.prefill_burst).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: usize, kv_heads: usize, mlp: usize, vocab: usize) -> ModelShape {
        ModelShape {
            vocab_size: vocab,
            max_position_embeddings: Some(8192),
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            intermediate_size: mlp,
        }
    }

    #[test]
    fn tp_sizes_must_split_the_heads_and_the_mlp() {
        let llama = shape(32, 8, 14336, 128_256);
        assert_eq!(llama.split_problem(2), None);
        assert_eq!(llama.split_problem(8), None);
        assert_eq!(
            llama.split_problem(16).as_deref(),
            Some("its 8 KV heads do not divide by 16")
        );
        assert!(
            shape(9, 3, 1536, 49152)
                .split_problem(2)
                .unwrap()
                .contains("9 attention heads")
        );
    }

    #[test]
    fn token_ids_stay_inside_the_vocabulary() {
        assert_eq!(shape(32, 8, 14336, 128_256).token_ids(), 1000..30_000);
        assert_eq!(shape(4, 2, 192, 512).token_ids(), 51..512);
        assert_eq!(shape(4, 2, 192, 1).token_ids(), 0..1);
    }
}
