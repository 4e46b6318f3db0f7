"""SavedModel export: served by TensorFlow alone, matching the library's own outputs.

One export per module (a tiny 8x8 U-Net, DDIM with 4 steps, EMA weights that differ from the
raw ones), loaded in ONE separate Python process in which keras, jax and keras_etsdm cannot be
imported at all (an import hook refuses them), that runs every signature at batch sizes 1 and 4.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_etsdm import DiffusionModel, DiscreteVPSchedule, TimestepSharing, build_unet
from keras_etsdm import backend as etsdm_backend
from keras_etsdm import layers as etsdm_layers
from keras_etsdm import cli, export
from keras_etsdm.samplers import DDIMSampler

IMAGE = (8, 8, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: TensorFlow only. TensorFlow itself imports keras and jax at start
# when they are installed (tf.keras lazy loader, tf.lite utils); the hook makes them look absent
# (find_spec raising an error that is both ImportError and ValueError is what TF's own probing
# treats as "not installed"), so the export provably needs neither them nor this library.
LOADER = textwrap.dedent("""
    import json, sys
    class _Absent(ModuleNotFoundError, ValueError):
        pass
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "keras_etsdm", "jax", "jaxlib", "tf_keras"):
                raise _Absent(f"{name} is blocked in the serving process")
            return None
    sys.meta_path.insert(0, _Block())

    import numpy as np
    import tensorflow as tf

    export_dir, inputs_path, outputs_path = sys.argv[1:4]
    inputs = dict(np.load(inputs_path))
    loaded = tf.saved_model.load(export_dir)
    out = {"signatures": np.array(sorted(loaded.signatures.keys()))}
    for b in (1, 4):
        d = loaded.signatures["denoise"](x_t=tf.constant(inputs[f"x_t{b}"]),
                                         t=tf.constant(inputs[f"t{b}"]))
        out[f"eps{b}"] = d["eps"].numpy()
        feeds = {"noise": tf.constant(inputs[f"noise{b}"])}
        if "seed" in inputs:
            feeds["seed"] = tf.constant(inputs["seed"])
        out[f"sample{b}"] = loaded.signatures["sample"](**feeds)["images"].numpy()
        out[f"default{b}"] = loaded.signatures["serving_default"](**feeds)["images"].numpy()
    out["metadata"] = np.array(loaded.signatures["metadata"]()["metadata"].numpy().decode())
    out["blocked_imported"] = np.array([m for m in ("keras", "jax", "keras_etsdm")
                                        if m in sys.modules] + [""])
    np.savez(outputs_path, **out)
