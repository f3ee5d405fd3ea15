//! One forward's metadata on the device: the integer arrays of the [`BatchPlan`] packed in one
//! buffer and the rotary tables in another (two copies per forward instead of eleven). Kernels
//! get the raw addresses of the sub-arrays, which stay valid as long as the [`CudaBatch`] lives.
//!
//! A decode step replayed from a CUDA graph reads its metadata from fixed addresses: such a
//! batch is allocated once per graph shape ([`GraphShape`]) and refilled before each replay,
//! padded to the shape with dummy sequences that write into the cache's scratch block.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

use crate::backend::{BackendError, BatchPlan};

/// Query rows per block of the prefill attention kernel (`FA_ROWS` in flash.cu).
pub(super) const FLASH_ROWS: usize = 128;

/// The fixed shape of a graph-replayed decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GraphShape {
    /// Sequences, real and dummy.
    pub batch: usize,
    /// Block-table entries per sequence (the context bucket / block size).
    pub blocks_per_seq: usize,
    /// Context the attention kernel's split is sized for.
    pub context: usize,
    /// The cache block dummies write into (never handed to a sequence).
    pub scratch_block: u32,
}

/// Host-side packing of a plan (padded to `shape` when given).
struct Packed {
    ints: Vec<u32>,
    offsets: [usize; INT_ARRAYS],
    floats: Vec<f32>,
    rope_len: usize,
    decode_rows: usize,
    num_tokens: usize,
    num_seqs: usize,
    num_tiles: usize,
    num_logits: usize,
    max_context: usize,
    num_prefill_blocks: usize,
}

/// Integer arrays a batch packs (see `pack`).
const INT_ARRAYS: usize = 14;

/// The cache blocks the prefill sequences (those after `decode_rows`) read, each once, in
/// order of first use, and the batch's block tables with those sequences' entries replaced by
/// their block's index in that list (other entries 0): the tables of a compact copy of just
/// those blocks, which a prefill attention over an FP8 cache reads widened to bf16.
fn prefill_blocks(plan: &BatchPlan, decode_rows: usize) -> (Vec<u32>, Vec<u32>) {
    let mut blocks = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut tables = vec![0u32; plan.block_tables.len()];
    for seq in plan.sequences.iter().skip(decode_rows) {
        let start = seq.block_table_start;
        for (i, &block) in plan.block_table(seq).iter().enumerate() {
            let next = blocks.len() as u32;
            let at = *index.entry(block).or_insert_with(|| {
                blocks.push(block);
                next
            });
            tables[start + i] = at;
        }
    }
    (blocks, tables)
}

/// The prefill attention's tiles (`FLASH_ROWS` query rows of one sequence each) as (sequence,
/// first row) lists, in ascending order of the keys a tile sees, so that the kernels, which take
/// tiles from the last, start the longest first (a chunk after a long cached prefix can see
/// more keys than another sequence's last tile): the short ones then fill the grid's tail.
fn prefill_tiles(plan: &BatchPlan, decode_rows: usize) -> (Vec<u32>, Vec<u32>) {
    let mut tiles: Vec<(usize, u32, u32)> = plan
        .sequences
        .iter()
        .enumerate()
        .skip(decode_rows)
        .flat_map(|(i, seq)| {
            (0..seq.token_count).step_by(FLASH_ROWS).map(move |row| {
                let keys = seq.cached_len + row + FLASH_ROWS.min(seq.token_count - row);
                (keys, i as u32, row as u32)
            })
        })
        .collect();
    tiles.sort_by_key(|&(keys, _, _)| keys);
    tiles.into_iter().map(|(_, seq, row)| (seq, row)).unzip()
}

