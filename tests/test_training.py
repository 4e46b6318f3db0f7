"""The run driver: exact stop-and-resume, checkpoint layout and loading, logging, grids, gin."""

import functools
import json
import os

import keras
import numpy as np
import pytest

from keras_etsdm import (checkpoint, cpu_tuning, distribute, folding, io_utils, optimizers,
                         training)
from keras_etsdm.data import embedded, make_dataset
from keras_etsdm.evaluation import evaluate, fid
from keras_etsdm.evaluation.features import make_extractor
from keras_etsdm.io_utils import to_uint8

TOTAL, SPLIT = 4, 2


def tiny_model_fn(seed=3):
    # One U-Net level: every run here compiles its train step (XLA on JAX and in the XLA test:
    # ~20 s on 2 cores, ~35 s with two levels), and exact resumption does not depend on the
    # depth. Dropout stays on: its RNG state must resume too.
    network = functools.partial(folding.build_network, base_channels=8, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(), dropout=0.1)
    return functools.partial(training.build_model, image_size=8, channels=1,
                             network_fn=network, ema_decay=0.9, seed=seed)


def tiny_grid_sampler(schedule):
    return training.default_grid_sampler(schedule, num_steps=2)


def run_kwargs(**overrides):
    kwargs = dict(model_fn=tiny_model_fn(),
                  dataset_fn=functools.partial(make_dataset, source="embedded", name="digits"),
                  optimizer_fn=functools.partial(optimizers.make_optimizer, learning_rate=1e-3,
                                                 warmup_steps=2, grad_clip_norm=1.0),
                  batch_size=8, log_every=1, checkpoint_every=1, keep_checkpoints=2,
                  sample_every=0, distribution="none", handle_signals=False,
                  # XLA compilation of a TF train step costs minutes on 2 loaded cores; the
                  # graph-mode tf.function exercises the same resume logic.
                  jit_compile=keras.backend.backend() == "jax")
    kwargs.update(overrides)
    return kwargs


def all_state(model):
    """Every variable that a resumed run must reproduce, as numpy arrays."""
    values = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in model.variables]
    values += [np.asarray(keras.ops.convert_to_numpy(v.value))
               for v in model.optimizer.variables]
    return values


EVAL_SAMPLES = 24


@pytest.fixture(scope="module")
def digits_reference():
    """FD / KID reference statistics of the 8×8 digits (the tiny model's image shape)."""
    images = to_uint8(embedded.load_digits(8))
    return fid.compute_reference_statistics(images, make_extractor("classifier_digits8"),
                                            metadata={"data": "digits8"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_reference):
    """One uninterrupted run of TOTAL steps (with sample grids and held-out evaluations) and
    one stopped at SPLIT and resumed (with neither: they must not change training)."""
    root = tmp_path_factory.mktemp("runs")
    full = training.train(str(root / "full"), max_steps=TOTAL,
                          **run_kwargs(sample_every=TOTAL, num_grid_samples=4,
                                       grid_sampler_fn=tiny_grid_sampler,
                                       eval_every=SPLIT, eval_num_samples=EVAL_SAMPLES,
                                       eval_reference=digits_reference,
                                       eval_sampler_fn=tiny_grid_sampler, eval_seed=5,
                                       operative_config_fn=lambda: "# operative config\n"))
    first = training.train(str(root / "split"), max_steps=SPLIT, **run_kwargs())
    second = training.train(str(root / "split"), max_steps=TOTAL, **run_kwargs())
    return {"root": root, "full": full, "first": first, "second": second}


def test_resume_reproduces_the_loss_curve(runs):
    full = runs["full"].history
    resumed = runs["first"].history + runs["second"].history
    assert [s for s, _ in full] == list(range(1, TOTAL + 1))
    assert [s for s, _ in resumed] == list(range(1, TOTAL + 1))
    assert runs["second"].start_step == SPLIT
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in full], rtol=1e-6)
    # Training did something (the loss moved), so the equality is not vacuous.
    assert len({round(l, 6) for _, l in full}) == TOTAL


