//! The CPU backend: f32 activations, weights kept in their file dtype (f32, bf16 or f16) and
//! widened to f32 as they are read, rayon threads, AVX2+FMA kernels with portable twins.
//!
//! - [`simd`]: dot products with one fixed arithmetic (the root of batch invariance).
//! - [`matmul`]: `linear`, GEMV and GEMM in one kernel family.
//! - [`quant`]: GGUF block-quantized weights kept quantized, with integer dot-product kernels.
//! - [`norm`]: RMSNorm, residual-add + RMSNorm, SiLU-and-multiply.
//! - [`attention`]: rope fused with the KV-cache write, paged attention.
//! - [`kv`]: the paged KV cache in host memory.
//!
//! All ops run inside the backend's own thread pool, so the threads a worker uses are the ones
//! it was configured with, not rayon's global pool shared with everything else in the process.

pub mod attention;
pub mod group;
pub mod kv;
pub mod matmul;
pub mod norm;
pub mod simd;

/// The quantized products live in a crate of their own (`cpu-quant/`).
pub use tandem_cpu_quant as quant;

use half::{bf16, f16};

pub use kv::CpuKvCache;
pub use matmul::PackedWeight;

use super::{
    AttentionShape, Backend, BackendError, BatchPlan, GgufTensor, HostTensor, InputScale,
    WeightDType,
};
use crate::kv_cache::KvLayout;

/// Settings of [`CpuBackend`].
#[derive(Debug, Clone, Default)]
pub struct CpuOptions {
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    /// Widen bf16/f16 weight matrices to f32 at load. Off by default: it doubles memory and the
    /// bytes decode reads per token, and prefill already widens blocks into a scratch
    /// ([`matmul`]); kept for measuring (`cpu_bench --widen-weights`).
    pub widen_weights: bool,
    /// The quantized kernels' instruction set ([`quant::Isa`]); `None` takes the best this CPU
    /// has. Every choice computes the same bits; kept for measuring (`cpu_bench
    /// --quant-kernels`).
    pub quant_isa: Option<quant::Isa>,
    /// From how many quantized rows the kernels multiply two column groups at once where
    /// the instruction set can; `None` times it at the first quantized weight's load
    /// ([`quant::calibrate`]). Every choice computes the same bits; kept for measuring
    /// (`cpu_bench --quant-pair-from-rows`).
    pub quant_pair_from_rows: Option<usize>,
    /// The 8-bit codes each activation gets in the quantized (GGUF) products: two by default
    /// (about 15 bits: the f32 model's answers), one for llama.cpp's rounding and more
    /// prefill speed ([`quant::ActivationCodes`]).
    pub quant_activations: quant::ActivationCodes,
}

/// Activations: row-major `[rows, cols]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "CpuTensor data is not rows x cols");
        CpuTensor { rows, cols, data }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Weight elements: vectors in f32, matrices packed into panels ([`matmul::PackedWeight`]) in
/// their file dtype (or f32 with [`CpuOptions::widen_weights`]).
#[derive(Debug, Clone)]
pub enum WeightData {
    Vector(Vec<f32>),
    F32(PackedWeight<f32>),
    Bf16(PackedWeight<bf16>),
    F16(PackedWeight<f16>),
    /// An FP8 matrix dequantized to f32, and how its input is quantized before the product.
    Fp8 {
        weight: PackedWeight<f32>,
        input: InputScale,
    },
    /// GGUF blocks, repacked and multiplied quantized ([`quant`]); fused parts may differ in
    /// type.
    Gguf(quant::QuantWeight),
}

/// A weight matrix `[rows, cols]` (`[out, in]`), or a vector (`rows == 1`).
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl CpuWeight {
    fn as_vector(&self, op: &'static str, len: usize) -> Result<&[f32], BackendError> {
        match &self.data {
            WeightData::Vector(v) if v.len() == len => Ok(v),
            _ => Err(BackendError::Shape {
                op,
                detail: format!(
                    "a {}x{} weight where a vector of {len} is needed",
                    self.rows, self.cols
                ),
            }),
        }
    }
}

