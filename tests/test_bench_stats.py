"""Statistics of the benchmarks (issue 19, "statistics that hold"): random round orders, paired
ratios with bootstrap intervals, goal status, and vs_diffusers' report on fake rounds.

numpy only: no worker is started and no framework is imported."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import harness
import vs_diffusers

NAMES = ["keras-jax", "keras-tensorflow", "diffusers"]


# ----- round orders -----------------------------------------------------------------------------
def test_round_orders_are_permutations_that_change_between_rounds():
    orders = harness.round_orders(NAMES, 15, seed=0)
    assert len(orders) == 15
    for order in orders:
        assert sorted(order) == sorted(NAMES) and len(order) == len(NAMES)
    assert len({tuple(o) for o in orders}) > 1  # not one fixed order
    assert orders != [NAMES] * 15  # not the old round robin
    # Over many rounds every worker runs first, and in every position, sometimes.
    many = harness.round_orders(NAMES, 300, seed=0)
    for position in range(len(NAMES)):
        assert {o[position] for o in many} == set(NAMES)


def test_round_orders_are_reproducible_from_the_seed():
    assert harness.round_orders(NAMES, 10, seed=3) == harness.round_orders(NAMES, 10, seed=3)
    assert harness.round_orders(NAMES, 10, seed=3) != harness.round_orders(NAMES, 10, seed=4)
    assert harness.round_orders(NAMES, 0, seed=0) == []


class _FakeWorker:
    def __init__(self, name, log):
        self.name, self._log = name, log

    def request(self, cmd, **kwargs):
        self._log.append(self.name)
        return {"cmd": cmd, **kwargs}


def test_interleave_follows_the_given_orders():
    log = []
    workers = [_FakeWorker(n, log) for n in NAMES]
    orders = harness.round_orders(NAMES, 4, seed=1)
    results = harness.interleave(workers, "matmul", 4, orders=orders)
    assert log == [name for order in orders for name in order]
    assert all(len(results[n]) == 4 for n in NAMES)
    log.clear()
    harness.interleave(workers, "matmul", 2)  # default: the fixed order of ``workers``
    assert log == NAMES * 2
    with pytest.raises(ValueError, match="permutations"):
        harness.interleave(workers, "matmul", 2, orders=[NAMES, NAMES[:2]])
    with pytest.raises(ValueError, match="permutations"):
        harness.interleave(workers, "matmul", 3, orders=[NAMES, NAMES])


# ----- paired ratios ----------------------------------------------------------------------------
def test_exact_ratio_on_constructed_data():
    den = np.array([2.1, 2.5, 1.7, 2.9, 2.2, 3.3])
    ci = harness.paired_ratio_ci(2.0 * den, den)
    assert ci["ratio"] == 2.0 and ci["low"] == 2.0 and ci["high"] == 2.0
    assert ci["n"] == 6 and ci["confidence"] == 0.95 and ci["per_round"] == [2.0] * 6


def test_statistic_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    num = np.array([1.0, 4.0, 9.0])
    den = np.array([1.0, 1.0, 1.0]) * np.array([1.0, 2.0, 3.0])
    ci = harness.paired_ratio_ci(num, den, num_resamples=200)
    assert ci["per_round"] == [1.0, 2.0, 3.0]
    assert ci["ratio"] == 2.0
    assert 1.0 <= ci["low"] <= ci["ratio"] <= ci["high"] <= 3.0


def _noisy_rounds(n, true_ratio, rng):
    # A common per-round machine factor (cancels in the pair) and independent noise per side.
    machine = rng.uniform(0.6, 1.0, size=n)
    den = 2.0 * machine * rng.lognormal(0.0, 0.08, size=n)
    num = true_ratio * 2.0 * machine * rng.lognormal(0.0, 0.08, size=n)
    return num, den


def test_interval_covers_the_true_ratio_on_noisy_data():
    num, den = _noisy_rounds(15, 1.3, np.random.default_rng(0))
    ci = harness.paired_ratio_ci(num, den, seed=0)
    assert ci["low"] < 1.3 < ci["high"]
    assert ci["low"] <= ci["ratio"] <= ci["high"]
    assert ci["high"] - ci["low"] < 0.3
    assert harness.paired_ratio_ci(num, den, seed=0) == ci  # reproducible


def test_interval_coverage_over_many_noisy_data_sets():
    # Not a proof of 95 %, a guard against an interval that is off by construction.
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(60):
        num, den = _noisy_rounds(15, 1.3, rng)
        ci = harness.paired_ratio_ci(num, den, num_resamples=1000, seed=1)
        hits += ci["low"] <= 1.3 <= ci["high"]
    assert hits >= 48  # 80 %: the percentile bootstrap of a median of 15 is a bit short


def test_interval_narrows_with_more_rounds():
    # Mean width over several data sets per round count (one data set's width is itself noisy).
    rng = np.random.default_rng(2)
    widths = []
    for n in (5, 20, 80):
        w = []
        for _ in range(20):
            num, den = _noisy_rounds(n, 1.1, rng)
            ci = harness.paired_ratio_ci(num, den, num_resamples=1000, seed=0)
            w.append(ci["high"] - ci["low"])
        widths.append(np.mean(w))
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2] > 0


def test_pairing_cancels_the_shared_round_factor():
    # Huge drift shared by both sides of a round, tiny own noise: the paired interval is narrow
    # although each side's own spread is wide.
    rng = np.random.default_rng(3)
    machine = rng.uniform(0.3, 1.0, size=15)
    den = machine * rng.lognormal(0.0, 0.01, size=15)
    num = 1.2 * machine * rng.lognormal(0.0, 0.01, size=15)
    ci = harness.paired_ratio_ci(num, den)
    assert ci["high"] - ci["low"] < 0.05
    assert harness.summarize(num)["iqr"] / np.median(num) > 0.2


@pytest.mark.parametrize("num, den, match", [
    ([1.0, 2.0, 3.0], [1.0, 2.0], "one value per round"),
    ([1.0], [1.0], "at least 2 rounds"),
    ([], [], "at least 2 rounds"),
    ([1.0, 0.0], [1.0, 1.0], "positive finite"),
    ([1.0, 2.0], [1.0, -1.0], "positive finite"),
    ([1.0, np.nan], [1.0, 1.0], "positive finite"),
    ([1.0, 2.0], [np.inf, 1.0], "positive finite"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
])
def test_paired_ratio_errors(num, den, match):
    with pytest.raises(ValueError, match=match):
        harness.paired_ratio_ci(num, den)


def test_paired_ratio_rejects_bad_settings():
    with pytest.raises(ValueError, match="confidence"):
        harness.paired_ratio_ci([1.0, 2.0], [1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="num_resamples"):
        harness.paired_ratio_ci([1.0, 2.0], [1.0, 2.0], num_resamples=0)


# ----- goal status ------------------------------------------------------------------------------
def test_goal_status_three_cases():
    assert harness.goal_status({"low": 1.31, "high": 1.6}, 1.3) == "met"
    assert harness.goal_status({"low": 1.3, "high": 1.6}, 1.3) == "met"  # low == goal
    assert harness.goal_status({"low": 1.0, "high": 1.29}, 1.3) == "not met"
    assert harness.goal_status({"low": 1.2, "high": 1.4}, 1.3) == \
        "undecided (interval covers the goal)"
    assert harness.goal_status({"low": 1.2, "high": 1.3}, 1.3) == \
        "undecided (interval covers the goal)"  # high == goal: not below it
    ci = harness.paired_ratio_ci([2.0, 4.0], [1.0, 2.0])
    assert harness.goal_status(ci, 1.3) == "met"
    assert harness.goal_status(ci, 2.5) == "not met"


# ----- CPU header -------------------------------------------------------------------------------
def test_cpu_header_names_the_machine_and_the_roof():
    roof = harness.numpy_matmul_roof(n=64, repeats=3)
    assert roof["n"] == 64 and roof["repeats"] == 3 and roof["median"] > 0
    line = harness.cpu_header(roof)
    assert line.startswith("CPU: ") and " cores, ISA " in line
    assert "float32 matmul roof" in line and "GFLOP/s" in line and "64³" in line


def test_vs_diffusers_defaults():
    args = vs_diffusers.parse_args([])
    assert args.repeats == 15 and args.order_seed == 0 and args.matmul_n == 2048
    with pytest.raises(SystemExit):
        vs_diffusers.parse_args(["--repeats", "1"])


# ----- vs_diffusers report on fake rounds -------------------------------------------------------
def _fake_measured(rounds=15, jax_factor=0.8, tf_factor=1.5, seed=0):
    rng = np.random.default_rng(seed)
    tasks = ["train", "forward_b8", "ddim"]
    batches = {"train": 8, "forward_b8": 8, "ddim": 8}
    seconds, cpu_seconds, warmup = {}, {}, {}
    for task in tasks:
        base = rng.uniform(0.5, 1.5, size=rounds)  # diffusers' seconds per unit, per round
        # keras rate = factor × diffusers' rate in every round (seconds divided by the factor).
        seconds[task] = {"keras-jax": (base / jax_factor).tolist(),
                         "keras-tensorflow": (base / tf_factor).tolist(),
                         "diffusers": base.tolist()}
        cpu_seconds[task] = {k: (2 * np.asarray(v)).tolist() for k, v in seconds[task].items()}
        warmup[task] = {k: {"first_call_s": 10.0, "second_call_s": 1.0} for k in NAMES}
    return {
        "cpu_header": "CPU: Fake CPU, 2 cores, ISA avx2 fma; float32 matmul roof 100.0 GFLOP/s "
                      "(numpy 2048³, median of 7, IQR 1.0)",
        "network": "U-Net base_channels 128, 32×32, float32",
        "machine_start": "Fake CPU, load average 1.00 1.00 1.00",
        "machine_end": "Fake CPU, load average 1.10 1.00 1.00",
        "roof_end": {"median": 99.0, "iqr": 1.0, "n": 2048, "repeats": 7},
        "order_seed": 0, "workers": NAMES, "tasks": tasks, "batches": batches,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "warmup": warmup,
        "matmul_gflops": {k: [90.0, 100.0, 110.0] for k in NAMES},
        "forward_flops_per_image": 12e9, "peak_rss_mib": dict.fromkeys(NAMES, 1000.0),
        "sample_batch": 8,
    }


def test_report_paired_ratios_and_goals_on_fake_rounds():
    report = vs_diffusers.build_report(_fake_measured(), num_resamples=500)
    rows = {(r["task"], r["framework"]): r for r in report["rows"]}
    assert len(rows) == 9
    for task in ("train", "forward_b8", "ddim"):
        assert rows[(task, "diffusers")]["paired_ratio_vs_diffusers"] is None
        for name, factor in (("keras-jax", 0.8), ("keras-tensorflow", 1.5)):
            ci = rows[(task, name)]["paired_ratio_vs_diffusers"]
            assert ci["ratio"] == pytest.approx(factor)
            assert ci["low"] == pytest.approx(factor) and ci["high"] == pytest.approx(factor)
            assert ci["n"] == 15
            assert rows[(task, name)]["images_per_s"]["n"] == 15  # median / IQR kept
    # Only the eager peer ran: it is also the best peer of every task.
    goals = {(g["task"], g["text"]): g for g in report["goals"]}
    assert len(goals) == 4  # three for the training step, one for sampling; none for forward
    eager = goals[("train", "fastest Keras backend ≥ 1.3× eager diffusers")]
    assert eager["framework"] == "keras-tensorflow" and eager["picked"]
    assert eager["status"] == "met"  # 1.5 ≥ 1.3 on the whole interval
    jax = goals[("train", "JAX ≥ 0.9× the best diffusers variant")]
    assert jax["framework"] == "keras-jax" and jax["status"] == "not met"
    assert jax["against"] == "diffusers"
    sampling = "sampling per NFE: fastest Keras backend ≥ 1.0× the best diffusers variant"
    assert goals[("ddim", sampling)]["status"] == "met"
    assert rows[("train", "keras-tensorflow")]["goals"] == [
        "fastest ≥ 1.3× eager: met", "fastest ≥ 1.0× best peer: met"]
    assert rows[("train", "keras-jax")]["goals"] == ["JAX ≥ 0.9× best peer: not met"]
    assert rows[("forward_b8", "keras-jax")]["goals"] == []
    assert rows[("train", "keras-jax")]["best_peer"] == "diffusers"

    md = report["markdown"]
    lines = md.splitlines()
    assert lines[0].startswith("CPU: Fake CPU, 2 cores, ISA") and "matmul roof" in lines[0]
    table = [ln for ln in lines if ln.startswith("| ")]
    assert "÷ diffusers (eager), paired [95 % CI]" in table[0] and "| IQR |" in table[0]
    assert "÷ best peer [95 % CI]" in table[0]
    assert len(table) == 1 + 9
    assert "| train | keras-tensorflow | 8 |" in md and "1.50 [1.50, 1.50]" in md
    assert "fastest ≥ 1.3× eager: met" in md and "JAX ≥ 0.9× best peer: not met" in md
    # Item 5 on fake numbers: first call 10 s ≤ 30 s; peak RSS equal to the eager peer's.
    assert {(r["framework"], r["status"]) for r in report["resources"]} == {
        ("keras-jax", "met"), ("keras-tensorflow", "met")}
    assert len(report["resources"]) == 4
    assert "| train | diffusers | 8 |" in md and "1 (reference)" in md
    assert "random order each round (order seed 0)" in md


def test_report_undecided_goal_and_sampler_overhead():
    measured = _fake_measured(jax_factor=1.0, tf_factor=1.0)
    # Noisy JAX rounds around 0.9× diffusers: the interval covers the goal.
    rng = np.random.default_rng(7)
    base = np.asarray(measured["seconds"]["train"]["diffusers"])
    measured["seconds"]["train"]["keras-jax"] = (
        base / (0.9 * rng.lognormal(0.0, 0.1, size=base.size))).tolist()
    measured["tasks"] = ["train", "forward_b8", "ddim"]
    report = vs_diffusers.build_report(measured, num_resamples=2000)
    jax_goal = next(g for g in report["goals"] if g["framework"] == "keras-jax"
                    and not g["picked"])
    assert jax_goal["ratio_ci"]["low"] < 0.9 < jax_goal["ratio_ci"]["high"]
    assert jax_goal["status"] == "undecided (interval covers the goal)"
    # forward_b8 with sample_batch 8 is measured: the sampler overhead per NFE is reported.
    assert {(o["task"], o["framework"]) for o in report["sampler_overhead"]} == \
        {("ddim", n) for n in NAMES}


def test_report_without_jax_or_train():
    measured = _fake_measured()
    for key in ("seconds", "cpu_seconds", "warmup"):
        for task in measured[key]:
            measured[key][task].pop("keras-jax")
    measured["workers"] = ["keras-tensorflow", "diffusers"]
    report = vs_diffusers.build_report(measured, num_resamples=200)
    assert {g["framework"] for g in report["goals"]} == {"keras-tensorflow"}  # no JAX goal
    assert len(report["goals"]) == 3
    measured["tasks"] = ["forward_b8"]
    report = vs_diffusers.build_report(measured, num_resamples=200)
    assert report["goals"] == [] and "Goals of issue 19" not in report["markdown"]


# ----- vs_diffusers' parent loop with fake workers ----------------------------------------------
class _FakeBenchWorker:
    """Answers vs_diffusers' commands; keras-X runs ``speed`` × as fast as diffusers."""

    def __init__(self, name, log, speed):
        self.name, self._log, self._speed = name, log, speed
        self.glibc_tunables = ""
        self._calls = 0

    def request(self, cmd, **kwargs):
        self._log.append((cmd, kwargs.get("task"), self.name))
        if cmd == "info":
            return {"framework": self.name, "params": 123,
                    "tasks": ["train", "forward_b8"], "peak_rss_mib": 1.0}
        if cmd == "warmup":
            return {"first_call_s": 1.0, "second_call_s": 0.5, "peak_rss_mib": 1.0}
        if cmd == "run":
            self._calls += 1
            seconds = (1.0 + 0.1 * (self._calls % 3)) / self._speed
            return {"seconds_per_unit": seconds, "cpu_seconds_per_unit": 2 * seconds,
                    "peak_rss_mib": 1.0}
        if cmd == "matmul":
            return {"gflops": 100.0, "peak_rss_mib": 1.0}
        raise AssertionError(cmd)

    def close(self):
        pass


