"""The recipe-study tools of issue 18 (no training here: the runs they drive are bin/train's,
tested in test_training / test_training_e2e).

* ``heldout_curve.read_curve`` sums step time per logged interval into training minutes and
  keeps eval time apart; ``fd_at_budget`` picks the last evaluation within the budget;
  ``write_curves`` writes the csv / md (with the per-run budget row) / png.
* Every recipe of ``recipe_study.RECIPES`` is a valid set of gin bindings on top of
  ``gin/default.gin`` and ``STUDY_BASE`` (parsed by the library's own ``config.parse``); the
  study's runs keep the attention layer they trained with, and the recipe that won
  ("no_attention") is today's ``gin/default.gin``.
"""

import csv
import json
import math
import os
import sys

import pytest

import gin

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import heldout_curve, recipe_study

GIN_DIR = os.path.join(os.path.dirname(__file__), "..", "gin")


def write_metrics(workdir, records):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def fake_run(workdir, fds):
    """Logs every 10 steps at 0.6 s/step (first interval 3 s/step: compilation), an
    evaluation every 20 steps taking 30 s."""
    records, step = [], 0
    for fd in fds:
        for _ in range(2):
            step += 10
            records.append({"step": step, "loss": 0.1,
                            "seconds_per_step": 3.0 if step == 10 else 0.6})
        records.append({"step": step, "eval/fd": fd, "eval/kid": fd / 10,
                        "eval/kid_std": 0.01, "eval_seconds": 30.0, "eval_num_samples": 2000,
                        "eval_sampler": "DDIMSampler", "eval_nfe": 20})
    write_metrics(workdir, records)


def test_read_curve_minutes_and_budget(tmp_path):
    fake_run(tmp_path / "a", [20.0, 10.0, 5.0])
    rows = heldout_curve.read_curve(str(tmp_path / "a"))
    assert [r["step"] for r in rows] == [20, 40, 60]
    minutes = [(10 * 3.0 + 10 * 0.6) / 60, (36 + 12) / 60, (36 + 24) / 60]
    assert [r["train_minutes"] for r in rows] == pytest.approx(minutes)
    assert [r["eval_minutes"] for r in rows] == pytest.approx([0.5, 1.0, 1.5])
    assert rows[1]["sampler"] == "DDIMSampler-20" and rows[1]["num_samples"] == 2000
    assert heldout_curve.fd_at_budget(rows, 0.9)["fd"] == 10.0  # 0.8 min ≤ 0.9 < 1.0
    assert heldout_curve.fd_at_budget(rows, 0.5) is None
    with pytest.raises(FileNotFoundError, match="not a bin/train work directory"):
        heldout_curve.read_curve(str(tmp_path / "missing"))


def test_write_curves_files(tmp_path):
    for seed, fds in enumerate([[20.0, 10.0], [22.0, 11.0]]):
        fake_run(tmp_path / f"r-seed{seed}", fds)
    curves = {f"r-seed{s}": heldout_curve.read_curve(str(tmp_path / f"r-seed{s}"))
              for s in range(2)}
    out = tmp_path / "out"
    heldout_curve.write_curves(curves, str(out), machine="test CPU", budget_minutes=0.9,
                               recipes={"r": ["train.batch_size = 8"]})
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], float(r["fd"])) for r in rows] == [
        ("r-seed0", 20.0), ("r-seed0", 10.0), ("r-seed1", 22.0), ("r-seed1", 11.0)]
    text = (out / "curve.md").read_text()
    assert "Machine: test CPU" in text and "`train.batch_size = 8`" in text
    assert "| r-seed0 | 40 | 0.8 | 10.00 | 1.0000 |" in text  # the budget row
    assert (out / "curve.png").stat().st_size > 1000


def attention_after(bindings):
    """``build_network.attention_resolutions`` of gin/default.gin with ``bindings`` on top."""
    from keras_etsdm import config

    gin.clear_config()
    try:
        config.parse(bindings=bindings + ["train.seed = 1", "build_model.seed = 1"],
                     search_paths=[GIN_DIR])
        return tuple(gin.query_parameter("build_network.attention_resolutions"))
    finally:
        gin.clear_config()


def test_every_recipe_parses_on_the_default_config():
    assert recipe_study.RECIPES["default"][0] == []
    for name, (bindings, max_steps, seeds) in recipe_study.RECIPES.items():
        assert max_steps > 0 and seeds, name
        attention_after(recipe_study.STUDY_BASE + bindings)
    # The study's runs keep the attention layer they were trained with; gin/default.gin is the
    # recipe that won ("no_attention"), so the study still holds the default as a recipe.
    assert attention_after(recipe_study.STUDY_BASE) == (8,)
    assert attention_after([]) == ()
    assert attention_after(recipe_study.STUDY_BASE + recipe_study.RECIPES["no_attention"][0]) == ()


