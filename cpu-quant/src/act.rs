//! Activation rows quantized to 8 bits in blocks of 32, the other operand of the quantized
//! dot products ([`super::kernels`]).
//!
//! Each block of 32 values of a row gets its own scale `d = max|x| / 127`, codes
//! `q = round_ties_even(x * (1 / d))` in `-127..=127` (never -128, so the kernels may negate
//! a code), and `s = d * sum(q)` (what a weight type with a per-block minimum adds). A row's
//! blocks depend on that row alone, so quantizing activations keeps the forward
//! batch-invariant; the AVX2 and AVX-512 twins compute the same codes bitwise (the same f32
//! operations, and a maximum is exact in any order). With AVX-512 a row's codes, its
//! residual's and their offset forms are written in one pass from registers: the portable
//! passes took a tenth of a prefill's time.

use rayon::prelude::*;

/// Values per activation block (the block size of every weight layout).
pub const BLOCK: usize = 32;

/// `rows` rows of `k` values (`k` a multiple of [`BLOCK`]) as 8-bit blocks.
#[derive(Debug, Clone, Default)]
pub struct QuantRows {
    pub rows: usize,
    pub k: usize,
    /// `[rows][k]` codes.
    pub codes: Vec<i8>,
    /// `[rows][k]` codes plus 128 (as unsigned bytes): the unsigned operand of products with
    /// signed weight codes where the instruction set has no byte sign (AVX-512). Empty where
    /// the rows were quantized for unsigned weight codes only ([`QuantRows::quantize_as`]).
    pub offset_codes: Vec<u8>,
    /// `[rows][k / 32]` block scales.
    pub scales: Vec<f32>,
    /// `[rows][k / 32]`: each block's scale times the sum of its codes.
    pub sums: Vec<f32>,
}

/// How many 8-bit codes each activation value gets in the quantized products.
///
/// One code (llama.cpp's scheme) rounds each value to 1/254 of its block's largest: a
/// relative L2 of about 1e-2 per projection, which compounds over layers enough to flip near
/// ties of a small model's logits (SmolLM2-135M answers the README's question in French with
/// it, in English in f32). Two codes, the value's and its rounding residual's, leave about
/// 1/64,000 of the block's largest: the f32 model's answers, for twice the integer products on
/// the same weight bytes (decode reads weights and is little slower; prefill computes and is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationCodes {
    /// One 8-bit code a value.
    Single,
    /// Two 8-bit codes a value ([`QuantRows::quantize_with_residual`]).
    #[default]
    WithResidual,
}

impl ActivationCodes {
    /// The bits an activation keeps, as the options name them (8 or 16).
    pub fn bits(self) -> u32 {
        match self {
            ActivationCodes::Single => 8,
            ActivationCodes::WithResidual => 16,
        }
    }

    /// [`Self::bits`]'s inverse.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            8 => Some(ActivationCodes::Single),
            16 => Some(ActivationCodes::WithResidual),
            _ => None,
        }
    }
}

/// Parses [`ActivationCodes::bits`] (`8` or `16`), as the binaries' flags take it.
impl std::str::FromStr for ActivationCodes {
    type Err = String;

    fn from_str(bits: &str) -> Result<Self, String> {
        bits.parse()
            .ok()
            .and_then(Self::from_bits)
            .ok_or_else(|| format!("{bits:?}: 8 or 16 bits"))
    }
}

impl std::fmt::Display for ActivationCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bits())
    }
}

/// Rows per rayon task when quantizing a batch.
const ROWS_PER_TASK: usize = 16;

