//! Batch invariance through the whole engine on the real model and CPU backend: a request
//! gives the same tokens alone and batched with 7 others of different lengths, for greedy and
//! for seeded sampling, with a token budget small enough that prompts are prefilled in chunks
//! that share steps with other requests' decodes — and again with a cache so small that
//! requests are preempted and recomputed.

mod engine_support;

use engine_support::*;
use tandem_workers::engine::{EngineConfig, FinishReason, GenerationRequest};
use tandem_workers::sampler::SamplingParams;

const NEW_TOKENS: usize = 12;

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    // Lengths chosen to straddle the 8-token budget and the 16-token blocks.
    [21usize, 1, 40, 7, 33, 3, 60, 9]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len)
                .map(|i| ((i * 31 + s * 97 + 5) as u32) % vocab)
                .collect()
        })
        .collect()
}

fn seeded() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(1234),
        ..SamplingParams::default()
    }
}

fn request(prompt: Vec<u32>, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        sampling,
        // Random weights: EOS may come early; the comparison wants every token.
        ignore_eos: true,
        ..GenerationRequest::greedy(prompt, NEW_TOKENS)
    }
}

fn alone(model: &std::path::Path, prompt: &[u32], sampling: &SamplingParams) -> Vec<u32> {
    let mut engine = cpu_engine(
        model,
        EngineConfig {
            block_size: 16,
            num_blocks: 16,
            max_num_batched_tokens: 256,
            max_num_seqs: 1,
            max_model_len: None,
            growth_reserve_tokens: Some(tandem_workers::engine::DEFAULT_GROWTH_RESERVE_TOKENS),
            prefix_caching: true,
            ..EngineConfig::default()
        },
    );
    let id = engine
        .add_request(request(prompt.to_vec(), sampling.clone()))
        .unwrap();
    let mut rec = Recorder::default();
    run_to_idle(&mut engine, &mut rec);
    let out = rec.get(id);
    assert_eq!(out.reason, Some(FinishReason::Length));
    out.tokens.clone()
}

/// All 8 together; returns each one's tokens and the number of preemptions.
fn batched(
    model: &std::path::Path,
    prompts: &[Vec<u32>],
    sampling: &[SamplingParams],
    num_blocks: usize,
) -> (Vec<Vec<u32>>, u64) {
    let mut engine = cpu_engine(
        model,
        EngineConfig {
            block_size: 16,
            num_blocks,
            max_num_batched_tokens: 8,
            max_num_seqs: 8,
            max_model_len: None,
            // Admission on the first chunk alone, so that the small cache preempts.
            growth_reserve_tokens: None,
            prefix_caching: true,
            ..EngineConfig::default()
        },
    );
    let ids: Vec<_> = prompts
        .iter()
        .zip(sampling)
        .map(|(p, s)| engine.add_request(request(p.clone(), s.clone())).unwrap())
        .collect();
    let mut rec = Recorder::default();
    let steps = run_to_idle(&mut engine, &mut rec);
    let total_prompt: usize = prompts.iter().map(Vec::len).sum();
    assert!(
        steps > total_prompt / 8,
        "the budget of 8 tokens must split the prompts over many steps"
    );
    assert_eq!(engine.free_blocks(), num_blocks, "blocks leaked");
    let tokens = ids
        .iter()
        .map(|&id| {
            let out = rec.get(id);
            assert_eq!(out.reason, Some(FinishReason::Length));
            out.tokens.clone()
        })
        .collect();
    (tokens, engine.num_preemptions())
}

fn check(model_name: &str) {
    let model = test_model(model_name);
    let config = tandem_model::ModelConfig::load(&model).unwrap();
    let prompts = prompts(config.vocab_size as u32);
    // Every request, alone, in both modes; the batched runs mix modes (even: greedy, odd:
    // seeded) so that sampled and greedy sequences share steps.
    let modes: Vec<SamplingParams> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                seeded()
            }
        })
        .collect();
    let swapped: Vec<SamplingParams> = (0..8)
        .map(|i| {
            if i % 2 == 1 {
                SamplingParams::greedy()
            } else {
                seeded()
            }
        })
        .collect();
    for sampling in [&modes, &swapped] {
        let reference: Vec<Vec<u32>> = prompts
            .iter()
            .zip(sampling)
            .map(|(p, s)| alone(&model, p, s))
            .collect();
        // 64 blocks: no memory pressure. 10 blocks of 16 = 160 tokens for 8 requests needing
        // up to 72 tokens each: preemption and recompute.
        for num_blocks in [64, 10] {
            let (tokens, preemptions) = batched(&model, &prompts, sampling, num_blocks);
            for (i, (got, want)) in tokens.iter().zip(&reference).enumerate() {
                assert_eq!(
                    got, want,
                    "{model_name}: request {i} ({:?}) batched with {num_blocks} blocks differs from alone",
                    sampling[i]
                );
            }
            if num_blocks == 10 {
                assert!(preemptions > 0, "a 10-block cache must force preemptions");
            }
        }
    }
}

#[test]
fn tiny_model_same_tokens_alone_and_batched() {
    check("tiny");
}

#[test]
fn smollm2_bf16_same_tokens_alone_and_batched() {
    check("smollm2-bf16");
}
