"""Samplers: DDPM, DDIM, DPM-Solver / DPM-Solver++ and the reverse-SDE samplers (Euler–Maruyama,
predictor–corrector; ``sde.py``) as compiled ``keras.ops`` loops, and the probability-flow ODE
with an adaptive scipy solver (``ode.py``, "pf_ode"). All run on discrete and continuous
schedules.

    sampler = get_sampler("dpm_solver", num_steps=20, order=3, schedule=model.schedule)
    images = model.sample(sampler, num_samples=16, seed=0)      # or sampler.sample(model, noise)

See ``base.py`` for the interface, the compiled loop and the pure ``build_loop`` used by export.
Gin names for the sampler classes are registered in ``keras_etsdm.config`` (e.g.
``@keras_etsdm.DPMSolverSampler()`` in a config).
"""

import inspect

from keras_etsdm.samplers.base import Sampler, clear_compiled_cache, labels_below, seed_tensor
from keras_etsdm.samplers.ddim import DDIM_SPACINGS, DDIMSampler, ddim_timesteps
from keras_etsdm.samplers.ddpm import DDPM_VARIANCES, DDPMSampler, respaced_timesteps
from keras_etsdm.samplers.dpm_solver import (ALGORITHMS, METHODS, SKIP_TYPES, DPMSolverSampler,
                                             multistep_orders, singlestep_orders, time_grid)
from keras_etsdm.samplers.ode import ODE_METHODS, ProbabilityFlowSampler
from keras_etsdm.samplers.sde import (CORRECTORS, PREDICTORS, EulerMaruyamaSampler,
                                      PredictorCorrectorSampler, ReverseSDESampler)

SAMPLERS = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpm_solver": DPMSolverSampler,
    "pf_ode": ProbabilityFlowSampler,
    "euler_maruyama": EulerMaruyamaSampler,
    "pc": PredictorCorrectorSampler,
    "reverse_sde": ReverseSDESampler,
}


def get_sampler(name, **kwargs):
    """Build a sampler by name: "ddpm", "ddim", "dpm_solver", "pf_ode", "euler_maruyama", "pc"
    or "reverse_sde" (keyword arguments → constructor).

    Also accepts a ``{"class_name": ..., "config": ...}`` dict as written by ``serialize``.
    """
    if isinstance(name, dict):
        return deserialize(name)
    key = str(name).lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}.")
    return SAMPLERS[key](**kwargs)


def build_sampler(name, schedule, steps=None, options=None, sharing=None):
    """The one place that builds and checks a sampler from a name, a step count and options
    (``bin/sample``, ``bin/eval``, ``bin/export``, the benchmarks).

    Args:
        name: a ``SAMPLERS`` key (case and "-" / "_" do not matter).
        schedule: the model's schedule.
        steps: ``num_steps`` in ``[1, T]``; None keeps the sampler's default. Must be None for
            the adaptive "pf_ode" (its NFE follows from ``rtol`` / ``atol``).
        options: further constructor arguments, e.g. ``{"order": 3, "method": "singlestep"}``
            (``num_steps`` and ``schedule`` are set by the arguments above). The option
            ``sharing_aware=True`` makes the grid sharing-aware for ``sharing``;
            ``sharing_labels=False`` then keeps its knots but calls the network at the true
            labels (any denoiser, with or without E-TSDM: the same grid as a control).
        sharing: the model's ``TimestepSharing`` (used only with ``sharing_aware``).
    """
    key = str(name).lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}.")
    options = dict(options or {})
    if getattr(SAMPLERS[key], "adaptive", False):
        if steps is not None:
            raise ValueError(f"Sampler {name!r} is adaptive: its NFE follows from rtol / atol "
                             f"(options), not from a step count; omit steps (--steps).")
        if "sharing_aware" in options:
            raise ValueError(f"Sampler {name!r} has no step grid to make sharing-aware.")
    for reserved, instead in (("num_steps", "the steps argument"),
                              ("schedule", "the model's schedule")):
        if reserved in options:
            raise ValueError(f"Sampler option {reserved!r} is set from {instead}; remove it "
                             f"from the options.")
    if _flag(options.pop("sharing_aware", False), "sharing_aware"):
        if "sharing" not in inspect.signature(SAMPLERS[key]).parameters:
            raise ValueError(f"Sampler {name!r} has no sharing-aware grid (sharing_aware is "
                             f"an option of ddim, ddpm and dpm_solver).")
        if "sharing" in options:
            raise ValueError("Give either sharing_aware=True (the model's sharing) or sharing, "
                             "not both.")
        if sharing is None:
            raise ValueError("sharing_aware needs the model's TimestepSharing "
                             "(build_sampler(..., sharing=model.sharing)).")
        if not sharing.enabled:
            raise ValueError(f"sharing_aware=True but the model has no E-TSDM sharing "
                             f"({sharing!r}): there are no pieces to align the grid with.")
        options["sharing"] = sharing
    if "sharing_labels" in options:  # a command line gives "false"
        options["sharing_labels"] = _flag(options["sharing_labels"], "sharing_labels")
    T = schedule.num_timesteps
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= T:
            raise ValueError(f"steps must be between 1 and the model's T={T}, got {steps}.")
        options["num_steps"] = int(steps)
    return SAMPLERS[key](schedule=schedule, **options)


def _flag(value, name):
    """A boolean option given as a bool, 0/1 or a "true"/"false" string (command lines)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
    elif isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"Sampler option {name} must be true or false, got {value!r}.")


def serialize(sampler):
    """``{"class_name": registry name, "config": sampler.get_config()}``."""
    for key, cls in SAMPLERS.items():
        if type(sampler) is cls:
            return {"class_name": key, "config": sampler.get_config()}
    raise TypeError(f"Not a registered sampler: {type(sampler)}.")


def deserialize(config):
    name = config.get("class_name")
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name].from_config(config.get("config", {}))


__all__ = [
    "Sampler", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "ProbabilityFlowSampler",
    "ReverseSDESampler", "EulerMaruyamaSampler", "PredictorCorrectorSampler", "PREDICTORS",
    "CORRECTORS",
    "get_sampler", "build_sampler", "ODE_METHODS",
    "labels_below", "serialize", "deserialize", "SAMPLERS", "seed_tensor", "clear_compiled_cache",
    "ddim_timesteps", "respaced_timesteps",
    "time_grid", "singlestep_orders", "multistep_orders", "DDIM_SPACINGS", "DDPM_VARIANCES",
    "SKIP_TYPES", "METHODS", "ALGORITHMS",
]
