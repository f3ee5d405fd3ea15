#!/usr/bin/env bash
# Runs on a one-GPU device machine: Nsight Compute's full report of one kernel as it runs inside
# a mixed step of Llama-3.1-8B shapes (random weights generated at load, 64-token blocks): what
# bounds it (throughput against the memory and the SMs, warp stall reasons, occupancy, the
# instruction mix). Binaries come in .kit/bin.
#
#   KERNEL (a regex of kernel names, default the FP8 tensor-core decode attention),
#   DECODES (512), CONTEXT (1500), CHUNKS ('' : decodes only), WEIGHTS (fp8),
#   EXTRA (gpu_bench arguments, default "--kv-cache-dtype fp8"), COUNT (launches, 1), TAG
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model=$(random_model llama-3.1-8b "${WEIGHTS:-fp8}" gen)
export TANDEM_BENCH_BLOCK=64
name="kernel${TAG:+-$TAG}"
# shellcheck disable=SC2086 # EXTRA is a list of arguments
ncu --clock-control none --profile-from-start off --set full \
  --kernel-name "regex:${KERNEL:-paged_decode_mma_fp8}" --launch-count "${COUNT:-1}" \
  -o "$out/$name" -f \
  gpu_bench mixed --model "$model" --decodes "${DECODES:-512}" --context "${CONTEXT:-1500}" \
  --chunks "${CHUNKS-}" --iters 1 --profile ${EXTRA:---kv-cache-dtype fp8} \
  >"$out/$name.log" 2>&1
ncu --import "$out/$name.ncu-rep" --page details --print-units base >"$out/$name.txt" 2>&1
# The lines that say what bounds the kernel, first.
grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Executed Ipc Active|Registers Per Thread|Block Limit|Stall|L2 Hit|Warp Cycles Per Issued" \
  "$out/$name.txt" | head -60
