// Sampling on the device: everything the host sampler (workers/src/sampler.rs) needs from a
// row of logits, so the row itself (512 KiB at a 128k vocabulary) never crosses PCIe.
//
// One block of SAMPLE_THREADS per row. Per row it writes:
// - the largest logit and its lowest index, and how many logits are NaN or +inf;
// - sum exp(l - max) (for log-probabilities) and sum exp((l - max) / T), both in f64;
// - with T > 0, the full-vocabulary draw: the first id, in id order, where the running sum of
//   exp((l - max) / T) passes u * total (the host's `draw` over the whole row);
// - when asked, the SAMPLE_CANDIDATES best finite logits ranked as the host ranks them (higher
//   logit first, equal logits by lower id), for top-k, top-p, min-p and top log-probabilities.
//
// The running sums walk each thread's contiguous chunk of the row in id order, so the draw's
// cumulative weights are those the host would add up, only grouped differently.

#define SAMPLE_THREADS 1024
// SAMPLE_CANDIDATES (the ranked head's size) is sample_rank.cu's.
// Logits equal to the SAMPLE_CANDIDATES-th best that can be collected; more ties than this
// (a degenerate row) sets the overflow flag and the host samples from the full row.
#define SAMPLE_TIE_CAP 1024
// flags[row * 2]: the host wants the candidates; the draw is truncated (sample_rank.cu).
#define SAMPLE_WANT_CANDIDATES 1u
#define SAMPLE_TRUNCATED 2u

