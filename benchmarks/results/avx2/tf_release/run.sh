#!/bin/bash
# TensorFlow on AVX2 (issue 19 item 5): the fused Adam update's first call and speed, the heap
# trim after the first call and XLA's concurrency-optimized scheduler. Run from the repository
# root, nothing else running: bash benchmarks/results/avx2/tf_release/run.sh
set -e
d=benchmarks/results/avx2/tf_release
py=.venv/bin/python
# 1. First call in fresh processes, fused and unfused alternated (the order swapped each pair),
#    with XLA (the AVX2 default) and without it (the AVX-512 default); each process its own roof.
for jit in auto false; do
  for pair in 1 2 3; do
    if [ $((pair % 2)) -eq 1 ]; then order="clipped_adam clipped_adam_unfused"
    else order="clipped_adam_unfused clipped_adam"; fi
    for opt in $order; do
      $py benchmarks/first_call.py --backends tensorflow --rounds 1 --modes off \
        --jit_compile $jit --optimizer $opt --json $d/first_call/${jit}_${opt}_${pair}.json \
        > $d/first_call/${jit}_${opt}_${pair}.txt 2>&1
    done
  done
done
# 2. Training speed, fused ÷ unfused, with and without XLA (15 paired rounds).
$py benchmarks/train_step.py --backends tensorflow --tf_jit_compile true,false \
  --base_channels 128 --batch 8 --steps 2 --model_variants clipped_adam,clipped_adam_unfused \
  --cpu_tuning tuned --repeats 15 --order_seed 89 --json $d/train_step_89.json \
  > $d/train_step_89.txt 2>&1
# 3. The heap trim (keep_compiler_memory: without it) and the scheduler flag, XLA, fused Adam.
$py benchmarks/train_step.py --backends tensorflow --tf_jit_compile true \
  --base_channels 128 --batch 8 --steps 2 --model_variants clipped_adam \
  --cpu_tuning "tuned,keep_compiler_memory,xla:xla_cpu_enable_concurrency_optimized_scheduler=false" \
  --repeats 15 --order_seed 90 --json $d/train_step_90.json > $d/train_step_90.txt 2>&1
echo done
