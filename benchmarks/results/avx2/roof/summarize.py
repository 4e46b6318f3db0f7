"""Issue 19's training goal against this AVX2 machine's ceilings, run by run.

Reads roof.py's two probe runs here (vector-unit peak, best numpy GEMM) and, for every train
task they analysed, the numpy 2048³ roof that vs_diffusers.py measured at the start and end of
that run (the machine's GEMM rate drifts between runs; the register-only FMA loop does not).

    python benchmarks/results/avx2/roof/summarize.py > benchmarks/results/avx2/roof/summary.md
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
PROBES = ["roof_avx2_a.json", "roof_avx2_b.json"]
KERAS = ("keras-jax", "keras-tensorflow")


def main():
    probes = [json.load(open(os.path.join(HERE, name))) for name in PROBES]
    peaks = [p["peaks"]["fp32"]["median"] for p in probes]
    gemms = [p["best_gemm_gflops"] for p in probes]
    peak = sum(peaks) / len(peaks)
    print(f"CPU: {probes[0]['cpu']}. float32 vector-unit peak (2 threads) "
          f"{' / '.join(f'{v:.1f}' for v in peaks)} GFLOP/s, best numpy GEMM "
          f"{' / '.join(f'{v:.1f}' for v in gemms)} GFLOP/s (the two roof.py runs); "
          f"percentages of the peak below use their mean, {peak:.1f}.\n")
    print("| run | eager diffusers img/s | 1.3× needs, GFLOP/s | % of peak | run's own numpy "
          "roof start / end (max), GFLOP/s | needs ÷ that max | fastest Keras (default), "
          "GFLOP/s (% peak) | best peer, GFLOP/s (% peak) |")
    print("|---|---:|---:|---:|---|---:|---|---|")
    for analysis in probes[0]["analyses"]:
        if analysis["task"] != "train":
            continue
        run = json.load(open(os.path.join(ROOT, analysis["path"])))
        rows = analysis["rows"]
        eager = rows["diffusers"]
        needs = 1.3 * eager["gflops"]
        own = [run["roof_start"]["median"], run["roof_end"]["median"]]
        own_max = max(run["roof_start"]["max"], run["roof_end"]["max"])
        keras = {k: v for k, v in rows.items() if k in KERAS}
        name, best = max(keras.items(), key=lambda kv: kv[1]["gflops"])
        peers = {k: v for k, v in rows.items() if k.startswith("diffusers")}
        peer_name, peer = max(peers.items(), key=lambda kv: kv[1]["gflops"])
        label = os.path.relpath(analysis["path"], "benchmarks/results/avx2")
        print(f"| `{label}` | {eager['rate']:.2f} | {needs:.1f} | {100 * needs / peak:.0f} % | "
              f"{own[0]:.0f} / {own[1]:.0f} ({own_max:.0f}) | {needs / own_max:.2f} | "
              f"{name} {best['gflops']:.1f} ({100 * best['gflops'] / peak:.0f} %) | "
              f"{peer_name} {peer['gflops']:.1f} ({100 * peer['gflops'] / peak:.0f} %) |")


if __name__ == "__main__":
    main()
