#!/bin/bash
# Does the malloc setting change the numpy roof that first_call.py measures in its parent
# process? (The two-arena processes of run.sh / run_first_call_more.sh had the higher roof in 9
# of 9 pairs.) Fresh processes, alternated, each the same harness.numpy_matmul_roof(2048, 5).
cd "$(dirname "$0")/../../../.."  # the repository root
ONE=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=0
TWO=glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.hugetlb=0
roof() {
  GLIBC_TUNABLES=$2 .venv/bin/python -c "
import sys; sys.path.insert(0, 'benchmarks'); import harness
print('$1', round(harness.numpy_matmul_roof(2048, 5)['median'], 1))"
}
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then roof one $ONE; roof two $TWO; else roof two $TWO; roof one $ONE; fi
done