/// A forward's metadata on the CPU: the plan plus each token's sequence.
#[derive(Debug, Clone)]
pub struct CpuBatch {
    pub plan: BatchPlan,
    pub seq_of_token: Vec<u32>,
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    widen_weights: bool,
    quant_isa: quant::Isa,
    /// Set by the options, or timed at the first quantized weight's load.
    quant_pair_from_rows: std::sync::OnceLock<usize>,
    quant_activations: quant::ActivationCodes,
    /// The tensor-parallel group this backend is a rank of, and its rank.
    group: Option<(std::sync::Arc<group::CpuGroup>, usize)>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CpuBackend {
    pub fn new(options: &CpuOptions) -> Result<Self, BackendError> {
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tandem-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Shape {
                op: "thread pool",
                detail: e.to_string(),
            })?;
        Ok(CpuBackend {
            pool,
            threads,
            widen_weights: options.widen_weights,
            quant_isa: options.quant_isa.unwrap_or_else(quant::Isa::detect),
            quant_pair_from_rows: options
                .quant_pair_from_rows
                .map(std::sync::OnceLock::from)
                .unwrap_or_default(),
            quant_activations: options.quant_activations,
            group: None,
        })
    }

    /// The quantized kernels' instruction set, and from how many rows they pair groups
    /// (the untimed default until a quantized weight is loaded).
    fn quant_kernels(&self) -> quant::KernelChoice {
        match self.quant_pair_from_rows.get() {
            Some(&pair_from_rows) => quant::KernelChoice {
                isa: self.quant_isa,
                pair_from_rows,
            },
            None => quant::KernelChoice::untimed(self.quant_isa),
        }
    }

