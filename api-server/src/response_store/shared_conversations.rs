//! Conversations as the routes see them: this api-server's, in its own store, and the other
//! api-servers', reached over NATS as their stored responses are ([`StoredResponses`]): a
//! conversation's id names the api-server that made it, which answers every question about
//! it, so its items change in one place, in the order the questions come.

use serde_json::{Map, Value};
use tandem_protocol::messages::{StoredResponseOp, StoredResponseReply, StoredResponseRequest};

use super::conversations::ConversationError;
use super::shared::{Home, PeerError, StoredResponses, json_array, odd_answer, question};

/// Why a conversation could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationOpError {
    #[error(transparent)]
    Conversation(#[from] ConversationError),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

impl StoredResponses {
    /// Starts a conversation here for `owner`, with `metadata` and its first `items` (each
    /// with an `id`): the `conversation` object (JSON text).
    pub fn create_conversation(
        &self,
        owner: Option<String>,
        created_at: u64,
        metadata: &Map<String, Value>,
        items: &[Value],
    ) -> Result<String, ConversationError> {
        let id = self.instance().new_conversation_id();
        let created = self
            .local
            .create_conversation(owner, &id, created_at, metadata, items);
        self.record_stats();
        created
    }

    /// The `conversation` object `id` (JSON text), wherever it is kept.
    pub async fn conversation(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<String, ConversationOpError> {
        let reply = self
            .ask_conversation(owner, id, StoredResponseOp::Conversation, None, None)
            .await?;
        conversation_object(id, reply)
    }

    /// Replaces conversation `id`'s metadata: the object after.
    pub async fn update_conversation(
        &self,
        owner: Option<&str>,
        id: &str,
        metadata: &Map<String, Value>,
    ) -> Result<String, ConversationOpError> {
        let body = Value::Object(metadata.clone()).to_string();
        let reply = self
            .ask_conversation(
                owner,
                id,
                StoredResponseOp::UpdateConversation,
                None,
                Some(body),
            )
            .await?;
        conversation_object(id, reply)
    }

    /// Forgets conversation `id` and its items.
    pub async fn delete_conversation(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<(), ConversationOpError> {
        match self
            .ask_conversation(owner, id, StoredResponseOp::DeleteConversation, None, None)
            .await?
        {
            StoredResponseReply::Deleted => Ok(()),
            other => Err(unexpected(id, other)),
        }
    }

    /// Every item of conversation `id`, oldest first.
    pub async fn conversation_items(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Vec<Value>, ConversationOpError> {
        match self
            .ask_conversation(owner, id, StoredResponseOp::ConversationItems, None, None)
            .await?
        {
            StoredResponseReply::ConversationItems { items } => {
                let instance = self.instance_holding(id);
                Ok(json_array(&instance, id, &items)?)
            }
            other => Err(unexpected(id, other)),
        }
    }

    /// Item `item` of conversation `id`.
    pub async fn conversation_item(
        &self,
        owner: Option<&str>,
        id: &str,
        item: &str,
    ) -> Result<Value, ConversationOpError> {
        match self
            .ask_conversation(owner, id, StoredResponseOp::Item, Some(item), None)
            .await?
        {
            StoredResponseReply::Item { item: text } => {
                serde_json::from_str(&text).map_err(|err| {
                    PeerError::Bus {
                        id: id.to_string(),
                        instance: self.instance_holding(id),
                        detail: format!("an item that is not JSON: {err}"),
                    }
                    .into()
                })
            }
            other => Err(unexpected(id, other)),
        }
    }

    /// Adds `items` (each with an `id`) after conversation `id`'s last.
    pub async fn add_items(
        &self,
        owner: Option<&str>,
        id: &str,
        items: &[Value],
    ) -> Result<(), ConversationOpError> {
        let body = Value::Array(items.to_vec()).to_string();
        match self
            .ask_conversation(owner, id, StoredResponseOp::AddItems, None, Some(body))
            .await?
        {
            StoredResponseReply::Added => Ok(()),
            other => Err(unexpected(id, other)),
        }
    }

    /// Deletes item `item` of conversation `id`: the conversation's object after.
    pub async fn delete_item(
        &self,
        owner: Option<&str>,
        id: &str,
        item: &str,
    ) -> Result<String, ConversationOpError> {
        let reply = self
            .ask_conversation(owner, id, StoredResponseOp::DeleteItem, Some(item), None)
            .await?;
        conversation_object(id, reply)
    }

    /// A finished response's items could not be added to conversation `id` (`err`): counted
    /// and logged (the response stands).
    pub fn turn_lost(&self, id: &str, err: &ConversationOpError) {
        self.metrics
            .record(crate::metrics::Event::ConversationTurnLost);
        tracing::warn!(conversation = %id, %err,
            "a response's items could not be added to its conversation");
    }

    /// The instance an id names, for errors.
    fn instance_holding(&self, id: &str) -> String {
        match self.home(id) {
            Home::Here => self.instance().to_string(),
            Home::Peer(instance) => instance.to_string(),
            Home::Nowhere => String::new(),
        }
    }

    /// The answer to a question about conversation `id`, from this api-server's store or
    /// the one that made it: what [`Self::answer_about_conversation`] answers, its "not found"
    /// and "too large" as errors.
    async fn ask_conversation(
        &self,
        owner: Option<&str>,
        id: &str,
        op: StoredResponseOp,
        item: Option<&str>,
        body: Option<String>,
    ) -> Result<StoredResponseReply, ConversationOpError> {
        let question = StoredResponseRequest {
            item: item.map(str::to_string),
            body,
            ..question(owner, id, op)
        };
        let reply = match self.home(id) {
            Home::Nowhere => None,
            Home::Here => match self.answer_about_conversation(&question) {
                StoredResponseReply::NotFound { missing: None } => None,
                reply => Some(reply),
            },
            Home::Peer(instance) => self.ask_about(instance, question).await?,
        };
        match reply {
            None => Err(ConversationError::NotFound { id: id.to_string() }.into()),
            Some(StoredResponseReply::NotFound {
                missing: Some(item),
            }) => Err(ConversationError::ItemNotFound {
                id: id.to_string(),
                item,
            }
            .into()),
            Some(StoredResponseReply::ConversationTooLarge { bytes, limit }) => {
                Err(ConversationError::TooLarge {
                    id: id.to_string(),
                    bytes,
                    limit,
                }
                .into())
            }
            Some(reply) => Ok(reply),
        }
    }

    /// The answer to a question about a conversation this api-server keeps.
    pub(super) fn answer_about_conversation(
        &self,
        question: &StoredResponseRequest,
    ) -> StoredResponseReply {
        let owner = question.owner.as_deref();
        let id = question.id.as_str();
        let item = question.item.as_deref().unwrap_or_default();
        let body = || -> Option<Value> { serde_json::from_str(question.body.as_deref()?).ok() };
        let store = &self.local;
        let answered = match question.op {
            StoredResponseOp::Conversation => store
                .conversation(owner, id)
                .map(|conversation| StoredResponseReply::Conversation { conversation }),
            StoredResponseOp::UpdateConversation => {
                let Some(Value::Object(metadata)) = body() else {
                    return bad_question(question, "metadata that is not a JSON object");
                };
                store
                    .update_conversation(owner, id, &metadata)
                    .map(|conversation| StoredResponseReply::Conversation { conversation })
            }
            StoredResponseOp::DeleteConversation => match store.delete_conversation(owner, id) {
                true => Ok(StoredResponseReply::Deleted),
                false => Err(ConversationError::NotFound { id: id.to_string() }),
            },
            StoredResponseOp::ConversationItems => {
                store.conversation_items(owner, id).map(|items| {
                    StoredResponseReply::ConversationItems {
                        items: Value::Array(items).to_string(),
                    }
                })
            }
            StoredResponseOp::AddItems => {
                let Some(Value::Array(items)) = body() else {
                    return bad_question(question, "items that are not a JSON array");
                };
                store
                    .add_items(owner, id, &items)
                    .map(|()| StoredResponseReply::Added)
            }
            StoredResponseOp::Item => {
                store
                    .conversation_item(owner, id, item)
                    .map(|item| StoredResponseReply::Item {
                        item: item.to_string(),
                    })
            }
            StoredResponseOp::DeleteItem => store
                .delete_item(owner, id, item)
                .map(|conversation| StoredResponseReply::Conversation { conversation }),
            StoredResponseOp::Response
            | StoredResponseOp::InputItems
            | StoredResponseOp::Delete
            | StoredResponseOp::Context
            | StoredResponseOp::Cancel
            | StoredResponseOp::Events => {
                return bad_question(question, "a question about a response");
            }
        };
        self.record_stats();
        match answered {
            Ok(reply) => reply,
            Err(ConversationError::NotFound { .. }) => {
                StoredResponseReply::NotFound { missing: None }
            }
            Err(ConversationError::ItemNotFound { item, .. }) => StoredResponseReply::NotFound {
                missing: Some(item),
            },
            Err(ConversationError::TooLarge { bytes, limit, .. }) => {
                StoredResponseReply::ConversationTooLarge { bytes, limit }
            }
        }
    }
}

/// A question no api-server asks: answered as not found, and logged.
fn bad_question(question: &StoredResponseRequest, what: &str) -> StoredResponseReply {
    tracing::warn!(id = %question.id, op = ?question.op,
        "a question about a conversation with {what}: answered as not found");
    StoredResponseReply::NotFound { missing: None }
}

fn conversation_object(
    id: &str,
    reply: StoredResponseReply,
) -> Result<String, ConversationOpError> {
    match reply {
        StoredResponseReply::Conversation { conversation } => Ok(conversation),
        other => Err(unexpected(id, other)),
    }
}

/// An answer that is not one to the question asked.
fn unexpected(id: &str, reply: StoredResponseReply) -> ConversationOpError {
    odd_answer("", id, reply).into()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::response_store::ResponseStore;
    use crate::response_store::ids::Instance;

    const OWNER: Option<&str> = Some("key:a");

    fn message(id: &str, text: &str) -> Value {
        json!({"type": "message", "id": id, "role": "user", "content": text})
    }

    #[tokio::test]
    async fn conversations_here_are_served_and_others_are_gone() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let object = store
            .create_conversation(
                OWNER.map(str::to_string),
                5,
                json!({"k": "v"}).as_object().unwrap(),
                &[message("m1", "one")],
            )
            .unwrap();
        let id = serde_json::from_str::<Value>(&object).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(id.starts_with("conv_"));
        assert!(store.is_here(&id));
        assert_eq!(store.conversation(OWNER, &id).await.unwrap(), object);
        store
            .add_items(OWNER, &id, &[message("m2", "two")])
            .await
            .unwrap();
        let items = store.conversation_items(OWNER, &id).await.unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            store.conversation_item(OWNER, &id, "m2").await.unwrap(),
            message("m2", "two")
        );
        assert_eq!(
            store.conversation_item(OWNER, &id, "m9").await,
            Err(ConversationOpError::Conversation(
                ConversationError::ItemNotFound {
                    id: id.clone(),
                    item: "m9".into()
                }
            ))
        );
        assert_eq!(store.delete_item(OWNER, &id, "m1").await.unwrap(), object);
        let updated = store
            .update_conversation(OWNER, &id, &Map::new())
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&updated).unwrap()["metadata"],
            json!({})
        );
        assert!(matches!(
            store.conversation(Some("key:b"), &id).await,
            Err(ConversationOpError::Conversation(
                ConversationError::NotFound { .. }
            ))
        ));
        assert_eq!(store.stats().conversations, 1);
        store.delete_conversation(OWNER, &id).await.unwrap();
        assert!(store.conversation(OWNER, &id).await.is_err());
        // Another api-server's conversation, with no bus to reach it: gone.
        let elsewhere = Instance::random().new_conversation_id();
        assert!(matches!(
            store.conversation(OWNER, &elsewhere).await,
            Err(ConversationOpError::Peer(PeerError::Gone { .. }))
        ));
        // An id no api-server makes: not found.
        assert!(matches!(
            store.conversation_items(OWNER, "conv_1").await,
            Err(ConversationOpError::Conversation(
                ConversationError::NotFound { .. }
            ))
        ));
    }

    #[test]
    fn questions_about_its_conversations_get_their_answers() {
        let store = StoredResponses::alone(ResponseStore::new(1 << 20), Metrics::new());
        let object = store
            .create_conversation(OWNER.map(str::to_string), 5, &Map::new(), &[])
            .unwrap();
        let id = serde_json::from_str::<Value>(&object).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let ask = |op, item: Option<&str>, body: Option<Value>| {
            store.answer_about_conversation(&StoredResponseRequest {
                item: item.map(str::to_string),
                body: body.map(|b| b.to_string()),
                ..question(OWNER, &id, op)
            })
        };
        assert_eq!(
            ask(
                StoredResponseOp::AddItems,
                None,
                Some(json!([message("m1", "hi")]))
            ),
            StoredResponseReply::Added
        );
        assert_eq!(
            ask(StoredResponseOp::ConversationItems, None, None),
            StoredResponseReply::ConversationItems {
                items: json!([message("m1", "hi")]).to_string()
            }
        );
        assert_eq!(
            ask(StoredResponseOp::Item, Some("m2"), None),
            StoredResponseReply::NotFound {
                missing: Some("m2".into())
            }
        );
        assert_eq!(
            ask(
                StoredResponseOp::AddItems,
                None,
                Some(json!({"not": "a list"}))
            ),
            StoredResponseReply::NotFound { missing: None },
            "a malformed question"
        );
        assert_eq!(
            ask(StoredResponseOp::DeleteConversation, None, None),
            StoredResponseReply::Deleted
        );
        assert_eq!(
            ask(StoredResponseOp::Conversation, None, None),
            StoredResponseReply::NotFound { missing: None }
        );
    }
}
