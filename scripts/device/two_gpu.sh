#!/usr/bin/env bash
# Runs on a two-GPU device machine (nvidia-h200-x2): the runs that need two GPUs of
# one host. Binaries come in .kit/bin (stripped, gzipped release builds of tandem, worker,
# api-server, model-prep, and the test binary bus_disaggregated_test; see
# ../shared/device/README.md and scripts/device/gpu_transfer.sh):
#
#   scripts/device/two_gpu.sh ipc        # CUDA IPC from cuda:0 to cuda:1: the GPU test with the
#                                        # decode worker on cuda:1, a plain peer-to-peer copy
#                                        # (torch) and the hand-over of 2k- and 8k-token
#                                        # Llama-3.1-8B prompts through `tandem serve`
#   scripts/device/two_gpu.sh mapping    # the decode worker's CUDA IPC mapping of the context
#                                        # worker's cache: a pull after 75 idle seconds, then the
#                                        # context worker killed and restarted (memory, logs)
#   scripts/device/two_gpu.sh goodput disaggregated|aggregated
#                                        # Llama-3.1-8B shapes, 1 context + 1 decode worker or 2
#                                        # aggregated workers (one GPU each): `tandem bench` at
#                                        # Poisson rates on ISL 4096 / OSL 256 and ISL 512 /
#                                        # OSL 1024, goodput at TTFT <= 1 s and ITL <= 50 ms
#   scripts/device/two_gpu.sh tp         # tensor parallelism over cuda:0 and cuda:1: the GPU
#                                        # tests (NCCL on one GPU; two ranks' tokens against
#                                        # one GPU's), TP=2 vs TP=1 greedy tokens on
#                                        # Llama-3.1-8B shapes, `gpu_bench tp` decode steps at
#                                        # batch 1 and 32 against the floor, and a context
#                                        # worker of 2 ranks handing prompts to a decode worker
#                                        # of 1 through `tandem serve`. Needs also gpu_bench
#                                        # and the test binaries of `cargo test --release
#                                        # -p tandem-workers --lib --test cuda_backend --no-run`
#                                        # as .kit/bin/workers_lib_test and cuda_backend_test.
#   scripts/device/two_gpu.sh tp-graphs  # the same check and steps with decode steps
#                                        # replayed from CUDA graphs (as workers run them)
#   scripts/device/two_gpu.sh tp70b      # Llama-3.1-70B shapes served with TP=2 over both
#                                        # GPUs (141 GB of weights, generated at load),
#                                        # `tandem bench` at 1000/1000. On two H100s the KV
#                                        # cache holds ~56k tokens: MAX_BATCH=32
#                                        # CONCURRENCY=32 N=64 (the run in docs/benchmarks.md)
#
# WEIGHTS=fp8 serves FP8 weights of the same shapes (generated at load) and KV_DTYPE=fp8 an FP8
# KV cache in every worker (`kv_cache_config.dtype`: hand-overs move FP8 blocks, half the bytes);
# both apply to the ipc and goodput stages, whose outputs then carry a `-fp8` / `-kvfp8` tag.
#
# Prompt lengths are in words for `tandem bench`; on the random Llama-3.1-8B tokenizer a word is
# about 1.66 tokens (the bench reports the real token counts). Output: stdout and $OUT. A failed
# test or check fails the script once its stage is done; each test binary's run ends in a line
# of how many tests ran, were skipped and failed, and, both GPUs being here, a skip fails it.
set -uo pipefail
stage=${1:?usage: two_gpu.sh ipc | mapping | goodput disaggregated|aggregated | tp | tp-graphs | tp70b}
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
status=0

weights=${WEIGHTS:-bf16} kv_dtype=${KV_DTYPE:-bf16}
case "$weights" in
  bf16) llama=$(random_model llama-3.1-8b) tag="" ;;
  fp8) llama=$(random_model llama-3.1-8b fp8 gen) tag="-fp8" ;;
  *) echo "WEIGHTS: bf16 or fp8, not $weights" >&2; exit 2 ;;
esac
case "$kv_dtype" in
  bf16) kv_line="" kv_token_bytes=131072 ;;
  fp8) kv_line="    dtype: fp8" tag="$tag-kvfp8" kv_token_bytes=65536 ;;
  *) echo "KV_DTYPE: bf16 or fp8, not $kv_dtype" >&2; exit 2 ;;
esac
port=8300

wait_line() { # file needle seconds
  for _ in $(seq 1 $(($3 * 5))); do
    grep -q "$2" "$1" && return 0
    sleep 0.2
  done
  return 1
}

serve() { # config log: starts `tandem serve` in the background, sets $serve_pid
  tandem serve -c "$1" --model "$llama" --port $port --ready-timeout-s 300 >"$2" 2>&1 &
  serve_pid=$!
  if ! wait_line "$2" "tandem: serving" 300; then
    echo "NOT READY"
    tail -40 "$2"
    return 1
  fi
  grep "tandem: serving" "$2"
}

