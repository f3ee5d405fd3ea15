//! The Conversations API's request bodies (`/v1/conversations`). Its response objects are
//! built by the store ([`crate::response_store::conversations`]) as JSON, and items are
//! checked by [`crate::validation::responses::check_conversation_item`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// `POST /v1/conversations`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateConversationRequest {
    pub items: Option<Vec<Value>>,
    pub metadata: Option<BTreeMap<String, Value>>,
}

/// `POST /v1/conversations/{id}`: its metadata, replaced whole.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UpdateConversationRequest {
    pub metadata: Option<BTreeMap<String, Value>>,
}

/// `POST /v1/conversations/{id}/items`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AddItemsRequest {
    pub items: Option<Vec<Value>>,
}
