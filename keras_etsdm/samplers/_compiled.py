"""Backend-specific pieces of the sampling loop: compilation and stateless step noise.

This is the only module of ``keras_etsdm.samplers`` that imports jax or tensorflow (lazily, inside
functions). Everything a sampler computes is written in ``keras.ops``; here it is only wrapped:

* JAX: ``jax.jit``. For a ``DiffusionModel`` the network's weights are passed as ARGUMENTS
  (``network.stateless_call`` with the trainable / non-trainable values), never closed over, so a
  weight update (training, an EMA swap) reuses the compiled loop instead of baking stale
  constants into it or retracing.
* TensorFlow: ``tf.function(jit_compile=True)`` (XLA, also on CPU; the U-Net's group norm,
  attention and convolutions all compile). Variables are read inside the function, so EMA swaps
  are seen without retracing.

Step noise for stochastic samplers is drawn statelessly from an int32 ``[2]`` seed folded with
the step index, so the loop stays a pure function of its inputs. The two backends use different
random-number algorithms: the same seed gives different (equally valid) noise on JAX and on
TensorFlow, and on TensorFlow XLA-compiled and uncompiled runs differ too. Pass explicit step
noise for bit-comparable runs across backends or compile modes.
"""

import keras

from keras_etsdm import backend as etsdm_backend


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
        # TensorFlow's XLA kernels produce a different stream than its non-XLA kernels for the
        # same seed (checked for philox); sample() always runs under XLA, so it is reproducible.
        return tf.random.stateless_normal(shape, seed=seed, dtype=dtype, alg="philox")
    raise NotImplementedError(f"Stochastic samplers support the jax and tensorflow backends, "
                              f"not {name!r}.")


def _is_diffusion_model(denoiser):
    from keras_etsdm.model import DiffusionModel

    return isinstance(denoiser, DiffusionModel)


class CompiledSegment:
    """A compiled ``segment(tables, carry, extra, start, stop) -> carry`` for one denoiser.

    ``make_segment(denoise_fn)`` must return a pure function ``(tables, carry, extra, start,
    stop) -> carry`` written in ``keras.ops``; it is traced once per input shape signature (the
    coefficient tables are inputs, so other tables of the same shape reuse the trace). ``traces``
    counts the traces (used by tests to prove that a second call does not retrace).
    """

    def __init__(self, make_segment, denoiser):
        self.traces = 0
        self._denoiser = denoiser  # strong reference: keeps the cache key's id() valid
        name = etsdm_backend.backend_name()
        stateful = _is_diffusion_model(denoiser)
        if name == "jax":
            import jax

            if stateful:
                network, sharing = denoiser.network, denoiser.sharing

                def fn(trainable, non_trainable, tables, carry, extra, start, stop):
                    self.traces += 1

                    def denoise(x, t):
                        out, _ = network.stateless_call(
                            trainable, non_trainable, {"x": x, "t": sharing(t)}, training=False)
                        return out

                    return make_segment(denoise)(tables, carry, extra, start, stop)

                jitted = jax.jit(fn)

                def call(tables, carry, extra, start, stop):
                    return jitted([v.value for v in network.trainable_variables],
                                  [v.value for v in network.non_trainable_variables],
                                  tables, carry, extra, start, stop)
            else:
                def fn(tables, carry, extra, start, stop):
                    self.traces += 1
                    return make_segment(denoiser)(tables, carry, extra, start, stop)

                call = jax.jit(fn)
        elif name == "tensorflow":
            import tensorflow as tf

            denoise = denoiser.denoise if stateful else denoiser

            def fn(tables, carry, extra, start, stop):
                self.traces += 1
                return make_segment(denoise)(tables, carry, extra, start, stop)

            # XLA compiles the whole loop, U-Net included, on CPU and GPU (checked in the tests).
            call = tf.function(fn, jit_compile=True, reduce_retracing=False)
        else:
            # Other backends (torch): run eagerly; still correct, just not compiled.
            denoise = denoiser.denoise if stateful else denoiser

            def call(tables, carry, extra, start, stop):
                self.traces += 1
                return make_segment(denoise)(tables, carry, extra, start, stop)
        self._call = call

    def __call__(self, tables, carry, extra, start, stop):
        start = keras.ops.convert_to_tensor(start, dtype="int32")
        stop = keras.ops.convert_to_tensor(stop, dtype="int32")
        return self._call(tables, carry, extra, start, stop)
