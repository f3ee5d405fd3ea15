// Prefill attention on the tensor cores (flash-attention style): one block = 128 query rows of
// one sequence and H query heads of one KV head, 4 warps of 32 rows per head; keys and values
// stream through shared memory in tiles of 32 read from the paged cache (double-buffered:
// cp.async copies the next tile while the tensor cores work on this one), shared by the
// block's H heads; scores and the online softmax stay in registers.
// Causal: query row r (position p) sees keys 0..=p of its sequence; the cache already holds the
// chunk's own keys (rope_cache_write runs first), so chunked prefill reads earlier chunks there.
//
// Matrix products are mma.sync m16n8k16 (bf16 in, f32 accumulate): S = Q Kᵀ with Q (scaled by
// softmax_scale * log2 e) in registers, then O += P V with P converted to bf16 in registers.
// K and V fragments come out of shared memory by ldmatrix (V transposed on the way), four
// 8x8 matrices, i.e. two mma B operands, per instruction.
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): g = lane / 4, c = lane % 4;
//   A 16x16 row-major: a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   B 16x8 (k x n):    b0 = (k 2c..2c+1, n g), b1 = (k 2c+8..2c+9, n g)
//   C 16x8 f32:        c0 = (g, 2c), c1 = (g, 2c+1), c2 = (g+8, 2c), c3 = (g+8, 2c+1)

// A warp computes FA_MT m-tiles of 16 query rows (32 rows): every K and V fragment read from
// shared memory feeds FA_MT times as many mma instructions, and the two tiles' independent
// instruction chains hide each other's latency (FlashAttention-2's split of rows to warps).
#define FA_MT 2
#define FA_WARPS 4
#define FA_ROWS (16 * FA_MT * FA_WARPS)
// Keys per shared-memory tile: a multiple of FA_SUB. The host computes the dynamic shared
// memory from it and FA_Q_SMEM (`FlashConfig` in kernels.rs); both are NVRTC definitions so
// that a tuning run can try others (`TANDEM_KERNEL_DEFINES="FA_KEYS=64 FA_Q_SMEM=1"`).
#ifndef FA_KEYS
#define FA_KEYS 32
#endif
// Keys per step of the online softmax: a warp's scores for its 32 rows and this many keys stay
// in registers beside its outputs. A tile of several steps pays its copy wait and its two
// barriers once for all of them.
#define FA_SUB 32
// 1: the block's query rows live in shared memory (bf16, scaled) and each warp reads its A
// fragments from there by ldmatrix for every step, freeing the registers they take; 0: each
// thread holds its A fragments in registers.
#ifndef FA_Q_SMEM
#define FA_Q_SMEM 0
#endif

// 2^x by the special-function unit (exp2f without fast math adds range handling per call);
// 2^-inf = 0, which the causal mask relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

// Four 8x8 b16 matrices out of shared memory, one row address per lane (lanes 8i..8i+7 give
// matrix i's rows); lane t receives, of matrix i, row t/4, columns 2(t%4) and 2(t%4)+1 (.trans:
// rows 2(t%4) and 2(t%4)+1 of column t/4), the layout of an mma B fragment half.
__device__ __forceinline__ void ldmatrix_x4(u32* r, const bf16* row) {
    const u32 addr = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const bf16* row) {
    const u32 addr = (u32)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes global -> shared without passing through registers; `src_bytes` 0 fills zeros.
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, int src_bytes) {
    const u32 addr = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src),
                 "r"(src_bytes));
}

