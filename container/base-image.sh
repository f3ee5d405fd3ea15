#!/usr/bin/env bash
# Makes a Debian base image where no container registry is reachable, only Debian's package
# mirror: a minimal root file system (debootstrap --variant=minbase) imported into podman as
# localhost/tandem-base:SUITE. container/build.sh --local-base builds both stages of tandem's
# image on it. Idempotent: an existing image is kept unless --force.
#
#   container/base-image.sh                     # localhost/tandem-base:bookworm
#   container/base-image.sh --print-name        # the image's name only
#
# Run `container/base-image.sh --help` for every option.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: container/base-image.sh [OPTIONS]

Makes localhost/tandem-base:SUITE, a minimal Debian image, with debootstrap and podman import
(no registry needed). Installs debootstrap, podman and runc with apt-get when they are missing
(as root). About 30 s and 200 MB.

Options:
      --suite SUITE        Debian release (default: bookworm)
      --mirror URL         Debian mirror (default: http://deb.debian.org/debian)
      --force              make the image again even if it exists
      --print-name         print the image's name and exit
  -h, --help               show this help
USAGE
}

die() {
  echo "base-image.sh: $*" >&2
  echo "Run container/base-image.sh --help for the options." >&2
  exit 2
}

suite=bookworm
mirror=http://deb.debian.org/debian
force=0
print_name=0
while [ $# -gt 0 ]; do
  case "$1" in
    --suite)
      [ $# -ge 2 ] || die "--suite needs a value"
      suite="$2"
      shift 2
      ;;
    --mirror)
      [ $# -ge 2 ] || die "--mirror needs a value"
      mirror="$2"
      shift 2
      ;;
    --force)
      force=1
      shift
      ;;
    --print-name)
      print_name=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1'" ;;
  esac
done
name="localhost/tandem-base:$suite"
if [ "$print_name" -eq 1 ]; then
  echo "$name"
  exit 0
fi

missing=()
for tool in debootstrap podman runc; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "base-image.sh: needs ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "base-image.sh: installing ${missing[*]}" >&2
  apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "base-image.sh: debootstrap needs root" >&2
  exit 1
fi

if [ "$force" -eq 0 ] && podman image exists "$name"; then
  echo "base-image.sh: $name exists (--force to make it again)" >&2
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "base-image.sh: debootstrap $suite from $mirror" >&2
debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; exit 1; }
tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
echo "base-image.sh: made $name ($(podman image inspect --format '{{.Size}}' "$name") bytes)" >&2
