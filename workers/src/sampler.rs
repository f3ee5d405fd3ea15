//! Turns one sequence's logits into its next token: greedy, temperature, top-k, top-p, min-p,
//! repetition / presence / frequency penalties, per-request seeds, log-probabilities.
//!
//! Pure logic, no backend: the engine hands each sequence's row of logits (f32, one per
//! vocabulary entry) to that sequence's [`Sampler`].
//!
//! # Order of operations
//! 1. Reject NaN / `+inf` logits ([`SamplingError::NonFiniteLogits`]): they mean the forward
//!    pass broke, and a token drawn from them would be silent garbage. `-inf` is allowed (it
//!    masks a token) but at least one logit must be finite.
//! 2. `logit_bias` (OpenAI), added to the raw logits in place; the engine has already set the
//!    logits a request's grammar forbids to `-inf` (a bias leaves them there). Then vLLM's
//!    `allowed_token_ids` (every other logit `-inf`), and `bad_words` (the last token of each
//!    word whose other tokens end the generated ones `-inf`). Then, before
//!    `min_tokens` tokens are generated, the stop tokens' logits to `-inf` (unless that would
//!    leave no token to draw: a grammar that allows only its end, say).
//!    Penalties, in place (see `sampler/penalties.rs`): repetition (HF, prompt + generated), then
//!    presence and frequency (OpenAI, generated only).
//! 3. Log-probabilities: the log-softmax of the penalised logits at temperature 1, before any
//!    truncation. This is what OpenAI reports (its logprobs do not move with `temperature` or
//!    `top_p`) and vLLM's "processed" mode minus temperature; it keeps every reported value
//!    finite and meaningful even for greedy requests, where a temperature-0 distribution would
//!    be degenerate.
//! 4. Choice: greedy (`temperature == 0`: argmax, ties to the lowest id) or, in Hugging Face's
//!    order, temperature, top-k, top-p (over the top-k mass), min-p, then one draw.
//!
//! # Reproducibility
//! Every token costs exactly one uniform draw, whatever filters ran, and the draw for the
//! `n`-th generated token comes from ChaCha12 stream `n` of the request's seed (`n` is
//! `generated.len()`). So a token depends only on (seed, position, logits): not on the batch it
//! was computed in, nor on which worker sampled the previous tokens. A decode worker continuing
//! a request prefilled elsewhere just needs the seed ([`Sampler::seed`], drawn from OS entropy
//! when the request had none). Ties are always broken by the lowest id and candidate sets are
//! walked in a fixed order, so no step depends on an unstable sort.
//!
//! # Cost
//! O(V) per token plus: top-k uses `select_nth_unstable` (O(V)) and sorts only the k kept;
//! top-p sorts a growing prefix (64, 256, …) until it holds the requested mass, so a peaked
//! distribution never pays for a full vocabulary sort.

pub mod device;
mod fast_exp;
mod logprobs;
mod params;
mod penalties;

pub use params::SamplingParams;

use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// Why a token could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter `{name}`: {reason}")]
    InvalidParam { name: &'static str, reason: String },
    #[error(
        "logits contain {count} NaN or +inf values (first at token {first_token}): the forward pass produced invalid values"
    )]
    NonFiniteLogits { count: usize, first_token: u32 },
    #[error("no token can be sampled: the logits are empty or all -inf")]
    NoCandidates,
    /// The request's own constraint left no token to draw (with its grammar, if any): the
    /// request is at fault, not the worker.
    #[error("no token can be drawn: `{param}` rules out every token the request allows here")]
    Unsatisfiable { param: &'static str },
    #[error("token id {token} in the history is outside the vocabulary of {vocab_size} logits")]
    TokenOutOfRange { token: u32, vocab_size: usize },
}

