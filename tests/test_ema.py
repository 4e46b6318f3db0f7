"""Extra EMA tracks (keras_etsdm.ema): profile math in closed form, the tracks of a real run
(one of them must equal the model's own EMA), resume, loading and scoring a track."""

import os

import keras
import numpy as np
import pytest

from keras_etsdm import cli, ema, training
from keras_etsdm.evaluation import evaluate
from keras_etsdm.model import ema_decay_at
from tests.test_training import run_kwargs

TOTAL, SPLIT = 4, 2
TRACKS = ["decay:0.9", "power:3", "sigma_rel:0.1"]  # the tiny model's own EMA decay is 0.9


def test_sigma_rel_to_gamma_matches_edm2_and_its_definition():
    # EDM2 (Karras et al. 2024) quotes σ_rel 0.05 ↔ γ 16.97 and 0.10 ↔ γ 6.94.
    assert ema.power_gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert ema.power_gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.02, 0.1, 0.2, 0.28):
        g = ema.power_gamma_from_sigma_rel(s)
        assert g > 0
        np.testing.assert_allclose(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), s, rtol=1e-12)


def test_profiles_parse_and_bad_ones_say_what_is_expected():
    assert ema.parse_profile("decay:0.999") == ("decay:0.999", "decay", 0.999)
    assert ema.parse_profile("power:6.5") == ("power:6.5", "power", 6.5)
    kind, value = ema.parse_profile("sigma_rel:0.1")[1:]
    assert kind == "power" and value == pytest.approx(6.9372, abs=1e-4)
    for bad, match in [("0.999", "is 'decay"), ("decay:x", "not a number"),
                       ("decay:1.0", r"\[0, 1\)"), ("power:0", "γ must be > 0"),
                       ("sigma_rel:0.3", r"sigma_rel must be in"), ("karras:1", "unknown kind"),
                       (0.999, "is 'decay")]:
        with pytest.raises(ValueError, match=match):
            ema.parse_profile(bad)
    with pytest.raises(ValueError, match="distinct"):
        ema.EMATracks(["decay:0.9", "decay:0.9"], [])


def test_decay_profile_is_the_model_warm_up():
    profile = ema.parse_profile("decay:0.999")
    counts = np.arange(0, 3000, 7)
    ours = np.array([ema.profile_decay(profile, k) for k in counts], np.float32)
    model = keras.ops.convert_to_numpy(ema_decay_at(counts, 0.999))
    np.testing.assert_allclose(ours, model, rtol=1e-7)


def test_tracks_of_a_known_sequence_equal_their_closed_forms():
    """Weights w_1..w_t fed one update at a time. The power EMA is exactly the average with
    weights (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1) (the product of its decays telescopes); the
    constant decay with warm-up is checked against the float64 recursion."""
    rng = np.random.default_rng(0)
    sequence = rng.normal(size=(50, 3, 2))
    var = keras.Variable(np.zeros((3, 2), np.float32))
    tracks = ema.EMATracks(["power:2.5", "decay:0.95"], [var])
    tracks.start()  # the initial value (zeros) has weight 0 in both profiles after update 1
    for w in sequence:
        var.assign(w.astype(np.float32))
        tracks.update()
    t, g = len(sequence), 2.5
    i = np.arange(1, t + 1, dtype=np.float64)
    weights = (i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1)
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(tracks.values["power:2.5"][0],
                               np.tensordot(weights, sequence, axes=1), rtol=2e-5, atol=1e-6)
    expected = np.zeros((3, 2))
    for k, w in enumerate(sequence):
        d = min(0.95, (1 + k) / (10 + k))
        expected = d * expected + (1 - d) * w
    np.testing.assert_allclose(tracks.values["decay:0.95"][0], expected, rtol=2e-5, atol=1e-6)
    assert tracks.count == t


@pytest.fixture(scope="module")
def track_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema_runs")
    full = training.train(str(root / "full"), max_steps=TOTAL, **run_kwargs(ema_tracks=TRACKS))
    training.train(str(root / "split"), max_steps=SPLIT, **run_kwargs(ema_tracks=TRACKS))
    second = training.train(str(root / "split"), max_steps=TOTAL, **run_kwargs(ema_tracks=TRACKS))
    return {"root": root, "full": full, "second": second}


def _state(model, attr):
    return [keras.ops.convert_to_numpy(v.value) for v in getattr(model, attr)]


