// A batch-1 decode step's projections in one resident grid, against one launch per projection.
//
// The question it answers: at batch 1 each projection launch loses ~5 us to filling the GPU,
// the first loads' latency and the drain (docs/benchmarks.md, "Where a batch-1 step goes"), and
// a CUDA graph leaves no gaps to remove. Does one grid that stays resident for the whole step,
// waiting at a grid-wide barrier between dependent projections, stream the same weights closer
// to the copy rate, and does loading the next projection's first weights before the barrier
// (they depend on nothing) hide the refill?
//
// persistent_step.py compiles this with the workers' own kernels prepended (common.cuh, gemv.cu,
// fp8.cu: the production row sums the one-launch-per-projection baseline runs) and times both.
// The persistent kernel's row sums add in the production kernels' order, so both give the same
// bits.

// One projection of the step: y = W x for one input row.
struct StepPhase {
    const unsigned char* w;  // FP8 codes [n, k], or bf16 [n, k] (PHASE_BF16)
    const float* ws;         // per-row scales (FP8)
    const bf16* x;           // input [k], written by the phase before
    void* out;               // bf16 [n] (PHASE_FP8), bf16 [n / 2] (PHASE_FP8_SILU), f32 [n]
    int n, k, kind;
    int pad;
};

#define PHASE_FP8 0       // out[row] = bf16(sum)
#define PHASE_FP8_SILU 1  // rows [gate | up]: out[j] = bf16(silu(bf16(gate_j)) * bf16(up_j))
#define PHASE_BF16 2      // bf16 weights, f32 out (the lm_head)

// The baseline's FP8 launch: gemv_fp8_m1 with a bf16 result.
extern "C" __global__ void __launch_bounds__(GEMV8_WARPS * 32)
    step_gemv_fp8_bf16(const bf16* __restrict__ x, const unsigned char* __restrict__ w,
                       const float* __restrict__ ws, bf16* __restrict__ out, int n, int k) {
    const int row = blockIdx.x * GEMV8_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    float sums[1];
    gemv_fp8_row_sums<1>(x, w, ws, row, k, sums);
    if ((threadIdx.x & 31) == 0) out[row] = f32_to_bf16(sums[0]);
}

#ifndef PS_WARPS
#define PS_WARPS 8
#endif
#ifndef PS_MIN_BLOCKS
#define PS_MIN_BLOCKS 4
#endif
#define PS_MAX_K 14336

// gemv_fp8_row_sums<1>'s sums in its order, x from shared memory, the first GEMV8_UNROLL
// chunks a lane reads taken from `pre` when `have_pre` (loaded before the barrier).
__device__ __forceinline__ float ps_fp8_row_sum(const bf16* x, const unsigned char* __restrict__ w,
                                                const float* __restrict__ ws, int row, int k,
                                                const uint4* pre, bool have_pre) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const int chunks = k / 16;
    float acc[2] = {0.0f, 0.0f};
    int c = lane;
    bool first = true;
    for (; c + 32 * (GEMV8_UNROLL - 1) < chunks; c += 32 * GEMV8_UNROLL) {
        uint4 wv[GEMV8_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV8_UNROLL; ++u) wv[u] = (first && have_pre) ? pre[u] : __ldcs(wr + c + 32 * u);
        first = false;
#pragma unroll
        for (int u = 0; u < GEMV8_UNROLL; ++u) {
            float wf[16];
            e4m3x16_to_scaled_f32(wv[u], wf);
            const uint4* xr = reinterpret_cast<const uint4*>(x) + 2 * (c + 32 * u);
            float xf[16];
            bf16x8_to_f32(xr[0], xf);
            bf16x8_to_f32(xr[1], xf + 8);
#pragma unroll
            for (int i = 0; i < 16; ++i) acc[i & 1] += wf[i] * xf[i];
        }
    }
    for (; c < chunks; c += 32) {
        float wf[16];
        e4m3x16_to_scaled_f32(__ldcs(wr + c), wf);
        const uint4* xr = reinterpret_cast<const uint4*>(x) + 2 * c;
        float xf[16];
        bf16x8_to_f32(xr[0], xf);
        bf16x8_to_f32(xr[1], xf + 8);
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i & 1] += wf[i] * xf[i];
    }
    return warp_sum(acc[0] + acc[1]) * (ws[row] * E4M3_IN_BF16_SCALE);
}

