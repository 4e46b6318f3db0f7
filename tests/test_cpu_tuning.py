"""The start-up re-exec with glibc's huge-page malloc tunable (keras_etsdm/cpu_tuning.py)."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from keras_etsdm import cpu_tuning
from keras_etsdm.cpu_tuning import HUGETLB_TUNABLE, tuned_environ, tuned_xla_flags

# backend / cpu_flags fixed: the tests do not depend on this machine's ISA or KERAS_BACKEND
LINUX = dict(system="linux", glibc=(2, 36), thp_mode="madvise", backend="tensorflow",
             cpu_flags={"avx2", "fma", "avx512f"})
RETAIN = cpu_tuning.RETAIN_TUNABLES
RETAIN_TWO = cpu_tuning.RETAIN_TUNABLES_TWO_ARENAS


def test_adds_the_tunable_on_linux_glibc_with_thp_madvise():
    env = {"PATH": "/bin"}
    new = tuned_environ(env, **LINUX)
    assert new == {"PATH": "/bin", "GLIBC_TUNABLES": HUGETLB_TUNABLE}
    assert env == {"PATH": "/bin"}  # the input is not modified


def test_appends_to_existing_tunables_and_respects_a_given_hugetlb():
    new = tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert new["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"
    assert tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None
    # After the re-exec the tunable is set, so there is no second re-exec.
    assert tuned_environ(new, **LINUX) is None


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_opt_out(value):
    assert tuned_environ({cpu_tuning.OPT_OUT_VARIABLE: value}, **LINUX) is None


@pytest.mark.parametrize("override", [dict(system="darwin"), dict(glibc=(2, 34)),
                                      dict(thp_mode="never"), dict(thp_mode="always")])
def test_nothing_to_gain(override):
    assert tuned_environ({}, **{**LINUX, **override}) is None


def test_jax_on_avx2_and_avx512_keeps_freed_memory_on_small_pages():
    # measured on both ISAs (benchmarks/results/avx2 for AVX2), so both get it: with two
    # malloc arenas on AVX2, one on AVX-512 (each as measured there)
    for flags, ours in (({"avx2", "fma"}, RETAIN_TWO), ({"avx2", "fma", "avx512f"}, RETAIN)):
        assert tuned_environ({"JAX_PLATFORMS": "cpu"}, **{**LINUX, "backend": "jax",
                                                          "cpu_flags": flags}) == {
            "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": ours}
        assert cpu_tuning.jax_memory_tunings_apply(flags)
    assert not cpu_tuning.jax_memory_tunings_apply({"sse4_2", "avx"})
    assert not cpu_tuning.jax_memory_tunings_apply({"asimd", "sve"})  # aarch64: not measured

    jax = {**LINUX, "backend": "jax"}
    new = tuned_environ({"JAX_PLATFORMS": "cpu"}, **jax)
    # no huge-page tunable: khugepaged would fill in the heap's trimmed pages (item 4)
    assert new["GLIBC_TUNABLES"] == RETAIN
    assert RETAIN == ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                      "glibc.malloc.trim_threshold=17179869184")
    # after the re-exec nothing more: the retaining tunables are now the "user's" malloc
    # setting, and they still keep the huge-page tunable out
    assert tuned_environ(new, **jax) is None
    # a huge-page setting of the user's is kept beside them
    new = tuned_environ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": HUGETLB_TUNABLE}, **jax)
    assert new["GLIBC_TUNABLES"] == f"{HUGETLB_TUNABLE}:{RETAIN}"
    # THP "always" or a glibc older than 2.35 (2.26 has the retaining tunables): the same
    assert tuned_environ({"JAX_PLATFORMS": "cpu"}, **{**jax, "thp_mode": "always"}) == {
        "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": RETAIN}
    assert tuned_environ({"JAX_PLATFORMS": "cpu"}, **{**jax, "glibc": (2, 31)}) == {
        "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": RETAIN}
    assert tuned_environ({"JAX_PLATFORMS": "cpu"}, **{**jax, "glibc": (2, 25),
                                                      "thp_mode": "always"}) is None


def test_two_malloc_arenas_on_avx2_one_on_avx512():
    assert RETAIN_TWO == ("glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:"
                          "glibc.malloc.trim_threshold=17179869184")
    assert cpu_tuning.retain_tunables({"avx2", "fma"}) == RETAIN_TWO
    assert cpu_tuning.retain_tunables({"avx2", "fma", "avx512f", "avx512_bf16"}) == RETAIN
    jax_avx2 = {**LINUX, "backend": "jax", "cpu_flags": {"avx2", "fma"}}
    new = tuned_environ({"JAX_PLATFORMS": "cpu"}, **jax_avx2)
    assert new["GLIBC_TUNABLES"] == RETAIN_TWO
    # after the re-exec nothing more: no second re-exec and no huge-page tunable beside them
    assert tuned_environ(new, **jax_avx2) is None
    # a huge-page setting of the user's is kept beside them, as with one arena
    new = tuned_environ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": HUGETLB_TUNABLE}, **jax_avx2)
    assert new["GLIBC_TUNABLES"] == f"{HUGETLB_TUNABLE}:{RETAIN_TWO}"


@pytest.mark.parametrize("override", [dict(backend="tensorflow"), dict(backend="torch"),
                                      dict(cpu_flags={"sse4_2"}), dict(cpu_flags={"asimd"})])
def test_keeping_freed_memory_only_for_jax_on_avx2_or_avx512(override):
    new = tuned_environ({"JAX_PLATFORMS": "cpu"}, **{**LINUX, "backend": "jax", **override})
    assert new["GLIBC_TUNABLES"] == HUGETLB_TUNABLE


def test_keeping_freed_memory_not_on_accelerators_nor_over_the_users_malloc():
    jax = {**LINUX, "backend": "jax"}
    assert tuned_environ({"JAX_PLATFORMS": "cuda"}, **jax)["GLIBC_TUNABLES"] == HUGETLB_TUNABLE
    for users in ("glibc.malloc.arena_max=4", "glibc.malloc.mmap_max=65536",
                  "glibc.malloc.trim_threshold=1048576", "glibc.malloc.mmap_threshold=1048576"):
        new = tuned_environ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": users}, **jax)
        assert new["GLIBC_TUNABLES"] == f"{users}:{HUGETLB_TUNABLE}"
    # item 4 alone turned off: huge pages stay, no malloc setting of ours
    for off in ("0", "false", "no"):
        new = tuned_environ({"JAX_PLATFORMS": "cpu", cpu_tuning.RETAIN_OPT_OUT_VARIABLE: off},
                            **jax)
        assert new["GLIBC_TUNABLES"] == HUGETLB_TUNABLE
    assert cpu_tuning.RETAIN_TUNABLES in tuned_environ(
        {"JAX_PLATFORMS": "cpu", cpu_tuning.RETAIN_OPT_OUT_VARIABLE: "1"}, **jax)["GLIBC_TUNABLES"]
    # the backend as Keras chooses it, from the environment
    assert cpu_tuning.retains_freed_memory({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
                                           cpu_flags={"avx512f"})
    assert not cpu_tuning.retains_freed_memory(
        {"KERAS_BACKEND": "tensorflow", "JAX_PLATFORMS": "cpu"}, cpu_flags={"avx512f"})


def test_thp_mode_parses_the_sysfs_file(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert cpu_tuning._thp_mode(str(path)) == "madvise"
    assert cpu_tuning._thp_mode(str(tmp_path / "missing")) is None


def test_bin_startup_reexecs_once_with_the_same_arguments(repo_root, tmp_path):
    expected = tuned_environ(os.environ)
    if expected is None:
        pytest.skip("this machine gains nothing from the tunable (not glibc ≥ 2.35 + THP madvise)")
    script = tmp_path / "entry"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.join(str(repo_root), 'bin')!r})\n"
        "print('start', os.getpid(), flush=True)\n"
        "import _startup\n"
        "_startup.tune_malloc()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n")
    out = subprocess.run([sys.executable, "-u", str(script), "--flag=1"], capture_output=True,
                         text=True, check=True, timeout=60).stdout.splitlines()
    starts = [line for line in out if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # ran twice, same PID (exec)
    assert out[-1] == f"tunables {expected['GLIBC_TUNABLES']} ['--flag=1']"


# ----- XLA_FLAGS for JAX on CPU -----------------------------------------------------------------
AVX2 = {"avx2", "fma"}
AVX512 = {"avx2", "fma", "avx512f", "avx512_bf16"}
OLDER = {"sse4_2", "avx"}  # no AVX2: the YNN flag only


def test_xla_flag_added_for_jaxlib_0_10_and_kept_with_other_flags():
    flag = cpu_tuning.JAX_XLA_CPU_FLAG
    assert tuned_xla_flags({}, jaxlib_version=(0, 10), cpu_flags=OLDER) == flag
    assert tuned_xla_flags({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, jaxlib_version=(0, 10, 2),
                           cpu_flags=OLDER) == f"--xla_dump_to=/tmp/x {flag}"


def test_scheduler_flag_only_on_avx2_or_avx512_and_never_over_the_users_choice():
    """XLA's concurrency-optimized scheduler goes off only where it was measured (AVX-512, and
    with the other JAX memory tunings AVX2); a scheduler or YNN setting of the user's stays,
    the other flag is still added."""
    ynn, scheduler = cpu_tuning.JAX_XLA_CPU_FLAG, cpu_tuning.JAX_XLA_SCHEDULER_FLAG
    assert tuned_xla_flags({}, jaxlib_version=(0, 10), cpu_flags=AVX512) == f"{ynn} {scheduler}"
    assert tuned_xla_flags({}, jaxlib_version=(0, 10), cpu_flags=AVX2) == f"{ynn} {scheduler}"
    assert tuned_xla_flags({}, jaxlib_version=(0, 10), cpu_flags=OLDER) == ynn
    assert tuned_xla_flags({}, jaxlib_version=(0, 10), cpu_flags=set()) == ynn  # not Linux
    user = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert tuned_xla_flags({"XLA_FLAGS": user}, jaxlib_version=(0, 10), cpu_flags=AVX512) == \
        f"{user} {ynn}"
    user_ynn = "--xla_cpu_experimental_ynn_fusion_type=+dot"
    assert tuned_xla_flags({"XLA_FLAGS": user_ynn}, jaxlib_version=(0, 10),
                           cpu_flags=AVX512) == f"{user_ynn} {scheduler}"
    assert tuned_xla_flags({"XLA_FLAGS": f"{user_ynn} {user}"}, jaxlib_version=(0, 10),
                           cpu_flags=AVX512) is None
    assert tuned_xla_flags({OPT_OUT: "0"}, jaxlib_version=(0, 10), cpu_flags=AVX512) is None
    assert tuned_xla_flags({}, jaxlib_version=(0, 11), cpu_flags=AVX512) is None


@pytest.mark.parametrize("environ,version", [
    ({}, (0, 9)), ({}, (0, 11)), ({}, None),  # releases not known to have the flag
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+dot"}, (0, 10)),  # user's choice
    ({cpu_tuning.OPT_OUT_VARIABLE: "0"}, (0, 10)),
])
def test_xla_flag_left_alone(environ, version, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_jaxlib_version", lambda: None)
    assert tuned_xla_flags(environ, jaxlib_version=version, cpu_flags=OLDER) is None


@pytest.mark.parametrize("flags,enabled", [
    ("", True),
    (cpu_tuning.JAX_XLA_CPU_FLAG, False),
    ("--xla_cpu_experimental_ynn_fusion_type=+dot", True),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise", False),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),
])
def test_ynn_convolutions_enabled_reads_the_flag(flags, enabled):
    assert cpu_tuning.ynn_convolutions_enabled(flags) is enabled


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT)}
    env.update(extra)
    return env


OPT_OUT = cpu_tuning.OPT_OUT_VARIABLE


def test_importing_the_package_leaves_xla_flags_alone():
    code = "import os, keras_etsdm; print(repr(os.environ.get('XLA_FLAGS')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=_clean_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None"


@pytest.mark.skipif(tuned_xla_flags({}) is None, reason="jaxlib without the flag")
def test_explicit_tuning_before_jax_starts_and_a_warning_after():
    code = textwrap.dedent("""
        import os, warnings
        from keras_etsdm import cpu_tuning
        print(cpu_tuning.tune_xla_for_cpu(), os.environ.get("XLA_FLAGS"))
        del os.environ["XLA_FLAGS"]
        import jax
        jax.numpy.ones(2).block_until_ready()   # JAX has started: XLA_FLAGS are now fixed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(cpu_tuning.tune_xla_for_cpu(), os.environ.get("XLA_FLAGS"),
                  [str(w.message)[:80] for w in caught])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=_clean_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == f"True {tuned_xla_flags({})}"  # this machine's flags (ISA-dependent)
    assert after.startswith("False None [") and "JAX has already started" in after


