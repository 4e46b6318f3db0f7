"""Where does a training step's time go? Forward + backward time of the U-Net's pieces.

Times forward + backward (gradients with respect to the input and all weights) of single layers
at the shapes of the small benchmark configuration, on the backend in ``KERAS_BACKEND``, with
interleaved repeats (every variant once per round) and medians. Variants that compute the same
math (e.g. two GroupNorm implementations) run in the same rounds, so their ratio is an A/B test.

    KERAS_BACKEND=jax python benchmarks/profile_components.py --batch 8 --repeats 7
    KERAS_BACKEND=tensorflow python benchmarks/profile_components.py --only conv,gn
    # the DDPM CIFAR-10 U-Net's shapes (base 128: 128 channels at 32x32, 256 below)
    KERAS_BACKEND=jax python benchmarks/profile_components.py --shapes cifar10

JAX runs with the XLA flags the bin/ entry points set at start-up (``cpu_tuning``), printed
first; ``--no_cpu_tuning`` leaves XLA's defaults.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def make_grad_fn(layer, x, jit_compile=None):
    """Zero-argument blocking function running forward + backward of ``layer`` on ``x``."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def loss(tv, x):
            out, _ = layer.stateless_call(tv, ntv, x)
            return jnp.sum(out * out)

        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        xj = jnp.asarray(x)
        return lambda: jax.block_until_ready(f(tv, xj))
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)

        @tf.function(jit_compile=jit_compile)
        def step(xt):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                out = layer(xt)
                loss = tf.reduce_sum(out * out)
            return tape.gradient(loss, [xt] + [v.value for v in layer.trainable_variables])

        return lambda: [g.numpy() for g in step(xt)]
    raise ValueError(f"backend {backend} not supported here")


def build(layer, shape):
    layer.build(shape)
    return layer


# (height, channels) per U-Net level: the small benchmark configuration (base 64) and the DDPM
# CIFAR-10 U-Net (base 128, channel multipliers 1, 2, 2, 2).
SHAPES = {"small": [(32, 64), (16, 128), (8, 128), (4, 128)],
          "cifar10": [(32, 128), (16, 256), (8, 256), (4, 256)]}


def variants(batch, only, shapes="small"):
    """``{group: {variant name: (layer, input array)}}`` at the shapes of ``SHAPES[shapes]``."""
    import keras

    from keras_etsdm import layers as L

    rng = np.random.default_rng(0)
    groups = {}
    levels = SHAPES[shapes]

    def x_of(h, c):
        return rng.standard_normal((batch, h, h, c)).astype(np.float32)

    if "conv" in only:
        groups["conv3x3"] = {
            f"{h}x{h} {c}->{c}": (build(keras.layers.Conv2D(c, 3, padding="same"),
                                        (None, h, h, c)), x_of(h, c))
            for h, c in levels}
        # the library's convolution layer (what ResBlock uses; JAX: backend.conv2d_same)
        groups["conv3x3"].update({
            f"etsdm Conv2D {h}x{h} {c}->{c}": (build(L.Conv2D(c, 3, padding="same"),
                                                     (None, h, h, c)), x_of(h, c))
            for h, c in levels[:2]})
    if "resample" in only:  # the stride-2 convolution and the nearest-upsample + convolution
        groups["resample"] = {}
        for h, c in levels[:3]:
            groups["resample"][f"Downsample {h}x{h}x{c}"] = (build(L.Downsample(), (None, h, h, c)),
                                                             x_of(h, c))
            groups["resample"][f"Upsample {h // 2}x{h // 2}x{c}"] = (
                build(L.Upsample(), (None, h // 2, h // 2, c)), x_of(h // 2, c))
    if "gn" in only:
        gn = {}
        for h, c in levels[:3]:
            gn[f"keras GN {h}x{h}x{c}"] = (build(keras.layers.GroupNormalization(
                groups=L.num_groups(c), epsilon=1e-5), (None, h, h, c)), x_of(h, c))
            if hasattr(L, "GroupNorm"):
                layer = L.GroupNorm(L.num_groups(c), epsilon=1e-5)
                gn[f"etsdm GN {h}x{h}x{c}"] = (build(layer, (None, h, h, c)),
                                               gn[f"keras GN {h}x{h}x{c}"][1])
        groups["groupnorm"] = gn
    if "attn" in only:
        groups["attention"] = {"AttentionBlock 16x16x128": (
            build(L.AttentionBlock(1), (None, 16, 16, 128)), x_of(16, 128))}
    if "res" in only:
        groups["resblock"] = {}
        for h, c in levels[:2]:
            ci = co = c
            blk = L.ResBlock(co, dropout=0.0)
            blk.build(((None, h, h, ci), (None, 256)))
            emb = rng.standard_normal((batch, 256)).astype(np.float32)

            class _Wrap(keras.layers.Layer):  # single-input view of the two-input block
                def __init__(self, block, emb):
                    # An explicit name: the default one ("__wrap") is not a valid TF scope name.
                    super().__init__(name="resblock_view")
                    self.block = block
                    self.emb = emb

                def call(self, x):
                    return self.block([x, keras.ops.convert_to_tensor(self.emb)])

            w = _Wrap(blk, emb)
            w.built = True
            groups["resblock"][f"ResBlock {h}x{h} {ci}->{co}"] = (w, x_of(h, ci))
    return groups


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", default="conv,resample,gn,attn,res")
    p.add_argument("--tf_jit_compile", default="false")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="small",
                   help="small: the small benchmark configuration; cifar10: the DDPM CIFAR-10 "
                        "U-Net (128 channels at 32x32, 256 below)")
    p.add_argument("--no_cpu_tuning", action="store_true",
                   help="JAX: XLA's default flags instead of the bin/ start-up ones")
    args = p.parse_args(argv)
    if not args.no_cpu_tuning:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from keras_etsdm import cpu_tuning

        cpu_tuning.tune_xla_for_cpu()  # as bin/ does; a no-op on other backends
    import keras

    jit = {"true": True, "false": False, "none": None}[args.tf_jit_compile.lower()]
    print(f"backend {keras.backend.backend()}; {harness.machine_description()}")
    print(f"shapes {args.shapes}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for group, items in variants(args.batch, args.only.split(","), args.shapes).items():
        fns = {}
        for name, (layer, x) in items.items():
            fn = make_grad_fn(layer, x, jit)
            start = time.perf_counter()
            fn()
            fns[name] = (fn, time.perf_counter() - start)
            fn()
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, (fn, _) in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        print(f"[{group}] fwd+bwd, batch {args.batch}")
        for name, ts in times.items():
            s = harness.summarize(ts)
            print(f"  {name:<28} {1e3 * s['median']:8.2f} ms  IQR {1e3 * s['iqr']:6.2f}  "
                  f"(first call {fns[name][1]:.2f} s)")
    print(f"after: {harness.machine_description()}")


if __name__ == "__main__":
    main()
