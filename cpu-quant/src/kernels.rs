//! The quantized dot-product kernels: one group of 8 output columns ([`super::layout`]) against
//! `R` quantized activation rows ([`super::act`]), all `k` inputs.
//!
//! One fixed arithmetic per output element, whatever kernel computes it: for each block `b` of
//! 32 inputs, the exact integer sum `isum = sum(w_code * x_code)` (over the whole block, or over
//! each half of 16 for [`Layout::BytesHalves`]), then in f32
//! - `acc = fma(w_scale * x_scale, isum, acc)`, and for [`Layout::Nibbles`] and
//!   [`Layout::BytesMin`] `acc = fma(w_min, x_scale * sum(x_codes), acc)`;
//! - for [`Layout::BytesHalves`], two accumulators (one per half) added at the end,
//!
//! in increasing `b`. Integer sums are exact in any order and a fused multiply-add is exactly
//! rounded, so the AVX2 kernels (with or without AVX-VNNI) and the portable one agree bitwise,
//! and a row's outputs do not depend on the rows that share its tile: the forward stays
//! batch-invariant.
//!
//! The AVX2 kernels multiply a 32-byte run of weight codes (four inputs of each of 8 columns,
//! [`super::layout`]) by four activation codes broadcast to every lane (`maddubs` + `madd`, or
//! one `vpdpbusd` with AVX-VNNI: unsigned times signed bytes, so signed weight codes take their
//! absolute value and lend their sign to the activation), so each column's sum stays in its
//! own lane, and accumulate eight columns with one fused multiply-add per block. A tile of
//! several rows loads (and unpacks) each weight block once for all of them. IQ4's indices
//! ([`Layout::Indices`]) are unpacked as nibbles and turned into their signed values by one
//! byte shuffle (`pshufb` within each 128-bit lane), then taken as signed codes. The NEON
//! kernels (aarch64) do the same on 128-bit registers, four columns a register.

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
    /// AVX-512 VNNI on two groups (16 columns) at once; a lone group takes the 256-bit kernel
    /// of AVX-VNNI, on AVX-512 VNNI's encoding of its instruction.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// [`Isa::Avx512Vnni`], with AMX tiles for every 16 rows of a product
    /// ([`crate::amx`]).
    #[cfg(target_arch = "x86_64")]
    Avx512Amx,
    /// NEON (every aarch64 CPU): widening byte products, summed in pairs.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// NEON with the dot-product extension (`sdot`: four byte products summed a lane).
    #[cfg(target_arch = "aarch64")]
    NeonDotprod,
}

