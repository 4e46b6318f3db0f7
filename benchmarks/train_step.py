"""Images/s of a DiffusionModel training step on each Keras backend, and GFLOP/s vs matmul.

Fixed small configuration (issue 2): 32×32×3 images, base_channels 64, channel_mult
(1, 2, 2, 2), 2 res blocks, attention at 16×16, dropout 0.1, batch 32, Adam, EMA on; the
step is ``DiffusionModel.fit`` (noise-prediction MSE) exactly as a user runs it: ONE fit per
worker over all warm-up and timed steps, as ``bin/train`` runs it (``_GatedFit`` pauses it
between repeats; no per-repeat fit set-up is timed).

Each backend runs in its own worker process (the backend is fixed at import); the workers take
turns in a random order per repeat (seeded), one timed repeat each, warm-up excluded; medians
and inter-quartile ranges over the repeats are reported. Achieved GFLOP/s uses the model FLOPs
of a training step, 3 × the forward FLOPs counted by XLA's cost analysis (forward + backward ≈
3 × forward), against float32 matmul rates measured at the same time in numpy and in each
framework.

    python benchmarks/train_step.py                      # jax and tensorflow, defaults
    python benchmarks/train_step.py --repeats 7 --steps 4 --json /tmp/train_step.json
    python benchmarks/train_step.py --backends jax --tf_jit_compile false,true
    python benchmarks/train_step.py --model_variants as_is,no_dropout,clipped_adam

``--tf_jit_compile`` runs one TensorFlow worker per value (``auto`` is Keras' default, which is
no XLA on a CPU-only machine). ``--model_variants`` prices parts of the step: each set-up (no
dropout; bin/train's clipped Adam instead of plain Adam; upsampling convolutions in their direct
form) runs in its own worker beside the as-is one and is reported as a paired img/s ratio against
it.
"""

import argparse
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SMALL_CONFIG = dict(base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), dropout=0.1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="jax,tensorflow",
                   help="comma-separated Keras backends (jax, tensorflow, torch)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--base_channels", type=int, default=SMALL_CONFIG["base_channels"])
    p.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per backend")
    p.add_argument("--order_seed", type=int, default=0,
                   help="seed of the random worker order in each repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--matmul_n", type=int, default=1024)
    p.add_argument("--tf_jit_compile", default="auto",
                   help="comma-separated values of compile(jit_compile=...) for TensorFlow")
    p.add_argument("--jax_steps_per_execution", type=int, default=1)
    p.add_argument("--cpu_tuning", default="tuned",
                   help="comma-separated start-up tunings (keras_etsdm/cpu_tuning.py), one worker "
                        "per backend and value: tuned (as bin/ starts), no_xla_flag (JAX only: "
                        "jaxlib's default YNNPACK convolutions), no_hugetlb (glibc malloc as is), "
                        "concurrency_scheduler (JAX only: tuned, but XLA CPU's "
                        "concurrency-optimized scheduler on, jaxlib's default), no_retain_memory "
                        "(huge pages, glibc's default arenas: without cpu_tuning's item 4, "
                        "which JAX on AVX2 / AVX-512 gets), retain_memory (huge pages and item 4's "
                        "tunables forced, as item 4 was set until 2026-12-06), "
                        "onednn_fusion=<types> (JAX only: tuned plus XLA CPU's oneDNN fusions, "
                        "types '/'-separated, e.g. dot/eltwise/reduce), xla:<flag>=<value> (JAX "
                        "and TensorFlow: tuned plus one XLA flag, '/' for ',' in the value), "
                        "tf_xla:<flag>=<value>[+<flag>=<value>...] (TensorFlow only: tuned plus "
                        "TF_XLA_FLAGS, e.g. auto-clustering), mimalloc (screening: mimalloc "
                        "preloaded in place of glibc's malloc, from the cmeel-mimalloc wheel of "
                        "benchmarks/requirements.txt; the library does not use it), "
                        "keep_compiler_memory (the first step compiled and run in one go, without "
                        "the library's heap trim: JAX's backend.compile_then_release between "
                        "compiling and running, TensorFlow's backend.run_then_release after), "
                        "async_dispatch (JAX only: without cpu_tuning's item 5, synchronous "
                        "CPU dispatch, which JAX on AVX2 / AVX-512 gets), wait_dispatch (JAX only, "
                        "screening: asynchronous dispatch, each step waiting for its inputs "
                        "and then 5 ms before it is dispatched), small_pages (tuned without "
                        "glibc's huge-page tunable: GLIBC_TUNABLES=glibc.malloc.hugetlb=0), "
                        "avx512_set (JAX only: what JAX gets on AVX-512 and, since "
                        "2026-12-07, AVX2 CPUs, forced on any CPU: the retaining malloc on small "
                        "pages, synchronous dispatch, the concurrency-optimized scheduler off), "
                        "glibc:<name>=<value>[+...] (screening: GLIBC_TUNABLES set to those "
                        "glibc.malloc tunables; the start-up adds hugetlb=1 unless hugetlb is "
                        "named)")
    p.add_argument("--model_variants", default="as_is",
                   help="comma-separated training set-ups, one worker per backend and value, "
                        "each compared with as_is: as_is (Adam 2e-4, dropout 0.1), no_dropout "
                        "(dropout 0), clipped_adam (bin/train's optimizer: "
                        "optimizers.make_optimizer, Adam with global-norm clipping at 1.0, "
                        "TensorFlow's fused update), clipped_adam_unfused (the same with Keras's "
                        "per-operation update, paired with clipped_adam), "
                        "direct_upsample (every upsampling convolution run on the upsampled "
                        "image, as before layers.upsample_nearest_conv3x3)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--logdir", default=None, help="worker stderr logs go here")
    # Worker mode (internal).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jit_compile", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--model_variant", default="as_is", help=argparse.SUPPRESS)
    return p.parse_args(argv)


