#!/bin/bash
# Winograd convolutions in JAX's training step on AVX2 (issue 19), one benchmark at a time.
# As run on 2026-12-07, before the library made the form JAX's AVX2 default (d7054c7): since
# then vs_diffusers.py's plain "jax" worker runs it too on AVX2, so name the direct worker
# "jax@winograd_training=0" to reproduce the "direct" rows.
set -e
cd "$(dirname "$0")/../../../.."
here=benchmarks/results/avx2/winograd
export KERAS_BACKEND=jax
# single convolutions: direct ÷ Winograd, forward and forward + backward
.venv/bin/python benchmarks/winograd.py --repeats 15 > $here/ops_jax.txt 2>&1
# the whole training step, two workers: direct / Winograd at every size, then direct / up to 16x16
.venv/bin/python benchmarks/small_conv.py --part network --network cifar10 --resolutions 32 \
  --tasks train --switch winograd_training --repeats 15 > $here/network_train_jax.txt 2>&1
.venv/bin/python benchmarks/small_conv.py --part network --network cifar10 --resolutions 32 \
  --tasks train --switch winograd_training_max16 --repeats 15 > $here/network_train_max16_jax.txt 2>&1
# beside diffusers, bin/train's recipe
venv-bench/bin/python benchmarks/vs_diffusers.py --backends "jax,jax@winograd_training=1" \
  --peers eager,tuned --tasks train --grad_clip_norm 1.0 --repeats 15 --order_seed 83 \
  --json $here/vs_diffusers_83.json --markdown $here/vs_diffusers_83.md > $here/vs_diffusers_83.log 2>&1
# XLA's buffer sizes and peak RSS per variant (fresh processes)
$here/temp_probe.sh
# a variant tried: the per-tap kernel gradient, paired in one process
.venv/bin/python $here/kernel_gradient_pair.py --rounds 15 --json $here/kernel_gradient_pair.json
# the three settings beside eager diffusers
venv-bench/bin/python benchmarks/vs_diffusers.py \
  --backends "jax,jax@winograd_training=1,jax@winograd_training=16" --peers eager --tasks train \
  --grad_clip_norm 1.0 --repeats 15 --order_seed 84 \
  --json $here/vs_diffusers_84.json --markdown $here/vs_diffusers_84.md > $here/vs_diffusers_84.log 2>&1
# first call with bin/train's persistent compilation cache: cold (fills it) then warm (reads it)
for w in 1 0; do
  .venv/bin/python benchmarks/first_call.py --backends jax --rounds 2 --modes cold,warm \
    --jit_compile auto --optimizer clipped_adam --winograd_training $w \
    --json $here/first_call_winograd_$w.json --markdown $here/first_call_winograd_$w.md
done
# resident set per stage (build, compile, trim, step), direct and Winograd at every size
for s in direct all; do
  KERAS_BACKEND=jax .venv/bin/python $here/temp_probe.py --setting $s 2>/dev/null | tail -1
done > $here/temp_probe_stages.jsonl
# what holds the compile's memory: after the step, gc + trim, JAX's staging caches, all caches
for s in direct all; do
  KERAS_BACKEND=jax .venv/bin/python $here/temp_probe.py --setting $s --release_probe 2>/dev/null | tail -1
done > $here/temp_probe_release.jsonl
# after the fix (backward transform reordered): XLA temporaries, and speed against the old gradient
KERAS_BACKEND=jax .venv/bin/python $here/temp_probe.py --setting all 2>/dev/null | tail -1 > $here/temp_probe_fixed.jsonl
KERAS_BACKEND=jax .venv/bin/python $here/temp_probe.py --setting all --kernel_gradient forward_order 2>/dev/null | tail -1 >> $here/temp_probe_fixed.jsonl
.venv/bin/python $here/kernel_gradient_pair.py --rounds 15 --variant forward_order --json $here/kernel_gradient_pair_forward_order.json
venv-bench/bin/python benchmarks/vs_diffusers.py --backends "jax,jax@winograd_training=1" --peers eager \
  --tasks train --grad_clip_norm 1.0 --repeats 15 --order_seed 85 \
  --json $here/vs_diffusers_85.json --markdown $here/vs_diffusers_85.md > $here/vs_diffusers_85.log 2>&1
python benchmarks/heap_timeline.py --configs jax --steps 2 --output_dir /tmp/heap_jax && cp /tmp/heap_jax/timeline.md $here/heap_timeline_jax.md && cp /tmp/heap_jax/timeline.json $here/heap_timeline_jax.json