stop() { # log
  kill -TERM "$serve_pid"
  wait "$serve_pid"
  echo "launcher exit: $?"
  grep -E "ERROR|panicked" "$1" | head -5 | cut -c1-300
}

# The configs: gpu-2.yaml's deployment (context on cuda:0, decode on cuda:1), with CUDA IPC
# pools large enough for an 8k-token prompt of Llama-3.1-8B (1 GiB of K/V), and its aggregated
# counterpart (a `both` worker on each GPU, 128 sequences, prefill chunks of 2048 tokens).
cat >/tmp/disaggregated.yaml <<EOF
hostname: 127.0.0.1
context_servers:
  num_instances: 1
  device: "cuda:0"
  max_num_tokens: 4096
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
$kv_line
  cache_transceiver_config:
    max_tokens_in_buffer: 65536
    cuda_ipc_pool_mb: 2048
generation_servers:
  num_instances: 1
  device: "cuda:1"
  max_batch_size: 128
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
$kv_line
  cache_transceiver_config:
    cuda_ipc_pool_mb: 2048
router:
  policy: least_loaded
  max_local_prefill_length: 32
EOF
cat >/tmp/aggregated.yaml <<EOF
hostname: 127.0.0.1
context_servers:
  num_instances: 0
generation_servers:
  num_instances: 2
  device: ["cuda:0", "cuda:1"]
  max_batch_size: 128
  max_num_tokens: ${AGGREGATED_MAX_NUM_TOKENS:-2048}
  kv_cache_config:
    free_gpu_memory_fraction: 0.9
$kv_line
router:
  policy: least_loaded
EOF

case "$stage" in
  ipc)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    nvidia-smi topo -m
    smollm2=$(random_model smollm2-135m)
    # (The tensor-parallel hand-over test needs a model whose heads divide over 2 ranks, not
    # SmolLM2's 9: scripts/device/tp_handover.sh runs it on the tiny model.)
    echo "== the GPU test, decode worker on cuda:1 (workers/tests/bus_disaggregated.rs)"
    run_tests --no-skips bus_disaggregated "$out/ipc-test.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      TANDEM_NATS_SERVER="$(command -v nats-server)" TANDEM_GPU_TEST_MODEL="$smollm2" \
      TANDEM_TEST_DECODE_DEVICE=cuda:1 \
      bus_disaggregated_test gpu_workers_of_one_host --nocapture --test-threads 1 || status=1
    grep -E "bytes pulled|CUDA IPC pool|ERROR" "$out/ipc-test.log" | cut -c1-300

    echo "== plain peer-to-peer copy cuda:0 -> cuda:1 (torch, copy_ between devices)"
    python3 - <<'EOF' 2>&1 | tee "$out/p2p.log"
import time, torch
print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1))
for tokens in (2048, 8192):
    n = tokens * 131072  # Llama-3.1-8B K/V per token in bf16: 32 layers x 8 heads x 128 x 2 x 2 B
    a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    k = 20
    t = time.perf_counter()
    for _ in range(k):
        b.copy_(a)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    dt = (time.perf_counter() - t) / k
    print(f"p2p {tokens} tokens: {n} bytes in {dt * 1e6:.0f} us = {n / dt / 1e9:.1f} GB/s")
