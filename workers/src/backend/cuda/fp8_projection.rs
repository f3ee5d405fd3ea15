//! Projections of FP8 weights: `gemv_fp8_mma` (tensor cores) or `gemv_fp8_m*` for a few rows
//! (a decode step: reading the weight's codes is the whole cost), which reads the bf16 input as it is (more precise than
//! the checkpoint's quantized activations, and no quantization launch per projection, which
//! cost more than FP8 saved at batch 1); else the input rows quantized to FP8
//! (`quantize_fp8_rows`, per token or by the checkpoint's static scale) and, on Hopper up to
//! 256 rows (decode batches), `skinny.cu`'s FP8 kernel (weights streamed by TMA, f32 result
//! scaled as it is written: cuBLASLt read the weights at about half the copy rate there), or
//! cuBLASLt's FP8 GEMM ([`super::fp8_gemm`]). The CPU backend quantizes every row, so at the
//! GEMV's sizes the two differ by FP8's rounding of the activations.

use super::launch::PushArg;
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::CudaBackend;
use super::fp8_gemm::Fp8Operands;
use super::kernels::{GEMV_FP8_MMA_CHUNK, GEMV_FP8_MMA_ROWS, GEMV_FP8_MMA_THREADS, GEMV_MAX_ROWS};
use super::tensor::Fp8Rows;
use crate::backend::{BackendError, InputScale};

/// Threads of a `quantize_fp8_rows` block (one block per row).
const QUANTIZE_THREADS: u32 = 256;

/// Most rows the plain FP8 GEMV (`gemv_fp8_m*`) takes: its unpacking of the codes (about six
/// instructions a code, products in f32 per row) is compute-bound past a couple of rows: on an
/// H100 (Llama-3.1-8B shapes, FP8 cache) decode steps of 3 and 4 rows took 5.68 and 5.67 ms on
/// it against 4.88 and 4.89 on `skinny.cu` (docs/benchmarks.md).
const PLAIN_FP8_GEMV_MAX_ROWS: usize = 2;

/// The FP8 GEMV kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fp8Gemv {
    /// `gemv_fp8_mma`: codes unpacked to bf16 once for all rows, products on the tensor cores.
    TensorCores,
    /// `gemv_fp8_m{rows}`: f32 products per row.
    Plain,
}

