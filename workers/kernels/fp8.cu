// FP8 (e4m3) projections: the activations' quantization for cuBLASLt's FP8 GEMM
// (fp8_gemm.rs), and the GEMV of a few rows, which reads the bf16 activations as they are.
//
// A weight is its e4m3 codes and one f32 scale per output row; an activation row quantized is
// its codes and one scale per row (its largest magnitude mapped to 448, or the checkpoint's
// static scale): y[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * wq[n, k], the sum in f32. The GEMV
// computes y[m, n] = ws[n] * sum_k x[m, k] * wq[n, k]: at a decode step's few rows reading the
// weights is the whole cost, and a quantization kernel of one block per row cost more than
// the bytes FP8 saves (128 launches of a few microseconds per step of Llama-3.1-8B).
//
// The conversions (common.cuh) are sm_89+ instructions; built for an older GPU the kernels
// trap, and the backend refuses FP8 weights there before any runs.


// One block per row of x (bf16, `cols` even): the row's scale (static_scale where it is
// positive, else the row's largest magnitude / 448; 1 for a row of zeros) into scales[row], and
// its e4m3 codes into q8.
extern "C" __global__ void quantize_fp8_rows(const bf16* __restrict__ x,
                                             unsigned char* __restrict__ q8,
                                             float* __restrict__ scales, int cols,
                                             float static_scale) {
    const long long row = blockIdx.x;
    const bf16* xr = x + row * cols;
    float scale = static_scale;
    if (!(scale > 0.0f)) {
        float amax = 0.0f;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(bf16_to_f32(xr[i])));
        scale = fp8_row_scale(block_max(amax));
    }
    if (threadIdx.x == 0) scales[row] = scale;
    const float inverse = 1.0f / scale;
    for (int i = 2 * threadIdx.x; i < cols; i += 2 * blockDim.x) {
        *reinterpret_cast<unsigned short*>(q8 + row * cols + i) =
            f32x2_to_e4m3x2(bf16_to_f32(xr[i]) * inverse, bf16_to_f32(xr[i + 1]) * inverse);
    }
}

#define GEMV8_WARPS 8
#ifndef GEMV8_UNROLL
#define GEMV8_UNROLL 4
#endif

// 2^120: an e4m3 code whose 7 exponent and mantissa bits are moved into a bf16's low exponent
// and high mantissa bits (below) is the code's value times 2^-120, subnormals included; the
// kernel folds the 2^120 back into its final scale.
#define E4M3_IN_BF16_SCALE 1.329227995784916e36f

// Codes b0, b1 (the low two bytes of `w`, or with `high` its high two) as two bf16 bit patterns
// of their values times 2^-120: sign to bit 15, the other 7 bits to bits 4..10. Integer ops
// only: the conversion instructions run at a quarter of the rate a GEMV needs.
__device__ __forceinline__ u32 e4m3x2_to_scaled_bf16x2(u32 w, bool high) {
    const u32 spread = __byte_perm(w, 0u, high ? 0x4342u : 0x4140u);  // [0, b1, 0, b0]
    return ((spread & 0x007f007fu) << 4) | ((spread & 0x00800080u) << 8);
}

// 16 codes (a 16-byte load) to f32 values times 2^-120.
__device__ __forceinline__ void e4m3x16_to_scaled_f32(const uint4 v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 lo = e4m3x2_to_scaled_bf16x2(w[i], false);
        const u32 hi = e4m3x2_to_scaled_bf16x2(w[i], true);
        f[4 * i] = __uint_as_float(lo << 16);
        f[4 * i + 1] = __uint_as_float(lo & 0xffff0000u);
        f[4 * i + 2] = __uint_as_float(hi << 16);
        f[4 * i + 3] = __uint_as_float(hi & 0xffff0000u);
    }
}

// y[m, n] for m < M <= 8: each warp streams whole weight rows (16 codes a lane a load,
// GEMV8_UNROLL loads in flight), x's bf16 rows re-read from L1/L2.
template <int M>
__device__ __forceinline__ void gemv_fp8_rows(const bf16* __restrict__ xq,
                                              const unsigned char* __restrict__ w,
                                              const float* __restrict__ ws,
                                              float* __restrict__ y, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV8_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const int chunks = k / 16;  // 16-byte chunks per weight row (k is a multiple of 16)
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    int c = lane;
    for (; c + 32 * (GEMV8_UNROLL - 1) < chunks; c += 32 * GEMV8_UNROLL) {
        uint4 wv[GEMV8_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV8_UNROLL; ++u) wv[u] = __ldcs(wr + c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV8_UNROLL; ++u) {
            float wf[16];
            e4m3x16_to_scaled_f32(wv[u], wf);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4* xr = reinterpret_cast<const uint4*>(xq + (long long)m * k) + 2 * (c + 32 * u);
                float xf[16];
                bf16x8_to_f32(xr[0], xf);
                bf16x8_to_f32(xr[1], xf + 8);
#pragma unroll
                for (int i = 0; i < 16; ++i) acc[m] += wf[i] * xf[i];
            }
        }
    }
    for (; c < chunks; c += 32) {
        float wf[16];
        e4m3x16_to_scaled_f32(__ldcs(wr + c), wf);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4* xr = reinterpret_cast<const uint4*>(xq + (long long)m * k) + 2 * c;
            float xf[16];
            bf16x8_to_f32(xr[0], xf);
            bf16x8_to_f32(xr[1], xf + 8);
#pragma unroll
            for (int i = 0; i < 16; ++i) acc[m] += wf[i] * xf[i];
        }
    }
    const float w_scale = ws[row] * E4M3_IN_BF16_SCALE;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) y[(long long)m * n + row] = s * w_scale;
    }
}

#define GEMV_FP8_KERNEL(M)                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV8_WARPS * 32)                                \
        gemv_fp8_m##M(const bf16* __restrict__ x, const unsigned char* __restrict__ w,            \
                      const float* __restrict__ ws, float* __restrict__ y, int n, int k) {        \
        gemv_fp8_rows<M>(x, w, ws, y, n, k);                                                      \
    }

GEMV_FP8_KERNEL(1)
GEMV_FP8_KERNEL(2)
GEMV_FP8_KERNEL(3)
GEMV_FP8_KERNEL(4)
GEMV_FP8_KERNEL(5)
GEMV_FP8_KERNEL(6)
GEMV_FP8_KERNEL(7)
GEMV_FP8_KERNEL(8)

// y = x widened: the f32 copy of a bf16 product (cuBLASLt's FP8 GEMM with vector scales
// writes bf16 only) for the ops that read f32 (rotary embedding of q/k/v, a bias add).
// Grid-stride: the launch's grid is capped (`elementwise_config`).
extern "C" __global__ void widen_bf16(const bf16* __restrict__ x, float* __restrict__ y,
                                      long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = bf16_to_f32(x[i]);
    }
}

// The scales of an FP8 product applied to its unscaled f32 sums `acc` ([rows, n]): each
// element times its token's and its output feature's scale, into `y32` (f32, may be `acc`
// itself) or, where y32 is null, into `y16` (bf16). For GPUs whose cuBLASLt does not apply
// vector scales itself. Grid-stride, as `widen_bf16`.
extern "C" __global__ void fp8_scale_rows_cols(const float* acc, float* y32,
                                               bf16* __restrict__ y16,
                                               const float* __restrict__ xs,
                                               const float* __restrict__ ws, int n,
                                               long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = acc[i] * (xs[i / n] * ws[i % n]);
        if (y32 != nullptr) {
            y32[i] = v;
        } else {
            y16[i] = f32_to_bf16(v);
        }
    }
}