impl QuantRows {
    /// Quantizes `x` (`[rows, k]`) on the current rayon pool.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        Self::build(x, rows, k, 1, true)
    }

    /// `x` (`[rows, k]`) as `2 * rows` rows: row `2r` quantizes row `r` of `x`, row `2r + 1`
    /// what that rounding left (`x - code * scale` per value, rounded again the same way).
    /// A product against both rows, summed, carries about 15 bits of each activation instead
    /// of 8, for twice the integer work on the same weight bytes ([`ActivationCodes`]).
    pub fn quantize_with_residual(x: &[f32], rows: usize, k: usize) -> Self {
        Self::build(x, rows, k, 2, true)
    }

    /// [`Self::quantize`] (`codes` single) or [`Self::quantize_with_residual`], with
    /// [`Self::offset_codes`] only where `offset_codes`: products with unsigned weight codes
    /// never read them.
    pub fn quantize_as(
        codes: ActivationCodes,
        x: &[f32],
        rows: usize,
        k: usize,
        offset_codes: bool,
    ) -> Self {
        let codes_per_row = match codes {
            ActivationCodes::Single => 1,
            ActivationCodes::WithResidual => 2,
        };
        Self::build(x, rows, k, codes_per_row, offset_codes)
    }

    /// `codes_per_row` (1 or 2) rows of codes for each row of `x`, every array written in one
    /// pass over the rows, in tasks of [`ROWS_PER_TASK`] rows.
    fn build(x: &[f32], rows: usize, k: usize, codes_per_row: usize, offset_codes: bool) -> Self {
        assert!(
            k.is_multiple_of(BLOCK),
            "quantize: k={k} is not whole blocks"
        );
        assert_eq!(x.len(), rows * k, "quantize: x is not [rows, k]");
        let nb = k / BLOCK;
        let out_rows = rows * codes_per_row;
        let mut q = QuantRows {
            rows: out_rows,
            k,
            codes: vec![0; out_rows * k],
            offset_codes: if offset_codes {
                vec![0; out_rows * k]
            } else {
                Vec::new()
            },
            scales: vec![0.0; out_rows * nb],
            sums: vec![0.0; out_rows * nb],
        };
        if rows == 0 || k == 0 {
            return q;
        }
        let task = |x: &[f32],
                    codes: &mut [i8],
                    offset: &mut [u8],
                    scales: &mut [f32],
                    sums: &mut [f32]| {
            quantize_task(x, k, codes_per_row, codes, offset, scales, sums)
        };
        if rows <= ROWS_PER_TASK {
            task(
                x,
                &mut q.codes,
                &mut q.offset_codes,
                &mut q.scales,
                &mut q.sums,
            );
        } else {
            let (codes_chunk, blocks_chunk) = (
                ROWS_PER_TASK * codes_per_row * k,
                ROWS_PER_TASK * codes_per_row * nb,
            );
            let rows = x
                .par_chunks(ROWS_PER_TASK * k)
                .zip(q.codes.par_chunks_mut(codes_chunk));
            let blocks = q
                .scales
                .par_chunks_mut(blocks_chunk)
                .zip(q.sums.par_chunks_mut(blocks_chunk));
            if offset_codes {
                rows.zip(q.offset_codes.par_chunks_mut(codes_chunk))
                    .zip(blocks)
                    .for_each(|(((x, codes), offset), (scales, sums))| {
                        task(x, codes, offset, scales, sums)
                    });
            } else {
                rows.zip(blocks)
                    .for_each(|((x, codes), (scales, sums))| task(x, codes, &mut [], scales, sums));
            }
        }
        q
    }

    pub fn blocks_per_row(&self) -> usize {
        self.k / BLOCK
    }

    pub fn row_codes(&self, r: usize) -> &[i8] {
        &self.codes[r * self.k..(r + 1) * self.k]
    }

    pub fn row_offset_codes(&self, r: usize) -> &[u8] {
        &self.offset_codes[r * self.k..(r + 1) * self.k]
    }

    pub fn row_scales(&self, r: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.scales[r * nb..(r + 1) * nb]
    }

    pub fn row_sums(&self, r: usize) -> &[f32] {
        let nb = self.blocks_per_row();
        &self.sums[r * nb..(r + 1) * nb]
    }
}

