# shellcheck shell=bash
# Sourced by the scripts in scripts/device/ on the device machine: where models and output go,
# the carried binaries (.kit/bin/NAME.gz, unpacked here) on PATH, `random_model PRESET`, which
# makes (once) and prints the directory of a random-weight model of PRESET's shapes, and
# `run_tests` (test-counts.sh), which runs a test binary and reports how many of its tests ran,
# were skipped and failed.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/device/test-counts.sh
source "$root/scripts/device/test-counts.sh"
models=${TANDEM_DEVICE_MODELS:-/tmp/tandem-models}
out=${OUT:-/tmp/tandem-out}
mkdir -p "$models" "$out"
export PATH="$root/.kit/bin:$PATH"

for gz in "$root"/.kit/bin/*.gz; do
  [ -e "$gz" ] || continue
  gunzip -kf "$gz"
  chmod +x "${gz%.gz}"
done

# NCCL for tensor-parallel GPU workers, loaded at run time like libcuda. cudarc opens
# `libnccl.so` (not `.so.2`), which only a -dev package provides; the device machine has
# `libnccl.so.2` in torch's pip package (nvidia-nccl-cu*): linked under that name here.
if [ -z "${TANDEM_NCCL_LIB:-}" ]; then
  site_dirs=()
  while IFS= read -r dir; do site_dirs+=("$dir"); done < <(
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null
  )
  # None found is no error here: the NCCL tests then skip, failing the stages that need them.
  TANDEM_NCCL_LIB=$(find "${site_dirs[@]}" /usr/lib /usr/local/lib -name 'libnccl.so.2' 2>/dev/null |
    head -1 || :)
fi
# The device machines must never use NVLink multicast (KINDS.md: it can take the host's GPUs
# out of service); their environment turns it off, and so does this, whatever was inherited.
export NCCL_NVLS_ENABLE=0
if [ -n "${TANDEM_NCCL_LIB:-}" ]; then
  mkdir -p "$models/.nccl"
  ln -sf "$TANDEM_NCCL_LIB" "$models/.nccl/libnccl.so"
  export LD_LIBRARY_PATH="$models/.nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

random_model() { # preset
  local dir="$models/$1"
  [ -f "$dir/config.json" ] || model-prep random --preset "$1" -o "$dir" --seed 0 >&2
  echo "$dir"
}

serve_and_wait() { # config model port log [tandem program]: `tandem serve` in the background,
  # its pid in `served_pid`; returns once it prints "tandem: serving" (or fails after 400 s)
  "${5:-tandem}" serve -c "$1" --model "$2" --port "$3" --ready-timeout-s 400 >"$4" 2>&1 &
  # shellcheck disable=SC2034 # read by the scripts that source this file
  served_pid=$!
  for _ in $(seq 1 400); do
    grep -q "tandem: serving" "$4" && return 0
    sleep 1
  done
  echo "not serving after 400 s: $4" >&2
  return 1
}
