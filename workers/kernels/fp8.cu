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


// 16-byte loads a thread of `quantize_fp8_rows` keeps in registers: rows of up to
// 8 * QUANT_MAX_VECS * blockDim.x values (16,384 at 256 threads) are read once (0: never, to
// compare).
#ifndef QUANT_MAX_VECS
#define QUANT_MAX_VECS 8
#endif

// One block per row of x (bf16, `cols` even): the row's scale (static_scale where it is
// positive, else the row's largest magnitude / 448; 1 for a row of zeros) into scales[row], and
// its e4m3 codes into q8. Rows of a multiple of 8 values that fit the block's registers are
// read once, 16 bytes a load (a first version read each value twice, 2 bytes a load: 18 us a
// projection at 256 rows of 14,336 values on an H100, for ~11 MB moved); others as before.
extern "C" __global__ void quantize_fp8_rows(const bf16* __restrict__ x,
                                             unsigned char* __restrict__ q8,
                                             float* __restrict__ scales, int cols,
                                             float static_scale) {
    pdl_enter();
    const long long row = blockIdx.x;
    const bf16* xr = x + row * cols;
    float scale = static_scale;
#if QUANT_MAX_VECS > 0
    if ((cols & 7) == 0 && cols <= 8 * QUANT_MAX_VECS * (int)blockDim.x) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        const int vecs = cols / 8;
        uint4 v[QUANT_MAX_VECS];
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < QUANT_MAX_VECS; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < vecs) {
                v[j] = xv[i];
                amax = fmaxf(amax, bf16x8_amax(v[j]));
            }
        }
        if (!(scale > 0.0f)) scale = fp8_row_scale(block_max(amax));
        if (threadIdx.x == 0) scales[row] = scale;
        const float inverse = 1.0f / scale;
        uint2* out = reinterpret_cast<uint2*>(q8 + row * cols);
#pragma unroll
        for (int j = 0; j < QUANT_MAX_VECS; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < vecs) out[i] = bf16x8_to_e4m3x8(v[j], inverse);
        }
        return;
    }
#endif
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

// Four codes (bytes b0..b3 of `w`) as two pairs of bf16 bit patterns of their values times
// 2^-120: sign to bit 15, the other 7 bits to bits 4..10 of each half; lo = (b0, b2),
// hi = (b1, b3), the first of each pair in the low half. Integer ops only (7 for 4 codes): the
// conversion instructions run at a quarter of the rate a GEMV needs.
__device__ __forceinline__ void e4m3x4_to_scaled_bf16x2x2(u32 w, u32& lo, u32& hi) {
    hi = (w & 0x80008000u) | ((w >> 4) & 0x07f007f0u);
    lo = ((w << 8) & 0x80008000u) | ((w << 4) & 0x07f007f0u);
}

// 16 codes (a 16-byte load) to f32 values times 2^-120, in order.
__device__ __forceinline__ void e4m3x16_to_scaled_f32(const uint4 v, float* f) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 lo, hi;
        e4m3x4_to_scaled_bf16x2x2(w[i], lo, hi);
        f[4 * i] = __uint_as_float(lo << 16);
        f[4 * i + 1] = __uint_as_float(hi << 16);
        f[4 * i + 2] = __uint_as_float(lo & 0xffff0000u);
        f[4 * i + 3] = __uint_as_float(hi & 0xffff0000u);
    }
}

// y[m, n] for m < M <= 8: each warp streams whole weight rows (16 codes a lane a load,
// GEMV8_UNROLL loads in flight), x's bf16 rows re-read from L1/L2.
template <int M>
__device__ __forceinline__ void gemv_fp8_row_sums(const bf16* __restrict__ xq,
                                                  const unsigned char* __restrict__ w,
                                                  const float* __restrict__ ws, int row, int k,
                                                  float* __restrict__ sums) {
    const int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const int chunks = k / 16;  // 16-byte chunks per weight row (k is a multiple of 16)
    pdl_enter();
    // Two sums per row (even and odd codes): shorter chains of dependent adds.
    float acc[M][2];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = 0.0f;
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
                for (int i = 0; i < 16; ++i) acc[m][i & 1] += wf[i] * xf[i];
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
            for (int i = 0; i < 16; ++i) acc[m][i & 1] += wf[i] * xf[i];
        }
    }
    const float w_scale = ws[row] * E4M3_IN_BF16_SCALE;
