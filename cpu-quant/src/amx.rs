//! Intel AMX tiles (Sapphire Rapids and later) for the quantized products of 16 rows at once:
//! each block of 32 inputs of 16 activation rows against 16 output columns (two groups) is one
//! tile product (`tdpbssd`: signed bytes, exact i32 sums), and the sums go through the same
//! f32 steps, in the same order, as every other kernel ([`super::kernels`]), so a row's
//! outputs are the same bits whichever kernel computes them (the forward stays
//! batch-invariant while batches decide which rows take tiles).
//!
//! Why: the VNNI kernels spend most of a prefill in byte products (`vpdpbusd`, 64 products an
//! instruction, plus the sign handling signed weight codes need), where one tile product is
//! 8,192 (16 rows, 16 columns, 32 inputs) in about 16 cycles. What is left is moving the sums
//! out (a tile store, 16 lines) and the per-block scaling every kernel does, with each block's
//! 16 row scales read from one run ([`TileRowScales`]): on an Intel Xeon VM with AMX about 22
//! ns a block of 16 rows and 16 columns, one thread, against ~50 for the paired VNNI kernel.
//! The tile instructions alone take ~12 ns and the scaling alone ~7, and they do not overlap:
//! on that CPU an AMX instruction and 512-bit vector work run one after the other (32
//! independent 512-bit FMAs take 4.3 ns, 9.4 with one `tdpbssd` beside them and 8.6 with one
//! `tilezero`, itself free alone), while 256-bit FMAs do overlap them; scaling in 256-bit
//! vectors takes twice the instructions and came out slower still.
//!
//! The B operand (8 rows of 64 bytes: four inputs of each of 16 columns a row) is staged per
//! pair of groups, once for all the row tiles of a task ([`PairOperand::stage`]): a run of each
//! group's byte codes side by side, nibble codes and IQ4 indices unpacked on the way.
//! [`Layout::BytesHalves`] (two scales a block, so two sums) stays with the VNNI kernels.
//!
//! Tiles need a tile configuration per thread ([`Tiles`]) and, on Linux, the process's
//! permission for the tile data state (`arch_prctl`), which [`available`] asks for once.

use crate::act::QuantRows;
use crate::layout::Layout;

/// Activation rows of one tile product.
pub const TILE_ROWS: usize = 16;

/// Output columns of one call: two groups.
pub const TILE_COLUMNS: usize = 16;

/// Whether this CPU and OS run the tile kernels (asks the OS for the tile state the first time).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            imp::cpu_has_amx_int8() && imp::avx512() && imp::request_tile_data()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the tile kernels multiply `layout`'s codes.
pub fn supports(layout: Layout) -> bool {
    layout != Layout::BytesHalves
}

/// The activation rows' per-block scales and sums as the tile kernel reads them: for each
/// whole tile of 16 rows and each block, the 16 rows' scales, then their 16 sums (64-byte
/// runs). In the rows' own layout a block's 16 scales are a row of blocks apart, and the kernel
/// spent more of its scaling on finding them than on the arithmetic.
pub struct TileRowScales {
    values: Vec<[f32; 2 * TILE_ROWS]>,
    blocks: usize,
}

impl TileRowScales {
    /// Gathers the scales of `x`'s whole tiles (rows beyond the last are the vectors').
    pub fn gather(x: &QuantRows) -> Self {
        let nb = x.blocks_per_row();
        let tiles = x.rows / TILE_ROWS;
        let mut values = vec![[0f32; 2 * TILE_ROWS]; tiles * nb];
        for (t, tile) in values.chunks_exact_mut(nb.max(1)).enumerate().take(tiles) {
            for r in 0..TILE_ROWS {
                let row = (t * TILE_ROWS + r) * nb;
                let (scales, sums) = (&x.scales[row..row + nb], &x.sums[row..row + nb]);
                for ((block, &scale), &sum) in tile.iter_mut().zip(scales).zip(sums) {
                    block[r] = scale;
                    block[TILE_ROWS + r] = sum;
                }
            }
        }
        TileRowScales { values, blocks: nb }
    }

