"""The logic of ``bin/eval`` and ``bin/lipschitz`` (the scripts only parse flags).

    compute_stats(data="embedded:mnist", image_size=32, extractor=..., stats_path=...)
    run_eval(workdir=..., sampler="ddim", steps=20, num_samples=N, stats_path=...)
    run_lipschitz(workdirs={"ddpm": ..., "etsdm": ...}, data="embedded:mnist", output_dir=...)
"""

import os

import numpy as np

from keras_etsdm.evaluation import fid
from keras_etsdm.evaluation.features import make_extractor


# ----- data for reference statistics ---------------------------------------------------------------
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
        from keras_etsdm.data import embedded

        name = data.split(":", 1)[1]
        loaders = {"mnist": (embedded.load_mnist, 32), "digits": (embedded.load_digits, 8)}
        if name not in loaders:
            raise ValueError(f"Unknown embedded data set {name!r}; expected one of "
                             f"{sorted(loaders)}.")
        loader, default = loaders[name]
        images = fid.to_uint8(loader(image_size or default))
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

    from keras_etsdm.data.files import list_image_files

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


# ----- sample-quality evaluation -------------------------------------------------------------------
def run_eval(sampler="ddim", steps=20, num_samples=1000, stats_path=None, workdir=None,
             checkpoint=None, extractor="classifier_mnist32", inception_path=None,
             batch_size=250, seed=0, use_ema=True, sampler_options=None, output=None,
             save_samples=True, progress=False, labels=None, guidance_scale=0.0):
    """Draw samples and score them against reference statistics; write a provenance JSON.

    Class-conditional models: ``labels`` (a ``sampling.parse_labels`` string — ``"balanced"``
    for every class equally often, ``"3"`` for one class — or int ids) and classifier-free
    guidance ``guidance_scale``; with a project digit classifier as extractor the record also
    holds ``class_agreement`` (fraction of samples the classifier assigns to the requested
    label) overall and per class.

    Returns the result record (dict). The JSON goes to ``output`` (default
    ``<workdir>/eval/<sampler>_<steps>_<ema|raw>_seed<seed>[_w<w>].json``).
    """
    from keras_etsdm.samplers import SAMPLERS, build_sampler, labels_below
    from keras_etsdm.samplers import sampling

    key = str(sampler).lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}.")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs two), got {num_samples}.")
    stats_path = stats_path or default_stats_path(workdir, extractor)
    reference = fid.ReferenceStatistics.load(stats_path)  # fail before sampling, not after
    ex = make_extractor(extractor, inception_path)
    model = sampling.load_model_for_sampling(checkpoint, workdir, use_ema)
    labels, num_samples = sampling.parse_labels(labels, num_samples, model.num_classes)
    sampler_obj = build_sampler(key, model.schedule, steps, sampler_options)
    images = fid.to_uint8(sampling.generate(model, sampler_obj, num_samples, batch_size, seed,
                                            progress, labels, guidance_scale))
    metrics = fid.evaluate_images(images, ex, reference, batch_size, labels=labels)
    weights = "ema" if use_ema else "raw"
    config = {k: v for k, v in sampler_obj.get_config().items() if k != "schedule"}
    record = fid.make_result_record(
        metrics=metrics, num_samples=num_samples, sampler=key, steps=sampler_obj.num_iterations,
        seed=seed, weights=weights, extractor=ex.name, reference_file=stats_path,
        sampler_config=config, workdir=workdir and os.path.abspath(workdir),
        checkpoint=checkpoint or getattr(model, "checkpoint_step", None),
        extra={"metric_names": {"fd": "FID" if ex.name == "inception_v3"
                                else f"FD ({ex.name})"},
               "reference_count": reference.count,
               "sharing": model.sharing.get_config(),
               "labels_below_t_tilde": labels_below(
                   sampler_obj, model.sharing.t_tilde if model.sharing.enabled else 100.0),
               **({} if not model.conditional else {
                   "num_classes": model.num_classes,
                   "guidance_scale": float(guidance_scale),
                   "class_labels": None if labels is None else
                   {"counts": np.bincount(labels, minlength=model.num_classes + 1).tolist()}})})
    if output is None:
        guided = f"_w{float(guidance_scale):g}" if model.conditional else ""
        output = os.path.join(workdir or os.path.dirname(stats_path), "eval",
                              f"{key}_{sampler_obj.num_iterations}_{weights}_seed{seed}"
                              f"{guided}.json")
    fid.write_result_json(output, record)
    if save_samples:
        sampling.write_outputs(images, os.path.dirname(output),
                               name=os.path.splitext(os.path.basename(output))[0] + "_samples")
    record["output"] = output
    return record


# ----- Lipschitz diagnostic on trained models ----------------------------------------------------------
def run_lipschitz(workdirs, data, output_dir, num_images=64, use_ema=True, seed=0,
                  timesteps=None, zoom=200, title=None, label=None):
    """K(t) of one or more trained models (name → workdir) on the same data and noise.

    Writes ``lipschitz.csv`` and ``lipschitz.png`` into ``output_dir``; returns the curves.
    Class-conditional models are evaluated at class ``label`` (None: the null class, i.e. the
    unconditional ε̂).
    """
    from keras_etsdm.evaluation import lipschitz
    from keras_etsdm.samplers import sampling

    curves = {}
    for name, workdir in workdirs.items():
        model = sampling.load_model_for_sampling(None, workdir, use_ema)
        size = model.image_shape[0]
        images = load_reference_images(data, size)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(images), min(num_images, len(images)), replace=False)
        x0 = images[np.sort(pick)].astype(np.float32) / 127.5 - 1.0
        fn = lipschitz.model_denoise_fn(model, label=label)
        curves[name] = lipschitz.lipschitz_curve(fn, x0, model.schedule, timesteps,
                                                 sharing=model.sharing, seed=seed)
    lipschitz.write_lipschitz_outputs(output_dir, curves, zoom=zoom, title=title)
    return curves
