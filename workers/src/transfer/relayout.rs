//! Which bytes go where when a prompt's K/V moves between caches that split the KV heads
//! differently: a tensor-parallel context worker of N ranks handing over to a decode worker
//! of M ranks (either may be 1).
//!
//! A block of the whole model's layout holds rows `[layer][k|v][token]`, each row the token's
//! K (or V) of every KV head, `[kv_head][head_dim]`. A group of N ranks keeps the same rows in
//! each rank's cache, each with `H/N` heads (rank `r` holds heads `r*H/N ..`;
//! [`crate::model::shard`]), in blocks of the same ids. So a block moves from N shards to M as
//! strided copies: for each pair of a source and a destination shard whose heads overlap, the
//! overlap's bytes of every row, at the source's row pitch, to the destination's. With N = M
//! the rows match and each shard's block is one contiguous copy; runs of blocks adjacent on
//! both sides merge into one copy either way.
//!
//! [`plan`] is pure: it lists the copies, offsets relative to each shard allocation's start,
//! and the transport issues them (`cuMemcpy2DAsync` for CUDA IPC: the copy engines re-lay the
//! heads on the way, no kernel and no staging buffer). [`apply_on_host`] runs a plan on host
//! memory: the reference the tests check plans against.

use crate::kv_cache::KvLayout;

/// How one cache splits the whole model's KV heads: `shards` allocations of equal shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSplit {
    /// The whole model's layout (every KV head), as a KV handle states it.
    pub layout: KvLayout,
    pub shards: usize,
}

impl HeadSplit {
    /// `layout`'s heads over `shards` allocations; an error unless they divide evenly.
    pub fn new(layout: KvLayout, shards: usize) -> Result<Self, String> {
        if shards == 0 || !layout.num_kv_heads.is_multiple_of(shards) {
            return Err(format!(
                "{} KV heads do not split over {shards} tensor-parallel ranks",
                layout.num_kv_heads
            ));
        }
        Ok(Self { layout, shards })
    }

    pub fn heads_per_shard(&self) -> usize {
        self.layout.num_kv_heads / self.shards
    }

    /// Bytes of one head's K (or V) of one token.
    fn head_bytes(&self) -> usize {
        self.layout.head_dim * self.layout.dtype.size_bytes()
    }

    /// Bytes of one row (a token's K or V of one layer) in one shard.
    pub fn row_bytes(&self) -> usize {
        self.heads_per_shard() * self.head_bytes()
    }

    /// Rows in a block: every layer's K and V of every token.
    pub fn rows_per_block(&self) -> usize {
        self.layout.num_layers * 2 * self.layout.block_size
    }

    /// Bytes of one block in one shard.
    pub fn block_bytes(&self) -> usize {
        self.rows_per_block() * self.row_bytes()
    }

    /// The heads shard `s` holds.
    fn heads(&self, s: usize) -> std::ops::Range<usize> {
        let per = self.heads_per_shard();
        s * per..(s + 1) * per
    }
}

/// One copy of `height` rows of `width` bytes: from source shard `src_shard` at `src_offset`
/// (rows `src_pitch` apart) to destination shard `dst_shard` at `dst_offset` (rows
/// `dst_pitch` apart). Offsets are from the start of each shard's allocation. A contiguous
/// copy is one row (`height` 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy2d {
    pub src_shard: usize,
    pub src_offset: u64,
    pub src_pitch: usize,
    pub dst_shard: usize,
    pub dst_offset: u64,
    pub dst_pitch: usize,
    pub width: usize,
    pub height: usize,
}

impl Copy2d {
    /// Bytes moved.
    pub fn bytes(&self) -> u64 {
        (self.width * self.height) as u64
    }

    /// One past the last source byte read, from the shard's start.
    pub fn src_end(&self) -> u64 {
        self.src_offset + ((self.height - 1) * self.src_pitch + self.width) as u64
    }

    /// One past the last destination byte written, from the shard's start.
    pub fn dst_end(&self) -> u64 {
        self.dst_offset + ((self.height - 1) * self.dst_pitch + self.width) as u64
    }
}

