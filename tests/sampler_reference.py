"""Float64 numpy re-statement of the DPM-Solver update rules in the reference's own form.

Written from the formulas of LuChengTHU/dpm-solver (``dpm_solver_pytorch.py``, solver_type
"dpmsolver"): differences D1, D2 and φ terms as the paper writes them, one function per update,
driven by the reference's step-order logic. The samplers compute the same maths as expanded
coefficient tables; tests compare the two, so an error in the expansion or in the loop state
machine shows up. Also the Gaussian closed form of etsdm.md §6.
"""

import numpy as np

from keras_etsdm.samplers import multistep_orders, singlestep_orders, time_grid


def gaussian_eps(schedule, mu, s):
    """ε*(x, label) for data N(μ, s²) on the continuous-time view of ``schedule`` (float64)."""

    def eps(x, label):
        t = np.asarray(label, np.float64) / schedule.num_timesteps + schedule.eps
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        return sig * (x - a * mu) / (a * a * s * s + sig * sig)

    return eps


def gaussian_flow(x_T, mu, s, alpha_T, sigma_T, alpha_end, sigma_end):
    """The exact probability-flow map from (α_T, σ_T) to (α_end, σ_end) for data N(μ, s²)."""
    ratio = np.sqrt(alpha_end**2 * s * s + sigma_end**2) / np.sqrt(alpha_T**2 * s * s + sigma_T**2)
    return alpha_end * mu + ratio * (np.asarray(x_T, np.float64) - alpha_T * mu)


