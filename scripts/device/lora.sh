#!/usr/bin/env bash
# Runs on the device machine: LoRA adapters on the GPU, with the binaries carried in .kit/bin.
#
#   scripts/device/lora.sh [STAGE...]     (default: tests serve)
#
#   tests   the whole GPU test suite (workers/tests/cuda_backend.rs, carried as
#           .kit/bin/cuda_backend_test), then its LoRA test again with its output (the GPU's
#           logits with an adapter against the CPU's)
#   serve   `tandem serve` on one GPU, one aggregated worker (PRESET's shapes, llama-3.1-8b
#           unless set, random bf16 weights generated at load) with a random adapter of RANK
#           (16) on every projection (`model-prep lora random`): `tandem bench` of the base
#           model, then of the adapter, at concurrency 1 and 32 (ISL 512, OSL 128): what the
#           adapter's products cost a request
#
# Output goes to stdout and $OUT; a failed test or check fails the script after the other
# stages have run.
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests serve)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      random_model tiny >/dev/null
      run_tests cuda_backend "$out/tests.log" \
        env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
        cuda_backend_test --test-threads 1 || status=1
      env TANDEM_TEST_MODELS="$models" cuda_backend_test --test-threads 1 --nocapture \
        lora_adapters_on_the_gpu >"$out/tests-lora.log" 2>&1 || status=1
      grep -E "relative L2|batched against|test result|panicked" "$out/tests-lora.log"
      ;;
    serve)
      preset=${PRESET:-llama-3.1-8b}
      model=$(random_model "$preset" bf16 generated)
      adapter=$models/$preset-lora-r${RANK:-16}
      [ -f "$adapter/adapter_config.json" ] ||
        model-prep lora random --model "$model" -o "$adapter" --rank "${RANK:-16}" --dtype bf16
      nvidia-smi --query-gpu=index,name --format=csv,noheader
      config=$out/lora-aggregated.yaml
      cat >"$config" <<YAML
served_model_name: base
lora_modules: [{name: adapter, path: "$adapter"}]
context_servers: { num_instances: 0 }
generation_servers: { num_instances: 1, device: "cuda:0", max_batch_size: 64 }
YAML
      port=8351
      serve_and_wait "$config" "$model" $port "$out/serve-lora.log" ||
        { tail -40 "$out/serve-lora.log"; status=1; continue; }
      grep -E "LoRA adapter loaded" "$out/serve-lora.log" | head -2
      curl -s "http://127.0.0.1:$port/v1/models"
      echo
      for name in base adapter base adapter; do
        echo "== $name"
        tandem bench --url "http://127.0.0.1:$port/v1" --model "$name" --concurrency 1,32 \
          --num-prompts 64 --input-len 512 --output-len 128 \
          --output-json "$out/bench-$name-$(date +%s).json" 2>&1 | tail -8 || status=1
      done
      kill "$served_pid"
      wait "$served_pid" 2>/dev/null
      ;;
    *)
      echo "unknown stage $stage" >&2
      status=1
      ;;
  esac
done
exit $status
