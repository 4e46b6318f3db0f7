#!/usr/bin/env python
"""How big TensorFlow's traced training step is, and where tracing it spends its time.

    KERAS_BACKEND=tensorflow python benchmarks/trace_ops.py --optimizer clipped_adam
    KERAS_BACKEND=tensorflow python benchmarks/trace_ops.py --optimizer clipped_adam_unfused --profile

Builds the DDPM CIFAR-10 U-Net of ``memory.py`` (batch 8) with ``bin/train``'s optimizer
(``make_optimizer``: Adam 2e-4, clipping at 1.0; ``clipped_adam_unfused``: the same with Keras's
per-operation update, ``fused=False``) and traces ``train_step`` into a graph once
(``tf.function.get_concrete_function``, no XLA): prints the trace's seconds, its operation count
and how many are ``ResourceApplyAdam``; ``--profile`` also runs the trace under cProfile and
prints the share of it spent in the optimizer's ``apply`` and in Keras's ``Adam.update_step``.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", choices=("clipped_adam", "clipped_adam_unfused"),
                   default="clipped_adam")
    p.add_argument("--base_channels", type=int, default=128)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    import harness
    from keras_etsdm.optimizers import make_optimizer
    from memory import build_training_model

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("trace_ops.py measures TensorFlow's tracing: run with "
                         "KERAS_BACKEND=tensorflow.")
    optimizer = make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0,
                               fused=args.optimizer == "clipped_adam")
    model, _ = build_training_model(args.base_channels, optimizer=optimizer, jit_compile=False)
    step = tf.function(model.train_step)
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    graph = step.get_concrete_function(tf.TensorSpec((8, 32, 32, 3), tf.float32)).graph
    if profile:
        profile.disable()
    seconds = time.perf_counter() - start
    ops = [op.type for op in graph.get_operations()]
    print(f"machine: {harness.machine_description()}")
    print(f"{args.optimizer}: traced in {seconds:.1f} s; {len(ops):,} operations, "
          f"{ops.count('ResourceApplyAdam')} ResourceApplyAdam")
    if profile:
        stats = pstats.Stats(profile).stats
        total = max(v[3] for v in stats.values())  # the outermost call: the whole trace
        for name, where, function in (("optimizer apply", "base_optimizer.py", "apply"),
                                      ("Adam.update_step", "adam.py", "update_step")):
            cum = sum(v[3] for k, v in stats.items()
                      if k[0].endswith(where) and k[2] == function)
            print(f"  {name}: {cum:.1f} s cumulative of {total:.1f} s profiled "
                  f"({100 * cum / total:.0f} %)")


if __name__ == "__main__":
    main()
