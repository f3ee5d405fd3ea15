//! Device memory of the CUDA backend: activations, weights, the KV cache, and one forward's
//! batch metadata.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};

use crate::backend::{BackendError, BatchPlan, DType, HostTensor};
use crate::kv_cache::KvLayout;

/// Element storage: f32, or bf16 as its bit pattern (`u16`).
pub enum DeviceData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// Activations `[rows, cols]`, row-major.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub(super) data: DeviceData,
}

impl CudaTensor {
    pub(super) fn from_f32(rows: usize, cols: usize, data: CudaSlice<f32>) -> Self {
        CudaTensor {
            rows,
            cols,
            data: DeviceData::F32(data),
        }
    }

    pub(super) fn from_bf16(rows: usize, cols: usize, data: CudaSlice<u16>) -> Self {
        CudaTensor {
            rows,
            cols,
            data: DeviceData::Bf16(data),
        }
    }

    pub(super) fn as_f32(&self, op: &'static str) -> Result<&CudaSlice<f32>, BackendError> {
        match &self.data {
            DeviceData::F32(d) => Ok(d),
            DeviceData::Bf16(_) => Err(not_f32(op)),
        }
    }

    pub(super) fn as_f32_mut(
        &mut self,
        op: &'static str,
    ) -> Result<&mut CudaSlice<f32>, BackendError> {
        match &mut self.data {
            DeviceData::F32(d) => Ok(d),
            DeviceData::Bf16(_) => Err(not_f32(op)),
        }
    }
}

fn not_f32(op: &'static str) -> BackendError {
    BackendError::Shape {
        op,
        detail: "expects f32 activations, got bf16".into(),
    }
}

/// A weight: matrices in bf16 (the operand type of the projections), vectors (norm weights,
/// biases) in f32.
pub enum CudaWeight {
    Matrix {
        data: CudaSlice<u16>,
        rows: usize,
        cols: usize,
    },
    Vector {
        data: CudaSlice<f32>,
        len: usize,
    },
}

impl CudaWeight {
    pub(super) fn describe(&self) -> String {
        match self {
            CudaWeight::Matrix { rows, cols, .. } => format!("a {rows}x{cols} matrix"),
            CudaWeight::Vector { len, .. } => format!("a vector of {len}"),
        }
    }
}

/// Converts `parts` (concatenated along dimension 0) and copies them to the device.
pub(super) fn upload_weight(
    stream: &Arc<CudaStream>,
    parts: &[HostTensor<'_>],
) -> Result<CudaWeight, BackendError> {
    let first = parts.first().ok_or_else(|| BackendError::Shape {
        op: "upload_weight",
        detail: "no tensor".into(),
    })?;
    let trailing = &first.shape[1.min(first.shape.len())..];
    if let Some(bad) = parts.iter().find(|p| {
        p.shape.len() != first.shape.len() || &p.shape[1.min(p.shape.len())..] != trailing
    }) {
        return Err(BackendError::Shape {
            op: "upload_weight",
            detail: format!(
                "parts {:?} and {:?} do not concatenate",
                first.shape, bad.shape
            ),
        });
    }
    let rows: usize = parts
        .iter()
        .map(|p| p.shape.first().copied().unwrap_or(1))
        .sum();
    let upload_err = |e: cudarc::driver::DriverError| BackendError::Device {
        op: "upload_weight",
        detail: e.to_string(),
    };
    match first.shape.len() {
        1 => {
            let mut host = Vec::with_capacity(rows);
            for p in parts {
                host.extend(to_f32(p));
            }
            let data = stream.clone_htod(&host).map_err(upload_err)?;
            Ok(CudaWeight::Vector { data, len: rows })
        }
        2 => {
            let cols = first.shape[1];
            let mut host = Vec::with_capacity(rows * cols);
            for p in parts {
                extend_bf16_bits(&mut host, p);
            }
            let data = stream.clone_htod(&host).map_err(upload_err)?;
            Ok(CudaWeight::Matrix { data, rows, cols })
        }
        n => Err(BackendError::Shape {
            op: "upload_weight",
            detail: format!("{n}-dimensional tensor"),
        }),
    }
}

fn to_f32(t: &HostTensor<'_>) -> Vec<f32> {
    let b = t.bytes;
    match t.dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

fn extend_bf16_bits(out: &mut Vec<u16>, t: &HostTensor<'_>) {
    let b = t.bytes;
    match t.dtype {
        DType::Bf16 => out.extend(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))),
        DType::F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits()),
        ),
        DType::F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()).to_bits()),
        ),
    }
}

