//! FP8 projections through cuBLASLt: `y[rows, n] = xs[rows] * ws[n] * (xq[rows, k] · wq[n, k]ᵀ)`
//! with e4m3 operands, f32 accumulation, and the scales applied by cuBLASLt itself as vectors
//! (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`: one scale per row of the weight, one per
//! token of the activation; CUDA 12.9+ on Hopper), so per-channel weights and per-token
//! activations cost no pass of their own. Measured by torch's `_scaled_mm` (the same library)
//! at 1,343 TFLOP/s on Llama-3.1-8B shapes at 8,192 rows, 1.86x bf16. With vector scales
//! cuBLASLt writes bf16 only (an f32 D is refused as an invalid value, and torch's row-wise
//! `_scaled_mm` asks for bf16 output too), so the result is bf16.
//!
//! Where cuBLASLt refuses vector scales (its heuristic answers "invalid value": seen with CUDA
//! 13.0's cuBLASLt on an H100, for f32 and bf16 outputs alike), products run unscaled into f32
//! ([`Fp8Gemm::unscaled`]) and the caller applies the scales in a pass of its own; which of
//! the two this library does is found at the first product and kept
//! ([`Fp8Gemm::vector_scales`]).
//!
//! One descriptor set and algorithm per shape (the heuristic's first, or with thread-block
//! clusters off its first of one block per cluster, as [`super::gemm`] chooses for bf16; then
//! the fastest of every configuration cuBLASLt accepts, timed at that product: `tune.rs`),
//! built at the shape's first product, for the row count rounded up to a power of two: a
//! serving step's row count changes at nearly every step, and asking the heuristic each time
//! cost a 128/128 server more host time per step (51.7 ms of 76.4) than its device work. A
//! product of fewer rows runs its bucket's algorithm with layouts of its own rows. The scale
//! pointers are set on the descriptor at each call, under the mutex that serializes calls.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::gemm::{ONE_BLOCK_CLUSTERS, cluster_shape};
use crate::backend::BackendError;

mod tactics;
mod tune;
pub use tactics::Fp8Tactic;

const WORKSPACE_BYTES: usize = 32 << 20;

/// cuBLASLt's FP8 products on one stream.
pub struct Fp8Gemm {
    inner: Mutex<Inner>,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    /// Only algorithms of one block per cluster ([`super::gemm`]'s module doc).
    cluster_free: bool,
    /// FP8 products accumulate without the periodic promotion of their partial sums to f32
    /// ([`CudaOptions::fp8_fast_accum`](super::CudaOptions::fp8_fast_accum)).
    fast_accum: bool,
    /// Each shape's configuration chosen by timing ([`CudaOptions::fp8_tune`](super::CudaOptions::fp8_tune)).
    tune: bool,
}

struct Inner {
    handle: lt_sys::cublasLtHandle_t,
    plans: HashMap<Shape, Plan>,
    /// Whether cuBLASLt applies vector scales; `None` until the first scaled product tried.
    vector_scales: Option<bool>,
}

// SAFETY: a cuBLASLt handle may be used from any thread as long as calls are not concurrent;
// the mutex serializes them.
unsafe impl Send for Inner {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    rows: usize,
    k: usize,
    n: usize,
    /// With vector scales and a bf16 result, or unscaled with an f32 one.
    scaled: bool,
}

struct Plan {
    descs: Descriptors,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// `algo` was chosen by timing (`tune.rs`), not only by the heuristic.
    tuned: bool,
}

/// The operands of one product.
pub struct Fp8Operands<'a> {
    /// Activation codes `[rows, k]` and one scale per row.
    pub x: &'a CudaSlice<u8>,
    pub x_scales: &'a CudaSlice<f32>,
    /// Weight codes `[n, k]` and one scale per row.
    pub w: &'a CudaSlice<u8>,
    pub w_scales: &'a CudaSlice<f32>,
}

fn err(detail: String) -> BackendError {
    BackendError::Device {
        op: "linear (fp8, cublasLt)",
        detail,
    }
}

