// Decode attention over an FP8 cache by persistent warps: each warp walks (token, KV head,
// head chunk) items alone, 16 keys at a time (`fp8_keys16`, the arithmetic of a warp's share
// of a tile in the per-block kernels), through a ring of DW_STAGES chunks of its own copies.
//
// Why: a block of the per-item kernel (`decode_mma.cu`) spends about as long on the fixed
// part of its item as on its keys at the short contexts of a 128/128 server (~200 keys): the
// chain of index reads before its first copy, the first tiles' latency with nothing else in
// flight, and the merge of its four warps. Blocks that walk many items (measured first) still
// held their four warps together: each 64-key tile behind a block barrier, a token's last tile
// leaving the warps past its end idle, and each item ending in a merge through shared memory.
// Here a warp waits only on its own copies (`__syncwarp`), an item's last chunk leaves at most
// 15 keys unused, there is no merge (the warp's sums are the item's), and the copies of the
// warp's next item run while it multiplies the last chunks of this one.
//
// Grid (blocks, 1, 1) of DM_WARPS warps, as many blocks as the multiprocessors hold (the
// launch sizes it); global warp w takes items w, w + warps, ... of the `rows` x (KV heads x
// head chunks) items, row major. No split of the context (each item's output is final, bf16,
// normalized). The sums run in another order than the per-block kernels' (one chain of 16-key
// steps where those merge four), so the outputs are close to theirs, not the same bits.
//
// Shared memory: a warp's DW_STAGES stages of a K and a V chunk of 16 rows of codes (swizzled
// by `fp8_chunk` as a tile's rows are). The query comes from global memory into registers at
// an item's first chunk, while the copies of its next chunks are in flight.

#ifndef DW_STAGES
#define DW_STAGES 3
#endif

// What the copies into a warp's stage hold, for the iteration that multiplies it.
struct WarpChunk {
    int t;          // token row
    int h0;         // first query head
    int nh;         // query heads (of the chunk)
    int n_keys;     // the token's keys; 0: no chunk (the warp's items are done)
    int first_key;  // the chunk's first key
};