/// Rows of `x` (each `k` values) into `codes_per_row` rows of codes each: the row's own codes,
/// then (with 2) those of what their rounding left, `x - code * scale` per value; and every
/// code's offset form.
fn quantize_task(
    x: &[f32],
    k: usize,
    codes_per_row: usize,
    codes: &mut [i8],
    offset: &mut [u8],
    scales: &mut [f32],
    sums: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: features checked; the slices are whole rows of the arrays (the caller's
        // chunks).
        unsafe { quantize_task_avx512(x, k, codes_per_row, codes, offset, scales, sums) };
        return;
    }
    let nb = k / BLOCK;
    let mut residual = vec![0f32; if codes_per_row == 2 { k } else { 0 }];
    for (((x, codes), scales), sums) in x
        .chunks_exact(k)
        .zip(codes.chunks_exact_mut(codes_per_row * k))
        .zip(scales.chunks_exact_mut(codes_per_row * nb))
        .zip(sums.chunks_exact_mut(codes_per_row * nb))
    {
        let (high, low) = codes.split_at_mut(k);
        let (high_scales, low_scales) = scales.split_at_mut(nb);
        let (high_sums, low_sums) = sums.split_at_mut(nb);
        quantize_row(x, high, high_scales, high_sums);
        if codes_per_row == 2 {
            for (i, r) in residual.iter_mut().enumerate() {
                *r = x[i] - high[i] as f32 * high_scales[i / BLOCK];
            }
            quantize_row(&residual, low, low_scales, low_sums);
        }
    }
    for (u, &c) in offset.iter_mut().zip(codes.iter()) {
        *u = (c as u8) ^ 0x80;
    }
}

/// Whether [`quantize_task_avx512`] can run here (checked at run time, cached by std).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// [`quantize_task`] in one pass over each row with 512-bit registers: a block's codes, its
/// residual's and both offset forms come from the same registers, where the portable path
/// writes the codes, reads them back for the residual and rereads every code for the offset
/// form. The same operations on each value as [`quantize_block_portable`] and the residual's
/// `x - code * scale` (a product, then a difference: no fused multiply-add), so the same bits.
///
/// # Safety
/// The CPU has AVX-512F; `x` is whole rows of `k` values (`k` a multiple of [`BLOCK`]) and
/// the other slices hold `codes_per_row` rows of codes (or blocks) for each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_task_avx512(
    x: &[f32],
    k: usize,
    codes_per_row: usize,
    codes: &mut [i8],
    offset: &mut [u8],
    scales: &mut [f32],
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    let rows = x.len() / k;
    assert!(
        codes.len() == rows * codes_per_row * k
            && (offset.len() == codes.len() || offset.is_empty())
            && scales.len() == rows * codes_per_row * nb
            && sums.len() == scales.len(),
        "quantize: arrays do not hold {rows} rows of {codes_per_row} codes"
    );
    // Null where the offset codes are not wanted.
    let offset_base = offset.as_mut_ptr();
    let offset_at = |at: usize| {
        if offset.is_empty() {
            std::ptr::null_mut()
        } else {
            // SAFETY: `at` is inside the codes, which the offset codes match in length.
            unsafe { offset_base.add(at) }
        }
    };
    for r in 0..rows {
        let row_codes = r * codes_per_row * k;
        let row_blocks = r * codes_per_row * nb;
        for b in 0..nb {
            // SAFETY: value b * 32 + 31 of row r is inside `x`; the codes and blocks written
            // are inside the arrays (checked above).
            unsafe {
                let p = x.as_ptr().add(r * k + b * BLOCK);
                let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                let at = row_codes + b * BLOCK;
                let high = quantize_block_avx512(v, codes.as_mut_ptr().add(at), offset_at(at));
                scales[row_blocks + b] = high.scale;
                sums[row_blocks + b] = high.sum;
                if codes_per_row == 2 {
                    let d = _mm512_set1_ps(high.scale);
                    let residual = [
                        _mm512_sub_ps(v[0], _mm512_mul_ps(high.values[0], d)),
                        _mm512_sub_ps(v[1], _mm512_mul_ps(high.values[1], d)),
                    ];
                    let low = quantize_block_avx512(
                        residual,
                        codes.as_mut_ptr().add(at + k),
                        offset_at(at + k),
                    );
                    scales[row_blocks + nb + b] = low.scale;
                    sums[row_blocks + nb + b] = low.sum;
                }
            }
        }
    }
}

