#!/usr/bin/env bash
# Runs on the device machine: the KV transfer between GPU workers (CUDA IPC, and UCX through
# host memory) checked with real worker processes, and the GPU tests. Binaries come in
# .kit/bin (see ../shared/device/README.md), the test binaries built here with
#   cargo test --release -p tandem-workers --test bus_disaggregated --test cuda_backend --no-run
# and carried as .kit/bin/{bus_disaggregated,cuda_backend}_test.
#
#   scripts/device/gpu_transfer.sh tests      # GPU tests + the two-process CUDA IPC test
#
# Output goes to stdout and to $OUT/<stage>.log. Each test binary's run ends in a line of how
# many tests ran, were skipped (no second GPU, say) and failed; a failed run fails the script.
set -uo pipefail
stage=${1:?usage: gpu_transfer.sh tests}
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
    # SmolLM2 shapes (head dim 64) and two Llama-3.1-8B layers (head dim 128) for the tests
    # that cover the decode attention kernels of those head dims.
    run_tests cuda_backend "$out/cuda-tests.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      TANDEM_GPU_TEST_MODEL="$smollm2" TANDEM_GPU_TEST_MODEL_D128="$d128" \
      cuda_backend_test --test-threads 1 || status=1
    echo "== two GPU worker processes, KV over CUDA IPC and UCX (workers/tests/bus_disaggregated.rs)"
    run_tests bus_disaggregated "$out/ipc-test.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      TANDEM_NATS_SERVER="$(command -v nats-server)" TANDEM_GPU_TEST_MODEL="$smollm2" \
      bus_disaggregated_test gpu_workers --nocapture --test-threads 1 || status=1
    grep -E "bytes pulled|CUDA IPC|cuda_ipc|ERROR" "$out/ipc-test.log" | cut -c1-300
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
exit "$status"
