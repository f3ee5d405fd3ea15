#!/usr/bin/env bash
# Runs on a one-GPU device machine: offline throughput of two builds of the server, one after
# the other on the same GPU, at 128/128 prompt/output tokens (one_gpu.sh's offline-128-128,
# N requests, 1,024 at once), so that a change is measured against the tree before it.
#
#   scripts/device/ab_offline.sh before after [after:no-cache]
#
# Each name is a directory .kit/NAME holding that build's tandem.gz, worker.gz and
# api-server.gz; they are unpacked over .kit/bin before its run (the other binaries there stay).
# A name with the suffix ":no-cache" runs that build with prefix caching off. N (default 8192)
# passes through. The last lines: each run's output tokens/s.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${OUT:-/tmp/tandem-out}
status=0
results=()
for variant in "$@"; do
  build=${variant%%:*}
  caching=
  [ "$variant" != "$build" ] && caching=false
  [ -d "$root/.kit/$build" ] || { echo "no .kit/$build" >&2; exit 2; }
  cp "$root/.kit/$build"/*.gz "$root/.kit/bin/"
  tag=${variant//:/-}
  echo "== $variant"
  PREFIX_CACHING=$caching N=${N:-8192} TAG=$tag "$root/scripts/device/one_gpu.sh" offline-128-128 ||
    status=1
  json="$out/offline-128-128-n${N:-8192}-$tag.json"
  tps=$(python3 -c 'import json,sys; l=json.load(open(sys.argv[1]))["levels"][-1]; print(round(l["output_token_throughput"]))' "$json" 2>/dev/null || echo "?")
  results+=("$variant: $tps output tok/s")
done
printf '%s\n' "${results[@]}"
exit "$status"
