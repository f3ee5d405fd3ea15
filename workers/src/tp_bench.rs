//! Decode steps of a tensor-parallel group of GPUs against one GPU (`gpu_bench tp`):
//! the engine's own path (a [`StepModel`] whose steps are summarized and sampled on the device,
//! [`DeviceSampling`](crate::engine::DeviceSampling)), timed step by step over a filled KV cache, next to each step's floor:
//! the bytes one GPU must read (its share of the layers' weights, the whole lm_head every rank
//! holds, its KV heads of every sequence) at the device's copy rate, plus the step's
//! all-reduces measured alone on the same GPUs.
//!
//! Every configuration, one GPU included, runs eagerly or every one replays CUDA graphs
//! (`--cuda-graphs`), so the comparison is of the split and the sums alone.

use std::path::Path;
use std::time::Instant;

use tandem_cli::args::GpuArgs;
use tandem_model::ModelConfig;
use tandem_protocol::config::KvCacheDtype;

use crate::backend::Backend;
use crate::backend::cuda::{CudaBackend, CudaOptions, nccl_communicators};
use crate::device::{Device, LoadedModel, load_model};
use crate::engine::{ModelRunner, StepModel, TensorParallelRunner};
use crate::model::ForwardBatch;
use crate::sampler::device::RowRequest;

/// Tokens per KV block in the bench's cache (what GPU workers use by default).
const BLOCK_SIZE: usize = 64;

/// Most prompt tokens one fill forward prefills.
const FILL_TOKENS: usize = 8192;

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TpRow {
    pub ranks: usize,
    pub batch: usize,
    pub context: usize,
    /// Median wall time of a decode step, submitted and collected as the engine does.
    pub median_ms: f64,
    /// The step's all-reduces (two a layer, `[batch, hidden]` f32) alone; 0 on one GPU.
    pub all_reduce_ms: f64,
    /// Bytes per GPU at the copy rate, plus `all_reduce_ms`.
    pub floor_ms: f64,
    pub ratio: f64,
}

/// Parameters of the layers' weight matrices, and of the lm_head, of `c`.
pub fn matrix_params(c: &ModelConfig) -> (usize, usize) {
    let (h, hd) = (c.hidden_size, c.head_dim());
    let q = c.num_attention_heads * hd;
    let kv = c.num_kv_heads() * hd;
    let layer = h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size;
    let lm_head = c.vocab_size * h;
    (c.num_hidden_layers * layer, lm_head)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What `gpu_bench tp` measures.
#[derive(Debug, Clone)]
pub struct StepsToTime {
    /// Group sizes (1: one GPU).
    pub rank_counts: Vec<usize>,
    /// Decoding sequences per step.
    pub batches: Vec<usize>,
    /// Cached tokens of every sequence.
    pub context: usize,
    /// Timed steps per configuration (the median is reported).
    pub iters: usize,
    /// Replay steps from CUDA graphs (every configuration alike).
    pub cuda_graphs: bool,
}

/// Times decode steps of the model in `dir` split over each of `what.rank_counts` GPUs (from
/// `cuda:first`), at each of `what.batches` sequences of `what.context` cached tokens;
/// `copy_bytes_per_s` is the device's measured copy rate (read + write).
pub fn run(
    dir: &Path,
    first: usize,
    what: &StepsToTime,
    copy_bytes_per_s: f64,
) -> anyhow::Result<Vec<TpRow>> {
    let (batches, context, iters) = (what.batches.as_slice(), what.context, what.iters);
    let config = ModelConfig::load(dir)?;
    let mut rows = Vec::new();
    for &ranks in &what.rank_counts {
        let all_reduce = all_reduce_ms(first, ranks, batches, &config, iters)?;
        let max_batch = batches.iter().copied().max().unwrap_or(1);
        let num_blocks = max_batch * (context + 1).div_ceil(BLOCK_SIZE) + 1;
        let steps = decode_steps(
            step_model(
                dir,
                Device::Cuda(first),
                ranks,
                num_blocks,
                what.cuda_graphs,
            )?
            .as_mut(),
            batches,
            context,
            iters,
        )?;
        let (layer_params, lm_head) = matrix_params(&config);
        for ((&batch, step), reduce) in batches.iter().zip(steps).zip(all_reduce) {
            let kv_bytes = batch
                * (context + 1)
                * config.num_hidden_layers
                * 2
                * config.num_kv_heads()
                * config.head_dim()
                * 2;
            let bytes = (2 * layer_params + kv_bytes) as f64 / ranks as f64 + 2.0 * lm_head as f64;
            let floor = bytes / copy_bytes_per_s * 1e3 + reduce;
            rows.push(TpRow {
                ranks,
                batch,
                context,
                median_ms: step,
                all_reduce_ms: reduce,
                floor_ms: floor,
                ratio: step / floor,
            });
        }
    }
    Ok(rows)
}

/// The model in `dir` over `ranks` ranks from `device` (rank r on cuda:K+r; CPU ranks share
/// the cores), with a cache of `num_blocks` blocks; eager unless `cuda_graphs`.
fn step_model(
    dir: &Path,
    device: Device,
    ranks: usize,
    num_blocks: usize,
    cuda_graphs: bool,
) -> anyhow::Result<Box<dyn StepModel>> {
    let gpu = GpuArgs {
        cuda_graphs: Some(cuda_graphs),
        ..GpuArgs::default()
    };
    fn group<B: crate::backend::KvBlockIo + 'static>(
        models: Vec<crate::model::Model<B>>,
        num_blocks: usize,
        abort: Box<dyn Fn(&str) + Send>,
    ) -> anyhow::Result<Box<dyn StepModel>> {
        let runners = models
            .into_iter()
            .map(|m| ModelRunner::new(m, BLOCK_SIZE, num_blocks))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(TensorParallelRunner::spawn(runners, abort)?))
    }
    Ok(
        match load_model(
            dir,
            device,
            &crate::backend::cpu::CpuOptions::default(),
            &gpu,
            ranks,
            KvCacheDtype::Auto,
        )? {
            LoadedModel::Cuda(m) => Box::new(ModelRunner::new(*m, BLOCK_SIZE, num_blocks)?),
            LoadedModel::Cpu(m) => Box::new(ModelRunner::new(*m, BLOCK_SIZE, num_blocks)?),
            LoadedModel::CudaGroup { ranks } => group(ranks, num_blocks, Box::new(|_: &str| {}))?,
            LoadedModel::CpuGroup { ranks, group: g } => {
                group(ranks, num_blocks, Box::new(move |why: &str| g.abort(why)))?
            }
        },
    )
}

