#!/usr/bin/env bash
# Runs the test suite once per Keras backend (the backend is fixed at import time).
# Exit status is non-zero if either run fails.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for backend in jax tensorflow; do
  echo "=== KERAS_BACKEND=${backend} ==="
  KERAS_BACKEND=${backend} python -m pytest -q -m "not slow" "$@" || status=1
done
exit ${status}
