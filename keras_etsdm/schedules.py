"""Variance-preserving noise schedules, discrete and continuous.

A VP forward process noises clean data as ``x_t = alpha_t * x_0 + sigma_t * eps`` with
``alpha_t**2 + sigma_t**2 = 1``.  ``lambda_t = log(alpha_t) - log(sigma_t)`` is the half log-SNR.

``DiscreteVPSchedule`` holds the tables of a DDPM-style schedule with ``T`` integer labels
(computed in float64, exposed to ``keras.ops`` in float32 for training) and its continuous-time
view used by DPM-Solver: ``log alpha`` interpolated piecewise linearly over ``t_n = (n + 1) / T``,
with ``label(t) = (t - 1/T) * T``.  ``LinearVPSDE`` is the continuous linear VP-SDE of score_sde.

The continuous-time methods (``marginal_*``, ``inverse_lambda``, ``label``) work on numpy arrays in
float64: samplers precompute all their coefficients with them once, outside the compiled loop.
"""

import math

import keras
import numpy as np
from keras import ops

SCHEDULE_KINDS = ("linear", "quadratic", "cosine")


def make_betas(kind="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
               cosine_s=0.008):
    """Return the float64 array of ``num_timesteps`` betas of a named schedule.

    Args:
        kind: "linear" (DDPM: beta linear in t), "quadratic" (sqrt(beta) linear in t) or
            "cosine" (Nichol & Dhariwal, alpha_bar = cos²(((t/T)+s)/(1+s)·π/2), betas clipped
            at 0.999).
        num_timesteps: T, the number of discrete steps.
        beta_start, beta_end: end points for "linear" and "quadratic" (DDPM: 1e-4, 0.02).
        cosine_s: the offset s of the cosine schedule.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if kind == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                           dtype=np.float64) ** 2
    if kind == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return np.clip(betas, 0.0, 0.999)
    raise ValueError(f"Unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}.")


class _VPMarginals:
    """α(t), σ(t), λ(t) of a VP process from its ``marginal_log_mean_coeff`` (numpy float64)."""

    def marginal_alpha(self, t):
        return np.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        # σ = sqrt(1 − α²) via expm1: exact near t = 0, where α ≈ 1.
        return np.sqrt(-np.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * np.log(-np.expm1(2.0 * log_mean))


@keras.saving.register_keras_serializable(package="keras_etsdm")
class DiscreteVPSchedule(_VPMarginals):
    """A discrete VP schedule with ``T`` integer labels 0..T-1 and its continuous-time view.

    Tables (numpy float64, shape ``[T]``): ``betas``, ``alphas_cumprod`` (ᾱ), ``alphas``
    (α_t = √ᾱ_t), ``sigmas`` (σ_t = √(1−ᾱ_t)), ``lambdas`` (λ_t = log α_t − log σ_t).
    ``alpha_table`` / ``sigma_table`` are the float32 ``keras.ops`` tensors used in training.

    Continuous-time view (for DPM-Solver): time ``t`` in ``[1/T, 1]`` with knots
    ``t_n = (n + 1) / T``; ``log alpha(t)`` is the piecewise-linear interpolation of
    ``log α_n = ½ Σ_{k≤n} log(1 − β_k)``; the network label is ``(t − 1/T)·T`` so that
    ``t_n`` maps exactly to label ``n``.

    ``zero_terminal_snr=True`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1) rescales √ᾱ so that the last label is pure noise
    (α_{T−1} = 0, σ_{T−1} = 1, λ_{T−1} = −∞ in the tables) with label 0 unchanged; see
    ``_zero_terminal_snr``. Such a schedule needs a v- or x0-prediction model (ε carries no
    information at SNR 0). Its continuous-time view (DPM-Solver, PF-ODE, likelihood) clamps
    the last knot to a finite ᾱ (``_terminal_log_alpha``), so those samplers start from
    α ≈ 2⁻¹² instead of 0; DDIM / DDPM use the exact tables.
    """

    def __init__(self, kind="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                 cosine_s=0.008, zero_terminal_snr=False):
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.cosine_s = float(cosine_s)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.betas = make_betas(kind, self.num_timesteps, beta_start, beta_end, cosine_s)
        log_alpha_sq = np.cumsum(np.log1p(-self.betas))
        if self.zero_terminal_snr:
            self.betas, log_alpha_sq = _zero_terminal_snr(self.betas, log_alpha_sq)
        self.log_alphas = 0.5 * log_alpha_sq
        self.alphas_cumprod = np.exp(log_alpha_sq)
        self.alphas = np.exp(self.log_alphas)
        # σ² = 1 − ᾱ computed as -expm1(log ᾱ) keeps precision when ᾱ ≈ 1 (t = 0).
        self.sigmas = np.sqrt(-np.expm1(log_alpha_sq))
        with np.errstate(divide="ignore"):
            self.lambdas = self.log_alphas - np.log(self.sigmas)  # −∞ at a zero terminal SNR
        # The continuous-time view needs a finite, strictly decreasing log α: with a zero
        # terminal SNR its last knot is clamped (``_terminal_log_alpha``); the tables above
        # keep the true α_{T−1} = 0.
        self._continuous_log_alphas = self.log_alphas.copy()
        if self.zero_terminal_snr:
            self._continuous_log_alphas[-1] = _terminal_log_alpha(self.alphas_cumprod)
        self.t_knots = (np.arange(self.num_timesteps, dtype=np.float64) + 1.0) / self.num_timesteps
        self._alphas_f32 = self.alphas.astype(np.float32)
        self._sigmas_f32 = self.sigmas.astype(np.float32)

    # ----- discrete tables as keras tensors -------------------------------------------------
    @property
    def alpha_table(self):
        """float32 tensor ``[T]`` of α_t, for gathers inside compiled code."""
        # Built per call (not cached): a cached tensor would leak across traced functions.
        return ops.convert_to_tensor(self._alphas_f32)

    @property
    def sigma_table(self):
        """float32 tensor ``[T]`` of σ_t."""
        return ops.convert_to_tensor(self._sigmas_f32)

    def q_sample(self, x0, t, noise):
        """Noise clean images: ``α_t x0 + σ_t ε``.

        Args:
            x0: clean data ``[B, ...]``.
            t: integer labels ``[B]`` in ``[0, T-1]`` (the TRUE time step).
            noise: ``ε``, same shape as ``x0``.
        """
        t = ops.cast(t, "int32")
        shape = (-1,) + (1,) * (len(x0.shape) - 1)
        alpha = ops.reshape(ops.take(self.alpha_table, t), shape)
        sigma = ops.reshape(ops.take(self.sigma_table, t), shape)
        alpha = ops.cast(alpha, x0.dtype)
        sigma = ops.cast(sigma, x0.dtype)
        return alpha * x0 + sigma * noise

    # ----- continuous-time view (numpy float64) --------------------------------------------
    @property
    def T(self):
        """End of the continuous time interval (1.0)."""
        return 1.0

    @property
    def eps(self):
        """Start of the continuous time interval, ``1/T`` (label 0)."""
        return 1.0 / self.num_timesteps

    def marginal_log_mean_coeff(self, t):
        """``log α(t)`` by piecewise-linear interpolation over the knots (extrapolated linearly)."""
        t = np.asarray(t, dtype=np.float64)
        knots, values = self.t_knots, self._continuous_log_alphas
        if self.num_timesteps == 1:
            return np.full_like(t, values[0])
        idx = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, self.num_timesteps - 2)
        t0, t1 = knots[idx], knots[idx + 1]
        v0, v1 = values[idx], values[idx + 1]
        return v0 + (t - t0) * (v1 - v0) / (t1 - t0)

    def marginal_log_mean_coeff_derivative(self, t):
        """``f(t) = d log α / dt`` (units 1 / time): the slope of the piecewise-linear
        ``log α`` on the knot interval holding ``t`` (the interval to the right at a knot; the
        first / last interval outside ``[1/T, 1]``, as the interpolation extrapolates)."""
        t = np.asarray(t, dtype=np.float64)
        if self.num_timesteps == 1:
            return np.zeros_like(t)
        knots, values = self.t_knots, self._continuous_log_alphas
        idx = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, self.num_timesteps - 2)
        return (values[idx + 1] - values[idx]) / (knots[idx + 1] - knots[idx])

    def time_of_log_mean_coeff(self, log_alpha):
        """The continuous time t with ``marginal_log_mean_coeff(t) == log_alpha``: inverse of
        the piecewise-linear interpolation (extrapolated linearly, as the forward map)."""
        log_alpha = np.asarray(log_alpha, dtype=np.float64)
        if self.num_timesteps == 1:
            return np.full_like(log_alpha, self.t_knots[0])
        xs = -self._continuous_log_alphas  # log α decreases in t: interpolate on its negation
        idx = np.clip(np.searchsorted(xs, -log_alpha, side="right") - 1, 0,
                      self.num_timesteps - 2)
        x0, x1 = xs[idx], xs[idx + 1]
        t0, t1 = self.t_knots[idx], self.t_knots[idx + 1]
        return t0 + (-log_alpha - x0) * (t1 - t0) / (x1 - x0)

    def inverse_lambda(self, lamb):
        """The continuous time t with ``marginal_lambda(t) == lamb`` (inverse interpolation)."""
        lamb = np.asarray(lamb, dtype=np.float64)
        # log α = −½ log(1 + e^{−2λ}).
        return self.time_of_log_mean_coeff(-0.5 * np.logaddexp(0.0, -2.0 * lamb))

    def label(self, t):
        """Continuous time ``t ∈ [1/T, 1]`` → network label ``(t − 1/T)·T ∈ [0, T−1]``."""
        return (np.asarray(t, dtype=np.float64) - 1.0 / self.num_timesteps) * self.num_timesteps

    def get_config(self):
        config = {"kind": self.kind, "num_timesteps": self.num_timesteps,
                  "beta_start": self.beta_start, "beta_end": self.beta_end,
                  "cosine_s": self.cosine_s}
        if self.zero_terminal_snr:
            # Only when set: earlier configs (checkpoints, work directories) stay unchanged.
            config["zero_terminal_snr"] = True
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        ztsnr = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return (f"DiscreteVPSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}"
                f"{ztsnr})")


# ᾱ of the last label in the continuous-time view of a zero-terminal-SNR schedule (diffusers'
# DPM-Solver clamp for ``rescale_betas_zero_snr``): α = 2⁻¹², λ ≈ −8.3.
TERMINAL_ALPHA_BAR = 2.0**-24


def _zero_terminal_snr(betas, log_alpha_sq):
    """Lin et al. 2024, Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T−1} = 0 with √ᾱ_0 kept,

        √ᾱ ← (√ᾱ − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}),

    and recompute the betas ``β_t = 1 − ᾱ_t/ᾱ_{t−1}`` (β_0 unchanged, β_{T−1} = 1). Returns
    ``(betas, log ᾱ)`` float64, ``log ᾱ_{T−1} = −∞``.
    """
    if betas.shape[0] < 2:
        raise ValueError("zero_terminal_snr needs num_timesteps >= 2 (label 0 keeps its ᾱ, the "
                         "last label gets ᾱ = 0).")
    sqrt_ab = np.exp(0.5 * log_alpha_sq)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    sqrt_ab[0] = first  # exactly (the formula rounds)
    sqrt_ab[-1] = 0.0
    with np.errstate(divide="ignore"):
        log_ab = 2.0 * np.log(sqrt_ab)
    # β_t = 1 − exp(log ᾱ_t − log ᾱ_{t−1}) by expm1: precise for the small β near t = 0.
    new_betas = np.empty_like(betas)
    new_betas[0] = betas[0]
    new_betas[1:] = -np.expm1(log_ab[1:] - log_ab[:-1])
    new_betas[-1] = 1.0
    return new_betas, log_ab


def _terminal_log_alpha(alphas_cumprod):
    """log α of the last knot of a zero-terminal-SNR schedule's continuous-time view.

    ``½ log min(2⁻²⁴, ᾱ_{T−2}²/ᾱ_{T−3})``: diffusers' clamp of ᾱ_{T−1} to 2⁻²⁴, unless ᾱ_{T−2}
    is already below it (linear β, T = 1000: ᾱ_{T−2} ≈ 4.2e−9), then the last step of log ᾱ is
    repeated (ᾱ_{T−3} := 1 for T = 2). Either way log α stays finite and strictly decreasing,
    which the inverse interpolation (``time_of_log_mean_coeff``, ``inverse_lambda``) needs.
    DPM-Solver and the PF-ODE start from this α (not 0) at t = 1: a v / x0 network sees label
    T−1 there, and its ε̂ / x̂0 are formed with this α and the matching σ.
    """
    ab = alphas_cumprod
    before = ab[-3] if ab.shape[0] >= 3 else 1.0
    return 0.5 * math.log(min(TERMINAL_ALPHA_BAR, ab[-2] ** 2 / before))


class LinearVPSDE(_VPMarginals):
    """The continuous linear VP-SDE: ``β(t) = β0 + t (β1 − β0)``, t ∈ [eps, 1].

    ``log α(t) = −¼ t² (β1 − β0) − ½ t β0`` (score_sde / DPM-Solver "linear" continuous schedule).
    The network label is ``t · (N − 1)`` (score_sde feeds ``t·999`` for N = 1000).
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, num_scales=1000, eps=1e-3):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.num_scales = int(num_scales)
        self.eps = float(eps)

    @property
    def T(self):
        return 1.0

    def marginal_log_mean_coeff(self, t):
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def inverse_lambda(self, lamb):
        lamb = np.asarray(lamb, dtype=np.float64)
        tmp = 2.0 * (self.beta_max - self.beta_min) * np.logaddexp(-2.0 * lamb, 0.0)
        delta = self.beta_min**2 + tmp
        return tmp / (np.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)

    def marginal_log_mean_coeff_derivative(self, t):
        """``f(t) = d log α / dt = −½ β(t)`` (units 1 / time)."""
        t = np.asarray(t, dtype=np.float64)
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def time_of_log_mean_coeff(self, log_alpha):
        """The t with ``marginal_log_mean_coeff(t) == log_alpha``: the positive root of
        ``¼ Δβ t² + ½ β_min t + log α = 0`` in the cancellation-free form
        ``−2 log α / (b + √(b² − Δβ log α))``, ``b = ½ β_min``."""
        r = np.asarray(log_alpha, dtype=np.float64)
        b = 0.5 * self.beta_min
        return -2.0 * r / (b + np.sqrt(b * b - (self.beta_max - self.beta_min) * r))

    def label(self, t):
        return np.asarray(t, dtype=np.float64) * (self.num_scales - 1)

    def get_config(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max,
                "num_scales": self.num_scales, "eps": self.eps}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
