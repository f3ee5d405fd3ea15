//! A model's accuracy on an English text, on the CPU backend: the perplexity of the text under
//! the model, and, against a reference model (the bf16 original of quantized weights), how much
//! higher it is and how often both models rank the same token first.
//!
//! ```text
//! cargo run --release -p tandem-workers --bin perplexity -- --model DIR [--reference DIR]
//!     [--text FILE] [--max-tokens 4096] [--chunk 512] [--threads 2] [--kv-dtype bf16]
//!     [--reference-kv-dtype f32] [--prompt-ends [--fill-activation-bits 8]] [--json]
//! ```
//!
//! The text (by default the GPL-3 that Debian's base-files package puts on every Debian and
//! Ubuntu machine) is tokenized with the model's tokenizer, BOS included, and cut to
//! `--max-tokens` and the model's `max_position_embeddings`. It runs as one sequence, prefilled
//! `--chunk` tokens at a time into a growing KV cache, as the engine prefills a long prompt, and
//! every row reports the log-probability of the token that follows it and its best token
//! (`RowLogprobs`, the prompt logprobs of the API), so each of the `tokens - 1` positions with a
//! next token is scored once, with the whole text before it as context:
//! - mean NLL: the mean of `-log p(next token)`; perplexity is `exp(mean NLL)`;
//! - perplexity increase: `(ppl_model / ppl_reference - 1) * 100`, in percent;
//! - top-1 agreement: the fraction of positions where both models' best tokens are equal;
//! - tokens/s: tokens run over the time of the forward passes (the scoring of every row
//!   included, loading not).
//!
//! The figures do not depend on `--chunk`: SmolLM2's mean NLL over 2000 tokens was the same to
//! the last bit in chunks of 100, 512 and 2000. Its bf16 weights against the f32 import of the
//! same GGUF gave perplexity 17.805 against 17.796 (+0.05%) and top-1 agreement 99.2% over the
//! first 4096 tokens of the GPL-3.
//!
//! `--prompt-ends` scores what a server samples instead: each position as the last row of a
//! prompt that ends there, reading K/V that a prefill without logits wrote (the whole text
//! prefilled first, then each position run alone, from the end back). Its figures equal the
//! default's where the two passes compute alike; `--fill-activation-bits` lets the prefill
//! compute otherwise (8-bit activations where nobody reads the rows' logits), to measure what
//! such a split would cost the tokens sampled.
//!
//! Both models must tokenize the text identically, or their perplexities would be over
//! different token sequences. Two models are loaded one after the other, never both at once
//! (with `--fill-activation-bits`, the model is loaded twice, once for each codes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use clap::builder::RangedU64ValueParser;
use serde::Serialize;
use tandem_model::ModelConfig;
use tandem_workers::backend::Backend;
use tandem_workers::backend::cpu::quant::ActivationCodes;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::kv_cache::KvDType;
use tandem_workers::model::{ForwardBatch, Model, ModelOptions, RowLogprobs};
use tandem_workers::model_dir::{ModelText, check_model_dir};
use tandem_workers::sampler::TokenLogprob;

/// An English text shipped in a package: Debian's base-files installs it everywhere.
const DEFAULT_TEXT: &str = "/usr/share/common-licenses/GPL-3";

/// Tokens per KV block; any size gives the same figures.
const BLOCK_SIZE: usize = 16;