// gemv_row_sums<1>'s sum (bf16 weights), x from shared memory.
__device__ __forceinline__ float ps_bf16_row_sum(const bf16* x, const bf16* __restrict__ w, int row,
                                                 int k) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const int chunks = k / 8;
    float acc = 0.0f;
    int c = lane;
    for (; c + 32 * (GEMV_UNROLL - 1) < chunks; c += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldcs(wr + c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            float wf[8], xf[8];
            bf16x8_to_f32(wv[u], wf);
            bf16x8_to_f32(reinterpret_cast<const uint4*>(x)[c + 32 * u], xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc += wf[i] * xf[i];
        }
    }
    for (; c < chunks; c += 32) {
        float wf[8], xf[8];
        bf16x8_to_f32(__ldcs(wr + c), wf);
        bf16x8_to_f32(reinterpret_cast<const uint4*>(x)[c], xf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += wf[i] * xf[i];
    }
    return warp_sum(acc);
}

__device__ __forceinline__ unsigned ps_load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every block of the grid arrives; none leaves before all have. `target` counts arrivals
// since the counter's `base` (the counter only grows: no reset between barriers).
__device__ __forceinline__ void ps_grid_barrier(unsigned* counter, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        while ((int)(ps_load_acquire(counter) - target) < 0) {
        }
        __threadfence();
    }
    __syncthreads();
}

// The first weights a warp reads in `ph` (its first row's first GEMV8_UNROLL chunks a lane),
// issued before the barrier that makes the phase's input ready.
__device__ __forceinline__ bool ps_prefetch(const StepPhase& ph, int warp_id, uint4* pre) {
    if (ph.kind == PHASE_BF16 || warp_id >= (ph.kind == PHASE_FP8_SILU ? ph.n / 2 : ph.n)) return false;
    if (ph.k / 16 < 32 * GEMV8_UNROLL) return false;
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(ph.w + (long long)warp_id * ph.k);
#pragma unroll
    for (int u = 0; u < GEMV8_UNROLL; ++u) pre[u] = __ldcs(wr + lane + 32 * u);
    return true;
}

// The whole step: phases in order, a grid barrier between each two. Warp w of the grid takes
// rows w, w + warps, ...; each block first copies the phase's input row into shared memory.
extern "C" __global__ void __launch_bounds__(PS_WARPS * 32, PS_MIN_BLOCKS)
    step_persistent(const StepPhase* __restrict__ phases, int count, unsigned* counter,
                    unsigned base, int prefetch) {
    __shared__ __align__(16) bf16 xs[PS_MAX_K];
    const int warps = gridDim.x * PS_WARPS;
    const int warp_id = blockIdx.x * PS_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    uint4 pre[GEMV8_UNROLL];
    bool have_pre = false;
    if (prefetch) have_pre = ps_prefetch(phases[0], warp_id, pre);
    for (int p = 0; p < count; ++p) {
        const StepPhase ph = phases[p];
        // The input row, written by other blocks in the phase before: through L2 (__ldcg).
        for (int i = threadIdx.x; i < ph.k / 8; i += blockDim.x)
            reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(ph.x) + i);
        __syncthreads();
        if (ph.kind == PHASE_FP8) {
            bf16* out = static_cast<bf16*>(ph.out);
            for (int row = warp_id; row < ph.n; row += warps) {
                const float s = ps_fp8_row_sum(xs, ph.w, ph.ws, row, ph.k, pre, have_pre && row == warp_id);
                if (lane == 0) out[row] = f32_to_bf16(s);
            }
        } else if (ph.kind == PHASE_FP8_SILU) {
            const int f = ph.n / 2;
            bf16* out = static_cast<bf16*>(ph.out);
            for (int j = warp_id; j < f; j += warps) {
                const float g = ps_fp8_row_sum(xs, ph.w, ph.ws, j, ph.k, pre, have_pre && j == warp_id);
                const float u = ps_fp8_row_sum(xs, ph.w, ph.ws, f + j, ph.k, pre, false);
                if (lane == 0) out[j] = f32_to_bf16(silu_times(bf16_round(g), bf16_round(u)));
            }
        } else {
            float* out = static_cast<float*>(ph.out);
            const bf16* w = reinterpret_cast<const bf16*>(ph.w);
            for (int row = warp_id; row < ph.n; row += warps) {
                const float s = ps_bf16_row_sum(xs, w, row, ph.k);
                if (lane == 0) out[row] = s;
            }
        }
        if (p + 1 < count) {
            have_pre = prefetch && ps_prefetch(phases[p + 1], warp_id, pre);
            ps_grid_barrier(counter, base + (unsigned)(p + 1) * gridDim.x);
        }
    }
}
