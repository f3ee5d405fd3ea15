//! Device memory of the CUDA backend: activations, weights, the KV cache, and one forward's
//! batch metadata.

use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};

use crate::backend::{
    BackendError, DeviceRange, HostTensor, InputScale, KvCacheMemory, KvMemory, WeightDType,
};
use crate::kv_cache::KvLayout;

/// Element storage: f32, or bf16 as its bit pattern (`u16`), or none: rows that a norm or
/// silu_mul wrote only as FP8 codes ([`CudaTensor::fp8`]) for the FP8 projection that reads
/// them, which is all that reads them (their bf16 form would be written and never read).
pub enum DeviceData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Fp8CodesOnly,
}

/// Activations `[rows, cols]`, row-major.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub(super) data: DeviceData,
    /// The rows quantized for an FP8 projection (per token), where the kernel that wrote
    /// `data` made them too: the projection then skips its own quantization.
    pub(super) fp8: Option<Fp8Rows>,
    /// Fused q/k/v rows after the rotary embedding over an FP8 cache, where the warpgroup
    /// prefill kernel runs: the prefill rows' q heads, pre-scaled and in bf16, which that
    /// kernel reads in place of their f32 rows in `data` (left unwritten).
    pub(super) prefill_q: Option<PrefillQuery>,
}

/// The q heads of a batch's prefill rows (`first_row..`) as bf16 of q times the prefill
/// kernel's score scale, `[rows - first_row, num_heads * head_dim]`: the values that kernel
/// rounds f32 q to, written once by `rope_cache_write` at half the bytes.
pub struct PrefillQuery {
    pub(super) first_row: usize,
    pub(super) data: CudaSlice<u16>,
}

/// Activation rows as FP8 e4m3 codes `[rows, cols]` and one f32 scale per row: what
/// `quantize_fp8_rows` makes of bf16 rows with per-token scales.
pub struct Fp8Rows {
    pub(super) codes: CudaSlice<u8>,
    pub(super) scales: CudaSlice<f32>,
}

impl CudaTensor {
    pub(super) fn from_f32(rows: usize, cols: usize, data: CudaSlice<f32>) -> Self {
        CudaTensor {
            rows,
            cols,
            data: DeviceData::F32(data),
            fp8: None,
            prefill_q: None,
        }
    }

    pub(super) fn from_bf16(rows: usize, cols: usize, data: CudaSlice<u16>) -> Self {
        CudaTensor {
            rows,
            cols,
            data: DeviceData::Bf16(data),
            fp8: None,
            prefill_q: None,
        }
    }

    /// Rows held only as their FP8 codes and per-token scales.
    pub(super) fn from_fp8_codes(rows: usize, cols: usize, fp8: Fp8Rows) -> Self {
        CudaTensor {
            rows,
            cols,
            data: DeviceData::Fp8CodesOnly,
            fp8: Some(fp8),
            prefill_q: None,
        }
    }

    /// The rows' bf16 values; `None` where they are held only as FP8 codes; an error for f32.
    pub(super) fn bf16_rows(
        &self,
        op: &'static str,
    ) -> Result<Option<&CudaSlice<u16>>, BackendError> {
        match &self.data {
            DeviceData::Bf16(d) => Ok(Some(d)),
            DeviceData::Fp8CodesOnly => Ok(None),
            DeviceData::F32(_) => Err(BackendError::Shape {
                op,
                detail: "the input must be bf16 (written by a norm, attention or silu_mul)".into(),
            }),
        }
    }

    /// This tensor with its rows' FP8 form (`None`: without).
    pub(super) fn with_fp8(mut self, fp8: Option<Fp8Rows>) -> Self {
        self.fp8 = fp8;
        self
    }

    pub(super) fn as_f32(&self, op: &'static str) -> Result<&CudaSlice<f32>, BackendError> {
        match &self.data {
            DeviceData::F32(d) => Ok(d),
            DeviceData::Bf16(_) | DeviceData::Fp8CodesOnly => Err(not_f32(op)),
        }
    }

    pub(super) fn as_f32_mut(
        &mut self,
        op: &'static str,
    ) -> Result<&mut CudaSlice<f32>, BackendError> {
        match &mut self.data {
            DeviceData::F32(d) => Ok(d),
            DeviceData::Bf16(_) | DeviceData::Fp8CodesOnly => Err(not_f32(op)),
        }
    }
}

fn not_f32(op: &'static str) -> BackendError {
    BackendError::Shape {
        op,
        detail: "expects f32 activations, got bf16 or FP8 codes".into(),
    }
}

