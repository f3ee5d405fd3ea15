#!/usr/bin/env bash
# Runs on a one-GPU device machine: where the time of one mixed step goes (decodes beside
# prompt chunks, as a server at 2048/128 runs them), on Llama-3.1-8B shapes in 64-token blocks.
# First `gpu_bench mixed` times the step whole and its parts alone; then `ncu` times every
# kernel of one profiled step (only the step: `gpu_bench mixed --profile` brackets it with
# cuProfilerStart/Stop) and the kernels are summed by name. Binaries come in .kit/bin.
#
#   scripts/device/ncu_mixed.sh       # DECODES (214), CONTEXT (2112), CHUNKS ("2048,1500+560")
#   EXTRA="..." adds gpu_bench arguments (--kv-cache-dtype fp8); TAG names the output files;
#   WEIGHTS=fp8 times FP8 weights (generated at load); CHUNKS='' times decodes alone
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
if [ "${WEIGHTS:-bf16}" = bf16 ]; then
  model=$(random_model llama-3.1-8b)
else
  model=$(random_model llama-3.1-8b "$WEIGHTS" gen)
fi
args=(mixed --model "$model" --decodes "${DECODES:-214}" --context "${CONTEXT:-2112}"
  --chunks "${CHUNKS-2048,1500+560}")
name="mixed${TAG:+-$TAG}"
export TANDEM_BENCH_BLOCK=64
# shellcheck disable=SC2086 # EXTRA is a list of arguments
gpu_bench "${args[@]}" ${EXTRA:-} 2>&1 | tee "$out/$name.txt"
# shellcheck disable=SC2086
ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
  gpu_bench "${args[@]}" --iters 1 --profile ${EXTRA:-} >"$out/$name-ncu.csv" 2>"$out/$name-ncu.err"
python3 - "$out/$name-ncu.csv" <<'PY' | tee "$out/$name-ncu.txt"
import csv, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
total, count = defaultdict(float), defaultdict(int)
for r in csv.DictReader(rows):
    if r["Metric Name"] != "gpu__time_duration.sum":
        continue
    scale = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "nsecond": 1e-6, "ms": 1.0, "msecond": 1.0}[r["Metric Unit"]]
    name = r["Kernel Name"].split("(")[0].split("<")[0]
    total[name] += float(r["Metric Value"].replace(",", "")) * scale
    count[name] += 1
whole = sum(total.values())
print(f"ncu: one mixed step, kernels serialized: {whole:.3f} ms over {sum(count.values())} kernels")
for name, ms in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"{ms:9.3f} ms {100 * ms / whole:5.1f}% x {count[name]:4d} {name}")
PY