/// AVX-512 VNNI with the 256-bit forms of its instructions (`avx512vl`): the paired kernel, and
/// the one-group kernel's `vpdpbusd` on 256-bit registers in its EVEX encoding, which CPUs
/// without AVX-VNNI's VEX encoding run too (AMD Zen 4, Intel Ice Lake and Cascade Lake).
#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::has_avx2() {
                if has_avx512_vnni() {
                    if crate::amx::available() {
                        return Isa::Avx512Amx;
                    }
                    return Isa::Avx512Vnni;
                }
                if is_x86_feature_detected!("avxvnni") {
                    return Isa::Avx2Vnni;
                }
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                return Isa::NeonDotprod;
            }
            return Isa::Neon;
        }
        #[allow(unreachable_code)]
        Isa::Portable
    }

    /// Every kernel family this CPU can run (the tests compare them).
    pub fn available() -> Vec<Self> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::has_avx2() {
                all.push(Isa::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    all.push(Isa::Avx2Vnni);
                }
                if has_avx512_vnni() {
                    all.push(Isa::Avx512Vnni);
                    if crate::amx::available() {
                        all.push(Isa::Avx512Amx);
                    }
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            all.push(Isa::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                all.push(Isa::NeonDotprod);
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
            Isa::Avx2Vnni => "avx2-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Amx => "avx512-amx",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => "neon-dotprod",
        }
    }

    /// Whether [`group_pair_dot`] runs two groups in one pass (else the caller takes them one
    /// at a time).
    pub fn pairs_groups(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self, Isa::Avx512Vnni | Isa::Avx512Amx)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// How many blocks ahead of the one it multiplies an x86 kernel asks for its group's weights
/// when reading ahead (the caller's `read_ahead`, for a group's first pass over the rows). At
/// decode every weight streams from memory once, a group at a time, in runs of 5-14 KB (18 to
/// 48 blocks): too short for the hardware prefetcher to ramp up on before the next group
/// starts, so the kernels waited on their loads (`perf`: the hottest instructions were the
/// blocks' first loads). Six blocks (1.2 KB of Q4_1, 1.7 KB of Q8_0 a group) ahead measured
/// +13-15% decode on an Intel Xeon; 2, 4, 8, 9 and 12 less. (No NEON kernel reads ahead: Rust
/// has no stable Arm prefetch, and nobody has measured one.)
#[cfg(target_arch = "x86_64")]
const READ_AHEAD_BLOCKS: usize = 6;

/// Asks for the cache lines of `len` bytes from `at` (a hint: nothing is read, and an address
/// past the weights' end, as the last blocks' look-ahead may be, is ignored).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn x86_read_ahead(at: *const u8, len: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let mut off = 0;
    while off < len {
        // SAFETY: a prefetch reads no memory the program can observe and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off).cast()) };
        off += 64;
    }
}

/// Outputs of one paired kernel call: `[row][column of the two groups]`.
pub type PairTile = [[f32; 2 * GROUP]; MAX_ROWS];

/// One block's sign corrections in the paired kernel (`128 * sum(codes)` of each of the 16
/// columns' two halves, as i32 lanes: `[half][column]`), which depend on the weights alone.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub struct SignCorrection(pub [[i32; 2 * GROUP]; 2]);

/// Where a paired call's sign corrections come from (signed codes only: layouts with
/// unsigned codes have none). Computing them takes a quarter of the byte products of a
/// four-row call, so calls after the first over the same two groups (the row tiles of a
/// prefill) read what the first kept.
pub enum Corrections<'a> {
    /// Computed and used (the one call over these groups, as at decode).
    Inline,
    /// Computed, used, and stored by block for the calls after.
    Keep(&'a mut [SignCorrection]),
    /// Read as a first call over the same groups kept them.
    Reuse(&'a [SignCorrection]),
}

/// What a paired call knows of the other calls over the same two groups.
pub struct PairPass<'a> {
    /// Ask for the weights ahead of the loads ([`group_dot`]'s `read_ahead`).
    pub read_ahead: bool,
    pub corrections: Corrections<'a>,
}

