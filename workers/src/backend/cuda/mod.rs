//! The CUDA backend: cuBLAS for the projections (bf16 operands, f32 accumulation and output),
//! NVRTC-compiled kernels ([`kernels`]) for everything else, the paged KV cache in device memory.
//!
//! Libraries (`libcuda`, `libnvrtc`, `libcublas`) are loaded at run time (cudarc's
//! `dynamic-loading`), so the same binary runs on machines without a GPU; [`CudaBackend::new`]
//! fails there with an error that says which library is missing.
//!
//! Number formats, chosen for the memory-bound decode step: weight matrices in bf16 (whatever
//! the file holds; f32/f16 files are converted at upload), norm weights and biases in f32, the
//! KV cache in bf16. Activations between ops are f32 (the residual stream, projection outputs,
//! attention scores); the inputs of a matrix product (normalized rows, attention output,
//! `silu(gate) * up`) are written in bf16 by the op that produces them, which is what cuBLAS'
//! bf16 path reads.
//!
//! One stream per backend: ops are queued asynchronously and only [`Backend::to_host`] and the KV
//! block copies wait for the device.
//!
//! Batch invariance holds for every kernel here (each row's reduction order is fixed), but not
//! necessarily for cuBLAS, which may pick a different algorithm for a different row count: a
//! request's logits can differ in the last bits between batch sizes on the GPU.

/// Turns a driver/cuBLAS result into the backend's, naming the op.
macro_rules! dev {
    ($op:literal, $e:expr) => {
        $e.map_err(|e| crate::backend::cuda::device_error($op, &e))
    };
}

/// An error of a CUDA library call as a [`BackendError`]: `DeviceLost` for the driver's
/// sticky errors ([`DeviceFault::is_sticky`]), `Device` for the rest.
pub(crate) fn device_error(op: &'static str, e: &dyn DeviceFault) -> BackendError {
    let detail = e.to_string();
    if e.is_sticky() {
        BackendError::DeviceLost { op, detail }
    } else {
        BackendError::Device { op, detail }
    }
}

/// An error of the CUDA driver or a CUDA library.
pub(crate) trait DeviceFault: std::fmt::Display {
    /// Whether the error leaves the CUDA context unusable: after one of these every call of
    /// the process fails with it (the CUDA programming guide's "sticky" errors), so only a
    /// new process recovers.
    fn is_sticky(&self) -> bool {
        false
    }
}

impl DeviceFault for cudarc::driver::DriverError {
    fn is_sticky(&self) -> bool {
        use cudarc::driver::sys::CUresult::*;
        matches!(
            self.0,
            CUDA_ERROR_ILLEGAL_ADDRESS
                | CUDA_ERROR_LAUNCH_FAILED
                | CUDA_ERROR_LAUNCH_TIMEOUT
                | CUDA_ERROR_HARDWARE_STACK_ERROR
                | CUDA_ERROR_ILLEGAL_INSTRUCTION
                | CUDA_ERROR_MISALIGNED_ADDRESS
                | CUDA_ERROR_INVALID_ADDRESS_SPACE
                | CUDA_ERROR_INVALID_PC
                | CUDA_ERROR_ASSERT
                | CUDA_ERROR_ECC_UNCORRECTABLE
                | CUDA_ERROR_CONTEXT_IS_DESTROYED
        )
    }
}

mod batch;
mod gemm;
mod graph;
pub mod kernels;
mod nccl;
mod options;
mod pinned;
mod prefetch;
mod sample;
mod side_stream;
mod skinny;
mod staging;
mod tensor;
mod tma;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::backend::{
    AttentionShape, Backend, BackendError, BatchPlan, DType, DeviceRange, DeviceSampler,
    EXPORT_SLOT_BYTES, ForwardLayers, HostRange, HostTensor, KvBlockIo, KvBytes, KvBytesMut,
    KvCacheMemory,
};
use crate::kv_cache::{KvDType, KvLayout};

pub use batch::CudaBatch;
pub use nccl::{NcclRank, communicators as nccl_communicators, nccl_present};
pub use options::CudaOptions;
pub use tensor::{CudaKvCache, CudaTensor, CudaWeight};

use crate::sampler::device::{RowRequest, RowSummary};
use gemm::Blas;
use kernels::Kernels;
use prefetch::{Prefetch, PrefetchArgs};
use tensor::DeviceData;

/// A device, its stream, cuBLAS handle and kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Blas,
    kernels: Kernels,
    name: String,
    multiprocessors: usize,
    /// Projections of at most this many rows use the GEMV kernel instead of cuBLAS.
    gemv_max_rows: std::sync::atomic::AtomicUsize,
    graphs: graph::DecodeGraphs,
    /// Fewest keys per split of a decode attention split over the context, when set
    /// ([`CudaOptions::attn_split_keys`], for tuning); see [`Self::attn_split_keys`].
    attn_split_keys: Option<usize>,
    /// Pinned host memory for KV blocks on their way to or from a transfer.
    kv_staging: staging::KvStaging,
    /// The next projection's weight, read into L2 by the ops before it ([`prefetch`]).
    prefetch: Prefetch,
    /// Whether the engine samples from device summaries ([`CudaOptions::device_sampling`]; off
    /// copies every logits row to the host: to compare the two paths on one device).
    device_sampling: bool,
    /// Decode attention through `paged_attention_vec_d*` where the head dim has one
    /// ([`CudaOptions::vec_attention`]).
    vec_attention: bool,
    /// Decode attention through `paged_decode_mma_d*` where the head dim has one
    /// ([`CudaOptions::decode_mma`]), before the vectorized kernel.
    decode_mma: std::sync::atomic::AtomicBool,
    /// Two query heads per prefill attention block ([`CudaOptions::flash_head_pairs`]).
    flash_head_pairs: bool,
    /// Prefill attention of head dim 128 on warpgroup instructions where the kernels have it
    /// ([`CudaOptions::flash_wgmma`]).
    flash_wgmma: std::sync::atomic::AtomicBool,
    /// Projections of decode batches through `skinny.cu` where the kernels have it
    /// ([`CudaOptions::skinny_gemm`]).
    skinny_gemm: std::sync::atomic::AtomicBool,
    /// `skinny.cu` for every row count it has (up to `SKINNY_MAX_ROWS`), not only where it
    /// wins: `gpu_bench`'s comparison with cuBLAS.
    skinny_everywhere: std::sync::atomic::AtomicBool,
    /// One counter per tile of a `skinny.cu` launch with K split over blocks (its last block
    /// sums the partials); every launch leaves them zero.
    skinny_counters: CudaSlice<u32>,
    /// Splits of K for every `skinny.cu` launch, when set ([`CudaOptions::skinny_splits`]).
    skinny_splits: Option<usize>,
    /// Weights' TMA tensor maps for `skinny.cu`, by (address, outputs, inputs): encoded at a
    /// weight's first projection, then looked up.
    skinny_weight_maps: skinny::WeightMaps,
    /// Sampling summaries queued for the host, and the picks chained tokens read.
    summaries: sample::SummaryQueue,
    /// Pinned memory the batches' metadata is uploaded from.
    meta_staging: batch::MetaStaging,
    /// The MLP's gate/up projection written in bf16 by cuBLAS at prefill sizes
    /// ([`CudaOptions::gate_up_bf16`]).
    gate_up_bf16: bool,
    /// o_proj and down written in bf16 by cuBLAS at prefill sizes
    /// ([`CudaOptions::residual_bf16`]).
    residual_bf16: bool,
    /// Whether decode steps keep their CUDA graphs once this backend joins a group
    /// ([`CudaOptions::tp_cuda_graphs`]).
    tp_cuda_graphs: bool,
    /// Where a mixed batch's prefill attention runs beside its decode attention
    /// ([`CudaOptions::concurrent_attention`]).
    side: Option<side_stream::SideStream>,
    /// Whether `side` is used: `gpu_bench` compares both ways in one process.
    concurrent_attention: std::sync::atomic::AtomicBool,
    /// This backend's place in a tensor-parallel group of GPUs ([`Self::join_group`]).
    group: Option<NcclRank>,
}