// The same for FP8 codes (16 a copy).
__device__ __forceinline__ void cp_async16(fp8* dst, const fp8* src, int src_bytes) {
    cp_async16(reinterpret_cast<bf16*>(dst), reinterpret_cast<const bf16*>(src), src_bytes);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `N` of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Not volatile: a pure function of its registers, so the compiler may interleave mma
// instructions with independent work.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D, int H, typename C = bf16>
__device__ __forceinline__ void flash_prefill(
    const float* __restrict__ qkv, const C* __restrict__ cache, const u32* __restrict__ positions,
    const u32* __restrict__ seq_token_start, const u32* __restrict__ seq_token_count,
    const u32* __restrict__ seq_block_start, const u32* __restrict__ block_tables,
    const u32* __restrict__ tile_seq, const u32* __restrict__ tile_row, bf16* __restrict__ out,
    int num_heads, int num_kv_heads, int block_size, long long block_elems, long long layer_offset,
    float scale_log2) {
    constexpr int KC = D / 16;  // 16-wide chunks of the head dimension
    constexpr int DT = D / 8;   // 8-wide output tiles
    constexpr int NT = FA_SUB / 8;  // 8-key score tiles of a softmax step
    constexpr int STRIDE = D + 8;  // padded shared-memory row (halves): no bank conflicts
    constexpr int TILE = FA_KEYS * STRIDE;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Two K tiles then two V tiles (dynamic shared memory, FlashConfig::smem_bytes): the next
    // tile is copied in (cp.async) while this one is computed on.
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* const k_tiles = reinterpret_cast<bf16*>(fa_smem);
    bf16* const v_tiles = k_tiles + 2 * TILE;
#if FA_Q_SMEM
    // After the K/V tiles: each of the H heads' FA_ROWS query rows, padded like them.
    bf16* const q_tile = v_tiles + 2 * TILE + (warp / FA_WARPS) * FA_ROWS * STRIDE;
#endif

    // Causal tiles later in a sequence see more keys: start those first, so the short ones
    // fill the tail of the grid instead of a long one running alone at the end.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int seq = tile_seq[tile];
    const int r0 = tile_row[tile];
    // H query heads of one KV head per block (FA_WARPS warps each), sharing its K/V tiles.
    const int h = blockIdx.y * H + warp / FA_WARPS;
    const int kvh = h / (num_heads / num_kv_heads);
    const int t_start = seq_token_start[seq];
    const int count = seq_token_count[seq];
    const int cached = (int)positions[t_start];
    const int rows_valid = min(FA_ROWS, count - r0);
    const int n_keys = cached + r0 + rows_valid;  // keys the tile's last row sees
    const u32* table = block_tables + seq_block_start[seq];
    const int width = (num_heads + 2 * num_kv_heads) * D;
    const int token_stride = num_kv_heads * D;
    const long long kv_stride = (long long)block_size * token_stride;

    const int g = lane >> 2, c = lane & 3;
    // ldmatrix: this lane's row address is row `lr` of matrix `lm`.
    const int lm = lane >> 3, lr = lane & 7;
    // This thread's query rows (within the tile): m-tile i has rows ra[i] and ra[i] + 8,
    // clamped to a valid row for loads.
    int ra[FA_MT], pos_a[FA_MT], pos_b[FA_MT];
#if FA_Q_SMEM
    // The warp's 32 rows of its head, scaled, as bf16 into the head's Q tile (rows past the
    // valid ones repeat the last valid row, as the register form clamps them); a lane converts
    // two adjacent values at a time. Only this warp reads them back.
    const int warp_row0 = (warp % FA_WARPS) * 16 * FA_MT;
    for (int e = lane; e < 16 * FA_MT * (D / 2); e += 32) {
        const int row = warp_row0 + e / (D / 2), d0 = 2 * (e % (D / 2));
        const float* q = qkv + (long long)(t_start + r0 + min(row, rows_valid - 1)) * width + h * D;
        *reinterpret_cast<u32*>(&q_tile[row * STRIDE + d0]) =
            pack_bf16(q[d0] * scale_log2, q[d0 + 1] * scale_log2);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < FA_MT; ++i) {
        ra[i] = warp_row0 + i * 16 + g;
        const int la = min(ra[i], rows_valid - 1), lb = min(ra[i] + 8, rows_valid - 1);
        pos_a[i] = cached + r0 + la;
        pos_b[i] = cached + r0 + lb;
    }
    // This lane's ldmatrix row of an A fragment: matrix lm holds rows +8 when odd and
    // dimensions +8 from the third on (a0..a3 of the mma layout).
    const bf16* const qrow = &q_tile[(warp_row0 + (lm & 1) * 8 + lr) * STRIDE + (lm >> 1) * 8];
#else
    u32 qa[FA_MT][KC][4];
#pragma unroll
    for (int i = 0; i < FA_MT; ++i) {
        ra[i] = (warp % FA_WARPS) * 16 * FA_MT + i * 16 + g;
        const int la = min(ra[i], rows_valid - 1), lb = min(ra[i] + 8, rows_valid - 1);
        pos_a[i] = cached + r0 + la;
        pos_b[i] = cached + r0 + lb;
        const float* qra = qkv + (long long)(t_start + r0 + la) * width + h * D;
        const float* qrb = qkv + (long long)(t_start + r0 + lb) * width + h * D;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            const int d0 = kc * 16 + 2 * c;
            qa[i][kc][0] = pack_bf16(qra[d0] * scale_log2, qra[d0 + 1] * scale_log2);
            qa[i][kc][1] = pack_bf16(qrb[d0] * scale_log2, qrb[d0 + 1] * scale_log2);
            qa[i][kc][2] = pack_bf16(qra[d0 + 8] * scale_log2, qra[d0 + 9] * scale_log2);
            qa[i][kc][3] = pack_bf16(qrb[d0 + 8] * scale_log2, qrb[d0 + 9] * scale_log2);
        }
    }
#endif
    float o[FA_MT][DT][4];
    float m_a[FA_MT], m_b[FA_MT], l_a[FA_MT], l_b[FA_MT];
#pragma unroll
    for (int i = 0; i < FA_MT; ++i) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) o[i][dt][0] = o[i][dt][1] = o[i][dt][2] = o[i][dt][3] = 0.0f;
        m_a[i] = m_b[i] = NEG_INF;
        l_a[i] = l_b[i] = 0.0f;
    }

    // Queues the copy of keys kt..kt+FA_KEYS-1 (zeros past n_keys) into tile buffer `buf`.
    // Each thread copies one 16-byte column chunk `c8` of LOAD_ROWS rows, ROW_STEP apart.
    // Every source address needs the key's block from the block table (a global load): all
    // of them are read first, independently, so their latencies overlap instead of each
    // cp.async waiting on its own table read.
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    constexpr int ROW_STEP = FA_WARPS * 32 * H / CHUNKS;
    constexpr int LOAD_ROWS = FA_KEYS / ROW_STEP;
    static_assert(LOAD_ROWS >= 1 && FA_KEYS % ROW_STEP == 0, "tile rows split evenly");
    const int c8 = threadIdx.x % CHUNKS, row0 = threadIdx.x / CHUNKS;
    auto load_tile = [&](int buf, int kt) {
        const C* src[LOAD_ROWS];
#pragma unroll
        for (int j = 0; j < LOAD_ROWS; ++j) {
            const int key = kt + row0 + j * ROW_STEP;
            src[j] = key < n_keys
                         ? cache + (long long)table[key / block_size] * block_elems +
                               layer_offset + (long long)(key % block_size) * token_stride +
                               kvh * D + c8 * 8
                         : nullptr;
        }
        if constexpr (sizeof(C) == 1) {
            // FP8 codes: 8 a chunk, loaded and widened to bf16 (exact) on their way into the
            // tile, which the tensor cores then read as they read a bf16 cache's. The loads are
            // not asynchronous: the group committed below is empty, so the waits count the same.
#pragma unroll
            for (int j = 0; j < LOAD_ROWS; ++j) {
                const int row = row0 + j * ROW_STEP;
                uint2 kr = make_uint2(0, 0), vr = make_uint2(0, 0);
                if (src[j] != nullptr) {
                    kr = *reinterpret_cast<const uint2*>(src[j]);
                    vr = *reinterpret_cast<const uint2*>(src[j] + kv_stride);
                }
                float kf[8], vf[8];
                kv_widen8(kr, kf);
                kv_widen8(vr, vf);
                *reinterpret_cast<uint4*>(&k_tiles[buf * TILE + row * STRIDE + c8 * 8]) =
                    make_uint4(pack_bf16(kf[0], kf[1]), pack_bf16(kf[2], kf[3]),
                               pack_bf16(kf[4], kf[5]), pack_bf16(kf[6], kf[7]));
                *reinterpret_cast<uint4*>(&v_tiles[buf * TILE + row * STRIDE + c8 * 8]) =
                    make_uint4(pack_bf16(vf[0], vf[1]), pack_bf16(vf[2], vf[3]),
                               pack_bf16(vf[4], vf[5]), pack_bf16(vf[6], vf[7]));
            }
        } else {
#pragma unroll
            for (int j = 0; j < LOAD_ROWS; ++j) {
                const int row = row0 + j * ROW_STEP;
                const int bytes = src[j] != nullptr ? 16 : 0;
                cp_async16(&k_tiles[buf * TILE + row * STRIDE + c8 * 8], bytes ? src[j] : cache,
                           bytes);
                cp_async16(&v_tiles[buf * TILE + row * STRIDE + c8 * 8],
                           bytes ? src[j] + kv_stride : cache, bytes);
            }
        }
        cp_async_commit();
    };

    load_tile(0, 0);
    int buf = 0;
    for (int kt = 0; kt < n_keys; kt += FA_KEYS, buf ^= 1) {
        // The other buffer was released by the barrier that ended the last iteration.
        if (kt + FA_KEYS < n_keys) {
            load_tile(buf ^ 1, kt + FA_KEYS);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's part of this tile has landed
#pragma unroll
        for (int sub = 0; sub < FA_KEYS / FA_SUB; ++sub) {
            // The same for every thread of the block: keys past n_keys are the tile's zero fill.
            if (sub > 0 && kt + sub * FA_SUB >= n_keys) break;
            const int ks = kt + sub * FA_SUB;  // this step's first key
            const bf16* const k_s = k_tiles + buf * TILE + sub * FA_SUB * STRIDE;
            const bf16* const v_s = v_tiles + buf * TILE + sub * FA_SUB * STRIDE;

            // S = Q Kᵀ, 32 dimensions at a time for every score tile: consecutive mma instructions
            // accumulate into different tiles, so none waits for the one before it.
            float s[FA_MT][NT][4];
#pragma unroll
            for (int i = 0; i < FA_MT; ++i)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) s[i][nt][0] = s[i][nt][1] = s[i][nt][2] = s[i][nt][3] = 0.0f;
            // Matrices: (keys nt*8.., d kc*16 + 0 / 8), then the same for kc + 1.
            const bf16* krow = &k_s[lr * STRIDE + (lm & 1) * 8 + (lm >> 1) * 16];
#pragma unroll
            for (int kc = 0; kc < KC; kc += 2) {
#if FA_Q_SMEM
                u32 qa_kc[FA_MT][2][4];
#pragma unroll
                for (int i = 0; i < FA_MT; ++i) {
                    ldmatrix_x4(qa_kc[i][0], qrow + i * 16 * STRIDE + kc * 16);
                    ldmatrix_x4(qa_kc[i][1], qrow + i * 16 * STRIDE + (kc + 1) * 16);
                }
#define FA_QA(i, k) qa_kc[i][k]
#else
#define FA_QA(i, k) qa[i][kc + k]
#endif
                u32 b[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(b[nt], krow + nt * 8 * STRIDE + kc * 16);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < FA_MT; ++i) mma_bf16(s[i][nt], FA_QA(i, 0), b[nt][0], b[nt][1]);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < FA_MT; ++i)
                        mma_bf16(s[i][nt], FA_QA(i, 1), b[nt][2], b[nt][3]);
#undef FA_QA
            }
            // Causal mask (only tiles reaching past the tile's first row), then the online softmax
            // over this tile (each row's 4 threads together).
            const bool masked = ks + FA_SUB - 1 > cached + r0;
#pragma unroll
            for (int i = 0; i < FA_MT; ++i) {
                float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    if (masked) {
                        const int key = ks + nt * 8 + 2 * c;
                        if (key > pos_a[i]) s[i][nt][0] = NEG_INF;
                        if (key + 1 > pos_a[i]) s[i][nt][1] = NEG_INF;
                        if (key > pos_b[i]) s[i][nt][2] = NEG_INF;
                        if (key + 1 > pos_b[i]) s[i][nt][3] = NEG_INF;
                    }
                    mx_a = fmaxf(mx_a, fmaxf(s[i][nt][0], s[i][nt][1]));
                    mx_b = fmaxf(mx_b, fmaxf(s[i][nt][2], s[i][nt][3]));
                }
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
                // Every row saw key 0 in the first tile, so its maximum is finite from then on and
                // a tile that masks all of a row's keys contributes exp2(-inf) = 0.
                //
                // The running maximum moves only when a row's new maximum exceeds it by more than
                // RESCALE_LOG2 (a factor of 256), and then for the whole warp: until then scores
                // are exponentiated against the stale maximum (terms up to 256, far from f32 or
                // bf16 range limits) and the rescale of the output accumulators, as many
                // multiplications as the tile has mma instructions, is skipped. The final
                // division by the sum uses the same maximum, so the result is unchanged.
                constexpr float RESCALE_LOG2 = 8.0f;
                const bool grow = mx_a > m_a[i] + RESCALE_LOG2 || mx_b > m_b[i] + RESCALE_LOG2;
                if (__any_sync(0xffffffffu, grow)) {
                    const float new_a = fmaxf(m_a[i], mx_a), new_b = fmaxf(m_b[i], mx_b);
                    const float corr_a = fast_exp2(m_a[i] - new_a), corr_b = fast_exp2(m_b[i] - new_b);
                    m_a[i] = new_a;
                    m_b[i] = new_b;
                    l_a[i] *= corr_a;
                    l_b[i] *= corr_b;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        o[i][dt][0] *= corr_a;
                        o[i][dt][1] *= corr_a;
                        o[i][dt][2] *= corr_b;
                        o[i][dt][3] *= corr_b;
                    }
                }
                float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    s[i][nt][0] = fast_exp2(s[i][nt][0] - m_a[i]);
                    s[i][nt][1] = fast_exp2(s[i][nt][1] - m_a[i]);
                    s[i][nt][2] = fast_exp2(s[i][nt][2] - m_b[i]);
                    s[i][nt][3] = fast_exp2(s[i][nt][3] - m_b[i]);
                    sum_a += s[i][nt][0] + s[i][nt][1];
                    sum_b += s[i][nt][2] + s[i][nt][3];
                }
                l_a[i] += sum_a;
                l_b[i] += sum_b;
            }
            // O += P V, 16 keys at a time.
