// Decode attention over an FP8 cache by persistent blocks: the arithmetic of
// `paged_decode_mma_fp8_tiles_d*` (decode_mma.cu), but a block walks many (token, KV head,
// head chunk) items, so that its ring of copies runs on from one item's tiles into the next.
// By default persistent warps (`decode_mma_warps.cu`) run in its place; this kernel runs with
// `TANDEM_DECODE_WARPS=0`, and is the one whose bits equal the per-item kernel's.
//
// Why: a block of the per-item kernel spends about as long on the fixed part of its item as
// on its keys at short contexts: the chain of index reads before its first copy (the token's
// sequence, that sequence's block table, the table's entry), the first tiles' latency with
// nothing else in flight, the query's load, the merge of its warps and the store. At the
// contexts of a 128/128 server (~200 keys, three tiles) that held an H200 to ~1.9 TB/s of
// codes, against ~3.5 at 1,500 keys. Here the copies of the next item's first tiles are in
// flight while this item's last tiles are multiplied and its warps merged, and the query
// comes into shared memory by the same copies as its item's first tile.
//
// Grid (blocks, 1, 1), as many as the multiprocessors hold at once (the launch sizes it);
// block b takes items b, b + blocks, ... of the `rows` x (KV heads x head chunks) items, row
// major. No split of the context: the launch runs this kernel only where a token's keys are
// not split, so each item's output is final (bf16, normalized). Every item's tiles run through
// `fp8_tile` and `merge_warps_store` in the order the per-item kernel runs them: the same bits.
//
// Shared memory: DM_STAGES_FP8 stages of a K and a V tile of codes, then a query slot a stage
// (`qh` = min(group, DM_HEADS) heads of D floats: a stage holding an item's first tile holds
// its query too). The warps' merge uses the stage of the item's last tile, which no copy
// writes until the next iteration's barrier.

// What the copies into a stage hold, for the iteration that multiplies it.
struct PersistentTile {
    int t;       // token row
    int h0;      // first query head
    int nh;      // query heads (of the chunk)
    int n_keys;  // the token's keys; 0: no tile (the block's items are done)
    int tile;    // tile of the token's keys
};

