"""Winograd F(2×2, 3×3) convolutions (keras_etsdm.winograd) and where the library uses them."""

import numpy as np
import pytest

import keras
from keras_etsdm import backend as etsdm_backend
from keras_etsdm import layers as etsdm_layers
from keras_etsdm import winograd
from keras_etsdm.unet import build_unet
from tests.test_small_conv import value_and_grads


def _float64(matrix):
    return np.array([[float(c) for c in row] for row in matrix], dtype=np.float64)


def test_minimal_filtering_identity_on_one_tile_in_exact_arithmetic():
    # Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the 2×2 valid correlation of a 4×4 tile d with a 3×3
    # kernel g: the matrices are right to float64 round-off (entries 0, ±1, ±1/2).
    b_t, g_m, a_t = _float64(winograd._BT), _float64(winograd._G), _float64(winograd._AT)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
        direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)]
                           for i in range(2)])
        fast = a_t @ ((g_m @ g @ g_m.T) * (b_t @ d @ b_t.T)) @ a_t.T
        np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-12)
    # 16 multiplications per 2×2 outputs instead of 36
    assert b_t.shape == (4, 4) and a_t.shape == (2, 4) and g_m.shape == (4, 3)


@pytest.mark.parametrize("batch,height,width,c_in,c_out", [
    (2, 8, 8, 4, 5), (1, 7, 5, 3, 2), (2, 1, 1, 3, 3), (3, 6, 9, 8, 4), (1, 2, 3, 2, 6),
    (2, 16, 16, 32, 32),
])
@pytest.mark.parametrize("jit", [False, True])
def test_matches_keras_conv_in_value_and_both_gradients(batch, height, width, c_in, c_out,
                                                        jit):
    # Any H, W (odd sizes are padded to whole tiles and cropped); the custom gradient (the
    # input gradient as a Winograd convolution with the turned kernel, the kernel gradient in
    # the transform domain) equals the direct convolution's.
    rng = np.random.default_rng(height * 100 + width * 10 + c_in)
    x = rng.standard_normal((batch, height, width, c_in)).astype("float32")
    kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype("float32")
    cotangent = rng.standard_normal((batch, height, width, c_out)).astype("float32")
    out = winograd.conv3x3_same(keras.ops.convert_to_tensor(x),
                                keras.ops.convert_to_tensor(kernel))
    assert tuple(out.shape) == (batch, height, width, c_out)
    ours = value_and_grads(winograd.conv3x3_same, x, kernel, cotangent, jit=jit)
    reference = value_and_grads(lambda a, b: keras.ops.conv(a, b, padding="same"), x, kernel,
                                cotangent)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out),
                               keras.ops.convert_to_numpy(keras.ops.conv(x, kernel,
                                                                         padding="same")),
                               rtol=1e-5, atol=1e-5)


def test_transforms_and_their_adjoints():
    # <T u, v> = <u, Tᵀ v> for the kernel transform and the output transform (the pieces of
    # the hand-written gradient), in float32 round-off.
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 4, 5)).astype("float32")
    grad_u = rng.standard_normal((16, 4, 5)).astype("float32")
    lhs = np.sum(keras.ops.convert_to_numpy(winograd._kernel_transform(kernel)) * grad_u)
    rhs = np.sum(kernel * keras.ops.convert_to_numpy(
        winograd._kernel_transform_adjoint(keras.ops.convert_to_tensor(grad_u))))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    batch, height, width = 2, 5, 6  # odd height: the last tile row is cropped
    m = rng.standard_normal((16, batch * 3 * 3, 4)).astype("float32")
    grad_y = rng.standard_normal((batch, height, width, 4)).astype("float32")
    lhs = np.sum(keras.ops.convert_to_numpy(
        winograd._output_transform(keras.ops.convert_to_tensor(m), batch, height, width))
        * grad_y)
    rhs = np.sum(m * keras.ops.convert_to_numpy(
        winograd._output_transform_adjoint(keras.ops.convert_to_tensor(grad_y))))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def _padded_tiles(x):
    """float64 reference: ``[B, t_h, t_w, 4, 4, C]``, tile (t, s) tap (i, j) = padded x at
    (2t + i, 2s + j), with "same" padding 1 and zeros to whole tiles."""
    batch, height, width, channels = x.shape
    t_h, t_w = -(-height // 2), -(-width // 2)
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1 + 2 * t_h - height),
                                           (1, 1 + 2 * t_w - width), (0, 0)))
    return np.stack([np.stack([padded[:, i:i + 2 * t_h:2, j:j + 2 * t_w:2]
                               for j in range(4)], axis=3) for i in range(4)], axis=3)


