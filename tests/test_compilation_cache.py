"""The persistent XLA compilation cache the bin/ entry points turn on (compilation_cache.py)."""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_etsdm import compilation_cache as cc


def test_default_root_follows_the_variable_then_xdg_then_home(tmp_path):
    assert cc.default_cache_root({cc.CACHE_VARIABLE: str(tmp_path)}) == str(tmp_path)
    assert cc.default_cache_root({"XDG_CACHE_HOME": "/x"}) == "/x/keras_etsdm/xla"
    home = os.path.join(os.path.expanduser("~"), ".cache", "keras_etsdm", "xla")
    assert cc.default_cache_root({}) == home
    for off in ("0", "off", "False", " no "):
        assert cc.default_cache_root({cc.CACHE_VARIABLE: off}) is None


def test_cache_environ_per_backend():
    env = {"TF_XLA_FLAGS": "--tf_xla_auto_jit=0", "OTHER": "1"}
    jax_env = cc.cache_environ(env, "jax", root="/c")
    assert jax_env["JAX_COMPILATION_CACHE_DIR"] == "/c/jax" and jax_env["OTHER"] == "1"
    assert jax_env["TF_XLA_FLAGS"] == env["TF_XLA_FLAGS"]  # not touched for JAX
    tf_env = cc.cache_environ(env, "tensorflow", root="/c")
    assert tf_env["TF_XLA_FLAGS"] == (
        "--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory=/c/tensorflow")
    assert "JAX_COMPILATION_CACHE_DIR" not in tf_env
    assert env == {"TF_XLA_FLAGS": "--tf_xla_auto_jit=0", "OTHER": "1"}  # input unchanged


def test_cache_environ_leaves_existing_settings_and_other_backends():
    assert cc.cache_environ({"JAX_COMPILATION_CACHE_DIR": "/mine"}, "jax", root="/c") is None
    flags = {"TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/mine"}
    assert cc.cache_environ(flags, "tensorflow", root="/c") is None
    assert cc.cache_environ({}, "torch", root="/c") is None
    assert cc.cache_environ({cc.CACHE_VARIABLE: "0"}, "jax") is None


_PROBE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from keras_etsdm import compilation_cache as cc
backend = os.environ["KERAS_BACKEND"]
directory = cc.enable_compilation_cache(backend, root=sys.argv[2])
import keras
import numpy as np
keras.utils.set_random_seed(0)

model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse", jit_compile=True)
x = np.ones((4, 8, 8, 3), np.float32)
loss = float(model.train_on_batch(x, np.zeros((4, 1), np.float32)))
files = sorted(os.path.relpath(os.path.join(d, f), directory)
               for d, _, fs in os.walk(directory) for f in fs)
print("RESULT " + json.dumps({"directory": directory, "files": files, "loss": loss}))
"""


def _probe(repo_root, root, env):
    out = subprocess.run([sys.executable, "-c", _PROBE, repo_root, str(root)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_a_new_process_writes_and_a_later_one_reuses_the_cache(tmp_path, repo_root,
                                                                subprocess_env):
    """On this backend a compiled train step lands in <root>/<backend>, and a second process
    with the same program finds its entries there (no new entry) and computes the same loss."""
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        pytest.skip("the XLA cache is for the JAX and TensorFlow backends")
    env = dict(subprocess_env)
    for name in ("JAX_COMPILATION_CACHE_DIR", "TF_XLA_FLAGS", cc.CACHE_VARIABLE):
        env.pop(name, None)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs compile fast
    first = _probe(repo_root, tmp_path, env)
    assert first["directory"] == str(tmp_path / backend)
    assert first["files"], "no compiled executable was written to the cache"
    second = _probe(repo_root, tmp_path, env)
    assert second["files"] == first["files"]  # everything was found; nothing compiled anew
    assert second["loss"] == first["loss"]
