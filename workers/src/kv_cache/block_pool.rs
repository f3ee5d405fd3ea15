//! The free list of KV cache blocks, with a reference count per block.
//!
//! The pool knows only which block ids are free and how many holders an allocated one has;
//! what a block holds is the cache's business ([`super::KvLayout`]) and which sequences hold
//! it is the [`super::manager`]'s. A block has several holders when the samples of one request
//! (`n` > 1) share their prompt's full blocks ([`BlockPool::share`]): it goes back to the free
//! list when the last of them frees it.
//!
//! Guarantees:
//! - [`BlockPool::allocate`] and [`BlockPool::free`] are O(1): the free ids sit on a stack and
//!   a bitmap of free flags answers "is this id already free?" without a search.
//! - [`BlockPool::allocate_n`] is all-or-nothing and O(n): it either hands out `n` blocks or
//!   leaves the pool untouched.
//! - A double free (or the free of an id the pool never had) is an error and never corrupts
//!   the free list; in debug builds [`BlockPool::free`] also asserts, because inside the engine
//!   it can only be a bookkeeping bug. [`BlockPool::try_free`] returns the error without the
//!   assertion, for ids that come from outside (a remote release message).
//! - [`BlockPool::num_free`] is O(1); with every allocation released it equals
//!   [`BlockPool::num_blocks`] again, which is what the KV accounting tests check.

use thiserror::Error;

/// Index of a block in the KV cache.
pub type BlockId = u32;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockPoolError {
    #[error("KV cache out of blocks: {requested} requested, {free} free of {total}")]
    OutOfBlocks {
        requested: usize,
        free: usize,
        total: usize,
    },
    #[error("KV block {0} freed twice")]
    DoubleFree(BlockId),
    #[error("KV block {0} is free: it cannot be shared")]
    NotAllocated(BlockId),
    #[error("KV block {id} does not exist (the pool has {total} blocks)")]
    UnknownBlock { id: BlockId, total: usize },
}

