"""Backend-specific pieces of the sampling loop: compilation and stateless step noise.

This is the only module of ``keras_etsdm.samplers`` that imports jax or tensorflow (lazily, inside
functions). Everything a sampler computes is written in ``keras.ops``; here it is only wrapped:

* JAX: ``jax.jit``. For a ``DiffusionModel`` the network's weights are passed as ARGUMENTS
  (``network.stateless_call`` with the trainable / non-trainable values), never closed over, so a
  weight update (training, an EMA swap) reuses the compiled loop instead of baking stale
  constants into it or retracing.
* TensorFlow: ``tf.function`` with XLA (``jit_compile=True``: the U-Net's group norm, attention
  and convolutions all compile) on GPUs / TPUs, most CPUs, and any CPU for networks whose 3×3
  convolutions XLA runs by Winograd's algorithm (``keras_etsdm.winograd``); without XLA
  (TensorFlow's graph with its oneDNN kernels) for other networks on AVX-512 CPUs, where that
  measured faster (``backend.default_sample_jit_compile``; ``KERAS_ETSDM_SAMPLE_JIT_COMPILE=1``
  / ``0`` forces it). Variables are read inside the function, so EMA swaps are seen without
  retracing.

Step noise for stochastic samplers is drawn statelessly from an int32 ``[2]`` seed folded with
the step index, so the loop stays a pure function of its inputs. The two backends use different
random-number algorithms: the same seed gives different (equally valid) noise on JAX and on
TensorFlow. On TensorFlow, XLA-compiled and uncompiled loops (and so an exported SavedModel and
the library on an AVX-512 CPU) draw the same noise up to float rounding (≤ 5e-7). Pass explicit
step noise for bit-comparable runs across backends.
"""

import math

import keras

from keras_etsdm import backend as etsdm_backend
from keras_etsdm.model import DiffusionModel


