#!/bin/bash
# Screening (not adopted): the retaining tunables with two malloc arenas instead of one. The
# start-up keeps this user setting and adds glibc.malloc.hugetlb=1 beside it (THP madvise).
cd "$(dirname "$0")/../../../.."  # the repository root
for r in 1 2 3; do
  GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json benchmarks/results/avx2/first_call/fc_a2_$r.json > /dev/null 2>&1
done
echo done