def test_a_decay_track_equals_the_model_ema_and_files_follow_the_checkpoints(track_runs):
    workdir = str(track_runs["root"] / "full")
    files = ema.list_track_files(os.path.join(workdir, ema.TRACKS_DIR))
    assert [s for s, _ in files] == list(range(1, TOTAL + 1))  # checkpoint_every=1, keep all
    saved = ema.read_tracks(files[-1][1])
    assert saved["count"] == TOTAL and sorted(saved["tracks"]) == sorted(TRACKS)
    model_ema = _state(track_runs["full"].model, "ema_weights")
    raw = _state(track_runs["full"].model, "_network_weights")
    for track, mine in zip(saved["tracks"]["decay:0.9"], model_ema):
        np.testing.assert_allclose(track, mine, rtol=1e-5, atol=1e-7)
    # The power tracks are other averages of the same weights (not vacuous copies).
    moved = [np.abs(a - b).max() for a, b in zip(saved["tracks"]["power:3"], model_ema)]
    assert max(moved) > 1e-6
    assert max(np.abs(a - b).max() for a, b in zip(saved["tracks"]["power:3"], raw)) > 1e-6


def test_resumed_tracks_equal_uninterrupted_ones(track_runs):
    full = ema.read_tracks(ema.track_file(
        os.path.join(str(track_runs["root"] / "full"), ema.TRACKS_DIR), TOTAL))
    resumed = ema.read_tracks(ema.track_file(
        os.path.join(str(track_runs["root"] / "split"), ema.TRACKS_DIR), TOTAL))
    assert resumed["count"] == full["count"] == TOTAL
    for name in TRACKS:
        for a, b in zip(full["tracks"][name], resumed["tracks"][name]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_tracks_missing_at_the_resume_step_start_there_and_say_so(track_runs, tmp_path, capsys):
    workdir = str(tmp_path / "late")
    training.train(workdir, max_steps=SPLIT, **run_kwargs())
    capsys.readouterr()
    training.train(workdir, max_steps=TOTAL, **run_kwargs(ema_tracks=["power:3"]))
    assert "start at step 2" in capsys.readouterr().out
    saved = ema.read_tracks(ema.track_file(os.path.join(workdir, ema.TRACKS_DIR), TOTAL))
    assert saved["count"] == TOTAL - SPLIT


def test_load_and_score_a_track(track_runs, tmp_path):
    workdir = str(track_runs["root"] / "full")
    model = cli.load_model(workdir=workdir)
    step = ema.load_ema_track(model, workdir, "power:3", step=3)
    assert step == 3
    expected = ema.read_tracks(ema.track_file(os.path.join(workdir, ema.TRACKS_DIR), 3))
    for var, ema_var, value in zip(model._network_weights, model.ema_weights,
                                   expected["tracks"]["power:3"]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(var.value), value)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ema_var.value), value)
    with pytest.raises(ValueError, match="No EMA track 'power:9'"):
        ema.load_ema_track(model, workdir, "power:9")
    with pytest.raises(FileNotFoundError, match="No EMA tracks at step 7"):
        ema.load_ema_track(model, workdir, "power:3", step=7)
    with pytest.raises(FileNotFoundError, match="train.ema_tracks"):
        ema.load_ema_track(model, str(tmp_path), "power:3")

    stats_path = str(tmp_path / "ref.npz")
    evaluate.compute_stats("embedded:digits", stats_path, extractor="classifier_digits8",
                           max_images=200)
    kwargs = {"workdir": workdir, "extractor": "classifier_digits8", "batch_size": 16,
                  "save_samples": False}
    own = cli.run_eval("ddim", 3, 20, stats_path, **kwargs)
    tracked = cli.run_eval("ddim", 3, 20, stats_path, ema_track="power:3", **kwargs)
    same = cli.run_eval("ddim", 3, 20, stats_path, ema_track="decay:0.9", **kwargs)
    assert tracked["output"].endswith("ddim_3_ema-power3-step4_seed0.json")
    assert tracked["ema_track"] == "power:3" and tracked["ema_track_step"] == TOTAL
    assert tracked["metrics"]["fd"] != own["metrics"]["fd"]
    # The decay:0.9 track is the model's own EMA: the same samples, the same score.
    assert same["metrics"]["fd"] == pytest.approx(own["metrics"]["fd"], rel=1e-3)
    with pytest.raises(ValueError, match="needs --workdir"):
        cli.run_eval("ddim", 3, 20, stats_path, workdir=workdir, use_ema=False,
                     ema_track="power:3")
