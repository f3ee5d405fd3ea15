//! Requests in: a request is validated and given its state (a `Sequence`) before the
//! scheduler queues it, so the step loop only ever sees requests it can run. A resumed
//! request's tokens are replayed through its text and grammar state here; samples of one
//! prompt share a scheduler group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::drafter::{DraftConfig, DraftSource, Drafter};
use super::{
    Engine, EngineError, GenerationRequest, RequestId, Sequence, StepModel, TextOptions, TextStream,
};
use crate::sampler::Sampler;
use crate::scheduler::GroupId;
use tandem_protocol::block_hash::BlockHash;

/// Brings a resumed request's text state to where the worker that generated `resumed`
/// ([`GenerationRequest::resume_ids`]) left it: each resumed token goes through the detokenizer and stop
/// matcher as if sampled here, its text discarded (the client has it), so text held back
/// there (an incomplete character, a possible stop string) is held back here too. Refuses
/// resumed tokens that would have ended the request (a stop token or string, `max_tokens`).
fn replay_resumed(
    resumed: &[u32],
    max_tokens: usize,
    stop_token_ids: &[u32],
    mut text: Option<&mut (dyn TextStream + 'static)>,
) -> Result<(), EngineError> {
    if resumed.is_empty() {
        return Ok(());
    }
    if resumed.len() >= max_tokens {
        return Err(EngineError::Resume(format!(
            "{} tokens generated already, max_tokens is {max_tokens}",
            resumed.len()
        )));
    }
    for (position, &token) in resumed.iter().enumerate() {
        if stop_token_ids.contains(&token) {
            return Err(EngineError::Resume(format!(
                "resumed token {position} ({token}) is a stop token"
            )));
        }
        if let Some(text) = text.as_deref_mut() {
            let step = text.push(token).map_err(EngineError::Text)?;
            if step.stopped {
                return Err(EngineError::Resume(format!(
                    "resumed token {position} completes a stop string"
                )));
            }
        }
    }
    Ok(())
}

impl<M: StepModel> Engine<M> {
    /// Validates and queues a request.
    pub fn add_request(&mut self, request: GenerationRequest) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.add_request_with_id(id, request, Instant::now())?;
        Ok(id)
    }

    /// The id counter, for handles that name requests before sending them here.
    pub(crate) fn id_source(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.next_id)
    }

    /// Queues a request that arrived at `arrived` (its submission to the engine thread).
    pub(crate) fn add_request_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        arrived: Instant,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        // A request reporting prompt logprobs computes its whole prompt: a share of a
        // sibling's blocks would skip the rows of the shared positions.
        let group = request.sample_group.clone().filter(|_| {
            request.resume_ids.is_empty()
                && !request.prefill_only
                && request.prompt_logprobs.is_none()
        });
        let prompt = group.as_ref().map(|_| request.prompt_ids.clone());
        let mut seq = self.new_sequence(request)?;
        seq.arrived = arrived;
        match group.zip(prompt) {
            Some((name, prompt)) => {
                let group = self.sample_group(name, prompt);
                self.scheduler.add_to_group(id, seq.tokens.len(), group)?;
            }
            // A resumed request's K/V are computed for its resumed tokens too.
            None => self.scheduler.add(id, seq.tokens.len())?,
        }
        if let Some(root) = seq.cache_root {
            self.scheduler.track(id, root, &seq.tokens);
        }
        self.scheduler.set_max_len(id, seq.max_len())?;
        self.scheduler.set_priority(id, seq.priority)?;
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// The scheduler's group for samples group `name` with `prompt`: the live one of that
    /// name when its prompt is the same (the api-server sends one prompt to all choices; a
    /// different one is a new group, never a share of the wrong K/V), else a new one.
    fn sample_group(&mut self, name: String, prompt: Vec<u32>) -> GroupId {
        let scheduler = &self.scheduler;
        self.sample_groups
            .retain(|_, (group, _)| scheduler.has_group(*group));
        if let Some((group, shared)) = self.sample_groups.get(&name)
            && *shared == prompt
        {
            return *group;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.sample_groups.insert(name, (group, prompt));
        group
    }

    /// Refuses work once the device is lost.
    pub(super) fn check_device(&self) -> Result<(), EngineError> {
        match &self.device_lost {
            Some(reason) => Err(EngineError::DeviceLost(reason.clone())),
            None => Ok(()),
        }
    }

    /// Validates a request and builds its state.
    pub(super) fn new_sequence(&self, request: GenerationRequest) -> Result<Sequence, EngineError> {
        if let Some(&token) = request
            .prompt_ids
            .iter()
            .chain(&request.resume_ids)
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        if request.max_tokens == 0 && request.prompt_logprobs.is_none() && !request.embedding {
            return Err(EngineError::ZeroMaxTokens);
        }
        if request.embedding
            && (request.max_tokens != 0 || request.prefill_only || !request.resume_ids.is_empty())
        {
            return Err(EngineError::EmbeddingGenerates);
        }
        if request.prefill_only && request.prompt_logprobs.is_some() {
            return Err(EngineError::PromptLogprobsNeedLocalPrefill);
        }
        let min_tokens = request.sampling.min_tokens as usize;
        let mut sampler = Sampler::new(request.sampling)?;
        let mut text = match &self.text {
            Some(decoder) => Some(
                decoder
                    .start(
                        &request.prompt_ids,
                        &TextOptions {
                            stop_strings: &request.stop_strings,
                            min_tokens,
                            include_stop_strings: request.include_stop_str_in_output,
                            skip_special_tokens: request.skip_special_tokens,
                        },
                    )
                    .map_err(EngineError::Text)?,
            ),
            None if !request.stop_strings.is_empty() => {
                return Err(EngineError::StopStringsNeedTokenizer);
            }
            None => None,
        };
        let mut stop_token_ids = request.stop_token_ids;
        if !request.ignore_eos {
            stop_token_ids.extend(&self.eos_token_ids);
        }
        sampler.set_stop_tokens(&stop_token_ids);
        replay_resumed(
            &request.resume_ids,
            request.max_tokens,
            &stop_token_ids,
            text.as_deref_mut(),
        )?;
        let mut grammar = request.grammar;
        if let Some(grammar) = &mut grammar {
            // The resumed tokens were generated under the same grammar elsewhere.
            grammar.advance_all(&request.resume_ids).map_err(|e| {
                EngineError::Resume(format!("the resumed tokens do not fit the grammar: {e}"))
            })?;
            if !request.resume_ids.is_empty() && grammar.is_finished() {
                return Err(EngineError::Resume(
                    "the resumed tokens complete the grammar already".into(),
                ));
            }
        }
        let cache_root = (self.scheduler.prefix_caching() && request.prompt_logprobs.is_none())
            .then(|| {
                let namespace = match &request.adapter {
                    Some(adapter) => &adapter.fingerprint,
                    None => &self.cache_namespace,
                };
                BlockHash::root(namespace, request.cache_salt.as_deref())
            });
        let drafter = if !request.prediction.is_empty() {
            Some(Drafter::new(
                DraftSource::Prediction(request.prediction),
                DraftConfig::PREDICTION,
            ))
        } else {
            self.speculation
                .filter(|_| !request.prefill_only)
                .map(|config| Drafter::new(DraftSource::OwnTokens, config))
        };
        let prompt_len = request.prompt_ids.len();
        let mut tokens = request.prompt_ids;
        tokens.extend(&request.resume_ids);
        Ok(Sequence {
            prompt_len,
            tokens,
            sampler,
            max_tokens: request.max_tokens,
            stop_token_ids,
            text,
            prefill_only: request.prefill_only,
            deadline: request.deadline,
            constrained: grammar.is_some(),
            grammar,
            mask: None,
            prompt_logprobs: request.prompt_logprobs.map(|k| k as usize),
            prompt_logprobs_next: 1,
            embedding: request.embedding,
            pending_row: None,
            arrived: Instant::now(),
            first_forward: None,
            cache_root,
            priority: request.priority,
            adapter: request.adapter.as_ref().map(|a| a.index),
            drafter,
            draft: Vec::new(),
            drafts: Default::default(),
        })
    }
}
