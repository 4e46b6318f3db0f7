"""The Lipschitz-in-t diagnostic (the paper's Figure 1b) and closed-form ε* for testing it.

For a denoiser ε(x, t) and clean data x0:

    x_t = α_t x0 + σ_t ε                          (one fixed ε per example, seeded)
    K_one_step(t)   = E_b ‖ε(x_t, t) − ε(x_t, t + 1)‖₂ / 1
    K_shared_slope(t) = E_b ‖ε(x_t, f(t) + Δ) − ε(x_t, f(t))‖₂ / Δ      (t < t̃, E-TSDM only)

``K_one_step`` is the quantity of ``etsdm.md`` §3. For a time-shared model it is exactly 0
inside every piece and spikes at the last label of each piece (t = kΔ − 1) — the network is
piecewise constant in t. ``K_shared_slope`` is the slope between the two shared values that
bracket t (the piece's own value and the next one), a finite-difference Lipschitz constant of
the shared network at its natural resolution Δ; for t ≥ t̃ it equals ``K_one_step``. The plot
shows both for E-TSDM and says which is which.

``denoise_fn(x, t)`` is any callable on numpy arrays ``x [N, ...]``, ``t [N]`` float labels
that returns ``[N, ...]``: a ``DiffusionModel``'s denoiser (``model_denoise_fn``, sharing
applied inside), or ``GaussianMixtureEpsStar`` (closed form).
"""

import csv
import io
import os

import numpy as np

from keras_etsdm.backend import to_numpy
from keras_etsdm.io_utils import atomic_write_bytes
from keras_etsdm.parameterization import to_eps_and_x0
from keras_etsdm.samplers._compiled import compiled_denoiser


# ----- noise-level lookup ----------------------------------------------------------------------
def alpha_sigma(schedule, t):
    """α_t, σ_t (float64 numpy) at labels ``t``.

    ``DiscreteVPSchedule``: integer labels index the tables; fractional labels interpolate them.
    A continuous schedule (``ContinuousVPSchedule``, anything with ``marginal_alpha`` /
    ``marginal_std`` and no tables): ``t`` is the continuous time itself.
    """
    t = np.asarray(t, np.float64)
    if hasattr(schedule, "alphas") and hasattr(schedule, "sigmas"):
        labels = np.arange(len(schedule.alphas), dtype=np.float64)
        if np.any(t < 0) or np.any(t > labels[-1]):
            raise ValueError(f"Labels must lie in [0, {labels[-1]:.0f}], got "
                             f"[{t.min()}, {t.max()}].")
        return np.interp(t, labels, schedule.alphas), np.interp(t, labels, schedule.sigmas)
    return schedule.marginal_alpha(t), schedule.marginal_std(t)


