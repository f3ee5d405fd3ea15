//! CPU speed of the model: prefill of one prompt (tokens/s) and greedy-free decode at batch 1
//! (tokens/s), and a comparison of the `linear` kernel with the `gemm` crate on the model's
//! shapes.
//!
//! ```text
//! cargo run --release -p tandem-workers --bin cpu_bench -- model --model DIR [--threads 2]
//!     [--prompt-tokens 512] [--decode-tokens 64] [--widen-weights] [--json]
//! cargo run --release -p tandem-workers --bin cpu_bench -- matmul [--threads 2] [--rows 512]
//! cargo run --release -p tandem-workers --bin cpu_bench -- grammar --model DIR [--threads 2]
//!     [--batch 1 --batch 32] [--steps 32] [--json]
//! cargo run --release -p tandem-workers --bin cpu_bench -- kernels [--quant q8_0] [--k 1536]
//!     [--quant-kernels avx512-vnni] [--streamed-mib 512] [--json]
//! ```
//!
//! What the measurements decided (SmolLM2-135M, 2 shared cores of an AMD EPYC with AVX2; the
//! machine was busy with other builds, so numbers moved by +-30% between runs):
//! - bf16 weights stay bf16 and are widened in registers (decode) or per panel into a scratch
//!   (prefill). Widening whole matrices at load (`--widen-weights`) gave decode 23-27 tok/s
//!   instead of 36-38 (twice the bytes per token) and prefill 186 tok/s instead of 196-210.
//! - `linear` is our own kernel, not the `gemm` crate: on the model's prefill shapes (512 rows)
//!   it ran at 51-113 GFLOP/s against gemm's 54-117, close enough, and gemm's blocking depends
//!   on the matrix sizes, which would make a sequence's logits depend on the batch it runs in
//!   (see `backend::cpu::matmul`).
//! - GGUF blocks kept quantized (`model-prep import-gguf --keep-quant`, `backend::cpu::quant`),
//!   SmolLM2 on 2 threads of the AVX-512 VNNI EPYC (2026-11-27, shared machine): a first
//!   kernel that reduced each column's sums with horizontal adds prefilled Q4_1 at 840 tok/s;
//!   runs of four inputs of 8 columns (a lane per column, no horizontal adds) at 1150. By
//!   `--quant-kernels`, two rounds, prefill 512 tokens (Q4_1 / Q8_0): avx2 970-1009 / 896-920,
//!   avx2-vnni 1159-1180 / 1000-1019, avx512-vnni (two groups per pass) 1508-1510 /
//!   1452-1459 tok/s. Decode at one row with the paired AVX-512 kernel against the AVX-VNNI
//!   one, three alternating rounds, 256 tokens after a 64-token prompt: Q4_1 201-276 against
//!   289-343 tok/s, Q8_0 122-217 against 186-276, so rows below 4 kept 256-bit registers.
//!   On an Intel Xeon VM with AVX-512 VNNI (2026-12-02) pairing from one row decoded Q4_1
//!   15-20% faster instead (108-122 against 95-106 tok/s with 16-bit activations), so the
//!   threshold below 4 rows is now timed at load (`backend::cpu::quant::calibrate`;
//!   `--quant-pair-from-rows` fixes it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tandem_model::GgufQuant;
use tandem_workers::backend::Backend;
use tandem_workers::backend::cpu::quant::{self, ActivationCodes, Isa};
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions, matmul};
use tandem_workers::model::{ForwardBatch, Model, ModelOptions};