/// One block quantized in registers.
#[cfg(target_arch = "x86_64")]
struct Block512 {
    scale: f32,
    /// The scale times the sum of the codes.
    sum: f32,
    /// The codes as f32, for the residual.
    values: [std::arch::x86_64::__m512; 2],
}

/// [`quantize_block_portable`] of the 32 values in `v`, its codes stored at `codes` and their
/// offset forms at `offset` unless it is null.
///
/// # Safety
/// The CPU has AVX-512F; `codes` and a non-null `offset` are valid for 32 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn quantize_block_avx512(
    v: [std::arch::x86_64::__m512; 2],
    codes: *mut i8,
    offset: *mut u8,
) -> Block512 {
    use std::arch::x86_64::*;
    // A maximum is exact in any order.
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let q = [
        _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v[0], inv),
        ),
        _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v[1], inv),
        ),
    ];
    let total = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    let flip = _mm_set1_epi8(i8::MIN);
    for (half, q) in q.iter().enumerate() {
        // Codes are within -127..=127: the truncating narrow keeps them.
        let bytes = _mm512_cvtepi32_epi8(*q);
        // SAFETY: 32 bytes at `codes` and `offset` (the caller's contract).
        unsafe {
            _mm_storeu_si128(codes.add(16 * half).cast(), bytes);
            if !offset.is_null() {
                _mm_storeu_si128(offset.add(16 * half).cast(), _mm_xor_si128(bytes, flip));
            }
        }
    }
    Block512 {
        scale: d,
        sum: d * total as f32,
        values: [_mm512_cvtepi32_ps(q[0]), _mm512_cvtepi32_ps(q[1])],
    }
}

/// One row: `codes` `[k]`, `scales` and `sums` `[k / 32]`.
fn quantize_row(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        for (((x, codes), d), s) in x
            .chunks_exact(BLOCK)
            .zip(codes.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
            .zip(sums.iter_mut())
        {
            // SAFETY: features checked; each chunk holds 32 values.
            (*d, *s) = unsafe { quantize_block_avx2(x, codes) };
        }
        return;
    }
    for (((x, codes), d), s) in x
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
    {
        (*d, *s) = quantize_block_portable(x, codes);
    }
}

/// The block's scale and `scale * sum(codes)`.
pub(super) fn quantize_block_portable(x: &[f32], codes: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut sum = 0i32;
    for (c, &v) in codes.iter_mut().zip(x) {
        let q = (v * inv).round_ties_even() as i32;
        *c = q as i8;
        sum += q;
    }
    (d, d * sum as f32)
}

