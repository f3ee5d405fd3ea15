//! `POST /v1/responses` (the Responses API, text in and out), streamed as typed events or not,
//! through the same dispatch as chat completions (admission, migration, disconnects, metrics);
//! a finished response kept in the api-server's [`StoredResponses`] (`store: true`), which
//! `previous_response_id` continues; and the stored-response routes (`GET`/`DELETE
//! /v1/responses/{id}`, its `input_items`, and `cancel`, which no response here needs).

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, delete, get, post, web};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tandem_protocol::messages::{
    FinishReason as WireFinish, GrammarSpec, TokenEvent, Usage as WireUsage,
};

use super::chat::{parser_text, piece_text, record_tool_calls};
use super::conversations::conversation_error;
use super::logprobs::chat_entry;
use super::stored::{
    self, Paging, conversation_item, no_query, no_query_but_include, owner_of, with_ids,
};
use super::{client_left, reasoning_splitter, start_generation, unless_client_leaves};
use crate::auth::TenantSalt;
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, Generation, RequestRecord};
use crate::error::ApiError;
use crate::fields::RESPONSES;
use crate::metrics::{Endpoint, Event, Metrics};
use crate::openai::ResponseInput;
use crate::openai::{
    ConversationRef, FunctionCallItem, IncompleteDetails, OutputItem, OutputMessage, OutputText,
    ReasoningConfig, ReasoningItem, ResponseError, ResponseEvent, ResponseObject, ResponseStatus,
    ResponseUsage, ResponsesRequest, StreamEvent, TokenLogprob,
};
use crate::prompt::PromptCodec;
use crate::prompt::tokenize;
use crate::reasoning::ReasoningSplitter;
use crate::response_store::{Cancelled, ContextError, EventsAfter, PeerError, StoredResponses};
use crate::sse::{ChunkFormat, sse_body, sse_stream_response};
use crate::state::{AppState, unix_now_s};
use crate::tools::parser::{CallParser, ParseEvent};
use crate::tools::{ToolRequest, new_call_id};
use crate::validation::responses::{
    ResponseSettings, Truncation, truncation_starts, validate_responses,
};
use crate::validation::{PromptInput, Role, Turn, ValidRequest};

#[post("/v1/responses")]
pub async fn create_response(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Responses);
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    let owner = owner_of(&request);
    let body = RESPONSES
        .parse::<ResponsesRequest>(body.into_inner())
        .inspect_err(|err| record.fail(err))?;
    let Continued {
        body,
        previous,
        conversation,
        input_items,
    } = continued(body, &state.responses, owner.as_deref())
        .await
        .inspect_err(|err| record.fail(err))?;
    let mut valid = validate_responses(&body, &state.limits).inspect_err(|err| record.fail(err))?;
    record.set_adapter(valid.request.lora.as_deref());
    if valid.background && !state.responses.enabled() {
        let err = ApiError::unsupported(
            "this api-server stores no responses (--response-store-mib 0), and a background \
             response is stored to be polled: background is not served here",
            "background",
        );
        record.fail(&err);
        return Err(err);
    }
    let background_items = valid.background.then(|| input_items.clone());
    let conversation = conversation.map(|id| ConversationTurn {
        store: Arc::clone(&state.responses),
        owner: owner.clone(),
        id,
        input_items: input_items.iter().cloned().map(conversation_item).collect(),
        finished: Arc::default(),
    });
    let keep = (valid.store && state.responses.enabled()).then(|| Keep {
        store: Arc::clone(&state.responses),
        owner: owner.clone(),
        input_items,
    });
    if valid.echo.truncation == Truncation::Auto
        && let Some(prompt) = fit_context(&state, &valid.request)
            .await
            .inspect_err(|err| record.fail(err))?
    {
        valid.request.prompt = prompt;
    }
    if let Some(grammar) = &valid.request.sampling.grammar {
        // A required or named function call's grammar (Lark) was built from `tools`; a JSON
        // schema came from `text.format`.
        let checked = match (grammar, &valid.request.tools) {
            (GrammarSpec::Lark { .. }, Some(tools)) => {
                state
                    .grammars
                    .check_tool_calls(grammar, tools, |i| format!("tools[{i}].parameters"))
                    .await
            }
            _ => state.grammars.check(grammar, "text.format.schema").await,
        };
        checked.inspect_err(|err| record.fail(err))?;
    }
    let id = state.responses.new_id();
    let started = start_generation(&state, &valid.request, record, id.clone(), tenant);
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    // One output per response (`n` is not a Responses API field).
    let Ok::<[_; 1], _>([generation]) = generation?.try_into() else {
        unreachable!("a validated Responses request asks for one choice");
    };
    let mut events = ResponseEvents::new(id, &state, valid.echo, valid.request.tools.as_ref());
    if let Some(adapter) = &valid.request.lora {
        events.model = adapter.clone();
    }
    events.reasoning = reasoning_splitter(&state, generation.prompt_ids());
    events.previous_response_id = previous.clone();
    events.keep = keep;
    events.conversation = conversation.clone();
    if let Some(input_items) = background_items {
        events.background = true;
        let queued = serde_json::to_string(&events.queued()).expect("a response object is JSON");
        let responses = Arc::clone(&state.responses);
        let id = events.id.clone();
        responses.start_background(
            owner,
            &id,
            previous,
            &queued,
            input_items,
            valid.request.stream,
        );
        if valid.request.stream {
            responses.mark_in_progress(&id);
            let (task, reply) = stream_background(generation, events, conversation);
            responses.set_abort(&id, task.abort_handle());
            return Ok(reply);
        }
        let task = actix_web::rt::spawn(run_background(generation, events));
        responses.set_abort(&id, task.abort_handle());
        return Ok(HttpResponse::Ok()
            .content_type(actix_web::http::header::ContentType::json())
            .body(queued));
    }
    if valid.request.stream {
        let body = sse_body(vec![(generation, events)]);
        return Ok(match conversation {
            None => sse_stream_response(body, socket),
            Some(turn) => sse_stream_response(turn.added_before_the_end(body), socket),
        });
    }
    let Some(completed) = unless_client_leaves(socket, generation.collect()).await else {
        return Ok(client_left());
    };
    let object = events.completed(completed?);
    if let Some(turn) = conversation {
        turn.add().await;
    }
    Ok(HttpResponse::Ok().json(object))
}

/// A response's turn of the conversation it names (`conversation`): its own input items, and
/// once it has finished (completed or incomplete) its output items, which are added to the
/// conversation before the client sees it finished, so that whatever the client sends next,
/// through any api-server, finds them.
#[derive(Clone)]
struct ConversationTurn {
    store: Arc<StoredResponses>,
    owner: Option<String>,
    id: String,
    /// The request's own input items, as the conversation lists them.
    input_items: Vec<Value>,
    /// What the finished response leaves to do.
    finished: Arc<std::sync::Mutex<Option<FinishedTurn>>>,
}

