// Row-wise and element-wise ops of the forward pass. Activations between ops are f32
// (projections' outputs; the residual stream, or bf16 with `residual_stream_bf16`); inputs of
// matrix products are bf16.

// out[t, :] = table[tokens[t], :]   (one block per token)
extern "C" __global__ void embedding(const bf16* __restrict__ table, const u32* __restrict__ tokens,
                                     float* __restrict__ out, int hidden) {
    pdl_enter();
    const long long t = blockIdx.x;
    const bf16* row = table + (long long)tokens[t] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[t * hidden + c] = bf16_to_f32(row[c]);
}

// The same rows kept in bf16: the first values of a residual stream held in bf16
// (`residual_stream_bf16`).
extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table,
                                          const u32* __restrict__ tokens, bf16* __restrict__ out,
                                          int hidden) {
    pdl_enter();
    const long long t = blockIdx.x;
    const bf16* row = table + (long long)tokens[t] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[t * hidden + c] = row[c];
}

// tokens[chained[2i]] = picks[chained[2i+1] * 4 + 1]: a decode token the host does not know yet,
// taken from the previous step's sampling summaries (`out_u32` of sample_rows: row r's picked
// token at r * 4 + 1), so the step can be queued before those summaries reach the host.
extern "C" __global__ void chain_tokens(u32* __restrict__ tokens, const u32* __restrict__ chained,
                                        int n, const u32* __restrict__ picks) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) tokens[chained[2 * i]] = picks[chained[2 * i + 1] * 4 + 1];
}

// The norms and silu_mul take a prefetch range (`prefetch_l2`): the weights of the projection
// that reads their output. The row kernels may get more blocks than rows for it; those only
// prefetch.

// The norms keep a row in registers, four values per 16-byte load and up to NORM_VEC loads a
// thread, where the row allows it (a multiple of 4 columns, at most 4 * NORM_VEC per thread):
// one pass over memory, every load issued before the first sum. At prefill sizes a norm moves
// ~56 KB a token (residual read and written, the projection's output read, bf16 written), and
// the scalar loop (a value per load, the row read twice) ran at ~2.4 TB/s on an H100.
// `-D NORM_VEC=0` (TANDEM_KERNEL_DEFINES) keeps the scalar loop everywhere, to compare.
#ifndef NORM_VEC
#define NORM_VEC 4
#endif
#define NORM_REGS (NORM_VEC > 0 ? NORM_VEC : 1)

// x rounded to bf16 (and back): what a projection that writes bf16 stores.
__device__ __forceinline__ float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// Gate or up values as a bf16 projection stores them, four at a time (one 16-byte load of
// f32, rounded to bf16; one 8-byte load of bf16) or one: prefill-sized batches take the
// gate/up projection in bf16 (`silu_mul_bf16`), and the f32 path rounds the same way, so that
// a request's tokens do not depend on the size of the batch it ran in.
__device__ __forceinline__ float4 load4_bf16(const float* p) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    return make_float4(bf16_round(v.x), bf16_round(v.y), bf16_round(v.z), bf16_round(v.w));
}
__device__ __forceinline__ float4 load4_bf16(const bf16* p) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                       __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u));
}
__device__ __forceinline__ float load1_bf16(const float* p) { return bf16_round(*p); }
__device__ __forceinline__ float load1_bf16(const bf16* p) { return bf16_to_f32(*p); }

