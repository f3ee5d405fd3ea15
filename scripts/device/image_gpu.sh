#!/usr/bin/env bash
# Runs on a one-GPU device machine: the container image's own binaries and GPU libraries, taken
# out of the image here (too large to travel whole: see container/README.md), serving
# examples/configs/gpu-1.yaml (a context and a decode worker on cuda:0, K/V over CUDA IPC) on
# SmolLM2-135M shapes with random weights: one request, and which libnvrtc / libcublas /
# libcublasLt each worker process mapped (the prompt's prefill, tens of rows, runs its
# projections on cuBLAS). Carried in .kit/image: bin/binaries.tar.xz (tandem,
# worker, api-server, model-prep from /usr/local/bin of the image) and cuda-lib/*.xz (from
# /opt/tandem/cuda-lib of the image); .kit/env.sh and .kit/debs for nats-server.
#
#   scripts/device/image_gpu.sh
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${OUT:-/tmp/tandem-out}
image=$root/.kit/image
mkdir -p "$out" /tmp/image-lib
mkdir -p /tmp/image-bin && tar -C /tmp/image-bin -xJf "$image/bin/binaries.tar.xz"
for xz in "$image"/cuda-lib/*.xz; do xz -dkc "$xz" >"/tmp/image-lib/$(basename "${xz%.xz}")"; done
# The image's cuBLAS and cuBLASLt (390 MB compressed) travel in parts over several calls to
# one warm machine, each call moving its part (.kit/part.NN) to /tmp/image-parts: where they
# are all there, they are unpacked beside NVRTC.
if compgen -G "/tmp/image-parts/part.*" >/dev/null; then
  cat /tmp/image-parts/part.* | xz -d | tar -C /tmp/image-lib -x
fi
# cudarc opens the unversioned names first: in the image there are none, so it falls to the
# image's libNAME.so.13; here the machine's CUDA has them, which would answer first.
for lib in /tmp/image-lib/lib*.so.13; do
  ln -sf "$(basename "$lib")" "${lib%.13}"
done
export PATH="/tmp/image-bin:$PATH"
# The image's libraries first, as its ldconfig entry puts them; what did not travel comes from
# the machine's own CUDA.
export LD_LIBRARY_PATH="/tmp/image-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG=info
# A fresh kernel cache, so that the workers compile their kernels with this NVRTC.
TANDEM_CACHE_DIR=$(mktemp -d)
export TANDEM_CACHE_DIR
rm -rf /tmp/m
ls -la /tmp/image-lib
echo "binaries: $(command -v tandem) $(tandem --version)"
model-prep random --preset smollm2-135m -o /tmp/m --seed 0 >/dev/null 2>&1 || { echo "model-prep failed"; exit 1; }
tandem serve -c "$root/examples/configs/gpu-1.yaml" --model /tmp/m --port 8100 --ready-timeout-s 300 \
  >"$out/image-gpu-1.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q "tandem: serving" "$out/image-gpu-1.log" && break; sleep 0.5; done
grep "tandem: serving" "$out/image-gpu-1.log" || { echo "NOT READY"; tail -30 "$out/image-gpu-1.log"; }
curl -sS -m 120 http://127.0.0.1:8100/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "m", "prompt": "Once upon a time there was a small village by the sea where every morning the fishermen went out before dawn and came back at noon with their boats full", "max_tokens": 16, "temperature": 0}' | cut -c1-400
echo
curl -sS http://127.0.0.1:8100/metrics |
  grep -E "^tandem_(requests_disaggregated_total|kv_transfers_total|kv_transfer_fallbacks_total)"
for worker in $(pgrep -x worker); do
  echo "worker $worker maps:"
  grep -oE '/[^ ]*lib(nvrtc|nvrtc-builtins|cublas|cublasLt|cuda)\.so[^ ]*' "/proc/$worker/maps" | sort -u
done
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
kill -TERM "$pid"
wait "$pid"
echo "launcher exit: $?"
grep -E "kernels|ERROR|WARN" "$out/image-gpu-1.log" | cut -c1-300 | head -12
