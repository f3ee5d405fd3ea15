//! `linear`: `x [rows, k] @ w[n, k]^T (+ bias) -> [rows, n]`, the CPU's GEMM and GEMV in one.
//!
//! Why not the `gemm` crate: its blocking (and its m = 1 fast path) depends on the matrix
//! sizes, so the arithmetic of one row would change with the number of rows in the batch, and a
//! request would not give the same tokens alone and batched. Here every output element is one
//! dot product with the fixed arithmetic of [`super::simd`], whatever tile computes it and
//! whichever thread runs it; `tests::rows_are_batch_invariant` checks it bitwise.
//!
//! Shape of the work: threads split the output columns (weight rows) into blocks of
//! [`BLOCK_ROWS`]; within a block, tiles of up to 4 activation rows x 2..4 weight rows keep
//! their accumulators in registers, so each weight vector loaded feeds up to 4 FMAs.
//! - Decode (one or a few rows) is bound by reading the weights: bf16 weights are widened to
//!   f32 in registers as they stream in (half the bytes of f32 weights).
//! - Prefill (many rows) is bound by FMAs: a block of bf16/f16 weight rows is first widened
//!   into an f32 scratch (exactly, so the results are bitwise the same as widening in
//!   registers) and reused by every row tile, which takes the widening out of the inner loop.
//!   Keeping bf16 weights (rather than widening whole matrices at load) halves memory and the
//!   bytes decode reads, for a prefill cost the scratch makes negligible (measured with
//!   `cpu_bench`, see the module doc of `workers/src/bin/cpu_bench.rs`).

use rayon::prelude::*;

use super::simd::{Elem, dot_portable};

/// Weight rows per parallel task: 16 rows of up to 8192 f32 is 512 KB, within L2.
pub const BLOCK_ROWS: usize = 16;

