// Rotary embedding fused with the KV-cache write, and paged attention over the block-major cache.
//
// Cache layout (workers/src/kv_cache/layout.rs): block-major, one block = block_size tokens of
// all layers, K and V: element (block, layer, kv, token_in_block, kv_head, d) is at
//   block * block_elems + layer * layer_stride + kv * kv_stride + token_in_block * token_stride
//   + kv_head * head_dim + d
// with kv_stride = block_size * token_stride and layer_stride = 2 * kv_stride.

// Rotates q (in place) and k of each token's fused [q | k | v] row (rotate-half convention,
// cos/sin per token precomputed on the host as Hugging Face does), then stores the token's
// rotated k and its v into `layer` of the token's cache slot, as bf16 or FP8 codes (`C`). One
// block per token. With ROTATE_KEYS (the FP8 cache), q and k are then turned by the normalized
// Walsh-Hadamard transform of `hadamard_rotate_heads` before k is stored, as the CPU backend
// does (workers/src/kv_cache/key_rotation.rs): scores are unchanged and the codes' rounding no
// longer gathers in the keys' few large channels.
//
// The transform runs in place on the row in global memory, one butterfly stage at a time, the
// block's threads synchronized between stages (the row is a few KiB, read from L1).
__device__ __forceinline__ void hadamard_rotate_heads(float* __restrict__ x, int n, int block) {
    const float norm = rsqrtf((float)block);
    for (int half = 1; half < block; half <<= 1) {
        __syncthreads();
        const bool last = 2 * half == block;
        for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
            const int i = (p / half) * 2 * half + p % half;
            const float a = x[i], b = x[i + half];
            x[i] = last ? (a + b) * norm : a + b;
            x[i + half] = last ? (a - b) * norm : a - b;
        }
    }
    __syncthreads();
}

// Head dims up to this many go through `rope_rotate_heads_warp` (a lane holds dim / 32 values).
#define ROTATE_MAX_DIM 256

// The rotary embedding and the rotation of each head of one token's row in registers, a warp
// per head, no block-wide synchronization (at batch 1 the staged version's barriers cost ~5 us
// a layer): lane l holds dims e * 32 + l (E = dim / 32 of them), so a rope pair (i, i + dim/2)
// sits in one lane when dim is a multiple of 64, the rotation's butterflies below 32 dims are
// lane shuffles and the wider ones swap a lane's own registers. q heads go back to the row; k
// heads go back to the row too and, as codes, into the cache at `k_dst`.
template <typename C, int E>
__device__ __forceinline__ void rope_rotate_heads_warp_e(float* __restrict__ row,
                                                         const float* __restrict__ cs,
                                                         const float* __restrict__ sn,
                                                         C* __restrict__ k_dst, int num_heads,
                                                         int num_kv_heads, int block) {
    constexpr int D = E * 32;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const float norm = rsqrtf((float)block);
    // The token's cos and sin at this lane's pairs, the same for every head.
    float c[E / 2], s[E / 2];
#pragma unroll
    for (int e = 0; e < E / 2; ++e) c[e] = cs[e * 32 + lane], s[e] = sn[e * 32 + lane];
    for (int head = threadIdx.x >> 5; head < num_heads + num_kv_heads; head += warps) {
        float* x = row + head * D;
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = x[e * 32 + lane];
#pragma unroll
        for (int e = 0; e < E / 2; ++e) {
            const float a = v[e], b = v[e + E / 2];
            v[e] = a * c[e] - b * s[e];
            v[e + E / 2] = b * c[e] + a * s[e];
        }
        // Butterflies of span 1..16 (partner: lane ^ span), then 32.. (partner: e ^ span/32),
        // up to the rotation block; the element with the span's bit clear keeps a + b, its
        // partner b' = a - b.
#pragma unroll
        for (int k = 0; k < 5; ++k) {
            // +1 where this lane keeps a + b (its bit k clear), -1 where it keeps b - a, b its
            // partner's value: fmaf(sign, a, b) is either, rounded once, in one instruction.
            const float sign = (lane >> k) & 1 ? -1.0f : 1.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const float other = __shfl_xor_sync(0xffffffffu, v[e], 1 << k);
                v[e] = fmaf(sign, v[e], other);
            }
        }
#pragma unroll
        for (int span = 1; span < E; span <<= 1) {
            if (span < block / 32) {
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    if (!(e & span)) {
                        const float a = v[e], b = v[e ^ span];
                        v[e] = a + b;
                        v[e ^ span] = a - b;
                    }
                }
            }
        }
        const bool key = head >= num_heads;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const float r = v[e] * norm;
            x[e * 32 + lane] = r;
            if (key) kv_store1(k_dst + (head - num_heads) * D + e * 32 + lane, r);
        }
    }
}

