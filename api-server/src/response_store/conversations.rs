//! Conversations (OpenAI's Conversations API) in this api-server's store: a conversation is
//! its metadata and its items, oldest first, which a response naming it (`conversation`)
//! starts from and adds its own input and output items to when it finishes.
//!
//! They share the store's bound and its least-recently-used order with the stored responses
//! (a conversation counts as used whenever it is read or changed), and are found only with
//! the API key that made them. Each item is held as its JSON text, so that one item is read,
//! listed or deleted without parsing the others.

use serde_json::{Map, Value};

use super::kept::{Conversation, Kept};
use super::local::ResponseStore;

/// Why a conversation, or one of its items, could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    #[error("no conversation has the id {id}")]
    NotFound { id: String },
    #[error("conversation {id} has no item {item}")]
    ItemNotFound { id: String, item: String },
    #[error(
        "conversation {id} would hold {bytes} bytes of JSON, over the {limit} bytes its \
         api-server keeps for stored responses and conversations (--response-store-mib): \
         delete some of its items, or start another conversation"
    )]
    TooLarge {
        id: String,
        bytes: usize,
        limit: usize,
    },
}

/// `items` as the store keeps them: each one's `id` and JSON text. Items come with ids
/// (the routes give every item one).
fn texts(items: &[Value]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|item| {
            let id = item["id"].as_str().unwrap_or_default().to_string();
            let mut text = item.to_string();
            text.shrink_to_fit();
            (id, text)
        })
        .collect()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("the store holds the JSON it wrote")
}

impl ResponseStore {
    /// Starts conversation `id` for `owner` with `metadata` (an object of strings) and its
    /// first `items` (each with an `id`): the `conversation` object.
    pub fn create_conversation(
        &self,
        owner: Option<String>,
        id: &str,
        created_at: u64,
        metadata: &Map<String, Value>,
        items: &[Value],
    ) -> Result<String, ConversationError> {
        let conversation = Conversation {
            created_at,
            metadata: Value::Object(metadata.clone()).to_string(),
            items: texts(items),
        };
        let object = conversation.object(id);
        let bytes = conversation.bytes();
        let limit = self.limit_bytes();
        match self
            .lock()
            .insert(limit, owner, id, Kept::Conversation(conversation))
        {
            true => Ok(object),
            false => Err(ConversationError::TooLarge {
                id: id.to_string(),
                bytes,
                limit,
            }),
        }
    }

    /// Runs `read` on conversation `id` of `owner` (which then counts as used).
    fn read_conversation<T>(
        &self,
        owner: Option<&str>,
        id: &str,
        read: impl FnOnce(&Conversation) -> T,
    ) -> Result<T, ConversationError> {
        let mut inner = self.lock();
        let found = match inner.owned(owner, id).map(|stored| &stored.kept) {
            Some(Kept::Conversation(conversation)) => read(conversation),
            _ => return Err(ConversationError::NotFound { id: id.to_string() }),
        };
        inner.touch(id);
        Ok(found)
    }

    /// Runs `change` on conversation `id` of `owner`, given the store's bound.
    fn change_conversation<T>(
        &self,
        owner: Option<&str>,
        id: &str,
        change: impl FnOnce(&mut Conversation, usize) -> Result<T, ConversationError>,
    ) -> Result<T, ConversationError> {
        let not_found = || ConversationError::NotFound { id: id.to_string() };
        let limit = self.limit_bytes();
        let mut inner = self.lock();
        if !matches!(
            inner.owned(owner, id).map(|stored| &stored.kept),
            Some(Kept::Conversation(_))
        ) {
            return Err(not_found());
        }
        inner
            .change(limit, owner, id, |kept, limit| match kept {
                Kept::Conversation(conversation) => change(conversation, limit),
                Kept::Response(_) => unreachable!("a conversation, checked above"),
            })
            .unwrap_or_else(|| Err(not_found()))
    }

    /// The `conversation` object `id` (JSON text).
    pub fn conversation(&self, owner: Option<&str>, id: &str) -> Result<String, ConversationError> {
        self.read_conversation(owner, id, |conversation| conversation.object(id))
    }