#[derive(Parser)]
#[command(
    about = "Perplexity of a text under a model on the CPU, and its increase and top-1 \
             agreement against a reference model"
)]
struct Args {
    /// Model directory to measure (config.json, *.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Model directory to compare with (e.g. the bf16 original of quantized weights); it must
    /// tokenize the text exactly as --model does.
    #[arg(long, value_name = "DIR")]
    reference: Option<PathBuf>,
    /// The text to score, UTF-8.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_TEXT)]
    text: PathBuf,
    /// Most tokens of the text to run (BOS included); also capped at the models'
    /// max_position_embeddings.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_tokens: usize,
    /// Fewest tokens the text (and the models' context) must give: fewer make too noisy a
    /// perplexity to compare weights by, so the run is refused.
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = RangedU64ValueParser::<usize>::new().range(2..))]
    min_tokens: usize,
    /// Prefill chunk: tokens per forward pass, the KV cache growing between chunks.
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    chunk: usize,
    /// CPU threads; 0 uses every core.
    #[arg(long, value_name = "N", default_value_t = 2)]
    threads: usize,
    /// Bits each activation keeps in products with GGUF blocks kept quantized (both models):
    /// 16 (two 8-bit codes, the workers' default) or 8 (one, llama.cpp's rounding).
    #[arg(long, value_name = "BITS", default_value_t = ActivationCodes::default())]
    quant_activation_bits: ActivationCodes,
    /// Score each position of --model as the first token sampled after a prompt that ends
    /// there: the text is prefilled first without logits (its rows with
    /// --fill-activation-bits), then each position runs again alone as that prompt's last row
    /// (with --quant-activation-bits), from the end back, so each reads the K/V the prefill
    /// wrote before it. The reference is scored as usual.
    #[arg(long)]
    prompt_ends: bool,
    /// With --prompt-ends: bits of the activations of the prefill's rows (whose logits nobody
    /// reads); by default --quant-activation-bits.
    #[arg(long, value_name = "BITS", requires = "prompt_ends")]
    fill_activation_bits: Option<ActivationCodes>,
    /// KV cache element type of --model (f32, bf16, f16, fp8); by default the model's own (f32 for
    /// f32 weights, bf16 for bf16, f16 for f16).
    #[arg(long, value_name = "DTYPE", value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDType>,
    /// KV cache element type of --reference; by default the reference's own.
    #[arg(long, value_name = "DTYPE", value_parser = parse_kv_dtype, requires = "reference")]
    reference_kv_dtype: Option<KvDType>,
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    json: bool,
}

/// A KV dtype by its wire name (the lowercase serde name the KV handles carry), so every
/// variant `KvDType` gains is accepted here without a change.
fn parse_kv_dtype(name: &str) -> Result<KvDType, String> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|e| e.to_string())
}

/// What one model gave on the text.
struct Scores {
    /// `ln p(next token)` at each scored position.
    logprobs: Vec<f32>,
    /// The model's best token at each scored position.
    top1: Vec<u32>,
    weights: String,
    kv_dtype: KvDType,
    load_s: f64,
    forward_s: f64,
}

impl Scores {
    fn mean_nll(&self) -> f64 {
        -self.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / self.logprobs.len() as f64
    }
}

/// The figures of one model.
struct ModelReport {
    dir: String,
    weights: String,
    kv_dtype: KvDType,
    mean_nll: f64,
    ppl: f64,
    tokens_per_s: f64,
    load_s: f64,
}

impl ModelReport {
    fn new(dir: &Path, scores: &Scores, tokens_run: usize) -> Self {
        let mean_nll = scores.mean_nll();
        Self {
            dir: dir.display().to_string(),
            weights: scores.weights.clone(),
            kv_dtype: scores.kv_dtype,
            mean_nll,
            ppl: mean_nll.exp(),
            tokens_per_s: tokens_run as f64 / scores.forward_s,
            load_s: scores.load_s,
        }
    }
}