/// The items a finished response adds to its conversation, and its storing, which waits for
/// them.
type FinishedTurn = (Vec<Value>, Option<StoreJob>);

impl ConversationTurn {
    /// The response finished with `output`: its items are to be added, then `job` run.
    fn finish(&self, output: &[Value], job: Option<StoreJob>) {
        let mut items = self.input_items.clone();
        items.extend(output.iter().cloned());
        *self.lock() = Some((items, job));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<FinishedTurn>> {
        self.finished
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds the finished response's items to the conversation (nothing if it did not finish,
    /// or was cancelled), then stores the response. A conversation deleted meanwhile, grown
    /// past the store or on an api-server gone takes nothing: the response stands, the log
    /// says why its turn is missing, and `tandem_conversation_turns_lost_total` counts it.
    async fn add(&self) {
        let Some((items, job)) = self.lock().take() else {
            return;
        };
        if job.as_ref().is_some_and(StoreJob::cancelled) {
            return;
        }
        if let Err(err) = self
            .store
            .add_items(self.owner.as_deref(), &self.id, &items)
            .await
        {
            self.store.turn_lost(&self.id, &err);
        }
        if let Some(job) = job {
            job.run();
        }
    }

    /// `body` with the items added, once the response has finished, before the chunk that
    /// carries its last event goes out.
    fn added_before_the_end<S>(
        self,
        body: S,
    ) -> impl futures::Stream<Item = Result<Bytes, actix_web::Error>> + 'static
    where
        S: futures::Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
    {
        body.then(move |chunk| {
            let turn = self.clone();
            async move {
                turn.add().await;
                chunk
            }
        })
    }
}

/// A finished response to store ([`Keep`]), with what it continues and its output items.
struct StoreJob {
    keep: Keep,
    id: String,
    background: bool,
    previous: Option<String>,
    /// The `response` object (JSON text).
    response: String,
    output: Vec<Value>,
}

impl StoreJob {
    /// Whether a background response was cancelled or deleted while it ran (then what it was
    /// is stored already, or nothing, and it stores nothing more).
    fn cancelled(&self) -> bool {
        self.background && !self.keep.store.is_running(&self.id)
    }

    fn run(self) {
        let keep = self.keep;
        let store = match self.background {
            true => StoredResponses::store_finished_background,
            false => StoredResponses::put,
        };
        store(
            &keep.store,
            keep.owner,
            &self.id,
            self.previous,
            self.response,
            &keep.input_items,
            &self.output,
        );
    }
}

/// A request with what it continues followed ([`continued`]).
struct Continued {
    body: ResponsesRequest,
    /// The response it continues (`previous_response_id`).
    previous: Option<String>,
    /// The conversation it continues (`conversation`).
    conversation: Option<String>,
    /// The request's own input items as stored (each with an `id`).
    input_items: Vec<Value>,
}

/// A background response streamed: its events as a foreground stream has them, produced by a
/// task that runs it to its end and stores it whether or not the client stays (a client that
/// leaves polls it, or cancels it, by id).
fn stream_background(
    generation: Generation,
    events: ResponseEvents,
    conversation: Option<ConversationTurn>,
) -> (tokio::task::JoinHandle<()>, HttpResponse) {
    let (sender, receiver) = futures::channel::mpsc::unbounded::<Bytes>();
    let task = actix_web::rt::spawn(async move {
        let body = sse_body(vec![(generation, events)]);
        let mut body = match conversation {
            None => body.boxed_local(),
            Some(turn) => turn.added_before_the_end(body).boxed_local(),
        };
        while let Some(chunk) = body.next().await {
            // A client gone takes nothing more; the response runs on regardless.
            if let Ok(chunk) = chunk {
                let _ = sender.unbounded_send(chunk);
            }
        }
    });
    let reply = HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(receiver.map(Ok::<Bytes, actix_web::Error>));
    (task, reply)
}

/// Runs a background response to its end and stores it (completed, incomplete or failed),
/// unless it was cancelled or deleted meanwhile; its first tokens make it `in_progress`.
async fn run_background(generation: Generation, mut events: ResponseEvents) {
    let store = Arc::clone(
        &events
            .keep
            .as_ref()
            .expect("a background response is kept")
            .store,
    );
    let mut started = false;
    let ended = generation
        .collect_watching(|_| {
            if !started {
                started = true;
                store.mark_in_progress(&events.id);
            }
        })
        .await;
    let conversation = events.conversation.clone();
    match ended {
        Ok(completed) => {
            events.completed(completed);
            if let Some(turn) = conversation {
                turn.add().await;
            }
        }
        Err(err) => {
            let response = events.failed_object(&err);
            events.store(&response);
        }
    }
}

/// `truncation: "auto"`: the conversation from its earliest start (a user turn after the
/// system ones: [`truncation_starts`]) at which it and the token limit still fit the context,
/// found by bisection over the starts (fewer turns, fewer tokens); `None` when it fits whole.
/// From its last start when nothing fits (the context error then says so).
async fn fit_context(
    state: &AppState,
    request: &ValidRequest,
) -> Result<Option<PromptInput>, ApiError> {
    let PromptInput::Chat(turns) = &request.prompt else {
        return Ok(None);
    };
    let system = turns.iter().take_while(|t| t.role == Role::System).count();
    // The first candidate is the whole conversation.
    let mut starts = vec![system];
    starts.extend(truncation_starts(turns).into_iter().filter(|&s| s > system));
    let from = |start: usize| -> Vec<Turn> {
        turns[..system]
            .iter()
            .chain(&turns[start..])
            .cloned()
            .collect()
    };
    let fits = |start: usize| {
        let turns = from(start);
        let codec = Arc::clone(&state.codec);
        let tools = request.tools.clone();
        async move {
            let ids = tokenize(
                codec,
                PromptInput::Chat(turns),
                tools,
                request.rendering.clone(),
            )
            .await?;
            Ok::<_, ApiError>(request.stop_spec(ids.len(), &state.limits).is_ok())
        }
    };
    if fits(starts[0]).await? {
        return Ok(None);
    }
    // starts[low] does not fit; starts[high] is the first that does (or the last start).
    let (mut low, mut high) = (0, starts.len() - 1);
    while high - low > 1 {
        let middle = (low + high) / 2;
        if fits(starts[middle]).await? {
            high = middle;
        } else {
            low = middle;
        }
    }
    tracing::debug!(
        dropped = starts[high] - system,
        of = turns.len() - system,
        "truncation auto: the oldest input items dropped to fit the context"
    );
    Ok(Some(PromptInput::Chat(from(starts[high]))))
}

/// `body` with what it continues followed, its items then the request's own as its `input`:
/// `previous_response_id`'s chain, or `conversation`'s items.
async fn continued(
    mut body: ResponsesRequest,
    store: &StoredResponses,
    owner: Option<&str>,
) -> Result<Continued, ApiError> {
    let own = stored_input_items(body.input.as_ref());
    let conversation = conversation_id(body.conversation.take())?;
    let previous = body.previous_response_id.take();
    let mut items = match (&previous, &conversation) {
        (None, None) => {
            return Ok(Continued {
                body,
                previous,
                conversation,
                input_items: own,
            });
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "conversation and previous_response_id cannot be used together: a response \
                 continues either a conversation or a stored response",
                "conversation",
            ));
        }
        (Some(previous), None) => chain(store, owner, previous).await?,
        (None, Some(conversation)) => store
            .conversation_items(owner, conversation)
            .await
            .map_err(|err| conversation_error(err, "conversation"))?,
    };
    items.extend(own.iter().cloned());
    body.input = Some(ResponseInput::Items(items));
    Ok(Continued {
        body,
        previous,
        conversation,
        input_items: own,
    })
}

