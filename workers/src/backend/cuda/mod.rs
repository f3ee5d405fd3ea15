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
//! One stream per backend: ops are queued asynchronously and only [`Backend::to_host`](crate::backend::Backend::to_host) and the KV
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

mod attention;
mod batch;
mod decode_attention;
mod fp8_gemm;
mod fp8_projection;
mod gemm;
mod graph;
pub mod kernels;
mod kv_cache;
mod launch;
mod launch_count;
mod lora;
mod nccl;
mod ops;
mod options;
mod pinned;
mod prefetch;
mod projection;
mod sample;
mod side_stream;
mod skinny;
mod staging;
mod switches;
mod tensor;
mod tma;
mod widened_kv;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig};

use crate::backend::BackendError;

pub use batch::CudaBatch;
pub use fp8_gemm::Fp8Tactic;
pub use nccl::{NcclRank, communicators as nccl_communicators, nccl_present};
pub use options::CudaOptions;
pub use tensor::{CudaKvCache, CudaTensor, CudaWeight, MatrixData};

use gemm::Blas;
use kernels::Kernels;
use prefetch::{Prefetch, PrefetchArgs};

/// A device, its stream, cuBLAS handle and kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Blas,
    /// cuBLASLt's FP8 products, on GPUs with FP8 tensor cores (compute capability 8.9+).
    fp8_gemm: Option<fp8_gemm::Fp8Gemm>,
    /// The device's compute capability (major, minor).
    compute_capability: (i32, i32),
    kernels: Kernels,
    name: String,
    multiprocessors: usize,
    /// Kernels are launched as programmatic dependent launches
    /// ([`CudaOptions::programmatic_launch`], on a device that has them).
    programmatic_launch: bool,
    /// The settings this backend was built with. Those it can change while it runs are read
    /// from `switches` and `graphs` instead ([`Self::set_options`]).
    options: CudaOptions,
    /// The live values of the settings [`Self::set_options`] changes.
    switches: switches::Switches,
    graphs: graph::DecodeGraphs,
    /// Pinned host memory for KV blocks on their way to or from a transfer.
    kv_staging: staging::KvStaging,
    /// The next projection's weight, read into L2 by the ops before it ([`prefetch`]).
    prefetch: Prefetch,
    /// One counter per tile of a `skinny.cu` launch with K split over blocks (its last block
    /// sums the partials); every launch leaves them zero.
    skinny_counters: CudaSlice<u32>,
    /// Weights' TMA tensor maps for `skinny.cu`, by (address, outputs, inputs): encoded at a
    /// weight's first projection, then looked up.
    skinny_weight_maps: skinny::WeightMaps,
    /// Some FP8 weight quantizes its input per token: the norms and silu_mul write their rows'
    /// FP8 form for it ([`CudaOptions::fp8_fused_quant`]). Set at upload.
    fp8_per_token_inputs: std::sync::atomic::AtomicBool,
    /// LoRA adapters read the projections' inputs, so those are never written as FP8 codes
    /// alone. Set when adapters are loaded.
    lora_reads_inputs: std::sync::atomic::AtomicBool,
    /// Sampling summaries queued for the host, and the picks chained tokens read.
    summaries: sample::SummaryQueue,
    /// Pinned memory the batches' metadata is uploaded from.
    meta_staging: batch::MetaStaging,
    /// Where a mixed batch's prefill attention runs beside its decode attention
    /// ([`CudaOptions::concurrent_attention`] at construction).
    side: Option<side_stream::SideStream>,
    /// The rows of each LoRA adapter in the forward being queued, on the device: uploaded at
    /// an adapter's first projection, read by its others (emptied by `prepare_batch`).
    lora_rows: std::sync::Mutex<Vec<(Vec<u32>, CudaSlice<u32>)>>,
    /// This backend's place in a tensor-parallel group of GPUs ([`Self::join_group`]).
    group: Option<NcclRank>,
    /// The bf16 copy of FP8 cache blocks the warpgroup prefill kernel reads.
    widened: widened_kv::WidenedKvSlot,
    /// Launches by operation, while a test counts them ([`Self::count_launches`]).
    launch_count: launch_count::LaunchCount,
    /// Blocks a multiprocessor holds of the persistent decode attention kernel, by head dim
    /// and shared memory, as the driver reported them.
    persistent_occupancy: std::sync::Mutex<Vec<(decode_attention::OccupancyKey, usize)>>,
}

/// Whether the CUDA driver library can be loaded (a GPU machine), without touching a device.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
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

/// Checks that the CUDA libraries load and that device `ordinal` exists, with an error that
/// says what is missing.
fn check_device(ordinal: usize) -> Result<(), BackendError> {
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
    if ordinal >= count.max(0) as usize {
        return Err(BackendError::Device {
            op: "cuda init",
            detail: format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)"
            ),
        });
    }
    Ok(())
}

