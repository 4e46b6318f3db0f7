"""JAX's training step compiled at LLVM levels 1 (``--levels``) and 3 (XLA's default, the
library's), alternated in ONE process, so that the machine's swings between fresh processes do not
decide the comparison.

    KERAS_BACKEND=jax python benchmarks/results/avx2/train_opt_level/compile_pair.py --rounds 4 \
        --json benchmarks/results/avx2/train_opt_level/compile_pair.json

The process starts as bin/ starts (malloc tunables, XLA flags, no persistent compilation cache),
builds the DDPM CIFAR-10 U-Net with bin/train's optimizer once (batch 8, the Winograd form where
the library chooses it), then per round, in a random order, sets
``KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL`` and makes a new train function
(``model.make_train_function(force=True)``: traced, lowered and compiled anew) and times its first
``train_on_batch`` (with JAX's compile phases) and the median of ``--steps`` more. Prints
per-round values, medians and paired ratios with a 95 % bootstrap interval.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))



def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="1,3", help="LLVM levels; each compared with 3")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "bin"))
    import _startup

    os.environ["KERAS_ETSDM_COMPILATION_CACHE"] = "0"  # every compile here is a real one
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    _startup.tune_process()
    import jax
    import keras
    import numpy as np

    import harness
    from first_call import _PhaseSums
    from keras_etsdm import DiffusionModel, build_unet, cpu_tuning
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS

    assert not jax.config.jax_compilation_cache_dir, "the persistent compilation cache is on"
    recorder = _PhaseSums()
    jax.monitoring.register_event_duration_secs_listener(recorder)
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
    model = DiffusionModel(network, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=True)
    etsdm_backend.release_build_memory()
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype("float32")
    machine = harness.machine_description()
    print(machine, flush=True)
    levels = args.levels.split(",")
    assert "3" in levels and set(levels) <= {"0", "1", "2", "3"}, args.levels
    rows = {level: [] for level in levels}
    for order in harness.round_orders(levels, args.rounds, seed=args.seed):
        for level in order:
            os.environ[cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE] = level
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
            row = {"first_call_s": first, "step_s": float(np.median(steps)),
                   **{k: phases.get(k, 0.0) for k in ("trace", "lower", "xla_compile")}}
            rows[level].append({**row, "steps_s": steps})
            print(level, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    roof = harness.numpy_matmul_roof()
    result = {"machine": machine, "roof_end": roof, "rounds": args.rounds, "seed": args.seed,
              "steps": args.steps, "rows": rows, "medians": {}, "ratios": {}}
    keys = ("first_call_s", "xla_compile", "trace", "step_s")
    for level in levels:
        result["medians"][level] = {k: float(np.median([r[k] for r in rows[level]]))
                                    for k in keys}
        print(f"median level {level}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["medians"][level].items()))
    for level in levels:
        if level == "3":
            continue
        for k in keys:
            ci = harness.paired_ratio_ci([r[k] for r in rows[level]], [r[k] for r in rows["3"]])
            result["ratios"][f"{level}/3 {k}"] = ci
            print(f"level {level} ÷ level 3, {k}: {ci['ratio']:.3f} "
                  f"[{ci['low']:.3f}, {ci['high']:.3f}]")
    print(f"numpy roof at end: {roof['median']:.1f} GFLOP/s")
    if args.json:
        harness.write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