    /// [`Self::new`] as rank `rank` of `group` (ranks in threads of one process).
    pub fn in_group(
        options: &CpuOptions,
        group: std::sync::Arc<group::CpuGroup>,
        rank: usize,
    ) -> Result<Self, BackendError> {
        if rank >= group.size() {
            return Err(BackendError::Collective {
                op: "tensor-parallel group",
                detail: format!("rank {rank} of a group of {}", group.size()),
            });
        }
        let mut backend = Self::new(options)?;
        backend.group = Some((group, rank));
        Ok(backend)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

fn parse_elems<T>(bytes: &[u8], size: usize, f: impl Fn(&[u8]) -> T) -> Vec<T> {
    bytes.chunks_exact(size).map(f).collect()
}

/// All parts' elements in one vector (`extend` per part: a `flat_map` over billions of
/// elements is several times slower).
fn parse_parts<T>(parts: &[HostTensor<'_>], f: impl Fn(&HostTensor<'_>) -> Vec<T>) -> Vec<T> {
    let mut all = Vec::with_capacity(parts.iter().map(HostTensor::elems).sum());
    for p in parts {
        all.extend(f(p));
    }
    all
}

fn parse_f32(t: &HostTensor<'_>) -> Vec<f32> {
    match t.dtype {
        WeightDType::F32 => {
            parse_elems(t.bytes, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        WeightDType::Bf16 => parse_elems(t.bytes, 2, |b| {
            bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        WeightDType::F16 => parse_elems(t.bytes, 2, |b| {
            f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        // Each code times its row's scale (exact in f32: a 4-bit significand times the scale).
        WeightDType::F8E4M3 => {
            let cols = t.shape.get(1).copied().unwrap_or(t.bytes.len()).max(1);
            t.bytes
                .iter()
                .enumerate()
                .map(|(i, &code)| float8::F8E4M3::from_bits(code).to_f32() * t.row_scale(i / cols))
                .collect()
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Batch = CpuBatch;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {}, quantized kernels {} with {}-bit activations{})",
            self.threads,
            if simd::has_avx2() {
                "avx2+fma"
            } else {
                "portable kernels"
            },
            self.quant_kernels().describe(),
            self.quant_activations.bits(),
            if self.widen_weights {
                ", weights widened to f32"
            } else {
                ""
            }
        )
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn upload_weight(&self, parts: &[HostTensor<'_>]) -> Result<CpuWeight, BackendError> {
        let first = parts
            .first()
            .ok_or_else(|| shape_err("upload_weight", "no tensors".into()))?;
        let (mut rows, cols) = match first.shape {
            [n] => (0, *n), // vectors: `cols` is only checked for matrices
            [_, c] => (0, *c),
            other => {
                return Err(shape_err(
                    "upload_weight",
                    format!("{}-d tensor {other:?}", other.len()),
                ));
            }
        };
        for p in parts {
            if p.dtype != first.dtype || p.shape.len() != first.shape.len() {
                return Err(shape_err(
                    "upload_weight",
                    "parts differ in dtype or rank".into(),
                ));
            }
            if p.bytes.len() != p.elems() * p.dtype.size_bytes() {
                return Err(shape_err(
                    "upload_weight",
                    format!(
                        "{} bytes for shape {:?} of {}",
                        p.bytes.len(),
                        p.shape,
                        p.dtype
                    ),
                ));
            }
            match p.shape {
                [_] => {}
                [r, c] if *c == cols => rows += r,
                other => {
                    return Err(shape_err(
                        "upload_weight",
                        format!("part {other:?} has not {cols} columns"),
                    ));
                }
            }
        }
        if first.shape.len() == 1 {
            // Vectors (norm weights, biases) are small: f32, concatenated.
            let data: Vec<f32> = parse_parts(parts, parse_f32);
            return Ok(CpuWeight {
                rows: 1,
                cols: data.len(),
                data: WeightData::Vector(data),
            });
        }
        let data = match first.dtype {
            // Dequantized to f32 (the CPU has no FP8 arithmetic): what an FP8 product computes,
            // with its input rounded through FP8 in `linear`.
            WeightDType::F8E4M3 => {
                let fused = super::fp8::fuse(parts)?;
                let w: Vec<f32> = parse_parts(parts, parse_f32);
                WeightData::Fp8 {
                    weight: PackedWeight::pack(&w, rows, cols),
                    input: fused.input,
                }
            }
            _ if self.widen_weights => {
                let w: Vec<f32> = parse_parts(parts, parse_f32);
                WeightData::F32(PackedWeight::pack(&w, rows, cols))
            }
            WeightDType::F32 => {
                let w: Vec<f32> = parse_parts(parts, parse_f32);
                WeightData::F32(PackedWeight::pack(&w, rows, cols))
            }
            WeightDType::Bf16 => {
                let w: Vec<bf16> = parse_parts(parts, |p| {
                    parse_elems(p.bytes, 2, |b| {
                        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                    })
                });
                WeightData::Bf16(PackedWeight::pack(&w, rows, cols))
            }
            WeightDType::F16 => {
                let w: Vec<f16> = parse_parts(parts, |p| {
                    parse_elems(p.bytes, 2, |b| {
                        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                    })
                });
                WeightData::F16(PackedWeight::pack(&w, rows, cols))
            }
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn upload_gguf_weight(&self, parts: &[GgufTensor<'_>]) -> Result<CpuWeight, BackendError> {
        let first = parts
            .first()
            .ok_or_else(|| shape_err("upload_gguf_weight", "no tensors".into()))?;
        if let Some(p) = parts.iter().find(|p| p.cols != first.cols) {
            return Err(shape_err(
                "upload_gguf_weight",
                format!("parts of {} and {} columns", first.cols, p.cols),
            ));
        }
        self.quant_pair_from_rows.get_or_init(|| {
            self.pool
                .install(|| quant::calibrate::calibrated(self.quant_isa, first.quant))
                .pair_from_rows
        });
        let pieces: Vec<_> = parts.iter().map(|p| (p.quant, p.bytes, p.rows)).collect();
        let weight = self
            .pool
            .install(|| quant::QuantWeight::from_gguf(&pieces, first.cols))
            .map_err(|e| shape_err("upload_gguf_weight", e.to_string()))?;
        Ok(CpuWeight {
            rows: weight.n(),
            cols: first.cols,
            data: WeightData::Gguf(weight),
        })
    }

    fn alloc_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<CpuKvCache, BackendError> {
        CpuKvCache::new(*layout, num_blocks)
    }

    fn kv_cache_layout(&self, kv: &CpuKvCache) -> KvLayout {
        kv.layout()
    }

    fn kv_cache_blocks(&self, kv: &CpuKvCache) -> usize {
        kv.num_blocks()
    }

    fn prepare_batch(&self, plan: &BatchPlan) -> Result<CpuBatch, BackendError> {
        let mut seq_of_token = vec![0u32; plan.num_tokens()];
        for (s, seq) in plan.sequences.iter().enumerate() {
            let end = seq.token_start + seq.token_count;
            if end > seq_of_token.len() {
                return Err(shape_err(
                    "prepare_batch",
                    format!("sequence {s} ends at token {end} of {}", seq_of_token.len()),
                ));
            }
            seq_of_token[seq.token_start..end].fill(s as u32);
        }
        Ok(CpuBatch {
            plan: plan.clone(),
            seq_of_token,
        })
    }

    fn embedding(&self, table: &CpuWeight, batch: &CpuBatch) -> Result<CpuTensor, BackendError> {
        let cols = table.cols;
        let mut out = vec![0f32; batch.plan.num_tokens() * cols];
        for (row, &token) in out.chunks_mut(cols).zip(&batch.plan.tokens) {
            let t = token as usize;
            if t >= table.rows {
                return Err(shape_err(
                    "embedding",
                    format!("token {token} outside a vocabulary of {}", table.rows),
                ));
            }
            match &table.data {
                WeightData::Vector(_) => {
                    return Err(shape_err("embedding", "the table is a vector".into()));
                }
                WeightData::F32(w) => w.row_f32(t, row),
                WeightData::Bf16(w) => w.row_f32(t, row),
                WeightData::F16(w) => w.row_f32(t, row),
                WeightData::Gguf(w) => w.row_f32(t, row),
                WeightData::Fp8 { .. } => {
                    return Err(shape_err(
                        "embedding",
                        "an FP8 table (checked at load)".into(),
                    ));
                }
            }
        }
        Ok(CpuTensor::new(batch.plan.num_tokens(), cols, out))
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor, BackendError> {
        let w = weight.as_vector("rms_norm", x.cols)?;
        let mut out = vec![0f32; x.data.len()];
        self.pool
            .install(|| norm::rms_norm(&x.data, w, eps, &mut out));
        Ok(CpuTensor::new(x.rows, x.cols, out))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        weight: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor, BackendError> {
        if residual.rows != x.rows || residual.cols != x.cols {
            return Err(shape_err(
                "add_rms_norm",
                format!(
                    "residual {}x{} and x {}x{}",
                    residual.rows, residual.cols, x.rows, x.cols
                ),
            ));
        }
        let w = weight.as_vector("add_rms_norm", x.cols)?;
        let mut out = vec![0f32; x.data.len()];
        self.pool
            .install(|| norm::add_rms_norm(&mut residual.data, &x.data, w, eps, &mut out));
        Ok(CpuTensor::new(x.rows, x.cols, out))
    }

    fn linear(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        bias: Option<&CpuWeight>,
    ) -> Result<CpuTensor, BackendError> {
        if x.cols != weight.cols {
            return Err(shape_err(
                "linear",
                format!(
                    "x has {} columns, weight is {}x{}",
                    x.cols, weight.rows, weight.cols
                ),
            ));
        }
        let bias = bias
            .map(|b| b.as_vector("linear bias", weight.rows))
            .transpose()?;
        let (rows, n) = (x.rows, weight.rows);
        let mut out = vec![0f32; rows * n];
        self.pool.install(|| match &weight.data {
            WeightData::Vector(_) => Err(shape_err("linear", "the weight is a vector".into())),
            WeightData::F32(w) => {
                matmul::linear(&x.data, rows, w, bias, &mut out);
                Ok(())
            }
            WeightData::Bf16(w) => {
                matmul::linear(&x.data, rows, w, bias, &mut out);
                Ok(())
            }
            WeightData::F16(w) => {
                matmul::linear(&x.data, rows, w, bias, &mut out);
                Ok(())
            }
            WeightData::Fp8 { weight, input } => {
                let mut quantized = x.data.clone();
                for row in quantized.chunks_mut(x.cols.max(1)) {
                    super::fp8::round_row_through_fp8(row, *input);
                }
                matmul::linear(&quantized, rows, weight, bias, &mut out);
                Ok(())
            }
            WeightData::Gguf(w) => {
                quant::linear_stacked(
                    self.quant_kernels(),
                    self.quant_activations,
                    &x.data,
                    rows,
                    w,
                    bias,
                    &mut out,
                );
                Ok(())
            }
        })?;
        Ok(CpuTensor::new(rows, n, out))
    }

    fn head_rms_norm(
        &self,
        qkv: &mut CpuTensor,
        q_norm: &CpuWeight,
        k_norm: &CpuWeight,
        shape: &AttentionShape,
        eps: f32,
    ) -> Result<(), BackendError> {
        let d = shape.head_dim;
        let (q, k) = (
            q_norm.as_vector("head_rms_norm", d)?,
            k_norm.as_vector("head_rms_norm", d)?,
        );
        let width = (shape.num_heads + 2 * shape.num_kv_heads) * d;
        if qkv.cols != width {
            return Err(shape_err(
                "head_rms_norm",
                format!("rows of {} where q/k/v rows are {width} wide", qkv.cols),
            ));
        }
        let heads = (shape.num_heads, shape.num_kv_heads);
        self.pool
            .install(|| norm::head_rms_norm(&mut qkv.data, width, heads, q, k, eps));
        Ok(())
    }

    fn rope_and_cache_write(
        &self,
        qkv: &mut CpuTensor,
        batch: &CpuBatch,
        shape: &AttentionShape,
        kv: &mut CpuKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        attention::rope_and_cache_write(&mut qkv.data, &batch.plan, shape, kv, layer);
        Ok(())
    }

    fn paged_attention(
        &self,
        qkv: &CpuTensor,
        batch: &CpuBatch,
        shape: &AttentionShape,
        kv: &CpuKvCache,
        layer: usize,
    ) -> Result<CpuTensor, BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        let out = self.pool.install(|| {
            attention::paged_attention(
                &qkv.data,
                &batch.plan,
                &batch.seq_of_token,
                shape,
                kv,
                layer,
            )
        });
        Ok(CpuTensor::new(
            qkv.rows,
            shape.num_heads * shape.head_dim,
            out,
        ))
    }

    fn all_reduce_sum(&self, x: &mut CpuTensor) -> Result<(), BackendError> {
        let Some((group, rank)) = &self.group else {
            return Err(BackendError::not_in_group());
        };
        group
            .all_reduce_sum(*rank, &mut x.data)
            .map_err(|detail| BackendError::Collective {
                op: "all_reduce_sum",
                detail,
            })
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor, BackendError> {
        if !gate_up.cols.is_multiple_of(2) {
            return Err(shape_err("silu_mul", format!("odd width {}", gate_up.cols)));
        }
        let f = gate_up.cols / 2;
        let mut out = vec![0f32; gate_up.rows * f];
        self.pool
            .install(|| norm::silu_mul(&gate_up.data, f, &mut out));
        Ok(CpuTensor::new(gate_up.rows, f, out))
    }

    fn gather_logits_rows(
        &self,
        x: &CpuTensor,
        batch: &CpuBatch,
    ) -> Result<CpuTensor, BackendError> {
        let rows = &batch.plan.logits_rows;
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r as usize >= x.rows {
                return Err(shape_err(
                    "gather_logits_rows",
                    format!("row {r} of {}", x.rows),
                ));
            }
            out.extend_from_slice(x.row(r as usize));
        }
        Ok(CpuTensor::new(rows.len(), x.cols, out))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor, BackendError> {
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r as usize >= x.rows {
                return Err(shape_err("gather_rows", format!("row {r} of {}", x.rows)));
            }
            out.extend_from_slice(x.row(r as usize));
        }
        Ok(CpuTensor::new(rows.len(), x.cols, out))
    }

    fn add_rows(
        &self,
        y: &mut CpuTensor,
        rows: &[u32],
        delta: &CpuTensor,
    ) -> Result<(), BackendError> {
        if delta.rows != rows.len() || delta.cols != y.cols {
            return Err(shape_err(
                "add_rows",
                format!(
                    "{} rows of {} columns added to {} rows of {} columns",
                    delta.rows,
                    delta.cols,
                    rows.len(),
                    y.cols
                ),
            ));
        }
        let cols = y.cols;
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            if r >= y.rows {
                return Err(shape_err("add_rows", format!("row {r} of {}", y.rows)));
            }
            let src = &delta.data[i * cols..(i + 1) * cols];
            for (out, d) in y.data[r * cols..(r + 1) * cols].iter_mut().zip(src) {
                *out += d;
            }
        }
        Ok(())
    }

    /// Every model the CPU loads computes from f32 activations, FP8 and GGUF blocks
    /// included.
    fn enable_lora(&self, _weights: crate::backend::WeightDType) -> Result<(), String> {
        Ok(())
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<Vec<f32>>, BackendError> {
        Ok(x.data.chunks(x.cols.max(1)).map(<[f32]>::to_vec).collect())
    }
}

/// Checks the shapes every attention op relies on, so a bad call is an error and not a panic
/// (or a read of another sequence's blocks).
fn check_attention(
    qkv: &CpuTensor,
    batch: &CpuBatch,
    shape: &AttentionShape,
    kv: &CpuKvCache,
    layer: usize,
) -> Result<(), BackendError> {
    let layout = kv.layout();
    let plan = &batch.plan;
    if qkv.cols != shape.qkv_width() || qkv.rows != plan.num_tokens() {
        return Err(shape_err(
            "attention",
            format!(
                "qkv is {}x{}, expected {}x{}",
                qkv.rows,
                qkv.cols,
                plan.num_tokens(),
                shape.qkv_width()
            ),
        ));
    }
    if layout.num_kv_heads != shape.num_kv_heads
        || layout.head_dim != shape.head_dim
        || layer >= layout.num_layers
        || layout.block_size != plan.block_size
        || plan.rope_half * 2 != shape.head_dim
        || shape.num_kv_heads == 0
        || !shape.num_heads.is_multiple_of(shape.num_kv_heads)
    {
        return Err(shape_err(
            "attention",
            format!(
                "cache layout {layout:?} does not fit {shape:?}, layer {layer}, block size {}",
                plan.block_size
            ),
        ));
    }
    for &block in &plan.block_tables {
        if block as usize >= kv.num_blocks() {
            return Err(BackendError::BlockOutOfRange {
                block,
                num_blocks: kv.num_blocks(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
