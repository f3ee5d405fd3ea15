// Shared helpers of tandem's CUDA kernels. NVRTC compiles every kernel file with this text
// prepended (workers/src/backend/cuda/kernels.rs), so no CUDA toolkit headers are needed:
// bf16 is handled as its bit pattern, converted with the same round-to-nearest-even rule as
// the `half` crate on the host, so the GPU stores exactly what the CPU backend would.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Programmatic dependent launch (compute capability 9.0+; workers/src/backend/cuda/launch.rs).
// A kernel launched programmatically may start before the kernel ahead of it on the stream has
// finished, so every kernel here runs `pdl_wait` before it reads or writes memory another
// kernel touches; without such a launch the wait returns at once. `pdl_trigger` lets the next
// kernel's blocks start: every kernel gives it right after its wait, so the next one is
// resident when this one ends. Both compile to nothing before Hopper.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The start of every kernel that reads nothing ahead of its wait.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_trigger();
}

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

// Two f32 as packed bf16 (`lo` in the low half), rounded to nearest even as f32_to_bf16
// rounds each value (a NaN comes out as the canonical quiet NaN), in one instruction for the
// pair: where a kernel converts every value it writes, the integer rounding sequence made the
// ALU its busiest pipe (flash.cu's score tiles).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// An FP8 e4m3 code (the KV cache's `fp8` element).
typedef unsigned char fp8;

// Two f32 to two e4m3 codes (round to nearest even, saturating at +-448); `lo` in the low byte.
// The FP8 conversions are sm_89+ instructions; built for an older GPU the kernels using them
// trap, and the backend refuses FP8 weights and FP8 KV caches there before any runs.
__device__ __forceinline__ unsigned short f32x2_to_e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

// Two e4m3 codes (the low byte first) to their exact f32 values.
__device__ __forceinline__ float2 e4m3x2_to_f32x2(unsigned short codes) {
#if __CUDA_ARCH__ >= 890
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(codes));
    float lo, hi;
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((unsigned short)(h2 & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((unsigned short)(h2 >> 16)));
    return make_float2(lo, hi);
#else
    __trap();
    return make_float2(0.0f, 0.0f);
#endif
}

// A KV-cache element type's stores and loads: bf16, or FP8 e4m3 codes (exact widening; stores
// round to nearest and saturate).
__device__ __forceinline__ void kv_store2(bf16* p, float a, float b) {
    *reinterpret_cast<u32*>(p) = (u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16);
}
__device__ __forceinline__ void kv_store2(fp8* p, float a, float b) {
    *reinterpret_cast<unsigned short*>(p) = f32x2_to_e4m3x2(a, b);
}
__device__ __forceinline__ void kv_store1(bf16* p, float a) { *p = f32_to_bf16(a); }
__device__ __forceinline__ void kv_store1(fp8* p, float a) {
    *p = (fp8)(f32x2_to_e4m3x2(a, 0.0f) & 0xffu);
}
__device__ __forceinline__ void kv_store4(bf16* p, float4 x) {
    *reinterpret_cast<uint2*>(p) =
        make_uint2((u32)f32_to_bf16(x.x) | ((u32)f32_to_bf16(x.y) << 16),
                   (u32)f32_to_bf16(x.z) | ((u32)f32_to_bf16(x.w) << 16));
}
__device__ __forceinline__ void kv_store4(fp8* p, float4 x) {
    *reinterpret_cast<u32*>(p) =
        (u32)f32x2_to_e4m3x2(x.x, x.y) | ((u32)f32x2_to_e4m3x2(x.z, x.w) << 16);
}
// One element of a cache as f32.
__device__ __forceinline__ float kv_to_f32(bf16 x) { return bf16_to_f32(x); }
__device__ __forceinline__ float kv_to_f32(fp8 x) { return e4m3x2_to_f32x2((unsigned short)x).x; }

// Eight consecutive elements of a cache as loaded (16 bytes of bf16, 8 of FP8 codes), and
// their widening to f32.
template <typename C> struct KvRaw8 { typedef uint4 type; };
template <> struct KvRaw8<fp8> { typedef uint2 type; };
__device__ __forceinline__ void kv_widen8(const uint4& raw, float* f) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void kv_widen8(const uint2& raw, float* f) {
    const u32 w[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float2 a = e4m3x2_to_f32x2((unsigned short)(w[i] & 0xffffu));
        const float2 b = e4m3x2_to_f32x2((unsigned short)(w[i] >> 16));
        f[4 * i] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = b.x, f[4 * i + 3] = b.y;
    }
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

// Largest value over the whole block (blockDim.x a multiple of 32); every thread gets it.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial_max[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial_max[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    return warp_max(lane < warps ? partial_max[lane] : 0.0f);
}

// FP8 e4m3's largest finite value, and the scale that maps a row's largest magnitude `amax` to
// it (1 for a row of zeros): the per-token quantization of a projection's input rows, the same
// wherever it is done (fp8.cu's quantize_fp8_rows, the norms and silu_mul that write it).
#define FP8_MAX 448.0f
__device__ __forceinline__ float fp8_row_scale(float amax) { return amax > 0.0f ? amax / FP8_MAX : 1.0f; }

// Eight bf16 values (one 16-byte load) as f32.
__device__ __forceinline__ void bf16x8_to_f32(const uint4 v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Eight bf16 values' largest magnitude, and their e4m3 codes times `inverse` (the low byte
// first): the per-token quantization of rows kept in registers.
__device__ __forceinline__ float bf16x8_amax(const uint4 v) {
    float f[8];
    bf16x8_to_f32(v, f);
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(f[i]));
    return m;
}
__device__ __forceinline__ uint2 bf16x8_to_e4m3x8(const uint4 v, float inverse) {
    float f[8];
    bf16x8_to_f32(v, f);
    const u32 c0 = f32x2_to_e4m3x2(f[0] * inverse, f[1] * inverse);
    const u32 c1 = f32x2_to_e4m3x2(f[2] * inverse, f[3] * inverse);
    const u32 c2 = f32x2_to_e4m3x2(f[4] * inverse, f[5] * inverse);
    const u32 c3 = f32x2_to_e4m3x2(f[6] * inverse, f[7] * inverse);
    return make_uint2(c0 | (c1 << 16), c2 | (c3 << 16));
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
