//! Every algorithm configuration cuBLASLt accepts for one scaled FP8 product, each timed on the
//! device: a benchmark (`gpu_bench fp8-tactics`) of what the projections run, the heuristic's
//! answer, against what else the library holds.
//!
//! Why: with vector scales the heuristic answers with a single algorithm for each of
//! Llama-3.1-8B's projection shapes (128x128 tiles, no thread-block cluster), so asking it for
//! more chooses nothing. The library has more configurations than it offers: each algorithm id
//! (`cublasLtMatmulAlgoGetIds`) with each of its tiles and stages (its capabilities) and a
//! cluster shape, as `cublasLtMatmulAlgoCheck` accepts them. TensorRT-LLM times its GEMM
//! tactics per shape when it builds an engine; this measures whether such a choice would pay
//! here before the projections are given one.

use std::ffi::c_void;
use std::mem::MaybeUninit;

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::super::gemm::{algo_check, cluster_shape, config_value, set_config_value};
use super::{
    Descriptors, Fp8Gemm, Fp8Operands, Shape, WORKSPACE_BYTES, check, choose, err,
    set_scale_pointers, y_type,
};
use crate::backend::BackendError;
use crate::backend::cuda::CudaBackend;

/// The most configurations timed for one shape, and for one algorithm id of it (so that the
/// ids listed last are reached too).
const MOST_TACTICS: usize = 400;
const MOST_PER_ALGORITHM: usize = 48;

/// Cluster shapes tried with each tile and stages: one block, two along either dimension.
const CLUSTERS: [lt_sys::cublasLtClusterShape_t; 3] = [
    lt_sys::cublasLtClusterShape_t::CUBLASLT_CLUSTER_SHAPE_1x1x1,
    lt_sys::cublasLtClusterShape_t::CUBLASLT_CLUSTER_SHAPE_2x1x1,
    lt_sys::cublasLtClusterShape_t::CUBLASLT_CLUSTER_SHAPE_1x2x1,
];

/// One configuration of a product and what it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Tactic {
    /// cuBLASLt's algorithm id (`CUBLASLT_ALGO_CONFIG_ID`).
    pub algo_id: i32,
    /// `cublasLtMatmulTile_t`, `cublasLtMatmulStages_t` and `cublasLtClusterShape_t` ids.
    pub tile: u32,
    pub stages: u32,
    pub cluster: u64,
    /// The heuristic's answer: what the projections run.
    pub heuristic: bool,
    /// Median seconds of one product.
    pub seconds: f64,
    /// Relative L2 of its result against the heuristic's, over a sample of the result's
    /// start, middle and end (a configuration that runs but computes something else shows
    /// here).
    pub rel_l2: f64,
}

impl CudaBackend {
    /// Times every configuration cuBLASLt accepts for the scaled FP8 product
    /// `y[rows, n] = xs * ws * (x[rows, k] · w[n, k]ᵀ)` of these operands (`iters` runs each,
    /// the median), the heuristic's first; configurations that fail to launch are left out.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gemm_tactics(
        &self,
        x: &CudaSlice<u8>,
        x_scales: &CudaSlice<f32>,
        w: &CudaSlice<u8>,
        w_scales: &CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
        iters: usize,
    ) -> Result<Vec<Fp8Tactic>, BackendError> {
        let gemm = self.fp8_gemm.as_ref().ok_or_else(|| BackendError::Device {
            op: "fp8 tactics",
            detail: "this GPU has no FP8 tensor cores (compute capability 8.9+)".into(),
        })?;
        let ops = Fp8Operands {
            x,
            x_scales,
            w,
            w_scales,
        };
        let mut y = dev!("fp8 tactics", self.stream.alloc_zeros::<u16>(rows * n))?;
        gemm.time_tactics(&ops, &mut y, rows, k, n, iters.max(1))
    }
}

