"""The U-Net: published parameter counts, configs, serialisation, shape errors."""

import numpy as np
import pytest

import keras
from keras_etsdm import layers as etsdm_layers
from keras_etsdm.unet import DDPM_256, DDPM_CIFAR10, build_unet


def test_ddpm_cifar10_parameter_count():
    # Ho et al. 2020: 35.7 M parameters (diffusers' UNet2DModel in this config: 35.75 M).
    count = build_unet(**DDPM_CIFAR10).count_params()
    assert count == 35_746_307  # diffusers' UNet2DModel in this configuration: the same


def test_ddpm_256_parameter_count():
    # Ho et al. 2020: about 114 M for the LSUN / CelebA-HQ 256 model.
    count = build_unet(**DDPM_256).count_params()
    # diffusers 0.42.1 UNet2DModel with google/ddpm-church-256's configuration (widths
    # 128-128-256-256-512-512, 2 blocks, attention at 16 px): 113,673,219, counted with torch.
    assert count == 113_673_219


def randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype("float32")
                       if w.ndim > 1 else rng.normal(0, 0.02, w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


@pytest.mark.parametrize("options", [
    dict(),
    dict(use_scale_shift_norm=True, resblock_updown=True, num_heads=2),
])
def test_save_load_gives_identical_outputs(tmp_path, options):
    net = randomize(build_unet(image_size=8, channels=3, base_channels=8, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,), dropout=0.1,
                               **options))
    x = np.random.RandomState(1).normal(size=(2, 8, 8, 3)).astype("float32")
    t = np.array([3.0, 512.5], np.float32)
    out = keras.ops.convert_to_numpy(net({"x": x, "t": t}))
    assert np.abs(out).max() > 1e-3
    path = tmp_path / "net.keras"
    net.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again({"x": x, "t": t})), out)
    assert [l.name for l in again.layers] == [l.name for l in net.layers]


def test_scale_shift_changes_parameter_count_as_expected():
    kwargs = dict(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                  num_res_blocks=1, attention_resolutions=())
    plain = build_unet(**kwargs).count_params()
    film = build_unet(use_scale_shift_norm=True, **kwargs).count_params()
    emb = 32
    # Two ResBlocks on the way down/up plus two in the middle, each with an extra Dense(emb→C).
    n_blocks = 1 + 2 + 2
    assert film - plain == n_blocks * (emb * 8 + 8)


def test_image_size_must_divide():
    with pytest.raises(ValueError, match="not divisible by 8"):
        build_unet(image_size=20, base_channels=8, channel_mult=(1, 2, 2, 2))


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                   attention_resolutions=(8,), num_heads=3)


def test_group_count():
    assert etsdm_layers.num_groups(128) == 32
    assert etsdm_layers.num_groups(256) == 32
    assert etsdm_layers.num_groups(96) == 24
    assert etsdm_layers.num_groups(64) == 16
    assert etsdm_layers.num_groups(32) == 8
    assert etsdm_layers.num_groups(8) == 2
    assert etsdm_layers.num_groups(3) == 1


def test_small_unet_depends_on_t_without_scale_shift():
    # Regression: with one channel per GroupNorm group the additive time embedding was
    # normalised away and a 32-channel U-Net ignored t entirely.
    net = randomize(build_unet(image_size=8, channels=1, base_channels=32, channel_mult=(1,),
                               num_res_blocks=1, attention_resolutions=(), dropout=0.0))
    x = np.random.RandomState(2).normal(size=(2, 8, 8, 1)).astype("float32")
    out_a = keras.ops.convert_to_numpy(net({"x": x, "t": np.array([60.0, 60.0], "float32")}))
    out_b = keras.ops.convert_to_numpy(net({"x": x, "t": np.array([120.0, 120.0], "float32")}))
    assert np.abs(out_a - out_b).max() > 1e-2 * np.abs(out_a).max()


