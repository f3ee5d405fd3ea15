//! The projections through cuBLAS: `y[rows, out] = x[rows, in] · W[out, in]ᵀ` with bf16 operands,
//! f32 accumulation and an f32 result (the residual stream and the rotary/softmax inputs stay
//! f32; only matrix operands are bf16), or a bf16 result where only an elementwise op reads it
//! (the MLP's gate/up projection, read by `silu_mul`).
//!
//! Without thread-block clusters ([`Blas::new`]'s `clusters` false: an MPS client limited to a
//! share of the SMs, where cuBLAS's cluster kernels may return success without writing their
//! output), every product goes through cuBLASLt instead, with the best algorithm its
//! heuristic offers that runs one block per cluster (as offered, or with its cluster shape set
//! so), chosen once per shape together with the shape's descriptors.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::backend::BackendError;

/// An element type cuBLAS writes a product's result in.
pub trait GemmOutput: cudarc::driver::DeviceRepr {
    const DATA_TYPE: sys::cudaDataType;
}

impl GemmOutput for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// bf16, as the backend stores it (the bits in a `u16`).
impl GemmOutput for u16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

/// The cuBLAS handle, bound to the backend's stream.
pub struct Blas {
    handle: Mutex<Handle>,
    stream: Arc<CudaStream>,
    /// cuBLAS' workspace, given explicitly so that no allocation happens while a CUDA graph
    /// is being captured.
    workspace: CudaSlice<u8>,
}

const WORKSPACE_BYTES: usize = 32 << 20;

struct Handle {
    blas: CudaBlas,
    /// The cluster-free path (module doc); `None`: cuBLAS's own choice.
    cluster_free: Option<ClusterFree>,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls are not concurrent;
// the mutex serializes them.
unsafe impl Send for Handle {}

impl Blas {
    /// A handle on `stream`; `clusters` false keeps every product to kernels of one block per
    /// cluster (module doc).
    pub fn new(stream: Arc<CudaStream>, clusters: bool) -> Result<Self, BackendError> {
        let handle = CudaBlas::new(stream.clone()).map_err(|e| BackendError::Device {
            op: "cublas init",
            detail: e.to_string(),
        })?;
        let err = |detail: String| BackendError::Device {
            op: "cublas init",
            detail,
        };
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| err(e.to_string()))?;
        let ptr = {
            let (p, _sync) = workspace.device_ptr(&stream);
            p
        };
        // SAFETY: the workspace lives as long as the handle (both in this struct).
        unsafe { sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut _, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| err(e.to_string()))?;
        let cluster_free = if clusters {
            None
        } else {
            Some(ClusterFree::new().map_err(|e| err(format!("cublasLt: {e}")))?)
        };
        Ok(Blas {
            handle: Mutex::new(Handle {
                blas: handle,
                cluster_free,
            }),
            stream,
            workspace,
        })
    }

    /// `y = x · wᵀ`; `x` is `[rows, k]` bf16, `w` is `[n, k]` bf16, `y` is `[rows, n]` f32, or
    /// bf16 (rounded from the f32 accumulation) for an output only an elementwise op reads:
    /// half the bytes to write and to read back.
    pub fn linear<T: GemmOutput>(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        y: &mut CudaSlice<T>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), BackendError> {
        self.linear_rows((x, 0), w, (y, 0), (rows, k, n), false)
    }