// A residual stream's values as stored: f32 as they are, bf16 widened.
__device__ __forceinline__ float4 load4_value(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 load4_value(const bf16* p) { return load4_bf16(p); }
__device__ __forceinline__ float load1_value(const float* p) { return *p; }
__device__ __forceinline__ float load1_value(const bf16* p) { return bf16_to_f32(*p); }

// Stores a residual sum and returns what the stream now holds: f32 unchanged, bf16 rounded
// (as transformers' bf16 models add their residuals), so the norm that follows reads the
// stream's own values.
__device__ __forceinline__ float4 store4_value(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
    return v;
}
__device__ __forceinline__ float4 store4_value(bf16* p, float4 v) {
    const bf16 a = f32_to_bf16(v.x), b = f32_to_bf16(v.y), c = f32_to_bf16(v.z),
               d = f32_to_bf16(v.w);
    *reinterpret_cast<uint2*>(p) = make_uint2((u32)a | ((u32)b << 16), (u32)c | ((u32)d << 16));
    return make_float4(bf16_to_f32(a), bf16_to_f32(b), bf16_to_f32(c), bf16_to_f32(d));
}
__device__ __forceinline__ float store1_value(float* p, float v) {
    *p = v;
    return v;
}
__device__ __forceinline__ float store1_value(bf16* p, float v) {
    *p = f32_to_bf16(v);
    return bf16_to_f32(*p);
}

__device__ __forceinline__ bool norm_vectorized(int cols) {
    return NORM_VEC > 0 && (cols & 3) == 0 && cols <= 4 * NORM_VEC * (int)blockDim.x;
}

// Four bf16 of `v * inv * w`, as one 8-byte store where `out` is not null; returns them.
__device__ __forceinline__ uint2 store4_normed(bf16* out, float4 v, float inv, float4 w) {
    const u32 lo = (u32)f32_to_bf16(v.x * inv * w.x) | ((u32)f32_to_bf16(v.y * inv * w.y) << 16);
    const u32 hi = (u32)f32_to_bf16(v.z * inv * w.z) | ((u32)f32_to_bf16(v.w * inv * w.w) << 16);
    if (out != nullptr) *reinterpret_cast<uint2*>(out) = make_uint2(lo, hi);
    return make_uint2(lo, hi);
}

// The largest magnitude of four packed bf16.
__device__ __forceinline__ float amax4_bf16(uint2 p) {
    return fmaxf(fmaxf(fabsf(__uint_as_float(p.x << 16)), fabsf(__uint_as_float(p.x & 0xffff0000u))),
                 fmaxf(fabsf(__uint_as_float(p.y << 16)), fabsf(__uint_as_float(p.y & 0xffff0000u))));
}

// Four packed bf16 times `inverse` as e4m3 codes (the first in the low byte).
__device__ __forceinline__ u32 e4m3x4_of_bf16(uint2 p, float inverse) {
    const u32 lo = f32x2_to_e4m3x2(__uint_as_float(p.x << 16) * inverse,
                                   __uint_as_float(p.x & 0xffff0000u) * inverse);
    const u32 hi = f32x2_to_e4m3x2(__uint_as_float(p.y << 16) * inverse,
                                   __uint_as_float(p.y & 0xffff0000u) * inverse);
    return (lo & 0xffffu) | (hi << 16);
}

// A norm's or silu_mul's bf16 output row quantized for an FP8 projection, where the caller asks
// (`q8` not null: the row's codes, `q_scale` its scale), exactly as fp8.cu's quantize_fp8_rows
// would from the stored row: its largest magnitude to 448. Every thread of the block calls it
// (a block reduction); `amax` is the thread's share, `row` the row as stored, of which this
// thread wrote (and now reads back) the values at its `c = threadIdx.x + k * blockDim.x`.
__device__ __forceinline__ void quantize_own_row(const bf16* row, unsigned char* q8, float* q_scale,
                                                 int cols, float amax) {
    const float scale = fp8_row_scale(block_max(amax));
    if (threadIdx.x == 0) *q_scale = scale;
    const float inverse = 1.0f / scale;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        q8[c] = (unsigned char)(f32x2_to_e4m3x2(bf16_to_f32(row[c]) * inverse, 0.0f) & 0xffu);
}

__device__ __forceinline__ float sum_squares(float4 v) {
    return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
}

// Writes `out` row r from the row's values `v` (thread's float4s), given the row's sum of
// squares over the thread's share; and its FP8 codes into `q8` (its scale into `q_scale`)
// where `q8` is not null.
__device__ __forceinline__ void write_normed4(const float4 (&v)[NORM_REGS], float ss,
                                              const float* weight, bf16* out, int cols, float eps,
                                              unsigned char* q8, float* q_scale) {
    const float inv = rsqrtf(block_sum(ss) / cols + eps);
    const int n4 = cols >> 2;
    uint2 stored[NORM_REGS];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_REGS; i++) {
        const int c4 = threadIdx.x + i * blockDim.x;
        stored[i] = make_uint2(0u, 0u);
        if (c4 < n4)
            stored[i] = store4_normed(out != nullptr ? out + 4 * c4 : nullptr, v[i], inv,
                                      reinterpret_cast<const float4*>(weight)[c4]);
        amax = fmaxf(amax, amax4_bf16(stored[i]));
    }
    if (q8 == nullptr) return;
    const float scale = fp8_row_scale(block_max(amax));
    if (threadIdx.x == 0) *q_scale = scale;
    const float inverse = 1.0f / scale;
#pragma unroll
    for (int i = 0; i < NORM_REGS; i++) {
        const int c4 = threadIdx.x + i * blockDim.x;
        if (c4 < n4) reinterpret_cast<u32*>(q8)[c4] = e4m3x4_of_bf16(stored[i], inverse);
    }
}

