#!/usr/bin/env bash
# Runs on the device machine: LoRA adapters on the GPU, with the binaries carried in .kit/bin.
#
#   scripts/device/lora.sh [STAGE...]     (default: tests serve)
#
#   tests   the whole GPU test suite (workers/tests/cuda_backend.rs, carried as
#           .kit/bin/cuda_backend_test), then its LoRA test again with its output (the GPU's
#           logits with an adapter against the CPU's)
#   fp8     the FP8 GPU tests (workers/tests/cuda_fp8.rs, carried as .kit/bin/cuda_fp8_test)
#           on the tiny model, among them adapters over FP8 weights against the CPU's
#   serve   `tandem serve` on one GPU, one aggregated worker (PRESET's shapes, llama-3.1-8b
#           unless set, random WEIGHTS (bf16 or fp8; bf16 unless set) generated at load) with a
#           random adapter of RANK
#           (16) on every projection (`model-prep lora random`): `tandem bench` of the base
#           model, then of the adapter, at concurrency 1 and 32 (ISL 512, OSL 128): what the
#           adapter's products cost a request
#   steps   `gpu_bench bench` of the same model (WEIGHTS), decode at batch 1 and 32 (context 1024)
#           and prefills of 512 and 2048 tokens, without and with the adapter (twice each,
#           alternating); then `ncu` times every kernel of one 512-token prefill with the adapter,
#           summed by kernel and grid (where ncu is installed)
#   mixed   the same server with four adapters (seeds 1-4): `tandem bench` of the base model at
#           concurrency 32, then four benches at once, one an adapter, 8 each (every decode
#           step mixes four adapters), then the base model and three adapters at once, 8 each:
#           what a mix costs against one model's batch
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
    fp8)
      random_model tiny >/dev/null
      run_tests cuda_fp8 "$out/tests-fp8.log" \
        env TANDEM_TEST_MODELS="$models" cuda_fp8_test --test-threads 1 --nocapture || status=1
      grep -E "FP8 GPU against CPU|FP8 KV cache|LoRA adapter . over FP8|test result|panicked" \
        "$out/tests-fp8.log"
      ;;
    serve)
      preset=${PRESET:-llama-3.1-8b}
      model=$(random_model "$preset" "${WEIGHTS:-bf16}" generated)
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
    steps)
      preset=${PRESET:-llama-3.1-8b}
      model=$(random_model "$preset" "${WEIGHTS:-bf16}" generated)
      adapter=$models/$preset-lora-r${RANK:-16}
      [ -f "$adapter/adapter_config.json" ] ||
        model-prep lora random --model "$model" -o "$adapter" --rank "${RANK:-16}" --dtype bf16
      for run in base adapter base adapter; do
        lora=()
        [ "$run" = adapter ] && lora=(--lora "$adapter")
        echo "== $run"
        gpu_bench bench --model "$model" --batches 1,32 --prefill 512,2048 --iters 20 \
          "${lora[@]}" 2>&1 | tee -a "$out/steps-$run.txt" | grep -E "^\|? ?(decode|prefill)" || status=1
      done
      if command -v ncu >/dev/null; then
        csv=$out/prefill-512-adapter-ncu.csv
        ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
          gpu_bench bench --model "$model" --batches 1 --prefill 512 --iters 4 --lora "$adapter" \
          --profile >"$csv" 2>"$csv.err" || status=1
        python3 "$root/scripts/device/ncu_summary.py" "$csv" prefill-512-adapter |
          tee "$out/prefill-512-adapter-ncu.txt" | head -30
        gzip -f "$csv"
      fi
      ;;
    mixed)
      preset=${PRESET:-llama-3.1-8b}
      model=$(random_model "$preset" "${WEIGHTS:-bf16}" generated)
      modules=""
      for k in 1 2 3 4; do
        adapter=$models/$preset-lora-r${RANK:-16}-s$k
        [ -f "$adapter/adapter_config.json" ] ||
          model-prep lora random --model "$model" -o "$adapter" --rank "${RANK:-16}" \
            --dtype bf16 --seed "$k" >/dev/null
        modules="$modules${modules:+, }{name: a$k, path: \"$adapter\"}"
      done
      config=$out/lora-mixed.yaml
      cat >"$config" <<YAML
served_model_name: base
lora_modules: [$modules]
context_servers: { num_instances: 0 }
generation_servers: { num_instances: 1, device: "cuda:0", max_batch_size: 64 }
YAML
      port=8352
      serve_and_wait "$config" "$model" $port "$out/serve-mixed.log" ||
        { tail -40 "$out/serve-mixed.log"; status=1; continue; }
      grep -c "LoRA adapter loaded" "$out/serve-mixed.log"
      bench_mix() { # label model...: one bench a model at once, 8 each (32 alone)
        local label=$1 c=8 n=32 pids=() seed=0
        shift
        [ $# -eq 1 ] && { c=32; n=64; }
        for name in "$@"; do
          seed=$((seed + 1))
          tandem bench --url "http://127.0.0.1:$port/v1" --model "$name" --concurrency $c \
            --num-prompts $n --input-len 512 --output-len 128 --seed "$seed" \
            --output-json "$out/mixed-$label-$name.json" >"$out/mixed-$label-$name.txt" 2>&1 &
          pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        echo "== $label"
        for name in "$@"; do
          grep -E "^\s+c=" "$out/mixed-$label-$name.txt" | sed "s/^/$name /"
        done
      }
      echo "model level ok failed req/s out-tok/s goodput TTFT-p50 TTFT-p99 ITL-p50 ITL-p99 TPOT-p50 E2E-p50 E2E-p99 cached"
      bench_mix base-alone base
      bench_mix four-adapters a1 a2 a3 a4
      bench_mix base-and-three base a1 a2 a3
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
