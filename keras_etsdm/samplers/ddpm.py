"""Ancestral DDPM sampling (Ho et al. 2020), optionally on a respaced subset of steps.

On the (possibly respaced) chain t_S > … > t_1 with ᾱ_prev the ᾱ of the next label down (1 after
the last), β'_t = 1 − ᾱ_t/ᾱ_prev:

    x̂0 = (x_t − σ_t ε̂) / α_t
    x_prev = β'_t sqrt(ᾱ_prev)/(1 − ᾱ_t) · x̂0 + (1 − ᾱ_prev) sqrt(1 − β'_t)/(1 − ᾱ_t) · x_t + s_t z

with s_t² = β̃_t = β'_t (1 − ᾱ_prev)/(1 − ᾱ_t) ("fixed_small", the posterior variance) or
s_t² = β'_t ("fixed_large"), and no noise on the last step. With all T steps β' = β. Respacing
follows guided-diffusion: S labels evenly spaced over [0, T−1] (rounded), the network still sees
the original labels. The chain starts at label T−1; on a zero-terminal-SNR schedule α = 0 there
(β' = 1, so the step is x_prev = sqrt(ᾱ_prev) x̂0 + s_t z), which needs a v- or x0-prediction
denoiser (x̂0 from ``parameterization.to_eps_and_x0``, exact at α = 0).
"""

import numpy as np

from keras_etsdm.samplers.base import (Sampler, _check_choice, _validate_num_steps,
                                       predict_eps_and_x0, sharing_aware_labels)

DDPM_VARIANCES = ("fixed_small", "fixed_large")


def continuous_respaced_times(num_steps, schedule):
    """Increasing float64 times ``linspace(eps, T, S)`` (``[T]`` for S = 1) on a
    ``ContinuousVPSchedule`` (score_sde's ancestral sampler walks the same uniform grid)."""
    num_steps = _validate_num_steps(num_steps, schedule.num_timesteps)
    low, top = schedule.label_range
    if num_steps == 1:
        return np.array([top], dtype=np.float64)
    return np.linspace(low, top, num_steps)


def respaced_timesteps(num_steps, num_timesteps):
    """Increasing int64 labels: ``round(linspace(0, T−1, S))`` (``[T−1]`` for S = 1)."""
    num_steps = _validate_num_steps(num_steps, num_timesteps)
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


class DDPMSampler(Sampler):
    """Ancestral sampling.

    Args:
        num_steps: None (all T steps, the original DDPM) or S ≤ T respaced steps.
        variance: "fixed_small" (posterior β̃, default) or "fixed_large" (β).
        clip_x0: clip x̂0 to [−1, 1] before forming the posterior mean (guided-diffusion's
            ``clip_denoised``). Off by default (exact maths).
        schedule: the model's ``DiscreteVPSchedule``, or a ``ContinuousVPSchedule`` (the
            grid is then ``continuous_respaced_times``, N = ``num_scales`` steps by default,
            with the exact ᾱ ratios of the closed form: the DDPM posterior on that grid).
        sharing: None, or the model's ``TimestepSharing``: a respaced grid (``num_steps < T``)
            then visits every piece boundary below t̃ (``sharing_aware_labels``), so no step
            crosses one. Unlike DDIM and DPM-Solver the network is still called at the true
            labels: an ancestral step from label s is the reverse conditional the network learnt
            at s (condition f(s)), not a quadrature of an ODE over the piece below. With all T
            steps every label is a knot already and the grid is the plain one.
        sharing_labels: False lets a denoiser with another sharing map, or none, take the
            knots of ``sharing`` (the network is at the true labels either way; see
            ``Sampler``).
    """

    stochastic = True
    # Options that only change the coefficient tables (see Sampler._trace_key).
    _TABLE_ONLY_CONFIG = ("num_steps", "variance", "schedule", "sharing", "sharing_labels")

    def __init__(self, num_steps=None, variance="fixed_small", clip_x0=False, schedule=None,
                 sharing=None, sharing_labels=True):
        super().__init__(schedule, sharing, sharing_labels)
        T = self.schedule.num_timesteps
        self.num_steps = T if num_steps is None else _validate_num_steps(num_steps, T)
        self.variance = _check_choice("variance", variance, DDPM_VARIANCES)
        self.clip_x0 = bool(clip_x0)
        self._finish_init()

    def step_labels(self):
        """Increasing labels of the chain (int64; float64 times on a continuous schedule)."""
        sched = self.schedule
        T = sched.num_timesteps
        if sched.is_continuous:
            if self.sharing is not None:
                return sharing_aware_labels(self.sharing, self.num_steps, sched.T, 0.0,
                                            integer=False)
            return continuous_respaced_times(self.num_steps, sched)
        if self.sharing is not None and self.num_steps < T:
            return sharing_aware_labels(self.sharing, self.num_steps, T - 1, -1)
        return respaced_timesteps(self.num_steps, T)

    def _make_tables(self):
        sched = self.schedule
        labels = self.step_labels()[::-1]
        alpha_bar = sched.alpha_bar(labels)
        alpha_bar_prev = np.append(alpha_bar[1:], 1.0)
        betas = 1.0 - alpha_bar / alpha_bar_prev
        if self.num_steps == sched.num_timesteps and not sched.is_continuous:
            betas = sched.betas[labels]  # exact table values, no division round-off
        one_minus = 1.0 - alpha_bar
        if self.variance == "fixed_small":
            var = betas * (1.0 - alpha_bar_prev) / one_minus
        else:
            var = betas.copy()
        var[-1] = 0.0  # no noise on the last step
        return {
            "label": labels.astype(np.float64),
            "alpha": np.sqrt(alpha_bar),
            "sigma": np.sqrt(one_minus),
            "coef_x0": betas * np.sqrt(alpha_bar_prev) / one_minus,
            "coef_xt": (1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / one_minus,
            "noise_std": np.sqrt(var),
        }

    def _step(self, denoise_fn, carry, row, step_noise, prediction_type="epsilon"):
        (x,) = carry
        _, x0 = predict_eps_and_x0(denoise_fn, x, row, self.clip_x0, prediction_type)
        x = row["coef_x0"] * x0 + row["coef_xt"] * x + row["noise_std"] * step_noise
        return (x,)

    def get_config(self):
        return {"num_steps": self.num_steps, "variance": self.variance, "clip_x0": self.clip_x0,
                "schedule": self.schedule.get_config(), **self._sharing_options()}