class ReferenceDPMSolver:
    """DPM-Solver(++) in float64, reference form. ``eps_fn(x, label)`` numpy."""

    def __init__(self, schedule, eps_fn, algorithm="dpmsolver++"):
        self.ns, self.eps_fn, self.plus = schedule, eps_fn, algorithm == "dpmsolver++"

    def model(self, x, t):
        eps = self.eps_fn(x, self.ns.label(t))
        if not self.plus:
            return eps
        return (x - self.ns.marginal_std(t) * eps) / self.ns.marginal_alpha(t)

    def first(self, x, s, t, m_s):
        ns = self.ns
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        if self.plus:
            return ns.marginal_std(t) / ns.marginal_std(s) * x - ns.marginal_alpha(t) * np.expm1(-h) * m_s
        return (np.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(s)) * x
                - ns.marginal_std(t) * np.expm1(h) * m_s)

    def multi2(self, x, ms, ts, t):
        ns = self.ns
        m1, m0 = ms[-2], ms[-1]
        l1, l0, lt = ns.marginal_lambda(ts[-2]), ns.marginal_lambda(ts[-1]), ns.marginal_lambda(t)
        h = lt - l0
        d1_0 = (m0 - m1) / ((l0 - l1) / h)
        if self.plus:
            phi_1 = np.expm1(-h)
            a_t = ns.marginal_alpha(t)
            return (ns.marginal_std(t) / ns.marginal_std(ts[-1]) * x - a_t * phi_1 * m0
                    - 0.5 * a_t * phi_1 * d1_0)
        phi_1 = np.expm1(h)
        s_t = ns.marginal_std(t)
        return (np.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(ts[-1])) * x
                - s_t * phi_1 * m0 - 0.5 * s_t * phi_1 * d1_0)

    def multi3(self, x, ms, ts, t):
        ns = self.ns
        m2, m1, m0 = ms[-3], ms[-2], ms[-1]
        l2, l1, l0 = (ns.marginal_lambda(v) for v in ts[-3:])
        h = ns.marginal_lambda(t) - l0
        r0, r1 = (l0 - l1) / h, (l1 - l2) / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        if self.plus:
            phi_1 = np.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            a_t = ns.marginal_alpha(t)
            return (ns.marginal_std(t) / ns.marginal_std(ts[-1]) * x - a_t * phi_1 * m0
                    + a_t * phi_2 * d1 - a_t * phi_3 * d2)
        phi_1 = np.expm1(h)
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        s_t = ns.marginal_std(t)
        return (np.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(ts[-1])) * x
                - s_t * phi_1 * m0 - s_t * phi_2 * d1 - s_t * phi_3 * d2)

    def single2(self, x, s, t, r1):
        ns = self.ns
        ls = ns.marginal_lambda(s)
        h = ns.marginal_lambda(t) - ls
        s1 = ns.inverse_lambda(ls + r1 * h)
        m_s = self.model(x, s)
        if self.plus:
            x_s1 = ns.marginal_std(s1) / ns.marginal_std(s) * x - ns.marginal_alpha(s1) * np.expm1(-r1 * h) * m_s
            m_s1 = self.model(x_s1, s1)
            a_t, phi_1 = ns.marginal_alpha(t), np.expm1(-h)
            return (ns.marginal_std(t) / ns.marginal_std(s) * x - a_t * phi_1 * m_s
                    - 0.5 / r1 * a_t * phi_1 * (m_s1 - m_s))
        la = ns.marginal_log_mean_coeff
        x_s1 = np.exp(la(s1) - la(s)) * x - ns.marginal_std(s1) * np.expm1(r1 * h) * m_s
        m_s1 = self.model(x_s1, s1)
        s_t, phi_1 = ns.marginal_std(t), np.expm1(h)
        return np.exp(la(t) - la(s)) * x - s_t * phi_1 * m_s - 0.5 / r1 * s_t * phi_1 * (m_s1 - m_s)

    def single3(self, x, s, t, r1, r2):
        ns = self.ns
        la = ns.marginal_log_mean_coeff
        ls = ns.marginal_lambda(s)
        h = ns.marginal_lambda(t) - ls
        s1, s2 = ns.inverse_lambda(ls + r1 * h), ns.inverse_lambda(ls + r2 * h)
        m_s = self.model(x, s)
        if self.plus:
            phi_11, phi_12, phi_1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
            phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            sd = ns.marginal_std
            x_s1 = sd(s1) / sd(s) * x - ns.marginal_alpha(s1) * phi_11 * m_s
            m_s1 = self.model(x_s1, s1)
            x_s2 = (sd(s2) / sd(s) * x - ns.marginal_alpha(s2) * phi_12 * m_s
                    + r2 / r1 * ns.marginal_alpha(s2) * phi_22 * (m_s1 - m_s))
            m_s2 = self.model(x_s2, s2)
            a_t = ns.marginal_alpha(t)
            return sd(t) / sd(s) * x - a_t * phi_1 * m_s + 1.0 / r2 * a_t * phi_2 * (m_s2 - m_s)
        phi_11, phi_12, phi_1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
        phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        sd = ns.marginal_std
        x_s1 = np.exp(la(s1) - la(s)) * x - sd(s1) * phi_11 * m_s
        m_s1 = self.model(x_s1, s1)
        x_s2 = (np.exp(la(s2) - la(s)) * x - sd(s2) * phi_12 * m_s
                - r2 / r1 * sd(s2) * phi_22 * (m_s1 - m_s))
        m_s2 = self.model(x_s2, s2)
        return np.exp(la(t) - la(s)) * x - sd(t) * phi_1 * m_s - 1.0 / r2 * sd(t) * phi_2 * (m_s2 - m_s)

    def sample(self, x, steps, order, method="multistep", skip_type="time_uniform",
               lower_order_final=True):
        ns = self.ns
        x = np.asarray(x, np.float64)
        if method == "multistep":
            ts = time_grid(ns, skip_type, ns.T, ns.eps, steps)
            orders = multistep_orders(steps, order, lower_order_final)
            t_prev, m_prev = [ts[0]], [self.model(x, ts[0])]
            for j, k in enumerate(orders):
                t = ts[j + 1]
                if k == 1:
                    x = self.first(x, t_prev[-1], t, m_prev[-1])
                elif k == 2:
                    x = self.multi2(x, m_prev, t_prev, t)
                else:
                    x = self.multi3(x, m_prev, t_prev, t)
                t_prev, m_prev = (t_prev + [t])[-3:], m_prev[-2:]
                if j + 1 < steps:
                    m_prev = m_prev + [self.model(x, t)]
                    m_prev = m_prev[-3:]
            return x
        orders = singlestep_orders(steps, order)
        if skip_type == "logSNR":
            outer = time_grid(ns, skip_type, ns.T, ns.eps, len(orders))
        else:
            outer = time_grid(ns, skip_type, ns.T, ns.eps, steps)[np.cumsum([0] + orders)]
        for k, s, t in zip(orders, outer[:-1], outer[1:]):
            lam = ns.marginal_lambda(time_grid(ns, skip_type, s, t, k))
            h = lam[-1] - lam[0]
            if k == 1:
                x = self.first(x, s, t, self.model(x, s))
            elif k == 2:
                x = self.single2(x, s, t, (lam[1] - lam[0]) / h)
            else:
                x = self.single3(x, s, t, (lam[1] - lam[0]) / h, (lam[2] - lam[0]) / h)
        return x


def gaussian_eps_shared(schedule, mu, s, sharing):
    """ε*(x, f(label)): the closed-form denoiser with E-TSDM's time condition (float64)."""
    eps = gaussian_eps(schedule, mu, s)

    def shared(x, label):
        label = np.asarray(label, np.float64)
        piece = np.clip(np.floor(label / sharing.delta + 1e-5), 0, sharing.n - 1) * sharing.delta
        return eps(x, np.where(label < sharing.t_tilde, piece, label))

    return shared


