//! Continuous batching: which tokens of which sequences go into the next forward pass, and
//! which KV blocks they write to.
//!
//! The scheduler asks the [`KvCacheManager`] for every block a sequence takes or gives back
//! (the manager holds the block pool and the block tables), and knows each sequence only by
//! two counts: `num_tokens` (prompt plus generated tokens) and
//! `num_computed` (tokens whose K/V are in the cache). Whatever is between them is computed
//! next — a prompt chunk, a single decode token, or, after a preemption, the whole prompt and
//! the generated tokens again. It knows nothing about the model, sampling or stop conditions;
//! the engine tells it when a token was appended and when a sequence is done.
//!
//! # Policy of one step ([`Scheduler::schedule`])
//! Under a token budget (`max_num_batched_tokens`) and a cap on admitted sequences
//! (`max_num_seqs`):
//! 1. **Decode first.** Every running sequence with exactly one token to compute gets it,
//!    oldest admission first, so generation latency does not depend on prefill traffic.
//!    ([`SchedulerConfig::validate`] requires `max_num_batched_tokens >= max_num_seqs`, so
//!    all decodes always fit.)
//! 2. **Then running prefills** (admitted, prompt not fully computed), oldest first, each a
//!    chunk of `min(remaining, budget left)` tokens, shrunk to the blocks that are free.
//! 3. **Then admission** of waiting sequences in strict FIFO order: the head of the queue is
//!    admitted only when the pool has the blocks for its first chunk; if it cannot be, nothing
//!    behind it is either (no overtaking, so a long prompt is never starved by short ones).
//!    Nothing is admitted in a step that had to preempt, so memory pressure is not made worse.
//!
//! Blocks are reserved step by step: a sequence holds blocks for its computed tokens plus the
//! chunk scheduled now, and its block table grows as it does.
//!
//! # Room to grow
//! Admitting a sequence the cache cannot carry to its end only defers the cost: when the
//! pool runs dry, a decode preempts the newest sequence and all the prefill it had done is
//! thrown away (under load: a few percent of all prefill work, measured on the H100 at
//! 2048/128 tokens). So with [`SchedulerConfig::growth_reserve_tokens`] = `Some(h)`, the head
//! of the queue is admitted only while the free blocks cover, besides its own whole prompt
//! and its next `h` tokens, every admitted sequence's rest of prompt and next `h` tokens,
//! each capped at the sequence's own end ([`Scheduler::set_max_len`]: prompt plus
//! `max_tokens`). A request for 128 tokens thus never preempts anyone once admitted with
//! `h` >= 128; longer ones still may, past their first `h` tokens. With nothing admitted the
//! head needs only its first chunk, so a lone sequence always starts. `None` admits on the
//! first chunk alone. Imported sequences ([`Scheduler::can_add_computed`]) follow the same
//! rule.
//!
//! # Preemption
//! When a decode needs a new block and none is free, the **most recently admitted** running
//! sequence not yet scheduled in this step is preempted — possibly the one asking. When a
//! running prefill cannot get even one token's block, it preempts the most recently admitted
//! unscheduled sequence newer than itself, or else waits for blocks (the sequences that were
//! scheduled make progress and eventually free or preempt). A preempted sequence loses its
//! blocks and goes back to the waiting queue in arrival order (ahead of everything that
//! arrived after it), keeping `num_tokens`: on re-admission its prompt *and* its generated
//! tokens are recomputed, and the last chunk yields the logits for the next token, so the
//! output is the same as without preemption (recompute, not swap).
//!
//! Preempting the newest first means the oldest sequence always makes progress, and since a
//! sequence may never exceed [`Scheduler::max_context_len`] tokens (capped by the pool's
//! capacity), the oldest one always fits once everything newer is preempted.
//!
//! # Imports and reservations
//! A prompt prefilled elsewhere arrives computed ([`Scheduler::add_computed`]). A decode
//! worker reserves room for it *before* pulling its K/V ([`Scheduler::reserve`]): the prompt's
//! blocks are allocated and a sequence slot is held, but the sequence is not scheduled until
//! [`Scheduler::start_reserved`] (its K/V written, or to be prefilled here after a failed
//! pull). Reserved blocks are never preempted (they hold nothing to recompute yet); the
//! reservation is short-lived, bounded by the pull.
//!
//! # Samples of one request share their prompt's blocks
//! The `n` samples of one request (`n` > 1) are sequences of one *group* with the same prompt
//! ([`Scheduler::add_to_group`]). A member admitted while another member is running with the
//! prompt computed (in an earlier step: the K/V must be in the cache before anyone reads it)
//! takes that member's *full* prompt blocks as its own, one more holder each
//! ([`KvCacheManager::share_prefix`]), and computes only the rest of the prompt: the tokens of
//! the last, partial block (or of the last full block, so that it computes at least one token
//! and gets its own logits). A member at the head of the queue whose siblings are still
//! prefilling the prompt waits for them (FIFO: nothing overtakes it); one with no sibling
//! running computes the prompt itself. Nobody writes a shared block: they hold positions
//! before every holder's `num_computed`, and each holder writes only after it. Preemption and
//! [`Scheduler::finish`] drop the sequence's holds; a block returns to the free list with its
//! last holder. A preempted member re-admitted later shares again from a sibling that is
//! running then.
//!
//! # Leaving
//! [`Scheduler::finish`] (finished or cancelled, from any state) frees the sequence's blocks at
//! once. [`Scheduler::pin`] takes a sequence out of scheduling but keeps its blocks allocated:
//! the context worker of a disaggregated deployment keeps a prefilled sequence's KV until the
//! decode worker has pulled it, then calls [`Scheduler::release_pinned`].

use std::collections::{HashMap, HashSet, VecDeque};

use thiserror::Error;

use crate::kv_cache::block_pool::{BlockId, BlockPoolError};
use crate::kv_cache::manager::KvCacheManager;

/// The scheduler's name for a sequence; the engine uses its request id.
pub use crate::kv_cache::manager::SeqId;

/// A group of sequences with one prompt whose full blocks they share (the `n` samples of one
/// request); the engine names it.
pub type GroupId = u64;

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

/// Where a sequence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// In the queue, holding no blocks (never admitted, or preempted).
    Waiting,
    /// Admitted: holds blocks, scheduled every step until done.
    Running,
    /// Out of scheduling, blocks kept until [`Scheduler::release_pinned`].
    Pinned,
    /// Holds its prompt's blocks and a sequence slot for K/V on its way, not scheduled until
    /// [`Scheduler::start_reserved`].
    Reserved,
}

#[derive(Debug)]
struct Sequence {
    num_tokens: usize,
    num_computed: usize,
    /// Arrival order; the waiting queue is kept sorted by it.
    arrival: u64,
    status: SeqStatus,
    num_preemptions: u32,
    /// The most tokens it can reach (prompt plus `max_tokens`; `usize::MAX` until the engine
    /// says, the context still capping it): growth is reserved up to here and no further.
    max_len: usize,
    /// The samples group this sequence belongs to ([`Scheduler::add_to_group`]), and the
    /// prompt tokens its members may share (whole blocks, at least one token short of the
    /// prompt). `None` for a sequence on its own.
    group: Option<(GroupId, usize)>,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens already in the cache; this step computes positions
    /// `cached_len .. cached_len + token_count`.
    pub cached_len: usize,
    pub token_count: usize,
    /// The sequence's blocks, covering at least `cached_len + token_count` tokens.
    pub block_table: Vec<BlockId>,
    /// The chunk ends at the sequence's last known token, so its logits give the next token.
    pub wants_logits: bool,
}