/// The copies that move a prompt's blocks from `from` (block `i` at `src_offsets[i]` in every
/// source shard) into blocks `dst_blocks[i]` of `to` (block `b` at `b * to.block_bytes()` in
/// every destination shard). Both splits must be of the same layout, with one destination
/// block per source block.
pub fn plan(
    from: &HeadSplit,
    src_offsets: &[u64],
    to: &HeadSplit,
    dst_blocks: &[u32],
) -> Result<Vec<Copy2d>, String> {
    if from.layout != to.layout {
        return Err(format!(
            "the layouts differ: {:?} and {:?}",
            from.layout, to.layout
        ));
    }
    if src_offsets.len() != dst_blocks.len() {
        return Err(format!(
            "{} source blocks for {} destination blocks",
            src_offsets.len(),
            dst_blocks.len()
        ));
    }
    let (src_block, dst_block) = (from.block_bytes() as u64, to.block_bytes() as u64);
    let rows = from.rows_per_block();
    let head_bytes = from.head_bytes();
    let mut copies = Vec::new();
    let mut i = 0;
    while i < src_offsets.len() {
        // A run of blocks adjacent in both caches: one copy per pair of shards.
        let mut run = 1;
        while i + run < src_offsets.len()
            && src_offsets[i + run] == src_offsets[i] + run as u64 * src_block
            && dst_blocks[i + run] as u64 == dst_blocks[i] as u64 + run as u64
        {
            run += 1;
        }
        let (src_start, dst_start) = (src_offsets[i], dst_blocks[i] as u64 * dst_block);
        for dst_shard in 0..to.shards {
            let wanted = to.heads(dst_shard);
            for src_shard in 0..from.shards {
                let held = from.heads(src_shard);
                let (first, end) = (held.start.max(wanted.start), held.end.min(wanted.end));
                if first >= end {
                    continue;
                }
                let width = (end - first) * head_bytes;
                let src_offset = src_start + ((first - held.start) * head_bytes) as u64;
                let dst_offset = dst_start + ((first - wanted.start) * head_bytes) as u64;
                let whole_rows = width == from.row_bytes() && width == to.row_bytes();
                copies.push(if whole_rows {
                    Copy2d {
                        src_shard,
                        src_offset,
                        src_pitch: run * src_block as usize,
                        dst_shard,
                        dst_offset,
                        dst_pitch: run * dst_block as usize,
                        width: run * src_block as usize,
                        height: 1,
                    }
                } else {
                    Copy2d {
                        src_shard,
                        src_offset,
                        src_pitch: from.row_bytes(),
                        dst_shard,
                        dst_offset,
                        dst_pitch: to.row_bytes(),
                        width,
                        height: run * rows,
                    }
                });
            }
        }
        i += run;
    }
    Ok(copies)
}