#[derive(Parser)]
#[command(about = "CPU speed of the tandem model and its kernels")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill and decode speed of a model directory.
    Model {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        /// Timed prefill runs (the best is reported).
        #[arg(long, default_value_t = 2)]
        prefill_runs: usize,
        /// Widen bf16/f16 weights to f32 at load.
        #[arg(long)]
        widen_weights: bool,
        /// The quantized kernels' instruction set (portable, avx2, avx2-vnni, avx512-vnni,
        /// avx512-amx; neon, neon-dotprod on Arm; default: the best this CPU has). Every
        /// choice computes the same bits.
        #[arg(long, value_parser = parse_isa)]
        quant_kernels: Option<Isa>,
        /// From how many quantized rows the kernels multiply two column groups at once
        /// (where the instruction set can); timed at load when not given.
        #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u16).range(1..))]
        quant_pair_from_rows: Option<u16>,
        /// Bits each activation keeps in the quantized kernels: 16 (two 8-bit codes, the
        /// workers' default) or 8 (one, llama.cpp's rounding).
        #[arg(long, default_value_t = ActivationCodes::default())]
        quant_activation_bits: ActivationCodes,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Engine decode step time with and without a JSON-schema grammar
    /// (`tandem_workers::grammar_bench`).
    Grammar {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Batch sizes to measure (repeat the flag).
        #[arg(long = "batch", default_values_t = vec![1usize, 32])]
        batches: Vec<usize>,
        /// Decode steps timed per measurement.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Print one JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One thread's rates of the quantized kernels on synthetic weights, resident in cache
    /// and streamed from memory (`backend::cpu::quant::bench`).
    Kernels {
        /// The GGUF block type (q8_0, q4_1, q4_k, ...).
        #[arg(long, default_value = "q8_0", value_parser = parse_quant)]
        quant: GgufQuant,
        /// Inputs per column (SmolLM2's down projection has 1536).
        #[arg(long, default_value_t = 1536)]
        k: usize,
        /// The instruction set (default: the best this CPU has).
        #[arg(long, value_parser = parse_isa)]
        quant_kernels: Option<Isa>,
        /// Size of the streamed matrix; choose it well beyond the last-level cache.
        #[arg(long, default_value_t = 512)]
        streamed_mib: usize,
        /// Time spent on each measurement, in milliseconds (its best pass is kept).
        #[arg(long, default_value_t = 1000)]
        millis: u64,
        /// Print one JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// `linear` against the `gemm` crate on SmolLM2's projection shapes, f32.
    Matmul {
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 512)]
        rows: usize,
    },
}

const BLOCK_SIZE: usize = 16;

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Model {
            model,
            threads,
            prompt_tokens,
            decode_tokens,
            prefill_runs,
            widen_weights,
            quant_kernels,
            quant_pair_from_rows,
            quant_activation_bits,
            json,
        } => bench_model(
            &model,
            &CpuOptions {
                threads,
                widen_weights,
                quant_isa: quant_kernels,
                quant_pair_from_rows: quant_pair_from_rows.map(usize::from),
                quant_activations: quant_activation_bits,
            },
            prompt_tokens,
            decode_tokens,
            prefill_runs,
            json,
        ),
        Command::Matmul { threads, rows } => bench_matmul(threads, rows),
        Command::Kernels {
            quant,
            k,
            quant_kernels,
            streamed_mib,
            millis,
            json,
        } => bench_kernels(
            quant,
            k,
            quant_kernels.unwrap_or_else(Isa::detect),
            streamed_mib << 20,
            Duration::from_millis(millis),
            json,
        ),
        Command::Grammar {
            model,
            threads,
            batches,
            steps,
            json,
        } => {
            let results = tandem_workers::grammar_bench::run(
                &model,
                tandem_workers::device::Device::Cpu,
                threads,
                &batches,
                steps,
            )?;
            if json {
                println!("{}", serde_json::to_string(&results)?);
            } else {
                print!("{}", tandem_workers::grammar_bench::describe(&results));
            }
            Ok(())
        }
    }
}

fn bench_model(
    dir: &std::path::Path,
    options: &CpuOptions,
    prompt_tokens: usize,
    decode_tokens: usize,
    prefill_runs: usize,
    json: bool,
) -> Result<()> {
    let threads = options.threads;
    let backend = CpuBackend::new(options)?;
    let started = Instant::now();
    let model = Model::load(dir, backend, &ModelOptions::default())
        .with_context(|| format!("loading {}", dir.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size as u32;
    // A fixed pseudo-random prompt (the speed does not depend on the ids).
    let prompt: Vec<u32> = (0..prompt_tokens as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % vocab as u64) as u32)
        .collect();
    let blocks = (prompt_tokens + decode_tokens).div_ceil(BLOCK_SIZE);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut kv = model.alloc_kv_cache(BLOCK_SIZE, blocks)?;

    let mut prefill_s = f64::INFINITY;
    let mut logits = Vec::new();
    for _ in 0..prefill_runs.max(1) {
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, 0, table.clone(), true);
        let t = Instant::now();
        logits = model.forward(&batch, &mut kv)?;
        prefill_s = prefill_s.min(t.elapsed().as_secs_f64());
    }
    let mut next = argmax(&logits[0]);
    let t = Instant::now();
    for i in 0..decode_tokens {
        let mut batch = ForwardBatch::default();
        batch.push(&[next], prompt_tokens + i, table.clone(), true);
        let logits = model.forward(&batch, &mut kv)?;
        next = argmax(&logits[0]);
    }
    let decode_s = t.elapsed().as_secs_f64();
    let prefill_tps = prompt_tokens as f64 / prefill_s;
    let decode_tps = decode_tokens as f64 / decode_s;
    let backend = model.backend().describe();
    let weights = match model.gguf_quant() {
        Some(quant) => format!("gguf {quant} (norms {})", model.weight_dtype()),
        None => model.weight_dtype().to_string(),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "model": dir.display().to_string(),
                "weights": weights,
                "backend": backend,
                "threads": threads,
                "load_s": load_s,
                "prompt_tokens": prompt_tokens,
                "prefill_tokens_per_s": prefill_tps,
                "decode_tokens": decode_tokens,
                "decode_tokens_per_s": decode_tps,
            })
        );
    } else {
        println!(
            "{} ({weights} weights, {backend}): load {load_s:.2} s, prefill {prompt_tokens} tokens {prefill_tps:.1} tok/s, decode {decode_tokens} tokens {decode_tps:.1} tok/s",
            dir.display(),
        );
    }
    Ok(())
}

