"""The few backend-specific pieces, each behind a backend-neutral function.

Nothing else in the package imports tensorflow, jax or torch directly for computation.
"""

import functools
import os

import keras
import numpy as np

from keras_etsdm import cpu_tuning
from keras_etsdm import winograd as winograd_module


def backend_name():
    return keras.backend.backend()


if backend_name() == "jax":
    # Synchronous CPU dispatch where the start-up tuning asked for it (cpu_tuning item 5): JAX
    # reads the setting when it creates its CPU client, so it is applied at import.
    cpu_tuning.apply_sync_dispatch()


def replica_id():
    """Index of the current replica under ``tf.distribute`` (a scalar tensor or 0).

    JAX data parallelism (``keras.distribution``) draws random numbers for the GLOBAL batch, so
    its shards already differ; TensorFlow runs ``train_step`` once per replica with mirrored
    seed state, so each replica must fold its own index into the seed.
    """
    if backend_name() != "tensorflow":
        return 0
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return 0
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return context.replica_id_in_sync_group


class ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A ``keras.random.SeedGenerator`` whose draws differ between ``tf.distribute`` replicas.

    The state advances identically on every replica (so checkpoints stay consistent); the
    replica index is added to the second seed word of each draw.
    """

    def next(self, ordered=True):
        seed = super().next(ordered=ordered)
        rid = replica_id()
        if isinstance(rid, int) and rid == 0:
            return seed
        offset = keras.ops.stack([keras.ops.zeros((), seed.dtype),
                                  keras.ops.cast(rid, seed.dtype) * 1_000_003])
        return seed + offset


def to_numpy(x):
    """Any backend tensor (or nested python numbers) → numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


# ----- a variable's initial copy without a compiled op per shape (JAX) -------------------------
def copy_initializer(variable):
    """Initializer: a copy of ``variable``'s current value, in a buffer of its own (JAX must not
    alias buffers that a step donates), without a compiled copy per weight shape on JAX.

    JAX runs an eager op by compiling it once per distinct shape: building the CIFAR-10 U-Net's
    training model compiled 73 small programs, 26 of them the EMA's copies (``ops.copy``) and
    more its zero fills; 31 with this initializer (benchmarks/results/avx2/jax_compile).
    ``jax.device_put(..., may_alias=False)`` copies without one. The returned initializer checks
    that the new variable has ``variable``'s shape and returns the value in ``variable``'s dtype
    (the new variable casts it to its own).
    """
    def initializer(shape, dtype=None):
        if tuple(variable.shape) != tuple(shape):
            raise ValueError(f"copy_initializer: the variable {variable.path!r} has shape "
                             f"{tuple(variable.shape)}, the new variable asks for {tuple(shape)}.")
        value = variable.value
        # jax.device_put copies arrays this process holds whole; an array spread over several
        # processes (multi-host training) is copied by a compiled op, as before.
        if backend_name() == "jax" and getattr(value, "is_fully_addressable", False):
            import jax

            return jax.device_put(value, may_alias=False)  # a copy, never an alias
        return keras.ops.copy(value)

    return initializer


@functools.lru_cache(maxsize=8)
def _flat_concat(count):
    """A compiled ``(*arrays) -> one flat float32 vector`` for ``count`` arrays (TF / JAX)."""
    if backend_name() == "tensorflow":
        import tensorflow as tf

        @tf.autograph.experimental.do_not_convert
        def concat(*xs):
            return tf.concat([tf.reshape(tf.cast(x, tf.float32), [-1]) for x in xs], 0)

        return tf.function(concat)
    if backend_name() == "jax":
        import jax
        import jax.numpy as jnp

        return jax.jit(lambda *xs: jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                                                    for x in xs]))
    return None


def variables_to_flat_numpy(variables):
    """The values of ``variables`` as one flat float32 numpy vector (in order).

    One compiled concatenation and one device-to-host copy instead of one per variable: for the
    166 weights of the embedded default's U-Net, ~6 ms instead of ~14–29 ms on 2 CPU cores.
    """
    if not variables:
        return np.zeros(0, np.float32)
    concat = _flat_concat(len(variables))
    if concat is None:
        return np.concatenate([np.ravel(to_numpy(v.value)).astype(np.float32)
                               for v in variables])
    return np.asarray(concat(*[v.value for v in variables]))


