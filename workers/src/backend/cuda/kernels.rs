//! The CUDA kernels: `.cu` sources in `workers/kernels/`, compiled by NVRTC at start-up for the
//! device's own architecture (`sm_90` on Hopper, so the driver has no PTX to JIT) and cached as
//! cubin files, so a restart loads them in milliseconds.
//!
//! The sources are compiled as one program: `common.cuh` (bf16 conversions, reductions)
//! followed by every kernel file. They use no CUDA toolkit header, so NVRTC needs no include
//! path and the machine needs no toolkit, only the driver and `libnvrtc`.

use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{Ptx, result as nvrtc, sys as nvrtc_sys};

const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
    // After gemv.cu: it uses that file's bf16x8_to_f32.
    ("fp8.cu", include_str!("../../../kernels/fp8.cu")),
    ("flash.cu", include_str!("../../../kernels/flash.cu")),
    // After flash.cu: it uses that file's ldmatrix, cp.async and mma helpers.
    (
        "decode_mma.cu",
        include_str!("../../../kernels/decode_mma.cu"),
    ),
    // After decode_mma.cu: it runs that file's 16-key step and query.
    (
        "decode_mma_warps.cu",
        include_str!("../../../kernels/decode_mma_warps.cu"),
    ),
    (
        "flash_wgmma.cu",
        include_str!("../../../kernels/flash_wgmma.cu"),
    ),
    ("skinny.cu", include_str!("../../../kernels/skinny.cu")),
    // After gemv.cu: it uses that file's bf16x8_to_f32.
    ("lora.cu", include_str!("../../../kernels/lora.cu")),
    // Before sample.cu: its truncated draw and the ranking's keys.
    (
        "sample_rank.cu",
        include_str!("../../../kernels/sample_rank.cu"),
    ),
    ("sample.cu", include_str!("../../../kernels/sample.cu")),
];

/// Head dimensions `attention.cu` instantiates `paged_attention_d*` for.
const ATTENTION_HEAD_DIMS: &[(usize, &str)] = &[
    (16, "paged_attention_d16"),
    (32, "paged_attention_d32"),
    (64, "paged_attention_d64"),
    (80, "paged_attention_d80"),
    (96, "paged_attention_d96"),
    (128, "paged_attention_d128"),
    (256, "paged_attention_d256"),
];

/// Head dimensions of the vectorized decode attention `paged_attention_vec_d*` (a lane group
/// of D/8 lanes per key), preferred over `paged_attention_d*` where it exists.
const VEC_ATTENTION_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_attention_vec_d64"),
    (128, "paged_attention_vec_d128"),
    (256, "paged_attention_vec_d256"),
];

/// The same over an FP8 cache (`paged_attention_vec_fp8_d*`): the decode attention of one.
const VEC_ATTENTION_FP8_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_attention_vec_fp8_d64"),
    (128, "paged_attention_vec_fp8_d128"),
    (256, "paged_attention_vec_fp8_d256"),
];

/// The warp-per-key kernel over an FP8 cache (`paged_attention_fp8_d*`), for the head dims the
/// vectorized one lacks.
const ATTENTION_FP8_HEAD_DIMS: &[(usize, &str)] = &[
    (16, "paged_attention_fp8_d16"),
    (32, "paged_attention_fp8_d32"),
    (80, "paged_attention_fp8_d80"),
    (96, "paged_attention_fp8_d96"),
];

/// Query heads per block of `paged_attention_vec_d*` (`ATTN_VEC_GMAX` in attention.cu).
pub const ATTN_VEC_HEADS: usize = 4;

/// Head dimensions of the tensor-core decode attention `paged_decode_mma_d*`
/// (`decode_mma.cu`), preferred over the vectorized kernel where it exists.
const DECODE_MMA_HEAD_DIMS: &[(usize, &str)] =
    &[(64, "paged_decode_mma_d64"), (128, "paged_decode_mma_d128")];
/// The same kernels for caches whose blocks hold whole tiles ([`DecodeMmaKernels`]).
const DECODE_MMA_TILES_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_decode_mma_tiles_d64"),
    (128, "paged_decode_mma_tiles_d128"),
];
/// The tensor-core decode attention over an FP8 cache, as the two lists above.
const DECODE_MMA_FP8_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_decode_mma_fp8_d64"),
    (128, "paged_decode_mma_fp8_d128"),
];
const DECODE_MMA_FP8_TILES_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_decode_mma_fp8_tiles_d64"),
    (128, "paged_decode_mma_fp8_tiles_d128"),
];
/// The same over an FP8 cache by persistent warps (`decode_mma_warps.cu`), each walking its
/// items 16 keys at a time, for caches whose blocks hold whole tiles and steps whose contexts
/// are not split.
const DECODE_MMA_FP8_WARPS_HEAD_DIMS: &[(usize, &str)] = &[
    (64, "paged_decode_mma_fp8_warps_d64"),
    (128, "paged_decode_mma_fp8_warps_d128"),
];

/// The tensor-core decode attention by head dimension, in two builds: one for any block size,
/// and one for caches whose blocks are whole multiples of its 64-key tiles (the GPU default of
/// 64 tokens among them), which finds each tile's block once instead of once per key.
pub struct DecodeMmaKernels {
    pub any_block: Vec<(usize, CudaFunction)>,
    pub whole_tiles: Vec<(usize, CudaFunction)>,
}

