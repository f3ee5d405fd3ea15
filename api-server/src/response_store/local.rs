//! This api-server's stored responses, in its memory.
//!
//! Each response keeps its own input items and output items and the id of the response it
//! continued; a follow-up's context is its chain's items, oldest first, rebuilt by walking the
//! chain. Everything is held as JSON text, so the bound is close to the memory used (a parsed
//! `serde_json::Value` takes several times its text), parsed again only to be used. The
//! store is bounded in bytes (the JSON it holds): past the bound the least
//! recently used responses go first, and following a chain uses every response on it, so a
//! conversation in progress keeps its earlier turns. A response is found only with the API
//! key it was made with (its owner, the key's digest; `None` when the server takes no keys).
//! A chain may pass through other api-servers' responses: the walk here stops at the first
//! link another store holds ([`Segment::continues`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::Value;

use super::kept::{Entry, Kept};

/// One stored object, with who may see it and when it was last used.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) owner: Option<String>,
    pub(super) kept: Kept,
    /// When it was last used (a tick of the store's clock), its key in `by_use`.
    last_use: u64,
}

/// The items of a JSON array the store wrote.
fn items(array: &str) -> Vec<Value> {
    serde_json::from_str(array).expect("the store holds the JSON arrays it wrote")
}

/// Why a chain could not be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("no stored response has the id {id}")]
    NotFound { id: String },
    /// An earlier response of the chain was deleted or evicted.
    #[error(
        "response {id} continues {missing}, which is no longer stored (deleted, or evicted \
         from the api-server's response store): send the conversation in input instead"
    )]
    Broken { id: String, missing: String },
    /// A background response still running: nothing can continue it yet.
    #[error(
        "response {id} is a background response still in progress: continue it once it has \
         finished (poll GET /v1/responses/{id})"
    )]
    InProgress { id: String },
}

/// The part of a chain one store holds ([`ResponseStore::segment`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The input and output items of its responses, oldest first.
    pub items: Vec<Value>,
    /// The response before the segment's oldest, held by another store.
    pub continues: Option<String>,
}

/// What the store holds, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub responses: usize,
    /// Conversations ([`super::conversations`]), in the same bound as the responses.
    pub conversations: usize,
    pub bytes: usize,
    /// Responses dropped to stay under the bound, since the start.
    pub evicted: u64,
    /// Background responses running ([`super::StoredResponses`] counts them; not in
    /// `responses` until they finish).
    pub background: usize,
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    entries: HashMap<String, Stored>,
    /// Ids by their last use, oldest first.
    by_use: BTreeMap<u64, String>,
    clock: u64,
    bytes: usize,
    evicted: u64,
}