    /// Tile `t`'s blocks (rows `16 t..16 t + 16`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn tile(&self, t: usize) -> &[[f32; 2 * TILE_ROWS]] {
        &self.values[t * self.blocks..(t + 1) * self.blocks]
    }
}

#[cfg(target_arch = "x86_64")]
pub use imp::{PairOperand, Tiles};

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{TILE_COLUMNS, TILE_ROWS, TileRowScales};
    use crate::act::{BLOCK, QuantRows};
    use crate::layout::{GROUP, IQ4_VALUES, Layout};

    pub(super) fn cpu_has_amx_int8() -> bool {
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only where the CPU has it.
        #[allow(unused_unsafe)]
        unsafe {
            if __cpuid_count(0, 0).eax < 7 {
                return false;
            }
            let edx = __cpuid_count(7, 0).edx;
            // AMX-TILE (bit 24) and AMX-INT8 (bit 25).
            edx & (3 << 24) == 3 << 24
        }
    }

    /// The epilogue and the staging use AVX-512 (every CPU with AMX has it).
    pub(super) fn avx512() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
    }

    /// Elsewhere than Linux nobody has asked for the tile state: no tiles.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn request_tile_data() -> bool {
        false
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux (5.16 and later) gives a
    /// process the tile data state only when asked; a tile load without it is SIGILL.
    #[cfg(target_os = "linux")]
    pub(super) fn request_tile_data() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a system call that changes only the process's permitted xsave features.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// The tile configuration of [`Tiles::products`], two blocks in flight: `tmm0` and `tmm3`
    /// the activations (16 rows of 32 codes), `tmm1` and `tmm4` the two groups' codes (8 rows
    /// of 64 bytes: four inputs of each of 16 columns), `tmm2` and `tmm5` their sums (16 rows
    /// of 16 i32). Tile registers are not renamed, so a second set is what lets one block's
    /// product run while the other's sums are stored.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn products() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1; // palette 1
            let mut tile = |t: usize, rows: usize, bytes: usize| {
                c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
                c[48 + t] = rows as u8;
            };
            for set in [0, 3] {
                tile(set, TILE_ROWS, BLOCK);
                tile(set + 1, BLOCK / 4, 4 * TILE_COLUMNS);
                tile(set + 2, TILE_ROWS, 4 * TILE_COLUMNS);
            }
            TileConfig(c)
        }
    }

    /// The tile configuration loaded on this thread, released when dropped (so the OS saves
    /// no tile state for the thread afterwards). Not `Send`: tiles belong to a thread.
    pub struct Tiles {
        _thread_bound: std::marker::PhantomData<*const ()>,
    }

    /// A 64-byte line: one row of a B operand, or of a block's sums.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    /// Two groups' codes as the B operand reads them, per block 8 rows of 64 bytes (row `i`:
    /// the first group's run `i`, then the second's), and where their per-block scales (and
    /// minimums) are.
    #[derive(Default)]
    pub struct PairOperand {
        lines: Vec<Line>,
        /// Where a block's scales start in a group's block, and its blocks' stride.
        tails_at: usize,
        tails_stride: usize,
        blocks: usize,
    }

    impl PairOperand {
        /// Stages `groups` (each `k / 32` blocks of `layout`; a lone group is given twice and
        /// its second copy's columns are not to be read); unpacks nibble codes and IQ4
        /// indices. The scales are read from `groups` again by [`Tiles::products`], which
        /// the caller gives the same groups.
        pub fn stage(&mut self, layout: Layout, groups: [&[u8]; 2]) {
            let stride = layout.block_stride();
            let nb = groups[0].len() / stride;
            assert!(
                layout != Layout::BytesHalves
                    && groups[0].len() == nb * stride
                    && groups[1].len() == groups[0].len(),
                "PairOperand::stage: not two groups of {layout:?} blocks"
            );
            // Every line is written below: only a new length is filled first.
            self.lines.resize(nb * BLOCK / 4, Line([0; 64]));
            self.tails_at = layout.codes_bytes();
            self.tails_stride = stride;
            self.blocks = nb;
            // SAFETY: AVX-512BW was checked by `available`, which the caller saw true before
            // making tiles; the sizes are asserted above.
            unsafe { stage_pair(layout, groups, stride, &mut self.lines) };
        }
    }

    /// See [`PairOperand::stage`]: per block, rows `i` and `i + 1` from the 64 bytes of runs
    /// `i` and `i + 1` of each group (byte codes), or from nibbles (runs 0-3 in the low
    /// nibbles of the block's 128 bytes, 4-7 in the high ones).
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn stage_pair(layout: Layout, [a, b]: [&[u8]; 2], stride: usize, out: &mut [Line]) {
        let mask = _mm512_set1_epi8(0x0f);
        // SAFETY: 16 bytes.
        let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(IQ4_VALUES.as_ptr().cast()) });
        let nibbles = matches!(layout, Layout::Nibbles | Layout::Indices);
        for ((a, b), out) in a
            .chunks_exact(stride)
            .zip(b.chunks_exact(stride))
            .zip(out.chunks_exact_mut(BLOCK / 4))
        {
            // Rows `row` and `row + 1` from 64 bytes of each group (two runs each).
            let mut put = |row: usize, x: __m512i, y: __m512i| {
                // SAFETY: rows < 8 of this block's lines.
                unsafe {
                    _mm512_store_si512(
                        out[row].0.as_mut_ptr().cast(),
                        _mm512_shuffle_i64x2::<0x44>(x, y),
                    );
                    _mm512_store_si512(
                        out[row + 1].0.as_mut_ptr().cast(),
                        _mm512_shuffle_i64x2::<0xee>(x, y),
                    );
                }
            };
            // SAFETY: each block holds at least 128 (nibbles) or 256 (bytes) bytes of codes.
            let load = |g: &[u8], at: usize| unsafe { _mm512_loadu_si512(g[at..].as_ptr().cast()) };
            if nibbles {
                for half in 0..2 {
                    let (x, y) = (load(a, 64 * half), load(b, 64 * half));
                    let lo = |v: __m512i| _mm512_and_si512(v, mask);
                    let hi = |v: __m512i| _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                    let (mut xl, mut yl, mut xh, mut yh) = (lo(x), lo(y), hi(x), hi(y));
                    if layout == Layout::Indices {
                        xl = _mm512_shuffle_epi8(table, xl);
                        yl = _mm512_shuffle_epi8(table, yl);
                        xh = _mm512_shuffle_epi8(table, xh);
                        yh = _mm512_shuffle_epi8(table, yh);
                    }
                    put(2 * half, xl, yl);
                    put(4 + 2 * half, xh, yh);
                }
            } else {
                for pair in 0..4 {
                    put(2 * pair, load(a, 64 * pair), load(b, 64 * pair));
                }
            }
        }
    }

    impl Tiles {
        /// Loads the tile configuration on this thread.
        ///
        /// # Safety
        /// [`super::available`] returned true.
        pub unsafe fn configure() -> Self {
            let config = TileConfig::products();
            // SAFETY: the caller checked AMX and the OS permission; the config is 64 bytes.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack)) };
            Tiles {
                _thread_bound: std::marker::PhantomData,
            }
        }

        /// `out[r][c]` = row `r0 + r` of `x` times column `c` of the two groups `operand`
        /// staged (`c < 8`: the first's), for 16 rows from a multiple of 16: per block, the
        /// exact integer sums, then in f32 `acc = fma(w_scale * x_scale, sum, acc)` and with
        /// `MIN` (unsigned codes with a minimum) `acc = fma(w_min, x_sum, acc)`, in increasing
        /// block order: the portable kernel's steps. `groups` are the ones staged (their
        /// scales are read); `row_scales` were gathered from `x`.
        pub fn products<const MIN: bool>(
            &mut self,
            operand: &PairOperand,
            groups: [&[u8]; 2],
            x: &QuantRows,
            row_scales: &TileRowScales,
            r0: usize,
            out: &mut [[f32; TILE_COLUMNS]; TILE_ROWS],
        ) {
            let nb = x.blocks_per_row();
            assert!(
                r0.is_multiple_of(TILE_ROWS) && r0 + TILE_ROWS <= x.rows,
                "tile rows {r0}+16 of {}",
                x.rows
            );
            assert!(
                operand.blocks == nb
                    && row_scales.blocks == nb
                    && groups.iter().all(|g| g.len() == nb * operand.tails_stride),
                "products: the operand or row scales are not these groups' k / 32 blocks"
            );
            let tails = groups.map(|g| g[operand.tails_at..].as_ptr());
            let rows = row_scales.tile(r0 / TILE_ROWS);
            // SAFETY: `self` exists only after `configure` (AMX, AVX-512 and the tile
            // configuration on this thread); rows r0..r0 + 16 exist; the operand, the
            // groups' tails and the row scales hold nb blocks.
            unsafe { products::<MIN>(operand, tails, x, rows, r0, out) }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releases this thread's tile configuration, loaded by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// Tile products of block `b` (16 rows from `a`, `row` bytes apart, and the operand's 8
    /// lines from `lines`), and of `b + 1` where `two`, left in `tmm2` and `tmm5`. Their
    /// stores ([`store_units`]) come after the scaling of an earlier pair: a regular load
    /// after a tile store waits for the store, and the store for its product.
    #[inline(always)]
    unsafe fn multiply_unit(a: *const i8, row: usize, lines: *const Line, two: bool) {
        // SAFETY: the caller's.
        unsafe {
            if two {
                asm!(
                    "tileloadd tmm0, [{a} + {row}*1]",
                    "tileloadd tmm1, [{b} + {line}*1]",
                    "tilezero tmm2",
                    "tdpbssd tmm2, tmm0, tmm1",
                    "tileloadd tmm3, [{a} + {row}*1 + 32]",
                    "tileloadd tmm4, [{b} + {line}*1 + 512]",
                    "tilezero tmm5",
                    "tdpbssd tmm5, tmm3, tmm4",
                    a = in(reg) a,
                    row = in(reg) row,
                    b = in(reg) lines,
                    line = in(reg) 64usize,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tileloadd tmm0, [{a} + {row}*1]",
                    "tileloadd tmm1, [{b} + {line}*1]",
                    "tilezero tmm2",
                    "tdpbssd tmm2, tmm0, tmm1",
                    a = in(reg) a,
                    row = in(reg) row,
                    b = in(reg) lines,
                    line = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
    }

    /// Stores [`multiply_unit`]'s sums: 16 lines from `c`, and where `two` 16 more after.
    #[inline(always)]
    unsafe fn store_units(c: *mut Line, two: bool) {
        // SAFETY: the caller's.
        unsafe {
            if two {
                asm!(
                    "tilestored [{c} + {line}*1], tmm2",
                    "tilestored [{c} + {line}*1 + 1024], tmm5",
                    c = in(reg) c,
                    line = in(reg) 64usize,
                    options(nostack),
                );
            } else {
                asm!(
                    "tilestored [{c} + {line}*1], tmm2",
                    c = in(reg) c,
                    line = in(reg) 64usize,
                    options(nostack),
                );
            }
        }
    }

    /// Sixteen copies of `$body` with `$r` the literal row (the accumulators stay in
    /// registers only when every index is a constant).
    macro_rules! rows16 {
        ($r:ident => $body:block) => {
            rows16!(@ $r $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
        };
        (@ $r:ident $body:block; $($i:literal)*) => {
            $( { let $r: usize = $i; $body } )*
        };
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512dq")]
    unsafe fn products<const MIN: bool>(
        operand: &PairOperand,
        tails: [*const u8; 2],
        x: &QuantRows,
        row_scales: &[[f32; 2 * TILE_ROWS]],
        r0: usize,
        out: &mut [[f32; TILE_COLUMNS]; TILE_ROWS],
    ) {
        let (k, nb) = (x.k, x.blocks_per_row());
        let stride = operand.tails_stride;
        // Three units of two blocks' sums: the one being scaled, the one stored before it,
        // and the one whose products run meanwhile.
        let mut sums = std::mem::MaybeUninit::<[Line; 6 * TILE_ROWS]>::uninit();
        let sums = sums.as_mut_ptr().cast::<Line>();
        let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
        let a = x.codes[r0 * k..(r0 + TILE_ROWS) * k].as_ptr();
        let row_scales = row_scales.as_ptr();
        let lines = operand.lines.as_ptr();
        // Block b's sums (in `at`, 16 lines) scaled into the accumulators.
        macro_rules! scale_block {
            ($b:expr, $at:expr) => {{
                let (b, at): (usize, *const Line) = ($b, $at);
                let tail = |g: usize, off: usize| {
                    _mm256_loadu_ps(tails[g].add(b * stride + off).cast())
                };
                let w_scale =
                    _mm512_insertf32x8::<1>(_mm512_castps256_ps512(tail(0, 0)), tail(1, 0));
                let w_min = if MIN {
                    _mm512_insertf32x8::<1>(
                        _mm512_castps256_ps512(tail(0, 4 * GROUP)),
                        tail(1, 4 * GROUP),
                    )
                } else {
                    _mm512_setzero_ps()
                };
                // One base address for the block's row scales and sums.
                let rows = &*row_scales.add(b);
                rows16!(r => {
                    let s = _mm512_mul_ps(w_scale, _mm512_set1_ps(rows[r]));
                    let sum = _mm512_cvtepi32_ps(_mm512_load_si512((*at.add(r)).0.as_ptr().cast()));
                    acc[r] = _mm512_fmadd_ps(s, sum, acc[r]);
                    if MIN {
                        acc[r] = _mm512_fmadd_ps(w_min, _mm512_set1_ps(rows[TILE_ROWS + r]), acc[r]);
                    }
                });
            }};
        }
        // SAFETY (every block below): blocks < nb of 16 rows of k codes, of the staged operand
        // (8 lines a block) and of both groups' tails; sums lines < 96.
        unsafe {
            // Units of two blocks (the last of an odd count alone), three in flight: unit u's
            // products are stored while unit u - 2 is scaled, and scaled two units later.
            let units = nb.div_ceil(2);
            let two = |u: usize| 2 * u + 1 < nb;
            let set = |u: usize| sums.add((u % 3) * 2 * TILE_ROWS);
            let unit = |u: usize| (a.add(2 * u * BLOCK), lines.add(2 * u * BLOCK / 4));
            for u in 0..units.min(2) {
                let (a, l) = unit(u);
                multiply_unit(a, k, l, two(u));
                store_units(set(u), two(u));
            }
            for u in 0..units {
                let ahead = u + 2 < units;
                if ahead {
                    let (a, l) = unit(u + 2);
                    multiply_unit(a, k, l, two(u + 2));
                }
                scale_block!(2 * u, set(u));
                if two(u) {
                    scale_block!(2 * u + 1, set(u).add(TILE_ROWS));
                }
                if ahead {
                    store_units(set(u + 2), two(u + 2));
                }
            }
            for (out, acc) in out.iter_mut().zip(acc) {
                _mm512_storeu_ps(out.as_mut_ptr(), acc);
            }
        }
    }
}
