#!/usr/bin/env python
"""Sharing-aware grids on trained models: each grid variant against its plain grid, per arm.

``device_study.py`` settings may end in ``-aware`` (E-TSDM: knots on its piece boundaries, each
step at its piece's shared label; DDPM: the same knots at the true labels) or ``-knots`` (both
arms: those knots at the true labels). Its report pairs the two arms within a setting; this
script pairs each variant with its plain setting (the name without the suffix) within an arm
and seed, reading one or more study reports (the plain settings may come from another study
of the same models and noise: ``device_study`` draws a chunk's noise from (eval seed, training
seed, chunk) only). Reports the per-seed values, the paired differences variant − plain and
whether their sign holds on every seed, for FD, KID and the classifier score. Where both
``X-aware`` and ``X-knots`` were scored, also ``X-aware`` against ``X-knots``: for E-TSDM the
piece relabelling alone (same knots and restarts).

    python benchmarks/grid_variants.py \
        --reports=benchmarks/results/mnist32_n5000/report.json,benchmarks/results/mnist32_aware/report.json \
        --output=benchmarks/results/mnist32_aware/grid_variants.md
"""

import argparse
import json
import os
import sys

SUFFIXES = ("aware", "knots")
METRICS = (("fd", "FD ↓", 3), ("kid", "KID ↓", 4), ("classifier_score", "classifier score ↑", 3))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", required=True,
                   help="comma-separated report.json files of device_study.py")
    p.add_argument("--output", default=None, help="write the markdown here too")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest FD difference allowed where two reports score the same "
                        "(arm, seed, setting): they should hold the same images")
    return p.parse_args(argv)


def collect(paths, tolerance):
    """{(arm, seed): {setting: metrics}} over the reports; a setting scored in two reports
    must agree (same models, noise and grid) within ``tolerance`` in FD."""
    scores, sources = {}, []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        sources.append({"path": path, "complete": report.get("complete"),
                        "settings": report.get("settings", {})})
        for testbed in report["testbeds"].values():
            for run in testbed["runs"]:
                per = scores.setdefault((run["arm"], run["seed"]), {})
                for setting, metrics in run["metrics"].items():
                    if setting in per and abs(per[setting]["fd"] - metrics["fd"]) > tolerance:
                        raise SystemExit(
                            f"{path}: {run['arm']} seed {run['seed']} {setting} FD "
                            f"{metrics['fd']:.4f} differs from another report's "
                            f"{per[setting]['fd']:.4f} by more than {tolerance}: not the same "
                            f"models / noise; pair only studies of the same models.")
                    per.setdefault(setting, metrics)
    return scores, sources


def variant_rows(scores):
    """Every (variant, reference) with both scored for some arm and seed: each -aware / -knots
    setting against its plain setting, and -aware against -knots (the relabelling alone)."""
    settings = sorted({s for per in scores.values() for s in per})
    pairs = []
    for variant in settings:
        base, _, suffix = variant.rpartition("-")
        if suffix in SUFFIXES and base in settings:
            pairs.append((variant, base, ("etsdm", "ddpm")))
        if suffix == "aware" and f"{base}-knots" in settings:
            # the relabelling alone; for DDPM both settings are one sampler (no pieces)
            pairs.append((variant, f"{base}-knots", ("etsdm",)))
    rows = []
    for variant, base, arms in pairs:
        for arm in arms:
            seeds = sorted(seed for (a, seed), per in scores.items()
                           if a == arm and variant in per and base in per)
            if not seeds:
                continue
            row = {"variant": variant, "plain": base, "arm": arm, "seeds": seeds}
            for key, _, _ in METRICS:
                plain = [scores[(arm, s)][base][key] for s in seeds]
                var = [scores[(arm, s)][variant][key] for s in seeds]
                diffs = [v - p for v, p in zip(var, plain)]
                row[key] = {"plain": plain, "variant": var, "diff": diffs,
                            "sign_holds": all(d < 0 for d in diffs) or all(d > 0 for d in diffs)}
            rows.append(row)
    return rows


def markdown(rows, sources):
    lines = ["# Grid variants against their plain grids (and -aware against -knots), per arm", "",
             "Sources: " + ", ".join(f"`{s['path']}` ({'complete' if s['complete'] else 'PARTIAL'})"
                                    for s in sources) + ".", "",
             "Variant − reference per training seed (the same models and evaluation noise). E-TSDM "
             "`-aware`: knots on its piece boundaries, each step at its piece's shared label; "
             "DDPM `-aware` and both arms' `-knots`: the same knots, the network at the true "
             "labels.", ""]
    for key, title, digits in METRICS:
        lines += [f"## {title}", "",
                  "| variant | reference | arm | seeds | reference | variant | variant − reference "
                  "| sign on every seed |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            r = row[key]
            fmt = (lambda xs, sign=False: " / ".join(f"{x:+.{digits}f}" if sign else
                                                     f"{x:.{digits}f}" for x in xs))
            holds = ("one seed" if len(r["diff"]) < 2 else
                     ("lower" if r["diff"][0] < 0 else "higher") if r["sign_holds"] else "mixed")
            lines.append(f"| {row['variant']} | {row['plain']} | {row['arm']} | "
                         f"{', '.join(map(str, row['seeds']))} | {fmt(r['plain'])} | "
                         f"{fmt(r['variant'])} | {fmt(r['diff'], True)} | {holds} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    paths = [p for p in args.reports.split(",") if p]
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--reports: {path} does not exist (a device_study report.json).")
    scores, sources = collect(paths, args.tolerance)
    rows = variant_rows(scores)
    if not rows:
        raise SystemExit("No -aware / -knots setting with its plain setting in these reports.")
    text = markdown(rows, sources)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump({"sources": sources, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
