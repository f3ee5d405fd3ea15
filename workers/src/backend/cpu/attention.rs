//! Rotary embedding fused with the KV-cache write, and paged attention over the block-major
//! cache.
//!
//! Attention is computed per (token, kv head): the scores of each query head of the group
//! against every key of the token's causal context, read block by block through the sequence's
//! block table; softmax in f32 as Hugging Face does (`exp(s - max) / sum`); then the values
//! accumulated in position order. Nothing depends on the other tokens of the batch, so a
//! sequence's result is the same alone or batched, and the same whether its prompt was
//! prefilled in one chunk or several.
//!
//! A sequence with many tokens in a forward (a prompt) has its keys copied once per layer
//! into f32, dimension-major in tiles of 16 (`stage_keys`), so that each of its tokens
//! scores 16 keys a 512-bit register without widening them again; the scores' arithmetic is
//! the same as from the cache (`dots_staged_avx512`), so the bits do not depend on it.

use rayon::prelude::*;

use super::kv::{CpuKvCache, KvData};
#[cfg(target_arch = "x86_64")]
use super::simd::exp_shifted_avx;
use super::simd::{Elem, exp_shifted};
use crate::backend::{AttentionShape, BatchPlan, PlanSequence};
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
    let avx512 = super::simd::has_avx512f();
    let mut out = vec![0f32; tokens * shape.num_heads * d];
    // One task per (token, kv head) covers the kv head's query heads, which then read each key
    // and value once; a batch too small for that to keep every thread busy (a decode step of a
    // few sequences) takes one task per (token, query head) instead. Both compute each query
    // head's result with the same arithmetic, so the split changes no bits.
    let heads_per_task = if tokens * shape.num_kv_heads >= 4 * rayon::current_num_threads() {
        group
    } else {
        1
    };
    let tasks_per_token = shape.num_heads / heads_per_task;
    let stages = if avx512 && d.is_multiple_of(8) {
        stage_sequences(plan, shape, layout, cache, layer)
    } else {
        Vec::new()
    };
    out.par_chunks_mut(heads_per_task * d)
        .enumerate()
        .with_min_len(4usize.div_ceil(heads_per_task))
        .for_each(|(item, out)| {
            let (t, h) = (
                item / tasks_per_token,
                item % tasks_per_token * heads_per_task,
            );
            let g = h / group;
            let seq_index = seq_of_token[t] as usize;
            let seq = &plan.sequences[seq_index];
            let task = Task {
                q: &qkv[t * width + h * d..][..heads_per_task * d],
                group: heads_per_task,
                head_dim: d,
                scale: shape.scale,
                context: seq.cached_len + (t - seq.token_start) + 1,
                table: plan.block_table(seq),
                layout,
                k_offset: layout.offset(layer, 0, 0) + g * d,
                v_offset: layout.offset(layer, 1, 0) + g * d,
                staged_keys: stages
                    .get(seq_index)
                    .and_then(Option::as_ref)
                    .map(|heads| heads[g].as_slice()),
            };
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: features checked.
                unsafe { attend_avx512(&task, cache, out) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: features checked.
                unsafe { attend_avx2(&task, cache, out) };
                return;
            }
            let _ = (avx, avx512);
            attend::<E, false, false>(&task, cache, out);
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
    /// The sequence's keys of this kv head as [`stage_keys`] copies them, where it has them:
    /// read by the 512-bit path in place of the cache's.
    staged_keys: Option<&'a [f32]>,
}

/// Sequences with at least this many tokens in a forward have their keys staged
/// ([`stage_keys`]); fewer (a decode step) read them from the cache, where each key is read
/// once a step either way.
const STAGE_MIN_TOKENS: usize = 16;
/// Keys a staged tile holds: one 512-bit register of scores.
const STAGE_TILE: usize = 16;

/// Per sequence of the plan, its staged keys of each kv head of `layer` ([`stage_keys`]), or
/// `None` for a sequence of fewer than [`STAGE_MIN_TOKENS`] tokens.
fn stage_sequences<E: Elem>(
    plan: &BatchPlan,
    shape: &AttentionShape,
    layout: KvLayout,
    cache: &[E],
    layer: usize,
) -> Vec<Option<Vec<Vec<f32>>>> {
    let kv_heads = shape.num_kv_heads;
    let d = shape.head_dim;
    let staged = |seq: &PlanSequence| seq.token_count >= STAGE_MIN_TOKENS;
    if !plan.sequences.iter().any(staged) {
        return Vec::new();
    }
    let items: Vec<(usize, usize)> = plan
        .sequences
        .iter()
        .enumerate()
        .filter(|(_, seq)| staged(seq))
        .flat_map(|(i, _)| (0..kv_heads).map(move |g| (i, g)))
        .collect();
    let mut copies: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(i, g)| {
            let seq = &plan.sequences[i];
            stage_keys(
                cache,
                &layout,
                plan.block_table(seq),
                layout.offset(layer, 0, 0) + g * d,
                seq.context_len(),
                d,
            )
        })
        .collect();
    let mut stages: Vec<Option<Vec<Vec<f32>>>> = vec![None; plan.sequences.len()];
    for (&(i, _), keys) in items.iter().zip(copies.drain(..)) {
        stages[i].get_or_insert_with(Vec::new).push(keys);
    }
    stages
}

