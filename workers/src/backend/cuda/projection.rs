//! Projections (`x · wᵀ`): the one place that picks the kernel a projection runs for its
//! weight and its batch's shape (the GEMV kernel for a few rows, `skinny.cu` for decode
//! batches on Hopper where it is on, cuBLAS for the rest, and cuBLAS' bf16 output for the
//! projections an elementwise op alone reads) for a bf16 weight; an FP8 weight's kernels are
//! in `fp8_projection.rs`, dispatched here (its GEMV and `skinny.cu` write f32, so the bf16
//! output is cuBLASLt's only).

use super::launch::PushArg;
use cudarc::driver::LaunchConfig;

use super::fp8_projection::{Fp8Gemv, Fp8Out, Fp8Weight};
use super::kernels::{GEMV_FP8_MMA_SILU_PAIRS, GEMV_FP8_MMA_THREADS, GEMV_SILU_PAIRS};
use super::tensor::DeviceData;
use super::tensor::MatrixData;
use super::{CudaBackend, CudaTensor, CudaWeight, elementwise_config, shape_err};
use crate::backend::BackendError;

/// Which kernel a projection runs ([`CudaBackend::projection_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProjectionKernel {
    Gemv,
    Skinny,
    Cublas,
}

impl CudaBackend {
    /// The kernel a projection of `rows` rows by an `[n, k]` weight runs: the GEMV kernel for
    /// a few rows (a decode step: reading the weights is the whole cost), `skinny.cu` where it
    /// applies, else cuBLAS.
    fn projection_kernel(&self, rows: usize, n: usize, k: usize) -> ProjectionKernel {
        let gemv_rows = self.switches.gemv_max_rows();
        if (1..=gemv_rows).contains(&rows) && k.is_multiple_of(8) {
            ProjectionKernel::Gemv
        } else if self.skinny_applies(rows, n, k, gemv_rows) {
            ProjectionKernel::Skinny
        } else {
            ProjectionKernel::Cublas
        }
    }

    /// `x · wᵀ` written in bf16 by cuBLAS, for a projection whose output only an elementwise
    /// op reads (half the bytes to write and to read back); `None` where the projection does
    /// not run on cuBLAS: decode-sized rows go to the GEMV or skinny kernels, which write f32,
    /// and shape errors are [`Backend::linear`]'s to report.
    fn cublas_bf16_projection(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
    ) -> Result<Option<CudaTensor>, BackendError> {
        let Some((data, n, k, xs)) = matrix_of_bf16_rows(weight, x) else {
            return Ok(None);
        };
        match data {
            MatrixData::Bf16(w) => {
                let Some(xs) = xs else {
                    return Ok(None);
                };
                if self.projection_kernel(x.rows, n, k) != ProjectionKernel::Cublas {
                    return Ok(None);
                }
                self.prefetch.clear();
                let mut out = self.alloc_bf16(x.rows * n)?;
                self.blas.linear(xs, w, &mut out, x.rows, k, n)?;
                Ok(Some(CudaTensor::from_bf16(x.rows, n, out)))
            }
            MatrixData::Fp8 {
                codes,
                row_scales,
                input,
            } => {
                if self.fp8_gemv_applies(x.rows, k) || self.skinny_fp8_applies(x.rows, k) {
                    return Ok(None);
                }
                self.prefetch.clear();
                let w = Fp8Weight {
                    codes,
                    row_scales,
                    input: *input,
                    n,
                    k,
                };
                let mut out = self.alloc_bf16(x.rows * n)?;
                self.fp8_gemm_into(xs, x.fp8.as_ref(), x.rows, &w, Fp8Out::Bf16(&mut out))?;
                Ok(Some(CudaTensor::from_bf16(x.rows, n, out)))
            }
        }
    }
}

