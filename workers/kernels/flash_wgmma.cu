// Prefill attention on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a), head
// dimension 128: the same contract as flash.cu's flash_prefill (arguments, 128-row tiles of
// one sequence, causal over the paged cache, the online softmax with its lazy rescale), plus
// the cache's TMA tensor map. FlashAttention-3's structure, written for tandem's paged cache.
//
// Why: flash.cu's mma.sync kernel tops out at ~240 TFLOP/s at 8k tokens on the H100; this one
// reached ~490 with 64-token cache blocks, ~360 with 16-token ones (docs/benchmarks.md),
// and ~605 with 128-key tiles and the longest tiles first (0.909 ms
// at 8192 tokens, torch SDPA 0.905 in the same call). What mattered, each measured on the H100:
// - wgmma reads its B operand straight out of shared memory and runs asynchronously: each
//   warpgroup issues S_j = Q K_j and O += P_{j-1} V_{j-1} together and takes the softmax of S_j
//   while the tensor cores run the second;
// - the copies were the bottleneck (with them left out, 527 TFLOP/s): a producer warpgroup does
//   them all, one thread issuing TMA boxes, so the consumers' instruction streams hold only the
//   products and the softmax; an mbarrier per stage says "landed" (the TMA's byte count) and
//   another "consumed", so the two consumer warpgroups never wait for each other;
// - a TMA box is one cache block of one head (a sequence's blocks are not contiguous): with
//   16-token blocks a tile took 16 boxes and the copies still bounded the kernel, so GPU
//   workers default to 64-token blocks.
//
// A block is one query head and 128 query rows: consumer warpgroups 0 and 1 (64 rows each) and
// producer warpgroup 2. Keys and values stream through WG_STAGES shared-memory stages of
// WG_KEYS keys, each K or V tile stored as two halves of 64 dimensions: WG_KEYS rows of 128
// bytes in the 128-byte swizzle (the 16-byte chunk c of row r at chunk c ^ (r % 8)), which is
// both what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and what wgmma reads, so
// - K is the B operand of S = Q Kᵀ as is ("K-major": the reduced dimension, d, contiguous);
// - V is the B operand of O += P V transposed ("MN-major": d contiguous, keys the reduced one).
// Q (scaled by softmax_scale * log2 e) and P (bf16 of the exponentiated scores) are A operands
// in registers; a wgmma accumulator's layout is the A layout of the next product, so P is built
// from S in place, as in flash.cu. Without a tensor map (a block size TMA boxes do not fit),
// the producer's 128 threads copy by cp.async instead (~25% slower).
//
// Register fragments (PTX ISA, wgmma .m64nNk16): warp w of the warpgroup holds rows 16w..16w+15;
// g = lane / 4, c = lane % 4;
//   A (64 x 16): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   D (64 x N):  d[4j + 0/1] = (g, 8j + 2c + 0/1), d[4j + 2/3] = (g + 8, 8j + 2c + 0/1)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Keys per tile: 64 (S is 64 x 64: 32 registers a thread) or 128 (64 registers; H100, session
// 20, with three stages: 0.960 ms at 8192 tokens against 1.056 with 64 keys and four stages).
#ifndef WG_KEYS
#define WG_KEYS 128
#endif
// 1: O += P V as two 64-dimension halves (m64n64k16), 0: one m64n128k16.
#ifndef WG_PV_SPLIT
#define WG_PV_SPLIT 0
#endif
// 1: the two consumer warpgroups take turns issuing their products (named barriers), so one's
// softmax runs while the other's products run (FlashAttention-3's ping-pong); 0: each issues
// when ready.
#ifndef WG_PINGPONG
#define WG_PINGPONG 1
#endif
// 1: P is packed to bf16 once O += P_{j-1} V_{j-1} has finished, straight into the registers
// that product read, so the scores (f32) and two P's are never live at once (H100,
// 128-key tiles: 0.965 ms at 8192 tokens against 1.000). 0: packed as soon as the softmax
// ends, beside the running product.
#ifndef WG_LATE_PACK
#define WG_LATE_PACK 1
#endif
// 1: a block per multiprocessor walks the work items (see item_of); 0: a block per item (H100,
// one layer of Llama-3.1-8B: 0.885 ms at 8192 tokens against 0.909, and 0.083 ms
// at 2048 against 0.088; torch's SDPA in the same call 0.896 and 0.099).
#ifndef WG_PERSISTENT
#define WG_PERSISTENT 1
#endif
// Shared-memory stages: the producer runs up to WG_STAGES tiles ahead of the slower consumer.
// 128-key stages are 64 KiB: three fit the 227 KiB of shared memory a block may have (two
// left the consumers waiting for every tile's copy: 1.47 ms at 8192 tokens).
#ifndef WG_STAGES
#define WG_STAGES (WG_KEYS == 128 ? 3 : 4)
#endif