def test_main_runs_rounds_in_the_recorded_random_orders(monkeypatch, tmp_path):
    log = []
    speeds = {"keras-jax": 1.0, "keras-tensorflow": 1.4, "diffusers": 1.0}

    def fake_start_worker(args, kind, backend, name, peer="eager"):
        return _FakeBenchWorker(name, log, speeds[name])

    monkeypatch.setattr(vs_diffusers, "start_worker", fake_start_worker)
    json_path, md_path = tmp_path / "vs.json", tmp_path / "vs.md"
    args = vs_diffusers.parse_args(["--repeats", "4", "--order_seed", "3", "--matmul_n", "32",
                                    "--peers", "eager",
                                    "--matmul_repeats", "3", "--bootstrap_resamples", "200",
                                    "--forward_batches", "8", "--json", str(json_path),
                                    "--markdown", str(md_path)])
    vs_diffusers.main(args)
    out = json.loads(json_path.read_text())
    expected = harness.round_orders(NAMES, 4 * 2 + vs_diffusers.MATMUL_ROUNDS, seed=3)
    assert out["round_orders"] == {"train": expected[:4], "forward_b8": expected[4:8]}
    assert out["matmul_round_orders"] == expected[8:]
    for task in ("train", "forward_b8"):
        ran = [name for cmd, t, name in log if cmd == "run" and t == task]
        assert ran == [n for order in out["round_orders"][task] for n in order]
    ran_mm = [name for cmd, _, name in log if cmd == "matmul"]
    assert ran_mm == [n for order in out["matmul_round_orders"] for n in order]
    row = next(r for r in out["rows"]
               if r["task"] == "train" and r["framework"] == "keras-tensorflow")
    assert row["paired_ratio_vs_diffusers"]["n"] == 4
    assert out["roof_start"]["n"] == 32 and md_path.read_text() == out["markdown"]
    assert out["markdown"].startswith("CPU: ")


