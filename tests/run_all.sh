#!/usr/bin/env bash
# Runs the test suite once per Keras backend (the backend is fixed at import time). Exit status
# is non-zero if either run fails; arguments go to both pytest runs.
#
# The two backends run side by side, each line of output prefixed with its backend and a
# summary at the end: much of a suite's time is single-threaded (XLA compiles, tracing,
# subprocess start-ups), so two suites fill 2 cores better than one. On a 2-core AMD EPYC (Zen
# 3, AVX2) ../shared/scripts/fresh-check (clone, install, this script) took 1,539 s side by side
# (2026-12-07; the suites 23.5 / 24.0 min) against 2,325 s one after the other (2026-12-06).
# KERAS_ETSDM_TESTS_SERIAL=1 runs them one after the other, with pytest's own output.
set -uo pipefail
cd "$(dirname "$0")/.."
backends=(jax tensorflow)

if [ "${KERAS_ETSDM_TESTS_SERIAL:-0}" = "1" ]; then
  status=0
  for backend in "${backends[@]}"; do
    echo "=== KERAS_BACKEND=${backend} ==="
    KERAS_BACKEND=${backend} python -m pytest -q -m "not slow" "$@" || status=1
  done
  exit ${status}
fi

logs=$(mktemp -d)
trap 'rm -rf "${logs}"' EXIT
for backend in "${backends[@]}"; do
  (
    # pytest's cache (--lf, --ff) kept per backend, so the two runs never write one file.
    KERAS_BACKEND=${backend} python -u -m pytest -q -m "not slow" \
      -o "cache_dir=.pytest_cache/${backend}" "$@" 2>&1 \
      | tee "${logs}/${backend}.log" | sed -u "s/^/[${backend}] /"
    echo "${PIPESTATUS[0]}" > "${logs}/${backend}.status"
  ) &
done
wait

status=0
echo "=== summary ==="
for backend in "${backends[@]}"; do
  code=$(cat "${logs}/${backend}.status" 2>/dev/null || echo 1)
  summary=$(grep -E "(passed|failed|error|no tests ran)" "${logs}/${backend}.log" | tail -n 1)
  echo "KERAS_BACKEND=${backend}: exit ${code}; ${summary:-no pytest summary}"
  [ "${code}" = "0" ] || status=1
done
exit ${status}
