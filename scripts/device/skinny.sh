#!/usr/bin/env bash
# Runs on the device machine (Hopper): skinny.cu's projections against cuBLAS, with
# the binaries carried in .kit/bin (gpu_bench; cuda_backend_test for the GPU test).
#
#   scripts/device/skinny.sh            # all of the below
#   STAGES="bench" scripts/device/skinny.sh
#
# Stages:
#   test   the GPU test of random shapes (9..256 rows) against a CPU reference, and run-to-run
#          equality (needs .kit/bin/cuda_backend_test: `cargo test --release -p tandem-workers
#          --test cuda_backend --no-run`)
#   check  gpu_bench check on llama-d128-2l (the whole model against the CPU backend), with
#          skinny.cu on and off
#   bench  gpu_bench bench on llama-3.1-8b shapes, decode at batch 1/32/128/256 (context 1024),
#          with TANDEM_SKINNY_GEMM=1 and =0 in separate processes; each run also prints the
#          table "projections, skinny.cu vs cuBLAS by rows" (weight TB/s of both in the same
#          call, and skinny's relative L2 against cuBLAS: gpu_bench fails above 1e-3)
#          (ONLY="1" or ONLY="0" runs one of the two: each run is a few minutes)
#   splits (not in the default stages) decode at batch 32 and 128 with TANDEM_SKINNY_SPLITS=1,
#          2, 4, 8 against the model's own choice (tuning the split of K)
# Output: stdout and $OUT/skinny-*.log, $OUT/skinny-bench-*.json; a summary at the end. A failed
# test, check or bench (or a test stage without its binary) fails the script after the summary.
set -euo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0
stages=${STAGES:-test check bench}
summary=$out/skinny-summary.txt
: >"$summary"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee -a "$summary"

for stage in $stages; do
  case "$stage" in
    test)
      if command -v cuda_backend_test >/dev/null; then
        random_model tiny >/dev/null
        echo "== GPU test: projections_of_decode_batches_match_a_cpu_reference" | tee -a "$summary"
        # The one test this stage is for: a skip fails it.
        run_tests --no-skips skinny "$out/skinny-test.log" \
          env TANDEM_TEST_MODELS="$models" cuda_backend_test --test-threads 1 --nocapture \
          projections_of_decode_batches_match_a_cpu_reference | tee -a "$summary" || status=1
        grep -E 'skinny.cu' "$out/skinny-test.log" | tee -a "$summary" || :
      else
        echo "== no .kit/bin/cuda_backend_test: the GPU test cannot run (FAILED)" | tee -a "$summary"
        status=1
      fi
      ;;
    check)
      dir=$(random_model llama-d128-2l)
      for on in 1 0; do
        echo "== gpu_bench check llama-d128-2l, TANDEM_SKINNY_GEMM=$on" | tee -a "$summary"
        if TANDEM_SKINNY_GEMM=$on gpu_bench check --model "$dir" --min-top1 0 >"$out/skinny-check-$on.log" 2>&1; then
          tail -4 "$out/skinny-check-$on.log" | tee -a "$summary"
        else
          status=1
          { echo "  FAILED (see $out/skinny-check-$on.log)"; tail -4 "$out/skinny-check-$on.log"; } | tee -a "$summary"
        fi
      done
      ;;
    bench)
      dir=$(random_model llama-3.1-8b)
      read -r -a args <<<"${GPU_BENCH_ARGS:---batches 1,32,128,256 --context 1024 --prefill 512 --iters 20}"
      for on in ${ONLY:-1 0}; do
        log=$out/skinny-bench-$on.log
        echo "== gpu_bench bench llama-3.1-8b, TANDEM_SKINNY_GEMM=$on: ${args[*]}" | tee -a "$summary"
        TANDEM_SKINNY_GEMM=$on gpu_bench bench --model "$dir" --json "$out/skinny-bench-$on.json" \
          "${args[@]}" >"$log" 2>&1 || { status=1; echo "  FAILED (see $log)" | tee -a "$summary"; }
        # The projection tables (once is enough: both runs print the same comparison) and the
        # decode rows.
        if [ "$on" = 1 ]; then
          sed -n '/^projections, cuBLAS by rows/,/^model /p' "$log" | grep -v '^model ' | tee -a "$summary"
        fi
        grep -E '^(workload|decode)' "$log" | tee -a "$summary" || : # none after a failed run
        grep -E 'disagrees|Error' "$log" | tee -a "$summary" || : # no such line: nothing to add
      done
      ;;
    splits)
      dir=$(random_model llama-3.1-8b)
      for splits in model 1 2 4 8; do
        log=$out/skinny-splits-$splits.log
        setting=()
        [ "$splits" = model ] || setting=(TANDEM_SKINNY_SPLITS="$splits")
        echo "== splits $splits" | tee -a "$summary"
        env "${setting[@]}" gpu_bench bench --model "$dir" --batches 32,128 --prefill 512 --iters 20 \
          >"$log" 2>&1 || { status=1; echo "  FAILED (see $log)" | tee -a "$summary"; }
        grep -E '^decode' "$log" | tee -a "$summary" || : # none after a failed run
      done
      ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2
      ;;
  esac
done
echo "== summary"
cat "$summary"
exit "$status"
