"""DiffusionModel: the denoise seam, training with fit, EMA, RNG, save/load, errors."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras
from keras import layers, ops

import keras_etsdm as ke

BACKEND = keras.backend.backend()


def tiny_unet(channels=1, size=8, dropout=0.0):
    return ke.build_unet(image_size=size, channels=channels, base_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), dropout=dropout)


def fit_unet():
    """A one-level U-Net without attention for the tests that train: what they check (loss,
    EMA, RNG, tf.data, the non-finite guard) does not depend on the network, and compiling its
    train step (XLA also on TensorFlow: ``compile``'s default ``jit_compile="auto"``) takes
    about half as long as tiny_unet's."""
    return ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)


def randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") for w in model.get_weights()])
    return model


def digits(n=128):
    from sklearn.datasets import load_digits
    x = load_digits().images[:n].astype("float32") / 16.0 * 2.0 - 1.0
    return x[..., None]


class Probe(layers.Layer):
    """Stand-in network: channel 0 echoes x_t, channel 1 holds the time condition it received."""

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        t_map = ops.ones_like(x[..., :1]) * ops.reshape(t, (-1, 1, 1, 1))
        return ops.concatenate([x[..., :1], t_map], axis=-1)


def probe_model(sharing):
    x = keras.Input((4, 4, 2), name="x")
    t = keras.Input((), name="t")
    net = keras.Model({"x": x, "t": t}, Probe()({"x": x, "t": t}))
    return ke.DiffusionModel(net, sharing=sharing, seed=3)


def test_denoise_feeds_the_shared_label():
    model = probe_model(ke.TimestepSharing(100, 5))
    x = np.zeros((6, 4, 4, 2), np.float32)
    t = np.array([0, 19, 20, 99.9, 100, 999], np.float32)
    out = ops.convert_to_numpy(model.denoise(x, t))
    np.testing.assert_array_equal(out[:, 0, 0, 1], [0, 0, 20, 80, 100, 999])
    scalar = ops.convert_to_numpy(model.denoise(x, 45.0))
    np.testing.assert_array_equal(scalar[:, 0, 0, 1], [40] * 6)