impl Fp8Gemm {
    pub fn new(
        stream: Arc<CudaStream>,
        clusters: bool,
        fast_accum: bool,
        tune: bool,
    ) -> Result<Self, BackendError> {
        let handle = lt::create_handle().map_err(|e| err(format!("cublasLtCreate: {e}")))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| err(e.to_string()))?;
        Ok(Fp8Gemm {
            inner: Mutex::new(Inner {
                handle,
                plans: HashMap::new(),
                vector_scales: None,
            }),
            stream,
            workspace,
            cluster_free: !clusters,
            fast_accum,
            tune,
        })
    }

    /// Whether each shape's configuration is chosen by timing (`tune.rs`).
    pub fn tunes(&self) -> bool {
        self.tune
    }

    /// Whether cuBLASLt applies vector scales (known after the first scaled product).
    pub fn vector_scales(&self) -> Option<bool> {
        self.lock().vector_scales
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `y = xs * ws * (xq · wqᵀ)` into `y` (`[rows, n]`, bf16), the scales applied by
    /// cuBLASLt; `Ok(false)` (nothing done) where it does not take vector scales.
    pub fn scaled(
        &self,
        ops: &Fp8Operands<'_>,
        y: &mut CudaSlice<u16>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<bool, BackendError> {
        check(ops, y.len(), rows, k, n)?;
        let mut inner = self.lock();
        if inner.vector_scales == Some(false) {
            return Ok(false);
        }
        let (xsp, _sxs) = ops.x_scales.device_ptr(&self.stream);
        let (wsp, _sws) = ops.w_scales.device_ptr(&self.stream);
        let shape = Shape {
            rows: bucket(rows),
            k,
            n,
            scaled: true,
        };
        match self.plan(&mut inner, shape, Some((wsp, xsp))) {
            Ok(()) => inner.vector_scales = Some(true),
            Err(e) if inner.vector_scales.is_none() => {
                tracing::info!(
                    reason = %e,
                    "cuBLASLt takes no vector scales for FP8 products here: they run unscaled \
                     and are scaled by a kernel of ours"
                );
                inner.vector_scales = Some(false);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        let (yp, _sy) = y.device_ptr_mut(&self.stream);
        if self.tune && !inner.plans[&shape].tuned {
            self.tune(&mut inner, shape, ops, yp, rows)?;
        }
        self.run(&inner, shape, ops, yp, rows, k, n)?;
        Ok(true)
    }

    /// `y = xq · wqᵀ` into `y` (`[rows, n]`, f32), unscaled: the caller applies the scales.
    pub fn unscaled(
        &self,
        ops: &Fp8Operands<'_>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), BackendError> {
        check(ops, y.len(), rows, k, n)?;
        let mut inner = self.lock();
        let shape = Shape {
            rows: bucket(rows),
            k,
            n,
            scaled: false,
        };
        self.plan(&mut inner, shape, None)?;
        let (yp, _sy) = y.device_ptr_mut(&self.stream);
        if self.tune && !inner.plans[&shape].tuned {
            self.tune(&mut inner, shape, ops, yp, rows)?;
        }
        self.run(&inner, shape, ops, yp, rows, k, n)
    }

    /// Builds `shape`'s descriptors and algorithm if it has none, and sets its scale
    /// pointers (weight's, input's) where it is scaled: before the heuristic, which checks
    /// them.
    fn plan(
        &self,
        inner: &mut Inner,
        shape: Shape,
        scale_pointers: Option<(u64, u64)>,
    ) -> Result<(), BackendError> {
        let Shape { rows, k, n, .. } = shape;
        let fresh = !inner.plans.contains_key(&shape);
        let descs = if fresh {
            Some(Descriptors::new(shape, self.fast_accum).map_err(|e| err(e.to_string()))?)
        } else {
            None
        };
        let matmul = descs
            .as_ref()
            .map_or_else(|| inner.plans[&shape].descs.matmul, |d| d.matmul);
        if let Some((w_scales, x_scales)) = scale_pointers {
            // SAFETY: a live descriptor; the scales are the product's device buffers.
            unsafe { set_scale_pointers(matmul, w_scales, x_scales) }.map_err(err)?;
        }
        if let Some(descs) = descs {
            // SAFETY: live handle and descriptors.
            let algo = unsafe { choose(inner.handle, &descs, self.cluster_free) }
                .map_err(|e| err(format!("[{rows}x{k}]·[{n}x{k}]ᵀ: {e}")))?;
            inner.plans.insert(
                shape,
                Plan {
                    descs,
                    algo,
                    tuned: false,
                },
            );
        }
        Ok(())
    }

    /// Runs `shape`'s plan into `yp`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        inner: &Inner,
        shape: Shape,
        ops: &Fp8Operands<'_>,
        yp: u64,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), BackendError> {
        let plan = &inner.plans[&shape];
        // Layouts of this product's own rows where they are fewer than its bucket's.
        let own = (rows != shape.rows)
            .then(|| RowLayouts::new(shape.scaled, rows, k, n))
            .transpose()
            .map_err(|e| err(e.to_string()))?;
        let (b_layout, c_layout) = own
            .as_ref()
            .map_or((plan.descs.b, plan.descs.c), |l| (l.b, l.c));
        let (xp, _sx) = ops.x.device_ptr(&self.stream);
        let (wp, _sw) = ops.w.device_ptr(&self.stream);
        let (workspace, _sws) = self.workspace.device_ptr(&self.stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers are live device buffers of the sizes checked by the callers,
        // the descriptors describe them, the workspace holds WORKSPACE_BYTES, all on the
        // stream.
        unsafe {
            lt::matmul(
                inner.handle,
                plan.descs.matmul,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                wp as *const c_void,
                plan.descs.a,
                xp as *const c_void,
                b_layout,
                yp as *const c_void,
                c_layout,
                yp as *mut c_void,
                c_layout,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream().cast(),
            )
        }
        .map_err(|e| err(format!("[{rows}x{k}]·[{n}x{k}]ᵀ: {e}")))
    }
}

/// The row count whose plan a product of `rows` rows runs: the next power of two, at least 16.
fn bucket(rows: usize) -> usize {
    rows.next_power_of_two().max(16)
}

/// x's and y's layouts for a row count, destroyed on drop.
struct RowLayouts {
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
}

impl RowLayouts {
    fn new(scaled: bool, rows: usize, k: usize, n: usize) -> Result<Self, lt::CublasError> {
        let e4m3 = lt_sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let b = lt::create_matrix_layout(e4m3, k as u64, rows as u64, k as i64)?;
        let c = lt::create_matrix_layout(y_type(scaled), n as u64, rows as u64, n as i64);
        match c {
            Ok(c) => Ok(RowLayouts { b, c }),
            Err(e) => {
                // SAFETY: created above, destroyed once.
                let _ = unsafe { lt::destroy_matrix_layout(b) };
                Err(e)
            }
        }
    }
}

impl Drop for RowLayouts {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, after the product that used them was
        // queued (cuBLASLt reads layouts when it is called, not when the kernel runs).
        unsafe {
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
        }
    }
}

/// The result's type: bf16 with vector scales applied, f32 unscaled.
fn y_type(scaled: bool) -> lt_sys::cudaDataType_t {
    if scaled {
        lt_sys::cudaDataType_t::CUDA_R_16BF
    } else {
        lt_sys::cudaDataType_t::CUDA_R_32F
    }
}

/// The operands and a result of `y_len` elements hold a `[rows, k]·[n, k]ᵀ` product.
fn check(
    ops: &Fp8Operands<'_>,
    y_len: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), BackendError> {
    if ops.x.len() < rows * k
        || ops.x_scales.len() < rows
        || ops.w.len() < n * k
        || ops.w_scales.len() < n
        || y_len < rows * n
    {
        return Err(BackendError::Shape {
            op: "linear (fp8)",
            detail: format!("buffers too small for [{rows}x{k}]·[{n}x{k}]ᵀ"),
        });
    }
    Ok(())
}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        let inner = self
            .inner
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The shapes' descriptors go before the handle they were used with.
        inner.plans.clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(inner.handle) };
    }
}