    /// [`Self::linear`] over `rows` rows of `x` and of `y` from the row each is given with (a
    /// contiguous run of a batch's rows, read and written in place), adding the product to what
    /// `y` holds there where `accumulate` (`y += x · wᵀ`, one rounding of the f32 sum for a bf16
    /// `y`).
    pub fn linear_rows<T: GemmOutput>(
        &self,
        (x, x_first): (&CudaSlice<u16>, usize),
        w: &CudaSlice<u16>,
        (y, y_first): (&mut CudaSlice<T>, usize),
        (rows, k, n): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<(), BackendError> {
        if x.len() < (x_first + rows) * k || y.len() < (y_first + rows) * n || w.len() < n * k {
            return Err(too_small(rows, k, n));
        }
        let (xp, _sx) = x.device_ptr(&self.stream);
        let (yp, _sy) = y.device_ptr_mut(&self.stream);
        let xp = xp + (x_first * k * std::mem::size_of::<u16>()) as u64;
        let yp = yp + (y_first * n * std::mem::size_of::<T>()) as u64;
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm(xp, w, (yp, T::DATA_TYPE), (rows, k, n), beta)
    }

    /// `y = x · wᵀ + beta y` with `x` at `xp` and `y` at `yp` of type `y_type` (checked by the
    /// callers to hold `rows x k` and `rows x n`).
    fn gemm(
        &self,
        xp: u64,
        w: &CudaSlice<u16>,
        (yp, y_type): (u64, sys::cudaDataType),
        (rows, k, n): (usize, usize, usize),
        beta: f32,
    ) -> Result<(), BackendError> {
        let mut guard = self
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let alpha = 1.0f32;
        let (wp, _sw) = w.device_ptr(&self.stream);
        if let Some(cluster_free) = guard.cluster_free.as_mut() {
            let (workspace, _sws) = self.workspace.device_ptr(&self.stream);
            let shape = Shape { rows, k, n, y_type };
            let operands = Operands {
                w: wp,
                x: xp,
                y: yp,
                workspace,
            };
            // SAFETY: the pointers are live device buffers of the sizes checked above and by
            // the callers, and the workspace holds WORKSPACE_BYTES, all on the stream.
            return unsafe {
                cluster_free.matmul(shape, operands, beta, self.stream.cu_stream().cast())
            }
            .map_err(|e| BackendError::Device {
                op: "linear (cublasLtMatmul, no clusters)",
                detail: format!("[{rows}x{k}]·[{n}x{k}]ᵀ: {e}"),
            });
        }
        // Column-major view: yᵀ[n, rows] = W[n, k] · xᵀ[k, rows], where the row-major W is a
        // column-major [k, n] matrix (transposed by op A) and the row-major x a column-major
        // [k, rows] one.
        // SAFETY: pointers are live device buffers of at least the sizes checked above and by
        // the callers, on the handle's stream.
        unsafe {
            blas::gemm_ex(
                *guard.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                wp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&beta as *const f32).cast(),
                yp as *mut _,
                y_type,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| BackendError::Device {
            op: "linear (cublasGemmEx)",
            detail: e.to_string(),
        })
    }
}

fn too_small(rows: usize, k: usize, n: usize) -> BackendError {
    BackendError::Shape {
        op: "linear",
        detail: format!("buffers too small for [{rows}x{k}]·[{n}x{k}]ᵀ"),
    }
}

/// A product's shape and result type: what an algorithm is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    rows: usize,
    k: usize,
    n: usize,
    y_type: sys::cudaDataType,
}

/// Device pointers of one product: `y = x · wᵀ`, and the workspace.
struct Operands {
    w: u64,
    x: u64,
    y: u64,
    workspace: u64,
}

/// cuBLASLt restricted to algorithms of one block per cluster, one chosen per shape. Used
/// under `Blas`'s mutex only (its `Handle` is what is sent between threads).
struct ClusterFree {
    handle: lt_sys::cublasLtHandle_t,
    /// The descriptors and chosen algorithm of every shape seen, built on its first product.
    plans: HashMap<Shape, Plan>,
}

