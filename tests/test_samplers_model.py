"""Samplers on a real (tiny) DiffusionModel: the compiled path, EMA, bin/sample end to end."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_etsdm import DiffusionModel, TimestepSharing, build_unet
from keras_etsdm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from keras_etsdm import cli
from keras_etsdm.checkpoint import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), dropout=0.0)
    rng = np.random.default_rng(0)
    for w in network.weights:  # the final conv is zero-initialised: randomise everything
        w.assign(rng.normal(0, 0.05, w.shape).astype("float32") + ops.convert_to_numpy(w))
    m = DiffusionModel(network, sharing=TimestepSharing(100, 5), ema_decay=0.9)
    for ema in m.ema_weights:  # distinct EMA weights
        ema.assign(ops.convert_to_numpy(ema) * 0.5)
    return m


NOISE = np.random.default_rng(1).standard_normal((2, 8, 8, 1)).astype(np.float32)


def test_compiled_model_loop_matches_eager_and_does_not_retrace(model):
    sampler = DPMSolverSampler(4, order=2)
    segment = sampler.compiled_segment(model)
    traces = segment.traces
    compiled = ops.convert_to_numpy(sampler.sample(model, NOISE))
    eager = ops.convert_to_numpy(sampler.build_loop(model.denoise)(NOISE))
    # An untrained network's x̂0 = (x − σ ε̂)/α at α_T ≈ 0.006 reaches |x| ~ 500: XLA's fusion
    # and eager op order then differ by a few float32 ulps OF THAT SCALE (~16 ulps allowed).
    np.testing.assert_allclose(compiled, eager, rtol=0,
                               atol=16 * np.finfo(np.float32).eps * np.max(np.abs(eager)))
    sampler.sample(model, NOISE)
    assert segment.traces == traces + 1
    # Weights are state, not constants: swapping in the EMA changes the result, no retrace.
    with model.ema_scope():
        ema_out = ops.convert_to_numpy(sampler.sample(model, NOISE))
    assert segment.traces == traces + 1
    assert np.max(np.abs(ema_out - compiled)) > 1e-4
    np.testing.assert_array_equal(ops.convert_to_numpy(sampler.sample(model, NOISE)), compiled)


def test_tensorflow_sampling_loop_with_and_without_xla_agree(model, monkeypatch):
    """The sampling loop compiles with XLA or as TensorFlow's own graph (oneDNN kernels), as
    ``backend.default_sample_jit_compile`` chooses per CPU ISA or the environment forces; both
    run the same loop body through ``model.denoise`` and give the same images."""
    from keras_etsdm import backend
    from keras_etsdm.samplers import base

    if keras.backend.backend() != "tensorflow":
        assert DDIMSampler(4).compiled_segment(model).jit_compile is True  # jax.jit
        return
    outputs = {}
    for value in ("1", "0"):
        monkeypatch.setenv(backend.SAMPLE_JIT_VARIABLE, value)
        base.clear_compiled_cache()
        sampler = DDIMSampler(8, sharing=model.sharing)
        assert sampler.compiled_segment(model).jit_compile is (value == "1")
        outputs[value] = ops.convert_to_numpy(sampler.sample(model, NOISE))
    base.clear_compiled_cache()
    # Same op order up to XLA's fusion: float32 ulps of the output's scale (as above).
    np.testing.assert_allclose(outputs["0"], outputs["1"], rtol=0,
                               atol=16 * np.finfo(np.float32).eps * np.max(np.abs(outputs["1"])))
    assert np.max(np.abs(outputs["1"])) > 1.0  # a real sample, not zeros


def _ddim_through_denoise(model, sampler):
    """``sampler``'s DDIM tables executed step by step through ``model.denoise`` (float64)."""
    x, t = NOISE.astype(np.float64), sampler.tables
    for i in range(sampler.num_iterations):
        label = np.full((NOISE.shape[0],), t["label"][i], np.float32)
        eps = np.asarray(ops.convert_to_numpy(model.denoise(x.astype(np.float32), label)),
                         np.float64)
        x0 = (x - t["sigma"][i] * eps) / t["alpha"][i]
        x = t["alpha_prev"][i] * x0 + t["direction"][i] * eps
    return x


