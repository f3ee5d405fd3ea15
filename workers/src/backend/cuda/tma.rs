//! TMA tensor maps (`cuTensorMapEncodeTiled`): how the Hopper kernels describe a bf16 tensor
//! in device memory so that one instruction copies a box of it into shared memory, in the
//! 128-byte swizzle their `wgmma` operands use. Encoding reads no device memory.

use cudarc::driver::sys;

/// A bf16 tensor at `ptr` of `dims` elements (innermost first), `strides` the bytes between
/// consecutive indices of every dimension but the innermost (`dims.len() - 1` of them), copied
/// in boxes of `boxes` elements (the innermost 64: 128 bytes, the swizzle's width), zero fill
/// past the edges. `Err` with the driver's result where it refuses (an address or stride not
/// 16-byte aligned, a box too large, more than 5 dimensions).
pub(super) fn encode_bf16_swizzled(
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<[u64; 16], sys::CUresult> {
    let rank = dims.len();
    if rank == 0 || rank > 5 || strides.len() + 1 != rank || boxes.len() != rank {
        return Err(sys::CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let element_strides = [1u32; 5];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: `dims` and `boxes` have `rank` entries, `strides` `rank - 1` and
    // `element_strides` at least `rank` (checked above); the call only encodes the
    // description.
    let result = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            rank as u32,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if result != sys::CUresult::CUDA_SUCCESS {
        return Err(result);
    }
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { map.assume_init() }.opaque)
}
