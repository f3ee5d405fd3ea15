//! `POST /v1/completions` (text completions), streamed or not. Streamed chunks are
//! `text_completion` objects, as OpenAI sends them.
//!
//! `echo`: each choice's text starts with the prompt (a prompt of token ids as its decoded
//! text), and with `logprobs` its logprobs start with the prompt's tokens, the first with
//! `null` (the workers compute the others: `prompt_logprobs` on the job). Streamed, the
//! prompt comes in the choice's first chunk with its first tokens, or alone with the finish
//! reason when nothing is generated (`max_tokens: 0`), as vLLM sends it.
//!
//! `best_of` > `n`: `best_of` candidates generated as choices are, the `n` with the highest
//! mean token logprob returned ([`samples::best_of`]), usage counting every candidate.
//!
//! A batch (`prompt` as a list of several strings or token lists): each prompt is started as a
//! request of its own (admitted, routed and counted as choices of this one), and its choices
//! come in order, prompt by prompt (choice `i` answers prompt `i / n`), each prompt counted
//! once in the usage; streamed, the choices' chunks interleave as `n`'s do.

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{
    FinishReason as WireFinish, PromptLogprob, TokenEvent, Usage as WireUsage,
};

use super::logprobs::{CompletionLogprobsBuilder, vllm_prompt_logprobs};
use super::{
    ChoiceFormat, client_left, finish_reason, reply_choices, reply_whole, start_generation,
    unless_client_leaves,
};
use crate::auth::TenantSalt;
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, RequestRecord, samples};
use crate::error::ApiError;
use crate::metrics::Endpoint;
use crate::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FinishReason, Usage,
};
use crate::prompt::{PromptCodec, naming_prompt_param};
use crate::sse::{ChunkFormat, sse_data};
use crate::state::{AppState, unix_now_s};
use crate::validation::{PromptInput, validate_completion};

#[post("/v1/completions")]
pub async fn completions(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Completions);
    let batch = crate::fields::COMPLETIONS
        .parse::<CompletionRequest>(body.into_inner())
        .and_then(|body| validate_completion(&body, &state.limits))
        .inspect_err(|err| record.fail(err))?;
    let valid = batch[0].clone();
    record.set_adapter(valid.lora.as_deref());
    // Every prompt of a batch carries the same grammar (`structured_outputs`).
    if let (Some(grammar), Some(param)) = (&valid.sampling.grammar, valid.grammar_param) {
        state
            .grammars
            .check(grammar, param)
            .await
            .inspect_err(|err| record.fail(err))?;
    }
    let ids = crate::reply_id::ReplyId::of(&request, "cmpl", valid.client_request_id.as_deref())
        .inspect_err(|err| record.fail(err))?;
    let id = ids.response.clone();
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    // Each prompt of a batch is started as a request of its own (its jobs named after the
    // prompt), counted as choices of this one.
    let records: Vec<RequestRecord> = (1..batch.len()).map(|_| record.extra_choice()).collect();
    let starts = batch
        .iter()
        .zip(std::iter::once(record).chain(records))
        .enumerate()
        .map(|(i, (prompt, record))| {
            let request_id = match batch.len() {
                1 => ids.internal.clone(),
                _ => format!("{}-p{i}", ids.internal),
            };
            start_generation(&state, prompt, record, request_id, tenant.clone())
        });
    let started = futures::future::try_join_all(starts);
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    let per_prompt = generation?;
    let mut echoes = Vec::with_capacity(per_prompt.len());
    for (prompt, generations) in batch.iter().zip(&per_prompt) {
        echoes.push(match (prompt.echo, generations.first()) {
            (true, Some(first)) => Some(Arc::new(EchoedPrompt {
                text: match &prompt.prompt {
                    PromptInput::Text(text) => text.clone(),
                    _ => state
                        .codec
                        .decode_text(first.prompt_ids())
                        .map_err(|err| naming_prompt_param(err.into(), prompt.prompt_param()))?,
                },
                ids: first.prompt_ids().to_vec(),
            })),
            _ => None,
        });
    }
    // Each prompt's ids, for vLLM's `prompt_logprobs`.
    let per_prompt_ids: Vec<Vec<u32>> = per_prompt
        .iter()
        .filter_map(|generations| Some(generations.first()?.prompt_ids().to_vec()))
        .collect();
    let generations: Vec<_> = per_prompt.into_iter().flatten().collect();
    let created = unix_now_s();
    // Choice `index` answers prompt `index / n` (OpenAI numbers a batch's choices prompt by
    // prompt); streamed, the generations are the choices.
    let n = valid.n as usize;
    let chunks = |index: usize| CompletionChunks {
        id: id.clone(),
        index: index as u32,
        prompt_index: index / n,
        created,
        // The model the request named: the served model or a LoRA adapter.
        model: valid
            .lora
            .clone()
            .unwrap_or_else(|| state.limits.served_model_name.clone()),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        offsets: CompletionLogprobsBuilder::default(),
        codec: crate::prompt::reply_codec(&state.codec, valid.output),
        running: valid
            .continuous_usage
            .then(|| super::RunningUsage::new(per_prompt_ids.get(index / n).map_or(0, Vec::len))),
        shown_prompt_logprobs: valid.prompt_logprobs.and_then(|top| {
            let prompt_ids: Arc<[u32]> = Arc::from(per_prompt_ids.get(index / n)?.as_slice());
            Some((prompt_ids, top as usize))
        }),
        echo: echoes[index / n].clone(),
        prompt_logprobs: Vec::new(),
    };
    if valid.candidates > valid.n {
        // best_of: never streamed (validated); every candidate whole, then each prompt's
        // best n.
        let candidates = valid.candidates as usize;
        let best = |completed: Vec<Completed>| {
            let mut completed = completed.into_iter();
            let mut kept = Vec::new();
            loop {
                let prompt: Vec<Completed> = completed.by_ref().take(candidates).collect();
                if prompt.is_empty() {
                    return kept;
                }
                kept.extend(samples::best_of(prompt, n));
            }
        };
        let reply = reply_whole(generations, socket, chunks, candidates, best).await?;
        return Ok(ids.echoed(reply));
    }
    let reply = reply_choices(generations, valid.stream, socket, chunks, n).await?;
    Ok(ids.echoed(reply))
}

