//! `POST /v1/responses` (the Responses API, text in and out), streamed as typed events or not,
//! through the same dispatch as chat completions (admission, migration, disconnects, metrics);
//! and the stored-response routes (`GET`/`DELETE /v1/responses/{id}`, its `input_items` and
//! `cancel`), which answer 404 because tandem stores no response.

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, delete, get, post, web};
use bytes::Bytes;
use serde_json::Value;
use tandem_protocol::messages::{FinishReason as WireFinish, TokenEvent, Usage as WireUsage};

use super::logprobs::chat_entry;
use super::{client_left, start_generation, unless_client_leaves};
use crate::auth::TenantSalt;
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, RequestRecord};
use crate::error::ApiError;
use crate::fields::RESPONSES;
use crate::metrics::Endpoint;
use crate::openai::{
    IncompleteDetails, OutputMessage, OutputText, ReasoningConfig, ResponseError, ResponseEvent,
    ResponseObject, ResponseStatus, ResponseUsage, ResponsesRequest, StreamEvent, TokenLogprob,
};
use crate::prompt::PromptCodec;
use crate::sse::{ChunkFormat, sse_response};
use crate::state::{AppState, unix_now_s};
use crate::validation::responses::{ResponseSettings, validate_responses};

#[post("/v1/responses")]
pub async fn create_response(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Responses);
    let valid = RESPONSES
        .parse::<ResponsesRequest>(body.into_inner())
        .and_then(|body| validate_responses(&body, &state.limits))
        .inspect_err(|err| record.fail(err))?;
    if let Some(grammar) = &valid.request.sampling.grammar {
        state
            .grammars
            .check(grammar, "text.format.schema")
            .await
            .inspect_err(|err| record.fail(err))?;
    }
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    let started = start_generation(&state, &valid.request, record, id.clone(), tenant);
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    // One output per response (`n` is not a Responses API field).
    let Ok::<[_; 1], _>([generation]) = generation?.try_into() else {
        unreachable!("a validated Responses request asks for one choice");
    };
    let events = ResponseEvents {
        message_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        id,
        created_at: unix_now_s(),
        model: state.limits.served_model_name.clone(),
        settings: valid.echo,
        codec: Arc::clone(&state.codec),
        text: String::new(),
        logprobs: Vec::new(),
        sequence_number: 0,
    };
    if valid.request.stream {
        return Ok(sse_response(vec![(generation, events)], socket));
    }
    let Some(completed) = unless_client_leaves(socket, generation.collect()).await else {
        return Ok(client_left());
    };
    let completed = completed?;
    Ok(HttpResponse::Ok().json(events.completed(completed)))
}

/// Why a stored-response route answers 404 (tandem keeps nothing to find).
fn not_stored(id: &str) -> ApiError {
    ApiError::ResponseNotFound { id: id.to_string() }
}

#[get("/v1/responses/{id}")]
pub async fn get_response(id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Err(not_stored(&id))
}

#[delete("/v1/responses/{id}")]
pub async fn delete_response(id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Err(not_stored(&id))
}

#[get("/v1/responses/{id}/input_items")]
pub async fn list_input_items(id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Err(not_stored(&id))
}

#[post("/v1/responses/{id}/cancel")]
pub async fn cancel_response(id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    Err(not_stored(&id))
}

/// One response: its events when streamed (numbered by `sequence_number`), or the whole
/// `response` object when not.
pub struct ResponseEvents {
    id: String,
    /// The output message's id.
    message_id: String,
    created_at: u64,
    model: String,
    settings: ResponseSettings,
    codec: Arc<dyn PromptCodec>,
    /// The text and logprobs streamed so far, for the `.done` events.
    text: String,
    logprobs: Vec<TokenLogprob>,
    sequence_number: u64,
}

impl ResponseEvents {
    /// The `response` object of a generation that is not streamed.
    fn completed(mut self, completed: Completed) -> ResponseObject {
        self.text = completed.text();
        self.logprobs = self.logprobs_of(&completed.tokens);
        self.finish(completed.reason, completed.usage)
    }

    fn logprobs_of(&self, tokens: &[TokenEvent]) -> Vec<TokenLogprob> {
        if !self.settings.include_logprobs {
            return Vec::new();
        }
        tokens
            .iter()
            .filter_map(|t| chat_entry(self.codec.as_ref(), t))
            .collect()
    }

    fn part(&self) -> OutputText {
        OutputText::new(self.text.clone(), self.logprobs.clone())
    }

    fn message(&self, status: ResponseStatus, content: Vec<OutputText>) -> OutputMessage {
        OutputMessage {
            id: self.message_id.clone(),
            kind: "message",
            status,
            role: "assistant",
            content,
        }
    }

