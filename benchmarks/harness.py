"""Shared machinery of the benchmarks: worker subprocesses taking turns, statistics, matmul rates.

The Keras backend is fixed when keras is imported, so every framework runs in its own worker
process. The parent starts all workers, lets each build and warm up, and then runs ROUNDS: in
each round every worker runs one timed repeat, in a random order drawn afresh for every round
(``round_orders``, seeded), so that slow drifts of the machine (other load, thermal state) hit
every framework alike and no framework systematically runs first or right after a given other
one. Workers wait idle while another runs. Two frameworks measured in the same round form a pair:
``paired_ratio_ci`` gives the median over rounds of their per-round ratio with a percentile
bootstrap interval that resamples rounds, and ``goal_status`` reads a goal off that interval.

Protocol: the parent writes one JSON object per line to a worker's stdin; the worker answers
with one line ``@@BENCH <json>`` on stdout (everything else a library prints is ignored).
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

RESULT_PREFIX = "@@BENCH "


# ----- statistics ---------------------------------------------------------------------------
def summarize(values):
    """Median, inter-quartile range and count of repeated measurements (seconds, rates...)."""
    values = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(q50), "iqr": float(q75 - q25), "n": int(values.size),
            "min": float(values.min()), "max": float(values.max())}


def round_orders(names, rounds, seed=0):
    """The worker order of each of ``rounds`` rounds: independent uniformly random permutations
    of ``names`` (so consecutive rounds may repeat an order), reproducible from ``seed``."""
    names = list(names)
    rng = np.random.default_rng(seed)
    return [[names[i] for i in rng.permutation(len(names))] for _ in range(rounds)]


def paired_ratio_ci(numerator, denominator, num_resamples=10000, confidence=0.95, seed=0):
    """Median over rounds of ``numerator[r] / denominator[r]`` with a bootstrap interval.

    ``numerator`` and ``denominator`` are per-round measurements (rates such as images/s) of two
    frameworks taken in the same rounds, so round r of one is paired with round r of the other
    and whatever slowed the machine in that round largely cancels in their ratio. The interval
    is the percentile bootstrap: ``num_resamples`` times, draw n rounds with replacement, take
    the median of their ratios; the interval is the central ``confidence`` part of those
    medians. With few rounds it is coarse (the bootstrap median of n values takes at most n
    distinct values) and, like any percentile bootstrap of a median, only approximately
    ``confidence``. Returns ``{"ratio", "low", "high", "n", "confidence", "per_round"}`` plus
    ``num_resamples``.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.ndim != 1 or den.ndim != 1:
        raise ValueError(f"paired_ratio_ci needs two 1-D sequences of per-round values, got "
                         f"shapes {num.shape} and {den.shape}.")
    if num.size != den.size:
        raise ValueError(f"paired_ratio_ci needs one value per round on both sides: got "
                         f"{num.size} numerator and {den.size} denominator values.")
    if num.size < 2:
        raise ValueError(f"paired_ratio_ci needs at least 2 rounds for an interval, got "
                         f"{num.size}.")
    for label, values in (("numerator", num), ("denominator", den)):
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise ValueError(f"paired_ratio_ci needs positive finite rates; {label} has "
                             f"{values[bad].tolist()} at rounds {np.flatnonzero(bad).tolist()}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    if int(num_resamples) < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples!r}.")
    num_resamples = int(num_resamples)
    ratios = num / den
    n = ratios.size
    rng = np.random.default_rng(seed)
    medians = np.empty(num_resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory however many rounds there are
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        medians[start:stop] = np.median(ratios[rng.integers(0, n, size=(stop - start, n))],
                                        axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return {"ratio": float(np.median(ratios)), "low": float(low), "high": float(high),
            "n": int(n), "confidence": float(confidence), "num_resamples": num_resamples,
            "per_round": ratios.tolist()}


def goal_status(ci, goal):
    """Whether a ratio interval (``paired_ratio_ci``'s dict) establishes ``ratio >= goal``.

    "met" only when the whole interval lies at or above the goal, "not met" when it lies
    entirely below it, otherwise "undecided (interval covers the goal)". The median alone never
    decides."""
    if ci["low"] >= goal:
        return "met"
    if ci["high"] < goal:
        return "not met"
    return "undecided (interval covers the goal)"


def peak_rss_mib():
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def proc_mib(key, path="/proc/self/status"):
    """The ``key: <n> kB`` entry of a /proc file of this process (``VmRSS``, ``VmHWM`` in
    ``status``; ``AnonHugePages`` in ``smaps_rollup``) in MiB; None where it is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mib():
    """Resident memory of this process now, MiB (``VmRSS``; None where /proc is missing)."""
    return proc_mib("VmRSS")


def cpu_description(cpuinfo_path="/proc/cpuinfo"):
    """CPU model (with its family and model numbers: virtual machines often name only the
    vendor's line, e.g. "AMD EPYC" for Zen 3 and Zen 4 alike), core count and the ISA
    extensions that matter for float32/bf16 matmuls."""
    model, numbers = "unknown CPU", {}
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = value.strip()
                elif not key and numbers:
                    break  # the first processor's block ends
    except OSError:
        pass
    if len(numbers) == 2:
        model += f" (family {numbers['cpu family']} model {numbers['model']})"
    # the flags the library's per-ISA choices read
    flags = _cpu_tuning().cpu_isa_flags(cpuinfo_path)
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                       "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, ISA {' '.join(isa) or 'unknown'}"


def machine_description():
    """One line: CPU model, core count, ISA, load average (the numbers depend on all of them)."""
    load = os.getloadavg()
    return f"{cpu_description()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def cpu_header(roof):
    """The line that heads a table: CPU model, cores, ISA and the float32 matmul roof probe
    (``numpy_matmul_roof``'s dict), so that no table's numbers lose their machine."""
    return (f"CPU: {cpu_description()}; float32 matmul roof {roof['median']:.1f} GFLOP/s "
            f"(numpy {roof['n']}³, median of {roof['repeats']}, IQR {roof['iqr']:.1f})")


# ----- float32 matmul rates -----------------------------------------------------------------
def matmul_flops(n):
    return 2.0 * n ** 3


def time_repeated(fn, repeats, min_time=0.0):
    """Run ``fn`` (which must block until done) ``repeats`` times; list of seconds per call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def numpy_matmul_gflops(n=1024, repeats=5):
    """Median float32 GFLOP/s of an ``n×n @ n×n`` matmul in numpy (BLAS)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    times = time_repeated(lambda: a @ b, repeats)
    return matmul_flops(n) / np.median(times) / 1e9


def numpy_matmul_roof(n=2048, repeats=7):
    """Float32 matmul roof probe: ``summarize`` of the GFLOP/s of ``repeats`` timed ``n×n @ n×n``
    numpy (BLAS, all cores) matmuls after one warm-up, plus ``n`` and ``repeats``. The default
    n = 2048 (17 GFLOP a call) is meant to measure a sustained large-matrix rate, not the call
    overheads of a small product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    times = np.asarray(time_repeated(lambda: a @ b, repeats))
    return {**summarize(matmul_flops(n) / times / 1e9), "n": int(n), "repeats": int(repeats)}


def framework_matmul_fn(framework, n=1024):
    """A zero-argument blocking function doing one ``n×n`` float32 matmul in ``framework``."""
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a, b = jnp.asarray(a_np), jnp.asarray(b_np)
        f = jax.jit(jnp.matmul)
        return lambda: f(a, b).block_until_ready()
    if framework == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(a_np), tf.constant(b_np)
        f = tf.function(tf.matmul)
        return lambda: f(a, b).numpy()
    if framework == "torch":
        import torch

        a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
        return lambda: torch.mm(a, b)
    if framework == "numpy":
        return lambda: a_np @ b_np
    raise ValueError(f"Unknown framework {framework!r}; expected jax, tensorflow, torch or numpy.")


# ----- worker side --------------------------------------------------------------------------
def reply(payload):
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def worker_loop(handlers):
    """Serve requests ``{"cmd": name, ...}`` from stdin with ``handlers[name](request)``.

    A handler returns a JSON-able dict. ``{"cmd": "exit"}`` (or EOF) ends the loop. Errors are
    sent back as ``{"error": "..."}`` so that the parent can report them and stop cleanly.
    """
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "exit":
            break
        try:
            result = handlers[request["cmd"]](request)
        except Exception as e:  # report to the parent instead of dying silently
            import traceback

            traceback.print_exc(file=sys.stderr)
            result = {"error": f"{type(e).__name__}: {e}"}
        result["peak_rss_mib"] = peak_rss_mib()
        result["rss_mib"] = rss_mib()
        reply(result)


# ----- parent side --------------------------------------------------------------------------
def malloc_environ(environ, mode, backend=None):
    """``environ`` for a worker under malloc ``mode``: "hugetlb" adds glibc's malloc tunables
    where they help, as the bin/ entry points do (keras_etsdm/cpu_tuning.py: huge pages; for JAX
    on AVX2 / AVX-512 keeping freed memory instead); "default" leaves malloc as it is.
    ``backend``: the worker's framework (default: the Keras backend ``environ`` selects)."""
    if mode == "default":
        return dict(environ)
    if mode != "hugetlb":
        raise ValueError(f"malloc mode must be 'hugetlb' or 'default', got {mode!r}")
    return _cpu_tuning().tuned_environ(environ, backend=backend) or dict(environ)


def _cpu_tuning():
    # bin/_startup.py loads cpu_tuning by path: importing the package would load TF/JAX here.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bin"))
    import _startup

    return _startup.load_cpu_tuning()


def _compilation_cache():
    """``keras_etsdm/compilation_cache.py``, loaded by path as ``bin/_startup.py`` does."""
    _cpu_tuning()  # puts bin/ on sys.path
    import _startup

    return _startup.load_compilation_cache()


def without_compilation_cache(environ):
    """``environ`` (a new dict) with the persistent compilation cache off: no
    ``JAX_COMPILATION_CACHE_DIR`` or ``TF_XLA_FLAGS`` (where ``bin/_startup.tune_process``, run
    by a parent, put the cache directory; children inherit it) and
    ``KERAS_ETSDM_COMPILATION_CACHE=0``, so that a worker's first call compiles."""
    env = {k: v for k, v in environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "TF_XLA_FLAGS")}
    env["KERAS_ETSDM_COMPILATION_CACHE"] = "0"
    return env


class Worker:
    """A benchmark worker subprocess (one framework / Keras backend); ``cold_compile``: without
    the persistent compilation cache (:func:`without_compilation_cache`)."""

    def __init__(self, name, argv, env=None, log_path=None, malloc="default", backend=None,
                 cold_compile=False):
        self.name = name
        # The worker's own variables (KERAS_BACKEND, a variant's GLIBC_TUNABLES) first: the
        # malloc tuning depends on the backend and keeps a malloc choice the worker was given.
        full_env = {**os.environ, **(env or {})}
        if cold_compile:
            full_env = without_compilation_cache(full_env)
        full_env = malloc_environ(full_env, malloc, backend)
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # As bin/ start-up: JAX workers on CPU get the XLA convolution flag before JAX starts.
        full_env = _cpu_tuning().jax_xla_environ(full_env) or full_env
        self.glibc_tunables = full_env.get("GLIBC_TUNABLES", "")
        self._log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=full_env, text=True, bufsize=1)

    def request(self, cmd, **kwargs):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                if "error" in result:
                    raise RuntimeError(f"worker {self.name}, command {cmd}: {result['error']}")
                return result
        raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()}) during {cmd!r}; "
                           f"see its log.")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


def interleave(workers, cmd, repeats, orders=None, **kwargs):
    """Ask every worker once per round, ``repeats`` rounds; ``{worker name: [results...]}``.

    ``orders``: the worker names in the order of each round (e.g. from ``round_orders``); by
    default the fixed order of ``workers`` in every round."""
    by_name = {w.name: w for w in workers}
    if orders is None:
        orders = [list(by_name)] * repeats
    if len(orders) != repeats or any(sorted(o) != sorted(by_name) for o in orders):
        raise ValueError(f"orders must hold {repeats} permutations of {sorted(by_name)}.")
    results = {name: [] for name in by_name}
    for order in orders:
        for name in order:
            results[name].append(by_name[name].request(cmd, **kwargs))
    return results


def winograd_training_value(text):
    """``train(winograd_training=...)`` from a benchmark's option text: "auto" → the library's
    choice for this process (``backend.default_winograd_training``), "0" / "1" → False / True,
    other digits → that int; anything else is returned as is, for ``winograd.training_setting``
    to refuse."""
    if text == "auto":
        from keras_etsdm import backend

        return backend.default_winograd_training()
    return {"0": False, "1": True}.get(text, int(text) if text.isdigit() else text)


def write_json_atomic(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