def test_sinusoidal_embedding_values():
    emb = keras.ops.convert_to_numpy(etsdm_layers.sinusoidal_embedding(np.array([0.0, 2.0]), 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(2 * freqs), np.cos(2 * freqs)]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("per_tap", [True, None], ids=["per_tap", "auto"])
@pytest.mark.parametrize("kernel_size,c_in,c_out", [(3, 6, 8), (1, 8, 4), (3, 8, 8)])
def test_conv_layer_matches_keras_conv_in_value_and_gradient(kernel_size, c_in, c_out, per_tap,
                                                            monkeypatch):
    # etsdm_layers.Conv2D can take its own kernel gradient on JAX (one matmul per tap, forced
    # here, or chosen automatically); it must be the gradient of keras' convolution, for the
    # input and the kernel.
    from keras_etsdm import backend as etsdm_backend

    monkeypatch.setattr(etsdm_backend, "FAST_CONV_KERNEL_GRAD", per_tap)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, c_in)).astype("float32")
    kernel = rng.standard_normal((kernel_size, kernel_size, c_in, c_out)).astype("float32")
    cotangent = rng.standard_normal((2, 5, 7, c_out)).astype("float32")

    def value_and_grads(fn):
        x_var, k_var = keras.Variable(x), keras.Variable(kernel)
        loss = lambda: keras.ops.sum(fn(x_var, k_var) * cotangent)  # noqa: E731
        if keras.backend.backend() == "jax":
            import jax

            value, (gx, gk) = jax.value_and_grad(
                lambda a, b: keras.ops.sum(fn(a, b) * cotangent), argnums=(0, 1))(
                    x_var.value, k_var.value)
        else:
            import tensorflow as tf

            with tf.GradientTape() as tape:
                value = loss()
            gx, gk = tape.gradient(value, [x_var.value, k_var.value])
        return [np.asarray(keras.ops.convert_to_numpy(v)) for v in (value, gx, gk)]

    ours = value_and_grads(etsdm_backend.conv2d_same)
    reference = value_and_grads(lambda a, b: keras.ops.conv(a, b, padding="same"))
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)

    layer = etsdm_layers.Conv2D(c_out, kernel_size, padding="same")
    plain = keras.layers.Conv2D(c_out, kernel_size, padding="same")
    layer.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                               keras.ops.convert_to_numpy(plain(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,groups", [(32, 8), (64, 16), (12, 3)])
def test_group_norm_matches_keras_group_normalization(channels, groups):
    """The faster channels-last GroupNorm computes keras.layers.GroupNormalization's values."""
    from keras_etsdm.layers import GroupNorm

    rng = np.random.default_rng(channels)
    x = (rng.normal(size=(3, 5, 7, channels)) * 3 + 1).astype("float32")
    ours = GroupNorm(groups=groups, epsilon=1e-5)
    reference = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5)
    ours.build(x.shape)
    reference.build(x.shape)
    gamma = rng.normal(1, 0.2, channels).astype("float32")
    beta = rng.normal(0, 0.2, channels).astype("float32")
    for layer in (ours, reference):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)),
                               keras.ops.convert_to_numpy(reference(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_keras_dot_product_attention(heads):
    """AttentionBlock = x + proj(softmax(q kᵀ/√d) v) over GN(x), as keras.ops computes it."""
    from keras_etsdm.layers import AttentionBlock

    rng = np.random.default_rng(heads)
    b, h, w, c = 2, 4, 4, 16
    x = rng.normal(size=(b, h, w, c)).astype("float32")
    block = AttentionBlock(heads)
    block.build(x.shape)
    for weight in block.weights:  # the output projection starts at zero: randomise it all
        weight.assign(rng.normal(0, 0.3, weight.shape).astype("float32"))
    normed = keras.ops.reshape(block.norm(x), (b, h * w, c))
    q, k, v = keras.ops.split(block.qkv(normed), 3, axis=-1)

    def split(a):  # [B, L, C] -> [B, L, heads, d], the layout dot_product_attention takes
        return keras.ops.reshape(a, (b, h * w, heads, c // heads))

    attended = keras.ops.dot_product_attention(split(q), split(k), split(v))
    expected = x + keras.ops.reshape(block.proj(keras.ops.reshape(attended, (b, h * w, c))),
                                     (b, h, w, c))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)),
                               keras.ops.convert_to_numpy(expected), atol=1e-5, rtol=1e-5)


def _value_and_grads(fn, x, kernel, cotangent):
    """``sum(fn(x, kernel) · cotangent)`` and its gradients in x and kernel, as numpy."""
    if keras.backend.backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(
            lambda a, b: keras.ops.sum(fn(a, b) * cotangent), argnums=(0, 1))(x, kernel)
    else:
        import tensorflow as tf

        x, kernel = tf.constant(x), tf.constant(kernel)
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            value = keras.ops.sum(fn(x, kernel) * cotangent)
        grads = tape.gradient(value, [x, kernel])
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in (value, *grads)]