impl DecodeMmaKernels {
    /// The kernel for `head_dim` over a cache of `block_size`-token blocks, if there is one.
    pub fn for_shape(&self, head_dim: usize, block_size: usize) -> Option<&CudaFunction> {
        let list = if block_size.is_multiple_of(DecodeMmaConfig::KEYS) {
            &self.whole_tiles
        } else {
            &self.any_block
        };
        list.iter().find(|(d, _)| *d == head_dim).map(|(_, k)| k)
    }
}

/// The tensor-core decode attention's settings (`decode_mma.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeMmaConfig {
    /// Shared-memory stages of K/V tiles (`DM_STAGES`): tiles in flight plus the one in use.
    pub stages: usize,
    /// The same over an FP8 cache (`DM_STAGES_FP8`).
    pub fp8_stages: usize,
    /// Stages of 16-key chunks of each warp of the persistent-warp FP8 kernel (`DW_STAGES`).
    pub warp_stages: usize,
}

impl DecodeMmaConfig {
    /// Keys per tile (`DM_KEYS`): the unit a split of the context is made of.
    pub const KEYS: usize = 64;
    /// Query heads per block (`DM_HEADS`).
    pub const HEADS: usize = 8;
    /// Warps per block (`DM_WARPS`).
    pub const WARPS: usize = 4;

    fn from_defines(defines: &[String]) -> Self {
        DecodeMmaConfig {
            stages: define_value(defines, "DM_STAGES").unwrap_or(3).max(2),
            fp8_stages: define_value(defines, "DM_STAGES_FP8").unwrap_or(3).max(2),
            warp_stages: define_value(defines, "DW_STAGES").unwrap_or(3).max(2),
        }
    }

    /// `stages` of a K and a V tile of `KEYS` rows of `head_dim` bf16 values.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        self.stages * 2 * Self::KEYS * head_dim * 2
    }

    /// The same over an FP8 cache: `fp8_stages` stages of codes (one byte each), widened by
    /// each lane as it reads its fragments.
    pub fn smem_bytes_fp8(&self, head_dim: usize) -> usize {
        self.fp8_stages * 2 * Self::KEYS * head_dim
    }

    /// The persistent-warp FP8 kernel's: each of a block's [`Self::WARPS`] warps has
    /// `warp_stages` stages of a K and a V chunk of 16 keys' codes.
    pub fn smem_bytes_fp8_warps(&self, head_dim: usize) -> usize {
        Self::WARPS * self.warp_stages * 2 * 16 * head_dim
    }
}

/// The prefill attention kernel's tile settings (`flash.cu`), which decide its dynamic shared
/// memory: the kernel's defaults, or what `-D FA_KEYS=` / `-D FA_Q_SMEM=` definitions set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashConfig {
    /// Keys per shared-memory tile (`FA_KEYS`, a multiple of 32).
    pub keys: usize,
    /// The query rows live in shared memory (`FA_Q_SMEM`).
    pub q_in_smem: bool,
}

impl Default for FlashConfig {
    fn default() -> Self {
        FlashConfig {
            keys: 32,
            q_in_smem: false,
        }
    }
}

impl FlashConfig {
    /// Query rows per block and head (`FA_ROWS`).
    const ROWS: usize = 128;

    /// The settings `defines` (`NAME=VALUE`) give the kernel, over its defaults.
    pub fn from_defines(defines: &[String]) -> Self {
        let value = |name| define_value(defines, name);
        let default = FlashConfig::default();
        FlashConfig {
            keys: value("FA_KEYS").unwrap_or(default.keys),
            q_in_smem: value("FA_Q_SMEM").map_or(default.q_in_smem, |v| v != 0),
        }
    }

    /// Dynamic shared memory of `flash_prefill_d{head_dim}` with `heads` query heads per
    /// block: two K and two V tiles of `keys` rows, and with `q_in_smem` each head's query
    /// rows; rows padded by 8 halves.
    pub fn smem_bytes(&self, head_dim: usize, heads: usize) -> usize {
        let row_bytes = (head_dim + 8) * 2;
        let kv = 2 * 2 * self.keys * row_bytes;
        let q = if self.q_in_smem {
            heads * Self::ROWS * row_bytes
        } else {
            0
        };
        kv + q
    }
}

/// The warpgroup prefill attention's settings (`flash_wgmma.cu`): keys per tile (`WG_KEYS`,
/// 64 or 128) and shared-memory stages (`WG_STAGES`), which decide its dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgmmaFlashConfig {
    pub keys: usize,
    pub stages: usize,
    /// `WG_PERSISTENT`: a block per multiprocessor walks the work items.
    pub persistent: bool,
}

impl WgmmaFlashConfig {
    /// Threads of a block: two consumer warpgroups of 64 query rows each, and the producer
    /// warpgroup.
    pub const THREADS: u32 = 384;

    fn from_defines(defines: &[String]) -> Self {
        let keys = define_value(defines, "WG_KEYS").unwrap_or(128);
        WgmmaFlashConfig {
            keys,
            // As flash_wgmma.cu defaults it: three 64 KiB stages of 128 keys, four of 64.
            stages: define_value(defines, "WG_STAGES").unwrap_or(if keys == 128 { 3 } else { 4 }),
            // As flash_wgmma.cu defaults it: persistent unless `WG_PERSISTENT=0`.
            persistent: define_value(defines, "WG_PERSISTENT").is_none_or(|v| v != 0),
        }
    }