// `rope_rotate_heads_warp_e` for head dims 64, 128, 192, 256 (multiples of 64 up to
// ROTATE_MAX_DIM).
template <typename C>
__device__ __forceinline__ void rope_rotate_heads_warp(float* __restrict__ row,
                                                       const float* __restrict__ cs,
                                                       const float* __restrict__ sn,
                                                       C* __restrict__ k_dst, int num_heads,
                                                       int num_kv_heads, int head_dim,
                                                       int block) {
#define ROTATE_WARP_CASE(DIM)                                                                     \
    case DIM:                                                                                     \
        rope_rotate_heads_warp_e<C, DIM / 32>(row, cs, sn, k_dst, num_heads, num_kv_heads, block); \
        break;
    switch (head_dim) {
        ROTATE_WARP_CASE(64)
        ROTATE_WARP_CASE(128)
        ROTATE_WARP_CASE(192)
        ROTATE_WARP_CASE(256)
    }
#undef ROTATE_WARP_CASE
}

// A fused q/k/v row of bf16 at `from` widened into f32 at `to` (global or shared memory): four
// values a thread (8-byte loads, 16-byte stores, consecutive across the warp so that shared
// stores meet no bank conflict) where the width allows it.
__device__ __forceinline__ void widen_row(const bf16* __restrict__ from, float* __restrict__ to,
                                          int width) {
    if ((width & 3) == 0) {
        for (int j = 4 * threadIdx.x; j < width; j += 4 * blockDim.x) {
            const uint2 p = *reinterpret_cast<const uint2*>(from + j);
            *reinterpret_cast<float4*>(to + j) =
                make_float4(__uint_as_float(p.x << 16), __uint_as_float(p.x & 0xffff0000u),
                            __uint_as_float(p.y << 16), __uint_as_float(p.y & 0xffff0000u));
        }
    } else {
        for (int j = threadIdx.x; j < width; j += blockDim.x) to[j] = bf16_to_f32(from[j]);
    }
}