/// Sets the weight's and the activation's scale pointers on `matmul`: A = W (scales per
/// output row), B = x (scales per token), as `Descriptors::new` lays them out.
///
/// # Safety
/// `matmul` must be live, the pointers device buffers of the product's scales.
unsafe fn set_scale_pointers(
    matmul: lt_sys::cublasLtMatmulDesc_t,
    w_scales: u64,
    x_scales: u64,
) -> Result<(), String> {
    use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
    for (attr, ptr) in [
        (Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scales),
        (Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scales),
    ] {
        let ptr = ptr as *const c_void;
        // SAFETY: a live descriptor; the attribute takes a device pointer.
        unsafe {
            lt::set_matmul_desc_attribute(
                matmul,
                attr,
                (&ptr as *const *const c_void).cast(),
                std::mem::size_of::<*const c_void>(),
            )
        }
        .map_err(|e| format!("scale pointer: {e}"))?;
    }
    Ok(())
}

/// The heuristic's best algorithm for `descs` (of one block per cluster where `cluster_free`).
///
/// # Safety
/// `handle` and `descs` must be live.
unsafe fn choose(
    handle: lt_sys::cublasLtHandle_t,
    descs: &Descriptors,
    cluster_free: bool,
) -> Result<lt_sys::cublasLtMatmulAlgo_t, String> {
    const CANDIDATES: usize = 16;
    let pref = lt::create_matmul_pref().map_err(|e| e.to_string())?;
    let bytes = WORKSPACE_BYTES as u64;
    let mut results: [MaybeUninit<lt_sys::cublasLtMatmulHeuristicResult_t>; CANDIDATES] =
        [const { MaybeUninit::uninit() }; CANDIDATES];
    let mut found = 0i32;
    // SAFETY: a live preference taking a u64; live descriptors; `results` holds CANDIDATES.
    let status = unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&bytes as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )
        .map_err(|e| e.to_string())
        .and_then(|()| {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                descs.matmul,
                descs.a,
                descs.b,
                descs.c,
                descs.c,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr().cast(),
                &mut found,
            )
            .result()
            .map_err(|e| format!("no FP8 algorithm (cublasLtMatmulAlgoGetHeuristic): {e}"))
        })
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { lt::destroy_matmul_pref(pref) };
    status?;
    let offered: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> = results[..found.max(0) as usize]
        .iter()
        // SAFETY: the heuristic wrote `found` results.
        .map(|r| unsafe { r.assume_init() })
        .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
        .collect();
    for result in &offered {
        if !cluster_free || cluster_shape(&result.algo)? == ONE_BLOCK_CLUSTERS {
            return Ok(result.algo);
        }
    }
    Err(format!(
        "none of the {} FP8 algorithms cuBLASLt offers fits (clusters {})",
        offered.len(),
        if cluster_free { "off" } else { "on" }
    ))
}

