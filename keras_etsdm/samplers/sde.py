"""Reverse-SDE samplers (score_sde): Euler–Maruyama and predictor–corrector with Langevin.

The reverse-time SDE of a VP process (Song et al. 2021, eq. 6), with ``f(t) = d log α/dt`` and
``g(t)² = −2 f(t)`` (VP: α² + σ² = 1), score ``s = ∇log p_t(x) = −ε̂(x, t)/σ_t``:

    dx = [f(t) x − g(t)² s(x, t)] dt + g(t) dw̄        (t runs from T down to eps)

On the grid ``t_0 = T > t_1 > … > t_S = eps`` (``linspace``; steps ``Δ_i = t_i − t_{i+1}``):

* predictor "euler_maruyama" (score_sde's ``EulerMaruyamaPredictor``):
  ``x ← (1 − f Δ) x + g² Δ s + g √Δ z``, i.e. ``x ← (1 − f Δ) x − (g² Δ/σ) ε̂ + g √Δ z``;
* predictor "reverse_diffusion" (score_sde's ``ReverseDiffusionPredictor`` with the VP
  discretisation): with ``β_i = 1 − ᾱ(t_i)/ᾱ(t_{i+1})`` (exact on this grid),
  ``x ← (2 − √(1 − β_i)) x + β_i s + √β_i z``;
* corrector "langevin" (score_sde's ``LangevinCorrector``), ``corrector_steps`` times before
  each predictor step, at the same t:
  ``ε_L = 2 a (snr ‖z‖ / ‖s‖)²`` with the norms averaged over the batch as in score_sde and
  ``a = 1 − β(t)/N`` (score_sde's ``alphas`` of the discretised VP-SDE, N = ``num_scales`` or
  T), ``x ← x + ε_L s + √(2 ε_L) z``.

The last predictor step adds no noise (score_sde's ``noise_removal`` / ``denoise=True``: the
sample is the last step's mean). Each network evaluation is one loop iteration, so the NFE is
``num_steps · (1 + corrector_steps)`` with the corrector on. Works on discrete
(``DiscreteVPSchedule``, through its continuous-time view, t ∈ [1/T, 1]) and continuous
schedules; the denoiser is called at ``schedule.label(t)`` as by every other sampler, and a v- or
x0-prediction is converted to ε̂ with the α, σ of t (``parameterization.to_eps_and_x0``).
"""

import numpy as np
from keras import ops

from keras_etsdm.parameterization import to_eps_and_x0
from keras_etsdm.samplers.base import (Sampler, _check_choice, _validate_num_steps,
                                       broadcast_label)
from keras_etsdm.samplers.ode import check_end_time

PREDICTORS = ("euler_maruyama", "reverse_diffusion")
CORRECTORS = ("none", "langevin")