    /// `stages` of a K and a V tile (`keys` rows of 256 bytes each), and 1 KiB to align them
    /// to the 1024 bytes a swizzle atom needs.
    pub fn smem_bytes(&self) -> usize {
        self.stages * 2 * self.keys * 256 + 1024
    }
}

/// The value the last `NAME=VALUE` of `defines` gives `name`, where it is a number.
fn define_value(defines: &[String], name: &str) -> Option<usize> {
    defines
        .iter()
        .filter_map(|d| d.split_once('='))
        .filter(|(n, _)| *n == name)
        .filter_map(|(_, v)| v.trim().parse::<usize>().ok())
        .next_back()
}

/// Query heads per block of `flash_prefill_d*_h2`.
pub const FLASH_PAIR_HEADS: usize = 2;

/// Rows up to which projections use `gemv.cu` instead of cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;
const GEMV_NAMES: [&str; GEMV_MAX_ROWS] = [
    "gemv_bf16_m1",
    "gemv_bf16_m2",
    "gemv_bf16_m3",
    "gemv_bf16_m4",
    "gemv_bf16_m5",
    "gemv_bf16_m6",
    "gemv_bf16_m7",
    "gemv_bf16_m8",
];

/// `gemv_silu_bf16_m*`: the [gate | up] GEMV with the SiLU product taken as it is written.
const GEMV_SILU_NAMES: [&str; GEMV_MAX_ROWS] = [
    "gemv_silu_bf16_m1",
    "gemv_silu_bf16_m2",
    "gemv_silu_bf16_m3",
    "gemv_silu_bf16_m4",
    "gemv_silu_bf16_m5",
    "gemv_silu_bf16_m6",
    "gemv_silu_bf16_m7",
    "gemv_silu_bf16_m8",
];
/// Gate rows (and as many up rows) of a `gemv_silu_*` block: half its warps.
pub const GEMV_SILU_PAIRS: usize = 4;
/// Gate rows of a `gemv_fp8_mma_silu` block.
pub const GEMV_FP8_MMA_SILU_PAIRS: usize = 8;
/// `gemv_fp8_silu_m*`: the plain FP8 GEMV's rows (up to 2) of the same.
pub const GEMV_FP8_SILU_NAMES: [&str; 2] = ["gemv_fp8_silu_m1", "gemv_fp8_silu_m2"];

/// Input features `gemv_fp8_mma`'s warps take at a time: the weights' input features must be
/// a multiple of it.
pub const GEMV_FP8_MMA_CHUNK: usize = 64;
/// Output rows of a `gemv_fp8_mma` block, and its threads.
pub const GEMV_FP8_MMA_ROWS: usize = 16;
pub const GEMV_FP8_MMA_THREADS: u32 = 256;
const GEMV_FP8_NAMES: [&str; GEMV_MAX_ROWS] = [
    "gemv_fp8_m1",
    "gemv_fp8_m2",
    "gemv_fp8_m3",
    "gemv_fp8_m4",
    "gemv_fp8_m5",
    "gemv_fp8_m6",
    "gemv_fp8_m7",
    "gemv_fp8_m8",
];

/// Rows up to which `skinny.cu`'s warpgroup GEMM is instantiated (`gpu_bench` compares it
/// with cuBLAS up to here).
pub const SKINNY_MAX_ROWS: usize = 256;
/// Rows up to which projections on Hopper use `skinny.cu` instead of cuBLAS (above the GEMV
/// kernel's rows): where it was measured faster on an H100 for every Llama-3.1-8B projection
/// but qkv, which it matches (docs/benchmarks.md); past that, cuBLAS is faster.
pub const SKINNY_DISPATCH_ROWS: usize = 32;
/// The same for projections this wide or wider (vocabulary heads), where `skinny.cu` is faster
/// up to 128 rows.
pub const SKINNY_WIDE_OUTPUTS: usize = 32_768;
pub const SKINNY_WIDE_DISPATCH_ROWS: usize = 128;
/// Rows up to which projections of FP8 weights on Hopper use `skinny.cu`'s FP8 kernel instead
/// of cuBLASLt (above the FP8 GEMV's rows): measured on an H100 (Llama-3.1-8B shapes,
/// docs/benchmarks.md), it is faster for every projection up to 64 rows; at 128-256 rows
/// cuBLASLt is faster for qkv, o and down, and whole decode steps were slower with it for
/// gate_up too (whose cuBLASLt output is bf16, half the bytes of its f32 one).
pub const SKINNY_FP8_DISPATCH_ROWS: usize = 64;
/// Output features per block of `skinny_gemm_n*` (`SK_FEATURES`).
pub const SKINNY_FEATURES: usize = 128;
/// Threads per block of `skinny_gemm_n*` (`SK_THREADS`): two consumer warpgroups, a producer.
pub const SKINNY_THREADS: u32 = 384;
/// The widths `skinny.cu` is instantiated for: rows are rounded up to the next (wgmma's N).
pub const SKINNY_WIDTHS: [usize; 7] = [16, 32, 64, 96, 128, 192, 256];
const SKINNY_NAMES: [&str; 7] = [
    "skinny_gemm_n16",
    "skinny_gemm_n32",
    "skinny_gemm_n64",
    "skinny_gemm_n96",
    "skinny_gemm_n128",
    "skinny_gemm_n192",
    "skinny_gemm_n256",
];
/// `skinny_fp8_n*`: the same widths over FP8 weights (stages of the same bytes).
const SKINNY_FP8_NAMES: [&str; 7] = [
    "skinny_fp8_n16",
    "skinny_fp8_n32",
    "skinny_fp8_n64",
    "skinny_fp8_n96",
    "skinny_fp8_n128",
    "skinny_fp8_n192",
    "skinny_fp8_n256",
];