impl Inner {
    pub(super) fn touch(&mut self, id: &str) {
        self.clock += 1;
        let now = self.clock;
        if let Some(entry) = self.entries.get_mut(id) {
            self.by_use.remove(&entry.last_use);
            entry.last_use = now;
            self.by_use.insert(now, id.to_string());
        }
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Stored> {
        let stored = self.entries.remove(id)?;
        self.by_use.remove(&stored.last_use);
        self.bytes -= stored.kept.bytes();
        Some(stored)
    }

    /// What `id` holds when `owner` may see it.
    pub(super) fn owned(&self, owner: Option<&str>, id: &str) -> Option<&Stored> {
        self.entries
            .get(id)
            .filter(|stored| stored.owner.as_deref() == owner)
    }

    /// The response `id` when `owner` may see it.
    fn owned_response(&self, owner: Option<&str>, id: &str) -> Option<&Entry> {
        match &self.owned(owner, id)?.kept {
            Kept::Response(entry) => Some(entry),
            Kept::Conversation(_) => None,
        }
    }

    /// Drops the least recently used objects other than `keeping` until `bytes` more fit
    /// under `limit`.
    fn make_room(&mut self, bytes: usize, limit: usize, keeping: Option<&str>) {
        let mut kept_aside = None;
        while self.bytes + bytes > limit {
            let Some((last_use, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if Some(oldest.as_str()) == keeping {
                kept_aside = Some((last_use, oldest));
                continue;
            }
            if let Some(evicted) = self.entries.remove(&oldest) {
                self.bytes -= evicted.kept.bytes();
                self.evicted += 1;
            }
        }
        if let Some((last_use, id)) = kept_aside {
            self.by_use.insert(last_use, id);
        }
    }

    /// Keeps `kept` as `id` for `owner` (replacing what `id` held), dropping the least
    /// recently used others past `limit`; false when it alone is over `limit`.
    pub(super) fn insert(
        &mut self,
        limit: usize,
        owner: Option<String>,
        id: &str,
        kept: Kept,
    ) -> bool {
        let bytes = kept.bytes();
        if bytes > limit {
            return false;
        }
        self.remove(id);
        self.make_room(bytes, limit, None);
        self.clock += 1;
        let last_use = self.clock;
        self.by_use.insert(last_use, id.to_string());
        self.bytes += bytes;
        self.entries.insert(
            id.to_string(),
            Stored {
                owner,
                kept,
                last_use,
            },
        );
        true
    }

    /// Changes what `id` holds in place (it counts as used), dropping the least recently
    /// used others when it grows: `change`'s result, or `None` when `owner` holds no `id`.
    /// `change` is given the bound, and must not take `id` alone over it.
    pub(super) fn change<T>(
        &mut self,
        limit: usize,
        owner: Option<&str>,
        id: &str,
        change: impl FnOnce(&mut Kept, usize) -> T,
    ) -> Option<T> {
        self.owned(owner, id)?;
        let stored = self.entries.get_mut(id).expect("found above");
        let before = stored.kept.bytes();
        let result = change(&mut stored.kept, limit);
        let after = stored.kept.bytes();
        self.bytes -= before;
        self.touch(id);
        self.make_room(after, limit, Some(id));
        self.bytes += after;
        Some(result)
    }
}

/// The stored responses of this api-server, at most `limit_bytes` of JSON.
#[derive(Debug)]
pub struct ResponseStore {
    limit_bytes: usize,
    inner: Mutex<Inner>,
}

impl ResponseStore {
    /// A store of at most `limit_bytes`; 0 keeps nothing (`store: true` is then answered
    /// `store: false`, and `previous_response_id` refused).
    pub fn new(limit_bytes: usize) -> Self {
        ResponseStore {
            limit_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit_bytes > 0
    }

    pub(super) fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves whole entries (every change is one insert
        // or removal): the data is still consistent enough to serve.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps response `id` (its object as JSON text, its request's input items and its
    /// output items), evicting the least recently used others past the bound; false when it
    /// alone is larger than the bound (then nothing is kept).
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        &self,
        owner: Option<String>,
        id: &str,
        previous: Option<String>,
        response: String,
        input_items: &[Value],
        output_items: &[Value],
        events: Option<String>,
    ) -> bool {
        // Serializing grows a buffer by doubling: without its slack a text takes its length,
        // so the bound counts about what the store takes.
        let array = |items: &[Value]| {
            let mut text =
                serde_json::to_string(items).expect("JSON values serialize to JSON text");
            text.shrink_to_fit();
            text
        };
        let mut response = response;
        response.shrink_to_fit();
        let entry = Entry {
            previous,
            response,
            input_items: array(input_items),
            output_items: array(output_items),
            events: events.map(|mut events| {
                events.shrink_to_fit();
                events
            }),
        };
        self.lock()
            .insert(self.limit_bytes, owner, id, Kept::Response(entry))
    }

    /// The `response` object of `id` (JSON text), if `owner` stored it.
    pub fn response(&self, owner: Option<&str>, id: &str) -> Option<String> {
        let mut inner = self.lock();
        let response = inner.owned_response(owner, id)?.response.clone();
        inner.touch(id);
        Some(response)
    }

    /// The events of `id`'s stream (SSE text), if `owner` stored it: `Some(None)` when it
    /// was not streamed in the background.
    pub fn events(&self, owner: Option<&str>, id: &str) -> Option<Option<String>> {
        let mut inner = self.lock();
        let events = inner.owned_response(owner, id)?.events.clone();
        inner.touch(id);
        Some(events)
    }

    /// The input items of `id`'s own request, if `owner` stored it.
    pub fn input_items(&self, owner: Option<&str>, id: &str) -> Option<Vec<Value>> {
        let mut inner = self.lock();
        let listed = items(&inner.owned_response(owner, id)?.input_items);
        inner.touch(id);
        Some(listed)
    }

    /// Forgets `id`; whether `owner` had stored it.
    pub fn delete(&self, owner: Option<&str>, id: &str) -> bool {
        let mut inner = self.lock();
        if inner.owned_response(owner, id).is_none() {
            return false;
        }
        inner.remove(id);
        true
    }

    /// The items of `id`'s chain that this store holds, oldest first: from `id` back to the
    /// start of the chain, or to the first link whose previous response `is_here` says is
    /// another store's ([`Segment::continues`]). Each response walked counts as used.
    pub fn segment(
        &self,
        owner: Option<&str>,
        id: &str,
        is_here: impl Fn(&str) -> bool,
    ) -> Result<Segment, ChainError> {
        let mut inner = self.lock();
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        let mut continues = None;
        while let Some(current) = next.take() {
            let Some(entry) = inner.owned_response(owner, &current) else {
                return Err(match chain.is_empty() {
                    true => ChainError::NotFound { id: current },
                    false => ChainError::Broken {
                        id: id.to_string(),
                        missing: current,
                    },
                });
            };
            match entry.previous.clone() {
                Some(previous) if !is_here(&previous) => continues = Some(previous),
                previous => next = previous,
            }
            chain.push(current);
            // A chain cannot loop (each response names one made before it), but a bound
            // keeps a bug from hanging the server.
            if chain.len() > inner.entries.len() {
                break;
            }
        }
        let mut items_oldest_first = Vec::new();
        for link in chain.iter().rev() {
            let entry = inner.owned_response(owner, link).expect("walked above");
            items_oldest_first.extend(items(&entry.input_items));
            items_oldest_first.extend(items(&entry.output_items));
        }
        for link in &chain {
            inner.touch(link);
        }
        Ok(Segment {
            items: items_oldest_first,
            continues,
        })
    }

    pub fn stats(&self) -> StoreStats {
        let inner = self.lock();
        let conversations = inner
            .entries
            .values()
            .filter(|stored| matches!(stored.kept, Kept::Conversation(_)))
            .count();
        StoreStats {
            responses: inner.entries.len() - conversations,
            conversations,
            bytes: inner.bytes,
            evicted: inner.evicted,
            background: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The whole chain of `id`, every link held here.
    fn context(store: &ResponseStore, owner: &str, id: &str) -> Result<Vec<Value>, ChainError> {
        store.segment(Some(owner), id, |_| true).map(|segment| {
            assert_eq!(segment.continues, None);
            segment.items
        })
    }

    fn message(text: &str) -> Value {
        json!({"type": "message", "role": "user", "content": text})
    }

    fn put(store: &ResponseStore, id: &str, previous: Option<&str>, said: &str) -> bool {
        store.put(
            Some("key:a".into()),
            id,
            previous.map(str::to_string),
            json!({"id": id}).to_string(),
            &[message(said)],
            &[json!({"type": "message", "role": "assistant", "content": format!("re {said}")})],
            None,
        )
    }

    #[test]
    fn a_chain_gives_its_items_oldest_first_to_its_owner_only() {
        let store = ResponseStore::new(1 << 20);
        assert!(put(&store, "r1", None, "one"));
        assert!(put(&store, "r2", Some("r1"), "two"));
        let items = context(&store, "key:a", "r2").unwrap();
        let texts: Vec<&str> = items
            .iter()
            .map(|i| i["content"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["one", "re one", "two", "re two"]);
        assert_eq!(
            store.response(Some("key:a"), "r1").unwrap(),
            r#"{"id":"r1"}"#
        );
        assert_eq!(store.input_items(Some("key:a"), "r2").unwrap().len(), 1);
        // Another key, or none, finds nothing.
        assert_eq!(store.response(Some("key:b"), "r1"), None);
        assert_eq!(store.response(None, "r1"), None);
        assert_eq!(
            context(&store, "key:b", "r2"),
            Err(ChainError::NotFound { id: "r2".into() })
        );
        assert!(!store.delete(Some("key:b"), "r1"));
        // Deleting a link breaks the chain after it, naming the missing response.
        assert!(store.delete(Some("key:a"), "r1"));
        assert_eq!(
            context(&store, "key:a", "r2"),
            Err(ChainError::Broken {
                id: "r2".into(),
                missing: "r1".into()
            })
        );
        assert_eq!(store.stats().responses, 1);
    }

    #[test]
    fn the_least_recently_used_go_first_and_a_followed_chain_stays() {
        let one = {
            let store = ResponseStore::new(1 << 20);
            put(&store, "r1", None, "x");
            store.stats().bytes
        };
        // Room for three responses of this size.
        let store = ResponseStore::new(3 * one + one / 2);
        put(&store, "a1", None, "x");
        put(&store, "b1", None, "x");
        put(&store, "a2", Some("a1"), "x");
        // Following a2's chain uses a1: b1 is now the least recently used.
        context(&store, "key:a", "a2").unwrap();
        put(&store, "c1", None, "x");
        assert!(store.response(Some("key:a"), "b1").is_none(), "evicted");
        assert!(context(&store, "key:a", "a2").is_ok());
        let stats = store.stats();
        assert_eq!((stats.responses, stats.evicted), (3, 1));
        assert!(stats.bytes <= 3 * one + one / 2);
        // A response larger than the whole store is not kept; an empty store keeps nothing.
        let tiny = ResponseStore::new(8);
        assert!(!put(&tiny, "r", None, "x"));
        assert!(!ResponseStore::new(0).enabled());
    }

    #[test]
    fn a_walk_stops_at_the_first_link_another_store_holds() {
        let store = ResponseStore::new(1 << 20);
        // r1 is elsewhere; r2 continues it, r3 continues r2.
        assert!(put(&store, "r2", Some("r1"), "two"));
        assert!(put(&store, "r3", Some("r2"), "three"));
        let segment = store.segment(Some("key:a"), "r3", |id| id != "r1").unwrap();
        assert_eq!(segment.continues.as_deref(), Some("r1"));
        let texts: Vec<&str> = segment
            .items
            .iter()
            .map(|i| i["content"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["two", "re two", "three", "re three"]);
        // Taken as held here, r1 is missing: the chain is broken there.
        assert_eq!(
            store.segment(Some("key:a"), "r3", |_| true),
            Err(ChainError::Broken {
                id: "r3".into(),
                missing: "r1".into()
            })
        );
    }
}
