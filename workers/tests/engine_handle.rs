//! The engine on its own thread, driven through `EngineHandle` from several threads at once
//! (as the bus workers will): each request streams the same tokens as when run alone, and the
//! handle's free-block count returns to its baseline.

mod engine_support;

use std::time::{Duration, Instant};

use engine_support::*;
use tandem_workers::engine::{
    EngineConfig, EngineHandle, EventKind, FinishReason, GenerationRequest,
};
use tandem_workers::sampler::SamplingParams;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: 20,
        max_num_batched_tokens: 24,
        max_num_seqs: 8,
        max_model_len: None,
        growth_reserve_tokens: Some(tandem_workers::engine::DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn request(k: usize) -> GenerationRequest {
    let prompt: Vec<u32> = (0..(5 + 11 * k) as u32)
        .map(|i| 3 + (i * 13 + k as u32 * 7) % 500)
        .collect();
    GenerationRequest {
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            seed: Some(k as u64),
            ..SamplingParams::default()
        },
        ..GenerationRequest::greedy(prompt, 16)
    }
}

#[test]
fn concurrent_submissions_stream_the_same_tokens_as_alone() {
    let model = test_model("tiny");
    let alone: Vec<Vec<u32>> = (0..8)
        .map(|k| {
            let mut engine = cpu_engine(&model, config());
            let id = engine.add_request(request(k)).unwrap();
            let mut rec = Recorder::default();
            run_to_idle(&mut engine, &mut rec);
            rec.get(id).tokens.clone()
        })
        .collect();

    let (handle, thread) = EngineHandle::spawn(cpu_engine(&model, config()), "engine").unwrap();
    let baseline = handle.free_blocks();
    let results: Vec<(Vec<u32>, FinishReason)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|k| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut tokens = vec![];
                    let mut reason = None;
                    for event in handle.submit(request(k)).unwrap() {
                        match event.kind {
                            EventKind::Token { id, .. } => tokens.push(id),
                            EventKind::Finished { reason: r, .. } => reason = Some(r),
                            EventKind::Hidden { .. } => panic!("a hidden state not asked for"),
                            EventKind::RoomReserved { .. } => {
                                panic!("room reserved for a plain request")
                            }
                            EventKind::PromptLogprobs { .. } => {
                                panic!("prompt logprobs not asked for")
                            }
                        }
                    }
                    (tokens, reason.expect("a Finished event ends every stream"))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (k, (tokens, reason)) in results.iter().enumerate() {
        assert_eq!(*reason, FinishReason::Length);
        assert_eq!(
            tokens, &alone[k],
            "request {k} through the handle differs from alone"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.free_blocks() != baseline || handle.active_requests() != 0 {
        assert!(
            Instant::now() < deadline,
            "blocks not returned: {}",
            handle.free_blocks()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(handle);
    thread
        .join()
        .expect("the engine thread exits when the last handle is dropped");
}