// The rotation and cache write of one token's row at `row` (f32: in global memory, or the
// block's shared copy of it), K and V into the cache at `k_dst` and `v_dst`.
template <typename C, bool ROTATE_KEYS>
__device__ __forceinline__ void rope_cache_write_row(float* __restrict__ row,
                                                     const float* __restrict__ cs,
                                                     const float* __restrict__ sn,
                                                     C* __restrict__ k_dst, C* __restrict__ v_dst,
                                                     int num_heads, int num_kv_heads,
                                                     int head_dim) {
    const int half = head_dim / 2;
    const int token_stride = num_kv_heads * head_dim;
    // Every head's rotation block: the largest power of two dividing head_dim.
    const int rotation_block = head_dim & -head_dim;
    if (ROTATE_KEYS && head_dim % 64 == 0 && head_dim <= ROTATE_MAX_DIM) {
        rope_rotate_heads_warp<C>(row, cs, sn, k_dst, num_heads, num_kv_heads, head_dim,
                                  rotation_block);
        const float* v = row + (num_heads + num_kv_heads) * head_dim;
        for (int j = 4 * threadIdx.x; j < token_stride; j += 4 * blockDim.x)
            kv_store4(v_dst + j, *reinterpret_cast<const float4*>(v + j));
        return;
    }
#ifndef ROPE_VEC
#define ROPE_VEC 1
#endif
    // Two rotation pairs a thread (8-byte loads and stores) and the value rows four at a time
    // where the head dims allow it: the scalar loop ran at ~2.4 TB/s on an H100 at prefill
    // sizes (`-D ROPE_VEC=0`, TANDEM_KERNEL_DEFINES, keeps it, to compare).
    if (ROPE_VEC && (half & 1) == 0 && (token_stride & 3) == 0) {
        const int half2 = half >> 1;
        const int quads = (num_heads + num_kv_heads) * half2;
        for (int j = threadIdx.x; j < quads; j += blockDim.x) {
            const int head = j / half2, i = 2 * (j - head * half2);
            float* x = row + head * head_dim;
            const float2 a = *reinterpret_cast<const float2*>(x + i);
            const float2 b = *reinterpret_cast<const float2*>(x + i + half);
            const float2 c = *reinterpret_cast<const float2*>(cs + i);
            const float2 sn2 = *reinterpret_cast<const float2*>(sn + i);
            const float2 ra = make_float2(a.x * c.x - b.x * sn2.x, a.y * c.y - b.y * sn2.y);
            const float2 rb = make_float2(b.x * c.x + a.x * sn2.x, b.y * c.y + a.y * sn2.y);
            *reinterpret_cast<float2*>(x + i) = ra;
            *reinterpret_cast<float2*>(x + i + half) = rb;
            if (!ROTATE_KEYS && head >= num_heads) {
                C* k = k_dst + (head - num_heads) * head_dim + i;
                kv_store2(k, ra.x, ra.y);
                kv_store2(k + half, rb.x, rb.y);
            }
        }
        if (ROTATE_KEYS) {
            hadamard_rotate_heads(row, (num_heads + num_kv_heads) * head_dim, rotation_block);
            const float* k = row + num_heads * head_dim;
            for (int j = 4 * threadIdx.x; j < token_stride; j += 4 * blockDim.x)
                kv_store4(k_dst + j, *reinterpret_cast<const float4*>(k + j));
        }
        const float* v = row + (num_heads + num_kv_heads) * head_dim;
        for (int j = 4 * threadIdx.x; j < token_stride; j += 4 * blockDim.x)
            kv_store4(v_dst + j, *reinterpret_cast<const float4*>(v + j));
        return;
    }
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
        const int head = j / half, i = j % half;
        float* x = row + head * head_dim;
        const float a = x[i], b = x[i + half];
        const float ra = a * cs[i] - b * sn[i];
        const float rb = b * cs[i] + a * sn[i];
        x[i] = ra;
        x[i + half] = rb;
        if (!ROTATE_KEYS && head >= num_heads) {
            const int kh = head - num_heads;
            kv_store1(k_dst + kh * head_dim + i, ra);
            kv_store1(k_dst + kh * head_dim + i + half, rb);
        }
    }
    if (ROTATE_KEYS) {
        hadamard_rotate_heads(row, (num_heads + num_kv_heads) * head_dim, rotation_block);
        const float* k = row + num_heads * head_dim;
        for (int j = threadIdx.x; j < token_stride; j += blockDim.x) kv_store1(k_dst + j, k[j]);
    }
    const float* v = row + (num_heads + num_kv_heads) * head_dim;
    for (int j = threadIdx.x; j < token_stride; j += blockDim.x) kv_store1(v_dst + j, v[j]);
}

