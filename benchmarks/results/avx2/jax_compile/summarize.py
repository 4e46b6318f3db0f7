#!/usr/bin/env python
"""Tables of screen.sh's fresh-process first calls: JAX's training step with an XLA flag added
against cpu_tuning's flags alone (AVX2); with ``build [folder]``, alternate_build.sh's pairs instead
(the library before / after the EMA's copies were made without compiled ops; ``folder`` default
``build``, ``tried_slots/build`` for the variant that also made Adam's slots so).

    python benchmarks/results/avx2/jax_compile/summarize.py > benchmarks/results/avx2/jax_compile/screen.md
    python benchmarks/results/avx2/jax_compile/summarize.py build > benchmarks/results/avx2/jax_compile/build.md

Each pair is one round of ``screen.sh`` (the default process first, then the flagged one). Per
flag: every pair's seconds (first call, its XLA compile, the model build and the build's own
XLA compiles, the second call) and each process's numpy roof; then flag ÷ default per quantity
with the percentile bootstrap of ``harness.paired_ratio_ci`` where there are at least 2 pairs
(a ratio below 1 is a shorter time). A flagged process that left no JSON (XLA aborts on a flag
it does not know) is listed as such."""

import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
import harness  # noqa: E402  (benchmarks/harness.py)

QUANTITIES = (("first call", lambda r: r["first_call_s"]),
              ("XLA compile", lambda r: r["first_call_phases_s"]["xla_compile"]),
              ("build", lambda r: r["build_s"]),
              ("build's XLA", lambda r: r["build_phases_s"]["xla_compile"]),
              ("second call", lambda r: r["second_call_s"]))


def load(path):
    with open(path) as f:
        data = json.load(f)
    run = data["results"]["jax"]["off"][0]
    run["roof"] = data["roof"]["median"]
    run["cpu"] = data["cpu_header"]
    return run


def pairs_by_flag():
    flags = {}
    for path in glob.glob(os.path.join(HERE, "screen", "default_*.json")):
        name, pair = re.match(r"default_(.+)_(\d+)\.json", os.path.basename(path)).groups()
        flagged = os.path.join(HERE, "screen", f"{name}_{pair}.json")
        flags.setdefault(name, {})[int(pair)] = (
            load(path), load(flagged) if os.path.exists(flagged) else None)
    return {name: dict(sorted(pairs.items())) for name, pairs in sorted(flags.items())}


def ratio_line(complete, label):
    """``label ÷ base`` per quantity over the complete pairs (base, new), bootstrap interval."""
    return f"{label}, median of pairs [95 % bootstrap]: " + "; ".join(
        "{} {ratio:.2f} [{low:.2f}, {high:.2f}]".format(q, **harness.paired_ratio_ci(
            [get(new) for _, new in complete], [get(base) for base, _ in complete]))
        for q, get in QUANTITIES) + f" (n = {len(complete)})"


def build_pairs(folder="build"):
    """alternate_build.sh's pairs: the library before → after, one fresh process each."""
    folder = os.path.join(HERE, folder)
    pairs = {}
    for path in glob.glob(os.path.join(folder, "before_*.json")):
        pair = int(re.match(r"before_(\d+)\.json", os.path.basename(path)).group(1))
        after = os.path.join(folder, f"after_{pair}.json")
        if os.path.exists(after):
            pairs[pair] = (load(path), load(after))
    print(f"# JAX's build and first call: `{os.path.relpath(folder, HERE)}` (AVX2)\n")
    print("\n".join(f"- {cpu}" for cpu in sorted({r["cpu"] for p in pairs.values() for r in p})))
    print("\nDDPM CIFAR-10 U-Net, batch 8, bin/train's optimizer (`--optimizer clipped_adam`), "
          "`train_on_batch` under XLA, a fresh process each (`alternate_build.sh`: the library "
          "at a1e4183, then as changed). Seconds; build's XLA: the sum and the number of JAX's "
          "backend compiles while the model and optimizer are made; peak RSS of the process "
          "(first and second call). Per pair: before → after.\n")
    print("| pair | " + " | ".join(q for q, _ in QUANTITIES)
          + " | build's compiles | peak RSS MiB | numpy roof GFLOP/s |")
    print("|---|" + "---:|" * (len(QUANTITIES) + 3))
    for pair, (before, after) in sorted(pairs.items()):
        print(f"| {pair} | " + " | ".join(f"{get(before):.1f} → {get(after):.1f}"
                                          for _, get in QUANTITIES)
              + f" | {before['build_phases_s']['xla_compile_count']} → "
                f"{after['build_phases_s']['xla_compile_count']}"
              + f" | {before['peak_rss_mib']:.0f} → {after['peak_rss_mib']:.0f}"
              + f" | {before['roof']:.0f} → {after['roof']:.0f} |")
    if len(pairs) >= 2:
        print("\n" + ratio_line(list(pairs.values()), "after ÷ before"))


def main():
    if sys.argv[1:2] == ["build"]:
        return build_pairs(*sys.argv[2:3])
    flags = pairs_by_flag()
    cpus = sorted({run["cpu"] for pairs in flags.values() for pair in pairs.values()
                   for run in pair if run is not None})
    print("# JAX's first training call with one XLA flag added (AVX2)\n")
    print("\n".join(f"- {cpu}" for cpu in cpus))
    print("\nDDPM CIFAR-10 U-Net, batch 8, `train_on_batch` under XLA, a fresh process each "
          "(`benchmarks/first_call.py --backends jax --rounds 1 --modes off --jit_compile auto`); "
          "seconds; XLA compile and build's XLA are the sums of JAX's backend-compile events. "
          "Per pair: default → flagged.\n")
    for name, pairs in flags.items():
        flag = "--xla_" + name.replace("-", "=", 1)
        print(f"## `{flag}`\n")
        print("| pair | " + " | ".join(q for q, _ in QUANTITIES) + " | numpy roof GFLOP/s |")
        print("|---|" + "---:|" * (len(QUANTITIES) + 1))
        complete = {}
        for pair, (default, flagged) in pairs.items():
            if flagged is None:
                print(f"| {pair} | " + " | ".join(f"{get(default):.1f} → no result"
                                                   for _, get in QUANTITIES)
                      + f" | {default['roof']:.0f} → — |")
                continue
            complete[pair] = (default, flagged)
            print(f"| {pair} | " + " | ".join(f"{get(default):.1f} → {get(flagged):.1f}"
                                              for _, get in QUANTITIES)
                  + f" | {default['roof']:.0f} → {flagged['roof']:.0f} |")
        if not complete:
            print("\nNo flagged process finished (XLA does not know the flag).\n")
            continue
        if len(complete) >= 2:
            print("\n" + ratio_line(list(complete.values()), "flag ÷ default"))
        print()


if __name__ == "__main__":
    main()
