"""Checkpoint faults the README claims to survive: damaged files, kills mid-write, and restore by
variable path (keras_etsdm/checkpoint.py)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_etsdm import DiffusionModel, build_unet, checkpoint
from keras_etsdm.optimizers import make_optimizer

BACKEND = keras.backend.backend()


def _model(dropout=0.1):
    net = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(), dropout=dropout)
    model = DiffusionModel(net, ema_decay=0.9)
    model.compile(optimizer=make_optimizer(1e-3))
    model.optimizer.build(model.trainable_variables)
    return model


def _trained_checkpoint(workdir):
    model = _model()
    model.fit(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype("float32"),
              batch_size=4, epochs=1, verbose=0)
    path = checkpoint.save_checkpoint(model, str(workdir), step=2)
    return model, path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    model, path = _trained_checkpoint(workdir)
    return model, path


@pytest.mark.parametrize("name", [checkpoint.WEIGHTS_FILE, checkpoint.OPTIMIZER_FILE,
                                  checkpoint.RNG_FILE, checkpoint.META_FILE])
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_file_is_one_clear_error_naming_it(saved, tmp_path, name, damage):
    _, path = saved
    copy = tmp_path / "ckpt-00000002"
    shutil.copytree(path, copy)
    file = copy / name
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[:len(data) // 2])
    else:
        middle = len(data) // 2
        file.write_bytes(data[:middle] + bytes(255 - b for b in data[middle:middle + 64])
                         + data[middle + 64:])
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.restore_checkpoint(_model(), str(copy))
    assert str(file) in str(error.value)


def test_restore_matches_variables_by_path(saved, tmp_path):
    """Optimizer values stored in another order than the model's, and seed generators numbered
    differently (another process history): restore by path gets every value right."""
    model, path = saved
    copy = tmp_path / "ckpt-00000002"
    shutil.copytree(path, copy)
    import json

    meta = json.loads((copy / checkpoint.META_FILE).read_text())
    with np.load(copy / checkpoint.OPTIMIZER_FILE) as f:
        values = [f[k] for k in sorted(f.files)]
    order = list(range(len(values)))[::-1]  # reversed storage order
    np.savez(copy / checkpoint.OPTIMIZER_FILE,
             **{f"v{i:05d}": values[j] for i, j in enumerate(order)})
    meta["optimizer_variables"] = [meta["optimizer_variables"][j] for j in order]
    meta["sha256"][checkpoint.OPTIMIZER_FILE] = checkpoint._sha256(
        copy / checkpoint.OPTIMIZER_FILE)
    (copy / checkpoint.META_FILE).write_text(json.dumps(meta))
    keras.random.SeedGenerator(5)  # shifts the numbering of the next model's seed generators
    other = _model()
    checkpoint.restore_checkpoint(other, str(copy))
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    states = [keras.ops.convert_to_numpy(v) for v in checkpoint._seed_states(model)]
    assert [v.path for v in checkpoint._seed_states(other)] != \
        [v.path for v in checkpoint._seed_states(model)]
    for want, got in zip(states, checkpoint._seed_states(other)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)


KILL_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    from keras_etsdm import DiffusionModel, build_unet, checkpoint
    net = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=())
    model = DiffusionModel(net)
    workdir = sys.argv[1]
    checkpoint.remove_stale_temporaries(workdir)
    step = max([s for s, _ in checkpoint.list_checkpoints(workdir)] or [0])
    print("ready", flush=True)
    while True:
        step += 1
        for w in model.weights:   # every value encodes the step: a torn checkpoint shows
            w.assign(np.full(w.shape, step, w.dtype))
        checkpoint.save_checkpoint(model, workdir, step, keep=2)
""")


@pytest.mark.skipif(BACKEND != "jax", reason="the checkpoint format is backend-independent: "
                    "the kill trials run once, on the JAX pass")
def test_sigkill_during_checkpoint_writes_never_leaves_a_bad_checkpoint(tmp_path):
    """20 runs killed (SIGKILL) at random moments of a loop that does nothing but write
    checkpoints: the newest complete checkpoint always loads with the values of its own step,
    and the next start removes the half-written temporaries."""
    script = tmp_path / "worker.py"
    script.write_text(KILL_WORKER)
    workdir = tmp_path / "run"
    rng = random.Random(0)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    steps_seen, torn = [], 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, str(script), str(workdir)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        root = workdir / checkpoint.CHECKPOINTS
        torn += root.is_dir() and any(not n.startswith(checkpoint.CHECKPOINT_PREFIX)
                                      for n in os.listdir(root))
        latest = checkpoint.latest_checkpoint(str(workdir))
        if latest is None:
            continue
        model = DiffusionModel(build_unet(image_size=8, channels=1, base_channels=8,
                                          channel_mult=(1,), num_res_blocks=1,
                                          attention_resolutions=()))
        meta = checkpoint.restore_checkpoint(model, latest, restore_optimizer=False)
        step = meta["step"]
        for w in model.weights:
            assert np.all(keras.ops.convert_to_numpy(w) == step), (latest, w.path)
        steps_seen.append(step)
    assert len(steps_seen) >= 15 and steps_seen == sorted(steps_seen)
    assert torn >= 3, torn  # the kills did land inside checkpoint writes
    checkpoint.remove_stale_temporaries(str(workdir))
    leftovers = [n for n in os.listdir(workdir / checkpoint.CHECKPOINTS)
                 if not n.startswith(checkpoint.CHECKPOINT_PREFIX)]
    assert leftovers == []