/// The descriptors of one shape, destroyed on drop.
struct Descriptors {
    matmul: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
}

impl Descriptors {
    /// Column-major view (as the bf16 GEMM): yᵀ[n, rows] = W[n, k] · xᵀ[k, rows]; A = W, a
    /// column-major [k, n] of codes, transposed (FP8 products on Hopper take A transposed and
    /// B not: the "TN" layout); B = x, a column-major [k, rows]; C = D = y, bf16 where scaled,
    /// f32 where not. Scaled, both scales are outer vectors: A's over op(A)'s rows (the
    /// weight's n), B's over op(B)'s columns (the tokens). `fast_accum`: cuBLASLt's FP8 fast
    /// accumulation.
    fn new(shape: Shape, fast_accum: bool) -> Result<Self, lt::CublasError> {
        let e4m3 = lt_sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let (rows, k, n) = (shape.rows as u64, shape.k as u64, shape.n as u64);
        let matmul = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType_t::CUDA_R_32F,
        )?;
        let mut descs = Descriptors {
            matmul,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
        };
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        let outer_vector =
            lt_sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
        let mut attributes = vec![(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            transpose,
        )];
        if shape.scaled {
            attributes.extend([
                (
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                    outer_vector,
                ),
                (
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                    outer_vector,
                ),
            ]);
        }
        for (attr, value) in attributes {
            // SAFETY: a live descriptor; these attributes take an int32.
            unsafe {
                lt::set_matmul_desc_attribute(
                    descs.matmul,
                    attr,
                    (&value as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                )?;
            }
        }
        if fast_accum {
            let on: i8 = 1;
            // SAFETY: a live descriptor; this attribute takes an int8.
            unsafe {
                lt::set_matmul_desc_attribute(
                    descs.matmul,
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                    (&on as *const i8).cast(),
                    std::mem::size_of::<i8>(),
                )?;
            }
        }
        descs.a = lt::create_matrix_layout(e4m3, k, n, k as i64)?;
        descs.b = lt::create_matrix_layout(e4m3, k, rows, k as i64)?;
        descs.c = lt::create_matrix_layout(y_type(shape.scaled), n, rows, n as i64)?;
        Ok(descs)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once (or is null, never created) and is destroyed once.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            let _ = lt::destroy_matmul_desc(self.matmul);
        }
    }
}
