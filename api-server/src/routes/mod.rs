//! HTTP routes, one file per endpoint, the JSON body configuration that turns malformed
//! bodies into OpenAI error responses, and what the generation endpoints share: tokenizing and
//! dispatching a validated request, cancelling it when the client leaves, and the OpenAI finish
//! reason.

pub mod chat;
pub mod completions;
pub mod conversations;
pub mod embeddings;
pub mod health;
pub mod metrics;
pub mod models;
pub mod responses;
mod stored;
pub mod tokenize;
pub mod unrouted;

mod logprobs;

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use tandem_protocol::messages::{FinishReason as WireFinish, Usage as WireUsage};

use crate::auth::TenantSalt;
use crate::disconnect::{ClientSocket, client_gone};
use crate::dispatch::{Completed, Generation, JobSpec, RequestRecord, samples};
use crate::error::ApiError;
use crate::metrics::Endpoint;
use crate::openai::FinishReason;
use crate::prompt::{naming_prompt_param, tokenize};
use crate::sse::{ChunkFormat, sse_response};
use crate::state::AppState;
use crate::validation::{PromptInput, ValidRequest};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Registers every route and the JSON error handler.
pub fn configure(config: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(|err, req| {
            // Counted under the generation endpoint it was meant for (the tokenizer routes
            // are not counted).
            let endpoint = match req.path() {
                "/v1/chat/completions" => Some(Endpoint::Chat),
                "/v1/responses" => Some(Endpoint::Responses),
                "/v1/completions" => Some(Endpoint::Completions),
                "/v1/embeddings" => Some(Endpoint::Embeddings),
                _ => None,
            };
            let err = ApiError::InvalidJson(err.to_string());
            if let (Some(state), Some(endpoint)) = (req.app_data::<web::Data<AppState>>(), endpoint)
            {
                RequestRecord::new(state.metrics.clone(), endpoint).fail(&err);
            }
            err.into()
        });
    config
        .app_data(json)
        .service(chat::chat_completions)
        .service(completions::completions)
        .service(embeddings::embeddings)
        .service(responses::create_response)
        .service(responses::get_response)
        .service(responses::delete_response)
        .service(responses::list_input_items)
        .service(responses::cancel_response)
        .service(conversations::create_conversation)
        .service(conversations::get_conversation)
        .service(conversations::update_conversation)
        .service(conversations::delete_conversation)
        .service(conversations::add_items)
        .service(conversations::list_items)
        .service(conversations::get_item)
        .service(conversations::delete_item)
        .service(models::list_models)
        .service(models::retrieve_model)
        .service(tokenize::tokenize_prompt)
        .service(tokenize::detokenize_tokens)
        .service(health::health)
        .service(metrics::metrics)
        .default_service(web::to(unrouted::unrouted_request));
}

/// Runs `work` (a request's dispatch and generation) unless the client on `socket` leaves
/// first; then `None`, and `work` is dropped, which cancels the request on the bus (its
/// [`Generation`] or the guard of its job).
pub(crate) async fn unless_client_leaves<T>(
    socket: Option<Arc<ClientSocket>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        () = client_gone(socket) => {
            tracing::info!("the client went away mid-request: request cancelled");
            None
        }
    }
}

/// What a handler answers once its client has left (nobody reads it): nginx's 499.
pub(crate) fn client_left() -> HttpResponse {
    HttpResponse::new(
        actix_web::http::StatusCode::from_u16(499).expect("499 is a valid status code"),
    )
}

/// vLLM's `continuous_usage_stats`: the usage of one choice so far, which each of its streamed
/// chunks carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl RunningUsage {
    pub fn new(prompt_tokens: usize) -> Self {
        RunningUsage {
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: 0,
        }
    }

    pub fn usage(&self) -> crate::openai::Usage {
        crate::openai::Usage::new(self.prompt_tokens, self.completion_tokens)
    }
}

/// Prompt tokens read back to see whether the prompt ends inside an open think block (its
/// generation prompt's `<think>` and the newline after it).
const PROMPT_TAIL_TOKENS: usize = 8;

/// The reasoning splitter of a reply to `prompt_ids`, with a reasoning parser
/// (`--reasoning-parser`): whether the reply starts inside its thinking is read from the
/// prompt's last tokens (a template that opened the think block itself).
pub(crate) fn reasoning_splitter(
    state: &AppState,
    prompt_ids: &[u32],
) -> Option<crate::reasoning::ReasoningSplitter> {
    if state.limits.reasoning_parser == tandem_protocol::config::ReasoningParser::None {
        return None;
    }
    Some(crate::reasoning::ReasoningSplitter::new(
        prompt_opens_thinking(state, prompt_ids),
    ))
}

/// Whether the prompt ends inside a think block its template opened (its last tokens
/// decoded with their special tokens).
fn prompt_opens_thinking(state: &AppState, prompt_ids: &[u32]) -> bool {
    let tail = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_TAIL_TOKENS)..];
    state
        .codec
        .decode_text(tail)
        .is_ok_and(|text| crate::reasoning::prompt_opens_thinking(&text))
}

