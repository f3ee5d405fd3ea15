//! Server-sent events: the `text/event-stream` response of a streamed generation. Each
//! endpoint says how its events look ([`ChunkFormat`]); this module frames them
//! (`data: {json}\n\n`), puts a failure mid-stream as the format's error event (by default
//! [`ApiError::sse_event`](crate::error::ApiError::sse_event)) and ends every stream with the
//! format's closing line (`data: [DONE]` for the completion endpoints; the Responses API sends
//! none, its last event says the response ended).

use std::collections::VecDeque;
use std::sync::Arc;

use actix_web::HttpResponse;
use bytes::Bytes;
use tandem_protocol::messages::{FinishReason, TokenEvent, Usage};

use futures::StreamExt;

use crate::disconnect::{ClientSocket, client_gone};
use crate::dispatch::{GenEvent, Generation};
use crate::error::ApiError;

/// Turns generation events into one endpoint's SSE chunks (`data: {json}\n\n` each).
pub trait ChunkFormat: 'static {
    /// Chunks sent before any token (the chat role chunk).
    fn opening(&mut self) -> Vec<Bytes>;
    /// The chunk carrying `tokens`, if they carry anything a client would see.
    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes>;
    /// The finish chunk and, with `include_usage`, the usage chunk.
    fn finished(&mut self, reason: FinishReason, usage: Usage) -> Vec<Bytes>;
    /// What the client sees when the generation fails after the stream has started.
    fn failed(&mut self, err: &ApiError) -> Vec<Bytes> {
        vec![err.sse_event()]
    }
    /// The stream's last line, after the finish or the failure.
    fn closing(&self) -> Option<Bytes> {
        Some(Bytes::from_static(SSE_DONE))
    }
}

/// `data: {json}\n\n`.
pub fn sse_data<T: serde::Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).expect("response chunks are JSON-representable");
    Bytes::from(format!("data: {json}\n\n"))
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// A `text/event-stream` response carrying [`sse_body`], cut short when the client on
/// `socket` goes away (a half-close is not a write error, so actix alone would go on).
pub fn sse_response<F: ChunkFormat>(
    generation: Generation,
    format: F,
    socket: Option<Arc<ClientSocket>>,
) -> HttpResponse {
    let body = sse_body(generation, format).take_until(Box::pin(client_gone(socket)));
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// The SSE body of a streamed response: the format's chunks, an error event if the generation
/// fails mid-way, and `data: [DONE]` last. Dropping the stream (client gone) drops the
/// [`Generation`] and so cancels the request on the bus.
pub fn sse_body<F: ChunkFormat>(
    generation: Generation,
    mut format: F,
) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
    let queue: VecDeque<Bytes> = format.opening().into();
    futures::stream::unfold(
        (Some(generation), format, queue),
        |(mut generation, mut format, mut queue)| async move {
            loop {
                if let Some(chunk) = queue.pop_front() {
                    return Some((Ok(chunk), (generation, format, queue)));
                }
                let running = generation.as_mut()?;
                match running.next().await {
                    Some(Ok(GenEvent::Tokens(tokens))) => {
                        queue.extend(format.tokens(&tokens));
                    }
                    Some(Ok(GenEvent::Finished { reason, usage })) => {
                        queue.extend(format.finished(reason, usage));
                        queue.extend(format.closing());
                        generation = None;
                    }
                    Some(Err(err)) => {
                        queue.extend(format.failed(&err));
                        queue.extend(format.closing());
                        generation = None;
                    }
                    None => generation = None,
                }
            }
        },
    )
}