#define WG_HALF_BYTES (WG_KEYS * 128)
#define WG_TILE_BYTES (2 * WG_HALF_BYTES)
#define WG_STAGE_BYTES (2 * WG_TILE_BYTES)

// D (64 x 64 f32: 32 registers a thread) += A (64 x 16 bf16, registers) * B (16 x 64 bf16 in
// shared memory, described by `desc`); `scale_d` 0 overwrites D instead. TRANS_B 1: B is
// MN-major (its N dimension contiguous).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16(float* d, const u32* a, u64 desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TRANS_B));
}

// D (64 x 128 f32: 64 registers a thread) += A (64 x 16 bf16, registers) * B (16 x 128 bf16 in
// shared memory, described by `desc`); `scale_d` 0 overwrites D instead. TRANS_B 1: B is
// MN-major (its N dimension contiguous).
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float* d, const u32* a, u64 desc, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
          "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
          "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
          "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
          "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TRANS_B));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across the asynchronous
// wgmma that owns it (the asm statements above do not name every register they touch late).
__device__ __forceinline__ void wgmma_hold(float& x) { asm volatile("" : "+f"(x)::"memory"); }
// Shared memory written by cp.async (the generic proxy) becomes visible to wgmma (the async
// proxy).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle: the start address, the
// leading- and stride-dimension byte offsets (PTX ISA, "Matrix Descriptor Format").
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// mbarriers in shared memory (PTX ISA, "mbarrier"): the warp-specialized loop's hand-offs.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// One arrival, once every cp.async this thread issued before has landed.
__device__ __forceinline__ void mbar_arrive_cp_async(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// One box of the KV cache's tensor map (the cache as [blocks][K/V of each layer][tokens][KV
// heads][dimensions], innermost last; a box is 64 dimensions of one head for every token of one
// block) into shared memory at `dst`, in the 128-byte swizzle, counted against `bar`'s
// transaction bytes. Coordinates innermost first; a block past the cache's last is zero fill.
__device__ __forceinline__ void tma_kv_box(u32 dst, const unsigned char* map, int d0, int head,
                                           int kv_layer, int block, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(dst),
        "l"(map), "r"(d0), "r"(head), "r"(0), "r"(kv_layer), "r"(block), "r"(bar)
        : "memory");
}

// Named barriers (0 is __syncthreads): warpgroup w waits on 1 + w for its turn to issue, and
// hands the turn over by arriving on the other's. 256 threads: its own 128 and the other's.
__device__ __forceinline__ void turn_wait(int wg) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
}
__device__ __forceinline__ void turn_pass(int wg) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg) : "memory");
}

// Threads of a block: two consumer warpgroups and a producer warpgroup that does every copy (WgmmaFlashConfig::threads in kernels.rs). The block starts with 168
// registers a thread (65536 / 384, per scheduler); the producer gives most of its back and the
// consumers take them (setmaxnreg), as FlashAttention-3 does: 24 and 240 (H100:
// 1.109 ms at 8192 tokens and 0.116 at 2048, against 1.128 and 0.122 with 56 and 224).
#define WG_THREADS 384
#ifndef WG_PRODUCER_REGS
#define WG_PRODUCER_REGS 24
#endif
#ifndef WG_CONSUMER_REGS
#define WG_CONSUMER_REGS 240
#endif

