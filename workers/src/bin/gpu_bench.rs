//! GPU correctness check and benchmark of the CUDA backend (run it on a machine with an NVIDIA
//! GPU; see docs/benchmarks.md for the commands and results).
//!
//! `gpu_bench check --model DIR`: the same prompts through the CPU backend (f32 arithmetic) and
//! the CUDA backend: last-position logits (relative L2), 32 teacher-forced decode steps
//! (relative L2 and top-1 agreement), free-running greedy tokens, a batched forward against the
//! sequences alone, a prefill split in two chunks against one. Exits non-zero past the limits.
//!
//! `gpu_bench bench --model DIR`: measures the two ceilings on this device (device-to-device
//! copy bandwidth, cuBLAS bf16 GEMM rate), then decode step time at several batch sizes over a
//! fixed context and prefill throughput at several prompt lengths, each with its floor
//! (bytes that must move / copy bandwidth, FLOPs / GEMM rate) and the ratio to it.
//!
//! `gpu_bench grammar --model DIR`: engine decode step time with and without a JSON-schema
//! grammar at batch 1 and 32 (`tandem_workers::grammar_bench`, as `cpu_bench grammar`).
//!
//! `gpu_bench tp --model DIR --ranks 1,2`: decode steps of the model split over tensor-parallel
//! ranks (one GPU each from `--ordinal`) against one GPU, each against its floor
//! (`tandem_workers::tp_bench`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cudarc::driver::sys::CUevent_flags;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_model::ModelConfig;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::backend::cuda::{CudaBackend, CudaKvCache, CudaOptions};
use tandem_workers::backend::{
    AttentionShape, Backend, BatchPlan, DeviceSampler, HostTensor, InputScale, KvBlockIo,
    QuantScales, WeightDType,
};
use tandem_workers::kv_cache::KvDType;
use tandem_workers::model::{ForwardBatch, Model, ModelOptions};
use tandem_workers::sampler::device::{RowRequest, Truncation};
use tandem_workers::tp_bench::{argmax, matrix_params, rel_l2};
use tandem_workers::transfer::cuda_ipc::CudaIpcTransport;
use tandem_workers::transfer::pool::SLICE_ALIGN;
use tandem_workers::transfer::ucx::UcxTransport;
use tandem_workers::transfer::{Exported, KvBytes, KvBytesMut, KvTransport, RemoteKv, host_id};

#[derive(Parser)]
#[command(about = "Check the CUDA backend against the CPU backend, and time it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare CUDA and CPU outputs on one model directory.
    Check {
        #[arg(long)]
        model: PathBuf,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        /// Teacher-forced / greedy decode steps.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Prompt lengths (random token ids).
        #[arg(long, value_delimiter = ',', default_values_t = vec![7, 100, 300])]
        prompts: Vec<usize>,
        /// CPU threads for the reference.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Fail when the mean relative L2 of the logits exceeds this.
        #[arg(long, default_value_t = 1e-2)]
        max_rel_l2: f64,
        /// Fail when teacher-forced top-1 agreement is below this.
        #[arg(long, default_value_t = 0.99)]
        min_top1: f64,
        /// Element type of the KV cache (bf16 or fp8), on both backends.
        #[arg(long, default_value = "bf16", value_parser = parse_kv_dtype)]
        kv_cache_dtype: KvDType,
    },
    /// Time decode steps and prefills against the device's ceilings.
    Bench {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8, 32, 128])]
        batches: Vec<usize>,
        /// Context (cached tokens) of every decoding sequence.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        #[arg(long, value_delimiter = ',', default_values_t = vec![512, 2048, 8192])]
        prefill: Vec<usize>,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Write the table as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Element type of the KV cache (bf16 or fp8), on both backends.
        #[arg(long, default_value = "bf16", value_parser = parse_kv_dtype)]
        kv_cache_dtype: KvDType,
        /// A LoRA adapter (PEFT directory) every timed sequence computes with: what its
        /// products cost the steps (the context is filled without it).
        #[arg(long)]
        lora: Option<PathBuf>,
        /// Bracket one more run of each prefill, after the timed ones, with
        /// cuProfilerStart/Stop (for `ncu --profile-from-start off`).
        #[arg(long)]
        profile: bool,
    },
    /// Time one step that mixes decodes with prompt chunks, as a loaded server runs them
    /// (chunked prefill beside the running batch), against its decode and prefill parts run
    /// alone. With `--profile` only the timed mixed steps run inside cuProfilerStart/Stop, so
    /// `ncu --profile-from-start off` sees nothing else (scripts/device/ncu_mixed.sh).
    Mixed {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        /// Decoding sequences in the step.
        #[arg(long, default_value_t = 214)]
        decodes: usize,
        /// Cached tokens of every decoding sequence.
        #[arg(long, default_value_t = 2112)]
        context: usize,
        /// Prompt chunks in the step, each `cached+new` tokens (a later chunk of a prompt
        /// attends to its cached part) or `new` (a prompt's first chunk).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["2048".to_string(), "1500+560".to_string()])]
        chunks: Vec<String>,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Bracket the timed mixed steps with cuProfilerStart/Stop.
        #[arg(long)]
        profile: bool,
        /// The KV cache's element type: `bf16` or `fp8`.
        #[arg(long, default_value = "bf16", value_parser = parse_kv_dtype)]
        kv_cache_dtype: KvDType,
    },
    /// Decode steps of the model split over tensor-parallel ranks against one GPU: each step
    /// against the bytes one GPU reads at the copy rate plus the step's all-reduces alone.
    Tp {
        #[arg(long)]
        model: PathBuf,
        /// The first rank's CUDA device; rank r runs on ordinal + r.
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        /// Group sizes to measure (1: one GPU, the same eager path).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2])]
        ranks: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 32])]
        batches: Vec<usize>,
        /// Context (cached tokens) of every decoding sequence.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Replay decode steps from CUDA graphs, as workers do; eager by default.
        #[arg(long)]
        cuda_graphs: bool,
        /// Write the rows as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The logits of the model split over tensor-parallel ranks against one GPU's:
    /// teacher-forced decode steps (relative L2, top-1 agreement) and free-running greedy
    /// tokens, as `check` compares the CUDA backend with the CPU.
    TpCheck {
        #[arg(long)]
        model: PathBuf,
        /// The first rank's CUDA device (and the one GPU of the reference).
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        /// Group sizes to compare with one GPU.
        #[arg(long, value_delimiter = ',', default_values_t = vec![2])]
        ranks: Vec<usize>,
        /// Prompt lengths.
        #[arg(long, value_delimiter = ',', default_values_t = vec![7, 100, 300])]
        prompts: Vec<usize>,
        /// Teacher-forced / greedy decode steps.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Fail when the mean relative L2 of the logits exceeds this.
        #[arg(long, default_value_t = 1e-2)]
        max_rel_l2: f64,
        /// Fail when teacher-forced top-1 agreement is below this.
        #[arg(long, default_value_t = 0.99)]
        min_top1: f64,
        /// Replay decode steps from CUDA graphs (see `tp`); eager by default.
        #[arg(long)]
        cuda_graphs: bool,
        /// Write the rows as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every algorithm configuration cuBLASLt accepts for the scaled FP8 products of
    /// Llama-3.1-8B's projections (qkv, o, gate_up, down), each timed, against the heuristic's
    /// answer that the projections run; random e4m3 operands with per-row and per-token
    /// scales. `TANDEM_FP8_FAST_ACCUM=1` times them with fast accumulation.
    Fp8Tactics {
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        /// Activation rows of each product.
        #[arg(long, value_delimiter = ',', default_values_t = vec![8192, 768])]
        rows: Vec<usize>,
        /// Timed runs of each configuration (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// The fastest configurations listed per product.
        #[arg(long, default_value_t = 6)]
        top: usize,
    },
    /// Engine decode step time with and without a JSON-schema grammar.
    Grammar {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 0)]
        ordinal: usize,
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 32])]
        batches: Vec<usize>,
        /// Decode steps timed per measurement.
        #[arg(long, default_value_t = 64)]
        steps: usize,
    },
}

fn main() -> Result<()> {
    tandem_cli::init_logging("warn");
    match Cli::parse().command {
        Command::Check {
            model,
            ordinal,
            steps,
            prompts,
            threads,
            max_rel_l2,
            min_top1,
            kv_cache_dtype,
        } => check(
            &model,
            ordinal,
            steps,
            &prompts,
            threads,
            (max_rel_l2, min_top1),
            kv_cache_dtype,
        ),
        Command::Bench {
            model,
            ordinal,
            batches,
            context,
            prefill,
            iters,
            json,
            kv_cache_dtype,
            lora,
            profile,
        } => bench(
            &model,
            ordinal,
            &batches,
            context,
            (&prefill, profile),
            iters,
            json,
            kv_cache_dtype,
            lora.as_deref(),
        ),
        Command::Mixed {
            model,
            ordinal,
            decodes,
            context,
            chunks,
            iters,
            profile,
            kv_cache_dtype,
        } => {
            // `--chunks ''`: decodes only.
            let chunks = chunks
                .iter()
                .filter(|c| !c.is_empty())
                .map(|c| parse_chunk(c))
                .collect::<Result<Vec<_>>>()?;
            let what = MixedStep {
                decodes,
                context,
                chunks: &chunks,
                kv_dtype: kv_cache_dtype,
            };
            mixed(&model, ordinal, &what, iters, profile)
        }
        Command::Tp {
            model,
            ordinal,
            ranks,
            batches,
            context,
            iters,
            cuda_graphs,
            json,
        } => {
            // The copy rate on the first rank's GPU, before any model takes its memory.
            let copy =
                ceilings(&CudaBackend::new(&CudaOptions::from_env(ordinal))?)?.copy_bytes_per_s;
            println!(
                "copy ceiling on cuda:{ordinal}: {:.2} TB/s (read + write)",
                copy / 1e12
            );
            let what = tandem_workers::tp_bench::StepsToTime {
                rank_counts: ranks,
                batches,
                context,
                iters,
                cuda_graphs,
            };
            let rows = tandem_workers::tp_bench::run(&model, ordinal, &what, copy)?;
            print!("{}", tandem_workers::tp_bench::describe(&rows));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
            }
            Ok(())
        }
        Command::TpCheck {
            model,
            ordinal,
            ranks,
            prompts,
            steps,
            max_rel_l2,
            min_top1,
            cuda_graphs,
            json,
        } => {
            let rows = tandem_workers::tp_bench::check(
                &model,
                tandem_workers::device::Device::Cuda(ordinal),
                &ranks,
                &prompts,
                steps,
                cuda_graphs,
            )?;
            print!("{}", tandem_workers::tp_bench::describe_check(&rows));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
            }
            let forced: usize = rows.iter().map(|r| r.steps).sum();
            let agree: usize = rows.iter().map(|r| r.top1_agree).sum();
            let mean_l2 = rows
                .iter()
                .map(|r| {
                    (r.prefill_rel_l2 + r.decode_rel_l2 * r.steps as f64) / (r.steps + 1) as f64
                })
                .sum::<f64>()
                / rows.len().max(1) as f64;
            let top1 = agree as f64 / forced.max(1) as f64;
            println!(
                "mean relative L2 {mean_l2:.3e} (max {max_rel_l2:.1e}), top-1 {top1:.3} (min {min_top1})"
            );
            anyhow::ensure!(
                mean_l2 <= max_rel_l2 && top1 >= min_top1,
                "the split model's logits are farther from one GPU's than allowed"
            );
            println!("PASS");
            Ok(())
        }
        Command::Fp8Tactics {
            ordinal,
            rows,
            iters,
            top,
        } => fp8_tactics(ordinal, &rows, iters, top),
        Command::Grammar {
            model,
            ordinal,
            batches,
            steps,
        } => {
            let results = tandem_workers::grammar_bench::run(
                &model,
                tandem_workers::device::Device::Cuda(ordinal),
                0,
                &batches,
                steps,
            )?;
            print!("{}", tandem_workers::grammar_bench::describe(&results));
            println!("{}", serde_json::to_string(&results)?);
            Ok(())
        }
    }
}