fn pack(plan: &BatchPlan, shape: Option<&GraphShape>) -> Result<Packed, BackendError> {
    let slot_of = |s: u64| {
        u32::try_from(s).map_err(|_| BackendError::Shape {
            op: "prepare_batch",
            detail: format!("KV slot {s} does not fit the kernels' 32-bit slot index"),
        })
    };
    let half = plan.rope_half;
    let mut tokens = plan.tokens.clone();
    let mut positions = plan.positions.clone();
    let mut token_seq = Vec::with_capacity(tokens.len());
    for (s, seq) in plan.sequences.iter().enumerate() {
        token_seq.extend(std::iter::repeat_n(s as u32, seq.token_count));
    }
    let mut slots = plan
        .slot_mapping
        .iter()
        .map(|&s| slot_of(s))
        .collect::<Result<Vec<u32>, _>>()?;
    let mut seq_block_start: Vec<u32> = plan
        .sequences
        .iter()
        .map(|s| s.block_table_start as u32)
        .collect();
    let mut block_tables = plan.block_tables.clone();
    let mut logits_rows = plan.logits_rows.clone();
    let mut seq_token_start: Vec<u32> = plan
        .sequences
        .iter()
        .map(|s| s.token_start as u32)
        .collect();
    let mut seq_token_count: Vec<u32> = plan
        .sequences
        .iter()
        .map(|s| s.token_count as u32)
        .collect();
    // A batch mixing decodes and prefill chunks lists its decodes first: those one-token
    // sequences go to the decode attention kernel (which reads each KV head once for its
    // query group), so the prefill kernel gets tiles only for the sequences after them.
    let decode_rows = if tokens.len() > plan.sequences.len() {
        plan.sequences
            .iter()
            .take_while(|s| s.token_count == 1)
            .count()
    } else {
        0
    };
    let (mut tile_seq, mut tile_row) = prefill_tiles(plan, decode_rows);
    // Only a batch with prompt chunks has prefill tiles to read a widened copy; a decode step
    // (the graph-replayed shape too) lists none.
    let (prefill_blocks, prefill_tables) = if shape.is_none() && tokens.len() > plan.sequences.len()
    {
        prefill_blocks(plan, decode_rows)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut row_adapters = plan.row_adapters.clone();
    let mut cos = plan.rope_cos.clone();
    let mut sin = plan.rope_sin.clone();
    let mut max_context = plan
        .sequences
        .iter()
        .map(|s| s.context_len())
        .max()
        .unwrap_or(0);
    if let Some(shape) = shape {
        // One token per sequence (a decode step): pad every array to `shape.batch` sequences
        // and every block table to `shape.blocks_per_seq` entries.
        let real = plan.sequences.len();
        let bps = shape.blocks_per_seq;
        block_tables = Vec::with_capacity(shape.batch * bps);
        for seq in &plan.sequences {
            let table = plan.block_table(seq);
            block_tables.extend_from_slice(table);
            block_tables.extend(std::iter::repeat_n(shape.scratch_block, bps - table.len()));
        }
        block_tables.extend(std::iter::repeat_n(
            shape.scratch_block,
            (shape.batch - real) * bps,
        ));
        let scratch_slot = slot_of(shape.scratch_block as u64 * plan.block_size as u64)?;
        for s in real..shape.batch {
            tokens.push(0);
            positions.push(0);
            token_seq.push(s as u32);
            slots.push(scratch_slot);
            logits_rows.push(s as u32);
            seq_token_start.push(s as u32);
            seq_token_count.push(1);
            tile_seq.push(s as u32);
            tile_row.push(0);
            row_adapters.push(0);
            cos.extend(std::iter::repeat_n(1.0, half));
            sin.extend(std::iter::repeat_n(0.0, half));
        }
        seq_block_start = (0..shape.batch).map(|s| (s * bps) as u32).collect();
        max_context = shape.context;
    }
    let arrays: [&[u32]; INT_ARRAYS] = [
        &tokens,
        &positions,
        &token_seq,
        &seq_block_start,
        &block_tables,
        &slots,
        &logits_rows,
        &seq_token_start,
        &seq_token_count,
        &tile_seq,
        &tile_row,
        &prefill_blocks,
        &prefill_tables,
        &row_adapters,
    ];
    let mut ints = Vec::with_capacity(arrays.iter().map(|a| a.len()).sum::<usize>() + 1);
    let mut offsets = [0usize; INT_ARRAYS];
    for (i, a) in arrays.iter().enumerate() {
        offsets[i] = ints.len();
        ints.extend_from_slice(a);
    }
    // Never an empty buffer (a zero-length allocation is an error for the driver).
    ints.push(0);
    let rope_len = cos.len();
    let mut floats = cos;
    floats.extend_from_slice(&sin);
    floats.push(0.0);
    Ok(Packed {
        decode_rows,
        num_tokens: tokens.len(),
        num_seqs: seq_token_count.len(),
        num_tiles: tile_seq.len(),
        num_logits: logits_rows.len(),
        max_context,
        num_prefill_blocks: prefill_blocks.len(),
        ints,
        offsets,
        floats,
        rope_len,
    })
}

pub struct CudaBatch {
    ints: CudaSlice<u32>,
    floats: CudaSlice<f32>,
    pub(super) num_tokens: usize,
    pub(super) num_seqs: usize,
    /// Tiles of [`FLASH_ROWS`] query rows of one sequence (the prefill attention's blocks).
    pub(super) num_tiles: usize,
    /// In a batch with prefill chunks, its leading one-token sequences (decodes): token rows
    /// `0..decode_rows` are theirs and no prefill tile covers them. 0 in a decode-only batch.
    pub(super) decode_rows: usize,
    pub(super) num_logits: usize,
    /// The longest context (cached + new tokens) of the batch's sequences; for a graph
    /// shape, the context its attention split is sized for.
    pub(super) max_context: usize,
    pub(super) block_size: usize,
    pub(super) rope_half: usize,
    /// Cache blocks the prefill sequences read (see [`Self::prefill_blocks`]).
    pub(super) num_prefill_blocks: usize,
    /// Device addresses of the sub-arrays, in `pack`'s order, then cos and sin.
    addr: [u64; INT_ARRAYS + 2],
}

fn upload_err(e: cudarc::driver::DriverError) -> BackendError {
    super::device_error("prepare_batch", &e)
}

/// Pinned host memory the metadata goes to the device from.
///
/// A copy from pageable memory larger than the driver's staging buffer waits for the work
/// queued before it (the driver stages it chunk by chunk, in stream order): a prefill's
/// metadata (its rotary tables are 512 bytes a token) would make the host wait for the step in
/// flight before it could queue the next one ([`crate::engine`]'s overlapped steps). From
/// pinned memory the copy is queued and returns. Two slots alternate; a slot is reused once
/// its last copy ran (an event), which with at most one step in flight is at once.
#[derive(Default)]
pub(super) struct MetaStaging {
    slots: Mutex<([Option<StagingSlot>; 2], usize)>,
}

struct StagingSlot {
    ints: PinnedHostSlice<u32>,
    floats: PinnedHostSlice<f32>,
    /// Recorded after the slot's last copies.
    copied: CudaEvent,
}

// SAFETY: the pinned buffers are only touched under the mutex; CUDA memory may be used from
// any thread with the context bound.
unsafe impl Send for MetaStaging {}
unsafe impl Sync for MetaStaging {}

/// Where a batch's metadata goes to the device: the backend's context and stream, and its
/// pinned staging.
pub(super) struct MetaUpload<'a> {
    pub ctx: &'a Arc<CudaContext>,
    pub stream: &'a Arc<CudaStream>,
    pub staging: &'a MetaStaging,
}