@pytest.mark.parametrize("height,width,c_in,c_out", [(3, 5, 4, 6), (1, 1, 2, 3), (4, 4, 8, 8)])
def test_subpixel_upsample_conv_equals_upsample_then_conv(height, width, c_in, c_out):
    # the sub-pixel form computes conv3x3_same(nearest_upsample(x)): same values and the same
    # gradients in the input and the kernel, up to float summation order
    rng = np.random.default_rng(height * 10 + width)
    x = rng.standard_normal((2, height, width, c_in)).astype("float32")
    kernel = rng.standard_normal((3, 3, c_in, c_out)).astype("float32")
    cotangent = rng.standard_normal((2, 2 * height, 2 * width, c_out)).astype("float32")
    direct = _value_and_grads(
        lambda a, k: keras.ops.conv(etsdm_layers.nearest_upsample(a), k, padding="same"),
        x, kernel, cotangent)
    subpixel = _value_and_grads(etsdm_layers.upsample_nearest_conv3x3, x, kernel, cotangent)
    for ours, reference in zip(subpixel, direct):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    # and one pixel by hand: output (0, 0) sees zero padding and the upsampled pixels (0..1,
    # 0..1), all copies of x[0, 0], through the kernel's taps (1..2, 1..2)
    corner = keras.ops.convert_to_numpy(etsdm_layers.upsample_nearest_conv3x3(x, kernel))[:, 0, 0]
    np.testing.assert_allclose(corner, x[:, 0, 0] @ kernel[1:, 1:].sum(axis=(0, 1)),
                               rtol=1e-5, atol=1e-5)


def test_subpixel_is_used_from_its_minimum_size_on(monkeypatch):
    size = etsdm_layers.SUBPIXEL_MIN_SIZE
    assert etsdm_layers.subpixel_pays((None, size, size, 4))
    assert not etsdm_layers.subpixel_pays((None, size // 2, size, 4))
    assert not etsdm_layers.subpixel_pays((None, None, None, 4))
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_UPSAMPLE", False)
    assert not etsdm_layers.subpixel_pays((None, size, size, 4))


@pytest.mark.parametrize("block", ["upsample", "resblock_up_same", "resblock_up_wider"])
def test_upsampling_layers_give_the_same_outputs_in_both_forms(block, monkeypatch):
    # Upsample and ResBlock(resample="up") switch to the sub-pixel form at
    # SUBPIXEL_MIN_SIZE; lowered to 1 here so that tiny shapes take it, then compared with
    # the direct form on the same weights (bias and 1x1 skip included)
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_MIN_SIZE", 1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4, 8)).astype("float32")
    emb = rng.standard_normal((2, 16)).astype("float32")
    if block == "upsample":
        layer, inputs = etsdm_layers.Upsample(), x
        layer.build(x.shape)
    else:
        out = 8 if block == "resblock_up_same" else 12
        layer, inputs = etsdm_layers.ResBlock(out, resample="up"), (x, emb)
        layer.build((x.shape, emb.shape))
    layer.set_weights([rng.normal(0, 0.3, w.shape).astype("float32")
                       for w in layer.get_weights()])
    subpixel = keras.ops.convert_to_numpy(layer(inputs))
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_UPSAMPLE", False)
    direct = keras.ops.convert_to_numpy(layer(inputs))
    assert subpixel.shape == direct.shape == (2, 6, 8, layer.compute_output_shape(
        x.shape if block == "upsample" else (x.shape, emb.shape))[-1])
    assert np.abs(direct).max() > 0.1
    np.testing.assert_allclose(subpixel, direct, rtol=1e-5, atol=1e-5)


def test_unet_at_the_subpixel_size_equals_the_direct_form(monkeypatch):
    # a 32x32 U-Net with one upsampling from 16x16: the default takes the sub-pixel form
    net = randomize(build_unet(image_size=32, channels=3, base_channels=8, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=()))
    x = np.random.RandomState(2).normal(size=(2, 32, 32, 3)).astype("float32")
    t = np.array([3.0, 512.5], np.float32)
    assert etsdm_layers.subpixel_pays((None, 16, 16, 16))
    subpixel = keras.ops.convert_to_numpy(net({"x": x, "t": t}))
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_UPSAMPLE", False)
    direct = keras.ops.convert_to_numpy(net({"x": x, "t": t}))
    assert np.abs(direct).max() > 1e-2
    np.testing.assert_allclose(subpixel, direct, rtol=1e-4, atol=1e-5)


def test_subpixel_upsample_under_mixed_bfloat16(monkeypatch):
    # under Keras's mixed_bfloat16 policy the sub-pixel form computes in bfloat16 from the
    # float32 weights, like the direct form: same dtype, values within bfloat16's precision
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_MIN_SIZE", 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 8)).astype("float32")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # as training.train sets it
    try:
        layer = etsdm_layers.Upsample()
        layer.build(x.shape)
    finally:
        keras.config.set_dtype_policy(previous)
    layer.set_weights([rng.normal(0, 0.3, w.shape).astype("float32")
                       for w in layer.get_weights()])
    assert all(w.dtype == "float32" for w in layer.weights)
    subpixel = layer(x)
    monkeypatch.setattr(etsdm_layers, "SUBPIXEL_UPSAMPLE", False)
    direct = layer(x)
    assert keras.backend.standardize_dtype(subpixel.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(direct.dtype) == "bfloat16"
    as_float = lambda t: keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))  # noqa: E731
    np.testing.assert_allclose(as_float(subpixel), as_float(direct), rtol=0.03, atol=0.03)
