"""Sharing-aware vs plain sampler grids on the closed-form time-shared Gaussian denoiser.

    python benchmarks/sharing_aware_closed_form.py --output_dir=benchmarks/results/sharing_aware

Data N(μ = 0.3, s = 0.5) per coordinate, 1,024 values from x_T ~ N(0, 1) (seed 0); the
denoiser is the exact ε* with E-TSDM's map applied to its label (t̃ = 100, n = 5, linear β,
T = 1000), so the ODE every sampler integrates jumps at labels 20, 40, 60, 80, 100. The target
is that ODE's exact solution, piece by piece in closed form (``tests/sampler_reference.py``:
``shared_gaussian_flow``). Every sampler runs its own coefficient tables in float64, so the
numbers are the method's discretisation error, not float32 round-off. Error = max |x − exact|.
Slope = −d log(error) / d log(NFE) fitted over 192–768 NFE. Writes ``closed_form.md`` and
``closed_form.json``. Deterministic: no timing, no machine dependence beyond float64.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from sampler_reference import (execute_ddim_float64, execute_tables_float64,  # noqa: E402
                               gaussian_eps_shared, shared_gaussian_flow)

from keras_etsdm.samplers import DDIMSampler, DPMSolverSampler  # noqa: E402
from keras_etsdm.schedules import DiscreteVPSchedule  # noqa: E402
from keras_etsdm.time_sharing import TimestepSharing  # noqa: E402

flags.DEFINE_string("output_dir", "benchmarks/results/sharing_aware", "Where to write results.")
FLAGS = flags.FLAGS

MU, S = 0.3, 0.5
NFES = (10, 20, 50, 96, 192, 384, 768)
SOLVERS = [  # (label, sampler class, options)
    ("DDIM", DDIMSampler, {}),
    ("DPM-Solver++ 1 (logSNR)", DPMSolverSampler, {"order": 1, "skip_type": "logSNR"}),
    ("DPM-Solver++ 2M (logSNR)", DPMSolverSampler, {"order": 2, "skip_type": "logSNR"}),
    ("DPM-Solver++ 3M (logSNR)", DPMSolverSampler, {"order": 3, "skip_type": "logSNR"}),
    ("DPM-Solver++ 2M (time_uniform)", DPMSolverSampler, {"order": 2}),
    ("DPM-Solver++ 3M (time_uniform)", DPMSolverSampler, {"order": 3}),
    ("DPM-Solver 2S (logSNR)", DPMSolverSampler,
     {"order": 2, "method": "singlestep", "algorithm": "dpmsolver", "skip_type": "logSNR"}),
    ("DPM-Solver 3S (logSNR)", DPMSolverSampler,
     {"order": 3, "method": "singlestep", "algorithm": "dpmsolver", "skip_type": "logSNR"}),
    ("DPM-Solver 3S (time_uniform)", DPMSolverSampler,
     {"order": 3, "method": "singlestep", "algorithm": "dpmsolver"}),
]


def slope(steps, errors):
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def main(_):
    schedule, sharing = DiscreteVPSchedule(), TimestepSharing(100, 5)
    x_T = np.random.default_rng(0).standard_normal((4, 256))
    eps = gaussian_eps_shared(schedule, MU, S, sharing)
    exact = {False: shared_gaussian_flow(x_T, MU, S, schedule, sharing),  # → label 0
             True: shared_gaussian_flow(x_T, MU, S, schedule, sharing, clean_end=True)}
    results = []
    for name, cls, options in SOLVERS:
        for aware in (False, True):
            errors = []
            for nfe in NFES:
                sampler = cls(num_steps=nfe, sharing=sharing if aware else None, **options)
                if cls is DDIMSampler:
                    out, target = execute_ddim_float64(sampler, eps, x_T), exact[True]
                else:
                    out, target = execute_tables_float64(sampler, eps, x_T), exact[False]
                errors.append(float(np.max(np.abs(out - target))))
            results.append({"solver": name, "grid": "sharing-aware" if aware else "plain",
                            "nfe": list(NFES), "max_abs_error": errors,
                            "slope_192_768": slope(NFES[-3:], errors[-3:]),
                            "monotone": all(b < a for a, b in zip(errors, errors[1:]))})
            print(f"{name:32s} {results[-1]['grid']:13s} "
                  + " ".join(f"{e:8.1e}" for e in errors)
                  + f"  slope {results[-1]['slope_192_768']:.2f}")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    meta = {"data": f"N({MU}, {S}^2), 1024 values, x_T seed 0",
            "schedule": schedule.get_config(), "sharing": sharing.get_config(),
            "arithmetic": "float64 execution of each sampler's coefficient tables",
            "target": "exact piecewise PF-ODE solution of the time-shared closed-form denoiser",
            "command": "python benchmarks/sharing_aware_closed_form.py"}
    with open(os.path.join(FLAGS.output_dir, "closed_form.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["| solver | grid | " + " | ".join(f"{n} NFE" for n in NFES)
             + f" | slope ({NFES[-3]}–{NFES[-1]}) | monotone |",
             "|---|---|" + "---:|" * (len(NFES) + 1) + "---|"]
    for r in results:
        lines.append(f"| {r['solver']} | {r['grid']} | "
                     + " | ".join(f"{e:.1e}" for e in r["max_abs_error"])
                     + f" | {r['slope_192_768']:.2f} | {'yes' if r['monotone'] else 'no'} |")
    with open(os.path.join(FLAGS.output_dir, "closed_form.md"), "w") as f:
        f.write("Max |x − exact| against the exact piecewise PF-ODE solution of the time-shared "
                "closed-form denoiser (t̃ = 100, n = 5, linear β, T = 1000; data N(0.3, 0.5²); "
                "float64 tables). Regenerate: `python benchmarks/sharing_aware_closed_form.py`."
                "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