// The scalar loops' tail: out[c] = x[c] * inv * w[c], then the FP8 codes where asked. `out`
// null (codes only): each value is computed twice, for the row's largest magnitude and for
// its code, instead of being read back.
template <typename R>
__device__ __forceinline__ void write_normed_scalar(const R* row, float inv, const float* weight,
                                                    bf16* out, int cols, unsigned char* q8,
                                                    float* q_scale) {
    float amax = 0.0f;
    if (out == nullptr) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            amax = fmaxf(amax, fabsf(bf16_round(load1_value(row + c) * inv * weight[c])));
        const float scale = fp8_row_scale(block_max(amax));
        if (threadIdx.x == 0) *q_scale = scale;
        const float inverse = 1.0f / scale;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float value = bf16_round(load1_value(row + c) * inv * weight[c]);
            q8[c] = (unsigned char)(f32x2_to_e4m3x2(value * inverse, 0.0f) & 0xffu);
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out[c] = f32_to_bf16(load1_value(row + c) * inv * weight[c]);
        amax = fmaxf(amax, fabsf(bf16_to_f32(out[c])));
    }
    if (q8 != nullptr) quantize_own_row(out, q8, q_scale, cols, amax);
}

// out = x / sqrt(mean(x^2) + eps) * weight, per row (one block per row). With `q8` not null,
// also the rows' FP8 codes and per-row scales (`q_scales`) for the FP8 projection that reads
// them (as `quantize_fp8_rows` would make them from `out`).
template <typename X>
__device__ __forceinline__ void rms_norm_row(const X* __restrict__ x,
                                             const float* __restrict__ weight,
                                             bf16* __restrict__ out, int rows, int cols, float eps,
                                             unsigned char* __restrict__ q8,
                                             float* __restrict__ q_scales) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const X* row = x + r * cols;
    unsigned char* q8_row = q8 != nullptr ? q8 + r * cols : nullptr;
    bf16* out_row = out != nullptr ? out + r * cols : nullptr;
    if (norm_vectorized(cols)) {
        const int n4 = cols >> 2;
        float4 v[NORM_REGS];
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < NORM_REGS; i++) {
            const int c4 = threadIdx.x + i * blockDim.x;
            v[i] = c4 < n4 ? load4_value(row + 4 * c4) : make_float4(0, 0, 0, 0);
            ss += sum_squares(v[i]);
        }
        write_normed4(v, ss, weight, out_row, cols, eps, q8_row, q_scales + r);
        return;
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = load1_value(row + c);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / cols + eps);
    write_normed_scalar(row, inv, weight, out_row, cols, q8_row, q_scales + r);
}

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    bf16* __restrict__ out, int rows, int cols, float eps,
                                    const char* prefetch, long long prefetch_bytes,
                                    unsigned char* __restrict__ q8, float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    rms_norm_row(x, weight, out, rows, cols, eps, q8, q_scales);
}

// x in bf16: a residual stream held in bf16 (`residual_stream_bf16`).
extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x,
                                         const float* __restrict__ weight, bf16* __restrict__ out,
                                         int rows, int cols, float eps, const char* prefetch,
                                         long long prefetch_bytes, unsigned char* __restrict__ q8,
                                         float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    rms_norm_row(x, weight, out, rows, cols, eps, q8, q_scales);
}