    /// Replaces conversation `id`'s metadata: the `conversation` object after.
    pub fn update_conversation(
        &self,
        owner: Option<&str>,
        id: &str,
        metadata: &Map<String, Value>,
    ) -> Result<String, ConversationError> {
        let metadata = Value::Object(metadata.clone()).to_string();
        self.change_conversation(owner, id, |conversation, limit| {
            let bytes = conversation.bytes() - conversation.metadata.len() + metadata.len();
            if bytes > limit {
                return Err(ConversationError::TooLarge {
                    id: id.to_string(),
                    bytes,
                    limit,
                });
            }
            conversation.metadata = metadata;
            Ok(conversation.object(id))
        })
    }

    /// Forgets conversation `id` and its items; whether `owner` had it.
    pub fn delete_conversation(&self, owner: Option<&str>, id: &str) -> bool {
        let mut inner = self.lock();
        match inner.owned(owner, id).map(|stored| &stored.kept) {
            Some(Kept::Conversation(_)) => inner.remove(id).is_some(),
            _ => false,
        }
    }

    /// Every item of conversation `id`, oldest first.
    pub fn conversation_items(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Vec<Value>, ConversationError> {
        self.read_conversation(owner, id, |conversation| {
            conversation
                .items
                .iter()
                .map(|(_, item)| parse(item))
                .collect()
        })
    }

    /// Item `item` of conversation `id`.
    pub fn conversation_item(
        &self,
        owner: Option<&str>,
        id: &str,
        item: &str,
    ) -> Result<Value, ConversationError> {
        self.read_conversation(owner, id, |conversation| {
            conversation
                .items
                .iter()
                .find(|(item_id, _)| item_id == item)
                .map(|(_, text)| parse(text))
        })?
        .ok_or_else(|| ConversationError::ItemNotFound {
            id: id.to_string(),
            item: item.to_string(),
        })
    }

    /// Adds `items` (each with an `id`) after conversation `id`'s last; nothing when they
    /// would take it over the store's bound.
    pub fn add_items(
        &self,
        owner: Option<&str>,
        id: &str,
        items: &[Value],
    ) -> Result<(), ConversationError> {
        let added = texts(items);
        let grows: usize = added.iter().map(|(id, item)| id.len() + item.len()).sum();
        self.change_conversation(owner, id, |conversation, limit| {
            let bytes = conversation.bytes() + grows;
            if bytes > limit {
                return Err(ConversationError::TooLarge {
                    id: id.to_string(),
                    bytes,
                    limit,
                });
            }
            conversation.items.extend(added);
            Ok(())
        })
    }

    /// Deletes item `item` of conversation `id`: the `conversation` object after.
    pub fn delete_item(
        &self,
        owner: Option<&str>,
        id: &str,
        item: &str,
    ) -> Result<String, ConversationError> {
        self.change_conversation(owner, id, |conversation, _| {
            let Some(at) = conversation
                .items
                .iter()
                .position(|(item_id, _)| item_id == item)
            else {
                return Err(ConversationError::ItemNotFound {
                    id: id.to_string(),
                    item: item.to_string(),
                });
            };
            conversation.items.remove(at);
            Ok(conversation.object(id))
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const OWNER: Option<&str> = Some("key:a");

    fn message(id: &str, text: &str) -> Value {
        json!({"type": "message", "id": id, "role": "user", "content": text})
    }

    fn ids(items: &[Value]) -> Vec<&str> {
        items.iter().map(|i| i["id"].as_str().unwrap()).collect()
    }

    fn create(store: &ResponseStore, id: &str, items: &[Value]) -> String {
        let metadata = json!({"topic": "demo"});
        store
            .create_conversation(
                OWNER.map(str::to_string),
                id,
                7,
                metadata.as_object().unwrap(),
                items,
            )
            .unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_items_in_order_for_its_owner() {
        let store = ResponseStore::new(1 << 20);
        let object = create(&store, "conv_1", &[message("m1", "one")]);
        assert_eq!(
            serde_json::from_str::<Value>(&object).unwrap(),
            json!({"id": "conv_1", "object": "conversation", "created_at": 7,
                   "metadata": {"topic": "demo"}})
        );
        assert_eq!(store.conversation(OWNER, "conv_1").unwrap(), object);
        store
            .add_items(
                OWNER,
                "conv_1",
                &[message("m2", "two"), message("m3", "three")],
            )
            .unwrap();
        let items = store.conversation_items(OWNER, "conv_1").unwrap();
        assert_eq!(ids(&items), ["m1", "m2", "m3"]);
        assert_eq!(
            store.conversation_item(OWNER, "conv_1", "m2").unwrap()["content"],
            "two"
        );
        // Deleting an item returns the conversation; the others stay in order.
        assert_eq!(store.delete_item(OWNER, "conv_1", "m2").unwrap(), object);
        assert_eq!(
            ids(&store.conversation_items(OWNER, "conv_1").unwrap()),
            ["m1", "m3"]
        );
        assert_eq!(
            store.delete_item(OWNER, "conv_1", "m2"),
            Err(ConversationError::ItemNotFound {
                id: "conv_1".into(),
                item: "m2".into()
            })
        );
        // Metadata is replaced whole.
        let updated = store
            .update_conversation(OWNER, "conv_1", json!({"a": "b"}).as_object().unwrap())
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&updated).unwrap()["metadata"],
            json!({"a": "b"})
        );
        // Another key, or none, finds nothing and changes nothing.
        let not_found = Err(ConversationError::NotFound {
            id: "conv_1".into(),
        });
        assert_eq!(store.conversation(Some("key:b"), "conv_1"), not_found);
        assert_eq!(store.conversation(None, "conv_1"), not_found);
        assert_eq!(
            store.add_items(Some("key:b"), "conv_1", &[message("x", "x")]),
            Err(ConversationError::NotFound {
                id: "conv_1".into()
            })
        );
        assert!(!store.delete_conversation(Some("key:b"), "conv_1"));
        let stats = store.stats();
        assert_eq!((stats.conversations, stats.responses), (1, 0));
        assert!(store.delete_conversation(OWNER, "conv_1"));
        assert_eq!(store.conversation(OWNER, "conv_1"), not_found);
        assert_eq!(store.stats().bytes, 0);
    }

    #[test]
    fn a_conversation_is_not_a_response_and_a_response_is_not_a_conversation() {
        let store = ResponseStore::new(1 << 20);
        create(&store, "conv_1", &[]);
        assert_eq!(store.response(OWNER, "conv_1"), None);
        assert!(!store.delete(OWNER, "conv_1"));
        store.put(
            OWNER.map(str::to_string),
            "resp_1",
            None,
            "{}".into(),
            &[],
            &[],
            None,
        );
        assert!(store.conversation(OWNER, "resp_1").is_err());
        assert!(!store.delete_conversation(OWNER, "resp_1"));
        assert!(store.response(OWNER, "resp_1").is_some());
    }

    #[test]
    fn a_growing_conversation_evicts_the_least_recently_used_others_but_never_itself() {
        let item = message("m", &"x".repeat(1000));
        let one = item.to_string().len() + 1;
        let store = ResponseStore::new(10 * one);
        create(&store, "conv_old", std::slice::from_ref(&item));
        create(&store, "conv_new", std::slice::from_ref(&item));
        // Growing conv_new past the bound drops conv_old, the least recently used.
        let six: Vec<Value> = (0..6).map(|_| item.clone()).collect();
        store.add_items(OWNER, "conv_new", &six).unwrap();
        store.add_items(OWNER, "conv_new", &six[..2]).unwrap();
        assert!(store.conversation(OWNER, "conv_old").is_err(), "evicted");
        assert_eq!(store.stats().evicted, 1);
        assert_eq!(
            store.conversation_items(OWNER, "conv_new").unwrap().len(),
            9
        );
        // Past the whole bound it refuses, and keeps what it had.
        let refused = store.add_items(OWNER, "conv_new", &six);
        assert!(
            matches!(refused, Err(ConversationError::TooLarge { .. })),
            "{refused:?}"
        );
        assert_eq!(
            store.conversation_items(OWNER, "conv_new").unwrap().len(),
            9
        );
        assert!(store.stats().bytes <= 10 * one);
        // Created too large: nothing kept.
        let many: Vec<Value> = (0..11).map(|_| item.clone()).collect();
        assert!(matches!(
            store.create_conversation(None, "conv_big", 0, &Map::new(), &many),
            Err(ConversationError::TooLarge { .. })
        ));
    }
}
