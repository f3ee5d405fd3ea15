//! The settings of a CUDA backend ([`CudaOptions`]), and the one place that reads their
//! environment variables ([`CudaOptions::from_env`]).
//!
//! A worker fills them from the environment and then from its GPU flags (a flag wins; see
//! `crate::device::cuda_options`); benchmarks and tests take the environment alone, so a sweep
//! such as `TANDEM_L2_PREFETCH_MB=8 gpu_bench bench ...` sets them without flags.
//! docs/configuration.md lists each variable.

use std::ffi::OsString;
use std::path::PathBuf;

/// Default of [`CudaOptions::gemv_max_rows`]: measured on an H100 (docs/benchmarks.md).
const DEFAULT_GEMV_MAX_ROWS: usize = 4;
/// Default of [`CudaOptions::fp8_gemv_max_rows`]: on an H100 (Llama-3.1-8B shapes in FP8, FP8
/// cache) decode steps of 4 and 8 rows took 3.90 and 4.04 ms on the tensor-core FP8 GEMV
/// against 4.93 and 4.91 on `skinny.cu` (docs/benchmarks.md).
const DEFAULT_FP8_GEMV_MAX_ROWS: usize = 8;

/// Settings of one CUDA backend. [`Default`] is device 0 with every setting at its default and
/// no kernel cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Which device (`cuda:N`).
    pub ordinal: usize,
    /// Decode steps replay CUDA graphs (`TANDEM_CUDA_GRAPHS=0` turns them off).
    pub cuda_graphs: bool,
    /// A tensor-parallel rank keeps `cuda_graphs` (the ranks capture and replay in lockstep);
    /// `TANDEM_TP_CUDA_GRAPHS=0` runs the ranks' decode steps eagerly.
    pub tp_cuda_graphs: bool,
    /// The engine samples from per-row summaries computed on the device; off, every logits row
    /// is copied to the host (`TANDEM_DEVICE_SAMPLING=0`: to compare the two paths).
    pub device_sampling: bool,
    /// Decode attention of head dims 64, 128 and 256 runs the vectorized kernel (a lane group
    /// per key, 16-byte loads); off, the warp-per-key kernel every head dim has
    /// (`TANDEM_ATTN_VEC=0`: to compare the two).
    pub vec_attention: bool,
    /// Decode attention of head dims 64 and 128 runs on the tensor cores with its K/V streamed
    /// through shared memory (`decode_mma.cu`); off, the kernels above
    /// (`TANDEM_DECODE_MMA=0`: to compare).
    pub decode_mma: bool,
    /// Decode attention over an FP8 cache whose blocks hold whole 64-key tiles, where a
    /// token's keys are not split over blocks, runs as persistent warps that walk the (token,
    /// KV head) items alone, 16 keys at a time, with their copies running from one item into
    /// the next (`decode_mma_warps.cu`); off, a block per item (`TANDEM_DECODE_PERSISTENT=0`:
    /// to compare; sums in another order, so close, not the same bits). On an H200
    /// (Llama-3.1-8B shapes, FP8 weights and cache) persistent blocks made decode steps 2.2%
    /// faster than a block per item at 1,024 sequences of 192 keys and 1.7% at 512 of 1,500,
    /// and these warps 2.7% and 2.8% faster than those blocks (docs/benchmarks.md).
    pub decode_persistent: bool,
    /// At most this many blocks for [`Self::decode_persistent`]'s kernel; `None`: as many as
    /// the multiprocessors hold at once (`TANDEM_DECODE_PERSISTENT_BLOCKS`: tests make warps
    /// walk many items with it).
    pub decode_persistent_blocks: Option<usize>,
    /// Prefill attention runs two query heads of one KV head per block, sharing its K/V
    /// tiles, where the query group size is even; off, one head per block
    /// (`TANDEM_FLASH_PAIRS=0`: to compare the two).
    pub flash_head_pairs: bool,
    /// Prefill attention of head dim 128 on Hopper runs the warpgroup (wgmma) kernel
    /// (`flash_wgmma.cu`); off, the mma.sync kernel every tensor-core GPU runs
    /// (`TANDEM_FLASH_WGMMA=0`: to compare the two).
    pub flash_wgmma: bool,
    /// Decode projections on Hopper run the warpgroup GEMM of `skinny.cu` (weights streamed by
    /// TMA, K split over blocks) where it measured faster than cuBLAS per projection; off by
    /// default (`TANDEM_SKINNY_GEMM=1` turns it on), since whole decode steps measured no
    /// faster with it (docs/benchmarks.md).
    pub skinny_gemm: bool,
    /// `skinny.cu` runs every projection it has rows for (up to
    /// [`SKINNY_MAX_ROWS`](super::kernels::SKINNY_MAX_ROWS)), not only those where it measured
    /// faster than cuBLAS: `gpu_bench`'s comparison of the two at every row count. No
    /// environment variable.
    pub skinny_everywhere: bool,
    /// Projections of FP8 weights at decode sizes (more rows than the FP8 GEMV takes, up to
    /// [`SKINNY_MAX_ROWS`](super::kernels::SKINNY_MAX_ROWS)) run `skinny.cu`'s FP8 kernel on
    /// Hopper instead of cuBLASLt (`TANDEM_SKINNY_FP8=0`: cuBLASLt, to compare the two).
    pub skinny_fp8: bool,
    /// The norms and silu_mul write their rows' FP8 codes and per-token scales beside their
    /// bf16 output where an FP8 projection of more rows than the FP8 GEMV takes reads them,
    /// so that projection launches no quantization of its own (`TANDEM_FP8_FUSED_QUANT=0`:
    /// the projection quantizes, to compare; the codes are the same either way).
    pub fp8_fused_quant: bool,
    /// Prefill attention over an FP8 cache copies the blocks its chunks read, one layer at a
    /// time, widened to bf16, and runs the warpgroup kernel (`flash_wgmma`, head dim 128 on
    /// Hopper) over the copy instead of `flash.cu`'s FP8 kernel, which widens as it loads
    /// (`TANDEM_FP8_PREFILL_WIDEN=0`: the FP8 kernel, to compare; the values are the same).
    pub fp8_prefill_widen: bool,
    /// `rope_cache_write` rotates rows the q/k/v projection wrote in bf16 in shared memory
    /// and writes back only q, the part attention reads (k and v go to the cache); off, it
    /// widens each row into global memory and rotates it there (`TANDEM_ROPE_SHARED=0`: to
    /// compare; the same values).
    pub rope_shared: bool,
    /// With [`Self::rope_shared`], over an FP8 cache where the warpgroup kernel runs the
    /// prefill attention, `rope_cache_write` writes the prefill rows' q as the bf16 that
    /// kernel reads (q times its score scale) instead of f32: half the bytes written and read
    /// back (`TANDEM_PREFILL_Q_BF16=0`: f32, to compare; the same scores).
    pub prefill_q_bf16: bool,
    /// Projections of at most this many rows run the GEMV kernel, larger ones `skinny.cu` or
    /// cuBLAS; 0 sends every projection past them (at most
    /// [`GEMV_MAX_ROWS`](super::kernels::GEMV_MAX_ROWS)). No environment variable: benchmarks
    /// set it to compare the GEMV kernel with cuBLAS.
    pub gemv_max_rows: usize,
    /// Projections of FP8 weights of at most this many rows run an FP8 GEMV kernel (the
    /// tensor-core one takes up to 8, the plain one 2), larger ones `skinny.cu`'s FP8 kernel
    /// or cuBLASLt (`TANDEM_FP8_GEMV_MAX_ROWS`, 0: never).
    pub fp8_gemv_max_rows: usize,
    /// The FP8 GEMV runs on the tensor cores (`gemv_fp8_mma`) where the input features are a
    /// multiple of 64, else on `gemv_fp8_m*` (`TANDEM_FP8_GEMV_MMA=0`: always the latter, to
    /// compare; the products are the same, summed in another order).
    pub fp8_gemv_mma: bool,
    /// Projections of one row run the tensor-core FP8 GEMV too; off (the default), the plain
    /// one, which was 2-3% faster there on an H100: a decode step of Llama-3.1-8B shapes in
    /// FP8 at batch 1 took 3.67 ms on it against 3.75-3.79 (`TANDEM_FP8_GEMV_MMA_ONE_ROW`:
    /// set and not `0`, on).
    pub fp8_gemv_mma_one_row: bool,
    /// The MLP's [gate | up] projection of a decode step on a GEMV kernel (FP8 weights, or
    /// bf16 weights at one row) writes silu(gate) * up itself (its blocks take gate rows and
    /// their up rows together), where a projection into f32 and `silu_mul` after it ran: one
    /// launch and an f32 round trip fewer a layer, the same bits; FP8 decode at batch 1 on an
    /// H200 3.03 ms a step against 3.12-3.15 (`TANDEM_GEMV_SILU=0`: the two launches).
    pub gemv_silu: bool,
    /// Kernels are launched as programmatic dependent launches on Hopper and later (compute
    /// capability 9.0+): a kernel's blocks start while the kernel before it finishes, and wait
    /// for it before they touch memory (`launch.rs`); eager decode steps of a few sequences
    /// 5-7% faster on an H200, captured ones about 1% (`TANDEM_PDL`: set and not `0`, on).
    pub programmatic_launch: bool,
    /// cuBLAS writes the MLP's gate/up projection in bf16 at prefill sizes; off, in f32
    /// (`TANDEM_GATE_UP_BF16`: `0` off, anything else on). Unset, on except in an MPS client
    /// limited to a share of the SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` below 100): there
    /// cuBLAS 12/13 picks for the bf16 output a kernel of 8-block clusters (`algoId=66`,
    /// `CLUSTER_SHAPE_4x2x1`) that does not run on some shares (80% and 60% of an H100 or
    /// H200) while returning success, so the output is left unwritten and the
    /// logits come out NaN. The f32 output never picked it.
    pub gate_up_bf16: bool,
    /// The fused q/k/v projection of FP8 weights is left in the bf16 cuBLASLt writes at
    /// prefill sizes, and the rotary kernel widens its rows as it reads them; off, a kernel of
    /// its own widens them first (`TANDEM_FP8_QKV_BF16=0`, to compare; the values are the
    /// same).
    pub fp8_qkv_bf16: bool,
    /// Where a norm or silu_mul writes FP8 codes for the FP8 projection that reads its rows
    /// ([`Self::fp8_fused_quant`]) and nothing else reads them, it writes only the codes, not
    /// the bf16 rows beside them: a quarter of an add_rms_norm's bytes and two fifths of a
    /// silu_mul's at prefill sizes (`TANDEM_FP8_CODES_ONLY=0`: both, to compare; the codes
    /// are the same).
    pub fp8_codes_only: bool,
    /// cuBLAS writes o_proj and down, the projections only the residual add reads, in bf16
    /// at prefill sizes; off, in f32 (`TANDEM_RESIDUAL_BF16`: `0` off, anything else on).
    /// Half the bytes written and read back: ~46 MB a layer for a step of 2,822 rows of
    /// Llama-3.1-8B. Either way the residual add rounds them to bf16 first, so the tokens are
    /// the same. Unset, as `gate_up_bf16` (off in an MPS client with a share of the SMs).
    pub residual_bf16: bool,
    /// The residual stream itself is held in bf16 between layers, as transformers' bf16
    /// models, vLLM and TensorRT-LLM hold it: each residual add rounds its sum to bf16 and
    /// the norm reads the rounded values; off (the default), f32
    /// (`TANDEM_RESIDUAL_STREAM_BF16`: set and not `0`, on). An add_rms_norm moves 7 bytes a
    /// value instead of 11 (residual read and written, bf16 projection read, bf16 written);
    /// the tokens may differ from the f32 stream's.
    pub residual_stream_bf16: bool,
    /// cuBLAS may pick kernels that launch thread-block clusters; off, every projection runs
    /// through cuBLASLt with the best algorithm of one block per cluster
    /// (`TANDEM_GEMM_CLUSTERS`: `0` off, anything else on). Unset, on except in an MPS client
    /// limited to a share of the SMs: there the cluster kernels cuBLAS picks for some shapes
    /// (the bf16 gate/up above, and f32 projections of multi-prompt prefills of 2-4k tokens on
    /// an H100 at 80%) return success without writing their output.
    pub gemm_clusters: bool,
    /// cuBLASLt's FP8 products accumulate without promoting their partial sums to f32 every
    /// few steps of K (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`, the "fast accumulation" vLLM's and
    /// torch's FP8 GEMMs offer). On an H200 it takes a 2048/128 serving step of Llama-3.1-8B
    /// shapes from 142.7 to 133.7 ms, and the FP8 GPU tests' errors against the host stay
    /// where they were (bf16 output rounding dominates them): on by default
    /// (`TANDEM_FP8_FAST_ACCUM=0`: off).
    pub fp8_fast_accum: bool,
    /// At the first product of each FP8 shape (row bucket, k, n), every configuration
    /// cuBLASLt accepts for it is timed on that product's own operands and the fastest kept in
    /// place of the heuristic's single answer (`fp8_gemm/tune.rs`); `TANDEM_FP8_TUNE=0`: the
    /// heuristic's.
    pub fp8_tune: bool,
    /// In a batch mixing decodes with prompt chunks, the chunks' prefill attention runs on a
    /// second stream of higher priority beside the decode attention (`side_stream.rs`);
    /// off, one after the other on the one stream (`TANDEM_CONCURRENT_ATTENTION=0`: to compare).
    pub concurrent_attention: bool,
    /// Splits of K for every `skinny.cu` launch, in place of the count its model of the time
    /// picks (`TANDEM_SKINNY_SPLITS`, for tuning; clamped to what the launch allows).
    pub skinny_splits: Option<usize>,
    /// Fewest keys per split of a decode attention split over the context; `None` derives it
    /// from the head dimension (`TANDEM_ATTN_SPLIT_KEYS`, for tuning).
    pub attn_split_keys: Option<usize>,
    /// MiB of the next projection's weight read into L2 ahead of it; `None`: a sixth of the
    /// device's L2; 0: no prefetch (`TANDEM_L2_PREFETCH_MB`).
    pub l2_prefetch_mb: Option<usize>,
    /// Extra NVRTC `-D NAME=VALUE` definitions for the kernels, e.g. `GEMV_UNROLL=8`
    /// (`TANDEM_KERNEL_DEFINES`, space-separated: tuning experiments).
    pub kernel_defines: Vec<String>,
    /// Where compiled kernels are cached (`<dir>/kernels/<hash>.cubin`); `None` compiles them at
    /// every start. From the environment: `TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`,
    /// else `~/.cache/tandem`.
    pub cache_dir: Option<PathBuf>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            cuda_graphs: true,
            tp_cuda_graphs: true,
            device_sampling: true,
            vec_attention: true,
            decode_mma: true,
            decode_persistent: true,
            decode_persistent_blocks: None,
            flash_head_pairs: true,
            flash_wgmma: true,
            skinny_gemm: false,
            skinny_everywhere: false,
            skinny_fp8: true,
            fp8_fused_quant: true,
            fp8_prefill_widen: true,
            rope_shared: true,
            prefill_q_bf16: true,
            gemv_max_rows: DEFAULT_GEMV_MAX_ROWS,
            fp8_gemv_max_rows: DEFAULT_FP8_GEMV_MAX_ROWS,
            fp8_gemv_mma: true,
            fp8_gemv_mma_one_row: false,
            gemv_silu: true,
            programmatic_launch: false,
            gate_up_bf16: true,
            fp8_qkv_bf16: true,
            fp8_codes_only: true,
            residual_bf16: true,
            residual_stream_bf16: false,
            gemm_clusters: true,
            fp8_fast_accum: true,
            fp8_tune: true,
            concurrent_attention: true,
            skinny_splits: None,
            attn_split_keys: None,
            l2_prefetch_mb: None,
            kernel_defines: Vec::new(),
            cache_dir: None,
        }
    }
}

