"""``backend.release_build_memory`` (issue 19 item 5, peak memory): what building a model leaves
behind is given back before training, and the model trains on unchanged.

Run in a fresh process per test: dropping JAX's caches inside the test process would make
every other test recompile its shared models."""

import json
import os
import subprocess
import sys

import pytest

from keras_etsdm import cpu_tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import numpy as np
import keras
from keras_etsdm import DiffusionModel, backend, build_unet


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


start = rss_mib()
keras.utils.set_random_seed(0)
network = build_unet(image_size=16, channels=1, base_channels=8, channel_mult=(1, 2, 3, 4, 5),
                     num_res_blocks=2, attention_resolutions=(), dropout=0.0)
model = DiffusionModel(network, seed=0)
model.compile(optimizer=keras.optimizers.Adam(1e-3))
built = rss_mib()
x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype("float32")
t = np.full((4,), 537.0, "float32")  # 537: outside the sharing pieces, any label works
before = keras.ops.convert_to_numpy(model.denoise(x, t))
backend.release_build_memory()
released = rss_mib()
after = keras.ops.convert_to_numpy(model.denoise(x, t))
loss = float(model.train_on_batch(x))
print("RESULT " + json.dumps({"start": start, "built": built, "released": released,
                              "same": bool(np.array_equal(before, after)),
                              "loss_finite": bool(np.isfinite(loss)),
                              "backend": keras.backend.backend()}))
