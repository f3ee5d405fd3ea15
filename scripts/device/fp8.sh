#!/usr/bin/env bash
# Runs on a one-GPU device machine (FP8: compute capability 8.9+): FP8 weights checked and
# measured, correctness first, each stage's output under $OUT. Binaries come in .kit/bin
# (worker, gpu_bench, model-prep, tandem, api-server, and the test binaries cuda_fp8_test and
# cuda_backend_test). Stages, in the order given (default: tests check bench):
#
#   tests    workers/tests/cuda_fp8.rs (FP8 GPU logits against the CPU's on the same FP8
#            weights: tiny shapes and llama-d128-2l in FP8; an FP8 KV cache against the CPU's
#            on tiny, llama-d128-2l and SmolLM2 shapes), then the bf16 GPU tests
#            (cuda_backend.rs) on the tiny model, which share the projection code
#            (tests-fp8: the first part only)
#   check    gpu_bench check of llama-d128-2l and SmolLM2 shapes in FP8 against the CPU
#   check-mixed
#            gpu_bench check of SmolLM2 shapes quantized to FP8 but for their first and last
#            layers (`model-prep quantize --keep`), against the CPU on the same weights
#   bench    gpu_bench bench on Llama-3.1-8B shapes in FP8, then in bf16 on the same GPU:
#            decode at batch 1, 32, 128, 256 (context 1024) against each one's bytes floor,
#            prefill of 2048 and 8192 tokens
#   offline-128-128, offline-2048-128, offline-1000-1000
#            one_gpu.sh's offline server runs with the FP8 model (N requests, TAG: fp8)
#   skinny   gpu_bench bench on Llama-3.1-8B shapes in FP8 (FP8 KV cache), decode projections on
#            cuBLASLt (TANDEM_SKINNY_FP8=0) and then on skinny.cu's FP8 kernel (the default on
#            Hopper): decode at batch 1, 16, 32, 64, 128, 256 (context 1024), and the
#            projection table of the two kernels (weight TB/s, relative L2)
#   fused    the same bench with the FP8 projections' input quantized by the norms and silu_mul
#            (the default) and by a kernel of its own (TANDEM_FP8_FUSED_QUANT=0)
#   widen    the same bench with prefill attention over the FP8 cache on flash.cu's FP8 kernel
#            (TANDEM_FP8_PREFILL_WIDEN=0) and on the warpgroup kernel over a bf16 copy of the
#            blocks (the default)
#   fast-accum
#            cuBLASLt's FP8 fast accumulation (TANDEM_FP8_FAST_ACCUM, on by default): the FP8
#            GPU tests with it on, then a 2048/128 server step (gpu_bench mixed) off and on,
#            alternating twice
#   tune     the FP8 products' configurations chosen by timing (TANDEM_FP8_TUNE, on by
#            default) against the heuristic's: a 2048/128 server step and a decode step of 768
#            sequences at context 1500 (a 1000/1000 run's), off and on, alternating twice
#            (the workers' start-up prefills, which tune every row bucket, are not gpu_bench's)
#   rope     rope_cache_write in shared memory and the prefill rows' q in bf16 (both on by
#            default), and silu on the special-function unit (SILU_FAST): a 2048/128 server
#            step with TANDEM_ROPE_SHARED=0 (neither), TANDEM_PREFILL_Q_BF16=0 (shared memory
#            alone), TANDEM_KERNEL_DEFINES=SILU_FAST=0 and the defaults, alternating twice
#   pdl      programmatic dependent launch (TANDEM_PDL) off and on, alternating twice: a 2048/128
#            server step, 768 decodes at context 1500 and 8 at 1024 (gpu_bench mixed)
#   tactics  gpu_bench fp8-tactics: every configuration cuBLASLt accepts for the FP8 projections
#            of Llama-3.1-8B (TACTIC_ROWS rows: 8192,768) timed against the heuristic's answer,
#            with fast accumulation off and on
#   attn-stages
#            gpu_bench bench on Llama-3.1-8B shapes in FP8 with an FP8 KV cache, once per count
#            of the FP8 decode attention's shared-memory stages (STAGES_LIST, default "3 4 5":
#            TANDEM_KERNEL_DEFINES=DM_STAGES_FP8=n): decode at batch 1, 32, 128, 256
#   kv-check gpu_bench check of llama-d128-2l and SmolLM2 shapes (bf16 weights) with an FP8 KV
#            cache on both backends
#   kv-bench gpu_bench bench on Llama-3.1-8B shapes, an FP8 against a bf16 KV cache: decode at
#            batch 1, 32, 128, 256 at context 1024 and 4096, prefill of 2048 tokens
#   handover examples/configs/gpu-1.yaml (a context and a decode worker on the one GPU, K/V
#            over CUDA IPC) with kv_cache_config.dtype fp8 on SmolLM2 shapes: requests and the
#            transfer counters; then the config with a bf16 decode group, which tandem refuses
#
#   scripts/device/fp8.sh tests check bench
#   N=4096 scripts/device/fp8.sh offline-128-128
#   KV_DTYPE=fp8 N=30000 MAX_BATCH=4096 scripts/device/fp8.sh offline-128-128
#            (an H200's FP8 cache holds 4,096 sequences of 256 tokens: the best 128/128 run
#            measured, docs/benchmarks.md)
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0

