"""Variance-preserving noise schedules, discrete and continuous.

A VP forward process noises clean data as ``x_t = alpha_t * x_0 + sigma_t * eps`` with
``alpha_t**2 + sigma_t**2 = 1``.  ``lambda_t = log(alpha_t) - log(sigma_t)`` is the half log-SNR.

``DiscreteVPSchedule`` holds the tables of a DDPM-style schedule with ``T`` integer labels
(computed in float64, exposed to ``keras.ops`` in float32 for training) and its continuous-time
view used by DPM-Solver: ``log alpha`` interpolated piecewise linearly over ``t_n = (n + 1) / T``,
with ``label(t) = (t - 1/T) * T``.  ``ContinuousVPSchedule`` is a continuous-time VP schedule
("linear" = score_sde's VP-SDE, "quadratic", "cosine") whose denoiser time coordinate is t itself;
``LinearVPSDE`` is its linear kind under score_sde's name.

Both expose one interface to the model and the samplers: ``label``/``time_of_label`` (time ↔ the
denoiser's time coordinate), ``label_range``, ``alpha_bar``, ``training_labels`` (the training
draw of t), ``q_sample``, ``alpha_sigma`` (keras.ops), ``network_time`` (the network's input
rescaling), ``default_sharing`` and ``check_sharing``.

The continuous-time methods (``marginal_*``, ``inverse_lambda``, ``label``) work on numpy arrays in
float64: samplers precompute all their coefficients with them once, outside the compiled loop.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_etsdm.time_sharing import TimestepSharing

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

    # ----- keras.ops, shared by training (q_sample) and the model's v target ----------------
    def alpha_sigma_like(self, t, x):
        """``alpha_sigma(t)`` reshaped to ``[B, 1, …]`` and cast to the dtype of ``x [B, ...]``."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (len(x.shape) - 1)
        return (ops.cast(ops.reshape(alpha, shape), x.dtype),
                ops.cast(ops.reshape(sigma, shape), x.dtype))

    def q_sample(self, x0, t, noise):
        """Noise clean data: ``α_t x0 + σ_t ε``.

        Args:
            x0: clean data ``[B, ...]``.
            t: ``[B]`` TRUE times in the schedule's coordinate (integer labels in ``[0, T−1]``
                for a discrete schedule, times in ``[eps, T]`` for a continuous one).
            noise: ``ε``, same shape as ``x0``.
        """
        alpha, sigma = self.alpha_sigma_like(t, x0)
        return alpha * x0 + sigma * noise


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

    # ----- continuous-time view (numpy float64) --------------------------------------------
    @property
    def T(self):
        """End of the continuous time interval (1.0)."""
        return 1.0

    @property
    def eps(self):
        """Start of the continuous time interval, ``1/T`` (label 0)."""
        return 1.0 / self.num_timesteps

    @property
    def ode_T(self):
        """Where DPM-Solver, the PF-ODE and the SDE samplers start: 1 (with
        ``zero_terminal_snr`` the continuous view's last knot is clamped to a finite α)."""
        return 1.0

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

    def time_of_label(self, label):
        """Inverse of ``label``: label ``n`` → continuous time ``(n + 1)/T`` (numpy float64)."""
        return (np.asarray(label, dtype=np.float64) + 1.0) / self.num_timesteps

    # ----- the interface the model and samplers share with ContinuousVPSchedule ---------------
    is_continuous = False

    @property
    def label_range(self):
        """``(lowest, highest)`` time label the denoiser is trained on: ``(0, T − 1)``."""
        return 0.0, float(self.num_timesteps - 1)

    def alpha_bar(self, labels):
        """ᾱ at time labels (numpy float64): the exact table entries at integer labels."""
        labels = np.asarray(labels)
        if labels.dtype.kind in "iu":
            return self.alphas_cumprod[labels]
        return np.exp(2.0 * self.marginal_log_mean_coeff(self.time_of_label(labels)))

    def training_labels(self, batch, seed):
        """``t ~ U{0, …, T−1}``: int32 ``[batch]`` labels for one training batch."""
        return keras.random.randint((batch,), 0, self.num_timesteps, seed=seed, dtype="int32")

    def alpha_sigma(self, labels):
        """α_t, σ_t (float32 ``keras.ops`` tensors, shape of ``labels``) at integer labels."""
        labels = ops.cast(labels, "int32")
        return ops.take(self.alpha_table, labels), ops.take(self.sigma_table, labels)

    def network_time(self, labels):
        """The time condition the network sees for (shared) labels: the label itself."""
        return labels

    def default_sharing(self):
        """The paper's E-TSDM default for this schedule: t̃ = T/10 (100 of 1000), n = 5."""
        return TimestepSharing.default_for(self.num_timesteps)

    def check_times(self, labels):
        """Raise ``ValueError`` if concrete labels leave ``[0, T − 1]``."""
        labels = np.asarray(labels, np.float64)
        if labels.size and (labels.min() < 0.0 or labels.max() > self.num_timesteps - 1):
            raise ValueError(f"Time labels must lie in [0, {self.num_timesteps - 1}], got "
                             f"[{labels.min():g}, {labels.max():g}].")

    def check_sharing(self, sharing):
        """Raise ``ValueError`` unless ``sharing``'s t̃ lies inside this schedule's labels."""
        if sharing.enabled and sharing.t_tilde >= self.num_timesteps:
            raise ValueError(f"E-TSDM t_tilde={sharing.t_tilde} must be smaller than the number "
                             f"of timesteps T={self.num_timesteps}.")

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