#pragma unroll
    for (int m = 0; m < M; ++m) sums[m] = warp_sum(acc[m][0] + acc[m][1]) * w_scale;
}

template <int M>
__device__ __forceinline__ void gemv_fp8_rows(const bf16* __restrict__ xq,
                                              const unsigned char* __restrict__ w,
                                              const float* __restrict__ ws,
                                              float* __restrict__ y, int n, int k) {
    const int row = blockIdx.x * GEMV8_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    float sums[M];
    gemv_fp8_row_sums<M>(xq, w, ws, row, k, sums);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) y[(long long)m * n + row] = sums[m];
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

// `gemv_silu_bf16_m*` over FP8 weights: the [gate | up] projection with the SiLU product
// taken as it is written (GEMV8_WARPS is GEMV_WARPS).
#define GEMV_FP8_SILU_KERNEL(M)                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV8_WARPS * 32)                                \
        gemv_fp8_silu_m##M(const bf16* __restrict__ x, const unsigned char* __restrict__ w,       \
                           const float* __restrict__ ws, bf16* __restrict__ out, int f, int k,    \
                           const char* prefetch, long long prefetch_bytes) {                      \
        gemv_silu_pairs<M>(                                                                       \
            out, f, [&](int row, float* sums) { gemv_fp8_row_sums<M>(x, w, ws, row, k, sums); },  \
            prefetch, prefetch_bytes);                                                            \
    }

GEMV_FP8_SILU_KERNEL(1)
GEMV_FP8_SILU_KERNEL(2)

// The same product on the tensor cores, for decode rows (m <= 8) of weights whose input
// features are a multiple of 64: each code is turned into its bf16 value by integer ops and
// one bf16 multiply (about 2.3 instructions a code), and one `mma.sync` takes 16 weight rows
// by 16 input features against all rows of x at once. The GEMV above spends ~6 instructions
// a code (unpacking to f32, a product per row): compute-bound past 2 rows. Here the cost is
// the same for every row count up to 8; at one row the GEMV above is still 2-3% faster (it
// reads the weights at ~2.4 TB/s on an H100; this kernel is short of occupancy).
//
// A block takes 16 weight rows (one mma tile); its warps split the input features in
// 64-feature chunks and sum their tiles through shared memory. Lane (g, q) (g = lane / 4, q = lane % 4) loads 16 codes of rows g and g + 8 at
// features 16q.. of a chunk, and x's row g (a token; zeros past m) at the same features: the
// mma's 16 features of a step are a permutation of four of those, the same for A and B.
#define GEMV8_MMA_WARPS 8
// Chunks a warp has in flight: 2 measured best at 1-8 rows on an H100 (4 1-2% slower, 8
// 15-20%: the registers cost occupancy).
#ifndef GEMV8_MMA_UNROLL
#define GEMV8_MMA_UNROLL 2
#endif
// 2^120 as two bf16s.
#define BF16X2_2POW120 0x7b807b80u

// a * b as bf16 pairs (an fma adding -0, which keeps every product's sign: sm_80+, where
// `mul.bf16x2` is sm_90+).
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

// Four codes (bytes b0..b3 of `w`) as two bf16 pairs of their exact values, paired as
// `e4m3x4_to_scaled_bf16x2x2` does: its patterns are the values times 2^-120, subnormal for
// e4m3's subnormals; a bf16 multiply by 2^120 makes them the values, so the tensor cores see
// normal numbers only.
__device__ __forceinline__ void e4m3x4_to_bf16x2x2(u32 w, u32& lo, u32& hi) {
    e4m3x4_to_scaled_bf16x2x2(w, lo, hi);
    hi = bf16x2_mul(hi, BF16X2_2POW120);
    lo = bf16x2_mul(lo, BF16X2_2POW120);
}

__device__ __forceinline__ void mma_bf16_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3,
                                               u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 64-feature chunk: `ra`/`rb` the lane's 16 codes of rows g and g + 8, `x0`/`x1` its 16