EOF

    echo "== hand-over of 2k- and 8k-token prompts, Llama-3.1-8B shapes (context cuda:0, decode cuda:1)"
    export RUST_LOG="info,tandem_workers::serve::roles::pull=debug"
    if serve /tmp/disaggregated.yaml "$out/serve-ipc$tag.log"; then
      for words in 1233 4935; do
        tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions --concurrency 1 \
          --num-prompts 4 --input-len $words --output-len 8 2>&1 | tail -4
      done
      grep "KV pulled" "$out/serve-ipc$tag.log" | sed -E 's/.*(bytes=[0-9]+) (micros=[0-9]+).*(backend=[a-z-]+).*/\1 \2 \3/' |
        awk -v per_token="$kv_token_bytes" '{split($1,b,"="); split($2,m,"="); printf "%s %s %s tokens=%d GB/s=%.1f\n", $1, $2, $3, b[2]/per_token, b[2]/m[2]/1e3}'
      curl -sS "http://127.0.0.1:$port/metrics" | grep -E "^tandem_(kv_transfers_total|kv_transfer_fallbacks_total)"
      stop "$out/serve-ipc$tag.log"
    fi
    ;;
  mapping)
    # The decode worker's mapping of the context worker's KV cache (CUDA IPC): a pull after
    # IDLE_S (75) idle seconds, then the context worker killed (SIGKILL) and restarted by the
    # launcher: when the decode worker closes its mapping, and the KV cache the restarted
    # worker finds room for. TANDEM=path runs another build's launcher (its workers beside it).
    export RUST_LOG="info,tandem_workers::serve::roles::pull=debug"
    launcher=${TANDEM:-tandem}
    log="$out/serve-mapping$tag${MAPPING_TAG:-}.log"
    "$launcher" serve -c /tmp/disaggregated.yaml --model "$llama" --port $port --ready-timeout-s 300 >"$log" 2>&1 &
    serve_pid=$!
    if ! wait_line "$log" "tandem: serving" 300; then
      echo "NOT READY"
      tail -20 "$log"
      kill -TERM "$serve_pid"
      exit 1
    fi
    one() {
      "$launcher" bench --url "http://127.0.0.1:$port/v1" --endpoint completions --concurrency 1 \
        --num-prompts 1 --input-len 1233 --output-len 8 2>&1 | grep -E "^ +c=1" | cut -c1-110
    }
    echo "at readiness: $(curl -sS "http://127.0.0.1:$port/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"])')"
    grep -E "map the KV caches|mapped the KV caches|KV cache \(CUDA IPC\) ahead" "$log" | cut -c1-220
    one
    sleep "${IDLE_S:-75}"
    one
    echo "pulls (the second after ${IDLE_S:-75} s idle):"
    grep "KV pulled" "$log" | sed -E 's/.*(bytes=[0-9]+) (micros=[0-9]+).*/  \1 \2/'
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
    ctx=$(pgrep -f -- "--role context" | head -1)
    echo "killing the context worker (pid $ctx) at $(date +%T)"
    kill -KILL "$ctx"
    for s in 5 10 15 20 30 45; do
      sleep $((s - ${prev:-0}))
      prev=$s
      echo "$s s after: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader | tr '\n' ' ')"
    done
    grep -E "closing the CUDA IPC mapping|KV cache shared over CUDA IPC|KV cache:|exited|restart" "$log" |
      cut -c1-260 | tail -12
    wait_line "$log" "KV cache shared over CUDA IPC.*" 120
    one
    stop "$log"
    ;;
  goodput)
    deployment=${2:?disaggregated or aggregated}
    nvidia-smi --query-gpu=index,name --format=csv,noheader
    if serve "/tmp/$deployment.yaml" "$out/serve-$deployment$tag.log"; then
      bench() { # name words output_len rates
        echo "== $deployment, $1: --input-len $2 words, --output-len $3, rates $4"
        tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions \
          --request-rate "$4" --num-prompts "${NUM_PROMPTS:-40}" --input-len "$2" --output-len "$3" \
          --goodput ttft:1000,itl:50 --timeout-s 120 \
          --output-json "$out/goodput-$deployment$tag-$1.json" 2>&1 | tee "$out/goodput-$deployment$tag-$1.log" |
          grep -vE "^\s*$" | tail -14
      }
      bench prefill-heavy 2467 256 "${PREFILL_RATES:-1,2,4,6,8}"
      bench decode-heavy 308 1024 "${DECODE_RATES:-1,2,4,8}"
      curl -sS "http://127.0.0.1:$port/metrics" |
        grep -E "^tandem_(kv_transfers_total|kv_transfer_fallbacks_total|requests_disaggregated_total)"
      stop "$out/serve-$deployment$tag.log"
    fi
    ;;
  tp)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    echo "libnccl: ${TANDEM_NCCL_LIB:-not found}"
    random_model tiny >/dev/null
    echo "== GPU tests: NCCL on one GPU, two ranks against one GPU"
    run_tests --no-skips workers_lib_nccl "$out/tp-nccl-test.log" \
      timeout 120 workers_lib_test nccl --test-threads 1 || status=1
    run_tests --no-skips cuda_backend_two_gpus "$out/tp-cuda-test.log" \
      env TANDEM_TEST_MODELS="$models" TANDEM_WORKER_BIN="$root/.kit/bin/worker" \
      timeout 240 cuda_backend_test two_gpus --nocapture --test-threads 1 || status=1

    echo "== logits, Llama-3.1-8B shapes: TP=2 (cuda:0, cuda:1) against one GPU, teacher-forced"
    timeout 240 gpu_bench tp-check --model "$llama" --ranks 2 --json "$out/tp-check.json" 2>&1 |
      tee "$out/tp-check.log" || { echo "tp-check FAILED"; status=1; }

    echo "== greedy tokens, Llama-3.1-8B shapes: TP=2 (cuda:0, cuda:1) against one GPU"
    for ranks in 1 2; do
      timeout 180 worker generate --model "$llama" --prompt "the sea and the sky and the" --max-tokens 48 \
        --json --device cuda:0 --tensor-parallel $ranks >"$out/tp-generate-$ranks.json" 2>"$out/tp-generate-$ranks.log" ||
        tail -5 "$out/tp-generate-$ranks.log"
    done
    python3 -c '
