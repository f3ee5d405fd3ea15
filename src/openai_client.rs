//! A small blocking client for OpenAI-compatible servers (ours or any other), shared by
//! `tandem bench` and `examples/disagg_client.rs`: one request to `/v1/chat/completions` or
//! `/v1/completions`, streamed (Server-Sent Events) or not, with the arrival time of every
//! streamed piece of text, which is what latency measurements need.
//!
//! Blocking on purpose (ureq, one thread per in-flight request): a load generator's concurrency
//! is tens to hundreds of requests, and a thread each keeps the timing free of an async
//! runtime's scheduling. ureq is already the HTTP client of the end-to-end tests.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Which OpenAI endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/chat/completions`, the prompt as one user message.
    Chat,
    /// `/v1/completions`, the prompt as raw text.
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status; `message` is the OpenAI error body's
    /// `error.message` when there is one.
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("{0}")]
    Transport(String),
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// The stream ended with an error event (the server gave up mid-way).
    #[error("stream error: {0}")]
    Stream(String),
    /// The request cannot be sent to that endpoint.
    #[error("{0}")]
    Request(String),
}

/// One request.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub stream: bool,
    pub temperature: f32,
    /// Nucleus sampling (`top_p`); `None` leaves it out (the server's default, 1).
    pub top_p: Option<f32>,
    /// Ask the server to generate exactly `max_tokens` (vLLM's and tandem's `ignore_eos`;
    /// servers that do not know it ignore it).
    pub ignore_eos: bool,
}

/// A request's prompt: text, token ids (`/v1/completions` only: the OpenAI API takes an
/// array of token ids as a prompt), or a conversation (`/v1/chat/completions` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One user message on the chat endpoint; the raw prompt on completions.
    Text(String),
    Tokens(Vec<u32>),
    Messages(Vec<Message>),
}

/// One message of a chat conversation, as the OpenAI API takes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// What came back, with timings relative to when the request was sent.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub text: String,
    /// Arrival of each streamed piece of text (one entry for a non-streamed reply).
    pub token_times: Vec<Duration>,
    pub total: Duration,
    pub finish_reason: Option<String>,
    /// From the `usage` object (streamed: the final chunk, with `include_usage`).
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens the server took from its prefix cache instead of computing them
    /// (`usage.prompt_tokens_details.cached_tokens`); `None` when the server does not say,
    /// which is not the same as none cached.
    pub cached_tokens: Option<u64>,
}

impl Reply {
    /// Time to the first piece of text.
    pub fn ttft(&self) -> Option<Duration> {
        self.token_times.first().copied()
    }

    /// Output tokens: the server's count, else the number of streamed pieces.
    pub fn output_tokens(&self) -> u64 {
        self.completion_tokens
            .unwrap_or(self.token_times.len() as u64)
    }
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
}

impl Client {
    /// `base` is the API root, e.g. `http://127.0.0.1:8000/v1`; `timeout` bounds each request
    /// as a whole, so a stuck server never hangs the caller.
    pub fn new(base: &str, api_key: Option<String>, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_idle_connections_per_host(512)
            .build()
            .into();
        Client {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The server's Prometheus exposition at `/metrics` beside the API root (`…/v1` ->
    /// `…/metrics`), with the API key if any.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        self.get(&format!("{root}/metrics"))
    }

    /// Ids of `/v1/models`.
    pub fn models(&self) -> Result<Vec<String>, ClientError> {
        let body = self.get(&format!("{}/models", self.base))?;
        let value: Value =
            serde_json::from_str(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(value["data"]
            .as_array()
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The body of a GET of `url` (with the API key if any) that answered 200.
    fn get(&self, url: &str) -> Result<String, ClientError> {
        let mut request = self.agent.get(url);
        if let Some(key) = &self.api_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let body = response.into_body().read_to_string().map_err(transport)?;
        if status != 200 {
            return Err(status_error(status, &body));
        }
        Ok(body)
    }

    /// Sends `request` to `endpoint`; `on_text` sees each piece of text as it arrives.
    pub fn send(
        &self,
        endpoint: Endpoint,
        request: &Request,
        mut on_text: impl FnMut(&str),
    ) -> Result<Reply, ClientError> {
        let mut body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": request.stream,
        });
        match (endpoint, &request.prompt) {
            (Endpoint::Chat, Prompt::Text(text)) => {
                body["messages"] = json!([{"role": "user", "content": text}]);
            }
            (Endpoint::Chat, Prompt::Messages(messages)) => body["messages"] = json!(messages),
            (Endpoint::Chat, Prompt::Tokens(_)) => {
                return Err(ClientError::Request(
                    "a prompt of token ids needs the completions endpoint".into(),
                ));
            }
            (Endpoint::Completions, Prompt::Text(text)) => body["prompt"] = json!(text),
            (Endpoint::Completions, Prompt::Tokens(ids)) => body["prompt"] = json!(ids),
            (Endpoint::Completions, Prompt::Messages(_)) => {
                return Err(ClientError::Request(
                    "a prompt of chat messages needs the chat endpoint".into(),
                ));
            }
        }
        if let Some(top_p) = request.top_p {
            body["top_p"] = json!(top_p);
        }
        if request.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if request.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let mut http = self
            .agent
            .post(format!("{}{}", self.base, endpoint.path()))
            .header("content-type", "application/json");
        if let Some(key) = &self.api_key {
            http = http.header("authorization", format!("Bearer {key}"));
        }
        let sent = Instant::now();
        let response = http.send(body.to_string()).map_err(transport)?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.into_body().read_to_string().unwrap_or_default();
            return Err(status_error(status, &text));
        }
        let mut reply = Reply::default();
        if !request.stream {
            let text = response.into_body().read_to_string().map_err(transport)?;
            let value: Value =
                serde_json::from_str(&text).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let choice = &value["choices"][0];
            let content = match endpoint {
                Endpoint::Chat => choice["message"]["content"].as_str(),
                Endpoint::Completions => choice["text"].as_str(),
            }
            .ok_or_else(|| ClientError::Protocol(format!("no text in {value}")))?;
            on_text(content);
            reply.text = content.to_owned();
            reply.token_times.push(sent.elapsed());
            reply.finish_reason = choice["finish_reason"].as_str().map(str::to_owned);
            read_usage(&value, &mut reply);
            reply.total = sent.elapsed();
            return Ok(reply);
        }
        let reader = BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| ClientError::Transport(e.to_string()))?;
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let event: Value =
                serde_json::from_str(data).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(error) = event.get("error") {
                return Err(ClientError::Stream(
                    error["message"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_owned(),
                ));
            }
            read_usage(&event, &mut reply);
            let Some(choice) = event["choices"].get(0) else {
                continue;
            };
            let piece = match endpoint {
                Endpoint::Chat => choice["delta"]["content"].as_str(),
                Endpoint::Completions => choice["text"].as_str(),
            };
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                reply.token_times.push(sent.elapsed());
                reply.text.push_str(piece);
                on_text(piece);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                reply.finish_reason = Some(reason.to_owned());
            }
        }
        reply.total = sent.elapsed();
        if reply.finish_reason.is_none() {
            return Err(ClientError::Protocol(
                "the stream ended without a finish reason".into(),
            ));
        }
        Ok(reply)
    }
}

