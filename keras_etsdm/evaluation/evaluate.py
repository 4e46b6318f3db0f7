"""Reference data and statistics for sample-quality metrics.

    compute_stats(data="embedded:mnist", image_size=32, extractor=..., stats_path=...)

Scoring a trained model (``bin/eval``) is ``cli.run_eval``.
"""

import os

import numpy as np

from keras_etsdm.data import embedded
from keras_etsdm.data.files import list_image_files
from keras_etsdm.evaluation import fid, heldout
from keras_etsdm.evaluation.features import make_extractor
from keras_etsdm.io_utils import to_uint8
from keras_etsdm.samplers.sampling import generate


# ----- data for reference statistics ------------------------------------------------------------
def load_reference_images(data, image_size=None, channels=None, max_images=None):
    """uint8 images ``[N, S, S, C]`` for reference statistics.

    Args:
        data: ``"embedded:mnist"`` / ``"embedded:digits"`` (the training data that ships with
            the package), an ``.npz`` with key ``images`` (uint8, e.g. ``bin/sample`` output) or
            a folder of image files (centre-cropped and resized to ``image_size``).
        image_size: output size (embedded: pad size, default native; folder: required).
        channels: 1 or 3 for folders (default 3).
        max_images: use only the first ``max_images`` (None: all).
    """
    if not data:
        raise ValueError("No reference data given: use --data=embedded:mnist, a .npz of uint8 "
                         "images (key 'images') or a folder of images.")
    if data.startswith("embedded:"):
        name = data.split(":", 1)[1]
        loaders = {"mnist": (embedded.load_mnist, 32), "digits": (embedded.load_digits, 8)}
        if name not in loaders:
            raise ValueError(f"Unknown embedded data set {name!r}; expected one of "
                             f"{sorted(loaders)}.")
        loader, default = loaders[name]
        images = to_uint8(loader(image_size or default))
    elif data.endswith(".npz"):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"Reference image file {data!r} does not exist.")
        with np.load(data) as f:
            if "images" not in f.files:
                raise ValueError(f"{data!r} has no 'images' array (found {f.files}).")
            images = f["images"]
        if images.dtype != np.uint8:
            raise ValueError(f"{data!r}: images must be uint8 in [0, 255], got {images.dtype}.")
    else:
        images = _load_folder(data, image_size, channels or 3, max_images)
    if max_images is not None:
        images = images[:max_images]
    return images


def _load_folder(path, image_size, channels, max_images):
    from PIL import Image

    if not image_size:
        raise ValueError("A folder of images needs --image_size (centre crop + resize).")
    files = list_image_files(path)[:max_images]
    out = np.empty((len(files), image_size, image_size, channels), np.uint8)
    for i, name in enumerate(files):
        with Image.open(name) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                            (h - side) // 2 + side))
            img = img.resize((image_size, image_size), Image.BICUBIC)
            arr = np.asarray(img, np.uint8)
        out[i] = arr[..., None] if channels == 1 else arr
    return out


def default_stats_path(workdir, extractor_name):
    return os.path.join(workdir or ".", "eval", f"reference_{extractor_name}.npz")


def compute_stats(data, stats_path, extractor="classifier_mnist32", inception_path=None,
                  image_size=None, channels=None, batch_size=250, max_images=None,
                  max_kid_activations=10000):
    """Reference statistics of ``data`` with ``extractor`` → ``stats_path`` (.npz). Returns it."""
    images = load_reference_images(data, image_size, channels, max_images)
    ex = make_extractor(extractor, inception_path)
    ref = fid.compute_reference_statistics(images, ex, batch_size, max_kid_activations,
                                           metadata={"data": data})
    ref.save(stats_path)
    return ref


# ----- quality during training ----------------------------------------------------------------
def sample_quality_fn(reference, sampler, num_samples=1000, seed=0, batch_size=250,
                      extractor=None, use_ema=True):
    """``eval_fn(model, step)`` for ``callbacks.PeriodicEvaluation``: FD and KID of
    ``num_samples`` samples against ``reference``.

    Args:
        reference: ``fid.ReferenceStatistics``, or the name of shipped statistics
            (``"mnist32_test"``: the MNIST test set, see ``heldout``).
        sampler: built on the model's schedule (``bin/train``: DDIM-20).
        num_samples, seed: N and the noise seed (the same noise at every evaluation, so the
            curve moves with the model only).
        extractor: feature extractor (default: the one the reference was computed with).
        use_ema: sample with the EMA weights (the weights a user samples).

    ``eval_fn.check(model)`` raises the same clear error as a call would when the reference is
    of another image shape. The returned dict holds ``metrics`` (``fd``, ``kid``, ``kid_std``)
    and ``info`` (sampler, N, seed, weights, reference and extractor names), all written to
    ``metrics.jsonl``.
    """
    name = reference if isinstance(reference, str) else reference.metadata.get("data", "custom")
    if isinstance(reference, str):
        reference = heldout.load_reference(reference)
    extractor = extractor or make_extractor(reference.extractor)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs two), got {num_samples}.")
    info = {"eval_sampler": type(sampler).__name__, "eval_nfe": int(sampler.num_iterations),
            "eval_num_samples": int(num_samples), "eval_seed": int(seed),
            "eval_weights": "ema" if use_ema else "raw", "eval_reference": name,
            "eval_extractor": extractor.name}
    expected = reference.metadata.get("image_shape")

    def check(model):
        if expected is not None and list(model.image_shape) != list(expected):
            raise ValueError(f"Reference statistics {name!r} are of {expected} images but the "
                             f"model makes {list(model.image_shape)}; evaluate against "
                             f"statistics of data of the model's shape.")

    def eval_fn(model, step):
        del step
        check(model)
        with model.ema_scope(use_ema):
            images = generate(model, sampler, num_samples, batch_size=batch_size, seed=seed)
        metrics = fid.evaluate_images(to_uint8(images), extractor, reference, batch_size)
        return {"metrics": {k: metrics[k] for k in ("fd", "kid", "kid_std") if k in metrics},
                "info": info}

    eval_fn.check = check  # the run driver checks the model before training, not after
    return eval_fn