/// `conversation`: a conversation's id, or an object with its `id` (OpenAI takes both).
fn conversation_id(conversation: Option<Value>) -> Result<Option<String>, ApiError> {
    match conversation {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id)),
        Some(Value::Object(object)) => match (object.get("id"), object.len()) {
            (Some(Value::String(id)), 1) => Ok(Some(id.clone())),
            _ => Err(ApiError::invalid(
                "conversation must be a conversation's id, or an object with only its id \
                 ({\"id\": \"conv_...\"})",
                "conversation",
            )),
        },
        Some(other) => Err(ApiError::invalid(
            format!("conversation must be a conversation's id (a string), got {other}"),
            "conversation",
        )),
    }
}

/// The items of `previous`'s chain, oldest first.
async fn chain(
    store: &StoredResponses,
    owner: Option<&str>,
    previous: &str,
) -> Result<Vec<Value>, ApiError> {
    if !store.enabled() && !store.made_by_another(previous) {
        return Err(ApiError::unsupported(
            "this api-server stores no responses (--response-store-mib 0), so \
             previous_response_id cannot be followed: send the earlier turns in input",
            "previous_response_id",
        ));
    }
    store
        .context(owner, previous)
        .await
        .map_err(|err| match err {
            ContextError::Peer(peer) => peer_error(peer, "previous_response_id"),
            ContextError::Chain(chain) => ApiError::invalid(
                format!("previous_response_id: {chain}"),
                "previous_response_id",
            ),
        })
}

/// What a client sees when another api-server could not say what it stored of a response.
fn peer_error(err: PeerError, param: &str) -> ApiError {
    stored::peer_error(err, param, |detail| ApiError::ResponseGone { detail })
}

/// The request's input items as a stored response keeps them: a string as one user message,
/// and each item with an `id` ([`with_ids`]).
fn stored_input_items(input: Option<&ResponseInput>) -> Vec<Value> {
    with_ids(match input {
        None => Vec::new(),
        Some(ResponseInput::Text(text)) => {
            vec![serde_json::json!({"type": "message", "role": "user", "content": text})]
        }
        Some(ResponseInput::Items(items)) => items.clone(),
    })
}

/// Where a finished response goes (`store: true`, the store on): the store, the key that made
/// it and its request's own input items.
struct Keep {
    store: Arc<StoredResponses>,
    owner: Option<String>,
    input_items: Vec<Value>,
}

/// `GET /v1/responses/{id}`'s query.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrieveQuery {
    stream: Option<bool>,
    starting_after: Option<u64>,
    /// Accepted: tandem never pads its events.
    #[allow(dead_code)]
    include_obfuscation: Option<bool>,
}

/// The response object, or with `stream=true` the events of a background response that was
/// streamed, after `starting_after` (all of them without it), to its end: a client that lost
/// the stream resumes it, through any api-server.
#[get("/v1/responses/{id}")]
pub async fn get_response(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    no_query_but_include(
        &request,
        &["stream", "starting_after", "include_obfuscation"],
    )?;
    let query = web::Query::<RetrieveQuery>::from_query(request.query_string()).map_err(|err| {
        ApiError::invalid(
            format!("query: {err} (stream is true or false, starting_after a number)"),
            "query",
        )
    })?;
    if query.stream == Some(true) {
        let socket = ClientSocket::of(&request);
        return resume_stream(
            &state,
            owner_of(&request),
            id.into_inner(),
            query.starting_after,
            socket,
        )
        .await;
    }
    if query.starting_after.is_some() {
        return Err(ApiError::invalid(
            "starting_after resumes a stream: it needs stream=true",
            "starting_after",
        ));
    }
    let response = stored_response(&state, &request, &id).await?;
    Ok(HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(response))
}

/// The events of background response `id`'s stream after `starting_after`, as they come,
/// until its last.
async fn resume_stream(
    state: &AppState,
    owner: Option<String>,
    id: String,
    starting_after: Option<u64>,
    socket: Option<Arc<ClientSocket>>,
) -> Result<HttpResponse, ApiError> {
    let store = Arc::clone(&state.responses);
    let first = store
        .events_after(owner.as_deref(), &id, starting_after)
        .await
        .map_err(|err| peer_error(err, "id"))?;
    let (events, done) = match first {
        None => return Err(ApiError::ResponseNotFound { id }),
        Some(EventsAfter::NotStreamed) => {
            return Err(ApiError::invalid(
                format!(
                    "response {id} was not streamed in the background (background and stream \
                     true): it has no stream to resume; GET it without stream"
                ),
                "stream",
            ));
        }
        Some(EventsAfter::Events { events, done }) => (events, done),
    };
    /// Where the resumed stream stands: the last event sent, and whether it has ended.
    struct Resumed {
        store: Arc<StoredResponses>,
        owner: Option<String>,
        id: String,
        last: Option<u64>,
        pending: Vec<String>,
        done: bool,
    }
    let advance = |last: Option<u64>, sent: usize| match (last, sent) {
        (last, 0) => last,
        (None, sent) => Some(sent as u64 - 1),
        (Some(last), sent) => Some(last + sent as u64),
    };
    let start = Resumed {
        store,
        owner,
        id,
        last: starting_after,
        pending: events,
        done,
    };
    let body = futures::stream::unfold(start, move |mut at| async move {
        loop {
            if !at.pending.is_empty() {
                let events = std::mem::take(&mut at.pending);
                at.last = advance(at.last, events.len());
                let chunk = Bytes::from(events.concat());
                return Some((Ok::<Bytes, actix_web::Error>(chunk), at));
            }
            if at.done {
                return None;
            }
            match at
                .store
                .events_after(at.owner.as_deref(), &at.id, at.last)
                .await
            {
                Ok(Some(EventsAfter::Events { events, done })) => {
                    at.pending = events;
                    at.done = done;
                }
                // Deleted meanwhile, or its api-server gone: the stream ends where it is.
                other => {
                    tracing::warn!(response_id = %at.id, ?other,
                        "a resumed stream ended before its response did");
                    return None;
                }
            }
        }
    });
    Ok(sse_stream_response(body, socket))
}

