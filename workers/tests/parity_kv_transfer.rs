//! A sequence's KV blocks copied byte for byte into other blocks of another cache (what KV
//! transfer between workers does) continue the sequence exactly: the next decode step's logits
//! are bitwise those of continuing on the original cache. f32, bf16 and FP8 caches.

mod parity_support;

use parity_support::*;
use tandem_workers::backend::{Backend, KvBlockIo, KvBytes, KvBytesMut};
use tandem_workers::kv_cache::KvDType;
use tandem_workers::model::{ForwardBatch, ModelOptions};

fn check(kv_dtype: KvDType) {
    let dir = fixture_dir("tiny-llama");
    let backend = tandem_workers::backend::cpu::CpuBackend::new(&Default::default()).unwrap();
    let options = ModelOptions {
        kv_dtype: Some(kv_dtype),
        ..ModelOptions::default()
    };
    let model = tandem_workers::model::Model::load(&dir, backend, &options).unwrap();
    let prompt: Vec<u32> = (0..37).map(|i| (i * 13 + 3) % 512).collect();
    let layout = model.kv_layout(BLOCK_SIZE);
    assert_eq!(layout.dtype, kv_dtype);

    let source_table = vec![4, 0, 2, 6];
    let mut source = model.alloc_kv_cache(BLOCK_SIZE, 8).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&prompt, 0, source_table.clone(), true);
    let logits = model.forward(&batch, &mut source).unwrap();
    let next = argmax(&logits[0]);

    // Move the prompt's 3 blocks into a fresh cache, at other ids.
    let target_table = vec![1, 5, 3, 0];
    let mut target = model.alloc_kv_cache(BLOCK_SIZE, 6).unwrap();
    let b = model.backend();
    let mut bytes = vec![0u8; layout.block_bytes()];
    for (&from, &to) in source_table
        .iter()
        .zip(&target_table)
        .take(layout.blocks_for(prompt.len()))
    {
        b.read_kv_blocks(&source, &[from], KvBytesMut::Host(&mut bytes))
            .unwrap();
        b.write_kv_blocks(&mut target, &[to], KvBytes::Host(&bytes))
            .unwrap();
    }

    let step = |kv: &mut _, table: &Vec<u32>| {
        let mut batch = ForwardBatch::default();
        batch.push(&[next], prompt.len(), table.clone(), true);
        model.forward(&batch, kv).unwrap().remove(0)
    };
    let on_source = step(&mut source, &source_table);
    let on_target = step(&mut target, &target_table);
    assert!(
        on_source == on_target,
        "{kv_dtype:?}: logits differ after the transfer"
    );

    // A cache of another layout (here another element type) is refused, not misread.
    let mut layout = model.kv_layout(BLOCK_SIZE);
    layout.dtype = KvDType::F16;
    let mut other = b.alloc_kv_cache(&layout, 4).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&[next], 0, vec![0], true);
    assert!(model.forward(&batch, &mut other).is_err());
}

#[test]
fn transferred_f32_blocks_continue_the_sequence() {
    check(KvDType::F32);
}

#[test]
fn transferred_bf16_blocks_continue_the_sequence() {
    check(KvDType::Bf16);
}

#[test]
fn transferred_fp8_blocks_continue_the_sequence() {
    check(KvDType::Fp8);
}