/// The first `context` keys of one kv head (at `k_offset` in each block of `table`) in f32,
/// [`STAGE_TILE`] keys at a time dimension-major: element `c * 16 + lane` of tile `t` is
/// dimension `c` of key `16 t + lane`, zero past the context. Widening is exact, so scores
/// from the copy are those from the cache.
fn stage_keys<E: Elem>(
    cache: &[E],
    layout: &KvLayout,
    table: &[u32],
    k_offset: usize,
    context: usize,
    d: usize,
) -> Vec<f32> {
    let tile_len = d * STAGE_TILE;
    let mut keys = vec![0f32; context.div_ceil(STAGE_TILE) * tile_len];
    let stride = layout.token_stride();
    for (j, &block) in (0..context).zip(
        table
            .iter()
            .flat_map(|b| std::iter::repeat_n(b, layout.block_size)),
    ) {
        let base =
            block as usize * layout.block_elems() + k_offset + (j % layout.block_size) * stride;
        let key = &cache[base..base + d];
        let tile = &mut keys[j / STAGE_TILE * tile_len..][..tile_len];
        let lane = j % STAGE_TILE;
        for (c, v) in key.iter().enumerate() {
            tile[c * STAGE_TILE + lane] = v.to_f32();
        }
    }
    keys
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: Elem>(task: &Task<'_>, cache: &[E], out: &mut [f32]) {
    attend::<E, true, false>(task, cache, out)
}

/// [`attend_avx2`] with the values' weighted sums in 512-bit registers: 16 dimensions an
/// instruction and 32 registers, so a group's whole head dimension accumulates in one pass
/// over the positions. Each output dimension is its own lane in either width, so the bits
/// are [`attend_avx2`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512<E: Elem>(task: &Task<'_>, cache: &[E], out: &mut [f32]) {
    attend::<E, true, true>(task, cache, out)
}

