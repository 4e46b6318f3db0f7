"""tests/run_all.sh, the README's test command: both backends' suites run, and the exit status
fails when either fails (side by side, or one after the other with KERAS_ETSDM_TESTS_SERIAL=1)."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A suite that passes on JAX and fails on TensorFlow (no keras import: seconds, not minutes).
SUITE = '''
import os

def test_runs_under_one_of_the_two_backends():
    assert os.environ["KERAS_BACKEND"] in ("jax", "tensorflow")

def test_fails_on_tensorflow_only():
    assert os.environ["KERAS_BACKEND"] != "tensorflow"
'''


def _run_all(tmp_path, serial):
    (tmp_path / "test_probe.py").write_text(SUITE)
    env = dict(os.environ, KERAS_ETSDM_TESTS_SERIAL="1" if serial else "0")
    env.pop("KERAS_BACKEND", None)
    return subprocess.run(["bash", os.path.join(REPO, "tests", "run_all.sh"),
                           str(tmp_path / "test_probe.py")],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("serial", [False, True], ids=["side_by_side", "serial"])
def test_either_backend_failing_fails_the_run(tmp_path, serial):
    out = _run_all(tmp_path, serial)
    assert out.returncode == 1, out.stdout + out.stderr
    if serial:
        assert "=== KERAS_BACKEND=jax ===" in out.stdout
        assert "=== KERAS_BACKEND=tensorflow ===" in out.stdout
        assert "1 failed, 1 passed" in out.stdout and "2 passed" in out.stdout
    else:
        assert "KERAS_BACKEND=jax: exit 0; 2 passed" in out.stdout
        assert "KERAS_BACKEND=tensorflow: exit 1; 1 failed, 1 passed" in out.stdout
        # the two runs' output lines are prefixed with their backend
        assert "[tensorflow] FAILED" in out.stdout and "[jax] " in out.stdout
