#!/usr/bin/env python
"""Tables of run.sh / run_first_call_more.sh: one malloc arena against two (JAX, AVX2).

    python benchmarks/results/avx2/arena/summarize.py > benchmarks/results/avx2/arena/summary.md

First calls: pairs by round (the two processes of one round ran one after the other), the
paired ratio one ÷ two with the percentile bootstrap of ``harness.paired_ratio_ci``. Memory:
RSS after the first step and after the steps, and the peak (VmHWM), per process."""

import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
import harness  # noqa: E402  (benchmarks/harness.py)


def first_calls():
    rows = {}
    for path in glob.glob(os.path.join(HERE, "first_call_*_*.json")):
        arena, rnd = re.match(r"first_call_(one|two)_(\d+)\.json", os.path.basename(path)).groups()
        with open(path) as f:
            data = json.load(f)
        run = data["results"]["jax"]["off"][0]
        rows.setdefault(int(rnd), {})[arena] = {"first": run["first_call_s"],
                                                "build": run["build_s"],
                                                "peak": run["peak_rss_mib"],
                                                "roof": data["roof"]["median"],
                                                "cpu": data["cpu_header"]}
    return {r: v for r, v in sorted(rows.items()) if len(v) == 2}


def memories():
    rows = []
    for path in sorted(glob.glob(os.path.join(HERE, "memory_*", "memory.json"))):
        with open(path) as f:
            data = json.load(f)
        for name, r in data["results"].items():
            stages = r["stages"]
            rows.append((os.path.basename(os.path.dirname(path)), name, r["glibc_tunables"],
                         stages["first step"]["rss"], stages["steps"]["rss"],
                         stages["steps"]["hwm"]))
    return rows


def main():
    pairs = first_calls()
    cpu = next(iter(pairs.values()))["one"]["cpu"].split(";")[0]
    print(f"# One malloc arena against two, JAX on AVX2\n\n{cpu} (numpy roof per process below).\n")
    print("## First call of the training step (fresh processes, compilation cache off)\n")
    print("| round | one arena: first call s | build s | peak MiB | roof GFLOP/s "
          "| two arenas: first call s | build s | peak MiB | roof GFLOP/s | one ÷ two |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, v in pairs.items():
        one, two = v["one"], v["two"]
        print(f"| {r} | {one['first']:.1f} | {one['build']:.1f} | {one['peak']:,.0f} | "
              f"{one['roof']:.0f} | {two['first']:.1f} | {two['build']:.1f} | "
              f"{two['peak']:,.0f} | {two['roof']:.0f} | {one['first'] / two['first']:.2f} |")
    for key, label in (("first", "first call"), ("build", "build")):
        one = [v["one"][key] for v in pairs.values()]
        two = [v["two"][key] for v in pairs.values()]
        ci = harness.paired_ratio_ci(one, two)
        print(f"\n{label}: medians one {statistics.median(one):.1f} s, two "
              f"{statistics.median(two):.1f} s over {len(one)} pairs; paired one ÷ two "
              f"{ci['ratio']:.2f}× [{ci['low']:.2f}, {ci['high']:.2f}] (95 % bootstrap)")
    roofs = [v["two"]["roof"] / v["one"]["roof"] for v in pairs.values()]
    print(f"\nnumpy roof of the process, two ÷ one: median {statistics.median(roofs):.2f}, higher "
          f"with two in {sum(r > 1 for r in roofs)} of {len(roofs)} pairs (roof_check.sh: the "
          "malloc setting itself does not change it), so the machine was faster during the "
          "two-arena processes. Scaled by each process's roof (time × roof, assuming time ∝ "
          "1 / roof):")
    for key, label in (("first", "first call"), ("build", "build")):
        one = [v["one"][key] * v["one"]["roof"] for v in pairs.values()]
        two = [v["two"][key] * v["two"]["roof"] for v in pairs.values()]
        ci = harness.paired_ratio_ci(one, two)
        print(f"- {label}: one ÷ two {ci['ratio']:.2f}× [{ci['low']:.2f}, {ci['high']:.2f}]")
    print("\n## Memory, `benchmarks/memory.py` (train_on_batch, one batch)\n")
    print("| directory | label | GLIBC_TUNABLES | RSS after first step | RSS after steps | peak |")
    print("|---|---|---|---:|---:|---:|")
    for row in memories():
        print(f"| {row[0]} | {row[1]} | `{row[2]}` | {row[3]:,.0f} | {row[4]:,.0f} "
              f"| {row[5]:,.0f} |")


if __name__ == "__main__":
    main()
