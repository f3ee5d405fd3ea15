//! Kernel launches through `cuLaunchKernelEx`, which can carry launch attributes that
//! cudarc's launch builder cannot: here programmatic dependent launch (PDL, Hopper and later).
//!
//! A launch marked programmatic may start while the kernel before it on the stream is still
//! running: its blocks become resident as soon as every block of the previous kernel has
//! passed `griddepcontrol.launch_dependents` (`pdl_trigger` in common.cuh), and they wait in
//! `griddepcontrol.wait` (`pdl_wait`) until that kernel has finished and its writes are
//! visible. A decode step of a small batch is a chain of ~300 kernels, each a few microseconds
//! long; a kernel's launch and block dispatch then overlap the previous kernel's tail instead
//! of following it. Every
//! kernel of `workers/kernels/` waits before it touches what another kernel wrote (a test
//! checks the sources), so any of them may be launched this way; a launch that is not marked,
//! or a kernel of cuBLAS or NCCL, is ordered as usual. In a captured decode step the edge
//! stays programmatic only where two kernels follow each other directly: an activation's
//! allocation or free between them, which most pairs have, makes it an ordinary one
//! (graph.rs), so eager steps gain most. Keeping every edge programmatic would not pay there:
//! on a captured chain of batch-1 GEMVs the kernels' early trigger made it 11% slower (the next
//! kernel's blocks take slots while the current one still has waves to place), and a trigger
//! at exit gained about 0.25 us an edge (docs/benchmarks.md).
//!
//! [`KernelArgs`] mirrors cudarc's `LaunchArgs` (`arg` for scalars and device buffers) but
//! owns copies of its arguments, so that they can be handed to the driver as one array.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError,
    LaunchConfig,
};

/// Room for one kernel argument: the largest is a TMA tensor map (128 bytes, 128-byte aligned).
#[repr(C, align(128))]
struct ArgSlot([u8; 128]);

/// A kernel and its arguments, to be launched on `stream`.
pub(super) struct KernelArgs<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    slots: Vec<ArgSlot>,
}

impl<'a> KernelArgs<'a> {
    pub(super) fn new(stream: &'a CudaStream, func: &'a CudaFunction) -> Self {
        KernelArgs {
            stream,
            func,
            slots: Vec::with_capacity(24),
        }
    }

    /// Appends the bytes of one argument.
    fn push_bytes(&mut self, bytes: &[u8]) -> &mut Self {
        assert!(
            bytes.len() <= std::mem::size_of::<ArgSlot>(),
            "kernel argument of {} bytes",
            bytes.len()
        );
        let mut slot = ArgSlot([0; 128]);
        slot.0[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(slot);
        self
    }

    fn push_value<T: KernelParam>(&mut self, value: &T) -> &mut Self {
        // SAFETY: `T` is plain bytes without padding (`KernelParam`).
        let bytes = unsafe {
            std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        self.push_bytes(bytes)
    }

    fn push_device_address(&mut self, address: sys::CUdeviceptr) -> &mut Self {
        self.push_value(&address)
    }

    /// Launches the kernel with `cfg`; `programmatic`: as a programmatic dependent launch.
    ///
    /// # Safety
    /// The arguments must be those the kernel's signature declares, in order, with buffers of
    /// the sizes it indexes; with `programmatic`, the kernel must wait (`pdl_wait`) before it
    /// reads or writes memory an earlier kernel of the stream touches.
    pub(super) unsafe fn launch(
        &mut self,
        cfg: LaunchConfig,
        programmatic: bool,
    ) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut c_void> = self
            .slots
            .iter_mut()
            .map(|slot| slot.0.as_mut_ptr().cast::<c_void>())
            .collect();
        // SAFETY: an all-zero attribute is a valid value of the C struct; its id and value
        // are set below.
        let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if programmatic {
                &mut attribute
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(programmatic),
        };
        // SAFETY: `params` holds one pointer per argument, each to a slot that lives until the
        // call returns (the driver copies the values); the caller vouches for the arguments.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// `arg` for the kinds of kernel arguments the backend passes.
pub(super) trait PushArg<T> {
    fn arg(&mut self, arg: T) -> &mut Self;
}

/// A value a kernel takes as its bytes (a scalar, or a struct such as a TMA tensor map).
///
/// # Safety
/// The type must be plain bytes with the size and layout of the kernel's parameter, at most
/// 128 bytes, with no padding.
pub(super) unsafe trait KernelParam: Copy {}

// SAFETY: C's int, unsigned, long long, unsigned long long and float.
unsafe impl KernelParam for i32 {}
unsafe impl KernelParam for u32 {}
unsafe impl KernelParam for i64 {}
unsafe impl KernelParam for u64 {}
unsafe impl KernelParam for f32 {}

impl<T: KernelParam> PushArg<&T> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &T) -> &mut Self {
        self.push_value(arg)
    }
}

impl<T> PushArg<&CudaSlice<T>> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &CudaSlice<T>) -> &mut Self {
        let address = arg.device_ptr(self.stream).0;
        self.push_device_address(address)
    }
}

impl<T> PushArg<&mut CudaSlice<T>> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &mut CudaSlice<T>) -> &mut Self {
        let address = arg.device_ptr(self.stream).0;
        self.push_device_address(address)
    }
}

impl<T> PushArg<&CudaView<'_, T>> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &CudaView<'_, T>) -> &mut Self {
        let address = arg.device_ptr(self.stream).0;
        self.push_device_address(address)
    }
}

impl<T> PushArg<&mut CudaViewMut<'_, T>> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &mut CudaViewMut<'_, T>) -> &mut Self {
        let address = arg.device_ptr(self.stream).0;
        self.push_device_address(address)
    }
}

impl<T> PushArg<&CudaViewMut<'_, T>> for KernelArgs<'_> {
    #[inline]
    fn arg(&mut self, arg: &CudaViewMut<'_, T>) -> &mut Self {
        let address = arg.device_ptr(self.stream).0;
        self.push_device_address(address)
    }
}

#[cfg(test)]
mod tests {
    use super::ArgSlot;

    /// A slot holds the largest argument, a TMA tensor map (128 bytes, 128-byte aligned), with
    /// its alignment.
    #[test]
    fn a_slot_holds_a_tensor_map() {
        assert_eq!(std::mem::align_of::<ArgSlot>(), 128);
        assert_eq!(std::mem::size_of::<ArgSlot>(), 128);
    }
}