def default_train_jit_compile():
    """``jit_compile`` for the training step when the user leaves it to the library (``"auto"``).

    JAX and PyTorch: True (JAX jits the step in any case). TensorFlow: True with a GPU / TPU;
    on a CPU-only machine as measured for its ISA (``cpu_tuning.tensorflow_train_jit_compile``:
    no XLA on AVX-512, where TensorFlow's oneDNN kernels were faster; XLA elsewhere).
    """
    if backend_name() != "tensorflow":
        return True
    if _tensorflow_sees_an_accelerator():
        return True
    return cpu_tuning.tensorflow_train_jit_compile()


def default_winograd_training():
    """``winograd_training`` for ``train`` when the user leaves it to the library (``"auto"``):
    True for JAX on a CPU where it was measured to pay (``cpu_tuning.jax_winograd_training``:
    AVX2 without AVX-512), False elsewhere (other backends, accelerators, other CPUs)."""
    return (backend_name() == "jax" and xla_compiles_for_a_cpu()
            and cpu_tuning.jax_winograd_training())


def xla_compiles_for_a_cpu():
    """Whether an XLA-compiled function of this process runs on the CPU: JAX's default backend
    is the CPU, or TensorFlow sees no GPU / TPU. Other backends: False."""
    if backend_name() == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend_name() == "tensorflow":
        return not _tensorflow_sees_an_accelerator()
    return False


def _tensorflow_sees_an_accelerator():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


SAMPLE_JIT_VARIABLE = "KERAS_ETSDM_SAMPLE_JIT_COMPILE"


def default_sample_jit_compile(environ=None, network=None):
    """Whether TensorFlow's compiled sampling loops (``samplers._compiled``) use XLA.

    ``$KERAS_ETSDM_SAMPLE_JIT_COMPILE`` = ``1`` / ``0`` forces it; unset or ``auto``: True with
    a GPU / TPU; on a CPU True for a ``network`` whose 3×3 convolutions XLA runs by Winograd's
    algorithm (``winograd.network_uses_it``: the DDPM CIFAR-10 U-Net's DDIM / DPM-Solver++
    loops ran 1.25–1.28× as fast with XLA as without on an AVX-512 CPU,
    benchmarks/results/winograd/), else as measured for the CPU's ISA
    (``cpu_tuning.tensorflow_sample_jit_compile``). Read when a loop is first compiled (a cached
    loop keeps its mode). JAX always jits (XLA).
    """
    environ = os.environ if environ is None else environ
    value = environ.get(SAMPLE_JIT_VARIABLE, "auto").strip().lower()
    if value not in ("1", "true", "0", "false", "auto"):
        raise ValueError(f"{SAMPLE_JIT_VARIABLE} must be 1, 0 or auto; got {value!r}.")
    if backend_name() != "tensorflow":
        return True
    if value != "auto":
        return value in ("1", "true")
    if _tensorflow_sees_an_accelerator():
        return True
    if network is not None and winograd_module.network_uses_it(network):
        return True
    return cpu_tuning.tensorflow_sample_jit_compile()


def release_build_memory():
    """Give back host memory that building a model left behind, before training starts.

    On JAX each weight initializer of a new shape is a compiled XLA program of its own, ~3.5 MB
    of host memory apiece on a CPU, kept in JAX's caches after the weights exist (the EMA's copies
    are made without: :func:`copy_initializer`). Dropping JAX's caches and
    trimming the C heap (``cpu_tuning.trim_heap``) lowers the training process's peak resident
    memory (``benchmarks/memory.py``, ``benchmarks/results/memory``). Whatever was compiled
    before is compiled again when next used, so call it once, after building and before the
    first step, as ``training.train`` does. Other backends: the heap trim only.
    """
    if backend_name() == "jax":
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
    cpu_tuning.trim_heap()


def with_train_compiler_options(jitted, train_step):
    """Keras's ``jax.jit``-ed training step, jitted again with the training step's compiler
    options (``cpu_tuning.jax_train_compiler_options``: ``$KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL``), or
    ``jitted`` unchanged (the default: no options).

    Why here: XLA flags are per process, so a lower LLVM optimization level set in ``XLA_FLAGS``
    would also slow the samplers; ``jax.jit``'s ``compiler_options`` confine it to this step.

    Args:
      jitted: the step Keras's JAX trainer jitted (``jax.jit(train_step, donate_argnums=0)``).
      train_step: the function it jits (the model's bound ``train_step``).

    Returns:
      ``jax.jit(train_step, donate_argnums=0, compiler_options=...)`` for JAX on the CPU, when
      ``jitted`` jits exactly ``train_step`` (not an NNX wrapper), no ``keras.distribution`` is
      set (its shardings are Keras's to pass) and the options are not empty; else ``jitted``.
    """
    if backend_name() != "jax" or getattr(jitted, "__wrapped__", None) != train_step:
        return jitted
    import jax

    if jax.default_backend() != "cpu" or keras.distribution.distribution() is not None:
        return jitted
    options = cpu_tuning.jax_train_compiler_options()
    if not options:
        return jitted
    # donate_argnums=0 as Keras's trainer: the state's buffers are reused for the new state.
    return jax.jit(train_step, donate_argnums=0, compiler_options=options)


