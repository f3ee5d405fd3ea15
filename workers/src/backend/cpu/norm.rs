//! Row-wise ops: RMSNorm, residual-add fused with RMSNorm, SiLU-and-multiply.
//!
//! Each row's arithmetic is independent of the others (the sum of squares is a
//! [`super::simd::dot`] with its fixed order), and rows are split across threads only when
//! there are enough of them to pay for it.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::simd::exp_shifted_avx;
use super::simd::{dot, exp_shifted};

/// Rows from which row-wise ops run in parallel.
const PARALLEL_MIN_ROWS: usize = 16;

fn for_rows<F>(out: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() / cols.max(1) >= PARALLEL_MIN_ROWS {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

/// One row: `out = (x * 1/sqrt(mean(x^2) + eps)) * weight`, in Hugging Face's order.
#[inline]
fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * inv) * w;
    }
}

/// RMSNorm of every row of `x` (`[rows, weight.len()]`) into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: x and out differ in size");
    assert_eq!(x.len() % cols, 0, "rms_norm: x is not [rows, cols]");
    for_rows(out, cols, |r, row| {
        rms_norm_row(&x[r * cols..(r + 1) * cols], weight, eps, row)
    });
}

/// RMSNorm of each head of the q and k parts of fused q/k/v rows (`[rows, cols]`, q's
/// `q_heads` heads then k's `k_heads`, `head_dim` values each; v untouched), in place: q heads
/// by `q_weight`, k heads by `k_weight` (Qwen3's `q_norm` and `k_norm`).
pub fn head_rms_norm(
    qkv: &mut [f32],
    cols: usize,
    (q_heads, k_heads): (usize, usize),
    q_weight: &[f32],
    k_weight: &[f32],
    eps: f32,
) {
    let head_dim = q_weight.len();
    assert_eq!(
        k_weight.len(),
        head_dim,
        "head_rms_norm: q and k norms differ"
    );
    assert!(
        (q_heads + k_heads) * head_dim <= cols,
        "head_rms_norm: {q_heads} + {k_heads} heads of {head_dim} in rows of {cols}"
    );
    let normed = (q_heads + k_heads) * head_dim;
    for_rows(qkv, cols, |_, row| {
        for (h, head) in row[..normed].chunks_mut(head_dim).enumerate() {
            let weight = if h < q_heads { q_weight } else { k_weight };
            let inv = 1.0 / (dot(head, head) / head_dim as f32 + eps).sqrt();
            for (v, &w) in head.iter_mut().zip(weight) {
                *v = (*v * inv) * w;
            }
        }
    });
}

/// `residual += x`, then `out = rms_norm(residual)`, row by row in one pass.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    assert_eq!(
        residual.len(),
        x.len(),
        "add_rms_norm: residual and x differ"
    );
    assert_eq!(
        residual.len(),
        out.len(),
        "add_rms_norm: residual and out differ"
    );
    let work = |(res, (x, out)): (&mut [f32], (&[f32], &mut [f32]))| {
        for (r, &v) in res.iter_mut().zip(x) {
            *r += v;
        }
        rms_norm_row(res, weight, eps, out);
    };
    let rows = residual.len() / cols.max(1);
    let it = residual
        .chunks_mut(cols)
        .zip(x.chunks(cols).zip(out.chunks_mut(cols)));
    if rows >= PARALLEL_MIN_ROWS {
        residual
            .par_chunks_mut(cols)
            .zip(x.par_chunks(cols).zip(out.par_chunks_mut(cols)))
            .for_each(work);
    } else {
        it.for_each(work);
    }
}

/// `silu(x) = x / (1 + exp(-x))`, PyTorch's formula, with the exponential of `-|x|` only
/// ([`exp_shifted`], whose vector twin gives the same bits): `x / (1 + e)` for `x >= 0`, and
/// `x e / (1 + e)` (the same quotient, multiplied through by `e = exp(x)`) below zero.
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_shifted(-x.abs());
    let numerator = if x < 0.0 { x * e } else { x };
    numerator / (1.0 + e)
}

/// `out[r] = silu(gate_up[r][..f]) * gate_up[r][f..]` with `f = out cols`.
pub fn silu_mul(gate_up: &[f32], f: usize, out: &mut [f32]) {
    assert_eq!(
        gate_up.len(),
        2 * out.len(),
        "silu_mul: gate_up is not [rows, 2f]"
    );
    let avx = super::simd::has_avx2();
    for_rows(out, f, |r, row| {
        let gu = &gate_up[r * 2 * f..(r + 1) * 2 * f];
        let (gate, up) = gu.split_at(f);
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: AVX2 and FMA checked.
            unsafe { silu_mul_row_avx2(gate, up, row) };
            return;
        }
        let _ = avx;
        silu_mul_row(gate, up, row);
    });
}

fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// [`silu_mul_row`] eight at a time, with the same bits (the tail by the scalar path).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_row_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    assert!(gate.len() == n && up.len() == n);
    let n8 = n / 8 * 8;
    // SAFETY: c + 8 <= n8 <= the length of all three slices.
    unsafe {
        let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
        let sign = _mm256_set1_ps(-0.0);
        for c in (0..n8).step_by(8) {
            let x = _mm256_loadu_ps(gate.as_ptr().add(c));
            let e = exp_shifted_avx(_mm256_or_ps(x, sign));
            let below_zero = _mm256_cmp_ps::<_CMP_LT_OQ>(x, zero);
            let numerator = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), below_zero);
            let s = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(c)));
            _mm256_storeu_ps(out.as_mut_ptr().add(c), o);
        }
    }
    silu_mul_row(&gate[n8..], &up[n8..], &mut out[n8..]);
}

/// The slow twin of [`rms_norm`]: f64 throughout.
pub fn rms_norm_slow(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let cols = weight.len();
    x.chunks(cols)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
            let inv = 1.0 / (mean + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| (v as f64 * inv * w as f64) as f32)
        })
        .collect()
}

/// The slow twin of [`silu_mul`]: f64 throughout.
pub fn silu_mul_slow(gate_up: &[f32], f: usize) -> Vec<f32> {
    gate_up
        .chunks(2 * f)
        .flat_map(|row| {
            let (gate, up) = row.split_at(f);
            gate.iter().zip(up).map(|(&g, &u)| {
                let g = g as f64;
                (g / (1.0 + (-g).exp()) * u as f64) as f32
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
        }
    }

    #[test]
    fn rms_norm_matches_slow_twin() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for rows in [1, 3, 40] {
            let x = random(&mut rng, rows * 72);
            let w = random(&mut rng, 72);
            let mut out = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            close(&out, &rms_norm_slow(&x, &w, 1e-5), 1e-5);
        }
    }

    #[test]
    fn add_rms_norm_equals_add_then_norm() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for rows in [1, 20] {
            let mut residual = random(&mut rng, rows * 64);
            let x = random(&mut rng, rows * 64);
            let w = random(&mut rng, 64);
            let summed: Vec<f32> = residual.iter().zip(&x).map(|(a, b)| a + b).collect();
            let mut out = vec![0f32; x.len()];
            add_rms_norm(&mut residual, &x, &w, 1e-6, &mut out);
            assert_eq!(residual, summed);
            let mut expected = vec![0f32; x.len()];
            rms_norm(&summed, &w, 1e-6, &mut expected);
            assert_eq!(out, expected);
            close(&out, &rms_norm_slow(&summed, &w, 1e-6), 1e-5);
        }
    }

    #[test]
    fn head_rms_norm_norms_each_q_and_k_head_and_leaves_v() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (q_heads, k_heads, d) = (4, 2, 16);
        let cols = (q_heads + 2 * k_heads) * d;
        for rows in [1, 20] {
            let x = random(&mut rng, rows * cols);
            let (qw, kw) = (random(&mut rng, d), random(&mut rng, d));
            let mut y = x.clone();
            head_rms_norm(&mut y, cols, (q_heads, k_heads), &qw, &kw, 1e-6);
            for (xr, yr) in x.chunks(cols).zip(y.chunks(cols)) {
                for h in 0..q_heads + 2 * k_heads {
                    let (head, out) = (&xr[h * d..(h + 1) * d], &yr[h * d..(h + 1) * d]);
                    if h < q_heads + k_heads {
                        let w = if h < q_heads { &qw } else { &kw };
                        close(out, &rms_norm_slow(head, w, 1e-6), 1e-5);
                    } else {
                        assert_eq!(out, head, "v head {h} changed");
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_slow_twin() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (rows, f) in [(5, 24), (20, 29), (1, 3)] {
            let mut gu = random(&mut rng, rows * 2 * f);
            // Gates far out on both sides, where e^-|x| underflows, and both zeros.
            gu[0] = -120.0;
            gu[1] = 95.0;
            gu[2] = -0.0;
            gu[f - 1] = 0.0;
            let mut out = vec![0f32; rows * f];
            silu_mul(&gu, f, &mut out);
            close(&out, &silu_mul_slow(&gu, f), 1e-6);
        }
    }

    /// Every gate through the vector path and the scalar one: the same bits, across the
    /// range a gate projection gives and beyond it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn silu_mul_vector_and_scalar_rows_compute_the_same_bits() {
        if !super::super::simd::has_avx2() {
            eprintln!("SKIPPED: silu_mul_vector_and_scalar_rows_compute_the_same_bits: no AVX2");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for scale in [1.0f32, 10.0, 100.0] {
            let gate: Vec<f32> = (0..4099)
                .map(|_| scale * rng.random_range(-1.0f32..1.0))
                .collect();
            let up = random(&mut rng, gate.len());
            let (mut vector, mut scalar) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
            // SAFETY: AVX2 checked above (FMA comes with every AVX2 CPU this runs on, and
            // `has_avx2` checks it).
            unsafe { silu_mul_row_avx2(&gate, &up, &mut vector) };
            silu_mul_row(&gate, &up, &mut scalar);
            for ((v, s), g) in vector.iter().zip(&scalar).zip(&gate) {
                assert_eq!(v.to_bits(), s.to_bits(), "gate {g}");
            }
        }
    }
}