/// The paged KV cache: `num_blocks` blocks of `layout` (bf16) in one device allocation.
pub struct CudaKvCache {
    pub(super) layout: KvLayout,
    pub(super) num_blocks: usize,
    pub(super) data: CudaSlice<u16>,
}

impl CudaKvCache {
    /// Element range of `block`, checking that `bytes` is one block's size.
    pub(super) fn block_range(
        &self,
        block: u32,
        bytes: usize,
    ) -> Result<Range<usize>, BackendError> {
        if block as usize >= self.num_blocks {
            return Err(BackendError::BlockOutOfRange {
                block,
                num_blocks: self.num_blocks,
            });
        }
        if bytes != self.layout.block_bytes() {
            return Err(BackendError::Shape {
                op: "KV block copy",
                detail: format!("{bytes} bytes for a block of {}", self.layout.block_bytes()),
            });
        }
        let elems = self.layout.block_elems();
        let start = block as usize * elems;
        Ok(start..start + elems)
    }

    /// Device address of `block`'s first byte (for device-to-device transfers).
    pub fn block_address(&self, stream: &CudaStream, block: u32) -> u64 {
        let base = {
            let (p, _sync) = self.data.device_ptr(stream);
            p
        };
        base + (block as u64) * self.layout.block_bytes() as u64
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }
}

/// Query rows per block of the prefill attention kernel (`FA_ROWS` in flash.cu).
pub(super) const FLASH_ROWS: usize = 64;

/// One forward's metadata on the device: the integer arrays of the [`BatchPlan`] packed in one
/// buffer and the rotary tables in another (two copies per forward instead of nine). Kernels get
/// the raw addresses of the sub-arrays, which stay valid as long as this value lives.
pub struct CudaBatch {
    _ints: CudaSlice<u32>,
    _floats: CudaSlice<f32>,
    pub(super) num_tokens: usize,
    pub(super) num_seqs: usize,
    /// Tiles of [`FLASH_ROWS`] query rows of one sequence (the prefill attention's blocks).
    pub(super) num_tiles: usize,
    pub(super) num_logits: usize,
    /// The longest context (cached + new tokens) of the batch's sequences.
    pub(super) max_context: usize,
    pub(super) block_size: usize,
    pub(super) rope_half: usize,
    tokens: u64,
    positions: u64,
    token_seq: u64,
    seq_block_start: u64,
    block_tables: u64,
    slot_mapping: u64,
    logits_rows: u64,
    seq_token_start: u64,
    seq_token_count: u64,
    tile_seq: u64,
    tile_row: u64,
    rope_cos: u64,
    rope_sin: u64,
}