def _expm1_ratio(k, d):
    """(e^{k d} − 1) / k, → d as k → 0."""
    k = np.asarray(k, np.float64)
    small = np.abs(k) < 1e-12
    return np.where(small, d, np.expm1(k * d) / np.where(small, 1.0, k))


def frozen_condition_flow(x, mu, s, alpha_c, sigma_c, lambda_from, lambda_to):
    """Exact PF-ODE map over [λ_from, λ_to] for data N(μ, s²) when the denoiser's condition is
    frozen at the label with (α_c, σ_c): ε = a (x − b), a = σ_c / (α_c² s² + σ_c²), b = α_c μ.

    With y = x/α the ODE dy/dλ = −e^{−λ} ε is linear, y' + a σ(λ) y = a b e^{−λ}, and with
    w = asinh(e^{−λ}) (so dw/dλ = −σ) it integrates to
    y e^{−a w} |_from^to = −a b ∫ cosh(w) e^{−a w} dw. ``lambda_to = inf`` ends at α = 1.
    """
    a = sigma_c / (alpha_c**2 * s * s + sigma_c**2)
    b = alpha_c * mu
    w0 = np.arcsinh(np.exp(-lambda_from))
    w1 = 0.0 if np.isinf(lambda_to) else np.arcsinh(np.exp(-lambda_to))
    alpha0 = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lambda_from))
    alpha1 = 1.0 if np.isinf(lambda_to) else 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lambda_to))
    # ∫_{w0}^{w1} cosh(w) e^{−a w} dw = ½ [e^{(1−a)w}/(1−a) − e^{−(1+a)w}/(1+a)]_{w0}^{w1}
    integral = 0.5 * (np.exp((1 - a) * w0) * _expm1_ratio(1 - a, w1 - w0)
                      + np.exp(-(1 + a) * w0) * _expm1_ratio(-(1 + a), w1 - w0))
    y0 = np.asarray(x, np.float64) / alpha0
    y1 = (y0 * np.exp(-a * w0) - a * b * integral) * np.exp(a * w1)
    return alpha1 * y1


def shared_gaussian_flow(x_T, mu, s, schedule, sharing, clean_end=False):
    """The exact PF-ODE solution from label T−1 for data N(μ, s²) when the denoiser is the
    time-shared ε*(x, f(label)) of ``gaussian_eps_shared``: the plain flow down to t̃, then one
    frozen-condition flow per piece [c, c + Δ] at condition c. Ends at label 0 (DPM-Solver's
    t = 1/T) or, with ``clean_end``, at ᾱ = 1 (DDIM's last step, still in the first piece)."""
    T = schedule.num_timesteps
    top = int(round(sharing.t_tilde))
    x = gaussian_flow(x_T, mu, s, schedule.alphas[T - 1], schedule.sigmas[T - 1],
                      schedule.alphas[top], schedule.sigmas[top])
    for hi, c in zip(sharing.knots(), sharing.knots()[1:] + [0.0]):
        hi, c = int(round(hi)), int(round(c))
        lambda_to = np.inf if (c == 0 and clean_end) else schedule.lambdas[c]
        x = frozen_condition_flow(x, mu, s, schedule.alphas[c], schedule.sigmas[c],
                                  schedule.lambdas[hi], lambda_to)
    return x


def execute_tables_float64(sampler, eps_fn, x):
    """Run a DPMSolverSampler's coefficient tables with the loop's state machine in float64."""
    tables, x = sampler.tables, np.asarray(x, np.float64)
    anchor, history = x, [np.zeros_like(x)] * sampler.order
    for i in range(sampler.num_iterations):
        eps = eps_fn(x, tables["label"][i])
        model_out = (tables["x0_from_x"][i] * x + tables["x0_from_eps"][i] * eps
                     if sampler.algorithm == "dpmsolver++" else eps)
        history = [model_out] + history[:-1]
        x = tables["anchor"][i] * anchor + sum(tables[f"c{k}"][i] * history[k]
                                               for k in range(sampler.order))
        if tables["end"][i] > 0.5:
            anchor = x
    return x


def execute_ddim_float64(sampler, eps_fn, x):
    """A deterministic (η = 0) DDIMSampler's tables executed in float64."""
    t, x = sampler.tables, np.asarray(x, np.float64)
    for i in range(sampler.num_iterations):
        eps = eps_fn(x, t["label"][i])
        x0 = (x - t["sigma"][i] * eps) / t["alpha"][i]
        x = t["alpha_prev"][i] * x0 + t["direction"][i] * eps
    return x
