"""Class-conditional models, classifier-free guidance and the one ``denoise`` seam.

Every path to the network — the compiled sampling loops on every backend, guidance, the
Lipschitz diagnostic, export — must go through ``DiffusionModel.denoise``. The time labels used
here lie strictly inside E-TSDM sharing pieces (55 → 40, 7 → 0 with t̃ = 100, n = 5), where
the sharing map is not the identity, so a path that skipped it would be caught.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_etsdm import (ADM_IMAGENET64, ClassifierFreeGuidance, DiffusionModel,
                         DiscreteVPSchedule, TimestepSharing, build_unet)
from keras_etsdm import cli
from keras_etsdm.guidance import sampling_inputs
from keras_etsdm.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
IMAGE = (8, 8, 1)
# A short-range schedule (ᾱ_T ≈ 0.6): x̂0 of a random network stays O(1), so float32 round-off
# stays at the 1e-6 level and differences between paths are not hidden in huge values.
SCHEDULE = DiscreteVPSchedule("linear", 1000, beta_start=1e-4, beta_end=1e-3)
INSIDE_PIECES = [999, 55, 7]
NOISE = np.random.default_rng(3).standard_normal((4,) + IMAGE).astype(np.float32)
LABELS = np.array([0, 2, 1, 3], np.int32)  # 3 = the null class


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.network.trainable_variables:  # the final conv starts at zero
        value = to_np(w.value)
        scale = 1.0 / np.sqrt(np.prod(w.shape[:-1])) if len(w.shape) > 1 else 0.1
        w.assign((value + rng.normal(0, scale, w.shape)).astype("float32"))
    for ema, w in zip(model.ema_weights, model.network.trainable_variables):
        ema.assign(to_np(w.value) + rng.normal(0, 0.05, w.shape).astype("float32"))


def _network(num_classes=K):
    return build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                      num_classes=num_classes)


def _seam_network(num_classes=K):
    """The network of the shared ``model``: one U-Net level, with attention and the class
    embedding. What the tests on it check (every path goes through ``denoise``, guidance, export)
    does not depend on the depth, and each compiled sampler (XLA on TensorFlow) compiles in less
    than half the time of ``_network()``'s two levels, which the golden values keep."""
    return build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=(8,), dropout=0.0,
                      num_classes=num_classes)


class ShiftedDenoise(DiffusionModel):
    """A subclass whose ``denoise`` adds a constant: every sampler must see the shift."""

    SHIFT = 0.25

    def denoise(self, x_t, t, y=None, training=False):
        return super().denoise(x_t, t, y=y, training=training) + self.SHIFT


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = DiffusionModel(_seam_network(), schedule=SCHEDULE, sharing=TimestepSharing(100, 5),
                       num_classes=K, class_dropout=0.2)
    _randomise(m, 0)
    return m


@pytest.fixture(scope="module")
def shifted(model):
    sub = ShiftedDenoise(_seam_network(), schedule=SCHEDULE, sharing=TimestepSharing(100, 5),
                         num_classes=K)
    for a, b in zip(sub.network.variables, model.network.variables):
        a.assign(b.value)
    return sub


def eager_ddim(denoise, labels_desc, x, schedule=SCHEDULE):
    """DDIM η = 0 written out directly (final ᾱ = 1), calling ``denoise(x, t)`` eagerly."""
    abar = schedule.alphas_cumprod
    x = np.asarray(x, np.float64)
    for i, t in enumerate(labels_desc):
        prev = abar[labels_desc[i + 1]] if i + 1 < len(labels_desc) else 1.0
        eps = np.asarray(to_np(denoise(x.astype(np.float32),
                                       np.full((x.shape[0],), t, np.float32))), np.float64)
        x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
    return x


