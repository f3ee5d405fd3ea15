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
  python3 - "$csv" "$name" <<'PY' | tee "$out/step-${TAG:+$TAG-}$name.txt"
import csv, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
launches = defaultdict(dict)
unit = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
        "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
for r in csv.DictReader(rows):
    key = (r["ID"], r["Kernel Name"].split("(")[0].split("<")[0], r.get("Grid Size", "?"))
    launches[key][r["Metric Name"]] = float(r["Metric Value"].replace(",", "")) * unit[r["Metric Unit"]]
groups = defaultdict(lambda: [0, 0.0, 0.0])
for (_, name, grid), m in launches.items():
    g = groups[(name, grid)]
    g[0] += 1
    g[1] += m.get("gpu__time_duration.sum", 0.0)
    g[2] += m.get("dram__bytes_read.sum", 0.0)
whole = sum(g[1] for g in groups.values())
print(f"{sys.argv[2]}: {whole:.3f} ms over {len(launches)} kernels (serialized)")
for (name, grid), (n, ms, b) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
    print(f"{ms:8.3f} ms x{n:4d} {1e3 * ms / n:7.2f} us {b / n / 1e6:8.2f} MB {b / ms / 1e9:6.2f} TB/s  {name} grid {grid}")
PY
done