extern "C" __global__ void __launch_bounds__(WG_THREADS) flash_wgmma_d128(
    const float* __restrict__ qkv, const bf16* __restrict__ cache, const u32* __restrict__ positions,
    const u32* __restrict__ seq_token_start, const u32* __restrict__ seq_token_count,
    const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,
    const u32* __restrict__ tile_seq, const u32* __restrict__ tile_row, bf16* __restrict__ out,
    int num_heads, int num_kv_heads, int block_size, long long block_elems, long long layer_offset,
    float scale_log2, const unsigned char* __restrict__ kv_tensor_map, int use_tma, int num_tiles,
    const bf16* __restrict__ q16, int q16_first) {
    pdl_enter();
    constexpr int D = 128;
    constexpr int KC = D / 16;        // 16-wide k steps of S = Q Kᵀ
    constexpr int NT = WG_KEYS / 8;   // 8-key column blocks of S
    constexpr int PK = WG_KEYS / 16;  // 16-key k steps of O += P V
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wg = warp >> 2, wi = warp & 3;
    const int g = lane >> 2, c = lane & 3;

    extern __shared__ __align__(16) unsigned char wg_smem[];
    // Swizzle atoms (8 rows of 128 bytes) must start 1024-byte aligned: the launch asks for
    // 1 KiB more than the stages take.
    const u32 raw = (u32)__cvta_generic_to_shared(wg_smem);
    const u32 base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = wg_smem + (base - raw);

    // Work items: (tile, head) pairs, longest first across heads. The host lists tiles by the
    // keys they see, shortest first, so item i is tile num_tiles - 1 - i / num_heads of head
    // i % num_heads: every head's longest tile, then every head's next. (With the head as the
    // grid's y, one head's tiles ran longest to shortest before the next head's, and the last
    // head's longest tile started with a fraction of a wave left and ran alone at the end.)
    const int total_items = num_tiles * num_heads;
    // This block's k-th item, or total_items past its last. A block of the one-shot grid takes
    // the item of its linear index (blocks are dispatched in that order, x fastest). With
    // WG_PERSISTENT a block per multiprocessor walks the items in rounds of gridDim.x, forwards
    // and backwards in turn so that no block takes the longest item of every round, and its
    // producer copies the next item's first tiles while the consumers finish this one's.
    auto item_of = [&](int k) -> int {
#if WG_PERSISTENT
        const int lin = k * (int)gridDim.x + ((k & 1) ? (int)gridDim.x - 1 - (int)blockIdx.x
                                                       : (int)blockIdx.x);
        return min(lin, total_items);
#else
        return k == 0 ? (int)(blockIdx.x + blockIdx.y * gridDim.x) : total_items;
#endif
    };
    struct Item {
        int r0, h, kvh, t_start, cached, rows_valid, n_keys;
        const u32* table;
    };
    auto item_at = [&](int lin) -> Item {
        Item it;
        const int tile = num_tiles - 1 - lin / num_heads;
        const int seq = tile_seq[tile];
        it.r0 = tile_row[tile];
        it.h = lin % num_heads;
        it.kvh = it.h / (num_heads / num_kv_heads);
        it.t_start = seq_token_start[seq];
        it.cached = (int)positions[it.t_start];
        it.rows_valid = min(128, (int)seq_token_count[seq] - it.r0);
        it.n_keys = it.cached + it.r0 + it.rows_valid;
        it.table = block_tables + seq_block_start[seq];
        return it;
    };
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;

    __shared__ __align__(8) u64 full_bar[WG_STAGES], empty_bar[WG_STAGES];
    const u32 full0 = (u32)__cvta_generic_to_shared(&full_bar[0]);
    const u32 empty0 = (u32)__cvta_generic_to_shared(&empty_bar[0]);
    if (threadIdx.x == 0) {
        for (int i = 0; i < WG_STAGES; ++i) {
            // The producer's arrival with the tile's bytes (TMA), or each of its threads' as
            // its copies land (cp.async).
            mbar_init(full0 + 8 * i, use_tma ? 1 : 128);
            mbar_init(empty0 + 8 * i, 8);   // lane 0 of each consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    // The role, from a value the compiler sees is the same across the warp (a wgmma in a branch
    // it cannot prove uniform serializes them all).
    if (__shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0) == 2) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WG_PRODUCER_REGS));
        // The producer: tile j into stage j % WG_STAGES once the consumers handed that stage
        // back from tile j - WG_STAGES. Thread t copies 16-byte chunk t % 16 of the K and the V
        // rows of keys t / 16 + 8i.
        const int ptid = threadIdx.x - 256;
        if (use_tma) {
            // One thread issues every box: per block of the tile, K and V, two halves each.
            if (ptid != 0) return;
            const int kv_layer = (int)(layer_offset / kv_stride);  // 2 * layer: K; + 1: V
            const int blocks_per_tile = WG_KEYS / block_size;
            int pst = 0, use = 0;
            for (int k = 0, lin = item_of(0); lin < total_items; lin = item_of(++k)) {
            const Item it = item_at(lin);
            const int n_keys = it.n_keys, kvh = it.kvh;
            const u32* table = it.table;
            for (int kt = 0; kt < n_keys; kt += WG_KEYS) {
                if (use > 0) mbar_wait(empty0 + 8 * pst, (use - 1) & 1);
                const u32 bar = full0 + 8 * pst;
                mbar_arrive_expect_tx(bar, WG_STAGE_BYTES);
                const u32 stage = base + pst * WG_STAGE_BYTES;
                for (int i = 0; i < blocks_per_tile; ++i) {
                    const int key0 = kt + i * block_size;
                    // Blocks wholly past the sequence's keys: a block index past the cache
                    // (zero fill), since the table has no entry for them.
                    const int block = key0 < n_keys ? (int)table[key0 / block_size] : 0x7fffffff;
                    const u32 row = stage + i * block_size * 128;
                    tma_kv_box(row, kv_tensor_map, 0, kvh, kv_layer, block, bar);
                    tma_kv_box(row + WG_HALF_BYTES, kv_tensor_map, 64, kvh, kv_layer, block, bar);
                    tma_kv_box(row + WG_TILE_BYTES, kv_tensor_map, 0, kvh, kv_layer + 1, block, bar);
                    tma_kv_box(row + WG_TILE_BYTES + WG_HALF_BYTES, kv_tensor_map, 64, kvh,
                               kv_layer + 1, block, bar);
                }
                if (++pst == WG_STAGES) {
                    pst = 0;
                    ++use;
                }
            }
            }
            return;
        }
        const int pchunk = ptid & 15, phalf = pchunk >> 3, pcc = pchunk & 7, prow0 = ptid >> 4;
        int pst = 0, use = 0;
        for (int k = 0, lin = item_of(0); lin < total_items; lin = item_of(++k)) {
        const Item it = item_at(lin);
        const int n_keys = it.n_keys, kvh = it.kvh;
        const u32* table = it.table;
        for (int kt = 0; kt < n_keys; kt += WG_KEYS) {
            if (use > 0) mbar_wait(empty0 + 8 * pst, (use - 1) & 1);
            constexpr int PROWS = WG_KEYS / 8;
            const bf16* src[PROWS];
#pragma unroll
            for (int r = 0; r < PROWS; ++r) {
                const int key = kt + prow0 + 8 * r;
                src[r] = key < n_keys ? cache + (long long)table[key / block_size] * block_elems +
                                            layer_offset + (long long)(key % block_size) * token_stride +
                                            kvh * D + pchunk * 8
                                      : nullptr;
            }
#pragma unroll
            for (int r = 0; r < PROWS; ++r) {
                const int row = prow0 + 8 * r;
                const int off = pst * WG_STAGE_BYTES + phalf * WG_HALF_BYTES + row * 128 + ((pcc ^ (row & 7)) << 4);
                const int bytes = src[r] != nullptr ? 16 : 0;
                cp_async16(reinterpret_cast<bf16*>(smem + off), bytes ? src[r] : cache, bytes);
                cp_async16(reinterpret_cast<bf16*>(smem + off + WG_TILE_BYTES),
                           bytes ? src[r] + kv_stride : cache, bytes);
            }
            mbar_arrive_cp_async(full0 + 8 * pst);
            if (++pst == WG_STAGES) {
                pst = 0;
                ++use;
            }
        }
        }
        cp_async_wait<0>();
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(WG_CONSUMER_REGS));
    // Stages and their phases run on across items, as the producer fills them.
    int st = 0, use = 0;
