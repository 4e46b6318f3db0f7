#!/bin/bash
# Reproduces benchmarks/results/avx2/winograd_transforms/ (one benchmark at a time, quiet machine).
# The "all matmul" rows were measured with the library as winograd_all_matmul.py has it; the two
# stacks row with an earlier variant (README section 2). Run from the repository root.
set -e
here=benchmarks/results/avx2/winograd_transforms
# speed, paired: the library against f306f3f's elementwise transforms (two cold workers)
.venv/bin/python $here/transform_pair.py --backend jax --tasks train,forward --rounds 15 --json $here/transform_pair_jax.json
.venv/bin/python $here/transform_pair.py --backend jax --tasks forward --rounds 30 --json $here/transform_pair_jax_forward.json
.venv/bin/python $here/transform_pair.py --backend tensorflow --tasks forward --rounds 30 --json $here/transform_pair_tf_forward.json
# ... and the all-matmul variant in the library's place
.venv/bin/python $here/transform_pair.py --backend jax --tasks train,forward --rounds 15 --variant $here/winograd_all_matmul.py --json $here/transform_pair_jax_all_matmul.json
# compile, forms alternated in one process (all-matmul as the fourth form)
KERAS_BACKEND=jax .venv/bin/python $here/compile_pair.py --rounds 5 --seed 1 --variant $here/winograd_all_matmul.py --json $here/compile_pair.json
# XLA's temporaries and the process's peak
for s in all direct; do
  KERAS_BACKEND=jax .venv/bin/python benchmarks/results/avx2/winograd/temp_probe.py --setting $s 2>/dev/null | tail -1
done > $here/temp_probe.jsonl
# beside eager diffusers
venv-bench/bin/python benchmarks/vs_diffusers.py --backends "jax,jax@winograd_training=0" --peers eager \
  --tasks train --grad_clip_norm 1.0 --repeats 15 --order_seed 86 \
  --json $here/vs_diffusers_86.json --markdown $here/vs_diffusers_86.md > $here/vs_diffusers_86.log 2>&1
# TensorFlow with XLA: the form in its training step against the direct form
for r in 15 20; do
  KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/small_conv.py --part network --network cifar10 --resolutions 32 \
    --tasks train --switch winograd_training --repeats $r --tf_jit_compile true > $here/network_train_tf_$r.txt
done
# fresh processes with the library's default (the form on AVX2), then one pair direct / default
.venv/bin/python benchmarks/first_call.py --backends jax --rounds 3 --modes off --jit_compile auto \
  --optimizer clipped_adam --winograd_training auto --json $here/first_call_default.json --markdown $here/first_call_default.md
for w in 0 auto; do
  name=$([ $w = 0 ] && echo direct || echo default)
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto \
    --optimizer clipped_adam --winograd_training $w --json $here/first_call_pair_$name.json --markdown /dev/null
done
