//! What constrained decoding costs per engine step: the `grammar` mode of `cpu_bench` and
//! `gpu_bench`. For each batch size, `batch` requests decode free (greedy, EOS ignored), then
//! `batch` requests decode under a JSON schema (an array of at least 200 integers, so no
//! request ends within the measured steps), in one engine; the mean time of `steps` decode
//! steps after every request's prefill is reported for each. The constrained steps include
//! the masks (computed on the mask thread during the forward), the copy of each constrained
//! row to the host and its masking there.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::backend::KvBlockIo;
use crate::device::{Device, DeviceError, LoadedModel, load_model};
use crate::engine::{
    DEFAULT_GROWTH_RESERVE_TOKENS, Engine, EngineConfig, EngineSettings, EventKind,
    GenerationRequest, ModelRunner,
};
use crate::model::Model;
use crate::sampler::SamplingParams;
use tandem_text::grammar::{GrammarCompiler, GrammarSource};

/// The schema every constrained request decodes under.
pub fn schema() -> serde_json::Value {
    serde_json::json!({"type": "array", "items": {"type": "integer"}, "minItems": 200})
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct StepCost {
    pub batch: usize,
    pub constrained: bool,
    pub steps: usize,
    pub mean_step_ms: f64,
    /// For the constrained runs: the mean time of one mask alone (one sequence, replaying
    /// the first request's tokens on this thread), in microseconds.
    pub mean_mask_us: Option<f64>,
    /// A digest of every request's tokens, in request order: equal digests, equal tokens (to
    /// compare sampling paths, e.g. `TANDEM_DEVICE_MASKS=0` against the default).
    pub tokens_digest: u64,
}

/// Runs the benchmark on `dir`'s model on `device` for each of `batches`.
pub fn run(
    dir: &Path,
    device: Device,
    threads: usize,
    batches: &[usize],
    steps: usize,
) -> anyhow::Result<Vec<StepCost>> {
    let loaded = load_model(
        dir,
        device,
        &crate::backend::cpu::CpuOptions {
            threads,
            ..Default::default()
        },
        &tandem_cli::args::GpuArgs::default(),
        1,
        tandem_protocol::config::KvCacheDtype::Auto,
    )?;
    let vocab = loaded.config().vocab_size;
    let eos = crate::model_dir::ModelText::load(dir)?.stop_token_ids();
    let compiler = GrammarCompiler::from_model_dir(dir, vocab, &eos)?;
    match loaded {
        LoadedModel::Cpu(model) => bench(*model, &compiler, batches, steps),
        LoadedModel::Cuda(model) => bench(*model, &compiler, batches, steps),
        LoadedModel::CpuGroup { .. } | LoadedModel::CudaGroup { .. } => {
            unreachable!("loaded with one rank")
        }
    }
}

fn bench<B: KvBlockIo + 'static>(
    model: Model<B>,
    compiler: &GrammarCompiler,
    batches: &[usize],
    steps: usize,
) -> anyhow::Result<Vec<StepCost>> {
    const PROMPT: usize = 32;
    const BLOCK: usize = 16;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let per_seq_blocks = (PROMPT + steps + 8).div_ceil(BLOCK);
    let config = EngineConfig {
        block_size: BLOCK,
        num_blocks: per_seq_blocks * max_batch + 4,
        max_num_batched_tokens: (PROMPT * max_batch).max(512),
        max_num_seqs: max_batch,
        max_model_len: None,
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        // The prompts repeat; the benchmark measures the steps, not the cache.
        prefix_caching: false,
        cache_namespace: String::new(),
        // The benchmark takes the engine's variables alone, e.g. `TANDEM_DEVICE_MASKS=0`.
        settings: EngineSettings::from_env(),
        speculation: None,
    };
    let vocab = model.config().vocab_size;
    let runner = ModelRunner::new(model, config.block_size, config.num_blocks).map_err(|e| {
        DeviceError::Model {
            path: "benchmark".into(),
            source: e,
        }
    })?;
    let mut engine = Engine::new(runner, config, None)?;
    let schema = schema();
    let mut results = Vec::new();
    for &batch in batches {
        for constrained in [false, true] {
            let mut ids = Vec::new();
            for i in 0..batch {
                let prompt: Vec<u32> = (0..PROMPT as u64)
                    .map(|j| {
                        ((j * 2_654_435_761 + i as u64 * 7_919 + 12_345) % vocab as u64) as u32
                    })
                    .collect();
                let grammar = if constrained {
                    Some(compiler.compile(GrammarSource::JsonSchema(&schema))?)
                } else {
                    None
                };
                let request = GenerationRequest {
                    sampling: SamplingParams::greedy(),
                    ignore_eos: true,
                    grammar,
                    ..GenerationRequest::greedy(prompt, steps + 4)
                };
                ids.push(engine.add_request(request)?);
            }
            // The first request's tokens, replayed below to time its masks alone.
            let mut first_tokens = Vec::new();
            let mut all_tokens: std::collections::HashMap<_, Vec<u32>> = Default::default();
            let mut note = |events: &[crate::engine::EngineEvent]| {
                for event in events {
                    if let EventKind::Token { id, .. } = event.kind {
                        all_tokens.entry(event.request_id).or_default().push(id);
                        if event.request_id == ids[0] {
                            first_tokens.push(id);
                        }
                    }
                }
            };
            // Prefill: until every request has its first token.
            let mut started = std::collections::HashSet::new();
            while started.len() < batch {
                let events = engine.step();
                note(&events);
                for event in events {
                    if let EventKind::Token { .. } = event.kind {
                        started.insert(event.request_id);
                    }
                }
            }
            let t = Instant::now();
            for _ in 0..steps {
                let events = engine.step();
                anyhow::ensure!(
                    !events
                        .iter()
                        .any(|e| matches!(e.kind, EventKind::Finished { .. })),
                    "a request ended within the measured steps: {events:?}"
                );
                note(&events);
            }
            let mean_step_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
            let tokens_digest = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                for id in &ids {
                    all_tokens.get(id).hash(&mut hasher);
                }
                hasher.finish()
            };
            let mean_mask_us = if constrained {
                let mut grammar = compiler.compile(GrammarSource::JsonSchema(&schema))?;
                let mut spent = std::time::Duration::ZERO;
                for &token in &first_tokens {
                    let t = Instant::now();
                    let mask = grammar.compute_mask()?;
                    spent += t.elapsed();
                    anyhow::ensure!(mask.is_allowed(token), "replayed token {token} not allowed");
                    grammar.advance(token)?;
                }
                Some(spent.as_secs_f64() * 1e6 / first_tokens.len().max(1) as f64)
            } else {
                None
            };
            for id in ids {
                engine.cancel(id);
            }
            while engine.has_work() {
                engine.step();
            }
            results.push(StepCost {
                batch,
                constrained,
                steps,
                mean_step_ms,
                mean_mask_us,
                tokens_digest,
            });
        }
    }
    Ok(results)
}

/// The results as lines of text.
pub fn describe(results: &[StepCost]) -> String {
    let mut out = String::new();
    for pair in results.chunks(2) {
        if let [free, constrained] = pair {
            out.push_str(&format!(
                "batch {:3}: free {:.2} ms/step, json_schema {:.2} ms/step ({:+.1}%); one mask \
                 alone {:.0} us; tokens {:016x} / {:016x}\n",
                free.batch,
                free.mean_step_ms,
                constrained.mean_step_ms,
                (constrained.mean_step_ms / free.mean_step_ms - 1.0) * 100.0,
                constrained.mean_mask_us.unwrap_or(0.0),
                free.tokens_digest,
                constrained.tokens_digest
            ));
        }
    }
    out
}
