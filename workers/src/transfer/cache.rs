//! Exports read straight out of the engine's KV cache: the hand-over without copies.
//!
//! A transport that can reach the cache's memory (UCX and the in-process registry for a host
//! cache, CUDA IPC for a device cache) registers the whole allocation once, at start
//! ([`super::KvTransport::expose_cache`]), and gets an [`ExposedCache`]. An export is then no
//! memory of its own: it names the prompt's blocks where they lie in the cache (one region per
//! block), which the engine keeps pinned (retained after the prefill, reference-counted in the
//! block pool) until the export is dropped, and a seal in a slot of the cache's export slab
//! ([`KvCacheMemory`]: after the blocks, in the same allocation, so the one registration
//! covers it and a reader reaches it like the blocks).
//!
//! The order that keeps a reader from ever using another request's K/V ([`super::seal`]):
//!
//! - the blocks are complete before the export exists (the prefill's forward pass wrote them
//!   before the engine sampled the first token from its logits, and retained them);
//! - the nonce is written into the slot ([`ExposedCache::export`]) before the handle goes out;
//! - when the export is dropped (release, cancel, expiry, the worker leaving), its
//!   [`SealGuard`] zeroes the slot, and only once that write is complete does it unpin the
//!   blocks (the engine may reuse them from then on) and give the slot back (a later export
//!   writes its own nonce there). If the zeros cannot be written, neither happens.
//!
//! A reader reads the blocks, then the slot; a block the engine rewrote for another request
//! was rewritten after the zeros were complete, so a read that saw any of it sees zeros or a
//! later nonce in the slot, never this export's.
//!
//! What bounds the cache that exports pin: the context worker's `max_tokens_in_buffer` (its
//! export ledger), and each export's expiry.

use std::sync::{Arc, Mutex};

use super::seal::{self, SEAL_BYTES, Seal, SealGuard, SealMemory};
use super::{Exported, RemoteMemory, TransferError};
use crate::backend::{EXPORT_SLOT_BYTES, KvCacheMemory};

const _: () = assert!(
    SEAL_BYTES == EXPORT_SLOT_BYTES,
    "a seal fills one slab slot"
);

/// Makes the seal memory of the slab slot at an offset from the cache allocation's start.
pub type SealAt = Box<dyn Fn(usize) -> Box<dyn SealMemory> + Send + Sync>;

/// A KV cache registered with a transport for reads straight out of it.
pub struct ExposedCache {
    /// How a reader reaches the allocation (UCX address and key, or CUDA IPC handle).
    memory: RemoteMemory,
    /// The allocation's first byte as readers address `memory`: its address in this process
    /// (UCX, in-process), or 0 (CUDA IPC regions are offsets).
    base: u64,
    cache: KvCacheMemory,
    /// Free slots of the export slab; the most recently freed is taken first.
    free_slots: Mutex<Vec<usize>>,
    seal_at: SealAt,
    /// The registration: dropped (unregistered) before `owner`.
    registration: Option<Box<dyn Send + Sync>>,
    /// What keeps the cache's memory allocated (the engine): dropped last.
    owner: Option<Box<dyn Send + Sync>>,
}

impl Drop for ExposedCache {
    fn drop(&mut self) {
        drop(self.registration.take());
        drop(self.owner.take());
    }
}

impl std::fmt::Debug for ExposedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExposedCache")
            .field("memory", &self.memory)
            .field("base", &self.base)
            .field("cache", &self.cache)
            .finish()
    }
}

impl ExposedCache {
    /// A cache a transport has registered: `memory` and `base` say how readers reach it,
    /// `seal_at` writes a slot's seal, `registration` unregisters it when dropped, and
    /// `owner` keeps the memory allocated until after that.
    pub fn new(
        memory: RemoteMemory,
        base: u64,
        cache: KvCacheMemory,
        seal_at: SealAt,
        registration: Box<dyn Send + Sync>,
        owner: Box<dyn Send + Sync>,
    ) -> Self {
        Self {
            memory,
            base,
            cache,
            free_slots: Mutex::new((0..cache.num_blocks).rev().collect()),
            seal_at,
            registration: Some(registration),
            owner: Some(owner),
        }
    }

