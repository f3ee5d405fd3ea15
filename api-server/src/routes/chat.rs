//! `POST /v1/chat/completions`, streamed (`chat.completion.chunk` events) or not.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{FinishReason as WireFinish, TokenEvent, Usage as WireUsage};

use super::logprobs::chat_entry;
use super::{client_left, finish_reason, start_generation, unless_client_leaves};
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, RequestRecord};
use crate::error::ApiError;
use crate::metrics::Endpoint;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatLogprobs, ChunkChoice, Delta, Usage,
};
use crate::prompt::PromptCodec;
use crate::sse::{ChunkFormat, sse_data, sse_response};
use crate::state::{AppState, unix_now_s};
use crate::validation::{JSON_SCHEMA_PARAM, validate_chat};

#[post("/v1/chat/completions")]
pub async fn chat_completions(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Chat);
    let valid = validate_chat(&body, &state.limits).inspect_err(|err| record.fail(err))?;
    if let Some(grammar) = &valid.sampling.grammar {
        state
            .grammars
            .check(grammar, JSON_SCHEMA_PARAM)
            .await
            .inspect_err(|err| record.fail(err))?;
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let started = start_generation(&state, &valid, record, id.clone());
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    let generation = generation?;
    let chunks = ChatChunks {
        id,
        created: unix_now_s(),
        model: state.limits.served_model_name.clone(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        codec: Arc::clone(&state.codec),
    };
    if valid.stream {
        return Ok(sse_response(generation, chunks, socket));
    }
    let Some(completed) = unless_client_leaves(socket, generation.collect()).await else {
        return Ok(client_left());
    };
    let completed = completed?;
    Ok(HttpResponse::Ok().json(chunks.completion(completed)))
}

/// The chunks of one streamed chat completion, or the whole completion of one that is not.
pub struct ChatChunks {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: bool,
    pub codec: Arc<dyn PromptCodec>,
}

impl ChatChunks {
    /// The `chat.completion` object of a generation that is not streamed.
    fn completion(self, completed: Completed) -> ChatCompletion {
        let content = completed.text();
        let logprobs = ChatLogprobs {
            content: completed
                .tokens
                .iter()
                .filter_map(|t| chat_entry(self.codec.as_ref(), t))
                .collect(),
            refusal: None,
        };
        ChatCompletion {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            system_fingerprint: None,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    refusal: None,
                },
                logprobs: self.logprobs.then_some(logprobs),
                finish_reason: finish_reason(completed.reason),
            }],
            usage: Usage::new(
                completed.usage.prompt_tokens,
                completed.usage.completion_tokens,
            ),
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(usage),
        }
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&mut self) -> Vec<Bytes> {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        };
        vec![sse_data(&self.chunk(vec![choice], None))]
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let logprobs = self.logprobs.then(|| ChatLogprobs {
            content: tokens
                .iter()
                .filter_map(|t| chat_entry(self.codec.as_ref(), t))
                .collect(),
            refusal: None,
        });
        // Tokens held back by the worker (a partial character or a possible stop string) carry
        // no text; send nothing unless their logprobs are wanted.
        if text.is_empty() && logprobs.as_ref().is_none_or(|l| l.content.is_empty()) {
            return None;
        }
        let choice = ChunkChoice {
            index: 0,
            delta: Delta {
                role: None,
                content: Some(text),
            },
            logprobs,
            finish_reason: None,
        };
        Some(sse_data(&self.chunk(vec![choice], None)))
    }

    fn finished(&mut self, reason: WireFinish, usage: WireUsage) -> Vec<Bytes> {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason(reason)),
        };
        let mut chunks = vec![sse_data(&self.chunk(vec![choice], None))];
        if self.include_usage {
            let usage = Usage::new(usage.prompt_tokens, usage.completion_tokens);
            chunks.push(sse_data(&self.chunk(Vec::new(), Some(usage))));
        }
        chunks
    }
}
