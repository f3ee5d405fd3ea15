// Truncated sampling on the device, for sample.cu: top-k, top-p and min-p, then the draw, as
// the host's `sample_truncated` (workers/src/sampler.rs) does them over the full row. Decided
// here, a truncated request's token never needs its row on the host, so the engine can queue
// the next step before it reads this one's tokens.
//
// Tokens are ranked as the host ranks them: higher logit first, equal logits by lower id.
// Top-k, top-p and min-p (logits at or above max + T ln(min_p)) each keep a prefix of that
// ranking; the kept set is the shortest, and the draw walks it in rank order. Min-p alone
// keeps the host's id order (id_order_draw).
//
// Weights are the host's: exp((l - max) / T) by the same f32 polynomial (host_exp), each
// operation rounded as Rust rounds it (no fused multiply-adds). They are summed as integers in
// units of 2^-40, so every sum is exact and the same in any order, and the block's reductions
// need no fixed order. Against the host's f64 sums of the same f32 weights a sum differs by
// under 2^-40 a token: a draw can differ only where its uniform falls that close to a boundary.
//
// Most prefixes end within the SAMPLE_CANDIDATES best logits, which sample_rows has ranked
// already (the head). The others are found through buckets of the weight's exponent (one pass
// for a histogram, one to collect the bucket where the prefix ends, and a sort of that bucket
// alone); where that bucket is too large (equal logits), by rank_search: 8-way steps over the
// logits' keys, then over the ids of equal logits, a pass over the row per step.

// The best logits sample_rows ranks (the head), and how many a summary carries to the host.
#define SAMPLE_CANDIDATES 64

// Order-preserving key of a float: larger float, larger key.
__device__ __forceinline__ u32 sample_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float whose sample_key is k.
__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The host's `fast_exp::exp` (Cephes' expf polynomial, the exponent built from bits), rounded
// step by step as the host rounds it, so the weights are the host's to the bit.
__device__ __forceinline__ float host_exp(float x) {
    const bool underflow = x < -87.0f;
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float magic = 12582912.0f;  // 1.5 * 2^23
    const float shifted = __fadd_rn(__fmul_rn(x, 1.44269504088896341f), magic);
    const float n = __fsub_rn(shifted, magic);
    const int n_bits = (int)(__float_as_uint(shifted) - __float_as_uint(magic));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, 0.6933594f)), __fmul_rn(n, -2.1219444e-4f));
    const float r2 = __fmul_rn(r, r);
    float p = __fadd_rn(__fmul_rn(1.9875691e-4f, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float y = __fadd_rn(__fadd_rn(__fmul_rn(p, r2), r), 1.0f);
    const float scale = __uint_as_float((u32)(n_bits + 127) << 23);
    return underflow ? 0.0f : __fmul_rn(y, scale);
}

// A row being sampled: its logits, maximum and temperature.
struct RankRow {
    const float* row;
    int cols;
    float max;
    float t;
};

// A logit's sampling weight in units of 2^-40 (the top logit weighs 2^40; -inf weighs 0).
__device__ __forceinline__ u64 fixed_weight(const RankRow& rr, float l) {
    const float w = host_exp(__fdiv_rn(__fsub_rn(l, rr.max), rr.t));
    return __float2ull_rn(__fmul_rn(w, 1099511627776.0f));
}

// Sums N values of every thread over the block; every thread gets the totals.
template <int N>
__device__ __forceinline__ void block_sum_u64(u64 (&v)[N]) {
    __shared__ u64 partial[32][N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
    }
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) partial[warp][i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
        u64 s = 0;
        for (int w = 0; w < warps; ++w) s += partial[w][i];
        v[i] = s;
    }
}

// Exclusive prefix sum of one value per thread over the block (a double in sample.cu, a u64
// here); also returns the total.
template <typename T>
__device__ T block_exclusive_scan(T v, T* total) {
    __shared__ T warp_totals[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T inclusive = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T n = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += n;
    }
    __syncthreads();
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        T t = lane < warps ? warp_totals[lane] : (T)0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T n = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += n;
        }
        warp_totals[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    const T before_warp = warp == 0 ? (T)0 : warp_totals[warp - 1];
    *total = warp_totals[(blockDim.x >> 5) - 1];
    return before_warp + inclusive - v;
}