/// What `--json` prints: one object; the reference's keys are null without `--reference`.
#[derive(Serialize)]
struct Report {
    model: String,
    weights: String,
    kv_dtype: KvDType,
    reference: Option<String>,
    reference_weights: Option<String>,
    reference_kv_dtype: Option<KvDType>,
    text: String,
    /// Tokens the whole text gives with the tokenizer.
    text_tokens: usize,
    /// Tokens run through the model (the text's first ones, BOS included).
    tokens_run: usize,
    /// Positions scored: every run token but the last, which has no next token.
    tokens: usize,
    chunk: usize,
    threads: usize,
    mean_nll: f64,
    ppl: f64,
    tokens_per_s: f64,
    load_s: f64,
    mean_nll_ref: Option<f64>,
    ppl_ref: Option<f64>,
    tokens_per_s_ref: Option<f64>,
    load_s_ref: Option<f64>,
    increase_pct: Option<f64>,
    top1_agreement: Option<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading the text {}", args.text.display()))?;
    let ids = tokenize(&args.model, &text)?;
    ensure!(
        ids.len() >= args.min_tokens,
        "{} gives {} tokens with the tokenizer of {}; at least {} are needed (--min-tokens) for a \
         perplexity steady enough to compare weights by",
        args.text.display(),
        ids.len(),
        args.model.display(),
        args.min_tokens
    );
    if let Some(reference) = &args.reference {
        check_same_tokens(&args.model, &ids, reference, &tokenize(reference, &text)?)?;
    }
    let mut context = max_positions(&args.model)?;
    if let Some(reference) = &args.reference {
        context = context.min(max_positions(reference)?);
    }
    let tokens_run = ids.len().min(args.max_tokens).min(context);
    ensure!(
        tokens_run >= args.min_tokens,
        "only {tokens_run} tokens can run (--max-tokens {}, max_position_embeddings \
         {context}); at least {} are needed (--min-tokens)",
        args.max_tokens,
        args.min_tokens
    );
    let tokens = &ids[..tokens_run];

    let model = score(&args.model, args.kv_dtype, tokens, &args, args.prompt_ends)?;
    let reference = args
        .reference
        .as_deref()
        .map(|dir| score(dir, args.reference_kv_dtype, tokens, &args, false).map(|s| (dir, s)))
        .transpose()?;

    let model_report = ModelReport::new(&args.model, &model, tokens_run);
    let reference_report = reference
        .as_ref()
        .map(|(dir, s)| ModelReport::new(dir, s, tokens_run));
    let top1_agreement = reference.as_ref().map(|(_, r)| {
        let same = model
            .top1
            .iter()
            .zip(&r.top1)
            .filter(|(a, b)| a == b)
            .count();
        same as f64 / model.top1.len() as f64
    });
    let increase_pct = reference_report
        .as_ref()
        .map(|r| (model_report.ppl / r.ppl - 1.0) * 100.0);
    let report = Report {
        model: model_report.dir.clone(),
        weights: model_report.weights.clone(),
        kv_dtype: model_report.kv_dtype,
        reference: reference_report.as_ref().map(|r| r.dir.clone()),
        reference_weights: reference_report.as_ref().map(|r| r.weights.clone()),
        reference_kv_dtype: reference_report.as_ref().map(|r| r.kv_dtype),
        text: args.text.display().to_string(),
        text_tokens: ids.len(),
        tokens_run,
        tokens: model.logprobs.len(),
        chunk: args.chunk,
        threads: args.threads,
        mean_nll: model_report.mean_nll,
        ppl: model_report.ppl,
        tokens_per_s: model_report.tokens_per_s,
        load_s: model_report.load_s,
        mean_nll_ref: reference_report.as_ref().map(|r| r.mean_nll),
        ppl_ref: reference_report.as_ref().map(|r| r.ppl),
        tokens_per_s_ref: reference_report.as_ref().map(|r| r.tokens_per_s),
        load_s_ref: reference_report.as_ref().map(|r| r.load_s),
        increase_pct,
        top1_agreement,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report, &model_report, reference_report.as_ref());
    }
    Ok(())
}

/// The text's ids with `dir`'s tokenizer, as a plain prompt (BOS added where the tokenizer
/// adds it).
fn tokenize(dir: &Path, text: &str) -> Result<Vec<u32>> {
    check_model_dir(dir)?;
    let tokenizer = ModelText::load(dir)?;
    tokenizer
        .prompt_ids(text)
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!(
                "tokenizing the text with the tokenizer of {}",
                dir.display()
            )
        })
}

