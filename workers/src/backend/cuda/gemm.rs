//! The projections through cuBLAS: `y[rows, out] = x[rows, in] · W[out, in]ᵀ` with bf16 operands,
//! f32 accumulation and an f32 result (the residual stream and the rotary/softmax inputs stay
//! f32; only matrix operands are bf16), or a bf16 result where only an elementwise op reads it
//! (the MLP's gate/up projection, read by `silu_mul`).

use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys};
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
    _workspace: CudaSlice<u8>,
}

const WORKSPACE_BYTES: usize = 32 << 20;

struct Handle(CudaBlas);

// SAFETY: a cuBLAS handle may be used from any thread as long as calls are not concurrent;
// the mutex serializes them.
unsafe impl Send for Handle {}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, BackendError> {
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
        Ok(Blas {
            handle: Mutex::new(Handle(handle)),
            stream,
            _workspace: workspace,
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
        if y.len() < rows * n {
            return Err(too_small(rows, k, n));
        }
        let (yp, _sy) = y.device_ptr_mut(&self.stream);
        self.gemm(x, w, yp, T::DATA_TYPE, rows, k, n)
    }

    /// `y = x · wᵀ` into `y` of type `y_type` (checked by the callers to hold `rows x n`).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        yp: u64,
        y_type: sys::cudaDataType,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), BackendError> {
        if x.len() < rows * k || w.len() < n * k {
            return Err(too_small(rows, k, n));
        }
        let guard = self
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _sx) = x.device_ptr(&self.stream);
        let (wp, _sw) = w.device_ptr(&self.stream);
        // Column-major view: yᵀ[n, rows] = W[n, k] · xᵀ[k, rows], where the row-major W is a
        // column-major [k, n] matrix (transposed by op A) and the row-major x a column-major
        // [k, rows] one.
        // SAFETY: pointers are live device buffers of at least the sizes checked above and by
        // the callers, on the handle's stream.
        unsafe {
            blas::gemm_ex(
                *guard.0.handle(),
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