/// Tokens per KV block: 16 (the block size of every earlier table in docs/benchmarks.md; GPU
/// workers now default to 64, so `TANDEM_BENCH_BLOCK=64` measures what they run) unless
/// `TANDEM_BENCH_BLOCK` says otherwise: the block size decides prefill attention's TMA boxes.
static BLOCK_SIZE: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("TANDEM_BENCH_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&b: &usize| b > 0)
        .unwrap_or(16)
});

/// A model, its cache, and a bump allocator of blocks for sequences.
struct Runner<B: Backend> {
    model: Model<B>,
    kv: B::KvCache,
    next_block: u32,
}

impl<B: Backend> Runner<B> {
    fn new(model: Model<B>, blocks: usize) -> Result<Self> {
        let kv = model.alloc_kv_cache(*BLOCK_SIZE, blocks)?;
        Ok(Runner {
            model,
            kv,
            next_block: 0,
        })
    }

    fn blocks(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(*BLOCK_SIZE) as u32;
        let table = (self.next_block..self.next_block + n).collect();
        self.next_block += n;
        table
    }

    /// One forward of several sequences: (tokens, cached_len, block table) each.
    fn forward(&mut self, seqs: &[(&[u32], usize, &[u32])]) -> Result<Vec<Vec<f32>>> {
        let mut batch = ForwardBatch::default();
        for (tokens, cached, table) in seqs {
            batch.push(tokens, *cached, table.to_vec(), true);
        }
        Ok(self.model.forward(&batch, &mut self.kv)?)
    }
}

fn random_tokens(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// A KV dtype by its wire name (`bf16`, `fp8`, ...).
fn parse_kv_dtype(name: &str) -> Result<KvDType, String> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|e| e.to_string())
}

fn check(
    dir: &std::path::Path,
    ordinal: usize,
    steps: usize,
    prompt_lens: &[usize],
    threads: usize,
    (max_rel_l2, min_top1): (f64, f64),
    kv_dtype: KvDType,
) -> Result<()> {
    let config = ModelConfig::load(dir)?;
    // The CPU reference keeps the GPU's cache type too: the comparison is then of the
    // arithmetic, not of the cache's number format.
    let options = ModelOptions {
        kv_dtype: Some(kv_dtype),
        ..ModelOptions::default()
    };
    let cpu = Model::load(
        dir,
        CpuBackend::new(&CpuOptions {
            threads,
            ..Default::default()
        })?,
        &options,
    )?;
    let gpu = Model::load(
        dir,
        CudaBackend::new(&CudaOptions::from_env(ordinal))?,
        &options,
    )?;
    println!(
        "model {} ({} layers)",
        dir.display(),
        config.num_hidden_layers
    );
    println!("cpu: {}", cpu.backend().describe());
    println!("gpu: {}", gpu.backend().describe());
    let total: usize = prompt_lens
        .iter()
        .map(|l| 3 * (l + steps + 4 * *BLOCK_SIZE))
        .sum::<usize>()
        * 3;
    let blocks = total.div_ceil(*BLOCK_SIZE) + 8;
    let mut cpu = Runner::new(cpu, blocks)?;
    let mut gpu = Runner::new(gpu, blocks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut failures = Vec::new();
    let (mut agree, mut positions, mut l2_sum, mut l2_n) = (0usize, 0usize, 0.0f64, 0usize);
    let mut prompts = Vec::new();
    println!(
        "{:>7} {:>12} {:>12} {:>12} {:>10} {:>14}",
        "prompt", "prefill_l2", "decode_l2", "max_l2", "top1", "greedy_same"
    );
    for &len in prompt_lens {
        let prompt = random_tokens(&mut rng, len, config.vocab_size);
        prompts.push(prompt.clone());
        let ctable = cpu.blocks(len + steps + 1);
        let gtable = gpu.blocks(len + steps + 1);
        let c = cpu.forward(&[(&prompt, 0, &ctable)])?;
        let g = gpu.forward(&[(&prompt, 0, &gtable)])?;
        let prefill_l2 = rel_l2(&g[0], &c[0]);
        // Teacher forcing: both consume the CPU's greedy tokens.
        let (mut next, mut step_l2, mut max_l2, mut top1) = (argmax(&c[0]), 0.0, prefill_l2, 0);
        let mut cpu_greedy = vec![next];
        for s in 0..steps {
            let pos = len + s;
            let c = cpu.forward(&[(&[next], pos, &ctable)])?;
            let g = gpu.forward(&[(&[next], pos, &gtable)])?;
            let l2 = rel_l2(&g[0], &c[0]);
            step_l2 += l2;
            max_l2 = max_l2.max(l2);
            top1 += usize::from(argmax(&g[0]) == argmax(&c[0]));
            next = argmax(&c[0]);
            cpu_greedy.push(next);
        }
        // Free-running greedy on the GPU from the same prompt.
        let gtable2 = gpu.blocks(len + steps + 1);
        let g = gpu.forward(&[(&prompt, 0, &gtable2)])?;
        let mut gnext = argmax(&g[0]);
        let mut same = usize::from(gnext == cpu_greedy[0]);
        let mut diverged = gnext != cpu_greedy[0];
        for s in 0..steps {
            let g = gpu.forward(&[(&[gnext], len + s, &gtable2)])?;
            gnext = argmax(&g[0]);
            if !diverged && gnext == cpu_greedy[s + 1] {
                same += 1;
            } else {
                diverged = true;
            }
        }
        let decode_l2 = step_l2 / steps.max(1) as f64;
        agree += top1;
        positions += steps;
        l2_sum += prefill_l2 + step_l2;
        l2_n += 1 + steps;
        println!(
            "{len:>7} {prefill_l2:>12.2e} {decode_l2:>12.2e} {max_l2:>12.2e} {:>10} {:>14}",
            format!("{top1}/{steps}"),
            format!("{same}/{}", steps + 1)
        );
    }
    // Batched and chunked on the GPU against the sequences alone on the GPU.
    let tables: Vec<Vec<u32>> = prompts.iter().map(|p| gpu.blocks(p.len() + 1)).collect();
    let seqs: Vec<(&[u32], usize, &[u32])> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| (p.as_slice(), 0, t.as_slice()))
        .collect();
    let batched = gpu.forward(&seqs)?;
    let mut batch_l2 = 0.0f64;
    let mut chunk_l2 = 0.0f64;
    for (i, p) in prompts.iter().enumerate() {
        let t = gpu.blocks(p.len() + 1);
        let alone = gpu.forward(&[(p, 0, &t)])?;
        batch_l2 = batch_l2.max(rel_l2(&batched[i], &alone[0]));
        // Both chunks past the GEMV's rows: a step's projection kernel is chosen by its row
        // count (the GEMV up to `gemv_max_rows`, at most `GEMV_MAX_ROWS`), so a chunk of a few
        // rows sums in another order than the whole prompt (1.2e-2 on SmolLM2's real weights
        // at 7 tokens; chunks of 7+ rows are bitwise the one prefill). Shorter prompts are
        // not split.
        let min_chunk = tandem_workers::backend::cuda::kernels::GEMV_MAX_ROWS + 1;
        let split = (p.len() / 2).max(min_chunk);
        if p.len() >= split + min_chunk {
            let t2 = gpu.blocks(p.len() + 1);
            let first = gpu.forward(&[(&p[..split], 0, &t2)])?;
            drop(first);
            let second = gpu.forward(&[(&p[split..], split, &t2)])?;
            chunk_l2 = chunk_l2.max(rel_l2(&second[0], &alone[0]));
        }
    }
    // Decode steps of a batch of all prompts, replayed from CUDA graphs vs run eagerly.
    let mut graph_runs = Vec::new();
    for graphs in [false, true] {
        retune(gpu.model.backend(), |o| o.cuda_graphs = graphs)?;
        let tables: Vec<Vec<u32>> = prompts.iter().map(|p| gpu.blocks(p.len() + 8)).collect();
        for (p, t) in prompts.iter().zip(&tables) {
            gpu.forward(&[(p, 0, t)])?;
        }
        let mut steps_out = Vec::new();
        for step in 0..6u32 {
            let toks: Vec<[u32; 1]> = (0..prompts.len() as u32).map(|i| [1 + step + i]).collect();
            let seqs: Vec<(&[u32], usize, &[u32])> = prompts
                .iter()
                .zip(&tables)
                .zip(&toks)
                .map(|((p, t), tok)| (tok.as_slice(), p.len() + step as usize, t.as_slice()))
                .collect();
            steps_out.push(gpu.forward(&seqs)?);
        }
        graph_runs.push(steps_out);
    }
    let mut graph_l2 = 0.0f64;
    for (eager, replay) in graph_runs[0].iter().zip(&graph_runs[1]) {
        for (e, r) in eager.iter().zip(replay) {
            graph_l2 = graph_l2.max(rel_l2(r, e));
        }
    }
    // Not bitwise: a graph's attention is split for its context bucket, the eager step for the
    // batch's own longest context, so long contexts are summed in another order.
    println!("decode steps replayed from CUDA graphs vs eager, max relative L2: {graph_l2:.3e}");
    if graph_l2.is_nan() || graph_l2 >= 1e-2 {
        failures.push(format!(
            "CUDA graph replay differs from eager: {graph_l2:.3e}"
        ));
    }
    let mean_l2 = l2_sum / l2_n.max(1) as f64;
    let top1_rate = agree as f64 / positions.max(1) as f64;
    println!("mean relative L2 (prefill + decode): {mean_l2:.3e} (limit {max_rel_l2:.0e})");
    println!(
        "teacher-forced top-1 agreement: {agree}/{positions} = {top1_rate:.4} (limit {min_top1})"
    );
    println!("batched vs alone (GPU), max relative L2: {batch_l2:.3e}");
    println!("two chunks vs one prefill (GPU), max relative L2: {chunk_l2:.3e}");
    if mean_l2.is_nan() || mean_l2 > max_rel_l2 {
        failures.push(format!("mean relative L2 {mean_l2:.3e} > {max_rel_l2:.0e}"));
    }
    if top1_rate < min_top1 {
        failures.push(format!("top-1 agreement {top1_rate:.4} < {min_top1}"));
    }
    // An FP8 model's batched rows run other kernels than its rows alone (GEMV up to 8 rows,
    // cuBLASLt's bf16 result above), and an FP8 cache's chunks and batches other attention
    // kernels (prefill tiles, decode rows); FP8 rounding carries that difference to its own
    // noise level (workers/tests/cuda_fp8.rs): the bound is then the CPU comparison's.
    let same_bound = if config.fp8_scheme().is_some() || kv_dtype == KvDType::Fp8 {
        max_rel_l2
    } else {
        1e-2
    };
    if !(batch_l2 < same_bound && chunk_l2 < same_bound) {
        failures.push(format!(
            "batched {batch_l2:.3e} / chunked {chunk_l2:.3e} differ from the sequences alone"
        ));
    }
    if failures.is_empty() {
        println!("CHECK PASSED");
        Ok(())
    } else {
        bail!("CHECK FAILED: {}", failures.join("; "))
    }
}