# Module flag so benchmarks can A/B it in one process (read when a step function is first
# called): False calls the jitted step directly, compiling and running in one go (JAX), and
# skips the heap trim after a TensorFlow step's first call.
RELEASE_COMPILER_MEMORY = True


def compile_then_release(jitted):
    """Wrap a ``jax.jit``-ed step so that its first call compiles it, gives the compiler's freed
    memory back to the operating system, and only then runs it.

    Why: XLA frees most of what compiling a large program takes, but glibc keeps the freed
    blocks in the process, and the first run's temporaries (0.55 GiB for the DDPM CIFAR-10
    U-Net's training step at batch 8) then come on top of them instead of reusing them. Trimming
    the heap between the compile and the first run lowered that process's first-step peak RSS
    from 2,646–2,800 to 2,282–2,323 MiB on an AVX-512 CPU, with or without the retaining malloc
    of ``cpu_tuning`` item 4 (``benchmarks/memory.py``, ``benchmarks/results/compile_then_release``;
    the step's speed unchanged, 0.993× [0.974, 1.012] paired over 30 rounds). The compiled
    program lands in JAX's own cache, so the call that follows reuses it (no second compile).
    Only JAX on the CPU trims; elsewhere the step is returned unchanged, as it is when
    :data:`RELEASE_COMPILER_MEMORY` is False.

    Args:
      jitted: the ``jax.jit``-ed step function (anything with ``.lower(*args)``).

    Returns:
      A function with the step's signature.
    """
    if backend_name() != "jax" or not hasattr(jitted, "lower"):
        return jitted
    import jax

    if jax.default_backend() != "cpu":
        return jitted
    first = [True]

    @functools.wraps(jitted)
    def step(*args):
        if first[0] and RELEASE_COMPILER_MEMORY:
            jitted.lower(*args).compile()
            cpu_tuning.trim_heap()
        first[0] = False
        return jitted(*args)

    return step


def run_then_release(function):
    """Wrap a TensorFlow step so that its first call, which traces and compiles it, gives the
    freed memory back to the operating system once it has run.

    Why: TensorFlow traces a ``tf.function`` and (with ``jit_compile``) XLA-compiles it inside
    its first call, and glibc keeps what tracing and compiling freed in the process for good.
    On the DDPM CIFAR-10 U-Net's training step (batch 8, XLA, AVX2 CPU) the compiler left
    ~650 MiB free but resident; trimmed, the process held 2,293–2,301 MiB after the first step
    instead of 2,835–2,966 and 2,330–2,380 instead of 2,840–2,985 after 12 more (TensorFlow maps
    each step's large temporaries afresh), and after a DDIM-10 call 1,634–1,636 instead of
    1,817–1,854 MiB, at the same step speed (paired 0.985× [0.943, 1.056] over 15 rounds;
    ``benchmarks/results/avx2/tf_release``). TensorFlow offers no point between compiling and
    running a function, so unlike :func:`compile_then_release` this lowers what the process
    holds after its first call, not that call's own peak. Other backends: ``function``
    unchanged, as when :data:`RELEASE_COMPILER_MEMORY` is False.

    Args:
      function: the step (a ``tf.function`` or a Python function calling one).

    Returns:
      A function with the step's signature.
    """
    if backend_name() != "tensorflow":
        return function
    first = [True]

    @functools.wraps(function)
    def step(*args, **kwargs):
        outputs = function(*args, **kwargs)
        if first[0] and RELEASE_COMPILER_MEMORY:
            cpu_tuning.trim_heap()
        first[0] = False
        return outputs

    return step


