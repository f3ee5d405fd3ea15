// Decode attention on tensor cores, its K/V streamed through shared memory.
//
// Same grid, arguments and outputs as `paged_attention_vec_d*` (attention.cu): grid (tokens,
// KV heads x head chunks, splits), a block per token, KV head and chunk of up to DM_HEADS query
// heads sharing that KV head, and its split of the token's keys. What differs is how the keys
// are read and multiplied:
// - the keys come in tiles of DM_KEYS, copied by `cp.async` (16 bytes a copy, a key's row of one
//   head being D/8 copies) into a ring of DM_STAGES shared-memory stages, so that DM_STAGES - 1
//   tiles are always in flight while the block works on one: the kernel's whole job is to keep
//   HBM busy, and the vectorized kernel, which loads into registers and then computes, leaves
//   gaps while its warps compute;
// - the products run on `mma.sync` (m16n8k16, bf16 in, f32 out) with the query heads as the rows
//   of the A tile (rows past the group's heads are zeros; over an FP8 cache the keys are the
//   rows instead, below): a key is multiplied once for all of its query heads, in a handful of
//   instructions, where the vectorized kernel spends shuffles, FMAs and exponentials per key
//   and head.
// Each warp takes 16 keys of a tile (S = Q K^T for them, an online softmax per query head in
// base 2, O += P V), keeps its own running max and sum, and the four warps are merged at the
// end through shared memory, as in the vectorized kernel.
//
// Splits are whole tiles (the Rust side sizes them in keys; here a split takes
// ceil(tiles / splits) tiles), so only a token's last tile is partial; its keys past the end are
// zero-filled by the copy and masked to -inf.

#ifndef DM_STAGES
#define DM_STAGES 3
#endif
// Stages over an FP8 cache (a stage of codes is half a bf16 stage, so twice the blocks fit a
// multiprocessor).
#ifndef DM_STAGES_FP8
#define DM_STAGES_FP8 3
#endif
// 1: the query as a bf16 pair (see below); 0 (default): its bf16 rounding alone, as
// FlashAttention's kernels take it. Measured on an H100 (Llama-3.1-8B shapes, context 1024;
// docs/benchmarks.md): the pair costs 4-5% of a whole decode step at batch 32-256 (the kernel
// reads 2.62 instead of 2.80 TB/s at batch 256) and moves the logits' largest relative L2 from
// the CPU's on two Llama-3.1-8B layers from 1.29e-2 to 1.20e-2 (the vectorized f32 kernel:
// 1.19e-2).
#ifndef DM_Q_SPLIT
#define DM_Q_SPLIT 0
#endif
// 0: the `_tiles` kernels below look each key's block up as the others do (same bits).
#ifndef DM_WHOLE_TILES
#define DM_WHOLE_TILES 1
#endif
// Keys per tile: 16 per warp.
#define DM_KEYS 64
#define DM_WARPS 4
// Query heads per block: rows 0-7 of the mma's 16-row A tile (rows 8-15 stay zero), or over an
// FP8 cache the 8 columns of its B tile.
#define DM_HEADS 8

// Over an FP8 cache (`C` = fp8) the stages hold the tiles' codes (half the bytes), and each
// lane widens the codes of its own mma fragments as it reads them: there is no widened tile
// (a pass through shared memory and a barrier per tile, which held an earlier version to 1.9
// TB/s of codes where the bf16 kernel reads 2.8). The products run in f16: every e4m3 value is
// an f16, one instruction converts two codes, and the query and the probabilities rounded to
// f16 keep 3 more bits than bf16 (the query, pre-scaled by the softmax scale, is far inside
// f16's range). The keys are the mma's rows there (S^T = K Q^T, O^T = V^T P^T: `fp8_tile`),
// which fills the 16-row A tile with a warp's 16 keys where the query heads fill 8 or 4 of
// its rows; on an H200 that took the FP8 kernel from 168 to 126 registers (4 blocks a
// multiprocessor instead of 3) and 14% of its instructions. How the codes become fragments:
// - K (the A operand of S^T, rows = keys, k = head dim): a dot product does not care in which
//   order its dims are summed, so lane (g, c) takes the D/4 contiguous codes at c * D/4 of
//   keys g and g + 8, 16 bytes a load, and each 4 codes are one 16-dim step's k slots
//   (2c, 2c+1) and (2c+8, 2c+9); the query's fragment (B, column g = head g) is gathered in
//   the same order.
// - V (the A operand of O^T, rows = head dims, k = key): `ldmatrix.trans` of 8x8 matrices of
//   16-bit elements, each a pair of codes, gives lane (g, c) codes (2c, dims 2g, 2g+1) and
//   (2c + 1, the same dims) of a 16-dim chunk; a byte permute makes the two keys' pair of one
//   dim, so a chunk's rows are its even dims (g) and its odd ones (g + 8): O^T's rows come
//   out interleaved, and the merge below writes them back in order.
// 16-byte chunks of a key's row of codes are XOR-swizzled by the row (`fp8_chunk`) so that
// both reads are free of bank conflicts.