/// Default for [`CudaBackend::set_gemv_max_rows`]: measured on an H100 (docs/benchmarks.md).
const DEFAULT_GEMV_MAX_ROWS: usize = 4;

/// K/V bytes of one KV head a decode attention split reads at least: see
/// `CudaBackend::attn_split_keys`.
const ATTN_SPLIT_BYTES: usize = 16 << 10;

/// Which kernel a projection runs ([`CudaBackend::projection_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProjectionKernel {
    Gemv,
    Skinny,
    Cublas,
}

/// Fewest keys per split of the tensor-core decode attention (`decode_mma.cu`), whose splits
/// are whole 64-key tiles: two tiles, so that each split has a copy in flight while it works
/// on the first (`TANDEM_ATTN_SPLIT_KEYS` overrides it, never below one tile).
const DECODE_MMA_SPLIT_KEYS: usize = 128;

/// Whether the CUDA driver library can be loaded (a GPU machine), without touching a device.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A prefill attention kernel and its launch shape ([`CudaBackend::flash_kernel`]): every
/// one takes `flash.cu`'s arguments and covers a batch's 128-row tiles.
struct FlashLaunch<'a> {
    kernel: &'a cudarc::driver::CudaFunction,
    /// Query heads per block (the grid's y is heads / this).
    heads_per_block: usize,
    threads: u32,
    smem_bytes: u32,
    /// `flash_wgmma.cu`'s kernel, which also takes the cache's tensor map and the tile count.
    wgmma: bool,
    /// A block per multiprocessor walking the (tile, head) items (`WG_PERSISTENT`), instead of
    /// a block per item.
    persistent: bool,
}

/// The attention kernels' scalar arguments that locate `layer`'s K/V in the paged cache.
struct CacheArgs {
    heads: i32,
    kv_heads: i32,
    block_size: i32,
    block_elems: i64,
    layer_offset: i64,
}

impl CacheArgs {
    fn new(shape: &AttentionShape, layout: &KvLayout, layer: usize) -> Self {
        Self {
            heads: shape.num_heads as i32,
            kv_heads: shape.num_kv_heads as i32,
            block_size: layout.block_size as i32,
            block_elems: layout.block_elems() as i64,
            layer_offset: layout.offset(layer, 0, 0) as i64,
        }
    }
}

/// Tells the device's stream-ordered allocator (where every activation buffer comes from) to
/// keep memory that is freed instead of returning it to the driver at each synchronization,
/// which is its default, so that a step after a synchronized one does not map its
/// activations' memory again. (Measured: the host's enqueue time of prefill steps in the
/// server did not change with it; docs/benchmarks.md.) The memory kept is what
/// the largest step needed: the headroom left out of the KV cache (`--gpu-memory-fraction`)
/// is there for it.
fn keep_freed_memory(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<(), BackendError> {
    use cudarc::driver::sys;
    dev!("cuda init (memory pool)", ctx.bind_to_thread())?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is current on this thread (bound above); `pool` and
    // `threshold` are live locals of the types the driver writes and reads.
    unsafe {
        dev!(
            "cuda init (memory pool)",
            sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal as i32).result()
        )?;
        dev!(
            "cuda init (memory pool)",
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
        )?;
    }
    Ok(())
}