struct Ceilings {
    copy_bytes_per_s: f64,
    gemm_flops_per_s: f64,
    /// The FP8 rate of the same product through the backend's FP8 path (activation
    /// quantization included), on GPUs with FP8 tensor cores.
    fp8_gemm_flops_per_s: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Copy bandwidth (bytes read + written per second, 1 GiB device-to-device) and the bf16 GEMM
/// rate of the backend's own `linear` path (8192 x 8192 x 8192), timed with device events.
fn ceilings(gpu: &CudaBackend) -> Result<Ceilings> {
    let stream = gpu.stream();
    let ctx = gpu.context();
    let n = 1usize << 28; // 2^28 f32 = 1 GiB
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let host: Vec<f32> = (0..1 << 20).map(|_| rng.random::<f32>()).collect();
    let mut src = stream.alloc_zeros::<f32>(n)?;
    for chunk in 0..(n >> 20) {
        stream.memcpy_htod(&host, &mut src.slice_mut(chunk << 20..(chunk + 1) << 20))?;
    }
    let mut dst = stream.alloc_zeros::<f32>(n)?;
    let mut times = Vec::new();
    for _ in 0..12 {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        end.record(stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64 / 1e3);
    }
    let copy = 2.0 * 4.0 * n as f64 / median(times[2..].to_vec());
    drop((src, dst));

    let dim = 8192usize;
    let mut values = Vec::with_capacity(dim * dim * 2);
    for _ in 0..dim * dim {
        values.extend_from_slice(&half::bf16::from_f32(rng.random::<f32>() - 0.5).to_le_bytes());
    }
    let shape = [dim, dim];
    let t = HostTensor {
        scales: Default::default(),
        dtype: WeightDType::Bf16,
        shape: &shape,
        bytes: &values,
    };
    let w = gpu.upload_weight(&[t])?;
    let ones: Vec<u8> = (0..dim).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let norm = gpu.upload_weight(&[HostTensor {
        scales: Default::default(),
        dtype: WeightDType::F32,
        shape: &[dim],
        bytes: &ones,
    }])?;
    // A bf16 activation [dim, dim] as the backend makes one: the norm of an f32 tensor.
    let xw = gpu.upload_weight(&[t])?;
    let plan_tokens: Vec<u32> = (0..dim as u32).map(|i| i % dim as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push(&plan_tokens, 0, vec![0; dim.div_ceil(*BLOCK_SIZE)], false);
    let inv_freq = vec![1.0f32; 64];
    let plan = tandem_workers::backend::BatchPlan::new(&batch, *BLOCK_SIZE, &inv_freq);
    let meta = gpu.prepare_batch(&plan)?;
    let x32 = gpu.embedding(&xw, &meta)?;
    let x = gpu.rms_norm(&x32, &norm, 1e-5)?;
    let mut times = Vec::new();
    for _ in 0..12 {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        let y = gpu.linear(&x, &w, None)?;
        end.record(stream)?;
        end.synchronize()?;
        drop(y);
        times.push(start.elapsed_ms(&end)? as f64 / 1e3);
    }
    let gemm = 2.0 * (dim as f64).powi(3) / median(times[2..].to_vec());
    // The same product with the weight in FP8 (one scale per row), where the GPU has FP8.
    let codes: Vec<u8> = values
        .chunks_exact(2)
        .map(|b| {
            let v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            WeightDType::F8E4M3.encode(&[v * 448.0 / 0.5])[0]
        })
        .collect();
    let row_scales = vec![0.5f32 / 448.0; dim];
    let fp8 = HostTensor {
        dtype: WeightDType::F8E4M3,
        shape: &shape,
        bytes: &codes,
        scales: QuantScales {
            weight: &row_scales,
            input: InputScale::PerToken,
        },
    };
    let time_fp8 = || -> Result<f64> {
        let w8 = gpu.upload_weight(&[fp8])?;
        let mut times = Vec::new();
        for _ in 0..12 {
            let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            start.record(stream)?;
            let y = gpu.linear_to_residual(&x, &w8, None)?;
            end.record(stream)?;
            end.synchronize()?;
            drop(y);
            times.push(start.elapsed_ms(&end)? as f64 / 1e3);
        }
        Ok(2.0 * (dim as f64).powi(3) / median(times[2..].to_vec()))
    };
    let fp8_gemm = match time_fp8() {
        Ok(rate) => Some(rate),
        Err(e) => {
            println!("no FP8 ceiling: {e:#}");
            None
        }
    };
    Ok(Ceilings {
        copy_bytes_per_s: copy,
        gemm_flops_per_s: gemm,
        fp8_gemm_flops_per_s: fp8_gemm,
    })
}

/// A `[rows, k]` bf16 activation made the way the forward makes one (embedding + norm).
fn activation(
    gpu: &CudaBackend,
    rows: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> Result<<CudaBackend as Backend>::Tensor> {
    let values: Vec<u8> = (0..rows * k)
        .flat_map(|_| half::bf16::from_f32(rng.random::<f32>() - 0.5).to_le_bytes())
        .collect();
    let shape = [rows, k];
    let table = gpu.upload_weight(&[HostTensor {
        scales: Default::default(),
        dtype: WeightDType::Bf16,
        shape: &shape,
        bytes: &values,
    }])?;
    let ones: Vec<u8> = (0..k).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let norm = gpu.upload_weight(&[HostTensor {
        scales: Default::default(),
        dtype: WeightDType::F32,
        shape: &[k],
        bytes: &ones,
    }])?;
    let tokens: Vec<u32> = (0..rows as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push(&tokens, 0, vec![0; rows.div_ceil(*BLOCK_SIZE)], false);
    let plan = tandem_workers::backend::BatchPlan::new(&batch, *BLOCK_SIZE, &[1.0f32; 2]);
    let meta = gpu.prepare_batch(&plan)?;
    let x = gpu.embedding(&table, &meta)?;
    Ok(gpu.rms_norm(&x, &norm, 1e-5)?)
}

/// A prompt's KV blocks to the host and back (what a context worker hands to the transfer
/// and a decode worker writes from it), one block per call as before pinned staging, and
/// through the backend's batched copies.
fn kv_copies(gpu: &CudaBackend, kv: &mut CudaKvCache, blocks: &[u32], iters: usize) -> Result<()> {
    let block_bytes = gpu.kv_cache_layout(kv).block_bytes();
    let mut host = vec![0u8; blocks.len() * block_bytes];
    let reps = iters.clamp(3, 10);
    let total = (blocks.len() * block_bytes) as f64;
    let rate = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let started = Instant::now();
                f().map(|_| started.elapsed().as_secs_f64())
            })
            .collect::<Result<_>>()?;
        Ok(total / median(times) / 1e9)
    };
    let read_each = rate(&mut || {
        for (&b, chunk) in blocks.iter().zip(host.chunks_exact_mut(block_bytes)) {
            gpu.read_kv_block(kv, b, chunk)?;
        }
        Ok(())
    })?;
    let read_batched =
        rate(&mut || Ok(gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut host))?))?;
    let snapshot = host.clone();
    let write_each = rate(&mut || {
        for (&b, chunk) in blocks.iter().zip(snapshot.chunks_exact(block_bytes)) {
            gpu.write_kv_block(kv, b, chunk)?;
        }
        Ok(())
    })?;
    let write_batched =
        rate(&mut || Ok(gpu.write_kv_blocks(kv, blocks, KvBytes::Host(&snapshot))?))?;
    gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut host))?;
    anyhow::ensure!(
        host == snapshot,
        "KV blocks changed on their way to the host and back"
    );
    println!(
        "KV blocks to/from host ({} blocks of {:.2} MB): device->host {read_each:.1} GB/s one \
         block per call, {read_batched:.1} GB/s batched through pinned staging; host->device \
         {write_each:.1} / {write_batched:.1} GB/s",
        blocks.len(),
        block_bytes as f64 / 1e6
    );

    // A context worker's export: memory reserved in the UCX transport, the blocks copied in.
    // Without a pool each export maps a region of its own (copied through the staging
    // buffer); with the pool pinned, the copy engine writes the slice directly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let export = |transport: &UcxTransport| -> Result<f64> {
        rate(&mut || {
            let mut buffer = runtime.block_on(transport.reserve(total as usize))?;
            let bytes = buffer.host_bytes_mut().context("UCX exports host memory")?;
            gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(bytes))?;
            drop(buffer.finish()?);
            Ok(())
        })
    };
    let own_regions = export(&UcxTransport::start()?)?;
    // Room for the export's seal too (a page, as slices start on pages).
    let pooled = UcxTransport::start_with_pool(total as usize + SLICE_ALIGN)?;
    let pool = pooled.pool().context("the transport kept no pool")?;
    // SAFETY: the transport keeps its pool mapped until the process exits.
    let pinned = unsafe { gpu.pin_host_memory(pool) }?;
    anyhow::ensure!(pinned, "the CUDA backend did not pin the transfer pool");
    let pool_rate = export(&pooled)?;
    let mut check = runtime.block_on(pooled.reserve(total as usize))?;
    let check_bytes = check.host_bytes_mut().context("UCX exports host memory")?;
    gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut *check_bytes))?;
    anyhow::ensure!(
        *check_bytes == *snapshot.as_slice(),
        "the pinned export differs from the staged copy"
    );
    println!(
        "KV export ({:.1} MB): {own_regions:.1} GB/s into a UCX region of its own through the \
         staging buffer, {pool_rate:.1} GB/s straight into the pinned pool",
        total / 1e6
    );

    // A decode worker's import of that export: pulled over UCX (both transports in this
    // process, so tcp loopback unless UCX_TLS says otherwise), then written into the cache,
    // from a fresh Vec through the staging buffer or from a slice of the puller's pinned
    // pool. The pull and the write are timed apart: the write is what the pool changes.
    let exported = check.finish()?;
    let remote = RemoteKv {
        memory: exported.memory.clone(),
        regions: vec![(exported.addr(), exported.len())],
        seal: exported.seal,
    };
    let pool_puller = UcxTransport::start_with_pool(total as usize)?;
    let pool = pool_puller.pool().context("the transport kept no pool")?;
    // SAFETY: the transport keeps its pool mapped until the process exits.
    anyhow::ensure!(unsafe { gpu.pin_host_memory(pool) }?);
    let mut import = |puller: &UcxTransport, lent: bool| -> Result<(f64, f64)> {
        let pull = || runtime.block_on(puller.pull(remote.clone(), Duration::from_secs(30)));
        let pull_rate = rate(&mut || pull().map(drop).map_err(Into::into))?;
        let pulled = pull()?;
        anyhow::ensure!(pulled.is_lent() == lent, "pulled into the wrong memory");
        let bytes = pulled.host().context("UCX pulls into host memory")?;
        let write_rate =
            rate(&mut || Ok(gpu.write_kv_blocks(kv, blocks, KvBytes::Host(bytes))?))?;
        Ok((pull_rate, write_rate))
    };
    let (vec_pull, vec_write) = import(&UcxTransport::start()?, false)?;
    let (pool_pull, pool_write) = import(&pool_puller, true)?;
    gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut host))?;
    anyhow::ensure!(
        host == snapshot,
        "the K/V imported from the pinned pool differs"
    );
    println!(
        "KV import ({:.1} MB): UCX pull {vec_pull:.1} GB/s into a Vec, {pool_pull:.1} GB/s into \
         the pool; write into the cache {vec_write:.1} GB/s from the Vec through the staging \
         buffer, {pool_write:.1} GB/s straight from the pinned pool",
        total / 1e6
    );

    // Between GPU workers of one host: CUDA IPC. The export copies the blocks into a slice of
    // the exporter's device pool, the pull copies the regions out of that pool into a slice of
    // the puller's (in one process the pool is reached at its own address instead of through
    // cuIpcOpenMemHandle: the same device-to-device copy), the import copies them into the
    // cache. Each is one pass over the bytes, read and written in device memory.
    let ordinal = gpu.context().ordinal();
    let exporter = CudaIpcTransport::start(ordinal, total as usize + SLICE_ALIGN, host_id())?;
    let puller = CudaIpcTransport::start(ordinal, total as usize, host_id())?;
    let export_ipc = || -> Result<Exported> {
        let mut buffer = runtime.block_on(exporter.reserve(total as usize))?;
        let KvBytesMut::Device(range) = buffer.bytes_mut() else {
            bail!("a CUDA IPC export is device memory");
        };
        gpu.read_kv_blocks(kv, blocks, KvBytesMut::Device(range))?;
        Ok(buffer.finish()?)
    };
    let ipc_export = rate(&mut || export_ipc().map(drop))?;
    let exported = export_ipc()?;
    let remote = RemoteKv {
        memory: exported.memory.clone(),
        regions: (0..blocks.len() as u64)
            .map(|i| (exported.addr() + i * block_bytes as u64, block_bytes as u64))
            .collect(),
        seal: exported.seal,
    };
    let pull = || runtime.block_on(puller.pull(remote.clone(), Duration::from_secs(30)));
    let ipc_pull = rate(&mut || pull().map(drop).map_err(Into::into))?;
    let pulled = pull()?;
    let KvBytes::Device(range) = pulled.bytes() else {
        bail!("a CUDA IPC pull is device memory");
    };
    let ipc_write = rate(&mut || Ok(gpu.write_kv_blocks(kv, blocks, KvBytes::Device(range))?))?;
    gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut host))?;
    anyhow::ensure!(
        host == snapshot,
        "the K/V that went through CUDA IPC pools differs"
    );
    println!(
        "KV over CUDA IPC ({:.1} MB, device to device): export into the device pool \
         {ipc_export:.1} GB/s, pull into the reader's pool {ipc_pull:.1} GB/s, write into the \
         cache {ipc_write:.1} GB/s (bytes moved once per step; the copy ceiling counts read + \
         write)",
        total / 1e6
    );
    drop((pulled, exported));

    // The hand-over without copies (what context workers do): the cache itself shared over
    // CUDA IPC once, an export is its blocks in place (a seal written, nothing copied), the
    // pull gathers them, one copy per block, into the reader's pool.
    let memory = gpu
        .kv_cache_memory(kv)
        .context("the CUDA cache describes its memory")?;
    let sharer = CudaIpcTransport::start(ordinal, 0, host_id())?;
    // SAFETY: `kv` outlives the exposure, dropped at the end of this function.
    let exposed = runtime
        .block_on(unsafe { sharer.expose_cache(memory, Box::new(())) })?
        .context("CUDA IPC shares a device cache")?;
    let mut export_times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        drop(exposed.export(blocks, Box::new(()))?);
        export_times.push(started.elapsed().as_secs_f64());
    }
    let exported = exposed.export(blocks, Box::new(()))?;
    let remote = RemoteKv {
        memory: exported.memory.clone(),
        regions: exported.regions.clone(),
        seal: exported.seal,
    };
    let pull = || runtime.block_on(puller.pull(remote.clone(), Duration::from_secs(30)));
    let in_place_pull = rate(&mut || pull().map(drop).map_err(Into::into))?;
    let pulled = pull()?;
    let KvBytes::Device(range) = pulled.bytes() else {
        bail!("a CUDA IPC pull is device memory");
    };
    gpu.write_kv_blocks(kv, blocks, KvBytes::Device(range))?;
    gpu.read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut host))?;
    anyhow::ensure!(
        host == snapshot,
        "the K/V read in place out of the cache differs"
    );
    println!(
        "KV over CUDA IPC in place ({:.1} MB): export (seal only, no copy) {:.1} us, pull \
         straight out of the cache into the reader's pool {in_place_pull:.1} GB/s",
        total / 1e6,
        median(export_times) * 1e6
    );
    drop((pulled, exported, exposed));
    Ok(())
}

