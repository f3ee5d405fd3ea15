//! [`Backend`] for the CUDA backend: the row-wise and elementwise ops (embedding, norms,
//! `silu(gate) * up`, gathers, copies to the host) launched here, the projections
//! ([`super::projection`]), attention ([`super::attention`]) and the KV cache
//! ([`super::kv_cache`]) delegated to the modules that own them.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::tensor::{self, DeviceData, Fp8Rows, MatrixData};
use super::{
    CudaBackend, CudaBatch, CudaKvCache, CudaTensor, CudaWeight, row_threads, rows_config, sample,
    shape_err,
};
use crate::backend::{
    AttentionShape, Backend, BackendError, BatchPlan, DeviceSampler, ForwardLayers, HostTensor,
    InputScale,
};
use crate::kv_cache::KvLayout;

impl CudaBackend {
    /// Greedy sampling on the device: the index of each row's largest value.
    pub fn argmax_rows(&self, logits: &CudaTensor) -> Result<Vec<u32>, BackendError> {
        let x = logits.as_f32("argmax_rows")?;
        let mut out = self.alloc_u32(logits.rows)?;
        let cols = logits.cols as i32;
        let mut b = self.stream.launch_builder(&self.kernels.argmax_rows);
        b.arg(x).arg(&mut out).arg(&cols);
        self.launch(b, rows_config(logits.rows, 1024), "argmax_rows")?;
        dev!("argmax_rows", self.stream.clone_dtoh(&out))
    }

    /// Uploads rows of equal length as an f32 tensor (tests and benchmarks of the kernels
    /// that read logits).
    pub fn upload_rows(&self, rows: &[Vec<f32>]) -> Result<CudaTensor, BackendError> {
        let cols = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != cols) {
            return Err(shape_err("upload_rows", "rows of different lengths".into()));
        }
        let flat: Vec<f32> = rows.concat();
        let data = dev!("upload_rows", self.stream.clone_htod(&flat))?;
        Ok(CudaTensor::from_f32(rows.len(), cols, data))
    }

    /// `f` of `[gate | up]` rows `cols` wide.
    fn silu_mul_width(cols: usize) -> Result<usize, BackendError> {
        if cols.is_multiple_of(2) {
            Ok(cols / 2)
        } else {
            Err(shape_err(
                "silu_mul",
                format!("{cols} columns is not [gate | up]"),
            ))
        }
    }

    /// `kernel` (`silu_mul` or `silu_mul_bf16`) over `rows` rows of `[gate | up]` in `x`.
    fn launch_silu_mul<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        x: &CudaSlice<T>,
        rows: usize,
        f: usize,
    ) -> Result<CudaTensor, BackendError> {
        let mut out = self.alloc_bf16(rows * f)?;
        let (rows_i, fi) = (rows as i32, f as i32);
        let pf = self.take_prefetch(rows);
        let mut b = self.stream.launch_builder(kernel);
        b.arg(x)
            .arg(&mut out)
            .arg(&rows_i)
            .arg(&fi)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        // As the kernel splits a row: four columns per thread when f allows.
        let per_thread = if f.is_multiple_of(4) { 4 } else { 1 };
        let threads = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (
                f.div_ceil(per_thread * threads as usize).max(1) as u32,
                rows.clamp(1, 65_535) as u32,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(b, cfg, "silu_mul")?;
        Ok(CudaTensor::from_bf16(rows, f, out))
    }

    /// `launch_silu_mul` through a `silu_mul_quant*` kernel (one block per row), which also
    /// writes the rows' FP8 form into `fp8`.
    fn launch_silu_mul_quant<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        x: &CudaSlice<T>,
        rows: usize,
        f: usize,
        mut fp8: Fp8Rows,
    ) -> Result<CudaTensor, BackendError> {
        let mut out = self.alloc_bf16(rows * f)?;
        let (rows_i, fi) = (rows as i32, f as i32);
        let pf = self.take_prefetch(rows);
        let mut b = self.stream.launch_builder(kernel);
        b.arg(x)
            .arg(&mut out)
            .arg(&mut fp8.codes)
            .arg(&mut fp8.scales)
            .arg(&rows_i)
            .arg(&fi)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        let cfg = rows_config(self.row_blocks(rows, pf), 256);
        self.launch(b, cfg, "silu_mul_quant")?;
        Ok(CudaTensor::from_bf16(rows, f, out).with_fp8(Some(fp8)))
    }

    /// Buffers for the FP8 form of `rows` rows of `cols` that a norm or silu_mul writes beside
    /// its bf16 output: where it is on ([`CudaOptions::fp8_fused_quant`]), a weight quantizes
    /// its input per token, and the rows are more than the FP8 GEMV takes (it reads bf16).
    fn fused_fp8_rows(&self, rows: usize, cols: usize) -> Result<Option<Fp8Rows>, BackendError> {
        if !(self.switches.fp8_fused_quant()
            && self
                .fp8_per_token_inputs
                .load(std::sync::atomic::Ordering::Relaxed)
            && rows > 0
            && !self.fp8_gemv_applies(rows, cols))
        {
            return Ok(None);
        }
        // SAFETY: the kernel writes every code before anything reads them.
        let codes = dev!("alloc", unsafe { self.stream.alloc::<u8>(rows * cols) })?;
        let scales = self.alloc_f32(rows)?;
        Ok(Some(Fp8Rows { codes, scales }))
    }

    /// Rows `indices` (the device address of `n` row indices) of `x`, in its own type.
    fn gather(
        &self,
        x: &CudaTensor,
        indices: &u64,
        n: usize,
        op: &'static str,
    ) -> Result<CudaTensor, BackendError> {
        let cols = x.cols as i32;
        let cfg = rows_config(n, 256);
        match &x.data {
            DeviceData::F32(xs) => {
                let mut out = self.alloc_f32(n * x.cols)?;
                let mut b = self.stream.launch_builder(&self.kernels.gather_rows);
                b.arg(xs).arg(indices).arg(&mut out).arg(&cols);
                self.launch(b, cfg, op)?;
                Ok(CudaTensor::from_f32(n, x.cols, out))
            }
            DeviceData::Bf16(xs) => {
                let mut out = self.alloc_bf16(n * x.cols)?;
                let mut b = self.stream.launch_builder(&self.kernels.gather_rows_bf16);
                b.arg(xs).arg(indices).arg(&mut out).arg(&cols);
                self.launch(b, cfg, op)?;
                Ok(CudaTensor::from_bf16(n, x.cols, out))
            }
        }
    }

    pub(super) fn check_vector<'w>(
        op: &'static str,
        weight: &'w CudaWeight,
        len: usize,
    ) -> Result<&'w CudaSlice<f32>, BackendError> {
        match weight {
            CudaWeight::Vector { data, len: l } if *l == len => Ok(data),
            other => Err(BackendError::Shape {
                op,
                detail: format!("expected a vector of {len}, got {}", other.describe()),
            }),
        }
    }
}

