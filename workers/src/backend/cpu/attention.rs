//! Rotary embedding fused with the KV-cache write, and paged attention over the block-major
//! cache.
//!
//! Attention is computed per (token, kv head): the scores of each query head of the group
//! against every key of the token's causal context, read block by block through the sequence's
//! block table; softmax in f32 as Hugging Face does (`exp(s - max) / sum`); then the values
//! accumulated in position order. Nothing depends on the other tokens of the batch, so a
//! sequence's result is the same alone or batched, and the same whether its prompt was
//! prefilled in one chunk or several.

use rayon::prelude::*;

use super::kv::{CpuKvCache, KvData};
use super::simd::{Elem, axpy, dot};
use crate::backend::{AttentionShape, BatchPlan};
use crate::kv_cache::KvLayout;

/// Rotates one head in place: Hugging Face's `x * cos + rotate_half(x) * sin`, where
/// `rotate_half([a, b]) = [-b, a]` over the two halves of the head.
#[inline]
pub fn rotate_half_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (xa, xb) = (a[i], b[i]);
        a[i] = xa * cos[i] - xb * sin[i];
        b[i] = xb * cos[i] + xa * sin[i];
    }
}

fn write_kv<E: Elem>(cache: &mut [E], start: usize, src: &[f32]) {
    for (dst, &v) in cache[start..start + src.len()].iter_mut().zip(src) {
        *dst = E::from_f32(v);
    }
}

/// Applies rope to q (in place) and k of every token's fused row, and stores k and v into the
/// token's slot of `layer`.
pub fn rope_and_cache_write(
    qkv: &mut [f32],
    plan: &BatchPlan,
    shape: &AttentionShape,
    cache: &mut CpuKvCache,
    layer: usize,
) {
    let d = shape.head_dim;
    let width = shape.qkv_width();
    let half = plan.rope_half;
    let layout = cache.layout();
    let kv_width = shape.num_kv_heads * d;
    for (t, row) in qkv.chunks_mut(width).enumerate() {
        let cos = &plan.rope_cos[t * half..(t + 1) * half];
        let sin = &plan.rope_sin[t * half..(t + 1) * half];
        for head in row[..(shape.num_heads + shape.num_kv_heads) * d].chunks_mut(d) {
            rotate_half_in_place(head, cos, sin);
        }
        let slot = plan.slot_mapping[t] as usize;
        let (block, offset) = (slot / layout.block_size, slot % layout.block_size);
        let base = block * layout.block_elems();
        let k_start = base + layout.offset(layer, 0, offset);
        let v_start = base + layout.offset(layer, 1, offset);
        let k = &row[shape.num_heads * d..][..kv_width];
        let v = &row[(shape.num_heads + shape.num_kv_heads) * d..][..kv_width];
        match cache.data_mut() {
            KvData::F32(c) => {
                write_kv(c, k_start, k);
                write_kv(c, v_start, v);
            }
            KvData::Bf16(c) => {
                write_kv(c, k_start, k);
                write_kv(c, v_start, v);
            }
            KvData::F16(c) => {
                write_kv(c, k_start, k);
                write_kv(c, v_start, v);
            }
        }
    }
}

/// Paged attention of all new tokens; `seq_of_token[t]` is the plan sequence of token `t`.
/// Returns `[tokens, num_heads * head_dim]`.
pub fn paged_attention(
    qkv: &[f32],
    plan: &BatchPlan,
    seq_of_token: &[u32],
    shape: &AttentionShape,
    cache: &CpuKvCache,
    layer: usize,
) -> Vec<f32> {
    match cache.data() {
        KvData::F32(c) => attention_typed(qkv, plan, seq_of_token, shape, cache.layout(), c, layer),
        KvData::Bf16(c) => {
            attention_typed(qkv, plan, seq_of_token, shape, cache.layout(), c, layer)
        }
        KvData::F16(c) => attention_typed(qkv, plan, seq_of_token, shape, cache.layout(), c, layer),
    }
}

fn attention_typed<E: Elem>(
    qkv: &[f32],
    plan: &BatchPlan,
    seq_of_token: &[u32],
    shape: &AttentionShape,
    layout: KvLayout,
    cache: &[E],
    layer: usize,
) -> Vec<f32> {
    let d = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let width = shape.qkv_width();
    let tokens = plan.num_tokens();
    let mut out = vec![0f32; tokens * shape.num_heads * d];
    // One task per (token, kv head): its output is `group` consecutive heads of the row.
    out.par_chunks_mut(group * d)
        .enumerate()
        .for_each(|(item, out)| {
            let (t, g) = (item / shape.num_kv_heads, item % shape.num_kv_heads);
            let seq = &plan.sequences[seq_of_token[t] as usize];
            let context = seq.cached_len + (t - seq.token_start) + 1;
            let table = plan.block_table(seq);
            let mut scores = vec![0f32; context];
            for (hh, out) in out.chunks_mut(d).enumerate() {
                let h = g * group + hh;
                let q = &qkv[t * width + h * d..][..d];
                for (j, score) in scores.iter_mut().enumerate() {
                    let block = table[j / layout.block_size] as usize;
                    let k_start = block * layout.block_elems()
                        + layout.offset(layer, 0, j % layout.block_size)
                        + g * d;
                    *score = dot(q, &cache[k_start..k_start + d]) * shape.scale;
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                out.fill(0.0);
                for (j, &s) in scores.iter().enumerate() {
                    let block = table[j / layout.block_size] as usize;
                    let v_start = block * layout.block_elems()
                        + layout.offset(layer, 1, j % layout.block_size)
                        + g * d;
                    axpy(out, s / sum, &cache[v_start..v_start + d]);
                }
            }
        });
    out
}

/// The slow twin of rope + paged attention for one sequence with no cached tokens: dense
/// causal attention over `[tokens, qkv_width]` rows (rope already applied), in f64.
pub fn attention_slow(qkv: &[f32], tokens: usize, shape: &AttentionShape) -> Vec<f32> {
    let d = shape.head_dim;
    let width = shape.qkv_width();
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = vec![0f32; tokens * shape.num_heads * d];
    for t in 0..tokens {
        for h in 0..shape.num_heads {
            let g = h / group;
            let q = &qkv[t * width + h * d..][..d];
            let key = |j: usize| &qkv[j * width + (shape.num_heads + g) * d..][..d];
            let value =
                |j: usize| &qkv[j * width + (shape.num_heads + shape.num_kv_heads + g) * d..][..d];
            let scores: Vec<f64> = (0..=t)
                .map(|j| {
                    q.iter()
                        .zip(key(j))
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * shape.scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for e in 0..d {
                let v: f64 = (0..=t).map(|j| exps[j] / sum * value(j)[e] as f64).sum();
                out[t * shape.num_heads * d + h * d + e] = v as f32;
            }
        }
    }
    out
}
