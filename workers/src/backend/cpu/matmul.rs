//! `linear`: `x [rows, k] @ w[n, k]^T (+ bias) -> [rows, n]`, the CPU's GEMM and GEMV in one
//! kernel family, over weights packed at load into panels of 16 output columns.
//!
//! Arithmetic, fixed per output element: `acc = fma(x[r][i], w[c][i], acc)` for `i = 0..k` in
//! order, then `+ bias[c]`. Every kernel shape (6 rows x 16 columns for prefill, 1 row x 64
//! columns for decode, ...) computes each element exactly so, whichever thread runs it, so a
//! row's result does not depend on how many other rows share the batch: the forward is
//! batch-invariant bitwise (`tests::rows_are_batch_invariant`).
//!
//! Why not the `gemm` crate (faster on big prefill GEMMs, see `cpu_bench matmul`): its blocking
//! and its one-row fast path depend on the matrix sizes, so the sum order of a row, and its
//! last bits, would change with the batch it runs in, and a request would not give the same
//! tokens alone and batched.
//!
//! Weights: a panel holds 16 consecutive output columns as `[k][16]`, so the kernel loads the
//! 16 weights of one `i` with two vector loads and broadcasts `x[r][i]`: no horizontal sums.
//! - Decode (few rows) is bound by reading the weights: bf16 weights are widened to f32 in
//!   registers as they stream in (half the bytes of f32 weights).
//! - Prefill (many rows) is bound by FMAs: each bf16/f16 panel is first widened into an f32
//!   scratch (exactly, so results are bitwise those of widening in registers) and reused by all
//!   row tiles. Keeping bf16 at rest rather than widening whole matrices at load halves memory
//!   and decode's bytes for no prefill cost (`cpu_bench model --widen-weights` measures it).

use rayon::prelude::*;

use super::simd::Elem;

/// Output columns per panel.
pub const PANEL: usize = 16;
/// Rows per task when a batch is split along rows as well as columns.
const ROW_BLOCK: usize = 192;
/// Row count from which panels are widened into an f32 scratch first.
const WIDEN_MIN_ROWS: usize = 8;

/// A weight matrix `[n, k]` packed into `ceil(n / 16)` panels of `[k][16]` (zero-padded).
#[derive(Debug, Clone)]
pub struct PackedWeight<E> {
    pub n: usize,
    pub k: usize,
    pub data: Vec<E>,
}

impl<E: Elem> PackedWeight<E> {
    /// Packs row-major `w` (`[n, k]`).
    pub fn pack(w: &[E], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "pack: w is not [n, k]");
        let panels = n.div_ceil(PANEL);
        let mut data = vec![E::from_f32(0.0); panels * k * PANEL];
        for (c, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, lane) = (c / PANEL, c % PANEL);
            let panel = &mut data[p * k * PANEL..(p + 1) * k * PANEL];
            for (i, &v) in row.iter().enumerate() {
                panel[i * PANEL + lane] = v;
            }
        }
        PackedWeight { n, k, data }
    }

    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    fn panel(&self, p: usize) -> &[E] {
        &self.data[p * self.k * PANEL..(p + 1) * self.k * PANEL]
    }

    /// Row `c` of the original matrix, widened to f32 (embedding lookups of a tied table).
    pub fn row_f32(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k, "row_f32 out of range");
        let panel = self.panel(c / PANEL);
        for (i, o) in out.iter_mut().enumerate() {
            *o = panel[i * PANEL + c % PANEL].to_f32();
        }
    }
}

/// Output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own (row range x panel range) of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out = x @ w^T + bias`; `x` is `[rows, k]`, `out` is `[rows, w.n]`. Runs on the current
/// rayon pool.
pub fn linear<E: Elem>(
    x: &[f32],
    rows: usize,
    w: &PackedWeight<E>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), rows * k, "linear: x is not [rows, k]");
    assert_eq!(out.len(), rows * n, "linear: out is not [rows, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias is not [n]");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let panels = w.panels();
    let row_blocks = rows.div_ceil(ROW_BLOCK);
    // Enough tasks to balance the threads, few enough that a decode step is not dominated by
    // task hand-offs.
    let want = rayon::current_num_threads() * 4;
    let groups = panels.min(want.div_ceil(row_blocks).max(1));
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let r0 = rb * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(rows);
        let p0 = g * per_group;
        let p1 = (p0 + per_group).min(panels);
        let out = out_ptr;
        task_body(x, r0, r1, w, p0, p1, bias, out);
    });
}

