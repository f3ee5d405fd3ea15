#!/usr/bin/env bash
# Runs on a one-GPU device machine: online runs (goodput under Poisson load). One aggregated worker on cuda:0
# (Llama-3.1-8B shapes, random weights) behind `tandem serve`, Poisson arrivals at each of
# RATES, goodput at TTFT <= 1 s and ITL <= 50 ms. Binaries come in .kit/bin.
#
#   scripts/device/goodput_one_gpu.sh 1233 128    # ~2048/128 tokens (words, output tokens)
#   scripts/device/goodput_one_gpu.sh 308 512     # ~512/512
#
# RATES (2,4,6,8), NUM_PROMPTS per level (64), MAX_BATCH (256), MAX_NUM_TOKENS (2048: the
# step's token budget, prefill chunks included).
set -uo pipefail
words=${1:?usage: goodput_one_gpu.sh INPUT_WORDS OUTPUT_TOKENS}
osl=${2:?usage: goodput_one_gpu.sh INPUT_WORDS OUTPUT_TOKENS}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model "${MODEL:-llama-3.1-8b}")
cat >/tmp/goodput-one.yaml <<EOC
hostname: 127.0.0.1
context_servers:
  num_instances: 0
generation_servers:
  num_instances: 1
  device: "cuda:0"
  max_batch_size: ${MAX_BATCH:-256}
  max_num_tokens: ${MAX_NUM_TOKENS:-2048}
EOC
serve_and_wait /tmp/goodput-one.yaml "$model" 8420 "$out/goodput-one-$words-$osl-serve.log"
pid=$served_pid
tandem bench --url http://127.0.0.1:8420/v1 --endpoint completions --request-rate "${RATES:-2,4,6,8}" \
  --num-prompts "${NUM_PROMPTS:-64}" --input-len "$words" --output-len "$osl" \
  --goodput ttft:1000,itl:50 --timeout-s 300 \
  --output-json "$out/goodput-one-$words-$osl.json" 2>&1 | grep -v "error: stream" | tail -8
echo "worker errors: $(grep -c 'worker.*ERROR' "$out/goodput-one-$words-$osl-serve.log")"
kill -TERM "$pid"
wait "$pid"
