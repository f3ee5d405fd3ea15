//! `POST /v1/chat/completions`, streamed (`chat.completion.chunk` events) or not.

use std::sync::Arc;

use actix_web::{HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{FinishReason as WireFinish, TokenEvent, Usage as WireUsage};

use super::logprobs::chat_entry;
use super::{finish_reason, sse_response, start_generation};
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatLogprobs, ChunkChoice, Delta, Usage,
};
use crate::prompt::PromptCodec;
use crate::state::{AppState, unix_now_s};
use crate::streaming::{ChunkFormat, GenEvent, RequestRecord, sse_data};
use crate::validation::validate_chat;

#[post("/v1/chat/completions")]
pub async fn chat_completions(
    state: web::Data<AppState>,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let mut record = RequestRecord::new(state.metrics.clone(), "chat");
    let valid = validate_chat(&body, &state.limits).inspect_err(|err| record.fail(err))?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let mut generation = start_generation(&state, &valid, record, id.clone()).await?;
    let chunks = ChatChunks {
        id,
        created: unix_now_s(),
        model: state.limits.served_model_name.clone(),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        codec: Arc::clone(&state.codec),
    };
    if valid.stream {
        return Ok(sse_response(generation, chunks));
    }
    let mut content = String::new();
    let mut logprobs = ChatLogprobs::default();
    loop {
        match generation.next().await {
            Some(Ok(GenEvent::Tokens(tokens))) => {
                for token in &tokens {
                    content.push_str(&token.text);
                    logprobs
                        .content
                        .extend(chat_entry(chunks.codec.as_ref(), token));
                }
            }
            Some(Ok(GenEvent::Finished { reason, usage })) => {
                return Ok(HttpResponse::Ok().json(ChatCompletion {
                    id: chunks.id,
                    object: "chat.completion",
                    created: chunks.created,
                    model: chunks.model,
                    system_fingerprint: None,
                    choices: vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content,
                            refusal: None,
                        },
                        logprobs: chunks.logprobs.then_some(logprobs),
                        finish_reason: finish_reason(reason),
                    }],
                    usage: Usage::new(usage.prompt_tokens, usage.completion_tokens),
                }));
            }
            Some(Err(err)) => return Err(err),
            None => {
                return Err(ApiError::Internal(
                    "token stream ended without Finished".into(),
                ));
            }
        }
    }
}

/// The chunks of one streamed chat completion.
pub struct ChatChunks {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: bool,
    pub codec: Arc<dyn PromptCodec>,
}

impl ChatChunks {
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
