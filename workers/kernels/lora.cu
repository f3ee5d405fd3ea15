// LoRA adapters' products for a batch whose rows ask for different adapters, in two passes over
// every adapter's pairs of one projection stacked (`lora_stack.rs`): adapter k's A in rows
// k * r .. of `a` ([adapters * r, in]), its scaled B in rows k * out .. of `b`
// ([adapters * out, r]); `adapters[row]` is the row's adapter plus one, 0 for the base model,
// whose rows are left alone. The rows' adapters are step data, so a graph replays the passes
// for any mix. Uses gemv.cu's bf16x8_to_f32.

// Warps of a shrink block, each one j of the rank.
#define LORA_SHRINK_WARPS 8
// Elements of `in` one warp covers: four 16-byte loads a lane, issued together, so that a warp
// waits for memory once a row; the chunks of one row are summed by the expand pass.
#define LORA_CHUNK 1024

// Four slices of 256 elements of `p` (8 a lane, from `base` on), widened; zeros past `in`.
// `vec`: `in` is a multiple of 8 (16-byte loads), else one element at a time.
__device__ __forceinline__ void lora_load_chunk(const bf16* __restrict__ p, int base, int in,
                                                int vec, float f[4][8]) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int i = base + s * 256;
        if (vec) {
            if (i < in) {
                bf16x8_to_f32(*reinterpret_cast<const uint4*>(p + i), f[s]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) f[s][e] = 0.f;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) f[s][e] = i + e < in ? bf16_to_f32(p[i + e]) : 0.f;
        }
    }
}

// Rows whose x a warp loads before it reads any (one wait for memory for them all).
#define LORA_IN_FLIGHT 4

// Four slices of 256 elements of `p` (8 a lane, from `base` on) as they are; zeros past `in`
// (a multiple of 8).
__device__ __forceinline__ void lora_load_raw(const bf16* __restrict__ p, int base, int in,
                                              uint4 v[4]) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int i = base + s * 256;
        v[s] = i < in ? *reinterpret_cast<const uint4*>(p + i) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// This lane's part of the dot product of two chunks loaded by lora_load_raw.
__device__ __forceinline__ float lora_dot_raw(const uint4 a[4], const uint4 x[4]) {
    float acc = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        float af[8], xf[8];
        bf16x8_to_f32(a[s], af);
        bf16x8_to_f32(x[s], xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += af[e] * xf[e];
    }
    return acc;
}

// partial[c, row, j] = sum over chunk c of x[row, i] * A_k[j, i], for j < r and the rows with an
// adapter (those of base rows are left unwritten: the expand pass never reads them). Grid
// (ceil(in / LORA_CHUNK), ceil(r / LORA_SHRINK_WARPS), ceil(rows / block_rows)),
// LORA_SHRINK_WARPS warps: a warp holds its row of A's chunk and goes through its block's
// `block_rows` rows (the launch picks them so that the grid fills the GPU), LORA_IN_FLIGHT at a
// time, reloading A where a row's adapter differs from the last one's. Each row's sums have one
// order whatever the batch and the blocks (a row alone and batched get the same bits).
extern "C" __global__ void lora_shrink(const bf16* __restrict__ x, const u32* __restrict__ adapters,
                                       const bf16* __restrict__ a, float* __restrict__ partial,
                                       int rows, int block_rows, int in, int r, int vec) {
    pdl_enter();
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.y * LORA_SHRINK_WARPS + (threadIdx.x >> 5);
    const int c = blockIdx.x;
    if (j >= r) return;
    const int base = c * LORA_CHUNK + lane * 8;
    const int begin = blockIdx.z * block_rows;
    const int end = min(rows, begin + block_rows);
    u32 held = 0u;
    if (vec) {
        uint4 ar[4];
        for (int g = begin; g < end; g += LORA_IN_FLIGHT) {
            uint4 xr[LORA_IN_FLIGHT][4];
            u32 ks[LORA_IN_FLIGHT];
#pragma unroll
            for (int q = 0; q < LORA_IN_FLIGHT; ++q) {
                const int row = g + q;
                ks[q] = row < end ? adapters[row] : 0u;
                if (ks[q] != 0u) lora_load_raw(x + (long long)row * in, base, in, xr[q]);
            }
#pragma unroll
            for (int q = 0; q < LORA_IN_FLIGHT; ++q) {
                if (ks[q] == 0u) continue;
                if (ks[q] != held) {
                    lora_load_raw(a + ((long long)(ks[q] - 1u) * r + j) * in, base, in, ar);
                    held = ks[q];
                }
                const float sum = warp_sum(lora_dot_raw(ar, xr[q]));
                if (lane == 0) partial[((long long)c * rows + g + q) * r + j] = sum;
            }
        }
        return;
    }
    // `in` not a multiple of 8: one element at a time, a row at a time.
    float af[4][8];
    for (int row = begin; row < end; ++row) {
        const u32 k = adapters[row];
        if (k == 0u) continue;
        if (k != held) {
            lora_load_chunk(a + ((long long)(k - 1u) * r + j) * in, base, in, 0, af);
            held = k;
        }
        float xf[4][8];
        lora_load_chunk(x + (long long)row * in, base, in, 0, xf);
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc += af[s][e] * xf[s][e];
        }
        acc = warp_sum(acc);
        if (lane == 0) partial[((long long)c * rows + row) * r + j] = acc;
    }
}

