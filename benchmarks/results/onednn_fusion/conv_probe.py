"""Probe behind the README's oneDNN sentence: a 3×3 convolution's forward + backward
(8×32×32×64 → 64, one jit) and forwards at the CIFAR-10 U-Net's shapes (batch 8) under the
XLA_FLAGS of this process; median of 20 / 30 calls. Run once per flag set:

    for f in "" "--xla_cpu_use_onednn=true" \
             "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" \
             "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_cpu_use_onednn=true"; do
        XLA_FLAGS="$f" python benchmarks/results/onednn_fusion/conv_probe.py; done
"""
import os
import time

import jax
import jax.numpy as jnp

DN = ("NHWC", "HWIO", "NHWC")


def median_seconds(fn, args, calls):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


x = jnp.ones((8, 32, 32, 64), jnp.float32)
w = jnp.ones((3, 3, 64, 64), jnp.float32) * 0.01
grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
parts = [f"fwd+bwd 8x32x32x64: {1e3 * median_seconds(grad, (x, w), 20):.2f} ms"]
forward = jax.jit(conv)
for hw, c in [(32, 128), (16, 256), (8, 256)]:
    x = jnp.ones((8, hw, hw, c), jnp.float32)
    w = jnp.ones((3, 3, c, c), jnp.float32) * 0.01
    s = median_seconds(forward, (x, w), 30)
    gflops = 2 * 8 * hw * hw * c * c * 9 / s / 1e9
    parts.append(f"fwd {hw}x{hw}x{c}: {1e3 * s:.2f} ms {gflops:.0f} GFLOP/s")
print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: " + " | ".join(parts))
