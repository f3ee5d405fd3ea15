#!/usr/bin/env bash
# Runs on a two-GPU device machine (nvidia-h100-x2 or nvidia-h200-x2): KV hand-overs from and
# to tensor-parallel groups over CUDA IPC, straight into the decode worker's reserved blocks.
# Binaries come in .kit/bin (stripped, gzipped release builds; scripts/device/kit-env.sh):
# tandem, worker, api-server, model-prep, kv_ranks_bench, and the test binaries of
#   cargo test --release -p tandem-workers --test bus_disaggregated --test cuda_backend --no-run
# as bus_disaggregated_test and cuda_backend_test.
#
#   scripts/device/tp_handover.sh tests   # the GPU tests (cuda_backend: every test; the bus
#                                         # tests of CUDA IPC between worker processes, one GPU
#                                         # each and tensor-parallel groups of 1 and 2 ranks)
#   scripts/device/tp_handover.sh bench   # kv_ranks_bench: a 3,000-token prompt of Llama-3.1-70B
#                                         # and -8B K/V between splits (1->1, 2->1, 1->2, 2->2)
#   scripts/device/tp_handover.sh serve   # Llama-3.1-8B shapes served by a context worker of 2
#                                         # ranks (cuda:0-1) and a decode worker on cuda:1, over
#                                         # CUDA IPC and then over UCX (cuda_ipc_pool_mb: 0):
#                                         # ISL 3000 / OSL 150, the pulls' times and TTFT
#
# A failing test fails the script, and each test binary's run ends in a line of how many tests
# ran, were skipped and failed: on this two-GPU machine every selected test must run, so a skip
# fails too. Output: stdout and $OUT.
set -uo pipefail
stage=${1:?usage: tp_handover.sh tests | bench | serve}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0

case "$stage" in
  tests)
    nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv
    random_model tiny >/dev/null
    smollm2=$(random_model smollm2-135m)
    d128=$(random_model llama-d128-2l)
    echo "== GPU tests (workers/tests/cuda_backend.rs)"
    run_tests --no-skips cuda_backend "$out/cuda-tests.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      TANDEM_GPU_TEST_MODEL="$smollm2" TANDEM_GPU_TEST_MODEL_D128="$d128" \
      cuda_backend_test --test-threads 1 --nocapture || status=1
    grep -E "ranks to" "$out/cuda-tests.log"
    echo "== GPU worker processes over CUDA IPC (workers/tests/bus_disaggregated.rs)"
    # The tiny model: its heads divide over 2 ranks (SmolLM2's 9 do not).
    run_tests --no-skips bus_disaggregated "$out/ipc-tests.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      TANDEM_NATS_SERVER="$(command -v nats-server)" \
      bus_disaggregated_test gpu --nocapture --test-threads 1 || status=1
    grep -E "bytes" "$out/ipc-tests.log" | cut -c1-300
    ;;
  bench)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    nvidia-smi topo -m | head -4
    for layout in 70b 8b; do
      kv_ranks_bench --layout "$layout" --tokens 3000 2>&1 | tee "$out/kv-ranks-$layout.txt" || status=1
    done
    ;;
  serve)
    llama=$(random_model llama-3.1-8b)
    port=8310
    for transport in cuda-ipc ucx; do
      # 0 turns CUDA IPC off on both workers: hand-overs through host memory (UCX).
      pool=$([ "$transport" = ucx ] && echo 0 || echo '~')
      config=$out/tp-handover-$transport.yaml
      cat >"$config" <<EOF
hostname: 127.0.0.1
context_servers:
  num_instances: 1
  device: "cuda:0"
  tensor_parallel_size: 2
  max_num_tokens: 4096
  kv_cache_config:
    max_tokens: 65536
  cache_transceiver_config:
    max_tokens_in_buffer: 65536
    cuda_ipc_pool_mb: $pool
generation_servers:
  num_instances: 1
  device: "cuda:1"
  max_batch_size: 64
  kv_cache_config:
    max_tokens: 65536
  cache_transceiver_config:
    cuda_ipc_pool_mb: $pool
router:
  max_local_prefill_length: 32
EOF
      log=$out/tp-handover-$transport.log
      echo "== context TP=2 (cuda:0-1) -> decode TP=1 (cuda:1), over $transport"
      serve_and_wait "$config" "$llama" $port "$log" || { status=1; tail -30 "$log"; continue; }
      grep -E "tandem: serving" "$log"
      tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions --input-tokens 3000 \
        --output-len 150 --concurrency 1 --num-prompts 8 \
        --output-json "$out/tp-handover-$transport.json" 2>&1 | tail -14 || status=1
      curl -s "http://127.0.0.1:$port/metrics" | grep -E "^tandem_(kv_transfers_total|kv_transfer_seconds_(sum|count)|ttft_part_seconds_(sum|count)|requests_disaggregated_total)" || true
      grep -E "KV hand-overs|CUDA IPC|ERROR" "$log" | cut -c1-240 | sort | uniq -c | head -8
      kill -TERM "$served_pid"
      wait "$served_pid"
      echo "launcher exit: $?"
    done
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
exit "$status"