impl MetaUpload<'_> {
    /// Queues the copies of `packed` into `ints` and `floats` (each at least as long).
    fn copy(
        &self,
        packed: &Packed,
        ints: &mut CudaSlice<u32>,
        floats: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        let mut guard = super::pinned::lock(&self.staging.slots);
        let (slots, next) = &mut *guard;
        let at = *next;
        *next = (at + 1) % slots.len();
        let fits = slots[at].as_ref().is_some_and(|slot| {
            slot.ints.len() >= packed.ints.len() && slot.floats.len() >= packed.floats.len()
        });
        if let Some(slot) = &slots[at] {
            slot.copied.synchronize().map_err(upload_err)?;
        }
        if !fits {
            let cap = |n: usize| n.next_power_of_two().max(1 << 12);
            slots[at] = Some(StagingSlot {
                ints: super::pinned::alloc(self.ctx, cap(packed.ints.len()))?,
                floats: super::pinned::alloc(self.ctx, cap(packed.floats.len()))?,
                copied: self.ctx.new_event(None).map_err(upload_err)?,
            });
        }
        let slot = slots[at].as_mut().expect("filled above");
        let host_ints = &mut slot.ints.as_mut_slice().map_err(upload_err)?[..packed.ints.len()];
        host_ints.copy_from_slice(&packed.ints);
        let host_floats =
            &mut slot.floats.as_mut_slice().map_err(upload_err)?[..packed.floats.len()];
        host_floats.copy_from_slice(&packed.floats);
        // The slot is not rewritten before `copied` has passed (checked above at its reuse).
        super::pinned::to_device(self.stream, host_ints, ints)?;
        super::pinned::to_device(self.stream, host_floats, floats)?;
        slot.copied.record(self.stream).map_err(upload_err)
    }
}

