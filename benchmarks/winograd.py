"""3×3 convolutions by Winograd's F(2×2, 3×3) against XLA's direct convolution on a CPU.

``keras_etsdm.winograd.conv3x3_same`` computes a stride-1 3×3 "same" convolution with 2.25×
fewer multiplications (``backend.conv2d_same`` uses it where ``winograd.applies``: XLA on a
CPU, float32, outputs from 8×8, 32 or more channels, and not in a training step). Two parts,
each on one Keras backend (``KERAS_BACKEND``), the forms run alternately, medians and the paired
per-round ratio direct ÷ Winograd (time; > 1: Winograd is faster) with a 95 % bootstrap
interval:

* ``--part ops`` (default): single convolutions at U-Net shapes (C_in → C_out at 8–64 px,
  batch ``--batch``), the forward alone and forward + backward (both gradients; the
  hand-written gradient of ``conv3x3_same``), compiled with XLA (``jax.jit``, or
  ``tf.function(jit_compile=True)``), plus each form's compile time for the forward.
* ``--part network``: the ``--network`` U-Net's ``predict_on_batch`` (and, for the record, its
  training step, which keeps the direct form) in two worker processes with
  ``winograd.WINOGRAD`` on and off (``small_conv.py --part network --switch winograd``).

    KERAS_BACKEND=jax python benchmarks/winograd.py --repeats 15
    KERAS_BACKEND=tensorflow python benchmarks/winograd.py --tf_jit_compile true
    KERAS_BACKEND=jax python benchmarks/winograd.py --part network --network cifar10 \\
        --resolutions 32 --repeats 15
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# (input px, C_in, C_out): the CIFAR-10 U-Net's (128 / 256 channels, concatenated skips on the
# way up), the embedded default's (32 / 64), and the sizes below which the form is not used
OP_SHAPES = [(32, 128, 128), (32, 256, 128), (32, 384, 128), (16, 256, 256), (16, 512, 256),
             (8, 256, 256), (8, 512, 256), (64, 128, 128), (32, 32, 32), (32, 64, 64),
             (16, 64, 64), (8, 64, 64), (4, 256, 256)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="ops", choices=("ops", "network"))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tf_jit_compile", default="true", choices=("false", "true"))
    p.add_argument("--network", default="cifar10", help="--part network: small_conv.py's")
    p.add_argument("--resolutions", default="32")
    p.add_argument("--tasks", default="forward,train")
    return p.parse_args(argv)


def compile_seconds(fn, x, kernel, backend, jit):
    """Seconds to compile and run ``fn`` once (the first call) on fresh shapes."""
    from upsample_conv import compiled

    start = time.perf_counter()
    compiled(fn, backend, jit)(x, kernel)
    return time.perf_counter() - start


def run_ops(args, backend, jit):
    import keras

    from keras_etsdm import winograd
    from small_conv import paired_row
    from upsample_conv import PASSES, time_forms

    def direct(x, kernel):
        return keras.ops.conv(x, kernel, padding="same")

    forms = {"conv": direct, "matmul": winograd.conv3x3_same}  # paired_row's names
    print(f"| px, C_in → C_out (batch {args.batch}) | pass | direct ms | Winograd ms | "
          "direct ÷ Winograd [95 % CI] | first call direct / Winograd s |")
    print("|---|---|---:|---:|---|---|")
    rng = np.random.default_rng(0)
    for size, c_in, c_out in OP_SHAPES:
        x = rng.standard_normal((args.batch, size, size, c_in)).astype("float32")
        kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype("float32")
        cotangent = rng.standard_normal((args.batch, size, size, c_out)).astype("float32")
        first = {name: compile_seconds(fn, x, kernel, backend, jit) for name, fn in forms.items()}
        for pass_name in PASSES:
            times = time_forms(forms, pass_name, x, kernel, cotangent, backend, jit,
                               args.repeats, seed=size * 1000 + c_in + c_out)
            extra = (f" {first['conv']:.2f} / {first['matmul']:.2f} |"
                     if pass_name == "forward" else " |")
            print(paired_row([f"{size}², {c_in} → {c_out}", pass_name], times) + extra,
                  flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.part == "network":
        import small_conv

        return small_conv.main(["--part", "network", "--switch", "winograd",
                                "--network", args.network, "--resolutions", args.resolutions,
                                "--tasks", args.tasks, "--repeats", str(args.repeats),
                                "--batch", str(args.batch),
                                "--tf_jit_compile", args.tf_jit_compile])
    # As bin/ starts: the malloc tunables (a re-exec) and the XLA flags, before JAX starts.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "bin"))
    import _startup

    _startup.tune_process()
    import keras

    import harness

    backend = keras.backend.backend()
    jit = True if backend == "jax" else args.tf_jit_compile == "true"
    print(f"machine: {harness.machine_description()}")
    print(f"backend: {backend}" + (f", jit_compile={jit}" if backend == "tensorflow"
                                   else ", jax.jit")
          + f", XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {args.repeats} rounds\n")
    run_ops(args, backend, jit)


if __name__ == "__main__":
    main()
