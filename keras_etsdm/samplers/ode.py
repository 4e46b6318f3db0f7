"""The probability-flow ODE sampler with an adaptive solver (score_sde's ``ode_sampler``).

The probability-flow ODE of a VP process (Song et al. 2021, eq. 13) is

    dx/dt = f(t) x − ½ g(t)² ∇log p_t(x),    ∇log p_t(x) = −ε̂(x, t) / σ_t,

on the continuous-time view of the schedule, with ``f(t) = d log α(t)/dt`` and
``g(t)² = dσ(t)²/dt − 2 f(t) σ(t)²``. For a VP schedule (α² + σ² = 1) ``dσ²/dt = −2 f α²``, so
``g² = −2 f`` and the ODE is

    dx/dt = f(t) · (x − ε̂(x, t) / σ_t).

* ``ContinuousVPSchedule`` (``LinearVPSDE``): ``f(t) = −½ β(t)`` in closed form, e.g.
  ``β(t) = β_min + t (β_max − β_min)`` for score_sde's VP-SDE.
* ``DiscreteVPSchedule``: ``log α(t)`` is piecewise linear over the knots ``t_n = (n + 1)/T``
  (the DPM-Solver discrete wrapper), so ``f`` is piecewise CONSTANT,
  ``f(t) = T·(log α_{n+1} − log α_n)`` on ``[t_n, t_{n+1})``, and jumps at every knot (by
  ≈ 1e-5·T relative for linear β). The ODE's right-hand side is then only piecewise smooth;
  the adaptive solver copes (its step-size control sees the kinks as local error) and the
  exact solution for Gaussian data depends only on α, σ at the two ends, so it is still the
  reference the tests compare with.

The sampler integrates from the schedule's ``T`` (1; 0.9946 for cosine) down to ``t = eps``
(default the schedule's ``eps``: ``1/T`` = label 0 for a ``DiscreteVPSchedule``, like
DPM-Solver; no final denoising step, as score_sde's default) with ``scipy.integrate.solve_ivp`` in float64 on the
host; the whole batch is one state vector with one ``rtol`` / ``atol`` (as score_sde). Each
right-hand-side evaluation is ONE network evaluation through the denoiser (a
``DiffusionModel``'s ``denoise``: E-TSDM's time sharing applies there, unseen by the solver),
at the float32 label ``schedule.label(t)`` (``(t − 1/T)·T`` discrete, t itself on a continuous
schedule). The denoiser call is compiled once per (denoiser, input shapes) by the same path as
the table-driven samplers (``_compiled.CompiledSegment``: ``jax.jit`` with the weights as
arguments, or ``tf.function``, with XLA where it pays); the solver loop itself runs in Python.

The number of network evaluations is chosen by the solver: ``last_nfe`` (and
``nfe_history``, one entry per ``sample`` call) report it.

v- and x0-prediction denoisers (``prediction_type`` attribute, e.g. a ``DiffusionModel``): ε̂ is
formed on the host in float64 with ``parameterization.to_eps_and_x0`` and the continuous-time
α(t), σ(t). On a zero-terminal-SNR schedule the integration starts at t = 1 where that view's α
is the clamped ``schedules._terminal_log_alpha`` (finite λ), not 0.
"""

import collections
import math

import numpy as np
from keras import ops

from keras_etsdm import backend as etsdm_backend
from keras_etsdm.parameterization import check_prediction_type, to_eps_and_x0
from keras_etsdm.samplers import _compiled
from keras_etsdm.samplers.base import (_conditioning_tensors, denoiser_cache_key,
                                       prediction_type_of)
from keras_etsdm.schedules import DiscreteVPSchedule, schedule_from_config

# The explicit and implicit solvers of scipy.integrate.solve_ivp.
ODE_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")

_CACHE_SIZE = 16
_COMPILED_DENOISERS = collections.OrderedDict()  # denoiser key -> compiled fn, LRU


