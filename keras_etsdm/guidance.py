"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    ε̂(x, t, y) = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅)

with ∅ the null class that a class-conditional ``DiffusionModel`` trains with label dropout.
``w = 0`` is the plain conditional model; larger ``w`` trades diversity for class fidelity.
(diffusers' ``guidance_scale`` s is ``1 + w`` in this notation.)

The wrapper is a denoiser like any other, ``(x, t, y, guidance_scale) -> ε̂``: DDPM, DDIM and
DPM-Solver(++) use it without change, thresholding included (it acts on the x̂0 implied by the
guided ε̂, which is where Saharia et al. introduced it). Both branches are ONE network call on
the batch ``[x; x]`` with labels ``[y; ∅]`` (2B per NFE), through ``DiffusionModel.denoise`` —
the same seam as everything else, so E-TSDM sharing and any ``denoise`` override apply to both.
The labels and w are inputs of the compiled sampling loop, not constants: new labels or a new w
reuse the compiled loop.

For v- and x0-prediction models the same combination is applied to the native predictions
(``prediction_type`` is forwarded, the sampler converts the guided output): the conversion to ε
at a state x is affine, ``ε = a x + b p`` with (a, b) set by (α, σ) alone, and the weights
(1 + w) and −w sum to 1, so guiding v̂ or x̂0 gives exactly the ε̂ guided above.
"""

import math

import numpy as np
from keras import ops


class ClassifierFreeGuidance:
    """``ε̂ = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅)`` over a class-conditional ``DiffusionModel``.

    Args:
        model: a ``DiffusionModel`` with ``num_classes`` set.

    Call: ``guided(x [B,H,W,C], t [B] float labels, y int [B], guidance_scale float scalar)
    -> [B,H,W,C]`` guided prediction (ε̂, v̂ or x̂0 as the model's ``prediction_type``).
    """

    def __init__(self, model):
        if not getattr(model, "conditional", False):
            raise ValueError("Classifier-free guidance needs a class-conditional model "
                             "(DiffusionModel with num_classes=K); this one is unconditional.")
        self.model = model

    @property
    def schedule(self):
        return self.model.schedule

    @property
    def prediction_type(self):
        """The model's: the guided output is a prediction of the same kind."""
        return self.model.prediction_type

    def cache_key(self):
        """Compiled sampling loops are shared by every wrapper of the same model."""
        return ("classifier_free_guidance", id(self.model))

    def __call__(self, x, t, y, guidance_scale):
        batch = ops.shape(x)[0]
        t = ops.convert_to_tensor(t, dtype="float32")
        if len(t.shape) == 0:
            t = ops.broadcast_to(t, (batch,))
        y = ops.cast(y, "int32")
        if len(y.shape) == 0:
            y = ops.broadcast_to(y, (batch,))
        null = ops.full_like(y, self.model.null_id)
        eps = self.model.denoise(ops.concatenate([x, x], axis=0),
                                 ops.concatenate([t, t], axis=0),
                                 y=ops.concatenate([y, null], axis=0))
        eps = ops.cast(eps, x.dtype)
        cond, uncond = eps[:batch], eps[batch:]
        w = ops.cast(guidance_scale, x.dtype)
        return cond + w * (cond - uncond)


def check_guidance_scale(guidance_scale):
    """w must be a finite number; returns it as a python float."""
    try:
        value = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}.")
    return value


def sampling_inputs(model, batch, labels=None, guidance_scale=0.0):
    """The denoiser and conditioning inputs a sampler needs for ``batch`` samples.

    Args:
        model: a ``DiffusionModel``.
        batch: number of samples B.
        labels: None (unconditional; a conditional model then samples its null class), an int
            (every sample), or ``B`` ints in ``[0, K]`` (K = null = unconditional).
        guidance_scale: w of classifier-free guidance (0: none). Needs ``labels``.

    Returns:
        ``(denoiser, conditioning)``: pass as ``sampler.sample(denoiser, noise,
        **conditioning)``. With ``w = 0`` the model itself (B per NFE), else a
        ``ClassifierFreeGuidance`` (2B per NFE).
    """
    w = check_guidance_scale(guidance_scale)
    if labels is None:
        if w != 0.0:
            raise ValueError(f"guidance_scale={w} needs class labels (labels=..., one per "
                             f"sample): guidance pushes each sample towards its label.")
        if model.conditional:
            return model, {"y": np.full((batch,), model.null_id, np.int32)}
        return model, {}
    values = model.check_labels(labels)
    if values.size == 1 and np.ndim(labels) == 0:
        values = np.full((batch,), int(values[0]), np.int32)
    if values.shape[0] != batch:
        raise ValueError(f"Got {values.shape[0]} class labels for {batch} samples; give one "
                         f"label per sample (or a single int for all).")
    if w == 0.0:
        return model, {"y": values}
    return guided_denoiser(model), {"y": values, "guidance_scale": np.float32(w)}


def guided_denoiser(model):
    """The model's (cached) ``ClassifierFreeGuidance`` wrapper."""
    guided = getattr(model, "_classifier_free_guidance", None)
    if guided is None:
        guided = ClassifierFreeGuidance(model)
        model._classifier_free_guidance = guided
    return guided
