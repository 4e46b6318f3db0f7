"""The probability-flow ODE sampler and the PF-ODE likelihood on closed-form Gaussian data.

    KERAS_BACKEND=jax python benchmarks/pf_ode_closed_form.py \
        --output_dir=benchmarks/results/pf_ode

Sampler: data N(μ = 0.3, s = 0.5) per coordinate, 1,024 values from x_1 ~ N(0, 1) (seed 0),
the exact ε* in keras.ops float32 (``tests/test_pf_ode.py``), integrated from t = 1 to the
schedule's eps with RK45 at rtol = atol = tol; error = max |x − exact| against the exact map
(``gaussian_flow`` with α, σ of the schedule), for both integration variables (log α, the
default, and t, score_sde's). Likelihood: data N(μ, Σ) in D = 8 with a non-diagonal Σ, 3
points, exact trace; error = max |Δ bits/dim| against the closed-form log-density under the
ODE with prior N(0, I). The same cases as the tests, on the current backend (float32 ε̂
rounds differently on JAX and TensorFlow, so the adaptive NFE can differ by a few). Writes
``closed_form_<backend>.md`` and ``.json``.
"""

import json
import os
import sys

import keras
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_pf_ode as cases  # noqa: E402

from keras_etsdm.evaluation import likelihood  # noqa: E402
from keras_etsdm.samplers import ProbabilityFlowSampler  # noqa: E402

flags.DEFINE_string("output_dir", "benchmarks/results/pf_ode", "Where to write results.")
FLAGS = flags.FLAGS

TOLS = (1e-3, 1e-4, 1e-5, 1e-6)


def main(argv):
    del argv
    backend = keras.backend.backend()
    schedules = {"DiscreteVPSchedule (linear β, T = 1000)": (cases.SCHED,
                                                             cases.keras_gaussian_eps()),
                 "LinearVPSDE (β 0.1 → 20, eps 1e-3)": (cases.SDE, cases.sde_gaussian_eps())}
    rows = []
    for name, (schedule, eps_fn) in schedules.items():
        for variable in ("log_alpha", "t"):
            for tol in TOLS:
                sampler = ProbabilityFlowSampler(rtol=tol, atol=tol, schedule=schedule,
                                                 time_variable=variable)
                err = cases.max_err(sampler, eps_fn, schedule)
                rows.append({"kind": "sampler", "schedule": name, "time_variable": variable,
                             "tol": tol, "nfe": sampler.last_nfe, "error": err})
                print(rows[-1])
        x = cases.data_points(schedule)
        expected = cases.exact_logp(schedule, x)[0]
        for tol in TOLS:
            result = likelihood.log_likelihood(cases.correlated_eps(schedule), x, schedule,
                                               trace="exact", rtol=tol, atol=tol)
            err = float(np.max(np.abs(cases.bits(result.logp) - cases.bits(expected))))
            rows.append({"kind": "likelihood", "schedule": name, "time_variable": "log_alpha",
                         "tol": tol, "nfe": result.nfe, "error": err})
            print(rows[-1])
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    base = os.path.join(FLAGS.output_dir, f"closed_form_{backend}")
    with open(base + ".json", "w") as f:
        json.dump({"backend": backend, "rows": rows}, f, indent=1)
    lines = [f"# PF-ODE on closed-form Gaussian data ({backend}, RK45, rtol = atol = tol)", "",
             "| what | schedule | variable | tol | NFE | error | error / tol |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        what = "sample: max abs" if r["kind"] == "sampler" else "log p: max bits/dim"
        lines.append(f"| {what} | {r['schedule']} | {r['time_variable']} | {r['tol']:g} | "
                     f"{r['nfe']} | {r['error']:.2e} | {r['error'] / r['tol']:.1f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
