"""Screen (before the library had the switch): XLA compiler options for JAX's training step,
alternated in ONE process; each variant's step is lowered and compiled with
``Lowered.compile(compiler_options=...)`` in place of ``backend.compile_then_release``.

    KERAS_BACKEND=jax python benchmarks/results/avx2/train_opt_level/screen_options.py \
        --rounds 2 --json benchmarks/results/avx2/train_opt_level/screen_options.json

Variants: none (XLA's defaults), fast_compile (xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE),
o0 / o1 / o2 (xla_backend_optimization_level), noexp (xla_llvm_disable_expensive_passes).
Prints per-round first call, JAX's compile phases and the median of ``--steps`` more steps, and
each variant against the first named one (paired ratios, 95 % bootstrap interval).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
for path in (ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "bin")):
    sys.path.insert(0, path)

LEVEL = "xla_backend_optimization_level"
VARIANTS = {"none": None,
            "fast_compile": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"},
            "o0": {LEVEL: 0}, "o1": {LEVEL: 1}, "o2": {LEVEL: 2},
            "noexp": {"xla_llvm_disable_expensive_passes": True}}
KEYS = ("first_call_s", "xla_compile", "step_s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="none,fast_compile,o1,o2")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import _startup

    os.environ["KERAS_ETSDM_COMPILATION_CACHE"] = "0"  # every compile here is a real one
    _startup.tune_process()
    import jax
    import keras
    import numpy as np

    import harness
    from first_call import _PhaseSums
    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS

    current = [None]
    library_wrapper = etsdm_backend.compile_then_release

    def compile_with_options(jitted):
        options = current[0]
        if options is None:
            return library_wrapper(jitted)
        compiled = []

        def step(*step_args):
            if not compiled:
                compiled.append(jitted.lower(*step_args).compile(compiler_options=options))
                etsdm_backend.cpu_tuning.trim_heap()
            return compiled[0](*step_args)

        return step

    etsdm_backend.compile_then_release = compile_with_options
    recorder = _PhaseSums()
    jax.monitoring.register_event_duration_secs_listener(recorder)
    keras.utils.set_random_seed(0)
    model = DiffusionModel(build_unet(image_size=32, channels=3, **NETWORKS["cifar10"]), seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=True)
    etsdm_backend.release_build_memory()
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype("float32")
    machine = harness.machine_description()
    print(machine, flush=True)
    names = args.variants.split(",")
    rows = {name: [] for name in names}
    for order in harness.round_orders(names, args.rounds, seed=args.seed):
        for name in order:
            current[0] = VARIANTS[name]
            model.make_train_function(force=True)
            recorder.take()
            start = time.perf_counter()
            model.train_on_batch(x)
            first = time.perf_counter() - start
            phases = recorder.take()
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                model.train_on_batch(x)
                steps.append(time.perf_counter() - start)
            row = {"first_call_s": first, "step_s": float(np.median(steps)), "steps": steps,
                   **{k: phases.get(k, 0.0) for k in ("trace", "lower", "xla_compile")}}
            rows[name].append(row)
            print(name, json.dumps({k: round(v, 3) for k, v in row.items() if k != "steps"}),
                  flush=True)
    for name in names:
        print("median", name,
              {k: round(float(np.median([r[k] for r in rows[name]])), 3) for k in KEYS})
    for name in names[1:]:
        for k in KEYS:
            ci = harness.paired_ratio_ci([r[k] for r in rows[name]],
                                         [r[k] for r in rows[names[0]]])
            print(f"{name}/{names[0]} {k}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
    if args.json:
        harness.write_json_atomic(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