def test_report_best_peer_is_chosen_per_task_and_resource_goals():
    """A compiled peer 1.2× eager on training, 0.7× on sampling: the best peer differs by task,
    and the paired ratios against it are the keras ÷ eager ratios divided by the peer's."""
    measured = _fake_measured()
    names = NAMES + ["diffusers-compile"]
    measured["workers"] = names
    factor = {"train": 1.2, "forward_b8": 1.0, "ddim": 0.7}
    for task in measured["tasks"]:
        base = np.asarray(measured["seconds"][task]["diffusers"])
        measured["seconds"][task]["diffusers-compile"] = (base / factor[task]).tolist()
        measured["cpu_seconds"][task]["diffusers-compile"] = (2 * base).tolist()
        measured["warmup"][task]["diffusers-compile"] = {"first_call_s": 60.0,
                                                         "second_call_s": 1.0}
    measured["warmup"]["train"]["keras-jax"]["first_call_s"] = 45.0
    measured["matmul_gflops"]["diffusers-compile"] = [100.0] * 3
    measured["peak_rss_mib"] = {"keras-jax": 1400.0, "keras-tensorflow": 1600.0,
                                "diffusers": 1000.0, "diffusers-compile": 1200.0}
    measured["torch_threads"] = {"diffusers": 2, "diffusers-compile": 2}
    measured["peer_variants"] = {"diffusers": "as shipped", "diffusers-compile": "compiled"}
    report = vs_diffusers.build_report(measured, num_resamples=300)
    rows = {(r["task"], r["framework"]): r for r in report["rows"]}
    assert rows[("train", "keras-jax")]["best_peer"] == "diffusers-compile"
    assert rows[("ddim", "keras-jax")]["best_peer"] == "diffusers"
    assert rows[("train", "keras-tensorflow")]["paired_ratio_vs_best_peer"]["ratio"] == \
        pytest.approx(1.5 / 1.2)
    assert rows[("train", "diffusers-compile")]["paired_ratio_vs_diffusers"]["ratio"] == \
        pytest.approx(1.2)
    assert rows[("train", "diffusers-compile")]["paired_ratio_vs_best_peer"] is None
    goals = {(g["task"], g["text"]): g for g in report["goals"]}
    best = goals[("train", "fastest Keras backend ≥ 1.0× the best diffusers variant")]
    assert best["against"] == "diffusers-compile" and best["status"] == "met"  # 1.25
    jax = goals[("train", "JAX ≥ 0.9× the best diffusers variant")]
    assert jax["ratio_ci"]["ratio"] == pytest.approx(0.8 / 1.2) and jax["status"] == "not met"
    res = {(r["framework"], r["text"].split(" ")[0]): r for r in report["resources"]}
    assert res[("keras-jax", "first")]["status"] == "not met"  # 45 s > 30 s
    assert res[("keras-tensorflow", "first")]["status"] == "met"
    assert res[("keras-jax", "peak")]["status"] == "met"  # 1400 ≤ 1.5 × 1000
    assert res[("keras-tensorflow", "peak")]["status"] == "not met"  # 1600 > 1500
    md = report["markdown"]
    assert "- diffusers-compile: compiled; torch intra-op threads 2" in md
    assert "(diffusers-compile)" in md and "| train | diffusers-compile | 8 |" in md


