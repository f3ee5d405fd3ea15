//! Requests with `n` > 1: one job per choice, all on one generation worker.
//!
//! Each choice is a [`Generation`] of its own (its own job id `{request_id}-c{index}`, stream
//! subject, cancel, migration and stream numbering), so everything that keeps one request
//! whole keeps each choice whole. The jobs carry [`SampleGroup`] so that the worker prefills
//! the prompt once and the choices share its KV blocks; they are routed together
//! ([`crate::router::WorkerRegistry::route_samples`]) and sent at once.
//!
//! Seeds: choice `i` of a request with seed `s` samples with [`choice_seed`]`(s, i)`, so the
//! same request twice gives the same `n` choices, and choice 0 is what the request with
//! `n` = 1 gives. Without a seed each job draws its own (the worker picks one per job), so the
//! choices differ.

use std::time::Instant;

use futures::future::try_join_all;
use tandem_protocol::messages::{SampleGroup, Usage};

use super::{Completed, Dispatch, Generation, JobSpec, RequestRecord, no_route_error};
use crate::error::ApiError;

/// The seed of choice `index` of a request seeded with `seed`: `seed` itself for the first
/// choice, a SplitMix64 mix of both for the others (distinct streams for distinct choices).
pub fn choice_seed(seed: u64, index: u32) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The job id of choice `index` of `request_id`.
pub fn choice_job_id(request_id: &str, index: u32) -> String {
    format!("{request_id}-c{index}")
}

/// Routes the `n` choices of one request to one generation worker and starts them all;
/// `record` counts the request (on the first choice). Fails as a whole: if one choice cannot
/// start, the others are dropped, which cancels them.
pub async fn start_choices(
    dispatch: Dispatch<'_>,
    request_id: &str,
    job: JobSpec,
    n: u32,
    mut record: RequestRecord,
) -> Result<Vec<Generation>, ApiError> {
    let route = dispatch
        .registry
        .route_samples(n, job.lora.as_deref(), Instant::now())
        .map_err(|no_route| {
            let err = no_route_error(no_route);
            record.fail(&err);
            err
        })?;
    let extra: Vec<RequestRecord> = (1..n).map(|_| record.extra_choice()).collect();
    let records = std::iter::once(record).chain(extra);
    let starts = (0..n).zip(records).map(|(index, record)| {
        let mut sampling = job.sampling.clone();
        sampling.seed = sampling.seed.map(|seed| choice_seed(seed, index));
        let spec = JobSpec {
            prompt_ids: job.prompt_ids.clone(),
            sampling,
            stop: job.stop.clone(),
            prompt_param: job.prompt_param,
            samples: Some(SampleGroup {
                group_id: request_id.to_owned(),
                index,
                n,
            }),
            cache_salt: job.cache_salt.clone(),
            priority: job.priority,
            prediction_ids: job.prediction_ids.clone(),
            embedding: job.embedding,
            lora: job.lora.clone(),
        };
        Generation::start_on(
            dispatch,
            route.clone(),
            choice_job_id(request_id, index),
            spec,
            record,
        )
    });
    try_join_all(starts).await
}

/// The `n` best of `best_of` candidates (`/v1/completions`' `best_of`), best first: OpenAI's
/// rule, "the highest log probability per token", i.e. the highest mean of the generated
/// tokens' logprobs (vLLM ranked by the sum, which favours short candidates; its V1 engine
/// dropped `best_of`). A candidate without tokens scores 0; ties keep the earlier candidate.
/// Each candidate's tokens must carry their logprobs (the jobs ask for them).
pub fn best_of(candidates: Vec<Completed>, n: usize) -> Vec<Completed> {
    let mut scored: Vec<(f64, Completed)> = candidates
        .into_iter()
        .map(|candidate| (mean_logprob(&candidate), candidate))
        .collect();
    // Stable: equal scores keep candidate order.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(n).map(|(_, c)| c).collect()
}

/// The mean logprob of a candidate's generated tokens (0 without tokens).
pub fn mean_logprob(candidate: &Completed) -> f64 {
    let logprobs: Vec<f64> = candidate
        .tokens
        .iter()
        .filter_map(|t| t.logprob.map(f64::from))
        .collect();
    if logprobs.is_empty() {
        return 0.0;
    }
    logprobs.iter().sum::<f64>() / logprobs.len() as f64
}

