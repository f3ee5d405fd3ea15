#!/usr/bin/env bash
# Runs on the device machine: /v1/embeddings on the GPU, with the binaries carried in .kit/bin.
#
#   scripts/device/embeddings.sh [STAGE...]     (default: tests serve)
#
#   tests   the whole GPU test suite (workers/tests/cuda_backend.rs, carried as
#           .kit/bin/cuda_backend_test), then its embedding test again with its output
#           (the GPU's hidden states against the CPU's)
#   serve   `tandem serve` on one GPU (PRESET's shapes, llama-3.1-8b unless set, random bf16
#           weights generated at load), disaggregated (examples/configs/gpu-1.yaml: the
#           context worker answers the embeddings) and aggregated (one generation worker):
#           scripts/bench/embeddings.py's checks, then 2,048 inputs of about 200 words, 16 to
#           a request, 8 requests at a time, then 64 inputs one at a time
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
        embeddings_on_the_gpu >"$out/tests-embeddings.log" 2>&1 || status=1
      grep -E "relative L2|test result" "$out/tests-embeddings.log"
      ;;
    serve)
      preset=${PRESET:-llama-3.1-8b}
      model=$(random_model "$preset" bf16 generated)
      nvidia-smi --query-gpu=index,name --format=csv,noheader
      aggregated=$out/embeddings-aggregated.yaml
      cat >"$aggregated" <<YAML
context_servers: { num_instances: 0 }
generation_servers: { num_instances: 1, device: "cuda:0", max_batch_size: 64 }
YAML
      port=8341
      for config in "$root/examples/configs/gpu-1.yaml" "$aggregated"; do
        name=$(basename "$config" .yaml)
        echo "== $name, $preset"
        serve_and_wait "$config" "$model" $port "$out/serve-$name.log" ||
          { tail -40 "$out/serve-$name.log"; status=1; continue; }
        python3 "$root/scripts/bench/embeddings.py" "http://127.0.0.1:$port" --inputs 2048 \
          --words 200 --batch 16 --concurrency 8 --json "$out/embeddings-$name.json" || status=1
        # One input at a time: the latency of a single embedding.
        python3 "$root/scripts/bench/embeddings.py" "http://127.0.0.1:$port" --inputs 64 \
          --words 200 --batch 1 --concurrency 1 --seed 1 \
          --json "$out/embeddings-$name-single.json" || status=1
        curl -s "http://127.0.0.1:$port/metrics" | grep -E '^tandem_requests_total\{endpoint="embeddings"' || :
        kill "$served_pid"
        wait "$served_pid" 2>/dev/null
        port=$((port + 1))
      done
      ;;
    *)
      echo "unknown stage $stage" >&2
      exit 2
      ;;
  esac
done
exit "$status"
