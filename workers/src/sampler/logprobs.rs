//! Log-probabilities reported to the client: the log-softmax of the penalised logits, at
//! temperature 1 and before any truncation (see the module doc of [`super`] for why).

use std::cmp::Ordering;

/// `log(sum(exp(logits)))`, computed around the maximum so it neither overflows nor underflows.
/// `-inf` when every logit is `-inf`. Accumulates in f64 lanes so small terms of a large
/// vocabulary are not lost.
pub(super) fn log_normalizer(logits: &[f32], max_logit: f32) -> f64 {
    if max_logit == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    f64::from(max_logit) + super::fast_exp::sum_exp(logits, max_logit, 1.0).ln()
}

/// Ranks tokens by logit, higher first, equal logits by lower id: the one order used for
/// greedy ties, top-k, top-p and reported alternatives, so they always agree.
pub(super) fn rank(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// The `n` best-ranked tokens with their log-probabilities, best first. One pass over the
/// vocabulary keeping a small sorted buffer: O(V · n) worst case but O(V) in practice, with no
/// vocabulary-sized allocation (OpenAI caps `n` at 20).
pub(super) fn top_n(logits: &[f32], n: usize, log_normalizer: f64) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    let mut best: Vec<u32> = Vec::with_capacity(n + 1);
    if n > 0 {
        // Ids arrive in increasing order: once full, a token enters only with a logit
        // strictly above the n-th best's.
        let mut floor = None;
        for (id, &logit) in logits.iter().enumerate() {
            if floor.is_some_and(|floor| logit <= floor) {
                continue;
            }
            let id = id as u32;
            let at = best.partition_point(|&b| rank(logits, b, id) == Ordering::Less);
            best.insert(at, id);
            if best.len() >= n {
                best.truncate(n);
                floor = Some(logits[best[n - 1] as usize]);
            }
        }
    }
    best.into_iter()
        .map(|id| (id, logprob(logits[id as usize], log_normalizer)))
        .collect()
}

pub(super) fn logprob(logit: f32, log_normalizer: f64) -> f32 {
    (f64::from(logit) - log_normalizer) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_normalise() {
        let logits = [1.0f32, 2.0, 3.0, -1.0, 0.5];
        let max = 3.0;
        let z = log_normalizer(&logits, max);
        let total: f64 = logits.iter().map(|&l| f64::from(logprob(l, z)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "probabilities sum to {total}");
        // Shift invariance: adding a constant to every logit changes nothing.
        let shifted: Vec<f32> = logits.iter().map(|l| l + 100.0).collect();
        let z_shifted = log_normalizer(&shifted, max + 100.0);
        for (a, b) in logits.iter().zip(&shifted) {
            assert!((logprob(*a, z) - logprob(*b, z_shifted)).abs() < 1e-5);
        }
    }

    #[test]
    fn top_n_is_sorted_with_ties_to_lowest_id() {
        let logits = [0.5f32, 2.0, 2.0, f32::NEG_INFINITY, 3.0, 0.1];
        let z = log_normalizer(&logits, 3.0);
        let ids: Vec<u32> = top_n(&logits, 4, z).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![4, 1, 2, 0]);
        assert_eq!(top_n(&logits, 10, z).len(), logits.len());
        assert!(top_n(&logits, 0, z).is_empty());
    }
}