#[allow(clippy::too_many_arguments)]
fn task_body<E: Elem>(
    x: &[f32],
    r0: usize,
    r1: usize,
    w: &PackedWeight<E>,
    p0: usize,
    p1: usize,
    bias: Option<&[f32]>,
    out: OutPtr,
) {
    let k = w.k;
    let mut tile = [[0f32; 64]; 6];
    if r1 - r0 >= WIDEN_MIN_ROWS {
        let mut scratch = vec![0f32; k * PANEL];
        for p in p0..p1 {
            widen(w.panel(p), &mut scratch);
            let mut i = r0;
            while i < r1 {
                let mr = 6.min(r1 - i);
                compute(
                    &x[i * k..(i + mr) * k],
                    k,
                    &scratch,
                    k * PANEL,
                    mr,
                    2,
                    &mut tile,
                );
                store(&tile, i, mr, p, 1, w.n, bias, out);
                i += mr;
            }
        }
        return;
    }
    let mut i = r0;
    while i < r1 {
        let mr = 6.min(r1 - i);
        let np_max = match mr {
            1 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let mut p = p0;
        while p < p1 {
            let np = np_max.min(p1 - p);
            let panels = &w.data[p * k * PANEL..(p + np) * k * PANEL];
            compute(
                &x[i * k..(i + mr) * k],
                k,
                panels,
                k * PANEL,
                mr,
                2 * np,
                &mut tile,
            );
            store(&tile, i, mr, p, np, w.n, bias, out);
            p += np;
        }
        i += mr;
    }
}

/// `dst = src` as f32 (exact), vectorised when AVX2 is available.
fn widen<E: Elem>(src: &[E], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: features checked.
        unsafe { widen_avx2(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2<E: Elem>(src: &[E], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = src.len() / 8 * 8;
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= both lengths.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), E::load8(src.as_ptr().add(i))) };
        i += 8;
    }
    for (d, s) in dst[n8..].iter_mut().zip(&src[n8..]) {
        *d = s.to_f32();
    }
}

/// Writes a computed tile (rows `i..i+mr`, panels `p..p+np`) with bias into the output.
#[allow(clippy::too_many_arguments)]
#[inline]
fn store(
    tile: &[[f32; 64]; 6],
    i: usize,
    mr: usize,
    p: usize,
    np: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: OutPtr,
) {
    let c0 = p * PANEL;
    let c1 = ((p + np) * PANEL).min(n);
    for (r, tile_row) in tile.iter().enumerate().take(mr) {
        for (c, &v) in (c0..c1).zip(tile_row.iter()) {
            let v = match bias {
                Some(b) => v + b[c],
                None => v,
            };
            // SAFETY: (i + r, c) is inside the output and in this task's rows and panels.
            unsafe { *out.0.add((i + r) * n + c) = v };
        }
    }
}

/// `tile[r][c] = sum_i x[r][i] * panels[c / 16][i][c % 16]` for `mr` rows and `nv * 8`
/// columns (`nv` even, panels `panel_stride` elements apart).
fn compute<E: Elem>(
    x: &[f32],
    k: usize,
    panels: &[E],
    panel_stride: usize,
    mr: usize,
    nv: usize,
    tile: &mut [[f32; 64]; 6],
) {
    debug_assert!(x.len() >= mr * k && panels.len() >= nv / 2 * panel_stride);
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        macro_rules! call {
            ($mr:literal, $nv:literal) => {
                // SAFETY: features checked; x holds mr rows of k, panels nv/2 panels of k x 16.
                unsafe {
                    kernel_avx2::<E, $mr, $nv>(
                        x.as_ptr(),
                        k,
                        panels.as_ptr(),
                        panel_stride,
                        k,
                        tile,
                    )
                }
            };
        }
        match (mr, nv) {
            (1, 2) => call!(1, 2),
            (1, 4) => call!(1, 4),
            (1, 6) => call!(1, 6),
            (1, 8) => call!(1, 8),
            (2, 2) => call!(2, 2),
            (2, 4) => call!(2, 4),
            (3, 2) => call!(3, 2),
            (3, 4) => call!(3, 4),
            (4, 2) => call!(4, 2),
            (5, 2) => call!(5, 2),
            (6, 2) => call!(6, 2),
            _ => unreachable!("kernel {mr}x{nv} is never requested by task_body"),
        }
        return;
    }
    for (r, tile_row) in tile.iter_mut().enumerate().take(mr) {
        for (c, t) in tile_row.iter_mut().enumerate().take(nv * 8) {
            let panel = &panels[(c / PANEL) * panel_stride..];
            let mut acc = 0f32;
            for i in 0..k {
                acc = x[r * k + i].mul_add(panel[i * PANEL + c % PANEL].to_f32(), acc);
            }
            *t = acc;
        }
    }
}