/// Free list of block ids `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Free ids; allocation pops from the end, so recently freed (cache-warm) blocks are
    /// reused first.
    free: Vec<BlockId>,
    /// `refs[id]`: how many holders block `id` has; 0 exactly when it is in `free`.
    refs: Vec<u32>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    ///
    /// Panics if `num_blocks` does not fit a [`BlockId`]; no cache is that large.
    pub fn new(num_blocks: usize) -> Self {
        assert!(
            num_blocks <= BlockId::MAX as usize,
            "a KV cache of {num_blocks} blocks exceeds the block id range"
        );
        // Reversed so that the first allocations hand out 0, 1, 2, ...: easier to read in logs.
        let free = (0..num_blocks as BlockId).rev().collect();
        Self {
            free,
            refs: vec![0; num_blocks],
        }
    }

    /// Total blocks, free or not.
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks available to allocate.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// One block, or `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// `n` blocks, or none at all when fewer than `n` are free; in the order `n` calls of
    /// [`Self::allocate`] would give them. With [`Self::free_all`] freeing a table last block
    /// first, a fresh pool hands out ascending runs and a freed table is handed out again in
    /// its own order: adjacent blocks, which a KV hand-over reads in place as one region.
    pub fn allocate_n(&mut self, n: usize) -> Result<Vec<BlockId>, BlockPoolError> {
        if n > self.free.len() {
            return Err(BlockPoolError::OutOfBlocks {
                requested: n,
                free: self.free.len(),
                total: self.num_blocks(),
            });
        }
        let mut ids = self.free.split_off(self.free.len() - n);
        ids.reverse();
        for &id in &ids {
            self.refs[id as usize] = 1;
        }
        Ok(ids)
    }

    /// One more holder for each of `ids`, which must be allocated (a sample of a request
    /// taking its sibling's full prompt blocks): each then needs one more free before it
    /// returns to the pool. Checks every id before changing any, so an error leaves the pool
    /// unchanged.
    pub fn share(&mut self, ids: &[BlockId]) -> Result<(), BlockPoolError> {
        for &id in ids {
            match self.refs.get(id as usize) {
                None => {
                    return Err(BlockPoolError::UnknownBlock {
                        id,
                        total: self.num_blocks(),
                    });
                }
                Some(0) => return Err(BlockPoolError::NotAllocated(id)),
                Some(_) => {}
            }
        }
        for &id in ids {
            self.refs[id as usize] += 1;
        }
        Ok(())
    }

    /// How many holders block `id` has (0: free, or no such block).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.refs.get(id as usize).copied().unwrap_or(0)
    }

    /// Drops one holder of a block; the last one returns it to the pool. A double free is a
    /// bookkeeping bug: it asserts in debug builds and is an error (with the pool unchanged)
    /// in release builds.
    pub fn free(&mut self, id: BlockId) -> Result<(), BlockPoolError> {
        let result = self.try_free(id);
        debug_assert!(
            result.is_ok(),
            "{}",
            result
                .as_ref()
                .err()
                .map_or(String::new(), |e| e.to_string())
        );
        result
    }

    /// Drops one holder of a block (the last one returns it to the pool); a double free or
    /// unknown id is an error, never a panic.
    pub fn try_free(&mut self, id: BlockId) -> Result<(), BlockPoolError> {
        let total = self.num_blocks();
        match self.refs.get_mut(id as usize) {
            None => Err(BlockPoolError::UnknownBlock { id, total }),
            Some(0) => Err(BlockPoolError::DoubleFree(id)),
            Some(refs) => {
                *refs -= 1;
                if *refs == 0 {
                    self.free.push(id);
                }
                Ok(())
            }
        }
    }

    /// Returns all of `ids` to the pool, the last first (so that they are allocated again in
    /// their order). Stops at the first bad id (after freeing the ones after it) and reports
    /// it.
    pub fn free_all(&mut self, ids: &[BlockId]) -> Result<(), BlockPoolError> {
        ids.iter().rev().try_for_each(|&id| self.free(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn allocates_every_block_once_then_runs_dry() {
        let mut pool = BlockPool::new(4);
        let mut seen = HashSet::new();
        for _ in 0..4 {
            let id = pool.allocate().expect("pool has free blocks");
            assert!(seen.insert(id), "block {id} handed out twice");
        }
        assert_eq!(pool.num_free(), 0);
        assert_eq!(pool.allocate(), None);
        assert_eq!(seen, (0..4).collect());
    }

    #[test]
    fn allocate_n_is_all_or_nothing() {
        let mut pool = BlockPool::new(5);
        let first = pool.allocate_n(3).expect("3 of 5 fit");
        assert_eq!(pool.num_free(), 2);
        let err = pool.allocate_n(3).expect_err("3 of 2 cannot fit");
        assert_eq!(
            err,
            BlockPoolError::OutOfBlocks {
                requested: 3,
                free: 2,
                total: 5
            }
        );
        assert_eq!(
            pool.num_free(),
            2,
            "a failed allocate_n must not take blocks"
        );
        let second = pool.allocate_n(2).expect("2 of 2 fit");
        let all: HashSet<_> = first.iter().chain(&second).copied().collect();
        assert_eq!(all.len(), 5);
        assert_eq!(pool.allocate_n(0), Ok(vec![]));
    }

    #[test]
    fn runs_of_blocks_come_out_ascending_and_a_freed_run_comes_back_in_its_order() {
        let mut pool = BlockPool::new(8);
        let a = pool.allocate_n(3).unwrap();
        assert_eq!(a, [0, 1, 2]);
        assert_eq!(pool.allocate(), Some(3), "allocate_n's order is allocate's");
        pool.free_all(&a).unwrap();
        assert_eq!(pool.allocate_n(3).unwrap(), a, "A's blocks, in A's order");
    }

    #[test]
    fn freed_blocks_are_reused_and_count_returns_to_baseline() {
        let mut pool = BlockPool::new(8);
        let a = pool.allocate_n(5).unwrap();
        pool.free_all(&a[1..3]).unwrap();
        assert_eq!(pool.num_free(), 5);
        let b = pool.allocate_n(5).unwrap();
        assert!(b.contains(&a[1]) && b.contains(&a[2]));
        pool.free_all(&b).unwrap();
        pool.free(a[0]).unwrap();
        pool.free_all(&a[3..]).unwrap();
        assert_eq!(pool.num_free(), pool.num_blocks());
    }

    #[test]
    fn try_free_reports_double_and_unknown_frees_without_corrupting_the_list() {
        let mut pool = BlockPool::new(3);
        let id = pool.allocate().unwrap();
        pool.try_free(id).unwrap();
        assert_eq!(pool.try_free(id), Err(BlockPoolError::DoubleFree(id)));
        assert_eq!(
            pool.try_free(7),
            Err(BlockPoolError::UnknownBlock { id: 7, total: 3 })
        );
        assert_eq!(pool.num_free(), 3);
        let ids: HashSet<_> = pool.allocate_n(3).unwrap().into_iter().collect();
        assert_eq!(
            ids.len(),
            3,
            "a rejected double free must not duplicate an id"
        );
    }

    #[test]
    fn a_shared_block_returns_to_the_pool_with_its_last_holder() {
        let mut pool = BlockPool::new(4);
        let prompt = pool.allocate_n(2).unwrap();
        pool.share(&prompt).unwrap();
        pool.share(&prompt[..1]).unwrap();
        assert_eq!(pool.ref_count(prompt[0]), 3);
        assert_eq!(pool.ref_count(prompt[1]), 2);
        assert_eq!(pool.num_free(), 2);
        pool.free_all(&prompt).unwrap();
        assert_eq!(pool.num_free(), 2, "other holders keep both blocks");
        pool.free_all(&prompt).unwrap();
        assert_eq!(pool.num_free(), 3, "the second block had two holders");
        pool.free(prompt[0]).unwrap();
        assert_eq!(pool.num_free(), 4);
        assert_eq!(
            pool.try_free(prompt[0]),
            Err(BlockPoolError::DoubleFree(prompt[0]))
        );
        // Only allocated blocks can be shared, and a bad id changes nothing.
        let held = pool.allocate().unwrap();
        let free = (0..4).find(|&b| b != held).unwrap();
        assert_eq!(
            pool.share(&[held, free]),
            Err(BlockPoolError::NotAllocated(free))
        );
        assert_eq!(
            pool.share(&[held, 9]),
            Err(BlockPoolError::UnknownBlock { id: 9, total: 4 })
        );
        assert_eq!(pool.ref_count(held), 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "freed twice")]
    fn free_asserts_on_double_free_in_debug_builds() {
        let mut pool = BlockPool::new(2);
        let id = pool.allocate().unwrap();
        pool.free(id).unwrap();
        let _ = pool.free(id);
    }
}