/// Scores of every query head of the group against each key, block by block; softmax as
/// Hugging Face computes it (`exp(s - max) / sum`, with [`exp_shifted`]); values accumulated in
/// position order. `AVX` selects intrinsics (only instantiated inside [`attend_avx2`]), which
/// read each key and value once for all the group's heads, or the portable twins of identical
/// arithmetic, one head at a time.
#[inline(always)]
fn attend<E: Elem, const AVX: bool, const AVX512: bool>(
    task: &Task<'_>,
    cache: &[E],
    out: &mut [f32],
) {
    let (d, group, context) = (task.head_dim, task.group, task.context);
    let layout = &task.layout;
    let stride = layout.token_stride();
    let mut scores = vec![0f32; group * context];
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(keys)) = (AVX512, task.staged_keys) {
        // SAFETY: only instantiated with AVX512 inside `attend_avx512`.
        unsafe { dots_staged_avx512(task.q, group, d, keys, context, &mut scores) };
    }
    let mut j = if AVX512 && task.staged_keys.is_some() {
        context
    } else {
        0
    };
    for &block in task.table {
        if j >= context {
            break;
        }
        let n_in = layout.block_size.min(context - j);
        let base = block as usize * layout.block_elems() + task.k_offset;
        let keys = &cache[base..base + (n_in - 1) * stride + d];
        #[cfg(target_arch = "x86_64")]
        if AVX && d.is_multiple_of(8) {
            // SAFETY: only instantiated with AVX inside `attend_avx2`.
            unsafe {
                dots_group_avx(
                    task.q,
                    group,
                    d,
                    keys,
                    stride,
                    n_in,
                    &mut scores,
                    context,
                    j,
                )
            };
            j += n_in;
            continue;
        }
        for hh in 0..group {
            let q = &task.q[hh * d..(hh + 1) * d];
            let row = &mut scores[hh * context + j..hh * context + j + n_in];
            dots_k::<E, AVX>(q, keys, stride, row);
        }
        j += n_in;
    }
    for hh in 0..group {
        softmax_k::<AVX>(&mut scores[hh * context..(hh + 1) * context], task.scale);
    }
    #[cfg(target_arch = "x86_64")]
    if AVX512 && d.is_multiple_of(16) && group <= 4 {
        // SAFETY: only instantiated with AVX512 inside `attend_avx512`.
        unsafe { weighted_sums_group_avx512(task, cache, &scores, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if AVX && d.is_multiple_of(8) {
        // SAFETY: only instantiated with AVX inside `attend_avx2` or `attend_avx512`.
        unsafe { weighted_sums_group_avx(task, cache, &scores, out) };
        return;
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

/// `row <- softmax(row * scale)`: the scaled scores' maximum, [`exp_shifted`] of each score less
/// it, their sum in 8 lanes (then [`super::simd::hsum_lanes`], then the tail in order), and
/// each divided by the sum. The AVX and portable paths compute the same bits.
#[inline(always)]
fn softmax_k<const AVX: bool>(row: &mut [f32], scale: f32) {
    let n8 = row.len() / 8 * 8;
    #[cfg(target_arch = "x86_64")]
    if AVX {
        use std::arch::x86_64::*;
        // SAFETY: only instantiated with AVX inside `attend_avx2`; every access is below n8
        // or checked.
        unsafe {
            let p = row.as_mut_ptr();
            let vscale = _mm256_set1_ps(scale);
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in (0..n8).step_by(8) {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(c)), vscale);
                _mm256_storeu_ps(p.add(c), v);
                vmax = _mm256_max_ps(vmax, v);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for v in &mut row[n8..] {
                *v *= scale;
                max = max.max(*v);
            }
            let vm = _mm256_set1_ps(max);
            let mut vsum = _mm256_setzero_ps();
            for c in (0..n8).step_by(8) {
                let e = exp_shifted_avx(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), vm));
                _mm256_storeu_ps(p.add(c), e);
                vsum = _mm256_add_ps(vsum, e);
            }
            let mut sum = super::simd::hsum_avx(vsum);
            for v in &mut row[n8..] {
                *v = exp_shifted(*v - max);
                sum += *v;
            }
            let vs = _mm256_set1_ps(sum);
            for c in (0..n8).step_by(8) {
                _mm256_storeu_ps(p.add(c), _mm256_div_ps(_mm256_loadu_ps(p.add(c)), vs));
            }
            for v in &mut row[n8..] {
                *v /= sum;
            }
        }
        return;
    }
    let mut max = f32::NEG_INFINITY;
    for v in row.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    let mut lanes = [0f32; 8];
    for (c, v) in row[..n8].iter_mut().enumerate() {
        *v = exp_shifted(*v - max);
        lanes[c % 8] += *v;
    }
    let mut sum = super::simd::hsum_lanes(lanes);
    for v in &mut row[n8..] {
        *v = exp_shifted(*v - max);
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// The scores of the group's `group` query heads (`q`, `[group][d]`) against the first
/// `context` staged keys ([`stage_keys`]) into `scores[hh * context..][..context]`, 16 keys a
/// register and up to three heads a pass. Each score has [`dots_tile`]'s arithmetic: eight
/// partial sums (dimensions `l`, `l + 8`, ... fused in order, `l` in 0..8), then
/// [`super::simd::hsum_avx`]'s tree over them, here as sums of whole registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_staged_avx512(
    q: &[f32],
    group: usize,
    d: usize,
    keys: &[f32],
    context: usize,
    scores: &mut [f32],
) {
    let mut h = 0;
    while h < group {
        let (q, scores) = (&q[h * d..], &mut scores[h * context..]);
        // SAFETY (all arms): AVX-512F present (the caller's contract).
        h += unsafe {
            match group - h {
                1 => dots_staged_tile::<1>(q, d, keys, context, scores),
                2 => dots_staged_tile::<2>(q, d, keys, context, scores),
                _ => dots_staged_tile::<3>(q, d, keys, context, scores),
            }
        };
    }
}

/// [`dots_staged_avx512`] for `G` heads (`8 G` accumulators); returns `G`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `acc[head][lane]`: the register tile reads clearest indexed
unsafe fn dots_staged_tile<const G: usize>(
    q: &[f32],
    d: usize,
    keys: &[f32],
    context: usize,
    scores: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let tiles = context.div_ceil(STAGE_TILE);
    assert!(
        d.is_multiple_of(8)
            && q.len() >= G * d
            && keys.len() >= tiles * d * STAGE_TILE
            && scores.len() >= (G - 1) * context + context
    );
    // SAFETY: tile t spans keys[t * d * 16..][..d * 16] and head hh's query q[hh * d..][..d]
    // and scores scores[hh * context..][..context] (checked above); the last tile's store is
    // masked to the context.
    unsafe {
        for t in 0..tiles {
            let tile = keys.as_ptr().add(t * d * STAGE_TILE);
            let mut acc = [[_mm512_setzero_ps(); 8]; G];
            let mut c0 = 0;
            while c0 < d {
                for l in 0..8 {
                    let k = _mm512_loadu_ps(tile.add((c0 + l) * STAGE_TILE));
                    for hh in 0..G {
                        let qv = _mm512_set1_ps(*q.get_unchecked(hh * d + c0 + l));
                        acc[hh][l] = _mm512_fmadd_ps(qv, k, acc[hh][l]);
                    }
                }
                c0 += 8;
            }
            let n = STAGE_TILE.min(context - t * STAGE_TILE);
            for hh in 0..G {
                let a = &acc[hh];
                let sum = _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                    _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
                );
                let dst = scores.as_mut_ptr().add(hh * context + t * STAGE_TILE);
                _mm512_mask_storeu_ps(dst, ((1u32 << n) - 1) as u16, sum);
            }
        }
    }
    G
}

/// The scores of the group's `group` query heads (`q`, `[group][d]`) against the block's `n`
/// keys (`stride` apart), into `scores[hh * context + j..][..n]`: each key's 8 values loaded
/// once for every head; each score has [`dots_k`]'s arithmetic.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_group_avx<E: Elem>(
    q: &[f32],
    group: usize,
    d: usize,
    keys: &[E],
    stride: usize,
    n: usize,
    scores: &mut [f32],
    context: usize,
    j: usize,
) {
    // SAFETY (all arms): AVX2+FMA present (the caller's contract); reads checked below.
    unsafe {
        match group {
            1 => dots_tile::<E, 1, 4>(q, d, keys, stride, n, scores, context, j),
            2 => dots_tile::<E, 2, 4>(q, d, keys, stride, n, scores, context, j),
            3 => dots_tile::<E, 3, 4>(q, d, keys, stride, n, scores, context, j),
            4 => dots_tile::<E, 4, 3>(q, d, keys, stride, n, scores, context, j),
            _ => {
                for hh in 0..group {
                    let row = &mut scores[hh * context + j..hh * context + j + n];
                    dots_k::<E, true>(&q[hh * d..(hh + 1) * d], keys, stride, row);
                }
            }
        }
    }
}

