//! Projections of decode batches on Hopper through `skinny.cu`'s warpgroup GEMM: the launch
//! (tensor maps, the split of K, the width) and the choice between it and cuBLAS.
//!
//! Why a kernel of our own: at 5..256 rows a projection is memory-bound (the weight is read
//! once per step), and cuBLAS ran Llama-3.1-8B's at 1.1-2.6 TB/s of weight bytes on the H100
//! against a ~3.0 TB/s copy ceiling (docs/benchmarks.md).
//!
//! Graph capture: the two TMA tensor maps are passed by value as kernel parameters, which a
//! captured kernel node keeps. The activation's is encoded on the host at each call (a host
//! function of the buffer's address and shape, no device work); a weight's once, at its first
//! projection, and kept by its address and shape ([`WeightMaps`]: the map is a pure function
//! of those, so a later buffer at the same address with the same shape gets the same, right
//! map). The partial sums of a split K come from the stream's allocator like every
//! activation; the per-tile counters are one buffer of the backend, left zero by every launch.

use std::collections::HashMap;
use std::sync::Mutex;

use super::launch::{KernelParam, PushArg};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::kernels::{SKINNY_FEATURES, SKINNY_THREADS, SKINNY_WIDTHS, skinny_smem_bytes};
use super::tma::TmaElement;
use super::{CudaBackend, device_error};
use crate::backend::BackendError;

/// Tiles of 128 outputs whose K may be split (one counter each; wider weights have blocks
/// enough without a split).
pub(super) const SKINNY_COUNTERS: usize = 1024;

/// A TMA tensor map as a kernel parameter (`TmaMap` in skinny.cu: `CUtensorMap`'s 128 bytes,
/// 128-byte aligned as CUDA 13 declares it).
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub(super) struct TmaParam([u64; 16]);

// SAFETY: plain bytes with the size and alignment of the kernel's `TmaMap` parameter.
unsafe impl KernelParam for TmaParam {}

/// Weights' tensor maps by (device address, element type, outputs, inputs); `None`: the
/// driver refused one (cuBLAS runs that weight).
#[derive(Default)]
pub(super) struct WeightMaps(Mutex<HashMap<WeightKey, Option<TmaParam>>>);

/// A weight's device address, element type, outputs and inputs.
type WeightKey = (u64, TmaElement, usize, usize);

impl WeightMaps {
    fn get(&self, element: TmaElement, ptr: u64, n: usize, k: usize) -> Option<TmaParam> {
        let mut maps = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *maps
            .entry((ptr, element, n, k))
            .or_insert_with(|| tensor_map_2d(element, ptr, n, k, SKINNY_FEATURES))
    }
}

/// The narrowest instantiated width (wgmma's N) that holds `rows`.
pub(super) fn width_for(rows: usize) -> Option<(usize, usize)> {
    SKINNY_WIDTHS
        .iter()
        .enumerate()
        .find(|&(_, &w)| w >= rows)
        .map(|(i, &w)| (i, w))
}

/// Most bytes of partial sums a split launch may take from the allocator.
const SKINNY_MAX_PARTIAL_BYTES: usize = 64 << 20;

/// Splits of K over blocks for a weight of `tiles` tiles of 128 outputs and `k_steps` steps of
/// 64 inputs, at `width` (wgmma's N: the rows rounded up), on `sms` multiprocessors (one block
/// each). A model of the time: waves of blocks times each block's bytes (its W and x tiles,
/// its partial tile written and read back when split, and 32 KiB for the pipeline's fill),
/// minimized over 1..=16 splits of at least 4 steps each, within SKINNY_MAX_PARTIAL_BYTES;
/// `fixed` (tuning) takes the place of the model, within the same bounds. Returns (splits,
/// steps a split), with no split empty.
pub fn skinny_splits(
    tiles: usize,
    k_steps: usize,
    width: usize,
    sms: usize,
    fixed: Option<usize>,
) -> (usize, usize) {
    let sms = sms.max(1);
    let most = if tiles > SKINNY_COUNTERS {
        1
    } else {
        (k_steps / 4).clamp(1, 16)
    };
    let fits =
        |s: usize| s == 1 || s * tiles * SKINNY_FEATURES * width * 4 <= SKINNY_MAX_PARTIAL_BYTES;
    let cost = |s: usize| {
        let steps = k_steps.div_ceil(s);
        let tile_bytes = steps * 64 * 2 * (SKINNY_FEATURES + width);
        let partial_bytes = if s > 1 {
            2 * SKINNY_FEATURES * width * 4
        } else {
            0
        };
        (tiles * s).div_ceil(sms) * (tile_bytes + partial_bytes + (32 << 10))
    };
    let best = match fixed {
        Some(s) => Some(s.clamp(1, most)).filter(|&s| fits(s)).unwrap_or(1),
        None => (1..=most)
            .filter(|&s| fits(s))
            .min_by_key(|&s| cost(s))
            .unwrap_or(1),
    };
    let per = k_steps.div_ceil(best).max(1);
    (k_steps.div_ceil(per).max(1), per)
}

