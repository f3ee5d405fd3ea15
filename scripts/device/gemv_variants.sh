#!/usr/bin/env bash
# Runs on a one-GPU device machine: decode steps of Llama-3.1-8B shapes in FP8 (FP8 KV cache,
# context 1024, or CONTEXT) under several settings, one `gpu_bench bench` each, to compare kernels.
# Binaries come in .kit/bin.
#
#   RUNS="name:VAR=VALUE[,VAR=VALUE] ..." (a '+' in a value is a space; GPU_BENCH=program runs
#   another build's gpu_bench, carried in .kit/bin), BATCHES (1,2,4,8), PREFILL (512: prompt
#   lengths timed whole), SHOW (the lines printed, an extended regex; default the decode
#   rows); each run's whole output is kept in $OUT/variants-NAME.log
#   RUNS="plain:TANDEM_FP8_GEMV_MMA=0 u4:TANDEM_KERNEL_DEFINES=GEMV8_MMA_UNROLL=4" \
#     scripts/device/gemv_variants.sh
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model llama-3.1-8b fp8 gen)
for run in ${RUNS:-"plain:TANDEM_FP8_GEMV_MMA=0 default:TANDEM_FP8_GEMV_MMA=1"}; do
  name=${run%%:*} setting=${run#*:}
  IFS=, read -ra vars <<<"${setting//+/ }"
  echo "== $name: ${vars[*]}"
  program=gpu_bench
  for v in "${vars[@]}"; do [[ $v == GPU_BENCH=* ]] && program=${v#GPU_BENCH=}; done
  env "${vars[@]}" TANDEM_BENCH_BLOCK=64 "$program" bench --model "$model" --kv-cache-dtype fp8 \
    --context "${CONTEXT:-1024}" --batches "${BATCHES:-1,2,4,8}" --prefill "${PREFILL:-512}" --iters 10 2>&1 |
    tee "$out/variants-$name.log" | grep -E "${SHOW:-^decode batch|rror}"
done