/// Tokenizes a validated request, checks it against the context and dispatches it: one
/// generation per choice (`n`, or `best_of` candidates), all on one worker when there are
/// several ([`crate::dispatch::samples`]).
pub(crate) async fn start_generation(
    state: &AppState,
    valid: &ValidRequest,
    mut record: RequestRecord,
    request_id: String,
    tenant: Option<TenantSalt>,
) -> Result<Vec<Generation>, ApiError> {
    let admitted = state
        .admission
        .try_admit()
        .inspect_err(|err| record.fail(err))?;
    let prepared = async {
        let mut prompt_ids = tokenize(
            state.codec.clone(),
            valid.prompt.clone(),
            valid.tools.clone(),
            valid.rendering.clone(),
        )
        .await
        .map_err(|err| naming_prompt_param(err, valid.prompt_param()))?;
        valid.truncate_prompt(&mut prompt_ids, &state.limits);
        let stop = valid.stop_spec(prompt_ids.len(), &state.limits)?;
        let mut sampling = valid.sampling.clone();
        // A reasoning model thinks before the answer a grammar constrains: with a reasoning
        // parser, a chat reply's grammar starts after its think block, which is free text.
        if state.limits.reasoning_parser != tandem_protocol::config::ReasoningParser::None
            && matches!(valid.prompt, PromptInput::Chat(_))
        {
            let opened = prompt_opens_thinking(state, &prompt_ids);
            sampling.grammar = sampling.grammar.take().map(|g| g.after_thinking(opened));
        }
        sampling.bad_words =
            crate::prompt::tokenize_bad_words(state.codec.clone(), valid.bad_words.clone()).await?;
        let prediction_ids =
            crate::prompt::tokenize_prediction(state.codec.clone(), valid.prediction.clone())
                .await?;
        Ok::<_, ApiError>(JobSpec {
            prompt_ids,
            sampling,
            stop,
            prompt_param: valid.prompt_param(),
            samples: None,
            cache_salt: match &tenant {
                Some(tenant) => Some(tenant.with_request_salt(valid.cache_salt.as_deref())),
                None => valid.cache_salt.clone(),
            },
            priority: valid.priority,
            prediction_ids,
            embedding: false,
            lora: valid.lora.clone(),
        })
    }
    .await;
    let job = prepared.inspect_err(|err| record.fail(err))?;
    // `best_of` candidates when more than `n` (the route keeps the best `n`).
    let mut generations = if valid.candidates > 1 {
        samples::start_choices(state.dispatch(), &request_id, job, valid.candidates, record).await?
    } else {
        vec![Generation::start(state.dispatch(), request_id, job, record).await?]
    };
    let admitted = Arc::new(admitted);
    for generation in &mut generations {
        generation.hold(Arc::clone(&admitted));
    }
    Ok(generations)
}

/// A chat or text completion's format for one choice: its SSE chunks when streamed
/// ([`ChunkFormat`]), its choice and the whole response object when not.
pub(crate) trait ChoiceFormat: ChunkFormat + Sized {
    type Choice;
    type Response: serde::Serialize;
    /// This choice of a request that is not streamed.
    fn choice(self, completed: Completed) -> Self::Choice;
    /// The response object of a request that is not streamed, with its choices and the usage
    /// of them all.
    fn completion(self, choices: Vec<Self::Choice>, usage: WireUsage) -> Self::Response;
}

/// The answer to a chat or text completion request with one generation per choice: the
/// choices streamed as `format(index)`'s chunks, or collected into one response object
/// (each prompt counted once in its usage: the choices come `per_prompt` to a prompt). A
/// client that leaves cancels every choice.
pub(crate) async fn reply_choices<F: ChoiceFormat>(
    generations: Vec<Generation>,
    stream: bool,
    socket: Option<Arc<ClientSocket>>,
    format: impl Fn(usize) -> F,
    per_prompt: usize,
) -> Result<HttpResponse, ApiError> {
    if stream {
        let choices = generations
            .into_iter()
            .enumerate()
            .map(|(index, generation)| (generation, format(index)))
            .collect();
        return Ok(sse_response(choices, socket));
    }
    reply_whole(generations, socket, format, per_prompt, |completed| {
        completed
    })
    .await
}

/// The response object of a request that is not streamed: every generation whole (the first
/// error fails them all; the others are dropped, which cancels them), the usage of them all
/// (each prompt counted once: the generations come `per_prompt` to a prompt, prompt by
/// prompt), and as choices those `keep` returns, in its order (all of them, or `best_of`'s best
/// `n` of each prompt).
pub(crate) async fn reply_whole<F: ChoiceFormat>(
    generations: Vec<Generation>,
    socket: Option<Arc<ClientSocket>>,
    format: impl Fn(usize) -> F,
    per_prompt: usize,
    keep: impl FnOnce(Vec<Completed>) -> Vec<Completed>,
) -> Result<HttpResponse, ApiError> {
    let collected = futures::future::try_join_all(generations.into_iter().map(Generation::collect));
    let Some(completed) = unless_client_leaves(socket, collected).await else {
        return Ok(client_left());
    };
    let completed = completed?;
    let usage = samples::batch_usage(
        completed
            .iter()
            .enumerate()
            .map(|(i, c)| (i / per_prompt.max(1), c.usage)),
    );
    let choices = keep(completed)
        .into_iter()
        .enumerate()
        .map(|(index, completed)| format(index).choice(completed))
        .collect();
    Ok(HttpResponse::Ok().json(format(0).completion(choices, usage)))
}

/// Only `Stop` and `Length` reach a response (`Stop` becomes `tool_calls` when the model
/// called tools, in `routes/chat.rs`); the others end a generation with an error.
pub(crate) fn finish_reason(reason: WireFinish) -> FinishReason {
    match reason {
        WireFinish::Length => FinishReason::Length,
        WireFinish::Stop | WireFinish::Cancelled | WireFinish::Error => FinishReason::Stop,
    }
}