impl Fp8Gemm {
    fn time_tactics(
        &self,
        ops: &Fp8Operands<'_>,
        y: &mut CudaSlice<u16>,
        rows: usize,
        k: usize,
        n: usize,
        iters: usize,
    ) -> Result<Vec<Fp8Tactic>, BackendError> {
        check(ops, y.len(), rows, k, n)?;
        let inner = self.lock();
        let shape = Shape {
            rows,
            k,
            n,
            scaled: true,
        };
        let descs = Descriptors::new(shape, self.fast_accum).map_err(|e| err(e.to_string()))?;
        let (xsp, _sxs) = ops.x_scales.device_ptr(&self.stream);
        let (wsp, _sws) = ops.w_scales.device_ptr(&self.stream);
        // SAFETY: a live descriptor; the scales are live device buffers.
        unsafe { set_scale_pointers(descs.matmul, wsp, xsp) }.map_err(err)?;
        // SAFETY: live handle and descriptors.
        let heuristic = unsafe { choose(inner.handle, &descs, self.cluster_free) }.map_err(err)?;
        let mut candidates = vec![(heuristic, true)];
        // SAFETY: live handle and descriptors.
        let others = unsafe { configurations(inner.handle, &descs, shape.scaled) }.map_err(err)?;
        candidates.extend(others.into_iter().map(|algo| (algo, false)));

        let ctx = self.stream.context();
        let mut reference: Option<Vec<f32>> = None;
        let mut timed = Vec::new();
        for (algo, is_heuristic) in candidates {
            // Twice untimed (the first may load the kernel), then `iters` times one by one.
            let layouts = [descs.a, descs.b, descs.c];
            let yp = {
                let (yp, _sy) = y.device_ptr_mut(&self.stream);
                yp
            };
            let product = || self.matmul_with(inner.handle, descs.matmul, layouts, &algo, ops, yp);
            if (0..2).any(|_| product().is_err()) {
                continue;
            }
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let start = dev!(
                    "fp8 tactics",
                    ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                )?;
                let end = dev!(
                    "fp8 tactics",
                    ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                )?;
                dev!("fp8 tactics", start.record(&self.stream))?;
                product()?;
                dev!("fp8 tactics", end.record(&self.stream))?;
                dev!("fp8 tactics", end.synchronize())?;
                times.push(dev!("fp8 tactics", start.elapsed_ms(&end))? as f64 / 1e3);
            }
            times.sort_by(f64::total_cmp);
            let mut values = Vec::new();
            for range in sample_ranges(y.len()) {
                let part = dev!("fp8 tactics", self.stream.clone_dtoh(&y.slice(range)))?;
                values.extend(part.into_iter().map(|b| half::bf16::from_bits(b).to_f32()));
            }
            let rel_l2 = reference.as_ref().map_or(0.0, |r| relative_l2(&values, r));
            if reference.is_none() {
                reference = Some(values);
            }
            timed.push(Fp8Tactic {
                algo_id: config_value(&algo, ConfigAttr::CUBLASLT_ALGO_CONFIG_ID).unwrap_or(0)
                    as i32,
                tile: config_value(&algo, ConfigAttr::CUBLASLT_ALGO_CONFIG_TILE_ID).unwrap_or(0)
                    as u32,
                stages: config_value(&algo, ConfigAttr::CUBLASLT_ALGO_CONFIG_STAGES_ID).unwrap_or(0)
                    as u32,
                cluster: cluster_shape(&algo).unwrap_or(0),
                heuristic: is_heuristic,
                seconds: times[times.len() / 2],
                rel_l2,
            });
        }
        Ok(timed)
    }

    /// One product of `ops` into `yp` by `algo`, with `matmul`'s attributes and the layouts
    /// of A (the weight), B (the activation) and C = D (the result).
    pub(super) fn matmul_with(
        &self,
        handle: lt_sys::cublasLtHandle_t,
        matmul: lt_sys::cublasLtMatmulDesc_t,
        [a, b, c]: [lt_sys::cublasLtMatrixLayout_t; 3],
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        ops: &Fp8Operands<'_>,
        yp: u64,
    ) -> Result<(), BackendError> {
        let (xp, _sx) = ops.x.device_ptr(&self.stream);
        let (wp, _sw) = ops.w.device_ptr(&self.stream);
        let (workspace, _sws) = self.workspace.device_ptr(&self.stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: live handle, descriptors and buffers of the sizes `check` saw; the
        // workspace holds WORKSPACE_BYTES, which `configurations` held each algorithm to.
        unsafe {
            lt::matmul(
                handle,
                matmul,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                wp as *const c_void,
                a,
                xp as *const c_void,
                b,
                yp as *const c_void,
                c,
                yp as *mut c_void,
                c,
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream().cast(),
            )
        }
        .map_err(|e| err(format!("a tactic's product: {e}")))
    }
}

