//! The inner loops of the CPU backend: dot products and dot-product tiles over f32 activations
//! and f32/bf16/f16 weights (and FP8 KV caches), with AVX2+FMA code and a portable twin of identical arithmetic.
//!
//! One fixed arithmetic per dot product, whatever kernel computes it: eight lanes, lane `l`
//! accumulating `x[8c + l] * w[8c + l]` with a fused multiply-add in increasing `c`; then the
//! lanes summed as `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`; then the tail (`k % 8`
//! elements) fused in order. A fused multiply-add is exactly rounded, so the AVX2 and portable
//! versions agree bitwise, and a tile of several rows computes each element exactly as a lone dot
//! product would: this is what makes the forward batch-invariant (a row's result cannot depend
//! on which other rows share its tile).

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX2+FMA(+F16C) kernels can run here: one test for the dense kernels here and
/// the quantized ones, so that a machine runs both families or neither.
pub use tandem_cpu_quant::has_avx2;

/// An element type weights or the KV cache may be stored in; computed in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Loads 8 consecutive elements as f32.
    ///
    /// # Safety
    /// `p` must be valid for 8 reads and the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
    /// Loads 16 consecutive elements as f32: two [`Self::load8`]s unless a type widens 16 at
    /// once.
    ///
    /// # Safety
    /// `p` must be valid for 16 reads and the CPU must have AVX-512F besides
    /// [`Self::load8`]'s features.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe {
            let low = _mm512_castps256_ps512(Self::load8(p));
            let high = _mm256_castps_pd(Self::load8(p.add(8)));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(low), high))
        }
    }
}

/// Whether the 512-bit forms of the inner loops can run here (AVX-512F besides
/// [`has_avx2`]'s features).
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // bf16 is the top half of an f32: widen to 32 bits and shift into place (exact).
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe {
            let h = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// Every FP8 e4m3 code's value, for loads that widen by table (exact: each code is an f32).
static FP8_VALUES: [f32; 256] = {
    let mut table = [0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = float8::F8E4M3::to_f32(&float8::F8E4M3::from_bits(code as u8));
        code += 1;
    }
    table
};

/// FP8 e4m3 (the KV cache's `fp8`): stores round to nearest and saturate at +-448, as the
/// GPU's `cvt.rn.satfinite` does.
impl Elem for float8::F8E4M3 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        FP8_VALUES[self.to_bits() as usize]
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        float8::F8E4M3::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe {
            let codes = _mm_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
            let high = _mm_cvtepu8_epi32(_mm_srli_si128::<4>(_mm_loadl_epi64(p.cast())));
            let index = _mm256_set_m128i(high, codes);
            _mm256_i32gather_ps::<4>(FP8_VALUES.as_ptr(), index)
        }
    }
}

#[inline(always)]
pub(crate) fn hsum_lanes(a: [f32; 8]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum_avx(v: __m256) -> f32 {
    // Same order as `hsum_lanes`: [l0+l4, l1+l5, l2+l6, l3+l7], then [s0+s2, s1+s3], then sum.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
    }
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, the first exact in f32 with trailing zeros, so that `x - n ln 2` loses
/// nothing for the `n` a softmax meets.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// e^x is below f32's smallest normal number for x under this; softmax takes such terms as
/// the smallest normal (a part in 1e38 of the maximum's term).
const EXP_MIN_ARG: f32 = -87.33;
/// 1/k! for k = 7 down to 2: Taylor's series of e^r on |r| <= ln 2 / 2 to within 6e-9.
const EXP_TAYLOR: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// e^x for a softmax's shifted score (x <= 0), within about 2 ulp of the exact value: x split
/// into n ln 2 + r, e^r by its Taylor polynomial (fused multiply-adds), times 2^n. The
/// vector twin [`exp_shifted_avx`] computes the same bits, which libm's scalar `expf` leaves
/// no way to do in a vector.
#[inline(always)]
pub(crate) fn exp_shifted(x: f32) -> f32 {
    let x = x.max(EXP_MIN_ARG);
    let n = (x * LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = EXP_TAYLOR[0];
    for c in &EXP_TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0).mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_shifted_avx(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe {
        let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN_ARG));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
        for c in &EXP_TAYLOR[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let one = _mm256_set1_ps(1.0);
        let p = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r, one), r, one);
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }
}

