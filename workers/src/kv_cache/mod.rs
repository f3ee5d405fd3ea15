//! The paged KV cache.
//!
//! - [`layout`]: where each layer's K and V of each token live inside a block (the contract
//!   that KV transfer between workers relies on).
//! - [`key_rotation`]: the transform an FP8 cache stores its keys (and attention its queries)
//!   under.
//! - [`block_pool`]: which blocks are free; allocation and release.
//! - [`manager`]: which blocks each sequence holds (the block tables); what the scheduler asks
//!   for room, where blocks are shared, and the cache of computed blocks named by
//!   [`tandem_protocol::block_hash`] that later sequences with the same tokens take instead of computing them.

pub mod block_pool;
pub mod key_rotation;
pub mod layout;
pub mod manager;

pub use layout::{KvDType, KvLayout};