/// How the logits of a group of GPUs compare with one GPU's over one prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    pub ranks: usize,
    pub prompt_tokens: usize,
    /// Relative L2 distance of the prompt's last logits row from one GPU's.
    pub prefill_rel_l2: f64,
    /// Mean and largest relative L2 over the teacher-forced decode steps.
    pub decode_rel_l2: f64,
    pub max_rel_l2: f64,
    /// Decode steps whose top-1 token equals one GPU's, both fed one GPU's greedy tokens.
    pub top1_agree: usize,
    pub steps: usize,
    /// Where the free-running greedy tokens first differ from one GPU's (`steps + 1`: never).
    pub greedy_same: usize,
}

/// Teacher-forced logits of the model in `dir` split over each of `rank_counts` ranks from
/// `device` (GPUs from cuda:K, or CPU threads) against the whole model on `device`: prompts of `prompt_lens` tokens, then `steps` decode steps
/// in which the group consumes one GPU's greedy tokens (the numbers `gpu_bench check` reports
/// for the CUDA backend against the CPU), and the group's own free-running greedy tokens.
pub fn check(
    dir: &Path,
    device: Device,
    rank_counts: &[usize],
    prompt_lens: &[usize],
    steps: usize,
    cuda_graphs: bool,
) -> anyhow::Result<Vec<CheckRow>> {
    let config = ModelConfig::load(dir)?;
    let blocks_per_run = |len: usize| (len + steps + 1).div_ceil(BLOCK_SIZE);
    let num_blocks = 2 * prompt_lens
        .iter()
        .map(|&l| blocks_per_run(l))
        .sum::<usize>()
        + 1;
    let prompts: Vec<Vec<u32>> = prompt_lens
        .iter()
        .map(|&len| {
            (0..len)
                .map(|i| ((i * 104_729 + len * 7919 + 13) % config.vocab_size) as u32)
                .collect()
        })
        .collect();
    // One GPU: its logits and greedy tokens per prompt.
    let reference = {
        let mut one = step_model(dir, device, 1, num_blocks, cuda_graphs)?;
        let mut blocks = BlockBump::default();
        prompts
            .iter()
            .map(|p| {
                decode(
                    one.as_mut(),
                    p,
                    steps,
                    None,
                    blocks.take(blocks_per_run(p.len())),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let mut rows = Vec::new();
    for &ranks in rank_counts.iter().filter(|&&r| r > 1) {
        let mut group = step_model(dir, device, ranks, num_blocks, cuda_graphs)?;
        let mut blocks = BlockBump::default();
        for (p, (ref_logits, ref_greedy)) in prompts.iter().zip(&reference) {
            let n = blocks_per_run(p.len());
            let (logits, _) = decode(group.as_mut(), p, steps, Some(ref_greedy), blocks.take(n))?;
            let (_, greedy) = decode(group.as_mut(), p, steps, None, blocks.take(n))?;
            let l2: Vec<f64> = logits
                .iter()
                .zip(ref_logits)
                .map(|(a, r)| rel_l2(a, r))
                .collect();
            let decode_l2 = &l2[1..];
            rows.push(CheckRow {
                ranks,
                prompt_tokens: p.len(),
                prefill_rel_l2: l2[0],
                decode_rel_l2: decode_l2.iter().sum::<f64>() / decode_l2.len().max(1) as f64,
                max_rel_l2: l2.iter().copied().fold(0.0, f64::max),
                top1_agree: logits[1..]
                    .iter()
                    .zip(&ref_logits[1..])
                    .filter(|(a, r)| argmax(a) == argmax(r))
                    .count(),
                steps,
                greedy_same: greedy
                    .iter()
                    .zip(ref_greedy)
                    .take_while(|(a, b)| a == b)
                    .count(),
            });
        }
    }
    Ok(rows)
}

/// Hands out consecutive block ids: every run of [`check`] gets blocks of its own.
#[derive(Default)]
struct BlockBump(u32);

impl BlockBump {
    fn take(&mut self, n: usize) -> Vec<u32> {
        let table = (self.0..self.0 + n as u32).collect();
        self.0 += n as u32;
        table
    }
}

/// Prefills `prompt` and runs `steps` decode steps on blocks `table`, each step consuming
/// `forced[step]` when given (teacher forcing), else the previous step's greedy token: the
/// logits of the prompt's last token and of every step, and the greedy token after each.
fn decode(
    model: &mut dyn StepModel,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
    table: Vec<u32>,
) -> anyhow::Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let mut batch = ForwardBatch::default();
    batch.push(prompt, 0, table.clone(), true);
    let mut logits = vec![model.forward(&batch)?.remove(0)];
    let mut greedy = vec![argmax(&logits[0])];
    for s in 0..steps {
        let input = forced.map_or(greedy[s], |f| f[s]);
        let mut batch = ForwardBatch::default();
        batch.push(&[input], prompt.len() + s, table.clone(), true);
        let row = model.forward(&batch)?.remove(0);
        greedy.push(argmax(&row));
        logits.push(row);
    }
    Ok((logits, greedy))
}

/// The index of the largest logit (the first of equal ones): the greedy token.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `|a - reference| / |reference|`; infinite where `a` holds a NaN or infinity.
pub fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (num, den) = a
        .iter()
        .zip(reference)
        .fold((0.0f64, 0.0f64), |(n, d), (&x, &r)| {
            (n + (x as f64 - r as f64).powi(2), d + (r as f64).powi(2))
        });
    (num / den.max(1e-30)).sqrt()
}

/// The check's rows as a table.
pub fn describe_check(rows: &[CheckRow]) -> String {
    let mut out = format!(
        "{:>5} {:>7} {:>11} {:>11} {:>11} {:>8} {:>12}\n",
        "ranks", "prompt", "prefill_l2", "decode_l2", "max_l2", "top1", "greedy_same"
    );
    for r in rows {
        out += &format!(
            "{:>5} {:>7} {:>11.2e} {:>11.2e} {:>11.2e} {:>8} {:>12}\n",
            r.ranks,
            r.prompt_tokens,
            r.prefill_rel_l2,
            r.decode_rel_l2,
            r.max_rel_l2,
            format!("{}/{}", r.top1_agree, r.steps),
            format!("{}/{}", r.greedy_same, r.steps + 1)
        );
    }
    out
}

/// Median milliseconds of one decode step of `batches[i]` sequences, for each `i`, through
/// `model` (its cache filled first: every sequence has `context` tokens of its own).
fn decode_steps(
    model: &mut dyn StepModel,
    batches: &[usize],
    context: usize,
    iters: usize,
) -> anyhow::Result<Vec<f64>> {
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let per_seq = (context + 1).div_ceil(BLOCK_SIZE);
    let table = |s: usize| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect::<Vec<_>>();
    let vocab = model.vocab_size();
    let token = |s: usize, i: usize| ((s * 7919 + i * 104_729 + 13) % vocab) as u32;
    // Fill: every sequence's prompt, several to a forward.
    let mut fill = ForwardBatch::default();
    for s in 0..max_batch {
        let prompt: Vec<u32> = (0..context).map(|i| token(s, i)).collect();
        if !fill.tokens.is_empty() && fill.tokens.len() + context > FILL_TOKENS {
            model.forward(&std::mem::take(&mut fill))?;
        }
        fill.push(&prompt, 0, table(s), false);
    }
    if !fill.tokens.is_empty() {
        model.forward(&fill)?;
    }
    let mut medians = Vec::new();
    for &batch in batches {
        let mut step = ForwardBatch::default();
        for s in 0..batch {
            step.push(&[token(s, context)], context, table(s), true);
        }
        let greedy = vec![
            RowRequest {
                temperature: 0.0,
                uniform: 0.5,
                candidates: false,
                truncation: None,
            };
            batch
        ];
        let one = |model: &mut dyn StepModel| -> anyhow::Result<f64> {
            let started = Instant::now();
            match model.device_sampling() {
                Some(sampler) => {
                    std::hint::black_box(sampler.forward_summarized(&step, &greedy)?);
                }
                None => {
                    std::hint::black_box(model.forward(&step)?);
                }
            }
            Ok(started.elapsed().as_secs_f64() * 1e3)
        };
        for _ in 0..3 {
            one(&mut *model)?;
        }
        let times = (0..iters)
            .map(|_| one(&mut *model))
            .collect::<anyhow::Result<Vec<_>>>()?;
        medians.push(median(times));
    }
    Ok(medians)
}

/// Median milliseconds of one decode step's all-reduces alone (two a layer, of `[batch,
/// hidden]` f32) over `ranks` GPUs from `cuda:first`, for each batch of `batches`, each rank in
/// a thread of its own as the workers run them; 0 for one GPU.
fn all_reduce_ms(
    first: usize,
    ranks: usize,
    batches: &[usize],
    config: &ModelConfig,
    iters: usize,
) -> anyhow::Result<Vec<f64>> {
    if ranks < 2 {
        return Ok(vec![0.0; batches.len()]);
    }
    let mut backends = (first..first + ranks)
        .map(|ordinal| {
            CudaBackend::new(&CudaOptions {
                cuda_graphs: false,
                ..CudaOptions::from_env(ordinal)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let streams = backends.iter().map(|b| b.stream().clone()).collect();
    for (backend, comm) in backends.iter_mut().zip(nccl_communicators(streams)?) {
        backend.join_group(comm);
    }
    let sums = 2 * config.num_hidden_layers;
    let row = vec![1.0f32; config.hidden_size];
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = backends
            .iter()
            .map(|backend| {
                let row = &row;
                s.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let mut medians = Vec::with_capacity(batches.len());
                    for &batch in batches {
                        let mut x = backend.upload_rows(&vec![row.clone(); batch])?;
                        let mut times = Vec::new();
                        for _ in 0..iters + 3 {
                            backend.synchronize()?;
                            let started = Instant::now();
                            for _ in 0..sums {
                                backend.all_reduce_sum(&mut x)?;
                            }
                            backend.synchronize()?;
                            times.push(started.elapsed().as_secs_f64() * 1e3);
                        }
                        medians.push(median(times[3..].to_vec()));
                    }
                    Ok(medians)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an all-reduce thread panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    // Rank 0's view; every rank waits for the slowest anyway.
    Ok(times.into_iter().next().unwrap_or_default())
}

/// The rows as a table.
pub fn describe(rows: &[TpRow]) -> String {
    let mut out = format!(
        "{:>5} {:>6} {:>8} {:>10} {:>14} {:>10} {:>6}\n",
        "ranks", "batch", "context", "step ms", "all-reduce ms", "floor ms", "ratio"
    );
    for r in rows {
        out += &format!(
            "{:>5} {:>6} {:>8} {:>10.3} {:>14.3} {:>10.3} {:>6.2}\n",
            r.ranks, r.batch, r.context, r.median_ms, r.all_reduce_ms, r.floor_ms, r.ratio
        );
    }
    out
}
