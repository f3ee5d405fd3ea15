#!/usr/bin/env bash
# Runs tandem's container image: `tandem serve` (the image's default command), a shell, or any
# command, with GPUs, the workspace, the Hugging Face cache and a models directory mounted.
#
#   container/run.sh                                  # tandem serve on the CPU, port 8000
#   container/run.sh --gpus all -- tandem serve -c examples/configs/gpu-1.yaml
#   container/run.sh -it --gpus device=0,1            # a shell on GPUs 0 and 1
#   container/run.sh --dry-run --gpus 2 -- nvidia-smi # print the docker command only
#
# Run `container/run.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: container/run.sh [OPTIONS] [-- COMMAND [ARG...]]

Runs the tandem image (container/build.sh builds it). Without a COMMAND: the image's default,
`tandem serve` (the default model on the CPU; configs are under /opt/tandem/configs and, with
the workspace mounted, examples/configs/). With -it and no COMMAND: bash.

Options:
      --image IMAGE        image to run (default: tandem:latest; env TANDEM_IMAGE)
  -it, --interactive       interactive, with a terminal (-i -t); bash unless a COMMAND is given
      --gpus SPEC          GPUs for the container: all, a count (2), or device=0,1 (needs the
                           NVIDIA container toolkit); none (default) runs without GPUs
      --workspace DIR      mount DIR at /workspace and start there (default: this repository)
      --no-workspace       mount no workspace (start in /home/tandem)
      --hf-cache DIR       Hugging Face cache to mount at /home/tandem/.cache/huggingface
                           (default: $HF_HOME, else ~/.cache/huggingface, when it exists)
      --no-hf-cache        mount no Hugging Face cache
      --models DIR         mount DIR at /models (model directories made by model-prep)
  -p, --port PORT          publish the api-server's port 8000 as host port PORT (default 8000)
      --no-port            publish nothing
      --name NAME          container name
  -e, --env KEY=VALUE      set an environment variable (repeatable); HF_TOKEN is passed through
                           by name (its value never printed) whenever it is set
      --shm-size SIZE      /dev/shm size; UCX moves the KV cache through it (default: 16g)
      --host-network       use the host's network (UCX between hosts, NATS on the host)
      --user-host          run as your own uid:gid (files written to the mounts are yours)
      --engine ENGINE      docker, podman, or auto (default: docker when its daemon answers,
                           else podman when installed; env TANDEM_CONTAINER_ENGINE). With
                           podman, GPUs are CDI devices (nvidia.com/gpu=N: `nvidia-ctk cdi
                           generate` makes their spec)
      --docker CMD         the docker program (default: docker; env DOCKER); implies
                           --engine docker
      --dry-run            print the command instead of running it
  -h, --help               show this help

Examples:
  container/run.sh --models ~/models -- tandem serve --model /models/smollm2
  container/run.sh --gpus device=0,1 --models ~/models -- \
      tandem serve -c /opt/tandem/configs/gpu-2.yaml --model /models/llama-3.1-8b
  HF_TOKEN=hf_... container/run.sh --models ~/models -- \
      model-prep fetch meta-llama/Llama-3.1-8B-Instruct -o /models/llama-3.1-8b
EOF
}

die() {
  echo "run.sh: $*" >&2
  echo "Run container/run.sh --help for the options." >&2
  exit 2
}

need_value() {
  if [ "$2" -lt 2 ]; then
    die "$1 needs a value"
  fi
}

# An existing directory, as an absolute path.
absolute_dir() {
  if [ ! -d "$2" ]; then
    die "$1: '$2' is not a directory"
  fi
  (cd "$2" && pwd)
}

# One word for a POSIX shell: as is when it is plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The command, copy-pasteable, on one line.
print_command() {
  quote "$1"
  shift
  for word in "$@"; do
    printf ' '
    quote "$word"
  done
  printf '\n'
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=container/engine.sh
source "$repo_root/container/engine.sh"
image="${TANDEM_IMAGE:-tandem:latest}"
docker_cmd="${DOCKER:-docker}"
engine="${TANDEM_CONTAINER_ENGINE:-auto}"
if [ -n "${DOCKER:-}" ]; then
  engine=docker
fi
interactive=0
gpus=""
workspace="$repo_root"
hf_cache=""
hf_cache_set=0
models=""
port="8000"
name=""
shm_size="16g"
host_network=0
user_host=0
dry_run=0
envs=()
command_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    --image)
      need_value "$1" $#
      image="$2"
      shift 2
      ;;
    -it | -ti | --interactive)
      interactive=1
      shift
      ;;
    --gpus)
      need_value "$1" $#
      gpus="$2"
      shift 2
      ;;
    --workspace)
      need_value "$1" $#
      workspace="$(absolute_dir "$1" "$2")"
      shift 2
      ;;
    --no-workspace)
      workspace=""
      shift
      ;;
    --hf-cache)
      need_value "$1" $#
      hf_cache="$(absolute_dir "$1" "$2")"
      hf_cache_set=1
      shift 2
      ;;
    --no-hf-cache)
      hf_cache=""
      hf_cache_set=1
      shift
      ;;
    --models)
      need_value "$1" $#
      models="$(absolute_dir "$1" "$2")"
      shift 2
      ;;
    -p | --port)
      need_value "$1" $#
      port="$2"
      shift 2
      ;;
    --no-port)
      port=""
      shift
      ;;
    --name)
      need_value "$1" $#
      name="$2"
      shift 2
      ;;
    -e | --env)
      need_value "$1" $#
      case "$2" in
        *=*) envs+=("$2") ;;
        *) die "$1 takes KEY=VALUE, not '$2'" ;;
      esac
      shift 2
      ;;
    --shm-size)
      need_value "$1" $#
      shm_size="$2"
      shift 2
      ;;
    --host-network)
      host_network=1
      shift
      ;;
    --user-host)
      user_host=1
      shift
      ;;
    --docker)
      need_value "$1" $#
      docker_cmd="$2"
      engine=docker
      shift 2
      ;;
    --engine)
      need_value "$1" $#
      engine="$2"
      shift 2
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      command_args=("$@")
      break
      ;;
    *)
      die "unknown option '$1' (a command to run goes after --)"
      ;;
  esac