// `src` null: the rows are qkv's own (f32), rotated in place. Else the projection wrote them in
// bf16 (cuBLASLt's FP8 product writes bf16 only) into `src`, and each row is widened as it is
// read: with `staged` (the launch gives the block the row's width of f32 in shared memory)
// into shared memory, rotated there, and only the rotated q heads go back to `qkv` (k and v
// go to the cache and nothing reads them from qkv: at 6,144 values a row, 8 KB of f32 a token
// not written and ~2.5x less time at prefill sizes than rotating in global memory); else into
// qkv's row, rotated there.
//
// `q16` not null (staged only): rows from `q16_first` on (a batch's prefill rows, for the
// warpgroup prefill kernel) write their q heads instead as bf16 of q * `q16_scale` (the
// kernel's score scale) into `q16` ([rows - q16_first, num_heads * head_dim]), the very
// values the kernel would round f32 q to, at half the bytes written and read.
template <typename C, bool ROTATE_KEYS>
__device__ __forceinline__ void rope_cache_write_impl(
    float* __restrict__ qkv, const float* __restrict__ cos_table, const float* __restrict__ sin_table,
    const u32* __restrict__ slot_mapping, C* __restrict__ cache, int num_heads, int num_kv_heads,
    int head_dim, int block_size, long long block_elems, long long layer_offset,
    const bf16* __restrict__ src, int staged, bf16* __restrict__ q16, int q16_first,
    float q16_scale) {
    extern __shared__ __align__(16) float rope_staged_row[];
    const long long t = blockIdx.x;
    const int half = head_dim / 2;
    const int width = (num_heads + 2 * num_kv_heads) * head_dim;
    const int token_stride = num_kv_heads * head_dim;
    const long long kv_stride = (long long)block_size * token_stride;
    float* const qkv_row = qkv + t * width;
    const float* cs = cos_table + t * half;
    const float* sn = sin_table + t * half;
    const u32 slot = slot_mapping[t];
    C* k_dst = cache + (long long)(slot / block_size) * block_elems + layer_offset +
               (long long)(slot % block_size) * token_stride;
    C* v_dst = k_dst + kv_stride;
    if (src == nullptr || !staged) {
        if (src != nullptr) {
            widen_row(src + t * width, qkv_row, width);
            // The block's writes to the row are visible to all its threads past the barrier.
            __syncthreads();
        }
        rope_cache_write_row<C, ROTATE_KEYS>(qkv_row, cs, sn, k_dst, v_dst, num_heads,
                                             num_kv_heads, head_dim);
        return;
    }
    // The row in shared memory (the compiler sees the address space: shared loads and stores).
    widen_row(src + t * width, rope_staged_row, width);
    __syncthreads();
    rope_cache_write_row<C, ROTATE_KEYS>(rope_staged_row, cs, sn, k_dst, v_dst, num_heads,
                                         num_kv_heads, head_dim);
    // The rotated q heads, from shared memory to qkv (or q16), four consecutive values a
    // thread (16-byte shared loads without bank conflicts).
    __syncthreads();
    const int q_width = num_heads * head_dim;
    const float* row = rope_staged_row;
    const bool vec = (q_width & 3) == 0;
    if (q16 != nullptr && t >= q16_first) {
        bf16* dst = q16 + (t - q16_first) * (long long)q_width;
        if (vec) {
            for (int j = 4 * threadIdx.x; j < q_width; j += 4 * blockDim.x) {
                const float4 v = *reinterpret_cast<const float4*>(row + j);
                *reinterpret_cast<uint2*>(dst + j) =
                    make_uint2(pack_bf16(v.x * q16_scale, v.y * q16_scale),
                               pack_bf16(v.z * q16_scale, v.w * q16_scale));
            }
        } else {
            for (int j = threadIdx.x; j < q_width; j += blockDim.x)
                dst[j] = f32_to_bf16(row[j] * q16_scale);
        }
        return;
    }
    if (vec) {
        for (int j = 4 * threadIdx.x; j < q_width; j += 4 * blockDim.x)
            *reinterpret_cast<float4*>(qkv_row + j) = *reinterpret_cast<const float4*>(row + j);
    } else {
        for (int j = threadIdx.x; j < q_width; j += blockDim.x) qkv_row[j] = row[j];
    }
}

#define ROPE_CACHE_WRITE_KERNEL(NAME, C, ROTATE_KEYS)                                              \
    extern "C" __global__ void __launch_bounds__(512, 3) NAME(float* __restrict__ qkv, const float* __restrict__ cos_table, \
                                    const float* __restrict__ sin_table,                           \
                                    const u32* __restrict__ slot_mapping, C* __restrict__ cache,   \
                                    int num_heads, int num_kv_heads, int head_dim,                 \
                                    int block_size, long long block_elems,                         \
                                    long long layer_offset, const bf16* __restrict__ src,          \
                                    int staged, bf16* __restrict__ q16, int q16_first,             \
                                    float q16_scale) {                                             \
        pdl_enter();                                                                               \
        rope_cache_write_impl<C, ROTATE_KEYS>(qkv, cos_table, sin_table, slot_mapping, cache,      \
                                              num_heads, num_kv_heads, head_dim, block_size,       \
                                              block_elems, layer_offset, src, staged, q16,         \
                                              q16_first, q16_scale);                               \
    }

ROPE_CACHE_WRITE_KERNEL(rope_cache_write, bf16, false)
ROPE_CACHE_WRITE_KERNEL(rope_cache_write_fp8, fp8, true)

