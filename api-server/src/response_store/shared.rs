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

use std::sync::Arc;
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
        "response {id} was stored by api-server {instance}, which no longer answers (a stored \
         response lives in the memory of the api-server that made it and goes with it)"
    )]
    Gone { id: String, instance: String },
    #[error("api-server {instance}, which stored response {id}, did not answer within {timeout:?}")]
    Timeout {
        id: String,
        instance: String,
        timeout: Duration,
    },
    #[error("asking api-server {instance} about response {id}: {detail}")]
    Bus {
        id: String,
        instance: String,
        detail: String,
    },
    #[error(
        "what api-server {instance} stores of response {id} is {bytes} bytes of JSON, over the \
         NATS server's max_payload of {max_payload}: send the conversation in input instead"
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

/// Every api-server's stored responses, from this one.
pub struct StoredResponses {
    local: ResponseStore,
    instance: Instance,
    /// `None`: no bus (unit tests); other api-servers' responses are then gone.
    peers: Option<Peers>,
    metrics: Metrics,
}

/// Where a response is kept.
enum Home<'a> {
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
        }
    }

    /// A store that reaches no other api-server.
    pub fn alone(local: ResponseStore, metrics: Metrics) -> Self {
        StoredResponses {
            local,
            instance: Instance::random(),
            peers: None,
            metrics,
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

    /// What this api-server's store holds.
    pub fn stats(&self) -> StoreStats {
        self.local.stats()
    }

    /// Keeps a response this api-server made ([`ResponseStore::put`]).
    pub fn put(
        &self,
        owner: Option<String>,
        id: &str,
        previous: Option<String>,
        response: String,
        input_items: &[Value],
        output_items: &[Value],
    ) -> bool {
        let kept = self
            .local
            .put(owner, id, previous, response, input_items, output_items);
        self.metrics
            .record(Event::ResponseStore(self.local.stats()));
        kept
    }

    fn home<'a>(&self, id: &'a str) -> Home<'a> {
        match instance_of(id) {
            Some(instance) if instance == self.instance.as_str() => Home::Here,
            Some(instance) => Home::Peer(instance),
            None => Home::Nowhere,
        }
    }

    /// Whether another api-server made response `id` (so it is asked, whether or not this
    /// one stores responses).
    pub fn made_by_another(&self, id: &str) -> bool {
        matches!(self.home(id), Home::Peer(_))
    }

    fn is_here(&self, id: &str) -> bool {
        matches!(self.home(id), Home::Here)
    }

    /// The `response` object of `id` (JSON text), if `owner` stored it on any api-server.
    pub async fn response(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<String>, PeerError> {
        let instance = match self.home(id) {
            Home::Here => return Ok(self.local.response(owner, id)),
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
            Home::Here => return Ok(self.local.input_items(owner, id)),
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
            Home::Here => {
                let deleted = self.local.delete(owner, id);
                self.metrics
                    .record(Event::ResponseStore(self.local.stats()));
                return Ok(deleted);
            }
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
            Home::Here => return Ok(self.local.segment(owner, id, |link| self.is_here(link))?),
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
        let answer = self
            .ask_peer(instance, owner, id, op)
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
            tracing::warn!(response_id = %id, peer = %instance, %err,
                "a stored response of another api-server could not be reached");
        }
        answer.map(|reply| match reply {
            StoredResponseReply::NotFound { missing: None } => None,
            reply => Some(reply),
        })
    }

    async fn ask_peer(
        &self,
        instance: &str,
        owner: Option<&str>,
        id: &str,
        op: StoredResponseOp,
    ) -> Result<StoredResponseReply, PeerError> {
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
        let question = encode(&StoredResponseRequest {
            id: id.to_string(),
            owner: owner.map(str::to_string),
            op,
        });
        let request = async_nats::Request::new()
            .payload(Bytes::from(question))
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
    pub async fn answer_peers(self: Arc<Self>, mut questions: async_nats::Subscriber) {
        let Some(peers) = &self.peers else {
            return;
        };
        while let Some(message) = questions.next().await {
            let Some(reply_to) = message.reply else {
                continue;
            };
            let answer = match decode::<StoredResponseRequest>(
                "stored response request",
                &message.payload,
            ) {
                Ok(question) => self.answer(&question),
                Err(err) => {
                    tracing::warn!(%err, "ignoring a bad question about a stored response");
                    continue;
                }
            };
            let mut bytes = encode(&answer);
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
        tracing::error!(
            "the subscription for other api-servers' questions closed: they can no longer \
             reach the responses this api-server stored"
        );
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
            StoredResponseOp::Response => match self.local.response(owner, id) {
                Some(response) => StoredResponseReply::Response { response },
                None => not_found,
            },
            StoredResponseOp::InputItems => match self.local.input_items(owner, id) {
                Some(items) => StoredResponseReply::InputItems {
                    items: Value::Array(items).to_string(),
                },
                None => not_found,
            },
            StoredResponseOp::Delete => {
                let deleted = self.local.delete(owner, id);
                self.metrics
                    .record(Event::ResponseStore(self.local.stats()));
                match deleted {
                    true => StoredResponseReply::Deleted,
                    false => not_found,
                }
            }
            StoredResponseOp::Context => {
                match self.local.segment(owner, id, |link| self.is_here(link)) {
                    Ok(segment) => StoredResponseReply::Context {
                        items: Value::Array(segment.items).to_string(),
                        continues: segment.continues,
                    },
                    Err(ChainError::NotFound { .. }) => not_found,
                    Err(ChainError::Broken { missing, .. }) => StoredResponseReply::NotFound {
                        missing: Some(missing),
                    },
                }
            }
        }
    }
}

/// The items of the JSON array `instance` sent about `id`.
fn json_array(instance: &str, id: &str, text: &str) -> Result<Vec<Value>, PeerError> {
    serde_json::from_str(text).map_err(|err| PeerError::Bus {
        id: id.to_string(),
        instance: instance.to_string(),
        detail: format!("items that are not a JSON array: {err}"),
    })
}

/// An answer `instance` gave about `id` that is not one to the question asked.
fn odd_answer(instance: &str, id: &str, reply: StoredResponseReply) -> PeerError {
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
        let ask = |id: &str, owner: Option<&str>, op| {
            store.answer(&StoredResponseRequest {
                id: id.to_string(),
                owner: owner.map(str::to_string),
                op,
            })
        };
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
}
