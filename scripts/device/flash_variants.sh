#!/usr/bin/env bash
# Runs on the device machine: the prefill attention kernel's tile settings (flash.cu's FA_KEYS,
# FA_Q_SMEM; two query heads per block or one), each checked against the CPU backend on the
# head-dim-128 shapes and timed alone at 2048 and 8192 tokens (one layer of Llama-3.1-8B's
# attention shape), then the whole Llama-3.1-8B prefill with $BEST next to torch in the same call.
#
#   VARIANTS="base:: q:FA_Q_SMEM=1: k64q:FA_KEYS=64 FA_Q_SMEM=1:" scripts/device/flash_variants.sh
#   (name:defines:pairs, pairs empty = on, 0 = off)   BEST="FA_KEYS=64 FA_Q_SMEM=1" to add the 8B run
set -euo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
small=$(random_model llama-d128-2l)
# GPU workers' KV blocks (64 tokens: a TMA box per block); gpu_bench's own default is 16.
export TANDEM_BENCH_BLOCK=${TANDEM_BENCH_BLOCK:-64}
variants=${VARIANTS:-"base:: q:FA_Q_SMEM=1: k64:FA_KEYS=64: k64q:FA_KEYS=64 FA_Q_SMEM=1: k128q:FA_KEYS=128 FA_Q_SMEM=1: k64q-h1:FA_KEYS=64 FA_Q_SMEM=1:0"}
# Split on the spaces between variants (a variant's defines contain spaces: entries end in ':' + pairs).
python3 - "$variants" >"$out/variants.txt" <<'PY'
import re, sys
for m in re.finditer(r"(\S+?):([^:]*):(\d*)(?:\s+|$)", sys.argv[1]):
    print("\t".join(m.groups()))
PY
summary="$out/flash-variants-summary.txt"
: >"$summary"
while IFS=$'\t' read -r name defines pairs; do
  echo "== $name: defines '$defines', pairs ${pairs:-on}"
  export TANDEM_KERNEL_DEFINES="$defines" TANDEM_FLASH_PAIRS="${pairs:-1}"
  # The committed kernel measures 1.042e-2 on these shapes (bf16 K/V against the f32 CPU
  # reference); a wrong attention is off by orders of magnitude more.
  if gpu_bench check --model "$small" --min-top1 0 --max-rel-l2 2e-2 >"$out/check-$name.log" 2>&1; then ok=pass; else ok=FAIL; fi
  tail -3 "$out/check-$name.log"
  gpu_bench bench --model "$small" --batches 1 --prefill 2048,8192 --iters 20 >"$out/bench-$name.log" 2>&1 || echo "bench $name failed"
  attention=$(grep "prefill attention" "$out/bench-$name.log" | sed 's/prefill attention //' | tr '\n' ' ')
  printf '%-8s check %-4s %s\n' "$name" "$ok" "$attention" | tee -a "$summary"
done <"$out/variants.txt"
unset TANDEM_KERNEL_DEFINES TANDEM_FLASH_PAIRS
if [ "${BEST:-}" = auto ]; then
  # The variant whose check passed with the fastest 8192-token attention.
  best_line=$(python3 - "$summary" "$out/variants.txt" <<'PY'
import re, sys
rows = [l for l in open(sys.argv[1]) if " check pass " in l]
defs = {v.split("\t")[0]: v.rstrip("\n").split("\t") for v in open(sys.argv[2])}
def ms(l):
    m = re.search(r"8192 tokens \(one layer\): ([0-9.]+) ms", l)
    return float(m.group(1)) if m else 1e9
best = min(rows, key=ms).split()[0]
print("\t".join(defs[best]))
PY
)
  IFS=$'\t' read -r best_name BEST best_pairs <<<"$best_line"
  export TANDEM_FLASH_PAIRS="${best_pairs:-1}"
  echo "best: $best_name ($BEST, pairs ${best_pairs:-on})"
fi
if [ -n "${BEST:-}" ]; then
  big=$(random_model llama-3.1-8b)
  echo "== Llama-3.1-8B, default kernels"
  gpu_bench bench --model "$big" --batches 1 --prefill 2048,8192 --iters 10 2>&1 | tee "$out/bench-8b-default.log" | grep -E "prefill|decode batch"
  echo "== Llama-3.1-8B, $BEST"
  TANDEM_KERNEL_DEFINES="$BEST" gpu_bench bench --model "$big" --batches 1 --prefill 2048,8192 --iters 10 2>&1 | tee "$out/bench-8b-best.log" | grep -E "prefill|decode batch"
  echo "== torch, same call"
  python3 "$root/scripts/device/torch_bench.py" --model "$big" --batches 1 --prefill 2048,8192 --iters 10 2>&1 | tee "$out/torch-8b.log" | tail -8
fi
echo "== summary"
cat "$summary"