type ConfigAttr = lt_sys::cublasLtMatmulAlgoConfigAttributes_t;

/// Every (algorithm id, tile, stages, cluster shape) cuBLASLt accepts for `descs` (a bf16
/// result where `scaled`, else f32) with a workspace of at most WORKSPACE_BYTES, up to
/// [`MOST_PER_ALGORITHM`] an id and [`MOST_TACTICS`] in all.
///
/// # Safety
/// `handle` and `descs` must be live.
pub(super) unsafe fn configurations(
    handle: lt_sys::cublasLtHandle_t,
    descs: &Descriptors,
    scaled: bool,
) -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>, String> {
    use lt_sys::cudaDataType_t as T;
    let compute = lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let types = (
        T::CUDA_R_32F,
        T::CUDA_R_8F_E4M3,
        T::CUDA_R_8F_E4M3,
        y_type(scaled),
    );
    let mut ids = [0i32; 256];
    let mut count = 0i32;
    // SAFETY: a live handle; `ids` holds the count asked for.
    unsafe {
        lt_sys::cublasLtMatmulAlgoGetIds(
            handle,
            compute,
            types.0,
            types.1,
            types.2,
            types.3,
            types.3,
            ids.len() as i32,
            ids.as_mut_ptr(),
            &mut count,
        )
    }
    .result()
    .map_err(|e| format!("cublasLtMatmulAlgoGetIds: {e}"))?;
    let mut accepted = Vec::new();
    for &id in &ids[..count.clamp(0, ids.len() as i32) as usize] {
        let mut algo = MaybeUninit::<lt_sys::cublasLtMatmulAlgo_t>::zeroed();
        // SAFETY: a live handle; `algo` is written on success.
        let init = unsafe {
            lt_sys::cublasLtMatmulAlgoInit(
                handle,
                compute,
                types.0,
                types.1,
                types.2,
                types.3,
                types.3,
                id,
                algo.as_mut_ptr(),
            )
        };
        if init != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            continue;
        }
        // SAFETY: written by the successful init.
        let algo = unsafe { algo.assume_init() };
        let or_undefined = |ids: Vec<u32>| if ids.is_empty() { vec![0] } else { ids };
        let tiles = or_undefined(capability_u32s(&algo, CapAttr::CUBLASLT_ALGO_CAP_TILE_IDS));
        let stages = or_undefined(capability_u32s(
            &algo,
            CapAttr::CUBLASLT_ALGO_CAP_STAGES_IDS,
        ));
        let mut of_this_id = 0;
        for &tile in &tiles {
            for &stage in &stages {
                for cluster in CLUSTERS {
                    if of_this_id == MOST_PER_ALGORITHM {
                        break;
                    }
                    let mut candidate = algo;
                    let set = [
                        (ConfigAttr::CUBLASLT_ALGO_CONFIG_TILE_ID, u64::from(tile)),
                        (ConfigAttr::CUBLASLT_ALGO_CONFIG_STAGES_ID, u64::from(stage)),
                        (
                            ConfigAttr::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
                            cluster as u64,
                        ),
                    ]
                    .into_iter()
                    .all(|(attr, value)| set_config_value(&mut candidate, attr, value).is_ok());
                    // SAFETY: live handle and descriptors.
                    if set && unsafe { accepts(handle, descs, &candidate) } {
                        accepted.push(candidate);
                        of_this_id += 1;
                        if accepted.len() == MOST_TACTICS {
                            return Ok(accepted);
                        }
                    }
                }
            }
        }
    }
    Ok(accepted)
}

