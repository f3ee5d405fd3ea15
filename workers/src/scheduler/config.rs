//! The scheduler's limits and its errors.

use thiserror::Error;

use super::SeqId;
use crate::kv_cache::block_pool::BlockPoolError;

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens (decode tokens plus prefill chunk tokens) in one forward pass.
    pub max_num_batched_tokens: usize,
    /// Sequences admitted (holding blocks and scheduled) at once.
    pub max_num_seqs: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// The model's context length; the effective limit is also capped by the cache size.
    pub max_model_len: usize,
    /// Tokens of growth kept free for every admitted sequence at admission (module doc,
    /// "Room to grow"); `None` admits on the first chunk alone.
    pub growth_reserve_tokens: Option<usize>,
    /// Keep computed blocks for later sequences with the same prefix (module doc, "Cached
    /// prefixes").
    pub prefix_caching: bool,
}

/// Growth kept free per admitted sequence by default: the 128 output tokens of the
/// published throughput tables twice over, 4 blocks of 64 tokens per sequence.
pub const DEFAULT_GROWTH_RESERVE_TOKENS: usize = 256;

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let invalid = |msg: String| Err(SchedulerError::InvalidConfig(msg));
        if self.block_size == 0 {
            return invalid("block_size must be at least 1".into());
        }
        if self.num_blocks == 0 {
            return invalid("num_blocks must be at least 1".into());
        }
        if self.max_num_seqs == 0 {
            return invalid("max_num_seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return invalid(format!(
                "max_num_batched_tokens ({}) must be at least max_num_seqs ({}) so that every \
                 running sequence can decode in every step",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        if self.max_model_len < 2 {
            return invalid("max_model_len must be at least 2".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchedulerError {
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    #[error("sequence {0} is already scheduled")]
    DuplicateSequence(SeqId),
    #[error("sequence {0} is not known to the scheduler")]
    UnknownSequence(SeqId),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens but the context limit is {max_context_len} \
         (the prompt must leave room for at least one generated token)"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        max_context_len: usize,
    },
    #[error("sequence {id} reached the context limit of {max_context_len} tokens")]
    ContextFull { id: SeqId, max_context_len: usize },
    #[error(
        "sequence {0} still has tokens to compute; only a fully computed sequence can take a new token"
    )]
    NotComputed(SeqId),
    #[error("no room to admit sequence {0}: every sequence slot is taken")]
    NoRoom(SeqId),
    #[error("sequence {0} holds no reservation")]
    NotReserved(SeqId),
    #[error(transparent)]
    Pool(#[from] BlockPoolError),
}