# ----- one seam -------------------------------------------------------------------------------
def test_ddim_inside_sharing_pieces_equals_eager_loop_over_denoise(model):
    sampler = DDIMSampler(timesteps=INSIDE_PIECES, schedule=SCHEDULE)
    y = LABELS
    compiled = to_np(sampler.sample(model, NOISE, y=y))
    expected = eager_ddim(lambda x, t: model.denoise(x, t, y=y), INSIDE_PIECES, NOISE)
    np.testing.assert_allclose(compiled, expected, atol=2e-5, rtol=0)
    # The map matters at these labels: the unshared labels give other samples.
    unshared = eager_ddim(lambda x, t: model.network({"x": x, "t": t, "y": y}), INSIDE_PIECES,
                          NOISE)
    assert np.max(np.abs(unshared - expected)) > 1e-3


@pytest.mark.parametrize("make_sampler", [
    lambda: DDIMSampler(timesteps=INSIDE_PIECES, schedule=SCHEDULE),
    lambda: DPMSolverSampler(4, order=2, schedule=SCHEDULE),
    lambda: DPMSolverSampler(4, order=3, method="singlestep", schedule=SCHEDULE),
    lambda: DDPMSampler(4, schedule=SCHEDULE),
], ids=["ddim", "dpm_solver_2m", "dpm_solver_3s", "ddpm"])
def test_a_denoise_override_reaches_every_compiled_sampler(model, shifted, make_sampler):
    """A subclass's ``denoise`` is what the compiled loop runs: it equals the eager loop over the
    subclass and the base model plus the shift as an eager callable; the base model differs."""
    sampler = make_sampler()
    step_noise = None
    if sampler.stochastic:
        step_noise = np.random.default_rng(5).standard_normal(
            (sampler.num_iterations,) + NOISE.shape).astype(np.float32)
    kwargs = dict(step_noise=step_noise, y=LABELS)
    got = to_np(sampler.sample(shifted, NOISE, **kwargs))
    eager = to_np(sampler.build_loop(shifted.denoise)(NOISE, step_noise=step_noise, y=LABELS))
    shifted_base = to_np(sampler.build_loop(
        lambda x, t, y: model.denoise(x, t, y=y) + ShiftedDenoise.SHIFT)(
            NOISE, step_noise=step_noise, y=LABELS))
    np.testing.assert_allclose(got, eager, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got, shifted_base, atol=2e-5, rtol=0)
    base = to_np(sampler.sample(model, NOISE, **kwargs))
    assert np.max(np.abs(base - got)) > 1e-2


def test_lipschitz_diagnostic_goes_through_denoise(model, shifted):
    from keras_etsdm.evaluation import lipschitz

    x = NOISE
    t = np.array([7.0, 55.0, 150.0, 999.0], np.float32)
    for m in (model, shifted):
        fn = lipschitz.model_denoise_fn(m, label=1)
        np.testing.assert_allclose(fn(x, t), to_np(m.denoise(x, t, y=1)), atol=1e-5, rtol=1e-5)
    fn = lipschitz.model_denoise_fn(model)  # conditional model, no label: the null class
    np.testing.assert_allclose(fn(x, t), to_np(model.denoise(x, t)), atol=1e-5, rtol=1e-5)


# ----- conditional network and model ----------------------------------------------------------
def test_class_embedding_and_null_class(model):
    assert set(model.network.input) == {"x", "t", "y"}
    assert model.num_classes == K and model.null_id == K and model.conditional
    x, t = NOISE, np.full((4,), 55.0, np.float32)
    null = to_np(model.denoise(x, t))
    np.testing.assert_array_equal(null, to_np(model.denoise(x, t, y=np.full(4, K))))
    per_label = to_np(model.denoise(x, t, y=np.array([0, 1, 2, 3])))
    np.testing.assert_allclose(per_label[3], null[3], atol=1e-6)
    assert np.max(np.abs(per_label[0] - null[0])) > 1e-3  # the label changes ε̂
    scalar = to_np(model.denoise(x, t, y=2))
    np.testing.assert_allclose(scalar, to_np(model.denoise(x, t, y=np.full(4, 2))), atol=1e-6)


