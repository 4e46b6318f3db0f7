#!/usr/bin/env python
"""Tables of run.sh's first calls: TensorFlow with the fused Adam update against Keras's (AVX2).

    python benchmarks/results/avx2/tf_release/summarize.py > benchmarks/results/avx2/tf_release/first_call.md

Pairs by round (the two processes of a pair ran one after the other, the order swapped every
pair), per jit mode (``auto``: XLA on this AVX2 CPU; ``false``: TensorFlow's graph); the paired
ratio unfused ÷ fused with the percentile bootstrap of ``harness.paired_ratio_ci``, also scaled
by each process's numpy roof (time × roof), since this machine's speed drifts."""

import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
import harness  # noqa: E402  (benchmarks/harness.py)

MODES = {"auto": "XLA (`--jit_compile auto`, the AVX2 default)",
         "false": "TensorFlow's graph (`--jit_compile false`, the AVX-512 default)"}


def first_calls():
    rows = {}
    for path in glob.glob(os.path.join(HERE, "first_call", "*.json")):
        jit, optimizer, pair = re.match(r"(auto|false)_(clipped_adam(?:_unfused)?)_(\d+)\.json",
                                        os.path.basename(path)).groups()
        with open(path) as f:
            data = json.load(f)
        run = data["results"]["tensorflow"]["off"][0]
        kind = "unfused" if optimizer.endswith("unfused") else "fused"
        rows.setdefault(jit, {}).setdefault(int(pair), {})[kind] = {
            "first": run["first_call_s"], "second": run["second_call_s"], "build": run["build_s"],
            "peak": run["peak_rss_mib"], "roof": data["roof"]["median"],
            "cpu": data["cpu_header"]}
    return {jit: {p: v for p, v in sorted(pairs.items()) if len(v) == 2}
            for jit, pairs in rows.items()}


def main():
    modes = first_calls()
    cpu = next(iter(next(iter(modes.values())).values()))["fused"]["cpu"].split(";")[0]
    print("# TensorFlow's first training call: Adam fused (one kernel per variable) against "
          f"Keras's update\n\n{cpu} (numpy roof per process below). DDPM CIFAR-10 U-Net, batch "
          "8, `bin/train`'s optimizer (`make_optimizer`: Adam 2e-4, clipping at 1.0), fresh "
          "processes, compilation cache off (`run.sh` part 1).\n")
    for jit, pairs in modes.items():
        print(f"## {MODES[jit]}\n")
        print("| pair | unfused: first call s | second s | peak MiB | roof GFLOP/s "
              "| fused: first call s | second s | peak MiB | roof GFLOP/s | unfused ÷ fused |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for p, v in pairs.items():
            u, f = v["unfused"], v["fused"]
            print(f"| {p} | {u['first']:.1f} | {u['second']:.2f} | {u['peak']:,.0f} | "
                  f"{u['roof']:.0f} | {f['first']:.1f} | {f['second']:.2f} | {f['peak']:,.0f} | "
                  f"{f['roof']:.0f} | {u['first'] / f['first']:.2f} |")
        unfused = [v["unfused"]["first"] for v in pairs.values()]
        fused = [v["fused"]["first"] for v in pairs.values()]
        ci = harness.paired_ratio_ci(unfused, fused)
        print(f"\nFirst call: medians unfused {statistics.median(unfused):.1f} s, fused "
              f"{statistics.median(fused):.1f} s over {len(fused)} pairs; paired unfused ÷ "
              f"fused {ci['ratio']:.2f}× [{ci['low']:.2f}, {ci['high']:.2f}] (95 % bootstrap; "
              f"{sum(u > f for u, f in zip(unfused, fused))} of {len(fused)} pairs faster "
              "fused)", end="")
        scaled = harness.paired_ratio_ci([v["unfused"]["first"] * v["unfused"]["roof"]
                                          for v in pairs.values()],
                                         [v["fused"]["first"] * v["fused"]["roof"]
                                          for v in pairs.values()])
        print(f"; scaled by each process's roof {scaled['ratio']:.2f}× [{scaled['low']:.2f}, "
              f"{scaled['high']:.2f}]. Peaks: unfused "
              f"{min(v['unfused']['peak'] for v in pairs.values()):,.0f}–"
              f"{max(v['unfused']['peak'] for v in pairs.values()):,.0f}, fused "
              f"{min(v['fused']['peak'] for v in pairs.values()):,.0f}–"
              f"{max(v['fused']['peak'] for v in pairs.values()):,.0f} MiB.\n")


if __name__ == "__main__":
    main()
