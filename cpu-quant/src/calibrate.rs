//! From how many rows a product runs the paired kernel: timed on this CPU, once a process.
//!
//! The AVX-512 kernel multiplies two groups (16 columns) in one pass of 512-bit registers;
//! the one-group kernel uses 256-bit ones. Which is faster for a decode step's one to three
//! quantized rows depends on the core, not the model: on AMD Zen 4, which runs a 512-bit
//! instruction as two 256-bit halves, the one-group kernel decoded 15-35% faster; on an
//! Intel Xeon with full-width 512-bit units the paired one decoded 15-20% faster. From four
//! rows (prefill, batches) the paired kernel won on both. So rows below four are timed both
//! ways on a product the size of a small model's projection, larger than the cores' L2 as
//! the model's weights are. Both compute the same bits, so the choice changes only speed.
//!
//! On a shared machine such timings scatter by up to a sixth between runs of the same process
//! (measured on a 2-core cloud VM: at one row either kernel "won" by up to 9%, at two rows
//! by up to 16%), where the kernels differ by less at these sizes, so a plain "faster wins"
//! chose differently from one start to the next and decode speed with it. The choice
//! therefore starts from what the CPU's kind measured ([`prior_pair_from_rows`]) and the
//! timing moves it only where the other kernel was faster by more than 20% (`MARGIN`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_model::GgufQuant;

use super::{Isa, KernelChoice, OutPtr, Output, QuantMatrix, QuantRows, Rows, multiply};

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
/// How much faster than the prior's kernel the other must time at a row count to be chosen.
const MARGIN: f64 = 0.2;

/// From how many rows to pair before timing: AMD Zen 4 (family 0x19 with AVX-512) splits a
/// 512-bit instruction into two 256-bit halves, and its decode ran 15-35% faster with one
/// group a pass; every other CPU measured with AVX-512 VNNI (Intel Xeons) ran full-width
/// 512-bit units and decoded 15-20% faster paired.
pub fn prior_pair_from_rows() -> usize {
    if is_amd_zen4() {
        PAIR_FROM_ROWS_UNTIMED
    } else {
        1
    }
}

#[cfg(target_arch = "x86_64")]
fn is_amd_zen4() -> bool {
    use std::arch::x86_64::__cpuid;
    let vendor = __cpuid(0);
    let amd = [vendor.ebx, vendor.edx, vendor.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"AuthenticAMD");
    let eax = __cpuid(1).eax;
    let base = (eax >> 8) & 0xf;
    let family = if base == 0xf {
        base + ((eax >> 20) & 0xff)
    } else {
        base
    };
    amd && family == 0x19
}

#[cfg(not(target_arch = "x86_64"))]
fn is_amd_zen4() -> bool {
    false
}

/// The fewest rows from which the paired kernel runs, given `prior` and the timings (one
/// per row count, ascending): counts the prior pairs stay paired unless one group a pass
/// timed more than 20% faster (`MARGIN`), counts it does not stay so unless pairing did;
/// and pairing at a count implies pairing at every larger one.
pub fn choose_pair_from_rows(prior: usize, timings: &[PairTiming]) -> usize {
    let clearly_faster =
        |a: Duration, b: Duration| a.as_secs_f64() < b.as_secs_f64() * (1.0 - MARGIN);
    let pairs = |t: &PairTiming| {
        if t.rows >= prior {
            !clearly_faster(t.one_group, t.paired)
        } else {
            clearly_faster(t.paired, t.one_group)
        }
    };
    timings
        .iter()
        .rev()
        .take_while(|t| pairs(t))
        .last()
        .map_or(PAIR_FROM_ROWS_UNTIMED, |t| t.rows)
}

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
                // Fewer rows than a tile: the vector kernels only.
                let rows = Rows {
                    codes: xq,
                    row_scales: None,
                };
                for w in &matrices {
                    multiply(choice, rows, w, None, target, 0);
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
    let pair_from_rows = choose_pair_from_rows(prior_pair_from_rows(), &timings);
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
        assert_eq!(
            chosen,
            choose_pair_from_rows(prior_pair_from_rows(), t),
            "{calibration:?}"
        );
    }

    fn timing(rows: usize, one_group_us: u64, paired_us: u64) -> PairTiming {
        PairTiming {
            rows,
            one_group: Duration::from_micros(one_group_us),
            paired: Duration::from_micros(paired_us),
        }
    }

    #[test]
    fn timings_within_the_margin_keep_the_prior() {
        // Timings of one CPU on one shared VM, eight starts: a plain "faster wins" chose 1, 2
        // or 3 rows among them.
        let noisy = [
            [(253, 243), (324, 298), (413, 369)],
            [(215, 236), (322, 312), (429, 366)],
            [(199, 197), (201, 238), (249, 260)],
            [(229, 233), (284, 293), (399, 366)],
        ];
        for starts in noisy {
            let t: Vec<PairTiming> = starts
                .iter()
                .enumerate()
                .map(|(i, &(one, two))| timing(i + 1, one, two))
                .collect();
            assert_eq!(choose_pair_from_rows(1, &t), 1, "{t:?}");
            assert_eq!(choose_pair_from_rows(4, &t), 4, "{t:?}");
        }
    }

    #[test]
    fn a_clear_difference_moves_the_choice_from_the_prior() {
        // One group a pass 30% faster at 1 and 2 rows (as on AMD Zen 4): pair from 3 rows.
        let zen4_like = [
            timing(1, 100, 130),
            timing(2, 140, 182),
            timing(3, 200, 190),
        ];
        assert_eq!(choose_pair_from_rows(1, &zen4_like), 3);
        assert_eq!(choose_pair_from_rows(4, &zen4_like), 4);
        // Pairing 25% faster from 2 rows on a CPU whose prior is not to pair below 4.
        let xeon_like = [timing(1, 100, 98), timing(2, 150, 112), timing(3, 200, 150)];
        assert_eq!(choose_pair_from_rows(4, &xeon_like), 2);
        assert_eq!(choose_pair_from_rows(1, &xeon_like), 1);
        // A count in between that pairing loses clearly stops the run of paired counts.
        let mixed = [timing(1, 100, 70), timing(2, 100, 130), timing(3, 100, 70)];
        assert_eq!(choose_pair_from_rows(1, &mixed), 3);
    }
}
