//! The all-reduce of a tensor-parallel group of GPUs ([`crate::model::shard`]): NCCL through
//! cudarc, one communicator per rank, each bound to its rank's backend stream so that the sum
//! is queued in order with the rank's other kernels and the host never waits for it.
//!
//! The ranks are backends of one process, each driven by a thread of its own
//! ([`crate::engine::TensorParallelRunner`]); [`communicators`] makes the whole group's
//! communicators at once (`ncclCommInitAll`), so no unique id has to travel between processes.
//!
//! NCCL is loaded at run time like the other CUDA libraries (cudarc opens `libnccl.so`): a
//! machine without it runs every single-GPU worker, and a tensor-parallel GPU worker fails at
//! start with an error that names the library and how to provide it.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, ReduceOp, result::NcclError};

use crate::backend::BackendError;

/// Whether `libnccl.so` can be loaded, without touching a device.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One rank's communicator.
///
/// NCCL lets a communicator be used from any thread, one call at a time; the mutex keeps calls
/// one at a time, so the backend stays `Sync`.
pub struct NcclRank {
    comm: Mutex<SendComm>,
    rank: usize,
    size: usize,
}

/// A communicator moved to the thread that drives its rank.
///
/// Never destroyed: cudarc's drop calls `ncclCommAbort`, which crashed inside NCCL (SIGSEGV) on
/// the device machine when a worker whose group had broken (a rank out of memory while its
/// peer waited in an all-reduce) was exiting. A group lives as long as its worker process, so
/// the process's exit is what frees it.
struct SendComm(std::mem::ManuallyDrop<Comm>);

// SAFETY: an NCCL communicator is not tied to the thread that created it (NCCL's user guide,
// "Thread safety": a communicator may be used by any thread, but not by two at once); the
// mutex in `NcclRank` serializes its use.
unsafe impl Send for SendComm {}

impl std::fmt::Debug for NcclRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NCCL rank {} of {}", self.rank, self.size)
    }
}

/// What an NCCL error says.
fn describe(e: &NcclError) -> String {
    format!("NCCL returned {:?}", e.0)
}

/// The communicators of a group whose rank `r` runs on `streams[r]` (each stream on its own
/// device: NCCL refuses two ranks on one GPU), in rank order.
pub fn communicators(streams: Vec<Arc<CudaStream>>) -> Result<Vec<NcclRank>, BackendError> {
    if !nccl_present() {
        return Err(BackendError::Device {
            op: "nccl init",
            detail: "libnccl.so cannot be loaded: a tensor-parallel GPU worker needs NCCL \
                     under that name on the library path (the CUDA repository's libnccl-dev \
                     installs it; where only libnccl.so.2 is found, as in pip's \
                     nvidia-nccl-cu13, link libnccl.so to it in a directory on \
                     LD_LIBRARY_PATH)"
                .into(),
        });
    }
    let size = streams.len();
    let ordinals: Vec<usize> = streams.iter().map(|s| s.context().ordinal()).collect();
    for (i, a) in ordinals.iter().enumerate() {
        if ordinals[..i].contains(a) {
            return Err(BackendError::Device {
                op: "nccl init",
                detail: format!(
                    "two ranks on cuda:{a}: each tensor-parallel rank needs a GPU of its own"
                ),
            });
        }
    }
    let comms = Comm::from_devices(streams).map_err(|e| BackendError::Device {
        op: "nccl init",
        detail: format!("{} for cuda:{ordinals:?}", describe(&e)),
    })?;
    Ok(comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| NcclRank {
            comm: Mutex::new(SendComm(std::mem::ManuallyDrop::new(comm))),
            rank,
            size,
        })
        .collect())
}

impl NcclRank {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Queues the sum over the group of each rank's first `len` values of `data`, in place, on
    /// the communicator's stream (the backend's). Every rank must call it, in the same order.
    ///
    /// An error leaves the group unusable (a peer may wait forever for this rank's part), so
    /// it is reported as a lost device: the worker leaves and restarts.
    pub fn all_reduce_sum(
        &self,
        data: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<(), BackendError> {
        let comm = self
            .comm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut view = data.slice_mut(..len);
        comm.0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| BackendError::DeviceLost {
                op: "all_reduce_sum",
                detail: format!(
                    "{} (rank {} of {} on cuda:{})",
                    describe(&e),
                    self.rank,
                    self.size,
                    comm.0.ordinal()
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::CudaContext;

    /// On a machine with a GPU and NCCL (the device machine): a group of one GPU loads the
    /// library, makes its communicator on the backend's kind of stream and sums in place (the
    /// sum over one rank is the rank's values), leaving values past `len` alone. Two ranks
    /// need two GPUs: `worker_generate_on_two_gpus_equals_one_gpu` in tests/cuda_backend.rs.
    #[test]
    fn a_group_of_one_gpu_sums_in_place() {
        if !super::super::driver_present() || !nccl_present() {
            tandem_test_skip::skip("no CUDA driver or no libnccl on this machine");
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let ranks = communicators(vec![stream.clone()]).unwrap();
        assert_eq!((ranks[0].rank(), ranks[0].size()), (0, 1));
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut data = stream.clone_htod(&values).unwrap();
        ranks[0].all_reduce_sum(&mut data, 600).unwrap();
        assert_eq!(stream.clone_dtoh(&data).unwrap(), values);
    }

    #[test]
    fn two_ranks_on_one_gpu_are_refused_before_nccl_sees_them() {
        if !super::super::driver_present() || !nccl_present() {
            tandem_test_skip::skip("no CUDA driver or no libnccl on this machine");
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let streams = vec![ctx.new_stream().unwrap(), ctx.new_stream().unwrap()];
        let err = communicators(streams).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("two ranks on cuda:0")),
            "{err:?}"
        );
    }
}