def parse_schedule(schedule):
    """None → the default ``DiscreteVPSchedule()``; a config dict → its schedule
    (``schedule_from_config``); a schedule is returned as is."""
    if schedule is None:
        return DiscreteVPSchedule()
    if isinstance(schedule, dict):
        return schedule_from_config(schedule)
    if not all(hasattr(schedule, name) for name in ("marginal_log_mean_coeff_derivative",
                                                      "time_of_log_mean_coeff")):
        raise TypeError(f"schedule must be a DiscreteVPSchedule or a ContinuousVPSchedule, got "
                        f"{type(schedule)}.")
    return schedule


def drift_coefficient(schedule, t):
    """``f(t) = d log α(t) / dt`` (numpy float64, the shape of ``t``; units 1 / time), from the
    schedule's ``marginal_log_mean_coeff_derivative`` (piecewise constant for a
    ``DiscreteVPSchedule``, ``−½ β(t)`` for a ``ContinuousVPSchedule``)."""
    return np.asarray(schedule.marginal_log_mean_coeff_derivative(t), np.float64)


def time_of_log_alpha(schedule, log_alpha):
    """The time ``t`` with ``marginal_log_mean_coeff(t) == log_alpha`` (numpy float64), from the
    schedule's ``time_of_log_mean_coeff``."""
    return np.asarray(schedule.time_of_log_mean_coeff(log_alpha), np.float64)


def _positive_float(name, value):
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def check_ode_options(rtol, atol, method, eps, schedule):
    """Validate the solver options shared by the sampler and the likelihood; returns
    ``(rtol, atol, method, eps)`` with ``eps`` resolved (None → ``schedule.eps``)."""
    rtol = _positive_float("rtol", rtol)
    atol = _positive_float("atol", atol)
    if method not in ODE_METHODS:
        raise ValueError(f"Unknown ODE method {method!r}; expected one of {ODE_METHODS} "
                         f"(scipy.integrate.solve_ivp).")
    return rtol, atol, method, check_end_time(eps, schedule)


def check_end_time(eps, schedule):
    """The end time of an integration from ``schedule.ode_T`` down (PF-ODE, likelihood,
    reverse SDE): None → ``schedule.eps``; otherwise it must lie in ``[schedule.eps, ode_T)``.
    Returns it as a float."""
    eps = float(schedule.eps) if eps is None else _positive_float("eps", eps)
    # Below the schedule's eps a discrete model would get negative labels (and a continuous
    # one times it was never trained on); at or above the start there is nothing to integrate.
    if not float(schedule.eps) * (1.0 - 1e-12) <= eps < float(schedule.ode_T):
        raise ValueError(f"eps must be in [{schedule.eps:g}, {schedule.ode_T:g}) (the "
                         f"schedule's time interval), got {eps!r}.")
    return eps


TIME_VARIABLES = ("log_alpha", "t")


class ODETime:
    """The independent variable v of the integration and its map to the schedule's time.

    ``"t"``: v = t and ``dx/dt = f(t)·(x − ε̂/σ_t)`` (score_sde's form). ``"log_alpha"``:
    v = log α(t); since ``d log α/dt = f``, ``dx/dv = x − ε̂/σ``. The same ODE, but in
    ``log α`` the right-hand side has no ``f(t)`` factor, so for a ``DiscreteVPSchedule`` (f
    piecewise constant, 999 jumps) it is smooth wherever ε̂ is smooth in (α, σ): RK45's error
    control then works as designed. In t, the jumps of f break RK45's error estimate: on the
    Gaussian closed form at rtol = atol = 1e-5 the error is 24× (JAX) to 219× (TensorFlow) the
    tolerance and does not fall with it, while in log α it stays ≤ 3.1× from 1e-3 to 1e-6
    (benchmarks/pf_ode_closed_form.py; tests/test_pf_ode.py asserts both).

    Args:
        schedule: the schedule; variable: "log_alpha" or "t"; start, end: times (t units).
    """

    def __init__(self, schedule, variable, start, end):
        if variable not in TIME_VARIABLES:
            raise ValueError(f"Unknown time_variable {variable!r}; expected one of "
                             f"{TIME_VARIABLES}.")
        self.schedule, self.variable = schedule, variable
        if variable == "t":
            self.span = (float(start), float(end))
        else:
            self.span = (float(schedule.marginal_log_mean_coeff(start)),
                         float(schedule.marginal_log_mean_coeff(end)))

    def time(self, v):
        """The schedule time t at the integration variable v."""
        return float(v) if self.variable == "t" else float(time_of_log_alpha(self.schedule, v))

    def factor(self, t):
        """``dlog α/dv`` at time t: f(t) for v = t, 1 for v = log α."""
        return float(drift_coefficient(self.schedule, t)) if self.variable == "t" else 1.0