template <int D>
__device__ __forceinline__ void decode_mma_fp8_warps(
    const float* __restrict__ qkv, const fp8* __restrict__ cache,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,
    bf16* __restrict__ out, int num_heads, int num_kv_heads, int block_size,
    long long block_elems, long long layer_offset, float scale, int rows) {
    constexpr int CHUNK = 16 * D;  // a 16-key chunk's K (or V) codes
    constexpr int STAGES = DW_STAGES;
    extern __shared__ __align__(128) unsigned char dm_smem[];
    __shared__ WarpChunk stage_chunk[DM_WARPS][STAGES];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    fp8* const codes = reinterpret_cast<fp8*>(dm_smem) + warp * STAGES * 2 * CHUNK;
    WarpChunk* const meta = stage_chunk[warp];

    const int group = num_heads / num_kv_heads;
    const int chunks = (group + DM_HEADS - 1) / DM_HEADS;
    const int head_blocks = num_kv_heads * chunks;
    const int items = rows * head_blocks;
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;
    const int chunks_per_block = block_size / 16;

    // This lane's copies of a chunk: rows c_row + p * ROWS_PER_PASS, 16-byte piece c_piece of
    // each (a row is CH8 pieces). The swizzle depends on the row, so each pass's stage offset
    // is its own (constants of the lane, kept in registers).
    constexpr int CH8 = D / 16;
    constexpr int ROWS_PER_PASS = 32 / CH8;
    constexpr int PASSES = 16 / ROWS_PER_PASS;
    const int c_row = lane / CH8, c_piece = lane % CH8;
    const int c_src = c_row * token_stride + c_piece * 16;
    int c_at[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        const int row = c_row + p * ROWS_PER_PASS;
        c_at[p] = row * D + fp8_chunk<D>(c_piece, row) * 16;
    }
    const int pass_src = ROWS_PER_PASS * token_stride;

    // The copies' place: item, its chunk, and where that chunk's rows are. The item's token
    // and head block follow from the last item's by the warps' stride, without a division.
    const int warps = gridDim.x * DM_WARPS;
    const int first = blockIdx.x * DM_WARPS + warp;
    int l_item = first;
    int l_t = first / head_blocks, l_hb = first % head_blocks;
    const int step_t = warps / head_blocks, step_hb = warps % head_blocks;
    int l_h0 = 0, l_nh = 0, l_keys = 0, l_key = 0, l_block = 0, l_sub = 0;
    const u32* l_table = block_tables;
    const fp8* l_head = cache;
    auto start_item = [&]() {
        if (l_item >= items) return;
        const int kvh = chunks == 1 ? l_hb : l_hb / chunks;
        l_h0 = kvh * group + (chunks == 1 ? 0 : l_hb % chunks) * DM_HEADS;
        l_nh = min(DM_HEADS, kvh * group + group - l_h0);
        l_keys = (int)positions[l_t] + 1;
        l_table = block_tables + seq_block_start[token_seq[l_t]];
        l_head = cache + layer_offset + kvh * D;
        l_key = l_block = l_sub = 0;
    };
    // Copies the next chunk into `stage`.
    auto load_next = [&](int stage) {
        if (l_item >= items) {
            if (lane == 0) meta[stage].n_keys = 0;
            return;
        }
        if (lane == 0) meta[stage] = WarpChunk{l_t, l_h0, l_nh, l_keys, l_key};
        const fp8* src = l_head + (long long)l_table[l_block] * block_elems +
                         (l_sub * 16 * token_stride + c_src);
        fp8* dst = codes + stage * 2 * CHUNK;
        const int past = l_keys - l_key - c_row;
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int bytes = p * ROWS_PER_PASS < past ? 16 : 0;
            cp_async16(dst + c_at[p], src + p * pass_src, bytes);
            cp_async16(dst + CHUNK + c_at[p], src + p * pass_src + kv_stride, bytes);
        }
        if (++l_sub == chunks_per_block) {
            l_sub = 0;
            ++l_block;
        }
        l_key += 16;
        if (l_key >= l_keys) {
            l_item += warps;
            l_t += step_t;
            l_hb += step_hb;
            if (l_hb >= head_blocks) {
                l_hb -= head_blocks;
                ++l_t;
            }
            start_item();
        }
    };

    start_item();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        load_next(s);
        cp_async_commit();
    }
    const float qs = scale * 1.4426950408889634f;
    const int g = lane >> 2, c = lane & 3;
    u32 qa[D / 16][4];
    float o8[D / 16][4];
    float m8[2], l8[2];
    for (int it = 0;; ++it) {
        const int stage = it % STAGES;
        cp_async_wait<STAGES - 2>();
        // This stage is in (every lane's copies), and every lane is done with the stage the
        // next copy overwrites.
        __syncwarp();
        const WarpChunk chunk = meta[stage];
        if (chunk.n_keys == 0) break;
        load_next((it + STAGES - 1) % STAGES);
        cp_async_commit();
        if (chunk.first_key == 0) {
            fp8_query<D>(qkv + (long long)chunk.t * width + (long long)chunk.h0 * D, chunk.nh, qs,
                         qa);
#pragma unroll
            for (int q = 0; q < D / 16; ++q) o8[q][0] = o8[q][1] = o8[q][2] = o8[q][3] = 0.0f;
            m8[0] = m8[1] = NEG_INF;
            l8[0] = l8[1] = 0.0f;
        }
        const fp8* k16 = codes + stage * 2 * CHUNK;
        fp8_keys16<D>(k16, k16 + CHUNK, chunk.first_key, chunk.n_keys, qa, o8, m8, l8);
        if (chunk.first_key + 16 < chunk.n_keys) continue;
        // The item's last chunk: its sums are the item's. Lane (g, c) holds heads 2c + j at
        // dims 16q + 2g and + 1; the softmax's sum is spread over the eight lanes of a c.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float l = l8[j];
            l += __shfl_xor_sync(0xffffffffu, l, 4);
            l += __shfl_xor_sync(0xffffffffu, l, 8);
            l += __shfl_xor_sync(0xffffffffu, l, 16);
            const int hd = 2 * c + j;
            if (hd >= chunk.nh) continue;
            bf16* row = out + ((long long)chunk.t * num_heads + chunk.h0 + hd) * D;
#pragma unroll
            for (int q = 0; q < D / 16; ++q)
                *reinterpret_cast<u32*>(row + 16 * q + 2 * g) =
                    (u32)f32_to_bf16(o8[q][j] / l) | ((u32)f32_to_bf16(o8[q][2 + j] / l) << 16);
        }
    }
    cp_async_wait<0>();
}

// `paged_decode_mma_fp8_warps_d*`: the decode kernels' arguments, then the token rows.
#define DECODE_MMA_FP8_WARPS_KERNEL(D)                                                            \
    extern "C" __global__ void __launch_bounds__(DM_WARPS * 32)                                   \
        paged_decode_mma_fp8_warps_d##D(                                                          \
            const float* __restrict__ qkv, const fp8* __restrict__ cache,                         \
            const u32* __restrict__ positions, const u32* __restrict__ token_seq,                 \
            const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,        \
            bf16* __restrict__ out, float* __restrict__ partial_acc,                              \
            float* __restrict__ partial_ml, int num_heads, int num_kv_heads, int block_size,      \
            long long block_elems, long long layer_offset, float scale, const char* prefetch,    \
            long long prefetch_bytes, int rows) {                                                 \
        pdl_enter();                                                                              \
        prefetch_l2(prefetch, prefetch_bytes);                                                    \
        decode_mma_fp8_warps<D>(qkv, cache, positions, token_seq, seq_block_start, block_tables, \
                                out, num_heads, num_kv_heads, block_size, block_elems,            \
                                layer_offset, scale, rows);                                       \
    }

DECODE_MMA_FP8_WARPS_KERNEL(64)
DECODE_MMA_FP8_WARPS_KERNEL(128)