/// Portable dot product with the module's fixed arithmetic.
pub fn dot_portable<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    let k8 = x.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for c in (0..k8).step_by(8) {
        for l in 0..8 {
            acc[l] = x[c + l].mul_add(w[c + l].to_f32(), acc[l]);
        }
    }
    let mut r = hsum_lanes(acc);
    for i in k8..x.len() {
        r = x[i].mul_add(w[i].to_f32(), r);
    }
    r
}

/// Dot product, AVX2 when available; bitwise equal to [`dot_portable`].
#[inline]
pub fn dot<E: Elem>(x: &[f32], w: &[E]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let mut out = [[0f32; 1]; 1];
        // SAFETY: features checked; one row of each, `x.len()` elements, both in bounds.
        unsafe { tile_avx2::<E, 1, 1>(x.as_ptr(), 0, w.as_ptr(), 0, x.len(), &mut out) };
        return out[0][0];
    }
    dot_portable(x, w)
}

/// `out[i][j] = dot(x row i, w row j)` for an `MR x NR` tile, `k` elements per row.
///
/// # Safety
/// Rows `0..MR` of `x` (stride `x_stride`) and `0..NR` of `w` (stride `w_stride`) must each be
/// valid for `k` reads; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<E: Elem, const MR: usize, const NR: usize>(
    x: *const f32,
    x_stride: usize,
    w: *const E,
    w_stride: usize,
    k: usize,
    out: &mut [[f32; NR]; MR],
) {
    let k8 = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut c = 0;
    while c < k8 {
        let mut wv = [_mm256_setzero_ps(); NR];
        for (j, wv) in wv.iter_mut().enumerate() {
            *wv = unsafe { E::load8(w.add(j * w_stride + c)) };
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let xv = unsafe { _mm256_loadu_ps(x.add(i * x_stride + c)) };
            for (acc, wv) in acc.iter_mut().zip(wv.iter()) {
                *acc = _mm256_fmadd_ps(xv, *wv, *acc);
            }
        }
        c += 8;
    }
    for i in 0..MR {
        for j in 0..NR {
            let mut r = unsafe { hsum_avx(acc[i][j]) };
            for t in k8..k {
                let (xv, wv) = unsafe { (*x.add(i * x_stride + t), (*w.add(j * w_stride + t))) };
                r = xv.mul_add(wv.to_f32(), r);
            }
            out[i][j] = r;
        }
    }
}

/// `out[d] += a * v[d]` (fused), elementwise: the same result on every path.
#[inline]
pub fn axpy<E: Elem>(out: &mut [f32], a: f32, v: &[E]) {
    assert_eq!(out.len(), v.len(), "axpy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked.
        unsafe { axpy_avx2(out, a, v) };
        return;
    }
    axpy_portable(out, a, v)
}