/// One sampled token with its log-probability and, when requested, the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Log-probability of `id` under the penalised, untruncated, temperature-1 distribution.
    pub logprob: f32,
    /// The `SamplingParams::logprobs` best tokens with their log-probabilities, best first
    /// (ties to the lowest id); empty when not requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The sampling state of one sequence: its parameters and its random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha12Rng,
    /// Reused for penalty counting, so a step allocates nothing for it.
    scratch: Vec<u32>,
    /// Reused for the logits `allowed_token_ids` keeps.
    scratch_logits: Vec<f32>,
    /// The tokens that end the sequence, held back until `min_tokens` are generated; empty
    /// when `min_tokens` is 0.
    stop_tokens: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the stream (from OS entropy when `params.seed` is `None`).
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().next_u64());
        Ok(Self {
            params,
            seed,
            rng: ChaCha12Rng::seed_from_u64(seed),
            scratch: Vec::new(),
            scratch_logits: Vec::new(),
            stop_tokens: Vec::new(),
        })
    }

    /// The tokens that end this sequence (the model's end-of-sequence ids and the request's
    /// stop tokens): [`SamplingParams::min_tokens`] keeps them from being drawn early.
    pub fn set_stop_tokens(&mut self, stop_tokens: &[u32]) {
        if self.params.min_tokens > 0 {
            self.stop_tokens = stop_tokens.to_vec();
        }
    }

    /// Whether the token at generated position `step` must not be a stop token.
    fn holds_stops_at(&self, step: usize) -> bool {
        step < self.params.min_tokens as usize && !self.stop_tokens.is_empty()
    }

    /// Sets the stop tokens' logits to `-inf`, unless every other token's is `-inf` already
    /// (then nothing but a stop token can follow, and the row is left as it was).
    fn hold_stops(&self, logits: &mut [f32]) -> Result<(), SamplingError> {
        let mut saved = Vec::with_capacity(self.stop_tokens.len());
        for &token in &self.stop_tokens {
            let vocab_size = logits.len();
            let logit = logits
                .get_mut(token as usize)
                .ok_or(SamplingError::TokenOutOfRange { token, vocab_size })?;
            saved.push((token, *logit));
            *logit = f32::NEG_INFINITY;
        }
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            for (token, logit) in saved {
                logits[token as usize] = logit;
            }
        }
        Ok(())
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use: the request's, or the one drawn for it. Pass it along with the request
    /// to continue the same stream on another worker.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Samples the next token. `logits` is this sequence's row (one value per vocabulary entry)
    /// and is modified in place (penalties applied). `previous_tokens` is prompt + generated
    /// (for the repetition penalty); `generated` is what this request produced so far (for
    /// presence/frequency penalties, and its length picks the random stream).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        previous_tokens: &[u32],
        generated: &[u32],
    ) -> Result<SampledToken, SamplingError> {
        apply_logit_bias(&self.params.logit_bias, logits)?;
        // The request field that left no token to draw, if one did.
        let mut emptied_by = None;
        if !self.params.allowed_token_ids.is_empty() {
            keep_only(
                &self.params.allowed_token_ids,
                logits,
                &mut self.scratch_logits,
            )?;
            if self.scratch_logits.iter().all(|&l| l == f32::NEG_INFINITY) {
                emptied_by = Some("allowed_token_ids");
            }
        }
        if ban_bad_words(&self.params.bad_words, generated, logits)?
            && emptied_by.is_none()
            && logits.iter().all(|&l| l == f32::NEG_INFINITY)
        {
            emptied_by = Some("bad_words");
        }
        if self.holds_stops_at(generated.len()) {
            self.hold_stops(logits)?;
        }
        if self.params.has_penalties() {
            penalties::apply(
                &self.params,
                logits,
                previous_tokens,
                generated,
                &mut self.scratch,
            )?;
        }
        // After the penalties: they keep finite values finite and NaN / +inf as they are, so
        // one pass both validates and finds the maximum.
        let max_logit = max_finite(logits)?;
        if max_logit == f32::NEG_INFINITY {
            return Err(match emptied_by {
                Some(param) => SamplingError::Unsatisfiable { param },
                None => SamplingError::NoCandidates,
            });
        }
        let log_normalizer = logprobs::log_normalizer(logits, max_logit);
        // Drawn even when greedy, so the stream never depends on the path taken.
        let u = self.uniform(generated.len() as u64);
        let id = if self.params.is_greedy() {
            argmax(logits, max_logit)
        } else {
            sample_truncated(&self.params, logits, max_logit, u)
        };
        let top_logprobs = match self.params.logprobs {
            Some(n) => logprobs::top_n(logits, n as usize, log_normalizer),
            None => Vec::new(),
        };
        Ok(SampledToken {
            id,
            logprob: logprobs::logprob(logits[id as usize], log_normalizer),
            top_logprobs,
        })
    }

    /// The uniform in `[0, 1)` for generated position `step`: the first 53 bits of ChaCha12
    /// stream `step`, so it does not depend on how many draws came before.
    fn uniform(&mut self, step: u64) -> f64 {
        self.rng.set_stream(step);
        self.rng.set_word_pos(0);
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Adds each `(token, bias)` to its logit (OpenAI's `logit_bias`).
fn apply_logit_bias(bias: &[(u32, f32)], logits: &mut [f32]) -> Result<(), SamplingError> {
    for &(token, b) in bias {
        let vocab_size = logits.len();
        let logit = logits
            .get_mut(token as usize)
            .ok_or(SamplingError::TokenOutOfRange { token, vocab_size })?;
        *logit += b;
    }
    Ok(())
}

/// Sets every logit but those of `allowed` to `-inf` (vLLM's `allowed_token_ids`).
fn keep_only(
    allowed: &[u32],
    logits: &mut [f32],
    kept: &mut Vec<f32>,
) -> Result<(), SamplingError> {
    let vocab_size = logits.len();
    kept.clear();
    for &token in allowed {
        let logit = logits
            .get(token as usize)
            .ok_or(SamplingError::TokenOutOfRange { token, vocab_size })?;
        kept.push(*logit);
    }
    logits.fill(f32::NEG_INFINITY);
    for (&token, &logit) in allowed.iter().zip(kept.iter()) {
        logits[token as usize] = logit;
    }
    Ok(())
}

/// The tokens `bad_words` bans after `generated`: each word's last token where the generated
/// tokens end with the word's others (vLLM's rule; a one-token word is banned everywhere).
fn banned_by_bad_words<'a>(
    bad_words: &'a [Vec<u32>],
    generated: &'a [u32],
) -> impl Iterator<Item = u32> + 'a {
    bad_words.iter().filter_map(move |word| {
        let (&last, before) = word.split_last()?;
        generated.ends_with(before).then_some(last)
    })
}

