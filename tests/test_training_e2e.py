"""bin/train end to end: a tiny run writes checkpoints, logs and a grid; a second invocation
resumes; SIGTERM saves a checkpoint and exits 128 + 15."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ["--gin.build_model.image_size=8", "--gin.make_dataset.name='digits'",
        "--gin.build_network.fold=1", "--gin.build_network.base_channels=8",
        "--gin.build_network.channel_mult=(1, 2)", "--gin.build_network.attention_resolutions=()",
        "--gin.train.batch_size=8", "--gin.train.log_every=1", "--gin.train.num_grid_samples=4",
        "--gin.grid_sampler.num_steps=2", "--gin.train.distribution='none'",
        # default.gin evaluates against the 32x32 MNIST test set, which an 8x8 model cannot use
        "--gin.train.eval_every=0"]


def bin_train(repo_root, workdir, *args, env):
    return [sys.executable, os.path.join(repo_root, "bin", "train"), f"--workdir={workdir}",
            *TINY, *args]


@pytest.mark.slow
def test_bin_train_writes_outputs_and_resumes(repo_root, subprocess_env, tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.run(bin_train(repo_root, workdir, "--gin.train.max_steps=2",
                                     "--gin.train.sample_every=2",
                                     "--gin.train.checkpoint_every=1", env=subprocess_env),
                           env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "step 2/2" in first.stdout and "img/s" in first.stdout and "ETA" in first.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == \
        ["ckpt-00000001", "ckpt-00000002"]
    assert os.path.isfile(os.path.join(workdir, "samples", "grid-00000002.png"))
    with open(os.path.join(workdir, "operative_config.gin")) as f:
        operative = f.read()
    assert "train.max_steps = 2" in operative and "TimestepSharing.t_tilde = 100" in operative
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    second = subprocess.run(bin_train(repo_root, workdir, "--gin.train.max_steps=4",
                                      "--gin.train.sample_every=0", env=subprocess_env),
                            env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resuming from" in second.stdout and "steps 2 → 4" in second.stdout
    assert "step 3/4" in second.stdout and "step 1/" not in second.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert "ckpt-00000004" in os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(repo_root, subprocess_env, tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(bin_train(repo_root, workdir, "--gin.train.max_steps=100000",
                                      "--gin.train.sample_every=0",
                                      "--gin.train.checkpoint_every=0", env=subprocess_env),
                            env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 900
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    output = "".join(lines) + proc.stdout.read()
    code = proc.wait(timeout=300)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(checkpoints) == 1 and int(checkpoints[0].split("-")[1]) >= 3, checkpoints
    assert "Stopped by signal" in output


def test_gin_configs_parse_and_switch(repo_root):
    import gin

    from keras_etsdm import config

    gin_dir = os.path.join(repo_root, "gin")
    try:
        for name in ("lsun.gin", "ffhq.gin", "celebahq.gin", "afhq.gin", "cifar10.gin"):
            gin.clear_config()
            with pytest.raises(ValueError, match="DATA_PATH.*REQUIRED.*--gin.DATA_PATH"):
                config.parse([name], [], search_paths=[gin_dir])
            gin.clear_config()
            config.parse([name], ["DATA_PATH = '/data/x'"], search_paths=[gin_dir])
            assert gin.query_parameter("DATA_PATH/macro.value") == "/data/x"
            assert str(gin.query_parameter("make_dataset.path")) == "%DATA_PATH"
            assert gin.query_parameter("TimestepSharing.t_tilde") == 100
        assert gin.query_parameter("build_network.base_channels") == 128
        gin.clear_config()
        config.parse([], ["USE_ETSDM = False", "train.max_steps = 7"], search_paths=[gin_dir])
        assert gin.query_parameter("train.max_steps") == 7
        assert gin.query_parameter("make_dataset.name") == "mnist"
        model = config.build_model(network_fn=lambda image_size, channels: __import__(
            "keras_etsdm").build_unet(image_size=8, channels=channels, base_channels=8,
                                      channel_mult=(1,), num_res_blocks=1,
                                      attention_resolutions=()), image_size=8)
        assert not model.sharing.enabled  # USE_ETSDM = False → the DDPM baseline
    finally:
        gin.clear_config()
