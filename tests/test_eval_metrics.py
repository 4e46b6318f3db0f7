"""Metrics: FD / KID / IS through tensorflow-gan, streaming statistics, files and provenance."""

import json
import os
import sys

import numpy as np
import pytest
import scipy.linalg

from keras_etsdm.evaluation import fid
from keras_etsdm.evaluation.tfgan import load_tfgan_eval
from keras_etsdm.io_utils import to_uint8


def _random_activations(n, dim, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mix + shift


def test_tfgan_eval_loads_without_the_package_init():
    tfgan_eval = load_tfgan_eval()
    assert hasattr(tfgan_eval, "frechet_classifier_distance_from_activations")
    assert hasattr(tfgan_eval, "kernel_classifier_distance_from_activations")
    assert hasattr(tfgan_eval, "classifier_score_from_logits")
    # The placeholder package, not the real __init__ (which needs tf.estimator), was installed
    # unless the real package could import.
    assert "tensorflow_gan.python.estimator" not in sys.modules
    assert load_tfgan_eval() is tfgan_eval


def test_fd_of_a_set_with_itself_is_zero():
    a = _random_activations(300, 16, 0, shift=3.0)
    assert abs(fid.frechet_distance_from_activations(a, a)) < 1e-8
    stats = fid.ActivationStatistics().update(a)
    assert abs(fid.frechet_distance(stats.mean, stats.covariance, stats.mean,
                                    stats.covariance)) < 1e-8


def _scipy_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("dim,shift", [(8, 0.5), (32, 0.0), (64, 2.0)])
def test_fd_matches_scipy_sqrtm_reference(dim, shift):
    a = _random_activations(500, dim, 1)
    b = _random_activations(400, dim, 2, shift=shift) * 1.3
    expected = _scipy_fd(a, b)
    assert fid.frechet_distance_from_activations(a, b) == pytest.approx(expected, rel=1e-6)
    sa, sb = fid.ActivationStatistics().update(a), fid.ActivationStatistics().update(b)
    assert fid.frechet_distance_to_statistics(sa, sb) == pytest.approx(expected, rel=1e-6)


def test_fd_closed_form_for_known_gaussians():
    # N(0, I) vs N(m, 4 I) in D dims: |m|^2 + D (1 + 4 - 2*2) = |m|^2 + D.
    dim = 5
    mean2 = np.arange(dim, dtype=np.float64)
    value = fid.frechet_distance(np.zeros(dim), np.eye(dim), mean2, 4 * np.eye(dim))
    assert value == pytest.approx(np.sum(mean2**2) + dim, rel=1e-10)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("batches", [[1000], [250, 250, 250, 250], [333, 333, 333, 1],
                                     [1, 999], [7] * 142 + [6]])
def test_streaming_statistics_equal_one_shot(batches):
    a = _random_activations(sum(batches), 12, 3, shift=100.0)  # large mean: Chan merge matters
    stats = fid.ActivationStatistics()
    start = 0
    for size in batches:
        stats.update(a[start:start + size])
        start += size
    assert stats.count == len(a)
    np.testing.assert_allclose(stats.mean, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)


def test_statistics_errors():
    stats = fid.ActivationStatistics()
    with pytest.raises(ValueError, match="no activations"):
        stats.mean
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.covariance
    with pytest.raises(ValueError, match="dimension changed"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        stats.update(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))


class _MeanPixelExtractor:
    """A deterministic extractor for file / batching tests: per-channel mean and row means."""

    name = "mean_pixel"

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        x = images.astype(np.float32) / 255.0
        features = np.concatenate([x.mean(axis=(1, 2)), x.mean(axis=(2, 3))], axis=1)
        return {"features": features, "logits": None}


def _uint8_images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_reference_statistics_never_drop_the_last_batch(tmp_path):
    images = _uint8_images(1001, 0)
    extractor = _MeanPixelExtractor()
    ref = fid.compute_reference_statistics(images, extractor, batch_size=100)
    assert extractor.batch_sizes == [100] * 10 + [1]
    assert ref.count == 1001
    full = extractor(images)["features"]
    np.testing.assert_allclose(ref.mean, full.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.covariance, np.cov(full.astype(np.float64), rowvar=False),
                               rtol=1e-5, atol=1e-9)
    assert ref.metadata["num_images"] == 1001

    path = str(tmp_path / "stats" / "ref.npz")
    ref.save(path)
    assert sorted(os.listdir(tmp_path / "stats")) == ["ref.npz"]  # no temporary file left
    loaded = fid.ReferenceStatistics.load(path)
    np.testing.assert_array_equal(loaded.mean, ref.mean)
    np.testing.assert_array_equal(loaded.covariance, ref.covariance)
    np.testing.assert_array_equal(loaded.activations, ref.activations)
    assert (loaded.count, loaded.extractor) == (1001, "mean_pixel")
    assert loaded.metadata == ref.metadata


def test_reference_statistics_keep_a_seeded_subset_for_kid():
    images = _uint8_images(300, 1)
    extractor = _MeanPixelExtractor()
    a = fid.compute_reference_statistics(images, extractor, max_kid_activations=100, seed=3)
    b = fid.compute_reference_statistics(images, extractor, max_kid_activations=100, seed=3)
    assert a.activations.shape == (100, 9)
    np.testing.assert_array_equal(a.activations, b.activations)
    assert a.count == 300


def test_missing_or_wrong_reference_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--compute_stats"):
        fid.ReferenceStatistics.load(str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a reference statistics file"):
        fid.ReferenceStatistics.load(str(bad))


def test_evaluate_images_refuses_another_extractor():
    images = _uint8_images(20, 2)
    ref = fid.compute_reference_statistics(images, _MeanPixelExtractor())
    other = _MeanPixelExtractor()
    other.name = "inception_v3"
    with pytest.raises(ValueError, match="meaningless"):
        fid.evaluate_images(images, other, ref)


def _numpy_kid_one_block(a, b):
    dim = a.shape[1]
    k = lambda x, y: (x @ y.T / dim + 1.0) ** 3  # noqa: E731
    m, n = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return ((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
            - 2 * k(a, b).mean())


def test_kid_matches_unbiased_mmd_and_is_near_zero_for_one_distribution():
    a = _random_activations(200, 10, 4)
    b = _random_activations(150, 10, 5, shift=0.7)
    kid, std = fid.kernel_distance(a, b, max_block_size=1024)  # one block: exact formula
    assert kid == pytest.approx(_numpy_kid_one_block(a, b), rel=1e-9)
    rng = np.random.default_rng(7)  # two samples of one distribution
    x, y = rng.standard_normal((1000, 10)), rng.standard_normal((1000, 10))
    kid_same, std_same = fid.kernel_distance(x, y, max_block_size=250)
    assert abs(kid_same) < 4 * std_same + 1e-3
    assert kid > 10 * abs(kid_same)


def test_kid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N1, D\]"):
        fid.kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_classifier_score_extremes():
    k = 10
    assert fid.classifier_score(np.zeros((50, k))) == pytest.approx(1.0, abs=1e-9)
    confident = np.full((100, k), -30.0)
    confident[np.arange(100), np.arange(100) % k] = 30.0  # every class equally often
    assert fid.classifier_score(confident) == pytest.approx(k, rel=1e-9)
    one_class = np.full((100, k), -30.0)
    one_class[:, 3] = 30.0
    assert fid.classifier_score(one_class) == pytest.approx(1.0, abs=1e-9)


def test_to_uint8_and_batches():
    x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7, -3.0])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 191, 255, 255, 0])
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([np.nan]))
    assert [len(b) for b in fid.iterate_batches(np.zeros(10), 4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="uint8"):
        fid.extract_activations(np.zeros((2, 8, 8, 1), np.float32), _MeanPixelExtractor())


def test_result_record_has_provenance(tmp_path):
    ref_path = str(tmp_path / "ref.npz")
    fid.compute_reference_statistics(_uint8_images(10, 0), _MeanPixelExtractor()).save(ref_path)
    record = fid.make_result_record(metrics={"fd": np.float32(1.5)}, num_samples=10,
                                    sampler="ddim", steps=20, seed=3, weights="ema",
                                    extractor="mean_pixel", reference_file=ref_path,
                                    sampler_config={"eta": 0.0})
    path = fid.write_result_json(str(tmp_path / "out" / "result.json"), record)
    loaded = json.load(open(path))
    for key in ("num_samples", "sampler", "steps", "seed", "weights", "extractor",
                "reference_file", "reference_sha256", "metrics"):
        assert key in loaded, key
    assert loaded["metrics"] == {"fd": 1.5}
    assert loaded["weights"] == "ema" and loaded["reference_file"] == os.path.abspath(ref_path)
    assert len(loaded["reference_sha256"]) == 64
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        fid.make_result_record(metrics={}, num_samples=1, sampler="ddim", steps=1, seed=0,
                               weights="EMA", extractor="x", reference_file=None)
    with pytest.raises(ValueError, match="lacks"):
        fid.write_result_json(str(tmp_path / "bad.json"), {"metrics": {}})