// The largest x in [lo, hi] with F(x) >= goal, where F(x) adds up a weight (`by_mass`) or a
// count over the finite logits whose key is at least x or, with `by_id`, over the logits whose
// key is tie_key and whose id is at least x. F(lo) >= goal >= 1 on entry. Each step splits
// [lo, hi] in eight and is one pass over the row.
__device__ u64 rank_search(const RankRow& rr, bool by_mass, bool by_id, u32 tie_key, u64 lo,
                           u64 hi, u64 goal) {
    const u32 neg_inf_key = sample_key(NEG_INF);
    while (lo < hi) {
        const u64 step = (hi - lo + 8) / 8;
        u64 f[7];
#pragma unroll
        for (int j = 0; j < 7; ++j) f[j] = 0;
        for (int c = threadIdx.x; c < rr.cols; c += blockDim.x) {
            const float l = rr.row[c];
            const u32 k = sample_key(l);
            if (by_id ? k != tie_key : k <= neg_inf_key) continue;
            const u64 v = by_id ? (u64)c : (u64)k;
            if (v < lo + step) continue;  // counted by no edge past lo
            const u64 m = by_mass ? fixed_weight(rr, l) : 1ull;
#pragma unroll
            for (int j = 0; j < 7; ++j) f[j] += v >= lo + (u64)(j + 1) * step ? m : 0ull;
        }
        block_sum_u64<7>(f);
        // Edge j is lo + j * step (edge 0 is lo, where F reaches the goal); past hi, F is below it.
        int j = 0;
        for (int e = 7; e >= 1; --e) {
            if (lo + (u64)e * step <= hi && f[e - 1] >= goal) {
                j = e;
                break;
            }
        }
        const u64 next_lo = lo + (u64)j * step;
        if (j < 7) hi = min(hi, next_lo + step - 1);
        lo = next_lo;
    }
    return lo;
}

// Where the ranking crosses a key: the finite logits above it (count, weight), how many equal
// it, and the lowest id among those.
struct KeyStats {
    u64 count_above, mass_above, ties;
    u32 lowest_tie;
};

__device__ KeyStats key_stats(const RankRow& rr, u32 key) {
    __shared__ u32 lowest;
    const u32 neg_inf_key = sample_key(NEG_INF);
    if (threadIdx.x == 0) lowest = 0xffffffffu;
    __syncthreads();
    u64 s[3] = {0, 0, 0};
    u32 mine = 0xffffffffu;
    for (int c = threadIdx.x; c < rr.cols; c += blockDim.x) {
        const float l = rr.row[c];
        const u32 k = sample_key(l);
        if (k > key && k > neg_inf_key) {
            s[0] += 1;
            s[1] += fixed_weight(rr, l);
        } else if (k == key) {
            s[2] += 1;
            mine = min(mine, (u32)c);
        }
    }
    if (mine != 0xffffffffu) atomicMin(&lowest, mine);
    block_sum_u64<3>(s);  // its barriers publish `lowest` too
    const KeyStats stats{s[0], s[1], s[2], lowest};
    __syncthreads();  // read before the next call resets it
    return stats;
}

// The ranking's first `len` tokens (1 <= len <= the finite logits), weighing `mass`. Their
// last token is `last` when known (NO_TOKEN: the ties_taken-th lowest id among the logits
// whose key is last_key).
#define NO_TOKEN 0xffffffffu
struct Prefix {
    u64 len, mass;
    u32 last, last_key, ties_taken;
};

// The buckets: (max - l) / T in steps of 1/32 up to 32 (past that a weight is 0 in 2^-40
// units), the last bucket holding the rest. A bucket's index never falls as the logit falls,
// so each bucket is a run of the ranking, and the run where a prefix ends is found with one
// pass (a histogram) and sorted alone: a few hundred tokens of a flat row, instead of the
// twelve passes of a key search. A run of more than RANK_BUCKET_CAP tokens (equal logits, or
// the weightless tail) takes the key search.
#define RANK_BUCKETS 1024
#define RANK_BUCKET_CAP 2048

__device__ __forceinline__ int rank_bucket(const RankRow& rr, float l) {
    const float d = __fdiv_rn(__fsub_rn(rr.max, l), rr.t);
    return d < (float)(RANK_BUCKETS - 1) / 32.0f ? min((int)(d * 32.0f), RANK_BUCKETS - 1)
                                                 : RANK_BUCKETS - 1;
}

