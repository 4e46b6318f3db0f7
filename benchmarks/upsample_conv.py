"""Nearest 2x upsampling + 3x3 convolution: the direct form against the sub-pixel form.

Times, on one Keras backend, ``conv3x3_same(nearest_upsample(x))`` (direct) and
``keras_etsdm.layers.upsample_nearest_conv3x3`` (sub-pixel: a 2x2 convolution of the
low-resolution input with the parities' collapsed kernels, then the parities interleaved), the
forward alone and forward + backward (gradients in the input and the kernel), at the upsampling
shapes of the DDPM CIFAR-10 U-Net (base 128: 4, 8 and 16 px inputs with 256 channels) and of
a 64-channel level. The forms run alternately in each of ``--repeats`` rounds; the script prints
medians and the paired per-round ratio sub-pixel ÷ direct (time) with a 95 % bootstrap interval.
JAX runs ``jax.jit`` with the bin/ start-up XLA flags (the script sets them); TensorFlow runs
``tf.function`` with ``--tf_jit_compile`` (default false: its oneDNN kernels, the library's
choice on AVX-512 CPUs).

    KERAS_BACKEND=jax python benchmarks/upsample_conv.py
    KERAS_BACKEND=tensorflow python benchmarks/upsample_conv.py --repeats 15
    KERAS_BACKEND=jax python benchmarks/upsample_conv.py --count_flops   # no timing

``--count_flops`` prints instead the forward FLOPs per image (XLA's cost analysis of the compiled
program, JAX) of the library's U-Net configurations with the upsampling convolutions in each
form: what share of a network's work the sub-pixel form saves.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# (batch, input size, channels in, channels out)
SHAPES = [(8, 4, 256, 256), (8, 8, 256, 256), (8, 16, 256, 256), (8, 16, 128, 128),
          (8, 32, 64, 64)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tf_jit_compile", default="false", choices=("false", "true"))
    p.add_argument("--count_flops", action="store_true",
                   help="print the U-Net configurations' forward FLOPs in each form (JAX)")
    return p.parse_args()


def count_flops():
    """Forward FLOPs per image of the library's U-Net configurations, direct and sub-pixel."""
    from keras_etsdm import unet
    from train_step import forward_flops_per_image

    configs = {"DDPM CIFAR-10 (32², cifar10.gin)": unet.DDPM_CIFAR10,
               "DDPM 256² (lsun / ffhq / celebahq / afhq.gin)": unet.DDPM_256,
               "ADM ImageNet 64² (imagenet64.gin, resblock_updown)": unet.ADM_IMAGENET64}
    print("| network | forward GFLOP / image, direct | sub-pixel | saved |")
    print("|---|---:|---:|---:|")
    for name, config in configs.items():
        network = unet.build_unet(**config)
        direct, subpixel = (forward_flops_per_image(network, 1, config["image_size"],
                                                    direct_upsample=form) / 1e9
                            for form in (True, False))
        print(f"| {name} | {direct:.2f} | {subpixel:.2f} | "
              f"{100 * (1 - subpixel / direct):.1f} % |", flush=True)


def compiled(fn, backend, jit_compile):
    """``fn`` compiled for ``backend``; the returned callable blocks until its result is ready."""
    if backend == "jax":
        import jax

        jitted = jax.jit(fn)
        return lambda *a: jax.block_until_ready(jitted(*a))
    import tensorflow as tf

    graph = tf.function(fn, jit_compile=jit_compile)
    return lambda *a: [t.numpy() for t in tf.nest.flatten(graph(*a))]


def value_and_grads(fn, backend, cotangent):
    """``(x, kernel) -> (sum(fn(x, kernel) · cotangent), d/dx, d/dkernel)`` on ``backend``."""
    import keras

    if backend == "jax":
        import jax

        return jax.value_and_grad(lambda x, k: keras.ops.sum(fn(x, k) * cotangent),
                                  argnums=(0, 1))
    import tensorflow as tf

    def step(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            value = keras.ops.sum(fn(x, kernel) * cotangent)
        return value, tape.gradient(value, [x, kernel])
    return step


PASSES = ("forward", "forward + backward")


def time_forms(forms, pass_name, x, kernel, cotangent, backend, jit_compile, repeats, seed):
    """Time ``forms`` (name → ``fn(x, kernel)``) alternately: the forward alone or, for
    ``pass_name`` "forward + backward", value and gradients against ``cotangent``; each compiled
    and run twice untimed first, then ``repeats`` rounds in ``harness.round_orders(seed)``.
    Returns name → list of seconds."""
    import harness

    fns = {name: compiled(fn if pass_name == "forward"
                          else value_and_grads(fn, backend, cotangent), backend, jit_compile)
           for name, fn in forms.items()}
    for fn in fns.values():  # compile and warm up
        fn(x, kernel)
        fn(x, kernel)
    times = {name: [] for name in fns}
    for order in harness.round_orders(list(fns), repeats, seed=seed):
        for name in order:
            start = time.perf_counter()
            fns[name](x, kernel)
            times[name].append(time.perf_counter() - start)
    return times


def main():
    args = parse_args()
    from keras_etsdm import cpu_tuning

    cpu_tuning.tune_xla_for_cpu()
    import keras

    import harness
    from keras_etsdm import layers as etsdm_layers

    backend = keras.backend.backend()
    if args.count_flops:
        if backend != "jax":
            raise SystemExit("--count_flops uses XLA's cost analysis: run it with "
                             "KERAS_BACKEND=jax.")
        print(f"machine: {harness.machine_description()}\n")
        return count_flops()
    jit = args.tf_jit_compile == "true"

    def direct(x, kernel):
        return keras.ops.conv(etsdm_layers.nearest_upsample(x), kernel, padding="same")

    forms = {"direct": direct, "subpixel": etsdm_layers.upsample_nearest_conv3x3}
    print(f"machine: {harness.machine_description()}")
    print(f"backend: {backend}" + (f", tf.function(jit_compile={jit})"
                                   if backend == "tensorflow" else ", jax.jit")
          + f", XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {args.repeats} rounds\n")
    print("| shape (batch, input px, C_in → C_out) | pass | direct ms | sub-pixel ms | "
          "sub-pixel ÷ direct [95 % CI] |")
    print("|---|---|---:|---:|---|")
    rng = np.random.default_rng(0)
    for batch, size, c_in, c_out in SHAPES:
        x = rng.standard_normal((batch, size, size, c_in)).astype("float32")
        kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype("float32")
        cotangent = rng.standard_normal((batch, 2 * size, 2 * size, c_out)).astype("float32")
        for pass_name in PASSES:
            times = time_forms(forms, pass_name, x, kernel, cotangent, backend, jit,
                               args.repeats, seed=size * c_in)
            ci = harness.paired_ratio_ci(times["subpixel"], times["direct"])
            print(f"| ({batch}, {size}, {c_in} → {c_out}) | {pass_name} | "
                  f"{1e3 * np.median(times['direct']):.2f} | "
                  f"{1e3 * np.median(times['subpixel']):.2f} | "
                  f"{ci['ratio']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] |", flush=True)


if __name__ == "__main__":
    main()
