#!/usr/bin/env bash
# Runs on a one-GPU device machine: reproduces the CUDA_ERROR_ILLEGAL_ADDRESS an aggregated
# (`both`) worker hits on Llama-3.1-8B shapes once prefill chunks and CUDA-graph decode steps
# interleave (docs/gpu/aggregated-illegal-address-2026-11-23.txt). One worker on cuda:0 behind
# `tandem serve`, ~4.1k-token prompts, Poisson arrivals. Binaries come in .kit/bin (tandem,
# api-server, worker, model-prep; see ../shared/device/README.md).
#
#   scripts/device/graph_fault.sh                    # plain: counts the failed requests
#   SANITIZE=1 scripts/device/graph_fault.sh         # under compute-sanitizer memcheck
#   TANDEM_CUDA_GRAPHS=0 scripts/device/graph_fault.sh   # the same with graphs off (passes)
#
# MODEL (default llama-3.1-8b; smollm2-135m shapes did not fail), MAX_NUM_TOKENS (2048), WORDS
# (2467, about 4.1k tokens), N (6 requests), RATE (1 per second), OUTPUT_LEN (64).
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model "${MODEL:-llama-3.1-8b}")
cat >/tmp/graph-fault.yaml <<EOF
hostname: 127.0.0.1
context_servers:
  num_instances: 0
generation_servers:
  num_instances: 1
  device: "cuda:0"
  max_batch_size: 128
  max_num_tokens: ${MAX_NUM_TOKENS:-2048}
EOF
# `tandem serve` starts the `worker` beside it: a wrapper there puts it under the sanitizer.
bin=/tmp/graph-fault-bin
mkdir -p "$bin"
for b in tandem api-server; do cp "$root/.kit/bin/$b" "$bin/"; done
cp "$root/.kit/bin/worker" "$bin/worker-real"
if [ "${SANITIZE:-0}" = 1 ]; then
  printf '#!/bin/sh\nexec /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 3 --log-file %s/memcheck-%%p.log %s/worker-real "$@"\n' "$out" "$bin" >"$bin/worker"
else
  printf '#!/bin/sh\nexec %s/worker-real "$@"\n' "$bin" >"$bin/worker"
fi
chmod +x "$bin"/*

serve_and_wait /tmp/graph-fault.yaml "$model" 8400 "$out/graph-fault-serve.log" "$bin/tandem"
pid=$served_pid
tandem bench --url http://127.0.0.1:8400/v1 --endpoint completions --request-rate "${RATE:-1}" \
  --num-prompts "${N:-6}" --input-len "${WORDS:-2467}" --output-len "${OUTPUT_LEN:-64}" \
  --timeout-s 300 2>&1 | grep -v "error: stream" | tail -4
echo "worker errors: $(grep -c 'worker.*ERROR' "$out/graph-fault-serve.log")"
grep -m2 "worker.*ERROR" "$out/graph-fault-serve.log" | cut -c1-300
kill -TERM "$pid"
wait "$pid"
for log in "$out"/memcheck-*.log; do
  [ -e "$log" ] && grep -v "Host Frame" "$log" | head -12
done
