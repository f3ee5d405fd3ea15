//! A bus job in the engine's terms.
//!
//! The api-server validated every value before publishing (docs/protocol.md), so this is a
//! plain mapping; the engine still refuses what it cannot run (a prompt longer than its cache,
//! a token outside the vocabulary) with a `Finished` error the client sees.

use tandem_protocol::messages::{GenerateJob, SamplingSpec, StopSpec};

use crate::engine::GenerationRequest;
use crate::sampler::SamplingParams;

/// The engine request for `job`. `model_stop_ids` are the tokenizer's end-of-sequence ids
/// (the ones `worker generate` stops on); they are left out when the job sets `ignore_eos`.
pub fn generation_request(job: &GenerateJob, model_stop_ids: &[u32]) -> GenerationRequest {
    let mut stop_token_ids = if job.stop.ignore_eos {
        Vec::new()
    } else {
        model_stop_ids.to_vec()
    };
    for &id in &job.stop.token_ids {
        if !stop_token_ids.contains(&id) {
            stop_token_ids.push(id);
        }
    }
    GenerationRequest {
        prompt_ids: job.prompt_ids.clone(),
        sampling: sampling_params(&job.sampling, &job.stop),
        max_tokens: job.stop.max_tokens as usize,
        stop_token_ids,
        ignore_eos: job.stop.ignore_eos,
        stop_strings: job.stop.strings.clone(),
        include_stop_str_in_output: job.stop.include_stop_str_in_output,
        skip_special_tokens: job.stop.skip_special_tokens,
        prefill_only: false,
        deadline: job.deadline_unix_ms.map(instant_of_unix_ms),
        resume_ids: job.resume_ids.clone(),
        sample_group: job.samples.as_ref().map(|s| s.group_id.clone()),
        // Compiled by the role (`super::grammar`), off the bus loop.
        grammar: None,
        prompt_logprobs: job.sampling.prompt_logprobs,
        embedding: job.embedding,
        cache_salt: job.cache_salt.clone(),
        priority: job.priority,
        prediction: job.prediction_ids.clone(),
        // Resolved by the role from the job's `lora` name (`super::lora`).
        adapter: None,
    }
}

/// The wall clock in unix milliseconds (0 before 1970).
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The local instant of a wall-clock time in unix milliseconds (now, for one already past).
fn instant_of_unix_ms(unix_ms: u64) -> std::time::Instant {
    let ahead = unix_ms.saturating_sub(self::unix_ms());
    std::time::Instant::now() + std::time::Duration::from_millis(ahead)
}

fn sampling_params(spec: &SamplingSpec, stop: &StopSpec) -> SamplingParams {
    SamplingParams {
        temperature: spec.temperature,
        top_k: (spec.top_k > 0).then_some(spec.top_k),
        top_p: spec.top_p,
        min_p: spec.min_p,
        seed: spec.seed,
        repetition_penalty: spec.repetition_penalty,
        presence_penalty: spec.presence_penalty,
        frequency_penalty: spec.frequency_penalty,
        logprobs: spec.logprobs,
        logit_bias: spec.logit_bias.clone(),
        allowed_token_ids: spec.allowed_token_ids.clone(),
        bad_words: spec.bad_words.clone(),
        min_tokens: stop.min_tokens,
    }
}

#[cfg(test)]
mod tests {
    use tandem_protocol::messages::StopSpec;

    use super::*;

    fn job(stop: StopSpec, sampling: SamplingSpec) -> GenerateJob {
        GenerateJob {
            lora: None,
            request_id: "r".into(),
            prompt_ids: vec![1, 2, 3],
            sampling,
            stop,
            stream_subject: "s".into(),
            deadline_unix_ms: None,
            kv: None,
            kv_reader: None,
            resume_ids: Vec::new(),
            samples: None,
            cache_salt: None,
            priority: 0,
            prediction_ids: Vec::new(),
            embedding: false,
        }
    }

    #[test]
    fn stop_ids_are_the_models_plus_the_jobs_unless_eos_is_ignored() {
        let stop = StopSpec {
            max_tokens: 7,
            token_ids: vec![9, 2],
            strings: vec!["\n".into()],
            ignore_eos: false,
            ..StopSpec::default()
        };
        let request = generation_request(&job(stop.clone(), SamplingSpec::default()), &[2, 0]);
        assert_eq!(request.stop_token_ids, vec![2, 0, 9]);
        assert_eq!(request.max_tokens, 7);
        assert_eq!(request.stop_strings, vec!["\n".to_string()]);
        assert!(!request.prefill_only);
        assert_eq!(request.sample_group, None);
        let mut choice = job(stop.clone(), SamplingSpec::default());
        choice.samples = Some(tandem_protocol::messages::SampleGroup {
            group_id: "cmpl-1".into(),
            index: 1,
            n: 3,
        });
        let request = generation_request(&choice, &[2, 0]);
        assert_eq!(request.sample_group.as_deref(), Some("cmpl-1"));
        let ignoring = StopSpec {
            ignore_eos: true,
            ..stop
        };
        let request = generation_request(&job(ignoring, SamplingSpec::default()), &[2, 0]);
        assert_eq!(request.stop_token_ids, vec![9, 2]);
        assert!(request.ignore_eos);
    }

    #[test]
    fn the_jobs_cache_salt_reaches_the_engine() {
        let mut salted = job(StopSpec::default(), SamplingSpec::default());
        assert_eq!(generation_request(&salted, &[]).cache_salt, None);
        salted.cache_salt = Some("tenant-a".into());
        assert_eq!(
            generation_request(&salted, &[]).cache_salt.as_deref(),
            Some("tenant-a")
        );
    }

    #[test]
    fn sampling_maps_field_by_field_with_zero_top_k_off() {
        let spec = SamplingSpec {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            seed: Some(5),
            presence_penalty: 0.5,
            frequency_penalty: -0.5,
            repetition_penalty: 1.1,
            logprobs: Some(3),
            min_p: 0.05,
            ..SamplingSpec::default()
        };
        let stop = StopSpec {
            min_tokens: 4,
            ..StopSpec::default()
        };
        let params = sampling_params(&spec, &stop);
        assert_eq!(params.top_k, None);
        assert_eq!(
            (params.temperature, params.top_p, params.min_p, params.seed),
            (0.7, 0.9, 0.05, Some(5))
        );
        assert_eq!(params.min_tokens, 4);
        assert_eq!(
            (
                params.presence_penalty,
                params.frequency_penalty,
                params.repetition_penalty
            ),
            (0.5, -0.5, 1.1)
        );
        assert_eq!(params.logprobs, Some(3));
        assert!(params.validate().is_ok());
        let with_k = sampling_params(&SamplingSpec { top_k: 40, ..spec }, &stop);
        assert_eq!(with_k.top_k, Some(40));
    }
}
