"""Sharing-aware vs plain sampler grids on a trained E-TSDM model, scored on held-out digits.

    python benchmarks/sharing_aware_trained.py --workdir=runs/baseline_heldout \
        --output_dir=benchmarks/results/sharing_aware --num_samples=2000 --seeds=0

For each setting, the plain grid and the sharing-aware grid (``sharing_aware=true``: knots on
the model's piece boundaries, see ``samplers.base.sharing_aware_labels``) sample N images from
the SAME noise (per noise seed), with the EMA weights. For DDIM also "knots only": the aware
grid's labels as explicit ``timesteps``, the network called at the true labels (no piece
relabelling), which separates the effect of the grid from that of the relabelling. FD and KID against the MNIST test set
with the held-out judge (``reference mnist32_test``, extractor ``classifier_mnist32_heldout``;
neither the model nor the judge trained on those images). Reports per seed and the paired
difference aware − plain per seed. Writes ``trained.json`` and ``trained.md``.
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.harness import machine_description  # noqa: E402
from keras_etsdm.checkpoint import load_model  # noqa: E402
from keras_etsdm.evaluation.evaluate import sample_quality_fn  # noqa: E402
from keras_etsdm.samplers import build_sampler  # noqa: E402

flags.DEFINE_string("workdir", None, "bin/train work directory of an E-TSDM model.",
                    required=True)
flags.DEFINE_string("output_dir", "benchmarks/results/sharing_aware", "Where to write results.")
flags.DEFINE_integer("num_samples", 2000, "N per setting and seed.")
flags.DEFINE_list("seeds", ["0"], "Noise seeds (the same noise for every grid).")
flags.DEFINE_string("reference", "mnist32_test", "Shipped held-out reference statistics.")
FLAGS = flags.FLAGS

SETTINGS = [  # (name, sampler, NFE, options)
    ("DDIM-10", "ddim", 10, {}),
    ("DDIM-20", "ddim", 20, {}),
    ("DDIM-50", "ddim", 50, {}),
    ("DPM-Solver++ 2M-10 logSNR", "dpm_solver", 10, {"order": 2, "skip_type": "logSNR"}),
    ("DPM-Solver++ 2M-20 logSNR", "dpm_solver", 20, {"order": 2, "skip_type": "logSNR"}),
    ("DPM-Solver++ 2M-20 time_uniform", "dpm_solver", 20, {"order": 2}),
    ("DPM-Solver++ 3M-20 logSNR", "dpm_solver", 20, {"order": 3, "skip_type": "logSNR"}),
    ("DPM-Solver 3S-20 logSNR", "dpm_solver", 20,
     {"order": 3, "method": "singlestep", "algorithm": "dpmsolver", "skip_type": "logSNR"}),
]


def main(_):
    model = load_model(workdir=FLAGS.workdir)
    if not model.sharing.enabled:
        raise SystemExit(f"{FLAGS.workdir} holds a model without E-TSDM sharing: a "
                         f"sharing-aware grid needs one.")
    seeds = [int(s) for s in FLAGS.seeds]
    rows, started = [], time.time()
    for name, sampler_name, nfe, options in SETTINGS:
        row = {"setting": name, "nfe": nfe, "per_seed": {}}
        for seed in seeds:
            scores = {}
            grids = [("plain", build_sampler(sampler_name, model.schedule, nfe, options)),
                     ("aware", build_sampler(sampler_name, model.schedule, nfe,
                                             {**options, "sharing_aware": True}, model.sharing))]
            if sampler_name == "ddim":
                knots = [int(v) for v in grids[1][1].step_labels()]
                grids.append(("knots_only", build_sampler(
                    "ddim", model.schedule, None, {**options, "timesteps": knots})))
            for grid, sampler in grids:
                evaluate = sample_quality_fn(FLAGS.reference, sampler, FLAGS.num_samples, seed)
                scores[grid] = evaluate(model, None)["metrics"]
            scores["diff_fd"] = scores["aware"]["fd"] - scores["plain"]["fd"]
            scores["diff_kid"] = scores["aware"]["kid"] - scores["plain"]["kid"]
            row["per_seed"][seed] = scores
            knots_fd = scores.get("knots_only", {}).get("fd")
            print(f"{name:34s} seed {seed}: FD plain {scores['plain']['fd']:.3f} aware "
                  f"{scores['aware']['fd']:.3f} (diff {scores['diff_fd']:+.3f})"
                  + (f" knots-only {knots_fd:.3f}" if knots_fd is not None else "")
                  + f"; KID plain {scores['plain']['kid']:.4f} aware "
                  f"{scores['aware']['kid']:.4f}", flush=True)
        diffs = [row["per_seed"][s]["diff_fd"] for s in seeds]
        row["fd_sign_holds"] = all(d < 0 for d in diffs) or all(d > 0 for d in diffs)
        rows.append(row)
    meta = {"workdir": FLAGS.workdir, "checkpoint_step": getattr(model, "checkpoint_step", None),
            "num_samples": FLAGS.num_samples, "seeds": seeds, "weights": "ema",
            "reference": FLAGS.reference, "sharing": model.sharing.get_config(),
            "machine": machine_description(), "minutes": (time.time() - started) / 60,
            "command": " ".join(["python", "benchmarks/sharing_aware_trained.py"] + sys.argv[1:])}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "trained.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    lines = [f"Held-out FD / KID (MNIST test set, judge classifier_mnist32_heldout), N = "
             f"{FLAGS.num_samples} per setting and seed, EMA weights of `{FLAGS.workdir}` "
             f"(step {meta['checkpoint_step']}), same noise for both grids. Machine: "
             f"{meta['machine']}. Command: `{meta['command']}`.", "",
             "| setting | seed | FD plain | FD aware | FD aware − plain | FD knots only | KID plain |"
             " KID aware | KID aware − plain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for seed, s in row["per_seed"].items():
            lines.append(f"| {row['setting']} | {seed} | {s['plain']['fd']:.3f} | "
                         f"{s['aware']['fd']:.3f} | {s['diff_fd']:+.3f} | "
                         + (f"{s['knots_only']['fd']:.3f}" if "knots_only" in s else "–")
                         + " | "
                         f"{s['plain']['kid']:.4f} | {s['aware']['kid']:.4f} | "
                         f"{s['diff_kid']:+.4f} |")
    with open(os.path.join(FLAGS.output_dir, "trained.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
