//! `POST /v1/completions` (text completions), streamed or not. Streamed chunks are
//! `text_completion` objects, as OpenAI sends them.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{FinishReason as WireFinish, TokenEvent, Usage as WireUsage};

use super::logprobs::CompletionLogprobsBuilder;
use super::{
    ChoiceFormat, client_left, finish_reason, reply_choices, start_generation, unless_client_leaves,
};
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, RequestRecord};
use crate::error::ApiError;
use crate::metrics::Endpoint;
use crate::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FinishReason, Usage,
};
use crate::prompt::PromptCodec;
use crate::sse::{ChunkFormat, sse_data};
use crate::state::{AppState, unix_now_s};
use crate::validation::validate_completion;

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
    let started = start_generation(&state, &valid, record, id.clone());
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    let generations = generation?;
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
    };
    reply_choices(generations, valid.stream, socket, chunks).await
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
}

impl ChoiceFormat for CompletionChunks {
    type Choice = CompletionChoice;
    type Response = Completion;

    /// The `text_completion` object of a request that is not streamed, with its choices.
    fn completion(self, choices: Vec<CompletionChoice>, usage: WireUsage) -> Completion {
        let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
        self.object(choices, Some(Some(usage)))
    }

    /// This choice of a request that is not streamed.
    fn choice(mut self, completed: Completed) -> CompletionChoice {
        let mut logprobs = CompletionLogprobs::default();
        self.offsets
            .append(self.codec.as_ref(), &completed.tokens, &mut logprobs);
        CompletionChoice {
            text: completed.text(),
            index: self.index,
            logprobs: self.logprobs.then_some(logprobs),
            finish_reason: Some(finish_reason(completed.reason)),
        }
    }
}

impl CompletionChunks {
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

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let mut logprobs = CompletionLogprobs::default();
        self.offsets
            .append(self.codec.as_ref(), tokens, &mut logprobs);
        if text.is_empty() && logprobs.tokens.is_empty() {
            return None;
        }
        let logprobs = self.logprobs.then_some(logprobs);
        Some(self.chunk(text, logprobs, None))
    }

    fn finished(&mut self, reason: WireFinish, _usage: WireUsage) -> Vec<Bytes> {
        vec![self.chunk(String::new(), None, Some(finish_reason(reason)))]
    }

    fn usage(&self, usage: WireUsage) -> Option<Bytes> {
        let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
        self.include_usage
            .then(|| sse_data(&self.object(Vec::new(), Some(Some(usage)))))
    }
}
