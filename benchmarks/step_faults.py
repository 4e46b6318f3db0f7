#!/usr/bin/env python
"""Minor page faults and wall time per training step, under the malloc this process started with.

The profile behind ``keras_etsdm/cpu_tuning.py`` item 4: does each step fault its temporaries
in again (glibc handing large blocks back to the kernel)? Trains the DDPM CIFAR-10 U-Net of
``vs_diffusers.py`` (batch 8, float32, EMA, Adam, the library's jit choice) with
``train_on_batch`` and prints, per step, the minor faults (``getrusage``) and milliseconds, then
the peak RSS. ``GLIBC_TUNABLES`` is taken as given (no re-exec), so compare settings by
starting it under each, e.g.::

    KERAS_BACKEND=jax python benchmarks/step_faults.py                   # glibc as is
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 KERAS_BACKEND=jax python benchmarks/step_faults.py
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:\
glibc.malloc.trim_threshold=17179869184 KERAS_BACKEND=jax python benchmarks/step_faults.py

JAX gets the bin/ start-up XLA flags (``cpu_tuning.tune_xla_for_cpu``).
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base_channels", type=int, default=128)
    args = p.parse_args(argv)
    from keras_etsdm import cpu_tuning

    cpu_tuning.tune_xla_for_cpu()
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import harness
    from vs_diffusers import unet_kwargs

    keras.utils.set_random_seed(0)
    network = build_unet(**unet_kwargs(argparse.Namespace(image_size=32,
                                                          base_channels=args.base_channels)))
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(2e-4),
                  jit_compile=etsdm_backend.default_train_jit_compile())
    rng = np.random.default_rng(0)
    data = np.clip(rng.standard_normal(((args.steps + 2) * args.batch, 32, 32, 3)), -1, 1)
    data = data.astype("float32")
    batches = [data[i * args.batch:(i + 1) * args.batch] for i in range(args.steps + 2)]
    for batch in batches[:2]:  # compile, optimizer slots
        model.train_on_batch(batch)
    faults, millis = [], []
    for batch in batches[2:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model.train_on_batch(batch)
        millis.append(1e3 * (time.perf_counter() - start))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(f"{harness.machine_description()}")
    print(f"backend {keras.backend.backend()}; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r}; batch {args.batch}")
    print(f"minor faults per step: {faults}")
    print(f"ms per step: {[round(m) for m in millis]} (median {np.median(millis):.0f})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
