//! TMA tensor maps (`cuTensorMapEncodeTiled`): how the Hopper kernels describe a tensor in
//! device memory (bf16, or FP8 codes as bytes) so that one instruction copies a box of it into
//! shared memory, in the 128-byte swizzle their `wgmma` operands use. Encoding reads no device
//! memory.

use cudarc::driver::sys;

/// The element type of a tensor map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum TmaElement {
    Bf16,
    /// One-byte elements (FP8 codes: TMA copies them as they are).
    Byte,
}

impl TmaElement {
    /// Bytes an element.
    pub(super) fn bytes(self) -> u64 {
        match self {
            TmaElement::Bf16 => 2,
            TmaElement::Byte => 1,
        }
    }

    fn data_type(self) -> sys::CUtensorMapDataType {
        match self {
            TmaElement::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            TmaElement::Byte => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        }
    }
}

/// A bf16 tensor at `ptr`: [`encode_swizzled`] of [`TmaElement::Bf16`].
pub(super) fn encode_bf16_swizzled(
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<[u64; 16], sys::CUresult> {
    encode_swizzled(TmaElement::Bf16, ptr, dims, strides, boxes)
}

/// A tensor of `element`s at `ptr` of `dims` elements (innermost first), `strides` the bytes
/// between consecutive indices of every dimension but the innermost (`dims.len() - 1` of them),
/// copied in boxes of `boxes` elements (the innermost 128 bytes: the swizzle's width), zero
/// fill past the edges. `Err` with the driver's result where it refuses (an address or stride
/// not 16-byte aligned, a box too large, more than 5 dimensions).
pub(super) fn encode_swizzled(
    element: TmaElement,
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
            element.data_type(),
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