def test_resume_reproduces_weights_ema_optimizer_and_rng(runs):
    full, resumed = all_state(runs["full"].model), all_state(runs["second"].model)
    assert len(full) == len(resumed)
    for a, b in zip(full, resumed):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert int(keras.ops.convert_to_numpy(runs["second"].model.optimizer.iterations)) == TOTAL


def test_checkpoint_layout_keep_last_k_and_logs(runs):
    workdir = str(runs["root"] / "full")
    steps = [s for s, _ in checkpoint.list_checkpoints(workdir)]
    assert steps == [TOTAL - 1, TOTAL]  # keep_checkpoints=2
    latest = checkpoint.latest_checkpoint(workdir)
    assert sorted(os.listdir(latest)) == sorted([checkpoint.WEIGHTS_FILE, checkpoint.OPTIMIZER_FILE,
                                                 checkpoint.RNG_FILE, checkpoint.META_FILE])
    with open(os.path.join(latest, checkpoint.META_FILE)) as f:
        meta = json.load(f)
    assert meta["step"] == TOTAL and meta["global_batch_size"] == 8
    assert meta["rng_variables"]  # dropout seed states are saved
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.startswith(".tmp")]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]  # (not the eval records)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    assert all({"loss", "learning_rate", "grad_norm", "images_per_second"} <= set(r)
               for r in records)
    # Linear warm-up over 2 steps: lr(step k) is read after k updates: min(1, (k + 1) / 2).
    np.testing.assert_allclose([r["learning_rate"] for r in records], [1e-3] * TOTAL, rtol=1e-6)
    assert all(r["grad_norm"] > 0 for r in records)
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    with open(os.path.join(workdir, "operative_config.gin")) as f:
        assert f.read() == "# operative config\n"
    # The resumed run's metrics file has each step once.
    with open(str(runs["root"] / "split" / "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, TOTAL + 1))


def test_quality_is_evaluated_during_training_and_logged(runs, digits_reference):
    workdir = str(runs["root"] / "full")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval/fd" in r]
    assert [r["step"] for r in evals] == [SPLIT, TOTAL]
    for r in evals:
        assert (r["eval_sampler"], r["eval_nfe"], r["eval_num_samples"], r["eval_seed"],
                r["eval_weights"], r["eval_extractor"]) == \
            ("DDIMSampler", 2, EVAL_SAMPLES, 5, "ema", "classifier_digits8")
        assert r["eval/fd"] > 0 and np.isfinite(r["eval/kid"]) and r["eval_seconds"] > 0
    # The last record is exactly what scoring the final model gives (same noise, EMA weights).
    model = runs["full"].model
    again = evaluate.sample_quality_fn(digits_reference, tiny_grid_sampler(model.schedule),
                                       EVAL_SAMPLES, seed=5)(model, TOTAL)
    np.testing.assert_allclose(evals[-1]["eval/fd"], again["metrics"]["fd"], rtol=1e-5)
    np.testing.assert_allclose(evals[-1]["eval/kid"], again["metrics"]["kid"], rtol=1e-4,
                               atol=1e-7)


def test_quality_evaluation_refuses_statistics_of_another_image_shape(runs):
    reference = fid.ReferenceStatistics(np.zeros(2), np.eye(2), 10, "classifier_mnist32",
                                        metadata={"image_shape": [32, 32, 1]})
    eval_fn = evaluate.sample_quality_fn(reference, tiny_grid_sampler(None), 4,
                                         extractor=make_extractor("classifier_mnist32"))
    with pytest.raises(ValueError, match=r"\[32, 32, 1\] images but the model makes \[8, 8, 1\]"):
        eval_fn(runs["full"].model, 1)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        evaluate.sample_quality_fn(reference, tiny_grid_sampler(None), 1,
                                   extractor=make_extractor("classifier_mnist32"))


def test_reference_of_another_shape_fails_before_training(tmp_path):
    reference = fid.ReferenceStatistics(np.zeros(2), np.eye(2), 10, "classifier_mnist32",
                                        metadata={"image_shape": [32, 32, 1]})
    with pytest.raises(ValueError, match=r"are of \[32, 32, 1\] images"):
        training.train(str(tmp_path), max_steps=2,
                       **run_kwargs(eval_every=1, eval_reference=reference, eval_num_samples=4))
    assert checkpoint.list_checkpoints(str(tmp_path)) == []  # failed before the first step


def test_sample_grid_png_written(runs):
    from PIL import Image

    path = os.path.join(str(runs["root"] / "full"), "samples", f"grid-{TOTAL:08d}.png")
    with Image.open(path) as image:
        # 4 samples of 8x8 in a 2x2 grid with 1-pixel padding: 2*9+1 = 19.
        assert image.size == (19, 19) and image.mode == "L"


def test_load_checkpoint_ema_and_raw(runs):
    workdir = str(runs["root"] / "full")
    trained = runs["full"].model
    ema = checkpoint.load_checkpoint(workdir)
    raw = checkpoint.load_checkpoint(workdir, use_ema=False)
    assert ema.checkpoint_step == TOTAL
    for w_ema, w_raw, e, w in zip(ema.network.trainable_variables,
                                  raw.network.trainable_variables, trained.ema_weights,
                                  trained.network.trainable_variables):
        np.testing.assert_allclose(np.asarray(w_ema.value), np.asarray(e.value), atol=1e-7)
        np.testing.assert_allclose(np.asarray(w_raw.value), np.asarray(w.value), atol=1e-7)
    older = checkpoint.load_checkpoint(workdir, step=TOTAL - 1)
    assert older.checkpoint_step == TOTAL - 1
    with pytest.raises(ValueError, match="No checkpoint for step 1 .*available steps"):
        checkpoint.load_checkpoint(workdir, step=1)


def test_resume_when_finished_is_a_no_op(runs):
    result = training.train(str(runs["root"] / "split"), max_steps=TOTAL, **run_kwargs())
    assert result.step == TOTAL and result.history == []


def test_incomplete_or_temporary_checkpoints_are_ignored_and_cleaned(runs, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(str(runs["root"] / "full"), workdir)
    root = os.path.join(workdir, "checkpoints")
    os.makedirs(os.path.join(root, ".tmp-ckpt-00000099-123"))     # killed mid-write
    os.makedirs(os.path.join(root, "ckpt-00000050"))              # no meta.json: incomplete
    assert checkpoint.latest_checkpoint(workdir).endswith(f"ckpt-{TOTAL:08d}")
    checkpoint.remove_stale_temporaries(workdir)
    assert not os.path.exists(os.path.join(root, ".tmp-ckpt-00000099-123"))


def test_different_model_in_same_workdir_is_a_clear_error(runs, tmp_path):
    import shutil

    workdir = str(tmp_path / "changed")
    shutil.copytree(str(runs["root"] / "split"), workdir)
    config_path = os.path.join(workdir, checkpoint.MODEL_CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    config["config"]["ema_decay"] = 0.5  # as if the run had been started with another config
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="different model configuration"):
        training.train(workdir, max_steps=TOTAL + 1, **run_kwargs())


def test_a_second_run_in_a_workdir_that_is_training_is_refused_and_touches_nothing(runs,
                                                                                  tmp_path):
    import shutil

    workdir = str(tmp_path / "busy")
    shutil.copytree(str(runs["root"] / "split"), workdir)
    root = os.path.join(workdir, "checkpoints")
    os.makedirs(os.path.join(root, ".tmp-ckpt-00000099-123"))  # as if the holder were saving
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    with training.workdir_lock(workdir):  # what the running train() holds
        with pytest.raises(training.WorkdirInUseError, match=f"pid {os.getpid()}"):
            training.train(workdir, max_steps=TOTAL + 1, **run_kwargs())
    # The refused run truncated no metrics and removed none of the holder's temporaries.
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
    assert os.path.isdir(os.path.join(root, ".tmp-ckpt-00000099-123"))
    with training.workdir_lock(workdir):  # released when its holder is done
        pass


# ----- pieces that need no training ---------------------------------------------------------
def test_warmup_schedule_values():
    schedule = optimizers.WarmupConstant(1e-3, warmup_steps=4)
    got = [float(keras.ops.convert_to_numpy(schedule(s))) for s in range(6)]
    np.testing.assert_allclose(got, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    constant = optimizers.WarmupConstant(1e-3)
    assert float(keras.ops.convert_to_numpy(constant(0))) == pytest.approx(1e-3)


def test_clipped_adam_records_norm_and_clips():
    optimizer = optimizers.ClippedAdam(clip_norm=1.0, learning_rate=0.1)
    variables = [keras.Variable(np.zeros(2, np.float32)), keras.Variable(np.zeros((), np.float32))]
    optimizer.build(variables)
    grads = [keras.ops.convert_to_tensor(np.array([3.0, 0.0], np.float32)),
             keras.ops.convert_to_tensor(np.float32(4.0))]
    clipped = optimizer._clip_gradients(grads)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clipped[0]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clipped[1]), 0.8, rtol=1e-6)
    assert float(keras.ops.convert_to_numpy(optimizer.grad_norm)) == pytest.approx(5.0)
    # A second build (compile builds it on TensorFlow, bin/train and restore call it again)
    # keeps the variables: one grad_norm, the same slots.
    count = len(optimizer.variables)
    optimizer.build(variables)
    assert len(optimizer.variables) == count
    assert [v.path for v in optimizer.variables].count(optimizer.grad_norm.path) == 1
    loose = optimizers.ClippedAdam(clip_norm=None, learning_rate=0.1)
    loose.build(variables)
    unclipped = loose._clip_gradients(grads)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unclipped[0]), [3.0, 0.0])


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = io_utils.image_grid(images, columns=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1) and grid.dtype == np.uint8
    assert np.all(grid[1:3, 1:4] == 0) and np.all(grid[1:3, 5:8] == 128)
    assert np.all(grid[4:6, 1:4] == 255) and np.all(grid[4:6, 5:8] == 255)  # empty cell: white
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        io_utils.image_grid(np.zeros((2, 3, 4)))