/// What one shape's products run with.
struct Plan {
    descs: Descriptors,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl ClusterFree {
    fn new() -> Result<Self, lt::CublasError> {
        Ok(ClusterFree {
            handle: lt::create_handle()?,
            plans: HashMap::new(),
        })
    }

    /// `y = x · wᵀ` of `shape` on `stream` (the column-major view of [`Blas::linear`]'s
    /// `cublasGemmEx`).
    ///
    /// # Safety
    /// The operands must be live device buffers of `shape`'s sizes (the workspace
    /// `WORKSPACE_BYTES`), usable on `stream`.
    unsafe fn matmul(
        &mut self,
        shape: Shape,
        ops: Operands,
        beta: f32,
        stream: lt_sys::cudaStream_t,
    ) -> Result<(), String> {
        if !self.plans.contains_key(&shape) {
            let descs = Descriptors::new(shape).map_err(|e| e.to_string())?;
            // SAFETY: the descriptors were just created.
            let algo = unsafe { self.choose(&descs) }?;
            self.plans.insert(shape, Plan { descs, algo });
        }
        let Plan { descs, algo } = &self.plans[&shape];
        let alpha = 1.0f32;
        // SAFETY: the caller's promise for the pointers; descriptors and algorithm are live
        // and describe them.
        unsafe {
            lt::matmul(
                self.handle,
                descs.matmul,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ops.w as *const c_void,
                descs.a,
                ops.x as *const c_void,
                descs.b,
                ops.y as *const c_void,
                descs.c,
                ops.y as *mut c_void,
                descs.c,
                algo,
                ops.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        }
        .map_err(|e| e.to_string())
    }

    /// The heuristic's best algorithm of one block per cluster for `descs`.
    ///
    /// # Safety
    /// `descs` must be live.
    unsafe fn choose(&self, descs: &Descriptors) -> Result<lt_sys::cublasLtMatmulAlgo_t, String> {
        const CANDIDATES: usize = 32;
        let pref = Preference::new().map_err(|e| e.to_string())?;
        let mut results: [MaybeUninit<lt_sys::cublasLtMatmulHeuristicResult_t>; CANDIDATES] =
            [const { MaybeUninit::uninit() }; CANDIDATES];
        let mut found = 0i32;
        // SAFETY: live descriptors and preference; `results` holds CANDIDATES entries.
        unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                descs.matmul,
                descs.a,
                descs.b,
                descs.c,
                descs.c,
                pref.0,
                CANDIDATES as i32,
                results.as_mut_ptr().cast(),
                &mut found,
            )
        }
        .result()
        .map_err(|e| format!("cublasLtMatmulAlgoGetHeuristic: {e}"))?;
        let found = usize::try_from(found).unwrap_or(0).min(CANDIDATES);
        // SAFETY: the heuristic wrote the first `found` entries.
        let offered: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> = results[..found]
            .iter()
            .map(|r| unsafe { r.assume_init() })
            .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .collect();
        for result in &offered {
            if cluster_shape(&result.algo)? == ONE_BLOCK_CLUSTERS {
                return Ok(result.algo);
            }
        }
        // Every one launches clusters (on Hopper the heuristic offers cluster kernels): the
        // best one that cuBLASLt accepts with its cluster shape set to one block.
        for result in &offered {
            let mut algo = result.algo;
            // SAFETY: live descriptors and algorithm.
            if unsafe { self.accepts_one_block_clusters(descs, &mut algo) }? {
                return Ok(algo);
            }
        }
        Err(format!(
            "none of the {} algorithms cuBLASLt offers runs without thread-block clusters, \
             nor with its cluster shape set to one block; TANDEM_GEMM_CLUSTERS=1 lets cuBLAS \
             launch clusters (which an MPS share of the SMs may not run)",
            offered.len()
        ))
    }

    /// Sets `algo`'s cluster shape to one block and asks cuBLASLt whether it runs `descs`
    /// so (`cublasLtMatmulAlgoCheck`).
    ///
    /// # Safety
    /// `descs` must be live.
    unsafe fn accepts_one_block_clusters(
        &self,
        descs: &Descriptors,
        algo: &mut lt_sys::cublasLtMatmulAlgo_t,
    ) -> Result<bool, String> {
        let attr = ConfigAttr::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID;
        config_size(algo, attr)?;
        if set_config_value(algo, attr, ONE_BLOCK_CLUSTERS).is_err() {
            return Ok(false);
        }
        // SAFETY: live handle, descriptors and algorithm.
        let Some(check) =
            (unsafe { algo_check(self.handle, descs.matmul, [descs.a, descs.b, descs.c], algo) })
        else {
            return Ok(false);
        };
        Ok(check.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && cluster_shape(algo)? == ONE_BLOCK_CLUSTERS)
    }
}