/// Dynamic shared memory of `skinny_gemm_n{width}`: its stages (`SK_STAGES`, `SK_STAGE_BYTES`:
/// a 128 x 64 W tile and `width` x 64 of x, as many as fit in 200 KiB, at most 8) and 1 KiB to
/// align them to the 1024 bytes a swizzle atom needs.
pub fn skinny_smem_bytes(width: usize) -> usize {
    let stage = SKINNY_FEATURES * 128 + width * 128;
    let stages = if stage * 8 <= 200 * 1024 {
        8
    } else {
        200 * 1024 / stage
    };
    stages * stage + 1024
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NVRTC failed to compile the kernels for {arch}: {reason}\n{log}")]
    Compile {
        arch: String,
        reason: String,
        log: String,
    },
    #[error("loading the compiled kernels: {0}")]
    Load(String),
    #[error("kernel `{0}` is missing from the compiled module")]
    Missing(&'static str),
}

/// Every kernel the backend launches.
pub struct Kernels {
    pub embedding: CudaFunction,
    /// `embedding` into a residual stream held in bf16.
    pub embedding_bf16: CudaFunction,
    /// Writes the tokens picked by the previous step's sampling summaries into a batch.
    pub chain_tokens: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_rms_norm: CudaFunction,
    /// `add_rms_norm` of a projection written in bf16.
    pub add_rms_norm_bf16: CudaFunction,
    /// `rms_norm` and the two `add_rms_norm`s of a residual stream held in bf16.
    pub rms_norm_bf16: CudaFunction,
    pub add_rms_norm_rbf16: CudaFunction,
    pub add_rms_norm_bf16_rbf16: CudaFunction,
    pub silu_mul: CudaFunction,
    pub silu_mul_bf16: CudaFunction,
    /// `silu_mul` and `silu_mul_bf16` that also write the rows' FP8 codes and scales.
    pub silu_mul_quant: CudaFunction,
    pub silu_mul_quant_bf16: CudaFunction,
    pub add_bias: CudaFunction,
    pub head_rms_norm: CudaFunction,
    pub head_rms_norm_bf16: CudaFunction,
    pub gather_rows: CudaFunction,
    pub gather_rows_bf16: CudaFunction,
    pub add_rows: CudaFunction,
    pub add_rows_bf16: CudaFunction,
    pub cast_bf16: CudaFunction,
    pub lora_shrink: CudaFunction,
    pub lora_expand: CudaFunction,
    pub lora_expand_bf16: CudaFunction,
    pub gather_masked_rows: CudaFunction,
    /// K/V blocks between the cache and a transfer's device memory, in one launch.
    pub copy_kv_blocks: CudaFunction,
    pub argmax_rows: CudaFunction,
    /// Per-row sampling summaries (`sample.cu`).
    pub sample_rows: CudaFunction,
    pub rope_cache_write: CudaFunction,
    /// The same into an FP8 cache.
    pub rope_cache_write_fp8: CudaFunction,
    /// The attention kernels over an FP8 cache.
    pub fp8_attention: Fp8AttentionKernels,
    /// Paged attention by head dimension.
    pub paged_attention: Vec<(usize, CudaFunction)>,
    /// The vectorized decode attention, for the head dimensions it covers.
    pub paged_attention_vec: Vec<(usize, CudaFunction)>,
    /// The tensor-core decode attention, for the head dimensions it covers, and its settings.
    pub paged_decode_mma: DecodeMmaKernels,
    pub decode_mma_config: DecodeMmaConfig,
    pub attention_combine: CudaFunction,
    /// Prefill attention on the tensor cores, by head dimension: one query head per block.
    pub flash_prefill: Vec<(usize, CudaFunction)>,
    /// The same with two query heads of one KV head per block (`FLASH_PAIR_HEADS`).
    pub flash_prefill_pairs: Vec<(usize, CudaFunction)>,
    /// `gemv_bf16_m{M}` for M = 1..=GEMV_MAX_ROWS (index M - 1).
    pub gemv: Vec<CudaFunction>,
    /// `gemv_fp8_m{M}` (`fp8.cu`), as `gemv`.
    pub gemv_fp8: Vec<CudaFunction>,
    /// The FP8 GEMV on the tensor cores (`fp8.cu`): any rows up to 8, input features a
    /// multiple of [`GEMV_FP8_MMA_CHUNK`].
    pub gemv_fp8_mma: CudaFunction,
    /// `gemv_silu_bf16_m{M}` (index M - 1): `gemv` of the MLP's [gate | up] weight writing
    /// silu(gate) * up.
    pub gemv_silu: Vec<CudaFunction>,
    /// `gemv_fp8_silu_m{M}`, M = 1, 2: the same over FP8 codes.
    pub gemv_fp8_silu: Vec<CudaFunction>,
    /// `gemv_fp8_mma` writing silu(gate) * up.
    pub gemv_fp8_mma_silu: CudaFunction,
    /// Quantizes activation rows to FP8 codes and per-row scales (`fp8.cu`).
    pub quantize_fp8_rows: CudaFunction,
    /// bf16 to f32, elementwise (`fp8.cu`).
    pub widen_bf16: CudaFunction,
    /// An FP8 product's scales applied to its unscaled sums (`fp8.cu`).
    pub fp8_scale_rows_cols: CudaFunction,
    /// The prefill attention kernels' tile settings (their shared memory).
    pub flash_config: FlashConfig,
    /// Prefill attention of head dim 128 on warpgroup instructions, where the kernels were
    /// compiled for `sm_90a` (Hopper), with its tile settings.
    pub flash_wgmma: Option<(CudaFunction, WgmmaFlashConfig)>,
    /// `skinny_gemm_n{width}` by [`SKINNY_WIDTHS`], where the kernels were compiled for
    /// `sm_90a` (Hopper).
    pub skinny: Option<Vec<(usize, CudaFunction)>>,
    /// `skinny_fp8_n{width}` (FP8 weights, activations quantized per row), as `skinny`.
    pub skinny_fp8: Option<Vec<(usize, CudaFunction)>>,
    /// Where the cubin came from, for the start-up log.
    pub origin: String,
}

/// The attention kernels that read an FP8 KV cache (`kv_cache_config.dtype: fp8`), by head
/// dimension: the vectorized decode kernel and `flash.cu`'s prefill kernels, widening the codes
/// as they load them.
pub struct Fp8AttentionKernels {
    /// The tensor-core decode kernel (`decode_mma.cu`), preferred where the head dim has one.
    pub decode_mma: DecodeMmaKernels,
    /// Its persistent-warp form (`decode_mma_warps.cu`), by head dimension.
    pub decode_mma_warps: Vec<(usize, CudaFunction)>,
    pub decode_vec: Vec<(usize, CudaFunction)>,
    /// The warp-per-key decode kernel, for the head dims `decode_vec` lacks.
    pub decode: Vec<(usize, CudaFunction)>,
    pub flash_prefill: Vec<(usize, CudaFunction)>,
    pub flash_prefill_pairs: Vec<(usize, CudaFunction)>,
    /// One layer's K/V of a list of blocks widened to a compact bf16 copy, which the
    /// warpgroup prefill kernel reads.
    pub widen_blocks: CudaFunction,
}

impl Kernels {
    /// Compiles (or loads from the cache under `cache_dir`) the kernels for `ctx`'s device,
    /// with the extra `-D` definitions `defines` (see [`CudaOptions`](super::CudaOptions)).
    pub fn load(
        ctx: &Arc<CudaContext>,
        defines: &[String],
        cache_dir: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| KernelError::Load(e.to_string()))?;
        // Hopper gets its architecture-specific target (`sm_90a`), which the warpgroup
        // instructions of `flash_wgmma.cu` need; the cubin runs on compute capability 9.0 only,
        // and it is compiled for the device it runs on.
        let arch = if (major, minor) == (9, 0) {
            "sm_90a".to_owned()
        } else {
            format!("sm_{major}{minor}")
        };
        let (source, options) = program(&arch, defines);
        let cache_path = cache_dir.map(|dir| cache_file(dir, &source, &options));
        let (cubin, origin) = match cache_path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            Some(bytes) => (bytes, format!("cached {}", cache_path_display(&cache_path))),
            None => {
                let started = std::time::Instant::now();
                let bytes = compile(&source, &options, &arch)?;
                if let Some(path) = &cache_path {
                    store(path, &bytes);
                }
                (
                    bytes,
                    format!(
                        "compiled for {arch} in {:.1} s",
                        started.elapsed().as_secs_f64()
                    ),
                )
            }
        };
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| KernelError::Load(e.to_string()))?;
        let f = |name: &'static str| function(&module, name);
        // A kernel allowed `bytes` of dynamic shared memory (past the 48 KiB a block gets
        // without asking).
        let with_smem = |name: &'static str, bytes: usize| -> Result<CudaFunction, KernelError> {
            let kernel = f(name)?;
            kernel
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| KernelError::Load(format!("{name}: {e}")))?;
            Ok(kernel)
        };
        // Prefill attention for head dims 64 and 128, allowed the dynamic shared memory it
        // needs (35 KiB at head dim 128 by default, under the 48 KiB a block gets without
        // asking; larger tiles need the attribute).
        let flash_config = FlashConfig::from_defines(defines);
        let flash = |names: &[&'static str; 2],
                     heads: usize|
         -> Result<Vec<(usize, CudaFunction)>, KernelError> {
            [64, 128]
                .into_iter()
                .zip(names)
                .map(|(d, &name)| Ok((d, with_smem(name, flash_config.smem_bytes(d, heads))?)))
                .collect()
        };
        let decode_mma_config = DecodeMmaConfig::from_defines(defines);
        let decode_mma = |any_block: &[(usize, &'static str)],
                          whole_tiles: &[(usize, &'static str)],
                          smem: &dyn Fn(usize) -> usize|
         -> Result<DecodeMmaKernels, KernelError> {
            let load = |list: &[(usize, &'static str)]| {
                list.iter()
                    .map(|&(d, name)| Ok((d, with_smem(name, smem(d))?)))
                    .collect::<Result<Vec<_>, KernelError>>()
            };
            Ok(DecodeMmaKernels {
                any_block: load(any_block)?,
                whole_tiles: load(whole_tiles)?,
            })
        };
        let paged_decode_mma =
            decode_mma(DECODE_MMA_HEAD_DIMS, DECODE_MMA_TILES_HEAD_DIMS, &|d| {
                decode_mma_config.smem_bytes(d)
            })?;
        let flash_wgmma = if arch == "sm_90a" {
            let config = WgmmaFlashConfig::from_defines(defines);
            Some((with_smem("flash_wgmma_d128", config.smem_bytes())?, config))
        } else {
            None
        };
        let skinny_family = |names: [&'static str; 7]| -> Result<_, KernelError> {
            if arch != "sm_90a" {
                return Ok(None);
            }
            let kernels = SKINNY_WIDTHS
                .iter()
                .zip(names)
                .map(|(&width, name)| Ok((width, with_smem(name, skinny_smem_bytes(width))?)))
                .collect::<Result<Vec<_>, KernelError>>()?;
            Ok(Some(kernels))
        };
        let skinny = skinny_family(SKINNY_NAMES)?;
        let skinny_fp8 = skinny_family(SKINNY_FP8_NAMES)?;
        Ok(Kernels {
            embedding: f("embedding")?,
            embedding_bf16: f("embedding_bf16")?,
            chain_tokens: f("chain_tokens")?,
            rms_norm: f("rms_norm")?,
            add_rms_norm: f("add_rms_norm")?,
            add_rms_norm_bf16: f("add_rms_norm_bf16")?,
            rms_norm_bf16: f("rms_norm_bf16")?,
            add_rms_norm_rbf16: f("add_rms_norm_rbf16")?,
            add_rms_norm_bf16_rbf16: f("add_rms_norm_bf16_rbf16")?,
            silu_mul: f("silu_mul")?,
            silu_mul_bf16: f("silu_mul_bf16")?,
            silu_mul_quant: f("silu_mul_quant")?,
            silu_mul_quant_bf16: f("silu_mul_quant_bf16")?,
            add_bias: f("add_bias")?,
            head_rms_norm: f("head_rms_norm")?,
            head_rms_norm_bf16: f("head_rms_norm_bf16")?,
            gather_rows: f("gather_rows")?,
            gather_rows_bf16: f("gather_rows_bf16")?,
            add_rows: f("add_rows")?,
            add_rows_bf16: f("add_rows_bf16")?,
            cast_bf16: f("cast_bf16")?,
            lora_shrink: f("lora_shrink")?,
            lora_expand: f("lora_expand")?,
            lora_expand_bf16: f("lora_expand_bf16")?,
            gather_masked_rows: f("gather_masked_rows")?,
            copy_kv_blocks: f("copy_kv_blocks")?,
            argmax_rows: f("argmax_rows")?,
            sample_rows: f("sample_rows")?,
            rope_cache_write: f("rope_cache_write")?,
            rope_cache_write_fp8: f("rope_cache_write_fp8")?,
            fp8_attention: Fp8AttentionKernels {
                decode_mma: decode_mma(
                    DECODE_MMA_FP8_HEAD_DIMS,
                    DECODE_MMA_FP8_TILES_HEAD_DIMS,
                    &|d| decode_mma_config.smem_bytes_fp8(d),
                )?,
                decode_mma_warps: DECODE_MMA_FP8_WARPS_HEAD_DIMS
                    .iter()
                    .map(|&(d, name)| {
                        Ok((
                            d,
                            with_smem(name, decode_mma_config.smem_bytes_fp8_warps(d))?,
                        ))
                    })
                    .collect::<Result<_, KernelError>>()?,
                decode_vec: VEC_ATTENTION_FP8_HEAD_DIMS
                    .iter()
                    .map(|&(d, name)| Ok((d, f(name)?)))
                    .collect::<Result<_, KernelError>>()?,
                decode: ATTENTION_FP8_HEAD_DIMS
                    .iter()
                    .map(|&(d, name)| Ok((d, f(name)?)))
                    .collect::<Result<_, KernelError>>()?,
                flash_prefill: flash(&["flash_prefill_fp8_d64", "flash_prefill_fp8_d128"], 1)?,
                flash_prefill_pairs: flash(
                    &["flash_prefill_fp8_d64_h2", "flash_prefill_fp8_d128_h2"],
                    FLASH_PAIR_HEADS,
                )?,
                widen_blocks: f("widen_fp8_kv_blocks")?,
            },
            paged_attention: ATTENTION_HEAD_DIMS
                .iter()
                .map(|&(d, name)| Ok((d, f(name)?)))
                .collect::<Result<_, KernelError>>()?,
            paged_attention_vec: VEC_ATTENTION_HEAD_DIMS
                .iter()
                .map(|&(d, name)| Ok((d, f(name)?)))
                .collect::<Result<_, KernelError>>()?,
            paged_decode_mma,
            decode_mma_config,
            attention_combine: f("attention_combine")?,
            flash_prefill: flash(&["flash_prefill_d64", "flash_prefill_d128"], 1)?,
            flash_prefill_pairs: flash(
                &["flash_prefill_d64_h2", "flash_prefill_d128_h2"],
                FLASH_PAIR_HEADS,
            )?,
            flash_config,
            flash_wgmma,
            skinny,
            skinny_fp8,
            gemv: GEMV_NAMES
                .iter()
                .map(|&name| f(name))
                .collect::<Result<_, KernelError>>()?,
            gemv_fp8: GEMV_FP8_NAMES
                .iter()
                .map(|&name| f(name))
                .collect::<Result<_, KernelError>>()?,
            gemv_fp8_mma: f("gemv_fp8_mma")?,
            gemv_silu: GEMV_SILU_NAMES
                .iter()
                .map(|&name| f(name))
                .collect::<Result<_, KernelError>>()?,
            gemv_fp8_silu: GEMV_FP8_SILU_NAMES
                .iter()
                .map(|&name| f(name))
                .collect::<Result<_, KernelError>>()?,
            gemv_fp8_mma_silu: f("gemv_fp8_mma_silu")?,
            quantize_fp8_rows: f("quantize_fp8_rows")?,
            widen_bf16: f("widen_bf16")?,
            fp8_scale_rows_cols: f("fp8_scale_rows_cols")?,
            origin,
        })
    }
}

/// The program NVRTC compiles for `arch`: every source file, and the options (with a `-D` for
/// each of `defines`).
fn program(arch: &str, defines: &[String]) -> (String, Vec<String>) {
    let source: String = SOURCES
        .iter()
        .map(|(name, text)| format!("// ---- {name}\n{text}\n"))
        .collect();
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
        "-default-device".to_owned(),
    ];
    // Tuning experiments: extra `-D NAME=VALUE` options (e.g. GEMV_UNROLL=8).
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    (source, options)
}

/// Compiles the kernels for `arch` (e.g. `sm_90`) with the extra `-D` definitions `defines`,
/// without a device: only `libnvrtc` is needed.
pub fn compile_for(arch: &str, defines: &[String]) -> Result<Vec<u8>, KernelError> {
    let (source, options) = program(arch, defines);
    compile(&source, &options, arch)
}

fn function(module: &Arc<CudaModule>, name: &'static str) -> Result<CudaFunction, KernelError> {
    module
        .load_function(name)
        .map_err(|_| KernelError::Missing(name))
}

/// NVRTC: source -> cubin for `arch`.
fn compile(source: &str, options: &[String], arch: &str) -> Result<Vec<u8>, KernelError> {
    let fail = |reason: String, log: String| KernelError::Compile {
        arch: arch.to_owned(),
        reason,
        log,
    };
    let src = CString::new(source).map_err(|e| fail(e.to_string(), String::new()))?;
    let name = c"tandem_kernels.cu";
    let prog =
        nvrtc::create_program(&src, Some(name)).map_err(|e| fail(e.to_string(), String::new()))?;
    // SAFETY: `prog` was created above and is destroyed once, at the end of this function;
    // `src` and `name` outlive it.
    unsafe {
        let compiled = nvrtc::compile_program(prog, options);
        let log = nvrtc::get_program_log(prog)
            .map(|chars| {
                let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches('\0')
                    .to_owned()
            })
            .unwrap_or_default();
        let result = match compiled {
            Err(e) => Err(fail(e.to_string(), log)),
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail(e.to_string(), log.clone()))?;
                let mut cubin = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail(e.to_string(), log.clone()))?;
                if !log.trim().is_empty() {
                    tracing::debug!(log, "NVRTC messages");
                }
                Ok(cubin)
            }
        };
        let _ = nvrtc::destroy_program(prog);
        result
    }
}