template <int D>
__device__ __forceinline__ void decode_mma_fp8_persistent(
    const float* __restrict__ qkv, const fp8* __restrict__ cache,
    const u32* __restrict__ positions, const u32* __restrict__ token_seq,
    const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,
    bf16* __restrict__ out, int num_heads, int num_kv_heads, int block_size,
    long long block_elems, long long layer_offset, float scale, int rows) {
    constexpr int TILE = DM_KEYS * D;
    constexpr int STAGES = DM_STAGES_FP8;
    extern __shared__ __align__(128) unsigned char dm_smem[];
    __shared__ PersistentTile stage_tile[STAGES];
    __shared__ float s_m[DM_WARPS * DM_HEADS], s_l[DM_WARPS * DM_HEADS];
    fp8* const codes = reinterpret_cast<fp8*>(dm_smem);

    const int group = num_heads / num_kv_heads;
    const int chunks = (group + DM_HEADS - 1) / DM_HEADS;
    const int head_blocks = num_kv_heads * chunks;
    const int qh = min(group, DM_HEADS);
    float* const q_slots = reinterpret_cast<float*>(dm_smem + STAGES * 2 * TILE);
    const int items = rows * head_blocks;
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;
    const int tiles_per_block = block_size / DM_KEYS;

    // This thread's copies of a tile: rows c_row + p * ROWS_PER_PASS, 16-byte chunk c_chunk of
    // each. The swizzle of a row's chunks repeats every ROWS_PER_PASS rows, so a pass's
    // source and stage offsets are the first pass's plus a multiple of constants.
    constexpr int CH8 = D / 16;
    constexpr int ROWS_PER_PASS = DM_WARPS * 32 / CH8;
    static_assert(DM_KEYS % ROWS_PER_PASS == 0 && ROWS_PER_PASS % (128 / D * (D / 16)) == 0,
                  "a pass keeps the rows' swizzle");
    const int c_row = threadIdx.x / CH8, c_chunk = threadIdx.x % CH8;
    const int c_src = c_row * token_stride + c_chunk * 16;
    const int c_at = c_row * D + fp8_chunk<D>(c_chunk, c_row) * 16;
    const int pass_src = ROWS_PER_PASS * token_stride;

    // The copies' place: item, its tile, and where that tile's rows are (the same in every
    // thread). The item's token and head block follow from the last item's by the grid's
    // stride, without a division an item.
    int l_item = blockIdx.x;
    int l_t = blockIdx.x / head_blocks, l_hb = blockIdx.x % head_blocks;
    const int step_t = gridDim.x / head_blocks, step_hb = gridDim.x % head_blocks;
    int l_h0 = 0, l_nh = 0, l_keys = 0, l_tiles = 0, l_tile = 0, l_block = 0, l_sub = 0;
    const u32* l_table = block_tables;
    const fp8* l_head = cache;
    auto start_item = [&]() {
        if (l_item >= items) return;
        const int kvh = chunks == 1 ? l_hb : l_hb / chunks;
        l_h0 = kvh * group + (chunks == 1 ? 0 : l_hb % chunks) * DM_HEADS;
        l_nh = min(DM_HEADS, kvh * group + group - l_h0);
        l_keys = (int)positions[l_t] + 1;
        l_tiles = (l_keys + DM_KEYS - 1) / DM_KEYS;
        l_table = block_tables + seq_block_start[token_seq[l_t]];
        l_head = cache + layer_offset + kvh * D;
        l_tile = l_block = l_sub = 0;
    };
    // Copies the next tile (and, with an item's first, its query) into `stage`.
    auto load_next = [&](int stage) {
        if (l_item >= items) {
            if (threadIdx.x == 0) stage_tile[stage].n_keys = 0;
            return;
        }
        if (threadIdx.x == 0) stage_tile[stage] = PersistentTile{l_t, l_h0, l_nh, l_keys, l_tile};
        if (l_tile == 0) {
            // The chunk's query heads are consecutive: one run of nh * D floats.
            const float* src = qkv + (long long)l_t * width + (long long)l_h0 * D;
            float* dst = q_slots + stage * qh * D;
            for (int i = threadIdx.x; i < l_nh * D / 4; i += DM_WARPS * 32)
                cp_async16(reinterpret_cast<bf16*>(dst + 4 * i),
                           reinterpret_cast<const bf16*>(src + 4 * i), 16);
        }
        // `fp8_load_whole_tile`'s copies, by this thread's offsets.
        const fp8* src = l_head + (long long)l_table[l_block] * block_elems +
                         (l_sub * DM_KEYS * token_stride + c_src);
        fp8* dst = codes + stage * 2 * TILE + c_at;
        const int past = l_keys - l_tile * DM_KEYS - c_row;
#pragma unroll
        for (int p = 0; p < DM_KEYS / ROWS_PER_PASS; ++p) {
            const int bytes = p * ROWS_PER_PASS < past ? 16 : 0;
            cp_async16(dst + p * ROWS_PER_PASS * D, src + p * pass_src, bytes);
            cp_async16(dst + TILE + p * ROWS_PER_PASS * D, src + p * pass_src + kv_stride, bytes);
        }
        if (++l_sub == tiles_per_block) {
            l_sub = 0;
            ++l_block;
        }
        if (++l_tile == l_tiles) {
            l_item += gridDim.x;
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
    u32 qa[D / 16][4];
    float o8[D / 16][4];
    float m8[2], l8[2];
    for (int it = 0;; ++it) {
        const int stage = it % STAGES;
        cp_async_wait<STAGES - 2>();
        // This stage is in, and every warp is done with the stage the next copy overwrites.
        __syncthreads();
        const PersistentTile tile = stage_tile[stage];
        if (tile.n_keys == 0) break;
        load_next((it + STAGES - 1) % STAGES);
        cp_async_commit();
        const fp8* k8 = codes + stage * 2 * TILE;
        if (tile.tile == 0) {
            fp8_query<D>(q_slots + stage * qh * D, tile.nh, qs, qa);
#pragma unroll
            for (int q = 0; q < D / 16; ++q) o8[q][0] = o8[q][1] = o8[q][2] = o8[q][3] = 0.0f;
            m8[0] = m8[1] = NEG_INF;
            l8[0] = l8[1] = 0.0f;
        }
        fp8_tile<D>(k8, k8 + TILE, tile.tile * DM_KEYS, tile.n_keys, qa, o8, m8, l8);
        if ((tile.tile + 1) * DM_KEYS < tile.n_keys) continue;
        // The item's last tile: merge its warps in this stage's codes, once all have read them.
        __syncthreads();
        float* s_o = reinterpret_cast<float*>(codes + stage * 2 * TILE);
        fp8_warp_partials<D>(o8, m8, l8, tile.nh, s_o, s_m, s_l);
        __syncthreads();
        merge_warps_store<D>(s_o, s_m, s_l, tile.nh, out, nullptr, nullptr,
                             (long long)tile.t * num_heads + tile.h0, 0, 1);
    }
    cp_async_wait<0>();
}

// `paged_decode_mma_fp8_persistent_d*`: the decode kernels' arguments, then the token rows.
#define DECODE_MMA_FP8_PERSISTENT_KERNEL(D)                                                       \
    extern "C" __global__ void __launch_bounds__(DM_WARPS * 32)                                   \
        paged_decode_mma_fp8_persistent_d##D(                                                     \
            const float* __restrict__ qkv, const fp8* __restrict__ cache,                         \
            const u32* __restrict__ positions, const u32* __restrict__ token_seq,                 \
            const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,        \
            bf16* __restrict__ out, float* __restrict__ partial_acc,                              \
            float* __restrict__ partial_ml, int num_heads, int num_kv_heads, int block_size,      \
            long long block_elems, long long layer_offset, float scale, const char* prefetch,    \
            long long prefetch_bytes, int rows) {                                                 \
        prefetch_l2(prefetch, prefetch_bytes);                                                    \
        decode_mma_fp8_persistent<D>(qkv, cache, positions, token_seq, seq_block_start,           \
                                     block_tables, out, num_heads, num_kv_heads, block_size,      \
                                     block_elems, layer_offset, scale, rows);                     \
    }

DECODE_MMA_FP8_PERSISTENT_KERNEL(64)
DECODE_MMA_FP8_PERSISTENT_KERNEL(128)