/// The usage of a batch's choices, each tagged with the prompt it answers: each prompt's
/// [`total_usage`], added up.
pub fn batch_usage(choices: impl IntoIterator<Item = (usize, Usage)>) -> Usage {
    let mut by_prompt: std::collections::BTreeMap<usize, Vec<Usage>> = Default::default();
    for (prompt, usage) in choices {
        by_prompt.entry(prompt).or_default().push(usage);
    }
    by_prompt
        .into_values()
        .map(total_usage)
        .fold(Usage::default(), |sum, one| Usage {
            prompt_tokens: sum.prompt_tokens + one.prompt_tokens,
            completion_tokens: sum.completion_tokens + one.completion_tokens,
            cached_tokens: sum.cached_tokens + one.cached_tokens,
            accepted_prediction_tokens: sum.accepted_prediction_tokens
                + one.accepted_prediction_tokens,
            rejected_prediction_tokens: sum.rejected_prediction_tokens
                + one.rejected_prediction_tokens,
        })
}

/// The usage of a request's choices: the prompt once, every choice's completion tokens.
pub fn total_usage(usages: impl IntoIterator<Item = Usage>) -> Usage {
    usages
        .into_iter()
        .fold(None, |total: Option<Usage>, usage| {
            Some(match total {
                None => usage,
                Some(total) => Usage {
                    prompt_tokens: total.prompt_tokens,
                    completion_tokens: total.completion_tokens + usage.completion_tokens,
                    // The prompt is counted once, and so is what of it was cached.
                    cached_tokens: total.cached_tokens.max(usage.cached_tokens),
                    // Every choice drafts from the prediction on its own.
                    accepted_prediction_tokens: total.accepted_prediction_tokens
                        + usage.accepted_prediction_tokens,
                    rejected_prediction_tokens: total.rejected_prediction_tokens
                        + usage.rejected_prediction_tokens,
                },
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_choice_keeps_the_seed_and_the_others_get_distinct_ones() {
        assert_eq!(choice_seed(42, 0), 42);
        let seeds: std::collections::HashSet<u64> = (0..64).map(|i| choice_seed(42, i)).collect();
        assert_eq!(seeds.len(), 64);
        assert_eq!(choice_seed(42, 3), choice_seed(42, 3));
        assert_ne!(choice_seed(42, 1), choice_seed(43, 1));
        assert_eq!(choice_job_id("cmpl-9", 2), "cmpl-9-c2");
    }

    /// Each prompt of a batch is counted once, with its choices' completions; the prompts
    /// (and what of each was cached) add up.
    #[test]
    fn a_batch_counts_each_prompt_once() {
        let usage = |prompt_tokens, completion_tokens, cached_tokens| Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            ..Default::default()
        };
        assert_eq!(
            batch_usage([
                (0, usage(10, 3, 4)),
                (0, usage(10, 5, 4)),
                (1, usage(7, 2, 0)),
                (1, usage(7, 1, 0)),
            ]),
            usage(17, 11, 4)
        );
        assert_eq!(
            batch_usage([(0, usage(10, 3, 4)), (0, usage(10, 5, 4))]),
            total_usage([usage(10, 3, 4), usage(10, 5, 4)])
        );
    }

    #[test]
    fn best_of_keeps_the_highest_mean_logprob_per_token() {
        use tandem_protocol::messages::{FinishReason, TokenEvent};
        let candidate = |logprobs: &[f32]| Completed {
            prompt_logprobs: Vec::new(),
            tokens: logprobs
                .iter()
                .enumerate()
                .map(|(i, &logprob)| TokenEvent {
                    id: i as u32,
                    text: format!("{}", logprobs.len()),
                    logprob: Some(logprob),
                    top_logprobs: Vec::new(),
                })
                .collect(),
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: logprobs.len() as u32,
                cached_tokens: 0,
                ..Default::default()
            },
            embedding: None,
        };
        // Sums -3, -1.5, -4 (the sum would pick the second); means -1.5, -1.5, -0.8.
        let candidates = vec![
            candidate(&[-1.0, -2.0]),
            candidate(&[-1.5]),
            candidate(&[-0.5, -0.5, -1.0, -1.0, -1.0]),
        ];
        assert!((mean_logprob(&candidates[2]) + 0.8).abs() < 1e-9);
        let best = best_of(candidates.clone(), 1);
        assert_eq!(best, vec![candidates[2].clone()]);
        // Ties keep the earlier candidate; best first.
        let two = best_of(candidates.clone(), 2);
        assert_eq!(two, vec![candidates[2].clone(), candidates[0].clone()]);
        assert_eq!(best_of(candidates.clone(), 3).len(), 3);
    }

    #[test]
    fn usage_counts_the_prompt_once_and_every_completion() {
        let usage = |completion_tokens| Usage {
            prompt_tokens: 12,
            completion_tokens,
            cached_tokens: 8,
            ..Default::default()
        };
        assert_eq!(
            total_usage([usage(5), usage(7), usage(1)]),
            Usage {
                prompt_tokens: 12,
                completion_tokens: 13,
                cached_tokens: 8,
                ..Default::default()
            }
        );
    }
}