def check_denoiser_schedule(owner, schedule, denoiser):
    """A denoiser that carries a ``.schedule`` (a ``DiffusionModel``) must use ``schedule``."""
    own = getattr(denoiser, "schedule", None)
    if own is not None and hasattr(own, "get_config"):
        if type(own) is not type(schedule) or own.get_config() != schedule.get_config():
            raise ValueError(f"{owner} was built for {schedule!r} {schedule.get_config()} but "
                             f"the denoiser uses {own!r} {own.get_config()}; build it with "
                             f"schedule=model.schedule.")
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a DiffusionModel or a callable (x, t) -> eps, got "
                        f"{type(denoiser)}.")


def compiled_denoiser(denoiser):
    """``fn(x, t, **conditioning) -> ε̂``, compiled once per denoiser and input signature and
    cached (LRU): a model's ``denoise`` with its weights as arguments on JAX."""
    key = denoiser_cache_key(denoiser)
    if key in _COMPILED_DENOISERS:
        _COMPILED_DENOISERS.move_to_end(key)
        return _COMPILED_DENOISERS[key]
    fn = _compiled.compiled_denoiser(denoiser)
    _COMPILED_DENOISERS[key] = fn
    while len(_COMPILED_DENOISERS) > _CACHE_SIZE:
        _COMPILED_DENOISERS.popitem(last=False)
    return fn


def solve(rhs, t_span, y0, rtol, atol, method):
    """``scipy.integrate.solve_ivp`` (imported here: scipy is needed only by the ODE paths);
    returns ``(y at the end of t_span, nfev)`` and raises if the solver failed."""
    from scipy import integrate

    solution = integrate.solve_ivp(rhs, t_span, y0, rtol=rtol, atol=atol, method=method)
    if not solution.success:
        raise RuntimeError(f"The ODE solver ({method}) failed: {solution.message}")
    return solution.y[:, -1], int(solution.nfev)