/// Sets the logits of the tokens [`banned_by_bad_words`] names to `-inf`; whether it named
/// any.
fn ban_bad_words(
    bad_words: &[Vec<u32>],
    generated: &[u32],
    logits: &mut [f32],
) -> Result<bool, SamplingError> {
    let vocab_size = logits.len();
    let mut banned = false;
    for token in banned_by_bad_words(bad_words, generated) {
        *logits
            .get_mut(token as usize)
            .ok_or(SamplingError::TokenOutOfRange { token, vocab_size })? = f32::NEG_INFINITY;
        banned = true;
    }
    Ok(banned)
}

fn check_finite(logits: &[f32]) -> Result<(), SamplingError> {
    let is_bad = |l: &f32| l.is_nan() || *l == f32::INFINITY;
    match logits.iter().position(is_bad) {
        None => Ok(()),
        Some(first) => Err(SamplingError::NonFiniteLogits {
            count: logits.iter().filter(|l| is_bad(l)).count(),
            first_token: first as u32,
        }),
    }
}

/// What one row of prompt logprobs reports: the model's distribution at temperature 1, no
/// penalties or bias.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Of the row's target token; NaN when the row's logits were not finite.
    pub logprob: f32,
    /// The target's rank in the row: 1 + the tokens with a larger logit (vLLM's `rank`);
    /// 0 when the row's logits were not finite.
    pub rank: u32,
    /// The `top_k` best tokens, best first (ties to the lower id).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The log-probability of `target` in a raw logits row (the model's distribution: temperature
/// 1, no penalties, bias or truncation) and the row's `top_k` best tokens, as the sampler
/// reports a generated token's (same normalizer, same ranking): what a prompt position
/// reports. A row with NaN or `+inf` logits gives a NaN logprob and no alternatives.
pub fn token_logprob(row: &[f32], target: u32, top_k: usize) -> TokenLogprob {
    let invalid = TokenLogprob {
        logprob: f32::NAN,
        rank: 0,
        top_logprobs: Vec::new(),
    };
    let Ok(max_logit) = max_finite(row) else {
        return invalid;
    };
    let Some(&logit) = row.get(target as usize) else {
        return invalid;
    };
    let log_normalizer = logprobs::log_normalizer(row, max_logit);
    TokenLogprob {
        logprob: logprobs::logprob(logit, log_normalizer),
        rank: 1 + row.iter().filter(|&&l| l > logit).count() as u32,
        top_logprobs: logprobs::top_n(row, top_k, log_normalizer),
    }
}