// bf16 inputs of token g, as four mma steps (word t of the codes, features 4t..4t+3).
__device__ __forceinline__ void gemv_mma_chunk(const uint4 ra, const uint4 rb, const uint4 x0,
                                               const uint4 x1, float* d) {
    const u32 a[4] = {ra.x, ra.y, ra.z, ra.w};
    const u32 b[4] = {rb.x, rb.y, rb.z, rb.w};
    const u32 xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        u32 a_lo, a_hi, b_lo, b_hi;
        e4m3x4_to_bf16x2x2(a[t], a_lo, a_hi);
        e4m3x4_to_bf16x2x2(b[t], b_lo, b_hi);
        // Features 4t and 4t + 2 (as the codes' `lo`), then 4t + 1 and 4t + 3 (`hi`).
        const u32 x_even = __byte_perm(xw[2 * t], xw[2 * t + 1], 0x5410);
        const u32 x_odd = __byte_perm(xw[2 * t], xw[2 * t + 1], 0x7632);
        mma_bf16_16816(d, a_lo, b_lo, a_hi, b_hi, x_even, x_odd);
    }
}

// y[r, j] = ws[j] * sum_k x[r, k] * wq[j, k] for rows r < m <= 8 (k a multiple of 64).
// SILU: w is the MLP's [gate | up] (n = 2f rows) and the block's 16 weight rows are 8 gate
// rows j and their up rows f + j (the sums of a row do not depend on the rows beside it in the
// tile), written as out[r, j] = silu(gate) * up in bf16, as `silu_mul` makes of y.
// (Asking for 2-4 resident blocks in the launch bounds made it slower, not faster.)
template <bool SILU>
__device__ __forceinline__ void gemv_fp8_mma_tile(const bf16* __restrict__ x,
                                                  const unsigned char* __restrict__ w,
                                                  const float* __restrict__ ws,
                                                  float* __restrict__ y, bf16* __restrict__ out,
                                                  int m, int n, int k, const char* prefetch,
                                                  long long prefetch_bytes) {
    if (SILU && GEMV_SILU_PREFETCH == 1) prefetch_l2(prefetch, prefetch_bytes);
    __shared__ float partial[GEMV8_MMA_WARPS][8][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    // SILU: f gate rows, 8 a block.
    const int f = n / 2;
    const int row0 = SILU ? blockIdx.x * 8 : blockIdx.x * 16;
    // Rows past the last read the last row; their sums are not written.
    const long long row_a = SILU ? min(row0 + g, f - 1) : min(row0 + g, n - 1);
    const long long row_b = SILU ? f + row_a : min(row0 + g + 8, n - 1);
    const uint4* wa = reinterpret_cast<const uint4*>(w + row_a * k) + q;
    const uint4* wb = reinterpret_cast<const uint4*>(w + row_b * k) + q;
    const bool has_x = g < m;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)(has_x ? g : 0) * k) + 2 * q;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int chunks = k / 64;
    // An accumulator tile per chunk in flight: the mma steps of one chunk depend on each
    // other, those of different chunks do not.
    float d[GEMV8_MMA_UNROLL][4];