def test_vs_diffusers_peers_flag():
    assert vs_diffusers.parse_args([]).peers.split(",") == list(vs_diffusers.PEER_WORKERS)
    for bad in ("tuned", "eager,jit"):
        with pytest.raises(SystemExit):
            vs_diffusers.parse_args(["--peers", bad])


def test_cold_compile_workers_start_without_the_compilation_cache(monkeypatch):
    # A parent that ran bin/_startup.tune_process() has the cache directory in its environment;
    # a cold_compile worker (small_conv's A/B workers, first_call.py's "off" processes) must not
    # inherit it, or its "first call" is a cache hit.
    import harness

    parent = {"JAX_COMPILATION_CACHE_DIR": "/cache/jax", "PATH": "/bin",
              "TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/cache/tensorflow"}
    env = harness.without_compilation_cache(parent)
    assert env == {"PATH": "/bin", "KERAS_ETSDM_COMPILATION_CACHE": "0"}
    assert "JAX_COMPILATION_CACHE_DIR" in parent  # not modified
    started = {}

    class _Popen:
        def __init__(self, argv, env, **kwargs):
            started[argv[0]] = env

    monkeypatch.setattr(harness.subprocess, "Popen", _Popen)
    for key, value in parent.items():
        monkeypatch.setenv(key, value)
    for worker in (harness.Worker("cold", ["cold"], env={"KERAS_BACKEND": "jax"},
                                  cold_compile=True),
                   harness.Worker("warm", ["warm"], env={"KERAS_BACKEND": "jax"})):
        worker._log.close()
    assert "JAX_COMPILATION_CACHE_DIR" not in started["cold"]
    assert started["cold"]["KERAS_ETSDM_COMPILATION_CACHE"] == "0"
    assert started["warm"]["JAX_COMPILATION_CACHE_DIR"] == "/cache/jax"