// One layer's K and V of each listed block of an FP8 cache, widened exactly to bf16 (an e4m3
// value is a bf16 one) into a compact copy: copy block i is cache block `blocks[i]`, and a
// block of the copy is that layer's `layer_elems` values (K then V), so the copy reads as a
// one-layer bf16 cache. The warpgroup prefill kernel, bf16-only, then runs over it. Grid
// (chunks of a block, listed blocks); eight codes a thread a step.
extern "C" __global__ void widen_fp8_kv_blocks(const fp8* __restrict__ cache,
                                               const u32* __restrict__ blocks, int num_blocks,
                                               bf16* __restrict__ out, long long block_elems,
                                               long long layer_offset, long long layer_elems) {
    pdl_enter();
    const long long vecs = layer_elems / 8;
    for (int i = blockIdx.y; i < num_blocks; i += gridDim.y) {
        const uint2* src =
            reinterpret_cast<const uint2*>(cache + (long long)blocks[i] * block_elems + layer_offset);
        uint4* dst = reinterpret_cast<uint4*>(out + (long long)i * layer_elems);
        for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < vecs;
             v += (long long)gridDim.x * blockDim.x) {
            float f[8];
            kv_widen8(src[v], f);
            u32 w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                w[j] = (__float_as_uint(f[2 * j]) >> 16) |
                       (__float_as_uint(f[2 * j + 1]) & 0xffff0000u);
            dst[v] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

#define ATTN_WARPS 4

// One output element of a decode attention block, its query head `th` (token x heads + head)
// merged over the block: normalized into `out` when the token's keys are not split, else the
// split's unnormalized sum and (once per head) its max, in natural-log units, and denominator
// for `attention_combine`.
__device__ __forceinline__ void store_attention(bf16* __restrict__ out,
                                                float* __restrict__ partial_acc,
                                                float* __restrict__ partial_ml, long long th,
                                                int D, int d, int split, int splits, float sum,
                                                float m_all, float l_all) {
    if (splits == 1) {
        out[th * D + d] = f32_to_bf16(sum / l_all);
    } else {
        partial_acc[(th * splits + split) * D + d] = sum;
        if (d == 0) {
            partial_ml[(th * splits + split) * 2] = m_all;
            partial_ml[(th * splits + split) * 2 + 1] = l_all;
        }
    }
}

// A decode attention kernel `NAME##D` of `THREADS` threads running `BODY<D>`: every decode
// kernel takes these arguments (and an L2 prefetch range) and writes the same outputs.
#define DECODE_ATTENTION_KERNEL(NAME, THREADS, BODY, D) \
    DECODE_ATTENTION_KERNEL_OF(NAME##D, THREADS, BODY<D>, bf16)
// The same over a cache of element type `C`, the kernel named `NAME`.
#define DECODE_ATTENTION_KERNEL_OF(NAME, THREADS, BODY, C)                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                   \
        const float* __restrict__ qkv, const C* __restrict__ cache,                               \
        const u32* __restrict__ positions, const u32* __restrict__ token_seq,                     \
        const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,            \
        bf16* __restrict__ out, float* __restrict__ partial_acc, float* __restrict__ partial_ml,  \
        int num_heads, int num_kv_heads, int block_size, long long block_elems,                   \
        long long layer_offset, float scale, const char* prefetch, long long prefetch_bytes) {    \
        pdl_enter();                                                                              \
        prefetch_l2(prefetch, prefetch_bytes);                                                    \
        BODY(qkv, cache, positions, token_seq, seq_block_start, block_tables, out,                \
                partial_acc, partial_ml, num_heads, num_kv_heads, block_size, block_elems,        \
                layer_offset, scale);                                                             \
    }
// Query heads of one KV head handled by one block (grouped-query attention): the block reads
// each key and value once for all of them instead of once per query head.
#define ATTN_GMAX 8

// Decode attention: the new tokens' q heads over their split's share of the keys of their
// sequence (each token's keys divided evenly among the grid's splits) (keys 0..=position: the cache already holds this step's keys, so causality is the
// position bound). Grid (tokens, kv_heads * head chunks, splits), ATTN_WARPS warps; a block
// takes up to ATTN_GMAX query heads sharing one KV head. Each warp walks every ATTN_WARPS-th key
// with an online softmax per head, lanes holding D/32 dimensions; warps are merged in shared
// memory. With one split the normalized output goes to `out` (bf16, the o-projection's input);
// with several, the unnormalized sum and its (max, denominator) go to the partial buffers for
// `attention_combine`.
template <int D, typename C = bf16>
__device__ __forceinline__ void attend(
    const float* __restrict__ qkv, const C* __restrict__ cache, const u32* __restrict__ positions,
    const u32* __restrict__ token_seq, const u32* __restrict__ seq_block_start,
    const u32* __restrict__ block_tables, bf16* __restrict__ out, float* __restrict__ partial_acc,
    float* __restrict__ partial_ml, int num_heads, int num_kv_heads, int block_size,
    long long block_elems, long long layer_offset, float scale) {
    // Dimensions per lane; head dims that are not a multiple of 32 leave the last lanes short.
    constexpr int E = (D + 31) / 32;
    const int t = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = num_heads / num_kv_heads;
    const int chunks = (group + ATTN_GMAX - 1) / ATTN_GMAX;
    const int kvh = blockIdx.y / chunks;
    const int h0 = kvh * group + (blockIdx.y % chunks) * ATTN_GMAX;
    const int nh = min(ATTN_GMAX, kvh * group + group - h0);
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;
    const int n_keys = (int)positions[t] + 1;
    const int split_len = (n_keys + splits - 1) / splits;
    const int k_begin = split * split_len;
    const int k_end = min(n_keys, k_begin + split_len);
    const u32* table = block_tables + seq_block_start[token_seq[t]];
    const bool lane_on = lane * E < D;

    float q[ATTN_GMAX][E], acc[ATTN_GMAX][E], m[ATTN_GMAX], l[ATTN_GMAX];
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; ++g) {
        const float* qp = qkv + (long long)t * width + (h0 + g) * D + lane * E;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            q[g][e] = (g < nh && lane * E + e < D) ? qp[e] * scale : 0.0f;
            acc[g][e] = 0.0f;
        }
        m[g] = NEG_INF;
        l[g] = 0.0f;
    }
    for (int j = k_begin + warp; j < k_end; j += ATTN_WARPS) {
        const u32 blk = table[j / block_size];
        const C* kp = cache + (long long)blk * block_elems + layer_offset +
                      (long long)(j % block_size) * token_stride + kvh * D + lane * E;
        const C* vp = kp + kv_stride;
        float kf[E], vf[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const bool on = lane * E + e < D;
            kf[e] = on ? kv_to_f32(kp[e]) : 0.0f;
            vf[e] = on ? kv_to_f32(vp[e]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < ATTN_GMAX; ++g) {
            if (g < nh) {
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < E; ++e) dot += q[g][e] * kf[e];
                dot = warp_sum(dot);
                const float m_new = fmaxf(m[g], dot);
                const float corr = expf(m[g] - m_new);
                const float p = expf(dot - m_new);
                l[g] = l[g] * corr + p;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[g][e] = acc[g][e] * corr + p * vf[e];
                m[g] = m_new;
            }
        }
    }

    __shared__ float s_m[ATTN_WARPS][ATTN_GMAX], s_l[ATTN_WARPS][ATTN_GMAX];
    __shared__ float s_acc[ATTN_WARPS][ATTN_GMAX][D];
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; ++g) {
        if (lane == 0) {
            s_m[warp][g] = m[g];
            s_l[warp][g] = l[g];
        }
        if (lane_on) {
#pragma unroll
            for (int e = 0; e < E; ++e)
                if (lane * E + e < D) s_acc[warp][g][lane * E + e] = acc[g][e];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
        const int g = idx / D, d = idx % D;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.0f, sum = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) {
            const float wt = s_l[w][g] > 0.0f ? expf(s_m[w][g] - m_all) : 0.0f;
            l_all += s_l[w][g] * wt;
            sum += s_acc[w][g][d] * wt;
        }
        store_attention(out, partial_acc, partial_ml, (long long)t * num_heads + h0 + g, D, d,
                        split, splits, sum, m_all, l_all);
    }
}