""")


def _randomise(model, seed):
    """Perturb every weight (the last conv starts at zero) and give the EMA other values."""
    rng = np.random.RandomState(seed)
    for w in model.network.trainable_variables:
        value = etsdm_backend.to_numpy(w.value)
        if len(w.shape) > 1:  # kernels: noise at the scale of a fan-in initialiser
            scale = 1.0 / np.sqrt(np.prod(w.shape[:-1]))
        else:  # biases, norm scales and offsets
            scale = 0.1
        w.assign((value + rng.randn(*w.shape) * scale).astype("float32"))
    for ema, w in zip(model.ema_weights, model.network.trainable_variables):
        noise = rng.randn(*w.shape).astype("float32") * 0.05
        ema.assign(etsdm_backend.to_numpy(w.value) + noise)


def _tiny_model():
    # Two small U-Net levels (attention, scale-shift norm, one down- and one upsampling): the
    # export traces, and the serving process XLA-compiles, every signature at two batch sizes;
    # what is checked (the served outputs equal the library's) does not depend on the depth.
    # The upsampling takes the sub-pixel form here (threshold lowered by the fixture), so its
    # operations are shown to serve without the library too.
    network = build_unet(image_size=IMAGE[0], channels=IMAGE[2], base_channels=8,
                         channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(8,),
                         dropout=0.0, num_heads=1, use_scale_shift_norm=True)
    # A short-range schedule (ᾱ_T = 0.6 instead of 4e-5): with a random network DDIM's x̂_0 then
    # stays O(1), so the sample images are not all saturated at 0 or 255.
    schedule = DiscreteVPSchedule("linear", 1000, beta_start=1e-4, beta_end=1e-3)
    model = DiffusionModel(network, schedule=schedule, sharing=TimestepSharing(100, 5))
    _randomise(model, seed=1)
    return model


def _serve(export_dir, inputs, tmp_path):
    """Run LOADER on ``export_dir`` in a separate process; returns its outputs."""
    inputs_path = os.path.join(tmp_path, "inputs.npz")
    outputs_path = os.path.join(tmp_path, "outputs.npz")
    np.savez(inputs_path, **inputs)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", LOADER, str(export_dir), inputs_path,
                             outputs_path], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(np.load(outputs_path))


def _inputs(seed=0):
    """Batch 4 inputs, and batch 1 = the first item of each (one library call checks both)."""
    rng = np.random.RandomState(seed)
    inputs = {"x_t4": rng.randn(4, *IMAGE).astype("float32"),
              # Labels on both sides of t̃ = 100 (shared and unshared), one fractional.
              "t4": np.array([7.0, 55.5, 100.0, 731.25], dtype="float32"),
              "noise4": rng.randn(4, *IMAGE).astype("float32")}
    for key in ("x_t", "t", "noise"):
        inputs[f"{key}1"] = inputs[f"{key}4"][:1].copy()
    return inputs


def _write_workdir(model, workdir, step):
    """A training work directory as bin/train leaves it: model config + one checkpoint."""
    from keras_etsdm import checkpoint

    os.makedirs(workdir, exist_ok=True)
    config = keras.saving.serialize_keras_object(model)
    with open(os.path.join(workdir, checkpoint.MODEL_CONFIG), "w") as f:
        json.dump(config, f, default=str)
    checkpoint.save_checkpoint(model, workdir, step)


@pytest.fixture(scope="module", autouse=True)
def subpixel_at_tiny_sizes():
    """The 4×4 → 8×8 upsampling of the tiny model in its sub-pixel form (this module only)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(etsdm_layers, "SUBPIXEL_MIN_SIZE", 4)
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export through the bin/export path: train-style work dir → checkpoint → SavedModel."""
    model = _tiny_model()
    sampler = DDIMSampler(num_steps=4, schedule=model.schedule)
    workdir = tmp_path_factory.mktemp("run")
    _write_workdir(model, workdir, step=7)
    out_dir = tmp_path_factory.mktemp("export") / "model"
    meta = cli.export_checkpoint(out_dir, workdir=workdir, sampler="ddim", steps=4)
    inputs = _inputs()
    served = _serve(out_dir, inputs, tmp_path_factory.mktemp("serve"))
    return {"model": model, "sampler": sampler, "dir": out_dir, "meta": meta,
            "inputs": inputs, "served": served}


def test_the_tiny_model_upsamples_in_sub_pixel_form(exported):
    upsamplings = [layer for layer in exported["model"].network.layers
                   if isinstance(layer, etsdm_layers.Upsample)]
    assert upsamplings
    assert all(etsdm_layers.subpixel_pays(layer.input.shape) for layer in upsamplings)


def test_served_process_imports_only_tensorflow(exported):
    assert list(exported["served"]["blocked_imported"]) == [""]


def test_signatures(exported):
    assert set(exported["served"]["signatures"]) == {"denoise", "sample", "serving_default",
                                                      "metadata"}


def test_denoise_matches_library_with_ema_weights(exported):
    model, inputs, served = exported["model"], exported["inputs"], exported["served"]
    with model.ema_scope():
        expected = etsdm_backend.to_numpy(model.denoise(inputs["x_t4"], inputs["t4"]))
    raw = etsdm_backend.to_numpy(model.denoise(inputs["x_t4"], inputs["t4"]))
    for b in (1, 4):
        assert served[f"eps{b}"].shape == (b,) + IMAGE
        assert served[f"eps{b}"].dtype == np.float32
        np.testing.assert_allclose(served[f"eps{b}"], expected[:b], atol=1e-4, rtol=0)
    # Non-trivial: the output is not ~0, and it is the EMA network, not the raw one.
    assert np.abs(expected).mean() > 0.05
    assert np.abs(raw - expected).max() > 1e-2


def test_denoise_applies_time_sharing(exported):
    """Labels in one shared piece give the same ε̂; the served model shares like the library."""
    served, inputs = exported["served"], exported["inputs"]
    model = exported["model"]
    x = inputs["x_t4"]
    with model.ema_scope():
        same_piece = etsdm_backend.to_numpy(model.denoise(x, np.full(4, 40.0, "float32")))
        shared = etsdm_backend.to_numpy(model.denoise(x, np.full(4, 59.9, "float32")))
        unshared = etsdm_backend.to_numpy(model.denoise(x, np.full(4, 120.0, "float32")))
        # The served labels [7, 55.5, 100, 731.25] reach the network as [0, 40, 100, 731.25].
        mapped = etsdm_backend.to_numpy(model.network(
            {"x": x, "t": np.array([0.0, 40.0, 100.0, 731.25], "float32")}))
        unmapped = etsdm_backend.to_numpy(model.network({"x": x, "t": inputs["t4"]}))
    np.testing.assert_array_equal(same_piece, shared)
    assert np.abs(shared - unshared).max() > 1e-2
    np.testing.assert_allclose(served["eps4"], mapped, atol=1e-4, rtol=0)
    assert np.abs(served["eps4"][:2] - unmapped[:2]).max() > 1e-2


def test_sample_matches_library(exported):
    model, sampler = exported["model"], exported["sampler"]
    inputs, served = exported["inputs"], exported["served"]
    with model.ema_scope():
        x0 = sampler.sample(model, inputs["noise4"])
    expected = etsdm_backend.to_numpy(export.images_to_uint8(x0)).astype(int)
    # Non-trivial images: many grey levels, not all clipped.
    assert len(np.unique(expected)) > 30
    for b in (1, 4):
        got = served[f"sample{b}"]
        assert got.dtype == np.uint8 and got.shape == (b,) + IMAGE
        assert np.abs(got.astype(int) - expected[:b]).max() <= 1
        np.testing.assert_array_equal(served[f"default{b}"], got)


def test_weights_are_stored_once_as_variables(exported):
    """The weights live in variables/ (shared by all signatures), not as graph constants."""
    model, out_dir = exported["model"], exported["dir"]
    with model.ema_scope():
        weights = [etsdm_backend.to_numpy(w.value) for w in model.network.weights]
    total = sum(w.nbytes for w in weights)
    data = out_dir / "variables" / "variables.data-00000-of-00001"
    assert total <= data.stat().st_size < 1.5 * total
    largest = max(weights, key=lambda w: w.size).astype("<f4").tobytes()
    assert largest in data.read_bytes()
    assert largest not in (out_dir / "saved_model.pb").read_bytes()


def test_metadata(exported):
    meta = json.loads(str(exported["served"]["metadata"]))
    assert meta == exported["meta"]
    assert meta == export.read_export_metadata(exported["dir"])
    import keras_etsdm

    assert meta["library_version"] == keras_etsdm.__version__
    assert meta["backend"] == keras.backend.backend()
    assert meta["T"] == 1000
    assert meta["schedule"] == {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                "beta_end": 1e-3, "cosine_s": 0.008}
    assert meta["time_sharing"]["t_tilde"] == 100 and meta["time_sharing"]["n"] == 5
    assert meta["time_sharing"]["shared_labels"] == [0.0, 20.0, 40.0, 60.0, 80.0]
    assert meta["sampler"]["class_name"] == "ddim"
    assert meta["steps"] == 4 and meta["nfe"] == 4 and meta["stochastic"] is False
    assert meta["image_shape"] == list(IMAGE)
    assert meta["weights"] == "ema"
    assert meta["checkpoint_step"] == 7
    assert meta["serving_default"] == "sample"
    assert set(meta["signatures"]) == {"denoise", "sample", "metadata"}


def test_existing_out_dir_needs_overwrite(exported):
    before = os.listdir(exported["dir"])
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_savedmodel(exported["model"], exported["dir"])
    assert os.listdir(exported["dir"]) == before


def test_overwrite_replaces_an_earlier_export(tmp_path):
    """A denoise-only export (serving_default = denoise) replaces an earlier one in place."""
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "saved_model.pb").write_bytes(b"an earlier export")
    (out_dir / "stale.txt").write_text("from the earlier export")
    meta = export.export_savedmodel(_tiny_model(), out_dir, sampler=None, use_ema=False,
                                    overwrite=True)
    assert not (out_dir / "stale.txt").exists()
    assert (out_dir / "saved_model.pb").read_bytes() != b"an earlier export"
    assert export.read_export_metadata(out_dir) == meta
    assert meta["serving_default"] == "denoise" and meta["sampler"] is None
    assert meta["weights"] == "raw"
    assert set(meta["signatures"]) == {"denoise", "metadata"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_overwrite_refuses_a_directory_that_is_not_an_export(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match="does not hold a SavedModel"):
        export.export_savedmodel(_tiny_model(), tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_torch_backend_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(etsdm_backend, "backend_name", lambda: "torch")
    with pytest.raises(export.ExportError, match="torch.*KERAS_BACKEND=jax"):
        export.export_savedmodel(_tiny_model(), tmp_path / "out")
    with pytest.raises(export.ExportError, match="torch"):
        cli.export_checkpoint(tmp_path / "out", workdir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_sampler_for_another_schedule_is_refused(tmp_path):
    sampler = DDIMSampler(num_steps=4, schedule=DiscreteVPSchedule("cosine"))
    with pytest.raises(export.ExportError, match="schedule=model.schedule"):
        export.export_savedmodel(_tiny_model(), tmp_path / "out", sampler=sampler)


def test_missing_checkpoint_errors(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint in work directory"):
        cli.export_checkpoint(tmp_path / "out", workdir=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.export_checkpoint(tmp_path / "out", workdir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.export_checkpoint(tmp_path / "out", checkpoint=tmp_path / "model.keras")
    with pytest.raises(ValueError, match="exactly one"):
        cli.export_checkpoint(tmp_path / "out", workdir=tmp_path, checkpoint=tmp_path / "m.keras")
    assert not (tmp_path / "out").exists()


def test_bin_export_missing_checkpoint_is_a_clear_error(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    result = subprocess.run([sys.executable, os.path.join(REPO, "bin", "export"),
                             f"--workdir={empty}", f"--out={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode != 0
    assert "bin/export: error: No checkpoint in work directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stochastic_sampler_takes_a_seed(tmp_path):
    """DDIM η = 1: ``sample(noise, seed)`` reproduces ``sampler.sample(model, noise, seed)``."""
    model = _tiny_model()
    sampler = DDIMSampler(num_steps=3, eta=1.0, schedule=model.schedule)
    meta = export.export_savedmodel(model, tmp_path / "model", sampler=sampler)
    assert meta["stochastic"] is True and "seed" in meta["signatures"]["sample"]["inputs"]
    inputs = _inputs(seed=3)
    inputs["seed"] = np.array([11, 5], dtype="int32")
    served = _serve(tmp_path / "model", inputs, tmp_path)
    with model.ema_scope():
        x0 = sampler.sample(model, inputs["noise4"], seed=inputs["seed"])
        other_seed = sampler.sample(model, inputs["noise4"], seed=np.array([12, 5], "int32"))
    expected = etsdm_backend.to_numpy(export.images_to_uint8(x0)).astype(int)
    other = etsdm_backend.to_numpy(export.images_to_uint8(other_seed)).astype(int)
    assert np.abs(expected - other).max() > 10  # the seed matters
    assert np.abs(served["sample4"].astype(int) - expected).max() <= 1