# One mixed server step on Llama-3.1-8B shapes in FP8 with an FP8 cache, the switch given
# (NAME=VALUE) set: `mixed_step SWITCH DECODES CONTEXT CHUNKS` ('' chunks: decodes alone).
mixed_step() {
  env "$1" TANDEM_BENCH_BLOCK=64 gpu_bench mixed --model "$(random_model llama-3.1-8b fp8 gen)" \
    --decodes "$2" --context "$3" --chunks "$4" --kv-cache-dtype fp8 2>&1 |
    grep -E "whole step|chunks alone|decodes alone|rror"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests check bench)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests|tests-fp8)
      random_model tiny >/dev/null
      echo "== FP8 GPU tests"
      run_tests cuda_fp8 "$out/tests-fp8.log" \
        env TANDEM_TEST_MODELS="$models" \
        TANDEM_GPU_TEST_MODEL_FP8="$(random_model llama-d128-2l fp8)" \
        TANDEM_GPU_TEST_MODELS_KV="$(random_model llama-d128-2l):$(random_model smollm2-135m)" \
        cuda_fp8_test --test-threads 1 --nocapture || status=1
      grep -E "FP8 GPU against CPU|FP8 KV cache" "$out/tests-fp8.log"
      [ "$stage" = tests-fp8 ] && continue
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
    check-mixed)
      mixed=/tmp/tandem-models/smollm2-135m-fp8-ends
      [ -d "$mixed" ] || model-prep quantize "$(random_model smollm2-135m)" -o "$mixed" \
        --keep 'model.layers.0.*' --keep 'model.layers.29.*' >"$out/check-mixed.log" 2>&1
      gpu_bench check --model "$mixed" --max-rel-l2 0.15 --min-top1 0.6 >>"$out/check-mixed.log" 2>&1 ||
        { echo "check mixed FAILED"; status=1; }
      grep -iE "quantized|mean|top-1|PASS|FAIL" "$out/check-mixed.log"
      ;;
    bench)
      for dtype in fp8 bf16; do
        echo "== bench llama-3.1-8b $dtype"
        TANDEM_BENCH_BLOCK=64 gpu_bench bench --model "$(random_model llama-3.1-8b "$dtype" gen)" \
          --batches 1,32,128,256 --prefill 2048,8192 --iters 10 --json "$out/bench-$dtype.json" 2>&1 |
          tee "$out/bench-$dtype.log" | grep -E "^ceilings|^FP8|^decode|^prefill"
      done
      ;;
    skinny|fused|widen)
      var=TANDEM_SKINNY_FP8
      [ "$stage" = fused ] && var=TANDEM_FP8_FUSED_QUANT
      [ "$stage" = widen ] && var=TANDEM_FP8_PREFILL_WIDEN
      for on in 0 1; do
        echo "== bench llama-3.1-8b fp8, fp8 KV, $var=$on"
        env "$var=$on" TANDEM_BENCH_BLOCK=64 gpu_bench bench \
          --model "$(random_model llama-3.1-8b fp8 gen)" --kv-cache-dtype fp8 --context 1024 \
          --batches 1,16,32,64,128,256 --prefill 2048 --iters 10 \
          --json "$out/bench-$stage$on.json" >"$out/bench-$stage$on.log" 2>&1 ||
          { echo "bench $var=$on FAILED"; status=1; }
        grep -E "^decode|^prefill|rror|disagrees" "$out/bench-$stage$on.log"
      done
      [ "$stage" = skinny ] && sed -n '/projections of FP8 weights/,/^[^ ]/p' "$out/bench-skinny1.log" | head -6
      ;;
    fast-accum)
      # cuBLASLt's FP8 fast accumulation: correct first (the FP8 GPU tests with it on), then a
      # 2048/128 server step (480 decodes beside 7,712 prompt tokens) off and on, alternating.
      random_model tiny >/dev/null
      echo "== FP8 GPU tests, TANDEM_FP8_FAST_ACCUM=1"
      run_tests cuda_fp8 "$out/tests-fp8-fast-accum.log" \
        env TANDEM_FP8_FAST_ACCUM=1 TANDEM_TEST_MODELS="$models" \
        TANDEM_GPU_TEST_MODEL_FP8="$(random_model llama-d128-2l fp8)" \
        TANDEM_GPU_TEST_MODELS_KV="$(random_model llama-d128-2l):$(random_model smollm2-135m)" \
        cuda_fp8_test --test-threads 1 --nocapture || status=1
      grep -E "FP8 GPU against CPU|relative L2" "$out/tests-fp8-fast-accum.log" | head -12
      for on in 0 1 0 1; do
        echo "== 2048/128 step, TANDEM_FP8_FAST_ACCUM=$on"
        mixed_step "TANDEM_FP8_FAST_ACCUM=$on" 480 2100 2048,2048,2048,1568
      done
      ;;
    pdl)
      # Programmatic dependent launch (TANDEM_PDL): a 2048/128 server step (eager: prefill
      # chunks and decodes), 768 decodes at context 1500 (a 1000/1000 run's step, past the
      # graphs' batches) and 8 decodes at context 1024 (a graph), off and on, alternating twice.
      for on in 0 1 0 1; do
        echo "== 2048/128 step, TANDEM_PDL=$on"
        mixed_step "TANDEM_PDL=$on" 480 2100 2048,2048,2048,1568
        echo "== 768 decodes at context 1500, TANDEM_PDL=$on"
        mixed_step "TANDEM_PDL=$on" 768 1500 ''
        echo "== 8 decodes at context 1024, TANDEM_PDL=$on"
        mixed_step "TANDEM_PDL=$on" 8 1024 ''
      done
      ;;
    tune)
      for on in 0 1 0 1; do
        echo "== 2048/128 step, TANDEM_FP8_TUNE=$on"
        mixed_step "TANDEM_FP8_TUNE=$on" 480 2100 2048,2048,2048,1568
        echo "== 768 decodes at context 1500, TANDEM_FP8_TUNE=$on"
        mixed_step "TANDEM_FP8_TUNE=$on" 768 1500 ''
      done
      ;;
    rope)
      for setting in TANDEM_ROPE_SHARED=0 TANDEM_PREFILL_Q_BF16=0 TANDEM_KERNEL_DEFINES=SILU_FAST=0 \
        TANDEM_DEFAULTS=1 TANDEM_ROPE_SHARED=0 TANDEM_PREFILL_Q_BF16=0 \
        TANDEM_KERNEL_DEFINES=SILU_FAST=0 TANDEM_DEFAULTS=1; do
        echo "== 2048/128 step, $setting"
        mixed_step "$setting" 480 2100 2048,2048,2048,1568
      done
      ;;
    tactics)
      # Every configuration cuBLASLt accepts for the FP8 projections against the heuristic's
      # single answer, with fast accumulation off and on.
      for on in 0 1; do
        echo "== cuBLASLt FP8 configurations, TANDEM_FP8_FAST_ACCUM=$on"
        TANDEM_FP8_FAST_ACCUM=$on gpu_bench fp8-tactics --rows "${TACTIC_ROWS:-8192,768}" \
          --iters 10 --top "${TOP:-4}" >"$out/tactics-fast-accum$on.log" 2>&1 ||
          { echo "fp8-tactics FAILED"; status=1; }
        grep -vE "^\s*$" "$out/tactics-fast-accum$on.log" | cut -c1-220
      done
      ;;
    attn-stages)
      for n in ${STAGES_LIST:-3 4 5}; do
        echo "== bench llama-3.1-8b fp8, fp8 KV, DM_STAGES_FP8=$n"
        TANDEM_KERNEL_DEFINES="DM_STAGES_FP8=$n" TANDEM_BENCH_BLOCK=64 gpu_bench bench \
          --model "$(random_model llama-3.1-8b fp8 gen)" --kv-cache-dtype fp8 --context 1024 \
          --batches 1,32,128,256 --prefill 2048 --iters 10 \
          --json "$out/bench-stages$n.json" >"$out/bench-stages$n.log" 2>&1 ||
          { echo "bench DM_STAGES_FP8=$n FAILED"; status=1; }
        grep -E "^decode|^prefill 2048 tokens |rror|disagrees" "$out/bench-stages$n.log"
      done
      ;;
    kv-check)
      for preset in llama-d128-2l smollm2-135m; do
        echo "== check $preset, FP8 KV cache"
        gpu_bench check --model "$(random_model "$preset")" --kv-cache-dtype fp8 \
          --max-rel-l2 0.15 --min-top1 0.6 >"$out/check-$preset-fp8kv.log" 2>&1 ||
          { echo "check $preset fp8 KV FAILED"; status=1; }
        grep -iE "mean|top-1|PASS|FAIL" "$out/check-$preset-fp8kv.log"
      done
      ;;
    kv-bench)
      # bf16 weights with an FP8 and a bf16 cache at context 1024 and 4096, and FP8 weights
      # with an FP8 cache at 1024 (FP8 weights with a bf16 cache are `bench`'s rows).
      # (RUNS: some of them, as weights/kv/context.) Context 4096 at batch 256 does not fit.
      for run in ${RUNS:-bf16/fp8/1024 bf16/bf16/1024 fp8/fp8/1024}; do
        IFS=/ read -r dtype kv context <<<"$run"
        echo "== bench llama-3.1-8b weights $dtype, KV $kv, context $context"
        TANDEM_BENCH_BLOCK=64 gpu_bench bench --model "$(random_model llama-3.1-8b "$dtype" gen)" \
          --kv-cache-dtype "$kv" --context "$context" --batches 1,32,128,256 --prefill 2048 \
          --iters 10 --json "$out/bench-$dtype-kv$kv-c$context.json" 2>&1 |
          tee "$out/bench-$dtype-kv$kv-c$context.log" | grep -E "^decode|^prefill|rror"
      done
      ;;
    handover)
      model=$(random_model smollm2-135m)
      for decode_kv in fp8 bf16; do
        echo "== gpu-1.yaml, context worker fp8, decode worker $decode_kv"
        sed -e "s/    free_gpu_memory_fraction: 0.3/    free_gpu_memory_fraction: 0.3\n    dtype: fp8/" \
          -e "s/    free_gpu_memory_fraction: 0.5/    free_gpu_memory_fraction: 0.5\n    dtype: $decode_kv/" \
          "$root/examples/configs/gpu-1.yaml" >"$out/handover-$decode_kv.yaml"
        tandem serve -c "$out/handover-$decode_kv.yaml" --model "$model" --port 8100 \
          --ready-timeout-s 300 >"$out/handover-$decode_kv.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 300); do grep -q "tandem: serving" "$out/handover-$decode_kv.log" && break; sleep 1; done
        grep -q "tandem: serving" "$out/handover-$decode_kv.log" || { echo "NOT READY"; tail -20 "$out/handover-$decode_kv.log"; status=1; }
        for prompt in "Once upon a time there was a small village by the sea where every morning" "Hi"; do
          curl -sS -m 120 http://127.0.0.1:8100/v1/completions -H 'Content-Type: application/json' \
            -d "{\"model\": \"smollm2-135m\", \"prompt\": \"$prompt\", \"max_tokens\": 16, \"temperature\": 0}" |
            python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("choices",[{}])[0].get("text"), r.get("usage"), r.get("error"))' ||
            status=1
        done
        curl -sS http://127.0.0.1:8100/metrics | grep -E "^tandem_(requests_disaggregated_total|kv_transfer_bytes_total|kv_transfers_total|kv_transfer_fallbacks_total|kv_handles_refused_total|worker_total_kv_blocks)"
        kill -TERM "$pid"
        wait "$pid"
        grep -iE "KV cache|refused|ERROR" "$out/handover-$decode_kv.log" | cut -c1-300 | head -8
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
      echo "unknown stage $stage (tests, check, check-mixed, bench, skinny, fused, widen, fast-accum, tune, tactics, attn-stages, kv-check, kv-bench, handover, offline-128-128, offline-2048-128, offline-1000-1000)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
