//! The stored responses of every api-server of a model, as the routes see them: this
//! api-server's own [`ResponseStore`], and the others' reached over NATS.
//!
//! A response's id names the api-server that made it ([`ids`](super::ids)); a question about
//! another's response is a request on that api-server's subject
//! (`tandem.{model}.responses.{instance}`), which every api-server answers from its own store
//! ([`StoredResponses::answer_peers`]). So a follow-up, a retrieval or a deletion reaches any
//! api-server of the deployment, and a conversation continued on several api-servers is
//! rebuilt by asking each for the part of the chain it holds. An api-server that has stopped
//! answers nothing: NATS says no one listens, and its responses are reported gone.
//!
//! Background responses (`background: true`) run in the api-server that accepted them; until
//! they finish they are kept beside the store ([`StoredResponses::start_background`]), found
//! and cancelled through any api-server the same way, and moved into the store when they end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tandem_protocol::messages::{
    StoredResponseOp, StoredResponseReply, StoredResponseRequest, decode, encode,
};
use tandem_protocol::subjects::Subjects;

use super::ids::{Instance, instance_of};
use super::local::{ChainError, ResponseStore, Segment, StoreStats};
use crate::metrics::{Event, Metrics};

/// How long another api-server may take to answer (it answers from memory, in microseconds;
/// this bounds a stuck one).
const PEER_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Chains longer than this many api-servers' parts are refused (a chain cannot loop, since
/// each response names one made before it; the bound keeps a bug from hanging a request).
const MAX_SEGMENTS: usize = 10_000;

/// Why another api-server could not say what it holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error(
        "{id} was stored by api-server {instance}, which no longer answers (a stored response \
         or conversation lives in the memory of the api-server that made it and goes with it)"
    )]
    Gone { id: String, instance: String },
    #[error("api-server {instance}, which stored {id}, did not answer within {timeout:?}")]
    Timeout {
        id: String,
        instance: String,
        timeout: Duration,
    },
    #[error("asking api-server {instance} about {id}: {detail}")]
    Bus {
        id: String,
        instance: String,
        detail: String,
    },
    #[error(
        "what api-server {instance} stores of {id} is {bytes} bytes of JSON, over the NATS \
         server's max_payload of {max_payload}: send the conversation in input instead"
    )]
    TooLarge {
        id: String,
        instance: String,
        bytes: usize,
        max_payload: usize,
    },
}

/// Why a chain could not be followed to its start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// Where this api-server reaches the others.
struct Peers {
    client: async_nats::Client,
    subjects: Subjects,
}

/// A background response this api-server runs.
pub(super) struct Running {
    pub(super) owner: Option<String>,
    previous: Option<String>,
    /// The `response` object as it stands (queued, then in progress).
    response: Value,
    input_items: Vec<Value>,
    /// Stops its generation (set once its task is spawned).
    abort: Option<tokio::task::AbortHandle>,
    /// A streamed one's events so far, each one SSE event's text, for clients resuming its
    /// stream ([`super::resume`]); `None` when it is not streamed.
    pub(super) events: Option<Vec<String>>,
    /// How many events it has, for those waiting for more.
    pub(super) progress: tokio::sync::watch::Sender<usize>,
}

/// Every api-server's stored responses, from this one.
pub struct StoredResponses {
    pub(super) local: ResponseStore,
    instance: Instance,
    /// `None`: no bus (unit tests); other api-servers' responses are then gone.
    peers: Option<Peers>,
    pub(super) metrics: Metrics,
    /// Background responses running here, by id.
    running: Mutex<HashMap<String, Running>>,
}

/// What cancelling a response found.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// A background response that was running: the `response` object as cancelled (JSON).
    Now(String),
    /// A response that had finished: its object as stored (JSON); cancelling a background
    /// one again returns it, a foreground one cannot be cancelled.
    Finished(String),
}

