"""benchmarks/roof.py: the vector-unit probe builds and runs, and a goal turns into the GFLOP/s
it needs (the arithmetic behind the README's ceilings)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import roof  # noqa: E402

FORWARD_FLOPS = 1.0e10


def _result(tasks, rows, forward_flops=FORWARD_FLOPS, network="U-Net x", precision=None):
    args = {} if precision is None else {"precision": precision}
    return {"tasks": tasks, "network": network, "forward_flops_per_image": forward_flops,
            "args": args,
            "rows": [{"task": t, "framework": f, "images_per_s": {"median": r}}
                     for t, f, r in rows]}


def test_training_goal_is_1_3x_eager_diffusers_in_model_gflops():
    result = _result(["train"], [("train", "keras-tensorflow", 4.0), ("train", "diffusers", 5.0),
                                 ("train", "diffusers-tuned", 6.0)])
    (run,) = roof.task_runs("r.json", result)
    assert run["task"] == "train" and run["precision"] == "float32"
    assert run["flops_per_unit"] == 3 * FORWARD_FLOPS  # forward + backward
    assert run["goal_rate"] == pytest.approx(6.5)  # 1.3 × eager, not × the tuned variant
    assert run["goal_gflops"] == pytest.approx(6.5 * 3 * FORWARD_FLOPS / 1e9)
    assert run["rows"]["keras-tensorflow"]["gflops"] == pytest.approx(4.0 * 30.0)


def test_sampling_goal_is_the_best_diffusers_variant_per_nfe():
    result = _result(["ddim", "dpm"], [
        ("ddim", "keras-jax", 10.0), ("ddim", "diffusers", 9.0),
        ("ddim", "diffusers-compile", 11.0),
        ("dpm", "keras-jax", 10.0), ("dpm", "diffusers", 12.0), ("dpm", "diffusers-tuned", 8.0)],
        precision="bf16")
    ddim, dpm = roof.task_runs("r.json", result)
    assert ddim["flops_per_unit"] == FORWARD_FLOPS  # one forward per NFE
    assert ddim["goal_rate"] == 11.0 and "diffusers-compile" in ddim["goal_text"]
    assert dpm["goal_rate"] == 12.0 and "(diffusers)" in dpm["goal_text"]
    assert ddim["precision"] == "bf16"


def test_bad_results_say_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="eager 'diffusers' training row"):
        roof.task_runs("r.json", _result(["train"], [("train", "keras-jax", 1.0)]))
    with pytest.raises(SystemExit, match="none of the tasks"):
        roof.task_runs("r.json", _result(["forward"], []))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match="cannot read"):
        roof.load_results([str(bad)])
    forward_only = tmp_path / "forward.json"
    forward_only.write_text(json.dumps(_result(["forward"], [])))
    with pytest.raises(SystemExit, match="no train, ddim or dpm task"):
        roof.load_results([str(forward_only)])


def test_a_run_without_jax_borrows_the_flop_count_of_the_same_network(tmp_path):
    with_count = tmp_path / "a.json"
    without = tmp_path / "b.json"
    with_count.write_text(json.dumps(_result(["train"], [("train", "diffusers", 1.0)])))
    without.write_text(json.dumps(_result(["train"], [("train", "diffusers", 1.0)],
                                          forward_flops=None)))
    results = roof.load_results([str(with_count), str(without)])
    assert results[str(without)]["forward_flops_per_image"] == FORWARD_FLOPS
    other = tmp_path / "c.json"
    other.write_text(json.dumps(_result(["train"], [("train", "diffusers", 1.0)],
                                        forward_flops=None, network="another")))
    with pytest.raises(SystemExit, match="no forward FLOP count"):
        roof.load_results([str(with_count), str(other)])


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="no C compiler on this machine")
def test_vector_unit_probe_builds_and_measures(tmp_path):
    flags = roof.harness._cpu_tuning().cpu_isa_flags()
    if not ({"avx2", "fma"} <= flags or "avx512f" in flags):
        pytest.skip("the probe targets AVX2+FMA or AVX-512 CPUs")
    binary, isa, has_bf16 = roof.build_peak_probe(flags, str(tmp_path))
    assert isa in ("avx512f", "avx2+fma")
    rate = roof.run_peak(binary, threads=1, iterations=20000, kind="fp32", repeats=2)
    assert rate["n"] == 2 and rate["min"] > 0 and len(rate["values"]) == 2
    # an AVX2 build has no bf16 kernel: it refuses instead of printing a rate
    avx2_dir = tmp_path / "avx2"
    avx2_dir.mkdir()
    avx2_binary, avx2_isa, avx2_bf16 = roof.build_peak_probe({"avx2", "fma"}, str(avx2_dir))
    assert avx2_isa == "avx2+fma" and not avx2_bf16
    if {"avx2", "fma"} <= flags:
        refused = subprocess.run([avx2_binary, "1", "10", "bf16"], capture_output=True, text=True)
        assert refused.returncode == 2 and "no AVX512-BF16" in refused.stderr
    with pytest.raises(SystemExit, match="AVX2\\+FMA or AVX-512"):
        roof.build_peak_probe({"sse2"}, str(tmp_path))