def test_paired_arms_table_gives_per_seed_differences_and_the_sign_rule(tmp_path):
    curves = {}
    for seed, (etsdm, ddpm) in enumerate([([3.0, 1.0], [4.0, 0.5]), ([2.0, 1.5], [2.5, 1.0])]):
        for arm, fds in (("etsdm", etsdm), ("ddpm", ddpm)):
            fake_run(tmp_path / f"{arm}{seed}", fds)
            curves[recipe_study.ARM_RUNS[arm][seed]] = heldout_curve.read_curve(
                str(tmp_path / f"{arm}{seed}"))
    table = recipe_study.paired_arms_table(curves).splitlines()
    # step 20: Δ = −1.0 / −0.5 (same sign); step 40: +0.5 / +0.5.
    assert "| 20 | 4.00 / 2.50 | 3.00 / 2.00 | -1.00 / -0.50 | -0.75 | E-TSDM lower |" in table
    assert "| 40 | 0.50 / 1.00 | 1.00 / 1.50 | +0.50 / +0.50 | +0.50 | E-TSDM higher |" in table
    del curves[recipe_study.ARM_RUNS["ddpm"][1]]  # seed 1 loses its pair: seed 0 alone
    assert "training seed 0 (" in recipe_study.paired_arms_table(curves)
    assert recipe_study.paired_arms_table({}) is None
    # Other arm runs (today's default recipe) under their own label.
    renamed = {recipe_study.NO_ATTENTION_ARM_RUNS[arm][0]: curves[recipe_study.ARM_RUNS[arm][0]]
               for arm in ("etsdm", "ddpm")}
    table = recipe_study.paired_arms_table(renamed, recipe_study.NO_ATTENTION_ARM_RUNS, "X")
    assert "at X, held-out FD per training seed 0 (" in table
    assert "| 20 | 4.00 | 3.00 | -1.00 | -1.00 | E-TSDM lower |" in table.splitlines()
    assert recipe_study.paired_arms_table(renamed) is None


def test_baseline_table_pairs_by_seed_at_equal_steps_and_equal_minutes(tmp_path):
    curves = {}
    # fake_run evaluates at steps 20, 40, 60.
    for seed, (base, wide) in enumerate([([20.0, 10.0, 5.0], [12.0, 6.0, 4.0]),
                                         ([22.0, 11.0, 6.0], [14.0, 12.0, 5.0])]):
        for recipe, fds in (("default", base), ("wide", wide)):
            fake_run(tmp_path / f"{recipe}-seed{seed}", fds)
            curves[f"{recipe}-seed{seed}"] = heldout_curve.read_curve(
                str(tmp_path / f"{recipe}-seed{seed}"))
    # A power law between evaluations (20 → 40 steps halves FD: FD ∝ 1/step there), None
    # beyond them; linear where an FD is not positive.
    assert recipe_study.interpolate_fd(curves["default-seed0"], 30) == pytest.approx(40 / 3)
    assert recipe_study.interpolate_fd(curves["default-seed0"], 50) == pytest.approx(
        10.0 * 0.5 ** (math.log(50 / 40) / math.log(60 / 40)))
    flat = [{"step": 20, "fd": 0.0}, {"step": 40, "fd": 2.0}]
    assert recipe_study.interpolate_fd(flat, 30) == pytest.approx(1.0)
    assert recipe_study.interpolate_fd(curves["default-seed0"], 20) == pytest.approx(20.0)
    assert recipe_study.interpolate_fd(curves["default-seed0"], 70) is None
    table = recipe_study.baseline_table(curves, "default", ["wide"]).splitlines()
    assert ("| wide | 20 | 0/1 | 12.00 / 14.00 | 20.00 / 22.00 | -8.00 / -8.00 | "
            "lower on every seed |") in table
    assert "| wide | 40 | 0/1 | 6.00 / 12.00 | 10.00 / 11.00 | -4.00 / +1.00 | mixed |" in table
    # "wide" costs 1.5x a default step: its step 20 is worth the default's step 30.
    timed = recipe_study.baseline_table(curves, "default", ["wide"],
                                        {"default": 0.2, "wide": 0.3}).splitlines()
    assert any(line.startswith("| wide | 20 |") and line.endswith(
        "| 0.300 (1.50×) | 13.33 / 14.67 | -1.33 / -0.67 | lower on every seed |")
        for line in timed)
    # step 60 is worth the default's step 90: beyond its last evaluation.
    assert any(line.startswith("| wide | 60 |") and line.endswith("| 0.300 (1.50×) | – | – | – |")
               for line in timed)
    # A cheaper recipe evaluated past the baseline's last step (here "fast" at 80 steps, half a
    # default step each: worth the default's step 40) is compared at equal minutes only.
    for seed, fds in enumerate([[15.0, 9.0, 7.0, 6.0], [16.0, 10.0, 8.0, 7.0]]):
        fake_run(tmp_path / f"fast-seed{seed}", fds)  # evaluations at 20, 40, 60, 80
        curves[f"fast-seed{seed}"] = heldout_curve.read_curve(str(tmp_path / f"fast-seed{seed}"))
    fast = recipe_study.baseline_table(curves, "default", ["fast"],
                                       {"default": 0.2, "fast": 0.1}).splitlines()
    assert ("| fast | 80 | 0/1 | 6.00 / 7.00 | – | – | – | 0.100 (0.50×) | 10.00 / 11.00 | "
            "-4.00 / -4.00 | lower on every seed |") in fast
