//! Attention-path tests through the backend interface: rope + cache write + paged attention
//! against the dense slow twin, across scattered blocks, chunked prefill and batching.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::kv_cache::KvDType;
use crate::model::ForwardBatch;

const SHAPE: AttentionShape = AttentionShape {
    num_heads: 4,
    num_kv_heads: 2,
    head_dim: 16,
    scale: 0.25,
};

fn layout(dtype: KvDType) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: SHAPE.num_kv_heads,
        head_dim: SHAPE.head_dim,
        block_size: 4,
        dtype,
    }
}

fn inv_freq() -> Vec<f32> {
    (0..SHAPE.head_dim / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / SHAPE.head_dim as f32))
        .collect()
}

fn random_rows(rng: &mut ChaCha8Rng, rows: usize) -> Vec<f32> {
    (0..rows * SHAPE.qkv_width())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect()
}

/// Runs rope + cache write + attention on layer 1 for `batch` with fused rows `qkv`.
fn attend(
    backend: &CpuBackend,
    kv: &mut CpuKvCache,
    batch: &ForwardBatch,
    qkv: &[f32],
) -> CpuTensor {
    let plan = BatchPlan::new(batch, kv.layout().block_size, &inv_freq());
    let b = backend.prepare_batch(&plan).unwrap();
    let mut t = CpuTensor::new(batch.tokens.len(), SHAPE.qkv_width(), qkv.to_vec());
    backend
        .rope_and_cache_write(&mut t, &b, &SHAPE, kv, 1)
        .unwrap();
    backend.paged_attention(&t, &b, &SHAPE, kv, 1).unwrap()
}

/// Rope applied to q and k of dense rows at positions 0.., in f64 (the slow twin of the
/// rotation), then dense causal attention in f64.
fn reference(qkv: &[f32], tokens: usize) -> Vec<f32> {
    let d = SHAPE.head_dim;
    let freqs = inv_freq();
    let mut rotated = qkv.to_vec();
    for (t, row) in rotated.chunks_mut(SHAPE.qkv_width()).enumerate() {
        for head in row[..(SHAPE.num_heads + SHAPE.num_kv_heads) * d].chunks_mut(d) {
            let orig = head.to_vec();
            for i in 0..d / 2 {
                let angle = (t as f32 * freqs[i]) as f64;
                let (c, s) = (angle.cos(), angle.sin());
                head[i] = (orig[i] as f64 * c - orig[i + d / 2] as f64 * s) as f32;
                head[i + d / 2] = (orig[i + d / 2] as f64 * c + orig[i] as f64 * s) as f32;
            }
        }
    }
    attention::attention_slow(&rotated, tokens, &SHAPE)
}

#[test]
fn paged_attention_matches_dense_reference_chunked_and_batched() {
    let backend = CpuBackend::new(&CpuOptions {
        threads: 2,
        ..Default::default()
    })
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let tokens = 11;
    let qkv = random_rows(&mut rng, tokens);
    let width = SHAPE.qkv_width();
    let table = vec![5, 2, 7];
    let ids = vec![0u32; tokens];

    // One chunk, scattered blocks.
    let mut kv = CpuKvCache::new(layout(KvDType::F32), 8).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&ids, 0, table.clone(), true);
    let whole = attend(&backend, &mut kv, &batch, &qkv);
    let expected = reference(&qkv, tokens);
    for (i, (a, b)) in whole.data.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() < 1e-5, "[{i}] {a} vs {b}");
    }

    // Two chunks (6 then 5 tokens, the second reading the first from the cache): bitwise equal.
    let mut kv2 = CpuKvCache::new(layout(KvDType::F32), 8).unwrap();
    let mut first = ForwardBatch::default();
    first.push(&ids[..6], 0, table.clone(), false);
    let a = attend(&backend, &mut kv2, &first, &qkv[..6 * width]);
    let mut second = ForwardBatch::default();
    second.push(&ids[6..], 6, table.clone(), true);
    let b = attend(&backend, &mut kv2, &second, &qkv[6 * width..]);
    assert_eq!(a.data, whole.data[..a.data.len()]);
    assert_eq!(b.data, whole.data[a.data.len()..]);

    // Batched after another sequence with its own blocks: the same rows, bitwise.
    let mut kv3 = CpuKvCache::new(layout(KvDType::F32), 8).unwrap();
    let other = random_rows(&mut rng, 3);
    let mut batch = ForwardBatch::default();
    batch.push(&[0, 0, 0], 0, vec![0], true);
    batch.push(&ids, 0, table.clone(), true);
    let rows: Vec<f32> = other.iter().chain(&qkv).copied().collect();
    let batched = attend(&backend, &mut kv3, &batch, &rows);
    assert_eq!(
        batched.data[3 * SHAPE.num_heads * SHAPE.head_dim..],
        whole.data[..]
    );
}

#[test]
fn half_precision_and_fp8_caches_stay_close_to_reference() {
    let backend = CpuBackend::new(&CpuOptions::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let qkv = random_rows(&mut rng, 9);
    let expected = reference(&qkv, 9);
    // FP8 e4m3 keeps 3 bits of mantissa: each key and value is off by up to 1/16 of itself.
    for (dtype, tol) in [
        (KvDType::Bf16, 2e-2),
        (KvDType::F16, 3e-3),
        (KvDType::Fp8, 1e-1),
    ] {
        let mut kv = CpuKvCache::new(layout(dtype), 3).unwrap();
        let mut batch = ForwardBatch::default();
        batch.push(&[0; 9], 0, vec![2, 0, 1], true);
        let out = attend(&backend, &mut kv, &batch, &qkv);
        for (i, (a, b)) in out.data.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() < tol, "{dtype:?} [{i}] {a} vs {b}");
        }
    }
}

#[test]
fn attention_rejects_blocks_outside_the_cache() {
    let backend = CpuBackend::new(&CpuOptions::default()).unwrap();
    let mut kv = CpuKvCache::new(layout(KvDType::F32), 2).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&[0; 5], 0, vec![0, 9], true);
    let plan = BatchPlan::new(&batch, 4, &inv_freq());
    let b = backend.prepare_batch(&plan).unwrap();
    let mut t = CpuTensor::new(5, SHAPE.qkv_width(), vec![0.0; 5 * SHAPE.qkv_width()]);
    let err = backend
        .rope_and_cache_write(&mut t, &b, &SHAPE, &mut kv, 0)
        .unwrap_err();
    assert!(
        matches!(err, BackendError::BlockOutOfRange { block: 9, .. }),
        "{err}"
    );
}