// Two floats as f16x2 (lo in the low half), round to nearest even.
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// f32 += f16 · f16 (mma_bf16's shape and fragments).
__device__ __forceinline__ void mma_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 8x8 matrix of 16-bit values a warp holds as an mma fragment (lane (g, c): row g, columns
// 2c and 2c + 1), transposed.
__device__ __forceinline__ u32 movmatrix_trans(u32 x) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
    return r;
}

// Two e4m3 codes (low byte first) as f16x2, exactly.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 codes) {
#if __CUDA_ARCH__ >= 890
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)codes));
    return h2;
#else
    __trap();
    return 0u;
#endif
}

// Over an FP8 cache a key's row of codes is D/16 chunks of 16 bytes, 128 / D rows sharing a
// 128-byte line of banks; chunk q of row `row` sits at chunk `fp8_chunk<D>(q, row)`, so that
// the eight rows an ldmatrix reads at one chunk, and the rows a K read takes at once, land on
// distinct banks.
template <int D>
__device__ __forceinline__ int fp8_chunk(int q, int row) {
    return q ^ ((row / (128 / D)) & (D / 16 - 1));
}

// Copies one whole tile's K and V codes (DM_KEYS consecutive rows from `rows`, the tile's
// first key being key `first_key` of the sequence) into the stage at `ks` (V at ks + TILE);
// rows from `n_keys` on are zero-filled.
template <int D>
__device__ __forceinline__ void fp8_load_whole_tile(fp8* ks, const fp8* rows, int first_key,
                                                    int n_keys, int token_stride,
                                                    long long kv_stride) {
    constexpr int CH8 = D / 16;
    fp8* vs = ks + DM_KEYS * D;
#pragma unroll
    for (int j = 0; j < DM_KEYS * CH8 / (DM_WARPS * 32); ++j) {
        const int i = threadIdx.x + j * DM_WARPS * 32;
        const int row = i / CH8, c = i % CH8;
        const bool on = first_key + row < n_keys;
        const fp8* src = rows + row * token_stride + c * 16;
        const int at = row * D + fp8_chunk<D>(c, row) * 16;
        cp_async16(ks + at, src, on ? 16 : 0);
        cp_async16(vs + at, src + kv_stride, on ? 16 : 0);
    }
}

// The query's B fragments of S^T over an FP8 cache (column g = head g of the `nh` heads whose
// rows start at `q_heads`; columns past them zero), pre-scaled by `qs` and in f16, the dims in
// the order lane c reads K's codes: step k's slots are dims c * D/4 + 4k + 0..3.
template <int D>
__device__ __forceinline__ void fp8_query(const float* q_heads, int nh, float qs,
                                          u32 (&qa)[D / 16][4]) {
    const int r = (threadIdx.x & 31) >> 2;
    const float* qf = q_heads + r * D + (threadIdx.x & 3) * (D / 4);
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
        if (r >= nh) {
            qa[k][0] = qa[k][1] = 0u;
        } else {
            qa[k][0] = pack_f16(qf[4 * k] * qs, qf[4 * k + 1] * qs);
            qa[k][1] = pack_f16(qf[4 * k + 2] * qs, qf[4 * k + 3] * qs);
        }
        qa[k][2] = qa[k][3] = 0u;
    }
}

