//! Slices of one long-lived export region, handed out and taken back.
//!
//! A context worker exports every prompt's K/V, a few MB to a few hundred MB each. Mapping a
//! fresh UCX region per export costs a registration and first-touch page faults on every
//! request, and a GPU worker could not pin it for its copy engine (pinning takes longer than
//! the copy). So the UCX transport maps one region at start (and the backend pins it once),
//! and an export takes a slice of it: first fit over the free ranges, merged again when a slice
//! comes back. This module is that bookkeeping, in offsets; it knows nothing of UCX.

use std::collections::BTreeMap;

/// Slices start at multiples of this (a page: DMA and the CPU copies like aligned starts).
pub const SLICE_ALIGN: usize = 4096;

/// The free ranges of a region of `len` bytes, as `offset -> length`.
#[derive(Debug)]
pub struct SlicePool {
    len: usize,
    free: BTreeMap<usize, usize>,
}

impl SlicePool {
    pub fn new(len: usize) -> Self {
        let len = len - len % SLICE_ALIGN;
        let free = if len > 0 {
            BTreeMap::from([(0, len)])
        } else {
            BTreeMap::new()
        };
        Self { len, free }
    }

    /// Bytes of the region the pool hands out.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> usize {
        self.free.values().sum()
    }

    /// The offset of a slice of at least `len` bytes (rounded up to [`SLICE_ALIGN`]), or None
    /// when no free range is long enough.
    pub fn take(&mut self, len: usize) -> Option<usize> {
        let len = aligned(len.max(1));
        let (&offset, &free) = self.free.iter().find(|&(_, &free)| free >= len)?;
        self.free.remove(&offset);
        if free > len {
            self.free.insert(offset + len, free - len);
        }
        Some(offset)
    }

    /// Takes back the slice [`Self::take`] gave for `len` bytes at `offset`, merging it with
    /// the free ranges on either side.
    pub fn give_back(&mut self, offset: usize, len: usize) {
        let mut start = offset;
        let mut len = aligned(len.max(1));
        debug_assert!(start + len <= self.len, "a slice of this pool");
        if let Some((&before, &before_len)) = self.free.range(..start).next_back()
            && before + before_len == start
        {
            self.free.remove(&before);
            start = before;
            len += before_len;
        }
        if let Some(after_len) = self.free.remove(&(start + len)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

fn aligned(len: usize) -> usize {
    len.div_ceil(SLICE_ALIGN) * SLICE_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = SLICE_ALIGN;

    #[test]
    fn slices_are_aligned_disjoint_and_bounded_by_the_region() {
        let mut pool = SlicePool::new(10 * A + 5);
        assert_eq!(pool.len(), 10 * A);
        let a = pool.take(1).unwrap();
        let b = pool.take(3 * A).unwrap();
        let c = pool.take(2 * A + 1).unwrap();
        assert_eq!((a, b, c), (0, A, 4 * A));
        assert_eq!(pool.free_bytes(), 3 * A);
        assert_eq!(pool.take(3 * A + 1), None, "longer than what is left");
        assert_eq!(pool.take(3 * A), Some(7 * A));
        assert_eq!(pool.take(1), None);
    }

    #[test]
    fn returned_slices_merge_with_their_neighbours() {
        let mut pool = SlicePool::new(8 * A);
        let slices: Vec<usize> = (0..4).map(|_| pool.take(2 * A).unwrap()).collect();
        assert_eq!(pool.take(1), None);
        // Free the second and fourth, then the third: all three merge into one range.
        pool.give_back(slices[1], 2 * A);
        pool.give_back(slices[3], 2 * A);
        assert_eq!(pool.take(4 * A), None, "two separate holes are not one");
        pool.give_back(slices[2], 2 * A);
        assert_eq!(pool.take(6 * A), Some(2 * A));
        pool.give_back(2 * A, 6 * A);
        pool.give_back(slices[0], 2 * A);
        assert_eq!(pool.free_bytes(), 8 * A);
        assert_eq!(
            pool.take(8 * A),
            Some(0),
            "everything merged back into one range"
        );
    }

    #[test]
    fn an_empty_region_hands_out_nothing() {
        let mut pool = SlicePool::new(A - 1);
        assert!(pool.is_empty());
        assert_eq!(pool.take(1), None);
    }
}