// Rows a block of the expand pass covers (their t rows in shared memory).
#define LORA_EXPAND_ROWS 8

// The expand pass's output in its row type: f32, or bf16 rounded once after the sum.
__device__ __forceinline__ void store_sum(float* dst, float add) { *dst += add; }
__device__ __forceinline__ void store_sum(bf16* dst, float add) {
    *dst = f32_to_bf16(bf16_to_f32(*dst) + add);
}

// y[row, o] += sum_j t[row, j] * B_k[o, j] for the rows with an adapter, t[row, j] the sum of
// the shrink pass's `chunks` partial sums (in chunk order); r a multiple of 8. Grid
// (ceil(out / blockDim.x), ceil(rows / LORA_EXPAND_ROWS)), LORA_EXPAND_ROWS * r floats of
// shared memory; one thread an output column. The kernels below wait (pdl_enter) first.
template <typename Y>
__device__ __forceinline__ void lora_expand_rows(Y* __restrict__ y, const u32* __restrict__ adapters,
                                                 const float* __restrict__ partial, int chunks,
                                                 const bf16* __restrict__ b, int rows, int out,
                                                 int r) {
    extern __shared__ float ts[];
    const int row0 = blockIdx.y * LORA_EXPAND_ROWS;
    for (int e = threadIdx.x; e < LORA_EXPAND_ROWS * r; e += blockDim.x) {
        const int row = row0 + e / r;
        float sum = 0.f;
        if (row < rows && adapters[row] != 0u) {
            const float* p = partial + (long long)row * r + e % r;
#pragma unroll 4
            for (int c = 0; c < chunks; ++c) sum += p[(long long)c * rows * r];
        }
        ts[e] = sum;
    }
    __syncthreads();
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out) return;
    for (int q = 0; q < LORA_EXPAND_ROWS; ++q) {
        const int row = row0 + q;
        if (row >= rows) break;
        const u32 k = adapters[row];
        if (k == 0u) continue;
        const uint4* brow = reinterpret_cast<const uint4*>(b + ((long long)(k - 1u) * out + o) * r);
        const float* tq = ts + q * r;
        float acc = 0.f;
#pragma unroll 4
        for (int c = 0; c < r / 8; ++c) {
            float bf[8];
            bf16x8_to_f32(brow[c], bf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc += bf[e] * tq[c * 8 + e];
        }
        Y* dst = y + (long long)row * out + o;
        store_sum(dst, acc);
    }
}

extern "C" __global__ void lora_expand(float* __restrict__ y, const u32* __restrict__ adapters,
                                       const float* __restrict__ partial, int chunks,
                                       const bf16* __restrict__ b, int rows, int out, int r) {
    pdl_enter();
    lora_expand_rows(y, adapters, partial, chunks, b, rows, out, r);
}

// lora_expand into bf16 rows (a projection's output written in bf16).
extern "C" __global__ void lora_expand_bf16(bf16* __restrict__ y, const u32* __restrict__ adapters,
                                            const float* __restrict__ partial, int chunks,
                                            const bf16* __restrict__ b, int rows, int out, int r) {
    pdl_enter();
    lora_expand_rows(y, adapters, partial, chunks, b, rows, out, r);
}