fn read_usage(value: &Value, reply: &mut Reply) {
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        reply.prompt_tokens = usage["prompt_tokens"].as_u64();
        reply.completion_tokens = usage["completion_tokens"].as_u64();
        reply.cached_tokens = cached_tokens(usage);
    }
}

/// `prompt_tokens_details.cached_tokens` of a `usage` object (OpenAI's field; vLLM, SGLang and
/// tandem fill it in), if there.
fn cached_tokens(usage: &Value) -> Option<u64> {
    usage
        .get("prompt_tokens_details")?
        .get("cached_tokens")?
        .as_u64()
}

fn transport(e: ureq::Error) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// The OpenAI error body's message, else the body itself (shortened).
fn status_error(status: u16, body: &str) -> ClientError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect());
    ClientError::Status { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_their_message() {
        let e = status_error(
            404,
            r#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error"}}"#,
        );
        assert_eq!(e.to_string(), "HTTP 404: The model `x` does not exist");
        let e = status_error(502, "bad gateway");
        assert_eq!(e.to_string(), "HTTP 502: bad gateway");
    }

    #[test]
    fn cached_tokens_come_from_the_usage_details_when_the_server_gives_them() {
        let usage = json!({"prompt_tokens": 300, "completion_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 256}});
        let mut reply = Reply::default();
        read_usage(&json!({ "usage": usage }), &mut reply);
        assert_eq!(reply.prompt_tokens, Some(300));
        assert_eq!(reply.cached_tokens, Some(256));
        // Zero is a count; a missing field or details object is no answer.
        let zero = json!({"prompt_tokens_details": {"cached_tokens": 0}});
        assert_eq!(cached_tokens(&zero), Some(0));
        assert_eq!(cached_tokens(&json!({"prompt_tokens": 3})), None);
        assert_eq!(cached_tokens(&json!({"prompt_tokens_details": null})), None);
        assert_eq!(
            cached_tokens(&json!({"prompt_tokens_details": {"audio_tokens": 0}})),
            None
        );
        // The streamed chunks before the last carry no usage and leave the count alone.
        read_usage(&json!({"choices": []}), &mut reply);
        read_usage(&json!({"usage": null}), &mut reply);
        assert_eq!(reply.cached_tokens, Some(256));
    }

    #[test]
    fn chat_messages_serialize_as_the_openai_api_takes_them() {
        let messages = vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "hello"),
        ];
        assert_eq!(
            json!(messages),
            json!([{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}])
        );
    }

    #[test]
    fn output_tokens_prefer_the_servers_count() {
        let mut reply = Reply {
            token_times: vec![Duration::from_millis(5); 3],
            ..Reply::default()
        };
        assert_eq!(reply.output_tokens(), 3);
        reply.completion_tokens = Some(4);
        assert_eq!(reply.output_tokens(), 4);
        assert_eq!(reply.ttft(), Some(Duration::from_millis(5)));
    }
}
