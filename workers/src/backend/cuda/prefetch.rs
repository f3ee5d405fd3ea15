//! Reading the next projection's weights into L2 while the short ops before it run.
//!
//! A decode step at a small batch alternates projections, which stream their weights at close
//! to the memory bandwidth, with norms, rotary, attention and SiLU, which are latency-bound and
//! leave the memory idle for a few microseconds each. The model announces each projection's
//! weight before the ops that compute its input ([`Backend::prefetch_weight`]); the next of
//! those ops that launches a kernel passes the weight's first bytes to it, and its threads ask
//! L2 for them (`prefetch_l2` in `kernels/common.cuh`). The projection then finds them there.
//!
//! The same announcement says what the projection reads: an FP8 weight that quantizes its
//! input per token reads only the FP8 codes a norm or silu_mul writes for it, so those write
//! no bf16 rows beside them ([`Prefetch::next_reads_codes`]).
//!
//! [`Backend::prefetch_weight`]: crate::backend::Backend::prefetch_weight

use std::sync::Mutex;

use cudarc::driver::CudaStream;

use super::tensor::{CudaWeight, MatrixData};
use crate::backend::InputScale;

/// The pending hint and how much of a weight to read ahead.
pub(super) struct Prefetch {
    /// Most bytes of one weight read ahead; 0 turns prefetching off.
    max_bytes: usize,
    pending: Mutex<Option<PrefetchArgs>>,
    /// The announced projection's input features where its weight is FP8 and quantizes its
    /// input per token: it then reads only the FP8 codes a norm or silu_mul can write for it,
    /// and their bf16 rows need not be written. Kept (not taken by a kernel) until the
    /// projection runs.
    codes_input: Mutex<Option<usize>>,
}

/// The kernel arguments of a prefetch: `(address, bytes)`, bytes 0 for none.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PrefetchArgs {
    pub ptr: u64,
    pub bytes: i64,
}

impl PrefetchArgs {
    pub fn is_some(&self) -> bool {
        self.bytes > 0
    }
}

impl Prefetch {
    /// Reads ahead at most `max_mib` MiB of each weight when set
    /// ([`CudaOptions::l2_prefetch_mb`](super::CudaOptions::l2_prefetch_mb); 0: none), else a
    /// sixth of the device's `l2_bytes`: about what the memory reads in the idle time of the
    /// ops in between. Measured on an H100 (50 MB of L2; Llama-3.1-8B decode at batch 1): no
    /// prefetch 6.32 ms, 4 MiB 6.20, 8 MiB 6.14-6.21, 12 MiB 6.24, 16 MiB 6.32, 32 MiB 6.44
    /// (more is worse: the prefetched lines start to evict each other and the projection's).
    pub fn new(l2_bytes: usize, max_mib: Option<usize>) -> Self {
        let max_bytes = match max_mib {
            Some(mib) => mib << 20,
            None => l2_bytes / 6,
        };
        Prefetch {
            max_bytes,
            pending: Mutex::new(None),
            codes_input: Mutex::new(None),
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Remembers `weight` as the next projection's. Weights under twice the read-ahead are
    /// left alone: their projections take a few microseconds and are bound by launches, not
    /// bandwidth, and the prefetching blocks cost more than they save (SmolLM2-135M decode at
    /// batch 1 on an H100: 1.34 ms without prefetch, 1.40 with).
    pub fn announce(&self, stream: &CudaStream, weight: &CudaWeight) {
        let CudaWeight::Matrix { data, cols, .. } = weight else {
            self.clear();
            return;
        };
        let per_token_fp8 = matches!(
            data,
            MatrixData::Fp8 {
                input: InputScale::PerToken,
                ..
            }
        );
        *lock(&self.codes_input) = per_token_fp8.then_some(*cols);
        if self.max_bytes == 0 || data.size_bytes() < 2 * self.max_bytes {
            *self.lock() = None;
            return;
        }
        let ptr = data.device_ptr(stream);
        let bytes = data.size_bytes().min(self.max_bytes);
        *self.lock() = Some(PrefetchArgs {
            ptr,
            bytes: bytes as i64,
        });
    }

    /// Forgets the hint: its projection has run.
    pub fn clear(&self) {
        *self.lock() = None;
        *lock(&self.codes_input) = None;
    }

    /// Whether the announced projection reads rows of `cols` values only as FP8 codes with
    /// per-token scales (where the rows are many enough that it quantizes them at all: the
    /// caller's to know).
    pub fn next_reads_codes(&self, cols: usize) -> bool {
        *lock(&self.codes_input) == Some(cols)
    }

    /// The hint for the kernel about to launch, taken so that one kernel reads it ahead; none
    /// when the op's output feeds a matrix product of many rows (`decode` false), which is
    /// compute-bound and would only see its inputs' bandwidth shared.
    pub fn take(&self, decode: bool) -> PrefetchArgs {
        let pending = self.lock().take();
        match pending {
            Some(args) if decode => args,
            _ => PrefetchArgs::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PrefetchArgs>> {
        lock(&self.pending)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
