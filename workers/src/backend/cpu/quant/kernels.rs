//! The quantized dot-product kernels: one group of 8 output columns ([`super::layout`]) against
//! `R` quantized activation rows ([`super::act`]), all `k` inputs.
//!
//! One fixed arithmetic per output element, whatever kernel computes it: for each block `b` of
//! 32 inputs, the exact integer sum `isum = sum(w_code * x_code)` (over the whole block, or over
//! each half of 16 for [`Layout::BytesHalves`]), then in f32
//! - `acc = fma(w_scale * x_scale, isum, acc)`, and for [`Layout::Nibbles`]
//!   `acc = fma(w_min, x_scale * sum(x_codes), acc)`;
//! - for [`Layout::BytesHalves`], two accumulators (one per half) added at the end,
//!
//! in increasing `b`. Integer sums are exact in any order and a fused multiply-add is exactly
//! rounded, so the AVX2 kernels (with or without AVX-VNNI) and the portable one agree bitwise,
//! and a row's outputs do not depend on the rows that share its tile: the forward stays
//! batch-invariant.
//!
//! The AVX2 kernels multiply 32 codes at once (`maddubs` + `madd`, or one `vpdpbusd` with
//! AVX-VNNI: unsigned times signed bytes, so signed weight codes take their absolute value and
//! lend their sign to the activation), reduce the eight columns' partial sums with one tree of
//! horizontal adds into one vector (a lane per column) and accumulate eight columns with one
//! fused multiply-add. A tile of several rows unpacks each weight block once for all of them.

use super::act::{BLOCK, QuantRows};
use super::layout::{GROUP, Layout};

/// Rows a kernel call handles at most.
pub const MAX_ROWS: usize = 4;

/// Outputs of one kernel call: `[row][column of the group]`.
pub type Tile = [[f32; GROUP]; MAX_ROWS];

/// Which instructions the kernels use, chosen once at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if super::super::simd::has_avx2() {
                if is_x86_feature_detected!("avxvnni") {
                    return Isa::Avx2Vnni;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every kernel family this CPU can run (the tests compare them).
    pub fn available() -> Vec<Self> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if super::super::simd::has_avx2() {
                all.push(Isa::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    all.push(Isa::Avx2Vnni);
                }
            }
        }
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Vnni => "avx2+avx-vnni",
        }
    }
}

