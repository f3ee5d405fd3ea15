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
//! 3. **Then admission** of waiting sequences in strict queue order: the head of the queue is
//!    admitted only when the pool has the blocks for its first chunk; if it cannot be, nothing
//!    behind it is either (no overtaking, so a long prompt is never starved by short ones).
//!    Nothing is admitted in a step that had to preempt for memory, so memory pressure is not
//!    made worse.
//!
//! # Priorities
//! Every sequence has a priority ([`Scheduler::set_priority`], vLLM's request `priority`:
//! lower is served first, 0 by default). The waiting queue is ordered by priority, then
//! arrival; the running set by priority, then admission. So "oldest" and "newest" below
//! read "most urgent" and "least urgent" where priorities differ, and with one priority the
//! policy is first come, first served. When the head of the queue cannot be admitted (no
//! sequence slot, or not the blocks it needs) while sequences of a strictly lower priority
//! run, the least urgent of them are preempted, one at a time, until it can
//! ([`Scheduler::schedule`]'s first phase, as vLLM's priority policy does); they recompute
//! later like any preempted sequence. Equal priorities never preempt each other this way.
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
//! # Cached prefixes
//! With [`SchedulerConfig::prefix_caching`], a sequence whose tokens the engine named
//! ([`Scheduler::track`]) is admitted with the longest run of its first blocks the
//! [`KvCacheManager`] still holds computed (by a finished request, or one running now) as its
//! own, and computes only the rest: at least its last token, for its logits. Blocks are named
//! once their K/V are known to be written ([`Scheduler::commit`], after the forward that
//! computed them ran). A sequence that takes a cached prefix does not wait for its samples
//! group; one that finds none is admitted as above.
//!
//! # Leaving
//! [`Scheduler::finish`] (finished or cancelled, from any state) frees the sequence's blocks at
//! once. [`Scheduler::pin`] takes a sequence out of scheduling but keeps its blocks allocated:
//! the context worker of a disaggregated deployment keeps a prefilled sequence's KV until the
//! decode worker has pulled it, then calls [`Scheduler::release_pinned`].

use std::collections::{HashMap, HashSet, VecDeque};

use crate::kv_cache::block_pool::BlockId;
use crate::kv_cache::manager::{KvCacheManager, KvEvent, PrefixCacheStats};
use tandem_protocol::block_hash::BlockHash;

/// The scheduler's name for a sequence; the engine uses its request id.
pub use crate::kv_cache::manager::SeqId;

mod config;
mod imports;

pub use config::{DEFAULT_GROWTH_RESERVE_TOKENS, SchedulerConfig, SchedulerError};

/// A group of sequences with one prompt whose full blocks they share (the `n` samples of one
/// request); the engine names it.
pub type GroupId = u64;

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
    /// Arrival order; the waiting queue is kept sorted by priority, then by it.
    arrival: u64,
    /// Lower is served first (module doc, "Priorities").
    priority: i32,
    status: SeqStatus,
    num_preemptions: u32,
    /// The most tokens it can reach (prompt plus `max_tokens`; `usize::MAX` until the engine
    /// says, the context still capping it): growth is reserved up to here and no further.
    max_len: usize,
    /// Prompt tokens its first admission found computed (cached, or a sibling sample's).
    cached_tokens: usize,
    /// The samples group this sequence belongs to ([`Scheduler::add_to_group`]), and the
    /// prompt tokens its members may share (whole blocks, at least one token short of the
    /// prompt). `None` for a sequence on its own.
    group: Option<(GroupId, usize)>,
    /// Draft tokens of its last step not confirmed yet ([`Scheduler::draft_token_computed`]).
    unconfirmed_draft: usize,
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
    /// Draft tokens this decode verifies ([`Scheduler::propose_draft`]): the chunk is the
    /// last known token followed by them (`token_count` is `1 + draft`), and only the first
    /// token counts as computed until the engine confirms drafts one by one
    /// ([`Scheduler::draft_token_computed`]).
    pub draft: usize,
}

/// The decision of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStep {
    /// Decodes first, then prefill chunks; the forward batch follows this order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences that lost their blocks in this step and went back to the queue.
    pub preempted: Vec<SeqId>,
    /// How many of `preempted` made room for a waiting sequence of a higher priority (the
    /// others: the cache ran out of blocks).
    pub preempted_for_priority: usize,
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
    /// Sorted by priority, then arrival.
    waiting: VecDeque<SeqId>,
    /// By priority, then admission order, oldest first: preemption takes from the back.
    running: Vec<SeqId>,
    /// Sequences in [`SeqStatus::Reserved`]: each holds a slot of `max_num_seqs`.
    num_reserved: usize,
    next_arrival: u64,
    /// The members of each samples group.
    groups: HashMap<GroupId, Vec<SeqId>>,
    /// Draft lengths proposed for the next step's decodes ([`Self::propose_draft`]), taken by
    /// [`Self::schedule`].
    drafts: HashMap<SeqId, usize>,
}