fn axpy_portable<E: Elem>(out: &mut [f32], a: f32, v: &[E]) {
    for (o, v) in out.iter_mut().zip(v) {
        *o = a.mul_add(v.to_f32(), *o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2<E: Elem>(out: &mut [f32], a: f32, v: &[E]) {
    let n8 = out.len() / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut c = 0;
    while c < n8 {
        // SAFETY: c + 8 <= len of both slices.
        unsafe {
            let o = _mm256_loadu_ps(out.as_ptr().add(c));
            let r = _mm256_fmadd_ps(av, E::load8(v.as_ptr().add(c)), o);
            _mm256_storeu_ps(out.as_mut_ptr().add(c), r);
        }
        c += 8;
    }
    axpy_portable(&mut out[n8..], a, &v[n8..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use float8::F8E4M3;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn dot_f64(x: &[f32], w: &[f32]) -> f64 {
        x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    #[test]
    fn dot_paths_agree_bitwise_and_match_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for k in [1, 7, 8, 9, 64, 67, 576] {
            let x = random(&mut rng, k);
            let w = random(&mut rng, k);
            let fast = dot(&x, &w);
            assert_eq!(fast.to_bits(), dot_portable(&x, &w).to_bits(), "k={k}");
            assert!(
                (fast as f64 - dot_f64(&x, &w)).abs() < 1e-5 * k as f64,
                "k={k}"
            );
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert_eq!(dot(&x, &wb).to_bits(), dot_portable(&x, &wb32).to_bits());
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            assert_eq!(dot(&x, &wh).to_bits(), dot_portable(&x, &wh32).to_bits());
            let w8: Vec<F8E4M3> = w.iter().map(|&v| Elem::from_f32(v)).collect();
            let w832: Vec<f32> = w8.iter().map(|&v| Elem::to_f32(v)).collect();
            assert_eq!(dot(&x, &w8).to_bits(), dot_portable(&x, &w832).to_bits());
        }
    }

    #[test]
    fn fp8_elements_widen_exactly_and_store_saturating() {
        for code in 0..=255u8 {
            let v = F8E4M3::from_bits(code);
            let exact = F8E4M3::to_f32(&v);
            let ours = Elem::to_f32(v);
            assert!(
                ours.to_bits() == exact.to_bits() || (ours.is_nan() && exact.is_nan()),
                "code {code:#04x}: {ours} vs {exact}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let codes: Vec<F8E4M3> = (0..=255u8).map(F8E4M3::from_bits).collect();
            for chunk in codes.chunks(8).filter(|c| !c[0].to_f32().is_nan()) {
                let lanes: [f32; 8] =
                    unsafe { std::mem::transmute(<F8E4M3 as Elem>::load8(chunk.as_ptr())) };
                for (lane, &code) in lanes.iter().zip(chunk) {
                    let exact = Elem::to_f32(code);
                    assert!(lane.to_bits() == exact.to_bits() || (lane.is_nan() && exact.is_nan()));
                }
            }
        }
        // Past the largest finite value a store saturates (as the GPU's cvt.rn.satfinite).
        assert_eq!(Elem::to_f32(<F8E4M3 as Elem>::from_f32(1e6)), 448.0);
        assert_eq!(Elem::to_f32(<F8E4M3 as Elem>::from_f32(-500.0)), -448.0);
        assert_eq!(Elem::to_f32(<F8E4M3 as Elem>::from_f32(0.3)), 0.3125);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_elements_equal_lone_dot_products() {
        if !has_avx2() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let k = 75;
        let x = random(&mut rng, 4 * k);
        let w = random(&mut rng, 3 * k);
        let mut out = [[0f32; 3]; 4];
        unsafe { tile_avx2::<f32, 4, 3>(x.as_ptr(), k, w.as_ptr(), k, k, &mut out) };
        for i in 0..4 {
            for j in 0..3 {
                let lone = dot_portable(&x[i * k..][..k], &w[j * k..][..k]);
                assert_eq!(out[i][j].to_bits(), lone.to_bits(), "({i},{j})");
            }
        }
    }

    #[test]
    fn axpy_matches_portable() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let v: Vec<bf16> = random(&mut rng, 37)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let mut a = random(&mut rng, 37);
        let mut b = a.clone();
        axpy(&mut a, 0.3, &v);
        axpy_portable(&mut b, 0.3, &v);
        assert_eq!(a, b);
    }

    #[test]
    fn exp_shifted_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            let got = exp_shifted(x) as f64;
            worst = worst.max(((got - exact) / exact).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_shifted(0.0), 1.0);
        assert!(exp_shifted(-1000.0) > 0.0 && exp_shifted(-1000.0) < 1.2e-38);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_shifted_vector_twin_computes_the_same_bits() {
        if !has_avx2() {
            eprintln!("SKIPPED: exp_shifted_vector_twin_computes_the_same_bits: no AVX2");
            return;
        }
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn eight(x: &[f32; 8]) -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: features enabled; 8 values each way.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    exp_shifted_avx(_mm256_loadu_ps(x.as_ptr())),
                )
            };
            out
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20_000 {
            let x: [f32; 8] = std::array::from_fn(|_| -rng.random_range(0.0f32..100.0));
            // SAFETY: AVX2 checked above.
            let vector = unsafe { eight(&x) };
            for (v, x) in vector.iter().zip(&x) {
                assert_eq!(v.to_bits(), exp_shifted(*x).to_bits(), "x = {x}");
            }
        }
    }
}
