"""Every sampler on the continuous schedules against the closed-form Gaussian answer.

    python benchmarks/continuous_closed_form.py --output_dir=benchmarks/results/continuous

Data N(μ = 0.3, s = 0.5) per coordinate, 1,024 starting values x_T ~ N(0, 1) (seed 0), the exact
ε*(x, t) of that data on each ``ContinuousVPSchedule`` (linear VP-SDE β 0.1 → 20, quadratic,
cosine; eps = 1e-3). Deterministic samplers run their own coefficient tables in float64, so the
numbers are the method's discretisation error: error = max |x − exact| against the exact
probability-flow map from T to the sampler's end (t = 0 for DDIM, which returns x̂0; eps for
DPM-Solver). Slope = −d log(error)/d log(NFE) fitted over the three largest NFE (for
singlestep order 3 over NFE ≡ 2 mod 3, where the reference's order schedule ends with an
order-2 step). The reverse-SDE samplers are linear for this ε*, so the law of their output is
Gaussian with a mean and variance propagated exactly through their tables; their error is
|mean − α μ| + |var − (α² s² + σ²)| at eps (weak error). Writes ``closed_form.md`` / ``.json``.
No timing: float64 only, no machine dependence.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from sampler_reference import (execute_ddim_float64, execute_tables_float64,  # noqa: E402
                               gaussian_flow)

from keras_etsdm.samplers import (DDIMSampler, DPMSolverSampler,  # noqa: E402
                                  ReverseSDESampler)
from keras_etsdm.schedules import ContinuousVPSchedule  # noqa: E402

flags.DEFINE_string("output_dir", "benchmarks/results/continuous", "Where to write results.")
FLAGS = flags.FLAGS

MU, S = 0.3, 0.5
SHOWN = (10, 20, 50)
FIT = (96, 192, 384)
FIT_3S = (98, 194, 386)
SOLVERS = [  # (label, class, options)
    ("DDIM (trailing)", DDIMSampler, {"spacing": "trailing"}),
    ("DPM-Solver++ 2M (logSNR)", DPMSolverSampler, {"order": 2, "skip_type": "logSNR"}),
    ("DPM-Solver++ 3M (logSNR)", DPMSolverSampler, {"order": 3, "skip_type": "logSNR"}),
    ("DPM-Solver++ 2M (time_uniform)", DPMSolverSampler, {"order": 2}),
    ("DPM-Solver 2M (time_uniform)", DPMSolverSampler, {"order": 2, "algorithm": "dpmsolver"}),
    ("DPM-Solver 3S (logSNR)", DPMSolverSampler, {"order": 3, "method": "singlestep",
                                                  "skip_type": "logSNR",
                                                  "algorithm": "dpmsolver"}),
]
SDE_STEPS = (100, 200, 500, 1000)


def eps_star(schedule):
    def eps(x, t):
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        return sig * (x - a * MU) / (a * a * S * S + sig * sig)
    return eps


def ode_error(schedule, cls, options, nfe, x_T):
    sampler = cls(num_steps=nfe, schedule=schedule, **options)
    a_T, s_T = schedule.marginal_alpha(schedule.T), schedule.marginal_std(schedule.T)
    if cls is DDIMSampler:
        out = execute_ddim_float64(sampler, eps_star(schedule), x_T)
        exact = gaussian_flow(x_T, MU, S, a_T, s_T, 1.0, 0.0)
    else:
        out = execute_tables_float64(sampler, eps_star(schedule), x_T)
        t = schedule.eps
        exact = gaussian_flow(x_T, MU, S, a_T, s_T, schedule.marginal_alpha(t),
                              schedule.marginal_std(t))
    return float(np.max(np.abs(out - exact)))


def sde_error(schedule, predictor, steps):
    sampler = ReverseSDESampler(steps, predictor, schedule=schedule)
    tables, mean, var = sampler.tables, 0.0, 1.0
    for i in range(sampler.num_iterations):
        t = float(tables["label"][i])
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        k = sig / (a * a * S * S + sig * sig)
        gain = tables["coef_x"][i] + tables["coef_eps"][i] * k
        mean = gain * mean - tables["coef_eps"][i] * k * a * MU
        var = gain * gain * var + tables["noise_std"][i] ** 2
    a, sig = schedule.marginal_alpha(schedule.eps), schedule.marginal_std(schedule.eps)
    return float(abs(mean - a * MU) + abs(var - (a * a * S * S + sig * sig)))


def slope(nfes, errors):
    return float(-np.polyfit(np.log(nfes), np.log(errors), 1)[0])


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    x_T = np.random.default_rng(0).standard_normal(1024)
    results = {"data": {"mu": MU, "s": S, "num_values": 1024, "seed": 0}, "ode": [], "sde": []}
    lines = ["# Samplers on continuous schedules vs the closed form",
             "",
             "`python benchmarks/continuous_closed_form.py` (float64 execution of each sampler's "
             "tables; data N(0.3, 0.5²), 1,024 values of x_T, seed 0; see the script's docstring). "
             "Error = max |x − exact PF-ODE map|; slope over the three largest NFE.",
             "",
             "| schedule | sampler | NFE 10 | NFE 20 | NFE 50 | slope (NFE) |",
             "|---|---|---:|---:|---:|---:|"]
    for kind in ("linear", "quadratic", "cosine"):
        schedule = ContinuousVPSchedule(kind)
        for label, cls, options in SOLVERS:
            fit = FIT_3S if options.get("method") == "singlestep" else FIT
            errors = {n: ode_error(schedule, cls, options, n, x_T) for n in SHOWN + fit}
            order = slope(fit, [errors[n] for n in fit])
            results["ode"].append({"schedule": kind, "sampler": label, "errors": errors,
                                   "slope": order, "fit_nfe": list(fit)})
            lines.append(f"| {kind} | {label} | " + " | ".join(f"{errors[n]:.2e}" for n in SHOWN)
                         + f" | {order:.2f} ({fit[0]}–{fit[-1]}) |")
    lines += ["", "Reverse-SDE samplers: weak error |mean − αμ| + |var − (α²s² + σ²)| of the "
              "exact output law at eps.", "",
              "| schedule | predictor | " + " | ".join(f"{n} steps" for n in SDE_STEPS)
              + " | slope |", "|---|---|" + "---:|" * (len(SDE_STEPS) + 1)]
    for kind in ("linear", "quadratic", "cosine"):
        schedule = ContinuousVPSchedule(kind)
        for predictor in ("euler_maruyama", "reverse_diffusion"):
            errors = [sde_error(schedule, predictor, n) for n in SDE_STEPS]
            order = slope(SDE_STEPS[1:], errors[1:])
            results["sde"].append({"schedule": kind, "predictor": predictor,
                                   "steps": list(SDE_STEPS), "errors": errors, "slope": order})
            lines.append(f"| {kind} | {predictor} | " + " | ".join(f"{e:.2e}" for e in errors)
                         + f" | {order:.2f} |")
    with open(os.path.join(FLAGS.output_dir, "closed_form.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(FLAGS.output_dir, "closed_form.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