CONTINUOUS_KINDS = ("linear", "quadratic", "cosine")
# DPM-Solver's continuous cosine schedule ends at T = 0.9946 (λ ≈ −5.1), not at 1, where α → 0
# and λ → −∞.
_COSINE_T = 0.9946


@keras.saving.register_keras_serializable(package="keras_etsdm")
class ContinuousVPSchedule(_VPMarginals):
    """A continuous-time VP schedule: time ``t ∈ [eps, T]`` (T = 1, ≈ 0.9946 for cosine).

    Kinds (``log α(t)``, β in units of 1/time; score_sde / DPM-Solver's continuous schedules):

    * "linear" (score_sde's VP-SDE): ``β(t) = β_min + t (β_max − β_min)``,
      ``log α = −¼ t² (β_max − β_min) − ½ t β_min``.
    * "quadratic": ``√β(t)`` linear from ``√β_min`` to ``√β_max`` (the continuous limit of the
      discrete "quadratic" schedule), ``log α = −((a + b t)³ − a³) / (6 b)``, a = √β_min,
      b = √β_max − √β_min (evaluated as −t (3a² + 3abt + b²t²)/6).
    * "cosine" (Nichol & Dhariwal, DPM-Solver's continuous form):
      ``log α = log cos((t + s)/(1 + s)·π/2) − log cos(s/(1 + s)·π/2)``, ending at DPM-Solver's
      T = 0.9946 (λ ≈ −5.1).

    The defaults β_min = 0.1, β_max = 20 are T·β of the discrete DDPM schedule (1e-4 … 0.02,
    T = 1000), so both describe the same process.

    Time coordinate: the denoiser (``DiffusionModel.denoise``, every sampler, the E-TSDM map)
    works in t itself; ``label(t) = t``, and E-TSDM shares t below a continuous t̃ (default
    0.1, n = 5). Only the network input is rescaled, ``network_time(t) = (num_scales − 1)·t``
    (score_sde's DDPM++ feeds 999·t), so the network's sinusoidal embedding sees the same
    range as a discrete model.

    Args:
        kind: "linear", "quadratic" or "cosine".
        beta_min, beta_max: β end points for "linear" / "quadratic" (1/time).
        cosine_s: the offset s of "cosine".
        eps: the smallest time trained on and sampled to (score_sde: 1e-3 for sampling; the
            training draw is ``t ~ U(eps, T)``).
        num_scales: N: the network sees ``(N − 1)·t``; also the default (and largest) number
            of steps of the DDPM / DDIM samplers on this schedule.
        zero_terminal_snr: rescale α(t) → (α(t) − α(T))/(1 − α(T)) (Lin et al. 2024 in
            continuous time) so that t = T is pure noise; needs a v- or x0-prediction model.
            DDIM / DDPM then start at α = 0 exactly; the solvers that need a finite λ start at
            ``ode_T`` (α = 2⁻¹²), as on a discrete zero-terminal-SNR schedule.
    """

    is_continuous = True

    def __init__(self, kind="linear", beta_min=0.1, beta_max=20.0, cosine_s=0.008, eps=1e-3,
                 num_scales=1000, zero_terminal_snr=False):
        if kind not in CONTINUOUS_KINDS:
            raise ValueError(f"Unknown continuous schedule kind {kind!r}; expected one of "
                             f"{CONTINUOUS_KINDS}.")
        if kind != "cosine" and not 0.0 < float(beta_min) < float(beta_max):
            raise ValueError(f"Need 0 < beta_min < beta_max, got beta_min={beta_min}, "
                             f"beta_max={beta_max}.")
        if not cosine_s > 0.0:
            raise ValueError(f"cosine_s must be > 0, got {cosine_s}.")
        if int(num_scales) != num_scales or num_scales < 2:
            raise ValueError(f"num_scales must be an integer >= 2, got {num_scales!r}.")
        self.kind = kind
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.cosine_s = float(cosine_s)
        self.num_scales = int(num_scales)
        if kind == "cosine":
            s = self.cosine_s
            self._T = _COSINE_T
            self._log_cos_0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))
        else:
            self._T = 1.0
        if not 0.0 < float(eps) < self._T:
            raise ValueError(f"eps must be in (0, {self._T:g}) (the schedule's time interval), "
                             f"got {eps!r}.")
        self.eps = float(eps)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        # α of the base schedule at T: the zero-terminal-SNR rescaling subtracts it.
        self._alpha_T = math.exp(float(self._base_log_alpha(self._T)))

    @property
    def T(self):
        """End of the time interval: 1, or ≈ 0.9946 for "cosine"."""
        return self._T

    @property
    def ode_T(self):
        """Where DPM-Solver, the PF-ODE, the likelihood and the reverse-SDE samplers start:
        ``T``, or with ``zero_terminal_snr`` the time where α = 2⁻¹² (ᾱ = 2⁻²⁴, diffusers'
        clamp), because their update rules need a finite λ and score. DDIM and DDPM start at
        ``T`` itself (α = 0 exactly)."""
        if not self.zero_terminal_snr:
            return self._T
        return float(self.time_of_log_mean_coeff(-12.0 * math.log(2.0)))

    @property
    def num_timesteps(self):
        """N = ``num_scales``: the default and largest step count of DDPM / DDIM here."""
        return self.num_scales

    # ----- log α and its calculus (numpy float64) ---------------------------------------------
    def _quadratic_ab(self):
        a = math.sqrt(self.beta_min)
        return a, math.sqrt(self.beta_max) - a

    def _cosine_u(self, t):
        return (t + self.cosine_s) / (1.0 + self.cosine_s) * (math.pi / 2.0)

    def _cosine_log_cos(self, t, backend=np):
        # cos((t + s)/(1 + s)·π/2) = sin((1 − t)/(1 + s)·π/2): no cancellation near t = 1,
        # where α → 0 (float32 cos of a number near π/2 keeps only ~1e-5 relative accuracy).
        return backend.log(backend.sin((1.0 - t) / (1.0 + self.cosine_s) * (math.pi / 2.0)))

    def _base_log_alpha(self, t):
        """``log α(t)`` of the kind itself, before any zero-terminal-SNR rescaling."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        if self.kind == "quadratic":
            a, b = self._quadratic_ab()
            # (a + bt)³ − a³ = bt (3a² + 3abt + b²t²), without the cancellation at small t.
            return -t * (3.0 * a * a + 3.0 * a * b * t + b * b * t * t) / 6.0
        return self._cosine_log_cos(t) - self._log_cos_0

    def _base_derivative(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "linear":
            return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))
        if self.kind == "quadratic":
            a, b = self._quadratic_ab()
            return -0.5 * (a + b * t) ** 2
        return -np.tan(self._cosine_u(t)) * (math.pi / 2.0) / (1.0 + self.cosine_s)

    def _base_time_of_log_alpha(self, log_alpha):
        r = np.asarray(log_alpha, dtype=np.float64)
        if self.kind == "linear":
            # Positive root of ¼Δβ t² + ½β_min t + log α = 0, cancellation-free.
            b = 0.5 * self.beta_min
            return -2.0 * r / (b + np.sqrt(b * b - (self.beta_max - self.beta_min) * r))
        if self.kind == "quadratic":
            a, b = self._quadratic_ab()
            return (np.cbrt(a**3 - 6.0 * b * r) - a) / b
        s = self.cosine_s
        return np.arccos(np.exp(r + self._log_cos_0)) * 2.0 * (1.0 + s) / math.pi - s

    # The zero-terminal-SNR rescaling (Lin et al. 2024, Algorithm 1, in continuous time): with
    # α_T the base α at T, α'(t) = (α(t) − α_T)/(1 − α_T): α'(0) = 1 unchanged, α'(T) = 0.
    def marginal_log_mean_coeff(self, t):
        """``log α(t)`` (numpy float64, shape of ``t``; −∞ at T with ``zero_terminal_snr``)."""
        log_alpha = self._base_log_alpha(t)
        if not self.zero_terminal_snr:
            return log_alpha
        with np.errstate(divide="ignore"):
            return (np.log(np.maximum(np.exp(log_alpha) - self._alpha_T, 0.0))
                    - math.log1p(-self._alpha_T))

    def marginal_log_mean_coeff_derivative(self, t):
        """``f(t) = d log α / dt`` (units 1 / time; −½ β(t) without the rescaling)."""
        f = self._base_derivative(t)
        if not self.zero_terminal_snr:
            return f
        alpha = np.exp(self._base_log_alpha(t))
        return f * alpha / (alpha - self._alpha_T)

    def time_of_log_mean_coeff(self, log_alpha):
        """The t with ``marginal_log_mean_coeff(t) == log_alpha`` (closed form per kind)."""
        if not self.zero_terminal_snr:
            return self._base_time_of_log_alpha(log_alpha)
        alpha = self._alpha_T + (1.0 - self._alpha_T) * np.exp(np.asarray(log_alpha, np.float64))
        return self._base_time_of_log_alpha(np.log(alpha))

    def inverse_lambda(self, lamb):
        """The t with ``marginal_lambda(t) == lamb``."""
        lamb = np.asarray(lamb, dtype=np.float64)
        return self.time_of_log_mean_coeff(-0.5 * np.logaddexp(0.0, -2.0 * lamb))

    # ----- the interface the model and samplers share with DiscreteVPSchedule ---------------
    def label(self, t):
        """The denoiser's time coordinate at time t: t itself (numpy float64)."""
        return np.asarray(t, dtype=np.float64)

    def time_of_label(self, label):
        """Inverse of ``label`` (the identity)."""
        return np.asarray(label, dtype=np.float64)

    @property
    def label_range(self):
        """``(eps, T)``: the times the denoiser is trained on."""
        return self.eps, self.T

    def alpha_bar(self, labels):
        """ᾱ(t) = α(t)² at times t (numpy float64)."""
        return np.exp(2.0 * self.marginal_log_mean_coeff(labels))

    def training_labels(self, batch, seed):
        """``t ~ U(eps, T)``: float32 ``[batch]`` times for one training batch."""
        return keras.random.uniform((batch,), self.eps, self.T, seed=seed, dtype="float32")

    def _base_log_alpha_ops(self, t):
        t = ops.cast(t, "float32")
        if self.kind == "linear":
            return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        if self.kind == "quadratic":
            a, b = self._quadratic_ab()
            return -t * (3.0 * a * a + 3.0 * a * b * t + b * b * t * t) / 6.0
        return self._cosine_log_cos(t, ops) - self._log_cos_0

    def log_alpha_ops(self, t):
        """``log α(t)`` in ``keras.ops`` (float32 ``t`` of any shape)."""
        if not self.zero_terminal_snr:
            return self._base_log_alpha_ops(t)
        return ops.log(self.alpha_sigma(t)[0])

    def alpha_sigma(self, labels):
        """α(t), σ(t) as float32 ``keras.ops`` tensors (shape of ``t``); σ without the
        cancellation of 1 − α² at small t."""
        alpha, sigma = self._base_alpha_sigma(labels)
        if not self.zero_terminal_snr:
            return alpha, sigma
        scale = 1.0 - self._alpha_T
        rescaled = ops.maximum(alpha - self._alpha_T, 0.0) / scale
        # 1 − α' = (1 − α)/(1 − α_T) with 1 − α = σ²/(1 + α); σ'² = (1 − α')(1 + α').
        one_minus = sigma * sigma / ((1.0 + alpha) * scale)
        return rescaled, ops.sqrt(one_minus * (1.0 + rescaled))

    def _base_alpha_sigma(self, labels):
        log_alpha = self._base_log_alpha_ops(labels)
        if self.kind == "cosine":
            # σ² = (cos²u₀ − cos²u_t)/cos²u₀ = sin(u_t − u₀) sin(u_t + u₀)/cos²u₀: free of the
            # cancellation in 1 − α² at small t (float32 log α − log cos u₀ would cost 1e-5).
            t = ops.cast(labels, "float32")
            u_0 = self._cosine_u(0.0)
            sigma = ops.sqrt(ops.sin(t / (1.0 + self.cosine_s) * (math.pi / 2.0))
                             * ops.sin(self._cosine_u(t) + u_0)) / math.cos(u_0)
            return ops.exp(log_alpha), sigma
        return ops.exp(log_alpha), ops.sqrt(-ops.expm1(2.0 * log_alpha))

    def network_time(self, labels):
        """The network's time condition for (shared) times: ``(num_scales − 1)·t``."""
        return labels * float(self.num_scales - 1)

    def default_sharing(self):
        """E-TSDM's continuous default: t̃ = 0.1, n = 5 (the discrete t̃ = T/10 in t units)."""
        return TimestepSharing(0.1, 5)

    def check_sharing(self, sharing):
        """Raise ``ValueError`` unless ``eps`` < t̃ < T (a continuous t̃ is a time, e.g. 0.1)."""
        if sharing.enabled and not self.eps < float(sharing.t_tilde) < self.T:
            raise ValueError(f"E-TSDM t_tilde={sharing.t_tilde} must lie inside the continuous "
                             f"time interval ({self.eps:g}, {self.T:g}) of this schedule "
                             f"(e.g. 0.1; a discrete t̃ such as 100 is a label, not a time).")

    def check_times(self, t):
        """Raise ``ValueError`` if concrete times ``t`` leave ``[eps, T]``."""
        t = np.asarray(t, np.float64)
        if t.size and (t.min() < self.eps * (1 - 1e-6) or t.max() > self.T * (1 + 1e-6)):
            raise ValueError(f"Continuous times must lie in [eps, T] = [{self.eps:g}, "
                             f"{self.T:g}], got [{t.min():g}, {t.max():g}].")

    def get_config(self):
        config = {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                  "cosine_s": self.cosine_s, "eps": self.eps, "num_scales": self.num_scales}
        if self.zero_terminal_snr:  # only when set: earlier configs stay as they were
            config["zero_terminal_snr"] = True
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        ztsnr = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return f"ContinuousVPSchedule(kind={self.kind!r}, eps={self.eps:g}{ztsnr})"


@keras.saving.register_keras_serializable(package="keras_etsdm")
class LinearVPSDE(ContinuousVPSchedule):
    """score_sde's VP-SDE: the "linear" ``ContinuousVPSchedule`` (β 0.1 → 20, eps 1e-3)."""

    def __init__(self, beta_min=0.1, beta_max=20.0, num_scales=1000, eps=1e-3):
        super().__init__("linear", beta_min, beta_max, eps=eps, num_scales=num_scales)

    def get_config(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max,
                "num_scales": self.num_scales, "eps": self.eps}

    def __repr__(self):
        return f"LinearVPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


def schedule_from_config(config):
    """A schedule from its ``get_config()`` dict: discrete (``beta_start`` …), continuous
    (``kind`` + ``beta_min``) or a ``LinearVPSDE`` (``beta_min`` without ``kind``)."""
    config = dict(config)
    if "beta_min" in config:
        return (ContinuousVPSchedule if "kind" in config else LinearVPSDE).from_config(config)
    return DiscreteVPSchedule.from_config(config)