// residual += x, then out = rms_norm(residual) (one block per row). x is a projection's
// output as bf16 values (`load4_bf16`): prefill-sized batches have cuBLAS write o_proj and
// down in bf16 (`add_rms_norm_bf16`), and the f32 path rounds the same way, so that a
// request's tokens do not depend on the size of the batch it ran in.
template <typename R, typename T>
__device__ __forceinline__ void add_rms_norm_row(R* __restrict__ residual,
                                                 const T* __restrict__ x,
                                                 const float* __restrict__ weight,
                                                 bf16* __restrict__ out, int rows, int cols,
                                                 float eps, unsigned char* __restrict__ q8,
                                                 float* __restrict__ q_scales) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    R* row = residual + r * cols;
    const T* add = x + r * cols;
    unsigned char* q8_row = q8 != nullptr ? q8 + r * cols : nullptr;
    bf16* out_row = out != nullptr ? out + r * cols : nullptr;
    if (norm_vectorized(cols)) {
        const int n4 = cols >> 2;
        float4 v[NORM_REGS];
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < NORM_REGS; i++) {
            const int c4 = threadIdx.x + i * blockDim.x;
            if (c4 < n4) {
                const float4 a = load4_value(row + 4 * c4);
                const float4 b = load4_bf16(add + 4 * c4);
                v[i] = store4_value(row + 4 * c4,
                                    make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w));
            } else {
                v[i] = make_float4(0, 0, 0, 0);
            }
            ss += sum_squares(v[i]);
        }
        write_normed4(v, ss, weight, out_row, cols, eps, q8_row, q_scales + r);
        return;
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = store1_value(row + c, load1_value(row + c) + load1_bf16(add + c));
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / cols + eps);
    write_normed_scalar(row, inv, weight, out_row, cols, q8_row, q_scales + r);
}

// x in f32 (the GEMV and skinny kernels of decode batches, a tensor-parallel all-reduce).
extern "C" __global__ void add_rms_norm(float* __restrict__ residual, const float* __restrict__ x,
                                        const float* __restrict__ weight, bf16* __restrict__ out,
                                        int rows, int cols, float eps, const char* prefetch,
                                        long long prefetch_bytes, unsigned char* __restrict__ q8,
                                        float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    add_rms_norm_row(residual, x, weight, out, rows, cols, eps, q8, q_scales);
}

// x in bf16 (cuBLAS's o_proj and down at prefill sizes).
extern "C" __global__ void add_rms_norm_bf16(float* __restrict__ residual,
                                             const bf16* __restrict__ x,
                                             const float* __restrict__ weight,
                                             bf16* __restrict__ out, int rows, int cols,
                                             float eps, const char* prefetch,
                                             long long prefetch_bytes, unsigned char* __restrict__ q8,
                                             float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    add_rms_norm_row(residual, x, weight, out, rows, cols, eps, q8, q_scales);
}

// The residual stream held in bf16 (`residual_stream_bf16`): x in f32 ...
extern "C" __global__ void add_rms_norm_rbf16(bf16* __restrict__ residual,
                                              const float* __restrict__ x,
                                              const float* __restrict__ weight,
                                              bf16* __restrict__ out, int rows, int cols,
                                              float eps, const char* prefetch,
                                              long long prefetch_bytes,
                                              unsigned char* __restrict__ q8,
                                              float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    add_rms_norm_row(residual, x, weight, out, rows, cols, eps, q8, q_scales);
}

// ... and x in bf16.
extern "C" __global__ void add_rms_norm_bf16_rbf16(bf16* __restrict__ residual,
                                                   const bf16* __restrict__ x,
                                                   const float* __restrict__ weight,
                                                   bf16* __restrict__ out, int rows, int cols,
                                                   float eps, const char* prefetch,
                                                   long long prefetch_bytes,
                                                   unsigned char* __restrict__ q8,
                                                   float* __restrict__ q_scales) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    add_rms_norm_row(residual, x, weight, out, rows, cols, eps, q8, q_scales);
}