// A warp's 16 keys over an FP8 cache (rows 0-15 of codes at `k16` and `v16`, D bytes a row,
// swizzled by `fp8_chunk`, which repeats every 16 rows: a tile's rows 16w .. 16w + 15 are
// such a run; row 0 is key `first_key`, the sequence has `n_keys`): S^T = K Q^T, the online
// softmax, O^T += V^T P^T. Lane (g, c) holds the scores of keys g and g + 8 for heads 2c and
// 2c + 1 (their running max and sum: `m8`, `l8`), and O^T for those two heads at dims
// 16q + 2g (elements 0, 1 of `o8[q]`) and 16q + 2g + 1 (2, 3) of each 16-dim chunk q.
template <int D>
__device__ __forceinline__ void fp8_keys16(const fp8* k16, const fp8* v16, int first_key,
                                           int n_keys, const u32 (&qa)[D / 16][4],
                                           float (&o8)[D / 16][4], float (&m8)[2],
                                           float (&l8)[2]) {
    const int lane = threadIdx.x & 31;
    // 16 keys all past the end (in a token's last tile) add nothing: their scores would all
    // be -inf and their probabilities 0, leaving the sums as they are.
    if (first_key >= n_keys) return;
    const int g = lane >> 2, c = lane & 3;
    // S^T: A = keys g and g + 8, lane c taking their codes c * D/4 .. + D/4 in the order
    // the query's fragment `qa` gathers its dims (a 16-dim step's columns 2c, 2c + 1 the
    // first two codes of a word, 2c + 8, 2c + 9 the last two); B = the query, column g =
    // head h0 + g.
    float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int row_a = g, row_b = g + 8;
#pragma unroll
    for (int h = 0; h < D / 64; ++h) {
        const int chunk = c * (D / 64) + h;
        const uint4 ra =
            *reinterpret_cast<const uint4*>(k16 + row_a * D + fp8_chunk<D>(chunk, row_a) * 16);
        const uint4 rb =
            *reinterpret_cast<const uint4*>(k16 + row_b * D + fp8_chunk<D>(chunk, row_b) * 16);
        const u32 wa[4] = {ra.x, ra.y, ra.z, ra.w}, wb[4] = {rb.x, rb.y, rb.z, rb.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 a[4] = {e4m3x2_to_f16x2(wa[i] & 0xffffu), e4m3x2_to_f16x2(wb[i] & 0xffffu),
                              e4m3x2_to_f16x2(wa[i] >> 16), e4m3x2_to_f16x2(wb[i] >> 16)};
            mma_f16(st, a, qa[4 * h + i][0], qa[4 * h + i][1]);
        }
    }
    // Online softmax of heads 2c + j over these 16 keys: each of the 8 lanes of a c holds 2.
    const int key_a = first_key + row_a;
    if (key_a >= n_keys) st[0] = st[1] = NEG_INF;
    if (key_a + 8 >= n_keys) st[2] = st[3] = NEG_INF;
    float corr[2], p[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        float mx = fmaxf(st[j], st[2 + j]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m8[j], mx);
        const bool none = m_new == NEG_INF;
        corr[j] = none ? 1.0f : fast_exp2(m8[j] - m_new);
        m8[j] = m_new;
        p[j] = none ? 0.0f : fast_exp2(st[j] - m_new);
        p[2 + j] = none ? 0.0f : fast_exp2(st[2 + j] - m_new);
        l8[j] = l8[j] * corr[j] + (p[j] + p[2 + j]);
    }
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
        for (int q = 0; q < D / 16; ++q) {
            o8[q][0] *= corr[0];
            o8[q][1] *= corr[1];
            o8[q][2] *= corr[0];
            o8[q][3] *= corr[1];
        }
    }
    // O^T += V^T P^T. B = P^T: the scores' C fragment (row = key, columns = heads) is an
    // 8x8 matrix a half of keys, transposed in registers to B's (rows = keys by pairs,
    // column g = head g). A = V^T, 16 dims of one chunk a tile: `ldmatrix.trans` of the
    // codes as 16-bit pairs gives lane (g, c) codes (key 2c, dims 2g, 2g + 1) and (key
    // 2c + 1, the same dims); a byte permute makes dim 2g's pair of keys (row g) and dim
    // 2g + 1's (row g + 8).
    const u32 b0 = movmatrix_trans(pack_f16(p[0], p[1]));
    const u32 b1 = movmatrix_trans(pack_f16(p[2], p[3]));
    const int m = lane >> 3;
    const int row = ((m & 1) << 3) + (lane & 7);