/// Seconds `op` takes on the device (CUDA events around it; median of `iters`, at least 5,
/// after two warm-ups). What `op` returns is dropped after the end event.
fn time_on_device<T>(
    gpu: &CudaBackend,
    iters: usize,
    mut op: impl FnMut() -> Result<T>,
) -> Result<f64> {
    let (ctx, stream) = (gpu.context(), gpu.stream());
    let mut times = Vec::new();
    for _ in 0..iters.max(5) + 2 {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        let out = op()?;
        end.record(stream)?;
        end.synchronize()?;
        drop(out);
        times.push(start.elapsed_ms(&end)? as f64 / 1e3);
    }
    Ok(median(times[2..].to_vec()))
}

/// Seconds of one `gpu.linear(x, w)` on the device ([`time_on_device`]).
fn time_linear(
    gpu: &CudaBackend,
    x: &<CudaBackend as Backend>::Tensor,
    w: &<CudaBackend as Backend>::Weight,
    iters: usize,
) -> Result<f64> {
    time_on_device(gpu, iters, || Ok(gpu.linear(x, w, None)?))
}

/// FLOPs of causal attention over `len` tokens for `width` = query heads x head dim, one
/// layer (q·kᵀ and p·v over the lower triangle).
fn causal_attention_flops(len: usize, width: usize) -> f64 {
    4.0 * len as f64 * (len as f64 + 1.0) / 2.0 * width as f64
}