// Query heads per block of the vectorized kernels below (`ATTN_VEC_HEADS` in cuda/kernels.rs):
// four keeps their q and accumulators in registers at a good occupancy; Llama's group is 4.
#define ATTN_VEC_GMAX 4
// Keys each lane group loads per step of `attend_vec` (tuning: TANDEM_KERNEL_DEFINES).
#ifndef ATTN_VEC_UNROLL
#define ATTN_VEC_UNROLL 4
#endif

// The decode attention of `attend` for head dims that are 8 x a power of two (64, 128, 256):
// instead of a warp per key (a warp-wide shuffle reduction per key and head, 2-byte loads),
// D/8 lanes share a key, each loading its 8 dims of K and of V as one 16-byte load, so a warp
// reads 32/(D/8) keys per step and reduces each dot product in log2(D/8) shuffles. Every lane
// group keeps its own online softmax; the groups of all warps are merged in shared memory.
// Same grid, arguments and outputs as `attend`, with ATTN_VEC_GMAX query heads per block.
template <int D, typename C = bf16>
__device__ __forceinline__ void attend_vec(
    const float* __restrict__ qkv, const C* __restrict__ cache, const u32* __restrict__ positions,
    const u32* __restrict__ token_seq, const u32* __restrict__ seq_block_start,
    const u32* __restrict__ block_tables, bf16* __restrict__ out, float* __restrict__ partial_acc,
    float* __restrict__ partial_ml, int num_heads, int num_kv_heads, int block_size,
    long long block_elems, long long layer_offset, float scale) {
    constexpr int LPK = D / 8;        // lanes per key
    constexpr int KPW = 32 / LPK;     // keys per warp step
    constexpr int G = ATTN_VEC_GMAX;
    constexpr int STATES = ATTN_WARPS * KPW;
    const int t = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LPK, part = lane % LPK;
    const int group = num_heads / num_kv_heads;
    const int chunks = (group + G - 1) / G;
    const int kvh = blockIdx.y / chunks;
    const int h0 = kvh * group + (blockIdx.y % chunks) * G;
    const int nh = min(G, kvh * group + group - h0);
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;
    const int n_keys = (int)positions[t] + 1;
    const int split_len = (n_keys + splits - 1) / splits;
    const int k_begin = split * split_len;
    const int k_end = min(n_keys, k_begin + split_len);
    const u32* table = block_tables + seq_block_start[token_seq[t]];

    float q[G][8], acc[G][8], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const float4* qp =
            reinterpret_cast<const float4*>(qkv + (long long)t * width + (h0 + g) * D + part * 8);
        const float4 a = g < nh ? qp[0] : make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 b = g < nh ? qp[1] : make_float4(0.f, 0.f, 0.f, 0.f);
        q[g][0] = a.x * scale, q[g][1] = a.y * scale, q[g][2] = a.z * scale, q[g][3] = a.w * scale;
        q[g][4] = b.x * scale, q[g][5] = b.y * scale, q[g][6] = b.z * scale, q[g][7] = b.w * scale;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
        m[g] = NEG_INF;
        l[g] = 0.0f;
    }
    // U keys per lane group per step, all loads issued before any arithmetic: the memory
    // system has U times as many requests in flight, and the softmax rescales once per step.
    constexpr int U = ATTN_VEC_UNROLL;
    constexpr int STRIDE = ATTN_WARPS * KPW;
    for (int j0 = k_begin + warp * KPW; j0 < k_end; j0 += U * STRIDE) {
        // Each lane's 8 elements of K and of V as they lie in the cache (16 bytes of bf16, 8 of
        // FP8), widened only when used.
        typedef typename KvRaw8<C>::type Raw;
        Raw kraw[U], vraw[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + sub + u * STRIDE;
            ok[u] = j < k_end;
            kraw[u] = Raw{};
            vraw[u] = Raw{};
            if (ok[u]) {
                const u32 blk = table[j / block_size];
                const C* kp = cache + (long long)blk * block_elems + layer_offset +
                              (long long)(j % block_size) * token_stride + kvh * D + part * 8;
                kraw[u] = *reinterpret_cast<const Raw*>(kp);
                vraw[u] = *reinterpret_cast<const Raw*>(kp + kv_stride);
            }
        }
        float dot[G][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[8];
            kv_widen8(kraw[u], kf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) d += q[g][e] * kf[e];
                dot[g][u] = d;
            }
        }
        // Sum each key's dot product over its lane group: G x U independent chains.