/// [`dots_group_avx`] for `G` heads, `KU` keys at a time (`G * KU` accumulators in registers).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_tile<E: Elem, const G: usize, const KU: usize>(
    q: &[f32],
    d: usize,
    keys: &[E],
    stride: usize,
    n: usize,
    scores: &mut [f32],
    context: usize,
    j: usize,
) {
    use std::arch::x86_64::*;
    assert!(q.len() >= G * d && (n == 0 || keys.len() >= (n - 1) * stride + d));
    let mut t = 0;
    // SAFETY: key t + u < n spans keys[(t + u) * stride..][..d] and query head hh spans
    // q[hh * d..][..d], both inside the slices checked above.
    unsafe {
        while t + KU <= n {
            let mut acc = [[_mm256_setzero_ps(); KU]; G];
            let mut c = 0;
            while c < d {
                for u in 0..KU {
                    let k = E::load8(keys.as_ptr().add((t + u) * stride + c));
                    for (hh, acc) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(q.as_ptr().add(hh * d + c));
                        acc[u] = _mm256_fmadd_ps(qv, k, acc[u]);
                    }
                }
                c += 8;
            }
            for (hh, acc) in acc.iter().enumerate() {
                for (u, acc) in acc.iter().enumerate() {
                    scores[hh * context + j + t + u] = super::simd::hsum_avx(*acc);
                }
            }
            t += KU;
        }
    }
    for u in t..n {
        for hh in 0..G {
            scores[hh * context + j + u] =
                dot_k::<E, true>(&q[hh * d..(hh + 1) * d], &keys[u * stride..u * stride + d]);
        }
    }
}