/// Where a response is kept.
pub(super) enum Home<'a> {
    Here,
    Peer(&'a str),
    /// Not an id any api-server makes: no stored response has it.
    Nowhere,
}

impl StoredResponses {
    /// This api-server's store (`local`) under a fresh instance name, reaching the others
    /// through `client`.
    pub fn new(
        local: ResponseStore,
        client: async_nats::Client,
        subjects: Subjects,
        metrics: Metrics,
    ) -> Self {
        StoredResponses {
            local,
            instance: Instance::random(),
            peers: Some(Peers { client, subjects }),
            metrics,
            running: Mutex::default(),
        }
    }

    /// A store that reaches no other api-server.
    pub fn alone(local: ResponseStore, metrics: Metrics) -> Self {
        StoredResponses {
            local,
            instance: Instance::random(),
            peers: None,
            metrics,
            running: Mutex::default(),
        }
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Whether this api-server stores responses (`--response-store-mib` above 0).
    pub fn enabled(&self) -> bool {
        self.local.enabled()
    }

    /// A new response id, naming this api-server.
    pub fn new_id(&self) -> String {
        self.instance.new_id()
    }

    /// What this api-server's store holds, and the background responses it runs.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            background: self.lock_running().len(),
            ..self.local.stats()
        }
    }

    pub(super) fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        // Every change is one insert or removal: what a panic leaves is consistent.
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn record_stats(&self) {
        self.metrics.record(Event::ResponseStore(self.stats()));
    }

    /// Keeps background response `id` (its `response` object as created, queued) while it
    /// runs; its task's abort handle follows ([`Self::set_abort`]). A `streamed` one keeps
    /// its events too ([`Self::record_events`]).
    pub fn start_background(
        &self,
        owner: Option<String>,
        id: &str,
        previous: Option<String>,
        response: &str,
        input_items: Vec<Value>,
        streamed: bool,
    ) {
        let response = serde_json::from_str(response).expect("a response object is JSON");
        self.lock_running().insert(
            id.to_string(),
            Running {
                owner,
                previous,
                response,
                input_items,
                abort: None,
                events: streamed.then(Vec::new),
                progress: tokio::sync::watch::Sender::new(0),
            },
        );
        self.record_stats();
    }

    /// How to stop background response `id`'s generation; aborted at once when it was
    /// cancelled before its task was spawned.
    pub fn set_abort(&self, id: &str, abort: tokio::task::AbortHandle) {
        match self.lock_running().get_mut(id) {
            Some(running) => running.abort = Some(abort),
            None => abort.abort(),
        }
    }

    /// Background response `id` produced its first tokens: its status is `in_progress`.
    pub fn mark_in_progress(&self, id: &str) {
        if let Some(running) = self.lock_running().get_mut(id) {
            running.response["status"] = Value::from("in_progress");
        }
    }

    /// Whether background response `id` is still running here (not finished, cancelled or
    /// deleted).
    pub fn is_running(&self, id: &str) -> bool {
        self.lock_running().contains_key(id)
    }

    /// Background response `id` finished: stored (with its events when it was streamed) in
    /// the same step as it stops running, so that whoever asks finds it running or stored,
    /// never neither. False when it was cancelled or deleted meanwhile (then its result is not
    /// stored).
    pub fn store_finished_background(
        &self,
        owner: Option<String>,
        id: &str,
        previous: Option<String>,
        response: String,
        input_items: &[Value],
        output_items: &[Value],
    ) -> bool {
        let mut running = self.lock_running();
        let Some(finished) = running.remove(id) else {
            return false;
        };
        let events = finished.events.map(|events| events.concat());
        let kept = self.local.put(
            owner,
            id,
            previous,
            response,
            input_items,
            output_items,
            events,
        );
        drop(running);
        self.after_put(id, kept);
        true
    }

    /// The running background response `id`, if `owner` started it.
    pub(super) fn running_of<'a>(
        running: &'a HashMap<String, Running>,
        owner: Option<&str>,
        id: &str,
    ) -> Option<&'a Running> {
        running
            .get(id)
            .filter(|running| running.owner.as_deref() == owner)
    }

    /// Cancels background response `id` here: stops its generation and stores it as
    /// cancelled. `None` when no response of `owner` has that id here.
    fn cancel_here(&self, owner: Option<&str>, id: &str) -> Option<Cancelled> {
        let mut running = self.lock_running();
        if Self::running_of(&running, owner, id).is_none() {
            drop(running);
            return self.local.response(owner, id).map(Cancelled::Finished);
        }
        let mut cancelled = running.remove(id).expect("found above");
        if let Some(abort) = &cancelled.abort {
            abort.abort();
        }
        cancelled.response["status"] = Value::from("cancelled");
        let response = cancelled.response.to_string();
        // Stored before the running entry's lock is let go: found running or stored.
        self.local.put(
            cancelled.owner,
            id,
            cancelled.previous,
            response.clone(),
            &cancelled.input_items,
            &[],
            cancelled.events.map(|events| events.concat()),
        );
        drop(running);
        self.record_stats();
        Some(Cancelled::Now(response))
    }

    /// Cancels response `id` wherever it runs ([`Cancelled`]); `None` when `owner` has no
    /// response of that id.
    pub async fn cancel(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<Cancelled>, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.cancel_here(owner, id)),
            Home::Nowhere => return Ok(None),
            Home::Peer(instance) => instance,
        };
        match self
            .ask(instance, owner, id, StoredResponseOp::Cancel)
            .await?
        {
            Some(StoredResponseReply::Response { response }) => {
                // The object says which: a cancelled one was running.
                let status = serde_json::from_str::<Value>(&response)
                    .ok()
                    .and_then(|object| object["status"].as_str().map(str::to_string));
                Ok(Some(match status.as_deref() {
                    Some("cancelled") => Cancelled::Now(response),
                    _ => Cancelled::Finished(response),
                }))
            }
            None => Ok(None),
            Some(other) => Err(odd_answer(instance, id, other)),
        }
    }

    /// Keeps a foreground response this api-server made ([`ResponseStore::put`]); a
    /// background one is kept by [`Self::store_finished_background`].
    pub fn put(
        &self,
        owner: Option<String>,
        id: &str,
        previous: Option<String>,
        response: String,
        input_items: &[Value],
        output_items: &[Value],
    ) -> bool {
        let kept = self.local.put(
            owner,
            id,
            previous,
            response,
            input_items,
            output_items,
            None,
        );
        self.after_put(id, kept)
    }

    /// Metrics and the log after response `id` was stored, or was not (`kept`).
    fn after_put(&self, id: &str, kept: bool) -> bool {
        self.record_stats();
        if !kept {
            tracing::warn!(response_id = %id,
                "a response larger than the whole response store was not stored");
        }
        kept
    }

    pub(super) fn home<'a>(&self, id: &'a str) -> Home<'a> {
        match instance_of(id) {
            Some(instance) if instance == self.instance.as_str() => Home::Here,
            Some(instance) => Home::Peer(instance),
            None => Home::Nowhere,
        }
    }

    /// `response` here: a running background response's object as it stands, else the
    /// stored one.
    fn response_here(&self, owner: Option<&str>, id: &str) -> Option<String> {
        let running = self.lock_running();
        if let Some(running) = Self::running_of(&running, owner, id) {
            return Some(running.response.to_string());
        }
        drop(running);
        self.local.response(owner, id)
    }

    fn input_items_here(&self, owner: Option<&str>, id: &str) -> Option<Vec<Value>> {
        let running = self.lock_running();
        if let Some(running) = Self::running_of(&running, owner, id) {
            return Some(running.input_items.clone());
        }
        drop(running);
        self.local.input_items(owner, id)
    }

    /// Forgets `id` here; a running background response is stopped first.
    fn delete_here(&self, owner: Option<&str>, id: &str) -> bool {
        let mut running = self.lock_running();
        let deleted = if Self::running_of(&running, owner, id).is_some() {
            let stopped = running.remove(id).expect("found above");
            drop(running);
            if let Some(abort) = stopped.abort {
                abort.abort();
            }
            true
        } else {
            drop(running);
            self.local.delete(owner, id)
        };
        self.record_stats();
        deleted
    }

    /// The part of `id`'s chain this api-server holds; none while `id` still runs.
    fn segment_here(&self, owner: Option<&str>, id: &str) -> Result<Segment, ChainError> {
        if Self::running_of(&self.lock_running(), owner, id).is_some() {
            return Err(ChainError::InProgress { id: id.to_string() });
        }
        self.local.segment(owner, id, |link| self.is_here(link))
    }

    /// Whether another api-server made response `id` (so it is asked, whether or not this
    /// one stores responses).
    pub fn made_by_another(&self, id: &str) -> bool {
        matches!(self.home(id), Home::Peer(_))
    }

    pub(super) fn is_here(&self, id: &str) -> bool {
        matches!(self.home(id), Home::Here)
    }

    /// The `response` object of `id` (JSON text), if `owner` stored it on any api-server.
    pub async fn response(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<String>, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.response_here(owner, id)),
            Home::Nowhere => return Ok(None),
            Home::Peer(instance) => instance,
        };
        let reply = self.ask(instance, owner, id, StoredResponseOp::Response);
        match reply.await? {
            Some(StoredResponseReply::Response { response }) => Ok(Some(response)),
            None => Ok(None),
            Some(other) => Err(odd_answer(instance, id, other)),
        }
    }

    /// The input items of `id`'s own request, if `owner` stored it on any api-server.
    pub async fn input_items(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<Vec<Value>>, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.input_items_here(owner, id)),
            Home::Nowhere => return Ok(None),
            Home::Peer(instance) => instance,
        };
        let reply = self.ask(instance, owner, id, StoredResponseOp::InputItems);
        match reply.await? {
            Some(StoredResponseReply::InputItems { items }) => {
                json_array(instance, id, &items).map(Some)
            }
            None => Ok(None),
            Some(other) => Err(odd_answer(instance, id, other)),
        }
    }

    /// Forgets `id` wherever it is kept; whether `owner` had stored it.
    pub async fn delete(&self, owner: Option<&str>, id: &str) -> Result<bool, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.delete_here(owner, id)),
            Home::Nowhere => return Ok(false),
            Home::Peer(instance) => instance,
        };
        match self
            .ask(instance, owner, id, StoredResponseOp::Delete)
            .await?
        {
            Some(StoredResponseReply::Deleted) => Ok(true),
            None => Ok(false),
            Some(other) => Err(odd_answer(instance, id, other)),
        }
    }

    /// The items a response continuing `id` starts from: every input and output item of
    /// `id`'s chain, oldest first, each api-server asked for the part it holds. Each response
    /// on the chain counts as used where it is kept.
    pub async fn context(&self, owner: Option<&str>, id: &str) -> Result<Vec<Value>, ContextError> {
        let mut parts_newest_first = Vec::new();
        let mut next = id.to_string();
        loop {
            let first = parts_newest_first.is_empty();
            let segment = self.segment(owner, &next).await.map_err(|err| match err {
                // The part asked for is missing: past the first, the chain is broken there.
                ContextError::Chain(ChainError::NotFound { id: missing }) if !first => {
                    ContextError::Chain(ChainError::Broken {
                        id: id.to_string(),
                        missing,
                    })
                }
                ContextError::Chain(ChainError::Broken { missing, .. }) => {
                    ContextError::Chain(ChainError::Broken {
                        id: id.to_string(),
                        missing,
                    })
                }
                other => other,
            })?;
            parts_newest_first.push(segment.items);
            match segment.continues {
                Some(previous) if parts_newest_first.len() < MAX_SEGMENTS => next = previous,
                _ => break,
            }
        }
        Ok(parts_newest_first.into_iter().rev().flatten().collect())
    }

    /// The part of `id`'s chain the api-server that made `id` holds.
    async fn segment(&self, owner: Option<&str>, id: &str) -> Result<Segment, ContextError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.segment_here(owner, id)?),
            Home::Nowhere => {
                return Err(ChainError::NotFound { id: id.to_string() }.into());
            }
            Home::Peer(instance) => instance,
        };
        match self
            .ask(instance, owner, id, StoredResponseOp::Context)
            .await?
        {
            Some(StoredResponseReply::Context { items, continues }) => Ok(Segment {
                items: json_array(instance, id, &items)?,
                continues,
            }),
            Some(StoredResponseReply::NotFound {
                missing: Some(missing),
            }) => Err(ChainError::Broken {
                id: id.to_string(),
                missing,
            }
            .into()),
            Some(StoredResponseReply::InProgress) => {
                Err(ChainError::InProgress { id: id.to_string() }.into())
            }
            None => Err(ChainError::NotFound { id: id.to_string() }.into()),
            Some(other) => Err(odd_answer(instance, id, other).into()),
        }
    }

    /// Asks api-server `instance` about `id`: its answer, `None` when it holds no such
    /// response for `owner`.
    async fn ask(
        &self,
        instance: &str,
        owner: Option<&str>,
        id: &str,
        op: StoredResponseOp,
    ) -> Result<Option<StoredResponseReply>, PeerError> {
        self.ask_about(instance, question(owner, id, op)).await
    }

    /// [`Self::ask`] a whole `question` (with the item, the new content or the place in a
    /// stream some questions carry).
    pub(super) async fn ask_about(
        &self,
        instance: &str,
        question: StoredResponseRequest,
    ) -> Result<Option<StoredResponseReply>, PeerError> {
        let id = question.id.as_str();
        let answer = self
            .ask_peer(instance, &question)
            .await
            .and_then(|reply| match reply {
                StoredResponseReply::TooLarge { bytes, max_payload } => Err(PeerError::TooLarge {
                    id: id.to_string(),
                    instance: instance.to_string(),
                    bytes,
                    max_payload,
                }),
                reply => Ok(reply),
            });
        let outcome = match &answer {
            Ok(StoredResponseReply::NotFound { .. }) => "not_found",
            Ok(_) => "found",
            Err(PeerError::Gone { .. }) => "gone",
            Err(PeerError::Timeout { .. }) => "timeout",
            Err(PeerError::TooLarge { .. }) => "too_large",
            Err(PeerError::Bus { .. }) => "error",
        };
        self.metrics.record(Event::ResponsePeer { outcome });
        if let Err(err) = &answer {
            tracing::warn!(id = %id, peer = %instance, %err,
                "a response or conversation another api-server stores could not be reached");
        }
        answer.map(|reply| match reply {
            StoredResponseReply::NotFound { missing: None } => None,
            reply => Some(reply),
        })
    }

    async fn ask_peer(
        &self,
        instance: &str,
        question: &StoredResponseRequest,
    ) -> Result<StoredResponseReply, PeerError> {
        let id = question.id.as_str();
        let gone = || PeerError::Gone {
            id: id.to_string(),
            instance: instance.to_string(),
        };
        let Some(peers) = &self.peers else {
            return Err(gone());
        };
        let bus = |detail: String| PeerError::Bus {
            id: id.to_string(),
            instance: instance.to_string(),
            detail,
        };
        let request = async_nats::Request::new()
            .payload(Bytes::from(encode(question)))
            .timeout(Some(PEER_ANSWER_TIMEOUT));
        let message = peers
            .client
            .send_request(peers.subjects.responses(instance), request)
            .await
            .map_err(|err| match err.kind() {
                async_nats::RequestErrorKind::NoResponders => gone(),
                async_nats::RequestErrorKind::TimedOut => PeerError::Timeout {
                    id: id.to_string(),
                    instance: instance.to_string(),
                    timeout: PEER_ANSWER_TIMEOUT,
                },
                _ => bus(err.to_string()),
            })?;
        decode::<StoredResponseReply>("stored response reply", &message.payload)
            .map_err(|err| bus(err.to_string()))
    }

    /// Answers the other api-servers' questions about the responses this one stored, on its
    /// own subject, until the subscription ends.
    /// Questions are answered one at a time, in the order they come (so a conversation's
    /// changes are made in order), except the events of a stream, which may wait a moment for
    /// more and are answered beside the others.
    pub async fn answer_peers(self: Arc<Self>, mut questions: async_nats::Subscriber) {
        if self.peers.is_none() {
            return;
        }
        while let Some(message) = questions.next().await {
            let Some(reply_to) = message.reply else {
                continue;
            };
            let question = match decode::<StoredResponseRequest>(
                "stored response request",
                &message.payload,
            ) {
                Ok(question) => question,
                Err(err) => {
                    tracing::warn!(%err, "ignoring a bad question about a stored response");
                    continue;
                }
            };
            if question.op == StoredResponseOp::Events {
                let this = Arc::clone(&self);
                tokio::spawn(async move {
                    let answer = this.answer_events(&question).await;
                    this.send_answer(reply_to, &answer).await;
                });
                continue;
            }
            let answer = self.answer(&question);
            self.send_answer(reply_to, &answer).await;
        }
        tracing::error!(
            "the subscription for other api-servers' questions closed: they can no longer \
             reach the responses this api-server stored"
        );
    }

    /// Sends `answer` to the api-server that asked (on `reply_to`), or says it is too large.
    async fn send_answer(&self, reply_to: async_nats::Subject, answer: &StoredResponseReply) {
        let Some(peers) = &self.peers else {
            return;
        };
        let mut bytes = encode(answer);
        let max_payload = peers.client.max_payload();
        if bytes.len() > max_payload {
            bytes = encode(&StoredResponseReply::TooLarge {
                bytes: bytes.len(),
                max_payload,
            });
        }
        if let Err(err) = peers.client.publish(reply_to, bytes.into()).await {
            tracing::warn!(%err, "could not answer another api-server about a stored response");
        }
    }

    /// The answer to another api-server's `question`, from this api-server's store.
    fn answer(&self, question: &StoredResponseRequest) -> StoredResponseReply {
        let owner = question.owner.as_deref();
        let id = question.id.as_str();
        let not_found = StoredResponseReply::NotFound { missing: None };
        if !self.is_here(id) {
            return not_found;
        }
        match question.op {
            StoredResponseOp::Response => match self.response_here(owner, id) {
                Some(response) => StoredResponseReply::Response { response },
                None => not_found,
            },
            StoredResponseOp::InputItems => match self.input_items_here(owner, id) {
                Some(items) => StoredResponseReply::InputItems {
                    items: Value::Array(items).to_string(),
                },
                None => not_found,
            },
            StoredResponseOp::Delete => match self.delete_here(owner, id) {
                true => StoredResponseReply::Deleted,
                false => not_found,
            },
            StoredResponseOp::Cancel => match self.cancel_here(owner, id) {
                Some(Cancelled::Now(response) | Cancelled::Finished(response)) => {
                    StoredResponseReply::Response { response }
                }
                None => not_found,
            },
            StoredResponseOp::Conversation
            | StoredResponseOp::UpdateConversation
            | StoredResponseOp::DeleteConversation
            | StoredResponseOp::ConversationItems
            | StoredResponseOp::AddItems
            | StoredResponseOp::Item
            | StoredResponseOp::DeleteItem => self.answer_about_conversation(question),
            // Answered beside the others ([`Self::answer_peers`]).
            StoredResponseOp::Events => StoredResponseReply::NotFound { missing: None },
            StoredResponseOp::Context => match self.segment_here(owner, id) {
                Ok(segment) => StoredResponseReply::Context {
                    items: Value::Array(segment.items).to_string(),
                    continues: segment.continues,
                },
                Err(ChainError::NotFound { .. }) => not_found,
                Err(ChainError::Broken { missing, .. }) => StoredResponseReply::NotFound {
                    missing: Some(missing),
                },
                Err(ChainError::InProgress { .. }) => StoredResponseReply::InProgress,
            },
        }
    }
}