def test_raw_tiles_hold_each_tap_of_every_tile():
    # Row r of the raw tiles (the backward pass's matmul transform reads them) is tap taps[r]
    # of every tile: exact copies.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 6, 3)).astype("float32")  # odd height: padded to 3 tiles
    d, taps = winograd._raw_tiles(keras.ops.convert_to_tensor(x))
    assert sorted(taps) == [(i, j) for i in range(4) for j in range(4)]
    d = keras.ops.convert_to_numpy(d).reshape(16, 2, 3, 3, 3)
    tiles = _padded_tiles(x)
    for row, (i, j) in enumerate(taps):
        np.testing.assert_array_equal(d[row], tiles[:, :, :, i, j])


@pytest.mark.parametrize("transform", ["_input_transform", "_input_transform_by_matmul"])
def test_input_transform_is_bt_d_b_of_every_tile(transform):
    # V[4a + b] = (Bᵀ d B)[a, b] of each tile, by the forward's additions and by the backward
    # pass's matmul of Bᵀ ⊗ Bᵀ; equal to the float64 reference up to float32 round-off.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 7, 4, 5)).astype("float32")
    v = keras.ops.convert_to_numpy(
        getattr(winograd, transform)(keras.ops.convert_to_tensor(x)))
    b_t = _float64(winograd._BT)
    reference = np.einsum("ai,bhwijc,kj->akbhwc", b_t, _padded_tiles(x), b_t)
    np.testing.assert_allclose(v, reference.reshape(16, 2 * 4 * 2, 5), rtol=0, atol=1e-5)