/// What a waiting group member does at admission.
enum GroupAdmission {
    /// Take the first `blocks` blocks of running sibling `from` (`tokens` tokens of K/V).
    Share {
        from: SeqId,
        blocks: usize,
        tokens: usize,
    },
    /// Take its own first `blocks` blocks from the prefix cache.
    Cached { blocks: usize },
    /// A sibling is prefilling the prompt now: wait for it.
    Wait,
    /// No sibling holds the prompt: compute it.
    Alone,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Self {
            kv: if config.prefix_caching {
                KvCacheManager::with_prefix_caching(config.num_blocks, config.block_size)
            } else {
                KvCacheManager::new(config.num_blocks, config.block_size)
            },
            config,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_reserved: 0,
            next_arrival: 0,
            groups: HashMap::new(),
            drafts: HashMap::new(),
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
                priority: 0,
                status: SeqStatus::Waiting,
                num_preemptions: 0,
                cached_tokens: 0,
                max_len: usize::MAX,
                group,
                unconfirmed_draft: 0,
            },
        );
        self.next_arrival += 1;
        self.enter_waiting(id);
        Ok(())
    }

    /// Sets the priority of `id` (lower is served first; sequences start at 0), moving it to
    /// its place in the queue or the running set.
    pub fn set_priority(&mut self, id: SeqId, priority: i32) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        if seq.priority == priority {
            return Ok(());
        }
        seq.priority = priority;
        match seq.status {
            SeqStatus::Waiting => {
                self.waiting.retain(|&w| w != id);
                self.enter_waiting(id);
            }
            SeqStatus::Running => {
                self.running.retain(|&r| r != id);
                self.enter_running(id);
            }
            SeqStatus::Reserved | SeqStatus::Pinned => {}
        }
        Ok(())
    }

    /// Puts waiting `id` in its place in the queue: after every sequence of its priority or
    /// a higher one that arrived before it.
    fn enter_waiting(&mut self, id: SeqId) {
        let rank = |seq: &Sequence| (seq.priority, seq.arrival);
        let own = rank(&self.seqs[&id]);
        let at = self.waiting.partition_point(|w| rank(&self.seqs[w]) < own);
        self.waiting.insert(at, id);
    }

    /// Adds `id` to the running set as the newest of its priority.
    fn enter_running(&mut self, id: SeqId) {
        let priority = self.seqs[&id].priority;
        let at = self
            .running
            .partition_point(|r| self.seqs[r].priority <= priority);
        self.running.insert(at, id);
    }

    /// Names the full blocks of `id` from its tokens so far (prompt, and any tokens to replay)
    /// under `root`, so that its admission can take a cached prefix and its computed blocks
    /// stay cached for later sequences. Without prefix caching, nothing.
    pub fn track(&mut self, id: SeqId, root: BlockHash, tokens: &[u32]) {
        self.kv.track(id, root, tokens);
    }

    /// The values of tokens appended to a tracked `id` ([`Self::append_token`] counts them;
    /// their values may come later, when a step's sampled tokens reach the host).
    pub fn name_tokens(&mut self, id: SeqId, tokens: &[u32]) {
        self.kv.append_tokens(id, tokens);
    }

    /// The forward pass of `scheduled` ran: their chunks' K/V are in the cache, so their full
    /// blocks may be named and found by later sequences (a draft's only once confirmed).
    pub fn commit(&mut self, scheduled: &[ScheduledSeq]) {
        for item in scheduled {
            self.kv
                .commit_computed(item.id, item.cached_len + item.token_count - item.draft);
        }
    }

    /// Asks that running `id`'s next decode verify `tokens` draft tokens besides its last
    /// token. Taken by the next [`Self::schedule`] only: it schedules the draft (or a
    /// shorter one) when `id` decodes in that step and the token budget and the free blocks
    /// allow it without preempting anyone; else a plain decode.
    pub fn propose_draft(&mut self, id: SeqId, tokens: usize) {
        if tokens > 0 {
            self.drafts.insert(id, tokens);
        }
    }

    /// Whether `id` runs and its next step is a decode (one token to compute): the step a
    /// draft can join.
    pub fn is_decoding(&self, id: SeqId) -> bool {
        self.seqs
            .get(&id)
            .is_some_and(|s| s.status == SeqStatus::Running && s.num_tokens == s.num_computed + 1)
    }

    /// The next draft token of `id`'s last step was accepted: its K/V, computed in that step,
    /// count. Call after appending the token before it ([`Self::append_token`]), one draft
    /// token at a time and at most as many as the step verified.
    pub fn draft_token_computed(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        if seq.unconfirmed_draft == 0
            || seq.num_computed + 1 != seq.num_tokens
            || self.kv.missing_blocks(id, seq.num_tokens) > 0
        {
            return Err(SchedulerError::NotComputed(id));
        }
        seq.unconfirmed_draft -= 1;
        seq.num_computed += 1;
        self.kv.commit_computed(id, seq.num_computed);
        Ok(())
    }

    /// `id`'s computed tokens are in its blocks (a prompt imported from elsewhere, written):
    /// its full blocks may be named.
    pub fn commit_sequence(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get(&id) {
            self.kv.commit_computed(id, seq.num_computed);
        }
    }

    /// Whether computed blocks are kept for later sequences.
    pub fn prefix_caching(&self) -> bool {
        self.kv.prefix_caching()
    }

    /// Prompt tokens looked up in the prefix cache and found there, and evictions.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.kv.stats()
    }

    /// The named blocks stored and evicted since the last call.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.kv.take_events()
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
        self.kv.forget(id)?;
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

    /// Prompt tokens of `id` that its admission found computed, in the prefix cache or a
    /// sibling sample's blocks (a preemption's re-admission does not count).
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.cached_tokens)
    }

    /// Tokens whose K/V are in the cache for `id`.
    pub fn num_computed(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.num_computed)
    }

    /// The sequence admission takes next, if any waits.
    pub fn first_waiting(&self) -> Option<SeqId> {
        self.waiting.front().copied()
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
        self.preempt_for_priority(&mut step);
        self.schedule_decodes(&mut step, &mut budget, &mut scheduled);
        self.extend_decodes_with_drafts(&mut step, &mut budget);
        self.schedule_prefills(&mut step, &mut budget, &mut scheduled);
        // Admission never happens in a step that had to preempt for memory.
        if step.preempted.len() == step.preempted_for_priority {
            self.admit_waiting(&mut step, &mut budget);
        }
        step
    }

    /// Preempts the least urgent running sequences, while the head of the queue cannot be
    /// admitted and they have a strictly lower priority than it (module doc, "Priorities").
    fn preempt_for_priority(&mut self, step: &mut SchedulerStep) {
        let Some(&head) = self.waiting.front() else {
            return;
        };
        let priority = self.seqs[&head].priority;
        // A sample waiting for its sibling's prompt is not admitted whatever the room.
        if matches!(self.group_admission(head, step), GroupAdmission::Wait) {
            return;
        }
        while !self.could_admit(head) {
            let Some(&victim) = self.running.last() else {
                return;
            };
            if self.seqs[&victim].priority <= priority {
                return;
            }
            self.preempt(victim);
            step.preempted.push(victim);
            step.preempted_for_priority += 1;
        }
    }

    /// Whether waiting `id` has a sequence slot, the blocks of its first chunk and room to
    /// grow (admission's rule, without a cached prefix, which only lowers what it needs).
    fn could_admit(&self, id: SeqId) -> bool {
        let seq = &self.seqs[&id];
        let first_chunk_end = seq.num_tokens.min(self.config.max_num_batched_tokens);
        let free = self.kv.num_free();
        let room = self
            .growth_blocks_of_admitted()
            .is_none_or(|admitted| admitted + self.growth_blocks(id) <= free);
        self.slots_taken() < self.config.max_num_seqs
            && self.kv.missing_blocks(id, first_chunk_end) <= free
            && room
    }

    /// The step's decodes, first and oldest admission first; a decode that finds no block
    /// preempts the newest running sequence (itself, last of all).
    fn schedule_decodes(
        &mut self,
        step: &mut SchedulerStep,
        budget: &mut usize,
        scheduled: &mut HashSet<SeqId>,
    ) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
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
            *budget -= 1;
            i += 1;
        }
    }

    /// Then the drafts proposed for the step's decodes, oldest first, each as long as the
    /// budget left and the free blocks allow (never preempting: a draft is only a guess);
    /// the decodes with a draft go after the plain ones, so that a backend's decode kernel
    /// takes the one-token rows together.
    fn extend_decodes_with_drafts(&mut self, step: &mut SchedulerStep, budget: &mut usize) {
        let mut drafts = std::mem::take(&mut self.drafts);
        if drafts.is_empty() {
            return;
        }
        let mut extended = false;
        for item in &mut step.scheduled {
            let Some(wanted) = drafts.remove(&item.id) else {
                continue;
            };
            let draft = wanted.min(*budget);
            // `num_computed` counts the decode's own token already.
            let end = self.seqs[&item.id].num_computed + draft;
            if draft == 0 || !self.kv.allocate_slots(item.id, end) {
                continue;
            }
            item.token_count += draft;
            item.draft = draft;
            self.seqs
                .get_mut(&item.id)
                .expect("scheduled ids are known")
                .unconfirmed_draft = draft;
            item.block_table = self.kv.blocks(item.id).to_vec();
            *budget -= draft;
            extended = true;
        }
        if extended {
            step.scheduled.sort_by_key(|item| item.draft > 0);
        }
    }

    /// Then running prefills (prompt or recompute not finished), oldest first, each a chunk
    /// of what the budget and the free blocks allow.
    fn schedule_prefills(
        &mut self,
        step: &mut SchedulerStep,
        budget: &mut usize,
        scheduled: &mut HashSet<SeqId>,
    ) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
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
            let chunk = self.remaining(id).min(*budget).min(fit);
            let target = self.seqs[&id].num_computed + chunk;
            let grown = self.kv.allocate_slots(id, target);
            debug_assert!(grown, "chunk was sized to the free blocks");
            step.scheduled.push(self.take_chunk(id, chunk));
            scheduled.insert(id);
            *budget -= chunk;
            i += 1;
        }
    }

    /// Last, admission: strict FIFO, only with room to grow for the admitted and the
    /// newcomer (module doc); a newcomer takes its cached prefix or a sibling's shared blocks
    /// first.
    fn admit_waiting(&mut self, step: &mut SchedulerStep, budget: &mut usize) {
        let mut admitted_growth = self.growth_blocks_of_admitted();
        while let Some(&id) = self.waiting.front() {
            if *budget == 0 || self.slots_taken() >= self.config.max_num_seqs {
                break;
            }
            let prompt_tokens = self.seqs[&id].num_tokens;
            let cached = self.kv.cached_prefix(id, prompt_tokens - 1);
            let admission = if cached > 0 {
                GroupAdmission::Cached { blocks: cached }
            } else {
                self.group_admission(id, step)
            };
            let shared = match admission {
                GroupAdmission::Wait => break,
                GroupAdmission::Cached { blocks } => {
                    self.kv.take_cached_prefix(id, blocks);
                    let tokens = blocks * self.config.block_size;
                    let seq = self.seqs.get_mut(&id).expect("waiting ids are known");
                    seq.num_computed = tokens;
                    Some(tokens)
                }
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
            let chunk = self.remaining(id).min(*budget);
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
            let seq = self.seqs.get_mut(&id).expect("waiting ids are known");
            if seq.num_preemptions == 0 {
                seq.cached_tokens = shared.unwrap_or(0);
                if self.kv.is_tracked(id) {
                    self.kv.record_lookup(prompt_tokens, seq.cached_tokens);
                }
            }
            self.waiting.pop_front();
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.status = SeqStatus::Running;
            }
            self.enter_running(id);
            step.scheduled.push(self.take_chunk(id, chunk));
            *budget -= chunk;
            if self.config.growth_reserve_tokens.is_some() {
                let newcomer = self.growth_blocks(id);
                admitted_growth = Some(admitted_growth.unwrap_or(0) + newcomer);
            }
        }
    }

    fn remaining(&self, id: SeqId) -> usize {
        let seq = &self.seqs[&id];
        seq.num_tokens - seq.num_computed
    }

    fn take_chunk(&mut self, id: SeqId, token_count: usize) -> ScheduledSeq {
        let seq = self.seqs.get_mut(&id).expect("scheduled ids are known");
        let cached_len = seq.num_computed;
        seq.num_computed += token_count;
        seq.unconfirmed_draft = 0;
        ScheduledSeq {
            id,
            cached_len,
            token_count,
            block_table: self.kv.blocks(id).to_vec(),
            wants_logits: seq.num_computed == seq.num_tokens,
            draft: 0,
        }
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running ids are known");
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        self.running.retain(|&r| r != id);
        self.enter_waiting(id);
        // Shared blocks stay with their other holders.
        let freed = self.kv.free(id);
        debug_assert!(
            freed.is_ok(),
            "preempted blocks must be allocated: {freed:?}"
        );
    }
}

#[cfg(test)]
mod tests;