/// The stored `response` object `id` (JSON text) the request's key made, on whichever
/// api-server holds it; a 404 when none does.
async fn stored_response(
    state: &AppState,
    request: &HttpRequest,
    id: &str,
) -> Result<String, ApiError> {
    state
        .responses
        .response(owner_of(request).as_deref(), id)
        .await
        .map_err(|err| peer_error(err, "id"))?
        .ok_or_else(|| ApiError::ResponseNotFound { id: id.to_string() })
}

#[delete("/v1/responses/{id}")]
pub async fn delete_response(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let deleted = state
        .responses
        .delete(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| peer_error(err, "id"))?;
    if !deleted {
        return Err(ApiError::ResponseNotFound {
            id: id.into_inner(),
        });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id.into_inner(), "object": "response", "deleted": true,
    })))
}

#[get("/v1/responses/{id}/input_items")]
pub async fn list_input_items(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let paging = Paging::of(&request)?;
    let Some(items) = state
        .responses
        .input_items(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| peer_error(err, "id"))?
    else {
        return Err(ApiError::ResponseNotFound {
            id: id.into_inner(),
        });
    };
    paging.page(items, &format!("response {id}"))
}

/// Cancels a background response that is still running (OpenAI's): its generation stops and
/// it is stored as `cancelled`; a background response that had finished is returned as it is
/// (cancelling again is idempotent); a foreground response cannot be cancelled (400).
#[post("/v1/responses/{id}/cancel")]
pub async fn cancel_response(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let cancelled = state
        .responses
        .cancel(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| peer_error(err, "id"))?;
    let response = match cancelled {
        None => {
            return Err(ApiError::ResponseNotFound {
                id: id.into_inner(),
            });
        }
        Some(Cancelled::Now(response)) => response,
        Some(Cancelled::Finished(response)) => {
            let background = serde_json::from_str::<Value>(&response)
                .is_ok_and(|object| object["background"] == true);
            if !background {
                return Err(ApiError::invalid(
                    "only a background response can be cancelled (background: true); a \
                     foreground one is cancelled by closing its connection",
                    "id",
                ));
            }
            response
        }
    };
    Ok(HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(response))
}

/// One response: its events when streamed (numbered by `sequence_number`), or the whole
/// `response` object when not. Both are built by the same steps, so they agree.
///
/// Without tools the output is one message, opened before the first token. With tools the
/// model's text goes through the tool-call parser: text becomes a message item, each call a
/// `function_call` item, in the order the model wrote them, each item finished (its `.done`
/// events) before the next is added.
pub struct ResponseEvents {
    id: String,
    created_at: u64,
    model: String,
    settings: ResponseSettings,
    codec: Arc<dyn PromptCodec>,
    metrics: Metrics,
    /// The tool-call parser, when the request lets the model call tools.
    calls: Option<CallParser>,
    /// Splits the reply's thinking (a `reasoning` item) from its answer, with
    /// `--reasoning-parser`.
    reasoning: Option<ReasoningSplitter>,
    /// Output items finished so far.
    items: Vec<OutputItem>,
    /// The item being written, at `output_index` `items.len()`.
    open: Option<OpenItem>,
    /// Logprobs of tokens whose text the parser holds back, for the text delta that carries
    /// it (dropped if the text turns out to be a call's markup).
    pending_logprobs: Vec<TokenLogprob>,
    sequence_number: u64,
    /// The response this one continues, echoed.
    previous_response_id: Option<String>,
    /// Where the finished response is stored, when it is.
    keep: Option<Keep>,
    /// A background response: it runs after the reply, and is stored only if it was not
    /// cancelled meanwhile.
    background: bool,
    /// The conversation the response's items are added to, when it names one.
    conversation: Option<ConversationTurn>,
}

/// The output item being written.
enum OpenItem {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Call(FunctionCallItem),
}

impl OpenItem {
    fn item(&self, status: ResponseStatus) -> OutputItem {
        match self {
            OpenItem::Reasoning { id, text } => {
                OutputItem::Reasoning(ReasoningItem::new(id.clone(), status, text.clone()))
            }
            OpenItem::Message { id, text, logprobs } => OutputItem::Message(OutputMessage {
                id: id.clone(),
                kind: "message",
                status,
                role: "assistant",
                content: vec![OutputText::new(text.clone(), logprobs.clone())],
            }),
            OpenItem::Call(call) => OutputItem::FunctionCall(FunctionCallItem {
                status,
                ..call.clone()
            }),
        }
    }
}

impl ResponseEvents {
    fn new(
        id: String,
        state: &AppState,
        settings: ResponseSettings,
        tools: Option<&ToolRequest>,
    ) -> Self {
        ResponseEvents {
            id,
            created_at: unix_now_s(),
            model: state.limits.served_model_name.clone(),
            settings,
            codec: Arc::clone(&state.codec),
            metrics: state.metrics.clone(),
            calls: match (tools, state.limits.tool_support) {
                (Some(tools), Some(support)) if tools.active() => {
                    Some(CallParser::new(support.format, tools.parallel))
                }
                _ => None,
            },
            reasoning: None,
            items: Vec::new(),
            open: None,
            pending_logprobs: Vec::new(),
            sequence_number: 0,
            previous_response_id: None,
            keep: None,
            background: false,
            conversation: None,
        }
    }

    /// Stores the finished `response` (when asked) with its output items, which a follow-up
    /// takes as input.
    fn store(&mut self, response: &ResponseObject) {
        // Through the JSON text, so that numbers read back as the response wrote them (an f32
        // `top_p` of 0.9 would become 0.8999999761581421 as a value).
        let output: Vec<Value> = serde_json::to_string(&response.output)
            .and_then(|text| serde_json::from_str(&text))
            .expect("output items are JSON");
        let job = self.keep.take().map(|keep| StoreJob {
            id: self.id.clone(),
            background: self.background,
            previous: self.previous_response_id.clone(),
            response: serde_json::to_string(response).expect("a response object is JSON"),
            output: output.clone(),
            keep,
        });
        let finished = matches!(
            response.status,
            ResponseStatus::Completed | ResponseStatus::Incomplete
        );
        match &self.conversation {
            // Stored once its items are in the conversation ([`ConversationTurn::add`]), so
            // that whoever sees it finished finds them there.
            Some(turn) if finished => turn.finish(&output, job),
            _ => {
                if let Some(job) = job {
                    job.run();
                }
            }
        }
    }