type CapAttr = lt_sys::cublasLtMatmulAlgoCapAttributes_t;

/// An array capability of `algo` (tile or stages ids), empty where it has none.
fn capability_u32s(algo: &lt_sys::cublasLtMatmulAlgo_t, attr: CapAttr) -> Vec<u32> {
    let mut bytes = 0usize;
    // SAFETY: a size query (no buffer written) of a live algorithm.
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoCapGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut bytes)
    };
    if status != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || bytes == 0 {
        return Vec::new();
    }
    let mut ids = vec![0u32; bytes.div_ceil(4)];
    let mut written = 0usize;
    // SAFETY: `ids` holds `bytes` bytes.
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoCapGetAttribute(
            algo,
            attr,
            ids.as_mut_ptr().cast(),
            bytes,
            &mut written,
        )
    };
    if status != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Vec::new();
    }
    ids.truncate(written / 4);
    ids
}

/// Whether cuBLASLt runs `descs` by `algo` with at most WORKSPACE_BYTES of workspace.
///
/// # Safety
/// `handle` and `descs` must be live.
unsafe fn accepts(
    handle: lt_sys::cublasLtHandle_t,
    descs: &Descriptors,
    algo: &lt_sys::cublasLtMatmulAlgo_t,
) -> bool {
    // SAFETY: live handle, descriptors and algorithm.
    unsafe { algo_check(handle, descs.matmul, [descs.a, descs.b, descs.c], algo) }.is_some_and(
        |result| {
            result.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.workspaceSize <= WORKSPACE_BYTES
        },
    )
}

/// Elements of a result compared with the reference's at each of its start, middle and end:
/// a configuration that skips or misplaces tiles shows there, without copying and comparing
/// hundreds of MB a configuration.
const SAMPLE: usize = 1 << 20;

/// The ranges of a result of `len` elements that are compared ([`SAMPLE`] at its start,
/// middle and end; the whole where it is shorter than three of them).
fn sample_ranges(len: usize) -> Vec<std::ops::Range<usize>> {
    if len <= 3 * SAMPLE {
        return std::iter::once(0..len).collect();
    }
    let middle = (len - SAMPLE) / 2;
    vec![0..SAMPLE, middle..middle + SAMPLE, len - SAMPLE..len]
}

/// ‖a − b‖ / ‖b‖.
fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += f64::from(x - y).powi(2);
        norm += f64::from(*y).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_covers_short_results_whole_and_long_ones_at_three_places() {
        for len in [10, 3 * SAMPLE] {
            let whole = sample_ranges(len);
            assert_eq!((whole.len(), whole[0].start, whole[0].end), (1, 0, len));
        }
        let len = 10 * SAMPLE + 7;
        let ranges = sample_ranges(len);
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges[0], 0..SAMPLE);
        assert_eq!(ranges[2], len - SAMPLE..len);
        assert!(ranges[1].start > SAMPLE && ranges[1].end < len - SAMPLE);
        assert!(ranges.iter().all(|r| r.len() == SAMPLE));
    }

    #[test]
    fn relative_l2_is_zero_for_equal_results_and_scales_with_the_difference() {
        let b = [3.0f32, 4.0];
        assert_eq!(relative_l2(&b, &b), 0.0);
        assert!((relative_l2(&[3.0, 4.5], &b) - 0.1).abs() < 1e-12);
    }
}
