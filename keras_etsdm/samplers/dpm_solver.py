"""DPM-Solver and DPM-Solver++ (Lu et al. 2022), singlestep and multistep, orders 1–3.

On a ``ContinuousVPSchedule`` the solver works on t ∈ [eps, T] with the closed-form log α and
the denoiser is called at t itself. A discrete-time model is seen through the continuous-time
wrapper of the reference implementation (LuChengTHU/dpm-solver): t ∈ [1/T, 1], log α(t)
interpolated piecewise linearly over the knots t_n = (n+1)/T, the network label is (t − 1/T)·T
(``DiscreteVPSchedule.label``).
The update rules, time grids ("time_uniform", "logSNR", "time_quadratic"), the multistep warm-up,
``lower_order_final`` (which, as in the reference code, acts only below 10 steps) and the
singlestep order schedule (``singlestep_orders``) follow the reference with its
``solver_type="dpmsolver"``. Unlike the reference, λ is never clipped at −5.1 (that clip drops
the last steps of a cosine schedule and breaks the label ↔ step correspondence).

Every update is linear in the current anchor x_s and in the last model outputs, so the solver is
a table of coefficients computed in float64 numpy (``_make_tables``) and one generic loop body:

    m_i   = ε̂(x_i, label_i)                         (dpmsolver: noise prediction)
          = threshold((x_i − σ_i ε̂)/α_i)             (dpmsolver++: data prediction)
    x_{i+1} = A_i · anchor + Σ_k C_{i,k} · m_{i−k}    (k < order; the model-output history)
    anchor  = x_{i+1} at the end of an outer step (always for multistep)

One iteration is one network evaluation, so NFE == ``num_steps`` exactly.

v- and x0-prediction denoisers: ε̂ (dpmsolver) or x̂0 (dpmsolver++) come from
``parameterization.to_eps_and_x0`` with the continuous-time α, σ of the evaluation's true time
(tables ``alpha`` / ``sigma``); an x0 model under dpmsolver++ uses its prediction as is. On a
zero-terminal-SNR schedule the solver starts at t = 1 with the clamped α of the schedule's
continuous view (``schedules._terminal_log_alpha``, ≈ 2⁻¹² or less), not 0: the update rules
need a finite λ. Prefer "dpmsolver++" there: from so small an α the noise-prediction updates
scale x by α_t/α_s up to ~1e4, and the singlestep ones amplify float32 round-off by as much
(tests/test_parameterization.py).
"""

import numpy as np
from keras import ops

from keras_etsdm.parameterization import to_eps_and_x0
from keras_etsdm.samplers.base import (Sampler, _check_choice, _validate_num_steps,
                                       allocate_steps, broadcast_label, sharing_segments)

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
METHODS = ("multistep", "singlestep")
ALGORITHMS = ("dpmsolver", "dpmsolver++")
# The reference applies lower_order_final only when steps < 10 (its docstring says 15).
LOWER_ORDER_FINAL_BELOW = 10


def time_grid(schedule, skip_type, t_start, t_end, num_intervals):
    """``num_intervals + 1`` continuous times from ``t_start`` down to ``t_end`` (float64).

    "logSNR": uniform in λ; "time_uniform": uniform in t; "time_quadratic": uniform in √t.
    """
    _check_choice("skip_type", skip_type, SKIP_TYPES)
    n = num_intervals + 1
    if skip_type == "logSNR":
        lambdas = np.linspace(schedule.marginal_lambda(t_start), schedule.marginal_lambda(t_end), n)
        grid = schedule.inverse_lambda(lambdas)
        grid[0], grid[-1] = t_start, t_end  # exact ends (inverse interpolation round-off)
        return grid
    if skip_type == "time_uniform":
        return np.linspace(t_start, t_end, n)
    return np.linspace(np.sqrt(t_start), np.sqrt(t_end), n) ** 2


