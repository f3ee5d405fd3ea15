#!/usr/bin/env bash
# Runs on a one-GPU device machine: disaggregation on ONE GPU. A context and a
# decode worker on cuda:0 run at the same time as clients of an MPS daemon, each optionally
# limited to a share of the SMs (the config's `mps_sm_percent`), against the same Poisson
# load as scripts/device/goodput_one_gpu.sh. Llama-3.1-8B shapes, random weights; binaries
# come in .kit/bin.
#
#   scripts/device/mps_one_gpu.sh 1233 128 "none:none 60:none"   # CONTEXT_SM:DECODE_SM variants
#
# RATES (4,6,8,10), NUM_PROMPTS (48), CTX_TOKENS (context max_num_tokens, 4096).
set -uo pipefail
words=${1:?usage: mps_one_gpu.sh INPUT_WORDS OUTPUT_TOKENS "CTX:DEC ..."}
osl=${2:?usage: mps_one_gpu.sh INPUT_WORDS OUTPUT_TOKENS "CTX:DEC ..."}
variants=${3:-none:none}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model "${MODEL:-llama-3.1-8b}")

mps=/usr/local/nvidia/bin/nvidia-cuda-mps-control
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
"$mps" -d || { echo "cannot start the MPS daemon ($mps)"; exit 1; }

for variant in $variants; do
  ctx=${variant%%:*}
  dec=${variant##*:}
  share() { [ "$1" = none ] || echo "  mps_sm_percent: $1"; }
  cat >/tmp/mps-one.yaml <<EOC
hostname: 127.0.0.1
context_servers:
  num_instances: 1
  device: "cuda:0"
  max_num_tokens: ${CTX_TOKENS:-4096}
  kv_cache_config: { max_tokens: 65536 }
$(share "$ctx")
generation_servers:
  num_instances: 1
  device: "cuda:0"
  max_batch_size: 256
  kv_cache_config: { max_tokens: 131072 }
$(share "$dec")
cache_transceiver_config:
  max_tokens_in_buffer: 65536
  cuda_ipc_pool_mb: 4096
EOC
  log="$out/mps-$ctx-$dec-$words-$osl-serve.log"
  serve_and_wait /tmp/mps-one.yaml "$model" 8430 "$log"
  pid=$served_pid
  echo "== context SMs: $ctx%, decode SMs: $dec% (MPS)"
  grep -o "started .*MPS client.*" "$log" | head -2
  tandem bench --url http://127.0.0.1:8430/v1 --endpoint completions --request-rate "${RATES:-4,6,8,10}" \
    --num-prompts "${NUM_PROMPTS:-48}" --input-len "$words" --output-len "$osl" \
    --goodput ttft:1000,itl:50 --timeout-s 300 \
    --output-json "$out/mps-$ctx-$dec-$words-$osl.json" 2>&1 | grep -v "error: stream" | tail -6
  curl -sS http://127.0.0.1:8430/metrics | grep -E "^tandem_(kv_transfers_total|kv_transfer_fallbacks_total|requests_disaggregated_total)" | grep -v " 0$"
  echo "worker errors: $(grep -c '\(context\|decode\)-0.*ERROR' "$log")"
  kill -TERM "$pid"
  wait "$pid"
done
echo quit | "$mps"
