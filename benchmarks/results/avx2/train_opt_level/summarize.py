"""Pairs of fresh-process first calls (``alternate.sh``): JAX's training step at LLVM level 1
against level 3 (XLA's default) — per pair and as paired ratios with a 95 % bootstrap interval.

    python benchmarks/results/avx2/train_opt_level/summarize.py > .../first_call/summary.txt
"""

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
import harness  # noqa: E402

KEYS = ("first_call_s", "xla_compile", "trace", "second_call_s", "build_s", "roof")


def row(path):
    data = json.load(open(path))
    result = data["results"]["jax"]["off"][0]
    phases = result["first_call_phases_s"]
    return {"first_call_s": result["first_call_s"], "xla_compile": phases["xla_compile"],
            "trace": phases["trace"], "second_call_s": result["second_call_s"],
            "build_s": result["build_s"], "roof": data["roof"]["median"]}


def main():
    pairs = sorted({int(p.rsplit("_", 1)[1][:-5])
                    for p in glob.glob(os.path.join(HERE, "first_call", "level*_*.json"))})
    rows = {level: [row(os.path.join(HERE, "first_call", f"level{level}_{i}.json"))
                    for i in pairs] for level in (1, 3)}
    print("pair | level | " + " | ".join(KEYS))
    for i, pair in enumerate(pairs):
        for level in (1, 3):
            print(f"{pair} | {level} | " + " | ".join(f"{rows[level][i][k]:.2f}" for k in KEYS))
    for key in KEYS[:-1]:
        ci = harness.paired_ratio_ci([r[key] for r in rows[1]], [r[key] for r in rows[3]])
        print(f"level 1 ÷ level 3, {key}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
              f" ({len(pairs)} pairs)")


if __name__ == "__main__":
    main()