impl CudaBatch {
    /// Uploads `plan` into new buffers.
    pub(super) fn upload(to: &MetaUpload<'_>, plan: &BatchPlan) -> Result<Self, BackendError> {
        Self::upload_packed(to, plan, pack(plan, None)?)
    }

    /// Buffers for decode steps of `shape`, filled with `plan` (see [`Self::refill`]).
    pub(super) fn for_graph(
        to: &MetaUpload<'_>,
        plan: &BatchPlan,
        shape: &GraphShape,
    ) -> Result<Self, BackendError> {
        Self::upload_packed(to, plan, pack(plan, Some(shape))?)
    }

    fn upload_packed(
        to: &MetaUpload<'_>,
        plan: &BatchPlan,
        packed: Packed,
    ) -> Result<Self, BackendError> {
        let stream = to.stream;
        // SAFETY: the staging copy writes every element before a kernel reads one.
        let (mut ints, mut floats) = unsafe {
            (
                stream
                    .alloc::<u32>(packed.ints.len().max(1))
                    .map_err(upload_err)?,
                stream
                    .alloc::<f32>(packed.floats.len().max(1))
                    .map_err(upload_err)?,
            )
        };
        to.copy(&packed, &mut ints, &mut floats)?;
        Ok(Self::new(stream, plan, &packed, ints, floats))
    }

    /// Writes `plan` (a decode step that fits `shape`, the shape this batch was made for) into
    /// the same device buffers, so a captured graph reads it.
    pub(super) fn refill(
        &mut self,
        to: &MetaUpload<'_>,
        plan: &BatchPlan,
        shape: &GraphShape,
    ) -> Result<(), BackendError> {
        let packed = pack(plan, Some(shape))?;
        if packed.ints.len() != self.ints.len() || packed.floats.len() != self.floats.len() {
            return Err(BackendError::Shape {
                op: "prepare_batch",
                detail: "a decode step does not fit its graph's metadata buffers".into(),
            });
        }
        to.copy(&packed, &mut self.ints, &mut self.floats)
    }