/// The decision of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStep {
    /// Decodes first, then prefill chunks; the forward batch follows this order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences that lost their blocks in this step and went back to the queue.
    pub preempted: Vec<SeqId>,
}

impl SchedulerStep {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.token_count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Continuous-batching scheduler; see the module doc for the policy.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    /// The blocks each sequence holds.
    kv: KvCacheManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Sorted by arrival.
    waiting: VecDeque<SeqId>,
    /// In admission order, oldest first: preemption takes from the back.
    running: Vec<SeqId>,
    /// Sequences in [`SeqStatus::Reserved`]: each holds a slot of `max_num_seqs`.
    num_reserved: usize,
    next_arrival: u64,
    /// The members of each samples group.
    groups: HashMap<GroupId, Vec<SeqId>>,
}

/// What a waiting group member does at admission.
enum GroupAdmission {
    /// Take the first `blocks` blocks of running sibling `from` (`tokens` tokens of K/V).
    Share {
        from: SeqId,
        blocks: usize,
        tokens: usize,
    },
    /// A sibling is prefilling the prompt now: wait for it.
    Wait,
    /// No sibling holds the prompt: compute it.
    Alone,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Self {
            kv: KvCacheManager::new(config.num_blocks, config.block_size),
            config,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_reserved: 0,
            next_arrival: 0,
            groups: HashMap::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Most tokens (prompt plus generated) a sequence may hold: the model's context length,
    /// capped by what the whole cache can hold so that a lone sequence always fits.
    pub fn max_context_len(&self) -> usize {
        self.config
            .max_model_len
            .min(self.config.num_blocks * self.config.block_size)
    }

    /// Free blocks in the pool (pinned blocks are not free).
    pub fn free_blocks(&self) -> usize {
        self.kv.num_free()
    }

    pub fn total_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    /// Checks a prompt length against the limits (empty, too long for the context).
    pub fn check_prompt(&self, prompt_tokens: usize) -> Result<(), SchedulerError> {
        if prompt_tokens == 0 {
            return Err(SchedulerError::EmptyPrompt);
        }
        let max_context_len = self.max_context_len();
        if prompt_tokens >= max_context_len {
            return Err(SchedulerError::PromptTooLong {
                prompt_tokens,
                max_context_len,
            });
        }
        Ok(())
    }

    /// Sequence slots taken: running sequences and reservations.
    fn slots_taken(&self) -> usize {
        self.running.len() + self.num_reserved
    }

    /// Whether a sequence whose `prompt_tokens` K/V arrive computed (an imported prefill),
    /// and which may grow to `max_len` tokens, can be admitted now, or room reserved for it
    /// ([`Self::reserve`]): a free sequence slot, and the prompt's blocks free together with
    /// the room to grow of it and of every admitted sequence (module doc).
    pub fn can_add_computed(&self, prompt_tokens: usize, max_len: usize) -> bool {
        let needed = match self.growth_blocks_of_admitted() {
            // The end of its room to grow is never short of its prompt.
            Some(admitted) => {
                admitted + self.kv.blocks_for(self.growth_end(prompt_tokens, max_len))
            }
            None => self.kv.blocks_for(prompt_tokens),
        };
        self.slots_taken() < self.config.max_num_seqs && self.kv.num_free() >= needed
    }

    /// Sets how many tokens (prompt plus generated) `id` can reach at most: the end of its
    /// room to grow. Sequences start with no limit but the context's.
    pub fn set_max_len(&mut self, id: SeqId, max_len: usize) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        seq.max_len = max_len;
        Ok(())
    }

    /// Where the room to grow of a sequence of `num_tokens` that can reach `max_len` ends:
    /// `growth_reserve_tokens` further, capped by `max_len` and the context.
    fn growth_end(&self, num_tokens: usize, max_len: usize) -> usize {
        let reach = num_tokens.saturating_add(self.config.growth_reserve_tokens.unwrap_or(0));
        reach
            .min(max_len)
            .min(self.max_context_len())
            .max(num_tokens)
    }

    /// Blocks `id` still needs to reach the end of its room to grow.
    fn growth_blocks(&self, id: SeqId) -> usize {
        let seq = &self.seqs[&id];
        self.kv
            .missing_blocks(id, self.growth_end(seq.num_tokens, seq.max_len))
    }

    /// The blocks the admitted sequences (running or reserved) still need to reach the ends
    /// of their room to grow; `None` when no room is kept (no `growth_reserve_tokens`, or
    /// nothing admitted: a lone sequence always starts).
    fn growth_blocks_of_admitted(&self) -> Option<usize> {
        self.config.growth_reserve_tokens?;
        if self.slots_taken() == 0 {
            return None;
        }
        Some(
            self.seqs
                .iter()
                .filter(|(_, s)| matches!(s.status, SeqStatus::Running | SeqStatus::Reserved))
                .map(|(&id, _)| self.growth_blocks(id))
                .sum(),
        )
    }

    /// Admits a sequence whose prompt K/V are already computed elsewhere, straight into the
    /// running set with the prompt's blocks allocated (the caller writes them). Its first
    /// generated token is appended next ([`Self::append_token`]) and decoded in the next step.
    /// Fails when [`Self::can_add_computed`] is false.
    pub fn add_computed(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        max_len: usize,
    ) -> Result<Vec<BlockId>, SchedulerError> {
        let blocks = self.allocate_slot(id, prompt_tokens)?;
        self.seqs.insert(
            id,
            Sequence {
                num_tokens: prompt_tokens,
                num_computed: prompt_tokens,
                arrival: self.next_arrival,
                status: SeqStatus::Running,
                num_preemptions: 0,
                max_len,
                group: None,
            },
        );
        self.next_arrival += 1;
        self.running.push(id);
        Ok(blocks)
    }

    /// Reserves room for a sequence whose prompt's K/V is on its way (a decode worker's pull):
    /// the prompt's blocks are allocated and a sequence slot held, and the sequence is not
    /// scheduled until [`Self::start_reserved`]. Fails when [`Self::can_add_computed`] is false.
    pub fn reserve(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        max_len: usize,
    ) -> Result<(), SchedulerError> {
        self.allocate_slot(id, prompt_tokens)?;
        self.seqs.insert(
            id,
            Sequence {
                num_tokens: prompt_tokens,
                num_computed: 0,
                arrival: self.next_arrival,
                status: SeqStatus::Reserved,
                num_preemptions: 0,
                max_len,
                group: None,
            },
        );
        self.next_arrival += 1;
        self.num_reserved += 1;
        Ok(())
    }

