"""benchmarks/device_study.py: the tiny pipeline (both arms, 2 seeds, 1 setting) in three
calls that stop in the middle: the state file progresses, training resumes from its checkpoint,
finished sample chunks are not recomputed, and the final report has per-seed values and
paired differences for both arms. Runs in-process (compiled programs are reused)."""

import json
import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import device_study as ds  # noqa: E402  (the study script lives in benchmarks/)

SCRIPT = "benchmarks/device_study.py"


def _state(workdir):
    with open(os.path.join(workdir, ds.STATE_FILE)) as f:
        return json.load(f)


def _stage(state, stage_id):
    return next(s for s in state["stages"] if s["id"] == stage_id)


SETTINGS = ("ddim-6-uniform",)  # one setting (visits label 0 < t~): each costs a compile per model


def _call(workdir, *args):
    lines = []
    opts = ds.parse_options([SCRIPT, f"--workdir={workdir}", "--quick",
                             f"--settings={','.join(SETTINGS)}", *args])
    done, _ = ds.run_study(opts, log=lines.append)
    return done, lines


def _chunk_files(workdir, seed):
    root = os.path.join(workdir, "samples")
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if f"_seed{seed}" in path:
                out[path] = os.stat(path).st_mtime_ns
    return out


def test_tiny_study_resumes_and_reports(tmp_path, capfd):
    workdir = str(tmp_path / "study")
    # Units: reference (1), train ddpm/etsdm seed 0 (1 each), per arm and setting 2 chunks +
    # 1 score (6): stop before seed 1's training.
    done, lines = _call(workdir, "--max_units_per_call=9")
    assert not done
    state = _state(workdir)
    assert _stage(state, "train/etsdm/seed0")["status"] == "done"
    assert all(s["status"] == "done" for s in state["stages"] if "seed0" in s["id"])
    assert _stage(state, "train/ddpm/seed1") == {**_stage(state, "train/ddpm/seed1"),
                                                 "status": "pending", "step": 0}
    assert lines[-1].startswith("Continue with: python benchmarks/device_study.py")
    assert os.path.isfile(os.path.join(workdir, "report.md"))  # a partial report already
    with open(os.path.join(workdir, "report.md")) as f:
        assert "PARTIAL" in f.read()
    seed0_chunks = _chunk_files(workdir, 0)
    assert len(seed0_chunks) == 2 * len(SETTINGS) * 2  # arms x settings x chunks of 8 (N = 16)

    # Second call: one training unit of 2 steps, then stop in the middle of train/ddpm/seed1.
    done, _ = _call(workdir, "--max_units_per_call=1", "--train_chunk_steps=2")
    assert not done
    ddpm1 = _stage(_state(workdir), "train/ddpm/seed1")
    assert ddpm1["status"] == "pending" and ddpm1["step"] == 2
    assert [(c["from"], c["to"]) for c in ddpm1["calls"]] == [(0, 2)]

    # Third call: resumes at step 2 (bin/train's checkpoint), finishes, writes the report.
    capfd.readouterr()
    done, lines = _call(workdir)
    out = capfd.readouterr().out
    assert done, lines
    assert "Resuming from" in out and "(step 2)" in out and "steps 2 → 4" in out
    state = _state(workdir)
    assert all(s["status"] == "done" for s in state["stages"])
    assert [(c["from"], c["to"]) for c in _stage(state, "train/ddpm/seed1")["calls"]] == \
        [(0, 2), (2, 4)]
    with open(os.path.join(workdir, "models", "ddpm_seed1", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert _chunk_files(workdir, 0) == seed0_chunks  # seed 0's chunks were not redrawn
    assert len(state["calls"]) == 3 and sum(len(c["units"]) for c in state["calls"]) == \
        1 + 4 + 1 + 2 * 6 * len(SETTINGS)  # reference, 4 + 1 training units, chunks, scores

    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["complete"] and not report["pending_stages"]
    # the wall time counts every call's units, the call that wrote the report included
    assert report["total_seconds"] == pytest.approx(
        sum(u["seconds"] for c in state["calls"] for u in c["units"]))
    (testbed,) = report["testbeds"].values()
    assert sorted((r["arm"], r["seed"]) for r in testbed["runs"]) == \
        [("ddpm", 0), ("ddpm", 1), ("etsdm", 0), ("etsdm", 1)]
    for run in testbed["runs"]:
        assert set(run["metrics"]) == set(SETTINGS)
        for metrics in run["metrics"].values():
            assert metrics["fd"] > 0 and "kid" in metrics
    with open(os.path.join(workdir, "report.md")) as f:
        text = f.read()
    assert "complete report" in text and "E-TSDM − DDPM" in text
    for setting in SETTINGS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {setting} |"))
        cells = [c.strip() for c in row.split("|")]
        # per-seed values of both arms (two seeds each) and the two paired differences
        assert len(cells[4].split(" / ")) == 2 and len(cells[5].split(" / ")) == 2
        assert len(cells[6].split(" / ")) == 2

    # A finished study: another call does nothing; a changed study is refused.
    done, lines = _call(workdir)
    assert done and _state(workdir)["calls"][-1]["units"] == []
    with pytest.raises(ds.StudyError, match="num_samples"):
        _call(workdir, "--num_samples=32")

    # A grown settings list: the new setting's stages come after everything done, setting by
    # setting, before the report; nothing sampled before is redrawn; the report has both.
    # The new settings are the first's sharing-aware grid (the E-TSDM arm visits every piece
    # boundary below t~, the plain grid only label 0; the DDPM arm the same knots at the true
    # labels) and its knots at the true labels for both arms.
    chunks_before = {**_chunk_files(workdir, 0), **_chunk_files(workdir, 1)}
    aware, knots = f"{SETTINGS[0]}-aware", f"{SETTINGS[0]}-knots"
    grown = [*SETTINGS, aware, knots]
    lines = []
    done, _ = ds.run_study(ds.parse_options([SCRIPT, f"--workdir={workdir}", "--quick",
                                             f"--settings={','.join(grown)}"]), log=lines.append)
    assert done and lines[0] == (f"Added 2 setting(s) to the study ({aware}, {knots}): "
                                 f"16 new stages.")
    state = _state(workdir)
    assert state["config"]["settings"] == grown
    assert [s["id"] for s in state["stages"][-17:]] == [
        f"{kind}/{arm}/seed{seed}/{setting}" for setting in (aware, knots) for seed in (0, 1)
        for arm in ds.ARMS for kind in ("sample", "score")] + ["report"]
    assert {p: t for p, t in {**_chunk_files(workdir, 0), **_chunk_files(workdir, 1)}.items()
            if p in chunks_before} == chunks_before
    # E-TSDM: each step at the label of the piece below its start; DDPM: the true labels
    assert _stage(state, f"sample/etsdm/seed0/{aware}")["labels_below_t_tilde"] == [
        0.0, 20.0, 40.0, 60.0, 80.0]
    assert _stage(state, f"sample/ddpm/seed0/{aware}")["labels_below_t_tilde"] == [
        20.0, 40.0, 60.0, 80.0]
    for arm in ds.ARMS:
        assert _stage(state, f"sample/{arm}/seed0/{SETTINGS[0]}")["labels_below_t_tilde"] == [
            0.0]

    def images(arm, setting):
        stage = _stage(state, f"sample/{arm}/seed0/{setting}")
        with np.load(ds.chunk_path(types.SimpleNamespace(workdir=workdir), stage, 0)) as f:
            return f["images"]

    for arm in ds.ARMS:
        assert np.any(images(arm, aware) != images(arm, SETTINGS[0]))
    # -knots: both arms at the true labels on those knots; DDPM's is its -aware sampler
    assert _stage(state, f"sample/etsdm/seed0/{knots}")["labels_below_t_tilde"] == [
        20.0, 40.0, 60.0, 80.0]
    assert _stage(state, f"sample/ddpm/seed0/{knots}")["labels_below_t_tilde"] == [
        20.0, 40.0, 60.0, 80.0]
    # the same sampler, model and noise; uint8 images, so float reductions that run in another
    # order (oneDNN may) can move a pixel by one level at most
    diff = np.abs(images("ddpm", knots).astype(int) - images("ddpm", aware).astype(int))
    assert diff.max() <= 1
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["complete"]
    testbed = next(iter(report["testbeds"].values()))
    assert testbed["labels_below_t_tilde"][aware] == [0.0, 20.0, 40.0, 60.0, 80.0]
    assert testbed["labels_below_t_tilde"][knots] == [20.0, 40.0, 60.0, 80.0]
    for run in testbed["runs"]:
        assert set(run["metrics"]) == set(grown)
    # dropping or reordering settings is refused
    for settings in (grown[1:], grown[::-1]):
        with pytest.raises(ds.StudyError, match="may only append"):
            ds.run_study(ds.parse_options([SCRIPT, f"--workdir={workdir}", "--quick",
                                           f"--settings={','.join(settings)}"]))


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    code = ds.main([SCRIPT, f"--workdir={tmp_path}", "--gin_file=cifar10.gin",
                    "--reference_stats=mnist32_test"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--data_dir" in err and "CIFAR-10" in err
    code = ds.main([SCRIPT, f"--workdir={tmp_path}", "--gin_file=cifar10.gin",
                    f"--data_dir={tmp_path}/nowhere"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err
    assert not os.path.exists(os.path.join(tmp_path, ds.STATE_FILE))


def test_setting_names():
    assert ds.parse_setting("ddim-10-trailing") == ("ddim", 10, {"spacing": "trailing"})
    assert ds.parse_setting("ddpm-1000") == ("ddpm", 1000, {})
    assert ds.parse_setting("dpm++3m-20-logSNR")[2] == {
        "order": 3, "method": "multistep", "algorithm": "dpmsolver++", "skip_type": "logSNR"}
    assert ds.parse_setting("dpm3s-10-logSNR")[2]["method"] == "singlestep"
    assert len(ds.FULL_SETTINGS) == 17 and len(set(ds.FULL_SETTINGS)) == 17
    assert ds.parse_setting("dpm++3m-20-time_uniform-aware")[2] == {
        "order": 3, "method": "multistep", "algorithm": "dpmsolver++",
        "skip_type": "time_uniform", "sharing_aware": True}
    assert ds.parse_setting("ddpm-1000-aware") == ("ddpm", 1000, {"sharing_aware": True})
    assert ds.parse_setting("ddim-10-trailing-knots")[2] == {
        "spacing": "trailing", "sharing_aware": True, "sharing_labels": False}
    for bad in ("euler-10", "ddim-aware", "ddim-10-aware-trailing", "ddim-10-aware-knots"):
        with pytest.raises(ds.StudyError):
            ds.parse_setting(bad)
    # -aware: the sharing-aware grid for an E-TSDM model
    from keras_etsdm import DiscreteVPSchedule, TimestepSharing
    from keras_etsdm.samplers import labels_below

    schedule = DiscreteVPSchedule()
    name = "dpm++3m-20-time_uniform-aware"
    assert labels_below(ds.build_setting_sampler(name, schedule, schedule.default_sharing()),
                        100.0) == [0.0, 20.0, 40.0, 60.0, 80.0]
    plain = labels_below(ds.build_setting_sampler("dpm++3m-20-time_uniform", schedule), 100.0)
    assert plain == [49.95, 99.9]
    # without sharing (DDPM arm): the E-TSDM arm's knots, the network at the true labels
    etsdm = ds.build_setting_sampler(name, schedule, schedule.default_sharing())
    for sharing in (None, TimestepSharing(0, 0)):
        ddpm = ds.build_setting_sampler(name, schedule, sharing, schedule.default_sharing())
        assert not ddpm.sharing_labels and etsdm.sharing_labels
        np.testing.assert_array_equal(schedule.default_sharing().piece_label(
            ddpm.tables["label"]), etsdm.tables["label"])
        assert np.any(ddpm.tables["label"] != etsdm.tables["label"])
        with pytest.raises(ds.StudyError, match="E-TSDM arm's sharing"):
            ds.build_setting_sampler(name, schedule, sharing)
    # -knots: both arms on the knots at the true labels
    knots = "dpm++3m-20-time_uniform-knots"
    for sharing in (None, schedule.default_sharing()):
        sampler = ds.build_setting_sampler(knots, schedule, sharing, schedule.default_sharing())
        assert not sampler.sharing_labels
        np.testing.assert_array_equal(sampler.tables["label"], ddpm.tables["label"])
    # the noise of a chunk depends on (eval seed, training seed, chunk), never on the arm
    assert ds.noise_seed(0, 1, 2) == ds.noise_seed(0, 1, 2) != ds.noise_seed(0, 1, 3)


def test_time_budget_stops_training_with_a_checkpoint(tmp_path):
    """The device path: the budget's timer stops training through the run driver's SIGTERM
    handling (checkpoint after the current step), the call exits normally with the stage
    pending, and the state records the step the checkpoint holds."""
    from keras_etsdm.checkpoint import latest_checkpoint

    workdir = str(tmp_path / "study")
    done, lines = _call(workdir, "--seeds=0", "--train_steps=1000000", "--budget_minutes=0.25",
                        "--margin_seconds=0")
    assert not done and lines[-1].startswith("Continue with:")
    stage = _stage(_state(workdir), "train/ddpm/seed0")
    assert stage["status"] == "pending" and 1 <= stage["step"] < 1000000
    checkpoint = latest_checkpoint(os.path.join(workdir, "models", "ddpm_seed0"))
    assert checkpoint.endswith(f"ckpt-{stage['step']:08d}")
    assert _stage(_state(workdir), "train/etsdm/seed0")["step"] == 0  # nothing started after


def test_trained_models_are_used_instead_of_training(tmp_path):
    """--trained_models: a (arm, seed) trained elsewhere (here: by another study) is read, not
    retrained, sampled at the study's step with the study's noise (the same images as the study
    that trained it), and checked: arm, seed and step must match, entries must parse."""
    first = str(tmp_path / "first")
    done, _ = _call(first, "--seeds=0")
    assert done
    given = {arm: os.path.join(first, "models", f"{arm}_seed0") for arm in ds.ARMS}
    before = {arm: sorted(os.listdir(os.path.join(path, "checkpoints")))
              for arm, path in given.items()}

    second = str(tmp_path / "second")
    done, lines = _call(second, "--seeds=0",
                        *[f"--trained_models={arm}:0={path}" for arm, path in given.items()])
    assert done, lines
    state = _state(second)
    for arm, path in given.items():
        stage = _stage(state, f"train/{arm}/seed0")
        assert stage["given"] == path and stage["step"] == 4 and stage["calls"] == []
        assert stage["checkpoint"].endswith("ckpt-00000004")
        assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == before[arm]
    assert not os.path.exists(os.path.join(second, "models"))  # nothing trained here
    import numpy as np

    for arm in ds.ARMS:
        for chunk in (0, 1):
            name = os.path.join("samples", f"{arm}_seed0", SETTINGS[0], f"chunk-{chunk:05d}.npz")
            with np.load(os.path.join(first, name)) as a, np.load(os.path.join(second, name)) as b:
                np.testing.assert_array_equal(a["images"], b["images"])
    assert _state(second)["config"]["trained_models"] == {
        f"{arm}:0": path for arm, path in sorted(given.items())}

    # the DDPM arm's directory given as E-TSDM: refused before anything is sampled
    with pytest.raises(ds.StudyError, match=r"USE_ETSDM = False, expected True"):
        _call(str(tmp_path / "wrong_arm"), "--seeds=0", f"--trained_models=etsdm:0={given['ddpm']}")
    # its seed is 0, not 1
    with pytest.raises(ds.StudyError, match=r"train.seed = 0, expected 1"):
        _call(str(tmp_path / "wrong_seed"), "--seeds=1",
              f"--trained_models=ddpm:1={given['ddpm']}")
    # the study trains 8 steps, the given model 4
    with pytest.raises(ds.StudyError, match=r"at step 4, the study's models train 8 steps"):
        _call(str(tmp_path / "wrong_steps"), "--seeds=0", "--train_steps=8",
              f"--trained_models=ddpm:0={given['ddpm']}")
    for entry, message in [("ddpm=x", "is not arm:seed="), ("dpm:0=x", "arm 'dpm'"),
                           ("ddpm:3=x", "seed 3 is not one of"), ("ddpm:0=/nowhere", "not a "
                                                                  "directory")]:
        with pytest.raises(ds.StudyError, match=message):
            _call(str(tmp_path / "bad"), "--seeds=0", f"--trained_models={entry}")
