#!/usr/bin/env bash
# Builds tandem's container image (container/Dockerfile) from the repository root.
#
#   container/build.sh                          # tandem:latest, with docker or podman
#   container/build.sh --tag v0.1 --no-default-model
#   container/build.sh --local-base             # no registry: a Debian base made here
#   container/build.sh --dry-run                # print the build command, run nothing
#
# Run `container/build.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: container/build.sh [OPTIONS]

Builds the tandem image from container/Dockerfile, with the repository root as the build
context: with docker (BuildKit; `docker buildx` for --push) or podman, whichever works.

Options:
  -n, --name NAME          image name (default: tandem; env TANDEM_IMAGE_NAME)
  -t, --tag TAG            image tag (default: latest; env TANDEM_IMAGE_TAG)
      --engine ENGINE      docker, podman, or auto (default: docker when its daemon answers,
                           else podman when installed; env TANDEM_CONTAINER_ENGINE)
      --cuda-image IMAGE   runtime base image (default: nvidia/cuda:13.0.0-runtime-ubuntu24.04)
      --build-image IMAGE  base image of the build stage (default: ubuntu:24.04)
      --cuda-libs FROM     where NVRTC, cuBLAS, cuBLASLt and NCCL come from: base (the runtime
                           base image has them, as NVIDIA's CUDA images do) or wheels (NVIDIA's
                           PyPI wheels, for a base without them; default: base)
      --local-base         build with no registry at all: make a Debian bookworm base image
                           here (container/base-image.sh: debootstrap, podman import) and build
                           both stages on it with --cuda-libs wheels (with podman, whose image
                           store holds the base)
      --ca-bundle FILE     CA certificates the build's downloads trust (a build secret: for
                           a network whose proxy has a CA of its own; env TANDEM_BUILD_CA_BUNDLE)
      --rust-version V     Rust toolchain of the build stage (default: 1.95.0)
      --no-default-model   leave the embedded default model out of the image
      --platform P         target platform, e.g. linux/amd64
      --build-arg K=V      another build argument (repeatable)
      --no-cache           build every step again
      --push               push the image after building (docker buildx --push)
      --docker CMD         the docker program (default: docker; env DOCKER); implies
                           --engine docker
      --dry-run            print the build command instead of running it
  -h, --help               show this help

Examples:
  container/build.sh --name registry.example.com/tandem --tag 0.1.0 --push
  container/build.sh --cuda-image nvidia/cuda:13.0.1-runtime-ubuntu24.04 --dry-run
  container/build.sh --local-base --ca-bundle /etc/ssl/certs/ca-certificates.crt
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
# shellcheck source=container/engine.sh
source "$repo_root/container/engine.sh"
name="${TANDEM_IMAGE_NAME:-tandem}"
tag="${TANDEM_IMAGE_TAG:-latest}"
docker_cmd="${DOCKER:-docker}"
engine="${TANDEM_CONTAINER_ENGINE:-auto}"
if [ -n "${DOCKER:-}" ]; then
  engine=docker
fi
local_base=0
engine_option=""
ca_bundle="${TANDEM_BUILD_CA_BUNDLE:-}"
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
    --build-image)
      need_value "$1" $#
      build_args+=("BUILD_IMAGE=$2")
      shift 2
      ;;
    --cuda-libs)
      need_value "$1" $#
      case "$2" in
        base | wheels) build_args+=("CUDA_LIBS=$2") ;;
        *) die "--cuda-libs takes base or wheels, not '$2'" ;;
      esac
      shift 2
      ;;
    --ca-bundle)
      need_value "$1" $#
      ca_bundle="$2"
      shift 2
      ;;
    --local-base)
      local_base=1
      shift
      ;;
    --engine)
      need_value "$1" $#
      engine="$2"
      engine_option="$2"
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
      engine=docker
      engine_option=docker
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

# The local base lives in podman's image store: --local-base builds with podman unless the
# command line asked for docker.
if [ "$local_base" -eq 1 ] && [ "$engine_option" != docker ]; then
  engine=podman
fi
engine=$(pick_engine "$engine") || die "--engine takes docker, podman or auto"
if [ "$local_base" -eq 1 ]; then
  if [ "$engine" != podman ]; then
    die "--local-base imports its base image with podman, not $engine"
  fi
  base_image=$("$repo_root/container/base-image.sh" --print-name)
  build_args=("BUILD_IMAGE=$base_image" "CUDA_IMAGE=$base_image" "CUDA_LIBS=wheels"
    ${build_args[@]+"${build_args[@]}"})
fi

if [ "$engine" = podman ]; then
  if [ "$push" -eq 1 ]; then
    die "--push is docker's (buildx); with podman, run: podman push $name:$tag"
  fi
  # The docker image format keeps the HEALTHCHECK (OCI's has none); RUN steps reach the
  # package registries through the host's network.
  cmd=(podman build --format docker --network host)
  while IFS= read -r arg; do cmd+=("$arg"); done < <(podman_host_args)
elif [ "$push" -eq 1 ]; then
  # --push needs buildx; a plain build uses `docker build`, which is BuildKit by default since
  # Docker 23 (DOCKER_BUILDKIT=1 covers older engines).
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
if [ -n "$ca_bundle" ]; then
  [ -f "$ca_bundle" ] || die "--ca-bundle: no file '$ca_bundle'"
  cmd+=(--secret "id=ca_bundle,src=$ca_bundle")
fi
for arg in ${build_args[@]+"${build_args[@]}"}; do
  cmd+=(--build-arg "$arg")
done
cmd+=("$repo_root")

if [ "$dry_run" -eq 1 ]; then
  if [ "$engine" = podman ]; then
    print_command "${cmd[@]}"
  else
    print_command env DOCKER_BUILDKIT=1 "${cmd[@]}"
  fi
  exit 0
fi

if [ "$local_base" -eq 1 ]; then
  "$repo_root/container/base-image.sh"
fi
if ! command -v "${cmd[0]}" >/dev/null 2>&1; then
  echo "build.sh: '${cmd[0]}' is not installed (docker: https://docs.docker.com/engine/install/;" \
    "podman: apt-get install podman runc)" >&2
  exit 1
fi
echo "build.sh: building $name:$tag with $engine" >&2
DOCKER_BUILDKIT=1 exec "${cmd[@]}"