    /// The same cache with slab slot `slot` kept out of exports, for a word of the transport's
    /// own that readers reach like a seal (the CUDA IPC exporter's liveness word); returns
    /// the slot's offset from the allocation's start. Exports then find a slot for every
    /// block but one: only if every block were pinned by a one-block export at once would an
    /// export find none, and fail as it would with no slot left.
    pub fn reserve_slot(mut self, slot: usize) -> (Self, usize) {
        let slots = self.free_slots.get_mut().unwrap_or_else(|e| e.into_inner());
        slots.retain(|&s| s != slot);
        let offset = self.cache.slot_offset(slot);
        (self, offset)
    }

    /// How readers reach the cache's memory.
    pub fn memory(&self) -> &RemoteMemory {
        &self.memory
    }

    /// The cache as the engine described it.
    pub fn cache(&self) -> &KvCacheMemory {
        &self.cache
    }

    /// Slots of the export slab in use (exports alive).
    pub fn live_exports(&self) -> usize {
        self.cache.num_blocks - lock(&self.free_slots).len()
    }

    /// An export of `blocks` (pinned by the caller's engine, in the prompt's order) read in
    /// place: one region per block, and a fresh seal in a free slot of the slab. Dropping it
    /// clears the seal, then drops `unpin` (which lets the engine reuse the blocks). On an
    /// error `unpin` is dropped at once.
    pub fn export(
        self: &Arc<Self>,
        blocks: &[u32],
        unpin: Box<dyn Send + Sync>,
    ) -> Result<Exported, TransferError> {
        if blocks.is_empty() {
            return Err(TransferError::Backend("an export of no blocks".into()));
        }
        if let Some(&bad) = blocks
            .iter()
            .find(|&&b| b as usize >= self.cache.num_blocks)
        {
            return Err(TransferError::Backend(format!(
                "block {bad} is not in the cache of {} blocks",
                self.cache.num_blocks
            )));
        }
        let block_bytes = self.cache.block_bytes as u64;
        let regions = blocks
            .iter()
            .map(|&b| (self.base + self.cache.block_offset(b) as u64, block_bytes))
            .collect();
        let Some(slot) = lock(&self.free_slots).pop() else {
            // Each live export pins a block: as many slots as blocks never run out.
            return Err(TransferError::Backend(
                "the KV cache's export slab has no free slot".into(),
            ));
        };
        let offset = self.cache.slot_offset(slot);
        let back = SlotBack {
            cache: Arc::clone(self),
            slot,
        };
        // Dropped in this order after the seal is zeroed: the slot back, then the blocks.
        let guard = SealGuard::new((self.seal_at)(offset), Box::new((back, unpin)));
        let nonce = seal::fresh_nonce();
        // On an error the guard's drop zeroes the slot (or keeps everything if it cannot).
        guard.seal(&nonce)?;
        Ok(Exported {
            memory: self.memory.clone(),
            regions,
            seal: Some(Seal {
                addr: self.base + offset as u64,
                nonce,
            }),
            keepalive: Box::new(guard),
        })
    }
}

/// Gives an export's slab slot back when dropped (after its seal was zeroed).
struct SlotBack {
    cache: Arc<ExposedCache>,
    slot: usize,
}