impl CudaOptions {
    /// Device `ordinal` with the defaults and whatever the environment variables set.
    pub fn from_env(ordinal: usize) -> Self {
        Self::from_vars(ordinal, |name| std::env::var_os(name))
    }

    /// [`Self::from_env`] with the variables looked up by `var`.
    fn from_vars(ordinal: usize, var: impl Fn(&str) -> Option<OsString>) -> Self {
        let text = |name: &str| var(name).and_then(|v| v.into_string().ok());
        // Any value but `0` leaves a switch on.
        let switch = |name: &str| var(name).is_none_or(|v| v != "0");
        // Not an MPS client limited to a share of the SMs.
        let all_sms = text("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_none_or(|share| share >= 100.0);
        CudaOptions {
            ordinal,
            cuda_graphs: switch("TANDEM_CUDA_GRAPHS"),
            tp_cuda_graphs: switch("TANDEM_TP_CUDA_GRAPHS"),
            device_sampling: switch("TANDEM_DEVICE_SAMPLING"),
            vec_attention: switch("TANDEM_ATTN_VEC"),
            decode_mma: switch("TANDEM_DECODE_MMA"),
            decode_persistent: switch("TANDEM_DECODE_PERSISTENT"),
            decode_persistent_blocks: text("TANDEM_DECODE_PERSISTENT_BLOCKS")
                .and_then(|v| v.trim().parse().ok())
                .filter(|&blocks| blocks > 0),
            flash_head_pairs: switch("TANDEM_FLASH_PAIRS"),
            flash_wgmma: switch("TANDEM_FLASH_WGMMA"),
            // Off unless set to something other than `0`.
            skinny_gemm: var("TANDEM_SKINNY_GEMM").is_some_and(|v| v != "0"),
            skinny_everywhere: false,
            skinny_fp8: switch("TANDEM_SKINNY_FP8"),
            fp8_fused_quant: switch("TANDEM_FP8_FUSED_QUANT"),
            fp8_prefill_widen: switch("TANDEM_FP8_PREFILL_WIDEN"),
            rope_shared: switch("TANDEM_ROPE_SHARED"),
            prefill_q_bf16: switch("TANDEM_PREFILL_Q_BF16"),
            gemv_max_rows: DEFAULT_GEMV_MAX_ROWS,
            fp8_gemv_max_rows: text("TANDEM_FP8_GEMV_MAX_ROWS")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(DEFAULT_FP8_GEMV_MAX_ROWS),
            fp8_gemv_mma: switch("TANDEM_FP8_GEMV_MMA"),
            // Off unless set to something other than `0`.
            fp8_gemv_mma_one_row: var("TANDEM_FP8_GEMV_MMA_ONE_ROW").is_some_and(|v| v != "0"),
            gemv_silu: switch("TANDEM_GEMV_SILU"),
            // Off unless set to something other than `0`.
            programmatic_launch: var("TANDEM_PDL").is_some_and(|v| v != "0"),
            gate_up_bf16: match var("TANDEM_GATE_UP_BF16") {
                Some(v) => v != "0",
                None => all_sms,
            },
            fp8_qkv_bf16: switch("TANDEM_FP8_QKV_BF16"),
            fp8_codes_only: switch("TANDEM_FP8_CODES_ONLY"),
            residual_bf16: match var("TANDEM_RESIDUAL_BF16") {
                Some(v) => v != "0",
                None => all_sms,
            },
            // Off unless set to something other than `0`.
            residual_stream_bf16: var("TANDEM_RESIDUAL_STREAM_BF16").is_some_and(|v| v != "0"),
            gemm_clusters: match var("TANDEM_GEMM_CLUSTERS") {
                Some(v) => v != "0",
                None => all_sms,
            },
            fp8_fast_accum: switch("TANDEM_FP8_FAST_ACCUM"),
            fp8_tune: switch("TANDEM_FP8_TUNE"),
            concurrent_attention: switch("TANDEM_CONCURRENT_ATTENTION"),
            skinny_splits: text("TANDEM_SKINNY_SPLITS")
                .and_then(|v| v.trim().parse().ok())
                .filter(|&splits| splits > 0),
            attn_split_keys: text("TANDEM_ATTN_SPLIT_KEYS")
                .and_then(|v| v.parse().ok())
                .filter(|&keys| keys > 0),
            // Set but not a number: no prefetch.
            l2_prefetch_mb: text("TANDEM_L2_PREFETCH_MB")
                .map(|mb| mb.trim().parse::<usize>().unwrap_or(0)),
            kernel_defines: text("TANDEM_KERNEL_DEFINES")
                .map(|defines| defines.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            cache_dir: var("TANDEM_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tandem")))
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/tandem"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(vars: &[(&str, &str)]) -> CudaOptions {
        CudaOptions::from_vars(2, |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn no_variables_are_the_defaults() {
        assert_eq!(
            options(&[]),
            CudaOptions {
                ordinal: 2,
                ..CudaOptions::default()
            }
        );
    }

    #[test]
    fn each_variable_sets_its_option() {
        let set = options(&[
            ("TANDEM_CUDA_GRAPHS", "0"),
            ("TANDEM_TP_CUDA_GRAPHS", "0"),
            ("TANDEM_DEVICE_SAMPLING", "0"),
            ("TANDEM_ATTN_VEC", "0"),
            ("TANDEM_DECODE_MMA", "0"),
            ("TANDEM_DECODE_PERSISTENT", "0"),
            ("TANDEM_DECODE_PERSISTENT_BLOCKS", "5"),
            ("TANDEM_FLASH_PAIRS", "0"),
            ("TANDEM_FLASH_WGMMA", "0"),
            ("TANDEM_SKINNY_GEMM", "1"),
            ("TANDEM_SKINNY_FP8", "0"),
            ("TANDEM_FP8_FUSED_QUANT", "0"),
            ("TANDEM_FP8_PREFILL_WIDEN", "0"),
            ("TANDEM_ROPE_SHARED", "0"),
            ("TANDEM_PREFILL_Q_BF16", "0"),
            ("TANDEM_FP8_QKV_BF16", "0"),
            ("TANDEM_FP8_CODES_ONLY", "0"),
            ("TANDEM_FP8_GEMV_MAX_ROWS", "2"),
            ("TANDEM_FP8_GEMV_MMA", "0"),
            ("TANDEM_FP8_GEMV_MMA_ONE_ROW", "1"),
            ("TANDEM_GEMV_SILU", "0"),
            ("TANDEM_CONCURRENT_ATTENTION", "0"),
            ("TANDEM_RESIDUAL_STREAM_BF16", "1"),
            ("TANDEM_FP8_FAST_ACCUM", "0"),
            ("TANDEM_FP8_TUNE", "0"),
            ("TANDEM_SKINNY_SPLITS", "3"),
            ("TANDEM_ATTN_SPLIT_KEYS", "32"),
            ("TANDEM_L2_PREFETCH_MB", " 8 "),
            ("TANDEM_KERNEL_DEFINES", "GEMV_UNROLL=8  ATTN_KEYS=2"),
            ("TANDEM_CACHE_DIR", "/c"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            set,
            CudaOptions {
                ordinal: 2,
                cuda_graphs: false,
                tp_cuda_graphs: false,
                device_sampling: false,
                vec_attention: false,
                decode_mma: false,
                decode_persistent: false,
                decode_persistent_blocks: Some(5),
                flash_head_pairs: false,
                flash_wgmma: false,
                skinny_gemm: true,
                skinny_everywhere: false,
                skinny_fp8: false,
                fp8_fused_quant: false,
                fp8_prefill_widen: false,
                rope_shared: false,
                prefill_q_bf16: false,
                gemv_max_rows: DEFAULT_GEMV_MAX_ROWS,
                fp8_gemv_max_rows: 2,
                fp8_gemv_mma: false,
                fp8_gemv_mma_one_row: true,
                gemv_silu: false,
                programmatic_launch: false,
                gate_up_bf16: true,
                fp8_qkv_bf16: false,
                fp8_codes_only: false,
                residual_bf16: true,
                residual_stream_bf16: true,
                gemm_clusters: true,
                fp8_fast_accum: false,
                fp8_tune: false,
                concurrent_attention: false,
                skinny_splits: Some(3),
                attn_split_keys: Some(32),
                l2_prefetch_mb: Some(8),
                kernel_defines: vec!["GEMV_UNROLL=8".into(), "ATTN_KEYS=2".into()],
                cache_dir: Some("/c".into()),
            }
        );
    }

    #[test]
    fn the_gate_up_projection_is_f32_in_an_mps_client_with_a_share_of_the_sms() {
        let bf16 = |vars: &[(&str, &str)]| options(vars).gate_up_bf16;
        assert!(bf16(&[]));
        assert!(bf16(&[("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")]));
        assert!(!bf16(&[("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80")]));
        assert!(bf16(&[
            ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80"),
            ("TANDEM_GATE_UP_BF16", "1")
        ]));
        assert!(!bf16(&[("TANDEM_GATE_UP_BF16", "0")]));
        let residual = |vars: &[(&str, &str)]| options(vars).residual_bf16;
        assert!(residual(&[]));
        assert!(!residual(&[("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80")]));
        assert!(!residual(&[("TANDEM_RESIDUAL_BF16", "0")]));
        assert!(residual(&[
            ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80"),
            ("TANDEM_RESIDUAL_BF16", "1")
        ]));
    }

    #[test]
    fn cublas_clusters_are_left_out_in_an_mps_client_with_a_share_of_the_sms() {
        let clusters = |vars: &[(&str, &str)]| options(vars).gemm_clusters;
        assert!(clusters(&[]));
        assert!(clusters(&[("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")]));
        assert!(!clusters(&[("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80")]));
        assert!(clusters(&[
            ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "80"),
            ("TANDEM_GEMM_CLUSTERS", "1")
        ]));
        assert!(!clusters(&[("TANDEM_GEMM_CLUSTERS", "0")]));
    }

    #[test]
    fn odd_values_mean_what_they_always_have() {
        // Switches: only `0` turns off.
        let on = options(&[
            ("TANDEM_CUDA_GRAPHS", "false"),
            ("TANDEM_DEVICE_SAMPLING", "1"),
        ]);
        assert!(on.cuda_graphs && on.device_sampling);
        // A split of 0 keys or no number: derived from the head dimension.
        assert_eq!(
            options(&[("TANDEM_ATTN_SPLIT_KEYS", "0")]).attn_split_keys,
            None
        );
        assert_eq!(
            options(&[("TANDEM_ATTN_SPLIT_KEYS", "x")]).attn_split_keys,
            None
        );
        // A prefetch size that is no number turns prefetching off.
        assert_eq!(
            options(&[("TANDEM_L2_PREFETCH_MB", "x")]).l2_prefetch_mb,
            Some(0)
        );
        // The kernel cache: TANDEM_CACHE_DIR, else XDG_CACHE_HOME, else HOME.
        let cache = |vars: &[(&str, &str)]| options(vars).cache_dir;
        assert_eq!(
            cache(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]),
            Some("/x/tandem".into())
        );
        assert_eq!(cache(&[("HOME", "/h")]), Some("/h/.cache/tandem".into()));
        assert_eq!(cache(&[]), None);
    }
}