// silu(g) * u on the special-function unit's exponential and reciprocal (`__expf`,
// `__fdividef`), a few f32 ulp from the IEEE expression, whose result is then rounded to bf16
// anyway: the IEEE division and expf's range handling took ~25 instructions a value, and
// silu_mul_quant at prefill sizes was bound by them (74% of issue slots on an H200, DRAM at
// 59%). For g below about -87 the sum is past 2^126 and this gives 0 where silu is -0 or a
// value under 1e-36. `-D SILU_FAST=0` (TANDEM_KERNEL_DEFINES): the IEEE expression, to compare.
#ifndef SILU_FAST
#define SILU_FAST 1
#endif
__device__ __forceinline__ float silu_times(float g, float u) {
#if SILU_FAST
    return __fdividef(g, 1.0f + __expf(-g)) * u;
#else
    return g / (1.0f + expf(-g)) * u;
#endif
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, f + i], gate and up as bf16 values
// (`load4_bf16`). Grid: x over a row's columns (four per
// thread, as one load of gate and one of up, when f is a multiple of 4; else one), y over
// rows. No 64-bit division per element: at prefill sizes this kernel moves hundreds of MB per
// layer and must run at the copy rate.
template <typename T>
__device__ __forceinline__ void silu_mul_rows(const T* __restrict__ gate_up, bf16* __restrict__ out,
                                              int rows, int f) {
    const int vec = (f & 3) == 0 ? 4 : 1;
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * vec;
    if (c >= f) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* gate = gate_up + (long long)r * 2 * f;
        bf16* dst = out + (long long)r * f;
        if (vec == 4) {
            const float4 g = load4_bf16(gate + c);
            const float4 u = load4_bf16(gate + f + c);
            uint2 packed;
            packed.x = pack_bf16(silu_times(g.x, u.x), silu_times(g.y, u.y));
            packed.y = pack_bf16(silu_times(g.z, u.z), silu_times(g.w, u.w));
            *reinterpret_cast<uint2*>(dst + c) = packed;
        } else {
            dst[c] = f32_to_bf16(silu_times(load1_bf16(gate + c), load1_bf16(gate + f + c)));
        }
    }
}

// [gate | up] in f32 (the projections of small decode batches write f32).
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, bf16* __restrict__ out,
                                    int rows, int f, const char* prefetch,
                                    long long prefetch_bytes) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    silu_mul_rows(gate_up, out, rows, f);
}

// [gate | up] in bf16 (the projection of prefill-sized batches writes bf16).
extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                                         int rows, int f, const char* prefetch,
                                         long long prefetch_bytes) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    silu_mul_rows(gate_up, out, rows, f);
}

// 16-byte vectors of a row's bf16 output a thread of `silu_mul_quant*` keeps in registers:
// rows of up to 8 * SILU_QUANT_VECS * blockDim.x values (16,384 at 256 threads) are written
// and quantized from registers, 16 bytes a load and a store (0: never, to compare).
#ifndef SILU_QUANT_VECS
#define SILU_QUANT_VECS 8
#endif

// Eight consecutive values at `p` (16-byte aligned) as f32.
__device__ __forceinline__ void load8_f32(const bf16* p, float* f) {
    bf16x8_to_f32(*reinterpret_cast<const uint4*>(p), f);
}
__device__ __forceinline__ void load8_f32(const float* p, float* f) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// silu_mul_rows with the rows' FP8 codes and scales for the FP8 down projection that reads
// them: one block per row (grid x over rows), its bf16 output written, then quantized from the
// bf16 values written (the codes are those quantize_fp8_rows makes of the output). Rows of a
// multiple of 8 values that fit the block's registers are read once and quantized from
// registers: a first version wrote a value at a time and read the row back to quantize it,
// ~1.45 TB/s on an H100 (0.52 ms a layer for 7,592 rows of Llama-3.1-8B's 14,336).
template <typename T>
__device__ __forceinline__ void silu_mul_quant_rows(const T* __restrict__ gate_up,
                                                    bf16* __restrict__ out,
                                                    unsigned char* __restrict__ q8,
                                                    float* __restrict__ q_scales, int rows, int f) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const T* gate = gate_up + r * 2 * f;
    bf16* dst = out != nullptr ? out + r * f : nullptr;
#if SILU_QUANT_VECS > 0
    if ((f & 7) == 0 && f <= 8 * SILU_QUANT_VECS * (int)blockDim.x) {
        const int vecs = f / 8;
        uint4 v[SILU_QUANT_VECS];
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < SILU_QUANT_VECS; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < vecs) {
                float g[8], u[8];
                load8_f32(gate + 8 * i, g);
                load8_f32(gate + f + 8 * i, u);
                u32 w[4];
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    w[e] = pack_bf16(silu_times(g[2 * e], u[2 * e]),
                                           silu_times(g[2 * e + 1], u[2 * e + 1]));
                v[j] = make_uint4(w[0], w[1], w[2], w[3]);
                if (dst != nullptr) reinterpret_cast<uint4*>(dst)[i] = v[j];
                amax = fmaxf(amax, bf16x8_amax(v[j]));
            }
        }
        const float scale = fp8_row_scale(block_max(amax));
        if (threadIdx.x == 0) q_scales[r] = scale;
        const float inverse = 1.0f / scale;
        uint2* codes = reinterpret_cast<uint2*>(q8 + r * f);