/// [`group_dot`] of two groups at once (16 columns: the first group's, then the second's),
/// for an `isa` that [`Isa::pairs_groups`].
pub fn group_pair_dot(
    isa: Isa,
    layout: Layout,
    [first, second]: [&[u8]; 2],
    x: &QuantRows,
    rows: std::ops::Range<usize>,
    tile: &mut PairTile,
    pass: &mut PairPass,
) {
    let (r0, rows) = (rows.start, rows.len());
    let nb = x.blocks_per_row();
    assert!(
        match &pass.corrections {
            Corrections::Inline => true,
            Corrections::Keep(kept) => kept.len() == nb,
            Corrections::Reuse(kept) => kept.len() == nb,
        },
        "group_pair_dot: kept corrections are not one a block"
    );
    assert!(
        isa.pairs_groups(),
        "group_pair_dot: {} has no paired kernel",
        isa.name()
    );
    assert!(
        (1..=MAX_ROWS).contains(&rows) && r0 + rows <= x.rows,
        "group_pair_dot: rows {r0}+{rows} of {}",
        x.rows
    );
    assert!(
        first.len() == nb * layout.block_stride() && second.len() == first.len(),
        "group_pair_dot: the groups are not k / 32 blocks"
    );
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! go {
            ($l:expr, $r:literal) => {
                // SAFETY: the ISA was detected; each group holds nb blocks; x rows r0..r0+R.
                unsafe {
                    avx512::pair_vnni::<$l, $r>(
                        first.as_ptr(),
                        second.as_ptr(),
                        nb,
                        x,
                        r0,
                        tile,
                        pass,
                    )
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
            Layout::BytesMin => rows!(BYTES_MIN),
            Layout::Indices => rows!(INDICES),
        }
    }
    // No paired kernel elsewhere: the assertion above has refused every ISA.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, second, r0, tile, pass);
}

/// `tile[r][j] = dot(row rows.start + r of x, column j of the group)` for 1 to 4 `rows`;
/// `group` is the group's blocks (`k / 32` of `layout.block_stride()` bytes). With
/// `read_ahead` (a group's first pass over the rows, when its weights come from memory) the
/// x86 kernels ask for the blocks six ahead of the ones they multiply.
pub fn group_dot(
    isa: Isa,
    layout: Layout,
    group: &[u8],
    x: &QuantRows,
    rows: std::ops::Range<usize>,
    tile: &mut Tile,
    read_ahead: bool,
) {
    let (r0, rows) = (rows.start, rows.len());
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
    // Only the x86 kernels read ahead.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = read_ahead;
    match isa {
        Isa::Portable => portable(layout, group, x, r0, rows, tile),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512Vnni | Isa::Avx512Amx => {
            macro_rules! go {
                ($l:expr, $r:literal) => {
                    // SAFETY: the ISA was detected; `group` holds nb blocks and x rows r0..r0+R.
                    unsafe {
                        match isa {
                            Isa::Avx2Vnni => avx2::group_vnni::<$l, $r>(
                                group.as_ptr(),
                                nb,
                                x,
                                r0,
                                tile,
                                read_ahead,
                            ),
                            Isa::Avx512Vnni | Isa::Avx512Amx => avx2::group_vnni_evex::<$l, $r>(
                                group.as_ptr(),
                                nb,
                                x,
                                r0,
                                tile,
                                read_ahead,
                            ),
                            _ => avx2::group_avx2::<$l, $r>(
                                group.as_ptr(),
                                nb,
                                x,
                                r0,
                                tile,
                                read_ahead,
                            ),
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
                Layout::BytesMin => rows!(BYTES_MIN),
                Layout::Indices => rows!(INDICES),
            }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDotprod => {
            let dotprod = isa == Isa::NeonDotprod;
            macro_rules! go {
                ($l:expr, $r:literal) => {
                    // SAFETY: the ISA was detected; `group` holds nb blocks and x rows r0..r0+R.
                    unsafe {
                        if dotprod {
                            neon::group_dotprod::<$l, $r>(group.as_ptr(), nb, x, r0, tile)
                        } else {
                            neon::group_neon::<$l, $r>(group.as_ptr(), nb, x, r0, tile)
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
                Layout::BytesMin => rows!(BYTES_MIN),
                Layout::Indices => rows!(INDICES),
            }
        }
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NIBBLES: u8 = 0;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BYTES: u8 = 1;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const HALVES: u8 = 2;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BYTES_MIN: u8 = 3;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const INDICES: u8 = 4;

/// Whether layout `l`'s codes are packed in nibbles (4-bit codes, or indices).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn nibbles(l: u8) -> bool {
    l == NIBBLES || l == INDICES
}

/// Whether layout `l`'s blocks have a scale and no second run of f32s.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn scale_only(l: u8) -> bool {
    l == BYTES || l == INDICES
}

/// Whether layout `l`'s codes are unsigned (the weight is `vpdpbusd`'s unsigned operand as it
/// is) and its blocks have a minimum (`fma(w_min, x_scale * sum(x_codes), acc)`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn unsigned_with_min(l: u8) -> bool {
    !layout_of(l).signed_codes()
}

/// Rows `r0..r0 + R` of `x`: their codes, block scales and block sums. A loop the kernel
/// inlines: `std::array::from_fn` with closures was a call of its own in each kernel call (its
/// closures carry the kernel's target features, which `from_fn` has not), about a tenth of a
/// Q8_0 prefill's samples on an AVX-512 VNNI CPU, whose kernel calls are short (18 blocks of
/// 32 inputs at SmolLM2's 576).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn rows_of<const R: usize>(x: &QuantRows, r0: usize) -> ([*const i8; R], [&[f32]; R], [&[f32]; R]) {
    let mut codes = [std::ptr::null::<i8>(); R];
    let mut scales: [&[f32]; R] = [&[]; R];
    let mut sums: [&[f32]; R] = [&[]; R];
    for r in 0..R {
        codes[r] = x.row_codes(r0 + r).as_ptr();
        scales[r] = x.row_scales(r0 + r);
        sums[r] = x.row_sums(r0 + r);
    }
    (codes, scales, sums)
}

/// Layout `l` of the kernels' const parameter.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn layout_of(l: u8) -> Layout {
    match l {
        NIBBLES => Layout::Nibbles,
        BYTES => Layout::Bytes,
        BYTES_MIN => Layout::BytesMin,
        INDICES => Layout::Indices,
        _ => Layout::BytesHalves,
    }
}

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
                    Layout::Nibbles | Layout::BytesMin => {
                        acc = (w.scale * dx).mul_add(dot(0..BLOCK) as f32, acc);
                        acc = w.second.mul_add(sums[b], acc);
                    }
                    Layout::Bytes | Layout::Indices => {
                        acc = (w.scale * dx).mul_add(dot(0..BLOCK) as f32, acc)
                    }
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

/// The NEON kernels: the AVX2 kernels' scheme on 128-bit registers, a group's 8 columns in two
/// halves of 4. A 16-byte half of a run holds four inputs of each of 4 columns; four activation
/// codes repeated in every 32-bit lane multiply it so that each column's four products are
/// summed in its own lane: `sdot` with the dot-product extension, else widening products
/// (`smull`) summed in pairs (`addp`, at most 2 * 128 * 127: no i16 overflow) and pairs again
/// into the i32 lanes (`sadalp`). Codes are multiplied as signed bytes (unsigned ones are at
/// most 31), so no sign juggling is needed. The f32 steps are the portable kernel's, in the
/// same order, so every kernel gives the same bits.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{HALVES, INDICES, Tile, layout_of, nibbles, scale_only, unsigned_with_min};
    use crate::act::{BLOCK, QuantRows};
    use crate::layout::IQ4_VALUES;

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
                let low = vdupq_n_u8(0x0f);
                // SAFETY: 16 bytes.
                let table = unsafe { vld1q_s8(IQ4_VALUES.as_ptr()) };
                let zero = vdupq_n_f32(0.0);
                let mut acc = [[zero; 2]; R];
                let mut acc_hi = [[zero; 2]; R];
                let (xc, xs, xsum) = super::rows_of::<R>(x, r0);
                for b in 0..nb {
                    // SAFETY: block b of nb.
                    let blk = unsafe { w.add(b * stride) };
                    // runs[i][h]: inputs 4i..4i+3 of columns 4h..4h+3 (nibbles: values 0..16
                    // in the low nibbles of the first 4 packed runs, 16..32 in the high).
                    let mut runs = [[vdupq_n_s8(0); 2]; 8];
                    for (i, run) in runs.iter_mut().enumerate() {
                        for (h, half) in run.iter_mut().enumerate() {
                            *half = if nibbles(L) {
                                // SAFETY: half h of packed run i % 4.
                                let v = unsafe { vld1q_u8(blk.add(32 * (i % 4) + 16 * h)) };
                                let n = if i < 4 {
                                    vandq_u8(v, low)
                                } else {
                                    vshrq_n_u8::<4>(v)
                                };
                                if L == INDICES {
                                    vqtbl1q_s8(table, n)
                                } else {
                                    vreinterpretq_s8_u8(n)
                                }
                            } else {
                                // SAFETY: half h of run i of 8.
                                unsafe { vld1q_s8(blk.add(32 * i + 16 * h).cast()) }
                            };
                        }
                    }
                    // SAFETY: the scales (and the second run of them) follow the codes.
                    let (s, second) = unsafe {
                        let at = |o: usize| vld1q_f32(blk.add(codes_bytes + o).cast());
                        let s = [at(0), at(16)];
                        let second = if scale_only(L) {
                            [zero; 2]
                        } else {
                            [at(32), at(48)]
                        };
                        (s, second)
                    };
                    for r in 0..R {
                        // SAFETY: block b of row r's codes: 8 runs of 4 bytes.
                        let xb = unsafe { xc[r].add(b * BLOCK) };
                        let mut lo = [vdupq_n_s32(0); 2];
                        let mut hi = [vdupq_n_s32(0); 2];
                        for (i, run) in runs.iter().enumerate() {
                            // SAFETY: 4 bytes of the block's 32.
                            let quad = unsafe { (xb.add(4 * i) as *const i32).read_unaligned() };
                            let xv = vreinterpretq_s8_s32(vdupq_n_s32(quad));
                            for h in 0..2 {
                                if i < 4 {
                                    lo[h] = $dot(lo[h], run[h], xv);
                                } else {
                                    hi[h] = $dot(hi[h], run[h], xv);
                                }
                            }
                        }
                        let dx = vdupq_n_f32(xs[r][b]);
                        for h in 0..2 {
                            if L == HALVES {
                                acc[r][h] =
                                    vfmaq_f32(acc[r][h], vmulq_f32(s[h], dx), vcvtq_f32_s32(lo[h]));
                                acc_hi[r][h] = vfmaq_f32(
                                    acc_hi[r][h],
                                    vmulq_f32(second[h], dx),
                                    vcvtq_f32_s32(hi[h]),
                                );
                            } else {
                                let isum = vcvtq_f32_s32(vaddq_s32(lo[h], hi[h]));
                                acc[r][h] = vfmaq_f32(acc[r][h], vmulq_f32(s[h], dx), isum);
                                if unsigned_with_min(L) {
                                    acc[r][h] =
                                        vfmaq_f32(acc[r][h], second[h], vdupq_n_f32(xsum[r][b]));
                                }
                            }
                        }
                    }
                }
                for r in 0..R {
                    for h in 0..2 {
                        let v = if L == HALVES {
                            vaddq_f32(acc[r][h], acc_hi[r][h])
                        } else {
                            acc[r][h]
                        };
                        // SAFETY: 4 floats of tile[r]'s 8.
                        unsafe { vst1q_f32(tile[r].as_mut_ptr().add(4 * h), v) };
                    }
                }
            }
        };
    }

    /// `acc` plus each lane's four byte products: widening products summed in pairs twice.
    #[inline]
    #[target_feature(enable = "neon")]
    fn dot_neon(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let first = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let second = vmull_high_s8(a, b);
        vpadalq_s16(acc, vpaddq_s16(first, second))
    }

    /// The same with one `sdot` (its intrinsic is not stable Rust yet).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn dot_sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction of the enabled extension.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    kernel!(group_neon, "neon", dot_neon);
    kernel!(group_dotprod, "neon,dotprod", dot_sdot);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{
        HALVES, INDICES, READ_AHEAD_BLOCKS, Tile, layout_of, nibbles, scale_only, unsigned_with_min,
    };
    use crate::act::{BLOCK, QuantRows};
    use crate::layout::IQ4_VALUES;

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
                read_ahead: bool,
            ) {
                let layout = layout_of(L);
                let stride = layout.block_stride();
                let codes_bytes = layout.codes_bytes();
                let low = _mm256_set1_epi8(0x0f);
                // IQ4's 16 values in each 128-bit lane, for the byte shuffle of indices.
                let table = _mm256_broadcastsi128_si256(unsafe {
                    // SAFETY: 16 bytes.
                    _mm_loadu_si128(IQ4_VALUES.as_ptr().cast())
                });
                let mut acc = [_mm256_setzero_ps(); R];
                let mut acc_hi = [_mm256_setzero_ps(); R];
                let (xc, xs, xsum) = super::rows_of::<R>(x, r0);
                for b in 0..nb {
                    // SAFETY: block b of nb.
                    let blk = unsafe { w.add(b * stride) };
                    if read_ahead {
                        super::x86_read_ahead(blk.wrapping_add(READ_AHEAD_BLOCKS * stride), stride);
                    }
                    // Runs of codes: nibbles unpacked into values 0..16 (`lo`) and 16..32
                    // (`hi`) of each run; bytes as they are.
                    let mut runs = [_mm256_setzero_si256(); 8];
                    for (i, run) in runs.iter_mut().enumerate() {
                        if nibbles(L) {
                            if i < 4 {
                                // SAFETY: run i of 4.
                                let v = unsafe { _mm256_loadu_si256(blk.add(32 * i).cast()) };
                                *run = _mm256_and_si256(v, low);
                            } else {
                                // SAFETY: run i - 4 of 4.
                                let v = unsafe { _mm256_loadu_si256(blk.add(32 * (i - 4)).cast()) };
                                *run = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            }
                        } else {
                            // SAFETY: run i of 8.
                            *run = unsafe { _mm256_loadu_si256(blk.add(32 * i).cast()) };
                        }
                        if L == INDICES {
                            *run = _mm256_shuffle_epi8(table, *run);
                        }
                    }
                    // Unsigned operands: unsigned codes as they are, |code| for signed codes.
                    let mut unsigned = runs;
                    if !unsigned_with_min(L) {
                        for u in unsigned.iter_mut() {
                            *u = _mm256_sign_epi8(*u, *u);
                        }
                    }
                    // SAFETY: the scales (and the second run of them) follow the codes.
                    let (s, second) = unsafe {
                        let s = _mm256_loadu_ps(blk.add(codes_bytes).cast());
                        let second = if scale_only(L) {
                            _mm256_setzero_ps()
                        } else {
                            _mm256_loadu_ps(blk.add(codes_bytes + 32).cast())
                        };
                        (s, second)
                    };
                    for r in 0..R {
                        // SAFETY: block b of row r's codes: 8 runs of 4 bytes.
                        let xb = unsafe { xc[r].add(b * BLOCK) };
                        let mut lo = _mm256_setzero_si256();
                        let mut hi = _mm256_setzero_si256();
                        for i in 0..8 {
                            // SAFETY: 4 bytes of the block's 32.
                            let quad = unsafe { (xb.add(4 * i) as *const i32).read_unaligned() };
                            let xv = _mm256_set1_epi32(quad);
                            let xv = if unsigned_with_min(L) {
                                xv
                            } else {
                                _mm256_sign_epi8(xv, runs[i])
                            };
                            if i < 4 {
                                lo = $dot(lo, unsigned[i], xv);
                            } else {
                                hi = $dot(hi, unsigned[i], xv);
                            }
                        }
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
                            if unsigned_with_min(L) {
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

    /// `acc` plus 32 unsigned-by-signed byte products summed in fours: `maddubs` (pairs into i16, which
    /// never saturates here: at most 2 * 128 * 127 for |code| <= 128, activations |q| <= 127)
    /// then `madd` by ones.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
        _mm256_add_epi32(acc, sums)
    }

    /// The same with one AVX-VNNI instruction.
    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn dot_vnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, a, b)
    }

    /// The same instruction in AVX-512 VNNI's encoding (256-bit registers through
    /// `avx512vl`), for CPUs that have AVX-512 VNNI and not AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    fn dot_vnni_evex(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, a, b)
    }

    kernel!(group_avx2, "avx2,fma", dot_avx2);
    kernel!(group_vnni, "avx2,fma,avxvnni", dot_vnni);
    kernel!(
        group_vnni_evex,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        dot_vnni_evex
    );
}