    /// Starts a reserved sequence in its reserved blocks, as the newest running sequence: with
    /// its prompt's K/V written there (`computed`, an import: its first generated token is
    /// appended next), or to prefill the prompt here (a pull that failed). Returns its block
    /// table.
    pub fn start_reserved(
        &mut self,
        id: SeqId,
        computed: bool,
    ) -> Result<Vec<BlockId>, SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .filter(|s| s.status == SeqStatus::Reserved)
            .ok_or(SchedulerError::NotReserved(id))?;
        seq.status = SeqStatus::Running;
        seq.num_computed = if computed { seq.num_tokens } else { 0 };
        seq.arrival = self.next_arrival;
        self.next_arrival += 1;
        self.num_reserved -= 1;
        self.running.push(id);
        Ok(self.kv.blocks(id).to_vec())
    }

    /// A new sequence's slot and the blocks of its `prompt_tokens`, for a prompt computed
    /// elsewhere.
    fn allocate_slot(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
    ) -> Result<Vec<BlockId>, SchedulerError> {
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::DuplicateSequence(id));
        }
        self.check_prompt(prompt_tokens)?;
        if self.slots_taken() >= self.config.max_num_seqs {
            return Err(SchedulerError::NoRoom(id));
        }
        Ok(self.kv.allocate_new(id, prompt_tokens)?.to_vec())
    }

    /// The block table of `id`.
    pub fn blocks(&self, id: SeqId) -> Option<Vec<BlockId>> {
        self.seqs
            .contains_key(&id)
            .then(|| self.kv.blocks(id).to_vec())
    }

    /// Queues a sequence whose prompt has `prompt_tokens` tokens.
    pub fn add(&mut self, id: SeqId, prompt_tokens: usize) -> Result<(), SchedulerError> {
        self.add_inner(id, prompt_tokens, None)
    }

    /// Queues a sequence of samples group `group`: every member must have the same prompt
    /// (the caller's promise; the scheduler sees only lengths). Members share the prompt's
    /// full blocks (module doc).
    pub fn add_to_group(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        group: GroupId,
    ) -> Result<(), SchedulerError> {
        self.add_inner(id, prompt_tokens, Some(group))
    }

    fn add_inner(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        group: Option<GroupId>,
    ) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::DuplicateSequence(id));
        }
        self.check_prompt(prompt_tokens)?;
        // Whole blocks, leaving at least the prompt's last token to compute (its logits).
        let block_size = self.config.block_size;
        let shareable = (prompt_tokens - 1) / block_size * block_size;
        let group = group.filter(|_| shareable > 0).map(|g| (g, shareable));
        if let Some((g, _)) = group {
            self.groups.entry(g).or_default().push(id);
        }
        self.seqs.insert(
            id,
            Sequence {
                num_tokens: prompt_tokens,
                num_computed: 0,
                arrival: self.next_arrival,
                status: SeqStatus::Waiting,
                num_preemptions: 0,
                max_len: usize::MAX,
                group,
            },
        );
        self.next_arrival += 1;
        self.waiting.push_back(id);
        Ok(())
    }

    /// Whether samples group `group` has members (only prompts longer than a block make
    /// one: shorter ones have nothing to share).
    pub fn has_group(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    /// How waiting `id` is admitted with respect to its group, given the step so far (a
    /// sibling scheduled in it counts with what it had computed before it).
    fn group_admission(&self, id: SeqId, step: &SchedulerStep) -> GroupAdmission {
        let Some((group, shareable)) = self.seqs[&id].group else {
            return GroupAdmission::Alone;
        };
        let mut prefilling = false;
        for sibling in self.groups.get(&group).into_iter().flatten() {
            let seq = &self.seqs[sibling];
            if *sibling == id || seq.status != SeqStatus::Running {
                continue;
            }
            let computed_before = step
                .scheduled
                .iter()
                .find(|s| s.id == *sibling)
                .map_or(seq.num_computed, |s| s.cached_len);
            if computed_before >= shareable {
                return GroupAdmission::Share {
                    from: *sibling,
                    blocks: shareable / self.config.block_size,
                    tokens: shareable,
                };
            }
            prefilling = true;
        }
        if prefilling {
            GroupAdmission::Wait
        } else {
            GroupAdmission::Alone
        }
    }

    /// Records a token sampled for `id` (its K/V are computed in a later step). Fails when the
    /// sequence would exceed [`Self::max_context_len`]; the engine ends it before that.
    pub fn append_token(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        let max_context_len = self.max_context_len();
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        if seq.num_computed != seq.num_tokens {
            return Err(SchedulerError::NotComputed(id));
        }
        if seq.num_tokens >= max_context_len {
            return Err(SchedulerError::ContextFull {
                id,
                max_context_len,
            });
        }
        seq.num_tokens += 1;
        Ok(())
    }

    /// Removes a sequence in any state (finished, cancelled, failed) and frees its blocks.
    pub fn finish(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .remove(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        match seq.status {
            SeqStatus::Waiting => self.waiting.retain(|&w| w != id),
            SeqStatus::Running => self.running.retain(|&r| r != id),
            SeqStatus::Reserved => self.num_reserved -= 1,
            SeqStatus::Pinned => {}
        }
        if let Some((group, _)) = seq.group
            && let Some(members) = self.groups.get_mut(&group)
        {
            members.retain(|&m| m != id);
            if members.is_empty() {
                self.groups.remove(&group);
            }
        }
        self.kv.free(id)?;
        Ok(())
    }

    /// Takes a running sequence out of scheduling but keeps its blocks allocated (a context
    /// worker holding a prefilled sequence's KV for transfer). Returns its block table.
    pub fn pin(&mut self, id: SeqId) -> Result<Vec<BlockId>, SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        if seq.status == SeqStatus::Running {
            self.running.retain(|&r| r != id);
        } else if seq.status == SeqStatus::Waiting {
            self.waiting.retain(|&w| w != id);
        } else if seq.status == SeqStatus::Reserved {
            self.num_reserved -= 1;
        }
        seq.status = SeqStatus::Pinned;
        Ok(self.kv.blocks(id).to_vec())
    }

    /// Frees the blocks of a pinned sequence and forgets it. Same as [`Self::finish`]; named
    /// for the release message of a KV transfer.
    pub fn release_pinned(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        self.finish(id)
    }

    pub fn status(&self, id: SeqId) -> Option<SeqStatus> {
        self.seqs.get(&id).map(|s| s.status)
    }

    /// How often `id` has been preempted.
    pub fn num_preemptions(&self, id: SeqId) -> Option<u32> {
        self.seqs.get(&id).map(|s| s.num_preemptions)
    }

    /// Tokens whose K/V are in the cache for `id`.
    pub fn num_computed(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.num_computed)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences holding a reservation ([`Self::reserve`]).
    pub fn num_reserved(&self) -> usize {
        self.num_reserved
    }

    /// Whether any sequence waits or runs (pinned ones need no steps).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Decides the next step and reserves its blocks; `num_computed` of every scheduled
    /// sequence advances by its chunk, on the assumption that the engine runs the forward (if
    /// the forward fails, the engine must [`Self::finish`] the scheduled sequences).
    pub fn schedule(&mut self) -> SchedulerStep {
        let mut step = SchedulerStep::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut scheduled: HashSet<SeqId> = HashSet::new();

        // 1. Decodes, oldest admission first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            if self.remaining(id) != 1 {
                i += 1;
                continue;
            }
            let target = self.seqs[&id].num_computed + 1;
            let mut self_preempted = false;
            while !self.kv.allocate_slots(id, target) {
                // All scheduled sequences sit before `i`, so the newest unscheduled is the last.
                let victim = *self.running.last().expect("the running list holds `id`");
                self.preempt(victim);
                step.preempted.push(victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            step.scheduled.push(self.take_chunk(id, 1));
            scheduled.insert(id);
            budget -= 1;
            i += 1;
        }

        // 2. Running prefills (prompt or recompute not finished), oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            // Nothing to compute: its last token awaits the engine's append_token or finish.
            if scheduled.contains(&id) || self.remaining(id) == 0 {
                i += 1;
                continue;
            }
            let fit = self
                .kv
                .reachable_tokens(id)
                .saturating_sub(self.seqs[&id].num_computed);
            if fit == 0 {
                let victim = self.running[i + 1..]
                    .iter()
                    .rev()
                    .find(|v| !scheduled.contains(v))
                    .copied();
                match victim {
                    Some(victim) => {
                        self.preempt(victim);
                        step.preempted.push(victim);
                    }
                    // Nothing newer to take from: wait for scheduled sequences to free blocks.
                    None => i += 1,
                }
                continue;
            }
            let chunk = self.remaining(id).min(budget).min(fit);
            let target = self.seqs[&id].num_computed + chunk;
            let grown = self.kv.allocate_slots(id, target);
            debug_assert!(grown, "chunk was sized to the free blocks");
            step.scheduled.push(self.take_chunk(id, chunk));
            scheduled.insert(id);
            budget -= chunk;
            i += 1;
        }

        // 3. Admission, strict FIFO, never in a step that had to preempt, and only with room
        // to grow for the admitted and the newcomer (module doc).
        if step.preempted.is_empty() {
            let mut admitted_growth = self.growth_blocks_of_admitted();
            while let Some(&id) = self.waiting.front() {
                if budget == 0 || self.slots_taken() >= self.config.max_num_seqs {
                    break;
                }
                let shared = match self.group_admission(id, &step) {
                    GroupAdmission::Wait => break,
                    GroupAdmission::Alone => None,
                    GroupAdmission::Share {
                        from,
                        blocks,
                        tokens,
                    } => {
                        if self.kv.share_prefix(id, from, blocks).is_err() {
                            debug_assert!(false, "a running sibling's blocks are allocated");
                            break;
                        }
                        let seq = self.seqs.get_mut(&id).expect("waiting ids are known");
                        seq.num_computed = tokens;
                        Some(tokens)
                    }
                };
                let chunk = self.remaining(id).min(budget);
                let target = self.seqs[&id].num_computed + chunk;
                let room = admitted_growth
                    .is_none_or(|admitted| admitted + self.growth_blocks(id) <= self.kv.num_free());
                if !room || !self.kv.allocate_slots(id, target) {
                    if shared.is_some() {
                        // Waiting sequences hold no blocks: give the shares back.
                        let seq = self.seqs.get_mut(&id).expect("waiting ids are known");
                        seq.num_computed = 0;
                        let freed = self.kv.free(id);
                        debug_assert!(freed.is_ok(), "shared blocks are held: {freed:?}");
                    }
                    break;
                }
                self.waiting.pop_front();
                self.running.push(id);
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.status = SeqStatus::Running;
                }
                step.scheduled.push(self.take_chunk(id, chunk));
                budget -= chunk;
                if self.config.growth_reserve_tokens.is_some() {
                    let newcomer = self.growth_blocks(id);
                    admitted_growth = Some(admitted_growth.unwrap_or(0) + newcomer);
                }
            }
        }
        step
    }

    fn remaining(&self, id: SeqId) -> usize {
        let seq = &self.seqs[&id];
        seq.num_tokens - seq.num_computed
    }

    fn take_chunk(&mut self, id: SeqId, token_count: usize) -> ScheduledSeq {
        let seq = self.seqs.get_mut(&id).expect("scheduled ids are known");
        let cached_len = seq.num_computed;
        seq.num_computed += token_count;
        ScheduledSeq {
            id,
            cached_len,
            token_count,
            block_table: self.kv.blocks(id).to_vec(),
            wants_logits: seq.num_computed == seq.num_tokens,
        }
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running ids are known");
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        let arrival = seq.arrival;
        self.running.retain(|&r| r != id);
        let at = self
            .waiting
            .partition_point(|w| self.seqs[w].arrival < arrival);
        self.waiting.insert(at, id);
        // Shared blocks stay with their other holders.
        let freed = self.kv.free(id);
        debug_assert!(
            freed.is_ok(),
            "preempted blocks must be allocated: {freed:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(budget: usize, seqs: usize, block_size: usize, blocks: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: seqs,
            block_size,
            num_blocks: blocks,
            max_model_len: 4096,
            growth_reserve_tokens: None,
        }
    }

    /// Runs a step and plays the engine: every sequence that got logits samples a token.
    fn step_and_append(s: &mut Scheduler) -> SchedulerStep {
        let step = s.schedule();
        for item in &step.scheduled {
            if item.wants_logits {
                s.append_token(item.id).unwrap();
            }
        }
        step
    }

    #[test]
    fn rejects_bad_configs_and_prompts() {
        assert!(
            Scheduler::new(config(2, 4, 16, 8)).is_err(),
            "budget < max_num_seqs"
        );
        assert!(Scheduler::new(config(8, 4, 0, 8)).is_err());
        let mut s = Scheduler::new(config(64, 4, 4, 8)).unwrap();
        assert_eq!(
            s.max_context_len(),
            32,
            "capped by the cache: 8 blocks of 4"
        );
        assert_eq!(s.add(1, 0), Err(SchedulerError::EmptyPrompt));
        assert_eq!(
            s.add(1, 32),
            Err(SchedulerError::PromptTooLong {
                prompt_tokens: 32,
                max_context_len: 32
            })
        );
        s.add(1, 31).unwrap();
        assert_eq!(s.add(1, 3), Err(SchedulerError::DuplicateSequence(1)));
    }

    #[test]
    fn chunks_a_long_prompt_and_asks_logits_only_at_its_end() {
        let mut s = Scheduler::new(config(8, 4, 4, 16)).unwrap();
        s.add(7, 20).unwrap();
        let mut chunks = vec![];
        loop {
            let step = step_and_append(&mut s);
            let item = &step.scheduled[0];
            chunks.push((item.cached_len, item.token_count, item.wants_logits));
            assert!(item.block_table.len() * 4 >= item.cached_len + item.token_count);
            if item.wants_logits {
                break;
            }
        }
        assert_eq!(chunks, vec![(0, 8, false), (8, 8, false), (16, 4, true)]);
        let step = step_and_append(&mut s);
        assert_eq!(
            (step.scheduled[0].cached_len, step.scheduled[0].token_count),
            (20, 1)
        );
        assert_eq!(
            step.scheduled[0].block_table.len(),
            6,
            "grew by one block at token 21"
        );
    }

    #[test]
    fn decodes_first_then_prefill_fills_the_budget() {
        let mut s = Scheduler::new(config(6, 4, 4, 64)).unwrap();
        s.add(1, 3).unwrap();
        s.add(2, 3).unwrap();
        step_and_append(&mut s); // both prompts in one step (3 + 3 = 6)
        s.add(3, 10).unwrap();
        let step = step_and_append(&mut s);
        let order: Vec<_> = step
            .scheduled
            .iter()
            .map(|x| (x.id, x.token_count))
            .collect();
        assert_eq!(order, vec![(1, 1), (2, 1), (3, 4)]);
        assert_eq!(step.num_tokens(), 6);
    }

    #[test]
    fn budget_and_seq_cap_are_respected() {
        let mut s = Scheduler::new(config(10, 3, 4, 64)).unwrap();
        for id in 0..6 {
            s.add(id, 7).unwrap();
        }
        for _ in 0..30 {
            let step = step_and_append(&mut s);
            assert!(step.num_tokens() <= 10);
            assert!(s.num_running() <= 3);
            let ids: HashSet<_> = step.scheduled.iter().map(|x| x.id).collect();
            assert_eq!(
                ids.len(),
                step.scheduled.len(),
                "a sequence twice in one step"
            );
        }
    }

    #[test]
    fn admission_is_fifo_and_a_blocked_head_is_not_overtaken() {
        // 6 blocks of 4: the first request takes 5 blocks, the second (needs 3) must wait, and
        // the third (needs 1, would fit) must not overtake it.
        let mut s = Scheduler::new(config(64, 8, 4, 6)).unwrap();
        s.add(1, 20).unwrap();
        s.add(2, 12).unwrap();
        s.add(3, 2).unwrap();
        let step = step_and_append(&mut s);
        let ids: Vec<_> = step.scheduled.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![1]);
        assert_eq!(s.num_waiting(), 2);
        s.finish(1).unwrap();
        let step = step_and_append(&mut s);
        let ids: Vec<_> = step.scheduled.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![2, 3], "admitted in arrival order");
    }

    #[test]
    fn preempts_the_newest_and_resumes_it_with_its_generated_tokens() {
        // 4 blocks of 2 tokens; two sequences of 3-token prompts each take 2 blocks. The first
        // decode that crosses a block boundary finds the pool empty and preempts the newer.
        let mut s = Scheduler::new(config(16, 4, 2, 4)).unwrap();
        s.add(1, 3).unwrap();
        s.add(2, 3).unwrap();
        step_and_append(&mut s); // prefill both: 4 tokens each now known, 3 computed
        assert_eq!(s.free_blocks(), 0);
        let step = step_and_append(&mut s); // both decode position 3 within their 2nd block
        assert!(step.preempted.is_empty());
        // Now each has 5 tokens known, 4 computed: position 4 needs a third block.
        let step = step_and_append(&mut s);
        assert_eq!(step.preempted, vec![2]);
        assert_eq!(step.scheduled.len(), 1);
        assert_eq!(step.scheduled[0].id, 1);
        assert_eq!(s.status(2), Some(SeqStatus::Waiting));
        assert_eq!(s.num_preemptions(2), Some(1));
        assert_eq!(s.num_computed(2), Some(0));
        // Let 1 finish; 2 is re-admitted and recomputes prompt plus its 2 generated tokens.
        s.finish(1).unwrap();
        let step = step_and_append(&mut s);
        assert_eq!(step.scheduled.len(), 1);
        let item = &step.scheduled[0];
        assert_eq!((item.id, item.cached_len, item.token_count), (2, 0, 5));
        assert!(
            item.wants_logits,
            "recompute ends with the logits of the next token"
        );
        s.finish(2).unwrap();
        assert_eq!(s.free_blocks(), 4);
    }

    #[test]
    fn a_decode_that_is_the_newest_preempts_itself() {
        // 6 blocks of 2. Sequence 1 (prompt 9) takes 5 blocks over two chunks; sequence 2
        // (prompt 2) takes the last one. Then 2 needs a second block while 1 does not: 2 is
        // the most recently admitted, so it preempts itself and 1 keeps running.
        let mut s = Scheduler::new(config(6, 4, 2, 6)).unwrap();
        s.add(1, 9).unwrap();
        s.add(2, 2).unwrap();
        let step = step_and_append(&mut s);
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1]
        );
        let step = step_and_append(&mut s);
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(s.free_blocks(), 0);
        let step = step_and_append(&mut s);
        assert_eq!(step.preempted, vec![2]);
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(s.free_blocks(), 1);
        // 2 (3 tokens now: needs 2 blocks) waits until 1 is gone.
        let step = step_and_append(&mut s);
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![1]
        );
        s.finish(1).unwrap();
        let step = step_and_append(&mut s);
        let item = &step.scheduled[0];
        assert_eq!((item.id, item.cached_len, item.token_count), (2, 0, 3));
    }

    #[test]
    fn a_decode_preempts_a_newer_partial_prefill() {
        // 4 blocks of 2, budget 4. 1 (prompt 7) and 2 (prompt 3) both start prefilling and
        // take turns; 2 then decodes into a full pool and preempts 3, newer and mid-prefill.
        let mut s = Scheduler::new(config(4, 4, 2, 4)).unwrap();
        s.add(1, 7).unwrap();
        s.add(2, 3).unwrap();
        let step = step_and_append(&mut s); // 1: 4 tokens (2 blocks)
        assert_eq!(step.scheduled.len(), 1);
        s.finish(1).unwrap();
        s.add(3, 7).unwrap();
        let step = step_and_append(&mut s); // 2 admitted: 3 tokens (2 blocks); 3: 1 token
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // 2 decodes (needs no block: 4th token in 2nd block); 3 has 1 computed, 1 block,
        // 1 free block: its chunk shrinks to fit (3 tokens up to 4 computed).
        let step = step_and_append(&mut s);
        let chunks: Vec<_> = step
            .scheduled
            .iter()
            .map(|x| (x.id, x.token_count))
            .collect();
        assert_eq!(chunks, vec![(2, 1), (3, 3)]);
        assert_eq!(s.free_blocks(), 0);
        // 2 needs a 3rd block for its 5th token: newest is 3, which is preempted.
        let step = step_and_append(&mut s);
        assert_eq!(step.preempted, vec![3]);
        assert_eq!(
            step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
            vec![2]
        );
        s.finish(2).unwrap();
        assert_eq!(s.free_blocks(), 4);
        let step = step_and_append(&mut s);
        assert_eq!((step.scheduled[0].id, step.scheduled[0].cached_len), (3, 0));
    }

    #[test]
    fn finish_frees_blocks_in_every_state() {
        let mut s = Scheduler::new(config(4, 4, 2, 16)).unwrap();
        s.add(1, 10).unwrap(); // mid-prefill after one step
        s.add(2, 2).unwrap(); // waiting
        step_and_append(&mut s);
        assert_eq!(s.status(1), Some(SeqStatus::Running));
        assert_eq!(s.status(2), Some(SeqStatus::Waiting));
        s.finish(1).unwrap();
        s.finish(2).unwrap();
        assert_eq!(s.free_blocks(), 16);
        assert!(!s.has_work());
        assert_eq!(s.finish(1), Err(SchedulerError::UnknownSequence(1)));
    }

    #[test]
    fn a_reservation_holds_blocks_and_a_slot_and_is_never_scheduled_or_preempted() {
        // 2 slots, 8 blocks of 4 tokens.
        let mut s = Scheduler::new(config(16, 2, 4, 8)).unwrap();
        assert!(s.can_add_computed(12, 4096));
        s.reserve(1, 12, 4096).unwrap();
        assert_eq!(s.status(1), Some(SeqStatus::Reserved));
        assert_eq!((s.free_blocks(), s.num_reserved()), (5, 1));
        assert!(!s.has_work(), "a reservation alone is no work");
        assert!(s.schedule().is_empty());
        // The reservation's slot counts: one running sequence fills the other, and nothing
        // more is admitted or reserved.
        s.add(2, 4).unwrap();
        s.add(3, 4).unwrap();
        let step = step_and_append(&mut s);
        assert_eq!(step.scheduled.len(), 1, "{step:?}");
        assert_eq!(s.status(3), Some(SeqStatus::Waiting));
        assert!(!s.can_add_computed(4, 4096));
        assert_eq!(s.reserve(4, 4, 4096), Err(SchedulerError::NoRoom(4)));
        // Sequence 2 decodes until the pool runs dry: it preempts itself, never the
        // reservation.
        let mut preempted = false;
        for _ in 0..30 {
            let step = step_and_append(&mut s);
            assert!(step.preempted.iter().all(|&id| id != 1), "{step:?}");
            assert!(step.scheduled.iter().all(|item| item.id != 1));
            if !step.preempted.is_empty() {
                preempted = true;
                break;
            }
        }
        assert!(preempted, "sequence 2 outgrew the free blocks");
        assert_eq!(s.status(1), Some(SeqStatus::Reserved));
        assert_eq!(s.blocks(1).map(|b| b.len()), Some(3));
        assert_eq!(
            s.start_reserved(9, true),
            Err(SchedulerError::NotReserved(9))
        );
        // Its K/V written: it runs, fully computed, its first token to append.
        let blocks = s.start_reserved(1, true).unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(s.num_computed(1), Some(12));
        assert_eq!(s.num_reserved(), 0);
        assert_eq!(
            s.start_reserved(1, true),
            Err(SchedulerError::NotReserved(1))
        );
        s.append_token(1).unwrap();
        for id in [1, 2, 3] {
            s.finish(id).unwrap();
        }
        assert_eq!(s.free_blocks(), 8);
    }

    #[test]
    fn a_reservation_can_prefill_in_its_blocks_or_be_given_back() {
        let mut s = Scheduler::new(config(8, 4, 4, 8)).unwrap();
        s.reserve(1, 10, 4096).unwrap();
        s.reserve(2, 6, 4096).unwrap();
        assert_eq!(s.free_blocks(), 3);
        // A failed pull: the prompt is computed here, in chunks, in the blocks it holds.
        s.start_reserved(1, false).unwrap();
        assert_eq!(s.num_computed(1), Some(0));
        let step = step_and_append(&mut s);
        assert_eq!(
            (step.scheduled[0].id, step.scheduled[0].token_count),
            (1, 8)
        );
        let step = step_and_append(&mut s);
        assert!(step.scheduled[0].wants_logits);
        assert_eq!(s.free_blocks(), 3, "no block beyond the reserved ones");
        // A cancelled one gives its blocks and slot back.
        s.finish(2).unwrap();
        assert_eq!((s.free_blocks(), s.num_reserved()), (5, 0));
    }

    #[test]
    fn pinned_sequences_keep_blocks_until_released() {
        let mut s = Scheduler::new(config(16, 4, 4, 8)).unwrap();
        s.add(1, 9).unwrap();
        let step = step_and_append(&mut s);
        assert!(step.scheduled[0].wants_logits);
        let blocks = s.pin(1).unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(s.free_blocks(), 5);
        assert!(!s.has_work());
        assert!(s.schedule().is_empty());
        s.release_pinned(1).unwrap();
        assert_eq!(s.free_blocks(), 8);
    }

    #[test]
    fn enforces_the_context_limit() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_model_len: 6,
            ..config(16, 4, 4, 8)
        })
        .unwrap();
        s.add(1, 4).unwrap();
        step_and_append(&mut s); // 5 tokens
        step_and_append(&mut s); // 6 tokens
        s.schedule();
        assert_eq!(
            s.append_token(1),
            Err(SchedulerError::ContextFull {
                id: 1,
                max_context_len: 6
            })
        );
    }

    #[test]
    fn samples_share_the_full_prompt_blocks_of_a_sibling_and_compute_the_rest() {
        let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
        // 10 tokens: blocks of 4, 4, 2; the first two are shareable.
        for id in [1, 2, 3] {
            s.add_to_group(id, 10, 7).unwrap();
        }
        // The first computes the prompt; the others wait for it (nothing overtakes them).
        s.add(4, 3).unwrap();
        let step = step_and_append(&mut s);
        let ids: Vec<_> = step.scheduled.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![1], "siblings wait while the prompt is prefilled");
        assert_eq!(s.free_blocks(), 13);
        // Next step: 1 decodes, 2 and 3 take its two full blocks and compute 2 tokens each.
        let step = step_and_append(&mut s);
        let by_id = |id| step.scheduled.iter().find(|i| i.id == id).unwrap().clone();
        let (a, b, c) = (by_id(1), by_id(2), by_id(3));
        assert_eq!((a.cached_len, a.token_count), (10, 1));
        for sample in [&b, &c] {
            assert_eq!((sample.cached_len, sample.token_count), (8, 2));
            assert!(sample.wants_logits);
            assert_eq!(sample.block_table[..2], a.block_table[..2]);
            assert_ne!(sample.block_table[2], a.block_table[2]);
        }
        assert_ne!(b.block_table[2], c.block_table[2]);
        assert_eq!(s.kv.ref_count(a.block_table[0]), 3);
        // 2 shared + 3 partial blocks for the group, 1 for sequence 4.
        assert_eq!(s.free_blocks(), 16 - 6);
        // The shared blocks outlive whoever computed them.
        s.finish(1).unwrap();
        assert_eq!(s.kv.ref_count(a.block_table[0]), 2);
        assert_eq!(s.free_blocks(), 16 - 5);
        s.finish(2).unwrap();
        s.finish(3).unwrap();
        s.finish(4).unwrap();
        assert_eq!(s.free_blocks(), 16);
        assert!(s.groups.is_empty());
    }

    #[test]
    fn a_prompt_of_whole_blocks_leaves_its_last_block_to_each_sample() {
        let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
        s.add_to_group(1, 8, 1).unwrap();
        s.add_to_group(2, 8, 1).unwrap();
        step_and_append(&mut s);
        let step = step_and_append(&mut s);
        let b = step.scheduled.iter().find(|i| i.id == 2).unwrap();
        assert_eq!((b.cached_len, b.token_count), (4, 4));
        // A prompt within one block shares nothing, and its samples do not wait.
        s.add_to_group(3, 3, 2).unwrap();
        s.add_to_group(4, 3, 2).unwrap();
        let step = step_and_append(&mut s);
        assert!(
            step.scheduled
                .iter()
                .any(|i| i.id == 3 && i.cached_len == 0)
        );
        assert!(
            step.scheduled
                .iter()
                .any(|i| i.id == 4 && i.cached_len == 0)
        );
    }

    #[test]
    fn a_sample_with_no_running_sibling_computes_the_prompt_and_shares_it_after() {
        let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
        s.add_to_group(1, 9, 3).unwrap();
        step_and_append(&mut s);
        // The prompt's computer leaves before its sibling arrives: the sibling computes all.
        s.finish(1).unwrap();
        s.add_to_group(2, 9, 3).unwrap();
        s.add_to_group(3, 9, 3).unwrap();
        let step = step_and_append(&mut s);
        assert_eq!(step.scheduled.len(), 1);
        assert_eq!((step.scheduled[0].id, step.scheduled[0].cached_len), (2, 0));
        let step = step_and_append(&mut s);
        let c = step.scheduled.iter().find(|i| i.id == 3).unwrap();
        assert_eq!(c.cached_len, 8);
    }

    #[test]
    fn a_preempted_sample_frees_only_its_own_blocks_and_shares_again_on_readmission() {
        // 7 blocks of 2: a prompt of 5 (3 blocks, 2 shareable) and two samples.
        let mut s = Scheduler::new(config(16, 4, 2, 7)).unwrap();
        s.add_to_group(1, 5, 9).unwrap();
        s.add_to_group(2, 5, 9).unwrap();
        step_and_append(&mut s);
        step_and_append(&mut s);
        // 1: 3 blocks, 2: 2 shared + 1 = 4 distinct blocks in use.
        assert_eq!(s.free_blocks(), 3);
        let shared = s.blocks(1).unwrap()[..2].to_vec();
        // Decode until the pool runs dry and 2 (the newest) is preempted.
        let mut preempted = false;
        for _ in 0..8 {
            let step = step_and_append(&mut s);
            if step.preempted.contains(&2) {
                preempted = true;
                break;
            }
        }
        assert!(preempted, "the newest sample must be preempted");
        assert_eq!(s.status(2), Some(SeqStatus::Waiting));
        for b in &shared {
            assert_eq!(s.kv.ref_count(*b), 1, "sequence 1 still holds the prompt");
        }
        // Once 1 finishes, 2 has no running sibling and recomputes everything itself.
        s.finish(1).unwrap();
        let step = step_and_append(&mut s);
        let b = step.scheduled.iter().find(|i| i.id == 2).unwrap();
        assert_eq!(b.cached_len, 0);
        s.finish(2).unwrap();
        assert_eq!(s.free_blocks(), 7);
    }

    /// A random workload of sample groups under memory pressure: a block's reference count is
    /// the number of sequences holding it, nobody writes a block another sequence holds, and
    /// every block comes back.
    #[test]
    fn random_sample_groups_never_write_a_shared_block_and_return_every_block() {
        for seed in 0..20u64 {
            let mut rng = Lcg(seed ^ 0x5eed);
            let cfg = config(16, 6, 4, 20);
            let mut s = Scheduler::new(cfg).unwrap();
            let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
            let mut next_id = 0;
            let mut shared_admissions = 0;
            let mut preemptions = 0;
            for round in 0..300 {
                if next_id < 60 && rng.next(3) == 0 {
                    let prompt = 1 + rng.next(24) as usize;
                    let n = 1 + rng.next(4);
                    for _ in 0..n {
                        s.add_to_group(next_id, prompt, round).unwrap();
                        to_generate.insert(next_id, 1 + rng.next(12) as usize);
                        next_id += 1;
                    }
                }
                if rng.next(30) == 0 && !to_generate.is_empty() {
                    let mut ids: Vec<_> = to_generate.keys().copied().collect();
                    ids.sort();
                    let id = ids[rng.next(ids.len() as u64) as usize];
                    s.finish(id).unwrap();
                    to_generate.remove(&id);
                }
                let step = s.schedule();
                preemptions += step.preempted.len();
                for item in &step.scheduled {
                    if item.cached_len > 0 && item.cached_len % 4 == 0 && item.token_count > 1 {
                        shared_admissions += 1;
                    }
                    let first = item.cached_len / 4;
                    let last = (item.cached_len + item.token_count - 1) / 4;
                    for b in &item.block_table[first..=last] {
                        assert_eq!(s.kv.ref_count(*b), 1, "seed {seed}: a shared block written");
                    }
                }
                let mut holders: HashMap<BlockId, u32> = HashMap::new();
                for id in s.seqs.keys() {
                    for b in s.kv.blocks(*id) {
                        *holders.entry(*b).or_default() += 1;
                    }
                }
                for (b, n) in &holders {
                    assert_eq!(s.kv.ref_count(*b), *n, "seed {seed}: block {b}");
                }
                assert_eq!(
                    holders.len() + s.free_blocks(),
                    cfg.num_blocks,
                    "blocks leaked"
                );
                count_down(&mut s, &step, &mut to_generate);
            }
            drain(&mut s, &mut to_generate, seed);
            assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
            assert!(s.groups.is_empty());
            if seed == 0 {
                assert!(preemptions > 0, "the workload must exercise preemption");
                assert!(shared_admissions > 0, "the workload must share blocks");
            }
        }
    }

    /// What the engine does after a step of a random workload: each sequence that got logits
    /// has one token fewer to generate, and ends when it has none left (or no room for its
    /// token).
    fn count_down(
        s: &mut Scheduler,
        step: &SchedulerStep,
        to_generate: &mut HashMap<SeqId, usize>,
    ) {
        for item in step.scheduled.iter().filter(|item| item.wants_logits) {
            let left = to_generate.get_mut(&item.id).unwrap();
            *left -= 1;
            if *left == 0 || s.append_token(item.id).is_err() {
                s.finish(item.id).unwrap();
                to_generate.remove(&item.id);
            }
        }
    }

    /// Runs a random workload's steps until the scheduler has no work left.
    fn drain(s: &mut Scheduler, to_generate: &mut HashMap<SeqId, usize>, seed: u64) {
        let mut guard = 0;
        while s.has_work() {
            let step = s.schedule();
            count_down(s, &step, to_generate);
            guard += 1;
            assert!(guard < 10_000, "no progress (seed {seed})");
        }
    }

    /// Tiny deterministic generator so the simulation needs no RNG crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// A random workload under memory pressure: arrivals, cancellations, finishes. Checks
    /// the invariants every step and that every block comes back.
    #[test]
    fn random_workload_keeps_invariants_and_returns_every_block() {
        for seed in 0..20u64 {
            let mut rng = Lcg(seed);
            let cfg = config(12, 5, 4, 14);
            let mut s = Scheduler::new(cfg).unwrap();
            // Per sequence: tokens still to generate before it finishes.
            let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
            // Per sequence: generated count, to check that recompute never loses tokens.
            let mut generated: HashMap<SeqId, usize> = HashMap::new();
            let mut next_id = 0;
            let mut preemptions = 0;
            for _ in 0..400 {
                if next_id < 40 && rng.next(3) == 0 {
                    let prompt = 1 + rng.next(30) as usize;
                    s.add(next_id, prompt).unwrap();
                    to_generate.insert(next_id, 1 + rng.next(20) as usize);
                    generated.insert(next_id, 0);
                    next_id += 1;
                }
                if rng.next(25) == 0 && !to_generate.is_empty() {
                    let ids: Vec<_> = to_generate.keys().copied().collect();
                    let id = ids[rng.next(ids.len() as u64) as usize];
                    s.finish(id).unwrap();
                    to_generate.remove(&id);
                }
                let step = s.schedule();
                preemptions += step.preempted.len();
                assert!(step.num_tokens() <= cfg.max_num_batched_tokens);
                assert!(s.num_running() <= cfg.max_num_seqs);
                let mut held: HashSet<BlockId> = HashSet::new();
                for item in &step.scheduled {
                    assert!(item.token_count > 0);
                    assert!(item.block_table.len() * 4 >= item.cached_len + item.token_count);
                    for b in &item.block_table {
                        assert!(held.insert(*b), "block {b} shared by two sequences");
                    }
                }
                for item in &step.scheduled {
                    if !item.wants_logits {
                        continue;
                    }
                    let left = to_generate.get_mut(&item.id).unwrap();
                    *left -= 1;
                    *generated.get_mut(&item.id).unwrap() += 1;
                    if *left == 0 || s.append_token(item.id).is_err() {
                        s.finish(item.id).unwrap();
                        to_generate.remove(&item.id);
                    }
                }
                let held_total: usize = s.seqs.keys().map(|id| s.kv.num_held(*id)).sum();
                assert_eq!(
                    held_total + s.free_blocks(),
                    cfg.num_blocks,
                    "blocks leaked"
                );
            }
            // Drain.
            drain(&mut s, &mut to_generate, seed);
            assert!(to_generate.is_empty());
            assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
            if seed == 0 {
                assert!(preemptions > 0, "the workload must exercise preemption");
            }
        }
    }

    #[test]
    fn admission_keeps_room_for_the_admitted_to_reach_their_ends() {
        // 12 blocks of 4 tokens; prompts of 16 tokens (4 blocks) that may grow by 8 (2 blocks).
        let reserve = SchedulerConfig {
            growth_reserve_tokens: Some(8),
            ..config(64, 4, 4, 12)
        };
        let mut s = Scheduler::new(reserve).unwrap();
        for id in 1..=3 {
            s.add(id, 16).unwrap();
            s.set_max_len(id, 24).unwrap();
        }
        // Two sequences need 12 blocks to reach their ends: the third waits, though its
        // prompt's 4 blocks are free.
        let step = step_and_append(&mut s);
        assert_eq!(step.scheduled.len(), 2, "{step:?}");
        assert_eq!(s.free_blocks(), 4);
        assert_eq!(s.status(3), Some(SeqStatus::Waiting));
        // Both run to their ends without preempting anyone; the third starts as one finishes.
        let mut preempted = Vec::new();
        let mut generated: HashMap<SeqId, usize> = HashMap::new();
        while s.has_work() {
            let step = s.schedule();
            preempted.extend(step.preempted.iter().copied());
            for item in step.scheduled.iter().filter(|i| i.wants_logits) {
                let count = generated.entry(item.id).or_default();
                *count += 1;
                if *count == 8 {
                    s.finish(item.id).unwrap();
                } else {
                    s.append_token(item.id).unwrap();
                }
            }
        }
        assert!(preempted.is_empty(), "{preempted:?}");
        assert_eq!(generated.len(), 3);
        assert_eq!(s.free_blocks(), 12);

        // Without the reserve all three start and the pool runs dry: a preemption.
        let mut s = Scheduler::new(config(64, 4, 4, 12)).unwrap();
        for id in 1..=3 {
            s.add(id, 16).unwrap();
        }
        let mut preemptions = 0;
        for _ in 0..8 {
            preemptions += step_and_append(&mut s).preempted.len();
        }
        assert!(preemptions > 0);
    }

    #[test]
    fn a_lone_sequence_starts_even_when_its_growth_cannot_be_kept() {
        // 8 blocks of 4 tokens, growth kept for 100 tokens: more than the pool holds.
        let mut s = Scheduler::new(SchedulerConfig {
            growth_reserve_tokens: Some(100),
            ..config(64, 4, 4, 8)
        })
        .unwrap();
        s.add(1, 12).unwrap();
        s.add(2, 4).unwrap();
        let step = step_and_append(&mut s);
        assert_eq!(step.scheduled.len(), 1, "{step:?}");
        assert_eq!(s.status(2), Some(SeqStatus::Waiting));
        s.finish(1).unwrap();
        assert_eq!(step_and_append(&mut s).scheduled[0].id, 2);
    }

    #[test]
    fn imports_need_their_room_to_grow_and_the_admitted_ones() {
        let mut s = Scheduler::new(SchedulerConfig {
            growth_reserve_tokens: Some(8),
            ..config(64, 4, 4, 12)
        })
        .unwrap();
        // Alone: the prompt's blocks are enough (growth past the pool is not asked).
        assert!(s.can_add_computed(40, 4096));
        s.add_computed(1, 16, 24).unwrap(); // 4 blocks held, 2 to grow
        // 8 free: a 16-token prompt that may grow by 8 needs 6, plus 2 for sequence 1.
        assert!(s.can_add_computed(16, 24));
        assert!(!s.can_add_computed(20, 28), "7 blocks to its end, plus 2");
        assert!(s.can_add_computed(20, 24), "its end within the 6 blocks");
        s.reserve(2, 16, 24).unwrap();
        assert!(
            !s.can_add_computed(1, 2),
            "2 free blocks, 4 kept for growth"
        );
    }

    #[test]
    fn with_room_to_grow_for_every_output_nothing_is_ever_preempted() {
        for seed in 0..20u64 {
            let mut rng = Lcg(seed);
            let cfg = SchedulerConfig {
                growth_reserve_tokens: Some(20),
                ..config(12, 5, 4, 14)
            };
            let mut s = Scheduler::new(cfg).unwrap();
            let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
            let mut next_id = 0;
            let mut steps = 0;
            while next_id < 40 || s.has_work() {
                steps += 1;
                assert!(steps < 10_000, "no progress (seed {seed})");
                if next_id < 40 && rng.next(3) == 0 {
                    let prompt = 1 + rng.next(30) as usize;
                    let output = 1 + rng.next(20) as usize;
                    s.add(next_id, prompt).unwrap();
                    s.set_max_len(next_id, prompt + output).unwrap();
                    to_generate.insert(next_id, output);
                    next_id += 1;
                }
                let step = s.schedule();
                assert!(step.preempted.is_empty(), "seed {seed}: {step:?}");
                for item in step.scheduled.iter().filter(|i| i.wants_logits) {
                    let left = to_generate.get_mut(&item.id).unwrap();
                    *left -= 1;
                    if *left == 0 {
                        s.finish(item.id).unwrap();
                        to_generate.remove(&item.id);
                    } else {
                        s.append_token(item.id).unwrap();
                    }
                }
            }
            assert!(to_generate.is_empty(), "seed {seed}");
            assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
        }
    }
}
