#!/usr/bin/env bash
# Runs on a device machine: predicted outputs on one GPU, a model of generated weights
# (Llama-3.1-8B shapes unless PRESET says), one aggregated worker. `scripts/bench/prediction.py`
# with --ignore-eos: each request copies a paragraph, without a prediction, with the paragraph
# as its prediction, and with the plain run's answer as its prediction (every draft right: the
# ceiling of a decode at batch 1). With random weights the answers are noise, so only the
# ceiling and the check that every answer equals its plain run's mean anything.
#
#   scripts/device/prediction.sh [MAX_TOKENS]
#
# Environment: PRESET (llama-3.1-8b), DTYPE (bf16 or fp8), REQUESTS (8). Binaries come in
# .kit/bin. Output: stdout and $OUT (the table, the per-request JSON, the launcher's log).
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
max_tokens=${1:-128}
preset=${PRESET:-llama-3.1-8b}
dtype=${DTYPE:-bf16}
model=$(random_model "$preset" "$dtype" generated)
nvidia-smi --query-gpu=index,name --format=csv,noheader
config=$out/prediction-$dtype.yaml
cat >"$config" <<YAML
context_servers: { num_instances: 0 }
generation_servers: { num_instances: 1, device: "cuda:0", max_batch_size: 64 }
YAML
port=8331
serve_and_wait "$config" "$model" $port "$out/prediction-$dtype-serve.log" ||
  { tail -40 "$out/prediction-$dtype-serve.log"; exit 1; }
python3 "$root/scripts/bench/prediction.py" "http://127.0.0.1:$port" --ignore-eos \
  --max-tokens "$max_tokens" --requests "${REQUESTS:-8}" \
  --json "$out/prediction-$dtype.json" 2>&1 | tee "$out/prediction-$dtype.txt"
status=${PIPESTATUS[0]}
curl -s "http://127.0.0.1:$port/metrics" | grep -E "^tandem_worker_spec_decode" | tee -a "$out/prediction-$dtype.txt"
grep -E "steps in" "$out/prediction-$dtype-serve.log" | cut -c1-240 | tail -4
kill -TERM "$served_pid"
wait "$served_pid"
exit "$status"
