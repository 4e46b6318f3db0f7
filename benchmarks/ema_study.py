#!/usr/bin/env python
"""Which weight average samples best: the EMA lever of the recipe study (issue 18).

    KERAS_BACKEND=tensorflow python benchmarks/recipe_study.py \
        --recipes=default_ematracks,default_ddpm_ematracks --root=runs/recipe_study \
        --output_dir=/tmp/ema_curves
    KERAS_BACKEND=tensorflow python benchmarks/ema_study.py --root=runs/recipe_study \
        --output_dir=benchmarks/results/ema_study

The first command trains the embedded default (gin/default.gin) and its DDPM arm (seed 2),
each keeping the extra EMA tracks ``recipe_study.EMA_TRACKS`` beside the model's own EMA
(decay 0.999 with warm-up) through the library's ``train.ema_tracks``; every track is written
with every checkpoint (every 500 steps). The committed table scores the E-TSDM run (the
default ``--runs``; add ``default_ddpm_ematracks-seed2`` for the DDPM arm's run, which kept
the same tracks). This script scores each track at ``--steps`` exactly as the
run's own in-loop evaluation scores its EMA (``evaluate.sample_quality_fn``: FD / KID of 2,000
DDIM-20 samples, noise seed 0, against the MNIST test set with the judge
``classifier_mnist32_heldout``), so each track and the own EMA are compared on the same weight
trajectory, the same noise and the same reference: a paired comparison per run. Each score is
cached in ``<workdir>/ema_study/`` (re-runs only add what is missing).

Output: ``ema_study.md`` / ``.json`` (per run FD and KID, the paired difference to the own
EMA per run, and whether its sign holds in every run).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.recipe_study import EMA_TRACKS

flags.DEFINE_string("root", "runs/recipe_study", "Parent of the runs' work directories.")
flags.DEFINE_list("runs", ["default_ematracks-seed2"],
                  "Work directories (under --root) that kept the tracks.")
flags.DEFINE_list("steps", ["2000", "5000"], "Steps to score.")
flags.DEFINE_list("tracks", list(EMA_TRACKS), "Tracks to score.")
flags.DEFINE_string("output_dir", None, "Where the tables go.", required=True)
FLAGS = flags.FLAGS

OWN = "own EMA (decay:0.999)"


def own_evaluations(workdir):
    """``{step: record}`` of the run's in-loop evaluations (its own EMA)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "eval/fd" in r}


def score_track(workdir, track, step, state):
    """FD / KID of one track at one step, cached in ``<workdir>/ema_study``."""
    from keras_etsdm import ema, training
    from keras_etsdm.checkpoint import load_model
    from keras_etsdm.evaluation import evaluate

    cache = os.path.join(workdir, "ema_study", f"{track.replace(':', '')}-{step}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    if "model" not in state:
        state["model"] = load_model(workdir=workdir)
        own = next(iter(own_evaluations(workdir).values()))
        state["eval_fn"] = evaluate.sample_quality_fn(
            own["eval_reference"], training.default_grid_sampler(state["model"].schedule),
            own["eval_num_samples"], own["eval_seed"])
    ema.load_ema_track(state["model"], workdir, track, step)
    result = state["eval_fn"](state["model"], step)
    record = {"track": track, "step": step, **result["metrics"], **result["info"]}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{os.path.basename(workdir)} {track} step {step}: FD {record['fd']:.3f}", flush=True)
    return record


def main(argv):
    del argv
    from benchmarks.harness import machine_description

    steps = [int(s) for s in FLAGS.steps]
    runs = list(FLAGS.runs)
    table = {}  # (track, step) -> {run: record}
    for run in runs:
        workdir = os.path.join(FLAGS.root, run)
        own = own_evaluations(workdir)
        state = {}
        for step in steps:
            if step not in own:
                raise ValueError(f"{workdir} has no own-EMA evaluation at step {step} "
                                 f"(it has {sorted(own)}); train it first.")
            o = own[step]
            table.setdefault((OWN, step), {})[run] = {
                "fd": o["eval/fd"], "kid": o["eval/kid"], "eval_num_samples": o["eval_num_samples"]}
            for track in FLAGS.tracks:
                record = score_track(workdir, track, step, state)
                if (record["eval_num_samples"], record["eval_nfe"], record["eval_seed"]) != \
                        (o["eval_num_samples"], o["eval_nfe"], o["eval_seed"]):
                    raise ValueError(f"{workdir}: track scored with another N / sampler / seed "
                                     f"than the run's own evaluation: {record} vs {o}.")
                table.setdefault((track, step), {})[run] = record

    from keras_etsdm.backend import default_sample_jit_compile

    n = table[(OWN, steps[0])][runs[0]]["eval_num_samples"]
    # The runs' in-loop evaluations sampled with XLA-compiled loops on TensorFlow (the default
    # until sampling moved off XLA on AVX-512): score the tracks the same way for a paired
    # comparison (KERAS_ETSDM_SAMPLE_JIT_COMPILE=1); the mode is recorded here.
    mode = "with" if default_sample_jit_compile() else "without"
    lines = [f"Machine: {machine_description()}; this process's sampling loops {mode} XLA.", "",
             (f"Runs: {', '.join(f'`{r}`' for r in runs)} (bin/train work directories that kept "
             f"`train.ema_tracks`). Every value: FD of N = {n} DDIM-20 samples "
             f"(noise seed 0) against the MNIST test set (judge classifier_mnist32_heldout). "
             f"Δ = track − own EMA of the same run (same weight trajectory, same noise); "
             f"'sign holds' = the same sign in every run (trivially so for one run)."), ""]
    lines += ["| track | step | " + " | ".join(f"FD {r}" for r in runs) + " | "
              + " | ".join(f"Δ {r}" for r in runs) + " | mean Δ | sign holds |",
              "|---|---:|" + "---:|" * (2 * len(runs) + 1) + "---|"]
    rows = []
    for track in [OWN] + list(FLAGS.tracks):
        for step in steps:
            values = [table[(track, step)][r]["fd"] for r in runs]
            deltas = [v - table[(OWN, step)][r]["fd"] for v, r in zip(values, runs)]
            holds = all(d < 0 for d in deltas) or all(d > 0 for d in deltas)
            rows.append({"track": track, "step": step, "fd": dict(zip(runs, values)),
                         "kid": {r: table[(track, step)][r]["kid"] for r in runs},
                         "delta_fd": dict(zip(runs, deltas)), "sign_holds": holds})
            shown = " | ".join(f"{v:.2f}" for v in values)
            if track == OWN:
                lines.append(f"| {track} | {step} | {shown} |" + " – |" * (len(runs) + 2))
            else:
                lines.append(f"| {track} | {step} | {shown} | "
                             + " | ".join(f"{d:+.2f}" for d in deltas)
                             + f" | {sum(deltas) / len(deltas):+.2f} | {'yes' if holds else 'no'} |")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "ema_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(FLAGS.output_dir, "ema_study.json"), "w") as f:
        json.dump({"machine": machine_description(), "runs": runs, "num_samples": n,
                   "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