/// `rows x cols` `element`s, row-major at `ptr`, as a 2-D TMA tensor map: boxes of 128 bytes
/// of columns (64 bf16, 128 FP8 codes) by `box_rows` rows in the 128-byte swizzle, zero fill
/// past the edges. `None` where the driver refuses it (an address or row pitch not 16-byte
/// aligned).
fn tensor_map_2d(
    element: TmaElement,
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: usize,
) -> Option<TmaParam> {
    super::tma::encode_swizzled(
        element,
        ptr,
        &[cols as u64, rows as u64],
        &[cols as u64 * element.bytes()],
        &[(128 / element.bytes()) as u32, box_rows as u32],
    )
    .map(TmaParam)
    .map_err(|result| {
        tracing::debug!(
            ?result,
            rows,
            cols,
            "no TMA tensor map: the projection uses cuBLAS"
        )
    })
    .ok()
}

impl CudaBackend {
    /// Whether a projection of `rows` rows, `n` outputs and `k` inputs runs `skinny.cu`: on,
    /// compiled for `sm_90a`, more rows than the GEMV kernel takes and at most
    /// [`SKINNY_DISPATCH_ROWS`](super::kernels::SKINNY_DISPATCH_ROWS) (or the wide limit for
    /// vocabulary heads), `k` a multiple of 8 (TMA's 16-byte row pitch).
    pub(super) fn skinny_applies(&self, rows: usize, n: usize, k: usize, gemv_rows: usize) -> bool {
        use super::kernels::{
            SKINNY_DISPATCH_ROWS, SKINNY_WIDE_DISPATCH_ROWS, SKINNY_WIDE_OUTPUTS,
        };
        let max_rows = if self.switches.skinny_everywhere() {
            super::kernels::SKINNY_MAX_ROWS
        } else if n >= SKINNY_WIDE_OUTPUTS {
            SKINNY_WIDE_DISPATCH_ROWS
        } else {
            SKINNY_DISPATCH_ROWS
        };
        self.switches.skinny_gemm()
            && self.kernels.skinny.is_some()
            && rows > gemv_rows
            && rows <= max_rows
            && k.is_multiple_of(8)
    }

    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ` through `skinny.cu`. `Ok(false)`: not launched
    /// (a tensor map the driver refused), the caller uses cuBLAS.
    pub(super) fn skinny_linear(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<bool, BackendError> {
        if x.len() < rows * k || w.len() < n * k || out.len() < rows * n {
            return Err(BackendError::Shape {
                op: "linear",
                detail: format!("buffers too small for [{rows}x{k}]·[{n}x{k}]ᵀ"),
            });
        }
        let ptr = |s: &CudaSlice<u16>| s.device_ptr(&self.stream).0;
        let operands = SkinnyOperands {
            element: TmaElement::Bf16,
            x: ptr(x),
            w: ptr(w),
            scales: None,
        };
        self.skinny_launch(self.kernels.skinny.as_deref(), &operands, out, rows, n, k)
    }

    /// Whether an FP8 projection of `rows` rows, `n` outputs and `k` inputs runs `skinny.cu`'s
    /// FP8 kernel: on ([`CudaOptions::skinny_fp8`](super::CudaOptions::skinny_fp8)), compiled
    /// for `sm_90a`, more rows than the FP8 GEMV takes and at most
    /// [`SKINNY_FP8_DISPATCH_ROWS`](super::kernels::SKINNY_FP8_DISPATCH_ROWS) (or
    /// [`SKINNY_MAX_ROWS`](super::kernels::SKINNY_MAX_ROWS) with `skinny_everywhere`), `k` a
    /// multiple of 16 (TMA's 16-byte row pitch of the codes).
    pub(super) fn skinny_fp8_applies(&self, rows: usize, k: usize) -> bool {
        use super::kernels::{SKINNY_FP8_DISPATCH_ROWS, SKINNY_MAX_ROWS};
        let max_rows = if self.switches.skinny_everywhere() {
            SKINNY_MAX_ROWS
        } else {
            SKINNY_FP8_DISPATCH_ROWS
        };
        self.switches.skinny_fp8()
            && self.kernels.skinny_fp8.is_some()
            && !self.fp8_gemv_applies(rows, k)
            && (1..=max_rows).contains(&rows)
            && k.is_multiple_of(16)
    }

    /// `out[rows, n] = (x_codes[rows, k] · w_codes[n, k]ᵀ) · x_scales[row] · w_scales[n]`
    /// through `skinny.cu`'s FP8 kernel. `Ok(false)`: not launched (a tensor map the driver
    /// refused), the caller uses cuBLASLt.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn skinny_fp8_linear(
        &self,
        x_codes: &CudaSlice<u8>,
        x_scales: &CudaSlice<f32>,
        w_codes: &CudaSlice<u8>,
        w_scales: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<bool, BackendError> {
        if x_codes.len() < rows * k
            || x_scales.len() < rows
            || w_codes.len() < n * k
            || w_scales.len() < n
            || out.len() < rows * n
        {
            return Err(BackendError::Shape {
                op: "linear (fp8)",
                detail: format!("buffers too small for [{rows}x{k}]·[{n}x{k}]ᵀ"),
            });
        }
        let ptr = |s: &CudaSlice<u8>| s.device_ptr(&self.stream).0;
        let scale_ptr = |s: &CudaSlice<f32>| s.device_ptr(&self.stream).0;
        let operands = SkinnyOperands {
            element: TmaElement::Byte,
            x: ptr(x_codes),
            w: ptr(w_codes),
            scales: Some((scale_ptr(x_scales), scale_ptr(w_scales))),
        };
        self.skinny_launch(
            self.kernels.skinny_fp8.as_deref(),
            &operands,
            out,
            rows,
            n,
            k,
        )
    }

    /// One launch of a `skinny.cu` kernel of `family` (by width) on `operands`, whose buffers
    /// the caller checked to hold `[rows, k]` and `[n, k]` (and their scales).
    fn skinny_launch(
        &self,
        family: Option<&[(usize, cudarc::driver::CudaFunction)]>,
        operands: &SkinnyOperands,
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<bool, BackendError> {
        let Some(kernels) = family else {
            return Ok(false);
        };
        let Some((index, width)) = width_for(rows) else {
            return Ok(false);
        };
        let element = operands.element;
        let (wmap, xmap) = match (
            self.skinny_weight_maps.get(element, operands.w, n, k),
            tensor_map_2d(element, operands.x, rows, k, width),
        ) {
            (Some(wm), Some(xm)) => (wm, xm),
            _ => return Ok(false),
        };
        let tiles = n.div_ceil(SKINNY_FEATURES);
        // A step is 128 bytes of every row: 64 bf16 inputs or 128 FP8 codes.
        let k_steps = k.div_ceil(128 / element.bytes() as usize);
        let (splits, per) = skinny_splits(
            tiles,
            k_steps,
            width,
            self.multiprocessors,
            self.options.skinny_splits,
        );
        // One split writes `out` directly; the partials buffer is then not read.
        let partial_len = if splits > 1 {
            splits * tiles * SKINNY_FEATURES * width
        } else {
            1
        };
        let mut partial = self.alloc_f32(partial_len)?;
        let (m, n32, steps32, splits32, per32) = (
            rows as i32,
            n as i32,
            k_steps as i32,
            splits as i32,
            per as i32,
        );
        let mut b = self.kernel_args(&kernels[index].1);
        b.arg(&wmap)
            .arg(&xmap)
            .arg(out)
            .arg(&mut partial)
            .arg(&self.skinny_counters)
            .arg(&m)
            .arg(&n32)
            .arg(&steps32)
            .arg(&splits32)
            .arg(&per32);
        if let Some((x_scales, w_scales)) = &operands.scales {
            b.arg(x_scales).arg(w_scales);
        }
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, splits as u32, 1),
            block_dim: (SKINNY_THREADS, 1, 1),
            shared_mem_bytes: skinny_smem_bytes(width) as u32,
        };
        // SAFETY: the arguments are the kernel's (skinny.cu's SKINNY_KERNEL: the FP8 kernels
        // take the two scale pointers after the others); the tensor maps describe `w` ([n, k])
        // and `x` ([rows, k]) of the element type the family reads, which the callers checked
        // to hold those shapes (and the scales n and rows values); `out` holds rows x n,
        // `partial` splits x tiles x 128 x width where split, and the counters one per tile
        // (`skinny_splits` splits only up to SKINNY_COUNTERS tiles).
        unsafe { b.launch(cfg, self.programmatic_launch) }
            .map_err(|e| device_error("skinny gemm", &e))?;
        Ok(true)
    }
}

/// The device addresses a `skinny.cu` launch reads.
struct SkinnyOperands {
    element: TmaElement,
    /// `[rows, k]`, row-major.
    x: u64,
    /// `[n, k]`, row-major.
    w: u64,
    /// FP8: the rows' scales (`rows` f32) and the weight's (`n` f32).
    scales: Option<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_round_rows_up() {
        assert_eq!(width_for(5), Some((0, 16)));
        assert_eq!(width_for(16), Some((0, 16)));
        assert_eq!(width_for(17), Some((1, 32)));
        assert_eq!(width_for(65), Some((3, 96)));
        assert_eq!(width_for(129), Some((5, 192)));
        assert_eq!(width_for(256), Some((6, 256)));
        assert_eq!(width_for(257), None);
    }

    #[test]
    fn splits_fill_the_multiprocessors_without_empty_splits() {
        // Llama-3.1-8B on 132 SMs at 32 rows: o (4096 x 4096) and down (4096 x 14336) split
        // 4 ways, one wave of 128 blocks; qkv (6144 outputs) 5; gate_up (28672: 224 tiles,
        // 1.7 waves) and lm_head not at all.
        assert_eq!(skinny_splits(32, 64, 32, 132, None), (4, 16));
        assert_eq!(skinny_splits(32, 224, 32, 132, None), (4, 56));
        assert_eq!(skinny_splits(48, 64, 32, 132, None), (5, 13));
        assert_eq!(skinny_splits(224, 64, 32, 132, None), (1, 64));
        assert_eq!(skinny_splits(1002, 64, 32, 132, None), (1, 64));
        // At 16 rows gate_up's tail wave costs more than its partial tiles; at 256 rows
        // qkv's partial tiles cost more than 5 splits gain.
        assert_eq!(skinny_splits(224, 64, 16, 132, None), (4, 16));
        assert_eq!(skinny_splits(48, 64, 256, 132, None), (2, 32));
        assert_eq!(skinny_splits(32, 64, 256, 132, None), (4, 16));
        for tiles in 1..300 {
            for k_steps in 1..100 {
                for width in [16, 256] {
                    let (splits, per) = skinny_splits(tiles, k_steps, width, 132, None);
                    let (fixed, fixed_per) = skinny_splits(tiles, k_steps, width, 132, Some(3));
                    assert!((fixed - 1) * fixed_per < k_steps && fixed * fixed_per >= k_steps);
                    assert!(fixed <= 3);
                    assert!(splits >= 1 && per >= 1);
                    // Every split has a step, and together they cover K.
                    assert!((splits - 1) * per < k_steps && splits * per >= k_steps);
                    assert!(
                        splits == 1 || splits * tiles * 128 * width * 4 <= SKINNY_MAX_PARTIAL_BYTES
                    );
                }
            }
        }
    }
}
