//! A branch-free `exp` for f32 that the compiler vectorizes, for the O(vocabulary) passes of
//! the sampler (softmax normaliser, sampling weights). `f32::exp` is a libm call per element:
//! on a 128k vocabulary that alone was over a millisecond per token.
//!
//! Cephes' `expf` polynomial (relative error about 2e-7, i.e. 1–2 ulp) with the exponent
//! built from bits. Inputs below -87 (including `-inf`) give exactly 0; the sampler only passes
//! values `<= 0` (logit minus the maximum), so overflow is not handled beyond clamping.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so `x - n ln 2` stays exact (Cephes' C1 + C2).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds a float to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * r2 + r + 1.0;
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if underflow { 0.0 } else { y * scale }
}

/// `out[i] = exp((input[i] - max) / temperature)`. A plain map loop: the form LLVM's loop
/// vectorizer handles (the same body written over fixed-size lane arrays stayed scalar).
#[inline(never)]
pub(super) fn exp_into(input: &[f32], out: &mut [f32], max: f32, temperature: f32) {
    for (o, &v) in out.iter_mut().zip(input) {
        *o = exp((v - max) / temperature);
    }
}

/// Sum in eight f32 lanes per block, blocks accumulated in f64: vectorizes, and the f32
/// partial sums cover at most `BLOCK` terms so no precision worth having is lost.
pub(super) fn sum(values: &[f32]) -> f64 {
    values
        .chunks(BLOCK)
        .map(|block| {
            let mut lanes = [0f32; 8];
            let chunks = block.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().sum();
            for chunk in chunks {
                for (lane, v) in lanes.iter_mut().zip(chunk) {
                    *lane += v;
                }
            }
            lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail)
        })
        .sum()
}

const BLOCK: usize = 256;

/// `sum(exp((x - max) / temperature))` over `values`, without allocating. Deterministic for a
/// given input.
pub(super) fn sum_exp(values: &[f32], max: f32, temperature: f32) -> f64 {
    let mut buffer = [0f32; BLOCK];
    values
        .chunks(BLOCK)
        .map(|block| {
            let out = &mut buffer[..block.len()];
            exp_into(block, out, max, temperature);
            sum(out)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 10.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn sum_exp_matches_a_plain_sum() {
        let values: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 8.0).collect();
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let plain: f64 = values
            .iter()
            .map(|&v| (f64::from(v - max) / 0.7).exp())
            .sum();
        let fast = sum_exp(&values, max, 0.7);
        assert!((fast - plain).abs() / plain < 1e-6, "{fast} vs {plain}");
    }
}