#pragma unroll
    for (int q = 0; q < D / 32; ++q) {
        u32 v[4];
        ldmatrix_x4_trans(v, reinterpret_cast<const bf16*>(
                                 v16 + row * D + fp8_chunk<D>(2 * q + (m >> 1), row) * 16));
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            // v[2x]: keys 0-7 of chunk 2q + x; v[2x + 1]: keys 8-15.
            const u32 a[4] = {e4m3x2_to_f16x2(__byte_perm(v[2 * x], 0u, 0x2020u)),
                              e4m3x2_to_f16x2(__byte_perm(v[2 * x], 0u, 0x3131u)),
                              e4m3x2_to_f16x2(__byte_perm(v[2 * x + 1], 0u, 0x2020u)),
                              e4m3x2_to_f16x2(__byte_perm(v[2 * x + 1], 0u, 0x3131u))};
            mma_f16(o8[2 * q + x], a, b0, b1);
        }
    }
}

// One warp's share of a tile over an FP8 cache: keys 16w .. 16w + 15 of the tile whose first
// key is `first_key` (`fp8_keys16` over the warp's rows; the same addresses, the same bits).
template <int D>
__device__ __forceinline__ void fp8_tile(const fp8* k8, const fp8* v8, int first_key, int n_keys,
                                         const u32 (&qa)[D / 16][4], float (&o8)[D / 16][4],
                                         float (&m8)[2], float (&l8)[2]) {
    const int warp = threadIdx.x >> 5;
    fp8_keys16<D>(k8 + warp * 16 * D, v8 + warp * 16 * D, first_key + warp * 16, n_keys, qa, o8,
                  m8, l8);
}

// A warp's running sums over an FP8 cache (`fp8_tile`'s layout) into shared memory for the
// merge: O rows `s_o[(warp * DM_HEADS + head) * D ...]`, max and sum `s_m`, `s_l`.
template <int D>
__device__ __forceinline__ void fp8_warp_partials(const float (&o8)[D / 16][4], const float (&m8)[2],
                                                  float (&l8)[2], int nh, float* s_o, float* s_m,
                                                  float* s_l) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        l8[j] += __shfl_xor_sync(0xffffffffu, l8[j], 4);
        l8[j] += __shfl_xor_sync(0xffffffffu, l8[j], 8);
        l8[j] += __shfl_xor_sync(0xffffffffu, l8[j], 16);
        const int hd = 2 * c + j;
        if (hd >= nh) continue;
        float* row = s_o + (warp * DM_HEADS + hd) * D;
#pragma unroll
        for (int q = 0; q < D / 16; ++q) {
            row[16 * q + 2 * g] = o8[q][j];
            row[16 * q + 2 * g + 1] = o8[q][2 + j];
        }
        if (g == 0) {
            s_m[warp * DM_HEADS + hd] = m8[j];
            s_l[warp * DM_HEADS + hd] = l8[j];
        }
    }
}

