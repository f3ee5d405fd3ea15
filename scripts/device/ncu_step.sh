#!/usr/bin/env bash
# Runs on a one-GPU device machine: every kernel of one decode step of Llama-3.1-8B shapes (or
# PRESET's: random weights, 64-token blocks) under `ncu`, each launch's time and DRAM bytes read, summed
# by kernel and grid: which kernels read at what rate. Binaries come in .kit/bin.
#
#   WEIGHTS (fp8), DECODES (1), CONTEXT (1024), EXTRA (gpu_bench arguments, default
#   "--kv-cache-dtype fp8"), TAG (names the output files); CACHE=all flushes the caches before
#   each kernel (default none: a kernel finds what the ones before it left in L2, as in a step)
#   RUNS="plain:VAR=VALUE[,VAR=VALUE] ..." profiles the step once per setting
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model "${PRESET:-llama-3.1-8b}" "${WEIGHTS:-fp8}" gen)
export TANDEM_BENCH_BLOCK=64
for run in ${RUNS:-"default:TANDEM_BENCH_BLOCK=64"}; do
  name=${run%%:*} setting=${run#*:}
  IFS=, read -ra vars <<<"${setting//+/ }"
  csv="$out/step-${TAG:+$TAG-}$name.csv"
  # shellcheck disable=SC2086 # EXTRA is a list of arguments
  env "${vars[@]}" ncu --clock-control none --cache-control "${CACHE:-none}" --profile-from-start off \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
    gpu_bench mixed --model "$model" --decodes "${DECODES:-1}" --context "${CONTEXT:-1024}" \
    --chunks '' --iters 1 --profile ${EXTRA:---kv-cache-dtype fp8} >"$csv" 2>"$csv.err"
  python3 "$root/scripts/device/ncu_summary.py" "$csv" "$name" |
    tee "$out/step-${TAG:+$TAG-}$name.txt"
done
