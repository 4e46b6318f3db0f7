#!/bin/bash
# More first calls after run.sh's three pairs (too noisy to decide: 23-34 s either way):
# rounds 4-9, the order of the two swapped every round (one-two, two-one, ...); then the one-arena
# long run again, as run.sh's "one_long" ran under a library already giving two arenas on AVX2
# (renamed memory_two_long_b). Both settings given explicitly here.
cd "$(dirname "$0")/../../../.."  # the repository root
out=benchmarks/results/avx2/arena
ONE=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=0
TWO=glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=0
one() { GLIBC_TUNABLES=$ONE .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/first_call_one_$1.json > /dev/null 2>&1; }
two() { GLIBC_TUNABLES=$TWO .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/first_call_two_$1.json > /dev/null 2>&1; }
for r in 4 5 6 7 8 9; do
  if [ $((r % 2)) = 0 ]; then one $r; two $r; else two $r; one $r; fi
done
GLIBC_TUNABLES=$ONE .venv/bin/python benchmarks/memory.py --configs "jax#one_long" --steps 100 --output_dir $out/memory_one_long > /dev/null 2>&1
echo done
