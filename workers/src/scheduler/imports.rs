//! Sequences whose prompt K/V were computed elsewhere (a decode worker's imports): admitted
//! straight into the running set, or given reserved room their pull lands in and started
//! once it has. They follow the admission rule of the other sequences (the module doc of
//! [`super`]).

use super::{Scheduler, SchedulerError, SeqId, SeqStatus, Sequence};
use crate::kv_cache::block_pool::BlockId;
use tandem_protocol::block_hash::BlockHash;

impl Scheduler {
    /// Whether a sequence whose `prompt_tokens` K/V arrive computed (an imported prefill),
    /// and which may grow to `max_len` tokens, can be admitted now, or room reserved for it
    /// ([`Self::reserve`]): a free sequence slot, and the prompt's blocks free together with
    /// the room to grow of it and of every admitted sequence (the scheduler's module doc).
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

    /// Preempts the least urgent running sequence when its priority is strictly lower than
    /// `priority` (an import waiting for room: the scheduler's module doc, "Priorities"); its
    /// id, `None` when there is none.
    pub fn preempt_below(&mut self, priority: i32) -> Option<SeqId> {
        let victim = *self.running.last()?;
        if self.seqs[&victim].priority <= priority {
            return None;
        }
        self.preempt(victim);
        Some(victim)
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
                priority: 0,
                status: SeqStatus::Running,
                num_preemptions: 0,
                cached_tokens: 0,
                max_len,
                group: None,
                unconfirmed_draft: 0,
            },
        );
        self.next_arrival += 1;
        self.enter_running(id);
        Ok(blocks)
    }

    /// Reserves room for a sequence whose prompt's K/V is on its way (a decode worker's pull):
    /// the prompt's blocks are allocated and a sequence slot held, and the sequence is not
    /// scheduled until [`Self::start_reserved`]. Fails when [`Self::can_add_computed`] is false.
    ///
    /// With prefix caching and `naming` (the root and the prompt's tokens), its first blocks
    /// are taken from the cache where it holds them, leaving at least its last token's block
    /// to the transfer (as a prompt prefilled here keeps one token to compute): only the
    /// blocks after them are new, and only they need the K/V. Returns how many of its first
    /// blocks came from the cache.
    pub fn reserve(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        max_len: usize,
        naming: Option<(BlockHash, &[u32])>,
    ) -> Result<usize, SchedulerError> {
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::DuplicateSequence(id));
        }
        self.check_prompt(prompt_tokens)?;
        if self.slots_taken() >= self.config.max_num_seqs {
            return Err(SchedulerError::NoRoom(id));
        }
        let mut cached_blocks = 0;
        if let Some((root, tokens)) = naming.filter(|_| self.kv.prefix_caching()) {
            self.kv.track(id, root, tokens);
            cached_blocks = self.kv.cached_prefix(id, prompt_tokens - 1);
            if cached_blocks > 0 {
                self.kv.take_cached_prefix(id, cached_blocks);
            }
            if !self.kv.allocate_slots(id, prompt_tokens) {
                let freed = self.kv.forget(id);
                debug_assert!(freed.is_ok(), "its cached blocks are held: {freed:?}");
                return Err(SchedulerError::NoRoom(id));
            }
            self.kv
                .record_lookup(prompt_tokens, cached_blocks * self.config.block_size);
        } else {
            self.kv.allocate_new(id, prompt_tokens)?;
        }
        self.seqs.insert(
            id,
            Sequence {
                num_tokens: prompt_tokens,
                num_computed: 0,
                arrival: self.next_arrival,
                priority: 0,
                status: SeqStatus::Reserved,
                num_preemptions: 0,
                cached_tokens: cached_blocks * self.config.block_size,
                max_len,
                group: None,
                unconfirmed_draft: 0,
            },
        );
        self.next_arrival += 1;
        self.num_reserved += 1;
        Ok(cached_blocks)
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
        // Blocks taken from the cache hold their K/V already (and may be shared: never
        // written again); a prefill here computes the rest.
        seq.num_computed = if computed {
            seq.num_tokens
        } else {
            seq.cached_tokens
        };
        seq.arrival = self.next_arrival;
        self.next_arrival += 1;
        self.num_reserved -= 1;
        self.enter_running(id);
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
}