/// Each projection shape of the model at 1, 2, 4 and 8 rows through the GEMV kernel and
/// cuBLAS (weight bytes read per second: the decode step's cost), then cuBLAS alone at each of
/// `rows_list` (the benchmark's batches and prefill lengths), then skinny.cu against cuBLAS
/// where the kernels have it. Returns skinny.cu's failed checks (the caller fails after its
/// table).
fn projections(
    gpu: &CudaBackend,
    c: &ModelConfig,
    rows_list: &[usize],
    iters: usize,
) -> Result<Vec<String>> {
    let hd = c.head_dim();
    let q = c.num_attention_heads * hd;
    let kv = c.num_kv_heads() * hd;
    let h = c.hidden_size;
    let shapes = [
        ("qkv", h, q + 2 * kv),
        ("o", q, h),
        ("gate_up", h, 2 * c.intermediate_size),
        ("down", c.intermediate_size, h),
        ("lm_head", h, c.vocab_size),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // The first two tables are the GEMV kernel's and cuBLAS's: skinny.cu's own rows follow.
    let before = gpu.options();
    retune(gpu, |o| o.skinny_gemm = false)?;
    println!("projections: weight GB/s (ms) by rows, GEMV kernel | cuBLAS");
    let mut large_rows = Vec::new();
    for (name, k, n) in shapes {
        let values: Vec<u8> = (0..n * k)
            .flat_map(|_| half::bf16::from_f32(rng.random::<f32>() - 0.5).to_le_bytes())
            .collect();
        let shape = [n, k];
        let w = gpu.upload_weight(&[HostTensor {
            scales: Default::default(),
            dtype: WeightDType::Bf16,
            shape: &shape,
            bytes: &values,
        }])?;
        let mut line = format!("  {name:<8} {k:>6}x{n:<7}");
        for rows in [1usize, 2, 4, 8] {
            let x = activation(gpu, rows, k, &mut rng)?;
            for gemv in [true, false] {
                retune(gpu, |o| o.gemv_max_rows = if gemv { 8 } else { 0 })?;
                let t = time_linear(gpu, &x, &w, iters)?;
                line += &format!(
                    " {}{:>5.0}({:.3})",
                    if gemv { "m" } else { "|" },
                    (2 * n * k) as f64 / t / 1e9,
                    t * 1e3
                );
            }
        }
        println!("{line}");
        large_rows.push((name, w, k, n));
    }
    retune(gpu, |o| o.gemv_max_rows = 0)?;
    // Batches and prefills: cuBLAS against its ceilings, the weights' bytes (what a decode
    // batch of 32-512 rows should be bound by) and the GEMM rate (what a prefill should be).
    println!("projections, cuBLAS by rows: TFLOP/s, weight TB/s (ms)");
    for (name, w, k, n) in &large_rows {
        let mut line = format!("  {name:<8} {k:>6}x{n:<7}");
        for &rows in rows_list {
            let x = activation(gpu, rows, *k, &mut rng)?;
            let t = time_linear(gpu, &x, w, iters)?;
            line += &format!(
                " {rows}: {:.0}, {:.2} ({:.3})",
                (2 * rows * n * k) as f64 / t / 1e12,
                (2 * n * k) as f64 / t / 1e12,
                t * 1e3
            );
        }
        println!("{line}");
    }
    // skinny.cu (Hopper) at the decode batches among `rows_list` and at 1, 4, 8, 9, 17, 64,
    // 100, 200, 256 rows (below 5 the GEMV kernel's rows, for comparison with the first table):
    // its weight TB/s next to cuBLAS's in the same call, and its output checked against
    // cuBLAS's.
    let mut failed = Vec::new();
    if gpu.skinny_compiled() {
        retune(gpu, |o| o.skinny_everywhere = true)?;
        let mut skinny_rows: Vec<usize> = rows_list
            .iter()
            .copied()
            .chain([1, 4, 8, 9, 17, 64, 100, 200, 256])
            .filter(|&r| (1..=tandem_workers::backend::cuda::kernels::SKINNY_MAX_ROWS).contains(&r))
            .collect();
        skinny_rows.sort_unstable();
        skinny_rows.dedup();
        println!(
            "projections, skinny.cu vs cuBLAS by rows: weight TB/s skinny | cuBLAS (skinny ms), \
             relative L2 of skinny against cuBLAS (fails above {SKINNY_MAX_REL_L2:.0e})"
        );
        for (name, w, k, n) in &large_rows {
            let mut line = format!("  {name:<8} {k:>6}x{n:<7}");
            for &rows in &skinny_rows {
                let x = activation(gpu, rows, *k, &mut rng)?;
                let mut times = [0.0f64; 2];
                let mut outs = Vec::new();
                for (i, on) in [true, false].into_iter().enumerate() {
                    retune(gpu, |o| o.skinny_gemm = on)?;
                    times[i] = time_linear(gpu, &x, w, iters)?;
                    outs.push(gpu.to_host(&gpu.linear(&x, w, None)?)?.concat());
                }
                let diff = rel_l2(&outs[0], &outs[1]);
                let bytes = (2 * n * k) as f64;
                line += &format!(
                    " {rows}: {:.2}|{:.2} ({:.3}) {diff:.1e}",
                    bytes / times[0] / 1e12,
                    bytes / times[1] / 1e12,
                    times[0] * 1e3
                );
                if diff.is_nan() || diff > SKINNY_MAX_REL_L2 {
                    failed.push(format!("{name} at {rows} rows: relative L2 {diff:.2e}"));
                }
            }
            println!("{line}");
        }
    }
    gpu.set_options(&before)?;
    Ok(failed)
}

/// Each projection shape of the model with FP8 weights (random codes, per-channel scales,
/// activations quantized per token) at decode sizes: `skinny.cu`'s FP8 kernel against
/// cuBLASLt's FP8 GEMM, weight TB/s (one byte a weight) and the relative L2 between the two.
/// Returns the failed checks (the caller fails after its table); nothing where the kernels
/// have no `skinny.cu` (not Hopper: FP8 on sm_90a is a given).
fn fp8_projections(
    gpu: &CudaBackend,
    c: &ModelConfig,
    rows_list: &[usize],
    iters: usize,
) -> Result<Vec<String>> {
    use tandem_workers::backend::{InputScale, QuantScales};
    let mut failed = Vec::new();
    if !gpu.skinny_compiled() {
        return Ok(failed);
    }
    let hd = c.head_dim();
    let q = c.num_attention_heads * hd;
    let kv = c.num_kv_heads() * hd;
    let h = c.hidden_size;
    let shapes = [
        ("qkv", h, q + 2 * kv),
        ("o", q, h),
        ("gate_up", h, 2 * c.intermediate_size),
        ("down", c.intermediate_size, h),
    ];
    let mut rows: Vec<usize> = rows_list
        .iter()
        .copied()
        .chain([5, 8, 16, 17, 32, 64, 128, 200, 256])
        .filter(|&r| (5..=tandem_workers::backend::cuda::kernels::SKINNY_MAX_ROWS).contains(&r))
        .collect();
    rows.sort_unstable();
    rows.dedup();
    let before = gpu.options();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    println!(
        "projections of FP8 weights, skinny.cu vs cuBLASLt by rows: weight TB/s skinny | \
         cuBLASLt (skinny ms), relative L2 of skinny against cuBLASLt (fails above \
         {FP8_SKINNY_MAX_REL_L2:.0e})"
    );
    for (name, k, n) in shapes {
        let codes: Vec<u8> = (0..n * k)
            .map(|_| {
                // Finite e4m3 codes of magnitude at most 1 (exponent field below 8).
                let c: u8 = rng.random();
                c & 0xbf
            })
            .collect();
        let row_scales: Vec<f32> = (0..n)
            .map(|_| rng.random_range(0.5f32..2.0) / 64.0)
            .collect();
        let shape = [n, k];
        let w = gpu.upload_weight(&[HostTensor {
            dtype: WeightDType::F8E4M3,
            shape: &shape,
            bytes: &codes,
            scales: QuantScales {
                weight: &row_scales,
                input: InputScale::PerToken,
            },
        }])?;
        let mut line = format!("  {name:<8} {k:>6}x{n:<7}");
        for &r in &rows {
            let x = activation(gpu, r, k, &mut rng)?;
            let mut times = [0.0f64; 2];
            let mut outs = Vec::new();
            for (i, on) in [true, false].into_iter().enumerate() {
                retune(gpu, |o| {
                    o.skinny_fp8 = on;
                    // Every row count it has, past the rows it is dispatched for.
                    o.skinny_everywhere = true;
                })?;
                times[i] = time_linear(gpu, &x, &w, iters)?;
                outs.push(gpu.to_host(&gpu.linear(&x, &w, None)?)?.concat());
            }
            let diff = rel_l2(&outs[0], &outs[1]);
            let bytes = (n * k) as f64;
            line += &format!(
                " {r}: {:.2}|{:.2} ({:.3}) {diff:.1e}",
                bytes / times[0] / 1e12,
                bytes / times[1] / 1e12,
                times[0] * 1e3
            );
            if diff.is_nan() || diff > FP8_SKINNY_MAX_REL_L2 {
                failed.push(format!("fp8 {name} at {r} rows: relative L2 {diff:.2e}"));
            }
        }
        println!("{line}");
    }
    gpu.set_options(&before)?;
    Ok(failed)
}

/// Largest relative L2 of `skinny.cu`'s FP8 projections against cuBLASLt's that `bench`
/// accepts: the same quantized operands, f32 sums in both, but cuBLASLt's result is bf16.
const FP8_SKINNY_MAX_REL_L2: f64 = 1e-2;

/// Changes `gpu`'s run-time settings ([`CudaBackend::set_options`]) as `change` does: kernels
/// compared on one loaded model, whose weights and KV cache a second backend would have to
/// load and fill again.
fn retune(gpu: &CudaBackend, change: impl FnOnce(&mut CudaOptions)) -> Result<()> {
    let mut options = gpu.options();
    change(&mut options);
    Ok(gpu.set_options(&options)?)
}

/// Largest relative L2 (whole output) of skinny.cu's projections against cuBLAS's that
/// `bench` accepts: both accumulate bf16 products in f32, in different orders.
const SKINNY_MAX_REL_L2: f64 = 1e-3;

/// The largest relative L2 between two kernels' outputs of the same rows, row by row.
fn worst_row_l2(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| rel_l2(x, y))
        .fold(0.0f64, f64::max)
}

