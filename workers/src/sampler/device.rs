//! Sampling from what a device reports about a row of logits, instead of the row itself.
//!
//! A batch of 128 rows of a 128k vocabulary is 64 MiB of f32 logits; copying that to the host
//! and walking it there cost more than the decode step on a GPU. A backend that can summarise
//! rows ([`crate::backend::DeviceSampler`], `workers/kernels/sample.cu`) reports per row: the
//! maximum and its lowest index, the two softmax normalisers, the full-vocabulary draw for the
//! row's uniform, and the [`DEVICE_CANDIDATES`] best-ranked logits. From those, [`Sampler::sample_from_summary`] picks
//! the same token [`Sampler::sample`] would pick from the full row (same uniform, same ranking,
//! same walk), up to the order in which the device adds up f32 weights. When a request needs
//! more than a summary holds (penalties, a top-k above the candidates, a nucleus wider than
//! them, ties overflowing), the engine falls back to the full row for that request only.

use super::{
    Candidate, NUCLEUS_HEAD, SampledToken, Sampler, draw, fast_exp, logprobs, nucleus_threshold,
    rank_candidates, smallest_prefix_reaching, sum_weights,
};

/// How many best-ranked logits a device summary carries (`SAMPLE_CANDIDATES` in sample.cu).
pub const DEVICE_CANDIDATES: usize = 64;

/// What the device must compute for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRequest {
    /// `0` for greedy (no draw).
    pub temperature: f32,
    /// The row's uniform in `[0, 1)` (the sampler's stream for this position).
    pub uniform: f64,
    /// Whether the [`DEVICE_CANDIDATES`] best logits are needed (truncation or top logprobs).
    pub candidates: bool,
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
    /// The full-vocabulary draw (id order, `uniform * sum_exp_temperature`), or the argmax.
    pub drawn: u32,
    pub drawn_logit: f32,
    /// The best-ranked finite logits (higher first, equal by lower id), when asked; `None`
    /// when not asked or when ties at the boundary overflowed the device's buffer.
    pub candidates: Option<Vec<(f32, u32)>>,
}

impl Sampler {
    /// What the device must compute for this request's token at generated position `step`,
    /// or `None` when only the full row will do (penalties and `logit_bias` rewrite the
    /// logits; a top-k above [`DEVICE_CANDIDATES`], or min-p over an untruncated vocabulary,
    /// needs every logit). A request under a grammar never asks: the engine copies its row to
    /// apply the grammar's mask.
    pub fn device_request(&mut self, step: u64, vocab_size: usize) -> Option<RowRequest> {
        let params = &self.params;
        if params.has_penalties() || !params.logit_bias.is_empty() {
            return None;
        }
        let logprobs = params.logprobs.map_or(0, |n| n as usize);
        if logprobs > DEVICE_CANDIDATES.min(vocab_size) {
            return None;
        }
        let greedy = params.is_greedy();
        let top_k = params.top_k_of(vocab_size);
        let untruncated = top_k == vocab_size && params.top_p >= 1.0 && params.min_p <= 0.0;
        if !greedy && !untruncated {
            let fits = if top_k < vocab_size {
                top_k <= DEVICE_CANDIDATES
            } else {
                // Top-p over the whole vocabulary walks the best NUCLEUS_HEAD first, which the
                // candidates hold; min-p without top-k or top-p filters in id order.
                params.top_p < 1.0
            };
            if !fits {
                return None;
            }
        }
        Some(RowRequest {
            temperature: if greedy { 0.0 } else { params.temperature },
            uniform: self.uniform(step),
            candidates: logprobs > 0 || !(greedy || untruncated),
        })
    }

