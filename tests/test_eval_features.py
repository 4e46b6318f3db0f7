"""Feature extractors: the Inception local-path loader and the project's digit classifiers."""

import json
import os

import numpy as np
import pytest

from keras_etsdm.evaluation import classifier, features, fid
from keras_etsdm.io_utils import to_uint8


# ----- Inception from a local path -------------------------------------------------------------
def test_inception_without_a_path_explains_what_to_download(tmp_path):
    with pytest.raises(ValueError, match="no download"):
        features.InceptionExtractor(None)
    with pytest.raises(FileNotFoundError) as info:
        features.InceptionExtractor(str(tmp_path / "missing"))
    message = str(info.value)
    assert "tfgan" in message and "--inception_path" in message and "saved_model.pb" in message
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        features.InceptionExtractor(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="--inception_path"):
        features.make_extractor("inception", inception_path=str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def fake_inception_dir(tmp_path_factory):
    """A SavedModel with the tfgan Inception module's interface: float images in [−1, 1]
    → {"pool_3": [B, 2048-like], "logits": [B, K]}. Its features expose what it was fed."""
    import tensorflow as tf

    class FakeInception(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            size = tf.cast(tf.shape(images)[1:3], tf.float32)
            batch = tf.shape(images)[0]
            pool = tf.concat([tf.reduce_mean(images, [1, 2]),
                              tf.reduce_min(images, [1, 2, 3])[:, None],
                              tf.reduce_max(images, [1, 2, 3])[:, None],
                              tf.tile(size[None], [batch, 1])], axis=1)
            return {"pool_3": pool[:, None, None, :], "logits": pool[:, :3] * 10.0}

    path = str(tmp_path_factory.mktemp("fake_inception"))
    tf.saved_model.save(FakeInception(), path)
    return path


def test_inception_loader_preprocesses_like_tfgan(fake_inception_dir):
    extractor = features.make_extractor("inception", inception_path=fake_inception_dir)
    assert extractor.name == "inception_v3"
    images = np.zeros((3, 16, 16, 1), np.uint8)
    images[1] = 255
    images[2, :8] = 255
    out = extractor(images)
    feats = out["features"]
    assert feats.shape == (3, 7) and out["logits"].shape == (3, 3)
    np.testing.assert_allclose(feats[:, 5:], 299.0)           # resized to 299 × 299
    np.testing.assert_allclose(feats[0, :3], -1.0)            # 0 → −1
    np.testing.assert_allclose(feats[1, :3], 1.0)             # 255 → +1
    np.testing.assert_allclose(feats[2, :3], 0.0, atol=0.01)  # grey tiled to 3 channels
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.astype(np.float32))
    missing_key = features.InceptionExtractor(fake_inception_dir, feature_key="pool_4")
    with pytest.raises(KeyError, match="pool_4"):
        missing_key(images)


# ----- the project's classifiers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_extractor():
    return features.ClassifierExtractor("digits8")


def test_committed_classifier_accuracy_is_reproduced(digits_extractor):
    info = json.load(open(classifier.info_path("digits8")))
    assert info["test_accuracy"] > 0.93  # what the committed weights were trained to
    images, labels = classifier.load_labelled_data("digits")
    _, test_idx = classifier.split_indices(labels, info["test_fraction"], seed=0)
    assert len(test_idx) == info["num_test"]
    logits = digits_extractor(images[test_idx])["logits"]
    accuracy = np.mean(np.argmax(logits, -1) == labels[test_idx])
    assert accuracy == pytest.approx(info["test_accuracy"], abs=0.006)  # ≤ 2 of 359 flip
    assert os.path.getsize(classifier.weights_path("digits8")) < 300_000


def test_committed_assets_are_small():
    # Three classifiers (~0.7 MB) and the MNIST test-set statistics with 5,000 KID activations
    # (~1.3 MB); a budget, so that a large file is not committed by accident.
    total = sum(os.path.getsize(os.path.join(classifier.ASSETS_DIR, f))
                for f in os.listdir(classifier.ASSETS_DIR))
    assert total < 2_500_000


def test_classifier_extractor_shapes_and_errors(digits_extractor):
    out = digits_extractor(np.zeros((5, 8, 8, 1), np.uint8))
    assert out["features"].shape == (5, 64) and out["logits"].shape == (5, 10)
    assert digits_extractor.name == "classifier_digits8" and digits_extractor.feature_dim == 64
    with pytest.raises(ValueError, match="at most 8x8"):
        digits_extractor(np.zeros((1, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="1-channel"):
        digits_extractor(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="Unknown classifier"):
        features.ClassifierExtractor("cifar")
    with pytest.raises(ValueError, match="Unknown feature extractor"):
        features.make_extractor("vgg")


def test_mnist_classifier_pads_28_pixel_images_like_the_training_data():
    extractor = features.ClassifierExtractor("mnist32")
    from keras_etsdm.data import embedded

    padded = to_uint8(embedded.load_mnist(32)[:20])
    raw = padded[:, 2:30, 2:30]  # the 28×28 digits before padding
    np.testing.assert_allclose(extractor(raw)["features"], extractor(padded)["features"],
                               rtol=1e-5, atol=1e-5)


def _box_blur(images, radius):
    x = images.astype(np.float32)
    pad = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    size = 2 * radius + 1
    out = np.zeros_like(x)
    for dy in range(size):
        for dx in range(size):
            out += pad[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
    return np.round(out / size**2).astype(np.uint8)


@pytest.mark.parametrize("name,dataset,radius", [("digits8", "digits", 1),
                                                 ("mnist32", "mnist", 2)])
def test_fd_orders_real_blurred_noise(name, dataset, radius):
    extractor = features.ClassifierExtractor(name)
    images, labels = classifier.load_labelled_data(dataset)
    train_idx, test_idx = classifier.split_indices(labels, 0.2, seed=0)
    reference = fid.compute_reference_statistics(images[train_idx], extractor, batch_size=500)
    held_out = images[test_idx]
    noise = np.random.default_rng(0).integers(0, 256, held_out.shape, dtype=np.uint8)
    scores = {kind: fid.evaluate_images(x, extractor, reference, batch_size=500)
              for kind, x in [("real", held_out), ("blurred", _box_blur(held_out, radius)),
                              ("noise", noise)]}
    fds = [scores[k]["fd"] for k in ("real", "blurred", "noise")]
    assert fds[0] < fds[1] < fds[2], fds
    assert fds[0] < 0.25 * fds[1]
    kids = [scores[k]["kid"] for k in ("real", "blurred", "noise")]
    assert kids[0] < kids[1] < kids[2], kids
    # Classifier score: real digits are confidently classified into 10 balanced classes.
    assert scores["real"]["classifier_score"] > 7.0
    assert scores["noise"]["classifier_score"] < scores["real"]["classifier_score"]


def test_classifier_training_is_reproducible_from_a_seed(tmp_path):
    kwargs = dict(epochs=2, max_train_images=256)
    a, info_a = classifier.train_classifier("digits8", seed=3, **kwargs)
    b, _ = classifier.train_classifier("digits8", seed=3, **kwargs)
    c, _ = classifier.train_classifier("digits8", seed=4, **kwargs)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not all(np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights()))
    assert info_a["test_accuracy"] > 0.3  # 2 epochs on 256 images: far above chance (0.1)
    assert info_a["num_train"] == 256 and info_a["num_test"] == 359
    classifier.save_classifier(a, info_a, str(tmp_path))
    loaded, info = classifier.load_classifier("digits8", str(tmp_path))
    assert info["seed"] == 3
    for wa, wl in zip(a.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(wa, wl)
    with pytest.raises(FileNotFoundError, match="bin/train_classifier"):
        classifier.load_classifier("mnist32", str(tmp_path))