#if WG_PINGPONG
    if (wg == 1) turn_pass(1);  // the first turn is warpgroup 0's
#endif
    for (int k = 0, lin = item_of(0); lin < total_items; lin = item_of(++k)) {
    const Item it = item_at(lin);
    const bool has_next = item_of(k + 1) < total_items;
    const int r0 = it.r0, h = it.h, t_start = it.t_start, cached = it.cached;
    const int rows_valid = it.rows_valid, n_keys = it.n_keys;
    // This warpgroup's 64 rows.
    const int wg_row0 = wg * 64;
    const int row_a = wg_row0 + wi * 16 + g, row_b = row_a + 8;
    const int la = min(row_a, rows_valid - 1), lb = min(row_b, rows_valid - 1);
    const int pos_a = cached + r0 + la, pos_b = cached + r0 + lb;
    const int first_pos = cached + r0 + wg_row0;

    u32 qa[KC][4];
    if (q16 != nullptr) {
        // q already scaled and rounded to bf16 by rope_cache_write: pairs as they stand.
        const long long q_width = (long long)num_heads * D;
        const bf16* qra = q16 + (long long)(t_start + r0 + la - q16_first) * q_width + h * D;
        const bf16* qrb = q16 + (long long)(t_start + r0 + lb - q16_first) * q_width + h * D;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            const int d0 = kc * 16 + 2 * c;
            qa[kc][0] = *reinterpret_cast<const u32*>(qra + d0);
            qa[kc][1] = *reinterpret_cast<const u32*>(qrb + d0);
            qa[kc][2] = *reinterpret_cast<const u32*>(qra + d0 + 8);
            qa[kc][3] = *reinterpret_cast<const u32*>(qrb + d0 + 8);
        }
    } else {
        const float* qra = qkv + (long long)(t_start + r0 + la) * width + h * D;
        const float* qrb = qkv + (long long)(t_start + r0 + lb) * width + h * D;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            const int d0 = kc * 16 + 2 * c;
            qa[kc][0] = pack_bf16(qra[d0] * scale_log2, qra[d0 + 1] * scale_log2);
            qa[kc][1] = pack_bf16(qrb[d0] * scale_log2, qrb[d0 + 1] * scale_log2);
            qa[kc][2] = pack_bf16(qra[d0 + 8] * scale_log2, qra[d0 + 9] * scale_log2);
            qa[kc][3] = pack_bf16(qrb[d0 + 8] * scale_log2, qrb[d0 + 9] * scale_log2);
        }
    }
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.0f, l_b = 0.0f;

    // The online softmax of one tile's scores `s` (keys kt..): the causal mask where the tile
    // reaches past the warpgroup's first row, each row's maximum and sum (its 4 threads
    // together), flash.cu's lazy rescale; the exponentiated scores are left in `sc` for
    // `pack_p`. Returns whether O must be multiplied by (corr_a, corr_b) (rows g and g + 8)
    // before P V is added to it.
    auto softmax = [&](float* sc, int kt, float& corr_a, float& corr_b) -> bool {
        const bool masked = kt + WG_KEYS - 1 > first_pos;
        // Maxima and sums as trees, not chains: with two warps a scheduler, a chain of
        // dependent instructions is time the scheduler has nothing to issue.
        float ta[NT], tb[NT];
        // One branch around the whole mask: inside the loop below, nvcc kept a branch (and
        // its convergence barrier) per 8 keys, taken or not, on every tile.
        if (masked) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int key = kt + nt * 8 + 2 * c;
                sc[4 * nt + 0] = key > pos_a ? NEG_INF : sc[4 * nt + 0];
                sc[4 * nt + 1] = key + 1 > pos_a ? NEG_INF : sc[4 * nt + 1];
                sc[4 * nt + 2] = key > pos_b ? NEG_INF : sc[4 * nt + 2];
                sc[4 * nt + 3] = key + 1 > pos_b ? NEG_INF : sc[4 * nt + 3];
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            ta[nt] = fmaxf(sc[4 * nt + 0], sc[4 * nt + 1]);
            tb[nt] = fmaxf(sc[4 * nt + 2], sc[4 * nt + 3]);
        }
        // Constant trip counts on both loops: with `w /= 2` as the loop step, nvcc left the
        // 16-wide tree of 128-key tiles rolled, and ta/tb went to local memory (2x the time).