/// The register-tiled kernel: `MR` rows x `NV` vectors of 8 columns.
///
/// # Safety
/// `x` must hold `MR` rows of `k` (stride `x_stride`), `panels` `NV / 2` panels of `k * 16`
/// (stride `panel_stride`); the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_avx2<E: Elem, const MR: usize, const NV: usize>(
    x: *const f32,
    x_stride: usize,
    panels: *const E,
    panel_stride: usize,
    k: usize,
    tile: &mut [[f32; 64]; 6],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for i in 0..k {
        let mut wv = [_mm256_setzero_ps(); NV];
        for (v, wv) in wv.iter_mut().enumerate() {
            // SAFETY: panel v / 2, row i, half v % 2 lies inside the panels.
            *wv = unsafe { E::load8(panels.add((v / 2) * panel_stride + i * PANEL + (v % 2) * 8)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r, column i lies inside x.
            let xb = unsafe { _mm256_set1_ps(*x.add(r * x_stride + i)) };
            for (acc, wv) in acc.iter_mut().zip(wv.iter()) {
                *acc = _mm256_fmadd_ps(xb, *wv, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: v * 8 + 8 <= 64.
            unsafe { _mm256_storeu_ps(tile[r].as_mut_ptr().add(v * 8), *acc) };
        }
    }
}

/// The slow twin of [`linear`]: a plain triple loop over the unpacked matrix, in f64.
pub fn linear_slow<E: Elem>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[E],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                acc += x[r * k + i] as f64 * w[c * k + i].to_f32() as f64;
            }
            if let Some(b) = bias {
                acc += b[c] as f64;
            }
            out[r * n + c] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
        }
    }

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    #[test]
    fn matches_slow_twin_for_all_kernel_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let pool = pool();
        for (rows, k, n) in [
            (1, 64, 5),
            (3, 37, 19),
            (9, 72, 33),
            (13, 128, 70),
            (200, 20, 40),
        ] {
            let x = random(&mut rng, rows * k);
            let w = random(&mut rng, n * k);
            let bias = random(&mut rng, n);
            let mut out = vec![0f32; rows * n];
            let packed = PackedWeight::pack(&w, n, k);
            pool.install(|| linear(&x, rows, &packed, Some(&bias), &mut out));
            close(&out, &linear_slow(&x, rows, k, &w, n, Some(&bias)), 1e-5);

            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let packed = PackedWeight::pack(&wb, n, k);
            let mut out_b = vec![0f32; rows * n];
            pool.install(|| linear(&x, rows, &packed, None, &mut out_b));
            close(&out_b, &linear_slow(&x, rows, k, &wb, n, None), 1e-5);

            let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let packed = PackedWeight::pack(&wh, n, k);
            let mut out_h = vec![0f32; rows * n];
            pool.install(|| linear(&x, rows, &packed, None, &mut out_h));
            close(&out_h, &linear_slow(&x, rows, k, &wh, n, None), 1e-5);
        }
    }

    #[test]
    fn rows_are_batch_invariant() {
        // Each row computed alone equals the same row inside batches of every size, for the
        // register path (few rows), the widened-scratch path (many rows), and row blocks.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (k, n) = (96, 45);
        let w: Vec<bf16> = random(&mut rng, n * k)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let packed = PackedWeight::pack(&w, n, k);
        let total = 200;
        let x = random(&mut rng, total * k);
        let mut alone = vec![0f32; total * n];
        for r in 0..total {
            linear(
                &x[r * k..(r + 1) * k],
                1,
                &packed,
                None,
                &mut alone[r * n..(r + 1) * n],
            );
        }
        let pool = pool();
        for rows in [2, 5, 7, 8, 11, 20, 200] {
            let mut out = vec![0f32; rows * n];
            pool.install(|| linear(&x[..rows * k], rows, &packed, None, &mut out));
            assert_eq!(out, alone[..rows * n], "batch of {rows}");
        }
    }

    #[test]
    fn packed_rows_read_back() {
        let w: Vec<f32> = (0..40 * 3).map(|v| v as f32).collect();
        let packed = PackedWeight::pack(&w, 40, 3);
        let mut row = vec![0f32; 3];
        packed.row_f32(37, &mut row);
        assert_eq!(row, &w[37 * 3..38 * 3]);
    }
}