// Merges the warps' partial sums in shared memory (max in base 2) and stores heads
// `th0 .. th0 + nh` (token x head rows) of the block's split.
template <int D>
__device__ __forceinline__ void merge_warps_store(const float* s_o, const float* s_m,
                                                  const float* s_l, int nh, bf16* out,
                                                  float* partial_acc, float* partial_ml,
                                                  long long th0, int split, int splits) {
    for (int idx = threadIdx.x; idx < nh * D; idx += DM_WARPS * 32) {
        const int g = idx / D, d = idx % D;
        float m_all = NEG_INF;
#pragma unroll
        for (int w = 0; w < DM_WARPS; ++w) m_all = fmaxf(m_all, s_m[w * DM_HEADS + g]);
        float l_all = 0.0f, sum = 0.0f;
#pragma unroll
        for (int w = 0; w < DM_WARPS; ++w) {
            const float l = s_l[w * DM_HEADS + g];
            const float wt = l > 0.0f ? fast_exp2(s_m[w * DM_HEADS + g] - m_all) : 0.0f;
            l_all += l * wt;
            sum += s_o[(w * DM_HEADS + g) * D + d] * wt;
        }
        // m_all is in base 2; `store_attention` takes natural-log units.
        store_attention(out, partial_acc, partial_ml, th0 + g, D, d, split, splits, sum,
                        m_all * 0.6931471805599453f, l_all);
    }
}
template <int D, typename C = bf16, bool WHOLE_TILES = false>
__device__ __forceinline__ void decode_mma(
    const float* __restrict__ qkv, const C* __restrict__ cache, const u32* __restrict__ positions,
    const u32* __restrict__ token_seq, const u32* __restrict__ seq_block_start,
    const u32* __restrict__ block_tables, bf16* __restrict__ out, float* __restrict__ partial_acc,
    float* __restrict__ partial_ml, int num_heads, int num_kv_heads, int block_size,
    long long block_elems, long long layer_offset, float scale) {
    // 16-byte chunks per key row of one head; the swizzle below needs at least 8.
    constexpr int CH = D / 8;
    static_assert(CH >= 8, "decode_mma needs head dims of 64 or more");
    constexpr int TILE = DM_KEYS * D;
    // [stage][K | V][key][D], each row's 16-byte chunks XOR-swizzled by (row % 8) so that the
    // eight rows an ldmatrix reads at one column fall in different banks.
    extern __shared__ __align__(128) unsigned char dm_smem[];
    constexpr bool FP8 = sizeof(C) == 1;
    constexpr int STAGES = FP8 ? DM_STAGES_FP8 : DM_STAGES;
    // bf16: the stages. FP8: the stages of codes.
    bf16* const smem = reinterpret_cast<bf16*>(dm_smem);
    fp8* const codes = reinterpret_cast<fp8*>(dm_smem);
    // FP8: a row of codes is CH8 chunks of 16 bytes, swizzled by `fp8_chunk`.
    constexpr int CH8 = D / 16;

    const int t = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = num_heads / num_kv_heads;
    const int chunks = (group + DM_HEADS - 1) / DM_HEADS;
    const int kvh = blockIdx.y / chunks;
    const int h0 = kvh * group + (blockIdx.y % chunks) * DM_HEADS;
    const int nh = min(DM_HEADS, kvh * group + group - h0);
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;
    const int n_keys = (int)positions[t] + 1;
    const int n_tiles = (n_keys + DM_KEYS - 1) / DM_KEYS;
    const int per_split = (n_tiles + splits - 1) / splits;
    const int tile_begin = min(n_tiles, split * per_split);
    const int tile_end = min(n_tiles, tile_begin + per_split);
    const u32* table = block_tables + seq_block_start[token_seq[t]];
    const C* head = cache + layer_offset + kvh * D;

    // WHOLE_TILES: the cache's blocks hold whole tiles (block sizes that are multiples of
    // DM_KEYS, the GPU default among them), so a tile's keys are consecutive rows of one block:
    // one table read and one division a tile, where each 16-byte copy looks its key's block up
    // (on an H200, half of the loop's instructions). Rows past the last key are still inside
    // the block. The kernels of both kinds are instantiated; the launch picks by block size.
    // `-D DM_WHOLE_TILES=0` gives those kernels the lookup per key (a test compares the two).
    // Tiles are loaded once each, in order, so the next one's block (its index in the table)
    // and its place in that block are stepped along: no division in the loop.
    constexpr bool tile_in_one_block = WHOLE_TILES && DM_WHOLE_TILES;
    const int tiles_per_block = tile_in_one_block ? block_size / DM_KEYS : 1;
    int load_block = tile_in_one_block ? tile_begin / tiles_per_block : 0;
    int load_sub = tile_begin - load_block * tiles_per_block;
    // The first row of the next tile to load, then a step to the one after.
    auto next_tile_rows = [&]() -> const C* {
        const C* rows = head + (long long)table[load_block] * block_elems +
                        (long long)(load_sub * DM_KEYS) * token_stride;
        if (++load_sub == tiles_per_block) {
            load_sub = 0;
            ++load_block;
        }
        return rows;
    };

    // Copies tile `tile`'s K and V rows into `stage`; keys past the end are zero-filled.
    auto load_tile = [&](int tile, int stage) {
        if constexpr (FP8) {
            fp8* ks = codes + stage * 2 * TILE;
            fp8* vs = ks + TILE;
            if constexpr (tile_in_one_block) {
                fp8_load_whole_tile<D>(ks, next_tile_rows(), tile * DM_KEYS, n_keys,
                                       token_stride, kv_stride);
                return;
            }
#pragma unroll
            for (int j = 0; j < DM_KEYS * CH8 / (DM_WARPS * 32); ++j) {
                const int i = threadIdx.x + j * DM_WARPS * 32;
                const int row = i / CH8, c = i % CH8;
                const int key = tile * DM_KEYS + row;
                const bool on = key < n_keys;
                const C* src = head;
                if (on)
                    src = head + (long long)table[key / block_size] * block_elems +
                          (long long)(key % block_size) * token_stride + c * 16;
                const int at = row * D + fp8_chunk<D>(c, row) * 16;
                cp_async16(ks + at, src, on ? 16 : 0);
                cp_async16(vs + at, on ? src + kv_stride : src, on ? 16 : 0);
            }
            return;
        }
        bf16* ks = smem + stage * 2 * TILE;
        bf16* vs = ks + TILE;
        if constexpr (tile_in_one_block) {
            const C* rows = next_tile_rows();
#pragma unroll
            for (int j = 0; j < DM_KEYS * CH / (DM_WARPS * 32); ++j) {
                const int i = threadIdx.x + j * DM_WARPS * 32;
                const int row = i / CH, c = i % CH;
                const bool on = tile * DM_KEYS + row < n_keys;
                const C* src = rows + row * token_stride + c * 8;
                const int at = row * D + ((c ^ (row & 7)) << 3);
                cp_async16(ks + at, reinterpret_cast<const bf16*>(src), on ? 16 : 0);
                cp_async16(vs + at, reinterpret_cast<const bf16*>(src + kv_stride), on ? 16 : 0);
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < DM_KEYS * CH / (DM_WARPS * 32); ++j) {
            const int i = threadIdx.x + j * DM_WARPS * 32;
            const int row = i / CH, c = i % CH;
            const int key = tile * DM_KEYS + row;
            const bool on = key < n_keys;
            const C* src = head;
            if (on)
                src = head + (long long)table[key / block_size] * block_elems +
                      (long long)(key % block_size) * token_stride + c * 8;
            const int at = row * D + ((c ^ (row & 7)) << 3);
            cp_async16(ks + at, reinterpret_cast<const bf16*>(src), on ? 16 : 0);
            cp_async16(vs + at, reinterpret_cast<const bf16*>(on ? src + kv_stride : src),
                       on ? 16 : 0);
        }
    };

    // The products' input type: f16 over an FP8 cache (above), else bf16.
    auto pack2 = [](float lo, float hi) -> u32 { return FP8 ? pack_f16(lo, hi) : pack_bf16(lo, hi); };
    auto mma = [](float* acc, const u32* a, u32 b0, u32 b1) {
        if constexpr (FP8) mma_f16(acc, a, b0, b1);
        else mma_bf16(acc, a, b0, b1);
    };

    // This lane's rows of the A tile: row r = query head h0 + r (rows r + 8 are zero), columns
    // 2(lane % 4) and + 8 of each 16-dim step, pre-scaled by scale * log2(e): the softmax below
    // is in base 2. With DM_Q_SPLIT the query is two bf16 tiles, its rounding and what the
    // rounding left (hi + lo carries 16 bits of mantissa), multiplied by K separately: a bf16
    // query alone errs by up to 2^-9 of each score. Over an FP8 cache the same registers
    // (`qa[k][0]`, `qa[k][1]`) are the B fragment of S^T: column r = head h0 + r.
    const int r = lane >> 2, c2 = (lane & 3) * 2;
    u32 qa[D / 16][4];
    {
        const float qs = scale * 1.4426950408889634f;
        const float* qp = qkv + (long long)t * width + (long long)(h0 + r) * D + c2;
        // (An f16 query, FP8, has no low part: f16 carries 11 bits.)
        auto split = [&](float a, float b, u32& hi, u32& lo) {
            hi = pack_bf16(a, b);
            lo = pack_bf16(a - __uint_as_float(hi << 16), b - __uint_as_float(hi & 0xffff0000u));
        };
        if constexpr (FP8) {
            fp8_query<D>(qkv + (long long)t * width + (long long)h0 * D, nh, qs, qa);
        } else {
#pragma unroll
            for (int k = 0; k < D / 16; ++k) {
                if (r >= nh) {
                    qa[k][0] = qa[k][1] = qa[k][2] = qa[k][3] = 0u;
                } else {
                    split(qp[k * 16] * qs, qp[k * 16 + 1] * qs, qa[k][0], qa[k][2]);
                    split(qp[k * 16 + 8] * qs, qp[k * 16 + 9] * qs, qa[k][1], qa[k][3]);
                }
            }
        }
    }

    // O for rows r (elements 0, 1 of each 8-dim tile) and r + 8 (2, 3: padding, stays zero).
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Row r's running max (base 2) and this lane's share of its sum.
    float m_run = NEG_INF, l_run = 0.0f;

    // Over an FP8 cache the warp's keys are the mma's rows instead: S^T = K Q^T and
    // O^T = V^T P^T, the group's query heads the 8 columns (`fp8_tile`). The query-rows form
    // above fills 8 of its 16 rows (4 for groups of 4), so this runs half its products into
    // half its accumulators.
    float o8[FP8 ? D / 16 : 1][4];
#pragma unroll
    for (int q = 0; q < (FP8 ? D / 16 : 1); ++q) o8[q][0] = o8[q][1] = o8[q][2] = o8[q][3] = 0.0f;
    float m8[2] = {NEG_INF, NEG_INF}, l8[2] = {0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (tile_begin + s < tile_end) load_tile(tile_begin + s, s);
        cp_async_commit();
    }
    for (int tile = tile_begin, it = 0; tile < tile_end; ++tile, ++it) {
        cp_async_wait<STAGES - 2>();
        // This tile is in, and every warp is done with the stage the next copy overwrites.
        __syncthreads();
        if (tile + STAGES - 1 < tile_end)
            load_tile(tile + STAGES - 1, (it + STAGES - 1) % STAGES);
        cp_async_commit();
        const bf16* ks = smem + (it % STAGES) * 2 * TILE;
        const bf16* vs = ks + TILE;
        const fp8* k8 = codes + (it % STAGES) * 2 * TILE;
        const fp8* v8 = k8 + TILE;

        if constexpr (FP8) {
            fp8_tile<D>(k8, v8, tile * DM_KEYS, n_keys, qa, o8, m8, l8);
            continue;
        }
        // S = Q K^T for this warp's keys 16w .. 16w + 15: two n-tiles of 8 keys; one ldmatrix
        // gives both tiles' B fragments for 16 dims.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        {
            const int row = warp * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int half = (lane >> 3) & 1;
#pragma unroll
            for (int k = 0; k < D / 16; ++k) {
                u32 b[4];
                ldmatrix_x4(b, ks + row * D + (((2 * k + half) ^ (row & 7)) << 3));
                const u32 hi[4] = {qa[k][0], 0u, qa[k][1], 0u};
                const u32 lo[4] = {qa[k][2], 0u, qa[k][3], 0u};
                mma(s[0], hi, b[0], b[1]);
                mma(s[1], hi, b[2], b[3]);
                if (DM_Q_SPLIT && !FP8) {
                    mma(s[0], lo, b[0], b[1]);
                    mma(s[1], lo, b[2], b[3]);
                }
            }
        }

        // Online softmax of row r over these 16 keys (the four lanes of a row hold 4 each).
        const int key0 = tile * DM_KEYS + warp * 16 + c2;
        float mx = NEG_INF;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                if (key0 + n * 8 + e >= n_keys) s[n][e] = NEG_INF;
                mx = fmaxf(mx, s[n][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run, mx);
        // All of this warp's keys so far past the end: nothing to add, nothing to rescale
        // (and -inf - -inf would be NaN).
        const bool none = m_new == NEG_INF;
        const float corr = none ? 1.0f : fast_exp2(m_run - m_new);
        m_run = m_new;
        float p[2][2];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) p[n][e] = none ? 0.0f : fast_exp2(s[n][e] - m_new);
        }
        l_run = l_run * corr + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
        // Past the first tiles a row's max rarely moves: the rescale (a multiply by exactly 1
        // where it did not) is skipped unless some row of the warp needs it.
        if (__any_sync(0xffffffffu, corr != 1.0f)) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][0] *= corr;
                o[n][1] *= corr;
            }
        }

        // O += P V: P's C layout is the A fragment of the next product (keys 0-7 from the first
        // n-tile, 8-15 from the second); V's rows are the same 16 keys, read transposed.
        const u32 pa[4] = {pack2(p[0][0], p[0][1]), 0u, pack2(p[1][0], p[1][1]), 0u};
        {
            const int row = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
            const int half = lane >> 4;
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                u32 b[4];
                ldmatrix_x4_trans(b, vs + row * D + (((2 * n + half) ^ (row & 7)) << 3));
                mma(o[2 * n], pa, b[0], b[1]);
                mma(o[2 * n + 1], pa, b[2], b[3]);
            }
        }
    }

    // Merge the four warps through shared memory (the stages are idle now).
    cp_async_wait<0>();
    __syncthreads();
    float* s_o = reinterpret_cast<float*>(dm_smem);  // [warp][head][D]
    float* s_m = s_o + DM_WARPS * DM_HEADS * D;       // [warp][head]
    float* s_l = s_m + DM_WARPS * DM_HEADS;
    if constexpr (FP8) {
        fp8_warp_partials<D>(o8, m8, l8, nh, s_o, s_m, s_l);
    } else {
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
        l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
        if (r < nh) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                s_o[(warp * DM_HEADS + r) * D + n * 8 + c2] = o[n][0];
                s_o[(warp * DM_HEADS + r) * D + n * 8 + c2 + 1] = o[n][1];
            }
            if ((lane & 3) == 0) {
                s_m[warp * DM_HEADS + r] = m_run;
                s_l[warp * DM_HEADS + r] = l_run;
            }
        }
    }
    __syncthreads();
    merge_warps_store<D>(s_o, s_m, s_l, nh, out, partial_acc, partial_ml,
                         (long long)t * num_heads + h0, split, splits);
}

// `paged_decode_mma[_fp8]_d*` read caches of any block size; `..._tiles_d*` only those whose
// blocks hold whole tiles.
#define DECODE_MMA_KERNEL(D)                                                                      \
    DECODE_ATTENTION_KERNEL(paged_decode_mma_d, DM_WARPS * 32, decode_mma, D)                     \
    DECODE_ATTENTION_KERNEL_OF(paged_decode_mma_tiles_d##D, DM_WARPS * 32,                        \
                               (decode_mma<D, bf16, true>), bf16)

DECODE_MMA_KERNEL(64)
DECODE_MMA_KERNEL(128)

#define DECODE_MMA_FP8_KERNEL(D)                                                                  \
    DECODE_ATTENTION_KERNEL_OF(paged_decode_mma_fp8_d##D, DM_WARPS * 32, (decode_mma<D, fp8>), fp8) \
    DECODE_ATTENTION_KERNEL_OF(paged_decode_mma_fp8_tiles_d##D, DM_WARPS * 32,                    \
                               (decode_mma<D, fp8, true>), fp8)

DECODE_MMA_FP8_KERNEL(64)
DECODE_MMA_FP8_KERNEL(128)