#pragma unroll
        for (int level = 1; level < NT; level *= 2)
#pragma unroll
            for (int i = 0; i < NT / 2; ++i)
                if (i < NT / (2 * level)) {
                    ta[i] = fmaxf(ta[i], ta[i + NT / (2 * level)]);
                    tb[i] = fmaxf(tb[i], tb[i + NT / (2 * level)]);
                }
        float mx_a = ta[0], mx_b = tb[0];
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        constexpr float RESCALE_LOG2 = 8.0f;
        const bool grow = mx_a > m_a + RESCALE_LOG2 || mx_b > m_b + RESCALE_LOG2;
        const bool rescale = __any_sync(0xffffffffu, grow);
        if (rescale) {
            const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
            corr_a = fast_exp2(m_a - new_a);
            corr_b = fast_exp2(m_b - new_b);
            m_a = new_a;
            m_b = new_b;
            l_a *= corr_a;
            l_b *= corr_b;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            sc[4 * nt + 0] = fast_exp2(sc[4 * nt + 0] - m_a);
            sc[4 * nt + 1] = fast_exp2(sc[4 * nt + 1] - m_a);
            sc[4 * nt + 2] = fast_exp2(sc[4 * nt + 2] - m_b);
            sc[4 * nt + 3] = fast_exp2(sc[4 * nt + 3] - m_b);
            ta[nt] = sc[4 * nt + 0] + sc[4 * nt + 1];
            tb[nt] = sc[4 * nt + 2] + sc[4 * nt + 3];
        }
