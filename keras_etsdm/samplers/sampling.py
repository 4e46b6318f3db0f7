"""Draw N samples in batches from a model with a sampler (``generate``; ``bin/sample`` is
``cli.run_sample``).

Reproducibility: the starting noise is drawn with numpy (``default_rng(seed)``) for all N
samples at once, so the same seed gives the same x_T on every backend and for every batch size;
batch ``b`` of a stochastic sampler uses the step-noise seed ``[seed, b]``.
"""

import keras
import numpy as np

from keras_etsdm.guidance import sampling_inputs


def generate(model, sampler, num_samples, batch_size=64, seed=0, progress=False, labels=None,
             guidance_scale=0.0):
    """``num_samples`` float32 images ``[N, H, W, C]`` (nominally in [−1, 1]).

    The network is used as it is (``checkpoint.load_model`` already chose EMA or raw).
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