# ----- Adam's update as one kernel per variable on TensorFlow ---------------------------------
def fused_adam_scalars(learning_rate, step, beta_1, beta_2, epsilon, dtype):
    """The scalar inputs of :func:`fused_adam_update` for one optimizer step, as ``dtype``
    tensors: ``{"lr", "beta1_power", "beta2_power", "beta1", "beta2", "epsilon"}``.

    Args:
      learning_rate: scalar tensor, this step's learning rate.
      step: scalar, 1-based step count ``t`` (the optimizer's ``iterations + 1``).
      beta_1, beta_2, epsilon: Adam's floats.
      dtype: the variables' dtype.
    """
    import tensorflow as tf

    step = tf.cast(step, dtype)
    beta_1 = tf.cast(beta_1, dtype)
    beta_2 = tf.cast(beta_2, dtype)
    return {"lr": tf.cast(learning_rate, dtype), "beta1_power": tf.pow(beta_1, step),
            "beta2_power": tf.pow(beta_2, step), "beta1": beta_1, "beta2": beta_2,
            "epsilon": tf.cast(epsilon, dtype)}


def fused_adam_update(variable, m, v, gradient, scalars):
    """Adam's update of one variable as TensorFlow's single ``ResourceApplyAdam`` kernel.

    The same arithmetic as ``keras.optimizers.Adam.update_step`` (``m += (g − m)(1 − β₁)``,
    ``v += (g² − v)(1 − β₂)``, ``var −= α m / (√v + ε)`` with ``α = lr √(1 − β₂ᵗ) / (1 −
    β₁ᵗ)``), in one operation instead of ~25 that Keras builds per variable while tracing the
    training step (29 % of the time tracing the DDPM CIFAR-10 U-Net's step, 304 variables, in a
    profile, ``benchmarks/trace_ops.py --profile``). On that step (``benchmarks/results/avx2/tf_release``, AVX2 CPU): 18,185 traced
    operations instead of 28,511; first call without XLA 38.6 → 17.0 s and with XLA 61.9 → 55.6
    s (medians of 3 alternated pairs each, fused faster in all 6), peak RSS ~100 MiB (graph) and
    ~250 MiB (XLA) lower; step speed unchanged (fused ÷ Keras's 0.995× [0.868, 1.048] without
    XLA, 1.007× [0.913, 1.161] with it, 15 paired rounds). TensorFlow only.

    Args:
      variable: the model variable (a ``keras.Variable`` or ``tf.Variable``; inside a
        ``tf.distribute`` update, its local copy).
      m, v: Adam's first and second moments of ``variable`` (same shape and dtype).
      gradient: the gradient of ``variable``.
      scalars: this step's :func:`fused_adam_scalars` in ``variable``'s dtype.
    """
    import tensorflow as tf

    def handle(x):
        x = x.value if isinstance(x, keras.Variable) else x
        return x.handle

    return tf.raw_ops.ResourceApplyAdam(
        var=handle(variable), m=handle(m), v=handle(v), grad=tf.cast(gradient, variable.dtype),
        use_locking=False, **scalars)


# ----- stride-1 "same" convolution with a per-tap kernel gradient on JAX ----------------------
# When jaxlib 0.10's XLA CPU runs convolutions as YNNPACK fusions (its default), the kernel
# gradient of a convolution is 1.5–3× slower than the forward pass; as one matmul per kernel tap
# it is 1.2–2× faster, e.g. 8×32×32, 384 → 128 channels: forward 78 ms, XLA kernel gradient
# 216 ms, per-tap 155 ms (benchmarks/RESULTS.md, benchmarks/conv_grad.py). With YNNPACK
# convolutions off (``cpu_tuning.tune_xla_for_cpu``, applied by bin/ at start-up) XLA's own gradient
# is the faster one (CIFAR-10 U-Net training step 2.70–3.04 s vs 3.07–3.49 s per-tap), and on
# GPUs cuDNN's is, so the per-tap form is used only on CPU with YNNPACK convolutions on.
# Module flag so benchmarks can A/B the two gradients in one process (read at trace time):
# None chooses as above, True / False force the per-tap / XLA gradient.
FAST_CONV_KERNEL_GRAD = None


def _per_tap_kernel_gradient():
    if FAST_CONV_KERNEL_GRAD is not None:
        return bool(FAST_CONV_KERNEL_GRAD)
    import jax

    return (jax.default_backend() == "cpu"
            and cpu_tuning.ynn_convolutions_enabled(os.environ.get("XLA_FLAGS", "")))