/// The largest logit, or [`SamplingError::NonFiniteLogits`]. Eight independent lanes with
/// plain comparisons, so the loop vectorizes (`f32::max` and early exits do not).
fn max_finite(logits: &[f32]) -> Result<f32, SamplingError> {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut bad = [false; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((lane, flag), &v) in lanes.iter_mut().zip(&mut bad).zip(chunk) {
            *flag |= v.is_nan() || v == f32::INFINITY;
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut any_bad = bad.iter().any(|&b| b);
    for &v in lanes.iter().chain(tail) {
        any_bad |= v.is_nan() || v == f32::INFINITY;
        if v > max {
            max = v;
        }
    }
    if any_bad {
        check_finite(logits)?;
    }
    Ok(max)
}

/// Index of the largest logit, the lowest index among equals. `max` is that largest value.
fn argmax(logits: &[f32], max: f32) -> u32 {
    logits
        .iter()
        .position(|&l| l == max)
        .expect("max was taken over these logits") as u32
}

/// Top-k at or below this uses one pass with a small sorted buffer instead of
/// `select_nth_unstable` over the whole vocabulary.
const SMALL_TOP_K: usize = 128;

/// A candidate token: its (penalised) logit and id.
type Candidate = (f32, u32);

/// Higher logit first, equal logits by lower id (as [`logprobs::rank`]).
fn rank_candidates(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Temperature, then top-k, top-p, min-p, then one draw with `u`. `max_logit` is finite.
fn sample_truncated(params: &SamplingParams, logits: &[f32], max_logit: f32, u: f64) -> u32 {
    let temperature = params.temperature;
    // Divide rather than multiply by 1/T: for a tiny T, 1/T is +inf and 0 * inf is NaN, while
    // 0 / T is 0 (the top token keeps weight 1) and negative / T is -inf (weight 0).
    let weight = |logit: f32| fast_exp::exp((logit - max_logit) / temperature);
    let vocab_size = logits.len();
    let top_k = params.top_k_of(vocab_size);
    if top_k == vocab_size && params.top_p >= 1.0 && params.min_p <= 0.0 {
        let mut weights = vec![0f32; vocab_size];
        fast_exp::exp_into(logits, &mut weights, max_logit, temperature);
        let total = fast_exp::sum(&weights);
        let weighted = weights.iter().enumerate().map(|(id, &w)| (id as u32, w));
        return draw(u, total, weighted);
    }

    // Top-p alone: a language model's nucleus is usually a handful of tokens, so first try
    // the best NUCLEUS_HEAD found in one pass; only when they do not hold the mass is the
    // vocabulary partially sorted. Both paths walk the same ranking with the same threshold,
    // so they keep the same set.
    let nucleus_head = (params.top_p < 1.0 && top_k == vocab_size)
        .then(|| {
            let threshold = nucleus_threshold(
                params.top_p,
                fast_exp::sum_exp(logits, max_logit, temperature),
            );
            let mut head = top_candidates(logits, NUCLEUS_HEAD.min(vocab_size));
            let mut mass = 0.0;
            let kept = head.iter().position(|c| {
                mass += f64::from(weight(c.0));
                mass >= threshold
            })?;
            head.truncate(kept + 1);
            Some(head)
        })
        .flatten();

    let mut candidates = match nucleus_head {
        Some(head) => head,
        None => {
            // Candidates with a finite logit; sorted by rank when top-k ran.
            let (mut candidates, sorted) = if top_k <= SMALL_TOP_K {
                (top_candidates(logits, top_k), true)
            } else {
                let mut all: Vec<Candidate> = logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| **l > f32::NEG_INFINITY)
                    .map(|(id, &l)| (l, id as u32))
                    .collect();
                if top_k < all.len() {
                    all.select_nth_unstable_by(top_k - 1, rank_candidates);
                    all.truncate(top_k);
                }
                // A top-k draws in rank order even when it keeps every finite logit (as the
                // small top-k above does, and the device's draw); only min-p alone keeps id
                // order.
                let ranked = top_k < vocab_size;
                if ranked {
                    all.sort_unstable_by(rank_candidates);
                }
                (all, ranked)
            };
            if params.top_p < 1.0 {
                // Without top-k the candidates are every finite logit: the vectorized sum over the
                // row is the same mass (-inf contributes 0).
                let kept_mass = if sorted {
                    sum_weights(&candidates, weight)
                } else {
                    fast_exp::sum_exp(logits, max_logit, temperature)
                };
                let threshold = nucleus_threshold(params.top_p, kept_mass);
                let kept = smallest_prefix_reaching(&mut candidates, sorted, threshold, weight);
                candidates.truncate(kept);
            }
            candidates
        }
    };
    if params.min_p > 0.0 {
        // The top token has weight exp(0) = 1, so the rule `weight >= min_p` is, in logit
        // space, `logit >= max + T ln(min_p)`: a comparison instead of an exp per token.
        let min_logit = max_logit + min_p_logit_offset(temperature, params.min_p);
        candidates.retain(|&(logit, _)| logit >= min_logit);
    }
    let total = sum_weights(&candidates, weight);
    draw(u, total, candidates.iter().map(|&(l, id)| (id, weight(l))))
}

/// How far below the top logit min-p keeps tokens, `T ln(min_p)`: one computation for the
/// host's filter and the device's (`sampler::device::Truncation`), so both keep the same logits.
fn min_p_logit_offset(temperature: f32, min_p: f32) -> f32 {
    temperature * min_p.ln()
}

/// How many best tokens the top-p fast path looks at before sorting more of the vocabulary.
const NUCLEUS_HEAD: usize = 64;

/// The mass a top-p prefix must reach. A prefix whose mass equals `top_p` up to rounding
/// counts as reaching it: at an exact boundary Hugging Face keeps the smaller set, and f32
/// weights should not flip that.
fn nucleus_threshold(top_p: f32, kept_mass: f64) -> f64 {
    f64::from(top_p) * kept_mass * (1.0 - 1e-6)
}

/// The `k` best-ranked finite logits, sorted, in one pass over the vocabulary: a token is
/// compared with the current k-th best and only inserted when it beats it.
fn top_candidates(logits: &[f32], k: usize) -> Vec<Candidate> {
    let mut best: Vec<Candidate> = Vec::with_capacity(k + 1);
    // Ids arrive in increasing order, so once the buffer is full a token beats the k-th
    // best exactly when its logit is strictly greater: one float comparison per token.
    let mut floor = f32::NEG_INFINITY;
    for (id, &logit) in logits.iter().enumerate() {
        if logit <= floor {
            continue;
        }
        let candidate = (logit, id as u32);
        let at =
            best.partition_point(|b| rank_candidates(b, &candidate) == std::cmp::Ordering::Less);
        best.insert(at, candidate);
        if best.len() >= k {
            best.truncate(k);
            floor = best[k - 1].0;
        }
    }
    best
}

/// Sum of the candidates' weights in eight lanes (vectorizable, deterministic).
fn sum_weights(candidates: &[Candidate], weight: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = candidates.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|c| f64::from(weight(c.0)))
        .sum();
    for chunk in chunks {
        for (lane, c) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(weight(c.0));
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Length of the smallest best-ranked prefix whose weight reaches `threshold`, sorting
/// `candidates` only as far as needed: the sorted prefix grows 64, 256, 1024, … by selecting
/// the next best among the rest, so a peaked distribution sorts a few dozen tokens, not the
/// vocabulary.
fn smallest_prefix_reaching(
    candidates: &mut [Candidate],
    already_sorted: bool,
    threshold: f64,
    weight: impl Fn(f32) -> f32,
) -> usize {
    let len = candidates.len();
    let mut counted = 0;
    let mut mass = 0.0;
    let mut size = if already_sorted { len } else { 64.min(len) };
    loop {
        if !already_sorted {
            // The first `counted` are the best, in order; find and sort the next ones.
            let rest = &mut candidates[counted..];
            let wanted = size - counted;
            if wanted < rest.len() {
                rest.select_nth_unstable_by(wanted - 1, rank_candidates);
            }
            rest[..wanted].sort_unstable_by(rank_candidates);
        }
        for (i, candidate) in candidates.iter().enumerate().take(size).skip(counted) {
            mass += f64::from(weight(candidate.0));
            if mass >= threshold {
                return i + 1;
            }
        }
        if size == len {
            // Rounding kept the total just under the threshold: keep everything.
            return len;
        }
        counted = size;
        size = (size * 4).min(len);
    }
}

/// Walks `weighted` in order and returns the token where the cumulative weight passes
/// `u * total`.
fn draw(u: f64, total: f64, weighted: impl Iterator<Item = (u32, f32)>) -> u32 {
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for (id, w) in weighted {
        if w > 0.0 {
            cumulative += f64::from(w);
            last_positive = Some(id);
            if target < cumulative {
                return id;
            }
        }
    }
    // Only reached when rounding left the walk's sum just under `u * total`.
    last_positive.expect("the top-ranked token is always a candidate, with weight exp(0) = 1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("test parameters are valid")
    }

    fn seeded(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..Default::default()
        }
    }

    /// A deterministic, irregular logit row of `n` entries.
    fn logits_row(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(salt.wrapping_mul(40_503))
                    >> 8;
                (x % 10_000) as f32 / 1_000.0 - 5.0
            })
            .collect()
    }

    fn sample_once(s: &mut Sampler, logits: &[f32], generated: &[u32]) -> SampledToken {
        s.sample(&mut logits.to_vec(), generated, generated)
            .expect("logits are valid")
    }

    #[test]
    fn greedy_picks_argmax_with_ties_to_lowest_id() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(sample_once(&mut s, &[0.1, 2.0, -1.0, 1.9], &[]).id, 1);
        assert_eq!(sample_once(&mut s, &[0.1, 3.0, 3.0, 3.0], &[]).id, 1);
        assert_eq!(
            sample_once(&mut s, &[f32::NEG_INFINITY, -7.0, -9.0], &[]).id,
            1
        );
    }

    #[test]
    fn same_seed_same_tokens_and_stream_depends_only_on_position() {
        let rows: Vec<Vec<f32>> = (0..32).map(|i| logits_row(1000, i)).collect();
        let run = |seed: u64| {
            let mut s = sampler(seeded(1.0, seed));
            let mut generated = Vec::new();
            for row in &rows {
                let t = sample_once(&mut s, row, &generated);
                generated.push(t.id);
            }
            generated
        };
        assert_eq!(run(7), run(7));
        assert_ne!(
            run(7),
            run(8),
            "different seeds should differ over 32 draws"
        );

        // A fresh sampler (another worker) continuing at position 5 draws what the first would.
        let first = run(7);
        let mut other = sampler(seeded(1.0, 7));
        let t = sample_once(&mut other, &rows[5], &first[..5]);
        assert_eq!(t.id, first[5]);
    }

    #[test]
    fn unseeded_sampler_reports_a_seed_that_reproduces_it() {
        let row = logits_row(500, 3);
        let mut a = sampler(SamplingParams::default());
        let mut b = sampler(seeded(1.0, a.seed()));
        let mut generated = Vec::new();
        for _ in 0..16 {
            let ta = sample_once(&mut a, &row, &generated);
            assert_eq!(ta, sample_once(&mut b, &row, &generated));
            generated.push(ta.id);
        }
    }

    #[test]
    fn tiny_temperature_is_greedy() {
        for salt in 0..20 {
            let mut row = logits_row(5000, salt);
            // Make the maximum unique: tied maxima are (correctly) sampled uniformly.
            let greedy = argmax(&row, row.iter().copied().fold(f32::MIN, f32::max));
            row[greedy as usize] += 0.01;
            for t in [1e-6f32, 1e-30, f32::MIN_POSITIVE / 4.0] {
                let mut s = sampler(seeded(t, u64::from(salt)));
                assert_eq!(sample_once(&mut s, &row, &[]).id, greedy, "T={t}");
            }
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        for salt in 0..20 {
            let row = logits_row(5000, salt);
            let mut params = seeded(1.5, u64::from(salt));
            params.top_k = Some(1);
            let mut s = sampler(params);
            assert_eq!(
                sample_once(&mut s, &row, &[]).id,
                argmax(&row, row.iter().copied().fold(f32::MIN, f32::max))
            );
        }
    }

    #[test]
    fn top_k_only_draws_from_the_k_best() {
        let row = logits_row(3000, 1);
        let mut ranked: Vec<u32> = (0..row.len() as u32).collect();
        ranked.sort_by(|a, b| logprobs::rank(&row, *a, *b));
        let allowed = &ranked[..5];
        let mut params = seeded(5.0, 1);
        params.top_k = Some(5);
        let mut s = sampler(params);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..400u32 {
            let generated = vec![0; step as usize];
            let id = sample_once(&mut s, &row, &generated).id;
            assert!(allowed.contains(&id), "{id} is not in the top 5");
            seen.insert(id);
        }
        assert_eq!(
            seen.len(),
            5,
            "a high temperature should reach all 5: {seen:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (ids scrambled).
        let probs = [0.15f32, 0.5, 0.05, 0.3];
        let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let reached = |top_p: f32| {
            let mut params = seeded(1.0, 11);
            params.top_p = top_p;
            let mut s = sampler(params);
            let mut seen = std::collections::BTreeSet::new();
            for step in 0..300 {
                seen.insert(sample_once(&mut s, &row, &vec![0; step]).id);
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(reached(0.4), vec![1]);
        assert_eq!(reached(0.5), vec![1]);
        assert_eq!(reached(0.7), vec![1, 3]);
        assert_eq!(reached(0.9), vec![0, 1, 3]);
        assert_eq!(reached(1.0), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_on_a_large_flat_vocabulary_grows_the_sorted_prefix() {
        // 10_000 equal logits: top_p = 0.5 must keep exactly the 5_000 lowest ids.
        let mut candidates: Vec<Candidate> = (0..10_000).rev().map(|id| (0.0, id)).collect();
        let kept = smallest_prefix_reaching(&mut candidates, false, 5_000.0, |_| 1.0);
        assert_eq!(kept, 5_000);
        let mut kept_ids: Vec<u32> = candidates[..kept].iter().map(|c| c.1).collect();
        kept_ids.sort_unstable();
        assert_eq!(kept_ids, (0..5_000).collect::<Vec<u32>>());
    }

    #[test]
    fn top_p_matches_a_full_sort_reference() {
        // Small nuclei (the one-pass head) and large ones (partial sorts) alike.
        for (temperature, top_p) in [(0.3f32, 0.8f32), (1.0, 0.5), (3.0, 0.9), (3.0, 0.3)] {
            let row = logits_row(3000, 17);
            let mut ranked: Vec<u32> = (0..row.len() as u32).collect();
            ranked.sort_by(|a, b| logprobs::rank(&row, *a, *b));
            let weights: Vec<f64> = ranked
                .iter()
                .map(|&id| ((f64::from(row[id as usize]) - 4.999) / f64::from(temperature)).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut mass = 0.0;
            let size = 1 + weights
                .iter()
                .position(|w| {
                    mass += w;
                    mass >= f64::from(top_p) * total
                })
                .unwrap();
            let nucleus: std::collections::BTreeSet<u32> = ranked[..size].iter().copied().collect();

            let mut params = seeded(temperature, 99);
            params.top_p = top_p;
            let mut s = sampler(params);
            for step in 0..300 {
                let id = sample_once(&mut s, &row, &vec![0; step]).id;
                assert!(
                    nucleus.contains(&id),
                    "T={temperature} top_p={top_p}: {id} is outside the {size}-token nucleus"
                );
            }
            if temperature == 3.0 && top_p == 0.9 {
                assert!(
                    size > NUCLEUS_HEAD,
                    "this case should need more than the head"
                );
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_fraction_of_the_top() {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let mut params = seeded(1.0, 5);
        params.min_p = 0.25; // keeps p >= 0.125
        let mut s = sampler(params);
        for step in 0..300 {
            let id = sample_once(&mut s, &row, &vec![0; step]).id;
            assert!(id <= 2, "token {id} is below min_p");
        }
    }

    #[test]
    fn min_tokens_holds_the_stop_tokens_back_until_reached() {
        // Token 0 is the top token and a stop token; 2 is the next best.
        let row = [3.0f32, 1.0, 2.0, 0.5];
        let mut params = SamplingParams::greedy();
        params.min_tokens = 2;
        params.logprobs = Some(2);
        let mut s = sampler(params);
        s.set_stop_tokens(&[0, 3]);
        for step in 0..2 {
            let mut logits = row.to_vec();
            let token = s.sample(&mut logits, &[], &vec![1; step]).unwrap();
            assert_eq!(
                token.id, 2,
                "step {step} draws the best token that is no stop"
            );
            // The held tokens leave the reported distribution, as logit_bias would.
            assert!(token.top_logprobs.iter().all(|&(id, _)| id != 0 && id != 3));
            assert_eq!(
                s.device_request(&vec![1; step], 4),
                None,
                "the row is rewritten"
            );
        }
        assert_eq!(
            sample_once(&mut s, &row, &[1, 1]).id,
            0,
            "reached: stops again"
        );
        assert!(s.device_request(&[1, 1], 4).is_some());

        // Sampled draws never land on a stop token before min_tokens either.
        let mut params = seeded(2.0, 9);
        params.min_tokens = 50;
        let mut s = sampler(params);
        s.set_stop_tokens(&[0]);
        for step in 0..50 {
            assert_ne!(sample_once(&mut s, &row, &vec![1; step]).id, 0);
        }

        // A row where only stop tokens remain (a grammar's end) is left as it is.
        let mut only_stops = [f32::NEG_INFINITY; 4];
        only_stops[3] = 0.0;
        let mut params = SamplingParams::greedy();
        params.min_tokens = 5;
        let mut s = sampler(params);
        s.set_stop_tokens(&[3]);
        assert_eq!(s.sample(&mut only_stops, &[], &[]).unwrap().id, 3);

        // Without min_tokens the stop tokens are not kept at all.
        let mut s = sampler(SamplingParams::greedy());
        s.set_stop_tokens(&[0]);
        assert_eq!(sample_once(&mut s, &row, &[]).id, 0);
        assert!(s.device_request(&[], 4).is_some());
    }

    #[test]
    fn a_prompt_tokens_logprob_has_its_rank() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let ranks: Vec<u32> = (0..5).map(|t| token_logprob(&row, t, 2).rank).collect();
        // Ties share a rank: 1 + the logits strictly above.
        assert_eq!(ranks, [4, 1, 3, 1, 5]);
        let best = token_logprob(&row, 2, 2);
        assert_eq!(
            best.top_logprobs
                .iter()
                .map(|&(id, _)| id)
                .collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(
            token_logprob(&[f32::NAN, 1.0], 1, 1).rank,
            0,
            "an invalid row"
        );
    }

    #[test]
    fn allowed_token_ids_keep_only_their_logits() {
        let row = [3.0f32, 1.0, 2.0, 0.5, 2.5];
        let mut params = SamplingParams::greedy();
        params.allowed_token_ids = vec![1, 3];
        params.logprobs = Some(5);
        let mut s = sampler(params);
        let token = sample_once(&mut s, &row, &[]);
        assert_eq!(token.id, 1, "the best allowed token");
        // The others leave the reported distribution: two tokens share it.
        let reported: Vec<u32> = token.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(reported[..2], [1, 3]);
        assert!(
            token.top_logprobs[2..]
                .iter()
                .all(|&(_, l)| l == f32::NEG_INFINITY)
        );
        assert_eq!(
            s.device_request(&[], 5),
            None,
            "the row is rewritten on the host"
        );
        let mut params = seeded(2.0, 3);
        params.allowed_token_ids = vec![4];
        let mut s = sampler(params);
        for step in 0..20 {
            assert_eq!(sample_once(&mut s, &row, &vec![0; step]).id, 4);
        }
        let mut params = SamplingParams::greedy();
        params.allowed_token_ids = vec![9];
        assert!(matches!(
            sampler(params).sample(&mut row.to_vec(), &[], &[]),
            Err(SamplingError::TokenOutOfRange { token: 9, .. })
        ));
        // Allowed tokens a grammar has masked: the request's error, naming the field.
        let mut params = SamplingParams::greedy();
        params.allowed_token_ids = vec![1];
        let mut masked = row.to_vec();
        masked[1] = f32::NEG_INFINITY;
        assert!(matches!(
            sampler(params).sample(&mut masked, &[], &[]),
            Err(SamplingError::Unsatisfiable {
                param: "allowed_token_ids"
            })
        ));
    }

    #[test]
    fn bad_words_ban_their_last_token_where_the_rest_was_generated() {
        let row = [3.0f32, 1.0, 2.0, 0.5, 2.5];
        let mut params = SamplingParams::greedy();
        // Token 0 alone; 4 after 2 then 1; 2 after 3.
        params.bad_words = vec![vec![0], vec![2, 1, 4], vec![3, 2]];
        params.logprobs = Some(5);
        let mut s = sampler(params);
        let first = sample_once(&mut s, &row, &[]);
        assert_eq!(first.id, 4, "0 is banned everywhere: the next best");
        assert!(
            first
                .top_logprobs
                .iter()
                .any(|&(id, l)| id == 0 && l == f32::NEG_INFINITY),
            "a banned token leaves the reported distribution"
        );
        assert_eq!(
            s.device_request(&[], 5),
            None,
            "a word that applies rewrites the row on the host"
        );
        assert_eq!(
            sample_once(&mut s, &row, &[2, 1]).id,
            2,
            "4 would finish `2 1 4`"
        );
        assert_eq!(
            sample_once(&mut s, &row, &[1]).id,
            4,
            "a partial prefix bans nothing but token 0"
        );
        assert_eq!(sample_once(&mut s, &row, &[3]).id, 4);

        // Words whose last token cannot follow leave the row to the device.
        let mut params = SamplingParams::greedy();
        params.bad_words = vec![vec![2, 1, 4]];
        let mut s = sampler(params);
        assert!(s.device_request(&[], 5).is_some());
        assert!(s.device_request(&[7, 2], 5).is_some());
        assert_eq!(s.device_request(&[7, 2, 1], 5), None);

        let mut params = SamplingParams::greedy();
        params.bad_words = vec![vec![9]];
        assert!(matches!(
            sampler(params).sample(&mut row.to_vec(), &[], &[]),
            Err(SamplingError::TokenOutOfRange { token: 9, .. })
        ));
        // Banning every token the request allows is the request's error, naming the field.
        let mut params = SamplingParams::greedy();
        params.allowed_token_ids = vec![1, 3];
        params.bad_words = vec![vec![1], vec![2, 3]];
        let mut s = sampler(params);
        assert_eq!(sample_once(&mut s, &row, &[]).id, 3);
        assert!(matches!(
            s.sample(&mut row.to_vec(), &[], &[2]),
            Err(SamplingError::Unsatisfiable { param: "bad_words" })
        ));
        let mut params = SamplingParams::greedy();
        params.bad_words = vec![vec![1], vec![]];
        assert!(matches!(
            Sampler::new(params),
            Err(SamplingError::InvalidParam {
                name: "bad_words",
                ..
            })
        ));
    }

    #[test]
    fn penalties_change_the_argmax() {
        let row = [2.0f32, 1.8, 0.5, 1.0];
        let mut params = SamplingParams::greedy();
        params.repetition_penalty = 1.5; // 2.0 / 1.5 = 1.33 < 1.8
        let mut s = sampler(params);
        assert_eq!(sample_once(&mut s, &row, &[]).id, 0);
        assert_eq!(s.sample(&mut row.to_vec(), &[0], &[]).unwrap().id, 1);

        let mut params = SamplingParams::greedy();
        params.frequency_penalty = 0.15;
        let mut s = sampler(params);
        // Token 0 generated twice: 2.0 - 0.3 = 1.7 < 1.8. Only in the prompt: no effect.
        assert_eq!(s.sample(&mut row.to_vec(), &[0, 0], &[]).unwrap().id, 0);
        assert_eq!(s.sample(&mut row.to_vec(), &[0, 0], &[0, 0]).unwrap().id, 1);

        let mut params = SamplingParams::greedy();
        params.presence_penalty = 0.3;
        let mut s = sampler(params);
        assert_eq!(s.sample(&mut row.to_vec(), &[0], &[0]).unwrap().id, 1);
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let row = [1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5];
        let temperature = 0.8f32;
        let weights: Vec<f64> = row
            .iter()
            .map(|&l| (f64::from(l) / f64::from(temperature)).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let expected: Vec<f64> = weights.iter().map(|w| w / total).collect();

        let draws = 40_000usize;
        let mut counts = [0usize; 6];
        let mut s = sampler(seeded(temperature, 1234));
        let generated: Vec<u32> = vec![0; draws];
        for step in 0..draws {
            counts[sample_once(&mut s, &row, &generated[..step]).id as usize] += 1;
        }
        for (id, (&c, &p)) in counts.iter().zip(&expected).enumerate() {
            let observed = c as f64 / draws as f64;
            // 5 standard deviations of a binomial proportion: fails by chance ~1e-6.
            let tolerance = 5.0 * (p * (1.0 - p) / draws as f64).sqrt();
            assert!(
                (observed - p).abs() < tolerance,
                "token {id}: observed {observed:.4}, softmax {p:.4}, tolerance {tolerance:.4}"
            );
        }
    }

    #[test]
    fn logprobs_are_normalised_and_ignore_temperature_and_truncation() {
        let row = logits_row(200, 9);
        let mut params = seeded(0.7, 3);
        params.top_k = Some(3);
        params.top_p = 0.9;
        params.logprobs = Some(200);
        let mut s = sampler(params);
        let t = sample_once(&mut s, &row, &[]);
        let total: f64 = t
            .top_logprobs
            .iter()
            .map(|(_, lp)| f64::from(*lp).exp())
            .sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "full-vocabulary probabilities sum to {total}"
        );
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        let reported = t.top_logprobs.iter().find(|(id, _)| *id == t.id).unwrap().1;
        assert_eq!(t.logprob, reported);

        // Greedy with the same logits reports the same values.
        let mut greedy = SamplingParams::greedy();
        greedy.logprobs = Some(5);
        let g = sample_once(&mut sampler(greedy), &row, &[]);
        assert_eq!(g.top_logprobs[..], t.top_logprobs[..5]);
        assert_eq!(g.id, t.top_logprobs[0].0);
        assert!(
            sample_once(&mut sampler(SamplingParams::greedy()), &row, &[])
                .top_logprobs
                .is_empty()
        );
    }

    #[test]
    fn logprobs_reflect_penalties() {
        let row = [1.0f32, 1.0];
        let mut params = SamplingParams::greedy();
        params.presence_penalty = 1.0;
        params.logprobs = Some(2);
        let t = sampler(params)
            .sample(&mut row.to_vec(), &[0], &[0])
            .unwrap();
        assert_eq!(t.id, 1);
        let expected = -(1.0f64 + (-1.0f64).exp()).ln() as f32;
        assert!((t.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn nan_and_inf_logits_are_errors_and_neg_inf_masks() {
        let mut s = sampler(seeded(1.0, 0));
        let err = s
            .sample(&mut [0.0, f32::NAN, f32::INFINITY], &[], &[])
            .unwrap_err();
        assert!(matches!(
            err,
            SamplingError::NonFiniteLogits {
                count: 2,
                first_token: 1
            }
        ));
        let err = s.sample(&mut [f32::NEG_INFINITY; 3], &[], &[]).unwrap_err();
        assert!(matches!(err, SamplingError::NoCandidates));
        assert!(matches!(
            s.sample(&mut [], &[], &[]),
            Err(SamplingError::NoCandidates)
        ));
        for step in 0..100 {
            let t = s
                .sample(
                    &mut [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0],
                    &[],
                    &vec![0; step],
                )
                .unwrap();
            assert!(t.id == 1 || t.id == 3);
        }
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens_and_shows_in_logprobs() {
        let row = [2.0f32, 1.0, 0.5, 0.0];
        let mut params = SamplingParams::greedy();
        params.logit_bias = vec![(0, -100.0)];
        params.logprobs = Some(4);
        let t = sample_once(&mut sampler(params.clone()), &row, &[]);
        assert_eq!(t.id, 1, "the greedy pick is banned");
        assert!(t.top_logprobs.iter().all(|&(id, lp)| id != 0 || lp < -90.0));
        params.logit_bias = vec![(3, 100.0)];
        assert_eq!(sample_once(&mut sampler(params.clone()), &row, &[]).id, 3);
        // Sampled at any temperature, a +100 token is drawn every time.
        params.temperature = 1.0;
        params.seed = Some(1);
        let mut s = sampler(params.clone());
        for step in 0..50 {
            assert_eq!(sample_once(&mut s, &row, &vec![0; step]).id, 3);
        }
        params.logit_bias = vec![(4, 1.0)];
        assert!(matches!(
            sampler(params).sample(&mut row.to_vec(), &[], &[]),
            Err(SamplingError::TokenOutOfRange { token: 4, .. })
        ));
    }

    #[test]
    fn invalid_params_are_refused_at_construction() {
        let params = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            Sampler::new(params),
            Err(SamplingError::InvalidParam { name: "top_p", .. })
        ));
    }
}
