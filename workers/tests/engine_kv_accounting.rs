//! KV accounting on the real model and CPU backend: however a request ends — max_tokens, stop
//! token, stop string, cancelled mid-prefill or mid-decode, preempted and resumed, prefill-only
//! with its blocks retained then released — the free-block count returns to its baseline.

mod engine_support;

use engine_support::*;
use tandem_workers::engine::{EngineConfig, EventKind, FinishReason, GenerationRequest};

const BLOCKS: usize = 24;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 8,
        num_blocks: BLOCKS,
        max_num_batched_tokens: 16,
        max_num_seqs: 4,
        max_model_len: None,
        // Admission on the first chunk alone: the small caches here are there to preempt.
        growth_reserve_tokens: None,
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 17 + salt * 29) % 500)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        ignore_eos: true,
        ..GenerationRequest::greedy(prompt, max_tokens)
    }
}

#[test]
fn every_way_out_returns_every_block() {
    let model = test_model("tiny");
    let mut engine = cpu_engine(&model, config());
    let baseline = engine.free_blocks();
    assert_eq!(baseline, BLOCKS);
    let mut rec = Recorder::default();

    // max_tokens.
    let id = engine.add_request(request(prompt(20, 1), 6)).unwrap();
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(rec.get(id).reason, Some(FinishReason::Length));
    assert_eq!(rec.get(id).tokens.len(), 6);
    assert_eq!(engine.free_blocks(), baseline, "after max_tokens");
    let greedy = rec.get(id).tokens.clone();

    // Stop token: the same request stopping at its third greedy token.
    let id = engine
        .add_request(GenerationRequest {
            stop_token_ids: vec![greedy[2]],
            ..request(prompt(20, 1), 6)
        })
        .unwrap();
    run_to_idle(&mut engine, &mut rec);
    let out = rec.get(id);
    assert_eq!(out.reason, Some(FinishReason::Stop));
    assert_eq!(out.tokens.last(), Some(&greedy[2]));
    assert!(out.tokens.len() <= 3);
    assert_eq!(engine.free_blocks(), baseline, "after a stop token");

    // Cancelled mid-prefill: 100 prompt tokens at 16 per step.
    let id = engine.add_request(request(prompt(100, 2), 5)).unwrap();
    rec.record(engine.step());
    rec.record(engine.step());
    assert!(engine.free_blocks() < baseline, "the prefill holds blocks");
    assert!(engine.cancel(id));
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(rec.get(id).reason, Some(FinishReason::Cancelled));
    assert!(
        rec.get(id).tokens.is_empty(),
        "cancelled before its first token"
    );
    assert_eq!(engine.free_blocks(), baseline, "after a cancel mid-prefill");

    // Cancelled mid-decode.
    let id = engine.add_request(request(prompt(10, 3), 500)).unwrap();
    while rec.outcomes.get(&id).is_none_or(|o| o.tokens.len() < 4) {
        rec.record(engine.step());
    }
    assert!(engine.cancel(id));
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(rec.get(id).reason, Some(FinishReason::Cancelled));
    assert_eq!(engine.free_blocks(), baseline, "after a cancel mid-decode");

    // Preempted and resumed: 4 requests needing up to 8 blocks each in a 24-block cache.
    let ids: Vec<_> = (0..4)
        .map(|k| {
            engine
                .add_request(request(prompt(30 + 5 * k, 10 + k as u32), 30))
                .unwrap()
        })
        .collect();
    run_to_idle(&mut engine, &mut rec);
    assert!(engine.num_preemptions() > 0, "this load must preempt");
    for id in ids {
        assert_eq!(rec.get(id).reason, Some(FinishReason::Length));
        assert_eq!(rec.get(id).tokens.len(), 30);
    }
    assert_eq!(
        engine.free_blocks(),
        baseline,
        "after preemption and resume"
    );

    // Prefill-only: blocks retained for a transfer, then released.
    let id = engine
        .add_request(GenerationRequest {
            prefill_only: true,
            ..request(prompt(20, 4), 50)
        })
        .unwrap();
    let mut retained = None;
    while engine.has_work() {
        for ev in engine.step() {
            if let EventKind::Finished { retained_kv, .. } = ev.kind {
                retained = retained_kv;
            }
        }
    }
    let retained = retained.expect("prefill-only retains its KV");
    assert_eq!(retained.num_tokens, 20);
    assert_eq!(engine.free_blocks(), baseline - retained.block_table.len());
    engine.release_kv(id).unwrap();
    assert_eq!(
        engine.free_blocks(),
        baseline,
        "after releasing retained KV"
    );

    // Refused (prompt longer than the cache): takes nothing.
    assert!(
        engine
            .add_request(request(prompt(BLOCKS * 8, 5), 5))
            .is_err()
    );
    assert_eq!(engine.free_blocks(), baseline, "after a refused request");
}