def conv2d_same(x, kernel, strides=1, winograd=True):
    """Dilation-1, "same"-padded 2-D convolution, channels last (Keras' "same" padding: for
    stride s the output is ``ceil(H / s)`` and the smaller half of the padding goes first).

    Args:
        x: ``[B, H, W, C_in]``.
        kernel: ``[kh, kw, C_in, C_out]``; odd ``kh`` and ``kw`` for stride 1.
        strides: an int or a pair.
        winograd: allow the Winograd form where ``winograd.applies`` (``layers.Conv2D`` passes
            False when training).
    Returns:
        ``[B, ceil(H / s_h), ceil(W / s_w), C_out]``, the same values as
        ``keras.ops.conv(x, kernel, strides, padding="same")`` up to float summation order.
        Three forms differ from that call where XLA compiles it for a CPU: outputs smaller than
        the kernel are one matmul (:func:`conv2d_same_as_matmul`; see
        :func:`small_conv_as_matmul`), float32 3×3 convolutions with stride 1 on outputs of
        8×8 or more use Winograd's F(2×2, 3×3) (:mod:`keras_etsdm.winograd`; see
        ``winograd.applies``), and on JAX CPU with YNNPACK convolutions the stride-1
        kernel gradient is one ``[B·H·W, C_in]ᵀ × [B·H·W, C_out]`` matmul per kernel tap.
    """
    strides = _pair(strides)
    if small_conv_as_matmul(x.shape, kernel.shape, strides):
        return conv2d_same_as_matmul(x, kernel, strides)
    if winograd and winograd_module.applies(x.shape, kernel.shape, strides, x.dtype,
                                            _xla_cpu_context()):
        return winograd_module.conv3x3_same(keras.ops.convert_to_tensor(x),
                                            keras.ops.convert_to_tensor(kernel))
    if strides != (1, 1) or backend_name() != "jax" or not _per_tap_kernel_gradient():
        return keras.ops.conv(x, kernel, strides=strides, padding="same")
    return _jax_conv2d_same()(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(kernel))


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


# ----- "same" convolutions with outputs smaller than the kernel, as one matmul ----------------
# XLA's CPU convolution is slow far out of proportion to the work where the output is smaller than
# the kernel (a 3×3 kernel on a 1×1 or 2×2 output). jaxlib 0.10.2, AVX-512 CPU, batch 8, 512 → 512
# channels (benchmarks/small_conv.py, benchmarks/results/small_conv/): 3×3 on 2×2, forward 67.9 ms
# (2 GFLOP/s) and forward + backward 141.7 ms, against 2.1 / 4.3 ms as one matmul; stride 2 on a 4×4
# input (2×2 output), forward + backward 82.2 vs 4.1 ms; forward + backward 3.0–32.5× as fast over
# 12 such shapes; TensorFlow under XLA alike (68.9 / 166.5 vs 3.6 / 8.0 ms). The DDPM 256 U-Net
# (gin/lsun.gin) run at 32² (levels down to 1×1) gains 3.9× in its forward pass and 2.7× in its
# training step. With 4×4 outputs the two forms are within 0.88–1.51× of each other at batch 8 (both
# backends) and 0.90–1.09× at batch 32, so the matmul form is used only below. Without XLA
# TensorFlow's oneDNN convolutions are not slow there (the matmul form's forward + backward took up
# to 1.7× as long), so they are kept.
# Module flag for A/B measurements (read at trace time): False keeps XLA's convolution.
SMALL_CONV_AS_MATMUL = True