/// The prompt `echo` puts before each choice: its token ids and its text (as sent, or the
/// ids decoded).
#[derive(Debug)]
pub struct EchoedPrompt {
    pub ids: Vec<u32>,
    pub text: String,
}

/// The chunks of one streamed text completion, or the whole completion of one that is not.
pub struct CompletionChunks {
    pub id: String,
    /// The choice these chunks carry.
    pub index: u32,
    /// The prompt it answers (a batch's).
    pub prompt_index: usize,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: bool,
    offsets: CompletionLogprobsBuilder,
    codec: Arc<dyn PromptCodec>,
    /// With `echo`: the prompt, until the first chunk (or the choice) has carried it.
    echo: Option<Arc<EchoedPrompt>>,
    /// The prompt's logprobs, when the job asked for them (streamed: until echoed).
    prompt_logprobs: Vec<PromptLogprob>,
    /// vLLM's `prompt_logprobs`: the prompt's ids and the alternatives to show, when asked.
    shown_prompt_logprobs: Option<(Arc<[u32]>, usize)>,
    /// vLLM's `continuous_usage_stats`: this choice's usage so far, in every chunk.
    running: Option<super::RunningUsage>,
}

impl ChoiceFormat for CompletionChunks {
    type Choice = CompletionChoice;
    type Response = Completion;

    /// The `text_completion` object of a request that is not streamed, with its choices.
    fn completion(self, choices: Vec<CompletionChoice>, usage: WireUsage) -> Completion {
        let usage = Usage::from(usage);
        self.object(choices, Some(Some(usage)))
    }

    /// This choice of a request that is not streamed.
    fn choice(mut self, mut completed: Completed) -> CompletionChoice {
        let mut logprobs = CompletionLogprobs::default();
        let prompt_logprobs = self.shown_prompt_logprobs.as_ref().map(|(ids, top)| {
            vllm_prompt_logprobs(self.codec.as_ref(), ids, &completed.prompt_logprobs, *top)
        });
        self.prompt_logprobs = std::mem::take(&mut completed.prompt_logprobs);
        let mut text = self.take_echo(&mut logprobs);
        self.offsets
            .append(self.codec.as_ref(), &completed.tokens, &mut logprobs);
        text.push_str(&completed.text());
        CompletionChoice {
            text,
            index: self.index,
            logprobs: self.logprobs.then_some(logprobs),
            finish_reason: Some(finish_reason(completed.reason)),
            prompt_logprobs,
        }
    }
}

impl CompletionChunks {
    /// With `echo`, once: the prompt's text, and its tokens put first in `logprobs`.
    fn take_echo(&mut self, logprobs: &mut CompletionLogprobs) -> String {
        let Some(echo) = self.echo.take() else {
            return String::new();
        };
        if self.logprobs {
            self.offsets.append_prompt(
                self.codec.as_ref(),
                &echo.ids,
                &echo.text,
                &std::mem::take(&mut self.prompt_logprobs),
                logprobs,
            );
        }
        echo.text.clone()
    }

    fn object(&self, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
        }
    }

    fn chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<FinishReason>,
    ) -> Bytes {
        let choice = CompletionChoice {
            text,
            index: self.index,
            logprobs,
            finish_reason: finish,
            // Not streamed (refused with stream at the edge).
            prompt_logprobs: None,
        };
        let usage = self.running.map(|r| r.usage());
        sse_data(&self.object(vec![choice], self.include_usage.then_some(usage)))
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    fn prompt_index(&self) -> usize {
        self.prompt_index
    }

    fn prompt_logprobs(&mut self, logprobs: Vec<PromptLogprob>) {
        self.prompt_logprobs = logprobs;
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        if let Some(running) = &mut self.running {
            running.completion_tokens += tokens.len() as u32;
        }
        let mut logprobs = CompletionLogprobs::default();
        let mut text = self.take_echo(&mut logprobs);
        text.extend(tokens.iter().map(|t| t.text.as_str()));
        self.offsets
            .append(self.codec.as_ref(), tokens, &mut logprobs);
        if text.is_empty() && logprobs.tokens.is_empty() {
            return None;
        }
        let logprobs = self.logprobs.then_some(logprobs);
        Some(self.chunk(text, logprobs, None))
    }

    fn finished(&mut self, reason: WireFinish, usage: WireUsage) -> Vec<Bytes> {
        if let Some(running) = &mut self.running {
            running.completion_tokens = usage.completion_tokens;
        }
        // A choice that generated nothing (`max_tokens` 0) echoes its prompt here.
        let mut logprobs = CompletionLogprobs::default();
        let text = self.take_echo(&mut logprobs);
        let logprobs = (self.logprobs && !logprobs.tokens.is_empty()).then_some(logprobs);
        vec![self.chunk(text, logprobs, Some(finish_reason(reason)))]
    }

    fn usage(&self, usage: WireUsage) -> Option<Bytes> {
        let usage = Usage::from(usage);
        self.include_usage
            .then(|| sse_data(&self.object(Vec::new(), Some(Some(usage)))))
    }
}