/// Every head's `out[hh][c] = sum_j probs[hh][j] * V_j[c]`, each value vector read once for all
/// the group's heads: `W8` groups of 8 dimensions at a time, positions in order (the bits of
/// [`weighted_sum_k`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted_sums_group_avx<E: Elem>(
    task: &Task<'_>,
    cache: &[E],
    scores: &[f32],
    out: &mut [f32],
) {
    // SAFETY (all arms): AVX2+FMA present (the caller's contract).
    unsafe {
        match task.group {
            1 => weighted_sums_tile::<E, 1, 4>(task, cache, scores, out),
            2 => weighted_sums_tile::<E, 2, 4>(task, cache, scores, out),
            3 => weighted_sums_tile::<E, 3, 2>(task, cache, scores, out),
            4 => weighted_sums_tile::<E, 4, 2>(task, cache, scores, out),
            _ => {
                let (d, context) = (task.head_dim, task.context);
                for (hh, out) in out.chunks_mut(d).enumerate() {
                    let probs = &scores[hh * context..(hh + 1) * context];
                    let mut c0 = 0;
                    while c0 < d {
                        let width = 32.min(d - c0);
                        weighted_sum_k::<E, true>(task, cache, probs, c0, &mut out[c0..c0 + width]);
                        c0 += width;
                    }
                }
            }
        }
    }
}

/// [`weighted_sums_group_avx`] in 512-bit registers, for groups of up to 4 heads and head
/// dimensions a multiple of 16: 64 dimensions of every head a pass (at most 16 accumulators).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted_sums_group_avx512<E: Elem>(
    task: &Task<'_>,
    cache: &[E],
    scores: &[f32],
    out: &mut [f32],
) {
    // SAFETY (all arms): AVX-512F present (the caller's contract).
    unsafe {
        match task.group {
            1 => weighted_sums_tile512::<E, 1, 4>(task, cache, scores, out),
            2 => weighted_sums_tile512::<E, 2, 4>(task, cache, scores, out),
            3 => weighted_sums_tile512::<E, 3, 4>(task, cache, scores, out),
            4 => weighted_sums_tile512::<E, 4, 4>(task, cache, scores, out),
            g => unreachable!("weighted_sums_group_avx512: a group of {g} heads"),
        }
    }
}

