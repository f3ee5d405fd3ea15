//! The Responses API's stored responses: what `store: true` (OpenAI's default) keeps, so that
//! `previous_response_id` can continue a conversation and `GET`/`DELETE /v1/responses/{id}`
//! and its `input_items` can find it.
//!
//! Each api-server keeps the responses it made in its own memory ([`local`]), and answers
//! the other api-servers of its model about them over NATS ([`shared`]): a response's id names
//! the api-server that made it, so a follow-up, a retrieval or a deletion can reach any
//! api-server of the deployment, and a conversation's turns may have been served by several.
//! A response goes with the api-server that made it (a restart forgets it).
//!
//! Conversations (OpenAI's Conversations API, [`conversations`]) are kept the same way, in
//! the same bound, and reached through any api-server alike.

pub mod conversations;
pub mod ids;
mod kept;
pub mod local;
pub mod resume;
pub mod shared;
pub mod shared_conversations;

pub use conversations::ConversationError;
pub use local::{ChainError, ResponseStore, Segment, StoreStats};
pub use resume::EventsAfter;
pub use shared::{Cancelled, ContextError, PeerError, StoredResponses};
pub use shared_conversations::ConversationOpError;