/// Runs `copies` between host buffers, one per shard (the tests' reference for what a
/// transport's copies do). Panics on a copy outside a buffer.
pub fn apply_on_host(copies: &[Copy2d], src: &[&[u8]], dst: &mut [&mut [u8]]) {
    for copy in copies {
        for row in 0..copy.height {
            let from = copy.src_offset as usize + row * copy.src_pitch;
            let to = copy.dst_offset as usize + row * copy.dst_pitch;
            dst[copy.dst_shard][to..to + copy.width]
                .copy_from_slice(&src[copy.src_shard][from..from + copy.width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvDType;

    /// 2 layers, 4 KV heads of 4 bf16 dimensions, blocks of 2 tokens.
    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 4,
            head_dim: 4,
            block_size: 2,
            dtype: KvDType::Bf16,
        }
    }

    /// Whole-layout blocks, every byte telling its block, row and position apart.
    fn whole_blocks(layout: &KvLayout, blocks: usize) -> Vec<u8> {
        (0..blocks * layout.block_bytes())
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ (i / layout.block_bytes()) as u8)
            .collect()
    }

    /// Caches of `split` holding `whole`'s blocks at block ids `ids` (of `capacity` blocks),
    /// each row cut into the shards' heads: what a tensor-parallel group's ranks hold.
    fn shard(split: &HeadSplit, whole: &[u8], ids: &[u32], capacity: usize) -> Vec<Vec<u8>> {
        let whole_row = split.row_bytes() * split.shards;
        let mut shards = vec![vec![0u8; capacity * split.block_bytes()]; split.shards];
        for (i, &id) in ids.iter().enumerate() {
            let block = &whole[i * split.layout.block_bytes()..][..split.layout.block_bytes()];
            for (row, bytes) in block.chunks_exact(whole_row).enumerate() {
                for (s, cache) in shards.iter_mut().enumerate() {
                    let at = id as usize * split.block_bytes() + row * split.row_bytes();
                    cache[at..at + split.row_bytes()].copy_from_slice(
                        &bytes[s * split.row_bytes()..(s + 1) * split.row_bytes()],
                    );
                }
            }
        }
        shards
    }

    /// Moves 5 blocks from a cache of `n` shards at ids `src_ids` to one of `m` shards at
    /// `dst_ids`, and checks the destination holds exactly what `m` ranks would have
    /// computed.
    fn moves(n: usize, m: usize, src_ids: &[u32], dst_ids: &[u32]) -> Vec<Copy2d> {
        let layout = layout();
        let (from, to) = (
            HeadSplit::new(layout, n).unwrap(),
            HeadSplit::new(layout, m).unwrap(),
        );
        let whole = whole_blocks(&layout, src_ids.len());
        let src = shard(&from, &whole, src_ids, 16);
        let expected = shard(&to, &whole, dst_ids, 16);
        let offsets: Vec<u64> = src_ids
            .iter()
            .map(|&b| b as u64 * from.block_bytes() as u64)
            .collect();
        let copies = plan(&from, &offsets, &to, dst_ids).unwrap();
        let mut dst = vec![vec![0u8; 16 * to.block_bytes()]; m];
        let src_views: Vec<&[u8]> = src.iter().map(|s| s.as_slice()).collect();
        let mut dst_views: Vec<&mut [u8]> = dst.iter_mut().map(|d| d.as_mut_slice()).collect();
        apply_on_host(&copies, &src_views, &mut dst_views);
        assert_eq!(
            dst, expected,
            "{n} ranks to {m}: {src_ids:?} -> {dst_ids:?}"
        );
        let moved: u64 = copies.iter().map(Copy2d::bytes).sum();
        assert_eq!(
            moved as usize,
            src_ids.len() * layout.block_bytes(),
            "every byte once"
        );
        copies
    }

    #[test]
    fn blocks_move_between_any_splits_of_the_heads() {
        let src = [3, 4, 5, 9, 1];
        let dst = [7, 8, 2, 3, 4];
        for n in [1, 2, 4] {
            for m in [1, 2, 4] {
                moves(n, m, &src, &dst);
            }
        }
    }

    #[test]
    fn equal_splits_copy_whole_runs_of_blocks() {
        // Adjacent on both sides: blocks 3-5 -> 7-9, then 9 -> 2 and 1 -> 3 alone.
        let copies = moves(2, 2, &[3, 4, 5, 9, 1], &[7, 8, 9, 2, 3]);
        assert_eq!(copies.len(), 3 * 2, "three runs, one copy per rank each");
        assert!(
            copies
                .iter()
                .all(|c| c.height == 1 && c.src_shard == c.dst_shard)
        );
        let block = HeadSplit::new(layout(), 2).unwrap().block_bytes();
        assert_eq!(copies[0].width, 3 * block);
    }

    #[test]
    fn other_splits_copy_rows_of_the_overlapping_heads() {
        // Two ranks to one: each source rank's heads fill half of every destination row.
        let copies = moves(2, 1, &[0, 1], &[5, 6]);
        let (from, to) = (
            HeadSplit::new(layout(), 2).unwrap(),
            HeadSplit::new(layout(), 1).unwrap(),
        );
        assert_eq!(copies.len(), 2);
        for (s, copy) in copies.iter().enumerate() {
            assert_eq!(copy.width, from.row_bytes());
            assert_eq!(
                (copy.src_pitch, copy.dst_pitch),
                (from.row_bytes(), to.row_bytes())
            );
            assert_eq!(copy.height, 2 * from.rows_per_block());
            assert_eq!(
                copy.dst_offset,
                5 * to.block_bytes() as u64 + (s * from.row_bytes()) as u64
            );
            assert!(copy.dst_end() <= 7 * to.block_bytes() as u64);
            assert!(copy.src_end() <= 2 * from.block_bytes() as u64);
        }
    }

    #[test]
    fn mismatches_are_refused() {
        let layout = layout();
        assert!(
            HeadSplit::new(layout, 3)
                .unwrap_err()
                .contains("4 KV heads")
        );
        let one = HeadSplit::new(layout, 1).unwrap();
        let other = HeadSplit::new(
            KvLayout {
                block_size: 4,
                ..layout
            },
            1,
        )
        .unwrap();
        assert!(
            plan(&one, &[0], &other, &[0])
                .unwrap_err()
                .contains("layouts differ")
        );
        assert!(
            plan(&one, &[0, 64], &one, &[0])
                .unwrap_err()
                .contains("2 source blocks")
        );
    }
}