def test_model_infers_and_checks_num_classes():
    net = _network()
    assert DiffusionModel(net).num_classes == K
    with pytest.raises(ValueError, match="needs a network with a class input"):
        DiffusionModel(_network(None), num_classes=K)
    with pytest.raises(ValueError, match="num_classes must be"):
        build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                   num_res_blocks=1, attention_resolutions=(), num_classes=0)
    with pytest.raises(ValueError, match="class_dropout"):
        DiffusionModel(net, class_dropout=1.0)


def test_class_dropout_replaces_labels_by_the_null_class_at_the_stated_rate():
    seen = []

    class Recorder(DiffusionModel):
        def denoise(self, x_t, t, y=None, training=False):
            seen.append(to_np(y))
            return super().denoise(x_t, t, y=y, training=training)

    m = Recorder(_seam_network(), num_classes=K, class_dropout=0.3, seed=1)
    n = 4000
    x0 = np.zeros((n,) + IMAGE, np.float32)
    labels = np.arange(n, dtype=np.int32) % K
    m({"x0": x0, "y": labels}, training=True)
    y = seen[-1]
    dropped = y == K
    np.testing.assert_array_equal(y[~dropped], labels[~dropped])  # kept labels are unchanged
    sd = np.sqrt(0.3 * 0.7 / n)
    assert abs(dropped.mean() - 0.3) < 5 * sd, dropped.mean()
    m({"x0": x0[:8], "y": labels[:8]}, training=False)  # no dropout at inference
    np.testing.assert_array_equal(seen[-1], labels[:8])


def test_fit_on_images_and_labels_from_arrays_and_tf_data():
    import tensorflow as tf

    from keras_etsdm.data import load_digits

    images, labels = load_digits(8, with_labels=True)
    images, labels = images[:64], labels[:64]
    m = DiffusionModel(build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                                  num_res_blocks=1, attention_resolutions=(),
                                  num_classes=10), ema_decay=0.9)
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = m.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    history = m.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert np.isfinite(m.evaluate(dataset, verbose=0))
    with pytest.raises(ValueError, match="class-conditional"):
        m.fit(images, batch_size=16, epochs=1, verbose=0)
    unconditional = DiffusionModel(build_unet(image_size=8, channels=1, base_channels=8,
                                              channel_mult=(1,), num_res_blocks=1,
                                              attention_resolutions=()))
    unconditional.compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.fit(images, labels, batch_size=16, epochs=1, verbose=0)