impl CudaBackend {
    pub fn new(options: &CudaOptions) -> Result<Self, BackendError> {
        let missing = |lib: &str| BackendError::Device {
            op: "cuda init",
            detail: format!(
                "{lib} cannot be loaded: no NVIDIA driver/CUDA libraries on this machine (or not on \
                 LD_LIBRARY_PATH); use --device cpu"
            ),
        };
        if !driver_present() {
            return Err(missing("libcuda.so"));
        }
        // SAFETY: only tries to dlopen the libraries.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(missing("libnvrtc.so"));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(missing("libcublas.so"));
        }
        let count = dev!("cuda init", CudaContext::device_count())?;
        if options.ordinal >= count.max(0) as usize {
            return Err(BackendError::Device {
                op: "cuda init",
                detail: format!(
                    "cuda:{} does not exist: this machine has {count} CUDA device(s)",
                    options.ordinal
                ),
            });
        }
        let ctx = dev!("cuda init", CudaContext::new(options.ordinal))?;
        // Everything runs on one stream, in order, so cudarc's per-buffer event tracking
        // (for buffers shared between streams) would only add an event record and wait per
        // kernel argument.
        // SAFETY: no buffer of this backend is used from another stream.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx, options.ordinal)?;
        let stream = dev!("cuda init", ctx.new_stream())?;
        let blas = Blas::new(stream.clone(), options.gemm_clusters)?;
        let side = options
            .concurrent_attention
            .then(|| dev!("cuda init", side_stream::SideStream::new(&ctx)))
            .transpose()?;
        let kernels = Kernels::load(&ctx, &options.kernel_defines, options.cache_dir.as_deref())
            .map_err(|e| BackendError::Device {
                op: "kernels",
                detail: e.to_string(),
            })?;
        let name = dev!("cuda init", ctx.name())?;
        let graphs = graph::DecodeGraphs::default();
        graphs.set_enabled(options.cuda_graphs);
        let multiprocessors = dev!(
            "cuda init",
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            )
        )? as usize;
        let l2_bytes = dev!(
            "cuda init",
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE
            )
        )? as usize;
        let prefetch = Prefetch::new(l2_bytes, options.l2_prefetch_mb);
        let skinny_counters = dev!(
            "cuda init",
            stream.alloc_zeros::<u32>(if kernels.skinny.is_some() {
                skinny::SKINNY_COUNTERS
            } else {
                1
            })
        )?;
        tracing::info!(
            device = %name,
            ordinal = options.ordinal,
            kernels = %kernels.origin,
            l2_prefetch_mib = prefetch.max_bytes() >> 20,
            "CUDA backend ready"
        );
        if !options.gate_up_bf16 {
            tracing::info!(
                "the gate/up projection is written in f32 (an MPS share of the SMs, or \
                 TANDEM_GATE_UP_BF16=0)"
            );
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            name,
            multiprocessors,
            gemv_max_rows: std::sync::atomic::AtomicUsize::new(DEFAULT_GEMV_MAX_ROWS),
            graphs,
            attn_split_keys: options.attn_split_keys,
            prefetch,
            kv_staging: staging::KvStaging::default(),
            summaries: sample::SummaryQueue::default(),
            meta_staging: batch::MetaStaging::default(),
            gate_up_bf16: options.gate_up_bf16,
            residual_bf16: options.residual_bf16,
            tp_cuda_graphs: options.tp_cuda_graphs,
            concurrent_attention: std::sync::atomic::AtomicBool::new(side.is_some()),
            side,
            device_sampling: options.device_sampling,
            vec_attention: options.vec_attention,
            decode_mma: std::sync::atomic::AtomicBool::new(options.decode_mma),
            flash_head_pairs: options.flash_head_pairs,
            flash_wgmma: std::sync::atomic::AtomicBool::new(options.flash_wgmma),
            skinny_gemm: std::sync::atomic::AtomicBool::new(options.skinny_gemm),
            skinny_everywhere: std::sync::atomic::AtomicBool::new(false),
            skinny_counters,
            skinny_splits: options.skinny_splits,
            skinny_weight_maps: skinny::WeightMaps::default(),
            group: None,
        })
    }

    /// Makes this backend rank `rank.rank()` of a tensor-parallel group: its
    /// [`Backend::all_reduce_sum`] sums over the group through `rank` (made for this backend's
    /// stream by [`nccl_communicators`]).
    ///
    /// Decode steps keep their CUDA graphs: every rank is sent the same steps, so the ranks
    /// capture and replay in lockstep, each graph holding its rank's all-reduces (NCCL kernels
    /// on the captured stream). `TANDEM_TP_CUDA_GRAPHS=0` runs the ranks eagerly instead.
    pub fn join_group(&mut self, rank: NcclRank) {
        if !self.tp_cuda_graphs && self.graphs.enabled() {
            tracing::info!(
                rank = rank.rank(),
                "tensor-parallel rank: CUDA graphs off (TANDEM_TP_CUDA_GRAPHS=0)"
            );
            self.graphs.set_enabled(false);
        }
        self.group = Some(rank);
    }

    /// Bytes the device's default memory pool (the stream-ordered allocator every activation
    /// comes from) has reserved from the device, and of those in use.
    fn memory_pool_bytes(&self) -> Result<(u64, u64), BackendError> {
        use cudarc::driver::sys;
        dev!("memory pool", self.ctx.bind_to_thread())?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let (mut reserved, mut used) = (0u64, 0u64);
        // SAFETY: the context is current on this thread; `pool`, `reserved` and `used` are
        // live locals of the types the driver writes.
        unsafe {
            let mut device: sys::CUdevice = 0;
            dev!("memory pool", sys::cuCtxGetDevice(&mut device).result())?;
            dev!(
                "memory pool",
                sys::cuDeviceGetDefaultMemPool(&mut pool, device).result()
            )?;
            for (attr, out) in [
                (
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                    &mut reserved,
                ),
                (
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                    &mut used,
                ),
            ] {
                dev!(
                    "memory pool",
                    sys::cuMemPoolGetAttribute(pool, attr, (out as *mut u64).cast()).result()
                )?;
            }
        }
        Ok((reserved, used))
    }

    /// Runs a mixed batch's prefill attention beside its decode attention, or after it
    /// (`gpu_bench mixed` compares the two); on only where the backend has its side stream
    /// ([`CudaOptions::concurrent_attention`]).
    pub fn set_concurrent_attention(&self, on: bool) {
        self.concurrent_attention.store(
            on && self.side.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Turns the warpgroup prefill attention kernel on or off (where the kernels have it), to
    /// compare it with `flash.cu`'s in one process (`gpu_bench`).
    pub fn set_flash_wgmma(&self, on: bool) {
        self.flash_wgmma
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns the tensor-core decode attention on or off, to compare it with the vectorized
    /// kernel in one process (`gpu_bench`).
    pub fn set_decode_mma(&self, on: bool) {
        self.decode_mma
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether decode attention runs the tensor-core kernel where the head dim has one.
    pub fn decode_mma(&self) -> bool {
        self.decode_mma.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether prefill attention of head dim 128 runs the warpgroup kernel.
    pub fn has_flash_wgmma(&self) -> bool {
        self.kernels.flash_wgmma.is_some()
            && self.flash_wgmma.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends every projection `skinny.cu` has rows for to it, not only those where it is the
    /// faster (to compare it with cuBLAS at every row count).
    pub fn set_skinny_everywhere(&self, on: bool) {
        self.skinny_everywhere
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns `skinny.cu`'s projections on or off (where the kernels have them), to compare
    /// them with cuBLAS in one process (`gpu_bench`).
    pub fn set_skinny_gemm(&self, on: bool) {
        self.skinny_gemm
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the kernels have `skinny.cu`'s GEMM (compiled for `sm_90a`), on or off.
    pub fn skinny_compiled(&self) -> bool {
        self.kernels.skinny.is_some()
    }

    /// Whether projections of decode batches run `skinny.cu` (compiled for `sm_90a` and on).
    pub fn has_skinny_gemm(&self) -> bool {
        self.kernels.skinny.is_some() && self.skinny_gemm.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Projections of up to `rows` rows (at most [`kernels::GEMV_MAX_ROWS`]) use the GEMV kernel,
    /// larger ones cuBLAS; 0 sends every projection to cuBLAS. For benchmarks.
    pub fn set_gemv_max_rows(&self, rows: usize) {
        self.gemv_max_rows.store(
            rows.min(kernels::GEMV_MAX_ROWS),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether decode steps replay CUDA graphs (at start: [`CudaOptions::cuda_graphs`]). For
    /// benchmarks and debugging.
    pub fn set_cuda_graphs(&self, enabled: bool) {
        self.graphs.set_enabled(enabled);
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), BackendError> {
        dev!("memory info", self.ctx.mem_get_info())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        dev!("synchronize", self.stream.synchronize())
    }

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

    /// Copies KV block `src` over block `dst` on the device (prefix reuse, benchmarks).
    pub fn copy_kv_block(
        &self,
        kv: &mut CudaKvCache,
        src: u32,
        dst: u32,
    ) -> Result<(), BackendError> {
        let bytes = kv.layout.block_bytes();
        kv.block_range(src, bytes)?;
        kv.block_range(dst, bytes)?;
        let from = kv.block_address(&self.stream, src);
        let to = kv.block_address(&self.stream, dst);
        // SAFETY: both ranges are inside the cache's allocation (checked above) and distinct
        // or identical blocks (a copy onto itself is a no-op for the copy engine).
        dev!("copy KV block", unsafe {
            cudarc::driver::result::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream())
        })
    }

    /// The kernel a projection of `rows` rows by an `[n, k]` weight runs: the GEMV kernel for
    /// a few rows (a decode step: reading the weights is the whole cost), `skinny.cu` where it
    /// applies, else cuBLAS.
    fn projection_kernel(&self, rows: usize, n: usize, k: usize) -> ProjectionKernel {
        let gemv_rows = self
            .gemv_max_rows
            .load(std::sync::atomic::Ordering::Relaxed);
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
        let (
            CudaWeight::Matrix {
                data: w,
                rows: n,
                cols: k,
            },
            DeviceData::Bf16(xs),
        ) = (weight, &x.data)
        else {
            return Ok(None);
        };
        if x.cols != *k || self.projection_kernel(x.rows, *n, *k) != ProjectionKernel::Cublas {
            return Ok(None);
        }
        self.prefetch.clear();
        let mut out = self.alloc_bf16(x.rows * n)?;
        self.blas.linear(xs, w, &mut out, x.rows, *k, *n)?;
        Ok(Some(CudaTensor::from_bf16(x.rows, *n, out)))
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

    fn alloc_f32(&self, n: usize) -> Result<CudaSlice<f32>, BackendError> {
        // SAFETY: every caller's kernel writes all `n` elements before anything reads them.
        dev!("alloc", unsafe { self.stream.alloc::<f32>(n.max(1)) })
    }

    fn alloc_bf16(&self, n: usize) -> Result<CudaSlice<u16>, BackendError> {
        // SAFETY: as in `alloc_f32`.
        dev!("alloc", unsafe { self.stream.alloc::<u16>(n.max(1)) })
    }

    fn alloc_u32(&self, n: usize) -> Result<CudaSlice<u32>, BackendError> {
        // SAFETY: as in `alloc_f32`.
        dev!("alloc", unsafe { self.stream.alloc::<u32>(n.max(1)) })
    }

    /// Fewest keys per split when a decode attention is split over the context to fill the
    /// device: each warp walks its share one key after another, so shorter splits mean shorter
    /// dependent chains, but more partial results to merge. 16 KiB of K/V per split (32 keys of
    /// head_dim 128, 64 of head_dim 64) was the best measured on an H100 at batch 1, context
    /// 1024: Llama-3.1-8B 6.45 ms with 128 keys, 6.30 with 64, 6.14-6.21 with 32, no better
    /// with 16; SmolLM2-135M 1.27 ms with 128 keys, 1.20-1.23 with 64, 1.34 with 32.
    fn attn_split_keys(&self, head_dim: usize) -> usize {
        self.attn_split_keys
            .unwrap_or((ATTN_SPLIT_BYTES / (4 * head_dim)).max(16))
    }

    /// The pending weight prefetch for an op whose output has `rows` rows: taken only when
    /// those rows go to the GEMV kernel (a decode step), which is bandwidth-bound.
    fn take_prefetch(&self, rows: usize) -> PrefetchArgs {
        let gemv_rows = self
            .gemv_max_rows
            .load(std::sync::atomic::Ordering::Relaxed);
        self.prefetch.take(rows <= gemv_rows)
    }

    /// Where batch metadata goes to this backend's device.
    fn meta_upload(&self) -> batch::MetaUpload<'_> {
        batch::MetaUpload {
            ctx: &self.ctx,
            stream: &self.stream,
            staging: &self.meta_staging,
        }
    }

    /// Blocks of a one-block-per-row kernel: one per row, and at least one per multiprocessor
    /// when it prefetches, so that the prefetch is spread over the whole device.
    fn row_blocks(&self, rows: usize, prefetch: PrefetchArgs) -> usize {
        if prefetch.is_some() {
            rows.max(self.multiprocessors)
        } else {
            rows
        }
    }

    fn launch(
        &self,
        mut builder: cudarc::driver::LaunchArgs<'_>,
        cfg: LaunchConfig,
        op: &'static str,
    ) -> Result<(), BackendError> {
        // SAFETY: each caller passes the argument list its kernel's signature declares, with
        // buffers of the sizes the kernel indexes (checked by the caller against the shapes).
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device_error(op, &e))
    }

    /// The TMA tensor map `flash_wgmma.cu` copies K/V tiles with: the cache (`blocks` blocks
    /// of `layout` at `data`) as a 5-D tensor, innermost first [dimension, KV head, token,
    /// K/V of each layer, block], boxes of 64 dimensions of one head for a block's tokens, in
    /// the 128-byte swizzle. `None` where the warpgroup kernel is off or absent, or the layout
    /// does not fit it (head dim 128; a block of 8 to 64 tokens dividing its 64-key tiles).
    fn kv_tensor_map(
        &self,
        layout: &KvLayout,
        blocks: usize,
        data: &CudaSlice<u16>,
    ) -> Option<[u64; 16]> {
        let (_, config) = self.kernels.flash_wgmma.as_ref()?;
        let bs = layout.block_size;
        if layout.head_dim != 128
            || !(8..=64).contains(&bs)
            || !config.keys.is_multiple_of(bs)
            || !bs.is_power_of_two()
        {
            return None;
        }
        let elem = 2u64;
        let dims = [
            layout.head_dim as u64,
            layout.num_kv_heads as u64,
            bs as u64,
            2 * layout.num_layers as u64,
            blocks as u64,
        ];
        let strides = [
            layout.head_dim as u64 * elem,
            layout.token_stride() as u64 * elem,
            layout.kv_stride() as u64 * elem,
            layout.block_elems() as u64 * elem,
        ];
        let (ptr, _guard) = cudarc::driver::DevicePtr::device_ptr(data, &self.stream);
        tma::encode_bf16_swizzled(ptr, &dims, &strides, &[64, 1, bs as u32, 1, 1])
            .map_err(|result| {
                tracing::warn!(
                    ?result,
                    "no TMA tensor map of the KV cache: prefill attention copies by cp.async"
                )
            })
            .ok()
    }

    /// The prefill attention kernel for `shape` and how to launch it: the warpgroup kernel for
    /// head dim 128 on Hopper (`flash_wgmma` on); else `flash.cu`'s, with two heads of one KV
    /// head per block where the query group size is even (and `flash_head_pairs` is on), else
    /// one.
    fn flash_kernel(&self, shape: &AttentionShape) -> Option<FlashLaunch<'_>> {
        if self.flash_wgmma.load(std::sync::atomic::Ordering::Relaxed)
            && shape.head_dim == 128
            && let Some((kernel, config)) = &self.kernels.flash_wgmma
        {
            return Some(FlashLaunch {
                kernel,
                heads_per_block: 1,
                threads: kernels::WgmmaFlashConfig::THREADS,
                smem_bytes: config.smem_bytes() as u32,
                wgmma: true,
                persistent: config.persistent,
            });
        }
        let group = shape.num_heads / shape.num_kv_heads;
        let (kernel, heads_per_block) =
            if self.flash_head_pairs && group.is_multiple_of(kernels::FLASH_PAIR_HEADS) {
                kernel_for(&self.kernels.flash_prefill_pairs, shape.head_dim)
                    .map(|k| (k, kernels::FLASH_PAIR_HEADS))
            } else {
                kernel_for(&self.kernels.flash_prefill, shape.head_dim).map(|k| (k, 1))
            }?;
        Some(FlashLaunch {
            kernel,
            heads_per_block,
            threads: 128 * heads_per_block as u32,
            smem_bytes: self
                .kernels
                .flash_config
                .smem_bytes(shape.head_dim, heads_per_block) as u32,
            wgmma: false,
            persistent: false,
        })
    }

    /// Attention of the query rows the prefill tiles of `batch` cover, into their rows of
    /// `out`, on the tensor cores (`flash.cu`).
    #[allow(clippy::too_many_arguments)]
    fn flash_prefill(
        &self,
        stream: &Arc<CudaStream>,
        launch: FlashLaunch<'_>,
        qkv: &CudaTensor,
        out: &mut CudaSlice<u16>,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let layout = kv.layout;
        let q = qkv.as_f32("flash_prefill")?;
        let cache = CacheArgs::new(shape, &layout, layer);
        let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
        let mut b = stream.launch_builder(launch.kernel);
        b.arg(q)
            .arg(&*kv.data)
            .arg(batch.positions())
            .arg(batch.seq_token_start())
            .arg(batch.seq_token_count())
            .arg(batch.seq_block_start())
            .arg(batch.block_tables())
            .arg(batch.tile_seq())
            .arg(batch.tile_row())
            .arg(out)
            .arg(&cache.heads)
            .arg(&cache.kv_heads)
            .arg(&cache.block_size)
            .arg(&cache.block_elems)
            .arg(&cache.layer_offset)
            .arg(&scale_log2);
        let use_tma = i32::from(kv.has_tensor_map);
        let num_tiles = batch.num_tiles as i32;
        if launch.wgmma {
            b.arg(&kv.tensor_map).arg(&use_tma).arg(&num_tiles);
        }
        let heads = (shape.num_heads / launch.heads_per_block) as u32;
        let items = batch.num_tiles as u32 * heads;
        let cfg = LaunchConfig {
            grid_dim: if launch.persistent {
                (items.min(self.multiprocessors as u32), 1, 1)
            } else {
                (batch.num_tiles as u32, heads, 1)
            },
            block_dim: (launch.threads, 1, 1),
            shared_mem_bytes: launch.smem_bytes,
        };
        self.launch(b, cfg, "flash_prefill")
    }

    /// Decode attention (one query token per sequence) of token rows `0..rows` of `batch`,
    /// into those rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention(
        &self,
        qkv: &CudaTensor,
        out: &mut CudaSlice<u16>,
        rows: usize,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        // The tensor-core kernel where the head dim has one, else the vectorized kernel, else
        // the warp-per-key one: (kernel, query heads per block, dynamic shared memory, fewest
        // keys per split).
        let split_keys = self.attn_split_keys(shape.head_dim);
        let mma = kernel_for(&self.kernels.paged_decode_mma, shape.head_dim)
            .filter(|_| self.decode_mma())
            .map(|kernel| {
                let config = self.kernels.decode_mma_config;
                (
                    kernel,
                    kernels::DecodeMmaConfig::HEADS,
                    config.smem_bytes(shape.head_dim),
                    self.attn_split_keys
                        .unwrap_or(DECODE_MMA_SPLIT_KEYS)
                        .max(kernels::DecodeMmaConfig::KEYS),
                )
            });
        let vectorized = kernel_for(&self.kernels.paged_attention_vec, shape.head_dim)
            .filter(|_| self.vec_attention)
            .map(|kernel| (kernel, kernels::ATTN_VEC_HEADS, 0, split_keys));
        let Some((kernel, heads_per_block, shared_mem_bytes, split_keys)) =
            mma.or(vectorized).or_else(|| {
                kernel_for(&self.kernels.paged_attention, shape.head_dim)
                    .map(|k| (k, ATTN_GMAX, 0, split_keys))
            })
        else {
            let dims: Vec<usize> = self
                .kernels
                .paged_attention
                .iter()
                .map(|(d, _)| *d)
                .collect();
            return Err(shape_err(
                "paged_attention",
                format!(
                    "head_dim {} (the CUDA kernels cover {dims:?})",
                    shape.head_dim
                ),
            ));
        };
        let layout = kv.layout;
        let q = qkv.as_f32("paged_attention")?;
        // One block per token, KV head and chunk of `heads_per_block` query heads; long contexts
        // are split over several blocks when the batch alone would leave most multiprocessors
        // idle.
        let group = shape.num_heads / shape.num_kv_heads;
        let head_blocks = shape.num_kv_heads * group.div_ceil(heads_per_block);
        let blocks = rows * head_blocks;
        let target = 2 * self.multiprocessors;
        let splits = if blocks >= target || batch.max_context <= 256 {
            1
        } else {
            target
                .div_ceil(blocks)
                .min(batch.max_context.div_ceil(split_keys))
                .clamp(1, 64)
        };
        let heads_total = rows * shape.num_heads;
        let partial_acc = self.alloc_f32(if splits > 1 {
            heads_total * splits * shape.head_dim
        } else {
            1
        })?;
        let partial_ml = self.alloc_f32(if splits > 1 {
            heads_total * splits * 2
        } else {
            1
        })?;
        let cache = CacheArgs::new(shape, &layout, layer);
        let pf = self.take_prefetch(rows);
        let mut b = self.stream.launch_builder(kernel);
        b.arg(q)
            .arg(&*kv.data)
            .arg(batch.positions())
            .arg(batch.token_seq())
            .arg(batch.seq_block_start())
            .arg(batch.block_tables())
            .arg(&mut *out)
            .arg(&partial_acc)
            .arg(&partial_ml)
            .arg(&cache.heads)
            .arg(&cache.kv_heads)
            .arg(&cache.block_size)
            .arg(&cache.block_elems)
            .arg(&cache.layer_offset)
            .arg(&shape.scale)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, head_blocks as u32, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: shared_mem_bytes as u32,
        };
        self.launch(b, cfg, "paged_attention")?;
        if splits > 1 {
            let (dim, s) = (shape.head_dim as i32, splits as i32);
            let mut b = self.stream.launch_builder(&self.kernels.attention_combine);
            b.arg(&partial_acc)
                .arg(&partial_ml)
                .arg(out)
                .arg(&dim)
                .arg(&s);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, shape.num_heads as u32, 1),
                block_dim: (shape.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(b, cfg, "attention_combine")?;
        }
        Ok(())
    }

    /// Copies one block's bytes out of the cache, one synchronous copy through pageable
    /// memory: what the batched copies ([`KvBlockIo`]) are measured and tested against.
    pub fn read_kv_block(
        &self,
        kv: &CudaKvCache,
        block: u32,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let range = kv.block_range(block, dst.len())?;
        let mut host = vec![0u16; range.len()];
        dev!(
            "read KV block",
            self.stream.memcpy_dtoh(&kv.data.slice(range), &mut host)
        )?;
        for (d, v) in dst.chunks_exact_mut(2).zip(&host) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Overwrites one block with `src`, as [`Self::read_kv_block`] reads it.
    pub fn write_kv_block(
        &self,
        kv: &mut CudaKvCache,
        block: u32,
        src: &[u8],
    ) -> Result<(), BackendError> {
        let range = kv.block_range(block, src.len())?;
        let host: Vec<u16> = src
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        dev!(
            "write KV block",
            self.stream
                .memcpy_htod(&host, &mut kv.data.slice_mut(range))
        )?;
        // The host vector is dropped when this returns: wait for the copy to read it.
        self.synchronize()
    }

    /// Copies `blocks` between `kv` and device memory `range` (the blocks back to back) in
    /// one launch of `copy_kv_blocks`, and waits: the range is a transfer's (a CUDA IPC
    /// export or pull), handed on or back to its pool as soon as this returns. One copy per
    /// block instead costs a few microseconds each (SmolLM2's 0.37 MB blocks moved at 80 GB/s
    /// that way on an H100).
    fn copy_kv_blocks_on_device(
        &self,
        kv: &CudaKvCache,
        blocks: &[u32],
        range: DeviceRange,
        to_range: bool,
    ) -> Result<(), BackendError> {
        let op = if to_range {
            "read KV blocks to device memory"
        } else {
            "write KV blocks from device memory"
        };
        let block_bytes = staging::check(op, kv, blocks, range.len)?;
        if blocks.is_empty() {
            return Ok(());
        }
        if !block_bytes.is_multiple_of(16) || !range.ptr.is_multiple_of(16) {
            return Err(shape_err(
                op,
                format!(
                    "{block_bytes}-byte blocks at {:#x} are not 16-byte aligned",
                    range.ptr
                ),
            ));
        }
        let table = dev!("copy KV blocks", self.stream.clone_htod(blocks))?;
        let cache = kv.block_address(&self.stream, 0);
        let (count, vecs, to) = (
            blocks.len() as i32,
            (block_bytes / 16) as i64,
            i32::from(to_range),
        );
        let mut b = self.stream.launch_builder(&self.kernels.copy_kv_blocks);
        b.arg(&cache)
            .arg(&range.ptr)
            .arg(&table)
            .arg(&count)
            .arg(&vecs)
            .arg(&to);
        // Enough blocks to keep every SM's memory pipes busy; each walks its share of a block.
        let per_block = (block_bytes / 16).div_ceil(256).clamp(1, 64) as u32;
        let cfg = LaunchConfig {
            grid_dim: (per_block, blocks.len().min(65_535) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(b, cfg, op)?;
        dev!("copy KV blocks", self.stream.synchronize())
    }

    fn check_vector<'w>(
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

/// Query heads per block of the decode attention kernel (`ATTN_GMAX` in attention.cu).
const ATTN_GMAX: usize = 8;

/// The kernel of `list` (kernels by head dimension) for `head_dim`.
fn kernel_for(
    list: &[(usize, cudarc::driver::CudaFunction)],
    head_dim: usize,
) -> Option<&cudarc::driver::CudaFunction> {
    list.iter()
        .find(|(d, _)| *d == head_dim)
        .map(|(_, kernel)| kernel)
}

/// One block per row, `threads` threads (a multiple of 32).
fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `total` elements.
fn elementwise_config(total: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = total.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a row-wise op over `cols` columns: enough to cover a row in a few passes.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
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
        tensor::upload_weight(&self.stream, parts)
    }

    fn alloc_kv_cache(
        &self,
        layout: &KvLayout,
        num_blocks: usize,
    ) -> Result<CudaKvCache, BackendError> {
        if layout.dtype != KvDType::Bf16 {
            return Err(BackendError::UnsupportedDType {
                op: "CUDA KV cache",
                dtype: match layout.dtype {
                    KvDType::F32 => DType::F32,
                    KvDType::F16 => DType::F16,
                    KvDType::Bf16 => DType::Bf16,
                },
            });
        }
        // One block more than asked for: the scratch block CUDA-graph dummies write into
        // (`CudaKvCache::scratch_block`), which must lie inside the allocation; then the
        // export slab (`KvCacheMemory`).
        let too_large = || BackendError::KvCacheTooLarge {
            num_blocks,
            block_bytes: layout.block_bytes(),
        };
        let slab_elems = num_blocks * EXPORT_SLOT_BYTES / 2;
        let elems = layout
            .block_elems()
            .checked_mul(num_blocks + 1)
            .and_then(|blocks| blocks.checked_add(slab_elems))
            .ok_or_else(too_large)?
            .max(1);
        self.ctx.bind_to_thread().map_err(|_| too_large())?;
        // Plain `cuMemAlloc`, not the stream-ordered allocator: CUDA IPC can share only such
        // memory, and a context worker hands the cache to decode workers of its host through
        // one IPC handle of it.
        // SAFETY: a fresh allocation, zeroed below before anything reads it.
        let ptr =
            unsafe { cudarc::driver::result::malloc_sync(elems * 2) }.map_err(|_| too_large())?;
        // SAFETY: `ptr` is the `elems * 2` bytes just allocated.
        if let Err(e) = unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, elems * 2) } {
            // SAFETY: allocated above, freed once.
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
            return Err(device_error("zeroing the KV cache", &e));
        }
        // SAFETY: `ptr` holds `elems` u16s; the cache frees it with `free_sync` (`Drop`).
        let data = unsafe { self.stream.upgrade_device_ptr::<u16>(ptr, elems) };
        let map = self.kv_tensor_map(layout, num_blocks + 1, &data);
        let has_tensor_map = map.is_some();
        let tensor_map = self
            .stream
            .clone_htod(&map.unwrap_or([0u64; 16]))
            .map_err(|e| device_error("KV cache tensor map", &e))?;
        Ok(CudaKvCache {
            layout: *layout,
            num_blocks,
            data: std::mem::ManuallyDrop::new(data),
            tensor_map,
            has_tensor_map,
        })
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
            data,
            rows: _,
            cols,
        } = table
        else {
            return Err(shape_err("embedding", "the table is not a matrix".into()));
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
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(xs)
            .arg(w)
            .arg(&mut out)
            .arg(&rows)
            .arg(&cols)
            .arg(&eps)
            .arg(&pf.ptr)
            .arg(&pf.bytes);
        let cfg = rows_config(self.row_blocks(x.rows, pf), row_threads(x.cols));
        self.launch(b, cfg, "rms_norm")?;
        Ok(CudaTensor::from_bf16(x.rows, x.cols, out))
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
            .arg(&pf.bytes);
        let cfg = rows_config(self.row_blocks(rows, pf), row_threads(cols_n));
        self.launch(b, cfg, "add_rms_norm")?;
        Ok(CudaTensor::from_bf16(rows, cols_n, out))
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
        let CudaWeight::Matrix {
            data: w,
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
        let DeviceData::Bf16(xs) = &x.data else {
            return Err(shape_err(
                "linear",
                "the input must be bf16 (written by a norm, attention or silu_mul)".into(),
            ));
        };
        // The hint was for this projection (or one the ops before it did not take).
        self.prefetch.clear();
        let mut out = self.alloc_f32(x.rows * out_features)?;
        let kernel = self.projection_kernel(x.rows, *out_features, *in_features);
        if kernel == ProjectionKernel::Gemv {
            let (n, k) = (*out_features as i32, *in_features as i32);
            let mut b = self.stream.launch_builder(&self.kernels.gemv[x.rows - 1]);
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
        if let Some(bias) = bias {
            let bv = Self::check_vector("linear bias", bias, *out_features)?;
            let total = (x.rows * out_features) as i64;
            let cols = *out_features as i32;
            let mut b = self.stream.launch_builder(&self.kernels.add_bias);
            b.arg(&mut out).arg(bv).arg(&cols).arg(&total);
            self.launch(b, elementwise_config(total as usize), "add_bias")?;
        }
        Ok(CudaTensor::from_f32(x.rows, *out_features, out))
    }

    fn rope_and_cache_write(
        &self,
        qkv: &mut CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &mut CudaKvCache,
        layer: usize,
    ) -> Result<(), BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        let layout = kv.layout;
        let rows = qkv.rows;
        let q = qkv.as_f32_mut("rope_and_cache_write")?;
        let (heads, kv_heads, dim, bs) = (
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
            layout.block_size as i32,
        );
        let block_elems = layout.block_elems() as i64;
        let layer_offset = layout.offset(layer, 0, 0) as i64;
        let pairs = (shape.num_heads + shape.num_kv_heads) * shape.head_dim / 2;
        let mut b = self.stream.launch_builder(&self.kernels.rope_cache_write);
        b.arg(q)
            .arg(batch.rope_cos())
            .arg(batch.rope_sin())
            .arg(batch.slot_mapping())
            .arg(&mut *kv.data)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&dim)
            .arg(&bs)
            .arg(&block_elems)
            .arg(&layer_offset);
        self.launch(
            b,
            rows_config(rows, (pairs.next_multiple_of(32) as u32).clamp(32, 512)),
            "rope_cache_write",
        )
    }

    fn paged_attention(
        &self,
        qkv: &CudaTensor,
        batch: &CudaBatch,
        shape: &AttentionShape,
        kv: &CudaKvCache,
        layer: usize,
    ) -> Result<CudaTensor, BackendError> {
        check_attention(qkv, batch, shape, kv, layer)?;
        let width = shape.num_heads * shape.head_dim;
        let mut out = self.alloc_bf16(qkv.rows * width)?;
        if batch.num_tokens > batch.num_seqs
            && let Some(flash) = self.flash_kernel(shape)
        {
            // Prefill chunks through the tensor-core kernel; the decodes batched with them
            // through the decode kernel, which reads each KV head's context once for its
            // whole query group (the prefill kernel would read it once per query head). With
            // a side stream the two run at once, each into its own rows of `out`.
            let side = self.side.as_ref().filter(|_| {
                batch.decode_rows > 0
                    && self
                        .concurrent_attention
                        .load(std::sync::atomic::Ordering::Relaxed)
            });
            let prefill_stream = match side {
                Some(side) => dev!("paged_attention", side.fork(&self.stream))?,
                None => &self.stream,
            };
            self.flash_prefill(
                prefill_stream,
                flash,
                qkv,
                &mut out,
                batch,
                shape,
                kv,
                layer,
            )?;
            if batch.decode_rows > 0 {
                self.decode_attention(qkv, &mut out, batch.decode_rows, batch, shape, kv, layer)?;
            }
            if let Some(side) = side {
                dev!("paged_attention", side.join(&self.stream))?;
            }
        } else {
            self.decode_attention(qkv, &mut out, qkv.rows, batch, shape, kv, layer)?;
        }
        Ok(CudaTensor::from_bf16(qkv.rows, width, out))
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
        if bias.is_none()
            && self.residual_bf16
            && let Some(out) = self.cublas_bf16_projection(x, weight)?
        {
            return Ok(out);
        }
        self.linear(x, weight, bias)
    }

    fn linear_silu_mul(
        &self,
        x: &CudaTensor,
        gate_up: &CudaWeight,
        next: &CudaWeight,
    ) -> Result<CudaTensor, BackendError> {
        let narrow = if self.gate_up_bf16 {
            self.cublas_bf16_projection(x, gate_up)?
        } else {
            None
        };
        let projected = match narrow {
            Some(projected) => projected,
            None => self.linear(x, gate_up, None)?,
        };
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
        if self.device_sampling {
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

impl DeviceSampler<CudaTensor> for CudaBackend {
    fn summarize_rows(
        &self,
        logits: &CudaTensor,
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError> {
        sample::summarize_rows(self, logits, requests)
    }

    fn queue_summaries(
        &self,
        logits: &CudaTensor,
        requests: &[RowRequest],
    ) -> Result<(), BackendError> {
        sample::queue_summaries(self, logits, requests)
    }

    fn take_summaries(&self) -> Result<Vec<RowSummary>, BackendError> {
        sample::take_summaries(self)
    }

    fn summarize_masked_rows(
        &self,
        logits: &CudaTensor,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError> {
        if rows.len() != masks.len() || rows.len() != requests.len() {
            return Err(shape_err(
                "summarize_masked_rows",
                format!(
                    "{} rows, {} masks and {} requests",
                    rows.len(),
                    masks.len(),
                    requests.len()
                ),
            ));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= logits.rows) {
            return Err(shape_err(
                "summarize_masked_rows",
                format!("row {r} of {}", logits.rows),
            ));
        }
        // Every mask padded to the longest (missing words: tokens not allowed).
        let words = masks.iter().map(|m| m.len()).max().unwrap_or(0);
        let mut packed = vec![0u32; rows.len() * words.max(1)];
        for (i, mask) in masks.iter().enumerate() {
            packed[i * words..i * words + mask.len()].copy_from_slice(mask);
        }
        let row_ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let x = logits.as_f32("summarize_masked_rows")?;
        let row_ids = dev!(
            "summarize_masked_rows upload",
            self.stream.clone_htod(&row_ids)
        )?;
        let packed = dev!(
            "summarize_masked_rows upload",
            self.stream.clone_htod(&packed)
        )?;
        let mut out = self.alloc_f32(rows.len() * logits.cols)?;
        let cols = logits.cols as i32;
        let words = words as i32;
        let mut b = self.stream.launch_builder(&self.kernels.gather_masked_rows);
        b.arg(x)
            .arg(&row_ids)
            .arg(&packed)
            .arg(&words)
            .arg(&mut out)
            .arg(&cols);
        self.launch(b, rows_config(rows.len(), 256), "gather_masked_rows")?;
        let masked = CudaTensor::from_f32(rows.len(), logits.cols, out);
        sample::summarize_rows(self, &masked, requests)
    }
}

/// Host memory through the pinned staging buffer, or straight for a range pinned by
/// [`KvBlockIo::pin_host_memory`] (`staging.rs`); device memory in one `copy_kv_blocks` launch.
impl KvBlockIo for CudaBackend {
    fn kv_cache_memory(&self, kv: &CudaKvCache) -> Option<KvCacheMemory> {
        Some(kv.memory(&self.stream))
    }

    unsafe fn pin_host_memory(&self, range: HostRange) -> Result<bool, BackendError> {
        // SAFETY: the caller keeps the range mapped as long as this backend lives.
        unsafe { self.kv_staging.pin(&self.ctx, range) }?;
        Ok(true)
    }

    fn read_kv_blocks(
        &self,
        kv: &CudaKvCache,
        blocks: &[u32],
        dst: KvBytesMut<'_>,
    ) -> Result<(), BackendError> {
        match dst {
            KvBytesMut::Host(bytes) => {
                self.kv_staging
                    .read_blocks(&self.ctx, &self.stream, kv, blocks, bytes)
            }
            KvBytesMut::Device(range) => self.copy_kv_blocks_on_device(kv, blocks, range, true),
        }
    }

    fn write_kv_blocks(
        &self,
        kv: &mut CudaKvCache,
        blocks: &[u32],
        src: KvBytes<'_>,
    ) -> Result<(), BackendError> {
        match src {
            KvBytes::Host(bytes) => {
                self.kv_staging
                    .write_blocks(&self.ctx, &self.stream, kv, blocks, bytes)
            }
            KvBytes::Device(range) => self.copy_kv_blocks_on_device(kv, blocks, range, false),
        }
    }
}

fn check_attention(
    qkv: &CudaTensor,
    batch: &CudaBatch,
    shape: &AttentionShape,
    kv: &CudaKvCache,
    layer: usize,
) -> Result<(), BackendError> {
    let layout = kv.layout;
    if qkv.cols != shape.qkv_width() || qkv.rows != batch.num_tokens {
        return Err(shape_err(
            "attention",
            format!(
                "qkv is {}x{}, expected {}x{}",
                qkv.rows,
                qkv.cols,
                batch.num_tokens,
                shape.qkv_width()
            ),
        ));
    }
    if layout.num_kv_heads != shape.num_kv_heads
        || layout.head_dim != shape.head_dim
        || layer >= layout.num_layers
        || layout.block_size != batch.block_size
        || batch.rope_half * 2 != shape.head_dim
        || shape.num_kv_heads == 0
        || !shape.num_heads.is_multiple_of(shape.num_kv_heads)
    {
        return Err(shape_err(
            "attention",
            format!("cache layout {layout:?} does not fit {shape:?}, layer {layer}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cudarc::driver::DriverError;
    use cudarc::driver::sys::CUresult;

    use super::{DeviceFault, device_error};

    /// (`DriverError`'s text needs the driver, so the classification is checked on the codes
    /// and the conversion on a stand-in.)
    #[test]
    fn sticky_driver_errors_lose_the_device_and_others_do_not() {
        assert!(DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS).is_sticky());
        assert!(DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED).is_sticky());
        assert!(!DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY).is_sticky());
        assert!(!DriverError(CUresult::CUDA_ERROR_INVALID_VALUE).is_sticky());

        struct Fault(bool);
        impl std::fmt::Display for Fault {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("boom")
            }
        }
        impl DeviceFault for Fault {
            fn is_sticky(&self) -> bool {
                self.0
            }
        }
        let lost = device_error("op", &Fault(true));
        assert!(lost.is_device_lost(), "{lost}");
        assert!(
            lost.to_string().contains("until the worker restarts"),
            "{lost}"
        );
        assert!(!device_error("op", &Fault(false)).is_device_lost());
    }
}