/// [`weighted_sums_tile`] with `W16 * 16` dimensions at a time in 512-bit accumulators: per
/// lane the same fused multiply-adds in position order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `acc[head][i]`: the register tile reads clearest indexed
unsafe fn weighted_sums_tile512<E: Elem, const G: usize, const W16: usize>(
    task: &Task<'_>,
    cache: &[E],
    scores: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, context) = (task.head_dim, task.context);
    let layout = &task.layout;
    let stride = layout.token_stride();
    assert!(scores.len() >= G * context && out.len() >= G * d && d.is_multiple_of(16));
    let mut c0 = 0;
    while c0 < d {
        let w16 = W16.min((d - c0) / 16);
        // SAFETY: the value of position j + tok spans cache[base + tok * stride..][..d - c0]
        // (checked by the slice below); heads' probabilities and outputs are inside the
        // slices checked above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); W16]; G];
            let mut j = 0;
            for &block in task.table {
                if j >= context {
                    break;
                }
                let n_in = layout.block_size.min(context - j);
                let base = block as usize * layout.block_elems() + task.v_offset + c0;
                let values = &cache[base..base + (n_in - 1) * stride + w16 * 16];
                for tok in 0..n_in {
                    let v = values.as_ptr().add(tok * stride);
                    let mut p = [_mm512_setzero_ps(); G];
                    for (hh, p) in p.iter_mut().enumerate() {
                        *p = _mm512_set1_ps(*scores.get_unchecked(hh * context + j + tok));
                    }
                    for i in 0..w16 {
                        let value = E::load16(v.add(i * 16));
                        for hh in 0..G {
                            acc[hh][i] = _mm512_fmadd_ps(p[hh], value, acc[hh][i]);
                        }
                    }
                }
                j += n_in;
            }
            for (hh, acc) in acc.iter().enumerate() {
                for (i, acc) in acc.iter().enumerate().take(w16) {
                    _mm512_storeu_ps(out.as_mut_ptr().add(hh * d + c0 + i * 16), *acc);
                }
            }
        }
        c0 += w16 * 16;
    }
}

/// [`weighted_sums_group_avx`] for `G` heads, `W8 * 8` dimensions at a time (`G * W8`
/// accumulators), then the last multiple of 8 dimensions if `d` is not one of `W8 * 8`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `acc[head][i]`: the register tile reads clearest indexed
unsafe fn weighted_sums_tile<E: Elem, const G: usize, const W8: usize>(
    task: &Task<'_>,
    cache: &[E],
    scores: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, context) = (task.head_dim, task.context);
    let layout = &task.layout;
    let stride = layout.token_stride();
    assert!(scores.len() >= G * context && out.len() >= G * d && d.is_multiple_of(8));
    let mut c0 = 0;
    while c0 < d {
        let w8 = W8.min((d - c0) / 8);
        // SAFETY: the value of position j + tok spans cache[base + tok * stride..][..d - c0]
        // (checked by the slice below); heads' probabilities and outputs are inside the
        // slices checked above.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); W8]; G];
            let mut j = 0;
            for &block in task.table {
                if j >= context {
                    break;
                }
                let n_in = layout.block_size.min(context - j);
                let base = block as usize * layout.block_elems() + task.v_offset + c0;
                let values = &cache[base..base + (n_in - 1) * stride + w8 * 8];
                for tok in 0..n_in {
                    let v = values.as_ptr().add(tok * stride);
                    let mut p = [_mm256_setzero_ps(); G];
                    for (hh, p) in p.iter_mut().enumerate() {
                        *p = _mm256_set1_ps(*scores.get_unchecked(hh * context + j + tok));
                    }
                    for i in 0..w8 {
                        let value = E::load8(v.add(i * 8));
                        for hh in 0..G {
                            acc[hh][i] = _mm256_fmadd_ps(p[hh], value, acc[hh][i]);
                        }
                    }
                }
                j += n_in;
            }
            for (hh, acc) in acc.iter().enumerate() {
                for (i, acc) in acc.iter().enumerate().take(w8) {
                    _mm256_storeu_ps(out.as_mut_ptr().add(hh * d + c0 + i * 8), *acc);
                }
            }
        }
        c0 += w8 * 8;
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