/// An FP8 weight as the projection reads it.
pub(super) struct Fp8Weight<'a> {
    pub codes: &'a CudaSlice<u8>,
    pub row_scales: &'a CudaSlice<f32>,
    pub input: InputScale,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl CudaBackend {
    /// The FP8 GEMV kernel a projection of `rows` rows of `k` inputs runs on, if any (else
    /// `skinny.cu` or cuBLASLt): up to
    /// [`CudaOptions::fp8_gemv_max_rows`](super::CudaOptions::fp8_gemv_max_rows) rows (8 by
    /// default) on the tensor-core GEMV where `k` is a multiple of its chunk, else up to
    /// [`PLAIN_FP8_GEMV_MAX_ROWS`] on the plain one; one row on the plain one where
    /// [`CudaOptions::fp8_gemv_mma_one_row`](super::CudaOptions::fp8_gemv_mma_one_row) is off.
    pub(super) fn fp8_gemv_kernel(&self, rows: usize, k: usize) -> Option<Fp8Gemv> {
        let mma = self.options.fp8_gemv_mma && k.is_multiple_of(GEMV_FP8_MMA_CHUNK);
        let kernel_rows = if mma {
            GEMV_MAX_ROWS
        } else {
            PLAIN_FP8_GEMV_MAX_ROWS
        };
        if !(1..=kernel_rows.min(self.options.fp8_gemv_max_rows)).contains(&rows)
            || !k.is_multiple_of(16)
        {
            return None;
        }
        Some(if mma && (rows > 1 || self.options.fp8_gemv_mma_one_row) {
            Fp8Gemv::TensorCores
        } else {
            Fp8Gemv::Plain
        })
    }

    /// Whether a projection of `rows` rows of `k` inputs runs on an FP8 GEMV kernel.
    pub(super) fn fp8_gemv_applies(&self, rows: usize, k: usize) -> bool {
        self.fp8_gemv_kernel(rows, k).is_some()
    }

    /// `rows` bf16 rows of `k` values as e4m3 codes and scales: `pre` where the kernel that
    /// wrote `x` made them (per token, which is what `input` must be to use them), else
    /// quantized here.
    fn quantized_rows<'a>(
        &self,
        x: Option<&CudaSlice<u16>>,
        pre: Option<&'a Fp8Rows>,
        rows: usize,
        k: usize,
        input: InputScale,
    ) -> Result<QuantizedRows<'a>, BackendError> {
        match pre {
            Some(pre) if input == InputScale::PerToken && pre.scales.len() >= rows => {
                Ok(QuantizedRows::Borrowed(&pre.codes, &pre.scales))
            }
            _ => {
                let (codes, scales) = self.quantize_rows(values_of(x)?, rows, k, input)?;
                Ok(QuantizedRows::Owned(codes, scales))
            }
        }
    }

    /// Quantizes `rows` bf16 rows of `k` values: their e4m3 codes and scales.
    fn quantize_rows(
        &self,
        x: &CudaSlice<u16>,
        rows: usize,
        k: usize,
        input: InputScale,
    ) -> Result<(CudaSlice<u8>, CudaSlice<f32>), BackendError> {
        let mut scales = self.alloc_f32(rows)?;
        let static_scale = match input {
            InputScale::Static(s) => s,
            // Computed per row; `Unquantized` weights are refused at upload.
            InputScale::PerToken | InputScale::Unquantized => 0.0f32,
        };
        let cols = k as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (QUANTIZE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel writes every code before anything reads them.
        let mut codes = dev!("alloc", unsafe {
            self.stream.alloc::<u8>((rows * k).max(1))
        })?;
        let mut b = self.kernel_args(&self.kernels.quantize_fp8_rows);
        b.arg(x)
            .arg(&mut codes)
            .arg(&mut scales)
            .arg(&cols)
            .arg(&static_scale);
        self.launch(b, cfg, "quantize_fp8_rows")?;
        Ok((codes, scales))
    }

    /// `y = x · wᵀ` in f32 for an FP8 weight; `pre`: `x`'s rows quantized by the kernel that
    /// wrote it, if it did.
    pub(super) fn fp8_project(
        &self,
        x: Option<&CudaSlice<u16>>,
        pre: Option<&Fp8Rows>,
        rows: usize,
        w: &Fp8Weight<'_>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        match self.fp8_gemv_kernel(rows, w.k) {
            Some(Fp8Gemv::TensorCores) => {
                let x = values_of(x)?;
                let (m, n, k) = (rows as i32, w.n as i32, w.k as i32);
                let mut b = self.kernel_args(&self.kernels.gemv_fp8_mma);
                b.arg(x)
                    .arg(w.codes)
                    .arg(w.row_scales)
                    .arg(out)
                    .arg(&m)
                    .arg(&n)
                    .arg(&k);
                let cfg = LaunchConfig {
                    grid_dim: (w.n.div_ceil(GEMV_FP8_MMA_ROWS) as u32, 1, 1),
                    block_dim: (GEMV_FP8_MMA_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                return self.launch(b, cfg, "gemv_fp8_mma");
            }
            Some(Fp8Gemv::Plain) => {
                let x = values_of(x)?;
                let (n, k) = (w.n as i32, w.k as i32);
                let mut b = self.kernel_args(&self.kernels.gemv_fp8[rows - 1]);
                b.arg(x)
                    .arg(w.codes)
                    .arg(w.row_scales)
                    .arg(out)
                    .arg(&n)
                    .arg(&k);
                let cfg = LaunchConfig {
                    grid_dim: (w.n.div_ceil(8) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                return self.launch(b, cfg, "gemv_fp8");
            }
            None => {}
        }
        let quantized = self.quantized_rows(x, pre, rows, w.k, w.input)?;
        let (xq, xs) = quantized.parts();
        if self.skinny_fp8_applies(rows, w.k)
            && self.skinny_fp8_linear(xq, xs, w.codes, w.row_scales, out, rows, w.n, w.k)?
        {
            return Ok(());
        }
        self.fp8_gemm_quantized(xq, xs, rows, w, Fp8Out::F32(out))
    }

    /// `y = x · wᵀ` on cuBLASLt's FP8 GEMM, into `out` (bf16, or f32). With the scales
    /// applied by cuBLASLt the product is bf16 (widened for an f32 `out`); without, it is
    /// f32 and scaled by `fp8_scale_rows_cols` into `out`.
    pub(super) fn fp8_gemm_into(
        &self,
        x: Option<&CudaSlice<u16>>,
        pre: Option<&Fp8Rows>,
        rows: usize,
        w: &Fp8Weight<'_>,
        out: Fp8Out<'_>,
    ) -> Result<(), BackendError> {
        let quantized = self.quantized_rows(x, pre, rows, w.k, w.input)?;
        let (xq, xs) = quantized.parts();
        self.fp8_gemm_quantized(xq, xs, rows, w, out)
    }

    /// [`Self::fp8_gemm_into`] of rows already quantized: their codes `xq` and scales `xs`.
    fn fp8_gemm_quantized(
        &self,
        xq: &CudaSlice<u8>,
        xs: &CudaSlice<f32>,
        rows: usize,
        w: &Fp8Weight<'_>,
        out: Fp8Out<'_>,
    ) -> Result<(), BackendError> {
        let gemm = self.fp8_gemm.as_ref().ok_or_else(|| BackendError::Device {
            op: "linear (fp8)",
            detail: self.fp8_support().err().unwrap_or_default(),
        })?;
        let ops = Fp8Operands {
            x: xq,
            x_scales: xs,
            w: w.codes,
            w_scales: w.row_scales,
        };
        let total = (rows * w.n) as i64;
        if gemm.vector_scales() != Some(false) {
            match out {
                Fp8Out::Bf16(y) => {
                    if gemm.scaled(&ops, y, rows, w.k, w.n)? {
                        return Ok(());
                    }
                    return self.fp8_unscaled_then_scale(gemm, &ops, xs, w, rows, Fp8Out::Bf16(y));
                }
                Fp8Out::F32(y) => {
                    let mut narrow = self.alloc_bf16(rows * w.n)?;
                    if gemm.scaled(&ops, &mut narrow, rows, w.k, w.n)? {
                        let mut b = self.kernel_args(&self.kernels.widen_bf16);
                        b.arg(&narrow).arg(y).arg(&total);
                        return self.launch(
                            b,
                            super::elementwise_config(total as usize),
                            "widen_bf16",
                        );
                    }
                    return self.fp8_unscaled_then_scale(gemm, &ops, xs, w, rows, Fp8Out::F32(y));
                }
            }
        }
        self.fp8_unscaled_then_scale(gemm, &ops, xs, w, rows, out)
    }

    /// The unscaled product into f32, then the scales applied into `out`.
    fn fp8_unscaled_then_scale(
        &self,
        gemm: &super::fp8_gemm::Fp8Gemm,
        ops: &Fp8Operands<'_>,
        xs: &CudaSlice<f32>,
        w: &Fp8Weight<'_>,
        rows: usize,
        out: Fp8Out<'_>,
    ) -> Result<(), BackendError> {
        let total = (rows * w.n) as i64;
        let n = w.n as i32;
        let null: u64 = 0;
        match out {
            Fp8Out::F32(y) => {
                gemm.unscaled(ops, y, rows, w.k, w.n)?;
                // Scaled in place: `acc` and `y32` are the same buffer.
                let acc = {
                    use cudarc::driver::DevicePtr;
                    y.device_ptr(&self.stream).0
                };
                let mut b = self.kernel_args(&self.kernels.fp8_scale_rows_cols);
                b.arg(&acc)
                    .arg(y)
                    .arg(&null)
                    .arg(xs)
                    .arg(w.row_scales)
                    .arg(&n)
                    .arg(&total);
                self.launch(
                    b,
                    super::elementwise_config(total as usize),
                    "fp8_scale_rows_cols",
                )
            }
            Fp8Out::Bf16(y) => {
                let mut acc = self.alloc_f32(rows * w.n)?;
                gemm.unscaled(ops, &mut acc, rows, w.k, w.n)?;
                let mut b = self.kernel_args(&self.kernels.fp8_scale_rows_cols);
                b.arg(&acc)
                    .arg(&null)
                    .arg(y)
                    .arg(xs)
                    .arg(w.row_scales)
                    .arg(&n)
                    .arg(&total);
                self.launch(
                    b,
                    super::elementwise_config(total as usize),
                    "fp8_scale_rows_cols",
                )
            }
        }
    }
}

/// A projection's input rows in FP8: made by the kernel that wrote them, or here.
enum QuantizedRows<'a> {
    Borrowed(&'a CudaSlice<u8>, &'a CudaSlice<f32>),
    Owned(CudaSlice<u8>, CudaSlice<f32>),
}

impl QuantizedRows<'_> {
    /// The codes and the scales.
    fn parts(&self) -> (&CudaSlice<u8>, &CudaSlice<f32>) {
        match self {
            QuantizedRows::Borrowed(codes, scales) => (codes, scales),
            QuantizedRows::Owned(codes, scales) => (codes, scales),
        }
    }
}

/// Where an FP8 product goes: bf16 (an output only an elementwise op reads) or f32.
pub(super) enum Fp8Out<'a> {
    Bf16(&'a mut CudaSlice<u16>),
    F32(&'a mut CudaSlice<f32>),
}

/// An FP8 projection's input rows as bf16 values, for the kernels that read those (the
/// GEMVs, and quantizing here): rows held only as FP8 codes are an error, which the codes'
/// writer avoids by writing them only for a projection that reads the codes
/// ([`super::prefetch::Prefetch::next_reads_codes`]).
fn values_of(x: Option<&CudaSlice<u16>>) -> Result<&CudaSlice<u16>, BackendError> {
    x.ok_or_else(|| BackendError::Shape {
        op: "linear (fp8)",
        detail: "the input rows are held only as FP8 codes this projection does not read".into(),
    })
}
