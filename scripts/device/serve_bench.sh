#!/usr/bin/env bash
# Runs on a device machine: serves one deployment config with a model of generated weights and
# measures it with `tandem bench` at Poisson rates, then reads the api-server's hand-over
# counters. For a config `tandem plan` wrote (from a stored profile, say) and checked on the
# GPUs it was planned for:
#
#   scripts/device/serve_bench.sh CONFIG RATES [GOODPUT]
#
# Environment: PRESET (llama-3.1-8b), ISL (3000), OSL (150), N (64 requests a rate), GOODPUT
# default ttft:2000,itl:50. Binaries come in .kit/bin. Output: stdout and $OUT (the bench
# JSON and text, the launcher's log, /metrics).
set -uo pipefail
config=${1:?usage: serve_bench.sh CONFIG RATES [GOODPUT]}
rates=${2:?usage: serve_bench.sh CONFIG RATES [GOODPUT]}
goodput=${3:-ttft:2000,itl:50}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
preset=${PRESET:-llama-3.1-8b}
model=$models/$preset-generated
[ -f "$model/config.json" ] ||
  model-prep random --preset "$preset" --generate-at-load -o "$model" >&2
nvidia-smi --query-gpu=index,name --format=csv,noheader
name=$(basename "$config" .yaml)
cp "$config" "$out/$name.yaml"
port=8330
started=$SECONDS
serve_and_wait "$config" "$model" $port "$out/$name-serve.log" || { tail -40 "$out/$name-serve.log"; exit 1; }
echo "serving after $((SECONDS - started)) s"
tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions --input-tokens "${ISL:-3000}" \
  --output-len "${OSL:-150}" --request-rate "$rates" --num-prompts "${N:-64}" --goodput "$goodput" \
  --timeout-s 300 --output-json "$out/$name-bench.json" 2>&1 | tee "$out/$name-bench.txt"
status=${PIPESTATUS[0]}
curl -s "http://127.0.0.1:$port/metrics" >"$out/$name-metrics.txt"
grep -E "^tandem_(kv_transfer_fallbacks_total|kv_transfers_total|requests_disaggregated_total)" \
  "$out/$name-metrics.txt" | grep -v " 0$"
grep -E "steps in" "$out/$name-serve.log" | cut -c1-240 | tail -6
kill -TERM "$served_pid"
wait "$served_pid"
echo "launcher exit: $?"
exit "$status"