def singlestep_orders(num_steps, order):
    """The reference's order schedule for singlestep DPM-Solver with NFE = ``num_steps``.

    order 3: K = S//3 + 1 outer steps with orders [3]*(K−2)+[2, 1], [3]*(K−1)+[1] or
    [3]*(K−1)+[2] for S % 3 = 0, 1, 2; order 2: [2]*(S//2) (+[1] if S is odd); order 1: [1]*S.
    """
    if order == 3:
        K = num_steps // 3 + 1
        if num_steps % 3 == 0:
            return [3] * (K - 2) + [2, 1]
        if num_steps % 3 == 1:
            return [3] * (K - 1) + [1]
        return [3] * (K - 1) + [2]
    if order == 2:
        return [2] * (num_steps // 2) + [1] * (num_steps % 2)
    return [1] * num_steps


def multistep_orders(num_steps, order, lower_order_final=True):
    """Order of each multistep update: warm-up min(order, j+1), and with ``lower_order_final``
    and fewer than 10 steps, at most ``num_steps − j`` (the reference's schedule)."""
    orders = []
    for j in range(num_steps):
        k = min(order, j + 1)
        if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
            k = min(k, num_steps - j)
        orders.append(k)
    return orders


class DPMSolverSampler(Sampler):
    """DPM-Solver / DPM-Solver++ on a discrete- or continuous-time ε-, v- or x0-prediction model.

    Args:
        num_steps: NFE, 1 ≤ S ≤ T.
        order: 1, 2 or 3. Order 1 is DDIM (η = 0) on the chosen time grid.
        method: "multistep" (default) or "singlestep" ("DPM-Solver-fast" order schedule).
        algorithm: "dpmsolver++" (data prediction, default as in the reference) or "dpmsolver"
            (noise prediction).
        skip_type: time grid, "time_uniform" (reference default), "logSNR" or "time_quadratic".
        lower_order_final: lower orders in the last multistep steps when S < 10.
        thresholding: Imagen dynamic thresholding of x̂0 (dpmsolver++ only).
        dynamic_thresholding_ratio, thresholding_max_val: its quantile p and floor s ≥ max_val.
        schedule: the model's ``DiscreteVPSchedule`` or ``ContinuousVPSchedule`` (t ∈
            [eps, T] directly; the denoiser gets t as its label).
        sharing: None, or the model's ``TimestepSharing`` for a sharing-aware grid: a knot on
            every piece boundary below t̃ (NFE spread over the pieces in the grid's variable,
            at least one per piece), the multistep history and the singlestep order schedule
            restarted in every piece, and every evaluation inside a piece made at that piece's
            shared label (the condition the network holds over the whole step, including the
            step that starts on the piece's upper boundary). Needs ``num_steps >= n + 1``.
        sharing_labels: False: the sharing-aware knots and restarts, the network at the true
            times (see ``Sampler``).

    The multistep order-3 solver is asymptotically second order (its first-order warm-up step's
    local error is never damped); singlestep order 3 shows order ≈ 3 on a logSNR grid.
    """

    # Options that only change the coefficient tables (see Sampler._trace_key).
    _TABLE_ONLY_CONFIG = ("num_steps", "method", "skip_type", "lower_order_final", "schedule",
                          "sharing", "sharing_labels")

    def __init__(self, num_steps=20, order=2, method="multistep", algorithm="dpmsolver++",
                 skip_type="time_uniform", lower_order_final=True, thresholding=False,
                 dynamic_thresholding_ratio=0.995, thresholding_max_val=1.0, schedule=None,
                 sharing=None, sharing_labels=True):
        super().__init__(schedule, sharing, sharing_labels)
        self.num_steps = _validate_num_steps(num_steps, self.schedule.num_timesteps)
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
        self.order = int(order)
        self.method = _check_choice("method", method, METHODS)
        self.algorithm = _check_choice("algorithm", algorithm, ALGORITHMS)
        self.skip_type = _check_choice("skip_type", skip_type, SKIP_TYPES)
        self.lower_order_final = bool(lower_order_final)
        if thresholding and self.algorithm != "dpmsolver++":
            raise ValueError("thresholding acts on the data prediction x̂0: it needs "
                             "algorithm='dpmsolver++'.")
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got "
                             f"{dynamic_thresholding_ratio}.")
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.thresholding_max_val = float(thresholding_max_val)
        self._finish_init()

    # ----- coefficient tables (float64) -------------------------------------------------------
    @property
    def _plus(self):
        return self.algorithm == "dpmsolver++"

    def _ratio(self, s, t):
        """Coefficient of the anchor x_s in an update s → t."""
        ns = self.schedule
        if self._plus:
            return ns.marginal_std(t) / ns.marginal_std(s)
        return np.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(s))

    def _scale(self, t):
        """σ_t for dpmsolver, α_t for dpmsolver++ (the factor in front of the φ terms)."""
        ns = self.schedule
        return ns.marginal_alpha(t) if self._plus else ns.marginal_std(t)

    def _phi1(self, h):
        return np.expm1(-h) if self._plus else np.expm1(h)

    def _multistep_update(self, k, lambdas, j, t):
        """(A, C) of the order-k multistep update from grid point j to time t.

        C holds the weights of the model outputs at grid points j, j−1, j−2.
        """
        e = np.eye(3)
        m0, m1, m2 = e[0], e[1], e[2]
        lam_t = self.schedule.marginal_lambda(t)
        h = lam_t - lambdas[j]
        phi_1 = self._phi1(h)
        scale = self._scale(t)
        # dpmsolver: x_t = r x − σ_t φ1 m0 …; dpmsolver++: x_t = r x − α_t φ1 m0 …
        c = -scale * phi_1 * m0
        if k == 2:
            r0 = (lambdas[j] - lambdas[j - 1]) / h
            d1_0 = (m0 - m1) / r0
            c = c - 0.5 * scale * phi_1 * d1_0
        elif k == 3:
            r0 = (lambdas[j] - lambdas[j - 1]) / h
            r1 = (lambdas[j - 1] - lambdas[j - 2]) / h
            d1_0 = (m0 - m1) / r0
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            if self._plus:
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                c = c + scale * phi_2 * d1 - scale * phi_3 * d2
            else:
                phi_2 = phi_1 / h - 1.0
                phi_3 = phi_2 / h - 0.5
                c = c - scale * phi_2 * d1 - scale * phi_3 * d2
        return c

    def _segments(self):
        """``[(t_hi, t_lo, nfe), …]``: the whole interval [1/T, 1] with every NFE, or with
        ``sharing`` one segment per piece below t̃ (and one above), NFE spread by
        ``allocate_steps`` over their lengths in the grid's variable (λ, t or √t)."""
        ns = self.schedule
        if self.sharing is None:
            return [(ns.ode_T, ns.eps, self.num_steps)]
        low, top = ns.label(ns.eps), ns.label(ns.ode_T)
        ends = [float(ns.time_of_label(label))
                for label in sharing_segments(self.sharing, top, low)]
        ends[0], ends[-1] = ns.ode_T, ns.eps  # exact ends
        if self.skip_type == "logSNR":
            measure = ns.marginal_lambda(np.asarray(ends))
        elif self.skip_type == "time_uniform":
            measure = -np.asarray(ends)
        else:
            measure = -np.sqrt(np.asarray(ends))
        lengths = np.diff(measure)
        unit = self.order if self.method == "singlestep" else 1
        if self.num_steps // unit >= len(lengths):
            # Singlestep: whole outer steps of full order per piece; the NFE left over go to
            # the piece that got the most.
            counts = [unit * c for c in allocate_steps(lengths, self.num_steps // unit)]
            counts[int(np.argmax(counts))] += self.num_steps % unit
        else:
            counts = allocate_steps(lengths, self.num_steps)
        return list(zip(ends[:-1], ends[1:], counts))

    def _multistep_rows(self):
        ns = self.schedule
        grid, orders = [ns.ode_T], []
        for t_hi, t_lo, nfe in self._segments():
            grid.extend(time_grid(ns, self.skip_type, t_hi, t_lo, nfe)[1:])
            # The history restarts on each piece boundary: a stencil never spans a jump.
            orders.extend(multistep_orders(nfe, self.order, lower_order_final=False))
        if self.lower_order_final and self.num_steps < LOWER_ORDER_FINAL_BELOW:
            orders = [min(k, self.num_steps - j) for j, k in enumerate(orders)]
        grid = np.asarray(grid)
        lambdas = ns.marginal_lambda(grid)
        rows = []
        for j, k in enumerate(orders):
            s, t = grid[j], grid[j + 1]
            c = self._multistep_update(k, lambdas, j, t)
            rows.append((s, self._ratio(s, t), c, 1.0))
        return rows, orders

    def _singlestep_rows(self):
        if self.sharing is None:
            orders = singlestep_orders(self.num_steps, self.order)
            return self._singlestep_segment(self.schedule.ode_T, self.schedule.eps, self.num_steps,
                                            orders), orders
        rows, orders = [], []
        for t_hi, t_lo, nfe in self._segments():
            # Full-order steps, one shorter lower-order step for the remainder; outer steps as
            # long as their order on the fine grid, so no step of lower order is a long one.
            segment_orders = [self.order] * (nfe // self.order) + (
                [nfe % self.order] if nfe % self.order else [])
            rows.extend(self._singlestep_segment(t_hi, t_lo, nfe, segment_orders,
                                                 fine_outer=True))
            orders.extend(segment_orders)
        return rows, orders

    def _singlestep_segment(self, t_start, t_end, nfe, orders, fine_outer=False):
        ns = self.schedule
        if self.skip_type == "logSNR" and not fine_outer:
            outer = time_grid(ns, "logSNR", t_start, t_end, len(orders))
        else:
            fine = time_grid(ns, self.skip_type, t_start, t_end, nfe)
            outer = fine[np.cumsum([0] + orders)]
        e = np.eye(3)
        rows = []
        for k, s, t in zip(orders, outer[:-1], outer[1:]):
            inner = ns.marginal_lambda(time_grid(ns, self.skip_type, s, t, k))
            lam_s = ns.marginal_lambda(s)
            h = ns.marginal_lambda(t) - lam_s
            scale_t, phi_1 = self._scale(t), self._phi1(h)
            sign = 1.0 if self._plus else -1.0  # ++ adds the correction terms, dpmsolver subtracts
            if k == 1:
                rows.append((s, self._ratio(s, t), -scale_t * phi_1 * e[0], 1.0))
                continue
            r1 = (inner[1] - inner[0]) / h
            s1 = ns.inverse_lambda(lam_s + r1 * h)
            phi_11 = self._phi1(r1 * h)
            # Iteration at s (history: m_s) → x_s1.
            rows.append((s, self._ratio(s, s1), -self._scale(s1) * phi_11 * e[0], 0.0))
            if k == 2:
                # Iteration at s1 (history: m_s1, m_s) → x_t.
                m_s1, m_s = e[0], e[1]
                c = -scale_t * phi_1 * m_s - (0.5 / r1) * scale_t * phi_1 * (m_s1 - m_s)
                rows.append((s1, self._ratio(s, t), c, 1.0))
                continue
            r2 = (inner[2] - inner[0]) / h
            s2 = ns.inverse_lambda(lam_s + r2 * h)
            phi_12 = self._phi1(r2 * h)
            phi_22 = phi_12 / (r2 * h) + sign
            phi_2 = phi_1 / h + sign
            m_s1, m_s = e[0], e[1]
            c = (-self._scale(s2) * phi_12 * m_s
                 + sign * (r2 / r1) * self._scale(s2) * phi_22 * (m_s1 - m_s))
            rows.append((s1, self._ratio(s, s2), c, 0.0))
            # Iteration at s2 (history: m_s2, m_s1, m_s) → x_t.
            m_s2, m_s = e[0], e[2]
            c = -scale_t * phi_1 * m_s + sign * (1.0 / r2) * scale_t * phi_2 * (m_s2 - m_s)
            rows.append((s2, self._ratio(s, t), c, 1.0))
        return rows

    def _make_tables(self):
        ns = self.schedule
        rows, self._orders = (self._multistep_rows() if self.method == "multistep"
                              else self._singlestep_rows())
        times = np.array([r[0] for r in rows])
        coeffs = np.stack([r[2] for r in rows])
        alpha, sigma = ns.marginal_alpha(times), ns.marginal_std(times)
        labels = ns.label(times)
        if self.sharing is not None and self.sharing_labels:
            labels = self.sharing.piece_label(labels)
        tables = {
            "label": labels,
            "anchor": np.array([r[1] for r in rows]),
            "end": np.array([r[3] for r in rows]),
            "x0_from_x": 1.0 / alpha,  # x̂0 = x/α − (σ/α) ε̂ (used by dpmsolver++)
            "x0_from_eps": -sigma / alpha,
            "alpha": alpha,  # α, σ of the true time: conversions of v / x0 predictions
            "sigma": sigma,
        }
        for k in range(self.order):
            tables[f"c{k}"] = coeffs[:, k]
        if np.any(np.abs(coeffs[:, self.order:]) > 0):
            raise AssertionError("a model output older than the solver order has a weight")
        return tables

    @property
    def orders(self):
        """The order of each update (outer step), as the reference schedules them (with
        ``sharing``: restarted on every piece)."""
        return list(self._orders)

    # ----- the loop body ----------------------------------------------------------------------
    def _init_carry(self, noise):
        zeros = ops.zeros_like(noise)
        return (noise, noise) + (zeros,) * self.order

    def _threshold(self, x0):
        batch = ops.shape(x0)[0]
        flat = ops.reshape(ops.abs(x0), (batch, -1))
        s = ops.quantile(flat, self.dynamic_thresholding_ratio, axis=1)
        s = ops.maximum(s, self.thresholding_max_val)
        s = ops.reshape(s, (-1,) + (1,) * (len(x0.shape) - 1))
        return ops.clip(x0, -s, s) / s

    def _step(self, denoise_fn, carry, row, step_noise, prediction_type="epsilon"):
        x, anchor, history = carry[0], carry[1], carry[2:]
        prediction = ops.cast(denoise_fn(x, broadcast_label(row["label"], x)), x.dtype)
        if prediction_type == "epsilon":
            # The ε path as it always was (bit-identical): x̂0 from the precomputed ratios.
            eps = prediction
            model_out = (row["x0_from_x"] * x + row["x0_from_eps"] * eps) if self._plus else eps
        else:
            eps, x0 = to_eps_and_x0(prediction, prediction_type, x, row["alpha"], row["sigma"])
            model_out = x0 if self._plus else eps
        if self._plus and self.thresholding:
            model_out = self._threshold(model_out)
        history = (model_out,) + tuple(history[:-1])
        x_next = row["anchor"] * anchor
        for k, value in enumerate(history):
            x_next = x_next + row[f"c{k}"] * value
        anchor = ops.where(row["end"] > 0.5, x_next, anchor)
        return (x_next, anchor) + history

    def get_config(self):
        return {"num_steps": self.num_steps, "order": self.order, "method": self.method,
                "algorithm": self.algorithm, "skip_type": self.skip_type,
                "lower_order_final": self.lower_order_final, "thresholding": self.thresholding,
                "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
                "thresholding_max_val": self.thresholding_max_val,
                "schedule": self.schedule.get_config(), **self._sharing_options()}