    /// The response object in `status`, with `output` and `usage` as they stand.
    fn object(
        &self,
        status: ResponseStatus,
        output: Vec<OutputMessage>,
        usage: Option<ResponseUsage>,
    ) -> ResponseObject {
        let s = &self.settings;
        let done = matches!(
            status,
            ResponseStatus::Completed | ResponseStatus::Incomplete
        );
        ResponseObject {
            id: self.id.clone(),
            object: "response",
            created_at: self.created_at,
            status,
            completed_at: done.then(unix_now_s),
            background: false,
            error: None,
            incomplete_details: (status == ResponseStatus::Incomplete).then_some(
                IncompleteDetails {
                    reason: "max_output_tokens",
                },
            ),
            instructions: s.instructions.clone(),
            max_output_tokens: s.max_output_tokens,
            max_tool_calls: s.max_tool_calls,
            model: self.model.clone(),
            output,
            parallel_tool_calls: s.parallel_tool_calls,
            previous_response_id: None,
            prompt_cache_key: s.prompt_cache_key.clone(),
            reasoning: ReasoningConfig::default(),
            safety_identifier: s.safety_identifier.clone(),
            service_tier: "default",
            store: false,
            temperature: s.temperature,
            text: s.text.clone(),
            tool_choice: s.tool_choice.clone(),
            tools: Vec::new(),
            top_logprobs: s.top_logprobs,
            top_p: s.top_p,
            truncation: "disabled",
            usage,
            user: s.user.clone(),
            metadata: s.metadata.clone(),
        }
    }

    /// The finished response: `completed`, or `incomplete` when the token limit cut it.
    fn finish(&self, reason: WireFinish, usage: WireUsage) -> ResponseObject {
        let status = match reason {
            WireFinish::Length => ResponseStatus::Incomplete,
            WireFinish::Stop | WireFinish::Cancelled | WireFinish::Error => {
                ResponseStatus::Completed
            }
        };
        let usage = ResponseUsage::from(usage);
        self.object(
            status,
            vec![self.message(status, vec![self.part()])],
            Some(usage),
        )
    }

    /// `event: <type>` and `data: <json>`, numbered.
    fn event(&mut self, event: ResponseEvent) -> Bytes {
        let kind = event.kind();
        let numbered = StreamEvent {
            event,
            sequence_number: self.sequence_number,
        };
        self.sequence_number += 1;
        let json = serde_json::to_string(&numbered).expect("response events are JSON");
        Bytes::from(format!("event: {kind}\ndata: {json}\n\n"))
    }
}

impl ChunkFormat for ResponseEvents {
    fn opening(&mut self) -> Vec<Bytes> {
        let response = self.object(ResponseStatus::InProgress, Vec::new(), None);
        let item = self.message(ResponseStatus::InProgress, Vec::new());
        let part = self.part();
        let item_id = self.message_id.clone();
        vec![
            self.event(ResponseEvent::Created {
                response: response.clone(),
            }),
            self.event(ResponseEvent::InProgress { response }),
            self.event(ResponseEvent::OutputItemAdded {
                output_index: 0,
                item,
            }),
            self.event(ResponseEvent::ContentPartAdded {
                item_id,
                output_index: 0,
                content_index: 0,
                part,
            }),
        ]
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        let delta: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let logprobs = self.logprobs_of(tokens);
        // Tokens held back by the worker (a partial character) carry no text yet.
        if delta.is_empty() && logprobs.is_empty() {
            return None;
        }
        self.text.push_str(&delta);
        self.logprobs.extend(logprobs.iter().cloned());
        Some(self.event(ResponseEvent::OutputTextDelta {
            item_id: self.message_id.clone(),
            output_index: 0,
            content_index: 0,
            delta,
            logprobs,
        }))
    }

    fn finished(&mut self, reason: WireFinish, usage: WireUsage) -> Vec<Bytes> {
        let response = self.finish(reason, usage);
        let item = response.output[0].clone();
        let part = self.part();
        let item_id = self.message_id.clone();
        let last = match response.status {
            ResponseStatus::Incomplete => ResponseEvent::Incomplete { response },
            _ => ResponseEvent::Completed { response },
        };
        vec![
            self.event(ResponseEvent::OutputTextDone {
                item_id: item_id.clone(),
                output_index: 0,
                content_index: 0,
                text: self.text.clone(),
                logprobs: self.logprobs.clone(),
            }),
            self.event(ResponseEvent::ContentPartDone {
                item_id,
                output_index: 0,
                content_index: 0,
                part,
            }),
            self.event(ResponseEvent::OutputItemDone {
                output_index: 0,
                item,
            }),
            self.event(last),
        ]
    }

