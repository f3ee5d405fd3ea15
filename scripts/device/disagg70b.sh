#!/usr/bin/env bash
# Runs on a four-GPU device machine (nvidia-h100-x4 or nvidia-h200-x4): Llama-3.1-70B shapes
# (weights generated at load), disaggregated against aggregated, as the comparison Dynamo
# publishes (ISL 3,000 / OSL 150). One deployment a call (each loads 141 GB of weights twice):
#
#   scripts/device/disagg70b.sh disaggregated [RATES]  # 1 context TP=2 (cuda:0-1) + 1 decode
#                                                      # TP=2 (cuda:2-3), hand-overs over CUDA IPC
#   scripts/device/disagg70b.sh aggregated [RATES]     # 2 `both` workers TP=2 (cuda:0-1, 2-3)
#   scripts/device/disagg70b.sh conditional [RATES]    # as disaggregated, but the context worker
#                                                      # holds at most 2 prefills and COND_QUEUE
#                                                      # (1) queued: past that the api-server has
#                                                      # the decode worker prefill, in chunks of
#                                                      # COND_CHUNK (2048) tokens (`context_full`
#                                                      # fallback)
#   CONFIG=plan.yaml scripts/device/disagg70b.sh planned [RATES]
#                                                      # the deployment a YAML file gives (a
#                                                      # `tandem plan` output), served as it is
#
# Each runs `tandem bench --input-tokens ISL --output-len OSL --request-rate RATES
# --num-prompts N --goodput ttft:2000,itl:50` (ISL, OSL, N from the environment: 3000, 150,
# 64), then reads the api-server's counters: hand-overs by transport, fallbacks, the KV
# transfer histogram and, where the server has it, the TTFT split. Binaries come in .kit/bin.
# Output: stdout and $OUT (the bench JSON, the launcher's log, /metrics).
set -uo pipefail
stage=${1:?usage: disagg70b.sh disaggregated|aggregated|conditional|planned [RATES]}
rates=${2:-1,2,3}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
isl=${ISL:-3000}
osl=${OSL:-150}
n=${N:-64}
port=8320

llama70=$models/llama-3.1-70b-generated
[ -f "$llama70/config.json" ] ||
  model-prep random --preset llama-3.1-70b --generate-at-load -o "$llama70" >&2
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

config=$out/$stage-70b.yaml
case "$stage" in
  disaggregated)
    cat >"$config" <<'EOF'
hostname: 127.0.0.1
context_servers:
  num_instances: 1
  device: "cuda:0"
  tensor_parallel_size: 2
  max_num_tokens: 4096
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
  cache_transceiver_config:
    max_tokens_in_buffer: 32768
generation_servers:
  num_instances: 1
  device: "cuda:2"
  tensor_parallel_size: 2
  max_batch_size: 64
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
router:
  max_local_prefill_length: 32
EOF
    ;;
  conditional)
    cat >"$config" <<EOF
hostname: 127.0.0.1
context_servers:
  num_instances: 1
  device: "cuda:0"
  tensor_parallel_size: 2
  max_batch_size: 2
  max_queued_requests: ${COND_QUEUE:-1}
  max_num_tokens: 4096
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
  cache_transceiver_config:
    max_tokens_in_buffer: 32768
generation_servers:
  num_instances: 1
  device: "cuda:2"
  tensor_parallel_size: 2
  max_batch_size: 64
  max_num_tokens: ${COND_CHUNK:-2048}
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
router:
  max_local_prefill_length: 32
EOF
    ;;
  aggregated)
    cat >"$config" <<'EOF'
hostname: 127.0.0.1
context_servers:
  num_instances: 0
generation_servers:
  num_instances: 2
  device: ["cuda:0", "cuda:2"]
  tensor_parallel_size: 2
  max_batch_size: 64
  max_num_tokens: 4096
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
EOF
    ;;
  planned)
    cp "${CONFIG:?planned: CONFIG names the YAML file to serve}" "$config"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac

log=$out/$stage-70b-serve.log
started=$SECONDS
serve_and_wait "$config" "$llama70" $port "$log" || { tail -40 "$log"; exit 1; }
echo "serving after $((SECONDS - started)) s"
grep -E "model loaded|kv_blocks|CUDA IPC ready|shared over CUDA IPC|tandem: serving" "$log" | cut -c1-260
tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions --input-tokens "$isl" \
  --output-len "$osl" --request-rate "$rates" --num-prompts "$n" --goodput ttft:2000,itl:50 \
  --timeout-s 300 --output-json "$out/$stage-70b-bench.json" 2>&1 | tee "$out/$stage-70b-bench.txt"
status=${PIPESTATUS[0]}
curl -s "http://127.0.0.1:$port/metrics" >"$out/$stage-70b-metrics.txt"
grep -E "^tandem_(kv_transfer_fallbacks_total|kv_transfers_total|kv_transfer_seconds_(sum|count)|ttft_part_seconds_(sum|count)|requests_disaggregated_total|prefill_fallbacks_total|kv_pinned)" \
  "$out/$stage-70b-metrics.txt"
grep -E "steps in|ERROR|WARN" "$log" | cut -c1-260 | tail -12
kill -TERM "$served_pid"
wait "$served_pid"
echo "launcher exit: $?"
exit "$status"
