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
use super::simd::Elem;
use crate::backend::{AttentionShape, BatchPlan};
use crate::kv_cache::{KvDType, KvLayout, key_rotation};

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
/// token's slot of `layer`. Over an FP8 cache, q and k are then rotated in place as
/// [`key_rotation`] says, which leaves their scores unchanged.
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
        let qk = &mut row[..(shape.num_heads + shape.num_kv_heads) * d];
        for head in qk.chunks_mut(d) {
            rotate_half_in_place(head, cos, sin);
        }
        if layout.dtype == KvDType::Fp8 {
            key_rotation::rotate_heads(qk, d);
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
            KvData::Fp8(c) => {
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
        KvData::Fp8(c) => attention_typed(qkv, plan, seq_of_token, shape, cache.layout(), c, layer),
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
    let avx = super::simd::has_avx2();
    let mut out = vec![0f32; tokens * shape.num_heads * d];
    // One task per (token, query head): a decode step still has num_heads tasks to spread
    // over the threads. (Grouping a kv head's query heads would read each key once instead of
    // `group` times, but from L1/L2 that is cheaper than idle threads.)
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(4)
        .for_each(|(item, out)| {
            let (t, h) = (item / shape.num_heads, item % shape.num_heads);
            let g = h / group;
            let seq = &plan.sequences[seq_of_token[t] as usize];
            let task = Task {
                q: &qkv[t * width + h * d..][..d],
                group: 1,
                head_dim: d,
                scale: shape.scale,
                context: seq.cached_len + (t - seq.token_start) + 1,
                table: plan.block_table(seq),
                layout,
                k_offset: layout.offset(layer, 0, 0) + g * d,
                v_offset: layout.offset(layer, 1, 0) + g * d,
            };
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: features checked.
                unsafe { attend_avx2(&task, cache, out) };
                return;
            }
            let _ = avx;
            attend::<E, false>(&task, cache, out);
        });
    out
}

/// Paged attention of `group` query heads of one token that share one kv head.
struct Task<'a> {
    /// The group's query heads, `[group][head_dim]`.
    q: &'a [f32],
    group: usize,
    head_dim: usize,
    scale: f32,
    /// Keys to attend to: positions `0..context` of the sequence.
    context: usize,
    table: &'a [u32],
    layout: KvLayout,
    /// Offset inside a block of this layer's K (and V) of token 0, kv head g.
    k_offset: usize,
    v_offset: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: Elem>(task: &Task<'_>, cache: &[E], out: &mut [f32]) {
    attend::<E, true>(task, cache, out)
}

/// Scores of every query head of the group against each key, block by block; softmax as
/// Hugging Face computes it; values accumulated in position order. `AVX` selects intrinsics
/// (only instantiated inside [`attend_avx2`]) or the portable twins of identical arithmetic.
#[inline(always)]
fn attend<E: Elem, const AVX: bool>(task: &Task<'_>, cache: &[E], out: &mut [f32]) {
    let (d, group, context) = (task.head_dim, task.group, task.context);
    let layout = &task.layout;
    let stride = layout.token_stride();
    let mut scores = vec![0f32; group * context];
    let mut j = 0;
    for &block in task.table {
        if j >= context {
            break;
        }
        let n_in = layout.block_size.min(context - j);
        let base = block as usize * layout.block_elems() + task.k_offset;
        let keys = &cache[base..base + (n_in - 1) * stride + d];
        for hh in 0..group {
            let q = &task.q[hh * d..(hh + 1) * d];
            let row = &mut scores[hh * context + j..hh * context + j + n_in];
            dots_k::<E, AVX>(q, keys, stride, row);
            for s in row.iter_mut() {
                *s *= task.scale;
            }
        }
        j += n_in;
    }
    for hh in 0..group {
        let s = &mut scores[hh * context..(hh + 1) * context];
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in s.iter_mut() {
            *v /= sum;
        }
    }
    // Values: one head and up to 32 dimensions at a time, so the accumulators stay in
    // registers across all positions (each element still sums positions in order). With 64
    // (8 accumulators) the compiler spilled one, and the loop waited on memory every position.
    for (hh, out) in out.chunks_mut(d).enumerate() {
        let probs = &scores[hh * context..(hh + 1) * context];
        let mut c0 = 0;
        while c0 < d {
            let width = 32.min(d - c0);
            weighted_sum_k::<E, AVX>(task, cache, probs, c0, &mut out[c0..c0 + width]);
            c0 += width;
        }
    }
}

