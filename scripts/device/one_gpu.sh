#!/usr/bin/env bash
# Runs on a one-GPU device machine: the CUDA backend's checks and measurements in one call, correctness
# first, each stage's output under $OUT with the stage's name. Binaries come in .kit/bin (the
# test binaries as in gpu_transfer.sh). Stages, in the order given (default: all of them):
#
#   tests     the GPU tests (workers/tests/cuda_backend.rs) on the tiny, SmolLM2 (head dim 64)
#             and llama-d128-2l (head dim 128) models
#   check     gpu_bench check against the CPU on llama-d128-2l and SmolLM2 shapes
#   bench     gpu_bench bench on Llama-3.1-8B shapes: decode at batch 1, 32, 128 and 256
#             (context 1024), prefill of 2048 and 8192 tokens, in 64-token KV blocks
#   offline   the three offline server runs of docs/benchmarks.md (large_batch.sh) at the
#             published tables' exact shapes, 128/128 (8,192 requests, 1,024 at once),
#             2048/128 (1,536, 512 at once) and 1000/1000 (256 at once) prompt/output tokens
#             (random prompt ids), with their engine step logs
#   offline-128-128, offline-2048-128, offline-1000-1000
#             one of them at the published request count (30,000; 3,000; 3,000) or N, MAX_BATCH
#             at once (1,024; 512; 256), each about 4-7 minutes: one device call each; TAG names the run's files
#             (GROWTH_RESERVE and PREFIX_CACHING pass through to large_batch.sh)
#
#   scripts/device/one_gpu.sh                 # everything (about 9 minutes: split it)
#   scripts/device/one_gpu.sh tests check     # correctness only
#
# A failed test or check fails the script once every stage has run; `tests` ends in a line of
# how many tests ran, were skipped and failed.
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests check bench offline)

offline() { # name max_batch levels requests input_tokens output_tokens
  echo "== offline $1"
  MAX_BATCH=$2 LEVELS=$3 N=$4 ISL_TOKENS=$5 OSL=$6 "$root/scripts/device/large_batch.sh"
  # large_batch.sh stops its server without waiting: the next run takes the same port.
  while pgrep -f "serve -c /tmp/large-batch.yaml" >/dev/null; do sleep 1; done
  mv "$out/large-batch.json" "$out/offline-$1.json"
  grep "engine:" "$out/large-batch-serve.log" | sed 's/.*engine: /engine: /' >"$out/offline-$1-engine-log.txt"
  tail -3 "$out/offline-$1-engine-log.txt"
}

for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      random_model tiny >/dev/null
      echo "== GPU tests"
      run_tests cuda_backend "$out/tests.log" \
        env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
        TANDEM_GPU_TEST_MODEL="$(random_model smollm2-135m)" \
        TANDEM_GPU_TEST_MODEL_D128="$(random_model llama-d128-2l)" \
        cuda_backend_test --test-threads 1 || status=1
      ;;
    check)
      for preset in llama-d128-2l smollm2-135m; do
        echo "== check $preset"
        gpu_bench check --model "$(random_model "$preset")" --max-rel-l2 2e-2 --min-top1 0 \
          >"$out/check-$preset.log" 2>&1 || { echo "check $preset FAILED"; status=1; }
        grep -iE "mean|top-1|PASS|FAIL" "$out/check-$preset.log"
      done
      ;;
    bench)
      echo "== bench llama-3.1-8b"
      TANDEM_BENCH_BLOCK=64 gpu_bench bench --model "$(random_model llama-3.1-8b)" \
        --batches 1,32,128,256 --prefill 2048,8192 --iters 10 --json "$out/bench.json" 2>&1 |
        tee "$out/bench.log" | grep -E "^decode|^prefill"
      ;;
    offline)
      # More requests than sequences at once, as the published tables run theirs (30,000 at
      # 128/128, 3,000 at the others): the ramp-up and drain weigh less. 1000/1000 keeps 256,
      # one wave, to fit a device call.
      offline 128-128 1024 1024 8192 128 128
      offline 2048-128 512 512 1536 2048 128
      offline 1000-1000 256 256 256 1000 1000
      ;;
    # MAX_BATCH: sequences at once (1,024 and 512 by default).
    offline-128-128)
      batch=${MAX_BATCH:-1024}
      offline "128-128-n${N:-30000}${MAX_BATCH:+-b$batch}${TAG:+-$TAG}" "$batch" "$batch" "${N:-30000}" 128 128
      ;;
    offline-2048-128)
      batch=${MAX_BATCH:-512}
      offline "2048-128-n${N:-3000}${MAX_BATCH:+-b$batch}${TAG:+-$TAG}" "$batch" "$batch" "${N:-3000}" 2048 128
      ;;
    offline-1000-1000)
      # MAX_BATCH: sequences at once (256 by default; an FP8 cache has room for twice that).
      batch=${MAX_BATCH:-256}
      offline "1000-1000-n${N:-3000}-b$batch${TAG:+-$TAG}" "$batch" "$batch" "${N:-3000}" 1000 1000
      ;;
    *)
      echo "unknown stage $stage (tests, check, bench, offline, offline-128-128, offline-2048-128, offline-1000-1000)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
