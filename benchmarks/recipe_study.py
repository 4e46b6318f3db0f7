#!/usr/bin/env python
"""Recipe study for the embedded default: held-out quality per CPU-minute (issue 18).

    KERAS_BACKEND=tensorflow python benchmarks/recipe_study.py \
        --recipes=r0_2e-4_mse,lr1e-3_mse,lr1e-3_minsnr5,lr1e-3_minsnr5_bs32,default,default_ddpm \
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
``heldout_curve.write_curves``, with every run's ``metrics.jsonl`` (loss, step times,
evaluations) copied to ``<output_dir>/runs/<run>.jsonl``.

A recipe only sets gin bindings of the library (``make_optimizer``, ``build_model``,
``build_network``, ``train``): what wins is then kept in ``gin/default.gin`` itself, never here.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.heldout_curve import read_curve, write_curves

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

EMA_TRACKS = ("decay:0", "decay:0.998", "decay:0.9995", "sigma_rel:0.05", "sigma_rel:0.1")
# The second EMA study (today's default, two seeds) adds wider power EMAs: the first one's
# widest (σ_rel 0.1) tied the default, so it did not show where widening stops paying.
WIDE_EMA_TRACKS = EMA_TRACKS + ("sigma_rel:0.15", "sigma_rel:0.2")

# Every run of this study before the no-attention lever had the attention layer (on the folded
# 8x8 grid) that gin/default.gin then held; gin/default.gin dropped it when that lever won, so
# the study pins it under every recipe (a recipe's own bindings come after and override it).
STUDY_BASE = ["build_network.attention_resolutions = (8,)"]

# name -> (gin bindings on top of gin/default.gin and STUDY_BASE, max_steps, seeds). "default"
# is gin/default.gin as it was during the study (lr 2e-3, Min-SNR-5, attention), which
# "no_attention" replaced; "r0_2e-4_mse" is the default this study started from (lr 2e-4,
# plain MSE); the screens ran one seed for 2,000 steps (4,000 at batch 32: the same number of
# images); "default" (lr 2e-3, Min-SNR-5) seed 0 is the lr-2e-3 screen continued to 5,000 steps.
RECIPES = {
    "r0_2e-4_mse": (["make_optimizer.learning_rate = 2e-4", "build_model.min_snr_gamma = None"],
                    4500, [0]),
    "lr1e-3_mse": (["make_optimizer.learning_rate = 1e-3", "build_model.min_snr_gamma = None"],
                   2000, [0]),
    "lr1e-3_minsnr5": (["make_optimizer.learning_rate = 1e-3"], 2000, [0]),
    "lr1e-3_minsnr5_bs32": (["make_optimizer.learning_rate = 1e-3", "train.batch_size = 32"],
                            4000, [0]),
    "default": ([], 5000, [0, 1]),
    # The DDPM arm of the default (issue 18 item 4).
    "default_ddpm": (["USE_ETSDM = False"], 5000, [0, 1]),
    # Both arms with extra EMA tracks kept beside the model's own EMA (decay 0.999): the same
    # weight trajectory averaged five other ways, scored afterwards by benchmarks/ema_study.py
    # ("decay:0" is the raw weights). The tracks do not change training, so these are also the
    # arms' third seed (seed 2) for benchmarks/etsdm_vs_ddpm.py --testbed=mnist32.
    "default_ematracks": ([f"train.ema_tracks = {list(EMA_TRACKS)}"], 5000, [2]),
    "default_ddpm_ematracks": (["USE_ETSDM = False", f"train.ema_tracks = {list(EMA_TRACKS)}"],
                               5000, [2]),
    # Network shape (issue 18 item 2), against "default" (2x2-folded, base 32, mult (1, 2, 2),
    # one res block, attention on the folded 8x8 grid, 1.1 M parameters): a narrow U-Net at full
    # 32x32 resolution (0.38 M) and 1.5x the width (base 48, 2.5 M); 2,000 steps, compared with
    # the default seed by seed (--baseline=default) at equal steps and, with the quiet step
    # costs of benchmarks/bin_train_speed.py, at equal minutes (results/recipe_study/shape).
    "shape_narrow_full": (["build_network.fold = 1", "build_network.base_channels = 16",
                           "build_network.channel_mult = (1, 2, 2, 2)",
                           "build_network.attention_resolutions = (8,)"], 2000, [0, 1]),
    "shape_wide48": (["build_network.base_channels = 48"], 2000, [0, 1]),
    # The rest of item 2's levers, against "default" in the same way: depth (two res blocks per
    # level), no attention layer, and a five-times longer linear learning-rate warm-up (1,000
    # steps instead of 200; the default's lr 2e-3 is 10x the usual, where warm-up matters most).
    "depth2": (["build_network.num_res_blocks = 2"], 2000, [0, 1]),
    # No attention costs 0.89x a step and its FD was lower per minute at 2,000 steps on both
    # seeds (mixed at equal steps), so its two runs were continued to the default's 5,000 (a
    # resume is exact and the learning rate constant after warm-up, so this is the same run as
    # an uninterrupted one of 5,000 steps).
    "no_attention": (["build_network.attention_resolutions = ()"], 5000, [0, 1]),
    # Its DDPM arm (issue 18 item 4 at the recipe that won), same seeds.
    # Seeds 2 / 3 for issue 15's N = 5,000 comparison at today's default, whose E-TSDM runs of
    # those seeds are "no_attention_ematracks".
    "no_attention_ddpm": (["USE_ETSDM = False", "build_network.attention_resolutions = ()"],
                          5000, [0, 1, 2, 3]),
    "warmup1000": (["make_optimizer.warmup_steps = 1000"], 2000, [0, 1]),
    # Batch 32 at today's default (lr 2e-3): 4,000 steps see the images 2,000 of batch 64 see;
    # compared with "no_attention" at equal minutes (the screen at lr 1e-3 was better per image
    # but not clearly per minute). Lower on both seeds at equal minutes up to 4,000 steps, with
    # a margin that shrank from 2,000 to 4,000, so both runs were continued (resume exact) to
    # 8,000 steps, the minutes of ~4,600 default steps: lower on both seeds at every evaluation.
    # Seeds 2 / 3 (evaluated every 2,000 steps, as bin/train's default), against the default's
    # runs of those seeds (no_attention_ematracks): lower at 2,000 steps, from 4,000 on mixed or
    # higher, so over four seeds the sign held only early and batch 32 was not adopted.
    "no_attention_bs32": (["build_network.attention_resolutions = ()", "train.batch_size = 32"],
                          8000, [0, 1, 2, 3]),
    # Its DDPM arm, seeds 0 / 1 (run while batch 32 was the candidate for the default).
    "no_attention_bs32_ddpm": (["USE_ETSDM = False", "build_network.attention_resolutions = ()",
                                "train.batch_size = 32"], 8000, [0, 1]),
    # The EMA lever at today's default on two more seeds (2, 3): the tracks only read the
    # weights, so these are also E-TSDM runs of the default for seeds 2 and 3.
    "no_attention_ematracks": (["build_network.attention_resolutions = ()",
                                f"train.ema_tracks = {list(WIDE_EMA_TRACKS)}"], 5000, [2, 3]),
}

# The two arms of issue 18 item 4 per training seed (the tracked runs train exactly as the
# untracked ones: the tracks only read the weights).
ARM_RUNS = {"etsdm": {0: "default-seed0", 1: "default-seed1", 2: "default_ematracks-seed2"},
            "ddpm": {0: "default_ddpm-seed0", 1: "default_ddpm-seed1",
                     2: "default_ddpm_ematracks-seed2"}}
# The same pairs at the recipe that replaced it (gin/default.gin without attention).
# (E-TSDM seeds 2 / 3 are the EMA-tracks runs, which train exactly as untracked ones.)
NO_ATTENTION_ARM_RUNS = {"etsdm": {0: "no_attention-seed0", 1: "no_attention-seed1",
                                   2: "no_attention_ematracks-seed2",
                                   3: "no_attention_ematracks-seed3"},
                         "ddpm": {s: f"no_attention_ddpm-seed{s}" for s in range(4)}}
# And at batch 32 (8,000 steps), the candidate that was not adopted.
BS32_ARM_RUNS = {"etsdm": {0: "no_attention_bs32-seed0", 1: "no_attention_bs32-seed1"},
                 "ddpm": {0: "no_attention_bs32_ddpm-seed0", 1: "no_attention_bs32_ddpm-seed1"}}
# recipe label -> arm runs, for arms.md.
ARM_PAIRS = {"the study's default recipe (with attention)": ARM_RUNS,
             "today's default recipe (gin/default.gin: no attention)": NO_ATTENTION_ARM_RUNS,
             "today's default recipe at batch 32 (not adopted)": BS32_ARM_RUNS}


def define_flags():
    """Flags of the command line only, so that other scripts (ema_study) can import this one."""
    flags.DEFINE_list("recipes", None, f"Recipes to run, of: {', '.join(RECIPES)}.", required=True)
    flags.DEFINE_list("seeds", None, "Training seeds (weights, data order, noise); default: each "
                      "recipe's own.")
    flags.DEFINE_string("root", "runs/recipe_study", "Parent of the runs' work directories.")
    flags.DEFINE_string("output_dir", None, "Where the curves go.", required=True)
    flags.DEFINE_integer("eval_every", 1000, "Steps between held-out evaluations.")
    flags.DEFINE_integer("max_steps", None, "Override every recipe's max_steps (smoke runs).")
    flags.DEFINE_float("budget_minutes", 25.0, "Minutes of training for the summary table.")
    flags.DEFINE_multi_string("extra_gin", [], "Extra gin bindings for every run (smoke runs).")
    flags.DEFINE_string("baseline", None, "A recipe every other recipe is compared with, seed by "
                        "seed (baseline.md); its runs are read, never trained, from --root or, "
                        "when absent there, from <--baseline_runs>/<run>.jsonl.")
    flags.DEFINE_string("baseline_runs", "benchmarks/results/recipe_study/runs",
                        "Committed metrics.jsonl copies of the baseline's runs.")
    flags.DEFINE_list("seconds_per_step", [], "recipe=seconds pairs measured back to back on a "
                      "quiet machine (benchmarks/bin_train_speed.py): baseline.md then also "
                      "compares at equal minutes.")


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
    bindings, max_steps, _ = RECIPES[recipe]
    max_steps = FLAGS.max_steps or max_steps
    if finished_step(workdir) >= max_steps:
        print(f"{os.path.basename(workdir)}: already at step {max_steps}, read as is")
        return
    gin = STUDY_BASE + bindings + [f"train.seed = {seed}", f"train.data_seed = {seed}",
                                   f"build_model.seed = {seed}", f"train.max_steps = {max_steps}",
                                   f"train.eval_every = {FLAGS.eval_every}"] + FLAGS.extra_gin
    command = [sys.executable, os.path.join(ROOT, "bin", "train"), f"--workdir={workdir}"]
    command += [f"--gin_bindings={b}" for b in gin]
    start = time.time()
    with open(workdir.rstrip("/") + ".log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"{os.path.basename(workdir)}: {time.time() - start:.0f} s")


def paired_arms_table(curves, arm_runs=ARM_RUNS, label="the default recipe"):
    """Markdown: held-out FD of both arms per training seed at every evaluated step, the paired
    difference E-TSDM − DDPM per seed and whether its sign holds on every seed (seeds whose
    two runs are both in ``curves``). ``arm_runs``: ``{"etsdm" | "ddpm": {seed: run}}``."""
    seeds = [s for s in arm_runs["etsdm"]
             if arm_runs["etsdm"][s] in curves and arm_runs["ddpm"][s] in curves]
    if not seeds:
        return None
    fd = {(arm, s): {r["step"]: r["fd"] for r in curves[arm_runs[arm][s]]}
          for arm in arm_runs for s in seeds}
    steps = sorted(set.intersection(*[set(v) for v in fd.values()]))
    shown = " / ".join(str(s) for s in seeds)
    lines = [(f"E-TSDM vs DDPM (`USE_ETSDM = False`) at {label}, held-out FD per "
              f"training seed {shown} (same seed: same initial weights, data order and training "
              f"noise); Δ = E-TSDM − DDPM per seed."), "",
             "| step | DDPM | E-TSDM | Δ per seed | mean Δ | sign holds on every seed |",
             "|---:|---|---|---|---:|---|"]
    for step in steps:
        d = [fd[("etsdm", s)][step] - fd[("ddpm", s)][step] for s in seeds]
        lines.append(f"| {step} | " + " / ".join(f"{fd[('ddpm', s)][step]:.2f}" for s in seeds)
                     + " | " + " / ".join(f"{fd[('etsdm', s)][step]:.2f}" for s in seeds)
                     + " | " + " / ".join(f"{x:+.2f}" for x in d)
                     + f" | {sum(d) / len(d):+.2f} | {ARMS_SIGN[sign_word(d)]} |")
    return "\n".join(lines) + "\n"


def interpolate_fd(rows, step):
    """FD of a curve at ``step``, a power law between its evaluations (None outside them).

    log FD is interpolated linearly in log step: exact where FD ∝ step^−a between two
    evaluations, as the held-out curves are to a fair degree (local exponents 0.3–1.0 on the
    default's). Linear interpolation of such a convex curve overstates FD between evaluations,
    which flattered every recipe cheaper than the baseline at equal minutes. Linear where an FD
    is not positive.
    """
    for a, b in zip(rows, rows[1:]):
        if a["step"] <= step <= b["step"]:
            if a["fd"] > 0 and b["fd"] > 0 and a["step"] > 0:
                w = math.log(step / a["step"]) / math.log(b["step"] / a["step"])
                return a["fd"] * (b["fd"] / a["fd"]) ** w
            w = (step - a["step"]) / (b["step"] - a["step"])
            return (1 - w) * a["fd"] + w * b["fd"]
    return rows[0]["fd"] if rows and rows[0]["step"] == step else None


def baseline_table(curves, baseline, recipes, seconds_per_step=None):
    """Markdown: held-out FD of each recipe against ``baseline`` per training seed at every step
    the recipe evaluated (the equal-step columns where both did), the paired difference recipe −
    baseline per seed and whether its sign holds on every seed. With ``seconds_per_step``
    (``{recipe: s}``, measured back to back) also at equal minutes: the baseline's FD after
    ``step · s_recipe / s_baseline`` of its own steps, a power law between its evaluations
    (``interpolate_fd``; "–" outside them)."""
    seconds_per_step = seconds_per_step or {}
    lines = [f"Against `{baseline}`, held-out FD per training seed (same seed: same data order, "
             f"training noise and evaluation noise); Δ = recipe − {baseline} per seed; a "
             f"difference counts only where its sign holds on every seed.", "",
             f"| recipe | step | seeds | recipe FD | {baseline} FD | Δ per seed | sign |"
             + (f" s/step (÷ {baseline}) | {baseline} FD, same minutes | Δ same minutes | sign |"
                if seconds_per_step else ""),
             "|---|---:|---|---|---|---|---|" + ("---:|---|---|---|" if seconds_per_step else "")]
    base_s = seconds_per_step.get(baseline)
    for recipe in recipes:
        seeds = sorted(int(name.rpartition("-seed")[2]) for name in curves
                       if name.rpartition("-seed")[0] == recipe
                       and run_name(baseline, name.rpartition("-seed")[2]) in curves)
        if not seeds:
            continue
        fd = {s: {r["step"]: r["fd"] for r in curves[run_name(recipe, s)]} for s in seeds}
        base = {s: {r["step"]: r["fd"] for r in curves[run_name(baseline, s)]} for s in seeds}
        # Every step the recipe evaluated on all seeds; the equal-step cells are "–" where the
        # baseline has no evaluation there (a cheaper recipe runs more steps in its minutes).
        steps = sorted(set.intersection(*[set(fd[s]) for s in seeds]))
        for step in steps:
            row = (f"| {recipe} | {step} | {'/'.join(map(str, seeds))} | "
                   + " / ".join(f"{fd[s][step]:.2f}" for s in seeds) + " | ")
            if all(step in base[s] for s in seeds):
                d = [fd[s][step] - base[s][step] for s in seeds]
                row += (" / ".join(f"{base[s][step]:.2f}" for s in seeds) + " | "
                        + " / ".join(f"{x:+.2f}" for x in d) + f" | {sign_word(d)} |")
            else:
                row += "– | – | – |"
            if seconds_per_step:
                own = seconds_per_step.get(recipe)
                if own is None or base_s is None:
                    row += " – | – | – | – |"
                else:
                    same = [interpolate_fd(curves[run_name(baseline, s)], step * own / base_s)
                            for s in seeds]
                    row += f" {own:.3f} ({own / base_s:.2f}×) | "
                    if None in same:
                        row += "– | – | – |"
                    else:
                        dm = [fd[s][step] - b for s, b in zip(seeds, same)]
                        row += (" / ".join(f"{b:.2f}" for b in same) + " | "
                                + " / ".join(f"{x:+.2f}" for x in dm) + f" | {sign_word(dm)} |")
            lines.append(row)
    return "\n".join(lines) + "\n"


def curves_recipes(curves):
    """Recipes of the runs in ``curves``, in order."""
    return list(dict.fromkeys(name.rpartition("-seed")[0] or name for name in curves))


# sign_word's verdict as the arms table words it (Δ = E-TSDM − DDPM).
ARMS_SIGN = {"lower on every seed": "E-TSDM lower", "higher on every seed": "E-TSDM higher",
             "mixed": "no"}


def sign_word(differences):
    if all(x < 0 for x in differences):
        return "lower on every seed"
    if all(x > 0 for x in differences):
        return "higher on every seed"
    return "mixed"


def main(argv):
    del argv
    unknown = [r for r in FLAGS.recipes if r not in RECIPES]
    if unknown:
        raise app.UsageError(f"Unknown recipes {unknown}; known: {', '.join(RECIPES)}.")
    os.makedirs(FLAGS.root, exist_ok=True)
    curves = {}
    for recipe in FLAGS.recipes:
        for seed in FLAGS.seeds or RECIPES[recipe][2]:
            workdir = os.path.join(FLAGS.root, run_name(recipe, seed))
            train_once(recipe, int(seed), workdir)
            curves[run_name(recipe, seed)] = read_curve(workdir)
            os.makedirs(os.path.join(FLAGS.output_dir, "runs"), exist_ok=True)
            shutil.copyfile(os.path.join(workdir, "metrics.jsonl"),
                            os.path.join(FLAGS.output_dir, "runs", run_name(recipe, seed) + ".jsonl"))
    if FLAGS.baseline:
        if FLAGS.baseline not in RECIPES:
            raise app.UsageError(f"Unknown baseline {FLAGS.baseline!r}; known: {', '.join(RECIPES)}.")
        seeds = sorted({name.rpartition("-seed")[2] for name in curves})
        for seed in seeds:
            name = run_name(FLAGS.baseline, seed)
            workdir = os.path.join(FLAGS.root, name)
            committed = os.path.join(FLAGS.baseline_runs, name + ".jsonl")
            if name not in curves and (os.path.isdir(workdir) or os.path.isfile(committed)):
                curves[name] = read_curve(workdir if os.path.isdir(workdir) else committed)
        seconds = {}
        for pair in FLAGS.seconds_per_step:
            recipe, _, value = pair.partition("=")
            seconds[recipe.strip()] = float(value)
        table = baseline_table(curves, FLAGS.baseline,
                               [r for r in FLAGS.recipes if r != FLAGS.baseline], seconds)
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        with open(os.path.join(FLAGS.output_dir, "baseline.md"), "w") as f:
            f.write(table)
        print(table)
    description = {r: STUDY_BASE + RECIPES[r][0] for r in curves_recipes(curves)}
    write_curves(curves, FLAGS.output_dir, budget_minutes=FLAGS.budget_minutes,
                 recipes=description)
    tables = [paired_arms_table(curves, runs, label) for label, runs in ARM_PAIRS.items()]
    tables = [t for t in tables if t]
    if tables:
        with open(os.path.join(FLAGS.output_dir, "arms.md"), "w") as f:
            f.write("\n".join(tables))
        print("\n".join(tables))


if __name__ == "__main__":
    define_flags()
    app.run(main)