/// Two groups (16 columns) per pass in 512-bit registers. AVX-512 has no byte sign, so signed
/// weight codes meet the activations plus 128 (unsigned) and the product loses
/// `128 * sum(weight codes)`, an integer correction that keeps every sum exact.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{
        Corrections, HALVES, INDICES, PairPass, PairTile, READ_AHEAD_BLOCKS, layout_of, nibbles,
        scale_only, unsigned_with_min,
    };
    use crate::act::{BLOCK, QuantRows};
    use crate::layout::IQ4_VALUES;

    /// 32 bytes of each group side by side.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_pair(a: *const u8, b: *const u8) -> __m512i {
        // SAFETY: the caller's pointers hold 32 bytes each.
        unsafe {
            let lo = _mm256_loadu_si256(a.cast());
            let hi = _mm256_loadu_si256(b.cast());
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }

    /// # Safety
    /// `w0` and `w1` hold `nb` blocks of the layout; `x` has rows `r0..r0 + R`; the CPU has
    /// AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub unsafe fn pair_vnni<const L: u8, const R: usize>(
        w0: *const u8,
        w1: *const u8,
        nb: usize,
        x: &QuantRows,
        r0: usize,
        tile: &mut PairTile,
        pass: &mut PairPass,
    ) {
        let read_ahead = pass.read_ahead;
        // Raw pointers read once, not the enum at every block.
        let (keep, reuse) = match &mut pass.corrections {
            Corrections::Inline => (std::ptr::null_mut(), std::ptr::null()),
            Corrections::Keep(kept) => (kept.as_mut_ptr(), std::ptr::null()),
            Corrections::Reuse(kept) => (std::ptr::null_mut(), kept.as_ptr()),
        };
        let layout = layout_of(L);
        let stride = layout.block_stride();
        let codes_bytes = layout.codes_bytes();
        let low = _mm512_set1_epi8(0x0f);
        let ones = _mm512_set1_epi8(1);
        // IQ4's 16 values in each 128-bit lane, for the byte shuffle of indices.
        // SAFETY: 16 bytes.
        let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(IQ4_VALUES.as_ptr().cast()) });
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_hi = [_mm512_setzero_ps(); R];
        let (xc, xs, xsum) = super::rows_of::<R>(x, r0);
        let mut xu = [std::ptr::null::<u8>(); R];
        if !unsigned_with_min(L) {
            for (r, u) in xu.iter_mut().enumerate() {
                *u = x.row_offset_codes(r0 + r).as_ptr();
            }
        }
        let ahead = if read_ahead {
            READ_AHEAD_BLOCKS * stride
        } else {
            0
        };
        for b in 0..nb {
            // SAFETY: block b of nb in both groups.
            let (b0, b1) = unsafe { (w0.add(b * stride), w1.add(b * stride)) };
            if read_ahead {
                super::x86_read_ahead(b0.wrapping_add(ahead), stride);
                super::x86_read_ahead(b1.wrapping_add(ahead), stride);
            }
            let mut runs = [_mm512_setzero_si512(); 8];
            for (i, run) in runs.iter_mut().enumerate() {
                if nibbles(L) {
                    let at = 32 * (i % 4);
                    // SAFETY: run i % 4 of 4 in both groups.
                    let v = unsafe { load_pair(b0.add(at), b1.add(at)) };
                    *run = if i < 4 {
                        _mm512_and_si512(v, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), low)
                    };
                } else {
                    // SAFETY: run i of 8 in both groups.
                    *run = unsafe { load_pair(b0.add(32 * i), b1.add(32 * i)) };
                }
                if L == INDICES {
                    *run = _mm512_shuffle_epi8(table, *run);
                }
            }
            // `128 * sum(codes)` of each column's two halves (signed codes only).
            let (mut fix_lo, mut fix_hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            if !unsigned_with_min(L) {
                if !reuse.is_null() {
                    // SAFETY: one correction a block (checked by the caller), 64-byte aligned.
                    unsafe {
                        let at = reuse.add(b).cast::<__m512i>();
                        fix_lo = _mm512_load_si512(at);
                        fix_hi = _mm512_load_si512(at.add(1));
                    }
                } else {
                    for (i, run) in runs.iter().enumerate() {
                        if i < 4 {
                            fix_lo = _mm512_dpbusd_epi32(fix_lo, ones, *run);
                        } else {
                            fix_hi = _mm512_dpbusd_epi32(fix_hi, ones, *run);
                        }
                    }
                    fix_lo = _mm512_slli_epi32::<7>(fix_lo);
                    fix_hi = _mm512_slli_epi32::<7>(fix_hi);
                    if !keep.is_null() {
                        // SAFETY: as above.
                        unsafe {
                            let at = keep.add(b).cast::<__m512i>();
                            _mm512_store_si512(at, fix_lo);
                            _mm512_store_si512(at.add(1), fix_hi);
                        }
                    }
                }
            }
            // SAFETY: the scales (and the second run of them) follow the codes.
            let (s, second) = unsafe {
                let s = _mm512_castsi512_ps(load_pair(b0.add(codes_bytes), b1.add(codes_bytes)));
                let second = if scale_only(L) {
                    _mm512_setzero_ps()
                } else {
                    _mm512_castsi512_ps(load_pair(
                        b0.add(codes_bytes + 32),
                        b1.add(codes_bytes + 32),
                    ))
                };
                (s, second)
            };
            for r in 0..R {
                let mut lo = _mm512_setzero_si512();
                let mut hi = _mm512_setzero_si512();
                for (i, run) in runs.iter().enumerate() {
                    let sum = if i < 4 { &mut lo } else { &mut hi };
                    if unsigned_with_min(L) {
                        // SAFETY: 4 bytes of block b's 32 in row r.
                        let quad = unsafe {
                            (xc[r].add(b * BLOCK + 4 * i) as *const i32).read_unaligned()
                        };
                        *sum = _mm512_dpbusd_epi32(*sum, *run, _mm512_set1_epi32(quad));
                    } else {
                        // SAFETY: as above, of the offset codes.
                        let quad = unsafe {
                            (xu[r].add(b * BLOCK + 4 * i) as *const i32).read_unaligned()
                        };
                        *sum = _mm512_dpbusd_epi32(*sum, _mm512_set1_epi32(quad), *run);
                    }
                }
                if !unsigned_with_min(L) {
                    lo = _mm512_sub_epi32(lo, fix_lo);
                    hi = _mm512_sub_epi32(hi, fix_hi);
                }
                let dx = _mm512_set1_ps(xs[r][b]);
                if L == HALVES {
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(lo), acc[r]);
                    acc_hi[r] = _mm512_fmadd_ps(
                        _mm512_mul_ps(second, dx),
                        _mm512_cvtepi32_ps(hi),
                        acc_hi[r],
                    );
                } else {
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
                    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, dx), isum, acc[r]);
                    if unsigned_with_min(L) {
                        acc[r] = _mm512_fmadd_ps(second, _mm512_set1_ps(xsum[r][b]), acc[r]);
                    }
                }
            }
        }
        for r in 0..R {
            let v = if L == HALVES {
                _mm512_add_ps(acc[r], acc_hi[r])
            } else {
                acc[r]
            };
            // SAFETY: 16 floats in tile[r].
            unsafe { _mm512_storeu_ps(tile[r].as_mut_ptr(), v) };
        }
    }
}