def stateless_normal(shape, seed, step, dtype="float32"):
    """Standard normal noise of ``shape`` from an int ``[2]`` ``seed`` folded with ``step``.

    Pure (no state): the same ``(seed, step)`` always gives the same noise on one backend.
    """
    name = etsdm_backend.backend_name()
    if name == "jax":
        import jax
        import jax.numpy as jnp

        key = jnp.asarray(seed).astype(jnp.uint32)
        key = jax.random.fold_in(key, jnp.asarray(step).astype(jnp.uint32))
        return jax.random.normal(key, shape, dtype=dtype)
    if name == "tensorflow":
        import tensorflow as tf

        seed = tf.cast(seed, tf.int32)
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(step, tf.int32), alg="philox")
        # TensorFlow's XLA and non-XLA kernels agree on philox's raw bits (and on fold_in) but
        # turn them into different floats (stateless_uniform / stateless_normal differ by O(1)
        # for one seed), so the library's loops (no XLA on AVX-512 CPUs) and an exported
        # SavedModel (XLA) would draw different noise. So: raw bits, mapped to normals here
        # (Box-Muller on 24-bit uniforms in (0, 1); |z| ≤ 5.9; XLA and non-XLA within 5e-7).
        bits = tf.random.stateless_uniform((2,) + tuple(shape), seed=seed, minval=None,
                                           maxval=None, dtype=tf.uint32, alg="philox")
        uniform = (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * 2.0 ** -24
        radius = tf.sqrt(-2.0 * tf.math.log(uniform[0]))
        return tf.cast(radius * tf.cos((2.0 * math.pi) * uniform[1]), dtype)
    raise NotImplementedError(f"Stochastic samplers support the jax and tensorflow backends, "
                              f"not {name!r}.")


def bound_model(denoiser):
    """The ``DiffusionModel`` behind a denoiser (the model itself, or a wrapper's ``.model``
    such as ``ClassifierFreeGuidance``), or None for a plain callable."""
    if isinstance(denoiser, DiffusionModel):
        return denoiser
    model = getattr(denoiser, "model", None)
    return model if isinstance(model, DiffusionModel) else None


def denoise_callable(denoiser):
    """``(x, t, **conditioning) -> eps`` for a denoiser: a model's ``denoise`` (THE seam), a
    wrapper's or a plain callable's ``__call__``."""
    return denoiser.denoise if isinstance(denoiser, DiffusionModel) else denoiser


def _bind(denoise, conditioning):
    if not conditioning:
        return denoise
    return lambda x, t: denoise(x, t, **conditioning)


class CompiledSegment:
    """A compiled ``segment(tables, carry, extra, conditioning, start, stop) -> carry``.

    ``make_segment(denoise_fn)`` must return a pure function ``(tables, carry, extra, start,
    stop) -> carry`` written in ``keras.ops``; it is traced once per input shape signature (the
    coefficient tables are inputs, so other tables of the same shape reuse the trace).
    ``conditioning`` is a dict of tensors (class labels, guidance scale) handed to the denoiser
    at every NFE as keyword arguments; being inputs, new labels do not retrace. ``traces``
    counts the traces (used by tests to prove that a second call does not retrace).

    Every network evaluation goes through ``denoise_callable(denoiser)`` — for a model, its
    ``denoise``. On JAX, when a ``DiffusionModel`` is behind the denoiser, all of the model's
    variables are ARGUMENTS of the jitted function, mapped onto the model by a
    ``keras.StatelessScope`` (as export does), so ``denoise`` itself runs statelessly inside
    ``jax.jit`` and a weight update or EMA swap reuses the compiled loop.
    """

    def __init__(self, make_segment, denoiser):
        self.traces = 0
        self.jit_compile = True  # jax.jit; TensorFlow: see below
        self._denoiser = denoiser  # strong reference: keeps the cache key's id() valid
        name = etsdm_backend.backend_name()
        model = bound_model(denoiser)
        denoise = denoise_callable(denoiser)
        if name == "jax":
            import jax

            if model is not None:
                variables = list(model.variables)

                def fn(values, tables, carry, extra, conditioning, start, stop):
                    self.traces += 1
                    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                        segment = make_segment(_bind(denoise, conditioning))
                        return segment(tables, carry, extra, start, stop)

                # first call: compile, give the compiler's freed memory back, then run
                jitted = etsdm_backend.compile_then_release(jax.jit(fn))

                def call(tables, carry, extra, conditioning, start, stop):
                    return jitted([v.value for v in variables], tables, carry, extra,
                                  conditioning, start, stop)
            else:
                def fn(tables, carry, extra, conditioning, start, stop):
                    self.traces += 1
                    segment = make_segment(_bind(denoise, conditioning))
                    return segment(tables, carry, extra, start, stop)

                call = etsdm_backend.compile_then_release(jax.jit(fn))
        elif name == "tensorflow":
            import tensorflow as tf

            def fn(tables, carry, extra, conditioning, start, stop):
                self.traces += 1
                segment = make_segment(_bind(denoise, conditioning))
                return segment(tables, carry, extra, start, stop)

            # XLA compiles the whole loop, U-Net included (checked in the tests), except on CPUs
            # where TensorFlow's own graph with its oneDNN kernels measured faster for this
            # network (backend.default_sample_jit_compile). Variables are read inside the
            # function, so EMA swaps are seen without retracing.
            self.jit_compile = etsdm_backend.default_sample_jit_compile(
                network=None if model is None else model.network)
            # first call: trace and compile, run, then give the freed memory back
            call = etsdm_backend.run_then_release(
                tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=False))
        else:
            # Other backends (torch): run eagerly; still correct, just not compiled.
            def call(tables, carry, extra, conditioning, start, stop):
                self.traces += 1
                segment = make_segment(_bind(denoise, conditioning))
                return segment(tables, carry, extra, start, stop)
        self._call = call

    def __call__(self, tables, carry, extra, start, stop, conditioning=None):
        start = keras.ops.convert_to_tensor(start, dtype="int32")
        stop = keras.ops.convert_to_tensor(stop, dtype="int32")
        return self._call(tables, carry, extra, dict(conditioning or {}), start, stop)


def compiled_denoiser(denoiser):
    """``fn(x, t, **conditioning) -> eps`` compiled once per input signature, through the same
    path as the sampling loops (a model's ``denoise``; stateless weights on JAX). For
    diagnostics that evaluate the network outside a sampler (``bin/lipschitz``)."""

    def make_segment(denoise_fn):
        def segment(tables, carry, extra, start, stop):
            x, t = carry
            return (denoise_fn(x, t), t)

        return segment

    compiled = CompiledSegment(make_segment, denoiser)

    def fn(x, t, **conditioning):
        x = keras.ops.convert_to_tensor(x, dtype="float32")
        t = keras.ops.convert_to_tensor(t, dtype="float32")
        eps, _ = compiled({}, (x, t), None, 0, 1, conditioning)
        return eps

    fn.compiled = compiled
    return fn