impl CudaBackend {
    pub(super) fn project(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        let CudaWeight::Matrix {
            data,
            rows: out_features,
            cols: in_features,
        } = weight
        else {
            return Err(shape_err("linear", "the weight is not a matrix".into()));
        };
        if x.cols != *in_features {
            return Err(shape_err(
                "linear",
                format!(
                    "x has {} columns, the weight is {out_features}x{in_features}",
                    x.cols
                ),
            ));
        }
        let xs = x.bf16_rows("linear")?;
        // The hint was for this projection (or one the ops before it did not take).
        self.prefetch.clear();
        let mut out = self.alloc_f32(x.rows * out_features)?;
        let w = match data {
            MatrixData::Bf16(w) => w,
            MatrixData::Fp8 {
                codes,
                row_scales,
                input,
            } => {
                let w = Fp8Weight {
                    codes,
                    row_scales,
                    input: *input,
                    n: *out_features,
                    k: *in_features,
                };
                self.fp8_project(xs, x.fp8.as_ref(), x.rows, &w, &mut out)?;
                return self.finish_projection(out, x.rows, *out_features, bias);
            }
        };
        let xs = xs.ok_or_else(|| {
            shape_err(
                "linear",
                "the input rows are held only as FP8 codes, for a bf16 weight".into(),
            )
        })?;
        let kernel = self.projection_kernel(x.rows, *out_features, *in_features);
        if kernel == ProjectionKernel::Gemv {
            let (n, k) = (*out_features as i32, *in_features as i32);
            let mut b = self.kernel_args(&self.kernels.gemv[x.rows - 1]);
            b.arg(xs).arg(w).arg(&mut out).arg(&n).arg(&k);
            let cfg = LaunchConfig {
                grid_dim: (out_features.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(b, cfg, "gemv")?;
        } else if !(kernel == ProjectionKernel::Skinny
            && self.skinny_linear(xs, w, &mut out, x.rows, *out_features, *in_features)?)
        {
            self.blas
                .linear(xs, w, &mut out, x.rows, *in_features, *out_features)?;
        }
        self.finish_projection(out, x.rows, *out_features, bias)
    }

    /// A projection's f32 output with its bias added.
    fn finish_projection(
        &self,
        mut out: cudarc::driver::CudaSlice<f32>,
        rows: usize,
        out_features: usize,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        if let Some(bias) = bias {
            let bv = Self::check_vector("linear bias", bias, out_features)?;
            let total = (rows * out_features) as i64;
            let cols = out_features as i32;
            let mut b = self.kernel_args(&self.kernels.add_bias);
            b.arg(&mut out).arg(bv).arg(&cols).arg(&total);
            self.launch(b, elementwise_config(total as usize), "add_bias")?;
        }
        Ok(CudaTensor::from_f32(rows, out_features, out))
    }

    /// A projection only the residual add reads: written in bf16 by cuBLAS at prefill sizes
    /// where [`CudaOptions::residual_bf16`](super::CudaOptions::residual_bf16) is on and there is no bias, else as
    /// [`Self::project`] writes it.
    pub(super) fn project_to_residual(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        if bias.is_none()
            && self.options.residual_bf16
            && let Some(out) = self.cublas_bf16_projection(x, weight)?
        {
            return Ok(out);
        }
        self.project(x, weight, bias)
    }

    /// The fused q/k/v projection of FP8 weights: left in the bf16 cuBLASLt writes at
    /// prefill sizes where [`CudaOptions::fp8_qkv_bf16`](super::CudaOptions::fp8_qkv_bf16) is
    /// on and there is no bias (the rotary kernel widens the rows as it reads them), else as
    /// [`Self::project`] writes it (which widens cuBLASLt's bf16 in a pass of its own). A bf16
    /// weight's cuBLAS writes f32 itself.
    pub(super) fn project_qkv(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        let fp8 = matches!(
            weight,
            CudaWeight::Matrix {
                data: MatrixData::Fp8 { .. },
                ..
            }
        );
        if fp8
            && bias.is_none()
            && self.options.fp8_qkv_bf16
            && let Some(out) = self.cublas_bf16_projection(x, weight)?
        {
            return Ok(out);
        }
        self.project(x, weight, bias)
    }

    /// The MLP's `[gate | up]` projection: written in bf16 by cuBLAS at prefill sizes where
    /// [`CudaOptions::gate_up_bf16`](super::CudaOptions::gate_up_bf16) is on, else as [`Self::project`] writes it.
    pub(super) fn project_gate_up(
        &self,
        x: &CudaTensor,
        gate_up: &CudaWeight,
    ) -> Result<CudaTensor, BackendError> {
        let narrow = if self.options.gate_up_bf16 {
            self.cublas_bf16_projection(x, gate_up)?
        } else {
            None
        };
        match narrow {
            Some(projected) => Ok(projected),
            None => self.project(x, gate_up, None),
        }
    }

    /// The MLP's `[gate | up]` projection and the SiLU product in one launch, `silu(gate) *
    /// up` in bf16 (what [`Self::project_gate_up`] and `silu_mul` after it write, bit for
    /// bit), where the projection runs on a GEMV kernel (an FP8 weight's, or a bf16 weight's
    /// at one row) and [`CudaOptions::gemv_silu`](super::CudaOptions::gemv_silu) is on; `None`
    /// elsewhere. `next` is the down projection's weight.
    pub(super) fn gemv_silu(
        &self,
        x: &CudaTensor,
        gate_up: &CudaWeight,
        next: &CudaWeight,
    ) -> Result<Option<CudaTensor>, BackendError> {
        let Some((data, n, k, xs)) = matrix_of_bf16_rows(gate_up, x) else {
            return Ok(None);
        };
        let rows = x.rows;
        let Some(xs) = xs else {
            return Ok(None);
        };
        if !self.switches.gemv_silu() || !n.is_multiple_of(2) || rows == 0 {
            return Ok(None);
        }
        let f = n / 2;
        let (fi, ni, ki, mi) = (f as i32, n as i32, k as i32, rows as i32);
        // bf16 weights at one row only: at 2 rows the fused GEMV made an H200's decode step
        // of Llama-3.1-8B shapes 3-4% slower (4 rows: even), where FP8 weights lost nothing
        // at 2-8 rows (docs/benchmarks.md).
        let applies = match data {
            MatrixData::Bf16(_) => {
                rows == 1 && self.projection_kernel(rows, n, k) == ProjectionKernel::Gemv
            }
            MatrixData::Fp8 { .. } => match self.fp8_gemv_kernel(rows, k) {
                Some(Fp8Gemv::TensorCores) => true,
                Some(Fp8Gemv::Plain) => rows <= self.kernels.gemv_fp8_silu.len(),
                None => false,
            },
        };
        if !applies {
            return Ok(None);
        }
        // The next projection's weight, read ahead by the kernel where GEMV_SILU_PREFETCH asks
        // for it (before or after its rows; default: not at all, which measured fastest), as
        // `silu_mul` does after an unfused projection.
        self.prefetch.clear();
        self.prefetch.announce(&self.stream, next);
        let pf = self.take_prefetch(rows);
        let pairs_config = |blocks: usize, threads: u32| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut out = self.alloc_bf16(rows * f)?;
        match data {
            MatrixData::Bf16(w) => {
                let mut b = self.kernel_args(&self.kernels.gemv_silu[rows - 1]);
                b.arg(xs)
                    .arg(w)
                    .arg(&mut out)
                    .arg(&fi)
                    .arg(&ki)
                    .arg(&pf.ptr)
                    .arg(&pf.bytes);
                self.launch(
                    b,
                    pairs_config(f.div_ceil(GEMV_SILU_PAIRS), 256),
                    "gemv_silu",
                )?;
            }
            MatrixData::Fp8 {
                codes, row_scales, ..
            } => {
                if self.fp8_gemv_kernel(rows, k) == Some(Fp8Gemv::TensorCores) {
                    let mut b = self.kernel_args(&self.kernels.gemv_fp8_mma_silu);
                    b.arg(xs)
                        .arg(codes)
                        .arg(row_scales)
                        .arg(&mut out)
                        .arg(&mi)
                        .arg(&ni)
                        .arg(&ki)
                        .arg(&pf.ptr)
                        .arg(&pf.bytes);
                    let cfg =
                        pairs_config(f.div_ceil(GEMV_FP8_MMA_SILU_PAIRS), GEMV_FP8_MMA_THREADS);
                    self.launch(b, cfg, "gemv_fp8_mma_silu")?;
                } else {
                    let mut b = self.kernel_args(&self.kernels.gemv_fp8_silu[rows - 1]);
                    b.arg(xs)
                        .arg(codes)
                        .arg(row_scales)
                        .arg(&mut out)
                        .arg(&fi)
                        .arg(&ki)
                        .arg(&pf.ptr)
                        .arg(&pf.bytes);
                    let cfg = pairs_config(f.div_ceil(GEMV_SILU_PAIRS), 256);
                    self.launch(b, cfg, "gemv_fp8_silu")?;
                }
            }
        }
        Ok(Some(CudaTensor::from_bf16(rows, f, out)))
    }
}

/// `weight`'s matrix, its output and input features, and `x`'s bf16 rows (`None` where `x`
/// is held only as FP8 codes), where `weight` is a matrix whose input features are `x`'s
/// columns and `x` is bf16 or codes: what the projections with an output of their own
/// choosing take (shape errors are [`Backend::linear`]'s to report).
///
/// [`Backend::linear`]: crate::backend::Backend::linear
fn matrix_of_bf16_rows<'a>(
    weight: &'a CudaWeight,
    x: &'a CudaTensor,
) -> Option<(
    &'a MatrixData,
    usize,
    usize,
    Option<&'a cudarc::driver::CudaSlice<u16>>,
)> {
    match (weight, &x.data) {
        (CudaWeight::Matrix { data, rows, cols }, DeviceData::Bf16(xs)) if x.cols == *cols => {
            Some((data, *rows, *cols, Some(xs)))
        }
        (CudaWeight::Matrix { data, rows, cols }, DeviceData::Fp8CodesOnly) if x.cols == *cols => {
            Some((data, *rows, *cols, None))
        }
        _ => None,
    }
}