# ----- first_call.py report on fake processes ------------------------------------------------------
def test_first_call_report_medians_per_mode():
    import first_call

    def proc(first, cache=None):
        r = {"import_s": 2.0, "build_s": 1.0, "first_call_s": first, "second_call_s": 0.5,
             "peak_rss_mib": 100.0}
        if cache is not None:
            r["cache_mib"] = cache
        return r

    results = {"tensorflow": {"off": [proc(50.0), proc(48.0)],
                              "cold": [proc(49.0, 20.0), proc(51.0, 20.0)],
                              "warm": [proc(40.0, 20.0), proc(38.0, 20.0)]}}
    args = first_call.parse_args(["--rounds", "2"])
    md = first_call.report(results, args, "CPU: Fake CPU")
    assert md.startswith("CPU: Fake CPU")
    assert "| tensorflow | yes | off | 2.0 | 1.0 | 49.0 | 0.50 | 100 | — | 50.0, 48.0 |" in md
    assert "| tensorflow | yes | warm | 2.0 | 1.0 | 39.0 | 0.50 | 100 | 20 | 40.0, 38.0 |" in md
    assert first_call.MODES == ("off", "cold", "warm")
    # A subset of modes (no XLA: nothing to cache), the worker's resolved jit_compile shown.
    args = first_call.parse_args(["--rounds", "2", "--jit_compile", "auto", "--modes", "off"])
    assert first_call.modes_of(args) == ["off"]
    off = [dict(proc(30.0), jit_compile=False), dict(proc(32.0), jit_compile=False)]
    md = first_call.report({"tensorflow": {"off": off}}, args, "CPU: Fake CPU")
    assert "| tensorflow | no | off | 2.0 | 1.0 | 31.0 | 0.50 | 100 | — | 30.0, 32.0 |" in md
    assert "warm" not in md.split("\n", 3)[2]
    for bad in ("warm", "off,hot", ""):
        with pytest.raises(SystemExit, match="--modes"):
            first_call.modes_of(first_call.parse_args(["--modes", bad]))


# ----- bin_train_speed variants ------------------------------------------------------------------
def test_bin_train_speed_variants_keep_bracketed_commas_and_pair_with_the_first():
    import bin_train_speed

    variants = bin_train_speed.split_variants(
        "tensorflow, tensorflow@build_network.channel_mult=(1,2,2,2)@build_network.fold=1,"
        "jax@train.ema_tracks=['decay:0','decay:0.99']")
    assert variants == ["tensorflow",
                        "tensorflow@build_network.channel_mult=(1,2,2,2)@build_network.fold=1",
                        "jax@train.ema_tracks=['decay:0','decay:0.99']"]
    # Three variants, two rounds: each later one is paired with the first, round by round.
    runs = {v: [{"seconds_per_step_windows": [9.0, 9.0, s, s], "startup_to_first_log_s": 30.0}
                for s in seconds]
            for v, seconds in zip(variants, [(0.2, 0.4), (0.3, 0.6), (0.1, 0.4)])}
    args = type("Args", (), {"steps": 40, "rounds": 2, "log_every": 10, "skip": 2})()
    text, rows = bin_train_speed.render("test machine", 100.0, args, runs, variants)
    ratios = {tuple(r["backends"]): r["per_round"] for r in rows["paired_ratios"]}
    np.testing.assert_allclose(ratios[(variants[1], variants[0])], [1.5, 1.5])
    np.testing.assert_allclose(ratios[(variants[2], variants[0])], [0.5, 1.0])
    assert "paired_ratio" not in rows and text.count("Paired per round") == 2


def test_report_compares_a_backend_variant_with_its_base_worker():
    """'keras-tensorflow@sample_xla=1' beside 'keras-tensorflow': paired base ÷ variant per task,
    and the variant's compile mode listed from ``sample_jit_compile``."""
    measured = _fake_measured()
    name = "keras-tensorflow@sample_xla=1"
    for task in measured["tasks"]:
        # The variant is 1.25× slower than its base in every round.
        measured["seconds"][task][name] = [1.25 * s for s in
                                           measured["seconds"][task]["keras-tensorflow"]]
        measured["cpu_seconds"][task][name] = measured["cpu_seconds"][task]["keras-tensorflow"]
        measured["warmup"][task][name] = {"first_call_s": 12.0, "second_call_s": 1.0}
    measured["workers"] = NAMES + [name]
    measured["matmul_gflops"][name] = [100.0, 100.0]
    measured["peak_rss_mib"][name] = 1200.0
    measured["sample_jit_compile"] = {"keras-tensorflow": False, name: True}
    report = vs_diffusers.build_report(measured, num_resamples=200)
    variants = {v["task"]: v for v in report["variants"]}
    assert set(variants) == set(measured["tasks"])
    for v in variants.values():
        assert v["base"] == "keras-tensorflow" and v["variant"] == name
        assert v["ratio_ci"]["ratio"] == pytest.approx(1.25)
        assert v["ratio_ci"]["low"] == pytest.approx(1.25)
    md = report["markdown"]
    assert f"- ddim: keras-tensorflow ÷ {name} 1.25 [1.25, 1.25]" in md
    assert "variant against its base worker" in md
    assert "- keras-tensorflow: sampling loops without XLA" in md
    assert f"- {name}: sampling loops with XLA" in md