// params: temperature[row] (0: greedy, no draw), u[row] in [0, 1),
// flags[row*2 + {0,1}]: SAMPLE_WANT_CANDIDATES | SAMPLE_TRUNCATED, top-k (0: none),
// truncation[row*2 + {0,1}]: top-p (1: none), T ln(min-p) (-inf: none) (sample_rank.cu).
// out_f32[row*2 + {0,1}]: max logit, logit of the drawn token (the truncated draw's, when asked).
// out_u32[row*4 + {0,1,2,3}]: argmax, drawn id, non-finite count, candidate count
//   (SAMPLE_CANDIDATES + 1 means ties overflowed).
// out_f64[row*2 + {0,1}]: sum exp(l - max), sum exp((l - max) / T).
// cand_logit / cand_id [row * SAMPLE_CANDIDATES + i]: the candidates, best first.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, int cols, const float* __restrict__ temperature,
            const double* __restrict__ uniform, const u32* __restrict__ flags,
            const float* __restrict__ truncation,
            float* __restrict__ out_f32, u32* __restrict__ out_u32, double* __restrict__ out_f64,
            float* __restrict__ cand_logit, u32* __restrict__ cand_id) {
    pdl_enter();
    __shared__ u32 bad_count;
    __shared__ float row_max;
    __shared__ int row_argmax;
    __shared__ u32 drawn;
    __shared__ u32 last_positive;
    const long long r = blockIdx.x;
    const float* row = logits + r * cols;
    if (threadIdx.x == 0) {
        bad_count = 0;
        drawn = 0xffffffffu;
        last_positive = 0;
    }
    __syncthreads();

    // 1. Maximum (lowest index on ties) and non-finite values.
    float v = NEG_INF;
    int idx = 0x7fffffff;
    u32 bad = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float l = row[c];
        if (l != l || l == __int_as_float(0x7f800000)) {
            ++bad;
        } else if (l > v) {
            v = l;
            idx = c;
        }
    }
    if (bad) atomicAdd(&bad_count, bad);
    block_argmax(v, idx);
    if (threadIdx.x == 0) {
        row_max = v;
        row_argmax = idx == 0x7fffffff ? 0 : idx;
    }
    __syncthreads();
    const float max = row_max;
    const float t = temperature[r];
    const u32 row_flags = flags[r * 2];
    const bool truncated = t > 0.0f && (row_flags & SAMPLE_TRUNCATED);
    if (threadIdx.x == 0) {
        out_f32[r * 2 + 0] = max;
        out_u32[r * 4 + 0] = (u32)row_argmax;
        out_u32[r * 4 + 2] = bad_count;
    }
    if (bad_count != 0 || max == NEG_INF) {
        // The host reports the error (or the empty row) from the full row.
        if (threadIdx.x == 0) {
            out_f32[r * 2 + 1] = max;
            out_u32[r * 4 + 1] = (u32)row_argmax;
            out_u32[r * 4 + 3] = 0;
            out_f64[r * 2 + 0] = 1.0;
            out_f64[r * 2 + 1] = 1.0;
        }
        return;
    }

    // 2. Sums over each thread's contiguous chunk, in id order.
    const int chunk = (cols + blockDim.x - 1) / blockDim.x;
    const int begin = min(cols, (int)threadIdx.x * chunk);
    const int end = min(cols, begin + chunk);
    const RankRow rr{row, cols, max, t};
    double sum1 = 0.0, sum_t = 0.0;
    // For a truncated draw: the finite logits, and their weight as sample_rank.cu sums it.
    u64 finite_weight[2] = {0, 0};
    for (int c = begin; c < end; ++c) {
        const float l = row[c];
        sum1 += (double)expf(l - max);
        if (t > 0.0f) sum_t += (double)expf((l - max) / t);
        if (truncated && l > NEG_INF) {
            finite_weight[0] += 1;
            finite_weight[1] += fixed_weight(rr, l);
        }
    }
    double total1, total_t;
    block_exclusive_scan(sum1, &total1);
    const double before = block_exclusive_scan(sum_t, &total_t);
    if (truncated) block_sum_u64<2>(finite_weight);
    if (threadIdx.x == 0) {
        out_f64[r * 2 + 0] = total1;
        out_f64[r * 2 + 1] = t > 0.0f ? total_t : 1.0;
    }

    // 3. The full-vocabulary draw: the thread whose chunk holds u * total walks it (a
    //    truncated draw is step 5's).
    if (t > 0.0f && !truncated) {
        const double target = uniform[r] * total_t;
        if (sum_t > 0.0 && before <= target && target < before + sum_t) {
            double cumulative = before;
            for (int c = begin; c < end; ++c) {
                const float w = expf((row[c] - max) / t);
                if (w > 0.0f) {
                    cumulative += (double)w;
                    if (target < cumulative) {
                        drawn = (u32)c;
                        break;
                    }
                }
            }
        }
        // Rounding can leave the walk just under the target: the host then takes the last
        // token with a positive weight.
        for (int c = end - 1; c >= begin; --c) {
            if (expf((row[c] - max) / t) > 0.0f) {
                atomicMax(&last_positive, (u32)c);
                break;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const u32 id = drawn != 0xffffffffu ? drawn : last_positive;
            out_u32[r * 4 + 1] = id;
            out_f32[r * 2 + 1] = row[id];
        }
    } else if (threadIdx.x == 0 && !truncated) {
        out_u32[r * 4 + 1] = (u32)row_argmax;
        out_f32[r * 2 + 1] = max;
    }

    if (!(row_flags & SAMPLE_WANT_CANDIDATES) && !truncated) {
        if (threadIdx.x == 0) out_u32[r * 4 + 3] = 0;
        return;
    }

    // 4. The SAMPLE_CANDIDATES best finite logits: a radix select of the K-th largest key,
    //    8 bits at a time, then the keys above it plus the lowest ids equal to it.
    __shared__ u32 hist[256];
    __shared__ u32 prefix, prefix_mask, remaining, all_finite;
    const u32 neg_inf_key = sample_key(NEG_INF);
    if (threadIdx.x == 0) {
        prefix = 0;
        prefix_mask = 0;
        remaining = SAMPLE_CANDIDATES;
        all_finite = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        const u32 p = prefix, m = prefix_mask;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const u32 k = sample_key(row[c]);
            if (k > neg_inf_key && (k & m) == p) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0 && !all_finite) {
            u32 need = remaining;
            int chosen = -1;
            for (int b = 255; b >= 0; --b) {
                if (hist[b] >= need) { chosen = b; break; }
                need -= hist[b];
            }
            if (chosen < 0) {
                all_finite = 1;  // fewer finite logits than candidates: take them all
            } else {
                remaining = need;
                prefix |= (u32)chosen << shift;
                prefix_mask |= 255u << shift;
            }
        }
        __syncthreads();
        if (all_finite) break;
    }

    __shared__ float above_v[SAMPLE_CANDIDATES];
    __shared__ u32 above_i[SAMPLE_CANDIDATES];
    __shared__ u32 tie_i[SAMPLE_TIE_CAP];
    __shared__ u32 n_above, n_tie;
    if (threadIdx.x == 0) { n_above = 0; n_tie = 0; }
    __syncthreads();
    const u32 threshold = prefix;
    const bool take_all = all_finite != 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float l = row[c];
        const u32 k = sample_key(l);
        if (k <= neg_inf_key) continue;
        if (take_all || k > threshold) {
            const u32 at = atomicAdd(&n_above, 1u);
            if (at < SAMPLE_CANDIDATES) { above_v[at] = l; above_i[at] = (u32)c; }
        } else if (k == threshold) {
            const u32 at = atomicAdd(&n_tie, 1u);
            if (at < SAMPLE_TIE_CAP) tie_i[at] = (u32)c;
        }
    }
    __syncthreads();
    // The head: the best-ranked logits, exactly (head_len of them; past ties that overflowed,
    // only those above the tied value).
    __shared__ u32 head_len;
    if (threadIdx.x == 0) {
        // Few entries: one thread sorts them (insertion sort by rank; ties by lowest id).
        const u32 na = min(n_above, (u32)SAMPLE_CANDIDATES);
        for (u32 i = 1; i < na; ++i) {
            // Keys, not floats, so -0 ranks below +0 as the host's `total_cmp` ranks them.
            const float lv = above_v[i];
            const u32 lk = sample_key(lv), li = above_i[i];
            u32 j = i;
            while (j > 0 && (sample_key(above_v[j - 1]) < lk ||
                             (sample_key(above_v[j - 1]) == lk && above_i[j - 1] > li))) {
                above_v[j] = above_v[j - 1];
                above_i[j] = above_i[j - 1];
                --j;
            }
            above_v[j] = lv;
            above_i[j] = li;
        }
        u32 n = na;
        if (!take_all && n_tie <= SAMPLE_TIE_CAP) {
            // The `remaining` lowest ids among the ties, in id order.
            const float tie_value = row[tie_i[0]];
            u32 floor = 0;
            bool first = true;
            for (u32 k = 0; k < remaining && n < SAMPLE_CANDIDATES; ++k) {
                u32 best = 0xffffffffu;
                for (u32 j = 0; j < n_tie; ++j) {
                    const u32 id = tie_i[j];
                    if ((first || id > floor) && id < best) best = id;
                }
                if (best == 0xffffffffu) break;
                above_v[n] = tie_value;
                above_i[n] = best;
                ++n;
                floor = best;
                first = false;
            }
        }
        head_len = n;
        float* out_l = cand_logit + r * SAMPLE_CANDIDATES;
        u32* out_i = cand_id + r * SAMPLE_CANDIDATES;
        for (u32 i = 0; i < n; ++i) { out_l[i] = above_v[i]; out_i[i] = above_i[i]; }
        out_u32[r * 4 + 3] = n_tie > SAMPLE_TIE_CAP ? SAMPLE_CANDIDATES + 1 : n;
    }
    __syncthreads();
    if (!truncated) return;

    // 5. The truncated draw (sample_rank.cu).
    const u32 id = truncated_pick(rr, uniform[r], flags[r * 2 + 1], truncation[r * 2],
                                  truncation[r * 2 + 1], above_v, above_i, head_len,
                                  finite_weight[0], finite_weight[1]);
    if (threadIdx.x == 0) {
        out_u32[r * 4 + 1] = id;
        out_f32[r * 2 + 1] = row[id];
    }
}