fn check_same_tokens(model: &Path, ids: &[u32], reference: &Path, ref_ids: &[u32]) -> Result<()> {
    if ids == ref_ids {
        return Ok(());
    }
    let first = ids
        .iter()
        .zip(ref_ids)
        .position(|(a, b)| a != b)
        .unwrap_or(ids.len().min(ref_ids.len()));
    bail!(
        "{} and {} tokenize the text differently ({} and {} tokens, the first difference at \
         token {first}): their perplexities would be over different tokens",
        model.display(),
        reference.display(),
        ids.len(),
        ref_ids.len()
    )
}

fn max_positions(dir: &Path) -> Result<usize> {
    Ok(ModelConfig::load(dir)
        .with_context(|| format!("reading the config of {}", dir.display()))?
        .max_context())
}

fn load(
    dir: &Path,
    kv_dtype: Option<KvDType>,
    codes: ActivationCodes,
    args: &Args,
) -> Result<Model<CpuBackend>> {
    let backend = CpuBackend::new(&CpuOptions {
        threads: args.threads,
        quant_activations: codes,
        ..Default::default()
    })
    .context("starting the CPU backend")?;
    let options = ModelOptions {
        kv_dtype,
        ..ModelOptions::default()
    };
    Model::load(dir, backend, &options).with_context(|| format!("loading {}", dir.display()))
}

/// Runs `tokens` through the model in `dir` as one sequence, `--chunk` tokens per forward, and
/// collects every position's log-probability of the next token and best token; with
/// `prompt_ends`, each position scored as its own prompt's last row (`--prompt-ends`).
fn score(
    dir: &Path,
    kv_dtype: Option<KvDType>,
    tokens: &[u32],
    args: &Args,
    prompt_ends: bool,
) -> Result<Scores> {
    let started = Instant::now();
    let model = load(dir, kv_dtype, args.quant_activation_bits, args)?;
    let fill = match args.fill_activation_bits {
        Some(codes) if prompt_ends && codes != args.quant_activation_bits => {
            Some(load(dir, kv_dtype, codes, args)?)
        }
        _ => None,
    };
    let load_s = started.elapsed().as_secs_f64();
    let kv_dtype = model.kv_layout(BLOCK_SIZE).dtype;
    let weights = match model.gguf_quant() {
        Some(quant) => format!("gguf-{}", quant.name().to_lowercase()),
        None => model.weight_dtype().to_string(),
    };
    eprintln!(
        "scoring {} ({weights} weights, {} KV, {}): {} tokens in chunks of {}{}",
        dir.display(),
        kv_dtype_name(kv_dtype),
        model.backend().describe(),
        tokens.len(),
        args.chunk,
        if prompt_ends {
            format!(
                ", each position as a prompt's last row over a prefill with {}-bit activations",
                args.fill_activation_bits
                    .unwrap_or(args.quant_activation_bits)
            )
        } else {
            String::new()
        }
    );

    let blocks = tokens.len().div_ceil(BLOCK_SIZE);
    let mut kv = model
        .alloc_kv_cache(BLOCK_SIZE, blocks)
        .with_context(|| format!("allocating a KV cache of {} tokens", tokens.len()))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let scored = tokens.len() - 1;
    let mut logprobs = Vec::with_capacity(scored);
    let mut top1 = Vec::with_capacity(scored);
    let mut outputs = tandem_workers::model::RowOutputs::default();
    let started = Instant::now();
    let mut record = |rows: &[TokenLogprob], start: usize| -> Result<()> {
        for (i, row) in rows.iter().enumerate() {
            let position = start + i;
            // A NaN logprob and no best token: the row's logits were not finite.
            let Some(&(best, _)) = row.top_logprobs.first().filter(|_| !row.logprob.is_nan())
            else {
                bail!(
                    "{}: the logits at position {position} are not finite",
                    dir.display()
                );
            };
            logprobs.push(row.logprob);
            top1.push(best);
        }
        Ok(())
    };
    for start in (0..tokens.len()).step_by(args.chunk) {
        let end = (start + args.chunk).min(tokens.len());
        // Row i scores the token after it; the chunk's last row scores the next chunk's first.
        let targets = tokens[start + 1..(end + 1).min(tokens.len())].to_vec();
        let asked = targets.len();
        let mut batch = ForwardBatch::default();
        batch.push(
            &tokens[start..end],
            start,
            table[..end.div_ceil(BLOCK_SIZE)].to_vec(),
            false,
        );
        if prompt_ends {
            fill.as_ref()
                .unwrap_or(&model)
                .forward(&batch, &mut kv)
                .with_context(|| {
                    format!("prefill of tokens {start}..{end} of {}", dir.display())
                })?;
            continue;
        }
        batch.want_row_logprobs(RowLogprobs {
            first: 0,
            targets,
            top_k: 1,
        });
        model
            .forward_with_row_outputs(&batch, &mut kv, &mut outputs)
            .with_context(|| format!("forward of tokens {start}..{end} of {}", dir.display()))?;
        let [rows] = outputs.logprobs.as_slice() else {
            bail!(
                "the forward returned {} row log-prob lists for one sequence",
                outputs.logprobs.len()
            );
        };
        ensure!(
            rows.len() == asked,
            "the forward scored {} rows of tokens {start}..{end}, not {asked}",
            rows.len()
        );
        record(rows, start)?;
    }
    if prompt_ends {
        // From the last position back: position i writes slot i, which no earlier position
        // reads, so every position reads the prefill's K/V before it.
        for position in (0..scored).rev() {
            let mut batch = ForwardBatch::default();
            batch.push(
                &tokens[position..position + 1],
                position,
                table[..(position + 1).div_ceil(BLOCK_SIZE)].to_vec(),
                false,
            );
            batch.want_row_logprobs(RowLogprobs {
                first: 0,
                targets: vec![tokens[position + 1]],
                top_k: 1,
            });
            model
                .forward_with_row_outputs(&batch, &mut kv, &mut outputs)
                .with_context(|| format!("position {position} of {}", dir.display()))?;
            let [rows] = outputs.logprobs.as_slice() else {
                bail!("no row log-probs for position {position}");
            };
            record(rows, position)?;
        }
        logprobs.reverse();
        top1.reverse();
    }
    Ok(Scores {
        logprobs,
        top1,
        weights,
        kv_dtype,
        load_s,
        forward_s: started.elapsed().as_secs_f64(),
    })
}

