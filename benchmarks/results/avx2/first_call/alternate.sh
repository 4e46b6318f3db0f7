#!/bin/bash
# Alternated fresh-process first calls of JAX's training step: the AVX2 memory set (now the
# default) against the AVX2 tuning before it (huge pages, async dispatch, XLA's scheduler).
cd "$(dirname "$0")/../../../.."  # the repository root
for r in 1 2 3; do
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json benchmarks/results/avx2/first_call/fc_set_$r.json > /dev/null 2>&1
  KERAS_ETSDM_RETAIN_MEMORY=0 KERAS_ETSDM_JAX_SYNC_DISPATCH=0 XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true \
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json benchmarks/results/avx2/first_call/fc_old_$r.json > /dev/null 2>&1
done
echo done