# ----- closed-form denoisers -------------------------------------------------------------------
class GaussianMixtureEpsStar:
    """Exact ε*(x, t) = (x − α_t E[x0 | x_t = x]) / σ_t for isotropic Gaussian-mixture data.

    Data: ``x0 ~ Σ_k w_k N(μ_k, s_k² I)`` in ``D`` dimensions (one component = Gaussian data,
    where ε* = σ_t (x − α_t μ) / (α_t² s² + σ_t²)). Works on arrays ``x [N, ...]`` (flattened
    to D internally) and labels ``t [N]`` or a scalar.

    Args:
        means: ``[K, D]`` (or ``[D]`` for one component).
        stds: ``[K]`` per-component standard deviations (or a scalar).
        weights: ``[K]`` mixture weights (default uniform).
        schedule: where α_t, σ_t come from (see ``alpha_sigma``).
        sharing: optional ``TimestepSharing``: the E-TSDM map applied to t before evaluating
            (the "time-shared ε*", i.e. what a perfectly fitted shared network would be if it
            reproduced ε* at the piece's left label).
    """

    def __init__(self, means, stds, schedule, weights=None, sharing=None):
        means = np.asarray(means, np.float64)
        self.means = means[None] if means.ndim == 1 else means
        k = self.means.shape[0]
        self.stds = np.broadcast_to(np.asarray(stds, np.float64), (k,)).copy()
        if np.any(self.stds < 0):
            raise ValueError("Component standard deviations must be >= 0.")
        weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64)
        if weights.shape != (k,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError(f"weights must be {k} non-negative numbers summing to 1.")
        self.weights = weights
        self.schedule = schedule
        self.sharing = sharing

    @property
    def dim(self):
        return self.means.shape[1]

    def sample(self, num, seed=0):
        """Draw ``num`` data points ``[num, D]`` (float64)."""
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=num, p=self.weights)
        return self.means[comp] + self.stds[comp, None] * rng.standard_normal((num, self.dim))

    def _labels(self, t, n):
        t = np.broadcast_to(np.asarray(t, np.float64), (n,))
        if self.sharing is not None and self.sharing.enabled:
            t = to_numpy(self.sharing(t.astype(np.float32))).astype(np.float64)
        return t

    def posterior_mean(self, x, t):
        """E[x0 | x_t = x] ``[N, D]`` for flattened ``x [N, D]`` at labels ``t [N]``."""
        alpha, sigma = alpha_sigma(self.schedule, t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        var = alpha**2 * self.stds[None, :] ** 2 + sigma**2          # [N, K] marginal variance
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]   # [N, K, D]
        log_resp = (np.log(self.weights)[None] - 0.5 * self.dim * np.log(var)
                    - 0.5 * np.sum(diff**2, axis=-1) / var)
        log_resp -= log_resp.max(axis=1, keepdims=True)
        resp = np.exp(log_resp)
        resp /= resp.sum(axis=1, keepdims=True)
        # Per component: E[x0 | x, k] = μ_k + α s_k² (x − α μ_k) / var_k.
        gain = (alpha * self.stds[None, :] ** 2 / var)[:, :, None]
        comp_mean = self.means[None] + gain * diff
        return np.sum(resp[:, :, None] * comp_mean, axis=1)

    def __call__(self, x, t):
        x = np.asarray(x, np.float64)
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per example, the data has "
                             f"{self.dim} dimensions.")
        labels = self._labels(t, shape[0])
        alpha, sigma = alpha_sigma(self.schedule, labels)
        x0_hat = self.posterior_mean(flat, labels)
        eps = (flat - alpha[:, None] * x0_hat) / sigma[:, None]
        return eps.reshape(shape)


def model_denoise_fn(model, label=None, output="epsilon"):
    """A numpy callable ``(x, t) -> ε̂`` for a ``DiffusionModel``, compiled once.

    Every evaluation goes through ``model.denoise`` (the seam: E-TSDM sharing and any subclass
    override included), compiled like the sampling loops (``samplers._compiled``). EMA or raw
    weights: call it inside ``model.ema_scope(...)``.

    Args:
        model: a ``DiffusionModel``.
        label: class-conditional models: the class id to condition on (None: the null class,
            i.e. the unconditional ε̂ that guidance also uses).
        output: "epsilon" (default, the paper's quantity): a v- or x0-prediction model's output
            is converted to the ε̂ it implies, with α, σ of the queried t
            (``parameterization.to_eps_and_x0``); "native": the network's own prediction
            (v̂ or x̂0), i.e. the Lipschitz constant of what the network learns. Identical for
            ε-prediction models.
    """
    if output not in ("epsilon", "native"):
        raise ValueError(f"output must be 'epsilon' or 'native', got {output!r}.")
    compiled = compiled_denoiser(model)
    if label is not None:
        model.check_labels([label])
    elif model.conditional:
        label = model.null_id
    convert = output == "epsilon" and getattr(model, "prediction_type", "epsilon") != "epsilon"

    def fn(x, t):
        x = np.asarray(x, np.float32)
        t = np.broadcast_to(np.asarray(t, np.float32), (x.shape[0],))
        conditioning = {} if label is None else {"y": np.full((x.shape[0],), label, np.int32)}
        out = np.asarray(to_numpy(compiled(x, t, **conditioning)))
        if not convert:
            return out
        alpha, sigma = alpha_sigma(model.schedule, t.astype(np.float64))
        shape = (-1,) + (1,) * (x.ndim - 1)
        eps, _ = to_eps_and_x0(out.astype(np.float64), model.prediction_type,
                               x.astype(np.float64), alpha.reshape(shape), sigma.reshape(shape))
        return eps.astype(np.float32)

    return fn