impl CudaBatch {
    pub(super) fn upload(stream: &Arc<CudaStream>, plan: &BatchPlan) -> Result<Self, BackendError> {
        let n = plan.num_tokens();
        let mut token_seq = Vec::with_capacity(n);
        for (s, seq) in plan.sequences.iter().enumerate() {
            token_seq.extend(std::iter::repeat_n(s as u32, seq.token_count));
        }
        let seq_block_start: Vec<u32> = plan
            .sequences
            .iter()
            .map(|s| s.block_table_start as u32)
            .collect();
        let slots = plan
            .slot_mapping
            .iter()
            .map(|&s| {
                u32::try_from(s).map_err(|_| BackendError::Shape {
                    op: "prepare_batch",
                    detail: format!("KV slot {s} does not fit the kernels' 32-bit slot index"),
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let seq_token_start: Vec<u32> = plan
            .sequences
            .iter()
            .map(|s| s.token_start as u32)
            .collect();
        let seq_token_count: Vec<u32> = plan
            .sequences
            .iter()
            .map(|s| s.token_count as u32)
            .collect();
        let (mut tile_seq, mut tile_row) = (Vec::new(), Vec::new());
        for (i, seq) in plan.sequences.iter().enumerate() {
            for row in (0..seq.token_count).step_by(FLASH_ROWS) {
                tile_seq.push(i as u32);
                tile_row.push(row as u32);
            }
        }
        let arrays: [&[u32]; 11] = [
            &plan.tokens,
            &plan.positions,
            &token_seq,
            &seq_block_start,
            &plan.block_tables,
            &slots,
            &plan.logits_rows,
            &seq_token_start,
            &seq_token_count,
            &tile_seq,
            &tile_row,
        ];
        let mut ints = Vec::with_capacity(arrays.iter().map(|a| a.len()).sum());
        let mut int_offsets = [0usize; 11];
        for (i, a) in arrays.iter().enumerate() {
            int_offsets[i] = ints.len();
            ints.extend_from_slice(a);
        }
        let mut floats = Vec::with_capacity(plan.rope_cos.len() * 2);
        floats.extend_from_slice(&plan.rope_cos);
        floats.extend_from_slice(&plan.rope_sin);
        let err = |e: cudarc::driver::DriverError| BackendError::Device {
            op: "prepare_batch",
            detail: e.to_string(),
        };
        let ints_dev = stream.clone_htod(&pad(ints)).map_err(err)?;
        let floats_len = plan.rope_cos.len();
        let floats_dev = stream.clone_htod(&pad(floats)).map_err(err)?;
        let ibase = {
            let (p, _sync) = ints_dev.device_ptr(stream);
            p
        };
        let fbase = {
            let (p, _sync) = floats_dev.device_ptr(stream);
            p
        };
        let at = |i: usize| ibase + 4 * int_offsets[i] as u64;
        let max_context = plan
            .sequences
            .iter()
            .map(|s| s.context_len())
            .max()
            .unwrap_or(0);
        // The host vectors were copied synchronously from pageable memory by `clone_htod`
        // before it returned, so they may be dropped here.
        Ok(CudaBatch {
            num_tokens: n,
            num_seqs: plan.sequences.len(),
            num_tiles: tile_seq.len(),
            num_logits: plan.logits_rows.len(),
            max_context,
            block_size: plan.block_size,
            rope_half: plan.rope_half,
            tokens: at(0),
            positions: at(1),
            token_seq: at(2),
            seq_block_start: at(3),
            block_tables: at(4),
            slot_mapping: at(5),
            logits_rows: at(6),
            seq_token_start: at(7),
            seq_token_count: at(8),
            tile_seq: at(9),
            tile_row: at(10),
            rope_cos: fbase,
            rope_sin: fbase + 4 * floats_len as u64,
            _ints: ints_dev,
            _floats: floats_dev,
        })
    }

    pub(super) fn tokens(&self) -> &u64 {
        &self.tokens
    }
    pub(super) fn positions(&self) -> &u64 {
        &self.positions
    }
    pub(super) fn token_seq(&self) -> &u64 {
        &self.token_seq
    }
    pub(super) fn seq_block_start(&self) -> &u64 {
        &self.seq_block_start
    }
    pub(super) fn block_tables(&self) -> &u64 {
        &self.block_tables
    }
    pub(super) fn slot_mapping(&self) -> &u64 {
        &self.slot_mapping
    }
    pub(super) fn logits_rows(&self) -> &u64 {
        &self.logits_rows
    }
    pub(super) fn seq_token_start(&self) -> &u64 {
        &self.seq_token_start
    }
    pub(super) fn seq_token_count(&self) -> &u64 {
        &self.seq_token_count
    }
    pub(super) fn tile_seq(&self) -> &u64 {
        &self.tile_seq
    }
    pub(super) fn tile_row(&self) -> &u64 {
        &self.tile_row
    }
    pub(super) fn rope_cos(&self) -> &u64 {
        &self.rope_cos
    }
    pub(super) fn rope_sin(&self) -> &u64 {
        &self.rope_sin
    }
}

/// Never an empty upload (a zero-length allocation is an error for the driver).
fn pad<T: Default>(mut v: Vec<T>) -> Vec<T> {
    if v.is_empty() {
        v.push(T::default());
    }
    v
}