/// `tile[r][j] = dot(row r0 + r of x, column j of the group)` for `rows` rows (1..=4);
/// `group` is the group's blocks (`k / 32` of `layout.block_stride()` bytes).
pub fn group_dot(
    isa: Isa,
    layout: Layout,
    group: &[u8],
    x: &QuantRows,
    r0: usize,
    rows: usize,
    tile: &mut Tile,
) {
    let nb = x.blocks_per_row();
    assert!(
        (1..=MAX_ROWS).contains(&rows) && r0 + rows <= x.rows,
        "group_dot: rows {r0}+{rows} of {}",
        x.rows
    );
    assert_eq!(
        group.len(),
        nb * layout.block_stride(),
        "group_dot: the group is not k / 32 blocks"
    );
    match isa {
        Isa::Portable => portable(layout, group, x, r0, rows, tile),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => {
            let vnni = isa == Isa::Avx2Vnni;
            macro_rules! go {
                ($l:expr, $r:literal) => {
                    // SAFETY: the ISA was detected; `group` holds nb blocks and x rows r0..r0+R.
                    unsafe {
                        if vnni {
                            avx2::group_vnni::<$l, $r>(group.as_ptr(), nb, x, r0, tile)
                        } else {
                            avx2::group_avx2::<$l, $r>(group.as_ptr(), nb, x, r0, tile)
                        }
                    }
                };
            }
            macro_rules! rows {
                ($l:expr) => {
                    match rows {
                        1 => go!($l, 1),
                        2 => go!($l, 2),
                        3 => go!($l, 3),
                        _ => go!($l, 4),
                    }
                };
            }
            match layout {
                Layout::Nibbles => rows!(NIBBLES),
                Layout::Bytes => rows!(BYTES),
                Layout::BytesHalves => rows!(HALVES),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
const NIBBLES: u8 = 0;
#[cfg(target_arch = "x86_64")]
const BYTES: u8 = 1;
#[cfg(target_arch = "x86_64")]
const HALVES: u8 = 2;

/// The portable twin: the same arithmetic, one column and row at a time.
fn portable(layout: Layout, group: &[u8], x: &QuantRows, r0: usize, rows: usize, tile: &mut Tile) {
    let stride = layout.block_stride();
    for (r, out) in tile.iter_mut().enumerate().take(rows) {
        let codes = x.row_codes(r0 + r);
        let scales = x.row_scales(r0 + r);
        let sums = x.row_sums(r0 + r);
        for (j, out) in out.iter_mut().enumerate() {
            let (mut acc, mut acc_hi) = (0f32, 0f32);
            for (b, block) in group.chunks_exact(stride).enumerate() {
                let w = super::layout::get(layout, block, j);
                let xc = &codes[b * BLOCK..(b + 1) * BLOCK];
                let dot = |range: std::ops::Range<usize>| -> i32 {
                    range
                        .map(|i| i32::from(w.codes[i]) * i32::from(xc[i]))
                        .sum()
                };
                let dx = scales[b];
                match layout {
                    Layout::Nibbles => {
                        acc = (w.scale * dx).mul_add(dot(0..BLOCK) as f32, acc);
                        acc = w.second.mul_add(sums[b], acc);
                    }
                    Layout::Bytes => acc = (w.scale * dx).mul_add(dot(0..BLOCK) as f32, acc),
                    Layout::BytesHalves => {
                        acc = (w.scale * dx).mul_add(dot(0..BLOCK / 2) as f32, acc);
                        acc_hi = (w.second * dx).mul_add(dot(BLOCK / 2..BLOCK) as f32, acc_hi);
                    }
                }
            }
            *out = if layout == Layout::BytesHalves {
                acc + acc_hi
            } else {
                acc
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BYTES, HALVES, NIBBLES, Tile};
    use crate::backend::cpu::quant::act::{BLOCK, QuantRows};
    use crate::backend::cpu::quant::layout::Layout;

    const fn layout_of(l: u8) -> Layout {
        match l {
            NIBBLES => Layout::Nibbles,
            BYTES => Layout::Bytes,
            _ => Layout::BytesHalves,
        }
    }

    /// Sums each column's eight partial vectors: returns (values 0..16, values 16..32) of the
    /// eight columns, a lane per column.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce(p: &[__m256i; 8]) -> (__m256i, __m256i) {
        let h01 = _mm256_hadd_epi32(p[0], p[1]);
        let h23 = _mm256_hadd_epi32(p[2], p[3]);
        let h45 = _mm256_hadd_epi32(p[4], p[5]);
        let h67 = _mm256_hadd_epi32(p[6], p[7]);
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        (
            _mm256_permute2x128_si256::<0x20>(h0123, h4567),
            _mm256_permute2x128_si256::<0x31>(h0123, h4567),
        )
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $dot:ident) => {
            /// # Safety
            /// `w` holds `nb` blocks of the layout; `x` has rows `r0..r0 + R`; the CPU has the
            /// function's features.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const L: u8, const R: usize>(
                w: *const u8,
                nb: usize,
                x: &QuantRows,
                r0: usize,
                tile: &mut Tile,
            ) {
                let layout = layout_of(L);
                let stride = layout.block_stride();
                let codes_bytes = layout.codes_bytes();
                let low = _mm_set1_epi8(0x0f);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut acc_hi = [_mm256_setzero_ps(); R];
                let xc: [*const i8; R] = std::array::from_fn(|r| x.row_codes(r0 + r).as_ptr());
                let xs: [&[f32]; R] = std::array::from_fn(|r| x.row_scales(r0 + r));
                let xsum: [&[f32]; R] = std::array::from_fn(|r| x.row_sums(r0 + r));
                for b in 0..nb {
                    // SAFETY: block b of nb.
                    let blk = unsafe { w.add(b * stride) };
                    // Unsigned operands (nibbles, or |code|) and the codes' signs.
                    let mut a = [_mm256_setzero_si256(); 8];
                    let mut sign = [_mm256_setzero_si256(); 8];
                    for j in 0..8 {
                        if L == NIBBLES {
                            // SAFETY: 16 bytes of column j's codes.
                            let v = unsafe { _mm_loadu_si128(blk.add(16 * j).cast()) };
                            let lo = _mm_and_si128(v, low);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
                            a[j] = _mm256_set_m128i(hi, lo);
                        } else {
                            // SAFETY: 32 bytes of column j's codes.
                            let v = unsafe { _mm256_loadu_si256(blk.add(32 * j).cast()) };
                            sign[j] = v;
                            a[j] = _mm256_sign_epi8(v, v);
                        }
                    }
                    // SAFETY: the scales (and the second run) follow the codes.
                    let (s, second) = unsafe {
                        let s = _mm256_loadu_ps(blk.add(codes_bytes).cast());
                        let second = if L == BYTES {
                            _mm256_setzero_ps()
                        } else {
                            _mm256_loadu_ps(blk.add(codes_bytes + 32).cast())
                        };
                        (s, second)
                    };
                    for r in 0..R {
                        // SAFETY: block b of row r's codes.
                        let xv = unsafe { _mm256_loadu_si256(xc[r].add(b * BLOCK).cast()) };
                        let mut p = [_mm256_setzero_si256(); 8];
                        for j in 0..8 {
                            let xj = if L == NIBBLES {
                                xv
                            } else {
                                _mm256_sign_epi8(xv, sign[j])
                            };
                            p[j] = $dot(a[j], xj);
                        }
                        let (lo, hi) = reduce(&p);
                        let dx = _mm256_set1_ps(xs[r][b]);
                        if L == HALVES {
                            acc[r] = _mm256_fmadd_ps(
                                _mm256_mul_ps(s, dx),
                                _mm256_cvtepi32_ps(lo),
                                acc[r],
                            );
                            acc_hi[r] = _mm256_fmadd_ps(
                                _mm256_mul_ps(second, dx),
                                _mm256_cvtepi32_ps(hi),
                                acc_hi[r],
                            );
                        } else {
                            let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
                            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, dx), isum, acc[r]);
                            if L == NIBBLES {
                                acc[r] =
                                    _mm256_fmadd_ps(second, _mm256_set1_ps(xsum[r][b]), acc[r]);
                            }
                        }
                    }
                }
                for r in 0..R {
                    let v = if L == HALVES {
                        _mm256_add_ps(acc[r], acc_hi[r])
                    } else {
                        acc[r]
                    };
                    // SAFETY: 8 floats in tile[r].
                    unsafe { _mm256_storeu_ps(tile[r].as_mut_ptr(), v) };
                }
            }
        };
    }

    /// 32 unsigned-by-signed byte products summed in fours: `maddubs` (pairs into i16, which
    /// never saturates here: at most 2 * 128 * 127 for |code| <= 128, activations |q| <= 127)
    /// then `madd` by ones.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    /// The same sums with one AVX-VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn dot_vnni(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    }

    kernel!(group_avx2, "avx2,fma", dot_avx2);
    kernel!(group_vnni, "avx2,fma,avxvnni", dot_vnni);
}