def test_kron_square_is_the_two_sided_product_on_a_flattened_tile():
    # (M ⊗ M) vec(X) = vec(M X Mᵀ), rows of X flattened in order: for Aᵀ (2×4), G (4×3), Bᵀ.
    rng = np.random.default_rng(9)
    for matrix in (winograd._AT, winograd._G, winograd._BT):
        m = _float64(matrix)
        tile = rng.standard_normal((m.shape[1], m.shape[1]))
        np.testing.assert_allclose(winograd._kron_square(matrix) @ tile.reshape(-1),
                                   (m @ tile @ m.T).reshape(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("input_shape,kernel_shape,strides,dtype,xla_cpu,expected", [
    ((8, 8, 8, 128), (3, 3, 128, 128), (1, 1), "float32", True, True),
    ((8, 32, 16, 384), (3, 3, 384, 128), (1, 1), "float32", True, True),
    ((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), "float32", True, False),   # below 128 channels
    ((8, 32, 32, 128), (3, 3, 128, 64), (1, 1), "float32", True, False),
    ((8, 8, 8, 128), (3, 3, 128, 128), (1, 1), "float32", False, False),  # oneDNN / GPU
    ((8, 8, 8, 128), (3, 3, 128, 128), (1, 1), "bfloat16", True, False),  # would round
    ((8, 4, 4, 256), (3, 3, 256, 256), (1, 1), "float32", True, False),  # below 8×8
    ((8, 32, 4, 256), (3, 3, 256, 256), (1, 1), "float32", True, False),
    ((8, 32, 32, 3), (3, 3, 3, 128), (1, 1), "float32", True, False),    # the input conv
    ((8, 32, 32, 128), (3, 3, 128, 3), (1, 1), "float32", True, False),  # the output conv
    ((8, 32, 32, 128), (3, 3, 128, 128), (2, 2), "float32", True, False),
    ((8, 32, 32, 128), (5, 5, 128, 128), (1, 1), "float32", True, False),
    ((8, 32, 32, 128), (1, 1, 128, 128), (1, 1), "float32", True, False),
    ((None, 32, 32, 128), (3, 3, 128, 128), (1, 1), "float32", True, False),
    (("b", 32, 32, 128), (3, 3, 128, 128), (1, 1), "float32", True, False),  # symbolic batch
    ((8, None, None, 128), (3, 3, 128, 128), (1, 1), "float32", True, False),
])
def test_where_it_applies(input_shape, kernel_shape, strides, dtype, xla_cpu, expected):
    assert winograd.applies(input_shape, kernel_shape, strides, dtype, xla_cpu) is expected


def test_a_symbolic_batch_keeps_the_direct_form():
    # The SavedModel export traces JAX with a symbolic batch "b" (jax2tf polymorphic shapes)
    # and TensorFlow with batch None: both keep the direct convolution, so exports stay portable.
    if keras.backend.backend() == "jax":
        import jax

        batch = jax.export.symbolic_shape("b")[0]
    else:
        batch = None
    assert not winograd.applies((batch, 32, 32, 128), (3, 3, 128, 128), (1, 1), "float32", True)


def test_the_switch_turns_it_off(monkeypatch):
    assert winograd.applies((8, 32, 32, 128), (3, 3, 128, 128), (1, 1), "float32", True)
    monkeypatch.setattr(winograd, "WINOGRAD", False)
    assert not winograd.applies((8, 32, 32, 128), (3, 3, 128, 128), (1, 1), "float32", True)


def _spy(monkeypatch):
    """Record the input shapes of Winograd convolutions; lower the channel threshold to 32 so
    that small networks exercise the route."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    calls = []
    original = winograd.conv3x3_same
    monkeypatch.setattr(winograd, "conv3x3_same",
                        lambda x, k: calls.append(tuple(x.shape)) or original(x, k))
    return calls


def test_conv2d_same_uses_it_only_where_xla_compiles_for_a_cpu(monkeypatch):
    # JAX on the CPU compiles every call with XLA; TensorFlow only inside jit_compile=True.
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 8, 32)).astype("float32")
    kernel = (rng.standard_normal((3, 3, 32, 32)) / 17.0).astype("float32")
    reference = keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, padding="same"))
    if keras.backend.backend() == "jax":
        import jax

        out = jax.jit(etsdm_backend.conv2d_same)(x, kernel)
        assert calls == [(2, 8, 8, 32)]
        calls.clear()
        jax.jit(lambda a, b: etsdm_backend.conv2d_same(a, b, winograd=False))(x, kernel)
        assert not calls
    else:
        import tensorflow as tf

        tf.function(etsdm_backend.conv2d_same, jit_compile=False)(x, kernel)
        assert not calls
        out = tf.function(etsdm_backend.conv2d_same, jit_compile=True)(x, kernel)
        assert calls == [(2, 8, 8, 32)]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), reference, rtol=1e-5,
                               atol=1e-5)


@pytest.fixture(scope="module")
def small_unet():
    # 16 px, 32 channels: the 16×16 and 8×8 levels' 3×3 convolutions qualify.
    network = build_unet(image_size=16, channels=3, base_channels=32, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
    rng = np.random.default_rng(0)
    network.set_weights([rng.normal(0, 0.05, w.shape).astype("float32")
                         for w in network.get_weights()])
    return network


def test_unet_prediction_is_unchanged(small_unet, monkeypatch):
    # Inference (predict) traces the network's 3×3 convolutions through the Winograd form
    # under XLA, with the same prediction as the direct form.
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 3)).astype("float32")
    t = np.array([3.0, 700.0], "float32")  # t = 3 lies inside the first sharing piece
    small_unet.jit_compile = True  # TensorFlow: XLA; JAX always compiles with it
    outputs = {}
    for on in (True, False):
        monkeypatch.setattr(winograd, "WINOGRAD", on)
        small_unet.make_predict_function(force=True)
        outputs[on] = small_unet.predict_on_batch({"x": x, "t": t})
        if on:
            sizes = sorted({shape[1] for shape in calls})
            assert sizes == [8, 16] and len(calls) >= 8
        else:
            assert not calls
        calls.clear()
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)


def test_training_step_uses_the_form_with_the_direct_gradients(small_unet, monkeypatch):
    # With winograd.IN_TRAINING (off by default; train(winograd_training=True)) a compiled
    # training step traces the Winograd form and takes the same step as with the direct
    # convolutions: same loss and, with plain SGD, the same updated weights (the update is the
    # gradient itself). winograd.TRAINING_MAX_SIZE keeps the larger levels direct. Without
    # IN_TRAINING the step traces none.
    from keras_etsdm import DiffusionModel

    calls = _spy(monkeypatch)
    x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype("float32")
    start = small_unet.get_weights()
    steps = {}
    # (IN_TRAINING, TRAINING_MAX_SIZE): every qualifying size, the 8×8 level only, none
    for in_training, max_size in ((True, None), (True, 8), (False, None)):
        monkeypatch.setattr(winograd, "IN_TRAINING", in_training)
        monkeypatch.setattr(winograd, "TRAINING_MAX_SIZE", max_size)
        small_unet.set_weights(start)
        model = DiffusionModel(small_unet, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), jit_compile=True)
        loss = model.train_on_batch(x)
        steps[in_training, max_size] = (
            loss, [w - w0 for w, w0 in zip(small_unet.get_weights(), start)])
        sizes = sorted({shape[1] for shape in calls})
        assert sizes == {(True, None): [8, 16], (True, 8): [8], (False, None): []}[
            in_training, max_size]
        calls.clear()
    direct = steps[False, None]
    for setting in ((True, None), (True, 8)):
        np.testing.assert_allclose(steps[setting][0], direct[0], rtol=1e-5)
        for with_form, plain in zip(steps[setting][1], direct[1]):
            np.testing.assert_allclose(with_form, plain, rtol=1e-3,
                                       atol=1e-6 + 1e-4 * np.abs(plain).max())


def test_training_setting_and_the_size_cap(monkeypatch):
    # train(winograd_training=...) → (IN_TRAINING, TRAINING_MAX_SIZE); in_training reads both
    assert winograd.training_setting(False) == (False, None)
    assert winograd.training_setting(None) == (False, None)
    assert winograd.training_setting(True) == (True, None)
    assert winograd.training_setting(16) == (True, 16)
    assert winograd.training_setting(np.int64(8)) == (True, 8)
    for bad in (0, 1, 7, 16.0, "16", -8):
        with pytest.raises(ValueError, match=f"at least {winograd.MIN_SIZE}"):
            winograd.training_setting(bad)
    assert (winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE) == (False, None)  # defaults
    assert not winograd.in_training((8, 8, 8, 128))
    monkeypatch.setattr(winograd, "IN_TRAINING", True)
    assert winograd.in_training((8, 32, 32, 128)) and winograd.in_training((8, None, None, 4))
    monkeypatch.setattr(winograd, "TRAINING_MAX_SIZE", 16)
    assert winograd.in_training((8, 16, 16, 256)) and winograd.in_training((8, 8, 16, 256))
    assert not winograd.in_training((8, 32, 32, 128))
    assert not winograd.in_training((8, 16, 32, 128))  # either side over the cap
    assert not winograd.in_training((8, None, 16, 128))  # unknown size: direct


def test_conv_layer_training_flag(monkeypatch):
    # etsdm_layers.Conv2D under XLA: inference (training False or unset) → the Winograd form;
    # training=True → the direct convolution, or the form while winograd.IN_TRAINING (off by
    # default); the outputs are keras.layers.Conv2D's either way.
    calls = _spy(monkeypatch)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, 32)).astype("float32")
    layer = etsdm_layers.Conv2D(32, 3, padding="same")
    plain = keras.layers.Conv2D(32, 3, padding="same")
    layer.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    expected = keras.ops.convert_to_numpy(plain(x))
    if keras.backend.backend() == "jax":
        import jax

        compile_fn = jax.jit
    else:
        import tensorflow as tf

        def compile_fn(fn):
            return tf.function(fn, jit_compile=True)

    seen = {}
    for training in (True, False, None):
        out = compile_fn(lambda a, training=training: layer(a, training=training))(x)
        seen[training] = len(calls)
        calls.clear()
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, rtol=1e-5,
                                   atol=1e-5)
    assert seen == {True: 0, False: 1, None: 1}
    monkeypatch.setattr(winograd, "IN_TRAINING", True)  # train(winograd_training=True)
    compile_fn(lambda a: layer(a, training=True))(x)
    assert len(calls) == 1
    # winograd.TRAINING_MAX_SIZE caps the training step's sizes (8×8 here), not inference's
    for max_size, expected_calls in ((4, 0), (7, 0), (8, 1), (16, 1)):
        monkeypatch.setattr(winograd, "TRAINING_MAX_SIZE", max_size)
        calls.clear()
        compile_fn(lambda a: layer(a, training=True))(x)
        assert len(calls) == expected_calls, max_size
        calls.clear()
        compile_fn(lambda a: layer(a, training=False))(x)
        assert len(calls) == 1


def test_sampling_loop_runs_the_winograd_form_and_samples_alike(small_unet, monkeypatch):
    # model.sample's compiled loop (jax.jit; on TensorFlow XLA, chosen for a network with
    # such convolutions) goes through the Winograd form and draws the same images as with the
    # direct convolutions.
    from keras_etsdm import DiffusionModel
    from keras_etsdm.samplers import DDIMSampler, base

    calls = _spy(monkeypatch)
    model = DiffusionModel(small_unet, seed=0)
    images = {}
    for on in (True, False):
        monkeypatch.setattr(winograd, "WINOGRAD", on)
        base._COMPILED.clear()  # a new loop, traced with this setting
        sampler = DDIMSampler(num_steps=6, schedule=model.schedule, sharing=model.sharing)
        images[on] = keras.ops.convert_to_numpy(
            model.sample(sampler, num_samples=2, seed=1, use_ema=False))
        if on:  # off, TensorFlow's loop follows the per-ISA rule (no XLA on AVX-512)
            assert sampler.compiled_segment(model).jit_compile is True
        assert bool(calls) is on
        calls.clear()
    np.testing.assert_allclose(images[True], images[False], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="XLA's buffer sizes are read from JAX's compiled function")
def test_backward_pass_recomputes_the_transformed_tiles_instead_of_keeping_them():
    # The gradient recomputes V (the transformed input tiles, 4× the input) from x. Computed
    # the same way as the forward's V, XLA's common-subexpression elimination merged the two
    # and kept every convolution's forward V alive until the backward pass (the CIFAR-10
    # U-Net's training step: 896 instead of 651 MiB of temporaries). On a chain of 6 of
    # them, in units of one V: the saved inputs and tanh outputs (2 × 6 × ¼) plus one
    # convolution's backward transients (its raw tiles and V, since V is recomputed by a
    # matmul of them, and the transformed output gradients: ≤ 5) stay under 8, where the
    # merged form keeps all 6 forward V's. Measured 7.4 with the recomputation (6.2 when it
    # was additions, without the raw tiles) and 10.4 with the merged form (XLA flags as bin/
    # sets them, conftest).
    import jax

    batch, size, channels, count = 8, 16, 64, 6
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, channels)).astype("float32")
    kernels = [0.05 * rng.standard_normal((3, 3, channels, channels)).astype("float32")
               for _ in range(count)]

    def loss(kernels, x):
        for kernel in kernels:
            x = keras.ops.tanh(winograd.conv3x3_same(x, kernel))
        return keras.ops.sum(x * x)

    compiled = jax.jit(jax.grad(loss)).lower(kernels, x).compile()
    tiles_bytes = 16 * batch * (size // 2) ** 2 * channels * 4
    assert compiled.memory_analysis().temp_size_in_bytes / tiles_bytes < 8.5


def test_train_says_when_its_step_uses_the_form(small_unet, monkeypatch):
    # train()'s start line names the form when the step will use it (XLA on a CPU, a network
    # with qualifying convolutions, winograd.IN_TRAINING), with the size cap if any
    from keras_etsdm import training

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    monkeypatch.setattr(winograd, "IN_TRAINING", True)
    note = ", 3×3 convolutions by Winograd's algorithm"
    assert training._winograd_note(small_unet, jit_compile=True) == note
    assert training._winograd_note(small_unet, jit_compile=False) == ""
    monkeypatch.setattr(winograd, "TRAINING_MAX_SIZE", 16)
    assert training._winograd_note(small_unet, jit_compile=True) == note + " up to 16×16"
    monkeypatch.setattr(winograd, "IN_TRAINING", False)
    assert training._winograd_note(small_unet, jit_compile=True) == ""