def test_train_step_pairs_each_tuning_and_each_set_up_with_its_own_baseline():
    import train_step

    specs = [("jax", "auto", "jax", "tuned", "as_is"),
             ("jax", "auto", "jax{no_dropout}", "tuned", "no_dropout"),
             ("jax", "auto", "jax[no_hugetlb]", "no_hugetlb", "as_is"),
             ("jax", "auto", "jax[no_hugetlb]{no_dropout}", "no_hugetlb", "no_dropout"),
             ("tensorflow", "false", "tf", "tuned", "as_is"),
             ("tensorflow", "false", "tf{clipped_adam}", "tuned", "clipped_adam"),
             ("tensorflow", "true", "tf-xla{clipped_adam}", "tuned", "clipped_adam")]
    assert train_step.paired_baselines(specs) == [
        ("jax", "jax{no_dropout}"),
        ("jax", "jax[no_hugetlb]"),
        ("jax{no_dropout}", "jax[no_hugetlb]{no_dropout}"),  # the tuning, same set-up
        ("tf", "tf{clipped_adam}"),
        ("tf{clipped_adam}", "tf-xla{clipped_adam}"),  # the jit modes, same set-up
    ]  # tf-xla{clipped_adam} has no as_is worker of its jit mode: not paired with one
    # the unfused optimizer is paired with the fused one, not with as_is
    specs = [("tensorflow", "true", "tf{clipped_adam}", "tuned", "clipped_adam"),
             ("tensorflow", "true", "tf{clipped_adam_unfused}", "tuned", "clipped_adam_unfused")]
    assert train_step.paired_baselines(specs) == [("tf{clipped_adam}",
                                                   "tf{clipped_adam_unfused}")]
    with pytest.raises(SystemExit, match="--model_variants: expected values among"):
        train_step.main(train_step.parse_args(["--model_variants", "as_is,nodropout"]))


def test_train_step_worker_environ_adds_the_named_xla_flags_to_the_callers():
    import train_step

    env = train_step.worker_environ(
        "tensorflow", "tf_xla:tf_xla_auto_jit=2+tf_xla_ops_to_cluster=PW/RED",
        environ={"TF_XLA_FLAGS": "--tf_xla_min_cluster_size=4"})
    assert env == {"KERAS_BACKEND": "tensorflow", "TF_XLA_FLAGS":
                   "--tf_xla_min_cluster_size=4 --tf_xla_auto_jit=2 --tf_xla_ops_to_cluster=PW,RED"}
    env = train_step.worker_environ("jax", "xla:xla_cpu_prefer_vector_width=512", environ={})
    assert env == {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}
    assert train_step.worker_environ("jax", "tuned", environ={}) == {"KERAS_BACKEND": "jax"}
    assert train_step.worker_environ("jax", "keep_compiler_memory", environ={}) == {
        "KERAS_BACKEND": "jax", train_step.KEEP_COMPILER_MEMORY_VARIABLE: "1"}
    with pytest.raises(SystemExit, match="not of the form tf_xla:<flag>=<value>"):
        train_step.main(train_step.parse_args(["--cpu_tuning", "tuned,tf_xla:auto_jit"]))


def test_train_step_workers_get_only_the_tunings_their_backend_uses():
    import train_step

    flag = "xla:xla_cpu_enable_concurrency_optimized_scheduler=false"
    args = train_step.parse_args([
        "--backends", "jax,tensorflow,torch", "--tf_jit_compile", "true",
        "--cpu_tuning", f"tuned,keep_compiler_memory,{flag},onednn_fusion=dot,"
                        "tf_xla:tf_xla_auto_jit=2"])
    names = [name for _, _, name, _, _ in train_step.worker_specs(args)]
    assert names == [
        "jax", "jax[keep_compiler_memory]", f"jax[{flag}]", "jax[onednn_fusion=dot]",
        # TensorFlow's XLA reads XLA_FLAGS too, and trims after its first step
        "tensorflow(jit_compile=true)", "tensorflow(jit_compile=true)[keep_compiler_memory]",
        f"tensorflow(jit_compile=true)[{flag}]",
        "tensorflow(jit_compile=true)[tf_xla:tf_xla_auto_jit=2]",
        "torch"]
    env = train_step.worker_environ("tensorflow", flag, environ={"XLA_FLAGS": "--a=1"})
    assert env == {"KERAS_BACKEND": "tensorflow", "XLA_FLAGS":
                   "--a=1 --xla_cpu_enable_concurrency_optimized_scheduler=false"}