impl CudaBackend {
    pub fn new(options: &CudaOptions) -> Result<Self, BackendError> {
        check_device(options.ordinal)?;
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
        let compute_capability = dev!("cuda init", ctx.compute_capability())?;
        let fp8_gemm = if compute_capability >= (8, 9) {
            Some(fp8_gemm::Fp8Gemm::new(
                stream.clone(),
                options.gemm_clusters,
                options.fp8_fast_accum,
                options.fp8_tune,
            )?)
        } else {
            None
        };
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
        let switches = switches::Switches::new(options, side.is_some());
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            fp8_gemm,
            compute_capability,
            kernels,
            name,
            multiprocessors,
            programmatic_launch: options.programmatic_launch && compute_capability >= (9, 0),
            options: options.clone(),
            switches,
            graphs,
            prefetch,
            kv_staging: staging::KvStaging::default(),
            summaries: sample::SummaryQueue::default(),
            meta_staging: batch::MetaStaging::default(),
            side,
            lora_rows: Default::default(),
            skinny_counters,
            skinny_weight_maps: skinny::WeightMaps::default(),
            fp8_per_token_inputs: std::sync::atomic::AtomicBool::new(false),
            lora_reads_inputs: std::sync::atomic::AtomicBool::new(false),
            group: None,
            widened: widened_kv::WidenedKvSlot::default(),
            launch_count: launch_count::LaunchCount::default(),
            persistent_occupancy: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Makes this backend rank `rank.rank()` of a tensor-parallel group: its
    /// [`Backend::all_reduce_sum`](crate::backend::Backend::all_reduce_sum) sums over the group through `rank` (made for this backend's
    /// stream by [`nccl_communicators`]).
    ///
    /// Decode steps keep their CUDA graphs: every rank is sent the same steps, so the ranks
    /// capture and replay in lockstep, each graph holding its rank's all-reduces (NCCL kernels
    /// on the captured stream). `TANDEM_TP_CUDA_GRAPHS=0` runs the ranks eagerly instead.
    pub fn join_group(&mut self, rank: NcclRank) {
        if !self.options.tp_cuda_graphs && self.graphs.enabled() {
            tracing::info!(
                rank = rank.rank(),
                "tensor-parallel rank: CUDA graphs off (TANDEM_TP_CUDA_GRAPHS=0)"
            );
            self.graphs.set_enabled(false);
        }
        self.group = Some(rank);
    }

    /// Whether this GPU runs FP8 weights: FP8 tensor cores (compute capability 8.9+) and
    /// cuBLASLt's FP8 products; else why not, for the error that refuses an FP8 model.
    fn fp8_support(&self) -> Result<(), String> {
        let (major, minor) = self.compute_capability;
        if self.fp8_gemm.is_some() {
            Ok(())
        } else {
            Err(format!(
                "{} (compute capability {major}.{minor}) has no FP8 tensor cores (8.9 or newer: \
                 Ada, Hopper, Blackwell); serve this FP8 checkpoint on such a GPU or on the CPU, \
                 or serve its 16-bit original",
                self.name
            ))
        }
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

    /// The settings this backend runs with: those it was built with, and the live values of
    /// those [`Self::set_options`] changes.
    pub fn options(&self) -> CudaOptions {
        let mut options = self.options.clone();
        self.switches.write_into(&mut options);
        options.cuda_graphs = self.graphs.enabled();
        options
    }

    /// Takes `options`' values of the settings a running backend can change, to compare
    /// kernels on one loaded model (`gpu_bench`): [`CudaOptions::cuda_graphs`],
    /// [`decode_mma`](CudaOptions::decode_mma), [`flash_wgmma`](CudaOptions::flash_wgmma),
    /// [`skinny_gemm`](CudaOptions::skinny_gemm),
    /// [`skinny_everywhere`](CudaOptions::skinny_everywhere),
    /// [`concurrent_attention`](CudaOptions::concurrent_attention) (on only where the backend
    /// was built with it, which makes its side stream),
    /// [`gemv_max_rows`](CudaOptions::gemv_max_rows) and [`gemv_silu`](CudaOptions::gemv_silu).
    /// Every other setting is fixed when the backend is built: `options` must have the values
    /// [`Self::options`] returns for them. A change drops the captured decode graphs.
    pub fn set_options(&self, options: &CudaOptions) -> Result<(), BackendError> {
        if switches::with_run_time_settings_of(options, &self.options) != self.options {
            return Err(BackendError::Device {
                op: "set_options",
                detail: "only the run-time settings of a CUDA backend can change; the others \
                         are fixed when it is built"
                    .into(),
            });
        }
        if *options != self.options() {
            self.graphs.clear();
        }
        self.switches.set(options, self.side.is_some());
        self.graphs.set_enabled(options.cuda_graphs);
        Ok(())
    }

    /// Starts counting this backend's kernel launches by operation from zero (`true`), or
    /// stops (`false`): tests check which kernels a step ran ([`Self::launch_counts`]).
    /// Replays of captured graphs launch nothing and count nothing.
    pub fn count_launches(&self, on: bool) {
        self.launch_count.set(on);
    }

    /// The launches of each operation (the name its errors carry) since
    /// [`Self::count_launches`] started counting.
    pub fn launch_counts(&self) -> std::collections::HashMap<&'static str, u64> {
        self.launch_count.counts()
    }

    /// Whether prefill attention of head dim 128 runs the warpgroup kernel.
    pub fn has_flash_wgmma(&self) -> bool {
        self.kernels.flash_wgmma.is_some() && self.switches.flash_wgmma()
    }

    /// Whether the kernels have `skinny.cu`'s GEMM (compiled for `sm_90a`), on or off.
    pub fn skinny_compiled(&self) -> bool {
        self.kernels.skinny.is_some()
    }

    /// Whether projections of decode batches run `skinny.cu` (compiled for `sm_90a` and on).
    pub fn has_skinny_gemm(&self) -> bool {
        self.kernels.skinny.is_some() && self.switches.skinny_gemm()
    }

    /// Whether projections of FP8 weights at decode sizes run `skinny.cu`'s FP8 kernel
    /// (compiled for `sm_90a` and [`CudaOptions::skinny_fp8`] on).
    pub fn has_skinny_fp8(&self) -> bool {
        self.kernels.skinny_fp8.is_some() && self.switches.skinny_fp8()
    }

    /// Whether FP8 products choose their configuration by timing at a shape's first eager
    /// product (an FP8-capable GPU and [`CudaOptions::fp8_tune`] on).
    pub fn tunes_fp8_products(&self) -> bool {
        self.fp8_gemm.as_ref().is_some_and(|g| g.tunes())
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

    /// The pending weight prefetch for an op whose output has `rows` rows: taken only when
    /// those rows go to the GEMV kernel (a decode step), which is bandwidth-bound.
    fn take_prefetch(&self, rows: usize) -> PrefetchArgs {
        self.prefetch.take(rows <= self.switches.gemv_max_rows())
    }

    /// Where batch metadata goes to this backend's device.
    fn meta_upload(&self) -> batch::MetaUpload<'_> {
        batch::MetaUpload {
            ctx: &self.ctx,
            stream: &self.stream,
            staging: &self.meta_staging,
        }
    }

    /// Whether a norm of `rows` rows runs wide blocks ([`norm_threads`]): where it reads the
    /// next weight ahead (`prefetch`: decode sizes, most blocks only prefetching, and the more
    /// threads ask L2 for the weight at once the better), and where the rows are too few to
    /// fill the multiprocessors several times over (a row's latency is the cost). At prefill
    /// sizes narrow blocks let a multiprocessor hold several rows: with wide ones (1,024
    /// threads for Llama-3.1-8B's 4,096 values) it held two, whose block reductions kept the
    /// memory idle (add_rms_norm ~2.4 TB/s on an H200), while narrow blocks at decode sizes
    /// made the step of 32 sequences ~4% slower.
    fn norm_block_is_wide(&self, rows: usize, prefetch: PrefetchArgs) -> bool {
        prefetch.is_some() || rows < 4 * self.multiprocessors
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

    /// The arguments of a launch of `kernel` on the backend's stream.
    fn kernel_args<'a>(
        &'a self,
        kernel: &'a cudarc::driver::CudaFunction,
    ) -> launch::KernelArgs<'a> {
        launch::KernelArgs::new(&self.stream, kernel)
    }

    fn launch(
        &self,
        mut args: launch::KernelArgs<'_>,
        cfg: LaunchConfig,
        op: &'static str,
    ) -> Result<(), BackendError> {
        self.launch_count.record(op);
        // SAFETY: each caller passes the argument list its kernel's signature declares, with
        // buffers of the sizes the kernel indexes (checked by the caller against the shapes);
        // every kernel of `workers/kernels/` waits for the previous one before touching memory
        // (`pdl_wait`), as a programmatic launch needs.
        unsafe { args.launch(cfg, self.programmatic_launch) }.map_err(|e| device_error(op, &e))
    }
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

/// Threads of a norm's block for rows of `cols` values: a 16-byte load a thread where `wide`
/// ([`CudaBackend::norm_block_is_wide`]), else four (`NORM_VEC` in elementwise.cu). The sums'
/// order follows the block, so a row's bits can differ between the two, as a projection's do
/// between the GEMV and cuBLAS.
fn norm_threads(cols: usize, wide: bool) -> u32 {
    let per_thread = if wide { 4 } else { 16 };
    (cols.div_ceil(per_thread).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
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