class ProbabilityFlowSampler:
    """Sample by integrating the probability-flow ODE from t = 1 to t = eps (see the module).

    Args:
        rtol, atol: relative and absolute tolerances of the solver (> 0), on the whole batch
            as one vector; the NFE grows as they tighten (score_sde: 1e-5 both).
        method: a ``scipy.integrate.solve_ivp`` method, default "RK45" (Dormand–Prince).
        eps: end time in ``[schedule.eps, 1)``; None → ``schedule.eps`` (1/T, label 0, for a
            ``DiscreteVPSchedule``; 1e-3 for the default ``ContinuousVPSchedule``).
        schedule: a ``DiscreteVPSchedule`` (default) or a ``ContinuousVPSchedule`` (or a
            config dict).
        time_variable: the solver's independent variable, "log_alpha" (default: smooth for
            the discrete schedule's piecewise-linear log α) or "t" (score_sde's); see
            ``ODETime``. The ODE and its solution are the same; the NFE and error differ.

    Attributes:
        last_nfe: network evaluations of the last ``sample`` call (None before the first).
        nfe_history: the NFE of every ``sample`` call, in order.
        last_labels: float64 ``[last_nfe]`` labels the last call evaluated, in call order.
    """

    stochastic = False
    adaptive = True  # the NFE is chosen by the solver, not by a step count

    def __init__(self, rtol=1e-5, atol=1e-5, method="RK45", eps=None, schedule=None,
                 time_variable="log_alpha"):
        self.schedule = parse_schedule(schedule)
        if time_variable not in TIME_VARIABLES:
            raise ValueError(f"Unknown time_variable {time_variable!r}; expected one of "
                             f"{TIME_VARIABLES}.")
        self.time_variable = time_variable
        self._eps_arg = None if eps is None else eps
        self.rtol, self.atol, self.method, self.eps = check_ode_options(
            rtol, atol, method, eps, self.schedule)
        self.last_nfe = None
        self.nfe_history = []
        self.last_labels = None

    @property
    def num_iterations(self):
        """The NFE of the last ``sample`` call (None before the first): adaptive."""
        return self.last_nfe

    @property
    def labels(self):
        """The labels evaluated by the last ``sample`` call (empty before the first)."""
        return np.zeros((0,)) if self.last_labels is None else self.last_labels.copy()

    def sample(self, denoiser, noise, seed=0, progress=False, **conditioning):
        """Integrate the PF-ODE from ``noise`` (x at t = 1) to t = eps.

        Args:
            denoiser: a ``DiffusionModel`` (its ``denoise``, E-TSDM sharing included), a
                ``ClassifierFreeGuidance`` wrapper, or a ``keras.ops`` callable
                ``(x [B, ...], t [B] float labels, **conditioning) -> ε̂`` (or v̂ / x̂0 when it
                has that ``prediction_type`` attribute).
            noise: ``[B, ...]`` starting sample x_1 (standard normal for generation).
            seed: unused (the ODE is deterministic); accepted for the common interface.
            progress: unused (the number of evaluations is not known in advance).
            **conditioning: tensors handed to the denoiser at every NFE (``y``,
                ``guidance_scale``), as for the other samplers.
        Returns:
            ``[B, ...]`` float32 samples x_eps. ``last_nfe`` holds the NFE used.
        """
        del seed, progress
        check_denoiser_schedule(type(self).__name__, self.schedule, denoiser)
        prediction_type = check_prediction_type(prediction_type_of(denoiser))
        noise = etsdm_backend.to_numpy(noise).astype(np.float64)
        if noise.ndim < 1 or noise.shape[0] == 0:
            raise ValueError(f"noise must have shape [B, ...] with B >= 1, got {noise.shape}.")
        shape = noise.shape
        conditioning = _conditioning_tensors(conditioning, shape[0])
        eps_fn = compiled_denoiser(denoiser)
        schedule = self.schedule
        clock = ODETime(schedule, self.time_variable, schedule.ode_T, self.eps)
        labels = []

        def rhs(v, y):
            x = y.reshape(shape)
            t = clock.time(v)
            label = float(schedule.label(t))
            labels.append(label)
            t_in = ops.convert_to_tensor(np.full((shape[0],), label, np.float32))
            eps_hat = eps_fn(ops.convert_to_tensor(x.astype(np.float32)), t_in, **conditioning)
            eps_hat = etsdm_backend.to_numpy(eps_hat).astype(np.float64)
            sigma = float(schedule.marginal_std(t))
            if prediction_type != "epsilon":  # v̂ / x̂0 → ε̂ in float64
                alpha = float(schedule.marginal_alpha(t))
                eps_hat, _ = to_eps_and_x0(eps_hat, prediction_type, x, alpha, sigma)
            # dx/dv = (dlog α/dv)(x − ε̂/σ): x in float64, only ε̂ carries float32 rounding.
            return (clock.factor(t) * (x - eps_hat / sigma)).reshape(-1)

        x, nfe = solve(rhs, clock.span, noise.reshape(-1), self.rtol, self.atol, self.method)
        self.last_nfe = nfe
        self.nfe_history.append(nfe)
        self.last_labels = np.asarray(labels, np.float64)
        return ops.convert_to_tensor(x.reshape(shape).astype(np.float32))

    # ----- serialisation ----------------------------------------------------------------------
    def get_config(self):
        return {"rtol": self.rtol, "atol": self.atol, "method": self.method,
                "eps": self._eps_arg, "time_variable": self.time_variable,
                "schedule": self.schedule.get_config()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (f"ProbabilityFlowSampler(rtol={self.rtol:g}, atol={self.atol:g}, "
                f"method={self.method!r}, eps={self.eps:g}, "
                f"time_variable={self.time_variable!r}, schedule={self.schedule!r})")