    /// The `response` object of a generation that is not streamed.
    fn completed(mut self, completed: Completed) -> ResponseObject {
        self.start();
        self.add_tokens(&completed.tokens);
        let (_, response) = self.finish(completed.reason, completed.usage);
        self.store(&response);
        response
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

    fn output_index(&self) -> u32 {
        self.items.len() as u32
    }

    /// The response object in `status`, with `output` and `usage` as they stand.
    fn object(
        &self,
        status: ResponseStatus,
        output: Vec<OutputItem>,
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
            background: self.background,
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
            previous_response_id: self.previous_response_id.clone(),
            conversation: self.conversation.as_ref().map(|turn| ConversationRef {
                id: turn.id.clone(),
            }),
            prompt_cache_key: s.prompt_cache_key.clone(),
            reasoning: ReasoningConfig::default(),
            safety_identifier: s.safety_identifier.clone(),
            service_tier: "default",
            store: self.keep.is_some(),
            temperature: s.temperature,
            text: s.text.clone(),
            tool_choice: s.tool_choice.clone(),
            tools: s.tools.clone(),
            top_logprobs: s.top_logprobs,
            top_p: s.top_p,
            truncation: s.truncation.as_str(),
            usage,
            user: s.user.clone(),
            metadata: s.metadata.clone(),
        }
    }

    /// A background response's object as created: queued, no output yet.
    fn queued(&self) -> ResponseObject {
        self.object(ResponseStatus::Queued, Vec::new(), None)
    }

    /// The object of a response that failed with `err`, with the output so far (the item
    /// being written marked incomplete).
    fn failed_object(&self, err: &ApiError) -> ResponseObject {
        err.log();
        let body = err.public_body().error;
        let mut output = self.items.clone();
        output.extend(
            self.open
                .as_ref()
                .map(|open| open.item(ResponseStatus::Incomplete))
                .filter(
                    |item| !matches!(item, OutputItem::Message(m) if m.content[0].text.is_empty()),
                ),
        );
        let mut response = self.object(ResponseStatus::Failed, output, None);
        response.error = Some(ResponseError {
            code: body.code.unwrap_or("server_error"),
            message: body.message,
        });
        response
    }

    /// The lifecycle's first events; without tools, the message is opened with them.
    fn start(&mut self) -> Vec<ResponseEvent> {
        let response = self.object(ResponseStatus::InProgress, Vec::new(), None);
        let mut out = vec![
            ResponseEvent::Created {
                response: response.clone(),
            },
            ResponseEvent::InProgress { response },
        ];
        // With a reasoning parser the first item may be the thinking: it opens with its text.
        if self.calls.is_none() && self.reasoning.is_none() {
            self.open_message(&mut out);
        }
        out
    }

    fn open_message(&mut self, out: &mut Vec<ResponseEvent>) {
        let open = OpenItem::Message {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            text: String::new(),
            logprobs: Vec::new(),
        };
        let OutputItem::Message(mut message) = open.item(ResponseStatus::InProgress) else {
            unreachable!("a message item");
        };
        let part = message.content.pop().expect("a message has its part");
        let item_id = message.id.clone();
        out.push(ResponseEvent::OutputItemAdded {
            output_index: self.output_index(),
            item: OutputItem::Message(message),
        });
        out.push(ResponseEvent::ContentPartAdded {
            item_id,
            output_index: self.output_index(),
            content_index: 0,
            part,
        });
        self.open = Some(open);
    }

    /// Finishes the open item in `status`: its `.done` events, and it joins `items`.
    fn close(&mut self, status: ResponseStatus, out: &mut Vec<ResponseEvent>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let output_index = self.output_index();
        let item = open.item(status);
        match &open {
            OpenItem::Reasoning { id, text } => out.push(ResponseEvent::ReasoningTextDone {
                item_id: id.clone(),
                output_index,
                content_index: 0,
                text: text.clone(),
            }),
            OpenItem::Message { id, text, logprobs } => {
                out.push(ResponseEvent::OutputTextDone {
                    item_id: id.clone(),
                    output_index,
                    content_index: 0,
                    text: text.clone(),
                    logprobs: logprobs.clone(),
                });
                out.push(ResponseEvent::ContentPartDone {
                    item_id: id.clone(),
                    output_index,
                    content_index: 0,
                    part: OutputText::new(text.clone(), logprobs.clone()),
                });
            }
            OpenItem::Call(call) => out.push(ResponseEvent::FunctionCallArgumentsDone {
                item_id: call.id.clone(),
                output_index,
                arguments: call.arguments.clone(),
            }),
        }
        out.push(ResponseEvent::OutputItemDone {
            output_index,
            item: item.clone(),
        });
        self.items.push(item);
    }

    /// Text for the message (opened, after any call, if need be), with the logprobs of the
    /// tokens that carried it.
    fn text(&mut self, delta: String, logprobs: Vec<TokenLogprob>, out: &mut Vec<ResponseEvent>) {
        if !matches!(self.open, Some(OpenItem::Message { .. })) {
            self.close(ResponseStatus::Completed, out);
            self.open_message(out);
        }
        let output_index = self.output_index();
        let Some(OpenItem::Message {
            id,
            text,
            logprobs: all,
        }) = &mut self.open
        else {
            unreachable!("a message is open");
        };
        text.push_str(&delta);
        all.extend(logprobs.iter().cloned());
        out.push(ResponseEvent::OutputTextDelta {
            item_id: id.clone(),
            output_index,
            content_index: 0,
            delta,
            logprobs,
        });
    }

    /// Thinking for the reasoning item (opened, as the first item, if need be).
    fn reasoning_text(&mut self, delta: String, out: &mut Vec<ResponseEvent>) {
        if delta.is_empty() {
            return;
        }
        if !matches!(self.open, Some(OpenItem::Reasoning { .. })) {
            self.close(ResponseStatus::Completed, out);
            let id = format!("rs_{}", uuid::Uuid::new_v4().simple());
            out.push(ResponseEvent::OutputItemAdded {
                output_index: self.output_index(),
                item: OutputItem::Reasoning(ReasoningItem::new(
                    id.clone(),
                    ResponseStatus::InProgress,
                    String::new(),
                )),
            });
            self.open = Some(OpenItem::Reasoning {
                id,
                text: String::new(),
            });
        }
        let output_index = self.output_index();
        let Some(OpenItem::Reasoning { id, text }) = &mut self.open else {
            unreachable!("a reasoning item is open");
        };
        text.push_str(&delta);
        out.push(ResponseEvent::ReasoningTextDelta {
            item_id: id.clone(),
            output_index,
            content_index: 0,
            delta,
        });
    }

