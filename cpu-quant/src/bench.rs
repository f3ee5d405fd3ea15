//! One thread's rates of the kernels on synthetic weights (`cpu_bench kernels`), to see what
//! bounds them apart from the model around them: weights resident in cache (the kernels'
//! arithmetic) or streamed once from memory (a decode step), with and without reading ahead,
//! one group a call or two, at 1 to 4 rows; resident pairs of signed codes also with the sign
//! corrections a prefill's later row tiles reuse.

use std::time::{Duration, Instant};

use tandem_model::GgufQuant;

use crate::act::QuantRows;
use crate::kernels::{self, Corrections, Isa, MAX_ROWS, PairPass, PairTile, SignCorrection, Tile};
use crate::layout::GROUP;
use crate::{QuantMatrix, QuantShapeError};

/// Where the weights of a measurement come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Two groups multiplied over and over: their blocks stay in the first-level cache.
    Resident,
    /// A matrix larger than the caches, each group multiplied once a pass, as at decode.
    Streamed,
}

/// One measurement: the best of its passes.
#[derive(Debug, Clone)]
pub struct KernelRate {
    pub placement: Placement,
    /// Two groups a call (the AVX-512 paired kernel) or one.
    pub paired: bool,
    pub read_ahead: bool,
    /// The paired kernel read its sign corrections as kept by an earlier call over the
    /// same groups (a prefill's later row tiles) rather than computing them.
    pub reused_corrections: bool,
    pub rows: usize,
    /// Nanoseconds per block of one group (8 columns by 32 inputs) at `rows` rows.
    pub ns_per_group_block: f64,
    /// Weight bytes multiplied per second (the group blocks' bytes over their time).
    pub weight_gb_per_s: f64,
    /// Byte products a nanosecond (`rows * 8 * 32` a group block).
    pub products_per_ns: f64,
}

/// Rates of `isa`'s kernels on `quant` weights with `k` inputs per column, on this thread:
/// every placement, with and without reading ahead where streamed, one and (where the set
/// has them) two groups a call, at 1 to 4 rows. `streamed_bytes` sizes the streamed matrix
/// (choose it well beyond the last-level cache); `min_time` is spent on each measurement.
pub fn kernel_rates(
    isa: Isa,
    quant: GgufQuant,
    k: usize,
    streamed_bytes: usize,
    min_time: Duration,
) -> Result<Vec<KernelRate>, QuantShapeError> {
    let k = k.next_multiple_of(quant.block_elems());
    let row_bytes = quant.row_bytes(k).expect("k is whole blocks");
    let streamed_cols = (streamed_bytes / row_bytes).next_multiple_of(2 * GROUP);
    // 0x11 in every byte: small normal f16 scales and nonzero codes; the kernels have no
    // branch on values, so only the bytes being real memory matters.
    let resident = QuantMatrix::from_gguf(
        quant,
        &[(&vec![0x11u8; 2 * GROUP * row_bytes], 2 * GROUP)],
        k,
    )?;
    let streamed = QuantMatrix::from_gguf(
        quant,
        &[(&vec![0x11u8; streamed_cols * row_bytes], streamed_cols)],
        k,
    )?;
    let x: Vec<f32> = (0..MAX_ROWS * k)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    let xq = QuantRows::quantize(&x, MAX_ROWS, k);
    let mut rates = Vec::new();
    let pairings: &[bool] = if isa.pairs_groups() {
        &[false, true]
    } else {
        &[false]
    };
    for placement in [Placement::Resident, Placement::Streamed] {
        let w = match placement {
            Placement::Resident => &resident,
            Placement::Streamed => &streamed,
        };
        let read_aheads: &[bool] = match placement {
            Placement::Resident => &[false],
            Placement::Streamed => &[false, true],
        };
        let mut kept = vec![SignCorrection::default(); xq.blocks_per_row()];
        for &paired in pairings {
            let reuses: &[bool] =
                if paired && placement == Placement::Resident && w.layout.signed_codes() {
                    // The resident matrix is one pair: keep its corrections once.
                    let mut tile: PairTile = [[0f32; 2 * GROUP]; MAX_ROWS];
                    let mut pass = PairPass {
                        read_ahead: false,
                        corrections: Corrections::Keep(&mut kept),
                    };
                    kernels::group_pair_dot(
                        isa,
                        w.layout,
                        [w.group(0), w.group(1)],
                        &xq,
                        0..1,
                        &mut tile,
                        &mut pass,
                    );
                    &[false, true]
                } else {
                    &[false]
                };
            for &read_ahead in read_aheads {
                for &reuse in reuses {
                    for rows in 1..=MAX_ROWS {
                        let kept = reuse.then_some(&kept[..]);
                        let pass = || multiply_all(isa, w, &xq, rows, paired, read_ahead, kept);
                        let group_blocks = w.groups() * xq.blocks_per_row();
                        let best = best_pass(pass, placement, min_time);
                        let ns = best.as_secs_f64() * 1e9 / group_blocks as f64;
                        let block_bytes = w.layout.block_stride() as f64;
                        rates.push(KernelRate {
                            placement,
                            paired,
                            read_ahead,
                            reused_corrections: reuse,
                            rows,
                            ns_per_group_block: ns,
                            weight_gb_per_s: block_bytes / ns,
                            products_per_ns: (rows * GROUP * crate::act::BLOCK) as f64 / ns,
                        });
                    }
                }
            }
        }
    }
    Ok(rates)
}

/// The shortest of passes repeated for `min_time` (a resident pass is repeated within
/// itself, so that one lasts long enough to time).
fn best_pass(mut pass: impl FnMut(), placement: Placement, min_time: Duration) -> Duration {
    let repeats = match placement {
        Placement::Resident => 2000,
        Placement::Streamed => 1,
    };
    let started = Instant::now();
    let mut best = Duration::MAX;
    let mut first = true;
    while first || started.elapsed() < min_time {
        let t = Instant::now();
        for _ in 0..repeats {
            pass();
        }
        let took = t.elapsed() / repeats;
        // The first pass pays page faults and the cold caches of the resident case.
        if !first {
            best = best.min(took);
        }
        first = false;
    }
    best
}

/// Every group of `w` times the first `rows` rows, one or two groups a call (with `kept`
/// corrections, which are the first pair's).
fn multiply_all(
    isa: Isa,
    w: &QuantMatrix,
    xq: &QuantRows,
    rows: usize,
    paired: bool,
    read_ahead: bool,
    kept: Option<&[SignCorrection]>,
) {
    let mut tile: Tile = [[0f32; GROUP]; MAX_ROWS];
    let mut pair: PairTile = [[0f32; 2 * GROUP]; MAX_ROWS];
    let mut g = 0;
    while g < w.groups() {
        if paired {
            kernels::group_pair_dot(
                isa,
                w.layout,
                [w.group(g), w.group(g + 1)],
                xq,
                0..rows,
                &mut pair,
                &mut PairPass {
                    read_ahead,
                    corrections: match kept {
                        Some(kept) => Corrections::Reuse(kept),
                        None => Corrections::Inline,
                    },
                },
            );
            g += 2;
        } else {
            kernels::group_dot(
                isa,
                w.layout,
                w.group(g),
                xq,
                0..rows,
                &mut tile,
                read_ahead,
            );
            g += 1;
        }
    }
    std::hint::black_box((&tile, &pair));
}