class ReverseSDESampler(Sampler):
    """Predictor(–corrector) integration of the reverse-time SDE (see the module docstring).

    Args:
        num_steps: S predictor steps, 1 ≤ S ≤ N (``schedule.num_timesteps``).
        predictor: "euler_maruyama" (default) or "reverse_diffusion".
        corrector: "none" (default) or "langevin".
        snr: the Langevin corrector's signal-to-noise ratio (score_sde's VP default 0.16).
        corrector_steps: Langevin steps per predictor step (score_sde: 1).
        eps: the end time (default ``schedule.eps``: 1/T discrete, 1e-3 continuous).
        schedule: the model's ``DiscreteVPSchedule`` or ``ContinuousVPSchedule``.
    """

    stochastic = True
    _TABLE_ONLY_CONFIG = ("num_steps", "eps", "schedule", "sharing", "snr")

    def __init__(self, num_steps=1000, predictor="euler_maruyama", corrector="none", snr=0.16,
                 corrector_steps=1, eps=None, schedule=None):
        super().__init__(schedule)
        sched = self.schedule
        self.num_steps = _validate_num_steps(num_steps, sched.num_timesteps)
        self.predictor = _check_choice("predictor", predictor, PREDICTORS)
        self.corrector = _check_choice("corrector", corrector, CORRECTORS)
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}.")
        self.snr = float(snr)
        if isinstance(corrector_steps, bool) or int(corrector_steps) != corrector_steps \
                or corrector_steps < 1:
            raise ValueError(f"corrector_steps must be an integer >= 1, got {corrector_steps!r}.")
        self.corrector_steps = int(corrector_steps)
        self._eps_arg = eps
        self.eps = check_end_time(eps, sched)
        self._finish_init()

    @property
    def time_grid(self):
        """float64 ``[S + 1]``: ``linspace(T, eps, S + 1)``, the predictor's grid (from
        ``schedule.ode_T``, where the score is finite)."""
        return np.linspace(self.schedule.ode_T, self.eps, self.num_steps + 1)

    def _make_tables(self):
        sched = self.schedule
        grid = self.time_grid
        t, t_next = grid[:-1], grid[1:]
        dt = t - t_next
        f = sched.marginal_log_mean_coeff_derivative(t)
        g2 = -2.0 * f
        sigma = sched.marginal_std(t)
        if self.predictor == "euler_maruyama":
            coef_x = 1.0 - f * dt
            coef_eps = -g2 * dt / sigma
            noise = np.sqrt(g2 * dt)
        else:
            # The forward step t_next → t of the discretised chain: ᾱ(t) = (1 − β) ᾱ(t_next).
            beta = -np.expm1(2.0 * (sched.marginal_log_mean_coeff(t)
                                    - sched.marginal_log_mean_coeff(t_next)))
            coef_x = 2.0 - np.sqrt(1.0 - beta)
            coef_eps = -beta / sigma
            noise = np.sqrt(beta)
        noise = noise.copy()
        noise[-1] = 0.0  # the last step returns its mean
        rows = {"label": sched.label(t), "alpha": sched.marginal_alpha(t), "sigma": sigma,
                "coef_x": coef_x, "coef_eps": coef_eps, "noise_std": noise, "corrector": np.zeros_like(t),
                "langevin_alpha": 1.0 - g2 / sched.num_timesteps}
        if self.corrector == "none":
            return rows
        # Corrector iterations first at each t (score_sde's pc_sampler order), then the predictor.
        repeat = self.corrector_steps + 1
        out = {k: np.repeat(v, repeat) for k, v in rows.items()}
        out["corrector"] = np.tile([1.0] * self.corrector_steps + [0.0], self.num_steps)
        return out

    def _step(self, denoise_fn, carry, row, step_noise, prediction_type="epsilon"):
        (x,) = carry
        prediction = ops.cast(denoise_fn(x, broadcast_label(row["label"], x)), x.dtype)
        eps, _ = to_eps_and_x0(prediction, prediction_type, x, row["alpha"], row["sigma"])
        predicted = row["coef_x"] * x + row["coef_eps"] * eps + row["noise_std"] * step_noise
        if self.corrector == "none":
            return (predicted,)
        score = -eps / row["sigma"]
        batch = ops.shape(x)[0]
        grad_norm = ops.mean(ops.norm(ops.reshape(score, (batch, -1)), axis=-1))
        noise_norm = ops.mean(ops.norm(ops.reshape(step_noise, (batch, -1)), axis=-1))
        step_size = 2.0 * row["langevin_alpha"] * ops.square(self.snr * noise_norm / grad_norm)
        corrected = x + step_size * score + ops.sqrt(2.0 * step_size) * step_noise
        return (ops.where(row["corrector"] > 0.5, corrected, predicted),)

    def get_config(self):
        return {"num_steps": self.num_steps, "predictor": self.predictor,
                "corrector": self.corrector, "snr": self.snr,
                "corrector_steps": self.corrector_steps, "eps": self._eps_arg,
                "schedule": self.schedule.get_config()}


class EulerMaruyamaSampler(ReverseSDESampler):
    """score_sde's Euler–Maruyama sampler: the "euler_maruyama" predictor, no corrector."""

    def __init__(self, num_steps=1000, eps=None, schedule=None):
        super().__init__(num_steps, "euler_maruyama", "none", eps=eps, schedule=schedule)

    def get_config(self):
        return {"num_steps": self.num_steps, "eps": self._eps_arg,
                "schedule": self.schedule.get_config()}


class PredictorCorrectorSampler(ReverseSDESampler):
    """score_sde's PC sampler with its VP defaults: reverse-diffusion predictor and one
    Langevin corrector step (snr 0.16) per predictor step (2 NFE per step)."""

    def __init__(self, num_steps=1000, predictor="reverse_diffusion", corrector="langevin",
                 snr=0.16, corrector_steps=1, eps=None, schedule=None):
        super().__init__(num_steps, predictor, corrector, snr, corrector_steps, eps, schedule)