#pragma unroll
        for (int o = LPK / 2; o > 0; o >>= 1) {
#pragma unroll
            for (int g = 0; g < G; ++g) {
#pragma unroll
                for (int u = 0; u < U; ++u) dot[g][u] += __shfl_xor_sync(0xffffffffu, dot[g][u], o);
            }
        }
        if (!ok[0]) continue;  // keys ascend with u: none of this step's are this group's
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g < nh) {
                float m_new = m[g];
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (ok[u]) m_new = fmaxf(m_new, dot[g][u]);
                const float corr = expf(m[g] - m_new);
                l[g] *= corr;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    if (ok[u]) {
                        const float p = expf(dot[g][u] - m_new);
                        l[g] += p;
                        float vf[8];
                        kv_widen8(vraw[u], vf);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[g][e] += p * vf[e];
                    }
                }
                m[g] = m_new;
            }
        }
    }

    __shared__ float s_m[STATES][G], s_l[STATES][G];
    __shared__ float s_acc[STATES][G][D];
    const int st = warp * KPW + sub;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (part == 0) {
            s_m[st][g] = m[g];
            s_l[st][g] = l[g];
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) s_acc[st][g][part * 8 + e] = acc[g][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
        const int g = idx / D, d = idx % D;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < STATES; ++w) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.0f, sum = 0.0f;
