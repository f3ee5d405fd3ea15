// Shared helpers of tandem's CUDA kernels. NVRTC compiles every kernel file with this text
// prepended (workers/src/backend/cuda/kernels.rs), so no CUDA toolkit headers are needed:
// bf16 is handled as its bit pattern, converted with the same round-to-nearest-even rule as
// the `half` crate on the host, so the GPU stores exactly what the CPU backend would.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

// -infinity without math headers.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16 x) {
    return __uint_as_float(((u32)x) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);  // quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// Largest value and the lowest index holding it, over a warp (indices of -inf-only lanes are
// INT_MAX so any real index wins the tie).
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
}

// The same over the whole block (blockDim.x a multiple of 32); every thread gets the result.
__device__ __forceinline__ void block_argmax(float& v, int& idx) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(v, idx);
    __syncthreads();
    if (lane == 0) { best_v[warp] = v; best_i[warp] = idx; }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? best_v[lane] : NEG_INF;
    idx = lane < warps ? best_i[lane] : 0x7fffffff;
    warp_argmax(v, idx);
}

// Asks L2 to load [ptr, ptr + bytes): the weights of the projection that comes next, so that the
// memory bandwidth a short latency-bound kernel (norm, attention, SiLU) leaves idle is spent
// reading ahead. The 128-byte lines are spread over every thread of the grid; nothing waits for
// them and nothing depends on them (a hint: the projection reads the same bytes either way).
__device__ __forceinline__ void prefetch_l2(const char* ptr, long long bytes) {
    if (bytes <= 0) return;
    const long long block =
        ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const long long threads = (long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x;
    for (long long off = (block * blockDim.x + threadIdx.x) * 128; off < bytes; off += threads * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr + off));
}