fn kv_dtype_name(dtype: KvDType) -> String {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{dtype:?}"),
    }
}

fn print_table(report: &Report, model: &ModelReport, reference: Option<&ModelReport>) {
    println!(
        "text {}: {} tokens, the first {} run in chunks of {}, {} scored",
        report.text, report.text_tokens, report.tokens_run, report.chunk, report.tokens
    );
    let width = std::iter::once(model)
        .chain(reference)
        .map(|r| r.dir.len())
        .max()
        .unwrap_or(0);
    println!(
        "{:9}  {:width$}  {:>7}  {:>4}  {:>8}  {:>10}  {:>8}",
        "", "directory", "weights", "kv", "mean NLL", "perplexity", "tokens/s"
    );
    let rows = std::iter::once(("model", model)).chain(reference.map(|r| ("reference", r)));
    for (role, r) in rows {
        println!(
            "{role:9}  {:width$}  {:>7}  {:>4}  {:>8.4}  {:>10.4}  {:>8.1}",
            r.dir,
            r.weights,
            kv_dtype_name(r.kv_dtype),
            r.mean_nll,
            r.ppl,
            r.tokens_per_s
        );
    }
    if let (Some(increase), Some(agreement)) = (report.increase_pct, report.top1_agreement) {
        println!(
            "perplexity increase {increase:+.3}%, top-1 agreement {:.2}%",
            agreement * 100.0
        );
    }
}
