// Projections of a few rows (decode steps): y[m, n] = sum_k x[m, k] * w[n, k] for m < M <= 8.
// Reading the weights is the whole cost, so each warp streams whole weight rows with 16-byte
// loads, several in flight per lane, and keeps one partial sum per input row; x (a few KB) is
// re-read from L1/L2. cuBLAS picks kernels tuned for larger batches and reached about 65% of
// the copy bandwidth on these shapes.

#define GEMV_WARPS 8
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif

// The sums of weight row `row` against the M rows of x, in every lane of the warp.
template <int M>
__device__ __forceinline__ void gemv_row_sums(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                              int row, int k, float* __restrict__ sums) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const int chunks = k / 8;  // 16-byte chunks per row (k is a multiple of 8)
    pdl_enter();
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    int c = lane;
    for (; c + 32 * (GEMV_UNROLL - 1) < chunks; c += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldcs(wr + c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            float wf[8];
            bf16x8_to_f32(wv[u], wf);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[8];
                bf16x8_to_f32(reinterpret_cast<const uint4*>(x + (long long)m * k)[c + 32 * u], xf);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[m] += wf[i] * xf[i];
            }
        }
    }
    for (; c < chunks; c += 32) {
        float wf[8];
        bf16x8_to_f32(__ldcs(wr + c), wf);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xf[8];
            bf16x8_to_f32(reinterpret_cast<const uint4*>(x + (long long)m * k)[c], xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m] += wf[i] * xf[i];
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) sums[m] = warp_sum(acc[m]);
}

template <int M>
__device__ __forceinline__ void gemv_rows(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          float* __restrict__ y, int n, int k) {
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    float sums[M];
    gemv_row_sums<M>(x, w, row, k, sums);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) y[(long long)m * n + row] = sums[m];
    }
}

// The MLP's [gate | up] projection (w: 2f rows, gate's then up's) with the SiLU product taken
// as it is written: out[m, j] = silu(gate_j) * up_j in bf16, what the projection into f32 and
// `silu_mul` after it give (both values rounded to bf16 first), without the second launch and
// the f32 round trip. A block's first half of warps takes gate rows j, the second half the up
// rows f + j of the same j; the up sums reach the gate warps through shared memory. Grid:
// f / (GEMV_WARPS / 2) blocks, rounded up. The prefetch range (`prefetch_l2`: the down
// projection's weights, which `silu_mul` read ahead) is asked for as GEMV_SILU_PREFETCH says:
// 0 not at all, 1 before a block's rows, 2 after them. On an H200 (Llama-3.1-8B shapes in
// FP8, decode at 1-4 rows) 0 was fastest: 1 cost 0.05 ms a step, 2 0.15 (the GEMV already
// keeps the memory busy; reading ahead only moves bytes).
#ifndef GEMV_SILU_PREFETCH
#define GEMV_SILU_PREFETCH 0
#endif
template <int M, typename RowSums>
__device__ __forceinline__ void gemv_silu_pairs(bf16* __restrict__ out, int f, RowSums row_sums,
                                                const char* prefetch, long long prefetch_bytes) {
    if (GEMV_SILU_PREFETCH == 1) prefetch_l2(prefetch, prefetch_bytes);
    constexpr int HALF = GEMV_WARPS / 2;
    __shared__ float up_sums[HALF][M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool up = warp >= HALF;
    const int j = blockIdx.x * HALF + (warp % HALF);
    float sums[M];
    if (j < f) row_sums(up ? f + j : j, sums);
    if (up && lane == 0 && j < f) {
#pragma unroll
        for (int m = 0; m < M; ++m) up_sums[warp - HALF][m] = sums[m];
    }
    __syncthreads();
    if (!up && lane == 0 && j < f) {
#pragma unroll
        for (int m = 0; m < M; ++m)
            out[(long long)m * f + j] =
                f32_to_bf16(silu_times(bf16_round(sums[m]), bf16_round(up_sums[warp][m])));
    }
    if (GEMV_SILU_PREFETCH == 2) prefetch_l2(prefetch, prefetch_bytes);
}

#define GEMV_KERNEL(M)                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                 \
        gemv_bf16_m##M(const bf16* __restrict__ x, const bf16* __restrict__ w,                    \
                       float* __restrict__ y, int n, int k) {                                     \
        gemv_rows<M>(x, w, y, n, k);                                                              \
    }

GEMV_KERNEL(1)
GEMV_KERNEL(2)
GEMV_KERNEL(3)
GEMV_KERNEL(4)
GEMV_KERNEL(5)
GEMV_KERNEL(6)
GEMV_KERNEL(7)
GEMV_KERNEL(8)

#define GEMV_SILU_KERNEL(M)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                 \
        gemv_silu_bf16_m##M(const bf16* __restrict__ x, const bf16* __restrict__ w,               \
                            bf16* __restrict__ out, int f, int k, const char* prefetch,           \
                            long long prefetch_bytes) {                                           \
        gemv_silu_pairs<M>(                                                                       \
            out, f, [&](int row, float* sums) { gemv_row_sums<M>(x, w, row, k, sums); },          \
            prefetch, prefetch_bytes);                                                            \
    }

GEMV_SILU_KERNEL(1)
GEMV_SILU_KERNEL(2)
GEMV_SILU_KERNEL(3)
GEMV_SILU_KERNEL(4)
GEMV_SILU_KERNEL(5)
GEMV_SILU_KERNEL(6)
GEMV_SILU_KERNEL(7)
GEMV_SILU_KERNEL(8)
