#!/usr/bin/env bash
# Runs on the device machine (see ../shared/device/README.md and docs/benchmarks.md): checks the
# CUDA backend against the CPU backend and times it, with the binaries carried in .kit/bin.
#
#   scripts/device/gpu_run.sh check           # correctness: random tiny + smollm2-135m shapes
#   scripts/device/gpu_run.sh smollm2 GGUF    # real SmolLM2 weights: check + greedy cpu vs cuda
#   scripts/device/gpu_run.sh bench PRESET    # gpu_bench bench + the torch run, one preset
#   scripts/device/gpu_run.sh tests           # the GPU tests (workers/tests/cuda_backend.rs),
#                                             # built with `cargo test --release --no-run` and
#                                             # carried as .kit/bin/cuda_backend_test
#
# Output goes to stdout and, when $OUT is set, to $OUT/<stage>.log and JSON files. A failed
# check or test fails the script (after the other checks of its stage have run); `tests` ends in
# a line of how many tests ran, were skipped and failed.
set -euo pipefail
stage=${1:?usage: gpu_run.sh check|smollm2 GGUF|bench PRESET|tests}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0

case "$stage" in
  check)
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
    for preset in tiny smollm2-135m; do
      dir=$(random_model "$preset")
      echo "== check $preset"
      gpu_bench check --model "$dir" --min-top1 0 2>&1 | tee "$out/check-$preset.log" ||
        { echo "check $preset FAILED"; status=1; }
    done
    ;;
  smollm2)
    gguf=${2:?the SmolLM2 GGUF path}
    dir="$models/smollm2"
    [ -f "$dir/config.json" ] || model-prep import-gguf "$gguf" -o "$dir" --dtype bf16 >&2
    echo "== check smollm2 (real weights)"
    gpu_bench check --model "$dir" 2>&1 | tee "$out/check-smollm2.log" ||
      { echo "check smollm2 FAILED"; status=1; }
    for prompt in "What is the capital of France?" "Write a haiku about the sea."; do
      worker generate --model "$dir" --chat --prompt "$prompt" --max-tokens 32 --json --device cpu >"$out/cpu.json"
      worker generate --model "$dir" --chat --prompt "$prompt" --max-tokens 32 --json --device cuda:0 >"$out/cuda.json"
      echo "prompt: $prompt"
      echo "  cpu:  $(cat "$out/cpu.json")"
      echo "  cuda: $(cat "$out/cuda.json")"
      if python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); sys.exit(a["output_ids"]!=b["output_ids"])' "$out/cpu.json" "$out/cuda.json"; then
        echo "  greedy tokens identical"
      else
        echo "  GREEDY TOKENS DIFFER"
      fi
      # Seeded sampling: the same uniforms on both; CUDA picks from the device's summaries.
      sampling=(--temperature 0.8 --top-p 0.9 --seed 7)
      worker generate --model "$dir" --chat --prompt "$prompt" --max-tokens 32 --json --device cpu "${sampling[@]}" >"$out/cpu-sampled.json"
      worker generate --model "$dir" --chat --prompt "$prompt" --max-tokens 32 --json --device cuda:0 "${sampling[@]}" >"$out/cuda-sampled.json"
      echo "  sampled cpu:  $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"])' "$out/cpu-sampled.json")"
      echo "  sampled cuda: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"])' "$out/cuda-sampled.json")"
      TANDEM_DEVICE_SAMPLING=0 worker generate --model "$dir" --chat --prompt "$prompt" --max-tokens 32 --json --device cuda:0 "${sampling[@]}" >"$out/cuda-host-sampled.json"
      same_prefix() { python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["output_ids"]; b=json.load(open(sys.argv[2]))["output_ids"]; n=next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), min(len(a),len(b))); print(f"{n} of {len(a)}")' "$1" "$2"; }
      echo "  sampled tokens equal, cpu vs cuda: $(same_prefix "$out/cpu-sampled.json" "$out/cuda-sampled.json")"
      echo "  sampled tokens equal, cuda device sampling vs cuda host sampling: $(same_prefix "$out/cuda-host-sampled.json" "$out/cuda-sampled.json")"
    done
    ;;
  tests)
    random_model tiny >/dev/null
    run_tests cuda_backend "$out/tests.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      cuda_backend_test --test-threads 1 || status=1
    ;;
  bench)
    preset=${2:?preset}
    dir=$(random_model "$preset")
    shift 2
    echo "== gpu_bench $preset"
    gpu_bench bench --model "$dir" --json "$out/bench-$preset.json" "$@" 2>&1 | tee "$out/bench-$preset.log"
    if [ "${TANDEM_SKIP_TORCH:-0}" != 1 ]; then
      echo "== torch $preset"
      python3 "$root/scripts/device/torch_bench.py" --model "$dir" --json "$out/torch-$preset.json" \
        ${TORCH_ARGS:-} 2>&1 | tee "$out/torch-$preset.log" | tail -12
    fi
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
exit "$status"