/// Rows from which `silu_mul` also quantizes its output for an FP8 down projection.
const SILU_QUANT_MIN_ROWS: usize = 512;

/// The device addresses of `fp8`'s codes and scales for a norm kernel's `q8` and `q_scales`
/// arguments, or two nulls (the kernel writes no FP8 form).
fn fp8_row_pointers(stream: &cudarc::driver::CudaStream, fp8: Option<&mut Fp8Rows>) -> (u64, u64) {
    use cudarc::driver::DevicePtrMut;
    match fp8 {
        Some(rows) => (
            rows.codes.device_ptr_mut(stream).0,
            rows.scales.device_ptr_mut(stream).0,
        ),
        None => (0, 0),
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Batch = CudaBatch;

    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, {} SMs; bf16 weights and KV, f32 activations; kernels {})",
            self.ctx.ordinal(),
            self.name,
            self.multiprocessors,
            self.kernels.origin
        )
    }

    fn upload_weight(&self, parts: &[HostTensor<'_>]) -> Result<CudaWeight, BackendError> {
        let weight = tensor::upload_weight(&self.stream, parts, self.fp8_support())?;
        if let CudaWeight::Matrix {
            data:
                MatrixData::Fp8 {
                    input: InputScale::PerToken,
                    ..
                },
            ..
        } = &weight
        {
            self.fp8_per_token_inputs
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(weight)
    }

    fn alloc_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<CudaKvCache, BackendError> {
        self.allocate_kv_cache(layout, num_blocks)
    }

    fn kv_cache_layout(&self, kv: &CudaKvCache) -> KvLayout {
        kv.layout
    }

    fn kv_cache_blocks(&self, kv: &CudaKvCache) -> usize {
        kv.num_blocks
    }

    fn prepare_batch(&self, plan: &BatchPlan) -> Result<CudaBatch, BackendError> {
        CudaBatch::upload(&self.meta_upload(), plan)
    }

    fn run_forward(
        &self,
        plan: &BatchPlan,
        kv: &mut CudaKvCache,
        layers: &mut ForwardLayers<'_, CudaBackend>,
    ) -> Result<Option<CudaTensor>, BackendError> {
        match self.graphs.key(plan, kv, self) {
            Some(key) => self.run_graph(key, plan, kv, layers),
            None => {
                let started = std::time::Instant::now();
                let meta = self.prepare_batch(plan)?;
                sample::chain_tokens(self, *meta.tokens(), &plan.chained)?;
                let prepared = started.elapsed();
                let logits = layers(&meta, kv);
                if tracing::enabled!(tracing::Level::DEBUG) {
                    // What the stream-ordered allocator holds: queueing that blocks while the
                    // pool grows (an offline run's ramp-up) shows here.
                    let (reserved, used) = self.memory_pool_bytes().unwrap_or((0, 0));
                    tracing::debug!(
                        tokens = meta.num_tokens,
                        prepare_ms = prepared.as_secs_f64() * 1e3,
                        layers_ms = (started.elapsed() - prepared).as_secs_f64() * 1e3,
                        pool_reserved_mib = reserved >> 20,
                        pool_used_mib = used >> 20,
                        "queued an eager forward"
                    );
                }
                logits
            }
        }
    }

    fn embedding(&self, table: &CudaWeight, batch: &CudaBatch) -> Result<CudaTensor, BackendError> {
        let CudaWeight::Matrix {
            data: MatrixData::Bf16(data),
            rows: _,
            cols,
        } = table
        else {
            return Err(shape_err(
                "embedding",
                "the table is not a bf16 matrix".into(),
            ));
        };
        let hidden = *cols;
        let mut out = self.alloc_f32(batch.num_tokens * hidden)?;
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(&self.kernels.embedding);
        b.arg(data).arg(batch.tokens()).arg(&mut out).arg(&h);
        self.launch(b, rows_config(batch.num_tokens, 256), "embedding")?;
        Ok(CudaTensor::from_f32(batch.num_tokens, hidden, out))
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        let w = Self::check_vector("rms_norm", weight, x.cols)?;
        let xs = x.as_f32("rms_norm")?;
        let mut out = self.alloc_bf16(x.rows * x.cols)?;
        let (rows, cols) = (x.rows as i32, x.cols as i32);
        let pf = self.take_prefetch(x.rows);
        let mut fp8 = self.fused_fp8_rows(x.rows, x.cols)?;
        let (q8, q_scales) = fp8_row_pointers(&self.stream, fp8.as_mut());
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(xs)
            .arg(w)
            .arg(&mut out)
            .arg(&rows)
            .arg(&cols)
            .arg(&eps)
            .arg(&pf.ptr)
            .arg(&pf.bytes)
            .arg(&q8)
            .arg(&q_scales);
        let cfg = rows_config(self.row_blocks(x.rows, pf), row_threads(x.cols));
        self.launch(b, cfg, "rms_norm")?;
        Ok(CudaTensor::from_bf16(x.rows, x.cols, out).with_fp8(fp8))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        if (residual.rows, residual.cols) != (x.rows, x.cols) {
            return Err(shape_err(
                "add_rms_norm",
                format!(
                    "residual {}x{} vs x {}x{}",
                    residual.rows, residual.cols, x.rows, x.cols
                ),
            ));
        }
        let w = Self::check_vector("add_rms_norm", weight, x.cols)?;
        let (rows, cols_n) = (residual.rows, residual.cols);
        let res = residual.as_f32_mut("add_rms_norm")?;
        let mut out = self.alloc_bf16(rows * cols_n)?;
        let (rows_i, cols) = (rows as i32, cols_n as i32);
        let pf = self.take_prefetch(rows);
        let mut fp8 = self.fused_fp8_rows(rows, cols_n)?;
        let (q8, q_scales) = fp8_row_pointers(&self.stream, fp8.as_mut());
        let mut b = match &x.data {
            DeviceData::F32(xs) => {
                let mut b = self.stream.launch_builder(&self.kernels.add_rms_norm);
                b.arg(res).arg(xs);
                b
            }
            DeviceData::Bf16(xs) => {
                let mut b = self.stream.launch_builder(&self.kernels.add_rms_norm_bf16);
                b.arg(res).arg(xs);
                b
            }
        };
        b.arg(w)
            .arg(&mut out)
            .arg(&rows_i)
            .arg(&cols)
            .arg(&eps)
            .arg(&pf.ptr)
            .arg(&pf.bytes)
            .arg(&q8)
            .arg(&q_scales);
        let cfg = rows_config(self.row_blocks(rows, pf), row_threads(cols_n));
        self.launch(b, cfg, "add_rms_norm")?;
        Ok(CudaTensor::from_bf16(rows, cols_n, out).with_fp8(fp8))
    }

    fn prefetch_weight(&self, weight: &CudaWeight) {
        self.prefetch.announce(&self.stream, weight);
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        self.project(x, weight, bias)
    }

    fn linear_qkv(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        self.project_qkv(x, weight, bias)
    }

    fn rope_and_cache_write(
        &self,
        qkv: &mut CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &mut CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        self.rope_and_write_cache(qkv, batch, shape, kv, layer)
    }

    fn paged_attention(
        &self,
        qkv: &CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<CudaTensor, BackendError> {
        self.attention(qkv, batch, shape, kv, layer)
    }

    fn all_reduce_sum(&self, x: &mut CudaTensor) -> Result<(), BackendError> {
        let Some(group) = &self.group else {
            return Err(BackendError::not_in_group());
        };
        let len = x.rows * x.cols;
        dev!("all_reduce_sum", self.ctx.bind_to_thread())?;
        group.all_reduce_sum(x.as_f32_mut("all_reduce_sum")?, len)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor, BackendError> {
        let f = Self::silu_mul_width(gate_up.cols)?;
        // The quantizing kernel takes a block per row: below prefill sizes the plain kernel
        // (a block per four columns' share of every row) and a quantization of its own were
        // faster (H100, Llama-3.1-8B shapes: decode steps of 16-256 rows 1-3% slower fused).
        let fused = if gate_up.rows >= SILU_QUANT_MIN_ROWS {
            self.fused_fp8_rows(gate_up.rows, f)?
        } else {
            None
        };
        if let Some(fp8) = fused {
            return match &gate_up.data {
                DeviceData::F32(x) => self.launch_silu_mul_quant(
                    &self.kernels.silu_mul_quant,
                    x,
                    gate_up.rows,
                    f,
                    fp8,
                ),
                DeviceData::Bf16(x) => self.launch_silu_mul_quant(
                    &self.kernels.silu_mul_quant_bf16,
                    x,
                    gate_up.rows,
                    f,
                    fp8,
                ),
            };
        }
        match &gate_up.data {
            DeviceData::F32(x) => self.launch_silu_mul(&self.kernels.silu_mul, x, gate_up.rows, f),
            DeviceData::Bf16(x) => {
                self.launch_silu_mul(&self.kernels.silu_mul_bf16, x, gate_up.rows, f)
            }
        }
    }

    fn linear_to_residual(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor, BackendError> {
        self.project_to_residual(x, weight, bias)
    }

    fn linear_silu_mul(
        &self,
        x: &CudaTensor,
        gate_up: &CudaWeight,
        next: &CudaWeight,
    ) -> Result<CudaTensor, BackendError> {
        // In one launch at decode sizes.
        if let Some(act) = self.gemv_silu(x, gate_up, next)? {
            return Ok(act);
        }
        let projected = self.project_gate_up(x, gate_up)?;
        self.prefetch_weight(next);
        self.silu_mul(&projected)
    }

    fn gather_logits_rows(
        &self,
        x: &CudaTensor,
        batch: &CudaBatch,
    ) -> Result<CudaTensor, BackendError> {
        if x.rows != batch.num_tokens {
            return Err(shape_err(
                "gather_logits_rows",
                format!("{} rows for {} tokens", x.rows, batch.num_tokens),
            ));
        }
        self.gather(
            x,
            batch.logits_rows(),
            batch.num_logits,
            "gather_logits_rows",
        )
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> Result<CudaTensor, BackendError> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(shape_err("gather_rows", format!("row {r} of {}", x.rows)));
        }
        // Copied from pageable memory before `clone_htod` returns; freed in stream order.
        let indices = dev!("gather_rows", self.stream.clone_htod(rows))?;
        let (address, _in_use) = cudarc::driver::DevicePtr::device_ptr(&indices, &self.stream);
        self.gather(x, &address, rows.len(), "gather_rows")
    }

    fn rows_to_host(&self, x: &CudaTensor, rows: &[usize]) -> Result<Vec<Vec<f32>>, BackendError> {
        let data = x.as_f32("rows_to_host")?;
        rows.iter()
            .map(|&r| {
                if r >= x.rows {
                    return Err(shape_err("rows_to_host", format!("row {r} of {}", x.rows)));
                }
                dev!(
                    "rows_to_host",
                    self.stream
                        .clone_dtoh(&data.slice(r * x.cols..(r + 1) * x.cols))
                )
            })
            .collect()
    }

    fn device_sampler(&self) -> Option<&dyn DeviceSampler<CudaTensor>> {
        if self.options.device_sampling {
            Some(self)
        } else {
            None
        }
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<Vec<f32>>, BackendError> {
        let flat: Vec<f32> = match &x.data {
            DeviceData::F32(d) => dev!("to_host", self.stream.clone_dtoh(d))?,
            DeviceData::Bf16(d) => dev!("to_host", self.stream.clone_dtoh(d))?
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect(),
        };
        Ok(flat
            .chunks(x.cols.max(1))
            .take(x.rows)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
