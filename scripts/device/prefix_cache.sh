#!/usr/bin/env bash
# Runs on a device machine with two GPUs or more: prefix caching and KV-aware routing on
# Llama-3.1-8B shapes (weights generated at load), two aggregated workers on DEVICES (cuda:0 and
# cuda:1), through scripts/bench/prefix-cache: caching off, on with least_loaded, on with
# kv_aware; the shared-prefix workload (16 groups x 8 prompts of a 2,048-token system prompt and
# a 128-token question, 128 tokens out) and 5-turn conversations (16 of them, 256-word user
# messages, 128 tokens out), each at two Poisson rates and offline (all at once).
#
#   scripts/device/prefix_cache.sh [DEPLOYMENTS] [WORKLOADS]   # as scripts/bench/prefix-cache
#
# Every setting of scripts/bench/prefix-cache passes through the environment (SP_RATES, OSL, ...).
# Binaries come in .kit/bin; output: the tables on stdout, every bench and log under $OUT.
set -euo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
llama8=$models/llama-3.1-8b-generated
[ -f "$llama8/config.json" ] ||
  model-prep random --preset llama-3.1-8b --generate-at-load -o "$llama8" >&2
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
export TANDEM=tandem MODEL=$llama8 DEVICES=${DEVICES:-cuda:0,cuda:1} OUT=$out
export SP_GROUPS=${SP_GROUPS:-16} PER_GROUP=${PER_GROUP:-8} SYSTEM=${SYSTEM:-2048}
export QUESTION=${QUESTION:-128} SP_RATES=${SP_RATES:-8,16,offline}
export CONVS=${CONVS:-16} TURNS=${TURNS:-5} USER_WORDS=${USER_WORDS:-256} MT_RATES=${MT_RATES:-2,4,offline}
export OSL=${OSL:-128}
exec "$root/scripts/bench/prefix-cache" "${1:-off,on-ll,on-kv}" "${2:-shared-prefix,multi-turn}"
