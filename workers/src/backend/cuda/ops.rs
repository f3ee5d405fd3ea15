//! [`Backend`] for the CUDA backend: the row-wise and elementwise ops (embedding, norms,
//! `silu(gate) * up`, gathers, copies to the host) launched here, the projections
//! ([`super::projection`]), attention ([`super::attention`]) and the KV cache
//! ([`super::kv_cache`]) delegated to the modules that own them.

use super::launch::PushArg;
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::tensor::{self, DeviceData, Fp8Rows, MatrixData};
use super::{
    CudaBackend, CudaBatch, CudaKvCache, CudaTensor, CudaWeight, elementwise_config, norm_threads,
    rows_config, sample, shape_err,
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
        let mut b = self.kernel_args(&self.kernels.argmax_rows);
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
        let mut b = self.kernel_args(kernel);
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
    /// writes the rows' FP8 form (`written.fp8`, which must be there), and their bf16 values
    /// where `written` has room for them.
    fn launch_silu_mul_quant<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        x: &CudaSlice<T>,
        rows: usize,
        f: usize,
        mut written: RowsOut,
    ) -> Result<CudaTensor, BackendError> {
        let (rows_i, fi) = (rows as i32, f as i32);
        let pf = self.take_prefetch(rows);
        let (out, q8, q_scales) = written.pointers(&self.stream);
        let mut b = self.kernel_args(kernel);
        b.arg(x)
            .arg(&out)
            .arg(&q8)
            .arg(&q_scales)
            .arg(&rows_i)
            .arg(&fi)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        let cfg = rows_config(self.row_blocks(rows, pf), 256);
        self.launch(b, cfg, written.op("silu_mul_quant", "silu_mul_quant_codes"))?;
        Ok(written.into_tensor(rows, f))
    }

    /// Where a norm or silu_mul writes `rows` rows of `cols`: bf16 values, with the FP8 codes
    /// of `fp8` ([`Self::fused_fp8_rows`]) beside them where given, and without the values
    /// where the projection announced next reads only the codes.
    fn rows_out(
        &self,
        rows: usize,
        cols: usize,
        fp8: Option<Fp8Rows>,
    ) -> Result<RowsOut, BackendError> {
        let codes_only = fp8.is_some()
            && self.options.fp8_codes_only
            && !self
                .lora_reads_inputs
                .load(std::sync::atomic::Ordering::Relaxed)
            && self.prefetch.next_reads_codes(cols);
        let values = if codes_only {
            None
        } else {
            Some(self.alloc_bf16(rows * cols)?)
        };
        Ok(RowsOut { values, fp8 })
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
                let mut b = self.kernel_args(&self.kernels.gather_rows);
                b.arg(xs).arg(indices).arg(&mut out).arg(&cols);
                self.launch(b, cfg, op)?;
                Ok(CudaTensor::from_f32(n, x.cols, out))
            }
            DeviceData::Bf16(xs) => {
                let mut out = self.alloc_bf16(n * x.cols)?;
                let mut b = self.kernel_args(&self.kernels.gather_rows_bf16);
                b.arg(xs).arg(indices).arg(&mut out).arg(&cols);
                self.launch(b, cfg, op)?;
                Ok(CudaTensor::from_bf16(n, x.cols, out))
            }
            DeviceData::Fp8CodesOnly => Err(shape_err(
                op,
                "the rows are held only as FP8 codes, not values".into(),
            )),
        }
    }

    /// `y[indices[i]] += delta[i]` for the `n` rows whose indices lie on the device at
    /// `indices`.
    fn add_rows_at(
        &self,
        y: &mut CudaTensor,
        indices: &u64,
        n: usize,
        delta: &CudaTensor,
    ) -> Result<(), BackendError> {
        if delta.rows != n || delta.cols != y.cols {
            return Err(shape_err(
                "add_rows",
                format!(
                    "{} rows of {} columns added to {n} rows of {} columns",
                    delta.rows, delta.cols, y.cols
                ),
            ));
        }
        let ds = delta.as_f32("add_rows")?;
        let cols = y.cols as i32;
        let cfg = rows_config(n, 256);
        match &mut y.data {
            DeviceData::F32(ys) => {
                let mut b = self.kernel_args(&self.kernels.add_rows);
                b.arg(ys).arg(indices).arg(ds).arg(&cols);
                self.launch(b, cfg, "add_rows")
            }
            DeviceData::Bf16(ys) => {
                let mut b = self.kernel_args(&self.kernels.add_rows_bf16);
                b.arg(ys).arg(indices).arg(ds).arg(&cols);
                self.launch(b, cfg, "add_rows")
            }
            DeviceData::Fp8CodesOnly => Err(shape_err(
                "add_rows",
                "the rows are held only as FP8 codes, not values".into(),
            )),
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

/// What a norm or silu_mul writes of its rows: their bf16 values, their FP8 codes and
/// per-token scales beside them ([`CudaBackend::fused_fp8_rows`]), or the codes alone where
/// the projection announced next reads nothing else ([`CudaOptions::fp8_codes_only`]).
///
/// [`CudaOptions::fp8_codes_only`]: super::CudaOptions::fp8_codes_only
struct RowsOut {
    values: Option<CudaSlice<u16>>,
    fp8: Option<Fp8Rows>,
}

impl RowsOut {
    /// The device addresses for a kernel's `out`, `q8` and `q_scales` arguments, null for
    /// what is not written.
    fn pointers(&mut self, stream: &cudarc::driver::CudaStream) -> (u64, u64, u64) {
        use cudarc::driver::DevicePtrMut;
        let out = self
            .values
            .as_mut()
            .map_or(0, |v| v.device_ptr_mut(stream).0);
        match self.fp8.as_mut() {
            Some(rows) => (
                out,
                rows.codes.device_ptr_mut(stream).0,
                rows.scales.device_ptr_mut(stream).0,
            ),
            None => (out, 0, 0),
        }
    }

    /// The operation's name for its launch: `codes` where only the FP8 codes are written
    /// (tests count those launches apart), else `plain`.
    fn op(&self, plain: &'static str, codes: &'static str) -> &'static str {
        if self.values.is_none() { codes } else { plain }
    }

    fn into_tensor(self, rows: usize, cols: usize) -> CudaTensor {
        match (self.values, self.fp8) {
            (Some(values), fp8) => CudaTensor::from_bf16(rows, cols, values).with_fp8(fp8),
            (None, Some(fp8)) => CudaTensor::from_fp8_codes(rows, cols, fp8),
            (None, None) => unreachable!("RowsOut holds values, codes or both"),
        }
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
        self.lora_rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
        let h = hidden as i32;
        let cfg = rows_config(batch.num_tokens, 256);
        if self.options.residual_stream_bf16 {
            let mut out = self.alloc_bf16(batch.num_tokens * hidden)?;
            let mut b = self.kernel_args(&self.kernels.embedding_bf16);
            b.arg(data).arg(batch.tokens()).arg(&mut out).arg(&h);
            self.launch(b, cfg, "embedding_bf16")?;
            return Ok(CudaTensor::from_bf16(batch.num_tokens, hidden, out));
        }
        let mut out = self.alloc_f32(batch.num_tokens * hidden)?;
        let mut b = self.kernel_args(&self.kernels.embedding);
        b.arg(data).arg(batch.tokens()).arg(&mut out).arg(&h);
        self.launch(b, cfg, "embedding")?;
        Ok(CudaTensor::from_f32(batch.num_tokens, hidden, out))
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        let w = Self::check_vector("rms_norm", weight, x.cols)?;
        let (rows, cols) = (x.rows as i32, x.cols as i32);
        let pf = self.take_prefetch(x.rows);
        let fp8 = self.fused_fp8_rows(x.rows, x.cols)?;
        let mut written = self.rows_out(x.rows, x.cols, fp8)?;
        let (out, q8, q_scales) = written.pointers(&self.stream);
        let mut b = match &x.data {
            DeviceData::F32(xs) => {
                let mut b = self.kernel_args(&self.kernels.rms_norm);
                b.arg(xs);
                b
            }
            DeviceData::Bf16(xs) => {
                let mut b = self.kernel_args(&self.kernels.rms_norm_bf16);
                b.arg(xs);
                b
            }
            DeviceData::Fp8CodesOnly => {
                return Err(shape_err(
                    "rms_norm",
                    "x is held only as FP8 codes, not values".into(),
                ));
            }
        };
        b.arg(w)
            .arg(&out)
            .arg(&rows)
            .arg(&cols)
            .arg(&eps)
            .arg(&pf.ptr)
            .arg(&pf.bytes)
            .arg(&q8)
            .arg(&q_scales);
        let cfg = rows_config(
            self.row_blocks(x.rows, pf),
            norm_threads(x.cols, self.norm_block_is_wide(x.rows, pf)),
        );
        self.launch(b, cfg, written.op("rms_norm", "rms_norm_codes"))?;
        Ok(written.into_tensor(x.rows, x.cols))
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
        let (rows_i, cols) = (rows as i32, cols_n as i32);
        let pf = self.take_prefetch(rows);
        let fp8 = self.fused_fp8_rows(rows, cols_n)?;
        let mut written = self.rows_out(rows, cols_n, fp8)?;
        let (out, q8, q_scales) = written.pointers(&self.stream);
        let k = &self.kernels;
        let mut b = match (&mut residual.data, &x.data) {
            (_, DeviceData::Fp8CodesOnly) | (DeviceData::Fp8CodesOnly, _) => {
                return Err(shape_err(
                    "add_rms_norm",
                    "the residual or x is held only as FP8 codes, not values".into(),
                ));
            }
            (DeviceData::F32(res), DeviceData::F32(xs)) => {
                let mut b = self.kernel_args(&k.add_rms_norm);
                b.arg(res).arg(xs);
                b
            }
            (DeviceData::F32(res), DeviceData::Bf16(xs)) => {
                let mut b = self.kernel_args(&k.add_rms_norm_bf16);
                b.arg(res).arg(xs);
                b
            }
            (DeviceData::Bf16(res), DeviceData::F32(xs)) => {
                let mut b = self.kernel_args(&k.add_rms_norm_rbf16);
                b.arg(res).arg(xs);
                b
            }
            (DeviceData::Bf16(res), DeviceData::Bf16(xs)) => {
                let mut b = self.kernel_args(&k.add_rms_norm_bf16_rbf16);
                b.arg(res).arg(xs);
                b
            }
        };
        b.arg(w)
            .arg(&out)
            .arg(&rows_i)
            .arg(&cols)
            .arg(&eps)
            .arg(&pf.ptr)
            .arg(&pf.bytes)
            .arg(&q8)
            .arg(&q_scales);
        let cfg = rows_config(
            self.row_blocks(rows, pf),
            norm_threads(cols_n, self.norm_block_is_wide(rows, pf)),
        );
        self.launch(b, cfg, written.op("add_rms_norm", "add_rms_norm_codes"))?;
        Ok(written.into_tensor(rows, cols_n))
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

    fn head_rms_norm(
        &self,
        qkv: &mut CudaTensor,
        q_norm: &CudaWeight,
        k_norm: &CudaWeight,
        shape: &AttentionShape,
        eps: f32,
    ) -> Result<(), BackendError> {
        let d = shape.head_dim;
        let (qw, kw) = (
            Self::check_vector("head_rms_norm", q_norm, d)?,
            Self::check_vector("head_rms_norm", k_norm, d)?,
        );
        let width = (shape.num_heads + 2 * shape.num_kv_heads) * d;
        if qkv.cols != width {
            return Err(shape_err(
                "head_rms_norm",
                format!("rows of {} where q/k/v rows are {width} wide", qkv.cols),
            ));
        }
        let heads = shape.num_heads + shape.num_kv_heads;
        let (cols, q_heads, k_heads, dim) = (
            width as i32,
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            d as i32,
        );
        // One warp a head, four heads a block.
        const HEADS_PER_BLOCK: usize = 4;
        let cfg = LaunchConfig {
            grid_dim: (
                qkv.rows.max(1) as u32,
                heads.div_ceil(HEADS_PER_BLOCK) as u32,
                1,
            ),
            block_dim: (32 * HEADS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = match &mut qkv.data {
            DeviceData::F32(x) => {
                let mut b = self.kernel_args(&self.kernels.head_rms_norm);
                b.arg(x);
                b
            }
            DeviceData::Bf16(x) => {
                let mut b = self.kernel_args(&self.kernels.head_rms_norm_bf16);
                b.arg(x);
                b
            }
            DeviceData::Fp8CodesOnly => {
                return Err(shape_err(
                    "head_rms_norm",
                    "q/k/v rows held only as FP8 codes, not values".into(),
                ));
            }
        };
        b.arg(qw)
            .arg(kw)
            .arg(&cols)
            .arg(&q_heads)
            .arg(&k_heads)
            .arg(&dim)
            .arg(&eps);
        self.launch(b, cfg, "head_rms_norm")
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
        let codes_only = || {
            shape_err(
                "silu_mul",
                "gate_up is held only as FP8 codes, not values".into(),
            )
        };
        let fused = if gate_up.rows >= SILU_QUANT_MIN_ROWS {
            self.fused_fp8_rows(gate_up.rows, f)?
        } else {
            None
        };
        if fused.is_some() {
            let written = self.rows_out(gate_up.rows, f, fused)?;
            return match &gate_up.data {
                DeviceData::F32(x) => self.launch_silu_mul_quant(
                    &self.kernels.silu_mul_quant,
                    x,
                    gate_up.rows,
                    f,
                    written,
                ),
                DeviceData::Bf16(x) => self.launch_silu_mul_quant(
                    &self.kernels.silu_mul_quant_bf16,
                    x,
                    gate_up.rows,
                    f,
                    written,
                ),
                DeviceData::Fp8CodesOnly => Err(codes_only()),
            };
        }
        match &gate_up.data {
            DeviceData::F32(x) => self.launch_silu_mul(&self.kernels.silu_mul, x, gate_up.rows, f),
            DeviceData::Bf16(x) => {
                self.launch_silu_mul(&self.kernels.silu_mul_bf16, x, gate_up.rows, f)
            }
            DeviceData::Fp8CodesOnly => Err(codes_only()),
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

    fn add_rows(
        &self,
        y: &mut CudaTensor,
        rows: &[u32],
        delta: &CudaTensor,
    ) -> Result<(), BackendError> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= y.rows) {
            return Err(shape_err("add_rows", format!("row {r} of {}", y.rows)));
        }
        if rows.is_empty() {
            return Ok(());
        }
        // Copied from pageable memory before `clone_htod` returns; freed in stream order.
        let indices = dev!("add_rows", self.stream.clone_htod(rows))?;
        let (address, _in_use) = cudarc::driver::DevicePtr::device_ptr(&indices, &self.stream);
        self.add_rows_at(y, &address, rows.len(), delta)
    }

    /// The products in bf16, as every projection of this backend reads its input: the gathered
    /// rows as they are, their `A` product rounded to bf16 before `B` reads it. The rows'
    /// indices go to the device once a forward (at the adapter's first projection), and an
    /// adapter whose rows are the whole batch reads the projection's input as it is.
    fn add_lora(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        rows: &[u32],
        a: &CudaWeight,
        b: &CudaWeight,
    ) -> Result<(), BackendError> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows.min(y.rows)) {
            return Err(shape_err("add_lora", format!("row {r} of {}", x.rows)));
        }
        if rows.is_empty() {
            return Ok(());
        }
        // A prompt's rows are one run, so an adapter's prompts in a step are a few.
        if let Some(runs) = super::lora::contiguous_runs(rows, super::lora::IN_PLACE_RUNS) {
            for run in runs {
                self.add_lora_in_place(y, x, run, a, b)?;
            }
            return Ok(());
        }
        let mut cache = self.lora_rows.lock().unwrap_or_else(|p| p.into_inner());
        let at = match cache.iter().position(|(r, _)| r == rows) {
            Some(at) => at,
            None => {
                // Copied from pageable memory before `clone_htod` returns.
                let indices = dev!("add_lora", self.stream.clone_htod(rows))?;
                cache.push((rows.to_vec(), indices));
                cache.len() - 1
            }
        };
        let (address, _in_use) = cudarc::driver::DevicePtr::device_ptr(&cache[at].1, &self.stream);
        let whole = rows.len() == x.rows && rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        let gathered;
        let xa = if whole {
            x
        } else {
            gathered = self.gather(x, &address, rows.len(), "add_lora")?;
            &gathered
        };
        let t = self.project(xa, a, None)?;
        let n = t.rows * t.cols;
        let mut narrow = self.alloc_bf16(n)?;
        let total = n as i64;
        let mut args = self.kernel_args(&self.kernels.cast_bf16);
        args.arg(t.as_f32("add_lora")?).arg(&mut narrow).arg(&total);
        self.launch(args, elementwise_config(n), "add_lora")?;
        let t = CudaTensor::from_bf16(t.rows, t.cols, narrow);
        let delta = self.project(&t, b, None)?;
        self.add_rows_at(y, &address, rows.len(), &delta)
    }

    fn lora_stacked_rows(&self) -> usize {
        super::lora::STACKED_ROWS
    }

    fn add_lora_stacked(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        batch: &CudaBatch,
        stack: &crate::backend::LoraStack<CudaWeight>,
        first_rows: Option<usize>,
    ) -> Result<(), BackendError> {
        self.lora_stacked(y, x, batch, stack, first_rows)
    }

    /// The adapters' products read the projections' inputs as bf16 values: an FP8 model's
    /// norms and silu_mul then write them beside the FP8 codes its projections read, where
    /// they would otherwise write the codes alone ([`CudaOptions::fp8_codes_only`]).
    ///
    /// [`CudaOptions::fp8_codes_only`]: super::CudaOptions::fp8_codes_only
    fn enable_lora(&self, _weights: crate::backend::WeightDType) -> Result<(), String> {
        self.lora_reads_inputs
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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
            DeviceData::Fp8CodesOnly => {
                return Err(shape_err(
                    "to_host",
                    "the rows are held only as FP8 codes, not values".into(),
                ));
            }
        };
        Ok(flat
            .chunks(x.cols.max(1))
            .take(x.rows)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
