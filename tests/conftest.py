"""Shared pytest fixtures and session set-up (additive: append, don't rewrite)."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One directory per suite's backend: tests/run_all.sh runs the JAX and TensorFlow suites side by
# side, and each suite's processes (subprocesses of the other backend included) write only its own.
_SUITE = os.environ.get("KERAS_BACKEND", "default")
# A persistent XLA compilation cache for JAX: tiny test models still cost one XLA compile per
# initializer shape and per train step; identical programs across tests (and across test runs)
# are then compiled once. Must be set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "keras_etsdm_tests_jax", _SUITE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# bin/ scripts run by tests keep their XLA caches (keras_etsdm/compilation_cache.py) apart from
# a user's own.
os.environ.setdefault("KERAS_ETSDM_COMPILATION_CACHE", os.path.join(
    os.path.expanduser("~"), ".cache", "keras_etsdm_tests_xla", _SUITE))


def _tune_xla_like_bin():
    """The XLA CPU flag the bin/ entry points set at start-up, before any test imports JAX (the
    package itself no longer touches XLA_FLAGS on import), so tests run what bin/train runs."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "keras_etsdm", "cpu_tuning.py")
    spec = importlib.util.spec_from_file_location("_conftest_cpu_tuning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tune_xla_for_cpu()


_tune_xla_like_bin()


@pytest.fixture(scope="session")
def repo_root():
    """Absolute path of the repository (bin/, gin/ live here)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for running bin/ scripts or helper processes from tests (same backend)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def python_executable():
    return sys.executable
