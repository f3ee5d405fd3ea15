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
use tandem_protocol::messages::{FinishReason, PromptLogprob, TokenEvent, Usage};

use futures::StreamExt;
use futures::stream::{LocalBoxStream, SelectAll};

use crate::disconnect::{ClientSocket, client_gone};
use crate::dispatch::samples::batch_usage;
use crate::dispatch::{GenEvent, Generation};
use crate::error::ApiError;
pub use crate::event_stream::{SSE_DONE, sse_data};

/// Turns one choice's generation events into one endpoint's SSE chunks (`data: {json}\n\n`
/// each); a request with `n` choices has `n` formats, each naming its choice's `index`.
pub trait ChunkFormat: 'static {
    /// Chunks sent before any token (the chat role chunk).
    fn opening(&mut self) -> Vec<Bytes>;
    /// The prompt's logprobs (a job that asked for them), before any token: kept for the
    /// chunk that echoes the prompt. Formats that never ask ignore them.
    fn prompt_logprobs(&mut self, _logprobs: Vec<PromptLogprob>) {}
    /// The chunk carrying `tokens`, if they carry anything a client would see.
    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes>;
    /// The chunks that end this choice: its finish reason (and `usage`, this choice's, for a
    /// format that reports it there: the Responses API's last event).
    fn finished(&mut self, reason: FinishReason, usage: Usage) -> Vec<Bytes>;
    /// With `include_usage`, the last chunk: the usage of the whole request (every choice).
    fn usage(&self, _usage: Usage) -> Option<Bytes> {
        None
    }
    /// The prompt this choice answers, in a batch of prompts (`/v1/completions`): the usage
    /// counts each prompt once, however many choices answer it.
    fn prompt_index(&self) -> usize {
        0
    }
    /// What the client sees when a choice fails after the stream has started.
    fn failed(&mut self, err: &ApiError) -> Vec<Bytes> {
        vec![err.sse_event()]
    }
    /// The stream's last line, after the finish or the failure.
    fn closing(&self) -> Option<Bytes> {
        Some(Bytes::from_static(SSE_DONE))
    }
}

/// A `text/event-stream` response carrying [`sse_body`], cut short when the client on
/// `socket` goes away (a half-close is not a write error, so actix alone would go on).
pub fn sse_response<F: ChunkFormat>(
    choices: Vec<(Generation, F)>,
    socket: Option<Arc<ClientSocket>>,
) -> HttpResponse {
    sse_stream_response(sse_body(choices), socket)
}

/// [`sse_response`] of a `body` made from [`sse_body`] (with more done between its chunks).
pub fn sse_stream_response<S>(body: S, socket: Option<Arc<ClientSocket>>) -> HttpResponse
where
    S: futures::Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
{
    let body = body.take_until(Box::pin(client_gone(socket)));
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// One choice's events, tagged with its place among the request's choices.
type ChoiceEvents = LocalBoxStream<'static, (usize, Result<GenEvent, ApiError>)>;

fn choice_events(index: usize, generation: Generation) -> ChoiceEvents {
    futures::stream::unfold(generation, move |mut generation| async move {
        let event = generation.next().await?;
        Some(((index, event), generation))
    })
    .boxed_local()
}

/// What a streamed response holds between two chunks.
struct Body<F> {
    /// Every choice's events, as they come; `None` once the response has ended.
    events: Option<SelectAll<ChoiceEvents>>,
    formats: Vec<F>,
    queue: VecDeque<Bytes>,
    /// Each choice's usage, once it finished.
    usages: Vec<Option<Usage>>,
}

/// The SSE body of a streamed response: each choice's chunks as its tokens come (choices
/// interleave; every chunk names its choice's `index`), the usage of the whole request once
/// every choice has finished, the format's failure events if any choice fails mid-way, and
/// the format's closing line last (`data: [DONE]`, or nothing for the Responses API). Dropping the stream (client gone, or a choice failed) drops every choice's
/// [`Generation`] and so cancels them on the bus.
pub fn sse_body<F: ChunkFormat>(
    choices: Vec<(Generation, F)>,
) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> {
    let mut body = Body {
        events: None,
        formats: Vec::new(),
        queue: VecDeque::new(),
        usages: vec![None; choices.len()],
    };
    let mut streams = Vec::new();
    for (index, (generation, mut format)) in choices.into_iter().enumerate() {
        body.queue.extend(format.opening());
        body.formats.push(format);
        streams.push(choice_events(index, generation));
    }
    body.events = Some(futures::stream::select_all(streams));
    futures::stream::unfold(body, |mut body| async move {
        loop {
            if let Some(chunk) = body.queue.pop_front() {
                return Some((Ok(chunk), body));
            }
            let events = body.events.as_mut()?;
            match events.next().await {
                Some((index, Ok(GenEvent::PromptLogprobs(logprobs)))) => {
                    body.formats[index].prompt_logprobs(logprobs);
                }
                // Embedding jobs are never streamed.
                Some((_, Ok(GenEvent::Embedding(_)))) => {}
                Some((index, Ok(GenEvent::Tokens(tokens)))) => {
                    body.queue.extend(body.formats[index].tokens(&tokens));
                }
                Some((index, Ok(GenEvent::Finished { reason, usage }))) => {
                    body.queue
                        .extend(body.formats[index].finished(reason, usage));
                    body.usages[index] = Some(usage);
                    if body.usages.iter().all(Option::is_some) {
                        let total = batch_usage(
                            body.formats
                                .iter()
                                .map(ChunkFormat::prompt_index)
                                .zip(body.usages.iter().flatten().copied()),
                        );
                        body.queue.extend(body.formats[0].usage(total));
                        body.queue.extend(body.formats[0].closing());
                        body.events = None;
                    }
                }
                Some((index, Err(err))) => {
                    body.queue.extend(body.formats[index].failed(&err));
                    body.queue.extend(body.formats[index].closing());
                    body.events = None;
                }
                None => body.events = None,
            }
        }
    })
}