impl Drop for SlotBack {
    fn drop(&mut self) {
        lock(&self.cache.free_slots).push(self.slot);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::{HostRange, KvMemory};
    use crate::transfer::seal::tests::{Memory, Recorded};

    /// A host "cache" of `blocks` blocks of `block` bytes (block `b` filled with `b + 1`) and
    /// its export slab, as a CPU backend describes it.
    pub(crate) fn host_cache(blocks: usize, block: usize) -> (Vec<u8>, KvCacheMemory) {
        let mut memory = vec![0u8; blocks * block + blocks * SEAL_BYTES];
        for b in 0..blocks {
            memory[b * block..(b + 1) * block].fill(b as u8 + 1);
        }
        let cache = KvCacheMemory {
            memory: KvMemory::Host(HostRange {
                ptr: memory.as_mut_ptr(),
                len: memory.len(),
            }),
            block_bytes: block,
            num_blocks: blocks,
            slab_offset: blocks * block,
        };
        (memory, cache)
    }

    fn cache(num_blocks: usize) -> KvCacheMemory {
        KvCacheMemory {
            memory: KvMemory::Host(HostRange {
                ptr: std::ptr::null_mut(),
                len: num_blocks * 144,
            }),
            block_bytes: 128,
            num_blocks,
            slab_offset: num_blocks * 128,
        }
    }

    fn exposed(num_blocks: usize, log: &Arc<Mutex<Vec<String>>>) -> Arc<ExposedCache> {
        let seals = Arc::clone(log);
        Arc::new(ExposedCache::new(
            RemoteMemory::Registered {
                address: vec![1],
                rkey: vec![2],
            },
            1 << 20,
            cache(num_blocks),
            Box::new(move |offset| {
                seals.lock().unwrap().push(format!("slot at {offset}"));
                Box::new(Recorded(Arc::clone(&seals)))
            }),
            Box::new(()),
            Box::new(()),
        ))
    }

    #[test]
    fn an_export_names_its_blocks_in_place_and_a_slot_of_the_slab_for_its_seal() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let cache = exposed(4, &log);
        let exported = cache
            .export(&[2, 0, 3], Box::new(Memory(Arc::clone(&log))))
            .unwrap();
        let base = 1u64 << 20;
        assert_eq!(
            exported.regions,
            vec![(base + 256, 128), (base, 128), (base + 384, 128)],
            "each block where it lies, in the prompt's order"
        );
        let seal = exported.seal.expect("sealed");
        assert_eq!(seal.addr, base + 4 * 128, "the first slot of the slab");
        assert_eq!(*log.lock().unwrap(), ["slot at 512", "sealed"]);
        assert_eq!(cache.live_exports(), 1);
        drop(exported);
        assert_eq!(
            *log.lock().unwrap(),
            ["slot at 512", "sealed", "zeroed", "memory back"],
            "the seal is zeroed before the blocks are unpinned"
        );
        assert_eq!(cache.live_exports(), 0);
    }

    #[test]
    fn a_reserved_slot_is_never_an_exports() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seals = Arc::clone(&log);
        let (cache, offset) = ExposedCache::new(
            RemoteMemory::Registered {
                address: vec![1],
                rkey: vec![2],
            },
            0,
            cache(2),
            Box::new(move |_| Box::new(Recorded(Arc::clone(&seals)))),
            Box::new(()),
            Box::new(()),
        )
        .reserve_slot(0);
        assert_eq!(offset, 2 * 128, "slot 0, after the blocks");
        let cache = Arc::new(cache);
        let a = cache.export(&[0], Box::new(())).unwrap();
        assert_eq!(a.seal.unwrap().addr, 2 * 128 + 16, "slot 1");
        assert!(
            cache.export(&[1], Box::new(())).is_err(),
            "slot 0 is reserved, slot 1 taken"
        );
        drop(a);
        let b = cache.export(&[1], Box::new(())).unwrap();
        assert_eq!(b.seal.unwrap().addr, 2 * 128 + 16);
    }

    #[test]
    fn slots_are_reused_most_recent_first_and_bad_blocks_are_refused() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let cache = exposed(2, &log);
        let a = cache.export(&[0], Box::new(())).unwrap();
        let b = cache.export(&[1], Box::new(())).unwrap();
        let (seal_a, seal_b) = (a.seal.unwrap(), b.seal.unwrap());
        assert_ne!(seal_a.addr, seal_b.addr);
        assert!(
            cache.export(&[0], Box::new(())).is_err(),
            "no slot left (two blocks, two exports)"
        );
        drop(a);
        let c = cache.export(&[0], Box::new(())).unwrap();
        let seal_c = c.seal.unwrap();
        assert_eq!(seal_c.addr, seal_a.addr, "A's slot, freed, is C's");
        assert_ne!(seal_c.nonce, seal_a.nonce, "with a nonce of its own");
        for blocks in [&[][..], &[2][..]] {
            let unpinned = Arc::new(Mutex::new(Vec::new()));
            assert!(
                cache
                    .export(blocks, Box::new(Memory(Arc::clone(&unpinned))))
                    .is_err()
            );
            assert_eq!(
                *unpinned.lock().unwrap(),
                ["memory back"],
                "unpinned at once"
            );
        }
        drop((b, c));
        assert_eq!(cache.live_exports(), 0);
    }
}