impl Drop for ClusterFree {
    fn drop(&mut self) {
        // The shapes' descriptors go before the handle they were used with.
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// `CUBLASLT_CLUSTER_SHAPE_1x1x1`: one block per cluster.
pub(super) const ONE_BLOCK_CLUSTERS: u64 =
    lt_sys::cublasLtClusterShape_t::CUBLASLT_CLUSTER_SHAPE_1x1x1 as u64;

/// What cuBLASLt says of running `matmul` over layouts A, B and C (D = C) by `algo`
/// (`cublasLtMatmulAlgoCheck`): its result (state, workspace), or `None` where it refuses.
///
/// # Safety
/// `handle`, `matmul`, the layouts and `algo` must be live.
pub(super) unsafe fn algo_check(
    handle: lt_sys::cublasLtHandle_t,
    matmul: lt_sys::cublasLtMatmulDesc_t,
    [a, b, c]: [lt_sys::cublasLtMatrixLayout_t; 3],
    algo: &lt_sys::cublasLtMatmulAlgo_t,
) -> Option<lt_sys::cublasLtMatmulHeuristicResult_t> {
    let mut check = MaybeUninit::<lt_sys::cublasLtMatmulHeuristicResult_t>::uninit();
    // SAFETY: live handle, descriptors and algorithm; `check` is written on success.
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoCheck(handle, matmul, a, b, c, c, algo, check.as_mut_ptr())
    };
    // SAFETY: written by the successful check.
    (status == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
        .then(|| unsafe { check.assume_init() })
}

type ConfigAttr = lt_sys::cublasLtMatmulAlgoConfigAttributes_t;

/// The bytes of one of an algorithm's configuration attributes (1 to 8: the ids are 2 or 4).
fn config_size(algo: &lt_sys::cublasLtMatmulAlgo_t, attr: ConfigAttr) -> Result<usize, String> {
    let mut size = 0usize;
    // SAFETY: a size query (no buffer written) of a live algorithm.
    unsafe {
        lt_sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, std::ptr::null_mut(), 0, &mut size)
    }
    .result()
    .map_err(|e| format!("the size of {attr:?}: {e}"))?;
    if size == 0 || size > 8 {
        return Err(format!("{attr:?} of {size} bytes"));
    }
    Ok(size)
}

/// One of an algorithm's configuration attributes, as a number.
pub(super) fn config_value(
    algo: &lt_sys::cublasLtMatmulAlgo_t,
    attr: ConfigAttr,
) -> Result<u64, String> {
    let size = config_size(algo, attr)?;
    let mut bytes = [0u8; 8];
    let mut written = 0usize;
    // SAFETY: `bytes` holds `size` bytes.
    unsafe {
        lt_sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            attr,
            bytes.as_mut_ptr().cast(),
            size,
            &mut written,
        )
    }
    .result()
    .map_err(|e| format!("{attr:?}: {e}"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Sets one of an algorithm's configuration attributes to `value`, in the attribute's width.
pub(super) fn set_config_value(
    algo: &mut lt_sys::cublasLtMatmulAlgo_t,
    attr: ConfigAttr,
    value: u64,
) -> Result<(), String> {
    let size = config_size(algo, attr)?;
    let bytes = value.to_le_bytes();
    // SAFETY: `bytes` holds at least `size` (at most 8) bytes.
    unsafe { lt_sys::cublasLtMatmulAlgoConfigSetAttribute(algo, attr, bytes.as_ptr().cast(), size) }
        .result()
        .map_err(|e| format!("{attr:?} = {value}: {e}"))
}

/// The cluster shape id (`cublasLtClusterShape_t`) an algorithm launches with.
pub(super) fn cluster_shape(algo: &lt_sys::cublasLtMatmulAlgo_t) -> Result<u64, String> {
    config_value(algo, ConfigAttr::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)
}

/// The matmul and matrix-layout descriptors of one shape, destroyed on drop.
struct Descriptors {
    matmul: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
}

impl Descriptors {
    /// As `cublasGemmEx` in [`Blas::gemm`]: A = W, a column-major [k, n] (op T), B = x, a
    /// column-major [k, rows], C = D = y, a column-major [n, rows] of `y_type`.
    fn new(shape: Shape) -> Result<Self, lt::CublasError> {
        let bf16 = lt_sys::cudaDataType_t::CUDA_R_16BF;
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
        // The attribute is an int32_t holding a cublasOperation_t.
        let transpose = sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: a live descriptor and an i32, as the attribute takes.
        unsafe {
            lt::set_matmul_desc_attribute(
                descs.matmul,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )?;
        }
        let y_type = match shape.y_type {
            sys::cudaDataType::CUDA_R_16BF => bf16,
            _ => lt_sys::cudaDataType_t::CUDA_R_32F,
        };
        descs.a = lt::create_matrix_layout(bf16, k, n, k as i64)?;
        descs.b = lt::create_matrix_layout(bf16, k, rows, k as i64)?;
        descs.c = lt::create_matrix_layout(y_type, n, rows, n as i64)?;
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

/// A heuristic preference allowing the whole workspace, destroyed on drop.
struct Preference(lt_sys::cublasLtMatmulPreference_t);

impl Preference {
    fn new() -> Result<Self, lt::CublasError> {
        let pref = Preference(lt::create_matmul_pref()?);
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: a live preference; the attribute takes a u64.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )?;
        }
        Ok(pref)
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
