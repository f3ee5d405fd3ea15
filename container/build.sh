#!/usr/bin/env bash
# Builds tandem's container image (container/Dockerfile) from the repository root.
#
#   container/build.sh                          # tandem:latest
#   container/build.sh --tag v0.1 --no-default-model
#   container/build.sh --dry-run                # print the docker command, run nothing
#
# Run `container/build.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: container/build.sh [OPTIONS]

Builds the tandem image from container/Dockerfile, with the repository root as the build
context (BuildKit; `docker buildx` is used when plain `docker build` lacks BuildKit).

Options:
  -n, --name NAME          image name (default: tandem; env TANDEM_IMAGE_NAME)
  -t, --tag TAG            image tag (default: latest; env TANDEM_IMAGE_TAG)
      --cuda-image IMAGE   runtime base image (default: nvidia/cuda:13.0.0-runtime-ubuntu24.04)
      --rust-version V     Rust toolchain of the build stage (default: 1.95.0)
      --no-default-model   leave the embedded default model out of the image
      --platform P         target platform, e.g. linux/amd64
      --build-arg K=V      another build argument (repeatable)
      --no-cache           build every step again
      --push               push the image after building (docker buildx --push)
      --docker CMD         the docker program (default: docker; env DOCKER)
      --dry-run            print the docker command instead of running it
  -h, --help               show this help

Examples:
  container/build.sh --name registry.example.com/tandem --tag 0.1.0 --push
  container/build.sh --cuda-image nvidia/cuda:13.0.1-runtime-ubuntu24.04 --dry-run
EOF
}

die() {
  echo "build.sh: $*" >&2
  echo "Run container/build.sh --help for the options." >&2
  exit 2
}

# The value of option $1, which must be there ($2 is the number of arguments left).
need_value() {
  if [ "$2" -lt 2 ]; then
    die "$1 needs a value"
  fi
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
name="${TANDEM_IMAGE_NAME:-tandem}"
tag="${TANDEM_IMAGE_TAG:-latest}"
docker_cmd="${DOCKER:-docker}"
dry_run=0
push=0
no_cache=0
platform=""
build_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    -n | --name)
      need_value "$1" $#
      name="$2"
      shift 2
      ;;
    -t | --tag)
      need_value "$1" $#
      tag="$2"
      shift 2
      ;;
    --cuda-image)
      need_value "$1" $#
      build_args+=("CUDA_IMAGE=$2")
      shift 2
      ;;
    --rust-version)
      need_value "$1" $#
      build_args+=("RUST_VERSION=$2")
      shift 2
      ;;
    --no-default-model)
      build_args+=("DEFAULT_MODEL=0")
      shift
      ;;
    --platform)
      need_value "$1" $#
      platform="$2"
      shift 2
      ;;
    --build-arg)
      need_value "$1" $#
      case "$2" in
        *=*) build_args+=("$2") ;;
        *) die "--build-arg takes KEY=VALUE, not '$2'" ;;
      esac
      shift 2
      ;;
    --no-cache)
      no_cache=1
      shift
      ;;
    --push)
      push=1
      shift
      ;;
    --docker)
      need_value "$1" $#
      docker_cmd="$2"
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
    *)
      die "unknown option '$1'"
      ;;
  esac
done

if [ -z "$name" ] || [ -z "$tag" ]; then
  die "the image name and tag must not be empty"
fi

# --push needs buildx; a plain build uses `docker build`, which is BuildKit by default since
# Docker 23 (DOCKER_BUILDKIT=1 covers older engines).
if [ "$push" -eq 1 ]; then
  cmd=("$docker_cmd" buildx build --push)
else
  cmd=("$docker_cmd" build)
fi
cmd+=(--file "$repo_root/container/Dockerfile" --tag "$name:$tag")
if [ -n "$platform" ]; then
  cmd+=(--platform "$platform")
fi
if [ "$no_cache" -eq 1 ]; then
  cmd+=(--no-cache)
fi
for arg in ${build_args[@]+"${build_args[@]}"}; do
  cmd+=(--build-arg "$arg")
done
cmd+=("$repo_root")

if [ "$dry_run" -eq 1 ]; then
  print_command env DOCKER_BUILDKIT=1 "${cmd[@]}"
  exit 0
fi

if ! command -v "$docker_cmd" >/dev/null 2>&1; then
  echo "build.sh: '$docker_cmd' is not installed (see https://docs.docker.com/engine/install/)" >&2
  exit 1
fi
echo "build.sh: building $name:$tag" >&2
DOCKER_BUILDKIT=1 exec "${cmd[@]}"
