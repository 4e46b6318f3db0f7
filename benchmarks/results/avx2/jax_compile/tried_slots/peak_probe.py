#!/usr/bin/env python
"""Resident memory over JAX's first three training steps, with Adam's zero slots made by
``jax.device_put(numpy zeros, may_alias=False)`` (the variant tried and dropped) or by Keras.

    python benchmarks/results/avx2/jax_compile/tried_slots/peak_probe.py as_is slots_device_put

One fresh process per variant, started as bin/ starts JAX on this CPU (harness: huge pages or
the retaining malloc, cpu_tuning's XLA flags); DDPM CIFAR-10 U-Net, batch 8, bin/train's
optimizer (``make_optimizer``: Adam, clipped to norm 1), ``train_on_batch`` three times. Prints
the resident set after building, the peak after the first step and after the third."""

import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..")
sys.path.insert(0, BENCHMARKS)
import harness  # noqa: E402


def worker(variant):
    import keras
    import numpy as np

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm.optimizers import ClippedAdam, make_optimizer

    if variant == "slots_device_put":
        import jax

        def add_variable(self, shape, initializer="zeros", dtype=None, aggregation="none",
                         layout=None, name=None):
            if initializer == "zeros":
                def initializer(shape, dtype=None):
                    dtype = keras.backend.standardize_dtype(dtype or "float32")
                    return jax.device_put(np.zeros(shape, dtype), may_alias=False)
            return keras.optimizers.Adam.add_variable(self, shape, initializer, dtype,
                                                      aggregation, layout, name)

        ClippedAdam.add_variable = add_variable
    elif variant != "as_is":
        raise SystemExit(f"unknown variant {variant!r}: as_is or slots_device_put")
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, num_heads=1)
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=True)
    x = np.clip(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), -1, 1)
    x = x.astype(np.float32)
    built = harness.rss_mib()
    model.train_on_batch(x)
    first = harness.peak_rss_mib()
    model.train_on_batch(x)
    model.train_on_batch(x)
    print(f"RESULT {variant}: RSS built {built:.0f} MiB, peak after step 1 {first:.0f}, "
          f"after step 3 {harness.peak_rss_mib():.0f}", flush=True)


def main(variants):
    env = harness.without_compilation_cache(dict(os.environ, KERAS_BACKEND="jax"))
    env = harness.malloc_environ(env, "hugetlb")
    env = harness._cpu_tuning().jax_xla_environ(env) or env
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    print(harness.machine_description())
    for variant in variants:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant],
                             env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        print(lines[-1][len("RESULT "):] if lines else f"{variant} failed:\n{out.stderr[-2000:]}",
              flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main(sys.argv[1:] or ["as_is", "slots_device_put"])