/// [`quantize_block_portable`] with AVX2: the same operations on 8 lanes.
///
/// # Safety
/// `x` and `codes` hold 32 values; the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], codes: &mut [i8]) -> (f32, f32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == BLOCK && codes.len() == BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: 32 values in x.
    let v: [__m256; 4] = unsafe {
        let p = x.as_ptr();
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    };
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for v in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
    let amax = _mm_cvtss_f32(m1);
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, v) in q.iter_mut().zip(v) {
        let scaled = _mm256_mul_ps(v, inv);
        *q = _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(scaled));
    }
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
    let total = _mm_cvtsi128_si32(s1);
    // Pack to bytes; packs interleave 128-bit lanes, so put them back in order.
    let w01 = _mm256_packs_epi32(q[0], q[1]);
    let w23 = _mm256_packs_epi32(q[2], q[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 bytes in codes.
    unsafe { _mm256_storeu_si256(codes.as_mut_ptr().cast(), b) };
    (d, d * total as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_and_sum() {
        let mut x = vec![0f32; 64];
        x[0] = 127.0;
        x[1] = -63.5; // a tie: to even, -64
        x[2] = 0.5; // a tie: to even, 0
        x[3] = 1.5; // 2
        let q = QuantRows::quantize(&x, 1, 64);
        assert_eq!(q.scales, [1.0, 0.0]);
        assert_eq!(&q.codes[..4], &[127, -64, 0, 2]);
        assert_eq!(q.sums[0], (127 - 64 + 2) as f32);
        assert_eq!(q.sums[1], 0.0);
        assert!(q.codes[32..].iter().all(|&c| c == 0));
    }

    /// [`QuantRows::build`]'s arrays computed block by block with the portable arithmetic.
    fn portable_rows(x: &[f32], rows: usize, k: usize, codes_per_row: usize) -> QuantRows {
        let nb = k / BLOCK;
        let mut q = QuantRows {
            rows: rows * codes_per_row,
            k,
            codes: vec![0; rows * codes_per_row * k],
            offset_codes: vec![0; rows * codes_per_row * k],
            scales: vec![0.0; rows * codes_per_row * nb],
            sums: vec![0.0; rows * codes_per_row * nb],
        };
        for r in 0..rows {
            for b in 0..nb {
                let values = &x[r * k + b * BLOCK..][..BLOCK];
                let mut block = values.to_vec();
                for c in 0..codes_per_row {
                    let at = (r * codes_per_row + c) * k + b * BLOCK;
                    let (d, s) = quantize_block_portable(&block, &mut q.codes[at..at + BLOCK]);
                    q.scales[(r * codes_per_row + c) * nb + b] = d;
                    q.sums[(r * codes_per_row + c) * nb + b] = s;
                    for (i, v) in block.iter_mut().enumerate() {
                        *v -= q.codes[at + i] as f32 * d;
                    }
                }
            }
        }
        for (u, &c) in q.offset_codes.iter_mut().zip(&q.codes) {
            *u = (c as u8) ^ 0x80;
        }
        q
    }

    #[test]
    fn every_path_quantizes_rows_to_the_portable_bits() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // More rows than one task holds, so the parallel split runs too.
        let (rows, k) = (ROWS_PER_TASK + 5, 4 * BLOCK);
        for scale in [1e-30f32, 1e-6, 0.3, 40.0, 3e4] {
            let mut x: Vec<f32> = (0..rows * k)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect();
            // A block of zeros, and one of exact ties after scaling (127 and halves).
            x[BLOCK..2 * BLOCK].fill(0.0);
            for (i, v) in x[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
                *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
            }
            let few = ROWS_PER_TASK - 3;
            let single = ActivationCodes::Single;
            let both = ActivationCodes::WithResidual;
            for (rows, codes_per_row, with_offsets, q) in [
                (rows, 1, true, QuantRows::quantize(&x, rows, k)),
                (
                    rows,
                    2,
                    true,
                    QuantRows::quantize_with_residual(&x, rows, k),
                ),
                (
                    rows,
                    1,
                    false,
                    QuantRows::quantize_as(single, &x, rows, k, false),
                ),
                (
                    rows,
                    2,
                    false,
                    QuantRows::quantize_as(both, &x, rows, k, false),
                ),
                // Fewer rows than a task: the serial path.
                (
                    few,
                    2,
                    false,
                    QuantRows::quantize_as(both, &x[..few * k], few, k, false),
                ),
            ] {
                let want = portable_rows(&x[..rows * k], rows, k, codes_per_row);
                assert_eq!(q.codes, want.codes, "scale {scale}, {codes_per_row} codes");
                if with_offsets {
                    assert_eq!(q.offset_codes, want.offset_codes, "scale {scale}");
                } else {
                    assert!(
                        q.offset_codes.is_empty(),
                        "scale {scale}: offsets not asked for"
                    );
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&q.scales), bits(&want.scales), "scale {scale}");
                assert_eq!(bits(&q.sums), bits(&want.sums), "scale {scale}");
            }
        }
    }

    #[test]
    fn simd_and_portable_agree_bitwise() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for scale in [1e-6f32, 0.3, 40.0] {
            let x: Vec<f32> = (0..BLOCK * 40)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect();
            let q = QuantRows::quantize(&x, 40, BLOCK);
            for (r, x) in x.chunks_exact(BLOCK).enumerate() {
                let mut codes = [0i8; BLOCK];
                let (d, s) = quantize_block_portable(x, &mut codes);
                assert_eq!(q.row_codes(r), codes);
                assert_eq!(q.scales[r].to_bits(), d.to_bits());
                assert_eq!(q.sums[r].to_bits(), s.to_bits());
                assert!(codes.iter().all(|&c| c != i8::MIN));
            }
        }
    }
}
