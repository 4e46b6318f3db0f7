"""backend.conv2d_same's matmul form for outputs smaller than the kernel (XLA on a CPU)."""

import numpy as np
import pytest

import keras
from keras_etsdm import backend as etsdm_backend
from keras_etsdm import layers as etsdm_layers
from keras_etsdm.unet import build_unet


def value_and_grads(fn, x, kernel, cotangent, jit=False):
    """``sum(fn(x, kernel) · cotangent)`` and its gradients in ``x`` and ``kernel`` (numpy);
    with ``jit`` compiled by XLA (``jax.jit`` / ``tf.function(jit_compile=True)``)."""
    if keras.backend.backend() == "jax":
        import jax

        grad_fn = jax.value_and_grad(lambda a, b: keras.ops.sum(fn(a, b) * cotangent),
                                     argnums=(0, 1))
        value, (gx, gk) = (jax.jit(grad_fn) if jit else grad_fn)(x, kernel)
    else:
        import tensorflow as tf

        def step(a, b):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                value = keras.ops.sum(fn(a, b) * cotangent)
            return (value, *tape.gradient(value, [a, b]))

        step = tf.function(step, jit_compile=True) if jit else step
        value, gx, gk = step(tf.constant(x), tf.constant(kernel))
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in (value, gx, gk)]