import json, sys
a, b = (json.load(open(p))["output_ids"] for p in sys.argv[1:])
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"TP=2 tokens equal TP=1 for {n} of {len(a)}")' "$out/tp-generate-1.json" "$out/tp-generate-2.json"

    echo "== decode steps: one GPU and two ranks, batch 1 and 32, context 1024 (all eager)"
    timeout 240 gpu_bench tp --model "$llama" --ranks 1,2 --batches 1,32 --context 1024 \
      --json "$out/tp-bench.json" 2>&1 | tee "$out/tp-bench.log"

    echo "== hand-over: a context worker of 2 ranks (cuda:0, cuda:1) to a decode worker of 1 (cuda:1)"
    printf '%s\n' "hostname: 127.0.0.1" "context_servers:" "  num_instances: 1" \
      "  device: \"cuda:0\"" "  tensor_parallel_size: 2" "  max_num_tokens: 4096" \
      "  kv_cache_config:" "    max_tokens: 65536" "generation_servers:" "  num_instances: 1" \
      "  device: \"cuda:1\"" "  max_batch_size: 64" "  kv_cache_config:" "    max_tokens: 131072" \
      "router:" "  policy: least_loaded" "  max_local_prefill_length: 32" >/tmp/tp-handover.yaml
    if serve /tmp/tp-handover.yaml "$out/serve-tp-handover.log"; then
      tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions --concurrency 4 \
        --num-prompts 16 --input-len 1233 --output-len 64 2>&1 | tail -6
      curl -sS "http://127.0.0.1:$port/metrics" |
        grep -E "^tandem_(kv_transfers_total|kv_transfer_fallbacks_total|requests_disaggregated_total)"
      stop "$out/serve-tp-handover.log"
    fi
    ;;
  tp-graphs)
    # Tensor-parallel ranks that replay their decode steps (all-reduces included) from CUDA
    # graphs, checked and timed against one GPU with graphs.
    echo "== logits with graphs: TP=2 against one GPU"
    timeout 240 gpu_bench tp-check --model "$llama" --ranks 2 --cuda-graphs \
      --json "$out/tp-check-graphs.json" 2>&1 | tee "$out/tp-check-graphs.log" ||
      { echo "tp-check with graphs FAILED"; status=1; }
    echo "== decode steps with graphs: one GPU and two ranks, batch 1 and 32, context 1024"
    timeout 240 gpu_bench tp --model "$llama" --ranks 1,2 --batches 1,32 --context 1024 --cuda-graphs \
      --json "$out/tp-bench-graphs.json" 2>&1 | tee "$out/tp-bench-graphs.log"
    ;;
  tp70b)
    # Llama-3.1-70B shapes over both GPUs (TP=2, one aggregated worker): 141 GB of bf16 weights,
    # generated by the worker at load (no weight files: the disk could not hold them).
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    llama70=$models/llama-3.1-70b-generated
    [ -f "$llama70/config.json" ] ||
      model-prep random --preset llama-3.1-70b --generate-at-load -o "$llama70" >&2
    printf '%s\n' "hostname: 127.0.0.1" "context_servers:" "  num_instances: 0" \
      "generation_servers:" "  num_instances: 1" "  device: \"cuda:0\"" \
      "  tensor_parallel_size: 2" "  max_batch_size: ${MAX_BATCH:-128}" "  max_num_tokens: 2048" \
      "  kv_cache_config:" "    free_gpu_memory_fraction: 0.9" >/tmp/tp70b.yaml
    tandem serve -c /tmp/tp70b.yaml --model "$llama70" --port $port --ready-timeout-s 900 \
      >"$out/serve-tp70b.log" 2>&1 &
    serve_pid=$!
    if wait_line "$out/serve-tp70b.log" "tandem: serving" 900; then
      grep -E "model loaded|tandem: serving" "$out/serve-tp70b.log" | cut -c1-300
      tandem bench --url "http://127.0.0.1:$port/v1" --endpoint completions \
        --concurrency "${CONCURRENCY:-64}" --num-prompts "${N:-128}" --input-tokens 1000 --output-len 1000 \
        --output-json "$out/tp70b-1000-1000.json" 2>&1 | tee "$out/tp70b-bench.log" | tail -14
      nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
      grep -E "KV cache|blocks" "$out/serve-tp70b.log" | head -4 | cut -c1-300
      stop "$out/serve-tp70b.log"
    else
      echo "NOT READY"
      tail -40 "$out/serve-tp70b.log"
      kill -TERM "$serve_pid"
    fi
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
exit "$status"
