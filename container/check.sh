#!/usr/bin/env bash
# Checks the built image for real, on this machine's CPU: `tandem serve` in a container with the
# default model baked in, a chat completion streamed from the host by the official `openai`
# client, the disaggregated example config (2 context + 1 decode worker, KV over UCX) in a
# container, a stop by SIGTERM while a stream is in flight (the stream must finish and nothing
# may be left running), and the compose deployment (container/compose/compose.cpu.yaml: NATS,
# a context worker, a decode worker and the api-server in four containers, KV over UCX on
# TCP), stopped the same way. Not part of CI's test run (it needs a container engine and the
# image); its output is recorded in docs/container-check.md.
#
#   container/build.sh --local-base --ca-bundle /etc/ssl/certs/ca-certificates.crt
#   container/check.sh                          # the image tandem:latest
#
# Run `container/check.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: container/check.sh [OPTIONS]

Runs the image's checks one after another and prints what each saw; exits non-zero at the
first that fails (its container is stopped and removed first).

Options:
      --image IMAGE        the image (default: tandem:latest; env TANDEM_IMAGE)
      --engine ENGINE      docker, podman or auto (as container/run.sh; env
                           TANDEM_CONTAINER_ENGINE)
  -p, --port PORT          host port for the api-server (default: 8000)
      --host-network       run the containers on the host's network instead of publishing
                           the port (for engines whose port publishing does not work here)
      --venv DIR           Python environment for the `openai` client (and podman-compose),
                           made when missing (default: target/container-check/venv)
  -h, --help               show this help
USAGE
}

