"""Where JAX's training-step compile goes, by part: the same U-Net's training step compiled with
and without the EMA update and with a slot-free optimizer, alternated in ONE process.

    KERAS_BACKEND=jax python benchmarks/results/avx2/compile_parts/compile_parts.py --rounds 3 \
        --json benchmarks/results/avx2/compile_parts/compile_parts.json

A diagnostic, not a library setting: the process starts as bin/ starts (malloc tunables, XLA
flags, no persistent compilation cache) and builds the DDPM CIFAR-10 U-Net once (batch 8, the
library's default convolution form for this CPU); three ``DiffusionModel`` wrappers share its
weights:

  full     bin/train's step: clipped Adam (``optimizers.make_optimizer``) and the EMA update;
  no_ema   the same, the EMA update replaced by the identity (the EMA weights pass through);
  sgd      plain SGD (no optimizer slots, no clipping) with the EMA update.

Per round, in a random order, each makes a new train function and times its first
``train_on_batch``; reported: XLA's backend compile of ``jit(train_step)`` alone (JAX's
monitoring event), its tracing, and the median of ``--steps`` more steps; then medians and
paired ratios against ``full`` with a 95 % bootstrap interval.
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

PARTS = ("full", "no_ema", "sgd")
KEYS = ("first_call_s", "step_compile_s", "step_trace_s", "step_s")


class _StepCompile:
    """Seconds of tracing and XLA compile of ``train_step`` since the last ``take``."""

    def __init__(self):
        self.trace = self.compile = 0.0

    def __call__(self, event, duration, **kwargs):
        name = kwargs.get("fun_name") or ""
        if event == "/jax/core/compile/backend_compile_duration" and "train_step" in name:
            self.compile += duration
        elif event == "/jax/core/compile/jaxpr_trace_duration" and "train_step" in name:
            self.trace += duration

    def take(self):
        taken = (self.trace, self.compile)
        self.trace = self.compile = 0.0
        return taken


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import _startup

    os.environ["KERAS_ETSDM_COMPILATION_CACHE"] = "0"  # every compile here is a real one
    _startup.tune_process()
    import jax
    import keras
    import numpy as np

    import harness
    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS

    recorder = _StepCompile()
    jax.monitoring.register_event_duration_secs_listener(recorder)
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
    models = {}
    for part in PARTS:
        model = DiffusionModel(network, seed=0)
        optimizer = (keras.optimizers.SGD(2e-4) if part == "sgd"
                     else make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0))
        model.compile(optimizer=optimizer, jit_compile=True)
        if part == "no_ema":
            model._ema_new_values = lambda ema, weights, count: (list(ema), count)
        models[part] = model
    etsdm_backend.release_build_memory()
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype("float32")
    machine = harness.machine_description()
    print(machine, flush=True)
    rows = {part: [] for part in PARTS}
    for order in harness.round_orders(list(PARTS), args.rounds, seed=args.seed):
        for part in order:
            model = models[part]
            model.make_train_function(force=True)
            recorder.take()
            start = time.perf_counter()
            model.train_on_batch(x)
            first = time.perf_counter() - start
            trace, compile_s = recorder.take()
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                model.train_on_batch(x)
                steps.append(time.perf_counter() - start)
            row = {"first_call_s": first, "step_compile_s": compile_s, "step_trace_s": trace,
                   "step_s": float(np.median(steps))}
            rows[part].append(row)
            print(part, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    result = {"machine": machine, "roof_end": harness.numpy_matmul_roof(),
              "rounds": args.rounds, "seed": args.seed, "rows": rows, "medians": {},
              "ratios": {}}
    for part in PARTS:
        result["medians"][part] = {k: float(np.median([r[k] for r in rows[part]]))
                                   for k in KEYS}
        print(f"median {part}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["medians"][part].items()))
    for part in PARTS[1:]:
        for k in KEYS:
            ci = harness.paired_ratio_ci([r[k] for r in rows[part]],
                                         [r[k] for r in rows["full"]])
            result["ratios"][f"{part}/full {k}"] = ci
            print(f"{part} ÷ full, {k}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
    print(f"numpy roof at end: {result['roof_end']['median']:.1f} GFLOP/s")
    if args.json:
        harness.write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