/// A weight: matrices in the element type their projections read ([`MatrixData`]), vectors
/// (norm weights, biases) in f32.
pub enum CudaWeight {
    Matrix {
        data: MatrixData,
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
            CudaWeight::Matrix { rows, cols, data } => {
                format!("a {rows}x{cols} {} matrix", data.dtype())
            }
            CudaWeight::Vector { len, .. } => format!("a vector of {len}"),
        }
    }
}

/// A weight matrix's elements on the device, in the type its projections read. The projection
/// (`projection.rs`) matches on it to pick its kernels, so a storage type with kernels of its
/// own (FP8 with its scales) is one more variant here and one more arm there; bf16 is the one
/// the GEMM, GEMV and skinny kernels take, and f32 and f16 files are converted to it at upload.
pub enum MatrixData {
    /// bf16 elements as their bit patterns.
    Bf16(CudaSlice<u16>),
    /// FP8 e4m3 codes with one f32 scale per row, and how the input is quantized (`fp8.cu`,
    /// `fp8_gemm.rs`).
    Fp8 {
        codes: CudaSlice<u8>,
        row_scales: CudaSlice<f32>,
        input: InputScale,
    },
}

impl MatrixData {
    /// The element type held.
    pub fn dtype(&self) -> WeightDType {
        match self {
            MatrixData::Bf16(_) => WeightDType::Bf16,
            MatrixData::Fp8 { .. } => WeightDType::F8E4M3,
        }
    }

    /// Bytes on the device.
    pub fn size_bytes(&self) -> usize {
        match self {
            MatrixData::Bf16(data) => data.len() * 2,
            MatrixData::Fp8 {
                codes, row_scales, ..
            } => codes.len() + row_scales.len() * 4,
        }
    }

    /// The device address of the first element, for reads that do not care about the type (an
    /// L2 prefetch of the weight's first bytes).
    pub(super) fn device_ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            MatrixData::Bf16(data) => data.device_ptr(stream).0,
            MatrixData::Fp8 { codes, .. } => codes.device_ptr(stream).0,
        }
    }
}

/// Converts `parts` (concatenated along dimension 0) and copies them to the device; FP8
/// matrices stay FP8 where `fp8` holds (the GPU has FP8 tensor cores), and are refused where
/// it does not.
pub(super) fn upload_weight(
    stream: &Arc<CudaStream>,
    parts: &[HostTensor<'_>],
    fp8: Result<(), String>,
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
        2 if first.dtype == WeightDType::F8E4M3 => {
            fp8.map_err(|detail| BackendError::Device {
                op: "upload_weight (fp8)",
                detail,
            })?;
            let fused = crate::backend::fp8::fuse(parts)?;
            if fused.input == InputScale::Unquantized {
                return Err(BackendError::Device {
                    op: "upload_weight (fp8)",
                    detail: "a weight-only FP8 checkpoint (no input_activations): the CUDA \
                             backend runs FP8 weights with FP8 activations only; run it on the \
                             CPU, or quantize it with activations (model-prep quantize)"
                        .into(),
                });
            }
            Ok(CudaWeight::Matrix {
                data: MatrixData::Fp8 {
                    codes: stream.clone_htod(&fused.codes).map_err(upload_err)?,
                    row_scales: stream.clone_htod(&fused.row_scales).map_err(upload_err)?,
                    input: fused.input,
                },
                rows,
                cols: first.shape[1],
            })
        }
        2 => {
            let cols = first.shape[1];
            let mut host = Vec::with_capacity(rows * cols);
            for p in parts {
                extend_bf16_bits(&mut host, p);
            }
            let data = stream.clone_htod(&host).map_err(upload_err)?;
            Ok(CudaWeight::Matrix {
                data: MatrixData::Bf16(data),
                rows,
                cols,
            })
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
        WeightDType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        WeightDType::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WeightDType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        // Vectors are never FP8 (checked at load); dequantized should one come.
        WeightDType::F8E4M3 => b
            .iter()
            .enumerate()
            .map(|(i, &c)| WeightDType::F8E4M3.decode(&[c]) * t.row_scale(i))
            .collect(),
    }
}

fn extend_bf16_bits(out: &mut Vec<u16>, t: &HostTensor<'_>) {
    let b = t.bytes;
    match t.dtype {
        WeightDType::Bf16 => {
            out.extend(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
        }
        WeightDType::F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits()),
        ),
        WeightDType::F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()).to_bits()),
        ),
        // FP8 matrices are uploaded as FP8; a bf16 copy of one (a mixed upload) dequantizes.
        WeightDType::F8E4M3 => {
            let cols = t.shape.get(1).copied().unwrap_or(1).max(1);
            out.extend(b.iter().enumerate().map(|(i, &c)| {
                bf16::from_f32(WeightDType::F8E4M3.decode(&[c]) * t.row_scale(i / cols)).to_bits()
            }))
        }
    }
}