/// Row count from which bf16/f16 weight blocks are widened once into a scratch buffer.
const WIDEN_MIN_ROWS: usize = 8;

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own column block of each row).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out = x @ w^T + bias`; `x` is `[rows, k]`, `w` is `[n, k]`, `out` is `[rows, n]`.
pub fn linear<E: Elem>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[E],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), rows * k, "linear: x is not [rows, k]");
    assert_eq!(w.len(), n * k, "linear: w is not [n, k]");
    assert_eq!(out.len(), rows * n, "linear: out is not [rows, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias is not [n]");
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(BLOCK_ROWS);
    (0..blocks).into_par_iter().for_each(|block| {
        let j0 = block * BLOCK_ROWS;
        let nb = BLOCK_ROWS.min(n - j0);
        let w_block = &w[j0 * k..(j0 + nb) * k];
        // SAFETY: this task writes only columns j0..j0+nb of each row.
        let out = out_ptr;
        if std::mem::size_of::<E>() != 4 && rows >= WIDEN_MIN_ROWS {
            let widened: Vec<f32> = w_block.iter().map(|v| v.to_f32()).collect();
            block_rows(x, rows, k, &widened, j0, nb, n, bias, out);
        } else {
            block_rows(x, rows, k, w_block, j0, nb, n, bias, out);
        }
    });
}

/// All rows of `x` against weight rows `j0..j0+nb` (given as `w_block`).
#[allow(clippy::too_many_arguments)]
fn block_rows<E: Elem>(
    x: &[f32],
    rows: usize,
    k: usize,
    w_block: &[E],
    j0: usize,
    nb: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: OutPtr,
) {
    let mut i = 0;
    while i < rows {
        let mr = 4.min(rows - i);
        let nr_max = match mr {
            4 => 2,
            3 => 3,
            _ => 4,
        };
        let mut j = 0;
        while j < nb {
            let nr = nr_max.min(nb - j);
            let x_tile = &x[i * k..(i + mr) * k];
            let w_tile = &w_block[j * k..(j + nr) * k];
            let mut tile = [[0f32; 4]; 4];
            compute_tile(x_tile, w_tile, k, mr, nr, &mut tile);
            for (r, tile_row) in tile.iter().enumerate().take(mr) {
                for (c, &v) in tile_row.iter().enumerate().take(nr) {
                    let col = j0 + j + c;
                    let v = match bias {
                        Some(b) => v + b[col],
                        None => v,
                    };
                    // SAFETY: (i + r, col) is inside `out` and owned by this task's block.
                    unsafe { *out.0.add((i + r) * n + col) = v };
                }
            }
            j += nr;
        }
        i += mr;
    }
}

/// One `mr x nr` tile (`mr, nr <= 4`) into `tile[..mr][..nr]`.
fn compute_tile<E: Elem>(
    x: &[f32],
    w: &[E],
    k: usize,
    mr: usize,
    nr: usize,
    tile: &mut [[f32; 4]; 4],
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        macro_rules! call {
            ($mr:literal, $nr:literal) => {{
                let mut t = [[0f32; $nr]; $mr];
                // SAFETY: features checked; x holds mr rows and w nr rows of k elements.
                unsafe {
                    super::simd::tile_avx2::<E, $mr, $nr>(x.as_ptr(), k, w.as_ptr(), k, k, &mut t)
                };
                for (dst, src) in tile.iter_mut().zip(t.iter()) {
                    dst[..$nr].copy_from_slice(src);
                }
            }};
        }
        match (mr, nr) {
            (1, 1) => call!(1, 1),
            (1, 2) => call!(1, 2),
            (1, 3) => call!(1, 3),
            (1, 4) => call!(1, 4),
            (2, 1) => call!(2, 1),
            (2, 2) => call!(2, 2),
            (2, 3) => call!(2, 3),
            (2, 4) => call!(2, 4),
            (3, 1) => call!(3, 1),
            (3, 2) => call!(3, 2),
            (3, 3) => call!(3, 3),
            (4, 1) => call!(4, 1),
            (4, 2) => call!(4, 2),
            _ => unreachable!("tile {mr}x{nr} is never requested by block_rows"),
        }
        return;
    }
    for (r, tile_row) in tile.iter_mut().enumerate().take(mr) {
        for (c, v) in tile_row.iter_mut().enumerate().take(nr) {
            *v = dot_portable(&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
        }
    }
}

/// The slow twin of [`linear`]: a plain triple loop accumulating in f64.
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

    #[test]
    fn matches_slow_twin_for_all_tile_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (rows, k, n) in [(1, 64, 5), (3, 37, 19), (9, 72, 33), (13, 128, 40)] {
            let x = random(&mut rng, rows * k);
            let w = random(&mut rng, n * k);
            let bias = random(&mut rng, n);
            let mut out = vec![0f32; rows * n];
            linear(&x, rows, k, &w, n, Some(&bias), &mut out);
            close(&out, &linear_slow(&x, rows, k, &w, n, Some(&bias)), 1e-5);

            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut out_b = vec![0f32; rows * n];
            linear(&x, rows, k, &wb, n, None, &mut out_b);
            close(&out_b, &linear_slow(&x, rows, k, &wb, n, None), 1e-5);
        }
    }

    #[test]
    fn rows_are_batch_invariant() {
        // Each row computed alone equals the same row inside batches of every size, for the
        // register path (few rows) and the widened-scratch path (many rows).
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (k, n) = (96, 45);
        let w: Vec<bf16> = random(&mut rng, n * k)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let x = random(&mut rng, 20 * k);
        let mut alone = vec![0f32; 20 * n];
        for r in 0..20 {
            linear(
                &x[r * k..(r + 1) * k],
                1,
                k,
                &w,
                n,
                None,
                &mut alone[r * n..(r + 1) * n],
            );
        }
        for rows in [2, 5, 8, 11, 20] {
            let mut out = vec![0f32; rows * n];
            linear(&x[..rows * k], rows, k, &w, n, None, &mut out);
            assert_eq!(out, alone[..rows * n], "batch of {rows}");
        }
    }
}
