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

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{
    FinishReason as WireFinish, PromptLogprob, TokenEvent, Usage as WireUsage,
};

use super::logprobs::CompletionLogprobsBuilder;
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
    let valid = crate::fields::COMPLETIONS
        .parse::<CompletionRequest>(body.into_inner())
        .and_then(|body| validate_completion(&body, &state.limits))
        .inspect_err(|err| record.fail(err))?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    let started = start_generation(&state, &valid, record, id.clone(), tenant);
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    let generations = generation?;
    let echo = match (valid.echo, generations.first()) {
        (true, Some(first)) => Some(Arc::new(EchoedPrompt {
            text: match &valid.prompt {
                PromptInput::Text(text) => text.clone(),
                _ => state
                    .codec
                    .decode_text(first.prompt_ids())
                    .map_err(|err| naming_prompt_param(err.into(), valid.prompt_param()))?,
            },
            ids: first.prompt_ids().to_vec(),
        })),
        _ => None,
    };
    let created = unix_now_s();
    let chunks = |index: usize| CompletionChunks {
        id: id.clone(),
        index: index as u32,
        created,
        model: state.limits.served_model_name.clone(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        offsets: CompletionLogprobsBuilder::default(),
        codec: Arc::clone(&state.codec),
        echo: echo.clone(),
        prompt_logprobs: Vec::new(),
    };
    if valid.candidates > valid.n {
        // best_of: never streamed (validated); every candidate whole, then the best n.
        let best = |completed| samples::best_of(completed, valid.n as usize);
        return reply_whole(generations, socket, chunks, best).await;
    }
    reply_choices(generations, valid.stream, socket, chunks).await
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
        };
        sse_data(&self.object(vec![choice], self.include_usage.then_some(None)))
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    fn prompt_logprobs(&mut self, logprobs: Vec<PromptLogprob>) {
        self.prompt_logprobs = logprobs;
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
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

    fn finished(&mut self, reason: WireFinish, _usage: WireUsage) -> Vec<Bytes> {
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
