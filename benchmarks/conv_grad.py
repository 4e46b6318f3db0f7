"""JAX/XLA CPU: the kernel gradient of a stride-1 convolution, XLA's vs one matmul per tap.

Prints, for the convolution shapes of the DDPM CIFAR-10 U-Net and the embedded default, the
median time of the forward convolution, of XLA's kernel gradient and of the per-tap matmul
gradient used by ``keras_etsdm.backend.conv2d_same``; then the whole U-Net forward + backward
with each gradient (``backend.FAST_CONV_KERNEL_GRAD`` toggled at trace time), in alternating
rounds in one process. ``keras_etsdm`` turns YNNPACK convolutions off on import (see
``keras_etsdm/cpu_tuning.py``); ``KERAS_ETSDM_CPU_TUNING=0`` measures jaxlib's default instead.

    KERAS_BACKEND=jax python benchmarks/conv_grad.py                 # CIFAR-10 U-Net, batch 8
    KERAS_BACKEND=jax python benchmarks/conv_grad.py --skip_layers --base_channels 64
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import numpy as np  # noqa: E402

# (batch, size, c_in, c_out): CIFAR-10 U-Net (batch 8) and the folded default (batch 64).
SHAPES = [(8, 32, 128, 128), (8, 32, 256, 128), (8, 32, 384, 128), (8, 16, 256, 256),
          (8, 16, 512, 256), (8, 8, 256, 256), (64, 16, 32, 32), (64, 8, 64, 64)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip_layers", action="store_true", help="only the whole U-Net")
    return p.parse_args()


def median_ms(fn, *args, repeats=7):
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def layer_table():
    import jax
    from jax import lax

    from keras_etsdm import backend as etsdm_backend

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fast = etsdm_backend._jax_conv2d_same()
    rng = np.random.default_rng(0)
    print("| batch×H×W, C_in → C_out | forward ms | XLA kernel grad ms | per-tap grad ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for b, size, c_in, c_out in SHAPES:
        x = rng.standard_normal((b, size, size, c_in)).astype("float32")
        k = 0.05 * rng.standard_normal((3, 3, c_in, c_out)).astype("float32")
        g = rng.standard_normal((b, size, size, c_out)).astype("float32")
        forward = jax.jit(conv)
        xla_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k_: conv(x, k_), k)[1](g)[0])
        tap_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k_: fast(x, k_), k)[1](g)[0])
        np.testing.assert_allclose(np.asarray(xla_grad(x, k, g)), np.asarray(tap_grad(x, k, g)),
                                   rtol=2e-3, atol=2e-2)
        f, a, t = median_ms(forward, x, k), median_ms(xla_grad, x, k, g), median_ms(tap_grad, x, k, g)
        print(f"| {b}×{size}×{size}, {c_in} → {c_out} | {f:.1f} | {a:.1f} | {t:.1f} | {a / t:.2f}× |",
              flush=True)


def unet_ab(args):
    import jax
    import jax.numpy as jnp

    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.unet import build_unet

    net = build_unet(image_size=32, channels=3, base_channels=args.base_channels,
                     channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                     dropout=0.1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3)).astype("float32"))
    t = jnp.asarray(rng.integers(0, 1000, args.batch).astype("float32"))
    trainable = [v.value for v in net.trainable_variables]
    non_trainable = [v.value for v in net.non_trainable_variables]

    def loss(tv):
        out, _ = net.stateless_call(tv, non_trainable, {"x": x, "t": t})
        return jnp.mean((out - x) ** 2)

    steps = {}
    for flag in (False, True):
        etsdm_backend.FAST_CONV_KERNEL_GRAD = flag
        fn = jax.jit(jax.grad(loss))
        start = time.perf_counter()
        jax.block_until_ready(fn(trainable))
        print(f"compile + first call ({'per-tap' if flag else 'XLA'} kernel grad): "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        steps[flag] = fn
    etsdm_backend.FAST_CONV_KERNEL_GRAD = None  # back to the automatic choice
    times = {False: [], True: []}
    for r in range(args.rounds):
        for flag in (False, True):
            times[flag].append(median_ms(steps[flag], trainable, repeats=1))
        print(f"round {r + 1}: XLA {times[False][-1]:.0f} ms, per-tap {times[True][-1]:.0f} ms",
              flush=True)
    a, b = np.median(times[False]), np.median(times[True])
    print(f"U-Net base {args.base_channels}, 32×32, batch {args.batch}, forward + backward: "
          f"XLA kernel grad {a:.0f} ms, per-tap {b:.0f} ms → {a / b:.2f}× "
          f"(medians of {args.rounds} alternating rounds; load {os.getloadavg()[0]:.1f})")


def main():
    args = parse_args()
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("This benchmark is about XLA on JAX: run it with KERAS_BACKEND=jax.")
    print(f"load average {os.getloadavg()}", flush=True)
    if not args.skip_layers:
        layer_table()
    unet_ab(args)


if __name__ == "__main__":
    main()
