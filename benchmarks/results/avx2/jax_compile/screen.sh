#!/bin/bash
# Screen XLA CPU flags for the compile time of JAX's first training call: per round and flag one
# fresh process with cpu_tuning's flags only and one with the flag added to XLA_FLAGS, alternated
# (benchmarks/first_call.py, whose JSON splits the first call into trace / lower / XLA compile).
#   screen.sh "1 2" --xla_backend_optimization_level=1 ...      # rounds 1 and 2
cd "$(dirname "$0")/../../../.."  # the repository root
out=benchmarks/results/avx2/jax_compile/screen
mkdir -p $out
rounds=$1
shift
for round in $rounds; do
  for flag in "$@"; do
    name=$(echo "$flag" | sed 's/^--xla_//; s/=/-/')
    .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/default_${name}_$round.json > /dev/null 2>&1
    XLA_FLAGS="$flag" .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/${name}_$round.json > /dev/null 2>&1
  done
done