#[cfg(test)]
mod tests {
    use half::bf16;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Query heads `q` of kv head 1 of layer 1, attending to `context` positions.
    fn task_of<'a>(
        q: &'a [f32],
        group: usize,
        context: usize,
        table: &'a [u32],
        layout: KvLayout,
    ) -> Task<'a> {
        let d = layout.head_dim;
        Task {
            q,
            group,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            context,
            table,
            layout,
            k_offset: layout.offset(1, 0, 0) + d,
            v_offset: layout.offset(1, 1, 0) + d,
            staged_keys: None,
        }
    }

    /// One kv head's `group` query heads over a scattered, partly filled block table, by the
    /// vector path with all heads in one task, by it one head at a time, and by the portable
    /// path: all the same bits, for group sizes the tiles specialize and one they do not.
    #[test]
    fn grouped_per_head_and_portable_attention_compute_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (group, d, context) in [
            (1usize, 64usize, 37usize),
            (2, 16, 5),
            (3, 64, 70),
            (3, 64, 1),
            (4, 128, 33),
            (5, 24, 19),
            (3, 12, 9),
        ] {
            let layout = KvLayout {
                num_layers: 2,
                num_kv_heads: 2,
                head_dim: d,
                block_size: 16,
                dtype: KvDType::Bf16,
            };
            let blocks = context.div_ceil(layout.block_size);
            let table: Vec<u32> = (0..blocks as u32).rev().map(|b| 2 * b + 1).collect();
            let cache: Vec<bf16> = (0..(2 * blocks + 1) * layout.block_elems())
                .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
                .collect();
            let q: Vec<f32> = (0..group * d)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let mut portable = vec![0f32; group * d];
            for (hh, out) in portable.chunks_mut(d).enumerate() {
                attend::<bf16, false, false>(
                    &task_of(&q[hh * d..(hh + 1) * d], 1, context, &table, layout),
                    &cache,
                    out,
                );
            }
            let mut grouped_portable = vec![0f32; group * d];
            attend::<bf16, false, false>(
                &task_of(&q, group, context, &table, layout),
                &cache,
                &mut grouped_portable,
            );
            assert_eq!(grouped_portable, portable, "group {group} d {d}");
            #[cfg(target_arch = "x86_64")]
            if super::super::simd::has_avx2() {
                let mut grouped = vec![0f32; group * d];
                // SAFETY: AVX2 checked.
                unsafe {
                    attend_avx2(
                        &task_of(&q, group, context, &table, layout),
                        &cache,
                        &mut grouped,
                    )
                };
                assert_eq!(grouped, portable, "group {group} d {d} context {context}");
                let mut per_head = vec![0f32; group * d];
                for (hh, out) in per_head.chunks_mut(d).enumerate() {
                    // SAFETY: AVX2 checked.
                    unsafe {
                        attend_avx2(
                            &task_of(&q[hh * d..(hh + 1) * d], 1, context, &table, layout),
                            &cache,
                            out,
                        )
                    };
                }
                assert_eq!(per_head, portable, "group {group} d {d} context {context}");
            }
            #[cfg(target_arch = "x86_64")]
            if super::super::simd::has_avx512f() {
                let mut wide = vec![0f32; group * d];
                // SAFETY: AVX-512F checked.
                unsafe {
                    attend_avx512(
                        &task_of(&q, group, context, &table, layout),
                        &cache,
                        &mut wide,
                    )
                };
                assert_eq!(
                    wide, portable,
                    "512-bit, group {group} d {d} context {context}"
                );
            }
        }
    }

    /// The 512-bit weighted sums over every cache element type: the bits of the 256-bit ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_and_narrow_attention_compute_the_same_bits_for_every_cache_type() {
        if !super::super::simd::has_avx512f() {
            eprintln!(
                "SKIPPED: wide_and_narrow_attention_compute_the_same_bits_for_every_cache_type: no AVX-512F"
            );
            return;
        }
        fn check<E: Elem>(name: &str, rng: &mut ChaCha8Rng) {
            for (group, d, context) in [(3usize, 64usize, 70usize), (4, 128, 33), (1, 32, 17)] {
                let layout = KvLayout {
                    num_layers: 2,
                    num_kv_heads: 2,
                    head_dim: d,
                    block_size: 16,
                    dtype: KvDType::Bf16,
                };
                let blocks = context.div_ceil(layout.block_size);
                let table: Vec<u32> = (0..blocks as u32).rev().map(|b| 2 * b + 1).collect();
                let cache: Vec<E> = (0..(2 * blocks + 1) * layout.block_elems())
                    .map(|_| E::from_f32(rng.random_range(-1.0f32..1.0)))
                    .collect();
                let q: Vec<f32> = (0..group * d)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                let task = task_of(&q, group, context, &table, layout);
                let (mut narrow, mut wide) = (vec![0f32; group * d], vec![0f32; group * d]);
                // SAFETY: AVX-512F (and so AVX2) checked by the caller.
                unsafe {
                    attend_avx2(&task, &cache, &mut narrow);
                    attend_avx512(&task, &cache, &mut wide);
                }
                assert_eq!(
                    wide, narrow,
                    "{name}: group {group} d {d} context {context}"
                );
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        check::<f32>("f32", &mut rng);
        check::<bf16>("bf16", &mut rng);
        check::<half::f16>("f16", &mut rng);
        check::<float8::F8E4M3>("fp8", &mut rng);
    }

    /// Scores from keys staged in f32 tiles: the bits of scores from the cache, for every cache
    /// element type, group sizes the tile passes split (5 = 3 + 2), head dimensions a
    /// multiple of 8 but not 16, and contexts that end inside a tile or on its edge.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn staged_keys_give_the_cache_s_bits() {
        if !super::super::simd::has_avx512f() {
            eprintln!("SKIPPED: staged_keys_give_the_cache_s_bits: no AVX-512F");
            return;
        }
        fn check<E: Elem>(name: &str, rng: &mut ChaCha8Rng) {
            for (group, d, context) in [
                (3usize, 64usize, 70usize),
                (3, 64, 1),
                (3, 64, 32),
                (4, 128, 33),
                (1, 32, 17),
                (2, 16, 16),
                (5, 24, 19),
            ] {
                let layout = KvLayout {
                    num_layers: 2,
                    num_kv_heads: 2,
                    head_dim: d,
                    block_size: 16,
                    dtype: KvDType::Bf16,
                };
                let blocks = context.div_ceil(layout.block_size);
                let table: Vec<u32> = (0..blocks as u32).rev().map(|b| 2 * b + 1).collect();
                let cache: Vec<E> = (0..(2 * blocks + 1) * layout.block_elems())
                    .map(|_| E::from_f32(rng.random_range(-1.0f32..1.0)))
                    .collect();
                let q: Vec<f32> = (0..group * d)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                let task = task_of(&q, group, context, &table, layout);
                // More keys staged than this token attends to, as for a prompt's earlier tokens.
                let staged = stage_keys(&cache, &layout, &table, task.k_offset, context, d);
                let staged_task = Task {
                    staged_keys: Some(&staged),
                    ..task_of(&q, group, context.min(context / 2 + 1), &table, layout)
                };
                let short = task_of(&q, group, staged_task.context, &table, layout);
                let (mut from_cache, mut from_stage) =
                    (vec![0f32; group * d], vec![0f32; group * d]);
                let (mut short_cache, mut short_stage) =
                    (vec![0f32; group * d], vec![0f32; group * d]);
                let full_stage = Task {
                    staged_keys: Some(&staged),
                    ..task_of(&q, group, context, &table, layout)
                };
                // SAFETY: AVX-512F checked.
                unsafe {
                    attend_avx512(&task, &cache, &mut from_cache);
                    attend_avx512(&full_stage, &cache, &mut from_stage);
                    attend_avx512(&short, &cache, &mut short_cache);
                    attend_avx512(&staged_task, &cache, &mut short_stage);
                }
                assert_eq!(
                    from_stage, from_cache,
                    "{name}: group {group} d {d} context {context}"
                );
                assert_eq!(
                    short_stage, short_cache,
                    "{name}: group {group} d {d} context {} of {context}",
                    staged_task.context
                );
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        check::<f32>("f32", &mut rng);
        check::<bf16>("bf16", &mut rng);
        check::<half::f16>("f16", &mut rng);
        check::<float8::F8E4M3>("fp8", &mut rng);
    }
}