# ----- the diagnostic --------------------------------------------------------------------------
def lipschitz_curve(denoise_fn, x0, schedule, timesteps=None, sharing=None, step=None, seed=0,
                    max_rows=4096):
    """K(t) of a denoiser over a batch of data.

    Args:
        denoise_fn: ``(x [N, ...], t [N]) -> ε̂ [N, ...]`` on numpy arrays.
        x0: clean data ``[B, ...]`` (numpy).
        schedule: α/σ source (see ``alpha_sigma``).
        timesteps: labels t at which to evaluate (default every label ``0 … T−2``; on a
            ``ContinuousVPSchedule`` the times ``eps + k·step`` up to ``T − step``).
        sharing: the model's ``TimestepSharing`` (None / disabled: baseline, no shared slope).
        step: t' − t for the one-step difference: default 1 label, or on a continuous schedule
            ``1/(N − 1)``, the time of one network label (``network_time`` = (N − 1)·t). K is
            per unit of the denoiser's time coordinate (labels, or t in continuous time).
        seed: seed of the noise ε (the same ε is reused at every t, which removes sampling
            noise between neighbouring t).
        max_rows: at most this many rows per ``denoise_fn`` call (several t per call).

    Returns:
        dict with ``t [M]``, ``k_one_step [M]``, ``k_shared_slope [M]`` (NaN for the baseline),
        ``delta`` (Δ, 0 for the baseline), ``t_tilde``, ``batch_size`` and ``description``.
    """
    x0 = np.asarray(x0, np.float32)
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch [B, ...] of data, got shape {x0.shape}.")
    continuous = getattr(schedule, "is_continuous", not hasattr(schedule, "num_timesteps"))
    if step is None:
        step = 1.0 / (schedule.num_scales - 1) if hasattr(schedule, "num_scales") else 1.0
    if timesteps is None:
        if not hasattr(schedule, "num_timesteps"):
            raise ValueError("Pass timesteps explicitly for a schedule without num_timesteps.")
        if continuous:
            count = int(np.floor((schedule.T - schedule.eps) / step + 1e-9))
            timesteps = schedule.eps + step * np.arange(count, dtype=np.float64)
        else:
            timesteps = np.arange(schedule.num_timesteps - 1, dtype=np.float64)
    timesteps = np.asarray(timesteps, np.float64)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError("timesteps must be a non-empty 1-D array of labels.")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}.")
    batch = x0.shape[0]
    noise = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
    shared_on = sharing is not None and sharing.enabled
    delta = float(sharing.delta) if shared_on else 0.0

    # Each evaluation is (t_noise, t_a, t_b, scale): K = E‖ε(x_{t_noise}, t_a) − ε(x, t_b)‖ / scale.
    queries = [(t, t, t + step, step) for t in timesteps]
    shared_index = []
    if shared_on:
        f = to_numpy(sharing(timesteps.astype(np.float32))).astype(np.float64)
        for i, t in enumerate(timesteps):
            if t < sharing.t_tilde:
                shared_index.append(i)
                queries.append((t, f[i], f[i] + delta, delta))
    values = _evaluate_differences(denoise_fn, x0, noise, schedule, queries, max_rows)
    k_one_step = values[:len(timesteps)]
    k_shared = np.full(len(timesteps), np.nan)
    if shared_on:
        k_shared = k_one_step.copy()
        k_shared[shared_index] = values[len(timesteps):]
    return {"t": timesteps, "k_one_step": k_one_step, "k_shared_slope": k_shared,
            "delta": delta, "t_tilde": float(sharing.t_tilde) if shared_on else 0.0,
            "step": float(step), "batch_size": int(batch),
            "time_unit": "t" if continuous else "label",
            "description": DESCRIPTION_SHARED if shared_on else DESCRIPTION_ONE_STEP}


DESCRIPTION_ONE_STEP = "K(t) = E||eps(x_t,t) - eps(x_t,t+1)|| / 1 (one-step difference)"
DESCRIPTION_SHARED = ("k_one_step: one-step difference (0 inside shared pieces, spikes at "
                      "t = k*Delta - 1); k_shared_slope: E||eps(x_t,f(t)+Delta) - "
                      "eps(x_t,f(t))|| / Delta for t < t_tilde (slope between adjacent shared "
                      "values), equal to k_one_step for t >= t_tilde")