#pragma unroll
    for (int u = 0; u < GEMV8_MMA_UNROLL; ++u) d[u][0] = d[u][1] = d[u][2] = d[u][3] = 0.0f;
    // Whole passes (a warp's chunks of a pass consecutive: the same speed as strided by the
    // warps), then the chunks left one at a time.
    const int per_pass = GEMV8_MMA_WARPS * GEMV8_MMA_UNROLL;
    const int whole = chunks - chunks % per_pass;
    // (Loading the next pass before using this one, in more registers, measured slower:
    // occupancy, not loads in flight, is what this kernel is short of.)
    for (int pass = 0; pass < whole; pass += per_pass) {
        uint4 va[GEMV8_MMA_UNROLL], vb[GEMV8_MMA_UNROLL], x0[GEMV8_MMA_UNROLL],
            x1[GEMV8_MMA_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV8_MMA_UNROLL; ++u) {
            const int cu = pass + warp * GEMV8_MMA_UNROLL + u;
            va[u] = __ldcs(wa + 4 * cu);
            vb[u] = __ldcs(wb + 4 * cu);
            x0[u] = has_x ? __ldg(xr + 8 * cu) : zero;
            x1[u] = has_x ? __ldg(xr + 8 * cu + 1) : zero;
        }
#pragma unroll
        for (int u = 0; u < GEMV8_MMA_UNROLL; ++u) gemv_mma_chunk(va[u], vb[u], x0[u], x1[u], d[u]);
    }
    for (int c = whole + warp; c < chunks; c += GEMV8_MMA_WARPS) {
        const uint4 x0 = has_x ? __ldg(xr + 8 * c) : zero;
        const uint4 x1 = has_x ? __ldg(xr + 8 * c + 1) : zero;
        gemv_mma_chunk(__ldcs(wa + 4 * c), __ldcs(wb + 4 * c), x0, x1, d[0]);
    }
#pragma unroll
    for (int u = 1; u < GEMV8_MMA_UNROLL; ++u)
        for (int i = 0; i < 4; ++i) d[0][i] += d[u][i];
    // d: (row g, token 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1).
    partial[warp][2 * q][g] = d[0][0];
    partial[warp][2 * q + 1][g] = d[0][1];
    partial[warp][2 * q][g + 8] = d[0][2];
    partial[warp][2 * q + 1][g + 8] = d[0][3];
    __syncthreads();
    if (SILU) {
        if (threadIdx.x < 64) {
            const int token = threadIdx.x >> 3, r = threadIdx.x & 7, j = row0 + r;
            if (token < m && j < f) {
                float gate = 0.0f, up = 0.0f;
#pragma unroll
                for (int i = 0; i < GEMV8_MMA_WARPS; ++i) {
                    gate += partial[i][token][r];
                    up += partial[i][token][r + 8];
                }
                gate *= ws[j];
                up *= ws[f + j];
                out[(long long)token * f + j] =
                    f32_to_bf16(silu_times(bf16_round(gate), bf16_round(up)));
            }
        }
    } else if (threadIdx.x < 128) {
        const int token = threadIdx.x >> 4, r = threadIdx.x & 15, row = row0 + r;
        if (token < m && row < n) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < GEMV8_MMA_WARPS; ++i) s += partial[i][token][r];
            y[(long long)token * n + row] = s * ws[row];
        }
    }
    if (SILU && GEMV_SILU_PREFETCH == 2) prefetch_l2(prefetch, prefetch_bytes);
}

extern "C" __global__ void __launch_bounds__(GEMV8_MMA_WARPS * 32)
    gemv_fp8_mma(const bf16* __restrict__ x, const unsigned char* __restrict__ w,
                 const float* __restrict__ ws, float* __restrict__ y, int m, int n, int k) {
    pdl_enter();
    gemv_fp8_mma_tile<false>(x, w, ws, y, nullptr, m, n, k, nullptr, 0);
}

// `gemv_fp8_mma` of the MLP's [gate | up] (n = 2f rows) with the SiLU product taken as it is
// written into `out` ([m, f], bf16). Grid: f / 8 blocks, rounded up.
extern "C" __global__ void __launch_bounds__(GEMV8_MMA_WARPS * 32)
    gemv_fp8_mma_silu(const bf16* __restrict__ x, const unsigned char* __restrict__ w,
                      const float* __restrict__ ws, bf16* __restrict__ out, int m, int n, int k,
                      const char* prefetch, long long prefetch_bytes) {
    pdl_enter();
    gemv_fp8_mma_tile<true>(x, w, ws, nullptr, out, m, n, k, prefetch, prefetch_bytes);
}

// y = x widened: the f32 copy of a bf16 product (cuBLASLt's FP8 GEMM with vector scales
// writes bf16 only) for the ops that read f32 (rotary embedding of q/k/v, a bias add).
// Grid-stride: the launch's grid is capped (`elementwise_config`).
extern "C" __global__ void widen_bf16(const bf16* __restrict__ x, float* __restrict__ y,
                                      long long n) {
    pdl_enter();
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
    pdl_enter();
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
