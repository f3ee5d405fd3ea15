#!/usr/bin/env bash
# Runs on the device machine: times decode steps of one preset under several environment
# settings (tuning knobs such as TANDEM_L2_PREFETCH_MB or TANDEM_KERNEL_DEFINES), each in its own
# gpu_bench process, and prints one table at the end.
#
#   scripts/device/decode_sweep.sh PRESET 'TANDEM_L2_PREFETCH_MB=0' 'TANDEM_L2_PREFETCH_MB=16' ...
#
# GPU_BENCH_ARGS overrides the workload (default: batches 1 and 8, one 512-token prefill).
set -euo pipefail
preset=${1:?usage: decode_sweep.sh PRESET SETTING...}
shift
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
dir=$(random_model "$preset")
read -r -a args <<<"${GPU_BENCH_ARGS:---batches 1,8 --prefill 512 --iters 30}"
summary=$out/sweep-$preset.txt
: >"$summary"
for setting in "$@"; do
  log=$out/sweep-$preset-$(echo "$setting" | tr -c 'A-Za-z0-9_=\n' _).log
  echo "== $setting"
  # shellcheck disable=SC2086 # each setting is one or more NAME=VALUE words
  env $setting gpu_bench bench --model "$dir" "${args[@]}" >"$log" 2>&1 || echo "  failed (see $log)"
  grep -E '^(decode|prefill)' "$log" | sed "s|^|$setting  |" | tee -a "$summary"
done
echo "== summary ($preset; ${args[*]})"
cat "$summary"