def _evaluate_differences(denoise_fn, x0, noise, schedule, queries, max_rows):
    batch = x0.shape[0]
    per_call = min(max(1, max_rows // (2 * batch)), len(queries))
    tail = (1,) * (x0.ndim - 1)
    out = np.empty(len(queries))
    for start in range(0, len(queries), per_call):
        chunk = queries[start:start + per_call]
        # Pad the last chunk to the full size: a fixed batch shape never recompiles the network.
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))
        t_noise = np.repeat([q[0] for q in padded], batch)
        alpha, sigma = alpha_sigma(schedule, t_noise)
        x0_rep = np.tile(x0, (len(padded),) + tail)
        x_t = (alpha.reshape((-1,) + tail) * x0_rep
               + sigma.reshape((-1,) + tail) * np.tile(noise, (len(padded),) + tail))
        x_t = x_t.astype(np.float32)
        t_a = np.repeat([q[1] for q in padded], batch)
        t_b = np.repeat([q[2] for q in padded], batch)
        eps = np.asarray(denoise_fn(np.concatenate([x_t, x_t]), np.concatenate([t_a, t_b])),
                         np.float64)
        n = len(padded) * batch
        diff = (eps[:n] - eps[n:]).reshape(len(padded), batch, -1)
        norms = np.sqrt(np.sum(diff**2, axis=-1)).mean(axis=1)
        scales = np.array([q[3] for q in padded])
        out[start:start + len(chunk)] = (norms / scales)[:len(chunk)]
    return out


# ----- outputs -----------------------------------------------------------------------------------
def write_lipschitz_csv(path, curves):
    """One CSV with a row per t: ``t, <name>_k_one_step, <name>_k_shared_slope …``.

    Args:
        curves: dict name → result of ``lipschitz_curve`` (same ``t`` for all).
    """
    names = list(curves)
    t = curves[names[0]]["t"]
    for name in names[1:]:
        if not np.array_equal(curves[name]["t"], t):
            raise ValueError("All curves must be evaluated at the same timesteps.")
    header = ["t"]
    columns = [t]
    for name in names:
        header.append(f"{name}_k_one_step")
        columns.append(curves[name]["k_one_step"])
        if curves[name]["delta"] > 0:
            header.append(f"{name}_k_shared_slope")
            columns.append(curves[name]["k_shared_slope"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for name in names:
        buffer.write(f"# {name}: {curves[name]['description']}; batch "
                     f"{curves[name]['batch_size']}\n")
    writer.writerow(header)
    for row in zip(*columns):
        writer.writerow([f"{row[0]:g}"] + [f"{v:.6g}" for v in row[1:]])
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def plot_lipschitz(path, curves, zoom=200, title=None):
    """PNG with two log-y panels (all t, and t < ``zoom``); matplotlib's Agg backend.

    Baselines are drawn as their one-step difference; shared models as the slope between
    adjacent shared values (solid) with their non-zero one-step jumps as markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, limit in zip(axes, (None, zoom)):
        for i, (name, c) in enumerate(curves.items()):
            t = c["t"]
            keep = np.ones_like(t, bool) if limit is None else t < limit
            color = f"C{i}"
            if c["delta"] > 0:
                y = np.where(c["k_shared_slope"] > 0, c["k_shared_slope"], np.nan)
                ax.plot(t[keep], y[keep], color=color,
                        label=f"{name}: slope between shared values / Δ={c['delta']:g}")
                one = c["k_one_step"]
                jumps = keep & (one > 0) & (t < c["t_tilde"])
                ax.plot(t[jumps], one[jumps], "x", color=color, markersize=5,
                        label=f"{name}: one-step jumps (0 inside pieces)")
            else:
                y = np.where(c["k_one_step"] > 0, c["k_one_step"], np.nan)
                ax.plot(t[keep], y[keep], color=color, label=f"{name}: one-step difference")
        ax.set_yscale("log")
        ax.set_xlabel("t (label)")
        ax.set_ylabel("K(t) = E‖ε(x_t,t) − ε(x_t,t′)‖ / |t − t′|")
        ax.set_title("all t" if limit is None else f"zoom: t < {limit}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_lipschitz_outputs(output_dir, curves, prefix="lipschitz", zoom=200, title=None):
    """CSV + PNG into ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    csv_path = write_lipschitz_csv(os.path.join(output_dir, f"{prefix}.csv"), curves)
    png_path = plot_lipschitz(os.path.join(output_dir, f"{prefix}.png"), curves, zoom, title)
    return csv_path, png_path