@pytest.mark.parametrize("environ,expected", [
    ({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}, True),
    ({"KERAS_BACKEND": "tensorflow", "JAX_PLATFORMS": "cpu"}, False),
    ({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cuda"}, False),    # never touch GPU runs
    ({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "tpu,cpu"}, False),
    ({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", OPT_OUT: "0"}, False),
])
def test_jax_xla_environ_only_for_jax_on_cpu(environ, expected):
    new = cpu_tuning.jax_xla_environ(environ)
    if not expected:
        assert new is None
    elif tuned_xla_flags({}) is not None:
        assert new["XLA_FLAGS"] == tuned_xla_flags({}) and "XLA_FLAGS" not in environ
        assert cpu_tuning.JAX_XLA_CPU_FLAG in new["XLA_FLAGS"]


SYNC = cpu_tuning.SYNC_DISPATCH_VARIABLE
JAX_CPU = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}


def test_sync_dispatch_asked_for_on_avx2_or_avx512_and_never_over_the_users_choice():
    avx512, avx2, older = {"avx2", "avx512f"}, AVX2, OLDER
    assert cpu_tuning.jax_xla_environ(JAX_CPU, cpu_flags=avx512)[SYNC] == "1"
    assert cpu_tuning.jax_xla_environ(JAX_CPU, cpu_flags=avx2)[SYNC] == "1"
    assert SYNC not in (cpu_tuning.jax_xla_environ(JAX_CPU, cpu_flags=older) or {})
    # the user's value is kept either way, and it decides on any CPU
    for value in ("0", "1"):
        new = cpu_tuning.jax_xla_environ({**JAX_CPU, SYNC: value}, cpu_flags=avx512) or {}
        assert new.get(SYNC, value) == value
    assert cpu_tuning.wants_sync_dispatch({SYNC: "1"}, cpu_flags=older)
    assert not cpu_tuning.wants_sync_dispatch({SYNC: "off"}, cpu_flags=avx512)
    assert not cpu_tuning.wants_sync_dispatch({OPT_OUT: "0"}, cpu_flags=avx512)
    # never for TensorFlow processes or accelerator runs
    assert cpu_tuning.jax_xla_environ({**JAX_CPU, "KERAS_BACKEND": "tensorflow"},
                                      cpu_flags=avx512) is None
    assert cpu_tuning.jax_xla_environ({**JAX_CPU, "JAX_PLATFORMS": "cuda"},
                                      cpu_flags=avx512) is None


_FREES_BEFORE_RETURN = textwrap.dedent("""
    import ctypes, os
    import numpy as np
    import keras_etsdm  # applies KERAS_ETSDM_JAX_SYNC_DISPATCH on import
    import jax
    import jax.numpy as jnp

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2

    def in_use_mib():  # heap blocks in use plus mmap'ed ones
        m = mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20

    @jax.jit
    def step(x):  # one 256 MiB temporary (XLA's buffer assignment), a scalar result
        y = jnp.tanh(x[:, None] * x[None, :])
        return (y @ y[:, :8]).sum()

    x = jnp.asarray(np.random.default_rng(0).random(8192, dtype=np.float32))
    temp_mib = step.lower(x).compile().memory_analysis().temp_size_in_bytes / 2**20
    float(step(x))
    base = in_use_mib()
    held = []
    for _ in range(20):
        float(step(x))  # the result is on the host: the step has finished
        held.append(in_use_mib() - base)
    print(jax.config.values["jax_cpu_enable_async_dispatch"], round(temp_mib),
          round(max(held), 1))
""")


@pytest.mark.skipif(cpu_tuning._glibc_version() is None
                    or cpu_tuning._glibc_version() < (2, 33), reason="needs glibc's mallinfo2")
def test_sync_dispatch_frees_a_step_s_temporaries_before_it_returns():
    # With the retaining malloc JAX gets on AVX-512 (item 4) every block is on the one heap, and
    # with asynchronous dispatch this check saw the block still held after some of the calls.
    env = {k: v for k, v in os.environ.items() if k != SYNC}
    env.update(JAX_CPU, **{SYNC: "1"}, TF_CPP_MIN_LOG_LEVEL="2",
               GLIBC_TUNABLES=cpu_tuning.RETAIN_TUNABLES)
    out = subprocess.run([sys.executable, "-c", _FREES_BEFORE_RETURN], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    async_dispatch, temp_mib, held_mib = out.stdout.split()[-3:]
    assert async_dispatch == "False" and int(temp_mib) >= 250
    # after every one of 20 calls the 256 MiB block had been freed before the call returned
    assert float(held_mib) < 8, out.stdout


def test_sync_dispatch_warns_once_jax_has_started():
    code = textwrap.dedent("""
        import os, warnings
        import jax
        jax.numpy.ones(2).block_until_ready()   # JAX's CPU client exists now
        from keras_etsdm import cpu_tuning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            applied = cpu_tuning.apply_sync_dispatch({cpu_tuning.SYNC_DISPATCH_VARIABLE: "1"})
        print(applied, jax.config.values["jax_cpu_enable_async_dispatch"],
              any("already created its backends" in str(w.message) for w in caught))
        print(cpu_tuning.apply_sync_dispatch({}), cpu_tuning.apply_sync_dispatch(
            {cpu_tuning.SYNC_DISPATCH_VARIABLE: "0"}))
    """)
    env = {k: v for k, v in os.environ.items() if k != SYNC}
    env.update(JAX_CPU, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["False True True", "False False"]


def test_keras_backend_as_keras_chooses_it(tmp_path):
    assert cpu_tuning.keras_backend({"KERAS_BACKEND": "jax"}) == "jax"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert cpu_tuning.keras_backend({"KERAS_HOME": str(tmp_path)}) == "jax"
    assert cpu_tuning.keras_backend({"KERAS_HOME": str(tmp_path / "none")}) == "tensorflow"


def test_jax_train_compiler_options_default_and_override():
    options = cpu_tuning.jax_train_compiler_options
    level = cpu_tuning.OPT_LEVEL_OPTION
    assert level == "xla_backend_optimization_level"
    variable = cpu_tuning.TRAIN_OPT_LEVEL_VARIABLE
    # auto / unset: XLA's defaults (level 1 measured slower per step on AVX2)
    assert options({}) == {}
    assert options({variable: " Auto "}) == {}
    for value in ("0", "1", "2", "3"):
        assert options({variable: value}) == {level: int(value)}
    for bad in ("4", "-1", "fast", ""):
        with pytest.raises(ValueError, match="KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL must be 0, 1, 2, 3"):
            options({variable: bad})


def test_jax_winograd_training_choice_per_isa():
    """Winograd convolutions in JAX's training step by default only where measured to pay: AVX2
    without AVX-512 (benchmarks/results/avx2/winograd); AVX-512 (1.13×) and unknown CPUs keep
    the direct form."""
    assert cpu_tuning.jax_winograd_training({"avx2", "fma"}) is True
    assert cpu_tuning.jax_winograd_training({"avx2", "fma", "avx512f", "avx512_bf16"}) is False
    assert cpu_tuning.jax_winograd_training(set()) is False
    assert cpu_tuning.jax_winograd_training({"neon"}) is False


def test_tensorflow_jit_choice_per_isa(tmp_path):
    """XLA for TensorFlow's training step off AVX-512; TensorFlow's own graph on AVX-512, where
    it was measured faster (benchmarks/results/bin_train_speed_tf_xla_vs_onednn)."""
    assert cpu_tuning.tensorflow_train_jit_compile({"avx2", "fma"}) is True
    assert cpu_tuning.tensorflow_train_jit_compile({"avx2", "avx512f", "avx512_bf16"}) is False
    assert cpu_tuning.tensorflow_train_jit_compile(set()) is True  # unknown CPU: XLA as before
    # Sampling loops follow the same rule (vs_diffusers_avx512/sample_tf_xla_vs_graph.md).
    assert cpu_tuning.tensorflow_sample_jit_compile({"avx2", "fma"}) is True
    assert cpu_tuning.tensorflow_sample_jit_compile({"avx2", "avx512f"}) is False
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake\nflags\t\t: fpu avx2 avx512f\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_tuning.cpu_isa_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512f"}
    assert cpu_tuning.cpu_isa_flags(str(tmp_path / "missing")) == set()


def test_sample_jit_compile_environment_override():
    """``KERAS_ETSDM_SAMPLE_JIT_COMPILE`` forces the sampling loops' compile mode; anything but
    1 / 0 / true / false / auto is refused with the variable's name."""
    from keras_etsdm import backend

    name = backend.SAMPLE_JIT_VARIABLE
    tensorflow = keras.backend.backend() == "tensorflow"
    assert backend.default_sample_jit_compile({name: "1"}) is True
    # JAX always jits: only TensorFlow has a choice.
    assert backend.default_sample_jit_compile({name: "false"}) is (not tensorflow)
    auto = backend.default_sample_jit_compile({})
    assert backend.default_sample_jit_compile({name: "auto"}) is auto
    if not tensorflow:
        assert auto is True
    with pytest.raises(ValueError, match=name):
        backend.default_sample_jit_compile({name: "maybe"})


def test_sample_jit_compile_uses_xla_for_networks_with_winograd_convolutions(monkeypatch):
    """On a CPU, TensorFlow's sampling loops use XLA for a network with 3×3 convolutions of
    ≥ 128 channels (XLA runs them by Winograd's algorithm), else the per-ISA rule; the
    environment still forces either mode."""
    from keras_etsdm import backend, winograd

    wide = keras.Sequential([keras.Input((8, 8, 128)), keras.layers.Conv2D(128, 3)])
    narrow = keras.Sequential([keras.Input((8, 8, 64)), keras.layers.Conv2D(64, 3),
                               keras.layers.Conv2D(128, 1)])
    assert winograd.network_uses_it(wide) and not winograd.network_uses_it(narrow)
    name = backend.SAMPLE_JIT_VARIABLE
    if keras.backend.backend() != "tensorflow":
        assert backend.default_sample_jit_compile({}, network=narrow) is True
        return
    monkeypatch.setattr(backend, "_tensorflow_sees_an_accelerator", lambda: False)
    isa_rule = cpu_tuning.tensorflow_sample_jit_compile()
    assert backend.default_sample_jit_compile({}, network=wide) is True
    assert backend.default_sample_jit_compile({}, network=narrow) is isa_rule
    assert backend.default_sample_jit_compile({}) is isa_rule
    assert backend.default_sample_jit_compile({name: "0"}, network=wide) is False
    monkeypatch.setattr(winograd, "WINOGRAD", False)
    assert backend.default_sample_jit_compile({}, network=wide) is isa_rule
