#!/usr/bin/env bash
# Runs on a one-GPU device machine: one aggregated worker with a large max_batch_size on
# Llama-3.1-8B shapes, all requests at once through HTTP (`tandem bench --concurrency`), the
# run that once faulted at 256 sequences. Binaries come in .kit/bin.
#
#   scripts/device/large_batch.sh       # MAX_BATCH (512), LEVELS (128,256,512), N (1024),
#                                       # ISL_WORDS (77, about 128 tokens), OSL (128), MAX_NUM_TOKENS (8192)
#                                       # ISL_TOKENS: exactly that many prompt tokens (random
#                                       # ids, `tandem bench --input-tokens`) instead of words;
#                                       # GROWTH_RESERVE: the group's growth_reserve_tokens;
#                                       # TEMPERATURE, TOP_P: every request's sampling (greedy)
#                                       # PREFIX_CACHING: false turns the worker's prefix
#                                       # caching off (kv_cache_config.enable_block_reuse)
#                                       # MODEL_DTYPE: fp8 serves the FP8 model of MODEL's
#                                       # shapes (model-prep random --dtype fp8)
#                                       # KV_DTYPE: fp8 gives the worker an FP8 KV cache
#                                       # (kv_cache_config.dtype)
# The GPU's SM clock, power and clock-limit reasons are sampled every second while the
# requests run (large-batch-gpu.csv); the summary line averages the samples above 300 W.
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model "${MODEL:-llama-3.1-8b}" "${MODEL_DTYPE:-bf16}")
cache_keys=()
[ -n "${PREFIX_CACHING:-}" ] && cache_keys+=("enable_block_reuse: $PREFIX_CACHING")
[ -n "${KV_DTYPE:-}" ] && cache_keys+=("dtype: $KV_DTYPE")
cache_line=
[ ${#cache_keys[@]} -gt 0 ] && cache_line="  kv_cache_config: { $(IFS=,; echo "${cache_keys[*]}") }"
cat >/tmp/large-batch.yaml <<EOC
hostname: 127.0.0.1
context_servers:
  num_instances: 0
generation_servers:
  num_instances: 1
  device: "cuda:0"
  max_batch_size: ${MAX_BATCH:-512}
  max_num_tokens: ${MAX_NUM_TOKENS:-8192}
${GROWTH_RESERVE:+  growth_reserve_tokens: $GROWTH_RESERVE}
${cache_line}
EOC
serve_and_wait /tmp/large-batch.yaml "$model" 8410 "$out/large-batch-serve.log"
pid=$served_pid
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader,nounits -lms 1000 >"$out/large-batch-gpu.csv" 2>&1 &
smi=$!
if [ -n "${ISL_TOKENS:-}" ]; then
  input=(--input-tokens "$ISL_TOKENS")
else
  input=(--input-len "${ISL_WORDS:-77}")
fi
tandem bench --url http://127.0.0.1:8410/v1 --endpoint completions \
  --concurrency "${LEVELS:-128,256,512}" --num-prompts "${N:-1024}" \
  "${input[@]}" --output-len "${OSL:-128}" --timeout-s 500 \
  --temperature "${TEMPERATURE:-0}" ${TOP_P:+--top-p "$TOP_P"} \
  --output-json "$out/large-batch.json" 2>&1 | grep -v "error: stream" | tail -6
kill "$smi" 2>/dev/null
awk -F', ' '$3 > 300 { n++; clock += $2; power += $3; limit = $4; reasons[$6]++ }
  END { if (n) { printf "GPU while busy (%d samples): SM clock %.0f MHz, power %.0f of %.0f W; reasons", n, clock / n, power / n, limit
                 for (r in reasons) printf " %s x%d", r, reasons[r]; print "" } }' "$out/large-batch-gpu.csv"
echo "worker errors: $(grep -c 'worker.*ERROR' "$out/large-batch-serve.log")"
grep -m3 "worker.*ERROR" "$out/large-batch-serve.log" | cut -c1-300
kill -TERM "$pid"
wait "$pid"
