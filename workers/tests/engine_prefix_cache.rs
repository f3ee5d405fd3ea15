//! Prefix caching through the whole engine on the real model, on the CPU backend and (where
//! there is one) the GPU: requests that share a long prefix with earlier ones take its cached
//! blocks instead of computing them, and generate exactly the tokens they generate with caching
//! off, greedy and seeded, with room to spare and with a cache so small that blocks are evicted
//! and requests preempted.

mod engine_support;

use engine_support::*;
use tandem_test_skip::skip;
use tandem_workers::backend::cuda::{CudaBackend, CudaOptions, driver_present};
use tandem_workers::engine::{
    Engine, EngineConfig, FinishReason, GenerationRequest, ModelRunner, StepModel,
};
use tandem_workers::model::{Model, ModelOptions};
use tandem_workers::sampler::SamplingParams;

/// Where the engine runs.
#[derive(Clone, Copy, Debug)]
enum Device {
    Cpu,
    Cuda,
}

const NEW_TOKENS: usize = 10;
const BLOCK: usize = 16;

/// A 50-token shared prefix (three full blocks) and six questions after it.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let token = |i: usize, s: usize| ((i * 31 + s * 97 + 5) as u32) % vocab;
    let system: Vec<u32> = (0..50).map(|i| token(i, 0)).collect();
    [7usize, 1, 20, 13, 2, 30]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            let question = (0..len).map(|i| token(i, s + 1));
            system.iter().copied().chain(question).collect()
        })
        .collect()
}

fn sampling(i: usize) -> SamplingParams {
    if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(99 + i as u64),
            ..SamplingParams::default()
        }
    }
}

/// Runs the first prompt alone, then the rest together; their tokens, and the prompt
/// tokens found cached.
fn run(
    device: Device,
    model: &std::path::Path,
    prompts: &[Vec<u32>],
    num_blocks: usize,
    prefix_caching: bool,
) -> (Vec<Vec<u32>>, u64) {
    let config = EngineConfig {
        block_size: BLOCK,
        num_blocks,
        max_num_batched_tokens: 32,
        max_num_seqs: 6,
        max_model_len: None,
        // Admission on the first chunk alone, so that the small cache preempts.
        growth_reserve_tokens: None,
        prefix_caching,
        ..EngineConfig::default()
    };
    match device {
        Device::Cpu => drive(cpu_engine(model, config), prompts, num_blocks),
        Device::Cuda => {
            let gpu = CudaBackend::new(&CudaOptions::from_env(0)).expect("cuda backend");
            let model = Model::load(model, gpu, &ModelOptions::default())
                .unwrap_or_else(|e| panic!("loading {}: {e}", model.display()));
            let runner = ModelRunner::new(model, BLOCK, num_blocks).expect("kv cache");
            drive(
                Engine::new(runner, config, None).expect("engine"),
                prompts,
                num_blocks,
            )
        }
    }
}

/// The requests of [`run`] through `engine`.
fn drive<M: StepModel>(
    mut engine: Engine<M>,
    prompts: &[Vec<u32>],
    num_blocks: usize,
) -> (Vec<Vec<u32>>, u64) {
    let mut rec = Recorder::default();
    let mut ids = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let request = GenerationRequest {
            sampling: sampling(i),
            // Random weights: EOS may come early; the comparison wants every token.
            ignore_eos: true,
            ..GenerationRequest::greedy(prompt.clone(), NEW_TOKENS)
        };
        ids.push(engine.add_request(request).unwrap());
        if i == 0 {
            run_to_idle(&mut engine, &mut rec);
        }
    }
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(engine.free_blocks(), num_blocks, "blocks leaked");
    let tokens = ids
        .iter()
        .map(|&id| {
            let out = rec.get(id);
            assert_eq!(out.reason, Some(FinishReason::Length));
            out.tokens.clone()
        })
        .collect();
    (tokens, engine.prefix_cache_stats().hit_tokens)
}

fn check(device: Device, model_name: &str) {
    let model = test_model(model_name);
    let config = tandem_model::ModelConfig::load(&model).unwrap();
    let prompts = prompts(config.vocab_size as u32);
    // 64 blocks: everything stays cached. 9 blocks of 16 = 144 tokens for requests of up to
    // 90: eviction and preemption.
    for num_blocks in [64, 9] {
        let (plain, plain_hits) = run(device, &model, &prompts, num_blocks, false);
        let (cached, hits) = run(device, &model, &prompts, num_blocks, true);
        assert_eq!(plain_hits, 0);
        for (i, (got, want)) in cached.iter().zip(&plain).enumerate() {
            assert_eq!(
                got, want,
                "{model_name} on {device:?}: request {i} with {num_blocks} blocks differs with \
                 prefix caching"
            );
        }
        if num_blocks == 64 {
            // Every later request finds the three full blocks of the shared prefix.
            assert_eq!(hits, 5 * 3 * BLOCK as u64, "{model_name}");
        } else {
            assert!(hits > 0, "{model_name}: the small cache must still hit");
        }
    }
}

#[test]
fn tiny_model_same_tokens_with_and_without_prefix_caching() {
    check(Device::Cpu, "tiny");
}

#[test]
fn smollm2_bf16_same_tokens_with_and_without_prefix_caching() {
    check(Device::Cpu, "smollm2-bf16");
}

#[test]
fn on_the_gpu_tiny_model_same_tokens_with_and_without_prefix_caching() {
    if !driver_present() {
        skip("no CUDA driver on this machine");
        return;
    }
    check(Device::Cuda, "tiny");
}
