"""benchmarks/grid_variants.py: variants paired with their plain settings per arm and seed,
across study reports; reports that disagree on a shared setting are refused."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import grid_variants  # noqa: E402


def _report(path, runs, complete=True):
    metrics = lambda fd: {"fd": fd, "kid": fd / 10, "classifier_score": 8 - fd}  # noqa: E731
    report = {"complete": complete, "settings": {},
              "testbeds": {"default": {"runs": [
                  {"arm": arm, "seed": seed, "metrics": {k: metrics(v) for k, v in m.items()}}
                  for (arm, seed), m in runs.items()]}}}
    with open(path, "w") as f:
        json.dump(report, f)
    return str(path)


def test_variants_are_paired_with_their_plain_setting(tmp_path):
    first = _report(tmp_path / "a.json", {
        ("etsdm", 0): {"dpm-20": 2.0}, ("etsdm", 1): {"dpm-20": 1.8},
        ("ddpm", 0): {"dpm-20": 1.0}, ("ddpm", 1): {"dpm-20": 0.9}})
    second = _report(tmp_path / "b.json", {
        ("etsdm", 0): {"dpm-20": 2.004, "dpm-20-aware": 0.7, "dpm-20-knots": 1.9},
        ("etsdm", 1): {"dpm-20-aware": 0.6, "dpm-20-knots": 1.7},
        ("ddpm", 0): {"dpm-20-aware": 0.8}, ("ddpm", 1): {"dpm-20-aware": 1.1}},
        complete=False)
    out = tmp_path / "out.md"
    assert grid_variants.main([f"--reports={first},{second}", f"--output={out}"]) == 0
    rows = {(r["variant"], r["plain"], r["arm"]): r
            for r in json.load(open(tmp_path / "out.json"))["rows"]}
    assert set(rows) == {("dpm-20-aware", "dpm-20", "etsdm"), ("dpm-20-aware", "dpm-20", "ddpm"),
                         ("dpm-20-knots", "dpm-20", "etsdm"),
                         ("dpm-20-aware", "dpm-20-knots", "etsdm")}
    relabel = rows[("dpm-20-aware", "dpm-20-knots", "etsdm")]["fd"]
    assert relabel["diff"] == pytest.approx([-1.2, -1.1]) and relabel["sign_holds"]
    rows = {(v, a): r for (v, p, a), r in rows.items() if p == "dpm-20"}
    aware = rows[("dpm-20-aware", "etsdm")]["fd"]
    assert aware["plain"] == [2.0, 1.8]  # the first report's value where both have it
    assert aware["diff"] == pytest.approx([-1.3, -1.2]) and aware["sign_holds"]
    ddpm = rows[("dpm-20-aware", "ddpm")]["fd"]
    assert ddpm["diff"] == pytest.approx([-0.2, 0.2]) and not ddpm["sign_holds"]
    text = out.read_text()
    assert ("| dpm-20-aware | dpm-20 | etsdm | 0, 1 | 2.000 / 1.800 | 0.700 / 0.600 | "
            "-1.300 / -1.200 | lower |") in text
    assert ("| dpm-20-aware | dpm-20 | ddpm | 0, 1 | 1.000 / 0.900 | 0.800 / 1.100 | "
            "-0.200 / +0.200 | mixed |") in text
    assert "(PARTIAL)" in text


def test_disagreeing_reports_and_missing_files_are_refused(tmp_path):
    first = _report(tmp_path / "a.json", {("etsdm", 0): {"dpm-20": 2.0}})
    other = _report(tmp_path / "b.json", {("etsdm", 0): {"dpm-20": 2.5, "dpm-20-aware": 1.0}})
    with pytest.raises(SystemExit, match="differs from another report"):
        grid_variants.main([f"--reports={first},{other}"])
    with pytest.raises(SystemExit, match="does not exist"):
        grid_variants.main([f"--reports={tmp_path / 'none.json'}"])
    with pytest.raises(SystemExit, match="No -aware / -knots"):
        grid_variants.main([f"--reports={first}"])
