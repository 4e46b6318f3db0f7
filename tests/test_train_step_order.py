"""The JAX training step's weight update ordered after every gradient (``backend.jax_train_step``):
values exactly as Keras's own step computes them, and XLA then updates the donated weights in
place instead of copying them (issue 19: plain Adam's step copied all 136 MiB of the CIFAR-10
U-Net's weights every step)."""

import re

import numpy as np
import pytest

import keras

import keras_etsdm as ke
from keras_etsdm import backend as etsdm_backend

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="the ordered step is JAX's")


def small_unet():
    return ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)


def images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype("float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_after_all_gradients_changes_no_value(dtype):
    special = np.array([0.0, -0.0, 1.5, -2.25, 3e38, -3e38, 1.2e-38, np.inf, -np.inf, np.nan],
                       dtype="float32")
    rng = np.random.default_rng(0)
    cases = [  # the probe (first elements' sum) finite, +inf, NaN
        [rng.normal(size=(3, 4)), special, None],
        [np.array([np.inf, 1.0]), special, rng.normal(size=(5,))],
        [np.array([np.nan, 1.0]), special, None, rng.normal(size=(2, 2, 2))],
    ]
    for grads in cases:
        tensors = [None if g is None else keras.ops.convert_to_tensor(np.asarray(g, "float32"),
                                                                      dtype=dtype)
                   for g in grads]
        out = etsdm_backend.after_all_gradients(tensors)
        assert len(out) == len(tensors)
        for g, o in zip(tensors, out):
            if g is None:
                assert o is None
                continue
            assert keras.backend.standardize_dtype(o.dtype) == dtype
            want = keras.ops.convert_to_numpy(keras.ops.cast(g, "float32"))
            got = keras.ops.convert_to_numpy(keras.ops.cast(o, "float32"))
            np.testing.assert_array_equal(got, want)  # NaN where NaN, ±inf and -0.0 kept
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert etsdm_backend.after_all_gradients([None]) == [None]


def _trained_weights(ordered, steps=3):
    old = etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS
    etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS = ordered
    try:
        keras.utils.set_random_seed(0)
        model = ke.DiffusionModel(small_unet(), ema_decay=0.9, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        x = images(8 * steps)
        losses = [float(model.train_on_batch(x[8 * i:8 * i + 8])) for i in range(steps)]
        return losses, [keras.ops.convert_to_numpy(v.value) for v in model.variables]
    finally:
        etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS = old


@jax_only
def test_ordered_step_trains_exactly_like_keras_step():
    losses, weights = _trained_weights(ordered=True)
    keras_losses, keras_weights = _trained_weights(ordered=False)
    assert losses == keras_losses
    assert len(weights) == len(keras_weights)
    for w, k in zip(weights, keras_weights):  # weights, Adam's moments, EMA, counters
        np.testing.assert_array_equal(w, k)


def _parameter_copies(hlo_text):
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(\d+\)", entry))
    return [op for op in re.findall(r" copy\(%([\w.\-]+)\)", entry) if op in params]


def _compiled_step_text(ordered):
    import jax

    old = etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS
    etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS = ordered
    try:
        keras.utils.set_random_seed(0)
        model = ke.DiffusionModel(small_unet(), ema_decay=0.9, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        x = images()
        model.train_on_batch(x)  # builds the optimizer and metrics
        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 [v.value for v in model.optimizer.variables],
                 [v.value for v in model.metrics_variables])
        step = jax.jit(model.train_step, donate_argnums=0)
        return step.lower(state, (x,)).compile().as_text()
    finally:
        etsdm_backend.ORDER_UPDATE_AFTER_GRADIENTS = old


@jax_only
def test_ordered_step_updates_the_donated_weights_in_place():
    assert _parameter_copies(_compiled_step_text(ordered=False))  # Keras's step: copies
    assert _parameter_copies(_compiled_step_text(ordered=True)) == []