#pragma unroll
        for (int j = 0; j < SILU_QUANT_VECS; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < vecs) codes[i] = bf16x8_to_e4m3x8(v[j], inverse);
        }
        return;
    }
#endif
    float amax = 0.0f;
    if (dst == nullptr) {
        // Codes only: each value computed twice, for the row's largest magnitude and its code.
        for (int c = threadIdx.x; c < f; c += blockDim.x)
            amax = fmaxf(amax, fabsf(bf16_round(silu_times(load1_bf16(gate + c), load1_bf16(gate + f + c)))));
        const float scale = fp8_row_scale(block_max(amax));
        if (threadIdx.x == 0) q_scales[r] = scale;
        const float inverse = 1.0f / scale;
        for (int c = threadIdx.x; c < f; c += blockDim.x) {
            const float v = bf16_round(silu_times(load1_bf16(gate + c), load1_bf16(gate + f + c)));
            q8[r * f + c] = (unsigned char)(f32x2_to_e4m3x2(v * inverse, 0.0f) & 0xffu);
        }
        return;
    }
    for (int c = threadIdx.x; c < f; c += blockDim.x) {
        dst[c] = f32_to_bf16(silu_times(load1_bf16(gate + c), load1_bf16(gate + f + c)));
        amax = fmaxf(amax, fabsf(bf16_to_f32(dst[c])));
    }
    quantize_own_row(dst, q8 + r * f, q_scales + r, f, amax);
}

extern "C" __global__ void silu_mul_quant(const float* __restrict__ gate_up, bf16* __restrict__ out,
                                          unsigned char* __restrict__ q8, float* __restrict__ q_scales,
                                          int rows, int f, const char* prefetch,
                                          long long prefetch_bytes) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    silu_mul_quant_rows(gate_up, out, q8, q_scales, rows, f);
}

extern "C" __global__ void silu_mul_quant_bf16(const bf16* __restrict__ gate_up,
                                               bf16* __restrict__ out,
                                               unsigned char* __restrict__ q8,
                                               float* __restrict__ q_scales, int rows, int f,
                                               const char* prefetch, long long prefetch_bytes) {
    pdl_enter();
    prefetch_l2(prefetch, prefetch_bytes);
    silu_mul_quant_rows(gate_up, out, q8, q_scales, rows, f);
}

// Qwen3's RMS norm of each q and k head of fused q/k/v rows, in place, v untouched: one warp a
// head (`q_heads` heads by `q_w`, then `k_heads` by `k_w`, `d` values each), blockDim.x / 32
// heads a block, grid (rows, head groups). bf16 rows are rounded once, after the weight.
template <typename T>
__device__ __forceinline__ void head_rms_norm_warp(T* __restrict__ qkv,
                                                   const float* __restrict__ q_w,
                                                   const float* __restrict__ k_w, int cols,
                                                   int q_heads, int k_heads, int d, float eps) {
    const int h = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (h >= q_heads + k_heads) return;
    T* head = qkv + (long long)blockIdx.x * cols + (long long)h * d;
    const float* w = h < q_heads ? q_w : k_w;
    float ss = 0.0f;
    for (int c = lane; c < d; c += 32) {
        const float v = load1_value(head + c);
        ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / d + eps);
    for (int c = lane; c < d; c += 32) store1_value(head + c, load1_value(head + c) * inv * w[c]);
}

extern "C" __global__ void head_rms_norm(float* __restrict__ qkv, const float* __restrict__ q_w,
                                         const float* __restrict__ k_w, int cols, int q_heads,
                                         int k_heads, int d, float eps) {
    pdl_enter();
    head_rms_norm_warp(qkv, q_w, k_w, cols, q_heads, k_heads, d, eps);
}