def small_conv_as_matmul(input_shape, kernel_shape, strides=1):
    """Whether :func:`conv2d_same` computes a convolution of these static shapes as one matmul.

    True when :data:`SMALL_CONV_AS_MATMUL` is on, the input's height and width are known, the
    output (``ceil(H / s)`` × ``ceil(W / s)``) is smaller than the kernel in either dimension,
    and XLA compiles the call for a CPU: JAX on its CPU backend, or TensorFlow inside an
    XLA-compiled function (``jit_compile=True``) with no GPU visible.
    """
    height, width = input_shape[1], input_shape[2]
    if not SMALL_CONV_AS_MATMUL or height is None or width is None:
        return False
    s_h, s_w = _pair(strides)
    out_h, out_w = -(-height // s_h), -(-width // s_w)
    if out_h >= kernel_shape[0] and out_w >= kernel_shape[1]:
        return False
    return _xla_cpu_context()


def _xla_cpu_context():
    if backend_name() == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend_name() == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        graph = tf.compat.v1.get_default_graph()
        return (control_flow_util.GraphOrParentsInXlaContext(graph)
                and not tf.config.list_logical_devices("GPU"))
    return False


def _same_padding(size, kernel_size, stride):
    """Keras / TensorFlow "same" padding along one axis: ``(output size, before, after)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return out, total // 2, total - total // 2


def conv2d_same_as_matmul(x, kernel, strides=1):
    """``keras.ops.conv(x, kernel, strides, padding="same")`` as one matmul of the input's
    patches (im2col) with the kernel, for static H and W; backend-neutral ``keras.ops``.

    Kernel taps that read only padding for every output pixel are left out (a 3×3 kernel on a
    1×1 input is its centre tap: a plain matmul). Meant for small outputs, where the patches
    ``[B, H_out, W_out, taps·C_in]`` are small.

    Args:
        x: ``[B, H, W, C_in]`` with static H and W.
        kernel: ``[kh, kw, C_in, C_out]``.
        strides: an int or a pair.
    Returns:
        ``[B, ceil(H / s_h), ceil(W / s_w), C_out]``.
    """
    _, height, width, c_in = x.shape
    k_h, k_w, _, c_out = kernel.shape
    s_h, s_w = _pair(strides)
    out_h, top, bottom = _same_padding(height, k_h, s_h)
    out_w, left, right = _same_padding(width, k_w, s_w)
    # tap i reads input rows i - top + s·o for outputs o: keep it if any of them is inside
    rows = [i for i in range(k_h) if any(0 <= i - top + s_h * o < height for o in range(out_h))]
    cols = [j for j in range(k_w) if any(0 <= j - left + s_w * o < width for o in range(out_w))]
    padded = keras.ops.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = [padded[:, i:i + s_h * (out_h - 1) + 1:s_h, j:j + s_w * (out_w - 1) + 1:s_w, :]
               for i in rows for j in cols]
    patches = patches[0] if len(patches) == 1 else keras.ops.concatenate(patches, axis=-1)
    # rows / cols are contiguous: each output's taps form a window of H consecutive taps, and
    # with two or more outputs (H > s) the windows of neighbouring outputs overlap
    taps = kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return keras.ops.matmul(patches, keras.ops.reshape(taps, (len(rows) * len(cols) * c_in,
                                                              c_out)))


@functools.cache
def _jax_conv2d_same():
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.custom_vjp
    def conv_same(x, kernel):
        return conv(x, kernel)

    def forward(x, kernel):
        return conv(x, kernel), (x, kernel)

    def backward(residuals, grad):
        x, kernel = residuals
        kh, kw, c_in, c_out = kernel.shape
        _, height, width, _ = x.shape
        (grad_x,) = jax.vjp(lambda x_: conv(x_, kernel), x)[1](grad)
        padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        grad_2d = grad.reshape(-1, c_out)
        taps = [lax.dot_general(padded[:, i:i + height, j:j + width, :].reshape(-1, c_in),
                                grad_2d, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
                for i in range(kh) for j in range(kw)]
        grad_kernel = jnp.stack(taps).reshape(kh, kw, c_in, c_out).astype(kernel.dtype)
        return grad_x, grad_kernel

    conv_same.defvjp(forward, backward)
    return conv_same


# ----- vector-Jacobian products (the likelihood's divergence) ---------------------------------
def vector_jacobian_products(fn, x, cotangents):
    """``fn(x)`` and ``vᵀ ∂fn/∂x`` for each cotangent ``v``, by reverse-mode autodiff.

    The Hutchinson divergence ``E[vᵀ J v]`` of ``evaluation/likelihood.py`` needs one VJP per
    probe; this is the only place that touches the backends' autodiff for it. Works inside
    ``jax.jit`` and ``tf.function(jit_compile=True)``.

    Args:
        fn: a pure ``keras.ops`` function of one tensor, ``x [B, ...] -> y`` (shape of ``x``).
        x: the point ``[B, ...]``.
        cotangents: a list of K tensors of ``y``'s shape.
    Returns:
        ``(y, [vᵀJ for v in cotangents])``, each ``vᵀJ`` of ``x``'s shape. ``fn`` runs once.
    """
    name = backend_name()
    if name == "jax":
        import jax

        y, pullback = jax.vjp(fn, x)
        return y, [pullback(v)[0] for v in cotangents]
    if name == "tensorflow":
        import tensorflow as tf

        # A persistent tape: K backward passes over one forward pass.
        with tf.GradientTape(persistent=len(cotangents) > 1) as tape:
            tape.watch(x)
            y = fn(x)
        products = [tape.gradient(y, x, output_gradients=v) for v in cotangents]
        del tape
        return y, products
    raise NotImplementedError(f"vector_jacobian_products supports the jax and tensorflow "
                              f"backends, not {name!r}.")
