"""The logic of ``bin/sample``: load a checkpoint, draw samples, write ``.npz`` + PNG grid.

Reproducibility: the starting noise is drawn with numpy (``default_rng(seed)``) for all N
samples at once, so the same seed gives the same x_T on every backend and for every batch size;
batch ``b`` of a stochastic sampler uses the step-noise seed ``[seed, b]``.
"""

import io
import os

import keras
import numpy as np

from keras_etsdm.guidance import sampling_inputs
from keras_etsdm.io_utils import atomic_write_bytes, image_grid, save_png, to_uint8
from keras_etsdm.samplers import SAMPLERS, build_sampler


def load_model_for_sampling(checkpoint=None, workdir=None, use_ema=True):
    """``checkpoint.load_model`` (the one loader, and its EMA rule) for ``bin/sample``,
    ``bin/eval`` and ``bin/lipschitz``: a ``.keras`` file or a training work directory."""
    from keras_etsdm.checkpoint import load_model

    return load_model(workdir=workdir, checkpoint=checkpoint, use_ema=use_ema)


def generate(model, sampler, num_samples, batch_size=64, seed=0, progress=False, labels=None,
             guidance_scale=0.0):
    """``num_samples`` float32 images ``[N, H, W, C]`` (nominally in [−1, 1]).

    The network is used as it is (``load_model_for_sampling`` already chose EMA or raw).
    ``labels`` (``[N]`` class ids, conditional models) and ``guidance_scale`` (classifier-free
    guidance w) are split into batches with the noise; see ``guidance.sampling_inputs``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if model.image_shape is None or None in model.image_shape:
        raise ValueError("The model's network has no static image shape.")
    if labels is not None:
        labels = model.check_labels(labels)
        if labels.shape[0] != num_samples:
            raise ValueError(f"Got {labels.shape[0]} class labels for {num_samples} samples.")
    sampling_inputs(model, 1, None if labels is None else labels[:1], guidance_scale)  # checks
    noise = np.random.default_rng(seed).standard_normal(
        (num_samples,) + tuple(model.image_shape)).astype(np.float32)
    out = []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        batch = noise[start:start + batch_size]
        batch_labels = None if labels is None else labels[start:start + batch_size]
        denoiser, conditioning = sampling_inputs(model, batch.shape[0], batch_labels,
                                                 guidance_scale)
        x = sampler.sample(denoiser, batch, seed=[seed, b], progress=progress, **conditioning)
        out.append(np.asarray(keras.ops.convert_to_numpy(x)))
    return np.concatenate(out, axis=0)


def parse_labels(text, num_samples=None, num_classes=None):
    """Class labels for ``num_samples`` samples from a command-line string.

    * ``"3,3,7"``: these labels; with ``num_samples`` (a multiple of their count) repeated
      to fill it, without it one sample per label.
    * ``"balanced"``: ``i mod K`` for sample i (every class equally often; needs K).
    * ``None`` / ``""``: no labels (unconditional); a list or array of ids is taken as is.

    Returns ``(labels int32 [N] or None, N)``.
    """
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return None, num_samples
    if not isinstance(text, str):  # already ids (a list or an array)
        text = ",".join(str(int(v)) for v in np.asarray(text).reshape(-1))
    text = text.strip()
    if text.lower() == "balanced":
        if num_classes is None:
            raise ValueError("--labels=balanced needs a class-conditional model.")
        if num_samples is None:
            raise ValueError("--labels=balanced needs --num_samples.")
        return np.arange(num_samples, dtype=np.int32) % num_classes, num_samples
    try:
        labels = np.asarray([int(v) for v in text.split(",") if v.strip() != ""], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integer class ids or 'balanced', "
                         f"got {text!r}.") from None
    if labels.size == 0:
        return None, num_samples
    if num_samples is None:
        return labels, int(labels.size)
    if num_samples % labels.size:
        raise ValueError(f"--num_samples={num_samples} is not a multiple of the {labels.size} "
                         f"labels given ({text!r}); give one label per sample or a divisor.")
    return np.tile(labels, num_samples // labels.size), num_samples


def write_outputs(images_uint8, output_dir, name="samples", metadata=None):
    """Write ``<name>.npz`` (key ``images``, plus metadata) and ``<name>.png`` atomically."""
    os.makedirs(output_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, images=images_uint8, **{k: np.asarray(v) for k, v in (metadata or {}).items()})
    npz_path = os.path.join(output_dir, f"{name}.npz")
    atomic_write_bytes(npz_path, buf.getvalue())
    png_path = os.path.join(output_dir, f"{name}.png")
    save_png(png_path, image_grid(images_uint8))
    return npz_path, png_path


def parse_options(text):
    """``"order=3,method=singlestep"`` or JSON ``'{"order": 3}'`` → a dict of arguments."""
    import ast
    import json

    if text and text.strip().startswith("{"):
        return json.loads(text)

    options = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"Sampler option {item!r} is not of the form key=value.")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def run_sample(sampler_name, steps, num_samples, output_dir, checkpoint=None, workdir=None,
               batch_size=64, seed=0, use_ema=True, options=None, progress=False, labels=None,
               guidance_scale=0.0):
    """Everything ``bin/sample`` does. Returns the paths written.

    ``labels``: a ``parse_labels`` string (``"3,3,7"``, ``"balanced"``) or int ids; with
    ``guidance_scale`` w, classifier-free guidance. ``num_samples=None``: one per label (64
    without labels).
    """
    key = str(sampler_name).lower().replace("-", "_")
    if key not in SAMPLERS:  # before the (slow) model load
        raise ValueError(f"Unknown sampler {sampler_name!r}; expected one of {sorted(SAMPLERS)}.")
    model = load_model_for_sampling(checkpoint, workdir, use_ema)
    labels, num_samples = parse_labels(labels, num_samples, model.num_classes)
    num_samples = 64 if num_samples is None else num_samples
    sampler = build_sampler(key, model.schedule, steps, options)
    images = generate(model, sampler, num_samples, batch_size, seed, progress, labels,
                      guidance_scale)
    meta = {"sampler": key, "sampler_config": repr(sampler.get_config()), "seed": seed,
            "use_ema": use_ema, "nfe": sampler.num_iterations,
            "guidance_scale": float(guidance_scale)}
    if labels is not None:
        meta["labels"] = labels
    return write_outputs(to_uint8(images), output_dir, metadata=meta)