/// `rows` fused q/k/v rows of uniform values in [-0.5, 0.5) on the device: the input of an
/// attention kernel timed alone.
fn random_qkv(
    gpu: &CudaBackend,
    shape: &AttentionShape,
    rows: usize,
    rng: &mut ChaCha8Rng,
) -> Result<<CudaBackend as Backend>::Tensor> {
    let rows: Vec<Vec<f32>> = (0..rows)
        .map(|_| {
            (0..shape.qkv_width())
                .map(|_| rng.random::<f32>() - 0.5)
                .collect()
        })
        .collect();
    Ok(gpu.upload_rows(&rows)?)
}

/// The prefill attention kernel alone, one layer of one sequence of each prefill length (the
/// cache holds the K/V of the last prefill): what torch's SDPA is compared with
/// (`torch_bench.py`'s "prefill attention" rows).
fn prefill_attention(
    gpu: &CudaBackend,
    shape: &AttentionShape,
    kv: &CudaKvCache,
    prefill: &[usize],
    iters: usize,
    rng: &mut ChaCha8Rng,
) -> Result<()> {
    for &len in prefill {
        let qkv = random_qkv(gpu, shape, len, rng)?;
        let tokens: Vec<u32> = vec![0; len];
        let mut batch = ForwardBatch::default();
        batch.push(
            &tokens,
            0,
            (0..len.div_ceil(*BLOCK_SIZE) as u32).collect(),
            true,
        );
        let plan = BatchPlan::new(&batch, *BLOCK_SIZE, &vec![1.0f32; shape.head_dim / 2]);
        let meta = gpu.prepare_batch(&plan)?;
        let flops = causal_attention_flops(len, shape.head_dim * shape.num_heads);
        // Hopper's warpgroup kernel and flash.cu's, the same call: their outputs agree (the
        // largest relative L2 over rows is printed) and each one's time.
        let kernels: &[(bool, &str)] = if gpu.has_flash_wgmma() && shape.head_dim == 128 {
            &[(true, "wgmma"), (false, "mma.sync")]
        } else {
            &[(false, "mma.sync")]
        };
        let mut outputs = Vec::new();
        for &(wgmma, name) in kernels {
            retune(gpu, |o| o.flash_wgmma = wgmma)?;
            let t = time_on_device(gpu, iters, || {
                Ok(gpu.paged_attention(&qkv, &meta, shape, kv, 0)?)
            })?;
            outputs.push(gpu.to_host(&gpu.paged_attention(&qkv, &meta, shape, kv, 0)?)?);
            println!(
                "prefill attention {len} tokens (one layer, {name}): {:.3} ms, {:.0} TFLOP/s",
                t * 1e3,
                flops / t / 1e12
            );
        }
        retune(gpu, |o| o.flash_wgmma = true)?;
        if let [a, b] = outputs.as_slice() {
            let worst = worst_row_l2(a, b);
            println!(
                "prefill attention {len} tokens: wgmma vs mma.sync, largest row relative L2 {worst:.2e}"
            );
        }
    }
    Ok(())
}

/// The decode attention kernel alone, one layer, `batch` sequences at `context` keys each (the
/// decode bench's cache and block tables): the tensor-core kernel and the vectorized one in the
/// same call, their K/V read rate against the copy ceiling, and how far apart their outputs are.
fn decode_attention(
    gpu: &CudaBackend,
    shape: &AttentionShape,
    kv: &CudaKvCache,
    tables: &[Vec<u32>],
    context: usize,
    iters: usize,
    rng: &mut ChaCha8Rng,
) -> Result<()> {
    let batch = tables.len();
    let qkv = random_qkv(gpu, shape, batch, rng)?;
    let mut b = ForwardBatch::default();
    for table in tables {
        b.push(&[0], context, table.clone(), true);
    }
    let plan = BatchPlan::new(&b, *BLOCK_SIZE, &vec![1.0f32; shape.head_dim / 2]);
    let meta = gpu.prepare_batch(&plan)?;
    // K and V of every key, at the cache's element size.
    let bytes = (batch * (context + 1) * shape.num_kv_heads * shape.head_dim * 2) as f64
        * kv.layout().dtype.size_bytes() as f64;
    let mut outputs = Vec::new();
    let mut line = format!("decode attention batch {batch}, context {context} (one layer):");
    let was_on = gpu.options().decode_mma;
    for (mma, name) in [(true, "mma"), (false, "vec")] {
        retune(gpu, |o| o.decode_mma = mma)?;
        let t = time_on_device(gpu, iters, || {
            Ok(gpu.paged_attention(&qkv, &meta, shape, kv, 0)?)
        })?;
        outputs.push(gpu.to_host(&gpu.paged_attention(&qkv, &meta, shape, kv, 0)?)?);
        line += &format!(" {name} {:.1} us, {:.2} TB/s;", t * 1e6, bytes / t / 1e12);
    }
    retune(gpu, |o| o.decode_mma = was_on)?;
    let worst = worst_row_l2(&outputs[0], &outputs[1]);
    println!("{line} largest row relative L2 {worst:.2e}");
    Ok(())
}

/// What a benchmarked decode step does with its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepMode {
    /// Greedy on the device (`argmax_rows`).
    DeviceGreedy,
    /// Every row copied to the host.
    HostLogits,
    /// Top-p 0.9 drawn on the device (`summarize_rows`).
    DeviceSampling,
}

#[derive(serde::Serialize)]
struct Row {
    workload: String,
    tokens: usize,
    median_ms: f64,
    /// Decode: the step with logits copied to the host (the engine's path on the CPU, and on
    /// the GPU for requests the device summary does not decide).
    median_ms_host_logits: Option<f64>,
    /// Decode: the step with top-p sampling summarised on the device (`sample.cu`), the
    /// engine's path on the GPU.
    median_ms_device_sampling: Option<f64>,
    /// Host time to queue the forward (before waiting for the device).
    median_ms_enqueue: f64,
    /// Decode: the step without CUDA graphs.
    median_ms_eager: Option<f64>,
    tokens_per_s: f64,
    floor_ms: f64,
    floor_kind: &'static str,
    ratio: f64,
}

