#!/usr/bin/env bash
# Runs on a device machine: scripts/soak with the workers on its GPUs (a random SmolLM2-135M),
# release binaries from .kit/bin.
#
#   scripts/device/soak_gpu.sh one-decode [SECONDS]  # 1 context + 1 decode worker, 100 streams,
#       # no kills: once with .kit/bin's api-server and, when .kit/bin/api-server-old.gz was
#       # carried, once with that one (how a lone generation worker's queue is counted)
#   scripts/device/soak_gpu.sh kills [MINUTES]       # 1 context + 2 decode workers, 100 streams,
#       # a SIGKILL every 20 s, greedy ties within TIE_MARGIN nats (default 0.05) allowed, in
#       # ROUNDS rounds (default 2), each ending idle with the RSS of every process
#   scripts/device/soak_gpu.sh two-gpu [MINUTES]     # the same with the context worker on cuda:0
#       # and both decode workers on cuda:1 (every hand-over crosses GPUs: CUDA IPC)
#
# Output under $OUT: each run's summary (JSON), its stdout and the deployment's log (gzip).
set -euo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model smollm2-135m)
export TANDEM_CACHE_DIR=${TANDEM_CACHE_DIR:-/tmp/tk}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

soak() { # name tandem-program soak-arguments...
  local name=$1 program=$2 port=8310
  shift 2
  local status=0
  python3 "$root/scripts/soak" --model "$model" --tandem "$program" \
    --streams 100 --port "$port" --json "$out/$name.json" --tie-margin "${TIE_MARGIN:-0.05}" \
    "$@" >"$out/$name.log" 2>&1 || status=$?
  gzip -c "/tmp/soak-serve-$port.log" >"$out/$name-serve.log.gz"
  echo "== $name (exit $status)"
  python3 - "$out/$name.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"counts {s['counts']}, {s['requests_per_s']} requests/s, kills {len(s['kills'])}")
print(f"verdict {s['verdict']}")
print(f"ties {s.get('ties')}")
for p in s["problems"][:8]:
    print(f"  {p}")
EOF
}

case "${1:-}" in
  one-decode)
    seconds=${2:-90}
    minutes=$(python3 -c "print($seconds / 60)")
    soak one-decode-new tandem --device cuda:0 --decode-workers 1 --kill-every 0 --rounds 1 \
      --minutes "$minutes"
    if [ -x "$root/.kit/bin/api-server-old" ]; then
      # The launcher runs the api-server beside it: a directory of its own for the old one.
      old=/tmp/old-bin
      mkdir -p "$old"
      cp "$root/.kit/bin/tandem" "$root/.kit/bin/worker" "$old/"
      cp "$root/.kit/bin/api-server-old" "$old/api-server"
      soak one-decode-old "$old/tandem" --device cuda:0 --decode-workers 1 --kill-every 0 \
        --rounds 1 --minutes "$minutes"
    fi
    ;;
  kills)
    soak kills tandem --device cuda:0 --minutes "${2:-4}" --kill-every 20 --rounds "${ROUNDS:-2}"
    ;;
  two-gpu)
    soak two-gpu tandem --device cuda:0 --decode-device cuda:1 --minutes "${2:-4}" \
      --kill-every 20
    ;;
  *)
    echo "usage: $0 one-decode [SECONDS] | kills [MINUTES] | two-gpu [MINUTES]" >&2
    exit 2
    ;;
esac
