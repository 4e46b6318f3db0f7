"""Convolutions whose output is smaller than the kernel: XLA's convolution against one matmul.

``keras_etsdm.backend.conv2d_same`` computes a "same" convolution whose output is smaller than
its kernel (a 3×3 kernel on a 1×1 or 2×2 output) as one matmul of the input's patches
(``backend.conv2d_same_as_matmul``) where XLA compiles it for a CPU. Two measurements on one
Keras backend, each form run alternately in ``--repeats`` rounds, medians and the paired
per-round ratio ``keras.ops.conv`` ÷ matmul form (time; > 1: the matmul form is faster) with a
95 % bootstrap interval:

* ``--part ops`` (default): single convolutions, the forward alone and forward + backward
  (gradients in the input and the kernel), stride 1 on 1–8 px and stride 2 on 2–8 px inputs,
  128 / 256 / 512 channels, batch 8. The process starts as bin/ does (malloc tunables, XLA
  flags); JAX runs ``jax.jit``, TensorFlow ``tf.function`` with ``--tf_jit_compile`` (XLA; the
  form the library picks only there).
* ``--part network``: a U-Net's ``predict_on_batch`` and ``DiffusionModel.train_on_batch``
  (bin/train's optimizer), with ``backend.SMALL_CONV_AS_MATMUL`` on and off: two worker
  processes started as bin/ starts (without the persistent compilation cache, so the first
  call, reported, compiles), asked alternately (order shuffled per round), one warm-up call
  each after the first. ``--network`` ``lsun`` (the DDPM 256 U-Net of gin/lsun.gin, whose
  lowest levels are 1×1 and 2×2 at 32² and 2×2 at 64²) at ``--resolutions``. TensorFlow
  compiles with ``--tf_jit_compile`` (without XLA the switch changes nothing).

    KERAS_BACKEND=jax python benchmarks/small_conv.py
    KERAS_BACKEND=tensorflow python benchmarks/small_conv.py --tf_jit_compile true
    KERAS_BACKEND=jax python benchmarks/small_conv.py --part network --repeats 15
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# (stride, input px, channels), batch 8, 3×3 kernels, C_in = C_out
OP_SHAPES = [(1, size, c) for size in (1, 2, 4, 8) for c in (128, 256, 512)] + \
            [(2, size, c) for size in (2, 4, 8) for c in (128, 256, 512)]
NETWORKS = {
    "lsun": {"base_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
             "attention_resolutions": (16,), "dropout": 0.0, "num_heads": 1},
    "cifar10": {"base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                "attention_resolutions": (16,), "dropout": 0.1, "num_heads": 1},
}
# The library's module switches an A/B of ``--part network`` can turn off (read at trace time).
SWITCHES = {"small_conv": [("keras_etsdm.backend", "SMALL_CONV_AS_MATMUL")],
            "winograd": [("keras_etsdm.winograd", "WINOGRAD")],
            # Winograd in the training step too (off: the direct form everywhere)
            "winograd_training": [("keras_etsdm.winograd", "WINOGRAD"),
                                  ("keras_etsdm.winograd", "IN_TRAINING")]}
# Switches whose two settings are values other than False / True: {name: [(module, attribute,
# value off, value on)]}.
VALUE_SWITCHES = {
    # Winograd in training steps at outputs of at most 16×16 only, against the direct form
    "winograd_training_max16": [("keras_etsdm.winograd", "IN_TRAINING", False, True),
                                ("keras_etsdm.winograd", "TRAINING_MAX_SIZE", None, 16)],
    # ... against Winograd at every size
    "winograd_training_all_vs_max16": [("keras_etsdm.winograd", "IN_TRAINING", True, True),
                                       ("keras_etsdm.winograd", "TRAINING_MAX_SIZE", None, 16)],
}


def switch_settings(name):
    """``[(module, attribute, value off, value on)]`` of the ``--switch`` called ``name``."""
    if name in VALUE_SWITCHES:
        return VALUE_SWITCHES[name]
    return [(module, flag, False, True) for module, flag in SWITCHES[name]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="ops", choices=("ops", "network"))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tf_jit_compile", default="false", choices=("false", "true"))
    p.add_argument("--network", default="lsun", choices=sorted(NETWORKS))
    p.add_argument("--resolutions", default="32,64")
    p.add_argument("--tasks", default="forward,train",
                   help="comma-separated: forward, train (--part network)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--switch", default="small_conv",
                   choices=sorted(SWITCHES) + sorted(VALUE_SWITCHES),
                   help="--part network: the module switch turned off in one worker and on in "
                        "the other (small_conv: backend.SMALL_CONV_AS_MATMUL, winograd: "
                        "winograd.WINOGRAD, winograd_training: it and winograd.IN_TRAINING; "
                        "winograd_training_max16: direct form off, Winograd in training at "
                        "outputs up to 16×16 on (winograd.TRAINING_MAX_SIZE); "
                        "winograd_training_all_vs_max16: Winograd in training at every size "
                        "off, up to 16×16 on)")
    p.add_argument("--setting", default="on", choices=("on", "off"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def paired_row(cells, times):
    """A table row: ``cells`` (the row's labels), then the medians of ``times["conv"]`` and
    ``times["matmul"]`` (ms) and their paired ratio conv ÷ matmul with its 95 % interval."""
    import harness

    ci = harness.paired_ratio_ci(times["conv"], times["matmul"])
    return (f"| {' | '.join(cells)} | {1e3 * np.median(times['conv']):.2f} | "
            f"{1e3 * np.median(times['matmul']):.2f} | "
            f"{ci['ratio']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] |")


def run_ops(args, backend, jit):
    import keras

    from keras_etsdm import backend as etsdm_backend
    from upsample_conv import PASSES, time_forms

    def conv_fn(stride):
        return lambda x, k: keras.ops.conv(x, k, strides=stride, padding="same")

    def matmul_fn(stride):
        return lambda x, k: etsdm_backend.conv2d_same_as_matmul(x, k, stride)

    print("| stride, input px, channels (batch %d) | pass | keras.ops.conv ms | matmul ms | "
          "conv ÷ matmul [95 %% CI] |" % args.batch)
    print("|---|---|---:|---:|---|")
    rng = np.random.default_rng(0)
    for stride, size, channels in OP_SHAPES:
        x = rng.standard_normal((args.batch, size, size, channels)).astype("float32")
        kernel = (rng.standard_normal((3, 3, channels, channels))
                  / np.sqrt(9 * channels)).astype("float32")
        out = -(-size // stride)
        cotangent = rng.standard_normal((args.batch, out, out, channels)).astype("float32")
        forms = {"conv": conv_fn(stride), "matmul": matmul_fn(stride)}
        for pass_name in PASSES:
            times = time_forms(forms, pass_name, x, kernel, cotangent, backend, jit,
                               args.repeats, seed=stride * 1000 + size * channels)
            print(paired_row([f"{stride}, {size}, {channels} → {channels} ({out}×{out} out)",
                              pass_name], times), flush=True)


def network_worker(args):
    """Serve ``measure`` requests: one timed call of the network's forward or training step
    (built once per resolution), the ``--switch`` module flag as ``--setting`` says."""
    import importlib

    import keras

    import harness
    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer

    for module, attribute, off, on in switch_settings(args.switch):
        setattr(importlib.import_module(module), attribute, on if args.setting == "on" else off)
    jit = True if keras.backend.backend() == "jax" else args.tf_jit_compile == "true"
    built = {}

    def calls(size):
        if size not in built:
            built.clear()
            keras.utils.set_random_seed(0)
            network = build_unet(image_size=size, channels=3, **NETWORKS[args.network])
            network.jit_compile = jit
            model = DiffusionModel(network, seed=0)  # bin/train's optimizer
            model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                          jit_compile=jit)
            etsdm_backend.release_build_memory()
            rng = np.random.default_rng(size)
            x = np.clip(rng.standard_normal((args.batch, size, size, 3)), -1, 1)
            x = x.astype("float32")
            t = rng.integers(0, 1000, size=(args.batch,)).astype("float32")
            built[size] = {"forward": lambda: network.predict_on_batch({"x": x, "t": t}),
                           "train": lambda: model.train_on_batch(x)}
        return built[size]

    def measure(request):
        call = calls(request["resolution"])[request["task"]]
        start = time.perf_counter()
        call()
        return {"seconds": time.perf_counter() - start}

    harness.worker_loop({"measure": measure})


def run_network(args, backend, jit):
    import harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"forward", "train"})
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; expected forward and/or train")
    print(f"| {args.network} U-Net, px, task (batch {args.batch}) | switch off ms | on ms | "
          "off ÷ on [95 % CI] | first call off / on s |")
    print("|---|---:|---:|---|---|")
    workers = {}
    try:
        for name, switch in (("conv", "off"), ("matmul", "on")):
            argv = [sys.executable, os.path.abspath(__file__), "--worker", "--switch",
                    args.switch, "--setting", switch, "--network", args.network,
                    "--batch", str(args.batch),
                    "--tf_jit_compile", args.tf_jit_compile]
            # started as bin/ starts (malloc tunables, XLA flags), but without the persistent
            # compilation cache, so that each first call compiles
            workers[name] = harness.Worker(name, argv, malloc="hugetlb",
                                           env={"KERAS_BACKEND": backend}, cold_compile=True)
        for size in [int(s) for s in args.resolutions.split(",") if s.strip()]:
            for task in tasks:
                first = {name: w.request("measure", resolution=size, task=task)["seconds"]
                         for name, w in workers.items()}
                for w in workers.values():  # warm-up
                    w.request("measure", resolution=size, task=task)
                results = harness.interleave(
                    list(workers.values()), "measure", args.repeats,
                    orders=harness.round_orders(list(workers), args.repeats, seed=size),
                    resolution=size, task=task)
                times = {name: [r["seconds"] for r in rs] for name, rs in results.items()}
                print(paired_row([f"{size}², {task}"], times)
                      + f" {first['conv']:.1f} / {first['matmul']:.1f} |", flush=True)
    finally:
        for w in workers.values():
            w.close()


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return network_worker(args)
    # As bin/ starts: the malloc tunables (a re-exec) and the XLA flags, before JAX starts.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "bin"))
    import _startup

    _startup.tune_process()
    import keras

    import harness

    backend = keras.backend.backend()
    jit = args.tf_jit_compile == "true"
    print(f"machine: {harness.machine_description()}")
    print(f"backend: {backend}" + (f", jit_compile={jit}" if backend == "tensorflow"
                                   else ", jax.jit")
          + f", XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, {args.repeats} rounds\n")
    (run_ops if args.part == "ops" else run_network)(args, backend, jit)


if __name__ == "__main__":
    main()