def test_global_batch_must_divide_across_replicas():
    dist = distribute.Distribution("mirrored", 2)
    assert dist.check_global_batch(8) == 4
    with pytest.raises(ValueError, match="does not divide evenly across 2 replicas"):
        dist.check_global_batch(7)
    with pytest.raises(ValueError, match="Unknown distribution mode"):
        distribute.setup_distribution("everywhere")


def test_atomic_write_replaces_whole_file(tmp_path):
    path = str(tmp_path / "f.txt")
    io_utils.atomic_write_text(path, "first")
    io_utils.atomic_write_text(path, "second")
    assert open(path).read() == "second"
    assert os.listdir(str(tmp_path)) == ["f.txt"]


class _CtrlCAtStep:
    """A progress stream that presses Ctrl-C (SIGINT to this process) once step ``n`` is
    logged: the run's own signal handler must save a checkpoint and stop after that step."""

    def __init__(self, n):
        self.prefix, self.sent = f"step {n}/", False

    def write(self, text):
        if not self.sent and text.startswith(self.prefix):
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return len(text)

    def flush(self):
        pass


def test_ctrl_c_saves_and_the_resumed_run_equals_an_uninterrupted_one(runs, tmp_path):
    workdir = str(tmp_path / "interrupted")
    first = training.train(workdir, max_steps=100, stream=_CtrlCAtStep(1),
                           **run_kwargs(handle_signals=True))
    assert first.interrupted and 1 <= first.step < TOTAL
    assert [s for s, _ in checkpoint.list_checkpoints(workdir)][-1] == first.step
    second = training.train(workdir, max_steps=TOTAL, **run_kwargs())
    for a, b in zip(all_state(runs["full"].model), all_state(second.model)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX always compiles; the runs above cover it")
def test_xla_compiled_tf_resume_equals_an_uninterrupted_run(tmp_path):
    """What bin/train runs on TensorFlow off AVX-512 (jit_compile=True), stopped and resumed;
    on AVX-512 it runs the graph path of the runs above (cpu_tuning.tensorflow_train_jit_compile)."""
    full = training.train(str(tmp_path / "full"), max_steps=TOTAL,
                          **run_kwargs(jit_compile=True))
    training.train(str(tmp_path / "split"), max_steps=SPLIT, **run_kwargs(jit_compile=True))
    resumed = training.train(str(tmp_path / "split"), max_steps=TOTAL,
                             **run_kwargs(jit_compile=True))
    assert len({round(l, 6) for _, l in full.history}) == TOTAL  # the loss moved
    for a, b in zip(all_state(full.model), all_state(resumed.model)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_jit_compile_auto_is_the_measured_choice_and_bad_values_are_refused(tmp_path, capsys):
    from keras_etsdm import backend

    expected = backend.default_train_jit_compile()
    if keras.backend.backend() == "jax":
        assert expected is True
    elif keras.backend.backend() == "tensorflow":
        assert expected is cpu_tuning.tensorflow_train_jit_compile()  # CPU-only test machine
    # also: winograd_training sets winograd.IN_TRAINING while the run builds and traces its
    # step (the embedded network's 8 channels keep the direct form either way), then restores it
    from keras_etsdm import winograd

    seen = []

    def model_fn():
        seen.append((winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE))
        return tiny_model_fn()()

    run = training.train(str(tmp_path / "auto"), max_steps=1,
                         **run_kwargs(jit_compile="auto", model_fn=model_fn,
                                      winograd_training=True))
    assert seen == [(True, None)] and winograd.IN_TRAINING is False
    # an int: the form only at outputs up to that side; a bad value is refused before the run
    # touches its work directory
    seen.clear()
    training.train(str(tmp_path / "auto"), max_steps=2,
                   **run_kwargs(jit_compile="auto", model_fn=model_fn, winograd_training=16))
    assert seen == [(True, 16)]
    assert (winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE) == (False, None)
    # "auto" (the default): the library's per-ISA choice, on for JAX on an AVX2 CPU without
    # AVX-512 only (cpu_tuning.jax_winograd_training)
    seen.clear()
    training.train(str(tmp_path / "auto"), max_steps=3,
                   **run_kwargs(jit_compile="auto", model_fn=model_fn))
    expected_auto = (keras.backend.backend() == "jax" and cpu_tuning.jax_winograd_training())
    assert backend.default_winograd_training() is expected_auto
    assert seen == [(expected_auto, None)]
    for bad in (4, "yes", 1.5):
        with pytest.raises(ValueError, match="winograd_training must be 'auto', True, False or "
                                             "a largest output side"):
            training.train(str(tmp_path / "refused"), max_steps=1,
                           **run_kwargs(model_fn=model_fn, winograd_training=bad))
    assert not (tmp_path / "refused").exists()
    assert run.model.jit_compile is expected
    wording = "XLA-compiled" if expected else "not XLA-compiled"
    assert f"{wording} training step" in capsys.readouterr().out
    with pytest.raises(ValueError, match="train.jit_compile must be True, False or 'auto'"):
        training.train(str(tmp_path / "bad"), max_steps=1, **run_kwargs(jit_compile="yes"))