# ----- classifier-free guidance -----------------------------------------------------------------
def test_guidance_arithmetic_is_exact_and_one_batched_call(model):
    calls = []

    class Counting(DiffusionModel):
        def denoise(self, x_t, t, y=None, training=False):
            calls.append(tuple(x_t.shape))
            return super().denoise(x_t, t, y=y, training=training)

    m = Counting(model.network, schedule=SCHEDULE, sharing=model.sharing)
    guided = ClassifierFreeGuidance(m)
    t = np.array([7.0, 55.0, 300.0, 999.0], np.float32)
    for w in (0.0, 0.5, 2.0):
        calls.clear()
        got = to_np(guided(NOISE, t, y=LABELS, guidance_scale=w))
        assert calls == [(8,) + IMAGE]  # ONE call on [x; x] with labels [y; ∅]
        cond = to_np(model.denoise(NOISE, t, y=LABELS))
        uncond = to_np(model.denoise(NOISE, t))
        np.testing.assert_allclose(got, (1 + w) * cond - w * uncond, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        ClassifierFreeGuidance(DiffusionModel(_network(None)))


def eager_guided_ddim(model, labels, w, steps_desc):
    def guided(x, t):
        return (1 + w) * to_np(model.denoise(x, t, y=labels)) - w * to_np(model.denoise(x, t))
    return eager_ddim(guided, steps_desc, NOISE)


def test_model_sample_with_guidance_matches_eager_and_does_not_retrace(model):
    sampler = DDIMSampler(timesteps=INSIDE_PIECES, schedule=SCHEDULE)
    labels = np.array([0, 1, 2, 2], np.int32)
    denoiser, conditioning = sampling_inputs(model, 4, labels, 2.0)
    got = to_np(sampler.sample(denoiser, NOISE, **conditioning))
    np.testing.assert_allclose(got, eager_guided_ddim(model, labels, 2.0, INSIDE_PIECES),
                               atol=3e-5, rtol=0)
    segment = sampler.compiled_segment(denoiser)
    traces = segment.traces
    other_labels = np.array([2, 2, 0, 1], np.int32)
    denoiser2, conditioning = sampling_inputs(model, 4, other_labels, 0.5)
    assert denoiser2 is denoiser  # one cached wrapper per model
    got = to_np(sampler.sample(denoiser2, NOISE, **conditioning))
    np.testing.assert_allclose(got, eager_guided_ddim(model, other_labels, 0.5, INSIDE_PIECES),
                               atol=3e-5, rtol=0)
    assert segment.traces == traces  # labels and w are inputs, not constants
    # model.sample: EMA weights by default, seeded noise, guided.
    with model.ema_scope():
        noise = to_np(keras.random.normal((4,) + IMAGE, seed=11))
        expected = to_np(sampler.sample(denoiser, noise, y=labels,
                                        guidance_scale=np.float32(1.0)))
    got = to_np(model.sample(sampler, 4, seed=11, labels=labels, guidance_scale=1.0))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_dpm_solver_pp_thresholding_under_guidance(model):
    sampler = DPMSolverSampler(5, order=2, algorithm="dpmsolver++", thresholding=True,
                               schedule=SCHEDULE)
    denoiser, conditioning = sampling_inputs(model, 4, LABELS[:3].tolist() + [1], 4.0)
    got = to_np(sampler.sample(denoiser, NOISE, **conditioning))
    guided = ClassifierFreeGuidance(model)
    eager = to_np(sampler.build_loop(guided)(NOISE, **conditioning))
    np.testing.assert_allclose(got, eager, atol=2e-5, rtol=0)
    assert np.all(np.isfinite(got))
    # Guidance at w = 4 pushes x̂0 past the threshold, so thresholding is active here.
    plain = DPMSolverSampler(5, order=2, algorithm="dpmsolver++", schedule=SCHEDULE)
    assert np.max(np.abs(to_np(plain.sample(denoiser, NOISE, **conditioning)) - got)) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=[0, 1, 4, 0]), "out of range"),
    (dict(labels=[0, -1, 1, 0]), "out of range"),
    (dict(labels=[0, 1]), "2 class labels for 4 samples"),
    (dict(labels=[0.5, 1, 1, 1]), "integers"),
    (dict(guidance_scale=2.0), "needs class labels"),
    (dict(labels=[0, 1, 1, 0], guidance_scale=float("nan")), "finite"),
])
def test_bad_labels_are_clear_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.sample(DDIMSampler(2, schedule=SCHEDULE), 4, **kwargs)


def test_labels_for_an_unconditional_model_are_an_error():
    m = DiffusionModel(_network(None), schedule=SCHEDULE)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(DDIMSampler(2, schedule=SCHEDULE), 2, labels=[0, 1])
    with pytest.raises(ValueError, match="unconditional"):
        m.denoise(NOISE, 5.0, y=[0, 1, 0, 1])
    assert "num_classes" not in m.get_config()  # unconditional configs are unchanged


