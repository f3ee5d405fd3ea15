#!/usr/bin/env bash
# Runs on a one-GPU device machine: seeded sampled generations on cuda:0 with the draw on the
# device (sample.cu, sample_rank.cu) against TANDEM_DEVICE_SAMPLING=0 (every logits row copied
# to the host sampler). Same logits, same uniforms: the tokens must be identical. Binaries
# come in .kit/bin (worker, model-prep).
#
#   scripts/device/sampling_paths.sh          # SmolLM2-135M shapes, random weights
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
dir=$(random_model "${PRESET:-smollm2-135m}")
same() { # host.json device.json: how many leading tokens agree
  python3 -c 'import json,sys
a=json.load(open(sys.argv[1]))["output_ids"]; b=json.load(open(sys.argv[2]))["output_ids"]
n=next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), min(len(a),len(b))); print(f"{n} of {len(a)}")' "$1" "$2"
}
for prompt in "the sea and the sky" "Once upon a time there was"; do
  for sampling in "--temperature 0.8 --top-p 0.9 --seed 7" "--temperature 1.0 --top-k 40 --seed 3" \
    "--temperature 1.2 --top-k 200 --top-p 0.95 --seed 11" "--temperature 0.7 --top-p 0.5 --seed 5" \
    "--temperature 1.0 --min-p 0.3 --seed 4" "--temperature 0.9 --min-p 0.05 --min-tokens 24 --seed 9"; do
    # shellcheck disable=SC2086 # the sampling flags are words
    worker generate --model "$dir" --prompt "$prompt" --max-tokens 48 --json --device cuda:0 $sampling \
      >"$out/device.json" 2>"$out/device.log"
    # shellcheck disable=SC2086
    TANDEM_DEVICE_SAMPLING=0 worker generate --model "$dir" --prompt "$prompt" --max-tokens 48 --json \
      --device cuda:0 $sampling >"$out/host.json" 2>"$out/host.log"
    echo "$prompt | $sampling | device vs host sampling on cuda:0, equal tokens: $(same "$out/host.json" "$out/device.json")"
  done
done | tee "$out/sampling-paths.txt"
