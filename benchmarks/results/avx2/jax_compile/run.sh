#!/bin/bash
# JAX's first training call on AVX2: where its seconds go, and XLA flags screened for them.
# Run from anywhere; results land next to this script. One benchmark at a time on a quiet machine.
cd "$(dirname "$0")/../../../.."  # the repository root
here=benchmarks/results/avx2/jax_compile

# 1. Profile: one fresh process under perf (perf_first_call.txt; /tmp/perf.data is not kept).
perf record -F 299 -o /tmp/perf.data -- .venv/bin/python benchmarks/first_call.py --backends jax \
  --rounds 1 --modes off --jit_compile auto --json /tmp/fc_perf.json > /dev/null 2>&1
perf report -i /tmp/perf.data --sort sym --dsos libjax_common.so --stdio 2>/dev/null \
  | .venv/bin/python $here/perf_summary.py

# 2. Screen: fresh processes, default and flagged alternated (screen/, screen.md).
$here/screen.sh 1 --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true \
  --xla_cpu_parallel_codegen_split_count=1 --xla_backend_optimization_level=0
$here/screen.sh 1 --xla_cpu_use_fusion_emitters=false --xla_cpu_disable_loop_unrolling=true \
  --xla_cpu_optimize_for_size=true --xla_cpu_parallel_codegen_split_count=8
$here/screen.sh 2 --xla_backend_optimization_level=1
$here/screen.sh "3 4 5" --xla_backend_optimization_level=1
.venv/bin/python $here/summarize.py > $here/screen.md

# 3. The flag's price at run time: training (train_step.py) and training + DDIM beside diffusers.
.venv/bin/python benchmarks/train_step.py --backends jax --base_channels 128 --batch 8 --steps 2 \
  --model_variants clipped_adam --cpu_tuning "tuned,xla:xla_backend_optimization_level=1,xla:xla_backend_optimization_level=2" \
  --repeats 15 --order_seed 91 --json $here/train_step_91.json > $here/train_step_91.txt 2>&1
venv-bench/bin/python benchmarks/vs_diffusers.py --backends "jax,jax@xla:xla_backend_optimization_level=1" \
  --peers eager --tasks train,ddim --grad_clip_norm 1.0 --repeats 15 --order_seed 82 \
  --json $here/vs_diffusers_82.json --markdown $here/vs_diffusers_82.md > $here/vs_diffusers_82.log 2>&1

# 4. What XLA compiles (hlo_dump_counts.txt): one process with XLA's dump on.
rm -rf /tmp/hlo
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" .venv/bin/python benchmarks/first_call.py \
  --backends jax --rounds 1 --modes off --jit_compile auto --json /tmp/fc_dump.json > /dev/null 2>&1
(cd /tmp/hlo && echo "modules compiled (by name):" \
  && ls *.before_optimizations.txt | sed 's/module_[0-9]*\.//; s/\.before_optimizations.txt//' | sort | uniq -c | sort -rn \
  && step=$(ls *jit_train_step.before_optimizations.txt | sed 's/\.jit_train_step.*//') \
  && echo "training step ($step): LLVM kernel modules $(ls $step.*kernel_module.ir-with-opt.ll | wc -l)," \
     "HLO lines before / after optimization $(wc -l < $step.jit_train_step.before_optimizations.txt) /" \
     "$(wc -l < $step.jit_train_step.cpu_after_optimizations.txt)") > $here/hlo_dump_counts.txt

# 5. The EMA's copy initializer: fresh processes, library before (a1e4183) and after (build/;
#    tried_slots/build/ was the same with the variant that also made Adam's slots so).
git worktree add /tmp/wt_before a1e4183
$here/alternate_build.sh "1 2 3"
.venv/bin/python $here/summarize.py build > $here/build.md
.venv/bin/python $here/tried_slots/peak_probe.py as_is slots_device_put > $here/tried_slots/peak_probe.txt

# 6. Build memory of tests/test_memory_release.py's model (JAX), before (a1e4183) / after the
#    EMA copy initializer, two runs each (build_memory.txt; that model uses Keras's Adam, so the
#    tried slot variant did not touch it).
for i in 1 2; do for side in before after; do
  if [ $side = before ]; then tree=/tmp/wt_before; else tree=$PWD; fi
  (cd $tree && KERAS_BACKEND=jax PYTHONPATH=$tree $OLDPWD/.venv/bin/python -c "
from tests.test_memory_release import run_script; r = run_script()
print('$side', 'RSS MiB at start / built / released:', round(r['start']), round(r['built']), round(r['released']),
      '| build growth', round(r['built'] - r['start']), '| given back', round(r['built'] - r['released']))" 2>&1 | tail -1)
done; done >> $here/build_memory.txt
git worktree remove --force /tmp/wt_before