#[allow(clippy::too_many_arguments)]
fn bench(
    dir: &std::path::Path,
    ordinal: usize,
    batches: &[usize],
    context: usize,
    (prefill, profile): (&[usize], bool),
    iters: usize,
    json: Option<PathBuf>,
    kv_dtype: KvDType,
    lora: Option<&std::path::Path>,
) -> Result<()> {
    let config = ModelConfig::load(dir)?;
    let backend = CudaBackend::new(&CudaOptions::from_env(ordinal))?;
    let ceil = ceilings(&backend)?;
    println!(
        "ceilings: copy {:.2} TB/s (read + write), cuBLAS bf16 GEMM {:.0} TFLOP/s, FP8 GEMM {}",
        ceil.copy_bytes_per_s / 1e12,
        ceil.gemm_flops_per_s / 1e12,
        ceil.fp8_gemm_flops_per_s
            .map_or("-".to_string(), |f| format!("{:.0} TFLOP/s", f / 1e12))
    );
    // An FP8 model reads one byte per projection weight (its lm_head stays bf16) and runs
    // its projections at the FP8 rate.
    let fp8 = config.fp8_scheme().is_some();
    let (layer_bytes, layer_flops_per_s) = match (fp8, ceil.fp8_gemm_flops_per_s) {
        (true, Some(rate)) => (1.0, rate),
        _ => (2.0, ceil.gemm_flops_per_s),
    };
    if fp8 {
        println!("FP8 model: floors count 1 byte per projection weight, 2 per lm_head weight");
    }
    if kv_dtype != KvDType::Bf16 {
        println!(
            "KV cache: {} ({} byte(s) an element in the floors)",
            kv_dtype.name(),
            kv_dtype.size_bytes()
        );
    }
    let options = ModelOptions {
        kv_dtype: Some(kv_dtype),
        ..ModelOptions::default()
    };
    let mut model = Model::load(dir, backend, &options).context("loading the model")?;
    // The timed sequences' adapter (index 0 of the model's), where one is given.
    let adapter = match lora {
        Some(path) => {
            let module = tandem_protocol::config::LoraModule {
                name: "bench".into(),
                path: path.to_path_buf(),
            };
            model
                .load_adapters(&[module], "gpu_bench")
                .with_context(|| format!("loading the adapter {}", path.display()))?;
            println!("LoRA adapter {}: every timed sequence", path.display());
            Some(0)
        }
        None => None,
    };
    let model = model;
    let layout = model.kv_layout(*BLOCK_SIZE);
    let (layer_params, lm_head) = matrix_params(&config);
    let weight_bytes = layer_bytes * layer_params as f64 + 2.0 * lm_head as f64;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let max_prefill = prefill.iter().copied().max().unwrap_or(0);
    let per_seq = (context + 1).div_ceil(*BLOCK_SIZE);
    let blocks = (max_batch * per_seq).max(max_prefill.div_ceil(*BLOCK_SIZE)) + 1;
    let mut kv = model.alloc_kv_cache(*BLOCK_SIZE, blocks)?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut rows = Vec::new();

    // Fill one sequence's context with real K/V, then copy its blocks to every sequence.
    let prompt = random_tokens(&mut rng, context, config.vocab_size);
    let base: Vec<u32> = (0..per_seq as u32).collect();
    for chunk in (0..context).step_by(2048) {
        let end = (chunk + 2048).min(context);
        let mut b = ForwardBatch::default();
        b.push(&prompt[chunk..end], chunk, base.clone(), false);
        model.forward(&b, &mut kv)?;
    }
    for s in 1..max_batch {
        for (i, &src) in base.iter().enumerate() {
            model
                .backend()
                .copy_kv_block(&mut kv, src, (s * per_seq + i) as u32)?;
        }
    }
    model.backend().synchronize()?;

    for &batch_size in batches {
        let tables: Vec<Vec<u32>> = (0..batch_size)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        decode_attention(
            model.backend(),
            &model.attention_shape(),
            &kv,
            &tables,
            context,
            iters,
            &mut rng,
        )?;
        let sampling_requests: Vec<RowRequest> = (0..batch_size)
            .map(|s| RowRequest {
                temperature: 0.8,
                uniform: (s as f64 + 0.5) / batch_size as f64,
                candidates: false,
                truncation: Some(Truncation {
                    top_k: 0,
                    top_p: 0.9,
                    min_p: 0.0,
                }),
            })
            .collect();
        let step = |kv: &mut _, mode: StepMode| -> Result<(f64, f64)> {
            let tokens = random_tokens(
                &mut ChaCha8Rng::seed_from_u64(9),
                batch_size,
                config.vocab_size,
            );
            let mut b = ForwardBatch::default();
            for (s, t) in tables.iter().enumerate() {
                b.push(&tokens[s..s + 1], context, t.clone(), true);
                b.set_adapter_from(s, adapter);
            }
            let started = Instant::now();
            let mut queued = 0.0;
            if mode == StepMode::HostLogits {
                let logits = model.forward(&b, kv)?;
                std::hint::black_box(logits);
            } else if let Some(logits) = model.forward_logits(&b, kv)? {
                queued = started.elapsed().as_secs_f64();
                if mode == StepMode::DeviceSampling {
                    let backend = model.backend();
                    std::hint::black_box(backend.summarize_rows(&logits, &sampling_requests)?);
                } else {
                    std::hint::black_box(model.backend().argmax_rows(&logits)?);
                }
            }
            Ok((started.elapsed().as_secs_f64(), queued))
        };
        retune(model.backend(), |o| o.cuda_graphs = false)?;
        for _ in 0..2 {
            step(&mut kv, StepMode::DeviceGreedy)?;
        }
        let eager: Vec<(f64, f64)> = (0..iters)
            .map(|_| step(&mut kv, StepMode::DeviceGreedy))
            .collect::<Result<_>>()?;
        retune(model.backend(), |o| o.cuda_graphs = true)?;
        for _ in 0..3 {
            step(&mut kv, StepMode::DeviceGreedy)?;
        }
        let device: Vec<(f64, f64)> = (0..iters)
            .map(|_| step(&mut kv, StepMode::DeviceGreedy))
            .collect::<Result<_>>()?;
        let host: Vec<f64> = (0..iters.min(10))
            .map(|_| step(&mut kv, StepMode::HostLogits).map(|(t, _)| t))
            .collect::<Result<_>>()?;
        let sampled: Vec<f64> = (0..iters)
            .map(|_| step(&mut kv, StepMode::DeviceSampling).map(|(t, _)| t))
            .collect::<Result<_>>()?;
        let enqueue = median(device.iter().map(|d| d.1).collect());
        let eager_ms = median(eager.iter().map(|d| d.0).collect()) * 1e3;
        let t = median(device.iter().map(|d| d.0).collect());
        let kv_bytes = (batch_size * (context + 1) * layout.num_layers * 2 * layout.token_stride())
            as f64
            * layout.dtype.size_bytes() as f64;
        let bytes_floor = (weight_bytes + kv_bytes) / ceil.copy_bytes_per_s;
        let flops_floor = 2.0 * batch_size as f64 * layer_params as f64 / layer_flops_per_s
            + 2.0 * batch_size as f64 * lm_head as f64 / ceil.gemm_flops_per_s;
        let (floor, kind) = if bytes_floor >= flops_floor {
            (bytes_floor, "bytes")
        } else {
            (flops_floor, "flops")
        };
        rows.push(Row {
            workload: format!("decode batch {batch_size}, context {context}"),
            tokens: batch_size,
            median_ms: t * 1e3,
            median_ms_host_logits: Some(median(host) * 1e3),
            median_ms_device_sampling: Some(median(sampled) * 1e3),
            median_ms_enqueue: enqueue * 1e3,
            median_ms_eager: Some(eager_ms),
            tokens_per_s: batch_size as f64 / t,
            floor_ms: floor * 1e3,
            floor_kind: kind,
            ratio: t / floor,
        });
    }

    for &len in prefill {
        let prompt = random_tokens(&mut rng, len, config.vocab_size);
        let table: Vec<u32> = (0..len.div_ceil(*BLOCK_SIZE) as u32).collect();
        let run = |kv: &mut _| -> Result<(f64, f64)> {
            let mut b = ForwardBatch::default();
            b.push(&prompt, 0, table.clone(), true);
            b.set_adapter_from(0, adapter);
            let started = Instant::now();
            let logits = model.forward_logits(&b, kv)?.context("no logits")?;
            let queued = started.elapsed().as_secs_f64();
            std::hint::black_box(model.backend().argmax_rows(&logits)?);
            Ok((started.elapsed().as_secs_f64(), queued))
        };
        run(&mut kv)?;
        let n = (iters / 4).max(3);
        let runs: Vec<(f64, f64)> = (0..n).map(|_| run(&mut kv)).collect::<Result<_>>()?;
        if profile {
            // SAFETY: no arguments; the context is current on this thread (the backend's).
            unsafe { cudarc::driver::sys::cuProfilerStart() }.result()?;
            run(&mut kv)?;
            // SAFETY: as for cuProfilerStart.
            unsafe { cudarc::driver::sys::cuProfilerStop() }.result()?;
        }
        let t = median(runs.iter().map(|r| r.0).collect());
        let enqueue = median(runs.iter().map(|r| r.1).collect());
        let attn_flops =
            causal_attention_flops(len, config.num_attention_heads * config.head_dim())
                * config.num_hidden_layers as f64;
        let floor = 2.0 * layer_params as f64 * len as f64 / layer_flops_per_s
            + (2.0 * lm_head as f64 + attn_flops) / ceil.gemm_flops_per_s;
        rows.push(Row {
            workload: format!("prefill {len} tokens"),
            tokens: len,
            median_ms: t * 1e3,
            median_ms_host_logits: None,
            median_ms_device_sampling: None,
            median_ms_enqueue: enqueue * 1e3,
            median_ms_eager: None,
            tokens_per_s: len as f64 / t,
            floor_ms: floor * 1e3,
            floor_kind: "flops",
            ratio: t / floor,
        });
    }

    prefill_attention(
        model.backend(),
        &model.attention_shape(),
        &kv,
        prefill,
        iters,
        &mut rng,
    )?;
    let large_rows: Vec<usize> = batches
        .iter()
        .copied()
        .filter(|&b| b >= 16)
        .chain(prefill.iter().copied())
        .collect();
    let mut skinny_failures = projections(model.backend(), &config, &large_rows, iters)?;
    if fp8 {
        skinny_failures.extend(fp8_projections(
            model.backend(),
            &config,
            &large_rows,
            iters,
        )?);
    }
    kv_copies(model.backend(), &mut kv, &base, iters)?;
    println!("model {} — {}", dir.display(), model.backend().describe());
    println!(
        "{:<34} {:>9} {:>10} {:>12} {:>11} {:>9} {:>10} {:>9} {:>6} {:>6}",
        "workload",
        "ms",
        "no graph",
        "host logits",
        "dev sample",
        "queue ms",
        "tok/s",
        "floor ms",
        "kind",
        "ratio"
    );
    for r in &rows {
        println!(
            "{:<34} {:>9.3} {:>10} {:>12} {:>11} {:>9.3} {:>10.0} {:>9.3} {:>6} {:>6.2}",
            r.workload,
            r.median_ms,
            r.median_ms_eager
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.median_ms_host_logits
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.median_ms_device_sampling
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.median_ms_enqueue,
            r.tokens_per_s,
            r.floor_ms,
            r.floor_kind,
            r.ratio
        );
    }
    if let Some(path) = json {
        let doc = serde_json::json!({
            "model": dir.display().to_string(),
            "device": model.backend().describe(),
            "copy_bytes_per_s": ceil.copy_bytes_per_s,
            "gemm_flops_per_s": ceil.gemm_flops_per_s,
            "rows": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    }
    if !skinny_failures.is_empty() {
        bail!(
            "skinny.cu disagrees with cuBLAS: {}",
            skinny_failures.join("; ")
        );
    }
    Ok(())
}

/// `cached+new` or `new` prompt tokens of one chunk.
fn parse_chunk(text: &str) -> Result<(usize, usize)> {
    let parse = |t: &str| {
        t.trim()
            .parse::<usize>()
            .with_context(|| format!("chunk {text:?}: {t:?} is not a token count"))
    };
    let (cached, new) = match text.split_once('+') {
        Some((cached, new)) => (parse(cached)?, parse(new)?),
        None => (0, parse(text)?),
    };
    if new == 0 {
        bail!("chunk {text:?} has no new tokens");
    }
    Ok((cached, new))
}

/// `gpu_bench mixed`: one step of `decodes` decoding sequences at `context` cached tokens and
/// the prompt `chunks` (cached, new), timed whole, then its decodes alone and its chunks
/// alone, so the table says what the mix costs beyond its parts. Every decoding sequence has
/// blocks of its own (copies of one prefilled context), so the decode attention reads as many
/// bytes from memory as in a server.
/// The step `gpu_bench mixed` times.
struct MixedStep<'a> {
    decodes: usize,
    context: usize,
    chunks: &'a [(usize, usize)],
    kv_dtype: KvDType,
}

fn mixed(
    dir: &std::path::Path,
    ordinal: usize,
    what: &MixedStep,
    iters: usize,
    profile: bool,
) -> Result<()> {
    let &MixedStep {
        decodes,
        context,
        chunks,
        kv_dtype,
    } = what;
    let config = ModelConfig::load(dir)?;
    let backend = CudaBackend::new(&CudaOptions::from_env(ordinal))?;
    let options = ModelOptions {
        kv_dtype: Some(kv_dtype),
        ..ModelOptions::default()
    };
    let model = Model::load(dir, backend, &options).context("loading the model")?;
    let block = *BLOCK_SIZE;
    let per_seq = (context + 1).div_ceil(block);
    let chunk_blocks: Vec<usize> = chunks
        .iter()
        .map(|(cached, new)| (cached + new).div_ceil(block))
        .collect();
    let blocks = decodes * per_seq + chunk_blocks.iter().sum::<usize>() + 1;
    let mut kv = model
        .alloc_kv_cache(block, blocks)
        .with_context(|| format!("allocating {blocks} KV blocks of {block} tokens"))?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);

    // One decoding sequence's context prefilled, its blocks copied to the others.
    let prompt = random_tokens(&mut rng, context, config.vocab_size);
    let base: Vec<u32> = (0..per_seq as u32).collect();
    for start in (0..context).step_by(2048) {
        let end = (start + 2048).min(context);
        let mut b = ForwardBatch::default();
        b.push(&prompt[start..end], start, base.clone(), false);
        model.forward(&b, &mut kv)?;
    }
    for s in 1..decodes {
        for (i, &src) in base.iter().enumerate() {
            let dst = (s * per_seq + i) as u32;
            model.backend().copy_kv_block(&mut kv, src, dst)?;
        }
    }
    let decode_tables: Vec<Vec<u32>> = (0..decodes)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut next = (decodes * per_seq) as u32;
    let chunk_tables: Vec<Vec<u32>> = chunk_blocks
        .iter()
        .map(|&n| {
            let table = (next..next + n as u32).collect();
            next += n as u32;
            table
        })
        .collect();
    let chunk_tokens: Vec<Vec<u32>> = chunks
        .iter()
        .map(|&(_, new)| random_tokens(&mut rng, new, config.vocab_size))
        .collect();
    // A later chunk's cached part, prefilled once.
    for (&(cached, _), table) in chunks.iter().zip(&chunk_tables) {
        let cached_tokens = random_tokens(&mut rng, cached, config.vocab_size);
        for start in (0..cached).step_by(2048) {
            let end = (start + 2048).min(cached);
            let mut b = ForwardBatch::default();
            b.push(&cached_tokens[start..end], start, table.clone(), false);
            model.forward(&b, &mut kv)?;
        }
    }
    model.backend().synchronize()?;
    let decode_tokens = random_tokens(&mut rng, decodes, config.vocab_size);

    let step = |kv: &mut CudaKvCache, with_decodes: bool, with_chunks: bool| -> Result<f64> {
        let mut b = ForwardBatch::default();
        if with_decodes {
            for (s, table) in decode_tables.iter().enumerate() {
                b.push(&decode_tokens[s..s + 1], context, table.clone(), true);
            }
        }
        if with_chunks {
            for ((&(cached, _), table), tokens) in
                chunks.iter().zip(&chunk_tables).zip(&chunk_tokens)
            {
                b.push(tokens, cached, table.clone(), true);
            }
        }
        let started = Instant::now();
        let logits = model.forward_logits(&b, kv)?.context("no logits")?;
        std::hint::black_box(model.backend().argmax_rows(&logits)?);
        Ok(started.elapsed().as_secs_f64())
    };
    let time = |kv: &mut CudaKvCache, d: bool, c: bool, profiled: bool| -> Result<f64> {
        for _ in 0..2 {
            step(kv, d, c)?;
        }
        if profiled {
            // SAFETY: no arguments; the context is current on this thread (the backend's).
            unsafe { cudarc::driver::sys::cuProfilerStart() }.result()?;
        }
        let times = (0..iters.max(1))
            .map(|_| step(kv, d, c))
            .collect::<Result<Vec<_>>>()?;
        if profiled {
            // SAFETY: as for cuProfilerStart.
            unsafe { cudarc::driver::sys::cuProfilerStop() }.result()?;
        }
        Ok(median(times) * 1e3)
    };
    // Steps queued back to back, as the engine overlaps them: the host's preparation of a
    // step hides behind the device's work on the one before.
    let pipelined = |kv: &mut CudaKvCache| -> Result<f64> {
        let mut b = ForwardBatch::default();
        for (s, table) in decode_tables.iter().enumerate() {
            b.push(&decode_tokens[s..s + 1], context, table.clone(), true);
        }
        for ((&(cached, _), table), tokens) in chunks.iter().zip(&chunk_tables).zip(&chunk_tokens) {
            b.push(tokens, cached, table.clone(), true);
        }
        step(kv, true, true)?;
        let started = Instant::now();
        for _ in 0..iters.max(1) {
            std::hint::black_box(model.forward_logits(&b, kv)?);
        }
        model.backend().synchronize()?;
        Ok(started.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
    };
    let whole = time(&mut kv, true, true, profile)?;
    if profile {
        println!("profiled {iters} mixed step(s): {whole:.2} ms (median)");
        return Ok(());
    }
    let queued = pipelined(&mut kv)?;
    retune(model.backend(), |o| o.concurrent_attention = false)?;
    let one_stream = time(&mut kv, true, true, false)?;
    let one_stream_queued = pipelined(&mut kv)?;
    retune(model.backend(), |o| o.concurrent_attention = true)?;
    let decodes_ms = time(&mut kv, true, false, false)?;
    // No chunks: the step is its decodes.
    let chunks_ms = if chunks.is_empty() {
        0.0
    } else {
        time(&mut kv, false, true, false)?
    };
    let prompt_tokens: usize = chunks.iter().map(|c| c.1).sum();
    println!("model {} — {}", dir.display(), model.backend().describe());
    println!(
        "mixed step: {decodes} decodes at context {context} + {prompt_tokens} prompt tokens in chunks {chunks:?}, block {block}"
    );
    println!(
        "  whole step    {whole:8.2} ms (median of {iters}); queued back to back {queued:.2} ms a step"
    );
    println!(
        "  one stream    {one_stream:8.2} ms; queued back to back {one_stream_queued:.2} ms a step (the two attentions one after the other)"
    );
    println!("  decodes alone {decodes_ms:8.2} ms");
    println!("  chunks alone  {chunks_ms:8.2} ms");
    println!(
        "  parts summed  {:8.2} ms; the mix costs {:+.2} ms",
        decodes_ms + chunks_ms,
        whole - decodes_ms - chunks_ms
    );
    Ok(())
}

/// Llama-3.1-8B's FP8 projections as (name, n, k): output features, input features.
const LLAMA_8B_PROJECTIONS: [(&str, usize, usize); 4] = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
];