    /// `response.failed`, with the error and whatever text came before it.
    fn failed(&mut self, err: &ApiError) -> Vec<Bytes> {
        err.log();
        let body = err.public_body().error;
        let output = if self.text.is_empty() {
            Vec::new()
        } else {
            vec![self.message(ResponseStatus::Incomplete, vec![self.part()])]
        };
        let mut response = self.object(ResponseStatus::Failed, output, None);
        response.error = Some(ResponseError {
            code: body.code.unwrap_or("server_error"),
            message: body.message,
        });
        vec![self.event(ResponseEvent::Failed { response })]
    }

    /// The Responses API ends with its last event, without `data: [DONE]`.
    fn closing(&self) -> Option<Bytes> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::test_codec::Codec;
    use serde_json::json;

    fn events(include_logprobs: bool) -> ResponseEvents {
        let request: ResponsesRequest = serde_json::from_value(json!({"input": "x"})).unwrap();
        let limits = crate::validation::ModelLimits {
            served_model_name: "m".into(),
            max_model_len: 100,
            vocab_size: 10,
            tool_support: None,
            sampling_defaults: Default::default(),
        };
        let mut settings = validate_responses(&request, &limits).unwrap().echo;
        settings.include_logprobs = include_logprobs;
        ResponseEvents {
            id: "resp_1".into(),
            message_id: "msg_1".into(),
            created_at: 1,
            model: "m".into(),
            settings,
            codec: Arc::new(Codec),
            text: String::new(),
            logprobs: Vec::new(),
            sequence_number: 0,
        }
    }

    fn token(id: u32, text: &str) -> TokenEvent {
        TokenEvent {
            id,
            text: text.into(),
            logprob: Some(-0.5),
            top_logprobs: vec![],
        }
    }

    /// `event:` line, then the JSON whose `type` repeats it.
    fn parse(bytes: &Bytes) -> Value {
        let text = std::str::from_utf8(bytes).unwrap();
        let (event, data) = text.strip_suffix("\n\n").unwrap().split_once('\n').unwrap();
        let value: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(event.strip_prefix("event: ").unwrap(), value["type"]);
        value
    }

    /// The whole stream of a response cut by its token limit: the documented event order,
    /// sequence numbers 0, 1, 2, ..., and the `.done` events carrying the whole text.
    #[test]
    fn a_stream_runs_through_the_documented_events() {
        let mut format = events(true);
        let mut sent = format.opening();
        sent.extend(format.tokens(&[token(1, "Hel")]));
        assert!(format.tokens(&[]).is_none());
        sent.extend(format.tokens(&[token(2, "lo")]));
        sent.extend(format.finished(
            WireFinish::Length,
            WireUsage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_tokens: 0,
            },
        ));
        assert!(format.closing().is_none(), "no [DONE]");
        let events: Vec<Value> = sent.iter().map(parse).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        assert_eq!(events[0]["response"]["status"], "in_progress");
        assert_eq!(events[0]["response"]["output"], json!([]));
        assert_eq!(events[2]["item"]["status"], "in_progress");
        assert_eq!(events[4]["delta"], "Hel");
        assert_eq!(
            events[4]["logprobs"],
            json!([{"token": "t1", "logprob": -0.5, "bytes": [116, 49], "top_logprobs": []}])
        );
        assert_eq!(events[6]["text"], "Hello");
        assert_eq!(events[7]["part"]["text"], "Hello");
        assert_eq!(events[8]["item"]["status"], "incomplete");
        let last = &events[9]["response"];
        assert_eq!(last["status"], "incomplete");
        assert_eq!(last["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(last["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(last["usage"]["total_tokens"], 7);
    }

    #[test]
    fn a_failure_mid_stream_is_response_failed_with_the_text_so_far() {
        let mut format = events(false);
        format.opening();
        format.tokens(&[token(1, "Hi")]).unwrap();
        let sent = format.failed(&ApiError::Stalled { timeout_ms: 5 });
        assert_eq!(sent.len(), 1);
        let event = parse(&sent[0]);
        assert_eq!(event["type"], "response.failed");
        assert_eq!(event["sequence_number"], 5);
        assert_eq!(event["response"]["status"], "failed");
        assert_eq!(event["response"]["error"]["code"], "timeout");
        assert_eq!(event["response"]["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(
            event["response"]["output"][0]["content"][0]["logprobs"],
            json!([])
        );
    }

    #[test]
    fn a_response_that_stopped_is_completed() {
        let object = events(false).completed(Completed {
            prompt_logprobs: Vec::new(),
            tokens: vec![token(1, "Hi"), token(2, ".")],
            reason: WireFinish::Stop,
            usage: WireUsage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 0,
            },
        });
        let value = serde_json::to_value(object).unwrap();
        assert_eq!(value["status"], "completed");
        assert_eq!(value["incomplete_details"], Value::Null);
        assert_eq!(value["output"][0]["status"], "completed");
        assert_eq!(value["output"][0]["content"][0]["text"], "Hi.");
        assert_eq!(value["store"], false);
        assert!(value["completed_at"].is_u64());
    }
}
