#!/bin/bash
# The EMA's copies made without a compiled op per weight shape: fresh JAX processes,
# the library before (commit a1e4183, a worktree in /tmp/wt_before put first on PYTHONPATH)
# and after, alternated; benchmarks/first_call.py of this tree in both.
#   git worktree add /tmp/wt_before a1e4183 && alternate_build.sh "1 2 3"
cd "$(dirname "$0")/../../../.."  # the repository root
out=benchmarks/results/avx2/jax_compile/build
mkdir -p $out
for r in $1; do
  PYTHONPATH=/tmp/wt_before .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --optimizer clipped_adam --json $out/before_$r.json > /dev/null 2>&1
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --optimizer clipped_adam --json $out/after_$r.json > /dev/null 2>&1
done