MODEL_VARIANTS = ("as_is", "no_dropout", "clipped_adam", "clipped_adam_unfused",
                  "direct_upsample")
# the set-up a variant is paired with (as_is unless named here)
VARIANT_BASE = {"clipped_adam_unfused": "clipped_adam"}


# ----- worker ---------------------------------------------------------------------------------
def _jit_value(text):
    return {"auto": "auto", "true": True, "false": False}[text.lower()]


def build_model(args):
    import keras

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm import layers as etsdm_layers
    from keras_etsdm.optimizers import make_optimizer

    if args.model_variant == "direct_upsample":
        etsdm_layers.SUBPIXEL_UPSAMPLE = False
    keras.utils.set_random_seed(0)
    config = dict(SMALL_CONFIG, base_channels=args.base_channels)
    if args.model_variant == "no_dropout":
        config["dropout"] = 0.0
    network = build_unet(image_size=args.image_size, channels=3, **config)
    model = DiffusionModel(network, ema_decay=0.9999, seed=0)
    kwargs = {}
    if keras.backend.backend() == "jax":
        kwargs["steps_per_execution"] = args.jax_steps_per_execution
    optimizer = (make_optimizer(learning_rate=2e-4, grad_clip_norm=1.0,
                                fused=args.model_variant == "clipped_adam")
                 if args.model_variant.startswith("clipped_adam")
                 else keras.optimizers.Adam(2e-4))
    model.compile(optimizer=optimizer, jit_compile=_jit_value(args.jit_compile), **kwargs)
    return model