#pragma unroll
        for (int w = 0; w < STATES; ++w) {
            const float wt = s_l[w][g] > 0.0f ? expf(s_m[w][g] - m_all) : 0.0f;
            l_all += s_l[w][g] * wt;
            sum += s_acc[w][g][d] * wt;
        }
        store_attention(out, partial_acc, partial_ml, (long long)t * num_heads + h0 + g, D, d,
                        split, splits, sum, m_all, l_all);
    }
}

#define ATTENTION_VEC_KERNEL(D) DECODE_ATTENTION_KERNEL(paged_attention_vec_d, ATTN_WARPS * 32, attend_vec, D)

ATTENTION_VEC_KERNEL(64)
ATTENTION_VEC_KERNEL(128)
ATTENTION_VEC_KERNEL(256)

// The vectorized kernel over an FP8 cache: each lane loads its 8 codes of K and of V (8 bytes
// each) and widens them exactly: the decode attention of an FP8 cache (the warp-per-key one
// below covers the other head dims).
#define ATTENTION_VEC_FP8_KERNEL(D) \
    DECODE_ATTENTION_KERNEL_OF(paged_attention_vec_fp8_d##D, ATTN_WARPS * 32, (attend_vec<D, fp8>), fp8)

ATTENTION_VEC_FP8_KERNEL(64)
ATTENTION_VEC_FP8_KERNEL(128)
ATTENTION_VEC_FP8_KERNEL(256)

#define ATTENTION_KERNEL(D) DECODE_ATTENTION_KERNEL(paged_attention_d, ATTN_WARPS * 32, attend, D)

ATTENTION_KERNEL(16)
ATTENTION_KERNEL(32)
ATTENTION_KERNEL(64)
ATTENTION_KERNEL(80)
ATTENTION_KERNEL(96)
ATTENTION_KERNEL(128)
ATTENTION_KERNEL(256)

// The warp-per-key kernel over an FP8 cache, for the head dims the vectorized one lacks.
#define ATTENTION_FP8_KERNEL(D) \
    DECODE_ATTENTION_KERNEL_OF(paged_attention_fp8_d##D, ATTN_WARPS * 32, (attend<D, fp8>), fp8)

ATTENTION_FP8_KERNEL(16)
ATTENTION_FP8_KERNEL(32)
ATTENTION_FP8_KERNEL(80)
ATTENTION_FP8_KERNEL(96)

// Merges the splits of `paged_attention_d*`: grid (tokens, heads), one thread per dimension.
extern "C" __global__ void attention_combine(const float* __restrict__ partial_acc,
                                             const float* __restrict__ partial_ml,
                                             bf16* __restrict__ out, int head_dim, int splits) {
    pdl_enter();
    const long long th = (long long)blockIdx.x * gridDim.y + blockIdx.y;
    const float* ml = partial_ml + th * splits * 2;
    float m_all = NEG_INF;
    for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, ml[2 * s]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f, l_all = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float l = ml[2 * s + 1];
            if (l > 0.0f) {
                const float w = expf(ml[2 * s] - m_all);
                l_all += l * w;
                sum += partial_acc[(th * splits + s) * head_dim + d] * w;
            }
        }
        out[th * head_dim + d] = f32_to_bf16(sum / l_all);
    }
}