/// `out[c] = sum_j probs[j] * V_j[c0 + c]` over the task's positions, fused, in order of `j`.
#[inline(always)]
fn weighted_sum_k<E: Elem, const AVX: bool>(
    task: &Task<'_>,
    cache: &[E],
    probs: &[f32],
    c0: usize,
    out: &mut [f32],
) {
    let layout = &task.layout;
    let stride = layout.token_stride();
    #[cfg(target_arch = "x86_64")]
    if AVX && out.len() == 32 {
        use std::arch::x86_64::*;
        // SAFETY: only instantiated with AVX inside `attend_avx2`; every read is checked by
        // the slice below, which covers the 32 values of each position.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            for &block in task.table {
                if j >= task.context {
                    break;
                }
                let n_in = layout.block_size.min(task.context - j);
                let base = block as usize * layout.block_elems() + task.v_offset + c0;
                let values = &cache[base..base + (n_in - 1) * stride + 32];
                for tok in 0..n_in {
                    let p = _mm256_set1_ps(probs[j + tok]);
                    let v = values.as_ptr().add(tok * stride);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(p, E::load8(v.add(i * 8)), *acc);
                    }
                }
                j += n_in;
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(i * 8), *acc);
            }
        }
        return;
    }
    out.fill(0.0);
    let mut j = 0;
    for &block in task.table {
        if j >= task.context {
            break;
        }
        let n_in = layout.block_size.min(task.context - j);
        let base = block as usize * layout.block_elems() + task.v_offset + c0;
        for tok in 0..n_in {
            let value = &cache[base + tok * stride..base + tok * stride + out.len()];
            axpy_k::<E, AVX>(out, probs[j + tok], value);
        }
        j += n_in;
    }
}

/// `row[t] = dot(q, key t)` for the keys `stride` apart in `keys`, four keys at a time
/// (independent FMA chains); each has [`super::simd::dot`]'s arithmetic.
#[inline(always)]
fn dots_k<E: Elem, const AVX: bool>(q: &[f32], keys: &[E], stride: usize, row: &mut [f32]) {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if AVX && d.is_multiple_of(8) {
        use std::arch::x86_64::*;
        let n = row.len();
        let mut t = 0;
        // SAFETY: only instantiated with AVX inside `attend_avx2`; key t spans
        // keys[t * stride..t * stride + d], inside the slice for t < n.
        unsafe {
            while t + 4 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut c = 0;
                while c < d {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (u, acc) in acc.iter_mut().enumerate() {
                        let k = E::load8(keys.as_ptr().add((t + u) * stride + c));
                        *acc = _mm256_fmadd_ps(qv, k, *acc);
                    }
                    c += 8;
                }
                for (u, acc) in acc.iter().enumerate() {
                    row[t + u] = super::simd::hsum_avx(*acc);
                }
                t += 4;
            }
        }
        for (u, r) in row.iter_mut().enumerate().skip(t) {
            *r = dot_k::<E, AVX>(q, &keys[u * stride..u * stride + d]);
        }
        return;
    }
    for (u, r) in row.iter_mut().enumerate() {
        *r = dot_k::<E, AVX>(q, &keys[u * stride..u * stride + d]);
    }
}

/// [`super::simd::dot`]'s arithmetic, inlinable into the AVX2 attention body.
#[inline(always)]
fn dot_k<E: Elem, const AVX: bool>(x: &[f32], w: &[E]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        use std::arch::x86_64::*;
        let k8 = x.len() / 8 * 8;
        // SAFETY: only instantiated with AVX inside `attend_avx2`; reads stay within k8.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < k8 {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(x.as_ptr().add(c)),
                    E::load8(w.as_ptr().add(c)),
                    acc,
                );
                c += 8;
            }
            let mut r = super::simd::hsum_avx(acc);
            for i in k8..x.len() {
                r = x[i].mul_add(w[i].to_f32(), r);
            }
            return r;
        }
    }
    super::simd::dot_portable(x, w)
}

/// `out += a * v` (fused), inlinable into the AVX2 attention body.
#[inline(always)]
fn axpy_k<E: Elem, const AVX: bool>(out: &mut [f32], a: f32, v: &[E]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        use std::arch::x86_64::*;
        let n8 = out.len() / 8 * 8;
        // SAFETY: only instantiated with AVX inside `attend_avx2`; c + 8 <= n8 <= both lengths.
        unsafe {
            let av = _mm256_set1_ps(a);
            let mut c = 0;
            while c < n8 {
                let o = _mm256_loadu_ps(out.as_ptr().add(c));
                let r = _mm256_fmadd_ps(av, E::load8(v.as_ptr().add(c)), o);
                _mm256_storeu_ps(out.as_mut_ptr().add(c), r);
                c += 8;
            }
        }
        for i in n8..out.len() {
            out[i] = a.mul_add(v[i].to_f32(), out[i]);
        }
        return;
    }
    for (o, v) in out.iter_mut().zip(v) {
        *o = a.mul_add(v.to_f32(), *o);
    }
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
