//! Which KV blocks each sequence holds: the block pool, every sequence's block table, and
//! the cache of computed blocks that outlive their sequences (prefix caching).
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
//! shared blocks cover positions before every holder's computed tokens.
//!
//! # Prefix caching
//! With caching on ([`KvCacheManager::with_prefix_caching`]), every full block whose K/V are
//! computed gets a name ([`tandem_protocol::block_hash`]: a hash chained over the tokens of the sequence up to
//! it, under a root that covers the model and the request's salt) once the scheduler says so
//! ([`KvCacheManager::commit_computed`]). A named block whose last holder lets it go is not
//! returned to the pool but kept, *evictable*: it still counts as free (so admission and
//! growth see the same room as without caching), and a later sequence whose tokens have the
//! same names takes it back ([`KvCacheManager::take_cached_prefix`]) instead of computing it.
//! Blocks are evicted only when an allocation finds no plain free block: least recently
//! released first, and of one sequence its last blocks first (they are the least likely to be
//! shared). A block some table holds is never evicted, and a hit is only ever read: the
//! sequence computes from the first block it did not find.
//!
//! Every block named and every name evicted is recorded as a [`KvEvent`], for the routers that
//! keep an index of which worker holds which prefix ([`KvCacheManager::take_events`]).

use std::collections::{BTreeMap, HashMap};

use super::block_pool::{BlockId, BlockPool, BlockPoolError};
use tandem_protocol::block_hash::{BlockHash, BlockHashes};

/// A sequence, as the scheduler and the engine name it (the request id).
pub type SeqId = u64;

/// A change to the set of named blocks a worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// These blocks were computed and named, in order: each is the child of the one before
    /// it, the first the child of `parent` (`None`: of the chain's root, a sequence's first
    /// block).
    Stored {
        parent: Option<BlockHash>,
        hashes: Vec<BlockHash>,
    },
    /// These names were evicted: their blocks hold other K/V from now on.
    Removed { hashes: Vec<BlockHash> },
}

/// How much of the prompts asked for was found cached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up (every admission of a sequence with names).
    pub queried_tokens: u64,
    /// Of those, tokens whose K/V were found cached.
    pub hit_tokens: u64,
    /// Named blocks evicted to make room.
    pub evicted_blocks: u64,
}

/// The block pool and the block table of every sequence holding blocks.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    /// Block tables in position order: block `i` holds tokens `i * block_size ..`. A sequence
    /// holding no blocks has no entry.
    tables: HashMap<SeqId, Vec<BlockId>>,
    /// Named blocks and what they are called; `None` with caching off.
    cache: Option<PrefixCache>,
}

