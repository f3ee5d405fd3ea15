# shellcheck shell=bash
# Sourced by kit-env.sh (and by test-skip/tests/counts.rs, which tests it here): runs libtest
# binaries on the device machine and says what they did. libtest counts a test that returned
# early (no GPU, one GPU where it needs two, no NCCL) as passed; such tests print
# `SKIPPED <test>: <reason>` (the tandem-test-skip crate), and the counts take those out of the
# passed ones, so a log says how many tests really ran.

# run_tests [--no-skips] NAME LOG COMMAND...: runs COMMAND (a libtest binary and its arguments)
# with its whole output in LOG and its test, skip and panic lines on stdout as they come, then
# prints, as test_counts does,
#   tests NAME: R ran (P passed, F failed), S skipped, I ignored; exit X
# and returns 1 when the run failed (see test_counts), 0 otherwise. Safe under `set -e`: the
# counts are printed before it returns.
run_tests() {
  local options=()
  if [ "$1" = --no-skips ]; then
    options=(--no-skips)
    shift
  fi
  local name=$1 log=$2 status=0
  shift 2
  # In an `if`, a failing pipeline neither stops a `set -e` caller nor loses PIPESTATUS.
  if ! "$@" 2>&1 | tee "$log" | grep --line-buffered -E '^test |SKIPPED |panicked'; then
    status=${PIPESTATUS[0]}
  fi
  test_counts "${options[@]}" "$name" "$status" "$log"
}

# test_counts [--no-skips] NAME STATUS LOG: the counts of a libtest run whose output is in LOG
# and whose exit status was STATUS, from its `test result:` lines (summed when there are several)
# and its distinct SKIPPED lines. Prints the counts line, and a line saying why for a failed run:
# the binary exited non-zero, printed no summary (it crashed or was killed), selected no test (a
# filter that matches nothing), had a failed test or, with --no-skips (for a stage whose machine
# must run every test it selects), skipped one. Returns 1 for a failed run.
test_counts() {
  local no_skips=0
  if [ "$1" = --no-skips ]; then
    no_skips=1
    shift
  fi
  local name=$1 status=$2 log=$3
  local summaries passed failed ignored skipped
  # mawk is Debian's awk: no gawk extensions.
  read -r summaries passed failed ignored < <(awk '
    /^test result: / {
      n++
      for (i = 2; i <= NF; i++) {
        if ($i == "passed;") p += $(i - 1)
        if ($i == "failed;") f += $(i - 1)
        if ($i == "ignored;") g += $(i - 1)
      }
    }
    END { print n + 0, p + 0, f + 0, g + 0 }' "$log")
  skipped=$({ grep -oE 'SKIPPED [A-Za-z0-9_:]+: ' "$log" || :; } | sort -u | wc -l)
  local really_passed=$((passed - skipped))
  echo "tests $name: $((really_passed + failed)) ran ($really_passed passed, $failed failed)," \
    "$skipped skipped, $ignored ignored; exit $status"
  local why=()
  [ "$status" -eq 0 ] || why+=("the binary exited $status")
  if [ "$summaries" -eq 0 ]; then
    local last
    last=$({ grep -E '^test ' "$log" || :; } | tail -n 1)
    why+=("no libtest summary, so it crashed or was killed (last test line: ${last:-none})")
  fi
  [ "$summaries" -eq 0 ] || [ $((passed + failed)) -gt 0 ] || why+=("no test selected")
  [ "$failed" -eq 0 ] || why+=("$failed failed")
  [ "$no_skips" -eq 0 ] || [ "$skipped" -eq 0 ] || why+=("$skipped skipped where every test must run")
  if [ ${#why[@]} -gt 0 ]; then
    local joined
    printf -v joined '%s; ' "${why[@]}"
    echo "tests $name: FAILED: ${joined%; }"
    return 1
  fi
}