/// The question `op` about `id` for `owner`, carrying nothing more.
pub(super) fn question(
    owner: Option<&str>,
    id: &str,
    op: StoredResponseOp,
) -> StoredResponseRequest {
    StoredResponseRequest {
        id: id.to_string(),
        owner: owner.map(str::to_string),
        op,
        item: None,
        body: None,
        after: None,
    }
}

/// The items of the JSON array `instance` sent about `id`.
pub(super) fn json_array(instance: &str, id: &str, text: &str) -> Result<Vec<Value>, PeerError> {
    serde_json::from_str(text).map_err(|err| PeerError::Bus {
        id: id.to_string(),
        instance: instance.to_string(),
        detail: format!("items that are not a JSON array: {err}"),
    })
}

/// An answer `instance` gave about `id` that is not one to the question asked.
pub(super) fn odd_answer(instance: &str, id: &str, reply: StoredResponseReply) -> PeerError {
    PeerError::Bus {
        id: id.to_string(),
        instance: instance.to_string(),
        detail: format!("an answer to another question: {reply:?}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn put(store: &StoredResponses, id: &str, previous: Option<&str>, said: &str) {
        assert!(store.put(
            Some("key:a".into()),
            id,
            previous.map(str::to_string),
            json!({"id": id}).to_string(),
            &[json!({"type": "message", "role": "user", "content": said})],
            &[json!({"type": "message", "role": "assistant", "content": format!("re {said}")})],
        ));
    }

    fn texts(items: &[Value]) -> Vec<&str> {
        items
            .iter()
            .map(|item| item["content"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn its_own_responses_are_answered_from_its_store_and_others_are_gone() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let first = store.new_id();
        let second = store.new_id();
        put(&store, &first, None, "one");
        put(&store, &second, Some(&first), "two");
        let context = store.context(Some("key:a"), &second).await.unwrap();
        assert_eq!(texts(&context), ["one", "re one", "two", "re two"]);
        assert_eq!(
            store.response(Some("key:a"), &first).await.unwrap(),
            Some(json!({"id": first}).to_string())
        );
        // Another api-server's response, with no bus to reach it: gone, and so is a chain
        // through it.
        let elsewhere = Instance::random().new_id();
        assert!(matches!(
            store.response(Some("key:a"), &elsewhere).await,
            Err(PeerError::Gone { .. })
        ));
        let third = store.new_id();
        put(&store, &third, Some(&elsewhere), "three");
        assert!(matches!(
            store.context(Some("key:a"), &third).await,
            Err(ContextError::Peer(PeerError::Gone { .. }))
        ));
        // An id no api-server makes is simply not found.
        assert_eq!(store.response(Some("key:a"), "resp_1").await.unwrap(), None);
        assert_eq!(
            store.context(Some("key:a"), "resp_1").await,
            Err(ContextError::Chain(ChainError::NotFound {
                id: "resp_1".into()
            }))
        );
    }

    #[test]
    fn questions_about_its_responses_get_their_answers() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let first = store.new_id();
        let second = store.new_id();
        put(&store, &first, None, "one");
        put(&store, &second, Some(&first), "two");
        let ask = |id: &str, owner: Option<&str>, op| store.answer(&question(owner, id, op));
        let StoredResponseReply::Context { items, continues } =
            ask(&second, Some("key:a"), StoredResponseOp::Context)
        else {
            panic!("a context");
        };
        assert_eq!(continues, None);
        assert_eq!(
            texts(&json_array("", "", &items).unwrap()),
            ["one", "re one", "two", "re two"]
        );
        assert_eq!(
            ask(&second, Some("key:b"), StoredResponseOp::Response),
            StoredResponseReply::NotFound { missing: None },
            "another key finds nothing"
        );
        assert_eq!(
            ask(&first, Some("key:a"), StoredResponseOp::Delete),
            StoredResponseReply::Deleted
        );
        assert_eq!(
            ask(&second, Some("key:a"), StoredResponseOp::Context),
            StoredResponseReply::NotFound {
                missing: Some(first.clone())
            },
            "the chain is broken where the deleted response was"
        );
        let StoredResponseReply::InputItems { items } =
            ask(&second, Some("key:a"), StoredResponseOp::InputItems)
        else {
            panic!("input items");
        };
        assert_eq!(texts(&json_array("", "", &items).unwrap()), ["two"]);
        // Another instance's id is not answered from here, even if the digits matched.
        let foreign = Instance::random().new_id();
        assert_eq!(
            ask(&foreign, Some("key:a"), StoredResponseOp::Response),
            StoredResponseReply::NotFound { missing: None }
        );
    }

    #[tokio::test]
    async fn a_background_response_is_found_while_it_runs_and_cancelled_once() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let id = store.new_id();
        let queued = json!({"id": id, "status": "queued", "background": true}).to_string();
        let input = vec![json!({"type": "message", "role": "user", "content": "hi"})];
        store.start_background(
            Some("key:a".into()),
            &id,
            None,
            &queued,
            input.clone(),
            false,
        );
        let task = tokio::spawn(std::future::pending::<()>());
        store.set_abort(&id, task.abort_handle());
        assert_eq!(store.stats().background, 1);
        let status = |store: &StoredResponses| {
            let found = store.response_here(Some("key:a"), &id).unwrap();
            serde_json::from_str::<Value>(&found).unwrap()["status"].clone()
        };
        assert_eq!(status(&store), "queued");
        store.mark_in_progress(&id);
        assert_eq!(status(&store), "in_progress");
        assert_eq!(store.input_items_here(Some("key:a"), &id), Some(input));
        assert_eq!(
            store.response_here(Some("key:b"), &id),
            None,
            "another key's"
        );
        // Nothing continues it yet.
        assert_eq!(
            store.context(Some("key:a"), &id).await,
            Err(ContextError::Chain(ChainError::InProgress {
                id: id.clone()
            }))
        );
        // Cancelled: its generation stopped, stored as cancelled; cancelling again finds it
        // finished; its task's result is not stored over it.
        let Some(Cancelled::Now(cancelled)) = store.cancel(Some("key:a"), &id).await.unwrap()
        else {
            panic!("a running response is cancelled");
        };
        assert_eq!(
            serde_json::from_str::<Value>(&cancelled).unwrap()["status"],
            "cancelled"
        );
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(status(&store), "cancelled");
        assert_eq!(
            store.cancel(Some("key:a"), &id).await.unwrap(),
            Some(Cancelled::Finished(cancelled))
        );
        assert!(!store.store_finished_background(None, &id, None, "{}".into(), &[], &[]));
        assert_eq!(store.stats().background, 0);
        assert_eq!(store.context(Some("key:a"), &id).await.unwrap().len(), 1);
        // Deleting one that runs stops it too.
        let other = store.new_id();
        store.start_background(None, &other, None, &queued, Vec::new(), false);
        let task = tokio::spawn(std::future::pending::<()>());
        store.set_abort(&other, task.abort_handle());
        assert!(store.delete(None, &other).await.unwrap());
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(store.response(None, &other).await.unwrap(), None);
    }
}