    fn new(
        stream: &Arc<CudaStream>,
        plan: &BatchPlan,
        packed: &Packed,
        ints: CudaSlice<u32>,
        floats: CudaSlice<f32>,
    ) -> Self {
        let ibase = {
            let (p, _sync) = ints.device_ptr(stream);
            p
        };
        let fbase = {
            let (p, _sync) = floats.device_ptr(stream);
            p
        };
        let mut addr = [0u64; INT_ARRAYS + 2];
        for (i, off) in packed.offsets.iter().enumerate() {
            addr[i] = ibase + 4 * *off as u64;
        }
        addr[INT_ARRAYS] = fbase;
        addr[INT_ARRAYS + 1] = fbase + 4 * packed.rope_len as u64;
        CudaBatch {
            ints,
            floats,
            num_tokens: packed.num_tokens,
            num_seqs: packed.num_seqs,
            num_tiles: packed.num_tiles,
            decode_rows: packed.decode_rows,
            num_logits: packed.num_logits,
            max_context: packed.max_context,
            block_size: plan.block_size,
            rope_half: plan.rope_half,
            num_prefill_blocks: packed.num_prefill_blocks,
            addr,
        }
    }

    pub(super) fn tokens(&self) -> &u64 {
        &self.addr[0]
    }
    pub(super) fn positions(&self) -> &u64 {
        &self.addr[1]
    }
    pub(super) fn token_seq(&self) -> &u64 {
        &self.addr[2]
    }
    pub(super) fn seq_block_start(&self) -> &u64 {
        &self.addr[3]
    }
    pub(super) fn block_tables(&self) -> &u64 {
        &self.addr[4]
    }
    pub(super) fn slot_mapping(&self) -> &u64 {
        &self.addr[5]
    }
    pub(super) fn logits_rows(&self) -> &u64 {
        &self.addr[6]
    }
    pub(super) fn seq_token_start(&self) -> &u64 {
        &self.addr[7]
    }
    pub(super) fn seq_token_count(&self) -> &u64 {
        &self.addr[8]
    }
    pub(super) fn tile_seq(&self) -> &u64 {
        &self.addr[9]
    }
    pub(super) fn tile_row(&self) -> &u64 {
        &self.addr[10]
    }
    /// The cache blocks of the prefill sequences, `num_prefill_blocks` of them, each once.
    pub(super) fn prefill_blocks(&self) -> &u64 {
        &self.addr[11]
    }
    /// The block tables with the prefill sequences' entries as indexes into
    /// [`Self::prefill_blocks`].
    pub(super) fn prefill_tables(&self) -> &u64 {
        &self.addr[12]
    }
    /// Per token, the LoRA adapter plus one whose products the stacked pass adds (0: none,
    /// as for the base model, prompt rows and dummies; [`BatchPlan::row_adapters`]).
    pub(super) fn row_adapters(&self) -> &u64 {
        &self.addr[13]
    }
    pub(super) fn rope_cos(&self) -> &u64 {
        &self.addr[INT_ARRAYS]
    }
    pub(super) fn rope_sin(&self) -> &u64 {
        &self.addr[INT_ARRAYS + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ForwardBatch;

    fn plan(chunks: &[(usize, usize)]) -> BatchPlan {
        // (new tokens, cached) per sequence; block size 16, tables long enough for any test.
        let mut batch = ForwardBatch::default();
        for (i, &(new, cached)) in chunks.iter().enumerate() {
            let blocks = (new + cached).div_ceil(16);
            let table = (0..blocks as u32).map(|b| 100 * i as u32 + b).collect();
            batch.push(&vec![1; new], cached, table, true);
        }
        BatchPlan::new(&batch, 16, &[1.0, 0.5])
    }

    #[test]
    fn decodes_before_prefill_chunks_leave_the_prefill_tiles_to_the_chunks() {
        // Two decodes, a 150-token chunk (two tiles of 128 rows), then a one-token chunk that
        // is not in the leading run and so stays with the prefill kernel.
        let packed = pack(&plan(&[(1, 30), (1, 5), (150, 0), (1, 40)]), None).unwrap();
        assert_eq!(packed.decode_rows, 2);
        assert_eq!(packed.num_tiles, 3);
        let tile_seq = &packed.ints[packed.offsets[9]..packed.offsets[9] + 3];
        let tile_row = &packed.ints[packed.offsets[10]..packed.offsets[10] + 3];
        // By the keys each tile sees: 41 (the one-token chunk after 40 cached), 128, 150.
        assert_eq!(tile_seq, [3, 2, 2]);
        assert_eq!(tile_row, [0, 0, 128]);
    }

    #[test]
    fn prefill_tiles_are_listed_shortest_first_so_the_kernels_start_the_longest() {
        // A 300-token prompt (tiles seeing 128, 256 and 300 keys) and a 100-token chunk after
        // 1,000 cached tokens (one tile seeing 1,100): the chunk's tile is the longest.
        let packed = pack(&plan(&[(300, 0), (100, 1000)]), None).unwrap();
        assert_eq!(packed.num_tiles, 4);
        let tile_seq = &packed.ints[packed.offsets[9]..packed.offsets[9] + 4];
        let tile_row = &packed.ints[packed.offsets[10]..packed.offsets[10] + 4];
        assert_eq!(tile_seq, [0, 0, 0, 1]);
        assert_eq!(tile_row, [0, 128, 256, 0]);
    }

    #[test]
    fn prefill_sequences_list_their_blocks_once_and_tables_index_that_list() {
        // A decode (blocks 0-1), then two chunks: 40 tokens (blocks 100-102) and 20 after 10
        // cached (blocks 200-201), the second sharing its first block with the first chunk.
        let mut batch = ForwardBatch::default();
        batch.push(&[1], 30, vec![0, 1], true);
        batch.push(&[1; 40], 0, vec![100, 101, 102], true);
        batch.push(&[1; 20], 10, vec![100, 201], true);
        let packed = pack(&BatchPlan::new(&batch, 16, &[1.0, 0.5]), None).unwrap();
        assert_eq!(packed.decode_rows, 1);
        assert_eq!(packed.num_prefill_blocks, 4);
        let at = |i: usize, n: usize| &packed.ints[packed.offsets[i]..packed.offsets[i] + n];
        assert_eq!(at(11, 4), [100, 101, 102, 201]);
        assert_eq!(
            at(12, 7),
            [0, 0, 0, 1, 2, 0, 3],
            "the decode's entries are not read"
        );
        assert_eq!(at(13, 1 + 40 + 20), [0; 61]);
        let decode_only = pack(&plan(&[(1, 30), (1, 5)]), None).unwrap();
        assert_eq!(decode_only.num_prefill_blocks, 0);
    }

    #[test]
    fn a_graph_shape_pads_the_rows_adapters_with_the_base_model() {
        let mut batch = ForwardBatch::default();
        batch.push(&[1], 30, vec![0, 1], true);
        batch.push(&[1], 5, vec![2], true);
        batch.set_adapter_from(1, Some(1));
        let shape = GraphShape {
            batch: 4,
            blocks_per_seq: 2,
            context: 32,
            scratch_block: 7,
        };
        let packed = pack(&BatchPlan::new(&batch, 16, &[1.0, 0.5]), Some(&shape)).unwrap();
        assert_eq!(
            &packed.ints[packed.offsets[13]..packed.offsets[13] + 4],
            [0, 2, 0, 0]
        );
    }

    #[test]
    fn a_decode_only_batch_has_no_decode_rows_of_a_mixed_one() {
        let packed = pack(&plan(&[(1, 30), (1, 5)]), None).unwrap();
        assert_eq!(packed.decode_rows, 0);
        let packed = pack(&plan(&[(40, 0), (1, 5)]), None).unwrap();
        assert_eq!(packed.decode_rows, 0, "a prefill first: nothing leads");
        assert_eq!(packed.num_tiles, 2);
    }
}