// The shortest prefix whose count (by_mass false) or weight reaches goal, through the bucket
// it ends in; false when that bucket holds more than RANK_BUCKET_CAP tokens.
__device__ bool prefix_by_bucket(const RankRow& rr, bool by_mass, u64 goal, Prefix* out) {
    __shared__ u64 hist_mass[RANK_BUCKETS];
    __shared__ u32 hist_count[RANK_BUCKETS];
    __shared__ u64 run[RANK_BUCKET_CAP];  // ((u64)key << 32) | ~id: larger ranks first
    __shared__ int found_bucket;
    __shared__ u64 found_count_above, found_mass_above;
    __shared__ u32 found_in_bucket, collected;
    __shared__ Prefix result;
    const int lane = threadIdx.x & 31;
    for (int b = threadIdx.x; b < RANK_BUCKETS; b += blockDim.x) {
        hist_mass[b] = 0;
        hist_count[b] = 0;
    }
    if (threadIdx.x == 0) collected = 0;
    __syncthreads();
    // 1. Count and weight per bucket; a warp whose tokens share a bucket adds once.
    for (int base = 0; base < rr.cols; base += blockDim.x) {
        const int c = base + threadIdx.x;
        const float l = c < rr.cols ? rr.row[c] : NEG_INF;
        const bool finite = l > NEG_INF;
        const int b = finite ? rank_bucket(rr, l) : -1;
        const u64 w = finite ? fixed_weight(rr, l) : 0ull;
        const int b0 = __shfl_sync(0xffffffffu, b, 0);
        if (__all_sync(0xffffffffu, b == b0)) {
            u64 sum = w;
#pragma unroll
            for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0 && b0 >= 0) {
                atomicAdd(&hist_mass[b0], sum);
                atomicAdd(&hist_count[b0], 32u);
            }
        } else if (finite) {
            atomicAdd(&hist_mass[b], w);
            atomicAdd(&hist_count[b], 1u);
        }
    }
    __syncthreads();
    // 2. The bucket where the running metric reaches the goal: warp 0, 32 buckets a lane.
    if (threadIdx.x < 32) {
        const int per_lane = RANK_BUCKETS / 32;
        u64 mine = 0;
        for (int i = 0; i < per_lane; ++i) {
            const int b = lane * per_lane + i;
            mine += by_mass ? hist_mass[b] : (u64)hist_count[b];
        }
        u64 inclusive = mine;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u64 n = __shfl_up_sync(0xffffffffu, inclusive, o);
            if (lane >= o) inclusive += n;
        }
        const u32 reaching = __ballot_sync(0xffffffffu, inclusive >= goal);
        // The goal is at most the row's total, so some lane reaches it.
        if (lane == __ffs(reaching) - 1) {
            u64 metric = inclusive - mine, count = 0, mass = 0;
            for (int b = 0; b < lane * per_lane; ++b) {
                count += hist_count[b];
                mass += hist_mass[b];
            }
            for (int i = 0; i < per_lane; ++i) {
                const int b = lane * per_lane + i;
                const u64 m = by_mass ? hist_mass[b] : (u64)hist_count[b];
                if (metric + m >= goal) {
                    found_bucket = b;
                    found_count_above = count;
                    found_mass_above = mass;
                    found_in_bucket = hist_count[b];
                    break;
                }
                metric += m;
                count += hist_count[b];
                mass += hist_mass[b];
            }
        }
    }
    __syncthreads();
    const int bucket = found_bucket;
    const u32 n = found_in_bucket;
    if (n > RANK_BUCKET_CAP) return false;
    // 3. The bucket's tokens, ranked (bitonic sort, padded with rank 0 to a power of two).
    for (int c = threadIdx.x; c < rr.cols; c += blockDim.x) {
        const float l = rr.row[c];
        if (l > NEG_INF && rank_bucket(rr, l) == bucket) {
            const u32 at = atomicAdd(&collected, 1u);
            run[at] = ((u64)sample_key(l) << 32) | (u64)(~(u32)c);
        }
    }
    u32 padded = 1;
    while (padded < n) padded <<= 1;
    for (u32 i = n + threadIdx.x; i < padded; i += blockDim.x) run[i] = 0;
    __syncthreads();
    for (u32 k = 2; k <= padded; k <<= 1) {
        for (u32 j = k >> 1; j > 0; j >>= 1) {
            for (u32 i = threadIdx.x; i < padded; i += blockDim.x) {
                const u32 partner = i ^ j;
                if (partner > i) {
                    const u64 a = run[i], b = run[partner];
                    if (((i & k) == 0) ? a < b : a > b) {
                        run[i] = b;
                        run[partner] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    // 4. The running weight through the run (two tokens a thread), and where the goal falls.
    const u32 i0 = 2 * threadIdx.x;
    const u64 w0 = i0 < n ? fixed_weight(rr, key_value((u32)(run[i0] >> 32))) : 0ull;
    const u64 w1 = i0 + 1 < n ? fixed_weight(rr, key_value((u32)(run[i0 + 1] >> 32))) : 0ull;
    u64 total;
    const u64 mass_before = found_mass_above + block_exclusive_scan<u64>(w0 + w1, &total);
    for (u32 e = i0; e < min(i0 + 2, n); ++e) {
        const u64 mass_through = mass_before + w0 + (e > i0 ? w1 : 0ull);
        const u64 metric_through =
            by_mass ? mass_through : found_count_above + (u64)e + 1;
        const u64 metric_before =
            by_mass ? mass_through - (e > i0 ? w1 : w0) : found_count_above + (u64)e;
        if (metric_before < goal && metric_through >= goal) {
            result = Prefix{found_count_above + e + 1, mass_through, ~(u32)run[e], 0, 0};
        }
    }
    __syncthreads();
    *out = result;
    __syncthreads();  // read before the next call writes
    return true;
}

// The shortest prefix whose weight reaches `goal` (1 <= goal <= the row's finite weight),
// by its keys.
__device__ Prefix prefix_by_mass_search(const RankRow& rr, u64 goal) {
    const u32 k = (u32)rank_search(rr, true, false, 0, sample_key(NEG_INF) + 1u, 0xffffffffull, goal);
    const KeyStats s = key_stats(rr, k);
    const u64 w = fixed_weight(rr, key_value(k));
    // F(k) reaches the goal and F(k + 1) does not, so w > 0 and 1 <= n <= ties.
    const u64 n = min((goal - s.mass_above + w - 1) / w, s.ties);
    // Usually the only one (logits of a model are rarely equal).
    return Prefix{s.count_above + n, s.mass_above + n * w, n == 1 ? s.lowest_tie : NO_TOKEN, k,
                  (u32)n};
}

// The ranking's first `len` tokens, by their keys.
__device__ Prefix prefix_by_len_search(const RankRow& rr, u64 len) {
    const u32 k = (u32)rank_search(rr, false, false, 0, sample_key(NEG_INF) + 1u, 0xffffffffull, len);
    const KeyStats s = key_stats(rr, k);
    const u64 n = len - s.count_above;
    return Prefix{len, s.mass_above + n * fixed_weight(rr, key_value(k)),
                  n == 1 ? s.lowest_tie : NO_TOKEN, k, (u32)n};
}

__device__ Prefix prefix_by_mass(const RankRow& rr, u64 goal) {
    Prefix p;
    return prefix_by_bucket(rr, true, goal, &p) ? p : prefix_by_mass_search(rr, goal);
}

__device__ Prefix prefix_by_len(const RankRow& rr, u64 len) {
    Prefix p;
    return prefix_by_bucket(rr, false, len, &p) ? p : prefix_by_len_search(rr, len);
}

// The last token of a prefix.
__device__ u32 prefix_last_token(const RankRow& rr, const Prefix& p) {
    if (p.last != NO_TOKEN) return p.last;
    const KeyStats s = key_stats(rr, p.last_key);
    // Counting ids from the top, the ties_taken-th lowest is the (ties - ties_taken + 1)-th.
    return (u32)rank_search(rr, false, true, p.last_key, 0, (u64)rr.cols - 1,
                            s.ties - p.ties_taken + 1);
}

// The draw in id order over the finite logits at or above min_logit (-inf: all of them), as
// the host draws over its unsorted candidates.
__device__ u32 id_order_draw(const RankRow& rr, float min_logit, double u) {
    __shared__ u32 picked;
    const int chunk = (rr.cols + blockDim.x - 1) / blockDim.x;
    const int begin = min(rr.cols, (int)threadIdx.x * chunk);
    const int end = min(rr.cols, begin + chunk);
    u64 mine = 0;
    for (int c = begin; c < end; ++c) {
        const float l = rr.row[c];
        if (l >= min_logit) mine += fixed_weight(rr, l);
    }
    u64 total;
    const u64 before = block_exclusive_scan<u64>(mine, &total);
    // The first token whose running weight passes u * total.
    const u64 goal = min((u64)floor(u * (double)total) + 1ull, total);
    if (threadIdx.x == 0) picked = 0;
    __syncthreads();
    if (mine > 0 && before < goal && goal <= before + mine) {
        u64 cumulative = before;
        for (int c = begin; c < end; ++c) {
            const float l = rr.row[c];
            if (l >= min_logit) cumulative += fixed_weight(rr, l);
            if (cumulative >= goal) {
                picked = (u32)c;
                break;
            }
        }
    }
    __syncthreads();
    return picked;
}

// The truncated draw. Every thread of the block calls it with the same arguments and gets the
// token. head_v/head_i: the row's head_len best logits, ranked; finite/total: the number of
// finite logits and their weight. top_k 0: none; top_p 1: none; min_offset (T ln(min_p), as
// the host computes it) -inf: none.
__device__ u32 truncated_pick(const RankRow& rr, double u, u32 top_k, float top_p,
                              float min_offset, const float* head_v, const u32* head_i,
                              u32 head_len, u64 finite, u64 total) {
    const float min_logit = min_offset == NEG_INF ? NEG_INF : __fadd_rn(rr.max, min_offset);
    if (top_p >= 1.0f && top_k == 0) return id_order_draw(rr, min_logit, u);
    const bool top_k_cuts = top_k > 0 && (u64)top_k < finite;
    // The head's weights, once for the walks below.
    __shared__ u64 head_w[SAMPLE_CANDIDATES];
    if (threadIdx.x < head_len) head_w[threadIdx.x] = fixed_weight(rr, head_v[threadIdx.x]);
    __syncthreads();

    // The kept prefix: `len` tokens weighing `mass`; past the head, `tail` says where it ends.
    u64 len = finite, mass = total;
    Prefix tail{finite, total, NO_TOKEN, 0, 0};
    bool past_head = len > head_len;
    if (top_k_cuts) {
        len = top_k;
        past_head = len > head_len;
        if (past_head) {
            tail = prefix_by_len(rr, len);
            mass = tail.mass;
        } else {
            mass = 0;
            for (u32 i = 0; i < len; ++i) mass += head_w[i];
        }
    }
    if (top_p < 1.0f) {
        // The host's nucleus_threshold: top_p of the kept weight, less a relative 1e-6.
        const double threshold = (double)top_p * (double)mass * (1.0 - 1e-6);
        const u64 goal = max(1ull, min((u64)ceil(threshold), mass));
        u64 cumulative = 0, end = 0;
        for (u32 i = 0; i < min((u64)head_len, len); ++i) {
            cumulative += head_w[i];
            if (cumulative >= goal) {
                end = i + 1;
                break;
            }
        }
        if (end > 0) {
            len = end;
            mass = cumulative;
            past_head = false;
        } else {
            tail = prefix_by_mass(rr, goal);
            len = tail.len;
            mass = tail.mass;
            past_head = true;
        }
    }
    if (min_logit != NEG_INF) {
        // The logits at or above min_logit are a prefix too (the top one always is).
        u64 below = 0;
        bool found = false;
        for (u32 i = 0; i < min((u64)head_len, len); ++i) {
            if (head_v[i] < min_logit) {
                below = i;
                found = true;
                break;
            }
        }
        if (found) {
            len = below;
            mass = 0;
            for (u32 i = 0; i < len; ++i) mass += head_w[i];
            past_head = false;
        } else if (past_head) {
            u64 s[2] = {0, 0};
            for (int c = threadIdx.x; c < rr.cols; c += blockDim.x) {
                const float l = rr.row[c];
                if (l >= min_logit && l > NEG_INF) {
                    s[0] += 1;
                    s[1] += fixed_weight(rr, l);
                }
            }
            block_sum_u64<2>(s);
            if (s[0] < len) {
                len = s[0];
                mass = s[1];
                past_head = len > head_len;
                if (past_head) tail = prefix_by_len(rr, len);
            }
        }
    }

    // The draw: the first token of the prefix whose running weight passes u * mass.
    const u64 goal = min((u64)floor(u * (double)mass) + 1ull, mass);
    u64 cumulative = 0;
    for (u32 i = 0; i < min((u64)head_len, len); ++i) {
        cumulative += head_w[i];
        if (cumulative >= goal) return head_i[i];
    }
    // Past the head (so the kept prefix is too).
    Prefix at = prefix_by_mass(rr, goal);
    if (at.len > len) at = tail;  // rounding at the prefix's end: its last token
    if (at.len <= head_len) return head_i[at.len - 1];
    return prefix_last_token(rr, at);
}
