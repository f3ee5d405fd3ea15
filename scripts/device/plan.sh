#!/usr/bin/env bash
# Runs on a two-GPU device machine (nvidia-h100-x2 or nvidia-h200-x2): `tandem plan` for
# Llama-3.1-8B shapes (random weights) over cuda:0 and cuda:1, profiling TP=1 and TP=2, for
# one of two workloads (one stage per call, each well under the 10 minutes of a command):
#
#   scripts/device/plan.sh 3000     # ISL 3000 / OSL 150, TTFT <= 2000 ms (p90), ITL <= 50 ms
#   scripts/device/plan.sh 4093     # ISL 4093 / OSL 256, TTFT <= 2000 ms (p90), ITL <= 20 ms
#   scripts/device/plan.sh check    # serves $OUT/plan-3000.yaml (from a `3000` run on this
#                                   # machine) and runs the `tandem bench` of its comments
#
# Binaries come in .kit/bin (stripped, gzipped release builds of tandem, worker, api-server and
# model-prep; see scripts/device/kit-env.sh). Each workload writes to $OUT:
#   plan-ISL.profile.json     the profile (prefill, decode ladder, interference, per TP size)
#   plan-ISL.yaml             the proposed deployment, commented with the numbers it came from
#   plan-ISL.alternative.yaml the best deployment of the other kind
#   plan-ISL.log              the planner's output (table and measurements)
#   plan-ISL.replan-*.yaml    re-plans from the stored profile for other targets (no measuring)
# and the profiled deployments' configs and logs under $OUT/plan-ISL-work/.
#
# Knobs (environment): TP (default 1,2), MAX_BATCH (default 256: the ladder also ends at the
# KV cache's limit and after the first batch above the ITL target), PREFILL_REPEATS (5),
# STEADY_TOKENS (32), INTERFERENCE_BATCH (8,32), MAX_NUM_TOKENS (2048). With the defaults one
# TP size of the 8B model should profile in about two minutes on an H100 once its worker is up
# (an estimate; the script prints the time each plan took).
set -uo pipefail
stage=${1:?usage: plan.sh 3000 | 4093 | check}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"

llama=$(random_model llama-3.1-8b)
nvidia-smi --query-gpu=index,name,memory.total --format=csv

plan() { # isl osl ttft_ms itl_ms
  local name="plan-$1"
  echo "== tandem plan: ISL $1 / OSL $2, TTFT p90 <= $3 ms, ITL <= $4 ms, TP ${TP:-1,2}"
  local started=$SECONDS
  tandem plan --model "$llama" --gpus 2 --tp "${TP:-1,2}" \
    --isl "$1" --osl "$2" --ttft-ms "$3" --itl-ms "$4" \
    --max-batch "${MAX_BATCH:-256}" --prefill-repeats "${PREFILL_REPEATS:-5}" \
    --steady-tokens "${STEADY_TOKENS:-32}" --interference-batch "${INTERFERENCE_BATCH:-8,32}" \
    --max-num-tokens "${MAX_NUM_TOKENS:-2048}" --ready-timeout-s 400 \
    --work-dir "$out/$name-work" --profile-out "$out/$name.profile.json" \
    --output "$out/$name.yaml" --output-alternative "$out/$name.alternative.yaml" \
    >"$out/$name.log" 2>&1
  local status=$?
  echo "tandem plan exit: $status after $((SECONDS - started)) s"
  cat "$out/$name.log"
  [ "$status" -eq 0 ] || return "$status"
  echo "== the proposal ($out/$name.yaml)"
  cat "$out/$name.yaml"
  # The same profile, other targets: instant, and shows how the choice moves.
  for itl in 15 100; do
    tandem plan --profile-in "$out/$name.profile.json" --gpus 2 --osl "$2" --ttft-ms "$3" \
      --itl-ms "$itl" --output "$out/$name.replan-itl$itl.yaml" 2>&1 | grep -E "^\*|deployment:"
  done
}

case "$stage" in
  3000) plan 3000 150 2000 50 ;;
  4093) plan 4093 256 2000 20 ;;
  check)
    config=$out/plan-3000.yaml
    [ -f "$config" ] || { echo "no $config: run \`plan.sh 3000\` first on this machine"; exit 1; }
    bench=$(grep -m1 -o 'tandem bench .*' "$config")
    port=8400
    serve_and_wait "$config" "$llama" $port "$out/plan-check-serve.log" || exit 1
    grep "tandem: serving" "$out/plan-check-serve.log"
    echo "== $bench"
    # shellcheck disable=SC2086 # the command's words, as the config's comment gives them
    $bench --url "http://127.0.0.1:$port/v1" --output-json "$out/plan-check-bench.json"
    kill -TERM "$served_pid"
    wait "$served_pid"
    echo "launcher exit: $?"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