/// `--quant-kernels`: an instruction set this CPU has.
fn parse_quant(name: &str) -> std::result::Result<GgufQuant, String> {
    GgufQuant::parse(name).ok_or_else(|| {
        let names: Vec<&str> = GgufQuant::ALL.iter().map(|q| q.name()).collect();
        format!("{name:?}: not one of {}", names.join(", "))
    })
}

fn bench_kernels(
    quant: GgufQuant,
    k: usize,
    isa: Isa,
    streamed_bytes: usize,
    min_time: Duration,
    json: bool,
) -> Result<()> {
    let rates = quant::bench::kernel_rates(isa, quant, k, streamed_bytes, min_time)?;
    if json {
        let rows: Vec<serde_json::Value> = rates
            .iter()
            .map(|r| {
                serde_json::json!({
                    "placement": format!("{:?}", r.placement).to_lowercase(),
                    "paired": r.paired,
                    "read_ahead": r.read_ahead,
                    "reused_corrections": r.reused_corrections,
                    "rows": r.rows,
                    "ns_per_group_block": r.ns_per_group_block,
                    "weight_gb_per_s": r.weight_gb_per_s,
                    "products_per_ns": r.products_per_ns,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{} kernels, {} weights, k {k}, one thread, {} MiB streamed; a group block is 8 columns \
         by 32 inputs",
        isa.name(),
        quant.name(),
        streamed_bytes >> 20
    );
    println!(
        "| weights | groups a call | read ahead | sign corrections | rows | ns a group block | \
         weight GB/s | byte products a ns |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|");
    for r in &rates {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.0} |",
            match r.placement {
                quant::bench::Placement::Resident => "resident",
                quant::bench::Placement::Streamed => "streamed",
            },
            if r.paired { 2 } else { 1 },
            if r.read_ahead { "yes" } else { "no" },
            if r.reused_corrections {
                "kept"
            } else {
                "computed"
            },
            r.rows,
            r.ns_per_group_block,
            r.weight_gb_per_s,
            r.products_per_ns
        );
    }
    Ok(())
}

fn parse_isa(name: &str) -> std::result::Result<Isa, String> {
    let available = Isa::available();
    available
        .iter()
        .copied()
        .find(|isa| isa.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = available.iter().map(|i| i.name()).collect();
            format!("{name:?}: this CPU runs {}", names.join(", "))
        })
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn bench_matmul(threads: usize, rows: usize) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    // (name, out, in) of SmolLM2-135M's projections.
    let shapes = [
        ("qkv", 960, 576),
        ("o", 576, 576),
        ("gate_up", 3072, 576),
        ("down", 576, 1536),
    ];
    for (name, n, k) in shapes {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
            .collect();
        let w_bf16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let packed = matmul::PackedWeight::pack(&w, n, k);
        let packed_bf16 = matmul::PackedWeight::pack(&w_bf16, n, k);
        let mut out = vec![0f32; rows * n];
        let flop = 2.0 * (rows * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            let reps = 5;
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        };
        let ours = time(&mut || pool.install(|| matmul::linear(&x, rows, &packed, None, &mut out)));
        let ours_bf16 =
            time(&mut || pool.install(|| matmul::linear(&x, rows, &packed_bf16, None, &mut out)));
        let theirs = time(&mut || unsafe {
            // out[rows, n] = x[rows, k] @ w^T, w^T is [k, n] with row stride 1, col stride k.
            gemm::gemm(
                rows,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        println!(
            "{name:8} [{rows}x{k}] x [{n}x{k}]^T: linear f32 {:.1} GFLOP/s, linear bf16 {:.1} GFLOP/s, gemm f32 {:.1} GFLOP/s",
            flop / ours / 1e9,
            flop / ours_bf16 / 1e9,
            flop / theirs / 1e9
        );
    }
    Ok(())
}
