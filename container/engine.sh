# shellcheck shell=bash
# Sourced by container/build.sh and container/run.sh: which container engine to drive, and the
# arguments podman needs on hosts that restrict it.
#
# `pick_engine PREFERENCE` prints docker or podman: PREFERENCE itself when it is one of them;
# for `auto`, docker when its daemon answers, else podman when it is installed, else docker
# (whose absence is then reported by the caller).
pick_engine() {
  case "$1" in
    docker | podman) echo "$1" ;;
    auto)
      if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
      elif command -v podman >/dev/null 2>&1; then
        echo podman
      else
        echo docker
      fi
      ;;
    *) return 1 ;;
  esac
}

# The arguments `podman build` and `podman run` take on every host, one per line:
# - runc as the OCI runtime where it is installed: podman's default crun fails on hosts whose
#   cgroups it cannot manage (seen on a Debian 12 VM), where runc works;
# - the open-files and processes limits the container starts with, at what this shell may
#   give: podman as root asks for more (1,048,576 files), which a host without
#   CAP_SYS_RESOURCE refuses ("error setting rlimit ... operation not permitted"), and a
#   processes limit past the kernel's pid_max was refused the same way.
podman_host_args() {
  if command -v runc >/dev/null 2>&1; then
    printf '%s\n' --runtime runc
  fi
  local files processes pid_max
  files=$(ulimit -Hn)
  processes=$(ulimit -Hu)
  pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo unlimited)
  if [ "$processes" = unlimited ] || { [ "$pid_max" != unlimited ] && [ "$pid_max" -lt "$processes" ]; }; then
    processes=$pid_max
  fi
  if [ "$files" != unlimited ]; then
    printf '%s\n' --ulimit "nofile=$files:$files"
  fi
  if [ "$processes" != unlimited ]; then
    printf '%s\n' --ulimit "nproc=$processes:$processes"
  fi
}

# `podman run`'s locked-memory limit (UCX registers the memory it moves): unlimited where this
# shell's hard limit is, else that limit, in bytes.
podman_memlock_args() {
  local kib
  kib=$(ulimit -Hl)
  if [ "$kib" = unlimited ]; then
    printf '%s\n' --ulimit memlock=-1
  else
    printf '%s\n' --ulimit "memlock=$((kib * 1024)):$((kib * 1024))"
  fi
}

# A containers.conf (printed) that starts podman's containers with the limits
# `podman_host_args` gives, for tools that run podman themselves (podman-compose): pass its
# path in CONTAINERS_CONF.
podman_containers_conf() {
  local limits=() arg
  while IFS= read -r arg; do
    case "$arg" in
      nofile=* | nproc=*) limits+=("\"$arg\"") ;;
    esac
  done < <(podman_host_args)
  local IFS=,
  printf '[containers]\ndefault_ulimits = [%s]\n' "${limits[*]}"
}
