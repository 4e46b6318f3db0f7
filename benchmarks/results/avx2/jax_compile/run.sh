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
