"""bin/eval's logic end to end on a tiny saved model, and the comparison's --quick smoke run."""

import json
import os
import sys

import keras
import numpy as np
import pytest

from keras_etsdm import DiffusionModel, TimestepSharing, build_unet
from keras_etsdm import cli
from keras_etsdm.evaluation import evaluate, fid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import comparison  # noqa: E402  (the experiment harness lives in benchmarks/)


@pytest.fixture(scope="module")
def saved_digits_model(tmp_path_factory):
    """A tiny 8×8 E-TSDM model (random weights) saved as .keras: the bin/eval --checkpoint path."""
    keras.utils.set_random_seed(0)
    net = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    model = DiffusionModel(net, sharing=TimestepSharing(100, 5))
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    model.save(path)
    return path


def test_compute_stats_and_eval_write_provenance(saved_digits_model, tmp_path):
    stats_path = str(tmp_path / "ref_digits8.npz")
    ref = evaluate.compute_stats("embedded:digits", stats_path, extractor="classifier_digits8",
                                 batch_size=500)
    assert ref.count == 1797 and os.path.exists(stats_path)  # 1797 = 3·500 + 297: none dropped

    out = str(tmp_path / "eval" / "result.json")
    record = cli.run_eval("ddim", 5, 40, stats_path, checkpoint=saved_digits_model,
                               extractor="classifier_digits8", batch_size=16, seed=3,
                               output=out)
    saved = json.load(open(out))
    assert saved["num_samples"] == 40 and saved["sampler"] == "ddim" and saved["steps"] == 5
    assert saved["seed"] == 3 and saved["weights"] == "ema"
    assert saved["extractor"] == "classifier_digits8"
    assert saved["reference_file"] == os.path.abspath(stats_path)
    assert saved["metric_names"]["fd"] == "FD (classifier_digits8)"
    assert set(saved["metrics"]) == {"fd", "kid", "kid_std", "classifier_score"}
    assert all(np.isfinite(v) for v in saved["metrics"].values())
    assert saved["sharing"]["t_tilde"] == 100
    assert saved["labels_below_t_tilde"] == [0.0]  # DDIM-5 uniform: labels 0, 200, …, 800
    assert saved["sampler_config"]["num_steps"] == 5
    assert os.path.exists(str(tmp_path / "eval" / "result_samples.npz"))
    assert record["metrics"] == saved["metrics"]


def test_eval_errors(saved_digits_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="--compute_stats"):
        cli.run_eval("ddim", 5, 10, str(tmp_path / "none.npz"),
                          checkpoint=saved_digits_model, extractor="classifier_digits8")
    with pytest.raises(ValueError, match="Unknown sampler"):
        cli.run_eval("heun", 5, 10, str(tmp_path / "none.npz"),
                          checkpoint=saved_digits_model)
    with pytest.raises(ValueError, match="No reference data"):
        evaluate.load_reference_images(None)
    with pytest.raises(ValueError, match="Unknown embedded"):
        evaluate.load_reference_images("embedded:cifar")
    with pytest.raises(FileNotFoundError):
        evaluate.load_reference_images(str(tmp_path / "missing.npz"))


def test_reference_images_from_npz_and_folder(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=images)
    np.testing.assert_array_equal(evaluate.load_reference_images(str(tmp_path / "imgs.npz")),
                                  images)
    folder = tmp_path / "folder"
    os.makedirs(folder / "sub")
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / "sub" / f"{i}.png")
    loaded = evaluate.load_reference_images(str(folder), image_size=8, channels=3)
    assert loaded.shape == (5, 8, 8, 3) and loaded.dtype == np.uint8
    with pytest.raises(ValueError, match="--image_size"):
        evaluate.load_reference_images(str(folder))


def test_comparison_helpers():
    from keras_etsdm import DiscreteVPSchedule

    schedule = DiscreteVPSchedule()
    assert comparison.labels_below(comparison.make_sampler("ddim-50", schedule)) == \
        [0.0, 20.0, 40.0, 60.0, 80.0]
    assert comparison.make_sampler("ddpm-1000", schedule).num_iterations == 1000
    assert comparison.make_sampler("dpm3s-10", schedule).num_iterations == 10
    with pytest.raises(ValueError, match="Unknown sampler name"):
        comparison.make_sampler("euler-10", schedule)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    assert comparison.sliced_wasserstein_1(a, a) == 0.0
    assert comparison.sliced_wasserstein_1(a, b) < 0.1 < comparison.sliced_wasserstein_1(a, b + 1)
    assert abs(comparison.energy_distance(a, b)) < 0.02 < comparison.energy_distance(a, b + 1)


def test_comparison_quick_smoke(tmp_path):
    """--quick on the 2-D testbed: runs and writes its outputs (no claim about the numbers)."""
    settings = comparison.quick_settings()
    settings.testbeds = ("gauss2d",)
    settings.gauss_steps = 20
    results = comparison.run_comparison(str(tmp_path), settings, log=lambda *_: None)
    for name in ("results.json", "results.md", "lipschitz_gauss2d.csv", "lipschitz_gauss2d.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    runs = results["testbeds"]["gauss2d"]["runs"]
    assert {r["arm"] for r in runs} == {"ddpm", "etsdm"}
    assert "labels visited in [0, 100)" in open(tmp_path / "results.md").read()
    assert json.load(open(tmp_path / "results.json"))["testbeds"]["gauss2d"]["nfe"] == \
        {"ddim-10": 10, "dpm++2m-10": 10}


@pytest.mark.slow
def test_comparison_quick_smoke_digits(tmp_path):
    settings = comparison.quick_settings()
    settings.testbeds = ("digits8",)
    comparison.run_comparison(str(tmp_path), settings, log=lambda *_: None)
    assert os.path.getsize(tmp_path / "lipschitz_digits8.png") > 0


def test_class_agreement_is_exact():
    logits = np.eye(4)[[0, 1, 2, 3, 1, 1]]  # predicted classes 0 1 2 3 1 1
    labels = np.array([0, 1, 3, 3, 4, 0])  # 4 = the null class of a 4-class model: left out
    out = fid.class_agreement(logits, labels)
    assert out["class_agreement"] == 3 / 5
    assert out["class_agreement_per_class"] == {0: 0.5, 1: 1.0, 3: 0.5}


def test_eval_of_a_guided_conditional_model(tmp_path):
    keras.utils.set_random_seed(0)
    net = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(), num_classes=10)
    path = str(tmp_path / "cond.keras")
    DiffusionModel(net, num_classes=10).save(path)
    stats_path = str(tmp_path / "ref.npz")
    evaluate.compute_stats("embedded:digits", stats_path, extractor="classifier_digits8",
                           max_images=200)
    record = cli.run_eval("ddim", 3, 20, stats_path, checkpoint=path,
                               extractor="classifier_digits8", batch_size=20,
                               labels="balanced", guidance_scale=1.0)
    assert record["output"].endswith("ddim_3_ema_seed0_w1.json")
    metrics = record["metrics"]
    assert 0.0 <= metrics["class_agreement"] <= 1.0
    assert sorted(metrics["class_agreement_per_class"], key=int) == [str(c) for c in range(10)]
    saved = json.load(open(record["output"]))
    assert saved["guidance_scale"] == 1.0 and saved["num_classes"] == 10
    assert saved["class_labels"]["counts"] == [2] * 10 + [0]
    with pytest.raises(ValueError, match="needs class labels"):
        cli.run_eval("ddim", 3, 20, stats_path, checkpoint=path,
                          extractor="classifier_digits8", guidance_scale=1.0)
