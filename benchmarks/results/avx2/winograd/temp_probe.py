"""XLA's buffer sizes for the JAX training step, Winograd in training or not (one process).

    KERAS_BACKEND=jax python benchmarks/results/avx2/winograd/temp_probe.py --setting direct
    ... --setting all      # winograd.IN_TRAINING
    ... --setting max16    # and winograd.TRAINING_MAX_SIZE = 16

The DDPM CIFAR-10 U-Net (small_conv.py's "cifar10"), batch 8, bin/train's optimizer, started
as bin/ starts (cpu_tuning's XLA flags and malloc, set by re-executing like bin/_startup).
Prints the compiled step's ``memory_analysis()`` (temporaries, arguments, outputs), the time
to lower + compile it, the process's peak RSS after one step, and its resident set after the
build, after the compile, after the heap trim that follows, and after the step.
"""

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _patch_kernel_gradient(winograd, kernel_gradient):
    """Replace ``winograd.conv3x3_same`` by the same form whose kernel gradient is
    ``kernel_gradient(x, kernel, upstream)`` (the input gradient stays the library's)."""
    from keras import ops

    @ops.custom_gradient
    def conv3x3_same(x, kernel):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            turned = ops.transpose(ops.flip(ops.flip(kernel, axis=0), axis=1), (0, 1, 3, 2))
            return winograd._forward(upstream, turned), kernel_gradient(x, kernel, upstream)

        return winograd._forward(x, kernel), grad

    winograd.conv3x3_same = conv3x3_same


def patch_per_tap_kernel_gradient(winograd):
    """The kernel gradient as 9 matmuls of shifted inputs with the output gradient."""
    from keras import ops

    def kernel_gradient(x, kernel, upstream):
        _, height, width, _ = x.shape
        padded = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        taps = [ops.einsum("bhwi,bhwo->io", padded[:, i:i + height, j:j + width, :], upstream)
                for i in range(3) for j in range(3)]
        return ops.reshape(ops.stack(taps, axis=0), kernel.shape)

    _patch_kernel_gradient(winograd, kernel_gradient)


def patch_forward_order_kernel_gradient(winograd):
    """The library's gradient as it was: V recomputed by the forward's own transform."""
    from keras import ops

    def kernel_gradient(x, kernel, upstream):
        grad_m = winograd._output_transform_adjoint(upstream)
        grad_u = ops.einsum("tpi,tpo->tio", winograd._input_transform(x), grad_m)
        return winograd._kernel_transform_adjoint(grad_u)

    _patch_kernel_gradient(winograd, kernel_gradient)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--setting", choices=("direct", "all", "max16"), required=True)
    p.add_argument("--release_probe", action="store_true",
                   help="after the step: gc + heap trim, then jax.clear_caches() + gc + trim, "
                        "reading the resident set after each (what holds the compile's memory)")
    p.add_argument("--max_input", type=int, default=0,
                   help="a variant tried here: Winograd in training only for convolutions whose "
                        "input has at most this many values per image (H·W·C_in; 0: no limit)")
    p.add_argument("--kernel_gradient", choices=("winograd", "per_tap", "forward_order"),
                   default="winograd",
                   help="per_tap: a variant tried here, the Winograd form's kernel gradient "
                        "as 9 matmuls of shifted inputs with the output gradient; "
                        "forward_order: the library before 2026-12-07 evening, its backward "
                        "transform of the input computed like the forward's (which XLA merged "
                        "with it)")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    from keras_etsdm import cpu_tuning

    cpu_tuning.reexec_with_huge_page_malloc()  # as bin/_startup: malloc, then XLA flags
    cpu_tuning.tune_xla_for_cpu()

    import numpy as np
    import keras
    from keras_etsdm import DiffusionModel, build_unet, winograd
    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm.optimizers import make_optimizer
    from small_conv import NETWORKS
    import harness

    if args.kernel_gradient == "per_tap":
        patch_per_tap_kernel_gradient(winograd)
    elif args.kernel_gradient == "forward_order":
        patch_forward_order_kernel_gradient(winograd)
    if args.max_input:
        unlimited = winograd.in_training
        winograd.in_training = lambda shape: (
            unlimited(shape) and shape[1] * shape[2] * shape[3] <= args.max_input)
    winograd.IN_TRAINING = args.setting != "direct"
    winograd.TRAINING_MAX_SIZE = 16 if args.setting == "max16" else None
    found = {}

    def spy(jitted):
        def step(*call_args):
            if "temp" not in found:
                start = time.perf_counter()
                compiled = jitted.lower(*call_args).compile()
                found["compile_s"] = time.perf_counter() - start
                analysis = compiled.memory_analysis()
                for name in ("temp", "argument", "output", "alias", "generated_code"):
                    found[name] = getattr(analysis, f"{name}_size_in_bytes") / 2**20
                found["rss_compiled_mib"] = harness.rss_mib()
                cpu_tuning.trim_heap()
                found["rss_trimmed_mib"] = harness.rss_mib()
            return jitted(*call_args)
        return step

    etsdm_backend.compile_then_release = spy
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=32, channels=3, **NETWORKS["cifar10"])
    model = DiffusionModel(network, seed=0)
    model.compile(optimizer=make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0),
                  jit_compile=True)
    etsdm_backend.release_build_memory()
    found["rss_built_mib"] = harness.rss_mib()
    x = np.clip(np.random.default_rng(0).standard_normal((args.batch, 32, 32, 3)), -1, 1)
    start = time.perf_counter()
    model.train_on_batch(x.astype("float32"))
    found["first_call_s"] = time.perf_counter() - start
    found["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found["rss_after_step_mib"] = harness.rss_mib()
    if args.release_probe:
        import gc

        import jax

        gc.collect()
        cpu_tuning.trim_heap()
        found["rss_after_gc_trim_mib"] = harness.rss_mib()
        from jax._src import util as jax_util

        jax_util.clear_all_caches()  # JAX's Python-level staging caches only
        gc.collect()
        cpu_tuning.trim_heap()
        found["rss_after_staging_caches_mib"] = harness.rss_mib()
        start = time.perf_counter()
        model.train_on_batch(x.astype("float32"))
        found["step_after_staging_clear_s"] = time.perf_counter() - start
        gc.collect()
        cpu_tuning.trim_heap()
        found["rss_after_that_step_trim_mib"] = harness.rss_mib()
        jax.clear_caches()  # drops the compiled step and JAX's lowering / tracing caches
        gc.collect()
        cpu_tuning.trim_heap()
        found["rss_after_clear_caches_mib"] = harness.rss_mib()
    found["setting"] = args.setting
    found["kernel_gradient"] = args.kernel_gradient
    found["max_input"] = args.max_input
    found["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    found["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