@pytest.mark.parametrize("size,kernel_size,strides", [
    ((1, 1), 3, 1), ((2, 2), 3, 1), ((2, 3), 3, 1), ((1, 4), 3, 1), ((4, 4), 3, 1),
    ((2, 2), 5, 1), ((3, 3), 5, 1), ((2, 2), 3, 2), ((3, 3), 3, 2), ((4, 4), 3, 2),
    ((5, 4), 3, 2), ((1, 1), 3, 2), ((5, 5), 3, 3), ((4, 4), 2, 2), ((6, 6), 1, 1),
])
def test_matmul_form_matches_keras_conv_in_value_and_gradient(size, kernel_size, strides):
    # Keras' "same" padding, any stride, taps that read only padding left out: the same
    # values and gradients as keras.ops.conv, up to float summation order.
    rng = np.random.default_rng(sum(size) * 10 + kernel_size + strides)
    c_in, c_out = 5, 4
    x = rng.standard_normal((2, *size, c_in)).astype("float32")
    kernel = rng.standard_normal((kernel_size, kernel_size, c_in, c_out)).astype("float32")
    out_shape = (2, -(-size[0] // strides), -(-size[1] // strides), c_out)
    cotangent = rng.standard_normal(out_shape).astype("float32")
    out = etsdm_backend.conv2d_same_as_matmul(x, kernel, strides)
    assert tuple(out.shape) == out_shape
    ours = value_and_grads(lambda a, b: etsdm_backend.conv2d_same_as_matmul(a, b, strides),
                           x, kernel, cotangent)
    reference = value_and_grads(
        lambda a, b: keras.ops.conv(a, b, strides=strides, padding="same"), x, kernel, cotangent)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_centre_tap_alone_on_a_one_pixel_input():
    # A 3x3 kernel on a 1x1 input reads padding everywhere but its centre: the matmul form
    # is x · kernel[1, 1], and the other taps get exactly zero gradient.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1, 1, 6)).astype("float32")
    kernel = rng.standard_normal((3, 3, 6, 2)).astype("float32")
    out = keras.ops.convert_to_numpy(etsdm_backend.conv2d_same_as_matmul(x, kernel))
    np.testing.assert_allclose(out, np.einsum("bhwc,co->bhwo", x, kernel[1, 1]), rtol=1e-6)
    _, _, grad_kernel = value_and_grads(etsdm_backend.conv2d_same_as_matmul, x, kernel,
                                        np.ones((3, 1, 1, 2), "float32"))
    mask = np.zeros((3, 3, 1, 1), bool)
    mask[1, 1] = True
    assert np.all(np.where(mask, 1.0, grad_kernel) == np.where(mask, 1.0, 0.0))
    np.testing.assert_allclose(grad_kernel[1, 1], np.broadcast_to(x.sum((0, 1, 2))[:, None],
                                                                  (6, 2)), rtol=1e-5)


@pytest.mark.parametrize("size,strides,expected", [
    ((1, 1), 1, True), ((2, 2), 1, True), ((2, 8), 1, True), ((3, 3), 1, False),
    ((4, 4), 1, False), ((4, 4), 2, True), ((5, 5), 2, False), ((8, 8), 2, False),
    ((None, None), 1, False),
])
def test_matmul_form_chosen_for_outputs_smaller_than_the_kernel_under_xla(size, strides,
                                                                          expected):
    # JAX on the CPU: XLA compiles every call. TensorFlow: only inside jit_compile=True.
    shape, kernel_shape = (8, *size, 16), (3, 3, 16, 16)
    if keras.backend.backend() == "jax":
        assert etsdm_backend.small_conv_as_matmul(shape, kernel_shape, strides) is expected
    else:
        import tensorflow as tf

        assert etsdm_backend.small_conv_as_matmul(shape, kernel_shape, strides) is False
        seen = []

        @tf.function(jit_compile=True)
        def compiled(v):
            seen.append(etsdm_backend.small_conv_as_matmul(shape, kernel_shape, strides))
            return v + 1

        @tf.function(jit_compile=False)
        def graph(v):
            seen.append(etsdm_backend.small_conv_as_matmul(shape, kernel_shape, strides))
            return v + 1

        compiled(tf.constant(0.0))
        graph(tf.constant(0.0))
        assert seen == [expected, False]


def test_the_switch_turns_the_matmul_form_off(monkeypatch):
    monkeypatch.setattr(etsdm_backend, "SMALL_CONV_AS_MATMUL", False)
    assert etsdm_backend.small_conv_as_matmul((8, 2, 2, 16), (3, 3, 16, 16)) is False


@pytest.mark.parametrize("strides", [1, 2])
def test_conv_layer_routes_small_convolutions_through_the_seam(strides, monkeypatch):
    # etsdm_layers.Conv2D (stride 1 and the stride-2 downsampling) uses conv2d_same, so under
    # XLA a 2x2 input takes the matmul form; its outputs and gradients stay keras.layers.Conv2D's.
    calls = []
    original = etsdm_backend.conv2d_same_as_matmul
    monkeypatch.setattr(etsdm_backend, "conv2d_same_as_matmul",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    rng = np.random.default_rng(strides)
    x = rng.standard_normal((2, 2, 2, 6)).astype("float32")
    layer = etsdm_layers.Conv2D(4, 3, strides=strides, padding="same")
    plain = keras.layers.Conv2D(4, 3, strides=strides, padding="same")
    layer.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    cotangent = rng.standard_normal(plain.compute_output_shape(x.shape)).astype("float32")
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    ours = value_and_grads(lambda a, k: layer.convolution_op(a, k), x, kernel, cotangent,
                           jit=True)
    assert calls  # traced through the matmul form under XLA
    reference = value_and_grads(lambda a, k: plain.convolution_op(a, k), x, kernel, cotangent)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                               keras.ops.convert_to_numpy(plain(x)), rtol=1e-5, atol=1e-5)


def test_unet_with_a_one_pixel_level_is_unchanged_by_the_matmul_form(monkeypatch):
    # A U-Net whose lowest level is 1x1 (8 px input, four levels): the same prediction under
    # XLA with the matmul form on and off.
    network = build_unet(image_size=8, channels=3, base_channels=8, channel_mult=(1, 1, 2, 2),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    rng = np.random.default_rng(0)
    network.set_weights([rng.normal(0, 0.1, w.shape).astype("float32")
                         for w in network.get_weights()])
    x = rng.standard_normal((2, 8, 8, 3)).astype("float32")
    t = np.array([3.0, 700.0], "float32")
    calls, decisions = [], []
    original = etsdm_backend.conv2d_same_as_matmul
    monkeypatch.setattr(etsdm_backend, "conv2d_same_as_matmul",
                        lambda *a, **k: calls.append(a[0].shape[1:3]) or original(*a, **k))
    decide = etsdm_backend.small_conv_as_matmul
    monkeypatch.setattr(etsdm_backend, "small_conv_as_matmul",
                        lambda *a, **k: decisions.append(1) or decide(*a, **k))
    network.jit_compile = True  # TensorFlow: XLA; JAX always compiles with it
    outputs = {}
    for on in (True, False):
        monkeypatch.setattr(etsdm_backend, "SMALL_CONV_AS_MATMUL", on)
        network.make_predict_function(force=True)
        outputs[on] = network.predict_on_batch({"x": x, "t": t})
        assert decisions  # traced anew with this setting (not a cached trace of the other)
        decisions.clear()
        if on:  # the 2x2 and 1x1 levels' convolutions, the 4x4 → 2x2 and 2x2 → 1x1
            # downsamplings (inputs listed); not the 4x4 level's stride-1 convolutions
            assert {tuple(shape) for shape in calls} == {(1, 1), (2, 2), (4, 4)}
            assert sum(tuple(shape) == (4, 4) for shape in calls) == 1
        else:
            assert not calls
        calls.clear()
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)