/// `gpu_bench fp8-tactics`: each projection at each row count, cuBLASLt's configurations
/// timed against the heuristic's; then what the four would take with the fastest of each.
fn fp8_tactics(ordinal: usize, rows: &[usize], iters: usize, top: usize) -> Result<()> {
    let gpu = CudaBackend::new(&CudaOptions::from_env(ordinal))?;
    let stream = gpu.stream();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut codes = |len: usize| -> Result<cudarc::driver::CudaSlice<u8>> {
        let values: Vec<f32> = (0..len)
            .map(|_| 4.0 * (rng.random::<f32>() - 0.5))
            .collect();
        Ok(stream.clone_htod(&WeightDType::F8E4M3.encode(&values))?)
    };
    let most_rows = rows.iter().copied().max().unwrap_or(0);
    let most_k = LLAMA_8B_PROJECTIONS.iter().map(|p| p.2).max().unwrap_or(0);
    let x = codes(most_rows * most_k)?;
    let x_scales = stream.clone_htod(&vec![1.0f32 / 64.0; most_rows])?;
    println!(
        "cuBLASLt FP8 configurations (fast accumulation {}), median of {iters} runs each",
        if std::env::var("TANDEM_FP8_FAST_ACCUM").is_ok_and(|v| v != "0") {
            "on"
        } else {
            "off"
        }
    );
    for &m in rows {
        let (mut heuristic_total, mut best_total) = (0f64, 0f64);
        for (name, n, k) in LLAMA_8B_PROJECTIONS {
            let w = codes(n * k)?;
            let w_scales = stream.clone_htod(&vec![1.0f32 / 64.0; n])?;
            let x_rows = x.slice(0..m * k);
            let x_part = stream.clone_dtod(&x_rows)?;
            let tactics =
                gpu.fp8_gemm_tactics(&x_part, &x_scales, &w, &w_scales, m, k, n, iters)?;
            let flops = 2.0 * (m * n * k) as f64;
            let Some(heuristic) = tactics.iter().find(|t| t.heuristic) else {
                println!("{name} {m}x{n}x{k}: the heuristic's algorithm did not run");
                continue;
            };
            let mut ranked: Vec<_> = tactics.iter().filter(|t| t.rel_l2 < 1e-2).collect();
            ranked.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            let best = ranked.first().copied().unwrap_or(heuristic);
            heuristic_total += heuristic.seconds;
            best_total += best.seconds;
            println!(
                "{name} [{m}x{k}]·[{n}x{k}]ᵀ: {} configurations ran ({} within 1e-2 of the heuristic's \
                 result); heuristic {:.1} us {:.0} TFLOP/s (algo {} tile {} stages {} cluster {})",
                tactics.len(),
                ranked.len(),
                heuristic.seconds * 1e6,
                flops / heuristic.seconds / 1e12,
                heuristic.algo_id,
                heuristic.tile,
                heuristic.stages,
                heuristic.cluster
            );
            for t in ranked.iter().take(top) {
                println!(
                    "  algo {:>3} tile {:>3} stages {:>3} cluster {:>2}: {:>8.1} us {:>6.0} TFLOP/s \
                     {:>5.3}x the heuristic's time, rel L2 {:.1e}{}",
                    t.algo_id,
                    t.tile,
                    t.stages,
                    t.cluster,
                    t.seconds * 1e6,
                    flops / t.seconds / 1e12,
                    t.seconds / heuristic.seconds,
                    t.rel_l2,
                    if t.heuristic { " (heuristic)" } else { "" }
                );
            }
        }
        println!(
            "rows {m}: the four projections {:.1} us with the heuristic's algorithms, {:.1} us with \
             the fastest of each ({:.3}x)",
            heuristic_total * 1e6,
            best_total * 1e6,
            best_total / heuristic_total.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
