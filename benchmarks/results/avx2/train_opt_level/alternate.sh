#!/bin/bash
# Fresh-process first calls of JAX's training step at LLVM level 1 alternated with level 3
# (XLA's default), in a seeded random order per pair (KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL).
set -e
out=${1:?output folder}; pairs=${2:-4}
cd "$(dirname "$0")/../../../.."
for i in $(seq 1 "$pairs"); do
  order=$(python3 -c "import random; r = random.Random($i); o = ['1', '3']; r.shuffle(o); print(' '.join(o))")
  for level in $order; do
    KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL=$level "${PYTHON:-.venv/bin/python}" benchmarks/first_call.py \
      --backends jax --rounds 1 --modes off --jit_compile auto --optimizer clipped_adam \
      --winograd_training auto --json "$out/level${level}_$i.json" | grep "round 0"
  done
done