#pragma unroll
            for (int kc2 = 0; kc2 < FA_SUB / 16; ++kc2) {
                u32 pa[FA_MT][4];
#pragma unroll
                for (int i = 0; i < FA_MT; ++i) {
                    pa[i][0] = pack_bf16(s[i][2 * kc2][0], s[i][2 * kc2][1]);
                    pa[i][1] = pack_bf16(s[i][2 * kc2][2], s[i][2 * kc2][3]);
                    pa[i][2] = pack_bf16(s[i][2 * kc2 + 1][0], s[i][2 * kc2 + 1][1]);
                    pa[i][3] = pack_bf16(s[i][2 * kc2 + 1][2], s[i][2 * kc2 + 1][3]);
                }
                // Transposed matrices: (keys kc2*16 + 0 / 8.., d dt*8..), then the same for dt + 1.
                const bf16* vrow = &v_s[(kc2 * 16 + (lm & 1) * 8 + lr) * STRIDE + (lm >> 1) * 8];
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, vrow + dt * 8);
#pragma unroll
                    for (int i = 0; i < FA_MT; ++i) {
                        mma_bf16(o[i][dt], pa[i], b[0], b[1]);
                        mma_bf16(o[i][dt + 1], pa[i], b[2], b[3]);
                    }
                }
            }
        }  // softmax steps
        __syncthreads();  // this tile is consumed: the next iteration may refill its buffer
    }
    const int out_width = num_heads * D;
