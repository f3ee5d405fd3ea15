//! Sampling from what a device reports about a row of logits, instead of the row itself.
//!
//! A batch of 128 rows of a 128k vocabulary is 64 MiB of f32 logits; copying that to the host
//! and walking it there cost more than the decode step on a GPU. A backend that can summarise
//! rows ([`crate::backend::DeviceSampler`], `workers/kernels/sample.cu`) reports per row: the
//! maximum and its lowest index, the two softmax normalisers, the row's draw for its uniform
//! (over the full vocabulary, or truncated by top-k, top-p and min-p as [`Truncation`] asks),
//! and, for top log-probabilities, the [`DEVICE_CANDIDATES`] best-ranked logits. From those,
//! [`Sampler::sample_from_summary`] takes the token [`Sampler::sample`] would pick from the
//! full row (same uniform, same ranking, same walk), up to the order in which the device adds
//! up f32 weights. Penalties, `logit_bias` and `min_tokens` (until it is reached) rewrite the
//! logits, so those requests take the full row.

use super::{
    SampledToken, Sampler, draw, logprobs, min_p_logit_offset, rank_candidates, sample_truncated,
};

/// How many best-ranked logits a device summary carries (`SAMPLE_CANDIDATES` in sample_rank.cu).
pub const DEVICE_CANDIDATES: usize = 64;

/// What the device must compute for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRequest {
    /// `0` for greedy (no draw).
    pub temperature: f32,
    /// The row's uniform in `[0, 1)` (the sampler's stream for this position).
    pub uniform: f64,
    /// Whether the [`DEVICE_CANDIDATES`] best logits come back (top log-probabilities).
    pub candidates: bool,
    /// Top-k, top-p and min-p before the draw (`sample_rank.cu`); `None` draws from the
    /// whole vocabulary.
    pub truncation: Option<Truncation>,
}

/// The truncation of a sampled row's draw, as [`super::SamplingParams`] sets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Truncation {
    /// `0`: no top-k.
    pub top_k: u32,
    /// `1`: no top-p.
    pub top_p: f32,
    /// `0`: no min-p.
    pub min_p: f32,
}