die() {
  echo "check.sh: $*" >&2
  echo "Run container/check.sh --help for the options." >&2
  exit 2
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=container/engine.sh
source "$repo_root/container/engine.sh"
image="${TANDEM_IMAGE:-tandem:latest}"
engine="${TANDEM_CONTAINER_ENGINE:-auto}"
port=8000
host_network=0
venv="$repo_root/target/container-check/venv"
while [ $# -gt 0 ]; do
  case "$1" in
    --image)
      [ $# -ge 2 ] || die "--image needs a value"
      image="$2"
      shift 2
      ;;
    --engine)
      [ $# -ge 2 ] || die "--engine needs a value"
      engine="$2"
      shift 2
      ;;
    -p | --port)
      [ $# -ge 2 ] || die "--port needs a value"
      port="$2"
      shift 2
      ;;
    --host-network)
      host_network=1
      shift
      ;;
    --venv)
      [ $# -ge 2 ] || die "--venv needs a value"
      venv="$2"
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1'" ;;
  esac
done
engine=$(pick_engine "$engine") || die "--engine takes docker, podman or auto"
base_url="http://127.0.0.1:$port/v1"
name=tandem-check

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

# The openai client (and podman-compose), in a virtual environment of their own.
if [ ! -x "$venv/bin/python" ] || [ ! -x "$venv/bin/podman-compose" ]; then
  step "python environment with the openai client and podman-compose: $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai podman-compose
fi
python="$venv/bin/python"
echo "openai $("$python" -c 'import openai; print(openai.__version__)'), $engine $("$engine" --version | head -1)"

# Whether a container of ours is still there (running or not).
container_exists() {
  [ -n "$("$engine" ps -a --filter "name=^$name\$" --format '{{.Names}}')" ]
}

cleanup() {
  if container_exists; then
    "$engine" rm -f "$name" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# Starts IMAGE's COMMAND (or its CMD) detached through run.sh, then waits for /health.
start() {
  cleanup
  local network=(--port "$port")
  [ "$host_network" -eq 1 ] && network=(--host-network)
  "$repo_root/container/run.sh" --engine "$engine" --image "$image" --name "$name" \
    --no-workspace --no-hf-cache "${network[@]}" --shm-size 2g -- "$@" \
    >"$log_dir/$name.log" 2>&1 &
  local runner=$! started=$SECONDS
  until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
    if [ $((SECONDS - started)) -ge 300 ] || ! kill -0 "$runner" 2>/dev/null; then
      tail -30 "$log_dir/$name.log" >&2
      echo "check.sh: the deployment did not become healthy" >&2
      exit 1
    fi
    sleep 1
  done
  echo "healthy after $((SECONDS - started)) s; /v1/models: $(curl -fsS "http://127.0.0.1:$port/v1/models")"
}

# Streams one chat completion with the official client; prints the text and the finish.
stream() {
  OPENAI_BASE_URL="$base_url" "$python" - "$@" <<'PY'
import sys, time, openai
prompt, max_tokens, marker = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
client = openai.OpenAI(api_key="unused", max_retries=0)
start, chunks, text, finish = time.time(), 0, [], None
for chunk in client.chat.completions.create(
        model=client.models.list().data[0].id, stream=True, max_tokens=max_tokens,
        temperature=0.0, messages=[{"role": "user", "content": prompt}]):
    if chunk.choices:
        delta = chunk.choices[0].delta.content or ""
        text.append(delta)
        chunks += 1
        finish = chunk.choices[0].finish_reason or finish
        if marker and chunks == 1:
            open(marker, "w").close()
print(f"{chunks} chunks in {time.time() - start:.1f} s, finish_reason={finish}: {''.join(text)[:300]!r}")
sys.exit(0 if finish in ("stop", "length") and chunks > 0 else 1)
PY
}

log_dir=$(mktemp -d)

step "tandem serve in $image (the default model on the CPU), port $port"
start
step "a chat completion streamed from the host by the openai client"
stream "What is the capital of France?" 48

step "SIGTERM while a stream is in flight: the stream finishes, nothing is left"
marker="$log_dir/first-token"
stream "Write a long story about a lighthouse keeper." 200 "$marker" >"$log_dir/inflight.txt" 2>&1 &
client=$!
until [ -e "$marker" ]; do sleep 0.2; done
echo "first token received; $engine stop (SIGTERM, 60 s grace)"
"$engine" stop -t 60 "$name" >/dev/null
status=0
wait "$client" || status=$?
cat "$log_dir/inflight.txt"
[ "$status" -eq 0 ] || { echo "check.sh: the in-flight stream did not finish" >&2; exit 1; }
sleep 1
if container_exists; then
  echo "check.sh: the container is still there after its stop" >&2
  exit 1
fi
echo "container gone; its log ends:"
tail -5 "$log_dir/$name.log"

step "the disaggregated example config (2 context + 1 decode worker, KV over UCX) in a container"
start tandem serve -c /opt/tandem/configs/cpu-disaggregated.yaml
stream "Name three colours." 32
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^tandem_(requests_disaggregated_total|kv_transfers_total|kv_transfer_bytes_total)' ||
  { echo "check.sh: no disaggregation counters" >&2; exit 1; }
"$engine" stop -t 60 "$name" >/dev/null
sleep 1
container_exists && { echo "check.sh: the container is still there after its stop" >&2; exit 1; }
echo "container gone"

step "the compose deployment: compose.cpu.yaml (NATS, context, decode, api-server: 4 containers)"
project=tandem-check
compose_file="$repo_root/container/compose/compose.cpu.yaml"
if [ "$engine" = podman ]; then
  # podman-compose runs podman itself: the limits podman may ask for come through a
  # containers.conf of ours.
  podman_containers_conf >"$log_dir/containers.conf"
  export CONTAINERS_CONF="$log_dir/containers.conf"
  compose=("$venv/bin/podman-compose" -f "$compose_file" -p "$project")
else
  compose=(docker compose -f "$compose_file" -p "$project")
fi
project_containers() {
  "$engine" ps -a --filter "label=com.docker.compose.project=$project" --format '{{.Names}}'
  "$engine" ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'
}
compose_down() { "${compose[@]}" down -t 60 >/dev/null 2>&1 || true; }
trap 'cleanup; compose_down' EXIT
API_PORT=$port "${compose[@]}" up -d >"$log_dir/compose-up.log" 2>&1 ||
  { cat "$log_dir/compose-up.log" >&2; exit 1; }
started=$SECONDS
until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  [ $((SECONDS - started)) -lt 300 ] || { "${compose[@]}" logs >&2; echo "check.sh: not healthy" >&2; exit 1; }
  sleep 1
done
echo "healthy after $((SECONDS - started)) s; containers: $(project_containers | sort -u | tr '\n' ' ')"
stream "Name three colours." 32
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^tandem_(requests_disaggregated_total|kv_transfers_total|kv_transfer_bytes_total)' ||
  { echo "check.sh: no disaggregation counters" >&2; exit 1; }
marker="$log_dir/first-token-compose"
stream "Write a long story about a lighthouse keeper." 200 "$marker" >"$log_dir/inflight-compose.txt" 2>&1 &
client=$!
until [ -e "$marker" ]; do sleep 0.2; done
# The tandem services first, NATS last: their bus must outlive their draining (podman-compose
# 1.6 stops NATS first when asked to stop everything at once, and the in-flight request is
# lost; docker compose stops dependents first by itself).
echo "first token received; compose stop of api-server, context-0, decode-0 (SIGTERM, 60 s grace), then nats"
"${compose[@]}" stop -t 60 api-server context-0 decode-0 >"$log_dir/compose-stop.log" 2>&1
"${compose[@]}" stop -t 60 nats >>"$log_dir/compose-stop.log" 2>&1
status=0
wait "$client" || status=$?
cat "$log_dir/inflight-compose.txt"
[ "$status" -eq 0 ] || { echo "check.sh: the in-flight stream did not finish" >&2; exit 1; }
running=$("$engine" ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'
  "$engine" ps --filter "label=com.docker.compose.project=$project" --format '{{.Names}}')
[ -z "$running" ] || { echo "check.sh: still running after the stop: $running" >&2; exit 1; }
"${compose[@]}" down -t 60 >/dev/null 2>&1
[ -z "$(project_containers)" ] || { echo "check.sh: containers left: $(project_containers)" >&2; exit 1; }
echo "all stopped and removed"

step "passed"
