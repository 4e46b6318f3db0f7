#!/usr/bin/env python
"""Recipe study for the embedded default: held-out quality per CPU-minute (issue 18).

    KERAS_BACKEND=tensorflow python benchmarks/recipe_study.py \
        --recipes=default,lr1e-3,lr1e-3_minsnr5 --seeds=0,1 \
        --root=runs/recipe_study --output_dir=benchmarks/results/recipe_study

Every (recipe, seed) is one ``bin/train`` run of ``gin/default.gin`` with the recipe's gin
bindings and ``train.seed = train.data_seed = build_model.seed = seed`` (weights, data order and
training noise all follow the seed), evaluated in the loop every ``--eval_every`` steps exactly
as a user's run is (FD / KID of ``train.eval_num_samples`` DDIM-20 EMA samples against the MNIST
test set, judge ``classifier_mnist32_heldout``). Runs go one after another so that each has the
whole machine; a run whose work directory already reached its ``max_steps`` is read, not rerun,
and an interrupted one resumes from its checkpoint (bin/train's own resume), so the study can be
stopped and restarted. The curves (FD against minutes of training steps, compile included),
a per-seed summary at ``--budget_minutes`` and the plot go to ``--output_dir`` through
``heldout_curve.write_curves``.

A recipe only sets gin bindings of the library (``make_optimizer``, ``build_model``,
``build_network``, ``train``): what wins is then kept in ``gin/default.gin`` itself, never here.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.heldout_curve import read_curve, write_curves

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# name -> (gin bindings on top of gin/default.gin, max_steps). The baseline "r0_default"
# is the configuration this study started from (lr 2e-4, batch 64, plain MSE, EMA 0.999).
RECIPES = {
    "r0_default": ([], 5000),
    "lr1e-3": (["make_optimizer.learning_rate = 1e-3"], 5000),
    "lr1e-3_minsnr5": (["make_optimizer.learning_rate = 1e-3",
                        "build_model.min_snr_gamma = 5.0"], 5000),
    "lr1e-3_bs32": (["make_optimizer.learning_rate = 1e-3", "train.batch_size = 32"], 9000),
    "lr2e-3_minsnr5": (["make_optimizer.learning_rate = 2e-3",
                        "build_model.min_snr_gamma = 5.0"], 5000),
    "lr1e-3_minsnr5_ddpm": (["make_optimizer.learning_rate = 1e-3",
                             "build_model.min_snr_gamma = 5.0", "USE_ETSDM = False"], 5000),
}

flags.DEFINE_list("recipes", None, f"Recipes to run, of: {', '.join(RECIPES)}.", required=True)
flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (weights, data order, noise).")
flags.DEFINE_string("root", "runs/recipe_study", "Parent of the runs' work directories.")
flags.DEFINE_string("output_dir", None, "Where the curves go.", required=True)
flags.DEFINE_integer("eval_every", 1000, "Steps between held-out evaluations.")
flags.DEFINE_integer("max_steps", None, "Override every recipe's max_steps (smoke runs).")
flags.DEFINE_float("budget_minutes", 25.0, "Minutes of training for the summary table.")
flags.DEFINE_multi_string("extra_gin", [], "Extra gin bindings for every run (smoke runs).")
FLAGS = flags.FLAGS


def run_name(recipe, seed):
    return f"{recipe}-seed{seed}"


def finished_step(workdir):
    """The last step a work directory logged (0 when it has none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
    return max(steps, default=0)


def train_once(recipe, seed, workdir):
    bindings, max_steps = RECIPES[recipe]
    max_steps = FLAGS.max_steps or max_steps
    if finished_step(workdir) >= max_steps:
        print(f"{os.path.basename(workdir)}: already at step {max_steps}, read as is")
        return
    gin = bindings + [f"train.seed = {seed}", f"train.data_seed = {seed}",
                      f"build_model.seed = {seed}", f"train.max_steps = {max_steps}",
                      f"train.eval_every = {FLAGS.eval_every}"] + FLAGS.extra_gin
    command = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--workdir={workdir}"]
    command += [f"--gin_bindings={b}" for b in gin]
    start = time.time()
    with open(workdir.rstrip("/") + ".log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"{os.path.basename(workdir)}: {time.time() - start:.0f} s")


def main(argv):
    del argv
    unknown = [r for r in FLAGS.recipes if r not in RECIPES]
    if unknown:
        raise app.UsageError(f"Unknown recipes {unknown}; known: {', '.join(RECIPES)}.")
    os.makedirs(FLAGS.root, exist_ok=True)
    curves = {}
    for recipe in FLAGS.recipes:
        for seed in FLAGS.seeds:
            workdir = os.path.join(FLAGS.root, run_name(recipe, seed))
            train_once(recipe, int(seed), workdir)
            curves[run_name(recipe, seed)] = read_curve(workdir)
    description = {r: RECIPES[r][0] for r in FLAGS.recipes}
    write_curves(curves, FLAGS.output_dir, budget_minutes=FLAGS.budget_minutes,
                 recipes=description)


if __name__ == "__main__":
    app.run(main)
