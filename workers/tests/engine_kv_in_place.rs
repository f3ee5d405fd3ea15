//! The hand-over without copies at the engine level, on the real model and CPU
//! backend: a context engine's KV cache is exposed once through the in-process transport
//! (which follows UCX's model: the host cache registered once, exports its blocks in place, the
//! seals in the cache's export slab). A prefill's blocks are exported where they lie, stay
//! pinned (not free in the context engine) until the export is dropped, are read by a puller
//! and imported into a second engine, whose tokens equal the same request run whole there;
//! once the export is dropped, its seal is clear and every block of the context engine is
//! free again.

mod engine_support;

use std::time::{Duration, Instant};

use engine_support::*;
use tandem_workers::engine::{
    EngineConfig, EngineHandle, EventKind, GenerationRequest, ImportedKv, ImportedPrefill,
    RequestId,
};
use tandem_workers::sampler::SampledToken;
use tandem_workers::transfer::in_process::InProcessTransport;
use tandem_workers::transfer::{KvTransport, RemoteKv, TransferError};

const BLOCKS: usize = 24;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 8,
        num_blocks: BLOCKS,
        max_num_batched_tokens: 64,
        max_num_seqs: 4,
        max_model_len: None,
        growth_reserve_tokens: Some(tandem_workers::engine::DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn request(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        ignore_eos: true,
        ..GenerationRequest::greedy(prompt.to_vec(), max_tokens)
    }
}

/// Unpins a prefill-only request's blocks when dropped: an export's keepalive.
struct Unpin {
    engine: EngineHandle,
    id: RequestId,
}

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = self.engine.release_kv(self.id);
    }
}

/// Waits (5 s at most) until the engine behind `handle` reports `free` free blocks.
fn wait_for_free(handle: &EngineHandle, free: usize, what: &str) {
    let start = Instant::now();
    while handle.free_blocks() != free {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: {} free blocks, expected {free}",
            handle.free_blocks()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn a_prefill_is_handed_over_in_place_and_its_blocks_stay_pinned_until_the_export_goes() {
    let model = test_model("tiny");
    let context = cpu_engine(&model, config());
    let memory = context
        .kv_cache_parts()
        .pop()
        .expect("a CPU cache describes its memory");
    let (handle, thread) = EngineHandle::spawn(context, "context").unwrap();
    let transport = InProcessTransport;
    // SAFETY: the owner handed over is an engine handle: the engine, and its cache, outlive
    // the exposure.
    let exposed = unsafe { transport.expose_cache(memory, Box::new(handle.clone())) }
        .await
        .unwrap()
        .expect("the in-process transport reads a host cache in place");

    let prompt: Vec<u32> = (0..29u32).map(|i| 3 + (i * 37) % 500).collect();
    let stream = handle
        .submit(GenerationRequest {
            prefill_only: true,
            ..request(&prompt, 8)
        })
        .unwrap();
    let (mut first, mut retained) = (None, None);
    while let Some(event) = stream.recv() {
        match event.kind {
            EventKind::Token {
                id,
                logprob,
                top_logprobs,
                ..
            } => {
                first = Some(SampledToken {
                    id,
                    logprob,
                    top_logprobs,
                })
            }
            EventKind::Finished { retained_kv, .. } => {
                retained = retained_kv;
                break;
            }
            EventKind::RoomReserved { .. }
            | EventKind::PromptLogprobs { .. }
            | EventKind::Hidden { .. } => {}
        }
    }
    let (first, retained) = (first.expect("a first token"), retained.expect("retained"));
    let blocks = retained.block_table.len();
    assert_eq!(blocks, 29usize.div_ceil(8));
    wait_for_free(&handle, BLOCKS - blocks, "retained after the prefill");

    let exported = exposed
        .export(
            &retained.block_table,
            Box::new(Unpin {
                engine: handle.clone(),
                id: stream.id(),
            }),
        )
        .unwrap();
    assert_eq!(
        exported.regions.len(),
        blocks,
        "one region per block, where it lies"
    );
    let remote = RemoteKv {
        memory: exported.memory.clone(),
        regions: exported.regions.clone(),
        seal: exported.seal,
    };
    let pulled = transport
        .pull(remote.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    let kv = pulled.host().expect("host memory").to_vec();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        handle.free_blocks(),
        BLOCKS - blocks,
        "still pinned after the read: only the export's drop unpins"
    );

    // The K/V read in place continues into the tokens of the whole request run here.
    let mut decode = cpu_engine(&model, config());
    let mut recorder = Recorder::default();
    let imported = decode
        .import_request(
            request(&prompt, 8),
            ImportedPrefill {
                kv: ImportedKv::Bytes(Box::new(kv)),
                num_tokens: prompt.len(),
                first_token: first,
            },
        )
        .unwrap();
    run_to_idle(&mut decode, &mut recorder);
    let whole = decode.add_request(request(&prompt, 8)).unwrap();
    run_to_idle(&mut decode, &mut recorder);
    assert_eq!(recorder.get(imported).tokens.len(), 8);
    assert_eq!(recorder.get(imported).tokens, recorder.get(whole).tokens);

    drop(exported);
    wait_for_free(&handle, BLOCKS, "after the export is dropped");
    let gone = transport
        .pull(remote, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(gone, TransferError::ExportGone(_)),
        "the seal was cleared before the blocks were unpinned: {gone}"
    );
    assert_eq!(exposed.live_exports(), 0);
    drop((exposed, stream, handle));
    thread
        .join()
        .expect("the engine thread ends with its last handle");
}