extern "C" __global__ void head_rms_norm_bf16(bf16* __restrict__ qkv,
                                              const float* __restrict__ q_w,
                                              const float* __restrict__ k_w, int cols,
                                              int q_heads, int k_heads, int d, float eps) {
    pdl_enter();
    head_rms_norm_warp(qkv, q_w, k_w, cols, q_heads, k_heads, d, eps);
}

// y[r, c] += bias[c]
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int cols,
                                    long long total) {
    pdl_enter();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}

// y[rows[i], :] += delta[i, :]  (one block per row of delta): a LoRA adapter's products added
// to a projection's output rows.
extern "C" __global__ void add_rows(float* __restrict__ y, const u32* __restrict__ rows,
                                    const float* __restrict__ delta, int cols) {
    pdl_enter();
    const long long i = blockIdx.x;
    float* dst = y + (long long)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] += delta[i * cols + c];
}

// add_rows into bf16 rows (a projection's output written in bf16): rounded once, after the sum.
extern "C" __global__ void add_rows_bf16(bf16* __restrict__ y, const u32* __restrict__ rows,
                                         const float* __restrict__ delta, int cols) {
    pdl_enter();
    const long long i = blockIdx.x;
    bf16* dst = y + (long long)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        dst[c] = f32_to_bf16(bf16_to_f32(dst[c]) + delta[i * cols + c]);
}

// out[i] = bf16(x[i]): f32 rows as a projection's bf16 input.
extern "C" __global__ void cast_bf16(const float* __restrict__ x, bf16* __restrict__ out,
                                     long long total) {
    pdl_enter();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// out[i, :] = x[rows[i], :]  (one block per output row)
extern "C" __global__ void gather_rows(const float* __restrict__ x, const u32* __restrict__ rows,
                                       float* __restrict__ out, int cols) {
    pdl_enter();
    const long long i = blockIdx.x;
    const float* src = x + (long long)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

// gather_rows of bf16 rows (a projection's output written in bf16).
extern "C" __global__ void gather_rows_bf16(const bf16* __restrict__ x, const u32* __restrict__ rows,
                                            bf16* __restrict__ out, int cols) {
    pdl_enter();
    const long long i = blockIdx.x;
    const bf16* src = x + (long long)rows[i] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}

// Rows gathered as gather_rows does, with a grammar's token mask applied: token c of output row
// i keeps its logit when bit c % 32 of word c / 32 of that row's mask is set (the mask has
// `words` words a row), else -inf; tokens past the mask are -inf.
extern "C" __global__ void gather_masked_rows(const float* __restrict__ x,
                                              const u32* __restrict__ rows,
                                              const u32* __restrict__ masks, int words,
                                              float* __restrict__ out, int cols) {
    pdl_enter();
    const long long i = blockIdx.x;
    const float* src = x + (long long)rows[i] * cols;
    const u32* mask = masks + i * words;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const int w = c >> 5;
        const bool allowed = w < words && ((mask[w] >> (c & 31)) & 1u);
        out[i * cols + c] = allowed ? src[c] : NEG_INF;
    }
}

// Greedy sampling on the device: index of each row's largest logit (lowest index on ties),
// one block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, u32* __restrict__ out,
                                       int cols) {
    pdl_enter();
    const float* row = logits + (long long)blockIdx.x * cols;
    float v = NEG_INF;
    int idx = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        if (row[c] > v) { v = row[c]; idx = c; }
    }
    block_argmax(v, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)idx;
}

// K/V blocks between the paged cache and a transfer's device memory (a CUDA IPC export or
// pull), all blocks in one launch instead of one copy per block: `blocks[i]` of the cache is
// the i-th block of `range`. `to_range` != 0 copies cache -> range, else range -> cache.
// Both bases are 16-byte aligned and a block is `block_vecs` 16-byte words.
extern "C" __global__ void copy_kv_blocks(uint4* __restrict__ cache, uint4* __restrict__ range,
                                          const u32* __restrict__ blocks, int num_blocks,
                                          long long block_vecs, int to_range) {
    pdl_enter();
    for (int i = blockIdx.y; i < num_blocks; i += gridDim.y) {
        uint4* cached = cache + (long long)blocks[i] * block_vecs;
        uint4* other = range + (long long)i * block_vecs;
        for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < block_vecs;
             v += (long long)gridDim.x * blockDim.x) {
            if (to_range) other[v] = cached[v];
            else cached[v] = other[v];
        }
    }
}