/// `<cache_dir>/kernels/<hash of sources, options and NVRTC version>.cubin`.
fn cache_file(cache_dir: &Path, source: &str, options: &[String]) -> PathBuf {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let _ = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    let mut hasher = std::hash::DefaultHasher::new();
    source.hash(&mut hasher);
    options.hash(&mut hasher);
    (major, minor).hash(&mut hasher);
    cache_dir
        .join("kernels")
        .join(format!("{:016x}.cubin", hasher.finish()))
}

fn cache_path_display(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Writes the cubin through a temporary file and a rename, so a concurrent reader never sees
/// half a file. A cache that cannot be written only costs a recompile next time.
fn store(path: &PathBuf, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "cannot cache the compiled kernels: {e}");
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::FlashConfig;

    #[test]
    fn flash_shared_memory_follows_the_definitions() {
        let default = FlashConfig::from_defines(&[]);
        assert_eq!(default, FlashConfig::default());
        // The kernel's own tiles: 2 x (K, V) x 32 keys x (128 + 8) halves.
        assert_eq!(default.smem_bytes(128, 2), 34_816);
        let wide = FlashConfig::from_defines(&[
            "GEMV_UNROLL=8".into(),
            "FA_KEYS=64".into(),
            "FA_Q_SMEM=1".into(),
        ]);
        assert_eq!(
            wide,
            FlashConfig {
                keys: 64,
                q_in_smem: true
            }
        );
        assert_eq!(wide.smem_bytes(128, 2), 2 * 34_816 + 2 * 128 * 136 * 2);
        assert_eq!(wide.smem_bytes(128, 1), 2 * 34_816 + 128 * 136 * 2);
    }

    /// The tensor-core decode attention's stages come from `DM_STAGES` (never fewer than 2:
    /// one tile in flight while one is used), and its merge buffer (4 warps x 8 heads x D
    /// floats) fits in them.
    #[test]
    fn decode_mma_shared_memory_follows_the_definitions() {
        use super::DecodeMmaConfig;
        let default = DecodeMmaConfig::from_defines(&[]);
        assert_eq!(default.stages, 3);
        assert_eq!(default.smem_bytes(128), 3 * 2 * 64 * 128 * 2);
        assert_eq!(
            DecodeMmaConfig::from_defines(&["DM_STAGES=4".into()]).smem_bytes(128),
            4 * 32_768
        );
        assert_eq!(
            DecodeMmaConfig::from_defines(&["DM_STAGES=1".into()]).stages,
            2
        );
        // Over an FP8 cache: 3 stages of codes, half the bf16 kernel's shared memory.
        assert_eq!(default.fp8_stages, 3);
        assert_eq!(default.smem_bytes_fp8(128), 3 * 16_384);
        assert_eq!(default.smem_bytes_fp8(128) * 2, default.smem_bytes(128));
        // The persistent warps: each of 4 warps 3 stages of a K and a V chunk of 16 keys,
        // as much as the per-block kernel's 3 stages of 64-key tiles.
        assert_eq!(default.warp_stages, 3);
        assert_eq!(default.smem_bytes_fp8_warps(128), 4 * 3 * 2 * 16 * 128);
        assert_eq!(default.smem_bytes_fp8_warps(64), default.smem_bytes_fp8(64));
        assert_eq!(
            DecodeMmaConfig::from_defines(&["DW_STAGES=4".into()]).smem_bytes_fp8_warps(128),
            4 * 16_384
        );
        for d in [64, 128] {
            let merge = 4 * DecodeMmaConfig::HEADS * d * 4 + 2 * 4 * DecodeMmaConfig::HEADS * 4;
            let two = DecodeMmaConfig {
                stages: 2,
                fp8_stages: 2,
                warp_stages: 2,
            };
            assert!(two.smem_bytes(d) >= merge, "{d}");
            assert!(two.smem_bytes_fp8(d) >= merge, "{d}");
        }
    }

    /// Every width of `skinny.cu` fits an H100 block's shared memory (227 KiB) with at least
    /// 4 stages in flight.
    #[test]
    fn skinny_shared_memory_fits_hopper() {
        use super::{SKINNY_WIDTHS, skinny_smem_bytes};
        assert_eq!(skinny_smem_bytes(16), 8 * (16_384 + 2_048) + 1_024);
        assert_eq!(skinny_smem_bytes(256), 4 * (16_384 + 32_768) + 1_024);
        for width in SKINNY_WIDTHS {
            let bytes = skinny_smem_bytes(width);
            assert!(bytes <= 227 * 1024, "{width}: {bytes}");
            assert!((bytes - 1024) / (16_384 + width * 128) >= 4, "{width}");
        }
    }
    /// Every kernel waits for the kernel before it ahead of any memory access (`pdl_enter` in
    /// its body, or in the row sums the GEMV kernels call), as a programmatic launch needs
    /// ([`launch`](super::super::launch)): a kernel without it could read what the previous
    /// kernel has not written yet.
    #[test]
    fn every_kernel_waits_for_the_one_before() {
        let mut kernels = 0;
        for (file, source) in super::SOURCES {
            let mut rest = *source;
            while let Some(at) = rest.find("__global__") {
                rest = &rest[at + "__global__".len()..];
                // The body: from the first brace after the parameters to its match.
                let params = rest.find(')').expect("a parameter list");
                let open = params + rest[params..].find('{').expect("a body");
                let mut depth = 0;
                let mut end = open;
                for (i, ch) in rest[open..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                let body = &rest[open + 1..end];
                let head = &rest[..open];
                if body.trim().is_empty() {
                    continue; // a stub for architectures the kernel does not build on
                }
                kernels += 1;
                let waits = body.contains("pdl_enter()")
                    || body.contains("gemv_rows<")
                    || body.contains("gemv_fp8_rows<")
                    || body.contains("row_sums<");
                assert!(waits, "{file}: kernel `{}` has no pdl_enter()", head.trim());
            }
        }
        assert!(kernels >= 30, "found only {kernels} kernels");
    }

    /// The GEMV row sums the test above lets through do wait, before they read anything.
    #[test]
    fn gemv_row_sums_wait_before_they_read() {
        for (file, name) in [
            ("gemv.cu", "gemv_row_sums("),
            ("fp8.cu", "gemv_fp8_row_sums("),
        ] {
            let source = super::SOURCES
                .iter()
                .find(|(f, _)| *f == file)
                .expect("a source")
                .1;
            let body = &source[source.find(name).expect("the function")..];
            let wait = body.find("pdl_enter()").expect("a wait");
            let first_read = body.find("__ldcs").expect("a load");
            assert!(wait < first_read, "{file}: {name} reads before its wait");
        }
    }

    /// The `.cu` files compile for Hopper. Runs wherever `libnvrtc` loads (a GPU machine, or
    /// here with the `nvidia-cuda-nvrtc` wheel's library on LD_LIBRARY_PATH); skipped elsewhere.
    #[test]
    fn kernels_compile_for_sm90() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            tandem_test_skip::skip("libnvrtc not found");
            return;
        }
        let defines = super::super::CudaOptions::from_env(0).kernel_defines;
        // sm_90a compiles the warpgroup kernels (flash_wgmma.cu, skinny.cu) that sm_90 stubs.
        for arch in ["sm_90", "sm_90a"] {
            let cubin = super::compile_for(arch, &defines).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "a cubin is an ELF file");
        }
    }
}
