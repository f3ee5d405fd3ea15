//! From how many rows a product runs the paired kernel: timed on this CPU, once a process.
//!
//! The AVX-512 kernel multiplies two groups (16 columns) in one pass of 512-bit registers;
//! the one-group kernel uses 256-bit ones. Which is faster for a decode step's one to three
//! quantized rows depends on the core, not the model: on AMD Zen 4, which runs a 512-bit
//! instruction as two 256-bit halves, the one-group kernel decoded 15-35% faster; on an
//! Intel Xeon with full-width 512-bit units the paired one decoded 15-20% faster. From four
//! rows (prefill, batches) the paired kernel won on both. So rows below four are timed both
//! ways on a product the size of a small model's projection, larger than the cores' L2 as
//! the model's weights are, and the faster kernel kept. Both compute the same bits, so the
//! choice changes only speed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_model::GgufQuant;

use super::{Isa, KernelChoice, OutPtr, Output, QuantMatrix, QuantRows, multiply};

/// Rows from which the paired kernel runs without timing: faster on every CPU measured.
pub const PAIR_FROM_ROWS_UNTIMED: usize = 4;

/// The timed products: a decode step's worth of a small model's MLP projections, [`N`] x
/// [`K`] each, [`MATRICES`] of them read in turn (more bytes than two cores' L2 hold, as a
/// model's weights are; each small enough that a task's share of it is a few groups, as a
/// small model's projections give).
const N: usize = 1536;
const K: usize = 576;
const MATRICES: usize = 8;
/// Rounds of every (rows, kernel) pass; each keeps its fastest.
const ROUNDS: usize = 7;

/// One row count's fastest product with each kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairTiming {
    pub rows: usize,
    pub one_group: Duration,
    pub paired: Duration,
}

/// What the timing chose, and what it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PairCalibration {
    pub pair_from_rows: usize,
    pub timings: Vec<PairTiming>,
}

/// [`calibrate`] for `isa` and `quant`, run once a process (the first caller's pool times
/// it; later callers, other backends of the process among them, share its answer).
pub fn calibrated(isa: Isa, quant: GgufQuant) -> &'static PairCalibration {
    static DONE: OnceLock<PairCalibration> = OnceLock::new();
    DONE.get_or_init(|| {
        let calibration = calibrate(isa, quant);
        if !calibration.timings.is_empty() {
            let timings: Vec<String> = calibration
                .timings
                .iter()
                .map(|t| {
                    format!(
                        "{} row{}: {:.0} us one group a pass, {:.0} us two",
                        t.rows,
                        if t.rows == 1 { "" } else { "s" },
                        t.one_group.as_secs_f64() * 1e6,
                        t.paired.as_secs_f64() * 1e6
                    )
                })
                .collect();
            let from = calibration.pair_from_rows;
            tracing::info!(
                "quantized kernels: {} pair column groups from {from} row{} (timed on {MATRICES} {quant} products of {N}x{K}: {})",
                isa.name(),
                if from == 1 { "" } else { "s" },
                timings.join("; ")
            );
        }
        calibration
    })
}

/// Times the one-group and paired kernels of `isa` at one to three rows on a `quant` matrix,
/// on the current rayon pool: the paired kernel runs from the fewest rows at which it and
/// every larger count were faster. An `isa` without a paired kernel is not timed.
pub fn calibrate(isa: Isa, quant: GgufQuant) -> PairCalibration {
    if !isa.pairs_groups() {
        return PairCalibration {
            pair_from_rows: PAIR_FROM_ROWS_UNTIMED,
            timings: Vec::new(),
        };
    }
    let k = K.next_multiple_of(quant.block_elems());
    let row_bytes = quant.row_bytes(k).expect("k is whole blocks");
    // 0x11 in every byte: small normal f16 scales, nonzero codes. The kernels' speed does not
    // depend on the values (no branches on them, no subnormal results), only on the bytes
    // being real memory, which the repacking writes.
    let blocks = vec![0x11u8; N * row_bytes];
    let matrices: Vec<QuantMatrix> = (0..MATRICES)
        .map(|_| QuantMatrix::from_gguf(quant, &[(&blocks, N)], k).expect("a whole matrix"))
        .collect();
    let x: Vec<f32> = (0..3 * k)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    let mut out = vec![0f32; 3 * N];
    let mut timings: Vec<PairTiming> = (1..PAIR_FROM_ROWS_UNTIMED)
        .map(|rows| PairTiming {
            rows,
            one_group: Duration::MAX,
            paired: Duration::MAX,
        })
        .collect();
    let quantized: Vec<QuantRows> = timings
        .iter()
        .map(|t| QuantRows::quantize(&x[..t.rows * k], t.rows, k))
        .collect();
    // A first round untimed: page faults, the pool's threads waking.
    for round in 0..=ROUNDS {
        for (timing, xq) in timings.iter_mut().zip(&quantized) {
            for paired in [false, true] {
                let choice = KernelChoice {
                    isa,
                    pair_from_rows: if paired { timing.rows } else { timing.rows + 1 },
                };
                let target = Output {
                    ptr: OutPtr(out.as_mut_ptr()),
                    stride: N,
                    pairs: false,
                };
                let start = Instant::now();
                for w in &matrices {
                    multiply(choice, xq, w, None, target, 0);
                }
                let took = start.elapsed();
                if round > 0 {
                    let best = if paired {
                        &mut timing.paired
                    } else {
                        &mut timing.one_group
                    };
                    *best = (*best).min(took);
                }
            }
        }
    }
    let pair_from_rows = timings
        .iter()
        .rev()
        .take_while(|t| t.paired < t.one_group)
        .last()
        .map_or(PAIR_FROM_ROWS_UNTIMED, |t| t.rows);
    PairCalibration {
        pair_from_rows,
        timings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_the_fewest_rows_from_which_pairs_were_faster() {
        let isa = Isa::detect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let calibration = pool.install(|| calibrate(isa, GgufQuant::Q4_1));
        if !isa.pairs_groups() {
            assert_eq!(calibration.pair_from_rows, PAIR_FROM_ROWS_UNTIMED);
            assert!(calibration.timings.is_empty());
            eprintln!(
                "SKIPPED: the_choice_is_the_fewest_rows_from_which_pairs_were_faster: {} has no paired kernel",
                isa.name()
            );
            return;
        }
        let t = &calibration.timings;
        assert_eq!(t.iter().map(|t| t.rows).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            t.iter()
                .all(|t| t.paired < Duration::MAX && t.one_group < Duration::MAX)
        );
        let chosen = calibration.pair_from_rows;
        assert!((1..=PAIR_FROM_ROWS_UNTIMED).contains(&chosen));
        for t in t.iter().filter(|t| t.rows >= chosen) {
            assert!(t.paired < t.one_group, "{calibration:?}");
        }
        if chosen > 1 {
            let below = &t[chosen - 2];
            assert!(below.paired >= below.one_group, "{calibration:?}");
        }
    }
}
