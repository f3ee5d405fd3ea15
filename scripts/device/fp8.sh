#!/usr/bin/env bash
# Runs on a one-GPU device machine (FP8: compute capability 8.9+): FP8 weights checked and
# measured, correctness first, each stage's output under $OUT. Binaries come in .kit/bin
# (worker, gpu_bench, model-prep, tandem, api-server, and the test binaries cuda_fp8_test and
# cuda_backend_test). Stages, in the order given (default: tests check bench):
#
#   tests    workers/tests/cuda_fp8.rs (FP8 GPU logits against the CPU's on the same FP8
#            weights: tiny shapes and llama-d128-2l in FP8), then the bf16 GPU tests
#            (cuda_backend.rs) on the tiny model, which share the projection code
#   check    gpu_bench check of llama-d128-2l and SmolLM2 shapes in FP8 against the CPU
#   bench    gpu_bench bench on Llama-3.1-8B shapes in FP8, then in bf16 on the same GPU:
#            decode at batch 1, 32, 128, 256 (context 1024) against each one's bytes floor,
#            prefill of 2048 and 8192 tokens
#   offline-128-128, offline-2048-128, offline-1000-1000
#            one_gpu.sh's offline server runs with the FP8 model (N requests, TAG: fp8)
#
#   scripts/device/fp8.sh tests check bench
#   N=4096 scripts/device/fp8.sh offline-128-128
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests check bench)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      random_model tiny >/dev/null
      echo "== FP8 GPU tests"
      run_tests cuda_fp8 "$out/tests-fp8.log" \
        env TANDEM_TEST_MODELS="$models" \
        TANDEM_GPU_TEST_MODEL_FP8="$(random_model llama-d128-2l fp8)" \
        cuda_fp8_test --test-threads 1 --nocapture || status=1
      grep -E "FP8 GPU against CPU" "$out/tests-fp8.log"
      echo "== bf16 GPU tests (tiny)"
      run_tests cuda_backend "$out/tests-bf16.log" \
        env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
        cuda_backend_test --test-threads 1 || status=1
      ;;
    check)
      for preset in llama-d128-2l smollm2-135m; do
        echo "== check $preset fp8"
        # FP8 noise between two implementations (see workers/tests/cuda_fp8.rs): the bounds
        # catch a broken kernel, not FP8's own rounding.
        gpu_bench check --model "$(random_model "$preset" fp8)" --max-rel-l2 0.15 --min-top1 0.6 \
          >"$out/check-$preset-fp8.log" 2>&1 || { echo "check $preset fp8 FAILED"; status=1; }
        grep -iE "mean|top-1|PASS|FAIL" "$out/check-$preset-fp8.log"
      done
      ;;
    bench)
      for dtype in fp8 bf16; do
        echo "== bench llama-3.1-8b $dtype"
        TANDEM_BENCH_BLOCK=64 gpu_bench bench --model "$(random_model llama-3.1-8b "$dtype" gen)" \
          --batches 1,32,128,256 --prefill 2048,8192 --iters 10 --json "$out/bench-$dtype.json" 2>&1 |
          tee "$out/bench-$dtype.log" | grep -E "^ceilings|^FP8|^decode|^prefill"
      done
      ;;
    offline-*)
      MODEL_DTYPE=fp8 TAG=${TAG:-fp8} "$root/scripts/device/one_gpu.sh" "$stage" || status=1
      # The first errors the client saw, and the server's, where requests failed.
      python3 - "$out" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "offline-*-fp8*.json"))):
    for level in json.load(open(path)).get("levels", []):
        errors = level.get("errors") or []
        if errors:
            print(f"{os.path.basename(path)}: {len(errors)} errors, first: {errors[:3]}")
PY
      grep -iE "error|warn" "$out/large-batch-serve.log" | grep -v "error: stream" | head -5 | cut -c1-400
      ;;
    *)
      echo "unknown stage $stage (tests, check, bench, offline-128-128, offline-2048-128, offline-1000-1000)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