def test_sharing_aware_sampler_calls_denoise_at_the_piece_labels(model):
    """A sharing-aware DDIM on the model == its tables executed step by step through
    ``model.denoise`` (the one seam), boundary steps at the label of the piece below; a sampler
    built for another sharing map is refused."""
    sampler = DDIMSampler(8, sharing=model.sharing)
    np.testing.assert_array_equal(sampler.labels, [999, 699, 400, 80, 60, 40, 20, 0])
    x = _ddim_through_denoise(model, sampler)
    got = ops.convert_to_numpy(sampler.sample(model, NOISE))
    np.testing.assert_allclose(got, x, rtol=0, atol=64 * np.finfo(np.float32).eps
                               * np.max(np.abs(x)))
    with pytest.raises(ValueError, match="sharing-aware for TimestepSharing\\(t_tilde=50"):
        DDIMSampler(8, sharing=TimestepSharing(50, 5)).sample(model, NOISE)


def test_knots_only_grid_calls_denoise_at_the_true_labels(model):
    """``sharing_labels=False``: the same knots, every step at its true label (the model maps
    it itself); a map other than the model's is then accepted (the control for a model
    without E-TSDM)."""
    sampler = DDIMSampler(8, sharing=model.sharing, sharing_labels=False)
    np.testing.assert_array_equal(sampler.labels, [999, 699, 400, 100, 80, 60, 40, 20])
    x = _ddim_through_denoise(model, sampler)
    got = ops.convert_to_numpy(sampler.sample(model, NOISE))
    np.testing.assert_allclose(got, x, rtol=0, atol=64 * np.finfo(np.float32).eps
                               * np.max(np.abs(x)))
    other = DDIMSampler(8, sharing=TimestepSharing(50, 5), sharing_labels=False)
    np.testing.assert_array_equal(other.labels, [999, 683, 366, 50, 40, 30, 20, 10])
    assert np.all(np.isfinite(ops.convert_to_numpy(other.sample(model, NOISE))))


def test_model_sample_is_seeded_and_uses_ema(model):
    """``model.sample`` with a stochastic sampler (the DDIM η=1 loop body is covered by the
    closed-form tests): same seed → same images, another seed → others, EMA by default."""
    sampler = DDPMSampler(5)
    a = ops.convert_to_numpy(model.sample(sampler, 2, seed=1))
    assert a.shape == (2, 8, 8, 1) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(ops.convert_to_numpy(model.sample(sampler, 2, seed=1)), a)
    assert np.max(np.abs(ops.convert_to_numpy(model.sample(sampler, 2, seed=2)) - a)) > 1e-3
    raw = ops.convert_to_numpy(model.sample(sampler, 2, seed=1, use_ema=False))
    assert np.max(np.abs(raw - a)) > 1e-4


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model.keras")
    model.save(path)
    return path


def test_run_sample_end_to_end(checkpoint, tmp_path):
    out = str(tmp_path / "a")
    npz, png = cli.run_sample("dpm_solver", 3, 4, out, checkpoint=checkpoint, batch_size=2,
                                   seed=7, options=cli.parse_options("order=3"))
    images = np.load(npz)["images"]
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
    assert os.path.getsize(png) > 0
    npz2, _ = cli.run_sample("dpm_solver", 3, 4, str(tmp_path / "b"), checkpoint=checkpoint,
                                  batch_size=4, seed=7, options={"order": 3})
    np.testing.assert_array_equal(np.load(npz2)["images"], images)  # seed, not batching, decides
    # --sampler_options=sharing_aware=true: the model's own sharing map aligns the grid.
    npz3, _ = cli.run_sample("dpm_solver", 6, 2, str(tmp_path / "c"), checkpoint=checkpoint,
                             batch_size=2, seed=7,
                             options=cli.parse_options("order=2,sharing_aware=true"))
    assert "'sharing': {'t_tilde': 100, 'n': 5" in str(np.load(npz3)["sampler_config"])