    /// The token [`Sampler::sample`] would pick from the row `summary` describes, or `None`
    /// when the summary does not decide it (the caller then samples from the full row; the
    /// stream position is not consumed, so that gives the same draw).
    pub fn sample_from_summary(
        &self,
        request: &RowRequest,
        summary: &RowSummary,
        vocab_size: usize,
    ) -> Option<SampledToken> {
        if summary.non_finite > 0 || summary.max_logit == f32::NEG_INFINITY {
            return None;
        }
        let params = &self.params;
        let log_normalizer = f64::from(summary.max_logit) + summary.sum_exp.ln();
        let top_logprobs = match params.logprobs {
            Some(n) => {
                let candidates = summary.candidates.as_ref()?;
                let n = (n as usize).min(vocab_size);
                if candidates.len() < n {
                    return None;
                }
                candidates[..n]
                    .iter()
                    .map(|&(logit, id)| (id, logprobs::logprob(logit, log_normalizer)))
                    .collect()
            }
            None => Vec::new(),
        };
        let (id, logit) = if params.is_greedy() {
            (summary.argmax, summary.max_logit)
        } else if !request.candidates {
            (summary.drawn, summary.drawn_logit)
        } else {
            let candidates = summary.candidates.as_ref()?;
            let id = truncated_draw(self, request, summary, candidates, vocab_size)?;
            let logit = candidates.iter().find(|c| c.1 == id)?.0;
            (id, logit)
        };
        Some(SampledToken {
            id,
            logprob: logprobs::logprob(logit, log_normalizer),
            top_logprobs,
        })
    }
}

/// Top-k, top-p, min-p and the draw over the device's candidates, as `sample_truncated` does
/// over the full row; `None` when the candidates do not hold the kept set.
fn truncated_draw(
    sampler: &Sampler,
    request: &RowRequest,
    summary: &RowSummary,
    candidates: &[Candidate],
    vocab_size: usize,
) -> Option<u32> {
    let params = &sampler.params;
    let temperature = params.temperature;
    let max_logit = summary.max_logit;
    let weight = |logit: f32| fast_exp::exp((logit - max_logit) / temperature);
    let top_k = params.top_k_of(vocab_size);
    let mut kept: Vec<Candidate> = if top_k < vocab_size {
        // Fewer candidates than k only when fewer logits are finite: then all of them.
        let mut kept = candidates[..top_k.min(candidates.len())].to_vec();
        if params.top_p < 1.0 {
            let threshold = nucleus_threshold(params.top_p, sum_weights(&kept, weight));
            let len = smallest_prefix_reaching(&mut kept, true, threshold, weight);
            kept.truncate(len);
        }
        kept
    } else {
        // Top-p over the whole vocabulary: the nucleus must close within the head.
        let threshold = nucleus_threshold(params.top_p, summary.sum_exp_temperature);
        let head = &candidates[..NUCLEUS_HEAD.min(candidates.len())];
        let mut mass = 0.0;
        let len = head.iter().position(|c| {
            mass += f64::from(weight(c.0));
            mass >= threshold
        })?;
        head[..=len].to_vec()
    };
    if params.min_p > 0.0 {
        let min_logit = max_logit + temperature * params.min_p.ln();
        kept.retain(|&(logit, _)| logit >= min_logit);
    }
    let total = sum_weights(&kept, weight);
    Some(draw(
        request.uniform,
        total,
        kept.iter().map(|&(l, id)| (id, weight(l))),
    ))
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
        (
            total,
            draw(
                request.uniform,
                total,
                w.iter().enumerate().map(|(i, &x)| (i as u32, x)),
            ),
        )
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
                let step = seed % 5;
                let request = device
                    .device_request(step, vocab)
                    .unwrap_or_else(|| panic!("case {case} is decided on the device"));
                let summary = summarize_row(&row, &request);
                let generated = vec![0u32; step as usize];
                let expected = host.sample(&mut row.clone(), &[], &generated).unwrap();
                if let Some(got) = device.sample_from_summary(&request, &summary, vocab) {
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
        // Only a nucleus wider than the head may fall back.
        assert!(decided >= 100, "{decided} of 120 decided from the summary");
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
                top_k: Some(DEVICE_CANDIDATES as u32 + 1),
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 0.1,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(3, -100.0)],
                ..SamplingParams::greedy()
            },
        ];
        for params in full_row {
            let mut sampler = Sampler::new(params.clone()).unwrap();
            assert_eq!(sampler.device_request(0, vocab), None, "{params:?}");
        }
        let mut untruncated = Sampler::new(SamplingParams::default()).unwrap();
        let request = untruncated.device_request(0, vocab).unwrap();
        assert!(!request.candidates && request.temperature == 1.0);
    }

    #[test]
    fn non_finite_rows_fall_back_to_the_full_row() {
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let request = sampler.device_request(0, 4).unwrap();
        let mut summary = summarize_row(&[0.0, 1.0, 2.0, 3.0], &request);
        summary.non_finite = 1;
        assert_eq!(sampler.sample_from_summary(&request, &summary, 4), None);
    }
}