impl Truncation {
    /// min-p as a logit offset below the maximum, `T ln(min_p)`, as the host's
    /// `sample_truncated` computes it (so the device keeps the same logits); `-inf` for none.
    pub fn min_logit_offset(&self, temperature: f32) -> f32 {
        if self.min_p > 0.0 {
            min_p_logit_offset(temperature, self.min_p)
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// What the device reports about one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSummary {
    pub max_logit: f32,
    /// The lowest index holding `max_logit`.
    pub argmax: u32,
    /// NaN or `+inf` logits; any makes the host re-check the full row (and report the error).
    pub non_finite: u32,
    /// `sum(exp(l - max))`.
    pub sum_exp: f64,
    /// `sum(exp((l - max) / temperature))`; 1 for greedy rows.
    pub sum_exp_temperature: f64,
    /// The draw for the row's uniform (over the full vocabulary in id order, or truncated as
    /// asked), or the argmax of a greedy row.
    pub drawn: u32,
    pub drawn_logit: f32,
    /// The best-ranked finite logits (higher first, equal by lower id), when asked; `None`
    /// when not asked or when ties at the boundary overflowed the device's buffer.
    pub candidates: Option<Vec<(f32, u32)>>,
}

impl Sampler {
    /// What the device must compute for this request's next token, after the `generated`
    /// ones, or `None` when only the full row will do: penalties, `logit_bias`,
    /// `allowed_token_ids`, a bad word this token could complete and stop tokens held back
    /// for `min_tokens` rewrite the logits, and more top log-probabilities than
    /// [`DEVICE_CANDIDATES`] need every logit. A
    /// request under a grammar never asks: the engine copies its row to apply the grammar's
    /// mask, or masks it on the device and asks for the masked row.
    pub fn device_request(&mut self, generated: &[u32], vocab_size: usize) -> Option<RowRequest> {
        let params = &self.params;
        let step = generated.len();
        if params.has_penalties()
            || !params.logit_bias.is_empty()
            || !params.allowed_token_ids.is_empty()
            || super::banned_by_bad_words(&params.bad_words, generated)
                .next()
                .is_some()
            || self.holds_stops_at(step)
        {
            return None;
        }
        let logprobs = params.logprobs.map_or(0, |n| n as usize);
        if logprobs > DEVICE_CANDIDATES.min(vocab_size) {
            return None;
        }
        let greedy = params.is_greedy();
        let top_k = params.top_k_of(vocab_size);
        let untruncated = top_k == vocab_size && params.top_p >= 1.0 && params.min_p <= 0.0;
        let truncation = (!greedy && !untruncated).then_some(Truncation {
            top_k: if top_k < vocab_size { top_k as u32 } else { 0 },
            top_p: params.top_p,
            min_p: params.min_p,
        });
        Some(RowRequest {
            temperature: if greedy { 0.0 } else { params.temperature },
            uniform: self.uniform(step as u64),
            candidates: logprobs > 0,
            truncation,
        })
    }

    /// The token [`Sampler::sample`] would pick from the row `summary` describes (the device
    /// computed it for this sampler's [`Sampler::device_request`]), or `None` when the summary
    /// does not decide it: invalid logits, or top log-probabilities it does not hold. The
    /// caller then samples from the full row; the stream position is not consumed, so that
    /// gives the same draw.
    pub fn sample_from_summary(
        &self,
        summary: &RowSummary,
        vocab_size: usize,
    ) -> Option<SampledToken> {
        if summary.non_finite > 0 || summary.max_logit == f32::NEG_INFINITY {
            return None;
        }
        let params = &self.params;
        let log_normalizer = f64::from(summary.max_logit) + summary.sum_exp.ln();
        // `logprobs` with no top alternatives (OpenAI's `logprobs: true` alone) needs only the
        // drawn token's log-probability, which the normalizer gives: no candidates were asked
        // of the device for it (`device_request`).
        let top = params.logprobs.map_or(0, |n| (n as usize).min(vocab_size));
        let top_logprobs = if top == 0 {
            Vec::new()
        } else {
            let candidates = summary.candidates.as_ref()?;
            if candidates.len() < top {
                return None;
            }
            candidates[..top]
                .iter()
                .map(|&(logit, id)| (id, logprobs::logprob(logit, log_normalizer)))
                .collect()
        };
        let (id, logit) = if params.is_greedy() {
            (summary.argmax, summary.max_logit)
        } else {
            (summary.drawn, summary.drawn_logit)
        };
        Some(SampledToken {
            id,
            logprob: logprobs::logprob(logit, log_normalizer),
            top_logprobs,
        })
    }
}

/// What sample.cu computes, done on the host from the full row: the reference a device
/// summary is checked against (`workers/tests/cuda_backend.rs`, the unit tests here).
pub fn summarize_row(logits: &[f32], request: &RowRequest) -> RowSummary {
    let max_logit = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let argmax = logits.iter().position(|&l| l == max_logit).unwrap() as u32;
    let sum_exp = logits
        .iter()
        .map(|&l| f64::from((l - max_logit).exp()))
        .sum();
    let t = request.temperature;
    let (sum_t, drawn) = if t > 0.0 {
        let w: Vec<f32> = logits
            .iter()
            .map(|&l| ((l - max_logit) / t).exp())
            .collect();
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let drawn = match &request.truncation {
            Some(truncation) => {
                let params = super::SamplingParams {
                    temperature: t,
                    top_k: (truncation.top_k > 0).then_some(truncation.top_k),
                    top_p: truncation.top_p,
                    min_p: truncation.min_p,
                    ..Default::default()
                };
                sample_truncated(&params, logits, max_logit, request.uniform)
            }
            None => draw(
                request.uniform,
                total,
                w.iter().enumerate().map(|(i, &x)| (i as u32, x)),
            ),
        };
        (total, drawn)
    } else {
        (1.0, argmax)
    };
    let mut ranked: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > f32::NEG_INFINITY)
        .map(|(i, &l)| (l, i as u32))
        .collect();
    ranked.sort_by(rank_candidates);
    ranked.truncate(DEVICE_CANDIDATES);
    RowSummary {
        max_logit,
        argmax,
        non_finite: 0,
        sum_exp,
        sum_exp_temperature: sum_t,
        drawn,
        drawn_logit: logits[drawn as usize],
        candidates: request.candidates.then_some(ranked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplingParams;

    fn logits(vocab: usize, seed: u32) -> Vec<f32> {
        // A peaked, deterministic row with some equal values.
        (0..vocab)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                let base = (x % 1000) as f32 / 100.0;
                if i % 97 == 0 { 12.0 } else { base }
            })
            .collect()
    }

    /// For every kind of request the summary path decides, it picks what the full row gives.
    #[test]
    fn summary_sampling_equals_full_row_sampling() {
        let vocab = 5000;
        let cases = [
            SamplingParams::greedy(),
            SamplingParams {
                logprobs: Some(5),
                ..SamplingParams::greedy()
            },
            // `logprobs: true` without `top_logprobs`: the chosen token's log-probability only.
            SamplingParams {
                logprobs: Some(0),
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.8,
                logprobs: Some(0),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 0.8,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: Some(40),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 0.7,
                top_k: Some(20),
                top_p: 0.5,
                min_p: 0.05,
                logprobs: Some(3),
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 0.5,
                top_p: 0.3,
                ..SamplingParams::default()
            },
        ];
        let mut decided = 0;
        for (case, params) in cases.iter().enumerate() {
            for seed in 0..20u64 {
                let row = logits(vocab, seed as u32 * 7 + case as u32);
                let params = SamplingParams {
                    seed: Some(seed),
                    ..params.clone()
                };
                let mut device = Sampler::new(params.clone()).unwrap();
                let mut host = Sampler::new(params.clone()).unwrap();
                let generated = vec![0u32; (seed % 5) as usize];
                let request = device
                    .device_request(&generated, vocab)
                    .unwrap_or_else(|| panic!("case {case} is decided on the device"));
                let summary = summarize_row(&row, &request);
                let expected = host.sample(&mut row.clone(), &[], &generated).unwrap();
                if let Some(got) = device.sample_from_summary(&summary, vocab) {
                    decided += 1;
                    assert_eq!(got.id, expected.id, "case {case} seed {seed}");
                    assert!((got.logprob - expected.logprob).abs() < 1e-4);
                    assert_eq!(got.top_logprobs.len(), expected.top_logprobs.len());
                    for (a, b) in got.top_logprobs.iter().zip(&expected.top_logprobs) {
                        assert_eq!(a.0, b.0);
                        assert!((a.1 - b.1).abs() < 1e-4);
                    }
                }
            }
        }
        assert_eq!(decided, 160, "every case is decided from the summary");
    }

    #[test]
    fn requests_that_need_the_full_row_say_so() {
        let vocab = 1000;
        let full_row = [
            SamplingParams {
                repetition_penalty: 1.2,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                logit_bias: vec![(3, -100.0)],
                ..SamplingParams::greedy()
            },
            SamplingParams {
                logprobs: Some(DEVICE_CANDIDATES as u32 + 1),
                ..SamplingParams::default()
            },
        ];
        for params in full_row {
            let mut sampler = Sampler::new(params.clone()).unwrap();
            assert_eq!(sampler.device_request(&[], vocab), None, "{params:?}");
        }
        let mut untruncated = Sampler::new(SamplingParams::default()).unwrap();
        let request = untruncated.device_request(&[], vocab).unwrap();
        assert!(!request.candidates && request.temperature == 1.0);
        assert_eq!(request.truncation, None);
    }

    /// Top-k past the candidates, min-p alone and wide nuclei are drawn on the device too.
    #[test]
    fn truncated_requests_are_drawn_on_the_device() {
        let vocab = 1000;
        let cases = [
            (
                SamplingParams {
                    top_k: Some(DEVICE_CANDIDATES as u32 + 1),
                    ..SamplingParams::default()
                },
                Truncation {
                    top_k: DEVICE_CANDIDATES as u32 + 1,
                    top_p: 1.0,
                    min_p: 0.0,
                },
            ),
            (
                SamplingParams {
                    min_p: 0.1,
                    ..SamplingParams::default()
                },
                Truncation {
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.1,
                },
            ),
            (
                SamplingParams {
                    top_k: Some(5000),
                    top_p: 0.99,
                    ..SamplingParams::default()
                },
                Truncation {
                    top_k: 0,
                    top_p: 0.99,
                    min_p: 0.0,
                },
            ),
        ];
        for (params, truncation) in cases {
            let mut sampler = Sampler::new(params.clone()).unwrap();
            let request = sampler.device_request(&[], vocab).unwrap();
            assert_eq!(request.truncation, Some(truncation), "{params:?}");
            assert!(!request.candidates, "{params:?}");
        }
        let greedy = Sampler::new(SamplingParams {
            top_k: Some(3),
            ..SamplingParams::greedy()
        });
        assert_eq!(
            greedy
                .unwrap()
                .device_request(&[], vocab)
                .unwrap()
                .truncation,
            None
        );
    }

    #[test]
    fn non_finite_rows_fall_back_to_the_full_row() {
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let request = sampler.device_request(&[], 4).unwrap();
        let mut summary = summarize_row(&[0.0, 1.0, 2.0, 3.0], &request);
        summary.non_finite = 1;
        assert_eq!(sampler.sample_from_summary(&summary, 4), None);
    }
}