    /// Answer text (after any thinking): into the message, or through the tool-call parser.
    fn answer(&mut self, text: String, logprobs: Vec<TokenLogprob>, out: &mut Vec<ResponseEvent>) {
        match self.calls.as_mut() {
            None => {
                // Tokens held back by the worker (a partial character) carry no text yet.
                if !text.is_empty() || !logprobs.is_empty() {
                    self.text(text, logprobs, out);
                }
            }
            Some(parser) => {
                let events = parser.push(&text);
                self.pending_logprobs.extend(logprobs);
                self.parsed(events, out);
            }
        }
    }

    /// The parser's events as output items and their events.
    fn parsed(&mut self, events: Vec<ParseEvent>, out: &mut Vec<ResponseEvent>) {
        for event in events {
            match event {
                ParseEvent::Content(delta) => {
                    let logprobs = std::mem::take(&mut self.pending_logprobs);
                    self.text(delta, logprobs, out);
                }
                ParseEvent::CallStart { name, .. } => {
                    // What the parser held back was this call's markup.
                    self.pending_logprobs.clear();
                    self.close(ResponseStatus::Completed, out);
                    let call = FunctionCallItem {
                        id: format!("fc_{}", uuid::Uuid::new_v4().simple()),
                        kind: "function_call",
                        status: ResponseStatus::InProgress,
                        call_id: new_call_id(),
                        name,
                        arguments: String::new(),
                    };
                    out.push(ResponseEvent::OutputItemAdded {
                        output_index: self.output_index(),
                        item: OutputItem::FunctionCall(call.clone()),
                    });
                    self.open = Some(OpenItem::Call(call));
                }
                ParseEvent::Arguments { text, .. } => {
                    let output_index = self.output_index();
                    if let Some(OpenItem::Call(call)) = &mut self.open {
                        call.arguments.push_str(&text);
                        out.push(ResponseEvent::FunctionCallArgumentsDelta {
                            item_id: call.id.clone(),
                            output_index,
                            delta: text,
                        });
                    }
                }
            }
        }
    }

    fn add_tokens(&mut self, tokens: &[TokenEvent]) -> Vec<ResponseEvent> {
        let mut out = Vec::new();
        let tools = self.calls.is_some();
        let Some(splitter) = self.reasoning.as_mut() else {
            let logprobs = self.logprobs_of(tokens);
            let text = match tools {
                true => parser_text(self.codec.as_ref(), tokens),
                false => tokens.iter().map(|t| t.text.as_str()).collect(),
            };
            self.answer(text, logprobs, &mut out);
            return out;
        };
        // Token by token: the thinking's tokens carry no logprobs into the answer.
        let (mut thinking, mut answer, mut answer_tokens) =
            (String::new(), String::new(), Vec::new());
        for token in tokens {
            let answering = splitter.answering();
            let split = splitter.push_token(&piece_text(self.codec.as_ref(), token, tools));
            if answering || !split.content.is_empty() {
                answer_tokens.push(token.clone());
            }
            thinking.push_str(&split.reasoning);
            answer.push_str(&split.content);
        }
        self.reasoning_text(thinking, &mut out);
        let logprobs = self.logprobs_of(&answer_tokens);
        if !answer.is_empty() || !logprobs.is_empty() {
            self.answer(answer, logprobs, &mut out);
        }
        out
    }

    /// The last events, and the finished response: `completed`, or `incomplete` when the
    /// token limit cut it (the last item too).
    fn finish(
        &mut self,
        reason: WireFinish,
        usage: WireUsage,
    ) -> (Vec<ResponseEvent>, ResponseObject) {
        let mut out = Vec::new();
        let mut reasoning_tokens = 0;
        if let Some(splitter) = self.reasoning.as_mut() {
            let split = splitter.finish();
            reasoning_tokens = splitter.reasoning_tokens();
            if splitter.reasoned() {
                self.metrics.record(Event::Reasoning {
                    tokens: reasoning_tokens,
                });
            }
            self.reasoning_text(split.reasoning, &mut out);
            if !split.content.is_empty() {
                self.answer(split.content, Vec::new(), &mut out);
            }
        }
        if let Some(parser) = self.calls.as_mut() {
            let events = parser.finish();
            record_tool_calls(&self.metrics, &self.id, parser);
            self.parsed(events, &mut out);
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            if !logprobs.is_empty() && matches!(self.open, Some(OpenItem::Message { .. })) {
                self.text(String::new(), logprobs, &mut out);
            }
        }
        let status = match reason {
            WireFinish::Length => ResponseStatus::Incomplete,
            WireFinish::Stop | WireFinish::Cancelled | WireFinish::Error => {
                ResponseStatus::Completed
            }
        };
        // A reply of nothing is an empty message, as without tools.
        if self.open.is_none() && self.items.is_empty() {
            self.open_message(&mut out);
        }
        self.close(status, &mut out);
        let mut usage = ResponseUsage::from(usage);
        usage.output_tokens_details.reasoning_tokens = reasoning_tokens;
        let response = self.object(status, self.items.clone(), Some(usage));
        out.push(match status {
            ResponseStatus::Incomplete => ResponseEvent::Incomplete {
                response: response.clone(),
            },
            _ => ResponseEvent::Completed {
                response: response.clone(),
            },
        });
        (out, response)
    }

    /// `event: <type>` and `data: <json>` of each event, numbered; a streamed background
    /// response's are kept for clients resuming its stream.
    fn sse(&mut self, events: Vec<ResponseEvent>) -> Bytes {
        let mut bytes = String::new();
        for event in events {
            let kind = event.kind();
            let numbered = StreamEvent {
                event,
                sequence_number: self.sequence_number,
            };
            self.sequence_number += 1;
            let json = serde_json::to_string(&numbered).expect("response events are JSON");
            bytes.push_str(&format!("event: {kind}\ndata: {json}\n\n"));
        }
        if self.background
            && let Some(keep) = &self.keep
        {
            keep.store.record_events(&self.id, &bytes);
        }
        Bytes::from(bytes)
    }
}

impl ChunkFormat for ResponseEvents {
    fn opening(&mut self) -> Vec<Bytes> {
        let events = self.start();
        vec![self.sse(events)]
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        let events = self.add_tokens(tokens);
        (!events.is_empty()).then(|| self.sse(events))
    }

    /// The last events; the response is stored after they are made, so that a streamed
    /// background response is stored with them.
    fn finished(&mut self, reason: WireFinish, usage: WireUsage) -> Vec<Bytes> {
        let (events, response) = self.finish(reason, usage);
        let bytes = self.sse(events);
        self.store(&response);
        vec![bytes]
    }