def test_train_step_small_pages_keeps_the_huge_page_tunable_out():
    import train_step

    # the start-up keeps a hugetlb value the worker was given and adds the rest of its tuning
    assert train_step.worker_environ("jax", "small_pages", environ={}) == {
        "KERAS_BACKEND": "jax", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def test_cpu_description_names_the_family_and_model_of_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    block = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {m}\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f\n\n")
    cpuinfo.write_text(block.format(i=0, m=17) + block.format(i=1, m=1))
    text = harness.cpu_description(str(cpuinfo))
    assert text.startswith("AMD EPYC (family 25 model 17), ")
    assert text.endswith("ISA avx2 fma avx512f")


def test_train_step_avx512_set_forces_what_jax_gets_on_avx512_on_any_cpu():
    import train_step

    tuning = train_step.harness._cpu_tuning()
    env = train_step.worker_environ("jax", "avx512_set", environ={"XLA_FLAGS": "--a=1"})
    assert env == {"KERAS_BACKEND": "jax", "GLIBC_TUNABLES": tuning.RETAIN_TUNABLES,
                   "KERAS_ETSDM_JAX_SYNC_DISPATCH": "1",
                   "XLA_FLAGS": "--a=1 --xla_cpu_enable_concurrency_optimized_scheduler=false"}
    # the start-up, on an AVX2 CPU, keeps all three and adds only the convolution flag
    worker = env
    assert tuning.tuned_environ(worker, system="linux", glibc=(2, 36), thp_mode="madvise",
                                backend="jax", cpu_flags={"avx2"}) is None
    assert tuning.wants_sync_dispatch(worker, cpu_flags={"avx2"})
    flags = tuning.tuned_xla_flags(worker, jaxlib_version=(0, 10, 2), cpu_flags={"avx2"})
    assert flags.split() == ["--a=1", "--xla_cpu_enable_concurrency_optimized_scheduler=false",
                             tuning.JAX_XLA_CPU_FLAG]


def test_train_step_glibc_screen_sets_only_the_named_malloc_tunables():
    import train_step

    env = train_step.worker_environ(
        "jax", "glibc:arena_max=2+mmap_max=0+trim_threshold=17179869184", environ={})
    assert env == {"KERAS_BACKEND": "jax", "GLIBC_TUNABLES":
                   "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=17179869184"}
    with pytest.raises(SystemExit, match="not of the form glibc:<name>=<value>"):
        train_step.main(train_step.parse_args(["--cpu_tuning", "tuned,glibc:arena_max"]))


def test_train_step_mimalloc_screen_preloads_the_wheels_library(tmp_path, monkeypatch):
    import train_step

    assert train_step.mimalloc_library(paths=[str(tmp_path)]) is None
    library = tmp_path / "cmeel.prefix" / "lib" / "libmimalloc.so.3"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    assert train_step.mimalloc_library(paths=["", str(tmp_path)]) == str(library)
    monkeypatch.setattr(train_step, "mimalloc_library", lambda: str(library))
    env = train_step.worker_environ("jax", "mimalloc", environ={})
    # glibc's retaining tunables (cpu_tuning item 4) are switched off: mimalloc replaces malloc
    assert env == {"KERAS_BACKEND": "jax", "LD_PRELOAD": str(library),
                   "KERAS_ETSDM_RETAIN_MEMORY": "0"}
    monkeypatch.setattr(train_step, "mimalloc_library", lambda: None)
    with pytest.raises(SystemExit, match="cmeel-mimalloc wheel is not installed"):
        train_step.worker_environ("jax", "mimalloc", environ={})


def test_vs_diffusers_grad_clip_norm_is_plain_adam_by_default_and_rejects_negatives(capsys):
    assert vs_diffusers.parse_args([]).grad_clip_norm == 0.0
    assert vs_diffusers.parse_args(["--grad_clip_norm", "1"]).grad_clip_norm == 1.0
    with pytest.raises(SystemExit):
        vs_diffusers.parse_args(["--grad_clip_norm", "-1"])
    assert "expected a number >= 0" in capsys.readouterr().err


def test_direct_upsample_variant_reaches_the_worker_environment(monkeypatch):
    # "<backend>@direct_upsample": the worker turns the sub-pixel upsampling off (benchmarking
    # the form before it); other options stay refused with the accepted ones named
    captured = {}

    class _Captured:
        def __init__(self, name, argv, env, **kwargs):
            captured[name] = env

    monkeypatch.setattr(vs_diffusers.harness, "Worker", _Captured)
    args = vs_diffusers.parse_args([])
    vs_diffusers.start_worker(args, "keras", "jax@direct_upsample", "keras-jax@direct_upsample")
    vs_diffusers.start_worker(args, "keras", "tensorflow", "keras-tensorflow")
    assert captured["keras-jax@direct_upsample"] == {
        "KERAS_BACKEND": "jax", vs_diffusers.DIRECT_UPSAMPLE_VARIABLE: "1"}
    assert captured["keras-tensorflow"] == {"KERAS_BACKEND": "tensorflow"}
    with pytest.raises(SystemExit, match="direct_upsample"):
        vs_diffusers.start_worker(args, "keras", "jax@subpixel", "keras-jax@subpixel")
    # "jax@xla:<flag>=<value>": one XLA flag after the caller's, JAX only
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    flag = "xla:xla_cpu_enable_concurrency_optimized_scheduler=true"
    vs_diffusers.start_worker(args, "keras", f"jax@{flag}", "keras-jax@flag")
    assert captured["keras-jax@flag"] == {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true "
                     "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    with pytest.raises(SystemExit, match="jax@xla:<xla_flag>=<value>"):
        vs_diffusers.start_worker(args, "keras", f"tensorflow@{flag}", "keras-tensorflow@flag")
    with pytest.raises(SystemExit, match="jax@xla:<xla_flag>=<value>"):
        vs_diffusers.start_worker(args, "keras", "jax@xla:not a flag", "keras-jax@bad")
    # "jax@train_opt_level=N": LLVM's level for JAX's training step, 0-3, JAX only
    vs_diffusers.start_worker(args, "keras", "jax@train_opt_level=3", "keras-jax@level3")
    assert captured["keras-jax@level3"] == {"KERAS_BACKEND": "jax",
                                            "KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL": "3"}
    for bad in ("jax@train_opt_level=4", "tensorflow@train_opt_level=1"):
        with pytest.raises(SystemExit, match="jax@train_opt_level=0..3"):
            vs_diffusers.start_worker(args, "keras", bad, "keras-bad")
    # "<backend>@hugetlb=1": glibc's huge-page tunable given to the worker (kept by the start-up)
    vs_diffusers.start_worker(args, "keras", "jax@hugetlb=1", "keras-jax@hugetlb=1")
    assert captured["keras-jax@hugetlb=1"] == {"KERAS_BACKEND": "jax",
                                               "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    with pytest.raises(SystemExit, match="hugetlb=0 or =1"):
        vs_diffusers.start_worker(args, "keras", "jax@hugetlb=2", "keras-jax@hugetlb=2")
    # "<backend>@winograd_training=0": the worker's training steps keep the direct convolutions
    vs_diffusers.start_worker(args, "keras", "jax@winograd_training=0", "keras-jax@wt0")
    assert captured["keras-jax@wt0"] == {"KERAS_BACKEND": "jax",
                                         vs_diffusers.WINOGRAD_TRAINING_VARIABLE: "0"}
    # "=N": the form only at outputs up to N×N (train(winograd_training=N)); N from 8
    vs_diffusers.start_worker(args, "keras", "jax@winograd_training=16", "keras-jax@wt16")
    assert captured["keras-jax@wt16"] == {"KERAS_BACKEND": "jax",
                                          vs_diffusers.WINOGRAD_TRAINING_VARIABLE: "16"}
    for bad in ("2", "7", "x"):
        with pytest.raises(SystemExit, match=r"winograd_training=0, =1 or =N \(N ≥ 8\)"):
            vs_diffusers.start_worker(args, "keras", f"jax@winograd_training={bad}", "bad")


def test_small_conv_rows_pair_the_two_forms_and_unknown_tasks_are_refused():
    import small_conv

    times = {"conv": [0.010, 0.012, 0.011], "matmul": [0.002, 0.003, 0.002]}
    row = small_conv.paired_row(["1, 2, 512 → 512 (2×2 out)", "forward"], times)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["1, 2, 512 → 512 (2×2 out)", "forward", "11.00", "2.00"]
    ratio = harness.paired_ratio_ci(times["conv"], times["matmul"])
    assert cells[4] == f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"
    args = small_conv.parse_args(["--part", "network", "--tasks", "forward,sample"])
    with pytest.raises(SystemExit, match="unknown \\['sample'\\]"):
        small_conv.run_network(args, "jax", False)  # before any worker starts


def test_winograd_network_part_is_small_conv_with_the_winograd_switch(monkeypatch):
    import small_conv
    import winograd as winograd_bench

    seen = []
    monkeypatch.setattr(small_conv, "main", lambda argv: seen.append(argv))
    winograd_bench.main(["--part", "network", "--resolutions", "32", "--tasks", "forward",
                         "--repeats", "3"])
    args = small_conv.parse_args(seen[0])
    assert (args.part, args.switch, args.network, args.resolutions, args.tasks,
            args.repeats) == ("network", "winograd", "cifar10", "32", "forward", 3)
    assert dict(small_conv.SWITCHES)["winograd_training"] == [
        ("keras_etsdm.winograd", "WINOGRAD"), ("keras_etsdm.winograd", "IN_TRAINING")]
    # the workers' settings: off / on values per module attribute
    assert small_conv.switch_settings("winograd") == [
        ("keras_etsdm.winograd", "WINOGRAD", False, True)]
    assert small_conv.switch_settings("winograd_training_max16") == [
        ("keras_etsdm.winograd", "IN_TRAINING", False, True),
        ("keras_etsdm.winograd", "TRAINING_MAX_SIZE", None, 16)]
    assert small_conv.parse_args(["--switch", "winograd_training_all_vs_max16"]).switch == \
        "winograd_training_all_vs_max16"


def test_report_from_a_saved_run_recounts_only_the_flops(tmp_path):
    # --report_from rebuilds the report from a saved run's raw rounds: the same ratios and
    # intervals; with --forward_flops_per_image the GFLOP/s scale with the new count and the
    # count as run is kept.
    measured = _fake_measured()
    first = vs_diffusers.build_report(measured, num_resamples=500)
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"args": {"order_seed": 0}, **measured, **first}))
    out_json, out_md = tmp_path / "again.json", tmp_path / "again.md"
    args = vs_diffusers.parse_args(["--report_from", str(saved), "--forward_flops_per_image",
                                    "24e9", "--bootstrap_resamples", "500", "--json",
                                    str(out_json), "--markdown", str(out_md)])
    rows = vs_diffusers.main(args)
    again = json.loads(out_json.read_text())
    assert again["forward_flops_per_image"] == 24e9
    assert again["forward_flops_per_image_as_run"] == 12e9
    assert again["args"] == {"order_seed": 0}
    assert out_md.read_text() == again["markdown"]
    before = {(r["task"], r["framework"]): r for r in first["rows"]}
    for row in rows:
        old = before[(row["task"], row["framework"])]
        assert row["paired_ratio_vs_diffusers"] == old["paired_ratio_vs_diffusers"]
        assert row["gflops"] == pytest.approx(2 * old["gflops"])