def test_parse_labels():
    parse = cli.parse_labels
    np.testing.assert_array_equal(parse("3,3,7")[0], [3, 3, 7])
    assert parse("3,3,7")[1] == 3
    np.testing.assert_array_equal(parse("1,2", 6)[0], [1, 2, 1, 2, 1, 2])
    np.testing.assert_array_equal(parse("balanced", 5, 3)[0], [0, 1, 2, 0, 1])
    assert parse(None, 8) == (None, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        parse("1,2", 5)
    with pytest.raises(ValueError, match="integer class ids"):
        parse("three")


# ----- save / load, CLI, export -----------------------------------------------------------------
def test_keras_round_trip_and_bin_sample_with_labels(model, tmp_path):
    path = str(tmp_path / "cond.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.num_classes == K and loaded.class_dropout == model.class_dropout
    x, t = NOISE, np.array([7.0, 55.0, 150.0, 999.0], np.float32)
    np.testing.assert_allclose(to_np(loaded.denoise(x, t, y=LABELS)),
                               to_np(model.denoise(x, t, y=LABELS)), atol=1e-6)
    npz, png = cli.run_sample("ddim", 3, None, str(tmp_path / "s"), checkpoint=path,
                                   batch_size=2, seed=1, labels="2,0,1", guidance_scale=1.5)
    with np.load(npz) as f:
        assert f["images"].shape == (3, 8, 8, 1)
        np.testing.assert_array_equal(f["labels"], [2, 0, 1])
        assert float(f["guidance_scale"]) == 1.5
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "sample"), f"--out={tmp_path / 'b'}",
         f"--checkpoint={path}", "--sampler=ddim", "--steps=2", "--labels=1,5"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 2
    assert "Class label 5 is out of range: this model has 3 classes" in result.stderr
    assert len([line for line in result.stderr.splitlines()
                if line.startswith("bin/sample: error:")]) == 1


def test_export_conditional_signatures(model, tmp_path):
    import tensorflow as tf

    from keras_etsdm import export

    sampler = DDIMSampler(timesteps=INSIDE_PIECES, schedule=SCHEDULE)
    out = tmp_path / "export"
    meta = export.export_savedmodel(model, out, sampler=sampler, use_ema=False)
    assert meta["num_classes"] == K and meta["null_class"] == K
    loaded = tf.saved_model.load(str(out))
    sample_inputs = loaded.signatures["sample"].structured_input_signature[1]
    assert set(sample_inputs) == {"noise", "labels", "guidance_scale"}
    t = np.array([7.0, 55.0, 150.0, 999.0], np.float32)
    eps = loaded.signatures["denoise"](x_t=tf.constant(NOISE), t=tf.constant(t),
                                       labels=tf.constant(LABELS))["eps"].numpy()
    np.testing.assert_allclose(eps, to_np(model.denoise(NOISE, t, y=LABELS)), atol=2e-5)
    labels = np.array([0, 1, 2, 0], np.int32)
    images = loaded.signatures["sample"](noise=tf.constant(NOISE), labels=tf.constant(labels),
                                         guidance_scale=tf.constant(2.0))["images"].numpy()
    expected = eager_guided_ddim(model, labels, 2.0, INSIDE_PIECES)
    expected_uint8 = np.clip(np.round((expected + 1) * 127.5), 0, 255)
    assert np.max(np.abs(images.astype(np.float64) - expected_uint8)) <= 1  # rounding edges


# ----- data and configs -------------------------------------------------------------------------
def test_embedded_mnist_batches_come_with_their_labels():
    from keras_etsdm.data import load_mnist, make_dataset

    images, labels = load_mnist(32, with_labels=True)
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    batch_images, batch_labels = next(iter(make_dataset(16, 32, 1, num_classes=10, seed=3)))
    batch_images, batch_labels = batch_images.numpy(), batch_labels.numpy()
    assert batch_labels.dtype == np.int32 and batch_labels.shape == (16,)
    for image, label in zip(batch_images, batch_labels):  # each image carries its own label
        matches = np.flatnonzero(np.all(images == image, axis=(1, 2, 3)))
        assert matches.size and np.all(labels[matches] == label)
    with pytest.raises(ValueError, match="num_classes=5"):
        make_dataset(16, 32, 1, num_classes=5)
    with pytest.raises(ValueError, match="no class labels"):
        make_dataset(16, 8, 1, name="synthetic", num_classes=10)
    with pytest.raises(ValueError, match="LSUN LMDB data has no class labels"):
        make_dataset(16, 8, 1, source="lmdb", path="/nonexistent", num_classes=10)


def _write_png(path, value):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_folder_classes_are_saved_and_checked(tmp_path):
    from keras_etsdm.data import make_dataset

    root = tmp_path / "data"
    for name, value in (("cat", 0), ("dog", 128), ("ant", 255)):
        for i in range(2):
            _write_png(str(root / name / f"{i}.png"), value)
    class_list = str(tmp_path / "work" / "classes.json")
    dataset = make_dataset(6, 8, 1, source="folder", path=str(root), num_classes=3,
                           class_list_path=class_list)
    images, labels = (a.numpy() for a in next(iter(dataset)))
    with open(class_list) as f:
        assert json.load(f) == ["ant", "cat", "dog"]  # sorted folder names = class ids
    expected = {0: 1.0, 1: -1.0, 2: 128 / 127.5 - 1}  # ant = 255, cat = 0, dog = 128
    for image, label in zip(images, labels):
        np.testing.assert_allclose(image, expected[int(label)], atol=1e-6)
    _write_png(str(root / "bee" / "0.png"), 50)
    with pytest.raises(ValueError, match="disagree with the saved class list"):
        make_dataset(6, 8, 1, source="folder", path=str(root), num_classes=4,
                     class_list_path=class_list)
    with pytest.raises(ValueError, match="4 class folders but the model has num_classes=3"):
        make_dataset(6, 8, 1, source="folder", path=str(root), num_classes=3)


def test_tfrecord_label_feature(tmp_path):
    import io

    import tensorflow as tf
    from PIL import Image

    from keras_etsdm.data import make_dataset

    def example(value, label=None):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
        feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[buffer.getvalue()]))}
        if label is not None:
            feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    path = str(tmp_path / "a.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for label in range(4):
            writer.write(example(label * 60, label))
    images, labels = (a.numpy() for a in next(iter(make_dataset(
        4, 8, 1, source="tfrecord", path=path, num_classes=4, shuffle_buffer=0))))
    for image, label in zip(images, labels):
        np.testing.assert_allclose(image, label * 60 / 127.5 - 1, atol=1e-6)
    bad = str(tmp_path / "b.tfrecord")
    with tf.io.TFRecordWriter(bad) as writer:
        writer.write(example(0))
    with pytest.raises(ValueError, match="no int64 class-label feature 'label'"):
        make_dataset(4, 8, 1, source="tfrecord", path=bad, num_classes=4)


def test_adm_imagenet64_parameter_count():
    """ADM's class-conditional ImageNet-64 U-Net, counted with guided-diffusion's own code
    (``create_model`` with the README's 64x64 flags, learn_sigma=True): 295,904,454
    parameters. Ours has one more embedding row, the null class of classifier-free guidance
    (768 = the embedding width)."""
    network = build_unet(channels=3, out_channels=6, **ADM_IMAGENET64)
    assert network.count_params() == 295_904_454 + 768
    del network


def test_conditional_gin_configs(repo_root):
    import gin

    from keras_etsdm import config

    gin_dir = os.path.join(repo_root, "gin")
    try:
        for name, classes in (("mnist_cond.gin", 10), ("cifar10_cond.gin", 10),
                              ("imagenet64.gin", 1000)):
            gin.clear_config()
            config.parse([name], ["DATA_PATH = '/data/x'"] if name != "mnist_cond.gin" else [],
                         search_paths=[gin_dir])
            assert gin.query_parameter("build_model.num_classes") == classes
            assert gin.query_parameter("build_model.class_dropout") == 0.1
        assert gin.query_parameter("build_network.num_head_channels") == 64
    finally:
        gin.clear_config()


def test_conditional_training_run_writes_a_grid_with_one_row_per_class(tmp_path):
    from PIL import Image

    from keras_etsdm import checkpoint, training

    def model_fn():
        return training.build_model(
            image_size=8, channels=1, num_classes=10, ema_decay=0.9,
            network_fn=lambda image_size, channels, num_classes: build_unet(
                image_size=image_size, channels=channels, base_channels=8, channel_mult=(1,),
                num_res_blocks=1, attention_resolutions=(), num_classes=num_classes))

    from keras_etsdm.data import make_dataset

    result = training.train(
        str(tmp_path), model_fn=model_fn,
        dataset_fn=lambda **kw: make_dataset(source="embedded", name="digits", **kw),
        batch_size=16, max_steps=2, log_every=1, sample_every=2, num_grid_samples=20,
        grid_guidance_scale=1.0, handle_signals=False,
        # As tests/test_training.py: XLA on JAX (one compile, not one per eager op: half the
        # time), TensorFlow's graph-mode step (an XLA compile there costs more than it saves).
        jit_compile=keras.backend.backend() == "jax",
        grid_sampler_fn=lambda schedule: DDIMSampler(2, schedule=schedule),
        stream=open(os.devnull, "w"))
    assert result.step == 2 and result.model.conditional
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid-00000002.png"))
    assert grid.shape[:2] == (10 * 9 + 1, 2 * 9 + 1)  # 10 rows (classes) of 2, 1-px padding
    loaded = checkpoint.load_checkpoint(str(tmp_path))
    assert loaded.num_classes == 10


# ----- JAX and TensorFlow agree ---------------------------------------------------------------
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_conditional.npz")


def _deterministic_model():
    """The same weights on every backend (drawn with numpy, not the backend's initialisers)."""
    m = DiffusionModel(_network(), schedule=SCHEDULE, sharing=TimestepSharing(100, 5))
    rng = np.random.default_rng(42)
    for w in m.network.weights:
        if len(w.shape) > 1:
            value = rng.normal(0, 1.0 / np.sqrt(np.prod(w.shape[:-1])), w.shape)
            if "table" in w.path:  # the class embedding
                value = rng.normal(0, 1.0, w.shape)
        elif "gamma" in w.path:
            value = 1.0 + rng.normal(0, 0.1, w.shape)
        else:
            value = rng.normal(0, 0.1, w.shape)
        w.assign(value.astype("float32"))
    return m


def test_guided_samples_equal_the_golden_values_on_every_backend():
    """Guided DDIM (labels inside sharing pieces) and DPM-Solver++ with thresholding against
    values stored once (``KERAS_ETSDM_WRITE_GOLDEN=1`` rewrites them): both backends must hit
    the same numbers to float32 round-off."""
    m = _deterministic_model()
    labels = np.array([0, 1, 2, 3], np.int32)
    got = {
        "ddim": to_np(DDIMSampler(timesteps=INSIDE_PIECES, schedule=SCHEDULE).sample(
            ClassifierFreeGuidance(m), NOISE, y=labels, guidance_scale=np.float32(1.5))),
        "dpm_solver_pp": to_np(DPMSolverSampler(
            4, order=2, algorithm="dpmsolver++", thresholding=True, schedule=SCHEDULE).sample(
                ClassifierFreeGuidance(m), NOISE, y=labels, guidance_scale=np.float32(3.0))),
        "eps": to_np(m.denoise(NOISE, np.array([7.0, 55.0, 150.0, 999.0], np.float32),
                               y=labels)),
    }
    if os.environ.get("KERAS_ETSDM_WRITE_GOLDEN") == "1":
        np.savez(GOLDEN, **got)
    with np.load(GOLDEN) as golden:
        for key, value in got.items():
            np.testing.assert_allclose(value, golden[key], atol=2e-5, rtol=1e-5, err_msg=key)