def forward_flops_per_image(network, batch, image_size, direct_upsample=True):
    """Forward FLOPs per image counted by XLA's cost analysis (JAX backend only).

    By default of the network as it is defined: the upsampling convolutions counted in their
    direct form (on the upsampled image), as every implementation of the network computes
    them, not in the sub-pixel form the library runs (``layers.upsample_nearest_conv3x3``,
    fewer FLOPs), and every convolution as XLA counts a convolution, not as the matmul the
    library runs for outputs smaller than the kernel (``backend.conv2d_same_as_matmul``: a
    3×3 kernel on a 1×1 input is its centre tap) nor in the Winograd form its compiled passes
    use (``keras_etsdm.winograd``: 2.25× fewer multiplications), so that a rate in model
    GFLOP/s is the same measure for the library and for its peers. ``direct_upsample=False``
    counts what the library runs."""
    import jax
    import jax.numpy as jnp

    from keras_etsdm import backend as etsdm_backend
    from keras_etsdm import layers as etsdm_layers
    from keras_etsdm import winograd

    tv = [v.value for v in network.trainable_variables]
    ntv = [v.value for v in network.non_trainable_variables]
    channels = network.input["x"].shape[-1]
    inputs = {"x": jnp.zeros((batch, image_size, image_size, channels), jnp.float32),
              "t": jnp.zeros((batch,), jnp.float32)}
    if "y" in network.input:  # class-conditional
        inputs["y"] = jnp.zeros((batch,), jnp.int32)

    def forward(tv, ntv, inputs):  # a new function per call: JAX caches traces by function
        return network.stateless_call(tv, ntv, inputs, training=False)[0]

    switches = (etsdm_layers.SUBPIXEL_UPSAMPLE, etsdm_backend.SMALL_CONV_AS_MATMUL,
                winograd.WINOGRAD)
    etsdm_layers.SUBPIXEL_UPSAMPLE = etsdm_backend.SMALL_CONV_AS_MATMUL = not direct_upsample
    winograd.WINOGRAD = not direct_upsample
    try:  # the switches are read when the forward is traced
        cost = jax.jit(forward).lower(tv, ntv, inputs).compile().cost_analysis()
    finally:
        (etsdm_layers.SUBPIXEL_UPSAMPLE, etsdm_backend.SMALL_CONV_AS_MATMUL,
         winograd.WINOGRAD) = switches
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]) / batch


