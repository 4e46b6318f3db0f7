#!/bin/bash
# One fresh process per variant, one after the other; JSON lines into temp_probe.jsonl.
cd "$(dirname "$0")/../../../.."
out=benchmarks/results/avx2/winograd/temp_probe.jsonl
: > $out
probe="python benchmarks/results/avx2/winograd/temp_probe.py"
for args in "--setting direct" "--setting all" "--setting max16" \
            "--setting all --kernel_gradient per_tap" \
            "--setting all --max_input 131072" "--setting all --max_input 262144"; do
  KERAS_BACKEND=jax $probe $args 2>/dev/null | tail -1 >> $out
done
