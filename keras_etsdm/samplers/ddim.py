"""DDIM (Song et al. 2021) on a subset of the discrete timesteps, deterministic for η = 0.

From label t to the previous label p (ᾱ read from the schedule's tables):

    x̂0 = (x_t − σ_t ε̂) / α_t
    σ_η = η · sqrt((1 − ᾱ_p)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_p)
    x_p = sqrt(ᾱ_p) x̂0 + sqrt(1 − ᾱ_p − σ_η²) ε̂ + σ_η z

The last step goes to ᾱ = 1 (returns x̂0) unless ``set_alpha_to_one=False``, in which case it
goes to ᾱ of label 0. No noise is added on the last step.

For v- and x0-prediction denoisers ε̂ and x̂0 come from ``parameterization.to_eps_and_x0``
(exact at α_t = 0: "trailing" spacing on a zero-terminal-SNR schedule starts there).
"""

import numpy as np

from keras_etsdm.samplers.base import (Sampler, _check_choice, _validate_num_steps,
                                       explicit_labels, predict_eps_and_x0,
                                       sharing_aware_labels)

DDIM_SPACINGS = ("uniform", "quad", "trailing")


def ddim_timesteps(num_steps, num_timesteps, spacing="uniform"):
    """Increasing integer labels visited by DDIM (the sampler walks them from the end).

    * "uniform": ``k · (T // S)`` for k = 0..S−1 (the DDIM paper's ``range(0, T, T//S)``, cut to
      exactly S entries when S does not divide T). Never visits T−1.
    * "quad": ``int(linspace(0, sqrt(0.8 T), S)²)`` (DDIM's CIFAR-10 spacing). For S above
      ~sqrt(0.8 T) the first entries collide; they are pushed up one label each so that every
      step is a real step (the DDIM code would waste NFE on no-op steps).
    * "trailing": ``round(arange(T, 0, −T/S)) − 1`` (Lin et al. 2024; starts at T−1).

    Returns:
        int64 array ``[S]``, strictly increasing, in ``[0, T−1]``.
    """
    num_steps = _validate_num_steps(num_steps, num_timesteps)
    _check_choice("spacing", spacing, DDIM_SPACINGS)
    T = num_timesteps
    if spacing == "uniform":
        steps = np.arange(num_steps, dtype=np.int64) * (T // num_steps)
    elif spacing == "quad":
        steps = (np.linspace(0, np.sqrt(0.8 * T), num_steps) ** 2).astype(np.int64)
        for i in range(1, num_steps):
            steps[i] = max(steps[i], steps[i - 1] + 1)
        if steps[-1] > T - 1:
            raise ValueError(f"quad spacing cannot fit {num_steps} distinct steps in T={T}; use "
                             f"fewer steps or spacing='uniform'.")
    else:
        steps = (np.round(T - np.arange(num_steps) * (T / num_steps)).astype(np.int64) - 1)[::-1]
    return steps


def continuous_ddim_times(num_steps, schedule, spacing="uniform"):
    """Increasing times visited by DDIM on a ``ContinuousVPSchedule`` (float64 ``[S]``).

    The discrete spacings carried over to t ∈ [eps, T] with u = (t − eps)/(T − eps):
    "uniform" u = k/S (never visits T, as the discrete one never visits T − 1), "trailing"
    u = (k + 1)/S (starts at T), "quad" u = 0.8 (k/(S − 1))², k = 0..S−1.
    """
    num_steps = _validate_num_steps(num_steps, schedule.num_timesteps)
    _check_choice("spacing", spacing, DDIM_SPACINGS)
    k = np.arange(num_steps, dtype=np.float64)
    if spacing == "uniform":
        u = k / num_steps
    elif spacing == "trailing":
        u = (k + 1.0) / num_steps
    else:
        u = 0.8 * (k / max(num_steps - 1, 1)) ** 2
    low, top = schedule.label_range
    return low + u * (top - low)


class DDIMSampler(Sampler):
    """DDIM with η noise, on a named step spacing or explicit timesteps.

    Args:
        num_steps: number of steps S (= NFE), 1 ≤ S ≤ T.
        eta: η ≥ 0; 0 is the deterministic DDIM (= DPM-Solver-1), 1 is DDPM-like.
        spacing: "uniform" (default), "quad" or "trailing" (see ``ddim_timesteps``).
        timesteps: optional explicit integer labels (any order, distinct, in [0, T−1]; on a
            continuous schedule times in [eps, T]); then ``num_steps`` and ``spacing`` are
            ignored.
        set_alpha_to_one: the last step goes to ᾱ = 1 (x̂0, default) instead of ᾱ_0.
        clip_x0: clip x̂0 to [−1, 1] (and re-derive ε̂ from it) at every step, as guided-diffusion
            does for images. Off by default (exact ODE maths).
        schedule: the model's ``DiscreteVPSchedule``, or a ``ContinuousVPSchedule`` (then the
            grid is ``continuous_ddim_times`` and ᾱ comes from the schedule's closed form; the
            last step goes to t = 0, where ᾱ = 1, or to eps).
        sharing: None, or the model's ``TimestepSharing`` for a sharing-aware grid: every piece
            boundary below t̃ is a visited label (``sharing_aware_labels``: steps spread over the
            pieces by their length in labels, or in √label for ``spacing="quad"``, uniform in
            the label inside a piece), and each step is evaluated at the shared label of the
            piece it crosses, so the step leaving a boundary label b uses the condition of the
            piece below b, not the one above. Needs ``num_steps >= n + 1``; not with
            ``timesteps``.
        sharing_labels: False: the sharing-aware knots, the network at the true labels (see
            ``Sampler``).
    """

    # Options that only change the coefficient tables (see Sampler._trace_key).
    _TABLE_ONLY_CONFIG = ("num_steps", "eta", "spacing", "timesteps", "set_alpha_to_one",
                          "schedule", "sharing", "sharing_labels")

    def __init__(self, num_steps=50, eta=0.0, spacing="uniform", timesteps=None,
                 set_alpha_to_one=True, clip_x0=False, schedule=None, sharing=None,
                 sharing_labels=True):
        super().__init__(schedule, sharing, sharing_labels)
        T = self.schedule.num_timesteps
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        self.eta = float(eta)
        self.spacing = _check_choice("spacing", spacing, DDIM_SPACINGS)
        if timesteps is not None:
            steps = explicit_labels(timesteps, self.schedule)
            if self.sharing is not None:
                raise ValueError("timesteps and sharing exclude each other: a sharing-aware "
                                 "grid places its own labels on the piece boundaries.")
            self.timesteps = [s.item() for s in steps]
            self.num_steps = len(self.timesteps)
        else:
            self.num_steps = _validate_num_steps(num_steps, T)
            self.timesteps = None
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_x0 = bool(clip_x0)
        self.stochastic = self.eta > 0
        self._finish_init()

    def step_labels(self):
        """Increasing labels of the grid (int64; float64 times on a continuous schedule)."""
        sched = self.schedule
        if self.timesteps is not None:
            return np.asarray(self.timesteps,
                              dtype=np.float64 if sched.is_continuous else np.int64)
        if self.sharing is not None:
            low, top = sched.label_range
            # The landing point: ᾱ = 1 (label −1, continuous t = 0) or the lowest label.
            end = (0.0 if sched.is_continuous else -1) if self.set_alpha_to_one else low
            offset = 0.0 if sched.is_continuous else 1.0
            measure = (lambda label: np.sqrt(label + offset)) if self.spacing == "quad" else None
            return sharing_aware_labels(self.sharing, self.num_steps, top, end, measure,
                                        integer=not sched.is_continuous)
        if sched.is_continuous:
            return continuous_ddim_times(self.num_steps, sched, self.spacing)
        return ddim_timesteps(self.num_steps, sched.num_timesteps, self.spacing)

    def _make_tables(self):
        sched = self.schedule
        labels = self.step_labels()[::-1]  # walk from the noisiest label down
        alpha_bar = sched.alpha_bar(labels)
        lowest = np.asarray(sched.eps if sched.is_continuous else 0)
        final = 1.0 if self.set_alpha_to_one else float(sched.alpha_bar(lowest))
        alpha_bar_prev = np.append(alpha_bar[1:], final)
        noise_std = (self.eta * np.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
                     * np.sqrt(1.0 - alpha_bar / alpha_bar_prev))
        noise_std[-1] = 0.0  # no noise on the last step
        direction = np.sqrt(np.maximum(1.0 - alpha_bar_prev - noise_std**2, 0.0))
        network_labels = labels.astype(np.float64)
        if self.sharing is not None and self.sharing_labels:
            network_labels = self.sharing.piece_label(network_labels)
        return {
            "label": network_labels,
            "alpha": np.sqrt(alpha_bar),
            "sigma": np.sqrt(1.0 - alpha_bar),
            "alpha_prev": np.sqrt(alpha_bar_prev),
            "direction": direction,
            "noise_std": noise_std,
        }

    def _step(self, denoise_fn, carry, row, step_noise, prediction_type="epsilon"):
        (x,) = carry
        eps, x0 = predict_eps_and_x0(denoise_fn, x, row, self.clip_x0, prediction_type)
        x = row["alpha_prev"] * x0 + row["direction"] * eps
        if step_noise is not None:
            x = x + row["noise_std"] * step_noise
        return (x,)

    def get_config(self):
        return {"num_steps": self.num_steps, "eta": self.eta, "spacing": self.spacing,
                "timesteps": self.timesteps, "set_alpha_to_one": self.set_alpha_to_one,
                "clip_x0": self.clip_x0, "schedule": self.schedule.get_config(),
                **self._sharing_options()}