#pragma unroll
        for (int level = 1; level < NT; level *= 2)
#pragma unroll
            for (int i = 0; i < NT / 2; ++i)
                if (i < NT / (2 * level)) {
                    ta[i] += ta[i + NT / (2 * level)];
                    tb[i] += tb[i + NT / (2 * level)];
                }
        l_a += ta[0];
        l_b += tb[0];
        return rescale;
    };
    // P (bf16 of the exponentiated scores in `sc`) as the A fragments of O += P V.
    auto pack_p = [&](const float* sc, u32 (*pa)[4]) {
#pragma unroll
        for (int k = 0; k < PK; ++k) {
            pa[k][0] = pack_bf16(sc[8 * k + 0], sc[8 * k + 1]);
            pa[k][1] = pack_bf16(sc[8 * k + 2], sc[8 * k + 3]);
            pa[k][2] = pack_bf16(sc[8 * k + 4], sc[8 * k + 5]);
            pa[k][3] = pack_bf16(sc[8 * k + 6], sc[8 * k + 7]);
        }
    };
    auto rescale_o = [&](float corr_a, float corr_b) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[4 * j + 0] *= corr_a;
            o[4 * j + 1] *= corr_a;
            o[4 * j + 2] *= corr_b;
            o[4 * j + 3] *= corr_b;
        }
    };
    // S = Q Kᵀ of the tile whose K starts at `k_base` (8 k steps of 16 dimensions), issued.
    auto issue_s = [&](float* sc, u32 k_base) {
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            const u64 desc = wg_desc(k_base + (kc >> 2) * WG_HALF_BYTES + (kc & 3) * 32, 16, 1024);
#if WG_KEYS == 64
            wgmma_m64n64k16<0>(sc, qa[kc], desc, kc > 0);
#else
            wgmma_m64n128k16<0>(sc, qa[kc], desc, kc > 0);
#endif
        }
    };
    // O += P V of the tile whose V starts at `v_base`: 16 keys (two 8-row groups, 2 KiB) per
    // k step, issued.
    auto issue_pv = [&](u32 (*pa)[4], u32 v_base) {
#pragma unroll
        for (int k = 0; k < PK; ++k) {
#if WG_PV_SPLIT
            wgmma_m64n64k16<1>(o, pa[k], wg_desc(v_base + k * 2048, 16, 1024), 1);
            wgmma_m64n64k16<1>(o + 32, pa[k], wg_desc(v_base + WG_HALF_BYTES + k * 2048, 16, 1024), 1);
#else
            wgmma_m64n128k16<1>(o, pa[k], wg_desc(v_base + k * 2048, WG_HALF_BYTES, 1024), 1);
#endif
        }
    };
    auto hold_o = [&]() {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) wgmma_hold(o[i]);
    };
    auto hold_s = [&](float* sc) {
#pragma unroll
        for (int i = 0; i < WG_KEYS / 2; ++i) wgmma_hold(sc[i]);
    };

    // The consumer side of warp specialization: the overlapped loop below with the stages'
    // mbarriers in place of the block-wide barrier and the copies. Tile j's stage is handed
    // back once P_j V_j is done, at iteration j + 1 (its K was read by S_j, its V by that).
    u32 pa_prev[PK][4];
