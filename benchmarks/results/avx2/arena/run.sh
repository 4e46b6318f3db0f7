#!/bin/bash
# JAX's retaining malloc with one arena (the library's RETAIN_TUNABLES) against two, on the
# same small pages (hugetlb=0 named, since the start-up adds hugetlb=1 beside a user's own
# malloc setting). Fresh processes, alternated one/two: peak RSS over 30 steps (5 each), the
# first call with the cache off (3 each), then one long process each (100 steps). The one-arena
# runs here take the library's setting, which became two arenas on AVX2 while the long run was
# pending: its output is memory_two_long_b; run_first_call_more.sh repeats it explicitly. To rerun
# this script now, give the one-arena setting explicitly as run_first_call_more.sh does.
cd "$(dirname "$0")/../../../.."  # the repository root
out=benchmarks/results/avx2/arena
TWO=glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=0
for r in 1 2 3 4 5; do
  .venv/bin/python benchmarks/memory.py --configs "jax#one$r" --steps 30 --output_dir $out/memory_one_$r > /dev/null 2>&1
  GLIBC_TUNABLES=$TWO .venv/bin/python benchmarks/memory.py --configs "jax#two$r" --steps 30 --output_dir $out/memory_two_$r > /dev/null 2>&1
done
for r in 1 2 3; do
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/first_call_one_$r.json > /dev/null 2>&1
  GLIBC_TUNABLES=$TWO .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto --json $out/first_call_two_$r.json > /dev/null 2>&1
done
.venv/bin/python benchmarks/memory.py --configs "jax#one_long" --steps 100 --output_dir $out/memory_one_long > /dev/null 2>&1
GLIBC_TUNABLES=$TWO .venv/bin/python benchmarks/memory.py --configs "jax#two_long" --steps 100 --output_dir $out/memory_two_long > /dev/null 2>&1
echo done