    /// `response.failed`, with the error and the output so far (the item being written
    /// marked incomplete).
    fn failed(&mut self, err: &ApiError) -> Vec<Bytes> {
        let response = self.failed_object(err);
        let bytes = self.sse(vec![ResponseEvent::Failed {
            response: response.clone(),
        }]);
        if self.background {
            // Polled later: kept as it failed.
            self.store(&response);
        }
        vec![bytes]
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
    use crate::tools::{ToolFormat, ToolSupport};
    use crate::validation::ModelLimits;
    use serde_json::json;

    fn limits() -> ModelLimits {
        ModelLimits {
            adapters: Default::default(),
            served_model_name: "m".into(),
            max_model_len: 100,
            vocab_size: 10,
            tool_support: Some(ToolSupport {
                format: ToolFormat::Hermes,
                native: false,
            }),
            sampling_defaults: Default::default(),
            reasoning_parser: Default::default(),
        }
    }

    /// The events of a response to `body` (validated as a request would be).
    fn events_for(body: Value) -> ResponseEvents {
        let request: ResponsesRequest = serde_json::from_value(body).unwrap();
        let valid = validate_responses(&request, &limits()).unwrap();
        let calls = valid
            .request
            .tools
            .as_ref()
            .filter(|tools| tools.active())
            .map(|tools| CallParser::new(ToolFormat::Hermes, tools.parallel));
        ResponseEvents {
            id: "resp_1".into(),
            created_at: 1,
            model: "m".into(),
            settings: valid.echo,
            codec: Arc::new(Codec),
            metrics: Metrics::new(),
            calls,
            reasoning: None,
            items: Vec::new(),
            open: None,
            pending_logprobs: Vec::new(),
            sequence_number: 0,
            previous_response_id: None,
            keep: None,
            background: false,
            conversation: None,
        }
    }

    fn events(include_logprobs: bool) -> ResponseEvents {
        let mut events = events_for(json!({"input": "x"}));
        events.settings.include_logprobs = include_logprobs;
        events
    }

    fn with_tools() -> ResponseEvents {
        events_for(json!({"input": "x", "tools": [
            {"type": "function", "name": "get_weather", "description": "Weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
             "strict": true}
        ]}))
    }

    fn token(id: u32, text: &str) -> TokenEvent {
        TokenEvent {
            id,
            text: text.into(),
            logprob: Some(-0.5),
            top_logprobs: vec![],
        }
    }

    fn usage(prompt_tokens: u32, completion_tokens: u32) -> WireUsage {
        WireUsage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
            ..Default::default()
        }
    }

