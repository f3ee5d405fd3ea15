#!/usr/bin/env bash
# Runs on the device machine: `tandem serve` with the GPU example configs, on SmolLM2-135M
# shapes with random weights (no network there), one greedy request or two, the GPU memory each
# worker took and the KV transfer counters; for gpu-1 also the same config split over two
# launchers with `--only` and one nats-server. Binaries come in .kit/bin (stripped, gzipped
# release builds of tandem, worker, api-server, model-prep; see ../shared/device/README.md):
#
#   for b in tandem api-server worker model-prep; do strip -o .kit/bin/$b target/release/$b; gzip -f .kit/bin/$b; done
#   # then, with .kit carried: source .kit/env.sh;
#   scripts/device/serve_configs.sh gpu-1     # nvidia-h100-x1
#   scripts/device/serve_configs.sh gpu-2     # nvidia-h200-x2
set -uo pipefail
config=${1:?usage: serve_configs.sh gpu-1|gpu-2}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
export RUST_LOG=info
nvidia-smi --query-gpu=index,name,memory.total --format=csv
model-prep random --preset smollm2-135m -o /tmp/m --seed 0 >/dev/null 2>&1 || { echo "model-prep failed"; exit 1; }

wait_line() { # file needle seconds
  for _ in $(seq 1 $(($3 * 5))); do
    grep -q "$2" "$1" && return 0
    sleep 0.2
  done
  return 1
}
ask() { # port prompt
  curl -sS -m 120 "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"m\", \"prompt\": \"$2\", \"max_tokens\": 16, \"temperature\": 0}" | cut -c1-300
  echo
}
counters() { # port
  curl -sS "http://127.0.0.1:$1/metrics" |
    grep -E "^tandem_(requests_disaggregated_total|kv_transfer_bytes_total|kv_transfers_total|kv_transfer_fallbacks_total|kv_handles_refused_total|worker_total_kv_blocks)"
}

echo "== tandem serve -c examples/configs/$config.yaml"
tandem serve -c "examples/configs/$config.yaml" --model /tmp/m --port 8100 --ready-timeout-s 300 >"$out/$config.log" 2>&1 &
pid=$!
if wait_line "$out/$config.log" "tandem: serving" 300; then
  grep "tandem: serving" "$out/$config.log"
  ask 8100 "Once upon a time there was a small village by the sea where every morning the fishermen"
  ask 8100 "Hi"
  nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv
  nvidia-smi --query-gpu=index,uuid --format=csv
  counters 8100
else
  echo "NOT READY"
  tail -40 "$out/$config.log"
fi
kill -TERM "$pid"
wait "$pid"
echo "launcher exit: $?"
grep -E "model loaded|transfer pool|CUDA IPC|ERROR|WARN" "$out/$config.log" | cut -c1-400

if [ "$config" = gpu-1 ]; then
  echo "== the same config over two launchers (--only), one nats-server"
  nats-server -a 127.0.0.1 -p 4333 >"$out/nats.log" 2>&1 &
  npid=$!
  sleep 1
  common=(-c examples/configs/gpu-1.yaml --model /tmp/m --nats nats://127.0.0.1:4333)
  # The hosts' workers share one KV secret (a file on each host, here one file).
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >/tmp/kv-secret
  chmod 600 /tmp/kv-secret
  TANDEM_KV_SECRET_FILE=/tmp/kv-secret tandem serve "${common[@]}" --only workers >"$out/workers.log" 2>&1 &
  wpid=$!
  tandem serve "${common[@]}" --only api-server --port 8200 >"$out/front.log" 2>&1 &
  fpid=$!
  wait_line "$out/workers.log" "tandem: started" 60 && grep "tandem: started" "$out/workers.log"
  wait_line "$out/front.log" "tandem: serving" 60 && grep "tandem: serving" "$out/front.log"
  for _ in $(seq 1 150); do
    curl -sS -m 2 http://127.0.0.1:8200/health | grep -q '"context":1,"decode":1' && break
    sleep 1
  done
  curl -sS http://127.0.0.1:8200/health
  echo
  ask 8200 "Once upon a time there was a small village by the sea where every morning the fishermen"
  counters 8200
  kill -TERM "$wpid" "$fpid"
  wait "$wpid"
  echo "workers launcher exit: $?"
  wait "$fpid"
  echo "front launcher exit: $?"
  kill -TERM "$npid"
  wait "$npid"
fi