def test_load_for_sampling_from_workdir_uses_newest_checkpoint_and_ema(model, checkpoint,
                                                                       tmp_path):
    """``--workdir`` resolves to the newest ``checkpoints/*.keras``; EMA weights by default."""
    workdir = tmp_path / "work"
    os.makedirs(workdir / "checkpoints")
    old = workdir / "checkpoints" / "old.keras"
    with open(old, "wb") as f:  # not a loadable model: must not be the one picked
        f.write(b"older")
    os.utime(old, (1, 1))
    os.link(checkpoint, workdir / "checkpoints" / "m.keras")
    ema = [ops.convert_to_numpy(w) for w in model.ema_weights]
    raw = [ops.convert_to_numpy(w) for w in model.network.trainable_variables]
    for use_ema, expected in ((True, ema), (False, raw)):
        loaded = load_model(workdir=str(workdir), use_ema=use_ema)
        for got, want in zip(loaded.network.trainable_variables, expected):
            np.testing.assert_array_equal(ops.convert_to_numpy(got), want)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sampler_name="ddim", steps=2, checkpoint="/nonexistent/m.keras"), FileNotFoundError,
     "does not exist"),
    (dict(sampler_name="euler", steps=2), ValueError, "Unknown sampler"),
    (dict(sampler_name="ddim", steps=0), ValueError, "between 1 and"),
    (dict(sampler_name="ddim", steps=1001), ValueError, "between 1 and"),
])
def test_run_sample_errors(checkpoint, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("checkpoint", checkpoint)
    with pytest.raises(error, match=match):
        cli.run_sample(num_samples=1, output_dir=str(tmp_path), **kwargs)


def test_bin_sample_reports_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "sample"), f"--out={tmp_path}",
         "--checkpoint=/nonexistent.keras", "--sampler=ddim", "--steps=2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_loaded_model_samples_the_ema_every_time(model, checkpoint, tmp_path):
    """Loading with the EMA copies it into the network (no swap): model.sample() — which swaps
    the EMA in — gives the EMA samples on the first call and on every later one."""
    sampler = DPMSolverSampler(3, order=2)
    with model.ema_scope():
        expected = ops.convert_to_numpy(sampler.sample(model, NOISE))
    loaded = load_model(checkpoint=checkpoint)
    for _ in range(2):
        with loaded.ema_scope():
            got = ops.convert_to_numpy(sampler.sample(loaded, NOISE))
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(ops.convert_to_numpy(loaded.sample(sampler, 2, seed=4)),
                                   ops.convert_to_numpy(model.sample(sampler, 2, seed=4)),
                                   atol=1e-6, rtol=0)


def test_step_noise_is_standard_normal_and_pure():
    # the stochastic samplers' step noise: a pure function of (seed, step), standard normal
    from keras_etsdm.samplers import _compiled

    seed = np.array([11, 5], np.int32)
    draw = lambda s, step: np.asarray(ops.convert_to_numpy(  # noqa: E731
        _compiled.stateless_normal((64, 32, 32), s, step)))
    a, again = draw(seed, 3), draw(seed, 3)
    np.testing.assert_array_equal(a, again)
    assert a.dtype == np.float32 and a.shape == (64, 32, 32)
    assert np.abs(a - draw(seed, 4)).max() > 1.0  # another step, other noise
    assert np.abs(a - draw(np.array([12, 5], np.int32), 3)).max() > 1.0
    n = a.size  # 65,536 draws: mean within 4 standard errors, variance within 4 of its own
    assert abs(a.mean()) < 4 / np.sqrt(n)
    assert abs(a.var() - 1.0) < 4 * np.sqrt(2.0 / n)
    assert abs((a > 1.0).mean() - 0.15866) < 4 * np.sqrt(0.15866 * 0.84134 / n)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's compile modes")
def test_step_noise_is_the_same_with_and_without_xla():
    # TensorFlow's XLA and non-XLA philox kernels map the same bits to different floats; the
    # library draws raw bits, so a loop without XLA (its choice on AVX-512 CPUs) and an
    # exported SavedModel (XLA) draw the same noise for one seed
    import tensorflow as tf

    from keras_etsdm.samplers import _compiled

    def draw(seed, step):
        return _compiled.stateless_normal((4, 8, 8, 1), seed, step)

    seed, step = tf.constant([11, 5], tf.int32), tf.constant(2, tf.int32)
    with_xla = tf.function(draw, jit_compile=True, autograph=False)(seed, step).numpy()
    without = tf.function(draw, jit_compile=False, autograph=False)(seed, step).numpy()
    np.testing.assert_allclose(with_xla, without, rtol=0, atol=1e-6)
