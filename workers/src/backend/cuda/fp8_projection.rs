//! Projections of FP8 weights: the input rows quantized to FP8 (`quantize_fp8_rows`, per token
//! or by the checkpoint's static scale), then `gemv_fp8_m*` for a few rows (a decode step:
//! reading the weight's codes is the whole cost) or cuBLASLt's FP8 GEMM ([`super::fp8_gemm`]).
//! Both apply the input's and the weight's scales to the f32 sums.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::CudaBackend;
use super::fp8_gemm::Fp8Operands;
use super::gemm::GemmOutput;
use super::kernels::GEMV_MAX_ROWS;
use crate::backend::{BackendError, InputScale};

/// Threads of a `quantize_fp8_rows` block (one block per row).
const QUANTIZE_THREADS: u32 = 256;

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
    /// Whether a projection of `rows` rows runs on `gemv_fp8_m*` (else on cuBLASLt).
    pub(super) fn fp8_gemv_applies(&self, rows: usize, k: usize) -> bool {
        (1..=GEMV_MAX_ROWS.min(self.switches.gemv_max_rows())).contains(&rows)
            && k.is_multiple_of(16)
    }

    /// Quantizes `rows` bf16 rows of `k` values: their scales, and their codes as e4m3 bytes
    /// (`as_bf16` false) or as the bf16 values of the codes (`as_bf16`, for the GEMV kernel).
    fn quantize_rows(
        &self,
        x: &CudaSlice<u16>,
        rows: usize,
        k: usize,
        input: InputScale,
        as_bf16: bool,
    ) -> Result<(QuantizedRows, CudaSlice<f32>), BackendError> {
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
        let null_u8: u64 = 0;
        if as_bf16 {
            let mut codes = self.alloc_bf16(rows * k)?;
            let mut b = self.stream.launch_builder(&self.kernels.quantize_fp8_rows);
            b.arg(x)
                .arg(&null_u8)
                .arg(&mut codes)
                .arg(&mut scales)
                .arg(&cols)
                .arg(&static_scale);
            self.launch(b, cfg, "quantize_fp8_rows")?;
            Ok((QuantizedRows::Bf16(codes), scales))
        } else {
            // SAFETY: the kernel writes every code before anything reads them.
            let mut codes = dev!("alloc", unsafe {
                self.stream.alloc::<u8>((rows * k).max(1))
            })?;
            let null_u16: u64 = 0;
            let mut b = self.stream.launch_builder(&self.kernels.quantize_fp8_rows);
            b.arg(x)
                .arg(&mut codes)
                .arg(&null_u16)
                .arg(&mut scales)
                .arg(&cols)
                .arg(&static_scale);
            self.launch(b, cfg, "quantize_fp8_rows")?;
            Ok((QuantizedRows::Fp8(codes), scales))
        }
    }

    /// `y = x · wᵀ` in f32 for an FP8 weight.
    pub(super) fn fp8_project(
        &self,
        x: &CudaSlice<u16>,
        rows: usize,
        w: &Fp8Weight<'_>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        if self.fp8_gemv_applies(rows, w.k) {
            let (QuantizedRows::Bf16(xq), xs) = self.quantize_rows(x, rows, w.k, w.input, true)?
            else {
                unreachable!("quantize_rows gives bf16 codes when asked");
            };
            let (n, k) = (w.n as i32, w.k as i32);
            let mut b = self.stream.launch_builder(&self.kernels.gemv_fp8[rows - 1]);
            b.arg(&xq)
                .arg(&xs)
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
        self.fp8_gemm_into(x, rows, w, out)
    }

    /// `y = x · wᵀ` on cuBLASLt's FP8 GEMM, written as `T` (f32, or bf16 for an output only an
    /// elementwise op reads).
    pub(super) fn fp8_gemm_into<T: GemmOutput>(
        &self,
        x: &CudaSlice<u16>,
        rows: usize,
        w: &Fp8Weight<'_>,
        out: &mut CudaSlice<T>,
    ) -> Result<(), BackendError> {
        let gemm = self.fp8_gemm.as_ref().ok_or_else(|| BackendError::Device {
            op: "linear (fp8)",
            detail: self.fp8_support().err().unwrap_or_default(),
        })?;
        let (QuantizedRows::Fp8(xq), xs) = self.quantize_rows(x, rows, w.k, w.input, false)? else {
            unreachable!("quantize_rows gives e4m3 codes when asked");
        };
        let ops = Fp8Operands {
            x: &xq,
            x_scales: &xs,
            w: w.codes,
            w_scales: w.row_scales,
        };
        gemm.linear(&ops, out, rows, w.k, w.n)
    }
}

/// Quantized activation rows: e4m3 bytes (cuBLASLt) or the codes' bf16 values (GEMV).
enum QuantizedRows {
    Fp8(CudaSlice<u8>),
    Bf16(CudaSlice<u16>),
}