/// The paged KV cache: `num_blocks` blocks of `layout` (bf16) in one device allocation
/// (`cuMemAlloc`, so that CUDA IPC can share it), plus the scratch block after them
/// (`scratch_block`), then the export slab ([`KvCacheMemory`]).
pub struct CudaKvCache {
    pub(super) layout: KvLayout,
    /// Blocks handed to sequences (the scratch block not counted).
    pub(super) num_blocks: usize,
    /// Freed by `Drop` with `cuMemFree` (the slice's own drop would free it stream-ordered,
    /// which is for memory of the stream-ordered allocator only).
    /// The cache's bytes as 16-bit words (bf16 elements, or two FP8 codes each).
    pub(super) data: ManuallyDrop<CudaSlice<u16>>,
    /// The cache as a TMA tensor map in device memory (`flash_wgmma.cu` copies its tiles with
    /// it), where the kernels and the layout allow one; else 128 zero bytes.
    pub(super) tensor_map: CudaSlice<u64>,
    pub(super) has_tensor_map: bool,
}

impl Drop for CudaKvCache {
    fn drop(&mut self) {
        // SAFETY: taken once, here.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        let stream = Arc::clone(data.stream());
        // The stream's last kernels may still read the cache.
        let _ = stream.synchronize();
        let ptr = data.leak();
        // SAFETY: allocated by `malloc_sync` in `alloc_kv_cache`, freed once, after the stream
        // that used it is idle.
        if let Err(e) = unsafe { cudarc::driver::result::free_sync(ptr) } {
            tracing::debug!("freeing the KV cache: {e}");
        }
    }
}

impl CudaKvCache {
    /// Range of `block` in the cache's 16-bit words, checking that `bytes` is one block's size.
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
        let words = self.layout.block_bytes() / 2;
        let start = block as usize * words;
        Ok(start..start + words)
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

    /// Where the cache lies: its blocks, the scratch block, then the export slab.
    pub fn memory(&self, stream: &CudaStream) -> KvCacheMemory {
        let block_bytes = self.layout.block_bytes();
        let (ptr, _sync) = self.data.device_ptr(stream);
        KvCacheMemory {
            memory: KvMemory::Device(DeviceRange {
                ptr,
                len: self.data.len() * 2,
            }),
            block_bytes,
            num_blocks: self.num_blocks,
            slab_offset: (self.num_blocks + 1) * block_bytes,
        }
    }

    /// The block after the last usable one, never handed out: the dummy sequences that pad a
    /// CUDA-graph decode step write their K/V there. It is allocated with the cache
    /// (`alloc_kv_cache` allocates `num_blocks + 1` blocks); before, it was one block past the
    /// allocation, and the dummies' writes corrupted whatever the driver had put after the
    /// cache (graph metadata among it: `CUDA_ERROR_ILLEGAL_ADDRESS` in paged attention).
    pub(super) fn scratch_block(&self) -> u32 {
        self.num_blocks as u32
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CudaBackend, CudaOptions, driver_present};
    use crate::backend::Backend;
    use crate::kv_cache::{KvDType, KvLayout};

    /// The dummies of a padded graph step write the scratch block: it must be memory of the
    /// cache, never one of the blocks handed to sequences.
    #[test]
    fn the_scratch_block_lies_inside_the_cache_allocation() {
        if !driver_present() {
            tandem_test_skip::skip("no CUDA driver on this machine");
            return;
        }
        let backend = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            dtype: KvDType::Bf16,
        };
        let kv = backend.alloc_kv_cache(&layout, 3).unwrap();
        assert_eq!(backend.kv_cache_blocks(&kv), 3);
        let scratch = kv.scratch_block() as usize;
        assert!(
            scratch >= 3,
            "the scratch block {scratch} is handed to sequences"
        );
        assert!(
            (scratch + 1) * layout.block_elems() <= kv.data.len(),
            "the scratch block {scratch} ends past the cache's {} elements",
            kv.data.len()
        );
    }
}