class _GatedFit:
    """ONE ``model.fit`` over every warm-up and timed step, as ``bin/train`` runs it, paused
    between timed repeats so that the workers can still take turns.

    ``fit`` runs in a background thread; a callback blocks it after every ``steps`` batches
    (and after the warm-up) until the parent asks for the next repeat. A repeat is timed from
    the release of the gate to the end of its last batch, synchronised on the loss value (JAX
    dispatches steps asynchronously, so the batch-end hook alone would not wait for the
    computation). No fit set-up, data-adapter or iterator cost is inside a repeat.
    """

    def __init__(self, model, data, batch, steps, warmup, repeats):
        import threading

        import keras

        self.steps, self.warmup = steps, warmup
        self.release = threading.Semaphore(0)
        self.reached = threading.Semaphore(0)
        self.batch_ends = []
        self.error = None
        total = warmup + steps * repeats
        gate = self

        class Gate(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                done = batch + 1
                boundary = done == gate.warmup or (
                    done > gate.warmup and (done - gate.warmup) % gate.steps == 0)
                if done == 1 or boundary:
                    float(keras.ops.convert_to_numpy(logs["loss"]))  # wait for the step
                    gate.batch_ends.append(time.perf_counter())
                    gate.reached.release()
                    if done < total:
                        gate.release.acquire()

        def run():
            try:
                model.fit(data, batch_size=batch, epochs=1, steps_per_epoch=total,
                          shuffle=False, verbose=0, callbacks=[Gate()])
            except BaseException as e:  # reported by the next request
                gate.error = e
                gate.reached.release()

        self.start = time.perf_counter()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _wait(self):
        self.reached.acquire()
        if self.error is not None:
            raise RuntimeError(f"fit failed: {self.error!r}")
        return self.batch_ends[-1]

    def first_step_and_warmup(self):
        """Seconds of the first step (compilation included), then the rest of the warm-up."""
        first = self._wait() - self.start
        if self.warmup > 1:
            self.release.release()
            self._wait()
        return first

    def timed_repeat(self):
        """Seconds of ``steps`` training steps inside the running fit."""
        start = time.perf_counter()
        self.release.release()
        return self._wait() - start


def _wait_before_dispatch(seconds):
    """Screening ("wait_dispatch"): every jitted step the trainer builds first waits for its
    inputs, then sleeps ``seconds`` (GIL and core free) before it is dispatched."""
    import jax

    from keras_etsdm import backend as etsdm_backend

    wrap = etsdm_backend.compile_then_release

    def compile_then_release(jitted):
        step = wrap(jitted)

        def waiting_step(*args):
            jax.block_until_ready(args)
            time.sleep(seconds)
            return step(*args)

        return waiting_step

    etsdm_backend.compile_then_release = compile_then_release


def worker_main(args):
    import keras

    if os.environ.get(KEEP_COMPILER_MEMORY_VARIABLE) == "1":
        from keras_etsdm import backend as etsdm_backend

        etsdm_backend.RELEASE_COMPILER_MEMORY = False
    if os.environ.get(WAIT_DISPATCH_VARIABLE):
        _wait_before_dispatch(float(os.environ[WAIT_DISPATCH_VARIABLE]))
    backend = keras.backend.backend()
    model = build_model(args)
    steps = args.steps
    rng = np.random.default_rng(0)
    total = max(args.warmup, 1) + steps * args.repeats
    # One pass over distinct batches (no epoch boundary inside the fit).
    data = rng.uniform(-1, 1, size=(total * args.batch, args.image_size, args.image_size, 3))
    data = data.astype(np.float32)
    state = {}

    def warmup(request):
        result = {"params": int(model.network.count_params()), "backend": backend}
        if backend == "jax":  # before fit: a paused JAX fit holds the variables' values
            result["forward_flops_per_image"] = forward_flops_per_image(
                model.network, args.batch, args.image_size)
        state["fit"] = _GatedFit(model, data, args.batch, steps, max(args.warmup, 1),
                                 args.repeats)
        result["first_step_s"] = state["fit"].first_step_and_warmup()
        result["jit_compile"] = str(model.jit_compile)
        state["matmul"] = harness.framework_matmul_fn(backend, args.matmul_n)
        state["matmul"]()
        return result

    def train(request):
        cpu_start = time.process_time()
        seconds = state["fit"].timed_repeat()
        return {"seconds": seconds, "steps": steps,
                "cpu_seconds": time.process_time() - cpu_start}

    def matmul(request):
        times = harness.time_repeated(state["matmul"], 3)
        return {"gflops": harness.matmul_flops(args.matmul_n) / float(np.median(times)) / 1e9}

    harness.worker_loop({"warmup": warmup, "train": train, "matmul": matmul})


# ----- parent ---------------------------------------------------------------------------------
def forward_flops_via_jax(args):
    """Start a short-lived JAX worker only to count FLOPs (when jax is not benchmarked)."""
    worker = start_worker(args, "jax", "auto", "jax-flops")
    try:
        return worker.request("warmup")["forward_flops_per_image"]
    finally:
        worker.close()


CPU_TUNINGS = ("tuned", "no_xla_flag", "no_hugetlb", "concurrency_scheduler", "no_retain_memory",
               "retain_memory", "mimalloc", "keep_compiler_memory", "async_dispatch", "wait_dispatch",
               "small_pages", "avx512_set")
# JAX only, "avx512_set": what the start-up gave JAX on AVX-512 CPUs only until 2026-12-07 (the
# retaining malloc on small pages, item 4; synchronous dispatch, item 5; the concurrency-optimized
# scheduler off, item 3), forced on any CPU: how they were decided for AVX2
# (benchmarks/results/avx2), where "tuned" now includes them
# "small_pages": the tuning without glibc's huge-page tunable (GLIBC_TUNABLES=
# glibc.malloc.hugetlb=0, which the start-up keeps), everything else as "tuned" gets it
# JAX only, "async_dispatch": the tuning without its synchronous CPU dispatch (cpu_tuning item 5,
# applied on AVX-512), through the library's own switch
# JAX only, "wait_dispatch" (screening, not adopted): asynchronous dispatch, but each step waits
# for its inputs (the previous step's outputs) and then sleeps WAIT_DISPATCH_S before it is
# dispatched, leaving the runtime time to free the previous step's temporaries
WAIT_DISPATCH_VARIABLE = "ETSDM_BENCH_WAIT_DISPATCH"
WAIT_DISPATCH_S = 0.005
# "keep_compiler_memory": the tuning, but the first step compiled and run in one go with no heap
# trim (backend.RELEASE_COMPILER_MEMORY = False in the worker), as before compile_then_release
# (JAX) and run_then_release (TensorFlow)
KEEP_COMPILER_MEMORY_VARIABLE = "ETSDM_BENCH_KEEP_COMPILER_MEMORY"
# "no_retain_memory": the tuning without item 4 (huge pages, glibc malloc otherwise as it is),
# through cpu_tuning's own switch; not by setting a malloc tunable to glibc's default value,
# which turns off glibc's dynamic mmap threshold. "retain_memory" forces item 4 on any backend.

# JAX only: XLA CPU's concurrency-optimized scheduler on (jaxlib's default, which the tuning
# turns off on AVX-512), the other tuned flags as they are
CONCURRENCY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
# JAX only, "onednn_fusion=<types>": the tuned flags plus XLA CPU's oneDNN fusions of the given
# types, "/"-separated ("dot/eltwise" → dot,eltwise; jaxlib 0.10 offers dot, eltwise, reduce)
ONEDNN_FUSION_FLAG = "xla_cpu_experimental_onednn_fusion_type"
# "xla:<flag>=<value>": the tuned flags plus any one XLA flag ("/" → "," in the value), for
# screening a flag before the library adopts it; JAX and TensorFlow (whose XLA reads XLA_FLAGS
# too, for the jit_compile step)
XLA_FLAG_PREFIXES = ("onednn_fusion=", "xla:")
# TensorFlow only, "tf_xla:<flag>=<value>+<flag>=<value>...": TensorFlow's XLA flags added to
# TF_XLA_FLAGS ("+" between flags, "/" for "," in a value), e.g. auto-clustering of the step's
# fusible operations only (its convolutions stay oneDNN kernels):
# tf_xla:tf_xla_auto_jit=2+tf_xla_cpu_global_jit=true+tf_xla_ops_to_cluster=FUSIBLE
TF_XLA_FLAG_PREFIX = "tf_xla:"
# Screening, "glibc:<name>=<value>+<name>=<value>...": GLIBC_TUNABLES set to those glibc.malloc
# tunables (the start-up keeps them and adds no retaining tunables, but adds its huge-page
# tunable unless hugetlb is named), e.g. glibc:arena_max=2+mmap_max=0+
# trim_threshold=17179869184+hugetlb=0 (the retaining tunables with two arenas, on small pages:
# a lead for XLA's compile time)
GLIBC_PREFIX = "glibc:"


def mimalloc_library(paths=None):
    """Path of the mimalloc shared library the ``cmeel-mimalloc`` wheel installs
    (``<site-packages>/cmeel.prefix/lib/libmimalloc.so.3``), or None where it is not installed.
    ``paths``: directories to look in (default ``sys.path``)."""
    for entry in sys.path if paths is None else paths:
        candidate = os.path.join(entry or ".", "cmeel.prefix", "lib", "libmimalloc.so.3")
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def worker_environ(backend, tuning="tuned", environ=os.environ):
    """The variables a worker of ``backend`` with start-up ``tuning`` gets on top of
    ``environ`` (the worker applies the library's own start-up tuning itself)."""
    env = {"KERAS_BACKEND": backend}
    tuning_module = harness._cpu_tuning()
    if tuning == "no_xla_flag":
        # the malloc tuning as "tuned" gets it, given explicitly: with the opt-out below the
        # worker's start would not add it; the opt-out then only keeps the XLA flag off
        env["GLIBC_TUNABLES"] = harness.malloc_environ(
            {**environ, **env}, "hugetlb", backend).get("GLIBC_TUNABLES", "")
        env[tuning_module.OPT_OUT_VARIABLE] = "0"
    if tuning == "retain_memory":
        env["GLIBC_TUNABLES"] = f"{tuning_module.HUGETLB_TUNABLE}:{tuning_module.RETAIN_TUNABLES}"
    if tuning == "small_pages":
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
    if tuning == "avx512_set":
        # the user-setting paths of the start-up keep each of these as given here
        env["GLIBC_TUNABLES"] = tuning_module.RETAIN_TUNABLES
        env[tuning_module.SYNC_DISPATCH_VARIABLE] = "1"
        env["XLA_FLAGS"] = " ".join(
            f for f in (environ.get("XLA_FLAGS", ""), tuning_module.JAX_XLA_SCHEDULER_FLAG) if f)
    if tuning == "no_retain_memory":
        env[tuning_module.RETAIN_OPT_OUT_VARIABLE] = "0"
    if tuning == "keep_compiler_memory":
        env[KEEP_COMPILER_MEMORY_VARIABLE] = "1"
    if tuning in ("async_dispatch", "wait_dispatch"):
        env[tuning_module.SYNC_DISPATCH_VARIABLE] = "0"
    if tuning == "wait_dispatch":
        env[WAIT_DISPATCH_VARIABLE] = str(WAIT_DISPATCH_S)
    if tuning == "mimalloc":  # screening: mimalloc preloaded in place of glibc's malloc
        library = mimalloc_library()
        if library is None:
            raise SystemExit("--cpu_tuning mimalloc: the cmeel-mimalloc wheel is not installed "
                             "(pip install cmeel-mimalloc).")
        env["LD_PRELOAD"] = library
        env[tuning_module.RETAIN_OPT_OUT_VARIABLE] = "0"
    if tuning == "concurrency_scheduler":
        env["XLA_FLAGS"] = " ".join(
            f for f in (environ.get("XLA_FLAGS", ""), CONCURRENCY_SCHEDULER) if f)
    if tuning.startswith(XLA_FLAG_PREFIXES):
        flag = (f"{ONEDNN_FUSION_FLAG}={tuning.split('=', 1)[1]}"
                if tuning.startswith("onednn_fusion=") else tuning[len("xla:"):])
        env["XLA_FLAGS"] = " ".join(
            f for f in (environ.get("XLA_FLAGS", ""), f"--{flag.replace('/', ',')}") if f)
    if tuning.startswith(GLIBC_PREFIX):
        env["GLIBC_TUNABLES"] = ":".join(
            f"glibc.malloc.{t}" for t in tuning[len(GLIBC_PREFIX):].split("+"))
    if tuning.startswith(TF_XLA_FLAG_PREFIX):
        flags = " ".join(f"--{f.replace('/', ',')}"
                         for f in tuning[len(TF_XLA_FLAG_PREFIX):].split("+"))
        env["TF_XLA_FLAGS"] = " ".join(
            f for f in (environ.get("TF_XLA_FLAGS", ""), flags) if f)
    return env


def start_worker(args, backend, jit_compile, name, tuning="tuned", variant="as_is"):
    argv = [sys.executable, os.path.abspath(__file__), "--worker",
            "--batch", str(args.batch), "--image_size", str(args.image_size),
            "--base_channels", str(args.base_channels), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--matmul_n", str(args.matmul_n),
            "--repeats", str(args.repeats),
            "--jit_compile", jit_compile, "--model_variant", variant,
            "--jax_steps_per_execution", str(args.jax_steps_per_execution)]
    log = (os.path.join(args.logdir, re.sub(r"[^A-Za-z0-9_.=()\[\]{}+-]", "_", name) + ".log")
           if args.logdir else None)
    env = worker_environ(backend, tuning)
    return harness.Worker(name, argv, env=env, log_path=log,
                          malloc="default" if tuning == "no_hugetlb" else "hugetlb")


def paired_baselines(specs):
    """``(base, name)`` worker pairs to report as paired ratios base ÷ name: each start-up
    tuning against the tuned worker of the same backend, jit mode and set-up, and each set-up
    (``--model_variants``) against as_is (or its ``VARIANT_BASE``) under the tuned start-up;
    then each TensorFlow worker
    of a later ``--tf_jit_compile`` value against the first value's with the same tuning and
    set-up. ``specs``: ``(backend, jit_compile, name, tuning, variant)`` tuples as ``main``
    builds them."""
    pairs = []
    for backend, jit, name, tuning, variant in specs:
        want = (backend, jit, "tuned",
                variant if tuning != "tuned" else VARIANT_BASE.get(variant, "as_is"))
        base = next((n for b, j, n, t, v in specs if (b, j, t, v) == want), None)
        if (tuning, variant) != ("tuned", "as_is") and base is not None:
            pairs.append((base, name))
    first_jit = next((j for b, j, *_ in specs if b == "tensorflow"), None)
    for backend, jit, name, tuning, variant in specs:
        if backend == "tensorflow" and jit != first_jit:
            base = next((n for b, j, n, t, v in specs
                         if (b, j, t, v) == (backend, first_jit, tuning, variant)), None)
            if base is not None:
                pairs.append((base, name))
    return pairs


def worker_specs(args):
    """``[(backend, jit_compile, name, tuning, variant)]``, one per worker the arguments ask for
    (tunings a backend has no use for are left out); bad values raise ``SystemExit``."""
    specs = []
    tunings = [t.strip() for t in args.cpu_tuning.split(",") if t.strip()]
    named = {t for t in tunings
             if not t.startswith(XLA_FLAG_PREFIXES + (TF_XLA_FLAG_PREFIX, GLIBC_PREFIX))}
    for t in tunings:
        if t.startswith("xla:") and not re.fullmatch(r"xla:xla_[a-z0-9_]+=\S+", t):
            raise SystemExit(f"--cpu_tuning: {t!r} is not of the form xla:<xla_flag>=<value> "
                             f"(e.g. xla:xla_cpu_prefer_vector_width=512)")
        if t.startswith(GLIBC_PREFIX) and not re.fullmatch(
                r"glibc:[a-z_]+=[0-9]+(\+[a-z_]+=[0-9]+)*", t):
            raise SystemExit(f"--cpu_tuning: {t!r} is not of the form glibc:<name>=<value>"
                             f"[+<name>=<value>...] (e.g. glibc:arena_max=2+mmap_max=0)")
        if t.startswith(TF_XLA_FLAG_PREFIX) and not re.fullmatch(
                r"tf_xla:tf_xla_[a-z0-9_]+=[^\s+]+(\+tf_xla_[a-z0-9_]+=[^\s+]+)*", t):
            raise SystemExit(f"--cpu_tuning: {t!r} is not of the form tf_xla:<flag>=<value>"
                             f"[+<flag>=<value>...] (e.g. tf_xla:tf_xla_auto_jit=2)")
    variants = [v.strip() for v in args.model_variants.split(",") if v.strip()]
    if not variants or set(variants) - set(MODEL_VARIANTS):
        raise SystemExit(f"--model_variants: expected values among {MODEL_VARIANTS}, "
                         f"got {args.model_variants!r}")
    if not tunings or named - set(CPU_TUNINGS):
        raise SystemExit(f"--cpu_tuning: expected values among {CPU_TUNINGS}, "
                         f"onednn_fusion=<types>, xla:<flag>=<value>, tf_xla:<flags> or "
                         f"glibc:<tunables>, "
                         f"got {args.cpu_tuning!r}")
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend not in ("jax", "tensorflow", "torch"):
            raise SystemExit(f"Unknown backend {backend!r}; expected jax, tensorflow or torch.")
        for tuning, variant in [(t, v) for t in tunings for v in variants]:
            if (tuning in ("no_xla_flag", "concurrency_scheduler", "async_dispatch",
                           "wait_dispatch", "avx512_set")
                    or tuning.startswith("onednn_fusion=")) and backend != "jax":
                continue
            if ((tuning == "keep_compiler_memory" or tuning.startswith("xla:"))
                    and backend not in ("jax", "tensorflow")):
                continue
            if tuning.startswith(TF_XLA_FLAG_PREFIX) and backend != "tensorflow":
                continue
            suffix = "" if tuning == "tuned" else f"[{tuning}]"
            suffix += "" if variant == "as_is" else f"{{{variant}}}"
            if backend == "tensorflow":
                for value in args.tf_jit_compile.split(","):
                    _jit_value(value)  # validate early
                    specs.append((backend, value, f"tensorflow(jit_compile={value}){suffix}",
                                  tuning, variant))
            else:
                specs.append((backend, "auto", backend + suffix, tuning, variant))
    return specs


def main(args):
    if args.logdir:
        os.makedirs(args.logdir, exist_ok=True)
    specs = worker_specs(args)
    print(f"machine: {harness.machine_description()}", flush=True)
    workers = []
    try:
        warm = {}
        for backend, jit, name, tuning, variant in specs:
            worker = start_worker(args, backend, jit, name, tuning, variant)
            workers.append(worker)
            warm[name] = worker.request("warmup")
            print(f"  {name}: built and warmed up (first step {warm[name]['first_step_s']:.1f} s, "
                  f"{warm[name]['params']:,} params; GLIBC_TUNABLES "
                  f"{worker.glibc_tunables or '(none)'})", flush=True)
        flops = next((w["forward_flops_per_image"] for w in warm.values()
                      if "forward_flops_per_image" in w), None)
        if flops is None:
            flops = forward_flops_via_jax(args)
        train_flops = 3.0 * flops
        train = {w.name: [] for w in workers}
        train_cpu = {w.name: [] for w in workers}
        matmul = {w.name: [] for w in workers}
        numpy_rates = []
        order_rng = np.random.default_rng(args.order_seed)
        for r in range(args.repeats):
            for w in [workers[i] for i in order_rng.permutation(len(workers))]:
                result = w.request("train")
                train[w.name].append(result["seconds"])
                train_cpu[w.name].append(result["cpu_seconds"])
            for w in workers:
                matmul[w.name].append(w.request("matmul")["gflops"])
            numpy_rates.append(harness.numpy_matmul_gflops(args.matmul_n, repeats=3))
            print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
        peaks = {w.name: w.request("matmul")["peak_rss_mib"] for w in workers}
    finally:
        for w in workers:
            w.close()

    numpy_rate = harness.summarize(numpy_rates)
    print(f"\nmachine after: {harness.machine_description()}")
    print(f"config: {args.image_size}x{args.image_size}x3, base_channels {args.base_channels}, "
          f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
          f"train FLOPs/image {train_flops / 1e9:.2f} GFLOP (3 x forward)")
    print(f"numpy float32 matmul ({args.matmul_n}^3): {numpy_rate['median']:.1f} GFLOP/s "
          f"(IQR {numpy_rate['iqr']:.1f})\n")
    header = (f"{'backend':<32} {'img/s':>8} {'IQR':>6} {'GFLOP/s':>8} {'fw matmul':>9} "
              f"{'% fw mm':>7} {'% np mm':>7} {'1st step s':>10} {'peak MiB':>8} {'CPU ms/img':>10}")
    print(header)
    print("-" * len(header))
    rows = {}
    for w in workers:
        per_step = np.asarray(train[w.name]) / args.steps
        ips = harness.summarize(args.batch / per_step)
        gflops = ips["median"] * train_flops / 1e9
        mm = harness.summarize(matmul[w.name])
        cpu_ms = 1e3 * float(np.median(train_cpu[w.name])) / (args.steps * args.batch)
        rows[w.name] = {"images_per_s": ips, "gflops": gflops, "matmul_gflops": mm,
                        "first_step_s": warm[w.name]["first_step_s"],
                        "params": warm[w.name]["params"], "peak_rss_mib": peaks[w.name],
                        "cpu_ms_per_image": cpu_ms}
        print(f"{w.name:<32} {ips['median']:>8.2f} {ips['iqr']:>6.2f} {gflops:>8.1f} "
              f"{mm['median']:>9.1f} {100 * gflops / mm['median']:>6.1f}% "
              f"{100 * gflops / numpy_rate['median']:>6.1f}% "
              f"{warm[w.name]['first_step_s']:>10.1f} {peaks[w.name]:>8.0f} {cpu_ms:>10.1f}")
    paired = {}
    for base, name in paired_baselines(specs):
        ci = harness.paired_ratio_ci(args.batch / np.asarray(train[base]),
                                     args.batch / np.asarray(train[name]))
        paired[f"{base} ÷ {name}"] = ci
        print(f"paired img/s ratio {base} ÷ {name}: {ci['ratio']:.3f} "
              f"[{ci['low']:.3f}, {ci['high']:.3f}] (95 % bootstrap over {ci['n']} repeats)")
    if args.json:
        harness.write_json_atomic(args.json, {
            "machine": harness.machine_description(), "cpu": harness.cpu_description(),
            "args": vars(args), "train_flops_per_image": train_flops,
            "numpy_matmul_gflops": numpy_rate, "results": rows, "raw_train_seconds": train,
            "paired_vs_tuned": paired})  # each tuning vs tuned, each set-up vs as_is
    return rows


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    else:
        main(parsed)