/// The named blocks: those some table holds and the evictable ones nobody holds.
#[derive(Debug, Default)]
struct PrefixCache {
    by_name: HashMap<BlockHash, BlockId>,
    /// `name_of[block]`: the name of a named block.
    name_of: Vec<Option<BlockHash>>,
    /// Named blocks nobody holds, by the order they were let go (oldest first). The cache
    /// keeps one hold on each in the pool, so the pool never hands them out itself.
    evictable: BTreeMap<u64, BlockId>,
    /// `released_at[block]`: its key in `evictable`.
    released_at: Vec<Option<u64>>,
    next_release: u64,
    /// The names of each tracked sequence's full blocks, and how many of its first blocks
    /// have been looked at for naming ([`KvCacheManager::commit_computed`]).
    seqs: HashMap<SeqId, (BlockHashes, usize)>,
    events: Vec<KvEvent>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    /// A cache of `num_blocks` free blocks of `block_size` tokens each, without prefix caching.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
            cache: None,
        }
    }

    /// The same, keeping computed blocks for later sequences with the same prefix (module
    /// doc, "Prefix caching").
    pub fn with_prefix_caching(num_blocks: usize, block_size: usize) -> Self {
        Self {
            cache: Some(PrefixCache {
                name_of: vec![None; num_blocks],
                released_at: vec![None; num_blocks],
                ..PrefixCache::default()
            }),
            ..Self::new(num_blocks, block_size)
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether computed blocks are kept for later sequences.
    pub fn prefix_caching(&self) -> bool {
        self.cache.is_some()
    }

    /// Total blocks, free or held.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks no sequence holds: plain free ones and evictable cached ones.
    pub fn num_free(&self) -> usize {
        self.pool.num_free() + self.cache.as_ref().map_or(0, |c| c.evictable.len())
    }

    /// Named blocks nobody holds (kept for a later hit, evicted when room is needed).
    pub fn num_evictable(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.evictable.len())
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

    /// How many holders block `id` has (0: free; the cache's hold on an evictable block
    /// counts).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.pool.ref_count(id)
    }

    /// The name of block `id`, if it has one.
    pub fn name_of(&self, id: BlockId) -> Option<BlockHash> {
        self.cache.as_ref().and_then(|c| c.name_of[id as usize])
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
        match self.take_free(missing) {
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
        let blocks = self.take_free(self.blocks_for(tokens))?;
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

    /// Drops every hold of `id`; a block returns to the pool with its last holder, or, when
    /// it is named, stays cached as evictable. A sequence holding nothing is fine. Its names
    /// are kept (a preempted sequence finds its own blocks again); [`Self::forget`] drops them.
    pub fn free(&mut self, id: SeqId) -> Result<(), BlockPoolError> {
        let Some(blocks) = self.tables.remove(&id) else {
            return Ok(());
        };
        let Some(cache) = self.cache.as_mut() else {
            return self.pool.free_all(&blocks);
        };
        // Its blocks are named again from the start if it comes back without hits.
        if let Some((_, named_upto)) = cache.seqs.get_mut(&id) {
            *named_upto = 0;
        }
        // Last blocks first: they get the oldest release marks and are evicted first.
        for &block in blocks.iter().rev() {
            let named = cache.name_of[block as usize].is_some();
            if named && self.pool.ref_count(block) == 1 {
                let mark = cache.next_release;
                cache.next_release += 1;
                cache.evictable.insert(mark, block);
                cache.released_at[block as usize] = Some(mark);
            } else {
                self.pool.free(block)?;
            }
        }
        Ok(())
    }

    /// Frees `id` and forgets the names of its blocks: it is done.
    pub fn forget(&mut self, id: SeqId) -> Result<(), BlockPoolError> {
        if let Some(cache) = self.cache.as_mut() {
            cache.seqs.remove(&id);
        }
        self.free(id)
    }

    /// Names the blocks of `id` from its tokens so far, under `root` (module doc); no-op with
    /// caching off. Tokens that come later are added with [`Self::append_tokens`].
    pub fn track(&mut self, id: SeqId, root: BlockHash, tokens: &[u32]) {
        if let Some(cache) = self.cache.as_mut() {
            let names = BlockHashes::new(root, self.block_size, tokens);
            cache.seqs.insert(id, (names, 0));
        }
    }

    /// Tokens appended to a tracked sequence.
    pub fn append_tokens(&mut self, id: SeqId, tokens: &[u32]) {
        if let Some((names, _)) = self.cache.as_mut().and_then(|c| c.seqs.get_mut(&id)) {
            names.extend(tokens);
        }
    }

    /// Whether `id`'s blocks are named ([`Self::track`]).
    pub fn is_tracked(&self, id: SeqId) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.seqs.contains_key(&id))
    }

    /// How many of `id`'s first blocks are cached, at most `max_tokens` tokens' worth in whole
    /// blocks (the caller keeps at least one token to compute, for its logits).
    pub fn cached_prefix(&self, id: SeqId, max_tokens: usize) -> usize {
        let Some(cache) = self.cache.as_ref() else {
            return 0;
        };
        let Some((names, _)) = cache.seqs.get(&id) else {
            return 0;
        };
        let limit = (max_tokens / self.block_size).min(names.full().len());
        names.full()[..limit]
            .iter()
            .take_while(|name| cache.by_name.contains_key(name))
            .count()
    }

    /// Counts an admission that looked up `queried` prompt tokens and found `hit` of them.
    pub fn record_lookup(&mut self, queried: usize, hit: usize) {
        if let Some(cache) = self.cache.as_mut() {
            cache.stats.queried_tokens += queried as u64;
            cache.stats.hit_tokens += hit as u64;
        }
    }

    /// Gives `id`, which holds no blocks, its first `num_blocks` cached blocks
    /// ([`Self::cached_prefix`] said they are there): an evictable block passes from the
    /// cache's hold to `id`'s, a held one gets one more holder.
    pub fn take_cached_prefix(&mut self, id: SeqId, num_blocks: usize) {
        debug_assert!(!self.tables.contains_key(&id), "sequence {id} holds blocks");
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let names = &cache.seqs[&id].0.full()[..num_blocks];
        let mut table = Vec::with_capacity(num_blocks);
        for name in names {
            let block = cache.by_name[name];
            match cache.released_at[block as usize].take() {
                Some(mark) => {
                    cache.evictable.remove(&mark);
                }
                None => {
                    let shared = self.pool.share(&[block]);
                    debug_assert!(shared.is_ok(), "a named block is held: {shared:?}");
                }
            }
            table.push(block);
        }
        // The hit blocks were named already: naming resumes after them.
        cache.seqs.get_mut(&id).expect("looked up above").1 = num_blocks;
        self.tables.insert(id, table);
    }

    /// `id` has its first `num_computed` tokens' K/V in its blocks: names its full computed
    /// blocks that have no name yet. A block whose name another block already has (the same
    /// prefix computed twice at once) stays unnamed and is freed as usual.
    pub fn commit_computed(&mut self, id: SeqId, num_computed: usize) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let Some((names, named_upto)) = cache.seqs.get_mut(&id) else {
            return;
        };
        let table = self.tables.get(&id).map_or(&[][..], Vec::as_slice);
        let full = (num_computed / self.block_size)
            .min(names.full().len())
            .min(table.len());
        if full <= *named_upto {
            return;
        }
        let parent = named_upto.checked_sub(1).map(|i| names.full()[i]);
        let mut stored = Vec::new();
        for (&name, &block) in names.full()[*named_upto..full]
            .iter()
            .zip(&table[*named_upto..full])
        {
            if cache.by_name.contains_key(&name) || cache.name_of[block as usize].is_some() {
                continue;
            }
            cache.by_name.insert(name, block);
            cache.name_of[block as usize] = Some(name);
            stored.push(name);
        }
        *named_upto = full;
        if !stored.is_empty() {
            cache.events.push(KvEvent::Stored {
                parent,
                hashes: stored,
            });
        }
    }

    /// The events since the last call (module doc).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.cache
            .as_mut()
            .map_or_else(Vec::new, |c| std::mem::take(&mut c.events))
    }

    /// Lookups and evictions so far.
    pub fn stats(&self) -> PrefixCacheStats {
        self.cache
            .as_ref()
            .map_or_else(Default::default, |c| c.stats)
    }

    /// `n` blocks from the pool, evicting the least recently released named blocks when the
    /// plain free ones are too few. All or nothing.
    fn take_free(&mut self, n: usize) -> Result<Vec<BlockId>, BlockPoolError> {
        let short = n.saturating_sub(self.pool.num_free());
        if short > 0
            && let Some(cache) = self.cache.as_mut()
            && short <= cache.evictable.len()
        {
            let mut removed = Vec::with_capacity(short);
            for _ in 0..short {
                let (_, block) = cache.evictable.pop_first().expect("counted above");
                cache.released_at[block as usize] = None;
                let name = cache.name_of[block as usize]
                    .take()
                    .expect("evictable blocks are named");
                cache.by_name.remove(&name);
                removed.push(name);
                self.pool.free(block)?;
            }
            cache.stats.evicted_blocks += short as u64;
            cache.events.push(KvEvent::Removed { hashes: removed });
        }
        self.pool.allocate_n(n)
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