@pytest.mark.parametrize("sharing", [ke.TimestepSharing(100, 5), ke.TimestepSharing(0, 0)])
def test_training_noises_with_true_t_and_feeds_shared_t(sharing):
    model = probe_model(sharing)
    schedule = model.schedule
    x0 = np.ones((512, 4, 4, 2), np.float32)
    out = model(x0, training=True)
    noise = ops.convert_to_numpy(out["noise"])[:, 0, 0, 0].astype(np.float64)
    x_t = ops.convert_to_numpy(out["noise_pred"])[:, 0, 0, 0].astype(np.float64)
    t_cond = ops.convert_to_numpy(out["noise_pred"])[:, 0, 0, 1]
    # Recover the true t from x_t = α_t·1 + σ_t·ε: the label whose (α, σ) explains x_t best.
    residual = np.abs(schedule.alphas[None] + schedule.sigmas[None] * noise[:, None] - x_t[:, None])
    t_true = residual.argmin(axis=1)
    np.testing.assert_allclose(residual.min(axis=1), 0, atol=1e-5)
    np.testing.assert_array_equal(t_cond, ops.convert_to_numpy(sharing(t_true.astype("float32"))))
    if sharing.enabled:
        early = t_true < 100
        assert early.sum() > 10 and np.any(t_true[early] != t_cond[early])
    assert len(np.unique(t_true)) > 300  # t ~ U{0..999}


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained a few epochs on 8x8 digits (shared by several tests)."""
    model = ke.DiffusionModel(fit_unet(), ema_decay=0.9, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    x = digits(256)
    history = model.fit(x, batch_size=32, epochs=6, verbose=0, shuffle=False)
    return model, history.history["loss"]


def test_loss_decreases(trained):
    _, losses = trained
    assert losses[-1] < 0.7 * losses[0], losses


def test_seed_generator_advances_every_step(trained):
    model, _ = trained
    state = ops.convert_to_numpy(model.seed_generator.state.value)
    steps = 6 * 256 // 32
    # Each step draws t and ε: two ordered draws.
    assert int(state[1]) == 2 * steps, state
    assert float(ops.convert_to_numpy(model.ema_updates.value)) == steps


@pytest.fixture(scope="module")
def fit_model():
    """``fresh()``: one compiled model, reset to its state before any training, for the tests
    below that each train a new model: the train step is compiled once, not once per test."""
    model = ke.DiffusionModel(fit_unet(), ema_decay=0.95, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.optimizer.build(model.trainable_variables)
    variables = list(model.variables) + list(model.optimizer.variables)
    initial = [ops.convert_to_numpy(v.value).copy() for v in variables]

    def fresh():
        for v, value in zip(variables, initial):
            v.assign(value)
        return model

    return fresh


def test_first_training_call_traces_the_step_once():
    """On TensorFlow ``compile`` creates the optimizer's slots, so the first ``train_on_batch``
    traces the training step once: a ``tf.function`` that creates variables in its first trace
    (Keras's default without a distribution strategy) is traced a second time."""
    traces = []

    class CountingModel(ke.DiffusionModel):
        def train_step(self, *args, **kwargs):
            traces.append(1)  # Python runs only while the step is traced
            return super().train_step(*args, **kwargs)

    model = CountingModel(fit_unet(), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=BACKEND == "jax")
    assert model.optimizer.built == (BACKEND == "tensorflow")
    x = digits(8)
    first = model.train_on_batch(x)
    model.train_on_batch(x)
    assert len(traces) == 1 and np.isfinite(first)


def test_fit_model_fixture_starts_fresh(fit_model):
    """What the tests sharing ``fit_model`` rely on: every variable is back at its initial value
    (no steps taken, EMA = weights) however the model was trained before."""
    model = fit_model()
    model.fit(digits(16), batch_size=16, epochs=1, verbose=0)
    model = fit_model()
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 0
    assert float(ops.convert_to_numpy(model.ema_updates.value)) == 0
    for e, w in zip(model.ema_weights, model.network.trainable_variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(e.value), ops.convert_to_numpy(w.value))


def test_ema_starts_as_a_copy_of_the_weights_without_a_compile_per_weight_shape():
    """The EMA starts equal to the weights, in buffers of its own; on JAX without an eager copy
    (or staging op) compiled per distinct weight shape (26 for the CIFAR-10 U-Net before,
    benchmarks/results/avx2/jax_compile). Channel counts no other test uses, so that nothing
    is already compiled for these shapes."""
    network = ke.build_unet(image_size=8, channels=3, base_channels=12, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    if BACKEND == "jax":
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model = ke.DiffusionModel(network, ema_decay=0.9)
    finally:
        if BACKEND == "jax":
            jax.monitoring.unregister_event_duration_listener(listener)
    per_shape = [name for name in compiled if name in ("jit(copy)", "jit(stage)")]
    assert per_shape == [], f"compiled per weight shape: {per_shape}"
    weights = network.trainable_variables
    for e, w in zip(model.ema_weights, weights, strict=True):
        assert e.dtype == w.dtype and e.shape == w.shape
        np.testing.assert_array_equal(ops.convert_to_numpy(e.value), ops.convert_to_numpy(w.value))
    before = ops.convert_to_numpy(model.ema_weights[0].value).copy()
    weights[0].assign(weights[0].value + 1.0)
    np.testing.assert_array_equal(ops.convert_to_numpy(model.ema_weights[0].value), before)


def test_ema_matches_the_recurrence(fit_model):
    model = fit_model()  # ema_decay=0.95, Adam(1e-2)
    x = digits(16)
    ema = [np.array(w) for w in model.network.get_weights()]
    for k in range(4):
        model.fit(x, batch_size=16, epochs=1, verbose=0)
        decay = min(0.95, (1 + k) / (10 + k))
        weights = model.network.get_weights()
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    got = [ops.convert_to_numpy(v.value) for v in model.ema_weights]
    # Only trainable weights are averaged; the network has no non-trainable ones.
    assert len(got) == len(ema)
    for g, e in zip(got, ema):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert np.abs(got[1] - weights[1]).max() > 1e-4  # the EMA is not the raw weights


def test_ema_scope_swaps_and_restores(trained):
    model, _ = trained
    raw = [ops.convert_to_numpy(w.value) for w in model.network.trainable_variables]
    ema = [ops.convert_to_numpy(v.value) for v in model.ema_weights]
    with model.ema_scope():
        inside = [ops.convert_to_numpy(w.value) for w in model.network.trainable_variables]
    after = [ops.convert_to_numpy(w.value) for w in model.network.trainable_variables]
    for a, b in zip(inside, ema):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(after, raw):
        np.testing.assert_array_equal(a, b)


def test_keras_save_load_round_trip(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "model.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    x = digits(4)
    t = np.array([0, 50, 150, 999], np.float32)
    np.testing.assert_array_equal(ops.convert_to_numpy(again.denoise(x, t)),
                                  ops.convert_to_numpy(model.denoise(x, t)))
    for a, b in zip(again.ema_weights, model.ema_weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a.value), ops.convert_to_numpy(b.value))
    np.testing.assert_array_equal(ops.convert_to_numpy(again.seed_generator.state.value),
                                  ops.convert_to_numpy(model.seed_generator.state.value))
    assert again.sharing == model.sharing
    assert again.schedule.get_config() == model.schedule.get_config()
    assert again.ema_decay == model.ema_decay


def test_fit_on_tf_data(fit_model):
    import tensorflow as tf
    model = fit_model()
    ds = tf.data.Dataset.from_tensor_slices(digits(64)).batch(16)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


CROSS_BACKEND_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras, keras_etsdm as ke
    net = ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                        use_scale_shift_norm=True)
    rng = np.random.RandomState(0)
    net.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") for w in net.get_weights()])
    model = ke.DiffusionModel(net)
    x = np.random.RandomState(1).normal(size=(4, 8, 8, 1)).astype("float32")
    t = np.array([0.0, 37.5, 99.9, 640.0], np.float32)
    np.save(sys.argv[1], keras.ops.convert_to_numpy(model.denoise(x, t)))
""")


@pytest.mark.skipif(BACKEND != "jax", reason="runs both backends in subprocesses; once is enough")
def test_jax_and_tensorflow_give_the_same_denoise_output(tmp_path):
    script = tmp_path / "denoise.py"
    script.write_text(CROSS_BACKEND_SCRIPT)
    outputs = {}
    for backend in ("jax", "tensorflow"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        path = tmp_path / f"{backend}.npy"
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env,
                       capture_output=True)
        outputs[backend] = np.load(path)
    assert np.abs(outputs["jax"]).max() > 0.1
    np.testing.assert_allclose(outputs["jax"], outputs["tensorflow"], atol=1e-5, rtol=0)


# ----- clear errors ----------------------------------------------------------------------------
def test_wrong_rank_is_a_clear_error():
    model = ke.DiffusionModel(tiny_unet())
    with pytest.raises(ValueError, match=r"shape \[B, H, W, C\].*rank 3"):
        model(np.zeros((2, 8, 8), np.float32))


def test_wrong_channel_count_is_a_clear_error():
    model = ke.DiffusionModel(tiny_unet(channels=1))
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 8, 8, 1\].*\(2, 8, 8, 3\)"):
        model(np.zeros((2, 8, 8, 3), np.float32))


def test_t_tilde_not_below_T_is_a_clear_error():
    with pytest.raises(ValueError, match="must be smaller than the number of timesteps T=50"):
        ke.DiffusionModel(tiny_unet(), schedule=ke.DiscreteVPSchedule(num_timesteps=50),
                          sharing=ke.TimestepSharing(100, 5))


def test_non_finite_loss_stops_with_the_step(fit_model):
    model = fit_model()
    x = digits(32)
    x[20] = np.nan  # second batch
    with pytest.raises(ke.NonFiniteLossError, match="non-finite .* at step 2"):
        model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)


# ----- defaults and Keras idioms -----------------------------------------------------------------
def test_sharing_default_is_the_same_everywhere(repo_root):
    import gin

    from keras_etsdm import config, training

    assert ke.DiffusionModel(tiny_unet()).sharing == ke.TimestepSharing(100, 5)
    built = training.build_model(image_size=8, network_fn=lambda **kw: tiny_unet())
    assert built.sharing == ke.TimestepSharing(100, 5)
    try:
        gin.clear_config()
        config.parse([], [], search_paths=[os.path.join(repo_root, "gin")])
        assert ke.TimestepSharing(gin.query_parameter("TimestepSharing.t_tilde"),
                                  gin.query_parameter("TimestepSharing.n")) \
            == ke.TimestepSharing(100, 5)
    finally:
        gin.clear_config()
    short = ke.DiffusionModel(tiny_unet(), schedule=ke.DiscreteVPSchedule(num_timesteps=50))
    assert short.sharing == ke.TimestepSharing(5, 5)  # t̃ = T/10 for any T
    assert not ke.DiffusionModel(tiny_unet(), sharing=ke.TimestepSharing(0, 0)).sharing.enabled


def test_fit_adds_its_guard_only_when_asked(fit_model):
    model = fit_model()
    x = digits(32)
    x[20] = np.nan
    history = model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False,
                        stop_on_non_finite=False)
    assert not np.isfinite(history.history["loss"][-1])  # ran to the end: no guard added


@keras.saving.register_keras_serializable(package="keras_etsdm_tests")
class CoarserSharing(ke.TimestepSharing):
    """A user's own sharing map (registered): must survive a .keras round trip."""

    def __call__(self, t):
        return super().__call__(t) + 0.0


@keras.saving.register_keras_serializable(package="keras_etsdm_tests")
class ScaledDenoise(ke.DiffusionModel):
    def denoise(self, x_t, t, y=None, training=False):
        return 0.5 * super().denoise(x_t, t, y=y, training=training)


def test_subclasses_round_trip_through_keras_files(tmp_path):
    model = ScaledDenoise(tiny_unet(), sharing=CoarserSharing(200, 4))
    path = str(tmp_path / "sub.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is ScaledDenoise and type(loaded.sharing) is CoarserSharing
    assert loaded.sharing.t_tilde == 200 and loaded.sharing.n == 4
    assert loaded.get_config()["schedule"] == model.schedule.get_config()  # plain, as before
    x = np.random.default_rng(0).normal(size=(2,) + model.image_shape).astype("float32")
    t = np.array([130.0, 640.0], np.float32)
    np.testing.assert_allclose(ops.convert_to_numpy(loaded.denoise(x, t)),
                               ops.convert_to_numpy(model.denoise(x, t)), atol=1e-6)
