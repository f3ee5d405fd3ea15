//! Which KV blocks each sequence holds: the block pool and every sequence's block table.
//!
//! The scheduler decides *what* runs; it asks this manager for the room that needs:
//! [`KvCacheManager::allocate_slots`] grows a sequence's table to cover the tokens of its next
//! chunk (all or nothing), [`KvCacheManager::allocate_new`] gives a prompt computed elsewhere
//! its blocks in one go, [`KvCacheManager::share_prefix`] hands a sequence blocks another one
//! already computed (the samples of one request share their prompt's full blocks), and
//! [`KvCacheManager::free`] drops a sequence's holds when it finishes or is preempted.
//!
//! Blocks are counted by reference in the [`BlockPool`], so a block held by several tables is
//! returned only with its last holder, and nobody ever writes a block another table holds:
//! shared blocks cover positions before every holder's computed tokens. This is the one place
//! blocks change hands, which is where cached prefixes (blocks found by the hash of their
//! tokens) slot in beside the shares of a samples group.

use std::collections::HashMap;

use super::block_pool::{BlockId, BlockPool, BlockPoolError};

/// A sequence, as the scheduler and the engine name it (the request id).
pub type SeqId = u64;

/// The block pool and the block table of every sequence holding blocks.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    /// Block tables in position order: block `i` holds tokens `i * block_size ..`. A sequence
    /// holding no blocks has no entry.
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl KvCacheManager {
    /// A cache of `num_blocks` free blocks of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks, free or held.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks no sequence holds.
    pub fn num_free(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks that cover `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The block table of `id`: empty when it holds none.
    pub fn blocks(&self, id: SeqId) -> &[BlockId] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// How many blocks `id` holds.
    pub fn num_held(&self, id: SeqId) -> usize {
        self.blocks(id).len()
    }

    /// Blocks held by all sequences together, a shared block once per holder.
    pub fn num_held_by_all(&self) -> usize {
        self.tables.values().map(Vec::len).sum()
    }

    /// How many holders block `id` has (0: free).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.pool.ref_count(id)
    }

    /// The most tokens `id` could hold if it took every free block.
    pub fn reachable_tokens(&self, id: SeqId) -> usize {
        (self.num_held(id) + self.num_free()) * self.block_size
    }

    /// Blocks `id` still needs to hold `tokens` tokens.
    pub fn missing_blocks(&self, id: SeqId, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(self.num_held(id))
    }

    /// Grows `id`'s table to hold `tokens` tokens. All or nothing: false, with nothing taken,
    /// when the pool has too few free blocks.
    pub fn allocate_slots(&mut self, id: SeqId, tokens: usize) -> bool {
        let missing = self.missing_blocks(id, tokens);
        if missing == 0 {
            return true;
        }
        match self.pool.allocate_n(missing) {
            Ok(new) => {
                self.tables.entry(id).or_default().extend(new);
                true
            }
            Err(_) => false,
        }
    }

    /// The blocks of a sequence that holds none yet, for `tokens` tokens at once (a prompt
    /// computed elsewhere, or room reserved for one). All or nothing.
    pub fn allocate_new(&mut self, id: SeqId, tokens: usize) -> Result<&[BlockId], BlockPoolError> {
        debug_assert!(!self.tables.contains_key(&id), "sequence {id} holds blocks");
        let blocks = self.pool.allocate_n(self.blocks_for(tokens))?;
        Ok(self.tables.entry(id).or_insert(blocks))
    }

    /// Gives `id`, which holds no blocks, the first `num_blocks` blocks of `from` as its own
    /// first blocks: one more holder each. The caller promises that they hold the K/V of
    /// `id`'s first tokens (the same prompt) and are already computed.
    pub fn share_prefix(
        &mut self,
        id: SeqId,
        from: SeqId,
        num_blocks: usize,
    ) -> Result<(), BlockPoolError> {
        debug_assert!(!self.tables.contains_key(&id), "sequence {id} holds blocks");
        let blocks = self.blocks(from)[..num_blocks].to_vec();
        self.pool.share(&blocks)?;
        self.tables.insert(id, blocks);
        Ok(())
    }

    /// Drops every hold of `id`; a block returns to the pool with its last holder. A sequence
    /// holding nothing is fine.
    pub fn free(&mut self, id: SeqId) -> Result<(), BlockPoolError> {
        match self.tables.remove(&id) {
            Some(blocks) => self.pool.free_all(&blocks),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_grow_a_table_all_or_nothing() {
        let mut kv = KvCacheManager::new(4, 4);
        assert!(kv.allocate_slots(1, 5));
        assert_eq!(kv.num_held(1), 2);
        // Already covered: nothing taken.
        assert!(kv.allocate_slots(1, 8));
        assert_eq!(kv.num_free(), 2);
        // Three more blocks do not fit in two: the table stays as it was.
        assert!(!kv.allocate_slots(1, 20));
        assert_eq!((kv.num_held(1), kv.num_free()), (2, 2));
        assert_eq!(kv.reachable_tokens(1), 16);
        assert_eq!(kv.missing_blocks(1, 13), 2);
        kv.free(1).unwrap();
        assert_eq!(kv.num_free(), 4);
        assert!(kv.blocks(1).is_empty());
    }

    #[test]
    fn a_shared_prefix_outlives_the_sequence_that_computed_it() {
        let mut kv = KvCacheManager::new(8, 4);
        let first = kv.allocate_new(1, 10).unwrap().to_vec();
        assert_eq!(first.len(), 3);
        kv.share_prefix(2, 1, 2).unwrap();
        assert_eq!(kv.blocks(2), &first[..2]);
        assert_eq!(kv.ref_count(first[0]), 2);
        // The sharer grows past the shared blocks into blocks of its own.
        assert!(kv.allocate_slots(2, 10));
        assert_ne!(kv.blocks(2)[2], first[2]);
        assert_eq!(kv.num_held_by_all(), 6);
        kv.free(1).unwrap();
        assert_eq!((kv.ref_count(first[0]), kv.ref_count(first[2])), (1, 0));
        assert_eq!(kv.num_free(), 8 - 3);
        kv.free(2).unwrap();
        assert_eq!(kv.num_free(), 8);
        // Freeing a sequence that holds nothing is no error.
        kv.free(2).unwrap();
    }

    #[test]
    fn allocating_new_blocks_fails_whole_when_the_pool_is_short() {
        let mut kv = KvCacheManager::new(2, 4);
        assert!(kv.allocate_new(1, 9).is_err());
        assert_eq!(kv.num_free(), 2);
        assert!(kv.blocks(1).is_empty());
    }
}