#pragma unroll
    for (int k = 0; k < PK; ++k) pa_prev[k][0] = pa_prev[k][1] = pa_prev[k][2] = pa_prev[k][3] = 0u;
    u32 v_prev = base + WG_TILE_BYTES;
    int prev_st = -1;
    for (int kt = 0; kt < n_keys; kt += WG_KEYS) {
        mbar_wait(full0 + 8 * st, use & 1);
        fence_proxy_async();
        const u32 k_base = base + st * WG_STAGE_BYTES;
        float sc[WG_KEYS / 2];
#if !WG_LATE_PACK
        u32 pa[PK][4];
#endif
#if WG_PINGPONG
        turn_wait(wg);
#endif
        wgmma_fence();
        issue_s(sc, k_base);
        wgmma_commit();
        issue_pv(pa_prev, v_prev);
        wgmma_commit();
#if WG_PINGPONG
        turn_pass(wg);
#endif
        hold_o();
        wgmma_wait<1>();
        hold_s(sc);
        float corr_a = 1.0f, corr_b = 1.0f;
        const bool rescale = softmax(sc, kt, corr_a, corr_b);
#if !WG_LATE_PACK
        pack_p(sc, pa);
#endif
        wgmma_wait<0>();
        hold_o();
#pragma unroll
        for (int k = 0; k < PK; ++k)
            asm volatile("" ::"r"(pa_prev[k][0]), "r"(pa_prev[k][1]), "r"(pa_prev[k][2]),
                         "r"(pa_prev[k][3]));
        if (prev_st >= 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty0 + 8 * prev_st);
        }
        if (rescale) rescale_o(corr_a, corr_b);
#if WG_LATE_PACK
        pack_p(sc, pa_prev);
#else
#pragma unroll
        for (int k = 0; k < PK; ++k)
#pragma unroll
            for (int i = 0; i < 4; ++i) pa_prev[k][i] = pa[k][i];
#endif
        v_prev = k_base + WG_TILE_BYTES;
        prev_st = st;
        if (++st == WG_STAGES) {
            st = 0;
            ++use;
        }
    }
#if WG_PINGPONG
    turn_wait(wg);
#endif
    wgmma_fence();
    issue_pv(pa_prev, v_prev);
    wgmma_commit();
#if WG_PINGPONG
    // Warpgroup 1's last turn of the last item is the last of all: nobody waits for a pass
    // after it.
    if (wg == 0 || has_next) turn_pass(wg);
#endif
    hold_o();
    wgmma_wait<0>();
    hold_o();
    // The last tile's stage, for the producer's next item.
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * prev_st);

    float sa = l_a, sb = l_b;
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
    sb += __shfl_xor_sync(0xffffffffu, sb, 1);
    sb += __shfl_xor_sync(0xffffffffu, sb, 2);
    const int out_width = num_heads * D;
    if (row_a < rows_valid) {
        bf16* dst = out + (long long)(t_start + r0 + row_a) * out_width + h * D;
        const float inv = 1.0f / sa;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<u32*>(&dst[8 * j + 2 * c]) = pack_bf16(o[4 * j] * inv, o[4 * j + 1] * inv);
    }
    if (row_b < rows_valid) {
        bf16* dst = out + (long long)(t_start + r0 + row_b) * out_width + h * D;
        const float inv = 1.0f / sb;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<u32*>(&dst[8 * j + 2 * c]) =
                pack_bf16(o[4 * j + 2] * inv, o[4 * j + 3] * inv);
    }
    }
}

#else

// Not built for sm_90a: the symbol exists so the module loads the same everywhere; the host
// launches it only on a device it compiled the kernels for sm_90a for.
extern "C" __global__ void flash_wgmma_d128() {}

#endif