done

# GPUs: docker reads --gpus as CSV, so a device list must arrive quoted ("device=0,1").
gpu_flag=""
case "$gpus" in
  "" | none) ;;
  all) gpu_flag="all" ;;
  device=*)
    devices="${gpus#device=}"
    if ! [[ "$devices" =~ ^[0-9A-Za-z-]+(,[0-9A-Za-z-]+)*$ ]]; then
      die "--gpus device=LIST takes GPU indices or UUIDs separated by commas, not '$devices'"
    fi
    gpu_flag="\"device=$devices\""
    ;;
  *)
    if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
      die "--gpus takes all, a count, device=0,1 or none, not '$gpus'"
    fi
    gpu_flag="$gpus"
    ;;
esac

if [ -n "$port" ] && ! [[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]]; then
  die "--port takes a port number (1-65535), not '$port'"
fi

if [ "$hf_cache_set" -eq 0 ]; then
  default_hf_cache="${HF_HOME:-$HOME/.cache/huggingface}"
  if [ -d "$default_hf_cache" ]; then
    hf_cache="$(cd "$default_hf_cache" && pwd)"
  fi
fi

engine=$(pick_engine "$engine") || die "--engine takes docker, podman or auto"
if [ "$engine" = podman ]; then
  cmd=(podman run --rm)
  while IFS= read -r arg; do cmd+=("$arg"); done < <(podman_host_args)
else
  cmd=("$docker_cmd" run --rm)
fi
if [ "$interactive" -eq 1 ]; then
  cmd+=(-i -t)
fi
if [ -n "$name" ]; then
  cmd+=(--name "$name")
fi
if [ -n "$gpu_flag" ] && [ "$engine" = podman ]; then
  # The NVIDIA container toolkit's CDI devices: nvidia.com/gpu=all, or one per GPU.
  case "$gpus" in
    all) cmd+=(--device nvidia.com/gpu=all) ;;
    device=*)
      IFS=, read -ra listed <<<"${gpus#device=}"
      for gpu in "${listed[@]}"; do cmd+=(--device "nvidia.com/gpu=$gpu"); done
      ;;
    *) for ((gpu = 0; gpu < gpus; gpu++)); do cmd+=(--device "nvidia.com/gpu=$gpu"); done ;;
  esac
elif [ -n "$gpu_flag" ]; then
  cmd+=(--gpus "$gpu_flag")
fi
cmd+=(--shm-size "$shm_size")
if [ "$engine" = podman ]; then
  while IFS= read -r arg; do cmd+=("$arg"); done < <(podman_memlock_args)
else
  cmd+=(--ulimit memlock=-1)
fi
if [ "$host_network" -eq 1 ]; then
  cmd+=(--network host)
elif [ -n "$port" ]; then
  cmd+=(-p "$port:8000")
fi
if [ "$user_host" -eq 1 ]; then
  cmd+=(--user "$(id -u):$(id -g)")
fi
if [ -n "$workspace" ]; then
  cmd+=(-v "$workspace:/workspace" -w /workspace)
fi
if [ -n "$hf_cache" ]; then
  cmd+=(-v "$hf_cache:/home/tandem/.cache/huggingface")
fi
if [ -n "$models" ]; then
  cmd+=(-v "$models:/models")
fi
# By name only: docker takes the value from this environment, and it is never printed.
if [ -n "${HF_TOKEN:-}" ]; then
  cmd+=(-e HF_TOKEN)
fi
for env in ${envs[@]+"${envs[@]}"}; do
  cmd+=(-e "$env")
done
cmd+=("$image")
if [ ${#command_args[@]} -gt 0 ]; then
  cmd+=("${command_args[@]}")
elif [ "$interactive" -eq 1 ]; then
  cmd+=(bash)
fi

if [ "$dry_run" -eq 1 ]; then
  print_command "${cmd[@]}"
  exit 0
fi

if ! command -v "${cmd[0]}" >/dev/null 2>&1; then
  echo "run.sh: '${cmd[0]}' is not installed (docker: https://docs.docker.com/engine/install/;" \
    "podman: apt-get install podman runc)" >&2
  exit 1
fi
exec "${cmd[@]}"
