"""E-TSDM: the early-timestep sharing map f(t) applied to the network's time condition.

    Δ = t̃ / n
    f(t) = Δ · floor(t / Δ)   if t < t̃
    f(t) = t                  otherwise

Only the condition fed to the network changes; noising, loss and samplers use the true t.
With ``t_tilde = 0`` or ``n = 0`` the map is the identity (the DDPM baseline).
"""

import keras
import numpy as np
from keras import ops

# Labels within this fraction of a piece of a boundary snap onto it, so that float rounding
# (0.06 / 0.02 = 2.9999999999999996) cannot move a boundary label into the previous piece.
_BOUNDARY_TOLERANCE = 1e-5


@keras.saving.register_keras_serializable(package="keras_etsdm")
class TimestepSharing:
    """The E-TSDM map on float tensors of any shape.

    Args:
        t_tilde: the cut-off t̃; labels below it are shared. Discrete default 100 (of T = 1000);
            use 0.1 for continuous time in [eps, 1].  0 disables sharing.
        n: number of sub-intervals of ``[0, t̃)``. 0 disables sharing.
        num_timesteps: optional T, only for validation (``t_tilde`` must be below it).

    Example: with the defaults, labels 0–19 → 0, 20–39 → 20, …, 80–99.9 → 80, ≥ 100 unchanged.
    """

    def __init__(self, t_tilde=100, n=5, num_timesteps=None):
        if n < 0 or int(n) != n:
            raise ValueError(f"TimestepSharing: n must be a non-negative integer "
                             f"(0 disables sharing), got {n!r}.")
        if t_tilde < 0:
            raise ValueError(f"TimestepSharing: t_tilde must be >= 0 (0 disables sharing), "
                             f"got {t_tilde!r}.")
        if t_tilde > 0 and n == 0:
            raise ValueError("TimestepSharing: n must be > 0 when t_tilde > 0 (n is the number of "
                             "sub-intervals of [0, t_tilde)); set t_tilde=0 for the baseline.")
        if num_timesteps is not None and t_tilde >= num_timesteps:
            raise ValueError(f"TimestepSharing: t_tilde={t_tilde} must be smaller than the number "
                             f"of timesteps T={num_timesteps}.")
        self.t_tilde = float(t_tilde) if isinstance(t_tilde, float) else t_tilde
        self.n = int(n)
        self.num_timesteps = num_timesteps

    @property
    def enabled(self):
        return self.t_tilde > 0 and self.n > 0

    @property
    def delta(self):
        """Width Δ = t̃ / n of one shared piece (0 when disabled)."""
        return self.t_tilde / self.n if self.enabled else 0.0

    def __call__(self, t):
        """Map time labels ``t`` (any shape, float or int) to shared condition values (float)."""
        t = ops.convert_to_tensor(t)
        if "float" not in str(t.dtype):
            t = ops.cast(t, "float32")
        if not self.enabled:
            return t
        delta = self.delta
        piece = ops.floor(t / delta + _BOUNDARY_TOLERANCE)
        piece = ops.clip(piece, 0.0, float(self.n - 1))
        shared = ops.cast(piece * delta, t.dtype)
        return ops.where(t < self.t_tilde, shared, t)

    def boundaries(self):
        """The shared condition values ``[0, Δ, 2Δ, …, (n−1)Δ]`` (python floats)."""
        return [i * self.delta for i in range(self.n)] if self.enabled else []

    def knots(self):
        """The piece boundaries ``[t̃, t̃ − Δ, …, Δ]``, descending (python floats; empty when
        disabled): a sampler grid with a knot on each of them never straddles a jump of the
        shared network. (0, the lower end of the first piece, is the end of every grid.)"""
        return [(self.n - i) * self.delta for i in range(self.n)] if self.enabled else []

    def piece_label(self, label):
        """The label a shared network sees on a step that starts at ``label`` and goes down
        without leaving its piece (numpy float64, any shape).

        Inside a piece this is ``f(label)``. On a piece's upper boundary ``label = c + Δ`` (and
        at ``t̃``) it is ``c``, the condition of the piece the step integrates through, where
        ``f`` would give the condition of the piece above. Labels above ``t̃`` are returned
        unchanged.
        """
        label = np.asarray(label, np.float64)
        if not self.enabled:
            return label
        piece = np.ceil(label / self.delta - _BOUNDARY_TOLERANCE) - 1.0
        shared = np.clip(piece, 0.0, float(self.n - 1)) * self.delta
        return np.where(label <= self.t_tilde * (1.0 + _BOUNDARY_TOLERANCE), shared, label)

    def get_config(self):
        return {"t_tilde": self.t_tilde, "n": self.n, "num_timesteps": self.num_timesteps}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def default_for(cls, num_timesteps):
        """The library's default: the paper's t̃ = T/10 (100 of T = 1000), n = 5.

        Used whenever ``sharing=None`` (``DiffusionModel``, ``build_model``); gin's
        ``base.gin`` binds the same values. Fewer than 10 timesteps: no sharing.
        """
        t_tilde = int(num_timesteps) // 10
        return cls(t_tilde, 5 if t_tilde else 0)

    def __repr__(self):
        return f"TimestepSharing(t_tilde={self.t_tilde}, n={self.n})"

    def __eq__(self, other):
        return isinstance(other, TimestepSharing) and self.get_config() == other.get_config()
