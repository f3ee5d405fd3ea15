//! The api-server's one error type and the two places it is shown to clients: as an HTTP
//! response ([`actix_web::ResponseError`]) and as an SSE error event in the middle of a stream
//! ([`ApiError::sse_event`]).
//!
//! What a client sees is [`ApiError::public_body`]: OpenAI's `{"error": {message, type, param,
//! code}}`. Operator details (bus errors, tokenizer internals) are logged when the error is
//! shown and never put in the body.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use bytes::Bytes;

use tandem_protocol::messages::GenerateJob;
use tandem_protocol::payload::{TooLarge, prompt_tokens_within};

use crate::openai::{ErrorBody, ErrorResponse};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or a field has the wrong type.
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// A well-formed request with a value we cannot serve.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("the model `{model}` does not exist")]
    ModelNotFound { model: String },
    /// A stored-response route (`GET /v1/responses/{id}`, ...) for a response this api-server
    /// does not hold for the request's key.
    #[error("no stored response `{id}` for this key on this api-server")]
    ResponseNotFound { id: String },
    /// A stored-response route for a response another api-server made, which cannot be
    /// reached now (it stopped): `detail` says so.
    #[error("{detail}")]
    ResponseGone { detail: String },
    /// A conversation route (`/v1/conversations/{id}`, ...) or a response's `conversation`
    /// naming a conversation no api-server holds for the request's key.
    #[error("no conversation `{id}` for this key")]
    ConversationNotFound { id: String },
    /// A conversation's item route for an item the conversation does not have.
    #[error("conversation `{conversation}` has no item `{item}`")]
    ConversationItemNotFound { conversation: String, item: String },
    /// A conversation another api-server made, which cannot be reached now: `detail` says so.
    #[error("{detail}")]
    ConversationGone { detail: String },
    /// No route has this path ([`crate::routes::unrouted`]); `served` says what the path is
    /// when OpenAI's API has it (`/v1/embeddings`: "embeddings").
    #[error("no route {method} {path}")]
    UnknownRoute {
        method: String,
        path: String,
        served: Option<&'static str>,
    },
    /// The path is a route, not for this method.
    #[error("{method} is not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("no live worker is serving this model")]
    NoLiveWorker,
    #[error("worker {worker_id} did not accept the request within {timeout_ms} ms")]
    NotAccepted { worker_id: String, timeout_ms: u64 },
    #[error("no token within {timeout_ms} ms of the request being accepted")]
    FirstTokenTimeout { timeout_ms: u64 },
    #[error("the token stream stalled for {timeout_ms} ms")]
    Stalled { timeout_ms: u64 },
    #[error("request exceeded its time limit of {timeout_ms} ms")]
    RequestTimeout { timeout_ms: u64 },
    /// The worker reported a failure; its message is meant for clients.
    #[error("worker error: {message}")]
    Worker { message: String },
    #[error("the worker serving this request was cancelled or went away: {detail}")]
    WorkerGone { detail: String },
    /// A `tokens` message skipped positions: tokens were lost on the bus.
    #[error("the token stream skipped from token {expected} to {got}")]
    StreamGap { expected: u32, got: u32 },
    /// A job of a request under way (a local-prefill retry, a migration with the tokens
    /// generated so far) does not fit in the NATS server's `max_payload`. (The first job of a
    /// request is checked at the edge: a 400, [`ApiError::prompt_too_large`].)
    #[error("the {job} is {too_large}")]
    JobTooLarge {
        job: &'static str,
        too_large: TooLarge,
    },
    #[error("message bus error while {action}: {detail}")]
    Bus {
        action: &'static str,
        detail: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// No `Authorization: Bearer <key>` with a configured key ([`crate::auth`]).
    #[error("missing or invalid API key")]
    Unauthorized,
    /// `--max-pending-requests` requests are in flight ([`crate::admission`]).
    #[error("{max} requests are in flight, the most this server holds")]
    Overloaded { max: usize },
    /// Every worker that could take the request has a full queue (its heartbeat says so, or
    /// it refused the job).
    #[error("every {pool} worker's queue is full")]
    WorkersFull { pool: &'static str },
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: &str) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// A 400 with code `unknown_parameter`: `param` is a field the object it sits in does not
    /// have (a misspelling, a field of another shape).
    pub fn unknown_field(what: &str, param: &str) -> Self {
        let name = param.rsplit('.').next().unwrap_or(param);
        ApiError::InvalidRequest {
            message: format!("Unknown parameter: '{param}'. {what} has no field {name:?}."),
            param: Some(param.to_string()),
            code: Some("unknown_parameter"),
        }
    }

    /// A 400 with code `unsupported_parameter`: `param` asks for something tandem does not
    /// serve (a feature, not a malformed value).
    pub fn unsupported(message: impl Into<String>, param: &str) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
        }
    }

    /// The 400 of a request whose first job does not fit in a message of the NATS server's
    /// `max_payload` (`too_large`): it names the prompt's field (`param`: `messages` or
    /// `prompt`) and says how many of the prompt's tokens fit. When even an empty prompt
    /// would not fit, the stop sequences are what is too large.
    pub fn prompt_too_large(job: &GenerateJob, too_large: TooLarge, param: &str) -> Self {
        let TooLarge { bytes, max_payload } = too_large;
        let fit = prompt_tokens_within(job, bytes, max_payload);
        let stop_bytes: usize = job.stop.strings.iter().map(String::len).sum();
        if fit == 0 && stop_bytes > 0 {
            return ApiError::InvalidRequest {
                message: format!(
                    "The stop sequences ({stop_bytes} bytes) leave no room for the prompt in a \
                     message of the {max_payload} bytes that this deployment's message bus \
                     (the NATS server's max_payload) carries. Send shorter stop sequences."
                ),
                param: Some("stop".into()),
                code: Some("request_too_large"),
            };
        }
        let tokens = job.prompt_ids.len();
        ApiError::InvalidRequest {
            message: format!(
                "The {param} is {tokens} tokens long; this deployment's message bus carries at \
                 most {max_payload} bytes in one message (the NATS server's max_payload), which \
                 holds at most {fit} tokens of this {param} ({bytes} bytes were needed). Please \
                 shorten the {param}, or ask the operator to raise the NATS server's \
                 max_payload."
            ),
            param: Some(param.into()),
            code: Some("prompt_too_large"),
        }
    }

    pub fn bus(action: &'static str, detail: impl std::fmt::Display) -> Self {
        ApiError::Bus {
            action,
            detail: detail.to_string(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound { .. }
            | ApiError::ResponseNotFound { .. }
            | ApiError::ResponseGone { .. }
            | ApiError::ConversationNotFound { .. }
            | ApiError::ConversationItemNotFound { .. }
            | ApiError::ConversationGone { .. }
            | ApiError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoLiveWorker | ApiError::NotAccepted { .. } | ApiError::Bus { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::FirstTokenTimeout { .. }
            | ApiError::Stalled { .. }
            | ApiError::RequestTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::WorkerGone { .. }
            | ApiError::StreamGap { .. }
            | ApiError::JobTooLarge { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Worker { .. } | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Overloaded { .. } | ApiError::WorkersFull { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// Short label for the `outcome` of the requests metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) | ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::ResponseNotFound { .. }
            | ApiError::ResponseGone { .. }
            | ApiError::ConversationNotFound { .. }
            | ApiError::ConversationItemNotFound { .. }
            | ApiError::ConversationGone { .. }
            | ApiError::UnknownRoute { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "invalid_request",
            ApiError::NoLiveWorker | ApiError::NotAccepted { .. } => "unavailable",
            ApiError::FirstTokenTimeout { .. }
            | ApiError::Stalled { .. }
            | ApiError::RequestTimeout { .. } => "timeout",
            ApiError::Worker { .. }
            | ApiError::WorkerGone { .. }
            | ApiError::StreamGap { .. }
            | ApiError::JobTooLarge { .. } => "worker_error",
            ApiError::Bus { .. } | ApiError::Internal(_) => "internal_error",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Overloaded { .. } | ApiError::WorkersFull { .. } => "overloaded",
        }
    }

    /// What the client is told. Internal variants get a generic message; the details are
    /// logged by [`ApiError::log`].
    pub fn public_body(&self) -> ErrorResponse {
        let (kind, param, code, message) = match self {
            ApiError::InvalidJson(_) => ("invalid_request_error", None, None, self.to_string()),
            ApiError::InvalidRequest {
                message,
                param,
                code,
            } => (
                "invalid_request_error",
                param.clone(),
                *code,
                message.clone(),
            ),
            ApiError::ModelNotFound { .. } => (
                "invalid_request_error",
                Some("model".to_string()),
                Some("model_not_found"),
                self.to_string(),
            ),
            ApiError::ResponseNotFound { id } => (
                "invalid_request_error",
                None,
                Some("response_not_found"),
                format!(
                    "No response found with id '{id}'. tandem keeps a response (store: true) \
                     in the memory of the api-server that made it (where every api-server of \
                     the deployment finds it), for the API key that made it, until its \
                     response store needs the room or that server stops."
                ),
            ),
            ApiError::ResponseGone { detail } => (
                "invalid_request_error",
                None,
                Some("response_not_found"),
                detail.clone(),
            ),
            ApiError::ConversationNotFound { id } => (
                "invalid_request_error",
                None,
                Some("conversation_not_found"),
                format!(
                    "Conversation with id '{id}' not found. tandem keeps a conversation in the \
                     memory of the api-server that made it (where every api-server of the \
                     deployment finds it), for the API key that made it, until it is deleted, \
                     its store (--response-store-mib) needs the room, or that server stops."
                ),
            ),
            ApiError::ConversationItemNotFound { conversation, item } => (
                "invalid_request_error",
                None,
                Some("item_not_found"),
                format!("Item with id '{item}' not found in conversation '{conversation}'."),
            ),
            ApiError::ConversationGone { detail } => (
                "invalid_request_error",
                None,
                Some("conversation_not_found"),
                detail.clone(),
            ),
            ApiError::UnknownRoute {
                method,
                path,
                served,
            } => (
                "invalid_request_error",
                None,
                Some("unknown_url"),
                match served {
                    Some(what) => format!(
                        "Invalid URL ({method} {path}): tandem serves text generation from one \
                         language model; {what} is not served. docs/api.md lists the endpoints."
                    ),
                    None => format!(
                        "Invalid URL ({method} {path}): no such route. tandem serves POST \
                         /v1/chat/completions, POST /v1/completions, POST /v1/responses and GET \
                         /v1/models (docs/api.md lists every endpoint)."
                    ),
                },
            ),
            ApiError::MethodNotAllowed {
                method,
                path,
                allowed,
            } => (
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
                format!("{method} is not allowed on {path}; use {allowed}."),
            ),
            ApiError::NoLiveWorker => (
                "server_error",
                None,
                Some("no_live_worker"),
                "No live worker is serving this model; try again when one has joined.".to_string(),
            ),
            ApiError::NotAccepted { timeout_ms, .. } => (
                "server_error",
                None,
                Some("worker_unavailable"),
                format!("No worker accepted the request within {timeout_ms} ms; try again later."),
            ),
            ApiError::FirstTokenTimeout { .. }
            | ApiError::Stalled { .. }
            | ApiError::RequestTimeout { .. } => {
                ("server_error", None, Some("timeout"), self.to_string())
            }
            ApiError::Worker { message } => {
                ("server_error", None, Some("worker_error"), message.clone())
            }
            ApiError::WorkerGone { .. } => (
                "server_error",
                None,
                Some("worker_error"),
                "The worker serving this request stopped before finishing it.".to_string(),
            ),
            ApiError::StreamGap { .. } => (
                "server_error",
                None,
                Some("worker_error"),
                "Tokens of this response were lost between the worker and the server.".to_string(),
            ),
            ApiError::JobTooLarge { too_large, .. } => (
                "server_error",
                None,
                Some("payload_too_large"),
                format!(
                    "The worker serving this request failed, and the request is too large to \
                     move to another worker: with the tokens generated so far it takes {} \
                     bytes, more than the {} bytes this deployment's message bus carries in \
                     one message (the NATS server's max_payload).",
                    too_large.bytes, too_large.max_payload
                ),
            ),
            ApiError::Bus { .. } => (
                "server_error",
                None,
                Some("service_unavailable"),
                "The server cannot reach its workers right now.".to_string(),
            ),
            ApiError::Internal(_) => (
                "server_error",
                None,
                None,
                "The server had an internal error.".to_string(),
            ),
            ApiError::Unauthorized => (
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
                "Missing or invalid API key: send it as `Authorization: Bearer <key>`.".to_string(),
            ),
            ApiError::Overloaded { max } => (
                "server_error",
                None,
                Some("overloaded"),
                format!(
                    "The server holds {max} requests already, the most it takes at once; retry \
                     after a moment."
                ),
            ),
            ApiError::WorkersFull { .. } => (
                "server_error",
                None,
                Some("overloaded"),
                "Every worker serving this model has a full queue; retry after a moment."
                    .to_string(),
            ),
        };
        ErrorResponse {
            error: ErrorBody {
                message,
                kind,
                param,
                code,
            },
        }
    }

    /// Logs the full error for the operator: server-side failures as errors, client mistakes
    /// at debug level so a misbehaving client cannot flood the log.
    pub fn log(&self) {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
    }

    /// The SSE event sent when the stream has already started (status 200 is on the wire):
    /// `data: {"error": {...}}`, as vLLM does; the stream then ends with `data: [DONE]`.
    pub fn sse_event(&self) -> Bytes {
        self.log();
        crate::event_stream::sse_data(&self.public_body())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let mut response = HttpResponse::build(self.status());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        if matches!(
            self,
            ApiError::Overloaded { .. } | ApiError::WorkersFull { .. }
        ) {
            response.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        if let ApiError::MethodNotAllowed { allowed, .. } = self {
            response.insert_header((actix_web::http::header::ALLOW, *allowed));
        }
        response.json(self.public_body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn invalid_request_body_has_openai_shape() {
        let err = ApiError::invalid("temperature must be in [0, 2], got 3", "temperature");
        assert_eq!(err.status_code(), StatusCode::BAD_REQUEST);
        assert_eq!(
            serde_json::to_value(err.public_body()).unwrap(),
            json!({"error": {"message": "temperature must be in [0, 2], got 3",
                             "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
    }

    #[test]
    fn operator_details_stay_out_of_the_body() {
        let err = ApiError::bus("publishing the job", "connection refused to 10.0.0.5:4222");
        assert_eq!(err.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        let body = serde_json::to_string(&err.public_body()).unwrap();
        assert!(!body.contains("10.0.0.5"), "{body}");
        let body =
            serde_json::to_string(&ApiError::Internal("secret path /x".into()).public_body())
                .unwrap();
        assert!(!body.contains("/x"), "{body}");
    }

    fn job(prompt_ids: Vec<u32>, stop: &[&str]) -> GenerateJob {
        GenerateJob {
            request_id: "cmpl-1".into(),
            prompt_ids,
            sampling: Default::default(),
            stop: tandem_protocol::messages::StopSpec {
                max_tokens: 4,
                strings: stop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            stream_subject: "tandem.m.stream.cmpl-1".into(),
            deadline_unix_ms: Some(1),
            kv: None,
            kv_reader: None,
            resume_ids: vec![],
            samples: None,
            cache_salt: None,
            priority: 0,
            prediction_ids: Vec::new(),
            embedding: false,
            lora: None,
        }
    }

    #[test]
    fn a_prompt_too_large_for_the_bus_is_a_400_saying_how_many_tokens_fit() {
        let long = job((0..1000).collect(), &[]);
        let bytes = tandem_protocol::messages::encode(&long).len();
        let max_payload = bytes - 400;
        let fit = prompt_tokens_within(&long, bytes, max_payload);
        assert!(fit > 800 && fit < 1000, "{fit}");
        let err = ApiError::prompt_too_large(&long, TooLarge { bytes, max_payload }, "messages");
        assert_eq!(err.status_code(), StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(err.public_body()).unwrap();
        assert_eq!(body["error"]["param"], "messages");
        assert_eq!(body["error"]["code"], "prompt_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap();
        for needle in [
            "1000 tokens".to_string(),
            format!("at most {fit} tokens"),
            format!("{max_payload} bytes"),
            "max_payload".into(),
        ] {
            assert!(message.contains(&needle), "{needle:?} in {message}");
        }
        // Stop sequences that leave no room for any prompt are what the client must change.
        let stopped = job(vec![1, 2], &[&"x".repeat(4000)]);
        let bytes = tandem_protocol::messages::encode(&stopped).len();
        let err = ApiError::prompt_too_large(
            &stopped,
            TooLarge {
                bytes,
                max_payload: 1000,
            },
            "prompt",
        );
        let body = serde_json::to_value(err.public_body()).unwrap();
        assert_eq!(body["error"]["param"], "stop");
    }

    #[test]
    fn a_migration_too_large_for_the_bus_is_a_clear_502() {
        let err = ApiError::JobTooLarge {
            job: "migrated job",
            too_large: TooLarge {
                bytes: 2_000_000,
                max_payload: 1_048_576,
            },
        };
        assert_eq!(err.status_code(), StatusCode::BAD_GATEWAY);
        assert_eq!(err.outcome(), "worker_error");
        let body = serde_json::to_value(err.public_body()).unwrap();
        assert_eq!(body["error"]["code"], "payload_too_large");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("2000000 bytes") && message.contains("max_payload"),
            "{message}"
        );
    }

    #[test]
    fn full_queues_are_429_overloaded_with_retry_after() {
        for err in [
            ApiError::Overloaded { max: 4 },
            ApiError::WorkersFull { pool: "generation" },
        ] {
            assert_eq!(err.status_code(), 429);
            assert_eq!(err.outcome(), "overloaded");
            let response = err.error_response();
            assert_eq!(response.headers().get("retry-after").unwrap(), "1", "{err}");
            let body = serde_json::to_value(err.public_body()).unwrap();
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
            assert_eq!(body["error"]["type"], "server_error");
        }
    }

    #[test]
    fn statuses_follow_the_failure() {
        assert_eq!(ApiError::NoLiveWorker.status_code(), 503);
        assert_eq!(ApiError::Stalled { timeout_ms: 1 }.status_code(), 504);
        assert_eq!(
            ApiError::ModelNotFound { model: "x".into() }.status_code(),
            404
        );
        let event = ApiError::Stalled { timeout_ms: 5 }.sse_event();
        let text = std::str::from_utf8(&event).unwrap();
        assert!(
            text.starts_with("data: {\"error\":") && text.ends_with("\n\n"),
            "{text}"
        );
    }
}