#pragma unroll
    for (int i = 0; i < FA_MT; ++i) {
        float la = l_a[i], lb = l_b[i];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        if (ra[i] < rows_valid) {
            bf16* dst = out + (long long)(t_start + r0 + ra[i]) * out_width + h * D;
            const float inv = 1.0f / la;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<u32*>(&dst[dt * 8 + 2 * c]) =
                    pack_bf16(o[i][dt][0] * inv, o[i][dt][1] * inv);
        }
        if (ra[i] + 8 < rows_valid) {
            bf16* dst = out + (long long)(t_start + r0 + ra[i] + 8) * out_width + h * D;
            const float inv = 1.0f / lb;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<u32*>(&dst[dt * 8 + 2 * c]) =
                    pack_bf16(o[i][dt][2] * inv, o[i][dt][3] * inv);
        }
    }
}

#define FLASH_KERNEL(D, H, NAME) FLASH_KERNEL_OF(D, H, NAME, bf16)
#define FLASH_KERNEL_OF(D, H, NAME, C)                                                            \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32 * H) NAME(                          \
        const float* __restrict__ qkv, const C* __restrict__ cache,                               \
        const u32* __restrict__ positions, const u32* __restrict__ seq_token_start,               \
        const u32* __restrict__ seq_token_count, const u32* __restrict__ seq_block_start,         \
        const u32* __restrict__ block_tables, const u32* __restrict__ tile_seq,                   \
        const u32* __restrict__ tile_row, bf16* __restrict__ out, int num_heads,                  \
        int num_kv_heads, int block_size, long long block_elems, long long layer_offset,          \
        float scale_log2) {                                                                       \
        pdl_enter();                                                                              \
        flash_prefill<D, H, C>(qkv, cache, positions, seq_token_start, seq_token_count,           \
                            seq_block_start, block_tables, tile_seq, tile_row, out, num_heads,    \
                            num_kv_heads, block_size, block_elems, layer_offset, scale_log2);     \
    }

// One query head per block, and two query heads of one KV head per block (half the K/V
// traffic from L2 per FLOP, for models whose query groups have an even size).
FLASH_KERNEL(64, 1, flash_prefill_d64)
FLASH_KERNEL(128, 1, flash_prefill_d128)
FLASH_KERNEL(64, 2, flash_prefill_d64_h2)
FLASH_KERNEL(128, 2, flash_prefill_d128_h2)

// The same over an FP8 cache (the warpgroup kernel reads bf16 tiles by TMA only).
FLASH_KERNEL_OF(64, 1, flash_prefill_fp8_d64, fp8)
FLASH_KERNEL_OF(128, 1, flash_prefill_fp8_d128, fp8)
FLASH_KERNEL_OF(64, 2, flash_prefill_fp8_d64_h2, fp8)
FLASH_KERNEL_OF(128, 2, flash_prefill_fp8_d128_h2, fp8)
