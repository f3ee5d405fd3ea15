//! What the store keeps under one id: a stored response or a conversation, each as JSON
//! text, and the bytes it counts against the store's bound.

use serde_json::Value;

/// One stored response.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// The response this one continued (`previous_response_id`).
    pub(super) previous: Option<String>,
    /// The `response` object as returned (JSON).
    pub(super) response: String,
    /// This request's own input items, each with an `id` (a JSON array).
    pub(super) input_items: String,
    /// The response's output items, as a follow-up's input takes them (a JSON array).
    pub(super) output_items: String,
    /// A background response's stream, each event's SSE text in order, for clients resuming
    /// it; `None` when it was not streamed in the background.
    pub(super) events: Option<String>,
}

impl Entry {
    pub(super) fn bytes(&self) -> usize {
        self.response.len()
            + self.input_items.len()
            + self.output_items.len()
            + self.events.as_ref().map_or(0, String::len)
    }
}

/// What one id holds: a response, or a conversation ([`super::conversations`]).
#[derive(Debug, Clone)]
pub(super) enum Kept {
    Response(Entry),
    Conversation(Conversation),
}

impl Kept {
    pub(super) fn bytes(&self) -> usize {
        match self {
            Kept::Response(entry) => entry.bytes(),
            Kept::Conversation(conversation) => conversation.bytes(),
        }
    }
}

/// One conversation.
#[derive(Debug, Clone)]
pub(super) struct Conversation {
    pub(super) created_at: u64,
    /// `metadata`: a JSON object of strings, as text.
    pub(super) metadata: String,
    /// Its items, oldest first: each one's id and JSON text.
    pub(super) items: Vec<(String, String)>,
}

/// What the store counts for a conversation beside its text.
const CONVERSATION_OVERHEAD: usize = 16;

impl Conversation {
    pub(super) fn bytes(&self) -> usize {
        CONVERSATION_OVERHEAD
            + self.metadata.len()
            + self
                .items
                .iter()
                .map(|(id, item)| id.len() + item.len())
                .sum::<usize>()
    }

    /// The `conversation` object (JSON text).
    pub(super) fn object(&self, id: &str) -> String {
        let metadata: Value =
            serde_json::from_str(&self.metadata).expect("the store holds the JSON it wrote");
        serde_json::json!({
            "id": id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": metadata,
        })
        .to_string()
    }
}
