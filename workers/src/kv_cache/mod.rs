//! The paged KV cache.
//!
//! - [`layout`]: where each layer's K and V of each token live inside a block (the contract
//!   that KV transfer between workers relies on).
//! - [`block_pool`]: which blocks are free; allocation and release.

pub mod block_pool;
pub mod layout;

pub use layout::{KvDType, KvLayout};