"""


def run_script():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_trim_heap_on_glibc():
    trimmed = cpu_tuning.trim_heap()
    assert trimmed == (cpu_tuning._glibc_version() is not None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_build_memory_gives_back_memory_and_keeps_the_model():
    result = run_script()
    # The model is the same model afterwards: same output, and it trains.
    assert result["same"] and result["loss_finite"]
    growth = result["built"] - result["start"]
    given_back = result["built"] - result["released"]
    if result["backend"] == "jax" and cpu_tuning._glibc_version() is not None:
        # Every initializer of a new shape is a compiled program kept in JAX's caches, ~2-3.5
        # MiB of host memory each; the weights themselves are < 1 MiB here. Measured on the
        # AVX2 development machine (benchmarks/results/avx2/jax_compile/build_memory.txt):
        # building cost 841-850 MiB and 219-224 came back while the EMA's copies were compiled
        # too; since they are not (backend.copy_initializer), 703-704 MiB and 90-93 come back.
        assert given_back > 40, result
        assert growth > given_back, result


# ----- backend.compile_then_release: compile, give the compiler's memory back, then run ----------
jax_only = pytest.mark.skipif(
    __import__("keras").backend.backend() != "jax", reason="JAX's jitted steps only")


class _Counts:
    def __init__(self, monkeypatch):
        import jax

        self.compiles = 0
        self.trims = 0
        # public jax.monitoring event, one per XLA backend compile
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        monkeypatch.setattr(cpu_tuning, "trim_heap", self._trim)

    def close(self):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1

    def _trim(self):
        self.trims += 1
        return True


@pytest.fixture
def counts(monkeypatch):
    """Counts XLA compiles and heap trims from the moment it is requested."""
    counter = _Counts(monkeypatch)
    yield counter
    counter.close()


@jax_only
def test_compile_then_release_compiles_once_trims_once_and_keeps_donation(request):
    import jax
    import jax.numpy as jnp

    from keras_etsdm import backend

    def step(state, data):
        return state * 2.0 + jnp.sum(data), data + 1.0

    wrapped = backend.compile_then_release(jax.jit(step, donate_argnums=0))
    data = jnp.arange(6.0).reshape(2, 3)
    state = jnp.ones(3)
    counts = request.getfixturevalue("counts")  # counting starts here
    first = wrapped(state, data)
    assert (counts.compiles, counts.trims) == (1, 1)  # the run reused the compiled program
    assert state.is_deleted()  # donation as the jitted step had it
    wrapped(jnp.ones(3), data)
    assert (counts.compiles, counts.trims) == (1, 1)
    for got, want in zip(first, step(jnp.ones(3), data)):  # the same numbers as the step
        assert jnp.array_equal(got, want)


@jax_only
def test_compile_then_release_switch_off_and_non_jitted(monkeypatch, request):
    import jax
    import jax.numpy as jnp

    from keras_etsdm import backend

    def step(x):
        return x + 3.0

    assert backend.compile_then_release(step) is step  # nothing to lower: unchanged
    monkeypatch.setattr(backend, "RELEASE_COMPILER_MEMORY", False)
    wrapped = backend.compile_then_release(jax.jit(step))
    counts = request.getfixturevalue("counts")  # counting starts here
    assert float(wrapped(jnp.float32(1.0))) == 4.0
    assert (counts.compiles, counts.trims) == (1, 0)


# ----- backend.with_train_compiler_options: the training step's own XLA options ----------------
def _one_training_step(seed=0):
    """A tiny model's loss and weights after one ``train_on_batch`` (the model, for its step)."""
    import keras
    import numpy as np

    from keras_etsdm import DiffusionModel, build_unet

    keras.utils.set_random_seed(seed)
    network = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    model = DiffusionModel(network, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(seed).uniform(-1, 1, (2, 8, 8, 1)).astype("float32")
    loss = float(model.train_on_batch(x))
    return model, loss, [keras.ops.convert_to_numpy(w) for w in network.weights]


@jax_only
def test_training_step_is_jitted_with_the_chosen_compiler_options(monkeypatch):
    import jax
    import numpy as np

    jits = []
    real_jit = jax.jit

    def spy(fun, **kwargs):
        jits.append((fun, kwargs))
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(jax, "jit", spy)  # Keras's trainer holds its own reference to jax.jit
    monkeypatch.delenv(cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE, raising=False)
    _one_training_step()
    assert not [kwargs for _, kwargs in jits if "compiler_options" in kwargs]  # default: XLA's
    monkeypatch.setenv(cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE, "1")
    jits.clear()
    model, loss_1, weights_1 = _one_training_step()
    ours = [(fun, kwargs) for fun, kwargs in jits if "compiler_options" in kwargs]
    assert len(ours) == 1  # the training step only (not the test step, not the samplers)
    fun, kwargs = ours[0]
    assert fun == model.train_step
    assert kwargs == {"donate_argnums": 0,
                      "compiler_options": {"xla_backend_optimization_level": 1}}
    # The same step at XLA's default level: LLVM's level changes the machine code, not the math
    # (up to float32 rounding where LLVM contracts or reorders differently).
    monkeypatch.setenv(cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE, "3")
    _, loss_3, weights_3 = _one_training_step()
    np.testing.assert_allclose(loss_1, loss_3, rtol=1e-5)
    for w1, w3 in zip(weights_1, weights_3):
        np.testing.assert_allclose(w1, w3, rtol=1e-5, atol=1e-6)


@jax_only
def test_with_train_compiler_options_leaves_other_steps_alone(monkeypatch):
    import jax

    from keras_etsdm import backend

    def train_step(state, data):
        return state + data

    def other_step(state, data):
        return state - data

    jitted = jax.jit(other_step, donate_argnums=0)
    monkeypatch.setenv(cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE, "1")
    assert backend.with_train_compiler_options(jitted, train_step) is jitted  # not the step
    assert backend.with_train_compiler_options(other_step, other_step) is other_step  # not jitted
    rejitted = backend.with_train_compiler_options(jitted, other_step)
    assert rejitted is not jitted and float(rejitted(1.0, 2.0)) == -1.0
    monkeypatch.setattr(cpu_tuning, "jax_train_compiler_options", lambda: {})
    assert backend.with_train_compiler_options(jitted, other_step) is jitted  # no options


def _trims_of_a_model_life(trims):
    """Trains twice, tests, samples twice with a tiny model; ``trims()`` (the heap trims counted
    so far) after the first training step, after the test step and after sampling."""
    import keras
    import numpy as np

    from keras_etsdm import DiffusionModel, build_unet
    from keras_etsdm.samplers import DDIMSampler

    keras.utils.set_random_seed(0)
    network = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    model = DiffusionModel(network, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    start = trims()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype("float32")
    assert np.isfinite(float(model.train_on_batch(x)))
    counted = [trims() - start]
    model.train_on_batch(x)
    model.test_on_batch(x)
    counted.append(trims() - start)
    sampler = DDIMSampler(num_steps=2, schedule=model.schedule)
    for _ in range(2):
        samples = keras.ops.convert_to_numpy(sampler.sample(model, x))
    assert np.all(np.isfinite(samples))
    counted.append(trims() - start)
    return counted


@jax_only
def test_diffusion_model_steps_go_through_compile_then_release(request):
    counts = request.getfixturevalue("counts")
    # once for the training step, once for the test step, once for the sampling loop
    assert _trims_of_a_model_life(lambda: counts.trims) == [1, 2, 3]


# ----- backend.run_then_release: TensorFlow gives the freed memory back after the first call ----
tensorflow_only = pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow", reason="TensorFlow's steps only")


@pytest.fixture
def trims(monkeypatch):
    """Counts heap trims from the moment it is requested: ``[count]``."""
    count = [0]

    def trim():
        count[0] += 1
        return True

    monkeypatch.setattr(cpu_tuning, "trim_heap", trim)
    return count


@tensorflow_only
def test_run_then_release_trims_once_after_the_first_call(monkeypatch):
    import numpy as np
    import tensorflow as tf

    from keras_etsdm import backend

    log = []

    def step(x, y=None):
        log.append("trace")  # Python side effect: runs while tracing only
        return x * 2.0 + tf.reduce_sum(x) + (0.0 if y is None else y)

    wrapped = backend.run_then_release(tf.function(step))
    monkeypatch.setattr(cpu_tuning, "trim_heap", lambda: log.append("trim") or True)
    x = tf.constant([1.0, 2.0, 3.0])
    first = wrapped(x, y=1.0)
    assert log == ["trace", "trim"]  # traced and run, then trimmed
    np.testing.assert_array_equal(first.numpy(), [9.0, 11.0, 13.0])
    np.testing.assert_array_equal(wrapped(x, y=1.0).numpy(), first.numpy())
    assert log == ["trace", "trim"]  # later calls: no trace, no trim


@tensorflow_only
def test_run_then_release_switch_off(monkeypatch, request):
    import tensorflow as tf

    from keras_etsdm import backend

    monkeypatch.setattr(backend, "RELEASE_COMPILER_MEMORY", False)
    wrapped = backend.run_then_release(tf.function(lambda x: x + 3.0))
    trims = request.getfixturevalue("trims")
    assert float(wrapped(tf.constant(1.0))) == 4.0
    assert trims[0] == 0


@jax_only
def test_run_then_release_leaves_other_backends_alone():
    from keras_etsdm import backend

    def step(x):
        return x

    assert backend.run_then_release(step) is step


@tensorflow_only
def test_diffusion_model_steps_go_through_run_then_release(request):
    trims = request.getfixturevalue("trims")
    # once for the training step, once for the test step, once for the sampling loop
    assert _trims_of_a_model_life(lambda: trims[0]) == [1, 2, 3]