    /// Each `event:` line, then the JSON whose `type` repeats it.
    fn parse(bytes: &Bytes) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        text.strip_suffix("\n\n")
            .unwrap()
            .split("\n\n")
            .map(|one| {
                let (event, data) = one.split_once('\n').unwrap();
                let value: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(event.strip_prefix("event: ").unwrap(), value["type"]);
                value
            })
            .collect()
    }

    fn parse_all(sent: &[Bytes]) -> Vec<Value> {
        sent.iter().flat_map(parse).collect()
    }

    fn kinds(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
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
        sent.extend(format.finished(WireFinish::Length, usage(5, 2)));
        assert!(format.closing().is_none(), "no [DONE]");
        let events = parse_all(&sent);
        assert_eq!(
            kinds(&events),
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

    /// With a reasoning parser: the thinking is a `reasoning` item before the message, its
    /// text streamed in `reasoning_text` deltas without the markers (cut across tokens), the
    /// answer's tokens alone carrying logprobs; the whole response has the same items and
    /// counts the thinking's tokens.
    #[test]
    fn thinking_is_a_reasoning_item_before_the_message() {
        let reply = [
            token(1, "<th"),
            token(2, "ink>\nHmm"),
            token(3, ", yes.\n</think>"),
            token(4, "\n\nYes"),
            token(5, "."),
        ];
        let mut format = events(true);
        format.reasoning = Some(ReasoningSplitter::new(false));
        let mut sent = format.opening();
        for t in &reply {
            sent.extend(format.tokens(std::slice::from_ref(t)));
        }
        sent.extend(format.finished(WireFinish::Stop, usage(5, 5)));
        let streamed = parse_all(&sent);
        assert_eq!(
            kinds(&streamed),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(streamed[2]["item"]["type"], "reasoning");
        assert_eq!(streamed[3]["delta"], "Hmm");
        assert_eq!(streamed[4]["delta"], ", yes.");
        assert_eq!(streamed[5]["text"], "Hmm, yes.");
        assert_eq!(streamed[6]["output_index"], 0);
        assert_eq!(streamed[7]["output_index"], 1);
        assert_eq!(streamed[9]["delta"], "Yes");
        // The answer's tokens carry logprobs; the thinking's do not reach the message.
        let logprobs = &streamed[11]["logprobs"];
        assert_eq!(logprobs.as_array().unwrap().len(), 2, "{logprobs}");
        let last = &streamed[14]["response"];
        let reasoning = &last["output"][0];
        assert_eq!(reasoning["type"], "reasoning");
        assert_eq!(reasoning["status"], "completed");
        assert_eq!(
            reasoning["content"],
            json!([{"type": "reasoning_text", "text": "Hmm, yes."}])
        );
        assert_eq!(reasoning["summary"], json!([]));
        assert_eq!(reasoning["encrypted_content"], Value::Null);
        assert_eq!(last["output"][1]["content"][0]["text"], "Yes.");
        assert_eq!(
            last["usage"]["output_tokens_details"]["reasoning_tokens"],
            3
        );

        // Not streamed: the same items.
        let mut whole = events(true);
        whole.reasoning = Some(ReasoningSplitter::new(false));
        let object = whole.completed(Completed {
            tokens: reply.to_vec(),
            reason: WireFinish::Stop,
            usage: usage(5, 5),
            prompt_logprobs: Vec::new(),
            embedding: None,
        });
        let object = serde_json::to_value(&object).unwrap();
        assert_eq!(object["output"][0]["content"], reasoning["content"]);
        assert_eq!(object["output"][1]["content"][0]["text"], "Yes.");
    }

    #[test]
    fn a_failure_mid_stream_is_response_failed_with_the_text_so_far() {
        let mut format = events(false);
        format.opening();
        format.tokens(&[token(1, "Hi")]).unwrap();
        let sent = parse_all(&format.failed(&ApiError::Stalled { timeout_ms: 5 }));
        assert_eq!(sent.len(), 1);
        let event = &sent[0];
        assert_eq!(event["type"], "response.failed");
        assert_eq!(event["sequence_number"], 5);
        assert_eq!(event["response"]["status"], "failed");
        assert_eq!(event["response"]["error"]["code"], "timeout");
        assert_eq!(event["response"]["output"][0]["status"], "incomplete");
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
            usage: usage(3, 2),
            embedding: None,
        });
        let value = serde_json::to_value(object).unwrap();
        assert_eq!(value["status"], "completed");
        assert_eq!(value["incomplete_details"], Value::Null);
        assert_eq!(value["output"][0]["status"], "completed");
        assert_eq!(value["output"][0]["content"][0]["text"], "Hi.");
        assert_eq!(value["store"], false);
        assert_eq!(value["tools"], json!([]));
        assert!(value["completed_at"].is_u64());
    }

    /// Output of a model that speaks, then calls a tool (Hermes markup), in pieces.
    const SPOKEN_CALL: [&str; 6] = [
        "Let me check.",
        "\n<tool_",
        "call>\n{\"name\": \"get_weather\", ",
        "\"arguments\": {\"city\": ",
        "\"Paris\"}}\n</tool_call>",
        "\n",
    ];

    /// Text then a call, streamed: the message is finished before the call's item is added,
    /// the call's arguments come as deltas, and the last response holds both items, the
    /// declared tool echoed.
    #[test]
    fn a_streamed_call_is_a_function_call_item_after_the_text() {
        let mut format = with_tools();
        let mut sent = format.opening();
        for (i, piece) in SPOKEN_CALL.iter().enumerate() {
            sent.extend(format.tokens(&[token(i as u32, piece)]));
        }
        sent.extend(format.finished(WireFinish::Stop, usage(9, 6)));
        let events = parse_all(&sent);
        assert_eq!(
            kinds(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        assert_eq!(events[4]["delta"], "Let me check.");
        assert_eq!(events[7]["item"]["status"], "completed");
        let added = &events[8];
        assert_eq!(added["output_index"], 1);
        assert_eq!(added["item"]["type"], "function_call");
        assert_eq!(added["item"]["status"], "in_progress");
        assert_eq!(added["item"]["name"], "get_weather");
        assert_eq!(added["item"]["arguments"], "");
        let item_id = added["item"]["id"].as_str().unwrap();
        assert!(item_id.starts_with("fc_"), "{item_id}");
        let call_id = added["item"]["call_id"].as_str().unwrap();
        assert!(call_id.starts_with("call_"), "{call_id}");
        let deltas: String = events[9..11]
            .iter()
            .map(|e| {
                assert_eq!(e["item_id"], item_id);
                assert_eq!(e["output_index"], 1);
                e["delta"].as_str().unwrap()
            })
            .collect();
        assert_eq!(deltas, "{\"city\": \"Paris\"}");
        assert_eq!(events[11]["arguments"], deltas);
        assert_eq!(
            events[12]["item"],
            json!({"id": item_id, "type": "function_call", "status": "completed",
                   "call_id": call_id, "name": "get_weather", "arguments": deltas})
        );
        let response = &events[13]["response"];
        assert_eq!(response["status"], "completed");
        assert_eq!(response["output"].as_array().unwrap().len(), 2);
        assert_eq!(response["output"][0]["content"][0]["text"], "Let me check.");
        assert_eq!(response["output"][1], events[12]["item"]);
        assert_eq!(
            response["tools"],
            json!([{"type": "function", "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": true}])
        );
    }

    /// The same output whole: the same items as the stream's last event (ids aside).
    #[test]
    fn a_whole_response_has_the_streamed_items() {
        let tokens: Vec<TokenEvent> = SPOKEN_CALL
            .iter()
            .enumerate()
            .map(|(i, piece)| token(i as u32, piece))
            .collect();
        let object = with_tools().completed(Completed {
            prompt_logprobs: Vec::new(),
            tokens,
            reason: WireFinish::Stop,
            usage: usage(9, 6),
            embedding: None,
        });
        let value = serde_json::to_value(object).unwrap();
        assert_eq!(value["status"], "completed");
        let output = value["output"].as_array().unwrap();
        assert_eq!(output.len(), 2);
        assert_eq!(output[0]["type"], "message");
        assert_eq!(output[0]["content"][0]["text"], "Let me check.");
        assert_eq!(output[1]["type"], "function_call");
        assert_eq!(output[1]["name"], "get_weather");
        assert_eq!(output[1]["arguments"], "{\"city\": \"Paris\"}");
        assert_eq!(output[1]["status"], "completed");
    }

    /// A reply that is only calls has no message item; a call cut by the token limit is an
    /// incomplete item in an incomplete response.
    #[test]
    fn calls_alone_have_no_message_and_a_cut_call_is_incomplete() {
        let object = with_tools().completed(Completed {
            prompt_logprobs: Vec::new(),
            tokens: vec![token(
                1,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
            )],
            reason: WireFinish::Length,
            usage: usage(9, 1),
            embedding: None,
        });
        let value = serde_json::to_value(object).unwrap();
        assert_eq!(value["status"], "incomplete");
        let output = value["output"].as_array().unwrap();
        assert_eq!(output.len(), 1, "{output:?}");
        assert_eq!(output[0]["type"], "function_call");
        assert_eq!(output[0]["status"], "incomplete");
        assert_eq!(output[0]["arguments"], "{\"ci");
    }

    /// Text after a call is a message item of its own, after the call's.
    #[test]
    fn text_after_a_call_is_a_new_message_item() {
        let object = with_tools().completed(Completed {
            prompt_logprobs: Vec::new(),
            tokens: vec![
                token(
                    1,
                    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}",
                ),
                token(2, "\n</tool_call>\nDone."),
            ],
            reason: WireFinish::Stop,
            usage: usage(3, 2),
            embedding: None,
        });
        let value = serde_json::to_value(object).unwrap();
        let kinds: Vec<&str> = value["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["function_call", "message"], "{value}");
        assert_eq!(value["output"][0]["arguments"], "{}");
        // The whitespace before text is the text's (the parser's rule, as on chat).
        assert_eq!(value["output"][1]["content"][0]["text"], "\nDone.");
        assert_ne!(value["output"][0]["id"], value["output"][1]["id"]);
    }

    /// With tools, text the parser holds back (a possible call marker) keeps its logprobs
    /// until it is sent; a call's own tokens carry none.
    #[test]
    fn logprobs_follow_the_text_they_belong_to() {
        let mut format = events_for(
            json!({"input": "x", "include": ["message.output_text.logprobs"],
                                           "tools": [{"type": "function", "name": "f"}]}),
        );
        let mut sent = format.opening();
        sent.extend(format.tokens(&[token(1, "Hi <tool")]));
        sent.extend(format.tokens(&[token(2, "box>")]));
        sent.extend(format.finished(WireFinish::Stop, usage(3, 2)));
        let events = parse_all(&sent);
        let text: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .collect();
        let all: Vec<Value> = text
            .iter()
            .flat_map(|e| e["logprobs"].as_array().unwrap().clone())
            .collect();
        assert_eq!(all.len(), 2, "{text:?}");
        let whole: String = text.iter().map(|e| e["delta"].as_str().unwrap()).collect();
        assert_eq!(whole, "Hi <toolbox>");
    }
}
